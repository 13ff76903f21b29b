//! WireGuard as a pump codec: our handshake (`handshake`), sessions (`session`) and timers
//! (`peers`), with the cookie gate (`cookie`) vetting handshake messages.
//!
//! Sans-I/O: the codec holds no socket. What must be sent comes back to the pump as a
//! [`Transmit`] or in an [`Outbox`], and the pump sends it after the codec returned.
//!
//! Send: the pump hands over one super-packet's segments, each cut into a slot with room for
//! the 16-byte header before it and its padding and 16-byte tag after (`slot_len`), so at a
//! fixed stride. Under the peer's lock, briefly, we take the session and reserve one counter per
//! segment; then, lock released, each is sealed where it lies (ChaCha20-Poly1305) and the run
//! is returned whole, so that it leaves in one UDP GSO send.
//! Every queue's sender thread seals its own runs at once; counters interleave between them,
//! which the receiver's replay window takes (it holds 8,128 counters), and each flow, kept to
//! one queue, stays in order. The bound: a run that reaches the wire more than 8,128 counters
//! after a later-reserved one (its thread descheduled between reserving and sending while the
//! others send ~11 MB) is dropped as replays by the receiver, and peers with smaller windows
//! (boringtun's 1,024) drop sooner. The kernel and wireguard-go avoid it with an ordered
//! per-peer send queue; we accept the rare loss (the namespace test with eight queues on two
//! cores saw none) rather than pass every packet through one queue.
//!
//! Receive: a message from `recvmmsg` holds one sender's datagrams (UDP GRO merged them). Each
//! data message is opened in place, in the pump's receive buffer, with the session its
//! receiver index names, outside any lock, then handed to the pump (GRO, TUN). A packet is
//! accepted only if it authenticates, is not a replay, and its inner source lies in that
//! peer's AllowedIPs. Handshake messages pass the cookie gate (`cookie`: mac1, then under load
//! mac2 or a cookie reply, then a share per proven source) before any Diffie-Hellman is spent
//! on them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use zeroize::Zeroize;

use super::cookie::{CookieGate, Verdict};
use super::crypto::hash;
use super::handshake::{
    self, get_u32, Local, COOKIE_REPLY, COOKIE_REPLY_LEN, INIT, INIT_LEN, RESPONSE, RESPONSE_LEN,
};
use super::keys::{random_key, StaticKeys};
use super::peers::{Due, PeerState, WgPeer, WgTable};
use super::session::{OpenError, Session, DATA, DATA_HEADER, TAG_LEN};
use crate::backend::pump::{Codec, Outbox, Packets, Transmit};
use crate::io::RecvMsgMut;
use crate::stats::{DropReason, Tally};

/// Data message: type, receiver index, counter (16 bytes), then the sealed packet and its tag.
pub(super) const DATA_OVERHEAD: usize = DATA_HEADER + TAG_LEN;

pub(super) struct WgCodec {
    pub table: ArcSwap<WgTable>,
    pub local: Local,
    /// What handshake messages pass before any work is spent on them.
    gate: CookieGate,
    /// Threads that help a receiver thread open a large message (many-core machines only).
    open_pool: Option<rayon_core::ThreadPool>,
    /// The device's MTU: packets are padded up to it at most.
    mtu: usize,
}

/// The MTU a codec pads up to until told its device's (Flannel's on a 1,500-byte underlay).
const DEFAULT_MTU: usize = 1420;

/// A message holding at least this many data messages is opened on the pool too.
const PARALLEL_MIN: usize = 16;
/// Data messages per job on the pool (the receiver thread claims jobs too).
const PER_JOB: usize = 8;

pub(super) struct RxScratch {
    /// (offset, length) in the message being processed of each opened packet to deliver
    /// (at its data message's offset + 16).
    pkts: Vec<(usize, usize)>,
}

/// Most packets one message can hold: 64 KiB of the smallest data messages (32 bytes).
const MAX_PKTS: usize = 65_536 / DATA_OVERHEAD;

/// The message type, checked like WireGuard does (the three reserved bytes must be zero).
fn message_type(d: &[u8]) -> Option<u8> {
    let t = u32::from_le_bytes(d.get(..4)?.try_into().ok()?);
    let t = u8::try_from(t).ok()?;
    let ok = match t {
        INIT => d.len() == INIT_LEN,
        RESPONSE => d.len() == RESPONSE_LEN,
        COOKIE_REPLY => d.len() == COOKIE_REPLY_LEN,
        DATA => d.len() >= DATA_OVERHEAD,
        _ => false,
    };
    ok.then_some(t)
}

/// A data message from `src` authenticated: WireGuard then sends to where it came from.
/// Returns where the peer was if that moved it: the caller logs it once the peer's lock is
/// released (a log write is a syscall that can block on a slow log reader, and every sender
/// thread takes that lock for each batch to this peer).
fn roam(endpoint: &mut SocketAddr, src: SocketAddr) -> Option<SocketAddr> {
    (*endpoint != src).then(|| std::mem::replace(endpoint, src))
}

fn log_roam(peer: &WgPeer, from: Option<SocketAddr>, to: SocketAddr) {
    if let Some(from) = from {
        tracing::info!(
            peer = %super::keys::encode_key(&peer.public_key),
            %from,
            %to,
            "WireGuard peer roamed"
        );
    }
}

/// The inner packet's source and its length by its own header (WireGuard pads to 16 bytes:
/// the padding goes). `None`: not an IP packet that fits.
fn inner_packet(p: &[u8]) -> Option<(IpAddr, usize)> {
    match p.first()? >> 4 {
        4 if p.len() >= 20 => {
            let len = usize::from(u16::from_be_bytes([p[2], p[3]]));
            let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
            (20..=p.len()).contains(&len).then_some((src.into(), len))
        }
        6 if p.len() >= 40 => {
            let len = 40 + usize::from(u16::from_be_bytes([p[4], p[5]]));
            let mut a = [0u8; 16];
            a.copy_from_slice(&p[8..24]);
            (len <= p.len()).then_some((Ipv6Addr::from(a).into(), len))
        }
        _ => None,
    }
}

/// How long a packet of `len` bytes is once padded (whitepaper §5.4.6): to a multiple of 16,
/// so that the exact lengths of packets do not show on the wire, but not beyond the device's
/// MTU (a packet that long as it is stays as it is).
pub(super) fn padded_len(len: usize, mtu: usize) -> usize {
    len.next_multiple_of(16).min(mtu.max(len))
}

/// Seals `pkts` (each a whole packet) with `s`, each into the outbox as its own datagram.
fn seal_each<'a>(
    s: &Session,
    pkts: impl Iterator<Item = &'a [u8]>,
    mtu: usize,
    to: SocketAddr,
    out: &mut Outbox,
) {
    let mut buf = Vec::new();
    for p in pkts {
        let Some(counter) = s.reserve(1) else { return };
        buf.clear();
        buf.resize(padded_len(p.len(), mtu) + DATA_OVERHEAD, 0);
        buf[DATA_HEADER..DATA_HEADER + p.len()].copy_from_slice(p);
        if s.seal(counter, &mut buf) {
            out.push_packet(to, &buf);
        }
    }
}

/// A keepalive (an empty data message) on `s`. Not data: the peer owes no answer to it.
fn send_keepalive(s: &Session, st: &mut PeerState, now: Instant, out: &mut Outbox) {
    seal_each(s, std::iter::once(&[][..]), 0, st.endpoint, out);
    st.last_sent = Some(now);
    st.unacked_since = None;
}

impl WgCodec {
    pub fn new(keys: StaticKeys) -> Self {
        // The cookie secrets only need to be unknowable to others: derived from our private
        // key, with fresh randomness mixed in when there is any.
        let mut private = keys.secret.to_bytes();
        let salt = random_key().unwrap_or_else(|e| {
            tracing::warn!(
                "no random bytes for the cookie secret ({e}): derived from the private key alone"
            );
            [0; 32]
        });
        let secret = hash(&[b"flanneld-rs cookie secret", &private, &salt]);
        let nonce_key = hash(&[b"flanneld-rs cookie nonce", &private, &salt]);
        private.zeroize();
        let gate = CookieGate::new(keys.public.as_bytes(), secret, nonce_key, Instant::now());
        WgCodec {
            table: ArcSwap::from_pointee(WgTable::default()),
            local: Local::new(keys.secret),
            gate,
            open_pool: None,
            mtu: DEFAULT_MTU,
        }
    }

    /// The MTU of the device the codec serves (padding never goes beyond it).
    pub fn with_mtu(mut self, mtu: usize) -> Self {
        self.mtu = mtu;
        self
    }

    /// Lets `threads` threads (named `<name>-open<i>`) help open large messages: all of one
    /// peer's datagrams reach one socket (WireGuard answers to the port it hears from, so
    /// queues cannot send from ports of their own), hence one receiver thread, which alone
    /// would open a peer's traffic on one core. 0: none. A pool that cannot start is logged
    /// and done without.
    pub fn with_open_threads(mut self, threads: usize, name: &str) -> Self {
        if threads == 0 {
            return self;
        }
        let name = name.to_owned();
        match rayon_core::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(move |i| format!("{name}-open{i}"))
            .build()
        {
            Ok(pool) => self.open_pool = Some(pool),
            Err(e) => tracing::warn!("no threads to help open WireGuard messages: {e}"),
        }
        self
    }

    /// Sends an initiation to the peer (into `out`): those the timer sends count as sent
    /// packets, as its keepalives do; those prompted by traffic as control messages.
    fn initiate(
        &self,
        peer: &WgPeer,
        st: &mut PeerState,
        now: Instant,
        out: &mut Outbox,
        on_timer: bool,
    ) {
        let mut msg = [0u8; INIT_LEN];
        if st.initiate(&self.local, peer, now, &mut msg).is_some() {
            if on_timer {
                out.push_packet(st.endpoint, &msg);
            } else {
                out.push_control(st.endpoint, &msg);
            }
        }
    }

    /// Timers of every peer (handshake retries, rekeying, keepalives, session expiry), due
    /// sends (into `out`), packets given up with their handshake (into `tally`), and the
    /// cookie gate's per-second count. Called every 100-250 ms.
    pub fn tick(&self, out: &mut Outbox, tally: &mut Tally) {
        let now = Instant::now();
        self.gate.tick(now);
        let table = self.table.load();
        for peer in table.peers() {
            let mut st = peer.lock();
            let due = if peer.greet.swap(false, Ordering::Relaxed) {
                Due::Initiate
            } else {
                st.timers(now, peer.keepalive)
            };
            tally.count_drops(DropReason::NoHandshake, st.take_given_up());
            match due {
                Due::Initiate => self.initiate(peer, &mut st, now, out, true),
                Due::Keepalive => {
                    if let Some(s) = st.sending(now) {
                        send_keepalive(&s, &mut st, now, out);
                        if st.rekey_due(&s, now) {
                            self.initiate(peer, &mut st, now, out, true);
                        }
                    } else if st.pending.is_none() {
                        self.initiate(peer, &mut st, now, out, true);
                    }
                }
                Due::Nothing => {}
            }
        }
    }

    /// A handshake message or cookie reply: vetted by the cookie gate, then handed to the
    /// peer it is for. Replies go back to where it came from.
    fn control(
        &self,
        table: &WgTable,
        d: &[u8],
        src: SocketAddr,
        out: &mut Outbox,
        tally: &mut Tally,
    ) {
        let now = Instant::now();
        match message_type(d) {
            Some(COOKIE_REPLY) => self.cookie_reply(table, d, now, tally),
            Some(kind @ (INIT | RESPONSE)) => match self.gate.check(d, src, now) {
                Verdict::Pass if kind == INIT => self.initiation(table, d, src, now, out, tally),
                Verdict::Pass => self.response(table, d, src, now, out, tally),
                Verdict::CookieReply(cookie) => {
                    // Under load: prove your address first (WireGuard's cookie reply). The
                    // message itself is dropped unread.
                    out.push_control(src, &cookie);
                    tally.count_drop(DropReason::UnknownSender);
                }
                Verdict::Drop => tally.count_drop(DropReason::UnknownSender),
            },
            Some(_) => tally.count_drop(DropReason::Malformed),
            None => tally.count_drop(DropReason::Malformed),
        }
    }

    fn initiation(
        &self,
        table: &WgTable,
        d: &[u8],
        src: SocketAddr,
        now: Instant,
        out: &mut Outbox,
        tally: &mut Tally,
    ) {
        let Ok(msg) = <&[u8; INIT_LEN]>::try_from(d) else {
            return tally.count_drop(DropReason::Malformed);
        };
        // Which peer is it? The initiator's static key, decrypted with ours.
        let Ok(opened) = handshake::open_init(&self.local, msg) else {
            return tally.count_drop(DropReason::UnknownSender);
        };
        let Some(found) = table.by_key(&opened.peer_static) else {
            return tally.count_drop(DropReason::UnknownSender);
        };
        let peer = found.peer;
        let Ok(init) = opened.finish(&peer.remote) else {
            return tally.count_drop(DropReason::NotAuthentic);
        };
        // A replayed initiation (not newer than the last) or a flood of them: authentic bytes,
        // but answering would reset the session for nothing.
        let fresh = |st: &PeerState| {
            init.timestamp > st.last_timestamp
                && st
                    .last_init_received
                    .is_none_or(|t| now.saturating_duration_since(t) >= super::peers::INIT_FLOOD)
        };
        let (index, cookie) = {
            let mut st = peer.lock();
            if !fresh(&st) {
                return tally.count_drop(DropReason::NotAuthentic);
            }
            (st.responder_index(peer.index), st.fresh_cookie(now))
        };
        let Ok(key) = super::keys::random_key() else {
            return tally.count_drop(DropReason::IoError);
        };
        // The Diffie-Hellman work happens outside the peer's lock, which the packet threads
        // take for every batch.
        let mut resp = [0u8; RESPONSE_LEN];
        let ephemeral = boringtun::x25519::StaticSecret::from(key);
        let Ok((keys, mac1)) = handshake::respond(
            &peer.remote,
            &init,
            index,
            ephemeral,
            cookie.as_ref(),
            &mut resp,
        ) else {
            return tally.count_drop(DropReason::NotAuthentic);
        };
        let mut st = peer.lock();
        // Another thread may have taken a newer initiation meanwhile.
        if !fresh(&st) {
            return tally.count_drop(DropReason::NotAuthentic);
        }
        if st.established(&keys, now).is_none() {
            return tally.count_drop(DropReason::IoError);
        }
        st.answered = Some((index, mac1));
        st.last_timestamp = init.timestamp;
        st.last_init_received = Some(now);
        st.heard(false, now);
        let roamed = roam(&mut st.endpoint, src);
        st.last_sent = Some(now);
        drop(st);
        log_roam(peer, roamed, src);
        out.push_control(src, &resp);
    }

    fn response(
        &self,
        table: &WgTable,
        d: &[u8],
        src: SocketAddr,
        now: Instant,
        out: &mut Outbox,
        tally: &mut Tally,
    ) {
        let Ok(msg) = <&[u8; RESPONSE_LEN]>::try_from(d) else {
            return tally.count_drop(DropReason::Malformed);
        };
        let receiver = get_u32(msg, 8);
        let Some(found) = table.by_receiver(receiver) else {
            return tally.count_drop(DropReason::UnknownSender);
        };
        let peer = found.peer;
        // The handshake it answers, if still ours; checked outside the lock (anyone can send
        // a response with a valid mac1 and a guessed index: two Diffie-Hellmans each).
        let Some(sent) = peer
            .lock()
            .pending
            .as_ref()
            .and_then(|p| p.answers(receiver).cloned())
        else {
            return tally.count_drop(DropReason::NotAuthentic);
        };
        let Ok(keys) = handshake::consume_response(&self.local, &peer.remote, &sent, msg) else {
            return tally.count_drop(DropReason::NotAuthentic);
        };
        let mut st = peer.lock();
        if !st
            .pending
            .as_ref()
            .and_then(|p| p.answers(receiver))
            .is_some_and(|s| Arc::ptr_eq(s, &sent))
        {
            // Answered twice, or a newer initiation replaced it meanwhile.
            return tally.count_drop(DropReason::NotAuthentic);
        }
        let Some(s) = st.established(&keys, now) else {
            return tally.count_drop(DropReason::IoError);
        };
        st.heard(false, now);
        let roamed = roam(&mut st.endpoint, src);
        // What waited for the session goes now; with nothing waiting, a keepalive confirms the
        // keys to the responder (it may not send before it hears from us on them).
        let staged = std::mem::take(&mut st.staged);
        if staged.is_empty() {
            send_keepalive(&s, &mut st, now, out);
        } else {
            seal_each(
                &s,
                staged.iter().map(Vec::as_slice),
                self.mtu,
                st.endpoint,
                out,
            );
            st.sent_data(now);
        }
        drop(st);
        log_roam(peer, roamed, src);
    }

    fn cookie_reply(&self, table: &WgTable, d: &[u8], now: Instant, tally: &mut Tally) {
        let Ok(msg) = <&[u8; COOKIE_REPLY_LEN]>::try_from(d) else {
            return tally.count_drop(DropReason::Malformed);
        };
        let receiver = get_u32(msg, 4);
        let Some(found) = table.by_receiver(receiver) else {
            return tally.count_drop(DropReason::UnknownSender);
        };
        let mut st = found.peer.lock();
        // A reply to our initiation or to our response: sealed with the mac1 that carried.
        let ours = st.pending.as_ref().and_then(|p| p.answers(receiver));
        let mac1 = match (ours, st.answered) {
            (Some(sent), _) => sent.mac1,
            (None, Some((index, mac1))) if index == receiver => mac1,
            _ => return tally.count_drop(DropReason::NotAuthentic),
        };
        let cookie = handshake::open_cookie(&found.peer.remote, &mac1, msg);
        match cookie {
            // It proves nothing about where the peer is: no roaming. The retry (on the timer)
            // carries mac2.
            Ok(c) => st.cookie = Some((c, now)),
            Err(_) => tally.count_drop(DropReason::NotAuthentic),
        }
    }
}

/// The session a run of data messages is opened with, and what they showed.
struct Held<'a> {
    slot: usize,
    peer: &'a Arc<WgPeer>,
    session: Arc<Session>,
    unconfirmed: bool,
    authentic: bool,
    data: bool,
}

impl WgCodec {
    /// Records what the held session's messages showed (under the peer's lock, once per
    /// run), then delivers what was opened.
    #[allow(clippy::too_many_arguments)]
    fn release<F>(
        &self,
        held: &mut Option<Held<'_>>,
        sc: &mut RxScratch,
        opened: &[u8],
        src: SocketAddr,
        out: &mut Outbox,
        tally: &mut Tally,
        deliver: &mut F,
    ) where
        F: FnMut(&[u8], &mut Tally),
    {
        if let Some(h) = held.take() {
            if h.authentic {
                let now = Instant::now();
                let mut st = h.peer.lock();
                let roamed = roam(&mut st.endpoint, src);
                if h.unconfirmed {
                    // We answered its handshake; what waited for a session goes with it now.
                    let staged = st.confirm(h.session.local_index);
                    if !staged.is_empty() {
                        seal_each(
                            &h.session,
                            staged.iter().map(Vec::as_slice),
                            self.mtu,
                            st.endpoint,
                            out,
                        );
                        st.sent_data(now);
                    }
                }
                st.heard(h.data, now);
                drop(st);
                log_roam(h.peer, roamed, src);
            }
        }
        for &(off, len) in &sc.pkts {
            if let Some(p) = opened.get(off..off + len) {
                deliver(p, tally);
            }
        }
        sc.pkts.clear();
    }
}

/// Opens `work` (data messages where they were received) with `session`, leaving the replay
/// window to the caller.
fn open_all(session: &Session, work: &mut [Opening<'_>]) {
    for w in work {
        w.result = session.open_unchecked(w.buf);
    }
}

/// One data message of a message opened in parallel, and where it starts in the message.
struct Opening<'a> {
    at: usize,
    buf: &'a mut [u8],
    result: Result<(u64, usize), OpenError>,
}

impl WgCodec {
    /// The receive path for a large message of one session's data messages only (what UDP
    /// GRO makes of bulk traffic): opened where they lie in jobs of PER_JOB on the pool and
    /// on this thread at once, then checked in order (replay window, AllowedIPs) and
    /// delivered in order. `false`: not such a message (or no pool), nothing done.
    #[allow(clippy::too_many_arguments)]
    fn receive_parallel<F>(
        &self,
        sc: &mut RxScratch,
        msg: &mut RecvMsgMut<'_>,
        table: &WgTable,
        out: &mut Outbox,
        tally: &mut Tally,
        deliver: &mut F,
    ) -> bool
    where
        F: FnMut(&[u8], &mut Tally),
    {
        let Some(pool) = &self.open_pool else {
            return false;
        };
        let view = msg.view();
        let (src, step) = (view.source(), view.datagram_len());
        let (mut count, mut index) = (0, None);
        for d in view.datagrams() {
            if message_type(d) != Some(DATA) || *index.get_or_insert(get_u32(d, 4)) != get_u32(d, 4)
            {
                return false;
            }
            count += 1;
        }
        let Some(index) = index else { return false };
        if count < PARALLEL_MIN || count > sc.pkts.capacity() {
            return false;
        }
        // Unknown or stale indexes take the one-by-one path, which counts them.
        let Some(found) = table.by_receiver(index) else {
            return false;
        };
        let Some((session, unconfirmed)) = found.peer.lock().by_index(index, Instant::now()) else {
            return false;
        };
        let mut work: Vec<Opening<'_>> = msg
            .data_mut()
            .chunks_mut(step)
            .enumerate()
            .map(|(i, buf)| Opening {
                at: i * step,
                buf,
                result: Err(OpenError::NotAuthentic),
            })
            .collect();
        // Jobs are claimed, by the helpers and by this thread alike, until none is left: this
        // thread works rather than waits, and a helper slow to wake takes fewer.
        let helpers = pool.current_num_threads().min(count.div_ceil(PER_JOB) - 1);
        let jobs = std::sync::Mutex::new(work.chunks_mut(PER_JOB));
        let claim = || jobs.lock().unwrap_or_else(|e| e.into_inner()).next();
        let open_claimed = || {
            while let Some(job) = claim() {
                open_all(&session, job);
            }
        };
        pool.in_place_scope(|scope| {
            for _ in 0..helpers {
                scope.spawn(|_| open_claimed());
            }
            open_claimed();
        });
        let (mut authentic, mut data) = (false, false);
        for w in &work {
            let Ok((counter, len)) = w.result else {
                tally.count_drop(DropReason::NotAuthentic);
                continue;
            };
            if !session.accept(counter) {
                tally.count_drop(DropReason::NotAuthentic);
                continue;
            }
            authentic = true;
            if len == 0 {
                continue;
            }
            data = true;
            match inner_packet(&w.buf[DATA_HEADER..DATA_HEADER + len]) {
                Some((inner_src, len)) if table.allows(found.slot, inner_src) => {
                    sc.pkts.push((w.at + DATA_HEADER, len));
                }
                Some(_) => tally.count_drop(DropReason::SpoofedSource),
                None => tally.count_drop(DropReason::Malformed),
            }
        }
        drop(work);
        let mut held = Some(Held {
            slot: found.slot,
            peer: found.peer,
            session,
            unconfirmed,
            authentic,
            data,
        });
        self.release(&mut held, sc, msg.view().data(), src, out, tally, deliver);
        true
    }
}

impl Codec for WgCodec {
    type Route = Arc<WgPeer>;
    type TxScratch = ();
    type RxScratch = RxScratch;

    // WireGuard is an interface, not a router hop: the kernel already decremented the TTL
    // when it routed the packet into flannel-wg.
    const DECREMENT_TTL: bool = false;

    // Every delivered packet passed its Poly1305 tag.
    const DELIVERS_INTACT: bool = true;

    // A WireGuard peer answers to where our packets come from (roaming): send from the port
    // we listen on.
    const SEND_FROM_QUEUE_PORTS: bool = false;

    // The data message header goes before each packet, padding and tag after.
    const HEADROOM: usize = DATA_HEADER;

    // A slot is at most 80 bytes for a 41-byte packet (a TCP segment's headers and one byte),
    // under twice the packed size: twice the pump's default.
    const TX_BUF_LEN: usize = 4 * crate::io::TUN_READ_BUF_LEN;

    fn slot_len(&self, len: usize) -> usize {
        padded_len(len, self.mtu) + DATA_OVERHEAD
    }

    fn tx_scratch(&self) {}

    fn rx_scratch(&self) -> RxScratch {
        RxScratch {
            pkts: Vec::with_capacity(MAX_PKTS),
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
        _: &'a mut (),
        peer: Arc<WgPeer>,
        pkts: Packets<'a>,
        out: &mut Outbox,
        tally: &mut Tally,
    ) -> Result<Option<Transmit<'a>>, DropReason> {
        let Packets {
            buf,
            count,
            len,
            last_len,
        } = pkts;
        // Every packet but the last is `len` long, so all but the last slot are `stride`.
        let stride = self.slot_len(len);
        let packet_len = |i: usize| if i + 1 == count { last_len } else { len };
        let now = Instant::now();
        let (to, session, first) = {
            let mut st = peer.lock();
            let reserved = st
                .sending(now)
                .and_then(|s| Some((s.reserve(count as u64)?, s)));
            let Some((first, s)) = reserved else {
                // No session yet (or it is spent): the packets wait for a handshake.
                for i in 0..count {
                    let at = i * stride + DATA_HEADER;
                    let staged = buf.get(at..at + packet_len(i)).is_some_and(|p| st.stage(p));
                    // Beyond MAX_STAGED the oldest goes (counted as sent when it was staged).
                    if !staged {
                        tally.count_drop(DropReason::NoHandshake);
                    }
                }
                if st.retry_due(now) {
                    self.initiate(&peer, &mut st, now, out, false);
                }
                return Ok(None);
            };
            if st.rekey_due(&s, now) {
                self.initiate(&peer, &mut st, now, out, false);
            }
            st.sent_data(now);
            (st.endpoint, s, first)
        };
        // Lock released: seal each packet in its slot, in counter order.
        let (mut sealed, mut done) = (0, 0);
        for i in 0..count {
            let len = packet_len(i);
            let Some(msg) = buf.get_mut(sealed..sealed + self.slot_len(len)) else {
                break;
            };
            let tag_at = msg.len().saturating_sub(TAG_LEN);
            if let Some(pad) = msg.get_mut(DATA_HEADER + len..tag_at) {
                pad.fill(0);
            }
            // Fails closed: nothing from an unsealed slot on is sent.
            if !session.seal(first + i as u64, msg) {
                break;
            }
            sealed += msg.len();
            done += 1;
        }
        // Unreachable with the pump's slots; counted rather than sent unsealed (by the pump
        // when none was sealed, which then counts none as sent).
        if done == 0 {
            return Err(DropReason::Malformed);
        }
        for _ in done..count {
            tally.count_drop(DropReason::Malformed);
        }
        Ok(buf.get(..sealed).map(|data| Transmit {
            to,
            data,
            seg_len: stride,
        }))
    }

    fn receive<F>(
        &self,
        sc: &mut RxScratch,
        msg: &mut RecvMsgMut<'_>,
        out: &mut Outbox,
        tally: &mut Tally,
        mut deliver: F,
    ) where
        F: FnMut(&[u8], &mut Tally),
    {
        let table = self.table.load();
        if self.receive_parallel(sc, msg, &table, out, tally, &mut deliver) {
            return;
        }
        let (src, step) = (msg.view().source(), msg.view().datagram_len());
        // Each datagram is opened where it lies; what was opened is delivered from there.
        let data = msg.data_mut();
        let mut held: Option<Held<'_>> = None;
        let mut next = 0;
        while next < data.len() {
            let at = next;
            next = (at + step).min(data.len());
            let d = &data[at..next];
            let Some(kind) = message_type(d) else {
                tally.count_drop(DropReason::Malformed);
                continue;
            };
            if kind != DATA {
                self.release(&mut held, sc, data, src, out, tally, &mut deliver);
                self.control(&table, d, src, out, tally);
                continue;
            }
            let index = get_u32(d, 4);
            let Some(found) = table.by_receiver(index) else {
                tally.count_drop(DropReason::UnknownSender);
                continue;
            };
            let same = held
                .as_ref()
                .is_some_and(|h| h.slot == found.slot && h.session.local_index == index);
            if !same || sc.pkts.len() == sc.pkts.capacity() {
                self.release(&mut held, sc, data, src, out, tally, &mut deliver);
                // The session the index names: current, previous, or the one we answered.
                let Some((session, unconfirmed)) =
                    found.peer.lock().by_index(index, Instant::now())
                else {
                    // A session we no longer have (expired, replaced, or never ours).
                    tally.count_drop(DropReason::NotAuthentic);
                    continue;
                };
                held = Some(Held {
                    slot: found.slot,
                    peer: found.peer,
                    session,
                    unconfirmed,
                    authentic: false,
                    data: false,
                });
            }
            let Some(h) = held.as_mut() else { continue };
            let buf = &mut data[at..next];
            let len = match h.session.open(buf) {
                Ok(len) => len,
                // Not sealed with this session's keys (forged, corrupted, wrong key) or a
                // replay (already seen, or behind the counter window).
                Err(OpenError::NotAuthentic | OpenError::Replayed) => {
                    tally.count_drop(DropReason::NotAuthentic);
                    continue;
                }
            };
            h.authentic = true;
            if len == 0 {
                // A keepalive.
                continue;
            }
            h.data = true;
            let plain = &buf[DATA_HEADER..DATA_HEADER + len];
            // WireGuard's cryptokey routing then asks whether this peer may send from that
            // address (a subnet of its lease, of the packet's own family).
            match inner_packet(plain) {
                Some((inner_src, len)) if table.allows(h.slot, inner_src) => {
                    sc.pkts.push((at + DATA_HEADER, len));
                }
                Some(_) => tally.count_drop(DropReason::SpoofedSource),
                None => tally.count_drop(DropReason::Malformed),
            }
        }
        self.release(&mut held, sc, data, src, out, tally, &mut deliver);
    }
}
