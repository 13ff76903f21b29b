//! When a packet thread adds its private counters to the shared stats. Adding them costs
//! atomic operations on cache lines every thread writes, so a thread does it once per many
//! packets; but what `/metrics` shows must not lag behind for long either, whatever the traffic:
//! an idle thread flushes on its read timeout, a busy one every [`FlushDue::BATCHES`] batches or
//! [`FlushDue::PACKETS`] packets, and sparse steady traffic (a ping every 100 ms keeps a read from
//! ever timing out, and takes seconds to make 64 batches) at least every [`FlushDue::MAX_AGE`].

use std::time::{Duration, Instant};

pub(super) struct FlushDue {
    batches: u32,
    since: Instant,
}

impl FlushDue {
    pub const BATCHES: u32 = 64;
    pub const PACKETS: u64 = 1024;
    pub const MAX_AGE: Duration = Duration::from_millis(50);

    pub fn new() -> Self {
        FlushDue {
            batches: 0,
            since: Instant::now(),
        }
    }

    /// Counts one batch, after which `pending` packets are counted but not flushed: whether to
    /// flush now. When it says so, the cadence starts again.
    pub fn after_batch(&mut self, pending: u64) -> bool {
        self.batches += 1;
        let due = self.batches >= Self::BATCHES
            || pending >= Self::PACKETS
            || self.since.elapsed() >= Self::MAX_AGE;
        if due {
            self.batches = 0;
            self.since = Instant::now();
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_after_enough_batches_packets_or_time() {
        let mut f = FlushDue::new();
        for _ in 1..FlushDue::BATCHES {
            assert!(!f.after_batch(1));
        }
        assert!(f.after_batch(1), "the 64th batch");
        assert!(!f.after_batch(1), "starts again");
        assert!(f.after_batch(FlushDue::PACKETS), "many packets pending");
        assert!(!f.after_batch(1));
        std::thread::sleep(FlushDue::MAX_AGE + Duration::from_millis(5));
        assert!(f.after_batch(1), "held back long enough");
    }
}
