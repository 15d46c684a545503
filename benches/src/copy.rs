//! A bulk `COPY ... TO STDOUT` through a target, with psql to /dev/null.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::child;

/// Bytes per row: 1000 `x` and a newline.
pub const ROW_BYTES: u64 = 1001;

/// Streams `rows` rows of 1000 bytes; returns the seconds it took.
pub fn run(port: u16, rows: u64) -> Result<f64> {
    let sql = format!("COPY (SELECT repeat('x', 1000) FROM generate_series(1, {rows})) TO STDOUT");
    let mut cmd = Command::new("psql");
    cmd.args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-XAtq", "-v", "ON_ERROR_STOP=1", "-p"])
        .arg(port.to_string())
        .arg("-c")
        .arg(sql)
        .env_remove("PGPASSWORD");
    let start = Instant::now();
    // At least ~1 MB/s, or it is not worth waiting for.
    let timeout = Duration::from_secs(60 + rows / 1000);
    child::run_ok(&mut cmd, "psql COPY TO STDOUT", timeout, false)?;
    Ok(start.elapsed().as_secs_f64())
}
