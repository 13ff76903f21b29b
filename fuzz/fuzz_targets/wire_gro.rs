//! Received datagrams (length-prefixed in the input) through the GRO coalescer.
#![no_main]
use encap::wire::{Gro, VNET_HDR_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut gro = Gro::new(8, VNET_HDR_LEN + 65_535);
    let mut rest = data;
    while let [a, b, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*a, *b])) % 2048;
        let take = len.min(tail.len());
        let _ = gro.push(&tail[..take]);
        if gro.is_full() {
            for p in gro.packets() {
                assert!(p.len() >= VNET_HDR_LEN);
            }
            gro.clear();
        }
        rest = &tail[take..];
    }
    for p in gro.packets() {
        assert!(p.len() >= VNET_HDR_LEN);
    }
});
