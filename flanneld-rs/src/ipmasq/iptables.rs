//! The iptables driver, where `nft` is missing: our rules in chains `FLANNELD-RS-POSTRTG` (nat)
//! and `FLANNELD-RS-FWD` (filter), refilled with `iptables-restore --noflush`, and one jump to
//! each from POSTROUTING and FORWARD.

use std::fmt::Write as _;

use anyhow::{Context, Result};
use async_trait::async_trait;

use super::{output, run, Driver, Family, MasqConfig, KUBE_PROXY_MARK};

pub const IPT_POSTRTG: &str = "FLANNELD-RS-POSTRTG";
pub const IPT_FWD: &str = "FLANNELD-RS-FWD";

pub(super) struct Iptables;

impl MasqConfig {
    /// The `iptables-restore --noflush` input for one family: our two chains, refilled.
    pub(super) fn iptables_restore_script(f: &Family) -> String {
        let (n, l) = (&f.network, &f.lease);
        let p = IPT_POSTRTG;
        let mut s = String::new();
        let _ = writeln!(s, "*nat\n:{p} - [0:0]");
        let _ = writeln!(
            s,
            "-A {p} -m mark --mark {KUBE_PROXY_MARK}/{KUBE_PROXY_MARK} -j RETURN"
        );
        let _ = writeln!(s, "-A {p} -s {l} -d {n} -j RETURN");
        let _ = writeln!(s, "-A {p} -s {n} -d {l} -j RETURN");
        let _ = writeln!(s, "-A {p} ! -s {n} -d {l} -j RETURN");
        let _ = writeln!(
            s,
            "-A {p} -s {n} ! -d {} -j MASQUERADE --random-fully",
            f.multicast
        );
        let _ = writeln!(s, "-A {p} ! -s {n} -d {n} -j MASQUERADE --random-fully");
        let _ = writeln!(s, "COMMIT\n*filter\n:{IPT_FWD} - [0:0]");
        let _ = writeln!(s, "-A {IPT_FWD} -s {n} -j ACCEPT");
        let _ = writeln!(s, "-A {IPT_FWD} -d {n} -j ACCEPT");
        let _ = writeln!(s, "COMMIT");
        s
    }
}

#[async_trait]
impl Driver for Iptables {
    fn describe(&self) -> String {
        format!("iptables: chains {IPT_POSTRTG}, {IPT_FWD}")
    }

    async fn load(&self, config: &MasqConfig) -> Result<()> {
        for f in &config.families {
            let script = MasqConfig::iptables_restore_script(f);
            let restore = format!("{}-restore", f.iptables);
            run(&restore, &["-w", "--noflush"], Some(&script))
                .await
                .with_context(|| format!("loading the ip-masq chains:\n{script}"))?;
            ensure_jump(f.iptables, "nat", "POSTROUTING", IPT_POSTRTG, true).await?;
            ensure_jump(f.iptables, "filter", "FORWARD", IPT_FWD, false).await?;
        }
        Ok(())
    }

    async fn listing(&self, config: &MasqConfig) -> String {
        let mut out = String::new();
        for f in &config.families {
            for (table, chains) in [
                ("nat", ["POSTROUTING", IPT_POSTRTG]),
                ("filter", ["FORWARD", IPT_FWD]),
            ] {
                for chain in chains {
                    let text = output(f.iptables, &["-w", "-t", table, "-S", chain]).await;
                    // Other programs' rules in the parent chains are not ours to watch.
                    for line in text.lines().filter(|l| l.contains("FLANNELD-RS")) {
                        out += line;
                        out.push('\n');
                    }
                }
            }
        }
        out
    }

    async fn remove(&self, config: &MasqConfig) -> Result<()> {
        for f in &config.families {
            for (table, parent, chain) in [
                ("nat", "POSTROUTING", IPT_POSTRTG),
                ("filter", "FORWARD", IPT_FWD),
            ] {
                // Delete every jump (an older run may have left more than one), then the
                // chain; each step fails harmlessly once there is nothing left.
                for _ in 0..16 {
                    let del = ["-w", "-t", table, "-D", parent, "-j", chain];
                    if run(f.iptables, &del, None).await.is_err() {
                        break;
                    }
                }
                let _ = run(f.iptables, &["-w", "-t", table, "-F", chain], None).await;
                let _ = run(f.iptables, &["-w", "-t", table, "-X", chain], None).await;
            }
        }
        Ok(())
    }
}

/// Adds `-j chain` to `parent` unless it is already there (so restarts add no duplicates).
async fn ensure_jump(bin: &str, table: &str, parent: &str, chain: &str, first: bool) -> Result<()> {
    let check = ["-w", "-t", table, "-C", parent, "-j", chain];
    if run(bin, &check, None).await.is_ok() {
        return Ok(());
    }
    // POSTROUTING: first, so no other masquerade rule sees pod-to-pod traffic before ours
    // (Flannel inserts too); FORWARD: appended, as Flannel does, after the host's own policy.
    let add = if first {
        vec!["-w", "-t", table, "-I", parent, "1", "-j", chain]
    } else {
        vec!["-w", "-t", table, "-A", parent, "-j", chain]
    };
    run(bin, &add, None)
        .await
        .with_context(|| format!("adding the jump from {table} {parent} to {chain}"))
}
