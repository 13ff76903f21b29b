//! WireGuard peers as the packet threads see them: each peer's protocol state (sessions,
//! handshake in flight, timers, where it is) behind its own lock, taken briefly once per batch
//! and never across a syscall, and an immutable table, swapped atomically by the control plane,
//! that finds a peer by inner destination (AllowedIPs), by the receiver index in a message, or
//! by public key.
//!
//! The lock guards decisions, not packets: a batch clones the session it needs and seals or
//! opens outside, so every queue's threads work on one peer at once. Handshake messages that
//! arrive are worked out outside it too (anyone can make us try a response); the one piece of
//! public-key work under it is building our own initiation, once per handshake.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use boringtun::x25519::StaticSecret;
use ipnet::IpNet;

use super::handshake::{self, InitSent, Keys, Local, Remote, INIT_LEN};
use super::keys::random_key;
use super::session::Session;
use crate::peers::PrefixMap;

/// A peer's sessions are numbered `index << 8 | n`; the index must fit in 24 bits.
pub(super) const INDEX_BITS: u32 = 24;

// WireGuard's timers (whitepaper §6.1).
pub(super) const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
pub(super) const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
pub(super) const REKEY_ATTEMPT_TIME: Duration = Duration::from_secs(90);
pub(super) const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
pub(super) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Initiations from one peer closer together than this are dropped (wireguard-go's 1/50 s).
pub(super) const INIT_FLOOD: Duration = Duration::from_millis(20);
/// With packets waiting for a session, a lost initiation is retried after this long rather
/// than REKEY_TIMEOUT (say our greeting went out before the peer knew our key).
pub(super) const RETRY_INIT: Duration = Duration::from_secs(1);
/// Packets kept while a handshake runs (the oldest go first beyond it).
pub(super) const MAX_STAGED: usize = 256;

pub(super) struct WgPeer {
    /// Our 24-bit index for this peer: the top bits of every receiver index it sends us.
    pub index: u32,
    pub public_key: [u8; 32],
    /// Set for a new peer: the timer thread starts a handshake at once instead of waiting for
    /// the first packet, so a restarted node is reachable again within a round trip (the far
    /// side keeps sending on a session we forgot until it hears from us).
    pub greet: AtomicBool,
    pub remote: Remote,
    /// Persistent keepalive (seconds, 0 or `None`: off).
    pub keepalive: Option<u16>,
    state: Mutex<PeerState>,
}

/// A handshake we initiated and wait to hear back on.
pub(super) struct Pending {
    /// Shared so that a response is checked against it outside the peer's lock.
    pub sent: Arc<InitSent>,
    /// The initiation `sent` replaced, still answerable: traffic retries after RETRY_INIT, so
    /// on a path slower than that the answer to one arrives after the next went out.
    pub replaced: Option<Arc<InitSent>>,
    /// When the first initiation of this attempt went out (REKEY_ATTEMPT_TIME runs from it).
    pub started: Instant,
    pub last_sent: Instant,
    /// Added to REKEY_TIMEOUT before the timer retries: drawn once per initiation, so that
    /// nodes restarted together spread their retries.
    pub jitter: Duration,
}

impl Pending {
    /// The initiation of ours that a message to our index `receiver` answers.
    pub fn answers(&self, receiver: u32) -> Option<&Arc<InitSent>> {
        std::iter::once(&self.sent)
            .chain(&self.replaced)
            .find(|s| s.local_index == receiver)
    }
}

/// Up to a third of a second (WireGuard's REKEY_TIMEOUT jitter), from the clock and the peer.
fn jitter(peer_index: u32) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mix = u64::from(peer_index).wrapping_mul(0x9e37_79b9) ^ u64::from(nanos);
    Duration::from_millis(mix % 334)
}

/// What the packet threads and the timer change.
pub(super) struct PeerState {
    /// Where we send to: the lease's endpoint, then wherever authenticated packets come from
    /// (WireGuard's roaming).
    pub endpoint: SocketAddr,
    /// The endpoint the lease says; a lease update moves `endpoint` only when this changes,
    /// so a periodic lease renewal does not undo roaming.
    pub configured: SocketAddr,
    /// The session we send with.
    pub current: Option<Arc<Session>>,
    /// The one before, still opened while packets sealed with it are in flight.
    pub previous: Option<Arc<Session>>,
    /// A session we answered as responder, unconfirmed until the initiator's first data
    /// message opens with it.
    pub next: Option<Arc<Session>>,
    pub pending: Option<Pending>,
    /// The latest cookie the peer sent us (under load it wants mac2), and when.
    pub cookie: Option<([u8; 16], Instant)>,
    /// The index and mac1 of our latest response: a cookie reply may come back to it.
    pub answered: Option<(u32, [u8; 16])>,
    /// The greatest initiation timestamp accepted from the peer (replays must be newer).
    pub last_timestamp: [u8; 12],
    pub last_init_received: Option<Instant>,
    /// Packets waiting for a session.
    pub staged: VecDeque<Vec<u8>>,
    /// Staged packets dropped with a handshake given up, not yet counted.
    given_up: u64,
    /// Since when data we sent has gone unanswered (nothing authentic received since).
    pub unanswered_since: Option<Instant>,
    /// Since when data we received has gone unacknowledged (nothing sent since).
    pub unacked_since: Option<Instant>,
    /// When we last sent anything to the peer.
    pub last_sent: Option<Instant>,
    /// When data last arrived on a session we initiated (its age then decides a rekey).
    pub last_data_received: Option<Instant>,
    /// The low byte of the next session index.
    next_session: u8,
}

/// What the timers want sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Due {
    Nothing,
    Initiate,
    Keepalive,
}

impl WgPeer {
    pub fn new(
        local: &Local,
        index: u32,
        public_key: [u8; 32],
        psk: Option<[u8; 32]>,
        keepalive: Option<u16>,
        endpoint: SocketAddr,
    ) -> Self {
        WgPeer {
            index,
            public_key,
            greet: AtomicBool::new(true),
            remote: Remote::new(local, public_key, psk),
            keepalive: keepalive.filter(|&k| k > 0),
            state: Mutex::new(PeerState {
                endpoint,
                configured: endpoint,
                current: None,
                previous: None,
                next: None,
                pending: None,
                cookie: None,
                answered: None,
                last_timestamp: [0; 12],
                last_init_received: None,
                staged: VecDeque::new(),
                given_up: 0,
                unanswered_since: None,
                unacked_since: None,
                last_sent: None,
                last_data_received: None,
                next_session: 0,
            }),
        }
    }

    /// The peer's state. A thread that panicked while holding the lock cannot have left the
    /// state half-updated in a way that matters more than losing the peer, so a poisoned lock
    /// is used as is rather than taking the datapath down.
    pub fn lock(&self) -> MutexGuard<'_, PeerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl PeerState {
    /// The session to send with now, if one may still send.
    pub fn sending(&self, now: Instant) -> Option<Arc<Session>> {
        self.current
            .as_ref()
            .filter(|s| {
                now.saturating_duration_since(s.born) < REJECT_AFTER_TIME
                    && s.sent() < super::session::REJECT_AFTER_MESSAGES
            })
            .cloned()
    }

    /// The session a data message's receiver index names (if not expired), and whether it is
    /// the unconfirmed `next` one.
    pub fn by_index(&self, local_index: u32, now: Instant) -> Option<(Arc<Session>, bool)> {
        let hit = |s: &Option<Arc<Session>>| {
            s.as_ref()
                .filter(|s| {
                    s.local_index == local_index
                        && now.saturating_duration_since(s.born) < REJECT_AFTER_TIME
                })
                .cloned()
        };
        if let Some(s) = hit(&self.current).or_else(|| hit(&self.previous)) {
            return Some((s, false));
        }
        hit(&self.next).map(|s| (s, true))
    }

    /// The responder's keys are confirmed: `next` becomes the session we send with. Returns
    /// the packets that waited for a session, to go now.
    pub fn confirm(&mut self, local_index: u32) -> VecDeque<Vec<u8>> {
        if self
            .next
            .as_ref()
            .is_some_and(|s| s.local_index == local_index)
        {
            self.previous = self.current.take();
            self.current = self.next.take();
            return std::mem::take(&mut self.staged);
        }
        VecDeque::new()
    }

    /// Whether sending on `s` calls for a new handshake: the initiator renews a session
    /// before it ages out, either side one that has sent nearly all it may.
    pub fn rekey_due(&self, s: &Session, now: Instant) -> bool {
        self.pending.is_none()
            && ((s.initiator && now.saturating_duration_since(s.born) >= REKEY_AFTER_TIME)
                || s.sent() >= super::session::REKEY_AFTER_MESSAGES)
    }

    /// Whether packets waiting for a session call for an initiation now.
    pub fn retry_due(&self, now: Instant) -> bool {
        self.pending
            .as_ref()
            .is_none_or(|p| now.saturating_duration_since(p.last_sent) >= RETRY_INIT)
    }

    /// Staged packets dropped when their handshake was given up, since last asked (the
    /// timer thread counts them).
    pub fn take_given_up(&mut self) -> u64 {
        std::mem::take(&mut self.given_up)
    }

    /// Keeps a packet until a session exists (the oldest goes beyond MAX_STAGED).
    pub fn stage(&mut self, pkt: &[u8]) -> bool {
        let dropped = self.staged.len() >= MAX_STAGED;
        if dropped {
            self.staged.pop_front();
        }
        self.staged.push_back(pkt.to_vec());
        !dropped
    }

    /// The cookie the peer last sent, while still good (WireGuard keeps one 120 s).
    pub fn fresh_cookie(&self, now: Instant) -> Option<[u8; 16]> {
        self.cookie
            .filter(|(_, at)| now.saturating_duration_since(*at) < REKEY_AFTER_TIME)
            .map(|(c, _)| c)
    }

    /// A session index for this peer that none of its sessions or handshakes holds.
    fn fresh_index(&mut self, peer_index: u32) -> u32 {
        let held = |i: u32| {
            [&self.current, &self.previous, &self.next]
                .iter()
                .any(|s| s.as_ref().is_some_and(|s| s.local_index == i))
                || self
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.answers(i).is_some())
                || self.answered.is_some_and(|(a, _)| a == i)
        };
        let mut index = 0;
        for _ in 0..=u8::MAX {
            self.next_session = self.next_session.wrapping_add(1);
            index = peer_index << 8 | u32::from(self.next_session);
            if !held(index) {
                break;
            }
        }
        index
    }

    /// Builds an initiation into `msg` and remembers it. `None` when no randomness or the
    /// peer's key is unusable (a low order point: no handshake can ever succeed).
    pub fn initiate(
        &mut self,
        local: &Local,
        peer: &WgPeer,
        now: Instant,
        msg: &mut [u8; INIT_LEN],
    ) -> Option<()> {
        let ephemeral = StaticSecret::from(random_key().ok()?);
        let index = self.fresh_index(peer.index);
        let cookie = self.fresh_cookie(now);
        let stamp = handshake::tai64n(SystemTime::now());
        let sent = handshake::initiate(
            local,
            &peer.remote,
            index,
            ephemeral,
            stamp,
            cookie.as_ref(),
            msg,
        )
            .map_err(|e| tracing::warn!(peer = %super::keys::encode_key(&peer.public_key), "WireGuard handshake: {e}"))
            .ok()?;
        let (started, replaced) = match self.pending.take() {
            Some(p) => (p.started, Some(p.sent)),
            None => (now, None),
        };
        self.pending = Some(Pending {
            sent: Arc::new(sent),
            replaced,
            started,
            last_sent: now,
            jitter: jitter(peer.index),
        });
        self.last_sent = Some(now);
        self.unanswered_since = None;
        Some(())
    }

    /// Allocates the index of a session we answer as responder.
    pub fn responder_index(&mut self, peer_index: u32) -> u32 {
        self.fresh_index(peer_index)
    }

    /// A handshake completed: `keys` become a session (ours to send with at once if we
    /// initiated; after confirmation if we responded).
    pub fn established(&mut self, keys: &Keys, now: Instant) -> Option<Arc<Session>> {
        let s = Arc::new(Session::new(keys, now)?);
        if keys.initiator {
            self.pending = None;
            // As wireguard-go: a session we answered meanwhile (crossing initiations) is kept
            // only to open what the peer already sent with it, so that its first packet does
            // not later confirm it over the one we initiated (which alone rekeys on time).
            self.previous = match self.next.take() {
                Some(answered) => Some(answered),
                None => self.current.take(),
            };
            self.current = Some(s.clone());
        } else {
            self.next = Some(s.clone());
            self.previous = None;
        }
        Some(s)
    }

    /// Something authentic came from the peer.
    pub fn heard(&mut self, data: bool, now: Instant) {
        self.unanswered_since = None;
        if data {
            self.unacked_since.get_or_insert(now);
            self.last_data_received = Some(now);
        }
    }

    /// We sent data to the peer.
    pub fn sent_data(&mut self, now: Instant) {
        self.unanswered_since.get_or_insert(now);
        self.unacked_since = None;
        self.last_sent = Some(now);
    }

    /// WireGuard's timers: expired sessions go, unanswered initiations are retried until
    /// REKEY_ATTEMPT_TIME, received data is acknowledged within KEEPALIVE_TIMEOUT, unanswered
    /// data starts a new handshake, a session we initiated is renewed before it ages out, and
    /// a persistent keepalive goes out when due.
    pub fn timers(&mut self, now: Instant, keepalive: Option<u16>) -> Due {
        let age =
            |s: &Option<Arc<Session>>| s.as_ref().map(|s| now.saturating_duration_since(s.born));
        for s in [&mut self.current, &mut self.previous, &mut self.next] {
            if s.as_ref()
                .is_some_and(|s| now.saturating_duration_since(s.born) >= REJECT_AFTER_TIME)
            {
                *s = None;
            }
        }
        if let Some(p) = &self.pending {
            if now.saturating_duration_since(p.started) >= REKEY_ATTEMPT_TIME {
                // Give up until there is something to send again.
                self.pending = None;
                self.given_up += self.staged.len() as u64;
                self.staged.clear();
                return Due::Nothing;
            }
            if now.saturating_duration_since(p.last_sent) >= REKEY_TIMEOUT + p.jitter {
                return Due::Initiate;
            }
        } else if self.current.is_none() {
            if !self.staged.is_empty() {
                return Due::Initiate;
            }
        } else {
            // Data sent and nothing heard since: the peer may have lost the session.
            let unanswered = self.unanswered_since.is_some_and(|t| {
                now.saturating_duration_since(t) >= KEEPALIVE_TIMEOUT + REKEY_TIMEOUT
            });
            // The initiator renews a session it still receives on before it ages out.
            let initiated = self.current.as_ref().is_some_and(|s| s.initiator);
            let old = age(&self.current)
                .is_some_and(|a| a >= REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT);
            let recent = self
                .last_data_received
                .is_some_and(|t| now.saturating_duration_since(t) < KEEPALIVE_TIMEOUT);
            if unanswered || (initiated && old && recent) {
                return Due::Initiate;
            }
        }
        if self.current.is_none() {
            // A persistent keepalive with no session to carry it starts one (the peer may be
            // behind NAT and reachable only through what we send).
            let keepalive_due = keepalive.is_some_and(|k| {
                let every = Duration::from_secs(u64::from(k));
                self.last_sent
                    .is_none_or(|t| now.saturating_duration_since(t) >= every)
            });
            return if keepalive_due && self.pending.is_none() {
                Due::Initiate
            } else {
                Due::Nothing
            };
        }
        if self
            .unacked_since
            .is_some_and(|t| now.saturating_duration_since(t) >= KEEPALIVE_TIMEOUT)
        {
            return Due::Keepalive;
        }
        if let Some(k) = keepalive {
            let every = Duration::from_secs(u64::from(k));
            if self
                .last_sent
                .is_none_or(|t| now.saturating_duration_since(t) >= every)
            {
                return Due::Keepalive;
            }
        }
        Due::Nothing
    }
}

/// The immutable lookup structure the packet threads load once per batch.
#[derive(Default)]
pub(super) struct WgTable {
    peers: Vec<Arc<WgPeer>>,
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
    pub peer: &'a Arc<WgPeer>,
}

impl WgTable {
    pub fn new(entries: Vec<(Arc<WgPeer>, Vec<IpNet>)>) -> Self {
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

    pub fn peers(&self) -> &[Arc<WgPeer>] {
        &self.peers
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boringtun::x25519::PublicKey;
    use std::time::Duration;

    fn peer(index: u32, key: u8) -> Arc<WgPeer> {
        let ours = Local::new(StaticSecret::from([1u8; 32]));
        let theirs = PublicKey::from(&StaticSecret::from([key; 32]));
        Arc::new(WgPeer::new(
            &ours,
            index,
            *theirs.as_bytes(),
            None,
            None,
            "172.30.0.12:51820".parse().expect("addr"),
        ))
    }

    fn session(local_index: u32, initiator: bool, born: Instant) -> Arc<Session> {
        let keys = Keys {
            send: [3; 32],
            recv: [4; 32],
            local_index,
            remote_index: 99,
            initiator,
        };
        Arc::new(Session::new(&keys, born).expect("key"))
    }

    #[test]
    fn timers_retry_then_give_up_on_a_handshake() {
        let p = peer(1, 2);
        let local = Local::new(StaticSecret::from([1u8; 32]));
        let mut st = p.lock();
        let t0 = Instant::now();
        assert_eq!(
            st.timers(t0, None),
            Due::Nothing,
            "nothing to send, no session"
        );
        st.stage(b"pkt");
        assert_eq!(st.timers(t0, None), Due::Initiate, "a packet waits");
        let mut msg = [0u8; INIT_LEN];
        st.initiate(&local, &p, t0, &mut msg).expect("initiation");
        assert_eq!(msg[0], 1);
        assert_eq!(st.timers(t0 + Duration::from_secs(4), None), Due::Nothing);
        assert!(!st.retry_due(t0), "traffic retries after RETRY_INIT");
        assert!(st.retry_due(t0 + RETRY_INIT));
        let jitter = st.pending.as_ref().map_or(Duration::MAX, |p| p.jitter);
        assert!(jitter < Duration::from_millis(334));
        if !jitter.is_zero() {
            let early = t0 + REKEY_TIMEOUT + jitter - Duration::from_millis(1);
            assert_eq!(st.timers(early, None), Due::Nothing);
        }
        assert_eq!(st.timers(t0 + REKEY_TIMEOUT + jitter, None), Due::Initiate);
        let later = t0 + Duration::from_secs(60);
        st.initiate(&local, &p, later, &mut msg).expect("retry");
        assert_eq!(
            st.pending.as_ref().map(|p| p.started),
            Some(t0),
            "one attempt"
        );
        assert_eq!(st.timers(t0 + REKEY_ATTEMPT_TIME, None), Due::Nothing);
        assert!(
            st.pending.is_none() && st.staged.is_empty(),
            "given up, packets dropped"
        );
        assert_eq!(
            st.take_given_up(),
            1,
            "the staged packet, to be counted once"
        );
        assert_eq!(st.take_given_up(), 0);
    }

    #[test]
    fn timers_keepalives_rekeys_and_expiry() {
        let p = peer(1, 2);
        let mut st = p.lock();
        let t0 = Instant::now();
        st.current = Some(session(0x101, true, t0));
        // Data in, nothing out for KEEPALIVE_TIMEOUT: a keepalive.
        st.heard(true, t0);
        assert_eq!(st.timers(t0 + Duration::from_secs(9), None), Due::Nothing);
        assert_eq!(st.timers(t0 + KEEPALIVE_TIMEOUT, None), Due::Keepalive);
        st.sent_data(t0 + KEEPALIVE_TIMEOUT);
        // Data out, nothing back for KEEPALIVE_TIMEOUT + REKEY_TIMEOUT: a new handshake.
        let quiet = t0 + KEEPALIVE_TIMEOUT + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT;
        assert_eq!(st.timers(quiet, None), Due::Initiate);
        st.heard(false, quiet);
        assert_eq!(st.timers(quiet, None), Due::Nothing, "answered");
        // The initiator renews an old session it still receives on.
        let old = t0 + REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT;
        st.heard(true, old);
        st.sent_data(old);
        assert_eq!(st.timers(old, None), Due::Initiate);
        let s = st.current.clone().expect("session");
        assert!(!st.rekey_due(&s, t0 + Duration::from_secs(119)));
        assert!(
            st.rekey_due(&s, t0 + REKEY_AFTER_TIME),
            "the initiator rekeys on age"
        );
        let theirs = session(0x102, false, t0);
        assert!(
            !st.rekey_due(&theirs, t0 + REKEY_AFTER_TIME),
            "the responder does not"
        );
        // Sessions go at REJECT_AFTER_TIME.
        assert!(st.sending(t0 + REJECT_AFTER_TIME).is_none());
        st.timers(t0 + REJECT_AFTER_TIME, None);
        assert!(st.current.is_none());
    }

    #[test]
    fn persistent_keepalive_and_confirmation() {
        let p = peer(1, 2);
        let mut st = p.lock();
        let t0 = Instant::now();
        st.next = Some(session(0x103, false, t0));
        assert!(
            st.sending(t0).is_none(),
            "an unconfirmed session does not send"
        );
        assert!(matches!(st.by_index(0x103, t0), Some((_, true))));
        st.confirm(0x103);
        assert!(st.sending(t0).is_some() && st.next.is_none());
        assert!(matches!(st.by_index(0x103, t0), Some((_, false))));
        assert!(
            st.by_index(0x103, t0 + REJECT_AFTER_TIME).is_none(),
            "expired"
        );
        st.sent_data(t0);
        st.heard(false, t0);
        let every = Some(25);
        assert_eq!(st.timers(t0 + Duration::from_secs(24), every), Due::Nothing);
        assert_eq!(
            st.timers(t0 + Duration::from_secs(25), every),
            Due::Keepalive
        );
        // Once the session has aged out, a due keepalive starts a handshake instead (a peer
        // behind NAT hears from us only this way); without persistent keepalive, nothing.
        let late = t0 + REJECT_AFTER_TIME;
        assert_eq!(st.timers(late, None), Due::Nothing);
        assert!(st.current.is_none());
        assert_eq!(st.timers(late, every), Due::Initiate);
    }

    #[test]
    fn staging_keeps_the_newest() {
        let p = peer(1, 2);
        let mut st = p.lock();
        for i in 0..MAX_STAGED {
            assert!(st.stage(&[i as u8]));
        }
        assert!(!st.stage(b"one more"), "the oldest went");
        assert_eq!(st.staged.len(), MAX_STAGED);
        assert_eq!(st.staged.front().map(|p| p[0]), Some(1));
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
    fn removed_peer_is_freed_with_its_sessions() {
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
