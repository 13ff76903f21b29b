//! WireGuard as a pump codec, with boringtun's noise state machine doing the protocol.
//!
//! Sans-I/O, like boringtun's `noise` itself: the codec holds no socket. What must be sent comes
//! back to the pump as a [`Transmit`] or in an [`Outbox`], and the pump sends it after the codec
//! returned, so never under a peer's lock.
//!
//! Send: the pump hands over one super-packet's segments; under the peer's lock each is sealed
//! (`Tunn::encapsulate`: 16-byte header, ChaCha20-Poly1305, 16-byte tag) into one buffer at a
//! fixed stride, returned as one run so that it leaves in one UDP GSO send.
//!
//! Receive: a message from `recvmmsg` holds one sender's datagrams (UDP GRO merged them); data
//! messages are opened under the lock of the peer their receiver index names, into one buffer,
//! and handed to the pump (GRO, TUN) after the lock is released; handshake replies go to the
//! outbox. A packet is accepted only if it authenticates for a current peer, is not a replay
//! (boringtun's counter window), and its inner source lies in that peer's AllowedIPs.
//! Handshake messages pass the shared rate limiter (mac1 check, cookie replies under load)
//! before any Diffie-Hellman is spent on them.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};

use super::keys::StaticKeys;
use super::peers::{PeerState, WgPeer, WgTable};
use crate::backend::pump::{Codec, Outbox, Transmit};
use crate::io::RecvMsg;
use crate::stats::{DropReason, Tally};

const HANDSHAKE_INIT: u32 = 1;
const HANDSHAKE_RESP: u32 = 2;
const COOKIE_REPLY: u32 = 3;
const DATA: u32 = 4;
const HANDSHAKE_INIT_LEN: usize = 148;
const HANDSHAKE_RESP_LEN: usize = 92;
const COOKIE_REPLY_LEN: usize = 64;
/// Data message: type, receiver index, counter (16 bytes), then the sealed packet and its tag.
pub(super) const DATA_OVERHEAD: usize = 32;
/// Room for any control message boringtun writes (the largest is a handshake initiation), and
/// for a queued packet it seals when a handshake completes (up to a TUN MTU).
const CTL_BUF_LEN: usize = 65_536 + 256;
/// Packets boringtun may have queued while a handshake ran (its MAX_QUEUE_DEPTH is 256).
const MAX_DRAIN: usize = 300;
/// How long packets waiting for a session wait before we send another initiation.
const RETRY_INIT: Duration = Duration::from_secs(1);
/// Handshake messages per second before the rate limiter demands cookies. Each handshake
/// passes the shared limiter twice (our check, then the `Tunn`'s own with the same limiter),
/// so this is twice wireguard-go's/boringtun's 100 per second.
pub(super) const HANDSHAKE_RATE_LIMIT: u64 = 200;

pub(super) struct WgCodec {
    pub table: ArcSwap<WgTable>,
    keys: StaticKeys,
    pub limiter: Arc<RateLimiter>,
}

pub(super) struct TxScratch {
    /// Sealed datagrams back to back, `seg_len + 32` apart.
    sealed: Vec<u8>,
    /// Where boringtun writes a handshake initiation (then copied to the outbox).
    ctl: Vec<u8>,
}

pub(super) struct RxScratch {
    /// Opened packets of the message being processed.
    plain: Vec<u8>,
    used: usize,
    /// (offset, length) in `plain` of each packet to deliver.
    pkts: Vec<(usize, usize)>,
    /// Where boringtun writes handshake replies and released packets (then copied to the
    /// outbox).
    ctl: Vec<u8>,
}

/// Most packets one message can hold: 64 KiB of the smallest data messages (32 bytes).
const MAX_PKTS: usize = 65_536 / DATA_OVERHEAD;

/// The message type, checked like boringtun does (the three reserved bytes must be zero).
fn message_type(d: &[u8]) -> Option<u32> {
    let t = u32::from_le_bytes(d.get(..4)?.try_into().ok()?);
    let ok = match t {
        HANDSHAKE_INIT => d.len() == HANDSHAKE_INIT_LEN,
        HANDSHAKE_RESP => d.len() == HANDSHAKE_RESP_LEN,
        COOKIE_REPLY => d.len() == COOKIE_REPLY_LEN,
        DATA => d.len() >= DATA_OVERHEAD,
        _ => false,
    };
    ok.then_some(t)
}

/// The receiver index of a data message or cookie reply (bytes 4..8).
fn receiver_index(d: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(d.get(4..8)?.try_into().ok()?))
}

/// Releases packets boringtun queued while a handshake ran (it seals each when asked with an
/// empty datagram) into the outbox.
fn drain(tunn: &mut Tunn, to: SocketAddr, buf: &mut [u8], out: &mut Outbox) {
    for _ in 0..MAX_DRAIN {
        match tunn.decapsulate(None, &[], buf) {
            TunnResult::WriteToNetwork(p) => out.push_packet(to, p),
            _ => break,
        }
    }
}

/// A data message from `src` authenticated: WireGuard then sends to where it came from.
fn roam(peer: &WgPeer, endpoint: &mut SocketAddr, src: SocketAddr) {
    if *endpoint != src {
        tracing::info!(
            peer = %super::keys::encode_key(&peer.public_key),
            from = %endpoint,
            to = %src,
            "WireGuard peer roamed"
        );
        *endpoint = src;
    }
}

impl WgCodec {
    pub fn new(keys: StaticKeys) -> Self {
        let limiter = Arc::new(RateLimiter::new(&keys.public, HANDSHAKE_RATE_LIMIT));
        WgCodec {
            table: ArcSwap::from_pointee(WgTable::default()),
            keys,
            limiter,
        }
    }

    pub fn keys(&self) -> &StaticKeys {
        &self.keys
    }

    /// Timers of every peer (handshake retries, rekeying, keepalives, session expiry), due
    /// sends (into `out`), and the rate limiter's per-second reset. Called every 100-250 ms.
    pub fn tick(&self, buf: &mut [u8], out: &mut Outbox) {
        self.limiter.reset_count();
        let table = self.table.load();
        for peer in table.peers() {
            let mut guard = peer.lock();
            let st = &mut *guard;
            let to = st.endpoint;
            let Some(tunn) = st.tunn.get() else { continue };
            let due = if peer.greet.swap(false, Ordering::Relaxed) {
                st.last_init = Some(Instant::now());
                tunn.format_handshake_initiation(buf, false)
            } else {
                // Besides sends, update_timers only reports ConnectionExpired: boringtun
                // dropped the sessions and the next packet to this peer starts over.
                tunn.update_timers(buf)
            };
            if let TunnResult::WriteToNetwork(p) = due {
                out.push_packet(to, p);
            }
            drain(tunn, to, buf, out);
        }
    }

    /// A handshake message or cookie reply: vetted by the rate limiter, then handed to the
    /// peer it is for. Replies go back to where it came from.
    fn control(
        &self,
        table: &WgTable,
        d: &[u8],
        src: SocketAddr,
        buf: &mut [u8],
        out: &mut Outbox,
        tally: &mut Tally,
    ) {
        let cookie_reply = message_type(d) == Some(COOKIE_REPLY);
        let found = if cookie_reply {
            receiver_index(d).and_then(|i| table.by_receiver(i))
        } else {
            match self.limiter.verify_packet(Some(src.ip()), d, buf) {
                Ok(Packet::HandshakeInit(init)) => {
                    // Which peer is it? The initiator's static key, decrypted with ours.
                    parse_handshake_anon(&self.keys.secret, &self.keys.public, &init)
                        .ok()
                        .and_then(|half| table.by_key(&half.peer_static_public))
                }
                Ok(Packet::HandshakeResponse(resp)) => table.by_receiver(resp.receiver_idx),
                Ok(_) => None,
                Err(TunnResult::WriteToNetwork(cookie)) => {
                    // Under load: prove your address first (WireGuard's cookie reply). The
                    // message itself is dropped unread.
                    out.push_control(src, cookie);
                    return tally.count_drop(DropReason::UnknownSender);
                }
                Err(_) => None,
            }
        };
        let Some(found) = found else {
            return tally.count_drop(DropReason::UnknownSender);
        };
        let mut st = found.peer.lock();
        let st = &mut *st;
        let Some(tunn) = st.tunn.get() else { return };
        let authentic = match tunn.decapsulate(Some(src.ip()), d, buf) {
            TunnResult::WriteToNetwork(reply) => {
                out.push_control(src, reply);
                true
            }
            TunnResult::Done => true,
            TunnResult::Err(_) => {
                tally.count_drop(DropReason::NotAuthentic);
                false
            }
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => false,
        };
        // A cookie reply proves nothing about where the peer is; handshakes do.
        if authentic && !cookie_reply {
            roam(found.peer, &mut st.endpoint, src);
        }
        drain(tunn, st.endpoint, buf, out);
    }
}

/// The peer whose lock is held while a message's data datagrams are opened.
struct Held<'a> {
    slot: usize,
    peer: &'a Arc<WgPeer>,
    st: std::sync::MutexGuard<'a, PeerState>,
    authentic: bool,
}

/// Releases the lock (moving the endpoint if the peer roamed), then delivers what was opened.
fn release<F>(
    held: &mut Option<Held<'_>>,
    sc: &mut RxScratch,
    src: SocketAddr,
    tally: &mut Tally,
    deliver: &mut F,
) where
    F: FnMut(&[u8], &mut Tally),
{
    if let Some(mut h) = held.take() {
        if h.authentic {
            roam(h.peer, &mut h.st.endpoint, src);
        }
    }
    for &(off, len) in &sc.pkts {
        if let Some(p) = sc.plain.get(off..off + len) {
            deliver(p, tally);
        }
    }
    sc.pkts.clear();
    sc.used = 0;
}

impl Codec for WgCodec {
    type Route = Arc<WgPeer>;
    type TxScratch = TxScratch;
    type RxScratch = RxScratch;

    // WireGuard is an interface, not a router hop: the kernel already decremented the TTL
    // when it routed the packet into flannel-wg.
    const DECREMENT_TTL: bool = false;

    // Every delivered packet passed its Poly1305 tag.
    const DELIVERS_INTACT: bool = true;

    // A WireGuard peer answers to where our packets come from (roaming): send from the port
    // we listen on.
    const SEND_FROM_QUEUE_PORTS: bool = false;

    fn tx_scratch(&self) -> TxScratch {
        // Segments of a 64 KiB super-packet fill at most 2 x 64 KiB (see the pump), plus
        // 32 bytes per segment (at most one per 41 bytes) and one handshake initiation.
        TxScratch {
            sealed: vec![0; 4 * crate::io::TUN_READ_BUF_LEN],
            ctl: vec![0; HANDSHAKE_INIT_LEN],
        }
    }

    fn rx_scratch(&self) -> RxScratch {
        RxScratch {
            plain: vec![0; 65_536],
            used: 0,
            pkts: Vec::with_capacity(MAX_PKTS),
            ctl: vec![0; CTL_BUF_LEN],
        }
    }

    fn same_route(&self, a: &Arc<WgPeer>, b: &Arc<WgPeer>) -> bool {
        Arc::ptr_eq(a, b)
    }

    fn route(&self, dst: IpAddr) -> Option<Arc<WgPeer>> {
        self.table.load().route(dst).map(|f| f.peer.clone())
    }

    fn transmit<'a>(
        &self,
        sc: &'a mut TxScratch,
        peer: Arc<WgPeer>,
        segs: &[u8],
        seg_len: usize,
        out: &mut Outbox,
        tally: &mut Tally,
    ) -> Result<Option<Transmit<'a>>, DropReason> {
        let mut sealed_len = 0;
        let mut initiated = false;
        let to = {
            let mut guard = peer.lock();
            let st = &mut *guard;
            let to = st.endpoint;
            let Some(tunn) = st.tunn.get() else {
                return Err(DropReason::NoRoute);
            };
            let mut queued = false;
            for seg in segs.chunks(seg_len.max(1)) {
                // boringtun panics on a short buffer: make sure, though the size rules it out.
                let Some(dst) = sc
                    .sealed
                    .get_mut(sealed_len..)
                    .filter(|b| b.len() >= (seg.len() + DATA_OVERHEAD).max(HANDSHAKE_INIT_LEN))
                else {
                    tally.count_drop(DropReason::Malformed);
                    continue;
                };
                match tunn.encapsulate(seg, dst) {
                    TunnResult::WriteToNetwork(out)
                        if out.len() == seg.len() + DATA_OVERHEAD
                            && message_type(out) == Some(DATA) =>
                    {
                        sealed_len += out.len();
                    }
                    // No session yet: boringtun queued the packet and asks us to send a
                    // handshake initiation (once; later packets queue silently).
                    TunnResult::WriteToNetwork(init) => {
                        queued = true;
                        initiated = true;
                        out.push_control(to, init);
                    }
                    TunnResult::Done => queued = true,
                    TunnResult::Err(_) => tally.count_drop(DropReason::IoError),
                    TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
                }
            }
            if queued {
                // Packets wait for a session. boringtun retries an unanswered initiation only
                // after 5 s (REKEY_TIMEOUT); with traffic waiting, one lost initiation (say our
                // greeting, sent before the peer knew us) should not stall it that long.
                let now = Instant::now();
                if !initiated && st.last_init.is_none_or(|t| now - t >= RETRY_INIT) {
                    if let TunnResult::WriteToNetwork(init) =
                        tunn.format_handshake_initiation(&mut sc.ctl, true)
                    {
                        out.push_control(to, init);
                        initiated = true;
                    }
                }
                if initiated {
                    st.last_init = Some(now);
                }
            }
            to
        };
        // Empty when everything was queued behind a handshake.
        Ok(sc
            .sealed
            .get(..sealed_len)
            .filter(|data| !data.is_empty())
            .map(|data| Transmit {
                to,
                data,
                seg_len: seg_len + DATA_OVERHEAD,
            }))
    }

    fn receive<F>(
        &self,
        sc: &mut RxScratch,
        msg: &RecvMsg<'_>,
        out: &mut Outbox,
        tally: &mut Tally,
        mut deliver: F,
    ) where
        F: FnMut(&[u8], &mut Tally),
    {
        let src = msg.source();
        let table = self.table.load();
        let mut held: Option<Held<'_>> = None;
        for d in msg.datagrams() {
            let Some(kind) = message_type(d) else {
                tally.count_drop(DropReason::Malformed);
                continue;
            };
            if kind != DATA {
                release(&mut held, sc, src, tally, &mut deliver);
                self.control(&table, d, src, &mut sc.ctl, out, tally);
                continue;
            }
            let Some(found) = receiver_index(d).and_then(|i| table.by_receiver(i)) else {
                tally.count_drop(DropReason::UnknownSender);
                continue;
            };
            let room = sc.plain.len().saturating_sub(sc.used);
            if held.as_ref().is_some_and(|h| h.slot != found.slot)
                || room < d.len()
                || sc.pkts.len() == sc.pkts.capacity()
            {
                release(&mut held, sc, src, tally, &mut deliver);
            }
            let h = held.get_or_insert_with(|| Held {
                slot: found.slot,
                peer: found.peer,
                st: found.peer.lock(),
                authentic: false,
            });
            let Some(tunn) = h.st.tunn.get() else {
                continue;
            };
            // `release` emptied the buffer if this datagram did not fit: it always fits now
            // (a message is at most 64 KiB and opening only shrinks it).
            let Some(dst) = sc.plain.get_mut(sc.used..).filter(|b| b.len() >= d.len()) else {
                tally.count_drop(DropReason::Malformed);
                continue;
            };
            let opened = match tunn.decapsulate(Some(src.ip()), d, dst) {
                TunnResult::WriteToTunnelV4(p, inner_src) => Some((p.len(), inner_src.into())),
                TunnResult::WriteToTunnelV6(p, inner_src) => Some((p.len(), inner_src.into())),
                // A keepalive.
                TunnResult::Done => {
                    h.authentic = true;
                    None
                }
                TunnResult::WriteToNetwork(p) => {
                    out.push_control(src, p);
                    None
                }
                // Not sealed with this peer's current keys (forged, corrupted, wrong key, stale
                // session: InvalidAeadTag, NoCurrentSession, WrongIndex) or a replay
                // (DuplicateCounter, InvalidCounter: already seen, or behind the counter
                // window): not from the peer as far as we can tell.
                TunnResult::Err(_) => {
                    tally.count_drop(DropReason::NotAuthentic);
                    None
                }
            };
            if let Some((len, inner_src)) = opened {
                // Authentic; WireGuard's cryptokey routing then asks whether this peer may send
                // from that address (a subnet of its lease, of the packet's own family).
                h.authentic = true;
                if table.allows(h.slot, inner_src) {
                    sc.pkts.push((sc.used, len));
                    sc.used += len;
                } else {
                    tally.count_drop(DropReason::SpoofedSource);
                }
            }
        }
        release(&mut held, sc, src, tally, &mut deliver);
    }
}
