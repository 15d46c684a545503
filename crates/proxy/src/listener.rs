//! Listeners: binding (no SO_REUSEPORT, so a second pglb cannot silently
//! share a port) and the accept loop, which never dies on an accept error.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use pglb_routing::{Cursor, RoutingTable};
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::forward::PipePool;
use crate::metrics::{ListenerMetrics, PairMetrics};

/// Everything a listener's sessions share. Built once per config.
pub struct ListenerContext {
    /// Position of this listener in the table's `listeners`.
    pub index: usize,
    pub name: String,
    pub table: Arc<ArcSwap<RoutingTable>>,
    pub(crate) cursor: Cursor,
    pub(crate) metrics: ListenerMetrics,
    /// Per backend (table order): metric handles for this listener.
    pub(crate) pairs: Vec<PairMetrics>,
    /// Per backend: sessions of this listener open there (cancel fan-out).
    pub(crate) holding: Vec<AtomicUsize>,
    /// Splice pipes; `None` forwards by copying.
    pub(crate) pipes: Option<Arc<PipePool>>,
}

impl ListenerContext {
    /// The context for listener `index` of the current table; registers all
    /// its metric series at zero.
    pub fn new(index: usize, table: Arc<ArcSwap<RoutingTable>>, pipes: Option<Arc<PipePool>>) -> Self {
        let snapshot = table.load();
        let name = snapshot.listeners[index].config.name.clone();
        let pairs = snapshot
            .backends
            .iter()
            .map(|b| PairMetrics::new(&name, &b.config.name))
            .collect();
        let holding = snapshot
            .backends
            .iter()
            .map(|_| AtomicUsize::new(0))
            .collect();
        drop(snapshot);
        Self {
            index,
            metrics: ListenerMetrics::new(&name),
            name,
            table,
            cursor: Cursor::default(),
            pairs,
            holding,
            pipes,
        }
    }
}

/// Binds a listening socket. Does not set SO_REUSEPORT.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Accepts clients until `shutdown` fires; each session runs on `tracker`
/// with a child token of `shutdown`.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<ListenerContext>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let span = tracing::debug_span!("session", listener = %ctx.name, client = %peer);
                let session =
                    crate::session::run(ctx.clone(), stream, peer, shutdown.child_token());
                tracker.spawn(session.instrument(span));
            }
            Err(err) => {
                ctx.metrics.accept_errors.increment(1);
                if is_resource_exhaustion(&err) {
                    tracing::warn!(listener = %ctx.name, error = %err, "cannot accept: out of file descriptors or memory; pausing accepts for 100ms");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                } else {
                    tracing::debug!(listener = %ctx.name, error = %err, "accept failed");
                }
            }
        }
    }
}

fn is_resource_exhaustion(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}
