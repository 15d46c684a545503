//! Roles, backend health state, fencing, lag, and the immutable routing table.
//!
//! Pure logic, no I/O: check observations, operator actions and config
//! changes go into a [`Topology`], which builds [`RoutingTable`]s; the proxy
//! asks a [`ListenerRoute`] for candidates in fallback order and a table for
//! each session's [`Verdict`]. Tables are never mutated after they are built;
//! the only shared mutable state is the atomic load counters in
//! [`BackendLoad`], which survive rebuilds.
#![forbid(unsafe_code)]

mod fence;
mod lag;
mod patroni;
mod reason;
mod rejoin;
mod saved;
mod select;
mod shared;
mod state;
mod table;
mod topology;
mod why;

pub use fence::{Fence, FenceChange, FenceKind, Fencing, Identity, IdentitySource};
pub use lag::{lag, Following, GateChange, Lag, LagGate, WalHistory};
pub use patroni::{MemberView, PatroniView, Trust};
pub use reason::CloseReason;
pub use rejoin::Rejoin;
pub use saved::{SavedAdmin, SavedFence, SavedLagging, SavedNotFollowing, SavedState};
pub use select::Cursor;
pub use shared::{ItemKey, ItemValue, NodeKey};
pub use state::{
    BackendState, CheckError, Facts, FailureClass, FailureKind, Health, Observation, ObservedRole, Receiver,
    Thresholds, Transition, Wal,
};
pub use table::{AdminState, BackendEntry, BackendLoad, ListenerRoute, RoutingTable, Verdict};
pub use topology::{ActionError, Event, Topology};
pub use why::unavailable;
