//! The wireguard backend end to end: Flannel's lease format and device, keys kept across
//! restarts, peer removal, interop with a standard WireGuard peer (Debian's wireguard-go + wg,
//! configured from the leases as Flannel's kernel backend would be), and an attacker's tries:
//! a wrong key, replayed packets and garbage.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use netns_tests::cluster::{Cluster, Pod, ETCD_PREFIX};
use netns_tests::proc::{run_in, thread_cpu_ns};
use netns_tests::traffic::{http_get, in_netns, metric, tcp_transfer, wait_for_drops, TestRng};
use netns_tests::wait_until;
use netns_tests::wg::{
    self, capture_udp, handshake_flood, pod_reaches, send_datagrams, WgDevice, WgKeys,
};

use crate::require_root;

const WG_CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}"#;
const METRICS: u16 = 9103;
/// The pod MTU: the harness's underlay MTU 1500 - 80.
const MTU: u32 = 1420;
const MB50: u64 = 50 << 20;

fn start_ours(c: &mut Cluster, i: usize) -> Result<()> {
    c.start_daemon(i, &[&format!("--metrics-port={METRICS}")])?;
    c.wait_subnet_env(i, Duration::from_secs(20))?;
    Ok(())
}

/// The metrics of node `i`'s daemon.
fn metrics(c: &Cluster, i: usize) -> Result<String> {
    let (status, body) = http_get(&c.nodes[i].ns, METRICS, "/metrics")?;
    ensure!(status.contains("200"), "metrics of n{}: {status}", i + 1);
    Ok(body)
}

fn drops(body: &str, reason: &str) -> f64 {
    metric(
        body,
        &format!("flanneld_datapath_drops_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(0.0)
}

/// The lease of the node with underlay IP `ip`: (key suffix, parsed JSON).
fn lease_of(c: &Cluster, ip: &str) -> Result<(String, serde_json::Value)> {
    for (k, v) in c.leases()? {
        let j: serde_json::Value = serde_json::from_str(&v)?;
        if j["PublicIP"] == ip {
            return Ok((k, j));
        }
    }
    bail!("no lease for {ip}")
}

fn transfer(from: &Pod, to: &Pod, bytes: u64) -> Result<()> {
    let (sent, received) = tcp_transfer(&from.ns, &to.ns, &to.ip, bytes)?;
    ensure!(
        sent == received,
        "{bytes} bytes {} -> {}: hash mismatch",
        from.ns,
        to.ns
    );
    Ok(())
}

/// `n` nodes running our wireguard backend, one pod each.
fn wg_mesh(n: usize) -> Result<(Cluster, Vec<Pod>)> {
    Cluster::with_daemons(n, WG_CONFIG, &[&format!("--metrics-port={METRICS}")])
}

/// The public key in node `i`'s lease.
fn lease_key_of(c: &Cluster, i: usize) -> Result<String> {
    let (_, lease) = lease_of(c, &c.nodes[i].ip)?;
    lease["BackendData"]["PublicKey"]
        .as_str()
        .map(str::to_string)
        .context("no PublicKey")
}

#[test]
fn wireguard_mesh_leases_keys_and_mtu() -> Result<()> {
    require_root!();
    let (c, pods) = wg_mesh(3)?;
    // Flannel's lease, device, MTU; the key file is private and matches the lease.
    for (i, node) in c.nodes.iter().enumerate() {
        let (suffix, lease) = lease_of(&c, &node.ip)?;
        ensure!(lease["BackendType"] == "wireguard", "{lease}");
        ensure!(lease["BackendData"]["Port"] == 51820, "{lease}");
        let key_file = node.dir.join("wgkey");
        let mode = std::fs::metadata(&key_file)?.permissions().mode() & 0o777;
        ensure!(mode == 0o600, "key file mode {mode:o}");
        let private = std::fs::read_to_string(&key_file)?;
        let public = wg::pubkey(&private)?;
        ensure!(
            lease["BackendData"]["PublicKey"] == public.as_str(),
            "n{}: lease {lease} does not carry the key file's public key {public}",
            i + 1
        );
        let env = std::fs::read_to_string(node.subnet_file())?;
        ensure!(env.contains(&format!("FLANNEL_MTU={MTU}\n")), "{env}");
        let link = node.run("ip", &["-d", "link", "show", "flannel-wg"])?;
        ensure!(
            link.contains(&format!("mtu {MTU}")) && link.contains("tun"),
            "{link}"
        );
        let net = suffix.split('-').next().unwrap_or_default();
        let addr = node.run("ip", &["-4", "addr", "show", "flannel-wg"])?;
        ensure!(addr.contains(&format!("{net}/16")), "{addr}");
    }
    c.ping_mesh(&pods)?;
    transfer(&pods[0], &pods[1], MB50)?;
    transfer(&pods[2], &pods[0], MB50)?;

    // A DF ping of exactly the pod MTU passes; one byte more is refused loudly.
    let fits = (MTU - 28).to_string();
    run_in(
        &pods[0].ns,
        "ping",
        &["-c", "1", "-W", "2", "-M", "do", "-s", &fits, &pods[1].ip],
    )?;
    let over = (MTU - 27).to_string();
    let err = run_in(
        &pods[0].ns,
        "ping",
        &["-c", "1", "-W", "2", "-M", "do", "-s", &over, &pods[1].ip],
    )
    .err()
    .map(|e| format!("{e:#}"))
    .unwrap_or_else(|| "succeeded".into());
    ensure!(
        err.contains("message too long") || err.contains("Frag needed"),
        "oversized DF ping: {err}"
    );

    Ok(())
}

#[test]
fn wireguard_restart_keeps_the_key() -> Result<()> {
    require_root!();
    let (mut c, pods) = wg_mesh(3)?;
    c.ping_mesh(&pods)?;
    let keys = (0..3)
        .map(|i| lease_key_of(&c, i))
        .collect::<Result<Vec<_>>>()?;
    // Restart n2: same key (from the file), and everyone reaches it again at once.
    c.stop_daemon(1);
    std::fs::remove_file(c.nodes[1].subnet_file())?;
    start_ours(&mut c, 1)?;
    let (_, lease) = lease_of(&c, &c.nodes[1].ip.clone())?;
    ensure!(
        lease["BackendData"]["PublicKey"] == keys[1].as_str(),
        "key changed across a restart: {lease}"
    );
    wait_until(
        "n1 -> n2 after n2's restart",
        Duration::from_secs(10),
        || pod_reaches(&pods[0].ns, &pods[1].ip, 1),
    )?;
    c.ping_mesh(&pods)?;
    transfer(&pods[1], &pods[2], 1 << 20)?;

    Ok(())
}

#[test]
fn wireguard_removed_peer_is_refused_and_counted() -> Result<()> {
    require_root!();
    let (mut c, pods) = wg_mesh(3)?;
    c.ping_mesh(&pods)?;
    // n3 leaves: its lease goes, n1 drops the peer, and traffic for n3's pods is refused at
    // n1 (ICMP unreachable, counted) rather than sent anywhere.
    c.stop_daemon(2);
    let (suffix3, _) = lease_of(&c, &c.nodes[2].ip.clone())?;
    c.etcd()?
        .ctl(&["del", &format!("{ETCD_PREFIX}/subnets/{suffix3}")])?;
    wait_until("n1 to drop the peer", Duration::from_secs(10), || {
        metrics(&c, 0).is_ok_and(|m| metric(&m, "flanneld_peers").is_some_and(|p| p == 1.0))
    })?;
    let before = drops(&metrics(&c, 0)?, "no_route");
    ensure!(
        !pod_reaches(&pods[0].ns, &pods[2].ip, 1),
        "n3's pod still reachable"
    );
    let after = drops(&metrics(&c, 0)?, "no_route");
    ensure!(after > before, "no_route drops {before} -> {after}");
    c.ping(&pods[0], &pods[1].ip, 2)?;

    Ok(())
}

#[test]
fn wireguard_bad_key_files_are_refused() -> Result<()> {
    require_root!();
    let (mut c, _) = wg_mesh(1)?;
    // A key file readable by others, or one that holds no key, is refused with the reason.
    c.stop_daemon(0);
    let key_file = c.nodes[0].dir.join("wgkey");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644))?;
    c.start_daemon(0, &[])?;
    let log = wait_for_exit(&mut c, 0)?;
    ensure!(
        log.contains("wgkey") && log.contains("mode 0644"),
        "no clear error for a world-readable key file:\n{log}"
    );
    std::fs::write(&key_file, "garbage\n")?;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))?;
    c.start_daemon(0, &[])?;
    let log = wait_for_exit(&mut c, 0)?;
    ensure!(
        log.contains("does not hold a WireGuard private key"),
        "no clear error for a corrupt key file:\n{log}"
    );
    Ok(())
}

/// Eight queues on two cores: each node's 16 packet threads and the 4 helpers that open for
/// its receiver share the two cores with the pods, so sender threads are descheduled in the
/// middle of runs and one peer's counters reach the wire interleaved from many threads: what
/// many cores do, exaggerated. Eight streams each way at once arrive whole, the helpers did
/// open, and the replay window (8,128 counters), which sees the interleaving, drops next to
/// nothing.
#[test]
fn wireguard_eight_queues_keep_streams_whole() -> Result<()> {
    require_root!();
    let metrics_port = format!("--metrics-port={METRICS}");
    let (c, pods) = Cluster::with_daemons(2, WG_CONFIG, &[&metrics_port, "--datapath-queues=8"])?;
    c.ping(&pods[0], &pods[1].ip, 2)?;
    let pid2 = c.daemon_pid(1)?;
    ensure!(
        thread_cpu_ns(pid2, "-open")?.len() == 4,
        "8 queues: 4 helper threads expected"
    );
    let before = thread_cpu_ns(pid2, "-open")?.iter().sum::<u64>();
    c.streams_both_ways(&pods[0], &pods[1], 7801, 8, 16 << 20)?;
    let after = thread_cpu_ns(pid2, "-open")?.iter().sum::<u64>();
    ensure!(
        after > before,
        "the helpers opened nothing ({before} -> {after} ns on a CPU)"
    );
    eprintln!("n2's helpers: {} ms on a CPU", (after - before) / 1_000_000);
    for i in 0..2 {
        let m = metrics(&c, i)?;
        let rx = metric(&m, "flanneld_datapath_packets_total{direction=\"rx\"}").unwrap_or(0.0);
        let dropped = drops(&m, "not_authentic");
        eprintln!(
            "n{}: {rx} packets received, {dropped} dropped as not authentic",
            i + 1
        );
        ensure!(
            dropped <= rx / 1000.0,
            "n{}: {dropped} of {rx} packets dropped as replays or forgeries",
            i + 1
        );
    }
    Ok(())
}

/// Waits for node `i`'s daemon to exit by itself (a startup error); returns its log.
fn wait_for_exit(c: &mut Cluster, i: usize) -> Result<String> {
    let daemon = c.nodes[i].daemon.as_mut().context("no daemon")?;
    wait_until(
        "the daemon to refuse to start",
        Duration::from_secs(20),
        || !daemon.alive(),
    )?;
    let log = c.nodes[i].log();
    c.stop_daemon(i);
    Ok(log)
}

/// A cluster of two flanneld-rs nodes (n1, n2) running `config`, and n3 running wireguard-go
/// with `keys`, whose lease (written first, with etcdctl, as a Flannel node would publish it)
/// says `lease_key` and port 51999. n3's peers come from the leases (with `psk`, if the config
/// has one). Returns the device and one pod per node.
fn mixed_cluster(
    config: &str,
    keys: &WgKeys,
    lease_key: &str,
    psk: Option<&str>,
) -> Result<Option<(Cluster, WgDevice, Vec<Pod>)>> {
    if netns_tests::must_skip(wg::missing())? {
        return Ok(None);
    }
    let mut c = Cluster::new(3)?;
    let port = 51999;
    c.put_config(config)?;
    c.put_wireguard_lease(2, "10.244.200.0/24", lease_key, port)?;
    c.write_subnet_env(2, "10.244.200.0/24", MTU)?;
    let dev = c.start_wireguard_go(2, keys, port, "10.244.200.0/16", MTU)?;
    for i in 0..2 {
        start_ours(&mut c, i)?;
    }
    let peers = c.wg_peers_from_leases(&dev, psk)?;
    ensure!(peers == 2, "wireguard-go got {peers} peers from the leases");
    let pods = (0..3).map(|i| c.add_pod(i)).collect::<Result<Vec<_>>>()?;
    Ok(Some((c, dev, pods)))
}

/// wireguard-go's view of the peer with `key`: (endpoint, latest handshake, rx, tx bytes).
fn wg_peer(c: &Cluster, dev: &WgDevice, key: &str) -> Result<(String, u64, u64, u64)> {
    let dump = c.wg_dump(dev)?;
    let line = dump
        .lines()
        .find(|l| l.starts_with(key))
        .with_context(|| format!("key {key} not in wg show:\n{dump}"))?;
    let f: Vec<&str> = line.split('\t').collect();
    let num = |i: usize| f.get(i).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((f.get(2).unwrap_or(&"").to_string(), num(4), num(5), num(6)))
}

#[test]
fn wireguard_interop_with_wireguard_go() -> Result<()> {
    require_root!();
    let keys = WgKeys::generate()?;
    let psk = wg::genpsk()?;
    // With a PSK and 1 s persistent keepalives: both must agree with the standard peer.
    let config = format!(
        r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"wireguard","PSK":"{psk}","PersistentKeepaliveInterval":1}}}}"#
    );
    let Some((c, mut dev, pods)) = mixed_cluster(&config, &keys, &keys.public, Some(&psk))? else {
        return Ok(());
    };
    c.ping_mesh(&pods)?;
    // Both directions, each side initiating its own handshakes, hashed 50 MB transfers.
    transfer(&pods[0], &pods[2], MB50)?;
    transfer(&pods[2], &pods[0], MB50)?;
    transfer(&pods[2], &pods[1], 1 << 20)?;
    // wireguard-go agrees: handshakes done with our keys, and the bytes went through it.
    let (_, n1) = lease_of(&c, &c.nodes[0].ip)?;
    let n1_key = n1["BackendData"]["PublicKey"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (endpoint, handshake, rx, tx) = wg_peer(&c, &dev, &n1_key)?;
    ensure!(handshake > 0, "no handshake with n1");
    ensure!(
        rx > MB50 && tx > MB50,
        "wireguard-go rx {rx} tx {tx} bytes with n1"
    );
    ensure!(
        endpoint == format!("{}:51820", c.nodes[0].ip),
        "n1's endpoint at wireguard-go: {endpoint}"
    );
    // Idle, n1 still sends a keepalive every second (PersistentKeepaliveInterval is seconds).
    std::thread::sleep(Duration::from_secs(1));
    let (_, _, idle_rx, _) = wg_peer(&c, &dev, &n1_key)?;
    std::thread::sleep(Duration::from_secs(3));
    let (_, _, later_rx, _) = wg_peer(&c, &dev, &n1_key)?;
    ensure!(
        later_rx >= idle_rx + 2 * 32,
        "no persistent keepalives from n1: rx {idle_rx} -> {later_rx}"
    );
    // And our side saw none of it as suspicious.
    let m = metrics(&c, 0)?;
    for r in [
        "unknown_sender",
        "not_authentic",
        "spoofed_source",
        "malformed",
    ] {
        ensure!(drops(&m, r) == 0.0, "n1 dropped {r}: {}", drops(&m, r));
    }

    // Roaming: wireguard-go moves to another port without any lease change. Once n1 hears
    // from it there, n1 answers there.
    c.wg_set_port(&mut dev, 51998)?;
    c.ping(&pods[2], &pods[0].ip, 2)?;
    c.ping(&pods[0], &pods[2].ip, 2)?;
    transfer(&pods[0], &pods[2], 1 << 20)?;
    ensure!(
        c.nodes[0].log().contains("WireGuard peer roamed"),
        "n1 did not log the roaming"
    );
    Ok(())
}

#[test]
fn wireguard_rejects_wrong_keys_replays_and_garbage() -> Result<()> {
    require_root!();
    // n3's lease names one key, but wireguard-go runs with another: n3 is an impostor.
    let published = WgKeys::generate()?;
    let actual = WgKeys::generate()?;
    let Some((mut c, _dev, pods)) = mixed_cluster(WG_CONFIG, &actual, &published.public, None)?
    else {
        return Ok(());
    };
    c.ping(&pods[0], &pods[1].ip, 2)?;
    for (from, to) in [(2, 0), (0, 2), (2, 1)] {
        ensure!(
            !pod_reaches(&pods[from].ns, &pods[to].ip, 2),
            "n{} -> n{} got through with the wrong key",
            from + 1,
            to + 1
        );
    }
    let m0 = metrics(&c, 0)?;
    ensure!(
        drops(&m0, "unknown_sender") + drops(&m0, "not_authentic") > 0.0,
        "n1 did not count the impostor's handshakes"
    );

    // Replays: data packets n1 -> n2 captured on the underlay, sent again 10 times, from n3
    // (elsewhere) and from n1 itself.
    let n2 = format!("{}:51820", c.nodes[1].ip);
    let filter = format!(
        "udp and dst host {} and dst port 51820 and udp[8] = 4 and greater 150",
        c.nodes[1].ip
    );
    let (p0, p1) = (pods[0].clone(), pods[1].clone());
    let captured = capture_udp(&c, &c.underlay, "n1", &filter, 5, || c.ping(&p0, &p1.ip, 5))?;
    ensure!(captured.len() == 5, "captured {} packets", captured.len());
    let before = metrics(&c, 1)?;
    let replays: Vec<Vec<u8>> = (0..10).flat_map(|_| captured.clone()).collect();
    send_datagrams(&c.nodes[2].ns, &n2, replays.clone())?;
    send_datagrams(&c.nodes[0].ns, &n2, replays)?;
    let want = drops(&before, "not_authentic") + 100.0;
    wait_for_drops(&c.nodes[1].ns, METRICS, &["not_authentic"], want);
    let after = metrics(&c, 1)?;
    let rejected = drops(&after, "not_authentic") - drops(&before, "not_authentic");
    let rx =
        |m: &str| metric(m, "flanneld_datapath_packets_total{direction=\"rx\"}").unwrap_or(0.0);
    ensure!(rejected >= 100.0, "only {rejected} of 100 replays rejected");
    ensure!(
        rx(&after) - rx(&before) < 10.0,
        "replays delivered: rx {} -> {}",
        rx(&before),
        rx(&after)
    );
    // The replays from elsewhere did not move n1's endpoint at n2: n2 -> n1 still works.
    c.ping(&pods[1], &pods[0].ip, 2)?;

    // 5,000 garbage datagrams at 51820: counted, harmless.
    let before = metrics(&c, 1)?;
    in_netns(&c.nodes[2].ns, move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
        let mut rng = TestRng::new(7);
        let mut buf = [0u8; 1500];
        for i in 0..5000 {
            let len = 1 + (rng.next_u64() % 1499) as usize;
            rng.fill(&mut buf[..len]);
            // A quarter look like data messages (type 4), some like handshake initiations.
            let len = match i % 8 {
                0 | 1 => {
                    buf[..4].copy_from_slice(&4u32.to_le_bytes());
                    len
                }
                2 => {
                    buf[..4].copy_from_slice(&1u32.to_le_bytes());
                    148
                }
                _ => len,
            };
            sock.send_to(&buf[..len], &n2)?;
            if i % 100 == 99 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    })?;
    let reasons = ["unknown_sender", "not_authentic", "malformed"];
    let want = reasons.iter().map(|r| drops(&before, r)).sum::<f64>() + 4950.0;
    wait_for_drops(&c.nodes[1].ns, METRICS, &reasons, want);
    ensure!(
        c.nodes[1].daemon.as_mut().is_some_and(|d| d.alive()),
        "n2's daemon died"
    );
    let after = metrics(&c, 1)?;
    let counted: f64 = ["unknown_sender", "not_authentic", "malformed"]
        .iter()
        .map(|r| drops(&after, r) - drops(&before, r))
        .sum();
    ensure!(
        counted >= 4950.0,
        "{counted} of 5,000 garbage datagrams counted"
    );
    c.ping(&pods[0], &pods[1].ip, 2)?;
    c.ping(&pods[1], &pods[0].ip, 2)?;
    let (h, _) = http_get(&c.nodes[1].ns, METRICS, "/healthz")?;
    ensure!(h.contains("200"), "healthz: {h}");
    Ok(())
}

#[test]
fn wireguard_handshake_flood_gets_cookies() -> Result<()> {
    require_root!();
    // n1, n2 ours; n3 (no daemon) floods n1 with initiations that pass the mac1 check.
    let mut c = Cluster::new(3)?;
    c.put_config(WG_CONFIG)?;
    for i in 0..2 {
        start_ours(&mut c, i)?;
    }
    let pods = (0..2).map(|i| c.add_pod(i)).collect::<Result<Vec<_>>>()?;
    c.ping_mesh(&pods)?;
    let (_, n1) = lease_of(&c, &c.nodes[0].ip)?;
    let key = n1["BackendData"]["PublicKey"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (ns, to) = (c.nodes[2].ns.clone(), format!("{}:51820", c.nodes[0].ip));
    let flood = std::thread::spawn(move || handshake_flood(&ns, &to, &key, 10, 2000));
    std::thread::sleep(Duration::from_secs(1));
    // Established sessions carry on; a node restarting now must handshake under load (its
    // first initiation gets a cookie reply, the next one carries mac2 and is answered).
    c.ping(&pods[0], &pods[1].ip, 3)?;
    c.stop_daemon(1);
    start_ours(&mut c, 1)?;
    let took = wait_until("n2 -> n1 during the flood", Duration::from_secs(8), || {
        pod_reaches(&pods[1].ns, &pods[0].ip, 1)
    })?;
    let report = flood
        .join()
        .map_err(|_| anyhow::anyhow!("flood thread panicked"))??;
    eprintln!("flood: {report:?}; n2 reconnected after {took:?}");
    ensure!(
        report.cookies > 0,
        "no cookie replies to {} initiations",
        report.sent
    );
    ensure!(report.other == 0, "forged initiations answered: {report:?}");
    ensure!(
        c.nodes[0].daemon.as_mut().is_some_and(|d| d.alive()),
        "n1's daemon died"
    );
    wait_for_drops(
        &c.nodes[0].ns,
        METRICS,
        &["unknown_sender"],
        report.sent as f64 * 0.9,
    );
    let m = metrics(&c, 0)?;
    ensure!(
        drops(&m, "unknown_sender") >= report.sent as f64 * 0.9,
        "drops {} for {} forged initiations",
        drops(&m, "unknown_sender"),
        report.sent
    );
    c.ping_mesh(&pods)?;
    Ok(())
}
