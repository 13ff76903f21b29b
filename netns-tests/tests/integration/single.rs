//! One daemon per subnet file: a second flanneld-rs on the same node is refused instead of
//! sharing the first one's lease, `flannel0` and port 8285.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use netns_tests::cluster::Cluster;
use netns_tests::proc::Daemon;
use netns_tests::{binary, wait_until};

use crate::require_root;

const UDP: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;

#[test]
fn second_daemon_with_the_same_subnet_file_is_refused() -> Result<()> {
    require_root!();
    let mut c = Cluster::new(1)?;
    c.put_config(UDP)?;
    c.start_daemon(0, &[])?;
    c.wait_subnet_env(0, Duration::from_secs(20))?;
    let first = c.nodes[0]
        .daemon
        .as_ref()
        .and_then(Daemon::pid)
        .context("first daemon's pid")?;

    let node = &c.nodes[0];
    let mut second = Daemon::spawn(
        "second flanneld-rs",
        Some(&node.ns),
        &binary("flanneld-rs")?,
        &c.daemon_args(0, &[]),
        &[],
        &node.dir.join("second.log"),
    )?;
    let exited = wait_until("the second daemon to exit", Duration::from_secs(10), || {
        !second.alive()
    });
    let code = second.stop(Duration::from_secs(5));
    let log = second.log_text();
    exited.with_context(|| format!("second daemon log:\n{log}"))?;
    ensure!(code.is_some_and(|c| c != 0), "exit code {code:?}:\n{log}");
    let subnet_file = node.subnet_file().display().to_string();
    ensure!(
        log.contains(&subnet_file) && log.contains(&format!("pid {first}")),
        "the refusal names the file and the holder:\n{log}"
    );
    ensure!(
        c.nodes[0].daemon.as_mut().is_some_and(Daemon::alive),
        "the first daemon still runs:\n{}",
        c.nodes[0].log()
    );
    Ok(())
}
