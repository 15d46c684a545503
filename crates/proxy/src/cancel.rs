//! Query cancellation. A CancelRequest arrives on a new connection and names
//! a session only by process id and secret key, which pglb cannot see inside
//! TLS. So it is fanned out, in parallel with a short timeout, to every
//! backend that holds a session opened on the address the cancel arrived on
//! (eligible or not: a drained or lagging replica still has sessions); only
//! the server whose process id and secret key match acts on it. Each one costs every backend it reaches a
//! forked process, so a source address may send at most
//! [`CANCELS_PER_SECOND`] a second, and none is passed on once shutdown has
//! begun; the rest are closed unanswered (as PostgreSQL answers none).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::connect::connect;
use crate::listener::ListenerContext;
use crate::rate::{OncePerSecond, PerSecond};

static LIMIT: PerSecond<4096> = PerSecond::new(CANCELS_PER_SECOND);
/// The refusal log line: one a second.
static LOGGED: OncePerSecond = OncePerSecond::new();

const CANCEL_TIMEOUT: Duration = Duration::from_secs(2);

/// Most cancel requests one source address may send in a second.
pub const CANCELS_PER_SECOND: u32 = 50;

/// Sends `request` (a whole CancelRequest from `peer`) to each backend
/// holding a session, unless the source is over its rate or pglb drains.
pub async fn fan_out(ctx: &ListenerContext, request: &[u8], peer: SocketAddr) {
    ctx.metrics.cancels.increment(1);
    let refused = if ctx.shared.draining.is_cancelled() {
        Some(1)
    } else if !LIMIT.allow(peer.ip(), Instant::now()) {
        Some(0)
    } else {
        None
    };
    if let Some(reason) = refused {
        ctx.metrics.cancels_refused[reason].increment(1);
        let what = crate::metrics::CANCEL_REFUSALS[reason];
        if LOGGED.allow() {
            tracing::warn!(client = %peer, listener = %ctx.name, reason = what, "cancel request not passed on (logged at most once a second)");
        }
        return;
    }
    // The target session came in on this address (a client cancels through
    // the address it connected to): only backends holding sessions opened
    // here can have it.
    let targets: Vec<(Arc<str>, String, std::net::SocketAddr)> = match ctx.shared.contexts.upgrade() {
        Some(all) => all.backends_at(ctx.listen),
        // No registry of contexts (a listener on its own): its cluster's
        // backends that hold sessions.
        None => {
            let table = ctx.shared.table.load();
            let busy = table.backends.iter().filter(|b| b.load.active() > 0);
            busy.filter_map(|b| Some((ctx.shared.cluster.clone(), b.config.name.clone(), b.checked_address()?)))
                .collect()
        }
    };
    let request: Arc<[u8]> = request.into();
    let mut sends = tokio::task::JoinSet::new();
    for (cluster, name, addr) in targets {
        let request = request.clone();
        let span = tracing::info_span!("cancel", cluster = %cluster);
        let send = async move {
            let result = tokio::time::timeout(CANCEL_TIMEOUT, async {
                let mut stream = connect(addr, CANCEL_TIMEOUT, CANCEL_TIMEOUT).await?;
                stream.write_all(&request).await?;
                stream.shutdown().await
            })
            .await;
            match result {
                Ok(Ok(())) => tracing::debug!(backend = %name, "cancel request forwarded"),
                Ok(Err(err)) => tracing::warn!(backend = %name, error = %err, "cannot forward cancel request"),
                Err(_) => tracing::warn!(backend = %name, "forwarding cancel request timed out"),
            }
        };
        sends.spawn(tracing::Instrument::instrument(send, span));
    }
    while sends.join_next().await.is_some() {}
}
