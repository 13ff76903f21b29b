//! Which peers' leases may reach a backend: the one check every lease from etcd passes before
//! anything is programmed for it.
//!
//! A lease value is written by any node or operator, so it is input, never truth. A lease is
//! admitted only if its subnet is a `SubnetLen` (`IPv6SubnetLen`) subnet inside `Network`
//! (`IPv6Network`), it overlaps neither our lease nor an admitted one, its public address is a
//! usable unicast address outside the pod network and not ours, and nothing it claims that must
//! be unique (a VXLAN VtepMAC, a WireGuard PublicKey) is already held by us or an admitted lease.
//! The first holder keeps what it holds: a newcomer is refused, and when the holder leaves, the
//! refused leases are looked at again. Pure: no I/O, no clock.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::config::NetworkConfig;
use crate::lease::{Lease, SubnetKey};

/// What a backend says a lease claims for itself alone (e.g. `VtepMAC aa:bb:..`). Two admitted
/// leases never share a claim.
pub type Claims = Box<dyn Fn(&Lease) -> Vec<String> + Send + Sync>;

/// Why a lease was kept away from the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Written by a node running another backend: Flannel ignores those too (not hostile).
    OtherBackend(String),
    /// The subnet is not one the network config hands out.
    Subnet(String),
    /// The subnet overlaps our own lease.
    OverlapsOurs(SubnetKey),
    /// The subnet overlaps a lease admitted earlier.
    Overlaps(SubnetKey),
    /// PublicIP / PublicIPv6 is not an address a peer can have.
    PublicIp(String),
    /// Something unique (MAC, key) already held by `holder` (`None`: by us).
    Claimed {
        claim: String,
        holder: Option<SubnetKey>,
    },
}

impl Refusal {
    /// A short fixed label per kind, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::OtherBackend(_) => "other_backend",
            Refusal::Subnet(_) => "subnet",
            Refusal::OverlapsOurs(_) => "overlaps_own",
            Refusal::Overlaps(_) => "overlaps_peer",
            Refusal::PublicIp(_) => "public_ip",
            Refusal::Claimed { .. } => "duplicate_claim",
        }
    }

    /// Every label `kind` returns, so metrics list them all from the start.
    pub const KINDS: [&'static str; 6] = [
        "other_backend",
        "subnet",
        "overlaps_own",
        "overlaps_peer",
        "public_ip",
        "duplicate_claim",
    ];

    /// Whether this is Flannel's ordinary "not my backend" rather than a bad lease.
    pub fn is_benign(&self) -> bool {
        matches!(self, Refusal::OtherBackend(_))
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::OtherBackend(t) => {
                write!(f, "its BackendType is {}, not ours", crate::quote(t))
            }
            Refusal::Subnet(why) => f.write_str(why),
            Refusal::OverlapsOurs(k) => write!(f, "its subnet overlaps our own lease {k}"),
            Refusal::Overlaps(k) => write!(f, "its subnet overlaps the lease {k}, admitted first"),
            Refusal::PublicIp(why) => f.write_str(why),
            Refusal::Claimed {
                claim,
                holder: Some(k),
            } => write!(
                f,
                "{} is already held by the lease {k}",
                crate::quote(claim)
            ),
            Refusal::Claimed {
                claim,
                holder: None,
            } => write!(f, "{} is ours", crate::quote(claim)),
        }
    }
}

/// A change for the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerChange {
    /// Program this peer (new, or its value changed).
    Add(Lease),
    /// Remove what was programmed for this peer.
    Remove(Lease),
}

/// What one event did: changes for the backend, and the refusals to log and count (each
/// reported once, not again while the same value stays refused for the same reason).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub changes: Vec<PeerChange>,
    pub refused: Vec<(SubnetKey, Refusal)>,
}

pub struct Admission {
    config: NetworkConfig,
    backend_type: String,
    claims: Claims,
    own: Option<Lease>,
    own_claims: Vec<String>,
    admitted: BTreeMap<SubnetKey, Lease>,
    by_v4: HashMap<Ipv4Net, SubnetKey>,
    by_v6: HashMap<Ipv6Net, SubnetKey>,
    claimed: HashMap<String, SubnetKey>,
    /// Refused leases, looked at again when an admitted lease leaves or ours changes.
    refused: BTreeMap<SubnetKey, (Lease, Refusal)>,
    /// Another node's value on our own key (it took the subnet): a peer once we move away.
    at_own_key: Option<Lease>,
}

impl Admission {
    /// `backend_type` is the backend's `Backend.Type` (a lease without one is `udp`).
    pub fn new(config: &NetworkConfig, backend_type: &str, claims: Claims) -> Self {
        Admission {
            config: config.clone(),
            backend_type: backend_type.to_string(),
            claims,
            own: None,
            own_claims: Vec::new(),
            admitted: BTreeMap::new(),
            by_v4: HashMap::new(),
            by_v6: HashMap::new(),
            claimed: HashMap::new(),
            refused: BTreeMap::new(),
            at_own_key: None,
        }
    }

    /// The admitted peers, in key order.
    pub fn admitted(&self) -> impl Iterator<Item = &Lease> {
        self.admitted.values()
    }

    pub fn admitted_count(&self) -> usize {
        self.admitted.len()
    }

    /// Leases currently kept away for a reason other than another backend.
    pub fn refused_count(&self) -> usize {
        self.refused
            .values()
            .filter(|(_, r)| !r.is_benign())
            .count()
    }

    /// Sets (or changes) our own lease: peers that now conflict with it leave the backend. When
    /// we move to another subnet, whoever took our old key becomes a peer like any other.
    pub fn set_own(&mut self, own: &Lease) -> Outcome {
        self.own_claims = (self.claims)(own);
        let moved = self.own.as_ref().is_some_and(|o| o.key != own.key);
        self.own = Some(own.clone());
        let mut out = Outcome::default();
        let keys: Vec<SubnetKey> = self.admitted.keys().cloned().collect();
        for key in keys {
            let Some(lease) = self.unadmit(&key) else {
                continue;
            };
            if key == own.key {
                out.changes.push(PeerChange::Remove(lease));
                continue;
            }
            match self.check(&lease) {
                Ok(()) => self.admit(lease),
                Err(why) => {
                    out.changes.push(PeerChange::Remove(lease.clone()));
                    out.refused.push((key.clone(), why.clone()));
                    self.refused.insert(key, (lease, why));
                }
            }
        }
        self.refused.remove(&own.key);
        self.retry_refused(&mut out);
        if moved {
            if let Some(taker) = self.at_own_key.take() {
                let more = self.put(taker);
                out.changes.extend(more.changes);
                out.refused.extend(more.refused);
            }
        }
        out
    }

    /// A lease appeared or changed. Our own key is not a peer: the caller decides what a value
    /// on it means, and here another node's is kept for when we move away (its renewals change
    /// nothing in etcd, so no later event would bring it).
    pub fn put(&mut self, lease: Lease) -> Outcome {
        let mut out = Outcome::default();
        if let Some(own) = &self.own {
            if own.key == lease.key {
                self.at_own_key = (own.attrs != lease.attrs).then_some(lease);
                return out;
            }
        }
        let key = lease.key.clone();
        let before = self.unadmit(&key);
        let refused_before = self.refused.remove(&key);
        match self.check(&lease) {
            Ok(()) => {
                let changed = before.as_ref() != Some(&lease);
                if changed {
                    out.changes.push(PeerChange::Add(lease.clone()));
                }
                self.admit(lease);
                if changed && before.is_some() {
                    // It may have let go of a claim (a new VtepMAC) that kept another out.
                    self.retry_refused(&mut out);
                }
            }
            Err(why) => {
                let repeat = refused_before
                    .as_ref()
                    .is_some_and(|(l, r)| *l == lease && *r == why);
                if !repeat {
                    out.refused.push((key.clone(), why.clone()));
                }
                self.refused.insert(key, (lease, why));
                if let Some(old) = before {
                    out.changes.push(PeerChange::Remove(old));
                    self.retry_refused(&mut out);
                }
            }
        }
        out
    }

    /// A lease was deleted or expired.
    pub fn remove(&mut self, key: &SubnetKey) -> Outcome {
        let mut out = Outcome::default();
        if self.at_own_key.as_ref().is_some_and(|l| l.key == *key) {
            self.at_own_key = None;
        }
        self.refused.remove(key);
        if let Some(old) = self.unadmit(key) {
            out.changes.push(PeerChange::Remove(old));
            self.retry_refused(&mut out);
        }
        out
    }

    /// Admits refused leases whose conflict has gone (the holder left or changed).
    fn retry_refused(&mut self, out: &mut Outcome) {
        let keys: Vec<SubnetKey> = self.refused.keys().cloned().collect();
        for key in keys {
            let Some((lease, _)) = self.refused.get(&key) else {
                continue;
            };
            let lease = lease.clone();
            match self.check(&lease) {
                Ok(()) => {
                    self.refused.remove(&key);
                    out.changes.push(PeerChange::Add(lease.clone()));
                    self.admit(lease);
                }
                Err(why) => {
                    if let Some(entry) = self.refused.get_mut(&key) {
                        entry.1 = why;
                    }
                }
            }
        }
    }

    fn admit(&mut self, lease: Lease) {
        if let Some(n) = lease.key.ipv4 {
            self.by_v4.insert(n, lease.key.clone());
        }
        if let Some(n) = lease.key.ipv6 {
            self.by_v6.insert(n, lease.key.clone());
        }
        for c in (self.claims)(&lease) {
            self.claimed.insert(c, lease.key.clone());
        }
        self.admitted.insert(lease.key.clone(), lease);
    }

    fn unadmit(&mut self, key: &SubnetKey) -> Option<Lease> {
        let lease = self.admitted.remove(key)?;
        if let Some(n) = key.ipv4 {
            self.by_v4.remove(&n);
        }
        if let Some(n) = key.ipv6 {
            self.by_v6.remove(&n);
        }
        for c in (self.claims)(&lease) {
            if self.claimed.get(&c) == Some(key) {
                self.claimed.remove(&c);
            }
        }
        Some(lease)
    }

    /// Every rule, against our lease and the admitted ones (never including `lease` itself).
    fn check(&self, lease: &Lease) -> Result<(), Refusal> {
        let theirs = lease.attrs.backend_type.as_deref().unwrap_or("udp");
        if theirs != self.backend_type {
            return Err(Refusal::OtherBackend(theirs.to_string()));
        }
        check_subnet(&self.config, &lease.key).map_err(Refusal::Subnet)?;
        self.check_public_ips(lease).map_err(Refusal::PublicIp)?;
        if let Some(own) = &self.own {
            if overlaps(&own.key, &lease.key) {
                return Err(Refusal::OverlapsOurs(own.key.clone()));
            }
        }
        // Admitted subnets all have the configured length, so overlapping means equal.
        let holder = lease
            .key
            .ipv4
            .and_then(|n| self.by_v4.get(&n))
            .or_else(|| lease.key.ipv6.and_then(|n| self.by_v6.get(&n)));
        if let Some(h) = holder.filter(|h| **h != lease.key) {
            return Err(Refusal::Overlaps(h.clone()));
        }
        for claim in (self.claims)(lease) {
            if self.own_claims.contains(&claim) {
                return Err(Refusal::Claimed {
                    claim,
                    holder: None,
                });
            }
            if let Some(h) = self.claimed.get(&claim).filter(|h| **h != lease.key) {
                return Err(Refusal::Claimed {
                    claim,
                    holder: Some(h.clone()),
                });
            }
        }
        Ok(())
    }

    fn check_public_ips(&self, lease: &Lease) -> Result<(), String> {
        let own = self.own.as_ref().map(|o| &o.attrs);
        if lease.key.ipv4.is_some() {
            let ip = lease.attrs.public_ip;
            usable_v4(ip).map_err(|why| format!("PublicIP {ip} {why}"))?;
            if self.config.network.is_some_and(|n| n.contains(&ip)) {
                return Err(format!("PublicIP {ip} lies inside the pod Network"));
            }
            if own.is_some_and(|o| o.public_ip == ip) {
                return Err(format!("PublicIP {ip} is ours"));
            }
        }
        match lease.attrs.public_ipv6 {
            Some(ip) => {
                usable_v6(ip).map_err(|why| format!("PublicIPv6 {ip} {why}"))?;
                if self.config.ipv6_network.is_some_and(|n| n.contains(&ip)) {
                    return Err(format!("PublicIPv6 {ip} lies inside the pod IPv6Network"));
                }
                if own.is_some_and(|o| o.public_ipv6 == Some(ip)) {
                    return Err(format!("PublicIPv6 {ip} is ours"));
                }
            }
            None if lease.key.ipv4.is_none() => {
                return Err("an IPv6-only lease without PublicIPv6".into());
            }
            None => {}
        }
        Ok(())
    }
}

/// Whether a subnet is one the config hands out: for each part present, the family is enabled,
/// the length is the configured one and it lies inside the network. (SubnetMin/SubnetMax are
/// not applied to peers: Flannel checks them only for its own lease, and an operator narrowing
/// them must not cut existing nodes off.)
pub fn check_subnet(config: &NetworkConfig, key: &SubnetKey) -> Result<(), String> {
    match (key.ipv4, config.network) {
        (Some(n), Some(net)) => {
            if n.prefix_len() != config.subnet_len {
                return Err(format!(
                    "subnet {n} is a /{}, the config's SubnetLen is {}",
                    n.prefix_len(),
                    config.subnet_len
                ));
            }
            if !net.contains(&n) {
                return Err(format!("subnet {n} is outside the Network {net}"));
            }
        }
        (Some(n), None) => return Err(format!("subnet {n}: IPv4 is not enabled in the config")),
        (None, Some(_)) if config.enable_ipv4 => {
            return Err("no IPv4 subnet, and the config enables IPv4".into())
        }
        (None, _) => {}
    }
    match (key.ipv6, config.ipv6_network) {
        (Some(n), Some(net)) => {
            if n.prefix_len() != config.ipv6_subnet_len {
                return Err(format!(
                    "IPv6 subnet {n} is a /{}, the config's IPv6SubnetLen is {}",
                    n.prefix_len(),
                    config.ipv6_subnet_len
                ));
            }
            if !net.contains(&n) {
                return Err(format!("IPv6 subnet {n} is outside the IPv6Network {net}"));
            }
        }
        (Some(n), None) => {
            return Err(format!(
                "IPv6 subnet {n}: IPv6 is not enabled in the config"
            ))
        }
        (None, _) => {}
    }
    Ok(())
}

fn overlaps(a: &SubnetKey, b: &SubnetKey) -> bool {
    let v4 = match (a.ipv4, b.ipv4) {
        (Some(x), Some(y)) => x.contains(&y) || y.contains(&x),
        _ => false,
    };
    let v6 = match (a.ipv6, b.ipv6) {
        (Some(x), Some(y)) => x.contains(&y) || y.contains(&x),
        _ => false,
    };
    v4 || v6
}

fn usable_v4(ip: Ipv4Addr) -> Result<(), &'static str> {
    if ip.is_unspecified() {
        Err("is missing or unspecified")
    } else if ip.is_loopback() {
        Err("is a loopback address")
    } else if ip.is_multicast() {
        Err("is a multicast address")
    } else if ip.is_broadcast() || ip.octets()[0] >= 240 {
        Err("is a reserved or broadcast address")
    } else if ip.octets()[0] == 0 {
        Err("is in 0.0.0.0/8 (\"this network\")")
    } else {
        Ok(())
    }
}

fn usable_v6(ip: Ipv6Addr) -> Result<(), &'static str> {
    if ip.is_unspecified() {
        Err("is unspecified")
    } else if ip.is_loopback() {
        Err("is the loopback address")
    } else if ip.is_multicast() {
        Err("is a multicast address")
    } else if ip.to_ipv4_mapped().is_some() {
        Err("is an IPv4-mapped address")
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
