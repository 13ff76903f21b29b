//! The Kubernetes e2e NetworkPolicy suite on a three-node namespace cluster, per backend, plus
//! changes under traffic and malformed objects. See `netns_tests::netpol`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use netns_tests::netpol::cases::{self, Protocol};
use netns_tests::netpol::reachability::{Peer, Reachability};
use netns_tests::netpol::world::{self, model_spec, World};

use crate::require_root;

const HOST_GW: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;
const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const UDP: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;
const WIREGUARD: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}"#;
/// `netpol::nft::TABLE`.
const POLICY_TABLE: &str = "flanneld-rs-policy";

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Builds the world once and runs every upstream case in sequence.
fn conformance(config: &str) -> Result<()> {
    let w = World::build(config, &[])?;
    let mut cases = cases::all_cases(&w.case_env()?);
    // NETPOL_CASE=<text>: only the cases whose name holds it (for debugging one).
    if let Ok(only) = std::env::var("NETPOL_CASE") {
        cases.retain(|c| c.name.contains(&only));
    }
    let outcomes = w.run_cases(&cases);
    world::report(&outcomes)
}

#[test]
fn netpol_conformance_host_gw() -> Result<()> {
    require_root!();
    conformance(HOST_GW)
}

#[test]
fn netpol_conformance_vxlan() -> Result<()> {
    require_root!();
    conformance(VXLAN)
}

#[test]
fn netpol_conformance_udp() -> Result<()> {
    require_root!();
    conformance(UDP)
}

#[test]
fn netpol_conformance_wireguard() -> Result<()> {
    require_root!();
    if netns_tests::must_skip(netns_tests::wg::missing())? {
        return Ok(());
    }
    conformance(WIREGUARD)
}

/// The table outlives the daemon on purpose (pods stay isolated across a restart); one left
/// from an earlier run is removed at start when no pod of ours is isolated, even with no
/// policy record at all in etcd (the first pass writes whatever the records say).
#[test]
fn netpol_table_left_from_an_earlier_run_is_removed_at_start() -> Result<()> {
    require_root!();
    let mut c = netns_tests::cluster::Cluster::new(1)?;
    c.put_config(HOST_GW)?;
    let table = ["list", "table", "inet", POLICY_TABLE];
    c.nodes[0].run("nft", &["add", "table", "inet", POLICY_TABLE])?;
    ensure!(c.nodes[0].run("nft", &table).is_ok(), "no stale table made");
    c.start_daemon(0, &[])?;
    c.wait_subnet_env(0, Duration::from_secs(20))?;
    netns_tests::wait_until("the stale table removed", Duration::from_secs(5), || {
        c.nodes[0].run("nft", &table).is_err()
    })?;
    Ok(())
}

/// Without any policy the world is fully connected on every port and protocol: checks the
/// harness itself (pods with Kubernetes identity through CNI, agents, the matrix probe).
#[test]
fn netpol_world_without_policies_is_open() -> Result<()> {
    require_root!();
    let w = World::build(HOST_GW, &[])?;
    for (port, proto) in [(80, Protocol::Tcp), (81, Protocol::Udp)] {
        let mut r = Reachability::new(true);
        let start = Instant::now();
        w.probe_matrix(port, proto, &mut r)?;
        r.check().map_err(anyhow::Error::msg)?;
        eprintln!("{port}/{} matrix in {:?}", proto.k8s(), start.elapsed());
    }
    // A closed port fails fast: all 72 probes run at once within the probe timeout.
    let mut r = Reachability::new(false);
    let start = Instant::now();
    w.probe_matrix(82, Protocol::Tcp, &mut r)?;
    r.check().map_err(anyhow::Error::msg)?;
    let mut r = Reachability::new(false);
    w.probe_matrix(82, Protocol::Udp, &mut r)?;
    r.check().map_err(anyhow::Error::msg)?;
    ensure!(
        start.elapsed() < Duration::from_secs(5),
        "two closed matrices took {:?}",
        start.elapsed()
    );
    Ok(())
}

/// Label changes on a running pod, a namespace relabel, a policy edit then delete, and a pod
/// deleted whose address a new pod with other labels gets: each in force on every node
/// before the next probe, while a client keeps opening connections.
#[test]
fn netpol_updates_while_traffic_flows() -> Result<()> {
    require_root!();
    let mut w = World::build(HOST_GW, &[])?;
    let rev = w.reset()?;
    w.wait_programmed(rev)?;

    // Background traffic: y/b keeps connecting to x/a while the rules change under it.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let xa_ip = w.pod("x/a")?.pod.ip.clone();
    let yb_ns = w.pod("y/b")?.pod.ns.clone();
    let agent = netns_tests::binary("netpol-agent")?;
    let bg = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = netns_tests::proc::run_in(
                    &yb_ns,
                    &agent.to_string_lossy(),
                    &["probe", "--timeout-ms", "200", &format!("{xa_ip}:80/tcp")],
                );
                n += 1;
            }
            n
        })
    };

    // 1. x/a admits only pods labelled role=client of its namespace.
    let policy = serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "clients-only", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}]}]}
    });
    let rev = w.put_policy(&policy)?;
    w.wait_programmed(rev)?;
    let mut r = Reachability::new(true);
    r.expect_all_ingress("x/a", false);
    validate(&w, 80, &r).context("policy created")?;

    // 2. Label change on a running pod: x/b becomes a client.
    let t = Instant::now();
    let rev = w.add_pod_labels("x/b", &labels(&[("role", "client")]))?;
    let took = w.wait_programmed(rev)?;
    ensure!(took < Duration::from_secs(1), "pod relabel took {took:?}");
    r.expect("x/b", "x/a", true);
    validate(&w, 80, &r).context("x/b labelled role=client")?;
    eprintln!("pod relabel in force everywhere in {:?}", t.elapsed());

    // 3. Namespace relabel: the policy now also admits clients of namespaces team=blue.
    let mut edited = policy.clone();
    edited["spec"]["ingress"][0]["from"]
        .as_array_mut()
        .expect("from is a list")
        .push(serde_json::json!({"namespaceSelector": {"matchLabels": {"team": "blue"}}}));
    let rev = w.put_policy(&edited)?;
    w.wait_programmed(rev)?;
    validate(&w, 80, &r).context("policy edited (no namespace labelled yet)")?;
    let rev = w.add_namespace_labels("z", &labels(&[("team", "blue")]))?;
    let took = w.wait_programmed(rev)?;
    ensure!(
        took < Duration::from_secs(1),
        "namespace relabel took {took:?}"
    );
    r.expect_peer(&Peer::ns("z"), &Peer::pod("x", "a"), true);
    validate(&w, 80, &r).context("namespace z labelled team=blue")?;
    let rev = w.put_namespace("z", &world::default_namespace_labels("z"))?;
    w.wait_programmed(rev)?;
    r.expect_peer(&Peer::ns("z"), &Peer::pod("x", "a"), false);
    validate(&w, 80, &r).context("namespace z unlabelled")?;

    // 4. Policy delete: everything open again.
    let rev = w.delete_policy("x", "clients-only")?;
    w.wait_programmed(rev)?;
    validate(&w, 80, &Reachability::new(true)).context("policy deleted")?;

    // 5. A pod deleted and its address reused by a new pod with other labels: x/a admits
    //    only pod=c; x/c goes, x/d (pod=d) comes with x/c's address and must be refused.
    let only_c = serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "only-c", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "c"}}}]}]}
    });
    let rev = w.put_policy(&only_c)?;
    w.wait_programmed(rev)?;
    ensure!(
        w.reaches("x/c", "x/a", 80, Protocol::Tcp)?,
        "x/c must reach x/a"
    );
    ensure!(
        !w.reaches("x/b", "x/a", 80, Protocol::Tcp)?,
        "x/b must not reach x/a"
    );
    let old = w.delete_pod("x/c")?;
    let ip: std::net::Ipv4Addr = old.pod.ip.parse()?;
    let spec = model_spec("x", "d", cases::sctp_available());
    w.add_extra_pod(old.pod.node, spec, Some(ip))?;
    // The new pod's record carries pod=d; wait for the node to publish and everyone to apply.
    let deadline = Instant::now() + Duration::from_secs(5);
    while w.pod_record("x/d").is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let rec_rev = w.put_policy(&only_c)?; // a write after the record: its revision covers it
    w.wait_programmed(rec_rev)?;
    ensure!(
        !w.reaches("x/d", "x/a", 80, Protocol::Tcp)?,
        "x/d got x/c's address {ip} but not its label: it must not reach x/a"
    );
    ensure!(
        w.reaches("x/a", "x/d", 80, Protocol::Tcp)?,
        "x/a -> x/d is not isolated"
    );

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let n = bg
        .join()
        .map_err(|_| anyhow::anyhow!("traffic thread panicked"))?;
    eprintln!("{n} background connections attempted");
    Ok(())
}

fn validate(w: &World, port: u16, r: &Reachability) -> Result<()> {
    w.validate(&cases::Probe {
        port,
        protocol: Protocol::Tcp,
        reachability: r.clone(),
    })
}

/// Malformed JSON, a key/name mismatch, an unknown protocol, a bad selector operator: each
/// rejected on its own (each would isolate x/b if taken), the valid policy beside them
/// (isolating x/a) still in force. Beside them, two valid writes that once broke it: a policy
/// whose ports overlap (an nft interval set refuses overlapping elements, so every update on
/// the nodes failed) and a hand-made pod record copying x/a's address under labels no policy
/// selects (the newer record took the address, and x/a's isolation with it).
#[test]
fn netpol_bad_objects_are_rejected_alone() -> Result<()> {
    require_root!();
    let w = World::build(HOST_GW, &[])?;
    let rev = w.reset()?;
    w.wait_programmed(rev)?;
    let isolate_b = |name: &str| {
        serde_json::json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": "x"},
            "spec": {"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "c"}}}],
                                  "ports": [{"port": 80, "protocol": "TCP"}]}]}
        })
    };
    let valid = serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "deny-a", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"]}
    });
    let mut rev = w.put_policy(&valid)?;
    // Malformed JSON.
    rev = rev.max(w.put_policy_raw("x", "broken", r#"{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "broken""#)?);
    // The key says x/mismatch, the object says x/other.
    rev = rev.max(w.put_policy_raw("x", "mismatch", &isolate_b("other").to_string())?);
    // An unknown protocol.
    let mut icmp = isolate_b("icmp");
    icmp["spec"]["ingress"][0]["ports"][0]["protocol"] = "ICMP".into();
    rev = rev.max(w.put_policy(&icmp)?);
    // A selector operator that does not exist.
    let mut op = isolate_b("bad-operator");
    op["spec"]["podSelector"] = serde_json::json!({"matchExpressions": [{"key": "pod", "operator": "Matches", "values": ["b"]}]});
    rev = rev.max(w.put_policy(&op)?);
    // Valid, overlapping ports: x/c isolated, all of TCP allowed (port 80 stays open).
    let overlap = serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "overlap", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "c"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"ports": [{"protocol": "TCP"}, {"port": 80, "protocol": "TCP"},
                                        {"port": 80, "endPort": 90, "protocol": "TCP"}]}]}
    });
    rev = rev.max(w.put_policy(&overlap)?);
    // A copy of x/a's record, not published by its node, newer than it.
    let mut copy = w.pod_record("x/a")?;
    copy["metadata"]["name"] = "copy-of-a".into();
    copy["metadata"]["labels"] = serde_json::json!({"pod": "copy"});
    if let Some(a) = copy["metadata"]["annotations"].as_object_mut() {
        a.clear();
    }
    rev = rev.max(w.put_pod_record("x/copy-of-a", &copy)?);
    w.wait_programmed(rev)?;

    let mut r = Reachability::new(true);
    r.expect_all_ingress("x/a", false);
    validate(&w, 80, &r).context("valid policy in force, bad ones rejected")?;
    Ok(())
}

/// Waits until nodes `nodes` have etcd revision `rev` in force (their policy status).
fn wait_in_force(c: &netns_tests::cluster::Cluster, nodes: &[usize], rev: i64) -> Result<()> {
    netns_tests::wait_until("policy in force", Duration::from_secs(5), || {
        nodes.iter().all(|&i| {
            let sock = c.nodes[i].dir.join("flanneld-rs.sock");
            world::http_get_unix(&sock, "/v1/policy/status", Duration::from_secs(1))
                .ok()
                .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
                .and_then(|v| v["revision"].as_i64())
                .is_some_and(|r| r >= rev)
        })
    })
    .map(drop)
}

/// A mixed cluster: nodes 1 and 2 ours, node 3 Go Flannel v0.20.2 (vxlan). Go Flannel reads
/// none of the policy keys and publishes no pod records, so its pods are no pod peers of ours
/// until a record names them (any tool may write one); an ipBlock covers them either way. What
/// our nodes enforce on the Go node's traffic is checked against a pod of ours beside it.
#[test]
fn netpol_mixed_with_go_flannel() -> Result<()> {
    require_root!();
    if netns_tests::must_skip(netns_tests::goflannel::missing())? {
        return Ok(());
    }
    let mut c = netns_tests::cluster::Cluster::new(3)?;
    c.put_config(VXLAN)?;
    for i in 0..2 {
        c.start_daemon(i, &["--ip-masq"])?;
        c.wait_subnet_env(i, Duration::from_secs(20))?;
    }
    c.start_go_flannel(2, &["--ip-masq"])?;
    c.wait_subnet_env(2, Duration::from_secs(30))?;
    let server = c.add_pod_with(0, &model_spec("shop", "db", false))?;
    let ours = c.add_pod_with(1, &model_spec("shop", "web", false))?;
    // Made by our plugin on the Go node: no daemon takes the record, which stays pending.
    let go = c.add_pod_with(2, &model_spec("shop", "web-go", false))?;
    let agent = netns_tests::binary("netpol-agent")?;
    let _server = netns_tests::proc::Daemon::spawn(
        "agent",
        Some(&server.ns),
        &agent,
        &["serve".into(), "--ports".into(), "80".into()],
        &[],
        &c.dir.path().join("agent.log"),
    )?;
    let reaches = |from: &netns_tests::cluster::Pod| -> Result<bool> {
        let target = format!("{}:80/tcp", server.ip);
        let out = netns_tests::proc::run_in(
            &from.ns,
            &agent.to_string_lossy(),
            &["probe", "--timeout-ms", "700", &target],
        )?;
        Ok(out.trim().ends_with(" ok"))
    };
    netns_tests::wait_until(
        "the mixed mesh to carry TCP",
        Duration::from_secs(15),
        || reaches(&ours).unwrap_or(false) && reaches(&go).unwrap_or(false),
    )?;
    let etcd = c.etcd()?;
    let put = |key: &str, v: serde_json::Value| -> Result<i64> {
        let out = etcd.ctl(&[
            "put",
            "-w",
            "json",
            &format!("/coreos.com/network/policy/{key}"),
            &v.to_string(),
        ])?;
        world::revision_of(&out)
    };
    // 1. db admits pods labelled pod=web / pod=web-go: only ours has a record.
    let rev = put(
        "networkpolicies/shop/db",
        serde_json::json!({"metadata":{"name":"db","namespace":"shop"},
            "spec":{"podSelector":{"matchLabels":{"pod":"db"}},
                    "ingress":[{"from":[{"podSelector":{"matchExpressions":[
                        {"key":"pod","operator":"In","values":["web","web-go"]}]}}]}]}}),
    )?;
    wait_in_force(&c, &[0, 1], rev)?;
    ensure!(reaches(&ours)?, "our web pod must reach db");
    ensure!(
        !reaches(&go)?,
        "the Go node's pod has no record: it is no pod peer"
    );
    // 2. A record written by a tool makes it one.
    let rev = put(
        "pods/shop/web-go",
        serde_json::json!({"metadata":{"name":"web-go","namespace":"shop","labels":{"pod":"web-go"}},
                           "status":{"podIP": go.ip}}),
    )?;
    wait_in_force(&c, &[0, 1], rev)?;
    ensure!(
        reaches(&go)?,
        "with its record, the Go node's pod reaches db"
    );
    // 3. An ipBlock of the Go node's subnet only: the Go pod in, ours out.
    let go_subnet = c.lease_subnet(2)?;
    let rev = put(
        "networkpolicies/shop/db",
        serde_json::json!({"metadata":{"name":"db","namespace":"shop"},
            "spec":{"podSelector":{"matchLabels":{"pod":"db"}},
                    "ingress":[{"from":[{"ipBlock":{"cidr": go_subnet}}]}]}}),
    )?;
    wait_in_force(&c, &[0, 1], rev)?;
    ensure!(reaches(&go)?, "the Go node's subnet is admitted");
    ensure!(!reaches(&ours)?, "our pod is outside the ipBlock");
    Ok(())
}
