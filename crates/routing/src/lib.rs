//! Roles, backend health state, and the immutable routing table.
//!
//! Pure logic, no I/O: health observations go in through [`BackendState`],
//! a [`RoutingTable`] is rebuilt from the config and the states, and the proxy
//! asks a [`ListenerRoute`] for candidates in fallback order. Tables are never
//! mutated after they are built; the only shared mutable state is the atomic
//! load counters in [`BackendLoad`], which survive rebuilds.
#![forbid(unsafe_code)]

mod select;
mod state;
mod table;

pub use select::Cursor;
pub use state::{BackendState, Observation, ObservedRole, Transition};
pub use table::{BackendEntry, BackendLoad, ListenerRoute, RoutingTable};
