//! Socket addresses in the C layout `sendmsg`/`recvmmsg` want, without `sockaddr_storage`'s
//! 128 bytes: a batch of 64 of these stays small enough for the stack.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use libc::{sa_family_t, sockaddr_in, sockaddr_in6, socklen_t};

/// Room for an IPv4 or IPv6 socket address.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) union RawAddr {
    v4: sockaddr_in,
    v6: sockaddr_in6,
}

/// `sizeof` the union, for `msg_namelen` of receive buffers.
pub(crate) const RAW_ADDR_LEN: socklen_t = size_of::<RawAddr>() as socklen_t;

impl RawAddr {
    /// All zeros (family `AF_UNSPEC`). The IPv6 variant is the larger one, so every byte is set.
    pub(crate) const fn zeroed() -> Self {
        Self {
            v6: sockaddr_in6 {
                sin6_family: 0,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: [0; 16] },
                sin6_scope_id: 0,
            },
        }
    }

    /// The C form of `addr` and its length for `msg_namelen`.
    pub(crate) fn new(addr: &SocketAddr) -> (Self, socklen_t) {
        match addr {
            SocketAddr::V4(a) => (
                Self {
                    v4: sockaddr_in {
                        sin_family: libc::AF_INET as sa_family_t,
                        sin_port: a.port().to_be(),
                        sin_addr: libc::in_addr {
                            s_addr: u32::from_ne_bytes(a.ip().octets()),
                        },
                        sin_zero: [0; 8],
                    },
                },
                size_of::<sockaddr_in>() as socklen_t,
            ),
            SocketAddr::V6(a) => (
                Self {
                    v6: sockaddr_in6 {
                        sin6_family: libc::AF_INET6 as sa_family_t,
                        sin6_port: a.port().to_be(),
                        sin6_flowinfo: a.flowinfo(),
                        sin6_addr: libc::in6_addr {
                            s6_addr: a.ip().octets(),
                        },
                        sin6_scope_id: a.scope_id(),
                    },
                },
                size_of::<sockaddr_in6>() as socklen_t,
            ),
        }
    }

    /// Reads back an address the kernel wrote with length `len`; `None` for other families or
    /// a short length.
    pub(crate) fn get(&self, len: socklen_t) -> Option<SocketAddr> {
        // SAFETY: both variants are plain integer structs that start with the family field, every
        // bit pattern is valid for them, and all bytes of the union were initialised (zeroed()
        // or new() or the kernel).
        let family = c_int_of(unsafe { self.v4.sin_family });
        match family {
            libc::AF_INET if len as usize >= size_of::<sockaddr_in>() => {
                // SAFETY: as above.
                let a = unsafe { self.v4 };
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(a.sin_addr.s_addr.to_ne_bytes()),
                    u16::from_be(a.sin_port),
                )))
            }
            libc::AF_INET6 if len as usize >= size_of::<sockaddr_in6>() => {
                // SAFETY: as above.
                let a = unsafe { self.v6 };
                let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
                let port = u16::from_be(a.sin6_port);
                // An IPv4 peer heard on a dual-stack socket: it is that IPv4 address, and must
                // compare equal to the IPv4 endpoint its lease names.
                if let Some(v4) = ip.to_ipv4_mapped() {
                    return Some(SocketAddr::V4(SocketAddrV4::new(v4, port)));
                }
                Some(SocketAddr::V6(SocketAddrV6::new(
                    ip,
                    port,
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }

    pub(crate) fn as_mut_ptr(&mut self) -> *mut libc::c_void {
        (self as *mut Self).cast()
    }
}

fn c_int_of(family: sa_family_t) -> libc::c_int {
    libc::c_int::from(family)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_v4_and_v6() {
        let scoped = SocketAddrV6::new("fe80::1".parse().expect("test address"), 443, 5, 7);
        for addr in [
            "10.1.2.3:8285".parse().expect("test address"),
            SocketAddr::V6(scoped),
            "[::1]:0".parse().expect("test address"),
        ] {
            let (raw, len) = RawAddr::new(&addr);
            assert_eq!(raw.get(len), Some(addr));
        }
    }

    #[test]
    fn mapped_sources_read_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:172.30.0.12]:51820".parse().expect("test address");
        let (raw, len) = RawAddr::new(&mapped);
        assert_eq!(
            raw.get(len),
            Some("172.30.0.12:51820".parse().expect("test address"))
        );
    }

    #[test]
    fn rejects_unspec_and_short_lengths() {
        assert_eq!(RawAddr::zeroed().get(RAW_ADDR_LEN), None);
        let (raw, _) = RawAddr::new(&"[::1]:1".parse().expect("test address"));
        assert_eq!(raw.get(8), None);
    }
}
