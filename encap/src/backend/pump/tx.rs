//! Pod -> network: read a (super-)packet from the TUN, route it to a peer, cut it into
//! MTU-sized packets, let the codec turn them into datagrams and send those (one GSO send per up
//! to 64) once the codec has returned.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::poll::Poller;
use super::{Codec, DeviceState, Outbox, TunIo, UdpIo, UdpSender};
use crate::io::{is_timeout, TUN_READ_BUF_LEN};
use crate::stats::{DropReason, Tally};
use crate::wire::{ip, segment, VnetHdr, VNET_HDR_LEN};

/// Flush counters into the shared stats every this many reads (and on idle).
const FLUSH_EVERY: u32 = 64;

pub(super) fn run<C: Codec, T: TunIo, U: UdpIo>(
    codec: &C,
    tun: &T,
    sender: &UdpSender<U>,
    state: &DeviceState,
    stop: &AtomicBool,
) {
    let mut rbuf = vec![0u8; TUN_READ_BUF_LEN];
    let mut bufs = TxBufs {
        // Segments of one 64 KiB super-packet plus their repeated headers.
        segs: vec![0u8; 2 * TUN_READ_BUF_LEN],
        scratch: codec.tx_scratch(),
        control: Outbox::new(),
    };
    let mut tally = Tally::default();
    let mut reads = 0u32;
    let mut reported = false;
    let mut poller = Poller::new(state.datapath.busy_poll);
    while !stop.load(Ordering::Relaxed) {
        let got = poller.next(|wait| {
            if wait {
                tun.read(&mut rbuf)
            } else {
                tun.try_read(&mut rbuf)
            }
        });
        let n = match got {
            Ok(n) => n,
            Err(e) if is_timeout(&e) => {
                tally.flush_tx(&state.stats);
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
            forward(codec, tun, sender, state, pkt, &mut bufs, &mut tally);
        }
        reads += 1;
        if reads >= FLUSH_EVERY {
            reads = 0;
            tally.flush_tx(&state.stats);
        }
    }
}

/// A sender thread's buffers, allocated once.
struct TxBufs<S> {
    segs: Vec<u8>,
    scratch: S,
    /// Messages the codec sends before a run (a handshake initiation).
    control: Outbox,
}

fn forward<C: Codec, T: TunIo, U: UdpIo>(
    codec: &C,
    tun: &T,
    sender: &UdpSender<U>,
    state: &DeviceState,
    buf: &mut [u8],
    bufs: &mut TxBufs<C::TxScratch>,
    tally: &mut Tally,
) {
    let Some((hdr, pkt)) = buf.split_at_mut_checked(VNET_HDR_LEN) else {
        return tally.count_drop(DropReason::Malformed);
    };
    let Ok(hdr) = VnetHdr::decode(hdr) else {
        return tally.count_drop(DropReason::Malformed);
    };
    let dst = match ip::addrs(pkt) {
        Ok((_, dst)) => dst,
        Err(_) => return tally.count_drop(DropReason::Malformed),
    };
    let Some(route) = codec.route(dst) else {
        reply_unreachable(tun, state, pkt, dst);
        return tally.count_drop(DropReason::NoRoute);
    };
    if C::DECREMENT_TTL {
        match ip::decrement_ttl(pkt) {
            Ok(true) => {}
            Ok(false) => return tally.count_drop(DropReason::TtlExpired),
            Err(_) => return tally.count_drop(DropReason::Malformed),
        }
    }
    let segs = match segment(&hdr, pkt, state.mtu, &mut bufs.segs) {
        Ok(s) => s,
        Err(_) => return tally.count_drop(DropReason::Malformed),
    };
    let Some(data) = bufs.segs.get(..segs.total) else {
        return tally.count_drop(DropReason::Malformed);
    };
    let run = codec.transmit(
        &mut bufs.scratch,
        route,
        data,
        segs.seg_len,
        &mut bufs.control,
        tally,
    );
    // The codec has returned, so no peer lock is held during these sends.
    sender.flush(&mut bufs.control, tally);
    let sent = match run {
        Ok(Some(run)) if !sender.send(&run, tally) => Err(DropReason::IoError),
        // Sent, or queued behind a handshake.
        Ok(_) => Ok(()),
        Err(why) => Err(why),
    };
    match sent {
        Ok(()) => {
            tally.packets += segs.count as u64;
            tally.bytes += segs.total as u64;
        }
        Err(why) => tally.count_drop(why),
    }
}

/// Tells a local pod its destination is in no lease (ICMP net unreachable, ICMPv6 no route),
/// as a router would, from our device's address of that family (none: no reply).
fn reply_unreachable<T: TunIo>(tun: &T, state: &DeviceState, pkt: &[u8], dst: IpAddr) {
    // Room for the longest reply: ICMPv6 quotes up to 1280 - 48 bytes.
    let mut reply = [0u8; VNET_HDR_LEN + 1280];
    let Some(from) = state.own().address_for(dst) else {
        return;
    };
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
