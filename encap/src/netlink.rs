//! The few rtnetlink operations the backends and the daemon need, with errors that say what
//! was being done. No `ip` processes: everything goes through one netlink socket.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder};
use thiserror::Error;

/// Routes we install carry this protocol number, so we can tell ours from an operator's and
/// remove only ours when they go stale (`ip route` shows it as `proto 70`).
pub const ROUTE_PROTOCOL: u8 = 70;

#[derive(Debug, Error)]
pub enum NetlinkError {
    #[error("opening a netlink socket: {0}")]
    Open(#[source] std::io::Error),
    #[error("{what}: {source}")]
    Op {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("no interface named {0:?}")]
    NoSuchLink(String),
    #[error("a route to {dst} exists that we did not install (protocol {protocol}): left alone")]
    NotOurs { dst: IpNet, protocol: u8 },
}

fn op(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let what = what.into();
    move |source| NetlinkError::Op { what, source }
}

/// Deletes are idempotent: the kernel's "already gone" (`gone`, an errno) counts as done.
fn gone_is_ok(
    r: Result<(), rtnetlink::Error>,
    gone: i32,
    what: impl FnOnce() -> String,
) -> Result<(), NetlinkError> {
    match r {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -gone => Ok(()),
        Err(source) => Err(NetlinkError::Op {
            what: what(),
            source,
        }),
        Ok(()) => Ok(()),
    }
}

/// A network interface as the daemon sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
}

/// A route we installed: destination, gateway and outgoing interface, or a blackhole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnRoute {
    pub dst: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    /// `blackhole dst` (`--ip-blackhole-route`): no gateway, no device.
    pub blackhole: bool,
}

/// The metric of our blackhole routes: above any real route's, so a device route to the same
/// subnet (the pods' bridge, with metric 0) always wins, whichever came first, and the
/// blackhole only catches what nothing else takes instead of it leaving by the default route.
pub const BLACKHOLE_METRIC: u32 = 4242;

/// The answer of a route lookup (`ip route get`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteLookup {
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    /// The source address the kernel would pick (`src` in `ip route get`).
    pub source: Option<IpAddr>,
}

/// A link with its MAC address and kind (`vxlan`, `veth`, …).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkDetails {
    pub link: Link,
    pub mac: Vec<u8>,
    pub kind: Option<String>,
    /// Set when the link is a VXLAN device.
    pub vxlan: Option<VxlanAttrs>,
}

/// The VXLAN attributes that decide whether an existing device can be kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VxlanAttrs {
    pub vni: Option<u32>,
    pub port: Option<u16>,
    pub local: Option<IpAddr>,
    /// The underlay link (`dev`).
    pub dev: Option<u32>,
    pub learning: bool,
    pub gbp: bool,
}

impl VxlanAttrs {
    fn from_info(infos: &[InfoVxlan]) -> Self {
        let mut v = VxlanAttrs::default();
        for i in infos {
            match i {
                InfoVxlan::Id(id) => v.vni = Some(*id),
                InfoVxlan::Port(p) => v.port = Some(*p),
                InfoVxlan::Local(ip) => v.local = Some(IpAddr::V4(*ip)),
                InfoVxlan::Local6(ip) => v.local = Some(IpAddr::V6(*ip)),
                InfoVxlan::Link(l) => v.dev = Some(*l),
                InfoVxlan::Learning(l) => v.learning = *l,
                InfoVxlan::Gbp => v.gbp = true,
                _ => {}
            }
        }
        v
    }
}

/// A VXLAN device to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    /// The underlay address VXLAN packets leave from; its family is the device's (an IPv6
    /// `local` makes the kernel encapsulate in IPv6).
    pub local: IpAddr,
    /// Index of the underlay link.
    pub dev: u32,
    pub learning: bool,
    pub gbp: bool,
    pub mac: [u8; 6],
    pub mtu: u32,
}

/// A neighbour entry (ARP for IPv4, NDP for IPv6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub ip: IpAddr,
    pub mac: Vec<u8>,
    pub permanent: bool,
}

/// A forwarding database entry of a VXLAN device: frames for `mac` go to `dst`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FdbEntry {
    pub mac: Vec<u8>,
    pub dst: Option<IpAddr>,
    pub permanent: bool,
}

/// `aa:bb:cc:dd:ee:ff`, as `ip` and Go's `net.HardwareAddr` print it.
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `NUD_PERMANENT` may come combined with other state bits (`bridge fdb … permanent` adds
/// `NUD_NOARP`), which the parsed enum reports as `Other`.
fn is_permanent(state: NeighbourState) -> bool {
    u16::from(state) & u16::from(NeighbourState::Permanent) != 0
}

/// An FDB dump carries its destination as raw bytes (the message's family is AF_BRIDGE).
fn neighbour_ip(a: &NeighbourAddress) -> Option<IpAddr> {
    match a {
        NeighbourAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        NeighbourAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        NeighbourAddress::Other(b) => match b.len() {
            4 => <[u8; 4]>::try_from(b.as_slice())
                .ok()
                .map(|o| IpAddr::V4(Ipv4Addr::from(o))),
            16 => <[u8; 16]>::try_from(b.as_slice())
                .ok()
                .map(|o| IpAddr::V6(Ipv6Addr::from(o))),
            _ => None,
        },
        _ => None,
    }
}

/// A dumped ARP or NDP entry; `None` for one without an IP destination.
fn parse_neighbour(m: &NeighbourMessage) -> Option<Neighbour> {
    let mut ip = None;
    let mut mac = Vec::new();
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                ip = Some(IpAddr::V4(*v4))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                ip = Some(IpAddr::V6(*v6))
            }
            NeighbourAttribute::LinkLayerAddress(l) => mac = l.clone(),
            _ => {}
        }
    }
    Some(Neighbour {
        ip: ip?,
        mac,
        permanent: is_permanent(m.header.state),
    })
}

/// The table of a route: the header's 8-bit field, or the `RTA_TABLE` attribute for ids > 255.
fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

/// Destination, gateway and outgoing interface of a dumped route.
fn parse_route(r: &RouteMessage) -> Option<OwnRoute> {
    let mut dst = None;
    let mut gateway = None;
    let mut oif = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
                dst = IpNet::new(IpAddr::V4(*ip), r.header.destination_prefix_length).ok()
            }
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => {
                dst = IpNet::new(IpAddr::V6(*ip), r.header.destination_prefix_length).ok()
            }
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(IpAddr::V4(*ip)),
            RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => gateway = Some(IpAddr::V6(*ip)),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let blackhole = r.header.kind == RouteType::BlackHole;
    Some(OwnRoute {
        dst: dst?,
        gateway,
        // The kernel lists IPv6 blackholes on `lo`; ours are made (and compared) without one.
        oif: oif.filter(|_| !blackhole),
        blackhole,
    })
}

#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens the socket; the connection task runs on the current tokio runtime.
    pub fn open() -> Result<Self, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Open)?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    pub async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let msgs: Vec<_> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(op("listing links"))?;
        Ok(msgs
            .into_iter()
            .map(|m| {
                let mut link = Link {
                    index: m.header.index,
                    name: String::new(),
                    mtu: 1500,
                };
                for attr in m.attributes {
                    match attr {
                        LinkAttribute::IfName(n) => link.name = n,
                        LinkAttribute::Mtu(mtu) => link.mtu = mtu,
                        _ => {}
                    }
                }
                link
            })
            .collect())
    }

    pub async fn link_by_name(&self, name: &str) -> Result<Link, NetlinkError> {
        self.links()
            .await?
            .into_iter()
            .find(|l| l.name == name)
            .ok_or_else(|| NetlinkError::NoSuchLink(name.to_string()))
    }

    /// Sets a link's MTU and brings it up.
    pub async fn set_mtu_up(&self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).up().build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(op(format!("setting MTU {mtu} and up on link {index}")))
    }

    /// Makes `addr` the only address of its family on the link: others are removed (a previous
    /// lease's), the wanted one added if missing.
    pub async fn set_sole_address(&self, index: u32, addr: IpNet) -> Result<(), NetlinkError> {
        let mut present = false;
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(op(format!("listing addresses of link {index}")))?;
        for m in msgs {
            let ip = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) | AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            let Some(ip) = ip else { continue };
            if ip.is_ipv4() != addr.addr().is_ipv4() {
                continue;
            }
            if ip == addr.addr() && m.header.prefix_len == addr.prefix_len() {
                present = true;
            } else {
                self.handle
                    .address()
                    .del(m)
                    .execute()
                    .await
                    .map_err(op(format!("removing old address {ip} from link {index}")))?;
            }
        }
        if !present {
            self.handle
                .address()
                .add(index, addr.addr(), addr.prefix_len())
                .execute()
                .await
                .map_err(op(format!("adding address {addr} to link {index}")))?;
        }
        Ok(())
    }

    /// Every address on the host with the index of its link, in the kernel's order.
    pub async fn addresses(&self) -> Result<Vec<(u32, IpNet)>, NetlinkError> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(op("listing addresses"))?;
        let mut out = Vec::new();
        for m in msgs {
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = local.or_else(|| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(ip) = addr {
                if let Ok(net) = IpNet::new(ip, m.header.prefix_len) {
                    out.push((m.header.index, net));
                }
            }
        }
        Ok(out)
    }

    /// The interface of the IPv4 default route, if any.
    pub async fn default_route_link(&self) -> Result<Option<u32>, NetlinkError> {
        let routes = self.routes(AddressFamily::Inet).await?;
        Ok(routes.iter().find_map(|r| {
            let is_default = r.header.destination_prefix_length == 0
                && r.header.table == RouteHeader::RT_TABLE_MAIN;
            let oif = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            if is_default {
                oif
            } else {
                None
            }
        }))
    }

    async fn routes(&self, family: AddressFamily) -> Result<Vec<RouteMessage>, NetlinkError> {
        let mut query = RouteMessage::default();
        query.header.address_family = family;
        self.handle
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .map_err(op("listing routes"))
    }

    /// Routes in the main table that carry our protocol number.
    pub async fn own_routes(&self) -> Result<Vec<OwnRoute>, NetlinkError> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            for r in self.routes(family).await? {
                // A route with our number in another table is someone else's business (and
                // our deletes, which name the main table, could never remove it).
                if r.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL)
                    || route_table(&r) != u32::from(RouteHeader::RT_TABLE_MAIN)
                {
                    continue;
                }
                if let Some(route) = parse_route(&r) {
                    out.push(route);
                }
            }
        }
        Ok(out)
    }

    /// Routes of both families in the main table that leave through link `index`, whoever
    /// made them (for a device that belongs to us alone, such as `flannel.<VNI>`).
    pub async fn routes_on_link(&self, index: u32) -> Result<Vec<OwnRoute>, NetlinkError> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            out.extend(
                self.routes(family)
                    .await?
                    .iter()
                    .filter(|r| route_table(r) == u32::from(RouteHeader::RT_TABLE_MAIN))
                    .filter_map(parse_route)
                    .filter(|r| r.oif == Some(index)),
            );
        }
        Ok(out)
    }

    /// Deletes a route whatever its protocol number (e.g. one Go Flannel left on
    /// `flannel.<VNI>`); a route that is already gone is not an error.
    pub async fn delete_route_any_protocol(&self, route: &OwnRoute) -> Result<(), NetlinkError> {
        let mut msg = Self::route_message(route.dst, route.gateway, route.oif.unwrap_or(0), false);
        // RTPROT_UNSPEC in a delete request matches routes of any protocol.
        msg.header.protocol = RouteProtocol::Unspec;
        self.del_route(msg, route.dst).await
    }

    async fn del_route(&self, msg: RouteMessage, dst: IpNet) -> Result<(), NetlinkError> {
        gone_is_ok(
            self.handle.route().del(msg).execute().await,
            libc::ESRCH,
            || format!("deleting route {dst}"),
        )
    }

    /// The kernel's route lookup for `ip` (`ip route get`): its gateway, if any, the
    /// outgoing interface and the source address. No gateway means `ip` is on a directly
    /// connected network.
    pub async fn route_to(&self, ip: impl Into<IpAddr>) -> Result<RouteLookup, NetlinkError> {
        let ip = ip.into();
        let mut query = RouteMessage::default();
        let (family, len, dst) = match ip {
            IpAddr::V4(a) => (AddressFamily::Inet, 32, RouteAddress::Inet(a)),
            IpAddr::V6(a) => (AddressFamily::Inet6, 128, RouteAddress::Inet6(a)),
        };
        query.header.address_family = family;
        query.header.destination_prefix_length = len;
        query.attributes.push(RouteAttribute::Destination(dst));
        let answers: Vec<RouteMessage> = self
            .handle
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .map_err(op(format!("looking up the route to {ip}")))?;
        let mut out = RouteLookup::default();
        let addr = |a: &RouteAddress| match a {
            RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
            RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
            _ => None,
        };
        for a in answers.iter().flat_map(|m| m.attributes.iter()) {
            match a {
                RouteAttribute::Gateway(g) => out.gateway = addr(g),
                RouteAttribute::PrefSource(s) => out.source = addr(s),
                RouteAttribute::Oif(i) => out.oif = Some(*i),
                _ => {}
            }
        }
        Ok(out)
    }

    /// A link's details by name, with its VXLAN attributes if it is one; `None` if there is no
    /// such link.
    pub async fn link_details(&self, name: &str) -> Result<Option<LinkDetails>, NetlinkError> {
        let msgs: Result<Vec<_>, _> = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_collect()
            .await;
        let msgs = match msgs {
            Ok(m) => m,
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
                return Ok(None)
            }
            Err(e) => {
                return Err(NetlinkError::Op {
                    what: format!("reading link {name}"),
                    source: e,
                })
            }
        };
        let Some(m) = msgs.into_iter().next() else {
            return Ok(None);
        };
        let mut d = LinkDetails {
            link: Link {
                index: m.header.index,
                name: name.to_string(),
                mtu: 1500,
            },
            mac: Vec::new(),
            kind: None,
            vxlan: None,
        };
        for attr in m.attributes {
            match attr {
                LinkAttribute::IfName(n) => d.link.name = n,
                LinkAttribute::Mtu(mtu) => d.link.mtu = mtu,
                LinkAttribute::Address(mac) => d.mac = mac,
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(k) => d.kind = Some(k.to_string()),
                            LinkInfo::Data(InfoData::Vxlan(v)) => {
                                d.vxlan = Some(VxlanAttrs::from_info(&v))
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if d.kind.as_deref() != Some(&InfoKind::Vxlan.to_string()) {
            d.vxlan = None;
        }
        Ok(Some(d))
    }

    /// Creates a VXLAN device (`ip link add NAME address MAC mtu MTU type vxlan id VNI local IP
    /// dev LINK dstport PORT [no]learning [gbp]`), down. Attributes not set keep the kernel's
    /// defaults, as Go Flannel's netlink library leaves them (UDP checksums included).
    pub async fn create_vxlan(&self, spec: &VxlanSpec) -> Result<(), NetlinkError> {
        let mut b = LinkVxlan::new(&spec.name, spec.vni)
            .dev(spec.dev)
            .port(spec.port)
            .learning(spec.learning);
        b = match spec.local {
            IpAddr::V4(a) => b.local(a),
            IpAddr::V6(a) => b.local6(a),
        };
        if spec.gbp {
            b = b.gbp();
        }
        let msg = b.address(spec.mac.to_vec()).mtu(spec.mtu).build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(op(format!(
                "creating VXLAN device {} (VNI {}, port {}, local {})",
                spec.name, spec.vni, spec.port, spec.local
            )))
    }

    /// Deletes a link; one that is already gone is not an error.
    pub async fn delete_link(&self, index: u32) -> Result<(), NetlinkError> {
        gone_is_ok(
            self.handle.link().del(index).execute().await,
            libc::ENODEV,
            || format!("deleting link {index}"),
        )
    }

    /// Every neighbour-table message of `family` (Inet: ARP, Bridge: FDB) on link `index`.
    async fn neighbour_dump(
        &self,
        family: AddressFamily,
        index: u32,
        what: &str,
    ) -> Result<Vec<NeighbourMessage>, NetlinkError> {
        let msgs: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await
            .map_err(op(what))?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.ifindex == index)
            .collect())
    }

    /// The neighbour entries of link `index`, IPv4 (ARP) then IPv6 (NDP).
    pub async fn neighbours(&self, index: u32) -> Result<Vec<Neighbour>, NetlinkError> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let msgs = self
                .neighbour_dump(family, index, "listing neighbours")
                .await?;
            out.extend(msgs.iter().filter_map(parse_neighbour));
        }
        Ok(out)
    }

    /// Adds or replaces the permanent neighbour entry `ip lladdr mac` on link `index`
    /// (`ip neigh replace IP lladdr MAC dev LINK nud permanent`).
    pub async fn replace_neighbour(
        &self,
        index: u32,
        ip: IpAddr,
        mac: [u8; 6],
    ) -> Result<(), NetlinkError> {
        self.handle
            .neighbours()
            .add(index, ip)
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .kind(RouteType::Unicast)
            .replace()
            .execute()
            .await
            .map_err(op(format!(
                "adding neighbour {ip} lladdr {} on link {index}",
                format_mac(&mac)
            )))
    }

    /// Deletes the neighbour entry for `ip` on link `index`; one already gone is not an error.
    pub async fn delete_neighbour(&self, index: u32, ip: IpAddr) -> Result<(), NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = match ip {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        msg.header.ifindex = index;
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::from(ip)));
        gone_is_ok(
            self.handle.neighbours().del(msg).execute().await,
            libc::ENOENT,
            || format!("deleting neighbour {ip} on link {index}"),
        )
    }

    /// The forwarding database entries of link `index` itself (`bridge fdb show dev LINK`,
    /// the `self` ones).
    pub async fn fdb_entries(&self, index: u32) -> Result<Vec<FdbEntry>, NetlinkError> {
        Ok(self
            .neighbour_dump(
                AddressFamily::Bridge,
                index,
                "listing forwarding database entries",
            )
            .await?
            .into_iter()
            .map(|m| {
                let mut entry = FdbEntry {
                    mac: Vec::new(),
                    dst: None,
                    permanent: is_permanent(m.header.state),
                };
                for a in &m.attributes {
                    match a {
                        NeighbourAttribute::LinkLayerAddress(l) => entry.mac = l.clone(),
                        NeighbourAttribute::Destination(d) => entry.dst = neighbour_ip(d),
                        _ => {}
                    }
                }
                entry
            })
            .collect())
    }

    /// Adds or replaces the permanent FDB entry `mac dst IP` on VXLAN link `index`
    /// (`bridge fdb replace MAC dev LINK dst IP self permanent`).
    pub async fn replace_fdb(
        &self,
        index: u32,
        mac: [u8; 6],
        dst: IpAddr,
    ) -> Result<(), NetlinkError> {
        self.handle
            .neighbours()
            .add_bridge(index, &mac)
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .destination(dst)
            .replace()
            .execute()
            .await
            .map_err(op(format!(
                "adding FDB entry {} dst {dst} on link {index}",
                format_mac(&mac)
            )))
    }

    /// Deletes the FDB entry `mac dst IP` of VXLAN link `index`; one already gone is not an
    /// error.
    pub async fn delete_fdb(
        &self,
        index: u32,
        mac: [u8; 6],
        dst: Option<IpAddr>,
    ) -> Result<(), NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = index;
        // NTF_SELF: the entry lives in the VXLAN device's own table, not a bridge master's.
        msg.header.flags = NeighbourFlags::Own;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        if let Some(ip) = dst {
            msg.attributes
                .push(NeighbourAttribute::Destination(NeighbourAddress::from(ip)));
        }
        gone_is_ok(
            self.handle.neighbours().del(msg).execute().await,
            libc::ENOENT,
            || format!("deleting FDB entry {} on link {index}", format_mac(&mac)),
        )
    }

    fn route_message(dst: IpNet, gateway: Option<IpAddr>, oif: u32, onlink: bool) -> RouteMessage {
        let mut msg = match (dst, gateway) {
            (IpNet::V4(d), gw) => {
                let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(d.addr(), d.prefix_len())
                    .output_interface(oif)
                    .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
                if let Some(IpAddr::V4(g)) = gw {
                    b = b.gateway(g);
                } else {
                    b = b.scope(RouteScope::Link);
                }
                if onlink {
                    b = b.onlink();
                }
                b.build()
            }
            (IpNet::V6(d), gw) => {
                let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(d.addr(), d.prefix_len())
                    .output_interface(oif)
                    .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
                if let Some(IpAddr::V6(g)) = gw {
                    b = b.gateway(g);
                }
                if onlink {
                    b = b.onlink();
                }
                b.build()
            }
        };
        msg.header.protocol = RouteProtocol::Other(ROUTE_PROTOCOL);
        msg
    }

    /// Installs `dst via gateway dev oif`, marked as ours. A route to `dst` that is ours is
    /// replaced in place; one that is not (an operator's, the kernel's connected route) is left
    /// alone and reported: we never take over a route we did not install, except with
    /// `adopt_same` on a link that belongs to us alone (vxlan's devices), where the very route
    /// we want (same gateway and link), left by another program (Go Flannel before a migration
    /// in place), is made ours.
    pub async fn replace_route(
        &self,
        dst: IpNet,
        gateway: Option<IpAddr>,
        oif: u32,
        onlink: bool,
        adopt_same: bool,
    ) -> Result<(), NetlinkError> {
        let msg = Self::route_message(dst, gateway, oif, onlink);
        let what = match gateway {
            Some(g) => format!("adding route {dst} via {g}"),
            None => format!("adding route {dst}"),
        };
        // Exclusive first: the kernel says whether a route to dst exists, whoever made it.
        match self.handle.route().add(msg.clone()).execute().await {
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
            other => return other.map_err(op(what)),
        }
        if let Some((protocol, have)) = self.existing_route(dst).await? {
            let same = have.gateway == gateway && have.oif == Some(oif);
            if protocol != ROUTE_PROTOCOL && !(adopt_same && same) {
                return Err(NetlinkError::NotOurs { dst, protocol });
            }
        }
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(op(what))
    }

    /// The protocol of the main table's route to exactly `dst`, and the route, if there is one.
    async fn existing_route(&self, dst: IpNet) -> Result<Option<(u8, OwnRoute)>, NetlinkError> {
        let family = match dst {
            IpNet::V4(_) => AddressFamily::Inet,
            IpNet::V6(_) => AddressFamily::Inet6,
        };
        Ok(self
            .routes(family)
            .await?
            .iter()
            .filter(|r| route_table(r) == u32::from(RouteHeader::RT_TABLE_MAIN))
            .find_map(|r| {
                parse_route(r)
                    .filter(|p| p.dst == dst)
                    .map(|p| (u8::from(r.header.protocol), p))
            }))
    }

    /// Deletes our route to `dst`; a route that is already gone is not an error.
    pub async fn delete_route(&self, route: &OwnRoute) -> Result<(), NetlinkError> {
        let msg = if route.blackhole {
            // The kernel matches a delete on type and metric too.
            Self::blackhole_message(route.dst)
        } else {
            Self::route_message(route.dst, route.gateway, route.oif.unwrap_or(0), false)
        };
        self.del_route(msg, route.dst).await
    }

    /// `blackhole dst metric BLACKHOLE_METRIC proto 70` in the main table.
    fn blackhole_message(dst: IpNet) -> RouteMessage {
        let mut msg = match dst {
            IpNet::V4(d) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d.addr(), d.prefix_len())
                .build(),
            IpNet::V6(d) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d.addr(), d.prefix_len())
                .build(),
        };
        msg.header.kind = RouteType::BlackHole;
        msg.header.scope = RouteScope::Universe;
        msg.header.protocol = RouteProtocol::Other(ROUTE_PROTOCOL);
        msg.attributes
            .push(RouteAttribute::Priority(BLACKHOLE_METRIC));
        msg
    }

    /// Installs our blackhole route to `dst` unless it is there. Returns whether it was added.
    /// A route of someone else's with the same destination and metric is left alone.
    pub async fn ensure_blackhole(&self, dst: IpNet) -> Result<bool, NetlinkError> {
        match self
            .handle
            .route()
            .add(Self::blackhole_message(dst))
            .execute()
            .await
        {
            Ok(()) => Ok(true),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(false),
            Err(e) => Err(op(format!("adding blackhole route {dst}"))(e)),
        }
    }
}
