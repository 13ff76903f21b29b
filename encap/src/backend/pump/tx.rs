//! Pod -> network: read a (super-)packet from the TUN, route it to a peer, cut it into
//! MTU-sized packets and let the codec put them on the wire (one GSO send per up to 64).

use std::net::IpAddr;
use std::time::Duration;

use super::{Codec, Shared, Wire};
use crate::io::{is_timeout, TunQueue, TUN_READ_BUF_LEN};
use crate::stats::{DropReason, Tally};
use crate::wire::{ip, segment, VnetHdr, VNET_HDR_LEN};

/// Flush counters into the shared stats every this many reads (and on idle).
const FLUSH_EVERY: u32 = 64;

pub(super) fn run<C: Codec>(codec: &C, tun: &TunQueue, wire: &Wire, shared: &Shared) {
    let mut rbuf = vec![0u8; TUN_READ_BUF_LEN];
    // Segments of one 64 KiB super-packet plus their repeated headers.
    let mut out = vec![0u8; 2 * TUN_READ_BUF_LEN];
    let mut scratch = codec.tx_scratch();
    let mut tally = Tally::default();
    let mut reads = 0u32;
    let mut reported = false;
    while !shared.stopping() {
        let n = match tun.read(&mut rbuf) {
            Ok(n) => n,
            Err(e) if is_timeout(&e) => {
                tally.flush_tx(&shared.stats);
                continue;
            }
            Err(e) => {
                if !reported {
                    tracing::error!("reading from TUN {} failed: {e}", tun.name());
                    reported = true;
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        tally.syscalls += 1;
        if let Some(pkt) = rbuf.get_mut(..n) {
            forward(
                codec,
                &mut scratch,
                tun,
                wire,
                shared,
                pkt,
                &mut out,
                &mut tally,
            );
        }
        reads += 1;
        if reads >= FLUSH_EVERY {
            reads = 0;
            tally.flush_tx(&shared.stats);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn forward<C: Codec>(
    codec: &C,
    scratch: &mut C::TxScratch,
    tun: &TunQueue,
    wire: &Wire,
    shared: &Shared,
    buf: &mut [u8],
    out: &mut [u8],
    tally: &mut Tally,
) {
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
    let Some(route) = codec.route(dst) else {
        reply_unreachable(tun, shared, pkt);
        return tally.count_drop(DropReason::NoRoute);
    };
    if C::DECREMENT_TTL {
        match ip::decrement_ttl(pkt) {
            Ok(true) => {}
            Ok(false) => return tally.count_drop(DropReason::TtlExpired),
            Err(_) => return tally.count_drop(DropReason::Malformed),
        }
    }
    let segs = match segment(&hdr, pkt, shared.mtu, out) {
        Ok(s) => s,
        Err(_) => return tally.count_drop(DropReason::Malformed),
    };
    let Some(data) = out.get(..segs.total) else {
        return tally.count_drop(DropReason::Malformed);
    };
    match codec.transmit(scratch, route, data, segs.seg_len, wire, tally) {
        Ok(()) => {
            tally.packets += segs.count as u64;
            tally.bytes += segs.total as u64;
        }
        Err(why) => tally.count_drop(why),
    }
}

/// Tells a local pod its destination is in no lease (ICMP net unreachable), as a router would.
fn reply_unreachable(tun: &TunQueue, shared: &Shared, pkt: &[u8]) {
    let mut reply = [0u8; VNET_HDR_LEN + 600];
    let Some(own) = shared.own_subnet() else {
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
        let _ = tun.write(&reply[..VNET_HDR_LEN + len]);
    }
}
