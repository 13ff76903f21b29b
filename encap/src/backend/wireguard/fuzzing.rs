//! Fuzz hooks (built by `cargo fuzz` with `cfg(fuzzing)`, and by the unit tests, which feed
//! them pseudo-random input so the hooks themselves stay working).
//!
//! - [`receive`]: arbitrary datagrams, from a peer's address or a stranger's, at a codec that
//!   knows one peer and holds a session with it; with the selector's bit 2 set the bytes are
//!   first sealed with the peer's session, so arbitrary *authentic* inner packets reach the
//!   checks behind decryption.
//! - [`protocol`]: the handshake functions (mac1 not in the way), a session's `open`, and the
//!   replay window against a model of what it must accept.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use boringtun::x25519::{PublicKey, StaticSecret};

use super::codec::{RxScratch, WgCodec, DATA_OVERHEAD};
use super::handshake::{self, InitSent, Local, Remote, COOKIE_REPLY_LEN, INIT_LEN, RESPONSE_LEN};
use super::keys::StaticKeys;
use super::peers::{WgPeer, WgTable};
use super::session::{Replay, Session, DATA_HEADER, REJECT_AFTER_MESSAGES};
use crate::backend::pump::{Codec, Outbox};
use crate::io::RecvMsgMut;
use crate::stats::Tally;

struct Node {
    codec: WgCodec,
    rx: RxScratch,
    out: Outbox,
    addr: SocketAddr,
}

struct State {
    ours: Node,
    theirs: Node,
    /// An initiation we "sent" to the peer, for arbitrary responses and cookie replies.
    local: Local,
    remote: Remote,
    sent: Option<InitSent>,
}

fn keys(seed: u8) -> StaticKeys {
    let secret = StaticSecret::from([seed; 32]);
    let public = PublicKey::from(&secret);
    StaticKeys { secret, public }
}

fn node(codec: WgCodec, addr: SocketAddr) -> Node {
    let rx = codec.rx_scratch();
    Node {
        codec,
        rx,
        out: Outbox::new(),
        addr,
    }
}

/// Makes `b` the one peer of `a`, allowed 10.244.<net>.0/24 and fc00:44:0:<net>::/64.
fn link(a: &Node, b: &Node, net: u8) -> Option<()> {
    let peer = Arc::new(WgPeer::new(
        &a.codec.local,
        u32::from(net),
        *PublicKey::from(&StaticSecret::from([net; 32])).as_bytes(),
        None,
        None,
        b.addr,
    ));
    let nets = vec![
        format!("10.244.{net}.0/24").parse().ok()?,
        format!("fc00:44:0:{net}::/64").parse().ok()?,
    ];
    a.codec
        .table
        .store(Arc::new(WgTable::new(vec![(peer, nets)])));
    Some(())
}

/// Delivers what `from` queued to `to` (each datagram as its own message).
fn pass(from: &mut Node, to: &mut Node) {
    let sent: Vec<(SocketAddr, Vec<u8>)> =
        from.out.iter().map(|d| (d.to, d.data.to_vec())).collect();
    from.out.clear();
    for (dst, mut d) in sent {
        if dst == to.addr {
            let mut msg = RecvMsgMut::from_parts(&mut d, from.addr, None);
            let mut tally = Tally::default();
            to.codec
                .receive(&mut to.rx, &mut msg, &mut to.out, &mut tally, |_, _| {});
        }
    }
}

fn state() -> Option<State> {
    // Two helpers open our large messages, as on a machine with 4 queues or more.
    let ours_codec = WgCodec::new(keys(1)).with_open_threads(2, "fuzz");
    let mut ours = node(ours_codec, "127.0.0.1:51820".parse().ok()?);
    let mut theirs = node(WgCodec::new(keys(2)), "127.0.0.2:51820".parse().ok()?);
    link(&ours, &theirs, 2)?;
    link(&theirs, &ours, 1)?;
    // The peer greets us; we answer; its keepalive confirms our session.
    for p in ours.codec.table.load().peers() {
        p.greet.store(false, std::sync::atomic::Ordering::Relaxed);
    }
    theirs.codec.tick(&mut theirs.out, &mut Tally::default());
    pass(&mut theirs, &mut ours);
    pass(&mut ours, &mut theirs);
    pass(&mut theirs, &mut ours);
    let local = Local::new(StaticSecret::from([3; 32]));
    let remote = Remote::new(
        &local,
        *PublicKey::from(&StaticSecret::from([4; 32])).as_bytes(),
        None,
    );
    let mut init = [0u8; INIT_LEN];
    let ephemeral = StaticSecret::from([5; 32]);
    let sent = handshake::initiate(&local, &remote, 9, ephemeral, [0; 12], None, &mut init).ok();
    Some(State {
        ours,
        theirs,
        local,
        remote,
        sent,
    })
}

thread_local! {
    static STATE: RefCell<Option<State>> = RefCell::new(state());
}

/// Feeds `data` as one message. The first byte: bit 0 picks the sender (peer or stranger),
/// bit 1 a GRO segment size from the rest of the byte, bit 2 seals `data` with the peer's
/// session first (in pieces of the GRO size, if one). Returns how many packets were
/// delivered.
pub fn receive(data: &[u8]) -> usize {
    let Some((&sel, data)) = data.split_first() else {
        return 0;
    };
    STATE.with(|st| {
        let mut st = st.borrow_mut();
        let Some(st) = st.as_mut() else { return 0 };
        let stranger = SocketAddr::from(([127, 0, 0, 3], 51820));
        let src = if sel & 1 == 0 {
            st.theirs.addr
        } else {
            stranger
        };
        let mut gro = (sel & 2 != 0).then_some(u16::from(sel >> 3).max(1) * 8);
        let mut sealed = Vec::new();
        let mut bytes = if sel & 4 != 0 {
            // Sealed: one data message, or with a GRO size one per piece of that size, back to
            // back as UDP GRO would hand them over (16 or more reach the open pool).
            let peer = st.theirs.codec.table.load().peers().first().cloned();
            let Some(s) = peer.and_then(|p| p.lock().sending(Instant::now())) else {
                return 0;
            };
            let pieces: Vec<&[u8]> = match gro {
                Some(g) if !data.is_empty() => data.chunks(usize::from(g)).collect(),
                _ => vec![data],
            };
            let Some(first) = s.reserve(pieces.len() as u64) else {
                return 0;
            };
            for (i, piece) in pieces.iter().enumerate() {
                let mut msg = vec![0u8; piece.len() + DATA_OVERHEAD];
                msg[DATA_HEADER..DATA_HEADER + piece.len()].copy_from_slice(piece);
                if !s.seal(first + i as u64, &mut msg) {
                    return 0;
                }
                sealed.extend_from_slice(&msg);
            }
            gro = gro.map(|g| g + DATA_OVERHEAD as u16);
            sealed
        } else {
            data.to_vec()
        };
        let mut msg = RecvMsgMut::from_parts(&mut bytes, src, gro);
        let mut tally = Tally::default();
        let ours = &mut st.ours;
        let mut delivered = 0;
        ours.codec.receive(
            &mut ours.rx,
            &mut msg,
            &mut ours.out,
            &mut tally,
            |pkt, _| {
                assert!(!pkt.is_empty());
                delivered += 1;
            },
        );
        // What a pump would send goes to one of the two senders, never elsewhere.
        for d in ours.out.iter() {
            assert!(
                d.to == stranger || d.to == st.theirs.addr,
                "reply to {}",
                d.to
            );
        }
        ours.out.clear();
        delivered
    })
}

/// The first byte picks what `data` is fed to: an initiation, a response to our initiation,
/// a cookie reply to it, a data message for a fresh session, or counters for the replay
/// window (checked against a model).
pub fn protocol(data: &[u8]) {
    let Some((&sel, data)) = data.split_first() else {
        return;
    };
    STATE.with(|st| {
        let st = st.borrow();
        let Some(st) = st.as_ref() else { return };
        let mut buf = [0u8; INIT_LEN];
        let n = data.len().min(INIT_LEN);
        buf[..n].copy_from_slice(&data[..n]);
        match sel % 5 {
            0 => {
                let init: &[u8; INIT_LEN] = &buf;
                if let Ok(opened) = handshake::open_init(&st.local, init) {
                    let _ = opened.finish(&st.remote);
                }
            }
            1 => {
                let mut resp = [0u8; RESPONSE_LEN];
                resp.copy_from_slice(&buf[..RESPONSE_LEN]);
                if let Some(sent) = &st.sent {
                    assert!(
                        handshake::consume_response(&st.local, &st.remote, sent, &resp).is_err(),
                        "a forged response completed a handshake"
                    );
                }
            }
            2 => {
                let mut reply = [0u8; COOKIE_REPLY_LEN];
                reply.copy_from_slice(&buf[..COOKIE_REPLY_LEN]);
                if let Some(sent) = &st.sent {
                    assert!(handshake::open_cookie(&st.remote, &sent.mac1, &reply).is_err());
                }
            }
            3 => {
                let keys = handshake::Keys {
                    send: [6; 32],
                    recv: [7; 32],
                    local_index: 1,
                    remote_index: 2,
                    initiator: true,
                };
                if let Some(s) = Session::new(&keys, Instant::now()) {
                    let mut msg = data.to_vec();
                    assert!(s.open(&mut msg).is_err(), "a forged data message opened");
                }
            }
            _ => replay_model(data),
        }
    });
}

/// Counters from `data` (8 bytes each, the top bits thinned so that most land near each
/// other) against a model: a counter is fresh if unseen, below REJECT_AFTER_MESSAGES and at
/// most the window behind the greatest accepted.
fn replay_model(data: &[u8]) {
    const WINDOW: u64 = 127 * 64;
    let mut r = Replay::default();
    let mut seen = BTreeSet::new();
    let mut greatest: Option<u64> = None;
    for chunk in data.chunks_exact(8) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        let raw = u64::from_le_bytes(b);
        // Mostly small counters (the window's scale), sometimes huge ones.
        let counter = if raw >> 63 == 1 { raw } else { raw % 40_000 };
        let fresh = counter < REJECT_AFTER_MESSAGES
            && greatest.is_none_or(|g| counter + WINDOW >= g)
            && !seen.contains(&counter);
        assert_eq!(r.accept(counter), fresh, "counter {counter}");
        if fresh {
            seen.insert(counter);
            greatest = Some(greatest.map_or(counter, |g| g.max(counter)));
        }
    }
}

#[cfg(test)]
mod tests {
    /// xorshift: the same inputs every run.
    fn inputs(n: usize) -> Vec<Vec<u8>> {
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        (0..n)
            .map(|i| {
                let len = [1, 33, 65, 93, 149, 300, 1500][i % 7];
                (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn hooks_take_random_input() {
        for data in inputs(2_000) {
            super::receive(&data);
            super::protocol(&data);
        }
    }

    #[test]
    fn sealed_inputs_reach_the_inner_checks() {
        // A well-formed packet sealed by the peer is delivered: the hook's session works.
        let mut pkt = vec![0u8; 40];
        pkt[0] = 0x45;
        pkt[3] = 40;
        pkt[12..16].copy_from_slice(&[10, 244, 2, 9]);
        let mut data = vec![4u8];
        data.extend_from_slice(&pkt);
        assert_eq!(super::receive(&data), 1);
        // From a source outside the peer's subnet it is not.
        data[13..17].copy_from_slice(&[10, 244, 3, 9]);
        assert_eq!(super::receive(&data), 0);
        // Twenty of them in 40-byte pieces: one GRO message of 20 data messages, which the
        // open pool takes.
        let mut many = vec![2 | 4 | (5 << 3)];
        for _ in 0..20 {
            many.extend_from_slice(&pkt);
        }
        assert_eq!(super::receive(&many), 20);
    }
}
