//! The single writer of routing tables: applies each check report to the
//! backend's state machine and, when anything routing-relevant changed,
//! builds the next table and publishes it. Nothing else stores tables, so
//! two publishes can never interleave.

use std::sync::Arc;

use arc_swap::ArcSwap;
use pglb_config::Config;
use pglb_routing::{
    BackendLoad, BackendState, Observation, ObservedRole, RoutingTable, Transition,
};
use tokio::sync::mpsc;

/// One check's outcome, from a checker task.
#[derive(Debug)]
pub struct Report {
    pub backend: String,
    pub observation: Observation,
}

pub struct Topology {
    config: Arc<Config>,
    states: Vec<BackendState>,
    loads: Vec<Arc<BackendLoad>>,
    generation: u64,
    table: Arc<ArcSwap<RoutingTable>>,
}

impl Topology {
    /// A topology with every backend unchecked, and its first (empty) table.
    pub fn new(config: Arc<Config>) -> Self {
        let states = vec![BackendState::default(); config.backends.len()];
        let loads = (0..config.backends.len())
            .map(|_| Arc::new(BackendLoad::default()))
            .collect::<Vec<_>>();
        let table = RoutingTable::build(0, &config, &states, &loads);
        Self {
            config,
            states,
            loads,
            generation: 0,
            table: Arc::new(ArcSwap::from_pointee(table)),
        }
    }

    /// The handle readers load snapshots from.
    pub fn table(&self) -> Arc<ArcSwap<RoutingTable>> {
        self.table.clone()
    }

    /// Applies reports until every sender is gone.
    pub async fn run(mut self, mut reports: mpsc::Receiver<Report>) {
        while let Some(report) = reports.recv().await {
            self.apply(report);
        }
    }

    /// Applies one report; publishes a new table if routing changed.
    pub fn apply(&mut self, report: Report) {
        let Some(index) = self
            .config
            .backends
            .iter()
            .position(|b| b.name == report.backend)
        else {
            return;
        };
        let name = report.backend;
        if let Observation::Down { .. } = &report.observation {
            metrics::counter!("pglb_health_check_failures_total", "backend" => name.clone())
                .increment(1);
        }
        let health = &self.config.health;
        let before = self.states[index].clone();
        let transitions = self.states[index].observe(report.observation, health.rise, health.fall);
        for t in &transitions {
            log_transition(&name, &self.config.backends[index].address(), t);
        }
        let after = &self.states[index];
        if before.healthy != after.healthy || before.role != after.role || !before.checked {
            export_state(&name, after);
            self.publish();
        }
    }

    fn publish(&mut self) {
        self.generation += 1;
        let was_split = self.table.load().split_brain;
        let table = RoutingTable::build(self.generation, &self.config, &self.states, &self.loads);
        if table.split_brain && !was_split {
            let primaries: Vec<&str> = table
                .backends
                .iter()
                .filter(|b| b.state.healthy && b.state.role == ObservedRole::Primary)
                .map(|b| b.config.name.as_str())
                .collect();
            tracing::error!(
                ?primaries,
                "split brain: more than one backend claims to be primary; primary listeners route to none until one remains"
            );
        } else if was_split && !table.split_brain {
            tracing::warn!("split brain over: at most one primary is visible again");
        }
        self.table.store(Arc::new(table));
    }
}

fn log_transition(name: &str, address: &str, t: &Transition) {
    match t {
        Transition::Health { up: true, .. } => {
            tracing::info!(backend = name, address, "backend is up")
        }
        Transition::Health { up: false, reason } => tracing::warn!(
            backend = name,
            address,
            reason = reason.as_deref().unwrap_or("unknown"),
            "backend is down"
        ),
        Transition::Role { from, to } => {
            tracing::info!(
                backend = name,
                address,
                from = from.as_str(),
                to = to.as_str(),
                "backend role changed"
            )
        }
    }
}

/// Sets `pglb_backend_up` and `pglb_backend_role` for one backend.
pub fn export_state(name: &str, state: &BackendState) {
    metrics::gauge!("pglb_backend_up", "backend" => name.to_owned())
        .set(f64::from(u8::from(state.healthy)));
    for role in ObservedRole::ALL {
        let value = f64::from(u8::from(state.role == role));
        metrics::gauge!("pglb_backend_role", "backend" => name.to_owned(), "role" => role.as_str())
            .set(value);
    }
}
