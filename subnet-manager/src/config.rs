//! The network config at `<prefix>/config`: parsing, Flannel's defaults and Flannel's checks.
//!
//! Flannel decodes this JSON with Go's `encoding/json`: field names match case-insensitively
//! (an exact match wins) and unknown fields are ignored. A derived `Deserialize` is
//! case-sensitive, so the JSON is parsed into a [`Value`] and each field is looked up by hand.
//! `null` counts as absent for every field, as an unset field does in Go.
//!
//! The IPv4 and IPv6 rules are the same apart from their numbers, so both go through one
//! `resolve` working on `u128` addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::{Map, Value};
use thiserror::Error;

use crate::json::{field, kind};

/// Why a network config was rejected. Every message names the field and the rule it broke.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("invalid network config: not valid JSON: {0}")]
    Json(String),
    #[error("invalid network config: expected a JSON object, found {0}")]
    NotObject(&'static str),
    #[error("invalid network config: field \"{field}\": {reason}")]
    Field { field: &'static str, reason: String },
    #[error(
        "invalid network config: EnableIPv4 and EnableIPv6 are both false, so there is no network to manage"
    )]
    NoFamily,
}

fn field_error(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field,
        reason: reason.into(),
    }
}

/// The checked network config with Flannel's defaults filled in.
///
/// The fields of a disabled family are `None` (and its subnet length 0): nothing may be
/// allocated or routed for it.
#[derive(Clone, Debug, PartialEq)]
pub struct NetworkConfig {
    pub enable_ipv4: bool,
    pub enable_ipv6: bool,
    /// `Network` with host bits masked off.
    pub network: Option<Ipv4Net>,
    pub subnet_len: u8,
    /// The lowest subnet handed out (`SubnetMin`/`SubnetLen`).
    pub subnet_min: Option<Ipv4Net>,
    /// The highest subnet handed out (`SubnetMax`/`SubnetLen`).
    pub subnet_max: Option<Ipv4Net>,
    pub ipv6_network: Option<Ipv6Net>,
    pub ipv6_subnet_len: u8,
    pub ipv6_subnet_min: Option<Ipv6Net>,
    pub ipv6_subnet_max: Option<Ipv6Net>,
    /// `EnableNFTables` (Flannel v0.25+): Go Flannel then keeps its rules in nftables instead
    /// of iptables. Ours stay in our own tables either way (the daemon says which).
    pub enable_nftables: bool,
    /// `Backend.Type`, `udp` when `Backend` or its `Type` is missing.
    pub backend_type: String,
    /// The raw `Backend` object (`Value::Null` when missing) for the backend to read its own
    /// fields from.
    pub backend: Value,
}

impl NetworkConfig {
    /// Parses and checks the JSON stored at `<prefix>/config`.
    pub fn parse(json: &[u8]) -> Result<Self, ConfigError> {
        let value: Value =
            serde_json::from_slice(json).map_err(|e| ConfigError::Json(e.to_string()))?;
        let Value::Object(obj) = &value else {
            return Err(ConfigError::NotObject(kind(&value)));
        };

        // Every field is type-checked even for a disabled family, as Go's decoder does.
        let enable_ipv4 = get_bool(obj, "EnableIPv4")?.unwrap_or(true);
        let enable_ipv6 = get_bool(obj, "EnableIPv6")?.unwrap_or(false);
        let enable_nftables = get_bool(obj, "EnableNFTables")?.unwrap_or(false);
        let raw4 = Raw {
            network: get_parsed(
                obj,
                V4.network,
                "an IPv4 CIDR such as \"10.244.0.0/16\"",
                |s| {
                    Ipv4Net::from_str(s)
                        .ok()
                        .map(|n| (u128::from(u32::from(n.network())), n.prefix_len()))
                },
            )?,
            subnet_len: get_len(obj, V4.subnet_len)?,
            min: get_parsed(obj, V4.subnet_min, "an IPv4 address", |s| {
                parse_ipv4(s).map(|a| u128::from(u32::from(a)))
            })?,
            max: get_parsed(obj, V4.subnet_max, "an IPv4 address", |s| {
                parse_ipv4(s).map(|a| u128::from(u32::from(a)))
            })?,
        };
        let raw6 = Raw {
            network: get_parsed(obj, V6.network, "an IPv6 CIDR such as \"fc00::/48\"", |s| {
                Ipv6Net::from_str(s)
                    .ok()
                    .map(|n| (u128::from(n.network()), n.prefix_len()))
            })?,
            subnet_len: get_len(obj, V6.subnet_len)?,
            min: get_parsed(obj, V6.subnet_min, "an IPv6 address", |s| {
                Ipv6Addr::from_str(s).ok().map(u128::from)
            })?,
            max: get_parsed(obj, V6.subnet_max, "an IPv6 address", |s| {
                Ipv6Addr::from_str(s).ok().map(u128::from)
            })?,
        };
        let (backend_type, backend) = parse_backend(obj)?;

        if !enable_ipv4 && !enable_ipv6 {
            return Err(ConfigError::NoFamily);
        }
        let mut cfg = NetworkConfig {
            enable_ipv4,
            enable_ipv6,
            network: None,
            subnet_len: 0,
            subnet_min: None,
            subnet_max: None,
            ipv6_network: None,
            ipv6_subnet_len: 0,
            ipv6_subnet_min: None,
            ipv6_subnet_max: None,
            enable_nftables,
            backend_type,
            backend,
        };
        if enable_ipv4 {
            let r = resolve(&V4, raw4)?;
            let net = |a: u128, len: u8| Ipv4Net::new(V4.v4(a), len);
            cfg.network = net(r.network, r.prefix).ok();
            cfg.subnet_len = r.subnet_len;
            cfg.subnet_min = net(r.min, r.subnet_len).ok();
            cfg.subnet_max = net(r.max, r.subnet_len).ok();
        }
        if enable_ipv6 {
            let r = resolve(&V6, raw6)?;
            let net = |a: u128, len: u8| Ipv6Net::new(Ipv6Addr::from(a), len);
            cfg.ipv6_network = net(r.network, r.prefix).ok();
            cfg.ipv6_subnet_len = r.subnet_len;
            cfg.ipv6_subnet_min = net(r.min, r.subnet_len).ok();
            cfg.ipv6_subnet_max = net(r.max, r.subnet_len).ok();
        }
        Ok(cfg)
    }

    /// How many IPv4 subnets lie in [SubnetMin, SubnetMax] (0 when IPv4 is disabled).
    pub fn subnet_count(&self) -> u64 {
        // At most 2^30 subnets, so the u128 count always fits.
        self.range4()
            .map_or(0, |r| u64::try_from(r.count()).unwrap_or(u64::MAX))
    }

    /// How many IPv6 subnets lie in [IPv6SubnetMin, IPv6SubnetMax] (0 when IPv6 is disabled).
    /// At most 2^126, so no saturation is needed.
    pub fn ipv6_subnet_count(&self) -> u128 {
        self.range6().map_or(0, |r| r.count())
    }

    /// The IPv4 subnets from SubnetMin to SubnetMax in order (empty when IPv4 is disabled).
    pub fn ipv4_subnets(&self) -> impl Iterator<Item = Ipv4Net> {
        let len = self.subnet_len;
        self.range4()
            .into_iter()
            .flat_map(SubnetRange::iter)
            .filter_map(move |a| Ipv4Net::new(V4.v4(a), len).ok())
    }

    /// The IPv6 subnets from IPv6SubnetMin to IPv6SubnetMax in order, produced lazily: the
    /// range may hold up to 2^126 of them.
    pub fn ipv6_subnets(&self) -> impl Iterator<Item = Ipv6Net> {
        let len = self.ipv6_subnet_len;
        self.range6()
            .into_iter()
            .flat_map(SubnetRange::iter)
            .filter_map(move |a| Ipv6Net::new(Ipv6Addr::from(a), len).ok())
    }

    /// The IPv4 allocation range as numbers, `None` when IPv4 is disabled or the fields were
    /// filled in inconsistently by hand.
    pub(crate) fn range4(&self) -> Option<SubnetRange> {
        let (min, max) = (self.subnet_min?, self.subnet_max?);
        SubnetRange::new(
            32,
            self.subnet_len,
            u128::from(u32::from(min.addr())),
            u128::from(u32::from(max.addr())),
        )
    }

    /// The IPv6 allocation range as numbers, like [`Self::range4`].
    pub(crate) fn range6(&self) -> Option<SubnetRange> {
        let (min, max) = (self.ipv6_subnet_min?, self.ipv6_subnet_max?);
        SubnetRange::new(
            128,
            self.ipv6_subnet_len,
            u128::from(min.addr()),
            u128::from(max.addr()),
        )
    }
}

/// [first, last] subnet network addresses of one family as numbers, with the subnet size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SubnetRange {
    pub first: u128,
    pub last: u128,
    /// Addresses per subnet (2^(bits - len)); never 0.
    pub size: u128,
}

impl SubnetRange {
    fn new(bits: u8, len: u8, first: u128, last: u128) -> Option<Self> {
        let size = 1u128.checked_shl(u32::from(bits.checked_sub(len)?))?;
        Some(SubnetRange { first, last, size })
    }

    pub fn count(&self) -> u128 {
        if self.first > self.last {
            return 0;
        }
        (self.last - self.first) / self.size + 1
    }

    /// Network addresses from `first` to `last`, stopping rather than wrapping at the top.
    pub fn iter(self) -> impl Iterator<Item = u128> {
        std::iter::successors(Some(self.first), move |a| a.checked_add(self.size))
            .take_while(move |a| *a <= self.last)
    }
}

/// The per-family numbers and field names of Flannel's checks.
struct Rules {
    family: &'static str,
    bits: u8,
    /// The largest SubnetLen: each subnet needs room for a network, a gateway and a host.
    max_subnet_len: u8,
    /// Without SubnetLen, a Network prefix above this is too small to split into four.
    max_prefix: u8,
    /// Without SubnetLen, a Network prefix at or below this gets `wide_len` subnets...
    wide_prefix: u8,
    /// ...and a narrower one is split into four (prefix + 2).
    wide_len: u8,
    enable: &'static str,
    network: &'static str,
    subnet_len: &'static str,
    subnet_min: &'static str,
    subnet_max: &'static str,
}

const V4: Rules = Rules {
    family: "IPv4",
    bits: 32,
    max_subnet_len: 30,
    max_prefix: 28,
    wide_prefix: 22,
    wide_len: 24,
    enable: "EnableIPv4 is true (the default)",
    network: "Network",
    subnet_len: "SubnetLen",
    subnet_min: "SubnetMin",
    subnet_max: "SubnetMax",
};

const V6: Rules = Rules {
    family: "IPv6",
    bits: 128,
    max_subnet_len: 126,
    max_prefix: 124,
    wide_prefix: 62,
    wide_len: 64,
    enable: "EnableIPv6 is true",
    network: "IPv6Network",
    subnet_len: "IPv6SubnetLen",
    subnet_min: "IPv6SubnetMin",
    subnet_max: "IPv6SubnetMax",
};

impl Rules {
    fn v4(&self, a: u128) -> Ipv4Addr {
        Ipv4Addr::from(u32::try_from(a).unwrap_or(u32::MAX))
    }

    fn show(&self, a: u128) -> String {
        if self.bits == 32 {
            self.v4(a).to_string()
        } else {
            Ipv6Addr::from(a).to_string()
        }
    }

    /// All host bits of a `prefix` network.
    fn host_mask(&self, prefix: u8) -> u128 {
        let host_bits = u32::from(self.bits.saturating_sub(prefix));
        1u128
            .checked_shl(host_bits)
            .map_or(u128::MAX, |size| size - 1)
    }
}

/// One family's fields as given; `None` = absent. Zero addresses count as absent for SubnetMin
/// and SubnetMax and a zero SubnetLen as no SubnetLen, because Go cannot tell them apart.
struct Raw {
    network: Option<(u128, u8)>,
    subnet_len: Option<u64>,
    min: Option<u128>,
    max: Option<u128>,
}

struct Resolved {
    network: u128,
    prefix: u8,
    subnet_len: u8,
    min: u128,
    max: u128,
}

/// Applies Flannel's defaults and checks to one family.
fn resolve(r: &Rules, raw: Raw) -> Result<Resolved, ConfigError> {
    let Some((network, prefix)) = raw.network else {
        return Err(field_error(
            r.network,
            format!("missing: it is required when {}", r.enable),
        ));
    };
    let shown_net = format!("{}/{prefix}", r.show(network));
    if network == 0 && prefix == 0 {
        // Go's decoder leaves an unset network as exactly this value, so Flannel rejects it.
        return Err(field_error(
            r.network,
            format!("{shown_net} is not a usable network (Flannel treats it as unset)"),
        ));
    }

    let subnet_len = match raw.subnet_len.filter(|&l| l != 0) {
        Some(len) => {
            if len > u64::from(r.max_subnet_len) {
                return Err(field_error(
                    r.subnet_len,
                    format!(
                        "{len} is more than {} (the largest {} subnet length)",
                        r.max_subnet_len, r.family
                    ),
                ));
            }
            let smallest = u64::from(prefix) + 2;
            if len < smallest {
                return Err(field_error(
                    r.subnet_len,
                    format!(
                        "{len} is less than {smallest}: {} {shown_net} must hold at least four subnets",
                        r.network
                    ),
                ));
            }
            u8::try_from(len).unwrap_or(r.max_subnet_len)
        }
        None if prefix > r.max_prefix => {
            return Err(field_error(
                r.network,
                format!(
                    "{shown_net} is too small: the smallest useful {} network is /{} (it must hold four subnets)",
                    r.family, r.max_prefix
                ),
            ));
        }
        None if prefix <= r.wide_prefix => r.wide_len,
        None => prefix + 2,
    };

    let last_addr = network | r.host_mask(prefix);
    let subnet_mask = r.host_mask(subnet_len);
    let size = subnet_mask + 1;
    let check = |field: &'static str, value: Option<u128>, default: u128| match value {
        None | Some(0) => Ok(default),
        Some(a) if a < network || a > last_addr => Err(field_error(
            field,
            format!("{} is outside {} {shown_net}", r.show(a), r.network),
        )),
        Some(a) if a & subnet_mask != 0 => Err(field_error(
            field,
            format!(
                "{} is not on a /{subnet_len} boundary ({} {subnet_len})",
                r.show(a),
                r.subnet_len
            ),
        )),
        Some(a) => Ok(a),
    };
    // The first subnet is never handed out: its network address is the Network's own.
    let min = check(r.subnet_min, raw.min, network + size)?;
    let max = check(r.subnet_max, raw.max, last_addr - subnet_mask)?;
    if min > max {
        return Err(field_error(
            r.subnet_max,
            format!(
                "{} is below {} {}: no subnet is left to hand out",
                r.show(max),
                r.subnet_min,
                r.show(min)
            ),
        ));
    }
    Ok(Resolved {
        network,
        prefix,
        subnet_len,
        min,
        max,
    })
}

/// Reads `Backend` and its `Type`. A missing, `null` or empty `Type` means `udp`.
fn parse_backend(obj: &Map<String, Value>) -> Result<(String, Value), ConfigError> {
    let Some(backend) = field(obj, "Backend") else {
        return Ok(("udp".to_string(), Value::Null));
    };
    let Value::Object(fields) = backend else {
        return Err(field_error(
            "Backend",
            format!(
                "expected an object such as {{\"Type\":\"vxlan\"}}, found {}",
                kind(backend)
            ),
        ));
    };
    let backend_type = match field(fields, "Type") {
        None => "udp".to_string(),
        Some(Value::String(t)) if t.is_empty() => "udp".to_string(),
        Some(Value::String(t)) => t.clone(),
        Some(other) => {
            return Err(field_error(
                "Backend.Type",
                format!("expected a string, found {}", kind(other)),
            ))
        }
    };
    Ok((backend_type, backend.clone()))
}

/// Parses an IPv4 address as Go's `net.ParseIP(s).To4()` does: dotted quad, or the
/// IPv4-mapped IPv6 form.
pub(crate) fn parse_ipv4(s: &str) -> Option<Ipv4Addr> {
    match IpAddr::from_str(s).ok()? {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(a) => a.to_ipv4_mapped(),
    }
}

fn get_bool(obj: &Map<String, Value>, name: &'static str) -> Result<Option<bool>, ConfigError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(field_error(
            name,
            format!("expected true or false, found {}", kind(other)),
        )),
    }
}

fn get_len(obj: &Map<String, Value>, name: &'static str) -> Result<Option<u64>, ConfigError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
            field_error(
                name,
                format!("expected a non-negative integer (a prefix length), found {n}"),
            )
        }),
        Some(other) => Err(field_error(
            name,
            format!(
                "expected a non-negative integer (a prefix length), found {}",
                kind(other)
            ),
        )),
    }
}

/// Reads a string field and parses it with `parse`; `what` describes the expected text.
fn get_parsed<T>(
    obj: &Map<String, Value>,
    name: &'static str,
    what: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Option<T>, ConfigError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) => parse(s)
            .map(Some)
            .ok_or_else(|| field_error(name, format!("{} is not {what}", crate::quote(s)))),
        Some(other) => Err(field_error(
            name,
            format!("expected a string ({what}), found {}", kind(other)),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<NetworkConfig, ConfigError> {
        NetworkConfig::parse(json.as_bytes())
    }

    fn ok(json: &str) -> NetworkConfig {
        parse(json).unwrap_or_else(|e| panic!("{json}: {e}"))
    }

    fn v4(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn v6(s: &str) -> Ipv6Net {
        s.parse().unwrap()
    }

    /// The field named by a rejection, and its full message.
    fn rejected(json: &str) -> (&'static str, String) {
        match parse(json) {
            Err(e @ ConfigError::Field { field, .. }) => (field, e.to_string()),
            other => panic!("{json}: expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_for_a_slash_16() {
        let c = ok(r#"{"Network":"10.244.0.0/16"}"#);
        assert!(c.enable_ipv4);
        assert!(!c.enable_ipv6);
        assert!(!c.enable_nftables);
        assert_eq!(c.network, Some(v4("10.244.0.0/16")));
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, Some(v4("10.244.1.0/24")));
        assert_eq!(c.subnet_max, Some(v4("10.244.255.0/24")));
        assert_eq!(c.subnet_count(), 255);
        assert_eq!(c.backend_type, "udp");
        assert_eq!(c.backend, Value::Null);
        assert_eq!(c.ipv6_network, None);
        assert_eq!(c.ipv6_subnet_len, 0);
        assert_eq!(c.ipv6_subnet_count(), 0);
        assert_eq!(c.ipv6_subnets().count(), 0);
    }

    #[test]
    fn default_subnet_len_is_24_up_to_slash_22() {
        let c = ok(r#"{"Network":"10.0.0.0/22"}"#);
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_count(), 3);
    }

    #[test]
    fn default_subnet_len_is_prefix_plus_two_for_small_networks() {
        assert_eq!(ok(r#"{"Network":"10.0.0.0/23"}"#).subnet_len, 25);
        let c = ok(r#"{"Network":"10.0.0.0/28"}"#);
        assert_eq!(c.subnet_len, 30);
        assert_eq!(c.subnet_min, Some(v4("10.0.0.4/30")));
        assert_eq!(c.subnet_max, Some(v4("10.0.0.12/30")));
    }

    #[test]
    fn network_smaller_than_28_without_subnet_len_is_too_small() {
        let (field, msg) = rejected(r#"{"Network":"10.0.0.0/29"}"#);
        assert_eq!(field, "Network");
        assert!(msg.contains("too small"), "{msg}");
        assert!(msg.contains("/28"), "{msg}");
    }

    #[test]
    fn host_bits_of_network_are_masked_off() {
        let c = ok(r#"{"Network":"10.244.7.9/16"}"#);
        assert_eq!(c.network, Some(v4("10.244.0.0/16")));
        assert_eq!(c.subnet_min, Some(v4("10.244.1.0/24")));
    }

    #[test]
    fn explicit_subnet_len_min_max() {
        let c = ok(
            r#"{"Network":"10.0.0.0/8","SubnetLen":20,"SubnetMin":"10.10.0.0","SubnetMax":"10.99.240.0"}"#,
        );
        assert_eq!(c.subnet_len, 20);
        assert_eq!(c.subnet_min, Some(v4("10.10.0.0/20")));
        assert_eq!(c.subnet_max, Some(v4("10.99.240.0/20")));
        assert_eq!(c.subnet_count(), (0x63f0 - 0x0a00) / 0x10 + 1);
    }

    #[test]
    fn zero_subnet_len_and_zero_addresses_mean_unset_as_in_go() {
        let c = ok(
            r#"{"Network":"10.244.0.0/16","SubnetLen":0,"SubnetMin":"0.0.0.0","SubnetMax":"0.0.0.0"}"#,
        );
        assert_eq!(c, ok(r#"{"Network":"10.244.0.0/16"}"#));
    }

    #[test]
    fn nulls_count_as_absent() {
        let c = ok(
            r#"{"Network":"10.244.0.0/16","SubnetLen":null,"SubnetMin":null,"EnableIPv6":null,"Backend":null}"#,
        );
        assert_eq!(c, ok(r#"{"Network":"10.244.0.0/16"}"#));
    }

    #[test]
    fn subnet_len_above_30_is_rejected() {
        let (field, msg) = rejected(r#"{"Network":"10.244.0.0/16","SubnetLen":31}"#);
        assert_eq!(field, "SubnetLen");
        assert_eq!(
            msg,
            "invalid network config: field \"SubnetLen\": 31 is more than 30 (the largest IPv4 subnet length)"
        );
        assert_eq!(
            rejected(r#"{"Network":"10.244.0.0/16","SubnetLen":300}"#).0,
            "SubnetLen"
        );
    }

    #[test]
    fn subnet_len_must_leave_four_subnets() {
        let (field, msg) = rejected(r#"{"Network":"10.244.0.0/16","SubnetLen":17}"#);
        assert_eq!(field, "SubnetLen");
        assert!(msg.contains("17 is less than 18"), "{msg}");
        ok(r#"{"Network":"10.244.0.0/16","SubnetLen":18}"#);
        // A /29 would need /31 subnets, which the 30 limit forbids.
        assert_eq!(
            rejected(r#"{"Network":"10.0.0.0/29","SubnetLen":30}"#).0,
            "SubnetLen"
        );
    }

    #[test]
    fn subnet_min_and_max_must_lie_inside_network() {
        let (field, msg) = rejected(r#"{"Network":"10.244.0.0/16","SubnetMin":"10.245.0.0"}"#);
        assert_eq!(field, "SubnetMin");
        assert!(msg.contains("outside Network 10.244.0.0/16"), "{msg}");
        let (field, _) = rejected(r#"{"Network":"10.244.0.0/16","SubnetMax":"10.243.255.0"}"#);
        assert_eq!(field, "SubnetMax");
    }

    #[test]
    fn subnet_min_and_max_must_be_on_a_boundary() {
        let (field, msg) = rejected(r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.128"}"#);
        assert_eq!(field, "SubnetMin");
        assert!(msg.contains("not on a /24 boundary"), "{msg}");
        let (field, _) = rejected(r#"{"Network":"10.244.0.0/16","SubnetMax":"10.244.9.1"}"#);
        assert_eq!(field, "SubnetMax");
    }

    #[test]
    fn subnet_min_above_max_is_rejected() {
        let (field, msg) = rejected(
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.9.0","SubnetMax":"10.244.8.0"}"#,
        );
        assert_eq!(field, "SubnetMax");
        assert!(msg.contains("below SubnetMin 10.244.9.0"), "{msg}");
        // Equal is one subnet, fine.
        let c =
            ok(r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.9.0","SubnetMax":"10.244.9.0"}"#);
        assert_eq!(c.subnet_count(), 1);
    }

    #[test]
    fn network_is_required_when_ipv4_is_enabled() {
        let (field, msg) = rejected(r#"{"Backend":{"Type":"vxlan"}}"#);
        assert_eq!(field, "Network");
        assert!(msg.contains("required"), "{msg}");
        assert_eq!(rejected(r#"{"Network":"0.0.0.0/0"}"#).0, "Network");
    }

    #[test]
    fn both_families_disabled_is_rejected() {
        assert_eq!(
            parse(r#"{"Network":"10.244.0.0/16","EnableIPv4":false}"#),
            Err(ConfigError::NoFamily)
        );
    }

    #[test]
    fn wrong_json_types_name_the_field_and_type() {
        let cases = [
            (r#"{"Network":12}"#, "Network", "expected a string"),
            (
                r#"{"Network":"10.244.0.0/16","SubnetLen":"24"}"#,
                "SubnetLen",
                "expected a non-negative integer",
            ),
            (
                r#"{"Network":"10.244.0.0/16","SubnetLen":-1}"#,
                "SubnetLen",
                "found -1",
            ),
            (
                r#"{"Network":"10.244.0.0/16","SubnetLen":24.5}"#,
                "SubnetLen",
                "found 24.5",
            ),
            (
                r#"{"Network":"10.244.0.0/16","EnableIPv6":"yes"}"#,
                "EnableIPv6",
                "expected true or false",
            ),
            (
                r#"{"Network":"10.244.0.0/16","EnableNFTables":"true"}"#,
                "EnableNFTables",
                "expected true or false",
            ),
            (
                r#"{"Network":"10.244.0.0/16","SubnetMin":[]}"#,
                "SubnetMin",
                "found an array",
            ),
            (
                r#"{"Network":"10.244.0.0/16","Backend":"vxlan"}"#,
                "Backend",
                "expected an object",
            ),
            (
                r#"{"Network":"10.244.0.0/16","Backend":{"Type":1}}"#,
                "Backend.Type",
                "expected a string",
            ),
        ];
        for (json, want_field, want_text) in cases {
            let (field, msg) = rejected(json);
            assert_eq!(field, want_field, "{json}");
            assert!(msg.contains(want_text), "{json}: {msg}");
        }
    }

    #[test]
    fn unparsable_values_are_rejected() {
        let cases = [
            (r#"{"Network":"10.244.0.0"}"#, "Network"),
            (r#"{"Network":"10.244.0.0/33"}"#, "Network"),
            (r#"{"Network":"fc00::/48"}"#, "Network"),
            (
                r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.x"}"#,
                "SubnetMin",
            ),
            (
                r#"{"Network":"10.244.0.0/16","SubnetMax":"10.244.1.0/24"}"#,
                "SubnetMax",
            ),
            (
                r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"10.0.0.0/8"}"#,
                "IPv6Network",
            ),
        ];
        for (json, want_field) in cases {
            assert_eq!(rejected(json).0, want_field, "{json}");
        }
    }

    #[test]
    fn not_json_or_not_an_object() {
        assert!(matches!(parse("{"), Err(ConfigError::Json(_))));
        assert_eq!(parse("[1]"), Err(ConfigError::NotObject("an array")));
        assert_eq!(
            parse("\"x\"").unwrap_err().to_string(),
            "invalid network config: expected a JSON object, found a string"
        );
    }

    #[test]
    fn field_names_are_case_insensitive_exact_match_wins() {
        let c = ok(r#"{"network":"10.5.0.0/16","subnetlen":20,"BACKEND":{"type":"host-gw"}}"#);
        assert_eq!(c.network, Some(v4("10.5.0.0/16")));
        assert_eq!(c.subnet_len, 20);
        assert_eq!(c.backend_type, "host-gw");
        let c = ok(r#"{"network":"10.5.0.0/16","Network":"10.6.0.0/16"}"#);
        assert_eq!(c.network, Some(v4("10.6.0.0/16")));
    }

    #[test]
    fn enable_nftables_is_read_case_insensitively() {
        assert!(ok(r#"{"Network":"10.244.0.0/16","EnableNFTables":true}"#).enable_nftables);
        assert!(ok(r#"{"Network":"10.244.0.0/16","enableNFTables":true}"#).enable_nftables);
        assert!(!ok(r#"{"Network":"10.244.0.0/16","EnableNFTables":false}"#).enable_nftables);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        ok(r#"{"Network":"10.244.0.0/16","Networks":["x"],"Comment":{"a":1}}"#);
    }

    #[test]
    fn backend_missing_or_without_type_is_udp() {
        assert_eq!(ok(r#"{"Network":"10.244.0.0/16"}"#).backend_type, "udp");
        let c = ok(r#"{"Network":"10.244.0.0/16","Backend":{"Port":9000}}"#);
        assert_eq!(c.backend_type, "udp");
        assert_eq!(c.backend["Port"], 9000);
    }

    #[test]
    fn backend_type_and_extra_fields_are_kept() {
        let c = ok(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":4096,"DirectRouting":true}}"#,
        );
        assert_eq!(c.backend_type, "vxlan");
        assert_eq!(c.backend["VNI"], 4096);
        assert_eq!(c.backend["DirectRouting"], true);
        assert_eq!(c.backend["Type"], "vxlan");
    }

    #[test]
    fn ipv4_subnets_iterates_min_to_max() {
        let c = ok(r#"{"Network":"10.0.0.0/26","SubnetLen":29}"#);
        let all: Vec<_> = c.ipv4_subnets().collect();
        assert_eq!(all.len(), 7);
        assert_eq!(c.subnet_count(), 7);
        assert_eq!(all[0], v4("10.0.0.8/29"));
        assert_eq!(all[6], v4("10.0.0.56/29"));
    }

    #[test]
    fn ipv4_subnets_stop_at_the_top_of_the_address_space() {
        let c = ok(r#"{"Network":"255.255.255.0/24"}"#);
        assert_eq!(c.subnet_len, 26);
        let all: Vec<_> = c.ipv4_subnets().collect();
        assert_eq!(all.last(), Some(&v4("255.255.255.192/26")));
        assert_eq!(all.len(), 3);
    }

    #[test]
    fn ipv6_defaults() {
        let c = ok(r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48"}"#);
        assert_eq!(c.ipv6_network, Some(v6("fc00::/48")));
        assert_eq!(c.ipv6_subnet_len, 64);
        assert_eq!(c.ipv6_subnet_min, Some(v6("fc00:0:0:1::/64")));
        assert_eq!(c.ipv6_subnet_max, Some(v6("fc00:0:0:ffff::/64")));
        assert_eq!(c.ipv6_subnet_count(), 65535);
        let c = ok(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/120"}"#);
        assert_eq!(c.ipv6_subnet_len, 122);
        assert_eq!(c.network, None);
        assert_eq!(c.subnet_min, None);
        assert_eq!(c.subnet_count(), 0);
        assert_eq!(c.ipv4_subnets().count(), 0);
        assert_eq!(
            ok(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/62"}"#)
                .ipv6_subnet_len,
            64
        );
        assert_eq!(
            ok(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/63"}"#)
                .ipv6_subnet_len,
            65
        );
    }

    #[test]
    fn ipv6_huge_range_is_counted_and_iterated_lazily() {
        let c = ok(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"::/1","IPv6SubnetLen":126}"#,
        );
        assert_eq!(c.ipv6_subnet_count(), (1u128 << 125) - 1);
        let first: Vec<_> = c.ipv6_subnets().take(2).collect();
        assert_eq!(first, vec![v6("::4/126"), v6("::8/126")]);
    }

    #[test]
    fn ipv6_rejections() {
        let base = r#""EnableIPv4":false,"EnableIPv6":true"#;
        let cases = [
            (String::new(), "IPv6Network", "required"),
            (r#","IPv6Network":"fc00::/125""#.to_string(), "IPv6Network", "too small"),
            (
                r#","IPv6Network":"fc00::/48","IPv6SubnetLen":127"#.to_string(),
                "IPv6SubnetLen",
                "127 is more than 126 (the largest IPv6 subnet length)",
            ),
            (
                r#","IPv6Network":"fc00::/48","IPv6SubnetLen":49"#.to_string(),
                "IPv6SubnetLen",
                "49 is less than 50",
            ),
            (
                r#","IPv6Network":"fc00::/48","IPv6SubnetMin":"fc01::""#.to_string(),
                "IPv6SubnetMin",
                "outside IPv6Network fc00::/48",
            ),
            (
                r#","IPv6Network":"fc00::/48","IPv6SubnetMax":"fc00:0:0:5::1""#.to_string(),
                "IPv6SubnetMax",
                "not on a /64 boundary",
            ),
            (
                r#","IPv6Network":"fc00::/48","IPv6SubnetMin":"fc00:0:0:9::","IPv6SubnetMax":"fc00:0:0:8::""#
                    .to_string(),
                "IPv6SubnetMax",
                "below IPv6SubnetMin",
            ),
            (r#","IPv6Network":"::/0""#.to_string(), "IPv6Network", "unset"),
        ];
        for (extra, want_field, want_text) in cases {
            let json = format!("{{{base}{extra}}}");
            let (field, msg) = rejected(&json);
            assert_eq!(field, want_field, "{json}");
            assert!(msg.contains(want_text), "{json}: {msg}");
        }
    }

    #[test]
    fn disabled_family_fields_are_still_type_checked_but_not_range_checked() {
        // IPv6 disabled: its fields are parsed but not checked against each other.
        ok(r#"{"Network":"10.244.0.0/16","IPv6Network":"fc00::/127"}"#);
        assert_eq!(
            rejected(r#"{"Network":"10.244.0.0/16","IPv6SubnetLen":"x"}"#).0,
            "IPv6SubnetLen"
        );
    }
}
