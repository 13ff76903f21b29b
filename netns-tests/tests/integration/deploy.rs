//! Deploy and operate: the files in `deploy/` (parsed, cross-checked with each other and with
//! the flags the daemon accepts, scripts run for real), `/healthz`, `/metrics` read by the
//! Python `prometheus_client` parser as a real scraper would, and the daemon's logs.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use netns_tests::cluster::{Cluster, Pod, ETCD_PREFIX};
use netns_tests::etcd::Etcd;
use netns_tests::traffic::{http_get, http_get_at, metric, tcp_transfer};
use netns_tests::{bin_dir, binary, wait_until};
use serde_json::Value;

use crate::require_root;

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(name: &str) -> Result<String> {
    let path = deploy_dir().join(name);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// A Python 3 that can import `module`: the one on the PATH, else Debian's (install-deps.sh
/// installs the modules for both).
fn python_with(module: &str) -> Result<&'static str> {
    for py in ["python3", "/usr/bin/python3"] {
        let ok = Command::new(py)
            .args(["-c", &format!("import {module}")])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(py);
        }
    }
    bail!("no python3 with the {module} module: run scripts/install-deps.sh")
}

/// Runs `python3 -c code` with `input` on stdin; returns stdout parsed as JSON.
fn python_json(module: &str, code: &str, input: &str) -> Result<Value> {
    let py = python_with(module)?;
    let mut child = Command::new(py)
        .args(["-c", code])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {py}"))?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{py} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("python's output is not JSON")
}

/// Every document of a YAML file, through PyYAML's safe loader.
fn yaml_docs(name: &str) -> Result<Vec<Value>> {
    let docs = python_json(
        "yaml",
        "import json,sys,yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d is not None]))",
        &read(name)?,
    )?;
    docs.as_array()
        .cloned()
        .with_context(|| format!("{name}: not a list of documents"))
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> Result<&'a str> {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .with_context(|| format!("no string at {pointer}"))
}

fn array_at<'a>(v: &'a Value, pointer: &str) -> Result<&'a Vec<Value>> {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .with_context(|| format!("no list at {pointer}"))
}

/// Checks flags the way the daemon parses them: `flanneld-rs <args> --help` exits 0 only when
/// every argument before `--help` is a known flag with a valid value. Environment variables are
/// checked by name against `--help`'s `[env: …]` list, and by value as the flag they stand for.
fn daemon_accepts(args: &[String], env: &BTreeMap<String, String>) -> Result<()> {
    let help = Command::new(binary("flanneld-rs")?)
        .arg("--help")
        .output()?;
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let mut all = args.to_vec();
    for (name, value) in env {
        ensure!(
            help.contains(&format!("[env: {name}=")),
            "{name} is not an environment variable flanneld-rs reads"
        );
        let flag = name
            .strip_prefix("FLANNELD_")
            .context("not a FLANNELD_ variable")?
            .to_ascii_lowercase()
            .replace('_', "-");
        all.push(format!("--{flag}={value}"));
    }
    all.push("--help".into());
    let out = Command::new(binary("flanneld-rs")?)
        .args(&all)
        .env_clear()
        .output()?;
    ensure!(
        out.status.success(),
        "flanneld-rs rejects {all:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The value of `--name=value` in `args`.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .find_map(|a| a.strip_prefix(&format!("--{name}=")))
}

/// The CNI conflist: our plugin in Flannel's format, then portmap.
fn conflist() -> Result<Value> {
    Ok(serde_json::from_str(&read("10-flannel.conflist")?)?)
}

fn image() -> String {
    format!("ghcr.io/flanneld-rs/flanneld-rs:v{VERSION}")
}

#[test]
fn cni_conflist_is_flannels_format() -> Result<()> {
    let conflist = conflist()?;
    ensure!(str_at(&conflist, "/name")? == "cbr0");
    ensure!(str_at(&conflist, "/cniVersion")? == "1.0.0");
    ensure!(str_at(&conflist, "/plugins/0/type")? == "flannel");
    ensure!(conflist.pointer("/plugins/0/delegate/hairpinMode") == Some(&Value::Bool(true)));
    ensure!(conflist.pointer("/plugins/0/delegate/isDefaultGateway") == Some(&Value::Bool(true)));
    ensure!(str_at(&conflist, "/plugins/1/type")? == "portmap");
    ensure!(conflist.pointer("/plugins/1/capabilities/portMappings") == Some(&Value::Bool(true)));

    Ok(())
}

/// kube-flannel-rs.yml: Namespace, ConfigMap and DaemonSet, with every flag, variable, mount
/// and probe the daemon container gets accepted by the real binary.
#[test]
fn daemonset_manifest_agrees_with_the_daemon() -> Result<()> {
    let image = image();
    let conflist = conflist()?;
    let docs = yaml_docs("kube-flannel-rs.yml")?;
    let kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"] == k)
            .with_context(|| format!("no {k} in kube-flannel-rs.yml"))
    };
    let ns = str_at(kind("Namespace")?, "/metadata/name")?;
    let cm = kind("ConfigMap")?;
    let ds = kind("DaemonSet")?;
    ensure!(str_at(ds, "/apiVersion")? == "apps/v1");
    ensure!(str_at(cm, "/metadata/namespace")? == ns && str_at(ds, "/metadata/namespace")? == ns);
    let cni_conf: Value = serde_json::from_str(str_at(cm, "/data/cni-conf.json")?)?;
    ensure!(
        cni_conf == conflist,
        "the ConfigMap's cni-conf.json differs from deploy/10-flannel.conflist"
    );
    let selector = ds
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
        .context("no selector")?;
    for (k, v) in selector {
        ensure!(ds.pointer(&format!("/spec/template/metadata/labels/{k}")) == Some(v));
    }

    let pod = ds.pointer("/spec/template/spec").context("no pod spec")?;
    ensure!(pod["hostNetwork"] == true, "hostNetwork");
    ensure!(str_at(pod, "/priorityClassName")? == "system-node-critical");
    let tolerations = array_at(pod, "/tolerations")?;
    for effect in ["NoSchedule", "NoExecute"] {
        ensure!(
            tolerations.iter().any(|t| t["operator"] == "Exists"
                && t["effect"] == effect
                && t.get("key").is_none()),
            "no catch-all {effect} toleration"
        );
    }
    let volumes: BTreeMap<&str, &Value> = array_at(pod, "/volumes")?
        .iter()
        .map(|v| Ok((str_at(v, "/name")?, v)))
        .collect::<Result<_>>()?;
    // Each mount's volume, as (hostPath, type) or "configMap:<name>" / "secret:<name>".
    let source = |mount: &Value| -> Result<(String, String)> {
        let name = str_at(mount, "/name")?;
        let v = volumes
            .get(name)
            .with_context(|| format!("no volume {name}"))?;
        if let Some(p) = v.pointer("/hostPath/path").and_then(Value::as_str) {
            let t = v
                .pointer("/hostPath/type")
                .and_then(Value::as_str)
                .unwrap_or("");
            Ok((p.to_string(), t.to_string()))
        } else if let Some(c) = v.pointer("/configMap/name").and_then(Value::as_str) {
            Ok((format!("configMap:{c}"), String::new()))
        } else if let Some(s) = v.pointer("/secret/secretName").and_then(Value::as_str) {
            Ok((format!("secret:{s}"), String::new()))
        } else {
            bail!("volume {name} has no known source")
        }
    };
    let mounts = |container: &Value| -> Result<BTreeMap<String, (String, String)>> {
        array_at(container, "/volumeMounts")?
            .iter()
            .map(|m| {
                Ok((
                    str_at(m, "/mountPath")?.trim_end_matches('/').to_string(),
                    source(m)?,
                ))
            })
            .collect()
    };

    // The init container installs the plugin and the conflist into the host's directories.
    let init = &array_at(pod, "/initContainers")?[0];
    ensure!(str_at(init, "/image")? == image, "init image");
    ensure!(init["command"] == serde_json::json!(["/opt/bin/install-cni.sh"]));
    let init_mounts = mounts(init)?;
    let cm_name = str_at(cm, "/metadata/name")?;
    for (path, want) in [
        (
            "/opt/cni/bin",
            ("/opt/cni/bin".to_string(), "DirectoryOrCreate".to_string()),
        ),
        (
            "/etc/cni/net.d",
            ("/etc/cni/net.d".into(), "DirectoryOrCreate".into()),
        ),
        (
            "/etc/kube-flannel",
            (format!("configMap:{cm_name}"), String::new()),
        ),
    ] {
        ensure!(
            init_mounts.get(path) == Some(&want),
            "init mount {path}: {init_mounts:?}"
        );
    }

    // The daemon container: image, command, capabilities, host paths, flags.
    let main = &array_at(pod, "/containers")?[0];
    ensure!(str_at(main, "/image")? == image, "daemon image");
    ensure!(main["command"] == serde_json::json!(["/opt/bin/flanneld-rs"]));
    let sc = &main["securityContext"];
    ensure!(
        sc["privileged"] == false,
        "the daemon must not need privileged"
    );
    let caps: BTreeSet<&str> = array_at(sc, "/capabilities/add")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    ensure!(
        caps == BTreeSet::from(["NET_ADMIN", "NET_RAW"]),
        "capabilities {caps:?}"
    );
    let main_mounts = mounts(main)?;
    ensure!(
        main_mounts.get("/run/flannel")
            == Some(&("/run/flannel".into(), "DirectoryOrCreate".into())),
        "{main_mounts:?}"
    );
    ensure!(
        main_mounts.get("/dev/net/tun") == Some(&("/dev/net/tun".into(), "CharDevice".into())),
        "{main_mounts:?}"
    );
    let args: Vec<String> = array_at(main, "/args")?
        .iter()
        .map(|a| a.as_str().map(str::to_string).context("non-string arg"))
        .collect::<Result<_>>()?;
    ensure!(
        args.iter().any(|a| a == "--ip-masq"),
        "--ip-masq, as kube-flannel.yml"
    );
    let subnet_file = flag(&args, "subnet-file").unwrap_or("/run/flannel/subnet.env");
    ensure!(
        subnet_file.starts_with("/run/flannel/"),
        "subnet.env must be on the host path"
    );
    // TLS files come from the Secret's mount.
    let tls_dir = main_mounts
        .iter()
        .find(|(_, (src, _))| src.starts_with("secret:"))
        .map(|(path, (src, _))| (path.clone(), src.trim_start_matches("secret:").to_string()))
        .context("no Secret mounted for etcd TLS")?;
    for name in ["etcd-cafile", "etcd-certfile", "etcd-keyfile"] {
        let path = flag(&args, name).with_context(|| format!("no --{name}"))?;
        ensure!(
            path.starts_with(&format!("{}/", tls_dir.0)),
            "--{name}={path} outside the Secret"
        );
    }
    // Probes and the scrape annotation point at the ports the flags open.
    let healthz = flag(&args, "healthz-port").context("no --healthz-port")?;
    let metrics = flag(&args, "metrics-port").context("no --metrics-port")?;
    // As Flannel v0.28.9's manifest: liveness on /healthz, readiness on /readyz.
    ensure!(main.pointer("/readinessProbe/httpGet/path") == Some(&"/readyz".into()));
    ensure!(main.pointer("/livenessProbe/httpGet/path") == Some(&"/healthz".into()));
    for probe in ["readinessProbe", "livenessProbe"] {
        ensure!(
            main.pointer(&format!("/{probe}/httpGet/port"))
                .map(Value::to_string)
                == Some(healthz.into()),
            "{probe} is not on --healthz-port"
        );
    }
    ensure!(
        ds.pointer("/spec/template/metadata/annotations/prometheus.io~1port")
            == Some(&metrics.into()),
        "prometheus.io/port must be --metrics-port"
    );
    // Environment: endpoints from our ConfigMap, credentials from the TLS Secret.
    let mut env = BTreeMap::new();
    for e in array_at(main, "/env")? {
        let name = str_at(e, "/name")?.to_string();
        let value = if let Some(r) = e.pointer("/valueFrom/configMapKeyRef") {
            ensure!(
                str_at(r, "/name")? == cm_name,
                "{name} from another ConfigMap"
            );
            str_at(cm, &format!("/data/{}", str_at(r, "/key")?))?.to_string()
        } else if let Some(r) = e.pointer("/valueFrom/secretKeyRef") {
            ensure!(
                str_at(r, "/name")? == tls_dir.1,
                "{name} from another Secret"
            );
            "from-the-secret".to_string()
        } else {
            str_at(e, "/value")?.to_string()
        };
        env.insert(name, value);
    }
    ensure!(
        env.contains_key("FLANNELD_ETCD_ENDPOINTS"),
        "no etcd endpoints"
    );
    daemon_accepts(&args, &env)?;

    Ok(())
}

#[test]
fn dockerfile_builds_what_the_manifest_runs() -> Result<()> {
    let docker = read("Dockerfile")?;
    let froms: Vec<&str> = docker.lines().filter(|l| l.starts_with("FROM ")).collect();
    ensure!(
        froms.len() == 2 && froms[0].ends_with(" AS build"),
        "{froms:?}"
    );
    ensure!(docker.contains("cargo build --release --locked -p flanneld-rs -p flannel-cni --bins"));
    ensure!(docker.contains("COPY --from=build /out/flanneld-rs /out/flannel /opt/bin/"));
    ensure!(docker.contains("ENTRYPOINT [\"/opt/bin/flanneld-rs\"]"));
    for (src, dst) in [
        ("deploy/install-cni.sh", "/opt/bin/install-cni.sh"),
        (
            "deploy/10-flannel.conflist",
            "/etc/kube-flannel/cni-conf.json",
        ),
    ] {
        ensure!(docker.contains(&format!("COPY {src} {dst}")), "COPY {src}");
        ensure!(deploy_dir().join("..").join(src).exists(), "{src} missing");
    }
    ensure!(
        docker.contains("nftables iptables"),
        "ip-masq tools in the image"
    );

    Ok(())
}

/// The systemd unit: our binary, flags as FLANNELD_* variables the daemon accepts, a clean
/// stop, room for file descriptors; and, where they exist, systemd's and Kubernetes' own
/// parsers get a look too.
#[test]
fn systemd_unit_runs_our_binary_with_accepted_settings() -> Result<()> {
    let unit = read("flanneld-rs.service")?;
    let mut unit_env = BTreeMap::new();
    let mut exec = None;
    for line in unit.lines() {
        if let Some(kv) = line.strip_prefix("Environment=") {
            let (k, v) = kv.split_once('=').context("Environment= without =")?;
            unit_env.insert(k.to_string(), v.to_string());
        } else if let Some(cmd) = line.strip_prefix("ExecStart=") {
            exec = Some(cmd.to_string());
        }
    }
    let exec = exec.context("no ExecStart")?;
    let mut words = exec.split_whitespace();
    ensure!(
        words.next() == Some("/usr/local/bin/flanneld-rs"),
        "ExecStart={exec}"
    );
    daemon_accepts(&words.map(str::to_string).collect::<Vec<_>>(), &unit_env)?;
    for want in [
        "KillSignal=SIGTERM",
        "Restart=always",
        "LimitNOFILE=65536",
        "[Install]",
    ] {
        ensure!(unit.lines().any(|l| l == want), "the unit lacks {want}");
    }

    tool_checks(&unit)?;

    Ok(())
}

#[test]
fn deploy_scripts_are_valid_shell_and_executable() -> Result<()> {
    for (shell, name) in [("sh", "install-cni.sh"), ("bash", "etcd-config.sh")] {
        let path = deploy_dir().join(name);
        let ok = Command::new(shell).arg("-n").arg(&path).status()?.success();
        ensure!(ok, "{name} does not parse");
        use std::os::unix::fs::PermissionsExt;
        ensure!(
            std::fs::metadata(&path)?.permissions().mode() & 0o111 != 0,
            "{name} not executable"
        );
    }
    Ok(())
}

/// `kubectl` decodes every object into Kubernetes' Go types offline (`--local`: a wrong type
/// anywhere fails); `systemd-analyze verify` parses the unit (with ExecStart pointed at our
/// build, since it wants the binary to exist). Each is skipped, saying so, where missing.
fn tool_checks(unit: &str) -> Result<()> {
    let has = |tool: &str| {
        Command::new(tool)
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    };
    if has("kubectl") {
        let out = Command::new("kubectl")
            .args(["set", "env", "--local", "--list", "-f"])
            .arg(deploy_dir().join("kube-flannel-rs.yml"))
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && stdout.contains("FLANNELD_ETCD_ENDPOINTS from configmap"),
            "kubectl: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        eprintln!("kubectl not found: Kubernetes decoding skipped");
    }
    if has("systemd-analyze") {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("flanneld-rs.service");
        let ours = binary("flanneld-rs")?;
        std::fs::write(
            &path,
            unit.replace("/usr/local/bin/flanneld-rs", &ours.to_string_lossy()),
        )?;
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()?;
        // It reports bad settings on stderr and still exits 0.
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.success() && err.trim().is_empty(),
            "systemd-analyze: {err}"
        );
    } else {
        eprintln!("systemd-analyze not found: unit verification skipped");
    }
    Ok(())
}

#[test]
fn install_cni_script_installs_and_keeps_the_nodes_plugins() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let std_bin = tmp.path().join("std");
    let host_bin = tmp.path().join("host/opt/cni/bin");
    let host_conf = tmp.path().join("host/etc/cni/net.d");
    std::fs::create_dir_all(&std_bin)?;
    std::fs::create_dir_all(&host_bin)?;
    for p in ["bridge", "host-local", "loopback", "portmap"] {
        std::fs::write(std_bin.join(p), format!("image's {p}"))?;
    }
    // The node already has a bridge plugin: it must stay.
    std::fs::write(host_bin.join("bridge"), "node's bridge")?;
    for round in 0..2 {
        let out = Command::new(deploy_dir().join("install-cni.sh"))
            .env("SRC_BIN", bin_dir()?)
            .env("STD_BIN", &std_bin)
            .env("CNI_BIN_DIR", &host_bin)
            .env("CNI_CONF_DIR", &host_conf)
            .env("CNI_CONF", deploy_dir().join("10-flannel.conflist"))
            .output()?;
        ensure!(
            out.status.success(),
            "round {round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    ensure!(std::fs::read(host_bin.join("flannel"))? == std::fs::read(binary("flannel")?)?);
    ensure!(std::fs::read_to_string(host_bin.join("bridge"))? == "node's bridge");
    ensure!(std::fs::read_to_string(host_bin.join("portmap"))? == "image's portmap");
    ensure!(
        std::fs::read_to_string(host_conf.join("10-flannel.conflist"))?
            == read("10-flannel.conflist")?
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: PathBuf| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777);
    ensure!(mode(host_bin.join("flannel"))? == 0o755);
    ensure!(mode(host_conf.join("10-flannel.conflist"))? == 0o644);
    let names: Vec<String> = std::fs::read_dir(&host_bin)?
        .chain(std::fs::read_dir(&host_conf)?)
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    ensure!(
        names.iter().all(|n| !n.contains(".flanneld-rs.")),
        "temporary files left: {names:?}"
    );
    Ok(())
}

/// Runs `deploy/etcd-config.sh` against `etcd`; returns (exit code, stderr).
fn etcd_config(etcd: &Etcd, args: &[&str]) -> Result<(i32, String)> {
    let mut cmd = Command::new(deploy_dir().join("etcd-config.sh"));
    for (k, v) in etcd.ctl_env() {
        cmd.env(k, v);
    }
    let out = cmd.args(args).output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn etcd_config_script_writes_valid_configs_and_guards_them() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let etcd = Etcd::on_loopback(dir.path())?;
    let key = format!("{ETCD_PREFIX}/config");
    let get = || etcd.get(&key);

    ensure!(etcd_config(&etcd, &["--dry-run"])?.0 == 0);
    ensure!(get()?.is_none(), "--dry-run wrote");
    ensure!(etcd_config(&etcd, &[])?.0 == 0);
    let v = get()?.context("nothing written")?;
    ensure!(
        v == r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#,
        "{v}"
    );
    subnet_manager::config::NetworkConfig::parse(v.as_bytes())?;
    // The same config again is fine; a different one needs --force.
    ensure!(etcd_config(&etcd, &[])?.0 == 0);
    let (code, err) = etcd_config(
        &etcd,
        &["--network", "10.50.0.0/16", "--backend", "host-gw"],
    )?;
    ensure!(code == 1 && err.contains("--force"), "{code} {err}");
    ensure!(get()? == Some(v), "replaced without --force");
    let args = [
        "--network",
        "10.50.0.0/16",
        "--backend",
        "host-gw",
        "--subnet-len",
        "26",
        "--force",
    ];
    ensure!(etcd_config(&etcd, &args)?.0 == 0);
    let v = get()?.context("gone")?;
    let parsed = subnet_manager::config::NetworkConfig::parse(v.as_bytes())?;
    ensure!(
        parsed.subnet_len == 26 && parsed.backend_type == "host-gw",
        "{v}"
    );
    // A whole config from a file, under another prefix; bad input refused before etcd.
    let file = dir.path().join("net.json");
    std::fs::write(
        &file,
        r#"{"Network":"10.60.0.0/16","Backend":{"Type":"udp","Port":8285}}"#,
    )?;
    let file_arg = file.to_string_lossy().into_owned();
    ensure!(etcd_config(&etcd, &["--file", &file_arg, "--prefix", "/other/net"])?.0 == 0);
    ensure!(etcd
        .get("/other/net/config")?
        .is_some_and(|v| v.contains("8285")));
    std::fs::write(&file, "{not json")?;
    let (code, err) = etcd_config(&etcd, &["--file", &file_arg, "--prefix", "/bad"])?;
    ensure!(code == 2 && err.contains("not valid JSON"), "{code} {err}");
    ensure!(etcd.get("/bad/config")?.is_none());
    ensure!(etcd_config(&etcd, &["--network", "10.0.0.0"])?.0 == 2);
    Ok(())
}

/// SIGSTOPs a process and SIGCONTs it when dropped (also when the test fails).
struct Paused(i32);

impl Paused {
    fn new(pid: u32) -> Result<Self> {
        let pid = i32::try_from(pid)?;
        // SAFETY: kill(2) on the etcd process this test started.
        ensure!(unsafe { libc::kill(pid, libc::SIGSTOP) } == 0, "SIGSTOP");
        Ok(Paused(pid))
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        // SAFETY: as in `new`.
        unsafe {
            libc::kill(self.0, libc::SIGCONT);
        }
    }
}

#[test]
fn readyz_follows_the_lease_healthz_the_process() -> Result<()> {
    require_root!();
    let mut c = Cluster::new(1)?;
    let ip = c.nodes[0].ip.clone();
    let addr: SocketAddr = format!("{ip}:9102").parse()?;
    c.start_daemon(
        0,
        &[
            &format!("--healthz-ip={ip}"),
            "--healthz-port=9102",
            "--subnet-lease-ttl=4s",
        ],
    )?;
    // Before any config (Flannel v0.28.9): /healthz 200 since the process answers, /readyz 503
    // and the reason, asked from another host as a kubelet would.
    let ul = c.underlay.clone();
    wait_until("healthz to answer", Duration::from_secs(10), || {
        http_get_at(&ul, addr, "/healthz").is_ok()
    })?;
    let (status, body) = http_get_at(&ul, addr, "/healthz")?;
    ensure!(status.contains("200") && body == "ok\n", "{status} {body}");
    let (status, body) = http_get_at(&ul, addr, "/readyz")?;
    ensure!(status.contains("503"), "{status}");
    ensure!(body.contains("no subnet lease yet"), "{body}");
    // --healthz-ip is honoured: nothing on loopback.
    ensure!(
        http_get(&c.nodes[0].ns, 9102, "/healthz").is_err(),
        "listening on 127.0.0.1 too"
    );

    c.put_config(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#)?;
    let ok =
        || http_get_at(&ul, addr, "/readyz").is_ok_and(|(s, b)| s.contains("200") && b == "ok\n");
    let took = wait_until("readyz 200", Duration::from_secs(15), ok)?;
    eprintln!("readyz turned 200 {took:?} after the config was written");

    // etcd hangs: the lease cannot be renewed, runs out, and readyz says so while /healthz
    // (the liveness probe) stays 200, so an etcd outage restarts nothing.
    let paused = Paused::new(c.etcd()?.pid().context("etcd pid")?)?;
    let paused_at = std::time::Instant::now();
    let mut last = (String::new(), String::new());
    wait_until(
        "readyz 503 while etcd hangs",
        Duration::from_secs(20),
        || match http_get_at(&ul, addr, "/readyz") {
            Ok(r) => {
                let bad = r.0.contains("503");
                last = r;
                bad
            }
            Err(_) => false,
        },
    )?;
    ensure!(
        last.1.contains("expired") || last.1.contains("no subnet lease"),
        "503 without a reason: {last:?}"
    );
    eprintln!("while etcd hangs: {} {}", last.0, last.1.trim());
    let (status, _) = http_get_at(&ul, addr, "/healthz")?;
    ensure!(
        status.contains("200"),
        "healthz during the outage: {status}"
    );
    let (_, metrics) = http_get_at(&ul, addr, "/metrics")?;
    ensure!(
        metric(&metrics, "flanneld_healthy") == Some(0.0),
        "{metrics}"
    );
    // Long enough for requests to time out (5 s) and be counted as etcd errors.
    std::thread::sleep(Duration::from_secs(7).saturating_sub(paused_at.elapsed()));
    drop(paused);
    let took = wait_until("readyz 200 after etcd is back", Duration::from_secs(30), ok)?;
    eprintln!("readyz 200 again {took:?} after etcd resumed");
    let (_, metrics) = http_get_at(&ul, addr, "/metrics")?;
    let errors = metric(&metrics, "flanneld_etcd_errors_total").unwrap_or(0.0);
    ensure!(
        errors >= 1.0,
        "the outage left no etcd errors counted:\n{metrics}"
    );
    Ok(())
}

/// `/metrics` through `prometheus_client.parser`: {family: {"type", "samples": [[name, labels, value]]}}.
fn scrape(ns: &str, port: u16) -> Result<Value> {
    let (status, body) = http_get(ns, port, "/metrics")?;
    ensure!(status.contains("200"), "{status}");
    python_json(
        "prometheus_client",
        "import json,sys\nfrom prometheus_client.parser import text_string_to_metric_families as f\n\
         print(json.dumps({m.name: {'type': m.type, 'samples': [[s.name, s.labels, s.value] for s in m.samples]} for m in f(sys.stdin.read())}))",
        &body,
    )
}

/// The samples of one family as (labels, value).
fn samples(
    families: &Value,
    family: &str,
    kind: &str,
) -> Result<Vec<(BTreeMap<String, String>, f64)>> {
    let f = families
        .get(family)
        .with_context(|| format!("no family {family} in {families}"))?;
    ensure!(
        f["type"] == kind,
        "{family} is a {}, not a {kind}",
        f["type"]
    );
    array_at(f, "/samples")?
        .iter()
        .map(|s| {
            let labels = serde_json::from_value(s[1].clone())?;
            let value = s[2]
                .as_f64()
                .with_context(|| format!("{family}: bad value {s}"))?;
            Ok((labels, value))
        })
        .collect()
}

fn only(families: &Value, family: &str, kind: &str) -> Result<f64> {
    let s = samples(families, family, kind)?;
    ensure!(s.len() == 1, "{family}: {s:?}");
    Ok(s[0].1)
}

fn by_label(families: &Value, family: &str, label: &str) -> Result<BTreeMap<String, f64>> {
    samples(families, family, "counter")?
        .into_iter()
        .map(|(l, v)| {
            Ok((
                l.get(label)
                    .cloned()
                    .with_context(|| format!("{family} without {label}"))?,
                v,
            ))
        })
        .collect()
}

#[test]
fn metrics_read_by_prometheus_client() -> Result<()> {
    require_root!();
    let mut c = Cluster::new(3)?;
    c.put_config(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#)?;
    for i in 0..3 {
        c.start_daemon(
            i,
            &[
                "--metrics-port=9101",
                "--healthz-port=9102",
                "--subnet-lease-ttl=6s",
            ],
        )?;
        c.wait_subnet_env(i, Duration::from_secs(20))?;
    }
    let pods: Vec<Pod> = (0..3).map(|i| c.add_pod(i)).collect::<Result<_>>()?;
    wait_until("the mesh", Duration::from_secs(10), || {
        c.ping_mesh(&pods).is_ok()
    })?;
    let (sent, received) = tcp_transfer(&pods[0].ns, &pods[1].ns, &pods[1].ip, 4 << 20)?;
    ensure!(sent == received, "transfer corrupted");
    let ns = c.nodes[0].ns.clone();
    wait_until("a renewal", Duration::from_secs(15), || {
        http_get(&ns, 9101, "/metrics")
            .ok()
            .and_then(|(_, b)| metric(&b, "flanneld_lease_renewals_total"))
            .is_some_and(|v| v >= 1.0)
    })?;

    let m = scrape(&ns, 9101)?;
    let build = samples(&m, "flanneld_build_info", "gauge")?;
    ensure!(
        build.len() == 1
            && build[0].0.get("version").map(String::as_str) == Some(VERSION)
            && build[0].0.get("backend").map(String::as_str) == Some("udp")
            && build[0].1 == 1.0,
        "{build:?}"
    );
    let lease = samples(&m, "flanneld_lease_info", "gauge")?;
    let key = c.lease_subnet(0)?.replace('/', "-");
    ensure!(
        lease.len() == 1 && lease[0].0.get("subnet") == Some(&key),
        "lease {lease:?}, subnet.env says {key}"
    );
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
    let expiry = only(&m, "flanneld_lease_expiry_timestamp_seconds", "gauge")?;
    ensure!(
        expiry > now && expiry <= now + 7.0,
        "expiry {expiry}, now {now}"
    );
    ensure!(only(&m, "flanneld_peers", "gauge")? == 2.0, "peers");
    ensure!(only(&m, "flanneld_healthy", "gauge")? == 1.0, "healthy");
    ensure!(
        only(&m, "flanneld_lease_renewals", "counter")? >= 1.0,
        "renewals"
    );
    for family in [
        "flanneld_etcd_errors",
        "flanneld_etcd_watch_restarts",
        "flanneld_malformed_leases",
    ] {
        ensure!(only(&m, family, "counter")? >= 0.0, "{family}");
    }
    let packets = by_label(&m, "flanneld_datapath_packets", "direction")?;
    let bytes = by_label(&m, "flanneld_datapath_bytes", "direction")?;
    let calls = by_label(&m, "flanneld_datapath_syscalls", "direction")?;
    for dir in ["tx", "rx"] {
        let get = |m: &BTreeMap<String, f64>| m.get(dir).copied().unwrap_or(0.0);
        let (p, b, s) = (get(&packets), get(&bytes), get(&calls));
        // Every packet has at least an IPv4 header; a receive call may return nothing.
        ensure!(
            p > 0.0 && b >= p * 20.0 && s > 0.0,
            "{dir}: {p} packets, {b} bytes, {s} syscalls"
        );
        eprintln!(
            "n1 {dir}: {p} packets, {b} bytes, {s} syscalls ({:.1} packets per syscall)",
            p / s
        );
    }
    ensure!(
        bytes.get("tx").copied().unwrap_or(0.0) >= f64::from(4u32 << 20),
        "tx bytes < the 4 MiB sent"
    );
    let drops = by_label(&m, "flanneld_datapath_drops", "reason")?;
    for reason in [
        "unknown_sender",
        "spoofed_source",
        "not_for_us",
        "malformed",
    ] {
        ensure!(
            drops.contains_key(reason),
            "no drop reason {reason}: {drops:?}"
        );
    }
    // The healthz port serves the same exposition.
    let h = scrape(&ns, 9102)?;
    ensure!(
        h.get("flanneld_build_info").is_some(),
        "healthz port /metrics"
    );
    eprintln!(
        "{} metric families parsed by prometheus_client",
        m.as_object().map_or(0, |o| o.len())
    );
    Ok(())
}

/// Starts flanneld-rs in node `i` through `env -u RUST_LOG` (so only `-v` and `envs` decide the
/// log level, whatever the test runner's environment holds).
fn start_logged(c: &mut Cluster, i: usize, extra: &[&str], envs: &[(&str, &str)]) -> Result<()> {
    let mut args = vec!["-u".to_string(), "RUST_LOG".to_string()];
    for (k, v) in envs {
        args.push(format!("{k}={v}"));
    }
    args.push(binary("flanneld-rs")?.display().to_string());
    args.extend(c.daemon_args(i, extra));
    c.start_program(i, Path::new("/usr/bin/env"), &args, &[])
}

fn log_lines(c: &Cluster, i: usize) -> Vec<String> {
    std::fs::read_to_string(c.nodes[i].dir.join("daemon.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn logs_one_line_per_lifecycle_event() -> Result<()> {
    require_root!();
    let mut c = Cluster::new(2)?;
    c.put_config(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#)?;
    start_logged(&mut c, 0, &["--metrics-port=9101"], &[])?;
    c.wait_subnet_env(0, Duration::from_secs(20))?;
    start_logged(&mut c, 1, &["-v=2"], &[])?;
    c.wait_subnet_env(1, Duration::from_secs(20))?;
    let pods: Vec<Pod> = (0..2).map(|i| c.add_pod(i)).collect::<Result<_>>()?;
    wait_until(
        "the pods to reach each other",
        Duration::from_secs(10),
        || c.ping(&pods[0], &pods[1].ip, 1).is_ok(),
    )?;
    wait_until("n1 to log its peer", Duration::from_secs(5), || {
        log_lines(&c, 0).iter().any(|l| l.contains("peer added"))
    })?;
    // The first health probe answered is an event too (within one 5 s probe interval).
    wait_until(
        "n1 to log its peer's path up",
        Duration::from_secs(10),
        || log_lines(&c, 0).iter().any(|l| l.contains("peer path up")),
    )?;
    let start = log_lines(&c, 0);
    for event in [
        "flanneld-rs starting",
        "using interface",
        "network config loaded",
        "acquired a new lease",
        "datapath running",
        "wrote subnet.env",
        "traffic rules installed",
        "peer added",
        "peer path up",
    ] {
        let n = start.iter().filter(|l| l.contains(event)).count();
        ensure!(n == 1, "{n} lines for {event:?}:\n{}", start.join("\n"));
    }
    ensure!(
        start
            .iter()
            .all(|l| !l.contains("DEBUG") && !l.contains("TRACE")),
        "debug output at the default level:\n{}",
        start.join("\n")
    );
    ensure!(
        start.len() <= 18,
        "{} lines to start:\n{}",
        start.len(),
        start.join("\n")
    );

    // 20 MB and 200 pings through the datapath add no line at the default level.
    tcp_transfer(&pods[0].ns, &pods[1].ns, &pods[1].ip, 20 << 20)?;
    c.ping(&pods[0], &pods[1].ip, 200)?;
    let after = log_lines(&c, 0);
    eprintln!(
        "n1: {} lines to start, {} more during 20 MB + 200 pings",
        start.len(),
        after.len().saturating_sub(start.len())
    );
    ensure!(
        after.len() == start.len(),
        "traffic was logged:\n{}",
        after[start.len()..].join("\n")
    );
    // -v=2 raises the detail.
    let debug = log_lines(&c, 1)
        .iter()
        .filter(|l| l.contains("DEBUG"))
        .count();
    ensure!(debug > 0, "-v=2 logged no debug line");

    // A peer that goes away: one line.
    c.stop_daemon(1);
    let key2 = c.lease_subnet(1)?.replace('/', "-");
    c.etcd()?
        .ctl(&["del", &format!("{ETCD_PREFIX}/subnets/{key2}")])?;
    wait_until("n1 to log the removal", Duration::from_secs(5), || {
        log_lines(&c, 0).iter().any(|l| l.contains("peer removed"))
    })?;

    // A restart takes our lease back, and every renewal is one line.
    c.stop_daemon(0);
    let before = log_lines(&c, 0).len();
    start_logged(
        &mut c,
        0,
        &["--metrics-port=9101", "--subnet-lease-ttl=4s"],
        &[],
    )?;
    let ns = c.nodes[0].ns.clone();
    wait_until("three renewals", Duration::from_secs(15), || {
        http_get(&ns, 9101, "/metrics")
            .ok()
            .and_then(|(_, b)| metric(&b, "flanneld_lease_renewals_total"))
            .is_some_and(|v| v >= 3.0)
    })?;
    let (_, body) = http_get(&ns, 9101, "/metrics")?;
    let renewals = metric(&body, "flanneld_lease_renewals_total").context("no renewals")?;
    let lines = log_lines(&c, 0)[before..].to_vec();
    let logged = lines.iter().filter(|l| l.contains("lease renewed")).count();
    ensure!(
        (logged as f64 - renewals).abs() <= 1.0,
        "{logged} renewal lines for {renewals} renewals"
    );
    ensure!(
        lines
            .iter()
            .any(|l| l.contains("reusing our existing lease")),
        "restart: {}",
        lines.join("\n")
    );

    // RUST_LOG wins over -v.
    let before = log_lines(&c, 1).len();
    start_logged(&mut c, 1, &["-v=2"], &[("RUST_LOG", "warn")])?;
    // It runs (its deleted lease is back) and said nothing below WARN on the way.
    wait_until("n2 to lease again", Duration::from_secs(20), || {
        c.leases().is_ok_and(|l| l.len() == 2)
    })?;
    let lines = log_lines(&c, 1)[before..].to_vec();
    ensure!(
        lines
            .iter()
            .all(|l| !l.contains("INFO") && !l.contains("DEBUG")),
        "RUST_LOG=warn with -v=2:\n{}",
        lines.join("\n")
    );
    Ok(())
}
