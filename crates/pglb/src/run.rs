//! Wiring: config → topology (routing tables) ← checkers; listeners → table
//! → forwarders; the admin endpoint reads tables and metrics.

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pglb_admin::AdminState;
use pglb_config::{Config, ConfigError};
use pglb_health::{Report, Topology};
use pglb_proxy::ListenerContext;
use pglb_routing::BackendState;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Most empty splice pipes kept for reuse (each is two fds).
const PIPE_POOL: usize = 64;
/// Bytes per splice pipe (F_SETPIPE_SZ); within the unprivileged pipe-max-size.
const PIPE_SIZE: usize = 256 * 1024;

/// `pglb check`: validate only; never binds a socket.
pub fn check(path: &Path) -> ExitCode {
    match pglb_config::load_file(path) {
        Ok(config) => {
            println!(
                "{}: ok ({} listeners, {} backends)",
                path.display(),
                config.listeners.len(),
                config.backends.len()
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            print_config_error(&err);
            ExitCode::FAILURE
        }
    }
}

fn print_config_error(err: &ConfigError) {
    for problem in &err.problems {
        eprintln!("{}: error: {problem}", err.location(problem));
    }
    let n = err.problems.len();
    eprintln!(
        "{}: {n} problem{} found",
        err.file.display(),
        if n == 1 { "" } else { "s" }
    );
}

/// Runs the balancer on a new runtime until SIGTERM or SIGINT.
pub fn run_blocking(path: &Path) -> anyhow::Result<()> {
    let config = match pglb_config::load_file(path) {
        Ok(c) => c,
        Err(err) => {
            print_config_error(&err);
            anyhow::bail!("{} is invalid; nothing was started", path.display());
        }
    };
    runtime()?.block_on(serve(config, wait_for_signal()))
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop pglb with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received: shutting down"),
    }
}

/// Binds every socket first (an invalid setup starts nothing), then serves
/// until `stop` resolves.
pub async fn serve(
    config: Config,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let admin_socket = pglb_proxy::bind(config.admin.listen)
        .with_context(|| format!("cannot bind admin listener to {}", config.admin.listen))?;
    let mut sockets = Vec::new();
    for l in &config.listeners {
        let socket = pglb_proxy::bind(l.listen).with_context(|| {
            format!(
                "cannot bind listener `{}` to {} (is another pglb or server running there?)",
                l.name, l.listen
            )
        })?;
        sockets.push(socket);
    }
    let tls = pglb_health::make_tls(config.health.sslrootcert.as_deref())
        .context("health.sslrootcert")?;
    let metrics = crate::telemetry::init_metrics()?;

    let topology = Topology::new(config.clone());
    for b in &config.backends {
        pglb_health::export_state(&b.name, &BackendState::default());
        metrics::counter!("pglb_health_check_failures_total", "backend" => b.name.clone())
            .increment(0);
    }
    let table = topology.table();
    let shutdown = CancellationToken::new();
    let (reports, inbox) = mpsc::channel::<Report>(256);
    tokio::spawn(topology.run(inbox));
    pglb_health::spawn_checkers(config.clone(), tls, reports, shutdown.clone());

    let admin = Arc::new(AdminState {
        table: table.clone(),
        metrics: metrics.clone(),
        draining: AtomicBool::new(false),
    });
    tokio::spawn(pglb_admin::serve(
        admin_socket,
        admin.clone(),
        shutdown.clone(),
    ));
    spawn_upkeep(metrics, shutdown.clone());

    let pipes = match config.forwarder {
        pglb_config::Forwarder::Splice => Some(Arc::new(pglb_proxy::PipePool::new(PIPE_POOL, PIPE_SIZE))),
        pglb_config::Forwarder::Copy => None,
    };
    let sessions = TaskTracker::new();
    for (index, socket) in sockets.into_iter().enumerate() {
        let ctx = Arc::new(ListenerContext::new(index, table.clone(), pipes.clone()));
        log_listening(&config, index, &socket);
        tokio::spawn(pglb_proxy::serve(
            socket,
            ctx,
            sessions.clone(),
            shutdown.clone(),
        ));
    }
    tracing::info!(admin = %config.admin.listen, backends = config.backends.len(), "pglb is running");

    stop.await;
    admin.draining.store(true, Ordering::Relaxed);
    shutdown.cancel();
    sessions.close();
    if tokio::time::timeout(Duration::from_secs(5), sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!("sessions did not end within 5s of shutdown; exiting anyway");
    }
    tracing::info!("pglb stopped");
    Ok(())
}

fn log_listening(config: &Config, index: usize, socket: &TcpListener) {
    let l = &config.listeners[index];
    let addr = socket
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(listener = %l.name, listen = %addr, role = l.role.as_str(), balance = l.balance.as_str(), "listening");
}

/// Histograms need periodic upkeep in the Prometheus exporter.
fn spawn_upkeep(
    handle: metrics_exporter_prometheus::PrometheusHandle,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(5)) => handle.run_upkeep(),
            }
        }
    });
}
