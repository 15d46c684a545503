//! A fleet's shared state through etcd (`shared_state:`): the store the
//! cluster already runs for Patroni, not a protocol of pglb's own. The
//! agent reads and watches the prefix over etcd's v3 JSON gateway and
//! writes each cluster's changes with compare-and-swap; the rules that
//! decide what is written and applied are the control crate's
//! (`pglb_control::fleet`).
#![forbid(unsafe_code)]

mod agent;
mod gateway;
mod watch;

pub use agent::{start, Store, StoreStatus};
pub use gateway::{Gateway, Kv, StoreError, Swap};

/// Describes the store's metrics (once, at start).
pub fn describe_metrics() {
    metrics::describe_gauge!("pglb_shared_state_up", "1 while etcd (shared_state) answers linearizable reads, else 0");
    metrics::describe_gauge!(
        "pglb_shared_state_last_sync_timestamp_seconds",
        metrics::Unit::Seconds,
        "When the shared state was last read whole from etcd (Unix time)"
    );
    metrics::describe_gauge!(
        "pglb_shared_state_pending_changes",
        "Changes made here that etcd does not hold yet (queued while it is unreachable), per cluster"
    );
    metrics::describe_counter!(
        "pglb_shared_state_conflicts_total",
        "Concurrent changes to one shared item, by which prevailed (local or remote), per cluster"
    );
    metrics::describe_counter!(
        "pglb_shared_state_applied_total",
        "Changes other pglb instances shared that were applied here, per cluster"
    );
}
