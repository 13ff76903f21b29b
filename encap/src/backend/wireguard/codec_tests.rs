//! The codec end to end over loopback UDP (no privileges): handshake, batches, replay, spoofed
//! inner sources, unknown keys, garbage and the rate limiter's cookie replies.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use super::codec::{RxScratch, TxScratch, WgCodec, DATA_OVERHEAD, HANDSHAKE_RATE_LIMIT};
use super::keys::{random_key, StaticKeys};
use super::peers::{WgPeer, WgTable};
use crate::backend::pump::{Codec, Wire};
use crate::io::{RecvBatch, UdpSock};
use crate::stats::{DropReason, Tally};

struct Node {
    codec: WgCodec,
    wire: Wire,
    addr: SocketAddr,
    batch: RecvBatch,
    rx: RxScratch,
    tx: TxScratch,
    tally: Tally,
    /// Our pod subnet's third octet: pods are 10.244.<net>.x.
    net: u8,
}

fn keys() -> StaticKeys {
    let secret = StaticSecret::from(random_key().expect("random"));
    let public = PublicKey::from(&secret);
    StaticKeys { secret, public }
}

fn node(net: u8) -> Node {
    let sock = UdpSock::bind("127.0.0.1:0".parse().expect("addr"), false).expect("bind");
    sock.set_timeout(Some(Duration::from_millis(20)));
    sock.grow_buffers(4 << 20);
    let addr = sock.local_addr();
    let codec = WgCodec::new(keys());
    let (tx, rx) = (codec.tx_scratch(), codec.rx_scratch());
    Node {
        codec,
        wire: Wire::new(sock),
        addr,
        batch: RecvBatch::new(16, 65_535),
        rx,
        tx,
        tally: Tally::default(),
        net,
    }
}

/// Makes `b` a peer of `a` (AllowedIPs = b's /24), with a fresh `Tunn`.
fn link(a: &Node, b: &Node, index: u32) -> Arc<WgPeer> {
    let tunn = Tunn::new(
        a.codec.keys().secret.clone(),
        b.codec.keys().public,
        None,
        None,
        index,
        Some(a.codec.limiter.clone()),
    );
    let peer = Arc::new(WgPeer::new(
        index,
        *b.codec.keys().public.as_bytes(),
        tunn,
        b.addr,
    ));
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
        vec![format!("10.244.{}.0/24", b.net).parse().expect("net")],
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

/// Sends packets (all but the last of one size) from `a` to the pod network of `to`.
fn send(a: &mut Node, to: u8, pkts: &[Vec<u8>]) -> Result<(), DropReason> {
    let seg_len = pkts.first().map_or(0, Vec::len);
    let segs: Vec<u8> = pkts.concat();
    let route = a
        .codec
        .route(Ipv4Addr::new(10, 244, to, 7))
        .expect("a route to the peer");
    a.codec
        .transmit(&mut a.tx, route, &segs, seg_len, &a.wire, &mut a.tally)
}

/// Receives for up to `wait` (until `want` packets were delivered) and returns them.
fn poll(n: &mut Node, want: usize, wait: Duration) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let deadline = Instant::now() + wait;
    while got.len() < want && Instant::now() < deadline {
        let Ok(count) = n.wire.sock().recv_batch(&mut n.batch) else {
            continue;
        };
        for i in 0..count {
            let Some(msg) = n.batch.msg(i) else { continue };
            n.codec
                .receive(&mut n.rx, &msg, &n.wire, &mut n.tally, |p, _| {
                    got.push(p.to_vec())
                });
        }
    }
    got
}

/// Runs the handshake between `a` and `b` (started by a packet from a) and returns what b got.
fn handshake(a: &mut Node, b: &mut Node) -> Vec<Vec<u8>> {
    let first = packet(pod(a.net, 5), pod(b.net, 7), 100, 1);
    send(a, b.net, std::slice::from_ref(&first)).expect("queued behind the handshake");
    assert!(
        poll(b, 1, Duration::from_millis(300)).is_empty(),
        "init: nothing delivered"
    );
    assert!(
        poll(a, 1, Duration::from_millis(300)).is_empty(),
        "response: nothing delivered"
    );
    let got = poll(b, 1, Duration::from_secs(1));
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
    let (a, b) = (node(1), node(2));
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
    assert_eq!(poll(&mut b, run.len(), Duration::from_secs(2)), run);
    let back = vec![packet(pod(2, 7), pod(1, 5), 60, 9)];
    send(&mut b, 1, &back).expect("sent");
    assert_eq!(poll(&mut a, 1, Duration::from_secs(1)), back);
    assert_eq!(b.tally.drops.iter().sum::<u64>(), 0, "{:?}", b.tally.drops);
}

#[test]
fn replays_and_spoofed_sources_are_dropped() {
    let (mut a, mut b) = pair();
    handshake(&mut a, &mut b);
    let p = packet(pod(1, 5), pod(2, 7), 200, 3);
    send(&mut a, 2, std::slice::from_ref(&p)).expect("sent");
    // Receive by hand and open the same message twice: the second is a replay.
    let deadline = Instant::now() + Duration::from_secs(1);
    let count = loop {
        if let Ok(n) = b.wire.sock().recv_batch(&mut b.batch) {
            break n;
        }
        assert!(Instant::now() < deadline, "nothing arrived");
    };
    assert_eq!(count, 1);
    let msg = b.batch.msg(0).expect("msg");
    assert_eq!(msg.data().len(), p.len() + DATA_OVERHEAD);
    let mut got = Vec::new();
    for _ in 0..2 {
        b.codec
            .receive(&mut b.rx, &msg, &b.wire, &mut b.tally, |d, _| {
                got.push(d.to_vec())
            });
    }
    assert_eq!(got, vec![p]);
    assert_eq!(drops(&b, DropReason::NotAuthentic), 1, "the replay");
    // From another address, the replay must not move the peer either (no roaming).
    let peer_a = b.codec.route(Ipv4Addr::new(10, 244, 1, 5)).expect("route");
    assert_eq!(peer_a.lock().endpoint, a.addr);

    // Authentic, but the inner source is not a's pod subnet.
    let spoofed = packet(pod(9, 5), pod(2, 7), 200, 4);
    send(&mut a, 2, &[spoofed]).expect("sent");
    assert!(poll(&mut b, 1, Duration::from_millis(400)).is_empty());
    assert_eq!(drops(&b, DropReason::SpoofedSource), 1);
}

#[test]
fn unknown_keys_get_nothing_in() {
    let (mut a, mut b) = pair();
    // c knows b's public key, but b does not know c's.
    let mut c = node(3);
    link(&c, &b, 33);
    let p = packet(pod(3, 5), pod(2, 7), 100, 5);
    send(&mut c, 2, &[p]).expect("queued");
    assert!(poll(&mut b, 1, Duration::from_millis(400)).is_empty());
    assert_eq!(drops(&b, DropReason::UnknownSender), 1, "c's handshake");
    assert!(poll(&mut c, 1, Duration::from_millis(400)).is_empty());
    assert_eq!(
        c.tally.drops.iter().sum::<u64>(),
        0,
        "b did not answer at all"
    );
    // The legitimate pair is unaffected.
    handshake(&mut a, &mut b);
}

#[test]
fn garbage_is_counted_and_harmless() {
    let (mut a, mut b) = pair();
    handshake(&mut a, &mut b);
    let junk = UdpSock::bind("127.0.0.1:0".parse().expect("addr"), false).expect("bind");
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut sent = 0;
    for i in 0..2000 {
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
        if junk.send_gso(b.addr, &d, 0).is_ok() {
            sent += 1;
        }
        if i % 100 == 99 {
            // Keep b's socket buffer from overflowing (it may be small without privileges).
            poll(&mut b, usize::MAX, Duration::from_millis(30));
        }
    }
    poll(&mut b, usize::MAX, Duration::from_millis(300));
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
    assert_eq!(poll(&mut b, 1, Duration::from_secs(1)), vec![p]);
}

#[test]
fn handshake_flood_gets_cookie_replies() {
    let (mut a, mut b) = pair();
    // A flooder that knows b's public key: every initiation has a valid mac1.
    let flooder = UdpSock::bind("127.0.0.1:0".parse().expect("addr"), false).expect("bind");
    flooder.set_timeout(Some(Duration::from_millis(300)));
    let mut tunn = Tunn::new(
        StaticSecret::from(random_key().expect("random")),
        b.codec.keys().public,
        None,
        None,
        1,
        None,
    );
    let mut buf = [0u8; 256];
    let floods = HANDSHAKE_RATE_LIMIT as usize * 2;
    for _ in 0..floods {
        if let TunnResult::WriteToNetwork(init) = tunn.format_handshake_initiation(&mut buf, true) {
            let _ = flooder.send_gso(b.addr, init, 0);
        }
        // Keep b's socket buffer from overflowing.
        if b.wire.sock().recv_batch(&mut b.batch).is_ok() {
            for i in 0..b.batch.len() {
                let Some(msg) = b.batch.msg(i) else { continue };
                b.codec
                    .receive(&mut b.rx, &msg, &b.wire, &mut b.tally, |_, _| {});
            }
        }
    }
    poll(&mut b, usize::MAX, Duration::from_millis(300));
    let mut fb = RecvBatch::new(16, 65_535);
    let mut cookies = 0;
    while let Ok(n) = flooder.recv_batch(&mut fb) {
        for m in fb.iter() {
            for d in m.datagrams() {
                if d.len() == 64 && d[0] == 3 {
                    cookies += 1;
                }
            }
        }
        if n == 0 {
            break;
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
    // Once the second is over, a legitimate handshake goes through again.
    std::thread::sleep(Duration::from_millis(1100));
    for p in b.codec.table.load().peers() {
        // Only the limiter's reset is wanted from this tick, not b's greeting handshake.
        p.greet.store(false, std::sync::atomic::Ordering::Relaxed);
    }
    let mut sink = Tally::default();
    let mut tick_buf = vec![0u8; 70_000];
    b.codec.tick(&b.wire, &mut tick_buf, &mut sink);
    handshake(&mut a, &mut b);
}

#[test]
fn a_peer_that_moves_keeps_working() {
    let (mut a, mut b) = pair();
    handshake(&mut a, &mut b);
    // a's packets now leave from another socket (a new address, as after a NAT rebinding).
    let moved = UdpSock::bind("127.0.0.1:0".parse().expect("addr"), false).expect("bind");
    moved.set_timeout(Some(Duration::from_millis(20)));
    let new_addr = moved.local_addr();
    let old = std::mem::replace(&mut a.wire, Wire::new(moved));
    let p = packet(pod(1, 5), pod(2, 7), 300, 8);
    send(&mut a, 2, std::slice::from_ref(&p)).expect("sent");
    assert_eq!(poll(&mut b, 1, Duration::from_secs(1)), vec![p]);
    let peer_a = b.codec.route(Ipv4Addr::new(10, 244, 1, 5)).expect("route");
    assert_eq!(
        peer_a.lock().endpoint,
        new_addr,
        "b follows a to its new address"
    );
    // b's answer goes there, not to the old socket.
    let back = vec![packet(pod(2, 7), pod(1, 5), 80, 9)];
    send(&mut b, 1, &back).expect("sent");
    assert_eq!(poll(&mut a, 1, Duration::from_secs(1)), back);
    let mut stale = RecvBatch::new(4, 65_535);
    assert!(
        old.sock().recv_batch(&mut stale).is_err(),
        "nothing went to the old address"
    );
}
