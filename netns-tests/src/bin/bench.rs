//! The benchmark: one run builds the same 2-node namespace cluster for each datapath and
//! measures pod-to-pod TCP (1 and 4 parallel streams, or the counts `--streams` lists) with the
//! daemons' CPU time per GB moved, 64-byte UDP packet rate and median ping RTT, each also as a
//! ratio to kernel VXLAN (wired by hand exactly as Flannel wires it) and to plain routing
//! measured in the same run.
//!
//! `bench [--seconds N] [--modes a,b,…] [--streams 1,4,8] [--rounds N] [--write BENCHMARKS.md]`
//! (root; release build). With `--rounds N` every mode is measured once per round, rounds one
//! after another, and each figure is the median: a shared machine's slow spells then touch all
//! modes alike. Modes `udp-poll` and `wireguard-poll` run our daemons with
//! `--busy-poll-us 10000`.
//! Modes `routing-v6`, `vxlan-v6` and `wireguard-v6` run the same measurements between the
//! pods' IPv6 addresses on a dual-stack cluster (IPv6 underlay); their ratios are to the IPv4
//! kernel VXLAN and routing rows of the same run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use netns_tests::cluster::{Cluster, Pod};
use netns_tests::proc::{run, run_in, Daemon};

struct Args {
    seconds: u32,
    modes: Vec<String>,
    /// Parallel TCP stream counts, one measurement each.
    streams: Vec<u32>,
    /// Rounds over all modes; figures are medians.
    rounds: u32,
    write: Option<String>,
    /// Record the daemons with `perf` during the single-stream run; reports go here.
    profile: Option<String>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        seconds: 5,
        modes: ["routing", "kernel-vxlan", "udp"]
            .map(String::from)
            .to_vec(),
        streams: vec![1, 4],
        rounds: 1,
        write: None,
        profile: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--seconds" => a.seconds = it.next().context("--seconds N")?.parse()?,
            "--modes" => {
                a.modes = it
                    .next()
                    .context("--modes a,b")?
                    .split(',')
                    .map(String::from)
                    .collect()
            }
            "--streams" => {
                a.streams = it
                    .next()
                    .context("--streams 1,4,8")?
                    .split(',')
                    .map(|n| {
                        n.trim()
                            .parse::<u32>()
                            .context("--streams takes counts like 1,4,8")
                    })
                    .collect::<Result<_>>()?;
                if a.streams.is_empty() || a.streams.contains(&0) {
                    bail!("--streams takes counts of at least 1, like 1,4,8");
                }
            }
            "--rounds" => {
                a.rounds = it.next().context("--rounds N")?.parse()?;
                if a.rounds == 0 {
                    bail!("--rounds takes at least 1");
                }
            }
            "--write" => a.write = Some(it.next().context("--write FILE")?),
            "--profile" => a.profile = Some(it.next().context("--profile DIR")?),
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(a)
}

/// One datapath's figures.
#[derive(Default, Clone)]
struct Row {
    /// One entry per stream count, in `--streams` order.
    tcp: Vec<Tcp>,
    udp64_kpps: f64,
    rtt_us: f64,
    note: String,
}

/// TCP with some number of parallel streams.
#[derive(Default, Clone, Copy)]
struct Tcp {
    gbps: f64,
    /// The daemons' user + system CPU seconds per GB received (none without daemons).
    cpu_s_per_gb: Option<f64>,
}

impl Row {
    fn gbps(&self, i: usize) -> f64 {
        self.tcp.get(i).map_or(0.0, |t| t.gbps)
    }
}

/// Each figure's median over the rounds that measured it; a failed round leaves its note.
fn median_row(rows: &[Row]) -> Row {
    let ok: Vec<&Row> = rows.iter().filter(|r| !r.tcp.is_empty()).collect();
    let streams = ok.iter().map(|r| r.tcp.len()).min().unwrap_or(0);
    let tcp = (0..streams)
        .map(|i| Tcp {
            gbps: median(ok.iter().map(|r| r.tcp[i].gbps)).unwrap_or(0.0),
            cpu_s_per_gb: median(ok.iter().filter_map(|r| r.tcp[i].cpu_s_per_gb)),
        })
        .collect();
    let mut notes: Vec<&str> = rows
        .iter()
        .map(|r| r.note.as_str())
        .filter(|n| !n.is_empty())
        .collect();
    notes.dedup();
    Row {
        tcp,
        udp64_kpps: median(ok.iter().map(|r| r.udp64_kpps)).unwrap_or(0.0),
        rtt_us: median(ok.iter().map(|r| r.rtt_us)).unwrap_or(0.0),
        note: notes.join("; "),
    }
}

/// The median (the mean of the middle two for an even count); none of nothing.
fn median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if !netns_tests::is_root() {
        bail!("the benchmark builds network namespaces: run it as root");
    }
    // Every round measures every mode once, so a slow spell of a shared machine touches all
    // modes alike; each figure is then the median over the rounds.
    let mut runs: BTreeMap<usize, Vec<Row>> = BTreeMap::new();
    for round in 1..=args.rounds {
        for (i, mode) in args.modes.iter().enumerate() {
            eprintln!("== {mode} (round {round}/{})", args.rounds);
            let row = match measure(mode, &args) {
                Ok(row) => {
                    let tcp: Vec<String> = args
                        .streams
                        .iter()
                        .zip(&row.tcp)
                        .map(|(n, t)| format!("tcp×{n} {:.2} Gbit/s", t.gbps))
                        .collect();
                    eprintln!(
                        "   {}, udp64 {:.0} kpps, rtt {:.0} us",
                        tcp.join(", "),
                        row.udp64_kpps,
                        row.rtt_us
                    );
                    row
                }
                Err(e) => {
                    eprintln!("   failed: {e:#}");
                    Row {
                        note: format!("failed: {e}"),
                        ..Row::default()
                    }
                }
            };
            runs.entry(i).or_default().push(row);
        }
    }
    let rows: BTreeMap<usize, (String, Row)> = runs
        .into_iter()
        .filter_map(|(i, rs)| Some((i, (args.modes.get(i)?.clone(), median_row(&rs)))))
        .collect();
    let table = render(&rows, &args);
    println!("{table}");
    if let Some(path) = args.write {
        write_benchmarks(&path, &table)?;
        eprintln!("wrote {path}");
    }
    Ok(())
}

fn config(backend: &str) -> String {
    format!(r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"{backend}"}}}}"#)
}

fn dual_stack_config(backend: &str) -> String {
    format!(
        r#"{{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fc00:44::/48","Backend":{{"Type":"{backend}"}}}}"#
    )
}

/// Our daemons' flags in the `-poll` modes.
const POLL_FLAGS: &[&str] = &["--busy-poll-us", "10000"];

/// Builds the cluster for `mode`, with one pod per node, and measures it.
fn measure(mode: &str, args: &Args) -> Result<Row> {
    let (seconds, profile) = (args.seconds, args.profile.as_deref());
    let v6 = mode.ends_with("-v6");
    let mut c = if v6 {
        Cluster::new_dual_stack(2)?
    } else {
        Cluster::new(2)?
    };
    match mode {
        "routing" => start_ours(&mut c, &config("host-gw"), &[])?,
        "kernel-vxlan" => wire_kernel_vxlan(&c)?,
        "udp" | "vxlan" | "wireguard" => start_ours(&mut c, &config(mode), &[])?,
        "udp-poll" | "wireguard-poll" => {
            start_ours(&mut c, &config(mode.trim_end_matches("-poll")), POLL_FLAGS)?
        }
        "routing-v6" => start_ours(&mut c, &dual_stack_config("host-gw"), &[])?,
        "vxlan-v6" | "wireguard-v6" => start_ours(
            &mut c,
            &dual_stack_config(mode.trim_end_matches("-v6")),
            &[],
        )?,
        "go-udp" | "go-vxlan" => start_go(&mut c, mode.trim_start_matches("go-"))?,
        "wireguard-go" => start_wireguard_go(&mut c)?,
        other => bail!("unknown mode {other:?}"),
    }
    let a = c.add_pod(0)?;
    let b = c.add_pod(1)?;
    let dst = if v6 {
        b.ipv6.clone().context("the pod got no IPv6 address")?
    } else {
        b.ip.clone()
    };
    // New IPv6 addresses pass duplicate detection first.
    netns_tests::wait_until("pods reach each other", Duration::from_secs(10), || {
        c.ping(&a, &dst, 1).is_ok()
    })
    .context("pods cannot reach each other")?;
    let daemons: Vec<u32> = c
        .nodes
        .iter()
        .filter_map(|n| n.daemon.as_ref().and_then(Daemon::pid))
        .collect();

    let mut row = Row::default();
    let _server = iperf_server(&c, &b, &dst)?;
    for (i, &streams) in args.streams.iter().enumerate() {
        let cpu_before = cpu_seconds(&daemons);
        // The profile covers the first stream count's run.
        let perf = match profile {
            Some(dir) if i == 0 && !daemons.is_empty() => {
                Some(start_perf(dir, mode, &daemons, seconds)?)
            }
            _ => None,
        };
        let (gbps, bytes) = iperf_tcp(&a, &dst, streams, seconds)?;
        if let Some((mut p, dir)) = perf {
            let _ = p.stop(Duration::from_secs(30));
            report_perf(&dir, mode);
        }
        let cpu_s_per_gb = (!daemons.is_empty() && bytes > 0.0)
            .then(|| (cpu_seconds(&daemons) - cpu_before) / (bytes / 1e9));
        row.tcp.push(Tcp { gbps, cpu_s_per_gb });
    }
    // The RTT before the 64-byte flood: a flood the receiver cannot keep up with leaves a
    // backlog in its socket buffer (7 MiB, as wireguard-go's: a quarter of a second of 64-byte
    // datagrams on these two cores), and pings right after it would measure that backlog
    // draining rather than the path.
    row.rtt_us = median_rtt_us(&a, &dst)?;
    row.udp64_kpps = iperf_udp64(&a, &dst, seconds)?;
    Ok(row)
}

/// `perf record` (software clock, call graphs) of the daemons for the length of one run.
fn start_perf(dir: &str, mode: &str, pids: &[u32], seconds: u32) -> Result<(Daemon, String)> {
    std::fs::create_dir_all(dir)?;
    let pid_list = pids
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let args: Vec<String> = [
        "record",
        "-e",
        "cpu-clock",
        "-F",
        "1999",
        "-g",
        "-p",
        &pid_list,
        "-o",
        &format!("{dir}/{mode}.perf.data"),
        "--",
        "sleep",
        &(seconds + 1).to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let d = Daemon::spawn(
        "perf",
        None,
        std::path::Path::new("/usr/bin/perf"),
        &args,
        &[],
        &std::path::Path::new(dir).join(format!("{mode}.perf.log")),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    Ok((d, dir.to_string()))
}

/// Writes a flat profile (self time by symbol) next to the recording.
fn report_perf(dir: &str, mode: &str) {
    let data = format!("{dir}/{mode}.perf.data");
    match run(
        "perf",
        &[
            "report",
            "-i",
            &data,
            "--stdio",
            "--no-children",
            "--sort",
            "comm,sym",
            "-g",
            "none",
            "--percent-limit",
            "0.5",
        ],
    ) {
        Ok(text) => {
            let _ = std::fs::write(format!("{dir}/{mode}.perf.txt"), &text);
            eprintln!("   profile: {dir}/{mode}.perf.txt");
        }
        Err(e) => eprintln!("   perf report failed: {e:#}"),
    }
}

/// Go Flannel v0.20.2 on every node, started one at a time (its README's advice).
fn start_go(c: &mut Cluster, backend: &str) -> Result<()> {
    if let Some(why) = netns_tests::goflannel::missing() {
        bail!("{why}");
    }
    c.put_config(&config(backend))?;
    for i in 0..c.nodes.len() {
        c.start_go_flannel(i, &[])?;
        c.wait_subnet_env(i, Duration::from_secs(30))?;
        // v0.20.2 writes subnet.env before its watch is up; a lease written in between is
        // never learned (its README's first fault). Give the watch time to start.
        std::thread::sleep(Duration::from_secs(2));
    }
    std::thread::sleep(Duration::from_secs(1));
    Ok(())
}

/// wireguard-go + wg on every node, configured by hand as a WireGuard peer of Flannel's would
/// be: device address = lease address with the Network's prefix (so the whole Network routes
/// into it), MTU 1420, each peer with AllowedIPs = its pod subnet and endpoint = its node:51820.
fn start_wireguard_go(c: &mut Cluster) -> Result<()> {
    if let Some(why) = netns_tests::wg::missing() {
        bail!("{why}");
    }
    let mut devs = Vec::new();
    for i in 0..c.nodes.len() {
        let keys = netns_tests::wg::WgKeys::generate()?;
        let sub = i + 1;
        devs.push(c.start_wireguard_go(i, &keys, 51820, &format!("10.244.{sub}.0/16"), 1420)?);
        c.write_subnet_env(i, &format!("10.244.{sub}.0/24"), 1420)?;
    }
    for dev in &devs {
        for (j, peer) in devs.iter().enumerate() {
            if peer.node != dev.node {
                let endpoint = format!("{}:{}", c.nodes[j].ip, peer.port);
                c.wg_set_peer(
                    dev,
                    &peer.keys.public,
                    &format!("10.244.{}.0/24", j + 1),
                    &endpoint,
                    None,
                )?;
            }
        }
    }
    Ok(())
}

fn start_ours(c: &mut Cluster, config: &str, flags: &[&str]) -> Result<()> {
    c.put_config(config)?;
    for i in 0..c.nodes.len() {
        c.start_daemon(i, flags)?;
        c.wait_subnet_env(i, Duration::from_secs(20))?;
    }
    // Let each daemon learn the other's lease.
    std::thread::sleep(Duration::from_millis(500));
    Ok(())
}

/// Kernel VXLAN set up by hand exactly as Flannel's vxlan backend does it, with no daemon:
/// flannel.1 (VNI 1, port 8472, learning off, MTU 1450), and per peer a permanent neighbour,
/// an FDB entry and an onlink route.
fn wire_kernel_vxlan(c: &Cluster) -> Result<()> {
    let mac = |i: usize| format!("0a:58:0a:f4:{:02x}:00", i + 1);
    for (i, n) in c.nodes.iter().enumerate() {
        let sub = i + 1;
        n.run(
            "ip",
            &[
                "link",
                "add",
                "flannel.1",
                "address",
                &mac(i),
                "type",
                "vxlan",
                "id",
                "1",
                "local",
                &n.ip,
                "dev",
                "eth0",
                "dstport",
                "8472",
                "nolearning",
            ],
        )?;
        n.run("ip", &["link", "set", "flannel.1", "mtu", "1450", "up"])?;
        n.run(
            "ip",
            &[
                "addr",
                "add",
                &format!("10.244.{sub}.0/32"),
                "dev",
                "flannel.1",
            ],
        )?;
        std::fs::write(
            n.subnet_file(),
            format!("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.{sub}.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"),
        )?;
    }
    for (i, n) in c.nodes.iter().enumerate() {
        for (j, peer) in c.nodes.iter().enumerate() {
            if i == j {
                continue;
            }
            let psub = j + 1;
            let paddr = format!("10.244.{psub}.0");
            n.run(
                "ip",
                &[
                    "neigh",
                    "replace",
                    &paddr,
                    "lladdr",
                    &mac(j),
                    "dev",
                    "flannel.1",
                    "nud",
                    "permanent",
                ],
            )?;
            n.run(
                "bridge",
                &[
                    "fdb",
                    "append",
                    &mac(j),
                    "dev",
                    "flannel.1",
                    "dst",
                    &peer.ip,
                ],
            )?;
            n.run(
                "ip",
                &[
                    "route",
                    "replace",
                    &format!("10.244.{psub}.0/24"),
                    "via",
                    &paddr,
                    "dev",
                    "flannel.1",
                    "onlink",
                ],
            )?;
        }
    }
    Ok(())
}

fn iperf_server(c: &Cluster, on: &Pod, addr: &str) -> Result<Daemon> {
    let log = c.dir.path().join("iperf3-server.log");
    let d = Daemon::spawn(
        "iperf3-server",
        Some(&on.ns),
        std::path::Path::new("iperf3"),
        &["-s".to_string(), "-B".to_string(), addr.to_string()],
        &[],
        &log,
    )?;
    netns_tests::wait_until("iperf3 server", Duration::from_secs(5), || {
        run_in(&on.ns, "ss", &["-ltn", "sport = :5201"]).is_ok_and(|o| o.contains("5201"))
    })?;
    Ok(d)
}

fn iperf_json(from: &Pod, args: &[&str]) -> Result<serde_json::Value> {
    let mut all = vec!["-J", "-c"];
    all.extend_from_slice(args);
    let out = run_in(&from.ns, "iperf3", &all)?;
    serde_json::from_str(&out).context("iperf3 -J output")
}

/// Returns (Gbit/s received, bytes received).
fn iperf_tcp(a: &Pod, dst: &str, streams: u32, seconds: u32) -> Result<(f64, f64)> {
    let j = iperf_json(
        a,
        &[
            dst,
            "-t",
            &seconds.to_string(),
            "-P",
            &streams.to_string(),
            "-O",
            "1",
        ],
    )?;
    let sum = &j["end"]["sum_received"];
    let bps = sum["bits_per_second"]
        .as_f64()
        .context("no sum_received.bits_per_second")?;
    let bytes = sum["bytes"].as_f64().unwrap_or(0.0);
    Ok((bps / 1e9, bytes))
}

/// Thousands of 64-byte UDP datagrams per second delivered to the receiver.
fn iperf_udp64(a: &Pod, dst: &str, seconds: u32) -> Result<f64> {
    let j = iperf_json(
        a,
        &[dst, "-u", "-l", "64", "-b", "0", "-t", &seconds.to_string()],
    )?;
    let sum = &j["end"]["sum"];
    let packets = sum["packets"].as_f64().context("no end.sum.packets")?;
    let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
    let secs = sum["seconds"]
        .as_f64()
        .unwrap_or(f64::from(seconds))
        .max(0.001);
    Ok((packets - lost) / secs / 1000.0)
}

fn median_rtt_us(a: &Pod, dst: &str) -> Result<f64> {
    let out = run_in(&a.ns, "ping", &["-c", "100", "-i", "0.005", dst])?;
    let mut times: Vec<f64> = out
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next())
        .filter_map(|t| t.parse::<f64>().ok())
        .collect();
    if times.is_empty() {
        bail!("no ping replies");
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2] * 1000.0)
}

/// User + system CPU seconds of processes, from /proc/<pid>/stat.
fn cpu_seconds(pids: &[u32]) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) / hz)
        })
        .sum()
}

fn render(rows: &BTreeMap<usize, (String, Row)>, args: &Args) -> String {
    let base = |name: &str| {
        rows.values()
            .find(|(m, _)| m == name)
            .map(|(_, r)| r.clone())
    };
    let vx = base("kernel-vxlan");
    let rt = base("routing");
    let go_udp = base("go-udp");
    let ratio = |v: f64, b: Option<f64>| match b {
        Some(b) if b > 0.0 && v > 0.0 => format!(" ({:.2}×)", v / b),
        _ => String::new(),
    };
    let first = args.streams.first().copied().unwrap_or(1);
    let mut head = String::from("| datapath |");
    for n in &args.streams {
        let _ = write!(
            head,
            " TCP {n} {} Gbit/s (× VXLAN) · CPU s/GB |",
            plural(*n)
        );
    }
    let _ = write!(
        head,
        " {first} {}: × routing | × Go Flannel udp | UDP 64 B kpps (× VXLAN) | median RTT µs (× VXLAN) | note |",
        plural(first)
    );
    let mut s = String::new();
    let _ = writeln!(s, "{head}");
    let _ = writeln!(s, "|---|{}", "---|".repeat(args.streams.len() + 5));
    for (mode, r) in rows.values() {
        let mut line = format!("| {} |", label(mode));
        for (i, t) in r.tcp.iter().enumerate() {
            let _ = write!(
                line,
                " {:.2}{} · {} |",
                t.gbps,
                ratio(t.gbps, vx.as_ref().map(|v| v.gbps(i))),
                t.cpu_s_per_gb
                    .map_or("–".to_string(), |c| format!("{c:.2}")),
            );
        }
        // A failed mode has no TCP figures: keep the columns lined up.
        for _ in r.tcp.len()..args.streams.len() {
            line.push_str(" |");
        }
        let _ = writeln!(
            s,
            "{line} {} | {} | {:.0}{} | {:.0}{} | {} |",
            bare(ratio(r.gbps(0), rt.as_ref().map(|v| v.gbps(0)))),
            bare(ratio(r.gbps(0), go_udp.as_ref().map(|v| v.gbps(0)))),
            r.udp64_kpps,
            ratio(r.udp64_kpps, vx.as_ref().map(|v| v.udp64_kpps)),
            r.rtt_us,
            ratio(r.rtt_us, vx.as_ref().map(|v| v.rtt_us)),
            r.note,
        );
    }
    let _ = writeln!(
        s,
        "\n{} s per iperf3 run, median of {} round(s); 2 nodes in network namespaces on one machine, one pod each. CPU s/GB: the daemons' user + system time per GB received (– without daemons).",
        args.seconds, args.rounds
    );
    s
}

fn plural(n: u32) -> &'static str {
    if n == 1 {
        "stream"
    } else {
        "streams"
    }
}

/// " (1.23×)" -> "1.23×"
fn bare(r: String) -> String {
    r.trim().trim_matches(|c| c == '(' || c == ')').to_string()
}

fn label(mode: &str) -> &str {
    match mode {
        "routing" => "plain routing (our host-gw)",
        "kernel-vxlan" => "kernel VXLAN, wired by hand as Flannel does",
        "udp" => "flanneld-rs udp",
        "udp-poll" => "flanneld-rs udp, --busy-poll-us 10000",
        "wireguard-poll" => "flanneld-rs wireguard, --busy-poll-us 10000",
        "vxlan" => "flanneld-rs vxlan",
        "wireguard" => "flanneld-rs wireguard (userspace)",
        "wireguard-go" => "wireguard-go 0.0.20220316, configured by hand",
        "go-udp" => "Go Flannel v0.20.2 udp",
        "go-vxlan" => "Go Flannel v0.20.2 vxlan",
        "routing-v6" => "IPv6: plain routing (our host-gw, dual stack)",
        "vxlan-v6" => "IPv6: flanneld-rs vxlan (flannel-v6.1)",
        "wireguard-v6" => "IPv6: flanneld-rs wireguard (flannel-wg-v6)",
        other => other,
    }
}

fn write_benchmarks(path: &str, table: &str) -> Result<()> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = run("uname", &["-r"]).unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    // The command as scripts/bench.sh takes it: without the --write it adds itself.
    let mut args: Vec<String> = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--write" {
            it.next();
        } else {
            args.push(a);
        }
    }
    // Everything from the first "## " heading on (other benchmarks' sections, the notes) is
    // written by hand or by other tools and survives a re-run.
    let notes = std::fs::read_to_string(path)
        .ok()
        .and_then(|old| old.find("\n## ").map(|i| old[i..].to_string()))
        .unwrap_or_default();
    let text = format!(
        "# Benchmarks\n\nMade by `sudo ./scripts/bench.sh {}` (release build), on {cores} cores, {cpu}, kernel {}.\n\n{table}{notes}",
        args.join(" "),
        kernel.trim()
    );
    std::fs::write(path, text).with_context(|| format!("writing {path}"))
}
