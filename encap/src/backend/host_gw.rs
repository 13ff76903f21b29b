//! host-gw: no encapsulation. Each remote subnet is routed via the peer's public IP on the
//! underlay interface, so every node must share an L2 segment with every other.

use std::collections::HashMap;
use std::net::IpAddr;

use async_trait::async_trait;
use ipnet::IpNet;
use subnet_manager::config::NetworkConfig;
use subnet_manager::lease::{Lease, SubnetKey};

use super::{check_same_backend, same_backend, Backend, BackendError, LeaseData, NodeInfo};
use crate::netlink::{Netlink, OwnRoute};

const TYPE: &str = "host-gw";

pub struct HostGw {
    netlink: Netlink,
    node: NodeInfo,
    network: NetworkConfig,
    /// The routes we installed, per peer subnet.
    routes: HashMap<SubnetKey, Vec<OwnRoute>>,
}

impl HostGw {
    pub fn new(network: &NetworkConfig, node: &NodeInfo) -> Result<Self, BackendError> {
        Ok(HostGw {
            netlink: Netlink::open()?,
            node: node.clone(),
            network: network.clone(),
            routes: HashMap::new(),
        })
    }

    /// The routes a peer's lease calls for: one per address family it has a subnet and IP for.
    fn wanted(&self, peer: &Lease) -> Vec<OwnRoute> {
        let mut out = Vec::new();
        let oif = Some(self.node.iface.index);
        if let (Some(net), true) = (peer.key.ipv4, self.network.enable_ipv4) {
            if !peer.attrs.public_ip.is_unspecified() {
                out.push(OwnRoute {
                    dst: IpNet::V4(net),
                    gateway: Some(IpAddr::V4(peer.attrs.public_ip)),
                    oif,
                });
            }
        }
        if let (Some(net), Some(ip), true) = (
            peer.key.ipv6,
            peer.attrs.public_ipv6,
            self.network.enable_ipv6,
        ) {
            out.push(OwnRoute {
                dst: IpNet::V6(net),
                gateway: Some(IpAddr::V6(ip)),
                oif,
            });
        }
        out
    }

    /// Whether a route of ours belongs to this backend's business: inside the pod network.
    fn in_network(&self, dst: &IpNet) -> bool {
        match dst {
            IpNet::V4(d) => self.network.network.is_some_and(|n| n.contains(d)),
            IpNet::V6(d) => self.network.ipv6_network.is_some_and(|n| n.contains(d)),
        }
    }
}

#[async_trait]
impl Backend for HostGw {
    fn name(&self) -> &'static str {
        TYPE
    }

    fn mtu_overhead(&self) -> u32 {
        0
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
        check_same_backend(peer, TYPE)?;
        let wanted = self.wanted(peer);
        // A changed lease (e.g. a new public IP) must not leave the old route behind.
        if let Some(old) = self.routes.remove(&peer.key) {
            for r in old.iter().filter(|r| !wanted.contains(r)) {
                self.netlink.delete_route(r).await?;
            }
        }
        let mut installed = Vec::new();
        let mut result = Ok(());
        for r in &wanted {
            match self
                .netlink
                .replace_route(r.dst, r.gateway, self.node.iface.index, false)
                .await
            {
                Ok(()) => installed.push(r.clone()),
                Err(e) => {
                    result = Err(BackendError::Peer {
                        peer: peer.key.to_string(),
                        reason: format!(
                            "{e} (host-gw needs every node on the same L2 network as {})",
                            self.node.iface.name
                        ),
                    })
                }
            }
        }
        self.routes.insert(peer.key.clone(), installed);
        result
    }

    async fn remove_peer(&mut self, peer: &Lease) -> Result<(), BackendError> {
        if let Some(routes) = self.routes.remove(&peer.key) {
            for r in &routes {
                self.netlink.delete_route(r).await?;
            }
        }
        Ok(())
    }

    fn wanted_routes(&self) -> Vec<OwnRoute> {
        self.routes.values().flatten().cloned().collect()
    }

    async fn repair(&mut self) -> Result<usize, BackendError> {
        let present = self.netlink.own_routes().await?;
        let mut restored = 0;
        for r in self.routes.values().flatten() {
            if present.contains(r) {
                continue;
            }
            tracing::warn!(route = %r.dst, via = ?r.gateway, "our route was deleted: restoring it");
            self.netlink
                .replace_route(r.dst, r.gateway, self.node.iface.index, false)
                .await?;
            restored += 1;
        }
        Ok(restored)
    }

    async fn reconcile(&mut self, peers: &[Lease]) -> Result<(), BackendError> {
        let wanted: Vec<OwnRoute> = peers
            .iter()
            .filter(|p| same_backend(p, TYPE))
            .flat_map(|p| self.wanted(p))
            .collect();
        for r in self.netlink.own_routes().await? {
            let ours_here = r.oif == Some(self.node.iface.index) && self.in_network(&r.dst);
            if ours_here && !wanted.contains(&r) {
                tracing::info!(route = %r.dst, "removing a stale route no lease justifies");
                self.netlink.delete_route(&r).await?;
            }
        }
        let mut first_err = Ok(());
        for p in peers {
            if let Err(e) = self.add_peer(p).await {
                tracing::warn!("{e}");
                if first_err.is_ok() && same_backend(p, TYPE) {
                    first_err = Err(e);
                }
            }
        }
        first_err
    }
}
