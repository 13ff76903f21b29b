//! The `flannel` CNI meta-plugin: a drop-in for flannel-io/cni-plugin (v1.1.2's delegate
//! config, v1.9.x's protocol: CNI 1.1.0, GC and STATUS). Its own crate, beside the daemon's: it
//! reads subnet.env and runs plugins, so it builds on subnet-manager's pure formats alone,
//! without etcd.
//!
//! It reads subnet.env, builds the delegate config (by default `bridge` + `host-local` over this
//! node's lease) as Flannel does, saves it under dataDir/<containerID> and runs the delegate.
//! DEL runs the delegate's DEL with the saved config and removes it, whether or not the
//! delegate's DEL succeeded, as Flannel v1.9 does. GC and STATUS succeed without doing anything,
//! as Flannel's do.
//!
//! For NetworkPolicy, the daemon must know every pod: after the delegate's ADD succeeded, ADD
//! hands a Kubernetes-shaped Pod record (namespace and name from CNI_ARGS' K8S_POD_*, labels
//! and named ports from the config's `args.cni`, IPs from the delegate's result) to the local
//! daemon with `PUT /v1/pods/<ns>/<name>` over HTTP on `flanneld-rs.sock` beside subnet.env;
//! the plugin holds no etcd credentials. If the daemon refuses the record or cannot be reached
//! (code 11, try again later), ADD fails and undoes the delegate. DEL sends the matching
//! `DELETE` after the delegate's DEL, and never fails over it: when the daemon cannot be told,
//! a tombstone file in `flanneld-rs-gone/` beside subnet.env tells it once it is back.
//!
//! Where we differ from Flannel's plugin, on purpose:
//! - ADD waits a few seconds for a missing subnet.env (code 11 if it never comes), where Flannel
//!   fails at once;
//! - a delegate's own error JSON reaches the runtime unchanged (Flannel rewraps it as code 999);
//! - a failed ADD runs the delegate's DEL and removes the saved config; a delegate that is not
//!   in CNI_PATH fails ADD before anything is saved;
//! - CHECK checks our saved state (Flannel's is a no-op);
//! - errors carry `cniVersion`, and config errors use codes 6/7 rather than 999.
//!
//! Layout: `args` (CNI_* environment, CNI_ARGS pairs), `conf` (stdin), `delegate` (delegate
//! config), `invoke` (CNI_PATH lookup, running plugins), `saved` (dataDir files, atomic
//! writes), `pod` (the Pod record: identity, labels, ports, IPs), `daemon_api` (HTTP/1.1 over
//! the daemon's Unix socket), `handover` (PUT/DELETE of records, tombstones), `commands`
//! (ADD/DEL/CHECK/GC/STATUS), `error` (CNI error JSON).

pub mod args;
pub mod commands;
pub mod conf;
pub mod daemon_api;
pub mod delegate;
pub mod error;
pub mod handover;
pub mod invoke;
pub mod pod;
pub mod saved;

#[cfg(test)]
mod tests;

use std::io::{self, Read, Write};

use args::{Command, Environment};
use commands::Options;
use conf::NetConf;
use error::CniError;

/// Oldest first: `conf` compares versions by their place in this list.
pub const SUPPORTED_VERSIONS: [&str; 7] = [
    "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0",
];
/// VERSION's `cniVersion` (what the CNI library 1.3 Flannel's plugin is built with reports),
/// and the version we answer errors in when the config gives none we can use.
pub const CURRENT_VERSION: &str = "1.1.0";

/// What the plugin process prints and returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub exit_code: i32,
}

impl Reply {
    fn ok(stdout: Vec<u8>) -> Reply {
        Reply {
            stdout,
            stderr: String::new(),
            exit_code: 0,
        }
    }

    fn error(e: &CniError, cni_version: &str) -> Reply {
        Reply {
            stdout: e.to_stdout(cni_version),
            stderr: format!("flannel: {}\n", e.message()),
            exit_code: 1,
        }
    }
}

/// The `flannel` binary: process environment and stdin in, stdout/stderr/exit code out.
pub fn main() -> i32 {
    let reply = run(
        &Environment::from_process(),
        &mut io::stdin().lock(),
        &Options::default(),
    );
    // If the runtime closed our pipes there is no one left to tell; the exit code still says it.
    let _ = io::stdout().write_all(&reply.stdout);
    let _ = io::stdout().flush();
    let _ = io::stderr().write_all(reply.stderr.as_bytes());
    reply.exit_code
}

/// One plugin invocation. Never panics on bad input: every failure is a CNI error reply.
pub fn run(env: &Environment, stdin: &mut dyn Read, opts: &Options) -> Reply {
    let command = match args::command(env) {
        Ok(Some(c)) => c,
        Ok(None) => return about(),
        Err(e) => return Reply::error(&e, CURRENT_VERSION),
    };
    if command == Command::Version {
        return Reply::ok(version_json());
    }
    let mut version = CURRENT_VERSION.to_string();
    match dispatch(command, env, stdin, opts, &mut version) {
        Ok(out) => Reply::ok(out),
        Err(e) => Reply::error(&e, &version),
    }
}

/// `version` is set to the config's cniVersion as soon as it is known, for the error reply.
fn dispatch(
    command: Command,
    env: &Environment,
    stdin: &mut dyn Read,
    opts: &Options,
    version: &mut String,
) -> Result<Vec<u8>, CniError> {
    let args = args::cni_args(env, command)?;
    let mut input = Vec::new();
    stdin.read_to_end(&mut input).map_err(CniError::ReadStdin)?;
    let json = conf::parse_json(&input)?;
    if let Some(v) = conf::error_version(&json) {
        *version = v.to_string();
    }
    let conf = NetConf::from_json(&json)?;
    conf.check_version(command)?;
    match command {
        Command::Add => commands::add(&args, &conf, env, opts),
        Command::Del => commands::del(&args, &conf, env, opts),
        Command::Check => commands::check(&args, &conf, env),
        Command::Gc => commands::gc(&conf),
        Command::Status => commands::status(&conf),
        Command::Version => Ok(version_json()),
    }
}

fn version_json() -> Vec<u8> {
    let json = serde_json::json!({
        "cniVersion": CURRENT_VERSION,
        "supportedVersions": SUPPORTED_VERSIONS,
    });
    format!("{json}\n").into_bytes()
}

/// Run by hand without CNI_COMMAND: say what this is, as CNI plugins do.
fn about() -> Reply {
    Reply {
        stdout: Vec::new(),
        stderr: format!(
            "CNI plugin flannel (flanneld-rs {})\nCNI protocol versions supported: {}\n",
            env!("CARGO_PKG_VERSION"),
            SUPPORTED_VERSIONS.join(", ")
        ),
        exit_code: 0,
    }
}
