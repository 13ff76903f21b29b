//! A TUN read (virtio-net header + packet, maybe a GSO super-packet) through segmentation,
//! packed (udp) and into WireGuard's slots.
#![no_main]
use encap::wire::{segment, segment_into, Layout, VnetHdr, VNET_HDR_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((hdr, pkt)) = data.split_at_checked(VNET_HDR_LEN) else { return };
    let Ok(hdr) = VnetHdr::decode(hdr) else { return };
    let mut out = vec![0u8; 4 * 65_546];
    let slots = Layout {
        head: 16,
        slot: |len: usize| 16 + len.div_ceil(16) * 16 + 16,
    };
    for mtu in [1280, 1472, 9000] {
        if let Ok(s) = segment(&hdr, pkt, mtu, &mut out) {
            assert!(s.total <= out.len());
            assert!(s.count == 0 || s.seg_len <= mtu);
            assert_eq!(s.total, (s.count - 1) * s.seg_len + s.last_len);
        }
        if let Ok(s) = segment_into(&hdr, pkt, mtu, &mut out, &slots) {
            assert!(s.total <= out.len());
            assert!(s.count == 0 || s.seg_len <= mtu);
        }
    }
});
