//! Received datagrams (length-prefixed in the input) through the GRO coalescer. The first byte
//! picks the mode: odd trusts the bytes (what udp and wireguard use, merging whatever lines up,
//! as random input seldom carries a right TCP checksum), even verifies TCP and UDP checksums.
//! What each output says it carries adds up to what was pushed, packets and bytes, and a
//! merged output (TCP or UDP) is one the segmenter cuts back into that many packets.
#![no_main]
use encap::wire::{segment, Gro, VnetHdr, VNET_HDR_LEN};
use libfuzzer_sys::fuzz_target;

/// Drains `gro`, checking its outputs against what was pushed since the last drain.
fn drain(gro: &mut Gro, pushed: &mut (u64, u64), cut: &mut [u8]) {
    let mut carried = (0, 0);
    for (p, c) in gro.outputs() {
        assert!(p.len() >= VNET_HDR_LEN);
        assert!(c.packets >= 1);
        // (Cut where what it carries fits the buffer: a merge of 1-byte segments carries
        // a header per byte.)
        if c.packets > 1 && c.bytes <= cut.len() as u64 {
            let h = VnetHdr::decode(p).expect("a merged output has a vnet header");
            let s = segment(&h, &p[VNET_HDR_LEN..], 65_535, cut).expect("the segmenter takes it");
            assert_eq!(s.count as u64, c.packets);
            if h.gso_type == encap::wire::vnet::GSO_UDP_L4 {
                assert!(c.packets <= 64, "at most the kernel's UDP GRO limit");
            }
        }
        carried.0 += c.packets;
        carried.1 += c.bytes;
    }
    assert_eq!(carried, *pushed);
    gro.clear();
    *pushed = (0, 0);
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, mut rest)) = data.split_first() else {
        return;
    };
    let mut gro = Gro::new(8, VNET_HDR_LEN + 65_535);
    if mode & 1 == 1 {
        gro = gro.trusting();
    }
    let mut pushed = (0u64, 0u64);
    let mut cut = vec![0u8; 256 * 1024];
    while let [a, b, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*a, *b])) % 2048;
        let take = len.min(tail.len());
        if gro.push(&tail[..take]).is_ok() {
            pushed.0 += 1;
            pushed.1 += take as u64;
        }
        if gro.is_full() {
            drain(&mut gro, &mut pushed, &mut cut);
        }
        rest = &tail[take..];
    }
    drain(&mut gro, &mut pushed, &mut cut);
});
