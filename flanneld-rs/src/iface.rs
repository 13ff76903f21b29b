//! Choosing the underlay interface and public IP the way Flannel does: `--iface` (names or
//! IPs, first match wins), then `--iface-regex`, then `--iface-can-reach` (the interface and
//! source address of the kernel's route to that IP); with none of them, the interface holding
//! `--public-ip`, else the interface of the default route.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{anyhow, bail, Context, Result};
use encap::netlink::{Link, Netlink};
use encap::NodeInfo;
use ipnet::IpNet;

use crate::flags::Flags;

pub async fn choose(netlink: &Netlink, flags: &Flags) -> Result<NodeInfo> {
    let links = netlink.links().await.context("reading interfaces")?;
    let addrs = netlink.addresses().await.context("reading addresses")?;
    // The source address --iface-can-reach's route would use, preferred over the first one.
    let mut route_source = None;
    let asked = !flags.iface.is_empty() || !flags.iface_regex.is_empty();
    let link = if asked || flags.iface_can_reach.is_some() {
        let mut found = flags
            .iface
            .iter()
            .find_map(|want| by_name_or_ip(want, &links, &addrs));
        if found.is_none() {
            found = by_regex(&flags.iface_regex, &links, &addrs)?;
        }
        if let (None, Some(target)) = (&found, flags.iface_can_reach) {
            let route = netlink
                .route_to(target)
                .await
                .with_context(|| format!("--iface-can-reach {target}: no route"))?;
            found = route
                .oif
                .and_then(|i| links.iter().find(|l| l.index == i).cloned());
            route_source = route.source;
        }
        found.ok_or_else(|| {
            anyhow!(
                "no interface matches --iface {:?}, --iface-regex {:?} or --iface-can-reach {:?}",
                flags.iface,
                flags.iface_regex,
                flags.iface_can_reach
            )
        })?
    } else if let Some(owner) = flags
        .public_ip
        .and_then(|ip| by_name_or_ip(&ip.to_string(), &links, &addrs))
    {
        // As Flannel: --public-ip alone picks the interface that holds it (where one does;
        // behind NAT none does, and the default route decides).
        owner
    } else {
        let index = netlink
            .default_route_link()
            .await
            .context("reading the default route")?
            .ok_or_else(|| anyhow!("no default route to pick an interface from: pass --iface"))?;
        links
            .iter()
            .find(|l| l.index == index)
            .cloned()
            .ok_or_else(|| anyhow!("the default route's interface (index {index}) vanished"))?
    };
    let v4 = match route_source {
        Some(IpAddr::V4(src)) => Some(src),
        _ => first_v4(&addrs, link.index),
    };
    let public_ip = match (flags.public_ip, v4) {
        (Some(ip), _) => ip,
        (None, Some(ip)) => ip,
        (None, None) => bail!(
            "interface {} has no IPv4 address: pass --public-ip or another --iface",
            link.name
        ),
    };
    let public_ipv6 = flags.public_ipv6.or(match route_source {
        Some(IpAddr::V6(src)) => Some(src),
        _ => first_v6(&addrs, link.index),
    });
    tracing::info!(iface = %link.name, %public_ip, mtu = link.mtu, "using interface");
    Ok(NodeInfo {
        iface: link,
        public_ip,
        public_ipv6,
        // Not the interface's business: the daemon sets it from the flags.
        wg_key_file: None,
        datapath: encap::Datapath::default(),
    })
}

fn by_name_or_ip(want: &str, links: &[Link], addrs: &[(u32, IpNet)]) -> Option<Link> {
    let index = match want.parse::<IpAddr>() {
        Ok(ip) => addrs
            .iter()
            .find(|(_, a)| a.addr() == ip)
            .map(|(i, _)| *i)?,
        Err(_) => links.iter().find(|l| l.name == want)?.index,
    };
    links.iter().find(|l| l.index == index).cloned()
}

/// The first interface whose address, then name, matches one of `patterns` (in order);
/// an invalid pattern is an error.
fn by_regex(patterns: &[String], links: &[Link], addrs: &[(u32, IpNet)]) -> Result<Option<Link>> {
    for p in patterns {
        let re = regex::Regex::new(p)
            .with_context(|| format!("--iface-regex {p:?} is not a valid regex"))?;
        let by_ip = addrs
            .iter()
            .find(|(_, a)| re.is_match(&a.addr().to_string()))
            .map(|(i, _)| *i);
        let found = by_ip
            .and_then(|i| links.iter().find(|l| l.index == i))
            .or_else(|| links.iter().find(|l| re.is_match(&l.name)));
        if let Some(l) = found {
            return Ok(Some(l.clone()));
        }
    }
    Ok(None)
}

fn first_v4(addrs: &[(u32, IpNet)], index: u32) -> Option<Ipv4Addr> {
    addrs.iter().find_map(|(i, a)| match a {
        IpNet::V4(n) if *i == index => Some(n.addr()),
        _ => None,
    })
}

fn first_v6(addrs: &[(u32, IpNet)], index: u32) -> Option<Ipv6Addr> {
    addrs.iter().find_map(|(i, a)| match a {
        IpNet::V6(n) if *i == index && !n.addr().is_unicast_link_local() => Some(n.addr()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> (Vec<Link>, Vec<(u32, IpNet)>) {
        let links = vec![
            Link {
                index: 1,
                name: "lo".into(),
                mtu: 65536,
            },
            Link {
                index: 2,
                name: "eth0".into(),
                mtu: 1500,
            },
            Link {
                index: 3,
                name: "eth1".into(),
                mtu: 9000,
            },
        ];
        let addrs = vec![
            (1, "127.0.0.1/8".parse().expect("net")),
            (2, "192.168.1.10/24".parse().expect("net")),
            (3, "10.9.0.5/16".parse().expect("net")),
        ];
        (links, addrs)
    }

    #[test]
    fn iface_by_name_or_ip() {
        let (links, addrs) = fixture();
        assert_eq!(
            by_name_or_ip("eth1", &links, &addrs).map(|l| l.index),
            Some(3)
        );
        assert_eq!(
            by_name_or_ip("192.168.1.10", &links, &addrs).map(|l| l.index),
            Some(2)
        );
        assert_eq!(by_name_or_ip("wlan0", &links, &addrs), None);
        assert_eq!(first_v4(&addrs, 3), Some("10.9.0.5".parse().expect("ip")));
    }

    #[test]
    fn iface_by_regex_prefers_addresses() {
        let (links, addrs) = fixture();
        let pick = |p: &str| by_regex(&[p.to_string()], &links, &addrs).map(|l| l.map(|l| l.name));
        assert_eq!(pick(r"^10\.9\.").ok().flatten().as_deref(), Some("eth1"));
        assert_eq!(pick("^eth0$").ok().flatten().as_deref(), Some("eth0"));
        assert_eq!(pick("nope").ok(), Some(None));
        // One regex with a comma in it, as Flannel's manifests pass them.
        assert_eq!(
            pick("^eth[0-9]{1,2}$").ok().flatten().as_deref(),
            Some("eth0")
        );
        assert!(pick("(")
            .unwrap_err()
            .to_string()
            .contains("not a valid regex"));
    }
}
