//! The peer table of the encapsulating backends: which node owns a pod subnet (for sending)
//! and which subnets a node's public IP may speak for (for anti-spoofing on receive).
//!
//! The table is immutable once built; the watch builds a new one and swaps it in atomically,
//! so the packet threads read it without locks (one `load` per batch).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};

use arc_swap::ArcSwap;
use ipnet::Ipv4Net;

/// One remote node as the datapath sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    /// Where to send its traffic: public IP and the backend's port.
    pub endpoint: SocketAddr,
}

#[derive(Debug, Default)]
pub struct PeerTable {
    peers: Vec<Peer>,
    /// Per prefix length, longest first: masked network address -> index into `peers`.
    by_prefix: Vec<(u8, HashMap<u32, usize>)>,
    /// Public IP -> indexes of the peers (normally one) whose leases carry it.
    by_public_ip: HashMap<Ipv4Addr, Vec<usize>>,
}

fn mask(addr: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        addr & (u32::MAX << (32 - u32::from(len.min(32))))
    }
}

impl PeerTable {
    pub fn new(peers: Vec<Peer>) -> Self {
        let mut by_prefix: Vec<(u8, HashMap<u32, usize>)> = Vec::new();
        let mut by_public_ip: HashMap<Ipv4Addr, Vec<usize>> = HashMap::new();
        for (i, p) in peers.iter().enumerate() {
            let len = p.subnet.prefix_len();
            let slot = match by_prefix.iter().position(|(l, _)| *l == len) {
                Some(s) => s,
                None => {
                    by_prefix.push((len, HashMap::new()));
                    by_prefix.len() - 1
                }
            };
            by_prefix[slot].1.insert(u32::from(p.subnet.network()), i);
            by_public_ip.entry(p.public_ip).or_default().push(i);
        }
        by_prefix.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
        PeerTable {
            peers,
            by_prefix,
            by_public_ip,
        }
    }

    /// Longest-prefix match of an inner destination.
    pub fn route(&self, dst: Ipv4Addr) -> Option<&Peer> {
        let d = u32::from(dst);
        self.by_prefix
            .iter()
            .find_map(|(len, map)| map.get(&mask(d, *len)))
            .and_then(|&i| self.peers.get(i))
    }

    /// Whether `outer_src` is a current peer's public IP (any of its leases).
    pub fn knows(&self, outer_src: Ipv4Addr) -> bool {
        self.by_public_ip.contains_key(&outer_src)
    }

    /// Whether a datagram from `outer_src` may carry a packet from `inner_src`: the inner source
    /// must lie in a subnet leased by the node owning that public IP.
    pub fn may_send_from(&self, outer_src: Ipv4Addr, inner_src: Ipv4Addr) -> bool {
        self.by_public_ip.get(&outer_src).is_some_and(|idx| {
            idx.iter()
                .filter_map(|&i| self.peers.get(i))
                .any(|p| p.subnet.contains(&inner_src))
        })
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

/// The table shared between the control plane (writer) and the packet threads (readers).
pub type SharedPeers = ArcSwap<PeerTable>;

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(subnet: &str, ip: &str) -> Peer {
        let public_ip: Ipv4Addr = ip.parse().expect("ip");
        Peer {
            subnet: subnet.parse().expect("subnet"),
            public_ip,
            endpoint: SocketAddr::from((public_ip, 8285)),
        }
    }

    #[test]
    fn longest_prefix_wins() {
        let t = PeerTable::new(vec![
            peer("10.244.0.0/16", "192.168.0.1"),
            peer("10.244.3.0/24", "192.168.0.3"),
            peer("10.244.3.128/25", "192.168.0.4"),
        ]);
        let via = |d: &str| {
            t.route(d.parse().expect("ip"))
                .map(|p| p.public_ip.to_string())
        };
        assert_eq!(via("10.244.3.200").as_deref(), Some("192.168.0.4"));
        assert_eq!(via("10.244.3.5").as_deref(), Some("192.168.0.3"));
        assert_eq!(via("10.244.9.9").as_deref(), Some("192.168.0.1"));
        assert_eq!(via("10.9.9.9"), None);
    }

    #[test]
    fn anti_spoofing_checks_both_sources() {
        let t = PeerTable::new(vec![
            peer("10.244.1.0/24", "192.168.0.1"),
            peer("10.244.2.0/24", "192.168.0.2"),
        ]);
        let ip = |s: &str| -> Ipv4Addr { s.parse().expect("ip") };
        assert!(t.knows(ip("192.168.0.1")));
        assert!(!t.knows(ip("192.168.0.9")));
        assert!(t.may_send_from(ip("192.168.0.1"), ip("10.244.1.7")));
        assert!(
            !t.may_send_from(ip("192.168.0.1"), ip("10.244.2.7")),
            "node 1 may not speak for node 2's pods"
        );
        assert!(!t.may_send_from(ip("192.168.0.9"), ip("10.244.1.7")));
        assert!(PeerTable::default().route(ip("10.244.1.1")).is_none());
    }
}
