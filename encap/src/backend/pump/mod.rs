//! The batched TUN <-> UDP datapath shared by the backends that move packets themselves (udp,
//! wireguard). The pump owns everything that is the same for both: the multiqueue TUN with
//! virtio-net offloads, one `SO_REUSEPORT` socket per queue with UDP GSO/GRO, a sender and a
//! receiver thread per queue, TSO segmentation, GRO coalescing, ICMP unreachable for routeless
//! packets, the "is it for our subnet" check and the counters.
//!
//! A [`Codec`] says what differs: how an inner destination maps to a peer, how a run of inner
//! packets becomes datagrams on the wire (udp: as they are; wireguard: each encrypted), and how a
//! received message turns back into inner packets (and which of them the sender may send).
//!
//! One thread pair per queue, so work spreads over the cores by flow (the kernel hashes flows
//! to TUN queues and to reuseport sockets); nothing is shared between the threads of different
//! queues but the codec's state and the counters.

mod addressing;
#[cfg(test)]
mod fake;
mod outbox;
mod ports;
mod rx;
mod sender;
#[cfg(test)]
mod tests;
mod tx;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use ipnet::Ipv4Net;

use super::BackendError;
use crate::io::{open_tun, Offload, RecvMsg, UdpSock, DEFAULT_SOCKET_BUFFER};
use crate::stats::{DropReason, Stats, Tally};
pub(crate) use addressing::Addressing;
pub(crate) use outbox::{Outbox, Transmit};
pub(crate) use ports::{TunIo, UdpIo};
pub(crate) use sender::UdpSender;

/// What the control plane and the packet threads share about the device: our lease's subnet
/// (what received packets must be for), the MTU and the counters.
pub(crate) struct DeviceState {
    /// Our lease's subnet as `addr << 8 | prefix_len` (0 = none yet): read per batch.
    own: AtomicU64,
    pub stats: Arc<Stats>,
    /// The TUN MTU: the largest inner packet we send.
    pub mtu: usize,
}

impl DeviceState {
    pub fn new(mtu: usize) -> Self {
        DeviceState {
            own: AtomicU64::new(0),
            stats: Arc::new(Stats::default()),
            mtu,
        }
    }

    pub fn own_subnet(&self) -> Option<Ipv4Net> {
        let v = self.own.load(Ordering::Relaxed);
        let len = (v & 0xff) as u8;
        (v != 0).then(|| Ipv4Net::new(Ipv4Addr::from((v >> 8) as u32), len).ok())?
    }

    pub fn set_own_subnet(&self, net: Ipv4Net) {
        let v = (u64::from(u32::from(net.network())) << 8) | u64::from(net.prefix_len());
        self.own.store(v, Ordering::Relaxed);
    }
}

/// What one encapsulation does differently from another. The pump calls it from every queue's
/// threads at once, so it must be `Sync`; per-thread buffers live in the scratch types.
///
/// A codec is sans-I/O, like boringtun's `noise`: it never holds a socket. It turns packets
/// into "send these bytes to that peer" (a returned [`Transmit`], datagrams queued in an
/// [`Outbox`]) and the pump sends them once the codec has returned, so never while a peer's
/// lock is held.
pub(crate) trait Codec: Send + Sync + 'static {
    /// Where a routed packet goes (udp: the peer's endpoint; wireguard: the peer itself).
    type Route;
    /// Per sender thread buffers, allocated once.
    type TxScratch: Send;
    /// Per receiver thread buffers, allocated once.
    type RxScratch: Send;

    /// Whether forwarding decrements the inner TTL (Flannel's udp backend acts as a router hop).
    const DECREMENT_TTL: bool;

    fn tx_scratch(&self) -> Self::TxScratch;
    fn rx_scratch(&self) -> Self::RxScratch;

    /// The peer an inner IPv4 destination belongs to; `None` makes the pump answer the pod with
    /// ICMP net unreachable.
    fn route(&self, dst: Ipv4Addr) -> Option<Self::Route>;

    /// Turns complete inner packets into datagrams: `segs` holds them back to back, each
    /// `seg_len` bytes but the last, all for `route`. Returns the run to send (`None`: nothing
    /// to send yet, e.g. queued behind a handshake); messages to send before it go to `out`.
    /// `Err` names why none will go out.
    fn transmit<'a>(
        &self,
        scratch: &'a mut Self::TxScratch,
        route: Self::Route,
        segs: &'a [u8],
        seg_len: usize,
        out: &mut Outbox,
        tally: &mut Tally,
    ) -> Result<Option<Transmit<'a>>, DropReason>;

    /// Opens one received message (one sender; several datagrams when UDP GRO merged them) and
    /// hands every inner packet its sender may send to `deliver`, counting the rest as drops.
    /// `deliver` checks the destination and queues the packet for the TUN; replies go to `out`.
    fn receive<F>(
        &self,
        scratch: &mut Self::RxScratch,
        msg: &RecvMsg<'_>,
        out: &mut Outbox,
        tally: &mut Tally,
        deliver: F,
    ) where
        F: FnMut(&[u8], &mut Tally);
}

/// The running packet threads of one device. Dropping it stops and joins them (and any thread
/// started with [`spawn`](Self::spawn)); the TUN queues and sockets close with the last of them.
pub(crate) struct Pump<U: UdpIo = UdpSock> {
    threads: Threads,
    /// Queue 0's sender, for messages sent outside the packet threads (timers).
    sender: Arc<UdpSender<U>>,
}

/// How many TUN queues (and thread pairs) to run: one per core we may use; this machine kind
/// has two.
pub(crate) const QUEUES: usize = 2;

impl Pump {
    /// Opens `device` with [`QUEUES`] queues and offloads, binds one socket per queue to `bind`
    /// and starts the threads, named `<name>-tx<i>`/`<name>-rx<i>`.
    pub fn start<C: Codec>(
        name: &str,
        device: &str,
        bind: SocketAddr,
        codec: Arc<C>,
        state: Arc<DeviceState>,
    ) -> Result<Pump, BackendError> {
        let queues = open_tun(device, QUEUES, true)
            .map_err(|e| io_error(format!("opening TUN {device}"), e))?;
        let offload: Offload = queues.first().map(|q| q.offload()).unwrap_or_default();
        let mut ports = Vec::with_capacity(queues.len());
        let mut gro = false;
        for q in queues {
            let sock = UdpSock::bind(bind, true)
                .map_err(|e| io_error(format!("binding UDP {bind}"), e))?;
            sock.grow_buffers(DEFAULT_SOCKET_BUFFER);
            gro = sock.enable_gro();
            ports.push((q, sock));
        }
        let pump = Pump::run(name, codec, state, ports)?;
        tracing::info!(
            port = bind.port(),
            queues = QUEUES,
            "{name} datapath running: tun offload {offload:?}, udp gso {}, udp gro {gro}",
            pump.sender.gso()
        );
        Ok(pump)
    }
}

impl<U: UdpIo> Pump<U> {
    /// Starts a sender and a receiver thread for each (TUN queue, socket) pair.
    pub fn run<C: Codec, T: TunIo>(
        name: &str,
        codec: Arc<C>,
        state: Arc<DeviceState>,
        ports: Vec<(T, U)>,
    ) -> Result<Pump<U>, BackendError> {
        // On an early return, the threads started so far are stopped and joined.
        let mut threads = Threads::default();
        let mut first = None;
        for (i, (tun, sock)) in ports.into_iter().enumerate() {
            let (tun, sock) = (Arc::new(tun), Arc::new(sock));
            let sender = Arc::new(UdpSender::new(sock.clone()));
            first.get_or_insert_with(|| sender.clone());
            let (tx_codec, tx_tun, tx_sender, tx_state) =
                (codec.clone(), tun.clone(), sender.clone(), state.clone());
            threads.spawn(format!("{name}-tx{i}"), move |stop| {
                tx::run(&*tx_codec, &*tx_tun, &tx_sender, &tx_state, stop)
            })?;
            let (rx_codec, rx_state) = (codec.clone(), state.clone());
            threads.spawn(format!("{name}-rx{i}"), move |stop| {
                rx::run(&*rx_codec, &*tun, &*sock, &sender, &rx_state, stop)
            })?;
        }
        let sender = first.ok_or_else(|| io_error(format!("starting {name}"), "no TUN queues"))?;
        Ok(Pump { threads, sender })
    }

    /// Queue 0's sender, for messages sent outside the packet threads.
    pub fn sender(&self) -> Arc<UdpSender<U>> {
        self.sender.clone()
    }

    /// Starts another thread that lives as long as the pump (WireGuard's timers): `job` gets
    /// the stop flag and must return soon after it is set.
    pub fn spawn<F>(&mut self, name: String, job: F) -> Result<(), BackendError>
    where
        F: FnOnce(&AtomicBool) + Send + 'static,
    {
        self.threads.spawn(name, job)
    }
}

/// Threads sharing one stop flag: dropping this sets the flag and joins them. Every blocking
/// call of theirs gives up within [`crate::io::DEFAULT_TIMEOUT`], so that is soon.
#[derive(Default)]
struct Threads {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl Threads {
    fn spawn<F>(&mut self, name: String, job: F) -> Result<(), BackendError>
    where
        F: FnOnce(&AtomicBool) + Send + 'static,
    {
        let stop = self.stop.clone();
        let handle = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || job(&stop))
            .map_err(|e| io_error(format!("starting thread {name}"), e))?;
        self.handles.push(handle);
        Ok(())
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.handles.drain(..) {
            // A thread that panicked has nothing left to clean up; its panic was printed.
            let _ = t.join();
        }
    }
}

/// A datapath I/O error: what we were doing, and why it failed.
pub(crate) fn io_error(
    what: impl Into<String>,
    source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> BackendError {
    BackendError::Io {
        what: what.into(),
        source: source.into(),
    }
}

/// The IPv4 address a message came from (IPv4-mapped IPv6 unwrapped), if any.
pub(crate) fn sender_v4(addr: SocketAddr) -> Option<Ipv4Addr> {
    match addr.ip() {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(ip) => ip.to_ipv4_mapped(),
    }
}
