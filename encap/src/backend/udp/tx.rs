//! Pod -> network: read a (super-)packet from the TUN, route it to a peer, cut it into
//! MTU-sized packets in place, and send them with one UDP GSO `sendmsg` per 64 segments.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::Shared;
use crate::io::{is_timeout, TunQueue, UdpSock, GSO_MAX_SEGMENTS, TUN_READ_BUF_LEN};
use crate::stats::{DropReason, Tally};
use crate::wire::{ip, segment, VnetHdr, VNET_HDR_LEN};

/// The most UDP payload one GSO send may carry (64 KiB less IP and UDP headers, rounded down).
const GSO_MAX_BYTES: usize = 65_000;
/// Flush counters into the shared stats every this many reads (and on idle).
const FLUSH_EVERY: u32 = 64;

pub(super) struct Sender {
    tun: Arc<TunQueue>,
    sock: Arc<UdpSock>,
    shared: Arc<Shared>,
    gso: bool,
}

impl Sender {
    pub fn new(tun: Arc<TunQueue>, sock: Arc<UdpSock>, shared: Arc<Shared>, gso: bool) -> Self {
        Sender {
            tun,
            sock,
            shared,
            gso,
        }
    }

    pub fn run(self) {
        let mut rbuf = vec![0u8; TUN_READ_BUF_LEN];
        // Segments of one 64 KiB super-packet plus their repeated headers.
        let mut out = vec![0u8; 2 * TUN_READ_BUF_LEN];
        let mut tally = Tally::default();
        let mut reads = 0u32;
        let mut reported = false;
        while !self.shared.stop.load(Ordering::Relaxed) {
            let n = match self.tun.read(&mut rbuf) {
                Ok(n) => n,
                Err(e) if is_timeout(&e) => {
                    tally.flush_tx(&self.shared.stats);
                    continue;
                }
                Err(e) => {
                    if !reported {
                        tracing::error!("reading from the TUN failed: {e}");
                        reported = true;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            tally.syscalls += 1;
            if let Some(pkt) = rbuf.get_mut(..n) {
                self.forward(pkt, &mut out, &mut tally);
            }
            reads += 1;
            if reads >= FLUSH_EVERY {
                reads = 0;
                tally.flush_tx(&self.shared.stats);
            }
        }
    }

    fn forward(&self, buf: &mut [u8], out: &mut [u8], tally: &mut Tally) {
        let Some((hdr, pkt)) = buf.split_at_mut_checked(VNET_HDR_LEN) else {
            return tally.count_drop(DropReason::Malformed);
        };
        let Ok(hdr) = VnetHdr::decode(hdr) else {
            return tally.count_drop(DropReason::Malformed);
        };
        let dst = match ip::addrs(pkt) {
            Ok((_, IpAddr::V4(dst))) => dst,
            Ok(_) => return tally.count_drop(DropReason::NoRoute),
            Err(_) => return tally.count_drop(DropReason::Malformed),
        };
        let table = self.shared.peers.load();
        let Some(peer) = table.route(dst) else {
            self.reply_unreachable(pkt);
            return tally.count_drop(DropReason::NoRoute);
        };
        // Flannel's udp backend is a router hop: it decrements the TTL.
        match ip::decrement_ttl(pkt) {
            Ok(true) => {}
            Ok(false) => return tally.count_drop(DropReason::TtlExpired),
            Err(_) => return tally.count_drop(DropReason::Malformed),
        }
        let segs = match segment(&hdr, pkt, self.shared.mtu, out) {
            Ok(s) => s,
            Err(_) => return tally.count_drop(DropReason::Malformed),
        };
        let Some(data) = out.get(..segs.total) else {
            return tally.count_drop(DropReason::Malformed);
        };
        if self.send(peer.endpoint, data, segs.seg_len, tally) {
            tally.packets += segs.count as u64;
            tally.bytes += segs.total as u64;
        } else {
            tally.count_drop(DropReason::IoError);
        }
    }

    /// Sends back-to-back packets of `seg_len` bytes (the last may be shorter) to one peer.
    fn send(&self, to: SocketAddr, data: &[u8], seg_len: usize, tally: &mut Tally) -> bool {
        let seg_len = seg_len.max(1);
        if self.gso {
            let per_send = (GSO_MAX_BYTES / seg_len).clamp(1, GSO_MAX_SEGMENTS) * seg_len;
            for chunk in data.chunks(per_send) {
                tally.syscalls += 1;
                if self.sock.send_gso(to, chunk, seg_len as u16).is_err() {
                    return false;
                }
            }
            return true;
        }
        // No UDP GSO: one sendmmsg per up to 64 segments.
        let mut msgs: [(SocketAddr, &[u8]); GSO_MAX_SEGMENTS] = [(to, &[]); GSO_MAX_SEGMENTS];
        for group in data.chunks(seg_len * GSO_MAX_SEGMENTS) {
            let mut n = 0;
            for (slot, seg) in msgs.iter_mut().zip(group.chunks(seg_len)) {
                *slot = (to, seg);
                n += 1;
            }
            let mut sent = 0;
            while sent < n {
                tally.syscalls += 1;
                match self.sock.send_batch(&msgs[sent..n]) {
                    Ok(0) | Err(_) => return false,
                    Ok(k) => sent += k,
                }
            }
        }
        true
    }

    /// Tells a local pod its destination is in no lease (ICMP net unreachable), as a router would.
    fn reply_unreachable(&self, pkt: &[u8]) {
        let mut reply = [0u8; VNET_HDR_LEN + 600];
        let Some(own) = self.shared.own_subnet() else {
            return;
        };
        let from = IpAddr::V4(own.network());
        let Some((hdr, body)) = reply.split_at_mut_checked(VNET_HDR_LEN) else {
            return;
        };
        if VnetHdr::default().encode(hdr).is_err() {
            return;
        }
        if let Ok(len) = ip::icmp_unreachable(pkt, from, body) {
            let _ = self.tun.write(&reply[..VNET_HDR_LEN + len]);
        }
    }
}
