//! Per-peer path health, pure: which probes are due, what an answer or a silence means, and
//! what changed. No sockets and no clocks of its own (the caller passes `now`), so every
//! verdict is unit-tested.
//!
//! Each round a peer gets two probes: a small one (is the path up?) and one of the size to
//! test (does a full pod-MTU packet get through?). A peer that has never answered is "not
//! probed": Go Flannel nodes run no responder, and silence from them is no failure; nor is a
//! "port unreachable" from a peer that answered before (its responder stopped). Once a peer
//! has answered, `DOWN_AFTER` small probes lost in a row mark it down and one answer marks it
//! up. A full-size probe lost while small ones pass is a path MTU problem; the next rounds
//! try smaller sizes down `MTU_LADDER` until one passes, which is reported.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Small probes lost in a row before an answering peer counts as down.
pub const DOWN_AFTER: u32 = 2;
/// Rounds the results of which make the loss ratio.
const WINDOW: usize = 10;
/// Sizes tried below the pod MTU when full-size probes are lost.
const MTU_LADDER: [u32; 5] = [1400, 1280, 1024, 576, 128];
/// The small probe's IP packet size.
pub const SMALL: u32 = 64;

/// The probe wire format: magic, version, kind, then the nonce; requests are padded to the
/// size under test, replies are 16 bytes.
pub const MAGIC: &[u8; 4] = b"FRSH";
const VERSION: u8 = 1;
const REQUEST: u8 = 1;
const REPLY: u8 = 2;
pub const HEADER: usize = 16;

/// A probe to send: where, its nonce, and the IP packet size it must make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub to: IpAddr,
    pub nonce: u64,
    pub ip_size: u32,
}

/// A datagram's meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message {
    Request(u64),
    Reply(u64),
}

pub fn encode_request(nonce: u64, payload_len: usize, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[VERSION, REQUEST, 0, 0]);
    out.extend_from_slice(&nonce.to_be_bytes());
    out.resize(payload_len.max(HEADER), 0);
}

pub fn encode_reply(nonce: u64) -> [u8; HEADER] {
    let mut out = [0u8; HEADER];
    out[..4].copy_from_slice(MAGIC);
    out[4] = VERSION;
    out[5] = REPLY;
    out[8..].copy_from_slice(&nonce.to_be_bytes());
    out
}

/// Parses a datagram; anything else than our two messages is `None`.
pub fn decode(d: &[u8]) -> Option<Message> {
    if d.len() < HEADER || &d[..4] != MAGIC || d[4] != VERSION {
        return None;
    }
    let nonce = u64::from_be_bytes(d[8..16].try_into().ok()?);
    match d[5] {
        REQUEST => Some(Message::Request(nonce)),
        REPLY if d.len() == HEADER => Some(Message::Reply(nonce)),
        _ => None,
    }
}

/// A peer's health as reported.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerView {
    pub key: String,
    pub state: State,
    pub rtt: Option<Duration>,
    /// Lost small probes over the last rounds, 0..=1 (`None` before any round ended).
    pub loss: Option<f64>,
    /// The largest probed IP packet size known to pass.
    pub mtu_passes: Option<u32>,
    /// The pod MTU, when full-size probes are lost.
    pub mtu_fails: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Never answered (Go Flannel peers, or none sent yet).
    NotProbed,
    Up,
    Down,
}

/// What a probe request gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// From a peer's probe address: answered.
    Answer,
    /// From an address that is no peer's: not answered.
    Refused,
    /// One of our own probes, come back to us: not answered. `first` names the peer (key and
    /// probe address) the first time this happens for it, to be logged once.
    Looped { first: Option<(String, IpAddr)> },
}

/// A verdict that changed, to log once.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    Up {
        key: String,
    },
    Down {
        key: String,
    },
    MtuProblem {
        key: String,
        fails: u32,
        passes: Option<u32>,
    },
    MtuFine {
        key: String,
    },
    /// A peer that answered before now runs no responder: not probed any more.
    NoResponder {
        key: String,
    },
}

struct Peer {
    key: String,
    to: IpAddr,
    next: Instant,
    answered: bool,
    down: bool,
    misses: u32,
    window: VecDeque<bool>,
    rtt: Option<Duration>,
    /// Index in the sizes tried (0 = the pod MTU, then MTU_LADDER) of the big probe.
    size_step: usize,
    /// Full-size rounds lost in a row while small probes passed.
    big_misses: u32,
    mtu_problem: bool,
    passes: Option<u32>,
    /// Our own probes to it came back to us: its probe address is one of ours.
    looped: bool,
}

impl Peer {
    /// A peer with no verdict yet, probed next at `next`.
    fn fresh(key: String, to: IpAddr, next: Instant) -> Self {
        Peer {
            key,
            to,
            next,
            answered: false,
            down: false,
            misses: 0,
            window: VecDeque::new(),
            rtt: None,
            size_step: 0,
            big_misses: 0,
            mtu_problem: false,
            passes: None,
            looped: false,
        }
    }
}

struct Outstanding {
    to: IpAddr,
    big: bool,
    size: u32,
    sent: Instant,
}

pub struct Prober {
    interval: Duration,
    timeout: Duration,
    pod_mtu: u32,
    peers: HashMap<IpAddr, Peer>,
    outstanding: HashMap<u64, Outstanding>,
}

impl Prober {
    pub fn new(interval: Duration, pod_mtu: u32) -> Self {
        Prober {
            interval,
            // An answer later than this is a loss: well under the interval, well over an RTT.
            timeout: (interval / 2).min(Duration::from_secs(2)),
            pod_mtu,
            peers: HashMap::new(),
            outstanding: HashMap::new(),
        }
    }

    /// The peers to probe, by probe address. New ones start at a phase spread over the
    /// interval (so 1,000 peers are not probed in one burst); gone ones are forgotten.
    pub fn set_peers(&mut self, peers: &[(String, IpAddr)], now: Instant, seed: u64) {
        self.peers
            .retain(|to, _| peers.iter().any(|(_, a)| a == to));
        for (i, (key, to)) in peers.iter().enumerate() {
            let interval = self.interval.as_millis().max(1) as u64;
            let phase = (seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) % interval;
            let peer = self.peers.entry(*to).or_insert_with(|| {
                Peer::fresh(key.clone(), *to, now + Duration::from_millis(phase))
            });
            peer.key = key.clone();
        }
    }

    /// Whether `from` is a peer's probe address (only those get answers).
    pub fn is_peer(&self, from: &IpAddr) -> bool {
        self.peers.contains_key(from)
    }

    /// What to do with a probe request: answer it only from a peer's probe address, and never
    /// when it is one of our own probes come back to us (a peer's PublicIP or overlay address
    /// that is also one of ours: answering ourselves would show a path never crossed as up).
    pub fn on_request(&mut self, from: IpAddr, nonce: u64) -> Request {
        if let Some(o) = self.outstanding.get(&nonce) {
            let Some(p) = self.peers.get_mut(&o.to) else {
                return Request::Looped { first: None };
            };
            let first = (!std::mem::replace(&mut p.looped, true)).then(|| (p.key.clone(), p.to));
            return Request::Looped { first };
        }
        if self.is_peer(&from) {
            Request::Answer
        } else {
            Request::Refused
        }
    }

    fn big_size(&self, step: usize) -> u32 {
        match step {
            0 => self.pod_mtu,
            s => MTU_LADDER
                .iter()
                .copied()
                .filter(|m| *m < self.pod_mtu)
                .nth(s - 1)
                .unwrap_or(SMALL),
        }
    }

    /// The probes due at `now`; `nonce` gives fresh unpredictable nonces.
    pub fn due(&mut self, now: Instant, mut nonce: impl FnMut() -> u64) -> Vec<Probe> {
        let mut out = Vec::new();
        let jitter_span = (self.interval.as_millis() / 10).max(1) as u64;
        let sizes: Vec<(IpAddr, u32)> = self
            .peers
            .values()
            .filter(|p| p.next <= now)
            .map(|p| (p.to, self.big_size(p.size_step)))
            .collect();
        for (to, big) in sizes {
            for (is_big, size) in [(false, SMALL), (true, big)] {
                let n = nonce();
                self.outstanding.insert(
                    n,
                    Outstanding {
                        to,
                        big: is_big,
                        size,
                        sent: now,
                    },
                );
                out.push(Probe {
                    to,
                    nonce: n,
                    ip_size: size,
                });
            }
            if let Some(p) = self.peers.get_mut(&to) {
                let jitter = Duration::from_millis(nonce() % jitter_span);
                p.next = now + self.interval - Duration::from_millis(jitter_span / 2) + jitter;
            }
        }
        out
    }

    /// An answer: counted only from the address the probe went to, with its nonce, before
    /// its timeout. `None`: refused (an unknown or expired nonce, or the wrong sender).
    pub fn on_reply(&mut self, from: IpAddr, nonce: u64, now: Instant) -> Option<Vec<Change>> {
        let o = self.take_outstanding(nonce, from)?;
        Some(self.result(o, true, now))
    }

    /// The outstanding probe with `nonce`, taken, if it went to `to` (else left in place:
    /// a datagram from elsewhere changes nothing).
    fn take_outstanding(&mut self, nonce: u64, to: IpAddr) -> Option<Outstanding> {
        if self.outstanding.get(&nonce)?.to != to {
            return None;
        }
        self.outstanding.remove(&nonce)
    }

    /// The host probed said nothing listens on the probe port (an ICMP port unreachable
    /// from the address probed, quoting the probe's nonce): the path works both ways and the
    /// peer runs no responder (Go Flannel, `--health-port=0`, a responder since stopped). Its
    /// verdict goes back to "not probed", for it is no failure of the path; `Some` when it
    /// had answered before (said once).
    pub fn on_no_responder(&mut self, to: IpAddr, nonce: u64) -> Option<Change> {
        self.take_outstanding(nonce, to)?;
        let p = self.peers.get_mut(&to)?;
        let had_answered = p.answered;
        *p = Peer {
            looped: p.looped,
            ..Peer::fresh(std::mem::take(&mut p.key), p.to, p.next)
        };
        had_answered.then(|| Change::NoResponder { key: p.key.clone() })
    }

    /// Probes unanswered past the timeout become losses.
    pub fn expire(&mut self, now: Instant) -> Vec<Change> {
        let timeout = self.timeout;
        let mut late: Vec<(bool, u64)> = self
            .outstanding
            .iter()
            .filter(|(_, o)| now.saturating_duration_since(o.sent) >= timeout)
            .map(|(n, o)| (o.big, *n))
            .collect();
        // Small probes first: a round whose small probe was lost too says nothing of the MTU.
        late.sort_unstable();
        let mut changes = Vec::new();
        for (_, n) in late {
            if let Some(o) = self.outstanding.remove(&n) {
                changes.extend(self.result(o, false, now));
            }
        }
        changes
    }

    fn result(&mut self, o: Outstanding, answered: bool, now: Instant) -> Vec<Change> {
        let pod_mtu = self.pod_mtu;
        let next_size = |step: usize| -> Option<u32> {
            MTU_LADDER
                .iter()
                .copied()
                .filter(|m| *m < pod_mtu)
                .nth(step)
        };
        let Some(p) = self.peers.get_mut(&o.to) else {
            return Vec::new();
        };
        let mut changes = Vec::new();
        if o.big {
            if answered {
                if o.size >= pod_mtu {
                    p.big_misses = 0;
                    p.passes = Some(o.size);
                    if p.mtu_problem {
                        p.mtu_problem = false;
                        changes.push(Change::MtuFine { key: p.key.clone() });
                    }
                } else if p.mtu_problem && p.passes != Some(o.size) {
                    p.passes = Some(o.size);
                    // Try the full size again from time to time: the path may be fixed.
                    p.size_step = 0;
                    changes.push(Change::MtuProblem {
                        key: p.key.clone(),
                        fails: pod_mtu,
                        passes: Some(o.size),
                    });
                } else {
                    p.size_step = 0;
                }
            } else if p.answered && !p.down && p.misses == 0 && o.size >= pod_mtu {
                p.big_misses += 1;
                if p.big_misses >= DOWN_AFTER {
                    p.size_step = 1;
                    if !p.mtu_problem {
                        p.mtu_problem = true;
                        p.passes = None;
                        changes.push(Change::MtuProblem {
                            key: p.key.clone(),
                            fails: pod_mtu,
                            passes: None,
                        });
                    }
                }
            } else if p.mtu_problem && o.size < pod_mtu {
                // A smaller size lost too: one step further down.
                p.size_step = if next_size(p.size_step).is_some() {
                    p.size_step + 1
                } else {
                    1
                };
            }
            return changes;
        }
        p.window.push_back(answered);
        if p.window.len() > WINDOW {
            p.window.pop_front();
        }
        if answered {
            p.rtt = Some(now.saturating_duration_since(o.sent));
            p.misses = 0;
            if !p.answered || p.down {
                p.answered = true;
                p.down = false;
                p.big_misses = 0;
                changes.push(Change::Up { key: p.key.clone() });
            }
        } else if p.answered {
            p.misses += 1;
            if p.misses >= DOWN_AFTER && !p.down {
                p.down = true;
                changes.push(Change::Down { key: p.key.clone() });
            }
        }
        changes
    }

    pub fn views(&self) -> Vec<PeerView> {
        let mut v: Vec<PeerView> = self
            .peers
            .values()
            .map(|p| PeerView {
                key: p.key.clone(),
                state: match (p.answered, p.down) {
                    (false, _) => State::NotProbed,
                    (true, false) => State::Up,
                    (true, true) => State::Down,
                },
                rtt: p.rtt.filter(|_| p.answered && !p.down),
                loss: (!p.window.is_empty()).then(|| {
                    p.window.iter().filter(|ok| !**ok).count() as f64 / p.window.len() as f64
                }),
                mtu_passes: p.passes,
                mtu_fails: p.mtu_problem.then_some(self.pod_mtu),
            })
            .collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "10.244.1.0";

    fn prober() -> (Prober, Instant) {
        let mut p = Prober::new(Duration::from_secs(5), 1450);
        let now = Instant::now();
        p.set_peers(&[("10.244.1.0-24".into(), A.parse().expect("ip"))], now, 0);
        (p, now)
    }

    /// One round at `now`: answers the small probe if `small`, the big one if `big`.
    fn round(p: &mut Prober, now: Instant, small: bool, big: bool, n: &mut u64) -> Vec<Change> {
        let probes = p.due(now, || {
            *n += 1;
            *n
        });
        let mut changes = Vec::new();
        for pr in &probes {
            let is_big = pr.ip_size != SMALL;
            if (is_big && big) || (!is_big && small) {
                changes.extend(
                    p.on_reply(pr.to, pr.nonce, now + Duration::from_millis(1))
                        .unwrap_or_default(),
                );
            }
        }
        changes.extend(p.expire(now + Duration::from_secs(3)));
        changes
    }

    #[test]
    fn silent_peers_stay_not_probed_never_down() {
        let (mut p, mut now) = prober();
        let mut n = 0;
        for _ in 0..5 {
            assert!(round(&mut p, now, false, false, &mut n).is_empty());
            now += Duration::from_secs(6);
        }
        assert_eq!(p.views()[0].state, State::NotProbed);
    }

    #[test]
    fn up_down_and_up_again_each_said_once() {
        let (mut p, mut now) = prober();
        let mut n = 0;
        let mut all = Vec::new();
        for (small, big) in [
            (true, true),
            (true, true),
            (false, false),
            (false, false),
            (false, false),
            (true, true),
        ] {
            all.extend(round(&mut p, now, small, big, &mut n));
            now += Duration::from_secs(6);
        }
        let key = "10.244.1.0-24".to_string();
        assert_eq!(
            all,
            vec![
                Change::Up { key: key.clone() },
                Change::Down { key: key.clone() },
                Change::Up { key }
            ]
        );
        let v = &p.views()[0];
        assert_eq!(v.state, State::Up);
        assert!(v.rtt.is_some());
        assert_eq!(v.loss, Some(0.5));
    }

    #[test]
    fn lost_full_size_probes_find_the_size_that_passes() {
        let (mut p, mut now) = prober();
        let mut n = 0;
        let mut changes = Vec::new();
        // Up with full size, then a path that passes 1280 but not 1400 or 1450.
        changes.extend(round(&mut p, now, true, true, &mut n));
        for _ in 0..8 {
            now += Duration::from_secs(6);
            let big = p.big_size(p.peers.values().next().map_or(0, |x| x.size_step));
            changes.extend(round(&mut p, now, true, big <= 1280, &mut n));
        }
        let key = "10.244.1.0-24".to_string();
        assert!(
            changes.contains(&Change::MtuProblem {
                key: key.clone(),
                fails: 1450,
                passes: None
            }),
            "{changes:?}"
        );
        assert!(
            changes.contains(&Change::MtuProblem {
                key,
                fails: 1450,
                passes: Some(1280)
            }),
            "{changes:?}"
        );
        let v = &p.views()[0];
        assert_eq!((v.mtu_fails, v.mtu_passes), (Some(1450), Some(1280)));
        assert_eq!(v.state, State::Up, "small probes pass: the path is up");
    }

    #[test]
    fn forged_replies_change_nothing() {
        let (mut p, now) = prober();
        let probes = p.due(now, || 42);
        assert!(!probes.is_empty());
        // Right nonce from the wrong address, and a wrong nonce from the right one: refused.
        assert_eq!(p.on_reply("10.244.9.0".parse().expect("ip"), 42, now), None);
        assert_eq!(p.on_reply(A.parse().expect("ip"), 43, now), None);
        assert_eq!(p.views()[0].state, State::NotProbed);
        // A reply after its probe's timeout is refused too.
        assert!(p.expire(now + Duration::from_secs(3)).is_empty());
        assert_eq!(p.on_reply(A.parse().expect("ip"), 42, now), None);
        assert!(p.is_peer(&A.parse().expect("ip")));
        assert!(!p.is_peer(&"172.30.0.254".parse().expect("ip")));
    }

    #[test]
    fn our_own_probes_come_back_unanswered_and_said_once() {
        let (mut p, now) = prober();
        let a: IpAddr = A.parse().expect("ip");
        let mut n = 0;
        let probes = p.due(now, || {
            n += 1;
            n
        });
        // The peer's address is one of ours: our probe arrives as a request, from that address.
        let first = p.on_request(a, probes[0].nonce);
        assert_eq!(
            first,
            Request::Looped {
                first: Some(("10.244.1.0-24".into(), a))
            }
        );
        assert_eq!(
            p.on_request(a, probes[1].nonce),
            Request::Looped { first: None }
        );
        // Unanswered, the peer never shows as up.
        assert!(p.expire(now + Duration::from_secs(3)).is_empty());
        assert_eq!(p.views()[0].state, State::NotProbed);
        // The peer's own probes are answered; a stranger's are not.
        assert_eq!(p.on_request(a, 9_999), Request::Answer);
        assert_eq!(
            p.on_request("172.30.0.254".parse().expect("ip"), 9_998),
            Request::Refused
        );
    }

    #[test]
    fn a_peer_whose_responder_stopped_is_not_probed_rather_than_down() {
        let (mut p, mut now) = prober();
        let a: IpAddr = A.parse().expect("ip");
        let mut n = 0;
        assert_eq!(
            round(&mut p, now, true, true, &mut n),
            vec![Change::Up {
                key: "10.244.1.0-24".into()
            }]
        );
        now += Duration::from_secs(6);
        let probes = p.due(now, || {
            n += 1;
            n
        });
        // Port unreachable quoting another nonce, or from another address: nothing.
        assert_eq!(p.on_no_responder(a, 9_999), None);
        assert_eq!(
            p.on_no_responder("10.244.9.0".parse().expect("ip"), probes[0].nonce),
            None
        );
        assert_eq!(
            p.on_no_responder(a, probes[0].nonce),
            Some(Change::NoResponder {
                key: "10.244.1.0-24".into()
            })
        );
        // Said once; the lost rounds after it never make it down.
        assert_eq!(p.on_no_responder(a, probes[1].nonce), None);
        for _ in 0..4 {
            assert!(p.expire(now + Duration::from_secs(3)).is_empty());
            now += Duration::from_secs(6);
            let _ = p.due(now, || {
                n += 1;
                n
            });
        }
        let v = &p.views()[0];
        assert_eq!((v.state, v.rtt), (State::NotProbed, None));
        // It answers again: up again.
        now += Duration::from_secs(6);
        assert_eq!(
            round(&mut p, now, true, true, &mut n),
            vec![Change::Up {
                key: "10.244.1.0-24".into()
            }]
        );
    }

    #[test]
    fn wire_format_round_trip_and_garbage() {
        let mut buf = Vec::new();
        encode_request(7, 1422, &mut buf);
        assert_eq!(buf.len(), 1422);
        assert_eq!(decode(&buf), Some(Message::Request(7)));
        assert_eq!(decode(&encode_reply(7)), Some(Message::Reply(7)));
        assert_eq!(decode(b"FRSH"), None);
        assert_eq!(decode(&[0u8; 64]), None);
        let mut long_reply = encode_reply(7).to_vec();
        long_reply.push(0);
        assert_eq!(decode(&long_reply), None);
    }

    #[test]
    fn a_thousand_peers_spread_over_the_interval() {
        let mut p = Prober::new(Duration::from_secs(5), 1450);
        let now = Instant::now();
        let peers: Vec<(String, IpAddr)> = (0..1000u32)
            .map(|i| {
                (
                    format!("p{i}"),
                    IpAddr::from([10, 244, (i >> 8) as u8, i as u8]),
                )
            })
            .collect();
        p.set_peers(&peers, now, 12345);
        let mut n = 0u64;
        let mut most = 0;
        for step in 0..50 {
            let due = p.due(now + Duration::from_millis(step * 100), || {
                n += 1;
                n
            });
            most = most.max(due.len());
        }
        // 2,000 probes per 5 s round, never more than a small share in one 100 ms tick.
        assert!(most <= 200, "burst of {most} probes in one tick");
    }
}
