//! Every listener context still in use: the current one of each listening
//! socket, and those a reload replaced while they still hold sessions. The
//! control plane (routing changes, reloads, shutdown) acts on sessions
//! through this type; the admin endpoint reads plain views of it.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use pglb_routing::{CloseReason, RoutingTable};

use crate::listener::ListenerContext;

/// The contexts, newest last.
#[derive(Default)]
pub struct Contexts {
    all: ArcSwap<Vec<Arc<ListenerContext>>>,
}

/// One listener, as the admin endpoint shows it.
#[derive(Debug, Clone)]
pub struct ListenerView {
    pub cluster: Arc<str>,
    pub name: String,
    pub listen: SocketAddr,
    pub held: usize,
    pub queued: usize,
    pub active: usize,
}

/// One open session, as the admin endpoint shows it.
#[derive(Debug, Clone)]
pub struct SessionView {
    pub cluster: Arc<str>,
    pub listener: String,
    pub client: SocketAddr,
    pub backend: String,
    pub backend_local_port: u16,
    pub via_fallback: bool,
    pub started: SystemTime,
    pub server_name: Option<String>,
    pub bytes_client_to_backend: u64,
    pub bytes_backend_to_client: u64,
    /// The data path forwarding it now (`splice`, `copy`, `sockmap`,
    /// `sockmap_demoted`), or `starting` before its backend answered.
    pub forwarder: &'static str,
}

/// The backends and listeners that hold sessions now, as (cluster, name).
#[derive(Debug, Clone, Default)]
pub struct InUse {
    pub backends: HashSet<(Arc<str>, String)>,
    pub listeners: HashSet<(Arc<str>, String)>,
}

impl Contexts {
    /// Adds a context (a new listener, or one replacing another on reload).
    pub fn add(&self, ctx: Arc<ListenerContext>) {
        self.all.rcu(|all| {
            let mut all = Vec::clone(all);
            all.push(ctx.clone());
            all
        });
    }

    /// Closes sessions of `cluster` whose backend may no longer serve their
    /// listener in its `table`; returns how many were closed. Sessions of
    /// other clusters are not looked at.
    pub fn enforce(&self, cluster: &str, table: &RoutingTable) -> usize {
        self.all.load().iter().filter(|ctx| &*ctx.shared.cluster == cluster).map(|ctx| ctx.enforce(table)).sum()
    }

    /// Closes every session of `cluster` for `reason` (a reload removed it).
    pub fn close_cluster(&self, cluster: &str, reason: CloseReason) {
        for ctx in self.all.load().iter().filter(|ctx| &*ctx.shared.cluster == cluster) {
            ctx.registry.close_all(reason);
        }
    }

    /// Closes every session for `reason`.
    pub fn close_all(&self, reason: CloseReason) {
        for ctx in self.all.load().iter() {
            ctx.registry.close_all(reason);
        }
    }

    /// Sessions open now.
    pub fn open_sessions(&self) -> usize {
        self.all.load().iter().map(|ctx| ctx.registry.len()).sum()
    }

    /// Forgets replaced or removed contexts whose sessions have all ended.
    pub fn prune(&self) {
        self.all.rcu(|all| {
            let mut keep: Vec<Arc<ListenerContext>> = Vec::new();
            for (i, ctx) in all.iter().enumerate() {
                let newer = all[i + 1..].iter().any(|c| same_listener(c, ctx));
                let removed = ctx.config().is_none();
                if (!newer && !removed) || !ctx.registry.list().is_empty() {
                    keep.push(ctx.clone());
                }
            }
            keep
        });
    }

    /// The current context of each listening socket, as plain data.
    pub fn listeners(&self) -> Vec<ListenerView> {
        let all = self.all.load();
        all.iter()
            .enumerate()
            .filter(|(i, c)| !all[i + 1..].iter().any(|n| same_listener(n, c)))
            .map(|(_, c)| ListenerView {
                cluster: c.shared.cluster.clone(),
                name: c.name.clone(),
                listen: c.listen,
                held: c.held(),
                queued: c.queued(),
                active: c.active(),
            })
            .collect()
    }

    /// Every open session, of current and replaced contexts, as plain data.
    pub fn session_views(&self) -> Vec<SessionView> {
        let all = self.all.load();
        all.iter()
            .flat_map(|ctx| ctx.registry.list().into_iter().map(move |s| (ctx, s)))
            .map(|(ctx, s)| SessionView {
                cluster: ctx.shared.cluster.clone(),
                listener: ctx.name.clone(),
                client: s.client,
                backend: s.backend.clone(),
                backend_local_port: s.backend_local_port,
                via_fallback: s.via_fallback,
                started: s.started,
                server_name: s.server_name.clone(),
                bytes_client_to_backend: s.bytes_in.load(Ordering::Relaxed),
                bytes_backend_to_client: s.bytes_out.load(Ordering::Relaxed),
                forwarder: crate::forward::Path::of(s.path.load(Ordering::Relaxed)).as_str(),
            })
            .collect()
    }

    /// The backends holding sessions that clients opened on `listen` (any
    /// listener there, of any cluster, current or replaced by a reload), as
    /// each listener's cluster last checked them: cluster, name and address.
    pub fn backends_at(&self, listen: SocketAddr) -> Vec<(Arc<str>, String, SocketAddr)> {
        let mut targets: Vec<(Arc<str>, String, SocketAddr)> = Vec::new();
        for ctx in self.all.load().iter().filter(|c| c.listen == listen) {
            let mut names = HashSet::new();
            ctx.registry.backends_into(&mut names);
            if names.is_empty() {
                continue;
            }
            let table = ctx.shared.table.load();
            for b in table.backends.iter().filter(|b| names.contains(&b.config.name)) {
                match b.checked_address() {
                    Some(addr) if !targets.iter().any(|(_, _, a)| *a == addr) => {
                        targets.push((ctx.shared.cluster.clone(), b.config.name.clone(), addr))
                    }
                    _ => {}
                }
            }
        }
        targets
    }

    /// The backends and listeners that hold sessions now (no per-session copy).
    pub fn in_use(&self) -> InUse {
        let mut used = InUse::default();
        for ctx in self.all.load().iter() {
            let sessions = ctx.registry.list();
            if !sessions.is_empty() {
                used.listeners.insert((ctx.shared.cluster.clone(), ctx.name.clone()));
            }
            for s in sessions {
                used.backends.insert((ctx.shared.cluster.clone(), s.backend.clone()));
            }
        }
        used
    }
}

/// The same listener of the same cluster (a reload replaced one by the other).
fn same_listener(a: &ListenerContext, b: &ListenerContext) -> bool {
    a.listen == b.listen && a.name == b.name && a.shared.cluster == b.shared.cluster
}
