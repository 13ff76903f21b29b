//! The vxlan backend end to end: Flannel's device, lease data and per-peer entries; the wire
//! as a capture decodes it; a node wired by hand exactly as Go Flannel wires it; convergence;
//! restarts that keep the MAC and live connections; stale-entry cleanup; malformed leases;
//! VNI/Port/GBP/MTU/DirectRouting.

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use netns_tests::cluster::{Cluster, Pod, ETCD_PREFIX};
use netns_tests::proc::{run_in, Daemon};
use netns_tests::traffic::{in_netns, tcp_transfer, TestRng};
use netns_tests::{goflannel, wait_until};

use crate::require_root;

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const MASQ: &[&str] = &["--ip-masq"];
const START: Duration = Duration::from_secs(20);
/// Generous: the machine is shared with other builds and namespace tests.
const PROGRAMMED: Duration = Duration::from_secs(5);

/// Starts the daemon on each of `nodes`, one after the other, waiting for its subnet.env.
fn start_nodes(c: &mut Cluster, nodes: &[usize], extra: &[&str]) -> Result<()> {
    for &i in nodes {
        c.start_daemon(i, extra)?;
        c.wait_subnet_env(i, START)?;
    }
    Ok(())
}

/// The subnet node `i` leased, from its subnet.env: (`10.244.7.0/24`, `10.244.7.0`).
fn node_subnet(c: &Cluster, i: usize) -> Result<(String, String)> {
    let subnet = c.lease_subnet(i)?;
    let addr = subnet.split('/').next().unwrap_or_default().to_string();
    Ok((subnet, addr))
}

fn lease_key(subnet: &str) -> String {
    format!("{ETCD_PREFIX}/subnets/{}", subnet.replace('/', "-"))
}

/// A node's lease value as etcd holds it.
fn lease_value(c: &Cluster, i: usize) -> Result<String> {
    let (subnet, _) = node_subnet(c, i)?;
    c.etcd()?
        .get(&lease_key(&subnet))?
        .with_context(|| format!("no lease for n{}", i + 1))
}

/// The MAC of a device in node `i`, as the kernel reports it.
fn device_mac(c: &Cluster, i: usize, dev: &str) -> Result<String> {
    Ok(c.nodes[i]
        .run("cat", &[&format!("/sys/class/net/{dev}/address")])?
        .trim()
        .to_string())
}

fn device_ifindex(c: &Cluster, i: usize, dev: &str) -> Result<String> {
    Ok(c.nodes[i]
        .run("cat", &[&format!("/sys/class/net/{dev}/ifindex")])?
        .trim()
        .to_string())
}

/// The three entries node `i` holds on `dev` for a peer, as `ip`/`bridge` print them.
struct Entries {
    neigh: String,
    fdb: String,
    routes: String,
}

fn entries(c: &Cluster, i: usize, dev: &str) -> Result<Entries> {
    let n = &c.nodes[i];
    Ok(Entries {
        neigh: n.run("ip", &["neigh", "show", "dev", dev])?,
        fdb: n.run("bridge", &["fdb", "show", "dev", dev])?,
        routes: n.run("ip", &["route", "show"])?,
    })
}

impl Entries {
    /// Whether the neighbour, FDB entry and onlink route Flannel installs for a peer are here.
    fn has_peer(&self, subnet: &str, addr: &str, mac: &str, public_ip: &str, dev: &str) -> bool {
        self.neigh
            .lines()
            .any(|l| l.starts_with(&format!("{addr} lladdr {mac} PERMANENT")))
            && self
                .fdb
                .lines()
                .any(|l| l.starts_with(&format!("{mac} dst {public_ip} self permanent")))
            && self.routes.lines().any(|l| {
                l.starts_with(&format!("{subnet} via {addr} dev {dev} "))
                    && l.contains("onlink")
                    && l.contains("proto 70")
            })
    }

    /// Whether nothing at all refers to the peer any more.
    fn lacks_peer(&self, subnet: &str, addr: &str, mac: &str) -> bool {
        !self
            .neigh
            .lines()
            .any(|l| l.starts_with(&format!("{addr} ")))
            && !self.fdb.lines().any(|l| l.starts_with(mac))
            && !self
                .routes
                .lines()
                .any(|l| l.starts_with(&format!("{subnet} ")))
    }
}

impl std::fmt::Display for Entries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "neigh:\n{}fdb:\n{}routes:\n{}",
            self.neigh, self.fdb, self.routes
        )
    }
}

/// What node `j` looks like to its peers: (subnet, lease address, VtepMAC, PublicIP).
fn peer_view(c: &Cluster, j: usize, dev: &str) -> Result<(String, String, String, String)> {
    let (subnet, addr) = node_subnet(c, j)?;
    Ok((subnet, addr, device_mac(c, j, dev)?, c.nodes[j].ip.clone()))
}

/// Waits until every node of `nodes` holds Flannel's entries for every other one.
fn wait_mesh(c: &Cluster, nodes: &[usize], dev: &str) -> Result<()> {
    for &i in nodes {
        for &j in nodes.iter().filter(|&&j| j != i) {
            let (subnet, addr, mac, ip) = peer_view(c, j, dev)?;
            let res = wait_until(
                &format!("n{} to program n{}", i + 1, j + 1),
                PROGRAMMED,
                || entries(c, i, dev).is_ok_and(|e| e.has_peer(&subnet, &addr, &mac, &ip, dev)),
            );
            if let Err(e) = res {
                bail!("{e}\n{}", entries(c, i, dev)?);
            }
        }
    }
    Ok(())
}

fn tcpdump() -> &'static Path {
    ["/usr/bin/tcpdump", "/usr/sbin/tcpdump"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .unwrap_or(Path::new("tcpdump"))
}

/// Captures on node `i`'s port of the underlay bridge while `traffic` runs, decoding UDP on
/// `port` as VXLAN; returns tcpdump's text once it has seen `count` packets (or 5 s passed).
fn capture(
    c: &Cluster,
    i: usize,
    port: u16,
    count: usize,
    traffic: impl FnOnce() -> Result<()>,
) -> Result<String> {
    let log = c.dir.path().join(format!("tcpdump-{port}.log"));
    let args: Vec<String> = [
        "-l",
        "-nn",
        "-t",
        "-i",
        &c.nodes[i].name,
        "-T",
        "vxlan",
        "-c",
        &count.to_string(),
        "udp",
        "port",
        &port.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut d = Daemon::spawn("tcpdump", Some(&c.underlay), tcpdump(), &args, &[], &log)?;
    wait_until("tcpdump to listen", Duration::from_secs(10), || {
        d.log_text().contains("listening on")
    })?;
    traffic()?;
    let _ = wait_until("tcpdump to see the packets", Duration::from_secs(5), || {
        !d.alive()
    });
    d.stop(Duration::from_secs(2));
    Ok(d.log_text())
}

/// A slow, steady TCP stream from one pod to another for `duration`: returns the bytes sent,
/// whether both ends' hashes agree, and the longest pause between two receptions.
fn paced_stream(
    from: &Pod,
    to: &Pod,
    duration: Duration,
) -> std::thread::JoinHandle<Result<(u64, bool, Duration)>> {
    let (from_ns, to_ns) = (from.ns.clone(), to.ns.clone());
    let to_ip = to.ip.clone();
    std::thread::spawn(move || {
        let addr: SocketAddr = format!("{to_ip}:7788").parse()?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let receiver = std::thread::spawn(move || {
            in_netns(&to_ns, move || {
                let listener = TcpListener::bind(addr)?;
                let _ = ready_tx.send(());
                let (mut conn, _) = listener.accept()?;
                conn.set_read_timeout(Some(Duration::from_secs(30)))?;
                let mut h = DefaultHasher::new();
                let mut buf = vec![0u8; 1 << 16];
                let (mut total, mut gap) = (0u64, Duration::ZERO);
                let mut last = Instant::now();
                loop {
                    let n = conn.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    gap = gap.max(last.elapsed());
                    last = Instant::now();
                    h.write(&buf[..n]);
                    total += n as u64;
                }
                Ok((total, h.finish(), gap))
            })
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("receiver did not start")?;
        let (sent, sent_hash) = in_netns(&from_ns, move || {
            let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            conn.set_write_timeout(Some(Duration::from_secs(30)))?;
            let mut rng = TestRng::new(7);
            let mut h = DefaultHasher::new();
            let start = Instant::now();
            let mut sent = 0u64;
            let mut chunk = [0u8; 1000];
            while start.elapsed() < duration {
                rng.fill(&mut chunk);
                conn.write_all(&chunk)?;
                h.write(&chunk);
                sent += chunk.len() as u64;
                std::thread::sleep(Duration::from_millis(5));
            }
            conn.shutdown(std::net::Shutdown::Write)?;
            Ok((sent, h.finish()))
        })?;
        let (got, got_hash, gap) = receiver
            .join()
            .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
        ensure!(got == sent, "received {got} of {sent} bytes");
        Ok((sent, got_hash == sent_hash, gap))
    })
}

#[test]
fn vxlan_mesh_wire_convergence_and_removal() -> Result<()> {
    require_root!();
    let mut c = Cluster::new(3)?;
    c.put_config(VXLAN)?;
    // As kube-flannel runs it: with --ip-masq the CNI bridge does not masquerade pod-to-pod
    // traffic, so the capture below shows the pods' own addresses inside VXLAN.
    start_nodes(&mut c, &[0, 1, 2], MASQ)?;

    // The device, the lease and subnet.env are Flannel's.
    for i in 0..3 {
        let node = &c.nodes[i];
        let mac = device_mac(&c, i, "flannel.1")?;
        let value = lease_value(&c, i)?;
        ensure!(
            value
                == format!(
                    r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#,
                    node.ip
                ),
            "lease value {value}"
        );
        let env = std::fs::read_to_string(node.subnet_file())?;
        ensure!(env.contains("FLANNEL_MTU=1450\n"), "subnet.env:\n{env}");
        let link = node.run("ip", &["-d", "link", "show", "flannel.1"])?;
        for want in [
            "mtu 1450",
            &format!("vxlan id 1 local {} dev eth0 ", node.ip),
            "dstport 8472",
            "nolearning",
            "UP",
        ] {
            ensure!(link.contains(want), "flannel.1 lacks {want:?}:\n{link}");
        }
        ensure!(!link.contains(" gbp"), "no GBP by default:\n{link}");
        let (_, addr) = node_subnet(&c, i)?;
        let addrs = node.run("ip", &["-4", "addr", "show", "dev", "flannel.1"])?;
        ensure!(
            addrs.contains(&format!("inet {addr}/32 ")),
            "flannel.1 address:\n{addrs}"
        );
    }
    wait_mesh(&c, &[0, 1, 2], "flannel.1")?;

    let pods: Vec<Pod> = (0..3).map(|i| c.add_pod(i)).collect::<Result<_>>()?;
    c.ping_mesh(&pods)?;

    // On the wire: VXLAN to port 8472, VNI 1, carrying the pods' own packets.
    let text = capture(&c, 0, 8472, 4, || c.ping(&pods[0], &pods[1].ip, 2))?;
    eprintln!("capture on n1's underlay port:\n{text}");
    let outer = format!("IP {}.", c.nodes[0].ip);
    ensure!(
        text.lines()
            .any(|l| l.starts_with(&outer)
                && l.contains(&format!("> {}.8472: VXLAN", c.nodes[1].ip))),
        "no VXLAN packet n1 -> n2:8472 in:\n{text}"
    );
    ensure!(text.contains("vni 1\n"), "no VNI 1 in:\n{text}");
    for want in [
        format!("IP {} > {}: ICMP echo request", pods[0].ip, pods[1].ip),
        format!("IP {} > {}: ICMP echo reply", pods[1].ip, pods[0].ip),
    ] {
        ensure!(text.contains(&want), "no {want:?} in:\n{text}");
    }

    // Bulk data arrives intact; the pod MTU is exactly what VXLAN leaves.
    for (from, to, bytes) in [(0, 1, 1u64 << 20), (0, 1, 50 << 20), (2, 0, 4 << 20)] {
        let (sent, received) = tcp_transfer(&pods[from].ns, &pods[to].ns, &pods[to].ip, bytes)?;
        ensure!(
            sent == received,
            "{bytes} bytes n{} -> n{}: hash mismatch",
            from + 1,
            to + 1
        );
    }
    run_in(
        &pods[0].ns,
        "ping",
        &["-c", "1", "-W", "2", "-M", "do", "-s", "1422", &pods[2].ip],
    )
    .context("a DF ping of exactly the pod MTU must pass")?;
    let over = run_in(
        &pods[0].ns,
        "ping",
        &["-c", "1", "-W", "2", "-M", "do", "-s", "1423", &pods[2].ip],
    );
    ensure!(
        over.is_err(),
        "a DF ping one byte over the pod MTU must fail"
    );

    // Convergence: from the moment a new node's lease is written to the first reply an
    // existing node's pod gets from it over VXLAN.
    let n4 = c.add_node()?;
    let watch_log = c.dir.path().join("etcd-watch.log");
    let mut watch = Daemon::spawn(
        "etcdctl-watch",
        Some(&c.underlay),
        Path::new("/usr/bin/etcdctl"),
        &[
            format!("--endpoints={}", c.etcd()?.endpoint),
            "watch".into(),
            "--prefix".into(),
            format!("{ETCD_PREFIX}/subnets/"),
        ],
        &[("ETCDCTL_API", "3")],
        &watch_log,
    )?;
    std::thread::sleep(Duration::from_millis(500));
    c.start_daemon(n4, MASQ)?;
    let mut key = None;
    let deadline = Instant::now() + START;
    while key.is_none() && Instant::now() < deadline {
        key = watch
            .log_text()
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{ETCD_PREFIX}/subnets/")))
            .map(str::to_string);
        if key.is_none() {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let written = Instant::now();
    watch.stop(Duration::from_secs(1));
    let key = key.context("the new node's lease never appeared")?;
    let addr4 = key.split('-').next().unwrap_or_default().to_string();
    run_in(
        &pods[0].ns,
        "ping",
        &["-c", "1", "-w", "20", "-i", "0.005", "-W", "1", &addr4],
    )
    .with_context(|| format!("pinging n4's flannel.1 ({addr4}) from n1's pod"))?;
    let convergence = written.elapsed();
    eprintln!(
        "convergence: lease {key} written -> first reply from n1's pod after {convergence:?}"
    );
    ensure!(
        convergence < Duration::from_secs(5),
        "convergence took {convergence:?}"
    );
    c.wait_subnet_env(n4, START)?;
    wait_mesh(&c, &[0, 1, 2, 3], "flannel.1")?;

    // A removed lease takes its neighbour, FDB entry and route with it, everywhere.
    let (subnet4, addr4, mac4, _) = peer_view(&c, n4, "flannel.1")?;
    c.stop_daemon(n4);
    c.etcd()?.ctl(&["del", &lease_key(&subnet4)])?;
    let deleted = Instant::now();
    for i in 0..3 {
        let res = wait_until(&format!("n{} to forget n4", i + 1), PROGRAMMED, || {
            entries(&c, i, "flannel.1").is_ok_and(|e| e.lacks_peer(&subnet4, &addr4, &mac4))
        });
        if let Err(e) = res {
            bail!("{e}\n{}", entries(&c, i, "flannel.1")?);
        }
    }
    eprintln!(
        "entries for a deleted lease gone on all nodes after {:?}",
        deleted.elapsed()
    );
    wait_mesh(&c, &[0, 1, 2], "flannel.1")?;
    c.ping_mesh(&pods)?;
    Ok(())
}

#[test]
fn vxlan_interop_with_a_node_wired_like_go_flannel() -> Result<()> {
    require_root!();
    let mut c = Cluster::new(3)?;
    c.put_config(VXLAN)?;
    start_nodes(&mut c, &[0, 1], &[])?;

    // Node 3 stands in for a Go Flannel node: flannel.1 and every entry made the way Go
    // Flannel makes them, and its lease in Flannel's JSON written with etcdctl.
    let gf = 2;
    let (gf_subnet, gf_addr, gf_mac) = ("10.244.250.0/24", "10.244.250.0", "6a:3f:52:0c:11:7e");
    let gf_ip = c.nodes[gf].ip.clone();
    let node = &c.nodes[gf];
    node.run(
        "ip",
        &[
            "link",
            "add",
            "flannel.1",
            "address",
            gf_mac,
            "mtu",
            "1450",
            "type",
            "vxlan",
            "id",
            "1",
            "local",
            &gf_ip,
            "dev",
            "eth0",
            "dstport",
            "8472",
            "nolearning",
        ],
    )?;
    node.run(
        "ip",
        &["addr", "add", &format!("{gf_addr}/32"), "dev", "flannel.1"],
    )?;
    node.run("ip", &["link", "set", "flannel.1", "up"])?;
    std::fs::write(
        node.subnet_file(),
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.250.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
    )?;
    c.etcd()?.put(
        &lease_key(gf_subnet),
        &format!(
            r#"{{"PublicIP":"{gf_ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{gf_mac}"}}}}"#
        ),
    )?;
    for j in 0..2 {
        let value: serde_json::Value = serde_json::from_str(&lease_value(&c, j)?)?;
        let mac = value["BackendData"]["VtepMAC"]
            .as_str()
            .context("lease without VtepMAC")?;
        let public_ip = value["PublicIP"]
            .as_str()
            .context("lease without PublicIP")?;
        let (subnet, addr) = node_subnet(&c, j)?;
        let node = &c.nodes[gf];
        node.run(
            "ip",
            &[
                "neigh",
                "replace",
                &addr,
                "lladdr",
                mac,
                "dev",
                "flannel.1",
                "nud",
                "permanent",
            ],
        )?;
        node.run(
            "bridge",
            &[
                "fdb",
                "replace",
                mac,
                "dev",
                "flannel.1",
                "dst",
                public_ip,
                "self",
                "permanent",
            ],
        )?;
        node.run(
            "ip",
            &[
                "route",
                "replace",
                &subnet,
                "via",
                &addr,
                "dev",
                "flannel.1",
                "onlink",
            ],
        )?;
    }

    // Our nodes wire the Go Flannel node from its lease alone.
    for i in 0..2 {
        let res = wait_until(
            &format!("n{} to program the Go node", i + 1),
            PROGRAMMED,
            || {
                entries(&c, i, "flannel.1")
                    .is_ok_and(|e| e.has_peer(gf_subnet, gf_addr, gf_mac, &gf_ip, "flannel.1"))
            },
        );
        if let Err(e) = res {
            bail!("{e}\n{}", entries(&c, i, "flannel.1")?);
        }
    }
    wait_mesh(&c, &[0, 1], "flannel.1")?;

    // Pod traffic both ways, including bulk data.
    let pods: Vec<Pod> = (0..3).map(|i| c.add_pod(i)).collect::<Result<_>>()?;
    c.ping_mesh(&pods)?;
    for (from, to) in [(0, 2), (2, 1)] {
        let (sent, received) = tcp_transfer(&pods[from].ns, &pods[to].ns, &pods[to].ip, 8 << 20)?;
        ensure!(
            sent == received,
            "n{} -> n{}: hash mismatch",
            from + 1,
            to + 1
        );
    }
    // Host to pod: the node's source address is its flannel.1 /32, which the Go node routes back.
    c.nodes[0]
        .run(
            "ping",
            &["-c", "2", "-i", "0.2", "-W", "1", "-q", &pods[2].ip],
        )
        .context("n1 (host) -> pod on the Go node")?;
    Ok(())
}

#[test]
fn vxlan_malformed_leases_are_skipped_and_named() -> Result<()> {
    require_root!();
    let mut c = Cluster::new(2)?;
    c.put_config(VXLAN)?;
    start_nodes(&mut c, &[0], &[])?;
    let bad = [
        (
            "10.244.251.0-24",
            r#"{"VNI":1,"VtepMAC":"zz:zz"}"#,
            "BackendData.VtepMAC",
        ),
        (
            "10.244.252.0-24",
            r#"{"VNI":1}"#,
            "BackendData.VtepMAC is missing",
        ),
        (
            "10.244.253.0-24",
            r#"{"VNI":2,"VtepMAC":"6a:00:00:00:00:01"}"#,
            "BackendData.VNI",
        ),
        (
            "10.244.254.0-24",
            r#"{"VNI":1,"VtepMAC":"ff:ff:ff:ff:ff:ff"}"#,
            "BackendData.VtepMAC",
        ),
    ];
    for (key, data, _) in bad {
        c.etcd()?.put(
            &format!("{ETCD_PREFIX}/subnets/{key}"),
            &format!(
                r#"{{"PublicIP":"172.30.0.99","PublicIPv6":null,"BackendType":"vxlan","BackendData":{data}}}"#
            ),
        )?;
    }
    // A good peer joining after the bad ones is programmed all the same.
    start_nodes(&mut c, &[1], &[])?;
    wait_mesh(&c, &[0, 1], "flannel.1")?;
    for (key, _, field) in bad {
        for i in 0..2 {
            wait_until(&format!("n{} to log {key}", i + 1), PROGRAMMED, || {
                c.nodes[i]
                    .log()
                    .lines()
                    .any(|l| l.contains(key) && l.contains(field))
            })
            .with_context(|| format!("log of n{}:\n{}", i + 1, c.nodes[i].log()))?;
        }
    }
    let line = c.nodes[0]
        .log()
        .lines()
        .find(|l| l.contains("10.244.251.0-24") && l.contains("VtepMAC"))
        .map(str::to_string)
        .unwrap_or_default();
    eprintln!("logged: {line}");
    for i in 0..2 {
        ensure!(
            c.nodes[i].daemon.as_mut().is_some_and(|d| d.alive()),
            "n{} died",
            i + 1
        );
        let e = entries(&c, i, "flannel.1")?;
        for net in ["10.244.251.", "10.244.252.", "10.244.253.", "10.244.254."] {
            ensure!(
                !e.neigh.contains(net) && !e.routes.contains(net),
                "n{} installed something for {net}0:\n{e}",
                i + 1
            );
        }
        ensure!(
            !e.fdb.contains("172.30.0.99"),
            "FDB entry for a bad lease:\n{e}"
        );
    }
    let pods: Vec<Pod> = (0..2).map(|i| c.add_pod(i)).collect::<Result<_>>()?;
    c.ping_mesh(&pods)?;
    Ok(())
}

#[test]
fn vxlan_restart_keeps_mac_connections_and_sweeps_stale_entries() -> Result<()> {
    require_root!();
    let mut c = Cluster::new(3)?;
    c.put_config(VXLAN)?;
    start_nodes(&mut c, &[0, 1, 2], &[])?;
    wait_mesh(&c, &[0, 1, 2], "flannel.1")?;
    let pods: Vec<Pod> = (0..2).map(|i| c.add_pod(i)).collect::<Result<_>>()?;
    c.ping_mesh(&pods)?;

    let before: Vec<(String, String, String)> = (0..2)
        .map(|i| {
            Ok((
                device_mac(&c, i, "flannel.1")?,
                device_ifindex(&c, i, "flannel.1")?,
                lease_value(&c, i)?,
            ))
        })
        .collect::<Result<_>>()?;

    // Restart both ends while a TCP connection between their pods carries data.
    let stream = paced_stream(&pods[0], &pods[1], Duration::from_secs(6));
    std::thread::sleep(Duration::from_millis(800));
    for i in [1, 0] {
        ensure!(c.stop_daemon(i) == Some(0), "SIGTERM should exit 0");
        std::fs::remove_file(c.nodes[i].subnet_file())?;
        c.start_daemon(i, &[])?;
        c.wait_subnet_env(i, START)?;
    }
    let (sent, same, gap) = stream
        .join()
        .map_err(|_| anyhow::anyhow!("stream thread panicked"))??;
    eprintln!("TCP across restarts: {sent} bytes intact={same}, longest pause {gap:?}");
    ensure!(same, "the stream's bytes changed");
    ensure!(
        gap < Duration::from_secs(2),
        "the stream stalled for {gap:?}"
    );
    for (i, was) in before.iter().enumerate() {
        let now = (
            device_mac(&c, i, "flannel.1")?,
            device_ifindex(&c, i, "flannel.1")?,
            lease_value(&c, i)?,
        );
        ensure!(
            now == *was,
            "n{} changed across the restart: {was:?} -> {now:?}",
            i + 1
        );
    }
    wait_mesh(&c, &[0, 1, 2], "flannel.1")?;

    // While n1's daemon is down: n3 leaves for good, and entries like those Go Flannel
    // leaves behind (routes without our protocol number) sit on flannel.1. A restart removes
    // all of them, and nothing else.
    let (subnet3, addr3, mac3, _) = peer_view(&c, 2, "flannel.1")?;
    c.stop_daemon(0);
    c.stop_daemon(2);
    c.etcd()?.ctl(&["del", &lease_key(&subnet3)])?;
    let n1 = &c.nodes[0];
    let (ghost_subnet, ghost_addr, ghost_mac) =
        ("10.244.249.0/24", "10.244.249.0", "6a:00:00:00:02:49");
    n1.run(
        "ip",
        &[
            "neigh",
            "replace",
            ghost_addr,
            "lladdr",
            ghost_mac,
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ],
    )?;
    n1.run(
        "bridge",
        &[
            "fdb",
            "replace",
            ghost_mac,
            "dev",
            "flannel.1",
            "dst",
            "172.30.0.99",
            "self",
            "permanent",
        ],
    )?;
    n1.run(
        "ip",
        &[
            "route",
            "replace",
            ghost_subnet,
            "via",
            ghost_addr,
            "dev",
            "flannel.1",
            "onlink",
        ],
    )?;
    // An operator's route through the device, outside the pod network, is not ours to remove.
    n1.run(
        "ip",
        &["route", "add", "192.168.77.0/24", "dev", "flannel.1"],
    )?;
    c.start_daemon(0, &[])?;
    let swept = wait_until("n1 to sweep stale entries", PROGRAMMED, || {
        entries(&c, 0, "flannel.1").is_ok_and(|e| {
            e.lacks_peer(&subnet3, &addr3, &mac3)
                && e.lacks_peer(ghost_subnet, ghost_addr, ghost_mac)
        })
    });
    if let Err(e) = swept {
        bail!(
            "{e}\n{}\nn1's log:\n{}",
            entries(&c, 0, "flannel.1")?,
            c.nodes[0].log()
        );
    }
    let routes = c.nodes[0].routes()?;
    ensure!(
        routes.contains("192.168.77.0/24 dev flannel.1"),
        "the operator's route was removed:\n{routes}"
    );
    wait_mesh(&c, &[0, 1], "flannel.1")?;
    c.ping_mesh(&pods)?;
    Ok(())
}

#[test]
fn vxlan_options_and_direct_routing() -> Result<()> {
    require_root!();
    let mut c = Cluster::new(2)?;
    c.put_config(
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":4096,"Port":4789,"GBP":true,"MTU":1400}}"#,
    )?;
    start_nodes(&mut c, &[0, 1], MASQ)?;
    let dev = "flannel.4096";
    for i in 0..2 {
        let link = c.nodes[i].run("ip", &["-d", "link", "show", dev])?;
        for want in [
            "mtu 1350",
            "vxlan id 4096 ",
            "dstport 4789",
            "gbp",
            "nolearning",
        ] {
            ensure!(link.contains(want), "{dev} lacks {want:?}:\n{link}");
        }
        let env = std::fs::read_to_string(c.nodes[i].subnet_file())?;
        ensure!(env.contains("FLANNEL_MTU=1350\n"), "subnet.env:\n{env}");
        let lease = lease_value(&c, i)?;
        ensure!(
            lease.contains(r#""BackendData":{"VNI":4096,"VtepMAC":""#),
            "{lease}"
        );
    }
    wait_mesh(&c, &[0, 1], dev)?;
    let pods: Vec<Pod> = (0..2).map(|i| c.add_pod(i)).collect::<Result<_>>()?;
    c.ping_mesh(&pods)?;
    let text = capture(&c, 0, 4789, 2, || c.ping(&pods[0], &pods[1].ip, 1))?;
    ensure!(
        text.contains("vni 4096\n")
            && text.contains(&format!(
                "IP {} > {}: ICMP echo request",
                pods[0].ip, pods[1].ip
            )),
        "capture on 4789:\n{text}"
    );

    // DirectRouting: the peer on our L2 gets a plain route; the restart reuses the device and
    // removes the VXLAN entries that are no longer wanted.
    let ifindex = device_ifindex(&c, 0, dev)?;
    let (subnet2, addr2, mac2, ip2) = peer_view(&c, 1, dev)?;
    c.put_config(
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":4096,"Port":4789,"GBP":true,"MTU":1400,"DirectRouting":true}}"#,
    )?;
    for i in 0..2 {
        c.stop_daemon(i);
        c.start_daemon(i, MASQ)?;
    }
    let direct = format!("{subnet2} via {ip2} dev eth0 proto 70");
    let res = wait_until("a direct route to n2", PROGRAMMED, || {
        entries(&c, 0, dev).is_ok_and(|e| {
            e.routes.contains(&direct) && !e.neigh.contains(&addr2) && !e.fdb.contains(&mac2)
        })
    });
    if let Err(e) = res {
        bail!("{e}\n{}", entries(&c, 0, dev)?);
    }
    let (subnet1, _) = node_subnet(&c, 0)?;
    let back = format!("{subnet1} via {} dev eth0 proto 70", c.nodes[0].ip);
    wait_until("a direct route back to n1", PROGRAMMED, || {
        c.nodes[1].routes().is_ok_and(|r| r.contains(&back))
    })?;
    ensure!(
        device_ifindex(&c, 0, dev)? == ifindex,
        "{dev} was recreated"
    );
    c.ping_mesh(&pods)?;

    // A peer behind a router (PublicIP off our subnet) still goes through VXLAN.
    let (far_subnet, far_addr, far_mac, far_ip) = (
        "10.244.248.0/24",
        "10.244.248.0",
        "6a:00:00:00:02:48",
        "172.31.5.5",
    );
    c.etcd()?.put(
        &lease_key(far_subnet),
        &format!(
            r#"{{"PublicIP":"{far_ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":4096,"VtepMAC":"{far_mac}"}}}}"#
        ),
    )?;
    let res = wait_until("VXLAN entries for the far peer", PROGRAMMED, || {
        entries(&c, 0, dev).is_ok_and(|e| e.has_peer(far_subnet, far_addr, far_mac, far_ip, dev))
    });
    if let Err(e) = res {
        bail!("{e}\n{}", entries(&c, 0, dev)?);
    }
    c.etcd()?.ctl(&["del", &lease_key(far_subnet)])?;
    let res = wait_until("the far peer's entries to go", PROGRAMMED, || {
        entries(&c, 0, dev).is_ok_and(|e| e.lacks_peer(far_subnet, far_addr, far_mac))
    });
    if let Err(e) = res {
        bail!("{e}\n{}", entries(&c, 0, dev)?);
    }
    ensure!(
        entries(&c, 0, dev)?.routes.contains(&direct),
        "the direct route must stay"
    );
    Ok(())
}

#[test]
fn vxlan_with_real_go_flannel_and_migration() -> Result<()> {
    require_root!();
    if netns_tests::must_skip(goflannel::missing())? {
        return Ok(());
    }
    let mut c = Cluster::new(3)?;
    c.put_config(VXLAN)?;
    start_nodes(&mut c, &[0, 1], &[])?;
    c.start_go_flannel(2, &[])?;
    c.wait_subnet_env(2, Duration::from_secs(30))?;

    // Go Flannel's lease has exactly our shape, and both sides wire each other the same way.
    let go_lease = lease_value(&c, 2)?;
    let go_mac = device_mac(&c, 2, "flannel.1")?;
    ensure!(
        go_lease
            == format!(
                r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{go_mac}"}}}}"#,
                c.nodes[2].ip
            ),
        "Go Flannel's lease: {go_lease}"
    );
    wait_mesh(&c, &[0, 1], "flannel.1")?;
    for i in 0..2 {
        let (subnet, addr, mac, ip) = peer_view(&c, 2, "flannel.1")?;
        wait_until(
            &format!("n{} to program the Go node", i + 1),
            PROGRAMMED,
            || {
                entries(&c, i, "flannel.1")
                    .is_ok_and(|e| e.has_peer(&subnet, &addr, &mac, &ip, "flannel.1"))
            },
        )?;
    }
    let pods: Vec<Pod> = (0..3).map(|i| c.add_pod(i)).collect::<Result<_>>()?;
    wait_until(
        "the mixed mesh to converge",
        Duration::from_secs(15),
        || c.ping_mesh(&pods).is_ok(),
    )?;
    for (from, to) in [(0, 2), (2, 1)] {
        let (sent, got) = tcp_transfer(&pods[from].ns, &pods[to].ns, &pods[to].ip, 50 << 20)?;
        ensure!(
            sent == got,
            "50 MB n{} -> n{}: hash mismatch",
            from + 1,
            to + 1
        );
    }

    // Migration in place: ours takes over Go Flannel's device, MAC and subnet.
    let ifindex = device_ifindex(&c, 2, "flannel.1")?;
    c.stop_daemon(2);
    c.start_daemon(2, &[])?;
    let t = Instant::now();
    wait_until(
        "n3 reachable under flanneld-rs",
        Duration::from_secs(10),
        || c.ping(&pods[0], &pods[2].ip, 1).is_ok() && c.ping(&pods[2], &pods[1].ip, 1).is_ok(),
    )?;
    eprintln!(
        "Go -> ours on n3: pods reach it again after {:?}",
        t.elapsed()
    );
    ensure!(
        device_mac(&c, 2, "flannel.1")? == go_mac,
        "the VtepMAC changed"
    );
    ensure!(
        device_ifindex(&c, 2, "flannel.1")? == ifindex,
        "flannel.1 was recreated"
    );
    ensure!(lease_value(&c, 2)? == go_lease, "the lease changed");
    c.ping_mesh(&pods)?;
    Ok(())
}
