//! One interface for every backend (Flannel's model): the daemon asks a backend what to publish
//! in its lease, hands it the lease it got, then feeds it other nodes' leases as they change.

mod host_gw;
mod pump;
mod repaired;
mod routes;
mod udp;
mod vxlan;
mod wireguard;

pub use repaired::Repaired;
#[cfg(feature = "testutil")]
pub use wireguard::cost as wireguard_cost;
/// The WireGuard receive path for `cargo fuzz` (never in normal builds).
#[cfg(fuzzing)]
pub use wireguard::fuzzing as wireguard_fuzzing;

use std::net::{Ipv4Addr, Ipv6Addr};

use async_trait::async_trait;
use subnet_manager::config::NetworkConfig;
use subnet_manager::lease::Lease;
use thiserror::Error;

use crate::netlink::{Link, NetlinkError, OwnRoute};

#[derive(Debug, Error)]
pub enum BackendError {
    #[error("backend type {0:?} is not supported (known: host-gw, udp, vxlan, wireguard)")]
    UnknownType(String),
    #[error("Backend config: {0}")]
    Config(String),
    /// Run-time I/O of a datapath failed: opening its TUN device, binding its sockets,
    /// starting its threads.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("peer {peer}: {reason}")]
    Peer { peer: String, reason: String },
}

/// The underlay this node talks on: chosen by `--iface`/`--public-ip`.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub iface: Link,
    pub public_ip: Ipv4Addr,
    pub public_ipv6: Option<Ipv6Addr>,
    /// The wireguard backend's private key file (`None`: Flannel's `/run/flannel/wgkey`).
    pub wg_key_file: Option<std::path::PathBuf>,
    /// How the userspace datapath (udp, wireguard) uses the machine's cores.
    pub datapath: Datapath,
}

/// How the userspace datapath (udp, wireguard) uses the machine: how many TUN queues (one
/// sender and one receiver thread each) it runs, and how long an active thread keeps polling
/// before it sleeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Datapath {
    /// TUN queues; `None`: one per core this process may run on.
    pub queues: Option<std::num::NonZeroUsize>,
    /// After handling traffic, a packet thread polls without sleeping (yielding the CPU
    /// between tries) for this long before it blocks. Zero: never. A sleeping thread costs a
    /// wake-up per packet that finds it asleep (tens of µs on a virtual machine), which is
    /// most of the userspace path's round-trip time; polling spends CPU time to save it.
    pub busy_poll: std::time::Duration,
}

impl Datapath {
    /// Most TUN queues a device may have (the kernel's `MAX_TAP_QUEUES`).
    pub const MAX_QUEUES: usize = 256;

    /// Most queues chosen without being asked: each queue holds about 5 MiB of packet buffers
    /// under load and two 7 MiB socket buffers, more than one node's peers can keep busy
    /// beyond this many cores.
    pub const DEFAULT_MAX_QUEUES: usize = 16;

    /// The queue count to open: the configured one (up to the kernel's limit), else one per
    /// core available to this process (its CPU affinity and cgroup quota), up to
    /// [`DEFAULT_MAX_QUEUES`](Self::DEFAULT_MAX_QUEUES).
    pub fn queue_count(&self) -> usize {
        match self.queues {
            Some(n) => n.get().min(Self::MAX_QUEUES),
            None => std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(Self::DEFAULT_MAX_QUEUES),
        }
    }
}

#[cfg(test)]
impl NodeInfo {
    /// A node on `eth0` (MTU 1500) at 172.30.0.11 and, dual stack, fd00:30::11: the backends'
    /// unit tests' underlay.
    pub(crate) fn for_test(ipv6: bool) -> Self {
        NodeInfo {
            iface: Link {
                index: 1,
                name: "eth0".into(),
                mtu: 1500,
            },
            public_ip: Ipv4Addr::new(172, 30, 0, 11),
            public_ipv6: ipv6.then_some(Ipv6Addr::new(0xfd00, 0x30, 0, 0, 0, 0, 0, 0x11)),
            wg_key_file: None,
            datapath: Datapath::default(),
        }
    }
}

/// What a backend puts into our lease besides the public addresses.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LeaseData {
    pub backend_type: Option<String>,
    pub backend_data: Option<serde_json::Value>,
    pub backend_v6_data: Option<serde_json::Value>,
}

#[async_trait]
pub trait Backend: Send {
    /// The `Backend.Type` string, for logs.
    fn name(&self) -> &'static str;

    /// The pods' MTU (`FLANNEL_MTU`): the underlay's, less what this backend's encapsulation
    /// costs (and less again where its config says so, e.g. vxlan's `Backend.MTU`).
    fn mtu(&self) -> u32;

    /// What to publish in our lease. Called before the lease is taken: a backend that needs a
    /// device to know its data (VXLAN's MAC, WireGuard's key) creates it in `new`.
    fn lease_data(&self) -> LeaseData;

    /// Configures the local side for the lease we hold. Called again if the lease changes.
    async fn start(&mut self, own: &Lease) -> Result<(), BackendError>;

    /// A peer's lease appeared or changed. The daemon hands over only leases the admission
    /// check passed (the right BackendType among them). An error concerns this peer alone.
    async fn add_peer(&mut self, peer: &Lease) -> Result<(), BackendError>;

    /// A peer's lease is gone. An error concerns this peer alone.
    async fn remove_peer(&mut self, peer: &Lease) -> Result<(), BackendError>;

    /// Datapath counters, for backends that move packets themselves (none for kernel paths).
    fn stats(&self) -> Option<std::sync::Arc<crate::stats::Stats>> {
        None
    }

    /// The full set of peers after the first listing: install what is missing and remove what we
    /// installed earlier (e.g. before a restart) that no lease justifies any more.
    async fn reconcile(&mut self, peers: &[Lease]) -> Result<(), BackendError>;

    /// The devices this backend keeps in the kernel across restarts (vxlan's `flannel.<VNI>`
    /// and `flannel-v6.<VNI>`), so that the daemon can delete such devices an earlier config
    /// left behind.
    fn device_names(&self) -> Vec<String> {
        Vec::new()
    }

    /// The routes of ours (protocol 70) this backend wants now. The daemon removes every other
    /// route of ours: e.g. host-gw's routes after a switch to an encrypting backend, which
    /// would otherwise send pod traffic around the tunnel in the clear.
    fn wanted_routes(&self) -> Vec<OwnRoute> {
        Vec::new()
    }

    /// Puts back what was removed behind our back (routes, neighbours, FDB entries, the device
    /// or its address), touching nothing that is still in place, and removes entries on our
    /// own devices that nothing we installed justifies (one whose removal failed). Says how
    /// many objects it put right, and the first failure; the daemon calls it every
    /// `--iptables-resync` seconds.
    async fn repair(&mut self) -> Repaired {
        Repaired::default()
    }
}

/// Adds every peer of a full listing, logging each failure, and returns the first: one bad
/// lease never keeps the others out (the `reconcile` of the route-programming backends).
pub(crate) async fn add_each<B: Backend + ?Sized>(
    backend: &mut B,
    peers: &[Lease],
) -> Result<(), BackendError> {
    let mut first_err = Ok(());
    for p in peers {
        if let Err(e) = backend.add_peer(p).await {
            tracing::warn!("{e}");
            if first_err.is_ok() {
                first_err = Err(e);
            }
        }
    }
    first_err
}

/// What a lease of `backend_type` claims for itself alone, so that a newcomer copying it is
/// refused instead of displacing the holder: the VXLAN VtepMACs (each device's FDB is keyed
/// by MAC; the IPv6 device's, from `BackendV6Data`, is a claim of its own) and the WireGuard
/// PublicKey (a peer is keyed by its key; a dual-stack lease names it in both BackendData and
/// BackendV6Data, an IPv6-only one in BackendV6Data alone: one claim either way).
pub fn lease_claims(backend_type: &str, lease: &Lease) -> Vec<String> {
    let attrs = &lease.attrs;
    let (field, labels) = match backend_type {
        "vxlan" => ("VtepMAC", ["VtepMAC", "IPv6 VtepMAC"]),
        "wireguard" => ("PublicKey", ["PublicKey", "PublicKey"]),
        _ => return Vec::new(),
    };
    let mut claims: Vec<String> = Vec::new();
    for (label, data) in labels
        .into_iter()
        .zip([&attrs.backend_data, &attrs.backend_v6_data])
    {
        let Some(value) = data
            .as_ref()
            .and_then(|d| json_field(d, field))
            .and_then(|v| v.as_str())
        else {
            continue;
        };
        let claim = format!("{label} {}", canonical_claim(field, value));
        if !claims.contains(&claim) {
            claims.push(claim);
        }
    }
    claims
}

/// A claimed value as the backend will read it, so that writing it another way (a MAC in
/// another notation or case, a key with whitespace around it) claims the same thing: the
/// kernel keys FDB entries by the MAC's bytes, the WireGuard table peers by the key's. A value
/// the backend cannot read stays as written (the backend refuses that lease anyway).
fn canonical_claim(field: &str, value: &str) -> String {
    let canonical = match field {
        "VtepMAC" => vxlan::canonical_mac(value),
        "PublicKey" => wireguard::canonical_key(value),
        _ => None,
    };
    canonical.unwrap_or_else(|| value.to_string())
}

/// Builds the backend named by `Backend.Type`.
pub async fn new_backend(
    config: &NetworkConfig,
    node: &NodeInfo,
) -> Result<Box<dyn Backend>, BackendError> {
    match config.backend_type.to_ascii_lowercase().as_str() {
        "host-gw" => Ok(Box::new(host_gw::HostGw::new(config, node)?)),
        "udp" => Ok(Box::new(udp::Udp::new(config, node)?)),
        "wireguard" => Ok(Box::new(wireguard::WireGuard::new(config, node)?)),
        "vxlan" => Ok(Box::new(vxlan::Vxlan::new(config, node).await?)),
        other => Err(BackendError::UnknownType(other.to_string())),
    }
}

/// Reads `Backend.<name>` (matched case-insensitively, as Go's JSON decoding does) as a port.
fn backend_port(config: &NetworkConfig, name: &str, default: u16) -> Result<u16, BackendError> {
    match json_field(&config.backend, name) {
        None => Ok(default),
        Some(v) => v
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                BackendError::Config(format!(
                    "field \"Backend.{name}\": {v} is not a port (1-65535)"
                ))
            }),
    }
}

/// `name` in a JSON object (a `Backend` config, a lease's `BackendData`), as Go's JSON
/// decoding finds it; `null` counts as absent.
fn json_field<'a>(obj: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    subnet_manager::json::field_of(obj, name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use subnet_manager::admission::{Admission, Refusal};
    use subnet_manager::lease::{LeaseAttrs, SubnetKey};

    const CONFIG: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fc00:44::/48","Backend":{"Type":"vxlan"}}"#;

    #[test]
    fn queues_follow_the_cores_unless_told() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let auto = Datapath::default().queue_count();
        assert_eq!(auto, cores.min(Datapath::DEFAULT_MAX_QUEUES));
        let told = |n: usize| Datapath {
            queues: std::num::NonZeroUsize::new(n),
            ..Datapath::default()
        };
        assert_eq!(told(7).queue_count(), 7);
        assert_eq!(told(64).queue_count(), 64);
        assert_eq!(told(1000).queue_count(), Datapath::MAX_QUEUES);
        assert_eq!(told(0).queue_count(), auto);
    }

    fn vxlan_lease(n: u8, mac: &str, mac6: &str) -> Lease {
        let json = format!(
            r#"{{"PublicIP":"172.30.0.{n}","PublicIPv6":"fd00:30::{n}","BackendType":"vxlan",
            "BackendData":{{"VNI":1,"VtepMAC":"{mac}"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"{mac6}"}}}}"#
        );
        Lease {
            key: SubnetKey::parse(&format!("10.244.{n}.0-24&fc00:44:0:{n}::-64")).expect("key"),
            attrs: LeaseAttrs::from_json(json.as_bytes()).expect("attrs"),
        }
    }

    #[test]
    fn vxlan_claims_both_vtep_macs_apart() {
        let l = vxlan_lease(2, "0E:01:AC:1E:00:02", "0a:01:00:00:00:02");
        assert_eq!(
            lease_claims("vxlan", &l),
            [
                "VtepMAC 0e:01:ac:1e:00:02",
                "IPv6 VtepMAC 0a:01:00:00:00:02"
            ]
        );
        // One MAC on both devices of a node is no conflict: each device has its own FDB.
        let same = vxlan_lease(3, "0a:01:00:00:00:03", "0a:01:00:00:00:03");
        assert_eq!(lease_claims("vxlan", &same).len(), 2);
        assert!(lease_claims("host-gw", &l).is_empty());
    }

    /// Admission on vxlan, our own lease holding MACs 0e:01:00:00:00:01 and 0a:01:00:00:00:01.
    fn vxlan_admission() -> Admission {
        let config = NetworkConfig::parse(CONFIG.as_bytes()).expect("config");
        let mut a = Admission::new(
            &config,
            "vxlan",
            Box::new(|l: &Lease| lease_claims("vxlan", l)),
        );
        a.set_own(&vxlan_lease(1, "0e:01:00:00:00:01", "0a:01:00:00:00:01"));
        a
    }

    #[test]
    fn a_copied_v6_vtep_mac_is_refused() {
        let mut a = vxlan_admission();
        let owner = vxlan_lease(2, "0e:01:00:00:00:02", "0a:01:00:00:00:02");
        assert_eq!(a.put(owner.clone()).changes.len(), 1);
        let thief = vxlan_lease(3, "0e:01:00:00:00:03", "0A:01:00:00:00:02");
        let out = a.put(thief);
        assert!(out.changes.is_empty(), "{out:?}");
        assert_eq!(
            out.refused[0].1,
            Refusal::Claimed {
                claim: "IPv6 VtepMAC 0a:01:00:00:00:02".into(),
                holder: Some(owner.key),
            }
        );
        // Our own IPv6 device's MAC, copied.
        let out = a.put(vxlan_lease(4, "0e:01:00:00:00:04", "0a:01:00:00:00:01"));
        assert!(out.refused[0].1.to_string().contains("is ours"), "{out:?}");
        // A v6 MAC equal to another node's v4 one is no conflict.
        let out = a.put(vxlan_lease(5, "0e:01:00:00:00:05", "0e:01:00:00:00:02"));
        assert_eq!(out.changes.len(), 1, "{out:?}");
    }

    fn claims(backend: &str, json: &str) -> Vec<String> {
        let lease = Lease {
            key: SubnetKey::parse("10.244.7.0-24&fc00:44:0:7::-64").expect("key"),
            attrs: LeaseAttrs::from_json(json.as_bytes()).expect("attrs"),
        };
        lease_claims(backend, &lease)
    }

    #[test]
    fn wireguard_claims_its_key_from_either_family() {
        let dual = r#"{"PublicIP":"172.30.0.7","PublicIPv6":"fd00:30::7","BackendType":"wireguard","BackendData":{"PublicKey":"K1","Port":51820},"BackendV6Data":{"PublicKey":"K1","Port":51821}}"#;
        assert_eq!(claims("wireguard", dual), ["PublicKey K1"], "once");
        let v6_only = r#"{"PublicIP":"172.30.0.7","PublicIPv6":"fd00:30::7","BackendType":"wireguard","BackendV6Data":{"PublicKey":"K2"}}"#;
        assert_eq!(claims("wireguard", v6_only), ["PublicKey K2"]);
        let two = r#"{"PublicIP":"172.30.0.7","BackendType":"wireguard","BackendData":{"PublicKey":"K1"},"BackendV6Data":{"PublicKey":"K2"}}"#;
        assert_eq!(claims("wireguard", two), ["PublicKey K1", "PublicKey K2"]);
        let vxlan = r#"{"PublicIP":"172.30.0.7","BackendType":"vxlan","BackendData":{"VtepMAC":"AA:BB:CC:DD:EE:FF"},"BackendV6Data":{"VtepMAC":"11:22:33:44:55:66"}}"#;
        assert_eq!(
            claims("vxlan", vxlan),
            [
                "VtepMAC aa:bb:cc:dd:ee:ff",
                "IPv6 VtepMAC 11:22:33:44:55:66"
            ]
        );
        assert!(claims("host-gw", dual).is_empty());
    }

    #[test]
    fn a_claim_written_another_way_is_the_same_claim() {
        // The FDB is keyed by the MAC's bytes, the peer table by the key's: another notation
        // of a holder's MAC or key must not pass as a new claim and displace it.
        let mut a = vxlan_admission();
        let owner = vxlan_lease(2, "aa:bb:cc:dd:ee:01", "0a:01:00:00:00:02");
        assert_eq!(a.put(owner.clone()).changes.len(), 1);
        for (n, mac) in [(3, "AA-BB-CC-DD-EE-01"), (4, "aabb.ccdd.ee01")] {
            let out = a.put(vxlan_lease(n, mac, &format!("0a:01:00:00:00:0{n}")));
            assert!(out.changes.is_empty(), "{mac}: {out:?}");
            assert_eq!(
                out.refused[0].1,
                Refusal::Claimed {
                    claim: "VtepMAC aa:bb:cc:dd:ee:01".into(),
                    holder: Some(owner.key.clone()),
                },
                "{mac}"
            );
        }
        let out = a.put(vxlan_lease(5, "0E-01-00-00-00-01", "0a:01:00:00:00:05"));
        assert!(out.refused[0].1.to_string().contains("is ours"), "{out:?}");

        let key = "Zm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyMDE=";
        let lease = |padded: &str| {
            format!(
                r#"{{"PublicIP":"172.30.0.7","BackendType":"wireguard","BackendData":{{"PublicKey":"{padded}"}}}}"#
            )
        };
        let want = [format!("PublicKey {key}")];
        assert_eq!(claims("wireguard", &lease(key)), want);
        assert_eq!(claims("wireguard", &lease(&format!(" {key}\\n"))), want);
        // What is no key stays as written (the backend refuses that lease anyway).
        assert_eq!(claims("wireguard", &lease("K1 ")), ["PublicKey K1 "]);
    }
}
