//! vxlan: the kernel's VXLAN device `flannel.<VNI>`, wired exactly as Flannel wires it so Go
//! Flannel nodes and ours share one overlay. Per remote lease (no L2/L3-miss daemons):
//!
//! ```text
//! ip neigh replace <lease net addr> lladdr <VtepMAC> dev flannel.<VNI> nud permanent
//! bridge fdb replace <VtepMAC> dev flannel.<VNI> dst <PublicIP> self permanent
//! ip route replace <lease subnet> via <lease net addr> dev flannel.<VNI> onlink
//! ```
//!
//! With `DirectRouting`, a peer whose PublicIP is on a directly connected network gets a plain
//! `<lease subnet> via <PublicIP>` instead. Everything goes through netlink.
//!
//! Where we do more than Flannel (never in a format):
//! - A new device's MAC is derived from our PublicIP and VNI instead of drawn at random, so it
//!   survives reboots as well as daemon restarts and peers never hold a stale neighbour entry.
//!   A device that must be recreated keeps the MAC it had.
//! - A lease whose BackendData is malformed, has a multicast/zero VtepMAC, or a different VNI
//!   is refused with an error naming the lease and the field; Go Flannel trusts it.
//! - Removing a lease never deletes an FDB entry another lease still uses (same VtepMAC).
//! - At start, permanent neighbour and FDB entries and routes on `flannel.<VNI>`, and our
//!   direct routes, that no lease justifies are removed (stale peers from before a restart,
//!   or left by Go Flannel on the same node).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use async_trait::async_trait;
use ipnet::{IpNet, Ipv4Net};
use serde_json::Value;
use subnet_manager::config::NetworkConfig;
use subnet_manager::lease::{Lease, SubnetKey};

use super::routes::{PeerRoute, PeerRoutes};
use super::{backend_port, Backend, BackendError, LeaseData, NodeInfo};
use crate::netlink::{
    format_mac, FdbEntry, LinkDetails, Neighbour, Netlink, OwnRoute, VxlanAttrs, VxlanSpec,
};

const TYPE: &str = "vxlan";
const DEFAULT_VNI: u32 = 1;
/// Linux's VXLAN port (Flannel leaves the kernel default), not IANA's 4789.
const DEFAULT_PORT: u16 = 8472;
/// Outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14) headers.
const OVERHEAD: u32 = 50;
/// VNIs are 24 bits.
const MAX_VNI: u32 = (1 << 24) - 1;
/// Interface names hold at most 15 bytes: `flannel.` leaves 7 digits for the VNI.
const MAX_NAME_LEN: usize = 15;
/// The smallest IPv4 MTU (RFC 791) the device may get.
const MIN_DEVICE_MTU: u32 = 68;

/// `Backend.*` fields of the vxlan backend, as Go Flannel reads them.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Config {
    vni: u32,
    port: u16,
    gbp: bool,
    learning: bool,
    direct_routing: bool,
    /// `Backend.MTU`: the underlay MTU to assume (Flannel's meaning); the device gets 50 less.
    /// Defaults to the underlay interface's MTU.
    underlay_mtu: u32,
}

/// `Backend.<name>`, matched case-insensitively as Go's JSON decoding does.
fn field<'a>(backend: &'a Value, name: &str) -> Option<&'a Value> {
    super::json_field(backend, name)
}

fn bool_field(backend: &Value, name: &str) -> Result<bool, BackendError> {
    match field(backend, name) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(BackendError::Config(format!(
            "field \"Backend.{name}\": {v} is not true or false"
        ))),
    }
}

fn uint_field(backend: &Value, name: &str, default: u32, max: u32) -> Result<u32, BackendError> {
    match field(backend, name) {
        None => Ok(default),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n <= max)
            .ok_or_else(|| {
                BackendError::Config(format!(
                    "field \"Backend.{name}\": {v} is not a whole number from 0 to {max}"
                ))
            }),
    }
}

impl Config {
    fn parse(network: &NetworkConfig, iface_mtu: u32) -> Result<Self, BackendError> {
        let b = &network.backend;
        let vni = uint_field(b, "VNI", DEFAULT_VNI, MAX_VNI)?;
        if device_name(vni).len() > MAX_NAME_LEN {
            return Err(BackendError::Config(format!(
                "field \"Backend.VNI\": {vni} makes the device name {:?} longer than the \
                 kernel's 15 characters (use a VNI below 10000000)",
                device_name(vni)
            )));
        }
        let underlay_mtu = uint_field(b, "MTU", iface_mtu, u32::MAX)?;
        if underlay_mtu < MIN_DEVICE_MTU + OVERHEAD || underlay_mtu > iface_mtu {
            return Err(BackendError::Config(format!(
                "field \"Backend.MTU\": {underlay_mtu} must lie between {} and the underlay \
                 interface's MTU {iface_mtu} (the device gets MTU - {OVERHEAD})",
                MIN_DEVICE_MTU + OVERHEAD
            )));
        }
        Ok(Config {
            vni,
            port: backend_port(network, "Port", DEFAULT_PORT)?,
            gbp: bool_field(b, "GBP")?,
            learning: bool_field(b, "Learning")?,
            direct_routing: bool_field(b, "DirectRouting")?,
            underlay_mtu,
        })
    }

    fn device_mtu(&self) -> u32 {
        self.underlay_mtu - OVERHEAD
    }
}

fn device_name(vni: u32) -> String {
    format!("flannel.{vni}")
}

/// Parses a MAC the way Go's `net.ParseMAC` does for 6-byte addresses:
/// `aa:bb:cc:dd:ee:ff`, `aa-bb-cc-dd-ee-ff` or `aabb.ccdd.eeff`.
fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let hex_byte = |p: &str| {
        (p.len() == 2 && p.bytes().all(|c| c.is_ascii_hexdigit()))
            .then(|| u8::from_str_radix(p, 16).ok())
            .flatten()
    };
    let mut mac = [0u8; 6];
    if s.len() == 17 {
        let sep = if s.as_bytes().get(2) == Some(&b'-') {
            '-'
        } else {
            ':'
        };
        let parts: Vec<&str> = s.split(sep).collect();
        if parts.len() != 6 {
            return None;
        }
        for (m, p) in mac.iter_mut().zip(parts) {
            *m = hex_byte(p)?;
        }
        return Some(mac);
    }
    if s.len() == 14 {
        let groups: Vec<&str> = s.split('.').collect();
        if groups.len() != 3 || groups.iter().any(|g| g.len() != 4) {
            return None;
        }
        for (i, g) in groups.iter().enumerate() {
            mac[2 * i] = hex_byte(g.get(..2)?)?;
            mac[2 * i + 1] = hex_byte(g.get(2..)?)?;
        }
        return Some(mac);
    }
    None
}

/// Our VtepMAC for a device we create: locally administered, unicast, and a function of the
/// PublicIP (unique per node, Flannel's identity) and the VNI, so that a reboot or a recreated
/// device announces the same MAC and peers' entries stay valid.
fn derived_mac(public_ip: Ipv4Addr, vni: u32) -> [u8; 6] {
    let ip = public_ip.octets();
    [0x0e, (vni & 0xff) as u8, ip[0], ip[1], ip[2], ip[3]]
}

/// What a peer's lease says about its VTEP.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PeerVtep {
    /// Absent in leases of old Flannel versions, which published only the MAC.
    vni: Option<u64>,
    mac: [u8; 6],
}

/// Reads `{"VNI":…,"VtepMAC":"…"}`; an error names the field.
fn parse_backend_data(data: Option<&Value>) -> Result<PeerVtep, String> {
    let Some(data) = data.filter(|d| !d.is_null()) else {
        return Err("BackendData is missing (a vxlan lease needs {\"VtepMAC\":…})".into());
    };
    if !data.is_object() {
        return Err(format!("BackendData: {data} is not an object"));
    }
    let vni = match field(data, "VNI") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|n| *n <= u64::from(MAX_VNI))
                .ok_or_else(|| format!("BackendData.VNI: {v} is not a VNI"))?,
        ),
    };
    let mac = match field(data, "VtepMAC") {
        None => return Err("BackendData.VtepMAC is missing".into()),
        Some(Value::String(s)) => parse_mac(s)
            .ok_or_else(|| format!("BackendData.VtepMAC: {s:?} is not a MAC address"))?,
        Some(v) => return Err(format!("BackendData.VtepMAC: {v} is not a string")),
    };
    // A group or all-zero MAC in the FDB would turn the entry into a flooding default.
    if mac[0] & 1 == 1 || mac == [0; 6] {
        return Err(format!(
            "BackendData.VtepMAC: {} is not a unicast MAC address",
            format_mac(&mac)
        ));
    }
    Ok(PeerVtep { vni, mac })
}

/// One link-layer object we install on the VXLAN device for a peer (its routes are kept by
/// the shared [`PeerRoutes`]).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Entry {
    /// Permanent ARP entry on the VXLAN device: peer's lease network address -> its VtepMAC.
    Neighbour { ip: Ipv4Addr, mac: [u8; 6] },
    /// FDB entry on the VXLAN device: VtepMAC -> peer's PublicIP.
    Fdb { mac: [u8; 6], dst: Ipv4Addr },
}

impl Entry {
    /// Whether two entries are the same kernel object, which a replace overwrites in place:
    /// the neighbour table is keyed by IP, the FDB by MAC.
    fn same_object(&self, other: &Entry) -> bool {
        match (self, other) {
            (Entry::Neighbour { ip: a, .. }, Entry::Neighbour { ip: b, .. }) => a == b,
            (Entry::Fdb { mac: a, .. }, Entry::Fdb { mac: b, .. }) => a == b,
            _ => false,
        }
    }
}

/// What a peer's lease calls for: link-layer entries, then routes (a route goes in last, so
/// the kernel never resolves its gateway itself, and comes out first).
#[derive(Debug, Default)]
struct Wanted {
    entries: Vec<Entry>,
    routes: Vec<PeerRoute>,
}

/// A peer's lease turned into entries, or the reason it cannot be.
fn peer_error(peer: &Lease, reason: impl Into<String>) -> BackendError {
    BackendError::Peer {
        peer: peer.key.to_string(),
        reason: reason.into(),
    }
}

pub struct Vxlan {
    netlink: Netlink,
    node: NodeInfo,
    network: NetworkConfig,
    cfg: Config,
    /// `flannel.<VNI>` as found or created in `new`.
    dev: LinkDetails,
    mac: [u8; 6],
    /// The neighbour and FDB entries we installed, per peer lease, in installation order.
    installed: HashMap<SubnetKey, Vec<Entry>>,
    /// The routes we installed, per peer lease.
    routes: PeerRoutes,
    /// The peers' leases, to program again on a recreated device.
    leases: HashMap<SubnetKey, Lease>,
    /// Our lease, to address a recreated device.
    own: Option<Lease>,
}

impl Vxlan {
    /// Parses the config and finds or creates `flannel.<VNI>`: its MAC goes into our lease.
    pub async fn new(network: &NetworkConfig, node: &NodeInfo) -> Result<Self, BackendError> {
        if !network.enable_ipv4 || network.network.is_none() {
            return Err(BackendError::Config(
                "the vxlan backend needs an IPv4 Network".into(),
            ));
        }
        if network.enable_ipv6 {
            // Go Flannel publishes BackendV6Data for a second device flannel-v6.<VNI>; a lease
            // without it would make Go peers skip us entirely, so refuse rather than half-work.
            return Err(BackendError::Config(
                "EnableIPv6 is not supported by flanneld-rs's vxlan backend yet".into(),
            ));
        }
        let cfg = Config::parse(network, node.iface.mtu)?;
        let netlink = Netlink::open()?;
        let routes_netlink = netlink.clone();
        let local = local_address(&netlink, node).await?;
        let dev = ensure_device(&netlink, &cfg, node, local, None).await?;
        let mac = <[u8; 6]>::try_from(dev.mac.as_slice()).map_err(|_| {
            BackendError::Config(format!(
                "{} has no 6-byte MAC address ({})",
                dev.link.name,
                format_mac(&dev.mac)
            ))
        })?;
        tracing::info!(
            device = %dev.link.name,
            vni = cfg.vni,
            port = cfg.port,
            %local,
            vtep_mac = %format_mac(&mac),
            mtu = cfg.device_mtu(),
            gbp = cfg.gbp,
            direct_routing = cfg.direct_routing,
            "vxlan device ready"
        );
        Ok(Vxlan {
            netlink,
            node: node.clone(),
            network: network.clone(),
            cfg,
            dev,
            mac,
            installed: HashMap::new(),
            routes: PeerRoutes::new(routes_netlink),
            leases: HashMap::new(),
            own: None,
        })
    }

    /// Recreates `flannel.<VNI>` with the MAC peers know us by (Flannel #2247 recreates it with
    /// a new one and leaves peers stale), readdresses it and programs every peer again.
    async fn recreate_device(&mut self) -> Result<usize, BackendError> {
        let local = local_address(&self.netlink, &self.node).await?;
        self.dev =
            ensure_device(&self.netlink, &self.cfg, &self.node, local, Some(self.mac)).await?;
        if let Some(own) = self.own.clone() {
            self.start(&own).await?;
        }
        // The old entries and routes died with the old device (and named its index).
        self.installed.clear();
        self.routes.forget_all();
        let peers: Vec<Lease> = self.leases.values().cloned().collect();
        let mut restored = 1;
        for p in &peers {
            match self.add_peer(p).await {
                Ok(()) => {
                    restored += self.installed.get(&p.key).map_or(0, Vec::len);
                    restored += self.routes.count(&p.key);
                }
                Err(e) => tracing::warn!("{e}"),
            }
        }
        Ok(restored)
    }

    /// Whether an entry we installed is still in the kernel.
    fn present(e: &Entry, neigh: &[Neighbour], fdb: &[FdbEntry]) -> bool {
        match e {
            Entry::Neighbour { ip, mac } => neigh
                .iter()
                .any(|n| n.ip == IpAddr::V4(*ip) && n.mac.as_slice() == mac.as_slice()),
            Entry::Fdb { mac, dst } => fdb
                .iter()
                .any(|f| f.mac.as_slice() == mac.as_slice() && f.dst == Some(IpAddr::V4(*dst))),
        }
    }

    fn index(&self) -> u32 {
        self.dev.link.index
    }

    /// The entries and routes a peer's lease calls for.
    async fn plan(&self, peer: &Lease) -> Result<Wanted, BackendError> {
        let subnet = peer
            .key
            .ipv4
            .ok_or_else(|| peer_error(peer, "ignored: the lease has no IPv4 subnet"))?;
        let public_ip = peer.attrs.public_ip;
        if public_ip.is_unspecified() {
            return Err(peer_error(peer, "ignored: PublicIP is missing"));
        }
        let vtep = parse_backend_data(peer.attrs.backend_data.as_ref())
            .map_err(|e| peer_error(peer, e))?;
        if let Some(vni) = vtep.vni.filter(|v| *v != u64::from(self.cfg.vni)) {
            return Err(peer_error(
                peer,
                format!(
                    "BackendData.VNI: {vni} differs from ours ({})",
                    self.cfg.vni
                ),
            ));
        }
        if vtep.mac == self.mac && public_ip == self.node.public_ip {
            return Err(peer_error(
                peer,
                "ignored: it carries our own PublicIP and VtepMAC (an old lease of this node)",
            ));
        }
        if self.cfg.direct_routing {
            match self.netlink.route_to(public_ip).await {
                Ok(r) if r.gateway.is_none() => {
                    if let Some(oif) = r.oif {
                        return Ok(Wanted {
                            entries: Vec::new(),
                            routes: vec![PeerRoute {
                                dst: IpNet::V4(subnet),
                                via: IpAddr::V4(public_ip),
                                oif,
                                onlink: false,
                            }],
                        });
                    }
                }
                Ok(_) => {}
                // As Flannel: without an answer, encapsulate (works whatever the topology).
                Err(e) => tracing::warn!(
                    peer = %peer.key,
                    "DirectRouting: {e}; using VXLAN for this peer"
                ),
            }
        }
        Ok(Wanted {
            entries: vec![
                Entry::Neighbour {
                    ip: subnet.network(),
                    mac: vtep.mac,
                },
                Entry::Fdb {
                    mac: vtep.mac,
                    dst: public_ip,
                },
            ],
            routes: vec![PeerRoute {
                dst: IpNet::V4(subnet),
                via: IpAddr::V4(subnet.network()),
                oif: self.index(),
                onlink: true,
            }],
        })
    }

    async fn install(&self, e: &Entry) -> Result<(), BackendError> {
        let idx = self.index();
        match e {
            Entry::Neighbour { ip, mac } => {
                self.netlink
                    .replace_neighbour(idx, IpAddr::V4(*ip), *mac)
                    .await?
            }
            Entry::Fdb { mac, dst } => {
                self.netlink
                    .replace_fdb(idx, *mac, IpAddr::V4(*dst))
                    .await?
            }
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
        let idx = self.index();
        match e {
            Entry::Neighbour { ip, .. } => {
                self.netlink
                    .delete_neighbour(idx, IpAddr::V4(*ip))
                    .await?
            }
            Entry::Fdb { mac, dst } => {
                self.netlink
                    .delete_fdb(idx, *mac, Some(IpAddr::V4(*dst)))
                    .await?
            }
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

    fn in_network(&self, dst: &IpNet) -> bool {
        match dst {
            IpNet::V4(d) => self.network.network.is_some_and(|n| n.contains(d)),
            IpNet::V6(_) => false,
        }
    }

    /// Deletes neighbours, FDB entries and routes of ours that none of `wanted` justifies.
    async fn sweep_stale(
        &self,
        wanted: &[Entry],
        wanted_routes: &[OwnRoute],
    ) -> Result<(), BackendError> {
        let idx = self.index();
        let want_neigh = |ip: IpAddr| {
            wanted
                .iter()
                .any(|e| matches!(e, Entry::Neighbour { ip: w, .. } if IpAddr::V4(*w) == ip))
        };
        let want_mac = |mac: &[u8]| {
            wanted
                .iter()
                .any(|e| matches!(e, Entry::Fdb { mac: w, .. } if w.as_slice() == mac))
        };
        let want_route = |dst: &IpNet| wanted_routes.iter().any(|r| r.dst == *dst);

        // Routes first, so traffic never meets a route whose neighbour is gone.
        let mut routes = self.netlink.routes_on_link(idx).await?;
        routes.extend(
            self.netlink
                .own_routes()
                .await?
                .into_iter()
                .filter(|r| r.oif == Some(self.node.iface.index)),
        );
        for r in routes {
            if self.in_network(&r.dst) && !want_route(&r.dst) {
                tracing::info!(route = %r.dst, "removing a stale route no lease justifies");
                if r.oif == Some(idx) {
                    self.netlink.delete_route_any_protocol(&r).await?;
                } else {
                    self.netlink.delete_route(&r).await?;
                }
            }
        }
        for f in self.netlink.fdb_entries(idx).await? {
            // Entries the kernel learned (Learning on) age out by themselves.
            if !f.permanent || want_mac(&f.mac) {
                continue;
            }
            if let Ok(mac) = <[u8; 6]>::try_from(f.mac.as_slice()) {
                tracing::info!(mac = %format_mac(&mac), dst = ?f.dst, "removing a stale FDB entry");
                self.netlink.delete_fdb(idx, mac, f.dst).await?;
            }
        }
        for n in self.netlink.neighbours(idx).await? {
            if n.permanent && !want_neigh(n.ip) {
                tracing::info!(ip = %n.ip, "removing a stale neighbour entry");
                self.netlink.delete_neighbour(idx, n.ip).await?;
            }
        }
        Ok(())
    }
}

/// The address VXLAN packets leave from: the underlay interface's own IPv4 address, which is
/// the PublicIP unless `--public-ip` names another (e.g. behind NAT), as with Flannel.
async fn local_address(netlink: &Netlink, node: &NodeInfo) -> Result<Ipv4Addr, BackendError> {
    let on_iface: Vec<Ipv4Addr> = netlink
        .addresses()
        .await?
        .into_iter()
        .filter(|(i, _)| *i == node.iface.index)
        .filter_map(|(_, a)| match a {
            IpNet::V4(n) => Some(n.addr()),
            IpNet::V6(_) => None,
        })
        .collect();
    if on_iface.contains(&node.public_ip) {
        return Ok(node.public_ip);
    }
    on_iface.first().copied().ok_or_else(|| {
        BackendError::Config(format!(
            "interface {} has no IPv4 address for VXLAN to send from",
            node.iface.name
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

/// Reuses `flannel.<VNI>` if it matches (its MAC is what peers know us by), else recreates it,
/// keeping its MAC when it had one.
async fn ensure_device(
    netlink: &Netlink,
    cfg: &Config,
    node: &NodeInfo,
    local: Ipv4Addr,
    keep_mac: Option<[u8; 6]>,
) -> Result<LinkDetails, BackendError> {
    let name = device_name(cfg.vni);
    let mut spec = VxlanSpec {
        name: name.clone(),
        vni: cfg.vni,
        port: cfg.port,
        local: IpAddr::V4(local),
        dev: node.iface.index,
        learning: cfg.learning,
        gbp: cfg.gbp,
        mac: keep_mac.unwrap_or_else(|| derived_mac(node.public_ip, cfg.vni)),
        mtu: cfg.device_mtu(),
    };
    if let Some(have) = netlink.link_details(&name).await? {
        match incompatibility(&have, &spec) {
            None => {
                tracing::info!(device = %name, mac = %format_mac(&have.mac), "reusing the existing VXLAN device and its MAC");
                return Ok(have);
            }
            Some(why) => {
                tracing::warn!(device = %name, "existing device does not match the config ({why}): recreating it");
                if let Ok(mac) = <[u8; 6]>::try_from(have.mac.as_slice()) {
                    if mac[0] & 1 == 0 && mac != [0; 6] {
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

    fn mtu(&self) -> u32 {
        // The device's MTU: the underlay's (or Backend.MTU) less VXLAN's 50 bytes.
        self.cfg.device_mtu()
    }

    fn lease_data(&self) -> LeaseData {
        let mut data = serde_json::Map::new();
        data.insert("VNI".into(), Value::from(self.cfg.vni));
        data.insert("VtepMAC".into(), Value::from(format_mac(&self.mac)));
        LeaseData {
            backend_type: Some(TYPE.to_string()),
            backend_data: Some(Value::Object(data)),
            backend_v6_data: None,
        }
    }

    async fn start(&mut self, own: &Lease) -> Result<(), BackendError> {
        let subnet = own
            .key
            .ipv4
            .ok_or_else(|| BackendError::Config("the vxlan backend needs an IPv4 lease".into()))?;
        // A /32 so that the kernel makes no broadcast or subnet routes on the device; it is the
        // source address for host-to-pod traffic across nodes.
        let addr = Ipv4Net::new(subnet.network(), 32).map_err(|e| {
            BackendError::Config(format!("address for {}: {e}", self.dev.link.name))
        })?;
        self.own = Some(own.clone());
        self.netlink
            .set_sole_address(self.index(), IpNet::V4(addr))
            .await?;
        self.netlink
            .set_mtu_up(self.index(), self.cfg.device_mtu())
            .await?;
        // As Flannel: the device must not configure itself from router advertisements. Best
        // effort, since IPv6 may be disabled on the host.
        let ra = format!("/proc/sys/net/ipv6/conf/{}/accept_ra", self.dev.link.name);
        if let Err(e) = std::fs::write(&ra, "0") {
            tracing::debug!("setting {ra}: {e}");
        }
        Ok(())
    }

    async fn add_peer(&mut self, peer: &Lease) -> Result<(), BackendError> {
        let wanted = match self.plan(peer).await {
            Ok(w) => {
                self.leases.insert(peer.key.clone(), peer.clone());
                w
            }
            Err(e) => {
                // A lease that changed into something unusable must not leave its old entries.
                if let Err(rm) = self.remove_peer(peer).await {
                    tracing::warn!(peer = %peer.key, "removing its previous entries: {rm}");
                }
                return Err(e);
            }
        };
        self.remove_entries(&peer.key, &wanted.entries).await?;
        let mut done = Vec::new();
        let mut result = Ok(());
        for e in &wanted.entries {
            match self.install(e).await {
                Ok(()) => done.push(e.clone()),
                Err(err) => {
                    result = Err(peer_error(peer, err.to_string()));
                    break;
                }
            }
        }
        // Whatever went in is recorded, so that removing the peer later takes it out again.
        self.installed.insert(peer.key.clone(), done);
        // Routes only over complete entries: otherwise none (the old one may point at them).
        let routes = if result.is_ok() {
            wanted.routes.clone()
        } else {
            Vec::new()
        };
        if let Err(e) = self.routes.set(&peer.key, routes).await {
            result = result.and(Err(peer_error(peer, e.to_string())));
        }
        if result.is_ok() {
            tracing::debug!(peer = %peer.key, public_ip = %peer.attrs.public_ip, entries = ?wanted, "peer programmed");
        }
        result
    }

    async fn remove_peer(&mut self, peer: &Lease) -> Result<(), BackendError> {
        self.leases.remove(&peer.key);
        // Route first, so that no route is ever left pointing at a missing neighbour.
        let routes = self.routes.remove(&peer.key).await;
        self.remove_entries(&peer.key, &[]).await?;
        Ok(routes?)
    }

    fn device_name(&self) -> Option<String> {
        Some(self.dev.link.name.clone())
    }

    fn wanted_routes(&self) -> Vec<OwnRoute> {
        self.routes.wanted()
    }

    async fn repair(&mut self) -> Result<usize, BackendError> {
        let now = self.netlink.link_details(&self.dev.link.name).await?;
        if now.as_ref().map(|d| d.link.index) != Some(self.index()) {
            tracing::warn!(device = %self.dev.link.name, mac = %format_mac(&self.mac), "our VXLAN device was deleted: recreating it with the same MAC");
            return self.recreate_device().await;
        }
        let idx = self.index();
        let mut restored = 0;
        if let Some(own) = self.own.clone() {
            let addr = own.key.ipv4.map(|n| n.network());
            let has_addr = self
                .netlink
                .addresses()
                .await?
                .iter()
                .any(|(i, a)| *i == idx && Some(a.addr()) == addr.map(IpAddr::V4));
            if !has_addr {
                tracing::warn!(device = %self.dev.link.name, "our VXLAN device lost its address: restoring it");
                self.start(&own).await?;
                restored += 1;
            }
        }
        let neigh = self.netlink.neighbours(idx).await?;
        let fdb = self.netlink.fdb_entries(idx).await?;
        let missing: Vec<Entry> = self
            .installed
            .values()
            .flatten()
            .filter(|e| !Self::present(e, &neigh, &fdb))
            .cloned()
            .collect();
        for e in &missing {
            tracing::warn!(entry = ?e, "an entry of ours was deleted: restoring it");
            self.install(e).await?;
            restored += 1;
        }
        Ok(restored + self.routes.repair().await?)
    }

    async fn reconcile(&mut self, peers: &[Lease]) -> Result<(), BackendError> {
        let (mut entries, mut routes) = (Vec::new(), Vec::new());
        for p in peers {
            if let Ok(w) = self.plan(p).await {
                entries.extend(w.entries);
                routes.extend(w.routes.iter().map(PeerRoute::as_own));
            }
        }
        if let Err(e) = self.sweep_stale(&entries, &routes).await {
            tracing::warn!("removing stale entries from {}: {e}", self.dev.link.name);
        }
        let mut first_err = Ok(());
        for p in peers {
            if let Err(e) = self.add_peer(p).await {
                tracing::warn!("{e}");
                if first_err.is_ok() {
                    first_err = Err(e);
                }
            }
        }
        first_err
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn network(backend: Value) -> NetworkConfig {
        let text = json!({"Network": "10.244.0.0/16", "Backend": backend}).to_string();
        NetworkConfig::parse(text.as_bytes()).expect("config")
    }

    #[test]
    fn config_defaults_and_fields() {
        let c = Config::parse(&network(json!({"Type": "vxlan"})), 1500).expect("cfg");
        assert_eq!(
            c,
            Config {
                vni: 1,
                port: 8472,
                gbp: false,
                learning: false,
                direct_routing: false,
                underlay_mtu: 1500
            }
        );
        assert_eq!(c.device_mtu(), 1450);
        let c = Config::parse(
            &network(
                json!({"type": "vxlan", "vni": 42, "port": 4789, "gbp": true,
                "directrouting": true, "MTU": 1400, "Learning": null}),
            ),
            1500,
        )
        .expect("cfg");
        assert_eq!(
            (c.vni, c.port, c.gbp, c.direct_routing),
            (42, 4789, true, true)
        );
        assert_eq!(c.device_mtu(), 1350);
    }

    #[test]
    fn config_errors_name_the_field() {
        let err = |b: Value| {
            Config::parse(&network(b), 1500)
                .expect_err("must fail")
                .to_string()
        };
        assert!(err(json!({"Type": "vxlan", "VNI": -1})).contains("Backend.VNI"));
        assert!(err(json!({"Type": "vxlan", "VNI": 1 << 24})).contains("Backend.VNI"));
        assert!(err(json!({"Type": "vxlan", "VNI": 10_000_000})).contains("15 characters"));
        assert!(err(json!({"Type": "vxlan", "Port": 70000})).contains("Backend.Port"));
        assert!(err(json!({"Type": "vxlan", "GBP": "yes"})).contains("Backend.GBP"));
        assert!(err(json!({"Type": "vxlan", "DirectRouting": 1})).contains("Backend.DirectRouting"));
        assert!(err(json!({"Type": "vxlan", "MTU": 9000})).contains("Backend.MTU"));
        assert!(err(json!({"Type": "vxlan", "MTU": 100})).contains("Backend.MTU"));
    }

    #[test]
    fn macs_parse_like_go() {
        let want = Some([0xaa, 0xbb, 0xcc, 0x0d, 0xee, 0xff]);
        assert_eq!(parse_mac("aa:bb:cc:0d:ee:ff"), want);
        assert_eq!(parse_mac("AA-BB-CC-0D-EE-FF"), want);
        assert_eq!(parse_mac("aabb.cc0d.eeff"), want);
        for bad in [
            "",
            "zz:zz",
            "aa:bb:cc:dd:ee",
            "aa:bb:cc:dd:ee:f",
            "aa:bb:cc:dd:ee:fg",
            "aa:bb-cc:dd:ee:ff",
            "aa:bb:cc:dd:ee:ff:00:11",
            "+a:bb:cc:dd:ee:ff",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
        assert_eq!(format_mac(&[0x0e, 1, 172, 30, 0, 11]), "0e:01:ac:1e:00:0b");
    }

    #[test]
    fn derived_mac_is_local_unicast_and_stable() {
        let ip: Ipv4Addr = "172.30.0.11".parse().expect("ip");
        let m = derived_mac(ip, 1);
        assert_eq!(m, derived_mac(ip, 1));
        assert_eq!(m[0] & 0b11, 0b10, "locally administered, unicast");
        assert_ne!(m, derived_mac("172.30.0.12".parse().expect("ip"), 1));
        assert_ne!(m, derived_mac(ip, 2));
    }

    #[test]
    fn backend_data_is_checked_field_by_field() {
        let ok = parse_backend_data(Some(&json!({"VNI": 1, "VtepMAC": "0e:01:ac:1e:00:0b"})))
            .expect("valid");
        assert_eq!(ok.vni, Some(1));
        assert_eq!(ok.mac, [0x0e, 1, 172, 30, 0, 11]);
        // Old Flannel wrote only the MAC; Go decodes field names case-insensitively.
        let old = parse_backend_data(Some(&json!({"vtepmac": "0e:01:ac:1e:00:0b"}))).expect("old");
        assert_eq!(old.vni, None);
        for (data, field) in [
            (None, "BackendData is missing"),
            (Some(json!(null)), "BackendData is missing"),
            (Some(json!("x")), "not an object"),
            (Some(json!({"VNI": 1})), "VtepMAC is missing"),
            (
                Some(json!({"VNI": 1, "VtepMAC": "zz:zz"})),
                "VtepMAC: \"zz:zz\"",
            ),
            (Some(json!({"VNI": 1, "VtepMAC": 7})), "VtepMAC: 7"),
            (
                Some(json!({"VNI": 1, "VtepMAC": "01:00:5e:00:00:01"})),
                "unicast",
            ),
            (
                Some(json!({"VNI": 1, "VtepMAC": "00:00:00:00:00:00"})),
                "unicast",
            ),
            (
                Some(json!({"VNI": "1", "VtepMAC": "0e:01:ac:1e:00:0b"})),
                "BackendData.VNI",
            ),
        ] {
            let e = parse_backend_data(data.as_ref()).expect_err("must fail");
            assert!(e.contains(field), "{e:?} should mention {field:?}");
        }
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
