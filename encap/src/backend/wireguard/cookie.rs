//! The responder's gate for handshake messages (whitepaper §5.3 and §5.4.7), in the order
//! wireguard-go and the kernel apply it:
//! 1. mac1 must be right: the sender knows our public key.
//! 2. Past [`HANDSHAKE_RATE_LIMIT`] messages a second we are under load, and mac2 must be right
//!    too: it is keyed with a cookie we sent to the message's source address (IP and port), so
//!    it proves the sender receives there. Without it the message gets a cookie reply and is
//!    dropped unread.
//! 3. Only a message whose address is proven this way is charged to its source's share
//!    (`source_limit`). Charging unproven addresses would let anyone who knows our public key
//!    (it is in every lease) spend a real peer's share with spoofed initiations, at a rate
//!    far below the one that puts us under load, and so keep that peer from ever completing a
//!    handshake.
//!
//! Pure apart from its counters: the caller passes the time and the source.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::crypto::{hash, mac, mac_matches, xseal, LABEL_COOKIE, LABEL_MAC1};
use super::handshake::{COOKIE_REPLY, COOKIE_REPLY_LEN};
use super::source_limit::SourceLimit;

/// Handshake messages per second before mac2 is demanded (wireguard-go's and boringtun's
/// figure).
pub(super) const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// The cookie secret changes this often (whitepaper: every two minutes).
const COOKIE_SECRET_LIFE: Duration = Duration::from_secs(120);

/// What to do with a handshake message.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Work on it.
    Pass,
    /// Under load and its address is not proven: send this back and drop the message.
    CookieReply([u8; COOKIE_REPLY_LEN]),
    /// Drop it: mac1 is wrong, or its proven source has used up its share.
    Drop,
}

pub(super) struct CookieGate {
    /// HASH(LABEL_MAC1 || our public key).
    mac1_key: [u8; 32],
    /// HASH(LABEL_COOKIE || our public key): seals the cookies we send.
    cookie_key: [u8; 32],
    /// Random at start: the cookie secret of each two-minute period is derived from it, so it
    /// changes without a syscall on the receive path.
    secret: [u8; 32],
    /// Random at start: cookie-reply nonces are keyed hashes of a counter, never repeated.
    nonce_key: [u8; 32],
    nonces: AtomicU64,
    born: Instant,
    /// Handshake messages with a valid mac1 in the current second, and when it began.
    count: AtomicU64,
    window: Mutex<Instant>,
    sources: SourceLimit,
}

impl CookieGate {
    /// `secret` and `nonce_key` random (see the fields).
    pub fn new(public: &[u8; 32], secret: [u8; 32], nonce_key: [u8; 32], now: Instant) -> Self {
        CookieGate {
            mac1_key: hash(&[LABEL_MAC1, public]),
            cookie_key: hash(&[LABEL_COOKIE, public]),
            secret,
            nonce_key,
            nonces: AtomicU64::new(0),
            born: now,
            count: AtomicU64::new(0),
            window: Mutex::new(now),
            sources: SourceLimit::new(),
        }
    }

    /// Starts a new second of counting once the last one is over. Called from the timers
    /// (every 100-250 ms).
    pub fn tick(&self, now: Instant) {
        let mut start = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if now.saturating_duration_since(*start) >= Duration::from_secs(1) {
            self.count.store(0, Ordering::Relaxed);
            *start = now;
        }
    }

    /// The verdict on `msg`, a handshake initiation or response of the right length (mac1 and
    /// mac2 are its last 32 bytes, the sender's index at 4..8), from `src`.
    pub fn check(&self, msg: &[u8], src: SocketAddr, now: Instant) -> Verdict {
        let Some(body_end) = msg.len().checked_sub(32).filter(|&n| n >= 8) else {
            return Verdict::Drop;
        };
        let (body, macs) = msg.split_at(body_end);
        let (mac1, mac2) = macs.split_at(16);
        if !mac_matches(&self.mac1_key, &[body], mac1) {
            return Verdict::Drop;
        }
        let under_load = self.count.fetch_add(1, Ordering::Relaxed) >= HANDSHAKE_RATE_LIMIT;
        if !under_load {
            return Verdict::Pass;
        }
        let cookie = self.cookie(src, now);
        if !mac_matches(&cookie, &[body, mac1], mac2) {
            return self.reply(msg, mac1, &cookie);
        }
        // The address is proven: now its share applies.
        match self.sources.allow(src.ip(), now) {
            true => Verdict::Pass,
            false => Verdict::Drop,
        }
    }

    /// The cookie `src` gets in this two-minute period: MAC(secret of the period, address).
    fn cookie(&self, src: SocketAddr, now: Instant) -> [u8; 16] {
        let period =
            now.saturating_duration_since(self.born).as_secs() / COOKIE_SECRET_LIFE.as_secs();
        let key = hash(&[&self.secret, &period.to_le_bytes()]);
        let ip = match src.ip().to_canonical() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        mac(&key, &[&ip, &src.port().to_be_bytes()])
    }

    /// A cookie reply to `msg`: its sender's index, a fresh nonce, the cookie sealed with
    /// mac1 as associated data.
    fn reply(&self, msg: &[u8], mac1: &[u8], cookie: &[u8; 16]) -> Verdict {
        let mut r = [0u8; COOKIE_REPLY_LEN];
        r[0] = COOKIE_REPLY;
        r[4..8].copy_from_slice(&msg[4..8]);
        let n = self.nonces.fetch_add(1, Ordering::Relaxed);
        let nonce = hash(&[&self.nonce_key, &n.to_le_bytes()]);
        r[8..32].copy_from_slice(&nonce[..24]);
        let (head, sealed) = r.split_at_mut(32);
        sealed[..16].copy_from_slice(cookie);
        match xseal(&self.cookie_key, &head[8..32], mac1, sealed) {
            Ok(()) => Verdict::CookieReply(r),
            Err(_) => Verdict::Drop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::handshake::{self, INIT_LEN};
    use super::*;

    fn gate(now: Instant) -> CookieGate {
        CookieGate::new(&[9; 32], [1; 32], [2; 32], now)
    }

    /// A message of `len` bytes with a right mac1 for `gate`'s key, and mac2 keyed with
    /// `cookie` if given (zeros otherwise, as a sender without a cookie sends).
    fn message(sender: u32, cookie: Option<&[u8; 16]>) -> Vec<u8> {
        let mut msg = vec![0x5a; INIT_LEN];
        msg[..4].copy_from_slice(&[1, 0, 0, 0]);
        msg[4..8].copy_from_slice(&sender.to_le_bytes());
        let n = msg.len();
        let mac1 = mac(&hash(&[LABEL_MAC1, &[9; 32]]), &[&msg[..n - 32]]);
        msg[n - 32..n - 16].copy_from_slice(&mac1);
        if let Some(c) = cookie {
            let mac2 = mac(c, &[&msg[..n - 16]]);
            msg[n - 16..].copy_from_slice(&mac2);
        }
        msg
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    /// Puts `g` under load.
    fn load(g: &CookieGate, now: Instant) {
        let from = addr("198.51.100.9:4000");
        for i in 0..HANDSHAKE_RATE_LIMIT {
            assert_eq!(g.check(&message(i as u32, None), from, now), Verdict::Pass);
        }
    }

    #[test]
    fn a_wrong_mac1_is_dropped_and_not_counted() {
        let now = Instant::now();
        let g = gate(now);
        let mut bad = message(1, None);
        bad[INIT_LEN - 20] ^= 1;
        for _ in 0..2 * HANDSHAKE_RATE_LIMIT {
            assert_eq!(g.check(&bad, addr("192.0.2.1:1"), now), Verdict::Drop);
        }
        assert_eq!(
            g.check(&message(1, None), addr("192.0.2.1:1"), now),
            Verdict::Pass
        );
        assert_eq!(
            g.check(&[1, 0, 0, 0], addr("192.0.2.1:1"), now),
            Verdict::Drop
        );
    }

    #[test]
    fn under_load_the_cookie_we_sent_opens_the_gate() {
        let now = Instant::now();
        let g = gate(now);
        load(&g, now);
        let peer = addr("192.0.2.1:51820");
        let msg = message(77, None);
        let Verdict::CookieReply(reply) = g.check(&msg, peer, now) else {
            panic!("no cookie reply under load");
        };
        assert_eq!(&reply[4..8], &77u32.to_le_bytes(), "to the sender's index");
        // The initiator's side opens it with our public key and the mac1 it sent.
        let mut mac1 = [0u8; 16];
        mac1.copy_from_slice(&msg[INIT_LEN - 32..INIT_LEN - 16]);
        let local = handshake::Local::new(boringtun::x25519::StaticSecret::from([3; 32]));
        let remote = handshake::Remote::new(&local, [9; 32], None);
        let cookie = handshake::open_cookie(&remote, &mac1, &reply).expect("our cookie opens");
        assert_eq!(
            g.check(&message(77, Some(&cookie)), peer, now),
            Verdict::Pass
        );
        // From another address (or port) the same cookie proves nothing.
        let other = addr("192.0.2.1:51821");
        assert!(matches!(
            g.check(&message(77, Some(&cookie)), other, now),
            Verdict::CookieReply(_)
        ));
        // Two minutes on, the secret changed.
        let later = now + COOKIE_SECRET_LIFE;
        assert!(matches!(
            g.check(&message(77, Some(&cookie)), peer, later),
            Verdict::CookieReply(_)
        ));
        // Nonces never repeat.
        let Verdict::CookieReply(again) = g.check(&msg, peer, now) else {
            panic!("no cookie reply");
        };
        assert_ne!(reply[8..32], again[8..32]);
    }

    #[test]
    fn shares_apply_to_proven_addresses_only() {
        let now = Instant::now();
        let g = gate(now);
        // Not under load: a flood spoofing a peer's address spends nothing of the peer's.
        let peer = addr("192.0.2.1:51820");
        for i in 0..HANDSHAKE_RATE_LIMIT - 1 {
            let spoofed = addr(&format!("192.0.2.1:{}", 1000 + i));
            assert_eq!(g.check(&message(5, None), spoofed, now), Verdict::Pass);
        }
        assert_eq!(g.check(&message(6, None), peer, now), Verdict::Pass);
        // Under load, a proven address gets its share (a burst of 5), then is dropped.
        let cookie = g.cookie(peer, now);
        let passed = (0..20)
            .filter(|_| g.check(&message(6, Some(&cookie)), peer, now) == Verdict::Pass)
            .count();
        assert_eq!(passed, 5);
        // Within the second, still under load: no cookie, no pass.
        assert!(matches!(
            g.check(&message(6, None), peer, now),
            Verdict::CookieReply(_)
        ));
        // A new second: the count starts again, and messages pass without cookies.
        let next = now + Duration::from_secs(1);
        g.tick(next);
        assert_eq!(g.check(&message(6, None), peer, next), Verdict::Pass);
    }
}
