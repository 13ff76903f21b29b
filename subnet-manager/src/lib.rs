//! Flannel-compatible network config, subnet allocation and leases over etcd v3.
//!
//! `config`, `json`, `lease`, `alloc`, `admission` and `subnet_env` are pure logic, testable
//! without etcd or root, and all that is built without the `etcd` feature (as encap uses it).
//! `registry` is the etcd adapter; `lifecycle` and `watch` drive it over time.

pub mod admission;
pub mod alloc;
pub mod config;
pub mod json;
pub mod lease;
#[cfg(feature = "etcd")]
pub mod lifecycle;
#[cfg(feature = "etcd")]
pub mod registry;
pub mod subnet_env;
#[cfg(feature = "etcd")]
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

/// Longest text from etcd quoted in full in a message; longer values are cut, so a huge value
/// (a 1 MB "PublicIP") cannot flood the log each time it is read.
pub const QUOTE_LIMIT: usize = 80;

/// `s` quoted as `{:?}` would, cut to [`QUOTE_LIMIT`] bytes with its full length noted.
pub fn quote(s: &str) -> String {
    if s.len() <= QUOTE_LIMIT {
        return format!("{s:?}");
    }
    let mut end = QUOTE_LIMIT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &s[..end], s.len())
}

#[cfg(test)]
mod quote_tests {
    #[test]
    fn long_values_are_cut() {
        assert_eq!(super::quote("10.0.0.1"), "\"10.0.0.1\"");
        let big = "x".repeat(1_400_000);
        let q = super::quote(&big);
        assert!(q.len() < 120, "{q}");
        assert!(q.ends_with("… (1400000 bytes)"), "{q}");
        // A multi-byte character at the cut is not split.
        let wide = "é".repeat(100);
        assert!(super::quote(&wide).contains("(200 bytes)"));
    }
}
