//! What a peer's lease means to each of our devices, as Flannel reads it: the public key and
//! port from `BackendData` (IPv4) or `BackendV6Data` (IPv6), AllowedIPs from the lease's
//! subnets, the endpoint from `PublicIP` or `PublicIPv6`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;
use serde_json::Value;
use subnet_manager::lease::Lease;

use super::config::{DeviceSpec, Mode, Role, WgConfig};
use super::keys;

/// One peer as one device configures it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct DevicePeer {
    pub public_key: [u8; 32],
    /// The lease's subnets of the families the device carries.
    pub allowed: Vec<IpNet>,
    pub endpoint: SocketAddr,
}

/// `{"PublicKey":…,"Port":…}` of a BackendData or BackendV6Data object.
struct WgData {
    public_key: [u8; 32],
    /// `None` in leases of older Flannel, which published no Port.
    port: Option<u16>,
}

/// Reads `BackendData` (`name`) or `BackendV6Data`; `Ok(None)` when the lease has none.
fn wg_data(value: Option<&Value>, name: &str) -> Result<Option<WgData>, String> {
    let Some(value) = value else {
        return Ok(None);
    };
    let data = value
        .as_object()
        .ok_or_else(|| format!("{name} is not an object"))?;
    // Go decodes BackendData case-insensitively.
    let get = |field: &str| subnet_manager::json::field(data, field);
    let public_key = get("PublicKey")
        .and_then(Value::as_str)
        .and_then(keys::decode_key)
        .ok_or_else(|| format!("{name}.PublicKey is not a base64 WireGuard key"))?;
    if keys::is_low_order(&public_key) {
        return Err(format!(
            "{name}.PublicKey is a low-order point: no handshake can be made with it"
        ));
    }
    let port = match get("Port") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{name}.Port {v} is not a port"))?,
        ),
    };
    Ok(Some(WgData { public_key, port }))
}

fn v4_data(lease: &Lease) -> Result<WgData, String> {
    wg_data(lease.attrs.backend_data.as_ref(), "BackendData")?
        .ok_or_else(|| "no BackendData object with the node's PublicKey".into())
}

fn v6_data(lease: &Lease) -> Result<WgData, String> {
    wg_data(lease.attrs.backend_v6_data.as_ref(), "BackendV6Data")?
        .ok_or_else(|| "no BackendV6Data object with the node's PublicKey".into())
}

fn public_ip(lease: &Lease) -> Result<Ipv4Addr, String> {
    let ip = lease.attrs.public_ip;
    if ip.is_unspecified() {
        return Err("no PublicIP".into());
    }
    Ok(ip)
}

fn public_ipv6(lease: &Lease) -> Result<Ipv6Addr, String> {
    lease
        .attrs
        .public_ipv6
        .filter(|ip| !ip.is_unspecified())
        .ok_or_else(|| "no PublicIPv6 to reach it over IPv6".into())
}

/// RFC 1918, as Flannel's `IP4.IsPrivate`.
fn is_private_v4(ip: Ipv4Addr) -> bool {
    ip.is_private()
}

/// RFC 4193 (fc00::/7), as Flannel's `IP6.IsPrivate`.
fn is_private_v6(ip: Ipv6Addr) -> bool {
    ip.octets()[0] & 0xfe == 0xfc
}

/// Flannel's `selectMode` for Mode auto: IPv4 unless the peer has a PublicIPv6 and its
/// PublicIP is private while both IPv6 ends are public (the path most likely to work).
fn auto_over_v6(peer_v4: Ipv4Addr, peer_v6: Option<Ipv6Addr>, ours_v6: Option<Ipv6Addr>) -> bool {
    let Some(peer_v6) = peer_v6 else {
        return false;
    };
    if !is_private_v4(peer_v4) {
        return false;
    }
    !is_private_v6(peer_v6) && ours_v6.is_some_and(|o| !is_private_v6(o))
}

/// The peer `lease` describes for `dev`; `Ok(None)` when the lease has no subnet the device
/// carries; the error says why it cannot be one. `ours_v6`: our PublicIPv6 (Mode auto).
pub(super) fn device_peer(
    lease: &Lease,
    dev: &DeviceSpec,
    cfg: &WgConfig,
    ours_v6: Option<Ipv6Addr>,
) -> Result<Option<DevicePeer>, String> {
    let mut allowed = Vec::new();
    if let Some(net) = lease.key.ipv4.filter(|_| dev.carries(false, cfg)) {
        allowed.push(IpNet::V4(net));
    }
    if let Some(net) = lease.key.ipv6.filter(|_| dev.carries(true, cfg)) {
        allowed.push(IpNet::V6(net));
    }
    if allowed.is_empty() {
        return Ok(None);
    }
    let (public_key, endpoint) = match dev.role {
        Role::V4 => {
            let data = v4_data(lease)?;
            // Older Flannel publishes no Port: its peers listen where we do.
            let port = data.port.unwrap_or(cfg.listen_port);
            (
                data.public_key,
                SocketAddr::new(public_ip(lease)?.into(), port),
            )
        }
        Role::V6 => {
            let data = v6_data(lease)?;
            let port = data.port.unwrap_or(cfg.listen_port_v6);
            (
                data.public_key,
                SocketAddr::new(public_ipv6(lease)?.into(), port),
            )
        }
        Role::Single => single(lease, cfg, ours_v6)?,
    };
    Ok(Some(DevicePeer {
        public_key,
        allowed,
        endpoint,
    }))
}

/// Key and endpoint of a peer of the one device of modes auto, ipv4 and ipv6.
fn single(
    lease: &Lease,
    cfg: &WgConfig,
    ours_v6: Option<Ipv6Addr>,
) -> Result<([u8; 32], SocketAddr), String> {
    let v4 = wg_data(lease.attrs.backend_data.as_ref(), "BackendData")?;
    let v6 = wg_data(lease.attrs.backend_v6_data.as_ref(), "BackendV6Data")?;
    let public_key = match (&v4, &v6) {
        (Some(a), Some(b)) if a.public_key != b.public_key => {
            return Err("BackendData and BackendV6Data carry different PublicKeys".into())
        }
        (Some(d), _) | (None, Some(d)) => d.public_key,
        (None, None) => {
            return Err("no BackendData or BackendV6Data object with the node's PublicKey".into())
        }
    };
    let over_v6 = match cfg.mode {
        Mode::Ipv6 => true,
        Mode::Auto => auto_over_v6(lease.attrs.public_ip, lease.attrs.public_ipv6, ours_v6),
        Mode::Ipv4 | Mode::Separate => false,
    };
    let ip: IpAddr = if over_v6 {
        public_ipv6(lease)?.into()
    } else {
        public_ip(lease)?.into()
    };
    // The peer's one device listens on its ListenPort, whichever family reaches it: the Port
    // of its BackendData. Flannel dials BackendV6Data's Port (ListenPortV6) over IPv6, where
    // nothing listens in these modes; without BackendData (IPv6-only), every node shares our
    // ListenPort through the network config.
    let port = v4.and_then(|d| d.port).unwrap_or(cfg.listen_port);
    Ok((public_key, SocketAddr::new(ip, port)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use subnet_manager::config::NetworkConfig;
    use subnet_manager::lease::{LeaseAttrs, SubnetKey};

    const KEY: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
    const KEY2: &str = "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08=";

    fn lease(key: &str, json: &str) -> Lease {
        Lease {
            key: SubnetKey::parse(key).expect("key"),
            attrs: LeaseAttrs::from_json(json.as_bytes()).expect("attrs"),
        }
    }

    fn config(net: &str, mode: &str) -> WgConfig {
        let json = format!(r#"{{{net},"Backend":{{"Type":"wireguard"{mode}}}}}"#);
        WgConfig::parse(&NetworkConfig::parse(json.as_bytes()).expect("config")).expect("wg")
    }

    const DUAL: &str =
        r#""Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fc00:44::/48""#;
    const V4: &str = r#""Network":"10.244.0.0/16""#;

    /// A dual-stack lease as Flannel v0.28.9 writes it.
    fn dual_lease(ip: &str, ip6: &str) -> Lease {
        lease(
            "10.244.7.0-24&fc00:44:0:7::-64",
            &format!(
                r#"{{"PublicIP":"{ip}","PublicIPv6":"{ip6}","BackendType":"wireguard","BackendData":{{"PublicKey":"{KEY}","Port":51820}},"BackendV6Data":{{"PublicKey":"{KEY}","Port":51821}}}}"#
            ),
        )
    }

    /// Per device of `cfg`: (AllowedIPs, endpoint) or the error.
    fn peers(
        lease: &Lease,
        cfg: &WgConfig,
        ours_v6: Option<&str>,
    ) -> Vec<Result<(Vec<String>, String), String>> {
        let ours_v6 = ours_v6.map(|s| s.parse().expect("ip"));
        cfg.devices()
            .iter()
            .map(|d| {
                device_peer(lease, d, cfg, ours_v6).map(|p| {
                    let p = p.expect("a subnet for this device");
                    assert_eq!(keys::encode_key(&p.public_key), KEY);
                    (
                        p.allowed.iter().map(ToString::to_string).collect(),
                        p.endpoint.to_string(),
                    )
                })
            })
            .collect()
    }

    fn ok(allowed: &[&str], endpoint: &str) -> Result<(Vec<String>, String), String> {
        Ok((
            allowed.iter().map(|s| s.to_string()).collect(),
            endpoint.into(),
        ))
    }

    #[test]
    fn separate_mode_splits_the_families() {
        let l = dual_lease("172.30.0.13", "fd00:30::13");
        assert_eq!(
            peers(&l, &config(DUAL, ""), None),
            [
                ok(&["10.244.7.0/24"], "172.30.0.13:51820"),
                ok(&["fc00:44:0:7::/64"], "[fd00:30::13]:51821"),
            ]
        );
        // Older Flannel: no Port, so our ports; a v6 device needs BackendV6Data and PublicIPv6.
        let old = lease(
            "10.244.7.0-24&fc00:44:0:7::-64",
            &format!(
                r#"{{"PublicIP":"172.30.0.13","PublicIPv6":"fd00:30::13","BackendType":"wireguard","BackendData":{{"PublicKey":"{KEY}"}},"BackendV6Data":{{"PublicKey":"{KEY}"}}}}"#
            ),
        );
        let cfg = config(DUAL, r#","ListenPort":7000,"ListenPortV6":7001"#);
        assert_eq!(
            peers(&old, &cfg, None),
            [
                ok(&["10.244.7.0/24"], "172.30.0.13:7000"),
                ok(&["fc00:44:0:7::/64"], "[fd00:30::13]:7001"),
            ]
        );
        let no_v6_data = lease(
            "10.244.7.0-24&fc00:44:0:7::-64",
            &format!(
                r#"{{"PublicIP":"172.30.0.13","PublicIPv6":"fd00:30::13","BackendType":"wireguard","BackendData":{{"PublicKey":"{KEY}"}}}}"#
            ),
        );
        let got = peers(&no_v6_data, &cfg, None);
        assert!(got[0].is_ok());
        assert!(
            got[1]
                .as_ref()
                .is_err_and(|e| e.contains("no BackendV6Data")),
            "{got:?}"
        );
        let no_ip6 = lease(
            "10.244.7.0-24&fc00:44:0:7::-64",
            &format!(
                r#"{{"PublicIP":"172.30.0.13","PublicIPv6":null,"BackendType":"wireguard","BackendData":{{"PublicKey":"{KEY}"}},"BackendV6Data":{{"PublicKey":"{KEY}"}}}}"#
            ),
        );
        let got = peers(&no_ip6, &cfg, None);
        assert!(
            got[1].as_ref().is_err_and(|e| e.contains("PublicIPv6")),
            "{got:?}"
        );
    }

    #[test]
    fn single_device_modes_carry_both_families_to_one_endpoint() {
        let l = dual_lease("172.30.0.13", "fd00:30::13");
        let both = ["10.244.7.0/24", "fc00:44:0:7::/64"];
        assert_eq!(
            peers(&l, &config(DUAL, r#","Mode":"ipv4""#), None),
            [ok(&both, "172.30.0.13:51820")]
        );
        // Over IPv6 to the port the peer's one device listens on: its ListenPort.
        assert_eq!(
            peers(&l, &config(DUAL, r#","Mode":"ipv6""#), None),
            [ok(&both, "[fd00:30::13]:51820")]
        );
        // auto: private IPv4 and public IPv6 on both ends: IPv6; otherwise IPv4.
        let cfg = config(DUAL, r#","Mode":"auto""#);
        let public6 = dual_lease("172.30.0.13", "2001:db8::13");
        assert_eq!(
            peers(&public6, &cfg, Some("2001:db8::11")),
            [ok(&both, "[2001:db8::13]:51820")]
        );
        assert_eq!(
            peers(&public6, &cfg, Some("fd00:30::11")),
            [ok(&both, "172.30.0.13:51820")],
            "our own IPv6 is private"
        );
        assert_eq!(
            peers(&l, &cfg, Some("2001:db8::11")),
            [ok(&both, "172.30.0.13:51820")],
            "the peer's IPv6 is private"
        );
        let public4 = dual_lease("198.51.100.13", "2001:db8::13");
        assert_eq!(
            peers(&public4, &cfg, Some("2001:db8::11")),
            [ok(&both, "198.51.100.13:51820")],
            "a public IPv4 wins"
        );
        // An IPv4-only network in Mode auto: as before.
        let v4 = lease(
            "10.244.7.0-24",
            &format!(
                r#"{{"PublicIP":"172.30.0.13","BackendType":"wireguard","BackendData":{{"PublicKey":"{KEY}","Port":5555}}}}"#
            ),
        );
        assert_eq!(
            peers(&v4, &config(V4, r#","Mode":"auto""#), None),
            [ok(&["10.244.7.0/24"], "172.30.0.13:5555")]
        );
    }

    #[test]
    fn single_device_refusals_say_why() {
        let cfg = config(DUAL, r#","Mode":"ipv6""#);
        let dev = cfg.devices()[0];
        let err = |json: &str| {
            let l = lease("10.244.7.0-24&fc00:44:0:7::-64", json);
            device_peer(&l, &dev, &cfg, None).expect_err(json)
        };
        let two_keys = format!(
            r#"{{"PublicIP":"172.30.0.13","PublicIPv6":"fd00:30::13","BackendType":"wireguard","BackendData":{{"PublicKey":"{KEY}"}},"BackendV6Data":{{"PublicKey":"{KEY2}"}}}}"#
        );
        assert!(err(&two_keys).contains("different PublicKeys"));
        let no_ip6 = format!(
            r#"{{"PublicIP":"172.30.0.13","BackendType":"wireguard","BackendData":{{"PublicKey":"{KEY}"}}}}"#
        );
        assert!(err(&no_ip6).contains("PublicIPv6"));
        let no_data =
            r#"{"PublicIP":"172.30.0.13","PublicIPv6":"fd00:30::13","BackendType":"wireguard"}"#;
        assert!(err(no_data).contains("no BackendData or BackendV6Data"));
        // All zeros: base64 of a key, but a low-order point (the timer would retry its
        // handshake for ever, logging each time).
        let zero = r#"{"PublicIP":"172.30.0.13","PublicIPv6":"fd00:30::13","BackendType":"wireguard","BackendData":{"PublicKey":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}}"#;
        assert!(err(zero).contains("BackendData.PublicKey is a low-order point"));
        // Only the key from BackendV6Data (an IPv6-only node): fine, on our ListenPort.
        let v6_only = lease(
            "0.0.0.0-0&fc00:44:0:7::-64",
            &format!(
                r#"{{"PublicIP":"172.30.0.13","PublicIPv6":"fd00:30::13","BackendType":"wireguard","BackendV6Data":{{"PublicKey":"{KEY}","Port":51821}}}}"#
            ),
        );
        let p = device_peer(&v6_only, &dev, &cfg, None)
            .expect("peer")
            .expect("a subnet");
        assert_eq!(p.endpoint.to_string(), "[fd00:30::13]:51820");
        assert_eq!(
            p.allowed,
            ["fc00:44:0:7::/64".parse::<IpNet>().expect("net")]
        );
    }

    #[test]
    fn a_lease_without_a_family_is_nothing_for_its_device() {
        // An IPv4-only lease in a dual-stack network: the v6 device has nothing of it.
        let l = lease(
            "10.244.7.0-24",
            &format!(
                r#"{{"PublicIP":"172.30.0.13","PublicIPv6":null,"BackendType":"wireguard","BackendData":{{"PublicKey":"{KEY}"}}}}"#
            ),
        );
        let cfg = config(DUAL, "");
        let devs = cfg.devices();
        assert!(device_peer(&l, &devs[0], &cfg, None).expect("v4").is_some());
        assert_eq!(device_peer(&l, &devs[1], &cfg, None), Ok(None));
    }
}
