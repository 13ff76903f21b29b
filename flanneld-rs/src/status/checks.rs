//! The environment checks `flanneld-rs status` reports: the node settings outside the daemon
//! that silently drop pod traffic (a FORWARD policy of DROP, bridged traffic bypassing
//! iptables, strict reverse-path filtering, checksum offload on VXLAN). Each parser is pure;
//! `gather` does the reading, in the daemon's network namespace.

use super::report::Check;
use crate::tool;

/// What the checks need to know of the daemon.
pub struct Context<'a> {
    pub devices: &'a [String],
    pub masquerade: bool,
    pub forward_rules: bool,
    pub backend: &'a str,
}

pub async fn gather(ctx: &Context<'_>) -> Vec<Check> {
    let forward = command("iptables", &["-w", "-S", "FORWARD"]).await;
    let bridge = read("/proc/sys/net/bridge/bridge-nf-call-iptables");
    let mut rp = Vec::new();
    let all = read("/proc/sys/net/ipv4/conf/all/rp_filter");
    for dev in ctx.devices {
        rp.push((
            dev.clone(),
            read(&format!("/proc/sys/net/ipv4/conf/{dev}/rp_filter")),
        ));
    }
    let mut checks = vec![
        forward_check(forward.as_deref(), ctx.forward_rules),
        bridge_check(bridge.as_deref()),
        rp_filter_check(all.as_deref(), &rp),
        masquerade_check(ctx.masquerade),
    ];
    if ctx.backend == "vxlan" {
        for dev in ctx.devices {
            let features = command("ethtool", &["-k", dev]).await;
            checks.push(vxlan_offload_check(dev, features.as_deref()));
        }
    }
    checks
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// How long one check's command may take. `iptables -w` waits for the xtables lock as long
/// as another holds it (kube-proxy on a large cluster): the check then reads as unknown, and
/// the report still comes.
const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

async fn command(prog: &str, args: &[&str]) -> Option<String> {
    tool::stdout(prog, args, COMMAND_TIMEOUT).await
}

fn check(name: &str, ok: bool, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        ok,
        detail: detail.into(),
    }
}

/// The FORWARD chain's policy and our jump to `FLANNELD-RS-FWD`, from `iptables -S FORWARD`.
pub fn forward_check(listing: Option<&str>, forward_rules: bool) -> Check {
    let Some(listing) = listing else {
        return check(
            "forward",
            true,
            "iptables not found or not answering: no FORWARD policy of its to open",
        );
    };
    let policy = listing
        .lines()
        .find_map(|l| l.strip_prefix("-P FORWARD "))
        .map_or("ACCEPT", str::trim);
    let ours = listing
        .lines()
        .any(|l| l.starts_with("-A FORWARD") && l.ends_with("-j FLANNELD-RS-FWD"));
    let flag = if forward_rules {
        "on"
    } else {
        "off (--iptables-forward-rules=false)"
    };
    match (policy, ours) {
        ("ACCEPT", _) => check("forward", true, format!("FORWARD policy ACCEPT; forward rules {flag}")),
        (_, true) => check(
            "forward",
            true,
            format!("FORWARD policy {policy}; our FLANNELD-RS-FWD accepts the Network"),
        ),
        (_, false) => check(
            "forward",
            false,
            format!("FORWARD policy {policy} and no forward rules of ours (forward rules {flag}): pods' traffic through this node is dropped"),
        ),
    }
}

/// `net.bridge.bridge-nf-call-iptables`: whether traffic between pods on one bridge passes
/// iptables (kube-proxy's services and network policies need it).
pub fn bridge_check(value: Option<&str>) -> Check {
    match value {
        None => check(
            "br_netfilter",
            false,
            "br_netfilter not loaded: traffic between pods on this node's bridge bypasses iptables (kube-proxy, policies)",
        ),
        Some("1") => check("br_netfilter", true, "bridge-nf-call-iptables=1"),
        Some(v) => check(
            "br_netfilter",
            false,
            format!("bridge-nf-call-iptables={v}: traffic between pods on this node's bridge bypasses iptables"),
        ),
    }
}

/// Reverse-path filtering on our devices: the kernel uses the larger of `all` and the
/// device's value; strict (1) drops packets whose way back leaves by another interface.
pub fn rp_filter_check(all: Option<&str>, devices: &[(String, Option<String>)]) -> Check {
    let all_v: u8 = all.and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut parts = vec![format!("all={all_v}")];
    let mut strict = Vec::new();
    for (dev, v) in devices {
        let v: u8 = v.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0);
        let effective = v.max(all_v);
        parts.push(format!("{dev}={effective}"));
        if effective == 1 {
            strict.push(dev.as_str());
        }
    }
    let mut detail = parts.join(", ");
    if !strict.is_empty() {
        detail.push_str(&format!(
            " (strict on {}: packets whose way back leaves by another interface are dropped)",
            strict.join(", ")
        ));
    }
    check("rp_filter", true, detail)
}

pub fn masquerade_check(on: bool) -> Check {
    let detail = if on {
        "on: our masquerade rules are installed and restored every --iptables-resync"
    } else {
        "off (--ip-masq not set): pods reach outside the Network with their own addresses"
    };
    check("masquerade", true, detail)
}

/// `tx-checksum-ip-generic` on a VXLAN device, from `ethtool -k`: some NICs and NAT paths
/// break VXLAN checksum offload (flannel-io/flannel#2152), and turning it off is the fix.
pub fn vxlan_offload_check(dev: &str, features: Option<&str>) -> Check {
    let setting = features.and_then(|f| {
        f.lines()
            .find_map(|l| l.trim().strip_prefix("tx-checksum-ip-generic:"))
            .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
    });
    let detail = match setting {
        Some(v) => format!("{dev}: tx-checksum-ip-generic {v}"),
        None => format!("{dev}: unknown (ethtool not found)"),
    };
    check("vxlan_checksum_offload", true, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_policy_drop_without_our_rules_is_named() {
        let docker = "-P FORWARD DROP\n-A FORWARD -j DOCKER-USER\n";
        let c = forward_check(Some(docker), false);
        assert!(!c.ok);
        assert!(c.detail.contains("FORWARD policy DROP"), "{}", c.detail);
        assert!(
            c.detail.contains("--iptables-forward-rules=false"),
            "{}",
            c.detail
        );
        let ours = "-P FORWARD DROP\n-A FORWARD -j DOCKER-USER\n-A FORWARD -j FLANNELD-RS-FWD\n";
        assert!(forward_check(Some(ours), true).ok);
        assert!(forward_check(Some("-P FORWARD ACCEPT\n"), false).ok);
        assert!(forward_check(None, true).ok);
    }

    #[test]
    fn bridge_and_rp_filter() {
        assert!(bridge_check(Some("1")).ok);
        assert!(!bridge_check(Some("0")).ok);
        assert!(!bridge_check(None).ok);
        let c = rp_filter_check(Some("1"), &[("flannel.1".into(), Some("0".into()))]);
        assert!(
            c.detail.contains("flannel.1=1") && c.detail.contains("strict"),
            "{}",
            c.detail
        );
        let c = rp_filter_check(Some("0"), &[("flannel0".into(), Some("2".into()))]);
        assert_eq!(c.detail, "all=0, flannel0=2");
    }

    #[test]
    fn vxlan_offload_from_ethtool() {
        let out = "Features for flannel.1:\nrx-checksumming: on\ntx-checksumming: on\n\ttx-checksum-ipv4: off [fixed]\n\ttx-checksum-ip-generic: on\n";
        let c = vxlan_offload_check("flannel.1", Some(out));
        assert_eq!(c.detail, "flannel.1: tx-checksum-ip-generic on");
        assert!(vxlan_offload_check("flannel.1", None)
            .detail
            .contains("unknown"));
    }
}
