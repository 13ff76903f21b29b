//! One etcd record under `<prefix>/policy/`, checked: its key says what it is, its value must
//! agree with the key and hold a valid object. A bad record is an `Invalid` naming the field
//! and the reason; it never affects another record.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::selector::{check_labels, Labels, Selector};
use crate::{clip, json_error, wire, Invalid};

/// Values past this size are refused before parsing: one careless write must not cost the
/// daemon memory or its log a megabyte line.
pub const MAX_VALUE_BYTES: usize = 256 * 1024;

/// Rules, peers and ports (both directions together) one policy may hold. The work and the
/// nft elements a policy costs grow with them times the pods it reaches, and every node pays
/// it: one record must not be able to stall every node's updates. Real policies hold a few;
/// this leaves room for long allow-lists of address blocks.
pub const MAX_POLICY_ENTRIES: usize = 1024;

/// What a key under `<prefix>/policy/` names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKey {
    Policy { namespace: String, name: String },
    Namespace { name: String },
    Pod { namespace: String, name: String },
}

impl ObjectKey {
    /// Parses the part of the key after `<prefix>/policy/`. `None`: not one of ours (ignored).
    pub fn parse(rel: &str) -> Option<ObjectKey> {
        let parts: Vec<&str> = rel.split('/').collect();
        let ok = |s: &&str| !s.is_empty();
        match parts.as_slice() {
            ["networkpolicies", ns, name] if ok(ns) && ok(name) => Some(ObjectKey::Policy {
                namespace: ns.to_string(),
                name: name.to_string(),
            }),
            ["namespaces", name] if ok(name) => Some(ObjectKey::Namespace {
                name: name.to_string(),
            }),
            ["pods", ns, name] if ok(ns) && ok(name) => Some(ObjectKey::Pod {
                namespace: ns.to_string(),
                name: name.to_string(),
            }),
            _ => None,
        }
    }

    /// The key relative to `<prefix>/policy/`.
    pub fn rel(&self) -> String {
        match self {
            ObjectKey::Policy { namespace, name } => format!("networkpolicies/{namespace}/{name}"),
            ObjectKey::Namespace { name } => format!("namespaces/{name}"),
            ObjectKey::Pod { namespace, name } => format!("pods/{namespace}/{name}"),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.rel())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn parse(s: Option<&str>, field: &str) -> Result<Protocol, Invalid> {
        match s.unwrap_or("TCP") {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            other => Err(Invalid::new(
                field,
                format!(
                    "unknown protocol {:?} (expected TCP, UDP or SCTP)",
                    clip(other)
                ),
            )),
        }
    }

    /// The IP protocol number (what nftables' `meta l4proto` holds).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortRef {
    /// Any port of the protocol.
    Any,
    /// `port`..=`end` (end = port without `endPort`).
    Range(u16, u16),
    /// A named container port, resolved on the destination pod.
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortMatch {
    pub protocol: Protocol,
    pub port: PortRef,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Pods: `namespaces` None = the policy's own namespace; `pods` None = every pod there.
    Pods {
        namespaces: Option<Selector>,
        pods: Option<Selector>,
    },
    /// Addresses in `cidr` but in none of `except`.
    Block { cidr: IpNet, except: Vec<IpNet> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Empty: every peer.
    pub peers: Vec<Peer>,
    /// Empty: every port and protocol.
    pub ports: Vec<PortMatch>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: Selector,
    /// Some when the policy isolates its pods for ingress (its rules, possibly none).
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// Which node published a pod record (its lease key, `10.244.1.0-24`, with `&<v6>-<len>` on
/// dual stack): set by the daemon on the records it writes for its pods.
pub const OWNER_ANNOTATION: &str = "flanneld-rs.io/node";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ips: Vec<IpAddr>,
    pub host_ip: Option<IpAddr>,
    pub ports: Vec<NamedPort>,
    pub annotations: BTreeMap<String, String>,
}

impl Pod {
    /// Whether this record was published by the node whose subnet holds `ip`, as its owner
    /// annotation says: that node made the pod, so its record outranks any other claiming
    /// the address (a hand-made record with a copied IP must not take the pod's isolation).
    pub fn published_by_node_of(&self, ip: IpAddr) -> bool {
        let Some(owner) = self.annotations.get(OWNER_ANNOTATION) else {
            return false;
        };
        owner.split('&').any(|part| {
            part.rsplit_once('-')
                .and_then(|(addr, len)| IpNet::new(addr.parse().ok()?, len.parse().ok()?).ok())
                // A /0 (the empty IPv4 half of a v6-only key) holds no node's pods.
                .is_some_and(|net| net.prefix_len() > 0 && net.contains(&ip))
        })
    }
}

/// A checked record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    Policy(Policy),
    Namespace(Namespace),
    Pod(Pod),
}

/// Parses and checks the value stored at `key`.
pub fn parse(key: &ObjectKey, value: &[u8]) -> Result<Object, Invalid> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(Invalid::new(
            "value",
            format!(
                "{} bytes, over the {MAX_VALUE_BYTES}-byte limit",
                value.len()
            ),
        ));
    }
    check_key_names(key)?;
    let json =
        |e: serde_json::Error| Invalid::new("value", format!("not valid JSON: {}", json_error(&e)));
    match key {
        ObjectKey::Policy { namespace, name } => {
            let raw: wire::NetworkPolicy = serde_json::from_slice(value).map_err(json)?;
            check_kind(raw.kind.as_deref(), "NetworkPolicy")?;
            check_meta(&raw.metadata, Some(namespace), name)?;
            policy(namespace, name, &raw.spec).map(Object::Policy)
        }
        ObjectKey::Namespace { name } => {
            let raw: wire::Namespace = serde_json::from_slice(value).map_err(json)?;
            check_kind(raw.kind.as_deref(), "Namespace")?;
            check_meta(&raw.metadata, None, name)?;
            let labels = raw.metadata.labels.unwrap_or_default();
            check_labels(&labels, "metadata.labels")?;
            Ok(Object::Namespace(Namespace {
                name: name.clone(),
                labels,
            }))
        }
        ObjectKey::Pod { namespace, name } => {
            let raw: wire::Pod = serde_json::from_slice(value).map_err(json)?;
            check_kind(raw.kind.as_deref(), "Pod")?;
            check_meta(&raw.metadata, Some(namespace), name)?;
            pod(namespace, name, raw).map(Object::Pod)
        }
    }
}

/// Names end up in nftables chain and set names, so they must be what Kubernetes allows:
/// lowercase letters, digits, '-' and '.', alphanumeric at both ends, at most 253 characters.
fn check_key_names(key: &ObjectKey) -> Result<(), Invalid> {
    let names: Vec<(&str, &String)> = match key {
        ObjectKey::Policy { namespace, name } | ObjectKey::Pod { namespace, name } => {
            vec![("namespace", namespace), ("name", name)]
        }
        ObjectKey::Namespace { name } => vec![("name", name)],
    };
    for (what, n) in names {
        let b = n.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 253
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'.'));
        if !ok {
            return Err(Invalid::new(
                "key",
                format!("the {what} {:?} is not a valid Kubernetes name", clip(n)),
            ));
        }
    }
    Ok(())
}

fn check_kind(kind: Option<&str>, want: &str) -> Result<(), Invalid> {
    match kind {
        None => Ok(()),
        Some(k) if k == want => Ok(()),
        Some(k) => Err(Invalid::new(
            "kind",
            format!("is {:?}, but the key holds a {want}", clip(k)),
        )),
    }
}

fn check_meta(meta: &wire::Meta, namespace: Option<&String>, name: &str) -> Result<(), Invalid> {
    if meta.name.as_deref() != Some(name) {
        return Err(Invalid::new(
            "metadata.name",
            format!(
                "is {:?}, but the key names {name:?}",
                clip(meta.name.as_deref().unwrap_or(""))
            ),
        ));
    }
    if let Some(ns) = namespace {
        // Kubernetes fills in the namespace; a record written by hand may leave it out.
        if let Some(have) = meta.namespace.as_deref().filter(|h| h != ns) {
            return Err(Invalid::new(
                "metadata.namespace",
                format!("is {:?}, but the key names {ns:?}", clip(have)),
            ));
        }
    }
    Ok(())
}

fn policy(namespace: &str, name: &str, spec: &wire::PolicySpec) -> Result<Policy, Invalid> {
    let pod_selector = match &spec.pod_selector {
        Some(s) => Selector::parse(s, "spec.podSelector")?,
        None => Selector::everything(),
    };
    // policyTypes defaults as the API server fills them in (SetDefaults_NetworkPolicy): when
    // absent or empty, Ingress always, Egress when there is at least one egress rule (an empty
    // `egress: []` isolates nothing).
    let has_egress_rules = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
    let (mut isolate_in, mut isolate_out) = (true, has_egress_rules);
    if let Some(types) = spec.policy_types.as_ref().filter(|t| !t.is_empty()) {
        isolate_in = false;
        isolate_out = false;
        for (i, t) in types.iter().enumerate() {
            match t.as_str() {
                "Ingress" => isolate_in = true,
                "Egress" => isolate_out = true,
                other => {
                    return Err(Invalid::new(
                        &format!("spec.policyTypes[{i}]"),
                        format!(
                            "unknown policy type {:?} (expected Ingress or Egress)",
                            clip(other)
                        ),
                    ))
                }
            }
        }
    }
    let ingress = if isolate_in {
        let mut rules = Vec::new();
        for (i, r) in spec.ingress.iter().flatten().enumerate() {
            let at = format!("spec.ingress[{i}]");
            rules.push(rule(r.from.as_deref(), r.ports.as_deref(), &at, "from")?);
        }
        Some(rules)
    } else {
        None
    };
    let egress = if isolate_out {
        let mut rules = Vec::new();
        for (i, r) in spec.egress.iter().flatten().enumerate() {
            let at = format!("spec.egress[{i}]");
            rules.push(rule(r.to.as_deref(), r.ports.as_deref(), &at, "to")?);
        }
        Some(rules)
    } else {
        None
    };
    let entries: usize = ingress
        .iter()
        .chain(egress.iter())
        .flatten()
        .map(|r| 1 + r.peers.len() + r.ports.len())
        .sum();
    if entries > MAX_POLICY_ENTRIES {
        return Err(Invalid::new(
            "spec",
            format!(
                "{entries} rules, peers and ports in all, over the {MAX_POLICY_ENTRIES} one policy may hold"
            ),
        ));
    }
    Ok(Policy {
        namespace: namespace.to_string(),
        name: name.to_string(),
        pod_selector,
        ingress,
        egress,
    })
}

fn rule(
    peers: Option<&[wire::Peer]>,
    ports: Option<&[wire::Port]>,
    at: &str,
    peers_field: &str,
) -> Result<Rule, Invalid> {
    let mut out = Rule {
        peers: Vec::new(),
        ports: Vec::new(),
    };
    for (i, p) in peers.unwrap_or_default().iter().enumerate() {
        out.peers
            .push(peer(p, &format!("{at}.{peers_field}[{i}]"))?);
    }
    for (i, p) in ports.unwrap_or_default().iter().enumerate() {
        out.ports.push(port(p, &format!("{at}.ports[{i}]"))?);
    }
    Ok(out)
}

fn peer(p: &wire::Peer, at: &str) -> Result<Peer, Invalid> {
    if let Some(block) = &p.ip_block {
        if p.pod_selector.is_some() || p.namespace_selector.is_some() {
            return Err(Invalid::new(
                at,
                "ipBlock cannot be combined with podSelector or namespaceSelector",
            ));
        }
        let cidr = parse_cidr(&block.cidr, &format!("{at}.ipBlock.cidr"))?;
        let mut except = Vec::new();
        for (i, e) in block.except.iter().flatten().enumerate() {
            let field = format!("{at}.ipBlock.except[{i}]");
            let net = parse_cidr(e, &field)?;
            if !cidr.contains(&net) || net.prefix_len() == cidr.prefix_len() {
                return Err(Invalid::new(
                    &field,
                    format!("{net} is not strictly inside the block's cidr {cidr}"),
                ));
            }
            except.push(net);
        }
        return Ok(Peer::Block { cidr, except });
    }
    if p.pod_selector.is_none() && p.namespace_selector.is_none() {
        return Err(Invalid::new(
            at,
            "a peer needs podSelector, namespaceSelector or ipBlock",
        ));
    }
    let namespaces = p
        .namespace_selector
        .as_ref()
        .map(|s| Selector::parse(s, &format!("{at}.namespaceSelector")))
        .transpose()?;
    let pods = p
        .pod_selector
        .as_ref()
        .map(|s| Selector::parse(s, &format!("{at}.podSelector")))
        .transpose()?;
    Ok(Peer::Pods { namespaces, pods })
}

fn parse_cidr(s: &str, field: &str) -> Result<IpNet, Invalid> {
    let net: IpNet = s
        .parse()
        .map_err(|_| Invalid::new(field, format!("{:?} is not a CIDR", clip(s))))?;
    if net.trunc() != net {
        // Kubernetes refuses host bits since 1.31; so do we, rather than guess the intent.
        return Err(Invalid::new(
            field,
            format!("{net} has host bits set (did you mean {}?)", net.trunc()),
        ));
    }
    Ok(net)
}

fn port(p: &wire::Port, at: &str) -> Result<PortMatch, Invalid> {
    let protocol = Protocol::parse(p.protocol.as_deref(), &format!("{at}.protocol"))?;
    let number = |v: &serde_json::Value, field: &str| -> Result<u16, Invalid> {
        v.as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n >= 1)
            .ok_or_else(|| {
                Invalid::new(
                    field,
                    format!("{} is not a port number (1-65535)", clip(&v.to_string())),
                )
            })
    };
    let port = match &p.port {
        None => {
            if p.end_port.is_some() {
                return Err(Invalid::new(
                    &format!("{at}.endPort"),
                    "endPort needs a numeric port",
                ));
            }
            PortRef::Any
        }
        Some(serde_json::Value::String(name)) => {
            if p.end_port.is_some() {
                return Err(Invalid::new(
                    &format!("{at}.endPort"),
                    "endPort cannot be used with a named port",
                ));
            }
            if !is_port_name(name) {
                return Err(Invalid::new(
                    &format!("{at}.port"),
                    format!("{:?} is not a valid port name", clip(name)),
                ));
            }
            PortRef::Named(name.clone())
        }
        Some(v) => {
            let start = number(v, &format!("{at}.port"))?;
            let end = match &p.end_port {
                None => start,
                Some(e) => {
                    let end = number(e, &format!("{at}.endPort"))?;
                    if end < start {
                        return Err(Invalid::new(
                            &format!("{at}.endPort"),
                            format!("{end} is below port {start}"),
                        ));
                    }
                    end
                }
            };
            PortRef::Range(start, end)
        }
    };
    Ok(PortMatch { protocol, port })
}

/// IANA service names as Kubernetes checks them: 1-15 characters, lowercase letters, digits
/// and '-', at least one letter.
fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
}

fn pod(namespace: &str, name: &str, raw: wire::Pod) -> Result<Pod, Invalid> {
    let labels = raw.metadata.labels.unwrap_or_default();
    check_labels(&labels, "metadata.labels")?;
    let mut ips = Vec::new();
    let parse_ip = |s: &str, field: &str| -> Result<IpAddr, Invalid> {
        s.parse()
            .map_err(|_| Invalid::new(field, format!("{:?} is not an IP address", clip(s))))
    };
    for (i, p) in raw.status.pod_ips.iter().flatten().enumerate() {
        let ip = parse_ip(&p.ip, &format!("status.podIPs[{i}].ip"))?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    if let Some(s) = raw.status.pod_ip.as_deref().filter(|s| !s.is_empty()) {
        let ip = parse_ip(s, "status.podIP")?;
        if !ips.contains(&ip) {
            ips.insert(0, ip);
        }
    }
    // A pod has at most one address per family (the API server's rule): a record listing
    // thousands would make every rule that reaches it that much larger on every node.
    let v6 = ips.iter().filter(|ip| ip.is_ipv6()).count();
    if v6 > 1 || ips.len() - v6 > 1 {
        return Err(Invalid::new(
            "status.podIPs",
            format!(
                "{} addresses; a pod has at most one of each family",
                ips.len()
            ),
        ));
    }
    let host_ip = raw
        .status
        .host_ip
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(|s| parse_ip(s, "status.hostIP"))
        .transpose()?;
    let mut ports = Vec::new();
    for (c, container) in raw.spec.containers.iter().flatten().enumerate() {
        for (i, p) in container.ports.iter().flatten().enumerate() {
            let at = format!("spec.containers[{c}].ports[{i}]");
            let Some(pname) = p.name.as_deref().filter(|n| !n.is_empty()) else {
                continue; // only named ports matter to policy
            };
            if !is_port_name(pname) {
                return Err(Invalid::new(
                    &format!("{at}.name"),
                    format!("{:?} is not a valid port name", clip(pname)),
                ));
            }
            let number = p
                .container_port
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n >= 1)
                .ok_or_else(|| {
                    Invalid::new(&format!("{at}.containerPort"), "missing or not 1-65535")
                })?;
            ports.push(NamedPort {
                name: pname.to_string(),
                protocol: Protocol::parse(p.protocol.as_deref(), &format!("{at}.protocol"))?,
                port: number,
            });
        }
    }
    Ok(Pod {
        namespace: namespace.to_string(),
        name: name.to_string(),
        labels,
        ips,
        host_ip,
        ports,
        annotations: raw.metadata.annotations.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pol(json: &str) -> Result<Object, Invalid> {
        let key = ObjectKey::parse("networkpolicies/x/p").expect("key");
        parse(&key, json.as_bytes())
    }

    #[test]
    fn keys() {
        assert_eq!(
            ObjectKey::parse("pods/x/a"),
            Some(ObjectKey::Pod {
                namespace: "x".into(),
                name: "a".into()
            })
        );
        assert_eq!(ObjectKey::parse("pods/x"), None);
        assert_eq!(ObjectKey::parse("pods/x/a/b"), None);
        assert_eq!(ObjectKey::parse("namespaces/"), None);
        assert_eq!(ObjectKey::parse("other/x"), None);
        let k = ObjectKey::parse("networkpolicies/y/deny").expect("key");
        assert_eq!(k.rel(), "networkpolicies/y/deny");
    }

    /// serde's message quotes the bad value: a huge one is clipped, its position kept.
    #[test]
    fn json_errors_quote_values_clipped() {
        let huge = "a".repeat(100_000);
        let e = pol(&format!(
            r#"{{"metadata":{{"name":"p"}},"spec":{{"podSelector":"{huge}"}}}}"#
        ))
        .expect_err("a string is no selector");
        let text = e.to_string();
        assert!(text.len() < 400, "{} bytes", text.len());
        assert!(text.contains("invalid type: string"), "{text}");
        assert!(text.contains(" at line 1 column 1000"), "{text}");
    }

    #[test]
    fn policy_types_default_as_kubernetes() {
        let Ok(Object::Policy(p)) =
            pol(r#"{"metadata":{"name":"p","namespace":"x"},"spec":{"podSelector":{}}}"#)
        else {
            panic!("valid policy")
        };
        assert_eq!(p.ingress, Some(vec![]));
        assert_eq!(p.egress, None);
        let Ok(Object::Policy(p)) =
            pol(r#"{"metadata":{"name":"p"},"spec":{"podSelector":{},"egress":[{}]}}"#)
        else {
            panic!("valid policy")
        };
        assert!(p.ingress.is_some());
        assert_eq!(p.egress.as_ref().map(Vec::len), Some(1));
        let Ok(Object::Policy(p)) = pol(
            r#"{"metadata":{"name":"p"},"spec":{"podSelector":{},"policyTypes":["Egress"],"ingress":[{}]}}"#,
        ) else {
            panic!("valid policy")
        };
        assert_eq!(p.ingress, None);
        assert_eq!(p.egress, Some(vec![]));
        // An empty list is defaulted as an absent one, and `egress: []` has no egress rules.
        let Ok(Object::Policy(p)) = pol(
            r#"{"metadata":{"name":"p"},"spec":{"podSelector":{},"policyTypes":[],"egress":[]}}"#,
        ) else {
            panic!("valid policy")
        };
        assert_eq!(p.ingress, Some(vec![]));
        assert_eq!(p.egress, None);
    }

    #[test]
    fn ports_and_peers() {
        let Ok(Object::Policy(p)) = pol(
            r#"{"metadata":{"name":"p"},"spec":{"podSelector":{"matchLabels":{"pod":"a"}},
            "ingress":[{"from":[{"namespaceSelector":{"matchLabels":{"ns":"y"}},"podSelector":{}},
                                {"ipBlock":{"cidr":"10.0.0.0/8","except":["10.1.0.0/16"]}}],
                        "ports":[{"port":80},{"protocol":"UDP","port":"serve-81-udp"},
                                 {"protocol":"SCTP","port":1000,"endPort":2000},{"protocol":"UDP"}]}]}}"#,
        ) else {
            panic!("valid policy")
        };
        let rules = p.ingress.expect("ingress");
        assert_eq!(rules[0].peers.len(), 2);
        assert_eq!(
            rules[0].ports,
            vec![
                PortMatch {
                    protocol: Protocol::Tcp,
                    port: PortRef::Range(80, 80)
                },
                PortMatch {
                    protocol: Protocol::Udp,
                    port: PortRef::Named("serve-81-udp".into())
                },
                PortMatch {
                    protocol: Protocol::Sctp,
                    port: PortRef::Range(1000, 2000)
                },
                PortMatch {
                    protocol: Protocol::Udp,
                    port: PortRef::Any
                },
            ]
        );
    }

    #[test]
    fn bad_objects_name_the_field() {
        let cases = [
            ("{", "not valid JSON"),
            (r#"{"metadata":{"name":"q"},"spec":{}}"#, "metadata.name"),
            (
                r#"{"metadata":{"name":"p","namespace":"y"},"spec":{}}"#,
                "metadata.namespace",
            ),
            (r#"{"kind":"Pod","metadata":{"name":"p"}}"#, "kind"),
            (
                r#"{"metadata":{"name":"p"},"spec":{"ingress":[{"ports":[{"protocol":"ICMP"}]}]}}"#,
                "spec.ingress[0].ports[0].protocol: unknown protocol \"ICMP\"",
            ),
            (
                r#"{"metadata":{"name":"p"},"spec":{"ingress":[{"ports":[{"port":70000}]}]}}"#,
                "spec.ingress[0].ports[0].port",
            ),
            (
                r#"{"metadata":{"name":"p"},"spec":{"ingress":[{"ports":[{"port":90,"endPort":80}]}]}}"#,
                "endPort",
            ),
            (
                r#"{"metadata":{"name":"p"},"spec":{"egress":[{"to":[{"ipBlock":{"cidr":"10.0.0.1/8"}}]}]}}"#,
                "host bits",
            ),
            (
                r#"{"metadata":{"name":"p"},"spec":{"egress":[{"to":[{"ipBlock":{"cidr":"10.0.0.0/8","except":["11.0.0.0/16"]}}]}]}}"#,
                "spec.egress[0].to[0].ipBlock.except[0]",
            ),
            (
                r#"{"metadata":{"name":"p"},"spec":{"egress":[{"to":[{}]}]}}"#,
                "a peer needs",
            ),
            (
                r#"{"metadata":{"name":"p"},"spec":{"policyTypes":["Both"]}}"#,
                "spec.policyTypes[0]",
            ),
            (
                r#"{"metadata":{"name":"p"},"spec":{"podSelector":{"matchExpressions":[{"key":"a","operator":"Has"}]}}}"#,
                "unknown operator",
            ),
        ];
        for (json, want) in cases {
            let err = pol(json).expect_err(json).to_string();
            assert!(err.contains(want), "{json}: {err} lacks {want}");
        }
        let huge = format!(
            r#"{{"metadata":{{"name":"p"}},"x":"{}"}}"#,
            "a".repeat(MAX_VALUE_BYTES)
        );
        assert!(pol(&huge).expect_err("huge").to_string().contains("limit"));
    }

    #[test]
    fn pods() {
        let key = ObjectKey::parse("pods/x/a").expect("key");
        let json = r#"{"metadata":{"name":"a","namespace":"x","labels":{"pod":"a"}},
            "spec":{"containers":[{"name":"c","ports":[{"name":"serve-80-tcp","containerPort":80},
                                                       {"containerPort":9}]}]},
            "status":{"podIP":"10.244.1.2","podIPs":[{"ip":"10.244.1.2"},{"ip":"fd00::2"}],"hostIP":"192.168.0.1"}}"#;
        let Ok(Object::Pod(p)) = parse(&key, json.as_bytes()) else {
            panic!("valid pod")
        };
        assert_eq!(p.ips.len(), 2);
        assert_eq!(p.ports.len(), 1);
        assert_eq!(p.ports[0].protocol, Protocol::Tcp);
        let bad = r#"{"metadata":{"name":"a"},"status":{"podIP":"10.244.1.300"}}"#;
        assert!(parse(&key, bad.as_bytes())
            .expect_err("bad ip")
            .to_string()
            .contains("status.podIP"));
        // At most one address per family: a record claiming many is refused whole.
        for many in [
            r#"{"metadata":{"name":"a"},"status":{"podIPs":[{"ip":"10.244.1.2"},{"ip":"10.244.2.2"}]}}"#,
            r#"{"metadata":{"name":"a"},"status":{"podIP":"10.244.1.2","podIPs":[{"ip":"fd00::2"},{"ip":"fd00::3"}]}}"#,
        ] {
            assert!(parse(&key, many.as_bytes())
                .expect_err("many addresses")
                .to_string()
                .contains("at most one of each family"));
        }
    }

    #[test]
    fn a_policy_holds_a_bounded_number_of_rules_peers_and_ports() {
        let rules = |n: usize| {
            let rule = r#"{"from":[{"ipBlock":{"cidr":"10.0.0.0/8"}}],"ports":[{"port":80}]}"#;
            format!(
                r#"{{"metadata":{{"name":"p"}},"spec":{{"podSelector":{{}},"ingress":[{}]}}}}"#,
                vec![rule; n].join(",")
            )
        };
        // Three entries a rule (itself, a peer, a port).
        assert!(pol(&rules(MAX_POLICY_ENTRIES / 3)).is_ok());
        let err = pol(&rules(MAX_POLICY_ENTRIES / 3 + 1)).expect_err("too many");
        assert!(err.to_string().contains("one policy may hold"), "{err}");
    }
}
