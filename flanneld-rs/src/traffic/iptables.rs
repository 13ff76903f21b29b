//! The iptables driver: our rules in chains `FLANNELD-RS-FWD` (filter; where DROP policies
//! live) and, where `nft` is missing, `FLANNELD-RS-POSTRTG` (nat), refilled with
//! `iptables-restore --noflush`, and one jump to each from FORWARD and POSTROUTING.

use std::fmt::Write as _;

use anyhow::{Context, Result};
use async_trait::async_trait;

use super::{output, run, Driver, Family, FullyRandom, Kinds, RuleConfig, KUBE_PROXY_MARK};

pub const IPT_POSTRTG: &str = "FLANNELD-RS-POSTRTG";
pub const IPT_FWD: &str = "FLANNELD-RS-FWD";

pub(super) struct Iptables;

impl RuleConfig {
    /// The `iptables-restore --noflush` input for one family: our chains of `kinds`, refilled.
    pub(super) fn iptables_restore_script(f: &Family, kinds: Kinds) -> String {
        let (n, l) = (&f.network, &f.lease);
        let p = IPT_POSTRTG;
        let mut s = String::new();
        if let Some(FullyRandom(fully_random)) = kinds.masquerade {
            let masquerade = if fully_random {
                "MASQUERADE --random-fully"
            } else {
                "MASQUERADE"
            };
            let _ = writeln!(s, "*nat\n:{p} - [0:0]");
            let _ = writeln!(
                s,
                "-A {p} -m mark --mark {KUBE_PROXY_MARK}/{KUBE_PROXY_MARK} -j RETURN"
            );
            let _ = writeln!(s, "-A {p} -s {l} -d {n} -j RETURN");
            let _ = writeln!(s, "-A {p} -s {n} -d {l} -j RETURN");
            let _ = writeln!(s, "-A {p} ! -s {n} -d {l} -j RETURN");
            let _ = writeln!(s, "-A {p} -s {n} ! -d {} -j {masquerade}", f.multicast);
            let _ = writeln!(s, "-A {p} ! -s {n} -d {n} -j {masquerade}");
            let _ = writeln!(s, "COMMIT");
        }
        if kinds.forward {
            let _ = writeln!(s, "*filter\n:{IPT_FWD} - [0:0]");
            let _ = writeln!(s, "-A {IPT_FWD} -s {n} -j ACCEPT");
            let _ = writeln!(s, "-A {IPT_FWD} -d {n} -j ACCEPT");
            let _ = writeln!(s, "COMMIT");
        }
        s
    }
}

/// Our chains of `kinds`: (table, parent chain, our chain).
fn chains(kinds: Kinds) -> Vec<(&'static str, &'static str, &'static str)> {
    let mut out = Vec::new();
    if kinds.masquerade.is_some() {
        out.push(("nat", "POSTROUTING", IPT_POSTRTG));
    }
    if kinds.forward {
        out.push(("filter", "FORWARD", IPT_FWD));
    }
    out
}

#[async_trait]
impl Driver for Iptables {
    fn describe(&self) -> String {
        format!("iptables: chains {IPT_POSTRTG}, {IPT_FWD}")
    }

    async fn load(&self, config: &RuleConfig) -> Result<()> {
        for f in &config.families {
            let script = RuleConfig::iptables_restore_script(f, config.kinds);
            let restore = format!("{}-restore", f.iptables);
            run(&restore, &["-w", "--noflush"], Some(&script))
                .await
                .with_context(|| format!("loading the traffic rule chains:\n{script}"))?;
            for (table, parent, chain) in chains(config.kinds) {
                ensure_jump(f.iptables, table, parent, chain, parent == "POSTROUTING").await?;
            }
        }
        Ok(())
    }

    async fn listing(&self, config: &RuleConfig) -> String {
        let mut out = String::new();
        for f in &config.families {
            for (table, parent, chain) in chains(config.kinds) {
                for c in [parent, chain] {
                    let text = output(f.iptables, &["-w", "-t", table, "-S", c]).await;
                    // Other programs' rules in the parent chains are not ours to watch.
                    for line in text.lines().filter(|l| l.contains(chain)) {
                        out += line;
                        out.push('\n');
                    }
                }
            }
        }
        out
    }

    async fn remove(&self, config: &RuleConfig) -> Result<()> {
        for f in &config.families {
            for (table, parent, chain) in chains(config.kinds) {
                remove_chain(f.iptables, table, parent, chain).await;
            }
        }
        Ok(())
    }
}

/// Deletes every plain jump from `parent` to `chain` (an older run may have left more than
/// one), then the chain; each step fails harmlessly once there is nothing left.
pub(super) async fn remove_chain(bin: &str, table: &str, parent: &str, chain: &str) {
    for _ in 0..16 {
        let del = ["-w", "-t", table, "-D", parent, "-j", chain];
        if run(bin, &del, None).await.is_err() {
            break;
        }
    }
    let _ = run(bin, &["-w", "-t", table, "-F", chain], None).await;
    let _ = run(bin, &["-w", "-t", table, "-X", chain], None).await;
}

/// Adds `-j chain` to `parent` unless it is already there (so restarts add no duplicates).
async fn ensure_jump(bin: &str, table: &str, parent: &str, chain: &str, first: bool) -> Result<()> {
    let check = ["-w", "-t", table, "-C", parent, "-j", chain];
    if run(bin, &check, None).await.is_ok() {
        return Ok(());
    }
    // POSTROUTING: first, so no other masquerade rule sees pod-to-pod traffic before ours (our
    // choice: Flannel appends); FORWARD: appended, as Flannel does, after the host's own rules.
    let add = if first {
        vec!["-w", "-t", table, "-I", parent, "1", "-j", chain]
    } else {
        vec!["-w", "-t", table, "-A", parent, "-j", chain]
    };
    run(bin, &add, None)
        .await
        .with_context(|| format!("adding the jump from {table} {parent} to {chain}"))
}
