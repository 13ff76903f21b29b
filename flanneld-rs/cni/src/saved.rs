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

    /// Writes atomically (temp file, fsync, rename, directory fsync): a crash never leaves a
    /// truncated config that would make a later DEL unable to clean up.
    pub fn save(&self, container_id: &str, conf: &[u8]) -> Result<(), CniError> {
        let path = self.path(container_id);
        let err = |source| CniError::SavedConfig {
            action: "write",
            path: path.clone(),
            source,
        };
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(self.dir)
            .map_err(err)?;
        // Container IDs never start with '.', so this name cannot be another container's file.
        let tmp = self
            .dir
            .join(format!(".{container_id}.{}.tmp", std::process::id()));
        let written = write_synced(&tmp, conf).and_then(|()| fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(err(e));
        }
        File::open(self.dir).and_then(|d| d.sync_all()).map_err(err)
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

fn write_synced(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)?;
    f.set_permissions(Permissions::from_mode(FILE_MODE))?;
    f.write_all(data)?;
    f.sync_all()
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
