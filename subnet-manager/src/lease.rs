//! Lease keys (`<prefix>/subnets/10.244.3.0-24[&fc00:0:0:3::-64]`) and lease values (the JSON
//! `LeaseAttrs`), byte-compatible with what Go Flannel writes and reads.
//!
//! Reading is lenient where Flannel's writers vary (absent or `null` fields, any case for field
//! names, any valid IPv6 text); writing produces exactly Flannel's canonical form, so a Go
//! Flannel node and flanneld-rs agree on every key and value.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::Value;
use thiserror::Error;

use crate::config::parse_ipv4;
use crate::json::{field as lookup, kind as json_kind};

/// Why a lease key or value was not understood. Each message names the key (when known) and
/// what is wrong with it, so a log line points at the etcd entry to fix.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum LeaseError {
    /// The part after `<prefix>/subnets/` is not `<ipv4>-<len>[&<ipv6>-<len>]`.
    #[error("lease {}: bad key: {reason}", crate::quote(.key))]
    Key { key: String, reason: String },
    /// The value is not a JSON object.
    #[error("{}value is not a JSON object: {reason}", label(.key))]
    Json { key: Option<String>, reason: String },
    /// A field of the value has the wrong type or an unparsable address.
    #[error("{}field \"{field}\": {reason}", label(.key))]
    Field {
        key: Option<String>,
        field: &'static str,
        reason: String,
    },
}

fn label(key: &Option<String>) -> String {
    match key {
        Some(k) => format!("lease {}: ", crate::quote(k)),
        None => "lease value: ".to_string(),
    }
}

impl LeaseError {
    /// Names the etcd key in a value error, which [`LeaseAttrs::from_json`] cannot know.
    pub fn with_key(self, full_key: &str) -> Self {
        match self {
            LeaseError::Json { reason, .. } => LeaseError::Json {
                key: Some(full_key.to_string()),
                reason,
            },
            LeaseError::Field { field, reason, .. } => LeaseError::Field {
                key: Some(full_key.to_string()),
                field,
                reason,
            },
            LeaseError::Key { reason, .. } => LeaseError::Key {
                key: full_key.to_string(),
                reason,
            },
        }
    }
}

/// The subnet(s) a lease key names. At least one family is present.
///
/// An IPv6-only lease is written the way Go Flannel writes it, with the empty IPv4 placeholder:
/// `0.0.0.0-0&fc00:0:0:3::-64`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubnetKey {
    pub ipv4: Option<Ipv4Net>,
    pub ipv6: Option<Ipv6Net>,
}

/// Go's `ip.IP4Net{}`: Flannel's key for "no IPv4 subnet".
const EMPTY_V4: &str = "0.0.0.0-0";

impl SubnetKey {
    /// Parses a key suffix (the part after `<prefix>/subnets/`).
    ///
    /// Stricter than Flannel's unanchored regex: junk around the subnets, host bits and prefix
    /// lengths out of range are errors. Any valid IPv6 text is accepted, but [`fmt::Display`]
    /// writes the canonical form, which is the one Flannel writes.
    pub fn parse(suffix: &str) -> Result<SubnetKey, LeaseError> {
        parse_suffix(suffix).map_err(|reason| LeaseError::Key {
            key: suffix.to_string(),
            reason,
        })
    }

    /// Parses a full etcd key. `None` when it is not under `<prefix>/subnets/` (not a lease);
    /// errors name the full key.
    ///
    /// Unlike [`parse`](Self::parse), only the canonical spelling (the one Flannel writes) is a
    /// lease: `10.244.5.0-024` or a long IPv6 form names the same subnet under another etcd key,
    /// and taking it would let one write stand in for another node's lease, or its deletion
    /// delete that node's subnet everywhere.
    pub fn from_key(prefix: &str, full_key: &str) -> Option<Result<SubnetKey, LeaseError>> {
        let suffix = full_key.strip_prefix(&subnets_prefix(prefix))?;
        let parsed = parse_suffix(suffix).and_then(|key| {
            let canonical = key.to_string();
            if canonical == suffix {
                Ok(key)
            } else {
                Err(format!(
                    "not the canonical spelling of its subnet, {canonical}: another key for the subnet of that lease"
                ))
            }
        });
        Some(parsed.map_err(|reason| LeaseError::Key {
            key: full_key.to_string(),
            reason,
        }))
    }

    /// The full etcd key `<prefix>/subnets/<suffix>`; a trailing `/` on `prefix` is ignored.
    pub fn to_key(&self, prefix: &str) -> String {
        format!("{}{self}", subnets_prefix(prefix))
    }
}

fn subnets_prefix(prefix: &str) -> String {
    format!("{}/subnets/", prefix.trim_end_matches('/'))
}

impl fmt::Display for SubnetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ipv4 {
            Some(n) => write!(f, "{}-{}", n.addr(), n.prefix_len())?,
            None => f.write_str(EMPTY_V4)?,
        }
        if let Some(n) = self.ipv6 {
            write!(f, "&{}-{}", n.addr(), n.prefix_len())?;
        }
        Ok(())
    }
}

fn parse_suffix(suffix: &str) -> Result<SubnetKey, String> {
    let mut parts = suffix.split('&');
    let v4_part = parts.next().unwrap_or_default();
    let v6_part = parts.next();
    if parts.next().is_some() {
        return Err(
            "more than one '&' (expected <IPv4 subnet>-<len>[&<IPv6 subnet>-<len>])".into(),
        );
    }
    let ipv6 = v6_part.map(parse_v6_part).transpose()?;
    let ipv4 = if v4_part == EMPTY_V4 {
        if ipv6.is_none() {
            return Err(format!(
                "{EMPTY_V4} names no subnet and no IPv6 subnet follows"
            ));
        }
        None
    } else {
        Some(parse_v4_part(v4_part)?)
    };
    Ok(SubnetKey { ipv4, ipv6 })
}

/// Splits `<addr>-<len>` and checks the length is plain decimal (no sign) and at most `max`.
fn split_part<'a>(part: &'a str, family: &str, max: u8) -> Result<(&'a str, u8), String> {
    let q = crate::quote(part);
    let Some((addr, len)) = part.rsplit_once('-') else {
        return Err(format!(
            "{q} is not <{family} subnet>-<prefix length>, e.g. 10.244.3.0-24"
        ));
    };
    let len = Some(len)
        .filter(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|l| l.parse::<u8>().ok())
        .filter(|&l| l <= max)
        .ok_or_else(|| {
            format!(
                "{q}: {} is not a {family} prefix length (0 to {max})",
                crate::quote(len)
            )
        })?;
    Ok((addr, len))
}

fn parse_v4_part(part: &str) -> Result<Ipv4Net, String> {
    let (addr, len) = split_part(part, "IPv4", 32)?;
    let part = crate::quote(part);
    let addr = Ipv4Addr::from_str(addr)
        .map_err(|_| format!("{part}: {} is not an IPv4 address", crate::quote(addr)))?;
    let net = Ipv4Net::new(addr, len).map_err(|e| format!("{part}: {e}"))?;
    if net.network() != addr {
        return Err(format!(
            "{part} has host bits set (the subnet would be {}-{len})",
            net.network()
        ));
    }
    Ok(net)
}

fn parse_v6_part(part: &str) -> Result<Ipv6Net, String> {
    let (addr, len) = split_part(part, "IPv6", 128)?;
    let part = crate::quote(part);
    let addr = Ipv6Addr::from_str(addr)
        .map_err(|_| format!("{part}: {} is not an IPv6 address", crate::quote(addr)))?;
    let net = Ipv6Net::new(addr, len).map_err(|e| format!("{part}: {e}"))?;
    if net.network() != addr {
        return Err(format!(
            "{part} has host bits set (the subnet would be {}-{len})",
            net.network()
        ));
    }
    Ok(net)
}

/// A lease's value: Flannel's `LeaseAttrs`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseAttrs {
    /// `0.0.0.0` when absent, as Go's zero `ip.IP4`.
    pub public_ip: Ipv4Addr,
    pub public_ipv6: Option<Ipv6Addr>,
    /// `None` for udp leases: Flannel's udp backend writes no `BackendType`.
    pub backend_type: Option<String>,
    pub backend_data: Option<Value>,
    pub backend_v6_data: Option<Value>,
}

impl LeaseAttrs {
    /// Flannel's exact JSON: `PublicIP` and `PublicIPv6` always (`null` when none), then
    /// `BackendType`, `BackendData`, `BackendV6Data` only when set, non-empty and not `null`
    /// (Go's `omitempty`). Objects inside BackendData are written with their keys sorted.
    pub fn to_json(&self) -> String {
        let mut out = format!("{{\"PublicIP\":\"{}\",\"PublicIPv6\":", self.public_ip);
        match self.public_ipv6 {
            Some(a) => out.push_str(&format!("\"{a}\"")),
            None => out.push_str("null"),
        }
        if let Some(t) = self.backend_type.as_deref().filter(|t| !t.is_empty()) {
            out.push_str(",\"BackendType\":");
            out.push_str(&Value::String(t.to_string()).to_string());
        }
        for (name, data) in [
            ("BackendData", &self.backend_data),
            ("BackendV6Data", &self.backend_v6_data),
        ] {
            if let Some(v) = data.as_ref().filter(|v| !v.is_null()) {
                out.push_str(&format!(",\"{name}\":{v}"));
            }
        }
        out.push('}');
        out
    }

    /// Reads a lease value. Field names match in any case, absent and `null` are accepted for
    /// every field and unknown fields are ignored, like Go's decoder; an empty `BackendType` or
    /// a `null` backend data reads as `None`.
    pub fn from_json(bytes: &[u8]) -> Result<LeaseAttrs, LeaseError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| LeaseError::Json {
            key: None,
            reason: e.to_string(),
        })?;
        let Value::Object(obj) = &value else {
            return Err(LeaseError::Json {
                key: None,
                reason: format!("found {}", json_kind(&value)),
            });
        };
        let string = |field: &'static str, what: &str| -> Result<Option<&str>, LeaseError> {
            match lookup(obj, field) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s)),
                Some(other) => Err(field_error(
                    field,
                    format!("expected a string ({what}), found {}", json_kind(other)),
                )),
            }
        };
        let public_ip = match string("PublicIP", "an IPv4 address")? {
            None => Ipv4Addr::UNSPECIFIED,
            Some(s) => parse_ipv4(s).ok_or_else(|| {
                field_error(
                    "PublicIP",
                    format!("{} is not an IPv4 address", crate::quote(s)),
                )
            })?,
        };
        let public_ipv6 = string("PublicIPv6", "an IPv6 address")?
            .map(|s| {
                Ipv6Addr::from_str(s).map_err(|_| {
                    field_error(
                        "PublicIPv6",
                        format!("{} is not an IPv6 address", crate::quote(s)),
                    )
                })
            })
            .transpose()?;
        let backend_type = string("BackendType", "a backend name")?
            .filter(|t| !t.is_empty())
            .map(str::to_string);
        Ok(LeaseAttrs {
            public_ip,
            public_ipv6,
            backend_type,
            backend_data: lookup(obj, "BackendData").cloned(),
            backend_v6_data: lookup(obj, "BackendV6Data").cloned(),
        })
    }
}

fn field_error(field: &'static str, reason: String) -> LeaseError {
    LeaseError::Field {
        key: None,
        field,
        reason,
    }
}

/// One subnet lease as stored in etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub key: SubnetKey,
    pub attrs: LeaseAttrs,
}

impl Lease {
    /// Parses one etcd entry. `None` for keys that are not under `<prefix>/subnets/` (ignored,
    /// as Flannel does); an error names the full key so the entry can be skipped and logged
    /// without affecting any other lease.
    pub fn parse(prefix: &str, full_key: &str, value: &[u8]) -> Option<Result<Lease, LeaseError>> {
        let key = match SubnetKey::from_key(prefix, full_key)? {
            Ok(key) => key,
            // Flannel ignores keys that are not `<subnet>-<len>`: they are not leases.
            Err(e) => {
                tracing::debug!("ignoring a key that is not a lease: {e}");
                return None;
            }
        };
        Some(
            LeaseAttrs::from_json(value)
                .map(|attrs| Lease { key, attrs })
                .map_err(|e| e.with_key(full_key)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const PREFIX: &str = "/coreos.com/network";

    fn key(s: &str) -> SubnetKey {
        SubnetKey::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn attrs(ip: &str) -> LeaseAttrs {
        LeaseAttrs {
            public_ip: ip.parse().unwrap(),
            public_ipv6: None,
            backend_type: None,
            backend_data: None,
            backend_v6_data: None,
        }
    }

    #[test]
    fn ipv4_key_round_trip() {
        let k = key("10.244.3.0-24");
        assert_eq!(k.ipv4, Some("10.244.3.0/24".parse().unwrap()));
        assert_eq!(k.ipv6, None);
        assert_eq!(k.to_string(), "10.244.3.0-24");
        assert_eq!(
            k.to_key(PREFIX),
            "/coreos.com/network/subnets/10.244.3.0-24"
        );
        assert_eq!(k.to_key("/coreos.com/network/"), k.to_key(PREFIX));
        assert_eq!(SubnetKey::from_key(PREFIX, &k.to_key(PREFIX)), Some(Ok(k)));
    }

    #[test]
    fn dual_stack_key_round_trip() {
        let k = key("10.244.3.0-24&fc00:0:0:3::-64");
        assert_eq!(k.ipv6, Some("fc00:0:0:3::/64".parse().unwrap()));
        assert_eq!(k.to_string(), "10.244.3.0-24&fc00:0:0:3::-64");
        // Any valid IPv6 text is read; the canonical (Go net.IP.String) form is written.
        let long = key("10.244.3.0-24&FC00:0000:0000:0003:0000:0000:0000:0000-64");
        assert_eq!(long, k);
        assert_eq!(long.to_string(), "10.244.3.0-24&fc00:0:0:3::-64");
    }

    #[test]
    fn ipv6_only_key_uses_gos_empty_ipv4_placeholder() {
        let k = key("0.0.0.0-0&fc00:0:0:3::-64");
        assert_eq!(k.ipv4, None);
        assert_eq!(k.to_string(), "0.0.0.0-0&fc00:0:0:3::-64");
    }

    #[test]
    fn from_key_ignores_other_keys() {
        assert_eq!(
            SubnetKey::from_key(PREFIX, "/coreos.com/network/config"),
            None
        );
        assert_eq!(
            SubnetKey::from_key(PREFIX, "/other/subnets/10.0.0.0-24"),
            None
        );
        assert_eq!(
            SubnetKey::from_key(PREFIX, "/coreos.com/network/subnets"),
            None
        );
        let e = SubnetKey::from_key(PREFIX, "/coreos.com/network/subnets/junk").unwrap();
        assert!(e
            .unwrap_err()
            .to_string()
            .starts_with("lease \"/coreos.com/network/subnets/junk\": bad key:"),);
    }

    #[test]
    fn etcd_keys_must_be_spelled_as_flannel_writes_them() {
        for alias in [
            "10.244.5.0-024",
            "10.244.3.0-24&FC00:0000:0000:0003:0000:0000:0000:0000-64",
            "10.244.3.0-24&fc00:0:0:3:0::-64",
        ] {
            let full = format!("{PREFIX}/subnets/{alias}");
            let err = SubnetKey::from_key(PREFIX, &full)
                .unwrap()
                .expect_err(alias)
                .to_string();
            assert!(err.contains("canonical spelling"), "{err}");
            assert!(err.contains(&full[..40]), "{err}");
        }
        // Read leniently where no etcd key is at stake.
        assert_eq!(key("10.244.5.0-024"), key("10.244.5.0-24"));
    }

    #[test]
    fn malformed_keys_are_rejected() {
        for bad in [
            "",
            "junk",
            "10.244.3.0",
            "10.244.3.0-",
            "10.244.3.0-+24",
            "10.244.3.0-24x",
            "10.244.3.0-33",
            "10.244.3.0-999",
            "10.244.3.1-24",
            "10.244.3-24",
            "10.244.3.0/24",
            "x10.244.3.0-24",
            "10.244.3.0-24&",
            "10.244.3.0-24&fc00::-129",
            "10.244.3.0-24&fc00::1-64",
            "10.244.3.0-24&10.0.0.0-8",
            "10.244.3.0-24&fc00::-64&fc01::-64",
            "0.0.0.0-0",
            "fc00::-64",
            "10.244.3.0-24/extra",
        ] {
            assert!(
                matches!(SubnetKey::parse(bad), Err(LeaseError::Key { .. })),
                "{bad:?} was accepted"
            );
        }
        let msg = SubnetKey::parse("10.244.3.1-24").unwrap_err().to_string();
        assert!(msg.contains("host bits"), "{msg}");
        assert!(msg.contains("10.244.3.0-24"), "{msg}");
    }

    #[test]
    fn udp_lease_bytes_match_flannel() {
        let a = attrs("192.168.1.10");
        let json = r#"{"PublicIP":"192.168.1.10","PublicIPv6":null}"#;
        assert_eq!(a.to_json(), json);
        assert_eq!(LeaseAttrs::from_json(json.as_bytes()), Ok(a));
    }

    #[test]
    fn vxlan_lease_bytes_match_flannel() {
        let a = LeaseAttrs {
            backend_type: Some("vxlan".into()),
            backend_data: Some(json!({"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:ff"})),
            ..attrs("192.168.1.10")
        };
        let json = r#"{"PublicIP":"192.168.1.10","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}"#;
        assert_eq!(a.to_json(), json);
        assert_eq!(LeaseAttrs::from_json(json.as_bytes()), Ok(a));
    }

    #[test]
    fn wireguard_dual_stack_lease_round_trip() {
        let a = LeaseAttrs {
            public_ipv6: Some("2001:db8::10".parse().unwrap()),
            backend_type: Some("wireguard".into()),
            backend_data: Some(json!({"PublicKey": "abc=", "Port": 51820})),
            backend_v6_data: Some(json!({"PublicKey": "abc=", "Port": 51821})),
            ..attrs("192.168.1.10")
        };
        let json = a.to_json();
        assert_eq!(
            json,
            r#"{"PublicIP":"192.168.1.10","PublicIPv6":"2001:db8::10","BackendType":"wireguard","BackendData":{"PublicKey":"abc=","Port":51820},"BackendV6Data":{"PublicKey":"abc=","Port":51821}}"#
        );
        assert_eq!(LeaseAttrs::from_json(json.as_bytes()), Ok(a));
        // Older Flannel: no Port, field order as Go writes it.
        let old = r#"{"PublicIP":"192.168.1.11","PublicIPv6":null,"BackendType":"wireguard","BackendData":{"PublicKey":"xyz="}}"#;
        let a = LeaseAttrs::from_json(old.as_bytes()).unwrap();
        assert_eq!(a.backend_data, Some(json!({"PublicKey": "xyz="})));
    }

    #[test]
    fn empty_values_are_omitted() {
        let a = LeaseAttrs {
            backend_type: Some(String::new()),
            backend_data: Some(Value::Null),
            ..attrs("10.0.0.1")
        };
        assert_eq!(a.to_json(), r#"{"PublicIP":"10.0.0.1","PublicIPv6":null}"#);
    }

    #[test]
    fn reading_is_lenient() {
        let a = LeaseAttrs::from_json(
            br#"{"publicip":"10.0.0.1","PUBLICIPV6":null,"backendtype":"","BackendData":null,"Extra":[1]}"#,
        )
        .unwrap();
        assert_eq!(a, attrs("10.0.0.1"));
        // Absent PublicIP reads as 0.0.0.0, like Go's zero value.
        assert_eq!(LeaseAttrs::from_json(b"{}").unwrap(), attrs("0.0.0.0"));
        assert_eq!(
            LeaseAttrs::from_json(br#"{"PublicIP":null}"#).unwrap(),
            attrs("0.0.0.0")
        );
        assert_eq!(
            LeaseAttrs::from_json(br#"{"PublicIP":"::ffff:10.0.0.1"}"#).unwrap(),
            attrs("10.0.0.1")
        );
    }

    #[test]
    fn malformed_values_are_rejected_naming_the_field() {
        let cases: [(&[u8], &str); 8] = [
            (br#"{"PublicIP":"10.0.0.x"}"#, "field \"PublicIP\""),
            (br#"{"PublicIP":"fc00::1"}"#, "field \"PublicIP\""),
            (
                br#"{"PublicIP":17}"#,
                "field \"PublicIP\": expected a string",
            ),
            (br#"{"PublicIPv6":"10.0.0.1"}"#, "field \"PublicIPv6\""),
            (br#"{"PublicIPv6":true}"#, "field \"PublicIPv6\""),
            (br#"{"BackendType":{}}"#, "field \"BackendType\""),
            (b"[]", "not a JSON object: found an array"),
            (b"{", "not a JSON object"),
        ];
        for (bytes, want) in cases {
            let msg = LeaseAttrs::from_json(bytes).unwrap_err().to_string();
            assert!(msg.starts_with("lease value: "), "{msg}");
            assert!(msg.contains(want), "{msg}");
        }
    }

    #[test]
    fn lease_parse_combines_key_and_value() {
        let full = "/coreos.com/network/subnets/10.244.3.0-24";
        let value = br#"{"PublicIP":"192.168.1.10","PublicIPv6":null}"#;
        assert_eq!(
            Lease::parse(PREFIX, full, value),
            Some(Ok(Lease {
                key: key("10.244.3.0-24"),
                attrs: attrs("192.168.1.10"),
            }))
        );
        assert_eq!(
            Lease::parse(PREFIX, "/coreos.com/network/config", value),
            None
        );
        let err = Lease::parse(PREFIX, full, br#"{"PublicIP":"10.0.0.x"}"#)
            .unwrap()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"lease "/coreos.com/network/subnets/10.244.3.0-24": field "PublicIP": "10.0.0.x" is not an IPv4 address"#
        );
        // Keys that are not `<subnet>-<len>` are not leases: ignored, as Flannel does.
        assert_eq!(
            Lease::parse(PREFIX, "/coreos.com/network/subnets/10.244.3.0-2x", value),
            None
        );
    }

    #[test]
    fn backend_data_numbers_survive_being_written_back() {
        // A long decimal that serde_json's fast float parsing read 1 ulp off, so that writing
        // it back and reading it again gave another number (found by the lease_json fuzzer);
        // its float_roundtrip feature reads every number exactly.
        let long = format!(
            "{}{}.{}2968968010",
            "8".repeat(29),
            "0".repeat(30),
            "0".repeat(47)
        );
        let value = format!(r#"{{"PublicIP":"10.0.0.1","BackendData":{{"n":[{long}]}}}}"#);
        let a = LeaseAttrs::from_json(value.as_bytes()).expect("parses");
        let b = LeaseAttrs::from_json(a.to_json().as_bytes()).expect("parses again");
        assert_eq!(a, b);
    }
}
