//! Flannel-compatible network config, subnet allocation and leases over etcd v3.
//!
//! `config`, `lease`, `alloc` and `subnet_env` are pure logic, testable without etcd or root.
//! `registry` is the etcd adapter; `lifecycle` and `watch` drive it over time.

pub mod alloc;
pub mod config;
pub mod lease;
pub mod lifecycle;
pub mod registry;
pub mod subnet_env;
pub mod watch;

/// Exponential back-off for retry loops against etcd, so an unreachable etcd never spins a core.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: std::time::Duration,
    min: std::time::Duration,
    max: std::time::Duration,
}

impl Backoff {
    pub fn new(min: std::time::Duration, max: std::time::Duration) -> Self {
        Backoff {
            next: min,
            min,
            max,
        }
    }

    /// The delay to wait now; each call doubles the next one up to the maximum.
    pub fn next_delay(&mut self) -> std::time::Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }
}
