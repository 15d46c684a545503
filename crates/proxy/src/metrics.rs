//! Data-path metrics: described once, handles cached per listener × backend
//! so the hot path does no label lookups.

use metrics::{describe_counter, describe_gauge, Counter, Gauge, Unit};

/// Reasons a client is turned away; a closed set of label values.
pub const REJECT_REASONS: [&str; 5] = [
    "no_backend",
    "connect_failed",
    "startup_timeout",
    "bad_startup",
    "client_closed",
];

/// Registers help text for every data-path metric.
pub fn describe() {
    describe_gauge!(
        "pglb_connections_active",
        "Client connections being forwarded now, per listener and backend."
    );
    describe_counter!(
        "pglb_connections_total",
        "Client connections forwarded to a backend, per listener and backend."
    );
    describe_counter!(
        "pglb_bytes_total",
        Unit::Bytes,
        "Bytes forwarded, per listener, backend and direction."
    );
    describe_counter!(
        "pglb_backend_connect_failures_total",
        "Failed connection attempts from pglb to a backend, per listener and backend."
    );
    describe_counter!(
        "pglb_clients_rejected_total",
        "Clients turned away before reaching a backend, per listener and reason."
    );
    describe_counter!(
        "pglb_cancel_requests_total",
        "Query cancel requests received, per listener."
    );
    describe_gauge!("pglb_splice_pipes", "Splice pipes, by state: in_use (held by a session) or pooled.");
    describe_counter!(
        "pglb_splice_fallbacks_total",
        "Times no splice pipe could be had (fd limit, pipe-user-pages-soft) and a session copied instead."
    );
    describe_counter!(
        "pglb_accept_errors_total",
        "Errors accepting client connections (EMFILE/ENFILE and others), per listener."
    );
}

/// Handles for one listener × backend pair.
#[derive(Clone)]
pub struct PairMetrics {
    pub active: Gauge,
    pub total: Counter,
    pub client_to_backend: Counter,
    pub backend_to_client: Counter,
    pub connect_failures: Counter,
}

impl PairMetrics {
    pub fn new(listener: &str, backend: &str) -> Self {
        let labels = [
            ("listener", listener.to_owned()),
            ("backend", backend.to_owned()),
        ];
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
        };
        // Register at start-up: dashboards see zero before the first event.
        pair.active.set(0.0);
        for c in [
            &pair.total,
            &pair.client_to_backend,
            &pair.backend_to_client,
            &pair.connect_failures,
        ] {
            c.increment(0);
        }
        pair
    }
}

/// Handles for one listener.
pub struct ListenerMetrics {
    rejected: Vec<Counter>,
    pub cancels: Counter,
    pub accept_errors: Counter,
}

impl ListenerMetrics {
    pub fn new(listener: &str) -> Self {
        let rejected = REJECT_REASONS
            .iter()
            .map(|r| {
                let c = metrics::counter!("pglb_clients_rejected_total", "listener" => listener.to_owned(), "reason" => *r);
                c.increment(0);
                c
            })
            .collect();
        let cancels =
            metrics::counter!("pglb_cancel_requests_total", "listener" => listener.to_owned());
        let accept_errors =
            metrics::counter!("pglb_accept_errors_total", "listener" => listener.to_owned());
        cancels.increment(0);
        accept_errors.increment(0);
        Self {
            rejected,
            cancels,
            accept_errors,
        }
    }

    /// Counts a rejected client; `reason` must be one of [`REJECT_REASONS`].
    pub fn reject(&self, reason: &str) {
        if let Some(i) = REJECT_REASONS.iter().position(|r| *r == reason) {
            self.rejected[i].increment(1);
        }
    }
}
