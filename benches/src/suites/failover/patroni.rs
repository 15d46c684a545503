//! `failover --patroni`: pglb (reading Patroni, its own checks as the
//! evidence) against HAProxy with the Patroni documentation's template
//! (`option httpchk OPTIONS /primary`, `inter 3s fall 3 rise 2
//! on-marked-down shutdown-sessions`, and again with `inter 1s fall 2`), all
//! three in front of the same real Patroni cluster (etcd 3.4, three
//! PostgreSQL members), each with its own writers, through the same events:
//! a switchover, a crash of the leader's postmaster (Patroni restarts it),
//! the leader's Patroni stopped, every REST API silent for 20 s, etcd gone
//! for 20 s.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pglb_tests::fault::Partition;
use pglb_tests::haproxy::Haproxy;
use pglb_tests::patroni::{signal, Options, PatroniCluster};
use pglb_tests::writers::Writers;
use pglb_tests::{Pglb, Yaml};

use crate::table::{Better, Table};
use crate::targets::Bins;

const TARGETS: [&str; 3] = ["pglb", "haproxy 3s/3", "haproxy 1s/2"];
const OUTAGE: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Event {
    Switchover,
    LeaderCrash,
    PatroniStopped,
    ApiDown,
    EtcdDown,
}

const EVENTS: [Event; 5] =
    [Event::Switchover, Event::LeaderCrash, Event::PatroniStopped, Event::ApiDown, Event::EtcdDown];

impl Event {
    fn label(self) -> &'static str {
        match self {
            Self::Switchover => "switchover (patronictl)",
            Self::LeaderCrash => "leader postmaster kill -9 (restarted by Patroni)",
            Self::PatroniStopped => "leader's Patroni stopped (SIGTERM)",
            Self::ApiDown => "every REST API silent 20 s",
            Self::EtcdDown => "etcd down 20 s (no failsafe)",
        }
    }
}

/// What one event cost the clients of one balancer.
#[derive(Debug, Clone, Copy)]
struct Cost {
    /// Longest time without an acknowledged write on new connections.
    gap: Duration,
    failed_connections: usize,
    failed_session_writes: usize,
}

pub fn run(rounds: usize, bins: &Bins) -> Result<()> {
    let mut cluster = PatroniCluster::start(3, Options::default())
        .context("Patroni and etcd are needed: tests/tools/fetch-patroni, apt-get install etcd-server haproxy")?;
    let leader = cluster.wait_leader(Duration::from_secs(60));
    let first = cluster.members[0].api_port;
    let yaml = Yaml::for_nodes(&[])
        .health("interval: 1s\n  timeout: 1s\n  rise: 2\n  fall: 2\n  user: postgres\n  sslmode: disable")
        .top(&format!("patroni:\n  urls: [http://127.0.0.1:{first}]\n  interval: 1s\n  timeout: 500ms"))
        .listener("rw", "role: primary\n    hold_timeout: 30s");
    let pglb = Pglb::start_binary(&yaml, &[], &bins.pglb);
    let ports = [pglb.port("rw"), free_port()?, free_port()?];
    let _slow = haproxy(&cluster, ports[1], "inter 3s fall 3 rise 2").context("HAProxy is needed")?;
    let _fast = haproxy(&cluster, ports[2], "inter 1s fall 2 rise 2").context("HAProxy is needed")?;
    pglb.wait_eligible("rw", &[&leader], Duration::from_secs(30));
    let leader_port = cluster.member(&leader).pg_port;
    // HAProxy starts with every server up until its checks say otherwise:
    // ten connections in a row on the leader, for each balancer.
    for port in ports {
        wait(Duration::from_secs(60), || {
            (0..10).all(|_| pglb_tests::psql::where_am_i(port).is_ok_and(|(p, _)| p == leader_port))
        })
        .with_context(|| format!("the balancer on port {port} does not route to the leader"))?;
    }
    let writers: Vec<Writers> = ports.iter().map(|&p| Writers::start(p, Duration::from_millis(50))).collect();
    let mut costs: Vec<(Event, [Cost; 3])> = Vec::new();
    for round in 1..=rounds {
        for event in EVENTS {
            settle(&cluster, &writers)?;
            let cost = happen(&mut cluster, event, &writers)?;
            eprintln!(
                "[round {round}/{rounds}] {}: {}",
                event.label(),
                TARGETS
                    .iter()
                    .zip(&cost)
                    .map(|(t, c)| format!(
                        "{t}: gap {:.1} s, {} failed connections, {} failed session writes",
                        c.gap.as_secs_f64(),
                        c.failed_connections,
                        c.failed_session_writes
                    ))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            costs.push((event, cost));
        }
    }
    let mut table = Table::new(&TARGETS, &["haproxy 3s/3"]);
    for event in EVENTS {
        let samples = |f: fn(&Cost) -> f64| -> Vec<Option<Vec<f64>>> {
            (0..3).map(|t| Some(costs.iter().filter(|(e, _)| *e == event).map(|(_, c)| f(&c[t])).collect())).collect()
        };
        let name = event.label();
        table.add(&format!("{name}: write unavailability s"), Better::Lower, 1, samples(|c| c.gap.as_secs_f64()));
        table.add(
            &format!("{name}: failed new connections"),
            Better::Lower,
            0,
            samples(|c| c.failed_connections as f64),
        );
        table.add(
            &format!("{name}: failed session writes"),
            Better::Lower,
            0,
            samples(|c| c.failed_session_writes as f64),
        );
    }
    println!(
        "\n== pglb-bench failover --patroni: {rounds} round(s) of each event; Patroni 4.1 + etcd 3.4, ttl 20, loop_wait 2 =="
    );
    println!("writers: a new connection per write every 50 ms, and a kept session (reconnecting); per balancer");
    println!("pglb: patroni interval 1s, checks interval 1s, fall 2, hold_timeout 30s; haproxy: Patroni's template");
    print!("{}", table.render());
    Ok(())
}

fn free_port() -> Result<u16> {
    pglb_cluster::free_port().context("no free port")
}

/// Patroni's documentation template, with `timing` as the server defaults.
fn haproxy(cluster: &PatroniCluster, port: u16, timing: &str) -> Option<Haproxy> {
    let servers: String = cluster
        .members
        .iter()
        .map(|m| format!("    server {} 127.0.0.1:{} maxconn 100 check port {}\n", m.name, m.pg_port, m.api_port))
        .collect();
    Haproxy::start(&format!(
        "global\n    maxconn 300\ndefaults\n    mode tcp\n    retries 2\n    timeout client 30m\n    timeout connect 4s\n    timeout server 30m\n    timeout check 5s\n\
         listen primary\n    bind 127.0.0.1:{port}\n    option httpchk OPTIONS /primary\n    http-check expect status 200\n\
         \x20   default-server {timing} on-marked-down shutdown-sessions\n{servers}"
    ))
}

/// Waits until every balancer's writers write on the leader again.
fn settle(cluster: &PatroniCluster, writers: &[Writers]) -> Result<()> {
    cluster.wait_streaming(Duration::from_secs(120));
    let leader = cluster.wait_leader(Duration::from_secs(60));
    let port = cluster.member(&leader).pg_port;
    let from = Instant::now();
    wait(Duration::from_secs(90), || writers.iter().all(|w| w.first_ack_on(port, from).is_some()))
        .context("the writers did not settle on the leader")
}

fn wait(within: Duration, done: impl Fn() -> bool) -> Result<()> {
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() > deadline {
            anyhow::bail!("not done within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Makes `event` happen, waits until every balancer writes on the leader
/// after it, and measures what that cost each.
fn happen(cluster: &mut PatroniCluster, event: Event, writers: &[Writers]) -> Result<[Cost; 3]> {
    let leader = cluster.wait_leader(Duration::from_secs(60));
    let t0 = Instant::now();
    let mut after = t0;
    let leader_now = match event {
        Event::Switchover => {
            let candidate =
                cluster.members.iter().map(|m| m.name.clone()).find(|n| *n != leader).context("no candidate")?;
            cluster.switchover(&leader, &candidate);
            cluster.wait_new_leader(&leader, Duration::from_secs(60))
        }
        Event::LeaderCrash => {
            signal(cluster.member(&leader).postmaster_pid().context("no postmaster")?, "KILL");
            after = t0 + Duration::from_millis(100);
            leader.clone()
        }
        Event::PatroniStopped => {
            cluster.signal_patroni(&leader, "TERM");
            let new = cluster.wait_new_leader(&leader, Duration::from_secs(90));
            cluster.wait_patroni_exit(&leader, Duration::from_secs(60));
            new
        }
        Event::ApiDown => {
            let cut: Vec<Partition> = cluster.members.iter().filter_map(|m| Partition::port(m.api_port)).collect();
            std::thread::sleep(OUTAGE);
            drop(cut);
            after = Instant::now();
            leader.clone()
        }
        Event::EtcdDown => {
            cluster.stop_etcd();
            std::thread::sleep(OUTAGE);
            cluster.start_etcd();
            after = Instant::now();
            cluster.wait_leader(Duration::from_secs(90))
        }
    };
    let port = cluster.member(&leader_now).pg_port;
    wait(Duration::from_secs(120), || writers.iter().all(|w| w.first_ack_on(port, after).is_some()))
        .with_context(|| format!("{}: the writers did not come back on {leader_now}", event.label()))?;
    // A moment more, so a writer that came back and failed again counts.
    std::thread::sleep(Duration::from_secs(2));
    let cost = |w: &Writers| {
        let (failed_connections, failed_session_writes) = w.failures_since(t0);
        Cost { gap: w.longest_gap_since(t0), failed_connections, failed_session_writes }
    };
    let costs = [cost(&writers[0]), cost(&writers[1]), cost(&writers[2])];
    if event == Event::PatroniStopped {
        cluster.restart_patroni(&leader);
    }
    Ok(costs)
}
