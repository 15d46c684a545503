//! What /proc says about a balancer process: CPU time, RSS, pipes held.

use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// User + system CPU seconds the process (all threads) has used so far.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    // The command name is in parentheses and may hold spaces: fields are
    // counted after the last ')'; there, utime and stime (fields 14 and 15
    // of proc(5)) are the 12th and 13th.
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Result<f64> {
        let field = fields.get(i).with_context(|| format!("{path}: too few fields"))?;
        field.parse::<f64>().with_context(|| format!("{path}: bad number `{field}`"))
    };
    Ok((tick(11)? + tick(12)?) / crate::sys::clock_ticks())
}

/// Resident set size in KiB (`VmRSS` of /proc/PID/status).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let Some(line) = text.lines().find(|l| l.starts_with("VmRSS:")) else {
        bail!("{path} has no VmRSS line");
    };
    let kib = line.split_whitespace().nth(1).unwrap_or_default();
    kib.parse().with_context(|| format!("{path}: bad VmRSS `{line}`"))
}

/// How many of the process's fds are pipe ends (`pipe:[...]` links).
pub fn pipes(pid: u32) -> Result<usize> {
    let dir = format!("/proc/{pid}/fd");
    let entries = fs::read_dir(&dir).with_context(|| format!("cannot list {dir}"))?;
    Ok(entries
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("pipe:"))
        .count())
}

/// `MemAvailable` of /proc/meminfo in KiB.
pub fn mem_available_kib() -> Result<u64> {
    let text = fs::read_to_string("/proc/meminfo").context("cannot read /proc/meminfo")?;
    let line =
        text.lines().find(|l| l.starts_with("MemAvailable:")).context("/proc/meminfo has no MemAvailable line")?;
    let kib = line.split_whitespace().nth(1).unwrap_or_default();
    kib.parse().with_context(|| format!("bad MemAvailable `{line}`"))
}

/// Runs `work` while sampling [`pipes`] of `pid` every 100ms; returns its
/// result and the most pipe fds seen.
pub fn max_pipes_during<T>(pid: u32, work: impl FnOnce() -> T) -> (T, usize) {
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut most = 0;
            while !done.load(Ordering::Relaxed) {
                most = most.max(pipes(pid).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(100));
            }
            most
        });
        let result = work();
        done.store(true, Ordering::Relaxed);
        (result, sampler.join().unwrap_or(0))
    })
}
