//! Data-path metrics: described once, handles cached per listener × backend
//! so the hot path does no label lookups.

use metrics::{describe_counter, describe_gauge, describe_histogram, Counter, Gauge, Histogram, Unit};
use pglb_routing::CloseReason;

use crate::reason::Reject;

/// Registers help text for every data-path metric.
pub fn describe() {
    describe_gauge!("pglb_connections_active", "Client connections being forwarded now, per listener and backend.");
    describe_counter!("pglb_connections_total", "Client connections forwarded to a backend, per listener and backend.");
    describe_counter!("pglb_bytes_total", Unit::Bytes, "Bytes forwarded, per listener, backend and direction.");
    describe_counter!(
        "pglb_backend_connect_failures_total",
        "Failed connection attempts from pglb to a backend, per listener and backend."
    );
    describe_counter!(
        "pglb_backend_login_refusals_total",
        "Logins a backend turned away for its own state (57P03 shutting down or starting up, 57P01) before the client saw an answer: the client was routed again, per listener and backend."
    );
    describe_counter!(
        "pglb_clients_rejected_total",
        "Clients turned away before reaching a backend, per listener and reason."
    );
    describe_counter!("pglb_cancel_requests_total", "Query cancel requests received, per listener.");
    describe_gauge!(
        "pglb_pending_connections",
        "Client connections not forwarding yet (before their first message, held, queued, cancel requests), all listeners."
    );
    describe_gauge!(
        "pglb_pending_connections_limit",
        "limits.max_pending: beyond it new connections are refused at accept (53300)."
    );
    describe_gauge!("pglb_clients_held", "Clients waiting for an eligible backend (hold_timeout), per listener.");
    describe_gauge!("pglb_clients_queued", "Clients waiting under a connection limit (queue_timeout), per listener.");
    describe_histogram!(
        "pglb_client_wait_seconds",
        Unit::Seconds,
        "Time clients waited before being forwarded or refused, per listener and kind (hold, queue)."
    );
    describe_gauge!("pglb_clients_active", "Clients forwarded now, per listener (counted against max_clients).");
    describe_gauge!("pglb_listener_max_clients", "The listener's max_clients (0: none).");
    describe_gauge!("pglb_backend_connections", "Connections pglb has open to the backend now, all listeners.");
    describe_counter!(
        "pglb_sessions_closed_total",
        "Sessions pglb closed itself, per listener and reason (role change, fencing, lag, shutdown...)."
    );
    describe_gauge!("pglb_splice_pipes", "Splice pipes, by state: in_use (held by a session) or pooled.");
    describe_counter!(
        "pglb_splice_fallbacks_total",
        "Times no splice pipe could be had (fd limit, pipe-user-pages-soft) and a session copied instead."
    );
    describe_counter!(
        "pglb_forwarded_sessions_total",
        "Sessions forwarded, per data path: sockmap (kernel), splice or copy."
    );
    describe_counter!(
        "pglb_sockmap_fallbacks_total",
        "Sessions the kernel path could not take (reason: map_full, error), forwarded with splice instead."
    );
    describe_counter!(
        "pglb_sockmap_demotions_total",
        "Sessions moved off the kernel path because their reader fell behind (bytes would queue in kernel memory)."
    );
    describe_counter!(
        "pglb_forward_integrity_errors_total",
        "Sessions on the kernel path reset because their byte counts disagreed, per kind (surplus: bytes duplicated; stuck: bytes lost) and direction."
    );
    for kind in ["surplus", "stuck"] {
        for direction in ["client_to_backend", "backend_to_client"] {
            metrics::counter!("pglb_forward_integrity_errors_total", "kind" => kind, "direction" => direction)
                .increment(0);
        }
    }
    describe_gauge!(
        "pglb_sockmap_sockets",
        "Sockets in the kernel's sockmap now (two per session on the kernel path)."
    );
    describe_counter!(
        "pglb_accept_errors_total",
        "Errors accepting client connections (EMFILE/ENFILE and others), per listener."
    );
}

/// Counts a session forwarded on `path` (sockmap, splice, copy).
pub fn forwarded(path: &'static str) {
    metrics::counter!("pglb_forwarded_sessions_total", "forwarder" => path).increment(1);
}

/// Counts a session the kernel path could not take.
pub fn sockmap_fallback(reason: &'static str) {
    metrics::counter!("pglb_sockmap_fallbacks_total", "reason" => reason).increment(1);
}

/// Counts a session moved off the kernel path (slow reader).
pub fn sockmap_demoted() {
    metrics::counter!("pglb_sockmap_demotions_total").increment(1);
}

/// Counts a session reset because its byte counts disagreed.
pub fn integrity_error(kind: &'static str, direction: &'static str) {
    metrics::counter!("pglb_forward_integrity_errors_total", "kind" => kind, "direction" => direction).increment(1);
}

/// Sockets put in (positive) or taken out of (negative) the kernel map.
/// Added, not set: sessions link and unlink concurrently.
pub fn sockmap_sockets(change: f64) {
    metrics::gauge!("pglb_sockmap_sockets").increment(change);
}

/// Handles for one listener × backend pair.
#[derive(Clone)]
pub struct PairMetrics {
    pub active: Gauge,
    pub total: Counter,
    pub client_to_backend: Counter,
    pub backend_to_client: Counter,
    pub connect_failures: Counter,
    pub refused_logins: Counter,
}

impl PairMetrics {
    /// Handles for the pair; `fresh` registers the series at zero (only for
    /// a pair that has no open session).
    pub fn new(cluster: &str, listener: &str, backend: &str, fresh: bool) -> Self {
        let labels =
            [("cluster", cluster.to_owned()), ("listener", listener.to_owned()), ("backend", backend.to_owned())];
        let bytes = |direction: &'static str| {
            let mut l = labels.to_vec();
            l.push(("direction", direction.to_owned()));
            metrics::counter!("pglb_bytes_total", &l)
        };
        let pair = Self {
            active: metrics::gauge!("pglb_connections_active", &labels),
            total: metrics::counter!("pglb_connections_total", &labels),
            client_to_backend: bytes("client_to_backend"),
            backend_to_client: bytes("backend_to_client"),
            connect_failures: metrics::counter!("pglb_backend_connect_failures_total", &labels),
            refused_logins: metrics::counter!("pglb_backend_login_refusals_total", &labels),
        };
        // Register at start-up: dashboards see zero before the first event.
        if fresh {
            pair.active.set(0.0);
        }
        for c in [
            &pair.total,
            &pair.client_to_backend,
            &pair.backend_to_client,
            &pair.connect_failures,
            &pair.refused_logins,
        ] {
            c.increment(0);
        }
        pair
    }
}

/// Why a cancel request was not passed on: its source sent too many this
/// second, or pglb is shutting down.
pub const CANCEL_REFUSALS: [&str; 2] = ["rate_limited", "draining"];

/// Handles for one listener.
pub struct ListenerMetrics {
    rejected: Vec<Counter>,
    closed: Vec<Counter>,
    pub cancels: Counter,
    /// `pglb_cancel_requests_refused_total` by [`CANCEL_REFUSALS`].
    pub cancels_refused: Vec<Counter>,
    pub accept_errors: Counter,
    pub held: Gauge,
    pub queued: Gauge,
    pub hold_wait: Histogram,
    pub queue_wait: Histogram,
    pub active: Gauge,
}

impl ListenerMetrics {
    /// Handles for the listener; `fresh` zeroes its gauges (a new listener).
    pub fn new(cluster: &str, listener: &str, max_clients: Option<usize>, fresh: bool) -> Self {
        let counters = |name: &'static str, reasons: &[&'static str]| -> Vec<Counter> {
            reasons
                .iter()
                .map(|r| {
                    let c = metrics::counter!(name, "cluster" => cluster.to_owned(), "listener" => listener.to_owned(), "reason" => *r);
                    c.increment(0);
                    c
                })
                .collect()
        };
        let counter = |name: &'static str| {
            let c = metrics::counter!(name, "cluster" => cluster.to_owned(), "listener" => listener.to_owned());
            c.increment(0);
            c
        };
        let gauge = |name: &'static str| {
            let g = metrics::gauge!(name, "cluster" => cluster.to_owned(), "listener" => listener.to_owned());
            if fresh {
                g.set(0.0);
            }
            g
        };
        let wait = |kind: &'static str| {
            let labels =
                [("cluster", cluster.to_owned()), ("listener", listener.to_owned()), ("kind", kind.to_owned())];
            metrics::histogram!("pglb_client_wait_seconds", &labels)
        };
        metrics::gauge!("pglb_listener_max_clients", "cluster" => cluster.to_owned(), "listener" => listener.to_owned())
            .set(max_clients.unwrap_or(0) as f64);
        Self {
            rejected: counters("pglb_clients_rejected_total", &Reject::ALL.map(Reject::as_str)),
            closed: counters("pglb_sessions_closed_total", &CloseReason::ALL.map(CloseReason::as_str)),
            cancels: counter("pglb_cancel_requests_total"),
            cancels_refused: counters("pglb_cancel_requests_refused_total", &CANCEL_REFUSALS),
            accept_errors: counter("pglb_accept_errors_total"),
            held: gauge("pglb_clients_held"),
            queued: gauge("pglb_clients_queued"),
            hold_wait: wait("hold"),
            queue_wait: wait("queue"),
            active: gauge("pglb_clients_active"),
        }
    }

    /// Counts a rejected client.
    pub fn reject(&self, reason: Reject) {
        self.rejected[reason.index()].increment(1);
    }

    /// Counts a session pglb closed.
    pub fn closed(&self, reason: CloseReason) {
        self.closed[reason.index()].increment(1);
    }
}

/// Per-backend gauge of connections from all listeners.
pub fn backend_connections(cluster: &str, backend: &str) -> Gauge {
    metrics::gauge!("pglb_backend_connections", "cluster" => cluster.to_owned(), "backend" => backend.to_owned())
}
