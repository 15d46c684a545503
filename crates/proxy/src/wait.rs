//! Waiting for a backend: clients are held while a listener has no eligible
//! backend, and queued while connection limits are full, instead of being
//! refused at once. A waiting client that hangs up frees its place at once.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::futures::Notified;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

/// Why a wait ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Wake {
    /// Routing changed or capacity freed: look again.
    Retry,
    Timeout,
    /// The client hung up (or sent something it should not have).
    ClientGone,
    Shutdown,
}

/// Places under the limits, freed as sessions end: a queued client waits
/// for one. A client watches *before* it looks for room, so a place freed
/// between its look and its wait still wakes it (a wake-up is not stored
/// for a watcher that comes later).
#[derive(Default)]
pub struct Capacity {
    freed: Notify,
    frees: AtomicU64,
    /// Runs when a client found no room, before it waits: lets a test free
    /// a place at exactly that moment. Never set by pglb.
    #[doc(hidden)]
    pub no_room_hook: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl Capacity {
    /// Call before looking for room; await after finding none.
    pub fn watch(&self) -> Notified<'_> {
        self.freed.notified()
    }

    /// A session ended: its places are free.
    pub fn free(&self) {
        self.freed.notify_waiters();
        self.frees.fetch_add(1, Ordering::Release);
    }

    /// Places freed so far (counted once the waiters were woken).
    pub fn frees(&self) -> u64 {
        self.frees.load(Ordering::Acquire)
    }

    pub(crate) fn no_room(&self) {
        if let Some(hook) = self.no_room_hook.get() {
            hook();
        }
    }
}

/// Waits for a routing change (or a freed place, when `freed` is given: a
/// [`Capacity::watch`] begun before looking for room) until `deadline`.
pub async fn wait(
    client: &TcpStream,
    generation: &mut watch::Receiver<u64>,
    freed: Option<Notified<'_>>,
    deadline: Instant,
    stop: &CancellationToken,
) -> Wake {
    let freed = async {
        match freed {
            Some(n) => n.await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = stop.cancelled() => Wake::Shutdown,
        changed = generation.changed() => if changed.is_ok() { Wake::Retry } else { Wake::Shutdown },
        _ = freed => Wake::Retry,
        _ = tokio::time::sleep_until(deadline.into()) => Wake::Timeout,
        _ = hung_up(client) => Wake::ClientGone,
    }
}

/// Resolves when the client hangs up: EOF, a reset or another error.
/// A client that sends bytes while it waits (it pipelines after its first
/// message) is not gone: the bytes stay queued for the backend, and its
/// hang-up is noticed once forwarding starts. A stale readiness left from
/// reading the first message is cleared by the EAGAIN of a peek.
pub(crate) async fn hung_up(client: &TcpStream) {
    loop {
        if client.readable().await.is_err() {
            return;
        }
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        let peeked = client.try_io(Interest::READABLE, || socket2::SockRef::from(client).peek(&mut byte));
        match peeked {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            // Readiness stays set for the forwarder: wait no more here.
            Ok(n) if n > 0 => return std::future::pending().await,
            _ => return,
        }
    }
}

/// A counted place among at most `max` waiters; freed on drop.
pub struct Slot<'a>(&'a AtomicUsize, &'a metrics::Gauge);

impl<'a> Slot<'a> {
    pub fn take(count: &'a AtomicUsize, max: usize, gauge: &'a metrics::Gauge) -> Option<Self> {
        count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        gauge.increment(1.0);
        Some(Self(count, gauge))
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        self.1.decrement(1.0);
    }
}
