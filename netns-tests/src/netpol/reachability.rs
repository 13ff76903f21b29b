//! The expected and observed pod-to-pod connectivity of one probe, as the Kubernetes e2e
//! NetworkPolicy suite models it (`reachability.go`, `truthtable.go`): pods are named
//! `"<namespace>/<pod>"`, expectations are set per pair, per destination (all ingress), per
//! source (all egress) or by `Peer` matchers, and a comparison prints truth tables with `.` for
//! connected / matching and `X` for blocked / mismatching.
//!
//! As upstream (`ignoreLoopback`), a pod's traffic to itself never fails a comparison: it
//! stays inside the pod (loopback) and no policy applies to it.

use std::fmt::Write as _;

/// The namespaces of the model, in order.
pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
/// The pods of every namespace, in order.
pub const POD_NAMES: [&str; 3] = ["a", "b", "c"];

/// `"x/a"`, `"x/b"`, … `"z/c"`: the nine pods of the model, in upstream's order.
pub fn all_pods() -> Vec<String> {
    NAMESPACES
        .iter()
        .flat_map(|ns| POD_NAMES.iter().map(move |p| format!("{ns}/{p}")))
        .collect()
}

/// Splits `"x/a"` into `("x", "a")`.
pub fn split_pod(pod: &str) -> (&str, &str) {
    pod.split_once('/').unwrap_or((pod, ""))
}

/// Matches pods by namespace and/or name; an unset field matches everything (upstream `Peer`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    pub namespace: Option<String>,
    pub pod: Option<String>,
}

impl Peer {
    /// Every pod (`&Peer{}` upstream).
    pub fn any() -> Self {
        Peer::default()
    }

    /// Every pod of namespace `ns`.
    pub fn ns(ns: &str) -> Self {
        Peer {
            namespace: Some(ns.to_string()),
            pod: None,
        }
    }

    /// Pod `name` of namespace `ns`.
    pub fn pod(ns: &str, name: &str) -> Self {
        Peer {
            namespace: Some(ns.to_string()),
            pod: Some(name.to_string()),
        }
    }

    /// Pods named `name` in any namespace.
    pub fn named(name: &str) -> Self {
        Peer {
            namespace: None,
            pod: Some(name.to_string()),
        }
    }

    pub fn matches(&self, pod: &str) -> bool {
        let (ns, name) = split_pod(pod);
        self.namespace.as_deref().is_none_or(|n| n == ns)
            && self.pod.as_deref().is_none_or(|p| p == name)
    }
}

/// An n×n table of booleans over the same items as sources and destinations; a missing value
/// prints `?`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TruthTable {
    items: Vec<String>,
    values: Vec<Vec<Option<bool>>>,
}

impl TruthTable {
    pub fn new(items: Vec<String>, default: Option<bool>) -> Self {
        let n = items.len();
        TruthTable {
            items,
            values: vec![vec![default; n]; n],
        }
    }

    pub fn items(&self) -> &[String] {
        &self.items
    }

    fn index(&self, item: &str) -> usize {
        self.items
            .iter()
            .position(|i| i == item)
            .unwrap_or_else(|| panic!("{item} is not in the truth table ({:?})", self.items))
    }

    pub fn set(&mut self, from: &str, to: &str, value: bool) {
        let (f, t) = (self.index(from), self.index(to));
        self.values[f][t] = Some(value);
    }

    pub fn get(&self, from: &str, to: &str) -> Option<bool> {
        self.values[self.index(from)][self.index(to)]
    }

    /// Sets every value whose source is `from`.
    pub fn set_all_from(&mut self, from: &str, value: bool) {
        let f = self.index(from);
        for v in &mut self.values[f] {
            *v = Some(value);
        }
    }

    /// Sets every value whose destination is `to`.
    pub fn set_all_to(&mut self, to: &str, value: bool) {
        let t = self.index(to);
        for row in &mut self.values {
            row[t] = Some(value);
        }
    }

    /// Whether every pair has a value.
    pub fn is_complete(&self) -> bool {
        self.values.iter().flatten().all(Option::is_some)
    }

    /// A table holding, per pair, whether `self` and `other` agree (missing on either side:
    /// disagree). Both tables must have the same items.
    pub fn compare(&self, other: &TruthTable) -> TruthTable {
        assert_eq!(self.items, other.items, "comparing tables of other items");
        let values = self
            .values
            .iter()
            .zip(&other.values)
            .map(|(a, b)| {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| Some(x.is_some() && x == y))
                    .collect()
            })
            .collect();
        TruthTable {
            items: self.items.clone(),
            values,
        }
    }

    /// Upstream's layout: a header row `-  x/a  x/b …`, then one row per source, `.` for
    /// true, `X` for false, `?` for unset, tab-separated.
    pub fn pretty_print(&self, indent: &str) -> String {
        let mut out = String::new();
        let _ = write!(out, "{indent}-");
        for to in &self.items {
            let _ = write!(out, "\t{to}");
        }
        for (i, from) in self.items.iter().enumerate() {
            let _ = write!(out, "\n{indent}{from}");
            for v in &self.values[i] {
                let mark = match v {
                    None => "?",
                    Some(true) => ".",
                    Some(false) => "X",
                };
                let _ = write!(out, "\t{mark}");
            }
        }
        out
    }
}

/// The counts of one comparison (upstream `Summary`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub correct: usize,
    pub wrong: usize,
    pub ignored: usize,
}

/// Expected and observed connectivity of one probe (one port and protocol) across the pods.
#[derive(Clone, Debug)]
pub struct Reachability {
    pub expected: TruthTable,
    pub observed: TruthTable,
}

impl Reachability {
    /// Over the nine pods `x/a` … `z/c`, every pair expected `default`.
    pub fn new(default: bool) -> Self {
        Self::with_pods(all_pods(), default)
    }

    /// Over any pods (`"ns/name"`).
    pub fn with_pods(pods: Vec<String>, default: bool) -> Self {
        Reachability {
            expected: TruthTable::new(pods.clone(), Some(default)),
            observed: TruthTable::new(pods, None),
        }
    }

    pub fn pods(&self) -> &[String] {
        self.expected.items()
    }

    pub fn expect(&mut self, from: &str, to: &str, connected: bool) {
        self.expected.set(from, to, connected);
    }

    /// Everything into `pod` is allowed / denied.
    pub fn expect_all_ingress(&mut self, pod: &str, connected: bool) {
        self.expected.set_all_to(pod, connected);
    }

    /// Everything out of `pod` is allowed / denied.
    pub fn expect_all_egress(&mut self, pod: &str, connected: bool) {
        self.expected.set_all_from(pod, connected);
    }

    /// Every pair whose source matches `from` and destination matches `to`.
    pub fn expect_peer(&mut self, from: &Peer, to: &Peer, connected: bool) {
        let pods = self.pods().to_vec();
        for f in pods.iter().filter(|p| from.matches(p)) {
            for t in pods.iter().filter(|p| to.matches(p)) {
                self.expected.set(f, t, connected);
            }
        }
    }

    /// Expects every pod to reach itself (upstream `AllowLoopback`).
    pub fn allow_loopback(&mut self) {
        for p in self.pods().to_vec() {
            self.expected.set(&p, &p, true);
        }
    }

    pub fn observe(&mut self, from: &str, to: &str, connected: bool) {
        self.observed.set(from, to, connected);
    }

    /// Forgets all observations (before probing again).
    pub fn clear_observed(&mut self) {
        self.observed = TruthTable::new(self.pods().to_vec(), None);
    }

    /// Counts agreeing and disagreeing pairs; loopback pairs are counted as ignored when
    /// `ignore_loopback` (as upstream always does).
    pub fn summary(&self, ignore_loopback: bool) -> Summary {
        let cmp = self.expected.compare(&self.observed);
        let mut s = Summary::default();
        for from in cmp.items() {
            for to in cmp.items() {
                if ignore_loopback && from == to {
                    s.ignored += 1;
                } else if cmp.get(from, to) == Some(true) {
                    s.correct += 1;
                } else {
                    s.wrong += 1;
                }
            }
        }
        s
    }

    /// Ok when every non-loopback pair was observed as expected; otherwise the error text
    /// carries the expected, observed and comparison tables (upstream `PrintSummary`).
    pub fn check(&self) -> Result<Summary, String> {
        let s = self.summary(true);
        if s.wrong == 0 {
            return Ok(s);
        }
        Err(format!(
            "reachability: correct:{}, incorrect:{}, ignored (loopback):{}\n\nexpected:\n\n{}\n\nobserved:\n\n{}\n\ncomparison:\n\n{}\n",
            s.correct,
            s.wrong,
            s.ignored,
            self.expected.pretty_print(""),
            self.observed.pretty_print(""),
            self.expected.compare(&self.observed).pretty_print(""),
        ))
    }

    /// The pairs (from, to, expected) whose observation differs from the expectation,
    /// loopback excluded.
    pub fn mismatches(&self) -> Vec<(String, String, bool)> {
        let mut out = Vec::new();
        for from in self.pods() {
            for to in self.pods() {
                if from == to {
                    continue;
                }
                let want = self.expected.get(from, to).unwrap_or(true);
                if self.observed.get(from, to) != Some(want) {
                    out.push((from.clone(), to.clone(), want));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nine_pods_in_upstream_order() {
        let pods = all_pods();
        assert_eq!(pods.len(), 9);
        assert_eq!(pods[0], "x/a");
        assert_eq!(pods[4], "y/b");
        assert_eq!(pods[8], "z/c");
    }

    #[test]
    fn peers_match_by_namespace_and_name() {
        assert!(Peer::any().matches("z/c"));
        assert!(Peer::ns("x").matches("x/b"));
        assert!(!Peer::ns("x").matches("y/b"));
        assert!(Peer::pod("y", "a").matches("y/a"));
        assert!(!Peer::pod("y", "a").matches("y/b"));
        assert!(Peer::named("b").matches("z/b"));
    }

    #[test]
    fn expectations_compose_like_upstream() {
        // "should support denying of egress traffic on the client side"
        let mut r = Reachability::new(true);
        r.expect_peer(&Peer::pod("x", "a"), &Peer::any(), false);
        r.expect_peer(&Peer::any(), &Peer::pod("y", "a"), false);
        r.expect_peer(&Peer::pod("x", "a"), &Peer::pod("y", "a"), true);
        r.expect_peer(&Peer::any(), &Peer::pod("y", "b"), false);
        assert_eq!(r.expected.get("x/a", "y/a"), Some(true));
        assert_eq!(r.expected.get("x/a", "y/b"), Some(false));
        assert_eq!(r.expected.get("x/b", "y/a"), Some(false));
        assert_eq!(r.expected.get("x/a", "x/b"), Some(false));
        assert_eq!(r.expected.get("z/c", "x/a"), Some(true));

        let mut r = Reachability::new(true);
        r.expect_all_ingress("x/a", false);
        r.expect("x/b", "x/a", true);
        assert_eq!(r.expected.get("y/c", "x/a"), Some(false));
        assert_eq!(r.expected.get("x/b", "x/a"), Some(true));
        assert_eq!(r.expected.get("x/a", "y/c"), Some(true));
        r.expect_all_egress("z/c", false);
        assert_eq!(r.expected.get("z/c", "x/b"), Some(false));
        r.allow_loopback();
        assert_eq!(r.expected.get("x/a", "x/a"), Some(true));
    }

    #[test]
    fn comparison_ignores_loopback_and_prints_tables() {
        let mut r = Reachability::new(true);
        r.expect_all_ingress("x/a", false);
        let pods = all_pods();
        for f in &pods {
            for t in &pods {
                // Observed: everything connects, x/a included (a missing policy).
                r.observe(f, t, f == t || t != "x/a" || f == "y/b");
            }
        }
        // Only y/b -> x/a is wrong: x/a -> x/a (loopback) is ignored.
        let s = r.summary(true);
        assert_eq!(
            s,
            Summary {
                correct: 71,
                wrong: 1,
                ignored: 9
            }
        );
        assert_eq!(r.summary(false).wrong, 2);
        assert_eq!(r.mismatches(), vec![("y/b".into(), "x/a".into(), false)]);
        let err = r.check().unwrap_err();
        assert!(err.contains("incorrect:1"), "{err}");
        assert!(err.contains("-\tx/a\tx/b\tx/c\ty/a"), "{err}");
        // The comparison row of y/b has its one X under x/a.
        assert!(err.contains("\ny/b\tX\t.\t.\t.\t.\t.\t.\t.\t."), "{err}");

        r.clear_observed();
        assert!(!r.observed.is_complete());
        assert!(r.observed.pretty_print("").contains('?'));
        for f in &pods {
            for t in &pods {
                r.observe(f, t, f == t || t != "x/a");
            }
        }
        assert!(r.check().is_ok());
    }
}
