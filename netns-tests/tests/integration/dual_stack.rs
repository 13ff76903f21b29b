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

/// A dual-stack cluster of `n` nodes running `backend`, one pod on each, both families pinging.
fn dual_stack_mesh(n: usize, backend: &str) -> Result<(Cluster, Vec<Pod>)> {
    let mut c = Cluster::new_dual_stack(n)?;
    c.put_config(&config(backend))?;
    for i in 0..n {
        c.start_daemon(i, &[])?;
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
    let (c, pods) = dual_stack_mesh(3, r#"{"Type":"host-gw"}"#)?;
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

/// UDP datagrams node `i` has sent over IPv4 and over IPv6 (its namespace's MIB counters).
fn udp_out(c: &Cluster, i: usize) -> Result<(u64, u64)> {
    let snmp = c.nodes[i].run("cat", &["/proc/net/snmp"])?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (names, values) = (udp.next().context("no Udp: line")?, udp.next());
    let at = names
        .split_whitespace()
        .position(|n| n == "OutDatagrams")
        .context("no OutDatagrams")?;
    let v4 = values
        .and_then(|v| v.split_whitespace().nth(at))
        .and_then(|v| v.parse().ok())
        .context("Udp OutDatagrams")?;
    let snmp6 = c.nodes[i].run("cat", &["/proc/net/snmp6"])?;
    let v6 = snmp6
        .lines()
        .find_map(|l| l.strip_prefix("Udp6OutDatagrams"))
        .and_then(|v| v.trim().parse().ok())
        .context("Udp6OutDatagrams")?;
    Ok((v4, v6))
}

/// Pings `to` from `from` 10 times and returns how many UDP datagrams `from`'s node sent
/// meanwhile over IPv4 and over IPv6.
fn underlay_of(c: &Cluster, from: &Pod, to: &str) -> Result<(u64, u64)> {
    let before = udp_out(c, from.node)?;
    c.ping(from, to, 10)?;
    let after = udp_out(c, from.node)?;
    Ok((after.0 - before.0, after.1 - before.1))
}

fn v6(pod: &Pod) -> Result<String> {
    pod.ipv6.clone().context("a pod without IPv6")
}

/// The wireguard device `dev` of node `i`: a TUN with the pod MTU.
fn wg_device(c: &Cluster, i: usize, dev: &str) -> Result<()> {
    let link = c.nodes[i].run("ip", &["-d", "link", "show", dev])?;
    ensure!(
        link.contains("mtu 1420") && link.contains("tun"),
        "n{}: {link}",
        i + 1
    );
    Ok(())
}

#[test]
fn dual_stack_wireguard_separate_and_single_device_modes() -> Result<()> {
    require_root!();
    // Separate (Flannel's default): flannel-wg for IPv4 over IPv4, flannel-wg-v6 for IPv6
    // over IPv6, one key.
    let (c, pods) = dual_stack_mesh(3, r#"{"Type":"wireguard"}"#)?;
    let leases = c.leases()?;
    ensure!(leases.len() == 3, "{leases:?}");
    for (key, value) in &leases {
        let v: serde_json::Value = serde_json::from_str(value)?;
        let (v4, v6) = (&v["BackendData"], &v["BackendV6Data"]);
        ensure!(
            v["BackendType"] == "wireguard"
                && v4["PublicKey"].is_string()
                && v4["PublicKey"] == v6["PublicKey"]
                && v4["Port"] == 51820
                && v6["Port"] == 51821,
            "{key}: {value}"
        );
        ensure!(key.contains('&'), "not a dual-stack key: {key}");
    }
    for i in 0..3 {
        wg_device(&c, i, "flannel-wg")?;
        wg_device(&c, i, "flannel-wg-v6")?;
        // One route for each whole Network, each into its family's device.
        let r6 = c.nodes[i].run("ip", &["-6", "route", "show", "dev", "flannel-wg-v6"])?;
        ensure!(r6.contains(&format!("{IPV6_NETWORK} ")), "n{}: {r6}", i + 1);
        let r4 = c.nodes[i].run("ip", &["-4", "route", "show", "dev", "flannel-wg"])?;
        ensure!(r4.contains("10.244.0.0/16 "), "n{}: {r4}", i + 1);
    }
    // Each family on its own underlay.
    let (d4, d6) = underlay_of(&c, &pods[0], &pods[1].ip)?;
    ensure!(
        d4 >= 10 && d6 == 0,
        "IPv4 pings: {d4} v4 / {d6} v6 datagrams"
    );
    let (d4, d6) = underlay_of(&c, &pods[0], &v6(&pods[1])?)?;
    ensure!(
        d6 >= 10 && d4 == 0,
        "IPv6 pings: {d4} v4 / {d6} v6 datagrams"
    );
    for (a, b) in [(0, 1), (1, 0), (2, 0)] {
        let started = std::time::Instant::now();
        let (sent, received) = tcp_transfer(&pods[a].ns, &pods[b].ns, &v6(&pods[b])?, 32 << 20)?;
        ensure!(sent == received, "n{} -> n{}: hashes differ", a + 1, b + 1);
        eprintln!(
            "wireguard separate: 32 MiB n{} -> n{} over IPv6 in {:?}",
            a + 1,
            b + 1,
            started.elapsed()
        );
    }
    // The pod MTU (1500 - 80) fills an IPv6 outer packet to the underlay's 1500 exactly.
    v6_mtu_edge(&pods[0], &v6(&pods[2])?, 1420 - 40 - 8)?;
    drop(c);

    // Mode ipv6: flannel-wg alone carries both families, every peer reached over IPv6.
    let (c, pods) = dual_stack_mesh(3, r#"{"Type":"wireguard","Mode":"ipv6"}"#)?;
    for i in 0..3 {
        wg_device(&c, i, "flannel-wg")?;
        ensure!(
            c.nodes[i]
                .run("ip", &["link", "show", "flannel-wg-v6"])
                .is_err(),
            "n{}: a second device in Mode ipv6",
            i + 1
        );
    }
    for to in [pods[1].ip.clone(), v6(&pods[1])?] {
        let (d4, d6) = underlay_of(&c, &pods[0], &to)?;
        ensure!(d6 >= 10 && d4 == 0, "to {to}: {d4} v4 / {d6} v6 datagrams");
    }
    let (sent, received) = tcp_transfer(&pods[2].ns, &pods[0].ns, &pods[0].ip, 8 << 20)?;
    ensure!(sent == received, "IPv4 over IPv6: hashes differ");
    Ok(())
}
