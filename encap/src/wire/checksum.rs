//! The Internet checksum (RFC 1071) and the pieces every header rewrite needs.
//!
//! Sums are carried unfolded in a `u64` so that a pseudo-header, a header and a payload can be
//! added separately and folded once at the end. Words are big-endian 16-bit; every piece but the
//! last must have even length (an odd last byte is padded with zero, as RFC 1071 says).
//!
//! The hot loop adds native-endian 32-bit words into a 64-bit accumulator (no carries to track,
//! and LLVM vectorizes it, with AVX2 where the CPU has it: `examples/wire_cost.rs` measures it)
//! and swaps bytes once at the end: the ones-complement sum is
//! byte-order independent (RFC 1071 §2(B)).

/// Folds an accumulator down to 32 bits without changing its value modulo 0xffff
/// (2^32 ≡ 1), so that adding to it cannot overflow.
fn reduce(acc: u64) -> u64 {
    (acc & 0xffff_ffff) + (acc >> 32)
}

/// Folded sum of `data`'s 16-bit words in native byte order, with the widest vectors the CPU
/// has: the checksum reads every byte the datapath forwards, and AVX2 halves its cost against
/// the SSE2 that x86-64 builds assume.
fn sum_ne(data: &[u8]) -> u16 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, the only requirement of `sum_ne_avx2`.
        return unsafe { sum_ne_avx2(data) };
    }
    sum_ne_portable(data)
}

/// [`sum_ne_portable`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum_ne_avx2(data: &[u8]) -> u16 {
    sum_ne_portable(data)
}

#[inline(always)]
fn sum_ne_portable(data: &[u8]) -> u16 {
    let mut acc: u64 = 0;
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        if let [a, b, c, d] = *w {
            acc += u64::from(u32::from_ne_bytes([a, b, c, d]));
        }
    }
    let mut tail = [0u8; 4];
    for (t, r) in tail.iter_mut().zip(words.remainder()) {
        *t = *r;
    }
    acc += u64::from(u32::from_ne_bytes(tail));
    fold(acc)
}

/// Adds `data` to the running sum `acc` and returns the new unfolded sum.
pub fn sum(data: &[u8], acc: u64) -> u64 {
    // Blocks keep the inner u64 accumulator far from overflow for any slice length; the block
    // size is even, so words stay aligned across blocks.
    let mut acc = reduce(acc);
    for block in data.chunks(1 << 30) {
        let s = sum_ne(block);
        let s = if cfg!(target_endian = "little") {
            s.swap_bytes()
        } else {
            s
        };
        acc = reduce(acc + u64::from(s));
    }
    acc
}

/// Folds a sum to 16 bits (end-around carry), not complemented: what a `NEEDS_CSUM` checksum
/// field holds for the pseudo-header.
pub fn fold(acc: u64) -> u16 {
    let mut s = reduce(acc);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// The checksum to store: the complement of the folded sum.
pub fn finish(acc: u64) -> u16 {
    !fold(acc)
}

/// Checksum of `data` alone (RFC 1071).
pub fn checksum(data: &[u8]) -> u16 {
    finish(sum(data, 0))
}

/// Whether a region whose checksum field is included sums to all ones, i.e. verifies.
pub fn verifies(acc: u64) -> bool {
    fold(acc) == 0xffff
}

/// The IPv4 header checksum of `hdr` (the whole header, options included), computed as if its
/// checksum field (bytes 10..12) were zero.
pub fn ipv4_header(hdr: &[u8]) -> u16 {
    let head = hdr.get(..10).unwrap_or(hdr);
    let rest = hdr.get(12..).unwrap_or(&[]);
    finish(sum(rest, sum(head, 0)))
}

/// TCP/UDP pseudo-header sum for IPv4 (RFC 793/768): addresses, protocol, L4 length.
pub fn pseudo_v4(src: [u8; 4], dst: [u8; 4], proto: u8, len: u16) -> u64 {
    let w = |a: u8, b: u8| u64::from(u16::from_be_bytes([a, b]));
    w(src[0], src[1])
        + w(src[2], src[3])
        + w(dst[0], dst[1])
        + w(dst[2], dst[3])
        + u64::from(proto)
        + u64::from(len)
}

/// TCP/UDP/ICMPv6 pseudo-header sum for IPv6 (RFC 8200 §8.1): addresses, L4 length (32 bits),
/// next header.
pub fn pseudo_v6(src: &[u8; 16], dst: &[u8; 16], proto: u8, len: u32) -> u64 {
    let mut acc = u64::from(proto) + u64::from(len >> 16) + u64::from(len & 0xffff);
    for pair in src.chunks_exact(2).chain(dst.chunks_exact(2)) {
        if let [a, b] = *pair {
            acc += u64::from(u16::from_be_bytes([a, b]));
        }
    }
    acc
}

/// Incremental update (RFC 1624 eqn. 3): the checksum `check` after one 16-bit word of the
/// covered data changed from `old` to `new`.
pub fn update16(check: u16, old: u16, new: u16) -> u16 {
    !fold(u64::from(!check) + u64::from(!old) + u64::from(new))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::testutil::{naive_csum, XorShift};

    #[test]
    fn wire_checksum_matches_naive_on_random_data() {
        let mut rng = XorShift::new(7);
        let mut buf = vec![0u8; 3000];
        for len in (0..64).chain([1399, 1400, 1401, 2047, 3000]) {
            rng.fill(&mut buf[..len]);
            let d = &buf[..len];
            assert_eq!(checksum(d), naive_csum(&[d]), "len {len}");
            // Split at an even point: the parts add up.
            let cut = (len / 2) & !1;
            assert_eq!(
                finish(sum(&d[cut..], sum(&d[..cut], 0))),
                naive_csum(&[d]),
                "split {len}"
            );
        }
        // All-ones data and large accumulators survive without overflow.
        let ones = vec![0xffu8; 65536];
        assert_eq!(checksum(&ones), naive_csum(&[&ones]));
        // u64::MAX is ones-complement zero (2^64 ≡ 1 mod 0xffff).
        assert_eq!(fold(sum(&[1, 2], u64::MAX)), 0x0102);
    }

    #[test]
    fn wire_checksum_rfc1071_example() {
        // RFC 1071 §3: the sum of 00 01 f2 03 f4 f5 f6 f7 is ddf2.
        assert_eq!(
            fold(sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7], 0)),
            0xddf2
        );
    }

    #[test]
    fn wire_checksum_ipv4_header_and_update() {
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        let c = ipv4_header(&h);
        assert_eq!(c, 0xb861); // the well-known example header
        h[10..12].copy_from_slice(&c.to_be_bytes());
        assert!(verifies(sum(&h, 0)));
        // Decrement TTL and update incrementally: same as recomputing.
        let old = u16::from_be_bytes([h[8], h[9]]);
        h[8] -= 1;
        let new = u16::from_be_bytes([h[8], h[9]]);
        let inc = update16(c, old, new);
        assert_eq!(inc, ipv4_header(&h));
    }

    #[test]
    fn wire_checksum_pseudo_headers_match_naive() {
        let s4 = [10, 1, 2, 3];
        let d4 = [10, 244, 255, 254];
        let mut p4 = Vec::new();
        p4.extend_from_slice(&s4);
        p4.extend_from_slice(&d4);
        p4.extend_from_slice(&[0, 6, 0x05, 0xdc]);
        assert_eq!(finish(pseudo_v4(s4, d4, 6, 1500)), naive_csum(&[&p4]));

        let s6: [u8; 16] = core::array::from_fn(|i| (i * 17) as u8);
        let d6: [u8; 16] = core::array::from_fn(|i| 0xff - i as u8);
        let mut p6 = Vec::new();
        p6.extend_from_slice(&s6);
        p6.extend_from_slice(&d6);
        p6.extend_from_slice(&70000u32.to_be_bytes());
        p6.extend_from_slice(&[0, 0, 0, 17]);
        assert_eq!(finish(pseudo_v6(&s6, &d6, 17, 70000)), naive_csum(&[&p6]));
    }
}
