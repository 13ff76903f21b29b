//! The NetworkPolicy benchmark: what enforcing policy costs on a 3-node host-gw cluster.
//!
//! `netpol-bench [--seconds N] [--changes N]` (root; release build):
//! 1. no policy: single-stream TCP and new TCP connections per second, client pod (node 1)
//!    to server pod (node 2);
//! 2. programming latency on 3 nodes: a pod label change (etcd put) → the revision in force
//!    on every node, p50/p99 over `--changes` changes, and the nft operations each costs;
//! 3. the same with 1,000 pod records and 500 policies in force (the server isolated by
//!    policies among them), then TCP and connection rate again, and once more with the
//!    policies deleted: ratios to the mean of the two runs without policy.
//!
//! Internal: `netpol-bench connect-rate ADDR SECONDS` (run inside the client pod) opens and
//! closes TCP connections for SECONDS and prints how many completed.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use netns_tests::cluster::{Cluster, ContainerPort, Pod, PodSpec};
use netns_tests::netpol::world::{http_get_unix, revision_of};
use netns_tests::proc::{run_in, Daemon};
use serde_json::json;

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("connect-rate") {
        let addr: SocketAddr = args.get(2).context("ADDR")?.parse()?;
        let secs: u64 = args.get(3).context("SECONDS")?.parse()?;
        return connect_rate(addr, secs);
    }
    let mut seconds = 10u32;
    let mut changes = 50usize;
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => seconds = it.next().context("--seconds N")?.parse()?,
            "--changes" => changes = it.next().context("--changes N")?.parse()?,
            other => bail!("unknown argument {other}"),
        }
    }
    run(seconds, changes)
}

/// Opens and closes connections to `addr` for `secs` seconds; prints the count.
fn connect_rate(addr: SocketAddr, secs: u64) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(secs);
    let mut n = 0u64;
    let mut buf = [0u8; 64];
    while Instant::now() < end {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        let _ = s.read(&mut buf);
        reset_on_close(&s);
        n += 1;
    }
    println!("{n}");
    Ok(())
}

/// Closing with a reset leaves no TIME_WAIT behind: otherwise a measurement of ten seconds
/// at a few thousand connections a second holds every ephemeral port of the client, and the
/// next measurement counts port exhaustion instead of the path (seen: 4,229/s, then 216/s
/// with no policy at all).
fn reset_on_close(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn spec(ns: &str, name: &str, app: &str) -> PodSpec {
    PodSpec {
        namespace: ns.into(),
        name: name.into(),
        labels: vec![("app".into(), app.into())],
        ports: vec![ContainerPort {
            name: "http".into(),
            container_port: 80,
            protocol: "TCP".into(),
        }],
    }
}

struct Bench {
    c: Cluster,
    client: Pod,
    server: Pod,
    _servers: Vec<Daemon>,
}

fn run(seconds: u32, changes: usize) -> Result<()> {
    let mut c = Cluster::new(3)?;
    c.put_config(CONFIG)?;
    for i in 0..3 {
        c.start_daemon(i, &["--ip-masq"])?;
        c.wait_subnet_env(i, Duration::from_secs(20))?;
    }
    let client = c.add_pod_with(0, &spec("bench", "client", "client"))?;
    let server = c.add_pod_with(1, &spec("bench", "server", "server"))?;
    let agent = netns_tests::binary("netpol-agent")?;
    let log = c.dir.path().join("agent.log");
    let http = Daemon::spawn(
        "agent",
        Some(&server.ns),
        &agent,
        &["serve".into(), "--ports".into(), "80".into()],
        &[],
        &log,
    )?;
    let iperf = Daemon::spawn(
        "iperf3",
        Some(&server.ns),
        std::path::Path::new("iperf3"),
        &["-s".into()],
        &[],
        &c.dir.path().join("iperf.log"),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let b = Bench {
        c,
        client,
        server,
        _servers: vec![http, iperf],
    };

    let base_tcp = b.tcp(seconds)?;
    let base_cps = b.cps(seconds)?;

    eprintln!("no policy: {base_tcp:.2} Gbit/s, {base_cps:.0} connections/s");

    // The server isolated by one policy admitting the client, plus the label being changed.
    b.put(
        "networkpolicies/bench/allow-client",
        &json!({"metadata":{"name":"allow-client","namespace":"bench"},
          "spec":{"podSelector":{"matchLabels":{"app":"server"}},
                  "ingress":[{"from":[{"podSelector":{"matchLabels":{"app":"client"}}}],
                              "ports":[{"port":80},{"port":5201}]}]}}),
    )?;
    let (small_p50, small_p99, small_ops) = b.latency(changes)?;
    eprintln!("3 nodes, 1 policy: p50 {small_p50:.1} ms, p99 {small_p99:.1} ms, {small_ops:.1} nft ops/change");

    let t = Instant::now();
    let rev = b.load(1000, 500)?;
    b.wait_all(rev, Duration::from_secs(60))?;
    let initial = t.elapsed();
    eprintln!(
        "1,000 pods and 500 policies in force on 3 nodes in {:.2} s",
        initial.as_secs_f64()
    );
    let (big_p50, big_p99, big_ops) = b.latency(changes)?;
    eprintln!("loaded: p50 {big_p50:.1} ms, p99 {big_p99:.1} ms, {big_ops:.1} nft ops/change");
    let tcp = b.tcp(seconds)?;
    let cps = b.cps(seconds)?;
    eprintln!("loaded: {tcp:.2} Gbit/s, {cps:.0} connections/s");
    // Two cores shared by everything move single runs by ±20 %: the baseline is measured
    // again with the policies deleted (the pod records stay), and the ratio taken to the
    // mean of both baselines.
    let out = b.c.etcd()?.ctl(&[
        "del",
        "-w",
        "json",
        "--prefix",
        "/coreos.com/network/policy/networkpolicies/",
    ])?;
    b.wait_all(revision_of(&out)?, Duration::from_secs(60))?;
    let after_tcp = b.tcp(seconds)?;
    let after_cps = b.cps(seconds)?;
    eprintln!("policies deleted: {after_tcp:.2} Gbit/s, {after_cps:.0} connections/s");
    let base_tcp = (base_tcp + after_tcp) / 2.0;
    let base_cps = (base_cps + after_cps) / 2.0;

    println!(
        "| measure | no policy (mean of before and after) | 1 policy | 1,000 pods + 500 policies |"
    );
    println!("|---|---|---|---|");
    println!(
        "| single-stream TCP, Gbit/s | {base_tcp:.2} | | {tcp:.2} ({:.2}×) |",
        tcp / base_tcp
    );
    println!(
        "| new TCP connections/s | {base_cps:.0} | | {cps:.0} ({:.2}×) |",
        cps / base_cps
    );
    println!("| programming latency p50 / p99, ms (label change → in force on all 3 nodes) | | {small_p50:.1} / {small_p99:.1} | {big_p50:.1} / {big_p99:.1} |");
    println!("| nft operations per label change | | {small_ops:.1} | {big_ops:.1} |");
    println!(
        "| writing the 1,500 records (etcdctl, 8 at a time) until in force on all nodes, s | | | {:.2} |",
        initial.as_secs_f64()
    );
    Ok(())
}

impl Bench {
    fn tcp(&self, seconds: u32) -> Result<f64> {
        let out = run_in(
            &self.client.ns,
            "iperf3",
            &[
                "-J",
                "-c",
                &self.server.ip,
                "-t",
                &seconds.to_string(),
                "-O",
                "1",
            ],
        )?;
        let j: serde_json::Value = serde_json::from_str(&out)?;
        Ok(j["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .context("iperf3 result")?
            / 1e9)
    }

    fn cps(&self, seconds: u32) -> Result<f64> {
        let me = std::env::current_exe()?;
        let out = run_in(
            &self.client.ns,
            &me.to_string_lossy(),
            &[
                "connect-rate",
                &format!("{}:80", self.server.ip),
                &seconds.to_string(),
            ],
        )?;
        Ok(out.trim().parse::<f64>()? / f64::from(seconds))
    }

    fn put(&self, rel: &str, v: &serde_json::Value) -> Result<i64> {
        let key = format!("/coreos.com/network/policy/{rel}");
        let out = self
            .c
            .etcd()?
            .ctl(&["put", "-w", "json", &key, &v.to_string()])?;
        revision_of(&out)
    }

    fn status(&self, i: usize) -> Result<serde_json::Value> {
        let sock = self.c.nodes[i].dir.join("flanneld-rs.sock");
        let (code, body) = http_get_unix(&sock, "/v1/policy/status", Duration::from_secs(2))?;
        if code != 200 {
            bail!("node {i}: HTTP {code}: {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    fn wait_all(&self, rev: i64, timeout: Duration) -> Result<()> {
        let end = Instant::now() + timeout;
        for i in 0..3 {
            while self.status(i)?["revision"].as_i64().unwrap_or(0) < rev {
                if Instant::now() > end {
                    bail!("node {i} did not reach revision {rev}");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    }

    fn ops(&self) -> Result<f64> {
        let mut n = 0.0;
        for i in 0..3 {
            n += self.status(i)?["nftOperations"].as_f64().unwrap_or(0.0);
        }
        Ok(n)
    }

    /// Flips a label of a pod the policies select; returns p50, p99 (ms) and nft ops per change
    /// summed over the nodes.
    fn latency(&self, changes: usize) -> Result<(f64, f64, f64)> {
        let before = self.ops()?;
        let mut ms = Vec::new();
        for n in 0..changes {
            let app = if n % 2 == 0 { "other" } else { "client" };
            let rec = json!({"metadata":{"name":"probe","namespace":"bench","labels":{"app":app}},
                             "status":{"podIP":"10.244.250.7"}});
            let rev = self.put("pods/bench/probe", &rec)?;
            let t = Instant::now();
            self.wait_all(rev, Duration::from_secs(10))?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let ops = (self.ops()? - before) / changes as f64;
        ms.sort_by(f64::total_cmp);
        let pick = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
        Ok((pick(0.5), pick(0.99), ops))
    }

    /// `pods` records over 50 namespaces and `policies` policies selecting them by label,
    /// written in parallel; returns the last revision.
    fn load(&self, pods: usize, policies: usize) -> Result<i64> {
        let mut puts = Vec::new();
        for i in 0..pods {
            let ns = format!("ns{}", i % 50);
            // Addresses in every node's subnet and beyond, as a real cluster's would be.
            let ip = format!("10.244.{}.{}", 100 + i / 250, 2 + i % 250);
            let v = json!({"metadata":{"name":format!("p{i}"),"namespace":ns,
                  "labels":{"app":format!("app{}", i % 20),"tier":format!("t{}", i % 3)}},
                  "status":{"podIP":ip}});
            puts.push((format!("pods/{ns}/p{i}"), v));
        }
        for i in 0..policies {
            let ns = if i % 100 == 0 {
                "bench".to_string()
            } else {
                format!("ns{}", i % 50)
            };
            let v = json!({"metadata":{"name":format!("pol{i}"),"namespace":ns},
                  "spec":{"podSelector":{"matchLabels":{"app":
                      if ns == "bench" { "server".to_string() } else { format!("app{}", i % 20) }}},
                          "ingress":[{"from":[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":format!("ns{}", (i + 1) % 50)}},
                                               "podSelector":{"matchLabels":{"tier":format!("t{}", i % 3)}}},
                                              {"ipBlock":{"cidr":format!("192.168.{}.0/24", i % 256)}}],
                                      "ports":[{"port":80 + (i % 10) as u16},{"port":"http"}]}]}});
            puts.push((format!("networkpolicies/{ns}/pol{i}"), v));
        }
        // etcdctl per key, eight at a time: the load is written in a few seconds.
        let etcd = self.c.etcd()?;
        let revs: Vec<Result<i64>> = std::thread::scope(|scope| {
            let handles: Vec<_> = puts
                .chunks(puts.len().div_ceil(8))
                .map(|chunk| {
                    scope.spawn(move || -> Result<i64> {
                        let mut rev = 0;
                        for (k, v) in chunk {
                            let key = format!("/coreos.com/network/policy/{k}");
                            let out = etcd.ctl(&["put", "-w", "json", &key, &v.to_string()])?;
                            rev = rev.max(revision_of(&out)?);
                        }
                        Ok(rev)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("loader panicked")))
                })
                .collect()
        });
        let mut rev = 0;
        for r in revs {
            rev = rev.max(r?);
        }
        Ok(rev)
    }
}
