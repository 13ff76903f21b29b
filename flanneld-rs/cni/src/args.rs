//! The CNI_* environment variables: which command, and its per-container arguments.
//!
//! Validation follows the CNI library Flannel's Go plugin is built with, so a runtime sees the
//! same refusals from both; it also keeps the container ID safe to use as a file name.

use std::ffi::{OsStr, OsString};

use super::error::CniError;

/// Linux interface names are at most IFNAMSIZ - 1 bytes.
const MAX_IFNAME_LEN: usize = 15;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    /// CNI 1.1.0: release what no valid attachment uses (the runtime names those on stdin).
    Gc,
    /// CNI 1.1.0: is the plugin ready for ADD.
    Status,
    Version,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Gc => "GC",
            Command::Status => "STATUS",
            Command::Version => "VERSION",
        }
    }

    /// ADD, DEL and CHECK act on one container's attachment; GC and STATUS on the whole network.
    pub fn per_container(self) -> bool {
        matches!(self, Command::Add | Command::Del | Command::Check)
    }

    /// The variables the command needs (CNI spec "Parameters"); DEL may lack a netns because
    /// the runtime may already have destroyed it.
    fn required_vars(self) -> &'static [&'static str] {
        match self {
            Command::Add | Command::Check => {
                &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"]
            }
            Command::Del => &["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"],
            Command::Gc | Command::Status => &["CNI_PATH"],
            Command::Version => &[],
        }
    }
}

/// The plugin's whole environment: read for CNI_*, and passed on to the delegate as it is
/// (with only CNI_COMMAND changed), as Flannel does.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    vars: Vec<(OsString, OsString)>,
}

impl Environment {
    pub fn from_process() -> Self {
        Environment {
            vars: std::env::vars_os().collect(),
        }
    }

    pub fn from_pairs<K: Into<OsString>, V: Into<OsString>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Environment {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// A variable's value; unset, empty and non-UTF-8 all count as absent.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .iter()
            .rev()
            .find(|(k, _)| k == OsStr::new(name))
            .and_then(|(_, v)| v.to_str())
            .filter(|v| !v.is_empty())
    }

    /// The environment for a delegate run with `command`.
    pub fn for_delegate(&self, command: Command) -> Vec<(OsString, OsString)> {
        let mut vars: Vec<_> = self
            .vars
            .iter()
            .filter(|(k, _)| k != "CNI_COMMAND")
            .cloned()
            .collect();
        vars.push(("CNI_COMMAND".into(), command.as_str().into()));
        vars
    }
}

/// CNI_COMMAND; `Ok(None)` when unset (the plugin was run by hand: print what it is).
pub fn command(env: &Environment) -> Result<Option<Command>, CniError> {
    match env.get("CNI_COMMAND") {
        None => Ok(None),
        Some("ADD") => Ok(Some(Command::Add)),
        Some("DEL") => Ok(Some(Command::Del)),
        Some("CHECK") => Ok(Some(Command::Check)),
        Some("GC") => Ok(Some(Command::Gc)),
        Some("STATUS") => Ok(Some(Command::Status)),
        Some("VERSION") => Ok(Some(Command::Version)),
        Some(other) => Err(CniError::UnknownCommand(other.to_string())),
    }
}

/// The arguments of a command, present and valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniArgs {
    pub command: Command,
    /// Empty for GC and STATUS, which concern no one container.
    pub container_id: String,
    /// Empty for GC and STATUS.
    pub ifname: String,
    /// CNI_PATH split on ':', empty entries dropped.
    pub path: Vec<String>,
}

pub fn cni_args(env: &Environment, command: Command) -> Result<CniArgs, CniError> {
    let missing: Vec<&'static str> = command
        .required_vars()
        .iter()
        .copied()
        .filter(|v| env.get(v).is_none())
        .collect();
    if !missing.is_empty() {
        return Err(CniError::MissingEnv(missing));
    }
    let get = |name| env.get(name).unwrap_or_default().to_string();
    // As in the CNI library, GC and STATUS neither need nor check these: a runtime may pass
    // leftovers of an earlier call, and refusing GC over them would help no one.
    let (container_id, ifname) = if command.per_container() {
        let id = get("CNI_CONTAINERID");
        validate_container_id(&id)?;
        let ifname = get("CNI_IFNAME");
        validate_ifname(&ifname)?;
        (id, ifname)
    } else {
        (String::new(), String::new())
    };
    let path = get("CNI_PATH")
        .split(':')
        .filter(|d| !d.is_empty())
        .map(str::to_string)
        .collect();
    Ok(CniArgs {
        command,
        container_id,
        ifname,
        path,
    })
}

/// One value from CNI_ARGS, the runtime's `KEY=VALUE;KEY=VALUE` extras (kubelet and CRI
/// runtimes pass K8S_POD_NAMESPACE, K8S_POD_NAME there). Pairs without '=' are skipped rather
/// than refused: the delegate gets CNI_ARGS too and is the one to judge its own keys. An empty
/// value counts as absent, as for environment variables.
pub fn cni_arg<'a>(env: &'a Environment, key: &str) -> Option<&'a str> {
    env.get("CNI_ARGS")?
        .split(';')
        .filter_map(|pair| pair.split_once('='))
        .filter(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim())
        .next_back()
        .filter(|v| !v.is_empty())
}

/// `^[a-zA-Z0-9][a-zA-Z0-9_.-]*$`, as the CNI library requires; this also rules out "/", "."
/// and "..", so the ID can name a file under dataDir.
fn validate_container_id(id: &str) -> Result<(), CniError> {
    if is_cni_identifier(id) {
        Ok(())
    } else {
        Err(CniError::InvalidContainerId(id.to_string()))
    }
}

/// The CNI library's rule for container IDs and network names.
pub(super) fn is_cni_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    first_ok && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn validate_ifname(name: &str) -> Result<(), CniError> {
    let reason = if name.len() > MAX_IFNAME_LEN {
        "interface name is too long (at most 15 bytes)"
    } else if name == "." || name == ".." {
        "interface name is . or .."
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        "interface name contains / or : or whitespace characters"
    } else {
        return Ok(());
    };
    Err(CniError::InvalidIfName {
        name: name.to_string(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Environment {
        Environment::from_pairs(pairs.iter().map(|(k, v)| (*k, *v)))
    }

    const FULL: &[(&str, &str)] = &[
        ("CNI_CONTAINERID", "ctr1"),
        ("CNI_NETNS", "/var/run/netns/pod"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin::/usr/lib/cni"),
    ];

    #[test]
    fn commands() {
        assert_eq!(command(&env(&[])).unwrap(), None);
        assert_eq!(command(&env(&[("CNI_COMMAND", "")])).unwrap(), None);
        assert_eq!(
            command(&env(&[("CNI_COMMAND", "DEL")])).unwrap(),
            Some(Command::Del)
        );
        assert_eq!(
            command(&env(&[("CNI_COMMAND", "GC")])).unwrap(),
            Some(Command::Gc)
        );
        assert_eq!(
            command(&env(&[("CNI_COMMAND", "STATUS")])).unwrap(),
            Some(Command::Status)
        );
        let err = command(&env(&[("CNI_COMMAND", "gc")])).unwrap_err();
        assert_eq!(err.code(), 4);
        assert_eq!(err.to_string(), "unknown CNI_COMMAND: gc");
    }

    #[test]
    fn gc_and_status_need_only_cni_path() {
        for cmd in [Command::Gc, Command::Status] {
            let err = cni_args(&env(&[]), cmd).unwrap_err();
            assert_eq!(err.to_string(), "required env variables [CNI_PATH] missing");
            // Container variables, even invalid ones, are not looked at.
            let e = env(&[
                ("CNI_PATH", "/opt/cni/bin"),
                ("CNI_CONTAINERID", "../x"),
                ("CNI_IFNAME", "a/b"),
            ]);
            let args = cni_args(&e, cmd).unwrap();
            assert_eq!(args.container_id, "");
            assert_eq!(args.ifname, "");
            assert_eq!(args.path, vec!["/opt/cni/bin"]);
        }
    }

    #[test]
    fn full_args() {
        let args = cni_args(&env(FULL), Command::Add).unwrap();
        assert_eq!(args.container_id, "ctr1");
        assert_eq!(args.ifname, "eth0");
        assert_eq!(args.path, vec!["/opt/cni/bin", "/usr/lib/cni"]);
    }

    #[test]
    fn missing_vars_are_listed_together() {
        let err = cni_args(&env(&[("CNI_IFNAME", "eth0")]), Command::Add).unwrap_err();
        assert_eq!(
            err.to_string(),
            "required env variables [CNI_CONTAINERID,CNI_NETNS,CNI_PATH] missing"
        );
        // DEL needs no netns.
        let no_netns: Vec<_> = FULL.iter().filter(|(k, _)| *k != "CNI_NETNS").collect();
        let e = Environment::from_pairs(no_netns.iter().map(|(k, v)| (*k, *v)));
        assert!(cni_args(&e, Command::Del).is_ok());
        assert!(cni_args(&e, Command::Check).is_err());
    }

    #[test]
    fn container_id_must_be_a_safe_file_name() {
        for bad in ["../x", "a/b", ".a", "-a", "a b", "ä"] {
            let mut pairs = FULL.to_vec();
            pairs.push(("CNI_CONTAINERID", bad));
            let err = cni_args(&env(&pairs), Command::Del).unwrap_err();
            assert!(matches!(err, CniError::InvalidContainerId(_)), "{bad}");
        }
        for good in ["a..b", "0abc_DEF-1.2"] {
            assert!(validate_container_id(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn ifname_rules() {
        for bad in [".", "..", "a:b", "a/b", "a b", "abcdefghijklmnop"] {
            assert!(validate_ifname(bad).is_err(), "{bad}");
        }
        assert!(validate_ifname("abcdefghijklmno").is_ok());
    }

    #[test]
    fn cni_args_pairs() {
        let e = env(&[(
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1;\
             K8S_POD_INFRA_CONTAINER_ID=abc;junk;X=a=b;EMPTY=",
        )]);
        assert_eq!(cni_arg(&e, "K8S_POD_NAMESPACE"), Some("kube-system"));
        assert_eq!(cni_arg(&e, "K8S_POD_NAME"), Some("coredns-1"));
        assert_eq!(cni_arg(&e, "X"), Some("a=b"), "split at the first '='");
        assert_eq!(cni_arg(&e, "EMPTY"), None);
        assert_eq!(cni_arg(&e, "junk"), None);
        assert_eq!(cni_arg(&e, "k8s_pod_name"), None, "keys are case-sensitive");
        assert_eq!(cni_arg(&env(&[]), "K8S_POD_NAME"), None);
        let last = env(&[("CNI_ARGS", "K8S_POD_NAME=a;K8S_POD_NAME=b")]);
        assert_eq!(
            cni_arg(&last, "K8S_POD_NAME"),
            Some("b"),
            "the last one wins"
        );
    }

    #[test]
    fn delegate_env_replaces_command_only() {
        let mut pairs = FULL.to_vec();
        pairs.push(("CNI_COMMAND", "ADD"));
        pairs.push(("CNI_ARGS", "K8S_POD_NAME=p"));
        let vars = env(&pairs).for_delegate(Command::Del);
        let get = |k: &str| {
            vars.iter()
                .filter(|(n, _)| n == k)
                .map(|(_, v)| v.to_str().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(get("CNI_COMMAND"), vec!["DEL"]);
        assert_eq!(get("CNI_ARGS"), vec!["K8S_POD_NAME=p"]);
        assert_eq!(get("CNI_NETNS"), vec!["/var/run/netns/pod"]);
    }
}
