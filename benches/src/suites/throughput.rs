//! The throughput suite: one primary (+1 replica) reached directly, through
//! pglb (splice), pglb (sockmap) and HAProxy, measured in interleaved rounds
//! (the target order rotates each round) so machine drift hits all alike.
//! Then the idle-connection memory test on its own cluster.

use std::time::Instant;

use anyhow::{Context, Result};
use pglb_cluster::{Cluster, Spec};

use super::results::{Fig, Results};
use crate::cli::Throughput;
use crate::targets::{self, Bins, Kind, Route, Target};
use crate::{copy, pgbench, procstat};

/// HAProxy's maxconn for the pgbench runs (pgbench uses at most 64).
const MAXCONN: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Test {
    Select,
    Fixed,
    Connect,
    Copy,
    Tpcb,
}

impl Test {
    const ALL: [Test; 5] = [Test::Select, Test::Fixed, Test::Connect, Test::Copy, Test::Tpcb];

    fn name(self) -> &'static str {
        match self {
            Test::Select => "select-only",
            Test::Fixed => "fixed-rate",
            Test::Connect => "connect",
            Test::Copy => "copy",
            Test::Tpcb => "tpc-b",
        }
    }
}

pub fn run(opts: &Throughput, bins: &Bins) -> Result<()> {
    let started = Instant::now();
    let mut results = Results::default();
    // The cluster and balancers drop before the memory test starts its own.
    pgbench_rounds(opts, bins, &mut results)?;
    if let Some(counts) = opts.memory {
        if let Err(e) = super::memory::run(bins, counts, &mut results) {
            results.note(format!("memory test failed: {e:#}"));
        }
    }
    println!(
        "\n== pglb-bench throughput: {} round(s) x {}s per pgbench run, scale {}, 2 cores; took {:.0}s ==",
        opts.rounds,
        opts.duration,
        opts.scale,
        started.elapsed().as_secs_f64()
    );
    print!("{}", results.render(opts));
    Ok(())
}

fn pgbench_rounds(opts: &Throughput, bins: &Bins, results: &mut Results) -> Result<()> {
    let cluster = Cluster::start(&Spec {
        tag: "bench".into(),
        replicas: 1,
        settings: vec![
            "max_connections = 300".into(),
            "shared_buffers = 1GB".into(),
            "max_wal_size = 4GB".into(),
            "checkpoint_timeout = 30min".into(),
        ],
        ..Spec::default()
    })
    .context("cannot start the cluster")?;
    super::create_check_user(&cluster)?;
    let primary = &cluster.nodes[0];
    eprintln!("pgbench -i -s {} on {}", opts.scale, primary.address());
    pgbench::init(primary.port, opts.scale)?;
    settle(&cluster)?;
    let mut all = Vec::new();
    for &kind in &opts.targets {
        all.push(targets::start(kind, bins, Route::Primary, &cluster.nodes, MAXCONN)?);
    }
    for round in 0..opts.rounds {
        for test in Test::ALL {
            if test == Test::Copy && opts.copy_rows == 0 {
                continue;
            }
            for i in 0..all.len() {
                let target = &all[(i + round) % all.len()];
                if test == Test::Tpcb {
                    primary.sql("CHECKPOINT").context("CHECKPOINT before TPC-B")?;
                }
                let tag =
                    format!("[round {}/{}] {:<11} {:<13}", round + 1, opts.rounds, test.name(), target.kind.label());
                if let Err(e) = measure(test, target, opts, results, &tag) {
                    results.note(format!(
                        "round {} {} through {} failed: {e:#}\n{}",
                        round + 1,
                        test.name(),
                        target.kind.label(),
                        target.log_tail()
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Runs one test through one target and records its figures, with the
/// balancer's CPU time (utime + stime) over the run, and for the fixed-rate
/// and COPY runs the whole machine's busy CPU time.
fn measure(test: Test, target: &Target, opts: &Throughput, results: &mut Results, tag: &str) -> Result<()> {
    let cpu = || target.pid.map(pglb_testkit::proc::cpu_seconds).transpose();
    let before = cpu()?;
    let host_before = pglb_testkit::proc::host_busy_seconds()?;
    let switches_before = pglb_testkit::proc::host_context_switches()?;
    let (port, secs, kind) = (target.port, opts.duration, target.kind);
    let (work, per) = match test {
        Test::Select => {
            let select = || pgbench::run(port, &["-S", "-c", "16", "-j", "2"], secs);
            let run = match target.pid {
                Some(pid) => {
                    let (run, pipes) = procstat::max_pipes_during(pid, select);
                    let run = run?;
                    results.record(Fig::SelectPipes, kind, pipes as f64);
                    run
                }
                None => select()?,
            };
            eprintln!("{tag} {:>9.0} tps  {:.3} ms", run.tps, run.latency_ms);
            results.record(Fig::SelectTps, kind, run.tps);
            results.record(Fig::SelectLatency, kind, run.latency_ms);
            (run.transactions as f64, (Fig::SelectCpu, 10_000.0))
        }
        Test::Fixed => {
            let rate = fixed_rate(opts, results)?.to_string();
            let run = pgbench::run(port, &["-S", "-c", "16", "-j", "2", "-R", &rate], secs)?;
            let host = pglb_testkit::proc::host_busy_seconds()? - host_before;
            eprintln!("{tag} {:>9.0} tps  host CPU {host:.2} s", run.tps);
            results.record(Fig::FixedTps, kind, run.tps);
            let switches = pglb_testkit::proc::host_context_switches()? - switches_before;
            if run.transactions > 0 {
                results.record(Fig::FixedHostCpu, kind, host / run.transactions as f64 * 10_000.0);
                results.record(Fig::FixedSwitches, kind, switches as f64 / run.transactions as f64);
            }
            (run.transactions as f64, (Fig::FixedCpu, 10_000.0))
        }
        Test::Connect => {
            let run = pgbench::run(port, &["-S", "-C", "-c", "8", "-j", "2"], secs)?;
            eprintln!("{tag} {:>9.0} conn/s", run.tps);
            results.record(Fig::ConnectRate, kind, run.tps);
            (run.transactions as f64, (Fig::ConnectCpu, 10_000.0))
        }
        Test::Copy => {
            let elapsed = copy::run(port, opts.copy_rows)?;
            let bytes = (opts.copy_rows * copy::ROW_BYTES) as f64;
            eprintln!("{tag} {:>9.0} MB/s", bytes / 1e6 / elapsed);
            results.record(Fig::CopyMbps, kind, bytes / 1e6 / elapsed);
            let host = pglb_testkit::proc::host_busy_seconds()? - host_before;
            results.record(Fig::CopyHostCpu, kind, host / bytes * 1e9);
            (bytes, (Fig::CopyCpu, 1e9))
        }
        Test::Tpcb => {
            let run = pgbench::run(port, &["-c", "64", "-j", "2"], secs)?;
            eprintln!("{tag} {:>9.0} tps  {:.3} ms", run.tps, run.latency_ms);
            results.record(Fig::TpcbTps, kind, run.tps);
            results.record(Fig::TpcbLatency, kind, run.latency_ms);
            (run.transactions as f64, (Fig::TpcbCpu, 10_000.0))
        }
    };
    if let (Some(before), Some(after)) = (before, cpu()?) {
        let (fig, unit) = per;
        if work > 0.0 {
            results.record(fig, kind, (after - before) / work * unit);
        }
    }
    Ok(())
}

/// The fixed-rate run's `-R`: as given, or half of HAProxy's saturated
/// select-only TPS in the first round (fixed from then on).
fn fixed_rate(opts: &Throughput, results: &mut Results) -> Result<u64> {
    if let Some(rate) = results.rate.or(opts.rate) {
        results.rate = Some(rate);
        return Ok(rate);
    }
    let haproxy = results
        .first(Fig::SelectTps, Kind::Haproxy)
        .or_else(|| results.first(Fig::SelectTps, Kind::HaproxyLog))
        .context("no HAProxy select-only TPS to take half of: give --rate, or include haproxy in --targets")?;
    let rate = (haproxy / 2.0).round().max(1.0) as u64;
    eprintln!("fixed rate: -R {rate} (half of HAProxy's {haproxy:.0} select-only TPS)");
    results.rate = Some(rate);
    Ok(rate)
}

/// Lets the cluster digest the initial load before anything is measured: a
/// checkpoint on the primary, replicas caught up and checkpointed. Without
/// it, the first rounds run during a 1 GB replay and checkpoint, and health
/// checks with a 1 s timeout can time out (seen: a replica, and the primary
/// once, marked down in round 1).
fn settle(cluster: &Cluster) -> Result<()> {
    let primary = &cluster.nodes[0];
    primary.sql("CHECKPOINT").context("CHECKPOINT after pgbench -i")?;
    let lsn = primary.sql("SELECT pg_current_wal_lsn()").context("read the primary's WAL position")?;
    for replica in &cluster.nodes[1..] {
        let caught_up = format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'");
        replica.wait_for(&caught_up, "t", std::time::Duration::from_secs(600)).context("replica catch-up")?;
        replica.sql("CHECKPOINT").context("CHECKPOINT on the replica")?;
    }
    Ok(())
}
