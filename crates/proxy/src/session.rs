//! One client connection, from its first message to its last byte.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pglb_config::Role;
use pglb_routing::BackendLoad;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::connect::{connect, tune};
use crate::forward::{forward, Counters};
use crate::listener::ListenerContext;
use crate::protocol::{read_first, FirstKind, FirstMessage};
use crate::refuse::refuse;

/// SQLSTATE cannot_connect_now.
const CANNOT_CONNECT_NOW: &str = "57P03";

/// A backend picked for this client, copied out of the routing snapshot so
/// no snapshot is held across an await.
struct Candidate {
    index: usize,
    name: String,
    host: String,
    port: u16,
    load: Arc<BackendLoad>,
}

/// Serves one client until its session ends.
pub async fn run(
    ctx: Arc<ListenerContext>,
    mut client: TcpStream,
    peer: SocketAddr,
    stop: CancellationToken,
) {
    tune(&client);
    let (startup_timeout, connect_timeout, role, fallback) = {
        let table = ctx.table.load();
        let c = &table.listeners[ctx.index].config;
        (c.startup_timeout, c.connect_timeout, c.role, c.fallback)
    };
    let first = match tokio::time::timeout(startup_timeout, read_first(&mut client)).await {
        Ok(Ok(first)) => first,
        Ok(Err(err)) => {
            ctx.metrics.reject(err.kind());
            tracing::debug!(error = %err, "dropped client before startup");
            return;
        }
        Err(_) => {
            ctx.metrics.reject("startup_timeout");
            tracing::debug!(timeout = ?startup_timeout, "dropped client: no startup message in time");
            return;
        }
    };
    if let FirstKind::Cancel { pid } = first.kind {
        tracing::debug!(pid, "cancel request");
        crate::cancel::fan_out(&ctx, &first.bytes).await;
        return;
    }
    let candidates = pick(&ctx);
    if candidates.is_empty() {
        ctx.metrics.reject("no_backend");
        let message = no_backend_message(&ctx.name, role, fallback);
        tracing::info!(reason = %message, "refused client");
        refuse(
            &mut client,
            first,
            CANNOT_CONNECT_NOW,
            &message,
            startup_timeout,
        )
        .await;
        return;
    }
    let Some((candidate, backend)) = connect_any(&ctx, candidates, connect_timeout).await else {
        ctx.metrics.reject("connect_failed");
        let message = format!(
            "pglb: cannot connect to any backend for listener \"{}\"",
            ctx.name
        );
        refuse(
            &mut client,
            first,
            CANNOT_CONNECT_NOW,
            &message,
            startup_timeout,
        )
        .await;
        return;
    };
    relay(&ctx, client, backend, candidate, first, peer, stop).await;
}

/// The current candidates, in the order to try them.
fn pick(ctx: &ListenerContext) -> Vec<Candidate> {
    let table = ctx.table.load();
    let route = &table.listeners[ctx.index];
    route
        .candidates(&table, &ctx.cursor)
        .into_iter()
        .map(|i| {
            let b = &table.backends[i];
            Candidate {
                index: i,
                name: b.config.name.clone(),
                host: b.config.host.clone(),
                port: b.config.port,
                load: b.load.clone(),
            }
        })
        .collect()
}

fn no_backend_message(listener: &str, role: Role, fallback: Option<Role>) -> String {
    let what = match (role, fallback) {
        (Role::Replica, Some(f)) => format!("replica (nor {} fallback)", f.as_str()),
        (Role::Any, _) => "backend".to_owned(),
        (r, _) => r.as_str().to_owned(),
    };
    format!("pglb: no healthy {what} for listener \"{listener}\"")
}

/// Tries candidates in order; a refused or timed-out connect moves on.
async fn connect_any(
    ctx: &ListenerContext,
    candidates: Vec<Candidate>,
    timeout: Duration,
) -> Option<(Candidate, TcpStream)> {
    for candidate in candidates {
        match connect(&candidate.host, candidate.port, timeout).await {
            Ok(stream) => return Some((candidate, stream)),
            Err(err) => {
                if let Some(pair) = ctx.pairs.get(candidate.index) {
                    pair.connect_failures.increment(1);
                }
                tracing::warn!(backend = %candidate.name, error = %err, "cannot connect to backend; trying the next one");
            }
        }
    }
    None
}

/// Passes the first message on and forwards until the session ends.
async fn relay(
    ctx: &ListenerContext,
    client: TcpStream,
    mut backend: TcpStream,
    candidate: Candidate,
    first: FirstMessage,
    peer: SocketAddr,
    stop: CancellationToken,
) {
    let Some(pair) = ctx.pairs.get(candidate.index) else {
        return;
    };
    let started = Instant::now();
    let local_port = backend.local_addr().map(|a| a.port()).unwrap_or(0);
    let _open = OpenSession::new(ctx, &candidate);
    if let Err(err) = backend.write_all(&first.bytes).await {
        tracing::warn!(backend = %candidate.name, error = %err, "backend closed before startup");
        return;
    }
    pair.client_to_backend.increment(first.bytes.len() as u64);
    let counters = Counters {
        client_to_backend: pair.client_to_backend.clone(),
        backend_to_client: pair.backend_to_client.clone(),
    };
    let outcome = forward(client, backend, ctx.pipes.as_deref(), &counters, &stop).await;
    tracing::debug!(
        client = %peer,
        backend = %candidate.name,
        backend_local_port = local_port,
        duration_s = started.elapsed().as_secs_f64(),
        bytes_client_to_backend = outcome.client_to_backend + first.bytes.len() as u64,
        bytes_backend_to_client = outcome.backend_to_client,
        end = outcome.end.as_str(),
        "session closed"
    );
}

/// Counts a session as open on its backend for as long as it lives.
struct OpenSession<'a> {
    ctx: &'a ListenerContext,
    index: usize,
    load: Arc<BackendLoad>,
}

impl<'a> OpenSession<'a> {
    fn new(ctx: &'a ListenerContext, candidate: &Candidate) -> Self {
        candidate.load.open();
        if let Some(h) = ctx.holding.get(candidate.index) {
            h.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(pair) = ctx.pairs.get(candidate.index) {
            pair.active.increment(1.0);
            pair.total.increment(1);
        }
        Self {
            ctx,
            index: candidate.index,
            load: candidate.load.clone(),
        }
    }
}

impl Drop for OpenSession<'_> {
    fn drop(&mut self) {
        self.load.close();
        if let Some(h) = self.ctx.holding.get(self.index) {
            h.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(pair) = self.ctx.pairs.get(self.index) {
            pair.active.decrement(1.0);
        }
    }
}
