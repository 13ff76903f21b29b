//! A `Ruleset` as `nft -f -` input: the whole table, or only the difference from the one
//! installed. Either is one script, and `nft -f` applies a script as one transaction, so the
//! kernel never holds half an update.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use crate::compile::{Ruleset, Set, SetKind, MAPS};

/// Our table, in family `inet` (one table for IPv4 and IPv6).
pub const TABLE: &str = "flanneld-rs-policy";

/// Forward-hook priorities: just before the usual filter chains (iptables' and Flannel's at
/// 0). Egress and ingress are two base chains so that an `accept` in the first (the sender's
/// policy allows it) still leaves the packet to the second (the receiver's policy). Both see
/// bridged traffic too (br_netfilter), so same-node pods are filtered like any other.
const EGRESS_PRIORITY: i32 = -10;
const INGRESS_PRIORITY: i32 = -9;

/// A script and how many kernel objects it adds, changes or removes (rules, set elements,
/// map entries, sets, chains): what a change costs, for metrics and the benchmark.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Script {
    pub text: String,
    pub operations: usize,
}

fn set_type(kind: SetKind) -> &'static str {
    match kind {
        SetKind::Addr4 => "type ipv4_addr; flags interval;",
        SetKind::Addr6 => "type ipv6_addr; flags interval;",
        SetKind::ProtoPort => "type inet_proto . inet_service; flags interval;",
        SetKind::Addr4ProtoPort => "type ipv4_addr . inet_proto . inet_service;",
        SetKind::Addr6ProtoPort => "type ipv6_addr . inet_proto . inet_service;",
    }
}

fn map_type(kind: SetKind) -> &'static str {
    match kind {
        SetKind::Addr6 => "type ipv6_addr : verdict;",
        _ => "type ipv4_addr : verdict;",
    }
}

/// Removes the table (and succeeds when it is not there).
pub fn remove() -> Script {
    Script {
        text: format!("add table inet {TABLE}\ndelete table inet {TABLE}\n"),
        operations: 1,
    }
}

/// The whole table for `rs`, replacing whatever is there. Empty rulesets remove the table.
pub fn full(rs: &Ruleset) -> Script {
    if rs.is_empty() {
        return remove();
    }
    let mut s = String::new();
    let mut ops = 1;
    let _ = writeln!(s, "add table inet {TABLE}\ndelete table inet {TABLE}");
    let _ = writeln!(s, "add table inet {TABLE}");
    let _ = writeln!(s, "add counter inet {TABLE} denied_in");
    let _ = writeln!(s, "add counter inet {TABLE} denied_out");
    for (name, kind) in MAPS {
        let _ = writeln!(s, "add map inet {TABLE} {name} {{ {} }}", map_type(kind));
    }
    for (name, set) in &rs.sets {
        ops += add_set(&mut s, name, set);
    }
    for name in rs.chains.keys() {
        let _ = writeln!(s, "add chain inet {TABLE} {name}");
    }
    for (name, rules) in &rs.chains {
        ops += 1 + add_rules(&mut s, name, rules);
    }
    for (name, entries) in &rs.maps {
        ops += add_map_entries(&mut s, name, entries.iter());
    }
    base_chains(&mut s);
    Script {
        text: s,
        operations: ops,
    }
}

fn base_chains(s: &mut String) {
    for (chain, prio, field, m4, m6) in [
        ("egress", EGRESS_PRIORITY, "saddr", "out4", "out6"),
        ("ingress", INGRESS_PRIORITY, "daddr", "in4", "in6"),
    ] {
        let _ = writeln!(
            s,
            "add chain inet {TABLE} {chain} {{ type filter hook forward priority {prio}; policy accept; }}"
        );
        // Replies and the rest of allowed connections never reach the maps.
        let _ = writeln!(
            s,
            "add rule inet {TABLE} {chain} ct state established,related accept"
        );
        let _ = writeln!(s, "add rule inet {TABLE} {chain} ip {field} vmap @{m4}");
        let _ = writeln!(s, "add rule inet {TABLE} {chain} ip6 {field} vmap @{m6}");
    }
}

fn add_set(s: &mut String, name: &str, set: &Set) -> usize {
    let _ = writeln!(
        s,
        "add set inet {TABLE} {name} {{ {} }}",
        set_type(set.kind)
    );
    1 + add_elements(s, name, set.elements.iter())
}

fn add_elements<'a>(s: &mut String, set: &str, elems: impl Iterator<Item = &'a String>) -> usize {
    element_lines(s, "add", set, elems.map(String::as_str))
}

/// Elements go in chunks so that no single line grows without bound.
fn element_lines<'a>(
    s: &mut String,
    verb: &str,
    set: &str,
    elems: impl Iterator<Item = &'a str>,
) -> usize {
    let elems: Vec<&str> = elems.collect();
    for chunk in elems.chunks(256) {
        let _ = writeln!(
            s,
            "{verb} element inet {TABLE} {set} {{ {} }}",
            chunk.join(", ")
        );
    }
    elems.len()
}

fn add_rules(s: &mut String, chain: &str, rules: &[String]) -> usize {
    for r in rules {
        let _ = writeln!(s, "add rule inet {TABLE} {chain} {r}");
    }
    rules.len()
}

fn add_map_entries<'a>(
    s: &mut String,
    map: &str,
    entries: impl Iterator<Item = (&'a String, &'a String)>,
) -> usize {
    let items: Vec<String> = entries
        .map(|(addr, chain)| format!("{addr} : jump {chain}"))
        .collect();
    let refs = items.iter().map(String::as_str);
    element_lines(s, "add", map, refs)
}

/// The commands that turn the installed `old` into `new`. When either is empty the whole
/// table is written or removed.
pub fn diff(old: &Ruleset, new: &Ruleset) -> Script {
    if old.is_empty() && new.is_empty() {
        // No table before, none now: nothing to run (a node without isolated pods never
        // calls nft, whatever changes elsewhere in the cluster).
        return Script::default();
    }
    if old.is_empty() || new.is_empty() {
        return full(new);
    }
    let mut s = String::new();
    let mut ops = 0;
    // 1. New sets and chains exist before anything refers to them.
    for (name, set) in &new.sets {
        match old.sets.get(name) {
            None => ops += add_set(&mut s, name, set),
            Some(prev) if prev.kind != set.kind => {
                // Same name, other type: cannot happen with our naming, but be whole anyway.
                return full(new);
            }
            Some(prev) => {
                let gone: Vec<&str> = prev
                    .elements
                    .difference(&set.elements)
                    .map(String::as_str)
                    .collect();
                ops += element_lines(&mut s, "delete", name, gone.into_iter());
                ops += add_elements(&mut s, name, set.elements.difference(&prev.elements));
            }
        }
    }
    for name in new.chains.keys().filter(|n| !old.chains.contains_key(*n)) {
        let _ = writeln!(s, "add chain inet {TABLE} {name}");
        ops += 1;
    }
    // 2. Chains whose rules changed are refilled.
    for (name, rules) in &new.chains {
        if old.chains.get(name) != Some(rules) {
            if old.chains.contains_key(name) {
                let _ = writeln!(s, "flush chain inet {TABLE} {name}");
            }
            ops += add_rules(&mut s, name, rules).max(1);
        }
    }
    // 3. Map entries: changed ones are removed and added again.
    let empty = BTreeMap::new();
    for (map, entries) in &new.maps {
        let prev = old.maps.get(map).unwrap_or(&empty);
        let gone: Vec<String> = prev
            .iter()
            .filter(|(k, v)| entries.get(*k) != Some(*v))
            .map(|(k, _)| k.clone())
            .collect();
        ops += element_lines(&mut s, "delete", map, gone.iter().map(String::as_str));
        ops += add_map_entries(
            &mut s,
            map,
            entries.iter().filter(|(k, v)| prev.get(*k) != Some(*v)),
        );
    }
    // 4. What nothing refers to any more goes last.
    let stale_chains: BTreeSet<&String> = old
        .chains
        .keys()
        .filter(|n| !new.chains.contains_key(*n))
        .collect();
    for name in &stale_chains {
        let _ = writeln!(s, "flush chain inet {TABLE} {name}");
    }
    for name in &stale_chains {
        let _ = writeln!(s, "delete chain inet {TABLE} {name}");
        ops += 1;
    }
    for name in old.sets.keys().filter(|n| !new.sets.contains_key(*n)) {
        let _ = writeln!(s, "delete set inet {TABLE} {name}");
        ops += 1;
    }
    Script {
        text: s,
        operations: ops,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::compile;
    use crate::world::tests::{pod_json, world};

    fn rs(label_b: &str) -> Ruleset {
        let recs = vec![
            ("pods/x/a", pod_json("x", "a", "10.244.1.2", r#"{"pod":"a"}"#)),
            ("pods/x/b", pod_json("x", "b", "10.244.2.2", label_b)),
            (
                "networkpolicies/x/allow",
                r#"{"metadata":{"name":"allow"},"spec":{"podSelector":{"matchLabels":{"pod":"a"}},
                   "ingress":[{"from":[{"podSelector":{"matchLabels":{"pod":"b"}}}],"ports":[{"port":80}]}]}}"#
                    .into(),
            ),
        ];
        compile(&world(&recs), &["10.244.1.0/24".parse().expect("net")])
    }

    #[test]
    fn full_script_declares_before_use() {
        let s = full(&rs(r#"{"pod":"b"}"#)).text;
        let at = |needle: &str| s.find(needle).unwrap_or_else(|| panic!("{needle} in {s}"));
        assert!(
            at("add set inet flanneld-rs-policy pol_x_allow_in_0_peers4")
                < at("add rule inet flanneld-rs-policy pol_x_allow_in ")
        );
        assert!(
            at("add chain inet flanneld-rs-policy grp_")
                < at("add element inet flanneld-rs-policy in4")
        );
        assert!(s.contains("10.244.1.2 : jump grp_"));
        assert!(s.contains("type filter hook forward priority -9; policy accept;"));
        assert!(s.starts_with("add table inet flanneld-rs-policy\ndelete table"));
    }

    #[test]
    fn label_change_is_two_element_operations() {
        let a = rs(r#"{"pod":"b"}"#);
        let b = rs(r#"{"pod":"z"}"#);
        let d = diff(&a, &b);
        assert_eq!(d.operations, 1, "{}", d.text);
        assert_eq!(
            d.text,
            "delete element inet flanneld-rs-policy pol_x_allow_in_0_peers4 { 10.244.2.2 }\n"
        );
        let d = diff(&b, &a);
        assert_eq!(
            d.text,
            "add element inet flanneld-rs-policy pol_x_allow_in_0_peers4 { 10.244.2.2 }\n"
        );
        assert!(diff(&a, &a).text.is_empty());
    }

    #[test]
    fn nothing_to_nothing_runs_nothing() {
        let d = diff(&Ruleset::default(), &Ruleset::default());
        assert_eq!(d, Script::default());
    }

    #[test]
    fn empty_removes_the_table() {
        let a = rs(r#"{"pod":"b"}"#);
        let d = diff(&a, &Ruleset::default());
        assert_eq!(
            d.text,
            "add table inet flanneld-rs-policy\ndelete table inet flanneld-rs-policy\n"
        );
    }
}
