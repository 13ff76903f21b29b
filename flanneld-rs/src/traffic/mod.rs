//! Flannel's traffic rules (its `pkg/trafficmngr`), in tables and chains of our own:
//! - `--ip-masq`: NAT POSTROUTING rules, in Flannel's order:
//!   - packets kube-proxy marked `0x4000/0x4000` are left alone (it masquerades them itself,
//!     and doing it twice hits a kernel double-NAT bug);
//!   - traffic between our pods and the rest of Network, either way, keeps pod addresses;
//!   - traffic from outside Network to *our* pods keeps its source (the pod sees the client);
//!   - pod traffic leaving Network is masqueraded, multicast excepted, with fully random
//!     ports unless `--ip-masq-fully-random-disable`;
//!   - traffic from outside Network to pods on *other* nodes is masqueraded (it enters the
//!     overlay from off-network, and the remote node could not answer the original source).
//! - `--iptables-forward-rules` (default on, with or without `--ip-masq`): a forward filter
//!   accepting everything from and to Network, for hosts whose FORWARD policy is DROP.
//!
//! Each kind goes through the tool where it works (`plan`): masquerading through nftables in
//! `table ip flanneld-rs` (`ip6` too), replaced in one `nft -f -` transaction, so packets never
//! meet a half-installed rule set and a restart never leaves duplicates; forward accepts
//! through iptables in chain `FLANNELD-RS-FWD` jumped to from FORWARD, because a DROP policy
//! lives in that chain (Docker sets it there) and an accept in another nftables table cannot
//! override it. Where only one tool exists, it carries both. Go Flannel's own tables and chains
//! (`flannel-ipv4`, `FLANNEL-POSTRTG`, ...) are other names, so both can sit side by side
//! during a migration; what Go Flannel v0.27+ left behind is removed at start (`legacy`).

mod iptables;
mod legacy;
mod nft;

use std::io::ErrorKind;
use std::process::Stdio;

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use ipnet::{Ipv4Net, Ipv6Net};
use subnet_manager::config::NetworkConfig;
use subnet_manager::lease::SubnetKey;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

pub use iptables::{IPT_FWD, IPT_POSTRTG};
pub use legacy::remove_go_flannel_leftovers;
pub use nft::TABLE;

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

/// Which rules the flags ask for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Kinds {
    /// `--ip-masq`, with fully random ports unless `--ip-masq-fully-random-disable`.
    pub masquerade: Option<FullyRandom>,
    /// `--iptables-forward-rules`.
    pub forward: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FullyRandom(pub bool);

impl Kinds {
    pub fn is_empty(&self) -> bool {
        self.masquerade.is_none() && !self.forward
    }

    fn only_masquerade(self) -> Kinds {
        Kinds {
            forward: false,
            ..self
        }
    }

    fn only_forward(self) -> Kinds {
        Kinds {
            masquerade: None,
            ..self
        }
    }
}

/// What the rules are made from: the network config, our lease, and the kinds asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleConfig {
    families: Vec<Family>,
    kinds: Kinds,
}

impl RuleConfig {
    pub fn new(config: &NetworkConfig, lease: &SubnetKey, kinds: Kinds) -> Self {
        let mut families = Vec::new();
        if let (Some(network), Some(lease)) = (config.network, lease.ipv4) {
            families.push(v4(network, lease));
        }
        if let (Some(network), Some(lease)) = (config.ipv6_network, lease.ipv6) {
            families.push(v6(network, lease));
        }
        RuleConfig { families, kinds }
    }

    fn with_kinds(&self, kinds: Kinds) -> RuleConfig {
        RuleConfig {
            families: self.families.clone(),
            kinds,
        }
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

/// The tools that load rules into the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    Nft,
    Iptables,
}

/// Which tool carries which kinds, given the tools this host has: masquerading prefers nft
/// (one atomic table of ours), forward accepts prefer iptables (where DROP policies live).
/// A tool appears once, with every kind it carries.
pub fn plan(kinds: Kinds, has_nft: bool, has_iptables: bool) -> Result<Vec<(Tool, Kinds)>> {
    let pick = |prefer: Tool| match (prefer, has_nft, has_iptables) {
        (Tool::Nft, true, _) | (Tool::Iptables, true, false) => Some(Tool::Nft),
        (Tool::Iptables, _, true) | (Tool::Nft, false, true) => Some(Tool::Iptables),
        _ => None,
    };
    let mut out: Vec<(Tool, Kinds)> = Vec::new();
    for (part, prefer) in [
        (kinds.only_masquerade(), Tool::Nft),
        (kinds.only_forward(), Tool::Iptables),
    ] {
        if part.is_empty() {
            continue;
        }
        let Some(tool) = pick(prefer) else {
            if part.masquerade.is_some() {
                bail!("--ip-masq needs the nft or iptables binary");
            }
            // Forward accepts are on by default: a host with neither tool has no FORWARD
            // policy to open (the daemon warns).
            continue;
        };
        match out.iter_mut().find(|(t, _)| *t == tool) {
            Some((_, k)) => {
                k.masquerade = k.masquerade.or(part.masquerade);
                k.forward |= part.forward;
            }
            None => out.push((tool, part)),
        }
    }
    Ok(out)
}

/// One way of loading rules into the kernel (netavark's `firewall/` model): chosen once, then
/// every operation goes through it. Each is given a config with the kinds it carries.
#[async_trait]
trait Driver: Send + Sync {
    /// What the logs call it, and where our rules live.
    fn describe(&self) -> String;
    /// Installs the rules of `config`, atomically replacing ours of the same kinds.
    async fn load(&self, config: &RuleConfig) -> Result<()>;
    /// Our rules of `config`'s kinds as the kernel lists them now (empty where listing fails).
    async fn listing(&self, config: &RuleConfig) -> String;
    /// Removes our rules of `config`'s kinds; done when they are already gone.
    async fn remove(&self, config: &RuleConfig) -> Result<()>;
}

fn driver(tool: Tool) -> Box<dyn Driver> {
    match tool {
        Tool::Nft => Box::new(nft::Nft),
        Tool::Iptables => Box::new(iptables::Iptables),
    }
}

/// Whether `prog --version` runs (the binary exists).
async fn has(prog: &str) -> Result<bool> {
    match Command::new(prog)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("running {prog} --version")),
    }
}

/// One tool's share of the rules, and how they listed right after we loaded them: any other
/// listing means someone changed or removed them.
struct Part {
    tool: Tool,
    driver: Box<dyn Driver>,
    kinds: Kinds,
    /// `None` until a load succeeds: the upkeep retries it.
    snapshot: Option<String>,
}

/// Rules we installed, to replace on a lease change, restore when someone removes them, and
/// remove on a clean exit.
pub struct TrafficRules {
    parts: Vec<Part>,
    config: RuleConfig,
}

impl TrafficRules {
    /// Installs (or atomically replaces) the rules of `config`, and removes rules of ours of
    /// kinds no longer asked for (a restart with a flag turned off, after a crash that left
    /// them). With no kinds asked for, it only does the latter.
    pub async fn install(config: RuleConfig) -> Result<Self> {
        let (has_nft, has_iptables) = (has("nft").await?, has("iptables").await?);
        if !has_nft && has_iptables && !config.kinds.is_empty() {
            tracing::info!("nft not found: using iptables for every rule");
        }
        if !has_nft && !has_iptables && config.kinds.forward {
            tracing::warn!("neither nft nor iptables found: no forward rules (nothing can have set a FORWARD DROP policy either)");
        }
        let plan = plan(config.kinds, has_nft, has_iptables)?;
        let mut rules = TrafficRules {
            parts: plan
                .into_iter()
                .map(|(tool, kinds)| Part {
                    tool,
                    driver: driver(tool),
                    kinds,
                    snapshot: None,
                })
                .collect(),
            config,
        };
        for (tool, present) in [(Tool::Nft, has_nft), (Tool::Iptables, has_iptables)] {
            if !present {
                continue;
            }
            let carried = rules
                .parts
                .iter()
                .find(|p| p.tool == tool)
                .map_or(Kinds::default(), |p| p.kinds);
            let stale = Kinds {
                masquerade: carried.masquerade.xor(Some(FullyRandom(true))),
                forward: !carried.forward,
            };
            // nft's load replaces our whole table, so only a tool carrying nothing now needs
            // its leftovers removed; iptables refills just the chains it loads.
            let needed = match tool {
                Tool::Nft => carried.is_empty(),
                Tool::Iptables => !stale.is_empty(),
            };
            if needed {
                if let Err(e) = driver(tool).remove(&rules.config.with_kinds(stale)).await {
                    tracing::debug!("removing rules of ours no longer asked for: {e:#}");
                }
            }
        }
        rules.apply().await?;
        for p in &rules.parts {
            tracing::info!(rules = %p.driver.describe(), masquerade = ?p.kinds.masquerade, forward = p.kinds.forward, "traffic rules installed");
        }
        Ok(rules)
    }

    /// Replaces the rules for a new lease (a lease lost and re-acquired with another subnet).
    pub async fn update(&mut self, config: RuleConfig) -> Result<()> {
        if config != self.config {
            self.config = config;
            self.apply().await?;
            tracing::info!("traffic rules updated for the new lease");
        }
        Ok(())
    }

    /// Loads the rules again where they no longer list as we left them (deleted or edited by
    /// someone else) or never loaded. Returns how many parts had to be restored.
    pub async fn repair(&mut self) -> Result<usize> {
        let mut restored = 0;
        for p in &mut self.parts {
            let config = self.config.with_kinds(p.kinds);
            if let Some(snapshot) = &p.snapshot {
                if p.driver.listing(&config).await == *snapshot {
                    continue;
                }
            }
            p.driver.load(&config).await?;
            p.snapshot = Some(p.driver.listing(&config).await);
            restored += 1;
        }
        Ok(restored)
    }

    /// Loads every part. A part that carries the masquerade must load (without it pods' traffic
    /// leaves with addresses nobody routes back); forward accepts that fail are logged and
    /// retried by `repair`, since most hosts forward without them.
    async fn apply(&mut self) -> Result<()> {
        for p in &mut self.parts {
            let config = self.config.with_kinds(p.kinds);
            match p.driver.load(&config).await {
                Ok(()) => p.snapshot = Some(p.driver.listing(&config).await),
                Err(e) if p.kinds.masquerade.is_none() => {
                    p.snapshot = None;
                    tracing::warn!(
                        "installing the forward rules failed (retried every --iptables-resync period): {e:#}"
                    );
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Removes our masquerade rules (on a clean exit); safe to call when they are gone. The
    /// forward accepts stay, as Go Flannel v0.27+ leaves its own: on a host whose FORWARD
    /// policy is DROP, pods would lose their cross-node traffic while the daemon restarts.
    /// The next start removes them if the flag was turned off meanwhile.
    pub async fn remove_masquerade(&self) -> Result<()> {
        for p in self.parts.iter().filter(|p| p.kinds.masquerade.is_some()) {
            let kinds = p.kinds.only_masquerade();
            p.driver.remove(&self.config.with_kinds(kinds)).await?;
        }
        Ok(())
    }

    /// Whether masquerade rules were asked for.
    pub fn masquerades(&self) -> bool {
        self.config.kinds.masquerade.is_some()
    }
}

/// A listing tool's standard output, or nothing if it fails (or hangs on a lock past
/// `LISTING_TIMEOUT`: the upkeep must go on).
async fn output(prog: &str, args: &[&str]) -> String {
    crate::tool::stdout(prog, args, LISTING_TIMEOUT)
        .await
        .unwrap_or_default()
}

const LISTING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long one rule-changing run of a tool may take.
const RUN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs `prog args`, feeding `stdin` if given; an error carries the program's stderr.
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
    // Bounded: a held xtables lock (`-w` waits for it) or a hung tool must not stall the
    // daemon's event loop; the child is killed when the wait is abandoned.
    let out = tokio::time::timeout(RUN_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "{prog} did not finish within {} s (an xtables lock held elsewhere?)",
                RUN_TIMEOUT.as_secs()
            )
        })?
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
mod tests;
