//! host-gw end to end: three nodes in namespaces, real etcd, pods through our CNI plugin.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use netns_tests::cluster::{Cluster, ETCD_PREFIX};
use netns_tests::wait_until;

use crate::require_root;

const HOST_GW: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;
const START: Duration = Duration::from_secs(20);

/// A cluster of `n` nodes with the config written and a daemon started on each, one by one.
fn running_cluster(n: usize, extra: &[&str]) -> Result<Cluster> {
    let mut c = Cluster::new(n)?;
    c.put_config(HOST_GW)?;
    for i in 0..n {
        c.start_daemon(i, extra)?;
        c.wait_subnet_env(i, START)?;
    }
    Ok(c)
}

fn has_route(c: &Cluster, node: usize, subnet: &str) -> bool {
    c.nodes[node]
        .routes()
        .map(|r| r.lines().any(|l| l.starts_with(subnet)))
        .unwrap_or(false)
}

#[test]
fn three_nodes_lease_route_and_ping() -> Result<()> {
    require_root!();
    let mut c = running_cluster(3, &[])?;

    // Three distinct leases in Flannel's key and JSON format.
    let leases = c.leases()?;
    ensure!(leases.len() == 3, "leases: {leases:?}");
    for (i, node) in c.nodes.iter().enumerate() {
        let subnet = c.lease_subnet(i)?;
        let key = subnet.replace('/', "-");
        let value = leases
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
            .with_context(|| format!("no lease {key} in {leases:?}"))?;
        ensure!(
            value
                == format!(
                    r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"host-gw"}}"#,
                    node.ip
                ),
            "lease value {value}"
        );
        let env = std::fs::read_to_string(node.subnet_file())?;
        let first = subnet.replacen(".0/", ".1/", 1);
        ensure!(
            env == format!("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={first}\nFLANNEL_MTU=1500\nFLANNEL_IPMASQ=false\n"),
            "subnet.env of {}:\n{env}",
            node.name
        );
    }

    // Every node routes every other node's subnet via that node's underlay IP.
    for i in 0..3 {
        for j in 0..3 {
            if i != j {
                let subnet = c.lease_subnet(j)?;
                wait_until(
                    &format!("route to {subnet} on n{}", i + 1),
                    Duration::from_secs(5),
                    || has_route(&c, i, &subnet),
                )?;
                let routes = c.nodes[i].routes()?;
                let want = format!("{subnet} via {} dev eth0", c.nodes[j].ip);
                ensure!(
                    routes.contains(&want),
                    "n{} lacks `{want}`:\n{routes}",
                    i + 1
                );
            }
        }
    }

    // Pods made through our CNI plugin reach each other across nodes.
    let pods: Vec<_> = (0..3).map(|i| c.add_pod(i)).collect::<Result<_>>()?;
    let second = c.add_pod(0)?;
    c.ping_mesh(&pods)?;
    c.ping(&second, &pods[2].ip, 1)?;

    // CNI DEL releases the address: host-local's reservation file is gone.
    let reserved = c.nodes[0].dir.join("ipam/cbr0").join(&second.ip);
    ensure!(
        reserved.exists(),
        "{} should be reserved",
        reserved.display()
    );
    c.del_pod(&second)?;
    ensure!(!reserved.exists(), "CNI DEL left {}", reserved.display());
    c.del_pod(&second)?; // DEL is idempotent
    Ok(())
}

#[test]
fn restart_reclaims_and_lease_deletion_removes_routes() -> Result<()> {
    require_root!();
    let mut c = running_cluster(3, &["--subnet-lease-ttl=60s"])?;
    let subnet3 = c.lease_subnet(2)?;
    wait_until("n1 routes n3", Duration::from_secs(5), || {
        has_route(&c, 0, &subnet3)
    })?;

    // SIGTERM: exits 0, lease stays in etcd, routes stay; a restart gets the same subnet.
    ensure!(c.stop_daemon(2) == Some(0), "SIGTERM should exit 0");
    let key = format!("{ETCD_PREFIX}/subnets/{}", subnet3.replace('/', "-"));
    ensure!(
        c.etcd()?.get(&key)?.is_some(),
        "lease must survive a clean stop"
    );
    std::fs::remove_file(c.nodes[2].subnet_file())?;
    c.start_daemon(2, &["--subnet-lease-ttl=60s"])?;
    c.wait_subnet_env(2, START)?;
    ensure!(
        c.lease_subnet(2)? == subnet3,
        "restart must reclaim {subnet3} (by PublicIP)"
    );

    // A live node whose key is deleted writes it again, with the same subnet.
    let subnet2 = c.lease_subnet(1)?;
    let key2 = format!("{ETCD_PREFIX}/subnets/{}", subnet2.replace('/', "-"));
    c.etcd()?.ctl(&["del", &key2])?;
    wait_until("n2 to re-create its lease", Duration::from_secs(5), || {
        c.etcd().and_then(|e| e.get(&key2)).ok().flatten().is_some()
    })?;

    // A node that is gone: deleting its lease removes the peers' routes to it within 1 s.
    c.stop_daemon(2);
    c.etcd()?.ctl(&["del", &key])?;
    let deleted = Instant::now();
    wait_until("routes to n3 to go", Duration::from_secs(1), || {
        !has_route(&c, 0, &subnet3) && !has_route(&c, 1, &subnet3)
    })?;
    eprintln!(
        "routes to a deleted lease removed after {:?}",
        deleted.elapsed()
    );
    ensure!(has_route(&c, 0, &subnet2), "other routes must stay");

    // Its lease gone, it comes back and asks for the subnet its subnet.env names, as Flannel
    // does: only the subnet lines count, so a hand-edited MTU or IPMASQ line does not move
    // the node (and its pods) to another subnet.
    let path = c.nodes[2].subnet_file();
    let edited: String = std::fs::read_to_string(&path)?
        .lines()
        .map(|l| match l.split_once('=') {
            Some(("FLANNEL_MTU", _)) => "FLANNEL_MTU=\n".to_string(),
            Some(("FLANNEL_IPMASQ", _)) => "FLANNEL_IPMASQ=True\n".to_string(),
            _ => format!("{l}\n"),
        })
        .collect();
    std::fs::write(&path, edited)?;
    c.start_daemon(2, &["--subnet-lease-ttl=60s"])?;
    wait_until("n3's lease back", START, || {
        c.etcd().and_then(|e| e.get(&key)).ok().flatten().is_some()
    })
    .with_context(|| format!("leases: {:?}", c.leases()))?;
    Ok(())
}

#[test]
fn missing_then_bad_config_is_named_and_recovered() -> Result<()> {
    require_root!();
    let mut c = Cluster::new(1)?;
    c.start_daemon(0, &[])?;
    wait_until("the missing-config error", Duration::from_secs(10), || {
        c.nodes[0]
            .log()
            .contains("network config not found at /coreos.com/network/config")
    })?;
    c.put_config(r#"{"Network":"10.244.0.0/16","SubnetLen":31,"Backend":{"Type":"host-gw"}}"#)?;
    wait_until("the bad-field error", Duration::from_secs(10), || {
        c.nodes[0].log().contains("SubnetLen")
    })?;
    ensure!(
        !c.nodes[0].subnet_file().exists(),
        "no subnet.env from a bad config"
    );
    c.put_config(HOST_GW)?;
    c.wait_subnet_env(0, Duration::from_secs(15))?;
    ensure!(
        c.nodes[0].daemon.as_mut().is_some_and(|d| d.alive()),
        "daemon must keep running"
    );
    Ok(())
}
