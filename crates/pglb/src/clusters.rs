//! The clusters a running pglb serves. Each has its own topology task (on
//! the control runtime), its own checkers, and what its listeners share:
//! its routing table, generation and capacity. Nothing routing-related is
//! shared between clusters, so a failover, fence or reload of one never
//! republishes another's table; what all clusters share (the data path,
//! the pending budget, drain and stop) is [`Common`].

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use pglb_config::{Cluster, Config};
use pglb_control::state_file::{States, Update};
use pglb_control::{Command, Origin, Publisher, TopologyHandle};
use pglb_proxy::{Contexts, Shared};
use tokio::sync::oneshot;
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::CancellationToken;

use crate::checkers::Checkers;
use crate::members::{Discovery, Members};

/// What every cluster's listeners share.
pub struct Common {
    pub pipes: Option<Arc<pglb_proxy::PipePool>>,
    #[cfg(target_os = "linux")]
    pub sockmap: Option<Arc<pglb_sockmap::Kernel>>,
    pub draining: CancellationToken,
    pub hard_stop: CancellationToken,
    pub budget: Arc<pglb_proxy::Budget>,
    pub contexts: std::sync::Weak<Contexts>,
    /// The fleet's store agent (`shared_state:`).
    pub store: Option<pglb_store::Store>,
}

impl Common {
    /// What `topology`'s listeners share: its table and generation, a
    /// capacity of its own, and everything common.
    fn shared(&self, topology: &TopologyHandle) -> Shared {
        Shared {
            cluster: topology.cluster.clone(),
            table: topology.table.clone(),
            generation: topology.generation.clone(),
            capacity: Arc::new(pglb_proxy::Capacity::default()),
            pipes: self.pipes.clone(),
            #[cfg(target_os = "linux")]
            sockmap: self.sockmap.clone(),
            draining: self.draining.clone(),
            hard_stop: self.hard_stop.clone(),
            budget: self.budget.clone(),
            contexts: self.contexts.clone(),
        }
    }
}

/// One cluster being served.
pub struct ClusterRun {
    /// The cluster as configured (Patroni's members are not in it).
    pub config: Arc<Cluster>,
    pub topology: TopologyHandle,
    pub shared: Shared,
    /// The backends served (configured and Patroni's) and their checkers.
    members: Arc<tokio::sync::Mutex<Members>>,
    /// The Patroni reader, for a cluster with `patroni:`.
    discovery: Option<Discovery>,
    control: tokio::runtime::Handle,
    /// Ends the cluster's enforcement task.
    stop: CancellationToken,
}

impl ClusterRun {
    /// Starts the cluster's topology task and checkers on `control`, and
    /// its enforcement on the current runtime.
    pub fn start(
        config: Arc<Cluster>,
        origin: Origin,
        saver: Option<std::sync::mpsc::Sender<Update>>,
        tls: MakeRustlsConnect,
        control: &tokio::runtime::Handle,
        common: &Common,
        contexts: Arc<Contexts>,
    ) -> anyhow::Result<Self> {
        let fleet = common.store.as_ref().map(|store| {
            pglb_control::fleet::Fleet::new(store.requests.clone(), store.instance.clone(), config.name.as_str().into())
        });
        let (publisher, topology, inbox) = Publisher::new(config.clone(), origin, saver, fleet);
        control.spawn(publisher.run(inbox));
        let checkers = Checkers::start(control.clone(), config.clone(), tls.clone(), &topology);
        let members = Arc::new(tokio::sync::Mutex::new(Members::new(config.clone(), checkers, tls, topology.clone())));
        let discovery = match &config.patroni {
            Some(patroni) => Some(Discovery::start(patroni.clone(), members.clone(), &topology, control)?),
            None => None,
        };
        let shared = common.shared(&topology);
        let stop = CancellationToken::new();
        tokio::spawn(crate::enforce::run(contexts, topology.clone(), stop.clone()));
        Ok(Self { config, topology, shared, members, discovery, control: control.clone(), stop })
    }

    /// Applies `next` (a changed section of this cluster): checkers of
    /// changed backends stop first, so no stale report follows; states of
    /// unchanged backends carry over. A changed `patroni:` restarts the
    /// reader; the members it found stay until the new one answers.
    pub async fn reconfigure(&mut self, next: Arc<Cluster>, tls: MakeRustlsConnect) -> anyhow::Result<()> {
        if self.discovery.as_ref().map(Discovery::config) != next.patroni.as_ref() {
            if let Some(old) = self.discovery.take() {
                old.stop();
            }
            if let Some(patroni) = &next.patroni {
                self.discovery =
                    Some(Discovery::start(patroni.clone(), self.members.clone(), &self.topology, &self.control)?);
            }
        }
        self.members.lock().await.set_base(next.clone(), tls).await?;
        self.config = next;
        Ok(())
    }

    /// A reload removed the cluster: its checks stop, and its sessions are
    /// judged as those of removed listeners (closed, or left to finish with
    /// `on_ineligible: keep`). The topology task ends with its last handle.
    pub async fn remove(self, contexts: &Contexts) {
        drop(self.discovery);
        self.members.lock().await.stop_checkers().await;
        let empty = Cluster { listeners: Vec::new(), backends: Vec::new(), ..Cluster::clone(&self.config) };
        let (reply, done) = oneshot::channel();
        let command = Command::Reconfigure { config: Arc::new(empty), reply };
        if self.topology.commands.send(command).await.is_ok() && done.await.is_ok() {
            contexts.enforce(&self.config.name, &self.topology.table.load());
        }
        self.stop.cancel();
        tracing::info!(cluster = %self.config.name, "cluster removed: no longer checked or routed to");
    }

    /// Stops the checkers and the enforcement task (shutdown).
    pub async fn stop(self) {
        drop(self.discovery);
        self.members.lock().await.stop_checkers().await;
        self.stop.cancel();
    }
}

/// The health checks' TLS connector for `cluster` (its `sslrootcert`).
pub fn tls_for(cluster: &Cluster) -> anyhow::Result<MakeRustlsConnect> {
    pglb_health::make_tls(cluster.health.sslrootcert.as_deref())
        .with_context(|| format!("cluster `{}`: health.sslrootcert", cluster.name))
}

/// Where each cluster's safety state comes from at start — the state the
/// running pglb handed over, else the state file (read once here) — and
/// the state file's writer, seeded with what was restored.
pub fn origins(
    config: &Config,
    handed: Option<&States>,
) -> (HashMap<String, Origin>, Option<std::sync::mpsc::Sender<Update>>) {
    let configured = |states: &States| -> States {
        states.iter().filter(|(name, _)| config.cluster(name).is_some()).map(|(n, s)| (n.clone(), s.clone())).collect()
    };
    let (origins, seed): (HashMap<String, Origin>, States) = match (handed, config.state_file.as_deref()) {
        (Some(states), _) => {
            let origins = config
                .clusters
                .iter()
                .map(|c| (c.name.clone(), Origin::HandedOver(states.get(&c.name).cloned().unwrap_or_default())))
                .collect();
            (origins, configured(states))
        }
        (None, Some(path)) => {
            let states = match pglb_control::state_file::read(path) {
                Ok(None) => {
                    tracing::info!(path = %path.display(), "no state file yet: nothing to restore");
                    States::new()
                }
                Ok(Some(states)) => states,
                Err(why) => {
                    tracing::error!(path = %path.display(), "the state file is unusable ({why}): ignored; it is rewritten at the next change");
                    States::new()
                }
            };
            for name in states.keys().filter(|name| config.cluster(name).is_none()) {
                tracing::warn!(path = %path.display(), cluster = %name, "the state file holds a cluster the config does not name: its state is dropped at the next write");
            }
            let origins = config
                .clusters
                .iter()
                .map(|c| (c.name.clone(), Origin::StateFile(states.get(&c.name).cloned())))
                .collect();
            (origins, configured(&states))
        }
        (None, None) => (config.clusters.iter().map(|c| (c.name.clone(), Origin::Nothing)).collect(), States::new()),
    };
    let saver = config.state_file.clone().map(|path| pglb_control::state_file::spawn_writer(path, seed));
    (origins, saver)
}
