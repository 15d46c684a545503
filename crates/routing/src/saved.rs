//! The safety state that must survive a restart of pglb: fences, the
//! highest primary timeline seen (with the system identifier it belongs
//! to), and operators' admin states. Without it, a restarted pglb could let
//! a stale old primary that answers first win rw again, or put a drained
//! node back in rotation. No I/O here: the health crate writes and reads it.

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
