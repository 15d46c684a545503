//! One measurement window: counters read at its start and end, turned into
//! rates per second.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pglb_cluster::Node;
use pglb_testkit::proc;

use crate::proctree;

/// The balancer being measured, if any.
pub struct Watched<'a> {
    pub pid: u32,
    /// Checks completed so far, where the balancer says so (pglb).
    pub checks: Option<&'a dyn Fn() -> Result<f64>>,
}

/// What a window measured, per second of it.
#[derive(Debug, Clone, Copy)]
pub struct Rates {
    /// The balancer's CPU seconds per second (utime + stime, all threads).
    pub balancer_cpu: Option<f64>,
    /// The balancer's VmRSS at the end, MiB.
    pub rss_mib: Option<f64>,
    /// CPU seconds per second of the servers: each postmaster with its
    /// reaped and its live children.
    pub server_cpu: f64,
    /// Processes created per second on the whole machine.
    pub forks: f64,
    /// Checks completed per second, where the balancer counts them.
    pub checks: Option<f64>,
}

struct Reading {
    at: Instant,
    balancer: Option<f64>,
    servers: f64,
    forks: u64,
}

/// Reads the counters at the start, sleeps `window`, reads them again.
/// The balancer's own check counter is read outside the CPU readings (before
/// the first, after the second), so asking for it does not count.
pub fn measure(window: Duration, nodes: &[Node], watched: Option<Watched<'_>>) -> Result<Rates> {
    let postmasters = nodes
        .iter()
        .map(|n| n.pid().with_context(|| format!("{} is not running (no postmaster.pid)", n.name)))
        .collect::<Result<Vec<u32>>>()?;
    let checks = || watched.as_ref().and_then(|w| w.checks).map(|f| f()).transpose();
    let checks_before = checks()?;
    let start = read(&postmasters, watched.as_ref())?;
    thread::sleep(window);
    let end = read(&postmasters, watched.as_ref())?;
    let checks_after = checks()?;
    let rss_mib = watched.as_ref().map(|w| proc::rss_kib(w.pid)).transpose()?.map(|kib| kib as f64 / 1024.0);
    let secs = (end.at - start.at).as_secs_f64();
    let per_sec = |before: Option<f64>, after: Option<f64>| Some((after? - before?) / secs);
    Ok(Rates {
        balancer_cpu: per_sec(start.balancer, end.balancer),
        rss_mib,
        server_cpu: (end.servers - start.servers) / secs,
        forks: end.forks.saturating_sub(start.forks) as f64 / secs,
        checks: per_sec(checks_before, checks_after),
    })
}

fn read(postmasters: &[u32], watched: Option<&Watched<'_>>) -> Result<Reading> {
    let mut servers = 0.0;
    for &pid in postmasters {
        servers += proctree::tree_cpu_seconds(pid).with_context(|| format!("CPU time of postmaster {pid}"))?;
    }
    Ok(Reading {
        at: Instant::now(),
        balancer: watched.map(|w| proc::cpu_seconds(w.pid)).transpose().context("the balancer's CPU time")?,
        servers,
        forks: proctree::forks_so_far().context("the machine's fork count")?,
    })
}
