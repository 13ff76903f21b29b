//! `/healthz`, `/readyz` and `/metrics` over HTTP on TCP ports (what Flannel serves there), and
//! those with `/status` and the policy API (`/v1/...`) on a Unix socket beside the subnet file
//! (what `flanneld-rs status` and the CNI plugin use): routing, methods (HEAD,
//! 405 with `Allow`) and the request parsing are axum's and hyper's. The accept loop is ours
//! because the endpoints must keep answering when the process runs out of descriptors or is
//! flooded with idle connections (a liveness probe that times out restarts the node's
//! networking).

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::extract::{Path as UrlPath, Query};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, put};
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;

use super::{metrics, Status};

/// Connections served at once: each costs a descriptor. When all are taken, the one that has
/// waited longest for its request, or else one whose answer is stuck, is dropped for the
/// newcomer (see `Waiting`).
const MAX_CONNECTIONS: usize = 64;
/// The request line and headers must arrive within this.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Request line and headers larger than this get 431 (hyper's smallest buffer is 8 KiB).
const MAX_HEAD: usize = 8 * 1024;
/// A whole exchange (request in, reply of a few KiB out) must finish within this.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (EMFILE and the like): retrying at once fails again, and the
/// loop would spin a core while the connections wait in the backlog anyway.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// With every slot taken and no connection still waiting for its request, one whose answer
/// has been going out this long is a client not reading it (a reply is written at once to
/// anyone who reads): it makes room, so a probe waits this long at worst, not
/// `CONNECTION_TIMEOUT`. Looked at again this often while the slots stay full.
const STUCK_ANSWER: Duration = Duration::from_millis(500);
const EVICT_RETRY: Duration = Duration::from_millis(100);

#[derive(Clone, Copy)]
pub(super) struct Limits {
    pub connections: usize,
    pub read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: MAX_CONNECTIONS,
            read_timeout: READ_TIMEOUT,
        }
    }
}

/// What the handlers read.
struct Served {
    status: Arc<Status>,
    registry: Registry,
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `addr` until the process exits.
pub async fn serve(addr: SocketAddr, status: Arc<Status>) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    spawn_server(listener, status, Limits::default(), Endpoints::Probes);
    Ok(())
}

/// Serves those endpoints, `/status` and the policy API on a Unix socket at `path` (mode 0600), replacing a stale one:
/// the caller holds the single-instance lock, so no other daemon can be using it.
pub async fn serve_unix(path: &Path, status: Arc<Status>) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing the stale {}", path.display())),
    }
    let listener = bind_private(path)?;
    tracing::info!(socket = %path.display(), "serving flanneld-rs status");
    spawn_server(listener, status, Limits::default(), Endpoints::All);
    Ok(())
}

/// Binds a Unix socket at `path` that only root can connect to from its first moment: it is
/// made (and restricted to 0600) in a directory of its own that only root can enter, then
/// moved into place. Bound at `path` directly, it would take connections from anyone between
/// the bind and the chmod, and those reach the policy API.
fn bind_private(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let mut hidden = name.to_os_string();
    hidden.push(format!(".{}.tmp", std::process::id()));
    let dir = path.with_file_name(hidden);
    // A leftover from a daemon that died here with our pid (a container restart).
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("making {}", dir.display()))?;
    let bound = (|| {
        let inside = dir.join(name);
        let listener = UnixListener::bind(&inside)
            .with_context(|| format!("listening on {}", inside.display()))?;
        std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", inside.display()))?;
        std::fs::rename(&inside, path)
            .with_context(|| format!("moving the socket to {}", path.display()))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    bound
}

/// What a listener serves. The TCP ports are open to every pod and host that reaches the node
/// (`--healthz-ip` is 0.0.0.0 by default, the manifest runs on the host's network): there a
/// `PUT /v1/pods/...` would let anyone publish pod records with labels of their choosing (and so
/// pass policies) and `/status` would tell them about every peer. Those stay on the Unix socket,
/// which only root can open (mode 0600).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Endpoints {
    /// `/healthz`, `/readyz`, `/metrics`: what Flannel serves, for probes and scrapers.
    Probes,
    /// Those, `/status` and `/v1/...`.
    All,
}

pub(super) fn spawn_server<L: Listener>(
    listener: L,
    status: Arc<Status>,
    limits: Limits,
    endpoints: Endpoints,
) {
    let registry = metrics::registry(status.clone());
    let app = router(Arc::new(Served { status, registry }), endpoints);
    tokio::spawn(accept_loop(listener, app, limits));
}

/// A socket that hands out connections: TCP for probes and scrapers, Unix for `status`.
pub(super) trait Listener: Send + 'static {
    type Conn: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept_conn(&self) -> impl Future<Output = io::Result<Self::Conn>> + Send;
}

impl Listener for TcpListener {
    type Conn = tokio::net::TcpStream;
    async fn accept_conn(&self) -> io::Result<Self::Conn> {
        self.accept().await.map(|(c, _)| c)
    }
}

impl Listener for UnixListener {
    type Conn = tokio::net::UnixStream;
    async fn accept_conn(&self) -> io::Result<Self::Conn> {
        self.accept().await.map(|(c, _)| c)
    }
}

fn router(served: Arc<Served>, endpoints: Endpoints) -> Router {
    let probes = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(scrape));
    let routes = match endpoints {
        Endpoints::Probes => probes,
        Endpoints::All => probes
            .route("/status", get(status_report))
            .route("/v1/pods/{ns}/{name}", put(put_pod).delete(delete_pod))
            .route("/v1/policy/status", get(policy_status))
            .route("/v1/policy/explain", get(policy_explain)),
    };
    routes.fallback(not_found).with_state(served)
}

/// Flannel's liveness: the process answers.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Flannel v0.28.9's readiness: 503 with the reason until the node carries pod traffic.
async fn readyz(State(served): State<Arc<Served>>) -> (StatusCode, String) {
    match served.status.readiness() {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn scrape(State(served): State<Arc<Served>>, headers: HeaderMap) -> impl IntoResponse {
    if let Some(p) = policy(&served) {
        p.refresh_counters().await;
    }
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let (content_type, body) = metrics::render(&served.registry, accept);
    ([(header::CONTENT_TYPE, content_type)], body)
}

/// `flanneld-rs status`'s snapshot, as JSON.
async fn status_report(State(served): State<Arc<Served>>) -> axum::response::Response {
    let report = served.status.report().await;
    match serde_json::to_string(&report) {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

fn policy(served: &Served) -> Option<Arc<crate::policy::Policy>> {
    served.status.policy.get().cloned()
}

async fn put_pod(
    State(served): State<Arc<Served>>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    body: axum::body::Bytes,
) -> axum::response::Response {
    crate::policy::api::put_pod(policy(&served), ns, name, &body).await
}

async fn delete_pod(
    State(served): State<Arc<Served>>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> axum::response::Response {
    crate::policy::api::delete_pod(policy(&served), ns, name, query).await
}

async fn policy_status(State(served): State<Arc<Served>>) -> axum::response::Response {
    crate::policy::api::status(policy(&served)).await
}

async fn policy_explain(
    State(served): State<Arc<Served>>,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> axum::response::Response {
    crate::policy::api::explain(policy(&served), query).await
}

async fn not_found() -> (StatusCode, &'static str) {
    (
        StatusCode::NOT_FOUND,
        "try /healthz, /readyz or /metrics (/status is on the daemon's socket)\n",
    )
}

async fn accept_loop<L: Listener>(listener: L, app: Router, limits: Limits) {
    let slots = Arc::new(Semaphore::new(limits.connections));
    let waiting = Arc::new(Waiting::default());
    let mut failures = 0u64;
    loop {
        let conn = match listener.accept_conn().await {
            Ok(conn) => conn,
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
        let permit = loop {
            if let Ok(permit) = slots.clone().try_acquire_owned() {
                break permit;
            }
            waiting.evict_oldest();
            match tokio::time::timeout(EVICT_RETRY, slots.clone().acquire_owned()).await {
                Ok(Ok(permit)) => break permit,
                Ok(Err(_)) => return, // never closed
                Err(_) => {}          // none freed: one may have been stuck long enough now
            }
        };
        waiting.spawn(conn, app.clone(), limits.read_timeout, permit);
    }
}

/// The open connections, oldest first, each waiting for its request, being handled (a pod
/// record waiting for etcd: never dropped), or having its answer written (since when). Real
/// clients send theirs at once and read the answer as it comes, so when every slot is taken
/// the oldest waiting one is idle or hostile, and so is one whose answer has not gone out
/// within `STUCK_ANSWER`: dropping it keeps a flood of silent or non-reading connections from
/// locking a probe out.
#[derive(Default)]
struct Waiting(Mutex<WaitingConns>);

#[derive(Default)]
struct WaitingConns {
    next_id: u64,
    conns: VecDeque<Conn>,
}

struct Conn {
    id: u64,
    task: AbortHandle,
    stage: Stage,
}

#[derive(Clone, Copy, PartialEq)]
enum Stage {
    Waiting,
    Handling,
    /// The answer is being written, since then.
    Answering(std::time::Instant),
}

impl Waiting {
    fn lock(&self) -> MutexGuard<'_, WaitingConns> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn spawn<C: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        self: &Arc<Self>,
        conn: C,
        app: Router,
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
            // The request has arrived once the router sees it, and its answer is being written
            // once the handler returns it.
            let (seen, answered) = (waiting.clone(), waiting.clone());
            let app = tower::ServiceExt::map_request(app, move |req| {
                seen.to_stage(id, Stage::Handling);
                req
            });
            let app = tower::ServiceExt::map_response(app, move |resp| {
                answered.to_stage(id, Stage::Answering(std::time::Instant::now()));
                resp
            });
            let exchange = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(read_timeout)
                .max_buf_size(MAX_HEAD)
                .keep_alive(false)
                .serve_connection(TokioIo::new(conn), TowerToHyperService::new(app));
            // Errors are the client's (gone, garbled, too slow): hyper has answered what
            // deserved an answer, and there is nobody to tell about the rest.
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, exchange).await;
            waiting.done(id);
        });
        w.conns.push_back(Conn {
            id,
            task: task.abort_handle(),
            stage: Stage::Waiting,
        });
    }

    fn to_stage(&self, id: u64, stage: Stage) {
        if let Some(c) = self.lock().conns.iter_mut().find(|c| c.id == id) {
            c.stage = stage;
        }
    }

    fn done(&self, id: u64) {
        self.lock().conns.retain(|c| c.id != id);
    }

    /// Drops the oldest connection still waiting for its request, else the oldest whose
    /// answer has been stuck past `STUCK_ANSWER`, if any (never one being handled). Aborting
    /// the task drops its connection and its slot.
    fn evict_oldest(&self) {
        let mut w = self.lock();
        w.conns.retain(|c| !c.task.is_finished());
        let victim = w
            .conns
            .iter()
            .position(|c| c.stage == Stage::Waiting)
            .or_else(|| {
                w.conns.iter().position(
                    |c| matches!(c.stage, Stage::Answering(t) if t.elapsed() >= STUCK_ANSWER),
                )
            });
        if let Some(c) = victim.and_then(|i| w.conns.remove(i)) {
            c.task.abort();
        }
    }
}

#[cfg(test)]
#[path = "http_tests.rs"]
mod tests;
