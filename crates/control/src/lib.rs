//! The control plane: the topology task, the one writer of the routing
//! table, applies check reports, operators' actions and reloads to the
//! state machine, fencing and lag, and publishes each new table with one
//! atomic swap (the data path reads it without a lock); and the safety
//! state that outlives the process: the state file, and the state handed
//! to a new process in an upgrade. Health checkers report to it; the
//! admin endpoint and the binary send it commands.
#![forbid(unsafe_code)]

pub mod fleet;
mod publisher;
mod table_metrics;

pub mod state_file;

pub use publisher::{Command, Origin, Publisher, TopologyHandle};
pub use table_metrics::{describe_metrics, export_table};
