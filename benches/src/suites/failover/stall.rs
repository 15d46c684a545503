//! The stall scenario: every process of the primary SIGSTOPped for 3 s (a
//! VM pause, a live migration, a long fsync), then resumed. PostgreSQL
//! itself survives it; the figure is what each balancer's clients saw:
//! failed writes on new connections, and sessions lost by a client that was
//! already connected.

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pglb_cluster::Node;

use super::bench::Bench;
use crate::child::poll;
use crate::probe::Attempt;

/// 3 × fall × interval of both balancers' checks.
pub const STALL: Duration = Duration::from_secs(3);
const RECOVER_TIMEOUT: Duration = Duration::from_secs(60);

/// What one stall cost the clients of each balancer (`[pglb, haproxy]`).
pub struct StallRound {
    /// Failed connect + INSERT attempts.
    pub fresh_errors: [usize; 2],
    /// Failed INSERTs on the kept session (each one a lost session).
    pub session_errors: [usize; 2],
    /// Longest time without a successful write on new connections.
    pub gap: [Duration; 2],
}

impl Bench<'_> {
    /// Freezes `primary` for [`STALL`] while both balancers route to it,
    /// then waits until every writer succeeds again.
    pub fn stall(&self, primary: &Node, replica: &Node) -> Result<StallRound> {
        self.wait_steady(primary, replica)?;
        let pids = primary.processes();
        if pids.len() < 2 {
            bail!("{} has no server processes to freeze", primary.name);
        }
        signal("-STOP", &pids)?;
        let frozen = Instant::now();
        thread::sleep(STALL);
        signal("-CONT", &pids)?;
        let thawed = Instant::now();
        for (i, probe) in self.probes.iter().chain(&self.sessions).enumerate() {
            poll("every writer to succeed after the stall", RECOVER_TIMEOUT, Duration::from_millis(20), || {
                let back = probe.attempts().iter().any(|a| a.ok && a.start >= thawed);
                Ok(if back { Ok(()) } else { Err(probe.last_error()) })
            })
            .with_context(|| format!("writer {i} did not recover; log:\n{}", self.log_tail(i % 2)))?;
        }
        let errors = |attempts: Vec<Attempt>| attempts.iter().filter(|a| a.start >= frozen && !a.ok).count();
        Ok(StallRound {
            fresh_errors: [errors(self.probes[0].attempts()), errors(self.probes[1].attempts())],
            session_errors: [errors(self.sessions[0].attempts()), errors(self.sessions[1].attempts())],
            gap: [gap(&self.probes[0].attempts(), frozen), gap(&self.probes[1].attempts(), frozen)],
        })
    }
}

/// The longest time between two successful writes that ended after `from`.
fn gap(attempts: &[Attempt], from: Instant) -> Duration {
    let ends: Vec<Instant> = attempts.iter().filter(|a| a.ok).map(|a| a.end).collect();
    ends.windows(2).filter(|w| w[1] >= from).map(|w| w[1] - w[0]).max().unwrap_or_default()
}

fn signal(signal: &str, pids: &[u32]) -> Result<()> {
    let status =
        Command::new("kill").arg(signal).args(pids.iter().map(u32::to_string)).status().context("cannot run kill")?;
    if !status.success() {
        bail!("kill {signal} {pids:?} failed");
    }
    Ok(())
}
