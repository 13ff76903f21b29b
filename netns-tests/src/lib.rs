//! The multi-node harness: a real etcd, network namespaces wired as an underlay, flanneld-rs
//! (or another daemon) in each node, and pods made through the CNI plugin as a runtime would.
//!
//! Everything a test creates carries a prefix unique to the test run (`frt<pid>x<n>`) and is
//! removed when its guard drops, on success and on panic; `sweep` removes leftovers of runs that
//! were killed before their guards could run. Needs root.

pub mod cluster;
pub mod etcd;
pub mod etcd_cluster;
pub mod goflannel;
pub mod netpol;
pub mod proc;
pub mod traffic;
pub mod wg;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The tag every namespace of ours starts with, followed by the owning process id.
pub const TAG: &str = "frt";

/// A fresh prefix for one test: unique across the runs and tests alive on this machine.
pub fn unique_prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{TAG}{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether we can create namespaces (root tests skip with a message otherwise).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Why root-only tests cannot run here, or `None` as root.
pub fn root_missing() -> Option<String> {
    (!is_root()).then(|| "needs root (network namespaces)".to_string())
}

/// The one gate for a test that cannot run here (no root, a tool or Go Flannel missing): with
/// a reason it says "skipped" and returns true, except under `CI=true`, where it is an error:
/// CI installs everything, so a skip there would hide a missing install step.
pub fn must_skip(why: Option<String>) -> anyhow::Result<bool> {
    let Some(why) = why else {
        return Ok(false);
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        anyhow::bail!("{why}: this test must run in CI");
    }
    eprintln!("skipped: {why}");
    Ok(true)
}

/// The directory holding the workspace's built binaries (`target/<profile>`), found from the
/// running executable (a test in `target/<profile>/deps/`, or `demo`/`bench`) unless `FLANNELD_RS_BIN_DIR` says otherwise.
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("FLANNELD_RS_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("locating the test executable")?;
    let mut dir = exe.parent().context("executable has no directory")?;
    // Test binaries live in target/<profile>/deps, the harness's own binaries one level up.
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps/ has no parent")?;
    }
    Ok(dir.to_path_buf())
}

/// Path to one of our binaries, with a clear error if the workspace was not built.
pub fn binary(name: &str) -> Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.exists() {
        bail!(
            "{} not found: build the workspace binaries first (cargo build --workspace --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns the time it took.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if cond() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes namespaces (and the processes inside them) left by runs of ours that are gone.
pub fn sweep() {
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix(TAG) else {
            continue;
        };
        let pid: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() || std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        proc::kill_netns_pids(&name);
        let _ = proc::run("ip", &["netns", "del", &name]);
    }
}
