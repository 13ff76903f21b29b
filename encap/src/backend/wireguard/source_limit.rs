//! A per-source limit on handshake messages whose source address a cookie proved (`cookie`).
//!
//! Why: the cookie gate only asks for cookies once 100 handshake messages a second arrive;
//! a message with a valid cookie (mac2) then passes, however many follow from that address.
//! Each accepted initiation costs four Diffie-Hellman operations on a receiver thread, which
//! also carries data. So, as wireguard-go does, each source gets 20 messages a second with
//! a burst of 5: a real peer sends one per handshake attempt (at most one a second while
//! packets wait), a flood from one address is cut to that. IPv6 sources count per /64, which
//! one host may hold whole.
//!
//! Pure apart from its lock: the caller passes the time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Messages per second a source may send.
const PER_SECOND: u64 = 20;
/// Messages a source may send at once after a quiet second.
const BURST: u64 = 5;
/// What one message costs, in nanoseconds of refill.
const COST_NS: u64 = 1_000_000_000 / PER_SECOND;
/// Sources tracked at most; beyond that, a new source waits until idle ones are forgotten.
const MAX_SOURCES: usize = 1 << 16;
/// Sources idle this long have a full bucket again: forgetting them changes nothing.
const FORGET_AFTER: Duration = Duration::from_secs(1);

/// One source's token bucket, in nanoseconds of refill.
#[derive(Clone, Copy)]
struct Bucket {
    tokens_ns: u64,
    last: Instant,
}

struct Sources {
    buckets: HashMap<IpAddr, Bucket>,
    last_sweep: Option<Instant>,
}

pub(super) struct SourceLimit {
    sources: Mutex<Sources>,
}

/// The address a source is counted under: IPv4 as is (also when it arrives IPv4-mapped on a
/// dual-stack socket), IPv6 by its /64.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        v4 @ IpAddr::V4(_) => v4,
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
    }
}

impl SourceLimit {
    pub fn new() -> Self {
        SourceLimit {
            sources: Mutex::new(Sources {
                buckets: HashMap::new(),
                last_sweep: None,
            }),
        }
    }

    /// Whether a handshake message from `ip` may be worked on at `now`.
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        let mut s = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if s.last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= FORGET_AFTER)
        {
            s.buckets
                .retain(|_, b| now.saturating_duration_since(b.last) < FORGET_AFTER);
            s.last_sweep = Some(now);
        }
        let key = source_key(ip);
        let full = s.buckets.len() >= MAX_SOURCES;
        let bucket = match s.buckets.get_mut(&key) {
            Some(b) => b,
            None if full => return false,
            None => s.buckets.entry(key).or_insert(Bucket {
                tokens_ns: BURST * COST_NS,
                last: now,
            }),
        };
        let refill = now.saturating_duration_since(bucket.last).as_nanos();
        bucket.tokens_ns = u64::try_from(refill)
            .unwrap_or(u64::MAX)
            .saturating_add(bucket.tokens_ns)
            .min(BURST * COST_NS);
        bucket.last = now;
        if bucket.tokens_ns < COST_NS {
            return false;
        }
        bucket.tokens_ns -= COST_NS;
        true
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.sources
            .lock()
            .map(|s| s.buckets.len())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn a_burst_then_twenty_a_second() {
        let l = SourceLimit::new();
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        let allowed = (0..100).filter(|_| l.allow(a, t0)).count();
        assert_eq!(allowed, BURST as usize, "the burst, then nothing at once");
        // One message's worth of refill later (50 ms), one more.
        let t1 = t0 + Duration::from_millis(50);
        assert!(l.allow(a, t1));
        assert!(!l.allow(a, t1));
        // Over the next second at 1,000 tries a second: 20 pass.
        let passed = (1..=1000)
            .filter(|ms| l.allow(a, t1 + Duration::from_millis(*ms)))
            .count();
        assert_eq!(passed, PER_SECOND as usize);
    }

    #[test]
    fn sources_are_apart_and_ipv6_counts_per_64() {
        let l = SourceLimit::new();
        let t = Instant::now();
        for _ in 0..BURST {
            assert!(l.allow(ip("192.0.2.1"), t));
        }
        assert!(!l.allow(ip("192.0.2.1"), t));
        assert!(
            l.allow(ip("192.0.2.2"), t),
            "another address is not held back"
        );
        for i in 0..BURST {
            assert!(l.allow(ip(&format!("2001:db8:1:2::{i}")), t));
        }
        assert!(
            !l.allow(ip("2001:db8:1:2:ffff::9"), t),
            "the same /64 shares one bucket"
        );
        assert!(l.allow(ip("2001:db8:1:3::1"), t));
        // IPv4 sources seen IPv4-mapped share no /64 bucket: each is its own, and the same
        // as the address seen plain.
        for _ in 0..BURST {
            assert!(l.allow(ip("::ffff:198.51.100.1"), t));
        }
        assert!(l.allow(ip("::ffff:198.51.100.2"), t), "another IPv4 source");
        assert!(
            !l.allow(ip("198.51.100.1"), t),
            "the same address either way"
        );
    }

    #[test]
    fn idle_sources_are_forgotten_and_the_table_is_bounded() {
        let l = SourceLimit::new();
        let t0 = Instant::now();
        for i in 0..MAX_SOURCES as u32 {
            assert!(l.allow(IpAddr::V4((0x0a00_0000 + i).into()), t0));
        }
        assert!(
            !l.allow(ip("192.0.2.9"), t0),
            "a full table takes no new source"
        );
        // A second on, every bucket is full again: forgotten, and newcomers pass.
        let t1 = t0 + FORGET_AFTER;
        assert!(l.allow(ip("192.0.2.9"), t1));
        assert_eq!(l.tracked(), 1);
    }
}
