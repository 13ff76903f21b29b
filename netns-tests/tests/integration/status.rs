//! `flanneld-rs status`: the running daemon's lease, devices, peers and environment checks,
//! read over the socket beside its subnet file, as a table and as JSON.

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use netns_tests::binary;
use netns_tests::cluster::{Cluster, ETCD_PREFIX};

use crate::require_root;

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const START: Duration = Duration::from_secs(20);

/// `flanneld-rs status [--json]` inside node `i`: (exit code, stdout).
fn status(c: &Cluster, i: usize, json: bool) -> Result<(i32, String)> {
    let subnet_file = c.nodes[i].subnet_file();
    let mut args = vec![
        "netns".to_string(),
        "exec".to_string(),
        c.nodes[i].ns.clone(),
        binary("flanneld-rs")?.display().to_string(),
        "status".to_string(),
        "--subnet-file".to_string(),
        subnet_file.display().to_string(),
    ];
    if json {
        args.push("--json".into());
    }
    let out = Command::new("ip").args(&args).output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

#[test]
fn status_shows_lease_devices_peers_and_a_forward_drop() -> Result<()> {
    require_root!();
    let mut c = Cluster::new(2)?;
    c.put_config(VXLAN)?;
    // Node 2 as on a Docker host, with Flannel's forward rules turned off.
    c.nodes[1].run("iptables", &["-w", "-P", "FORWARD", "DROP"])?;
    c.start_daemon(0, &[])?;
    c.start_daemon(1, &["--iptables-forward-rules=false"])?;
    for i in 0..2 {
        c.wait_subnet_env(i, START)?;
    }
    let (subnet0, subnet1) = (c.lease_subnet(0)?, c.lease_subnet(1)?);
    let key = |s: &str| s.replace('/', "-");
    netns_tests::wait_until("n1 to see its peer", Duration::from_secs(10), || {
        status(&c, 0, false).is_ok_and(|(_, t)| t.contains(&key(&subnet1)))
    })?;
    let (code, table) = status(&c, 0, false)?;
    eprintln!("{table}");
    ensure!(code == 0, "status exits {code} on a healthy node:\n{table}");
    for want in [
        "backend   vxlan".to_string(),
        format!("lease     {} (expires in", key(&subnet0)),
        "ready     yes".to_string(),
        "device    flannel.1".to_string(),
        "peers (1, 0 refused)".to_string(),
        key(&subnet1),
        c.nodes[1].ip.clone(),
        "not probed".to_string(),
    ] {
        ensure!(table.contains(&want), "no {want:?} in\n{table}");
    }

    // The node whose FORWARD policy drops pod traffic says so, and exits 1.
    let (code, table) = status(&c, 1, false)?;
    eprintln!("{table}");
    ensure!(code == 1, "exit {code}:\n{table}");
    let line = table
        .lines()
        .find(|l| l.trim_start().starts_with("forward"))
        .context("no forward check")?;
    ensure!(
        line.contains("PROBLEM") && line.contains("FORWARD policy DROP"),
        "{line}"
    );
    let (_, json) = status(&c, 1, true)?;
    let report: serde_json::Value = serde_json::from_str(&json)?;
    ensure!(report["backend"] == "vxlan", "{json}");
    ensure!(
        report["peers"].as_array().map(Vec::len) == Some(1),
        "{json}"
    );
    let forward = report["checks"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "forward"))
        .context("no forward check in JSON")?;
    ensure!(forward["ok"] == false, "{forward}");

    // A refused lease counts while it is there, not after.
    let bad = format!("{ETCD_PREFIX}/subnets/10.244.250.0-24");
    let etcd = c.etcd()?;
    etcd.put(
        &bad,
        r#"{"PublicIP":"127.0.0.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:fa"}}"#,
    )?;
    let says = |want: &str| status(&c, 0, false).is_ok_and(|(_, t)| t.contains(want));
    netns_tests::wait_until("1 refused", Duration::from_secs(10), || {
        says("peers (1, 1 refused)")
    })?;
    etcd.ctl(&["del", &bad])?;
    netns_tests::wait_until("0 refused again", Duration::from_secs(10), || {
        says("peers (1, 0 refused)")
    })?;

    // No daemon behind the socket: exit 2 with the reason.
    ensure!(c.stop_daemon(0) == Some(0), "SIGTERM should exit 0");
    let (code, _) = status(&c, 0, false)?;
    ensure!(code == 2, "exit {code} without a daemon");
    Ok(())
}
