//! etcd over TLS with client certificates (made by the test with openssl), and etcd's user
//! authentication: `--etcd-cafile/--etcd-certfile/--etcd-keyfile`, `--etcd-username/-password`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use netns_tests::cluster::{Cluster, ETCD_PREFIX};
use netns_tests::etcd::TlsFiles;
use netns_tests::traffic::{http_get, metric};
use netns_tests::wait_until;

use crate::require_root;

const METRICS: u16 = 9101;

/// Runs `deploy/etcd-config.sh` inside the underlay namespace with etcdctl's environment for
/// the cluster's etcd (endpoint, certificates, credentials), as an operator would.
pub(crate) fn etcd_config_script(c: &Cluster, args: &[&str]) -> Result<String> {
    let etcd = c.etcd()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/etcd-config.sh");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &c.underlay, "env"]);
    for (k, v) in etcd.ctl_env() {
        cmd.arg(format!("{k}={v}"));
    }
    let out = cmd
        .arg(&script)
        .args(args)
        .output()
        .context("running etcd-config.sh")?;
    if !out.status.success() {
        bail!(
            "etcd-config.sh {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Reads the daemon's log file (also after the daemon handle is gone).
fn log_file(c: &Cluster, i: usize) -> String {
    std::fs::read_to_string(c.nodes[i].dir.join("daemon.log")).unwrap_or_default()
}

#[test]
fn daemons_lease_and_route_over_tls() -> Result<()> {
    require_root!();
    let mut c = Cluster::new_tls(2, &[])?;
    ensure!(c.etcd()?.endpoint.starts_with("https://"));
    // The deploy script writes the config through TLS too.
    let put = etcd_config_script(&c, &["--network", "10.244.0.0/16", "--backend", "host-gw"])?;
    ensure!(put.contains("/coreos.com/network/config"), "{put}");
    for i in 0..2 {
        c.start_daemon(i, &[])?;
        c.wait_subnet_env(i, Duration::from_secs(20))?;
    }
    ensure!(c.leases()?.len() == 2, "leases: {:?}", c.leases()?);
    let pods = (0..2).map(|i| c.add_pod(i)).collect::<Result<Vec<_>>>()?;
    wait_until("pods to reach each other", Duration::from_secs(10), || {
        c.ping_mesh(&pods).is_ok()
    })?;

    // etcd really demands a client certificate: without one, etcdctl is refused.
    let files = c.etcd()?.tls().context("no TLS files")?.clone();
    let refused = netns_tests::proc::run_in(
        &c.underlay,
        "env",
        &[
            "ETCDCTL_API=3",
            "etcdctl",
            &format!("--endpoints={}", c.etcd()?.endpoint),
            &format!("--cacert={}", files.ca.display()),
            "--command-timeout=3s",
            "get",
            "/coreos.com/network/config",
        ],
    );
    ensure!(
        refused.is_err(),
        "etcd served a client without a certificate"
    );
    Ok(())
}

#[test]
fn bad_tls_settings_are_named_and_never_lease() -> Result<()> {
    require_root!();
    let mut c = Cluster::new_tls(3, &[])?;
    c.put_config(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#)?;
    let endpoint = c.etcd()?.endpoint.clone();
    let good = c.etcd()?.tls().context("no TLS files")?.clone();
    // A CA that did not sign etcd's certificate.
    let other = TlsFiles::generate(&c.dir.path().join("other-ca"), &["127.0.0.1"])?;
    let wrong_ca = [
        format!("--etcd-endpoints={endpoint}"),
        format!("--etcd-cafile={}", other.ca.display()),
        format!("--etcd-certfile={}", good.client_cert.display()),
        format!("--etcd-keyfile={}", good.client_key.display()),
    ];
    // https, but no client certificate at all.
    let no_cert = [
        format!("--etcd-endpoints={endpoint}"),
        format!("--etcd-cafile={}", good.ca.display()),
    ];
    // A certificate without its key: refused at start, as Flannel requires both.
    let half = [
        format!("--etcd-endpoints={endpoint}"),
        format!("--etcd-certfile={}", good.client_cert.display()),
    ];
    for (i, flags) in [&wrong_ca[..], &no_cert[..], &half[..]].iter().enumerate() {
        c.etcd_flags = flags.to_vec();
        c.start_daemon(i, &[])?;
    }
    wait_until(
        "the half-configured daemon to exit",
        Duration::from_secs(10),
        || c.nodes[2].daemon.as_mut().is_some_and(|d| !d.alive()),
    )?;
    ensure!(
        c.stop_daemon(2) == Some(1),
        "a cert without key must be fatal"
    );
    ensure!(
        log_file(&c, 2).contains("etcd TLS needs both --etcd-certfile and --etcd-keyfile"),
        "{}",
        log_file(&c, 2)
    );
    // The others keep trying, say why, and never get a lease.
    for i in 0..2 {
        wait_until(
            &format!("n{} to log the etcd error", i + 1),
            Duration::from_secs(15),
            || {
                c.nodes[i]
                    .log()
                    .contains("waiting for a valid network config: etcd")
            },
        )?;
        ensure!(
            c.nodes[i].daemon.as_mut().is_some_and(|d| d.alive()),
            "n{} died: {}",
            i + 1,
            c.nodes[i].log()
        );
        ensure!(!c.nodes[i].subnet_file().exists(), "n{} leased", i + 1);
        let line = c.nodes[i]
            .log()
            .lines()
            .find(|l| l.contains("waiting for a valid network config"))
            .unwrap_or_default()
            .to_string();
        eprintln!("n{}: {line}", i + 1);
    }
    ensure!(c.leases()?.is_empty(), "leases: {:?}", c.leases()?);
    Ok(())
}

/// A TLS cluster with etcd's authentication on (user `flannel`, allowed under the prefix only),
/// `etcd_args` passed to etcd; `c.etcd_flags` left with TLS flags and the right credentials.
fn auth_cluster(n: usize, etcd_args: &[&str]) -> Result<Cluster> {
    let mut c = Cluster::new_tls(n, etcd_args)?;
    c.put_config(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#)?;
    c.etcd
        .as_mut()
        .context("no etcd")?
        .enable_auth("flannel", "s3cret", ETCD_PREFIX)?;
    c.etcd_flags.extend([
        "--etcd-username=flannel".to_string(),
        "--etcd-password=s3cret".to_string(),
    ]);
    Ok(c)
}

#[test]
fn user_auth_over_tls() -> Result<()> {
    require_root!();
    let mut c = auth_cluster(3, &[])?;
    let good = c.etcd_flags.clone();

    // A wrong password is named in the log and gets no lease.
    c.etcd_flags = good
        .iter()
        .map(|f| f.replace("--etcd-password=s3cret", "--etcd-password=wrong"))
        .collect();
    c.start_daemon(2, &[])?;
    wait_until("the auth error", Duration::from_secs(10), || {
        log_file(&c, 2).contains("authentication failed")
    })?;
    ensure!(
        !c.nodes[2].subnet_file().exists(),
        "leased with a wrong password"
    );
    c.stop_daemon(2);

    // The right one: leases, renews, and the nodes see each other.
    c.etcd_flags = good;
    for i in 0..2 {
        c.start_daemon(
            i,
            &[
                "--subnet-lease-ttl=4s",
                &format!("--metrics-port={METRICS}"),
            ],
        )?;
        c.wait_subnet_env(i, Duration::from_secs(20))?;
    }
    ensure!(c.leases()?.len() == 2, "leases: {:?}", c.leases()?);
    let pods = (0..2).map(|i| c.add_pod(i)).collect::<Result<Vec<_>>>()?;
    wait_until("pods to reach each other", Duration::from_secs(10), || {
        c.ping_mesh(&pods).is_ok()
    })?;
    wait_until("two renewals on n1", Duration::from_secs(15), || {
        renewals(&c, 0) >= 2.0
    })
    .with_context(|| c.nodes[0].log())?;
    Ok(())
}

fn renewals(c: &Cluster, i: usize) -> f64 {
    http_get(&c.nodes[i].ns, METRICS, "/metrics")
        .ok()
        .and_then(|(_, body)| metric(&body, "flanneld_lease_renewals_total"))
        .unwrap_or(0.0)
}

/// etcd's simple auth tokens expire when unused for `--auth-token-ttl` (300 s by default; a
/// 24 h lease renews every 12 h), and are lost when etcd restarts. The client must
/// authenticate again then, or every request fails with "invalid auth token" for good.
#[test]
fn user_auth_survives_token_expiry() -> Result<()> {
    require_root!();
    // Tokens live 3 s here: each renewal, 5 s apart, needs a new one.
    let mut c = auth_cluster(1, &["--auth-token-ttl=3"])?;
    c.start_daemon(
        0,
        &[
            "--subnet-lease-ttl=10s",
            &format!("--metrics-port={METRICS}"),
        ],
    )?;
    c.wait_subnet_env(0, Duration::from_secs(20))?;
    wait_until("three renewals", Duration::from_secs(30), || {
        renewals(&c, 0) >= 3.0
    })
    .with_context(|| c.nodes[0].log())?;
    ensure!(
        !c.nodes[0].log().contains("lease lost"),
        "{}",
        c.nodes[0].log()
    );
    Ok(())
}

/// A node whose writes etcd refuses (a role made read-only, a full database) while reads work:
/// its renewals fail and it keeps trying to acquire a lease, and meanwhile peers that leave
/// still leave its routes, as the watch reports them.
#[test]
fn peers_follow_while_our_own_writes_fail() -> Result<()> {
    require_root!();
    let mut c = auth_cluster(2, &[])?;
    for i in 0..2 {
        c.start_daemon(i, &["--subnet-lease-ttl=4s", "--iptables-resync=1"])?;
        c.wait_subnet_env(i, Duration::from_secs(20))?;
    }
    let peer = c.lease_subnet(1)?;
    let routed = |c: &Cluster| {
        c.nodes[0]
            .routes()
            .is_ok_and(|r| r.lines().any(|l| l.starts_with(&format!("{peer} via"))))
    };
    wait_until("n1 to route n2's subnet", Duration::from_secs(10), || {
        routed(&c)
    })?;
    let etcd = c.etcd()?;
    etcd.make_read_only(ETCD_PREFIX)?;
    wait_until("n1 to try acquiring again", Duration::from_secs(20), || {
        c.nodes[0].log().contains("acquiring again")
    })?;
    etcd.ctl(&[
        "del",
        &format!("{ETCD_PREFIX}/subnets/{}", peer.replace('/', "-")),
    ])?;
    wait_until(
        "n1 to drop the route of the peer that left",
        Duration::from_secs(10),
        || !routed(&c),
    )
    .with_context(|| c.nodes[0].log())?;
    Ok(())
}
