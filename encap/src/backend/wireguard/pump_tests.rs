//! The wireguard codec on the real pump threads over the in-memory TUN and network
//! (`pump/fake.rs`): an IPv6 TCP super-packet from a pod is segmented, sealed, sent over an
//! IPv6 underlay, opened, checked against the sender's IPv6 AllowedIPs, merged again and
//! written to the far TUN; and the same device carries IPv4 beside it.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;

use super::codec::WgCodec;
use super::codec_tests::peer_of;
use super::keys::{random_key, StaticKeys};
use super::peers::WgTable;
use crate::backend::pump::fake::{FakeNet, FakeTun, FakeUdp};
use crate::backend::pump::{DeviceState, OwnSubnets, Pump};
use crate::stats::DropReason;
use crate::wire::testutil::TcpSpec;
use crate::wire::vnet::{GSO_NONE, GSO_TCPV6};
use crate::wire::{VnetHdr, VNET_HDR_LEN};

const MTU: usize = 1420;

struct Node {
    tun: Arc<FakeTun>,
    state: Arc<DeviceState>,
    codec: Arc<WgCodec>,
    addr: SocketAddr,
    _pump: Pump<Arc<FakeUdp>>,
}

fn v4net(n: u8) -> IpNet {
    format!("10.244.{n}.0/24").parse().expect("net")
}

fn v6net(n: u8) -> IpNet {
    format!("fc00:44:0:{n}::/64").parse().expect("net")
}

fn node(net: &Arc<FakeNet>, n: u8) -> Node {
    let secret = StaticSecret::from(random_key().expect("random"));
    let public = PublicKey::from(&secret);
    let codec = Arc::new(WgCodec::new(StaticKeys { secret, public }));
    let addr: SocketAddr = format!("[fd00:30::{n}]:51821").parse().expect("addr");
    let tun = Arc::new(FakeTun::default());
    let sock = Arc::new(net.bind(addr));
    let state = Arc::new(DeviceState::new(MTU));
    let (IpNet::V4(v4), IpNet::V6(v6)) = (v4net(n), v6net(n)) else {
        unreachable!("one of each family")
    };
    state.set_own(OwnSubnets {
        v4: Some(v4),
        v6: Some(v6),
    });
    let pump = Pump::run(
        "t",
        codec.clone(),
        state.clone(),
        vec![(tun.clone(), sock).into()],
    )
    .expect("pump");
    Node {
        tun,
        state,
        codec,
        addr,
        _pump: pump,
    }
}

/// Makes `b` the one peer of `a`, AllowedIPs both of b's subnets, as a single-device mode does.
fn link(a: &Node, b: &Node, b_net: u8, index: u32) {
    let peer = peer_of(&a.codec, &b.codec, index, b.addr);
    let table = WgTable::new(vec![(peer, vec![v4net(b_net), v6net(b_net)])]);
    a.codec.table.store(Arc::new(table));
}

fn from_pod(hdr: &VnetHdr, pkt: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; VNET_HDR_LEN];
    hdr.encode(&mut v).expect("header");
    v.extend_from_slice(pkt);
    v
}

/// Everything written to `tun` until `bytes` of TCP payload came or 5 s passed: the payload
/// in order, and the (source, GSO type) of each write.
fn tcp_payload(tun: &FakeTun, bytes: usize) -> (Vec<u8>, Vec<(IpAddr, u8)>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut payload, mut writes) = (Vec::new(), Vec::new());
    while payload.len() < bytes && Instant::now() < deadline {
        for w in tun.written(Duration::from_millis(50)) {
            let hdr = VnetHdr::decode(&w).expect("virtio header");
            let pkt = &w[VNET_HDR_LEN..];
            let (src, _) = crate::wire::ip::addrs(pkt).expect("an IP packet");
            writes.push((src, hdr.gso_type));
            let ip_hdr = if pkt[0] >> 4 == 6 { 40 } else { 20 };
            let tcp_hdr = usize::from(pkt[ip_hdr + 12] >> 4) * 4;
            payload.extend_from_slice(&pkt[ip_hdr + tcp_hdr..]);
        }
    }
    (payload, writes)
}

#[test]
fn ipv6_super_packet_round_trip_over_an_ipv6_underlay() {
    let net = Arc::new(FakeNet::default());
    let (a, b) = (node(&net, 1), node(&net, 2));
    link(&a, &b, 2, 1 << 8);
    link(&b, &a, 1, 2 << 8);

    // 20 segments of 1000 bytes of IPv6/TCP as one TSO read from a's TUN (GSO_TCPV6).
    let payload: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    let mut spec = TcpSpec::v6().payload(&payload);
    spec.src = "fc00:44:0:1::5".parse().expect("ip");
    spec.dst = "fc00:44:0:2::7".parse().expect("ip");
    let (hdr, pkt) = spec.build_gso(1000);
    // The first one waits for the handshake (the peer stages it, and sends its segments one by
    // one once the session exists); the second, injected after, rides the session as one run.
    a.tun.inject(from_pod(&hdr, &pkt));
    let (first, _) = tcp_payload(&b.tun, payload.len());
    assert_eq!(first, payload, "the staged segments arrived");
    a.tun.inject(from_pod(&hdr, &pkt));
    let (got, writes) = tcp_payload(&b.tun, payload.len());
    assert_eq!(got, payload, "every segment arrived");
    assert!(writes.iter().all(|(src, _)| *src == spec.src), "{writes:?}");
    assert!(
        writes.iter().any(|(_, gso)| *gso == GSO_TCPV6),
        "segments of a flow merged back into IPv6 super-packets: {writes:?}"
    );
    assert_eq!(b.state.stats.drops(DropReason::SpoofedSource), 0);

    // The same device and peer carry IPv4.
    let mut spec4 = TcpSpec::v4().payload(&payload[..500]);
    spec4.src = "10.244.1.5".parse().expect("ip");
    spec4.dst = "10.244.2.7".parse().expect("ip");
    let plain = VnetHdr::default();
    a.tun.inject(from_pod(&plain, &spec4.build()));
    let (got, writes) = tcp_payload(&b.tun, 500);
    assert_eq!(got, &payload[..500]);
    assert_eq!(writes, [(spec4.src, GSO_NONE)]);

    // b answers over the session a set up; counters add up on both sides.
    let mut back = TcpSpec::v6().payload(b"pong");
    back.src = spec.dst;
    back.dst = spec.src;
    b.tun.inject(from_pod(&plain, &back.build()));
    assert_eq!(tcp_payload(&a.tun, 4).0, b"pong");
    let deadline = Instant::now() + Duration::from_secs(3);
    while a.state.stats.rx_packets.load(Ordering::Relaxed) < 1 {
        assert!(Instant::now() < deadline, "a counted what it received");
        std::thread::sleep(Duration::from_millis(10));
    }
    // a counts what it sent in inner bytes, as b counts what it received: not the data
    // messages' headers, padding and tags.
    let bytes = |n: &Node| {
        (
            n.state.stats.tx_bytes.load(Ordering::Relaxed),
            n.state.stats.rx_bytes.load(Ordering::Relaxed),
        )
    };
    while bytes(&a).0 != bytes(&b).1 {
        assert!(
            Instant::now() < deadline,
            "a sent {:?}, b got {:?}",
            bytes(&a),
            bytes(&b)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(bytes(&a).0, 2 * (20 * 60 + 20_000) + 540);
}

#[test]
fn ipv6_from_outside_the_peers_subnet_is_dropped() {
    let net = Arc::new(FakeNet::default());
    let (a, b) = (node(&net, 1), node(&net, 2));
    link(&a, &b, 2, 1 << 8);
    link(&b, &a, 1, 2 << 8);
    // From a pod address of node 3: a may not send it, however well sealed.
    let mut spec = TcpSpec::v6().udp().payload(&[9u8; 200]);
    spec.src = "fc00:44:0:3::5".parse().expect("ip");
    spec.dst = "fc00:44:0:2::7".parse().expect("ip");
    a.tun.inject(from_pod(&VnetHdr::default(), &spec.build()));
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.state.stats.drops(DropReason::SpoofedSource) < 1 {
        assert!(Instant::now() < deadline, "no spoofed_source drop at b");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(b.tun.written(Duration::from_millis(100)).is_empty());
}
