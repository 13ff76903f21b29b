//! One WireGuard session's transport (whitepaper §5.4.6): the keys one handshake derived, a
//! send counter any thread reserves from (so sealing runs on every core at once, each thread
//! sealing its own run in counter order), and the receive side's replay window. Sealing and
//! opening work in place in the caller's buffer: no copy, no allocation.

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crossbeam_utils::CachePadded;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};

use super::handshake::Keys;

pub(super) const DATA: u8 = 4;
/// Type, receiver index, counter.
pub(super) const DATA_HEADER: usize = 16;
pub(super) use super::crypto::TAG_LEN;
/// After this many messages a session must not send (2^64 - 2^13 - 1).
pub(super) const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);
/// After this many the initiator starts a new handshake.
pub(super) const REKEY_AFTER_MESSAGES: u64 = 1 << 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OpenError {
    /// Too short, or the tag did not match.
    NotAuthentic,
    /// Authentic, but its counter was seen already or is behind the window.
    Replayed,
}

pub(super) struct Session {
    pub local_index: u32,
    pub remote_index: u32,
    pub initiator: bool,
    pub born: Instant,
    sealer: WipedKey,
    opener: WipedKey,
    /// Written by every sender thread, and the window by the receiver: each on cache lines of
    /// its own, so that neither slows reads of the keys and indexes (the padding's alignment
    /// also keeps the `Arc`'s reference counts off them).
    next_counter: CachePadded<AtomicU64>,
    replay: CachePadded<Mutex<Replay>>,
}

impl Session {
    pub fn new(keys: &Keys, born: Instant) -> Option<Self> {
        Some(Session {
            local_index: keys.local_index,
            remote_index: keys.remote_index,
            initiator: keys.initiator,
            born,
            sealer: WipedKey::new(&keys.send)?,
            opener: WipedKey::new(&keys.recv)?,
            next_counter: CachePadded::new(AtomicU64::new(0)),
            replay: CachePadded::new(Mutex::new(Replay::default())),
        })
    }

    /// Reserves `n` consecutive counters, the first returned; `None` once the session may not
    /// send that many more.
    pub fn reserve(&self, n: u64) -> Option<u64> {
        // Never past the limit, so the counter cannot wrap and a nonce come round again.
        self.next_counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                c.checked_add(n).filter(|&e| e <= REJECT_AFTER_MESSAGES)
            })
            .ok()
    }

    /// How many counters were reserved so far.
    pub fn sent(&self) -> u64 {
        self.next_counter.load(Ordering::Relaxed)
    }

    /// Seals the data message in `msg`: header (written here), payload, room for the tag.
    /// `false`: not sealed (no room for header and tag), and not to be sent.
    #[must_use]
    pub fn seal(&self, counter: u64, msg: &mut [u8]) -> bool {
        let Some(end) = msg.len().checked_sub(TAG_LEN).filter(|&e| e >= DATA_HEADER) else {
            return false;
        };
        msg[..4].copy_from_slice(&[DATA, 0, 0, 0]);
        msg[4..8].copy_from_slice(&self.remote_index.to_le_bytes());
        msg[8..16].copy_from_slice(&counter.to_le_bytes());
        let (body, tag_out) = msg.split_at_mut(end);
        match self.sealer.get().seal_in_place_separate_tag(
            nonce(counter),
            Aad::empty(),
            &mut body[DATA_HEADER..],
        ) {
            Ok(tag) => {
                tag_out.copy_from_slice(tag.as_ref());
                true
            }
            Err(_) => false,
        }
    }

    /// Opens a data message in place; on success the plaintext is `msg[16..16 + len]`.
    pub fn open(&self, msg: &mut [u8]) -> Result<usize, OpenError> {
        let (counter, len) = self.open_unchecked(msg)?;
        if self.accept(counter) {
            Ok(len)
        } else {
            Err(OpenError::Replayed)
        }
    }

    /// Authenticates and decrypts a data message in place, leaving the replay window alone:
    /// returns its counter and the plaintext's length. The plaintext may be used only once
    /// [`accept`](Self::accept) took the counter (threads opening at once do that after).
    pub fn open_unchecked(&self, msg: &mut [u8]) -> Result<(u64, usize), OpenError> {
        if msg.len() < DATA_HEADER + TAG_LEN {
            return Err(OpenError::NotAuthentic);
        }
        let mut c = [0u8; 8];
        c.copy_from_slice(&msg[8..16]);
        let counter = u64::from_le_bytes(c);
        let len = self
            .opener
            .get()
            .open_in_place(nonce(counter), Aad::empty(), &mut msg[DATA_HEADER..])
            .map_err(|_| OpenError::NotAuthentic)?
            .len();
        Ok((counter, len))
    }

    /// Whether an authentic counter is fresh (and from now on seen). Only authentic counters
    /// may move the window.
    pub fn accept(&self, counter: u64) -> bool {
        self.replay
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .accept(counter)
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

/// A ring key whose memory is zeroed when dropped (ring keeps the key schedule inline and does
/// not wipe it).
struct WipedKey(MaybeUninit<LessSafeKey>);

impl WipedKey {
    fn new(key: &[u8; 32]) -> Option<Self> {
        let k = UnboundKey::new(&CHACHA20_POLY1305, key).ok()?;
        Some(WipedKey(MaybeUninit::new(LessSafeKey::new(k))))
    }

    fn get(&self) -> &LessSafeKey {
        // SAFETY: initialised in `new` and only de-initialised in `drop`.
        unsafe { self.0.assume_init_ref() }
    }
}

impl Drop for WipedKey {
    fn drop(&mut self) {
        // SAFETY: the key is initialised (see `get`) and dropped exactly once here; its bytes
        // are then plain memory we own, overwritten through a pointer to `MaybeUninit`s, so no
        // invalid `LessSafeKey` is ever read.
        unsafe {
            self.0.assume_init_drop();
            let bytes = self.0.as_mut_ptr().cast::<MaybeUninit<u8>>();
            for i in 0..size_of::<LessSafeKey>() {
                std::ptr::write_volatile(bytes.add(i), MaybeUninit::new(0));
            }
        }
    }
}

/// Bits of the replay window (the Linux implementation's 8,192, one word kept free).
const WORDS: usize = 128;
const WINDOW: u64 = (WORDS as u64 - 1) * 64;

/// WireGuard's sliding window of received counters (RFC 6479's scheme, as Linux does it):
/// a counter is accepted once, and only if it is at most `WINDOW` behind the greatest seen.
pub(super) struct Replay {
    /// The greatest counter seen plus one (0: none yet).
    top: u64,
    bits: [u64; WORDS],
}

impl Default for Replay {
    fn default() -> Self {
        Replay {
            top: 0,
            bits: [0; WORDS],
        }
    }
}

impl Replay {
    pub fn accept(&mut self, counter: u64) -> bool {
        if counter >= REJECT_AFTER_MESSAGES {
            return false;
        }
        let c = counter + 1;
        if c + WINDOW < self.top {
            return false;
        }
        let word = c >> 6;
        if c > self.top {
            let current = self.top >> 6;
            let clear = (word - current).min(WORDS as u64);
            for i in 1..=clear {
                self.bits[((current + i) % WORDS as u64) as usize] = 0;
            }
            self.top = c;
        }
        let slot = &mut self.bits[(word % WORDS as u64) as usize];
        let bit = 1u64 << (c & 63);
        let fresh = *slot & bit == 0;
        *slot |= bit;
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Session, Session) {
        let now = Instant::now();
        let a = Keys {
            send: [1; 32],
            recv: [2; 32],
            local_index: 10,
            remote_index: 20,
            initiator: true,
        };
        let b = Keys {
            send: [2; 32],
            recv: [1; 32],
            local_index: 20,
            remote_index: 10,
            initiator: false,
        };
        (
            Session::new(&a, now).expect("key"),
            Session::new(&b, now).expect("key"),
        )
    }

    #[test]
    fn sealed_in_place_opens_once() {
        let (a, b) = pair();
        let mut msg = vec![0u8; DATA_HEADER + 5 + TAG_LEN];
        msg[DATA_HEADER..DATA_HEADER + 5].copy_from_slice(b"hello");
        let c = a.reserve(1).expect("counter");
        assert!(a.seal(c, &mut msg));
        let mut short = [0u8; DATA_HEADER + TAG_LEN - 1];
        assert!(
            !a.seal(c, &mut short),
            "no room for header and tag: not sealed"
        );
        assert_eq!(msg[0], DATA);
        assert_eq!(
            &msg[4..8],
            &20u32.to_le_bytes(),
            "names the receiver's index"
        );
        let mut copy = msg.clone();
        assert_eq!(b.open(&mut copy), Ok(5));
        assert_eq!(&copy[DATA_HEADER..DATA_HEADER + 5], b"hello");
        let mut again = msg.clone();
        assert_eq!(b.open(&mut again), Err(OpenError::Replayed));
        let mut forged = msg.clone();
        forged[DATA_HEADER] ^= 1;
        assert_eq!(b.open(&mut forged), Err(OpenError::NotAuthentic));
        let mut wrong_way = msg;
        assert_eq!(a.open(&mut wrong_way), Err(OpenError::NotAuthentic));
        assert_eq!(b.open(&mut [0u8; 31]), Err(OpenError::NotAuthentic));
    }

    #[test]
    fn counters_are_reserved_in_runs() {
        let (a, _) = pair();
        assert_eq!(a.reserve(3), Some(0));
        assert_eq!(a.reserve(2), Some(3));
        assert_eq!(a.sent(), 5);
        a.next_counter
            .store(REJECT_AFTER_MESSAGES - 1, Ordering::Relaxed);
        assert_eq!(a.reserve(1), Some(REJECT_AFTER_MESSAGES - 1));
        assert_eq!(a.reserve(1), None, "the session is spent");
    }

    #[test]
    fn replay_window() {
        let mut r = Replay::default();
        assert!(r.accept(0));
        assert!(!r.accept(0));
        assert!(r.accept(5));
        assert!(r.accept(3), "late but inside the window");
        assert!(!r.accept(3));
        assert!(r.accept(20_000));
        assert!(
            r.accept(20_000 - WINDOW + 1),
            "the oldest counter the window holds"
        );
        assert!(!r.accept(20_000 - WINDOW - 1), "behind the window");
        assert!(!r.accept(5), "forgotten is not fresh");
        // A jump clears the words it passes, so old bits do not read as seen.
        assert!(r.accept(20_000 + 64 * 200));
        assert!(r.accept(20_000 + 64 * 200 - 64));
        assert!(!r.accept(REJECT_AFTER_MESSAGES));
        assert!(!r.accept(u64::MAX));
    }
}
