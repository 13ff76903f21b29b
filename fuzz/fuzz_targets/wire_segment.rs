//! A TUN read (virtio-net header + packet, maybe a GSO super-packet) through segmentation.
#![no_main]
use encap::wire::{segment, VnetHdr, VNET_HDR_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((hdr, pkt)) = data.split_at_checked(VNET_HDR_LEN) else { return };
    let Ok(hdr) = VnetHdr::decode(hdr) else { return };
    let mut out = vec![0u8; 2 * 65_546];
    for mtu in [1280, 1472, 9000] {
        if let Ok(s) = segment(&hdr, pkt, mtu, &mut out) {
            assert!(s.total <= out.len());
            assert!(s.count == 0 || s.seg_len <= mtu);
        }
    }
});
