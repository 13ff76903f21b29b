//! Go Flannel v0.20.2 (`../shared/flannel-go/flanneld.xz`) as a real peer in mixed clusters.
//!
//! The binary is unpacked into each cluster's temp dir and its sha256 checked. Where the file is
//! absent (a user's machine without it) tests skip with the reason; in CI (`CI=true`) its absence
//! is an error, so the mixed-cluster tests cannot silently stop running there.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::proc::run;

pub const FLANNELD_SHA256: &str =
    "7dc86f1039f96781342d1f20deec7b2ef257f7296efb3d43a903fb887e0bb514";

/// Where `flanneld.xz` lives: `$FLANNEL_GO_DIR`, else `shared/flannel-go` beside the workspace.
pub fn archive() -> PathBuf {
    if let Some(dir) = std::env::var_os("FLANNEL_GO_DIR") {
        return PathBuf::from(dir).join("flanneld.xz");
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/flannel-go/flanneld.xz")
}

/// Why Go Flannel tests cannot run here (its archive absent), or `None`; tests pass it to
/// [`crate::must_skip`].
pub fn missing() -> Option<String> {
    let path = archive();
    (!path.exists()).then(|| {
        format!(
            "Go Flannel not found at {} (set FLANNEL_GO_DIR to the folder holding flanneld.xz)",
            path.display()
        )
    })
}

/// Unpacks and verifies the binary into `dir`; returns its path.
pub fn unpack(dir: &Path) -> Result<PathBuf> {
    let out = dir.join("flanneld-go");
    if !out.exists() {
        let archive = archive();
        let tmp = dir.join("flanneld-go.part");
        // Through a file, not a pipe into a String: the bytes must stay exact.
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "xz -dc '{}' > '{}'",
                archive.display(),
                tmp.display()
            ))
            .status()
            .context("running xz")?;
        if !status.success() {
            bail!("unpacking {} failed", archive.display());
        }
        let sum = run("sha256sum", &[&tmp.to_string_lossy()])?;
        if sum.split_whitespace().next() != Some(FLANNELD_SHA256) {
            bail!(
                "{} has sha256 {sum}, expected {FLANNELD_SHA256}",
                archive.display()
            );
        }
        std::fs::rename(&tmp, &out)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(out)
}

impl crate::cluster::Cluster {
    /// Starts Go Flannel in node `i` with the same flags the harness gives flanneld-rs.
    pub fn start_go_flannel(&mut self, i: usize, extra: &[&str]) -> Result<()> {
        let prog = unpack(self.dir.path())?;
        let node = &self.nodes[i];
        let mut args = vec![
            format!(
                "--etcd-endpoints=http://{}:2379",
                crate::cluster::UNDERLAY_GW
            ),
            format!("--etcd-prefix={}", crate::cluster::ETCD_PREFIX),
            "--iface=eth0".to_string(),
            format!("--subnet-file={}", node.subnet_file().display()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        self.start_program(i, &prog, &args, &[])
    }
}
