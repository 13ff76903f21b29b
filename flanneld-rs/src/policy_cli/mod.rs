//! `flanneld-rs policy …`: the operator's side of network policy (`shared/spec/network-policy.md`,
//! "Tools an operator expects"). `apply`, `get` and `delete` read and write the records under
//! `<etcd-prefix>/policy/` with the daemon's `--etcd-*` flags, kubectl-style; `explain` asks
//! the local daemon over its Unix socket why SRC may or may not reach DST.
//!
//! Every object is checked with `netpol::object::parse` against its key before anything is
//! written, so what this tool stores is what the daemon accepts.

pub mod apply;
pub mod explain;
pub mod get;
pub mod resource;
mod store;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};

use crate::flags::Flags;

pub use resource::Resource;

/// `flanneld-rs policy …`
#[derive(Args, Debug, Clone)]
pub struct PolicyArgs {
    #[command(subcommand)]
    pub command: PolicyCommand,
}

#[derive(Subcommand, Debug, Clone)]
pub enum PolicyCommand {
    /// Check and write the objects of a file (YAML or JSON; several `---` documents or a
    /// `kind: List`): NetworkPolicy, Namespace, Pod. Nothing is written if any is invalid.
    Apply {
        /// The file, or `-` for standard input.
        #[arg(short = 'f', long = "filename", value_name = "FILE")]
        file: String,
        /// Namespace of objects that do not name one (default: `default`).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
    /// Show stored objects: a table, or `-o json|yaml`. Invalid records are shown, marked.
    Get {
        /// networkpolicies (netpol), namespaces (ns) or pods (po). Default: networkpolicies.
        resource: Option<String>,
        /// One object's name (default: all).
        name: Option<String>,
        /// Namespace (default: `default`).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        #[arg(short = 'o', long, value_enum)]
        output: Option<GetOutput>,
    },
    /// Remove objects: `delete RESOURCE NAME… [-n NS]` or `delete -f FILE`. Exit 1 if any was
    /// not there.
    Delete {
        /// networkpolicy (netpol), namespace (ns) or pod (po).
        #[arg(conflicts_with = "file")]
        resource: Option<String>,
        /// Names of the objects.
        #[arg(conflicts_with = "file")]
        names: Vec<String>,
        /// Delete the objects a file describes (`-` for standard input).
        #[arg(short = 'f', long = "filename", value_name = "FILE")]
        file: Option<String>,
        /// Namespace (default: `default`).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
    /// Ask the local daemon whether SRC may open a connection to DST on PORT/PROTO, and why.
    /// Exit 0 allowed, 1 denied, 2 when the daemon cannot be asked.
    Explain {
        /// Source IP address.
        src: String,
        /// Destination IP address.
        dst: String,
        /// Destination port and protocol: `80/TCP`, `53/udp`, `8080` (TCP).
        #[arg(value_name = "PORT/PROTO")]
        port: String,
        /// The daemon's --subnet-file (its socket lies beside it). Default: the top-level
        /// --subnet-file / FLANNELD_SUBNET_FILE.
        #[arg(long)]
        subnet_file: Option<PathBuf>,
        /// Print the daemon's answer as JSON.
        #[arg(short = 'o', long, value_enum)]
        output: Option<ExplainOutput>,
    },
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum GetOutput {
    Json,
    Yaml,
    Wide,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExplainOutput {
    Json,
}

/// The namespace when none is given, as in Kubernetes.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Runs `flanneld-rs policy …`; returns the exit code (0 success; 1 failure or, for delete,
/// something not found; explain: 0 allowed, 1 denied, 2 the daemon could not be asked).
pub fn run(flags: &Flags, args: &PolicyArgs) -> u8 {
    match &args.command {
        PolicyCommand::Explain {
            src,
            dst,
            port,
            subnet_file,
            output,
        } => {
            let subnet_file = subnet_file.as_ref().unwrap_or(&flags.subnet_file);
            let socket = crate::single::socket_path(subnet_file);
            explain::run(&socket, src, dst, port, output.is_some())
        }
        other => {
            let what = match other {
                PolicyCommand::Apply { .. } => "apply",
                PolicyCommand::Get { .. } => "get",
                _ => "delete",
            };
            match with_runtime(|| etcd_command(flags, other)) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("flanneld-rs policy {what}: {}", describe_error(&e));
                    1
                }
            }
        }
    }
}

fn with_runtime<F, Fut>(f: F) -> Result<u8>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<u8>>,
{
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(f())
}

async fn etcd_command(flags: &Flags, cmd: &PolicyCommand) -> Result<u8> {
    match cmd {
        PolicyCommand::Apply { file, namespace } => {
            apply::run(flags, file, namespace.as_deref()).await
        }
        PolicyCommand::Get {
            resource,
            name,
            namespace,
            all_namespaces,
            output,
        } => {
            let resource = match resource {
                Some(r) => Resource::parse(r)?,
                None => Resource::NetworkPolicy,
            };
            let scope = match (all_namespaces, namespace) {
                (true, _) => get::Scope::All,
                (false, Some(ns)) => get::Scope::Namespace(ns.clone()),
                (false, None) => get::Scope::Namespace(DEFAULT_NAMESPACE.into()),
            };
            get::run(flags, resource, name.as_deref(), &scope, *output).await
        }
        PolicyCommand::Delete {
            resource,
            names,
            file,
            namespace,
        } => {
            apply::delete(
                flags,
                resource.as_deref(),
                names,
                file.as_deref(),
                namespace.as_deref(),
            )
            .await
        }
        PolicyCommand::Explain { .. } => Ok(2),
    }
}

/// The error and its causes, `: `-joined like `{:#}`, less causes that the message before
/// already quotes (etcd errors carry their source in their own text).
pub fn describe_error(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Reads FILE, or standard input for `-`.
fn read_input(file: &str) -> Result<String> {
    if file == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("reading standard input")?;
        Ok(text)
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {file}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Flags, clap::Error> {
        let _env = crate::flags::tests::ENV
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        parse_unlocked(args)
    }

    fn parse_unlocked(args: &[&str]) -> Result<Flags, clap::Error> {
        let mut all = vec!["flanneld-rs".to_string()];
        all.extend(args.iter().map(|s| s.to_string()));
        Flags::try_parse_from(crate::flags::normalize_args(all))
    }

    fn policy(f: &Flags) -> &PolicyCommand {
        match &f.command {
            Some(crate::flags::Command::Policy(a)) => &a.command,
            other => panic!("not a policy command: {other:?}"),
        }
    }

    #[test]
    fn etcd_flags_before_or_after_the_subcommand() {
        let after = parse(&[
            "policy",
            "apply",
            "-f",
            "x.yaml",
            "--etcd-endpoints=http://10.0.0.1:2379",
            "--etcd-prefix=/p",
        ])
        .expect("parse");
        assert_eq!(after.etcd_endpoints, vec!["http://10.0.0.1:2379"]);
        assert_eq!(after.etcd_prefix, "/p");
        let before = parse(&[
            "-etcd-endpoints=http://10.0.0.2:2379",
            "policy",
            "get",
            "-A",
            "-o",
            "json",
        ])
        .expect("parse");
        assert_eq!(before.etcd_endpoints, vec!["http://10.0.0.2:2379"]);
        assert!(matches!(
            policy(&before),
            PolicyCommand::Get {
                all_namespaces: true,
                output: Some(GetOutput::Json),
                ..
            }
        ));
    }

    #[test]
    fn etcd_variables_reach_the_subcommand() {
        let _env = crate::flags::tests::ENV
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::env::set_var("FLANNELD_ETCD_ENDPOINTS", "http://10.0.0.3:2379");
        std::env::set_var("FLANNELD_ETCD_PREFIX", "/env");
        let from_env = parse_unlocked(&["policy", "get"]);
        let flag_wins = parse_unlocked(&["policy", "get", "--etcd-prefix=/flag"]);
        std::env::remove_var("FLANNELD_ETCD_ENDPOINTS");
        std::env::remove_var("FLANNELD_ETCD_PREFIX");
        let from_env = from_env.expect("parse");
        assert_eq!(from_env.etcd_endpoints, vec!["http://10.0.0.3:2379"]);
        assert_eq!(from_env.etcd_prefix, "/env");
        assert_eq!(flag_wins.expect("parse").etcd_prefix, "/flag");
    }

    #[test]
    fn causes_quoted_by_their_parent_are_not_repeated() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "etcd (listing /x): {}", self.0)
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = anyhow::Error::new(Outer(std::io::Error::other("refused")))
            .context("etcd at http://127.0.0.1:1");
        assert_eq!(
            describe_error(&e),
            "etcd at http://127.0.0.1:1: etcd (listing /x): refused"
        );
    }

    #[test]
    fn subcommand_shapes() {
        let f = parse(&["policy", "delete", "netpol", "a", "b", "-n", "x"]).expect("parse");
        match policy(&f) {
            PolicyCommand::Delete {
                resource, names, ..
            } => {
                assert_eq!(resource.as_deref(), Some("netpol"));
                assert_eq!(names, &["a", "b"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["policy", "delete", "-f", "x.yaml"]).is_ok());
        assert!(parse(&["policy", "delete", "netpol", "a", "-f", "x.yaml"]).is_err());
        let f = parse(&[
            "--subnet-file=/tmp/s.env",
            "policy",
            "explain",
            "10.0.0.1",
            "10.0.0.2",
            "80/tcp",
            "-o",
            "json",
        ])
        .expect("parse");
        assert_eq!(f.subnet_file, PathBuf::from("/tmp/s.env"));
        assert!(matches!(
            policy(&f),
            PolicyCommand::Explain {
                subnet_file: None,
                output: Some(ExplainOutput::Json),
                ..
            }
        ));
        // `status` keeps its own --subnet-file.
        assert!(parse(&["status", "--subnet-file=/tmp/s.env"]).is_ok());
    }
}
