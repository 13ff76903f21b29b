//! Network -> pod: receive datagrams in batches (`recvmmsg`, UDP GRO), let the codec open them
//! and vet their senders, drop what is not for our subnet, merge TCP segments (and, where the
//! TUN takes them, same-size UDP datagrams) into super-packets and write them to the TUN; then
//! send what the pods answered at once, when the queue's sender thread is not already sending
//! (see `tx::TxTurn`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::flush::FlushDue;
use super::poll::Poller;
use super::tx::{Ctx, TxTurn};
use super::{Codec, Outbox, OwnSubnets, TunIo, UdpIo};
use crate::io::{is_timeout, RecvBatch};
use crate::stats::{DropReason, Tally};
use crate::wire::{ip, Gro, VNET_HDR_LEN};

/// Messages per `recvmmsg`; each may hold many GRO-merged datagrams.
const BATCH: usize = 16;
/// Super-packets the coalescer holds before it must be flushed to the TUN.
const GRO_PACKETS: usize = 64;

/// Answers are sent from here only after batches of at most this many bytes: request and
/// response traffic, whose round trips the saved wake-up shortens. After bulk data the answers
/// (ACKs) are left to the sender thread, which runs beside this one, the transfer's bottleneck.
const ANSWER_AFTER_BYTES: u64 = 4096;

/// After a try that found no answer queued (one-way traffic), this many batches pass before
/// the next: a futile try costs a syscall.
const FUTILE_BACKOFF: u32 = 16;

pub(super) fn run<C: Codec, T: TunIo, U: UdpIo>(
    ctx: &Ctx<'_, C, T, U>,
    sock: &U,
    turn: &TxTurn<C::TxScratch, C::Route>,
    stop: &AtomicBool,
) {
    let Ctx {
        codec,
        tun,
        sender,
        state,
    } = *ctx;
    let mut batch = RecvBatch::new(BATCH, 65_535);
    let mut gro = Gro::new(GRO_PACKETS, VNET_HDR_LEN + 65_535);
    if C::DELIVERS_INTACT {
        gro = gro.trusting();
    }
    if !tun.writes_udp_gso() {
        gro = gro.without_udp();
    }
    let mut scratch = codec.rx_scratch();
    let mut replies = Outbox::new();
    let mut tally = Tally::default();
    // What this thread sends on the queue's behalf (see `TxTurn`), counted as sent.
    let mut tx_tally = Tally::default();
    let mut reported = false;
    let mut flush_due = FlushDue::new();
    // Batches to let pass before trying again to send answers from here.
    let mut backoff = 0u32;
    let mut poller = Poller::new(state.datapath.busy_poll);
    while !stop.load(Ordering::Relaxed) {
        let got = poller.next(|wait| {
            if wait {
                sock.recv_batch(&mut batch)
            } else {
                sock.try_recv_batch(&mut batch)
            }
        });
        let n = match got {
            Ok(n) => n,
            Err(e) if is_timeout(&e) => {
                tally.flush_rx(&state.stats);
                tx_tally.flush_tx(&state.stats);
                continue;
            }
            Err(e) => {
                if !reported {
                    tracing::error!("receiving from the UDP socket failed: {e}");
                    reported = true;
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        tally.syscalls += 1;
        let bytes_before = tally.bytes;
        let own = state.own();
        for i in 0..n {
            let Some(mut msg) = batch.msg_mut(i) else {
                continue;
            };
            // Only the beginning of a message larger than its slot arrived.
            if msg.view().is_truncated() {
                tally.count_drop(DropReason::Malformed);
                continue;
            }
            codec.receive(
                &mut scratch,
                &mut msg,
                &mut replies,
                &mut tally,
                |pkt, tally| deliver(pkt, own, tun, &mut gro, tally),
            );
            sender.flush(&mut replies, &mut tally);
        }
        flush(tun, &mut gro, &mut tally);
        // What the pods answered to what we just wrote is queued in our TUN queue now: send
        // it from here, saving the sender thread's wake-up on the round trip, unless the
        // sender thread is already at it.
        let delivered = tally.bytes.saturating_sub(bytes_before);
        if (1..=ANSWER_AFTER_BYTES).contains(&delivered) {
            if backoff > 0 {
                backoff -= 1;
            } else if let Some(mut side) = turn.try_lock() {
                // A read error is the sender thread's to report.
                if let Ok(0) = ctx.drain(&mut side, &mut tx_tally) {
                    backoff = FUTILE_BACKOFF;
                }
            }
        }
        // Counted drops too: a flood of dropped datagrams must show while it lasts.
        if flush_due.after_batch(tally.packets.max(tx_tally.packets)) {
            tally.flush_rx(&state.stats);
            tx_tally.flush_tx(&state.stats);
        }
    }
}

/// Queues an admitted inner packet for the TUN if it is for a pod of ours.
fn deliver<T: TunIo>(pkt: &[u8], own: OwnSubnets, tun: &T, gro: &mut Gro, tally: &mut Tally) {
    match ip::addrs(pkt) {
        Ok((_, dst)) if own.contains(dst) => {}
        Ok(_) => return tally.count_drop(DropReason::NotForUs),
        Err(_) => return tally.count_drop(DropReason::Malformed),
    }
    if gro.is_full() {
        flush(tun, gro, tally);
    }
    // Counted as received once written (`flush`).
    if gro.push(pkt).is_err() {
        tally.count_drop(DropReason::Malformed);
    }
}

/// Writes what GRO holds to the TUN. A packet counts as received once written; a refused
/// write loses every packet merged into it, each counted.
fn flush<T: TunIo>(tun: &T, gro: &mut Gro, tally: &mut Tally) {
    for (p, carried) in gro.outputs() {
        tally.syscalls += 1;
        if tun.write(p).is_ok() {
            tally.packets += carried.packets;
            tally.bytes += carried.bytes;
        } else {
            tally.count_drops(DropReason::IoError, carried.packets);
        }
    }
    gro.clear();
}
