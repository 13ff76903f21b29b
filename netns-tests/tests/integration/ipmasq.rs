//! `--ip-masq`: a pod's traffic to an outside host arrives from the node's IP, pod-to-pod
//! traffic keeps pod IPs, traffic from outside keeps or loses its source as Flannel's rules say,
//! kube-proxy's mark is respected, and restarts (clean or killed) never duplicate rules. Once
//! through nftables, once through iptables-nft on a node without the `nft` binary.

use std::net::UdpSocket;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use netns_tests::cluster::{Cluster, Pod, OUTSIDE_IP};
use netns_tests::proc::run_in;
use netns_tests::traffic::in_netns;
use netns_tests::{binary, wait_until};

use crate::require_root;

const HOST_GW: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;

/// Sends UDP datagrams from `from_ns` to `to_ip:port`, where a socket in `to_ns` answers each
/// one. Returns the source address the receiver saw, once an answer made it back (so the NAT
/// was undone on the way back too).
pub(crate) fn udp_probe(from_ns: &str, to_ns: &str, to_ip: &str, port: u16) -> Result<String> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let to_ns = to_ns.to_string();
    let receiver = std::thread::spawn(move || {
        in_netns(&to_ns, move || {
            let sock = UdpSocket::bind(("0.0.0.0", port)).context("binding the receiver")?;
            sock.set_read_timeout(Some(Duration::from_secs(8)))?;
            let _ = ready_tx.send(());
            let mut buf = [0u8; 64];
            let mut first = None;
            // Answer every probe (the sender retries until an answer arrives), then stop.
            while let Ok((n, src)) = sock.recv_from(&mut buf) {
                if &buf[..n] == b"done" {
                    break;
                }
                first.get_or_insert(src.ip().to_string());
                sock.send_to(b"pong", src)?;
            }
            first.context("no probe arrived")
        })
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .context("the receiver did not start")?;
    let to: std::net::SocketAddr = format!("{to_ip}:{port}").parse()?;
    let answered = in_netns(from_ns, move || {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut buf = [0u8; 64];
        for _ in 0..10 {
            sock.send_to(b"ping", to)?;
            if matches!(sock.recv_from(&mut buf), Ok((4, _))) && &buf[..4] == b"pong" {
                sock.send_to(b"done", to)?;
                return Ok(true);
            }
        }
        sock.send_to(b"done", to)?;
        Ok(false)
    })?;
    let seen = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    ensure!(
        answered,
        "{to} saw the probe from {seen}, but its answer did not come back"
    );
    Ok(seen)
}

/// Our table as `nft` lists it, without handles; `None` when it does not exist.
fn nft_table(c: &Cluster, node: usize) -> Option<String> {
    c.nodes[node]
        .run("nft", &["list", "table", "ip", "flanneld-rs"])
        .ok()
}

/// The daemon's start flags with --ip-masq.
fn start(c: &mut Cluster, i: usize) -> Result<()> {
    c.start_daemon(i, &["--ip-masq"])?;
    c.wait_subnet_env(i, Duration::from_secs(20))?;
    Ok(())
}

/// The checks every masquerading node must pass, whatever installed its rules.
fn check_nat(c: &Cluster, out_ns: &str, pods: &[Pod]) -> Result<()> {
    let (n1, n2) = (&c.nodes[0], &c.nodes[1]);
    // Pod -> outside: from the node's address; the answer finds its way back.
    let seen = udp_probe(&pods[0].ns, out_ns, OUTSIDE_IP, 9000)?;
    ensure!(
        seen == n1.ip,
        "outside saw pod traffic from {seen}, not n1 {}",
        n1.ip
    );
    let seen = udp_probe(&pods[1].ns, out_ns, OUTSIDE_IP, 9000)?;
    ensure!(
        seen == n2.ip,
        "outside saw pod traffic from {seen}, not n2 {}",
        n2.ip
    );
    // Pod <-> pod across nodes: pod addresses, both ways.
    let seen = udp_probe(&pods[0].ns, &pods[1].ns, &pods[1].ip, 9001)?;
    ensure!(
        seen == pods[0].ip,
        "pod on n2 saw {seen}, not {}",
        pods[0].ip
    );
    let seen = udp_probe(&pods[1].ns, &pods[0].ns, &pods[0].ip, 9001)?;
    ensure!(
        seen == pods[1].ip,
        "pod on n1 saw {seen}, not {}",
        pods[1].ip
    );
    // Outside -> a pod of the node it entered: the pod sees the client.
    let seen = udp_probe(out_ns, &pods[0].ns, &pods[0].ip, 9002)?;
    ensure!(
        seen == OUTSIDE_IP,
        "pod on n1 saw the outside host as {seen}"
    );
    // Outside -> a pod on another node, through n1: masqueraded by n1, which entered it into
    // the pod network (n2 could not answer 172.30.0.200 through the overlay otherwise).
    let seen = udp_probe(out_ns, &pods[1].ns, &pods[1].ip, 9003)?;
    ensure!(
        seen == n1.ip,
        "pod on n2 saw outside traffic via n1 as {seen}"
    );
    Ok(())
}

/// Two host-gw nodes with --ip-masq, one pod each, and an outside host routing the pod network
/// through node 1 (as a router in front of a cluster would).
fn masq_cluster(env: &[(&str, &str)]) -> Result<(Cluster, String, Vec<Pod>)> {
    let mut c = Cluster::new(2)?;
    c.put_config(HOST_GW)?;
    let out = c.add_outside()?;
    run_in(
        &out,
        "ip",
        &["route", "add", "10.244.0.0/16", "via", &c.nodes[0].ip],
    )?;
    // n1 forwards to n2 out of the interface it came in by and would send an ICMP redirect;
    // the outside host must keep going through n1, as through a real gateway.
    run_in(
        &out,
        "sysctl",
        &["-qw", "net.ipv4.conf.all.accept_redirects=0"],
    )?;
    run_in(
        &out,
        "sysctl",
        &["-qw", "net.ipv4.conf.eth0.accept_redirects=0"],
    )?;
    for i in 0..2 {
        if env.is_empty() {
            start(&mut c, i)?;
        } else {
            let args = c.daemon_args(i, &["--ip-masq"]);
            let prog = binary("flanneld-rs")?;
            c.start_program(i, &prog, &args, env)?;
            c.wait_subnet_env(i, Duration::from_secs(20))?;
        }
    }
    let pods = (0..2).map(|i| c.add_pod(i)).collect::<Result<Vec<_>>>()?;
    wait_until(
        "the pods to reach each other",
        Duration::from_secs(10),
        || c.ping(&pods[0], &pods[1].ip, 1).is_ok(),
    )?;
    Ok((c, out, pods))
}

#[test]
fn nat_semantics_through_nftables_and_restarts() -> Result<()> {
    require_root!();
    let (mut c, out, pods) = masq_cluster(&[])?;
    let env = std::fs::read_to_string(c.nodes[0].subnet_file())?;
    ensure!(env.contains("FLANNEL_IPMASQ=true"), "subnet.env:\n{env}");
    // Someone else's table in the node: ours must never touch it.
    c.nodes[0].run(
        "nft",
        &["add table inet someone-else; add chain inet someone-else c { type filter hook input priority 10; policy accept; }"],
    )?;
    let table = nft_table(&c, 0).context("no table ip flanneld-rs on n1")?;
    for rule in [
        "meta mark & 0x00004000 == 0x00004000 return",
        "ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random",
        "ip daddr != 224.0.0.0/4 masquerade fully-random",
    ] {
        ensure!(table.contains(rule), "n1 lacks `{rule}`:\n{table}");
    }
    // Forward accepts go where a DROP policy lives: iptables' FORWARD chain.
    ensure!(!table.contains("chain forward"), "{table}");
    let fwd = c.nodes[0].run("iptables", &["-w", "-S", "FLANNELD-RS-FWD"])?;
    ensure!(
        fwd.contains("-A FLANNELD-RS-FWD -s 10.244.0.0/16 -j ACCEPT"),
        "{fwd}"
    );
    check_nat(&c, &out, &pods)?;

    // kube-proxy's mark (0x4000) exempts a packet: it masquerades those itself.
    c.nodes[0].run(
        "nft",
        &["add table ip kube-mark; add chain ip kube-mark pre { type filter hook prerouting priority -150; }; add rule ip kube-mark pre udp dport 9010 meta mark set mark or 0x4000"],
    )?;
    // (The outside host answers the pod address through its route via n1.)
    let seen = udp_probe(&pods[0].ns, &out, OUTSIDE_IP, 9010)?;
    ensure!(
        seen == pods[0].ip,
        "a kube-proxy-marked packet was masqueraded to {seen}"
    );
    c.nodes[0].run("nft", &["delete table ip kube-mark"])?;

    // Clean stop: our table goes, the other one stays; the restart brings back the same rules.
    ensure!(c.stop_daemon(0) == Some(0), "SIGTERM should exit 0");
    ensure!(nft_table(&c, 0).is_none(), "table left after SIGTERM");
    let ruleset = c.nodes[0].run("nft", &["list", "ruleset"])?;
    ensure!(ruleset.contains("table inet someone-else"), "{ruleset}");
    // (The daemon handle is gone after a stop: read its log file.)
    let log = std::fs::read_to_string(c.nodes[0].dir.join("daemon.log"))?;
    ensure!(log.contains("ip-masq rules removed"), "{log}");
    // The forward accepts stay for the restart (as Go Flannel v0.27+ leaves its own).
    let fwd = c.nodes[0].run("iptables", &["-w", "-S", "FORWARD"])?;
    ensure!(fwd.contains("-j FLANNELD-RS-FWD"), "{fwd}");
    start(&mut c, 0)?;
    wait_until("the table after a restart", Duration::from_secs(10), || {
        nft_table(&c, 0).as_deref() == Some(table.as_str())
    })?;

    // Killed: the table stays behind; the next start replaces it, no duplicates.
    if let Some(d) = c.nodes[0].daemon.as_mut() {
        d.signal(libc::SIGKILL);
    }
    c.stop_daemon(0);
    ensure!(
        nft_table(&c, 0).as_deref() == Some(table.as_str()),
        "SIGKILL removed rules?"
    );
    start(&mut c, 0)?;
    std::thread::sleep(Duration::from_millis(500));
    let again = nft_table(&c, 0).context("table gone after restart")?;
    ensure!(
        again == table,
        "rules changed across restarts:\n{table}\n---\n{again}"
    );
    ensure!(again.matches("masquerade").count() == 2, "{again}");
    let ruleset = c.nodes[0].run("nft", &["list", "ruleset"])?;
    ensure!(
        ruleset.matches("table ip flanneld-rs").count() == 1,
        "{ruleset}"
    );
    check_nat(&c, &out, &pods)?;
    Ok(())
}

/// A directory with the tools a node without nftables' CLI has: iproute2 and iptables-nft.
fn path_without_nft(dir: &Path) -> Result<String> {
    std::fs::create_dir_all(dir)?;
    for tool in [
        "ip",
        "iptables",
        "iptables-restore",
        "ip6tables",
        "ip6tables-restore",
    ] {
        let target = ["/usr/sbin", "/sbin", "/usr/bin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.exists())
            .with_context(|| format!("{tool} not installed"))?;
        std::os::unix::fs::symlink(&target, dir.join(tool))?;
    }
    Ok(dir.display().to_string())
}

fn ipt(c: &Cluster, node: usize, table: &str, chain: &str) -> Result<String> {
    c.nodes[node].run("iptables", &["-w", "-t", table, "-S", chain])
}

#[test]
fn iptables_fallback_without_nft() -> Result<()> {
    require_root!();
    let dir = tempfile::tempdir()?;
    let path = path_without_nft(dir.path())?;
    let (mut c, out, pods) = masq_cluster(&[("PATH", &path), ("RUST_LOG", "debug")])?;
    ensure!(
        c.nodes[0].log().contains("nft not found: using iptables"),
        "{}",
        c.nodes[0].log()
    );
    ensure!(nft_table(&c, 0).is_none(), "an nft table without nft?");
    let chain = ipt(&c, 0, "nat", "FLANNELD-RS-POSTRTG")?;
    ensure!(chain.lines().count() == 7, "chain and 6 rules:\n{chain}");
    let jumps = |c: &Cluster| -> Result<(usize, usize)> {
        Ok((
            ipt(c, 0, "nat", "POSTROUTING")?
                .matches("-j FLANNELD-RS-POSTRTG")
                .count(),
            ipt(c, 0, "filter", "FORWARD")?
                .matches("-j FLANNELD-RS-FWD")
                .count(),
        ))
    };
    ensure!(jumps(&c)? == (1, 1), "jumps {:?}", jumps(&c)?);
    check_nat(&c, &out, &pods)?;

    // Killed, then restarted twice: still one jump each and the same six rules.
    for _ in 0..2 {
        let installs = c.nodes[0].log().matches("traffic rules installed").count();
        if let Some(d) = c.nodes[0].daemon.as_mut() {
            d.signal(libc::SIGKILL);
        }
        c.stop_daemon(0);
        let args = c.daemon_args(0, &["--ip-masq"]);
        let prog = binary("flanneld-rs")?;
        c.start_program(0, &prog, &args, &[("PATH", &path)])?;
        wait_until("the daemon to reinstall", Duration::from_secs(10), || {
            c.nodes[0].log().matches("traffic rules installed").count() > installs
        })?;
    }
    ensure!(jumps(&c)? == (1, 1), "duplicate jumps {:?}", jumps(&c)?);
    ensure!(
        ipt(&c, 0, "nat", "FLANNELD-RS-POSTRTG")? == chain,
        "chain changed"
    );
    check_nat(&c, &out, &pods)?;

    ensure!(c.stop_daemon(0) == Some(0), "SIGTERM should exit 0");
    // The masquerade goes; the forward accepts stay for the restart.
    ensure!(
        jumps(&c)? == (0, 1),
        "jumps after SIGTERM: {:?}",
        jumps(&c)?
    );
    if ipt(&c, 0, "nat", "FLANNELD-RS-POSTRTG").is_ok() {
        bail!("chain FLANNELD-RS-POSTRTG left after SIGTERM");
    }
    Ok(())
}
