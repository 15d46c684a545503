//! The checker tasks: one per backend. Each keeps one logged-in connection
//! and watches it between checks.
//!
//! - **Evidence is acted on at once:** when the kept connection drops, the
//!   backend is re-checked at once (a dropped connection alone may be
//!   `pg_terminate_backend` or `idle_session_timeout`); a reconnect refused
//!   or answered "shutting down" marks it down without waiting for `fall`.
//! - **Silence is waited out:** a check with no answer at `timeout` is
//!   reported silent, but its query keeps running on the same connection and
//!   a late answer still counts; while it runs no new check is stacked on
//!   it, and each interval without an answer is one more silent report.
//!   After `fall` of those the connection is replaced by a fresh login, at
//!   most once a minute (the check's own server process may be the stuck
//!   one, and a login storm on a starved server makes things worse).
//!
//! While the topology settles after a change, checks run every
//! `fast_interval`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pglb_config::{BackendConfig, Cluster};
use pglb_routing::Observation;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::CancellationToken;

use crate::check::{attempt, CheckConn, Outcome};
use pglb_control::Command;

/// Least time between two fresh logins that replace a stuck connection.
const REPLACE_EVERY: Duration = Duration::from_secs(60);

/// Starts the checker of `backend` on `runtime`; it reports until `stop`
/// fires. `fast_until` says until when checks run at `fast_interval`.
pub fn spawn_checker(
    runtime: &tokio::runtime::Handle,
    config: Arc<Cluster>,
    backend: BackendConfig,
    tls: MakeRustlsConnect,
    commands: mpsc::Sender<Command>,
    fast_until: watch::Receiver<Instant>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let labels = [("cluster", config.name.clone()), ("backend", backend.name.clone())];
    let duration = metrics::histogram!("pglb_health_check_duration_seconds", &labels);
    let now = Instant::now();
    let checker = Checker {
        config,
        backend,
        tls,
        commands,
        fast_until,
        duration,
        conn: None,
        inflight: None,
        last_answer: now,
        last_replaced: None,
    };
    runtime.spawn(checker.run(stop))
}

/// A check attempt that has not ended yet.
struct InFlight {
    task: JoinHandle<(Option<CheckConn>, Outcome)>,
    started: Instant,
    /// When its silence was last reported (first at the timeout).
    reported: Option<Instant>,
    /// Intervals it has spanned without an answer.
    ticks: u32,
}

struct Checker {
    config: Arc<Cluster>,
    backend: BackendConfig,
    tls: MakeRustlsConnect,
    commands: mpsc::Sender<Command>,
    fast_until: watch::Receiver<Instant>,
    duration: metrics::Histogram,
    /// The kept connection, between attempts (an attempt owns it meanwhile).
    conn: Option<CheckConn>,
    inflight: Option<InFlight>,
    /// When the server last answered anything (or the checker started).
    last_answer: Instant,
    last_replaced: Option<Instant>,
}

/// What woke the checker.
enum Wake {
    Tick,
    Timeout,
    Done(Option<(Option<CheckConn>, Outcome)>),
    Dropped,
    Replan,
    Stop,
}

impl Checker {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut next = Instant::now();
        loop {
            let wake = self.wait(next, &shutdown).await;
            match wake {
                Wake::Stop => break,
                Wake::Replan => next = next.min(Instant::now() + self.config.health.fast_interval),
                Wake::Dropped => {
                    self.conn = None;
                    self.start(true);
                }
                Wake::Tick => {
                    next = Instant::now() + self.pace();
                    if !self.tick().await {
                        break;
                    }
                }
                Wake::Timeout => {
                    if let Some(f) = &mut self.inflight {
                        f.reported = Some(Instant::now());
                    }
                    let timeout = pglb_config::format_duration(self.config.health.timeout);
                    if !self.silent(format!("check timed out: no answer within {timeout}")).await {
                        break;
                    }
                }
                Wake::Done(result) => {
                    if !self.done(result).await {
                        break;
                    }
                }
            }
        }
        if let Some(f) = self.inflight.take() {
            f.task.abort();
        }
    }

    async fn wait(&mut self, next: Instant, shutdown: &CancellationToken) -> Wake {
        let timeout = self.config.health.timeout;
        let deadline = self.inflight.as_ref().filter(|f| f.reported.is_none()).map(|f| f.started + timeout);
        let idle = self.inflight.is_none();
        tokio::select! {
            _ = shutdown.cancelled() => Wake::Stop,
            changed = self.fast_until.changed() => if changed.is_err() { Wake::Stop } else { Wake::Replan },
            _ = tokio::time::sleep_until(next.into()) => Wake::Tick,
            _ = sleep_until(deadline) => Wake::Timeout,
            result = finished(&mut self.inflight) => Wake::Done(result),
            _ = closed(&mut self.conn), if idle => Wake::Dropped,
        }
    }

    /// An interval passed: check, or report that the running check is still
    /// unanswered (and replace its connection if it has been for long). Its
    /// silence is reported once at the timeout, then once per `interval`
    /// (also while checks run at `fast_interval`): a tick before the
    /// timeout, or right after it (timeout = interval), is not another
    /// silent check.
    async fn tick(&mut self) -> bool {
        let (pace, interval) = (self.pace(), self.config.health.interval);
        let Some(f) = &mut self.inflight else {
            self.start(false);
            return true;
        };
        match f.reported {
            Some(at) if at.elapsed() + pace / 2 >= interval => f.reported = Some(Instant::now()),
            _ => return true,
        }
        f.ticks += 1;
        let stuck = f.ticks >= self.config.health.fall;
        let waited = f.started.elapsed();
        if stuck && self.last_replaced.is_none_or(|t| t.elapsed() >= REPLACE_EVERY) {
            tracing::info!(backend = %self.backend.name, waited = ?waited, "check unanswered: replacing its connection with a fresh login (at most once a minute)");
            if let Some(f) = self.inflight.take() {
                f.task.abort();
            }
            self.last_replaced = Some(Instant::now());
            self.start(false);
        }
        let waited = pglb_config::format_duration(Duration::from_millis(waited.as_millis() as u64));
        self.silent(format!("no answer to the check for {waited}")).await
    }

    /// Starts an attempt on the kept connection (or a fresh login).
    fn start(&mut self, dropped: bool) {
        let health = self.config.health.clone();
        let task = tokio::spawn(attempt(self.conn.take(), dropped, health, self.backend.clone(), self.tls.clone()));
        self.inflight = Some(InFlight { task, started: Instant::now(), reported: None, ticks: 0 });
    }

    /// An attempt ended, in time or late.
    async fn done(&mut self, result: Option<(Option<CheckConn>, Outcome)>) -> bool {
        let Some(f) = self.inflight.take() else { return true };
        self.duration.record(f.started.elapsed().as_secs_f64());
        let Some((conn, outcome)) = result else { return true }; // aborted
        self.conn = conn;
        match outcome {
            Outcome::Answer(observation) => {
                self.last_answer = Instant::now();
                self.report(observation).await
            }
            // Already reported as silence at the timeout.
            Outcome::NoAnswer(_) if f.reported.is_some() => true,
            Outcome::NoAnswer(reason) => self.silent(reason).await,
        }
    }

    async fn silent(&mut self, reason: String) -> bool {
        let silent_for = self.last_answer.elapsed();
        self.report(Observation::Silent { reason, silent_for }).await
    }

    async fn report(&self, observation: Observation) -> bool {
        let report = Command::Report { backend: self.backend.name.clone(), observation, at: Instant::now() };
        self.commands.send(report).await.is_ok()
    }

    fn pace(&self) -> Duration {
        let health = &self.config.health;
        if Instant::now() < *self.fast_until.borrow() {
            health.fast_interval
        } else {
            health.interval
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Resolves when the running attempt ends (`None` if it was aborted).
async fn finished(inflight: &mut Option<InFlight>) -> Option<(Option<CheckConn>, Outcome)> {
    match inflight {
        Some(f) => (&mut f.task).await.ok(),
        None => std::future::pending().await,
    }
}

/// Resolves when the kept connection's server side closes; never without one.
async fn closed(conn: &mut Option<CheckConn>) {
    match conn {
        Some(c) => {
            let _ = (&mut c.driver).await;
        }
        None => std::future::pending().await,
    }
}
