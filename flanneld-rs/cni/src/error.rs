//! Errors of the CNI plugin and their CNI error JSON (CNI spec, "Error" result and well-known codes).

use std::io;
use std::path::PathBuf;

use serde::Serialize;
use subnet_manager::subnet_env::SubnetEnvError;

use super::SUPPORTED_VERSIONS;

/// Well-known error codes from the CNI spec.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const INTERNAL: u32 = 999;
}

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("incompatible CNI versions")]
    IncompatibleVersion { config: String },
    /// The command is newer than the config's version (CHECK from 0.4.0, GC and STATUS from
    /// 1.1.0); the message is the CNI library's.
    #[error("config version does not allow {command}")]
    NotAllowed {
        command: &'static str,
        config: String,
    },
    #[error("required env variables [{}] missing", .0.join(","))]
    MissingEnv(Vec<&'static str>),
    #[error("unknown CNI_COMMAND: {0}")]
    UnknownCommand(String),
    #[error("invalid characters in containerID")]
    InvalidContainerId(String),
    #[error("invalid CNI_IFNAME {name:?}: {reason}")]
    InvalidIfName { name: String, reason: &'static str },
    #[error("cannot read network config from stdin: {0}")]
    ReadStdin(#[source] io::Error),
    #[error("error unmarshalling network config from stdin: {0}")]
    Decode(#[source] serde_json::Error),
    #[error("invalid network config: {0}")]
    InvalidConfig(String),
    /// subnet.env is still missing or incomplete after waiting: flanneld has not started (yet).
    #[error("{source} (waited {waited_ms} ms; is flanneld running?)")]
    SubnetEnvNotReady {
        waited_ms: u128,
        #[source]
        source: SubnetEnvError,
    },
    #[error("{0}")]
    SubnetEnv(#[source] SubnetEnvError),
    #[error("cannot {action} saved delegate config {}: {source}", .path.display())]
    SavedConfig {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no saved delegate config at {} (ADD has not run for this container)", .0.display())]
    NoSavedConfig(PathBuf),
    #[error("saved delegate config {} is unusable: {reason}", .path.display())]
    CorruptSavedConfig { path: PathBuf, reason: String },
    #[error("failed to find plugin {name:?} in path [{}]", .dirs.join(" "))]
    PluginNotFound { name: String, dirs: Vec<String> },
    #[error("cannot run delegate plugin {}: {source}", .path.display())]
    Exec {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The delegate failed. `raw` is its own CNI error JSON, relayed unchanged when present.
    #[error("delegate plugin {plugin} {command} failed: {message}")]
    DelegateFailed {
        plugin: String,
        command: &'static str,
        message: String,
        raw: Option<Vec<u8>>,
    },
    /// The delegate's ADD result names no address we could give the daemon as the pod's IP.
    #[error("delegate plugin {plugin} ADD result has no usable pod IP: {reason}")]
    NoPodIp { plugin: String, reason: String },
    /// The daemon could not be asked at all (not running, restarting, too slow): kubelet
    /// retries ADD on code 11.
    #[error(
        "the flanneld-rs daemon is not reachable at {}: {reason} (try again later)",
        .socket.display()
    )]
    DaemonUnreachable { socket: PathBuf, reason: String },
    /// The daemon answered, but not with success, or not with HTTP we could read.
    #[error("the flanneld-rs daemon at {} refused pod {pod}: {reason}", .socket.display())]
    DaemonRefused {
        socket: PathBuf,
        pod: String,
        reason: String,
    },
}

/// The CNI error result, fields in the spec's order.
#[derive(Serialize)]
struct ErrorJson<'a> {
    #[serde(rename = "cniVersion")]
    cni_version: &'a str,
    code: u32,
    msg: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<String>,
}

/// Longest message or details we print: they can quote the caller's input (CNI_IFNAME, the
/// container ID, the network name), which nothing else bounds.
const MAX_MESSAGE: usize = 2048;

fn clip(mut s: String) -> String {
    if s.len() > MAX_MESSAGE {
        let total = s.len();
        let mut end = MAX_MESSAGE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str(&format!("… ({total} bytes)"));
    }
    s
}

impl CniError {
    /// The message, cut to a bounded length (for stdout's `msg` and for stderr).
    pub fn message(&self) -> String {
        clip(self.to_string())
    }

    pub fn code(&self) -> u32 {
        use CniError::*;
        match self {
            IncompatibleVersion { .. } | NotAllowed { .. } => code::INCOMPATIBLE_VERSION,
            MissingEnv(_) | UnknownCommand(_) | InvalidContainerId(_) | InvalidIfName { .. } => {
                code::INVALID_ENV
            }
            ReadStdin(_) | Decode(_) => code::DECODE,
            InvalidConfig(_) => code::INVALID_CONFIG,
            SubnetEnvNotReady { .. } | DaemonUnreachable { .. } => code::TRY_AGAIN_LATER,
            SubnetEnv(_)
            | SavedConfig { .. }
            | NoSavedConfig(_)
            | CorruptSavedConfig { .. }
            | PluginNotFound { .. }
            | Exec { .. }
            | DelegateFailed { .. }
            | NoPodIp { .. }
            | DaemonRefused { .. } => code::INTERNAL,
        }
    }

    fn details(&self) -> Option<String> {
        match self {
            CniError::IncompatibleVersion { config } | CniError::NotAllowed { config, .. } => {
                let supported: Vec<String> = SUPPORTED_VERSIONS
                    .iter()
                    .map(|v| format!("{v:?}"))
                    .collect();
                Some(format!(
                    "config is {config:?}, plugin supports [{}]",
                    supported.join(" ")
                ))
            }
            CniError::InvalidContainerId(id) => Some(id.clone()),
            _ => None,
        }
    }

    /// What to print on stdout: the delegate's own error JSON unchanged if it gave one (so its
    /// code, e.g. 11 "try again later", reaches the runtime), else ours.
    pub fn to_stdout(&self, cni_version: &str) -> Vec<u8> {
        if let CniError::DelegateFailed { raw: Some(raw), .. } = self {
            return raw.clone();
        }
        let json = ErrorJson {
            cni_version,
            code: self.code(),
            msg: self.message(),
            details: self.details().map(clip),
        };
        // Serializing plain strings and integers cannot fail; the fallback only keeps this total.
        let mut out = serde_json::to_vec(&json)
            .unwrap_or_else(|_| format!("{{\"code\":{}}}", self.code()).into_bytes());
        out.push(b'\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn parse(e: &CniError, v: &str) -> Value {
        serde_json::from_slice(&e.to_stdout(v)).unwrap()
    }

    #[test]
    fn error_json_has_spec_fields_in_order() {
        let e = CniError::InvalidConfig("'delegate' must be an object".into());
        let out = String::from_utf8(e.to_stdout("0.3.1")).unwrap();
        assert_eq!(
            out,
            "{\"cniVersion\":\"0.3.1\",\"code\":7,\"msg\":\"invalid network config: \
             'delegate' must be an object\"}\n"
        );
    }

    #[test]
    fn version_error_lists_supported_versions() {
        let e = CniError::IncompatibleVersion {
            config: "9.9.9".into(),
        };
        let v = parse(&e, "1.0.0");
        assert_eq!(v["code"], 1);
        assert_eq!(v["msg"], "incompatible CNI versions");
        assert_eq!(
            v["details"],
            "config is \"9.9.9\", plugin supports [\"0.1.0\" \"0.2.0\" \"0.3.0\" \"0.3.1\" \
             \"0.4.0\" \"1.0.0\" \"1.1.0\"]"
        );
        let e = CniError::NotAllowed {
            command: "GC",
            config: "1.0.0".into(),
        };
        let v = parse(&e, "1.0.0");
        assert_eq!(v["code"], 1);
        assert_eq!(v["msg"], "config version does not allow GC");
    }

    #[test]
    fn codes() {
        assert_eq!(
            parse(&CniError::MissingEnv(vec!["CNI_NETNS"]), "1.0.0")["code"],
            4
        );
        assert_eq!(
            parse(
                &CniError::MissingEnv(vec!["CNI_NETNS", "CNI_PATH"]),
                "1.0.0"
            )["msg"],
            "required env variables [CNI_NETNS,CNI_PATH] missing"
        );
        let decode = serde_json::from_str::<Value>("{").unwrap_err();
        assert_eq!(parse(&CniError::Decode(decode), "1.0.0")["code"], 6);
        let e = CniError::PluginNotFound {
            name: "bridge".into(),
            dirs: vec!["/a".into(), "/b".into()],
        };
        let v = parse(&e, "1.0.0");
        assert_eq!(v["code"], 999);
        assert_eq!(v["msg"], "failed to find plugin \"bridge\" in path [/a /b]");
    }

    #[test]
    fn delegate_error_json_passes_through_unchanged() {
        let raw = b"{\"cniVersion\":\"0.4.0\",\"code\":11,\"msg\":\"busy\"}".to_vec();
        let e = CniError::DelegateFailed {
            plugin: "bridge".into(),
            command: "ADD",
            message: "busy".into(),
            raw: Some(raw.clone()),
        };
        assert_eq!(e.to_stdout("1.0.0"), raw);
    }
}
