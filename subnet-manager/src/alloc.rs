//! Choosing our subnet: the contract's acquire order as a pure planner.
//!
//! [`plan`] looks at one listing of the leases and says what to write; the caller does the
//! writing (deletes first, then a re-put for [`Action::Reuse`], or a create-only-if-absent
//! transaction for [`Action::Reclaim`] and [`Action::Create`]) and, when a create loses a race,
//! lists again and plans again. Keeping the decision pure makes every rule testable without etcd.
//!
//! A subnet is taken when it *overlaps* any live lease, not only when it equals one: a lease
//! left by an older config with another prefix length still owns its addresses, and handing
//! them out again would give two nodes the same pods' addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use rand::Rng;
use thiserror::Error;

use crate::config::{NetworkConfig, SubnetRange};
use crate::lease::{Lease, SubnetKey};

/// How many free subnets, counting up from SubnetMin, the random pick chooses among (Flannel's
/// number: it keeps new nodes near the bottom of the range while making races unlikely).
pub const RANDOM_POOL: usize = 100;

/// Which leases are ours: the addresses we publish in `PublicIP` / `PublicIPv6`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub public_ip: Ipv4Addr,
    pub public_ipv6: Option<Ipv6Addr>,
}

/// What to write to hold a subnet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Our own leases (by public address) that no longer fit the config: delete them first so
    /// peers stop routing to a subnet we will not use.
    pub delete: Vec<SubnetKey>,
    pub action: Action,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Our own lease that fits: re-put it with our attributes under a fresh grant.
    Reuse(SubnetKey),
    /// The subnet recorded in subnet.env, free and fitting: create it (only if absent).
    Reclaim(SubnetKey),
    /// A random pick among the first free subnets: create it (only if absent).
    Create(SubnetKey),
}

impl Action {
    /// The subnet this action ends up holding.
    pub fn key(&self) -> &SubnetKey {
        match self {
            Action::Reuse(k) | Action::Reclaim(k) | Action::Create(k) => k,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum AllocError {
    /// Every subnet in [min, max] of one family overlaps a lease.
    #[error(
        "{family} subnet pool is full: all {count} /{len} subnets from {first} to {last} are taken"
    )]
    PoolFull {
        family: &'static str,
        count: u128,
        len: u8,
        first: IpAddr,
        last: IpAddr,
    },
    /// The config was built by hand without the fields [`NetworkConfig::parse`] fills in.
    #[error("network config cannot be allocated from: {0}")]
    Config(&'static str),
}

/// Whether a lease key suits the config: for each enabled family its part is present, has
/// the configured length and lies in [min, max]; a disabled family's part must be absent (an
/// IPv4-only config does not keep a dual-stack lease, as Flannel does not).
pub fn fits(config: &NetworkConfig, key: &SubnetKey) -> bool {
    let v4 = match (config.range4(), key.ipv4) {
        (None, None) => !config.enable_ipv4,
        (Some(r), Some(n)) => {
            n.prefix_len() == config.subnet_len
                && n.network() == n.addr()
                && in_range(r, u128::from(u32::from(n.addr())))
        }
        _ => false,
    };
    let v6 = match (config.range6(), key.ipv6) {
        (None, None) => !config.enable_ipv6,
        (Some(r), Some(n)) => {
            n.prefix_len() == config.ipv6_subnet_len
                && n.network() == n.addr()
                && in_range(r, u128::from(n.addr()))
        }
        _ => false,
    };
    v4 && v6
}

fn in_range(r: SubnetRange, addr: u128) -> bool {
    r.first <= addr && addr <= r.last
}

/// Decides which subnet to hold, in the contract's order: (1) our own fitting lease,
/// (2) `previous` (from subnet.env) if it fits and no lease overlaps it, (3) a random pick
/// among the first [`RANDOM_POOL`] free subnets of each family, chosen independently.
///
/// Our own non-fitting leases go into [`Plan::delete`] and count as free afterwards. Fitting
/// duplicates of our own lease beyond the first are left alone: they are not renewed and expire.
/// `unreadable` are subnets whose key exists with a value that does not parse: taken, since a
/// key that exists cannot be created, whatever its value.
pub fn plan(
    config: &NetworkConfig,
    existing: &[Lease],
    unreadable: &[SubnetKey],
    ours: &Identity,
    previous: Option<&SubnetKey>,
    rng: &mut impl Rng,
) -> Result<Plan, AllocError> {
    let range4 = family_range(config.enable_ipv4, config.range4(), "IPv4")?;
    let range6 = family_range(config.enable_ipv6, config.range6(), "IPv6")?;
    if range4.is_none() && range6.is_none() {
        return Err(AllocError::Config("neither IPv4 nor IPv6 is enabled"));
    }

    // (1) Our own leases.
    let mut delete = Vec::new();
    let mut reuse = None;
    for lease in existing.iter().filter(|l| is_ours(config, ours, l)) {
        if !fits(config, &lease.key) {
            delete.push(lease.key.clone());
        } else if reuse.is_none() {
            reuse = Some(lease.key.clone());
        }
    }
    if let Some(key) = reuse {
        return Ok(Plan {
            delete,
            action: Action::Reuse(key),
        });
    }

    let live: Vec<&SubnetKey> = existing
        .iter()
        .map(|l| &l.key)
        .filter(|k| !delete.contains(k))
        .chain(unreadable)
        .collect();
    let taken4 = Taken::new(live.iter().filter_map(|k| k.ipv4).map(|n| {
        (
            u128::from(u32::from(n.network())),
            u128::from(u32::from(n.broadcast())),
        )
    }));
    let taken6 = Taken::new(
        live.iter()
            .filter_map(|k| k.ipv6)
            .map(|n| (u128::from(n.network()), u128::from(n.broadcast()))),
    );

    // (2) The subnet from subnet.env.
    if let Some(prev) = previous.filter(|p| fits(config, p)) {
        let free4 = prev.ipv4.is_none_or(|n| {
            let (a, b) = (u32::from(n.network()), u32::from(n.broadcast()));
            taken4.overlap(a.into(), b.into()).is_none()
        });
        let free6 = prev.ipv6.is_none_or(|n| {
            let (a, b) = (u128::from(n.network()), u128::from(n.broadcast()));
            taken6.overlap(a, b).is_none()
        });
        if free4 && free6 {
            return Ok(Plan {
                delete,
                action: Action::Reclaim(prev.clone()),
            });
        }
    }

    // (3) Random picks, each family from its own pool.
    let free4 = range4.map(|r| (r, first_free(r, &taken4)));
    let free6 = range6.map(|r| (r, first_free(r, &taken6)));
    if let Some((r, _)) = free4.as_ref().filter(|(_, f)| f.is_empty()) {
        return Err(pool_full("IPv4", config.subnet_len, *r, |a| {
            IpAddr::V4(v4_addr(a))
        }));
    }
    if let Some((r, _)) = free6.as_ref().filter(|(_, f)| f.is_empty()) {
        return Err(pool_full("IPv6", config.ipv6_subnet_len, *r, |a| {
            IpAddr::V6(Ipv6Addr::from(a))
        }));
    }
    // Both pools are non-empty here.
    let mut choose = |free: &[u128]| free.get(rng.random_range(0..free.len())).copied();
    let ipv4 = free4
        .and_then(|(_, f)| choose(&f))
        .and_then(|a| Ipv4Net::new(v4_addr(a), config.subnet_len).ok());
    let ipv6 = free6
        .and_then(|(_, f)| choose(&f))
        .and_then(|a| Ipv6Net::new(Ipv6Addr::from(a), config.ipv6_subnet_len).ok());
    Ok(Plan {
        delete,
        action: Action::Create(SubnetKey { ipv4, ipv6 }),
    })
}

fn family_range(
    enabled: bool,
    range: Option<SubnetRange>,
    family: &'static str,
) -> Result<Option<SubnetRange>, AllocError> {
    match (enabled, range) {
        (false, _) => Ok(None),
        (true, Some(r)) => Ok(Some(r)),
        (true, None) if family == "IPv4" => Err(AllocError::Config(
            "IPv4 is enabled but SubnetMin/SubnetMax/SubnetLen are not set",
        )),
        (true, None) => Err(AllocError::Config(
            "IPv6 is enabled but IPv6SubnetMin/IPv6SubnetMax/IPv6SubnetLen are not set",
        )),
    }
}

/// A lease is ours when it carries our public address: IPv4 normally, IPv6 on an IPv6-only
/// network (where the IPv4 address is meaningless). An unspecified address matches nothing, so
/// leases written without a `PublicIP` are never taken over.
fn is_ours(config: &NetworkConfig, ours: &Identity, lease: &Lease) -> bool {
    if config.enable_ipv4 {
        !ours.public_ip.is_unspecified() && lease.attrs.public_ip == ours.public_ip
    } else {
        ours.public_ipv6.is_some() && lease.attrs.public_ipv6 == ours.public_ipv6
    }
}

fn v4_addr(a: u128) -> Ipv4Addr {
    Ipv4Addr::from(u32::try_from(a).unwrap_or(u32::MAX))
}

fn pool_full(
    family: &'static str,
    len: u8,
    r: SubnetRange,
    show: impl Fn(u128) -> IpAddr,
) -> AllocError {
    AllocError::PoolFull {
        family,
        count: r.count(),
        len,
        first: show(r.first),
        last: show(r.last),
    }
}

/// The address intervals held by leases, merged into sorted disjoint inclusive ranges so one
/// binary search answers "does this subnet overlap any lease".
struct Taken(Vec<(u128, u128)>);

impl Taken {
    fn new(intervals: impl Iterator<Item = (u128, u128)>) -> Self {
        let mut all: Vec<_> = intervals.collect();
        all.sort_unstable();
        let mut merged: Vec<(u128, u128)> = Vec::with_capacity(all.len());
        for (start, end) in all {
            match merged.last_mut() {
                Some(last) if start <= last.1.saturating_add(1) => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        Taken(merged)
    }

    /// The end of the taken interval overlapping [start, end], if any.
    fn overlap(&self, start: u128, end: u128) -> Option<u128> {
        let after = self.0.partition_point(|&(s, _)| s <= end);
        let (_, e) = *self.0.get(after.checked_sub(1)?)?;
        (e >= start).then_some(e)
    }
}

/// The first [`RANDOM_POOL`] free subnets of `range`, counting up. Taken intervals are jumped
/// over whole, so the cost depends on the number of leases, never on the size of the range.
fn first_free(range: SubnetRange, taken: &Taken) -> Vec<u128> {
    let mut free = Vec::new();
    let mut next = Some(range.first);
    while let Some(a) = next {
        if a > range.last || free.len() >= RANDOM_POOL {
            break;
        }
        let end = a.saturating_add(range.size - 1);
        next = match taken.overlap(a, end) {
            None => {
                free.push(a);
                a.checked_add(range.size)
            }
            // The first subnet boundary after the interval.
            Some(e) => e.checked_add(1).and_then(|n| {
                (n - range.first)
                    .div_ceil(range.size)
                    .checked_mul(range.size)?
                    .checked_add(range.first)
            }),
        };
    }
    free
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseAttrs;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::collections::BTreeSet;

    const ME: Identity = Identity {
        public_ip: Ipv4Addr::new(192, 168, 1, 10),
        public_ipv6: None,
    };

    fn config(json: &str) -> NetworkConfig {
        NetworkConfig::parse(json.as_bytes()).unwrap()
    }

    fn cfg16() -> NetworkConfig {
        config(r#"{"Network":"10.244.0.0/16"}"#)
    }

    fn key(s: &str) -> SubnetKey {
        SubnetKey::parse(s).unwrap()
    }

    fn lease(k: &str, ip: &str) -> Lease {
        Lease {
            key: key(k),
            attrs: LeaseAttrs {
                public_ip: ip.parse().unwrap(),
                public_ipv6: None,
                backend_type: None,
                backend_data: None,
                backend_v6_data: None,
            },
        }
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    fn run(
        cfg: &NetworkConfig,
        existing: &[Lease],
        previous: Option<&str>,
    ) -> Result<Plan, AllocError> {
        let prev = previous.map(key);
        plan(cfg, existing, &[], &ME, prev.as_ref(), &mut rng())
    }

    #[test]
    fn unreadable_leases_are_taken() {
        let c = cfg16();
        // Every subnet's key exists with a value that does not parse: the pool is full, not
        // a reason to create over them in a loop.
        let all: Vec<SubnetKey> = (1..=255)
            .map(|i| key(&format!("10.244.{i}.0-24")))
            .collect();
        let err = plan(&c, &[], &all, &ME, None, &mut rng()).unwrap_err();
        assert!(
            matches!(err, AllocError::PoolFull { count: 255, .. }),
            "{err}"
        );
        // One free subnet left: it is the one picked, and subnet.env's taken one is skipped.
        let p = plan(&c, &[], &all[1..], &ME, Some(&all[2]), &mut rng()).unwrap();
        assert_eq!(p.action, Action::Create(all[0].clone()));
    }

    #[test]
    fn fits_checks_range_length_and_families() {
        let c = cfg16();
        assert!(fits(&c, &key("10.244.1.0-24")));
        assert!(fits(&c, &key("10.244.255.0-24")));
        assert!(
            !fits(&c, &key("10.244.0.0-24")),
            "first subnet is never handed out"
        );
        assert!(!fits(&c, &key("10.245.0.0-24")));
        assert!(!fits(&c, &key("10.244.1.0-25")));
        assert!(
            !fits(&c, &key("10.244.1.0-24&fc00::-64")),
            "IPv4-only config"
        );
        let dual =
            config(r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48"}"#);
        assert!(fits(&dual, &key("10.244.1.0-24&fc00:0:0:1::-64")));
        assert!(!fits(&dual, &key("10.244.1.0-24")));
        assert!(!fits(&dual, &key("10.244.1.0-24&fc00::-64")));
        assert!(!fits(&dual, &key("0.0.0.0-0&fc00:0:0:1::-64")));
    }

    #[test]
    fn own_fitting_lease_is_reused() {
        let existing = [
            lease("10.244.1.0-24", "192.168.1.11"),
            lease("10.244.7.0-24", "192.168.1.10"),
        ];
        let p = run(&cfg16(), &existing, Some("10.244.9.0-24")).unwrap();
        assert_eq!(p.action, Action::Reuse(key("10.244.7.0-24")));
        assert!(p.delete.is_empty());
    }

    #[test]
    fn own_non_fitting_leases_are_deleted_and_first_fitting_kept() {
        let existing = [
            lease("10.1.0.0-24", "192.168.1.10"),
            lease("10.244.7.0-24", "192.168.1.10"),
            lease("10.244.8.0-24", "192.168.1.10"),
            lease("10.244.0.0-20", "192.168.1.10"),
        ];
        let p = run(&cfg16(), &existing, None).unwrap();
        assert_eq!(p.action, Action::Reuse(key("10.244.7.0-24")));
        assert_eq!(p.delete, vec![key("10.1.0.0-24"), key("10.244.0.0-20")]);
    }

    #[test]
    fn own_non_fitting_lease_is_deleted_then_previous_used() {
        let existing = [lease("10.1.0.0-24", "192.168.1.10")];
        let p = run(&cfg16(), &existing, Some("10.244.9.0-24")).unwrap();
        assert_eq!(p.delete, vec![key("10.1.0.0-24")]);
        assert_eq!(p.action, Action::Reclaim(key("10.244.9.0-24")));
    }

    #[test]
    fn deleted_own_lease_no_longer_blocks_its_subnet() {
        // Our old lease has the wrong length but covers subnet.env's subnet.
        let existing = [lease("10.244.8.0-23", "192.168.1.10")];
        let p = run(&cfg16(), &existing, Some("10.244.9.0-24")).unwrap();
        assert_eq!(p.delete, vec![key("10.244.8.0-23")]);
        assert_eq!(p.action, Action::Reclaim(key("10.244.9.0-24")));
    }

    #[test]
    fn previous_subnet_is_reclaimed_when_free() {
        let existing = [lease("10.244.1.0-24", "192.168.1.11")];
        let p = run(&cfg16(), &existing, Some("10.244.9.0-24")).unwrap();
        assert_eq!(p.action, Action::Reclaim(key("10.244.9.0-24")));
    }

    #[test]
    fn previous_subnet_taken_by_another_node_falls_back_to_random() {
        let existing = [lease("10.244.9.0-24", "192.168.1.11")];
        let p = run(&cfg16(), &existing, Some("10.244.9.0-24")).unwrap();
        let Action::Create(k) = p.action else {
            panic!("expected a random pick, got {:?}", p.action)
        };
        assert_ne!(k, key("10.244.9.0-24"));
        assert!(fits(&cfg16(), &k));
    }

    #[test]
    fn previous_subnet_overlapped_by_an_old_lease_is_not_reclaimed() {
        let existing = [lease("10.244.8.0-22", "192.168.1.11")];
        let p = run(&cfg16(), &existing, Some("10.244.9.0-24")).unwrap();
        assert!(matches!(p.action, Action::Create(_)), "{p:?}");
    }

    #[test]
    fn previous_subnet_not_fitting_is_ignored() {
        for prev in ["10.245.9.0-24", "10.244.9.0-25", "10.244.0.0-24"] {
            let p = run(&cfg16(), &[], Some(prev)).unwrap();
            assert!(matches!(p.action, Action::Create(_)), "{prev}: {p:?}");
        }
    }

    #[test]
    fn random_pick_only_from_the_first_100_free() {
        let c = cfg16();
        let existing: Vec<Lease> = (1..=50)
            .map(|i| lease(&format!("10.244.{i}.0-24"), "192.168.2.1"))
            .collect();
        let mut rng = rng();
        let mut seen = BTreeSet::new();
        for _ in 0..3000 {
            let p = plan(&c, &existing, &[], &ME, None, &mut rng).unwrap();
            let Action::Create(k) = p.action else {
                panic!("{p:?}")
            };
            let third = k.ipv4.unwrap().addr().octets()[2];
            seen.insert(third);
        }
        assert_eq!(seen, (51..=150).collect::<BTreeSet<u8>>());
    }

    #[test]
    fn random_pick_skips_leases_of_other_lengths() {
        // An old /20 lease covers 10.244.0.0 to 10.244.15.255; a /24 inside is taken too.
        let c = config(r#"{"Network":"10.244.0.0/16","SubnetMax":"10.244.16.0"}"#);
        let existing = [
            lease("10.244.0.0-20", "192.168.2.1"),
            lease("10.244.3.0-24", "192.168.2.2"),
        ];
        let p = run(&c, &existing, None).unwrap();
        assert_eq!(p.action, Action::Create(key("10.244.16.0-24")));
    }

    #[test]
    fn leases_outside_the_range_do_not_fill_the_pool() {
        let c = config(r#"{"Network":"10.0.0.0/26","SubnetLen":29}"#);
        let existing = [
            lease("10.0.0.0-29", "192.168.2.1"),
            lease("10.9.0.0-24", "192.168.2.2"),
        ];
        assert!(run(&c, &existing, None).is_ok());
    }

    #[test]
    fn slash_26_with_slash_29_holds_exactly_7() {
        let c = config(r#"{"Network":"10.0.0.0/26","SubnetLen":29}"#);
        let mut existing = Vec::new();
        let mut rng = rng();
        for i in 0..7 {
            let who = Identity {
                public_ip: Ipv4Addr::new(192, 168, 3, i + 1),
                public_ipv6: None,
            };
            let p = plan(&c, &existing, &[], &who, None, &mut rng).unwrap();
            let Action::Create(k) = p.action else {
                panic!("{p:?}")
            };
            assert!(fits(&c, &k));
            existing.push(Lease {
                key: k,
                attrs: LeaseAttrs {
                    public_ip: who.public_ip,
                    public_ipv6: None,
                    backend_type: None,
                    backend_data: None,
                    backend_v6_data: None,
                },
            });
        }
        let keys: BTreeSet<_> = existing.iter().map(|l| l.key.clone()).collect();
        assert_eq!(keys.len(), 7);
        let err = run(&c, &existing, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "IPv4 subnet pool is full: all 7 /29 subnets from 10.0.0.8 to 10.0.0.56 are taken"
        );
    }

    #[test]
    fn full_pool_error_names_the_range_and_count() {
        let c = cfg16();
        let existing: Vec<Lease> = (1..=255)
            .map(|i| lease(&format!("10.244.{i}.0-24"), "192.168.2.1"))
            .collect();
        let err = run(&c, &existing, Some("10.244.3.0-24")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "IPv4 subnet pool is full: all 255 /24 subnets from 10.244.1.0 to 10.244.255.0 are taken"
        );
    }

    #[test]
    fn full_pool_still_reuses_our_own_lease() {
        let c = cfg16();
        let mut existing: Vec<Lease> = (1..=254)
            .map(|i| lease(&format!("10.244.{i}.0-24"), "192.168.2.1"))
            .collect();
        existing.push(lease("10.244.255.0-24", "192.168.1.10"));
        let p = run(&c, &existing, None).unwrap();
        assert_eq!(p.action, Action::Reuse(key("10.244.255.0-24")));
    }

    fn dual() -> NetworkConfig {
        config(r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48"}"#)
    }

    #[test]
    fn dual_stack_random_pick_has_both_parts() {
        let existing = [lease("10.244.1.0-24&fc00:0:0:1::-64", "192.168.2.1")];
        let p = run(&dual(), &existing, None).unwrap();
        let Action::Create(k) = p.action else {
            panic!("{p:?}")
        };
        assert!(fits(&dual(), &k), "{k}");
        assert_ne!(k.ipv4, existing[0].key.ipv4);
        assert_ne!(k.ipv6, existing[0].key.ipv6);
    }

    #[test]
    fn dual_stack_previous_needs_both_parts_free() {
        let existing = [lease("10.244.1.0-24&fc00:0:0:5::-64", "192.168.2.1")];
        let p = run(&dual(), &existing, Some("10.244.2.0-24&fc00:0:0:2::-64")).unwrap();
        assert_eq!(
            p.action,
            Action::Reclaim(key("10.244.2.0-24&fc00:0:0:2::-64"))
        );
        let p = run(&dual(), &existing, Some("10.244.2.0-24&fc00:0:0:5::-64")).unwrap();
        assert!(matches!(p.action, Action::Create(_)), "{p:?}");
        // An IPv4-only subnet.env from before IPv6 was enabled does not fit.
        let p = run(&dual(), &existing, Some("10.244.2.0-24")).unwrap();
        assert!(matches!(p.action, Action::Create(_)), "{p:?}");
    }

    #[test]
    fn dual_stack_own_ipv4_only_lease_is_replaced() {
        let existing = [lease("10.244.4.0-24", "192.168.1.10")];
        let p = run(&dual(), &existing, None).unwrap();
        assert_eq!(p.delete, vec![key("10.244.4.0-24")]);
        assert!(matches!(p.action, Action::Create(_)));
    }

    #[test]
    fn ipv4_only_config_replaces_our_dual_stack_lease() {
        let existing = [lease("10.244.4.0-24&fc00:0:0:4::-64", "192.168.1.10")];
        let p = run(&cfg16(), &existing, None).unwrap();
        assert_eq!(p.delete, vec![key("10.244.4.0-24&fc00:0:0:4::-64")]);
        assert!(matches!(p.action, Action::Create(_)));
    }

    #[test]
    fn ipv6_only_matches_our_lease_by_public_ipv6() {
        let c = config(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48"}"#);
        let me = Identity {
            public_ip: Ipv4Addr::UNSPECIFIED,
            public_ipv6: Some("2001:db8::10".parse().unwrap()),
        };
        let mut mine = lease("0.0.0.0-0&fc00:0:0:7::-64", "0.0.0.0");
        mine.attrs.public_ipv6 = me.public_ipv6;
        let other = lease("0.0.0.0-0&fc00:0:0:8::-64", "0.0.0.0");
        let p = plan(&c, &[other.clone(), mine], &[], &me, None, &mut rng()).unwrap();
        assert_eq!(p.action, Action::Reuse(key("0.0.0.0-0&fc00:0:0:7::-64")));
        let p = plan(&c, &[other], &[], &me, None, &mut rng()).unwrap();
        let Action::Create(k) = p.action else {
            panic!("{p:?}")
        };
        assert_eq!(k.ipv4, None);
        assert!(fits(&c, &k));
    }

    #[test]
    fn unspecified_public_ip_claims_nothing() {
        let me = Identity {
            public_ip: Ipv4Addr::UNSPECIFIED,
            public_ipv6: None,
        };
        let existing = [lease("10.244.4.0-24", "0.0.0.0")];
        let p = plan(&cfg16(), &existing, &[], &me, None, &mut rng()).unwrap();
        assert!(matches!(p.action, Action::Create(_)));
    }

    #[test]
    fn huge_ipv6_range_with_many_leases_is_cheap() {
        let c = config(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/8","IPv6SubnetLen":126}"#,
        );
        let first = u128::from(c.ipv6_subnet_min.unwrap().addr());
        let existing: Vec<Lease> = (0..5000u128)
            .map(|i| {
                let a = Ipv6Addr::from(first + 4 * i);
                lease(&format!("0.0.0.0-0&{a}-126"), "0.0.0.0")
            })
            .collect();
        let p = run(&c, &existing, None).unwrap();
        let Action::Create(k) = p.action else {
            panic!("{p:?}")
        };
        let got = u128::from(k.ipv6.unwrap().addr());
        assert!(got >= first + 4 * 5000 && got < first + 4 * 5100, "{k}");
    }

    #[test]
    fn taken_intervals_merge_and_answer_overlaps() {
        let t = Taken::new([(10, 19), (0, 3), (15, 30), (31, 31), (40, 49)].into_iter());
        assert_eq!(t.0, vec![(0, 3), (10, 31), (40, 49)]);
        assert_eq!(t.overlap(4, 9), None);
        assert_eq!(t.overlap(4, 10), Some(31));
        assert_eq!(t.overlap(31, 35), Some(31));
        assert_eq!(t.overlap(32, 39), None);
        assert_eq!(t.overlap(50, 60), None);
    }

    #[test]
    fn incomplete_hand_built_config_is_an_error_not_a_panic() {
        let mut c = cfg16();
        c.subnet_min = None;
        assert!(matches!(run(&c, &[], None), Err(AllocError::Config(_))));
        c.enable_ipv4 = false;
        assert!(matches!(run(&c, &[], None), Err(AllocError::Config(_))));
    }
}
