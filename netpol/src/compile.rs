//! What one node's kernel must hold to enforce the policies on its own pods, as plain data:
//! named sets with their elements, regular chains with their rules, and the verdict maps that
//! send an isolated pod's packets to its chain. `nft` turns it into commands.
//!
//! Layout (per direction; "in" shown):
//! - map `in4`/`in6`: local isolated pod address → `jump grp_<hash>_in`, where the group chain
//!   belongs to every local pod selected by the same policies;
//! - group chain: `jump pol_<ns>_<name>_in` for each selecting policy, then count and drop;
//! - policy chain: one `accept` per rule and address family, matching sets
//!   `pol_<ns>_<name>_in_<rule>_{peers4,peers6,ports,named4,named6}`.
//!
//! Per-packet cost is a hash lookup plus the rules of the policies that select the pod, never
//! anything per pod pair; a label change moves set elements and map entries only.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::object::{Peer, Pod, Policy, PortRef, Rule};
use crate::world::{Direction, World};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetKind {
    /// IPv4 addresses and ranges.
    Addr4,
    Addr6,
    /// `protocol . port-range`.
    ProtoPort,
    /// `address . protocol . port`: named ports resolved per pod.
    Addr4ProtoPort,
    Addr6ProtoPort,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Set {
    pub kind: SetKind,
    pub elements: BTreeSet<String>,
}

/// The verdict maps, by name, each from an address to a chain name.
pub const MAPS: [(&str, SetKind); 4] = [
    ("in4", SetKind::Addr4),
    ("in6", SetKind::Addr6),
    ("out4", SetKind::Addr4),
    ("out6", SetKind::Addr6),
];

/// What the node's policy table must hold. Empty: the table should not exist at all, so a
/// node without isolated pods pays nothing per packet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub sets: BTreeMap<String, Set>,
    pub chains: BTreeMap<String, Vec<String>>,
    /// Map name → (address → chain).
    pub maps: BTreeMap<&'static str, BTreeMap<String, String>>,
}

impl Ruleset {
    pub fn is_empty(&self) -> bool {
        self.maps.values().all(BTreeMap::is_empty)
    }

    /// How many local pods are isolated in each direction (for status and metrics).
    pub fn isolated(&self, dir: Direction) -> usize {
        let (a, b) = match dir {
            Direction::Ingress => ("in4", "in6"),
            Direction::Egress => ("out4", "out6"),
        };
        let count = |m: &str| self.maps.get(m).map_or(0, BTreeMap::len);
        count(a) + count(b)
    }
}

/// Compiles the rules for the pods whose addresses fall in `local` (this node's subnets).
pub fn compile(world: &World, local: &[IpNet]) -> Ruleset {
    compile_for(
        world,
        &Locality {
            subnets: local.to_vec(),
            ..Locality::default()
        },
    )
}

/// Which pods a node isolates: those with an address in its subnets, and those still holding
/// an address from a subnet it held before (a lease re-acquired with another subnet: pods
/// made before keep their addresses until recreated) whose record names this node's host (the
/// node that holds that subnet now writes the same owner annotation on its own pods).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Locality {
    pub subnets: Vec<IpNet>,
    pub former: Vec<IpNet>,
    pub host_ip: Option<IpAddr>,
}

impl Locality {
    pub fn holds(&self, pod: &Pod, ip: &IpAddr) -> bool {
        self.subnets.iter().any(|n| n.contains(ip))
            || (pod.host_ip.is_some()
                && pod.host_ip == self.host_ip
                && self.former.iter().any(|n| n.contains(ip)))
    }
}

/// What `local` must hold to enforce the policies on its pods.
pub fn compile_for(world: &World, local: &Locality) -> Ruleset {
    let mut out = Ruleset::default();
    for (name, _) in MAPS {
        out.maps.insert(name, BTreeMap::new());
    }
    // Local pods and the policies isolating each, per direction.
    let mut used: BTreeMap<(String, String, Direction), &Policy> = BTreeMap::new();
    let mut selected: BTreeMap<(String, String, Direction), Vec<&Pod>> = BTreeMap::new();
    let mut names = Names::default();
    let mut chain_of: BTreeMap<(String, String, Direction), String> = BTreeMap::new();
    for pod in world.pods() {
        let addrs: Vec<IpAddr> = world
            .addresses(pod)
            .filter(|ip| local.holds(pod, ip))
            .collect();
        if addrs.is_empty() {
            continue;
        }
        for dir in [Direction::Ingress, Direction::Egress] {
            let policies = world.selecting(pod, dir);
            if policies.is_empty() {
                continue;
            }
            let chains: Vec<String> = policies
                .iter()
                .map(|p| {
                    let key = (p.namespace.clone(), p.name.clone(), dir);
                    chain_of
                        .entry(key)
                        .or_insert_with(|| {
                            let claim = format!("{}/{}/{}", p.namespace, p.name, short(dir));
                            names.claim(policy_chain(p, dir), &claim)
                        })
                        .clone()
                })
                .collect();
            let group = names.claim(group_chain(&chains, dir), &chains.join(","));
            if !out.chains.contains_key(&group) {
                let mut rules: Vec<String> = chains.iter().map(|n| format!("jump {n}")).collect();
                rules.push(format!("counter name denied_{} drop", short(dir)));
                out.chains.insert(group.clone(), rules);
            }
            for ip in &addrs {
                let map = match (dir, ip) {
                    (Direction::Ingress, IpAddr::V4(_)) => "in4",
                    (Direction::Ingress, IpAddr::V6(_)) => "in6",
                    (Direction::Egress, IpAddr::V4(_)) => "out4",
                    (Direction::Egress, IpAddr::V6(_)) => "out6",
                };
                if let Some(m) = out.maps.get_mut(map) {
                    m.insert(ip.to_string(), group.clone());
                }
            }
            for p in policies {
                let key = (p.namespace.clone(), p.name.clone(), dir);
                used.insert(key.clone(), p);
                selected.entry(key).or_default().push(pod);
            }
        }
    }
    for (key, policy) in &used {
        let targets = selected.get(key).map(Vec::as_slice).unwrap_or_default();
        let Some(chain) = chain_of.get(key) else {
            continue;
        };
        policy_rules(world, policy, chain, key.2, targets, local, &mut out);
    }
    out
}

/// Chain names as claimed in one compile. Hashed names (group chains, over-long policy
/// names) can collide: FNV is no defence against names written to collide, and two groups
/// sharing a chain would give one group's pods the other's policies. A name already claimed
/// for another key gets a `_<n>` suffix; compile meets keys in a fixed order, so names stay
/// stable from one compile to the next.
#[derive(Default)]
struct Names {
    /// Name → the key that claimed it.
    taken: HashMap<String, String>,
}

impl Names {
    fn claim(&mut self, base: String, key: &str) -> String {
        let mut name = base.clone();
        let mut n = 0u64;
        loop {
            match self.taken.get(&name) {
                None => {
                    self.taken.insert(name.clone(), key.to_string());
                    return name;
                }
                Some(k) if k == key => return name,
                Some(_) => {
                    n += 1;
                    name = format!("{base}_{n}");
                }
            }
        }
    }
}

fn short(dir: Direction) -> &'static str {
    match dir {
        Direction::Ingress => "in",
        Direction::Egress => "out",
    }
}

/// Policy names are Kubernetes names (lowercase, digits, '-', '.'), so `_` separates safely
/// and the chain reads as what it is in `nft list ruleset`. Over-long names fall back to a hash.
pub fn policy_chain(p: &Policy, dir: Direction) -> String {
    let name = format!("pol_{}_{}_{}", p.namespace, p.name, short(dir));
    if name.len() <= 200 {
        name
    } else {
        format!(
            "pol_{:016x}_{}",
            crate::fnv(&format!("{}/{}", p.namespace, p.name)),
            short(dir)
        )
    }
}

fn group_chain(policy_chains: &[String], dir: Direction) -> String {
    format!(
        "grp_{:016x}_{}",
        crate::fnv(&policy_chains.join(",")),
        short(dir)
    )
}

fn policy_rules(
    world: &World,
    policy: &Policy,
    chain: &str,
    dir: Direction,
    targets: &[&Pod],
    local: &Locality,
    out: &mut Ruleset,
) {
    let rules: &[Rule] = match dir {
        Direction::Ingress => policy.ingress.as_deref().unwrap_or_default(),
        Direction::Egress => policy.egress.as_deref().unwrap_or_default(),
    };
    let (peer_field, port_field) = match dir {
        Direction::Ingress => ("saddr", "daddr"),
        Direction::Egress => ("daddr", "daddr"),
    };
    let mut lines = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        let base = format!("{chain}_{i}");
        // Peer addresses, per family; None: every peer.
        let peers = if rule.peers.is_empty() {
            None
        } else {
            Some(peer_ranges(world, policy, &rule.peers))
        };
        // Port ranges per protocol number, merged before rendering: an interval set refuses
        // overlapping elements, and `[{protocol: TCP}, {port: 80}]` overlaps.
        let mut numeric: BTreeMap<u8, Vec<(u128, u128)>> = BTreeMap::new();
        let mut named: [BTreeSet<String>; 2] = Default::default();
        // The peer pods egress named ports resolve on: found once per rule, not once per
        // named port (every pod against every peer, each time).
        let mut egress_dests: Option<Vec<&Pod>> = None;
        for pm in &rule.ports {
            match &pm.port {
                PortRef::Any => {
                    numeric
                        .entry(pm.protocol.number())
                        .or_default()
                        .push((0, 65535));
                }
                PortRef::Range(a, b) => {
                    numeric
                        .entry(pm.protocol.number())
                        .or_default()
                        .push((u128::from(*a), u128::from(*b)));
                }
                PortRef::Named(name) => {
                    // Resolved on the destination: the selected local pods for ingress, the
                    // peer pods for egress.
                    let dests: &[&Pod] = match dir {
                        Direction::Ingress => targets,
                        Direction::Egress => egress_dests.get_or_insert_with(|| {
                            world
                                .pods()
                                .filter(|p| {
                                    rule.peers.is_empty()
                                        || rule
                                            .peers
                                            .iter()
                                            .any(|peer| world.peer_has_pod(policy, peer, p))
                                })
                                .collect()
                        }),
                    };
                    for pod in dests {
                        let Some(np) = pod
                            .ports
                            .iter()
                            .find(|np| np.name == *name && np.protocol == pm.protocol)
                        else {
                            continue;
                        };
                        for ip in world.addresses(pod) {
                            if dir == Direction::Ingress && !local.holds(pod, &ip) {
                                continue;
                            }
                            let fam = usize::from(ip.is_ipv6());
                            named[fam].insert(format!(
                                "{ip} . {} . {}",
                                np.protocol.number(),
                                np.port
                            ));
                        }
                    }
                }
            }
        }
        let has_named = rule
            .ports
            .iter()
            .any(|p| matches!(p.port, PortRef::Named(_)));
        let numeric = proto_port_elements(numeric);
        let ports_set = format!("{base}_ports");
        if !numeric.is_empty() {
            out.sets.insert(
                ports_set.clone(),
                Set {
                    kind: SetKind::ProtoPort,
                    elements: numeric.clone(),
                },
            );
        }
        for (fam, (ip, addr_kind, named_kind)) in [
            ("ip", SetKind::Addr4, SetKind::Addr4ProtoPort),
            ("ip6", SetKind::Addr6, SetKind::Addr6ProtoPort),
        ]
        .into_iter()
        .enumerate()
        {
            let peer_cond = match &peers {
                None => String::new(),
                Some(ranges) => {
                    // Kept even when empty, so that pods coming and going (or relabelled)
                    // only ever change elements, never rules.
                    let elems = &ranges[fam];
                    let set = format!("{base}_peers{}", if fam == 0 { 4 } else { 6 });
                    out.sets.insert(
                        set.clone(),
                        Set {
                            kind: addr_kind,
                            elements: elems.clone(),
                        },
                    );
                    format!("{ip} {peer_field} @{set} ")
                }
            };
            let family_guard = if peer_cond.is_empty() {
                format!("meta nfproto ipv{} ", if fam == 0 { 4 } else { 6 })
            } else {
                String::new()
            };
            if rule.ports.is_empty() {
                lines.push(format!("{family_guard}{peer_cond}accept"));
                continue;
            }
            if !numeric.is_empty() {
                lines.push(format!(
                    "{family_guard}{peer_cond}meta l4proto . th dport @{ports_set} accept"
                ));
            }
            if has_named {
                let set = format!("{base}_named{}", if fam == 0 { 4 } else { 6 });
                out.sets.insert(
                    set.clone(),
                    Set {
                        kind: named_kind,
                        elements: named[fam].clone(),
                    },
                );
                lines.push(format!(
                    "{peer_cond}{ip} {port_field} . meta l4proto . th dport @{set} accept"
                ));
            }
        }
    }
    out.chains.insert(chain.to_string(), lines);
}

/// The addresses a rule's peers stand for, per family, as disjoint sorted ranges rendered for
/// an interval set (`a`, `a-b`).
fn peer_ranges(world: &World, policy: &Policy, peers: &[Peer]) -> [BTreeSet<String>; 2] {
    let mut v4: Vec<(u128, u128)> = Vec::new();
    let mut v6: Vec<(u128, u128)> = Vec::new();
    let mut push = |ip: IpAddr, lo: u128, hi: u128| {
        if ip.is_ipv4() {
            v4.push((lo, hi));
        } else {
            v6.push((lo, hi));
        }
    };
    for peer in peers {
        match peer {
            Peer::Block { cidr, except } => {
                let mut ranges = vec![net_range(cidr)];
                for e in except {
                    ranges = subtract(&ranges, net_range(e));
                }
                for (lo, hi) in ranges {
                    push(cidr.addr(), lo, hi);
                }
            }
            Peer::Pods { .. } => {
                for pod in world.peer_pods(policy, peer) {
                    for ip in world.addresses(pod) {
                        let n = ip_num(ip);
                        push(ip, n, n);
                    }
                }
            }
        }
    }
    [render(merge(v4), false), render(merge(v6), true)]
}

fn ip_num(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn net_range(net: &IpNet) -> (u128, u128) {
    (ip_num(net.network()), ip_num(net.broadcast()))
}

fn subtract(ranges: &[(u128, u128)], (elo, ehi): (u128, u128)) -> Vec<(u128, u128)> {
    let mut out = Vec::new();
    for &(lo, hi) in ranges {
        if ehi < lo || elo > hi {
            out.push((lo, hi));
            continue;
        }
        if elo > lo {
            out.push((lo, elo - 1));
        }
        if ehi < hi {
            out.push((ehi + 1, hi));
        }
    }
    out
}

/// Sorts and joins overlapping or touching ranges: interval sets refuse overlaps.
fn merge(mut ranges: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    ranges.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::new();
    for (lo, hi) in ranges {
        match out.last_mut() {
            Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// `protocol . port` and `protocol . lo-hi` elements, disjoint per protocol.
fn proto_port_elements(by_proto: BTreeMap<u8, Vec<(u128, u128)>>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (proto, ranges) in by_proto {
        for (lo, hi) in merge(ranges) {
            out.insert(if lo == hi {
                format!("{proto} . {lo}")
            } else {
                format!("{proto} . {lo}-{hi}")
            });
        }
    }
    out
}

fn render(ranges: Vec<(u128, u128)>, v6: bool) -> BTreeSet<String> {
    let show = |n: u128| -> String {
        if v6 {
            std::net::Ipv6Addr::from(n).to_string()
        } else {
            std::net::Ipv4Addr::from(u32::try_from(n).unwrap_or(u32::MAX)).to_string()
        }
    };
    ranges
        .into_iter()
        .map(|(lo, hi)| {
            if lo == hi {
                show(lo)
            } else {
                format!("{}-{}", show(lo), show(hi))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::tests::{pod_json, world};

    fn local() -> Vec<IpNet> {
        vec!["10.244.1.0/24".parse().expect("net")]
    }

    fn three_pods() -> Vec<(&'static str, String)> {
        vec![
            (
                "pods/x/a",
                pod_json("x", "a", "10.244.1.2", r#"{"pod":"a"}"#),
            ),
            (
                "pods/x/b",
                pod_json("x", "b", "10.244.2.2", r#"{"pod":"b"}"#),
            ),
            (
                "pods/y/a",
                pod_json("y", "a", "10.244.1.3", r#"{"pod":"a"}"#),
            ),
        ]
    }

    #[test]
    fn no_policy_means_no_table() {
        let w = world(&three_pods());
        assert!(compile(&w, &local()).is_empty());
    }

    #[test]
    fn deny_all_isolates_only_local_selected_pods() {
        let mut recs = three_pods();
        recs.push((
            "networkpolicies/x/deny",
            r#"{"metadata":{"name":"deny"},"spec":{"podSelector":{}}}"#.into(),
        ));
        let rs = compile(&world(&recs), &local());
        assert_eq!(rs.maps["in4"].len(), 1, "{rs:?}");
        let group = &rs.maps["in4"]["10.244.1.2"];
        assert_eq!(
            rs.chains[group],
            vec!["jump pol_x_deny_in", "counter name denied_in drop"]
        );
        assert!(rs.chains["pol_x_deny_in"].is_empty());
        assert!(rs.maps["out4"].is_empty());
    }

    /// After a move to another subnet, our pods left on the old one stay isolated; the pods
    /// of the node holding the old subnet now are not ours.
    #[test]
    fn pods_left_on_a_former_subnet_stay_isolated_here() {
        let on = |name: &str, ip: &str, host: &str| {
            pod_json("x", name, ip, "{}").replacen(
                r#""status":{"#,
                &format!(r#""status":{{"hostIP":"{host}","#),
                1,
            )
        };
        let recs = vec![
            ("pods/x/ours", on("ours", "10.244.1.2", "192.168.0.1")),
            ("pods/x/theirs", on("theirs", "10.244.1.3", "192.168.0.2")),
            ("pods/x/new", on("new", "10.244.3.2", "192.168.0.1")),
            (
                "networkpolicies/x/deny",
                r#"{"metadata":{"name":"deny"},"spec":{"podSelector":{}}}"#.into(),
            ),
        ];
        let local = Locality {
            subnets: vec!["10.244.3.0/24".parse().expect("net")],
            former: vec!["10.244.1.0/24".parse().expect("net")],
            host_ip: "192.168.0.1".parse().ok(),
        };
        let rs = compile_for(&world(&recs), &local);
        let isolated: Vec<&String> = rs.maps["in4"].keys().collect();
        assert_eq!(isolated, ["10.244.1.2", "10.244.3.2"]);
    }

    #[test]
    fn rules_become_sets() {
        let mut recs = three_pods();
        recs.push((
            "networkpolicies/x/allow",
            r#"{"metadata":{"name":"allow"},"spec":{"podSelector":{"matchLabels":{"pod":"a"}},
               "ingress":[{"from":[{"podSelector":{"matchLabels":{"pod":"b"}}},
                                   {"ipBlock":{"cidr":"192.168.0.0/16","except":["192.168.1.0/24"]}}],
                           "ports":[{"port":80},{"port":"serve-81-udp","protocol":"UDP"}]}]}}"#
                .into(),
        ));
        let rs = compile(&world(&recs), &local());
        let peers = &rs.sets["pol_x_allow_in_0_peers4"].elements;
        assert_eq!(
            peers.iter().cloned().collect::<Vec<_>>(),
            vec![
                "10.244.2.2",
                "192.168.0.0-192.168.0.255",
                "192.168.2.0-192.168.255.255"
            ]
        );
        assert_eq!(
            rs.sets["pol_x_allow_in_0_ports"]
                .elements
                .iter()
                .collect::<Vec<_>>(),
            vec!["6 . 80"]
        );
        assert_eq!(
            rs.sets["pol_x_allow_in_0_named4"]
                .elements
                .iter()
                .collect::<Vec<_>>(),
            vec!["10.244.1.2 . 17 . 81"]
        );
        assert_eq!(
            rs.chains["pol_x_allow_in"],
            vec![
                "ip saddr @pol_x_allow_in_0_peers4 meta l4proto . th dport @pol_x_allow_in_0_ports accept",
                "ip saddr @pol_x_allow_in_0_peers4 ip daddr . meta l4proto . th dport @pol_x_allow_in_0_named4 accept",
                "ip6 saddr @pol_x_allow_in_0_peers6 meta l4proto . th dport @pol_x_allow_in_0_ports accept",
                "ip6 saddr @pol_x_allow_in_0_peers6 ip6 daddr . meta l4proto . th dport @pol_x_allow_in_0_named6 accept",
            ]
        );
    }

    /// An interval set refuses overlapping elements ("File exists"), which would block every
    /// policy update on the node: overlapping ports of one rule are merged per protocol.
    #[test]
    fn overlapping_ports_merge_per_protocol() {
        let ports = |json: &str| {
            let mut recs = three_pods();
            recs.push((
                "networkpolicies/x/p",
                format!(
                    r#"{{"metadata":{{"name":"p"}},"spec":{{"podSelector":{{}},
                        "ingress":[{{"ports":{json}}}]}}}}"#
                ),
            ));
            let rs = compile(&world(&recs), &local());
            rs.sets["pol_x_p_in_0_ports"]
                .elements
                .iter()
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            ports(r#"[{"protocol":"TCP"},{"port":80}]"#),
            vec!["6 . 0-65535"]
        );
        assert_eq!(
            ports(r#"[{"port":80,"endPort":90},{"port":85,"endPort":100},{"port":101}]"#),
            vec!["6 . 80-101"]
        );
        assert_eq!(
            ports(r#"[{"port":53,"protocol":"UDP"},{"port":53},{"port":53,"protocol":"UDP"}]"#),
            vec!["17 . 53", "6 . 53"]
        );
    }

    #[test]
    fn a_label_change_moves_only_elements() {
        let mut recs = three_pods();
        recs.push((
            "networkpolicies/x/allow",
            r#"{"metadata":{"name":"allow"},"spec":{"podSelector":{"matchLabels":{"pod":"a"}},
               "ingress":[{"from":[{"podSelector":{"matchLabels":{"pod":"b"}}}]}]}}"#
                .into(),
        ));
        let before = compile(&world(&recs), &local());
        recs[1] = (
            "pods/x/b",
            pod_json("x", "b", "10.244.2.2", r#"{"pod":"c"}"#),
        );
        recs.push((
            "pods/x/c",
            pod_json("x", "c", "10.244.2.9", r#"{"pod":"b"}"#),
        ));
        let after = compile(&world(&recs), &local());
        assert_eq!(before.chains, after.chains);
        assert_eq!(
            after.sets["pol_x_allow_in_0_peers4"]
                .elements
                .iter()
                .collect::<Vec<_>>(),
            vec!["10.244.2.9"]
        );
    }

    #[test]
    fn colliding_names_are_told_apart() {
        let mut names = Names::default();
        let a = names.claim("grp_00_in".into(), "pol_x_a_in");
        let b = names.claim("grp_00_in".into(), "pol_x_b_in");
        let c = names.claim("grp_00_in".into(), "pol_x_c_in");
        assert_eq!(
            (a.as_str(), b.as_str(), c.as_str()),
            ("grp_00_in", "grp_00_in_1", "grp_00_in_2")
        );
        assert_eq!(
            names.claim("grp_00_in".into(), "pol_x_b_in"),
            "grp_00_in_1",
            "stable"
        );
    }

    #[test]
    fn ranges_merge_and_subtract() {
        assert_eq!(
            merge(vec![(5, 9), (1, 3), (4, 4), (20, 30)]),
            vec![(1, 9), (20, 30)]
        );
        assert_eq!(subtract(&[(0, 10)], (3, 4)), vec![(0, 2), (5, 10)]);
        assert_eq!(subtract(&[(0, 10)], (0, 10)), vec![]);
    }
}
