//! What the daemon reports about itself: `/healthz` (Flannel's `--healthz-*`) and Prometheus
//! `/metrics` (ours, `--metrics-port`), served by a minimal HTTP/1.0 responder: two fixed
//! routes do not justify an HTTP framework.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use encap::stats::{DropReason, Stats};
use subnet_manager::admission::Refusal;
use subnet_manager::registry::{HeldLease, RegistryStats};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;

/// The daemon's state as the endpoints see it; updated by the daemon's control loop.
#[derive(Default)]
pub struct Status {
    lease: Mutex<Option<LeaseInfo>>,
    pub backend_running: AtomicBool,
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
        let count = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
        metric(
            "flanneld_leases_refused_total",
            "counter",
            "Peers' leases kept from the backend, by reason (other_backend is Flannel's ordinary skip).",
            &Refusal::KINDS
                .iter()
                .zip(&self.refused)
                .map(|(k, c)| (format!("{{reason=\"{k}\"}}"), count(c)))
                .collect::<Vec<_>>(),
        );
        metric(
            "flanneld_lease_rewrites_total",
            "counter",
            "Times another writer changed our lease key and we put ours back.",
            &[(String::new(), count(&self.lease_rewrites))],
        );
        metric(
            "flanneld_repairs_total",
            "counter",
            "Routes, neighbours, FDB entries, devices and rule sets of ours restored after being removed.",
            &[(String::new(), count(&self.repairs))],
        );
        metric(
            "flanneld_stale_routes_removed_total",
            "counter",
            "Routes of ours removed because neither the backend nor a lease justified them.",
            &[(String::new(), count(&self.stale_routes_removed))],
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
                "flanneld_etcd_resets_total",
                "counter",
                "Listings that found etcd wiped or replaced (new cluster ID or revision gone back).",
                &[(String::new(), get(&r.etcd_resets))],
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
            metric(
                "flanneld_datapath_peers",
                "gauge",
                "Peers in the table the packet threads route by.",
                &[(String::new(), get(&s.peers))],
            );
            metric(
                "flanneld_datapath_table_updates_total",
                "counter",
                "Times the packet threads' peer table was replaced.",
                &[(String::new(), get(&s.table_updates))],
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

/// Connections served at once: each costs a descriptor. When all are taken, the one that has
/// waited longest for its request is dropped for the newcomer (see `Waiting`).
const MAX_CONNECTIONS: usize = 64;
/// The request line and headers must arrive within this and fit in `MAX_HEAD` bytes.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_HEAD: usize = 8 * 1024;
/// Writing the reply (a few KiB) must finish within this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept (EMFILE and the like): retrying at once fails again, and the
/// loop would spin a core while the connections wait in the backlog anyway.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Clone, Copy)]
struct Limits {
    connections: usize,
    read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: MAX_CONNECTIONS,
            read_timeout: READ_TIMEOUT,
        }
    }
}

/// Serves `/healthz` and `/metrics` on `addr` until the process exits.
pub async fn serve(addr: SocketAddr, status: Arc<Status>) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    tracing::info!(%addr, "serving /healthz and /metrics");
    spawn_server(listener, status, Limits::default());
    Ok(())
}

fn spawn_server(listener: TcpListener, status: Arc<Status>, limits: Limits) {
    tokio::spawn(accept_loop(listener, status, limits));
}

async fn accept_loop(listener: TcpListener, status: Arc<Status>, limits: Limits) {
    let slots = Arc::new(Semaphore::new(limits.connections));
    let waiting = Arc::new(Waiting::default());
    let mut failures = 0u64;
    loop {
        let conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            // The client gave up before we took its connection: nothing wrong on our side.
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionAborted
                        | ErrorKind::ConnectionReset
                        | ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                // Once per streak: at 10 tries a second a log line each would flood the journal.
                if failures == 0 {
                    tracing::warn!(
                        "accepting /healthz and /metrics connections failed: {e}; retrying every {} ms",
                        ACCEPT_BACKOFF.as_millis()
                    );
                }
                failures += 1;
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        if failures > 0 {
            tracing::info!(
                failures,
                "accepting /healthz and /metrics connections again"
            );
            failures = 0;
        }
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                waiting.evict_oldest();
                match slots.clone().acquire_owned().await {
                    Ok(permit) => permit,
                    Err(_) => return, // never closed
                }
            }
        };
        waiting.spawn(conn, status.clone(), limits.read_timeout, permit);
    }
}

/// Connections still waiting for their request, oldest first. Real clients send theirs at
/// once, so when every slot is taken the oldest of these is idle or hostile, and dropping it
/// keeps a flood of silent connections from locking a probe out for READ_TIMEOUT each.
#[derive(Default)]
struct Waiting(Mutex<WaitingConns>);

#[derive(Default)]
struct WaitingConns {
    next_id: u64,
    conns: VecDeque<(u64, AbortHandle)>,
}

impl Waiting {
    fn lock(&self) -> MutexGuard<'_, WaitingConns> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn spawn(
        self: &Arc<Self>,
        conn: TcpStream,
        status: Arc<Status>,
        read_timeout: Duration,
        permit: OwnedSemaphorePermit,
    ) {
        // Registered under the lock the task needs to deregister, so it cannot do so first.
        let mut w = self.lock();
        let id = w.next_id;
        w.next_id += 1;
        let waiting = self.clone();
        let task = tokio::spawn(async move {
            let _slot = permit;
            handle(conn, &status, read_timeout, || waiting.done(id)).await;
        });
        w.conns.push_back((id, task.abort_handle()));
    }

    fn done(&self, id: u64) {
        self.lock().conns.retain(|(i, _)| *i != id);
    }

    /// Aborting the task drops its connection and its slot.
    fn evict_oldest(&self) {
        let mut w = self.lock();
        while let Some((_, task)) = w.conns.pop_front() {
            if !task.is_finished() {
                task.abort();
                return;
            }
        }
    }
}

/// One connection: its request head, then one reply. `head_read` runs once the head is in
/// (or will never be), when the connection stops being an eviction candidate.
async fn handle(
    mut conn: TcpStream,
    status: &Status,
    read_timeout: Duration,
    head_read: impl FnOnce(),
) {
    let head = tokio::time::timeout(read_timeout, read_head(&mut conn)).await;
    head_read();
    let reply = match head {
        Ok(Ok(head)) => answer(&head, status),
        Ok(Err(HeadError::TooLarge)) => render(
            "431 Request Header Fields Too Large",
            &format!("request line and headers exceed {MAX_HEAD} bytes\n"),
            false,
            None,
        ),
        Ok(Err(HeadError::Incomplete)) => {
            render("400 Bad Request", "incomplete request\n", false, None)
        }
        // Closed without a word, a read error, or too slow: nobody to answer.
        Ok(Err(HeadError::Closed | HeadError::Io)) | Err(_) => return,
    };
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        conn.write_all(&reply).await?;
        conn.shutdown().await
    })
    .await;
}

enum HeadError {
    Closed,
    Incomplete,
    TooLarge,
    Io,
}

/// Reads until the blank line that ends the request head: clients may send it in pieces.
/// What follows it (a body) is ignored.
async fn read_head<R: AsyncRead + Unpin>(conn: &mut R) -> std::result::Result<Vec<u8>, HeadError> {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut filled = 0;
    loop {
        let Some(room) = buf.get_mut(filled..).filter(|r| !r.is_empty()) else {
            return Err(HeadError::TooLarge);
        };
        let n = conn.read(room).await.map_err(|_| HeadError::Io)?;
        if n == 0 {
            return Err(if filled == 0 {
                HeadError::Closed
            } else {
                HeadError::Incomplete
            });
        }
        // The terminator may straddle two reads.
        let from = filled.saturating_sub(3);
        filled += n;
        if let Some(end) = buf.get(from..filled).and_then(head_end) {
            buf.truncate(from + end);
            return Ok(buf);
        }
    }
}

/// Where the head ends: after the first empty line (CRLF CRLF, or bare LF LF as some tools send).
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.iter().enumerate().find_map(|(i, b)| {
        if *b != b'\n' {
            return None;
        }
        match (buf.get(i + 1), buf.get(i + 2)) {
            (Some(b'\n'), _) => Some(i + 2),
            (Some(b'\r'), Some(b'\n')) => Some(i + 3),
            _ => None,
        }
    })
}

/// The whole reply to a complete request head.
fn answer(head: &[u8], status: &Status) -> Vec<u8> {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (Some(method), Some(target), Some(version), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return render("400 Bad Request", "malformed request line\n", false, None);
    };
    if !version.starts_with("HTTP/") {
        return render("400 Bad Request", "malformed request line\n", false, None);
    }
    // Probes and scrapers may add a query (`/metrics?x=1`); routing is on the path alone.
    let path = target.split(['?', '#']).next().unwrap_or(target);
    match method {
        "GET" | "HEAD" => {
            let (code, body) = respond(path, status);
            render(code, &body, method == "HEAD", None)
        }
        _ => render(
            "405 Method Not Allowed",
            "only GET and HEAD are served\n",
            false,
            Some("GET, HEAD"),
        ),
    }
}

/// An HTTP/1.0 reply; HEAD gets GET's headers (its Content-Length included) and no body.
fn render(code: &str, body: &str, head_only: bool, allow: Option<&str>) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.0 {code}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(methods) = allow {
        out.push_str(&format!("Allow: {methods}\r\n"));
    }
    out.push_str("Connection: close\r\n\r\n");
    if !head_only {
        out.push_str(body);
    }
    out.into_bytes()
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

/// The HTTP side, over real loopback sockets.
#[cfg(test)]
mod http_tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read as _, Write as _};
    use std::process::{Command, Stdio};

    async fn start() -> SocketAddr {
        start_with(Limits::default()).await
    }

    async fn start_with(limits: Limits) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        spawn_server(listener, Arc::new(Status::default()), limits);
        addr
    }

    /// Sends `parts` as separate segments (a pause between them), returns the whole reply.
    async fn exchange(addr: SocketAddr, parts: &[&[u8]]) -> String {
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        conn.set_nodelay(true).expect("nodelay");
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            conn.write_all(part).await.expect("send");
        }
        let mut reply = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut reply))
            .await
            .expect("reply in time")
            .expect("read");
        String::from_utf8_lossy(&reply).into_owned()
    }

    fn head_and_body(reply: &str) -> (&str, &str) {
        reply.split_once("\r\n\r\n").unwrap_or((reply, ""))
    }

    #[tokio::test]
    async fn request_split_across_segments_is_read_whole() {
        let addr = start().await;
        let reply = exchange(
            addr,
            &[
                b"GET /met",
                b"rics HTTP/1.1\r\nHost: x\r\n",
                b"Accept: */*\r\n\r\n",
            ],
        )
        .await;
        let (head, body) = head_and_body(&reply);
        assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{reply}");
        assert!(body.contains("# TYPE flanneld_peers gauge"), "{reply}");
    }

    #[tokio::test]
    async fn query_string_is_ignored_for_routing() {
        let addr = start().await;
        let reply = exchange(addr, &[b"GET /metrics?x=1 HTTP/1.1\r\n\r\n"]).await;
        assert!(reply.starts_with("HTTP/1.0 200 OK\r\n"), "{reply}");
        let reply = exchange(addr, &[b"GET /healthz?verbose HTTP/1.0\r\n\r\n"]).await;
        assert!(reply.starts_with("HTTP/1.0 503 "), "{reply}");
    }

    #[tokio::test]
    async fn head_gets_headers_only() {
        let addr = start().await;
        let reply = exchange(addr, &[b"HEAD /metrics HTTP/1.1\r\n\r\n"]).await;
        let (head, body) = head_and_body(&reply);
        assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{reply}");
        assert_eq!(body, "", "{reply}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|v| v.parse().ok())
            .expect("Content-Length");
        assert!(length > 100, "the length GET would send: {reply}");
    }

    #[tokio::test]
    async fn other_methods_get_405_with_allow() {
        let addr = start().await;
        for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
            let req = format!("{method} /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello");
            let reply = exchange(addr, &[req.as_bytes()]).await;
            let (head, _) = head_and_body(&reply);
            assert!(head.starts_with("HTTP/1.0 405 "), "{method}: {reply}");
            assert!(head.contains("\r\nAllow: GET, HEAD"), "{method}: {reply}");
        }
    }

    #[tokio::test]
    async fn oversized_or_garbled_requests_are_refused() {
        let addr = start().await;
        let mut big = b"GET /metrics HTTP/1.1\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'a', 9000));
        let reply = exchange(addr, &[&big]).await;
        assert!(reply.starts_with("HTTP/1.0 431 "), "{reply}");
        let reply = exchange(addr, &[b"hello\r\n\r\n"]).await;
        assert!(reply.starts_with("HTTP/1.0 400 "), "{reply}");
    }

    #[tokio::test]
    async fn idle_connections_cannot_lock_out_a_probe() {
        let addr = start_with(Limits {
            connections: 4,
            read_timeout: Duration::from_secs(60),
        })
        .await;
        let mut idle = Vec::new();
        for _ in 0..4 {
            idle.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let reply = tokio::time::timeout(
            Duration::from_secs(5),
            exchange(addr, &[b"GET /healthz HTTP/1.0\r\n\r\n"]),
        )
        .await
        .expect("answered although silent connections hold every slot");
        assert!(reply.starts_with("HTTP/1.0 503 "), "{reply}");
        // The one that had waited longest made room.
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), idle[0].read(&mut byte))
            .await
            .expect("oldest idle connection closed");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }

    #[tokio::test]
    async fn slow_requests_are_cut_off() {
        let addr = start_with(Limits {
            connections: 4,
            read_timeout: Duration::from_millis(300),
        })
        .await;
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        conn.write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .expect("send");
        let started = std::time::Instant::now();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut byte))
            .await
            .expect("closed after the read timeout");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert!(started.elapsed() >= Duration::from_millis(250));
    }

    const CHILD: &str = "FLANNELD_RS_STATUS_EMFILE_CHILD";

    /// Not a test by itself: the process `accept_errors_back_off_instead_of_spinning` runs.
    /// Serves with a file limit a few descriptors above what it holds, prints its port, and
    /// lives until its stdin closes.
    #[test]
    fn emfile_child() {
        if std::env::var_os(CHILD).is_none() {
            return;
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let addr = rt.block_on(start());
        // New descriptors take the lowest free numbers and must stay below the limit; ones
        // inherited above it (a jobserver pipe) stay usable and do not count.
        let open: Vec<u64> = std::fs::read_dir("/proc/self/fd")
            .expect("fds")
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        let lowest_free = (0..).find(|fd| !open.contains(fd)).unwrap_or(0);
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit with a valid pointer to a live rlimit.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
            limit.rlim_cur = lowest_free + 8;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
        println!("PORT {} LIMIT {}", addr.port(), limit.rlim_cur);
        std::io::stdout().flush().expect("flush");
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }

    /// User plus system CPU time of a process, from /proc.
    fn cpu_time(pid: u32) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        // Fields after the command name (which may hold spaces): state is field 3, so utime
        // (14) and stime (15) are the 12th and 13th after it.
        let rest = stat.rsplit_once(')').expect("comm").1;
        let fields: Vec<u64> = rest
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_millis((fields[11] + fields[12]) * 1000 / hz)
    }

    #[test]
    fn accept_errors_back_off_instead_of_spinning() {
        let exe = std::env::current_exe().expect("exe");
        let mut child = Command::new(exe)
            .args([
                "--exact",
                "status::http_tests::emfile_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("stdout");
        // libtest prints "test <name> ... " on the same line first.
        let (port, limit): (u16, u64) = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| {
                let mut words = l.split("PORT ").nth(1)?.split(" LIMIT ");
                Some((
                    words.next()?.parse().ok()?,
                    words.next()?.trim().parse().ok()?,
                ))
            })
            .expect("child's port and limit");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));

        // More connections than the child has descriptors for: the rest wait in its backlog
        // and every accept fails with EMFILE.
        let flood: Vec<std::net::TcpStream> = (0..32)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let fds: Vec<u64> = std::fs::read_dir(format!("/proc/{}/fd", child.id()))
            .expect("child's fds")
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        let out_of_fds = (0..limit).all(|fd| fds.contains(&fd));
        let before = cpu_time(child.id());
        std::thread::sleep(Duration::from_secs(2));
        let used = cpu_time(child.id()).saturating_sub(before);
        drop(flood);

        // Once the flood is gone its descriptors come back and the server answers again.
        let reply = (|| -> std::io::Result<String> {
            let mut conn = std::net::TcpStream::connect(addr)?;
            conn.set_read_timeout(Some(Duration::from_secs(10)))?;
            conn.write_all(b"GET /healthz HTTP/1.0\r\n\r\n")?;
            let mut reply = String::new();
            conn.read_to_string(&mut reply)?;
            Ok(reply)
        })();
        let _ = child.kill();
        let _ = child.wait();
        eprintln!("child CPU during 2 s of EMFILE: {used:?}");
        assert!(
            out_of_fds,
            "the child never ran out of descriptors: {fds:?}"
        );
        // A spinning loop gets 0.3 s and more even on a loaded machine; backing off, ~0.
        assert!(
            used < Duration::from_millis(100),
            "the accept loop spins on EMFILE: {used:?} of CPU in 2 s"
        );
        let reply = reply.expect("healthz after the flood");
        assert!(reply.starts_with("HTTP/1.0 503 "), "{reply}");
    }
}
