//! udp: Flannel's udp backend, wire-compatible (one inner IP packet per datagram to port 8285)
//! but batched: TSO super-packets from a multiqueue TUN are cut into segments and sent with one
//! UDP GSO `sendmsg`; received datagrams (GRO, `recvmmsg`) are checked against the leases,
//! merged back into super-packets and written to the TUN with a virtio-net header.
//!
//! Flannel accepts datagrams from anyone; we drop, and count by reason, datagrams whose outer
//! source is no lease's PublicIP, whose inner source is outside that lease's subnet, or whose
//! inner destination is not ours.

mod codec;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use async_trait::async_trait;
use subnet_manager::config::NetworkConfig;
use subnet_manager::lease::{Lease, SubnetKey};

use super::pump::{Addressing, DeviceState, Family, Pump};
use super::{backend_port, Backend, BackendError, LeaseData, NodeInfo, Repaired};
use crate::io::Listen;
use crate::netlink::Netlink;
use crate::peers::{Peer, PeerTable, SharedPeers};
use crate::stats::Stats;
use codec::UdpCodec;

const TYPE: &str = "udp";
const DEVICE: &str = "flannel0";
const DEFAULT_PORT: u16 = 8285;
/// IPv4 (20) + UDP (8) headers around each inner packet.
const OVERHEAD: u32 = 28;

pub struct Udp {
    netlink: Netlink,
    node: NodeInfo,
    network: NetworkConfig,
    port: u16,
    state: Arc<DeviceState>,
    table: Arc<SharedPeers>,
    peers: HashMap<SubnetKey, Peer>,
    /// The packet threads, once started; dropping it stops them.
    pump: Option<Pump>,
    /// The TUN device's address for our lease.
    addressing: Addressing,
}

impl Udp {
    pub fn new(network: &NetworkConfig, node: &NodeInfo) -> Result<Self, BackendError> {
        if network.network.is_none() || !network.enable_ipv4 {
            return Err(BackendError::Config(
                "the udp backend needs an IPv4 Network".into(),
            ));
        }
        // Flannel's udp backend is IPv4 only, and its wire format has no room for a family.
        if network.enable_ipv6 {
            return Err(BackendError::Config(
                "the udp backend is IPv4 only, as Flannel's: set EnableIPv6 to false, or use the host-gw, vxlan or wireguard backend for dual stack".into(),
            ));
        }
        let port = backend_port(network, "Port", DEFAULT_PORT)?;
        let mtu = node.iface.mtu.saturating_sub(OVERHEAD) as usize;
        Ok(Udp {
            netlink: Netlink::open()?,
            node: node.clone(),
            network: network.clone(),
            port,
            state: Arc::new(DeviceState::new(mtu).with_datapath(node.datapath)),
            table: Arc::new(SharedPeers::from_pointee(PeerTable::default())),
            peers: HashMap::new(),
            pump: None,
            addressing: Addressing::new(DEVICE),
        })
    }

    fn publish_peers(&self) {
        let table = PeerTable::new(self.peers.values().cloned().collect());
        self.state.stats.table_published(table.len());
        self.table.store(Arc::new(table));
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
}

#[async_trait]
impl Backend for Udp {
    fn name(&self) -> &'static str {
        TYPE
    }

    fn mtu(&self) -> u32 {
        self.state.mtu as u32
    }

    fn lease_data(&self) -> LeaseData {
        // Flannel's udp leases carry no BackendType and no BackendData.
        LeaseData::default()
    }

    fn stats(&self) -> Option<Arc<Stats>> {
        Some(self.state.stats.clone())
    }

    async fn start(&mut self, own: &Lease) -> Result<(), BackendError> {
        let (Some(subnet), Some(network)) = (own.key.ipv4, self.network.network) else {
            return Err(BackendError::Config(
                "the udp backend needs an IPv4 lease".into(),
            ));
        };
        if self.pump.is_none() {
            let codec = Arc::new(UdpCodec {
                peers: self.table.clone(),
            });
            let bind = SocketAddr::new(IpAddr::V4(self.node.public_ip), self.port);
            let listen = Listen::At(bind);
            self.pump = Some(Pump::start(
                TYPE,
                DEVICE,
                listen,
                codec,
                self.state.clone(),
            )?);
        }
        let family = Family {
            subnet: subnet.into(),
            network: network.into(),
        };
        self.addressing
            .adopt(&self.netlink, &self.state, &[family])
            .await
    }

    async fn repair(&mut self) -> Repaired {
        let mut pass = Repaired::default();
        let restored = self.addressing.repair(&self.netlink, &self.state).await;
        pass.note(restored.map(usize::from));
        pass
    }

    async fn add_peer(&mut self, peer: &Lease) -> Result<(), BackendError> {
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
            .filter_map(|p| Some((p.key.clone(), self.peer_of(p)?)))
            .collect();
        self.publish_peers();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(json: &str) -> Result<Udp, BackendError> {
        let config = NetworkConfig::parse(json.as_bytes()).expect("config");
        Udp::new(&config, &NodeInfo::for_test(true))
    }

    #[test]
    fn ipv6_is_refused_clearly() {
        let dual = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fc00:44::/48","Backend":{"Type":"udp"}}"#;
        let err = new(dual).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            err.contains("IPv4 only") && err.contains("EnableIPv6"),
            "{err}"
        );
        let v6_only = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00:44::/48","Backend":{"Type":"udp"}}"#;
        let err = new(v6_only)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("IPv4 Network"), "{err}");
    }
}
