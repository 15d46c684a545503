//! SIGHUP: re-read the config and apply it atomically, or reject it whole.
//!
//! Order matters: (1) parse and validate; (2) bind every new listener and
//! build the checks' TLS connector (a port in use or an unusable CA file
//! rejects the reload: nothing has changed yet); (3) stop checkers of
//! removed or changed backends and wait for them; (4) reconfigure the
//! topology (states of unchanged backends carry over: no flap), which
//! publishes the next table; (5) give kept sockets a context for the new
//! config, open new listeners, stop removed ones (their sessions end per
//! `on_ineligible`); (6) start the missing checkers. Nothing after (2) can
//! fail but the topology task being gone (pglb is stopping); success is
//! recorded only once all of it is done.

use std::path::Path;

use anyhow::Context;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use pglb_admin::{LiveConfig, Reload};
use pglb_config::Config;
use pglb_control::Command;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tokio_postgres_rustls::MakeRustlsConnect;

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
                    listeners = self.config.listeners.len(),
                    backends = self.config.backends.len(),
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
            let tls = pglb_health::make_tls(next.health.sslrootcert.as_deref()).context("health.sslrootcert")?;
            Ok((sockets, tls))
        });
        let (sockets, tls) = prepared.map_err(|err| format!("{err:#}"))?;
        self.apply(next, sockets, tls).await.map_err(|err| format!("failed while applying: {err}"))
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
        if next.health.sslrootcert != self.config.health.sslrootcert {
            return Err("health.sslrootcert changed: restart pglb to load another CA".into());
        }
        Ok(())
    }

    /// Commits `next`; everything that can be refused was checked before.
    async fn apply(
        &mut self,
        next: Arc<Config>,
        sockets: Vec<(std::net::SocketAddr, tokio::net::TcpListener)>,
        tls: MakeRustlsConnect,
    ) -> anyhow::Result<()> {
        // Before anything changes: a forwarder that cannot be had fails the reload.
        let data_path = if next.forwarder != self.config.forwarder {
            Some(crate::data_path::choose(&next, &mut self.loaded)?)
        } else {
            None
        };
        self.checkers.stop_changed(&next).await;
        let (tx, rx) = oneshot::channel();
        if self.topology.commands.send(Command::Reconfigure { config: next.clone(), reply: tx }).await.is_err()
            || rx.await.is_err()
        {
            anyhow::bail!("the topology task is gone (pglb is stopping)");
        }
        if let Some(path) = data_path {
            self.shared.pipes = path.pipes;
            self.shared.sockmap = path.sockmap;
        }
        let table = self.topology.table.load_full();
        // Kept sockets: fresh contexts (new index, backends, limits, names).
        let mut removed = Vec::new();
        for live in std::mem::take(&mut self.listeners) {
            if table.listeners.iter().any(|l| l.config.listen == live.addr) {
                let previous = live.group.load_full();
                live.group.store(Arc::new(self.group_for(live.addr, Some(&previous))));
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
            self.shared.budget.set(max_pending, per_source);
            tracing::info!(max_pending, max_pending_per_source = per_source, "pending budget changed (limits:)");
        }
        self.checkers.start_missing(next.clone(), tls, &self.topology);
        self.config = next;
        // Sessions of removed listeners and backends are judged now.
        self.contexts.enforce(&table);
        Ok(())
    }
}
