//! What the per-byte work of the userspace path costs, per 1,448-byte TCP segment (the MSS on a
//! 1,500-byte underlay), on this CPU: the copy the kernel makes on every crossing for
//! reference, the Internet checksum over a segment, cutting a 64 KiB TSO super-packet into
//! segments (copy, header rewrite, full TCP checksum each), and GRO merging them back with and
//! without verifying each segment's TCP checksum.
//!
//! `cargo run --release -p encap --features testutil --example wire_cost` (no root needed).

use std::hint::black_box;
use std::time::Instant;

use encap::wire::testutil::TcpSpec;
use encap::wire::{checksum, segment, Gro, VNET_HDR_LEN};

const MSS: usize = 1448;
const ROUNDS: usize = 2000;

/// Median nanoseconds per unit of `units` over rounds of `f`.
fn per_unit(units: usize, mut f: impl FnMut()) -> f64 {
    let mut samples: Vec<f64> = (0..25)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..ROUNDS / 25 {
                f();
            }
            t.elapsed().as_nanos() as f64 / (ROUNDS / 25 * units) as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    let payload: Vec<u8> = (0..45 * MSS).map(|i| (i * 7 + 3) as u8).collect();
    let (hdr, tso) = TcpSpec::v4().payload(&payload).build_gso(MSS as u16);
    let mut out = vec![0u8; 2 * 65_536];
    let segs = segment(&hdr, &tso, 1500, &mut out).expect("segments");
    let count = segs.count;
    let seg_len = segs.seg_len;
    let wire: Vec<Vec<u8>> = out[..segs.total]
        .chunks(seg_len)
        .map(<[u8]>::to_vec)
        .collect();

    let src = vec![0x5au8; MSS];
    let mut dst = vec![0u8; MSS];
    let copy = per_unit(1, || {
        dst.copy_from_slice(black_box(&src));
        black_box(&dst);
    });
    let sum = per_unit(1, || {
        black_box(checksum::sum(black_box(&wire[0]), 0));
    });
    let cut = per_unit(count, || {
        black_box(segment(&hdr, black_box(&tso), 1500, &mut out).ok());
    });
    let mut verifying = Gro::new(64, VNET_HDR_LEN + 65_535);
    let mut trusting = Gro::new(64, VNET_HDR_LEN + 65_535).trusting();
    let merge = |gro: &mut Gro| {
        per_unit(count, || {
            for w in &wire {
                let _ = gro.push(black_box(w));
            }
            for p in gro.packets() {
                black_box(p);
            }
            gro.clear();
        })
    };
    let (gro_v, gro_t) = (merge(&mut verifying), merge(&mut trusting));
    println!("per {MSS}-byte TCP segment ({count} per 64 KiB super-packet), ns:");
    println!("| work | ns per segment | GB/s |");
    println!("|---|---|---|");
    for (what, ns) in [
        (
            "memcpy of the payload (what each kernel crossing costs at least)",
            copy,
        ),
        ("Internet checksum over one segment", sum),
        (
            "segment: cut a TSO super-packet (copy, headers, full TCP checksum)",
            cut,
        ),
        (
            "GRO: merge segments back, verifying each TCP checksum",
            gro_v,
        ),
        (
            "GRO: merge segments back, trusting (outer checksum or AEAD)",
            gro_t,
        ),
    ] {
        println!("| {what} | {ns:.0} | {:.1} |", MSS as f64 / ns);
    }
}
