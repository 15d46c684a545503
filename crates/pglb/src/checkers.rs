//! The running checker tasks of one cluster, one per backend, restartable per backend on
//! reload.

use std::sync::Arc;

use pglb_config::{BackendConfig, Cluster};
use pglb_control::TopologyHandle;
use tokio::task::JoinHandle;
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::CancellationToken;

struct Running {
    backend: BackendConfig,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

pub struct Checkers {
    runtime: tokio::runtime::Handle,
    config: Arc<Cluster>,
    tls: MakeRustlsConnect,
    running: Vec<Running>,
}

impl Checkers {
    /// Starts one checker per backend on `runtime`.
    pub fn start(
        runtime: tokio::runtime::Handle,
        config: Arc<Cluster>,
        tls: MakeRustlsConnect,
        topology: &TopologyHandle,
    ) -> Self {
        let mut checkers = Self { runtime, config: config.clone(), tls, running: Vec::new() };
        for backend in &config.backends {
            checkers.spawn(backend.clone(), topology);
        }
        checkers
    }

    fn spawn(&mut self, backend: BackendConfig, topology: &TopologyHandle) {
        let stop = CancellationToken::new();
        let task = pglb_health::spawn_checker(
            &self.runtime,
            self.config.clone(),
            backend.clone(),
            self.tls.clone(),
            topology.commands.clone(),
            topology.fast_until.clone(),
            stop.clone(),
        );
        self.running.push(Running { backend, stop, task });
    }

    /// Stops the checkers of backends that `next` removes or changes (or all,
    /// if health settings change) and waits until they are gone, so no stale
    /// report can follow the reconfiguration.
    pub async fn stop_changed(&mut self, next: &Cluster) {
        let restart_all = next.health != self.config.health;
        let (stay, go): (Vec<Running>, Vec<Running>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|r| !restart_all && next.backends.contains(&r.backend));
        self.running = stay;
        for r in go {
            r.stop.cancel();
            let _ = r.task.await;
        }
    }

    /// Starts checkers for every backend of `next` that has none.
    pub fn start_missing(&mut self, next: Arc<Cluster>, tls: MakeRustlsConnect, topology: &TopologyHandle) {
        self.config = next.clone();
        self.tls = tls;
        for backend in &next.backends {
            if !self.running.iter().any(|r| &r.backend == backend) {
                self.spawn(backend.clone(), topology);
            }
        }
    }

    pub async fn stop_all(&mut self) {
        for r in std::mem::take(&mut self.running) {
            r.stop.cancel();
            let _ = r.task.await;
        }
    }
}
