//! Open sessions of one listener, so they can be closed when their backend
//! may no longer serve the listener (down, role change, fenced, disabled,
//! lag with `on_lag: close`), listed by `/connections`, and counted.
//!
//! Registration takes a short lock when a session opens and closes; routing
//! decisions never touch it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use pglb_config::{OnIneligible, OnLag};
use pglb_routing::{CloseReason, RoutingTable, Verdict};
use tokio_util::sync::CancellationToken;

/// One open session, as the registry sees it.
pub struct SessionHandle {
    pub client: SocketAddr,
    pub backend: String,
    pub backend_local_port: u16,
    pub via_fallback: bool,
    /// The listener said `on_ineligible: keep` when this session started.
    pub keep_when_removed: bool,
    pub started: SystemTime,
    /// The TLS server name the client asked for, when pglb routed by it.
    pub server_name: Option<String>,
    pub stop: CancellationToken,
    /// Why pglb closed it, if it did.
    pub reason: OnceLock<CloseReason>,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// The data path forwarding it now (a [`crate::forward::Path`]).
    pub path: std::sync::atomic::AtomicU8,
}

impl SessionHandle {
    /// Closes the session for `reason` (the first reason wins).
    pub fn close(&self, reason: CloseReason) {
        let _ = self.reason.set(reason);
        self.stop.cancel();
    }
}

/// Sessions of one listener.
#[derive(Default)]
pub struct Registry {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<SessionHandle>>>,
}

impl Registry {
    pub fn insert(&self, session: Arc<SessionHandle>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, session);
        id
    }

    pub fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// How many sessions are open (no copy of them).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A snapshot of the open sessions.
    /// Adds the names of the backends these sessions are on to `into`.
    pub fn backends_into(&self, into: &mut std::collections::HashSet<String>) {
        for session in self.lock().values() {
            if !into.contains(&session.backend) {
                into.insert(session.backend.clone());
            }
        }
    }

    pub fn list(&self) -> Vec<Arc<SessionHandle>> {
        self.lock().values().cloned().collect()
    }

    /// Closes every session whose backend may no longer serve listener
    /// `listener` of `table`, per the listener's `on_ineligible`/`on_lag`.
    /// Returns how many were closed.
    pub fn enforce(&self, table: &RoutingTable, listener: usize) -> usize {
        self.list().iter().filter(|s| judge(table, listener, s)).count()
    }

    /// The listener was removed by a reload: its sessions end unless its
    /// last config said `on_ineligible: keep`.
    pub fn enforce_removed(&self) -> usize {
        let mut closed = 0;
        for session in self.list() {
            if session.keep_when_removed || session.stop.is_cancelled() {
                continue;
            }
            session.close(CloseReason::ListenerRemoved);
            closed += 1;
        }
        closed
    }

    /// Closes every session for `reason`.
    pub fn close_all(&self, reason: CloseReason) {
        for session in self.list() {
            session.close(reason);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<SessionHandle>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Closes `session` if its backend may no longer serve `listener` of
/// `table`; true if this call closed it.
pub fn judge(table: &RoutingTable, listener: usize, session: &SessionHandle) -> bool {
    let Some(route) = table.listeners.get(listener) else { return false };
    let backend = table.backend_index(&session.backend).unwrap_or(usize::MAX);
    let reason = match table.verdict(listener, backend, session.via_fallback) {
        Verdict::Keep => return false,
        Verdict::Ineligible(_) if route.config.on_ineligible == OnIneligible::Keep => return false,
        Verdict::Lagging if route.config.on_lag == OnLag::Keep => return false,
        Verdict::Ineligible(why) => why,
        Verdict::Lagging => CloseReason::Lagging,
    };
    if session.stop.is_cancelled() {
        return false;
    }
    tracing::warn!(backend = %session.backend, client = %session.client, reason = reason.as_str(), "closing session: its backend may no longer serve this listener");
    session.close(reason);
    true
}
