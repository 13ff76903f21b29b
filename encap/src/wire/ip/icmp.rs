//! ICMP error replies the node itself originates: "fragmentation needed" / "packet too big" when
//! a packet does not fit the overlay MTU, and "net unreachable" for a destination in no known
//! subnet. Built into a caller buffer; the rules of RFC 1122 §3.2.2 / RFC 4443 §2.4 about when
//! not to send one are enforced here, so the datapath cannot start ICMP storms.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{PROTO_ICMP, PROTO_ICMPV6, V6_HDR_LEN};
use crate::wire::bytes::{arr, arr_mut, put16};
use crate::wire::{checksum, WireError};

/// RFC 792/1812: an ICMPv4 error should not exceed 576 bytes, so quote at most this much.
const V4_QUOTE_MAX: usize = 576 - 20 - 8;
/// RFC 4443 §2.4(c): as much of the packet as fits in the minimum IPv6 MTU.
const V6_QUOTE_MAX: usize = 1280 - V6_HDR_LEN - 8;
/// Hop limit / TTL of the replies.
const REPLY_TTL: u8 = 64;

#[derive(Clone, Copy)]
enum Kind {
    TooBig(u16),
    Unreachable,
}

/// Writes into `out` an ICMPv4 destination-unreachable/fragmentation-needed (type 3 code 4) or
/// ICMPv6 packet-too-big (type 2) reply from `from` to the sender of `pkt`, announcing `mtu`.
/// Returns the reply's length.
pub fn icmp_too_big(
    pkt: &[u8],
    mtu: u16,
    from: IpAddr,
    out: &mut [u8],
) -> Result<usize, WireError> {
    reply(pkt, from, out, Kind::TooBig(mtu))
}

/// Writes into `out` an ICMPv4 net-unreachable (type 3 code 0) or ICMPv6 no-route-to-destination
/// (type 1 code 0) reply from `from` to the sender of `pkt`. Returns the reply's length.
pub fn icmp_unreachable(pkt: &[u8], from: IpAddr, out: &mut [u8]) -> Result<usize, WireError> {
    reply(pkt, from, out, Kind::Unreachable)
}

fn reply(pkt: &[u8], from: IpAddr, out: &mut [u8], kind: Kind) -> Result<usize, WireError> {
    let first = *pkt.first().ok_or(WireError::Truncated {
        what: "IP header",
        need: 1,
        have: 0,
    })?;
    match (first >> 4, from) {
        (4, IpAddr::V4(from)) => v4(pkt, from, out, kind),
        (6, IpAddr::V6(from)) => v6(pkt, from, out, kind),
        (4 | 6, _) => Err(WireError::FamilyMismatch(from)),
        (v, _) => Err(WireError::BadVersion(v)),
    }
}

fn too_small(need: usize, have: usize) -> WireError {
    WireError::BufferTooSmall { need, have }
}

fn v4(pkt: &[u8], from: Ipv4Addr, out: &mut [u8], kind: Kind) -> Result<usize, WireError> {
    let h: &[u8; 20] = arr(pkt, 0).ok_or(WireError::Truncated {
        what: "IPv4 header",
        need: 20,
        have: pkt.len(),
    })?;
    let ihl = usize::from(h[0] & 0x0f) * 4;
    if ihl < 20 {
        return Err(WireError::Malformed("IPv4 IHL below 5"));
    }
    let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
    let dst = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
    if src.is_unspecified() || src.is_loopback() || src.is_multicast() || h[12] >= 240 {
        return Err(WireError::NoIcmp("source address is not a single host"));
    }
    if dst.is_multicast() || dst.is_broadcast() {
        return Err(WireError::NoIcmp("destination is multicast or broadcast"));
    }
    if u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
        return Err(WireError::NoIcmp("not the first fragment"));
    }
    if h[9] == PROTO_ICMP && !matches!(pkt.get(ihl), Some(0 | 8 | 13..=18)) {
        return Err(WireError::NoIcmp(
            "packet is an ICMP error (or unreadable ICMP)",
        ));
    }
    let declared = usize::from(u16::from_be_bytes([h[2], h[3]]));
    let quote = pkt.len().min(declared.max(ihl)).min(V4_QUOTE_MAX);
    let total = 28 + quote;
    let have = out.len();
    let o = out.get_mut(..total).ok_or(too_small(total, have))?;

    let [tl0, tl1] = u16::try_from(total)
        .map_err(|_| too_small(total, have))?
        .to_be_bytes();
    let [f0, f1, f2, f3] = from.octets();
    let [s0, s1, s2, s3] = src.octets();
    let mut iph = [
        0x45, 0xc0, tl0, tl1, 0, 0, 0, 0, REPLY_TTL, PROTO_ICMP, 0, 0, f0, f1, f2, f3, s0, s1, s2,
        s3,
    ];
    let c = checksum::ipv4_header(&iph);
    iph[10..12].copy_from_slice(&c.to_be_bytes());
    *arr_mut::<20>(o, 0).ok_or(too_small(total, have))? = iph;

    let [m0, m1] = match kind {
        Kind::TooBig(mtu) => mtu.to_be_bytes(),
        Kind::Unreachable => [0, 0],
    };
    let code = match kind {
        Kind::TooBig(_) => 4,
        Kind::Unreachable => 0,
    };
    *arr_mut::<8>(o, 20).ok_or(too_small(total, have))? = [3, code, 0, 0, 0, 0, m0, m1];
    let body = o.get_mut(28..).ok_or(too_small(total, have))?;
    body.copy_from_slice(pkt.get(..quote).ok_or(too_small(total, have))?);

    let icmp = o.get(20..).ok_or(too_small(total, have))?;
    let c = checksum::checksum(icmp);
    put16(o, 22, c).ok_or(too_small(total, have))?;
    Ok(total)
}

fn v6(pkt: &[u8], from: Ipv6Addr, out: &mut [u8], kind: Kind) -> Result<usize, WireError> {
    let h: &[u8; V6_HDR_LEN] = arr(pkt, 0).ok_or(WireError::Truncated {
        what: "IPv6 header",
        need: V6_HDR_LEN,
        have: pkt.len(),
    })?;
    let src_b: [u8; 16] = *arr(h, 8).ok_or(WireError::Malformed("IPv6 header"))?;
    let dst_b: [u8; 16] = *arr(h, 24).ok_or(WireError::Malformed("IPv6 header"))?;
    let (src, dst) = (Ipv6Addr::from(src_b), Ipv6Addr::from(dst_b));
    if src.is_unspecified() || src.is_loopback() || src.is_multicast() {
        return Err(WireError::NoIcmp("source address is not a single host"));
    }
    // RFC 4443 §2.4(e.3): packet-too-big is the one error allowed about multicast.
    if dst.is_multicast() && matches!(kind, Kind::Unreachable) {
        return Err(WireError::NoIcmp("destination is multicast"));
    }
    if h[6] == PROTO_ICMPV6 && !matches!(pkt.get(V6_HDR_LEN), Some(128..=255)) {
        return Err(WireError::NoIcmp(
            "packet is an ICMPv6 error (or unreadable ICMPv6)",
        ));
    }
    let declared = V6_HDR_LEN + usize::from(u16::from_be_bytes([h[4], h[5]]));
    let quote = pkt.len().min(declared).min(V6_QUOTE_MAX);
    let icmp_len = 8 + quote;
    let total = V6_HDR_LEN + icmp_len;
    let have = out.len();
    let o = out.get_mut(..total).ok_or(too_small(total, have))?;

    let mut iph = [0u8; V6_HDR_LEN];
    iph[0] = 0x60;
    iph[4..6].copy_from_slice(
        &u16::try_from(icmp_len)
            .map_err(|_| too_small(total, have))?
            .to_be_bytes(),
    );
    iph[6] = PROTO_ICMPV6;
    iph[7] = REPLY_TTL;
    iph[8..24].copy_from_slice(&from.octets());
    iph[24..40].copy_from_slice(&src_b);
    *arr_mut::<V6_HDR_LEN>(o, 0).ok_or(too_small(total, have))? = iph;

    let (ty, word) = match kind {
        Kind::TooBig(mtu) => (2, u32::from(mtu).to_be_bytes()),
        Kind::Unreachable => (1, [0; 4]),
    };
    let [w0, w1, w2, w3] = word;
    *arr_mut::<8>(o, V6_HDR_LEN).ok_or(too_small(total, have))? = [ty, 0, 0, 0, w0, w1, w2, w3];
    let body = o.get_mut(V6_HDR_LEN + 8..).ok_or(too_small(total, have))?;
    body.copy_from_slice(pkt.get(..quote).ok_or(too_small(total, have))?);

    let icmp = o.get(V6_HDR_LEN..).ok_or(too_small(total, have))?;
    let pseudo = checksum::pseudo_v6(
        &from.octets(),
        &src_b,
        PROTO_ICMPV6,
        u32::try_from(icmp_len).map_err(|_| too_small(total, have))?,
    );
    let c = checksum::finish(checksum::sum(icmp, pseudo));
    put16(o, V6_HDR_LEN + 2, c).ok_or(too_small(total, have))?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::testutil::*;

    const GW4: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 0);

    #[test]
    fn wire_icmp_v4_too_big_quotes_548_bytes() {
        let p = TcpSpec::v4().payload(&[7u8; 1460]).build();
        let mut out = [0u8; 1500];
        let n = icmp_too_big(&p, 1450, GW4.into(), &mut out).unwrap();
        assert_eq!(n, 576);
        let r = &out[..n];
        assert_ip_valid(r);
        assert_eq!(r[9], PROTO_ICMP);
        assert_eq!(&r[12..16], &GW4.octets());
        assert_eq!(&r[16..20], &p[12..16]);
        assert_eq!(&r[20..22], &[3, 4]);
        assert_eq!(u16::from_be_bytes([r[26], r[27]]), 1450);
        assert_eq!(naive_csum(&[&r[20..]]), 0);
        assert_eq!(&r[28..], &p[..548]);

        // A short packet is quoted whole; net unreachable has code 0 and no MTU.
        let p = TcpSpec::v4().payload(b"hi").build();
        let n = icmp_unreachable(&p, GW4.into(), &mut out).unwrap();
        assert_eq!(n, 28 + p.len());
        assert_eq!(&out[20..28], &[3, 0, out[22], out[23], 0, 0, 0, 0]);
        assert_eq!(naive_csum(&[&out[20..n]]), 0);
        assert_eq!(&out[28..n], &p[..]);
        assert_eq!(
            icmp_unreachable(&p, GW4.into(), &mut out[..40]),
            Err(WireError::BufferTooSmall { need: n, have: 40 })
        );
    }

    #[test]
    fn wire_icmp_v6_too_big_fits_1280() {
        let p = TcpSpec::v6().payload(&[9u8; 8000]).build();
        let from: Ipv6Addr = "fd00::1".parse().unwrap();
        let mut out = [0u8; 2000];
        let n = icmp_too_big(&p, 1400, from.into(), &mut out).unwrap();
        assert_eq!(n, 1280);
        let r = &out[..n];
        assert_eq!(r[0] >> 4, 6);
        assert_eq!(usize::from(u16::from_be_bytes([r[4], r[5]])), n - 40);
        assert_eq!(r[6], PROTO_ICMPV6);
        assert_eq!(&r[24..40], &p[8..24]);
        assert_eq!(&r[40..48], &[2, 0, r[42], r[43], 0, 0, 0x05, 0x78]);
        assert_l4_valid(r, PROTO_ICMPV6);
        assert_eq!(&r[48..], &p[..1232]);

        let n = icmp_unreachable(&p, from.into(), &mut out).unwrap();
        assert_eq!(&out[40..42], &[1, 0]);
        assert_l4_valid(&out[..n], PROTO_ICMPV6);
    }

    #[test]
    fn wire_icmp_suppressed_cases() {
        let mut out = [0u8; 1500];
        let p = TcpSpec::v4().payload(b"x").build();
        let v6from: IpAddr = "fd00::1".parse::<Ipv6Addr>().unwrap().into();
        assert_eq!(
            icmp_unreachable(&p, v6from, &mut out),
            Err(WireError::FamilyMismatch(v6from))
        );
        let mut q = p.clone();
        q[16] = 224; // multicast destination
        assert!(matches!(
            icmp_unreachable(&q, GW4.into(), &mut out),
            Err(WireError::NoIcmp(_))
        ));
        let mut q = p.clone();
        q[12..16].copy_from_slice(&[0, 0, 0, 0]);
        assert!(matches!(
            icmp_unreachable(&q, GW4.into(), &mut out),
            Err(WireError::NoIcmp(_))
        ));
        let mut q = p.clone();
        q[7] = 1; // fragment offset 8
        assert!(matches!(
            icmp_too_big(&q, 1400, GW4.into(), &mut out),
            Err(WireError::NoIcmp(_))
        ));
        // No error about an ICMP error; an echo request is fine.
        let n = icmp_unreachable(&p, GW4.into(), &mut out).unwrap();
        let err = out[..n].to_vec();
        assert!(matches!(
            icmp_unreachable(&err, GW4.into(), &mut out),
            Err(WireError::NoIcmp(_))
        ));
        let mut echo = err.clone();
        echo[20] = 8;
        assert!(icmp_unreachable(&echo, GW4.into(), &mut out).is_ok());
        assert!(icmp_unreachable(&[0x45; 10], GW4.into(), &mut out).is_err());
        assert!(icmp_unreachable(&[], GW4.into(), &mut out).is_err());
    }
}
