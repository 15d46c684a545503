//! The checker tasks: one per backend. Each keeps one logged-in connection
//! and watches it between checks: when it drops, the backend is re-checked at
//! once (a dropped connection alone may be `pg_terminate_backend` or
//! `idle_session_timeout`), and only a failed reconnect marks it down — at
//! once, not after `fall` intervals. While the topology settles after a
//! change, checks run every `fast_interval`.

use std::sync::Arc;
use std::time::Instant;

use pglb_config::{BackendConfig, Config};
use pglb_routing::Observation;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::CancellationToken;

use crate::check::{check, CheckConn};
use crate::topology::Command;

/// Starts the checker of `backend` on `runtime`; it reports until `stop`
/// fires. `fast_until` says until when checks run at `fast_interval`.
pub fn spawn_checker(
    runtime: &tokio::runtime::Handle,
    config: Arc<Config>,
    backend: BackendConfig,
    tls: MakeRustlsConnect,
    commands: mpsc::Sender<Command>,
    fast_until: watch::Receiver<Instant>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let checker = Checker { config, backend, tls, commands, fast_until };
    runtime.spawn(checker.run(stop))
}

struct Checker {
    config: Arc<Config>,
    backend: BackendConfig,
    tls: MakeRustlsConnect,
    commands: mpsc::Sender<Command>,
    fast_until: watch::Receiver<Instant>,
}

impl Checker {
    async fn run(mut self, shutdown: CancellationToken) {
        let duration =
            metrics::histogram!("pglb_health_check_duration_seconds", "backend" => self.backend.name.clone());
        let mut conn: Option<CheckConn> = None;
        let mut next = Instant::now();
        loop {
            let dropped = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(next.into()) => false,
                changed = self.fast_until.changed() => {
                    if changed.is_err() {
                        return; // the topology is gone: shutting down
                    }
                    // Re-plan: a faster pace may start now.
                    next = next.min(Instant::now() + self.config.health.fast_interval);
                    continue;
                }
                _ = closed(&mut conn) => true,
            };
            let started = Instant::now();
            if dropped {
                conn = None;
            }
            let observation = tokio::select! {
                _ = shutdown.cancelled() => return,
                obs = check(&mut conn, &self.config.health, &self.backend, &self.tls) => obs,
            };
            duration.record(started.elapsed().as_secs_f64());
            let observation = match observation {
                Observation::Down { reason } if dropped => {
                    Observation::Lost { reason: format!("check connection dropped and reconnecting failed: {reason}") }
                }
                other => other,
            };
            let report = Command::Report { backend: self.backend.name.clone(), observation };
            if self.commands.send(report).await.is_err() {
                return;
            }
            next = started + self.pace();
        }
    }

    fn pace(&self) -> std::time::Duration {
        let health = &self.config.health;
        if Instant::now() < *self.fast_until.borrow() {
            health.fast_interval
        } else {
            health.interval
        }
    }
}

/// Resolves when the check connection's server side closes; never without one.
async fn closed(conn: &mut Option<CheckConn>) {
    match conn {
        Some(c) => {
            let _ = (&mut c.driver).await;
        }
        None => std::future::pending().await,
    }
}
