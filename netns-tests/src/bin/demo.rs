//! The README's demo: a 3-node cluster in namespaces with a real etcd, flanneld-rs on every
//! node, pods made through our CNI plugin, and pings between pods on different nodes.
//!
//! `demo [--backend host-gw] [--hold]`: with --hold the cluster stays up until Ctrl-C.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use netns_tests::cluster::Cluster;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let hold = args.iter().any(|a| a == "--hold");
    let backend = args
        .iter()
        .position(|a| a == "--backend")
        .and_then(|i| args.get(i + 1))
        .map_or("host-gw", String::as_str);
    if !netns_tests::is_root() {
        bail!("the demo creates network namespaces: run it as root");
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as usize);
        libc::signal(libc::SIGTERM, on_signal as *const () as usize);
    }

    println!("==> building 3 node namespaces on an underlay bridge, with etcd in the underlay");
    let mut c = Cluster::new(3)?;
    let config = format!(r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"{backend}"}}}}"#);
    println!("==> etcdctl put /coreos.com/network/config '{config}'");
    c.put_config(&config)?;
    for i in 0..3 {
        c.start_daemon(i, &[])?;
        c.wait_subnet_env(i, Duration::from_secs(20))
            .with_context(|| format!("node n{} did not write subnet.env", i + 1))?;
    }
    println!("\n==> leases in etcd (Flannel's keys and JSON)");
    for (k, v) in c.leases()? {
        println!("    /coreos.com/network/subnets/{k} = {v}");
    }
    println!("\n==> n1's subnet.env");
    print!(
        "{}",
        indent(&std::fs::read_to_string(c.nodes[0].subnet_file())?)
    );
    println!("\n==> pods created through our CNI plugin (flannel -> bridge + host-local)");
    let mut pods = Vec::new();
    for i in 0..3 {
        let pod = c.add_pod(i)?;
        println!("    {} on n{}: {}", pod.ns, i + 1, pod.ip);
        pods.push(pod);
    }
    std::thread::sleep(Duration::from_millis(300));
    println!("\n==> n1's routes ({backend})");
    print!("{}", indent(&c.nodes[0].routes()?));
    println!("\n==> pinging across nodes");
    for (a, b) in [(0, 1), (1, 2), (2, 0)] {
        let out =
            netns_tests::proc::run_in(&pods[a].ns, "ping", &["-c", "3", "-i", "0.2", &pods[b].ip])?;
        let summary = out
            .lines()
            .filter(|l| l.contains("packets") || l.contains("rtt"))
            .collect::<Vec<_>>();
        println!(
            "    {} -> {}: {}",
            pods[a].ip,
            pods[b].ip,
            summary.join(" | ")
        );
    }
    println!("\n==> flanneld-rs status on n1 (peers' paths probed every 5 s)");
    let status = |c: &Cluster| -> Result<String> {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &c.nodes[0].ns])
            .arg(netns_tests::binary("flanneld-rs")?)
            .arg("status")
            .arg("--subnet-file")
            .arg(c.nodes[0].subnet_file())
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // Wait for the first round of probes to be answered, for the table to say so.
    let _ = netns_tests::wait_until("n1's peers probed", Duration::from_secs(12), || {
        status(&c).is_ok_and(|t| t.matches(" up, rtt").count() >= 2)
    });
    print!("{}", indent(&status(&c)?));
    if hold {
        println!(
            "\n==> cluster up. Try: ip netns exec {} ping {}",
            pods[0].ns, pods[2].ip
        );
        println!(
            "    node logs under {}; Ctrl-C tears everything down",
            c.dir.path().display()
        );
        while !STOP.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    println!("\n==> tearing down (namespaces, daemons, etcd)");
    drop(c);
    println!("done");
    Ok(())
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}
