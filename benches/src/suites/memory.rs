//! The idle-connection memory test: a balancer's RSS and pipe fds with LOW
//! and then HIGH logged-in idle sessions open through its read-only port,
//! spread round-robin over three replicas so max_connections holds them.
//! Each balancer gets a fresh process, one at a time.

use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pglb_cluster::{Cluster, Spec};
use pglb_testkit::proc;

use super::results::{Fig, Results};
use crate::child::poll;
use crate::idle::IdleSessions;

use crate::targets::{self, Bins, Kind, Route};

const REPLICAS: usize = 3;
/// Head room left free when deciding whether HIGH sessions fit in RAM.
const SPARE_KIB: u64 = 2 * 1024 * 1024;

pub fn run(bins: &Bins, (low, high): (usize, usize), results: &mut Results) -> Result<()> {
    let per_node = high.div_ceil(REPLICAS) + 50;
    eprintln!("memory test: primary + {REPLICAS} replicas, max_connections = {per_node}");
    let cluster = Cluster::start(&Spec {
        tag: "bench-mem".into(),
        replicas: REPLICAS,
        settings: vec![format!("max_connections = {per_node}")],
        ..Spec::default()
    })
    .context("cannot start the memory-test cluster")?;
    super::create_check_user(&cluster)?;
    for kind in Kind::BALANCERS {
        let outcome = measure(kind, bins, &cluster, (low, high), results);
        if let Err(e) = outcome {
            results.note(format!("memory test through {} failed: {e:#}", kind.label()));
        }
        wait_sessions_gone(&cluster)?;
    }
    Ok(())
}

fn measure(
    kind: Kind,
    bins: &Bins,
    cluster: &Cluster,
    (low, high): (usize, usize),
    results: &mut Results,
) -> Result<()> {
    let target = targets::start(kind, bins, Route::Replicas, &cluster.nodes, high + 500)?;
    let pid = target.pid.context("a balancer without a pid")?;
    results.record(Fig::PipesZero, kind, proc::pipe_count(pid)? as f64);
    let available = proc::mem_available_kib()?;
    let mut sessions = IdleSessions::new()?;
    let (rss_low, n_low) = open_to(&mut sessions, target.port, low, pid, kind, results)?;
    let slab_low = proc::slab_kib()?;
    results.record(Fig::RssLow, kind, rss_low as f64 / 1024.0);
    results.record(Fig::PipesLow, kind, proc::pipe_count(pid)? as f64);
    // What the LOW sessions cost the whole machine predicts the rest.
    let now = proc::mem_available_kib()?;
    let per_session = available.saturating_sub(now) / n_low.max(1) as u64;
    let needed = per_session * (high - low) as u64 * 12 / 10 + SPARE_KIB;
    if needed > now {
        bail!("{high} sessions would not fit: {now} KiB available, about {needed} KiB needed");
    }
    let (rss_high, n_high) = open_to(&mut sessions, target.port, high, pid, kind, results)?;
    results.record(Fig::RssHigh, kind, rss_high as f64 / 1024.0);
    results.record(Fig::PipesHigh, kind, proc::pipe_count(pid)? as f64);
    let slab_high = proc::slab_kib()?;
    if n_high > n_low {
        let slope = rss_high.saturating_sub(rss_low) as f64 / (n_high - n_low) as f64;
        results.record(Fig::KibPerConn, kind, slope);
        // Both sockets of each session and the server's, plus sockmap's
        // per-socket state: the same server side for every balancer.
        let slab = slab_high.saturating_sub(slab_low) as f64 / (n_high - n_low) as f64;
        results.record(Fig::SlabKibPerConn, kind, slab);
    }
    eprintln!("memory {:<13} {n_low} sessions: {rss_low} KiB; {n_high} sessions: {rss_high} KiB", kind.label());
    Ok(())
}

/// Opens sessions until `want` are open (failures noted, not retried);
/// returns the balancer's RSS in KiB once settled, and the session count.
fn open_to(
    sessions: &mut IdleSessions,
    port: u16,
    want: usize,
    pid: u32,
    kind: Kind,
    results: &mut Results,
) -> Result<(u64, usize)> {
    let failed_before = sessions.failures;
    sessions.open(port, want.saturating_sub(sessions.count()));
    let failed = sessions.failures - failed_before;
    if failed > 0 {
        let first = sessions.first_error.clone().unwrap_or_default();
        results.note(format!("{}: {failed} of {want} idle logins failed (first error: {first})", kind.label()));
    }
    if sessions.count() == 0 {
        bail!("no idle session could log in");
    }
    thread::sleep(Duration::from_secs(1));
    Ok((proc::rss_kib(pid)?, sessions.count()))
}

/// Waits until the replicas have no bench session left, so the next
/// balancer starts with max_connections free.
fn wait_sessions_gone(cluster: &Cluster) -> Result<()> {
    let sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pglb-bench-idle'";
    for node in &cluster.nodes[1..] {
        poll(
            &format!("idle sessions on {} to end", node.name),
            Duration::from_secs(120),
            Duration::from_millis(200),
            || {
                Ok(match node.sql(sql) {
                    Ok(n) if n == "0" => Ok(()),
                    Ok(n) => Err(format!("{n} left")),
                    Err(e) => Err(e.to_string()),
                })
            },
        )?;
    }
    Ok(())
}
