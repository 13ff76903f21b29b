//! WireGuard peers as the packet threads see them: one boringtun `Tunn` per remote public key
//! behind its own lock (taken once per batch, never across a syscall: the codec holds no
//! socket), and an immutable table, swapped atomically by the control plane, that finds a peer
//! by inner destination (AllowedIPs), by the receiver index in a message, or by public key.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use boringtun::noise::Tunn;
use ipnet::IpNet;

use crate::peers::PrefixMap;

/// boringtun numbers a peer's sessions `index << 8 | n`; the index must fit in 24 bits.
pub(super) const INDEX_BITS: u32 = 24;

pub(super) struct WgPeer {
    /// Our 24-bit index for this peer: the top bits of every receiver index it sends us.
    pub index: u32,
    pub public_key: [u8; 32],
    /// Set for a new peer: the timer thread starts a handshake at once instead of waiting for
    /// the first packet, so a restarted node is reachable again within a round trip (the far
    /// side keeps sending on a session we forgot until it hears from us).
    pub greet: AtomicBool,
    state: Mutex<PeerState>,
}

/// What the packet threads change: the noise state and where the peer is.
pub(super) struct PeerState {
    pub tunn: WipedTunn,
    /// Where we send to: the lease's endpoint, then wherever authenticated packets come from
    /// (WireGuard's roaming).
    pub endpoint: SocketAddr,
    /// The endpoint the lease says; a lease update moves `endpoint` only when this changes,
    /// so a periodic lease renewal does not undo roaming.
    pub configured: SocketAddr,
    /// When we last sent a handshake initiation (only read and set off the data path).
    pub last_init: Option<Instant>,
}

impl WgPeer {
    pub fn new(index: u32, public_key: [u8; 32], tunn: Tunn, endpoint: SocketAddr) -> Self {
        WgPeer {
            index,
            public_key,
            greet: AtomicBool::new(true),
            state: Mutex::new(PeerState {
                tunn: WipedTunn::new(tunn),
                endpoint,
                configured: endpoint,
                last_init: None,
            }),
        }
    }

    /// The peer's state. A thread that panicked while holding the lock cannot have left the
    /// noise state half-updated in a way that matters more than losing the peer, so a poisoned
    /// lock is used as is rather than taking the datapath down.
    pub fn lock(&self) -> MutexGuard<'_, PeerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A `Tunn` whose memory (session keys, handshake state: all stored inline) is zeroed when
/// dropped, so a removed peer's keys do not linger in freed heap memory. x25519 secrets inside
/// zero themselves; copies made while boringtun moves values on its stack are out of reach.
pub(super) struct WipedTunn(Option<Box<Tunn>>);

impl WipedTunn {
    fn new(tunn: Tunn) -> Self {
        WipedTunn(Some(Box::new(tunn)))
    }

    pub fn get(&mut self) -> Option<&mut Tunn> {
        self.0.as_deref_mut()
    }
}

impl Drop for WipedTunn {
    fn drop(&mut self) {
        let Some(tunn) = self.0.take() else { return };
        let raw: *mut Tunn = Box::into_raw(tunn);
        // SAFETY: `raw` comes from Box::into_raw, so it is valid, aligned and uniquely owned.
        // The value is dropped exactly once, its bytes are then overwritten (they are no longer
        // a `Tunn`, only memory we own), and the allocation is freed through a Box of
        // `MaybeUninit<Tunn>`, which has the same layout and does not drop again.
        unsafe {
            std::ptr::drop_in_place(raw);
            let bytes = raw.cast::<MaybeUninit<u8>>();
            for i in 0..size_of::<Tunn>() {
                std::ptr::write_volatile(bytes.add(i), MaybeUninit::new(0));
            }
            drop(Box::from_raw(raw.cast::<MaybeUninit<Tunn>>()));
        }
    }
}

/// The immutable lookup structure the packet threads load once per batch.
#[derive(Default)]
pub(super) struct WgTable {
    peers: Vec<std::sync::Arc<WgPeer>>,
    /// AllowedIPs of each peer (same order as `peers`): its lease subnets, of either family.
    allowed: Vec<Vec<IpNet>>,
    /// AllowedIPs -> peer slot.
    by_allowed: PrefixMap<usize>,
    by_index: HashMap<u32, usize>,
    by_key: HashMap<[u8; 32], usize>,
}

/// A peer found in the table: its slot (for the AllowedIPs check) and the peer.
#[derive(Clone, Copy)]
pub(super) struct Found<'a> {
    pub slot: usize,
    pub peer: &'a std::sync::Arc<WgPeer>,
}

impl WgTable {
    pub fn new(entries: Vec<(std::sync::Arc<WgPeer>, Vec<IpNet>)>) -> Self {
        let mut t = WgTable::default();
        for (slot, (peer, allowed)) in entries.into_iter().enumerate() {
            for net in &allowed {
                t.by_allowed.insert(*net, slot);
            }
            t.by_index.insert(peer.index, slot);
            t.by_key.insert(peer.public_key, slot);
            t.peers.push(peer);
            t.allowed.push(allowed);
        }
        t
    }

    fn found(&self, slot: usize) -> Option<Found<'_>> {
        Some(Found {
            slot,
            peer: self.peers.get(slot)?,
        })
    }

    /// Longest-prefix match of an inner destination over every peer's AllowedIPs.
    pub fn route(&self, dst: IpAddr) -> Option<Found<'_>> {
        self.found(*self.by_allowed.get(dst)?)
    }

    /// The peer a message's receiver index (`peer index << 8 | session`) belongs to.
    pub fn by_receiver(&self, receiver_index: u32) -> Option<Found<'_>> {
        self.found(*self.by_index.get(&(receiver_index >> 8))?)
    }

    pub fn by_key(&self, key: &[u8; 32]) -> Option<Found<'_>> {
        self.found(*self.by_key.get(key)?)
    }

    /// WireGuard's cryptokey routing on receive: may the peer in `slot` send from `src`?
    pub fn allows(&self, slot: usize, src: IpAddr) -> bool {
        self.allowed
            .get(slot)
            .is_some_and(|nets| nets.iter().any(|n| n.contains(&src)))
    }

    pub fn peers(&self) -> &[std::sync::Arc<WgPeer>] {
        &self.peers
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boringtun::x25519::{PublicKey, StaticSecret};
    use std::sync::Arc;

    fn peer(index: u32, key: u8) -> Arc<WgPeer> {
        let ours = StaticSecret::from([1u8; 32]);
        let theirs = PublicKey::from(&StaticSecret::from([key; 32]));
        let tunn = Tunn::new(ours, theirs, None, None, index, None);
        Arc::new(WgPeer::new(
            index,
            *theirs.as_bytes(),
            tunn,
            "172.30.0.12:51820".parse().expect("addr"),
        ))
    }

    #[test]
    fn lookups() {
        let a = peer(7, 2);
        let b = peer(9, 3);
        let net = |s: &str| -> IpNet { s.parse().expect("net") };
        let t = WgTable::new(vec![
            (
                a.clone(),
                vec![net("10.244.1.0/24"), net("fc00:44:0:1::/64")],
            ),
            (
                b.clone(),
                vec![
                    net("10.244.2.0/24"),
                    net("10.244.2.128/25"),
                    net("fc00:44:0:2::/64"),
                ],
            ),
        ]);
        let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
        assert_eq!(t.route(ip("10.244.1.9")).map(|f| f.peer.index), Some(7));
        assert_eq!(t.route(ip("10.244.2.200")).map(|f| f.peer.index), Some(9));
        assert!(t.route(ip("10.244.3.1")).is_none());
        assert_eq!(t.route(ip("fc00:44:0:1::9")).map(|f| f.peer.index), Some(7));
        assert_eq!(t.route(ip("fc00:44:0:2::9")).map(|f| f.peer.index), Some(9));
        assert!(t.route(ip("fc00:44:0:3::9")).is_none());
        assert_eq!(t.by_receiver(9 << 8 | 0x42).map(|f| f.slot), Some(1));
        assert!(t.by_receiver(8 << 8).is_none());
        assert_eq!(t.by_key(&b.public_key).map(|f| f.peer.index), Some(9));
        assert!(t.allows(0, ip("10.244.1.3")));
        assert!(
            !t.allows(0, ip("10.244.2.3")),
            "peer 7 may not speak for peer 9's pods"
        );
        // Cryptokey routing on an IPv6 inner source, as on an IPv4 one.
        assert!(t.allows(0, ip("fc00:44:0:1::3")));
        assert!(!t.allows(0, ip("fc00:44:0:2::3")), "nor for its IPv6 pods");
        assert!(
            !t.allows(0, ip("::ffff:10.244.1.3")),
            "a mapped address is IPv6"
        );
        assert!(!t.allows(5, ip("10.244.1.3")));
        assert_eq!(t.peers().len(), 2);
    }

    #[test]
    fn removed_peer_is_freed_with_its_tunn() {
        let a = peer(1, 2);
        let weak = Arc::downgrade(&a);
        let t = WgTable::new(vec![(a, vec![])]);
        drop(t);
        assert!(
            weak.upgrade().is_none(),
            "the table held the last reference"
        );
    }
}
