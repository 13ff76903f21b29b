//! udp: Flannel's udp backend, wire-compatible (one inner IP packet per datagram to port 8285)
//! but batched: TSO super-packets from a multiqueue TUN are cut into segments and sent with one
//! UDP GSO `sendmsg`; received datagrams (GRO, `recvmmsg`) are checked against the leases,
//! merged back into super-packets and written to the TUN with a virtio-net header.
//!
//! Flannel accepts datagrams from anyone; we drop, and count by reason, datagrams whose outer
//! source is no lease's PublicIP, whose inner source is outside that lease's subnet, or whose
//! inner destination is not ours.

mod rx;
mod tx;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use async_trait::async_trait;
use ipnet::{IpNet, Ipv4Net};
use subnet_manager::config::NetworkConfig;
use subnet_manager::lease::{Lease, SubnetKey};

use super::{backend_port, same_backend, Backend, BackendError, LeaseData, NodeInfo};
use crate::io::{open_tun, UdpSock, DEFAULT_SOCKET_BUFFER};
use crate::netlink::Netlink;
use crate::peers::{Peer, PeerTable, SharedPeers};
use crate::stats::Stats;

const TYPE: &str = "udp";
const DEVICE: &str = "flannel0";
const DEFAULT_PORT: u16 = 8285;
/// IPv4 (20) + UDP (8) headers around each inner packet.
const OVERHEAD: u32 = 28;
/// One queue and one thread pair per core we may use: this machine kind has two.
const QUEUES: usize = 2;

/// State shared with the packet threads.
pub(crate) struct Shared {
    pub peers: SharedPeers,
    /// Our lease's subnet as `addr << 8 | prefix_len` (0 = none yet): read per batch.
    pub own: AtomicU64,
    pub stats: Arc<Stats>,
    pub stop: AtomicBool,
    /// The TUN MTU: the largest inner packet we send.
    pub mtu: usize,
}

impl Shared {
    pub fn own_subnet(&self) -> Option<Ipv4Net> {
        let v = self.own.load(Ordering::Relaxed);
        let len = (v & 0xff) as u8;
        (v != 0).then(|| Ipv4Net::new(Ipv4Addr::from((v >> 8) as u32), len).ok())?
    }

    fn set_own_subnet(&self, net: Ipv4Net) {
        let v = (u64::from(u32::from(net.network())) << 8) | u64::from(net.prefix_len());
        self.own.store(v, Ordering::Relaxed);
    }
}

pub struct Udp {
    netlink: Netlink,
    node: NodeInfo,
    network: NetworkConfig,
    port: u16,
    shared: Arc<Shared>,
    peers: HashMap<SubnetKey, Peer>,
    threads: Vec<JoinHandle<()>>,
}

impl Udp {
    pub fn new(network: &NetworkConfig, node: &NodeInfo) -> Result<Self, BackendError> {
        if network.network.is_none() {
            return Err(BackendError::Config(
                "the udp backend needs an IPv4 Network".into(),
            ));
        }
        let port = backend_port(network, "Port", DEFAULT_PORT)?;
        let mtu = node.iface.mtu.saturating_sub(OVERHEAD) as usize;
        Ok(Udp {
            netlink: Netlink::open()?,
            node: node.clone(),
            network: network.clone(),
            port,
            shared: Arc::new(Shared {
                peers: SharedPeers::from_pointee(PeerTable::default()),
                own: AtomicU64::new(0),
                stats: Arc::new(Stats::default()),
                stop: AtomicBool::new(false),
                mtu,
            }),
            peers: HashMap::new(),
            threads: Vec::new(),
        })
    }

    fn publish_peers(&self) {
        let table = PeerTable::new(self.peers.values().cloned().collect());
        self.shared.peers.store(Arc::new(table));
    }

    fn peer_of(&self, lease: &Lease) -> Option<Peer> {
        let subnet = lease.key.ipv4?;
        let ip = lease.attrs.public_ip;
        (!ip.is_unspecified()).then(|| Peer {
            subnet,
            public_ip: ip,
            endpoint: SocketAddr::new(IpAddr::V4(ip), self.port),
        })
    }

    /// Opens the TUN queues and sockets and starts one sender and one receiver per queue.
    fn start_threads(&mut self) -> Result<(), BackendError> {
        let io_err =
            |what: &str, e: &dyn std::fmt::Display| BackendError::Config(format!("{what}: {e}"));
        let queues =
            open_tun(DEVICE, QUEUES, true).map_err(|e| io_err("opening TUN flannel0", &e))?;
        let offload = queues.first().map(|q| q.offload()).unwrap_or_default();
        let bind = SocketAddr::new(IpAddr::V4(self.node.public_ip), self.port);
        let mut modes = Vec::new();
        for (i, q) in queues.into_iter().enumerate() {
            let q = Arc::new(q);
            let sock = UdpSock::bind(bind, true)
                .map_err(|e| io_err(&format!("binding UDP {bind}"), &e))?;
            sock.grow_buffers(DEFAULT_SOCKET_BUFFER);
            let gro = sock.enable_gro();
            let gso = sock.gso_supported();
            if i == 0 {
                modes.push(format!(
                    "tun offload {offload:?}, udp gso {gso}, udp gro {gro}"
                ));
            }
            let sock = Arc::new(sock);
            let tx = tx::Sender::new(q.clone(), sock.clone(), self.shared.clone(), gso);
            let rx = rx::Receiver::new(q, sock, self.shared.clone());
            for (name, job) in [
                (
                    format!("udp-tx{i}"),
                    Box::new(move || tx.run()) as Box<dyn FnOnce() + Send>,
                ),
                (format!("udp-rx{i}"), Box::new(move || rx.run())),
            ] {
                let handle = std::thread::Builder::new()
                    .name(name.clone())
                    .spawn(job)
                    .map_err(|e| io_err(&format!("starting thread {name}"), &e))?;
                self.threads.push(handle);
            }
        }
        tracing::info!(
            port = self.port,
            queues = QUEUES,
            "udp datapath running: {}",
            modes.join("; ")
        );
        Ok(())
    }
}

impl Drop for Udp {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

#[async_trait]
impl Backend for Udp {
    fn name(&self) -> &'static str {
        TYPE
    }

    fn mtu_overhead(&self) -> u32 {
        OVERHEAD
    }

    fn lease_data(&self) -> LeaseData {
        // Flannel's udp leases carry no BackendType and no BackendData.
        LeaseData::default()
    }

    fn stats(&self) -> Option<Arc<Stats>> {
        Some(self.shared.stats.clone())
    }

    async fn start(&mut self, own: &Lease) -> Result<(), BackendError> {
        let (Some(subnet), Some(network)) = (own.key.ipv4, self.network.network) else {
            return Err(BackendError::Config(
                "the udp backend needs an IPv4 lease".into(),
            ));
        };
        if self.threads.is_empty() {
            self.start_threads()?;
        }
        self.shared.set_own_subnet(subnet);
        // flannel0 carries the lease's network address with the whole Network's prefix, so the
        // kernel routes every other node's pods into the TUN.
        let link = self.netlink.link_by_name(DEVICE).await?;
        let addr = Ipv4Net::new(subnet.network(), network.prefix_len())
            .map_err(|e| BackendError::Config(format!("address for {DEVICE}: {e}")))?;
        self.netlink
            .set_sole_address(link.index, IpNet::V4(addr))
            .await?;
        self.netlink
            .set_mtu_up(link.index, self.shared.mtu as u32)
            .await?;
        Ok(())
    }

    async fn add_peer(&mut self, peer: &Lease) -> Result<(), BackendError> {
        if !same_backend(peer, TYPE) {
            return Err(BackendError::Peer {
                peer: peer.key.to_string(),
                reason: format!(
                    "ignored: its BackendType is {:?}, not udp",
                    peer.attrs.backend_type.as_deref().unwrap_or_default()
                ),
            });
        }
        let Some(p) = self.peer_of(peer) else {
            return Err(BackendError::Peer {
                peer: peer.key.to_string(),
                reason: "no IPv4 subnet or PublicIP: the udp backend is IPv4 only".into(),
            });
        };
        self.peers.insert(peer.key.clone(), p);
        self.publish_peers();
        Ok(())
    }

    async fn remove_peer(&mut self, peer: &Lease) -> Result<(), BackendError> {
        if self.peers.remove(&peer.key).is_some() {
            self.publish_peers();
        }
        Ok(())
    }

    async fn reconcile(&mut self, peers: &[Lease]) -> Result<(), BackendError> {
        self.peers = peers
            .iter()
            .filter(|p| same_backend(p, TYPE))
            .filter_map(|p| Some((p.key.clone(), self.peer_of(p)?)))
            .collect();
        self.publish_peers();
        Ok(())
    }
}
