//! Query cancellation. A CancelRequest arrives on a new connection and names
//! a session only by process id and secret key, which pglb cannot see inside
//! TLS. So it is fanned out, in parallel with a short timeout, to every
//! backend that holds a pglb session now (eligible or not: a drained or
//! lagging replica still has sessions); only the server whose process id and
//! secret key match acts on it.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::connect::connect;
use crate::listener::ListenerContext;

const CANCEL_TIMEOUT: Duration = Duration::from_secs(2);

/// Sends `request` (a whole CancelRequest) to each backend holding a session.
pub async fn fan_out(ctx: &ListenerContext, request: &[u8]) {
    ctx.metrics.cancels.increment(1);
    let targets: Vec<(String, String, u16)> = {
        let table = ctx.shared.table.load();
        table
            .backends
            .iter()
            .filter(|b| b.load.active() > 0)
            .map(|b| (b.config.name.clone(), b.config.host.clone(), b.config.port))
            .collect()
    };
    let request: Arc<[u8]> = request.into();
    let mut sends = tokio::task::JoinSet::new();
    for (name, host, port) in targets {
        let request = request.clone();
        sends.spawn(async move {
            let result = tokio::time::timeout(CANCEL_TIMEOUT, async {
                let mut stream = connect(&host, port, CANCEL_TIMEOUT, CANCEL_TIMEOUT).await?;
                stream.write_all(&request).await?;
                stream.shutdown().await
            })
            .await;
            match result {
                Ok(Ok(())) => tracing::debug!(backend = %name, "cancel request forwarded"),
                Ok(Err(err)) => tracing::warn!(backend = %name, error = %err, "cannot forward cancel request"),
                Err(_) => tracing::warn!(backend = %name, "forwarding cancel request timed out"),
            }
        });
    }
    while sends.join_next().await.is_some() {}
}
