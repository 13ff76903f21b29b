//! IP header access shared by the codecs: the validated view [`parse`] used by segmentation and
//! GRO, addresses, TTL handling for the forwarding path, and ICMP error replies ([`icmp`]).

mod icmp;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::bytes::{arr, arr_mut};
use super::{checksum, WireError};

pub use icmp::{icmp_too_big, icmp_unreachable};

pub(crate) const PROTO_ICMP: u8 = 1;
pub(crate) const PROTO_TCP: u8 = 6;
pub(crate) const PROTO_UDP: u8 = 17;
pub(crate) const PROTO_ICMPV6: u8 = 58;

/// Fixed IPv6 header length.
pub(crate) const V6_HDR_LEN: usize = 40;

/// The outer facts of an IP packet, validated against its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ip {
    pub v6: bool,
    /// IPv4 IHL * 4 (options included), or 40 for IPv6 (extension headers are not parsed).
    pub hdr_len: usize,
    /// Length the header declares (IPv4 total length, 40 + IPv6 payload length); never more
    /// than the slice, at least `hdr_len`. Bytes past it are padding.
    pub len: usize,
    /// IPv4 protocol or IPv6 next header.
    pub proto: u8,
    /// IPv4 only: MF set or a non-zero fragment offset.
    pub fragment: bool,
}

fn truncated(what: &'static str, need: usize, have: usize) -> WireError {
    WireError::Truncated { what, need, have }
}

/// Validates the IP header of `pkt` and the length it declares.
pub(crate) fn parse(pkt: &[u8]) -> Result<Ip, WireError> {
    let have = pkt.len();
    let first = *pkt.first().ok_or(truncated("IP header", 1, have))?;
    match first >> 4 {
        4 => {
            let h: &[u8; 20] = arr(pkt, 0).ok_or(truncated("IPv4 header", 20, have))?;
            let hdr_len = usize::from(h[0] & 0x0f) * 4;
            if hdr_len < 20 {
                return Err(WireError::Malformed("IPv4 IHL below 5"));
            }
            let len = usize::from(u16::from_be_bytes([h[2], h[3]]));
            if len < hdr_len {
                return Err(WireError::Malformed(
                    "IPv4 total length shorter than its header",
                ));
            }
            if len > have {
                return Err(truncated("IPv4 packet", len, have));
            }
            Ok(Ip {
                v6: false,
                hdr_len,
                len,
                proto: h[9],
                fragment: u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0,
            })
        }
        6 => {
            let h: &[u8; V6_HDR_LEN] =
                arr(pkt, 0).ok_or(truncated("IPv6 header", V6_HDR_LEN, have))?;
            let len = V6_HDR_LEN + usize::from(u16::from_be_bytes([h[4], h[5]]));
            if len > have {
                return Err(truncated("IPv6 packet", len, have));
            }
            Ok(Ip {
                v6: true,
                hdr_len: V6_HDR_LEN,
                len,
                proto: h[6],
                fragment: false,
            })
        }
        v => Err(WireError::BadVersion(v)),
    }
}

/// Whether an IPv6 next-header value is an extension header (RFC 8200 §4, RFC 7045).
pub(crate) fn is_v6_extension(nh: u8) -> bool {
    matches!(nh, 0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254)
}

/// Pseudo-header sum for the transport header of `pkt` (addresses taken from the IP header).
pub(crate) fn pseudo(pkt: &[u8], v6: bool, proto: u8, l4_len: usize) -> Option<u64> {
    if v6 {
        let s = arr::<16>(pkt, 8)?;
        let d = arr::<16>(pkt, 24)?;
        Some(checksum::pseudo_v6(
            s,
            d,
            proto,
            u32::try_from(l4_len).ok()?,
        ))
    } else {
        let s = arr::<4>(pkt, 12)?;
        let d = arr::<4>(pkt, 16)?;
        Some(checksum::pseudo_v4(
            *s,
            *d,
            proto,
            u16::try_from(l4_len).ok()?,
        ))
    }
}

/// Source and destination address of an IPv4 or IPv6 packet.
pub fn addrs(pkt: &[u8]) -> Result<(IpAddr, IpAddr), WireError> {
    let have = pkt.len();
    let first = *pkt.first().ok_or(truncated("IP header", 1, have))?;
    match first >> 4 {
        4 => {
            let h: &[u8; 20] = arr(pkt, 0).ok_or(truncated("IPv4 header", 20, have))?;
            let s = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
            let d = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
            Ok((s.into(), d.into()))
        }
        6 => {
            let s = arr::<16>(pkt, 8).ok_or(truncated("IPv6 header", V6_HDR_LEN, have))?;
            let d = arr::<16>(pkt, 24).ok_or(truncated("IPv6 header", V6_HDR_LEN, have))?;
            Ok((Ipv6Addr::from(*s).into(), Ipv6Addr::from(*d).into()))
        }
        v => Err(WireError::BadVersion(v)),
    }
}

/// Forwarding step: IPv4 TTL or IPv6 hop limit minus one, the IPv4 header checksum updated
/// incrementally (RFC 1624). `Ok(false)` when the result would be 0: the packet is left as it
/// was and must be dropped (an ICMP time-exceeded is the caller's choice).
pub fn decrement_ttl(pkt: &mut [u8]) -> Result<bool, WireError> {
    let have = pkt.len();
    let first = *pkt.first().ok_or(truncated("IP header", 1, have))?;
    match first >> 4 {
        4 => {
            let h: &mut [u8; 20] = arr_mut(pkt, 0).ok_or(truncated("IPv4 header", 20, have))?;
            if h[8] <= 1 {
                return Ok(false);
            }
            let old = u16::from_be_bytes([h[8], h[9]]);
            h[8] -= 1;
            let new = u16::from_be_bytes([h[8], h[9]]);
            let check = checksum::update16(u16::from_be_bytes([h[10], h[11]]), old, new);
            h[10..12].copy_from_slice(&check.to_be_bytes());
            Ok(true)
        }
        6 => {
            let h: &mut [u8; V6_HDR_LEN] =
                arr_mut(pkt, 0).ok_or(truncated("IPv6 header", V6_HDR_LEN, have))?;
            if h[7] <= 1 {
                return Ok(false);
            }
            h[7] -= 1;
            Ok(true)
        }
        v => Err(WireError::BadVersion(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::testutil::*;

    #[test]
    fn wire_ip_addrs_v4_v6() {
        let p = TcpSpec::v4().payload(b"x").build();
        assert_eq!(addrs(&p).unwrap(), (V4_A.into(), V4_B.into()));
        let p = TcpSpec::v6().payload(b"x").build();
        assert_eq!(addrs(&p).unwrap(), (V6_A.into(), V6_B.into()));
        assert_eq!(addrs(&p[..39]), Err(truncated("IPv6 header", 40, 39)));
        assert_eq!(addrs(&[0x55; 40]), Err(WireError::BadVersion(5)));
        assert!(addrs(&[]).is_err());
    }

    #[test]
    fn wire_ip_decrement_ttl() {
        let mut p = TcpSpec::v4().ttl(2).payload(b"abc").build();
        assert_eq!(decrement_ttl(&mut p), Ok(true));
        assert_eq!(p[8], 1);
        assert_ip_valid(&p);
        let before = p.clone();
        assert_eq!(decrement_ttl(&mut p), Ok(false));
        assert_eq!(p, before);

        let mut p = TcpSpec::v6().ttl(64).payload(b"abc").build();
        assert_eq!(decrement_ttl(&mut p), Ok(true));
        assert_eq!(p[7], 63);
        p[7] = 1;
        assert_eq!(decrement_ttl(&mut p), Ok(false));
        assert!(decrement_ttl(&mut [0x45; 19]).is_err());

        // Many random headers: incremental update equals recomputation.
        let mut rng = XorShift::new(3);
        for _ in 0..1000 {
            let mut p = TcpSpec::v4()
                .ttl((rng.next_u64() as u8).max(2))
                .id(rng.next_u64() as u16)
                .build();
            decrement_ttl(&mut p).unwrap();
            assert_ip_valid(&p);
        }
    }

    #[test]
    fn wire_ip_parse_rejects_inconsistent_lengths() {
        let p = TcpSpec::v4().payload(b"abcd").build();
        assert!(parse(&p).is_ok());
        let mut q = p.clone();
        q[0] = 0x44;
        assert_eq!(parse(&q), Err(WireError::Malformed("IPv4 IHL below 5")));
        let mut q = p.clone();
        q[2..4].copy_from_slice(&100u16.to_be_bytes());
        assert!(matches!(parse(&q), Err(WireError::Truncated { .. })));
        let mut q = p.clone();
        q[2..4].copy_from_slice(&10u16.to_be_bytes());
        assert!(matches!(parse(&q), Err(WireError::Malformed(_))));
        let p6 = TcpSpec::v6().payload(b"abcd").build();
        assert!(matches!(
            parse(&p6[..p6.len() - 1]),
            Err(WireError::Truncated { .. })
        ));
    }
}
