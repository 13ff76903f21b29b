//! Pod -> network: read a (super-)packet from the TUN, route it to a peer, cut it into
//! MTU-sized packets, each in a slot with the room the codec asks around it, let the codec turn
//! them into datagrams where they lie and send those (one GSO send per up to 64) once the codec
//! has returned.
//!
//! Packets already queued in the TUN when a read returns are read too (without waiting, up to
//! [`DRAIN`]); small ones join the run being built while they go to the same peer in packets of
//! the same size: a burst of small packets (a UDP flood, TCP ACKs, many small RPCs) then leaves
//! in one GSO send instead of one `sendmsg` each, and crosses the kernel's stack once. A
//! super-packet's segments are sent as soon as they are cut. Nothing waits for packets that are
//! not there yet, so a lone packet goes out as soon as it was read.
//!
//! Either of a queue's two threads may do this, one at a time (see [`TxTurn`]): the sender
//! thread when the queue becomes readable, the receiver thread right after it wrote a small
//! batch to the TUN (see `rx.rs`).

use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use super::flush::FlushDue;
use super::poll::Poller;
use super::{Codec, DeviceState, Outbox, Packets, TunIo, UdpIo, UdpSender};
use crate::io::{is_timeout, TUN_READ_BUF_LEN};
use crate::stats::{DropReason, Tally};
use crate::wire::{ip, segment_into, Layout, Segments, VnetHdr, WireError, VNET_HDR_LEN};

/// Most TUN reads that feed one batch of sends.
const DRAIN: usize = 64;

/// One queue's sending side: its buffers, and with them the right to read the TUN queue and
/// send. The sender thread takes it when the queue is readable. The receiver thread takes it,
/// when free, right after writing a small batch to the TUN, because what it wrote often makes
/// the pod answer at once into this queue (TCP ACKs, replies: the kernel steers a flow's
/// packets to the queue that last wrote it): sending those from the thread that is awake saves
/// waking the sender, one wake-up on every round trip. One holder at a time reads and sends,
/// so a flow's packets leave in the order they were read.
pub(super) struct TxTurn<S, R> {
    side: Mutex<TxSide<S, R>>,
}

/// What the holder of a queue's turn works with.
pub(super) struct TxSide<S, R> {
    /// One TUN read.
    rbuf: Vec<u8>,
    bufs: TxBufs<S, R>,
}

impl<S, R> TxTurn<S, R> {
    pub fn new<C: Codec<TxScratch = S, Route = R>>(codec: &C) -> Self {
        TxTurn {
            side: Mutex::new(TxSide {
                rbuf: vec![0u8; TUN_READ_BUF_LEN],
                bufs: TxBufs {
                    segs: vec![0u8; C::TX_BUF_LEN],
                    scratch: codec.tx_scratch(),
                    control: Outbox::new(),
                    run: None,
                },
            }),
        }
    }

    /// Waits for the turn. A holder that panicked left only buffers behind, which are
    /// overwritten before use: a poisoned lock is taken as it is.
    fn lock(&self) -> MutexGuard<'_, TxSide<S, R>> {
        self.side.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The turn if nobody holds it.
    pub fn try_lock(&self) -> Option<MutexGuard<'_, TxSide<S, R>>> {
        match self.side.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
}

/// The sender thread: waits until the TUN queue has packets, then takes the turn and sends
/// what is queued.
pub(super) fn run<C: Codec, T: TunIo, U: UdpIo>(
    ctx: &Ctx<'_, C, T, U>,
    turn: &TxTurn<C::TxScratch, C::Route>,
    stop: &AtomicBool,
) {
    let mut tally = Tally::default();
    let mut flush_due = FlushDue::new();
    let mut reported = false;
    let mut poller = Poller::new(ctx.state.datapath.busy_poll);
    // After a drain that read packets more are likely queued: drain again at once, one read
    // per packet as while busy before, and ask whether the queue is readable (a `poll`) only
    // once a drain found it empty.
    let mut busy = false;
    while !stop.load(Ordering::Relaxed) {
        let ready = match busy {
            true => Ok(()),
            false => poller.next(|wait| {
                if wait {
                    ctx.tun.wait_readable()
                } else {
                    ctx.tun.readable_now()
                }
            }),
        };
        let failed = match ready {
            Ok(()) => match ctx.drain(&mut turn.lock(), &mut tally) {
                Ok(read) => {
                    busy = read > 0;
                    if busy {
                        poller.active();
                    }
                    None
                }
                Err(e) => Some(e),
            },
            Err(e) if is_timeout(&e) => {
                tally.flush_tx(&ctx.state.stats);
                continue;
            }
            Err(e) => Some(e),
        };
        if let Some(e) = failed {
            busy = false;
            if !reported {
                tracing::error!("reading from TUN {} failed: {e}", ctx.tun.name());
                reported = true;
            }
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        if flush_due.after_batch(tally.packets) {
            tally.flush_tx(&ctx.state.stats);
        }
    }
}

/// A sender thread's buffers, allocated once.
pub(super) struct TxBufs<S, R> {
    segs: Vec<u8>,
    scratch: S,
    /// Messages the codec sends before a run (a handshake initiation).
    control: Outbox,
    /// The run being built in `segs`.
    run: Option<Run<R>>,
}

/// Segments for one peer in their slots (see `Codec::slot_len`), back to back in
/// `segs[start..start + total]`, each `seg_len` bytes but the last, `last_len`.
struct Run<R> {
    route: R,
    start: usize,
    seg_len: usize,
    last_len: usize,
    count: usize,
    total: usize,
}

impl<R> Run<R> {
    fn end(&self) -> usize {
        self.start + self.total
    }

    /// The inner packets' bytes, without the slots' room (what the counters count).
    fn inner_bytes(&self) -> usize {
        self.count.saturating_sub(1) * self.seg_len + self.last_len
    }

    /// Whether more segments may follow: all so far are full-size.
    fn open(&self) -> bool {
        self.last_len == self.seg_len
    }
}

/// What sending on one queue uses, from either of its threads.
pub(super) struct Ctx<'a, C, T, U> {
    pub codec: &'a C,
    pub tun: &'a T,
    pub sender: &'a UdpSender<U>,
    pub state: &'a DeviceState,
}

impl<C: Codec, T: TunIo, U: UdpIo> Ctx<'_, C, T, U> {
    /// Reads what the TUN queue holds (up to [`DRAIN`] packets, without waiting) and sends it.
    /// Returns how many packets were read, or the read error other than "nothing queued" that
    /// stopped it with nothing read.
    pub fn drain(
        &self,
        side: &mut TxSide<C::TxScratch, C::Route>,
        tally: &mut Tally,
    ) -> io::Result<usize> {
        let TxSide { rbuf, bufs } = side;
        let mut read = 0;
        let mut failed = None;
        for _ in 0..DRAIN {
            match self.tun.try_read(rbuf) {
                Ok(n) => {
                    read += 1;
                    tally.syscalls += 1;
                    if let Some(pkt) = rbuf.get_mut(..n) {
                        self.stage(pkt, bufs, tally);
                    }
                }
                Err(e) => {
                    tally.syscalls += 1;
                    if e.kind() != io::ErrorKind::WouldBlock {
                        failed = Some(e);
                    }
                    break;
                }
            }
        }
        self.send(bufs, tally);
        match failed {
            Some(e) if read == 0 => Err(e),
            _ => Ok(read),
        }
    }

    /// Routes one read and adds its segments to the run (sending the run first when they
    /// cannot join it).
    fn stage(&self, buf: &mut [u8], bufs: &mut TxBufs<C::TxScratch, C::Route>, tally: &mut Tally) {
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
        let Some(route) = self.codec.route(dst) else {
            reply_unreachable(self.tun, self.state, pkt, dst);
            return tally.count_drop(DropReason::NoRoute);
        };
        if C::DECREMENT_TTL {
            match ip::decrement_ttl(pkt) {
                Ok(true) => {}
                Ok(false) => return tally.count_drop(DropReason::TtlExpired),
                Err(_) => return tally.count_drop(DropReason::Malformed),
            }
        }
        let joinable = bufs
            .run
            .as_ref()
            .is_some_and(|r| r.open() && self.codec.same_route(&r.route, &route));
        if !joinable {
            self.send(bufs, tally);
        }
        let start = bufs.run.as_ref().map_or(0, Run::end);
        let segs = match self.cut(&hdr, pkt, bufs, start) {
            Ok(s) => s,
            // No room left after the run: send it, then cut at the start of the buffer.
            Err(WireError::BufferTooSmall { .. }) if start > 0 => {
                self.send(bufs, tally);
                match self.cut(&hdr, pkt, bufs, 0) {
                    Ok(s) => s,
                    Err(_) => return tally.count_drop(DropReason::Malformed),
                }
            }
            Err(_) => return tally.count_drop(DropReason::Malformed),
        };
        let start = bufs.run.as_ref().map_or(0, Run::end);
        match &mut bufs.run {
            Some(r) if r.seg_len == segs.seg_len => {
                r.count += segs.count;
                r.total += segs.total;
                r.last_len = segs.last_len;
            }
            _ => {
                // Another size: the run so far leaves alone, and these start the next.
                self.send(bufs, tally);
                bufs.run = Some(Run {
                    route,
                    start,
                    seg_len: segs.seg_len,
                    last_len: segs.last_len,
                    count: segs.count,
                    total: segs.total,
                });
            }
        }
        // A super-packet's segments leave at once: holding them while the next read is cut
        // cost single-stream TCP about 15 % here (measured), while small packets gain from
        // sharing a send.
        if segs.count > 1 {
            self.send(bufs, tally);
        }
    }

    fn cut(
        &self,
        hdr: &VnetHdr,
        pkt: &[u8],
        bufs: &mut TxBufs<C::TxScratch, C::Route>,
        start: usize,
    ) -> Result<Segments, WireError> {
        let out = bufs
            .segs
            .get_mut(start..)
            .ok_or(WireError::BufferTooSmall { need: 1, have: 0 })?;
        let layout = Layout {
            head: C::HEADROOM,
            slot: |len| self.codec.slot_len(len),
        };
        segment_into(hdr, pkt, self.state.mtu, out, &layout)
    }

    /// Hands the run to the codec and sends what it returns (nothing if there is no run).
    fn send(&self, bufs: &mut TxBufs<C::TxScratch, C::Route>, tally: &mut Tally) {
        let Some(run) = bufs.run.take() else { return };
        let (count, bytes) = (run.count as u64, run.inner_bytes() as u64);
        let Some(buf) = bufs.segs.get_mut(run.start..run.end()) else {
            return tally.count_drop(DropReason::Malformed);
        };
        let pkts = Packets {
            buf,
            count: run.count,
            len: run.seg_len,
            last_len: run.last_len,
        };
        let made =
            self.codec
                .transmit(&mut bufs.scratch, run.route, pkts, &mut bufs.control, tally);
        // The codec has returned, so no peer lock is held during these sends.
        self.sender.flush(&mut bufs.control, tally);
        match made {
            // Each packet leaves as one datagram. The codec may have made fewer than `count`
            // (it counted why); of those the kernel may refuse the last ones. What went are
            // the run's first packets, full-size unless all of them went.
            Ok(Some(t)) => {
                let datagrams = t.data.len().div_ceil(t.seg_len.max(1)) as u64;
                let went = (self.sender.send(&t, tally) as u64).min(datagrams);
                tally.packets += went;
                tally.bytes += if went >= count {
                    bytes
                } else {
                    went * run.seg_len as u64
                };
                tally.count_drops(DropReason::IoError, datagrams - went);
            }
            // Queued behind a handshake: counted as sent.
            Ok(None) => {
                tally.packets += count;
                tally.bytes += bytes;
            }
            Err(why) => tally.count_drops(why, count),
        }
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
