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

mod iptables;
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

/// One way of loading the rules into the kernel (netavark's `firewall/` model): chosen once,
/// then every operation goes through it.
#[async_trait]
trait Driver: Send + Sync {
    /// What the logs call it, and where our rules live.
    fn describe(&self) -> String;
    /// Installs the rules for `config`, atomically replacing ours.
    async fn load(&self, config: &MasqConfig) -> Result<()>;
    /// Our rules as the kernel lists them now (empty where listing fails).
    async fn listing(&self, config: &MasqConfig) -> String;
    /// Removes every rule of ours; done when they are already gone.
    async fn remove(&self, config: &MasqConfig) -> Result<()>;
}

/// `nft` when it exists, else iptables: Flannel's manifests mount the host's xtables lock, and
/// minimal images may ship only iptables-nft.
async fn detect_driver() -> Result<Box<dyn Driver>> {
    match Command::new("nft").arg("--version").output().await {
        Ok(_) => Ok(Box::new(nft::Nft)),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            match Command::new("iptables").arg("--version").output().await {
                Ok(_) => {
                    tracing::info!("nft not found: using iptables for --ip-masq");
                    Ok(Box::new(iptables::Iptables))
                }
                Err(e) => bail!("--ip-masq needs the nft or iptables binary: {e}"),
            }
        }
        Err(e) => Err(e).context("running nft --version"),
    }
}

/// Rules we installed, to replace on a lease change, restore when someone removes them, and
/// remove on a clean exit.
pub struct IpMasq {
    driver: Box<dyn Driver>,
    config: MasqConfig,
    /// How our rules listed right after we loaded them: any other listing means someone
    /// changed or removed them.
    snapshot: String,
}

impl IpMasq {
    /// Installs (or atomically replaces) the rules for `config`.
    pub async fn install(config: MasqConfig) -> Result<Self> {
        let mut masq = IpMasq {
            driver: detect_driver().await?,
            config,
            snapshot: String::new(),
        };
        masq.apply().await?;
        tracing::info!(rules = %masq.driver.describe(), "ip-masq rules installed");
        Ok(masq)
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
        if self.driver.listing(&self.config).await == self.snapshot {
            return Ok(false);
        }
        self.apply().await?;
        Ok(true)
    }

    async fn apply(&mut self) -> Result<()> {
        self.driver.load(&self.config).await?;
        self.snapshot = self.driver.listing(&self.config).await;
        Ok(())
    }

    /// Removes every rule we installed (on a clean exit). Safe to call when they are gone.
    pub async fn remove(&self) -> Result<()> {
        self.driver.remove(&self.config).await
    }
}

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
mod tests;
