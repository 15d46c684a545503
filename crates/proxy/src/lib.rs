//! The data path: listeners accept clients, read the PostgreSQL client's
//! first message, pick a backend from the current routing table (a lock-free
//! load), connect, and hand both sockets to a forwarder.
//!
//! Only `forward::splice` may use `unsafe`; everything else forbids it.
#![deny(unsafe_code)]

mod address;
mod budget;
mod by_name;
mod cancel;
mod connect;
mod contexts;
pub mod forward;
mod listener;
mod metrics;
mod pace;
pub mod protocol;
mod rate;
mod reason;
mod refuse;
mod registry;
mod session;
pub mod sni;
mod wait;

pub use address::AddressGroup;
pub use budget::{AddressShare, Budget, Over, Pending};
pub use cancel::CANCELS_PER_SECOND;
pub use contexts::{Contexts, InUse, ListenerView, SessionView};
pub use forward::PipePool;
pub use listener::{bind, gate_open, serve, AcceptGate, ListenerContext, Shared};
pub use metrics::describe as describe_metrics;
pub use reason::{Reject, Side};
pub use registry::{Registry, SessionHandle};
pub use wait::Capacity;
