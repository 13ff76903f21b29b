//! Finding the delegate plugin in CNI_PATH and running it (what the CNI library's `invoke`
//! package does for Flannel's Go plugin).

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{self, Stdio};
use std::thread;
use std::time::Duration;

use serde_json::Value;

use super::args::{Command, Environment};
use super::error::CniError;

/// A plugin binary being replaced while we exec it gives ETXTBSY; the CNI library retries too.
const TEXT_BUSY_RETRIES: u32 = 5;
const TEXT_BUSY_PAUSE: Duration = Duration::from_millis(200);

/// The first regular file named `name` in the CNI_PATH directories.
pub fn find_in_path(name: &str, dirs: &[String]) -> Result<PathBuf, CniError> {
    // The name comes from config; it must not reach outside the directories.
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(CniError::InvalidConfig(format!(
            "invalid delegate plugin type {name:?}"
        )));
    }
    dirs.iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.metadata().is_ok_and(|m| m.is_file()))
        .ok_or_else(|| CniError::PluginNotFound {
            name: name.to_string(),
            dirs: dirs.to_vec(),
        })
}

/// Runs the delegate plugin `name` found in `dirs` with `command`, `conf` on its stdin and our
/// environment; returns its stdout when it succeeds. Its stderr goes to ours, for the runtime's
/// log.
pub fn run(
    name: &str,
    dirs: &[String],
    command: Command,
    conf: &[u8],
    env: &Environment,
) -> Result<Vec<u8>, CniError> {
    exec(&find_in_path(name, dirs)?, name, command, conf, env)
}

/// Like `run`, for a plugin already found at `path`.
pub fn exec(
    path: &Path,
    name: &str,
    command: Command,
    conf: &[u8],
    env: &Environment,
) -> Result<Vec<u8>, CniError> {
    let output = run_with_retry(path, command, conf, env).map_err(|source| CniError::Exec {
        path: path.to_path_buf(),
        source,
    })?;
    if output.status.success() {
        return Ok(output.stdout);
    }
    Err(failure(name, command, &output))
}

fn run_with_retry(
    path: &Path,
    command: Command,
    conf: &[u8],
    env: &Environment,
) -> io::Result<process::Output> {
    let mut attempt = 0;
    loop {
        match run_once(path, command, conf, env) {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < TEXT_BUSY_RETRIES => {
                attempt += 1;
                thread::sleep(TEXT_BUSY_PAUSE);
            }
            other => return other,
        }
    }
}

fn run_once(
    path: &Path,
    command: Command,
    conf: &[u8],
    env: &Environment,
) -> io::Result<process::Output> {
    let mut child = process::Command::new(path)
        .env_clear()
        .envs(env.for_delegate(command))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdin = child.stdin.take();
    // Feed stdin from another thread so a plugin that writes before it has read everything
    // cannot deadlock against us; a plugin that exits without reading gives EPIPE, ignored.
    thread::scope(|s| {
        s.spawn(move || {
            if let Some(mut w) = stdin {
                let _ = w.write_all(conf);
            }
        });
        child.wait_with_output()
    })
}

fn failure(name: &str, command: Command, output: &process::Output) -> CniError {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let status = output.status;
    if let Ok(Value::Object(e)) = serde_json::from_slice::<Value>(&output.stdout) {
        if e.get("code").is_some_and(Value::is_u64) {
            let text = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or_default();
            let message = match text("details") {
                "" => text("msg").to_string(),
                details => format!("{}; {details}", text("msg")),
            };
            return CniError::DelegateFailed {
                plugin: name.to_string(),
                command: command.as_str(),
                message,
                raw: Some(output.stdout.clone()),
            };
        }
    }
    let message = match stdout.trim() {
        "" => format!("{status} with no error message"),
        out => format!("{status}, output {out:?}"),
    };
    CniError::DelegateFailed {
        plugin: name.to_string(),
        command: command.as_str(),
        message,
        raw: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::script;
    use std::fs;

    #[test]
    fn finds_first_regular_file() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        fs::create_dir(a.path().join("bridge")).unwrap(); // a directory is not a plugin
        script(b.path(), "bridge", "exit 0");
        script(b.path(), "other", "exit 0");
        let dirs = vec![
            a.path().to_string_lossy().into_owned(),
            b.path().to_string_lossy().into_owned(),
        ];
        assert_eq!(
            find_in_path("bridge", &dirs).unwrap(),
            b.path().join("bridge")
        );
        let err = find_in_path("macvlan", &dirs).unwrap_err();
        assert!(matches!(err, CniError::PluginNotFound { .. }));
        assert!(err.to_string().contains("\"macvlan\""), "{err}");
        for bad in ["", "..", "../bridge", "/bin/sh"] {
            assert_eq!(find_in_path(bad, &dirs).unwrap_err().code(), 7, "{bad}");
        }
    }

    #[test]
    fn runs_with_stdin_env_and_command() {
        let dir = tempfile::tempdir().unwrap();
        script(
            dir.path(),
            "echoer",
            r#"printf '{"cmd":"%s","args":"%s","conf":%s}' "$CNI_COMMAND" "$CNI_ARGS" "$(cat)""#,
        );
        let dirs = vec![dir.path().to_string_lossy().into_owned()];
        let env = Environment::from_pairs([("CNI_COMMAND", "ADD"), ("CNI_ARGS", "A=1")]);
        let out = run("echoer", &dirs, Command::Del, b"{\"x\":1}", &env).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"cmd": "DEL", "args": "A=1", "conf": {"x": 1}})
        );
    }

    #[test]
    fn failures_keep_the_delegates_error() {
        let dir = tempfile::tempdir().unwrap();
        script(
            dir.path(),
            "busy",
            r#"echo '{"cniVersion":"1.0.0","code":11,"msg":"busy","details":"d"}'; exit 1"#,
        );
        script(dir.path(), "crash", "echo boom; exit 3");
        let dirs = vec![dir.path().to_string_lossy().into_owned()];
        let env = Environment::default();

        let err = run("busy", &dirs, Command::Add, b"{}", &env).unwrap_err();
        assert_eq!(err.to_string(), "delegate plugin busy ADD failed: busy; d");
        let out: Value = serde_json::from_slice(&err.to_stdout("1.0.0")).unwrap();
        assert_eq!(out["code"], 11);

        let err = run("crash", &dirs, Command::Add, b"{}", &env).unwrap_err();
        assert_eq!(err.code(), 999);
        assert!(err.to_string().contains("exit status: 3"), "{err}");
        assert!(err.to_string().contains("boom"), "{err}");
    }
}
