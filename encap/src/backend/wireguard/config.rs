//! The `Backend` fields of Flannel's wireguard backend: `ListenPort` (51820), `ListenPortV6`
//! (51821), `PSK` (a base64 WireGuard key), `PersistentKeepaliveInterval` (seconds; Flannel
//! decodes a Go `time.Duration` and multiplies it by a second, so the JSON number is seconds)
//! and `Mode` (`separate`, `auto`, `ipv4`, `ipv6`; Flannel compares it case-sensitively), and
//! from them the devices a node runs (see [`WgConfig::devices`]).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use serde_json::Value;
use subnet_manager::config::NetworkConfig;

use super::keys::decode_key;
use crate::backend::{backend_port, BackendError};
use crate::io::Listen;

/// Flannel's device names.
pub(super) const DEVICE: &str = "flannel-wg";
pub(super) const DEVICE_V6: &str = "flannel-wg-v6";

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
    /// The network's `EnableIPv4` and `EnableIPv6`: which families' subnets we carry.
    pub ipv4: bool,
    pub ipv6: bool,
}

/// What a device carries and how it reaches its peers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Role {
    /// Mode separate's `flannel-wg`: IPv4 subnets over the IPv4 underlay, key and port from
    /// the peers' BackendData.
    V4,
    /// Mode separate's `flannel-wg-v6`: IPv6 subnets over the IPv6 underlay, key and port
    /// from the peers' BackendV6Data.
    V6,
    /// Modes auto, ipv4 and ipv6: one device for every enabled family's subnets, each peer
    /// reached over the family the mode picks.
    Single,
}

/// One TUN device of ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct DeviceSpec {
    pub name: &'static str,
    /// Prefix of its threads' names.
    pub threads: &'static str,
    pub role: Role,
    pub listen: Listen,
}

impl DeviceSpec {
    /// Whether the device carries pod subnets of this family.
    pub fn carries(&self, v6: bool, cfg: &WgConfig) -> bool {
        match self.role {
            Role::V4 => !v6,
            Role::V6 => v6,
            Role::Single => (cfg.ipv4 && !v6) || (cfg.ipv6 && v6),
        }
    }
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
            .field("ipv4", &self.ipv4)
            .field("ipv6", &self.ipv6)
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
        // Leases carry a PublicIPv6 only with EnableIPv6, so Mode ipv6 would have no endpoint
        // for any peer (Flannel accepts it and then fails on every peer).
        if mode == Mode::Ipv6 && !config.enable_ipv6 {
            return Err(BackendError::Config(
                "field \"Backend.Mode\": \"ipv6\" reaches peers at their PublicIPv6, which leases carry only with EnableIPv6: set EnableIPv6 and IPv6Network, or use Mode separate, auto or ipv4".into(),
            ));
        }
        Ok(WgConfig {
            listen_port,
            listen_port_v6,
            psk,
            keepalive,
            mode,
            ipv4: config.enable_ipv4,
            ipv6: config.enable_ipv6,
        })
    }

    /// The devices Flannel makes for this config: in separate mode `flannel-wg` (IPv4, on
    /// ListenPort) and `flannel-wg-v6` (IPv6, on ListenPortV6) for the enabled families; in
    /// the other modes `flannel-wg` alone, on ListenPort.
    pub fn devices(&self) -> Vec<DeviceSpec> {
        let v4_only = |port| Listen::At(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port));
        match self.mode {
            Mode::Separate => {
                let mut out = Vec::new();
                if self.ipv4 {
                    out.push(DeviceSpec {
                        name: DEVICE,
                        threads: "wg",
                        role: Role::V4,
                        listen: v4_only(self.listen_port),
                    });
                }
                if self.ipv6 {
                    let any6 = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), self.listen_port_v6);
                    out.push(DeviceSpec {
                        name: DEVICE_V6,
                        threads: "wg6",
                        role: Role::V6,
                        listen: Listen::At(any6),
                    });
                }
                out
            }
            Mode::Auto | Mode::Ipv4 | Mode::Ipv6 => vec![DeviceSpec {
                name: DEVICE,
                threads: "wg",
                role: Role::Single,
                // Peers may be on either family once leases carry a PublicIPv6; an IPv4-only
                // network keeps the plain IPv4 socket it always had.
                listen: if self.ipv6 {
                    Listen::DualStack(self.listen_port)
                } else {
                    v4_only(self.listen_port)
                },
            }],
        }
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
            (r#"{"Type":"wireguard","Mode":"ipv6"}"#, "EnableIPv6"),
        ] {
            let err = parse(backend).expect_err(backend);
            assert!(err.contains(want), "{backend}: {err}");
        }
        let err =
            parse(r#"{"Type":"wireguard","PSK":"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MQ=="}"#)
                .expect_err("31-byte key");
        assert!(!err.contains("c2Vj"), "the PSK stays out of errors: {err}");
    }

    const DUAL: &str =
        r#""Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fc00:44::/48""#;
    const V6_ONLY: &str = r#""EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00:44::/48""#;

    fn devices(net: &str, mode: &str) -> Result<Vec<(&'static str, Role, String)>, String> {
        let json = format!(r#"{{{net},"Backend":{{"Type":"wireguard"{mode}}}}}"#);
        let config = NetworkConfig::parse(json.as_bytes()).map_err(|e| e.to_string())?;
        let c = WgConfig::parse(&config).map_err(|e| e.to_string())?;
        Ok(c.devices()
            .iter()
            .map(|d| (d.name, d.role, d.listen.to_string()))
            .collect())
    }

    #[test]
    fn every_mode_runs_with_ipv6() {
        let v4 = r#""Network":"10.244.0.0/16""#;
        let dual_socket = "[::]:51820 (IPv4 and IPv6)".to_string();
        for (net, mode, want) in [
            // Separate (the default): one device per enabled family, each on its own port.
            (
                DUAL,
                "",
                vec![
                    (DEVICE, Role::V4, "0.0.0.0:51820".to_string()),
                    (DEVICE_V6, Role::V6, "[::]:51821".to_string()),
                ],
            ),
            (
                DUAL,
                r#","ListenPort":6000,"ListenPortV6":6001"#,
                vec![
                    (DEVICE, Role::V4, "0.0.0.0:6000".to_string()),
                    (DEVICE_V6, Role::V6, "[::]:6001".to_string()),
                ],
            ),
            (
                V6_ONLY,
                "",
                vec![(DEVICE_V6, Role::V6, "[::]:51821".to_string())],
            ),
            (
                v4,
                "",
                vec![(DEVICE, Role::V4, "0.0.0.0:51820".to_string())],
            ),
            // One device for both families, on ListenPort, hearing both.
            (
                DUAL,
                r#","Mode":"auto""#,
                vec![(DEVICE, Role::Single, dual_socket.clone())],
            ),
            (
                DUAL,
                r#","Mode":"ipv4""#,
                vec![(DEVICE, Role::Single, dual_socket.clone())],
            ),
            (
                DUAL,
                r#","Mode":"ipv6""#,
                vec![(DEVICE, Role::Single, dual_socket.clone())],
            ),
            (
                V6_ONLY,
                r#","Mode":"ipv6""#,
                vec![(DEVICE, Role::Single, dual_socket)],
            ),
            // IPv4 only: the socket it always had.
            (
                v4,
                r#","Mode":"auto""#,
                vec![(DEVICE, Role::Single, "0.0.0.0:51820".to_string())],
            ),
        ] {
            assert_eq!(devices(net, mode).expect(mode), want, "{net} {mode}");
        }
    }

    #[test]
    fn devices_carry_their_families() {
        let json = format!(r#"{{{DUAL},"Backend":{{"Type":"wireguard","Mode":"auto"}}}}"#);
        let config = NetworkConfig::parse(json.as_bytes()).expect("config");
        let c = WgConfig::parse(&config).expect("parses");
        assert!((c.ipv4, c.ipv6) == (true, true));
        let single = c.devices()[0];
        assert!(single.carries(false, &c) && single.carries(true, &c));
        let mut sep = c.clone();
        sep.mode = Mode::Separate;
        let d = sep.devices();
        assert!(d[0].carries(false, &sep) && !d[0].carries(true, &sep));
        assert!(!d[1].carries(false, &sep) && d[1].carries(true, &sep));
    }

    #[test]
    fn mode_ipv6_without_enable_ipv6_is_refused_with_the_reason() {
        let err = devices(r#""Network":"10.244.0.0/16""#, r#","Mode":"ipv6""#)
            .expect_err("no PublicIPv6 in any lease");
        assert!(
            err.contains("Backend.Mode")
                && err.contains("PublicIPv6")
                && err.contains("EnableIPv6"),
            "{err}"
        );
        // The same mode with IPv6 enabled is fine, as is carrying IPv6 pods over IPv4.
        assert!(devices(DUAL, r#","Mode":"ipv6""#).is_ok());
        assert!(devices(V6_ONLY, r#","Mode":"ipv4""#).is_ok());
    }
}
