//! The routing table: an immutable snapshot of which backends each listener
//! may use now, in selection order. Built by [`crate::Topology`], never
//! mutated after it is published.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pglb_config::{tags_match, BackendConfig, Balance, ListenerConfig, Role, Tags};

use crate::fence::Fence;
use crate::lag::Lag;
use crate::patroni::{MemberView, PatroniView};
use crate::reason::CloseReason;
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
    /// Opens one more if that stays within `limit` (lock-free).
    pub fn try_open(&self, limit: Option<usize>) -> bool {
        let Some(limit) = limit else {
            self.open();
            return true;
        };
        self.active.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1)).is_ok()
    }
    pub fn close(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An operator's say over a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdminState {
    #[default]
    Enabled,
    /// No new connections; existing ones finish.
    Drained,
    /// No new connections; existing ones are closed.
    Disabled,
}

impl AdminState {
    pub const ALL: [AdminState; 3] = [Self::Enabled, Self::Drained, Self::Disabled];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enabled => "enabled",
            Self::Drained => "drained",
            Self::Disabled => "disabled",
        }
    }

    /// The state whose [`AdminState::as_str`] is `text`.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// One backend as this snapshot sees it.
#[derive(Debug, Clone)]
pub struct BackendEntry {
    pub config: BackendConfig,
    pub state: BackendState,
    /// The role routing uses: the observed one, unless the config pins it.
    pub role: ObservedRole,
    /// Why it must get no traffic, if fenced.
    pub fenced: Option<Fence>,
    pub admin: AdminState,
    /// Last known lag behind the primary (replicas).
    pub lag: Lag,
    pub load: Arc<BackendLoad>,
    /// What Patroni lists for it, when it is a Patroni member.
    pub member: Option<MemberView>,
    /// Why it gets no traffic although it answers as primary: Patroni's
    /// confirmed leader is another node.
    pub vetoed: Option<String>,
    /// Its static tags and, for a member, Patroni's (static ones win).
    pub tags: Tags,
    /// Why a replica is kept out of read-only pools although it answers:
    /// it has not shown it follows the current timeline (see
    /// [`crate::Rejoin`]).
    pub rejoining: Option<String>,
}

impl BackendEntry {
    /// Where sessions to this backend go: the address its last successful
    /// check was connected to, at the configured port. `None` until a check
    /// has answered.
    pub fn checked_address(&self) -> Option<std::net::SocketAddr> {
        self.state.facts.address.map(|ip| std::net::SocketAddr::new(ip, self.config.port))
    }

    /// Up (healthy, degraded or unverified), unfenced, and not disabled: may
    /// keep its sessions.
    pub fn serving(&self) -> bool {
        self.state.up && self.fenced.is_none() && self.vetoed.is_none() && self.admin != AdminState::Disabled
    }

    /// Whether new sessions of a listener of `role` selecting `selector`
    /// may come here, as far as Patroni and tags go (like a drain: sessions
    /// already here stay): not a member that left Patroni's list, not a
    /// `noloadbalance` replica for reads, carrying the listener's tags.
    pub fn selectable(&self, role: Role, selector: &Tags) -> bool {
        let member = self.member.as_ref();
        if member.is_some_and(|m| m.departed) {
            return false;
        }
        let reads = self.role == ObservedRole::Replica && matches!(role, Role::Replica | Role::Any);
        if reads && member.is_some_and(MemberView::noloadbalance) {
            return false;
        }
        tags_match(selector, &self.tags)
    }
}

/// What one listener may use now.
#[derive(Debug, Clone)]
pub struct ListenerRoute {
    pub config: ListenerConfig,
    /// Indices into [`RoutingTable::backends`], in config order.
    pub eligible: Vec<usize>,
    /// True when `eligible` comes from the listener's fallback role.
    pub via_fallback: bool,
    /// Replicas kept out of this listener's pool for lag.
    pub lagging: Vec<usize>,
    /// True when `eligible` holds degraded (silent) backends, used because
    /// no healthy candidate exists (a healthy-panic, as Envoy calls it).
    pub degraded: bool,
    /// Weighted round-robin order over `eligible` (smooth, one full cycle).
    pub(crate) cycle: Vec<usize>,
}

/// What should happen to a session of a listener on a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// The listener may no longer use this backend.
    Ineligible(CloseReason),
    /// A replica over the listener's lag limit.
    Lagging,
}

/// An immutable snapshot, published whole.
#[derive(Debug, Clone)]
pub struct RoutingTable {
    /// Bumped whenever any listener's choices or any session's verdict may
    /// have changed; equal generations route alike.
    pub generation: u64,
    /// `health.down_after`: how long silence is tolerated (backend sockets
    /// get it as TCP_USER_TIMEOUT).
    pub down_after: Duration,
    pub backends: Vec<BackendEntry>,
    pub listeners: Vec<ListenerRoute>,
    /// More than one unfenced primary on the highest timeline (fence mode).
    pub split_brain: bool,
    /// Some unfenced primary is up (lag is only judged while one is).
    pub primary_visible: bool,
    /// The cluster's only primary, down with evidence of a restart in
    /// place and not replaced: rw clients are held for it longer.
    pub restarting: Option<usize>,
    /// Every backend has been checked at least once.
    pub all_checked: bool,
    /// With `shared_state:`, until the fleet's items were first read (or
    /// the store was found unreachable): no writes, so a restarted pglb
    /// does not route to an old primary another instance fenced.
    pub awaiting_shared: bool,
    /// The cluster's system identifier; nothing is routed while it is
    /// pending.
    pub identity: crate::fence::Identity,
    /// What Patroni last said, for a cluster read from Patroni.
    pub patroni: Option<Arc<PatroniView>>,
}

impl RoutingTable {
    pub fn listener(&self, name: &str) -> Option<&ListenerRoute> {
        self.listeners.iter().find(|l| l.config.name == name)
    }

    pub fn backend_index(&self, name: &str) -> Option<usize> {
        self.backends.iter().position(|b| b.config.name == name)
    }

    /// The standby leader, when Patroni runs this cluster as a standby
    /// cluster: no node takes writes.
    pub fn standby_leader(&self) -> Option<&str> {
        self.patroni.as_ref().and_then(|p| p.standby_leader.as_deref())
    }

    /// Whether a session of `listener` on `backend` may go on. Sessions that
    /// came through the fallback are judged against the fallback role, so a
    /// returning replica does not close them.
    pub fn verdict(&self, listener: usize, backend: usize, via_fallback: bool) -> Verdict {
        let (Some(route), Some(b)) = (self.listeners.get(listener), self.backends.get(backend)) else {
            return Verdict::Ineligible(CloseReason::Removed);
        };
        // Silence (degraded) and monitoring failures (unverified) keep sessions.
        if !b.state.up {
            return Verdict::Ineligible(CloseReason::BackendDown);
        }
        if b.fenced.is_some() {
            return Verdict::Ineligible(CloseReason::Fenced);
        }
        if b.vetoed.is_some() {
            return Verdict::Ineligible(CloseReason::NotLeader);
        }
        if b.admin == AdminState::Disabled {
            return Verdict::Ineligible(CloseReason::Disabled);
        }
        let wanted = match (via_fallback, route.config.fallback) {
            (true, Some(f)) => f,
            _ => route.config.role,
        };
        match (wanted, b.role) {
            (Role::Primary, ObservedRole::Primary) if self.split_brain => Verdict::Ineligible(CloseReason::SplitBrain),
            (Role::Primary, ObservedRole::Primary) => Verdict::Keep,
            (Role::Replica, ObservedRole::Replica) if route.lagging.contains(&backend) => Verdict::Lagging,
            (Role::Replica, ObservedRole::Replica) => Verdict::Keep,
            (Role::Any, ObservedRole::Primary) if self.split_brain => Verdict::Ineligible(CloseReason::SplitBrain),
            (Role::Any, ObservedRole::Primary | ObservedRole::Replica) => Verdict::Keep,
            _ => Verdict::Ineligible(CloseReason::RoleChanged),
        }
    }
}

/// Backends a listener of `role` selecting `selector` may use, before lag:
/// the healthy ones, or (`degraded`) the silent ones.
pub(crate) fn candidates_for(role: Role, selector: &Tags, table: &RoutingTable, degraded: bool) -> Vec<usize> {
    let usable = |i: &usize| {
        let b = &table.backends[*i];
        b.serving() && b.admin == AdminState::Enabled && b.state.degraded == degraded && b.selectable(role, selector)
    };
    if table.identity.pending {
        return Vec::new();
    }
    let primaries_ok = table.all_checked && !table.split_brain && !table.awaiting_shared;
    (0..table.backends.len())
        .filter(usable)
        .filter(|&i| match (role, table.backends[i].role) {
            (Role::Primary, ObservedRole::Primary) => primaries_ok,
            (Role::Replica, ObservedRole::Replica) => true,
            (Role::Any, ObservedRole::Primary) => primaries_ok,
            (Role::Any, ObservedRole::Replica) => true,
            _ => false,
        })
        .collect()
}

impl ListenerRoute {
    /// Builds one listener's route; `admitted(i)` says whether replica `i`
    /// passes this listener's lag gate.
    ///
    /// Order of preference: healthy backends of the role, healthy backends
    /// of the fallback role, degraded backends of the role, degraded ones of
    /// the fallback role. A silent replica is worse than an answering
    /// primary for reads: its clients would wait on it.
    pub(crate) fn build(config: &ListenerConfig, table: &RoutingTable, admitted: impl Fn(usize) -> bool) -> Self {
        let behind = |i: &usize| table.backends[*i].role == ObservedRole::Replica && !admitted(*i);
        let mut lagging: Vec<usize> = [false, true]
            .into_iter()
            .flat_map(|silent| candidates_for(config.role, &config.tags, table, silent))
            .collect();
        lagging.retain(behind);
        lagging.sort_unstable();
        let mut tiers = vec![(config.role, false, false)];
        tiers.extend(config.fallback.map(|f| (f, false, true)));
        tiers.push((config.role, true, false));
        tiers.extend(config.fallback.map(|f| (f, true, true)));
        let (mut eligible, mut degraded, mut via_fallback) = (Vec::new(), false, false);
        for (role, silent, fallback) in tiers {
            eligible = candidates_for(role, &config.tags, table, silent);
            eligible.retain(|i| !lagging.contains(i));
            if !eligible.is_empty() {
                (degraded, via_fallback) = (silent, fallback);
                break;
            }
        }
        let cycle = match config.balance {
            Balance::RoundRobin => smooth_cycle(&eligible, &table.backends),
            _ => Vec::new(),
        };
        Self { config: config.clone(), eligible, via_fallback, lagging, degraded, cycle }
    }
}

/// nginx's smooth weighted round robin, unrolled over one cycle of
/// `sum(weights)` picks so selection is a single atomic increment.
fn smooth_cycle(eligible: &[usize], backends: &[BackendEntry]) -> Vec<usize> {
    let weights: Vec<i64> = eligible.iter().map(|&i| i64::from(backends[i].config.weight)).collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; eligible.len()];
    let mut cycle = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, w) in current.iter_mut().zip(&weights) {
            *c += w;
        }
        let Some(best) = (0..current.len()).max_by_key(|&k| (current[k], std::cmp::Reverse(k))) else {
            break;
        };
        current[best] -= total;
        cycle.push(eligible[best]);
    }
    cycle
}
