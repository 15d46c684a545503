//! Real local PostgreSQL clusters — a primary and streaming replicas made
//! with initdb and pg_basebackup — for `pglb demo` and the tests.
//!
//! Clusters live in a temp dir owned by the OS user `postgres` when run as
//! root (PostgreSQL refuses to run as root), listen on loopback only, and are
//! stopped and removed on drop. Leftovers of a process that died are swept
//! the next time a cluster starts.
#![forbid(unsafe_code)]

mod cluster;
mod env;
mod node;
mod ports;

pub use cluster::{Cluster, ClusterError, Spec};
pub use env::{pg_bin, PgUser};
pub use node::Node;
pub use ports::free_port;
