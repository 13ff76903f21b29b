//! Drop-in for Flannel v0.28.9: its flags on the real binary, forward rules on a host whose
//! FORWARD policy is DROP, the blackhole route, and Go Flannel's leftover rules removed at
//! start (nothing else touched).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use netns_tests::cluster::Cluster;
use netns_tests::traffic::http_get;
use netns_tests::{binary, wait_until};

use crate::require_root;

const HOST_GW: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;
const START: Duration = Duration::from_secs(20);
const HEALTHZ: u16 = 9102;

/// Flannel v0.28.9's flags that are not about etcd, the interface or the subnet file (which
/// the harness passes), in the Go single-dash form its units and manifests use.
const V0_28_9_FLAGS: &[&str] = &[
    "-iface-regex=^eth[0-9]{1,2}$",
    "-iface-can-reach=10.0.0.1",
    "-subnet-lease-renew-margin=60",
    "-ip-masq",
    "-ip-masq-fully-random-disable",
    "-kube-subnet-mgr=false",
    "-kube-api-url=https://10.96.0.1:443",
    "-kube-annotation-prefix=flannel.alpha.coreos.com",
    "-kubeconfig-file=/nonexistent/kubeconfig",
    "-healthz-ip=127.0.0.1",
    "-healthz-port=9102",
    "-iptables-resync=1",
    "-iptables-forward-rules=true",
    "-ip-blackhole-route",
    "-net-config-path=/etc/kube-flannel/net-conf.json",
    "-set-node-network-unavailable=true",
    "-v=2",
    "-vmodule=main=3",
    "-log_backtrace_at=main.go:100",
];

#[test]
fn every_v0_28_9_flag_runs_the_real_daemon() -> Result<()> {
    require_root!();
    let mut c = Cluster::new(2)?;
    c.put_config(HOST_GW)?;
    for i in 0..2 {
        c.start_daemon(i, V0_28_9_FLAGS)?;
        c.wait_subnet_env(i, START)?;
    }
    let ns = c.nodes[0].ns.clone();
    wait_until("readyz 200", Duration::from_secs(10), || {
        http_get(&ns, HEALTHZ, "/readyz").is_ok_and(|(s, _)| s.contains("200"))
    })?;
    let (status, body) = http_get(&ns, HEALTHZ, "/healthz")?;
    ensure!(status.contains("200") && body == "ok\n", "{status} {body}");
    // The flags took effect: masquerade without fully-random ports, forward accepts, and the
    // blackhole route for our lease.
    let table = c.nodes[0].run("nft", &["list", "table", "ip", "flanneld-rs"])?;
    ensure!(
        table.contains("masquerade") && !table.contains("fully-random"),
        "{table}"
    );
    let fwd = c.nodes[0].run("iptables", &["-w", "-S", "FLANNELD-RS-FWD"])?;
    ensure!(fwd.contains("-s 10.244.0.0/16 -j ACCEPT"), "{fwd}");
    let subnet = c.lease_subnet(0)?;
    let blackholes = c.nodes[0].run("ip", &["route", "show", "type", "blackhole"])?;
    ensure!(blackholes.contains(&subnet), "{blackholes}");
    let pods = [c.add_pod(0)?, c.add_pod(1)?];
    wait_until("pods ping", Duration::from_secs(10), || {
        c.ping_mesh(&pods).is_ok()
    })?;

    // The kube subnet manager is refused with a clear message, not run half-way.
    let out = std::process::Command::new(binary("flanneld-rs")?)
        .args(["--kube-subnet-mgr", "--healthz-port=8081"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1) && stderr.contains("etcd mode"),
        "{:?}: {stderr}",
        out.status
    );
    eprintln!("--kube-subnet-mgr: {}", stderr.trim());
    Ok(())
}

#[test]
fn forward_rules_carry_pods_through_a_drop_policy() -> Result<()> {
    require_root!();
    let mut c = Cluster::new(2)?;
    c.put_config(HOST_GW)?;
    // As on a host running Docker.
    for node in &c.nodes {
        node.run("iptables", &["-w", "-P", "FORWARD", "DROP"])?;
    }
    for i in 0..2 {
        c.start_daemon(i, &["--iptables-forward-rules=false"])?;
        c.wait_subnet_env(i, START)?;
    }
    let pods = [c.add_pod(0)?, c.add_pod(1)?];
    // Routes are in place, yet the policy drops every forwarded packet.
    std::thread::sleep(Duration::from_millis(500));
    ensure!(
        c.ping(&pods[0], &pods[1].ip, 2).is_err(),
        "pods talk through FORWARD DROP without forward rules?"
    );
    for i in 0..2 {
        ensure!(c.stop_daemon(i) == Some(0), "SIGTERM should exit 0");
        c.start_daemon(i, &[])?; // Flannel's default: --iptables-forward-rules=true
    }
    let took = wait_until("pods ping with forward rules", START, || {
        c.ping_mesh(&pods).is_ok()
    })?;
    eprintln!("pods talk {took:?} after the daemons restarted with forward rules");
    let forward = c.nodes[0].run("iptables", &["-w", "-S", "FORWARD"])?;
    ensure!(
        forward.contains("-P FORWARD DROP") && forward.contains("-j FLANNELD-RS-FWD"),
        "the policy stays the operator's; our jump is added:\n{forward}"
    );
    // Turned off again: our chain goes at the next start, and the policy drops again.
    ensure!(c.stop_daemon(0) == Some(0), "SIGTERM should exit 0");
    c.start_daemon(0, &["--iptables-forward-rules=false"])?;
    wait_until("our forward chain removed", Duration::from_secs(10), || {
        c.nodes[0]
            .run("iptables", &["-w", "-S", "FORWARD"])
            .is_ok_and(|f| !f.contains("FLANNELD-RS-FWD"))
    })?;
    ensure!(c.ping(&pods[0], &pods[1].ip, 2).is_err(), "still forwarded");
    Ok(())
}

#[test]
fn blackhole_route_is_added_kept_and_yields_to_pods() -> Result<()> {
    require_root!();
    let mut c = Cluster::new(1)?;
    c.put_config(HOST_GW)?;
    c.start_daemon(0, &["--ip-blackhole-route", "--iptables-resync=1"])?;
    c.wait_subnet_env(0, START)?;
    let subnet = c.lease_subnet(0)?;
    let blackhole = |c: &Cluster| -> Result<String> {
        c.nodes[0].run(
            "ip",
            &["route", "show", "type", "blackhole", subnet.as_str()],
        )
    };
    // Added after subnet.env and the rules.
    wait_until("the blackhole route", Duration::from_secs(5), || {
        blackhole(&c).is_ok_and(|r| r.contains(&subnet))
    })?;
    let route = blackhole(&c)?;
    ensure!(route.contains("proto 70"), "not marked as ours: {route}");
    // A pod's bridge route to the same subnet wins over it: the node reaches its pods.
    let pod = c.add_pod(0)?;
    c.nodes[0]
        .run("ping", &["-c", "2", "-i", "0.2", "-W", "1", &pod.ip])
        .context("the blackhole swallowed traffic to a local pod")?;
    // An address of the subnet nobody holds is dropped here, not sent out the default route.
    let unused = subnet.replace(".0/24", ".250");
    let lookup = c.nodes[0].run("ip", &["route", "get", &unused])?;
    ensure!(lookup.contains("dev cni0"), "{lookup}");
    c.nodes[0].run("ip", &["link", "set", "cni0", "down"])?;
    let lookup = c.nodes[0].run("ip", &["route", "get", &unused]);
    ensure!(
        lookup.as_ref().is_err() || lookup.as_ref().is_ok_and(|l| l.contains("blackhole")),
        "{lookup:?}"
    );
    c.nodes[0].run("ip", &["link", "set", "cni0", "up"])?;
    // Deleted behind our back: back within a resync period or two.
    c.nodes[0].run(
        "ip",
        &["route", "del", "blackhole", &subnet, "metric", "4242"],
    )?;
    let took = wait_until(
        "the blackhole route restored",
        Duration::from_secs(5),
        || blackhole(&c).is_ok_and(|r| r.contains(&subnet)),
    )?;
    eprintln!("blackhole route restored {took:?} after it was deleted");
    // Turned off: the next start removes ours.
    ensure!(c.stop_daemon(0) == Some(0), "SIGTERM should exit 0");
    c.start_daemon(0, &["--iptables-resync=1"])?;
    wait_until("our blackhole removed", Duration::from_secs(10), || {
        blackhole(&c).is_ok_and(|r| r.trim().is_empty())
    })?;
    Ok(())
}

#[test]
fn go_flannels_leftover_rules_are_removed_and_nothing_else() -> Result<()> {
    require_root!();
    let mut c = Cluster::new(1)?;
    c.put_config(HOST_GW)?;
    let n = &c.nodes[0];
    // What Go Flannel v0.27+ leaves at exit, in both of its modes (nftables, iptables).
    n.run(
        "nft",
        &["add table ip flannel-ipv4; add chain ip flannel-ipv4 postrtg { type nat hook postrouting priority 100; }; add rule ip flannel-ipv4 postrtg ip saddr 10.244.0.0/16 masquerade"],
    )?;
    n.run("nft", &["add table ip6 flannel-ipv6"])?;
    for (table, chain, parent) in [
        ("nat", "FLANNEL-POSTRTG", "POSTROUTING"),
        ("filter", "FLANNEL-FWD", "FORWARD"),
    ] {
        n.run("iptables", &["-w", "-t", table, "-N", chain])?;
        n.run(
            "iptables",
            &[
                "-w",
                "-t",
                table,
                "-A",
                chain,
                "-s",
                "10.244.0.0/16",
                "-j",
                "RETURN",
            ],
        )?;
        n.run(
            "iptables",
            &[
                "-w",
                "-t",
                table,
                "-A",
                parent,
                "-m",
                "comment",
                "--comment",
                "flanneld masq",
                "-j",
                chain,
            ],
        )?;
    }
    // Someone else's, with names close to Go's: all of it stays.
    n.run("nft", &["add table ip flannel-other"])?;
    n.run("iptables", &["-w", "-N", "FLANNEL-FWD-KEEP"])?;
    n.run(
        "iptables",
        &["-w", "-A", "FORWARD", "-j", "FLANNEL-FWD-KEEP"],
    )?;
    n.run(
        "iptables",
        &[
            "-w",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            "10.9.0.0/16",
            "-j",
            "MASQUERADE",
        ],
    )?;

    c.start_daemon(
        0,
        &["--iptables-forward-rules=false", "--healthz-port=9102"],
    )?;
    c.wait_subnet_env(0, START)?;
    let n = &c.nodes[0];
    // Removed before our own rules are installed, so once readyz says ready.
    wait_until("readyz 200", Duration::from_secs(10), || {
        http_get(&n.ns, HEALTHZ, "/readyz").is_ok_and(|(s, _)| s.contains("200"))
    })?;
    let tables = n.run("nft", &["list", "tables"])?;
    ensure!(tables.contains("table ip flannel-other"), "{tables}");
    let nat = n.run("iptables", &["-w", "-t", "nat", "-S"])?;
    ensure!(!nat.contains("FLANNEL-POSTRTG"), "{nat}");
    ensure!(
        nat.contains("-A POSTROUTING -s 10.9.0.0/16 -j MASQUERADE"),
        "{nat}"
    );
    let filter = n.run("iptables", &["-w", "-S"])?;
    ensure!(
        !filter
            .lines()
            .any(|l| l.contains("FLANNEL-FWD") && !l.contains("FLANNEL-FWD-KEEP")),
        "{filter}"
    );
    ensure!(
        filter.contains("-A FORWARD -j FLANNEL-FWD-KEEP"),
        "{filter}"
    );
    let log = n.log();
    ensure!(
        log.contains("removed Go Flannel's leftover nftables table ip flannel-ipv4")
            && log.contains("removed Go Flannel's leftover iptables nat chain FLANNEL-POSTRTG"),
        "{log}"
    );
    Ok(())
}

#[test]
fn iface_can_reach_picks_the_interface_of_the_route() -> Result<()> {
    require_root!();
    let mut c = Cluster::new(1)?;
    c.put_config(HOST_GW)?;
    // No --iface, and a target the default route does not lead to: the interface (and
    // source address) are those of the route to it.
    let args: Vec<String> = c
        .daemon_args(0, &["--iface-can-reach=10.99.0.2"])
        .into_iter()
        .filter(|a| a != "--iface=eth0")
        .collect();
    let n = &c.nodes[0];
    n.run(
        "ip",
        &[
            "link", "add", "decoy0", "type", "veth", "peer", "name", "decoy1",
        ],
    )?;
    n.run("ip", &["addr", "add", "10.99.0.1/24", "dev", "decoy0"])?;
    n.run("ip", &["link", "set", "decoy1", "up"])?;
    n.run("ip", &["link", "set", "decoy0", "up"])?;
    c.start_program(0, &binary("flanneld-rs")?, &args, &[])?;
    c.wait_subnet_env(0, START)?;
    // Field names are coloured: match on the text without escape sequences.
    let log = strip_ansi(&c.nodes[0].log());
    let want = "iface=decoy0 public_ip=10.99.0.1";
    ensure!(log.contains(want), "no {want:?} in\n{log}");
    Ok(())
}

/// `text` without ANSI escape sequences (`ESC [ … m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}
