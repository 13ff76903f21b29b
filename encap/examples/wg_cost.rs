//! What one WireGuard peer's crypto costs per 1,448-byte segment (or the size given), sealing and opening on one
//! session from 1, 2 and (if the machine has them) more threads at once, against boringtun's
//! `Tunn` (one thread: it seals under `&mut self`). Wall-clock ns per segment: with n threads,
//! lower than one thread's means the peer's crypto spreads over cores.
//!
//! `cargo run --release -p encap --features testutil --example wg_cost [SIZE]`

use encap::backend::wireguard_cost as cost;

const SEGS: usize = 44 * 4000;

fn main() {
    // The segment size: a full one by default, e.g. 64 for small packets.
    let seg: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1448);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut threads = vec![1, 2];
    threads.extend([4, 8, 16].into_iter().filter(|&t| t <= cores));
    threads.dedup();
    println!("| threads on one session | seal ns/segment | open ns/segment |");
    println!("|---|---|---|");
    for t in threads {
        let seal = cost::seal_ns(t, SEGS, seg).unwrap_or(f64::NAN);
        let open = cost::open_ns(t, SEGS, seg).unwrap_or(f64::NAN);
        println!("| {t} | {seal:.0} | {open:.0} |");
    }
    let bt = cost::boringtun_seal_ns(SEGS, seg).unwrap_or(f64::NAN);
    println!("| boringtun Tunn::encapsulate (1 thread, no more possible) | {bt:.0} | |");
    println!("\n{cores} cores available");
}
