//! Mixed clusters with the real Go Flannel v0.20.2: two nodes of ours and one Go node on one
//! etcd, on each backend; then migration in place, Go -> ours -> Go, keeping the subnet.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use netns_tests::cluster::{Cluster, Pod};
use netns_tests::goflannel;
use netns_tests::traffic::tcp_transfer;
use netns_tests::wait_until;

use crate::require_root;

/// Skips when Go Flannel is not on this machine (fails instead under CI=true).
macro_rules! require_go_flannel {
    () => {
        if netns_tests::must_skip(goflannel::missing())? {
            return Ok(());
        }
    };
}

fn config(backend: &str) -> String {
    format!(r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"{backend}"}}}}"#)
}

fn subnet_line(c: &Cluster, i: usize) -> Result<String> {
    let env = std::fs::read_to_string(c.nodes[i].subnet_file())?;
    env.lines()
        .find(|l| l.starts_with("FLANNEL_SUBNET="))
        .map(str::to_string)
        .context("no FLANNEL_SUBNET")
}

/// Nodes 1 and 2 run flanneld-rs, node 3 Go Flannel (started last, alone, as its README asks).
fn mixed(backend: &str) -> Result<(Cluster, Vec<Pod>)> {
    let mut c = Cluster::new(3)?;
    c.put_config(&config(backend))?;
    for i in 0..2 {
        c.start_daemon(i, &[])?;
        c.wait_subnet_env(i, Duration::from_secs(20))?;
    }
    c.start_go_flannel(2, &[])?;
    c.wait_subnet_env(2, Duration::from_secs(30))?;
    let pods = (0..3).map(|i| c.add_pod(i)).collect::<Result<Vec<_>>>()?;
    wait_until(
        "the mixed mesh to converge",
        Duration::from_secs(15),
        || c.ping_mesh(&pods).is_ok(),
    )?;
    Ok((c, pods))
}

fn mixed_cluster_carries_traffic(backend: &str) -> Result<()> {
    let (c, pods) = mixed(backend)?;
    // Both kinds of lease are in etcd, in the same format.
    let leases = c.leases()?;
    ensure!(leases.len() == 3, "{leases:?}");
    for (k, v) in &leases {
        ensure!(v.contains(r#""PublicIPv6":null"#), "lease {k}: {v}");
    }
    c.ping_mesh(&pods)?;
    for (from, to) in [(0, 2), (2, 1)] {
        let (sent, got) = tcp_transfer(&pods[from].ns, &pods[to].ns, &pods[to].ip, 50 << 20)?;
        ensure!(
            sent == got,
            "{backend}: 50 MB n{} -> n{} hash mismatch",
            from + 1,
            to + 1
        );
    }
    Ok(())
}

/// Go Flannel -> flanneld-rs -> Go Flannel on node 3, same subnet file and interface.
fn migration_in_place(backend: &str) -> Result<()> {
    let (mut c, pods) = mixed(backend)?;
    let before = subnet_line(&c, 2)?;
    let mac = |c: &Cluster| {
        c.nodes[2]
            .run("cat", &["/sys/class/net/flannel.1/address"])
            .ok()
    };
    let mac_before = mac(&c);

    c.stop_daemon(2);
    c.start_daemon(2, &[])?;
    let t = Instant::now();
    wait_until(
        "n3 reachable again under flanneld-rs",
        Duration::from_secs(10),
        || c.ping(&pods[0], &pods[2].ip, 1).is_ok() && c.ping(&pods[2], &pods[1].ip, 1).is_ok(),
    )?;
    let took = t.elapsed();
    eprintln!("{backend}: Go -> ours, pods reach n3 again after {took:?}");
    ensure!(
        subnet_line(&c, 2)? == before,
        "ours must keep Go Flannel's subnet"
    );
    if backend == "vxlan" {
        ensure!(
            mac(&c) == mac_before,
            "VXLAN MAC must survive the migration"
        );
    }
    ensure!(
        took < Duration::from_secs(2),
        "{backend}: took {took:?} (bound 2 s)"
    );
    c.ping_mesh(&pods)?;

    c.stop_daemon(2);
    c.start_go_flannel(2, &[])?;
    wait_until(
        "n3 reachable again under Go Flannel",
        Duration::from_secs(20),
        || c.ping(&pods[0], &pods[2].ip, 1).is_ok(),
    )?;
    ensure!(
        subnet_line(&c, 2)? == before,
        "Go Flannel must keep our subnet"
    );
    Ok(())
}

#[test]
fn go_flannel_mixed_host_gw() -> Result<()> {
    require_root!();
    require_go_flannel!();
    mixed_cluster_carries_traffic("host-gw")
}

#[test]
fn go_flannel_mixed_udp() -> Result<()> {
    require_root!();
    require_go_flannel!();
    mixed_cluster_carries_traffic("udp")
}

#[test]
fn go_flannel_migration_host_gw() -> Result<()> {
    require_root!();
    require_go_flannel!();
    migration_in_place("host-gw")
}

#[test]
fn go_flannel_migration_udp() -> Result<()> {
    require_root!();
    require_go_flannel!();
    migration_in_place("udp")
}

#[test]
fn go_flannel_mixed_vxlan() -> Result<()> {
    require_root!();
    require_go_flannel!();
    mixed_cluster_carries_traffic("vxlan")
}

#[test]
fn go_flannel_migration_vxlan() -> Result<()> {
    require_root!();
    require_go_flannel!();
    migration_in_place("vxlan")
}
