//! The delegate configs saved by ADD under dataDir/<containerID>, so DEL and CHECK run the
//! delegate with exactly the config ADD used, even after subnet.env or the network config changed.

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::error::CniError;

/// The files hold container network details: private to root, as with Flannel (0700 / 0600).
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

pub struct SavedConfigs<'a> {
    dir: &'a Path,
}

impl<'a> SavedConfigs<'a> {
    pub fn new(dir: &'a Path) -> Self {
        SavedConfigs { dir }
    }

    /// The file for a container; `container_id` has been validated (no '/', not "." or "..").
    pub fn path(&self, container_id: &str) -> PathBuf {
        self.dir.join(container_id)
    }

    /// Writes atomically and durably (temp file, fsync, rename, directory fsync): a crash never
    /// leaves a truncated config that would make a later DEL unable to clean up, and once ADD
    /// has run the delegate the config survives a power cut, so DEL can still undo it.
    pub fn save(&self, container_id: &str, conf: &[u8]) -> Result<(), CniError> {
        // Container IDs never start with '.', so no temp file can be another container's.
        write_atomic(self.dir, container_id, conf).map_err(|source| CniError::SavedConfig {
            action: "write",
            path: self.path(container_id),
            source,
        })
    }

    /// The saved config, `None` if there is none.
    pub fn load(&self, container_id: &str) -> Result<Option<Vec<u8>>, CniError> {
        let path = self.path(container_id);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CniError::SavedConfig {
                action: "read",
                path,
                source,
            }),
        }
    }

    /// Removes the saved config; one already gone is fine (DEL is idempotent).
    pub fn remove(&self, container_id: &str) -> Result<(), CniError> {
        let path = self.path(container_id);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(CniError::SavedConfig {
                action: "remove",
                path,
                source: e,
            }),
            _ => Ok(()),
        }
    }
}

/// Writes `dir/name` atomically and durably: temp file, fsync, rename, directory fsync,
/// creating `dir` (0700) first; the file is 0600. `name` must not start with '.' (temp files
/// do) and contains no '/'.
pub(super) fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> io::Result<()> {
    create_dir_synced(dir)?;
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = write_synced(&tmp, data).and_then(|()| {
        fs::rename(&tmp, &path)?;
        step("rename", &path);
        Ok(())
    });
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

fn write_synced(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)?;
    f.set_permissions(Permissions::from_mode(FILE_MODE))?;
    f.write_all(data)?;
    step("write", path);
    f.sync_all()?;
    step("fsync", path);
    Ok(())
}

/// Creates `dir` and its missing parents (0700), fsyncing the parent of each one made: on a
/// fresh node the first ADD creates dataDir, and a crash must not lose it with the config.
fn create_dir_synced(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = match dir.parent() {
        Some(p) if p.as_os_str().is_empty() => Path::new("."),
        Some(p) => p,
        None => return Ok(()), // "/" always exists
    };
    create_dir_synced(parent)?;
    match DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => step("mkdir", dir),
        // Another ADD made it meanwhile; that one syncs the parent.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(e),
    }
    sync_dir(parent)
}

/// Makes the directory's entries (a rename, a new subdirectory) durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()?;
    step("fsync", dir);
    Ok(())
}

/// Each durability step `save` took, in order: the tests check the protocol with it, since
/// nothing else shows whether an fsync happened.
#[cfg(test)]
fn step(what: &'static str, path: &Path) {
    STEPS.with(|s| s.borrow_mut().push((what, path.to_path_buf())));
}

#[cfg(not(test))]
fn step(_what: &'static str, _path: &Path) {}

#[cfg(test)]
thread_local! {
    static STEPS: std::cell::RefCell<Vec<(&'static str, PathBuf)>> = Default::default();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn save_load_remove() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cni/flannel");
        let saved = SavedConfigs::new(&dir);
        assert_eq!(saved.load("ctr1").unwrap(), None);
        saved.save("ctr1", b"{\"a\":1}").unwrap();
        saved.save("ctr1", b"{\"a\":2}").unwrap();
        assert_eq!(saved.load("ctr1").unwrap().unwrap(), b"{\"a\":2}");
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        assert_eq!(
            fs::metadata(dir.join("ctr1")).unwrap().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "no temp file left");
        saved.remove("ctr1").unwrap();
        saved.remove("ctr1").unwrap();
        assert_eq!(saved.load("ctr1").unwrap(), None);
    }

    /// This thread's steps since the last call, paths relative to `base`.
    fn steps(base: &Path) -> Vec<String> {
        STEPS
            .with(|s| s.take())
            .into_iter()
            .map(|(what, p)| {
                let rel = p.strip_prefix(base).unwrap_or(&p);
                let rel = if rel.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    rel
                };
                format!("{what} {}", rel.display())
            })
            .collect()
    }

    #[test]
    fn save_is_write_fsync_rename_fsync_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let saved = SavedConfigs::new(tmp.path());
        steps(tmp.path());
        saved.save("ctr1", b"{}").unwrap();
        let t = format!(".ctr1.{}.tmp", std::process::id());
        assert_eq!(
            steps(tmp.path()),
            [
                format!("write {t}"),
                format!("fsync {t}"),
                "rename ctr1".to_string(),
                "fsync .".to_string(),
            ]
        );
    }

    #[test]
    fn new_data_dirs_are_synced_into_their_parents() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cni/flannel");
        let saved = SavedConfigs::new(&dir);
        steps(tmp.path());
        saved.save("ctr1", b"{}").unwrap();
        let got = steps(tmp.path());
        assert_eq!(
            got[..4],
            ["mkdir cni", "fsync .", "mkdir cni/flannel", "fsync cni"]
        );
        assert_eq!(got.last().unwrap(), "fsync cni/flannel");
        for d in [tmp.path().join("cni"), dir.clone()] {
            assert_eq!(fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        }
        // Existing directories are left alone.
        saved.save("ctr2", b"{}").unwrap();
        assert!(!steps(tmp.path()).iter().any(|s| s.starts_with("mkdir")));
    }

    #[test]
    fn stale_temp_file_is_replaced_not_left() {
        let tmp = tempfile::tempdir().unwrap();
        let saved = SavedConfigs::new(tmp.path());
        // What a crashed save by an earlier process with our pid left.
        let stale = tmp.path().join(format!(".ctr1.{}.tmp", std::process::id()));
        fs::write(&stale, "{\"old\": \"and much longer than the new one\"}").unwrap();
        fs::set_permissions(&stale, Permissions::from_mode(0o644)).unwrap();
        saved.save("ctr1", b"{}").unwrap();
        assert_eq!(saved.load("ctr1").unwrap().unwrap(), b"{}");
        let mode = fs::metadata(saved.path("ctr1")).unwrap().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!stale.exists());
    }

    #[test]
    fn failed_rename_leaves_no_temp_file() {
        let tmp = tempfile::tempdir().unwrap();
        let saved = SavedConfigs::new(tmp.path());
        // A non-empty directory where the config goes: rename(2) fails with EISDIR.
        fs::create_dir(saved.path("ctr1")).unwrap();
        fs::write(saved.path("ctr1").join("x"), "").unwrap();
        assert!(saved.save("ctr1", b"{}").is_err());
        let names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["ctr1"]);
        assert!(saved.path("ctr1").join("x").exists());
    }

    #[test]
    fn errors_name_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let blocker = tmp.path().join("file");
        fs::write(&blocker, "").unwrap();
        let err = SavedConfigs::new(&blocker).save("ctr1", b"{}").unwrap_err();
        assert!(
            err.to_string()
                .contains(&*blocker.join("ctr1").to_string_lossy()),
            "{err}"
        );
    }
}
