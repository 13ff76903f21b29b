//! The peer table of the encapsulating backends: which node owns a pod subnet (for sending)
//! and which subnets a node's public IP may speak for (for anti-spoofing on receive).
//!
//! The table is immutable once built; the watch builds a new one and swaps it in atomically,
//! so the packet threads read it without locks (one `load` per batch).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::{BitAnd, Shl};

use arc_swap::ArcSwap;
use ipnet::{IpNet, Ipv4Net};

/// One remote node as the datapath sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    /// Where to send its traffic: public IP and the backend's port.
    pub endpoint: SocketAddr,
}

/// Longest-prefix match over IPv4 and IPv6 subnets, the one route lookup of the udp and
/// wireguard peer tables. One generic table per family, so an IPv4 lookup hashes a `u32` and
/// never looks at IPv6 prefix lengths (and the other way round).
#[derive(Debug)]
pub(crate) struct PrefixMap<V> {
    v4: Lpm<u32, V>,
    v6: Lpm<u128, V>,
}

impl<V> Default for PrefixMap<V> {
    fn default() -> Self {
        PrefixMap {
            v4: Lpm::default(),
            v6: Lpm::default(),
        }
    }
}

impl<V> PrefixMap<V> {
    /// Maps `net` to `value`, replacing what the same subnet had.
    pub fn insert(&mut self, net: impl Into<IpNet>, value: V) {
        match net.into() {
            IpNet::V4(n) => self.v4.insert(n.network().into(), n.prefix_len(), value),
            IpNet::V6(n) => self.v6.insert(n.network().into(), n.prefix_len(), value),
        }
    }

    /// The value of the longest subnet containing `addr`.
    pub fn get(&self, addr: impl Into<IpAddr>) -> Option<&V> {
        match addr.into() {
            IpAddr::V4(a) => self.v4.get(a.into()),
            IpAddr::V6(a) => self.v6.get(a.into()),
        }
    }
}

/// An address as an unsigned integer of its width.
trait Bits: Copy + Eq + Hash + Shl<u32, Output = Self> + BitAnd<Output = Self> {
    const WIDTH: u32;
    const ALL: Self;
    const ZERO: Self;
}

impl Bits for u32 {
    const WIDTH: u32 = 32;
    const ALL: Self = u32::MAX;
    const ZERO: Self = 0;
}

impl Bits for u128 {
    const WIDTH: u32 = 128;
    const ALL: Self = u128::MAX;
    const ZERO: Self = 0;
}

/// `addr` with all but its first `len` bits cleared.
fn mask<K: Bits>(addr: K, len: u8) -> K {
    let len = u32::from(len).min(K::WIDTH);
    if len == 0 {
        K::ZERO
    } else {
        addr & (K::ALL << (K::WIDTH - len))
    }
}

/// One family's prefixes: per prefix length, longest first, the masked network -> a value.
#[derive(Debug)]
struct Lpm<K, V> {
    by_len: Vec<(u8, HashMap<K, V>)>,
}

impl<K, V> Default for Lpm<K, V> {
    fn default() -> Self {
        Lpm { by_len: Vec::new() }
    }
}

impl<K: Bits, V> Lpm<K, V> {
    fn insert(&mut self, net: K, len: u8, value: V) {
        let at = match self.by_len.binary_search_by(|(l, _)| len.cmp(l)) {
            Ok(at) => at,
            Err(at) => {
                self.by_len.insert(at, (len, HashMap::new()));
                at
            }
        };
        if let Some((_, map)) = self.by_len.get_mut(at) {
            map.insert(mask(net, len), value);
        }
    }

    fn get(&self, addr: K) -> Option<&V> {
        self.by_len
            .iter()
            .find_map(|(len, map)| map.get(&mask(addr, *len)))
    }
}

#[derive(Debug, Default)]
pub struct PeerTable {
    peers: Vec<Peer>,
    /// Pod subnet -> index into `peers`.
    by_subnet: PrefixMap<usize>,
    /// Public IP -> indexes of the peers (normally one) whose leases carry it.
    by_public_ip: HashMap<Ipv4Addr, Vec<usize>>,
}

impl PeerTable {
    pub fn new(peers: Vec<Peer>) -> Self {
        let mut by_subnet = PrefixMap::default();
        let mut by_public_ip: HashMap<Ipv4Addr, Vec<usize>> = HashMap::new();
        for (i, p) in peers.iter().enumerate() {
            by_subnet.insert(p.subnet, i);
            by_public_ip.entry(p.public_ip).or_default().push(i);
        }
        PeerTable {
            peers,
            by_subnet,
            by_public_ip,
        }
    }

    /// Longest-prefix match of an inner destination (udp is IPv4 only: an IPv6 one has none).
    pub fn route(&self, dst: IpAddr) -> Option<&Peer> {
        self.by_subnet.get(dst).and_then(|&i| self.peers.get(i))
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
        assert!(PeerTable::default()
            .route(ip("10.244.1.1").into())
            .is_none());
    }

    #[test]
    fn prefix_map_prefers_the_longest_subnet_whatever_the_insertion_order() {
        let net = |s: &str| -> Ipv4Net { s.parse().expect("net") };
        let mut m = PrefixMap::default();
        m.insert(net("10.244.3.0/24"), 24);
        m.insert(net("0.0.0.0/0"), 0);
        m.insert(net("10.244.3.128/25"), 25);
        m.insert(net("10.244.0.0/16"), 16);
        m.insert(net("10.244.3.0/24"), 240);
        let at = |s: &str| m.get(s.parse::<IpAddr>().expect("ip")).copied();
        assert_eq!(at("10.244.3.200"), Some(25));
        assert_eq!(
            at("10.244.3.5"),
            Some(240),
            "the same subnet again replaces"
        );
        assert_eq!(at("10.244.9.9"), Some(16));
        assert_eq!(at("192.0.2.1"), Some(0));
        assert_eq!(at("::1"), None, "0.0.0.0/0 is no IPv6 default");
        assert_eq!(
            PrefixMap::<u8>::default().get("10.0.0.1".parse::<IpAddr>().expect("ip")),
            None
        );
    }

    #[test]
    fn prefix_map_keeps_the_families_apart() {
        let net = |s: &str| -> IpNet { s.parse().expect("net") };
        let mut m = PrefixMap::default();
        m.insert(net("10.244.1.0/24"), "n1 v4");
        m.insert(net("fc00:44:0:1::/64"), "n1 v6");
        m.insert(net("fc00:44:0:1:8000::/65"), "n1 v6 upper half");
        m.insert(net("fc00:44::/48"), "network v6");
        m.insert(net("::/0"), "v6 default");
        // An IPv4 address whose bits lead an IPv6 prefix is still not in it, nor the other way.
        m.insert(net("252.0.0.0/8"), "v4 252/8");
        let at = |s: &str| m.get(s.parse::<IpAddr>().expect("ip")).copied();
        assert_eq!(at("10.244.1.9"), Some("n1 v4"));
        assert_eq!(at("fc00:44:0:1::7"), Some("n1 v6"));
        assert_eq!(at("fc00:44:0:1:ffff::7"), Some("n1 v6 upper half"));
        assert_eq!(at("fc00:44:0:2::7"), Some("network v6"));
        assert_eq!(at("2001:db8::1"), Some("v6 default"));
        assert_eq!(
            at("fc00::1"),
            Some("v6 default"),
            "fc00:: is not 252.0.0.0/8"
        );
        assert_eq!(at("10.244.2.1"), None, "::/0 is no IPv4 default");
        assert_eq!(
            at("::ffff:10.244.1.9"),
            Some("v6 default"),
            "mapped is IPv6 here"
        );
        assert_eq!(at("252.1.2.3"), Some("v4 252/8"));
    }
}
