//! Dual stack (`EnableIPv6`, `IPv6Network`): leases in the `&` key form, subnet.env's IPv6
//! lines, pods given both families by our CNI plugin, and IPv6 pod traffic over an IPv6
//! underlay beside the IPv4 one, with host-gw and with vxlan (`flannel-v6.<VNI>`).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use netns_tests::cluster::{Cluster, Pod};
use netns_tests::goflannel;
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

/// A dual-stack cluster of `n` nodes running `backend` (daemons given `extra` flags), one pod
/// on each, both families pinging.
fn dual_stack_mesh(n: usize, backend: &str, extra: &[&str]) -> Result<(Cluster, Vec<Pod>)> {
    let mut c = Cluster::new_dual_stack(n)?;
    c.put_config(&config(backend))?;
    for i in 0..n {
        c.start_daemon(i, extra)?;
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
    let (c, pods) = dual_stack_mesh(3, r#"{"Type":"host-gw"}"#, &flags)?;
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

/// Node `i`'s IPv6 lease from its subnet.env: (`fc00:44:0:3::/64`, `fc00:44:0:3::`).
fn lease_subnet6(c: &Cluster, i: usize) -> Result<(String, String)> {
    let env = std::fs::read_to_string(c.nodes[i].subnet_file())?;
    let first = env
        .lines()
        .find_map(|l| l.strip_prefix("FLANNEL_IPV6_SUBNET="))
        .context("no FLANNEL_IPV6_SUBNET in subnet.env")?;
    let net: ipnet::Ipv6Net = first
        .parse()
        .with_context(|| format!("FLANNEL_IPV6_SUBNET={first}"))?;
    Ok((net.trunc().to_string(), net.network().to_string()))
}

fn sys_net(c: &Cluster, i: usize, dev: &str, attr: &str) -> Result<String> {
    Ok(c.nodes[i]
        .run("cat", &[&format!("/sys/class/net/{dev}/{attr}")])?
        .trim()
        .to_string())
}

/// Whether node `i` holds the IPv6 neighbour, FDB entry and onlink route for node `j`.
fn has_v6_peer(c: &Cluster, i: usize, j: usize) -> Result<bool> {
    let (subnet, addr) = lease_subnet6(c, j)?;
    let mac = sys_net(c, j, V6_DEV, "address")?;
    let ip6 = c.nodes[j].ipv6.clone().context("no IPv6 underlay")?;
    let n = &c.nodes[i];
    let neigh = n.run("ip", &["-6", "neigh", "show", "dev", V6_DEV])?;
    let fdb = n.run("bridge", &["fdb", "show", "dev", V6_DEV])?;
    let routes = n.run("ip", &["-6", "route", "show", "proto", "70"])?;
    Ok(neigh
        .lines()
        .any(|l| l.starts_with(&format!("{addr} lladdr {mac} PERMANENT")))
        && fdb
            .lines()
            .any(|l| l.starts_with(&format!("{mac} dst {ip6} self permanent")))
        && routes.lines().any(|l| {
            l.starts_with(&format!("{subnet} via {addr} dev {V6_DEV} ")) && l.contains("onlink")
        }))
}

const V6_DEV: &str = "flannel-v6.1";

/// Both devices of node `i` as Flannel makes them: VNI, port, local address, MTU, address.
fn check_vxlan_devices(c: &Cluster, i: usize) -> Result<()> {
    let node = &c.nodes[i];
    let ip6 = node.ipv6.as_deref().context("no IPv6 underlay")?;
    for (dev, local, mtu) in [("flannel.1", node.ip.as_str(), 1450), (V6_DEV, ip6, 1430)] {
        let link = node.run("ip", &["-d", "link", "show", dev])?;
        for want in [
            format!("mtu {mtu} "),
            format!("vxlan id 1 local {local} dev eth0 "),
            "dstport 8472".to_string(),
            "nolearning".to_string(),
        ] {
            ensure!(link.contains(&want), "{dev} lacks {want:?}:\n{link}");
        }
    }
    let (_, addr6) = lease_subnet6(c, i)?;
    let addrs = node.run("ip", &["-6", "addr", "show", "dev", V6_DEV])?;
    ensure!(
        addrs.contains(&format!("inet6 {addr6}/128 ")),
        "{V6_DEV} address:\n{addrs}"
    );
    Ok(())
}

/// Each lease carries both devices' VTEPs: BackendData for flannel.1, BackendV6Data for
/// flannel-v6.1, each with the MAC the kernel reports.
fn check_vxlan_leases(c: &Cluster) -> Result<()> {
    let leases = c.leases()?;
    ensure!(leases.len() == c.nodes.len(), "{leases:?}");
    for (key, value) in &leases {
        let v: serde_json::Value = serde_json::from_str(value)?;
        let v6 = v["PublicIPv6"].as_str().context("no PublicIPv6")?;
        let i = c
            .nodes
            .iter()
            .position(|n| n.ipv6.as_deref() == Some(v6))
            .with_context(|| format!("{key}: PublicIPv6 {v6} is no node's"))?;
        for (field, dev) in [("BackendData", "flannel.1"), ("BackendV6Data", V6_DEV)] {
            let mac = sys_net(c, i, dev, "address")?;
            ensure!(
                v[field] == serde_json::json!({"VNI": 1, "VtepMAC": mac}),
                "{key}: {field} is not {dev}'s ({mac}): {value}"
            );
        }
    }
    Ok(())
}

/// Waits until node `i` holds node `j`'s IPv6 entries again; returns how long it took.
fn wait_v6_peer(c: &Cluster, i: usize, j: usize, what: &str) -> Result<Duration> {
    wait_until(what, Duration::from_secs(10), || {
        has_v6_peer(c, i, j).unwrap_or(false)
    })
    .with_context(|| format!("log of n{}:\n{}", i + 1, c.nodes[i].log()))
}

#[test]
fn dual_stack_vxlan_devices_leases_and_v6_traffic() -> Result<()> {
    require_root!();
    let (mut c, pods) = dual_stack_mesh(3, r#"{"Type":"vxlan"}"#, &["--iptables-resync=1"])?;
    for i in 0..3 {
        check_vxlan_devices(&c, i)?;
        let env = std::fs::read_to_string(c.nodes[i].subnet_file())?;
        // As Go Flannel: the IPv4 device's MTU, dual stack or not.
        ensure!(env.contains("FLANNEL_MTU=1450\n"), "subnet.env:\n{env}");
        for j in (0..3).filter(|&j| j != i) {
            ensure!(
                has_v6_peer(&c, i, j)?,
                "n{} lacks n{}'s IPv6 entries",
                i + 1,
                j + 1
            );
        }
    }
    check_vxlan_leases(&c)?;

    // Hashed transfers both ways over IPv6 in VXLAN.
    for (a, b) in [(0, 1), (1, 0)] {
        let to = pods[b].ipv6.as_deref().context("no IPv6")?;
        let (sent, received) = tcp_transfer(&pods[a].ns, &pods[b].ns, to, 8 << 20)?;
        ensure!(sent == received, "n{} -> n{}: hashes differ", a + 1, b + 1);
    }
    // The IPv6 device's MTU (1500 - 70) less the IPv6 and ICMPv6 headers passes with DF; one
    // byte more leaves the pod (MTU 1450) and bounces off flannel-v6.1.
    let to = pods[2].ipv6.as_deref().context("no IPv6")?;
    v6_mtu_edge(&pods[0], to, 1430 - 40 - 8)?;

    // Deleted behind the daemon's back: the IPv6 neighbour and route for n2, then the FDB
    // entry, then the whole device. Each comes back within --iptables-resync.
    let (subnet2, addr2) = lease_subnet6(&c, 1)?;
    let n1 = &c.nodes[0];
    n1.run("ip", &["-6", "route", "del", &subnet2, "dev", V6_DEV])?;
    n1.run("ip", &["-6", "neigh", "del", &addr2, "dev", V6_DEV])?;
    let took = wait_v6_peer(&c, 0, 1, "n1 to restore n2's IPv6 neighbour and route")?;
    eprintln!("IPv6 neighbour and route restored after {took:?}");
    let mac2 = sys_net(&c, 1, V6_DEV, "address")?;
    c.nodes[0].run("bridge", &["fdb", "del", &mac2, "dev", V6_DEV, "self"])?;
    let took = wait_v6_peer(&c, 0, 1, "n1 to restore n2's IPv6 FDB entry")?;
    eprintln!("IPv6 FDB entry restored after {took:?}");
    let mac1 = sys_net(&c, 0, V6_DEV, "address")?;
    c.nodes[0].run("ip", &["link", "del", V6_DEV])?;
    let took = wait_until(
        "n1 to recreate its IPv6 device",
        Duration::from_secs(10),
        || has_v6_peer(&c, 0, 1).unwrap_or(false) && has_v6_peer(&c, 0, 2).unwrap_or(false),
    )?;
    eprintln!("{V6_DEV} recreated and programmed after {took:?}");
    ensure!(
        sys_net(&c, 0, V6_DEV, "address")? == mac1,
        "recreated with another MAC"
    );
    check_vxlan_devices(&c, 0)?;
    wait_until(
        "IPv6 pings after the repairs",
        Duration::from_secs(10),
        || mesh6(&c, &pods).is_ok(),
    )?;

    // A restart reuses both devices: same ifindex, same MACs, same lease data. IPv6 entries
    // of a peer gone while it was down (as Go Flannel leaves them) are swept.
    let before = (
        sys_net(&c, 0, V6_DEV, "ifindex")?,
        sys_net(&c, 0, V6_DEV, "address")?,
        c.leases()?,
    );
    c.stop_daemon(0);
    // What Go Flannel leaves of a peer gone meanwhile, and a VXLAN device of an earlier
    // config (another VNI): both go; our own devices stay.
    let stale_mac = "0a:01:de:ad:00:99";
    for (prog, line) in [
        (
            "ip",
            format!(
                "-6 neigh replace fc00:44:0:99:: lladdr {stale_mac} dev {V6_DEV} nud permanent"
            ),
        ),
        (
            "ip",
            format!("-6 route replace fc00:44:0:99::/64 via fc00:44:0:99:: dev {V6_DEV} onlink"),
        ),
        (
            "bridge",
            format!("fdb replace {stale_mac} dev {V6_DEV} dst fd00:30::99 self permanent"),
        ),
        (
            "ip",
            "link add flannel-v6.7 type vxlan id 7 local fd00:30::11 dev eth0 dstport 8472".into(),
        ),
    ] {
        let args: Vec<&str> = line.split(' ').collect();
        c.nodes[0].run(prog, &args)?;
    }
    c.start_daemon(0, &["--iptables-resync=1"])?;
    // The log is appended to: the second start's line is the second one.
    wait_until("n1's daemon to program its peers again", START, || {
        c.nodes[0].log().matches("peers programmed").count() >= 2
    })?;
    let after = (
        sys_net(&c, 0, V6_DEV, "ifindex")?,
        sys_net(&c, 0, V6_DEV, "address")?,
        c.leases()?,
    );
    ensure!(before == after, "restart changed {before:?} into {after:?}");
    let n1 = &c.nodes[0];
    let state = [
        n1.run("ip", &["-6", "neigh", "show", "dev", V6_DEV])?,
        n1.run("ip", &["-6", "route", "show"])?,
        n1.run("bridge", &["fdb", "show", "dev", V6_DEV])?,
    ]
    .join("");
    ensure!(
        !state.contains("fc00:44:0:99:") && !state.contains(stale_mac),
        "stale IPv6 entries left:\n{state}"
    );
    let links = n1.run("ip", &["-o", "link", "show"])?;
    ensure!(
        !links.contains("flannel-v6.7"),
        "stale device kept:\n{links}"
    );
    // Our own address's kernel route (fc00:44:…::/128 proto kernel) survives the sweep.
    let (_, addr1) = lease_subnet6(&c, 0)?;
    ensure!(
        state.contains(&format!("{addr1} dev {V6_DEV} proto kernel")),
        "own /128 route gone:\n{state}"
    );
    mesh6(&c, &pods)?;
    c.ping_mesh(&pods)?;
    Ok(())
}

#[test]
fn ipv6_only_vxlan_runs_flannel_v6_alone() -> Result<()> {
    require_root!();
    let mut c = Cluster::new_dual_stack(2)?;
    c.put_config(&format!(
        r#"{{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"{IPV6_NETWORK}","Backend":{{"Type":"vxlan"}}}}"#
    ))?;
    for i in 0..2 {
        c.start_daemon(i, &[])?;
        c.wait_subnet_env(i, START)?;
    }
    let pods: Vec<Pod> = (0..2).map(|i| c.add_pod(i)).collect::<Result<_>>()?;
    wait_until("IPv6 pings across nodes", Duration::from_secs(20), || {
        mesh6(&c, &pods).is_ok()
    })?;
    for i in 0..2 {
        let links = c.nodes[i].run("ip", &["-o", "link", "show"])?;
        ensure!(
            links.contains(&format!(" {V6_DEV}: ")) && !links.contains(" flannel.1: "),
            "n{}: {links}",
            i + 1
        );
        let env = std::fs::read_to_string(c.nodes[i].subnet_file())?;
        // Our choice (Go says 1450): the IPv6 device's MTU, so full-size pod packets fit.
        ensure!(env.contains("FLANNEL_MTU=1430\n"), "subnet.env:\n{env}");
        ensure!(has_v6_peer(&c, i, 1 - i)?, "n{} lacks its peer", i + 1);
    }
    for (key, value) in c.leases()? {
        let v: serde_json::Value = serde_json::from_str(&value)?;
        ensure!(
            v.get("BackendData").is_none() && v["BackendV6Data"]["VtepMAC"].is_string(),
            "{key}: {value}"
        );
    }
    let to = pods[1].ipv6.as_deref().context("no IPv6")?;
    v6_mtu_edge(&pods[0], to, 1430 - 40 - 8)?;
    Ok(())
}

#[test]
fn dual_stack_vxlan_with_real_go_flannel_and_migration() -> Result<()> {
    require_root!();
    if netns_tests::must_skip(goflannel::missing())? {
        return Ok(());
    }
    let mut c = Cluster::new_dual_stack(3)?;
    c.put_config(&config(r#"{"Type":"vxlan"}"#))?;
    for i in 0..2 {
        c.start_daemon(i, &[])?;
        c.wait_subnet_env(i, START)?;
    }
    c.start_go_flannel(2, &[])?;
    c.wait_subnet_env(2, Duration::from_secs(30))?;
    // Go Flannel's lease and ours have one shape: both VTEPs, each its device's MAC.
    check_vxlan_leases(&c)?;
    let pods: Vec<Pod> = (0..3).map(|i| c.add_pod(i)).collect::<Result<_>>()?;
    wait_until("the mixed dual-stack mesh", Duration::from_secs(20), || {
        mesh6(&c, &pods).is_ok() && c.ping_mesh(&pods).is_ok()
    })
    .with_context(|| format!("Go Flannel's log:\n{}", c.nodes[2].log()))?;
    for i in 0..2 {
        ensure!(
            has_v6_peer(&c, i, 2)?,
            "n{} lacks the Go node's IPv6 entries",
            i + 1
        );
    }
    for (a, b) in [(0, 2), (2, 1)] {
        let to = pods[b].ipv6.as_deref().context("no IPv6")?;
        let (sent, received) = tcp_transfer(&pods[a].ns, &pods[b].ns, to, 8 << 20)?;
        ensure!(sent == received, "n{} -> n{}: hashes differ", a + 1, b + 1);
    }

    // Migration in place: ours takes over Go Flannel's IPv6 device, its MAC and the lease.
    let before = (
        sys_net(&c, 2, V6_DEV, "ifindex")?,
        sys_net(&c, 2, V6_DEV, "address")?,
        c.leases()?,
    );
    c.stop_daemon(2);
    c.start_daemon(2, &[])?;
    let took = wait_until("n3 reachable over IPv6 under flanneld-rs", START, || {
        mesh6(&c, &pods).is_ok()
    })?;
    eprintln!("Go -> ours on n3: IPv6 pods reach each other again after {took:?}");
    let after = (
        sys_net(&c, 2, V6_DEV, "ifindex")?,
        sys_net(&c, 2, V6_DEV, "address")?,
        c.leases()?,
    );
    ensure!(
        before == after,
        "migration changed {before:?} into {after:?}"
    );
    wait_until("n3's daemon to program its peers", START, || {
        c.nodes[2].log().contains("peers programmed")
    })?;
    // Go Flannel's routes on the devices are taken over as ours (proto 70), both families.
    let routes4 = c.nodes[2].run("ip", &["route", "show", "proto", "70"])?;
    for j in 0..2 {
        ensure!(has_v6_peer(&c, 2, j)?, "n3 lacks n{}'s IPv6 entries", j + 1);
        let subnet = c.lease_subnet(j)?;
        ensure!(
            routes4
                .lines()
                .any(|l| l.starts_with(&format!("{subnet} via ")) && l.contains("dev flannel.1")),
            "n3 did not take over n{}'s IPv4 route:\n{routes4}",
            j + 1
        );
    }
    ensure!(
        !c.nodes[2].log().contains("did not install"),
        "{}",
        c.nodes[2].log()
    );
    c.ping_mesh(&pods)?;
    Ok(())
}

/// Two nodes of ours and one Go Flannel v0.20.2 node, dual-stack host-gw: v4 and v6 pods reach
/// each other across the implementations, and their leases agree in form.
#[test]
fn dual_stack_host_gw_mixed_with_go_flannel() -> Result<()> {
    require_root!();
    if netns_tests::must_skip(goflannel::missing())? {
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
/// The wireguard tests count the node's UDP datagrams by family: the health probes (UDP too)
/// would add to them.
const NO_PROBES: &[&str] = &["--health-port=0"];

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
    let (c, pods) = dual_stack_mesh(3, r#"{"Type":"wireguard"}"#, NO_PROBES)?;
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
    let (c, pods) = dual_stack_mesh(3, r#"{"Type":"wireguard","Mode":"ipv6"}"#, NO_PROBES)?;
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

/// `Mode` ipv4: one device, and IPv6 pods carried over the IPv4 underlay (what Flannel allows
/// where the nodes have no IPv6 path between them).
#[test]
fn dual_stack_wireguard_mode_ipv4_carries_ipv6_pods_over_ipv4() -> Result<()> {
    require_root!();
    let (c, pods) = dual_stack_mesh(3, r#"{"Type":"wireguard","Mode":"ipv4"}"#, NO_PROBES)?;
    for i in 0..3 {
        wg_device(&c, i, "flannel-wg")?;
    }
    for to in [pods[1].ip.clone(), v6(&pods[1])?] {
        let (d4, d6) = underlay_of(&c, &pods[0], &to)?;
        ensure!(d4 >= 10 && d6 == 0, "to {to}: {d4} v4 / {d6} v6 datagrams");
    }
    let to = v6(&pods[0])?;
    let (sent, received) = tcp_transfer(&pods[2].ns, &pods[0].ns, &to, 8 << 20)?;
    ensure!(sent == received, "IPv6 over IPv4: hashes differ");
    Ok(())
}
