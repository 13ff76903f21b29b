//! What the daemon reports about itself: `/healthz` (Flannel's `--healthz-*`) and Prometheus
//! `/metrics` (ours, `--metrics-port`), served by a minimal HTTP/1.0 responder: two fixed
//! routes do not justify an HTTP framework.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use encap::stats::{DropReason, Stats};
use subnet_manager::registry::{HeldLease, RegistryStats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The daemon's state as the endpoints see it; updated by the daemon's control loop.
#[derive(Default)]
pub struct Status {
    lease: Mutex<Option<LeaseInfo>>,
    pub backend_running: AtomicBool,
    pub peers: AtomicUsize,
    backend: Mutex<String>,
    registry: Mutex<Option<Arc<RegistryStats>>>,
    datapath: Mutex<Option<Arc<Stats>>>,
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

    fn lease(&self) -> Option<LeaseInfo> {
        self.lease.lock().ok().and_then(|l| l.clone())
    }

    /// `Ok` while the lease is held (not expired) and the backend runs; else the reason.
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

    /// The Prometheus text exposition of every counter we keep.
    pub fn metrics(&self) -> String {
        let mut m = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            let _ = writeln!(m, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(m, "{name}{labels} {v}");
            }
        };
        let backend = self.backend.lock().map(|b| b.clone()).unwrap_or_default();
        metric(
            "flanneld_build_info",
            "gauge",
            "Version and backend of this flanneld-rs.",
            &[(
                format!(
                    "{{version=\"{}\",backend=\"{backend}\"}}",
                    env!("CARGO_PKG_VERSION")
                ),
                1.0,
            )],
        );
        let lease = self.lease();
        let expiry = lease
            .as_ref()
            .and_then(|l| l.expires.duration_since(UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        metric(
            "flanneld_lease_info",
            "gauge",
            "The subnet leased by this node.",
            &lease
                .iter()
                .map(|l| (format!("{{subnet=\"{}\"}}", l.subnet), 1.0))
                .collect::<Vec<_>>(),
        );
        metric(
            "flanneld_lease_expiry_timestamp_seconds",
            "gauge",
            "When our lease expires unless renewed.",
            &[(String::new(), expiry)],
        );
        metric(
            "flanneld_peers",
            "gauge",
            "Other nodes' leases programmed into the backend.",
            &[(String::new(), self.peers.load(Ordering::Relaxed) as f64)],
        );
        metric(
            "flanneld_healthy",
            "gauge",
            "1 while the lease is held and the backend runs.",
            &[(String::new(), f64::from(u8::from(self.health().is_ok())))],
        );
        if let Some(r) = self.registry.lock().ok().and_then(|r| r.clone()) {
            let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed) as f64;
            metric(
                "flanneld_etcd_errors_total",
                "counter",
                "Failed etcd requests.",
                &[(String::new(), get(&r.etcd_errors))],
            );
            metric(
                "flanneld_etcd_watch_restarts_total",
                "counter",
                "Lease watch re-lists after a broken or compacted stream.",
                &[(String::new(), get(&r.watch_restarts))],
            );
            metric(
                "flanneld_malformed_leases_total",
                "counter",
                "Lease values that did not parse (skipped).",
                &[(String::new(), get(&r.malformed_leases))],
            );
            metric(
                "flanneld_lease_renewals_total",
                "counter",
                "Successful lease renewals.",
                &[(String::new(), get(&r.lease_renewals))],
            );
        }
        if let Some(s) = self.datapath.lock().ok().and_then(|d| d.clone()) {
            let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed) as f64;
            let dir = |tx: &std::sync::atomic::AtomicU64, rx: &std::sync::atomic::AtomicU64| {
                vec![
                    ("{direction=\"tx\"}".to_string(), get(tx)),
                    ("{direction=\"rx\"}".to_string(), get(rx)),
                ]
            };
            metric(
                "flanneld_datapath_packets_total",
                "counter",
                "Inner packets moved by the datapath.",
                &dir(&s.tx_packets, &s.rx_packets),
            );
            metric(
                "flanneld_datapath_bytes_total",
                "counter",
                "Inner bytes moved by the datapath.",
                &dir(&s.tx_bytes, &s.rx_bytes),
            );
            metric(
                "flanneld_datapath_syscalls_total",
                "counter",
                "Packet I/O system calls (packets / syscalls = batch size).",
                &dir(&s.tx_syscalls, &s.rx_syscalls),
            );
            let drops: Vec<(String, f64)> = DropReason::ALL
                .iter()
                .map(|d| (format!("{{reason=\"{d}\"}}"), s.drops(*d) as f64))
                .collect();
            metric(
                "flanneld_datapath_drops_total",
                "counter",
                "Packets dropped, by reason.",
                &drops,
            );
        }
        m
    }
}

/// Serves `/healthz` and `/metrics` on `addr` until the process exits.
pub async fn serve(addr: SocketAddr, status: Arc<Status>) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    tracing::info!(%addr, "serving /healthz and /metrics");
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                continue;
            };
            let status = status.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let read = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await;
                let Ok(Ok(n)) = read else { return };
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request.split_whitespace().nth(1).unwrap_or("/");
                let (code, body) = respond(path, &status);
                let reply = format!(
                    "HTTP/1.0 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(reply.as_bytes()).await;
            });
        }
    });
    Ok(())
}

fn respond(path: &str, status: &Status) -> (&'static str, String) {
    match path {
        "/healthz" => match status.health() {
            Ok(()) => ("200 OK", "ok\n".into()),
            Err(why) => ("503 Service Unavailable", format!("{why}\n")),
        },
        "/metrics" => ("200 OK", status.metrics()),
        _ => ("404 Not Found", "try /healthz or /metrics\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use subnet_manager::lease::{LeaseAttrs, SubnetKey};

    fn held(ttl: u64) -> HeldLease {
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
        assert_eq!(respond("/healthz", &s).0, "503 Service Unavailable");
        assert!(s.health().unwrap_err().contains("no subnet lease"));
        s.set_lease(Some(&held(60)));
        assert!(s.health().unwrap_err().contains("backend"));
        s.backend_running.store(true, Ordering::Relaxed);
        assert_eq!(respond("/healthz", &s), ("200 OK", "ok\n".to_string()));
        assert_eq!(respond("/nope", &s).0, "404 Not Found");
    }

    #[tokio::test]
    async fn metrics_are_prometheus_text() {
        let s = Status::default();
        s.set_lease(Some(&held(60)));
        let stats = Arc::new(Stats::default());
        stats.count_drop(DropReason::SpoofedSource, 3);
        s.set_sources("udp", Arc::default(), Some(stats));
        let text = s.metrics();
        assert!(
            text.contains("flanneld_lease_info{subnet=\"10.244.3.0-24\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("flanneld_datapath_drops_total{reason=\"spoofed_source\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE flanneld_etcd_errors_total counter"),
            "{text}"
        );
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap_or("");
            assert!(value.parse::<f64>().is_ok(), "bad sample line {line:?}");
        }
    }
}
