//! Sans-I/O packet codecs of the datapath.
//!
//! Everything here works on byte slices handed in by the caller and writes into buffers the
//! caller preallocated: no sockets, no allocation per packet, and no panics on any input bytes
//! (every access is bounds-checked with `get`/checked arithmetic, errors say what was wrong).
//!
//! The pieces follow one packet's life through the udp backend:
//! - [`vnet`]: the `virtio_net_hdr` that prefixes every TUN read and write (`IFF_VNET_HDR`).
//! - [`segment`]: cut a TSO/USO super-packet read from TUN into complete MTU-sized IP packets,
//!   back to back, ready for one `UDP_SEGMENT` send (Flannel's wire carries one inner IP packet
//!   per datagram).
//! - [`gro`]: on receive, merge consecutive TCP segments of a flow back into one super-packet
//!   with a `virtio_net_hdr`, so that one TUN write delivers many segments.
//! - [`ip`]: addresses, TTL, and ICMP error replies; [`checksum`]: the Internet checksum.

mod bytes;
pub mod checksum;
pub mod gro;
pub mod ip;
pub mod segment;
pub mod vnet;

#[cfg(test)]
mod tests;
#[cfg(any(test, feature = "testutil"))]
pub mod testutil;

use std::net::IpAddr;

pub use gro::Gro;
pub use segment::{complete_csum, segment, segment_into, Layout, Segments};
pub use vnet::{VnetHdr, VNET_HDR_LEN};

/// Why a packet (or a buffer) could not be decoded, rewritten or built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The bytes end before a header or the length a header declares.
    #[error("{what} truncated: need {need} bytes, have {have}")]
    Truncated {
        what: &'static str,
        need: usize,
        have: usize,
    },
    /// The first nibble is neither 4 nor 6.
    #[error("not an IP packet: version {0}")]
    BadVersion(u8),
    /// A header field is inconsistent with the packet or with another field.
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// Valid, but a case these codecs deliberately do not handle.
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    /// A packet (or segment) is larger than allowed; `mtu` is the limit that applied.
    #[error("packet of {len} bytes exceeds the limit of {mtu} bytes")]
    TooBig { len: usize, mtu: usize },
    /// The caller's output buffer cannot hold the result.
    #[error("output buffer too small: need {need} bytes, have {have}")]
    BufferTooSmall { need: usize, have: usize },
    /// The GRO batch has no free slot: take its packets and clear it first.
    #[error("GRO batch is full")]
    Full,
    /// RFC 1122/4443 forbid an ICMP error about this packet.
    #[error("no ICMP error may be sent: {0}")]
    NoIcmp(&'static str),
    /// The reply's source address is not of the packet's IP version.
    #[error("address {0} is not of the packet's IP version")]
    FamilyMismatch(IpAddr),
}
