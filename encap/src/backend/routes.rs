//! Routes per peer lease, for the backends that program routes per lease (host-gw, vxlan):
//! what was installed, replaced in place when a lease changes, removed with it, restored when
//! deleted behind our back, and listed for the daemon's sweep. One reconciler for both.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;
use subnet_manager::lease::SubnetKey;

use super::Repaired;
use crate::netlink::{Netlink, NetlinkError, OwnRoute};

/// One route a lease calls for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PeerRoute {
    pub dst: IpNet,
    pub via: IpAddr,
    pub oif: u32,
    /// The gateway is reachable through `oif` whatever the kernel's neighbour table says
    /// (vxlan's route via the peer's lease address on `flannel.<VNI>`).
    pub onlink: bool,
    /// `oif` belongs to us alone (vxlan's devices): the same route found there, made by
    /// another program (Go Flannel before a migration in place), is taken over.
    pub own_link: bool,
}

impl PeerRoute {
    /// How the kernel lists it (the protocol-70 routes of `Netlink::own_routes`).
    pub fn as_own(&self) -> OwnRoute {
        OwnRoute {
            dst: self.dst,
            gateway: Some(self.via),
            oif: Some(self.oif),
            blackhole: false,
        }
    }
}

pub(crate) struct PeerRoutes {
    netlink: Netlink,
    installed: HashMap<SubnetKey, Vec<PeerRoute>>,
}

impl PeerRoutes {
    pub fn new(netlink: Netlink) -> Self {
        PeerRoutes {
            netlink,
            installed: HashMap::new(),
        }
    }

    /// Makes `key`'s routes exactly `wanted`: the ones it had that `wanted` does not replace
    /// in place (same destination) are deleted, then `wanted` is installed. What went in is
    /// recorded even when a route fails, so that removing the peer takes it out again.
    pub async fn set(
        &mut self,
        key: &SubnetKey,
        wanted: Vec<PeerRoute>,
    ) -> Result<(), NetlinkError> {
        let old = self.installed.remove(key).unwrap_or_default();
        let mut result = Ok(());
        for r in old
            .iter()
            .filter(|r| !wanted.iter().any(|w| w.dst == r.dst))
        {
            if let Err(e) = self.netlink.delete_route(&r.as_own()).await {
                result = Err(e);
            }
        }
        let mut done = Vec::new();
        for r in wanted {
            match self
                .netlink
                .replace_route(r.dst, Some(r.via), r.oif, r.onlink, r.own_link)
                .await
            {
                Ok(()) => done.push(r),
                Err(e) => result = Err(e),
            }
        }
        if !done.is_empty() {
            self.installed.insert(key.clone(), done);
        }
        result
    }

    /// Deletes `key`'s routes (those already gone are not an error).
    pub async fn remove(&mut self, key: &SubnetKey) -> Result<(), NetlinkError> {
        self.set(key, Vec::new()).await
    }

    /// Forgets the routes through link `oif` without deleting them (they died with it).
    pub fn forget_on_link(&mut self, oif: u32) {
        for routes in self.installed.values_mut() {
            routes.retain(|r| r.oif != oif);
        }
        self.installed.retain(|_, routes| !routes.is_empty());
    }

    /// How many of our routes go through link `oif`.
    pub fn count_on_link(&self, oif: u32) -> usize {
        self.installed
            .values()
            .flatten()
            .filter(|r| r.oif == oif)
            .count()
    }

    /// Every route we hold, as the kernel lists them.
    pub fn wanted(&self) -> Vec<OwnRoute> {
        self.installed
            .values()
            .flatten()
            .map(PeerRoute::as_own)
            .collect()
    }

    /// Installs again the routes someone deleted, and counts them. One that cannot go back
    /// (an operator's route in its place) does not keep the others out.
    pub async fn repair(&self) -> Repaired {
        let mut pass = Repaired::default();
        let present = match self.netlink.own_routes().await {
            Ok(p) => p,
            Err(e) => {
                pass.fail(e);
                return pass;
            }
        };
        for r in self.installed.values().flatten() {
            if present.contains(&r.as_own()) {
                continue;
            }
            tracing::warn!(route = %r.dst, via = %r.via, "our route was deleted: restoring it");
            match self
                .netlink
                .replace_route(r.dst, Some(r.via), r.oif, r.onlink, r.own_link)
                .await
            {
                Ok(()) => pass.count(1),
                Err(e) => pass.fail(e),
            }
        }
        pass
    }
}
