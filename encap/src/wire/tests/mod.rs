//! Tests across modules: segmentation, GRO, their round trip, and garbage inputs.

mod fuzz;
mod gro;
mod segment;

use super::segment::{segment, Segments};
use super::testutil::*;
use super::vnet::VnetHdr;

/// Splits `segment`'s output into its packets.
pub fn split_out(out: &[u8], s: &Segments) -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    let mut pos = 0;
    for i in 0..s.count {
        let n = if i + 1 == s.count {
            s.total - pos
        } else {
            s.seg_len
        };
        v.push(out[pos..pos + n].to_vec());
        pos += n;
    }
    assert_eq!(pos, s.total);
    v
}

/// A super-packet of `payload_len` random bytes, cut with MSS `mss`: (spec, vnet, packet,
/// segments).
pub fn cut(
    spec: TcpSpec,
    payload_len: usize,
    mss: u16,
    seed: u64,
) -> (TcpSpec, VnetHdr, Vec<u8>, Vec<Vec<u8>>) {
    let spec = spec.payload(&XorShift::new(seed).bytes(payload_len));
    let (h, p) = spec.build_gso(mss);
    let mut out = vec![0u8; 128 * 1024];
    let s = segment(&h, &p, 9000, &mut out).unwrap();
    let segs = split_out(&out, &s);
    (spec, h, p, segs)
}
