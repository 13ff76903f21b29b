//! The few rtnetlink operations the backends and the daemon need, with errors that say what
//! was being done. No `ip` processes: everything goes through one netlink socket.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
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
}

fn op(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let what = what.into();
    move |source| NetlinkError::Op { what, source }
}

/// A network interface as the daemon sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
}

/// A route we installed: destination, gateway and outgoing interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnRoute {
    pub dst: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
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
                if r.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL) {
                    continue;
                }
                let mut dst = None;
                let mut gateway = None;
                let mut oif = None;
                for a in &r.attributes {
                    match a {
                        RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
                            dst =
                                IpNet::new(IpAddr::V4(*ip), r.header.destination_prefix_length).ok()
                        }
                        RouteAttribute::Destination(RouteAddress::Inet6(ip)) => {
                            dst =
                                IpNet::new(IpAddr::V6(*ip), r.header.destination_prefix_length).ok()
                        }
                        RouteAttribute::Gateway(RouteAddress::Inet(ip)) => {
                            gateway = Some(IpAddr::V4(*ip))
                        }
                        RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => {
                            gateway = Some(IpAddr::V6(*ip))
                        }
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        _ => {}
                    }
                }
                if let Some(dst) = dst {
                    out.push(OwnRoute { dst, gateway, oif });
                }
            }
        }
        Ok(out)
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

    /// Adds or replaces `dst via gateway dev oif`, marked as ours.
    pub async fn replace_route(
        &self,
        dst: IpNet,
        gateway: Option<IpAddr>,
        oif: u32,
        onlink: bool,
    ) -> Result<(), NetlinkError> {
        let msg = Self::route_message(dst, gateway, oif, onlink);
        let what = match gateway {
            Some(g) => format!("adding route {dst} via {g}"),
            None => format!("adding route {dst}"),
        };
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(op(what))
    }

    /// Deletes our route to `dst`; a route that is already gone is not an error.
    pub async fn delete_route(&self, route: &OwnRoute) -> Result<(), NetlinkError> {
        let msg = Self::route_message(route.dst, route.gateway, route.oif.unwrap_or(0), false);
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => Ok(()),
            Err(e) => Err(NetlinkError::Op {
                what: format!("deleting route {}", route.dst),
                source: e,
            }),
        }
    }
}
