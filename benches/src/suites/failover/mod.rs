//! The failover suite: pglb and HAProxy (external-check, the usual setup
//! without Patroni) side by side in front of the same primary + replica.
//! Each promotion round stops the primary (`-m immediate`), promotes the
//! replica, measures both balancers on the same event, then rebuilds the old
//! primary as a replica of the new one and swaps roles. Each stall round
//! freezes the primary for 3 s and counts the errors clients saw. With
//! `--patroni`, the same comparison in front of a real Patroni cluster
//! (`patroni.rs`).

mod bench;
mod haproxy_check;
mod patroni;
mod stall;

use std::time::Duration;

use anyhow::{Context, Result};
use pglb_cluster::{Cluster, Spec};

use crate::cli::Failover;
use crate::stats;
use crate::table::{Better, Table};
use crate::targets::Bins;
use bench::Bench;

/// What one promotion cost each balancer.
pub struct Round {
    pub pglb_window: Duration,
    pub pglb_detect: Duration,
    pub haproxy_window: Duration,
    pub haproxy_detect: Duration,
}

pub fn run(opts: &Failover, bins: &Bins) -> Result<()> {
    if opts.patroni {
        return patroni::run(opts.promotions, bins);
    }
    let cluster = Cluster::start(&Spec { tag: "bench-failover".into(), replicas: 1, ..Spec::default() })
        .context("cannot start the cluster")?;
    crate::suites::create_check_user(&cluster)?;
    cluster.nodes[0]
        .sql("CREATE TABLE bench_probe (id bigserial PRIMARY KEY, src text, at timestamptz DEFAULT now())")
        .context("cannot create the probe table")?;
    let bench = Bench::start(bins, &cluster)?;
    let mut rounds = Vec::new();
    let mut failure = None;
    let (mut old, mut new) = (0, 1);
    for i in 0..opts.promotions {
        match bench.round(&cluster.nodes[old], &cluster.nodes[new]) {
            Ok(r) => {
                eprintln!(
                    "[promotion {}/{}] {} -> {}: pglb window {:.0} ms, detection {:.0} ms; haproxy window {:.0} ms, detection {:.0} ms",
                    i + 1,
                    opts.promotions,
                    cluster.nodes[old].name,
                    cluster.nodes[new].name,
                    ms(r.pglb_window),
                    ms(r.pglb_detect),
                    ms(r.haproxy_window),
                    ms(r.haproxy_detect)
                );
                rounds.push(r);
            }
            Err(e) => {
                failure = Some(e.context(format!("promotion {} failed", i + 1)));
                break;
            }
        }
        std::mem::swap(&mut old, &mut new);
    }
    print_table(&rounds, opts.promotions);
    if let Some(e) = failure {
        return Err(e);
    }
    let mut stalls = Vec::new();
    for i in 0..opts.stalls {
        let r = bench
            .stall(&cluster.nodes[old], &cluster.nodes[new], opts.stall)
            .with_context(|| format!("stall {} failed", i + 1))?;
        eprintln!(
            "[stall {}/{}] errors: pglb {} new + {} session, haproxy {} new + {} session; longest write gap pglb {:.0} ms, haproxy {:.0} ms",
            i + 1,
            opts.stalls,
            r.fresh_errors[0],
            r.session_errors[0],
            r.fresh_errors[1],
            r.session_errors[1],
            ms(r.gap[0]),
            ms(r.gap[1])
        );
        stalls.push(r);
    }
    print_stalls(&stalls, opts.stall);
    Ok(())
}

fn print_stalls(stalls: &[stall::StallRound], length: Duration) {
    if stalls.is_empty() {
        return;
    }
    let both = |f: fn(&stall::StallRound, usize) -> f64| -> Vec<Option<Vec<f64>>> {
        (0..2).map(|i| Some(stalls.iter().map(|r| f(r, i)).collect())).collect()
    };
    let mut table = Table::new(&["pglb", "haproxy"], &["haproxy"]);
    table.add("failed writes on new connections", Better::Lower, 1, both(|r, i| r.fresh_errors[i] as f64));
    table.add("failed writes, client on a kept session", Better::Lower, 1, both(|r, i| r.session_errors[i] as f64));
    table.add("longest write gap ms, new connections", Better::Lower, 0, both(|r, i| ms(r.gap[i])));
    println!(
        "\n== pglb-bench failover: {} stalls of the primary ({} s SIGSTOP of every server process), mean per stall ==",
        stalls.len(),
        length.as_secs()
    );
    println!("pglb: interval 1s, timeout 1s, fall 2 (down_after 30s); haproxy: same timings, on-marked-down shutdown-sessions");
    print!("{}", table.render());
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn print_table(rounds: &[Round], planned: usize) {
    let all = |f: fn(&Round) -> Duration| -> Vec<f64> { rounds.iter().map(|r| ms(f(r))).collect() };
    let windows = (all(|r| r.pglb_window), all(|r| r.haproxy_window));
    let detections = (all(|r| r.pglb_detect), all(|r| r.haproxy_detect));
    let one = |x: Option<f64>| Some(x.into_iter().collect::<Vec<f64>>());
    let mut table = Table::new(&["pglb", "haproxy"], &["haproxy"]);
    for (name, (p, h)) in [("write unavailability ms", windows), ("detection ms", detections)] {
        let p50 = vec![one(stats::percentile(&p, 50.0)), one(stats::percentile(&h, 50.0))];
        table.add(&format!("{name}, p50"), Better::Lower, 0, p50);
        let max = vec![one(stats::max(&p)), one(stats::max(&h))];
        table.add(&format!("{name}, max"), Better::Lower, 0, max);
    }
    println!(
        "\n== pglb-bench failover: {} of {planned} promotions (primary stopped -m immediate, replica promoted) ==",
        rounds.len()
    );
    println!("pglb: interval 1s, timeout 1s, rise 2, fall 2; haproxy: external-check psql, inter 1s, fall 2, rise 2");
    print!("{}", table.render());
}
