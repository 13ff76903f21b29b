//! The world the NetworkPolicy cases run in: a three-node cluster (any backend) with
//! namespaces x, y, z and pods a, b, c in each (label `pod=<name>`, upstream's container
//! ports), spread round-robin over the nodes so that pods meet on the same node and across
//! every pair of nodes; a `netpol-agent serve` in every pod.
//!
//! Policies, namespaces and pod labels are written to etcd under `<prefix>/policy/` (the
//! contract in `shared/spec/network-policy.md`); after each change the world waits until every
//! node's daemon reports (`GET /v1/policy/status` on `<node dir>/flanneld-rs.sock`) that the
//! etcd revision of the change is in force, then probes the whole 9×9 matrix.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use super::cases::{self, Action, Case, CaseEnv, Probe, Protocol};
use super::reachability::{all_pods, split_pod, Reachability, NAMESPACES, POD_NAMES};
use crate::cluster::{Cluster, ContainerPort, Pod, PodSpec, ETCD_PREFIX};
use crate::proc::{run_in, Daemon};
use crate::{binary, wait_until};

/// How long a probe of denied traffic waits.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a node may take to put a revision in force.
pub const PROGRAMMED_TIMEOUT: Duration = Duration::from_secs(5);
/// The ports every pod serves.
pub const PORTS: [u16; 2] = [80, 81];

/// The etcd prefix of the policy objects.
pub fn policy_prefix() -> String {
    format!("{ETCD_PREFIX}/policy")
}

/// One pod of the model.
#[derive(Clone, Debug)]
pub struct WorldPod {
    /// `"x/a"`.
    pub id: String,
    pub spec: PodSpec,
    pub pod: Pod,
}

pub struct World {
    pub cluster: Cluster,
    /// x/a … z/c, in the model's order.
    pub pods: Vec<WorldPod>,
    /// Pods made later (e.g. to reuse an address), by id.
    pub extra_pods: Vec<WorldPod>,
    pub probe_timeout: Duration,
    /// Whether `validate` also asks `flanneld-rs policy explain` about sampled pairs.
    pub explain_check: bool,
    servers: Vec<Daemon>,
}

/// The pod spec of model pod `ns/name`: label `pod=<name>`, ports `serve-<port>-<proto>`.
pub fn model_spec(ns: &str, name: &str, sctp: bool) -> PodSpec {
    let mut ports = Vec::new();
    for port in PORTS {
        let mut protos = vec![Protocol::Tcp, Protocol::Udp];
        if sctp {
            protos.push(Protocol::Sctp);
        }
        for proto in protos {
            ports.push(ContainerPort {
                name: cases::port_name(port, proto),
                container_port: port,
                protocol: proto.k8s().to_string(),
            });
        }
    }
    PodSpec {
        namespace: ns.to_string(),
        name: name.to_string(),
        labels: vec![("pod".to_string(), name.to_string())],
        ports,
    }
}

/// A namespace record as the contract wants it: `v1` Namespace JSON with labels.
pub fn namespace_record(ns: &str, labels: &BTreeMap<String, String>) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": ns, "labels": labels },
    })
}

/// The labels a model namespace starts with (upstream `Namespace.LabelSelector`: `ns=<name>`).
pub fn default_namespace_labels(ns: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("ns".to_string(), ns.to_string())])
}

/// The revision in the JSON header etcdctl prints with `-w json`.
pub fn revision_of(etcdctl_json: &str) -> Result<i64> {
    let v: Value = serde_json::from_str(etcdctl_json.trim())
        .with_context(|| format!("etcdctl output is not JSON: {etcdctl_json}"))?;
    v["header"]["revision"]
        .as_i64()
        .ok_or_else(|| anyhow!("no header.revision in {etcdctl_json}"))
}

/// A GET over HTTP/1.1 on a Unix socket: (status code, body). Handles chunked bodies.
pub fn http_get_unix(socket: &Path, path: &str, timeout: Duration) -> Result<(u16, String)> {
    http_unix(socket, "GET", path, "", timeout)
}

/// A request over HTTP/1.1 on a Unix socket, as the CNI plugin makes: (status code, body).
pub fn http_unix(
    socket: &Path,
    method: &str,
    path: &str,
    body: &str,
    timeout: Duration,
) -> Result<(u16, String)> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_http_response(&raw)
}

/// Splits a raw HTTP/1.1 response into status and body (de-chunked, or cut at Content-Length).
pub fn parse_http_response(raw: &[u8]) -> Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no end of headers in {text:?}"))?;
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad status line in {head:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
            chunked = true;
        } else if k == "content-length" {
            length = v.parse::<usize>().ok();
        }
    }
    let body = if chunked {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
                .with_context(|| format!("bad chunk size {size:?}"))?;
            if size == 0 || after.len() < size {
                out.push_str(&after[..size.min(after.len())]);
                break;
            }
            out.push_str(&after[..size]);
            rest = after[size..].strip_prefix("\r\n").unwrap_or(&after[size..]);
        }
        out
    } else if let Some(n) = length {
        body[..n.min(body.len())].to_string()
    } else {
        body.to_string()
    };
    Ok((status, body))
}

/// One source pod's verdicts: (source, [(destination, connected)]).
type ProbedRow = (String, Vec<(String, bool)>);

/// The outcome of one case.
#[derive(Debug)]
pub struct CaseOutcome {
    pub name: String,
    pub context: &'static str,
    /// `Ok(None)`: passed; `Ok(Some(why))`: skipped; `Err`: failed (with truth tables).
    pub result: Result<Option<String>>,
    pub took: Duration,
}

impl World {
    /// A three-node cluster with `config` (e.g. `{"Network":"10.244.0.0/16","Backend":
    /// {"Type":"vxlan"}}`), flanneld-rs started on each node with `daemon_extra`, and the
    /// model's namespaces, pods and servers.
    /// The daemons run with `--ip-masq`, as Flannel's manifests start them: without it the
    /// CNI config asks the bridge plugin to masquerade, which hides pod addresses between
    /// nodes (Flannel's behaviour, kept), and no policy can tell one pod from another.
    pub fn build(config: &str, daemon_extra: &[&str]) -> Result<World> {
        let mut c = Cluster::new(3)?;
        c.put_config(config)?;
        let mut args = vec!["--ip-masq"];
        args.extend_from_slice(daemon_extra);
        for i in 0..3 {
            c.start_daemon(i, &args)?;
            c.wait_subnet_env(i, Duration::from_secs(20))?;
        }
        World::populate(c)
    }

    /// Adds the model to a cluster whose daemons run: namespace records, the nine pods
    /// (round-robin over the nodes), a server in each.
    pub fn populate(cluster: Cluster) -> Result<World> {
        let n = cluster.nodes.len();
        if n == 0 {
            bail!("the cluster has no nodes");
        }
        let mut w = World {
            cluster,
            pods: Vec::new(),
            extra_pods: Vec::new(),
            probe_timeout: PROBE_TIMEOUT,
            explain_check: std::env::var("NETPOL_EXPLAIN").is_ok_and(|v| v == "1"),
            servers: Vec::new(),
        };
        for ns in NAMESPACES {
            w.put_namespace(ns, &default_namespace_labels(ns))?;
        }
        let sctp = cases::sctp_available();
        for (i, id) in all_pods().into_iter().enumerate() {
            let (ns, name) = split_pod(&id);
            let spec = model_spec(ns, name, sctp);
            let pod = w
                .cluster
                .add_pod_with(i % n, &spec)
                .with_context(|| format!("adding pod {id}"))?;
            w.start_server(&id, &pod)?;
            w.pods.push(WorldPod { id, spec, pod });
        }
        w.wait_servers()?;
        Ok(w)
    }

    fn start_server(&mut self, id: &str, pod: &Pod) -> Result<()> {
        let agent = binary("netpol-agent")?;
        let mut args = vec!["serve".to_string(), "--ports".to_string(), "80,81".into()];
        if cases::sctp_available() {
            args.push("--sctp".into());
        }
        let log = self
            .cluster
            .dir
            .path()
            .join(format!("agent-{}.log", id.replace('/', "-")));
        self.servers.push(Daemon::spawn(
            &format!("agent {id}"),
            Some(&pod.ns),
            &agent,
            &args,
            &[],
            &log,
        )?);
        Ok(())
    }

    /// Waits until every pod's servers answer from inside the pod itself (no policy applies).
    fn wait_servers(&self) -> Result<()> {
        for p in self.pods.iter().chain(&self.extra_pods) {
            let targets = [
                format!("{}:80/tcp", p.pod.ip),
                format!("{}:81/udp", p.pod.ip),
            ];
            wait_until(
                &format!("the agent in {} to serve", p.id),
                Duration::from_secs(10),
                || {
                    self.probe_from(&p.pod, &targets)
                        .is_ok_and(|r| r.iter().all(|ok| *ok))
                },
            )?;
        }
        Ok(())
    }

    /// The model pod `"x/a"` (or a pod added later under that id).
    pub fn pod(&self, id: &str) -> Result<&WorldPod> {
        self.extra_pods
            .iter()
            .rev()
            .chain(&self.pods)
            .find(|p| p.id == id)
            .ok_or_else(|| anyhow!("no pod {id}"))
    }

    /// What the cases need: the pods' IPv4 addresses.
    pub fn case_env(&self) -> Result<CaseEnv> {
        let mut pod_ips = BTreeMap::new();
        for p in &self.pods {
            let ip: Ipv4Addr = p.pod.ip.parse().with_context(|| p.pod.ip.clone())?;
            pod_ips.insert(p.id.clone(), ip);
        }
        Ok(CaseEnv { pod_ips })
    }

    // ---------------- etcd writes ----------------

    fn put_json(&self, key: &str, value: &str) -> Result<i64> {
        let out = self
            .cluster
            .etcd()?
            .ctl(&["put", key, value, "-w", "json"])?;
        revision_of(&out)
    }

    /// Writes a raw value (valid or not) at `<prefix>/policy/networkpolicies/<ns>/<name>`.
    pub fn put_policy_raw(&self, ns: &str, name: &str, value: &str) -> Result<i64> {
        self.put_json(
            &format!("{}/networkpolicies/{ns}/{name}", policy_prefix()),
            value,
        )
    }

    /// Writes a policy under its own namespace and name (`metadata`); returns the revision.
    pub fn put_policy(&self, policy: &Value) -> Result<i64> {
        let ns = policy["metadata"]["namespace"]
            .as_str()
            .ok_or_else(|| anyhow!("policy without metadata.namespace: {policy}"))?;
        let name = policy["metadata"]["name"]
            .as_str()
            .ok_or_else(|| anyhow!("policy without metadata.name: {policy}"))?;
        self.put_policy_raw(ns, name, &policy.to_string())
    }

    /// Deletes one policy; returns the revision.
    pub fn delete_policy(&self, ns: &str, name: &str) -> Result<i64> {
        let key = format!("{}/networkpolicies/{ns}/{name}", policy_prefix());
        revision_of(&self.cluster.etcd()?.ctl(&["del", &key, "-w", "json"])?)
    }

    /// Deletes every policy; returns the revision after it.
    pub fn delete_all_policies(&self) -> Result<i64> {
        let prefix = format!("{}/networkpolicies/", policy_prefix());
        revision_of(
            &self
                .cluster
                .etcd()?
                .ctl(&["del", &prefix, "--prefix", "-w", "json"])?,
        )
    }

    /// Writes namespace `ns`'s record with exactly `labels`.
    pub fn put_namespace(&self, ns: &str, labels: &BTreeMap<String, String>) -> Result<i64> {
        self.put_json(
            &format!("{}/namespaces/{ns}", policy_prefix()),
            &namespace_record(ns, labels).to_string(),
        )
    }

    /// The labels in namespace `ns`'s record (empty without a record).
    pub fn namespace_labels(&self, ns: &str) -> Result<BTreeMap<String, String>> {
        let key = format!("{}/namespaces/{ns}", policy_prefix());
        let Some(v) = self.cluster.etcd()?.get(&key)? else {
            return Ok(BTreeMap::new());
        };
        let v: Value = serde_json::from_str(&v).with_context(|| format!("{key}: {v}"))?;
        Ok(labels_of(&v["metadata"]["labels"]))
    }

    /// Adds labels to namespace `ns` (keeping the others).
    pub fn add_namespace_labels(&self, ns: &str, labels: &BTreeMap<String, String>) -> Result<i64> {
        let mut all = self.namespace_labels(ns)?;
        all.extend(labels.clone());
        self.put_namespace(ns, &all)
    }

    fn pod_key(id: &str) -> String {
        format!("{}/pods/{id}", policy_prefix())
    }

    /// Pod `id`'s record, as its node's daemon published it.
    pub fn pod_record(&self, id: &str) -> Result<Value> {
        let key = Self::pod_key(id);
        let v = self
            .cluster
            .etcd()?
            .get(&key)?
            .ok_or_else(|| anyhow!("no pod record at {key} (does the daemon publish pods?)"))?;
        serde_json::from_str(&v).with_context(|| format!("{key}: {v}"))
    }

    /// Writes a pod record by hand at `<prefix>/policy/pods/<id>` (as any tool may).
    pub fn put_pod_record(&self, id: &str, record: &Value) -> Result<i64> {
        self.put_json(&Self::pod_key(id), &record.to_string())
    }

    /// Rewrites pod `id`'s record with exactly `labels`; returns the revision.
    pub fn set_pod_labels(&self, id: &str, labels: &BTreeMap<String, String>) -> Result<i64> {
        let mut rec = self.pod_record(id)?;
        rec["metadata"]["labels"] = json!(labels);
        self.put_json(&Self::pod_key(id), &rec.to_string())
    }

    /// Adds labels to pod `id` (keeping the others).
    pub fn add_pod_labels(&self, id: &str, labels: &BTreeMap<String, String>) -> Result<i64> {
        let rec = self.pod_record(id)?;
        let mut all = labels_of(&rec["metadata"]["labels"]);
        all.extend(labels.clone());
        self.set_pod_labels(id, &all)
    }

    /// Back to the model's start: no policies, namespaces `ns=<name>` only, pods `pod=<name>`
    /// only (records rewritten only where they differ). Returns the revision to wait for.
    pub fn reset(&self) -> Result<i64> {
        let mut rev = self.delete_all_policies()?;
        for ns in NAMESPACES {
            let want = default_namespace_labels(ns);
            if self.namespace_labels(ns)? != want {
                rev = rev.max(self.put_namespace(ns, &want)?);
            }
        }
        for p in &self.pods {
            let want: BTreeMap<String, String> = p.spec.labels.iter().cloned().collect();
            if let Ok(rec) = self.pod_record(&p.id) {
                if labels_of(&rec["metadata"]["labels"]) != want {
                    rev = rev.max(self.set_pod_labels(&p.id, &want)?);
                }
            }
        }
        Ok(rev)
    }

    /// Applies one action of a case; returns the revision of its last write.
    pub fn apply(&self, action: &Action) -> Result<i64> {
        match action {
            Action::PutPolicy { namespace, policy } => {
                if policy["metadata"]["namespace"] != json!(namespace) {
                    bail!("policy {policy} is not in namespace {namespace}");
                }
                self.put_policy(policy)
            }
            Action::DeletePolicies => self.delete_all_policies(),
            Action::AddPodLabels { pod, labels } => self.add_pod_labels(pod, labels),
            Action::AddNamespaceLabels { namespace, labels } => {
                self.add_namespace_labels(namespace, labels)
            }
        }
    }

    // ---------------- programmed revisions ----------------

    /// The socket node `i`'s daemon serves its status on: beside its subnet file.
    pub fn status_socket(&self, i: usize) -> std::path::PathBuf {
        let sf = self.cluster.nodes[i].subnet_file();
        sf.parent()
            .map(|d| d.join("flanneld-rs.sock"))
            .unwrap_or_else(|| "flanneld-rs.sock".into())
    }

    /// The revision node `i` reports in force (`GET /v1/policy/status`, `"revision"`).
    pub fn programmed_revision(&self, i: usize) -> Result<i64> {
        let sock = self.status_socket(i);
        let (code, body) = http_get_unix(&sock, "/v1/policy/status", Duration::from_secs(2))?;
        if code != 200 {
            bail!("{}: GET /v1/policy/status: {code} {body}", sock.display());
        }
        let v: Value = serde_json::from_str(&body)
            .with_context(|| format!("/v1/policy/status is not JSON: {body}"))?;
        v["revision"]
            .as_i64()
            .ok_or_else(|| anyhow!("/v1/policy/status has no integer \"revision\": {body}"))
    }

    /// Waits (polling every 20 ms, at most `PROGRAMMED_TIMEOUT`) until every node reports
    /// `revision` or later in force; returns how long it took.
    pub fn wait_programmed(&self, revision: i64) -> Result<Duration> {
        let start = Instant::now();
        for i in 0..self.cluster.nodes.len() {
            loop {
                let last = match self.programmed_revision(i) {
                    Ok(r) if r >= revision => break,
                    other => other,
                };
                if start.elapsed() > PROGRAMMED_TIMEOUT {
                    bail!(
                        "node {} did not put etcd revision {revision} in force within {:?} (last status: {}); daemon log tail:\n{}",
                        self.cluster.nodes[i].name,
                        PROGRAMMED_TIMEOUT,
                        match &last {
                            Ok(r) => format!("revision {r}"),
                            Err(e) => format!("{e:#}"),
                        },
                        tail(&self.cluster.nodes[i].log(), 30),
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(start.elapsed())
    }

    // ---------------- probing ----------------

    /// Probes `targets` (`ip:port/proto`) from inside `from`, all at once; one verdict each.
    pub fn probe_from(&self, from: &Pod, targets: &[String]) -> Result<Vec<bool>> {
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let agent = binary("netpol-agent")?;
        let agent = agent.to_string_lossy();
        let ms = self.probe_timeout.as_millis().to_string();
        let mut args = vec![agent.as_ref(), "probe", "--timeout-ms", ms.as_str()];
        args.extend(targets.iter().map(String::as_str));
        let out = run_in(&from.ns, args[0], &args[1..])?;
        let mut verdicts = Vec::with_capacity(targets.len());
        for (t, line) in targets.iter().zip(out.lines()) {
            match line.rsplit_once(' ') {
                Some((got, v)) if got == t => verdicts.push(v == "ok"),
                _ => bail!("agent answered {line:?} for {t}"),
            }
        }
        if verdicts.len() != targets.len() {
            bail!(
                "agent answered {} of {} targets:\n{out}",
                verdicts.len(),
                targets.len()
            );
        }
        Ok(verdicts)
    }

    /// Observes the whole matrix of `r` on `port`/`proto`: one agent per source pod, all
    /// sources at once. Loopback pairs are not probed (they never cross a policy) and are
    /// recorded as connected.
    pub fn probe_matrix(&self, port: u16, proto: Protocol, r: &mut Reachability) -> Result<()> {
        r.clear_observed();
        let pods = r.pods().to_vec();
        let results: Vec<Result<ProbedRow>> = std::thread::scope(|s| {
            let handles: Vec<_> = pods
                .iter()
                .map(|from| {
                    let pods = &pods;
                    s.spawn(move || -> Result<ProbedRow> {
                        let src = self.pod(from)?;
                        let mut tos = Vec::new();
                        let mut targets = Vec::new();
                        for to in pods.iter().filter(|t| *t != from) {
                            tos.push(to.clone());
                            targets.push(format!(
                                "{}:{port}/{}",
                                self.pod(to)?.pod.ip,
                                proto.lower()
                            ));
                        }
                        let v = self.probe_from(&src.pod, &targets)?;
                        Ok((from.clone(), tos.into_iter().zip(v).collect()))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow!("probe thread panicked")))
                })
                .collect()
        });
        for res in results {
            let (from, row) = res?;
            r.observe(&from, &from, true);
            for (to, ok) in row {
                r.observe(&from, &to, ok);
            }
        }
        Ok(())
    }

    /// Probes and compares one expectation; on a mismatch probes once more (upstream's second
    /// try) and fails with the truth tables.
    pub fn validate(&self, probe: &Probe) -> Result<()> {
        let mut r = probe.reachability.clone();
        self.probe_matrix(probe.port, probe.protocol, &mut r)?;
        if r.check().is_err() {
            self.probe_matrix(probe.port, probe.protocol, &mut r)?;
        }
        if let Err(tables) = r.check() {
            bail!("port {}/{}: {tables}", probe.port, probe.protocol.k8s());
        }
        if self.explain_check {
            self.cross_check_explain(probe.port, probe.protocol, &r)?;
        }
        Ok(())
    }

    /// Runs one case from a clean state: per step, the actions, a wait until every node has
    /// the last revision in force, then each probe.
    pub fn run_case(&self, case: &Case) -> Result<()> {
        let rev = self.reset()?;
        self.wait_programmed(rev).context("resetting")?;
        for (n, step) in case.steps.iter().enumerate() {
            let mut rev = 0;
            for a in &step.actions {
                rev = rev.max(
                    self.apply(a)
                        .with_context(|| format!("step {}: {a:?}", n + 1))?,
                );
            }
            if rev > 0 {
                self.wait_programmed(rev)
                    .with_context(|| format!("step {} ({})", n + 1, step.what))?;
            }
            for p in &step.probes {
                self.validate(p)
                    .with_context(|| format!("step {} ({})", n + 1, step.what))?;
            }
        }
        Ok(())
    }

    /// Runs cases in sequence (skipping those this machine cannot run); one outcome each.
    pub fn run_cases(&self, cases: &[Case]) -> Vec<CaseOutcome> {
        cases
            .iter()
            .map(|c| {
                let start = Instant::now();
                let result = match cases::skip_reason(c) {
                    Some(why) => Ok(Some(why)),
                    None => self.run_case(c).map(|()| None),
                };
                let o = CaseOutcome {
                    name: c.name.clone(),
                    context: c.context,
                    result,
                    took: start.elapsed(),
                };
                match &o.result {
                    Ok(None) => eprintln!("PASS {} [{}] ({:?})", o.name, o.context, o.took),
                    Ok(Some(why)) => eprintln!("SKIP {} [{}]: {why}", o.name, o.context),
                    Err(e) => eprintln!("FAIL {} [{}]: {e:#}", o.name, o.context),
                }
                o
            })
            .collect()
    }

    // ---------------- the CLI's explanation ----------------

    /// `flanneld-rs policy explain --subnet-file <node subnet.env> SRC DST PORT/PROTO -o json`
    /// run in node `node`'s namespace: its `"allowed"`.
    pub fn explain_allowed(
        &self,
        node: usize,
        src_ip: &str,
        dst_ip: &str,
        port: u16,
        proto: Protocol,
    ) -> Result<bool> {
        let prog = binary("flanneld-rs")?;
        let prog = prog.to_string_lossy();
        let sf = self.cluster.nodes[node].subnet_file();
        let sf = sf.to_string_lossy();
        let pp = format!("{port}/{}", proto.k8s());
        let prefix = format!("--etcd-prefix={ETCD_PREFIX}");
        let mut args: Vec<&str> = vec!["policy", "explain"];
        args.extend(self.cluster.etcd_flags.iter().map(String::as_str));
        args.extend([
            prefix.as_str(),
            "--subnet-file",
            sf.as_ref(),
            src_ip,
            dst_ip,
            pp.as_str(),
            "-o",
            "json",
        ]);
        let out = self.cluster.nodes[node].run(prog.as_ref(), &args)?;
        let v: Value = serde_json::from_str(out.trim())
            .with_context(|| format!("policy explain output is not JSON: {out}"))?;
        v["allowed"]
            .as_bool()
            .ok_or_else(|| anyhow!("policy explain has no boolean \"allowed\": {out}"))
    }

    /// For a sample of observed pairs (every pair into and out of x/a, and a diagonal),
    /// checks that `policy explain` on the source's node agrees with the probe.
    pub fn cross_check_explain(&self, port: u16, proto: Protocol, r: &Reachability) -> Result<()> {
        let pods = r.pods().to_vec();
        let mut pairs = Vec::new();
        for p in &pods {
            if p != "x/a" {
                pairs.push(("x/a".to_string(), p.clone()));
                pairs.push((p.clone(), "x/a".to_string()));
            }
        }
        for w in pods.windows(2) {
            pairs.push((w[1].clone(), w[0].clone()));
        }
        for (from, to) in pairs {
            let Some(observed) = r.observed.get(&from, &to) else {
                continue;
            };
            let src = self.pod(&from)?;
            let dst = self.pod(&to)?;
            let said = self.explain_allowed(src.pod.node, &src.pod.ip, &dst.pod.ip, port, proto)?;
            if said != observed {
                bail!(
                    "policy explain says {from} -> {to} {port}/{} is {}, the probe found it {}",
                    proto.k8s(),
                    if said { "allowed" } else { "denied" },
                    if observed { "open" } else { "blocked" }
                );
            }
        }
        Ok(())
    }

    // ---------------- pods that come and go ----------------

    /// Deletes pod `id` (CNI DEL with its arguments) and stops its server.
    pub fn delete_pod(&mut self, id: &str) -> Result<WorldPod> {
        let p = self.pod(id)?.clone();
        self.cluster.del_pod_with(&p.pod, &p.spec)?;
        crate::proc::kill_netns_pids(&p.pod.ns);
        self.pods.retain(|q| q.id != id);
        self.extra_pods.retain(|q| q.id != id);
        Ok(p)
    }

    /// Adds a pod (namespace/name/labels of `spec`) on node `node` with a server in it; when
    /// `reuse_ip` is given, host-local is steered to hand out that address next.
    pub fn add_extra_pod(
        &mut self,
        node: usize,
        spec: PodSpec,
        reuse_ip: Option<Ipv4Addr>,
    ) -> Result<&WorldPod> {
        if let Some(ip) = reuse_ip {
            // host-local hands out the address after the last one it reserved.
            let before = Ipv4Addr::from(u32::from(ip) - 1);
            let dir = self.cluster.nodes[node].dir.join("ipam/cbr0");
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("last_reserved_ip.0"), before.to_string())?;
        }
        let pod = self.cluster.add_pod_with(node, &spec)?;
        if let Some(ip) = reuse_ip {
            if pod.ip != ip.to_string() {
                bail!("the new pod got {} instead of the reused {ip}", pod.ip);
            }
        }
        let id = format!("{}/{}", spec.namespace, spec.name);
        self.start_server(&id, &pod)?;
        self.extra_pods.push(WorldPod { id, spec, pod });
        self.wait_servers()?;
        Ok(self.extra_pods.last().expect("just pushed"))
    }

    /// Whether `from` reaches `to` on `port`/`proto` now (one probe).
    pub fn reaches(&self, from: &str, to: &str, port: u16, proto: Protocol) -> Result<bool> {
        let src = self.pod(from)?;
        let dst = self.pod(to)?;
        let t = format!("{}:{port}/{}", dst.pod.ip, proto.lower());
        Ok(self.probe_from(&src.pod, &[t])?[0])
    }
}

fn labels_of(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn tail(text: &str, lines: usize) -> String {
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// The pod names of the model, for callers that iterate (re-exported for tests).
pub fn model_pod_names() -> [&'static str; 3] {
    POD_NAMES
}

/// The report of `run_cases`: one line per case, and an error listing the failed ones.
pub fn report(outcomes: &[CaseOutcome]) -> Result<()> {
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|o| o.result.is_err())
        .map(|o| format!("{} [{}]", o.name, o.context))
        .collect();
    let passed = outcomes
        .iter()
        .filter(|o| matches!(o.result, Ok(None)))
        .count();
    let skipped = outcomes
        .iter()
        .filter(|o| matches!(o.result, Ok(Some(_))))
        .count();
    eprintln!(
        "netpol: {passed} passed, {skipped} skipped, {} failed of {}",
        failed.len(),
        outcomes.len()
    );
    if !failed.is_empty() {
        bail!(
            "{} case(s) failed:\n  {}",
            failed.len(),
            failed.join("\n  ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_come_from_etcdctl_headers() {
        let out = r#"{"header":{"cluster_id":1,"member_id":2,"revision":42,"raft_term":3}}"#;
        assert_eq!(revision_of(out).unwrap(), 42);
        assert!(revision_of("OK").is_err());
    }

    #[test]
    fn http_responses_parse_plain_and_chunked() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n{\"revision\": 7}\n";
        assert_eq!(
            parse_http_response(plain).unwrap(),
            (200, "{\"revision\": 7}\n".to_string())
        );
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"rev\r\na\r\nision\": 9}\r\n0\r\n\r\n";
        assert_eq!(
            parse_http_response(chunked).unwrap(),
            (200, "{\"revision\": 9}".to_string())
        );
        assert_eq!(
            parse_http_response(b"HTTP/1.1 404 Not Found\r\n\r\n")
                .unwrap()
                .0,
            404
        );
        assert!(parse_http_response(b"garbage").is_err());
    }

    #[test]
    fn status_over_a_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut buf = [0u8; 1024];
            let n = c.read(&mut buf).unwrap();
            assert!(String::from_utf8_lossy(&buf[..n])
                .starts_with("GET /v1/policy/status HTTP/1.1\r\n"));
            c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{\"revision\":11}")
                .unwrap();
        });
        let (code, body) =
            http_get_unix(&path, "/v1/policy/status", Duration::from_secs(2)).unwrap();
        assert_eq!(code, 200);
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap()["revision"],
            11
        );
    }

    #[test]
    fn model_pods_carry_upstream_labels_and_ports() {
        let s = model_spec("y", "b", false);
        assert_eq!(
            s.cni_args(),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=y;K8S_POD_NAME=b"
        );
        let args = s.conf_args();
        assert_eq!(args["cni"]["labels"], json!([{"key": "pod", "value": "b"}]));
        let names: Vec<_> = args["cni"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "serve-80-tcp",
                "serve-80-udp",
                "serve-81-tcp",
                "serve-81-udp"
            ]
        );
        assert_eq!(args["cni"]["ports"][1]["protocol"], "UDP");
        assert_eq!(args["cni"]["ports"][2]["containerPort"], 81);
        assert_eq!(model_spec("x", "a", true).ports.len(), 6);
        let ns = namespace_record("x", &default_namespace_labels("x"));
        assert_eq!(ns["metadata"]["labels"]["ns"], "x");
        assert_eq!(model_pod_names(), ["a", "b", "c"]);
    }
}
