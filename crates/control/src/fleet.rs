//! A cluster's part in a fleet of pglb instances: which of its shared
//! items (admin states, timeline fences, the highest timeline) changed
//! here and must be written to the store, and which changed elsewhere and
//! must be applied here. The topology task owns it, so a change and its
//! effect on routing are one step; the store agent (`pglb-store`) does the
//! I/O.
//!
//! The rules (README "Fleet"):
//! - a local change is written with compare-and-swap on the revision this
//!   instance last saw of the item; if another instance changed it in the
//!   meantime, the precedence decides (disable > drain > enable; fenced >
//!   not fenced; the higher timeline), never the order of arrival;
//! - a change made while the store is unreachable is applied here at once
//!   and queued with that revision: when the store returns, it meets the
//!   same rule;
//! - at start and after every outage, the store's items replace what this
//!   instance restored from its state file, except for items the store does
//!   not hold yet (they are written: the first instance seeds the store);
//! - only changes are written (an item that differs here for local reasons,
//!   e.g. a system-identifier fence, is not pushed over the fleet's).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use pglb_routing::{AdminState, ItemKey, ItemValue, Topology};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::publisher::Command;

/// An item as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub value: ItemValue,
    /// etcd's `mod_revision`.
    pub revision: i64,
    /// Who wrote it, and when (their clock).
    pub instance: String,
    pub at_unix_ms: u64,
}

/// From the store agent to a cluster's topology task.
#[derive(Debug)]
pub enum FleetInput {
    /// Every item the store holds for the cluster's identifier, read
    /// linearizably (at start, after an outage, and every `sync_interval`).
    Snapshot { system_id: u64, items: Vec<(ItemKey, Stored)> },
    /// One item changed (the watch).
    Changed { system_id: u64, key: ItemKey, stored: Stored },
    /// The outcome of a write this task asked for.
    Written { system_id: u64, key: ItemKey, outcome: WriteOutcome },
    /// Whether the store answers.
    Reachable(bool),
}

#[derive(Debug)]
pub enum WriteOutcome {
    Done {
        revision: i64,
    },
    /// The item changed since the revision the write was based on: what the
    /// store holds now (`None`: nothing).
    Conflict {
        current: Option<Stored>,
    },
    /// The store did not answer: kept until it returns.
    Unreachable,
}

/// From a topology task to the store agent.
#[derive(Debug)]
pub enum Request {
    /// The cluster's identifier is settled: send its items (now and as they
    /// change) to `to`.
    Subscribe { cluster: Arc<str>, system_id: u64, to: mpsc::WeakSender<Command> },
    /// Write `value` if the item's revision is still `base` (0: absent).
    Write { cluster: Arc<str>, system_id: u64, key: ItemKey, value: ItemValue, base: i64 },
}

/// What `/status` shows of a cluster's shared state.
#[derive(Debug, Clone, Default)]
pub struct FleetView {
    pub instance: String,
    pub system_id: Option<u64>,
    pub reachable: bool,
    /// The store's items were read since the last outage.
    pub synced: bool,
    /// The store's items, with the local backend each names.
    pub items: Vec<ItemView>,
    /// Local changes not yet in the store.
    pub pending: Vec<(ItemKey, ItemValue)>,
    pub conflicts: u64,
    pub last_conflict: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ItemView {
    pub key: ItemKey,
    pub backend: Option<String>,
    pub stored: Stored,
}

/// A local change on its way to the store.
#[derive(Debug, Clone)]
struct Pending {
    value: ItemValue,
    /// The revision it is based on; `None` until the store was read.
    base: Option<i64>,
    /// The value written now, while the store has not answered: a change
    /// made meanwhile waits for that answer (its revision is the next base).
    sent: Option<ItemValue>,
}

/// One cluster's link to the fleet.
pub struct Fleet {
    agent: mpsc::UnboundedSender<Request>,
    instance: String,
    cluster: Arc<str>,
    /// This task's own inbox, for the agent to answer.
    inbox: Option<mpsc::WeakSender<Command>>,
    system_id: Option<u64>,
    reachable: bool,
    synced: bool,
    /// The store's items for this identifier were read at least once.
    read_once: bool,
    known: BTreeMap<ItemKey, Stored>,
    /// The items as this instance held them after the last step.
    local: BTreeMap<ItemKey, ItemValue>,
    pending: BTreeMap<ItemKey, Pending>,
    conflicts: u64,
    last_conflict: Option<String>,
    view: Arc<ArcSwap<FleetView>>,
    /// Until the store's items were first read, or the store was found
    /// unreachable (then the state file is the cache): no writes routed.
    awaiting: bool,
}

impl Fleet {
    pub fn new(agent: mpsc::UnboundedSender<Request>, instance: String, cluster: Arc<str>) -> Self {
        let view = Arc::new(ArcSwap::from_pointee(FleetView { instance: instance.clone(), ..FleetView::default() }));
        Self {
            agent,
            instance,
            cluster,
            inbox: None,
            system_id: None,
            reachable: false,
            synced: false,
            read_once: false,
            known: BTreeMap::new(),
            local: BTreeMap::new(),
            pending: BTreeMap::new(),
            conflicts: 0,
            last_conflict: None,
            view,
            awaiting: true,
        }
    }

    pub fn set_inbox(&mut self, inbox: mpsc::WeakSender<Command>) {
        self.inbox = Some(inbox);
    }

    pub fn view(&self) -> Arc<ArcSwap<FleetView>> {
        self.view.clone()
    }

    /// Whether a change made now reaches the store at once.
    pub fn sharing(&self) -> bool {
        self.reachable && self.synced
    }

    /// After every change to `topology`: subscribes once the identity is
    /// settled, gives backends that appeared the fleet's items, and sends
    /// local changes to the store.
    pub fn step(&mut self, topology: &mut Topology) {
        let system_id = topology.system_id();
        if system_id != self.system_id {
            self.resubscribe(system_id);
        }
        let now = topology.shared();
        let mut appeared = false;
        for (key, value) in &now {
            match self.local.get(key) {
                Some(before) if !before.same_as(value) => self.changed_here(key, value.clone()),
                Some(_) => {}
                None => {
                    if let Some(stored) = self.known.get(key).filter(|s| !s.value.same_as(value)) {
                        appeared |= topology.apply_shared(key, &stored.value);
                    }
                }
            }
        }
        self.local = if appeared { topology.shared() } else { now };
        topology.set_awaiting_shared(self.awaiting);
        self.publish_view();
    }

    /// Applies what the store agent says; the caller publishes after.
    pub fn input(&mut self, input: FleetInput, topology: &mut Topology) {
        let ours = |id: u64| Some(id) == self.system_id;
        match input {
            FleetInput::Reachable(up) => {
                if !up {
                    if self.awaiting {
                        tracing::warn!(cluster = %self.cluster, "etcd is unreachable at start: routing with the state file's fences and admin states until it answers");
                    }
                    self.awaiting = false;
                    self.synced = false;
                    for pending in self.pending.values_mut() {
                        pending.sent = None;
                    }
                }
                self.reachable = up;
            }
            FleetInput::Snapshot { system_id, items } if ours(system_id) => self.snapshot(items, topology),
            FleetInput::Changed { system_id, key, stored } if ours(system_id) => {
                self.changed_there(key, stored, topology)
            }
            FleetInput::Written { system_id, key, outcome } if ours(system_id) => self.written(key, outcome, topology),
            _ => {}
        }
        self.publish_view();
    }

    fn resubscribe(&mut self, system_id: Option<u64>) {
        self.system_id = system_id;
        self.synced = false;
        self.read_once = false;
        self.known.clear();
        // Changes made before the identity settled stay, based on nothing
        // yet: the store's items decide by precedence.
        for pending in self.pending.values_mut() {
            pending.base = None;
            pending.sent = None;
        }
        if let (Some(system_id), Some(to)) = (system_id, self.inbox.clone()) {
            let _ = self.agent.send(Request::Subscribe { cluster: self.cluster.clone(), system_id, to });
        }
    }

    /// A change made here (an operator's action, this instance's evidence).
    fn changed_here(&mut self, key: &ItemKey, value: ItemValue) {
        let value = match (&value, self.known.get(key).map(|s| &s.value)) {
            // Lower than the fleet's: only an operator's unfence does that.
            (ItemValue::Timeline { timeline, .. }, Some(ItemValue::Timeline { timeline: fleet, .. }))
                if timeline < fleet =>
            {
                ItemValue::Timeline { timeline: *timeline, reset: true }
            }
            _ => value,
        };
        if let Some(pending) = self.pending.get_mut(key).filter(|p| p.sent.is_some()) {
            pending.value = value;
            return;
        }
        let base = self.pending.get(key).and_then(|p| p.base).or_else(|| self.base(key));
        self.pending.insert(key.clone(), Pending { value, base, sent: None });
        self.send(key);
    }

    /// The revision a change to `key` is based on: the last this instance
    /// saw (during an outage too), once the store was read.
    fn base(&self, key: &ItemKey) -> Option<i64> {
        self.read_once.then(|| self.known.get(key).map_or(0, |s| s.revision))
    }

    fn send(&mut self, key: &ItemKey) {
        let (Some(system_id), true) = (self.system_id, self.sharing()) else { return };
        let Some(pending) = self.pending.get_mut(key).filter(|p| p.sent.is_none()) else { return };
        let Some(base) = pending.base else { return };
        pending.sent = Some(pending.value.clone());
        let _ = self.agent.send(Request::Write {
            cluster: self.cluster.clone(),
            system_id,
            key: key.clone(),
            value: pending.value.clone(),
            base,
        });
    }

    fn snapshot(&mut self, items: Vec<(ItemKey, Stored)>, topology: &mut Topology) {
        self.synced = true;
        self.read_once = true;
        self.awaiting = false;
        // What changed since it was last known (everything, the first
        // time): as if the watch had said so. The store's items replace
        // what the state file restored.
        for (key, item) in items {
            self.changed_there(key, item, topology);
        }
        // Changes made while the store was away meet the fleet's now.
        let keys: Vec<ItemKey> = self.pending.keys().cloned().collect();
        for key in keys {
            self.rebase(&key, topology);
        }
        // What the store lacks, this instance seeds.
        let local = self.local.clone();
        for (key, value) in &local {
            if !self.pending.contains_key(key) && !self.known.contains_key(key) && !default_value(value) {
                self.pending.insert(key.clone(), Pending { value: value.clone(), base: Some(0), sent: None });
                self.send(key);
            }
        }
    }

    /// A pending change whose base may be stale: written if nothing
    /// changed since, else by precedence.
    fn rebase(&mut self, key: &ItemKey, topology: &mut Topology) {
        // A write on its way: its answer decides (sending it twice would
        // race the copy based on the older revision against the other).
        let Some(pending) = self.pending.get(key).filter(|p| p.sent.is_none()).cloned() else { return };
        let current = self.known.get(key).cloned();
        let current_revision = current.as_ref().map_or(0, |s| s.revision);
        match current {
            Some(item) if item.value.same_as(&pending.value) => {
                self.pending.remove(key);
            }
            _ if pending.base == Some(current_revision) || current_revision == 0 => {
                self.pending.insert(key.clone(), Pending { base: Some(current_revision), sent: None, ..pending });
                self.send(key);
            }
            Some(item) => self.resolve(key, pending, item, topology),
            None => {}
        }
    }

    /// Two changes to one item: ours (`pending`) and `theirs`, made without
    /// seeing each other. Precedence decides.
    fn resolve(&mut self, key: &ItemKey, pending: Pending, theirs: Stored, topology: &mut Topology) {
        self.conflicts += 1;
        let ours_wins = pending.value.prevails_over(&theirs.value);
        let text = format!(
            "{key}: ours ({}) and {}'s ({}, revision {}) were made concurrently; {} prevails",
            describe(&pending.value),
            theirs.instance,
            describe(&theirs.value),
            theirs.revision,
            if ours_wins { "ours" } else { "theirs" }
        );
        let prevailed = if ours_wins { "local" } else { "remote" };
        metrics::counter!("pglb_shared_state_conflicts_total", "cluster" => self.cluster.to_string(), "prevailed" => prevailed)
            .increment(1);
        tracing::warn!(cluster = %self.cluster, item = %key, "shared state conflict: {text}");
        self.last_conflict = Some(text);
        if ours_wins {
            self.pending.insert(key.clone(), Pending { base: Some(theirs.revision), sent: None, ..pending });
            self.send(key);
        } else {
            self.pending.remove(key);
            self.apply(key, &theirs, topology);
        }
    }

    fn changed_there(&mut self, key: ItemKey, stored: Stored, topology: &mut Topology) {
        if self.known.get(&key).is_some_and(|k| k.revision >= stored.revision) {
            return;
        }
        self.known.insert(key.clone(), stored.clone());
        if let Some(pending) = self.pending.get(&key) {
            // Our write is on its way (its outcome decides), or waits for
            // the store: the same rule when it is sent.
            if stored.value.same_as(&pending.value) && pending.sent.is_none() {
                self.pending.remove(&key);
            }
            return;
        }
        let here = self.local.get(&key);
        if here.is_some_and(|v| !v.same_as(&stored.value)) {
            self.apply(&key, &stored, topology);
        }
    }

    fn written(&mut self, key: ItemKey, outcome: WriteOutcome, topology: &mut Topology) {
        let Some(mut pending) = self.pending.get(&key).cloned() else { return };
        let Some(sent) = pending.sent.take() else { return };
        match outcome {
            WriteOutcome::Done { revision } => {
                let stored =
                    Stored { value: sent.clone(), revision, instance: self.instance.clone(), at_unix_ms: now_ms() };
                if self.known.get(&key).is_none_or(|k| k.revision < revision) {
                    self.known.insert(key.clone(), stored);
                }
                if pending.value.same_as(&sent) {
                    self.pending.remove(&key);
                } else {
                    // Changed again while the write was on its way.
                    self.pending.insert(key.clone(), Pending { base: Some(revision), ..pending });
                    self.send(&key);
                }
            }
            WriteOutcome::Conflict { current: Some(item) } => {
                if self.known.get(&key).is_none_or(|k| k.revision < item.revision) {
                    self.known.insert(key.clone(), item.clone());
                }
                if item.value.same_as(&pending.value) {
                    self.pending.remove(&key);
                } else {
                    self.resolve(&key, pending, item, topology);
                }
            }
            WriteOutcome::Conflict { current: None } => {
                self.known.remove(&key);
                self.pending.insert(key.clone(), Pending { base: Some(0), ..pending });
                self.send(&key);
            }
            WriteOutcome::Unreachable => {
                self.pending.insert(key, pending);
            }
        }
    }

    /// Applies the fleet's `item` here.
    fn apply(&mut self, key: &ItemKey, item: &Stored, topology: &mut Topology) {
        if !topology.apply_shared(key, &item.value) {
            return;
        }
        metrics::counter!("pglb_shared_state_applied_total", "cluster" => self.cluster.to_string()).increment(1);
        tracing::info!(
            cluster = %self.cluster,
            item = %key,
            value = describe(&item.value),
            instance = item.instance,
            revision = item.revision,
            "applied a change another pglb shared"
        );
        if let Some(value) = topology.shared().remove(key) {
            self.local.insert(key.clone(), value);
        }
    }

    fn publish_view(&self) {
        let backends = |key: &ItemKey| match key {
            ItemKey::Admin(node) | ItemKey::Fence(node) => Some(node.to_string()),
            ItemKey::Timeline => None,
        };
        let items = self
            .known
            .iter()
            .map(|(key, stored)| ItemView { key: key.clone(), backend: backends(key), stored: stored.clone() })
            .collect();
        let pending = self.pending.iter().map(|(k, p)| (k.clone(), p.value.clone())).collect::<Vec<_>>();
        metrics::gauge!("pglb_shared_state_pending_changes", "cluster" => self.cluster.to_string())
            .set(pending.len() as f64);
        self.view.store(Arc::new(FleetView {
            instance: self.instance.clone(),
            system_id: self.system_id,
            reachable: self.reachable,
            synced: self.synced,
            items,
            pending,
            conflicts: self.conflicts,
            last_conflict: self.last_conflict.clone(),
        }));
    }
}

/// Whether `value` is what an item the store lacks means.
fn default_value(value: &ItemValue) -> bool {
    match value {
        ItemValue::Admin(state) => *state == AdminState::Enabled,
        ItemValue::Fence(fence) => fence.is_none(),
        ItemValue::Timeline { timeline, .. } => *timeline == 0,
    }
}

/// An item's value for people.
pub fn describe(value: &ItemValue) -> String {
    match value {
        ItemValue::Admin(state) => state.as_str().into(),
        ItemValue::Fence(Some(reason)) => format!("fenced: {reason}"),
        ItemValue::Fence(None) => "not fenced".into(),
        ItemValue::Timeline { timeline, reset: false } => format!("timeline {timeline}"),
        ItemValue::Timeline { timeline, reset: true } => format!("timeline {timeline} (reset by an unfence)"),
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default()
}

/// An item's value in the store, as JSON.
#[derive(Serialize, Deserialize)]
struct Document {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    admin_state: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    fenced: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    timeline: Option<u32>,
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    reset: bool,
    instance: String,
    at_unix_ms: u64,
}

/// The bytes stored for `value`, written by `instance` now.
pub fn encode(value: &ItemValue, instance: &str) -> Vec<u8> {
    let mut doc = Document {
        admin_state: None,
        fenced: None,
        reason: None,
        timeline: None,
        reset: false,
        instance: instance.to_owned(),
        at_unix_ms: now_ms(),
    };
    match value {
        ItemValue::Admin(state) => doc.admin_state = Some(state.as_str().into()),
        ItemValue::Fence(reason) => {
            doc.fenced = Some(reason.is_some());
            doc.reason = reason.clone();
        }
        ItemValue::Timeline { timeline, reset } => {
            doc.timeline = Some(*timeline);
            doc.reset = *reset;
        }
    }
    serde_json::to_vec(&doc).unwrap_or_default()
}

/// The stored item for `key` from its bytes; `None` if they are not one
/// (written by something else: ignored and logged by the caller).
pub fn decode(key: &ItemKey, bytes: &[u8], revision: i64) -> Option<Stored> {
    let doc: Document = serde_json::from_slice(bytes).ok()?;
    let value = match key {
        ItemKey::Admin(_) => ItemValue::Admin(AdminState::parse(doc.admin_state.as_deref()?)?),
        ItemKey::Fence(_) => match doc.fenced? {
            true => ItemValue::Fence(Some(doc.reason.unwrap_or_default())),
            false => ItemValue::Fence(None),
        },
        ItemKey::Timeline => ItemValue::Timeline { timeline: doc.timeline?, reset: doc.reset },
    };
    Some(Stored { value, revision, instance: doc.instance, at_unix_ms: doc.at_unix_ms })
}
