//! A cluster's backends as served: the config's, plus the members its
//! Patroni reader found. One owner applies both a reload (the config's
//! part) and a member list change (Patroni's part), so the two never
//! interleave: checkers of changed backends stop first, the topology is
//! reconfigured, then checkers of new backends start.

use std::sync::Arc;

use pglb_config::{BackendConfig, Cluster, PatroniConfig};
use pglb_control::{Command, TopologyHandle};
use pglb_patroni::{MemberAddress, Reader};
use tokio::sync::{oneshot, watch, Mutex};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::CancellationToken;

use crate::checkers::Checkers;

/// What a cluster serves, and its checkers.
pub struct Members {
    /// The cluster as configured.
    base: Arc<Cluster>,
    /// Patroni's members (departed ones still draining included).
    discovered: Vec<MemberAddress>,
    checkers: Checkers,
    tls: MakeRustlsConnect,
    topology: TopologyHandle,
}

impl Members {
    pub fn new(base: Arc<Cluster>, checkers: Checkers, tls: MakeRustlsConnect, topology: TopologyHandle) -> Self {
        Self { base, discovered: Vec::new(), checkers, tls, topology }
    }

    /// The config's backends, then each member the config does not name
    /// (a configured backend named like a member *is* that member: its
    /// address and settings win).
    pub fn effective(&self) -> Arc<Cluster> {
        if self.discovered.is_empty() {
            return self.base.clone();
        }
        let mut cluster = Cluster::clone(&self.base);
        for m in &self.discovered {
            if cluster.backends.iter().any(|b| b.name == m.name) {
                continue;
            }
            cluster.backends.push(BackendConfig {
                name: m.name.clone(),
                host: m.host.clone(),
                port: m.port,
                weight: 1,
                max_connections: None,
                role: None,
                tags: Default::default(),
            });
        }
        Arc::new(cluster)
    }

    /// Serves `base` (a reload) with the members known now (none, if
    /// the cluster is no longer read from Patroni).
    pub async fn set_base(&mut self, base: Arc<Cluster>, tls: MakeRustlsConnect) -> anyhow::Result<()> {
        if base.patroni.is_none() {
            self.discovered.clear();
        }
        self.base = base;
        self.tls = tls;
        self.apply().await
    }

    async fn set_discovered(&mut self, discovered: Vec<MemberAddress>) -> anyhow::Result<()> {
        if self.discovered == discovered {
            return Ok(());
        }
        self.discovered = discovered;
        self.apply().await
    }

    async fn apply(&mut self) -> anyhow::Result<()> {
        let next = self.effective();
        self.checkers.stop_changed(&next).await;
        let (reply, done) = oneshot::channel();
        let command = Command::Reconfigure { config: next.clone(), reply };
        if self.topology.commands.send(command).await.is_err() || done.await.is_err() {
            anyhow::bail!("the topology task of cluster `{}` is gone (pglb is stopping)", self.base.name);
        }
        self.checkers.start_missing(next, self.tls.clone(), &self.topology);
        Ok(())
    }

    /// Stops every checker (the cluster is removed, or pglb stops).
    pub async fn stop_checkers(&mut self) {
        self.checkers.stop_all().await;
    }
}

/// A running Patroni reader and the task applying its member lists.
pub struct Discovery {
    config: PatroniConfig,
    stop: CancellationToken,
}

impl Discovery {
    /// Starts reading Patroni for the cluster `members` serves: the reader
    /// on `control`, the applier on the current runtime.
    pub fn start(
        config: PatroniConfig,
        members: Arc<Mutex<Members>>,
        topology: &TopologyHandle,
        control: &tokio::runtime::Handle,
    ) -> anyhow::Result<Self> {
        let stop = CancellationToken::new();
        let (tx, mut rx) = watch::channel(Vec::new());
        let reader = Reader::new(topology.cluster.clone(), config.clone(), topology.clone(), Arc::new(tx))
            .map_err(|e| anyhow::anyhow!("cluster `{}`: patroni: {e}", topology.cluster))?;
        control.spawn(reader.run(stop.clone()));
        let cluster = topology.cluster.clone();
        let until = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = until.cancelled() => return,
                    changed = rx.changed() => if changed.is_err() { return },
                }
                let list = rx.borrow_and_update().clone();
                if let Err(e) = members.lock().await.set_discovered(list).await {
                    tracing::debug!(cluster = %cluster, "member list not applied: {e}");
                    return;
                }
            }
        });
        Ok(Self { config, stop })
    }

    pub fn config(&self) -> &PatroniConfig {
        &self.config
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
