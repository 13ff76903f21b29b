//! Faults: etcd unreachable, etcd wiped, leases expiring during an outage, daemon restarts under
//! load, and floods of garbage on the encapsulation port. Each test prints its figures.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use netns_tests::cluster::{Cluster, Pod, ETCD_PREFIX};
use netns_tests::proc::run_in;
use netns_tests::traffic::{http_get, in_netns, metric, tcp_transfer, TestRng};
use netns_tests::wait_until;

use crate::require_root;

const METRICS: u16 = 9102;

fn config(backend: &str) -> String {
    format!(r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"{backend}"}}}}"#)
}

fn cluster(backend: &str, n: usize, extra: &[&str]) -> Result<(Cluster, Vec<Pod>)> {
    let mut c = Cluster::new(n)?;
    c.put_config(&config(backend))?;
    let metrics = format!("--metrics-port={METRICS}");
    let mut args = vec![metrics.as_str()];
    args.extend_from_slice(extra);
    for i in 0..n {
        c.start_daemon(i, &args)?;
        c.wait_subnet_env(i, Duration::from_secs(20))?;
    }
    let pods = (0..n).map(|i| c.add_pod(i)).collect::<Result<Vec<_>>>()?;
    wait_until("the mesh", Duration::from_secs(10), || {
        c.ping_mesh(&pods).is_ok()
    })?;
    Ok((c, pods))
}

/// Pauses (SIGSTOP) or resumes (SIGCONT) etcd: to the daemons it is unreachable, the harshest
/// kind of outage (no connection refused, requests just hang).
fn pause_etcd(c: &Cluster, stop: bool) -> Result<()> {
    let pid = c.etcd()?.pid().context("etcd has no pid")?;
    let sig = if stop { libc::SIGSTOP } else { libc::SIGCONT };
    // SAFETY: kill(2) on the etcd process this test started.
    ensure!(
        unsafe { libc::kill(pid as i32, sig) } == 0,
        "signalling etcd"
    );
    Ok(())
}

/// Pings `to` from `from` every 10 ms for `secs` seconds in the background; returns
/// (transmitted, received) when joined.
fn ping_in_background(
    from: &Pod,
    to: &Pod,
    secs: u32,
) -> std::thread::JoinHandle<Result<(u64, u64)>> {
    let (ns, ip) = (from.ns.clone(), to.ip.clone());
    std::thread::spawn(move || {
        let count = (secs * 100).to_string();
        // ping exits non-zero when any reply is missing; parse its summary either way.
        let out = std::process::Command::new("ip")
            .args([
                "netns", "exec", &ns, "ping", "-q", "-i", "0.01", "-W", "1", "-c", &count, &ip,
            ])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let line = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .with_context(|| format!("no ping summary in {text}"))?;
        let nums: Vec<u64> = line
            .split(',')
            .filter_map(|part| part.split_whitespace().next()?.parse().ok())
            .collect();
        Ok((
            nums.first().copied().unwrap_or(0),
            nums.get(1).copied().unwrap_or(0),
        ))
    })
}

fn etcd_outage_loses_no_pings(backend: &str) -> Result<()> {
    let (mut c, pods) = cluster(backend, 2, &[])?;
    let pinger = ping_in_background(&pods[0], &pods[1], 32);
    std::thread::sleep(Duration::from_secs(1));
    pause_etcd(&c, true)?;
    std::thread::sleep(Duration::from_secs(30));
    pause_etcd(&c, false)?;
    let (sent, got) = pinger
        .join()
        .map_err(|_| anyhow::anyhow!("pinger panicked"))??;
    eprintln!("{backend}: etcd unreachable 30 s: {got}/{sent} pings answered");
    ensure!(
        sent >= 3000 && got == sent,
        "{backend}: lost {} of {sent} pings",
        sent - got
    );
    for i in 0..2 {
        ensure!(
            c.nodes[i].daemon.as_mut().is_some_and(|d| d.alive()),
            "n{} died",
            i + 1
        );
    }
    // The watch resumed without a restart: a third node joining now is learned by both.
    let n3 = c.add_node()?;
    c.start_daemon(n3, &[&format!("--metrics-port={METRICS}")])?;
    c.wait_subnet_env(n3, Duration::from_secs(20))?;
    let p3 = c.add_pod(n3)?;
    let t = Instant::now();
    wait_until(
        "the old nodes to learn the new one",
        Duration::from_secs(15),
        || c.ping(&pods[0], &p3.ip, 1).is_ok() && c.ping(&pods[1], &p3.ip, 1).is_ok(),
    )?;
    eprintln!(
        "{backend}: new node reachable {:?} after its pod came up",
        t.elapsed()
    );
    let (_, body) = http_get(&c.nodes[0].ns, METRICS, "/metrics")?;
    let restarts = metric(&body, "flanneld_etcd_watch_restarts_total").unwrap_or(0.0);
    eprintln!("{backend}: n1 watch restarts {restarts}");
    Ok(())
}

#[test]
fn etcd_outage_host_gw() -> Result<()> {
    require_root!();
    etcd_outage_loses_no_pings("host-gw")
}

#[test]
fn etcd_outage_udp() -> Result<()> {
    require_root!();
    etcd_outage_loses_no_pings("udp")
}

#[test]
fn etcd_outage_vxlan() -> Result<()> {
    require_root!();
    etcd_outage_loses_no_pings("vxlan")
}

#[test]
fn etcd_wiped_leases_return_with_same_subnets() -> Result<()> {
    require_root!();
    let (c, pods) = cluster("udp", 3, &[])?;
    let before: Vec<String> = (0..3)
        .map(|i| std::fs::read_to_string(c.nodes[i].subnet_file()))
        .collect::<Result<_, _>>()?;
    let mut keys: Vec<String> = c.leases()?.into_iter().map(|(k, _)| k).collect();
    keys.sort();
    let t = Instant::now();
    c.etcd()?.ctl(&["del", "--prefix", ETCD_PREFIX])?;
    wait_until(
        "every lease to be re-created",
        Duration::from_secs(10),
        || c.leases().is_ok_and(|l| l.len() == 3),
    )?;
    let mut after: Vec<String> = c.leases()?.into_iter().map(|(k, _)| k).collect();
    after.sort();
    ensure!(after == keys, "subnets changed: {keys:?} -> {after:?}");
    wait_until("all pods reachable again", Duration::from_secs(10), || {
        c.ping_mesh(&pods).is_ok()
    })?;
    eprintln!(
        "etcd wiped: leases and traffic back after {:?}",
        t.elapsed()
    );
    for (i, b) in before.iter().enumerate() {
        ensure!(
            std::fs::read_to_string(c.nodes[i].subnet_file())? == *b,
            "subnet.env of n{} changed",
            i + 1
        );
    }
    // The operator restores the config; a daemon (re)starting meanwhile said clearly it lacked it.
    c.put_config(&config("udp"))?;
    Ok(())
}

#[test]
fn lease_expiring_during_outage_is_reacquired() -> Result<()> {
    require_root!();
    let (c, pods) = cluster("host-gw", 2, &["--subnet-lease-ttl=4s"])?;
    let keys: Vec<String> = c.leases()?.into_iter().map(|(k, _)| k).collect();
    pause_etcd(&c, true)?;
    std::thread::sleep(Duration::from_secs(10));
    // etcd expires both leases when it resumes: the daemons must notice and take them again.
    pause_etcd(&c, false)?;
    let t = Instant::now();
    wait_until("both leases back", Duration::from_secs(20), || {
        c.leases().is_ok_and(|l| {
            let mut k: Vec<String> = l.into_iter().map(|(k, _)| k).collect();
            k.sort();
            let mut want = keys.clone();
            want.sort();
            k == want
        })
    })?;
    wait_until("traffic", Duration::from_secs(10), || {
        c.ping_mesh(&pods).is_ok()
    })?;
    eprintln!(
        "TTL 4 s, etcd unreachable 10 s: same leases back {:?} after etcd returned",
        t.elapsed()
    );
    let log = c.nodes[0].log();
    ensure!(
        log.contains("lease lost") || log.contains("lease renewal failed"),
        "n1 log should say the lease was lost or unrenewable:\n{log}"
    );
    Ok(())
}

/// etcd stopped long enough for renewals to fail: while the daemon retries acquiring, what
/// someone removes of ours is still put back every resync period (it waited for etcd).
#[test]
fn routes_are_repaired_while_etcd_is_down() -> Result<()> {
    require_root!();
    let (mut c, pods) = cluster(
        "host-gw",
        2,
        &["--subnet-lease-ttl=4s", "--iptables-resync=1"],
    )?;
    c.etcd.as_mut().context("etcd")?.stop();
    wait_until("n1 to try acquiring again", Duration::from_secs(20), || {
        c.nodes[0].log().contains("acquiring again")
    })?;
    let route = c.nodes[0]
        .routes()?
        .lines()
        .find(|l| l.contains(&format!("via {}", c.nodes[1].ip)))
        .map(str::to_string)
        .context("no route to n2's pods")?;
    let dst = route
        .split_whitespace()
        .next()
        .context("route")?
        .to_string();
    c.nodes[0].run("ip", &["route", "del", &dst])?;
    wait_until(
        "the route back with etcd still down",
        Duration::from_secs(5),
        || c.nodes[0].routes().is_ok_and(|r| r.contains(&route)),
    )?;
    ensure!(
        c.ping_mesh(&pods).is_ok(),
        "pods cut off while etcd is down"
    );
    c.etcd.as_mut().context("etcd")?.start_again(false)?;
    wait_until(
        "traffic after etcd returned",
        Duration::from_secs(20),
        || c.ping_mesh(&pods).is_ok(),
    )?;
    Ok(())
}

fn restart_keeps_tcp(backend: &str) -> Result<()> {
    let (mut c, pods) = cluster(backend, 2, &[])?;
    let (a, b) = (pods[0].clone(), pods[1].clone());
    let transfer = std::thread::spawn(move || tcp_transfer(&a.ns, &b.ns, &b.ip, 600 << 20));
    std::thread::sleep(Duration::from_millis(500));
    let subnet = std::fs::read_to_string(c.nodes[1].subnet_file())?;
    ensure!(c.stop_daemon(1) == Some(0), "SIGTERM should exit 0");
    c.start_daemon(1, &[&format!("--metrics-port={METRICS}")])?;
    let (sent, got) = transfer
        .join()
        .map_err(|_| anyhow::anyhow!("transfer panicked"))??;
    ensure!(sent == got, "{backend}: data corrupted across the restart");
    ensure!(
        std::fs::read_to_string(c.nodes[1].subnet_file())? == subnet,
        "subnet changed"
    );
    let links = c.nodes[1].run("ip", &["-o", "link"])?;
    ensure!(
        links.matches("flannel").count() <= 1,
        "stale devices: {links}"
    );
    eprintln!("{backend}: a 600 MB TCP transfer survived a daemon restart on the receiver");
    Ok(())
}

#[test]
fn restart_keeps_tcp_host_gw() -> Result<()> {
    require_root!();
    restart_keeps_tcp("host-gw")
}

#[test]
fn restart_keeps_tcp_udp() -> Result<()> {
    require_root!();
    restart_keeps_tcp("udp")
}

fn million_random_datagrams(backend: &str, port: u16) -> Result<()> {
    let (mut c, pods) = cluster(backend, 3, &[])?;
    let pid = c.nodes[1]
        .daemon
        .as_ref()
        .and_then(|d| d.pid())
        .context("pid")?;
    // `ip netns exec` execs the daemon, so the pid is the daemon's own.
    let rss_before = netns_tests::proc::rss_kib(pid)?;
    let target = format!("{}:{port}", c.nodes[1].ip);
    let t = Instant::now();
    in_netns(&c.nodes[2].ns, move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
        let mut rng = TestRng::new(7);
        let mut buf = [0u8; 1400];
        for i in 0..1_000_000u32 {
            let len = 1 + (rng.next_u64() % 1399) as usize;
            rng.fill(&mut buf[..len]);
            let _ = sock.send_to(&buf[..len], &target);
            if i % 20_000 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    })?;
    let took = t.elapsed();
    netns_tests::traffic::wait_for_drops(
        &c.nodes[1].ns,
        METRICS,
        &[
            "unknown_sender",
            "not_authentic",
            "spoofed_source",
            "not_for_us",
            "malformed",
        ],
        500_000.0,
    );
    ensure!(
        c.nodes[1].daemon.as_mut().is_some_and(|d| d.alive()),
        "n2 died"
    );
    c.ping_mesh(&pods)?;
    let rss_after = netns_tests::proc::rss_kib(pid)?;
    let (_, body) = http_get(&c.nodes[1].ns, METRICS, "/metrics")?;
    let drops: f64 = [
        "unknown_sender",
        "not_authentic",
        "spoofed_source",
        "not_for_us",
        "malformed",
    ]
    .iter()
    .filter_map(|r| {
        metric(
            &body,
            &format!("flanneld_datapath_drops_total{{reason=\"{r}\"}}"),
        )
    })
    .sum();
    eprintln!(
        "{backend}: 1,000,000 random datagrams in {took:?}: {drops} dropped and counted (the rest lost in socket buffers), RSS {rss_before} KiB -> {rss_after} KiB"
    );
    ensure!(drops >= 500_000.0, "only {drops} drops counted");
    ensure!(
        rss_after < rss_before + 8 * 1024,
        "RSS grew {rss_before} -> {rss_after} KiB"
    );
    let _ = run_in(&c.nodes[1].ns, "true", &[]);
    Ok(())
}

#[test]
fn million_random_datagrams_udp() -> Result<()> {
    require_root!();
    million_random_datagrams("udp", 8285)
}

#[test]
fn million_random_datagrams_wireguard() -> Result<()> {
    require_root!();
    million_random_datagrams("wireguard", 51820)
}

#[test]
fn etcd_member_loss_udp() -> Result<()> {
    require_root!();
    use netns_tests::cluster::UNDERLAY_GW;
    use netns_tests::etcd_cluster::EtcdMembers;
    let mut c = Cluster::new(2)?;
    c.etcd = None; // replaced by a 3-member cluster; member 0 takes the harness's etcd address
    let ul = c.underlay.clone();
    let mut etcd = EtcdMembers::start(
        &ul,
        "br0",
        &[UNDERLAY_GW, "172.30.0.253", "172.30.0.252"],
        c.dir.path(),
    )?;
    etcd.ctl(&["put", &format!("{ETCD_PREFIX}/config"), &config("udp")])?;
    let endpoints = format!("--etcd-endpoints={}", etcd.endpoints());
    for i in 0..2 {
        c.start_daemon(i, &[&endpoints, "--subnet-lease-ttl=30s"])?;
        c.wait_subnet_env(i, Duration::from_secs(20))?;
    }
    let pods = vec![c.add_pod(0)?, c.add_pod(1)?];
    wait_until("the mesh", Duration::from_secs(10), || {
        c.ping_mesh(&pods).is_ok()
    })?;
    // Each lease key with its create revision: a key deleted and written again would change it.
    let created = |etcd: &EtcdMembers| -> Result<Vec<(String, i64)>> {
        let out = etcd.ctl(&[
            "get",
            "--prefix",
            "-w",
            "json",
            &format!("{ETCD_PREFIX}/subnets/"),
        ])?;
        let json: serde_json::Value = serde_json::from_str(&out)?;
        let mut keys: Vec<(String, i64)> = json["kvs"]
            .as_array()
            .context("no kvs")?
            .iter()
            .map(|kv| {
                (
                    kv["key"].as_str().unwrap_or("").to_string(),
                    kv["create_revision"].as_i64().unwrap_or(0),
                )
            })
            .collect();
        keys.sort();
        Ok(keys)
    };
    let leases = created(&etcd)?;

    let pinger = ping_in_background(&pods[0], &pods[1], 25);
    std::thread::sleep(Duration::from_secs(2));
    etcd.kill(0)?; // the first endpoint every daemon was given
                   // Renewals (every 15 s with a 30 s TTL) must go through the surviving members.
    let (sent, got) = pinger
        .join()
        .map_err(|_| anyhow::anyhow!("pinger panicked"))??;
    eprintln!("3-member etcd, member 0 killed: {got}/{sent} pings answered");
    ensure!(got == sent, "lost {} pings", sent - got);
    let after = created(&etcd)?;
    ensure!(
        after == leases,
        "leases were lost and re-created: {leases:?} -> {after:?}"
    );
    for i in 0..2 {
        ensure!(
            c.nodes[i].daemon.as_mut().is_some_and(|d| d.alive()),
            "n{} died",
            i + 1
        );
        let log = c.nodes[i].log();
        let tail: Vec<&str> = log
            .lines()
            .filter(|l| !l.contains("DEBUG"))
            .rev()
            .take(15)
            .collect();
        ensure!(
            !log.contains("lease lost"),
            "n{} lost its lease:\n{}",
            i + 1,
            tail.join("\n")
        );
    }
    Ok(())
}
