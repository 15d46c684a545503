//! The single writer of routing tables. Check reports, operator actions and
//! config changes arrive as [`Command`]s; each is applied to the pure
//! [`pglb_routing::Topology`], and the table it builds is published through
//! the `ArcSwap` (and its generation through a watch channel, for sessions
//! waiting on routing changes). Nothing else stores tables, so two publishes
//! never interleave.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use pglb_config::{Cluster, Role};
use pglb_routing::{
    ActionError, AdminState, CheckError, Event, FailureKind, FenceChange, GateChange, Health, Observation, PatroniView,
    RoutingTable, SavedState, Transition, Trust,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::fleet::{Fleet, FleetInput, FleetView};
use crate::state_file::Update;
use crate::table_metrics::export_table;

/// Work for the topology task.
pub enum Command {
    /// One check's outcome, from a checker task, and when it was seen.
    Report { backend: String, observation: Observation, at: Instant },
    /// An operator sets a backend's admin state.
    Admin { backend: String, state: AdminState, reply: oneshot::Sender<Result<(), ActionError>> },
    /// An operator clears a fence.
    Unfence { backend: String, reply: oneshot::Sender<Result<bool, ActionError>> },
    /// What Patroni says now (members, leader lock, tags), from the
    /// cluster's Patroni reader.
    Patroni { view: PatroniView },
    /// A reload changed this cluster: its next config (already validated).
    Reconfigure { config: Arc<Cluster>, reply: oneshot::Sender<()> },
    /// The safety state now, for a new process taking over. With
    /// `hand_over`, this process stops writing the state file (the new one
    /// owns it from here) until [`Command::KeepSaving`].
    Saved { hand_over: bool, reply: oneshot::Sender<SavedState> },
    /// This process owns the state file (again, if an upgrade failed; from
    /// now on, in a process that took over): it is written at once.
    KeepSaving,
    /// The old process's final state, replacing `over` (the state it handed
    /// over first), applied where it fits (as at start).
    Restore { saved: SavedState, over: SavedState, reply: oneshot::Sender<Vec<String>> },
    /// From the fleet's store (`shared_state:`).
    Fleet(FleetInput),
}

/// Handles the rest of pglb holds on the topology task.
#[derive(Clone)]
pub struct TopologyHandle {
    /// The cluster's name (fixed for the task's life).
    pub cluster: Arc<str>,
    /// What was restored at start, one line each (for /status), and from
    /// where: `state_file`, or `upgrade` (the process this one took over
    /// from); `None` when there was nowhere to restore from (no state file).
    pub restored: Arc<Vec<String>>,
    pub restored_from: Option<&'static str>,
    pub commands: mpsc::Sender<Command>,
    pub table: Arc<ArcSwap<RoutingTable>>,
    /// The routing generation; changes when choices or verdicts may change.
    pub generation: watch::Receiver<u64>,
    /// Until when checks run at `fast_interval`.
    pub fast_until: watch::Receiver<Instant>,
    /// Woken when a check sees a role change: Patroni is read again at
    /// once rather than at its next interval.
    pub role_changed: Arc<tokio::sync::Notify>,
    /// The cluster's shared state (with `shared_state:`).
    pub fleet: Option<Arc<ArcSwap<FleetView>>>,
}

/// The task's state: one cluster's.
pub struct Publisher {
    cluster: Arc<str>,
    topology: pglb_routing::Topology,
    table: Arc<ArcSwap<RoutingTable>>,
    generation: watch::Sender<u64>,
    fast_until: watch::Sender<Instant>,
    /// The state file's writer and what it was last sent.
    saver: Option<(std::sync::mpsc::Sender<Update>, SavedState)>,
    /// Set once the state was handed to a new process: no more writes.
    handed_over: bool,
    role_changed: Arc<tokio::sync::Notify>,
    /// The link to the fleet's store (with `shared_state:`).
    fleet: Option<Fleet>,
}

/// Where the state restored at start comes from.
pub enum Origin {
    /// Nowhere: the config names no state file.
    Nothing,
    /// The state file's entry for this cluster (`None`: it has none).
    StateFile(Option<SavedState>),
    /// The running pglb this process takes over from (its in-memory state).
    HandedOver(SavedState),
}

impl Publisher {
    /// A publisher for `cluster` and the handle to reach it; `saver`: the
    /// state file's writer, if there is a state file.
    pub fn new(
        cluster: Arc<Cluster>,
        origin: Origin,
        saver: Option<std::sync::mpsc::Sender<Update>>,
        fleet: Option<Fleet>,
    ) -> (Self, TopologyHandle, mpsc::Receiver<Command>) {
        let name: Arc<str> = cluster.name.as_str().into();
        let mut topology = pglb_routing::Topology::new(cluster);
        // A process taking over writes the state file only once it serves
        // (Command::KeepSaving); until then the running one owns it.
        let (restored, handed_over, restored_from) = match origin {
            Origin::HandedOver(saved) => {
                (restore_handed(&name, &mut topology, &SavedState::default(), saved), true, Some("upgrade"))
            }
            Origin::StateFile(saved) => (restore(&name, &mut topology, saved), false, Some("state_file")),
            Origin::Nothing => (Vec::new(), false, None),
        };
        let saver = saver.map(|writer| (writer, topology.saved()));
        let (tx, rx) = mpsc::channel(1024);
        let mut fleet = fleet;
        if let Some(fleet) = &mut fleet {
            fleet.set_inbox(tx.downgrade());
            fleet.step(&mut topology);
        }
        let (table, _) = topology.table();
        export_table(&name, &table);
        let (generation_tx, generation_rx) = watch::channel(table.generation);
        let (fast_tx, fast_rx) = watch::channel(Instant::now());
        let table = Arc::new(ArcSwap::from_pointee(table));
        let role_changed = Arc::new(tokio::sync::Notify::new());
        let handle = TopologyHandle {
            cluster: name.clone(),
            restored: Arc::new(restored),
            restored_from,
            commands: tx,
            table: table.clone(),
            generation: generation_rx,
            fast_until: fast_rx,
            role_changed: role_changed.clone(),
            fleet: fleet.as_ref().map(Fleet::view),
        };
        let publisher = Self {
            cluster: name,
            topology,
            table,
            generation: generation_tx,
            fast_until: fast_tx,
            saver,
            handed_over,
            role_changed,
            fleet,
        };
        (publisher, handle, rx)
    }

    /// Applies commands until every sender is gone.
    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        while let Some(command) = commands.recv().await {
            self.apply(command);
        }
    }

    fn apply(&mut self, command: Command) {
        let events = match command {
            Command::Report { backend, observation, at } => {
                if let Some(class) = observation.failure() {
                    let labels = [
                        ("cluster", self.cluster.to_string()),
                        ("backend", backend.clone()),
                        ("class", class.as_str().to_owned()),
                    ];
                    metrics::counter!("pglb_health_check_failures_total", &labels).increment(1);
                }
                self.topology.observe(&backend, observation, at)
            }
            Command::Admin { backend, state, reply } => {
                let result = self.topology.set_admin(&backend, state);
                if result.is_ok() {
                    tracing::warn!(backend, state = state.as_str(), "operator set backend admin state");
                }
                // Reply once the new table is live.
                self.publish(Vec::new());
                let _ = reply.send(result);
                return;
            }
            Command::Unfence { backend, reply } => {
                let result = self.topology.unfence(&backend);
                if let Ok(was) = &result {
                    tracing::warn!(backend, was_fenced = was, "operator cleared backend fence");
                }
                self.publish(Vec::new());
                let _ = reply.send(result);
                return;
            }
            Command::Patroni { view } => self.topology.set_patroni(view),
            Command::Reconfigure { config, reply } => {
                self.topology.reconfigure(config);
                self.publish(Vec::new());
                let _ = reply.send(());
                return;
            }
            Command::Saved { hand_over, reply } => {
                self.handed_over |= hand_over;
                let _ = reply.send(self.topology.saved());
                return;
            }
            Command::KeepSaving => {
                self.handed_over = false;
                if let Some((writer, last)) = &mut self.saver {
                    *last = self.topology.saved();
                    let _ = writer.send(Update::Cluster(self.cluster.to_string(), last.clone()));
                }
                return;
            }
            Command::Restore { saved, over, reply } => {
                let notes = restore_handed(&self.cluster, &mut self.topology, &over, saved);
                self.publish(Vec::new());
                let _ = reply.send(notes);
                return;
            }
            Command::Fleet(input) => {
                if let Some(fleet) = &mut self.fleet {
                    fleet.input(input, &mut self.topology);
                }
                Vec::new()
            }
        };
        self.publish(events);
    }

    fn publish(&mut self, mut events: Vec<Event>) {
        if let Some(fleet) = &mut self.fleet {
            fleet.step(&mut self.topology);
        }
        let (table, more) = self.topology.table();
        events.extend(more);
        let span = tracing::info_span!("cluster", cluster = %self.cluster);
        let _in = span.enter();
        for event in &events {
            log_event(event);
        }
        if events.iter().any(|e| matches!(e, Event::Backend { transition: Transition::Role { .. }, .. })) {
            self.role_changed.notify_one();
        }
        export_table(&self.cluster, &table);
        let changed = table.generation != *self.generation.borrow();
        // No primary to write to, or only a silent one: check at the fast
        // pace until that changes, so a promotion elsewhere (or the
        // primary's return) is seen within `fast_interval`.
        let unsettled =
            table.listeners.iter().any(|l| l.config.role == Role::Primary && (l.eligible.is_empty() || l.degraded));
        if changed || unsettled || !events.is_empty() {
            // Settling: check everyone at the fast pace for a while.
            let config = self.topology.config();
            let window = config.health.interval * 2 + config.health.fast_interval;
            let until = Instant::now() + window.max(Duration::from_millis(500));
            self.fast_until.send_if_modified(|current| {
                let later = until > *current + config.health.fast_interval;
                if later {
                    *current = until;
                }
                later
            });
        }
        let generation = table.generation;
        self.table.store(Arc::new(table));
        if let Some((writer, last)) = self.saver.as_mut().filter(|_| !self.handed_over) {
            let now = self.topology.saved();
            if now != *last {
                let _ = writer.send(Update::Cluster(self.cluster.to_string(), now.clone()));
                *last = now;
            }
        }
        // Race: a reader may load the new table before the generation moves;
        // that is fine, waiters re-read the table after every change.
        self.generation.send_if_modified(|g| {
            let moved = *g != generation;
            *g = generation;
            moved
        });
    }
}

fn log_event(event: &Event) {
    match event {
        Event::Backend { backend, transition: Transition::Health { from, to, error } } => {
            log_health(backend, *from, *to, error.as_ref())
        }
        Event::Backend { backend, transition: Transition::Role { from, to } } => {
            tracing::info!(backend, from = from.as_str(), to = to.as_str(), "backend role changed")
        }
        Event::Fence { backend, change: FenceChange::Fenced { reason, .. } } => {
            tracing::error!(backend, reason, "backend fenced: it gets no traffic until it rejoins as a replica or an operator unfences it")
        }
        Event::Fence { backend, change: FenceChange::Cleared { reason, .. } } => {
            tracing::warn!(backend, reason, "backend fence cleared")
        }
        Event::Lag { listener, backend, change, lag } => {
            let (bytes, seconds) = (lag.bytes, lag.seconds);
            match change {
                GateChange::Out => tracing::warn!(listener, backend, ?bytes, ?seconds, "replica lags over the limit: out of the pool"),
                GateChange::In => tracing::info!(listener, backend, ?bytes, ?seconds, "replica caught up: back in the pool"),
            }
        }
        Event::SplitBrain { primaries } => tracing::error!(
            ?primaries,
            "split brain: more than one backend is primary on the same timeline; primary listeners route to none until one remains"
        ),
        Event::Patroni { from, to: Trust::Lock, leader } => tracing::info!(
            from = from.as_str(),
            to = Trust::Lock.as_str(),
            leader = leader.as_deref().unwrap_or(""),
            "Patroni's leader lock is used: {}",
            Trust::Lock.explain()
        ),
        Event::Patroni { from, to, leader } => tracing::warn!(
            from = from.as_str(),
            to = to.as_str(),
            leader = leader.as_deref().unwrap_or(""),
            "{}",
            to.explain()
        ),
        Event::SplitBrainOver => tracing::warn!("split brain over: at most one primary is visible again"),
        Event::SavedTimelineIgnored { saved, now } => tracing::warn!(
            saved_system_identifier = saved,
            system_identifier = now,
            "the saved system identifier is not the one the config pins: the pinned one is used, the saved highest timeline is not"
        ),
        Event::AddressChanged { backend, from, to } => tracing::warn!(
            backend,
            %from,
            %to,
            "backend answered at a new address (its host name resolves elsewhere): checked anew as a new node; sessions go to the checked address only"
        ),
        Event::IdentitySettled { system_id, source } => {
            tracing::info!(system_identifier = system_id, source, "the cluster's system identifier is settled")
        }
        Event::IdentityUnsettled { in_doubt } => {
            let backends: Vec<String> = in_doubt.iter().map(|(b, id)| format!("{b}: {id}")).collect();
            tracing::error!(
                backends = backends.join(", "),
                "identity unsettled: the backends report different system identifiers in equal numbers and none is pinned or saved; nothing is routed until system_identifier: is set in the config (SELECT system_identifier FROM pg_control_system() on the real primary)"
            )
        }
    }
}

/// Applies the state handed over by the running pglb; returns what was restored.
fn restore_handed(
    cluster: &str,
    topology: &mut pglb_routing::Topology,
    over: &SavedState,
    saved: SavedState,
) -> Vec<String> {
    let notes = topology.restore_over(over, saved);
    for note in &notes {
        tracing::warn!(cluster, "restored from the running pglb: {note}");
    }
    notes
}

/// Applies the state file's entry for the cluster; returns what was restored.
fn restore(cluster: &str, topology: &mut pglb_routing::Topology, saved: Option<SavedState>) -> Vec<String> {
    let Some(saved) = saved else { return Vec::new() };
    let notes = topology.restore(saved);
    for note in &notes {
        tracing::warn!(cluster, "restored from the state file: {note}");
    }
    notes
}

/// One line per state change, saying what pglb now does about it.
fn log_health(backend: &str, from: Health, to: Health, error: Option<&CheckError>) {
    let reason = error.map(|e| e.reason.as_str()).unwrap_or("");
    let class = error.map(|e| e.class.as_str()).unwrap_or("");
    let (from, state) = (from.as_str(), to.as_str());
    match to {
        Health::Healthy => tracing::info!(backend, from, state, "backend is healthy"),
        Health::Degraded => tracing::warn!(
            backend, from, state, class, reason,
            "backend is degraded: it does not answer its checks; new clients avoid it while another candidate answers, its sessions are kept (down after health.down_after of silence)"
        ),
        Health::Unverified => tracing::error!(
            backend, from, state, class, reason,
            "backend is unverified: the health check itself fails, not necessarily the node; pglb keeps its last known state and sessions but cannot follow a promotion until the check works again"
        ),
        // The first check of a backend pglb never saw up: nothing to close.
        Health::Down if from == state => tracing::warn!(
            backend, state, class, reason,
            "backend is down: its first check failed; it gets no clients until a check passes"
        ),
        Health::Down => {
            let what = match error.map(|e| e.class.kind()) {
                Some(FailureKind::Monitoring) => "it has not answered a check since pglb started",
                Some(FailureKind::Silence) => "silent for too long",
                _ => "the node failed",
            };
            tracing::warn!(backend, from, state, class, reason, "backend is down: {what}; its sessions close")
        }
    }
}
