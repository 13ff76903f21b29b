//! "Is SRC allowed to reach DST on PORT/PROTO, and why?", answered from the same world and
//! the same selector and peer questions the compiler asks, so the answer is what the kernel
//! does with a new connection.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::object::{Peer, Pod, Policy, PortRef, Protocol, Rule};
use crate::world::{Direction, World};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub allowed: bool,
    /// `namespace/name` of the pod holding each address, if a record names one.
    pub source_pod: Option<String>,
    pub destination_pod: Option<String>,
    pub egress: Side,
    pub ingress: Side,
}

/// One direction's verdict: the sender's egress or the receiver's ingress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Side {
    pub allowed: bool,
    /// Policies selecting the pod for this direction (`namespace/name`); none: not isolated.
    pub policies: Vec<String>,
    /// The first rule that allows it (`namespace/name ingress[0]`), when one does.
    pub matched: Option<String>,
    /// One sentence for people.
    pub reason: String,
}

pub fn explain(
    world: &World,
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    protocol: Protocol,
) -> Explanation {
    let src_pod = world.pod_at(src);
    let dst_pod = world.pod_at(dst);
    let name = |p: &Pod| format!("{}/{}", p.namespace, p.name);
    let egress = side(
        world,
        Direction::Egress,
        src_pod,
        dst,
        dst_pod,
        src,
        port,
        protocol,
    );
    let ingress = side(
        world,
        Direction::Ingress,
        dst_pod,
        src,
        src_pod,
        dst,
        port,
        protocol,
    );
    Explanation {
        allowed: egress.allowed && ingress.allowed,
        source_pod: src_pod.map(name),
        destination_pod: dst_pod.map(name),
        egress,
        ingress,
    }
}

/// The verdict of `subject`'s policies in `dir` on traffic with `peer_ip` (`peer_pod`).
#[allow(clippy::too_many_arguments)]
fn side(
    world: &World,
    dir: Direction,
    subject: Option<&Pod>,
    peer_ip: IpAddr,
    peer_pod: Option<&Pod>,
    subject_ip: IpAddr,
    port: u16,
    protocol: Protocol,
) -> Side {
    let Some(pod) = subject else {
        return Side {
            allowed: true,
            policies: vec![],
            matched: None,
            reason: format!(
                "{subject_ip} is not a pod with a record: no {} policy applies",
                dir.name()
            ),
        };
    };
    let policies = world.selecting(pod, dir);
    let names: Vec<String> = policies
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    if policies.is_empty() {
        return Side {
            allowed: true,
            policies: names,
            matched: None,
            reason: format!(
                "{}/{} is not isolated for {}: no policy selects it",
                pod.namespace,
                pod.name,
                dir.name()
            ),
        };
    }
    if dir == Direction::Ingress && pod.host_ip == Some(peer_ip) {
        return Side {
            allowed: true,
            policies: names,
            matched: None,
            reason: "traffic from the pod's own node is always allowed".into(),
        };
    }
    // The pod whose named ports count: the destination.
    let dest = match dir {
        Direction::Ingress => Some(pod),
        Direction::Egress => peer_pod,
    };
    for policy in &policies {
        let rules: &[Rule] = match dir {
            Direction::Ingress => policy.ingress.as_deref().unwrap_or_default(),
            Direction::Egress => policy.egress.as_deref().unwrap_or_default(),
        };
        for (i, rule) in rules.iter().enumerate() {
            let peer_ok = rule.peers.is_empty()
                || rule
                    .peers
                    .iter()
                    .any(|peer| peer_matches(world, policy, peer, peer_ip, peer_pod));
            let port_ok = rule.ports.is_empty()
                || rule.ports.iter().any(|pm| {
                    pm.protocol == protocol
                        && match &pm.port {
                            PortRef::Any => true,
                            PortRef::Range(a, b) => (*a..=*b).contains(&port),
                            PortRef::Named(n) => dest.is_some_and(|d| {
                                d.ports.iter().any(|np| {
                                    np.name == *n && np.protocol == protocol && np.port == port
                                })
                            }),
                        }
                });
            if peer_ok && port_ok {
                let at = format!("{}/{} {}[{i}]", policy.namespace, policy.name, dir.name());
                return Side {
                    allowed: true,
                    policies: names,
                    reason: format!("allowed by {at}"),
                    matched: Some(at),
                };
            }
        }
    }
    Side {
        allowed: false,
        reason: format!(
            "{}/{} is isolated for {} by {} and no rule of {} allows {peer_ip} on {port}/{}",
            pod.namespace,
            pod.name,
            dir.name(),
            names.join(", "),
            if names.len() == 1 { "it" } else { "them" },
            protocol.name()
        ),
        policies: names,
        matched: None,
    }
}

fn peer_matches(
    world: &World,
    policy: &Policy,
    peer: &Peer,
    ip: IpAddr,
    pod: Option<&Pod>,
) -> bool {
    match peer {
        Peer::Block { cidr, except } => {
            cidr.contains(&ip) && !except.iter().any(|e| e.contains(&ip))
        }
        Peer::Pods { .. } => pod.is_some_and(|p| world.peer_has_pod(policy, peer, p)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::tests::{pod_json, world};

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn says_which_rule_or_why_not() {
        let w = world(&[
            ("pods/x/a", pod_json("x", "a", "10.244.1.2", r#"{"pod":"a"}"#)),
            ("pods/x/b", pod_json("x", "b", "10.244.2.2", r#"{"pod":"b"}"#)),
            ("pods/y/c", pod_json("y", "c", "10.244.2.3", r#"{"pod":"c"}"#)),
            (
                "networkpolicies/x/allow-b",
                r#"{"metadata":{"name":"allow-b"},"spec":{"podSelector":{"matchLabels":{"pod":"a"}},
                   "ingress":[{"from":[{"podSelector":{"matchLabels":{"pod":"b"}}}],"ports":[{"port":"serve-80-tcp"}]}]}}"#
                    .into(),
            ),
        ]);
        let e = explain(&w, ip("10.244.2.2"), ip("10.244.1.2"), 80, Protocol::Tcp);
        assert!(e.allowed);
        assert_eq!(e.ingress.matched.as_deref(), Some("x/allow-b ingress[0]"));
        assert_eq!(e.source_pod.as_deref(), Some("x/b"));
        let e = explain(&w, ip("10.244.2.2"), ip("10.244.1.2"), 81, Protocol::Tcp);
        assert!(!e.allowed);
        let e = explain(&w, ip("10.244.2.3"), ip("10.244.1.2"), 80, Protocol::Tcp);
        assert!(!e.allowed);
        assert!(
            e.ingress
                .reason
                .contains("isolated for ingress by x/allow-b"),
            "{}",
            e.ingress.reason
        );
        assert!(e.egress.allowed);
        // The other way round nothing is isolated.
        assert!(explain(&w, ip("10.244.1.2"), ip("10.244.2.3"), 80, Protocol::Udp).allowed);
    }
}
