//! Dual stack (`EnableIPv6`, `IPv6Network`): leases in the `&` key form, subnet.env's IPv6
//! lines, pods given both families by our CNI plugin, and IPv6 pod traffic over an IPv6
//! underlay beside the IPv4 one.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use netns_tests::cluster::{Cluster, Pod};
use netns_tests::proc::run_in;
use netns_tests::traffic::tcp_transfer;
use netns_tests::wait_until;

use crate::require_root;

const START: Duration = Duration::from_secs(20);
const IPV6_NETWORK: &str = "fc00:44::/48";

fn config(backend: &str) -> String {
    format!(
        r#"{{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"{IPV6_NETWORK}","Backend":{backend}}}"#
    )
}

/// A dual-stack cluster of `n` nodes running `backend` with `flags`, one pod on each, both
/// families pinging.
fn dual_stack_mesh_with(n: usize, backend: &str, flags: &[&str]) -> Result<(Cluster, Vec<Pod>)> {
    let mut c = Cluster::new_dual_stack(n)?;
    c.put_config(&config(backend))?;
    for i in 0..n {
        c.start_daemon(i, flags)?;
        c.wait_subnet_env(i, START)?;
    }
    let pods: Vec<Pod> = (0..n).map(|i| c.add_pod(i)).collect::<Result<_>>()?;
    // New IPv6 addresses pass duplicate detection before they carry traffic.
    let took = wait_until(
        "both families ping across nodes",
        Duration::from_secs(20),
        || mesh6(&c, &pods).is_ok() && c.ping_mesh(&pods).is_ok(),
    )?;
    eprintln!("{backend}: v4 and v6 mesh of {n} nodes in {took:?}");
    Ok((c, pods))
}

/// Pings every pod's IPv6 address from every other pod.
fn mesh6(c: &Cluster, pods: &[Pod]) -> Result<()> {
    for a in pods {
        for b in pods.iter().filter(|b| b.ns != a.ns) {
            let to = b.ipv6.as_deref().context("a pod without IPv6")?;
            c.ping(a, to, 1)
                .with_context(|| format!("ping {} -> {to}", a.ns))?;
        }
    }
    Ok(())
}

/// The largest ICMPv6 echo payload that passes with DF between two pods, by trying `fits` and
/// `fits + 1`: the first must pass, the second must fail as too big.
fn v6_mtu_edge(from: &Pod, to: &str, fits: u32) -> Result<()> {
    let ping = |size: u32| {
        run_in(
            &from.ns,
            "ping",
            &[
                "-c",
                "1",
                "-W",
                "2",
                "-M",
                "do",
                "-s",
                &size.to_string(),
                to,
            ],
        )
    };
    ping(fits).with_context(|| format!("{fits}-byte payload with DF"))?;
    ensure!(
        ping(fits + 1).is_err(),
        "{}-byte payload passed a {fits}-byte path",
        fits + 1
    );
    Ok(())
}

#[test]
fn dual_stack_host_gw_leases_env_pods_and_v6_traffic() -> Result<()> {
    require_root!();
    let flags = [
        "--ip-blackhole-route",
        "--iptables-resync=1",
        "--metrics-port=9101",
    ];
    let (c, pods) = dual_stack_mesh_with(3, r#"{"Type":"host-gw"}"#, &flags)?;
    // Both families' blackhole routes, and they stay put across resyncs (the kernel lists the
    // IPv6 one on `lo`, which must not make it look like a stranger's).
    std::thread::sleep(Duration::from_secs(3));
    let v4 = c.nodes[0].run("ip", &["route", "show", "type", "blackhole"])?;
    let v6 = c.nodes[0].run("ip", &["-6", "route", "show", "type", "blackhole"])?;
    ensure!(
        v4.contains("proto 70") && v6.contains("fc00:44:"),
        "{v4}{v6}"
    );
    let (_, metrics) = netns_tests::traffic::http_get(&c.nodes[0].ns, 9101, "/metrics")?;
    for counter in [
        "flanneld_stale_routes_removed_total",
        "flanneld_repairs_total",
    ] {
        ensure!(
            netns_tests::traffic::metric(&metrics, counter) == Some(0.0),
            "{counter} moved: the blackholes are fought over\n{metrics}"
        );
    }
    let leases = c.leases()?;
    ensure!(leases.len() == 3, "{leases:?}");
    for (key, value) in &leases {
        ensure!(
            key.contains('&') && key.contains("-24&fc00:44:"),
            "not a dual-stack key: {key}"
        );
        let v: serde_json::Value = serde_json::from_str(value)?;
        let v6 = v["PublicIPv6"].as_str().context("no PublicIPv6")?;
        ensure!(
            c.nodes.iter().any(|n| n.ipv6.as_deref() == Some(v6)),
            "PublicIPv6 {v6} is no node's"
        );
    }
    let env = std::fs::read_to_string(c.nodes[0].subnet_file())?;
    ensure!(
        env.contains(&format!("FLANNEL_IPV6_NETWORK={IPV6_NETWORK}\n"))
            && env.contains("FLANNEL_IPV6_SUBNET=fc00:44:"),
        "{env}"
    );
    // Peers' IPv6 subnets go via their PublicIPv6, on the IPv6 underlay.
    let routes = c.nodes[0].run("ip", &["-6", "route", "show", "proto", "70"])?;
    ensure!(
        routes
            .lines()
            .filter(|l| l.contains("via fd00:30::"))
            .count()
            == 2,
        "{routes}"
    );
    // Hashed transfers both ways over IPv6.
    for (a, b) in [(0, 1), (1, 0)] {
        let to = pods[b].ipv6.as_deref().context("no IPv6")?;
        let (sent, received) = tcp_transfer(&pods[a].ns, &pods[b].ns, to, 8 << 20)?;
        ensure!(sent == received, "n{} -> n{}: hashes differ", a + 1, b + 1);
    }
    // host-gw adds nothing: a 1500-byte IPv6 packet (1452 bytes of ICMPv6 payload) passes.
    let to = pods[1].ipv6.as_deref().context("no IPv6")?;
    v6_mtu_edge(&pods[0], to, 1500 - 40 - 8)?;
    Ok(())
}

/// Two nodes of ours and one Go Flannel v0.20.2 node, dual-stack host-gw: v4 and v6 pods reach
/// each other across the implementations, and their leases agree in form.
#[test]
fn dual_stack_host_gw_mixed_with_go_flannel() -> Result<()> {
    require_root!();
    if netns_tests::must_skip(netns_tests::goflannel::missing())? {
        return Ok(());
    }
    let mut c = Cluster::new_dual_stack(3)?;
    c.put_config(&config(r#"{"Type":"host-gw"}"#))?;
    for i in 0..2 {
        c.start_daemon(i, &[])?;
        c.wait_subnet_env(i, START)?;
    }
    c.start_go_flannel(2, &[])?;
    c.wait_subnet_env(2, Duration::from_secs(30))?;
    let pods: Vec<Pod> = (0..3).map(|i| c.add_pod(i)).collect::<Result<_>>()?;
    let took = wait_until(
        "both families across implementations",
        Duration::from_secs(20),
        || mesh6(&c, &pods).is_ok() && c.ping_mesh(&pods).is_ok(),
    )?;
    eprintln!("mixed dual-stack host-gw mesh in {took:?}");
    let leases = c.leases()?;
    ensure!(leases.len() == 3, "{leases:?}");
    for (key, value) in &leases {
        ensure!(key.contains('&'), "{key}");
        ensure!(
            value.contains(r#""PublicIPv6":"fd00:30::"#),
            "{key}: {value}"
        );
    }
    for (a, b) in [(0, 2), (2, 1)] {
        let to = pods[b].ipv6.as_deref().context("no IPv6")?;
        let (sent, received) = tcp_transfer(&pods[a].ns, &pods[b].ns, to, 8 << 20)?;
        ensure!(
            sent == received,
            "n{} -> n{} over IPv6: hashes differ",
            a + 1,
            b + 1
        );
    }
    Ok(())
}
