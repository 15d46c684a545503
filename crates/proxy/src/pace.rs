//! Paced release of held clients: when a backend appears after an outage,
//! the clients that waited for it are let through in arrival order at
//! `release_rate` new backend connections a second, not all at once (every
//! login is a process fork, often with TLS and SCRAM, on a server that has
//! just been promoted or restarted). While anyone is in line, clients that
//! arrive meanwhile join its end.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// The line of one listener. Its head holds the one permit; the semaphore
/// queues the rest first come, first served.
pub struct Pacer {
    head: Arc<Semaphore>,
    /// Clients in line, the head included.
    waiting: AtomicUsize,
    /// When the next start is due (GCRA's theoretical arrival time), in
    /// nanoseconds since `base`.
    due: AtomicU64,
    base: Instant,
}

impl Default for Pacer {
    fn default() -> Self {
        Self {
            head: Arc::new(Semaphore::new(1)),
            waiting: AtomicUsize::new(0),
            due: AtomicU64::new(0),
            base: Instant::now(),
        }
    }
}

type Turn = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// A client's place in line; leaving the line (dropping it) gives it up.
pub struct Place {
    pacer: Arc<Pacer>,
    /// Queued for the head's permit (from the moment it joined).
    waiting: Option<Turn>,
    turn: Option<OwnedSemaphorePermit>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.pacer.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Pacer {
    /// Someone is in line: a new client joins it rather than pass it.
    pub fn busy(&self) -> bool {
        self.waiting.load(Ordering::Acquire) > 0
    }

    /// Joins the end of the line: the place is taken now, in arrival
    /// order, not when the client next looks.
    pub fn join(self: &Arc<Self>) -> Place {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let mut place =
            Place { pacer: self.clone(), waiting: Some(Box::pin(self.head.clone().acquire_owned())), turn: None };
        // One poll queues it in the semaphore (first come, first served).
        let _ = place.poll_turn(&mut Context::from_waker(Waker::noop()));
        place
    }
}

impl Place {
    fn poll_turn(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.turn.is_some() {
            return Poll::Ready(());
        }
        let Some(waiting) = self.waiting.as_mut() else { return Poll::Ready(()) };
        match waiting.as_mut().poll(cx) {
            Poll::Ready(permit) => {
                // The semaphore is never closed.
                self.turn = permit.ok();
                self.waiting = None;
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// Waits to be the head of the line (at once if it is).
    pub async fn head(&mut self) {
        std::future::poll_fn(|cx| self.poll_turn(cx)).await;
    }

    pub fn is_head(&mut self) -> bool {
        self.poll_turn(&mut Context::from_waker(Waker::noop())).is_ready()
    }

    /// As the head: waits for the next start at `rate` a second (bursts of
    /// at most a twentieth of it), then leaves the line to the next client.
    pub async fn start(mut self, rate: u32) {
        self.head().await;
        if rate > 0 {
            let pacer = &self.pacer;
            let spacing = 1_000_000_000 / u64::from(rate);
            let burst = (spacing * u64::from(rate / 20).max(1)).saturating_sub(spacing);
            let now = pacer.base.elapsed().as_nanos() as u64;
            let due = pacer.due.load(Ordering::Acquire).max(now);
            // Only the head moves `due`: a plain store is enough.
            pacer.due.store(due + spacing, Ordering::Release);
            if due > now + burst {
                tokio::time::sleep(Duration::from_nanos(due - now - burst)).await;
            }
        }
        self.turn = None;
        self.waiting = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn clients_start_in_arrival_order_at_the_rate() {
        let pacer = Arc::new(Pacer::default());
        let started = Arc::new(std::sync::Mutex::new(Vec::new()));
        let t0 = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let place = pacer.join();
            let started = started.clone();
            tasks.push(tokio::spawn(async move {
                place.start(100).await;
                started.lock().expect("lock").push((i, t0.elapsed()));
            }));
        }
        assert!(pacer.busy());
        for t in tasks {
            t.await.expect("task");
        }
        assert!(!pacer.busy(), "everyone left the line");
        let started = started.lock().expect("lock").clone();
        let order: Vec<u32> = started.iter().map(|(i, _)| *i).collect();
        assert_eq!(order, (0..200).collect::<Vec<_>>(), "arrival order");
        // 100 a second with bursts of 5: 200 starts take about 1.95 s, and
        // no second holds more than 100 + 5.
        let last = started.last().map(|(_, t)| *t).unwrap_or_default();
        assert!(last >= Duration::from_millis(1900) && last <= Duration::from_millis(2000), "{last:?}");
        for (k, (_, at)) in started.iter().enumerate() {
            let within = started[k..].iter().take_while(|(_, t)| *t < *at + Duration::from_secs(1)).count();
            assert!(within <= 105, "{within} starts in the second from {at:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_line_keeps_the_order_of_joining_not_of_waking() {
        let pacer = Arc::new(Pacer::default());
        let places: Vec<Place> = (0..50).map(|_| pacer.join()).collect();
        let started = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // Woken in reverse order, as a broadcast may wake them.
        for (i, place) in places.into_iter().enumerate().rev() {
            let started = started.clone();
            tasks.push(tokio::spawn(async move {
                place.start(1000).await;
                started.lock().expect("lock").push(i);
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        assert_eq!(*started.lock().expect("lock"), (0..50).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_leaves_the_line_gives_up_its_place() {
        let pacer = Arc::new(Pacer::default());
        let mut first = pacer.join();
        first.head().await;
        let second = pacer.join();
        let third = pacer.join();
        drop(second);
        first.start(10).await;
        let started = tokio::time::timeout(Duration::from_secs(1), third.start(10)).await;
        assert!(started.is_ok(), "the third takes the place the second left");
        assert!(!pacer.busy());
    }
}
