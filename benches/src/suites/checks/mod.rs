//! The checks suite: what health checks cost, pglb (one kept, logged-in
//! check connection per backend, a query on it every interval) vs HAProxy
//! (`option pgsql-check`: a new connection, so a PostgreSQL fork and login,
//! per check), for N backend entries spread over three servers. Each
//! balancer runs alone and is measured over its own window; an idle window
//! with nothing checking is the baseline subtracted from the servers'
//! figures.

mod configs;
mod report;
mod window;

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pglb_cluster::{free_port, Cluster, Spec};

use crate::cli::Checks;
use crate::haproxy::Haproxy;
use crate::pglb::{self, Pglb};
use crate::targets::Bins;
use report::Row;
use window::{Rates, Watched};

/// Time the balancer runs before its window: pglb's first checks run at
/// the fast pace while its clusters settle (2 × interval + fast_interval).
const SETTLE: Duration = Duration::from_secs(5);
/// How long a balancer may take until every backend was checked.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balancer {
    Pglb,
    Haproxy,
}

impl Balancer {
    pub const ALL: [Balancer; 2] = [Balancer::Pglb, Balancer::Haproxy];

    pub fn label(self) -> &'static str {
        match self {
            Balancer::Pglb => "pglb",
            Balancer::Haproxy => "haproxy",
        }
    }
}

pub fn run(opts: &Checks, bins: &Bins) -> Result<()> {
    let started = Instant::now();
    // Autovacuum off: its workers are forks and CPU that come and go on
    // their own schedule, noise next to a few checks a second.
    let cluster = Cluster::start(&Spec {
        tag: "bench-checks".into(),
        replicas: 2,
        settings: vec!["autovacuum = off".into()],
        ..Spec::default()
    })
    .context("cannot start the cluster")?;
    super::create_check_user(&cluster)?;
    grant_monitor(&cluster)?;
    let secs = opts.window.as_secs();
    eprintln!("idle baseline: {}s settle, then {secs}s with nothing checking", SETTLE.as_secs());
    thread::sleep(SETTLE);
    let baseline = window::measure(opts.window, &cluster.nodes, None).context("the idle baseline")?;
    eprintln!("idle baseline: server CPU {:.2} %, forks {:.1}/s", baseline.server_cpu * 100.0, baseline.forks);
    let (mut rows, mut notes) = (Vec::new(), Vec::new());
    for &n in &opts.backends {
        for balancer in Balancer::ALL {
            let tag = format!("[N={n}] {:<7}", balancer.label());
            eprintln!("{tag} starting; {}s settle, then {secs}s window", SETTLE.as_secs());
            let measured = match balancer {
                Balancer::Pglb => with_pglb(bins, &cluster, n, opts.window),
                Balancer::Haproxy => with_haproxy(bins, &cluster, n, opts.window),
            };
            match measured {
                Ok((rates, note)) => {
                    eprintln!(
                        "{tag} CPU {:.2} %, RSS {:.1} MiB, servers {:.2} % ({:.2} % over idle), forks {:.1}/s",
                        rates.balancer_cpu.unwrap_or_default() * 100.0,
                        rates.rss_mib.unwrap_or_default(),
                        rates.server_cpu * 100.0,
                        (rates.server_cpu - baseline.server_cpu) * 100.0,
                        rates.forks
                    );
                    notes.extend(note.map(|text| format!("{tag}: {text}")));
                    rows.push(Row { balancer, n, rates });
                }
                Err(e) => {
                    eprintln!("note: {tag} failed: {e:#}");
                    notes.push(format!("{tag} failed: {e:#}"));
                }
            }
        }
    }
    let cores = thread::available_parallelism().map_or(0, |c| c.get());
    println!(
        "\n== pglb-bench checks: health checks every 1s on N backend entries over 3 servers (primary + 2 replicas), \
         {secs}s window after {}s settle, each balancer alone, {cores} cores; took {:.0}s ==",
        SETTLE.as_secs(),
        started.elapsed().as_secs_f64()
    );
    println!("CPU % is of one core; server CPU % and forks/s are over the idle baseline");
    print!("{}", report::render(&baseline, &rows));
    for note in &notes {
        println!("note: {note}");
    }
    print!("{}", report::extrapolate(&baseline, &rows));
    Ok(())
}

/// `GRANT pg_monitor TO pglb_check` (what pglb's docs ask of the check
/// user), replicated to every replica before this returns.
fn grant_monitor(cluster: &Cluster) -> Result<()> {
    cluster.nodes[0].sql("GRANT pg_monitor TO pglb_check").context("cannot grant pg_monitor to pglb_check")?;
    let granted = "SELECT pg_has_role('pglb_check', 'pg_monitor', 'MEMBER')";
    for node in &cluster.nodes[1..] {
        node.wait_for(granted, "t", Duration::from_secs(30))
            .with_context(|| format!("the pg_monitor grant did not reach {}", node.name))?;
    }
    Ok(())
}

/// pglb with `n / 3` clusters of the three servers: ready once every
/// backend was checked and is healthy; measured after [`SETTLE`]. A note if
/// not every backend is still healthy at the end.
fn with_pglb(bins: &Bins, cluster: &Cluster, n: usize, length: Duration) -> Result<(Rates, Option<String>)> {
    let nodes = &cluster.nodes;
    let ports = (0..n / nodes.len()).map(|_| free_port()).collect::<std::io::Result<Vec<u16>>>()?;
    let mut pglb =
        Pglb::start_yaml(&bins.pglb, |admin| configs::pglb_yaml(admin, nodes, &ports)).context("cannot start pglb")?;
    pglb.wait_checked(n, READY_TIMEOUT)?;
    thread::sleep(SETTLE);
    let checks = || pglb.checks_done();
    let watched = Watched { pid: pglb.pid(), checks: Some(&checks) };
    let rates = window::measure(length, nodes, Some(watched))
        .with_context(|| format!("measuring pglb; its log ends:\n{}", pglb.log_tail()))?;
    let (listed, good) = pglb::checked_healthy(&pglb.status()?);
    let note = (good != n).then(|| format!("{good} of {listed} backends healthy at the end of the window"));
    Ok((rates, note))
}

/// HAProxy with `n` servers: ready once every server's last check passed
/// (`L7OK`); measured after [`SETTLE`]. A note if not every server is `UP`
/// at the end.
fn with_haproxy(bins: &Bins, cluster: &Cluster, n: usize, length: Duration) -> Result<(Rates, Option<String>)> {
    let nodes = &cluster.nodes;
    let port = free_port().context("cannot find a free port for haproxy")?;
    let haproxy =
        Haproxy::start(&bins.haproxy, &configs::haproxy_config(port, nodes, n)).context("cannot start haproxy")?;
    crate::child::poll("every HAProxy check to pass", READY_TIMEOUT, Duration::from_millis(200), || {
        let states = haproxy.server_column(configs::PROXY, "check_status")?;
        // `* ` marks a check in progress.
        let passed = states.iter().filter(|s| s.trim_start_matches("* ") == "L7OK").count();
        Ok(if states.len() == n && passed == n { Ok(()) } else { Err(format!("{passed} of {} L7OK", states.len())) })
    })
    .with_context(|| format!("haproxy's log ends:\n{}", haproxy.log_tail()))?;
    thread::sleep(SETTLE);
    let rates = window::measure(length, nodes, Some(Watched { pid: haproxy.pid(), checks: None }))
        .with_context(|| format!("measuring haproxy; its log ends:\n{}", haproxy.log_tail()))?;
    let states = haproxy.server_column(configs::PROXY, "status")?;
    if states.len() != n {
        bail!("haproxy's `show stat` lists {} servers, not {n}", states.len());
    }
    let up = states.iter().filter(|s| s.as_str() == "UP").count();
    Ok((rates, (up != n).then(|| format!("{up} of {n} servers UP at the end of the window"))))
}
