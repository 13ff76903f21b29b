//! What the vxlan backend reads and writes: its `Backend.*` config, the address families and
//! their device names and sizes, and the VTEPs leases publish (`BackendData`,
//! `BackendV6Data`). Pure: no I/O.

use std::net::{IpAddr, Ipv6Addr};

use ipnet::IpNet;
use serde_json::Value;
use subnet_manager::config::NetworkConfig;
use subnet_manager::lease::{Lease, SubnetKey};

use crate::backend::{backend_port, json_field, BackendError};
use crate::netlink::format_mac;

const DEFAULT_VNI: u32 = 1;
/// Linux's VXLAN port (Flannel leaves the kernel default), not IANA's 4789.
const DEFAULT_PORT: u16 = 8472;
/// VNIs are 24 bits.
const MAX_VNI: u32 = (1 << 24) - 1;
/// Interface names hold at most 15 bytes: `flannel.` leaves 7 digits for the VNI,
/// `flannel-v6.` 4.
const MAX_NAME_LEN: usize = 15;

/// An address family of the overlay. Each has its own VXLAN device, lease data and underlay
/// address, as in Go Flannel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Family {
    V4,
    V6,
}

impl Family {
    pub(super) fn device_name(self, vni: u32) -> String {
        match self {
            Family::V4 => format!("flannel.{vni}"),
            Family::V6 => format!("flannel-v6.{vni}"),
        }
    }

    /// Outer IP header (20 or 40) + UDP (8) + VXLAN (8) + inner Ethernet (14): what the kernel
    /// itself subtracts from the underlay's MTU for a device of this family.
    fn overhead(self) -> u32 {
        match self {
            Family::V4 => 50,
            Family::V6 => 70,
        }
    }

    /// The smallest MTU the device may get: IPv4's 68 (RFC 791); IPv6's 1280 (RFC 8200),
    /// below which the kernel drops IPv6 from the device altogether.
    fn min_device_mtu(self) -> u32 {
        match self {
            Family::V4 => 68,
            Family::V6 => 1280,
        }
    }

    /// The lease field carrying this family's VTEP.
    pub(super) fn data_field(self) -> &'static str {
        match self {
            Family::V4 => "BackendData",
            Family::V6 => "BackendV6Data",
        }
    }

    pub(super) fn public_field(self) -> &'static str {
        match self {
            Family::V4 => "PublicIP",
            Family::V6 => "PublicIPv6",
        }
    }

    pub(super) fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// A lease's subnet of this family.
    pub(super) fn subnet(self, key: &SubnetKey) -> Option<IpNet> {
        match self {
            Family::V4 => key.ipv4.map(IpNet::V4),
            Family::V6 => key.ipv6.map(IpNet::V6),
        }
    }

    /// A lease's public address of this family; an unspecified one counts as none.
    pub(super) fn public_ip(self, lease: &Lease) -> Option<IpAddr> {
        let ip = match self {
            Family::V4 => Some(IpAddr::V4(lease.attrs.public_ip)),
            Family::V6 => lease.attrs.public_ipv6.map(IpAddr::V6),
        };
        ip.filter(|ip| !ip.is_unspecified())
    }

    /// A lease's VTEP data of this family.
    pub(super) fn data(self, lease: &Lease) -> Option<&Value> {
        match self {
            Family::V4 => lease.attrs.backend_data.as_ref(),
            Family::V6 => lease.attrs.backend_v6_data.as_ref(),
        }
    }
}

/// The address a lease's device holds, and its peers' neighbour entries point at: the lease
/// subnet's network address as a /32 (/128), so that the kernel makes no broadcast or subnet
/// route on the device.
pub(super) fn host_net(subnet: IpNet) -> Result<IpNet, BackendError> {
    IpNet::new(subnet.network(), subnet.max_prefix_len())
        .map_err(|e| BackendError::Config(format!("address for {subnet}: {e}")))
}

/// `Backend.*` fields of the vxlan backend, as Go Flannel reads them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Config {
    pub(super) vni: u32,
    pub(super) port: u16,
    pub(super) gbp: bool,
    pub(super) learning: bool,
    pub(super) direct_routing: bool,
    /// `Backend.MTU`: the underlay MTU to assume (Flannel's meaning); each device gets it less
    /// its family's overhead. Defaults to the underlay interface's MTU.
    pub(super) underlay_mtu: u32,
}

/// `Backend.<name>`, matched case-insensitively as Go's JSON decoding does.
fn field<'a>(backend: &'a Value, name: &str) -> Option<&'a Value> {
    json_field(backend, name)
}

fn bool_field(backend: &Value, name: &str) -> Result<bool, BackendError> {
    match field(backend, name) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(BackendError::Config(format!(
            "field \"Backend.{name}\": {v} is not true or false"
        ))),
    }
}

fn uint_field(backend: &Value, name: &str, default: u32, max: u32) -> Result<u32, BackendError> {
    match field(backend, name) {
        None => Ok(default),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n <= max)
            .ok_or_else(|| {
                BackendError::Config(format!(
                    "field \"Backend.{name}\": {v} is not a whole number from 0 to {max}"
                ))
            }),
    }
}

/// The families the network config enables, IPv4 first.
pub(super) fn families(network: &NetworkConfig) -> Vec<Family> {
    let mut out = Vec::new();
    if network.enable_ipv4 {
        out.push(Family::V4);
    }
    if network.enable_ipv6 {
        out.push(Family::V6);
    }
    out
}

impl Config {
    pub(super) fn parse(network: &NetworkConfig, iface_mtu: u32) -> Result<Self, BackendError> {
        let b = &network.backend;
        let vni = uint_field(b, "VNI", DEFAULT_VNI, MAX_VNI)?;
        for f in families(network) {
            check_name(f, vni)?;
        }
        let underlay_mtu = uint_field(b, "MTU", iface_mtu, u32::MAX)?;
        let min = families(network)
            .into_iter()
            .map(|f| f.min_device_mtu() + f.overhead())
            .max()
            .unwrap_or(0);
        if underlay_mtu < min || underlay_mtu > iface_mtu {
            return Err(BackendError::Config(format!(
                "field \"Backend.MTU\": {underlay_mtu} must lie between {min} and the underlay \
                 interface's MTU {iface_mtu} (each device gets MTU - 50 for IPv4, - 70 for IPv6)"
            )));
        }
        Ok(Config {
            vni,
            port: backend_port(network, "Port", DEFAULT_PORT)?,
            gbp: bool_field(b, "GBP")?,
            learning: bool_field(b, "Learning")?,
            direct_routing: bool_field(b, "DirectRouting")?,
            underlay_mtu,
        })
    }

    pub(super) fn device_mtu(&self, family: Family) -> u32 {
        self.underlay_mtu - family.overhead()
    }
}

/// The kernel refuses names over 15 bytes: say which VNI is too long for which device.
fn check_name(family: Family, vni: u32) -> Result<(), BackendError> {
    let name = family.device_name(vni);
    if name.len() <= MAX_NAME_LEN {
        return Ok(());
    }
    let limit = match family {
        Family::V4 => "10000000",
        Family::V6 => "10000 with EnableIPv6",
    };
    Err(BackendError::Config(format!(
        "field \"Backend.VNI\": {vni} makes the device name {name:?} longer than the kernel's \
         15 characters (use a VNI below {limit})"
    )))
}

/// Parses a MAC the way Go's `net.ParseMAC` does for 6-byte addresses:
/// `aa:bb:cc:dd:ee:ff`, `aa-bb-cc-dd-ee-ff` or `aabb.ccdd.eeff`.
pub(super) fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let hex_byte = |p: &str| {
        (p.len() == 2 && p.bytes().all(|c| c.is_ascii_hexdigit()))
            .then(|| u8::from_str_radix(p, 16).ok())
            .flatten()
    };
    let mut mac = [0u8; 6];
    if s.len() == 17 {
        let sep = if s.as_bytes().get(2) == Some(&b'-') {
            '-'
        } else {
            ':'
        };
        let parts: Vec<&str> = s.split(sep).collect();
        if parts.len() != 6 {
            return None;
        }
        for (m, p) in mac.iter_mut().zip(parts) {
            *m = hex_byte(p)?;
        }
        return Some(mac);
    }
    if s.len() == 14 {
        let groups: Vec<&str> = s.split('.').collect();
        if groups.len() != 3 || groups.iter().any(|g| g.len() != 4) {
            return None;
        }
        for (i, g) in groups.iter().enumerate() {
            mac[2 * i] = hex_byte(g.get(..2)?)?;
            mac[2 * i + 1] = hex_byte(g.get(2..)?)?;
        }
        return Some(mac);
    }
    None
}

/// Our VtepMAC for a device we create: locally administered, unicast, and a function of the
/// public address (unique per node, Flannel's identity) and the VNI, so that a reboot or a
/// recreated device announces the same MAC and peers' entries stay valid.
pub(super) fn derived_mac(public_ip: IpAddr, vni: u32) -> [u8; 6] {
    match public_ip {
        IpAddr::V4(ip) => {
            let ip = ip.octets();
            [0x0e, (vni & 0xff) as u8, ip[0], ip[1], ip[2], ip[3]]
        }
        IpAddr::V6(ip) => derived_mac_v6(ip, vni),
    }
}

/// The IPv6 device's MAC: another first byte than IPv4's (`0a`), then the VNI's low byte and
/// the address's low 32 bits XORed with a hash (FNV-1a) of its upper 96. Nodes of one /96
/// (the usual underlay) thus never collide; nodes of different prefixes that share their low
/// bits (`…:a::11`, `…:b::11`) almost never do.
fn derived_mac_v6(ip: Ipv6Addr, vni: u32) -> [u8; 6] {
    let o = ip.octets();
    let hash = o[..12].iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    });
    let low = u32::from_be_bytes([o[12], o[13], o[14], o[15]]) ^ hash;
    let [a, b, c, d] = low.to_be_bytes();
    [0x0a, (vni & 0xff) as u8, a, b, c, d]
}

/// What a peer's lease says about one of its VTEPs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct PeerVtep {
    /// Absent in leases of old Flannel versions, which published only the MAC.
    pub(super) vni: Option<u64>,
    pub(super) mac: [u8; 6],
}

/// Reads `{"VNI":…,"VtepMAC":"…"}` found in the lease field `name` (`BackendData` or
/// `BackendV6Data`); an error names the field.
pub(super) fn parse_backend_data(data: Option<&Value>, name: &str) -> Result<PeerVtep, String> {
    let Some(data) = data.filter(|d| !d.is_null()) else {
        return Err(format!(
            "{name} is missing (a vxlan lease needs {{\"VtepMAC\":…}})"
        ));
    };
    if !data.is_object() {
        return Err(format!("{name}: {data} is not an object"));
    }
    let vni = match field(data, "VNI") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|n| *n <= u64::from(MAX_VNI))
                .ok_or_else(|| format!("{name}.VNI: {v} is not a VNI"))?,
        ),
    };
    let mac = match field(data, "VtepMAC") {
        None => return Err(format!("{name}.VtepMAC is missing")),
        Some(Value::String(s)) => {
            parse_mac(s).ok_or_else(|| format!("{name}.VtepMAC: {s:?} is not a MAC address"))?
        }
        Some(v) => return Err(format!("{name}.VtepMAC: {v} is not a string")),
    };
    // A group or all-zero MAC in the FDB would turn the entry into a flooding default.
    if mac[0] & 1 == 1 || mac == [0; 6] {
        return Err(format!(
            "{name}.VtepMAC: {} is not a unicast MAC address",
            format_mac(&mac)
        ));
    }
    Ok(PeerVtep { vni, mac })
}

/// `{"VNI":…,"VtepMAC":"…"}`, as Flannel publishes each device's VTEP.
pub(super) fn vtep_data(vni: u32, mac: &[u8; 6]) -> Value {
    let mut data = serde_json::Map::new();
    data.insert("VNI".into(), Value::from(vni));
    data.insert("VtepMAC".into(), Value::from(format_mac(mac)));
    Value::Object(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn network(backend: Value) -> NetworkConfig {
        let text = json!({"Network": "10.244.0.0/16", "Backend": backend}).to_string();
        NetworkConfig::parse(text.as_bytes()).expect("config")
    }

    fn dual_stack(ipv4: bool, backend: Value) -> NetworkConfig {
        let text = json!({"Network": "10.244.0.0/16", "EnableIPv4": ipv4, "EnableIPv6": true,
            "IPv6Network": "fc00:44::/48", "Backend": backend})
        .to_string();
        NetworkConfig::parse(text.as_bytes()).expect("config")
    }

    #[test]
    fn config_defaults_and_fields() {
        let c = Config::parse(&network(json!({"Type": "vxlan"})), 1500).expect("cfg");
        assert_eq!(
            c,
            Config {
                vni: 1,
                port: 8472,
                gbp: false,
                learning: false,
                direct_routing: false,
                underlay_mtu: 1500
            }
        );
        assert_eq!(c.device_mtu(Family::V4), 1450);
        let c = Config::parse(
            &network(
                json!({"type": "vxlan", "vni": 42, "port": 4789, "gbp": true,
                "directrouting": true, "MTU": 1400, "Learning": null}),
            ),
            1500,
        )
        .expect("cfg");
        assert_eq!(
            (c.vni, c.port, c.gbp, c.direct_routing),
            (42, 4789, true, true)
        );
        assert_eq!(c.device_mtu(Family::V4), 1350);
    }

    #[test]
    fn config_errors_name_the_field() {
        let err = |b: Value| {
            Config::parse(&network(b), 1500)
                .expect_err("must fail")
                .to_string()
        };
        assert!(err(json!({"Type": "vxlan", "VNI": -1})).contains("Backend.VNI"));
        assert!(err(json!({"Type": "vxlan", "VNI": 1 << 24})).contains("Backend.VNI"));
        assert!(err(json!({"Type": "vxlan", "VNI": 10_000_000})).contains("15 characters"));
        assert!(err(json!({"Type": "vxlan", "Port": 70000})).contains("Backend.Port"));
        assert!(err(json!({"Type": "vxlan", "GBP": "yes"})).contains("Backend.GBP"));
        assert!(err(json!({"Type": "vxlan", "DirectRouting": 1})).contains("Backend.DirectRouting"));
        assert!(err(json!({"Type": "vxlan", "MTU": 9000})).contains("Backend.MTU"));
        assert!(err(json!({"Type": "vxlan", "MTU": 100})).contains("Backend.MTU"));
    }

    #[test]
    fn dual_stack_config_names_sizes_and_families() {
        let c = Config::parse(&dual_stack(true, json!({"Type": "vxlan"})), 1500).expect("cfg");
        // The kernel's own headroom for an IPv6 VXLAN device: 40 + 8 + 8 + 14.
        assert_eq!(
            (c.device_mtu(Family::V4), c.device_mtu(Family::V6)),
            (1450, 1430)
        );
        assert_eq!(Family::V6.device_name(1), "flannel-v6.1");
        assert_eq!(
            families(&dual_stack(true, json!({"Type": "vxlan"}))),
            [Family::V4, Family::V6]
        );
        assert_eq!(
            families(&dual_stack(false, json!({"Type": "vxlan"}))),
            [Family::V6]
        );
        // flannel-v6. leaves 4 digits; IPv4 alone still takes 7.
        let err = |ipv4: bool, b: Value| {
            Config::parse(&dual_stack(ipv4, b), 1500)
                .expect_err("must fail")
                .to_string()
        };
        let e = err(true, json!({"Type": "vxlan", "VNI": 10000}));
        assert!(
            e.contains("\"flannel-v6.10000\"") && e.contains("15"),
            "{e}"
        );
        assert!(Config::parse(&dual_stack(true, json!({"VNI": 9999})), 1500).is_ok());
        assert!(Config::parse(&network(json!({"VNI": 10000})), 1500).is_ok());
        // IPv6 needs 1280 on the device: the kernel drops IPv6 from a smaller link.
        assert!(err(false, json!({"MTU": 1349})).contains("Backend.MTU"));
        let c = Config::parse(&dual_stack(false, json!({"MTU": 1350})), 1500).expect("cfg");
        assert_eq!(c.device_mtu(Family::V6), 1280);
    }

    #[test]
    fn macs_parse_like_go() {
        let want = Some([0xaa, 0xbb, 0xcc, 0x0d, 0xee, 0xff]);
        assert_eq!(parse_mac("aa:bb:cc:0d:ee:ff"), want);
        assert_eq!(parse_mac("AA-BB-CC-0D-EE-FF"), want);
        assert_eq!(parse_mac("aabb.cc0d.eeff"), want);
        for bad in [
            "",
            "zz:zz",
            "aa:bb:cc:dd:ee",
            "aa:bb:cc:dd:ee:f",
            "aa:bb:cc:dd:ee:fg",
            "aa:bb-cc:dd:ee:ff",
            "aa:bb:cc:dd:ee:ff:00:11",
            "+a:bb:cc:dd:ee:ff",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
        assert_eq!(format_mac(&[0x0e, 1, 172, 30, 0, 11]), "0e:01:ac:1e:00:0b");
    }

    #[test]
    fn derived_mac_is_local_unicast_and_stable() {
        let ip: IpAddr = "172.30.0.11".parse().expect("ip");
        let m = derived_mac(ip, 1);
        assert_eq!(
            m,
            [0x0e, 1, 172, 30, 0, 11],
            "unchanged for existing IPv4 nodes"
        );
        assert_eq!(m, derived_mac(ip, 1));
        assert_eq!(m[0] & 0b11, 0b10, "locally administered, unicast");
        assert_ne!(m, derived_mac("172.30.0.12".parse().expect("ip"), 1));
        assert_ne!(m, derived_mac(ip, 2));
    }

    #[test]
    fn derived_v6_mac_is_local_unicast_stable_and_spread() {
        let v6 = |s: &str| -> IpAddr { s.parse().expect("ip") };
        let m = derived_mac(v6("fd00:30::11"), 1);
        assert_eq!(m, derived_mac(v6("fd00:30::11"), 1));
        assert_eq!(m[0] & 0b11, 0b10, "locally administered, unicast");
        assert_eq!(
            (m[0], m[1]),
            (0x0a, 1),
            "not in the IPv4 devices' 0e: space"
        );
        assert_ne!(m, derived_mac(v6("fd00:30::11"), 2));
        // Within one /96 the low 32 bits alone decide: neighbours never collide.
        let same96: std::collections::HashSet<[u8; 6]> = (1..=300u16)
            .map(|i| derived_mac(IpAddr::V6(Ipv6Addr::new(0xfd00, 0x30, 0, 0, 0, 0, 0, i)), 1))
            .collect();
        assert_eq!(same96.len(), 300);
        // Other prefixes with the same low bits get other MACs.
        assert_ne!(m, derived_mac(v6("fd00:31::11"), 1));
        assert_ne!(
            derived_mac(v6("2001:db8:a::11"), 1),
            derived_mac(v6("2001:db8:b::11"), 1)
        );
    }

    #[test]
    fn backend_data_is_checked_field_by_field() {
        let ok = parse_backend_data(
            Some(&json!({"VNI": 1, "VtepMAC": "0e:01:ac:1e:00:0b"})),
            "BackendData",
        )
        .expect("valid");
        assert_eq!(ok.vni, Some(1));
        assert_eq!(ok.mac, [0x0e, 1, 172, 30, 0, 11]);
        // Old Flannel wrote only the MAC; Go decodes field names case-insensitively.
        let old = parse_backend_data(
            Some(&json!({"vtepmac": "0e:01:ac:1e:00:0b"})),
            "BackendData",
        )
        .expect("old");
        assert_eq!(old.vni, None);
        for (data, field) in [
            (None, "BackendData is missing"),
            (Some(json!(null)), "BackendData is missing"),
            (Some(json!("x")), "not an object"),
            (Some(json!({"VNI": 1})), "VtepMAC is missing"),
            (
                Some(json!({"VNI": 1, "VtepMAC": "zz:zz"})),
                "VtepMAC: \"zz:zz\"",
            ),
            (Some(json!({"VNI": 1, "VtepMAC": 7})), "VtepMAC: 7"),
            (
                Some(json!({"VNI": 1, "VtepMAC": "01:00:5e:00:00:01"})),
                "unicast",
            ),
            (
                Some(json!({"VNI": 1, "VtepMAC": "00:00:00:00:00:00"})),
                "unicast",
            ),
            (
                Some(json!({"VNI": "1", "VtepMAC": "0e:01:ac:1e:00:0b"})),
                "BackendData.VNI",
            ),
        ] {
            let e = parse_backend_data(data.as_ref(), "BackendData").expect_err("must fail");
            assert!(e.contains(field), "{e:?} should mention {field:?}");
        }
    }

    #[test]
    fn backend_v6_data_is_read_and_named() {
        let v6 = parse_backend_data(
            Some(&json!({"VNI": 1, "VtepMAC": "0a:01:4d:2f:11:9c"})),
            "BackendV6Data",
        )
        .expect("valid");
        assert_eq!(v6.mac, [0x0a, 1, 0x4d, 0x2f, 0x11, 0x9c]);
        for (data, want) in [
            (None, "BackendV6Data is missing"),
            (Some(json!({"VNI": 1})), "BackendV6Data.VtepMAC is missing"),
            (
                Some(json!({"VNI": -1, "VtepMAC": "0a:00:00:00:00:01"})),
                "BackendV6Data.VNI",
            ),
            (
                Some(json!({"VtepMAC": "33:33:00:00:00:01"})),
                "BackendV6Data.VtepMAC",
            ),
        ] {
            let e = parse_backend_data(data.as_ref(), "BackendV6Data").expect_err("must fail");
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        }
        // Our lease publishes each device's VTEP in Flannel's form.
        assert_eq!(
            vtep_data(1, &[0x0a, 1, 0x4d, 0x2f, 0x11, 0x9c]).to_string(),
            r#"{"VNI":1,"VtepMAC":"0a:01:4d:2f:11:9c"}"#
        );
    }

    #[test]
    fn a_lease_is_read_family_by_family() {
        let lease = |json: &str| Lease {
            key: SubnetKey::parse("10.244.3.0-24&fc00:44:0:3::-64").expect("key"),
            attrs: subnet_manager::lease::LeaseAttrs::from_json(json.as_bytes()).expect("attrs"),
        };
        let l = lease(
            r#"{"PublicIP":"172.30.0.13","PublicIPv6":"fd00:30::13","BackendType":"vxlan",
            "BackendData":{"VNI":1,"VtepMAC":"0e:01:ac:1e:00:0d"},
            "BackendV6Data":{"VNI":1,"VtepMAC":"0a:01:00:00:00:0d"}}"#,
        );
        let v6 = Family::V6.subnet(&l.key).expect("v6 subnet");
        assert_eq!(v6.to_string(), "fc00:44:0:3::/64");
        assert_eq!(host_net(v6).expect("host").to_string(), "fc00:44:0:3::/128");
        assert_eq!(
            Family::V6.public_ip(&l),
            Some("fd00:30::13".parse().expect("ip"))
        );
        assert!(Family::V6
            .data(&l)
            .is_some_and(|d| d["VtepMAC"] == "0a:01:00:00:00:0d"));
        let v4only = lease(r#"{"PublicIP":"172.30.0.13","PublicIPv6":null,"BackendType":"vxlan"}"#);
        assert_eq!(Family::V6.public_ip(&v4only), None);
        assert_eq!(Family::V6.data(&v4only), None);
        let unspecified = lease(r#"{"PublicIP":"0.0.0.0","PublicIPv6":"::"}"#);
        assert_eq!(Family::V4.public_ip(&unspecified), None);
        assert_eq!(Family::V6.public_ip(&unspecified), None);
    }
}
