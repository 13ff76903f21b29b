//! Received datagrams (length-prefixed in the input) through the GRO coalescer. The first byte
//! picks the mode: odd trusts the bytes (what udp and wireguard use, merging whatever lines up,
//! as random input seldom carries a right TCP checksum), even verifies TCP checksums.
#![no_main]
use encap::wire::{Gro, VNET_HDR_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((mode, mut rest)) = data.split_first() else {
        return;
    };
    let mut gro = Gro::new(8, VNET_HDR_LEN + 65_535);
    if mode & 1 == 1 {
        gro = gro.trusting();
    }
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
