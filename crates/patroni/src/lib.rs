//! Patroni, read from its REST API: which members a cluster has (and their
//! PostgreSQL addresses and tags), who holds the leader lock, whether the
//! cluster is paused or a standby cluster.
//!
//! Reading is all this crate does. [`Reader`] sends what it learnt to the
//! cluster's topology task ([`pglb_routing::PatroniView`]: the lock is a
//! veto there, never a source of routing) and the member list to whoever
//! runs the cluster's checkers. No answer changes nothing: the last known
//! members stay, and routing falls back on pglb's own checks.
#![forbid(unsafe_code)]

mod answer;
mod client;
mod reader;
mod roster;

pub use answer::{ClusterAnswer, Member};
pub use client::{Client, ClientError};
pub use reader::{describe_metrics, Reader};
pub use roster::{MemberAddress, Roster};
