//! Check results for the routing tests, as a checker reports them.

use std::time::Instant;

use pglb_routing::{Facts, Observation, ObservedRole, Topology, Wal};

/// `name` answers as a primary on `timeline`, of cluster `sysid`.
pub fn primary(t: &mut Topology, name: &str, timeline: u32, sysid: u64) {
    let wal = Wal { current: Some(0), flush: Some(0), replay: None };
    let facts = Facts { timeline: Some(timeline), system_id: Some(sysid), wal, ..Facts::default() };
    t.observe(name, Observation::Up { role: ObservedRole::Primary, facts }, Instant::now());
}

/// `name` answers as a replica of cluster `sysid`, caught up (its WAL
/// receiver hidden from the check user).
pub fn replica(t: &mut Topology, name: &str, sysid: u64) {
    let wal = Wal { replay: Some(0), ..Wal::default() };
    let facts = Facts { system_id: Some(sysid), wal, ..Facts::default() };
    t.observe(name, Observation::Up { role: ObservedRole::Replica, facts }, Instant::now());
}
