//! Listeners: binding (no SO_REUSEPORT, so a second pglb cannot silently
//! share a port; IP_FREEBIND on request, for a virtual IP not yet owned) and
//! the accept loop, which never dies on an accept error.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use metrics::Gauge;
use pglb_config::ListenerConfig;
use pglb_routing::{Cursor, RoutingTable};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::address::AddressGroup;
use crate::budget::Budget;
use crate::forward::PipePool;
use crate::metrics::{ListenerMetrics, PairMetrics};
use crate::reason::Reject;
use crate::registry::Registry;
use crate::wait::Capacity;

/// What the listeners of one cluster share (the routing table, its
/// generation, its capacity) and what every listener shares (the data
/// path, the budget, the drain and stop signals).
#[derive(Clone)]
pub struct Shared {
    /// The cluster's name.
    pub cluster: Arc<str>,
    pub table: Arc<ArcSwap<RoutingTable>>,
    /// The routing generation: changes when choices or verdicts may change.
    pub generation: watch::Receiver<u64>,
    /// Freed whenever a session of the cluster ends (a place under the
    /// limits is free).
    pub capacity: Arc<Capacity>,
    /// Splice pipes; `None` forwards by copying.
    pub pipes: Option<Arc<PipePool>>,
    /// The kernel path (`forwarder: sockmap`); sessions it cannot take
    /// use `pipes`.
    #[cfg(target_os = "linux")]
    pub sockmap: Option<Arc<pglb_sockmap::Kernel>>,
    /// Cancelled when shutdown begins: new, held and queued clients get 57P01.
    pub draining: CancellationToken,
    /// Cancelled when sessions in progress must end (shutdown timeout).
    pub hard_stop: CancellationToken,
    /// Connections not forwarding yet, process-wide and per source.
    pub budget: Arc<Budget>,
    /// Every listener context in use, to find the sessions of an address
    /// (a cancel request's fan-out). Weak: the contexts hold this.
    pub contexts: std::sync::Weak<crate::contexts::Contexts>,
}

/// Everything one listener's sessions share. A reload builds new contexts;
/// sessions keep theirs. A listener's identity is its name: a context finds
/// its listener in the current table by name, so it can never read another
/// listener's route (sockets are kept by address: a renamed listener keeps
/// its socket, but the old name's sessions end like a removed listener's).
pub struct ListenerContext {
    pub listen: SocketAddr,
    pub name: String,
    pub shared: Shared,
    pub(crate) cursor: Cursor,
    pub(crate) metrics: ListenerMetrics,
    /// Per backend name: this listener's metric handles.
    pub(crate) pairs: HashMap<String, PairMetrics>,
    /// Per backend name: all-listener connection gauges.
    pub(crate) backend_gauges: HashMap<String, Gauge>,
    /// Clients held, queued and forwarded: shared with the contexts that
    /// replace this one on reload, so limits keep counting older sessions.
    pub(crate) held: Arc<AtomicUsize>,
    pub(crate) queued: Arc<AtomicUsize>,
    pub(crate) clients: Arc<AtomicUsize>,
    /// The line of held clients let through at `release_rate` (shared
    /// across reloads like the counts above).
    pub(crate) pacer: Arc<crate::pace::Pacer>,
    pub registry: Registry,
}

impl ListenerContext {
    /// The context for listener `index` of the current table. A new listener
    /// registers its metric series at zero; one that replaces `previous` (a
    /// reload kept its socket) shares its counters and leaves the gauges of
    /// its open sessions alone.
    pub fn new(index: usize, shared: Shared, previous: Option<&ListenerContext>) -> Self {
        let snapshot = shared.table.load();
        let config = &snapshot.listeners[index].config;
        let name = config.name.clone();
        let same_name = previous.filter(|p| p.name == name && p.shared.cluster == shared.cluster);
        let known = |backend: &str| same_name.is_some_and(|p| p.pairs.contains_key(backend));
        let pairs = snapshot.backends.iter().map(|b| {
            let pair = PairMetrics::new(&shared.cluster, &name, &b.config.name, !known(&b.config.name));
            (b.config.name.clone(), pair)
        });
        let gauges = snapshot
            .backends
            .iter()
            .map(|b| (b.config.name.clone(), crate::metrics::backend_connections(&shared.cluster, &b.config.name)));
        let metrics = ListenerMetrics::new(&shared.cluster, &name, config.max_clients, same_name.is_none());
        let share =
            |pick: fn(&ListenerContext) -> &Arc<AtomicUsize>| previous.map(|p| pick(p).clone()).unwrap_or_default();
        let (pairs, backend_gauges) = (pairs.collect(), gauges.collect());
        let listen = config.listen;
        drop(snapshot);
        Self {
            listen,
            metrics,
            name,
            shared,
            cursor: Cursor::default(),
            pairs,
            backend_gauges,
            held: share(|p| &p.held),
            queued: share(|p| &p.queued),
            clients: share(|p| &p.clients),
            pacer: previous.map(|p| p.pacer.clone()).unwrap_or_default(),
            registry: Registry::default(),
        }
    }

    /// This listener's position in `table`, if it still exists there.
    pub fn route_in(&self, table: &RoutingTable) -> Option<usize> {
        table.listeners.iter().position(|l| l.config.name == self.name)
    }

    /// The listener's config in the current table.
    pub fn config(&self) -> Option<ListenerConfig> {
        let table = self.shared.table.load();
        self.route_in(&table).map(|i| table.listeners[i].config.clone())
    }

    /// Clients waiting for an eligible backend now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Clients waiting under a connection limit now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Clients forwarded now.
    pub fn active(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    /// Closes sessions on backends that may no longer serve this listener
    /// (or all of them, per `on_ineligible`, if the listener was removed).
    pub fn enforce(&self, table: &RoutingTable) -> usize {
        match self.route_in(table) {
            Some(index) => self.registry.enforce(table, index),
            None => self.registry.enforce_removed(),
        }
    }

    /// This listener's metric handles for `backend` (made on the spot for a
    /// backend a reload added after this context was built).
    pub(crate) fn pair(&self, backend: &str) -> PairMetrics {
        self.pairs
            .get(backend)
            .cloned()
            .unwrap_or_else(|| PairMetrics::new(&self.shared.cluster, &self.name, backend, false))
    }
}

/// Binds a listening socket. Never SO_REUSEPORT; IP_FREEBIND if `freebind`.
pub fn bind(addr: SocketAddr, freebind: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.set_cloexec(true)?;
    if freebind {
        #[cfg(target_os = "linux")]
        match addr {
            SocketAddr::V4(_) => socket.set_freebind_v4(true)?,
            SocketAddr::V6(_) => socket.set_freebind_v6(true)?,
        }
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Whether accept loops take clients now. During an upgrade the new
/// process holds its loops shut until it is ready, and the old one shuts its
/// own the moment the new one opens (and opens them again if the upgrade
/// fails). A shut loop keeps its socket: clients wait in the kernel's
/// backlog, they are not refused.
pub type AcceptGate = watch::Receiver<bool>;

/// Waits while `gate` is shut; `false` once it can never open (its sender is
/// gone) or `stop` fired.
pub async fn gate_open(gate: &mut AcceptGate, stop: &CancellationToken) -> bool {
    while !*gate.borrow_and_update() {
        tokio::select! {
            _ = stop.cancelled() => return false,
            changed = gate.changed() => if changed.is_err() { return false },
        }
    }
    true
}

/// Accepts clients until `stop` fires, while `gate` is open. Each client is
/// served by the address's listeners current at its accept (a reload swaps
/// them); sessions run on `tracker`.
pub async fn serve(
    listener: TcpListener,
    group: Arc<ArcSwap<AddressGroup>>,
    tracker: TaskTracker,
    stop: CancellationToken,
    mut gate: AcceptGate,
) {
    let mut backoff = Duration::from_millis(10);
    // This address's share of the pending budget, taken from the budget of
    // the listeners current at start (the budget is one per process).
    let share = group.load().first().map(|ctx| ctx.shared.budget.address());
    loop {
        if !gate_open(&mut gate, &stop).await {
            return;
        }
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            changed = gate.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            r = listener.accept() => r,
        };
        let group_now = group.load_full();
        // The first listener stands for the address until a session is routed.
        let Some(current) = group_now.first() else { continue };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                if !allowed(current, peer) {
                    current.metrics.reject(Reject::NotAllowed);
                    crate::session::log_refusal(
                        current,
                        peer,
                        std::time::Instant::now(),
                        Reject::NotAllowed,
                        "client address is not in the listener's allow list",
                    );
                    drop(stream);
                    continue;
                }
                let pending = match current.shared.budget.take(peer.ip(), share.as_ref()) {
                    Ok(pending) => pending,
                    Err(over) => {
                        crate::session::over_budget(current, &stream, peer, over);
                        continue;
                    }
                };
                let span = tracing::debug_span!("session", listen = %group_now.listen, client = %peer);
                let session = crate::session::run(group_now, stream, peer, pending);
                tracker.spawn(session.instrument(span));
            }
            Err(err) if is_resource_exhaustion(&err) => {
                current.metrics.accept_errors.increment(1);
                tracing::warn!(listener = %current.name, error = %err, pause = ?backoff, "cannot accept: out of file descriptors or memory; pausing accepts");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Err(err) => {
                current.metrics.accept_errors.increment(1);
                tracing::debug!(listener = %current.name, error = %err, "accept failed");
            }
        }
    }
}

fn allowed(ctx: &ListenerContext, peer: SocketAddr) -> bool {
    let table = ctx.shared.table.load();
    let Some(route) = ctx.route_in(&table).map(|i| &table.listeners[i]) else { return true };
    route.config.allow.is_empty() || route.config.allow.iter().any(|c| c.contains(peer.ip()))
}

fn is_resource_exhaustion(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}
