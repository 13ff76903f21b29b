//! `struct virtio_net_hdr` (`linux/virtio_net.h`): the 10 bytes in front of every read from and
//! write to a TUN opened with `IFF_VNET_HDR`. They carry the offloads: a TSO/USO super-packet's
//! segment size, and where a checksum still has to be completed. Fields are little-endian
//! (the legacy, pre-`TUNSETVNETBE` layout on little-endian hosts, which is what TUN uses on x86).

use super::bytes::{arr, arr_mut};
use super::WireError;

/// Size of `struct virtio_net_hdr` (without `num_buffers`).
pub const VNET_HDR_LEN: usize = 10;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum over `[csum_start, end)` must be completed and
/// stored at `csum_start + csum_offset`; the field holds the pseudo-header sum.
pub const FLAG_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`: the checksum was already verified.
pub const FLAG_DATA_VALID: u8 = 2;

/// `VIRTIO_NET_HDR_GSO_NONE`: an ordinary packet.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`: TCP/IPv4 super-packet, `gso_size` = MSS.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_UDP`: UFO (IP-fragmented UDP), obsolete.
pub const GSO_UDP: u8 = 3;
/// `VIRTIO_NET_HDR_GSO_TCPV6`: TCP/IPv6 super-packet, `gso_size` = MSS.
pub const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_UDP_L4`: USO, UDP payload cut into `gso_size` datagrams.
pub const GSO_UDP_L4: u8 = 5;
/// `VIRTIO_NET_HDR_GSO_ECN`: or-ed into `gso_type`, the TCP stream uses ECN (CWR on first).
pub const GSO_ECN: u8 = 0x80;

/// A decoded `struct virtio_net_hdr`. The default value is "plain packet, nothing to do".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Reads the header from the first [`VNET_HDR_LEN`] bytes of `b`.
    pub fn decode(b: &[u8]) -> Result<VnetHdr, WireError> {
        let h: &[u8; VNET_HDR_LEN] = arr(b, 0).ok_or(WireError::Truncated {
            what: "virtio_net_hdr",
            need: VNET_HDR_LEN,
            have: b.len(),
        })?;
        Ok(VnetHdr {
            flags: h[0],
            gso_type: h[1],
            hdr_len: u16::from_le_bytes([h[2], h[3]]),
            gso_size: u16::from_le_bytes([h[4], h[5]]),
            csum_start: u16::from_le_bytes([h[6], h[7]]),
            csum_offset: u16::from_le_bytes([h[8], h[9]]),
        })
    }

    /// Writes the header into the first [`VNET_HDR_LEN`] bytes of `out`.
    pub fn encode(&self, out: &mut [u8]) -> Result<(), WireError> {
        let have = out.len();
        let h: &mut [u8; VNET_HDR_LEN] = arr_mut(out, 0).ok_or(WireError::BufferTooSmall {
            need: VNET_HDR_LEN,
            have,
        })?;
        let [a, b] = self.hdr_len.to_le_bytes();
        let [c, d] = self.gso_size.to_le_bytes();
        let [e, f] = self.csum_start.to_le_bytes();
        let [g, i] = self.csum_offset.to_le_bytes();
        *h = [self.flags, self.gso_type, a, b, c, d, e, f, g, i];
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_vnet_round_trip() {
        let h = VnetHdr {
            flags: FLAG_NEEDS_CSUM,
            gso_type: GSO_TCPV6 | GSO_ECN,
            hdr_len: 0x0102,
            gso_size: 1400,
            csum_start: 40,
            csum_offset: 16,
        };
        let mut b = [0u8; 12];
        h.encode(&mut b).unwrap();
        assert_eq!(b[..10], [1, 0x84, 2, 1, 0x78, 5, 40, 0, 16, 0]);
        assert_eq!(VnetHdr::decode(&b).unwrap(), h);
        assert!(matches!(
            VnetHdr::decode(&b[..9]),
            Err(WireError::Truncated {
                need: 10,
                have: 9,
                ..
            })
        ));
        assert!(h.encode(&mut b[..5]).is_err());
    }
}
