//! The codec end to end over an in-memory network (no sockets, no privileges): handshake,
//! batches, replay, spoofed inner sources, unknown keys, garbage and the cookie gate's cookie
//! replies. What a codec asks to send is delivered as the kernel would with UDP GRO on: a run as
//! one merged message, each outbox datagram on its own.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use super::codec::{padded_len, RxScratch, WgCodec, DATA_OVERHEAD};
use super::cookie::HANDSHAKE_RATE_LIMIT;
use super::keys::{random_key, StaticKeys};
use super::peers::{WgPeer, WgTable, MAX_STAGED, RETRY_INIT};
use crate::backend::pump::{Codec, Outbox, Packets, Transmit};
use crate::io::RecvMsgMut;
use crate::stats::{DropReason, Tally};

/// One received message: sender, bytes, GRO segment size.
type Message = (SocketAddr, Vec<u8>, Option<u16>);

/// The network between the nodes: what waits for each address.
#[derive(Clone, Default)]
struct Lan(Rc<RefCell<HashMap<SocketAddr, VecDeque<Message>>>>);

impl Lan {
    fn post(&self, from: SocketAddr, to: SocketAddr, data: &[u8], gro: Option<u16>) {
        let mut inboxes = self.0.borrow_mut();
        inboxes
            .entry(to)
            .or_default()
            .push_back((from, data.to_vec(), gro));
    }

    fn take(&self, at: SocketAddr) -> Option<Message> {
        self.0.borrow_mut().get_mut(&at)?.pop_front()
    }

    fn waiting(&self, at: SocketAddr) -> usize {
        self.0.borrow().get(&at).map_or(0, VecDeque::len)
    }

    /// Sends what a codec queued, as the pump does.
    fn flush(&self, from: SocketAddr, out: &mut Outbox) {
        for d in out.iter() {
            self.post(from, d.to, d.data, None);
        }
        out.clear();
    }

    /// Sends a run, as the pump does with UDP GSO (the receiver's GRO merges it again).
    fn send_run(&self, from: SocketAddr, run: &Transmit<'_>) {
        let gro = (run.data.len() > run.seg_len).then_some(run.seg_len as u16);
        self.post(from, run.to, run.data, gro);
    }
}

struct Node {
    codec: WgCodec,
    addr: SocketAddr,
    lan: Lan,
    rx: RxScratch,
    tx: (),
    out: Outbox,
    tally: Tally,
    /// Our pod subnet's third octet: pods are 10.244.<net>.x.
    net: u8,
}

fn keys() -> StaticKeys {
    let secret = StaticSecret::from(random_key().expect("random"));
    let public = PublicKey::from(&secret);
    StaticKeys { secret, public }
}

fn node(lan: &Lan, net: u8) -> Node {
    let codec = WgCodec::new(keys());
    let (tx, rx) = (codec.tx_scratch(), codec.rx_scratch());
    Node {
        codec,
        addr: SocketAddr::from(([192, 0, 2, net], 51820)),
        lan: lan.clone(),
        rx,
        tx,
        out: Outbox::new(),
        tally: Tally::default(),
        net,
    }
}

/// A peer of `local` for `remote`'s key, with no session yet and `endpoint`: what the
/// backend builds for a lease (shared with `pump_tests`).
pub(super) fn peer_of(
    local: &WgCodec,
    remote: &WgCodec,
    index: u32,
    endpoint: SocketAddr,
) -> Arc<WgPeer> {
    Arc::new(WgPeer::new(
        &local.local,
        index,
        *remote.local.public(),
        None,
        None,
        endpoint,
    ))
}

/// Makes `b` a peer of `a` (AllowedIPs = b's /24 and /64), with a fresh `Tunn`.
fn link(a: &Node, b: &Node, index: u32) -> Arc<WgPeer> {
    let peer = peer_of(&a.codec, &b.codec, index, b.addr);
    let mut entries: Vec<_> = a
        .codec
        .table
        .load()
        .peers()
        .iter()
        .map(|p| (p.clone(), vec![]))
        .collect();
    // Existing entries lose their AllowedIPs here; tests link each pair once, before traffic.
    entries.push((
        peer.clone(),
        vec![
            format!("10.244.{}.0/24", b.net).parse().expect("net"),
            format!("fc00:44:0:{}::/64", b.net).parse().expect("net"),
        ],
    ));
    a.codec.table.store(Arc::new(WgTable::new(entries)));
    peer
}

/// An IPv4/UDP packet of `len` bytes from 10.244.<from>.5 to 10.244.<to>.7.
fn packet(from: [u8; 4], to: [u8; 4], len: usize, fill: u8) -> Vec<u8> {
    let mut p = vec![fill; len.max(28)];
    p[..20].fill(0);
    p[0] = 0x45;
    let total = p.len() as u16;
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&from);
    p[16..20].copy_from_slice(&to);
    let mut sum = 0u32;
    for w in p[..20].chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p[20..28].fill(0);
    p
}

fn pod(net: u8, host: u8) -> [u8; 4] {
    [10, 244, net, host]
}

/// Packets (all but the last of one size) laid out as the pump cuts them for `codec`: each
/// `HEADROOM` bytes into its slot, slots back to back.
fn slotted(codec: &WgCodec, pkts: &[Vec<u8>]) -> Vec<u8> {
    let mut buf = Vec::new();
    for p in pkts {
        let at = buf.len() + WgCodec::HEADROOM;
        buf.resize(buf.len() + codec.slot_len(p.len()), 0xee);
        buf[at..at + p.len()].copy_from_slice(p);
    }
    buf
}

/// Sends packets (all but the last of one size) from `a` to the pod network of `to`.
fn send(a: &mut Node, to: u8, pkts: &[Vec<u8>]) -> Result<(), DropReason> {
    let seg_len = pkts.first().map_or(0, Vec::len);
    let mut buf = slotted(&a.codec, pkts);
    let route = a
        .codec
        .route(Ipv4Addr::new(10, 244, to, 7).into())
        .expect("a route to the peer");
    let pkts = Packets {
        buf: &mut buf,
        count: pkts.len(),
        len: seg_len,
        last_len: pkts.last().map_or(0, Vec::len),
    };
    let run = a
        .codec
        .transmit(&mut a.tx, route, pkts, &mut a.out, &mut a.tally)?;
    a.lan.flush(a.addr, &mut a.out);
    if let Some(run) = run {
        assert_eq!(run.seg_len, padded_len(seg_len, 1420) + DATA_OVERHEAD);
        a.lan.send_run(a.addr, &run);
    }
    Ok(())
}

/// Opens one message as the pump does and returns what it delivered.
fn receive(n: &mut Node, (src, data, gro): &Message) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut data = data.clone();
    let mut msg = RecvMsgMut::from_parts(&mut data, *src, *gro);
    n.codec
        .receive(&mut n.rx, &mut msg, &mut n.out, &mut n.tally, |p, _| {
            got.push(p.to_vec())
        });
    n.lan.flush(n.addr, &mut n.out);
    got
}

/// Receives everything waiting for `n` and returns the packets delivered.
fn poll(n: &mut Node) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    while let Some(msg) = n.lan.take(n.addr) {
        got.extend(receive(n, &msg));
    }
    got
}

/// Runs the handshake between `a` and `b` (started by a packet from a) and returns what b got.
fn handshake(a: &mut Node, b: &mut Node) -> Vec<Vec<u8>> {
    let first = packet(pod(a.net, 5), pod(b.net, 7), 100, 1);
    send(a, b.net, std::slice::from_ref(&first)).expect("queued behind the handshake");
    assert_eq!(a.lan.waiting(b.addr), 1, "only the initiation goes out");
    assert!(poll(b).is_empty(), "init: nothing delivered");
    assert!(poll(a).is_empty(), "response: nothing delivered");
    let got = poll(b);
    assert_eq!(
        got,
        vec![first],
        "the queued packet arrives after the handshake"
    );
    got
}

fn drops(n: &Node, why: DropReason) -> u64 {
    n.tally.drops[why as usize]
}

fn pair() -> (Node, Node) {
    let lan = Lan::default();
    let (a, b) = (node(&lan, 1), node(&lan, 2));
    link(&a, &b, 11);
    link(&b, &a, 22);
    (a, b)
}

#[test]
fn handshake_then_batches_both_ways() {
    let (mut a, mut b) = pair();
    handshake(&mut a, &mut b);
    // A run of 40 same-size segments and a shorter tail, as the pump hands them over.
    let mut run: Vec<Vec<u8>> = (0..40)
        .map(|i| packet(pod(1, 5), pod(2, 7), 1400, i))
        .collect();
    run.push(packet(pod(1, 5), pod(2, 7), 300, 0xee));
    send(&mut a, 2, &run).expect("sent");
    assert_eq!(b.lan.waiting(b.addr), 1, "one run, one GSO send");
    assert_eq!(poll(&mut b), run);
    let back = vec![packet(pod(2, 7), pod(1, 5), 60, 9)];
    send(&mut b, 1, &back).expect("sent");
    assert_eq!(poll(&mut a), back);
    assert_eq!(b.tally.drops.iter().sum::<u64>(), 0, "{:?}", b.tally.drops);
}

#[test]
fn packets_waiting_on_both_sides_all_arrive() {
    // Both nodes send before they can: b after answering a's initiation, so its packet waits
    // until a's first data message confirms the keys b answered with (then goes on them).
    let (mut a, mut b) = pair();
    let to_b = packet(pod(1, 5), pod(2, 7), 100, 1);
    let to_a = packet(pod(2, 7), pod(1, 5), 120, 2);
    send(&mut a, 2, std::slice::from_ref(&to_b)).expect("staged");
    let mut got_b = poll(&mut b);
    send(&mut b, 1, std::slice::from_ref(&to_a)).expect("staged");
    let mut got_a = Vec::new();
    for _ in 0..6 {
        got_b.extend(poll(&mut b));
        got_a.extend(poll(&mut a));
    }
    assert_eq!(got_b, vec![to_b]);
    assert_eq!(got_a, vec![to_a]);
    for n in [&a, &b] {
        assert_eq!(n.tally.drops.iter().sum::<u64>(), 0, "{:?}", n.tally.drops);
    }
    // Both keep talking on whatever sessions won.
    let more = vec![packet(pod(1, 5), pod(2, 7), 1400, 3); 3];
    send(&mut a, 2, &more).expect("sent");
    assert_eq!(poll(&mut b), more);
}

#[test]
fn crossing_initiations_leave_each_side_sending_on_its_own() {
    // Both initiate at once and both answer. Each must end up sending on the session it
    // initiated (the initiator alone rekeys on age); the answered one only opens what came.
    let (mut a, mut b) = pair();
    let to_b = packet(pod(1, 5), pod(2, 7), 100, 1);
    let to_a = packet(pod(2, 7), pod(1, 5), 100, 2);
    send(&mut a, 2, std::slice::from_ref(&to_b)).expect("staged");
    send(&mut b, 1, std::slice::from_ref(&to_a)).expect("staged");
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    for _ in 0..4 {
        got_b.extend(poll(&mut b));
        got_a.extend(poll(&mut a));
    }
    assert_eq!((got_a, got_b), (vec![to_a], vec![to_b]));
    for n in [&a, &b] {
        let peer = n.codec.table.load().peers()[0].clone();
        let st = peer.lock();
        assert!(
            st.current.as_ref().is_some_and(|s| s.initiator),
            "node {}",
            n.net
        );
        assert!(st.next.is_none(), "node {}", n.net);
    }
    // Traffic both ways still flows, and confirms nothing over the initiated sessions.
    for _ in 0..3 {
        let p = packet(pod(1, 5), pod(2, 7), 500, 3);
        send(&mut a, 2, std::slice::from_ref(&p)).expect("sent");
        assert_eq!(poll(&mut b), vec![p]);
        let q = packet(pod(2, 7), pod(1, 5), 500, 4);
        send(&mut b, 1, std::slice::from_ref(&q)).expect("sent");
        assert_eq!(poll(&mut a), vec![q]);
    }
    for n in [&a, &b] {
        let peer = n.codec.table.load().peers()[0].clone();
        assert!(peer.lock().current.as_ref().is_some_and(|s| s.initiator));
    }
}

/// Makes `n`'s waiting initiation to its first peer old enough for traffic to retry it.
fn age_pending(n: &Node) {
    let peer = n.codec.table.load().peers()[0].clone();
    let mut st = peer.lock();
    let p = st.pending.as_mut().expect("an initiation waits");
    p.last_sent = p.last_sent.checked_sub(RETRY_INIT).expect("clock");
}

/// Packets pushed out of the wait queue by newer ones are lost to the missing handshake, not
/// to a missing route (the route is there).
#[test]
fn packets_beyond_the_wait_queue_are_counted_as_no_handshake() {
    let (mut a, _b) = pair();
    let extra = 3;
    for i in 0..MAX_STAGED + extra {
        let pkt = packet(pod(1, 5), pod(2, 7), 100, i as u8);
        send(&mut a, 2, &[pkt]).expect("staged");
    }
    let drops = |why: DropReason| a.tally.drops[why as usize];
    assert_eq!(drops(DropReason::NoHandshake), extra as u64);
    assert_eq!(drops(DropReason::NoRoute), 0);
}

#[test]
fn a_response_slower_than_the_retry_still_completes() {
    // Packets waiting retry the initiation after RETRY_INIT; on a path slower than that, the
    // answer to the first arrives after the second went out, and must still be taken (else no
    // handshake completes while traffic keeps retrying).
    let (mut a, mut b) = pair();
    let first = packet(pod(1, 5), pod(2, 7), 100, 1);
    send(&mut a, 2, std::slice::from_ref(&first)).expect("staged");
    let init1 = a.lan.take(b.addr).expect("an initiation");
    age_pending(&a);
    let second = packet(pod(1, 5), pod(2, 7), 100, 2);
    send(&mut a, 2, std::slice::from_ref(&second)).expect("staged");
    let init2 = a.lan.take(b.addr).expect("a second initiation");
    assert_ne!(init1.1, init2.1);
    // The second is lost; b answers the first, and a takes that answer.
    assert!(receive(&mut b, &init1).is_empty());
    assert!(poll(&mut a).is_empty());
    assert_eq!(poll(&mut b), vec![first, second]);
    for n in [&a, &b] {
        assert_eq!(n.tally.drops.iter().sum::<u64>(), 0, "{:?}", n.tally.drops);
    }
}

#[test]
fn replayed_flooded_and_excess_initiations_are_refused() {
    let (mut a, mut b) = pair();
    send(&mut a, 2, &[packet(pod(1, 5), pod(2, 7), 100, 1)]).expect("staged");
    let init1 = a.lan.take(b.addr).expect("an initiation");
    receive(&mut b, &init1);
    assert_eq!(b.lan.waiting(a.addr), 1, "answered");
    b.lan.take(a.addr);
    // The same bytes again: authentic, but not newer than the last. Not answered.
    receive(&mut b, &init1);
    assert_eq!(drops(&b, DropReason::NotAuthentic), 1);
    // A retry within INIT_FLOOD of the last one taken: not answered either.
    age_pending(&a);
    send(&mut a, 2, &[packet(pod(1, 5), pod(2, 7), 100, 2)]).expect("staged");
    let init2 = a.lan.take(b.addr).expect("a retry");
    {
        let peer = b.codec.table.load().peers()[0].clone();
        peer.lock().last_init_received = Some(std::time::Instant::now());
    }
    receive(&mut b, &init2);
    assert_eq!(drops(&b, DropReason::NotAuthentic), 2);
    assert_eq!(b.lan.waiting(a.addr), 0, "nothing answered");
    // Not under load, nothing proves where a message came from, so no address is charged
    // for it (see `spoofed_initiations_cannot_spend_a_peers_share`): 30 more copies all
    // reach the replay check and are refused there.
    for _ in 0..30 {
        receive(&mut b, &init1);
    }
    assert_eq!(drops(&b, DropReason::UnknownSender), 0);
    assert_eq!(drops(&b, DropReason::NotAuthentic), 2 + 30);
}

/// A WireGuard peer with a key of its own that knows `b`'s public key (it is in every lease),
/// so its handshake messages carry a valid mac1.
fn stranger(b: &Node) -> Tunn {
    Tunn::new(
        StaticSecret::from(random_key().expect("random")),
        PublicKey::from(*b.codec.local.public()),
        None,
        None,
        1,
        None,
    )
}

/// `tunn`'s next handshake initiation, posted to `b` as if from `from`.
fn post_initiation(tunn: &mut Tunn, b: &Node, from: SocketAddr) {
    let mut buf = [0u8; 256];
    let TunnResult::WriteToNetwork(init) = tunn.format_handshake_initiation(&mut buf, true) else {
        panic!("boringtun made no initiation");
    };
    b.lan.post(from, b.addr, init, None);
}

#[test]
fn spoofed_initiations_cannot_spend_a_peers_share() {
    let (mut a, mut b) = pair();
    // Someone who knows b's public key (it is in every lease) sends initiations with a's
    // address as source, below the rate that puts b under load.
    let mut tunn = stranger(&b);
    let spoofed = SocketAddr::new(a.addr.ip(), 1);
    for _ in 0..10 {
        post_initiation(&mut tunn, &b, spoofed);
    }
    poll(&mut b);
    // a's own initiation is still answered.
    send(&mut a, 2, &[packet(pod(1, 5), pod(2, 7), 100, 1)]).expect("staged");
    let init = a.lan.take(b.addr).expect("an initiation");
    receive(&mut b, &init);
    assert_eq!(b.lan.waiting(a.addr), 1, "a's initiation answered");
}

#[test]
fn padded_packets_lose_their_padding() {
    // wireguard-go and the kernel pad what they seal to 16 bytes: the IP header says how long
    // the packet really is.
    let (mut a, mut b) = pair();
    handshake(&mut a, &mut b);
    let pkt = packet(pod(1, 5), pod(2, 7), 61, 4);
    let mut padded = pkt.clone();
    padded.resize(64, 0);
    let peer = a.codec.table.load().peers()[0].clone();
    let s = peer
        .lock()
        .sending(std::time::Instant::now())
        .expect("session");
    let mut msg = vec![0u8; padded.len() + DATA_OVERHEAD];
    msg[16..16 + padded.len()].copy_from_slice(&padded);
    assert!(s.seal(s.reserve(1).expect("counter"), &mut msg));
    b.lan.post(a.addr, b.addr, &msg, None);
    assert_eq!(poll(&mut b), vec![pkt]);
    // A header claiming more than was sealed is malformed.
    let mut short = packet(pod(1, 5), pod(2, 7), 100, 5);
    short.truncate(80);
    let mut msg = vec![0u8; short.len() + DATA_OVERHEAD];
    msg[16..16 + short.len()].copy_from_slice(&short);
    assert!(s.seal(s.reserve(1).expect("counter"), &mut msg));
    b.lan.post(a.addr, b.addr, &msg, None);
    assert!(poll(&mut b).is_empty());
    assert_eq!(drops(&b, DropReason::Malformed), 1);
}

#[test]
fn padding_is_zeros_whatever_the_slot_held() {
    let (mut a, mut b) = pair();
    handshake(&mut a, &mut b);
    let p = packet(pod(1, 5), pod(2, 7), 200, 3);
    // `send` lays the packet in a slot whose other bytes are 0xee, as a reused buffer might.
    send(&mut a, 2, std::slice::from_ref(&p)).expect("sent");
    let (_, mut msg, _) = b.lan.take(b.addr).expect("a message");
    let index = u32::from_le_bytes(msg[4..8].try_into().expect("4 bytes"));
    let peer = b.codec.table.load().peers()[0].clone();
    let (s, _) = peer
        .lock()
        .by_index(index, std::time::Instant::now())
        .expect("the session");
    assert_eq!(s.open(&mut msg), Ok(208), "200 bytes, padded to 16");
    assert_eq!(&msg[16..216], &p[..]);
    assert!(
        msg[216..224].iter().all(|&x| x == 0),
        "{:?}",
        &msg[216..224]
    );
}

#[test]
fn large_messages_open_on_the_pool_in_order() {
    let lan = Lan::default();
    let mut a = node(&lan, 1);
    let mut b = node(&lan, 2);
    b.codec = WgCodec::new(keys()).with_open_threads(2, "test");
    link(&a, &b, 11);
    link(&b, &a, 22);
    handshake(&mut a, &mut b);
    let mut run: Vec<Vec<u8>> = (0..40)
        .map(|i| packet(pod(1, 5), pod(2, 7), 1400, i))
        .collect();
    run.push(packet(pod(1, 5), pod(2, 7), 300, 0xee));
    send(&mut a, 2, &run).expect("sent");
    let msg = b.lan.take(b.addr).expect("one message");
    assert_eq!(receive(&mut b, &msg), run, "all of it, in order");
    // The same message again: every datagram a replay.
    assert!(receive(&mut b, &msg).is_empty());
    assert_eq!(drops(&b, DropReason::NotAuthentic), 41);
    // One corrupted datagram in a fresh run: the rest arrive, in order.
    send(&mut a, 2, &run).expect("sent");
    let (from, mut data, gro) = b.lan.take(b.addr).expect("one message");
    data[(padded_len(1400, 1420) + DATA_OVERHEAD) * 5 + 40] ^= 1;
    let mut want = run.clone();
    want.remove(5);
    assert_eq!(receive(&mut b, &(from, data, gro)), want);
    assert_eq!(drops(&b, DropReason::NotAuthentic), 42);
    // Sources outside a's subnet are dropped here as on the one-by-one path.
    let spoofed: Vec<Vec<u8>> = (0..20)
        .map(|i| packet(pod(3, 5), pod(2, 7), 1000, i))
        .collect();
    send(&mut a, 2, &spoofed).expect("sent");
    assert!(poll(&mut b).is_empty());
    assert_eq!(drops(&b, DropReason::SpoofedSource), 20);
}

#[test]
fn packets_are_padded_to_16_but_not_beyond_the_mtu() {
    assert_eq!(padded_len(0, 1420), 0, "a keepalive stays empty");
    assert_eq!(padded_len(1, 1420), 16);
    assert_eq!(padded_len(1400, 1420), 1408);
    assert_eq!(padded_len(1418, 1420), 1420, "capped at the MTU");
    assert_eq!(padded_len(1420, 1420), 1420);
    assert_eq!(
        padded_len(1500, 1420),
        1500,
        "longer than the MTU: left as it is"
    );
}

#[test]
fn replays_and_spoofed_sources_are_dropped() {
    let (mut a, mut b) = pair();
    handshake(&mut a, &mut b);
    let p = packet(pod(1, 5), pod(2, 7), 200, 3);
    send(&mut a, 2, std::slice::from_ref(&p)).expect("sent");
    // Open the same message twice: the second is a replay.
    let msg = b.lan.take(b.addr).expect("a message");
    assert_eq!(msg.1.len(), 208 + DATA_OVERHEAD, "200 bytes, padded to 16");
    let mut got = receive(&mut b, &msg);
    got.extend(receive(&mut b, &msg));
    assert_eq!(got, vec![p]);
    assert_eq!(drops(&b, DropReason::NotAuthentic), 1, "the replay");
    // From another address, the replay must not move the peer either (no roaming).
    let elsewhere = (SocketAddr::from(([192, 0, 2, 99], 4444)), msg.1, msg.2);
    assert!(receive(&mut b, &elsewhere).is_empty());
    assert_eq!(drops(&b, DropReason::NotAuthentic), 2);
    let peer_a = b
        .codec
        .route(Ipv4Addr::new(10, 244, 1, 5).into())
        .expect("route");
    assert_eq!(peer_a.lock().endpoint, a.addr);

    // Authentic, but the inner source is not a's pod subnet.
    let spoofed = packet(pod(9, 5), pod(2, 7), 200, 4);
    send(&mut a, 2, &[spoofed]).expect("sent");
    assert!(poll(&mut b).is_empty());
    assert_eq!(drops(&b, DropReason::SpoofedSource), 1);
}

#[test]
fn unknown_keys_get_nothing_in() {
    let (mut a, mut b) = pair();
    // c knows b's public key, but b does not know c's.
    let mut c = node(&a.lan, 3);
    link(&c, &b, 33);
    let p = packet(pod(3, 5), pod(2, 7), 100, 5);
    send(&mut c, 2, &[p]).expect("queued");
    assert!(poll(&mut b).is_empty());
    assert_eq!(drops(&b, DropReason::UnknownSender), 1, "c's handshake");
    assert_eq!(c.lan.waiting(c.addr), 0, "b did not answer at all");
    assert!(poll(&mut c).is_empty());
    // The legitimate pair is unaffected.
    handshake(&mut a, &mut b);
}

#[test]
fn garbage_is_counted_and_harmless() {
    let (mut a, mut b) = pair();
    handshake(&mut a, &mut b);
    let junk = SocketAddr::from(([198, 51, 100, 7], 40000));
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let sent = 2000;
    for i in 0..sent {
        let len = match i % 4 {
            0 => 148, // handshake-initiation sized
            1 => 92,
            2 => 32 + (next() % 1400) as usize,
            _ => (next() % 1500) as usize + 1,
        };
        let mut d: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Valid-looking headers, so the datagrams get past the type check.
        match i % 4 {
            0 => d[..4].copy_from_slice(&1u32.to_le_bytes()),
            1 => d[..4].copy_from_slice(&2u32.to_le_bytes()),
            2 => {
                d[..4].copy_from_slice(&4u32.to_le_bytes());
                // Half name a's real session index range.
                if i % 8 == 2 {
                    d[4..8].copy_from_slice(&((22u32 << 8) | (next() as u32 & 0xff)).to_le_bytes());
                }
            }
            _ => {}
        }
        b.lan.post(junk, b.addr, &d, None);
    }
    assert!(poll(&mut b).is_empty());
    let counted: u64 = [
        DropReason::Malformed,
        DropReason::UnknownSender,
        DropReason::NotAuthentic,
        DropReason::SpoofedSource,
    ]
    .iter()
    .map(|w| drops(&b, *w))
    .sum();
    assert_eq!(counted, sent, "every garbage datagram dropped and counted");
    // Still works.
    let p = packet(pod(1, 5), pod(2, 7), 500, 6);
    send(&mut a, 2, std::slice::from_ref(&p)).expect("sent");
    assert_eq!(poll(&mut b), vec![p]);
}

#[test]
fn handshake_flood_gets_cookie_replies() {
    let (mut a, mut b) = pair();
    // A flooder that knows b's public key: every initiation has a valid mac1.
    let flooder = SocketAddr::from(([198, 51, 100, 8], 40000));
    let mut tunn = stranger(&b);
    let mut buf = [0u8; 256];
    let floods = HANDSHAKE_RATE_LIMIT as usize * 2;
    for _ in 0..floods {
        post_initiation(&mut tunn, &b, flooder);
        poll(&mut b);
    }
    let mut cookies = 0;
    let mut last = None;
    while let Some((from, d, _)) = b.lan.take(flooder) {
        assert_eq!(from, b.addr);
        if d.len() == 64 && d[0] == 3 {
            cookies += 1;
            last = Some(d);
        }
    }
    assert!(
        cookies > 0,
        "no cookie replies under a flood of {floods} initiations"
    );
    assert!(
        drops(&b, DropReason::UnknownSender) > 0,
        "unknown initiators are dropped"
    );
    // boringtun takes our cookie reply (to its last initiation), and its next initiation
    // carries a mac2 that passes: no cookie reply to it, though b is still under load.
    let reply = last.expect("a cookie reply");
    assert!(matches!(
        tunn.decapsulate(Some(flooder.ip()), &reply, &mut buf),
        TunnResult::Done
    ));
    post_initiation(&mut tunn, &b, flooder);
    poll(&mut b);
    assert_eq!(b.lan.waiting(flooder), 0, "its address is proven");
    // Once the second is over, a legitimate handshake goes through again.
    std::thread::sleep(Duration::from_millis(1100));
    for p in b.codec.table.load().peers() {
        // Only the gate's new second is wanted from this tick, not b's greeting handshake.
        p.greet.store(false, std::sync::atomic::Ordering::Relaxed);
    }
    let mut due = Outbox::new();
    b.codec.tick(&mut due, &mut Tally::default());
    assert!(due.is_empty(), "no session, no greeting: nothing due");
    handshake(&mut a, &mut b);
}

#[test]
fn greeting_is_due_at_the_first_tick() {
    let (a, b) = pair();
    let mut due = Outbox::new();
    a.codec.tick(&mut due, &mut Tally::default());
    let sent: Vec<_> = due
        .iter()
        .map(|d| (d.to, d.data.len(), d.counted))
        .collect();
    assert_eq!(sent, [(b.addr, 148, true)], "one handshake initiation to b");
    due.clear();
    a.codec.tick(&mut due, &mut Tally::default());
    assert!(due.is_empty(), "greeted once");
}

#[test]
fn a_peer_that_moves_keeps_working() {
    let (mut a, mut b) = pair();
    handshake(&mut a, &mut b);
    // a's packets now leave from another address (as after a NAT rebinding).
    let old = std::mem::replace(&mut a.addr, SocketAddr::from(([192, 0, 2, 77], 60000)));
    let p = packet(pod(1, 5), pod(2, 7), 300, 8);
    send(&mut a, 2, std::slice::from_ref(&p)).expect("sent");
    assert_eq!(poll(&mut b), vec![p]);
    let peer_a = b
        .codec
        .route(Ipv4Addr::new(10, 244, 1, 5).into())
        .expect("route");
    assert_eq!(
        peer_a.lock().endpoint,
        a.addr,
        "b follows a to its new address"
    );
    // b's answer goes there, not to the old address.
    let back = vec![packet(pod(2, 7), pod(1, 5), 80, 9)];
    send(&mut b, 1, &back).expect("sent");
    assert_eq!(poll(&mut a), back);
    assert_eq!(a.lan.waiting(old), 0, "nothing went to the old address");
}

/// A UDP packet from fc00:44:0:<from>::5 to fc00:44:0:<to>::7.
fn packet_v6(from: u8, to: u8, len: usize) -> Vec<u8> {
    let mut spec = crate::wire::testutil::TcpSpec::v6()
        .udp()
        .payload(&vec![from; len]);
    spec.src = format!("fc00:44:0:{from}::5").parse().expect("ip");
    spec.dst = format!("fc00:44:0:{to}::7").parse().expect("ip");
    spec.build()
}

#[test]
fn ipv6_inner_packets_round_trip_and_spoofed_v6_sources_are_dropped() {
    let (mut a, mut b) = pair();
    handshake(&mut a, &mut b);
    // A run of IPv6 packets, routed by their IPv6 destination to the same peer.
    let run: Vec<Vec<u8>> = (0..10).map(|_| packet_v6(1, 2, 1200)).collect();
    let route = a
        .codec
        .route("fc00:44:0:2::7".parse().expect("ip"))
        .expect("an IPv6 route to b");
    assert_eq!(route.index, 11);
    let mut buf = slotted(&a.codec, &run);
    let pkts = Packets {
        buf: &mut buf,
        count: run.len(),
        len: run[0].len(),
        last_len: run[0].len(),
    };
    let sent = a
        .codec
        .transmit(&mut a.tx, route, pkts, &mut a.out, &mut a.tally)
        .expect("sealed")
        .expect("a run");
    a.lan.send_run(a.addr, &sent);
    assert_eq!(poll(&mut b), run);
    // Authentic, but from b's IPv6 subnet, or from a third node's: not a's to send.
    for from in [2, 9] {
        send(&mut a, 2, &[packet_v6(from, 2, 300)]).expect("sent");
        assert!(poll(&mut b).is_empty(), "from fc00:44:0:{from}::5");
    }
    assert_eq!(drops(&b, DropReason::SpoofedSource), 2);
    assert_eq!(drops(&b, DropReason::NotAuthentic), 0);
    // And back over IPv6.
    let back = vec![packet_v6(2, 1, 80)];
    send(&mut b, 1, &back).expect("sent");
    assert_eq!(poll(&mut a), back);
}
