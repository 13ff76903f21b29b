//! Kubernetes services beside us: kube-proxy's ClusterIP rules (iptables mode, its chain
//! layout and masquerade mark) on node 1 map a virtual IP to a pod on node 2, and pods and the
//! node itself reach it through our overlay, with --ip-masq on as in kube-flannel.yml.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use netns_tests::cluster::{Cluster, Pod};
use netns_tests::traffic::in_netns;
use netns_tests::wait_until;

use crate::ipmasq::udp_probe;
use crate::require_root;

const VIP: &str = "10.96.0.10";

/// What kube-proxy writes for one ClusterIP service with one endpoint (trimmed to the rules
/// that matter): DNAT in PREROUTING and OUTPUT; traffic from outside the pod network marked
/// 0x4000 and masqueraded by kube-proxy's own POSTROUTING chain.
fn kube_proxy_rules(endpoint: &str) -> String {
    format!(
        "*nat
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-TEST - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -j MASQUERADE --random-fully
-A KUBE-SERVICES -d {VIP}/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-TEST
-A KUBE-SERVICES -d {VIP}/32 -p udp -m udp --dport 5353 -j KUBE-SVC-TEST
-A KUBE-SVC-TEST ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ
-A KUBE-SVC-TEST -p tcp -j DNAT --to-destination {endpoint}:8080
-A KUBE-SVC-TEST -p udp -j DNAT --to-destination {endpoint}:5353
COMMIT
"
    )
}

/// Sends `bytes` through `VIP:80` from `from_ns` to a server in `to_ns` on port 8080. Returns
/// the client address the server saw; fails unless every byte arrived intact.
fn tcp_through_vip(from_ns: &str, to_ns: &str, bytes: u64) -> Result<String> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let to_ns = to_ns.to_string();
    let server = std::thread::spawn(move || {
        in_netns(&to_ns, move || {
            let listener = TcpListener::bind("0.0.0.0:8080").context("binding the server")?;
            let _ = ready_tx.send(());
            let (mut conn, peer) = listener.accept()?;
            conn.set_read_timeout(Some(Duration::from_secs(30)))?;
            let (hash, total) = netns_tests::traffic::hash_stream(&mut conn)?;
            conn.write_all(format!("{} {total} {hash}", peer.ip()).as_bytes())?;
            Ok(())
        })
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .context("the server did not start")?;
    let vip: SocketAddr = format!("{VIP}:80").parse()?;
    let reply = in_netns(from_ns, move || {
        let mut conn = TcpStream::connect_timeout(&vip, Duration::from_secs(10))
            .with_context(|| format!("connecting to {vip}"))?;
        conn.set_read_timeout(Some(Duration::from_secs(30)))?;
        let sent = netns_tests::traffic::send_stream(&mut conn, 0x5EED ^ bytes, bytes)?;
        conn.shutdown(Shutdown::Write)?;
        let mut reply = String::new();
        conn.read_to_string(&mut reply)?;
        Ok((reply, sent))
    });
    let server_result = server.join().map_err(|_| anyhow!("server panicked"));
    let (reply, sent_hash) = reply?;
    server_result??;
    let mut parts = reply.split_whitespace();
    let (peer, total, hash) = (parts.next(), parts.next(), parts.next());
    ensure!(
        total == Some(bytes.to_string().as_str()) && hash == Some(sent_hash.to_string().as_str()),
        "sent {bytes} bytes (hash {sent_hash}), server got {reply:?}"
    );
    peer.map(str::to_string).context("empty reply")
}

/// Two nodes on `backend`, a pod on each, and kube-proxy's rules for VIP -> the pod on node 2
/// in node 1. A pod on node 1 and node 1 itself reach the service across the overlay.
fn clusterip_across_the_overlay(backend: &str) -> Result<()> {
    let mut c = Cluster::new(2)?;
    c.put_config(&format!(
        r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"{backend}"}}}}"#
    ))?;
    for i in 0..2 {
        c.start_daemon(i, &["--ip-masq"])?;
        c.wait_subnet_env(i, Duration::from_secs(20))?;
    }
    let pods: Vec<Pod> = (0..2).map(|i| c.add_pod(i)).collect::<Result<_>>()?;
    wait_until(
        "the pods to reach each other",
        Duration::from_secs(10),
        || c.ping(&pods[0], &pods[1].ip, 1).is_ok(),
    )?;
    let mut child = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &c.nodes[0].ns,
            "iptables-restore",
            "-w",
            "--noflush",
        ])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running iptables-restore")?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(kube_proxy_rules(&pods[1].ip).as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "kube-proxy rules: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A pod: 8 MB through the VIP, intact, and the endpoint sees the pod's own address
    // (pod-to-service traffic is neither masqueraded by kube-proxy nor by us).
    let peer = tcp_through_vip(&pods[0].ns, &pods[1].ns, 8 << 20)?;
    ensure!(
        peer == pods[0].ip,
        "{backend}: endpoint saw {peer}, not {}",
        pods[0].ip
    );
    // UDP to the VIP, answered from the endpoint and un-NATed back to the pod.
    let seen = udp_probe(&pods[0].ns, &pods[1].ns, VIP, 5353)?;
    ensure!(seen == pods[0].ip, "{backend}: UDP endpoint saw {seen}");
    // The node itself (kube-proxy marks it 0x4000 and masquerades it; our rules stand aside).
    let peer = tcp_through_vip(&c.nodes[0].ns, &pods[1].ns, 1 << 20)?;
    eprintln!(
        "{backend}: pod -> {VIP} -> {} ok (seen as {}), node -> {VIP} ok (seen as {peer})",
        pods[1].ip, pods[0].ip
    );
    Ok(())
}

// One test per backend; a new backend is one more three-line test here.
#[test]
fn clusterip_host_gw() -> Result<()> {
    require_root!();
    clusterip_across_the_overlay("host-gw")
}

#[test]
fn clusterip_udp() -> Result<()> {
    require_root!();
    clusterip_across_the_overlay("udp")
}

#[test]
fn clusterip_vxlan() -> Result<()> {
    require_root!();
    clusterip_across_the_overlay("vxlan")
}
