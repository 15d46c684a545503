//! Everything known about the cluster, and the tables built from it.
//!
//! One owner applies check observations, operator actions and config
//! changes here, and publishes the [`RoutingTable`]s it builds. Pure: the
//! clock and the I/O live in the caller.

use std::sync::Arc;
use std::time::Instant;

use pglb_config::{Cluster, MultiPrimary, Role};

use crate::fence::{FenceChange, FenceKind, Fencing, Identity};
use crate::lag::{lag, Following, GateChange, Lag, LagGate, WalHistory};
use crate::patroni::{PatroniView, Trust};
use crate::rejoin::Rejoin;
use crate::saved::{SavedAdmin, SavedFence, SavedLagging, SavedNotFollowing, SavedState};
use crate::state::{BackendState, FailureClass, Observation, ObservedRole, Thresholds, Transition};
use crate::table::{AdminState, BackendEntry, BackendLoad, ListenerRoute, RoutingTable};

/// Something that happened, for one log line (and metrics).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Backend {
        backend: String,
        transition: Transition,
    },
    Fence {
        backend: String,
        change: FenceChange,
    },
    Lag {
        listener: String,
        backend: String,
        change: GateChange,
        lag: Lag,
    },
    SplitBrain {
        primaries: Vec<String>,
    },
    SplitBrainOver,
    /// The saved identifier (state file or upgrade) is not the one the
    /// config pins (`now`): neither it nor its highest timeline is used.
    SavedTimelineIgnored {
        saved: u64,
        now: u64,
    },
    /// A backend answered from another address than before (its host
    /// name resolves elsewhere now): checked anew, as a new node.
    AddressChanged {
        backend: String,
        from: std::net::IpAddr,
        to: std::net::IpAddr,
    },
    /// Whether Patroni's leader lock is used changed (or, while it is, the
    /// lock holder).
    Patroni {
        from: Trust,
        to: Trust,
        leader: Option<String>,
    },
    /// The cluster's identifier is settled (agreed by the backends).
    IdentitySettled {
        system_id: u64,
        source: &'static str,
    },
    /// Every backend was checked and their identifiers tie, with none
    /// pinned or saved: nothing is routed.
    IdentityUnsettled {
        in_doubt: Vec<(String, u64)>,
    },
}

/// Cluster knowledge: per backend state, fencing, lag gates, admin states.
pub struct Topology {
    config: Arc<Cluster>,
    states: Vec<BackendState>,
    loads: Vec<Arc<BackendLoad>>,
    admin: Vec<AdminState>,
    lags: Vec<Lag>,
    /// Each backend's flush positions over time while it is primary.
    wal: Vec<WalHistory>,
    /// Whether each replica follows the current primary, and since when not.
    following: Vec<Following>,
    /// What each backend has shown of following the current timeline
    /// since it was last primary or fenced (admission to read pools).
    rejoin: Vec<Rejoin>,
    /// The backend last seen serving as primary, by name: a primary that
    /// restarts in place is taken back on its first good check only if no
    /// other was seen since.
    last_primary: Option<String>,
    /// The highest timeline a serving primary was seen on.
    timeline: Option<u32>,
    /// `gates[listener][backend]`.
    gates: Vec<Vec<LagGate>>,
    fencing: Fencing,
    generation: u64,
    last: Option<RoutingTable>,
    /// What Patroni last said (clusters read from Patroni).
    patroni: Option<std::sync::Arc<PatroniView>>,
    /// Saved fences and admin states of backends not (yet) configured: a
    /// Patroni member's, kept until Patroni lists it again.
    unplaced: SavedState,
    /// Primaries wait for the fleet's shared state (see the table's field).
    awaiting_shared: bool,
}

/// Why an operator action was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionError {
    NoSuchBackend(String),
    /// Unfencing would give writes to a node while another primary is up.
    Conflict(String),
}

impl Topology {
    /// Every backend unchecked, enabled, unfenced.
    pub fn new(config: Arc<Cluster>) -> Self {
        let n = config.backends.len();
        let mut topology = Self {
            states: vec![BackendState::default(); n],
            loads: (0..n).map(|_| Arc::new(BackendLoad::default())).collect(),
            admin: vec![AdminState::Enabled; n],
            lags: vec![Lag::default(); n],
            wal: vec![WalHistory::default(); n],
            following: vec![Following::default(); n],
            rejoin: vec![Rejoin::default(); n],
            last_primary: None,
            timeline: None,
            gates: vec![vec![LagGate::default(); n]; config.listeners.len()],
            fencing: Fencing::default(),
            generation: 0,
            last: None,
            patroni: None,
            unplaced: SavedState::default(),
            awaiting_shared: false,
            config,
        };
        topology.fencing.pin(topology.config.system_identifier);
        topology
    }

    pub fn config(&self) -> &Arc<Cluster> {
        &self.config
    }

    /// The next config: state, load, admin state and lag of backends that
    /// stay (same name and address) carry over; new ones start unchecked.
    pub fn reconfigure(&mut self, config: Arc<Cluster>) {
        // A Patroni member that leaves keeps its fence and admin state
        // for when it comes back.
        if config.patroni.is_some() {
            let saved = self.saved();
            let stays =
                |name: &str, address: &str| config.backends.iter().any(|b| b.name == name && b.address() == address);
            let known = |name: &str, address: &str| {
                self.config.backends.iter().any(|b| b.name == name && b.address() == address)
            };
            for f in saved.fences {
                if known(&f.backend, &f.address) && !stays(&f.backend, &f.address) {
                    self.unplaced.fences.push(f);
                }
            }
            for a in saved.admin {
                if known(&a.backend, &a.address) && !stays(&a.backend, &a.address) {
                    self.unplaced.admin.push(a);
                }
            }
        }
        let old = &self.config;
        let find = |b: &pglb_config::BackendConfig| {
            old.backends.iter().position(|o| o.name == b.name && o.host == b.host && o.port == b.port)
        };
        let carried: Vec<Option<usize>> = config.backends.iter().map(find).collect();
        let pick = |i: &Option<usize>| i.map(|i| self.states[i].clone()).unwrap_or_default();
        self.states = carried.iter().map(pick).collect();
        self.loads = carried.iter().map(|i| i.map(|i| self.loads[i].clone()).unwrap_or_default()).collect();
        self.admin = carried.iter().map(|i| i.map(|i| self.admin[i]).unwrap_or_default()).collect();
        self.lags = carried.iter().map(|i| i.map(|i| self.lags[i]).unwrap_or_default()).collect();
        self.wal = carried.iter().map(|i| i.map(|i| self.wal[i].clone()).unwrap_or_default()).collect();
        self.following = carried.iter().map(|i| i.map(|i| self.following[i]).unwrap_or_default()).collect();
        self.rejoin = carried.iter().map(|i| i.map(|i| self.rejoin[i]).unwrap_or_default()).collect();
        let fenced = std::mem::take(&mut self.fencing.fenced);
        for (new, old) in carried.iter().enumerate() {
            if let Some(reason) = old.and_then(|o| fenced.get(&o)) {
                self.fencing.fenced.insert(new, reason.clone());
            }
        }
        let listener_gates = |l: &pglb_config::ListenerConfig| {
            let old_l = old.listeners.iter().position(|o| o.name == l.name);
            carried
                .iter()
                .map(|b| match (old_l, b) {
                    (Some(ol), Some(ob)) => self.gates[ol][*ob],
                    _ => LagGate::default(),
                })
                .collect()
        };
        self.gates = config.listeners.iter().map(listener_gates).collect();
        self.fencing.pin(config.system_identifier);
        self.config = config;
        self.last = None;
        self.place_unplaced();
    }

    /// Applies what Patroni said now; reports a change of trust (or of
    /// the lock holder while the lock is used).
    pub fn set_patroni(&mut self, view: PatroniView) -> Vec<Event> {
        let before = self.patroni.as_ref().map(|p| (p.trust, p.veto_holder().map(str::to_owned)));
        let (from, old_holder) = before.unwrap_or_default();
        let now = (view.trust, view.veto_holder().map(str::to_owned));
        let mut events = Vec::new();
        if from != now.0 || old_holder != now.1 {
            events.push(Event::Patroni { from, to: now.0, leader: view.leader.clone() });
        }
        // `last` stays: the generation moves only if routing changed (a
        // veto, a member's tags, a departure show in the table's diff).
        self.patroni = Some(std::sync::Arc::new(view));
        events
    }

    /// Restores saved fences and admin states of backends that a
    /// reconfiguration (a Patroni member appearing) brought in.
    fn place_unplaced(&mut self) {
        let find = |name: &str, address: &str| {
            self.config.backends.iter().position(|b| b.name == name && b.address() == address)
        };
        let fences = std::mem::take(&mut self.unplaced.fences);
        for f in fences {
            match find(&f.backend, &f.address) {
                Some(i) => {
                    self.fencing.fenced.entry(i).or_insert(f.fence);
                }
                None => self.unplaced.fences.push(f),
            }
        }
        let admin = std::mem::take(&mut self.unplaced.admin);
        for a in admin {
            match find(&a.backend, &a.address) {
                Some(i) if self.admin[i] == AdminState::Enabled => self.admin[i] = a.state,
                Some(_) => {}
                None => self.unplaced.admin.push(a),
            }
        }
    }

    /// Applies one check result for backend `name`, observed at `now`.
    pub fn observe(&mut self, name: &str, obs: Observation, now: Instant) -> Vec<Event> {
        let Some(i) = self.config.backends.iter().position(|b| b.name == name) else {
            return Vec::new();
        };
        let mut events = Vec::new();
        // An answer from another address than the last (a re-pointed host
        // name) is from another node: it starts as a new, unchecked backend.
        if let Observation::Up { facts, .. } = &obs {
            let before = self.states[i].facts.address;
            if let (Some(from), Some(to)) = (before, facts.address) {
                if from != to {
                    self.forget(i);
                    events.push(Event::AddressChanged { backend: name.to_owned(), from, to });
                }
            }
        }
        let replica_sample = matches!(obs, Observation::Up { role: ObservedRole::Replica, .. });
        match &obs {
            Observation::Up { role: ObservedRole::Primary, facts } => {
                if let Some(flush) = facts.wal.flush {
                    self.wal[i].record(now, flush);
                }
            }
            // A primary's history is of no use once it is not one.
            Observation::Up { .. } => self.wal[i].clear(),
            _ => {}
        }
        let health = &self.config.health;
        let mut thresholds = Thresholds { rise: health.rise, fall: health.fall, down_after: health.down_after };
        if self.returns_in_place(i, &obs) {
            // The cluster's only primary restarted (a crash, a restart by
            // Patroni): nothing else could have taken its place, and
            // clients are held for it. No need to wait for `rise`.
            thresholds.rise = 1;
        }
        // A node pinned as a replica that answers as primary is a writable
        // subscriber, not a demoted primary: nothing to rejoin.
        let pinned_replica = self.config.backends[i].role == Some(Role::Replica);
        match &obs {
            Observation::Up { role: ObservedRole::Primary, .. } if !pinned_replica => self.rejoin[i].reset(),
            Observation::Up { role: ObservedRole::Replica, facts } => self.rejoin[i].sample(facts.receiver),
            _ => {}
        }
        events.extend(
            self.states[i]
                .observe(obs, thresholds)
                .into_iter()
                .map(|transition| Event::Backend { backend: name.to_owned(), transition }),
        );
        if self.config.multi_primary == MultiPrimary::Fence {
            let roles = self.roles();
            let (settled, tied) = (self.fencing.system_id, self.fencing.unsettled.len());
            for change in self.fencing.update(&self.states, &roles) {
                let backend = match &change {
                    FenceChange::Fenced { backend, .. } | FenceChange::Cleared { backend, .. } => *backend,
                };
                events.push(Event::Fence { backend: self.config.backends[backend].name.clone(), change });
            }
            if let Some((saved, now)) = self.fencing.foreign_state.take() {
                events.push(Event::SavedTimelineIgnored { saved, now });
            }
            match (settled, self.fencing.system_id) {
                (None, Some(system_id)) => {
                    let source = self.fencing.source.map_or("agreed", |s| s.as_str());
                    events.push(Event::IdentitySettled { system_id, source });
                }
                (None, None) if self.fencing.unsettled.len() != tied => {
                    events.push(Event::IdentityUnsettled { in_doubt: self.identity().in_doubt });
                }
                _ => {}
            }
        }
        for &f in self.fencing.fenced.keys() {
            self.rejoin[f].reset();
        }
        self.update_lag(i, replica_sample, now, &mut events);
        events
    }

    /// Whether an answer as primary is the cluster's last primary coming
    /// back from a restart in place: it was down, it answers on the same
    /// system identifier and timeline as before, no higher timeline was
    /// seen, and no other node was seen as primary since.
    fn returns_in_place(&self, i: usize, obs: &Observation) -> bool {
        let Observation::Up { role: ObservedRole::Primary, facts } = obs else { return false };
        let s = &self.states[i];
        let roles = self.roles();
        let name = &self.config.backends[i].name;
        s.checked
            && !s.up
            && s.role == ObservedRole::Primary
            && self.last_primary.as_deref() == Some(name.as_str())
            && !self.fencing.fenced.contains_key(&i)
            && facts.system_id.is_some()
            && facts.system_id == s.facts.system_id
            && facts.timeline.is_some()
            && facts.timeline == s.facts.timeline
            && facts.timeline >= self.timeline
            && (0..self.states.len()).all(|j| j == i || !(self.states[j].up && roles[j] == ObservedRole::Primary))
    }

    /// The cluster's last primary, when it is down with evidence of a
    /// restart (refused, reset, "starting up", "shutting down") and nothing
    /// has replaced it: rw clients are held for it (`hold_restart_timeout`).
    fn restarting(&self, serving_primary: bool) -> Option<usize> {
        if serving_primary {
            return None;
        }
        let name = self.last_primary.as_deref()?;
        let i = self.config.backends.iter().position(|b| b.name == name)?;
        let s = &self.states[i];
        let restart_evidence = s.last_error.as_ref().is_some_and(|e| {
            matches!(
                e.class,
                FailureClass::Refused | FailureClass::Reset | FailureClass::Shutdown | FailureClass::Connection
            )
        });
        let holder = self.patroni.as_ref().and_then(|p| p.veto_holder());
        let admin_ok = self.admin[i] != AdminState::Disabled;
        (!s.up
            && s.role == ObservedRole::Primary
            && restart_evidence
            && admin_ok
            && !self.fencing.fenced.contains_key(&i)
            && holder.is_none_or(|h| h == name))
        .then_some(i)
    }

    /// Why replica `i` stays out of read-only pools although it answers. A
    /// Patroni `nostream` member is fed from the WAL archive and never
    /// streams: it is judged by lag alone, as before.
    fn rejoining(&self, i: usize, role: ObservedRole, timeline: Option<u32>) -> Option<String> {
        if role != ObservedRole::Replica || self.member(i).is_some_and(|m| m.nostream()) {
            return None;
        }
        self.rejoin[i].why_out(timeline)
    }

    /// The cluster's current timeline: the highest a primary was seen on.
    fn current_timeline(&self) -> Option<u32> {
        let fenced = (self.fencing.max_timeline > 0).then_some(self.fencing.max_timeline);
        self.timeline.max(fenced)
    }

    /// Forgets what the checks learnt about backend `i` (not its admin
    /// state or fence): it is checked anew, as at start.
    fn forget(&mut self, i: usize) {
        self.states[i] = BackendState::default();
        self.lags[i] = Lag::default();
        self.wal[i] = WalHistory::default();
        self.following[i] = Following::default();
        self.rejoin[i] = Rejoin::default();
        for gates in &mut self.gates {
            gates[i] = LagGate::default();
        }
        self.last = None;
    }

    fn update_lag(&mut self, i: usize, replica_sample: bool, now: Instant, events: &mut Vec<Event>) {
        let roles = self.roles();
        let primary = (0..self.states.len())
            .filter(|&p| {
                self.states[p].up
                    && roles[p] == ObservedRole::Primary
                    && !self.fencing.fenced.contains_key(&p)
                    && self.vetoed(p, &roles).is_none()
            })
            .max_by_key(|&p| (self.states[p].facts.timeline, self.states[p].facts.wal.current));
        if replica_sample {
            let timeline = primary.and_then(|p| self.states[p].facts.timeline);
            self.following[i].track(self.states[i].facts.receiver, timeline, now);
        }
        if let Some(p) = primary {
            self.last_primary = Some(self.config.backends[p].name.clone());
            self.timeline = self.timeline.max(self.states[p].facts.timeline);
        }
        // No primary visible (a failover): keep the last known lag.
        let Some(p) = primary else { return };
        for (r, role) in roles.iter().enumerate() {
            if *role == ObservedRole::Replica && self.states[r].up {
                let measured = lag(&self.states[r], &self.states[p], &self.wal[p], now);
                // A `nostream` member never streams: its lag is what it
                // replayed, not how long since it last followed.
                let nostream = self.member(r).is_some_and(|m| m.nostream());
                self.lags[r] = if nostream { measured } else { self.following[r].widen(measured, now) };
            } else if *role == ObservedRole::Primary {
                // A promoted replica's last lag is no primary's.
                self.lags[r] = Lag::default();
            }
        }
        if !(replica_sample && self.states[i].up) {
            return;
        }
        for (l, listener) in self.config.listeners.iter().enumerate() {
            // Only listeners that may route to a replica have a gate to move.
            let reads_replicas =
                |r: pglb_config::Role| matches!(r, pglb_config::Role::Replica | pglb_config::Role::Any);
            if !reads_replicas(listener.role) && !listener.fallback.is_some_and(reads_replicas) {
                continue;
            }
            if let Some(change) = self.gates[l][i].step(self.lags[i], listener, self.config.health.rise) {
                events.push(Event::Lag {
                    listener: listener.name.clone(),
                    backend: self.config.backends[i].name.clone(),
                    change,
                    lag: self.lags[i],
                });
            }
        }
    }

    /// What Patroni lists for backend `i`.
    fn member(&self, i: usize) -> Option<&crate::patroni::MemberView> {
        self.patroni.as_ref()?.members.get(&self.config.backends[i].name)
    }

    /// Why backend `i`, seen as primary, must take no traffic: Patroni's
    /// confirmed lock holder is another node.
    fn vetoed(&self, i: usize, roles: &[ObservedRole]) -> Option<String> {
        let holder = self.patroni.as_ref()?.veto_holder()?;
        let name = &self.config.backends[i].name;
        (roles[i] == ObservedRole::Primary && name != holder).then(|| {
            format!("Patroni's leader is `{holder}` (it confirms the lock): `{name}` answers as primary but is not the cluster's primary")
        })
    }

    /// Effective roles: observed, unless the config pins one.
    fn roles(&self) -> Vec<ObservedRole> {
        self.config
            .backends
            .iter()
            .zip(&self.states)
            .map(|(b, s)| match (b.role, s.role) {
                (_, ObservedRole::Unknown) => ObservedRole::Unknown,
                (Some(Role::Replica), _) => ObservedRole::Replica,
                (Some(Role::Primary), ObservedRole::Replica) => ObservedRole::Unknown,
                (_, observed) => observed,
            })
            .collect()
    }

    /// The state to save: fences, highest timeline, admin states.
    pub fn saved(&self) -> SavedState {
        let backend = |i: usize| (self.config.backends[i].name.clone(), self.config.backends[i].address());
        let fences = self
            .fencing
            .fenced
            .iter()
            .map(|(&i, fence)| {
                let (backend, address) = backend(i);
                SavedFence { backend, address, fence: fence.clone() }
            })
            .collect();
        let admin = (0..self.admin.len())
            .filter(|&i| self.admin[i] != AdminState::Enabled)
            .map(|i| {
                let (backend, address) = backend(i);
                SavedAdmin { backend, address, state: self.admin[i] }
            })
            .collect();
        let mut lagging = Vec::new();
        for (l, listener) in self.config.listeners.iter().enumerate() {
            for (i, gate) in self.gates[l].iter().enumerate() {
                if !gate.admitted {
                    let (backend, address) = backend(i);
                    lagging.push(SavedLagging { listener: listener.name.clone(), backend, address });
                }
            }
        }
        let not_following = (0..self.following.len())
            .filter_map(|i| {
                let since = self.following[i].saved()?;
                let (backend, address) = backend(i);
                Some(SavedNotFollowing { backend, address, since })
            })
            .collect();
        let (mut fences, mut admin): (Vec<SavedFence>, Vec<SavedAdmin>) = (fences, admin);
        fences.extend(self.unplaced.fences.iter().cloned());
        admin.extend(self.unplaced.admin.iter().cloned());
        SavedState {
            system_id: self.fencing.system_id,
            max_timeline: self.fencing.max_timeline,
            fences,
            admin,
            lagging,
            not_following,
        }
    }

    /// Applies a saved state where it still fits the config; returns one
    /// line per thing applied or left out, for the log and `/status`.
    pub fn restore(&mut self, saved: SavedState) -> Vec<String> {
        let mut notes = Vec::new();
        let find = |name: &str, address: &str| {
            self.config.backends.iter().position(|b| b.name == name && b.address() == address)
        };
        for f in saved.fences {
            match find(&f.backend, &f.address) {
                Some(i) => {
                    notes.push(format!("{}: fenced ({}): {}", f.backend, f.fence.kind.as_str(), f.fence.reason));
                    self.fencing.fenced.insert(i, f.fence);
                }
                None if self.config.patroni.is_some() => {
                    notes.push(format!(
                        "{} ({}): fenced ({}): kept until Patroni lists it",
                        f.backend,
                        f.address,
                        f.fence.kind.as_str()
                    ));
                    self.unplaced.fences.push(f);
                }
                None => notes
                    .push(format!("{} ({}): fence not restored: no such backend in the config", f.backend, f.address)),
            }
        }
        for a in saved.admin {
            match find(&a.backend, &a.address) {
                Some(i) => {
                    notes.push(format!("{}: {}", a.backend, a.state.as_str()));
                    self.admin[i] = a.state;
                }
                None if self.config.patroni.is_some() => {
                    notes.push(format!(
                        "{} ({}): {}: kept until Patroni lists it",
                        a.backend,
                        a.address,
                        a.state.as_str()
                    ));
                    self.unplaced.admin.push(a);
                }
                None => notes.push(format!(
                    "{} ({}): admin state {} not restored: no such backend in the config",
                    a.backend,
                    a.address,
                    a.state.as_str()
                )),
            }
        }
        for lagging in saved.lagging {
            let l = self.config.listeners.iter().position(|l| l.name == lagging.listener);
            match (l, find(&lagging.backend, &lagging.address)) {
                (Some(l), Some(i)) => {
                    notes.push(format!("{}: out of {}'s pool for lag", lagging.backend, lagging.listener));
                    self.gates[l][i] = LagGate::held_out();
                }
                _ => notes.push(format!(
                    "{} ({}): lag exclusion from {} not restored: no such backend or listener in the config",
                    lagging.backend, lagging.address, lagging.listener
                )),
            }
        }
        let (now, wall_now) = (Instant::now(), std::time::SystemTime::now());
        for off in saved.not_following {
            if let Some(i) = find(&off.backend, &off.address) {
                let ago = wall_now.duration_since(off.since).unwrap_or_default();
                notes.push(format!("{}: not following its primary for {}s", off.backend, ago.as_secs()));
                self.following[i] = Following::restored(off.since, now, wall_now);
            }
        }
        if let (Some(id), t) = (saved.system_id, saved.max_timeline) {
            match self.fencing.pinned {
                Some(pinned) if pinned != id => notes.push(format!(
                    "system identifier {id} and highest timeline {t} not restored: the config pins system_identifier {pinned}"
                )),
                _ => notes.push(format!("system identifier {id}, highest primary timeline {t}")),
            }
            self.fencing.restore(id, t);
        }
        self.last = None;
        notes
    }

    /// Applies the old process's final state over `earlier`, the state it
    /// handed over first (an upgrade): the final state *replaces* it. A fence
    /// or an admin state the old process dropped in between (an `unfence`,
    /// an `enable` done during the hand-over) is dropped here too, unless
    /// this process's own checks set it since; then the final state is
    /// restored as at start.
    pub fn restore_over(&mut self, earlier: &SavedState, saved: SavedState) -> Vec<String> {
        let mut notes = Vec::new();
        let find = |name: &str, address: &str| {
            self.config.backends.iter().position(|b| b.name == name && b.address() == address)
        };
        for f in &earlier.fences {
            let kept = saved.fences.iter().any(|g| g.backend == f.backend && g.address == f.address);
            if let (false, Some(i)) = (kept, find(&f.backend, &f.address)) {
                if self.fencing.fenced.get(&i) == Some(&f.fence) {
                    self.fencing.fenced.remove(&i);
                    notes.push(format!("{}: unfenced in the running pglb during the hand-over", f.backend));
                }
            }
        }
        for a in &earlier.admin {
            let kept = saved.admin.iter().any(|b| b.backend == a.backend && b.address == a.address);
            if let (false, Some(i)) = (kept, find(&a.backend, &a.address)) {
                if self.admin[i] == a.state {
                    self.admin[i] = AdminState::Enabled;
                    notes.push(format!("{}: enabled in the running pglb during the hand-over", a.backend));
                }
            }
        }
        for lagging in &earlier.lagging {
            let kept = saved.lagging.contains(lagging);
            let l = self.config.listeners.iter().position(|l| l.name == lagging.listener);
            if let (false, Some(l), Some(i)) = (kept, l, find(&lagging.backend, &lagging.address)) {
                self.gates[l][i] = LagGate::default();
            }
        }
        notes.extend(self.restore(saved));
        notes
    }

    /// Sets an operator's admin state.
    pub fn set_admin(&mut self, name: &str, state: AdminState) -> Result<(), ActionError> {
        let i = self.index(name)?;
        self.admin[i] = state;
        Ok(())
    }

    /// Whether primaries wait for the fleet's shared state.
    pub fn set_awaiting_shared(&mut self, awaiting: bool) {
        self.awaiting_shared = awaiting;
    }

    /// The cluster's system identifier, once settled.
    pub fn system_id(&self) -> Option<u64> {
        self.fencing.system_id
    }

    /// Backend `i`'s admin state.
    pub(crate) fn admin_state(&self, i: usize) -> AdminState {
        self.admin[i]
    }

    pub(crate) fn set_admin_at(&mut self, i: usize, state: AdminState) {
        self.admin[i] = state;
    }

    /// Backend `i`'s fence, if any.
    pub(crate) fn fence_of(&self, i: usize) -> Option<&crate::fence::Fence> {
        self.fencing.fenced.get(&i)
    }

    /// Whether backend `i` is a Patroni member (named by Patroni).
    pub(crate) fn is_member(&self, i: usize) -> bool {
        self.member(i).is_some()
    }

    pub(crate) fn max_timeline(&self) -> u32 {
        self.fencing.max_timeline
    }

    /// Sets or clears backend `i`'s timeline fence; a system-identifier
    /// fence (local evidence only) is left as it is.
    pub(crate) fn set_timeline_fence(&mut self, i: usize, fence: Option<crate::fence::Fence>) {
        let current = self.fencing.fenced.get(&i).map(|f| f.kind);
        match (fence, current) {
            (_, Some(FenceKind::SystemId)) => {}
            (Some(fence), _) => {
                self.fencing.fenced.insert(i, fence);
            }
            (None, _) => {
                self.fencing.fenced.remove(&i);
            }
        }
    }

    /// A highest timeline another instance shared: a maximum, or (an
    /// operator's unfence there) the new reference.
    pub(crate) fn shared_timeline(&mut self, timeline: u32, reset: bool) {
        if self.fencing.system_id.is_none() {
            return;
        }
        self.fencing.max_timeline = if reset { timeline } else { self.fencing.max_timeline.max(timeline) };
    }

    /// Clears a fence (operator action).
    pub fn unfence(&mut self, name: &str) -> Result<bool, ActionError> {
        let i = self.index(name)?;
        if let (Some(fence), Some(cluster)) = (self.fencing.fenced.get(&i), self.fencing.system_id) {
            if fence.kind == FenceKind::SystemId && self.states[i].facts.system_id != Some(cluster) {
                let reports =
                    self.states[i].facts.system_id.map_or_else(|| "an unknown identifier".into(), |id| id.to_string());
                let source = self.fencing.source.map_or("agreed", |s| s.as_str());
                return Err(ActionError::Conflict(format!(
                    "`{name}` reports system identifier {reports}, the cluster's is {cluster} ({source}): unfencing cannot make it this cluster; if it is, pin system_identifier: \"{reports}\" in the config and reload"
                )));
            }
        }
        let roles = self.roles();
        let other_primary = (0..self.states.len()).find(|&p| {
            p != i && self.states[p].up && roles[p] == ObservedRole::Primary && !self.fencing.fenced.contains_key(&p)
        });
        if let (Some(p), ObservedRole::Primary) = (other_primary, roles[i]) {
            return Err(ActionError::Conflict(format!(
                "backend `{}` is primary and unfenced: unfencing `{name}` too would give writes to two primaries; demote or remove one first",
                self.config.backends[p].name
            )));
        }
        Ok(self.fencing.unfence(i, &self.states[i]))
    }

    /// The cluster's identity for the table: pending (nothing routed)
    /// while fencing is on and no identifier is settled.
    fn identity(&self) -> Identity {
        let fencing = &self.fencing;
        let name = |i: usize| self.config.backends[i].name.clone();
        Identity {
            system_id: fencing.system_id,
            source: fencing.source,
            in_doubt: fencing.unsettled.iter().map(|&(i, id)| (name(i), id)).collect(),
            pending: self.config.multi_primary == MultiPrimary::Fence && fencing.system_id.is_none(),
        }
    }

    fn index(&self, name: &str) -> Result<usize, ActionError> {
        self.config
            .backends
            .iter()
            .position(|b| b.name == name)
            .ok_or_else(|| ActionError::NoSuchBackend(name.to_owned()))
    }

    /// Builds the current table. Its generation moves only when routing
    /// changed; a split-brain start or end is reported once.
    pub fn table(&mut self) -> (RoutingTable, Vec<Event>) {
        let roles = self.roles();
        let timeline = self.current_timeline();
        let backends: Vec<BackendEntry> = (0..self.states.len())
            .map(|i| {
                let config = &self.config.backends[i];
                let member = self.member(i).cloned();
                let mut tags = member.as_ref().map(|m| m.tags.clone()).unwrap_or_default();
                tags.extend(config.tags.iter().map(|(k, v)| (k.clone(), v.clone())));
                BackendEntry {
                    config: config.clone(),
                    state: self.states[i].clone(),
                    role: roles[i],
                    fenced: self.fencing.fenced.get(&i).cloned(),
                    admin: self.admin[i],
                    lag: self.lags[i],
                    load: self.loads[i].clone(),
                    member,
                    vetoed: self.vetoed(i, &roles),
                    tags,
                    rejoining: self.rejoining(i, roles[i], timeline),
                }
            })
            .collect();
        let primaries: Vec<String> = backends
            .iter()
            .filter(|b| b.serving() && b.role == ObservedRole::Primary)
            .map(|b| b.config.name.clone())
            .collect();
        let mut table = RoutingTable {
            generation: self.generation,
            down_after: self.config.health.down_after,
            split_brain: self.config.multi_primary == MultiPrimary::Fence && primaries.len() > 1,
            primary_visible: !primaries.is_empty(),
            restarting: self.restarting(!primaries.is_empty()),
            // A cluster read from Patroni waits for its first read too.
            all_checked: self.states.iter().all(|s| s.checked)
                && (self.config.patroni.is_none() || self.patroni.as_ref().is_some_and(|p| p.trust != Trust::NotRead)),
            awaiting_shared: self.awaiting_shared,
            identity: self.identity(),
            patroni: self.patroni.clone(),
            backends,
            listeners: Vec::new(),
        };
        let gates = &self.gates;
        let primary_visible = table.primary_visible;
        table.listeners = self
            .config
            .listeners
            .iter()
            .enumerate()
            // While no primary is visible, lag is not judged: ro keeps
            // serving. A replica that has not shown it follows the current
            // timeline never serves reads.
            .map(|(l, c)| {
                ListenerRoute::build(c, &table, |i| {
                    table.backends[i].rejoining.is_none() && (!primary_visible || gates[l][i].admitted)
                })
            })
            .collect();
        let mut events = Vec::new();
        let was_split = self.last.as_ref().is_some_and(|t| t.split_brain);
        if table.split_brain && !was_split {
            events.push(Event::SplitBrain { primaries });
        } else if was_split && !table.split_brain {
            events.push(Event::SplitBrainOver);
        }
        if self.last.as_ref().is_none_or(|last| routing_differs(last, &table)) {
            self.generation += 1;
            table.generation = self.generation;
        }
        self.last = Some(table.clone());
        (table, events)
    }
}

/// Anything a router or a session verdict depends on.
fn routing_differs(a: &RoutingTable, b: &RoutingTable) -> bool {
    let backend_key =
        |e: &BackendEntry| (e.state.up, e.state.degraded, e.role, e.fenced.is_some(), e.vetoed.is_some(), e.admin);
    a.split_brain != b.split_brain
        || a.standby_leader() != b.standby_leader()
        || a.identity.pending != b.identity.pending
        || a.all_checked != b.all_checked
        || a.awaiting_shared != b.awaiting_shared
        || a.restarting != b.restarting
        || a.backends.len() != b.backends.len()
        || a.backends.iter().zip(&b.backends).any(|(x, y)| backend_key(x) != backend_key(y))
        || a.listeners
            .iter()
            .zip(&b.listeners)
            .any(|(x, y)| x.eligible != y.eligible || x.lagging != y.lagging || x.degraded != y.degraded)
}
