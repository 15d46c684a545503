//! Health checking: one task per backend logs in over the PostgreSQL protocol
//! (trust, md5, SCRAM-SHA-256; TLS per `health.sslmode`), asks
//! `pg_is_in_recovery()`, and reports the observation to the [`Topology`],
//! the single writer that applies rise/fall and publishes routing tables.
#![forbid(unsafe_code)]

mod check;
mod checker;
mod tls;
mod topology;

pub use check::check_once;
pub use checker::spawn_checkers;
pub use tls::{make_tls, TlsError};
pub use topology::{export_state, Report, Topology};

/// Registers help text for the health metrics.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        "pglb_backend_up",
        "1 if the backend passes health checks, else 0."
    );
    describe_gauge!(
        "pglb_backend_role",
        "1 for the backend's current role (primary, replica, unknown), else 0."
    );
    describe_histogram!(
        "pglb_health_check_duration_seconds",
        Unit::Seconds,
        "Time of one health check: connect, login and query."
    );
    describe_counter!(
        "pglb_health_check_failures_total",
        "Health checks that failed, per backend."
    );
}
