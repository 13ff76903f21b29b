//! The nftables driver: our rules in `table ip flanneld-rs` (and `ip6`), replaced in one
//! `nft -f -` transaction.

use std::fmt::Write as _;

use anyhow::{Context, Result};
use async_trait::async_trait;

use super::{output, run, Driver, FullyRandom, RuleConfig, KUBE_PROXY_MARK};

/// The nftables table (in families `ip` and `ip6`) holding our rules.
pub const TABLE: &str = "flanneld-rs";

pub(super) struct Nft;

impl RuleConfig {
    /// The `nft -f -` script that replaces our tables with the current rules.
    pub fn nft_script(&self) -> String {
        let mut s = String::new();
        for f in &self.families {
            let (ip, n, l) = (f.nft, &f.network, &f.lease);
            // `add` first so `delete` cannot fail on a first start: one transaction either way.
            let _ = writeln!(s, "add table {ip} {TABLE}\ndelete table {ip} {TABLE}");
            let _ = writeln!(s, "table {ip} {TABLE} {{");
            if let Some(FullyRandom(fully_random)) = self.kinds.masquerade {
                let masquerade = if fully_random {
                    "masquerade fully-random"
                } else {
                    "masquerade"
                };
                let _ = writeln!(s, "  chain postrtg {{");
                let _ = writeln!(
                    s,
                    "    type nat hook postrouting priority srcnat; policy accept;"
                );
                let _ = writeln!(
                    s,
                    "    meta mark & {KUBE_PROXY_MARK} == {KUBE_PROXY_MARK} return"
                );
                let _ = writeln!(s, "    {ip} saddr {l} {ip} daddr {n} return");
                let _ = writeln!(s, "    {ip} saddr {n} {ip} daddr {l} return");
                let _ = writeln!(s, "    {ip} saddr != {n} {ip} daddr {l} return");
                let _ = writeln!(
                    s,
                    "    {ip} saddr {n} {ip} daddr != {} {masquerade}",
                    f.multicast
                );
                let _ = writeln!(s, "    {ip} saddr != {n} {ip} daddr {n} {masquerade}");
                let _ = writeln!(s, "  }}");
            }
            if self.kinds.forward {
                let _ = writeln!(s, "  chain forward {{");
                let _ = writeln!(
                    s,
                    "    type filter hook forward priority filter; policy accept;"
                );
                let _ = writeln!(s, "    {ip} saddr {n} accept");
                let _ = writeln!(s, "    {ip} daddr {n} accept");
                let _ = writeln!(s, "  }}");
            }
            let _ = writeln!(s, "}}");
        }
        s
    }

    /// The `nft -f -` script that removes our tables (and succeeds if they are already gone).
    pub(super) fn nft_remove_script(&self) -> String {
        self.families
            .iter()
            .map(|f| format!("add table {0} {TABLE}\ndelete table {0} {TABLE}\n", f.nft))
            .collect()
    }
}

#[async_trait]
impl Driver for Nft {
    fn describe(&self) -> String {
        format!("nftables: table ip/ip6 {TABLE}")
    }

    async fn load(&self, config: &RuleConfig) -> Result<()> {
        let script = config.nft_script();
        run("nft", &["-f", "-"], Some(&script))
            .await
            .with_context(|| format!("loading the traffic rules:\n{script}"))
    }

    async fn listing(&self, config: &RuleConfig) -> String {
        let mut out = String::new();
        for f in &config.families {
            out += &output("nft", &["list", "table", f.nft, TABLE]).await;
        }
        out
    }

    async fn remove(&self, config: &RuleConfig) -> Result<()> {
        run("nft", &["-f", "-"], Some(&config.nft_remove_script()))
            .await
            .context("removing our nftables table")
    }
}
