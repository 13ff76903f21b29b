//! The policy table's I/O: `nft -f -` with a script, the drop counters, and the bridge
//! sysctls without which same-node pod traffic never meets the forward hook.

use std::process::Stdio;

use anyhow::{bail, Context, Result};
use netpol::nft::TABLE;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// Applies one script as one transaction.
pub async fn apply(script: &str) -> Result<()> {
    if script.is_empty() {
        return Ok(());
    }
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .context("writing to nft")?;
    }
    let out = child.wait_with_output().await.context("waiting for nft")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        // nft quotes the failing line; a few lines say enough.
        let short: Vec<&str> = err.lines().take(6).collect();
        bail!("nft failed: {}", short.join(" | "));
    }
    Ok(())
}

/// Whether `apply` failed because there is no `nft` to run (nothing else: a table `nft`
/// could not write or remove is a failure to retry).
pub fn nft_missing(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
    })
}

/// Bridged IPv4/IPv6 traffic passes the inet forward hook only with these set (per network
/// namespace since Linux 5.3). Kubernetes nodes set them already; we make sure, on every
/// programming while a pod is isolated (two reads): br_netfilter may be loaded after we
/// start, and anyone may set them back to 0. `warned` keeps a failure from being logged
/// again until it has been mended.
pub fn ensure_bridge_hooks(warned: &mut bool) {
    let mut all = true;
    for f in ["bridge-nf-call-iptables", "bridge-nf-call-ip6tables"] {
        let path = format!("/proc/sys/net/bridge/{f}");
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1") {
            continue;
        }
        if let Err(e) = std::fs::write(&path, "1") {
            all = false;
            if !*warned {
                tracing::warn!(
                    "cannot set {path} ({e}): policies will not apply between pods on this \
                     node (load br_netfilter); trying again at each policy update"
                );
            }
        }
    }
    *warned = !all;
}

/// Packets dropped (ingress, egress) by the table's counters; None when there is no table.
pub async fn denied_counters() -> Option<(u64, u64)> {
    // A scrape waits for this.
    let args = ["-j", "list", "counters", "table", "inet", TABLE];
    let out = crate::tool::stdout("nft", &args, std::time::Duration::from_secs(2)).await?;
    let json: serde_json::Value = serde_json::from_str(&out).ok()?;
    let mut counts = (0, 0);
    for item in json.get("nftables")?.as_array()? {
        let Some(c) = item.get("counter") else {
            continue;
        };
        let packets = c.get("packets").and_then(|p| p.as_u64()).unwrap_or(0);
        match c.get("name").and_then(|n| n.as_str()) {
            Some("denied_in") => counts.0 = packets,
            Some("denied_out") => counts.1 = packets,
            _ => {}
        }
    }
    Some(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_missing_nft_is_nothing_to_retry() {
        let missing = Err::<(), _>(std::io::Error::from(std::io::ErrorKind::NotFound))
            .context("running nft")
            .unwrap_err();
        assert!(nft_missing(&missing));
        let failed = anyhow::anyhow!("nft failed: Error: Could not process rule");
        assert!(!nft_missing(&failed));
        let denied = Err::<(), _>(std::io::Error::from(std::io::ErrorKind::PermissionDenied))
            .context("running nft")
            .unwrap_err();
        assert!(!nft_missing(&denied));
    }
}
