//! pgbench runs against a target, and what they print.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::child::{self, tail};

/// One finished pgbench run.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// Transactions per second (with `-C`: connections per second).
    pub tps: f64,
    pub latency_ms: f64,
    pub transactions: u64,
}

fn pgbench(port: u16) -> Command {
    let mut cmd = Command::new("pgbench");
    cmd.args(["-h", "127.0.0.1", "-U", "postgres", "-p"])
        .arg(port.to_string())
        .env_remove("PGPASSWORD")
        .env("PGCONNECT_TIMEOUT", "10");
    cmd
}

/// `pgbench -i -s scale` on the primary.
pub fn init(port: u16, scale: u32) -> Result<()> {
    let mut cmd = pgbench(port);
    cmd.args(["-i", "-q", "-s"]).arg(scale.to_string()).arg("postgres");
    child::run_ok(&mut cmd, "pgbench -i", Duration::from_secs(1800), true)?;
    Ok(())
}

/// `pgbench -n -T secs ARGS` through `port`.
pub fn run(port: u16, args: &[&str], secs: u64) -> Result<Run> {
    let mut cmd = pgbench(port);
    cmd.args(["-n", "-T"]).arg(secs.to_string()).args(args).arg("postgres");
    let what = format!("pgbench {}", args.join(" "));
    let out = child::run_ok(&mut cmd, &what, Duration::from_secs(secs + 120), true)?;
    parse(&out.stdout).with_context(|| format!("unexpected {what} output:\n{}\n{}", out.stdout, tail(&out.stderr, 10)))
}

/// Reads `tps = `, `latency average = ` and the transaction count.
fn parse(stdout: &str) -> Option<Run> {
    let after = |prefix: &str| -> Option<f64> {
        let line = stdout.lines().find_map(|l| l.trim().strip_prefix(prefix))?;
        line.split(|c: char| c.is_whitespace() || c == '/').next()?.parse().ok()
    };
    Some(Run {
        tps: after("tps = ")?,
        latency_ms: after("latency average = ")?,
        transactions: after("number of transactions actually processed: ")? as u64,
    })
}
