//! Both balancers in front of one cluster, a writer through each, and one
//! promotion measured on both at once.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pglb_cluster::{free_port, Cluster, Node};

use super::haproxy_check;
use super::Round;
use crate::child::poll;
use crate::haproxy::Haproxy;
use crate::pglb::{self, Pglb};
use crate::probe::{Attempt, Mode, Probe};
use crate::targets::Bins;

const STEADY_TIMEOUT: Duration = Duration::from_secs(60);
const DETECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Both balancers and, through each, a writer on new connections and a
/// writer on one kept session.
pub struct Bench<'a> {
    cluster: &'a Cluster,
    pglb: Pglb,
    haproxy: Haproxy,
    pub(super) probes: [Probe; 2],
    pub(super) sessions: [Probe; 2],
}

impl<'a> Bench<'a> {
    pub fn start(bins: &Bins, cluster: &'a Cluster) -> Result<Self> {
        let nodes = &cluster.nodes;
        let (pglb_port, haproxy_port) = (free_port()?, free_port()?);
        let config = pglb::Config {
            forwarder: None,
            listeners: vec![pglb::Listener { name: "rw", port: pglb_port, role: "primary", balance: "round_robin" }],
            backends: nodes.iter().map(|n| (n.name.clone(), n.address())).collect(),
        };
        let mut pglb = Pglb::start(&bins.pglb, &config).context("cannot start pglb")?;
        pglb.wait_ready("rw", 1, Duration::from_secs(30))?;
        let haproxy = Haproxy::start(&bins.haproxy, &haproxy_check::config(haproxy_port, nodes))
            .context("cannot start haproxy")?;
        let probes = [Probe::start("pglb", pglb_port)?, Probe::start("haproxy", haproxy_port)?];
        let sessions = [
            Probe::start_mode("pglb-session", pglb_port, Mode::Session)?,
            Probe::start_mode("haproxy-session", haproxy_port, Mode::Session)?,
        ];
        Ok(Self { cluster, pglb, haproxy, probes, sessions })
    }

    pub fn round(&self, old: &Node, new: &Node) -> Result<Round> {
        self.wait_steady(old, new)?;
        let kill = Instant::now();
        let (pglb_detect, haproxy_detect) = self.fail_over(old, new, kill)?;
        let pglb_window = self.window(0, kill)?;
        let haproxy_window = self.window(1, kill)?;
        self.cluster
            .rebuild_replica(old, new)
            .with_context(|| format!("cannot rebuild {} as a replica of {}", old.name, new.name))?;
        Ok(Round {
            pglb_window,
            pglb_detect: pglb_detect - kill,
            haproxy_window,
            haproxy_detect: haproxy_detect - kill,
        })
    }

    /// Stops `old` and promotes `new` while watching both balancers; the
    /// instants each first showed the failover.
    fn fail_over(&self, old: &Node, new: &Node, kill: Instant) -> Result<(Instant, Instant)> {
        thread::scope(|s| {
            let pglb = s.spawn(|| detect(kill, || self.pglb_sees_failover(old, new)));
            let haproxy = s.spawn(|| detect(kill, || self.haproxy_sees_failover(old, new)));
            old.stop("immediate");
            let promoted = new.promote().with_context(|| format!("cannot promote {}", new.name));
            let (Ok(pglb), Ok(haproxy)) = (pglb.join(), haproxy.join()) else {
                bail!("a detection thread panicked");
            };
            promoted?;
            Ok((pglb.context("pglb")?, haproxy.context("haproxy")?))
        })
    }

    /// Both balancers route to `old` only, pglb sees `new` as a healthy
    /// replica, and both writers have just succeeded.
    pub(super) fn wait_steady(&self, old: &Node, new: &Node) -> Result<()> {
        poll("a steady primary before the promotion", STEADY_TIMEOUT, Duration::from_millis(100), || {
            let status = match self.pglb.status() {
                Ok(s) => s,
                Err(e) => return Ok(Err(format!("pglb: {e:#}"))),
            };
            let rw = pglb::eligible(&status, "rw");
            if rw != [old.name.clone()] {
                return Ok(Err(format!("pglb routes rw to {rw:?}")));
            }
            if pglb::backend(&status, &new.name) != Some((true, "replica".into())) {
                return Ok(Err(format!("pglb does not see {} as a healthy replica yet", new.name)));
            }
            let states = (self.haproxy.server_status("rw", &old.name), self.haproxy.server_status("rw", &new.name));
            let (Ok(up), Ok(down)) = states else {
                return Ok(Err(format!("haproxy's stats socket: {states:?}")));
            };
            if up != "UP" || !down.starts_with("DOWN") {
                return Ok(Err(format!("haproxy: {} {up}, {} {down}", old.name, new.name)));
            }
            for probe in self.probes.iter().chain(&self.sessions) {
                let fresh =
                    probe.attempts().last().is_some_and(|a| a.ok && a.end.elapsed() < Duration::from_millis(500));
                if !fresh {
                    return Ok(Err(format!("a writer is failing: {}", probe.last_error())));
                }
            }
            Ok(Ok(()))
        })
    }

    /// `/status` shows `old` unhealthy or `new` as primary.
    fn pglb_sees_failover(&self, old: &Node, new: &Node) -> bool {
        let Ok(status) = self.pglb.status() else {
            return false;
        };
        let old_down = pglb::backend(&status, &old.name).is_some_and(|(healthy, _)| !healthy);
        let new_primary = pglb::backend(&status, &new.name).is_some_and(|(_, role)| role == "primary");
        old_down || new_primary
    }

    /// `show stat` shows `old` DOWN or `new` UP.
    fn haproxy_sees_failover(&self, old: &Node, new: &Node) -> bool {
        let old_down = self.haproxy.server_status("rw", &old.name).is_ok_and(|s| s.starts_with("DOWN"));
        let new_up = self.haproxy.server_status("rw", &new.name).is_ok_and(|s| s.starts_with("UP"));
        old_down || new_up
    }

    pub(super) fn log_tail(&self, i: usize) -> String {
        if i == 0 {
            self.pglb.log_tail()
        } else {
            self.haproxy.log_tail()
        }
    }

    /// Waits for writer `i`'s first success after `kill`; returns the time
    /// from its last success before the kill to that one.
    fn window(&self, i: usize, kill: Instant) -> Result<Duration> {
        let probe = &self.probes[i];
        let name = ["pglb", "haproxy"][i];
        poll(&format!("a write through {name} after the promotion"), STEADY_TIMEOUT, Duration::from_millis(20), || {
            Ok(write_window(&probe.attempts(), kill).ok_or_else(|| probe.last_error()))
        })
        .with_context(|| format!("{name} did not recover; its log ends:\n{}", self.log_tail(i)))
    }
}

/// Polls `seen` every 10ms from `kill` on; the instant it first holds.
fn detect(kill: Instant, seen: impl Fn() -> bool) -> Result<Instant> {
    while kill.elapsed() < DETECT_TIMEOUT {
        if seen() {
            return Ok(Instant::now());
        }
        thread::sleep(Duration::from_millis(10));
    }
    bail!("no failover seen within {}s", DETECT_TIMEOUT.as_secs())
}

/// From the end of the last success that started before `kill` to the end
/// of the first success that started after it.
fn write_window(attempts: &[Attempt], kill: Instant) -> Option<Duration> {
    let ok = attempts.iter().filter(|a| a.ok);
    let before = ok.clone().filter(|a| a.start < kill).map(|a| a.end).max()?;
    let after = ok.filter(|a| a.start >= kill).map(|a| a.end).min()?;
    Some(after.saturating_duration_since(before))
}
