//! Policy records, written by anyone, through parse, the world and the compiler: never a
//! panic, and every interval set the kernel gets holds disjoint elements (nft refuses an
//! overlap with "File exists", which would stall every policy update on the node).
//!
//! The bytes are read as a small program building Kubernetes-shaped records (so the fuzzer
//! reaches the compiler without having to discover JSON), plus raw values parsed as they are.
#![no_main]
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use netpol::compile::{compile, Ruleset, SetKind};
use netpol::object::{self, Object, ObjectKey, OWNER_ANNOTATION};
use netpol::{nft, World};
use serde_json::{json, Value};

/// Reads bytes as choices; 0 once they run out.
struct Choices<'a>(&'a [u8]);

impl Choices<'_> {
    fn byte(&mut self) -> u8 {
        let Some((b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        *b
    }

    fn pick<'s>(&mut self, from: &[&'s str]) -> &'s str {
        from[usize::from(self.byte()) % from.len()]
    }

    fn port(&mut self) -> u16 {
        // Mostly near 80 so ranges meet and overlap; sometimes anywhere.
        match self.byte() % 4 {
            0 => u16::from_be_bytes([self.byte(), self.byte()]),
            _ => 75 + u16::from(self.byte() % 16),
        }
    }

    fn ip(&mut self) -> IpAddr {
        match self.byte() % 3 {
            0 => IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(self.byte()))),
            1 => IpAddr::V4(Ipv4Addr::new(10, 244, 2, self.byte())),
            _ => IpAddr::V4(Ipv4Addr::new(10, 244, 1, self.byte() % 8)),
        }
    }

    fn labels(&mut self) -> Value {
        let mut m = serde_json::Map::new();
        for _ in 0..self.byte() % 3 {
            m.insert(
                self.pick(&["pod", "app", "ns"]).into(),
                self.pick(&["a", "b", "c"]).into(),
            );
        }
        Value::Object(m)
    }

    fn selector(&mut self) -> Value {
        match self.byte() % 3 {
            0 => json!({}),
            1 => json!({"matchLabels": self.labels()}),
            _ => json!({"matchExpressions": [{
                "key": self.pick(&["pod", "app"]),
                "operator": self.pick(&["In", "NotIn", "Exists", "DoesNotExist"]),
                "values": [self.pick(&["a", "b"])]
            }]}),
        }
    }

    fn peer(&mut self) -> Value {
        match self.byte() % 4 {
            0 => json!({"podSelector": self.selector()}),
            1 => json!({"namespaceSelector": self.selector(), "podSelector": self.selector()}),
            2 => json!({"namespaceSelector": self.selector()}),
            _ => {
                let (cidr, excepts) = if self.byte() % 2 == 0 {
                    let len = 8 + self.byte() % 25;
                    let except: Vec<String> = (0..self.byte() % 3)
                        .map(|_| format!("10.{}.{}.0/{}", self.byte() % 4, self.byte(), 16 + self.byte() % 17))
                        .collect();
                    (format!("10.0.0.0/{len}"), except)
                } else {
                    let except: Vec<String> = (0..self.byte() % 3)
                        .map(|_| format!("fd00::{:x}/{}", self.byte(), 100 + self.byte() % 29))
                        .collect();
                    (format!("fd00::/{}", 8 + self.byte() % 121), except)
                };
                json!({"ipBlock": {"cidr": cidr, "except": excepts}})
            }
        }
    }

    fn ports(&mut self) -> Value {
        let mut out = Vec::new();
        for _ in 0..self.byte() % 5 {
            let mut p = serde_json::Map::new();
            if self.byte() % 4 != 0 {
                p.insert("protocol".into(), self.pick(&["TCP", "UDP", "SCTP"]).into());
            }
            match self.byte() % 4 {
                0 => {}
                1 => {
                    p.insert("port".into(), self.pick(&["http", "dns", "none"]).into());
                }
                2 => {
                    let a = self.port();
                    p.insert("port".into(), a.into());
                    p.insert("endPort".into(), a.saturating_add(self.port() % 20).into());
                }
                _ => {
                    p.insert("port".into(), self.port().into());
                }
            }
            out.push(Value::Object(p));
        }
        Value::Array(out)
    }

    fn rules(&mut self, peers_field: &str) -> Value {
        let rules: Vec<Value> = (0..self.byte() % 3)
            .map(|_| {
                let peers: Vec<Value> = (0..self.byte() % 3).map(|_| self.peer()).collect();
                json!({peers_field: peers, "ports": self.ports()})
            })
            .collect();
        Value::Array(rules)
    }

    fn record(&mut self, ns: &str, name: &str) -> (String, Value) {
        match self.byte() % 3 {
            0 => {
                let mut spec = serde_json::Map::new();
                spec.insert("podSelector".into(), self.selector());
                if self.byte() % 2 == 0 {
                    spec.insert("ingress".into(), self.rules("from"));
                }
                if self.byte() % 2 == 0 {
                    spec.insert("egress".into(), self.rules("to"));
                }
                if self.byte() % 2 == 0 {
                    let types: Vec<&str> = (0..self.byte() % 3)
                        .map(|_| self.pick(&["Ingress", "Egress"]))
                        .collect();
                    spec.insert("policyTypes".into(), json!(types));
                }
                (
                    format!("networkpolicies/{ns}/{name}"),
                    json!({"metadata": {"name": name, "namespace": ns}, "spec": spec}),
                )
            }
            1 => (
                format!("namespaces/{ns}"),
                json!({"metadata": {"name": ns, "labels": self.labels()}}),
            ),
            _ => {
                let ips: Vec<String> = (0..1 + self.byte() % 2)
                    .map(|_| self.ip().to_string())
                    .collect();
                let mut meta = json!({"name": name, "namespace": ns, "labels": self.labels()});
                if self.byte() % 2 == 0 {
                    let owner = self.pick(&["10.244.1.0-24", "10.244.2.0-24", "0.0.0.0-0&fd00::-64"]);
                    meta["annotations"] = json!({ OWNER_ANNOTATION: owner });
                }
                let ports = json!([{"name": "http", "containerPort": self.port()},
                                   {"name": "dns", "containerPort": 53, "protocol": "UDP"}]);
                (
                    format!("pods/{ns}/{name}"),
                    json!({"metadata": meta, "spec": {"containers": [{"ports": ports}]},
                           "status": {"podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>()}}),
                )
            }
        }
    }
}

/// The element's range as numbers, per family and protocol: `a`, `a-b`, `p . a`, `p . a-b`.
fn element_range(kind: SetKind, element: &str) -> Option<(String, u128, u128)> {
    let (group, range) = match kind {
        SetKind::ProtoPort => {
            let (proto, ports) = element.split_once(" . ")?;
            (proto.to_string(), ports)
        }
        SetKind::Addr4 | SetKind::Addr6 => (String::new(), element),
        _ => return None,
    };
    let num = |s: &str| -> Option<u128> {
        if let Ok(n) = s.parse::<u128>() {
            return Some(n);
        }
        match s.parse::<IpAddr>().ok()? {
            IpAddr::V4(a) => Some(u128::from(u32::from(a))),
            IpAddr::V6(a) => Some(u128::from(a)),
        }
    };
    let (lo, hi) = match range.split_once('-') {
        Some((a, b)) => (num(a)?, num(b)?),
        None => (num(range)?, num(range)?),
    };
    Some((group, lo, hi))
}

fn check_disjoint(rs: &Ruleset) {
    for (name, set) in &rs.sets {
        let mut ranges: Vec<(String, u128, u128)> = set
            .elements
            .iter()
            .filter_map(|e| element_range(set.kind, e))
            .collect();
        ranges.sort();
        for w in ranges.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            assert!(a.1 <= a.2, "{name}: reversed range in {:?}", set.elements);
            assert!(
                a.0 != b.0 || a.2 < b.1,
                "{name}: overlapping elements {:?}",
                set.elements
            );
        }
    }
}

/// Who holds each claimed address must follow from the records alone, not from the order
/// they arrived in: a world built from scratch in another order agrees.
fn check_owners(world: &World, records: &BTreeMap<String, (ObjectKey, Object, i64)>) {
    let mut fresh = World::new();
    for (key, object, revision) in records.values().rev() {
        fresh.apply(key, Some(object.clone()), *revision);
    }
    for pod in world.pods() {
        for ip in &pod.ips {
            let holder = |w: &World| w.pod_at(*ip).map(|p| (p.namespace.clone(), p.name.clone()));
            assert_eq!(holder(world), holder(&fresh), "holder of {ip}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (Ok(v4), Ok(v6)) = ("10.244.1.0/24".parse(), "fd00::/64".parse()) else {
        return;
    };
    let local = [v4, v6];
    let mut world = World::new();
    let mut before = Ruleset::default();
    let mut records = BTreeMap::new();
    // Several records may share a revision (one etcd transaction).
    let mut revision = 1i64;
    // Records separated by 0xff: a leading 0 byte means "parse the rest as a raw value".
    for chunk in data.split(|b| *b == 0xff).take(32) {
        let mut c = Choices(chunk);
        revision += i64::from(c.byte() % 2);
        let ns = c.pick(&["x", "y"]);
        let name = c.pick(&["a", "b", "c"]);
        let (key, value) = if c.byte() == 0 {
            let kind = c.pick(&["networkpolicies", "pods"]);
            (format!("{kind}/{ns}/{name}"), c.0.to_vec())
        } else {
            let (key, value) = c.record(ns, name);
            (key, value.to_string().into_bytes())
        };
        let Some(okey) = ObjectKey::parse(&key) else {
            continue;
        };
        let delete = c.byte() % 8 == 7;
        let object = if delete {
            None
        } else {
            match object::parse(&okey, &value) {
                Ok(o) => Some(o),
                Err(_) => continue,
            }
        };
        match &object {
            Some(o) => records.insert(key, (okey.clone(), o.clone(), revision)),
            None => records.remove(&key),
        };
        world.apply(&okey, object, revision);
        check_owners(&world, &records);
        let now = compile(&world, &local);
        check_disjoint(&now);
        let _ = nft::diff(&before, &now);
        let _ = nft::full(&now);
        before = now;
    }
});
