//! Split-brain fencing: which backends claiming to be primary must not get
//! writes. Heuristics, documented in the README:
//!
//! - the cluster's system identifier is, strongest first: pinned in the
//!   config (`system_identifier:`), saved (the state file, or handed over
//!   by the process an upgrade replaced), or agreed by the backends once
//!   every one has been checked (one identifier, or a strict plurality). A
//!   tie with nothing pinned or saved leaves it unsettled: nothing is
//!   routed until an operator pins it. Once settled it never changes but by
//!   the config (not by a plurality, not by `unfence`);
//! - a backend whose system identifier differs from the cluster's is another
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

/// Where the cluster's system identifier comes from, strongest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentitySource {
    /// `system_identifier:` in the config.
    Pinned,
    /// The state file, or the process an upgrade took over from.
    Saved,
    /// The backends, once every one was checked: one identifier, or a
    /// strict plurality.
    Agreed,
}

impl IdentitySource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pinned => "pinned",
            Self::Saved => "saved",
            Self::Agreed => "agreed",
        }
    }
}

/// The cluster's identity as a routing table shows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    pub system_id: Option<u64>,
    pub source: Option<IdentitySource>,
    /// While a tie leaves it unsettled: each backend in doubt and the
    /// identifier it reports.
    pub in_doubt: Vec<(String, u64)>,
    /// Routing waits for it: fencing is on and no identifier is settled
    /// (the first checks are still running, or a tie).
    pub pending: bool,
}

/// Sticky fencing memory, across checks.
#[derive(Debug, Clone, Default)]
pub struct Fencing {
    /// Highest primary timeline ever seen (of the cluster's identifier).
    pub max_timeline: u32,
    /// The cluster's system identifier, once settled.
    pub system_id: Option<u64>,
    pub source: Option<IdentitySource>,
    /// The config's `system_identifier:`.
    pub pinned: Option<u64>,
    /// While the identity is unsettled by a tie: each backend in doubt
    /// (index) and the identifier it reports.
    pub unsettled: Vec<(usize, u64)>,
    /// Backend index → why it is fenced.
    pub fenced: BTreeMap<usize, Fence>,
    /// Set when a saved identifier (and its timeline) was not used because
    /// the config pins another: (saved, pinned). Taken once, for a log line.
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
        self.settle(states);
        for (i, s) in states.iter().enumerate() {
            // One answer in recovery is the evidence (not `rise` of them: a
            // switchover back may promote it again before that).
            let timeline_fenced = self.fenced.get(&i).is_some_and(|f| f.kind == FenceKind::Timeline);
            if timeline_fenced && roles[i] == ObservedRole::Replica {
                self.clear(i, "seen as a replica", &mut changes);
            }
            // Promoted since, past every timeline seen: the newest primary.
            let newest = s.facts.timeline.is_some_and(|t| t > self.max_timeline);
            if timeline_fenced && roles[i] == ObservedRole::Primary && newest && s.checked {
                self.clear(i, "promoted onto a higher timeline than any seen", &mut changes);
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
        // Timelines are compared only within the cluster's identifier: not
        // at all while it is unsettled.
        let Some(cluster) = self.system_id else { return changes };
        // Last known primaries, answering or not (their timeline is from their
        // last answer).
        let primaries: Vec<(usize, u32)> = (0..states.len())
            .filter(|&i| states[i].checked && roles[i] == ObservedRole::Primary && !self.fenced.contains_key(&i))
            .filter(|&i| states[i].facts.system_id == Some(cluster))
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

    /// Clears an operator-requested timeline fence; the backend's timeline
    /// becomes the reference so it is not fenced again for the same reason.
    /// The cluster's identifier never changes here (the caller refuses to
    /// unfence another cluster's node).
    pub fn unfence(&mut self, backend: usize, state: &BackendState) -> bool {
        let was = self.fenced.remove(&backend).is_some();
        if let Some(t) = state.facts.timeline {
            self.max_timeline = t;
        }
        was
    }

    /// Applies a saved identifier and highest timeline (state file or
    /// upgrade): the cluster's identity unless the config pins another.
    pub fn restore(&mut self, system_id: u64, max_timeline: u32) {
        match self.pinned {
            Some(pinned) if pinned != system_id => self.foreign_state = Some((system_id, pinned)),
            _ => {
                if self.source != Some(IdentitySource::Pinned) {
                    self.system_id = Some(system_id);
                    self.source = Some(IdentitySource::Saved);
                }
                self.max_timeline = self.max_timeline.max(max_timeline);
            }
        }
    }

    /// Sets the config's pinned identifier (at start and on a reload).
    pub fn pin(&mut self, pinned: Option<u64>) {
        let before = self.system_id;
        self.pinned = pinned;
        match pinned {
            Some(id) => {
                self.system_id = Some(id);
                self.source = Some(IdentitySource::Pinned);
                self.unsettled.clear();
            }
            // Unpinned by a reload: what was pinned stays, as if saved.
            None if self.source == Some(IdentitySource::Pinned) => self.source = Some(IdentitySource::Saved),
            None => {}
        }
        if before.is_some() && before != self.system_id {
            // Another cluster's timelines mean nothing here.
            self.max_timeline = 0;
        }
    }

    /// Settles the cluster's identifier if it is not yet: pinned, else
    /// saved (both set before), else agreed by the backends once every one
    /// has been checked, so that whichever answers first does not decide.
    /// A tie stays unsettled, naming the backends in doubt.
    fn settle(&mut self, states: &[BackendState]) {
        if self.system_id.is_some() {
            self.unsettled.clear();
            return;
        }
        if !states.iter().all(|s| s.checked) {
            return;
        }
        let reported: Vec<(usize, u64)> =
            states.iter().enumerate().filter_map(|(i, s)| s.facts.system_id.map(|id| (i, id))).collect();
        let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
        for (_, id) in &reported {
            *counts.entry(*id).or_default() += 1;
        }
        let mut ranked: Vec<(usize, u64)> = counts.into_iter().map(|(id, n)| (n, id)).collect();
        ranked.sort_unstable_by(|a, b| b.cmp(a));
        match ranked.as_slice() {
            [] => {}
            [(_, id)] => self.agree(*id),
            [(n, id), (m, _), ..] if n > m => self.agree(*id),
            _ => self.unsettled = reported,
        }
    }

    fn agree(&mut self, id: u64) {
        self.system_id = Some(id);
        self.source = Some(IdentitySource::Agreed);
        self.unsettled.clear();
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
