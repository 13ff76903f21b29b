//! What the daemon reports about itself: the state the endpoints read (here), its Prometheus
//! exposition (`metrics`), and the HTTP server for `/healthz`, `/readyz` (Flannel's
//! `--healthz-*`) and `/metrics` (ours, `--metrics-port`) (`http`).

mod http;
mod metrics;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use encap::stats::Stats;
use subnet_manager::admission::Refusal;
use subnet_manager::registry::{HeldLease, RegistryStats};

pub use http::serve;

/// The daemon's state as the endpoints see it; updated by the daemon's control loop.
#[derive(Default)]
pub struct Status {
    lease: Mutex<Option<LeaseInfo>>,
    pub backend_running: AtomicBool,
    /// Set once the lease is held, the device is up, the rules are in place and subnet.env is
    /// written: what Flannel's `/readyz` waits for.
    pub ready: AtomicBool,
    pub peers: AtomicUsize,
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
