//! Transmit side: turn one TUN read (a `virtio_net_hdr` plus an IP packet that may be a TSO/USO
//! super-packet) into the complete IP packets Flannel's wire carries, written back to back so
//! that one `UDP_SEGMENT` `sendmsg` of `seg_len` sends them all.
//!
//! Headers are re-derived from the packet itself; the vnet header's `hdr_len` (which Linux sets
//! to the skb's linear length, not the header length) and `csum_*` of a GSO packet are ignored.
//! IPv6 extension headers are not handled: the transport header must follow the fixed header.

use super::bytes::{arr_mut, put16};
use super::ip::{self, Ip, PROTO_TCP, PROTO_UDP};
use super::vnet::{
    VnetHdr, FLAG_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP, GSO_UDP_L4,
};
use super::{checksum, WireError};

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Where [`segment`] (or [`segment_into`]) put its output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segments {
    /// Number of IP packets written.
    pub count: usize,
    /// Length of every packet but the last (packed, the `UDP_SEGMENT` size; in slots, that
    /// size is the slot's); the last may be shorter.
    pub seg_len: usize,
    /// Length of the last packet.
    pub last_len: usize,
    /// Bytes of `out` taken (by the packets' slots, with [`segment_into`]).
    pub total: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum L4 {
    Tcp,
    Udp,
}

/// Writes the packets `pkt` stands for into `out`, back to back: the segments of a TCP
/// (`GSO_TCPV4`/`GSO_TCPV6`) or UDP (`GSO_UDP_L4`) super-packet, each with its own headers and
/// full checksums, or, for `GSO_NONE`, the packet itself with its checksum completed when
/// `FLAG_NEEDS_CSUM` is set. Fails with [`WireError::TooBig`] when a packet would exceed `mtu`
/// (an IP packet length).
pub fn segment(
    hdr: &VnetHdr,
    pkt: &[u8],
    mtu: usize,
    out: &mut [u8],
) -> Result<Segments, WireError> {
    segment_into(hdr, pkt, mtu, out, &Layout::PACKED)
}

/// Where [`segment_into`] puts each packet: `head` bytes into a slot of `slot(len)` bytes (at
/// least `head + len`), slots back to back. Room for a codec to turn each packet into its
/// datagram where it lies (WireGuard: its header before, padding and tag after) rather than
/// copy it out.
pub struct Layout<F: Fn(usize) -> usize = fn(usize) -> usize> {
    pub head: usize,
    pub slot: F,
}

impl Layout {
    /// Packets back to back, as Flannel's udp wire sends them.
    pub const PACKED: Layout = Layout {
        head: 0,
        slot: identity,
    };
}

fn identity(len: usize) -> usize {
    len
}

impl<F: Fn(usize) -> usize> Layout<F> {
    fn slot_len(&self, len: usize) -> usize {
        (self.slot)(len).max(self.head + len)
    }
}

/// [`segment`], each packet put in its slot as `layout` says.
pub fn segment_into<F: Fn(usize) -> usize>(
    hdr: &VnetHdr,
    pkt: &[u8],
    mtu: usize,
    out: &mut [u8],
    layout: &Layout<F>,
) -> Result<Segments, WireError> {
    let ecn = hdr.gso_type & GSO_ECN != 0;
    match hdr.gso_type & !GSO_ECN {
        GSO_NONE => single(hdr, pkt, mtu, out, layout),
        GSO_TCPV4 => split(pkt, mtu, out, layout, hdr.gso_size, L4::Tcp, Some(false)),
        GSO_TCPV6 => split(pkt, mtu, out, layout, hdr.gso_size, L4::Tcp, Some(true)),
        GSO_UDP_L4 if !ecn => split(pkt, mtu, out, layout, hdr.gso_size, L4::Udp, None),
        GSO_UDP_L4 => Err(WireError::Malformed("GSO_ECN on a UDP super-packet")),
        GSO_UDP => Err(WireError::Unsupported(
            "UFO (gso_type UDP, IP-fragmented UDP)",
        )),
        _ => Err(WireError::Unsupported("unknown gso_type")),
    }
}

/// Completes a `FLAG_NEEDS_CSUM` checksum in place: sums `[csum_start, end)` (the field holds
/// the pseudo-header sum) and stores the complement at `csum_start + csum_offset`. Does nothing
/// without the flag. For packets that need no segmentation and can be sent from where they are.
pub fn complete_csum(hdr: &VnetHdr, pkt: &mut [u8]) -> Result<(), WireError> {
    if hdr.flags & FLAG_NEEDS_CSUM == 0 {
        return Ok(());
    }
    let start = usize::from(hdr.csum_start);
    let field = start + usize::from(hdr.csum_offset);
    let outside = WireError::Malformed("csum_start/csum_offset point outside the packet");
    if field + 2 > pkt.len() {
        return Err(outside);
    }
    let acc = checksum::sum(pkt.get(start..).ok_or(outside.clone())?, 0);
    // Like the kernel's skb_checksum_help: 0 becomes 0xffff (same value, and required by UDP).
    let c = match checksum::finish(acc) {
        0 => 0xffff,
        c => c,
    };
    put16(pkt, field, c).ok_or(outside)
}

fn single<F: Fn(usize) -> usize>(
    hdr: &VnetHdr,
    pkt: &[u8],
    mtu: usize,
    out: &mut [u8],
    layout: &Layout<F>,
) -> Result<Segments, WireError> {
    let len = ip::parse(pkt)?.len;
    if len > mtu {
        return Err(WireError::TooBig { len, mtu });
    }
    let (have, total) = (out.len(), layout.slot_len(len));
    if total > have {
        return Err(WireError::BufferTooSmall { need: total, have });
    }
    let dst = out
        .get_mut(layout.head..layout.head + len)
        .ok_or(WireError::BufferTooSmall { need: total, have })?;
    dst.copy_from_slice(pkt.get(..len).ok_or(WireError::Malformed("IP length"))?);
    complete_csum(hdr, dst)?;
    Ok(Segments {
        count: 1,
        seg_len: len,
        last_len: len,
        total,
    })
}

/// Length of the TCP or UDP header at `off`, checked to lie within the packet.
fn l4_header_len(pkt: &[u8], ip: &Ip, l4: L4) -> Result<usize, WireError> {
    let off = ip.hdr_len;
    let len = match l4 {
        L4::Udp => 8,
        L4::Tcp => {
            let doff = pkt.get(off + 12).ok_or(WireError::Truncated {
                what: "TCP header",
                need: off + 20,
                have: ip.len,
            })?;
            let len = usize::from(doff >> 4) * 4;
            if len < 20 {
                return Err(WireError::Malformed("TCP data offset below 5"));
            }
            len
        }
    };
    if off + len > ip.len {
        return Err(WireError::Truncated {
            what: if l4 == L4::Tcp {
                "TCP header"
            } else {
                "UDP header"
            },
            need: off + len,
            have: ip.len,
        });
    }
    Ok(len)
}

fn split<F: Fn(usize) -> usize>(
    pkt: &[u8],
    mtu: usize,
    out: &mut [u8],
    layout: &Layout<F>,
    gso_size: u16,
    l4: L4,
    want_v6: Option<bool>,
) -> Result<Segments, WireError> {
    let ip = ip::parse(pkt)?;
    if want_v6.is_some_and(|v6| v6 != ip.v6) {
        return Err(WireError::Malformed(
            "gso_type does not match the IP version",
        ));
    }
    if ip.fragment {
        return Err(WireError::Malformed("GSO packet is an IPv4 fragment"));
    }
    let proto = match l4 {
        L4::Tcp => PROTO_TCP,
        L4::Udp => PROTO_UDP,
    };
    if ip.proto != proto {
        return Err(if ip.v6 && ip::is_v6_extension(ip.proto) {
            WireError::Unsupported("IPv6 extension headers in a GSO packet")
        } else {
            WireError::Malformed("GSO packet's transport protocol does not match gso_type")
        });
    }
    let mss = usize::from(gso_size);
    if mss == 0 {
        return Err(WireError::Malformed("gso_size is 0"));
    }
    let l4_off = ip.hdr_len;
    let hlen = l4_off + l4_header_len(pkt, &ip, l4)?;
    let payload = ip.len - hlen;
    let count = payload.div_ceil(mss).max(1);
    let last_payload = payload - (count - 1) * mss;
    let seg_len = if count > 1 {
        hlen + mss
    } else {
        hlen + payload
    };
    if seg_len > mtu {
        return Err(WireError::TooBig { len: seg_len, mtu });
    }
    let last_len = hlen + last_payload;
    let total = (count - 1) * layout.slot_len(seg_len) + layout.slot_len(last_len);
    let have = out.len();
    if total > have {
        return Err(WireError::BufferTooSmall { need: total, have });
    }
    let headers = pkt
        .get(..hlen)
        .ok_or(WireError::Malformed("header length"))?;
    let body = pkt
        .get(hlen..ip.len)
        .ok_or(WireError::Malformed("IP length"))?;

    let mut pos = 0;
    for i in 0..count {
        let start = i * mss;
        let chunk = body
            .get(start..(start + mss).min(payload))
            .ok_or(WireError::Malformed("payload length"))?;
        let n = hlen + chunk.len();
        let at = pos + layout.head;
        let seg = out
            .get_mut(at..at + n)
            .ok_or(WireError::BufferTooSmall { need: total, have })?;
        let (h, p) = seg
            .split_at_mut_checked(hlen)
            .ok_or(WireError::BufferTooSmall { need: total, have })?;
        h.copy_from_slice(headers);
        p.copy_from_slice(chunk);
        let edit = SegEdit {
            index: i,
            last: i + 1 == count,
            offset: start,
        };
        fix_ip(seg, &ip, &edit).ok_or(WireError::Malformed("IP header"))?;
        match l4 {
            L4::Tcp => fix_tcp(seg, &ip, &edit),
            L4::Udp => fix_udp(seg, &ip),
        }
        .ok_or(WireError::Malformed("transport header"))?;
        pos += layout.slot_len(n);
    }
    Ok(Segments {
        count,
        seg_len,
        last_len,
        total,
    })
}

/// Which segment is being rewritten.
struct SegEdit {
    index: usize,
    last: bool,
    /// Payload offset of this segment in the super-packet.
    offset: usize,
}

/// IPv4: total length, ID + index, header checksum. IPv6: payload length.
fn fix_ip(seg: &mut [u8], ip: &Ip, edit: &SegEdit) -> Option<()> {
    let len = seg.len();
    if ip.v6 {
        return put16(seg, 4, u16::try_from(len - ip::V6_HDR_LEN).ok()?);
    }
    let h = arr_mut::<20>(seg, 0)?;
    h[2..4].copy_from_slice(&u16::try_from(len).ok()?.to_be_bytes());
    let id = u16::from_be_bytes([h[4], h[5]]).wrapping_add(edit.index as u16);
    h[4..6].copy_from_slice(&id.to_be_bytes());
    let c = checksum::ipv4_header(seg.get(..ip.hdr_len)?);
    put16(seg, 10, c)
}

/// Sequence number + payload offset; FIN/PSH only on the last segment, CWR only on the first
/// (what Linux's tcp_gso_segment does); full checksum.
fn fix_tcp(seg: &mut [u8], ip: &Ip, edit: &SegEdit) -> Option<()> {
    let off = ip.hdr_len;
    let t = arr_mut::<20>(seg, off)?;
    let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]).wrapping_add(edit.offset as u32);
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    if !edit.last {
        t[13] &= !(TCP_FIN | TCP_PSH);
    }
    if edit.index != 0 {
        t[13] &= !TCP_CWR;
    }
    t[16..18].copy_from_slice(&[0, 0]);
    let l4_len = seg.len() - off;
    let acc = checksum::sum(seg.get(off..)?, ip::pseudo(seg, ip.v6, PROTO_TCP, l4_len)?);
    put16(seg, off + 16, checksum::finish(acc))
}

/// UDP length and full checksum (0 sent as 0xffff).
fn fix_udp(seg: &mut [u8], ip: &Ip) -> Option<()> {
    let off = ip.hdr_len;
    let l4_len = seg.len() - off;
    let u = arr_mut::<8>(seg, off)?;
    u[4..6].copy_from_slice(&u16::try_from(l4_len).ok()?.to_be_bytes());
    u[6..8].copy_from_slice(&[0, 0]);
    let acc = checksum::sum(seg.get(off..)?, ip::pseudo(seg, ip.v6, PROTO_UDP, l4_len)?);
    let c = match checksum::finish(acc) {
        0 => 0xffff,
        c => c,
    };
    put16(seg, off + 6, c)
}
