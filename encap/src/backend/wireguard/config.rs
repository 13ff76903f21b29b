//! The `Backend` fields of Flannel's wireguard backend: `ListenPort` (51820), `ListenPortV6`
//! (51821), `PSK` (a base64 WireGuard key), `PersistentKeepaliveInterval` (seconds; Flannel
//! decodes a Go `time.Duration` and multiplies it by a second, so the JSON number is seconds)
//! and `Mode` (`separate`, `auto`, `ipv4`, `ipv6`; Flannel compares it case-sensitively).

use serde_json::Value;
use subnet_manager::config::NetworkConfig;

use super::keys::decode_key;
use crate::backend::{backend_port, BackendError};

pub(super) const DEFAULT_PORT: u16 = 51820;
pub(super) const DEFAULT_PORT_V6: u16 = 51821;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    Separate,
    Auto,
    Ipv4,
    Ipv6,
}

#[derive(Clone, PartialEq, Eq)]
pub(super) struct WgConfig {
    pub listen_port: u16,
    pub listen_port_v6: u16,
    pub psk: Option<[u8; 32]>,
    /// Seconds; `None` = off (Flannel's default 0).
    pub keepalive: Option<u16>,
    pub mode: Mode,
}

impl std::fmt::Debug for WgConfig {
    // By hand, so that the PSK never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgConfig")
            .field("listen_port", &self.listen_port)
            .field("listen_port_v6", &self.listen_port_v6)
            .field("psk", &self.psk.map(|_| "<set>"))
            .field("keepalive", &self.keepalive)
            .field("mode", &self.mode)
            .finish()
    }
}

/// `Backend.<name>`, matched case-insensitively as Go's JSON decoding does.
fn field<'a>(config: &'a NetworkConfig, name: &str) -> Option<&'a Value> {
    super::super::json_field(&config.backend, name)
}

fn bad(name: &str, v: &Value, what: &str) -> BackendError {
    BackendError::Config(format!("field \"Backend.{name}\": {v} is not {what}"))
}

impl WgConfig {
    pub fn parse(config: &NetworkConfig) -> Result<Self, BackendError> {
        let listen_port = backend_port(config, "ListenPort", DEFAULT_PORT)?;
        let listen_port_v6 = backend_port(config, "ListenPortV6", DEFAULT_PORT_V6)?;
        let psk = match field(config, "PSK") {
            None => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(decode_key(s).ok_or_else(|| {
                // The value is a secret: say what is wrong with it, never what it is.
                BackendError::Config(format!(
                    "field \"Backend.PSK\" is not a WireGuard key (32 bytes in base64, as `wg genpsk` prints; got {} characters)",
                    s.len()
                ))
            })?),
            Some(v) => return Err(bad("PSK", v, "a string")),
        };
        let keepalive = match field(config, "PersistentKeepaliveInterval") {
            None => None,
            Some(v) => {
                let secs = v
                    .as_u64()
                    .and_then(|s| u16::try_from(s).ok())
                    .ok_or_else(|| {
                        bad(
                            "PersistentKeepaliveInterval",
                            v,
                            "a number of seconds (0-65535)",
                        )
                    })?;
                (secs > 0).then_some(secs)
            }
        };
        let mode = match field(config, "Mode") {
            None => Mode::Separate,
            Some(Value::String(m)) => match m.as_str() {
                "separate" => Mode::Separate,
                "auto" => Mode::Auto,
                "ipv4" => Mode::Ipv4,
                "ipv6" => Mode::Ipv6,
                _ => {
                    return Err(bad(
                        "Mode",
                        &Value::String(m.clone()),
                        "a valid Mode (separate, auto, ipv4, ipv6)",
                    ))
                }
            },
            Some(v) => return Err(bad("Mode", v, "a string")),
        };
        if config.network.is_none() || !config.enable_ipv4 {
            return Err(BackendError::Config(
                "the wireguard backend of flanneld-rs needs an IPv4 Network (IPv6 is not supported yet)"
                    .into(),
            ));
        }
        if mode == Mode::Ipv6 || config.enable_ipv6 || config.ipv6_network.is_some() {
            return Err(BackendError::Config(
                "the wireguard backend of flanneld-rs does not support IPv6 yet (Mode ipv6, EnableIPv6): use an IPv4-only config"
                    .into(),
            ));
        }
        Ok(WgConfig {
            listen_port,
            listen_port_v6,
            psk,
            keepalive,
            mode,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(backend: &str) -> Result<WgConfig, String> {
        let json = format!(r#"{{"Network":"10.244.0.0/16","Backend":{backend}}}"#);
        let config = NetworkConfig::parse(json.as_bytes()).map_err(|e| e.to_string())?;
        WgConfig::parse(&config).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_flannels() {
        let c = parse(r#"{"Type":"wireguard"}"#).expect("parses");
        assert_eq!(c.listen_port, 51820);
        assert_eq!(c.listen_port_v6, 51821);
        assert_eq!(c.psk, None);
        assert_eq!(c.keepalive, None);
        assert_eq!(c.mode, Mode::Separate);
    }

    #[test]
    fn fields_case_insensitive() {
        let psk = "YQ6pqRbEPBnN1ho5eDvyHLZNzaVS9ihZS9q3vyQHjXA=";
        let c = parse(&format!(
            r#"{{"Type":"wireguard","listenport":5555,"PSK":"{psk}","persistentKeepaliveInterval":25,"Mode":"auto"}}"#
        ))
        .expect("parses");
        assert_eq!(c.listen_port, 5555);
        assert_eq!(c.psk.map(|k| k[0]), Some(0x61));
        assert_eq!(c.keepalive, Some(25));
        assert_eq!(c.mode, Mode::Auto);
        assert!(!format!("{c:?}").contains(psk), "the PSK stays out of logs");
        let c = parse(r#"{"Type":"wireguard","PersistentKeepaliveInterval":0}"#).expect("0 = off");
        assert_eq!(c.keepalive, None);
    }

    #[test]
    fn rejections_name_the_field() {
        for (backend, want) in [
            (
                r#"{"Type":"wireguard","ListenPort":70000}"#,
                "Backend.ListenPort",
            ),
            (r#"{"Type":"wireguard","PSK":"short"}"#, "Backend.PSK"),
            (r#"{"Type":"wireguard","PSK":5}"#, "Backend.PSK"),
            (
                r#"{"Type":"wireguard","PersistentKeepaliveInterval":2.5}"#,
                "Backend.PersistentKeepaliveInterval",
            ),
            (r#"{"Type":"wireguard","Mode":"Separate"}"#, "Backend.Mode"),
            (r#"{"Type":"wireguard","Mode":"ipv6"}"#, "IPv6"),
        ] {
            let err = parse(backend).expect_err(backend);
            assert!(err.contains(want), "{backend}: {err}");
        }
        let err =
            parse(r#"{"Type":"wireguard","PSK":"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MQ=="}"#)
                .expect_err("31-byte key");
        assert!(!err.contains("c2Vj"), "the PSK stays out of errors: {err}");
    }

    #[test]
    fn ipv6_is_a_clear_error() {
        let json = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","Backend":{"Type":"wireguard"}}"#;
        let config = NetworkConfig::parse(json.as_bytes()).expect("config");
        let err = WgConfig::parse(&config).expect_err("ipv6").to_string();
        assert!(err.contains("IPv6"), "{err}");
    }
}
