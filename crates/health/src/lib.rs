//! Health checking: one task per backend keeps a logged-in PostgreSQL
//! connection (trust, md5, SCRAM-SHA-256; TLS per `health.sslmode`), asks
//! role, timeline, system identifier, WAL positions and the WAL receiver's
//! state, classifies failures as evidence, silence or monitoring failures,
//! and reports to the control plane's topology task (`pglb-control`), which
//! applies the state machine, fencing and lag and publishes routing tables.
#![forbid(unsafe_code)]

mod check;
mod checker;
mod classify;
mod metrics;
mod tls;

pub use checker::spawn_checker;
pub use metrics::describe_metrics;
pub use tls::{make_tls, TlsError};
