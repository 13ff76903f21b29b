//! NetworkPolicy on this node: the records under `<prefix>/policy/` are followed with the
//! leases' list-and-watch (`subnet_manager::watch::spawn_records`), checked and compiled by the
//! pure `netpol` crate, and installed with `nft -f` (`engine`); our own pods' records are
//! published for the CNI plugin (`pods`); `api` answers the plugin and `policy explain` over
//! the node's Unix socket.

pub mod api;
mod engine;
mod kernel;
mod pods;

use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ipnet::IpNet;
use netpol::compile::Locality;
use netpol::World;
use subnet_manager::lease::SubnetKey;
use subnet_manager::registry::Registry;
use tokio::sync::watch;

pub use pods::{CONTAINER_ANNOTATION, OWNER_ANNOTATION};

/// Counters for metrics and `GET /v1/policy/status`.
#[derive(Default)]
pub struct PolicyStats {
    /// Records refused (bad JSON, key mismatch, invalid spec), since start.
    pub rejected: AtomicU64,
    /// Times the kernel was programmed, and the time it took in all (µs), from the batch's
    /// arrival to `nft` returning.
    pub programs: AtomicU64,
    pub programming_us: AtomicU64,
    pub last_programming_us: AtomicU64,
    /// nft operations (rules, elements, map entries, sets, chains) applied.
    pub operations: AtomicU64,
    /// `nft` runs that failed (retried as a whole-table write).
    pub failures: AtomicU64,
    /// Packets dropped by policy, from the table's counters at the last read.
    pub denied_in: AtomicU64,
    pub denied_out: AtomicU64,
    /// Local pods isolated now.
    pub isolated_in: AtomicU64,
    pub isolated_out: AtomicU64,
}

/// The subnets this node holds now, and held before.
#[derive(Clone, Debug)]
pub struct NodeSubnet {
    /// The pods ours to isolate: in our subnets (also the only addresses we publish records
    /// for), or left in a subnet we held before (a lease re-acquired with another subnet:
    /// pods made then keep their addresses until recreated) with a record naming our host.
    locality: Locality,
    /// Our lease's key as Flannel writes it (`10.244.1.0-24`): the owner annotation.
    node: String,
    /// The keys we held before: records we published under them are still ours to remove.
    /// The node holding such a subnet now writes the same key on its records: ours are
    /// those naming our host too.
    former: Vec<String>,
}

impl NodeSubnet {
    fn new(key: &SubnetKey, host_ip: Option<IpAddr>) -> Self {
        let mut subnets: Vec<IpNet> = Vec::new();
        subnets.extend(key.ipv4.map(IpNet::V4));
        subnets.extend(key.ipv6.map(IpNet::V6));
        NodeSubnet {
            locality: Locality {
                subnets,
                former: Vec::new(),
                host_ip,
            },
            node: key.to_string(),
            former: Vec::new(),
        }
    }

    /// Our lease now holds `key`; what we held becomes former. False when it already did.
    fn move_to(&mut self, key: &SubnetKey) -> bool {
        let node = key.to_string();
        if node == self.node {
            return false;
        }
        let was = std::mem::replace(self, NodeSubnet::new(key, self.locality.host_ip));
        self.former = was.former;
        self.former.push(was.node);
        self.former.retain(|f| *f != node);
        let l = &mut self.locality;
        l.former = was.locality.former;
        l.former.extend(was.locality.subnets);
        l.former.retain(|n| !l.subnets.contains(n));
        true
    }

    /// Whether a record's owner annotation and host (`status.hostIP`) name this node.
    fn published_here(&self, owner: &str, host_ip: Option<&str>) -> bool {
        owner == self.node
            || (self.former.iter().any(|f| f == owner)
                && host_ip.and_then(|h| h.parse::<IpAddr>().ok()) == self.locality.host_ip)
    }
}

/// What the handlers and the engine share.
pub struct Policy {
    registry: Registry,
    /// `<prefix>/policy/`.
    prefix: String,
    /// Our lease's subnets, changed when the lease is re-acquired with another subnet (the
    /// engine recompiles on each change).
    subnet: watch::Sender<NodeSubnet>,
    host_ip: IpAddr,
    /// The world last compiled into the kernel, for `explain`.
    world: Mutex<Arc<World>>,
    /// Rejected records now, key → reason (for status).
    rejected: Mutex<std::collections::BTreeMap<String, String>>,
    /// The etcd revision whose policy state is in force in the kernel.
    programmed: watch::Sender<i64>,
    pub stats: PolicyStats,
    /// Our pod records' etcd grant (0 until granted).
    grant: AtomicI64,
    grant_ttl: Duration,
    state_dir: std::path::PathBuf,
    /// When the drop counters were last read: scrapes within `COUNTERS_FRESH` of it reuse
    /// that reading, and concurrent ones wait for one `nft` run, not one each.
    counters_read: tokio::sync::Mutex<Option<std::time::Instant>>,
}

/// How long a reading of the drop counters serves scrapes: `/metrics` is open to anyone who
/// reaches the port, and each reading runs `nft`.
const COUNTERS_FRESH: Duration = Duration::from_secs(2);

impl Policy {
    /// Starts following the policy records and programming the kernel for `key`'s pods.
    pub fn start(
        registry: Registry,
        key: &SubnetKey,
        host_ip: IpAddr,
        grant_ttl: Duration,
        subnet_file: &std::path::Path,
    ) -> Arc<Policy> {
        let (programmed, _) = watch::channel(0);
        let policy = Arc::new(Policy {
            prefix: format!("{}/policy/", registry.prefix()),
            registry,
            subnet: watch::Sender::new(NodeSubnet::new(key, Some(host_ip))),
            host_ip,
            world: Mutex::new(Arc::new(World::new())),
            rejected: Mutex::default(),
            programmed,
            stats: PolicyStats::default(),
            grant: AtomicI64::new(0),
            grant_ttl,
            state_dir: crate::single::socket_path(subnet_file)
                .parent()
                .map(std::path::Path::to_path_buf)
                .unwrap_or_default(),
            counters_read: tokio::sync::Mutex::new(None),
        });
        let records =
            subnet_manager::watch::spawn_records(policy.registry.clone(), policy.prefix.clone());
        tokio::spawn(engine::run(policy.clone(), records));
        tokio::spawn(pods::upkeep(policy.clone()));
        policy
    }

    /// Our lease was re-acquired with `key`: its pods are the ones to isolate and publish from
    /// now on (the old subnet may be another node's now).
    pub fn set_subnet(&self, key: &SubnetKey) {
        self.subnet.send_if_modified(|s| s.move_to(key));
    }

    fn subnet(&self) -> NodeSubnet {
        self.subnet.borrow().clone()
    }

    /// The revision in force; wait on `programmed()` for a later one.
    pub fn revision(&self) -> i64 {
        *self.programmed.borrow()
    }

    /// Waits until the state at `revision` (or later) is in force; false on timeout.
    pub async fn wait_programmed(&self, revision: i64, timeout: Duration) -> bool {
        let mut rx = self.programmed.subscribe();
        let in_force = tokio::time::timeout(timeout, rx.wait_for(|r| *r >= revision))
            .await
            .is_ok_and(|r| r.is_ok());
        in_force
    }

    pub fn world(&self) -> Arc<World> {
        self.world
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn rejected(&self) -> std::collections::BTreeMap<String, String> {
        self.rejected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reads the drop counters from the kernel into `stats` (at scrape time).
    pub async fn refresh_counters(&self) {
        let mut read = self.counters_read.lock().await;
        if read.is_some_and(|t| t.elapsed() < COUNTERS_FRESH) {
            return;
        }
        *read = Some(std::time::Instant::now());
        if let Some((i, o)) = kernel::denied_counters().await {
            self.stats.denied_in.store(i, Ordering::Relaxed);
            self.stats.denied_out.store(o, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> SubnetKey {
        SubnetKey::parse(s).expect("key")
    }

    /// After a move, records under the old key are ours only where they name our host: the
    /// node holding the old subnet now writes that key on its own records.
    #[test]
    fn a_former_key_is_ours_only_with_our_host() {
        let ours: IpAddr = "192.168.0.1".parse().expect("ip");
        let mut s = NodeSubnet::new(&key("10.244.1.0-24"), Some(ours));
        assert!(!s.move_to(&key("10.244.1.0-24")), "no move");
        assert!(s.move_to(&key("10.244.3.0-24")));
        assert_eq!(s.node, "10.244.3.0-24");
        let l = &s.locality;
        assert_eq!(l.subnets, ["10.244.3.0/24".parse::<IpNet>().expect("net")]);
        assert_eq!(l.former, ["10.244.1.0/24".parse::<IpNet>().expect("net")]);
        assert!(s.published_here("10.244.3.0-24", None), "the current key");
        assert!(s.published_here("10.244.1.0-24", Some("192.168.0.1")));
        assert!(!s.published_here("10.244.1.0-24", Some("192.168.0.2")));
        assert!(!s.published_here("10.244.1.0-24", None));
        // Back to the first subnet: it is current again, not former.
        assert!(s.move_to(&key("10.244.1.0-24")));
        assert_eq!(s.former, ["10.244.3.0-24"]);
        assert_eq!(
            s.locality.former,
            ["10.244.3.0/24".parse::<IpNet>().expect("net")]
        );
    }
}
