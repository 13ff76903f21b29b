//! Scale: 1,000 leases in etcd. A starting daemon programs them all quickly and stays small,
//! and a change to one lease touches only that peer's kernel state (counted with `ip monitor`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use base64::Engine as _;
use netns_tests::cluster::{Cluster, ETCD_PREFIX, UNDERLAY_GW};
use netns_tests::proc::Daemon;
use netns_tests::traffic::{http_get, in_netns, metric};
use netns_tests::wait_until;
use subnet_manager::lease::{LeaseAttrs, SubnetKey};
use subnet_manager::registry::{EtcdOptions, Registry};

use crate::require_root;

const PEERS: u32 = 1000;
const METRICS: u16 = 9103;

/// The fake peer `i`: subnet 10.1xx.yy.0/24 and a public IP on the underlay (host-gw needs
/// its gateways on-link, so addresses repeat; that is fine for programming state).
fn fake_lease(i: u32, backend: &str) -> (SubnetKey, LeaseAttrs) {
    let subnet = format!("10.{}.{}.0-24", 100 + i / 250, i % 250);
    let ip = format!("172.30.0.{}", 20 + i % 200);
    let (backend_type, backend_data) = match backend {
        "vxlan" => (
            Some("vxlan".to_string()),
            Some(
                serde_json::json!({"VNI": 1, "VtepMAC": format!("0a:58:00:00:{:02x}:{:02x}", i / 256, i % 256)}),
            ),
        ),
        "udp" => (None, None),
        "wireguard" => {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&i.to_le_bytes());
            key[31] = 0x40;
            (
                Some("wireguard".to_string()),
                Some(
                    serde_json::json!({"PublicKey": base64::engine::general_purpose::STANDARD.encode(key), "Port": 51820}),
                ),
            )
        }
        other => (Some(other.to_string()), None),
    };
    let attrs = LeaseAttrs {
        public_ip: ip.parse().unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
        public_ipv6: None,
        backend_type,
        backend_data,
        backend_v6_data: None,
    };
    (
        SubnetKey::parse(&subnet).unwrap_or(SubnetKey {
            ipv4: None,
            ipv6: None,
        }),
        attrs,
    )
}

/// The generator: writes `PEERS` leases through the etcd API from inside the underlay.
fn write_leases(c: &Cluster, backend: &str) -> Result<()> {
    let backend = backend.to_string();
    in_netns(&c.underlay, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let reg = Registry::connect(&EtcdOptions {
                endpoints: vec![format!("http://{UNDERLAY_GW}:2379")],
                prefix: ETCD_PREFIX.into(),
                ..EtcdOptions::default()
            })
            .await?;
            for i in 0..PEERS {
                let (key, attrs) = fake_lease(i, &backend);
                reg.put_lease(&key, &attrs, Duration::from_secs(3600), false)
                    .await?;
            }
            Ok(())
        })
    })
}

fn thousand_peers(backend: &str) -> Result<()> {
    let mut c = Cluster::new(1)?;
    c.put_config(&format!(
        r#"{{"Network":"10.0.0.0/8","SubnetMin":"10.200.0.0","Backend":{{"Type":"{backend}"}}}}"#
    ))?;
    write_leases(&c, backend)?;
    let start = Instant::now();
    // Probes off: this test counts what programming peers costs; the next one, probing.
    c.start_daemon(
        0,
        &[&format!("--metrics-port={METRICS}"), "--health-port=0"],
    )?;
    let ns = c.nodes[0].ns.clone();
    let userspace = matches!(backend, "udp" | "wireguard");
    let routes = |c: &Cluster| -> usize {
        c.nodes[0]
            .routes()
            .map(|r| r.lines().filter(|l| l.starts_with("10.1")).count())
            .unwrap_or(0)
    };
    let gauge = |name: &str| -> usize {
        http_get(&ns, METRICS, "/metrics")
            .ok()
            .and_then(|(_, body)| metric(&body, name))
            .map_or(0, |v| v as usize)
    };
    // udp and wireguard keep peers in the table their packet threads route by (reported as
    // flanneld_datapath_peers); the others program one route per peer.
    let programmed = |c: &Cluster| {
        if userspace {
            gauge("flanneld_datapath_peers")
        } else {
            routes(c)
        }
    };
    wait_until("1,000 peers programmed", Duration::from_secs(30), || {
        gauge("flanneld_peers") >= PEERS as usize && programmed(&c) >= PEERS as usize
    })?;
    let took = start.elapsed();
    let log = c.nodes[0].log();
    let pid = c.nodes[0]
        .daemon
        .as_ref()
        .and_then(Daemon::pid)
        .context("pid")?;
    let rss = netns_tests::proc::rss_kib(pid)?;
    let kernel_state = programmed(&c);
    eprintln!("{backend}: daemon start to 1,000 peers programmed: {took:?} (including etcd connect and lease); RSS {rss} KiB; {kernel_state} peers in routes or tables");
    ensure!(
        kernel_state >= PEERS as usize,
        "{backend}: only {kernel_state} routes"
    );
    // flanneld_peers is now published after the backend programmed every peer (it used to be
    // published before, so this read came before wireguard's 1,000 sessions existed): each
    // WireGuard peer holds its handshake keys and, once used, sessions with a replay window.
    let limit_mib = if backend == "wireguard" { 48 } else { 30 };
    ensure!(
        rss <= limit_mib * 1024,
        "{backend}: RSS {rss} KiB over {limit_mib} MiB"
    );
    ensure!(
        !log.contains("WARN") || backend != "host-gw",
        "warnings while programming:\n{log}"
    );

    // One lease changes: count the kernel's route/neighbour/fdb notifications it causes.
    let monitor_log = c.dir.path().join("monitor.log");
    let mut monitor = Daemon::spawn(
        "ip-monitor",
        Some(&ns),
        Path::new("/usr/sbin/ip"),
        &["monitor".into(), "route".into(), "neigh".into()],
        &[],
        &monitor_log,
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let (key, mut attrs) = fake_lease(7, backend);
    attrs.public_ip = "172.30.0.250".parse()?;
    if let Some(data) = attrs.backend_data.as_mut() {
        data["VtepMAC"] = serde_json::json!("0a:58:00:00:ff:07");
    }
    let updates_before = gauge("flanneld_datapath_table_updates_total");
    c.etcd()?.put(&key.to_key(ETCD_PREFIX), &attrs.to_json())?;
    let changed = Instant::now();
    let dst = key.ipv4.map(|n| n.to_string()).unwrap_or_default();
    match backend {
        "host-gw" => wait_until("the changed route", Duration::from_secs(5), || {
            c.nodes[0].routes().is_ok_and(|r| {
                r.lines()
                    .any(|l| l.starts_with(&dst) && l.contains("172.30.0.250"))
            })
        })?,
        "vxlan" => wait_until("the changed neighbour", Duration::from_secs(5), || {
            c.nodes[0]
                .run("ip", &["neigh", "show"])
                .is_ok_and(|n| n.contains("0a:58:00:00:ff:07"))
        })?,
        _ => wait_until(
            "the datapath's table replaced",
            Duration::from_secs(5),
            || gauge("flanneld_datapath_table_updates_total") > updates_before,
        )?,
    };
    let applied = changed.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    monitor.stop(Duration::from_secs(2));
    let events = std::fs::read_to_string(&monitor_log)?;
    let touched: Vec<&str> = events.lines().filter(|l| !l.trim().is_empty()).collect();
    eprintln!("{backend}: one lease changed, applied in {applied:?}, {} kernel notifications: {touched:?}", touched.len());
    ensure!(
        touched.len() <= 6,
        "{backend}: one change touched too much:\n{events}"
    );
    Ok(())
}

#[test]
fn thousand_peers_host_gw() -> Result<()> {
    require_root!();
    thousand_peers("host-gw")
}

#[test]
fn thousand_peers_udp() -> Result<()> {
    require_root!();
    thousand_peers("udp")
}

#[test]
fn thousand_peers_wireguard() -> Result<()> {
    require_root!();
    thousand_peers("wireguard")
}

#[test]
fn thousand_peers_vxlan() -> Result<()> {
    require_root!();
    thousand_peers("vxlan")
}

/// User + system CPU seconds of a process, from /proc/<pid>/stat.
fn cpu_seconds(pid: u32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) / hz)
        })
        .unwrap_or(0.0)
}

/// 1,000 peers probed at the default interval: the probe rate and the daemon's CPU stay flat.
#[test]
fn thousand_peers_health_probes_stay_cheap() -> Result<()> {
    require_root!();
    let mut c = Cluster::new(1)?;
    c.put_config(
        r#"{"Network":"10.0.0.0/8","SubnetMin":"10.200.0.0","Backend":{"Type":"vxlan"}}"#,
    )?;
    write_leases(&c, "vxlan")?;
    c.start_daemon(0, &[&format!("--metrics-port={METRICS}")])?;
    let ns = c.nodes[0].ns.clone();
    // Every probe tried, whether the socket took it or not.
    let sent = || -> f64 {
        http_get(&ns, METRICS, "/metrics")
            .ok()
            .map(|(_, b)| {
                ["sent", "send_failed"]
                    .iter()
                    .filter_map(|k| {
                        metric(&b, &format!("flanneld_health_probes_total{{kind=\"{k}\"}}"))
                    })
                    .sum()
            })
            .unwrap_or(0.0)
    };
    let peers = || -> f64 {
        http_get(&ns, METRICS, "/metrics")
            .ok()
            .and_then(|(_, b)| metric(&b, "flanneld_peers"))
            .unwrap_or(0.0)
    };
    wait_until("1,000 peers", Duration::from_secs(30), || {
        peers() >= f64::from(PEERS)
    })?;
    // One interval for every peer's phase to come round, then 10 s measured.
    std::thread::sleep(Duration::from_secs(6));
    let pid = c.nodes[0]
        .daemon
        .as_ref()
        .and_then(Daemon::pid)
        .context("pid")?;
    let (sent0, cpu0, t0) = (sent(), cpu_seconds(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(10));
    let (rate, cpu) = (
        (sent() - sent0) / t0.elapsed().as_secs_f64(),
        (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64(),
    );
    let rss = netns_tests::proc::rss_kib(pid)?;
    eprintln!("health probes, 1,000 peers at the default 5 s: {rate:.0} probes/s sent, daemon CPU {:.1}% of a core, RSS {rss} KiB", cpu * 100.0);
    // Two probes per peer per 5 s is 400/s; the jitter moves it a little.
    ensure!(rate <= 480.0, "{rate:.0} probes/s");
    ensure!(
        cpu <= 0.10,
        "probing 1,000 peers takes {:.1}% of a core",
        cpu * 100.0
    );
    ensure!(rss <= 32 * 1024, "RSS {rss} KiB");
    Ok(())
}
