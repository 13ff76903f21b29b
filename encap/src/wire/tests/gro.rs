use super::*;
use crate::wire::gro::Gro;
use crate::wire::segment::complete_csum;
use crate::wire::vnet::*;
use crate::wire::WireError;

const MAX: usize = 65535 + VNET_HDR_LEN;

/// Pushes all and returns each output as (vnet header, IP packet).
fn run(gro: &mut Gro, pkts: &[Vec<u8>]) -> Vec<(VnetHdr, Vec<u8>)> {
    for p in pkts {
        gro.push(p).unwrap();
    }
    let out = gro
        .packets()
        .map(|b| (VnetHdr::decode(b).unwrap(), b[VNET_HDR_LEN..].to_vec()))
        .collect();
    gro.clear();
    out
}

/// The checks `virtio_net_hdr_to_skb` makes on a GSO TCP write, plus: completing the checksum
/// the way the kernel would yields a valid one.
fn assert_kernel_accepts(h: &VnetHdr, pkt: &[u8]) {
    let v6 = pkt[0] >> 4 == 6;
    assert_eq!(h.gso_type, if v6 { GSO_TCPV6 } else { GSO_TCPV4 });
    assert_eq!(h.flags, FLAG_NEEDS_CSUM);
    let ihl = ip_hdr_len(pkt);
    assert_eq!(usize::from(h.csum_start), ihl);
    assert_eq!(h.csum_offset, 16);
    assert!(usize::from(h.csum_start) + usize::from(h.csum_offset) + 2 <= pkt.len());
    let thl = usize::from(pkt[ihl + 12] >> 4) * 4;
    assert_eq!(usize::from(h.hdr_len), ihl + thl);
    assert!(
        pkt.len() - ihl > usize::from(h.gso_size),
        "really a GSO packet"
    );
    assert!(h.gso_size > 0);
    assert_ip_valid(pkt);
    let mut done = pkt.to_vec();
    complete_csum(h, &mut done).unwrap();
    assert_l4_valid(&done, 6);
}

fn round_trip(spec: TcpSpec, mss: u16) {
    // The largest super-packet: 65535 bytes of IP packet.
    let payload = 65535 - spec.ip_hdr_len() - spec.l4_hdr_len();
    let (spec, _h, _p, segs) = cut(spec, payload, mss, 9);
    let mut gro = Gro::new(8, MAX);
    let out = run(&mut gro, &segs);
    assert_eq!(out.len(), 1, "all segments merged");
    let (h, pkt) = &out[0];
    assert_kernel_accepts(h, pkt);
    assert_eq!(h.gso_size, mss);
    let hlen = spec.ip_hdr_len() + spec.l4_hdr_len();
    assert_eq!(&pkt[hlen..], &spec.payload[..]);
    assert_eq!(pkt[spec.ip_hdr_len() + 13], spec.flags);
    // What the kernel would segment it into is exactly what was received.
    let mut again = vec![0u8; 128 * 1024];
    let s = segment(h, pkt, 9000, &mut again).unwrap();
    assert_eq!(split_out(&again, &s), segs);
}

#[test]
fn wire_gro_round_trip_v4_v6() {
    round_trip(TcpSpec::v4().flags(ACK | PSH), 1400);
    round_trip(TcpSpec::v4().df(false).flags(ACK), 1448);
    round_trip(TcpSpec::v6().flags(ACK | PSH), 1400);
    round_trip(
        TcpSpec::v6().options(&[1, 1, 8, 10, 1, 2, 3, 4, 5, 6, 7, 8]),
        1388,
    );
}

#[test]
fn wire_gro_single_packets_unchanged_with_zero_header() {
    let pkts = vec![
        TcpSpec::v4().payload(b"one").build(),
        TcpSpec::v4().udp().payload(b"udp").build(),
        TcpSpec::v6().flags(SYN).build(),
        vec![0x45, 1, 2], // garbage passes through too
    ];
    let mut gro = Gro::new(8, MAX);
    let out = run(&mut gro, &pkts);
    assert_eq!(out.len(), 4);
    for ((h, p), orig) in out.iter().zip(&pkts) {
        assert_eq!(*h, VnetHdr::default());
        assert_eq!(p, orig);
    }
}

/// Segment `i` of a flow with MSS 1000: seq = base + 1000*i, id = i.
fn seg(spec: &TcpSpec, i: u32, len: usize) -> TcpSpec {
    spec.clone()
        .seq(spec.seq.wrapping_add(1000 * i))
        .id(spec.id.wrapping_add(i as u16))
        .payload(&vec![i as u8; len])
}

/// What the kernel cuts a merged UDP packet into (checked as it would check the write).
fn datagrams_of(h: &VnetHdr, pkt: &[u8]) -> Vec<Vec<u8>> {
    assert_eq!(h.flags, FLAG_NEEDS_CSUM);
    let ihl = ip_hdr_len(pkt);
    assert_eq!(
        (
            usize::from(h.csum_start),
            h.csum_offset,
            usize::from(h.hdr_len)
        ),
        (ihl, 6, ihl + 8)
    );
    assert!(pkt.len() - ihl - 8 > usize::from(h.gso_size), "really GSO");
    assert_ip_valid(pkt);
    let mut done = pkt.to_vec();
    complete_csum(h, &mut done).unwrap();
    assert_l4_valid(&done, 17);
    let mut out = vec![0u8; 128 * 1024];
    let s = segment(h, pkt, 9000, &mut out).unwrap();
    split_out(&out, &s)
}

fn segs_of(out: &[(VnetHdr, Vec<u8>)]) -> Vec<u16> {
    out.iter()
        .map(|(h, p)| {
            let n = p.len().saturating_sub(ip_hdr_len(p) + 20);
            if h.gso_type == GSO_NONE {
                1
            } else {
                n.div_ceil(usize::from(h.gso_size)) as u16
            }
        })
        .collect()
}

#[test]
fn wire_gro_gap_flags_and_short_segments_end_a_merge() {
    let base = TcpSpec::v4();
    let mut gro = Gro::new(16, MAX);

    // Gap: 0 1 _ 3 4.
    let pkts: Vec<_> = [0, 1, 3, 4]
        .iter()
        .map(|&i| seg(&base, i, 1000).build())
        .collect();
    let out = run(&mut gro, &pkts);
    assert_eq!(segs_of(&out), [2, 2]);
    for (h, p) in &out {
        assert_kernel_accepts(h, p);
    }

    // PSH ends the merge (and is kept); the next segment starts a new one.
    let pkts: Vec<_> = (0..4)
        .map(|i| {
            let s = seg(&base, i, 1000);
            if i == 1 {
                s.flags(ACK | PSH).build()
            } else {
                s.build()
            }
        })
        .collect();
    let out = run(&mut gro, &pkts);
    assert_eq!(segs_of(&out), [2, 2]);
    assert_eq!(out[0].1[20 + 13], ACK | PSH);
    assert_eq!(out[1].1[20 + 13], ACK);

    // A shorter segment ends it; a longer one cannot join.
    let pkts = vec![
        seg(&base, 0, 1000).build(),
        seg(&base, 1, 1000).build(),
        seg(&base, 2, 500).build(),
        seg(&base, 2, 500).seq(base.seq.wrapping_add(2500)).build(),
    ];
    let out = run(&mut gro, &pkts);
    assert_eq!(segs_of(&out), [3, 1]);
    assert_eq!(out[0].1.len(), 20 + 20 + 2500);
    let pkts = vec![
        seg(&base, 0, 500).build(),
        seg(&base, 0, 1000).seq(base.seq.wrapping_add(500)).build(),
    ];
    assert_eq!(segs_of(&run(&mut gro, &pkts)), [1, 1]);

    // FIN, URG, SYN segments pass alone and nothing behind them joins what came before.
    for f in [ACK | FIN, ACK | URG, ACK | CWR] {
        let pkts = vec![
            seg(&base, 0, 1000).build(),
            seg(&base, 1, 1000).flags(f).build(),
            seg(&base, 2, 1000).build(),
            seg(&base, 3, 1000).build(),
        ];
        let out = run(&mut gro, &pkts);
        assert_eq!(segs_of(&out), [1, 1, 2], "flags {f:#x}");
        assert_eq!(out[1].1, pkts[1]);
    }

    // Different ack, window, options or TTL: no merge.
    let mut other_ack = seg(&base, 1, 1000);
    other_ack.ack += 1;
    let mut other_win = seg(&base, 1, 1000);
    other_win.window += 1;
    for second in [
        other_ack,
        other_win,
        seg(&base, 1, 1000).ttl(3),
        seg(&base, 1, 1000).options(&[1, 1, 1, 1]),
    ] {
        let pkts = vec![seg(&base, 0, 1000).build(), second.build()];
        assert_eq!(segs_of(&run(&mut gro, &pkts)), [1, 1]);
    }

    // Without DF, IPv4 IDs must be consecutive; with DF they need not be.
    let nodf = base.clone().df(false);
    let pkts = vec![
        seg(&nodf, 0, 1000).build(),
        seg(&nodf, 1, 1000).id(7).build(),
    ];
    assert_eq!(segs_of(&run(&mut gro, &pkts)), [1, 1]);
    let pkts = vec![
        seg(&base, 0, 1000).build(),
        seg(&base, 1, 1000).id(7).build(),
    ];
    assert_eq!(segs_of(&run(&mut gro, &pkts)), [2]);
}

#[test]
fn wire_gro_corrupt_segment_stays_alone() {
    let base = TcpSpec::v6();
    let mut pkts: Vec<_> = (0..4).map(|i| seg(&base, i, 1000).build()).collect();
    let last = pkts[2].len() - 1;
    pkts[2][last] ^= 0x55;
    let mut gro = Gro::new(16, MAX);
    let out = run(&mut gro, &pkts);
    assert_eq!(segs_of(&out), [2, 1, 1]);
    assert_eq!(
        out[1].1, pkts[2],
        "passed on unchanged for the kernel to drop"
    );
    assert_eq!(out[1].0, VnetHdr::default());
    // A corrupt first segment does not become a merge head either.
    let mut pkts: Vec<_> = (0..3).map(|i| seg(&base, i, 1000).build()).collect();
    pkts[0][60] ^= 1;
    assert_eq!(segs_of(&run(&mut gro, &pkts)), [1, 2]);
    // Nor does an IPv4 packet whose header checksum is wrong.
    let b4 = TcpSpec::v4();
    let mut pkts: Vec<_> = (0..3).map(|i| seg(&b4, i, 1000).build()).collect();
    pkts[1][10] ^= 1;
    assert_eq!(segs_of(&run(&mut gro, &pkts)), [1, 1, 1]);
}

#[test]
fn wire_gro_trusting_skips_only_the_tcp_checksum() {
    let base = TcpSpec::v6();
    let mut pkts: Vec<_> = (0..4).map(|i| seg(&base, i, 1000).build()).collect();
    pkts[2][60] ^= 1;
    // The caller vouches for the bytes: the segment merges, and the kernel gets a correct
    // checksum to finish (NEEDS_CSUM) over what was received.
    let mut gro = Gro::new(16, MAX).trusting();
    let out = run(&mut gro, &pkts);
    assert_eq!(segs_of(&out), [4]);
    assert_kernel_accepts(&out[0].0, &out[0].1);
    // IPv4 header checksums are still checked.
    let b4 = TcpSpec::v4();
    let mut pkts: Vec<_> = (0..3).map(|i| seg(&b4, i, 1000).build()).collect();
    pkts[1][10] ^= 1;
    assert_eq!(segs_of(&run(&mut gro, &pkts)), [1, 1, 1]);
}

#[test]
fn wire_gro_interleaved_flows_and_passthrough_keep_order() {
    let a = TcpSpec::v4();
    let b = TcpSpec::v4().ports(40001, 5201);
    let c = TcpSpec::v6();
    let udp = TcpSpec::v4().udp();
    let mut pkts = Vec::new();
    let mut datagrams = Vec::new();
    for i in 0..6 {
        pkts.push(seg(&a, i, 1000).build());
        pkts.push(seg(&b, i, 1000).build());
        pkts.push(seg(&c, i, 1000).build());
        // IDs counting up, as the kernel's cutting makes them.
        let d = udp.clone().id(udp.id.wrapping_add(i as u16));
        datagrams.push(d.payload(&[i as u8; 10]).build());
        pkts.push(datagrams[i as usize].clone());
    }
    let mut gro = Gro::new(64, MAX);
    let out = run(&mut gro, &pkts);
    assert_eq!(out.len(), 4);
    assert_eq!(segs_of(&out[..3]), [6, 6, 6]);
    for (h, p) in &out[..3] {
        assert_kernel_accepts(h, p);
    }
    let ports = |p: &[u8]| u16::from_be_bytes([p[ip_hdr_len(p)], p[ip_hdr_len(p) + 1]]);
    assert_eq!(ports(&out[0].1), 40000);
    assert_eq!(ports(&out[1].1), 40001);
    assert_eq!(out[2].1[0] >> 4, 6);
    // The datagrams became one, which the kernel cuts back into them, in arrival order.
    let (h, p) = &out[3];
    assert_eq!((h.gso_type, h.gso_size), (GSO_UDP_L4, 10));
    assert_eq!(datagrams_of(h, p), datagrams, "UDP in arrival order");
    // Payload bytes of flow A are in sequence order.
    let pa = &out[0].1[40..];
    for i in 0..6 {
        assert!(pa[i * 1000..(i + 1) * 1000].iter().all(|&x| x == i as u8));
    }
}

#[test]
fn wire_gro_udp_round_trip_and_what_ends_a_run() {
    for base in [TcpSpec::v4().udp(), TcpSpec::v6().udp()] {
        // A UDP super-packet as a pod sends it with UDP_SEGMENT, cut the way we send it:
        // merged back whole, and cut again into exactly those datagrams.
        let payload = 64 * 1000 - 500;
        let (_, _, _, segs) = cut(base.clone(), payload, 1000, 3);
        assert_eq!(segs.len(), 64);
        let mut gro = Gro::new(8, MAX);
        let out = run(&mut gro, &segs);
        assert_eq!(out.len(), 1, "all 64 in one");
        assert_eq!(datagrams_of(&out[0].0, &out[0].1), segs);
        // The 65th starts another; a larger one, another port or another TTL starts another;
        // a shorter one joins as the last.
        // IDs count up through each run, as the kernel's cutting makes them.
        let d = |len: usize, i: u8, id: u16| base.clone().id(id).payload(&vec![i; len]).build();
        let mut more: Vec<Vec<u8>> = (0..65).map(|i| d(100, i as u8, i as u16)).collect();
        more.push(d(101, 1, 0));
        more.push(d(100, 2, 1)); // shorter: joins, and ends the run
        more.push(d(40, 3, 0));
        more.push(d(100, 4, 0)); // larger than the run's size
        more.push(base.clone().ports(1, 2).payload(&[5; 100]).build());
        more.push(base.clone().ttl(9).payload(&[6; 100]).build());
        let out = run(&mut gro, &more);
        let counts: Vec<usize> = out
            .iter()
            .map(|(h, p)| {
                if h.gso_type == GSO_NONE {
                    1
                } else {
                    datagrams_of(h, p).len()
                }
            })
            .collect();
        assert_eq!(counts, [64, 1, 2, 1, 1, 1, 1]);
        let again: Vec<Vec<u8>> = out
            .iter()
            .flat_map(|(h, p)| {
                if h.gso_type == GSO_NONE {
                    vec![p.clone()]
                } else {
                    datagrams_of(h, p)
                }
            })
            .collect();
        assert_eq!(again, more, "nothing lost, moved or changed");
    }
    // Without DF, IPv4 IDs must count up; a corrupt datagram or one without a checksum stays
    // alone where checksums are verified.
    let base = TcpSpec::v4().udp().df(false);
    let d = |i: u16| base.clone().id(i).payload(&[1; 50]).build();
    let mut gro = Gro::new(8, MAX);
    assert_eq!(run(&mut gro, &[d(1), d(2), d(4)]).len(), 2);
    let mut bad = d(3);
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert_eq!(run(&mut gro, &[d(2), bad.clone()]).len(), 2);
    let mut none = d(3);
    none[26..28].copy_from_slice(&[0, 0]);
    assert_eq!(run(&mut gro, &[d(2), none.clone()]).len(), 2);
    // Trusting the bytes, the corrupt one merges, the one without a checksum still not (an
    // IPv6 one must be dropped, and merging would give it a valid checksum).
    let mut trusting = Gro::new(8, MAX).trusting();
    assert_eq!(run(&mut trusting, &[d(2), bad]).len(), 1);
    assert_eq!(run(&mut trusting, &[d(2), none]).len(), 2);
    let v6 = TcpSpec::v6().udp();
    let mut none6 = v6.clone().payload(&[1; 50]).build();
    none6[46..48].copy_from_slice(&[0, 0]);
    let ok6 = v6.clone().payload(&[1; 50]).build();
    assert_eq!(run(&mut trusting, &[ok6.clone(), none6]).len(), 2);
    assert_eq!(run(&mut trusting, &[ok6.clone(), ok6.clone()]).len(), 1);
    // Where the TUN takes no UDP super-packets, datagrams pass one by one; TCP still merges.
    let mut no_uso = Gro::new(8, MAX).trusting().without_udp();
    assert_eq!(run(&mut no_uso, &[ok6.clone(), ok6.clone()]).len(), 2);
    let t = TcpSpec::v4();
    assert_eq!(
        segs_of(&run(
            &mut no_uso,
            &[seg(&t, 0, 1000).build(), seg(&t, 1, 1000).build()]
        )),
        [2]
    );
    // Something between the same two addresses that may belong to the flow without showing
    // its ports (here another protocol) ends the run, so nothing moves in front of it.
    let a = d(2);
    let mut other = d(3);
    other[9] = 47; // GRE
    other[10..12].copy_from_slice(&[0, 0]);
    let c = crate::wire::checksum::ipv4_header(&other[..20]);
    other[10..12].copy_from_slice(&c.to_be_bytes());
    let out = run(&mut gro, &[a, other, d(3)]);
    assert_eq!(out.len(), 3);
    assert!(out.iter().all(|(h, _)| h.gso_type == GSO_NONE));
}

#[test]
fn wire_gro_full_batch_and_limits() {
    let base = TcpSpec::v4();
    let mut gro = Gro::new(2, MAX);
    assert!(gro.is_empty());
    gro.push(&seg(&base, 0, 1000).build()).unwrap();
    gro.push(&base.clone().udp().payload(b"u").build()).unwrap();
    assert!(gro.is_full());
    assert_eq!(gro.len(), 2);
    // Merging still works when full; a new packet does not fit.
    gro.push(&seg(&base, 1, 1000).build()).unwrap();
    assert_eq!(gro.push(&seg(&base, 5, 1000).build()), Err(WireError::Full));
    assert_eq!(gro.len(), 2);
    assert_eq!(segs_of(&run(&mut gro, &[])), [2, 1]);
    assert!(gro.is_empty());

    // Too big for a slot.
    let mut small = Gro::new(2, 100 + VNET_HDR_LEN);
    assert!(matches!(
        small.push(&seg(&base, 0, 1000).build()),
        Err(WireError::TooBig { .. })
    ));
    // Segments stop joining at 65535 bytes.
    let pkts: Vec<_> = (0..70).map(|i| seg(&base, i, 1000).build()).collect();
    let mut gro = Gro::new(8, MAX);
    let out = run(&mut gro, &pkts);
    assert_eq!(segs_of(&out), [65, 5]);
    assert!(out[0].1.len() <= 65535);
    // A zero-capacity batch is always full.
    let mut none = Gro::new(0, MAX);
    assert!(none.is_full());
    assert_eq!(none.push(&pkts[0]), Err(WireError::Full));
}

#[test]
fn wire_gro_push_after_packets_starts_new_output() {
    let base = TcpSpec::v4();
    let mut gro = Gro::new(8, MAX);
    gro.push(&seg(&base, 0, 1000).build()).unwrap();
    gro.push(&seg(&base, 1, 1000).build()).unwrap();
    let first: Vec<Vec<u8>> = gro.packets().map(<[u8]>::to_vec).collect();
    gro.push(&seg(&base, 2, 1000).build()).unwrap();
    let all: Vec<Vec<u8>> = gro.packets().map(<[u8]>::to_vec).collect();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0], first[0], "a finalized packet is not touched again");
    assert_eq!(VnetHdr::decode(&all[1]).unwrap(), VnetHdr::default());
}
