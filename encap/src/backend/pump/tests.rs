//! The pump's threads over in-memory TUN queues and sockets (`fake.rs`): no root, no kernel.
//! A minimal codec (datagram = inner packet, one peer) keeps the pump itself under test.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;

use super::fake::{FakeNet, FakeTun, FakeUdp};
use super::{Codec, DeviceState, Outbox, OwnSubnets, Packets, Pump, Transmit};
use crate::io::RecvMsgMut;
use crate::stats::{DropReason, Tally};
use crate::wire::testutil::TcpSpec;
use crate::wire::{VnetHdr, VNET_HDR_LEN};

/// Sends every packet for `subnet` to `peer` as it is, and takes whatever arrives.
struct Plain {
    subnet: Ipv4Net,
    peer: SocketAddr,
}

impl Codec for Plain {
    type Route = SocketAddr;
    type TxScratch = ();
    type RxScratch = ();
    const DECREMENT_TTL: bool = true;
    const DELIVERS_INTACT: bool = false;
    const SEND_FROM_QUEUE_PORTS: bool = false;

    fn tx_scratch(&self) {}
    fn rx_scratch(&self) {}

    fn same_route(&self, a: &SocketAddr, b: &SocketAddr) -> bool {
        a == b
    }

    fn route(&self, dst: IpAddr) -> Option<SocketAddr> {
        match dst {
            IpAddr::V4(dst) => self.subnet.contains(&dst).then_some(self.peer),
            IpAddr::V6(_) => None,
        }
    }

    fn transmit<'a>(
        &self,
        _: &'a mut (),
        to: SocketAddr,
        pkts: Packets<'a>,
        _: &mut Outbox,
        _: &mut Tally,
    ) -> Result<Option<Transmit<'a>>, DropReason> {
        Ok(Some(pkts.into_datagrams_to(to)))
    }

    fn receive<F>(
        &self,
        _: &mut (),
        msg: &mut RecvMsgMut<'_>,
        _: &mut Outbox,
        t: &mut Tally,
        mut f: F,
    ) where
        F: FnMut(&[u8], &mut Tally),
    {
        for d in msg.view().datagrams() {
            f(d, t);
        }
    }
}

/// One node: a pump with one queue, its fakes, its state.
struct Node {
    tun: Arc<FakeTun>,
    sock: Arc<FakeUdp>,
    state: Arc<DeviceState>,
    codec: Arc<Plain>,
    pump: Pump<Arc<FakeUdp>>,
}

const MTU: usize = 1400;

fn node(net: &Arc<FakeNet>, own: u8, peer: u8) -> Node {
    node_with_queued(net, own, peer, Vec::new())
}

/// A node whose TUN already holds `queued` (from pods) when its threads start.
fn node_with_queued(net: &Arc<FakeNet>, own: u8, peer: u8, queued: Vec<Vec<u8>>) -> Node {
    let addr = |n: u8| SocketAddr::from(([172, 30, 0, n], 8285));
    let subnet = |n: u8| -> Ipv4Net { format!("10.244.{n}.0/24").parse().expect("net") };
    let tun = Arc::new(FakeTun::default());
    for pkt in queued {
        tun.inject(pkt);
    }
    let sock = Arc::new(net.bind(addr(own)));
    let state = Arc::new(DeviceState::new(MTU));
    state.set_own(OwnSubnets {
        v4: Some(subnet(own)),
        v6: None,
    });
    let codec = Arc::new(Plain {
        subnet: subnet(peer),
        peer: addr(peer),
    });
    let pump = Pump::run(
        "test",
        codec.clone(),
        state.clone(),
        vec![(tun.clone(), sock.clone()).into()],
    )
    .expect("pump");
    Node {
        tun,
        sock,
        state,
        codec,
        pump,
    }
}

fn pair() -> (Node, Node) {
    let net = Arc::new(FakeNet::default());
    (node(&net, 1, 2), node(&net, 2, 1))
}

/// A packet from a pod, as the TUN hands it over: plain virtio-net header first.
fn from_pod(pkt: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; VNET_HDR_LEN];
    VnetHdr::default().encode(&mut v).expect("header");
    v.extend_from_slice(pkt);
    v
}

/// A TCP super-packet from pod 10.244.1.5 to 10.244.2.7 of `segs` segments of `mss` bytes,
/// as the TUN hands it over.
fn super_packet(segs: usize, mss: usize) -> Vec<u8> {
    let mut spec = TcpSpec::v4().payload(&vec![3u8; segs * mss]);
    (spec.src, spec.dst) = ([10, 244, 1, 5].into(), [10, 244, 2, 7].into());
    let (hdr, pkt) = spec.build_gso(mss as u16);
    let mut read = vec![0u8; VNET_HDR_LEN];
    hdr.encode(&mut read).expect("header");
    read.extend_from_slice(&pkt);
    read
}

fn udp_packet(src: [u8; 4], dst: [u8; 4], len: usize) -> Vec<u8> {
    let mut spec = TcpSpec::v4().udp().payload(&vec![7u8; len]);
    (spec.src, spec.dst) = (src.into(), dst.into());
    spec.build()
}

/// Packets written to `tun` until `n` came or `wait` passed, headers stripped.
fn delivered(tun: &FakeTun, n: usize, wait: Duration) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    while got.len() < n && Instant::now() < deadline {
        got.extend(
            tun.written(Duration::from_millis(50))
                .into_iter()
                .map(|p| p[VNET_HDR_LEN..].to_vec()),
        );
    }
    got
}

/// Waits until the counters the threads flush (idle threads flush every timeout) satisfy `ok`.
fn eventually(what: &str, ok: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while !ok() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn queued_packets_leave_together_in_order_one_send_per_size() {
    let net = Arc::new(FakeNet::default());
    let sizes = [200; 10].into_iter().chain([300]).chain([200; 5]);
    let pkts: Vec<Vec<u8>> = sizes
        .enumerate()
        .map(|(i, len)| {
            let mut spec = TcpSpec::v4().udp().payload(&vec![7u8; len]).id(i as u16);
            (spec.src, spec.dst) = ([10, 244, 1, 5].into(), [10, 244, 2, 7].into());
            spec.build()
        })
        .collect();
    let b = node(&net, 2, 1);
    let a = node_with_queued(&net, 1, 2, pkts.iter().map(|p| from_pod(p)).collect());
    let got = delivered(&b.tun, pkts.len(), Duration::from_secs(3));
    let ids: Vec<u16> = got
        .iter()
        .map(|p| u16::from_be_bytes([p[4], p[5]]))
        .collect();
    assert_eq!(ids, (0..16).collect::<Vec<u16>>(), "all, in order");
    // Three runs (ten of one size, one of another, five of the first): three sends.
    assert_eq!(a.sock.gso_sends.load(Ordering::Relaxed), 3);
}

#[test]
fn packets_cross_from_pod_to_pod() {
    let (a, b) = pair();
    let pkt = udp_packet([10, 244, 1, 5], [10, 244, 2, 7], 200);
    a.tun.inject(from_pod(&pkt));
    let got = delivered(&b.tun, 1, Duration::from_secs(3));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].len(), pkt.len());
    assert_eq!(got[0][8], pkt[8] - 1, "a router hop: TTL decremented");
    eventually("counted on both sides", || {
        a.state.stats.tx_packets.load(Ordering::Relaxed) == 1
            && b.state.stats.rx_packets.load(Ordering::Relaxed) == 1
    });
}

#[test]
fn routeless_packets_get_icmp_unreachable() {
    let (a, _b) = pair();
    let pkt = udp_packet([10, 244, 1, 5], [10, 9, 9, 9], 100);
    a.tun.inject(from_pod(&pkt));
    let got = delivered(&a.tun, 1, Duration::from_secs(3));
    assert_eq!(got.len(), 1, "an answer to the pod");
    assert_eq!(
        (got[0][9], got[0][20]),
        (1, 3),
        "ICMP destination unreachable"
    );
    assert_eq!(&got[0][16..20], &[10, 244, 1, 5]);
    eventually("a no_route drop", || {
        a.state.stats.drops(DropReason::NoRoute) == 1
    });
}

#[test]
fn routeless_ipv6_gets_icmpv6_from_our_ipv6_address_if_we_have_one() {
    let (a, _b) = pair();
    let mut spec = TcpSpec::v6().udp().payload(&[1u8; 100]);
    spec.src = "fc00:44:0:1::5".parse().expect("ip");
    spec.dst = "fc00:44:0:9::9".parse().expect("ip");
    let pkt = spec.build();
    // IPv4 only (the udp backend): nothing to answer from, only counted.
    a.tun.inject(from_pod(&pkt));
    eventually("a no_route drop", || {
        a.state.stats.drops(DropReason::NoRoute) == 1
    });
    assert!(a.tun.written(Duration::from_millis(100)).is_empty());
    // With an IPv6 subnet: ICMPv6 destination unreachable (type 1, no route) to the pod.
    let mut own = a.state.own();
    own.v6 = Some("fc00:44:0:1::/64".parse().expect("net"));
    a.state.set_own(own);
    a.tun.inject(from_pod(&pkt));
    let got = delivered(&a.tun, 1, Duration::from_secs(3));
    assert_eq!(got.len(), 1, "an answer to the pod");
    assert_eq!(
        (got[0][0] >> 4, got[0][6], got[0][40]),
        (6, 58, 1),
        "ICMPv6 unreachable"
    );
    assert_eq!(
        &got[0][8..24],
        &"fc00:44:0:1::"
            .parse::<std::net::Ipv6Addr>()
            .expect("ip")
            .octets()
    );
    assert_eq!(&got[0][24..40], &pkt[8..24], "to the sender");
}

#[test]
fn gso_refused_at_run_time_falls_back_to_sendmmsg() {
    let (a, b) = pair();
    a.sock.refuse_gso.store(true, Ordering::Relaxed);
    assert!(a.pump.sender().gso(), "the kernel said it has GSO");
    // A TCP super-packet of 10 segments: one run of 10 datagrams.
    let read = super_packet(10, 1000);
    for _ in 0..2 {
        a.tun.inject(read.clone());
    }
    eventually("every segment received", || {
        b.state.stats.rx_packets.load(Ordering::Relaxed) == 20
    });
    assert!(!a.pump.sender().gso(), "GSO is off for good");
    assert_eq!(a.sock.gso_sends.load(Ordering::Relaxed), 1, "tried once");
    // One sendmmsg per read, or one for both when the second was already queued and joined
    // the first's run (all segments full-size).
    let batches = a.sock.batch_sends.load(Ordering::Relaxed);
    assert!((1..=2).contains(&batches), "{batches} sendmmsg calls");
    eventually("nothing dropped", || {
        a.state.stats.tx_packets.load(Ordering::Relaxed) == 20
    });
    assert_eq!(a.state.stats.drops(DropReason::IoError), 0);
}

#[test]
fn runs_over_the_path_mtu_go_datagram_by_datagram_and_gso_stays_on() {
    let (a, b) = pair();
    // The kernel learned a path MTU below the segments (1000 bytes of TCP payload each).
    a.sock.path_mtu.store(900, Ordering::Relaxed);
    let read = super_packet(10, 1000);
    a.tun.inject(read.clone());
    eventually("every segment received", || {
        b.state.stats.rx_packets.load(Ordering::Relaxed) == 10
    });
    assert!(a.pump.sender().gso(), "GSO stays on for runs that fit");
    assert_eq!(a.state.stats.drops(DropReason::IoError), 0);
    // The path MTU goes back up: the next run leaves with one GSO send again.
    a.sock.path_mtu.store(usize::MAX, Ordering::Relaxed);
    let (gso, batches) = (
        a.sock.gso_sends.load(Ordering::Relaxed),
        a.sock.batch_sends.load(Ordering::Relaxed),
    );
    a.tun.inject(read);
    eventually("the next run received", || {
        b.state.stats.rx_packets.load(Ordering::Relaxed) == 20
    });
    assert_eq!(a.sock.gso_sends.load(Ordering::Relaxed), gso + 1);
    assert_eq!(a.sock.batch_sends.load(Ordering::Relaxed), batches);
}

#[test]
fn a_run_the_kernel_refuses_in_part_counts_each_packet() {
    let (a, b) = pair();
    // 100 segments: two GSO sends (64 + 36); the socket takes the first only.
    a.sock.sends_left.store(64, Ordering::Relaxed);
    a.tun.inject(super_packet(100, 300));
    eventually("every packet counted", || {
        a.state.stats.tx_packets.load(Ordering::Relaxed) + a.state.stats.drops(DropReason::IoError)
            == 100
    });
    assert_eq!(a.state.stats.tx_packets.load(Ordering::Relaxed), 64);
    assert_eq!(a.state.stats.drops(DropReason::IoError), 36);
    // 64 packets of 20 + 20 + 300 bytes went.
    assert_eq!(a.state.stats.tx_bytes.load(Ordering::Relaxed), 64 * 340);
    eventually("what went arrived", || {
        b.state.stats.rx_packets.load(Ordering::Relaxed) == 64
    });
}

#[test]
fn a_refused_tun_write_counts_every_packet_merged_into_it() {
    let (a, b) = pair();
    b.tun.refuse_writes.store(true, Ordering::Relaxed);
    // 10 segments that b's GRO merges back into one packet, which the TUN refuses.
    a.tun.inject(super_packet(10, 1000));
    eventually("every packet counted as lost", || {
        b.state.stats.drops(DropReason::IoError) == 10
    });
    assert_eq!(b.state.stats.rx_packets.load(Ordering::Relaxed), 0);
    assert_eq!(b.state.stats.rx_bytes.load(Ordering::Relaxed), 0);
    // Written: each of the 10 counted, with its own headers.
    b.tun.refuse_writes.store(false, Ordering::Relaxed);
    a.tun.inject(super_packet(10, 1000));
    eventually("received", || {
        b.state.stats.rx_packets.load(Ordering::Relaxed) == 10
    });
    assert_eq!(b.state.stats.rx_bytes.load(Ordering::Relaxed), 10 * 1040);
}

#[test]
fn truncated_messages_are_dropped() {
    let (a, b) = pair();
    // Larger than a receive slot (64 KiB): only its beginning would arrive.
    a.sock.send_to(b.sock.local_addr(), &vec![0x45; 70_000]);
    eventually("a malformed drop", || {
        b.state.stats.drops(DropReason::Malformed) == 1
    });
    assert!(b.tun.written(Duration::from_millis(50)).is_empty());
}

#[test]
fn dropping_the_pump_stops_and_joins_its_threads() {
    let (a, _b) = pair();
    let Node {
        codec, mut pump, ..
    } = a;
    let (tx, rx) = std::sync::mpsc::channel();
    pump.spawn("test-extra".into(), move |stop| {
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = tx.send(());
    })
    .expect("spawn");
    assert!(Arc::strong_count(&codec) > 1, "the threads hold the codec");
    drop(pump);
    assert_eq!(Arc::strong_count(&codec), 1, "every packet thread ended");
    assert!(rx.try_recv().is_ok(), "the extra thread ended too");
}

/// What the receiver thread does after writing to the TUN (pods' answers are queued by then):
/// with the queue's turn, everything queued leaves at once, in order, and an empty queue is
/// not an error.
#[test]
fn the_turn_holder_sends_what_is_queued_in_order() {
    let net = Arc::new(FakeNet::default());
    let b = node(&net, 2, 1);
    let a_addr = SocketAddr::from(([172, 30, 0, 1], 8285));
    let sock = Arc::new(net.bind(a_addr));
    let tun = FakeTun::default();
    let state = DeviceState::new(MTU);
    let codec = Plain {
        subnet: "10.244.2.0/24".parse().expect("net"),
        peer: b.sock.local_addr(),
    };
    let sender = super::UdpSender::new(sock.clone());
    let ctx = super::tx::Ctx {
        codec: &codec,
        tun: &tun,
        sender: &sender,
        state: &state,
    };
    let turn = super::tx::TxTurn::new(&codec);
    let mut tally = Tally::default();
    let mut side = turn.try_lock().expect("nobody holds it");
    assert_eq!(ctx.drain(&mut side, &mut tally).expect("empty"), 0);
    for i in 0..3u8 {
        tun.inject(from_pod(&udp_packet([10, 244, 1, 5], [10, 244, 2, i], 100)));
    }
    assert_eq!(ctx.drain(&mut side, &mut tally).expect("drain"), 3);
    assert!(turn.try_lock().is_none(), "held while in use");
    let got = delivered(&b.tun, 3, Duration::from_secs(3));
    let dsts: Vec<u8> = got.iter().map(|p| p[19]).collect();
    assert_eq!(dsts, [0, 1, 2], "all, in order");
    assert_eq!(sock.gso_sends.load(Ordering::Relaxed), 1, "one send");
}

/// The receiver thread alone (no sender thread to fall back on): what the pod answers to a
/// small packet it delivered, queued before its write returned, leaves from the receiver.
#[test]
fn the_receiver_sends_what_the_pod_answered_at_once() {
    let net = Arc::new(FakeNet::default());
    let a = node(&net, 1, 2);
    let b_addr = SocketAddr::from(([172, 30, 0, 2], 8285));
    let sock = Arc::new(net.bind(b_addr));
    let tun = FakeTun::default();
    // The pod echoes: the same packet back, addresses swapped (checksums stay right).
    tun.answer_with(|written| {
        let mut pkt = written.get(VNET_HDR_LEN..)?.to_vec();
        let (src, dst) = (pkt[12..16].to_vec(), pkt[16..20].to_vec());
        pkt[12..16].copy_from_slice(&dst);
        pkt[16..20].copy_from_slice(&src);
        Some(from_pod(&pkt))
    });
    let state = DeviceState::new(MTU);
    state.set_own(OwnSubnets {
        v4: Some("10.244.2.0/24".parse().expect("net")),
        v6: None,
    });
    let codec = Plain {
        subnet: "10.244.1.0/24".parse().expect("net"),
        peer: a.sock.local_addr(),
    };
    let sender = super::UdpSender::new(sock.clone());
    let ctx = super::tx::Ctx {
        codec: &codec,
        tun: &tun,
        sender: &sender,
        state: &state,
    };
    let turn = super::tx::TxTurn::new(&codec);
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| super::rx::run(&ctx, &*sock, &turn, &stop));
        let ping = udp_packet([10, 244, 1, 5], [10, 244, 2, 7], 100);
        a.tun.inject(from_pod(&ping));
        let got = delivered(&a.tun, 1, Duration::from_secs(3));
        stop.store(true, Ordering::Relaxed);
        assert_eq!(got.len(), 1, "the answer came back");
        assert_eq!(&got[0][12..16], &[10, 244, 2, 7], "from the pod");
    });
}
