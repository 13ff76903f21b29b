use super::*;

const ALL: Kinds = Kinds {
    masquerade: Some(FullyRandom(true)),
    forward: true,
};

fn config_with(json: &str, key: &str, kinds: Kinds) -> RuleConfig {
    let c = NetworkConfig::parse(json.as_bytes()).expect("config");
    RuleConfig::new(&c, &SubnetKey::parse(key).expect("key"), kinds)
}

fn config(json: &str, key: &str) -> RuleConfig {
    config_with(json, key, ALL)
}

#[test]
fn nft_script_has_flannels_rules_in_order() {
    let c = config(
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#,
        "10.244.3.0-24",
    );
    let s = c.nft_script();
    let want = [
        "add table ip flanneld-rs",
        "delete table ip flanneld-rs",
        "table ip flanneld-rs {",
        "type nat hook postrouting priority srcnat; policy accept;",
        "meta mark & 0x4000 == 0x4000 return",
        "ip saddr 10.244.3.0/24 ip daddr 10.244.0.0/16 return",
        "ip saddr 10.244.0.0/16 ip daddr 10.244.3.0/24 return",
        "ip saddr != 10.244.0.0/16 ip daddr 10.244.3.0/24 return",
        "ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random",
        "ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random",
        "type filter hook forward priority filter; policy accept;",
        "ip saddr 10.244.0.0/16 accept",
        "ip daddr 10.244.0.0/16 accept",
    ];
    let mut at = 0;
    for w in want {
        let found = s[at..]
            .find(w)
            .unwrap_or_else(|| panic!("{w:?} after {at}:\n{s}"));
        at += found + w.len();
    }
    assert!(!s.contains("ip6"), "{s}");
    assert_eq!(
        c.nft_remove_script(),
        "add table ip flanneld-rs\ndelete table ip flanneld-rs\n"
    );
}

#[test]
fn dual_stack_gets_an_ip6_table() {
    let c = config(
        r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","Backend":{"Type":"host-gw"}}"#,
        "10.244.3.0-24&fc00:0:0:3::-64",
    );
    let s = c.nft_script();
    assert!(s.contains("table ip6 flanneld-rs {"), "{s}");
    assert!(
        s.contains("ip6 saddr fc00::/48 ip6 daddr != ff00::/8 masquerade fully-random"),
        "{s}"
    );
    assert!(
        s.contains("ip6 saddr fc00:0:0:3::/64 ip6 daddr fc00::/48 return"),
        "{s}"
    );
}

#[test]
fn iptables_script_refills_only_our_chains() {
    let c = config(r#"{"Network":"10.244.0.0/16"}"#, "10.244.3.0-24");
    let s = RuleConfig::iptables_restore_script(&c.families[0], c.kinds);
    assert!(s.starts_with("*nat\n:FLANNELD-RS-POSTRTG - [0:0]\n"), "{s}");
    assert!(
        s.contains(
            "-A FLANNELD-RS-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE --random-fully"
        ),
        "{s}"
    );
    assert!(s.contains("*filter\n:FLANNELD-RS-FWD - [0:0]\n"), "{s}");
    assert_eq!(s.matches("COMMIT").count(), 2);
    // Nothing that touches a chain of someone else's.
    assert!(!s.contains("POSTROUTING") && !s.contains("FORWARD "), "{s}");
}

#[test]
fn fully_random_can_be_disabled() {
    let kinds = Kinds {
        masquerade: Some(FullyRandom(false)),
        forward: false,
    };
    let c = config_with(r#"{"Network":"10.244.0.0/16"}"#, "10.244.3.0-24", kinds);
    let nft = c.nft_script();
    assert!(!nft.contains("fully-random"), "{nft}");
    assert!(
        nft.contains("ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade\n"),
        "{nft}"
    );
    assert!(!nft.contains("chain forward"), "{nft}");
    let ipt = RuleConfig::iptables_restore_script(&c.families[0], c.kinds);
    assert!(
        !ipt.contains("--random-fully") && ipt.contains("-j MASQUERADE\n"),
        "{ipt}"
    );
    assert!(!ipt.contains("*filter"), "{ipt}");
}

#[test]
fn forward_rules_alone_without_masquerade() {
    let kinds = Kinds {
        masquerade: None,
        forward: true,
    };
    let c = config_with(r#"{"Network":"10.244.0.0/16"}"#, "10.244.3.0-24", kinds);
    let ipt = RuleConfig::iptables_restore_script(&c.families[0], c.kinds);
    assert_eq!(
        ipt,
        "*filter\n:FLANNELD-RS-FWD - [0:0]\n-A FLANNELD-RS-FWD -s 10.244.0.0/16 -j ACCEPT\n\
         -A FLANNELD-RS-FWD -d 10.244.0.0/16 -j ACCEPT\nCOMMIT\n"
    );
    let nft = c.nft_script();
    assert!(
        nft.contains("chain forward") && !nft.contains("postrtg"),
        "{nft}"
    );
}

#[test]
fn each_kind_goes_through_the_tool_where_it_works() {
    let masq = Kinds {
        masquerade: Some(FullyRandom(true)),
        forward: false,
    };
    let fwd = Kinds {
        masquerade: None,
        forward: true,
    };
    // Both tools: masquerading in our nft table, forward accepts in iptables' FORWARD.
    assert_eq!(
        plan(ALL, true, true).expect("plan"),
        vec![(Tool::Nft, masq), (Tool::Iptables, fwd)]
    );
    // One tool carries both, once.
    assert_eq!(
        plan(ALL, true, false).expect("plan"),
        vec![(Tool::Nft, ALL)]
    );
    assert_eq!(
        plan(ALL, false, true).expect("plan"),
        vec![(Tool::Iptables, ALL)]
    );
    assert_eq!(
        plan(fwd, true, true).expect("plan"),
        vec![(Tool::Iptables, fwd)]
    );
    assert!(plan(Kinds::default(), false, false)
        .expect("plan")
        .is_empty());
    // Forward accepts by default on a host without either tool: nothing to open, no error.
    assert!(plan(fwd, false, false).expect("plan").is_empty());
    assert!(plan(masq, false, false).is_err());
}
