use super::*;
use crate::wire::segment::{complete_csum, segment_into, Layout};
use crate::wire::vnet::*;
use crate::wire::WireError;

/// TCP timestamps option, padded: what Linux sends on every segment.
const TS_OPT: [u8; 12] = [1, 1, 8, 10, 0, 0, 1, 0, 0, 0, 2, 0];

fn check_tcp_segments(spec: &TcpSpec, segs: &[Vec<u8>], mss: usize) {
    let hlen = spec.ip_hdr_len() + spec.l4_hdr_len();
    let n = segs.len();
    assert_eq!(n, spec.payload.len().div_ceil(mss));
    let mut payload = Vec::new();
    for (i, s) in segs.iter().enumerate() {
        assert_ip_valid(s);
        assert_l4_valid(s, 6);
        let ihl = spec.ip_hdr_len();
        let t = &s[ihl..];
        let seq = u32::from_be_bytes(t[4..8].try_into().unwrap());
        assert_eq!(seq, spec.seq.wrapping_add((i * mss) as u32), "seq of {i}");
        let mut want = spec.flags;
        if i + 1 != n {
            want &= !(FIN | PSH);
        }
        if i != 0 {
            want &= !CWR;
        }
        assert_eq!(t[13], want, "flags of {i}");
        assert_eq!(&t[20..spec.l4_hdr_len()], &spec.options[..]);
        if ihl == 20 {
            let id = u16::from_be_bytes([s[4], s[5]]);
            assert_eq!(id, spec.id.wrapping_add(i as u16));
        }
        if i + 1 != n {
            assert_eq!(s.len(), hlen + mss);
        }
        payload.extend_from_slice(&s[hlen..]);
    }
    assert_eq!(payload, spec.payload);
}

#[test]
fn wire_segment_64k_v4_mss_1400() {
    let spec = TcpSpec::v4().flags(ACK | PSH | FIN | CWR);
    let (spec, h, p, segs) = cut(spec, 65535 - 40, 1400, 1);
    assert_eq!(p.len(), 65535);
    assert_eq!(segs.len(), 47);
    check_tcp_segments(&spec, &segs, 1400);
    // The MTU is an IP packet size: 1440 fits, 1439 does not.
    let mut out = vec![0u8; 70000];
    let s = segment(&h, &p, 1440, &mut out).unwrap();
    assert_eq!(
        s,
        Segments {
            count: 47,
            seg_len: 1440,
            last_len: 40 + (65495 - 46 * 1400),
            total: 46 * 1440 + 40 + (65495 - 46 * 1400)
        }
    );
    assert_eq!(
        segment(&h, &p, 1439, &mut out),
        Err(WireError::TooBig {
            len: 1440,
            mtu: 1439
        })
    );
    assert!(matches!(
        segment(&h, &p, 1500, &mut out[..s.total - 1]),
        Err(WireError::BufferTooSmall { .. })
    ));
}

#[test]
fn wire_segment_into_slots_puts_each_packet_at_its_head() {
    // WireGuard's layout: a 16-byte header before each packet, padding to 16 and a tag after.
    let spec = TcpSpec::v4().flags(ACK | PSH);
    let (_, h, p, segs) = cut(spec, 10_000, 1400, 3);
    let layout = Layout {
        head: 16,
        slot: |len: usize| 16 + len.div_ceil(16) * 16 + 16,
    };
    let mut out = vec![0xeeu8; 20_000];
    let s = segment_into(&h, &p, 1500, &mut out, &layout).unwrap();
    let last = segs.last().unwrap().len();
    assert_eq!((s.count, s.seg_len, s.last_len), (segs.len(), 1440, last));
    let stride = 16 + 1440 + 16;
    assert_eq!(
        s.total,
        (segs.len() - 1) * stride + 16 + last.div_ceil(16) * 16 + 16
    );
    for (i, seg) in segs.iter().enumerate() {
        let at = i * stride + 16;
        assert_eq!(&out[at..at + seg.len()], &seg[..], "packet {i}");
    }
    // No room for the last slot's tail: too small, as for packed packets.
    assert!(matches!(
        segment_into(&h, &p, 1500, &mut out[..s.total - 1], &layout),
        Err(WireError::BufferTooSmall { .. })
    ));
}

#[test]
fn wire_segment_v6_with_options_and_hdr_len_ignored() {
    let spec = TcpSpec::v6().options(&TS_OPT).flags(ACK | PSH);
    let spec = spec.payload(&XorShift::new(2).bytes(65535 - 32));
    let (mut h, p) = spec.build_gso(1388);
    h.hdr_len = 200; // Linux puts the linear length here; it must not matter
    let mut out = vec![0u8; 80000];
    let s = segment(&h, &p, 1500, &mut out).unwrap();
    let segs = split_out(&out, &s);
    check_tcp_segments(&spec, &segs, 1388);
    assert_eq!(s.seg_len, 40 + 32 + 1388);
}

#[test]
fn wire_segment_single_segment_gso_and_empty_payload() {
    let spec = TcpSpec::v4().payload(b"tiny").flags(ACK | PSH);
    let (h, p) = spec.build_gso(1400);
    let mut out = [0u8; 200];
    let s = segment(&h, &p, 1500, &mut out).unwrap();
    assert_eq!((s.count, s.seg_len, s.total), (1, p.len(), p.len()));
    assert_eq!(&out[..s.total], &spec.build()[..]);

    let spec = TcpSpec::v6().flags(ACK | FIN);
    let (h, p) = spec.build_gso(1400);
    let s = segment(&h, &p, 1500, &mut out).unwrap();
    assert_eq!(s.count, 1);
    assert_eq!(&out[..s.total], &spec.build()[..]);
}

#[test]
fn wire_segment_non_gso_completes_checksums() {
    for spec in [
        TcpSpec::v4().payload(b"hello tcp"),
        TcpSpec::v6().payload(b"hello tcp 6"),
        TcpSpec::v4().udp().payload(b"hello udp!"),
        TcpSpec::v6().udp().payload(b"hello udp 6"),
    ] {
        let (mut h, p) = spec.build_gso(0);
        h.gso_type = GSO_NONE;
        let mut out = [0u8; 200];
        let s = segment(&h, &p, 1500, &mut out).unwrap();
        assert_eq!(s.count, 1);
        assert_eq!(&out[..s.total], &spec.build()[..], "{spec:?}");
        // In place, too.
        let mut q = p.clone();
        complete_csum(&h, &mut q).unwrap();
        assert_eq!(q, spec.build());
        // Without NEEDS_CSUM the packet is copied untouched.
        h.flags = 0;
        let s = segment(&h, &p, 1500, &mut out).unwrap();
        assert_eq!(&out[..s.total], &p[..]);
        // Too big for the MTU.
        assert!(matches!(
            segment(&h, &p, p.len() - 1, &mut out),
            Err(WireError::TooBig { .. })
        ));
        // Checksum location outside the packet.
        h.flags = FLAG_NEEDS_CSUM;
        h.csum_offset = p.len() as u16;
        assert!(matches!(
            segment(&h, &p, 1500, &mut out),
            Err(WireError::Malformed(_))
        ));
    }
}

#[test]
fn wire_segment_uso_v4_v6() {
    for spec in [TcpSpec::v4().udp(), TcpSpec::v6().udp()] {
        let spec = spec.payload(&XorShift::new(5).bytes(5000));
        let (h, p) = spec.build_gso(1200);
        let mut out = vec![0u8; 8000];
        let s = segment(&h, &p, 1500, &mut out).unwrap();
        let segs = split_out(&out, &s);
        assert_eq!(segs.len(), 5);
        let ihl = spec.ip_hdr_len();
        let mut payload = Vec::new();
        for (i, seg) in segs.iter().enumerate() {
            assert_ip_valid(seg);
            assert_l4_valid(seg, 17);
            let ulen = u16::from_be_bytes([seg[ihl + 4], seg[ihl + 5]]) as usize;
            assert_eq!(ulen, seg.len() - ihl);
            assert_eq!(ulen, 8 + if i < 4 { 1200 } else { 200 });
            payload.extend_from_slice(&seg[ihl + 8..]);
        }
        assert_eq!(payload, spec.payload);
    }
}

#[test]
fn wire_segment_rejects_inconsistent_packets() {
    let spec = TcpSpec::v4().payload(&[1; 3000]);
    let (h, p) = spec.build_gso(1400);
    let mut out = vec![0u8; 8000];
    let err = |h: &VnetHdr, p: &[u8], out: &mut [u8]| segment(h, p, 1500, out).unwrap_err();

    let mut h0 = h;
    h0.gso_size = 0;
    assert_eq!(
        err(&h0, &p, &mut out),
        WireError::Malformed("gso_size is 0")
    );
    let mut h6 = h;
    h6.gso_type = GSO_TCPV6;
    assert!(matches!(err(&h6, &p, &mut out), WireError::Malformed(_)));
    let mut hu = h;
    hu.gso_type = GSO_UDP;
    assert!(matches!(err(&hu, &p, &mut out), WireError::Unsupported(_)));
    let mut hx = h;
    hx.gso_type = 9;
    assert!(matches!(err(&hx, &p, &mut out), WireError::Unsupported(_)));
    let mut hl4 = h;
    hl4.gso_type = GSO_UDP_L4;
    assert!(matches!(err(&hl4, &p, &mut out), WireError::Malformed(_)));

    // Data offset below 5, or beyond the packet.
    let mut q = p.clone();
    q[32] = 0x40;
    assert!(matches!(err(&h, &q, &mut out), WireError::Malformed(_)));
    let mut q = p.clone();
    q[32] = 0xf0;
    let short = &q[..20 + 40];
    let mut q2 = short.to_vec();
    q2[2..4].copy_from_slice(&60u16.to_be_bytes());
    assert!(matches!(
        err(&h, &q2, &mut out),
        WireError::Truncated { .. }
    ));
    // Truncated packet (IP length says more).
    assert!(matches!(
        err(&h, &p[..1000], &mut out),
        WireError::Truncated { .. }
    ));
    // IPv4 fragment.
    let mut q = p.clone();
    q[6] |= 0x20;
    assert!(matches!(err(&h, &q, &mut out), WireError::Malformed(_)));

    // IPv6 with a hop-by-hop header in front of TCP: unsupported, and said so.
    let spec6 = TcpSpec::v6().payload(&[1; 3000]);
    let (h6, mut p6) = spec6.build_gso(1400);
    p6[6] = 0;
    assert_eq!(
        err(&h6, &p6, &mut out),
        WireError::Unsupported("IPv6 extension headers in a GSO packet")
    );
}
