//! One daemon per subnet file: a second flanneld-rs given the same `--subnet-file` would share
//! the node's lease, `flannel0` and port 8285 with the first and fight it silently. The first
//! holds an exclusive `flock` on `<subnet-file>.lock` for its whole life; the kernel drops it
//! when the process dies however it dies, so a crash never leaves a stale lock behind.

use std::ffi::OsString;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error(
        "another flanneld-rs{} already runs with subnet file {} (it holds {}); stop it first",
        .pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        .subnet_file.display(),
        .lock.display()
    )]
    Running {
        subnet_file: PathBuf,
        lock: PathBuf,
        pid: Option<u32>,
    },
    #[error("cannot lock {} ({step}): {error}", .lock.display())]
    Io {
        lock: PathBuf,
        step: &'static str,
        error: io::Error,
    },
}

/// Held for the life of the daemon; dropping it (or exiting) releases the lock.
#[derive(Debug)]
pub struct Instance {
    _file: File,
    lock: PathBuf,
}

impl Instance {
    pub fn lock_path(&self) -> &Path {
        &self.lock
    }
}

/// `<subnet-file>.lock`, beside the file it guards.
pub fn lock_path(subnet_file: &Path) -> PathBuf {
    beside(subnet_file, ".lock")
}

/// `<directory of subnet-file>/flanneld-rs.sock` (`/run/flannel/flanneld-rs.sock` by default):
/// where the instance holding that file serves `flanneld-rs status` and the node's pod API.
/// The CNI plugin derives the same path from the same `subnetFile`.
pub fn socket_path(subnet_file: &Path) -> PathBuf {
    let dir = match subnet_file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    dir.join("flanneld-rs.sock")
}

fn beside(subnet_file: &Path, suffix: &str) -> PathBuf {
    let mut name = OsString::from(subnet_file.as_os_str());
    name.push(suffix);
    PathBuf::from(name)
}

/// Takes the lock for `subnet_file`, or says who holds it. Never waits.
pub fn acquire(subnet_file: &Path) -> Result<Instance, InstanceError> {
    let lock = lock_path(subnet_file);
    let err = |step: &'static str| {
        let lock = lock.clone();
        move |error| InstanceError::Io { lock, step, error }
    };
    if let Some(dir) = lock.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Mode as SubnetEnv::write_atomic creates it.
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(err("creating its directory"))?;
    }
    // Not truncated on open: until we hold the lock, the pid in it is the holder's. Never
    // removed either: unlinking a lock file lets two processes lock two different inodes.
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&lock)
        .map_err(err("opening"))?;
    // SAFETY: flock on a descriptor we own and keep open for the call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::WouldBlock {
            return Err(err("flock")(e));
        }
        return Err(InstanceError::Running {
            subnet_file: subnet_file.to_path_buf(),
            pid: holder_pid(&mut file),
            lock,
        });
    }
    // The pid is for the message above and for operators; the lock itself is what counts.
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .map_err(err("writing our pid"))?;
    Ok(Instance { _file: file, lock })
}

/// The pid the holder wrote, if it did (it may be between its flock and its write).
fn holder_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.take(32).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_instance_is_refused_until_the_first_is_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let subnet_file = dir.path().join("run/flannel/subnet.env");
        let first = acquire(&subnet_file).expect("first");
        assert_eq!(
            first.lock_path(),
            dir.path().join("run/flannel/subnet.env.lock")
        );
        let me = std::process::id();
        assert_eq!(
            std::fs::read_to_string(first.lock_path()).expect("read"),
            format!("{me}\n")
        );

        // flock conflicts between open file descriptions, so one process shows it.
        let err = acquire(&subnet_file).expect_err("second");
        match &err {
            InstanceError::Running { pid, .. } => assert_eq!(*pid, Some(me)),
            other => panic!("{other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains(&*subnet_file.to_string_lossy()) && msg.contains(&format!("pid {me}")),
            "{msg}"
        );

        drop(first);
        let again = acquire(&subnet_file).expect("free again");
        assert_eq!(
            std::fs::read_to_string(again.lock_path()).expect("read"),
            format!("{me}\n")
        );
    }

    #[test]
    fn other_subnet_files_are_independent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _a = acquire(&dir.path().join("a.env")).expect("a");
        let _b = acquire(&dir.path().join("b.env")).expect("b");
    }

    #[test]
    fn unusable_directory_is_an_io_error_naming_the_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "").expect("write");
        let err = acquire(&blocker.join("subnet.env")).expect_err("not a directory");
        assert!(matches!(err, InstanceError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("subnet.env.lock"), "{err}");
    }
}
