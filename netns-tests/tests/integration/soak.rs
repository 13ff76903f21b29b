//! Soak: traffic flowing while peers join and leave every few seconds; the daemon's RSS and
//! open file descriptors must stay flat. `FLANNELD_SOAK_SECONDS` sets the length (default 60;
//! CI runs 600).

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use netns_tests::cluster::{Cluster, ETCD_PREFIX};
use netns_tests::traffic::tcp_transfer;
use netns_tests::wait_until;

use crate::require_root;

fn fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

#[test]
fn soak_udp_with_churning_peers() -> Result<()> {
    require_root!();
    let secs: u64 = std::env::var("FLANNELD_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let mut c = Cluster::new(2)?;
    c.put_config(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#)?;
    for i in 0..2 {
        c.start_daemon(i, &[])?;
        c.wait_subnet_env(i, Duration::from_secs(20))?;
    }
    let a = c.add_pod(0)?;
    let b = c.add_pod(1)?;
    wait_until("traffic", Duration::from_secs(10), || {
        c.ping(&a, &b.ip, 1).is_ok()
    })?;
    let pid = c.nodes[0]
        .daemon
        .as_ref()
        .and_then(|d| d.pid())
        .context("pid")?;

    let start = Instant::now();
    let mut samples: Vec<(u64, u64, usize)> = Vec::new();
    let mut round = 0u32;
    while start.elapsed() < Duration::from_secs(secs) {
        round += 1;
        // A peer joins and another leaves (fake nodes: leases written as a node would).
        let joining = format!("{ETCD_PREFIX}/subnets/10.244.{}.0-24", 200 + round % 50);
        let json = format!(
            r#"{{"PublicIP":"172.30.0.{}","PublicIPv6":null}}"#,
            100 + round % 100
        );
        c.etcd()?.put(&joining, &json)?;
        if round > 3 {
            let leaving = format!(
                "{ETCD_PREFIX}/subnets/10.244.{}.0-24",
                200 + (round - 3) % 50
            );
            c.etcd()?.ctl(&["del", &leaving])?;
        }
        // Traffic: a hashed TCP transfer and pings between the real pods.
        let (sent, got) = tcp_transfer(&a.ns, &b.ns, &b.ip, 20 << 20)?;
        ensure!(sent == got, "round {round}: transfer corrupted");
        c.ping(&a, &b.ip, 2)?;
        samples.push((
            start.elapsed().as_secs(),
            netns_tests::proc::rss_kib(pid)?,
            fds(pid)?,
        ));
        std::thread::sleep(Duration::from_secs(2));
    }
    ensure!(
        c.nodes[0].daemon.as_mut().is_some_and(|d| d.alive()),
        "daemon died"
    );
    // Flat: after the first quarter (warm-up: allocator arenas, buffers), no growth.
    let warm = samples.len() / 4;
    let (_, rss0, fd0) = samples[warm];
    let rss_max = samples[warm..].iter().map(|s| s.1).max().unwrap_or(rss0);
    let fd_max = samples[warm..].iter().map(|s| s.2).max().unwrap_or(fd0);
    let (_, rss_end, fd_end) = samples[samples.len() - 1];
    eprintln!(
        "soak {secs} s, {round} rounds of join/leave + 20 MB: RSS {rss0} -> {rss_end} KiB (max {rss_max}), fds {fd0} -> {fd_end} (max {fd_max})"
    );
    ensure!(
        rss_max <= rss0 + 4096,
        "RSS grew from {rss0} to {rss_max} KiB"
    );
    ensure!(
        fd_max <= fd0 + 4,
        "file descriptors grew from {fd0} to {fd_max}"
    );
    Ok(())
}
