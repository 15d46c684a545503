//! What /proc says about a process: open fds and pipes, RSS, CPU time; and
//! the machine's available memory.

use std::fs;
use std::io;

fn read(path: &str) -> io::Result<String> {
    fs::read_to_string(path).map_err(|e| io::Error::new(e.kind(), format!("cannot read {path}: {e}")))
}

/// Where each open fd of `pid` points (`socket:[..]`, `pipe:[..]`, a path).
pub fn fd_targets(pid: u32) -> io::Result<Vec<String>> {
    let dir = format!("/proc/{pid}/fd");
    let entries = fs::read_dir(&dir).map_err(|e| io::Error::new(e.kind(), format!("cannot list {dir}: {e}")))?;
    let mut out: Vec<String> = entries
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .collect();
    out.sort();
    Ok(out)
}

/// Number of open fds of `pid`.
pub fn fd_count(pid: u32) -> io::Result<usize> {
    Ok(fd_targets(pid)?.len())
}

/// Number of `pid`'s fds that are pipe ends.
pub fn pipe_count(pid: u32) -> io::Result<usize> {
    Ok(fd_targets(pid)?.iter().filter(|t| t.starts_with("pipe:")).count())
}

/// Resident set size of `pid` in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> io::Result<u64> {
    field_kib(&format!("/proc/{pid}/status"), "VmRSS:")
}

/// `MemAvailable` of the machine in KiB.
pub fn mem_available_kib() -> io::Result<u64> {
    field_kib("/proc/meminfo", "MemAvailable:")
}

/// Kernel slab memory of the machine in KiB (`Slab` in /proc/meminfo):
/// where socket structures, and sockmap's per-socket state, live.
pub fn slab_kib() -> io::Result<u64> {
    field_kib("/proc/meminfo", "Slab:")
}

/// CPU seconds the whole machine spent busy so far (all CPUs; user, nice,
/// system, irq, softirq and steal from the `cpu` line of /proc/stat): every
/// process and kernel thread, so work moved into the kernel is counted.
pub fn host_busy_seconds() -> io::Result<f64> {
    let text = read("/proc/stat")?;
    let line = text.lines().find(|l| l.starts_with("cpu ")).unwrap_or_default();
    let f: Vec<f64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if f.len() < 8 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "/proc/stat has no usable cpu line"));
    }
    // user nice system idle iowait irq softirq steal
    Ok((f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / clock_ticks())
}

/// Context switches of the whole machine so far (`ctxt` in /proc/stat):
/// each is a thread woken or put to sleep, in any process or kernel thread.
pub fn host_context_switches() -> io::Result<u64> {
    let text = read("/proc/stat")?;
    text.lines()
        .find_map(|l| l.strip_prefix("ctxt "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "/proc/stat has no ctxt line"))
}

fn field_kib(path: &str, name: &str) -> io::Result<u64> {
    let text = read(path)?;
    let line = text.lines().find(|l| l.starts_with(name));
    line.and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("{path} has no usable {name} line")))
}

/// User + system CPU seconds of `pid` (all threads) so far.
pub fn cpu_seconds(pid: u32) -> io::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = read(&path)?;
    // The command name is in parentheses and may hold spaces: fields are
    // counted after the last ')'; there, utime and stime (fields 14 and 15
    // of proc(5)) are the 12th and 13th.
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    match (tick(11), tick(12)) {
        (Some(user), Some(system)) => Ok((user + system) / clock_ticks()),
        _ => Err(io::Error::new(io::ErrorKind::InvalidData, format!("{path}: no utime/stime"))),
    }
}

/// Clock ticks per second, the unit of utime/stime (`getconf CLK_TCK`; 100
/// on Linux when it cannot be asked).
pub fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// Whether process `pid` exists and has not exited (a zombie, exited but
/// not yet reaped, has).
pub fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.rsplit(')').next().unwrap_or_default().trim_start().starts_with('Z'))
        .unwrap_or(false)
}

/// A process the test did not start itself (an upgrade's new pglb, whose
/// parent is the old one), killed when the guard drops, also on a panic.
pub struct KillOnDrop(pub u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        stop(self.0, "KILL");
    }
}

/// Sends `signal` (e.g. "KILL") to `pid`, a process the caller did not
/// start (an upgrade's new pglb), and waits up to 10 s for it to end.
pub fn stop(pid: u32, signal: &str) {
    if !running(pid) {
        return;
    }
    let _ = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(std::process::Stdio::null())
        .status();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while running(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(fd_count(me).expect("fds") >= 3);
        assert!(rss_kib(me).expect("rss") > 0);
        assert!(cpu_seconds(me).expect("cpu") >= 0.0);
        assert!(mem_available_kib().expect("meminfo") > 0);
        assert!(rss_kib(u32::MAX).is_err(), "a process that does not exist is an error");
    }
}
