//! Per-peer path health: every daemon probes every peer over the path its pods' packets take
//! (through the encapsulation to the peer's overlay address for udp, vxlan and wireguard; over
//! the underlay to its PublicIP for host-gw) and answers the probes of its peers. The verdicts
//! (`core`) reach the log (once per change), `flanneld_peer_*` metrics and `flanneld-rs status`.
//!
//! Trust: a request is answered only when it comes from a peer's probe address and is not one
//! of our own probes come back (a peer address that is also ours), and an answer counts only
//! from the address the probe went to, echoing its random nonce, before its timeout: nobody
//! off the path can fake health, and a stranger's datagrams change nothing (they are counted).

pub mod core;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::status::Status;
use core::{Change, Message, Prober};

/// IPv4 and UDP headers: a probe of IP size S carries S - 28 bytes.
const IP_UDP_HEADERS: u32 = 28;
const TICK: Duration = Duration::from_millis(100);

/// What the prober needs to start.
pub struct HealthConfig {
    /// The address probes leave from and answers are awaited on: the node's PublicIP where
    /// that is the probe address peers know (host-gw), so that a node with several addresses
    /// neither probes nor answers from another one (the peer would refuse it). Unspecified:
    /// any (the overlay address for the encapsulating backends, which the route picks).
    pub bind: Ipv4Addr,
    pub port: u16,
    pub interval: Duration,
    /// The pod MTU: the size full probes test.
    pub pod_mtu: u32,
}

/// The running prober; dropping it stops it.
pub struct Health {
    peers: watch::Sender<Vec<(String, IpAddr)>>,
    task: JoinHandle<()>,
}

impl Drop for Health {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Health {
    /// Binds the probe port and starts probing and answering.
    pub fn spawn(cfg: HealthConfig, status: Arc<Status>) -> Result<Self> {
        let std_sock = bind(cfg.bind, cfg.port)?;
        dont_fragment(&std_sock)?;
        // ICMP errors for our probes queue on the socket: a peer's "port unreachable" tells
        // a stopped responder from a broken path.
        nix::sys::socket::setsockopt(&std_sock, nix::sys::socket::sockopt::Ipv4RecvErr, &true)
            .context("setting IP_RECVERR on the probe socket")?;
        std_sock.set_nonblocking(true)?;
        let sock = UdpSocket::from_std(std_sock)?;
        let (peers, rx) = watch::channel(Vec::new());
        let task = tokio::spawn(run(sock, cfg, rx, status));
        Ok(Health { peers, task })
    }

    /// The peers to probe now: (lease key, probe address).
    pub fn set_peers(&self, peers: Vec<(String, IpAddr)>) {
        let _ = self.peers.send(peers);
    }
}

/// The probe socket on `addr`, or on every address when `addr` is not one of this host's (a
/// PublicIP that is a NAT's): then the route picks the source, as before.
fn bind(addr: Ipv4Addr, port: u16) -> Result<std::net::UdpSocket> {
    let context = || format!("binding the health probe port {port}");
    match std::net::UdpSocket::bind((addr, port)) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
            tracing::info!(address = %addr, "health probes: not one of this host's addresses, probing from any");
            std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).with_context(context)
        }
        other => other.with_context(context),
    }
}

/// Most queued ICMP errors read in one go, before the loop serves its other work.
const ERRORS_PER_WAKE: usize = 256;

/// One queued ICMP error (`MSG_ERRQUEUE`): `Some((address probed, nonce quoted))` for a port
/// unreachable sent by the very address our probe went to; `None` for any other error (a
/// network unreachable, a fragmentation needed: losses to the prober, as they were). `Err`
/// (always `WouldBlock`, so that the socket's error readiness is cleared) when the queue is
/// empty or cannot be read.
fn read_error(sock: &UdpSocket, buf: &mut [u8]) -> std::io::Result<Option<(IpAddr, u64)>> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrIn};
    let mut cmsg = nix::cmsg_space!(libc::sock_extended_err, libc::sockaddr_in);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let Ok(msg) = recvmsg::<SockaddrIn>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT,
    ) else {
        return Err(std::io::ErrorKind::WouldBlock.into());
    };
    let to = msg.address.map(|a| IpAddr::V4(a.ip()));
    let len = msg.bytes;
    let sender = msg.cmsgs().ok().and_then(|mut c| {
        c.find_map(|m| match m {
            ControlMessageOwned::Ipv4RecvErr(e, from)
                if e.ee_origin == libc::SO_EE_ORIGIN_ICMP && e.ee_type == 3 && e.ee_code == 3 =>
            {
                from.map(|f| IpAddr::V4(std::net::Ipv4Addr::from(u32::from_be(f.sin_addr.s_addr))))
            }
            _ => None,
        })
    });
    let quoted = iov[0].get(..len).and_then(core::decode);
    Ok(match (to, sender, quoted) {
        (Some(to), Some(from), Some(Message::Request(nonce))) if from == to => Some((to, nonce)),
        _ => None,
    })
}

/// Sends without waiting for room, trying twice: an ICMP error that arrived just before is
/// reported once, by whichever call on the socket comes next (IP_RECVERR), and must not
/// cost a probe or an answer.
fn send_now(sock: &UdpSocket, data: &[u8], to: SocketAddr) -> std::io::Result<usize> {
    match sock.try_send_to(data, to) {
        Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => sock.try_send_to(data, to),
        done => done,
    }
}

/// DF on every probe, and no local fragmentation or path-MTU cache: a full-size probe must
/// cross the path whole or be lost, which is what pods' packets do.
fn dont_fragment(sock: &std::net::UdpSocket) -> Result<()> {
    let value: libc::c_int = libc::IP_PMTUDISC_PROBE;
    // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("setting IP_MTU_DISCOVER on the probe socket");
    }
    Ok(())
}

async fn run(
    sock: UdpSocket,
    cfg: HealthConfig,
    mut peers: watch::Receiver<Vec<(String, IpAddr)>>,
    status: Arc<Status>,
) {
    let mut prober = Prober::new(cfg.interval, cfg.pod_mtu);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = vec![0u8; 65_536];
    let mut out = Vec::with_capacity(cfg.pod_mtu as usize);
    let seed = rand::random::<u64>();
    loop {
        tokio::select! {
            changed = peers.changed() => {
                if changed.is_err() {
                    return;
                }
                let list = peers.borrow_and_update().clone();
                prober.set_peers(&list, Instant::now(), seed);
                status.set_probes(prober.views());
            }
            got = sock.recv_from(&mut buf) => {
                let Ok((len, from)) = got else { continue };
                let Some(msg) = buf.get(..len).and_then(core::decode) else {
                    status.health.malformed.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let h = &status.health;
                let counter = match msg {
                    Message::Request(nonce) => match prober.on_request(from.ip(), nonce) {
                        core::Request::Answer => {
                            match send_now(&sock, &core::encode_reply(nonce), from) {
                                Ok(_) => &h.answered,
                                Err(_) => &h.answer_failed,
                            }
                        }
                        core::Request::Refused => &h.refused,
                        core::Request::Looped { first } => {
                            if let Some((key, to)) = first {
                                tracing::warn!(peer = %key, address = %to, "probes to this peer reach this node itself (its address is one of ours: a wrong --public-ip or --iface on one side?); its path is not tested");
                            }
                            &h.looped
                        }
                    },
                    Message::Reply(nonce) => match prober.on_reply(from.ip(), nonce, Instant::now()) {
                        Some(changes) => {
                            report(&changes);
                            continue;
                        }
                        None => &h.reply_refused,
                    },
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            ready = sock.ready(Interest::ERROR) => {
                // ICMP errors for our probes, read as they come: the queue shares the
                // socket's receive buffer with probes and answers.
                if ready.is_err() {
                    return; // the runtime is going away
                }
                for _ in 0..ERRORS_PER_WAKE {
                    match sock.try_io(Interest::ERROR, || read_error(&sock, &mut buf)) {
                        Ok(Some((to, nonce))) => {
                            status.health.no_responder.fetch_add(1, Ordering::Relaxed);
                            report(prober.on_no_responder(to, nonce).as_slice());
                        }
                        Ok(None) => {}
                        Err(_) => break,
                    }
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let changes = prober.expire(now);
                report(&changes);
                for probe in prober.due(now, rand::random::<u64>) {
                    let len = probe.ip_size.saturating_sub(IP_UDP_HEADERS) as usize;
                    core::encode_request(probe.nonce, len, &mut out);
                    let to = SocketAddr::new(probe.to, cfg.port);
                    // Never wait for room: probes queued behind an unresolved neighbour
                    // would hold up everyone else's; one not sent is a loss like any other.
                    let counter = match send_now(&sock, &out, to) {
                        Ok(_) => &status.health.sent,
                        Err(_) => &status.health.send_failed,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                status.set_probes(prober.views());
            }
        }
    }
}

/// One log line per verdict that changed, never per probe.
fn report(changes: &[Change]) {
    for c in changes {
        match c {
            Change::Up { key } => tracing::info!(peer = %key, "peer path up: probes answered"),
            Change::Down { key } => tracing::warn!(
                peer = %key,
                "peer path DOWN: {} probes in a row unanswered (a firewall dropping the encapsulation, the peer gone?)",
                core::DOWN_AFTER
            ),
            Change::MtuProblem { key, fails, passes } => tracing::warn!(
                peer = %key,
                "peer path MTU problem: {fails}-byte packets are lost, {} get through (pings work, transfers hang)",
                passes.map_or("smaller ones being tried".to_string(), |p| format!("{p}-byte ones"))
            ),
            Change::MtuFine { key } => {
                tracing::info!(peer = %key, "peer path carries full-size packets again")
            }
            Change::NoResponder { key } => tracing::info!(
                peer = %key,
                "peer runs no probe responder any more (its host says nothing listens on the probe port: Go Flannel, or --health-port=0): not probed"
            ),
        }
    }
}
