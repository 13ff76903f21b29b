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
pub(crate) mod fake;
mod flush;
mod outbox;
mod poll;
mod ports;
mod rx;
mod sender;
#[cfg(test)]
mod tests;
mod tx;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use arc_swap::ArcSwap;
use ipnet::{Ipv4Net, Ipv6Net};

use super::{BackendError, Datapath};
use crate::io::{
    bind_consecutive, open_tun, steer_by_source_port, Listen, Offload, RecvMsgMut, TunQueue,
    UdpSock, DEFAULT_SOCKET_BUFFER, TUN_READ_BUF_LEN,
};
use crate::stats::{DropReason, Stats, Tally};
pub(crate) use addressing::{Addressing, Family};
pub(crate) use outbox::{Outbox, Transmit};
pub(crate) use ports::{TunIo, UdpIo};
pub(crate) use sender::UdpSender;

/// Our lease's subnets as the packet threads check them: what received packets must be for,
/// and where ICMP errors to our pods come from. A family we do not carry is `None`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct OwnSubnets {
    pub v4: Option<Ipv4Net>,
    pub v6: Option<Ipv6Net>,
}

impl OwnSubnets {
    /// Whether `addr` is one of our pods' (or our device's) addresses.
    pub fn contains(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(a) => self.v4.is_some_and(|n| n.contains(&a)),
            IpAddr::V6(a) => self.v6.is_some_and(|n| n.contains(&a)),
        }
    }

    /// Our device's address in the family of `peer` (the lease's network address), as the
    /// source of an ICMP error to it.
    pub fn address_for(&self, peer: IpAddr) -> Option<IpAddr> {
        match peer {
            IpAddr::V4(_) => self.v4.map(|n| IpAddr::V4(n.network())),
            IpAddr::V6(_) => self.v6.map(|n| IpAddr::V6(n.network())),
        }
    }
}

/// What the control plane and the packet threads share about the device: our lease's subnets
/// (what received packets must be for), the MTU and the counters.
pub(crate) struct DeviceState {
    /// Read once per batch; swapped when our lease changes.
    own: ArcSwap<OwnSubnets>,
    pub stats: Arc<Stats>,
    /// The TUN MTU: the largest inner packet we send.
    pub mtu: usize,
    /// Queue count and polling, fixed when the pump starts.
    pub datapath: Datapath,
}

impl DeviceState {
    pub fn new(mtu: usize) -> Self {
        Self::with_stats(mtu, Arc::new(Stats::default()))
    }

    /// A device whose counters add up with other devices' (wireguard's two in separate mode).
    pub fn with_stats(mtu: usize, stats: Arc<Stats>) -> Self {
        DeviceState {
            own: ArcSwap::from_pointee(OwnSubnets::default()),
            stats,
            mtu,
            datapath: Datapath::default(),
        }
    }

    /// The same device with the operator's datapath settings.
    pub fn with_datapath(mut self, datapath: Datapath) -> Self {
        self.datapath = datapath;
        self
    }

    pub fn own(&self) -> OwnSubnets {
        **self.own.load()
    }

    pub fn set_own(&self, own: OwnSubnets) {
        self.own.store(Arc::new(own));
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
    type Route: Send;
    /// Per sender thread buffers, allocated once.
    type TxScratch: Send;
    /// Per receiver thread buffers, allocated once.
    type RxScratch: Send;

    /// Whether forwarding decrements the inner TTL (Flannel's udp backend acts as a router hop).
    const DECREMENT_TTL: bool;

    /// Whether each queue sends from its own port (one of a run of consecutive ports) while the
    /// listening sockets are picked by source port, so that one peer's flows spread over the
    /// receiving threads (see `crate::io::steer_by_source_port`). Only for protocols whose
    /// peers do not answer to the port our packets come from.
    const SEND_FROM_QUEUE_PORTS: bool;

    /// Whether what `receive` delivers is already known intact, so that GRO need not verify
    /// inner TCP and UDP checksums before merging (see [`crate::wire::Gro::trusting`]).
    const DELIVERS_INTACT: bool;

    /// Bytes the codec puts before each inner packet to make its datagram (wireguard: the
    /// data message header): the pump cuts every packet that far into its slot. udp: none.
    const HEADROOM: usize = 0;

    /// The slot an inner packet of `len` bytes takes in a run: [`HEADROOM`](Self::HEADROOM),
    /// the packet, then room for what the codec appends (wireguard: padding and tag).
    fn slot_len(&self, len: usize) -> usize {
        Self::HEADROOM + len
    }

    /// A sender thread's buffer for the runs it cuts: the segments of one 64 KiB super-packet
    /// with their repeated headers (twice its size down to an MSS of about 40 bytes), or of
    /// many small packets, each in its slot. What does not fit is sent first, or dropped.
    const TX_BUF_LEN: usize = 2 * TUN_READ_BUF_LEN;

    fn tx_scratch(&self) -> Self::TxScratch;
    fn rx_scratch(&self) -> Self::RxScratch;

    /// The peer an inner destination belongs to; `None` makes the pump answer the pod with
    /// ICMP net unreachable (ICMPv6 no route).
    fn route(&self, dst: IpAddr) -> Option<Self::Route>;

    /// Whether two routes lead to the same peer, so that packets for them may share a run.
    fn same_route(&self, a: &Self::Route, b: &Self::Route) -> bool;

    /// Turns complete inner packets, all for `route`, into datagrams where they lie. Returns
    /// the run to send (`None`: nothing to send yet, e.g. queued behind a handshake); messages
    /// to send before it go to `out`. `Err` names why none will go out.
    fn transmit<'a>(
        &self,
        scratch: &'a mut Self::TxScratch,
        route: Self::Route,
        pkts: Packets<'a>,
        out: &mut Outbox,
        tally: &mut Tally,
    ) -> Result<Option<Transmit<'a>>, DropReason>;

    /// Opens one received message (one sender; several datagrams when UDP GRO merged them) and
    /// hands every inner packet its sender may send to `deliver`, counting the rest as drops.
    /// `deliver` checks the destination and queues the packet for the TUN; replies go to `out`.
    /// The message is the pump's receive buffer, lent to be opened in place.
    fn receive<F>(
        &self,
        scratch: &mut Self::RxScratch,
        msg: &mut RecvMsgMut<'_>,
        out: &mut Outbox,
        tally: &mut Tally,
        deliver: F,
    ) where
        F: FnMut(&[u8], &mut Tally);
}

/// A run of complete inner packets for one peer, in the pump's send buffer: each
/// [`Codec::HEADROOM`] bytes into its slot ([`Codec::slot_len`]), slots back to back in `buf`;
/// `count` packets, all `len` bytes long but the last, `last_len`.
pub(crate) struct Packets<'a> {
    pub buf: &'a mut [u8],
    pub count: usize,
    pub len: usize,
    pub last_len: usize,
}

impl<'a> Packets<'a> {
    /// The packets sent as they lie, one datagram each (a codec without headroom: udp).
    pub fn into_datagrams_to(self, to: SocketAddr) -> Transmit<'a> {
        Transmit {
            to,
            data: self.buf,
            seg_len: self.len,
        }
    }
}

/// The running packet threads of one device. Dropping it stops and joins them (and any thread
/// started with [`spawn`](Self::spawn)); the TUN queues and sockets close with the last of them.
pub(crate) struct Pump<U: UdpIo = UdpSock> {
    threads: Threads,
    /// Queue 0's sender, for messages sent outside the packet threads (timers).
    sender: Arc<UdpSender<U>>,
}

impl Pump {
    /// Opens `device` with as many queues as [`Datapath::queue_count`] says (one per core by
    /// default) and offloads, binds one socket per queue where `listen` says and starts the
    /// threads, named `<name>-tx<i>`/`<name>-rx<i>`.
    pub fn start<C: Codec>(
        name: &str,
        device: &str,
        listen: Listen,
        codec: Arc<C>,
        state: Arc<DeviceState>,
    ) -> Result<Pump, BackendError> {
        let datapath = state.datapath;
        let count = datapath.queue_count();
        let queues = open_tun(device, count, true)
            .map_err(|e| io_error(format!("opening TUN {device}"), e))?;
        let offload: Offload = queues.first().map(|q| q.offload()).unwrap_or_default();
        let mut ports = Vec::with_capacity(queues.len());
        let mut gro = false;
        for tun in queues {
            let sock = UdpSock::listen(listen, true)
                .map_err(|e| io_error(format!("binding UDP {listen}"), e))?;
            sock.grow_buffers(DEFAULT_SOCKET_BUFFER);
            gro = sock.enable_gro();
            ports.push(Port {
                tun,
                sock,
                send: None,
            });
        }
        let spread = C::SEND_FROM_QUEUE_PORTS && count > 1 && own_send_ports(listen, &mut ports);
        let stats = state.stats.clone();
        let pump = Pump::run(name, codec, state, ports)?;
        stats.set_offloads(
            device,
            format!(
                "tun offload {offload:?}, udp gso {}, udp gro {gro}, queues {count}, spread by source port {spread}",
                pump.sender.gso()
            ),
        );
        tracing::info!(
            %listen,
            queues = count,
            busy_poll_us = datapath.busy_poll.as_micros() as u64,
            spread_by_source_port = spread,
            "{name} datapath running: tun offload {offload:?}, udp gso {}, udp gro {gro}",
            pump.sender.gso()
        );
        Ok(pump)
    }
}

/// Gives each queue a socket of its own to send from, on consecutive ports, and makes the
/// listening group pick sockets by source port. False (and nothing changed) if either is
/// refused: then everything is sent from the listening port, as before.
fn own_send_ports(listen: Listen, ports: &mut [Port<TunQueue, UdpSock>]) -> bool {
    let ip = match listen {
        Listen::At(addr) => addr.ip(),
        Listen::DualStack(_) => return false,
    };
    let send = match bind_consecutive(ip, ports.len()) {
        Ok(send) => send,
        Err(e) => {
            tracing::warn!("no send ports of its own per queue ({e}): sending from {listen}");
            return false;
        }
    };
    if let Some(first) = ports.first() {
        if let Err(e) = steer_by_source_port(&first.sock, ports.len()) {
            tracing::warn!(
                "the kernel refused steering by source port ({e}): sending from {listen}"
            );
            return false;
        }
    }
    for (port, sock) in ports.iter_mut().zip(send) {
        sock.grow_buffers(DEFAULT_SOCKET_BUFFER);
        port.send = Some(sock);
    }
    true
}

/// One queue's I/O: its TUN queue, the socket it listens on and, if separate, the socket it
/// sends from.
pub(crate) struct Port<T, U> {
    pub tun: T,
    pub sock: U,
    pub send: Option<U>,
}

impl<T, U> From<(T, U)> for Port<T, U> {
    fn from((tun, sock): (T, U)) -> Self {
        Port {
            tun,
            sock,
            send: None,
        }
    }
}

impl<U: UdpIo> Pump<U> {
    /// Starts a sender and a receiver thread for each queue.
    pub fn run<C: Codec, T: TunIo>(
        name: &str,
        codec: Arc<C>,
        state: Arc<DeviceState>,
        ports: Vec<Port<T, U>>,
    ) -> Result<Pump<U>, BackendError> {
        // On an early return, the threads started so far are stopped and joined.
        let mut threads = Threads::default();
        let mut first = None;
        for (i, port) in ports.into_iter().enumerate() {
            let (tun, sock) = (Arc::new(port.tun), Arc::new(port.sock));
            let send = port.send.map_or_else(|| sock.clone(), Arc::new);
            let sender = Arc::new(UdpSender::new(send));
            first.get_or_insert_with(|| sender.clone());
            let turn = Arc::new(tx::TxTurn::new(&*codec));
            let (tx_codec, tx_tun, tx_sender, tx_state, tx_turn) = (
                codec.clone(),
                tun.clone(),
                sender.clone(),
                state.clone(),
                turn.clone(),
            );
            threads.spawn(format!("{name}-tx{i}"), move |stop| {
                let ctx = tx::Ctx {
                    codec: &*tx_codec,
                    tun: &*tx_tun,
                    sender: &tx_sender,
                    state: &tx_state,
                };
                tx::run(&ctx, &tx_turn, stop)
            })?;
            let (rx_codec, rx_state) = (codec.clone(), state.clone());
            threads.spawn(format!("{name}-rx{i}"), move |stop| {
                let ctx = tx::Ctx {
                    codec: &*rx_codec,
                    tun: &*tun,
                    sender: &sender,
                    state: &rx_state,
                };
                rx::run(&ctx, &*sock, &turn, stop)
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
