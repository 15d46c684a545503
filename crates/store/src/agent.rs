//! The store agent: one task per process that keeps the prefix's items
//! (a linearizable read at start, after every outage and every
//! `sync_interval`; a watch in between), hands each cluster's topology
//! task the items of its system identifier, and writes their changes.
//!
//! A watch that falls silent (a member that lost its leader without
//! telling, a dropped connection) is found by the periodic read: an item
//! newer than the watch delivered, twice in a row, restarts it. A watch
//! compacted past its start re-reads everything and starts again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use pglb_config::SharedStateConfig;
use pglb_control::fleet::{self, FleetInput, Request, Stored, WriteOutcome};
use pglb_control::Command;
use pglb_routing::ItemKey;
use tokio::sync::mpsc;

use crate::gateway::{Gateway, Kv, StoreError, Swap};
use crate::watch::{self, Heard};

/// What `/status` and the metrics show of the store.
#[derive(Debug, Clone, Default)]
pub struct StoreStatus {
    pub instance: String,
    pub prefix: String,
    pub reachable: bool,
    /// The endpoint last used.
    pub endpoint: String,
    /// The store's revision at the last read.
    pub revision: i64,
    pub last_sync_unix_ms: Option<u64>,
    /// Why it is unreachable (or refuses).
    pub error: Option<String>,
    pub watching: bool,
    /// The revision the watch last reported (an event or a progress
    /// notification).
    pub watch_revision: i64,
}

/// A running agent.
#[derive(Clone)]
pub struct Store {
    pub requests: mpsc::UnboundedSender<Request>,
    pub status: Arc<ArcSwap<StoreStatus>>,
    pub instance: String,
}

/// Starts the agent on `runtime`.
pub fn start(config: &SharedStateConfig, runtime: &tokio::runtime::Handle) -> Result<Store, StoreError> {
    let gateway = Arc::new(Gateway::new(&config.etcd)?);
    let status = Arc::new(ArcSwap::from_pointee(StoreStatus {
        instance: config.instance_id.clone(),
        prefix: config.etcd.prefix.clone(),
        endpoint: gateway.endpoint(),
        ..StoreStatus::default()
    }));
    let (requests, inbox) = mpsc::unbounded_channel();
    let agent = Agent {
        gateway,
        prefix: config.etcd.prefix.clone(),
        instance: config.instance_id.clone(),
        sync_interval: config.sync_interval,
        subscribers: Vec::new(),
        cache: BTreeMap::new(),
        stale_reads: 0,
        status: status.clone(),
        tried: false,
    };
    metrics::gauge!("pglb_shared_state_up").set(0.0);
    runtime.spawn(agent.run(inbox));
    Ok(Store { requests, status, instance: config.instance_id.clone() })
}

struct Subscriber {
    cluster: Arc<str>,
    system_id: u64,
    to: mpsc::WeakSender<Command>,
}

struct Agent {
    gateway: Arc<Gateway>,
    prefix: String,
    instance: String,
    sync_interval: Duration,
    subscribers: Vec<Subscriber>,
    /// Every pglb key: its value and revision.
    cache: BTreeMap<String, Kv>,
    /// Reads in a row that found an item newer than the watch delivered.
    stale_reads: u32,
    status: Arc<ArcSwap<StoreStatus>>,
    /// The store was read, or found unreachable, at least once.
    tried: bool,
}

/// Why the agent stops following the store and reads it all again.
enum Again {
    /// At once (a compacted or restarted watch).
    Now,
    /// After a pause: the store did not answer.
    Later(String),
}

impl Agent {
    async fn run(mut self, mut inbox: mpsc::UnboundedReceiver<Request>) {
        let mut pause = Duration::from_millis(200);
        loop {
            match self.read_all().await {
                Ok(revision) => {
                    pause = Duration::from_millis(200);
                    match self.follow(revision, &mut inbox).await {
                        Some(Again::Now) => continue,
                        Some(Again::Later(why)) => self.down(why).await,
                        None => return,
                    }
                }
                Err(e) => self.down(e.to_string()).await,
            }
            // Answer requests while waiting to try again.
            let until = tokio::time::Instant::now() + pause;
            pause = (pause * 2).min(self.sync_interval.max(Duration::from_secs(1)));
            loop {
                tokio::select! {
                    request = inbox.recv() => match request {
                        Some(request) => self.request(request).await,
                        None => return,
                    },
                    _ = tokio::time::sleep_until(until) => break,
                }
            }
        }
    }

    /// Follows the watch from `revision`, serving requests and re-reading
    /// every `sync_interval`; `None` when every cluster is gone.
    async fn follow(&mut self, revision: i64, inbox: &mut mpsc::UnboundedReceiver<Request>) -> Option<Again> {
        let (tx, mut heard) = mpsc::channel(256);
        let watch = tokio::spawn(watch::run(self.gateway.clone(), self.prefix.clone(), revision + 1, tx));
        let _stop = AbortOnDrop(watch);
        self.set(|s| s.watching = true);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + self.sync_interval, self.sync_interval);
        let again = loop {
            tokio::select! {
                request = inbox.recv() => match request {
                    Some(request) => {
                        if let Err(e) = self.write_or_subscribe(request).await {
                            break Some(Again::Later(e.to_string()));
                        }
                    }
                    None => break None,
                },
                message = heard.recv() => match message {
                    Some(Heard::Changes(kvs)) => {
                        let top = kvs.iter().map(|kv| kv.mod_revision).max().unwrap_or_default();
                        self.set(|s| s.watch_revision = s.watch_revision.max(top));
                        self.changed(kvs).await;
                    }
                    Some(Heard::Progress(revision)) => self.set(|s| s.watch_revision = s.watch_revision.max(revision)),
                    Some(Heard::Ended { why, compacted }) => {
                        match compacted {
                            Some(at) => tracing::warn!(compacted = at, "the etcd watch was compacted past its start: reading every item again"),
                            None => tracing::warn!(reason = %why, "the etcd watch ended: reading every item again and watching anew"),
                        }
                        break Some(Again::Now);
                    }
                    None => break Some(Again::Now),
                },
                _ = tick.tick() => match self.read_all().await {
                    // Twice in a row: not a change still on its way.
                    Ok(_) if self.stale_reads >= 2 => {
                        tracing::warn!("the etcd watch missed changes two reads in a row found: watching anew");
                        self.stale_reads = 0;
                        break Some(Again::Now);
                    }
                    Ok(_) => {}
                    Err(e) => break Some(Again::Later(e.to_string())),
                },
            }
        };
        self.set(|s| s.watching = false);
        again
    }

    async fn request(&mut self, request: Request) {
        let _ = self.write_or_subscribe(request).await;
    }

    /// Serves one request; an error means the store stopped answering.
    async fn write_or_subscribe(&mut self, request: Request) -> Result<(), StoreError> {
        match request {
            Request::Subscribe { cluster, system_id, to } => {
                self.subscribers.retain(|s| s.cluster != cluster);
                self.subscribers.push(Subscriber { cluster: cluster.clone(), system_id, to });
                let reachable = self.status.load().reachable;
                let sub = self.subscribers.len() - 1;
                // Before the first read, its outcome answers.
                if !self.tried {
                    return Ok(());
                }
                self.send(sub, FleetInput::Reachable(reachable)).await;
                if reachable {
                    let items = self.items_of(system_id);
                    self.send(sub, FleetInput::Snapshot { system_id, items }).await;
                }
                Ok(())
            }
            Request::Write { cluster, system_id, key, value, base } => {
                let path = format!("{}{system_id}/{}", self.prefix, key.path());
                let bytes = fleet::encode(&value, &self.instance);
                let (outcome, failed) = if !self.status.load().reachable {
                    (WriteOutcome::Unreachable, None)
                } else {
                    match self.gateway.swap(&path, &bytes, base).await {
                        Ok(Swap::Done(revision)) => {
                            let kv = Kv { key: path, value: bytes, mod_revision: revision };
                            self.cache.insert(kv.key.clone(), kv);
                            (WriteOutcome::Done { revision }, None)
                        }
                        Ok(Swap::Conflict(current)) => {
                            let current = current.and_then(|kv| {
                                let stored = fleet::decode(&key, &kv.value, kv.mod_revision);
                                self.cache.insert(kv.key.clone(), kv);
                                stored
                            });
                            (WriteOutcome::Conflict { current }, None)
                        }
                        Err(e @ StoreError::Refused(_)) => {
                            tracing::error!(cluster = %cluster, item = %key, error = %e, "etcd refused a write of the shared state: it stays queued here; give pglb's etcd user write access to the prefix");
                            self.set(|s| s.error = Some(e.to_string()));
                            (WriteOutcome::Unreachable, None)
                        }
                        Err(e) => (WriteOutcome::Unreachable, Some(e)),
                    }
                };
                if let Some(sub) = self.subscribers.iter().position(|s| s.cluster == cluster) {
                    self.send(sub, FleetInput::Written { system_id, key, outcome }).await;
                }
                failed.map_or(Ok(()), Err)
            }
        }
    }

    /// Reads every item (linearizable), delivers what is new to each
    /// cluster, and returns the store's revision.
    async fn read_all(&mut self) -> Result<i64, StoreError> {
        let (revision, kvs) = self.gateway.range(&self.prefix).await?;
        let watching = self.status.load().watching;
        let mut stale = false;
        let mut fresh = BTreeMap::new();
        for kv in kvs {
            match self.cache.get(&kv.key) {
                // The watch already delivered a later one.
                Some(cached) if cached.mod_revision > kv.mod_revision => {
                    fresh.insert(kv.key.clone(), cached.clone());
                }
                Some(cached) if cached.mod_revision == kv.mod_revision => {
                    fresh.insert(kv.key.clone(), kv);
                }
                _ => {
                    stale |= watching;
                    fresh.insert(kv.key.clone(), kv);
                }
            }
        }
        // Written after the read (by the watch or this agent): kept.
        for (key, kv) in &self.cache {
            if kv.mod_revision > revision {
                fresh.entry(key.clone()).or_insert_with(|| kv.clone());
            }
        }
        self.stale_reads = if stale { self.stale_reads + 1 } else { 0 };
        self.cache = fresh;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default();
        let was = self.status.load().reachable;
        self.tried = true;
        let endpoint = self.gateway.endpoint();
        self.set(|s| {
            s.reachable = true;
            s.revision = revision;
            s.last_sync_unix_ms = Some(now);
            s.error = None;
            s.endpoint = endpoint.clone();
        });
        metrics::gauge!("pglb_shared_state_up").set(1.0);
        metrics::gauge!("pglb_shared_state_last_sync_timestamp_seconds").set(now as f64 / 1000.0);
        if !was {
            tracing::info!(endpoint = %endpoint, revision, "etcd answers: the shared state is read and followed");
        }
        for sub in 0..self.subscribers.len() {
            if !was {
                self.send(sub, FleetInput::Reachable(true)).await;
            }
            let system_id = self.subscribers[sub].system_id;
            let items = self.items_of(system_id);
            self.send(sub, FleetInput::Snapshot { system_id, items }).await;
        }
        Ok(revision)
    }

    async fn down(&mut self, why: String) {
        let was = self.status.load().reachable;
        self.set(|s| {
            s.reachable = false;
            s.error = Some(why.clone());
        });
        metrics::gauge!("pglb_shared_state_up").set(0.0);
        let first = !self.tried;
        self.tried = true;
        if was || first {
            tracing::error!(error = %why, "etcd does not answer: routing goes on with the last known shared state; changes made here are queued until it returns");
            for sub in 0..self.subscribers.len() {
                self.send(sub, FleetInput::Reachable(false)).await;
            }
        }
    }

    /// Items the watch delivered.
    async fn changed(&mut self, kvs: Vec<Kv>) {
        for kv in kvs {
            if self.cache.get(&kv.key).is_some_and(|c| c.mod_revision >= kv.mod_revision) {
                continue;
            }
            let parsed = self.parse(&kv);
            self.cache.insert(kv.key.clone(), kv);
            if let Some((system_id, key, stored)) = parsed {
                for sub in 0..self.subscribers.len() {
                    if self.subscribers[sub].system_id == system_id {
                        let input = FleetInput::Changed { system_id, key: key.clone(), stored: stored.clone() };
                        self.send(sub, input).await;
                    }
                }
            }
        }
    }

    /// The system identifier, item and value a key holds; `None` for keys
    /// that are not pglb's (logged once per revision at debug level).
    fn parse(&self, kv: &Kv) -> Option<(u64, ItemKey, Stored)> {
        let rest = kv.key.strip_prefix(&self.prefix)?;
        let (system_id, path) = rest.split_once('/')?;
        let system_id: u64 = system_id.parse().ok()?;
        let key = ItemKey::parse(path)?;
        match fleet::decode(&key, &kv.value, kv.mod_revision) {
            Some(stored) => Some((system_id, key, stored)),
            None => {
                tracing::warn!(key = %kv.key, "an etcd key under pglb's prefix holds no pglb item: ignored");
                None
            }
        }
    }

    fn items_of(&self, system_id: u64) -> Vec<(ItemKey, Stored)> {
        self.cache
            .values()
            .filter_map(|kv| self.parse(kv))
            .filter(|(id, _, _)| *id == system_id)
            .map(|(_, key, stored)| (key, stored))
            .collect()
    }

    /// Sends to subscriber `sub`; a cluster that is gone is forgotten.
    async fn send(&mut self, sub: usize, input: FleetInput) {
        let Some(to) = self.subscribers.get(sub).and_then(|s| s.to.upgrade()) else { return };
        let _ = to.send(Command::Fleet(input)).await;
    }

    fn set(&self, change: impl Fn(&mut StoreStatus)) {
        let mut status = StoreStatus::clone(&self.status.load());
        change(&mut status);
        self.status.store(Arc::new(status));
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
