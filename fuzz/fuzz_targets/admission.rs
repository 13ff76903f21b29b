//! Lease events from etcd, written by anyone, through the admission check: never a panic, and
//! the admitted set never holds two leases that overlap or share a claim.
#![no_main]
use libfuzzer_sys::fuzz_target;
use subnet_manager::admission::Admission;
use subnet_manager::config::NetworkConfig;
use subnet_manager::lease::Lease;

const CONFIG: &[u8] = br#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","Backend":{"Type":"vxlan"}}"#;

fuzz_target!(|data: &[u8]| {
    let Ok(config) = NetworkConfig::parse(CONFIG) else {
        return;
    };
    let claims = |l: &Lease| -> Vec<String> {
        l.attrs
            .backend_data
            .as_ref()
            .and_then(|d| d.get("VtepMAC"))
            .and_then(|m| m.as_str())
            .map(|m| vec![m.to_ascii_lowercase()])
            .unwrap_or_default()
    };
    let mut a = Admission::new(&config, "vxlan", Box::new(claims));
    // One event a line: `+<key> <json>` puts, `-<key>` deletes, `=<key> <json>` sets our own.
    for line in data.split(|b| *b == b'\n') {
        let text = String::from_utf8_lossy(line);
        let mut chars = text.chars();
        let op = chars.next();
        let rest = chars.as_str();
        let (key, value) = rest.split_once(' ').unwrap_or((rest, ""));
        let full = format!("/p/subnets/{key}");
        let lease = Lease::parse("/p", &full, value.as_bytes()).and_then(Result::ok);
        match (op, lease) {
            (Some('+'), Some(l)) => drop(a.put(l)),
            (Some('='), Some(l)) => drop(a.set_own(&l)),
            (Some('-'), _) => {
                if let Some(Ok(k)) = subnet_manager::lease::SubnetKey::from_key("/p", &full) {
                    drop(a.remove(&k));
                }
            }
            _ => {}
        }
        let admitted: Vec<&Lease> = a.admitted().collect();
        for (i, x) in admitted.iter().enumerate() {
            for y in &admitted[i + 1..] {
                assert!(x.key.ipv4.is_none() || x.key.ipv4 != y.key.ipv4, "{x:?} {y:?}");
                assert!(x.key.ipv6.is_none() || x.key.ipv6 != y.key.ipv6, "{x:?} {y:?}");
                let (cx, cy) = (claims(x), claims(y));
                assert!(cx.iter().all(|c| !cy.contains(c)), "{x:?} {y:?}");
            }
        }
    }
});
