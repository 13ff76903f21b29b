//! vxlan: the kernel's VXLAN devices `flannel.<VNI>` (IPv4) and, with `EnableIPv6`,
//! `flannel-v6.<VNI>` (IPv6 over an IPv6 underlay), wired exactly as Flannel wires them so Go
//! Flannel nodes and ours share one overlay. Per remote lease and family (no L2/L3-miss
//! daemons):
//!
//! ```text
//! ip neigh replace <lease net addr> lladdr <VtepMAC> dev flannel.<VNI> nud permanent
//! bridge fdb replace <VtepMAC> dev flannel.<VNI> dst <PublicIP> self permanent
//! ip route replace <lease subnet> via <lease net addr> dev flannel.<VNI> onlink
//! ```
//!
//! and the same with the lease's IPv6 subnet, `BackendV6Data.VtepMAC` and `PublicIPv6` on
//! `flannel-v6.<VNI>`. With `DirectRouting`, a peer whose public address is on a directly
//! connected network gets a plain `<lease subnet> via <public address>` instead (in each
//! family, as Go Flannel). Everything goes through netlink. An IPv6-only config
//! (`EnableIPv4: false`) runs `flannel-v6.<VNI>` alone.
//!
//! Where we do more than Flannel (never in a format):
//! - A new device's MAC is derived from our public address and VNI instead of drawn at
//!   random, so it survives reboots as well as daemon restarts and peers never hold a stale
//!   neighbour entry. A device that must be recreated keeps the MAC it had.
//! - A lease whose BackendData (BackendV6Data) is malformed, has a multicast/zero VtepMAC, or
//!   a different VNI is refused for that family with an error naming the lease and the field;
//!   Go Flannel trusts it, and skips the whole lease when its IPv6 part is unusable, where we
//!   still program its IPv4 part.
//! - Removing a lease never deletes an FDB entry another lease still uses (same VtepMAC).
//! - At start, permanent neighbour and FDB entries and routes on our devices, and our direct
//!   routes, that no lease justifies are removed (stale peers from before a restart, or left
//!   by Go Flannel on the same node). Each repair pass removes the entries that none of the
//!   peers we programmed justifies (one whose removal failed when its peer left is forgotten
//!   then, and goes at the next pass).

mod vtep;

use std::collections::HashMap;
use std::net::IpAddr;

use async_trait::async_trait;
use ipnet::IpNet;
use subnet_manager::config::NetworkConfig;
use subnet_manager::lease::{Lease, SubnetKey};

use super::routes::{PeerRoute, PeerRoutes};
use super::{Backend, BackendError, LeaseData, NodeInfo, Repaired};
use crate::netlink::{
    format_mac, FdbEntry, LinkDetails, Neighbour, Netlink, OwnRoute, VxlanAttrs, VxlanSpec,
};
use vtep::{derived_mac, families, host_net, parse_backend_data, vtep_data, Config, Family};

const TYPE: &str = "vxlan";

/// One link-layer object we install on a VXLAN device for a peer (its routes are kept by the
/// shared [`PeerRoutes`]). The family of its address says which device it lives on.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Entry {
    /// Permanent ARP/NDP entry: peer's lease network address -> its VtepMAC.
    Neighbour { ip: IpAddr, mac: [u8; 6] },
    /// FDB entry: VtepMAC -> peer's public address.
    Fdb { mac: [u8; 6], dst: IpAddr },
}

impl Entry {
    fn family(&self) -> Family {
        match self {
            Entry::Neighbour { ip, .. } => Family::of(*ip),
            Entry::Fdb { dst, .. } => Family::of(*dst),
        }
    }

    /// Whether two entries are the same kernel object, which a replace overwrites in place:
    /// the neighbour table is keyed by IP, each device's FDB by MAC.
    fn same_object(&self, other: &Entry) -> bool {
        match (self, other) {
            (Entry::Neighbour { ip: a, .. }, Entry::Neighbour { ip: b, .. }) => a == b,
            (Entry::Fdb { mac: a, .. }, Entry::Fdb { mac: b, .. }) => {
                a == b && self.family() == other.family()
            }
            _ => false,
        }
    }

    /// Whether the kernel holds this entry, as dumped from its device.
    fn present(&self, neigh: &[Neighbour], fdb: &[FdbEntry]) -> bool {
        match self {
            Entry::Neighbour { ip, mac } => neigh
                .iter()
                .any(|n| n.ip == *ip && n.mac.as_slice() == mac.as_slice()),
            Entry::Fdb { mac, dst } => fdb
                .iter()
                .any(|f| f.mac.as_slice() == mac.as_slice() && f.dst == Some(*dst)),
        }
    }
}

/// What a peer's lease calls for: link-layer entries, then routes (a route goes in last, so
/// the kernel never resolves its gateway itself, and comes out first). `problems` names the
/// families the peer has but that cannot be used (the others are still programmed).
#[derive(Debug, Default)]
struct Wanted {
    entries: Vec<Entry>,
    routes: Vec<PeerRoute>,
    problems: Vec<String>,
}

impl Wanted {
    fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.routes.is_empty()
    }
}

/// A peer's lease turned into entries, or the reason it cannot be.
fn peer_error(peer: &Lease, reason: impl Into<String>) -> BackendError {
    BackendError::Peer {
        peer: peer.key.to_string(),
        reason: reason.into(),
    }
}

/// One of our VXLAN devices, as found or created.
#[derive(Clone, Debug)]
struct Device {
    family: Family,
    link: LinkDetails,
    /// Its VtepMAC, published in our lease: kept when the device must be recreated.
    mac: [u8; 6],
}

impl Device {
    fn index(&self) -> u32 {
        self.link.link.index
    }

    fn name(&self) -> &str {
        &self.link.link.name
    }
}

/// A VtepMAC as the FDB keys it (its bytes, written lowercase with colons); `None` if it is
/// not a MAC in any notation we read.
pub(super) fn canonical_mac(s: &str) -> Option<String> {
    vtep::parse_mac(s).map(|mac| format_mac(&mac))
}

pub struct Vxlan {
    netlink: Netlink,
    node: NodeInfo,
    network: NetworkConfig,
    cfg: Config,
    /// `flannel.<VNI>` and/or `flannel-v6.<VNI>`, as found or created in `new`, IPv4 first.
    devices: Vec<Device>,
    /// The neighbour and FDB entries we installed, per peer lease, in installation order.
    installed: HashMap<SubnetKey, Vec<Entry>>,
    /// The routes we installed, per peer lease (both families).
    routes: PeerRoutes,
    /// The peers' leases, to program again on a recreated device.
    leases: HashMap<SubnetKey, Lease>,
    /// Our lease, to address a recreated device.
    own: Option<Lease>,
}

impl Vxlan {
    /// Parses the config and finds or creates a device per enabled family: their MACs go
    /// into our lease.
    pub async fn new(network: &NetworkConfig, node: &NodeInfo) -> Result<Self, BackendError> {
        if network.enable_ipv4 && network.network.is_none() {
            return Err(BackendError::Config(
                "the vxlan backend needs an IPv4 Network".into(),
            ));
        }
        if network.enable_ipv6 && network.ipv6_network.is_none() {
            return Err(BackendError::Config(
                "the vxlan backend needs an IPv6Network with EnableIPv6".into(),
            ));
        }
        let cfg = Config::parse(network, node.iface.mtu)?;
        let netlink = Netlink::open()?;
        let mut devices = Vec::new();
        for family in families(network) {
            devices.push(open_device(&netlink, &cfg, node, family, None).await?);
        }
        Ok(Vxlan {
            routes: PeerRoutes::new(netlink.clone()),
            netlink,
            node: node.clone(),
            network: network.clone(),
            cfg,
            devices,
            installed: HashMap::new(),
            leases: HashMap::new(),
            own: None,
        })
    }

    fn device(&self, family: Family) -> Option<&Device> {
        self.devices.iter().find(|d| d.family == family)
    }

    fn index_for(&self, e: &Entry) -> Result<u32, BackendError> {
        self.device(e.family())
            .map(Device::index)
            .ok_or_else(|| BackendError::Config(format!("no VXLAN device of this node for {e:?}")))
    }

    /// Our public address of a family, as our lease publishes it.
    fn own_public_ip(&self, family: Family) -> Option<IpAddr> {
        match family {
            Family::V4 => Some(IpAddr::V4(self.node.public_ip)),
            Family::V6 => self.node.public_ipv6.map(IpAddr::V6),
        }
    }

    /// The /32 (/128) a device holds for our lease, if we hold one with that family.
    fn own_address(&self, family: Family) -> Option<IpNet> {
        let subnet = family.subnet(&self.own.as_ref()?.key)?;
        host_net(subnet).ok()
    }

    /// Gives a device our lease's address of its family and brings it up.
    async fn configure(&self, dev: &Device, own: &Lease) -> Result<(), BackendError> {
        let subnet = dev.family.subnet(&own.key).ok_or_else(|| {
            BackendError::Config(format!(
                "{} needs a lease with a {} subnet, and {} has none",
                dev.name(),
                match dev.family {
                    Family::V4 => "IPv4",
                    Family::V6 => "IPv6",
                },
                own.key
            ))
        })?;
        // The source address for host-to-pod traffic across nodes.
        self.netlink
            .set_sole_address(dev.index(), host_net(subnet)?)
            .await?;
        self.netlink
            .set_mtu_up(dev.index(), self.cfg.device_mtu(dev.family))
            .await?;
        // As Flannel: the device must not configure itself from router advertisements. Best
        // effort, since IPv6 may be disabled on the host.
        let ra = format!("/proc/sys/net/ipv6/conf/{}/accept_ra", dev.name());
        if let Err(e) = std::fs::write(&ra, "0") {
            tracing::debug!("setting {ra}: {e}");
        }
        Ok(())
    }

    /// Recreates a deleted device with the MAC peers know us by (Flannel #2247 recreates it
    /// with a new one and leaves peers stale), readdresses it and programs every peer again.
    async fn recreate_device(&mut self, family: Family) -> Result<usize, BackendError> {
        let Some(pos) = self.devices.iter().position(|d| d.family == family) else {
            return Ok(0);
        };
        let old_index = self.devices[pos].index();
        let keep_mac = Some(self.devices[pos].mac);
        let dev = open_device(&self.netlink, &self.cfg, &self.node, family, keep_mac).await?;
        self.devices[pos] = dev.clone();
        // The old entries and routes died with the old device (and named its index): forgotten
        // before anything below can fail, or they would be "restored" on a dead index forever.
        for entries in self.installed.values_mut() {
            entries.retain(|e| e.family() != family);
        }
        self.routes.forget_on_link(old_index);
        // An address that would not go on is tried again by the next repair; the peers are
        // programmed meanwhile all the same.
        let configured = match self.own.clone() {
            Some(own) => self.configure(&dev, &own).await,
            None => Ok(()),
        };
        let peers: Vec<Lease> = self.leases.values().cloned().collect();
        for p in &peers {
            if let Err(e) = self.add_peer(p).await {
                tracing::warn!("{e}");
            }
        }
        configured?;
        let entries = self.installed.values().flatten();
        let entries = entries.filter(|e| e.family() == family).count();
        Ok(1 + entries + self.routes.count_on_link(dev.index()))
    }

    /// The entries and routes a peer's lease calls for, family by family.
    async fn plan(&self, peer: &Lease) -> Wanted {
        let mut wanted = Wanted::default();
        for dev in &self.devices {
            match self.plan_family(dev, peer).await {
                Ok(Some(w)) => {
                    wanted.entries.extend(w.entries);
                    wanted.routes.extend(w.routes);
                }
                Ok(None) => {}
                Err(why) => wanted.problems.push(match dev.family {
                    Family::V4 => format!("ignored: {why}"),
                    Family::V6 => format!("IPv6 part ignored: {why}"),
                }),
            }
        }
        wanted
    }

    /// What a peer's lease calls for on one device; `None` when the peer has no subnet of
    /// that family (an IPv4-only node in a dual-stack cluster, as Go Flannel allows).
    async fn plan_family(&self, dev: &Device, peer: &Lease) -> Result<Option<Wanted>, String> {
        let family = dev.family;
        let Some(subnet) = family.subnet(&peer.key) else {
            return match family {
                Family::V4 => Err("the lease has no IPv4 subnet".into()),
                Family::V6 => Ok(None),
            };
        };
        let public_ip = family
            .public_ip(peer)
            .ok_or_else(|| format!("{} is missing", family.public_field()))?;
        let data_field = family.data_field();
        let vtep = parse_backend_data(family.data(peer), data_field)?;
        if let Some(vni) = vtep.vni.filter(|v| *v != u64::from(self.cfg.vni)) {
            return Err(format!(
                "{data_field}.VNI: {vni} differs from ours ({})",
                self.cfg.vni
            ));
        }
        if vtep.mac == dev.mac && Some(public_ip) == self.own_public_ip(family) {
            return Err(format!(
                "it carries our own {} and VtepMAC (an old lease of this node)",
                family.public_field()
            ));
        }
        if let Some(route) = self.direct_route(peer, subnet, public_ip).await {
            return Ok(Some(Wanted {
                routes: vec![route],
                ..Wanted::default()
            }));
        }
        let addr = subnet.network();
        Ok(Some(Wanted {
            entries: vec![
                Entry::Neighbour {
                    ip: addr,
                    mac: vtep.mac,
                },
                Entry::Fdb {
                    mac: vtep.mac,
                    dst: public_ip,
                },
            ],
            routes: vec![PeerRoute {
                dst: subnet,
                via: addr,
                oif: dev.index(),
                onlink: true,
                own_link: true,
            }],
            problems: Vec::new(),
        }))
    }

    /// With `DirectRouting`, the plain route to a peer whose public address is on a directly
    /// connected network.
    async fn direct_route(
        &self,
        peer: &Lease,
        subnet: IpNet,
        public_ip: IpAddr,
    ) -> Option<PeerRoute> {
        if !self.cfg.direct_routing {
            return None;
        }
        match self.netlink.route_to(public_ip).await {
            Ok(r) if r.gateway.is_none() => r.oif.map(|oif| PeerRoute {
                dst: subnet,
                via: public_ip,
                oif,
                onlink: false,
                own_link: false,
            }),
            Ok(_) => None,
            // As Flannel: without an answer, encapsulate (works whatever the topology).
            Err(e) => {
                tracing::warn!(peer = %peer.key, "DirectRouting: {e}; using VXLAN for this peer");
                None
            }
        }
    }

    async fn install(&self, e: &Entry) -> Result<(), BackendError> {
        let idx = self.index_for(e)?;
        match e {
            Entry::Neighbour { ip, mac } => self.netlink.replace_neighbour(idx, *ip, *mac).await?,
            Entry::Fdb { mac, dst } => self.netlink.replace_fdb(idx, *mac, *dst).await?,
        }
        Ok(())
    }

    /// Removes one entry unless another peer's entries still need the same kernel object
    /// (the FDB is keyed by MAC, the neighbour table by IP).
    async fn uninstall(&self, e: &Entry, except: &SubnetKey) -> Result<(), BackendError> {
        let shared = self
            .installed
            .iter()
            .filter(|(k, _)| *k != except)
            .flat_map(|(_, es)| es.iter())
            .any(|o| o.same_object(e));
        if shared {
            return Ok(());
        }
        let idx = self.index_for(e)?;
        match e {
            Entry::Neighbour { ip, .. } => self.netlink.delete_neighbour(idx, *ip).await?,
            Entry::Fdb { mac, dst } => self.netlink.delete_fdb(idx, *mac, Some(*dst)).await?,
        }
        Ok(())
    }

    /// Removes the entries we installed for `key` except the objects `keep` will overwrite
    /// anyway (so a changed lease causes no gap). Its routes go first (see `remove_peer`).
    async fn remove_entries(
        &mut self,
        key: &SubnetKey,
        keep: &[Entry],
    ) -> Result<(), BackendError> {
        let Some(old) = self.installed.remove(key) else {
            return Ok(());
        };
        let mut result = Ok(());
        for e in old
            .iter()
            .rev()
            .filter(|e| !keep.iter().any(|k| k.same_object(e)))
        {
            if let Err(err) = self.uninstall(e, key).await {
                tracing::warn!(peer = %key, "{err}");
                if result.is_ok() {
                    result = Err(err);
                }
            }
        }
        result
    }

    /// Installs a peer's entries, then the routes of each family whose entries all went in
    /// (a route over a missing entry would make the kernel resolve its gateway itself).
    async fn program(&mut self, peer: &Lease, wanted: &Wanted) -> Result<(), BackendError> {
        self.remove_entries(&peer.key, &wanted.entries).await?;
        let mut done = Vec::new();
        let mut failed = Vec::new();
        let mut result = Ok(());
        for e in &wanted.entries {
            if failed.contains(&e.family()) {
                continue;
            }
            match self.install(e).await {
                Ok(()) => done.push(e.clone()),
                Err(err) => {
                    failed.push(e.family());
                    result = result.and(Err(peer_error(peer, err.to_string())));
                }
            }
        }
        // Whatever went in is recorded, so that removing the peer later takes it out again.
        self.installed.insert(peer.key.clone(), done);
        let routes = wanted
            .routes
            .iter()
            .filter(|r| !failed.contains(&Family::of(r.dst.addr())))
            .cloned()
            .collect();
        if let Err(e) = self.routes.set(&peer.key, routes).await {
            result = result.and(Err(peer_error(peer, e.to_string())));
        }
        result
    }

    fn in_network(&self, dst: &IpNet) -> bool {
        match dst {
            IpNet::V4(d) => self.network.network.is_some_and(|n| n.contains(d)),
            IpNet::V6(d) => self.network.ipv6_network.is_some_and(|n| n.contains(d)),
        }
    }

    /// Deletes neighbours, FDB entries and routes of ours that none of `wanted` justifies.
    async fn sweep_stale(
        &self,
        wanted: &[Entry],
        wanted_routes: &[OwnRoute],
    ) -> Result<(), BackendError> {
        // Routes first, so traffic never meets a route whose neighbour is gone.
        self.sweep_routes(wanted_routes).await?;
        let mut pass = Repaired::default();
        for dev in &self.devices {
            let idx = dev.index();
            let neigh = self.netlink.neighbours(idx).await?;
            let fdb = self.netlink.fdb_entries(idx).await?;
            self.sweep_entries(dev, wanted, &neigh, &fdb, &mut pass)
                .await;
        }
        pass.error.map_or(Ok(()), Err)
    }

    /// Routes into the pod networks on our devices (whoever made them) and our direct routes
    /// on the underlay that no lease justifies.
    async fn sweep_routes(&self, wanted_routes: &[OwnRoute]) -> Result<(), BackendError> {
        let want_route = |dst: &IpNet| wanted_routes.iter().any(|r| r.dst == *dst);
        for dev in &self.devices {
            let own = self.own_address(dev.family);
            for r in self.netlink.routes_on_link(dev.index()).await? {
                // The kernel's route to the device's own /128 (IPv6 makes one per address).
                let own_route = r.gateway.is_none() && Some(r.dst) == own;
                if !own_route && self.in_network(&r.dst) && !want_route(&r.dst) {
                    tracing::info!(route = %r.dst, device = dev.name(), "removing a stale route no lease justifies");
                    self.netlink.delete_route_any_protocol(&r).await?;
                }
            }
        }
        let underlay = self.node.iface.index;
        for r in self.netlink.own_routes().await? {
            if r.oif == Some(underlay) && self.in_network(&r.dst) && !want_route(&r.dst) {
                tracing::info!(route = %r.dst, "removing a stale direct route no lease justifies");
                self.netlink.delete_route(&r).await?;
            }
        }
        Ok(())
    }

    /// Removes the permanent FDB and neighbour entries of a device (as dumped: `neigh`,
    /// `fdb`) that no wanted entry justifies, each whatever another's failure.
    async fn sweep_entries(
        &self,
        dev: &Device,
        wanted: &[Entry],
        neigh: &[Neighbour],
        fdb: &[FdbEntry],
        pass: &mut Repaired,
    ) {
        let idx = dev.index();
        let want_neigh = |ip: IpAddr| {
            wanted
                .iter()
                .any(|e| matches!(e, Entry::Neighbour { ip: w, .. } if *w == ip))
        };
        let want_mac = |mac: &[u8]| {
            wanted.iter().any(|e| {
                e.family() == dev.family
                    && matches!(e, Entry::Fdb { mac: w, .. } if w.as_slice() == mac)
            })
        };
        for f in fdb {
            // Entries the kernel learned (Learning on) age out by themselves.
            if !f.permanent || want_mac(&f.mac) {
                continue;
            }
            if let Ok(mac) = <[u8; 6]>::try_from(f.mac.as_slice()) {
                tracing::info!(mac = %format_mac(&mac), dst = ?f.dst, device = dev.name(), "removing a stale FDB entry");
                pass.note(self.netlink.delete_fdb(idx, mac, f.dst).await.map(|()| 1));
            }
        }
        for n in neigh {
            if n.permanent && !want_neigh(n.ip) {
                tracing::info!(ip = %n.ip, device = dev.name(), "removing a stale neighbour entry");
                pass.note(self.netlink.delete_neighbour(idx, n.ip).await.map(|()| 1));
            }
        }
    }

    /// Puts back one device, its address and its entries, whatever was removed of them, and
    /// removes the entries on it that none of ours justifies: one whose removal failed when
    /// its peer left (forgotten then, so that a later lease is never blocked by it), or one
    /// added by hand. What it put right is counted in `pass`; `Err` is what stopped it.
    async fn repair_device(
        &mut self,
        family: Family,
        pass: &mut Repaired,
    ) -> Result<(), BackendError> {
        let Some(dev) = self.device(family).cloned() else {
            return Ok(());
        };
        let now = self.netlink.link_details(dev.name()).await?;
        if now.as_ref().map(|d| d.link.index) != Some(dev.index()) {
            tracing::warn!(device = dev.name(), mac = %format_mac(&dev.mac), "our VXLAN device was deleted: recreating it with the same MAC");
            pass.count(self.recreate_device(family).await?);
            return Ok(());
        }
        pass.count(usize::from(self.restore_address(&dev).await?));
        let neigh = self.netlink.neighbours(dev.index()).await?;
        let fdb = self.netlink.fdb_entries(dev.index()).await?;
        let ours: Vec<Entry> = self
            .installed
            .values()
            .flatten()
            .filter(|e| e.family() == family)
            .cloned()
            .collect();
        for e in ours.iter().filter(|e| !e.present(&neigh, &fdb)) {
            tracing::warn!(entry = ?e, device = dev.name(), "an entry of ours was deleted: restoring it");
            pass.note(self.install(e).await.map(|()| 1));
        }
        self.sweep_entries(&dev, &ours, &neigh, &fdb, pass).await;
        Ok(())
    }

    /// Gives a device its address back if it lost it; returns whether it had to.
    async fn restore_address(&self, dev: &Device) -> Result<bool, BackendError> {
        let (Some(own), Some(want)) = (self.own.as_ref(), self.own_address(dev.family)) else {
            return Ok(false);
        };
        let present = self
            .netlink
            .addresses()
            .await?
            .iter()
            .any(|(i, a)| *i == dev.index() && a.addr() == want.addr());
        if present {
            return Ok(false);
        }
        tracing::warn!(
            device = dev.name(),
            "our VXLAN device lost its address: restoring it"
        );
        self.configure(dev, own).await?;
        Ok(true)
    }
}

/// Finds or creates the device of a family (keeping `keep_mac` if it must be created).
async fn open_device(
    netlink: &Netlink,
    cfg: &Config,
    node: &NodeInfo,
    family: Family,
    keep_mac: Option<[u8; 6]>,
) -> Result<Device, BackendError> {
    let local = local_address(netlink, node, family).await?;
    let link = ensure_device(netlink, cfg, node, family, local, keep_mac).await?;
    let mac = <[u8; 6]>::try_from(link.mac.as_slice()).map_err(|_| {
        BackendError::Config(format!(
            "{} has no 6-byte MAC address ({})",
            link.link.name,
            format_mac(&link.mac)
        ))
    })?;
    tracing::info!(
        device = %link.link.name,
        vni = cfg.vni,
        port = cfg.port,
        %local,
        vtep_mac = %format_mac(&mac),
        mtu = cfg.device_mtu(family),
        gbp = cfg.gbp,
        direct_routing = cfg.direct_routing,
        "vxlan device ready"
    );
    Ok(Device { family, link, mac })
}

/// The address VXLAN packets of a family leave from: the underlay interface's own address,
/// which is the PublicIP (PublicIPv6) unless `--public-ip` (`--public-ipv6`) names another
/// (e.g. behind NAT), as with Flannel. IPv6 link-local addresses do not count.
async fn local_address(
    netlink: &Netlink,
    node: &NodeInfo,
    family: Family,
) -> Result<IpAddr, BackendError> {
    let on_iface: Vec<IpAddr> = netlink
        .addresses()
        .await?
        .into_iter()
        .filter(|(i, _)| *i == node.iface.index)
        .map(|(_, a)| a.addr())
        .filter(|a| Family::of(*a) == family)
        .filter(|a| !matches!(a, IpAddr::V6(v6) if v6.is_unicast_link_local()))
        .collect();
    let public = match family {
        Family::V4 => Some(IpAddr::V4(node.public_ip)),
        Family::V6 => node.public_ipv6.map(IpAddr::V6),
    };
    if let Some(ip) = public.filter(|ip| on_iface.contains(ip)) {
        return Ok(ip);
    }
    on_iface.first().copied().ok_or_else(|| {
        BackendError::Config(format!(
            "interface {} has no {} address for VXLAN to send from",
            node.iface.name,
            match family {
                Family::V4 => "IPv4",
                Family::V6 => "global IPv6 (EnableIPv6)",
            }
        ))
    })
}

/// Why an existing device cannot be kept as it is, if it cannot.
fn incompatibility(have: &LinkDetails, want: &VxlanSpec) -> Option<String> {
    let Some(v) = &have.vxlan else {
        return Some(format!(
            "it is a {} device, not vxlan",
            have.kind.as_deref().unwrap_or("unknown")
        ));
    };
    let want_attrs = VxlanAttrs {
        vni: Some(want.vni),
        port: Some(want.port),
        local: Some(want.local),
        dev: Some(want.dev),
        learning: want.learning,
        gbp: want.gbp,
    };
    let show = |o: Option<String>| o.unwrap_or_else(|| "none".into());
    let diffs: Vec<String> = [
        (v.vni != want_attrs.vni).then(|| {
            format!(
                "VNI {} instead of {}",
                show(v.vni.map(|x| x.to_string())),
                want.vni
            )
        }),
        (v.port != want_attrs.port).then(|| {
            format!(
                "port {} instead of {}",
                show(v.port.map(|x| x.to_string())),
                want.port
            )
        }),
        (v.local != want_attrs.local).then(|| {
            format!(
                "local {} instead of {}",
                show(v.local.map(|x| x.to_string())),
                want.local
            )
        }),
        (v.dev != want_attrs.dev).then(|| {
            format!(
                "underlay link {} instead of {}",
                show(v.dev.map(|x| x.to_string())),
                want.dev
            )
        }),
        (v.learning != want.learning)
            .then(|| format!("learning {} instead of {}", v.learning, want.learning)),
        (v.gbp != want.gbp).then(|| format!("gbp {} instead of {}", v.gbp, want.gbp)),
    ]
    .into_iter()
    .flatten()
    .collect();
    (!diffs.is_empty()).then(|| diffs.join(", "))
}

/// Reuses a family's device if it matches (its MAC is what peers know us by), else recreates
/// it, keeping its MAC when it had one.
async fn ensure_device(
    netlink: &Netlink,
    cfg: &Config,
    node: &NodeInfo,
    family: Family,
    local: IpAddr,
    keep_mac: Option<[u8; 6]>,
) -> Result<LinkDetails, BackendError> {
    let name = family.device_name(cfg.vni);
    let identity = match family {
        Family::V4 => IpAddr::V4(node.public_ip),
        Family::V6 => node.public_ipv6.map_or(local, IpAddr::V6),
    };
    let mut spec = VxlanSpec {
        name: name.clone(),
        vni: cfg.vni,
        port: cfg.port,
        local,
        dev: node.iface.index,
        learning: cfg.learning,
        gbp: cfg.gbp,
        mac: keep_mac.unwrap_or_else(|| derived_mac(identity, cfg.vni)),
        mtu: cfg.device_mtu(family),
    };
    if let Some(have) = netlink.link_details(&name).await? {
        // Recreating ours: a device someone else made under its name meanwhile carries another
        // MAC, and peers would keep sending to the one our lease publishes.
        let other_mac = keep_mac
            .filter(|m| have.mac.as_slice() != m.as_slice())
            .map(|m| {
                format!(
                    "its MAC is not {}, the one our lease publishes",
                    format_mac(&m)
                )
            });
        match incompatibility(&have, &spec).or(other_mac) {
            None => {
                tracing::info!(device = %name, mac = %format_mac(&have.mac), "reusing the existing VXLAN device and its MAC");
                return Ok(have);
            }
            Some(why) => {
                tracing::warn!(device = %name, "existing device does not match the config ({why}): recreating it");
                // At start, keep the MAC it had (peers may know it from our last lease).
                if let Ok(mac) = <[u8; 6]>::try_from(have.mac.as_slice()) {
                    if keep_mac.is_none() && mac[0] & 1 == 0 && mac != [0; 6] {
                        spec.mac = mac;
                    }
                }
                netlink.delete_link(have.link.index).await?;
            }
        }
    }
    netlink.create_vxlan(&spec).await?;
    netlink
        .link_details(&name)
        .await?
        .ok_or_else(|| BackendError::Config(format!("{name} vanished right after its creation")))
}

#[async_trait]
impl Backend for Vxlan {
    fn name(&self) -> &'static str {
        TYPE
    }

    /// FLANNEL_MTU. As Go Flannel, the IPv4 device's MTU (the underlay's, or Backend.MTU, less
    /// 50) whenever IPv4 is on, dual stack included: there the pods' IPv6 packets above the
    /// IPv6 device's MTU (20 bytes less) get a Packet Too Big from the node and path MTU
    /// discovery settles them. IPv6-only, Go still subtracts 50; we give the IPv6 device's MTU
    /// (70 less) so that full-size pod packets fit without that detour.
    fn mtu(&self) -> u32 {
        let family = if self.device(Family::V4).is_some() {
            Family::V4
        } else {
            Family::V6
        };
        self.cfg.device_mtu(family)
    }

    fn lease_data(&self) -> LeaseData {
        let data = |f: Family| self.device(f).map(|d| vtep_data(self.cfg.vni, &d.mac));
        LeaseData {
            backend_type: Some(TYPE.to_string()),
            backend_data: data(Family::V4),
            backend_v6_data: data(Family::V6),
        }
    }

    async fn start(&mut self, own: &Lease) -> Result<(), BackendError> {
        self.own = Some(own.clone());
        for dev in self.devices.clone() {
            self.configure(&dev, own).await?;
        }
        Ok(())
    }

    async fn add_peer(&mut self, peer: &Lease) -> Result<(), BackendError> {
        let wanted = self.plan(peer).await;
        if wanted.is_empty() {
            // A lease that changed into something unusable must not leave its old entries.
            if let Err(rm) = self.remove_peer(peer).await {
                tracing::warn!(peer = %peer.key, "removing its previous entries: {rm}");
            }
            let why = if wanted.problems.is_empty() {
                "ignored: it has no subnet of a family this node runs".to_string()
            } else {
                wanted.problems.join("; ")
            };
            return Err(peer_error(peer, why));
        }
        self.leases.insert(peer.key.clone(), peer.clone());
        self.program(peer, &wanted).await?;
        tracing::debug!(peer = %peer.key, public_ip = %peer.attrs.public_ip, public_ipv6 = ?peer.attrs.public_ipv6, entries = ?wanted, "peer programmed");
        if wanted.problems.is_empty() {
            Ok(())
        } else {
            // The usable families are programmed; the rest is said once per change.
            Err(peer_error(peer, wanted.problems.join("; ")))
        }
    }

    async fn remove_peer(&mut self, peer: &Lease) -> Result<(), BackendError> {
        self.leases.remove(&peer.key);
        // Route first, so that no route is ever left pointing at a missing neighbour.
        let routes = self.routes.remove(&peer.key).await;
        self.remove_entries(&peer.key, &[]).await?;
        Ok(routes?)
    }

    fn device_names(&self) -> Vec<String> {
        self.devices.iter().map(|d| d.name().to_string()).collect()
    }

    fn wanted_routes(&self) -> Vec<OwnRoute> {
        self.routes.wanted()
    }

    async fn repair(&mut self) -> Repaired {
        let families: Vec<Family> = self.devices.iter().map(|d| d.family).collect();
        // Each part is tried whatever another's failure: one family's trouble must not keep
        // the other's entries or the routes from coming back.
        let mut pass = Repaired::default();
        for family in families {
            if let Err(e) = self.repair_device(family, &mut pass).await {
                pass.fail(e);
            }
        }
        pass.merge(self.routes.repair().await);
        pass
    }

    async fn reconcile(&mut self, peers: &[Lease]) -> Result<(), BackendError> {
        let (mut entries, mut routes) = (Vec::new(), Vec::new());
        for p in peers {
            let w = self.plan(p).await;
            entries.extend(w.entries);
            routes.extend(w.routes.iter().map(PeerRoute::as_own));
        }
        if let Err(e) = self.sweep_stale(&entries, &routes).await {
            tracing::warn!("removing stale entries from our VXLAN devices: {e}");
        }
        crate::backend::add_each(self, peers).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_know_their_device_and_kernel_object() {
        let mac = [0x0a, 1, 0, 0, 0, 13];
        let v4 = Entry::Fdb {
            mac,
            dst: "172.30.0.13".parse().expect("ip"),
        };
        let v6 = Entry::Fdb {
            mac,
            dst: "fd00:30::13".parse().expect("ip"),
        };
        assert_eq!((v4.family(), v6.family()), (Family::V4, Family::V6));
        // Each device has its own FDB: one MAC on both is two objects.
        assert!(!v4.same_object(&v6));
        let moved = Entry::Fdb {
            mac,
            dst: "fd00:30::99".parse().expect("ip"),
        };
        assert!(v6.same_object(&moved));
        let n6 = Entry::Neighbour {
            ip: "fc00:44:0:3::".parse().expect("ip"),
            mac,
        };
        let dumped = Neighbour {
            ip: "fc00:44:0:3::".parse().expect("ip"),
            mac: mac.to_vec(),
            permanent: true,
        };
        assert!(n6.present(std::slice::from_ref(&dumped), &[]));
        assert!(!n6.present(
            &[Neighbour {
                mac: vec![0; 6],
                ..dumped
            }],
            &[]
        ));
        let fdb = FdbEntry {
            mac: mac.to_vec(),
            dst: Some("fd00:30::13".parse().expect("ip")),
            permanent: true,
        };
        assert!(v6.present(&[], std::slice::from_ref(&fdb)));
        assert!(!v4.present(&[], &[fdb]));
    }

    #[test]
    fn existing_device_compatibility() {
        let spec = VxlanSpec {
            name: "flannel.1".into(),
            vni: 1,
            port: 8472,
            local: "172.30.0.11".parse().expect("ip"),
            dev: 2,
            learning: false,
            gbp: false,
            mac: [0x0e, 1, 0, 0, 0, 1],
            mtu: 1450,
        };
        let mut have = LinkDetails {
            link: crate::netlink::Link {
                index: 9,
                name: "flannel.1".into(),
                mtu: 1400,
            },
            mac: vec![0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc],
            kind: Some("vxlan".into()),
            vxlan: Some(VxlanAttrs {
                vni: Some(1),
                port: Some(8472),
                local: Some("172.30.0.11".parse().expect("ip")),
                dev: Some(2),
                learning: false,
                gbp: false,
            }),
        };
        // A different MTU or MAC is no reason to recreate (the MTU is set in place).
        assert_eq!(incompatibility(&have, &spec), None);
        if let Some(v) = have.vxlan.as_mut() {
            v.port = Some(4789);
            v.local = Some("10.0.0.1".parse().expect("ip"));
        }
        let why = incompatibility(&have, &spec).expect("incompatible");
        assert!(why.contains("port 4789 instead of 8472"), "{why}");
        assert!(
            why.contains("local 10.0.0.1 instead of 172.30.0.11"),
            "{why}"
        );
        have.vxlan = None;
        have.kind = Some("veth".into());
        assert!(incompatibility(&have, &spec).is_some_and(|w| w.contains("veth")));
    }
}
