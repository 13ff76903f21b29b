//! What one peer's crypto costs per segment, for `examples/wg_cost.rs` (feature `testutil`):
//! our sealing and opening on one session from 1..n threads at once, against boringtun's
//! `Tunn`, which seals a peer's packets one at a time under `&mut self`.

use std::sync::Arc;
use std::time::Instant;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use super::handshake::Keys;
use super::session::{Session, DATA_HEADER, TAG_LEN};

fn pair() -> Option<(Arc<Session>, Arc<Session>)> {
    let now = Instant::now();
    let keys = |send: u8, recv: u8, initiator| Keys {
        send: [send; 32],
        recv: [recv; 32],
        local_index: u32::from(send),
        remote_index: u32::from(recv),
        initiator,
    };
    Some((
        Arc::new(Session::new(&keys(1, 2, true), now)?),
        Arc::new(Session::new(&keys(2, 1, false), now)?),
    ))
}

/// Wall-clock nanoseconds per segment of `seg_len` bytes when `threads` threads seal `segs`
/// segments each with one session at once (counters reserved per run of 44, as the pump does).
pub fn seal_ns(threads: usize, segs: usize, seg_len: usize) -> Option<f64> {
    let (s, _) = pair()?;
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let s = &s;
            scope.spawn(move || {
                let mut buf = vec![7u8; 44 * (seg_len + DATA_HEADER + TAG_LEN)];
                let stride = seg_len + DATA_HEADER + TAG_LEN;
                for _ in 0..segs / 44 {
                    let Some(first) = s.reserve(44) else { return };
                    for (i, msg) in buf.chunks_mut(stride).enumerate() {
                        let _ = s.seal(first + i as u64, msg);
                    }
                }
            });
        }
    });
    Some(start.elapsed().as_nanos() as f64 / (threads * (segs / 44) * 44) as f64)
}

/// The same for opening (authentication and decryption, replay window included), each thread
/// opening its own share of messages sealed beforehand.
pub fn open_ns(threads: usize, segs: usize, seg_len: usize) -> Option<f64> {
    let (tx, rx) = pair()?;
    let stride = seg_len + DATA_HEADER + TAG_LEN;
    let sealed: Vec<Vec<u8>> = (0..threads)
        .map(|_| {
            let mut buf = vec![7u8; segs * stride];
            for msg in buf.chunks_mut(stride) {
                if let Some(c) = tx.reserve(1) {
                    let _ = tx.seal(c, msg);
                }
            }
            buf
        })
        .collect();
    let start = Instant::now();
    std::thread::scope(|scope| {
        for mut buf in sealed {
            let rx = &rx;
            scope.spawn(move || {
                for msg in buf.chunks_mut(stride) {
                    let _ = rx.open(msg);
                }
            });
        }
    });
    Some(start.elapsed().as_nanos() as f64 / (threads * segs) as f64)
}

/// Nanoseconds per segment boringtun's `Tunn::encapsulate` takes, one thread (it cannot be
/// shared: `&mut self`).
pub fn boringtun_seal_ns(segs: usize, seg_len: usize) -> Option<f64> {
    let (a, b) = (StaticSecret::from([1; 32]), StaticSecret::from([2; 32]));
    let mut ta = Tunn::new(a.clone(), PublicKey::from(&b), None, None, 1 << 8, None);
    let mut tb = Tunn::new(b, PublicKey::from(&a), None, None, 2 << 8, None);
    let mut buf = vec![0u8; 2048];
    let mut buf2 = vec![0u8; 2048];
    let init = match ta.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(m) => m.to_vec(),
        _ => return None,
    };
    let resp = match tb.decapsulate(None, &init, &mut buf2) {
        TunnResult::WriteToNetwork(m) => m.to_vec(),
        _ => return None,
    };
    let _ = ta.decapsulate(None, &resp, &mut buf);
    let mut pkt = vec![0u8; seg_len];
    pkt[0] = 0x45;
    let start = Instant::now();
    for _ in 0..segs {
        if !matches!(
            ta.encapsulate(&pkt, &mut buf),
            TunnResult::WriteToNetwork(_)
        ) {
            return None;
        }
    }
    Some(start.elapsed().as_nanos() as f64 / segs as f64)
}
