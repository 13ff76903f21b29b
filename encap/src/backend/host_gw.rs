//! host-gw: no encapsulation. Each remote subnet is routed via the peer's public IP on the
//! underlay interface, so every node must share an L2 segment with every other.

use std::net::IpAddr;

use async_trait::async_trait;
use ipnet::IpNet;
use subnet_manager::config::NetworkConfig;
use subnet_manager::lease::Lease;

use super::routes::{PeerRoute, PeerRoutes};
use super::{Backend, BackendError, LeaseData, NodeInfo, Repaired};
use crate::netlink::{Netlink, OwnRoute};

const TYPE: &str = "host-gw";

pub struct HostGw {
    node: NodeInfo,
    network: NetworkConfig,
    /// The routes we installed, per peer lease.
    routes: PeerRoutes,
}

impl HostGw {
    pub fn new(network: &NetworkConfig, node: &NodeInfo) -> Result<Self, BackendError> {
        Ok(HostGw {
            routes: PeerRoutes::new(Netlink::open()?),
            node: node.clone(),
            network: network.clone(),
        })
    }

    /// The routes a peer's lease calls for: one per address family it has a subnet and IP for.
    fn wanted(&self, peer: &Lease) -> Vec<PeerRoute> {
        let mut out = Vec::new();
        let oif = self.node.iface.index;
        if let (Some(net), true) = (peer.key.ipv4, self.network.enable_ipv4) {
            if !peer.attrs.public_ip.is_unspecified() {
                out.push(PeerRoute {
                    dst: IpNet::V4(net),
                    via: IpAddr::V4(peer.attrs.public_ip),
                    oif,
                    onlink: false,
                    own_link: false,
                });
            }
        }
        if let (Some(net), Some(ip), true) = (
            peer.key.ipv6,
            peer.attrs.public_ipv6,
            self.network.enable_ipv6,
        ) {
            out.push(PeerRoute {
                dst: IpNet::V6(net),
                via: IpAddr::V6(ip),
                oif,
                onlink: false,
                own_link: false,
            });
        }
        out
    }
}

#[async_trait]
impl Backend for HostGw {
    fn name(&self) -> &'static str {
        TYPE
    }

    fn mtu(&self) -> u32 {
        // No encapsulation: pods get the underlay's MTU.
        self.node.iface.mtu
    }

    fn lease_data(&self) -> LeaseData {
        LeaseData {
            backend_type: Some(TYPE.to_string()),
            ..LeaseData::default()
        }
    }

    async fn start(&mut self, _own: &Lease) -> Result<(), BackendError> {
        Ok(())
    }

    async fn add_peer(&mut self, peer: &Lease) -> Result<(), BackendError> {
        let wanted = self.wanted(peer);
        // A changed lease (e.g. a new public IP) leaves no old route behind.
        self.routes
            .set(&peer.key, wanted)
            .await
            .map_err(|e| BackendError::Peer {
                peer: peer.key.to_string(),
                reason: format!(
                    "{e} (host-gw needs every node on the same L2 network as {})",
                    self.node.iface.name
                ),
            })
    }

    async fn remove_peer(&mut self, peer: &Lease) -> Result<(), BackendError> {
        Ok(self.routes.remove(&peer.key).await?)
    }

    fn wanted_routes(&self) -> Vec<OwnRoute> {
        self.routes.wanted()
    }

    async fn repair(&mut self) -> Repaired {
        self.routes.repair().await
    }

    async fn reconcile(&mut self, peers: &[Lease]) -> Result<(), BackendError> {
        // Stale routes of ours (a lease gone while we were down) are removed by the daemon's
        // sweep, which follows every reconcile and covers every backend's routes.
        super::add_each(self, peers).await
    }
}
