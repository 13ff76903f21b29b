//! What the daemon reports about itself: the state the endpoints read (here), its Prometheus
//! exposition (`metrics`), and the HTTP server for `/healthz`, `/readyz` (Flannel's
//! `--healthz-*`) and `/metrics` (ours, `--metrics-port`) (`http`).

mod checks;
pub mod client;
mod http;
mod metrics;
pub mod report;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use encap::stats::Stats;
use subnet_manager::admission::Refusal;
use subnet_manager::registry::{HeldLease, RegistryStats};

use crate::health::core::{PeerView, State};
pub use http::{serve, serve_unix};
use report::{DeviceReport, LeaseReport, PeerReport, Report};

/// The daemon's state as the endpoints see it; updated by the daemon's control loop.
#[derive(Default)]
pub struct Status {
    lease: Mutex<Option<LeaseInfo>>,
    pub backend_running: AtomicBool,
    /// Set once the lease is held, the device is up, the rules are in place and subnet.env is
    /// written: what Flannel's `/readyz` waits for.
    pub ready: AtomicBool,
    pub peers: AtomicUsize,
    /// Peers' leases kept from the backend now (other backends' aside).
    pub refused_now: AtomicUsize,
    backend: Mutex<String>,
    registry: Mutex<Option<Arc<RegistryStats>>>,
    datapath: Mutex<Option<Arc<Stats>>>,
    /// Peers' leases kept from the backend, by `Refusal::kind`.
    refused: [AtomicU64; Refusal::KINDS.len()],
    /// Times another writer changed our lease key (and we put ours back).
    pub lease_rewrites: AtomicU64,
    /// Kernel objects and rule sets of ours restored after someone removed them.
    pub repairs: AtomicU64,
    /// Routes of ours removed because nothing justified them any more.
    pub stale_routes_removed: AtomicU64,
    /// The admitted peers, as `status` lists them.
    peer_list: Mutex<Vec<PeerReport>>,
    /// What the environment checks need to know of this node.
    node: Mutex<NodeDetails>,
    /// Per-peer path health, as the prober last saw it.
    probes: Mutex<Vec<PeerView>>,
    pub health: HealthCounters,
    /// NetworkPolicy, once this node holds a lease.
    pub policy: std::sync::OnceLock<Arc<crate::policy::Policy>>,
}

/// The prober's own traffic.
#[derive(Default)]
pub struct HealthCounters {
    pub sent: AtomicU64,
    /// Probes the socket had no room for (a loss, like any other).
    pub send_failed: AtomicU64,
    /// Peers' probes we answered.
    pub answered: AtomicU64,
    /// Answers the socket had no room for.
    pub answer_failed: AtomicU64,
    /// Probes from addresses that are no peer's: not answered.
    pub refused: AtomicU64,
    /// Our own probes that came back to us (a peer address that is also ours): not answered.
    pub looped: AtomicU64,
    /// Answers refused: an unknown or expired nonce, or from another address than probed.
    pub reply_refused: AtomicU64,
    /// Our probes a peer's host answered with ICMP port unreachable: no responder there.
    pub no_responder: AtomicU64,
    /// Datagrams on the probe port that are no probe.
    pub malformed: AtomicU64,
}

/// The node's setup as `status` reports it.
#[derive(Clone, Debug, Default)]
pub struct NodeDetails {
    /// Our network devices (`flannel.1`, `flannel0`, `flannel-wg`).
    pub devices: Vec<String>,
    pub masquerade: bool,
    pub forward_rules: bool,
}

#[derive(Clone)]
struct LeaseInfo {
    subnet: String,
    expires: SystemTime,
}

impl Status {
    pub fn set_lease(&self, held: Option<&HeldLease>) {
        let info = held.map(|h| LeaseInfo {
            subnet: h.key.to_string(),
            expires: SystemTime::now()
                + h.expires_at
                    .saturating_duration_since(tokio::time::Instant::now()),
        });
        if let Ok(mut l) = self.lease.lock() {
            *l = info;
        }
    }

    pub fn set_sources(
        &self,
        backend: &str,
        registry: Arc<RegistryStats>,
        datapath: Option<Arc<Stats>>,
    ) {
        if let Ok(mut b) = self.backend.lock() {
            *b = backend.to_string();
        }
        if let Ok(mut r) = self.registry.lock() {
            *r = Some(registry);
        }
        if let Ok(mut d) = self.datapath.lock() {
            *d = datapath;
        }
    }

    /// Counts a lease kept from the backend, by the kind of refusal.
    pub fn count_refused(&self, kind: &str) {
        if let Some(i) = Refusal::KINDS.iter().position(|k| *k == kind) {
            self.refused[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The admitted peers' leases, for `status`.
    pub fn set_peers<'a>(&self, leases: impl Iterator<Item = &'a subnet_manager::lease::Lease>) {
        let list = leases
            .map(|l| PeerReport {
                subnet: l.key.to_string(),
                public_ip: l.attrs.public_ip.to_string(),
                public_ipv6: l.attrs.public_ipv6.map(|ip| ip.to_string()),
                probe: "not probed".into(),
            })
            .collect();
        if let Ok(mut p) = self.peer_list.lock() {
            *p = list;
        }
    }

    pub fn set_probes(&self, views: Vec<PeerView>) {
        if let Ok(mut p) = self.probes.lock() {
            *p = views;
        }
    }

    fn probes(&self) -> Vec<PeerView> {
        self.probes.lock().map(|p| p.clone()).unwrap_or_default()
    }

    pub fn set_node(&self, details: NodeDetails) {
        if let Ok(mut n) = self.node.lock() {
            *n = details;
        }
    }

    /// A snapshot for `flanneld-rs status`, environment checks included.
    pub async fn report(&self) -> Report {
        let node = self.node.lock().map(|n| n.clone()).unwrap_or_default();
        let backend = self.backend();
        let lease = self.lease().map(|l| LeaseReport {
            subnet: l.subnet,
            expires_in_s: match l.expires.duration_since(SystemTime::now()) {
                Ok(left) => i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
                Err(past) => -i64::try_from(past.duration().as_secs()).unwrap_or(i64::MAX),
            },
        });
        let mut peers = self.peer_list.lock().map(|p| p.clone()).unwrap_or_default();
        peers.sort_by(|a, b| a.subnet.cmp(&b.subnet));
        let probes = self.probes();
        for peer in &mut peers {
            if let Some(v) = probes.iter().find(|v| v.key == peer.subnet) {
                peer.probe = probe_verdict(v);
            }
        }
        let ctx = checks::Context {
            devices: &node.devices,
            masquerade: node.masquerade,
            forward_rules: node.forward_rules,
            backend: &backend,
        };
        Report {
            version: env!("CARGO_PKG_VERSION").into(),
            lease,
            not_ready: self.readiness().err(),
            devices: node.devices.iter().map(|d| device_report(d)).collect(),
            offloads: self
                .datapath_stats()
                .and_then(|d| d.offloads.lock().ok().map(|o| o.clone()))
                .unwrap_or_default(),
            peers,
            // Those refused now, not every refusal since start (the metric counts those).
            refused_leases: self.refused_now.load(Ordering::Relaxed) as u64,
            checks: checks::gather(&ctx).await,
            backend,
        }
    }

    fn lease(&self) -> Option<LeaseInfo> {
        self.lease.lock().ok().and_then(|l| l.clone())
    }

    fn backend(&self) -> String {
        self.backend.lock().map(|b| b.clone()).unwrap_or_default()
    }

    fn registry_stats(&self) -> Option<Arc<RegistryStats>> {
        self.registry.lock().ok().and_then(|r| r.clone())
    }

    fn datapath_stats(&self) -> Option<Arc<Stats>> {
        self.datapath.lock().ok().and_then(|d| d.clone())
    }

    /// `Ok` while the lease is held (not expired) and the backend runs; else the reason.
    /// This is our `flanneld_healthy`; `/healthz` itself only says the process answers.
    pub fn health(&self) -> Result<(), String> {
        let Some(lease) = self.lease() else {
            return Err("no subnet lease yet".into());
        };
        if lease.expires < SystemTime::now() {
            return Err(format!(
                "lease {} expired and was not renewed",
                lease.subnet
            ));
        }
        if !self.backend_running.load(Ordering::Relaxed) {
            return Err("backend not running".into());
        }
        Ok(())
    }

    /// `Ok` once start-up has put everything in place (Flannel v0.28.9's `/readyz`) and while
    /// the lease stays held; else the reason.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.ready.load(Ordering::Relaxed) {
            return Err(match self.health() {
                Err(why) => why,
                Ok(()) => "rules or subnet.env not in place yet".into(),
            });
        }
        self.health()
    }
}

/// A peer's probe result as `status` prints it.
fn probe_verdict(v: &PeerView) -> String {
    let mut s = match v.state {
        State::NotProbed => "not probed (no answer yet; Go Flannel peers never answer)".to_string(),
        State::Up => format!(
            "up, rtt {}",
            v.rtt.map_or("-".into(), |r| format!(
                "{:.2} ms",
                r.as_secs_f64() * 1000.0
            ))
        ),
        State::Down => "DOWN: probes unanswered".to_string(),
    };
    if let Some(loss) = v.loss.filter(|l| *l > 0.0) {
        s.push_str(&format!(", loss {:.0}%", loss * 100.0));
    }
    match (v.mtu_fails, v.mtu_passes) {
        (Some(fails), Some(passes)) => {
            s.push_str(&format!(", MTU PROBLEM: {fails} lost, {passes} passes"))
        }
        (Some(fails), None) => s.push_str(&format!(", MTU PROBLEM: {fails} lost")),
        (None, Some(passes)) => s.push_str(&format!(", mtu {passes}")),
        (None, None) => {}
    }
    s
}

/// A device's state and MTU from sysfs (no netlink round trip for a status page).
fn device_report(name: &str) -> DeviceReport {
    let dir = std::path::Path::new("/sys/class/net").join(name);
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .ok()
            .map(|s| s.trim().to_string())
    };
    DeviceReport {
        name: name.into(),
        state: read("operstate").unwrap_or_else(|| "missing".into()),
        mtu: read("mtu").and_then(|m| m.parse().ok()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use subnet_manager::lease::{LeaseAttrs, SubnetKey};

    pub(super) fn held(ttl: u64) -> HeldLease {
        HeldLease {
            key: SubnetKey::parse("10.244.3.0-24").expect("key"),
            attrs: LeaseAttrs {
                public_ip: "192.168.1.10".parse().expect("ip"),
                public_ipv6: None,
                backend_type: None,
                backend_data: None,
                backend_v6_data: None,
            },
            grant_id: 1,
            ttl: Duration::from_secs(ttl),
            expires_at: tokio::time::Instant::now() + Duration::from_secs(ttl),
        }
    }

    #[tokio::test]
    async fn health_needs_lease_and_backend() {
        let s = Status::default();
        assert!(s.health().unwrap_err().contains("no subnet lease"));
        s.set_lease(Some(&held(60)));
        assert!(s.health().unwrap_err().contains("backend"));
        s.backend_running.store(true, Ordering::Relaxed);
        assert_eq!(s.health(), Ok(()));
    }

    #[tokio::test]
    async fn ready_only_once_everything_is_in_place() {
        let s = Status::default();
        assert!(s.readiness().unwrap_err().contains("no subnet lease"));
        s.set_lease(Some(&held(60)));
        s.backend_running.store(true, Ordering::Relaxed);
        assert!(s.readiness().unwrap_err().contains("not in place"));
        s.ready.store(true, Ordering::Relaxed);
        assert_eq!(s.readiness(), Ok(()));
        // A lease lost later makes the node unready again.
        s.set_lease(None);
        assert!(s.readiness().unwrap_err().contains("no subnet lease"));
    }
}
