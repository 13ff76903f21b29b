//! Receive side: merge consecutive TCP segments of one flow, as they come off the UDP socket,
//! back into super-packets with a `virtio_net_hdr`, so that one TUN write hands the kernel up
//! to 64 KiB (what Linux GRO and wireguard-go/Tailscale's TUN offload do). Consecutive UDP
//! datagrams of one flow with the same payload size (a flood, a QUIC transfer) merge the same
//! way into a `GSO_UDP_L4` packet (at most 64, the kernel's own UDP GRO limit), which the
//! kernel cuts back into the same datagrams where it delivers them (IPv4 IDs counted up from
//! the first, as it cuts: with DF they mean nothing): one trip through routing, the bridge and
//! the firewall instead of one per datagram. Only where the TUN took `TUN_F_USO` (kernel 6.2+):
//! older kernels refuse such writes ([`Gro::without_udp`]). Like Linux GRO, a datagram without
//! a UDP checksum is never merged (an IPv6 one must be dropped, and merging gives it one).
//!
//! A TCP segment is appended to the newest output packet of its flow only when it continues it
//! exactly: next sequence number, same IP/TCP header apart from length/ID/checksum/sequence,
//! flags ACK (or ACK|PSH, which ends the packet), payload no larger than the first one's (the
//! MSS; a shorter one ends the packet), IPv4 IDs consecutive or DF set, at most 65535 bytes in
//! all. Each merged segment's IP and TCP checksums are verified first, because the merged packet
//! goes to the kernel as `NEEDS_CSUM`, which it trusts: a corrupt segment must stay on its own,
//! where the kernel checks and drops it. A caller whose packets are already known intact (an
//! outer UDP checksum the kernel verified, an AEAD tag) skips the TCP checksum pass with
//! [`Gro::trusting`]: it reads every payload byte once more, a few percent of a receiving
//! thread's time at 10 Gbit/s. Everything else passes through unchanged, in arrival
//! order; within a flow nothing is reordered, since only a flow's newest packet grows, and
//! a packet that may belong to a flow without showing its ports (a fragment, an IPv6 packet
//! with extension headers) ends the merges between its two addresses.

use super::bytes::{arr, be16, put16};
use super::ip::{self, PROTO_TCP, PROTO_UDP, V6_HDR_LEN};
use super::vnet::{VnetHdr, FLAG_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, VNET_HDR_LEN};
use super::{checksum, WireError};

const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
/// Largest IP packet (and so super-packet) built.
const MAX_IP_LEN: usize = 65535;
/// Offset of the checksum in the TCP header.
const TCP_CSUM_OFFSET: usize = 16;
/// Offset of the checksum in the UDP header, and the header's length.
const UDP_CSUM_OFFSET: usize = 6;
const UDP_HDR_LEN: usize = 8;
/// Datagrams in one `GSO_UDP_L4` packet at most: the kernel's own UDP GRO limit
/// (`UDP_GRO_CNT_MAX`), and its `UDP_MAX_SEGMENTS` before 6.x raised that to 128.
const UDP_MAX_SEGS: usize = 64;

/// A TCP or UDP flow: protocol, addresses and ports (in packet byte order), one direction.
#[derive(Clone, Copy, PartialEq, Eq)]
struct FlowKey {
    v6: bool,
    udp: bool,
    addrs: [u8; 32],
    ports: [u8; 4],
}

/// A data segment (TCP) or datagram (UDP) that may start or extend a merge.
struct Seg {
    key: FlowKey,
    v6: bool,
    ip_hdr_len: usize,
    /// IP + TCP (or UDP) header length.
    hdr_len: usize,
    payload_len: usize,
    seq: u32,
    id: u16,
    psh: bool,
}

/// State of an output packet that holds TCP data or UDP datagrams.
#[derive(Clone, Copy)]
struct Run {
    v6: bool,
    udp: bool,
    ip_hdr_len: usize,
    hdr_len: usize,
    /// Payload length of the first segment: the MSS (datagram size) of the super-packet.
    gso_size: usize,
    segs: usize,
    next_seq: u32,
    next_id: u16,
    /// Whether another segment may still be appended.
    open: bool,
}

#[derive(Clone, Copy)]
struct Slot {
    /// IP packet length (after the vnet header).
    len: usize,
    run: Option<Run>,
}

struct Flow {
    key: FlowKey,
    /// The flow's newest output packet.
    slot: usize,
}

enum Class {
    /// Unparseable: passes through.
    Other,
    /// Neither TCP nor UDP that shows its ports (another protocol, a fragment, IPv6 extension
    /// headers): passes through, and ends the merges between its two addresses, since it may
    /// belong to one of their flows.
    Between {
        v6: bool,
        addrs: [u8; 32],
    },
    /// TCP or UDP that cannot be merged: passes through, and ends its flow's current merge so
    /// that later segments are not moved in front of it.
    FlowOther(FlowKey),
    Data(Seg),
}

/// What one output packet holds: how many inner packets went into it and their bytes as they
/// arrived (headers included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Carried {
    pub packets: u64,
    pub bytes: u64,
}

/// A batch of received packets being coalesced. Preallocates `max_packets` slots of
/// `max_packet_len` bytes (vnet header included) and a flow table; nothing is allocated after.
pub struct Gro {
    buf: Vec<u8>,
    stride: usize,
    max_packets: usize,
    slots: Vec<Slot>,
    flows: Vec<Flow>,
    /// Slots before this index have their vnet header written and are closed.
    finalized: usize,
    /// Whether TCP checksums are verified before a segment may merge (see [`Gro::trusting`]).
    verify: bool,
    /// Whether UDP datagrams may merge (see [`Gro::without_udp`]).
    merge_udp: bool,
}

impl Gro {
    /// A batch of up to `max_packets` output packets of up to `max_packet_len` bytes each
    /// including the vnet header (use `65535 + VNET_HDR_LEN` to build full super-packets).
    pub fn new(max_packets: usize, max_packet_len: usize) -> Self {
        let stride = max_packet_len.max(VNET_HDR_LEN);
        Gro {
            buf: vec![0; max_packets.saturating_mul(stride)],
            stride,
            max_packets,
            slots: Vec::with_capacity(max_packets),
            flows: Vec::with_capacity(max_packets),
            finalized: 0,
            verify: true,
            merge_udp: true,
        }
    }

    /// The same coalescer leaving UDP datagrams alone, for a TUN that refused `TUN_F_USO`
    /// (before kernel 6.2 a `GSO_UDP_L4` write fails, and every datagram in it is lost).
    pub fn without_udp(mut self) -> Self {
        self.merge_udp = false;
        self
    }

    /// The same coalescer for packets whose bytes are already guaranteed intact: it skips the
    /// TCP and UDP checksums (a pass over the payload) before merging. IPv4 header checksums are
    /// still checked; they are 20 bytes.
    pub fn trusting(mut self) -> Self {
        self.verify = false;
        self
    }

    /// Adds one complete inner IP packet: appended to its flow's newest packet when it continues
    /// it, else copied into a new output packet. Fails with [`WireError::Full`] (nothing
    /// changed) when a new packet is needed and none is free, and with [`WireError::TooBig`]
    /// when it cannot fit one.
    pub fn push(&mut self, pkt: &[u8]) -> Result<(), WireError> {
        let cap = self.stride - VNET_HDR_LEN;
        if pkt.len() > cap {
            return Err(WireError::TooBig {
                len: pkt.len(),
                mtu: cap,
            });
        }
        match classify(pkt, self.verify, self.merge_udp) {
            Class::Other => {
                self.check_room()?;
                self.start(pkt, None)?;
            }
            Class::Between { v6, addrs } => {
                self.check_room()?;
                self.start(pkt, None)?;
                self.flows
                    .retain(|f| f.key.v6 != v6 || f.key.addrs != addrs);
            }
            Class::FlowOther(key) => {
                self.check_room()?;
                self.start(pkt, None)?;
                if let Some(i) = self.flows.iter().position(|f| f.key == key) {
                    self.flows.swap_remove(i);
                }
            }
            Class::Data(seg) => {
                let flow = self.flows.iter().position(|f| f.key == seg.key);
                if let Some(slot) = flow.and_then(|i| self.flows.get(i)).map(|f| f.slot) {
                    if self.try_append(slot, &seg, pkt) {
                        return Ok(());
                    }
                }
                self.check_room()?;
                let slot = self.start(pkt, Some(Run::first(&seg)))?;
                match flow.and_then(|i| self.flows.get_mut(i)) {
                    Some(f) => f.slot = slot,
                    None => self.flows.push(Flow { key: seg.key, slot }),
                }
            }
        }
        Ok(())
    }

    /// Whether every slot is taken: a `push` that needs a new packet would fail.
    pub fn is_full(&self) -> bool {
        self.slots.len() >= self.max_packets
    }

    /// Number of output packets so far.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether nothing was pushed since the last `clear`.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Finalizes the batch and yields each output packet as vnet header + IP packet, ready
    /// for one TUN write. Merged packets carry `GSO_TCPV4`/`GSO_TCPV6` (`GSO_UDP_L4`),
    /// `gso_size` = MSS (datagram payload size), `NEEDS_CSUM` with the pseudo-header sum in the
    /// TCP (UDP) checksum field, and fixed IP (and UDP) lengths;
    /// the others a zero header and their bytes unchanged. Packets pushed afterwards start new
    /// output packets; call [`Gro::clear`] once they are written.
    pub fn packets(&mut self) -> impl Iterator<Item = &[u8]> + '_ {
        self.outputs().map(|(p, _)| p)
    }

    /// [`Gro::packets`], each with what went into it: a failed TUN write loses all of those.
    pub fn outputs(&mut self) -> impl Iterator<Item = (&[u8], Carried)> + '_ {
        self.finalize();
        let stride = self.stride;
        let buf = &self.buf;
        self.slots.iter().enumerate().map(move |(i, s)| {
            let base = i * stride;
            let packet = buf
                .get(base..base + VNET_HDR_LEN + s.len)
                .unwrap_or_default();
            // Every segment after the first brought its own headers, which merging dropped.
            let (segs, hdr_len) = s.run.map_or((1, 0), |r| (r.segs.max(1), r.hdr_len));
            let carried = Carried {
                packets: segs as u64,
                bytes: (s.len + (segs - 1) * hdr_len) as u64,
            };
            (packet, carried)
        })
    }

    /// Empties the batch (keeping its buffers).
    pub fn clear(&mut self) {
        self.slots.clear();
        self.flows.clear();
        self.finalized = 0;
    }

    fn check_room(&self) -> Result<(), WireError> {
        if self.is_full() {
            Err(WireError::Full)
        } else {
            Ok(())
        }
    }

    /// Copies `pkt` into the next free slot and returns the slot's index.
    fn start(&mut self, pkt: &[u8], run: Option<Run>) -> Result<usize, WireError> {
        let i = self.slots.len();
        let base = i * self.stride + VNET_HDR_LEN;
        let dst = self
            .buf
            .get_mut(base..base + pkt.len())
            .ok_or(WireError::Full)?;
        dst.copy_from_slice(pkt);
        self.slots.push(Slot {
            len: pkt.len(),
            run,
        });
        Ok(i)
    }

    /// Appends `seg`'s payload to slot `i` if it continues it exactly; `false` (nothing
    /// changed) otherwise.
    fn try_append(&mut self, i: usize, seg: &Seg, pkt: &[u8]) -> bool {
        let Some(slot) = self.slots.get(i).copied() else {
            return false;
        };
        let Some(mut run) = slot.run else {
            return false;
        };
        let new_len = slot.len + seg.payload_len;
        if !run.open
            || run.v6 != seg.v6
            || run.udp != seg.key.udp
            || run.ip_hdr_len != seg.ip_hdr_len
            || run.hdr_len != seg.hdr_len
            || (!run.udp && run.next_seq != seg.seq)
            || seg.payload_len > run.gso_size
            || new_len > MAX_IP_LEN
            || new_len > self.stride - VNET_HDR_LEN
        {
            return false;
        }
        let base = i * self.stride + VNET_HDR_LEN;
        let (Some(head), Some(new)) = (
            self.buf.get(base..base + run.hdr_len),
            pkt.get(..seg.hdr_len),
        ) else {
            return false;
        };
        if !headers_match(head, new, run.v6, run.ip_hdr_len, run.udp) {
            return false;
        }
        // Without DF, IDs must be consecutive (Linux GRO's rule; resegmenting counts up).
        let df = head.get(6).is_some_and(|b| b & 0x40 != 0);
        if !run.v6 && !df && seg.id != run.next_id {
            return false;
        }
        let (Some(dst), Some(src)) = (
            self.buf.get_mut(base + slot.len..base + new_len),
            pkt.get(seg.hdr_len..),
        ) else {
            return false;
        };
        if dst.len() != src.len() {
            return false;
        }
        dst.copy_from_slice(src);
        if seg.psh {
            if let Some(flags) = self.buf.get_mut(base + run.ip_hdr_len + 13) {
                *flags |= TCP_PSH;
            }
        }
        run.segs += 1;
        run.next_seq = run.next_seq.wrapping_add(seg.payload_len as u32);
        run.next_id = run.next_id.wrapping_add(1);
        run.open =
            !seg.psh && seg.payload_len == run.gso_size && (!run.udp || run.segs < UDP_MAX_SEGS);
        if let Some(s) = self.slots.get_mut(i) {
            *s = Slot {
                len: new_len,
                run: Some(run),
            };
        }
        true
    }

    /// Writes the vnet header of every slot not yet finalized, fixing merged packets' headers.
    fn finalize(&mut self) {
        for i in self.finalized..self.slots.len() {
            let Some(slot) = self.slots.get(i).copied() else {
                break;
            };
            let base = i * self.stride;
            let Some(area) = self.buf.get_mut(base..base + VNET_HDR_LEN + slot.len) else {
                continue;
            };
            let Some((vh, pkt)) = area.split_at_mut_checked(VNET_HDR_LEN) else {
                continue;
            };
            let hdr = match slot.run {
                Some(run) if run.segs > 1 => seal(pkt, &run).unwrap_or_default(),
                _ => VnetHdr::default(),
            };
            // `vh` is exactly VNET_HDR_LEN long, so this cannot fail.
            let _ = hdr.encode(vh);
        }
        self.finalized = self.slots.len();
        self.flows.clear();
    }
}

impl Run {
    fn first(seg: &Seg) -> Run {
        Run {
            v6: seg.v6,
            udp: seg.key.udp,
            ip_hdr_len: seg.ip_hdr_len,
            hdr_len: seg.hdr_len,
            gso_size: seg.payload_len,
            segs: 1,
            next_seq: seg.seq.wrapping_add(seg.payload_len as u32),
            next_id: seg.id.wrapping_add(1),
            open: !seg.psh,
        }
    }
}

/// Fixes the IP length (and IPv4 checksum) of a merged packet (and a UDP one's UDP length),
/// puts the pseudo-header sum in the transport checksum field, and returns the vnet header
/// describing it.
fn seal(pkt: &mut [u8], run: &Run) -> Option<VnetHdr> {
    let len = pkt.len();
    if run.v6 {
        put16(pkt, 4, u16::try_from(len - V6_HDR_LEN).ok()?)?;
    } else {
        put16(pkt, 2, u16::try_from(len).ok()?)?;
        put16(pkt, 10, 0)?;
        let c = checksum::ipv4_header(pkt.get(..run.ip_hdr_len)?);
        put16(pkt, 10, c)?;
    }
    let l4_len = len - run.ip_hdr_len;
    let (proto, csum_offset, gso_type) = match (run.udp, run.v6) {
        (true, _) => (PROTO_UDP, UDP_CSUM_OFFSET, GSO_UDP_L4),
        (false, false) => (PROTO_TCP, TCP_CSUM_OFFSET, GSO_TCPV4),
        (false, true) => (PROTO_TCP, TCP_CSUM_OFFSET, GSO_TCPV6),
    };
    if run.udp {
        put16(pkt, run.ip_hdr_len + 4, u16::try_from(l4_len).ok()?)?;
    }
    let psum = ip::pseudo(pkt, run.v6, proto, l4_len)?;
    put16(pkt, run.ip_hdr_len + csum_offset, checksum::fold(psum))?;
    Some(VnetHdr {
        flags: FLAG_NEEDS_CSUM,
        gso_type,
        hdr_len: u16::try_from(run.hdr_len).ok()?,
        gso_size: u16::try_from(run.gso_size).ok()?,
        csum_start: u16::try_from(run.ip_hdr_len).ok()?,
        csum_offset: csum_offset as u16,
    })
}

/// Whether two segments' headers agree on everything but IP length/ID/checksum and TCP
/// sequence/checksum (and PSH, which only the newer may carry), or UDP length/checksum. Both
/// are `hdr_len` long.
fn headers_match(head: &[u8], new: &[u8], v6: bool, ip_hdr_len: usize, udp: bool) -> bool {
    let same = |a: usize, b: usize| {
        let (x, y) = (head.get(a..b), new.get(a..b));
        x.is_some() && x == y
    };
    let ip_ok = if v6 {
        // Version/traffic class/flow label; next header/hop limit; addresses.
        same(0, 4) && same(6, V6_HDR_LEN)
    } else {
        // Version/IHL/TOS; flags/fragment/TTL/protocol; addresses.
        same(0, 2) && same(6, 10) && same(12, 20)
    };
    let t = ip_hdr_len;
    if udp {
        return ip_ok && same(t, t + 4);
    }
    let flags_ok = matches!(
        (head.get(t + 13), new.get(t + 13)),
        (Some(a), Some(b)) if *a == b & !TCP_PSH
    );
    ip_ok
        && same(t, t + 4)
        && same(t + 8, t + 13)
        && flags_ok
        && same(t + 14, t + 16)
        && same(t + 18, head.len())
}

/// Sorts a received packet into pass-through or mergeable TCP data or UDP datagrams
/// (checksums verified: the IPv4 header's always, the transport one if `verify`); UDP only
/// if `merge_udp`.
fn classify(pkt: &[u8], verify: bool, merge_udp: bool) -> Class {
    let Ok(ip) = ip::parse(pkt) else {
        return Class::Other;
    };
    let udp = ip.proto == PROTO_UDP;
    if !(udp || ip.proto == PROTO_TCP) || ip.fragment {
        return Class::Between {
            v6: ip.v6,
            addrs: addr_pair(pkt, ip.v6),
        };
    }
    let off = ip.hdr_len;
    let l4_min = if udp { UDP_HDR_LEN } else { 20 };
    let Some(ports) = arr::<4>(pkt, off).filter(|_| off + l4_min <= ip.len) else {
        return Class::Other;
    };
    let key = FlowKey {
        v6: ip.v6,
        udp,
        addrs: addr_pair(pkt, ip.v6),
        ports: *ports,
    };
    if udp {
        if !merge_udp {
            return Class::FlowOther(key);
        }
        return classify_udp(pkt, &ip, key, verify);
    }
    let Some(t) = arr::<20>(pkt, off) else {
        return Class::Other;
    };
    let tcp_hdr_len = usize::from(t[12] >> 4) * 4;
    let hdr_len = off + tcp_hdr_len;
    let flags = t[13];
    let mergeable = ip.len == pkt.len()
        && (ip.v6 || off == 20)
        && tcp_hdr_len >= 20
        && hdr_len < ip.len
        && (flags == TCP_ACK || flags == TCP_ACK | TCP_PSH)
        && checksums_ok(pkt, ip.v6, off, PROTO_TCP, verify);
    if !mergeable {
        return Class::FlowOther(key);
    }
    let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
    Class::Data(Seg::new(
        key,
        &ip,
        pkt,
        tcp_hdr_len,
        seq,
        flags & TCP_PSH != 0,
    ))
}

/// Source and destination address of an IP packet, as they stand in it (zero-padded for IPv4).
fn addr_pair(pkt: &[u8], v6: bool) -> [u8; 32] {
    let mut addrs = [0; 32];
    let src = if v6 { pkt.get(8..40) } else { pkt.get(12..20) };
    for (k, a) in addrs.iter_mut().zip(src.unwrap_or_default()) {
        *k = *a;
    }
    addrs
}

/// A UDP datagram: mergeable when nothing about it is odd (no IP options or extension
/// headers, its UDP length the rest of the packet, some payload), it has a UDP checksum (0
/// means none: the merged packet goes to the kernel as `NEEDS_CSUM`, which would give it one,
/// and an IPv6 one must be dropped) and, with `verify`, its checksums hold.
fn classify_udp(pkt: &[u8], ip: &ip::Ip, key: FlowKey, verify: bool) -> Class {
    let off = ip.hdr_len;
    let udp_len = be16(pkt, off + 4).map(usize::from);
    let has_csum = be16(pkt, off + UDP_CSUM_OFFSET).is_some_and(|c| c != 0);
    let mergeable = ip.len == pkt.len()
        && (ip.v6 || off == 20)
        && udp_len == Some(ip.len - off)
        && ip.len > off + UDP_HDR_LEN
        && has_csum
        && checksums_ok(pkt, ip.v6, off, PROTO_UDP, verify);
    if !mergeable {
        return Class::FlowOther(key);
    }
    Class::Data(Seg::new(key, ip, pkt, UDP_HDR_LEN, 0, false))
}

impl Seg {
    /// `pkt` (parsed as `ip`, its transport header `l4_hdr_len` long and shorter than what
    /// follows the IP header) as a segment of `key`'s flow.
    fn new(key: FlowKey, ip: &ip::Ip, pkt: &[u8], l4_hdr_len: usize, seq: u32, psh: bool) -> Seg {
        let hdr_len = ip.hdr_len + l4_hdr_len;
        Seg {
            key,
            v6: ip.v6,
            ip_hdr_len: ip.hdr_len,
            hdr_len,
            payload_len: ip.len.saturating_sub(hdr_len),
            seq,
            id: if ip.v6 { 0 } else { be16(pkt, 4).unwrap_or(0) },
            psh,
        }
    }
}

/// IPv4 header checksum and (if `l4`) the transport (`proto`) checksum of a whole (untrimmed)
/// packet.
fn checksums_ok(pkt: &[u8], v6: bool, ip_hdr_len: usize, proto: u8, l4: bool) -> bool {
    let ip_ok = v6
        || pkt
            .get(..ip_hdr_len)
            .is_some_and(|h| checksum::verifies(checksum::sum(h, 0)));
    let l4_len = pkt.len().saturating_sub(ip_hdr_len);
    ip_ok
        && (!l4
            || matches!(
            (pkt.get(ip_hdr_len..), ip::pseudo(pkt, v6, proto, l4_len)),
            (Some(seg), Some(ps)) if checksum::verifies(checksum::sum(seg, ps))
            ))
}
