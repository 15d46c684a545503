//! Split-brain fencing: which backends claiming to be primary must not get
//! writes. Heuristics, documented in the README:
//!
//! - a backend whose system identifier differs from the others' is another
//!   cluster behind a wrong address: fenced;
//! - of several primaries, the one on the highest timeline wins; a primary on
//!   a lower timeline is fenced, and stays fenced (sticky) until it is seen as
//!   a replica or an operator clears it — even after the higher one is gone.
//!   A backend that is silent, unverified or down is judged by its last known
//!   role and timeline: a silent old primary is fenced as soon as another
//!   backend answers as primary on a higher timeline;
//! - `multi_primary: allow` turns both off (logical replication nodes have
//!   their own identifiers and timelines).

use std::collections::BTreeMap;

use crate::state::{BackendState, ObservedRole};

/// Why a backend is fenced, as a kind a program can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FenceKind {
    /// A primary on a lower timeline than the highest seen.
    Timeline,
    /// Another cluster's system identifier.
    SystemId,
}

impl FenceKind {
    pub const ALL: [FenceKind; 2] = [Self::Timeline, Self::SystemId];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeline => "timeline",
            Self::SystemId => "system_identifier",
        }
    }

    /// The kind whose [`FenceKind::as_str`] is `text`.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

/// A fence: its kind and the reason, for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub kind: FenceKind,
    pub reason: String,
}

/// Sticky fencing memory, across checks.
#[derive(Debug, Clone, Default)]
pub struct Fencing {
    /// Highest primary timeline ever seen.
    pub max_timeline: u32,
    /// The cluster's system identifier, once known.
    pub system_id: Option<u64>,
    /// Backend index → why it is fenced.
    pub fenced: BTreeMap<usize, Fence>,
    /// A highest timeline restored from the state file, for the cluster
    /// with this system identifier: applied once the backends show that
    /// cluster, dropped if they show another (the cluster was rebuilt).
    pub restored_timeline: Option<(u64, u32)>,
    /// Set when the restored timeline was dropped: (saved cluster, this one).
    pub foreign_state: Option<(u64, u64)>,
}

/// A fencing change worth one log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceChange {
    Fenced { backend: usize, reason: String },
    Cleared { backend: usize, reason: String },
}

impl Fencing {
    /// Re-evaluates fencing given every backend's state and effective role.
    pub fn update(&mut self, states: &[BackendState], roles: &[ObservedRole]) -> Vec<FenceChange> {
        let mut changes = Vec::new();
        self.learn_system_id(states);
        if let (Some((cluster, timeline)), Some(now)) = (self.restored_timeline, self.system_id) {
            self.restored_timeline = None;
            if cluster == now {
                self.max_timeline = self.max_timeline.max(timeline);
            } else {
                self.foreign_state = Some((cluster, now));
            }
        }
        for (i, s) in states.iter().enumerate() {
            if roles[i] == ObservedRole::Replica
                && s.up
                && self.fenced.get(&i).is_some_and(|f| f.kind == FenceKind::Timeline)
            {
                self.clear(i, "seen as a replica", &mut changes);
            }
            // Unknown (never answered since start, e.g. a fence restored
            // for a node that is down) is neither: the fence stays.
            let (foreign, matching) = match (s.facts.system_id, self.system_id) {
                (Some(mine), Some(cluster)) => (mine != cluster, mine == cluster),
                _ => (false, false),
            };
            if foreign {
                let reason = format!(
                    "system identifier {} differs from the cluster's {}: another cluster behind this address",
                    s.facts.system_id.unwrap_or_default(),
                    self.system_id.unwrap_or_default()
                );
                self.fence(i, Fence { kind: FenceKind::SystemId, reason }, &mut changes);
            } else if matching && self.fenced.get(&i).is_some_and(|f| f.kind == FenceKind::SystemId) {
                self.clear(i, "system identifier matches the cluster again", &mut changes);
            }
        }
        // Last known primaries, answering or not (their timeline is from their
        // last answer).
        let primaries: Vec<(usize, u32)> = (0..states.len())
            .filter(|&i| states[i].checked && roles[i] == ObservedRole::Primary && !self.fenced.contains_key(&i))
            .filter_map(|i| states[i].facts.timeline.map(|t| (i, t)))
            .collect();
        if let Some(top) = primaries.iter().map(|(_, t)| *t).max() {
            self.max_timeline = self.max_timeline.max(top);
        }
        for (i, timeline) in primaries {
            if timeline < self.max_timeline {
                let reason =
                    format!("timeline {timeline} is below the highest primary timeline seen ({})", self.max_timeline);
                self.fence(i, Fence { kind: FenceKind::Timeline, reason }, &mut changes);
            }
        }
        changes
    }

    /// Clears an operator-requested fence; the backend's timeline becomes the
    /// reference so it is not fenced again for the same reason.
    pub fn unfence(&mut self, backend: usize, state: &BackendState) -> bool {
        let was = self.fenced.remove(&backend).is_some();
        if let Some(t) = state.facts.timeline {
            self.max_timeline = t;
        }
        if state.facts.system_id.is_some() && was {
            self.system_id = state.facts.system_id;
        }
        was
    }

    /// The identifier most backends report (a strict plurality), else the
    /// one known before.
    fn learn_system_id(&mut self, states: &[BackendState]) {
        let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
        for s in states.iter().filter(|s| s.checked) {
            if let Some(id) = s.facts.system_id {
                *counts.entry(id).or_default() += 1;
            }
        }
        let mut ranked: Vec<(usize, u64)> = counts.into_iter().map(|(id, n)| (n, id)).collect();
        ranked.sort_unstable_by(|a, b| b.cmp(a));
        match ranked.as_slice() {
            [(n, id), (m, _), ..] if n > m => self.system_id = Some(*id),
            [(_, id)] if self.system_id.is_none() => self.system_id = Some(*id),
            _ => {}
        }
    }

    fn fence(&mut self, i: usize, fence: Fence, changes: &mut Vec<FenceChange>) {
        if self.fenced.get(&i) != Some(&fence) {
            let new = !self.fenced.contains_key(&i);
            let reason = fence.reason.clone();
            self.fenced.insert(i, fence);
            if new {
                changes.push(FenceChange::Fenced { backend: i, reason });
            }
        }
    }

    fn clear(&mut self, i: usize, reason: &str, changes: &mut Vec<FenceChange>) {
        if self.fenced.remove(&i).is_some() {
            changes.push(FenceChange::Cleared { backend: i, reason: reason.to_owned() });
        }
    }
}
