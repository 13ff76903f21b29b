//! Sending on one queue's socket: a run of same-size datagrams leaves with one UDP GSO send per
//! up to 64 of them while the kernel takes GSO, with `sendmmsg` otherwise. The kernel may know
//! GSO and still refuse it at run time (`EIO` when the egress device cannot checksum, as
//! wireguard-go's `conn/bind_std.go` and quinn-udp handle it): the sender then switches to
//! `sendmmsg` for good and resends what was refused, so forwarding goes on. It also refuses a
//! GSO send whose segments are larger than the path MTU it learned for the peer (`EMSGSIZE`,
//! after an ICMP "fragmentation needed" or with a route's `mtu`), where each datagram sent
//! alone still goes (fragmented by the kernel, as Flannel's udp backend sends): such a run
//! goes out with `sendmmsg`, and GSO stays on for the runs that fit.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::outbox::{Outbox, Transmit};
use super::ports::UdpIo;
use crate::io::GSO_MAX_SEGMENTS;
use crate::stats::{DropReason, Tally};

/// The most UDP payload one GSO send may carry (64 KiB less IP and UDP headers, rounded down).
const GSO_MAX_BYTES: usize = 65_000;

/// One queue's socket as the pump sends on it; shared by the queue's threads (and timers).
pub(crate) struct UdpSender<U> {
    sock: Arc<U>,
    /// Whether runs go out with UDP GSO: what the kernel says at start, switched off for good
    /// the first time it refuses a GSO send.
    gso: AtomicBool,
    /// Whether a path MTU below a run's segments was logged (once per socket: it lasts until
    /// the kernel forgets the learned MTU, and every run would say it again).
    pmtu_logged: AtomicBool,
}

/// Whether a failed GSO send means "not with GSO" rather than "not at all".
fn refuses_gso(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EIO)
}

/// Whether a failed GSO send means "not with segments this large to this peer": the path MTU
/// is below them (`EMSGSIZE` here; `EINVAL` is taken alike, as some kernels answer it for the
/// same check and we never send what it otherwise means: more than 64 segments, no checksum).
fn over_path_mtu(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMSGSIZE | libc::EINVAL))
}

impl<U: UdpIo> UdpSender<U> {
    pub fn new(sock: Arc<U>) -> Self {
        let gso = sock.gso_supported();
        UdpSender {
            sock,
            gso: AtomicBool::new(gso),
            pmtu_logged: AtomicBool::new(false),
        }
    }

    /// Whether runs currently use UDP GSO.
    pub fn gso(&self) -> bool {
        self.gso.load(Ordering::Relaxed)
    }

    /// Sends a run to its peer. Returns how many of its datagrams went, from the first: the
    /// kernel refused the rest (counted by the caller).
    pub fn send(&self, run: &Transmit<'_>, tally: &mut Tally) -> usize {
        let seg_len = run.seg_len.max(1);
        let gso_size = u16::try_from(seg_len).ok().filter(|_| self.gso());
        let Some(gso_size) = gso_size else {
            return self.send_batched(run.to, run.data, seg_len, tally);
        };
        let per_send = (GSO_MAX_BYTES / seg_len).clamp(1, GSO_MAX_SEGMENTS) * seg_len;
        let mut sent = 0;
        for chunk in run.data.chunks(per_send) {
            tally.syscalls += 1;
            let went = sent / seg_len;
            match self.sock.send_gso(run.to, chunk, gso_size) {
                Ok(_) => sent += chunk.len(),
                // A single datagram goes without the GSO option: its failure is not GSO's.
                Err(e) if chunk.len() > seg_len && (refuses_gso(&e) || over_path_mtu(&e)) => {
                    if refuses_gso(&e) {
                        self.stop_gso(&e);
                    } else if !self.pmtu_logged.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            peer = %run.to,
                            segment = seg_len,
                            "the path MTU to a peer is below our datagrams ({e}): sending such runs datagram by datagram, which the kernel fragments (is the underlay's MTU lower than the interface's?)"
                        );
                    }
                    let rest = run.data.get(sent..).unwrap_or_default();
                    return went + self.send_batched(run.to, rest, seg_len, tally);
                }
                Err(_) => return went,
            }
        }
        run.data.len().div_ceil(seg_len)
    }

    fn stop_gso(&self, e: &io::Error) {
        // Only the thread that switched it off says so.
        if self.gso.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                "the kernel refused a UDP GSO send ({e}): sending with sendmmsg from now on"
            );
        }
    }

    /// One `sendmmsg` per up to 64 segments of `data`. Returns how many went, from the first.
    fn send_batched(
        &self,
        to: SocketAddr,
        data: &[u8],
        seg_len: usize,
        tally: &mut Tally,
    ) -> usize {
        let mut msgs: [(SocketAddr, &[u8]); GSO_MAX_SEGMENTS] = [(to, &[]); GSO_MAX_SEGMENTS];
        let mut went = 0;
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
                    Ok(0) | Err(_) => return went + sent,
                    Ok(k) => sent += k,
                }
            }
            went += n;
        }
        went
    }

    /// Sends every datagram a codec queued, one syscall each, and empties the outbox. A refused
    /// packet counts as an `io_error` drop; a refused protocol message is left to the protocol.
    pub fn flush(&self, out: &mut Outbox, tally: &mut Tally) {
        if out.is_empty() {
            return;
        }
        for d in out.iter() {
            tally.syscalls += 1;
            if self.sock.send_gso(d.to, d.data, 0).is_err() && d.counted {
                tally.count_drop(DropReason::IoError);
            }
        }
        out.clear();
    }
}
