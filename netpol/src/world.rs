//! The cluster as the policy records describe it: policies, namespace labels, pods and their
//! addresses. Both the compiler and `explain` ask it the same questions (which policies
//! select this pod, which pods does this peer stand for), so they cannot disagree.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use crate::object::{Object, ObjectKey, Peer, Pod, Policy};
use crate::selector::Labels;

/// The label Kubernetes sets on every namespace; implied here for namespaces without a record.
pub const NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

type Name = (String, String);

#[derive(Clone, Debug, Default)]
pub struct World {
    policies: BTreeMap<Name, Policy>,
    namespaces: BTreeMap<String, Labels>,
    pods: BTreeMap<Name, (Pod, i64)>,
    /// Each address belongs to the record that claims it with the highest [`Rank`].
    owner: HashMap<IpAddr, (Name, Rank)>,
    /// The records claiming each address, so that finding its next holder looks at those
    /// alone (a bulk deletion of N records would otherwise cost N times every pod).
    claims: HashMap<IpAddr, BTreeSet<Name>>,
}

/// How strongly a record claims an address: first whether the node whose subnet holds the
/// address published it (that node made the pod: a record copied by hand or by another tool
/// never takes the address, and with it the pod's isolation, away from it), then the newest
/// (a pod deleted without its record being removed yet never steals the address of the pod
/// that reused it). Records written in one etcd transaction share a revision: between those
/// the greater name wins, so the holder never depends on the order the records arrived in.
type Rank = (bool, i64);

fn rank(pod: &Pod, ip: IpAddr, revision: i64) -> Rank {
    (pod.published_by_node_of(ip), revision)
}

impl World {
    pub fn new() -> Self {
        World::default()
    }

    /// Puts (`Some`) or removes (`None`) the object at `key`, written at etcd `revision`.
    pub fn apply(&mut self, key: &ObjectKey, object: Option<Object>, revision: i64) {
        match (key, object) {
            (ObjectKey::Policy { namespace, name }, Some(Object::Policy(p))) => {
                self.policies.insert((namespace.clone(), name.clone()), p);
            }
            (ObjectKey::Policy { namespace, name }, _) => {
                self.policies.remove(&(namespace.clone(), name.clone()));
            }
            (ObjectKey::Namespace { name }, Some(Object::Namespace(ns))) => {
                self.namespaces.insert(name.clone(), ns.labels);
            }
            (ObjectKey::Namespace { name }, _) => {
                self.namespaces.remove(name);
            }
            (ObjectKey::Pod { namespace, name }, Some(Object::Pod(p))) => {
                let key = (namespace.clone(), name.clone());
                let ips = p.ips.clone();
                let old = self.pods.insert(key.clone(), (p, revision));
                for ip in old.iter().flat_map(|(o, _)| &o.ips) {
                    if !ips.contains(ip) {
                        self.unclaim(*ip, &key);
                        self.recompute(*ip);
                    }
                }
                for ip in ips {
                    self.claims.entry(ip).or_default().insert(key.clone());
                    let Some((pod, _)) = self.pods.get(&key) else {
                        continue;
                    };
                    let mine = rank(pod, ip, revision);
                    match self.owner.get(&ip) {
                        // It held the address and ranks lower now (its owner annotation
                        // went): another claimant may outrank it.
                        Some((n, r)) if *n == key && mine < *r => self.recompute(ip),
                        Some((n, r)) if (*r, n) >= (mine, &key) => {}
                        _ => {
                            self.owner.insert(ip, (key.clone(), mine));
                        }
                    }
                }
            }
            (ObjectKey::Pod { namespace, name }, _) => {
                let key = (namespace.clone(), name.clone());
                if let Some((old, _)) = self.pods.remove(&key) {
                    for ip in old.ips {
                        self.unclaim(ip, &key);
                        self.recompute(ip);
                    }
                }
            }
        }
    }

    fn unclaim(&mut self, ip: IpAddr, key: &Name) {
        if let Some(names) = self.claims.get_mut(&ip) {
            names.remove(key);
            if names.is_empty() {
                self.claims.remove(&ip);
            }
        }
    }

    /// Who holds `ip` now: the highest-ranked record claiming it. Only called for addresses
    /// their holder's record changed, and it looks only at the records claiming `ip`.
    fn recompute(&mut self, ip: IpAddr) {
        let pods = &self.pods;
        let newest = self
            .claims
            .get(&ip)
            .into_iter()
            .flatten()
            .filter_map(|n| pods.get(n).map(|(p, rev)| (n, rank(p, ip, *rev))))
            .max_by(|a, b| (a.1, a.0).cmp(&(b.1, b.0)))
            .map(|(n, r)| (n.clone(), r));
        match newest {
            Some(o) => self.owner.insert(ip, o),
            None => self.owner.remove(&ip),
        };
    }

    pub fn policy_count(&self) -> usize {
        self.policies.len()
    }

    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    pub fn namespace_count(&self) -> usize {
        self.namespaces.len()
    }

    pub fn policies(&self) -> impl Iterator<Item = &Policy> {
        self.policies.values()
    }

    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.values().map(|(p, _)| p)
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.pods
            .get(&(namespace.to_string(), name.to_string()))
            .map(|(p, _)| p)
    }

    /// The addresses a pod really holds (those no newer record claims).
    pub fn addresses<'a>(&'a self, pod: &'a Pod) -> impl Iterator<Item = IpAddr> + 'a {
        pod.ips.iter().copied().filter(move |ip| {
            self.owner
                .get(ip)
                .is_some_and(|((ns, n), _)| *ns == pod.namespace && *n == pod.name)
        })
    }

    pub fn pod_at(&self, ip: IpAddr) -> Option<&Pod> {
        self.owner
            .get(&ip)
            .and_then(|(n, _)| self.pods.get(n))
            .map(|(p, _)| p)
    }

    /// A namespace's labels, with the name label Kubernetes always sets.
    pub fn namespace_labels(&self, namespace: &str) -> Labels {
        let mut labels = self.namespaces.get(namespace).cloned().unwrap_or_default();
        labels.insert(NAME_LABEL.to_string(), namespace.to_string());
        labels
    }

    /// The policies that isolate `pod` in `dir`, in name order.
    pub fn selecting(&self, pod: &Pod, dir: Direction) -> Vec<&Policy> {
        self.policies
            .values()
            .filter(|p| p.namespace == pod.namespace && p.pod_selector.matches(&pod.labels))
            .filter(|p| match dir {
                Direction::Ingress => p.ingress.is_some(),
                Direction::Egress => p.egress.is_some(),
            })
            .collect()
    }

    /// Whether a pod-selecting peer of `policy` stands for `pod`. Blocks are not pods.
    pub fn peer_has_pod(&self, policy: &Policy, peer: &Peer, pod: &Pod) -> bool {
        match peer {
            Peer::Block { .. } => false,
            Peer::Pods { namespaces, pods } => {
                let ns_ok = match namespaces {
                    None => pod.namespace == policy.namespace,
                    Some(sel) => sel.matches(&self.namespace_labels(&pod.namespace)),
                };
                ns_ok && pods.as_ref().is_none_or(|sel| sel.matches(&pod.labels))
            }
        }
    }

    /// Every pod a pod-selecting peer stands for.
    pub fn peer_pods<'a>(&'a self, policy: &'a Policy, peer: &'a Peer) -> Vec<&'a Pod> {
        self.pods()
            .filter(|pod| self.peer_has_pod(policy, peer, pod))
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::object::{parse, OWNER_ANNOTATION};

    /// Builds a world from (key, JSON) pairs, panicking on bad test input.
    pub fn world(records: &[(&str, String)]) -> World {
        let mut w = World::new();
        for (i, (key, json)) in records.iter().enumerate() {
            let k = ObjectKey::parse(key).expect("key");
            let obj = parse(&k, json.as_bytes()).unwrap_or_else(|e| panic!("{key}: {e}"));
            w.apply(&k, Some(obj), i as i64 + 1);
        }
        w
    }

    pub fn pod_json(ns: &str, name: &str, ip: &str, labels: &str) -> String {
        format!(
            r#"{{"metadata":{{"name":"{name}","namespace":"{ns}","labels":{labels}}},
               "spec":{{"containers":[{{"ports":[{{"name":"serve-80-tcp","containerPort":80}},
                                                {{"name":"serve-81-udp","containerPort":81,"protocol":"UDP"}}]}}]}},
               "status":{{"podIP":"{ip}"}}}}"#
        )
    }

    #[test]
    fn newest_record_owns_a_reused_address() {
        let w = world(&[
            ("pods/x/old", pod_json("x", "old", "10.244.1.5", "{}")),
            ("pods/x/new", pod_json("x", "new", "10.244.1.5", "{}")),
        ]);
        let ip: IpAddr = "10.244.1.5".parse().expect("ip");
        assert_eq!(w.pod_at(ip).map(|p| p.name.as_str()), Some("new"));
        let old = w.pod("x", "old").expect("old");
        assert_eq!(w.addresses(old).count(), 0);
    }

    #[test]
    fn deleting_or_moving_the_holder_hands_the_address_on() {
        let mut w = world(&[
            ("pods/x/a", pod_json("x", "a", "10.244.1.5", "{}")),
            ("pods/x/b", pod_json("x", "b", "10.244.1.5", "{}")),
            ("pods/x/c", pod_json("x", "c", "10.244.1.5", "{}")),
        ]);
        let ip: IpAddr = "10.244.1.5".parse().expect("ip");
        let holder = |w: &World| w.pod_at(ip).map(|p| p.name.clone());
        assert_eq!(holder(&w).as_deref(), Some("c"));
        // The holder deleted: the newest other claimant.
        w.apply(&ObjectKey::parse("pods/x/c").expect("key"), None, 10);
        assert_eq!(holder(&w).as_deref(), Some("b"));
        // The holder moves to another address: the one left.
        let k = ObjectKey::parse("pods/x/b").expect("key");
        let moved = parse(&k, pod_json("x", "b", "10.244.1.6", "{}").as_bytes()).expect("pod");
        w.apply(&k, Some(moved), 11);
        assert_eq!(holder(&w).as_deref(), Some("a"));
        w.apply(&ObjectKey::parse("pods/x/a").expect("key"), None, 12);
        assert_eq!(holder(&w), None);
        assert!(!w.claims.contains_key(&ip), "no claim left behind");
    }

    /// A hand-made record copying a pod's address (newer, but not published by the node whose
    /// subnet holds it) never takes the address, and with it the pod's isolation.
    #[test]
    fn the_publishing_node_outranks_a_newer_copy() {
        let published = |name: &str, owner: &str| {
            pod_json("x", name, "10.244.1.5", "{}").replacen(
                r#""labels""#,
                &format!(r#""annotations":{{"{OWNER_ANNOTATION}":"{owner}"}},"labels""#),
                1,
            )
        };
        let ip: IpAddr = "10.244.1.5".parse().expect("ip");
        let holder = |recs: &[(&str, String)]| {
            world(recs)
                .pod_at(ip)
                .map(|p| p.name.clone())
                .unwrap_or_default()
        };
        let victim = ("pods/x/victim", published("victim", "10.244.1.0-24"));
        let copy = ("pods/x/copy", pod_json("x", "copy", "10.244.1.5", "{}"));
        assert_eq!(holder(&[victim.clone(), copy.clone()]), "victim");
        // Naming another node's subnet does not help either.
        let other = ("pods/x/other", published("other", "10.244.2.0-24"));
        assert_eq!(holder(&[victim.clone(), other]), "victim");
        // Dual-stack owner keys are read part by part.
        let dual = (
            "pods/x/dual",
            published("dual", "10.244.1.0-24&fd00:1::-64"),
        );
        assert_eq!(holder(&[copy.clone(), dual.clone()]), "dual");
        // Between two records of that node, the newer (a reused address) holds it.
        assert_eq!(holder(&[victim.clone(), dual]), "dual");
        // The copy holds the address only once the published record is gone.
        let mut w = world(&[victim, copy]);
        w.apply(&ObjectKey::parse("pods/x/victim").expect("key"), None, 10);
        assert_eq!(w.pod_at(ip).map(|p| p.name.as_str()), Some("copy"));
    }

    /// Two records claiming one address in one etcd transaction (one revision): the same
    /// holder whichever arrived first, and after the other goes and comes back.
    #[test]
    fn equal_claims_are_decided_by_name_not_arrival() {
        let ip: IpAddr = "10.244.1.5".parse().expect("ip");
        let key = |n: &str| ObjectKey::parse(&format!("pods/x/{n}")).expect("key");
        let rec = |n: &str| parse(&key(n), pod_json("x", n, "10.244.1.5", "{}").as_bytes());
        for order in [["a", "b"], ["b", "a"]] {
            let mut w = World::new();
            for n in order {
                w.apply(&key(n), rec(n).ok(), 7);
            }
            assert_eq!(
                w.pod_at(ip).map(|p| p.name.as_str()),
                Some("b"),
                "{order:?}"
            );
            // A third claimant at the same revision goes: recomputed, the same answer.
            w.apply(&key("c"), rec("c").ok(), 7);
            w.apply(&key("c"), None, 8);
            assert_eq!(
                w.pod_at(ip).map(|p| p.name.as_str()),
                Some("b"),
                "{order:?}"
            );
        }
    }

    #[test]
    fn addresses_follow_records_as_they_change() {
        let mut w = world(&[
            ("pods/x/old", pod_json("x", "old", "10.244.1.5", "{}")),
            ("pods/x/new", pod_json("x", "new", "10.244.1.5", "{}")),
        ]);
        let ip: IpAddr = "10.244.1.5".parse().expect("ip");
        let key = |n: &str| ObjectKey::parse(&format!("pods/x/{n}")).expect("key");
        // The newer pod moves to another address: the old record holds this one again.
        let moved = parse(
            &key("new"),
            pod_json("x", "new", "10.244.1.6", "{}").as_bytes(),
        )
        .expect("pod");
        w.apply(&key("new"), Some(moved), 10);
        assert_eq!(w.pod_at(ip).map(|p| p.name.as_str()), Some("old"));
        // Deleting the last claimant frees the address.
        w.apply(&key("old"), None, 11);
        assert!(w.pod_at(ip).is_none());
        assert_eq!(
            w.pod_at("10.244.1.6".parse().expect("ip"))
                .map(|p| p.name.as_str()),
            Some("new")
        );
    }

    #[test]
    fn namespaces_carry_the_name_label() {
        let w = world(&[(
            "namespaces/x",
            r#"{"metadata":{"name":"x","labels":{"ns":"x"}}}"#.to_string(),
        )]);
        let l = w.namespace_labels("x");
        assert_eq!(l.get("ns").map(String::as_str), Some("x"));
        assert_eq!(l.get(NAME_LABEL).map(String::as_str), Some("x"));
        assert_eq!(w.namespace_labels("y").len(), 1);
    }
}
