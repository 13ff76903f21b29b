//! Random and mutated bytes through every decoder: errors are fine, panics are not.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::*;
use crate::wire::gro::Gro;
use crate::wire::ip::{addrs, decrement_ttl, icmp_too_big, icmp_unreachable};
use crate::wire::segment::{complete_csum, segment_into, Layout};
use crate::wire::vnet::VNET_HDR_LEN;

fn everything(rng: &mut XorShift, data: &[u8], gro: &mut Gro, out: &mut [u8]) {
    let _ = VnetHdr::decode(data);
    let _ = addrs(data);
    let mut m = data.to_vec();
    let _ = decrement_ttl(&mut m);
    let v4: IpAddr = Ipv4Addr::new(10, 0, 0, 1).into();
    let v6: IpAddr = Ipv6Addr::LOCALHOST.into();
    for from in [v4, v6] {
        let _ = icmp_too_big(data, rng.next_u64() as u16, from, out);
        let _ = icmp_unreachable(data, from, &mut out[..rng.below(1400)]);
    }
    let mut hb = [0u8; 10];
    rng.fill(&mut hb);
    let mut h = VnetHdr::decode(&hb).unwrap();
    // Bias towards meaningful gso types so the deep paths run.
    h.gso_type = [0, 1, 3, 4, 5, 0x81, h.gso_type][rng.below(7)];
    if rng.below(2) == 0 {
        h.gso_size = (h.gso_size % 2000).max(1);
    }
    let limit = rng.below(out.len() + 1);
    let _ = segment(&h, data, rng.below(70000), &mut out[..limit]);
    let tail = rng.below(80);
    let slots = Layout {
        head: rng.below(40),
        slot: move |len: usize| len + tail,
    };
    let _ = segment_into(&h, data, rng.below(70000), &mut out[..limit], &slots);
    let _ = complete_csum(&h, &mut m);
    if gro.push(data).is_err() {
        let _ = gro.packets().count();
        gro.clear();
    }
}

#[test]
fn wire_fuzz_random_bytes_never_panic() {
    let mut rng = XorShift::new(0xdead_beef);
    let mut gro = Gro::new(4, 65535 + VNET_HDR_LEN);
    let mut out = vec![0u8; 70000];
    for _ in 0..20000 {
        let len = rng.below(120);
        let mut data = rng.bytes(len);
        // Make the version nibble plausible most of the time.
        if let Some(b) = data.first_mut() {
            *b = (*b & 0x0f) | [0x40, 0x60, *b & 0xf0][rng.below(3)];
        }
        everything(&mut rng, &data, &mut gro, &mut out);
    }
}

#[test]
fn wire_fuzz_mutated_valid_packets_never_panic() {
    let mut rng = XorShift::new(42);
    let mut gro = Gro::new(4, 65535 + VNET_HDR_LEN);
    let mut out = vec![0u8; 70000];
    let bases = [
        TcpSpec::v4().payload(&[3; 3000]),
        TcpSpec::v6().payload(&[4; 3000]),
        TcpSpec::v4().udp().payload(&[5; 3000]),
        TcpSpec::v6().udp().payload(&[6; 3000]),
        TcpSpec::v4().options(&[1, 1, 1, 1]).payload(&[7; 100]),
    ];
    for round in 0..4000 {
        let spec = &bases[round % bases.len()];
        let (_, mut p) = spec.build_gso(1000);
        // Flip a few bytes in the headers, sometimes truncate.
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(70);
            if let Some(b) = p.get_mut(at) {
                *b = rng.next_u64() as u8;
            }
        }
        if rng.below(3) == 0 {
            p.truncate(rng.below(p.len() + 1));
        }
        everything(&mut rng, &p, &mut gro, &mut out);
    }
    // And the GRO outputs of a batch of valid-but-shuffled segments are sane.
    let (_, _, _, segs) = cut(TcpSpec::v4(), 20000, 1000, 3);
    for _ in 0..200 {
        let mut g = Gro::new(32, 65535 + VNET_HDR_LEN);
        for _ in 0..segs.len() {
            let _ = g.push(&segs[rng.below(segs.len())]);
        }
        for p in g.packets() {
            assert!(VnetHdr::decode(p).is_ok());
            assert_ip_valid(&p[VNET_HDR_LEN..]);
        }
    }
}
