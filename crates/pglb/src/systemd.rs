//! systemd integration (sd_notify): `READY=1` once the listeners are bound
//! and every backend's first check has completed, `RELOADING=1`/`READY=1`
//! around a reload, `STOPPING=1` and `EXTEND_TIMEOUT_USEC` while draining, a
//! one-line `STATUS=`, and `WATCHDOG=1` only while both runtimes — the data
//! path's and the health checks' — make progress. Outside systemd (no
//! `NOTIFY_SOCKET`) nothing is sent.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pglb_routing::{Health, ObservedRole, RoutingTable};
use sd_notify::NotifyState;

/// Sends notifications to the service manager, if there is one.
#[derive(Debug, Clone, Copy)]
pub struct Notifier {
    enabled: bool,
}

/// Set while this process must not speak to systemd: a new process during
/// an upgrade until the old one made it the main process (systemd would
/// refuse its messages, `NotifyAccess=main`), and the old one after that.
static SILENT: AtomicBool = AtomicBool::new(false);

/// This process is systemd's main process now: its messages count.
pub fn speak() {
    SILENT.store(false, Ordering::Relaxed);
}

impl Notifier {
    pub fn from_env() -> Self {
        if std::env::var_os(crate::upgrade::SOCKET_ENV).is_some() {
            SILENT.store(true, Ordering::Relaxed);
        }
        Self { enabled: std::env::var_os("NOTIFY_SOCKET").is_some() }
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled || SILENT.load(Ordering::Relaxed) {
            return;
        }
        if let Err(err) = sd_notify::notify(states) {
            tracing::warn!(error = %err, "cannot notify systemd (NOTIFY_SOCKET)");
        }
    }

    /// Startup or a reload is done.
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// This process took over in an upgrade and is the main one now: ready,
    /// and the watchdog fed at once (its own pings follow their period).
    pub fn took_over(&self, status: &str) {
        let mut states = vec![NotifyState::Ready, NotifyState::Status(status)];
        if watchdog_period().is_some() {
            states.push(NotifyState::Watchdog);
        }
        self.send(&states);
    }

    /// A reload begins (with the monotonic time systemd 253+ requires).
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now, NotifyState::Status("reloading the config")]),
            Err(_) => self.send(&[NotifyState::Reloading, NotifyState::Status("reloading the config")]),
        }
    }

    /// Shutdown begins.
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("draining: sessions are finishing")]);
    }

    /// The stop (or start) may take `by` longer than systemd's timeout.
    pub fn extend(&self, by: Duration) {
        let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
        self.send(&[NotifyState::ExtendTimeoutUsec(usec)]);
    }

    /// Upgrade: makes `pid` (our child, in the unit's cgroup) systemd's main
    /// process, and waits (up to 5 s) for systemd to have processed it
    /// (`BARRIER=1`), so the old process's exit can never be taken for the
    /// service's. Then this process falls silent: no STOPPING=1.
    pub async fn hand_over(&self, pid: u32) {
        if !self.enabled || SILENT.load(Ordering::Relaxed) {
            return;
        }
        let status = format!("upgraded: pid {pid} serves; pid {} finishes its sessions", std::process::id());
        // The watchdog is fed in the same message: systemd's clock starts
        // afresh at the hand-over, and the new process feeds it at once too
        // (`took_over`), so no ping interval spans the change of process.
        let mut states = vec![NotifyState::MainPid(pid), NotifyState::Status(&status)];
        if watchdog_period().is_some() {
            states.push(NotifyState::Watchdog);
        }
        self.send(&states);
        match tokio::task::spawn_blocking(barrier).await {
            Ok(Ok(true)) => tracing::info!(pid, "systemd took the new main process"),
            Ok(Ok(false)) => tracing::warn!(pid, "systemd did not confirm the new main process (BARRIER=1) within 5s"),
            Ok(Err(e)) => {
                tracing::warn!(pid, error = %e, "cannot confirm the new main process with systemd (BARRIER=1)")
            }
            Err(e) => tracing::warn!(pid, error = %e, "cannot confirm the new main process with systemd"),
        }
        SILENT.store(true, Ordering::Relaxed);
    }

    pub fn status(&self, line: &str) {
        self.send(&[NotifyState::Status(line)]);
    }

    fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }
}

/// sd_notify_barrier(3): sends `BARRIER=1` with the write end of a pipe and
/// waits until systemd closes it, which it does after every message before
/// it. `Ok(false)` on a timeout.
fn barrier() -> std::io::Result<bool> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    sd_notify::notify_with_fds(&[NotifyState::Custom("BARRIER=1")], &[write.as_fd()])?;
    drop(write);
    let mut fds = [PollFd::new(&read, PollFlags::IN)];
    let ready = poll(&mut fds, Some(&Timespec { tv_sec: 5, tv_nsec: 0 }))?;
    Ok(ready > 0)
}

/// The one-line `STATUS=`: one cluster's primary and healthy replicas, or
/// for several how many have a primary (naming those without); open sessions.
pub fn summary(clusters: &[pglb_control::TopologyHandle], sessions: usize) -> String {
    let s = if sessions == 1 { "" } else { "s" };
    if let [only] = clusters {
        return format!("{}; {sessions} session{s}", cluster_summary(&only.table.load()));
    }
    let without: Vec<&str> = clusters
        .iter()
        .filter(|c| !c.table.load().backends.iter().any(|b| b.role == ObservedRole::Primary && b.serving()))
        .map(|c| &*c.cluster)
        .collect();
    let n = clusters.len();
    let missing = match without.as_slice() {
        [] => String::new(),
        some => format!(" (no primary: {})", some.join(", ")),
    };
    format!("{n} clusters, {} with a primary{missing}; {sessions} session{s}", n - without.len())
}

/// One cluster: its primary and how many replicas are healthy.
fn cluster_summary(table: &RoutingTable) -> String {
    let primaries: Vec<&str> = table
        .backends
        .iter()
        .filter(|b| b.role == ObservedRole::Primary && b.serving())
        .map(|b| b.config.name.as_str())
        .collect();
    let replicas = table.backends.iter().filter(|b| b.role == ObservedRole::Replica);
    let (healthy, total) =
        replicas.fold((0, 0), |(h, t), b| (h + usize::from(b.serving() && b.state.health() == Health::Healthy), t + 1));
    let primary = match primaries.as_slice() {
        [] => "no primary".to_owned(),
        [one] => format!("primary {one}"),
        many => format!("primaries {}", many.join(", ")),
    };
    format!("{primary}; {healthy}/{total} replicas healthy")
}

/// When a runtime last ran a task: a runtime that stops running tasks (all
/// its workers blocked) stops beating.
pub struct Heartbeat {
    epoch: Instant,
    last_ms: AtomicU64,
    pub name: &'static str,
}

impl Heartbeat {
    pub fn new(name: &'static str) -> Arc<Self> {
        Arc::new(Self { epoch: Instant::now(), last_ms: AtomicU64::new(0), name })
    }

    fn beat(&self) {
        self.last_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn age(&self) -> Duration {
        self.epoch.elapsed().saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }

    /// Beats every `every` on the runtime of `handle`.
    pub fn spawn(self: &Arc<Self>, handle: &tokio::runtime::Handle, every: Duration) {
        let me = self.clone();
        handle.spawn(async move {
            loop {
                me.beat();
                tokio::time::sleep(every).await;
            }
        });
    }
}

/// The watchdog interval systemd asked for (`WatchdogSec=`), if any.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// Pings the watchdog every `period / 2` from a thread of its own, as long
/// as every heartbeat is younger than `period / 2`; a stalled runtime stops
/// the pings, and systemd restarts pglb after `period` without one.
pub fn start_watchdog(notifier: Notifier, period: Duration, hearts: Vec<Arc<Heartbeat>>) -> std::io::Result<()> {
    let half = period / 2;
    std::thread::Builder::new().name("pglb-watchdog".into()).spawn(move || {
        let mut stalled: Vec<&'static str> = Vec::new();
        loop {
            std::thread::sleep(half);
            let now_stalled: Vec<&'static str> = hearts.iter().filter(|h| h.age() > half).map(|h| h.name).collect();
            if now_stalled.is_empty() {
                notifier.watchdog();
                if !stalled.is_empty() {
                    tracing::info!("the {} runtime runs again; watchdog pings resumed", stalled.join(" and "));
                }
            } else if now_stalled != stalled {
                tracing::error!(
                    runtimes = %now_stalled.join(","),
                    "the {} runtime has run no task for {:?}: watchdog pings withheld (systemd restarts pglb after WatchdogSec)",
                    now_stalled.join(" and "),
                    half
                );
            }
            stalled = now_stalled;
        }
    })?;
    Ok(())
}

/// Test hook: `PGLB_TEST_STALL_RUNTIME=health@2s` (or `data@2s`) blocks
/// every worker of that runtime 2 s after start, as a deadlock would, so the
/// tests can see the watchdog pings stop. Unset in production.
pub fn test_stall(data: &tokio::runtime::Handle, health: &tokio::runtime::Handle) {
    let Ok(spec) = std::env::var("PGLB_TEST_STALL_RUNTIME") else { return };
    let (which, after) = spec.split_once('@').unwrap_or((spec.as_str(), "0s"));
    let after = pglb_config::parse_duration(after).unwrap_or_default();
    let (handle, workers) = match which {
        "health" => (health.clone(), 1),
        "data" => (data.clone(), 64),
        _ => return,
    };
    tracing::warn!(runtime = which, ?after, "PGLB_TEST_STALL_RUNTIME: this runtime will be blocked (test hook)");
    let _ = std::thread::Builder::new().name("pglb-test-stall".into()).spawn(move || {
        std::thread::sleep(after);
        for _ in 0..workers {
            handle.spawn(async { std::thread::sleep(Duration::from_secs(3600)) });
        }
    });
}
