//! The stall scenario: every process of the primary SIGSTOPped for 3 s (a
//! VM pause, a live migration, a long fsync), then resumed. PostgreSQL
//! itself survives it; the figure is what each balancer's clients saw:
//! failed writes on new connections, and failed writes of a client that was
//! already connected (its first failure is the lost session, the rest are
//! its reconnects failing).

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pglb_cluster::Node;

use super::bench::Bench;
use crate::child::poll;
use crate::probe::Attempt;

const RECOVER_TIMEOUT: Duration = Duration::from_secs(60);

/// What one stall cost the clients of each balancer (`[pglb, haproxy]`).
pub struct StallRound {
    /// Failed connect + INSERT attempts.
    pub fresh_errors: [usize; 2],
    /// Failed INSERTs of the kept-session writer (the first loses the
    /// session; later ones are failed reconnects).
    pub session_errors: [usize; 2],
    /// Longest time without a successful write on new connections.
    pub gap: [Duration; 2],
}

impl Bench<'_> {
    /// Freezes `primary` for `length` while both balancers route to it,
    /// then waits until every writer succeeds again.
    pub fn stall(&self, primary: &Node, replica: &Node, length: Duration) -> Result<StallRound> {
        self.wait_steady(primary, replica)?;
        let pids = primary.processes();
        if pids.len() < 2 {
            bail!("{} has no server processes to freeze", primary.name);
        }
        signal("-STOP", &pids)?;
        let frozen = Instant::now();
        thread::sleep(length);
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

/// Signals every pid in one kill(1) call, so the server stops or resumes as
/// one. kill fails for a pid that is gone (a backend that exited as it was
/// listed, or one reaped once the postmaster runs again) but still signals
/// the others; the postmaster's state in /proc is the verdict for a stop.
fn signal(signal: &str, pids: &[u32]) -> Result<()> {
    Command::new("kill")
        .arg(signal)
        .args(pids.iter().map(u32::to_string))
        .stderr(std::process::Stdio::null())
        .status()
        .context("cannot run kill")?;
    if signal == "-STOP" {
        let stopped = (0..100).any(|_| {
            thread::sleep(Duration::from_millis(5));
            std::fs::read_to_string(format!("/proc/{}/stat", pids[0]))
                .is_ok_and(|stat| stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('T')))
        });
        if !stopped {
            bail!("the postmaster (pid {}) did not stop", pids[0]);
        }
    }
    Ok(())
}
