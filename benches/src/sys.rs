//! Process limits and the clock-tick rate, without `unsafe`.

use std::io;

/// Raises the soft open-files limit to the hard one (the memory test holds
/// thousands of sockets, and pglb inherits the limit). Returns (soft, hard).
pub fn raise_nofile() -> io::Result<(u64, u64)> {
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    let soft = rlimit::increase_nofile_limit(hard)?;
    Ok((soft, hard))
}

/// Clock ticks per second, the unit of utime/stime in /proc/PID/stat
/// (`getconf CLK_TCK`; 100 on Linux when it cannot be asked).
pub fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(ask_clock_ticks)
}

fn ask_clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}
