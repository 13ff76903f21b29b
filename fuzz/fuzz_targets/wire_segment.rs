//! A TUN read (virtio-net header + packet, maybe a GSO super-packet) through segmentation,
//! packed (udp) and into WireGuard's slots.
#![no_main]
use encap::wire::{segment, segment_into, Layout, VnetHdr, VNET_HDR_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((hdr, pkt)) = data.split_at_checked(VNET_HDR_LEN) else { return };
    let Ok(hdr) = VnetHdr::decode(hdr) else { return };
    let mut out = vec![0u8; 4 * 65_546];
    let slot = |len: usize| 16 + len.div_ceil(16) * 16 + 16;
    let slots = Layout { head: 16, slot };
    for mtu in [1280, 1472, 9000] {
        // Whatever it cut holds at least one packet.
        if let Ok(s) = segment(&hdr, pkt, mtu, &mut out) {
            assert!(s.count >= 1 && s.seg_len <= mtu && s.last_len <= s.seg_len);
            assert_eq!(s.total, (s.count - 1) * s.seg_len + s.last_len);
            assert!(s.total <= out.len());
        }
        if let Ok(s) = segment_into(&hdr, pkt, mtu, &mut out, &slots) {
            assert!(s.count >= 1 && s.seg_len <= mtu && s.last_len <= s.seg_len);
            assert_eq!(s.total, (s.count - 1) * slot(s.seg_len) + slot(s.last_len));
            assert!(s.total <= out.len());
        }
    }
});
