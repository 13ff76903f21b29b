//! `--ip-masq`: Flannel's NAT POSTROUTING and FORWARD rules, in a table of our own.
//!
//! The rules are Flannel's (`pkg/trafficmngr`), in its order:
//! - packets kube-proxy marked `0x4000/0x4000` are left alone (it masquerades them itself, and
//!   doing it twice hits a kernel double-NAT bug);
//! - traffic between our pods and the rest of Network, either way, keeps pod addresses;
//! - traffic from outside Network to *our* pods keeps its source (the pod sees the client);
//! - pod traffic leaving Network is masqueraded with fully random ports, multicast excepted;
//! - traffic from outside Network to pods on *other* nodes is masqueraded (it enters the
//!   overlay from off-network, and the remote node could not answer the original source);
//! - a forward filter accepts everything from and to Network.
//!
//! With the `nft` binary the rules live in `table ip flanneld-rs` (and `table ip6 flanneld-rs`
//! for IPv6): Go Flannel uses `flannel-ipv4`, so both can sit side by side during a migration
//! and an operator sees at once whose rules they are. The table is replaced in one `nft -f -`
//! transaction (add, delete, create), so a restart after a clean exit or a crash never leaves
//! duplicates and packets never meet a half-installed rule set. Where `nft` is missing, the
//! same rules go through iptables (iptables-nft on current distributions) in chains
//! `FLANNELD-RS-POSTRTG` and `FLANNELD-RS-FWD`, loaded with `iptables-restore --noflush`, which
//! flushes and refills just those chains, also atomically.

use std::fmt::Write as _;
use std::io::ErrorKind;
use std::process::Stdio;

use anyhow::{bail, Context, Result};
use ipnet::{Ipv4Net, Ipv6Net};
use subnet_manager::config::NetworkConfig;
use subnet_manager::lease::SubnetKey;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// The nftables table (in families `ip` and `ip6`) holding our rules.
pub const TABLE: &str = "flanneld-rs";
/// The iptables chains used where `nft` is missing.
pub const IPT_POSTRTG: &str = "FLANNELD-RS-POSTRTG";
pub const IPT_FWD: &str = "FLANNELD-RS-FWD";
/// kube-proxy's masquerade mark (`--iptables-masquerade-bit` 14).
const KUBE_PROXY_MARK: &str = "0x4000";

/// One address family's inputs: the whole Network and the subnet leased by this node.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Family {
    /// nft family and address keyword: `ip` or `ip6`.
    nft: &'static str,
    iptables: &'static str,
    network: String,
    lease: String,
    multicast: &'static str,
}

/// What the rules are made from: the network config and our lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MasqConfig {
    families: Vec<Family>,
}

impl MasqConfig {
    pub fn new(config: &NetworkConfig, lease: &SubnetKey) -> Self {
        let mut families = Vec::new();
        if let (Some(network), Some(lease)) = (config.network, lease.ipv4) {
            families.push(v4(network, lease));
        }
        if let (Some(network), Some(lease)) = (config.ipv6_network, lease.ipv6) {
            families.push(v6(network, lease));
        }
        MasqConfig { families }
    }

    /// The `nft -f -` script that replaces our tables with the current rules.
    pub fn nft_script(&self) -> String {
        let mut s = String::new();
        for f in &self.families {
            let (ip, n, l) = (f.nft, &f.network, &f.lease);
            // `add` first so `delete` cannot fail on a first start: one transaction either way.
            let _ = writeln!(s, "add table {ip} {TABLE}\ndelete table {ip} {TABLE}");
            let _ = writeln!(s, "table {ip} {TABLE} {{");
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
                "    {ip} saddr {n} {ip} daddr != {} masquerade fully-random",
                f.multicast
            );
            let _ = writeln!(
                s,
                "    {ip} saddr != {n} {ip} daddr {n} masquerade fully-random"
            );
            let _ = writeln!(s, "  }}");
            let _ = writeln!(s, "  chain forward {{");
            let _ = writeln!(
                s,
                "    type filter hook forward priority filter; policy accept;"
            );
            let _ = writeln!(s, "    {ip} saddr {n} accept");
            let _ = writeln!(s, "    {ip} daddr {n} accept");
            let _ = writeln!(s, "  }}");
            let _ = writeln!(s, "}}");
        }
        s
    }

    /// The `nft -f -` script that removes our tables (and succeeds if they are already gone).
    fn nft_remove_script(&self) -> String {
        self.families
            .iter()
            .map(|f| format!("add table {0} {TABLE}\ndelete table {0} {TABLE}\n", f.nft))
            .collect()
    }

    /// The `iptables-restore --noflush` input for one family: our two chains, refilled.
    fn iptables_restore_script(f: &Family) -> String {
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

fn v4(network: Ipv4Net, lease: Ipv4Net) -> Family {
    Family {
        nft: "ip",
        iptables: "iptables",
        network: network.trunc().to_string(),
        lease: lease.trunc().to_string(),
        multicast: "224.0.0.0/4",
    }
}

fn v6(network: Ipv6Net, lease: Ipv6Net) -> Family {
    Family {
        nft: "ip6",
        iptables: "ip6tables",
        network: network.trunc().to_string(),
        lease: lease.trunc().to_string(),
        multicast: "ff00::/8",
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    Nft,
    Iptables,
}

/// Rules we installed, to replace on a lease change and to remove on a clean exit.
pub struct IpMasq {
    tool: Tool,
    config: MasqConfig,
    /// How our rules listed right after we loaded them: any other listing means someone
    /// changed or removed them.
    snapshot: String,
}

impl IpMasq {
    /// Installs (or atomically replaces) the rules for `config`.
    pub async fn install(config: MasqConfig) -> Result<Self> {
        let tool = detect_tool().await?;
        let mut masq = IpMasq {
            tool,
            config,
            snapshot: String::new(),
        };
        masq.apply().await?;
        tracing::info!(
            tool = ?masq.tool,
            rules = if tool == Tool::Nft { format!("table ip/ip6 {TABLE}") } else { format!("chains {IPT_POSTRTG}, {IPT_FWD}") },
            "ip-masq rules installed"
        );
        Ok(masq)
    }

    pub fn tool(&self) -> Tool {
        self.tool
    }

    /// Replaces the rules for a new lease (a lease lost and re-acquired with another subnet).
    pub async fn update(&mut self, config: MasqConfig) -> Result<()> {
        if config != self.config {
            self.config = config;
            self.apply().await?;
            tracing::info!("ip-masq rules updated for the new lease");
        }
        Ok(())
    }

    /// Loads the rules again if they no longer list as we left them (deleted or edited by
    /// someone else). Returns whether they had to be restored.
    pub async fn repair(&mut self) -> Result<bool> {
        if self.listing().await == self.snapshot {
            return Ok(false);
        }
        self.apply().await?;
        Ok(true)
    }

    /// Our tables (nftables) or our chains and the jumps to them (iptables), as listed now; a
    /// listing that fails reads as empty.
    async fn listing(&self) -> String {
        let mut out = String::new();
        for f in &self.config.families {
            match self.tool {
                Tool::Nft => {
                    out += &output("nft", &["list", "table", f.nft, TABLE]).await;
                }
                Tool::Iptables => {
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
            }
        }
        out
    }

    async fn apply(&mut self) -> Result<()> {
        self.load().await?;
        self.snapshot = self.listing().await;
        Ok(())
    }

    async fn load(&self) -> Result<()> {
        match self.tool {
            Tool::Nft => {
                let script = self.config.nft_script();
                run("nft", &["-f", "-"], Some(&script))
                    .await
                    .with_context(|| format!("loading the ip-masq ruleset:\n{script}"))
            }
            Tool::Iptables => {
                for f in &self.config.families {
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
        }
    }

    /// Removes every rule we installed (on a clean exit). Safe to call when they are gone.
    pub async fn remove(&self) -> Result<()> {
        match self.tool {
            Tool::Nft => run("nft", &["-f", "-"], Some(&self.config.nft_remove_script()))
                .await
                .context("removing the ip-masq table"),
            Tool::Iptables => {
                for f in &self.config.families {
                    for (table, parent, chain) in [
                        ("nat", "POSTROUTING", IPT_POSTRTG),
                        ("filter", "FORWARD", IPT_FWD),
                    ] {
                        // Delete every jump (an older run may have left more than one), then
                        // the chain; each step fails harmlessly once there is nothing left.
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
    }
}

/// `nft` when it exists, else iptables: Flannel's manifests mount the host's xtables lock, and
/// minimal images may ship only iptables-nft.
async fn detect_tool() -> Result<Tool> {
    match Command::new("nft").arg("--version").output().await {
        Ok(_) => Ok(Tool::Nft),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            match Command::new("iptables").arg("--version").output().await {
                Ok(_) => {
                    tracing::info!("nft not found: using iptables for --ip-masq");
                    Ok(Tool::Iptables)
                }
                Err(e) => bail!("--ip-masq needs the nft or iptables binary: {e}"),
            }
        }
        Err(e) => Err(e).context("running nft --version"),
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

/// Runs `prog args`, feeding `stdin` if given; an error carries the program's stderr.
/// A command's standard output, or nothing if it fails.
async fn output(prog: &str, args: &[&str]) -> String {
    match Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
    {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        _ => String::new(),
    }
}

async fn run(prog: &str, args: &[&str], stdin: Option<&str>) -> Result<()> {
    let mut child = Command::new(prog)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("running {prog}"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .await
            .with_context(|| format!("writing to {prog}"))?;
        // Dropping the pipe closes it: the program sees the end of its input.
    }
    let out = child
        .wait_with_output()
        .await
        .with_context(|| format!("waiting for {prog}"))?;
    if !out.status.success() {
        bail!(
            "{prog} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str, key: &str) -> MasqConfig {
        let c = NetworkConfig::parse(json.as_bytes()).expect("config");
        MasqConfig::new(&c, &SubnetKey::parse(key).expect("key"))
    }

    #[test]
    fn nft_script_has_flannels_rules_in_order() {
        let c = config(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#,
            "10.244.3.0-24",
        );
        let s = c.nft_script();
        let want = [
            "add table ip flanneld-rs",
            "delete table ip flanneld-rs",
            "table ip flanneld-rs {",
            "type nat hook postrouting priority srcnat; policy accept;",
            "meta mark & 0x4000 == 0x4000 return",
            "ip saddr 10.244.3.0/24 ip daddr 10.244.0.0/16 return",
            "ip saddr 10.244.0.0/16 ip daddr 10.244.3.0/24 return",
            "ip saddr != 10.244.0.0/16 ip daddr 10.244.3.0/24 return",
            "ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random",
            "ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random",
            "type filter hook forward priority filter; policy accept;",
            "ip saddr 10.244.0.0/16 accept",
            "ip daddr 10.244.0.0/16 accept",
        ];
        let mut at = 0;
        for w in want {
            let found = s[at..]
                .find(w)
                .unwrap_or_else(|| panic!("{w:?} after {at}:\n{s}"));
            at += found + w.len();
        }
        assert!(!s.contains("ip6"), "{s}");
        assert_eq!(
            c.nft_remove_script(),
            "add table ip flanneld-rs\ndelete table ip flanneld-rs\n"
        );
    }

    #[test]
    fn dual_stack_gets_an_ip6_table() {
        let c = config(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","Backend":{"Type":"host-gw"}}"#,
            "10.244.3.0-24&fc00:0:0:3::-64",
        );
        let s = c.nft_script();
        assert!(s.contains("table ip6 flanneld-rs {"), "{s}");
        assert!(
            s.contains("ip6 saddr fc00::/48 ip6 daddr != ff00::/8 masquerade fully-random"),
            "{s}"
        );
        assert!(
            s.contains("ip6 saddr fc00:0:0:3::/64 ip6 daddr fc00::/48 return"),
            "{s}"
        );
    }

    #[test]
    fn iptables_script_refills_only_our_chains() {
        let c = config(r#"{"Network":"10.244.0.0/16"}"#, "10.244.3.0-24");
        let s = MasqConfig::iptables_restore_script(&c.families[0]);
        assert!(s.starts_with("*nat\n:FLANNELD-RS-POSTRTG - [0:0]\n"), "{s}");
        assert!(
            s.contains("-A FLANNELD-RS-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE --random-fully"),
            "{s}"
        );
        assert!(s.contains("*filter\n:FLANNELD-RS-FWD - [0:0]\n"), "{s}");
        assert_eq!(s.matches("COMMIT").count(), 2);
        // Nothing that touches a chain of someone else's.
        assert!(!s.contains("POSTROUTING") && !s.contains("FORWARD "), "{s}");
    }
}
