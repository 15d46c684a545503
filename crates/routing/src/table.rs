//! The routing table: an immutable snapshot of which backends each listener
//! may use now, in selection order. Rebuilt, never mutated.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pglb_config::{BackendConfig, Balance, Config, ListenerConfig, Role};

use crate::state::{BackendState, ObservedRole};

/// Live load of one backend, shared by every table that lists it.
#[derive(Debug, Default)]
pub struct BackendLoad {
    active: AtomicUsize,
}

impl BackendLoad {
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
    pub fn open(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
    }
    pub fn close(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One backend as this snapshot sees it.
#[derive(Debug, Clone)]
pub struct BackendEntry {
    pub config: BackendConfig,
    pub state: BackendState,
    pub load: Arc<BackendLoad>,
}

/// What one listener may use now.
#[derive(Debug, Clone)]
pub struct ListenerRoute {
    pub config: ListenerConfig,
    /// Indices into [`RoutingTable::backends`], in config order.
    pub eligible: Vec<usize>,
    /// True when `eligible` comes from the listener's fallback role.
    pub via_fallback: bool,
    /// Weighted round-robin order over `eligible` (smooth, one full cycle).
    pub(crate) cycle: Vec<usize>,
}

/// An immutable snapshot, published whole.
#[derive(Debug, Clone)]
pub struct RoutingTable {
    pub generation: u64,
    pub backends: Vec<BackendEntry>,
    pub listeners: Vec<ListenerRoute>,
    /// More than one backend claims to be primary: primary listeners get none.
    pub split_brain: bool,
}

impl RoutingTable {
    /// Builds the table for `config` given the states (same order as
    /// `config.backends`) and the load counters to share.
    pub fn build(
        generation: u64,
        config: &Config,
        states: &[BackendState],
        loads: &[Arc<BackendLoad>],
    ) -> Self {
        let backends: Vec<BackendEntry> = config
            .backends
            .iter()
            .zip(states)
            .zip(loads)
            .map(|((c, s), l)| BackendEntry {
                config: c.clone(),
                state: s.clone(),
                load: l.clone(),
            })
            .collect();
        let primaries = with_role(&backends, ObservedRole::Primary);
        let split_brain = primaries.len() > 1;
        let listeners = config
            .listeners
            .iter()
            .map(|l| ListenerRoute::build(l, &backends, split_brain))
            .collect();
        Self {
            generation,
            backends,
            listeners,
            split_brain,
        }
    }

    pub fn listener(&self, name: &str) -> Option<&ListenerRoute> {
        self.listeners.iter().find(|l| l.config.name == name)
    }

    pub fn backend_index(&self, name: &str) -> Option<usize> {
        self.backends.iter().position(|b| b.config.name == name)
    }
}

fn with_role(backends: &[BackendEntry], role: ObservedRole) -> Vec<usize> {
    (0..backends.len())
        .filter(|&i| backends[i].state.healthy && backends[i].state.role == role)
        .collect()
}

fn eligible_for(role: Role, backends: &[BackendEntry], split_brain: bool) -> Vec<usize> {
    match role {
        // Never a write to a node that is not the one primary.
        Role::Primary if split_brain => Vec::new(),
        Role::Primary => with_role(backends, ObservedRole::Primary),
        Role::Replica => with_role(backends, ObservedRole::Replica),
        Role::Any => (0..backends.len())
            .filter(|&i| {
                backends[i].state.healthy && backends[i].state.role != ObservedRole::Unknown
            })
            .filter(|&i| !(split_brain && backends[i].state.role == ObservedRole::Primary))
            .collect(),
    }
}

impl ListenerRoute {
    fn build(config: &ListenerConfig, backends: &[BackendEntry], split_brain: bool) -> Self {
        let mut eligible = eligible_for(config.role, backends, split_brain);
        let mut via_fallback = false;
        if eligible.is_empty() {
            if let Some(fallback) = config.fallback {
                eligible = eligible_for(fallback, backends, split_brain);
                via_fallback = !eligible.is_empty();
            }
        }
        let cycle = match config.balance {
            Balance::RoundRobin => smooth_cycle(&eligible, backends),
            _ => Vec::new(),
        };
        Self {
            config: config.clone(),
            eligible,
            via_fallback,
            cycle,
        }
    }
}

/// nginx's smooth weighted round robin, unrolled over one cycle of
/// `sum(weights)` picks so selection is a single atomic increment.
fn smooth_cycle(eligible: &[usize], backends: &[BackendEntry]) -> Vec<usize> {
    let weights: Vec<i64> = eligible
        .iter()
        .map(|&i| i64::from(backends[i].config.weight))
        .collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; eligible.len()];
    let mut cycle = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, w) in current.iter_mut().zip(&weights) {
            *c += w;
        }
        let Some(best) = (0..current.len()).max_by_key(|&k| (current[k], std::cmp::Reverse(k)))
        else {
            break;
        };
        current[best] -= total;
        cycle.push(eligible[best]);
    }
    cycle
}
