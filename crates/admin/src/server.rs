//! The hyper server and its routes.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use pglb_config::Secret;
use pglb_health::TopologyHandle;
use pglb_proxy::{gate_open, AcceptGate, Contexts};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
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
    pub topology: TopologyHandle,
    pub metrics: PrometheusHandle,
    /// Set once shutdown begins: `/health` turns 503.
    pub draining: AtomicBool,
    /// The data path's listeners and sessions; admin only reads plain views.
    pub data_path: Arc<Contexts>,
    pub live: ArcSwap<LiveConfig>,
    /// Bearer token for mutating endpoints, when configured.
    pub token: ArcSwap<Option<Secret>>,
    /// `POST /upgrade`: asks the running pglb to start its binary anew and
    /// hand over; the reply says how it went.
    pub upgrade: mpsc::Sender<UpgradeRequest>,
}

/// An upgrade asked for over the admin endpoint: answered with the new
/// process's pid, or why the upgrade failed (this pglb keeps serving).
pub type UpgradeRequest = oneshot::Sender<Result<u32, String>>;

/// Serves admin requests on `listener` until `shutdown` fires, while `gate`
/// is open (an upgrade hands the socket to the new process). At shutdown,
/// requests in progress are answered (an upgrade's outcome among them) and
/// idle keep-alive connections closed, waiting at most 2 s.
pub async fn serve(listener: TcpListener, state: Arc<AdminContext>, shutdown: CancellationToken, gate: AcceptGate) {
    let connections = TaskTracker::new();
    accept(listener, state, &shutdown, gate, &connections).await;
    connections.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), connections.wait()).await;
}

async fn accept(
    listener: TcpListener,
    state: Arc<AdminContext>,
    shutdown: &CancellationToken,
    mut gate: AcceptGate,
    connections: &TaskTracker,
) {
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
                tracing::warn!(error = %err, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (state, stop) = (state.clone(), shutdown.clone());
        connections.spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(err) = ended {
                tracing::debug!(error = %err, "admin connection ended with an error");
            }
        });
    }
}

async fn route(state: &AdminContext, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["metrics"]) => reply(StatusCode::OK, "text/plain; version=0.0.4", metrics_text(state)),
        (&Method::GET, ["health"]) => {
            if state.draining.load(Ordering::Relaxed) {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "shutting down\n".into())
            } else {
                reply(StatusCode::OK, "text/plain", "ok\n".into())
            }
        }
        (&Method::GET, ["status"]) => {
            let table = state.topology.table.load();
            let body = crate::status_json(&table, &state.live.load(), &state.data_path.listeners(), &state.topology);
            reply(StatusCode::OK, "application/json", body)
        }
        (&Method::GET, ["connections"]) => {
            reply(StatusCode::OK, "application/json", crate::connections_json(&state.data_path.session_views()))
        }
        (&Method::POST, ["backends", name, action]) => {
            if !authorized(state, &req) {
                return json_error(
                    StatusCode::UNAUTHORIZED,
                    "this endpoint needs `Authorization: Bearer <admin token>`",
                );
            }
            let outcome = crate::actions::run(&state.topology.commands, name, action).await;
            let status = StatusCode::from_u16(outcome.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            reply(status, "application/json", outcome.body)
        }
        (&Method::POST, ["upgrade"]) => {
            if !authorized(state, &req) {
                return json_error(
                    StatusCode::UNAUTHORIZED,
                    "this endpoint needs `Authorization: Bearer <admin token>`",
                );
            }
            upgrade(state).await
        }
        (_, ["metrics" | "health" | "status" | "connections"]) => json_error(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
        (_, ["upgrade"]) => json_error(StatusCode::METHOD_NOT_ALLOWED, "use POST"),
        (_, ["backends", _, _]) => json_error(StatusCode::METHOD_NOT_ALLOWED, "use POST"),
        _ => json_error(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}")),
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

/// Mutating endpoints need `Authorization: Bearer <token>` when a token is set.
/// The recorder's text, without the series of backends and listeners that
/// are neither configured nor holding a session.
fn metrics_text(state: &AdminContext) -> String {
    let table = state.topology.table.load();
    let in_use = state.data_path.in_use();
    let mut backends: HashSet<&str> = table.backends.iter().map(|b| b.config.name.as_str()).collect();
    let mut listeners: HashSet<&str> = table.listeners.iter().map(|l| l.config.name.as_str()).collect();
    backends.extend(in_use.backends.iter().map(String::as_str));
    listeners.extend(in_use.listeners.iter().map(String::as_str));
    crate::exposition::without_removed(&state.metrics.render(), &backends, &listeners)
}

fn authorized(state: &AdminContext, req: &Request<Incoming>) -> bool {
    let token = state.token.load();
    let Some(token) = token.as_ref() else { return true };
    let given = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if constant_time_eq(given.trim().as_bytes(), token.expose().as_bytes()) => true,
        _ => {
            tracing::warn!(path = %req.uri().path(), "admin action refused: missing or wrong bearer token");
            false
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
