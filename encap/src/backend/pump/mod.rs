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

mod rx;
mod tx;

use std::io::IoSlice;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use ipnet::Ipv4Net;

use super::BackendError;
use crate::io::{open_tun, Offload, RecvMsg, UdpSock, DEFAULT_SOCKET_BUFFER, GSO_MAX_SEGMENTS};
use crate::stats::{DropReason, Stats, Tally};

/// The most UDP payload one GSO send may carry (64 KiB less IP and UDP headers, rounded down).
const GSO_MAX_BYTES: usize = 65_000;

/// State shared by the control plane and the packet threads.
pub(crate) struct Shared {
    /// Our lease's subnet as `addr << 8 | prefix_len` (0 = none yet): read per batch.
    own: AtomicU64,
    pub stats: Arc<Stats>,
    pub stop: AtomicBool,
    /// The TUN MTU: the largest inner packet we send.
    pub mtu: usize,
}

impl Shared {
    pub fn new(mtu: usize) -> Self {
        Shared {
            own: AtomicU64::new(0),
            stats: Arc::new(Stats::default()),
            stop: AtomicBool::new(false),
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

    /// Points the pump at our lease: the TUN `device` gets the lease's network address with
    /// the whole Network's prefix (so the kernel routes every other node's pods into it), the
    /// pump's MTU, and is brought up; received packets must then be for `subnet`.
    pub async fn adopt_lease(
        &self,
        netlink: &crate::netlink::Netlink,
        device: &str,
        subnet: Ipv4Net,
        network: Ipv4Net,
    ) -> Result<(), BackendError> {
        self.set_own_subnet(subnet);
        let link = netlink.link_by_name(device).await?;
        let addr = Ipv4Net::new(subnet.network(), network.prefix_len())
            .map_err(|e| BackendError::Config(format!("address for {device}: {e}")))?;
        netlink
            .set_sole_address(link.index, ipnet::IpNet::V4(addr))
            .await?;
        netlink.set_mtu_up(link.index, self.mtu as u32).await?;
        Ok(())
    }

    /// Gives `device` its lease address again if someone removed it (or took the device
    /// down); `Ok(true)` when it had to.
    pub async fn restore_address(
        &self,
        netlink: &crate::netlink::Netlink,
        device: &str,
        subnet: Ipv4Net,
        network: Ipv4Net,
    ) -> Result<bool, BackendError> {
        let link = netlink.link_by_name(device).await?;
        let want = std::net::IpAddr::V4(subnet.network());
        let present = netlink
            .addresses()
            .await?
            .iter()
            .any(|(i, a)| *i == link.index && a.addr() == want);
        if present {
            return Ok(false);
        }
        tracing::warn!(%device, "our device lost its address: restoring it");
        self.adopt_lease(netlink, device, subnet, network).await?;
        Ok(true)
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// One queue's UDP socket as a codec sends on it: many same-size datagrams per syscall with
/// UDP GSO where the kernel has it, `sendmmsg` otherwise.
pub(crate) struct Wire {
    sock: UdpSock,
    gso: bool,
}

impl Wire {
    /// Wraps a bound socket, using UDP GSO if the kernel has it.
    pub fn new(sock: UdpSock) -> Self {
        let gso = sock.gso_supported();
        Wire { sock, gso }
    }

    /// Sends back-to-back datagrams of `seg_len` bytes (the last may be shorter) to one peer.
    /// False if the kernel refused (counted by the caller).
    pub fn send(&self, to: SocketAddr, data: &[u8], seg_len: usize, tally: &mut Tally) -> bool {
        let seg_len = seg_len.max(1);
        if self.gso {
            let per_send = (GSO_MAX_BYTES / seg_len).clamp(1, GSO_MAX_SEGMENTS) * seg_len;
            for chunk in data.chunks(per_send) {
                tally.syscalls += 1;
                if self.sock.send_gso(to, chunk, seg_len as u16).is_err() {
                    return false;
                }
            }
            return true;
        }
        // No UDP GSO: one sendmmsg per up to 64 segments.
        let mut msgs: [(SocketAddr, &[u8]); GSO_MAX_SEGMENTS] = [(to, &[]); GSO_MAX_SEGMENTS];
        for group in data.chunks(seg_len * GSO_MAX_SEGMENTS) {
            let mut n = 0;
            for (slot, seg) in msgs.iter_mut().zip(group.chunks(seg_len)) {
                *slot = (to, seg);
                n += 1;
            }
            let mut sent = 0;
            while sent < n {
                tally.syscalls += 1;
                match self.sock.send_batch(&msgs[sent..n]) {
                    Ok(0) | Err(_) => return false,
                    Ok(k) => sent += k,
                }
            }
        }
        true
    }

    /// The socket, for tests that receive by hand.
    #[cfg(test)]
    pub fn sock(&self) -> &UdpSock {
        &self.sock
    }

    /// Sends one datagram (control messages: handshakes, cookies, keepalives).
    pub fn send_one(&self, to: SocketAddr, data: &[u8]) -> bool {
        self.sock
            .send_gso_vectored(to, &[IoSlice::new(data)], 0)
            .is_ok()
    }
}

/// What one encapsulation does differently from another. The pump calls it from every queue's
/// threads at once, so it must be `Sync`; per-thread buffers live in the scratch types.
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

    /// Puts complete inner packets on the wire: `segs` holds them back to back, each `seg_len`
    /// bytes but the last, all for `route`. `Err` names why none went out.
    fn transmit(
        &self,
        scratch: &mut Self::TxScratch,
        route: Self::Route,
        segs: &[u8],
        seg_len: usize,
        wire: &Wire,
        tally: &mut Tally,
    ) -> Result<(), DropReason>;

    /// Opens one received message (one sender; several datagrams when UDP GRO merged them) and
    /// hands every inner packet its sender may send to `deliver`, counting the rest as drops.
    /// `deliver` checks the destination and queues the packet for the TUN.
    fn receive<F>(
        &self,
        scratch: &mut Self::RxScratch,
        msg: &RecvMsg<'_>,
        wire: &Wire,
        tally: &mut Tally,
        deliver: F,
    ) where
        F: FnMut(&[u8], &mut Tally);
}

/// The running packet threads of one device.
pub(crate) struct Pump {
    /// Kept for their names in a debugger; the threads end by themselves once `stop` is set.
    _threads: Vec<JoinHandle<()>>,
    /// Queue 0's socket, for control messages sent outside the packet threads (timers).
    pub wire: Arc<Wire>,
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
        shared: Arc<Shared>,
    ) -> Result<Pump, BackendError> {
        let io_err =
            |what: &str, e: &dyn std::fmt::Display| BackendError::Config(format!("{what}: {e}"));
        let queues = open_tun(device, QUEUES, true)
            .map_err(|e| io_err(&format!("opening TUN {device}"), &e))?;
        let offload: Offload = queues.first().map(|q| q.offload()).unwrap_or_default();
        let mut threads = Vec::new();
        let mut first_wire = None;
        let mut mode = String::new();
        for (i, q) in queues.into_iter().enumerate() {
            let q = Arc::new(q);
            let sock = UdpSock::bind(bind, true)
                .map_err(|e| io_err(&format!("binding UDP {bind}"), &e))?;
            sock.grow_buffers(DEFAULT_SOCKET_BUFFER);
            let gro = sock.enable_gro();
            let wire = Arc::new(Wire::new(sock));
            if i == 0 {
                mode = format!(
                    "tun offload {offload:?}, udp gso {}, udp gro {gro}",
                    wire.gso
                );
            }
            first_wire.get_or_insert_with(|| wire.clone());
            let (tx_codec, tx_q, tx_wire, tx_shared) =
                (codec.clone(), q.clone(), wire.clone(), shared.clone());
            let (rx_codec, rx_shared) = (codec.clone(), shared.clone());
            let jobs: [(String, Box<dyn FnOnce() + Send>); 2] = [
                (
                    format!("{name}-tx{i}"),
                    Box::new(move || tx::run(&*tx_codec, &tx_q, &tx_wire, &tx_shared)),
                ),
                (
                    format!("{name}-rx{i}"),
                    Box::new(move || rx::run(&*rx_codec, &q, &wire, &rx_shared)),
                ),
            ];
            for (thread, job) in jobs {
                let handle = std::thread::Builder::new()
                    .name(thread.clone())
                    .spawn(job)
                    .map_err(|e| io_err(&format!("starting thread {thread}"), &e))?;
                threads.push(handle);
            }
        }
        let wire =
            first_wire.ok_or_else(|| BackendError::Config(format!("TUN {device}: no queues")))?;
        tracing::info!(
            port = bind.port(),
            queues = QUEUES,
            "{name} datapath running: {mode}"
        );
        Ok(Pump {
            _threads: threads,
            wire,
        })
    }
}

/// The IPv4 address a message came from (IPv4-mapped IPv6 unwrapped), if any.
pub(crate) fn sender_v4(addr: SocketAddr) -> Option<Ipv4Addr> {
    match addr.ip() {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(ip) => ip.to_ipv4_mapped(),
    }
}
