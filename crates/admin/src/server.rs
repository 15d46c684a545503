//! The hyper server and its routes.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::CONTENT_TYPE;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use pglb_config::Secret;
use pglb_control::TopologyHandle;
use pglb_proxy::{gate_open, AcceptGate, Contexts};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Which config is live.
#[derive(Debug, Clone)]
pub struct LiveConfig {
    pub path: String,
    /// SHA-256 of the file's bytes, hex.
    pub hash: String,
    pub loaded_at: SystemTime,
    /// The last reload (SIGHUP): when, and why it was rejected if it was.
    pub last_reload: Option<Reload>,
}

/// The outcome of one reload.
#[derive(Debug, Clone)]
pub struct Reload {
    pub at: SystemTime,
    /// `None`: applied; `Some`: rejected, the old config kept serving.
    pub error: Option<String>,
}

/// What the admin endpoint reads and acts on.
pub struct AdminContext {
    /// Each cluster's topology task, in config order (a reload replaces the list).
    pub clusters: ArcSwap<Vec<TopologyHandle>>,
    pub metrics: PrometheusHandle,
    /// Set once shutdown begins: `/health` turns 503.
    pub draining: AtomicBool,
    /// The data path's listeners and sessions; admin only reads plain views.
    pub data_path: Arc<Contexts>,
    pub live: ArcSwap<LiveConfig>,
    /// Bearer token for mutating endpoints, when configured: without one,
    /// they are refused (`policy`).
    pub token: ArcSwap<Option<Secret>>,
    /// The admin endpoint listens on loopback only (who may read
    /// `/connections` without the token: `policy`).
    pub loopback: bool,
    /// `POST /upgrade`: asks the running pglb to start its binary anew and
    /// hand over; the reply says how it went.
    pub upgrade: mpsc::Sender<UpgradeRequest>,
    /// The fleet's store (`shared_state:`), for `/status`.
    pub store: Option<Arc<ArcSwap<pglb_store::StoreStatus>>>,
}

/// An upgrade asked for over the admin endpoint: answered with the new
/// process's pid, or why the upgrade failed (this pglb keeps serving).
pub type UpgradeRequest = oneshot::Sender<Result<u32, String>>;

/// How many admin connections are served at once (each may take a slot for
/// at most [`HEADER_WITHIN`] before its request is read), and how many more
/// are given a moment to ask for `/health` only: a flood of slow clients
/// never starves keepalived's check. Beyond both, the oldest of those gives
/// its place to the newest (`HealthOnly`). Both bound the fds the admin
/// endpoint can hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub connections: usize,
    pub health_only: usize,
}

impl Limits {
    /// For a process allowed `fds` open files: at most 1/16 of them for
    /// served connections (64 at most) and 1/8 for `/health`-only ones (512).
    pub fn for_fds(fds: u64) -> Self {
        let part = |div: u64, max: usize, min: usize| usize::try_from(fds / div).unwrap_or(max).clamp(min, max);
        Self { connections: part(16, 64, 4), health_only: part(8, 512, 8) }
    }
}

/// Time a client has to send a request's headers.
pub const HEADER_WITHIN: Duration = Duration::from_secs(5);
/// Longest life of one admin connection (keep-alive included), but for one
/// that waits for an upgrade's outcome.
pub const CONNECTION_WITHIN: Duration = Duration::from_secs(30);
/// Time a connection over the limit has to ask for `/health`.
const HEALTH_ONLY_WITHIN: Duration = Duration::from_secs(1);

/// Runs the admin endpoint on a thread and runtime of its own, off the data
/// path's workers: whatever its clients do, they cost the forwarding nothing
/// but this thread. Serves until `shutdown` fires, while `gate` is open (an
/// upgrade hands the socket to the new process); the receiver completes once
/// it has stopped.
pub fn spawn(
    listener: std::net::TcpListener,
    state: Arc<AdminContext>,
    shutdown: CancellationToken,
    gate: AcceptGate,
    limits: Limits,
) -> std::io::Result<oneshot::Receiver<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (done, stopped) = oneshot::channel();
    std::thread::Builder::new().name("pglb-admin".into()).spawn(move || {
        runtime.block_on(async move {
            match TcpListener::from_std(listener) {
                Ok(listener) => serve(listener, state, shutdown, gate, limits).await,
                Err(err) => tracing::error!(error = %err, "the admin endpoint cannot serve its socket"),
            }
        });
        let _ = done.send(());
    })?;
    Ok(stopped)
}

/// Serves admin requests on `listener` until `shutdown` fires, while `gate`
/// is open. At shutdown, requests in progress are answered (an upgrade's
/// outcome among them) and idle keep-alive connections closed, waiting at
/// most 2 s.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminContext>,
    shutdown: CancellationToken,
    gate: AcceptGate,
    limits: Limits,
) {
    let connections = TaskTracker::new();
    accept(listener, state, &shutdown, gate, &connections, limits).await;
    connections.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), connections.wait()).await;
}

async fn accept(
    listener: TcpListener,
    state: Arc<AdminContext>,
    shutdown: &CancellationToken,
    mut gate: AcceptGate,
    connections: &TaskTracker,
    limits: Limits,
) {
    let served = Arc::new(Semaphore::new(limits.connections));
    let mut health_only = HealthOnly::new(limits.health_only);
    loop {
        if !gate_open(&mut gate, shutdown).await {
            return;
        }
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = gate.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                // EMFILE and the like: wait a little rather than spin.
                tracing::warn!(error = %err, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Ok(slot) = served.clone().try_acquire_owned() {
            let (state, stop) = (state.clone(), shutdown.clone());
            connections.spawn(async move {
                connection(stream, state, stop).await;
                drop(slot);
            });
        } else {
            let state = state.clone();
            let task = connections.spawn(async move {
                crate::health_only::answer(stream, &state, HEALTH_ONLY_WITHIN).await;
            });
            health_only.admit(task.abort_handle());
        }
    }
}

/// The connections over the served limit, oldest first. When there are as
/// many as the limit allows, the oldest gives its place to the newest: it had
/// its moment to ask for `/health`, and a flood must never keep a new
/// connection (keepalived's check) from being read. Dropping a connection
/// ahead of the race between accepting and answering is what made `/health`
/// fail under a flood on a busy machine.
struct HealthOnly {
    limit: usize,
    open: VecDeque<AbortHandle>,
}

impl HealthOnly {
    fn new(limit: usize) -> Self {
        Self { limit: limit.max(1), open: VecDeque::new() }
    }

    fn admit(&mut self, task: AbortHandle) {
        self.open.retain(|t| !t.is_finished());
        while self.open.len() >= self.limit {
            if let Some(oldest) = self.open.pop_front() {
                oldest.abort();
                crate::policy::record(crate::policy::Denied::OverCapacity, "");
            }
        }
        self.open.push_back(task);
    }
}

/// One served connection: headers within [`HEADER_WITHIN`], the whole
/// connection within [`CONNECTION_WITHIN`] (longer only while an upgrade's
/// outcome is awaited).
async fn connection(stream: tokio::net::TcpStream, state: Arc<AdminContext>, stop: CancellationToken) {
    let upgrading = Arc::new(AtomicBool::new(false));
    let service = {
        let (state, upgrading) = (state.clone(), upgrading.clone());
        service_fn(move |req| {
            let (state, upgrading) = (state.clone(), upgrading.clone());
            async move { Ok::<_, Infallible>(route(&state, req, &upgrading).await) }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_WITHIN)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut deadline = tokio::time::Instant::now() + CONNECTION_WITHIN;
    let ended = loop {
        tokio::select! {
            ended = conn.as_mut() => break ended,
            _ = stop.cancelled() => {
                conn.as_mut().graceful_shutdown();
                break tokio::time::timeout(Duration::from_secs(2), conn.as_mut()).await.unwrap_or(Ok(()));
            }
            _ = tokio::time::sleep_until(deadline) => {
                if upgrading.load(Ordering::Relaxed) {
                    deadline += CONNECTION_WITHIN;
                    continue;
                }
                conn.as_mut().graceful_shutdown();
                break tokio::time::timeout(Duration::from_secs(2), conn.as_mut()).await.unwrap_or(Ok(()));
            }
        }
    };
    if let Err(err) = ended {
        tracing::debug!(error = %err, "admin connection ended with an error");
    }
}

async fn route(state: &AdminContext, req: Request<Incoming>, upgrading: &AtomicBool) -> Response<Full<Bytes>> {
    use crate::policy::Need;
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let need = match (req.method(), segments.as_slice()) {
        (&Method::GET, ["connections"]) => Need::Reader,
        (&Method::POST, ["backends", _, _] | ["clusters", _, "backends", _, _] | ["upgrade"]) => Need::Mutation,
        _ => Need::Nothing,
    };
    if let Err(denied) = crate::policy::allowed(state.token.load().as_ref().as_ref(), state.loopback, &req, need) {
        crate::policy::record(denied, &path);
        let status = match denied {
            crate::policy::Denied::NoTokenConfigured => StatusCode::FORBIDDEN,
            crate::policy::Denied::BadToken => StatusCode::UNAUTHORIZED,
            crate::policy::Denied::OverCapacity => StatusCode::SERVICE_UNAVAILABLE,
        };
        return json_error(status, denied.message());
    }
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["metrics"]) => reply(StatusCode::OK, "text/plain; version=0.0.4", metrics_text(state)),
        (&Method::GET, ["health"]) => health(state),
        (&Method::GET, ["status"]) => {
            let body = crate::status_json(
                &state.clusters.load(),
                &state.live.load(),
                &state.data_path.listeners(),
                state.store.as_ref().map(|s| s.load_full()).as_deref(),
            );
            reply(StatusCode::OK, "application/json", body)
        }
        (&Method::GET, ["connections"]) => {
            reply(StatusCode::OK, "application/json", crate::connections_json(&state.data_path.session_views()))
        }
        (&Method::POST, ["backends", name, action]) => {
            let outcome = crate::actions::run(&state.clusters.load(), None, name, action).await;
            let status = StatusCode::from_u16(outcome.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            reply(status, "application/json", outcome.body)
        }
        (&Method::POST, ["clusters", cluster, "backends", name, action]) => {
            let outcome = crate::actions::run(&state.clusters.load(), Some(cluster), name, action).await;
            let status = StatusCode::from_u16(outcome.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            reply(status, "application/json", outcome.body)
        }
        (&Method::POST, ["upgrade"]) => {
            upgrading.store(true, Ordering::Relaxed);
            let answer = upgrade(state).await;
            upgrading.store(false, Ordering::Relaxed);
            answer
        }
        (_, ["metrics" | "health" | "status" | "connections"]) => json_error(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
        (_, ["upgrade"]) => json_error(StatusCode::METHOD_NOT_ALLOWED, "use POST"),
        (_, ["backends", _, _] | ["clusters", _, "backends", _, _]) => {
            json_error(StatusCode::METHOD_NOT_ALLOWED, "use POST")
        }
        _ => json_error(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}")),
    }
}

/// `/health`: 200 while pglb serves, 503 once it is shutting down.
pub(crate) fn health(state: &AdminContext) -> Response<Full<Bytes>> {
    if state.draining.load(Ordering::Relaxed) {
        reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "shutting down\n".into())
    } else {
        reply(StatusCode::OK, "text/plain", "ok\n".into())
    }
}

/// Starts an upgrade and waits for its outcome: 200 with the new pid, 409
/// when one is already under way or this process has handed over, 500 with
/// the reason when it failed (this pglb keeps serving).
async fn upgrade(state: &AdminContext) -> Response<Full<Bytes>> {
    let (reply, outcome) = oneshot::channel();
    if state.upgrade.try_send(reply).is_err() {
        return json_error(StatusCode::CONFLICT, "an upgrade is already under way, or this pglb has handed over");
    }
    match outcome.await {
        Ok(Ok(pid)) => {
            let body = serde_json::json!({ "result": format!("upgraded: pid {pid} serves now; this process finishes its sessions and exits"), "pid": pid });
            reply_json(StatusCode::OK, body)
        }
        Ok(Err(why)) => {
            json_error(StatusCode::INTERNAL_SERVER_ERROR, &format!("upgrade failed: {why}; this pglb keeps serving"))
        }
        Err(_) => json_error(StatusCode::CONFLICT, "this pglb is stopping: no upgrade"),
    }
}

fn reply_json(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    reply(status, "application/json", body.to_string() + "\n")
}

/// The recorder's text, without the series of clusters, backends and
/// listeners that are neither configured nor holding a session.
fn metrics_text(state: &AdminContext) -> String {
    let mut live = crate::exposition::Live::default();
    for topology in state.clusters.load().iter() {
        let table = topology.table.load();
        let cluster = topology.cluster.to_string();
        live.backends.extend(table.backends.iter().map(|b| (cluster.clone(), b.config.name.clone())));
        live.listeners.extend(table.listeners.iter().map(|l| (cluster.clone(), l.config.name.clone())));
        live.clusters.insert(cluster);
    }
    let in_use = state.data_path.in_use();
    for (cluster, name) in in_use.backends {
        live.clusters.insert(cluster.to_string());
        live.backends.insert((cluster.to_string(), name));
    }
    for (cluster, name) in in_use.listeners {
        live.clusters.insert(cluster.to_string());
        live.listeners.insert((cluster.to_string(), name));
    }
    crate::exposition::without_removed(&state.metrics.render(), &live)
}

fn json_error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    reply_json(status, serde_json::json!({ "error": message }))
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    response
}
