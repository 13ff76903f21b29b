//! Whole invocations of the plugin against shell-script delegates in temp dirs: no root needed.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
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

/// A node: temp dir with subnet.env, dataDir, a plugin dir and a log of delegate calls.
struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Node {
        let node = Node {
            dir: tempfile::tempdir().unwrap(),
        };
        fs::create_dir(node.p("bin")).unwrap();
        fs::write(node.p("subnet.env"), SUBNET_ENV).unwrap();
        node
    }

    fn p(&self, rel: &str) -> std::path::PathBuf {
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
