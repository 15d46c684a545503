//! CPU time of a process with its children, and the machine's fork count,
//! from /proc (the other readings are in `pglb_testkit::proc`).

use std::fs;
use std::io;

use pglb_testkit::proc::clock_ticks;

/// The fields of `/proc/PID/stat` after the command name, which is in
/// parentheses and may hold spaces: `state` is the first, `ppid` the
/// second, utime, stime, cutime, cstime the 12th to 15th.
fn stat_fields(pid: u32) -> io::Result<Vec<String>> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).map_err(|e| io::Error::new(e.kind(), format!("cannot read {path}: {e}")))?;
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    Ok(rest.split_whitespace().map(str::to_owned).collect())
}

/// Clock ticks of fields `first..=last` of `/proc/PID/stat`, summed.
fn ticks(pid: u32, first: usize, last: usize) -> io::Result<f64> {
    let fields = stat_fields(pid)?;
    (first..=last)
        .map(|i| fields.get(i).and_then(|f| f.parse::<f64>().ok()))
        .sum::<Option<f64>>()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("/proc/{pid}/stat: no CPU times")))
}

/// The live children of `pid` (processes whose parent it is).
pub fn children(pid: u32) -> Vec<u32> {
    let entries = fs::read_dir("/proc").into_iter().flatten().flatten();
    let pids = entries.filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok());
    pids.filter(|&p| stat_fields(p).ok().and_then(|f| f.get(1)?.parse::<u32>().ok()) == Some(pid)).collect()
}

/// CPU seconds of `pid` and everything it started so far: its own utime +
/// stime, its cutime + cstime (children it has waited for, such as a
/// PostgreSQL backend that served one login and exited), and the utime +
/// stime of each live child. A child that exits between two readings moves
/// from the third term to the second, so deltas stay right.
pub fn tree_cpu_seconds(pid: u32) -> io::Result<f64> {
    let live: f64 = children(pid).into_iter().filter_map(|c| ticks(c, 11, 12).ok()).sum();
    Ok((ticks(pid, 11, 14)? + live) / clock_ticks())
}

/// Processes the machine has created since boot (`processes` in
/// /proc/stat): every fork and clone of every process.
pub fn forks_so_far() -> io::Result<u64> {
    let text = fs::read_to_string("/proc/stat")?;
    text.lines()
        .find_map(|l| l.strip_prefix("processes "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "/proc/stat has no processes line"))
}
