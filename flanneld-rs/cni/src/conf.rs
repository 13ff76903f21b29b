//! The plugin's own network config (stdin), decoded the way Flannel's Go plugin decodes it.
//!
//! Go's `encoding/json` matches field names case-insensitively and treats `null` like an absent
//! field, so configs written for Flannel may rely on both; `field` reproduces that.

use std::path::PathBuf;

use serde_json::{Map, Value};

use super::args::{is_cni_identifier, Command};
use super::error::CniError;
use super::SUPPORTED_VERSIONS;

pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/flannel";

/// What a config without `cniVersion` means (CNI spec).
const IMPLICIT_VERSION: &str = "0.1.0";

/// The spec version that introduced a command, for those younger than 0.1.0.
fn introduced_in(command: Command) -> Option<&'static str> {
    match command {
        Command::Check => Some("0.4.0"),
        Command::Gc | Command::Status => Some("1.1.0"),
        Command::Add | Command::Del | Command::Version => None,
    }
}

/// A supported version's place in `SUPPORTED_VERSIONS`, which is oldest first.
fn rank(version: &str) -> Option<usize> {
    SUPPORTED_VERSIONS.iter().position(|v| *v == version)
}

#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// `None` when the config has none; the delegate then gets none either, as with Flannel.
    pub cni_version: Option<String>,
    pub name: String,
    pub subnet_file: PathBuf,
    pub data_dir: PathBuf,
    pub delegate: Map<String, Value>,
    pub ipam: Option<Map<String, Value>>,
    pub runtime_config: Option<Map<String, Value>>,
    pub prev_result: Option<Value>,
    /// `args` as given (CNI CONVENTIONS.md): `args.cni.labels` and `args.cni.ports` describe
    /// the pod for the daemon. Decoded by `pod` at ADD only, so a bad one never blocks DEL.
    pub args: Option<Value>,
}

/// Parses stdin as a JSON object.
pub fn parse_json(stdin: &[u8]) -> Result<Map<String, Value>, CniError> {
    match serde_json::from_slice(stdin).map_err(CniError::Decode)? {
        Value::Object(map) => Ok(map),
        other => Err(CniError::InvalidConfig(format!(
            "expected a JSON object, got {}",
            kind(&other)
        ))),
    }
}

/// The config's `cniVersion` if it is one we speak: the version to answer errors in.
pub fn error_version(json: &Map<String, Value>) -> Option<&str> {
    field(json, "cniVersion")
        .and_then(Value::as_str)
        .filter(|v| SUPPORTED_VERSIONS.contains(v))
}

impl NetConf {
    pub fn from_json(json: &Map<String, Value>) -> Result<NetConf, CniError> {
        let name = string(json, "name")?.unwrap_or_default();
        if name.is_empty() {
            return Err(CniError::InvalidConfig("missing network name".into()));
        }
        if !is_cni_identifier(&name) {
            return Err(CniError::InvalidConfig(format!(
                "invalid characters found in network name {name:?}"
            )));
        }
        let path_or = |key, default: &str| -> Result<PathBuf, CniError> {
            // An empty string falls back to the default instead of opening "".
            Ok(PathBuf::from(
                string(json, key)?
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| default.to_string()),
            ))
        };
        Ok(NetConf {
            cni_version: string(json, "cniVersion")?.filter(|v| !v.is_empty()),
            name,
            subnet_file: path_or("subnetFile", DEFAULT_SUBNET_FILE)?,
            data_dir: path_or("dataDir", DEFAULT_DATA_DIR)?,
            delegate: object(json, "delegate")?.unwrap_or_default(),
            ipam: object(json, "ipam")?,
            runtime_config: object(json, "runtimeConfig")?,
            prev_result: field(json, "prevResult").cloned(),
            args: field(json, "args").cloned(),
        })
    }

    pub fn version(&self) -> &str {
        self.cni_version.as_deref().unwrap_or(IMPLICIT_VERSION)
    }

    /// Refuses versions we do not speak, and commands the config's version does not have
    /// (CHECK before 0.4.0, GC and STATUS before 1.1.0), with code 1 as the CNI library does.
    pub fn check_version(&self, command: Command) -> Result<(), CniError> {
        let version = self.version();
        let Some(have) = rank(version) else {
            return Err(CniError::IncompatibleVersion {
                config: version.to_string(),
            });
        };
        if introduced_in(command)
            .and_then(rank)
            .is_some_and(|need| have < need)
        {
            return Err(CniError::NotAllowed {
                command: command.as_str(),
                config: version.to_string(),
            });
        }
        Ok(())
    }
}

pub use subnet_manager::json::field;
pub(super) use subnet_manager::json::kind;

fn string(json: &Map<String, Value>, name: &str) -> Result<Option<String>, CniError> {
    match field(json, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(wrong_type(name, "a string", other)),
    }
}

fn object(json: &Map<String, Value>, name: &str) -> Result<Option<Map<String, Value>>, CniError> {
    match field(json, name) {
        None => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m.clone())),
        Some(other) => Err(wrong_type(name, "an object", other)),
    }
}

fn wrong_type(name: &str, expected: &str, got: &Value) -> CniError {
    CniError::InvalidConfig(format!("{name:?} must be {expected}, got {}", kind(got)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decode(v: Value) -> Result<NetConf, CniError> {
        NetConf::from_json(&parse_json(v.to_string().as_bytes())?)
    }

    #[test]
    fn defaults() {
        let c = decode(json!({"cniVersion": "1.0.0", "name": "cbr0", "type": "flannel"})).unwrap();
        assert_eq!(c.cni_version.as_deref(), Some("1.0.0"));
        assert_eq!(c.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/cni/flannel"));
        assert!(c.delegate.is_empty() && c.ipam.is_none() && c.prev_result.is_none());
    }

    #[test]
    fn full_config_and_go_style_field_names() {
        let c = decode(json!({
            "cniVersion": "0.3.1", "name": "cbr0", "type": "flannel",
            "SubnetFile": "/tmp/s.env", "DATADIR": "/tmp/d",
            "delegate": {"hairpinMode": true}, "ipam": {"dataDir": "/tmp/i"},
            "runtimeConfig": {"portMappings": []}, "prevResult": {"ips": []},
        }))
        .unwrap();
        assert_eq!(c.subnet_file, PathBuf::from("/tmp/s.env"));
        assert_eq!(c.data_dir, PathBuf::from("/tmp/d"));
        assert_eq!(c.delegate["hairpinMode"], true);
        assert_eq!(c.ipam.unwrap()["dataDir"], "/tmp/i");
        assert!(c.runtime_config.is_some() && c.prev_result.is_some());
    }

    #[test]
    fn null_and_empty_mean_default() {
        let c = decode(json!({"name": "n", "subnetFile": "", "dataDir": null, "delegate": null}))
            .unwrap();
        assert_eq!(c.subnet_file, PathBuf::from(DEFAULT_SUBNET_FILE));
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.cni_version, None);
        assert_eq!(c.version(), "0.1.0");
    }

    #[test]
    fn bad_configs() {
        let err = parse_json(b"{\"name\":").unwrap_err();
        assert_eq!(err.code(), 6);
        assert_eq!(parse_json(b"[1]").unwrap_err().code(), 7);
        for (conf, needle) in [
            (json!({"cniVersion": "1.0.0"}), "missing network name"),
            (
                json!({"name": "a b"}),
                "invalid characters found in network name \"a b\"",
            ),
            (
                json!({"name": 5}),
                "\"name\" must be a string, got a number",
            ),
            (
                json!({"name": "n", "subnetFile": 5}),
                "\"subnetFile\" must be a string",
            ),
            (
                json!({"name": "n", "delegate": "bridge"}),
                "\"delegate\" must be an object",
            ),
            (
                json!({"name": "n", "ipam": []}),
                "\"ipam\" must be an object, got an array",
            ),
        ] {
            let err = decode(conf.clone()).unwrap_err();
            assert_eq!(err.code(), 7, "{conf}");
            assert!(err.to_string().contains(needle), "{conf}: {err}");
        }
    }

    #[test]
    fn versions() {
        let conf = |v: &str| decode(json!({"cniVersion": v, "name": "n"})).unwrap();
        for v in SUPPORTED_VERSIONS {
            assert!(conf(v).check_version(Command::Add).is_ok(), "{v}");
        }
        assert!(conf("1.1.0").check_version(Command::Del).is_ok());
        for v in ["9.9.9", "1.2.0", "1.1", "abc"] {
            let err = conf(v).check_version(Command::Add).unwrap_err();
            assert_eq!(err.code(), 1, "{v}");
            assert_eq!(err.to_string(), "incompatible CNI versions", "{v}");
        }
        for v in ["0.4.0", "1.0.0", "1.1.0"] {
            assert!(conf(v).check_version(Command::Check).is_ok(), "{v}");
        }
        let err = conf("0.3.1").check_version(Command::Check).unwrap_err();
        assert_eq!(err.to_string(), "config version does not allow CHECK");
        assert_eq!(err.code(), 1);
    }

    /// `rank` compares versions by list position.
    #[test]
    fn supported_versions_are_oldest_first() {
        let parsed: Vec<Vec<u32>> = SUPPORTED_VERSIONS
            .iter()
            .map(|v| v.split('.').map(|n| n.parse().unwrap()).collect())
            .collect();
        assert!(parsed.windows(2).all(|w| w[0] < w[1]), "{parsed:?}");
    }

    #[test]
    fn gc_and_status_need_1_1_0() {
        let conf = |v: &str| decode(json!({"cniVersion": v, "name": "n"})).unwrap();
        for command in [Command::Gc, Command::Status] {
            assert!(conf("1.1.0").check_version(command).is_ok());
            for v in ["0.1.0", "0.3.1", "0.4.0", "1.0.0"] {
                let err = conf(v).check_version(command).unwrap_err();
                assert_eq!(err.code(), 1, "{v}");
                assert_eq!(
                    err.to_string(),
                    format!("config version does not allow {}", command.as_str())
                );
            }
            // No cniVersion means 0.1.0.
            let none = decode(json!({"name": "n"})).unwrap();
            assert_eq!(none.check_version(command).unwrap_err().code(), 1);
            let err = conf("9.9.9").check_version(command).unwrap_err();
            assert_eq!(err.to_string(), "incompatible CNI versions");
        }
    }

    #[test]
    fn error_version_only_when_supported() {
        let j = |v: Value| parse_json(v.to_string().as_bytes()).unwrap();
        assert_eq!(
            error_version(&j(json!({"cniVersion": "0.3.1"}))),
            Some("0.3.1")
        );
        assert_eq!(
            error_version(&j(json!({"cniVersion": "1.1.0"}))),
            Some("1.1.0")
        );
        assert_eq!(error_version(&j(json!({"cniVersion": "9.9"}))), None);
        assert_eq!(error_version(&j(json!({"cniVersion": 1}))), None);
    }
}
