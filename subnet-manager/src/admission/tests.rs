use super::*;
use crate::lease::LeaseAttrs;

fn config(backend: &str) -> NetworkConfig {
    let json = format!(r#"{{"Network":"10.230.0.0/16","Backend":{{"Type":"{backend}"}}}}"#);
    NetworkConfig::parse(json.as_bytes()).expect("config")
}

fn lease(key: &str, json: &str) -> Lease {
    Lease {
        key: SubnetKey::parse(key).expect("key"),
        attrs: LeaseAttrs::from_json(json.as_bytes()).expect("attrs"),
    }
}

fn hostgw(key: &str, ip: &str) -> Lease {
    lease(
        key,
        &format!(r#"{{"PublicIP":"{ip}","BackendType":"host-gw"}}"#),
    )
}

fn vxlan(key: &str, ip: &str, mac: &str) -> Lease {
    lease(
        key,
        &format!(
            r#"{{"PublicIP":"{ip}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
        ),
    )
}

fn mac_claims() -> Claims {
    Box::new(|l: &Lease| {
        l.attrs
            .backend_data
            .as_ref()
            .and_then(|d| d.get("VtepMAC"))
            .and_then(|m| m.as_str())
            .map(|m| vec![format!("VtepMAC {}", m.to_ascii_lowercase())])
            .unwrap_or_default()
    })
}

fn no_claims() -> Claims {
    Box::new(|_: &Lease| Vec::new())
}

fn with_own(backend: &str, claims: Claims, own: Lease) -> Admission {
    let mut a = Admission::new(&config(backend), backend, claims);
    assert_eq!(a.set_own(&own), Outcome::default());
    a
}

fn refusal(out: &Outcome) -> &Refusal {
    assert!(out.changes.is_empty(), "{out:?}");
    assert_eq!(out.refused.len(), 1, "{out:?}");
    &out.refused[0].1
}

#[test]
fn good_peer_is_admitted_once() {
    let mut a = with_own(
        "host-gw",
        no_claims(),
        hostgw("10.230.1.0-24", "192.168.230.1"),
    );
    let p = hostgw("10.230.2.0-24", "192.168.230.2");
    assert_eq!(a.put(p.clone()).changes, vec![PeerChange::Add(p.clone())]);
    // The same value again (a renewal) is no change.
    assert_eq!(a.put(p.clone()), Outcome::default());
    assert_eq!(a.admitted_count(), 1);
    assert_eq!(a.remove(&p.key).changes, vec![PeerChange::Remove(p)]);
    assert_eq!(a.admitted_count(), 0);
}

#[test]
fn subnets_outside_the_config_are_refused() {
    let mut a = with_own(
        "host-gw",
        no_claims(),
        hostgw("10.230.1.0-24", "192.168.230.1"),
    );
    // The underlay's own prefix: the finding that cut nodes off.
    let r = a.put(hostgw("192.168.230.0-24", "192.168.230.9"));
    assert_eq!(refusal(&r).kind(), "subnet");
    assert!(refusal(&r).to_string().contains("outside the Network"));
    // The whole Network, and half of a /24.
    let r = a.put(hostgw("10.230.0.0-16", "192.168.230.9"));
    assert!(refusal(&r).to_string().contains("SubnetLen is 24"), "{r:?}");
    let r = a.put(hostgw("10.230.1.128-25", "192.168.230.9"));
    assert_eq!(refusal(&r).kind(), "subnet");
    // IPv6 part without IPv6 in the config.
    let r = a.put(hostgw("10.230.3.0-24&fc00::-64", "192.168.230.9"));
    assert!(refusal(&r).to_string().contains("IPv6 is not enabled"));
    assert_eq!(a.admitted_count(), 0);
    assert_eq!(a.refused_count(), 4);
}

#[test]
fn public_ip_must_be_a_peer_address() {
    let mut a = with_own(
        "host-gw",
        no_claims(),
        hostgw("10.230.1.0-24", "192.168.230.1"),
    );
    for (ip, why) in [
        ("0.0.0.0", "unspecified"),
        ("127.0.0.1", "loopback"),
        ("224.0.0.5", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("10.230.9.9", "inside the pod Network"),
        ("192.168.230.1", "is ours"),
    ] {
        let r = a.put(hostgw("10.230.2.0-24", ip));
        let text = refusal(&r).to_string();
        assert!(text.contains(why), "{ip}: {text}");
    }
    let r = a.put(lease(
        "10.230.2.0-24",
        r#"{"BackendType":"host-gw"}"#, // no PublicIP at all
    ));
    assert_eq!(refusal(&r).kind(), "public_ip");
}

#[test]
fn other_backends_are_benign_and_not_counted() {
    let mut a = with_own(
        "host-gw",
        no_claims(),
        hostgw("10.230.1.0-24", "192.168.230.1"),
    );
    let r = a.put(lease("10.230.2.0-24", r#"{"PublicIP":"192.168.230.2"}"#));
    assert!(refusal(&r).is_benign());
    assert_eq!(a.refused_count(), 0);
    assert_eq!(a.admitted_count(), 0);
}

#[test]
fn overlapping_our_lease_is_refused() {
    let mut a = Admission::new(&config("host-gw"), "host-gw", no_claims());
    let p = hostgw("10.230.2.0-24", "192.168.230.2");
    assert_eq!(a.put(p.clone()).changes, vec![PeerChange::Add(p.clone())]);
    // We re-acquire and end up holding that subnet (it was stale): the peer leaves.
    let out = a.set_own(&hostgw("10.230.2.0-24", "192.168.230.1"));
    assert_eq!(out.changes, vec![PeerChange::Remove(p.clone())]);
    // Our own key is never a peer.
    assert_eq!(a.put(p), Outcome::default());
}

#[test]
fn a_copied_vtep_mac_is_refused_and_the_owner_keeps_it() {
    let mut a = with_own(
        "vxlan",
        mac_claims(),
        vxlan("10.230.1.0-24", "192.168.230.1", "02:00:00:00:00:01"),
    );
    let owner = vxlan("10.230.2.0-24", "192.168.230.2", "02:00:00:00:00:02");
    assert_eq!(a.put(owner.clone()).changes.len(), 1);
    let thief = vxlan("10.230.3.0-24", "192.168.230.66", "02:00:00:00:00:02");
    let r = a.put(thief.clone());
    assert_eq!(
        refusal(&r),
        &Refusal::Claimed {
            claim: "VtepMAC 02:00:00:00:00:02".into(),
            holder: Some(owner.key.clone())
        }
    );
    // The thief's key deleted: nothing to undo, the owner untouched.
    assert_eq!(a.remove(&thief.key), Outcome::default());
    assert_eq!(a.admitted().collect::<Vec<_>>(), vec![&owner]);
    // Our own MAC copied.
    let r = a.put(vxlan("10.230.4.0-24", "192.168.230.4", "02:00:00:00:00:01"));
    assert!(refusal(&r).to_string().contains("is ours"));
}

#[test]
fn a_refused_lease_is_admitted_when_the_holder_leaves() {
    let mut a = with_own(
        "vxlan",
        mac_claims(),
        vxlan("10.230.1.0-24", "192.168.230.1", "02:00:00:00:00:01"),
    );
    let old = vxlan("10.230.2.0-24", "192.168.230.2", "02:00:00:00:00:02");
    let new = vxlan("10.230.3.0-24", "192.168.230.3", "02:00:00:00:00:02");
    a.put(old.clone());
    assert_eq!(a.put(new.clone()).refused.len(), 1);
    // Refused once: the same value put again (a renewal) is not reported again.
    assert_eq!(a.put(new.clone()), Outcome::default());
    // The node moved to a new subnet; its old lease expires: the new one takes over.
    let out = a.remove(&old.key);
    assert_eq!(
        out.changes,
        vec![PeerChange::Remove(old), PeerChange::Add(new.clone())]
    );
    assert_eq!(a.refused_count(), 0);
}

#[test]
fn a_lease_changing_into_a_conflict_leaves_the_backend() {
    let mut a = with_own(
        "vxlan",
        mac_claims(),
        vxlan("10.230.1.0-24", "192.168.230.1", "02:00:00:00:00:01"),
    );
    let p2 = vxlan("10.230.2.0-24", "192.168.230.2", "02:00:00:00:00:02");
    let p3 = vxlan("10.230.3.0-24", "192.168.230.3", "02:00:00:00:00:03");
    a.put(p2.clone());
    a.put(p3.clone());
    let p3_bad = vxlan("10.230.3.0-24", "192.168.230.3", "02:00:00:00:00:02");
    let out = a.put(p3_bad);
    assert_eq!(out.changes, vec![PeerChange::Remove(p3)]);
    assert_eq!(out.refused.len(), 1);
    assert_eq!(a.admitted().collect::<Vec<_>>(), vec![&p2]);
}

#[test]
fn ipv6_only_and_dual_stack_keys() {
    let cfg = NetworkConfig::parse(
        br#"{"Network":"10.230.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","Backend":{"Type":"host-gw"}}"#,
    )
    .expect("config");
    let mut a = Admission::new(&cfg, "host-gw", no_claims());
    let ok = lease(
        "10.230.2.0-24&fc00:0:0:2::-64",
        r#"{"PublicIP":"192.168.230.2","PublicIPv6":"2001:db8::2","BackendType":"host-gw"}"#,
    );
    assert_eq!(a.put(ok).changes.len(), 1);
    let outside = lease(
        "10.230.3.0-24&fd00:0:0:3::-64",
        r#"{"PublicIP":"192.168.230.3","PublicIPv6":"2001:db8::3","BackendType":"host-gw"}"#,
    );
    assert!(refusal(&a.put(outside))
        .to_string()
        .contains("outside the IPv6Network"));
    let same_v6 = lease(
        "10.230.4.0-24&fc00:0:0:2::-64",
        r#"{"PublicIP":"192.168.230.4","PublicIPv6":"2001:db8::4","BackendType":"host-gw"}"#,
    );
    assert_eq!(refusal(&a.put(same_v6)).kind(), "overlaps_peer");
    let loopback6 = lease(
        "10.230.5.0-24&fc00:0:0:5::-64",
        r#"{"PublicIP":"192.168.230.5","PublicIPv6":"::1","BackendType":"host-gw"}"#,
    );
    assert_eq!(refusal(&a.put(loopback6)).kind(), "public_ip");
}

#[test]
fn every_refusal_kind_is_listed_for_metrics() {
    let k = SubnetKey::parse("10.230.1.0-24").expect("key");
    for r in [
        Refusal::OtherBackend("udp".into()),
        Refusal::Subnet(String::new()),
        Refusal::OverlapsOurs(k.clone()),
        Refusal::Overlaps(k.clone()),
        Refusal::PublicIp(String::new()),
        Refusal::Claimed {
            claim: String::new(),
            holder: Some(k),
        },
    ] {
        assert!(Refusal::KINDS.contains(&r.kind()), "{r:?}");
    }
}

#[test]
fn whoever_took_our_old_key_is_a_peer_once_we_move() {
    let mut a = with_own(
        "host-gw",
        no_claims(),
        hostgw("10.230.1.0-24", "192.168.230.1"),
    );
    // Another node's value on our key: the daemon moves us, admission keeps it for then.
    let taker = hostgw("10.230.1.0-24", "192.168.230.9");
    assert_eq!(a.put(taker.clone()), Outcome::default());
    let out = a.set_own(&hostgw("10.230.2.0-24", "192.168.230.1"));
    assert_eq!(out.changes, vec![PeerChange::Add(taker.clone())]);
    assert_eq!(a.admitted_count(), 1);
    // Gone before we moved: nothing to add.
    let mut a = with_own(
        "host-gw",
        no_claims(),
        hostgw("10.230.1.0-24", "192.168.230.1"),
    );
    a.put(taker.clone());
    a.remove(&taker.key);
    assert_eq!(
        a.set_own(&hostgw("10.230.2.0-24", "192.168.230.1")),
        Outcome::default()
    );
    // Our own value seen on our key is not a taker.
    let mut a = with_own(
        "host-gw",
        no_claims(),
        hostgw("10.230.1.0-24", "192.168.230.1"),
    );
    a.put(hostgw("10.230.1.0-24", "192.168.230.1"));
    assert_eq!(
        a.set_own(&hostgw("10.230.2.0-24", "192.168.230.1")),
        Outcome::default()
    );
}

#[test]
fn a_holder_letting_go_of_a_claim_lets_the_refused_in() {
    let mut a = with_own(
        "vxlan",
        mac_claims(),
        vxlan("10.230.1.0-24", "192.168.230.1", "0e:00:00:00:00:01"),
    );
    let holder = vxlan("10.230.2.0-24", "192.168.230.2", "0e:00:00:00:00:02");
    let second = vxlan("10.230.3.0-24", "192.168.230.3", "0e:00:00:00:00:02");
    a.put(holder);
    assert!(matches!(
        refusal(&a.put(second.clone())),
        Refusal::Claimed { .. }
    ));
    let moved = vxlan("10.230.2.0-24", "192.168.230.2", "0e:00:00:00:00:22");
    let out = a.put(moved.clone());
    assert_eq!(
        out.changes,
        vec![PeerChange::Add(moved), PeerChange::Add(second)]
    );
    assert_eq!(a.refused_count(), 0);
}
