//! Query cancellation. A CancelRequest arrives on a new connection and names
//! a session only by process id and secret key, which pglb cannot see inside
//! TLS. So it is fanned out, in parallel with a short timeout, to every
//! backend that holds a pglb session now (eligible or not: a drained or
//! lagging replica still has sessions); only the server whose process id and
//! secret key match acts on it. Each one costs every backend it reaches a
//! forked process, so a source address may send at most
//! [`CANCELS_PER_SECOND`] a second, and none is passed on once shutdown has
//! begun; the rest are closed unanswered (as PostgreSQL answers none).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::connect::connect;
use crate::listener::ListenerContext;

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
        if LOGGED.allow(IpAddr::from([0, 0, 0, 0]), Instant::now()) {
            tracing::warn!(client = %peer, listener = %ctx.name, reason = what, "cancel request not passed on (logged at most once a second)");
        }
        return;
    }
    let targets: Vec<(String, std::net::SocketAddr)> = {
        let table = ctx.shared.table.load();
        table
            .backends
            .iter()
            .filter(|b| b.load.active() > 0)
            .filter_map(|b| Some((b.config.name.clone(), b.checked_address()?)))
            .collect()
    };
    let request: Arc<[u8]> = request.into();
    let mut sends = tokio::task::JoinSet::new();
    for (name, addr) in targets {
        let request = request.clone();
        sends.spawn(async move {
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
        });
    }
    while sends.join_next().await.is_some() {}
}

/// Cancels counted per source in one-second windows. Sources share a fixed
/// table of slots by hash: memory is bounded whatever the sources, and
/// two sources in one slot share a limit (stricter, never looser).
struct PerSource {
    /// Per slot: the window's second (high 32 bits) and the count so far.
    slots: [AtomicU64; SLOTS],
    limit: u32,
}

const SLOTS: usize = 4096;

static LIMIT: PerSource = PerSource::new(CANCELS_PER_SECOND);
/// The refusal log line: one a second.
static LOGGED: PerSource = PerSource::new(1);

impl PerSource {
    const fn new(limit: u32) -> Self {
        Self { slots: [const { AtomicU64::new(0) }; SLOTS], limit }
    }

    /// Whether `source` may send one more at `now`; counts it if so.
    fn allow(&self, source: IpAddr, now: Instant) -> bool {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(source);
        let slot = &self.slots[(hash % SLOTS as u64) as usize];
        let second = u64::from(u32::try_from(since_start(now).as_secs()).unwrap_or(u32::MAX));
        slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            let (window, count) = (v >> 32, v & u64::from(u32::MAX));
            if window != second {
                Some((second << 32) | 1)
            } else {
                (count < u64::from(self.limit)).then_some(v + 1)
            }
        })
        .is_ok()
    }
}

/// Time since the first cancel request this process saw.
fn since_start(now: Instant) -> Duration {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    now.saturating_duration_since(*START.get_or_init(Instant::now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_gets_its_rate_and_no_more_and_others_are_not_touched() {
        let limit = PerSource::new(3);
        let (a, b) = (IpAddr::from([127, 0, 0, 1]), IpAddr::from([127, 0, 0, 2]));
        let now = Instant::now();
        assert_eq!((0..10).filter(|_| limit.allow(a, now)).count(), 3);
        assert!(limit.allow(b, now), "another source has its own count");
        assert!(limit.allow(a, now + Duration::from_secs(2)), "a later second, a new count");
    }
}
