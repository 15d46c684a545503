//! The safety state that must survive a restart of pglb: fences, the
//! highest primary timeline seen (with the system identifier it belongs
//! to), operators' admin states, and the lag evidence that keeps a replica
//! out of a pool (lag gates held shut, "not following since" clocks). Without it, a restarted pglb could let
//! a stale old primary that answers first win rw again, or put a drained
//! node back in rotation. No I/O here: the control crate (`pglb-control`)
//! writes and reads it.

use std::time::SystemTime;

use crate::fence::Fence;
use crate::table::AdminState;

/// What is saved, by backend name and address (a backend that changed
/// address is another node).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SavedState {
    pub system_id: Option<u64>,
    pub max_timeline: u32,
    pub fences: Vec<SavedFence>,
    /// Backends not `enabled`.
    pub admin: Vec<SavedAdmin>,
    /// Replicas a listener's lag gate holds out of its pool.
    pub lagging: Vec<SavedLagging>,
    /// Replicas not following their primary, and since when.
    pub not_following: Vec<SavedNotFollowing>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedLagging {
    pub listener: String,
    pub backend: String,
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedNotFollowing {
    pub backend: String,
    pub address: String,
    /// When it was last seen following (wall clock: it outlives the process).
    pub since: SystemTime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedFence {
    pub backend: String,
    pub address: String,
    pub fence: Fence,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedAdmin {
    pub backend: String,
    pub address: String,
    pub state: AdminState,
}
