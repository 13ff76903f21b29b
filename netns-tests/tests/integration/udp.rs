//! The udp backend end to end: mesh, large transfers with hashes, MTU edges, and hostile
//! datagrams on the encapsulation port.

use std::net::UdpSocket;
use std::time::Duration;

use anyhow::{ensure, Result};
use netns_tests::cluster::{Cluster, Pod};
use netns_tests::proc::{run_in, thread_cpu_ns};
use netns_tests::traffic::{http_get, in_netns, metric, tcp_transfer, udp_burst, TestRng};

use crate::require_root;

const UDP: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;
const METRICS: u16 = 9101;

fn udp_cluster(n: usize) -> Result<(Cluster, Vec<Pod>)> {
    Cluster::with_daemons(n, UDP, &[&format!("--metrics-port={METRICS}")])
}

/// A burst of same-size datagrams of one flow arrives as the pod sent it, datagram for
/// datagram, though the receiving node merges them into a few TUN writes (`GSO_UDP_L4`, cut
/// back by the kernel): sizes, boundaries and bytes intact, IPv4 and both datagram sizes.
#[test]
fn udp_bursts_arrive_datagram_for_datagram() -> Result<()> {
    require_root!();
    let (c, pods) = udp_cluster(2)?;
    let rx = |what: &str| {
        http_get(&c.nodes[1].ns, METRICS, "/metrics")
            .ok()
            .and_then(|(_, b)| metric(&b, &format!("{what}{{direction=\"rx\"}}")))
            .unwrap_or(0.0)
    };
    for (port, size) in [(7001, 64), (7002, 1400)] {
        let (packets, syscalls) = (
            rx("flanneld_datapath_packets_total"),
            rx("flanneld_datapath_syscalls_total"),
        );
        let got = udp_burst(&pods[0].ns, &pods[1].ns, &pods[1].ip, port, 20_000, size)?;
        eprintln!("udp burst of {size}-byte datagrams: {got:?}");
        ensure!(
            got.damaged == 0 && got.repeated == 0,
            "{size} bytes: {got:?}"
        );
        // A flood: what the path or the pod cannot take is dropped, as UDP may be.
        ensure!(got.whole >= 2_000, "{size} bytes: too few arrived: {got:?}");
        let per_call = (rx("flanneld_datapath_packets_total") - packets)
            / (rx("flanneld_datapath_syscalls_total") - syscalls).max(1.0);
        eprintln!("  {per_call:.1} packets per receive-side system call");
        ensure!(per_call > 2.0, "not merged: {per_call:.1} packets a call");
    }
    Ok(())
}

#[test]
fn udp_mesh_transfers_and_mtu_edges() -> Result<()> {
    require_root!();
    let (c, pods) = udp_cluster(3)?;
    let env = std::fs::read_to_string(c.nodes[0].subnet_file())?;
    ensure!(
        env.contains("FLANNEL_MTU=1472\n"),
        "udp MTU is underlay - 28:\n{env}"
    );
    let link = c.nodes[0].run("ip", &["-d", "link", "show", "flannel0"])?;
    ensure!(link.contains("mtu 1472") && link.contains("tun"), "{link}");
    c.ping_mesh(&pods)?;

    for (from, to, bytes) in [(0, 1, 1u64 << 20), (0, 1, 200 << 20), (2, 0, 1 << 20)] {
        let (sent, received) = tcp_transfer(&pods[from].ns, &pods[to].ns, &pods[to].ip, bytes)?;
        ensure!(
            sent == received,
            "{bytes} bytes n{} -> n{}: hash mismatch",
            from + 1,
            to + 1
        );
    }

    // A DF ping of exactly the pod MTU passes; one byte more is refused loudly, not lost.
    run_in(
        &pods[0].ns,
        "ping",
        &["-c", "1", "-W", "2", "-M", "do", "-s", "1444", &pods[1].ip],
    )?;
    let over = run_in(
        &pods[0].ns,
        "ping",
        &["-c", "1", "-W", "2", "-M", "do", "-s", "1445", &pods[1].ip],
    );
    let err = format!(
        "{:#}",
        over.err().map_or(anyhow::anyhow!("succeeded"), |e| e)
    );
    ensure!(
        err.contains("message too long") || err.contains("Frag needed"),
        "oversized DF ping: {err}"
    );

    let (_, body) = http_get(&c.nodes[0].ns, METRICS, "/metrics")?;
    let tx = metric(&body, "flanneld_datapath_packets_total{direction=\"tx\"}").unwrap_or(0.0);
    let calls = metric(&body, "flanneld_datapath_syscalls_total{direction=\"tx\"}").unwrap_or(0.0);
    ensure!(tx > 100_000.0, "tx packets {tx}");
    eprintln!(
        "n1 tx: {tx} packets in {calls} syscalls ({:.1} per syscall)",
        tx / calls.max(1.0)
    );
    Ok(())
}

/// The path to a peer with a smaller MTU than our datagrams (a route's `mtu` here; an ICMP
/// "fragmentation needed" does the same): the kernel refuses UDP GSO sends with segments over
/// it, and sends each datagram alone, fragmented. A transfer goes through whole, as with
/// Flannel, instead of losing every multi-segment run.
#[test]
fn udp_transfer_across_a_smaller_path_mtu() -> Result<()> {
    require_root!();
    let (c, pods) = udp_cluster(2)?;
    c.nodes[0].run(
        "ip",
        &[
            "route",
            "add",
            &format!("{}/32", c.nodes[1].ip),
            "dev",
            "eth0",
            "mtu",
            "1300",
        ],
    )?;
    // Bounded: without the fallback the transfer crawls on retransmitted single segments
    // for many minutes.
    let (from, to, ip) = (pods[0].ns.clone(), pods[1].ns.clone(), pods[1].ip.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(tcp_transfer(&from, &to, &ip, 20 << 20));
    });
    let (sent, received) = rx
        .recv_timeout(Duration::from_secs(60))
        .map_err(|_| anyhow::anyhow!("20 MiB did not get across within 60 s"))??;
    ensure!(
        sent == received,
        "20 MiB across the smaller path MTU: hash mismatch"
    );
    let (_, body) = http_get(&c.nodes[0].ns, METRICS, "/metrics")?;
    let lost = metric(&body, "flanneld_datapath_drops_total{reason=\"io_error\"}").unwrap_or(0.0);
    ensure!(lost == 0.0, "{lost} packets refused by the kernel");
    ensure!(
        c.nodes[0]
            .log()
            .contains("path MTU to a peer is below our datagrams"),
        "not logged"
    );
    Ok(())
}

/// Eight queues on two cores: each queue sends from its own port, so one peer's flows spread
/// over eight sender and eight receiver threads per node, far more threads than cores. Eight
/// streams each way at once arrive whole (a flow split across queues would reorder), and
/// more than one queue carried them.
#[test]
fn udp_eight_queues_keep_streams_whole() -> Result<()> {
    require_root!();
    let (c, pods) = Cluster::with_daemons(2, UDP, &["--datapath-queues=8"])?;
    c.ping(&pods[0], &pods[1].ip, 2)?;
    let pid = c.daemon_pid(0)?;
    let before = thread_cpu_ns(pid, "-tx")?;
    ensure!(before.len() == 8, "8 queues: 8 sender threads expected");
    c.streams_both_ways(&pods[0], &pods[1], 7801, 8, 16 << 20)?;
    let busy = thread_cpu_ns(pid, "-tx")?
        .iter()
        .zip(&before)
        .filter(|(after, before)| after > before)
        .count();
    ensure!(busy >= 2, "n1's streams left through {busy} of 8 queues");
    Ok(())
}

/// A well-formed UDP packet from `src` to `dst` (encap's shared test builder).
fn inner_packet(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    encap::wire::testutil::TcpSpec {
        src: std::net::Ipv4Addr::from(src).into(),
        dst: std::net::Ipv4Addr::from(dst).into(),
        ..encap::wire::testutil::TcpSpec::v4()
    }
    .udp()
    .ports(9, 9)
    .payload(&[0; 12])
    .build()
}

#[test]
fn hostile_datagrams_are_counted_and_harmless() -> Result<()> {
    require_root!();
    let (mut c, pods) = udp_cluster(3)?;
    let target = format!("{}:8285", c.nodes[1].ip);
    // 5,000 random datagrams from a peer's address (node 3): they reach the parser.
    let to = target.clone();
    in_netns(&c.nodes[2].ns, move || {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        let mut rng = TestRng::new(42);
        let mut buf = [0u8; 1500];
        for _ in 0..5000 {
            let len = 1 + (rng.next_u64() % 1499) as usize;
            rng.fill(&mut buf[..len]);
            sock.send_to(&buf[..len], &to)?;
        }
        Ok(())
    })?;
    // 1,000 well-formed packets from node 1 whose inner source is not node 1's subnet.
    let dst: std::net::Ipv4Addr = pods[1].ip.parse()?;
    let to = target.clone();
    in_netns(&c.nodes[0].ns, move || {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        for i in 0..1000u32 {
            sock.send_to(
                &inner_packet([10, 244, 250, (i % 250) as u8 + 1], dst.octets()),
                &to,
            )?;
            if i % 100 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    })?;
    netns_tests::traffic::wait_for_drops(
        &c.nodes[1].ns,
        METRICS,
        &[
            "unknown_sender",
            "spoofed_source",
            "not_for_us",
            "malformed",
        ],
        5940.0,
    );
    ensure!(
        c.nodes[1].daemon.as_mut().is_some_and(|d| d.alive()),
        "daemon on n2 died"
    );
    c.ping_mesh(&pods)?;

    let (status, body) = http_get(&c.nodes[1].ns, METRICS, "/metrics")?;
    ensure!(status.contains("200"), "{status}");
    let drop = |r: &str| {
        metric(
            &body,
            &format!("flanneld_datapath_drops_total{{reason=\"{r}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let spoofed = drop("spoofed_source");
    let total: f64 = [
        "unknown_sender",
        "spoofed_source",
        "not_for_us",
        "malformed",
    ]
    .iter()
    .map(|r| drop(r))
    .sum();
    eprintln!(
        "n2 drops: spoofed {spoofed}, malformed {}, not_for_us {}, total {total}",
        drop("malformed"),
        drop("not_for_us")
    );
    ensure!(spoofed >= 1000.0, "spoofed drops {spoofed}\n{body}");
    // Socket buffers are large, but a burst can still overflow in the kernel: allow 1% loss.
    ensure!(
        total >= 5940.0,
        "drops {total} for 6,000 hostile datagrams\n{body}"
    );
    let (h, _) = http_get(&c.nodes[1].ns, METRICS, "/healthz")?;
    ensure!(h.contains("200"), "healthz: {h}");
    Ok(())
}
