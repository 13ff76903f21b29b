//! The udp backend's per-datagram decoding: addresses, TTL, ICMP replies.
#![no_main]
use encap::wire::ip;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ip::addrs(data);
    let mut pkt = data.to_vec();
    let _ = ip::decrement_ttl(&mut pkt);
    let mut out = [0u8; 1500];
    let from = std::net::IpAddr::from([10, 244, 1, 0]);
    let _ = ip::icmp_unreachable(data, from, &mut out);
    let _ = ip::icmp_too_big(data, 1400, from, &mut out);
    let from6 = std::net::IpAddr::from([0xfc00, 0, 0, 1, 0, 0, 0, 1]);
    let _ = ip::icmp_unreachable(data, from6, &mut out);
});
