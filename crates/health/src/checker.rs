//! The checker tasks: one per backend, each on its own interval.

use std::sync::Arc;
use std::time::Instant;

use pglb_config::Config;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::CancellationToken;

use crate::topology::Report;

/// Starts one checker per backend of `config`; each sends a [`Report`] per
/// check until `shutdown` fires.
pub fn spawn_checkers(
    config: Arc<Config>,
    tls: MakeRustlsConnect,
    reports: mpsc::Sender<Report>,
    shutdown: CancellationToken,
) -> Vec<JoinHandle<()>> {
    (0..config.backends.len())
        .map(|index| {
            let (config, tls, reports) = (config.clone(), tls.clone(), reports.clone());
            let shutdown = shutdown.clone();
            tokio::spawn(async move { run(config, index, tls, reports, shutdown).await })
        })
        .collect()
}

async fn run(
    config: Arc<Config>,
    index: usize,
    tls: MakeRustlsConnect,
    reports: mpsc::Sender<Report>,
    shutdown: CancellationToken,
) {
    let backend = &config.backends[index];
    let duration = metrics::histogram!("pglb_health_check_duration_seconds", "backend" => backend.name.clone());
    let mut ticker = tokio::time::interval(config.health.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let started = Instant::now();
        let observation = tokio::select! {
            _ = shutdown.cancelled() => return,
            obs = crate::check_once(&config.health, backend, &tls) => obs,
        };
        duration.record(started.elapsed().as_secs_f64());
        let report = Report {
            backend: backend.name.clone(),
            observation,
        };
        if reports.send(report).await.is_err() {
            return;
        }
    }
}
