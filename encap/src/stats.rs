//! Datapath counters, shared by the packet threads and read by metrics and tests. Threads add
//! their per-batch sums, not one atomic operation per packet.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a packet was dropped. Each reason has its own counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// A datagram whose outer source is no current lease's PublicIP.
    UnknownSender,
    /// A datagram whose inner source is outside the sender's leased subnet.
    SpoofedSource,
    /// A datagram whose inner destination is not in our subnet.
    NotForUs,
    /// Not a valid IP packet (too short, bad version or lengths).
    Malformed,
    /// A packet from a local pod to a subnet no lease covers.
    NoRoute,
    /// TTL or hop limit ran out.
    TtlExpired,
    /// The kernel refused the send or write.
    IoError,
    /// An encrypted datagram that does not authenticate for the peer it names, or a replay.
    NotAuthentic,
    /// A packet that waited for a WireGuard handshake and never went: pushed out of the wait
    /// queue by newer ones, or the handshake was given up (no answer within 90 s).
    NoHandshake,
}

impl DropReason {
    pub const ALL: [DropReason; 9] = [
        DropReason::UnknownSender,
        DropReason::SpoofedSource,
        DropReason::NotForUs,
        DropReason::Malformed,
        DropReason::NoRoute,
        DropReason::TtlExpired,
        DropReason::IoError,
        DropReason::NotAuthentic,
        DropReason::NoHandshake,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::UnknownSender => "unknown_sender",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::NotForUs => "not_for_us",
            DropReason::Malformed => "malformed",
            DropReason::NoRoute => "no_route",
            DropReason::TtlExpired => "ttl_expired",
            DropReason::IoError => "io_error",
            DropReason::NotAuthentic => "not_authentic",
            DropReason::NoHandshake => "no_handshake",
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Default)]
pub struct Stats {
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub tx_syscalls: AtomicU64,
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub rx_syscalls: AtomicU64,
    /// Peers in the table the packet threads route by, as last published.
    pub peers: AtomicU64,
    /// Times that table was replaced (each lease change that reached it).
    pub table_updates: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
    /// The offloads the datapath runs with (TUN offload flags, UDP GSO/GRO), for `status`:
    /// written once per device start, never by the packet threads.
    pub offloads: std::sync::Mutex<Vec<String>>,
}

impl Stats {
    pub fn count_drop(&self, why: DropReason, n: u64) {
        if n > 0 {
            self.drops[why as usize].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Records a newly published peer table of `peers` entries.
    pub fn table_published(&self, peers: usize) {
        self.peers.store(peers as u64, Ordering::Relaxed);
        self.table_updates.fetch_add(1, Ordering::Relaxed);
    }

    /// Records the offloads a device of the datapath started with.
    pub fn set_offloads(&self, device: &str, modes: String) {
        if let Ok(mut o) = self.offloads.lock() {
            o.retain(|m| !m.starts_with(&format!("{device}: ")));
            o.push(format!("{device}: {modes}"));
        }
    }

    pub fn drops(&self, why: DropReason) -> u64 {
        self.drops[why as usize].load(Ordering::Relaxed)
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Per-batch tallies, flushed into `Stats` once per batch.
#[derive(Debug, Default)]
pub struct Tally {
    pub packets: u64,
    pub bytes: u64,
    pub syscalls: u64,
    pub drops: [u64; DropReason::ALL.len()],
}

impl Tally {
    pub fn count_drop(&mut self, why: DropReason) {
        self.count_drops(why, 1);
    }

    /// `n` packets lost at once (a run the kernel refused, a merged packet the TUN refused).
    pub fn count_drops(&mut self, why: DropReason, n: u64) {
        self.drops[why as usize] += n;
    }

    pub fn flush_tx(&mut self, s: &Stats) {
        Stats::add(&s.tx_packets, self.packets);
        Stats::add(&s.tx_bytes, self.bytes);
        Stats::add(&s.tx_syscalls, self.syscalls);
        self.flush_drops(s);
    }

    pub fn flush_rx(&mut self, s: &Stats) {
        Stats::add(&s.rx_packets, self.packets);
        Stats::add(&s.rx_bytes, self.bytes);
        Stats::add(&s.rx_syscalls, self.syscalls);
        self.flush_drops(s);
    }

    fn flush_drops(&mut self, s: &Stats) {
        for why in DropReason::ALL {
            s.count_drop(why, self.drops[why as usize]);
        }
        *self = Tally::default();
    }
}
