//! Whole invocations of the plugin against shell-script delegates in temp dirs: no root needed.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

use super::args::Environment;
use super::commands::Options;
use super::{run, Reply};

const SUBNET_ENV: &str = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\n\
                          FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n";

/// Writes an executable shell script `name` into `dir`.
pub(crate) fn script(dir: &Path, name: &str, body: &str) {
    let path = dir.join(name);
    fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
}

const OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";

/// A stand-in for the daemon's API socket: a thread that records each request and answers it
/// with `answer` (raw HTTP), or, when silent, holds the connection without a word.
pub(crate) struct FakeDaemon {
    pub socket: PathBuf,
    answer: Arc<Mutex<Option<String>>>,
    requests: Arc<Mutex<Vec<String>>>,
    _dir: Option<tempfile::TempDir>,
}

impl FakeDaemon {
    /// In a temp dir of its own.
    pub fn start(answer: &str) -> FakeDaemon {
        let dir = tempfile::tempdir().unwrap();
        let mut daemon = FakeDaemon::serve(dir.path().join("flanneld-rs.sock"), Some(answer));
        daemon._dir = Some(dir);
        daemon
    }

    pub fn silent() -> FakeDaemon {
        let daemon = FakeDaemon::start("");
        daemon.silence();
        daemon
    }

    /// At `socket`, in a directory someone else keeps.
    pub fn serve(socket: PathBuf, answer: Option<&str>) -> FakeDaemon {
        let listener = UnixListener::bind(&socket).unwrap();
        let daemon = FakeDaemon {
            socket,
            answer: Arc::new(Mutex::new(answer.map(str::to_string))),
            requests: Arc::default(),
            _dir: None,
        };
        let (answer, requests) = (daemon.answer.clone(), daemon.requests.clone());
        // Lives until the test process ends: blocked in accept, it costs nothing.
        thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let request = read_request(&mut stream);
                requests.lock().unwrap().push(request);
                match answer.lock().unwrap().clone() {
                    Some(a) => {
                        let _ = stream.write_all(a.as_bytes());
                    }
                    None => {
                        thread::spawn(move || {
                            thread::sleep(Duration::from_secs(5));
                            drop(stream);
                        });
                    }
                }
            }
        });
        daemon
    }

    pub fn answer(&self, answer: &str) {
        *self.answer.lock().unwrap() = Some(answer.to_string());
    }

    pub fn silence(&self) {
        *self.answer.lock().unwrap() = None;
    }

    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// One request: headers, then Content-Length bytes of body (or up to EOF).
fn read_request(stream: &mut UnixStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .map_or(0, |n| n.parse().unwrap());
            if buf.len() >= end + 4 + len {
                return text;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&buf).to_string(),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A node: temp dir with subnet.env, dataDir, a plugin dir and a log of delegate calls.
/// The daemon's socket is beside subnet.env, answering 200 to everything.
struct Node {
    dir: tempfile::TempDir,
    daemon: FakeDaemon,
}

impl Node {
    fn new() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let daemon = FakeDaemon::serve(dir.path().join("flanneld-rs.sock"), Some(OK));
        let node = Node { dir, daemon };
        fs::create_dir(node.p("bin")).unwrap();
        fs::write(node.p("subnet.env"), SUBNET_ENV).unwrap();
        node
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A delegate that logs "COMMAND <stdin>" and then runs `then` (shell).
    fn delegate(&self, name: &str, then: &str) {
        let log = self.p("log").display().to_string();
        let body = format!("printf '%s %s\\n' \"$CNI_COMMAND\" \"$(cat)\" >> {log}\n{then}");
        script(&self.p("bin"), name, &body);
    }

    fn calls(&self) -> Vec<(String, Value)> {
        fs::read_to_string(self.p("log"))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let (cmd, conf) = l.split_once(' ').unwrap();
                (cmd.to_string(), serde_json::from_str(conf).unwrap())
            })
            .collect()
    }

    fn conf(&self, extra: Value) -> String {
        let mut conf = json!({
            "cniVersion": "1.0.0", "name": "cbr0", "type": "flannel",
            "subnetFile": self.p("subnet.env"), "dataDir": self.p("data"),
            "delegate": {"type": "fake", "hairpinMode": true},
        });
        for (k, v) in extra.as_object().unwrap() {
            conf[k] = v.clone();
        }
        conf.to_string()
    }

    fn env(&self, command: &str) -> Vec<(String, String)> {
        vec![
            ("CNI_COMMAND".into(), command.into()),
            ("CNI_CONTAINERID".into(), "ctr1".into()),
            ("CNI_NETNS".into(), "/var/run/netns/pod".into()),
            ("CNI_IFNAME".into(), "eth0".into()),
            (
                "CNI_PATH".into(),
                format!("/nonexistent:{}", self.p("bin").display()),
            ),
            ("PATH".into(), std::env::var("PATH").unwrap_or_default()),
        ]
    }

    fn run_with(&self, env: Vec<(String, String)>, stdin: &str) -> Reply {
        let opts = Options {
            subnet_env_wait: Duration::from_millis(300),
            subnet_env_poll: Duration::from_millis(20),
            daemon_timeout: Duration::from_millis(500),
        };
        run(&Environment::from_pairs(env), &mut stdin.as_bytes(), &opts)
    }

    fn run(&self, command: &str, stdin: &str) -> Reply {
        self.run_with(self.env(command), stdin)
    }

    fn saved(&self) -> Option<Value> {
        let bytes = fs::read(self.p("data/ctr1")).ok()?;
        Some(serde_json::from_slice(&bytes).unwrap())
    }
}

fn stdout_json(r: &Reply) -> Value {
    serde_json::from_slice(&r.stdout).unwrap_or_else(|e| panic!("{e}: {r:?}"))
}

const RESULT: &str = r#"{"cniVersion":"1.0.0","ips":[{"address":"10.244.3.2/24"}]}"#;

#[test]
fn add_saves_config_runs_delegate_and_relays_result() {
    let node = Node::new();
    node.delegate("fake", &format!("echo '{RESULT}'"));
    let r = node.run("ADD", &node.conf(json!({})));
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert_eq!(
        r.stdout,
        format!("{RESULT}\n").into_bytes(),
        "relayed unchanged"
    );

    let calls = node.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].0, "ADD");
    let saved = node.saved().unwrap();
    assert_eq!(
        calls[0].1, saved,
        "the delegate got exactly the saved config"
    );
    assert_eq!(saved["name"], "cbr0");
    assert_eq!(saved["hairpinMode"], true);
    assert_eq!(saved["ipMasq"], true);
    assert_eq!(saved["mtu"], 1450);
    assert_eq!(
        saved["ipam"]["ranges"],
        json!([[{"subnet": "10.244.3.0/24"}]])
    );
}

#[test]
fn del_uses_saved_config_and_is_idempotent() {
    let node = Node::new();
    node.delegate("fake", &format!("echo '{RESULT}'"));
    assert_eq!(node.run("ADD", &node.conf(json!({}))).exit_code, 0);
    let saved = node.saved().unwrap();

    // A changed subnet.env or config must not change what DEL undoes.
    fs::remove_file(node.p("subnet.env")).unwrap();
    let conf = node.conf(json!({"delegate": {"type": "other"}}));
    let r = node.run("DEL", &conf);
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert!(r.stdout.is_empty());
    assert_eq!(node.calls()[1], ("DEL".to_string(), saved));
    assert!(node.saved().is_none());

    let r = node.run("DEL", &conf);
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert_eq!(
        node.calls().len(),
        2,
        "no delegate call without saved config"
    );
}

#[test]
fn del_without_netns_is_fine() {
    let node = Node::new();
    node.delegate("fake", "exit 0");
    let env: Vec<_> = node
        .env("DEL")
        .into_iter()
        .filter(|(k, _)| k != "CNI_NETNS")
        .collect();
    assert_eq!(node.run_with(env, &node.conf(json!({}))).exit_code, 0);
}

#[test]
fn failed_delegate_del_still_removes_saved_config() {
    let node = Node::new();
    let err = r#"{"cniVersion":"1.0.0","code":11,"msg":"busy"}"#;
    node.delegate(
        "fake",
        &format!("[ \"$CNI_COMMAND\" = ADD ] && echo '{RESULT}' && exit 0\necho '{err}'; exit 1"),
    );
    assert_eq!(node.run("ADD", &node.conf(json!({}))).exit_code, 0);
    let r = node.run("DEL", &node.conf(json!({})));
    assert_eq!(r.exit_code, 1, "{r:?}");
    assert_eq!(
        r.stdout,
        format!("{err}\n").into_bytes(),
        "the delegate's error, unchanged"
    );
    assert!(node.saved().is_none());

    // The runtime's retry finds nothing to undo and succeeds without the delegate.
    let r = node.run("DEL", &node.conf(json!({})));
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert_eq!(node.calls().len(), 2);
}

#[test]
fn del_with_delegate_gone_from_cni_path_removes_saved_config() {
    let node = Node::new();
    node.delegate("fake", &format!("echo '{RESULT}'"));
    assert_eq!(node.run("ADD", &node.conf(json!({}))).exit_code, 0);
    fs::remove_file(node.p("bin/fake")).unwrap();
    let r = node.run("DEL", &node.conf(json!({})));
    assert_eq!(r.exit_code, 1);
    let out = stdout_json(&r);
    assert_eq!(out["code"], 999);
    assert!(out["msg"]
        .as_str()
        .unwrap()
        .contains("failed to find plugin \"fake\""));
    assert!(node.saved().is_none());
}

#[test]
fn cni_1_1_0_add_and_del() {
    let node = Node::new();
    node.delegate("fake", &format!("echo '{RESULT}'"));
    let conf = node.conf(json!({"cniVersion": "1.1.0"}));
    let r = node.run("ADD", &conf);
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert_eq!(node.saved().unwrap()["cniVersion"], "1.1.0");
    assert_eq!(node.run("CHECK", &conf).exit_code, 0);
    assert_eq!(node.run("DEL", &conf).exit_code, 0);
    let calls = node.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].1["cniVersion"], "1.1.0");
}

/// The environment libcni gives GC and STATUS: no container, netns or interface.
fn network_env(node: &Node, command: &str) -> Vec<(String, String)> {
    vec![
        ("CNI_COMMAND".into(), command.into()),
        ("CNI_PATH".into(), node.p("bin").display().to_string()),
    ]
}

#[test]
fn gc_and_status_succeed_silently_and_touch_nothing() {
    let node = Node::new();
    node.delegate("fake", &format!("echo '{RESULT}'"));
    assert_eq!(node.run("ADD", &node.conf(json!({}))).exit_code, 0);
    let saved = node.saved().unwrap();
    // Not needed by either.
    fs::remove_file(node.p("subnet.env")).unwrap();

    let gc = node.conf(json!({
        "cniVersion": "1.1.0",
        "cni.dev/valid-attachments": [{"containerID": "other", "ifname": "eth0"}],
    }));
    let status = node.conf(json!({"cniVersion": "1.1.0"}));
    for (command, conf) in [("GC", &gc), ("STATUS", &status)] {
        let r = node.run_with(network_env(&node, command), conf);
        assert_eq!(r.exit_code, 0, "{command}: {r:?}");
        assert!(r.stdout.is_empty(), "{command}: {r:?}");
        // A runtime may pass container variables along; they do not matter.
        let r = node.run(command, conf);
        assert_eq!(r.exit_code, 0, "{command}: {r:?}");
        assert!(r.stdout.is_empty(), "{command}: {r:?}");
    }
    assert_eq!(node.calls().len(), 1, "no delegate runs");
    assert_eq!(node.saved().unwrap(), saved);
}

#[test]
fn gc_and_status_are_refused_below_1_1_0() {
    let node = Node::new();
    for command in ["GC", "STATUS"] {
        for version in ["0.3.1", "0.4.0", "1.0.0"] {
            let conf = node.conf(json!({"cniVersion": version}));
            let r = node.run_with(network_env(&node, command), &conf);
            assert_eq!(r.exit_code, 1, "{command} {version}");
            let out = stdout_json(&r);
            assert_eq!(out["code"], 1, "{command} {version}: {out}");
            assert_eq!(
                out["msg"],
                format!("config version does not allow {command}")
            );
            assert_eq!(out["cniVersion"], version);
        }
        // No cniVersion is 0.1.0, which had neither.
        let conf = json!({"name": "cbr0", "type": "flannel"}).to_string();
        let r = node.run_with(network_env(&node, command), &conf);
        assert_eq!(stdout_json(&r)["code"], 1, "{command}");

        let env = vec![("CNI_COMMAND".to_string(), command.to_string())];
        let r = node.run_with(env, &node.conf(json!({"cniVersion": "1.1.0"})));
        let out = stdout_json(&r);
        assert_eq!(out["code"], 4, "{command}: {out}");
        assert_eq!(out["msg"], "required env variables [CNI_PATH] missing");
    }
}

#[test]
fn failed_add_cleans_up_and_passes_delegate_error_through() {
    let node = Node::new();
    let err = r#"{"cniVersion":"1.0.0","code":11,"msg":"busy","details":"d"}"#;
    node.delegate(
        "fake",
        &format!("[ \"$CNI_COMMAND\" = ADD ] && echo '{err}' && exit 1\nexit 0"),
    );
    let r = node.run("ADD", &node.conf(json!({})));
    assert_eq!(r.exit_code, 1);
    assert_eq!(r.stdout, format!("{err}\n").into_bytes());
    let calls = node.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].0, "DEL");
    assert_eq!(calls[0].1, calls[1].1);
    assert!(node.saved().is_none());
}

#[test]
fn add_with_missing_delegate_saves_nothing() {
    let node = Node::new();
    let r = node.run("ADD", &node.conf(json!({"delegate": {"type": "bridge"}})));
    assert_eq!(r.exit_code, 1);
    let out = stdout_json(&r);
    assert_eq!(out["code"], 999);
    assert!(out["msg"]
        .as_str()
        .unwrap()
        .contains("failed to find plugin \"bridge\""));
    assert!(node.saved().is_none());
}

#[test]
fn add_waits_for_subnet_env_then_gives_up_with_code_11() {
    let node = Node::new();
    node.delegate("fake", &format!("echo '{RESULT}'"));
    fs::remove_file(node.p("subnet.env")).unwrap();
    let r = node.run("ADD", &node.conf(json!({"cniVersion": "0.3.1"})));
    assert_eq!(r.exit_code, 1);
    let out = stdout_json(&r);
    assert_eq!(out["code"], 11);
    assert_eq!(out["cniVersion"], "0.3.1");
    let msg = out["msg"].as_str().unwrap();
    assert!(
        msg.contains(&*node.p("subnet.env").to_string_lossy()),
        "{msg}"
    );
    assert!(node.calls().is_empty());

    // It appears while ADD waits: ADD succeeds.
    let path = node.p("subnet.env");
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        fs::write(path, SUBNET_ENV).unwrap();
    });
    let r = node.run("ADD", &node.conf(json!({})));
    writer.join().unwrap();
    assert_eq!(r.exit_code, 0, "{r:?}");
}

#[test]
fn invalid_subnet_env_fails_at_once_naming_file_and_line() {
    let node = Node::new();
    fs::write(node.p("subnet.env"), SUBNET_ENV.replace("1450", "lots")).unwrap();
    let r = node.run("ADD", &node.conf(json!({})));
    let out = stdout_json(&r);
    assert_eq!(out["code"], 999);
    let msg = out["msg"].as_str().unwrap();
    assert!(
        msg.contains("line 3") && msg.contains("FLANNEL_MTU"),
        "{msg}"
    );
}

#[test]
fn unusable_mtu_fails_add_before_the_delegate_runs() {
    for bad in ["0", "4294967295"] {
        let node = Node::new();
        node.delegate("fake", &format!("echo '{RESULT}'"));
        fs::write(node.p("subnet.env"), SUBNET_ENV.replace("1450", bad)).unwrap();
        let r = node.run("ADD", &node.conf(json!({})));
        assert_eq!(r.exit_code, 1, "{bad}: {r:?}");
        let msg = stdout_json(&r)["msg"].as_str().unwrap().to_string();
        assert!(
            msg.contains("FLANNEL_MTU") && msg.contains("68..=65535"),
            "{msg}"
        );
        assert!(node.calls().is_empty(), "the bridge never sees MTU {bad}");
        assert!(node.saved().is_none());
    }
}

#[test]
fn check_verifies_our_state_without_the_delegate() {
    let node = Node::new();
    node.delegate("fake", &format!("echo '{RESULT}'"));
    let r = node.run("CHECK", &node.conf(json!({})));
    assert_eq!(r.exit_code, 1, "no saved config");
    assert!(stdout_json(&r)["msg"]
        .as_str()
        .unwrap()
        .contains("no saved delegate config"));

    assert_eq!(node.run("ADD", &node.conf(json!({}))).exit_code, 0);
    let calls = node.calls().len();
    let prev: Value = serde_json::from_str(RESULT).unwrap();
    let r = node.run("CHECK", &node.conf(json!({"prevResult": prev})));
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert_eq!(
        node.calls().len(),
        calls,
        "CHECK must not run the delegate (bridge 1.1 fails it)"
    );

    let r = node.run("CHECK", &node.conf(json!({"cniVersion": "0.3.1"})));
    assert_eq!(stdout_json(&r)["code"], 1);
}

#[test]
fn version_and_about() {
    let node = Node::new();
    let r = node.run_with(vec![("CNI_COMMAND".into(), "VERSION".into())], "");
    assert_eq!(
        String::from_utf8(r.stdout).unwrap(),
        "{\"cniVersion\":\"1.1.0\",\"supportedVersions\":[\"0.1.0\",\"0.2.0\",\"0.3.0\",\
         \"0.3.1\",\"0.4.0\",\"1.0.0\",\"1.1.0\"]}\n"
    );
    let r = node.run_with(vec![], "");
    assert_eq!(r.exit_code, 0);
    assert!(r.stdout.is_empty());
    assert!(
        r.stderr
            .contains("CNI protocol versions supported: 0.1.0, ")
            && r.stderr.contains("1.1.0"),
        "{}",
        r.stderr
    );
}

#[test]
fn bad_input_gives_error_json_never_a_panic() {
    let node = Node::new();
    type Case = (Vec<(String, String)>, String, u64);
    let cases: Vec<Case> = vec![
        (node.env("NOPE"), node.conf(json!({})), 4),
        (
            vec![("CNI_COMMAND".into(), "ADD".into())],
            node.conf(json!({})),
            4,
        ),
        (node.env("ADD"), "{\"cniVersion\":".into(), 6),
        (node.env("ADD"), "\u{0}\u{1}".into(), 6),
        (node.env("ADD"), "[]".into(), 7),
        (node.env("ADD"), node.conf(json!({"name": null})), 7),
        (
            node.env("ADD"),
            node.conf(json!({"cniVersion": "2.0.0"})),
            1,
        ),
        (
            node.env("ADD"),
            node.conf(json!({"delegate": {"name": "x"}})),
            7,
        ),
        (
            node.env("ADD"),
            node.conf(json!({"ipam": {"routes": 5}})),
            7,
        ),
        (
            node.env("ADD"),
            node.conf(json!({"delegate": {"type": "../x"}})),
            7,
        ),
    ];
    for (env, stdin, code) in cases {
        let r = node.run_with(env, &stdin);
        assert_eq!(r.exit_code, 1, "{stdin}");
        let out = stdout_json(&r);
        assert_eq!(out["code"], code, "{stdin}: {out}");
        assert!(out["cniVersion"].is_string());
    }
    let mut env = node.env("ADD");
    env.push(("CNI_CONTAINERID".into(), "../../etc".into()));
    let r = node.run_with(env, &node.conf(json!({})));
    let out = stdout_json(&r);
    assert_eq!(out["code"], 4);
    assert_eq!(out["details"], "../../etc");
}

const POD_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=db-0;\
                        K8S_POD_INFRA_CONTAINER_ID=ctr1";

impl Node {
    fn pod_env(&self, command: &str) -> Vec<(String, String)> {
        let mut env = self.env(command);
        env.push(("CNI_ARGS".into(), POD_ARGS.into()));
        env
    }

    /// The body of each request the daemon got, by request line.
    fn daemon_requests(&self) -> Vec<(String, String)> {
        self.daemon
            .requests()
            .iter()
            .map(|r| {
                let line = r.lines().next().unwrap_or_default().to_string();
                let body = r.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
                (line, body.unwrap_or_default())
            })
            .collect()
    }

    fn gone(&self) -> Vec<String> {
        let Ok(dir) = fs::read_dir(self.p("flanneld-rs-gone")) else {
            return Vec::new();
        };
        let mut names: Vec<_> = dir
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        names
    }
}

#[test]
fn add_hands_the_pod_record_to_the_daemon() {
    let node = Node::new();
    let result =
        r#"{"cniVersion":"1.0.0","ips":[{"address":"fd00:3::2/64"},{"address":"10.244.3.2/24"}]}"#;
    node.delegate("fake", &format!("echo '{result}'"));
    let conf = node.conf(json!({"args": {"cni": {
        "labels": [{"key": "app", "value": "db"}],
        "ports": [{"name": "pg", "containerPort": 5432}],
    }}}));
    let r = node.run_with(node.pod_env("ADD"), &conf);
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert_eq!(
        r.stdout,
        format!("{result}\n").into_bytes(),
        "relayed unchanged"
    );

    let requests = node.daemon_requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].0, "PUT /v1/pods/prod/db-0 HTTP/1.1");
    let record: Value = serde_json::from_str(&requests[0].1).unwrap();
    assert_eq!(
        record,
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "db-0", "namespace": "prod", "labels": {"app": "db"},
                         "annotations": {"flanneld-rs.io/container-id": "ctr1"}},
            "spec": {"containers": [{"name": "main", "ports": [
                {"name": "pg", "containerPort": 5432, "protocol": "TCP"}]}]},
            "status": {"podIP": "10.244.3.2",
                       "podIPs": [{"ip": "10.244.3.2"}, {"ip": "fd00:3::2"}]}})
    );
    assert!(node.calls().iter().all(|(_, c)| c.get("args").is_none()));
}

#[test]
fn add_without_k8s_args_names_the_pod_after_the_container() {
    let node = Node::new();
    let result = r#"{"cniVersion":"0.2.0","ip4":{"ip":"10.244.3.7/24"}}"#;
    node.delegate("fake", &format!("echo '{result}'"));
    let r = node.run("ADD", &node.conf(json!({"cniVersion": "0.2.0"})));
    assert_eq!(r.exit_code, 0, "{r:?}");
    let requests = node.daemon_requests();
    assert_eq!(requests[0].0, "PUT /v1/pods/default/ctr1 HTTP/1.1");
    let record: Value = serde_json::from_str(&requests[0].1).unwrap();
    assert_eq!(record["status"]["podIP"], "10.244.3.7");
    assert_eq!(record["metadata"]["labels"], json!({}));
}

/// Every hand-over failure undoes the delegate as a failed delegate ADD does.
#[test]
fn failed_hand_over_undoes_the_delegate() {
    let refused = "HTTP/1.1 400 Bad Request\r\nContent-Length: 19\r\n\r\nlabel key invalid\r\n";
    let cases: [(&str, Option<&str>, u64, &str); 2] = [
        (
            "refused",
            Some(refused),
            999,
            "refused pod prod/db-0: HTTP 400: label key invalid",
        ),
        (
            "silent",
            None,
            11,
            "no answer within 500 ms (try again later)",
        ),
    ];
    for (case, answer, code, needle) in cases {
        let node = Node::new();
        node.delegate("fake", &format!("echo '{RESULT}'"));
        match answer {
            Some(a) => node.daemon.answer(a),
            None => node.daemon.silence(),
        }
        let r = node.run_with(node.pod_env("ADD"), &node.conf(json!({})));
        assert_eq!(r.exit_code, 1, "{case}: {r:?}");
        let out = stdout_json(&r);
        assert_eq!(out["code"], code, "{case}: {out}");
        let msg = out["msg"].as_str().unwrap();
        assert!(msg.contains(needle), "{case}: {msg}");
        assert!(
            msg.contains(&*node.p("flanneld-rs.sock").to_string_lossy()),
            "{case}: {msg}"
        );
        let calls = node.calls();
        let commands: Vec<_> = calls.iter().map(|(c, _)| c.as_str()).collect();
        assert_eq!(commands, ["ADD", "DEL"], "{case}");
        assert_eq!(calls[0].1, calls[1].1, "{case}");
        assert!(node.saved().is_none(), "{case}");
    }
}

#[test]
fn add_without_a_daemon_leaves_the_record_pending() {
    let node = Node::new();
    node.delegate("fake", &format!("echo '{RESULT}'"));
    // A daemon that cannot publish (503: etcd away) is no daemon for the pod's sake.
    node.daemon.answer("HTTP/1.1 503 Busy\r\n\r\n");
    let r = node.run_with(node.pod_env("ADD"), &node.conf(json!({})));
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert_eq!(
        fs::read_dir(node.p("flanneld-rs-pending")).unwrap().count(),
        1
    );
    let r = node.run_with(node.pod_env("DEL"), &node.conf(json!({})));
    assert_eq!(r.exit_code, 0, "{r:?}");
    // And with no socket at all.
    fs::remove_file(node.p("flanneld-rs.sock")).unwrap();
    let r = node.run_with(node.pod_env("ADD"), &node.conf(json!({})));
    assert_eq!(r.exit_code, 0, "{r:?}");
    let pending: Vec<_> = fs::read_dir(node.p("flanneld-rs-pending"))
        .unwrap()
        .collect();
    assert_eq!(pending.len(), 1);
    let r = node.run_with(node.pod_env("DEL"), &node.conf(json!({})));
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert_eq!(
        fs::read_dir(node.p("flanneld-rs-pending")).unwrap().count(),
        0
    );
}

#[test]
fn add_fails_without_a_pod_ip_and_undoes_the_delegate() {
    let node = Node::new();
    node.delegate("fake", "echo '{\"cniVersion\":\"1.0.0\",\"ips\":[]}'");
    let r = node.run("ADD", &node.conf(json!({})));
    assert_eq!(r.exit_code, 1, "{r:?}");
    let out = stdout_json(&r);
    assert_eq!(out["code"], 999);
    assert_eq!(
        out["msg"],
        "delegate plugin fake ADD result has no usable pod IP: it names no IP address"
    );
    assert_eq!(node.calls().len(), 2);
    assert!(node.saved().is_none());
    assert!(node.daemon_requests().is_empty());
}

#[test]
fn bad_pod_description_fails_add_before_the_delegate_runs() {
    let node = Node::new();
    node.delegate("fake", &format!("echo '{RESULT}'"));
    let conf = node.conf(json!({"args": {"cni": {"labels": {"app": "db"}}}}));
    let out = stdout_json(&node.run("ADD", &conf));
    assert_eq!(out["code"], 7);
    assert!(out["msg"]
        .as_str()
        .unwrap()
        .contains("args.cni.labels must be an array"));

    let mut env = node.env("ADD");
    env.push(("CNI_ARGS".into(), "K8S_POD_NAMESPACE=a/b".into()));
    let out = stdout_json(&node.run_with(env, &node.conf(json!({}))));
    assert_eq!(out["code"], 7, "{out}");
    assert!(node.calls().is_empty());
    assert!(node.saved().is_none());
    // DEL does not read args.cni: a bad one never blocks a teardown.
    assert_eq!(node.run("DEL", &conf).exit_code, 0);
}

#[test]
fn del_takes_the_record_back() {
    let node = Node::new();
    node.delegate("fake", &format!("echo '{RESULT}'"));
    assert_eq!(
        node.run_with(node.pod_env("ADD"), &node.conf(json!({})))
            .exit_code,
        0
    );
    let r = node.run_with(node.pod_env("DEL"), &node.conf(json!({})));
    assert_eq!(r.exit_code, 0, "{r:?}");
    let requests = node.daemon_requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(
        requests[1],
        (
            "DELETE /v1/pods/prod/db-0?containerID=ctr1 HTTP/1.1".into(),
            String::new()
        )
    );

    // Gone already (404), and no saved config: still fine, still asked.
    node.daemon.answer("HTTP/1.1 404 Not Found\r\n\r\n");
    let r = node.run_with(node.pod_env("DEL"), &node.conf(json!({})));
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert_eq!(node.daemon_requests().len(), 3);
    assert!(node.gone().is_empty());
}

#[test]
fn del_leaves_a_tombstone_when_the_daemon_cannot_be_told() {
    let node = Node::new();
    node.delegate("fake", &format!("echo '{RESULT}'"));
    assert_eq!(
        node.run_with(node.pod_env("ADD"), &node.conf(json!({})))
            .exit_code,
        0
    );
    fs::remove_file(node.p("flanneld-rs.sock")).unwrap();
    let r = node.run_with(node.pod_env("DEL"), &node.conf(json!({})));
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert!(r.stdout.is_empty());
    assert_eq!(node.calls().len(), 2, "the delegate's DEL ran");
    assert!(node.saved().is_none());
    assert_eq!(node.gone(), ["prod_db-0_ctr1"]);
    let tombstone: Value =
        serde_json::from_slice(&fs::read(node.p("flanneld-rs-gone/prod_db-0_ctr1")).unwrap())
            .unwrap();
    assert_eq!(
        tombstone,
        json!({"namespace": "prod", "name": "db-0", "containerID": "ctr1"})
    );
}

#[test]
fn del_with_failing_delegate_and_daemon_keeps_the_delegate_error() {
    let node = Node::new();
    let err = r#"{"cniVersion":"1.0.0","code":11,"msg":"busy"}"#;
    node.delegate(
        "fake",
        &format!("[ \"$CNI_COMMAND\" = ADD ] && echo '{RESULT}' && exit 0\necho '{err}'; exit 1"),
    );
    assert_eq!(node.run("ADD", &node.conf(json!({}))).exit_code, 0);
    node.daemon
        .answer("HTTP/1.1 500 Internal Server Error\r\n\r\n");
    let r = node.run("DEL", &node.conf(json!({})));
    assert_eq!(r.exit_code, 1, "{r:?}");
    assert_eq!(r.stdout, format!("{err}\n").into_bytes());
    assert_eq!(
        node.daemon_requests()[1].0,
        "DELETE /v1/pods/default/ctr1?containerID=ctr1 HTTP/1.1"
    );
    assert_eq!(node.gone(), ["default_ctr1_ctr1"]);
}

#[test]
fn huge_input_is_not_echoed_whole() {
    let node = Node::new();
    let long = "x".repeat(100_000);
    for (var, value) in [
        ("CNI_IFNAME", long.clone()),
        ("CNI_CONTAINERID", format!("-{long}")),
        ("CNI_COMMAND", long.clone()),
    ] {
        let mut env = node.env("ADD");
        env.retain(|(k, _)| k != var);
        env.push((var.into(), value));
        let r = node.run_with(env, &node.conf(json!({})));
        assert_eq!(r.exit_code, 1, "{var}");
        assert!(r.stdout.len() < 5000, "{var}: {} bytes", r.stdout.len());
        assert!(r.stderr.len() < 3000, "{var}: {} bytes", r.stderr.len());
        let v = stdout_json(&r);
        let said = format!("{} {}", v["msg"], v["details"]);
        assert!(said.contains(" bytes)"), "{var}: {said}");
    }
}
