//! A cluster in network namespaces:
//!
//! ```text
//!   <p>-ul (underlay): bridge br0 172.30.0.254/24, etcd on :2379
//!      ├── veth n1 ── eth0 172.30.0.11/24 in <p>-n1 (node: daemon, cni0, pods <p>-n1p1 …)
//!      ├── veth n2 ── eth0 172.30.0.12/24 in <p>-n2
//!      └── …
//! ```
//! Every link is created inside our own namespaces; the host's namespace is never touched.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tempfile::TempDir;

use crate::etcd::{Etcd, TlsFiles};
use crate::proc::{self, run, run_in, Daemon};
use crate::traffic::tcp_transfers;
use crate::{bin_dir, binary, sweep, unique_prefix, wait_until};

pub const UNDERLAY_GW: &str = "172.30.0.254";
/// The underlay's IPv6 gateway (on `br0`) in dual-stack clusters; nodes get `fd00:30::<11+i>`.
pub const UNDERLAY_GW6: &str = "fd00:30::fe";
pub const ETCD_PREFIX: &str = "/coreos.com/network";
pub const POD_NETWORK: &str = "10.244.0.0/16";
/// The address of the "outside" host (`add_outside`): on the underlay, off the pod network.
pub const OUTSIDE_IP: &str = "172.30.0.200";

pub struct Node {
    pub name: String,
    /// The node's namespace.
    pub ns: String,
    /// The node's underlay address on its eth0.
    pub ip: String,
    /// Its IPv6 underlay address, in a dual-stack cluster.
    pub ipv6: Option<String>,
    /// Per-node files: subnet.env, CNI state, IPAM state, daemon log.
    pub dir: PathBuf,
    pub daemon: Option<Daemon>,
    pods: usize,
}

impl Node {
    pub fn subnet_file(&self) -> PathBuf {
        self.dir.join("subnet.env")
    }

    /// Runs a command in this node's namespace.
    pub fn run(&self, prog: &str, args: &[&str]) -> Result<String> {
        run_in(&self.ns, prog, args)
    }

    /// `ip route` of the node, one route per line.
    pub fn routes(&self) -> Result<String> {
        self.run("ip", &["route", "show"])
    }

    pub fn log(&self) -> String {
        self.daemon
            .as_ref()
            .map(Daemon::log_text)
            .unwrap_or_default()
    }
}

/// A pod: its own namespace, attached to a node through the CNI plugin.
#[derive(Clone, Debug)]
pub struct Pod {
    pub ns: String,
    pub node: usize,
    pub container_id: String,
    /// The pod's address, without prefix length.
    pub ip: String,
    /// Its IPv6 address, where the network is dual stack.
    pub ipv6: Option<String>,
}

/// A container port of a pod (Kubernetes `v1.ContainerPort`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerPort {
    pub name: String,
    pub container_port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
}

/// What a runtime knows of a Kubernetes pod when it calls CNI: its namespace and name (for
/// `CNI_ARGS`), its labels and its container ports (for the network config's `args.cni`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub ports: Vec<ContainerPort>,
}

impl PodSpec {
    /// `IgnoreUnknown=1;K8S_POD_NAMESPACE=<ns>;K8S_POD_NAME=<name>`, as containerd and CRI-O
    /// pass them (without `IgnoreUnknown=1` the reference plugins, e.g. the bridge delegate,
    /// refuse the K8S_* arguments).
    pub fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
            self.namespace, self.name
        )
    }

    /// The network config's `args`: `{"cni":{"labels":[{"key","value"}],"ports":[...]}}`.
    pub fn conf_args(&self) -> serde_json::Value {
        let labels: Vec<_> = self
            .labels
            .iter()
            .map(|(k, v)| serde_json::json!({"key": k, "value": v}))
            .collect();
        let ports: Vec<_> = self
            .ports
            .iter()
            .map(|p| {
                serde_json::json!({
                    "name": p.name,
                    "containerPort": p.container_port,
                    "protocol": p.protocol,
                })
            })
            .collect();
        serde_json::json!({"cni": {"labels": labels, "ports": ports}})
    }
}

pub struct Cluster {
    pub prefix: String,
    pub underlay: String,
    pub nodes: Vec<Node>,
    pub etcd: Option<Etcd>,
    /// The `--etcd-*` flags `start_daemon` passes (endpoint, and certificates with TLS).
    pub etcd_flags: Vec<String>,
    namespaces: Vec<String>,
    /// Whether nodes added get an IPv6 underlay address too (`new_dual_stack`).
    ipv6_underlay: bool,
    // Declared last: dropped after everything that writes into it.
    pub dir: TempDir,
}

impl Cluster {
    /// Builds the underlay, etcd and `n` node namespaces (no daemons yet).
    pub fn new(n: usize) -> Result<Self> {
        Self::build(n, false, &[])
    }

    /// Like `new`, with an IPv6 underlay beside the IPv4 one: `fd00:30::fe/64` on the bridge,
    /// `fd00:30::<11+i>/64` on each node's eth0, IPv6 forwarding on in the nodes.
    pub fn new_dual_stack(n: usize) -> Result<Self> {
        let mut c = Self::build(0, false, &[])?;
        c.ipv6_underlay = true;
        run_in(
            &c.underlay,
            "ip",
            &[
                "addr",
                "add",
                &format!("{UNDERLAY_GW6}/64"),
                "dev",
                "br0",
                "nodad",
            ],
        )?;
        for _ in 0..n {
            c.add_node()?;
        }
        Ok(c)
    }

    /// Like `new`, with etcd on `https://172.30.0.254:2379` demanding client certificates (made
    /// with openssl into the cluster's dir); the daemons get `--etcd-cafile/certfile/keyfile`.
    /// `etcd_args` go to etcd as they are.
    pub fn new_tls(n: usize, etcd_args: &[&str]) -> Result<Self> {
        Self::build(n, true, etcd_args)
    }

    fn build(n: usize, tls: bool, etcd_args: &[&str]) -> Result<Self> {
        sweep();
        let prefix = unique_prefix();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{prefix}-"))
            .tempdir()
            .context("creating the cluster's temp dir")?;
        let mut cluster = Cluster {
            underlay: format!("{prefix}-ul"),
            prefix,
            nodes: Vec::new(),
            etcd: None,
            etcd_flags: Vec::new(),
            namespaces: Vec::new(),
            dir,
            ipv6_underlay: false,
        };
        let ul = cluster.underlay.clone();
        cluster.add_netns(&ul)?;
        run_in(&ul, "ip", &["link", "add", "br0", "type", "bridge"])?;
        run_in(
            &ul,
            "ip",
            &["addr", "add", &format!("{UNDERLAY_GW}/24"), "dev", "br0"],
        )?;
        run_in(&ul, "ip", &["link", "set", "br0", "up"])?;
        let etcd = if tls {
            let files = TlsFiles::generate(&cluster.dir.path().join("tls"), &[UNDERLAY_GW])?;
            let etcd = Etcd::in_netns_tls(&ul, UNDERLAY_GW, cluster.dir.path(), &files, etcd_args)?;
            cluster.etcd_flags = vec![
                format!("--etcd-endpoints={}", etcd.endpoint),
                format!("--etcd-cafile={}", files.ca.display()),
                format!("--etcd-certfile={}", files.client_cert.display()),
                format!("--etcd-keyfile={}", files.client_key.display()),
            ];
            etcd
        } else {
            let etcd = Etcd::in_netns(&ul, UNDERLAY_GW, cluster.dir.path())?;
            cluster.etcd_flags = vec![format!("--etcd-endpoints={}", etcd.endpoint)];
            etcd
        };
        cluster.etcd = Some(etcd);
        for _ in 0..n {
            cluster.add_node()?;
        }
        Ok(cluster)
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        run("ip", &["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        run_in(name, "ip", &["link", "set", "lo", "up"])?;
        Ok(())
    }

    /// Adds one node namespace wired to the underlay bridge; returns its index.
    pub fn add_node(&mut self) -> Result<usize> {
        let i = self.nodes.len();
        let name = format!("n{}", i + 1);
        let ns = format!("{}-{name}", self.prefix);
        let ip = format!("172.30.0.{}", 11 + i);
        self.add_netns(&ns)?;
        let ul = self.underlay.clone();
        run_in(
            &ul,
            "ip",
            &[
                "link", "add", &name, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        run_in(&ul, "ip", &["link", "set", &name, "master", "br0", "up"])?;
        run_in(
            &ns,
            "ip",
            &["addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        )?;
        run_in(&ns, "ip", &["link", "set", "eth0", "up"])?;
        run_in(&ns, "ip", &["route", "add", "default", "via", UNDERLAY_GW])?;
        // Kubelet or the container runtime enables forwarding on real nodes; flannel does not.
        run_in(&ns, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        let ipv6 = if self.ipv6_underlay {
            let ip6 = format!("fd00:30::{}", 11 + i);
            let addr = format!("{ip6}/64");
            run_in(&ns, "ip", &["addr", "add", &addr, "dev", "eth0", "nodad"])?;
            run_in(
                &ns,
                "ip",
                &["-6", "route", "add", "default", "via", UNDERLAY_GW6],
            )?;
            run_in(&ns, "sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"])?;
            Some(ip6)
        } else {
            None
        };
        let dir = self.dir.path().join(&name);
        std::fs::create_dir_all(&dir)?;
        self.nodes.push(Node {
            name,
            ns,
            ip,
            ipv6,
            dir,
            daemon: None,
            pods: 0,
        });
        Ok(i)
    }

    /// Adds a host on the underlay that is not a node (no daemon, no route to pods): the
    /// "internet" for ip-masq tests. Returns its namespace; its address is `OUTSIDE_IP`.
    pub fn add_outside(&mut self) -> Result<String> {
        let ns = format!("{}-out", self.prefix);
        self.add_netns(&ns)?;
        let ul = self.underlay.clone();
        run_in(
            &ul,
            "ip",
            &[
                "link", "add", "out", "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        run_in(&ul, "ip", &["link", "set", "out", "master", "br0", "up"])?;
        run_in(
            &ns,
            "ip",
            &["addr", "add", &format!("{OUTSIDE_IP}/24"), "dev", "eth0"],
        )?;
        run_in(&ns, "ip", &["link", "set", "eth0", "up"])?;
        Ok(ns)
    }

    pub fn etcd(&self) -> Result<&Etcd> {
        self.etcd
            .as_ref()
            .ok_or_else(|| anyhow!("etcd is not running"))
    }

    /// Writes the network config, e.g. `{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}`.
    pub fn put_config(&self, json: &str) -> Result<()> {
        self.etcd()?.put(&format!("{ETCD_PREFIX}/config"), json)
    }

    /// The leases in etcd as (key suffix, JSON value).
    pub fn leases(&self) -> Result<Vec<(String, String)>> {
        let prefix = format!("{ETCD_PREFIX}/subnets/");
        Ok(self
            .etcd()?
            .list(&prefix)?
            .into_iter()
            .map(|(k, v)| (k.trim_start_matches(&prefix).to_string(), v))
            .collect())
    }

    /// Starts flanneld-rs in node `i` with the harness's flags plus `extra`.
    pub fn start_daemon(&mut self, i: usize, extra: &[&str]) -> Result<()> {
        let prog = binary("flanneld-rs")?;
        let args = self.daemon_args(i, extra);
        self.start_program(i, &prog, &args, &[("RUST_LOG", "debug")])
    }

    /// The flags `start_daemon` gives node `i`'s flanneld-rs: etcd, interface, subnet file,
    /// then `extra`.
    pub fn daemon_args(&self, i: usize, extra: &[&str]) -> Vec<String> {
        let node = &self.nodes[i];
        let mut args = self.etcd_flags.clone();
        args.extend([
            format!("--etcd-prefix={ETCD_PREFIX}"),
            "--iface=eth0".to_string(),
            format!("--subnet-file={}", node.subnet_file().display()),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Starts any daemon in node `i` (ours or another implementation), logging to its dir.
    pub fn start_program(
        &mut self,
        i: usize,
        prog: &Path,
        args: &[String],
        envs: &[(&str, &str)],
    ) -> Result<()> {
        let node = &mut self.nodes[i];
        if node.daemon.is_some() {
            bail!("node {} already runs a daemon", node.name);
        }
        let log = node.dir.join("daemon.log");
        node.daemon = Some(Daemon::spawn(
            &node.name,
            Some(&node.ns),
            prog,
            args,
            envs,
            &log,
        )?);
        Ok(())
    }

    /// Stops node `i`'s daemon with SIGTERM; returns its exit code (None if it had to be killed).
    pub fn stop_daemon(&mut self, i: usize) -> Option<i32> {
        self.nodes[i]
            .daemon
            .take()
            .and_then(|mut d| d.stop(Duration::from_secs(10)))
    }

    /// Waits for node `i`'s subnet.env and returns its text.
    pub fn wait_subnet_env(&self, i: usize, timeout: Duration) -> Result<String> {
        let path = self.nodes[i].subnet_file();
        wait_until(&format!("{}", path.display()), timeout, || path.exists())
            .with_context(|| format!("daemon log:\n{}", self.nodes[i].log()))?;
        Ok(std::fs::read_to_string(&path)?)
    }

    /// The subnet node `i` leased (`10.244.7.0/24`), from its subnet.env's FLANNEL_SUBNET.
    pub fn lease_subnet(&self, i: usize) -> Result<String> {
        let env = std::fs::read_to_string(self.nodes[i].subnet_file())?;
        let first = env
            .lines()
            .find_map(|l| l.strip_prefix("FLANNEL_SUBNET="))
            .context("no FLANNEL_SUBNET in subnet.env")?;
        let net: ipnet::Ipv4Net = first
            .parse()
            .with_context(|| format!("FLANNEL_SUBNET={first}"))?;
        Ok(net.trunc().to_string())
    }

    /// The CNI config our runtime hands the plugin: Flannel's format, state kept in our dir.
    fn cni_conf(&self, node: &Node) -> String {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "cbr0",
            "type": "flannel",
            "subnetFile": node.subnet_file(),
            "dataDir": node.dir.join("cni"),
            "delegate": {"hairpinMode": true, "isDefaultGateway": true},
            "ipam": {"dataDir": node.dir.join("ipam")},
        })
        .to_string()
    }

    /// Calls the CNI plugin in node `i` the way a container runtime does.
    pub fn cni(&self, i: usize, command: &str, pod_ns: &str, container_id: &str) -> Result<String> {
        self.cni_with(i, command, pod_ns, container_id, None)
    }

    /// Like `cni`, for a pod with Kubernetes identity: `CNI_ARGS` carries
    /// `K8S_POD_NAMESPACE`/`K8S_POD_NAME` and the network config `args.cni.labels` and
    /// `args.cni.ports`, as kubelet and the runtime pass them.
    pub fn cni_with(
        &self,
        i: usize,
        command: &str,
        pod_ns: &str,
        container_id: &str,
        spec: Option<&PodSpec>,
    ) -> Result<String> {
        let node = &self.nodes[i];
        let plugin = binary("flannel")?;
        let cni_path = format!("{}:/usr/lib/cni", bin_dir()?.display());
        let mut child = Command::new("ip")
            .args(["netns", "exec", &node.ns, "env"])
            .arg(format!("CNI_COMMAND={command}"))
            .arg(format!("CNI_CONTAINERID={container_id}"))
            .arg(format!("CNI_NETNS=/var/run/netns/{pod_ns}"))
            .arg("CNI_IFNAME=eth0")
            .arg(format!("CNI_PATH={cni_path}"))
            .args(spec.map(|s| format!("CNI_ARGS={}", s.cni_args())))
            .arg(plugin)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running the CNI plugin")?;
        if let Some(mut stdin) = child.stdin.take() {
            let mut conf = self.cni_conf(node);
            if let Some(spec) = spec {
                let mut json: serde_json::Value = serde_json::from_str(&conf)?;
                json["args"] = spec.conf_args();
                conf = json.to_string();
            }
            stdin.write_all(conf.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "CNI {command} on {} failed: {stdout} {}",
                node.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout)
    }

    /// Creates a pod namespace on node `i` and attaches it with CNI ADD.
    pub fn add_pod(&mut self, i: usize) -> Result<Pod> {
        self.add_pod_inner(i, None)
    }

    /// Like `add_pod`, for a pod with a Kubernetes namespace, name, labels and ports (see
    /// `cni_with`). The pod's network namespace is named as `add_pod` names it.
    pub fn add_pod_with(&mut self, i: usize, spec: &PodSpec) -> Result<Pod> {
        self.add_pod_inner(i, Some(spec))
    }

    /// CNI DEL for a pod made by `add_pod_with`, with the same arguments.
    pub fn del_pod_with(&self, pod: &Pod, spec: &PodSpec) -> Result<()> {
        self.cni_with(pod.node, "DEL", &pod.ns, &pod.container_id, Some(spec))
            .map(drop)
    }

    fn add_pod_inner(&mut self, i: usize, spec: Option<&PodSpec>) -> Result<Pod> {
        self.nodes[i].pods += 1;
        let ns = format!("{}p{}", self.nodes[i].ns, self.nodes[i].pods);
        self.add_netns(&ns)?;
        let container_id = format!("{}-{}", self.prefix, ns);
        let result = self.cni_with(i, "ADD", &ns, &container_id, spec)?;
        let json: serde_json::Value = serde_json::from_str(&result)
            .with_context(|| format!("CNI result is not JSON: {result}"))?;
        let addrs: Vec<String> = json["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|ip| ip["address"].as_str())
            .map(|a| a.split('/').next().unwrap_or(a).to_string())
            .collect();
        let ip = addrs
            .iter()
            .find(|a| !a.contains(':'))
            .or(addrs.first())
            .cloned()
            .ok_or_else(|| anyhow!("CNI result has no ips[].address: {result}"))?;
        let ipv6 = addrs.iter().find(|a| a.contains(':')).cloned();
        Ok(Pod {
            ns,
            node: i,
            container_id,
            ip,
            ipv6,
        })
    }

    /// CNI DEL for a pod (its namespace stays until the cluster drops).
    pub fn del_pod(&self, pod: &Pod) -> Result<()> {
        self.cni(pod.node, "DEL", &pod.ns, &pod.container_id)
            .map(drop)
    }

    /// `n` nodes with network `config`, each running our daemon with `extra` flags, one pod
    /// each.
    pub fn with_daemons(n: usize, config: &str, extra: &[&str]) -> Result<(Cluster, Vec<Pod>)> {
        let mut c = Cluster::new(n)?;
        c.put_config(config)?;
        for i in 0..n {
            c.start_daemon(i, extra)?;
            c.wait_subnet_env(i, Duration::from_secs(20))?;
        }
        let pods = (0..n).map(|i| c.add_pod(i)).collect::<Result<Vec<_>>>()?;
        Ok((c, pods))
    }

    /// The process id of node `i`'s daemon.
    pub fn daemon_pid(&self, i: usize) -> Result<u32> {
        self.nodes[i]
            .daemon
            .as_ref()
            .and_then(|d| d.pid())
            .with_context(|| format!("no daemon on n{}", i + 1))
    }

    /// `streams` TCP streams of `each` bytes from pod `a` to pod `b` and as many back, all at
    /// once (listeners on `port` and `port + 1`); fails unless every stream arrived whole.
    pub fn streams_both_ways(
        &self,
        a: &Pod,
        b: &Pod,
        port: u16,
        streams: usize,
        each: u64,
    ) -> Result<()> {
        let (from, to) = (a.clone(), b.clone());
        let there = std::thread::spawn(move || {
            tcp_transfers(&from.ns, &to.ns, &to.ip, port, streams, each)
        });
        let back = tcp_transfers(&b.ns, &a.ns, &a.ip, port + 1, streams, each)?;
        let there = there.join().map_err(|_| anyhow!("transfer panicked"))??;
        for (dir, hashes) in [("there", &there), ("back", &back)] {
            for (i, (sent, received)) in hashes.iter().enumerate() {
                if sent != received {
                    bail!("{} -> {} ({dir}) stream {i}: hash mismatch", a.ns, b.ns);
                }
            }
        }
        Ok(())
    }

    /// Pings `dst` from a pod; Ok if all `count` replies came back.
    pub fn ping(&self, from: &Pod, dst: &str, count: u32) -> Result<()> {
        run_in(
            &from.ns,
            "ping",
            &["-c", &count.to_string(), "-i", "0.1", "-W", "1", "-q", dst],
        )
        .map(drop)
    }

    /// Pings every pod from every other pod (one packet each, two tries).
    pub fn ping_mesh(&self, pods: &[Pod]) -> Result<()> {
        for a in pods {
            for b in pods {
                if a.ns != b.ns && self.ping(a, &b.ip, 1).is_err() {
                    self.ping(a, &b.ip, 2).with_context(|| {
                        format!("ping {} ({}) -> {} ({})", a.ns, a.ip, b.ns, b.ip)
                    })?;
                }
            }
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            // Dropping a daemon stops it, and prints its log's tail if the test panicked.
            node.daemon = None;
        }
        self.etcd = None;
        for ns in self.namespaces.iter().rev() {
            proc::kill_netns_pids(ns);
            let _ = run("ip", &["netns", "del", ns]);
        }
    }
}
