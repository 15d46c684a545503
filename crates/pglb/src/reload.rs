//! SIGHUP: re-read the config and apply it atomically, or reject it whole.
//!
//! Order matters: (1) parse and validate; (2) bind every new listener and
//! build the checks' TLS connectors of new and changed clusters (a port in
//! use or an unusable CA file rejects the reload: nothing has changed
//! yet); (3) per cluster: a removed one stops its checks and its sessions
//! end per `on_ineligible`; a changed one stops checkers of removed or
//! changed backends and waits for them, reconfigures its topology (states
//! of unchanged backends carry over: no flap), which publishes its next
//! table, and starts the missing checkers; a new one starts; an untouched
//! one is not touched at all (no table published, no check connection
//! replaced, its listeners keep their contexts); (4) give kept sockets
//! their listeners, open new listeners, stop removed ones. Nothing after
//! (2) can fail but a topology task being gone (pglb is stopping); success
//! is recorded only once all of it is done.

use std::path::Path;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use std::collections::HashMap;

use pglb_admin::{LiveConfig, Reload};
use pglb_config::{Cluster, Config};
use pglb_control::state_file::Update;
use pglb_control::Origin;
use sha2::{Digest, Sha256};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::clusters::ClusterRun;
use crate::run::{bind_listeners, Server};

/// SHA-256 of the file, hex (or empty if unreadable).
pub fn file_hash(path: &Path) -> String {
    std::fs::read(path).map(|bytes| format!("{:x}", Sha256::digest(bytes))).unwrap_or_default()
}

/// Counts a reload (or the initial load) and registers both series.
pub fn record_success(reload: bool) {
    let success = metrics::counter!("pglb_config_reloads_total", "result" => "success");
    metrics::counter!("pglb_config_reloads_total", "result" => "failure").increment(0);
    success.increment(u64::from(reload));
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    metrics::gauge!("pglb_config_last_reload_success_timestamp_seconds").set(now);
}

fn record_failure() {
    metrics::counter!("pglb_config_reloads_total", "result" => "failure").increment(1);
}

impl Server {
    /// Applies the config file anew; on any error the old config keeps
    /// serving. Either way `/status` (and `pglb status`) shows the outcome.
    pub async fn reload(&mut self) {
        tracing::info!(config = %self.path.display(), "SIGHUP: reloading config");
        match self.try_reload().await {
            Ok(()) => {
                record_success(true);
                self.admin.live.store(Arc::new(LiveConfig {
                    path: self.path.display().to_string(),
                    hash: file_hash(&self.path),
                    loaded_at: SystemTime::now(),
                    last_reload: Some(Reload { at: SystemTime::now(), error: None }),
                }));
                tracing::info!(
                    clusters = self.config.clusters.len(),
                    listeners = self.config.listeners().count(),
                    backends = self.config.backend_count(),
                    "config reloaded"
                );
            }
            Err(error) => {
                tracing::error!(config = %self.path.display(), %error, "reload rejected: the old config keeps serving");
                record_failure();
                let live = self.admin.live.load();
                self.admin.live.store(Arc::new(LiveConfig {
                    path: live.path.clone(),
                    hash: live.hash.clone(),
                    loaded_at: live.loaded_at,
                    last_reload: Some(Reload { at: SystemTime::now(), error: Some(error) }),
                }));
            }
        }
    }

    /// Loads, checks and applies the file; `Err` says why it was rejected.
    async fn try_reload(&mut self) -> Result<(), String> {
        let next = match pglb_config::load_file(&self.path) {
            Ok(c) => Arc::new(c),
            Err(err) => {
                for problem in &err.problems {
                    tracing::error!(location = %err.location(problem), "{problem}");
                }
                let first = err.problems.first().map(|p| format!("{}: {p}", err.location(p))).unwrap_or_default();
                return Err(format!("{} problem(s) in the file, first: {first}", err.problems.len()));
            }
        };
        crate::run::log_warnings(&self.path, &next);
        self.compatible(&next)?;
        let kept: Vec<_> = self.listeners.iter().map(|l| l.addr).collect();
        let prepared = bind_listeners(&next, &kept, None).and_then(|sockets| {
            let mut tls = HashMap::new();
            for cluster in next.clusters.iter().filter(|c| self.current(&c.name).is_none_or(|now| now != *c)) {
                tls.insert(cluster.name.clone(), crate::clusters::tls_for(cluster)?);
            }
            Ok((sockets, tls))
        });
        let (sockets, tls) = prepared.map_err(|err| format!("{err:#}"))?;
        self.apply(next, sockets, tls).await.map_err(|err| format!("failed while applying: {err}"))
    }

    /// The running config of cluster `name`.
    fn current(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.clusters.iter().find(|c| c.config.name == name).map(|c| &c.config)
    }

    /// Settings that cannot change in place.
    fn compatible(&self, next: &Config) -> Result<(), String> {
        if next.admin.listen != self.config.admin.listen {
            return Err(format!(
                "admin.listen changed ({} → {}): it cannot move on reload; restart pglb to move it",
                self.config.admin.listen, next.admin.listen
            ));
        }
        if next.log_format != self.config.log_format {
            return Err("log_format changed: it takes effect only at start; restart pglb".into());
        }
        if next.state_file != self.config.state_file {
            return Err("state_file changed: it is read at start only; restart pglb to move it".into());
        }
        if next.shared_state != self.config.shared_state {
            return Err("shared_state changed: the store is joined at start only; restart pglb (or upgrade it in place) to change it".into());
        }
        Ok(())
    }

    /// Commits `next`; everything that can be refused was checked before.
    async fn apply(
        &mut self,
        next: Arc<Config>,
        sockets: Vec<(std::net::SocketAddr, tokio::net::TcpListener)>,
        mut tls: HashMap<String, MakeRustlsConnect>,
    ) -> anyhow::Result<()> {
        // Before anything changes: a forwarder that cannot be had fails the reload.
        let data_path = if next.forwarder != self.config.forwarder {
            Some(crate::data_path::choose(&next, &mut self.loaded)?)
        } else {
            None
        };
        let mut running: Vec<ClusterRun> = Vec::new();
        for cluster in std::mem::take(&mut self.clusters) {
            if next.cluster(&cluster.config.name).is_some() {
                running.push(cluster);
                continue;
            }
            let name = cluster.config.name.clone();
            cluster.remove(&self.contexts).await;
            if let Some(saver) = &self.saver {
                let _ = saver.send(Update::Forget(name));
            }
        }
        // Clusters whose listeners get new contexts.
        let mut changed: Vec<String> = Vec::new();
        for config in &next.clusters {
            let tls = tls.remove(&config.name);
            match (running.iter().position(|c| c.config.name == config.name), tls) {
                (Some(at), Some(tls)) => {
                    let mut cluster = running.swap_remove(at);
                    cluster.reconfigure(config.clone(), tls).await?;
                    tracing::info!(cluster = %config.name, "cluster reconfigured");
                    changed.push(config.name.clone());
                    self.clusters.push(cluster);
                }
                // Untouched: not reconfigured, nothing republished.
                (Some(at), None) => self.clusters.push(running.swap_remove(at)),
                (None, tls) => {
                    let tls = match tls {
                        Some(tls) => tls,
                        None => crate::clusters::tls_for(config)?,
                    };
                    let origin = match &self.saver {
                        Some(_) => Origin::StateFile(None),
                        None => Origin::Nothing,
                    };
                    let cluster = ClusterRun::start(
                        config.clone(),
                        origin,
                        self.saver.clone(),
                        tls,
                        &self.control.handle,
                        &self.common,
                        self.contexts.clone(),
                    )?;
                    tracing::info!(cluster = %config.name, backends = config.backends.len(), "cluster added");
                    changed.push(config.name.clone());
                    self.clusters.push(cluster);
                }
            }
        }
        if let Some(path) = data_path {
            self.common.pipes = path.pipes;
            #[cfg(target_os = "linux")]
            {
                self.common.sockmap = path.sockmap;
            }
            for cluster in &mut self.clusters {
                cluster.shared.pipes = self.common.pipes.clone();
                #[cfg(target_os = "linux")]
                {
                    cluster.shared.sockmap = self.common.sockmap.clone();
                }
                changed.push(cluster.config.name.clone());
            }
        }
        self.admin.clusters.store(Arc::new(self.clusters.iter().map(|c| c.topology.clone()).collect()));
        // Kept sockets: their listeners as the next config has them.
        let addrs: Vec<std::net::SocketAddr> = next.listeners().map(|(_, l)| l.listen).collect();
        let mut removed = Vec::new();
        for live in std::mem::take(&mut self.listeners) {
            if addrs.contains(&live.addr) {
                let previous = live.group.load_full();
                live.group.store(Arc::new(self.group_for(live.addr, Some(&previous), &changed)));
                self.listeners.push(live);
            } else {
                removed.push(live);
            }
        }
        for live in removed {
            tracing::info!(listen = %live.addr, "listener removed: no longer accepting");
            live.stop.cancel();
        }
        self.open_listeners(sockets)?;
        self.admin.token.store(Arc::new(next.admin.token.clone()));
        if next.limits != self.config.limits {
            let fds = rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft).unwrap_or(1024);
            let (max_pending, per_source) = next.limits.resolve(fds);
            self.common.budget.set(max_pending, per_source);
            tracing::info!(max_pending, max_pending_per_source = per_source, "pending budget changed (limits:)");
        }
        self.config = next;
        // Sessions of changed clusters' removed listeners and backends are judged now.
        for cluster in self.clusters.iter().filter(|c| changed.contains(&c.config.name)) {
            self.contexts.enforce(&cluster.config.name, &cluster.topology.table.load());
        }
        Ok(())
    }
}
