//! Wiring: config → topology (routing tables) ← checkers; listeners → table
//! → forwarders; the admin endpoint reads tables and metrics. Signals: SIGHUP
//! reloads, SIGUSR2 (or `POST /upgrade`) upgrades, SIGTERM/SIGINT drain and
//! stop, a second one stops at once.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use arc_swap::ArcSwap;
use pglb_admin::{AdminContext, LiveConfig, UpgradeRequest};
use pglb_config::{Config, ConfigError};
use pglb_proxy::{AddressGroup, Contexts, ListenerContext};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clusters::{ClusterRun, Common};
use crate::signals::{Sig, Signals};
use crate::systemd::{Heartbeat, Notifier};
use crate::upgrade::new::Incoming;
use crate::upgrade::old::Outcome;
use crate::upgrade::Launch;

/// `pglb check`: validate only; never binds a socket.
pub fn check(path: &Path) -> ExitCode {
    match pglb_config::load_file(path) {
        Ok(config) => {
            for warning in &config.warnings {
                eprintln!("{}: warning: {warning}", location(path, warning));
            }
            let clusters = match config.clusters.len() {
                _ if config.implicit() => String::new(),
                1 => "1 cluster, ".to_owned(),
                n => format!("{n} clusters, "),
            };
            let patroni = config.clusters.iter().filter(|c| c.patroni.is_some()).count();
            let members = match patroni {
                0 => "",
                _ => " + members read from Patroni",
            };
            println!(
                "{}: ok ({clusters}{} listeners, {} backends{members}{})",
                path.display(),
                config.listeners().count(),
                config.backend_count(),
                match config.warnings.len() {
                    0 => String::new(),
                    1 => ", 1 warning".into(),
                    n => format!(", {n} warnings"),
                }
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            print_config_error(&err);
            ExitCode::FAILURE
        }
    }
}

/// `file:line:column` of a warning.
fn location(path: &Path, warning: &pglb_config::Problem) -> String {
    ConfigError { file: path.to_owned(), problems: Vec::new() }.location(warning)
}

/// Logs the config's warnings (at start and after a reload).
pub fn log_warnings(path: &Path, config: &Config) {
    for warning in &config.warnings {
        tracing::warn!(at = %location(path, warning), "config: {warning}");
    }
}

pub fn print_config_error(err: &ConfigError) {
    for problem in &err.problems {
        eprintln!("{}: error: {problem}", err.location(problem));
    }
    let n = err.problems.len();
    eprintln!("{}: {n} problem{} found", err.file.display(), if n == 1 { "" } else { "s" });
}

/// Loads the config, sets up logging, and runs the balancer until stopped.
pub fn run_blocking(path: &Path) -> anyhow::Result<()> {
    let config = match pglb_config::load_file(path) {
        Ok(c) => c,
        Err(err) => {
            print_config_error(&err);
            anyhow::bail!("{} is invalid; nothing was started", path.display());
        }
    };
    crate::telemetry::init_logging(config.log_format);
    log_warnings(path, &config);
    crate::limits::raise_fd_limit();
    let launch = Launch::current();
    runtime()?.block_on(serve(path.to_owned(), config, launch))
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")
}

/// One listening socket and the listeners its accept loop serves.
pub struct Live {
    pub addr: std::net::SocketAddr,
    pub group: Arc<ArcSwap<AddressGroup>>,
    pub stop: CancellationToken,
    /// The socket itself (a second descriptor), to hand over at an upgrade.
    pub fd: OwnedFd,
}

/// A running balancer.
pub struct Server {
    pub path: PathBuf,
    pub config: Arc<Config>,
    /// The clusters served, in config order.
    pub clusters: Vec<ClusterRun>,
    /// What every cluster's listeners share.
    pub common: Common,
    /// The state file's writer (all clusters), if the config names one.
    pub saver: Option<std::sync::mpsc::Sender<pglb_control::state_file::Update>>,
    pub listeners: Vec<Live>,
    /// Every listener context with sessions: what enforcement, reloads and
    /// shutdown act on.
    pub contexts: Arc<Contexts>,
    pub admin: Arc<AdminContext>,
    pub sessions: TaskTracker,
    /// Ends the admin endpoint and background tasks at the very end.
    pub background: CancellationToken,
    /// The health checkers' and topology's own thread.
    pub control: Control,
    /// The kernel program, once loaded (kept across reloads).
    pub loaded: crate::data_path::Loaded,
    /// The admin endpoint's address and socket (to hand over), its accept
    /// loop's stop and task.
    pub admin_socket: (std::net::SocketAddr, OwnedFd),
    pub(crate) admin_stop: CancellationToken,
    /// Completes once the admin endpoint (on its own thread) has stopped.
    pub(crate) admin_task: tokio::sync::oneshot::Receiver<()>,
    /// Open while this process accepts clients (see `upgrade`).
    pub accepting: watch::Sender<bool>,
    /// How this process was started, to start it again for an upgrade.
    pub launch: Launch,
    /// Upgrades asked for over the admin endpoint.
    upgrades: mpsc::Receiver<UpgradeRequest>,
}

/// A runtime of its own, on its own thread, for health checks and the
/// topology task: however busy the data path's workers are, checks are not
/// delayed behind it (a check that times out marks a backend down).
pub struct Control {
    pub handle: tokio::runtime::Handle,
    /// Dropping it ends the thread.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Control {
    pub fn start() -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the health-check runtime")?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("pglb-health".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let _ = stopped.await;
                })
            })
            .context("cannot start the health-check thread")?;
        Ok(Self { handle, _stop: stop })
    }
}

/// Binds every socket first (an invalid setup starts nothing), or takes
/// them from the running pglb when started by it for an upgrade; then
/// serves until a stop signal, reloading on SIGHUP and upgrading on SIGUSR2
/// or `POST /upgrade`. Under systemd: READY once every backend's first check
/// completed, RELOADING/READY around a reload.
pub async fn serve(path: PathBuf, config: Config, launch: Launch) -> anyhow::Result<()> {
    let notifier = Notifier::from_env();
    let mut signals = Signals::new()?;
    let mut incoming = Incoming::connect().await?;
    let mut server = match Server::start(path, config, launch, incoming.as_mut()).await {
        Ok(server) => server,
        Err(err) => {
            if let Some(incoming) = &incoming {
                incoming.fail(&err).await;
            }
            return Err(err);
        }
    };
    server.supervise(notifier)?;
    server.first_checks().await;
    match incoming {
        Some(incoming) => {
            incoming.take_over(&server).await?;
            notifier.took_over(&server.summary());
        }
        None => notifier.ready(&server.summary()),
    }
    loop {
        let request = tokio::select! {
            sig = signals.next() => match sig {
                Sig::Hup => {
                    notifier.reloading();
                    server.reload().await;
                    notifier.ready(&server.summary());
                    continue;
                }
                Sig::Upgrade => None,
                Sig::Stop => break,
            },
            Some(request) = server.upgrades.recv() => Some(request),
        };
        match crate::upgrade::old::upgrade(&server, request, &mut signals, notifier).await {
            Outcome::Done { pid, channel } => {
                server.retire(&mut signals, pid, channel).await;
                return Ok(());
            }
            Outcome::Failed(_) => notifier.status(&server.summary()),
            Outcome::Stopped => break,
        }
    }
    server.shutdown(&mut signals, notifier).await;
    Ok(())
}

impl Server {
    pub async fn start(
        path: PathBuf,
        config: Config,
        launch: Launch,
        mut incoming: Option<&mut Incoming>,
    ) -> anyhow::Result<Self> {
        let config = Arc::new(config);
        let admin_listen = config.admin.listen;
        let admin_socket = match incoming.as_deref_mut().and_then(|i| i.admin(admin_listen)) {
            Some(inherited) => inherited?,
            None => pglb_proxy::bind(admin_listen, false)
                .with_context(|| format!("cannot bind admin listener to {admin_listen}"))?,
        };
        let admin_fd = admin_socket.as_fd().try_clone_to_owned().context("cannot duplicate the admin socket")?;
        let sockets = bind_listeners(&config, &[], incoming.as_deref_mut())?;
        let tls: Vec<_> = config.clusters.iter().map(|c| crate::clusters::tls_for(c)).collect::<anyhow::Result<_>>()?;
        let metrics = crate::telemetry::init_metrics()?;
        let (mut origins, saver) = crate::clusters::origins(&config, incoming.as_ref().map(|i| &i.state));
        let control = Control::start()?;
        let store = match &config.shared_state {
            Some(shared) => {
                Some(pglb_store::start(shared, &control.handle).context("shared_state: cannot start the etcd client")?)
            }
            None => None,
        };
        let mut loaded = crate::data_path::Loaded::default();
        let data_path = crate::data_path::choose(&config, &mut loaded)?;
        let fds = rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft).unwrap_or(1024);
        let (max_pending, per_source) = config.limits.resolve(fds);
        tracing::info!(max_pending, max_pending_per_source = per_source, "pending budget (limits:)");
        let contexts = Arc::new(Contexts::default());
        let common = Common {
            pipes: data_path.pipes,
            #[cfg(target_os = "linux")]
            sockmap: data_path.sockmap,
            draining: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            budget: pglb_proxy::Budget::new(max_pending, per_source),
            contexts: Arc::downgrade(&contexts),
            store: store.clone(),
        };
        let clusters: Vec<ClusterRun> = config
            .clusters
            .iter()
            .zip(tls)
            .map(|(cluster, tls)| {
                let origin = origins.remove(&cluster.name).unwrap_or(pglb_control::Origin::Nothing);
                let (saver, handle) = (saver.clone(), control.handle.clone());
                ClusterRun::start(cluster.clone(), origin, saver, tls, &handle, &common, contexts.clone())
            })
            .collect::<anyhow::Result<_>>()?;
        let live = LiveConfig {
            path: path.display().to_string(),
            hash: crate::reload::file_hash(&path),
            loaded_at: SystemTime::now(),
            last_reload: None,
        };
        crate::reload::record_success(false);
        let (upgrade, upgrades) = mpsc::channel(1);
        let admin = Arc::new(AdminContext {
            clusters: ArcSwap::from_pointee(clusters.iter().map(|c| c.topology.clone()).collect()),
            metrics: metrics.clone(),
            draining: AtomicBool::new(false),
            data_path: contexts.clone(),
            live: ArcSwap::from_pointee(live),
            token: ArcSwap::from_pointee(config.admin.token.clone()),
            loopback: config.admin.listen.ip().is_loopback(),
            upgrade,
            store: store.as_ref().map(|s| s.status.clone()),
        });
        let background = CancellationToken::new();
        // A process taking over accepts nothing until the old one steps aside.
        let (accepting, _) = watch::channel(incoming.is_none());
        let admin_stop = background.child_token();
        let admin_socket = admin_socket.into_std().context("cannot take the admin socket off the runtime")?;
        let admin_task = pglb_admin::spawn(
            admin_socket,
            admin.clone(),
            admin_stop.clone(),
            accepting.subscribe(),
            pglb_admin::Limits::for_fds(fds),
        )
        .context("cannot start the admin endpoint's thread")?;
        spawn_upkeep(metrics, background.clone());
        let mut server = Server {
            path,
            config,
            clusters,
            common,
            saver,
            listeners: Vec::new(),
            contexts,
            admin,
            sessions: TaskTracker::new(),
            background,
            control,
            loaded,
            admin_socket: (admin_listen, admin_fd),
            admin_stop,
            admin_task,
            accepting,
            launch,
            upgrades,
        };
        server.open_listeners(sockets)?;
        tracing::info!(
            admin = %server.config.admin.listen,
            clusters = server.clusters.len(),
            backends = server.config.backend_count(),
            "pglb is running"
        );
        Ok(server)
    }

    /// Starts accept loops on freshly bound (or handed over) sockets.
    pub fn open_listeners(&mut self, sockets: Vec<(std::net::SocketAddr, TcpListener)>) -> anyhow::Result<()> {
        for (addr, socket) in sockets {
            let fd = socket
                .as_fd()
                .try_clone_to_owned()
                .with_context(|| format!("cannot duplicate the socket of {addr}"))?;
            let group = Arc::new(ArcSwap::from_pointee(self.group_for(addr, None, &[])));
            let stop = CancellationToken::new();
            let gate = self.accepting.subscribe();
            tokio::spawn(pglb_proxy::serve(socket, group.clone(), self.sessions.clone(), stop.clone(), gate));
            self.listeners.push(Live { addr, group, stop, fd });
        }
        Ok(())
    }

    /// The contexts for the listeners of every cluster's current table on
    /// `addr`, in config order: a listener of a cluster not in `changed`
    /// keeps its context from `previous` (its sessions and counters, as if
    /// nothing happened); others get a fresh one (sharing counters with the
    /// `previous` one of the same cluster and name), registered for
    /// enforcement and the admin views.
    pub fn group_for(
        &self,
        addr: std::net::SocketAddr,
        previous: Option<&AddressGroup>,
        changed: &[String],
    ) -> AddressGroup {
        let mut members = Vec::new();
        for cluster in &self.clusters {
            let table = cluster.topology.table.load();
            let here = table.listeners.iter().enumerate().filter(|(_, l)| l.config.listen == addr);
            for (index, route) in here {
                let l = &route.config;
                let before = previous.and_then(|g| {
                    g.contexts().find(|c| c.name == l.name && c.shared.cluster == cluster.topology.cluster).cloned()
                });
                let ctx = match before {
                    Some(same) if !changed.contains(&cluster.config.name) => same,
                    before => {
                        let ctx = Arc::new(ListenerContext::new(index, cluster.shared.clone(), before.as_deref()));
                        if before.is_none() {
                            tracing::info!(cluster = %cluster.config.name, listener = %l.name, listen = %l.listen, role = l.role.as_str(), balance = l.balance.as_str(), sni = ?l.sni, "listening");
                        }
                        self.contexts.add(ctx.clone());
                        ctx
                    }
                };
                members.push((ctx, l.sni.clone()));
            }
        }
        AddressGroup::new(addr, members)
    }

    /// Waits until every backend's first check has completed — answered,
    /// failed or timed out — so that READY=1 means "routing on evidence";
    /// bounded by twice (interval + timeout), and at least 5 s.
    async fn first_checks(&self) {
        let cap = self.first_checks_within();
        let started = std::time::Instant::now();
        while !self.clusters.iter().all(|c| c.topology.table.load().all_checked) {
            if started.elapsed() > cap {
                tracing::warn!(waited = ?cap, "not every backend's first check completed; reporting ready anyway");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!(after = ?started.elapsed(), "first checks of every backend completed: ready");
    }

    /// How long the first checks of every backend may take: twice the
    /// slowest cluster's interval + timeout, and at least 5 s.
    pub fn first_checks_within(&self) -> Duration {
        let slowest = self.clusters.iter().map(|c| (c.config.health.interval + c.config.health.timeout) * 2).max();
        slowest.unwrap_or_default().max(Duration::from_secs(5))
    }

    /// The one-line status for systemd.
    fn summary(&self) -> String {
        crate::systemd::summary(&self.admin.clusters.load(), self.contexts.open_sessions())
    }

    /// The watchdog (when systemd asks for one) fed by heartbeats of both
    /// runtimes, and the STATUS= line kept current.
    fn supervise(&self, notifier: Notifier) -> anyhow::Result<()> {
        let data = tokio::runtime::Handle::current();
        if let Some(period) = crate::systemd::watchdog_period() {
            let hearts = vec![Heartbeat::new("data path"), Heartbeat::new("health check")];
            hearts[0].spawn(&data, period / 8);
            hearts[1].spawn(&self.control.handle, period / 8);
            crate::systemd::start_watchdog(notifier, period, hearts).context("cannot start the watchdog thread")?;
            tracing::info!(?period, "systemd watchdog enabled");
        }
        crate::systemd::test_stall(&data, &self.control.handle);
        let (admin, contexts, stop) = (self.admin.clone(), self.contexts.clone(), self.background.clone());
        tokio::spawn(async move {
            let mut last = String::new();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
                let now = crate::systemd::summary(&admin.clusters.load(), contexts.open_sessions());
                if now != last {
                    notifier.status(&now);
                    last = now;
                }
            }
        });
        Ok(())
    }
}

/// Binds the addresses of `config`'s listeners that are not in `keep`, all
/// or nothing, once per address (listeners routed by server name share one).
pub fn bind_listeners(
    config: &Config,
    keep: &[std::net::SocketAddr],
    mut incoming: Option<&mut Incoming>,
) -> anyhow::Result<Vec<(std::net::SocketAddr, TcpListener)>> {
    let mut sockets: Vec<(std::net::SocketAddr, TcpListener)> = Vec::new();
    for (cluster, l) in config.listeners() {
        if keep.contains(&l.listen) || sockets.iter().any(|(a, _)| *a == l.listen) {
            continue;
        }
        if let Some(inherited) = incoming.as_deref_mut().and_then(|i| i.listener(l.listen)) {
            sockets.push((l.listen, inherited?));
            continue;
        }
        let socket = pglb_proxy::bind(l.listen, l.freebind).with_context(|| {
            let name = if cluster.implicit { l.name.clone() } else { format!("{}/{}", cluster.name, l.name) };
            format!("cannot bind listener `{name}` to {} (is another pglb or server running there?)", l.listen)
        })?;
        sockets.push((l.listen, socket));
    }
    Ok(sockets)
}

/// Histograms need periodic upkeep in the Prometheus exporter.
fn spawn_upkeep(handle: metrics_exporter_prometheus::PrometheusHandle, shutdown: CancellationToken) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(5)) => handle.run_upkeep(),
            }
        }
    });
}
