//! A bounded chaos run (about a minute and a half): kill the primary, promote the
//! standby that received the most WAL, rejoin the others as its replicas, a
//! few times over, with synchronous replication, while writers use rw and
//! readers use ro — each on a new connection every few milliseconds.
//!
//! Asserts: every write that succeeded ran on the node that was primary
//! then; no acknowledged write is missing from the final primary; no read
//! went to a replica that pglb's last status showed over the lag limit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pglb_cluster::{Cluster, Spec};
use pglb_tests::{Pglb, Yaml};

const ROUNDS: usize = 8;

/// Which node was primary from when (`since`), as the harness made it.
#[derive(Clone, Copy)]
struct Epoch {
    since: Instant,
    port: u16,
}

struct Write {
    id: i64,
    started: Instant,
    port: u16,
}

struct Read {
    at: Instant,
    port: u16,
    in_recovery: bool,
}

async fn connect(port: u16) -> Option<tokio_postgres::Client> {
    let conn = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=disable connect_timeout=12");
    let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await.ok()?;
    tokio::spawn(connection);
    Some(client)
}

async fn writer(port: u16, stop: Arc<AtomicBool>, acked: Arc<Mutex<Vec<Write>>>) -> usize {
    let mut attempts = 0;
    let mut id = 0i64;
    while !stop.load(Ordering::Relaxed) {
        id += 1;
        attempts += 1;
        let started = Instant::now();
        let write = async {
            let client = connect(port).await?;
            let row = client
                .query_one("INSERT INTO chaos (id) VALUES ($1) RETURNING inet_server_port()", &[&id])
                .await
                .ok()?;
            Some(row.get::<_, i32>(0) as u16)
        };
        if let Ok(Some(port)) = tokio::time::timeout(Duration::from_secs(15), write).await {
            acked.lock().expect("acked").push(Write { id, started, port });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    attempts
}

async fn reader(port: u16, stop: Arc<AtomicBool>, reads: Arc<Mutex<Vec<Read>>>) {
    while !stop.load(Ordering::Relaxed) {
        let read = async {
            let client = connect(port).await?;
            let row = client.query_one("SELECT inet_server_port(), pg_is_in_recovery()", &[]).await.ok()?;
            Some((row.get::<_, i32>(0) as u16, row.get::<_, bool>(1)))
        };
        if let Ok(Some((port, in_recovery))) = tokio::time::timeout(Duration::from_secs(15), read).await {
            reads.lock().expect("reads").push(Read { at: Instant::now(), port, in_recovery });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls /status: (time, ports of replicas pglb counts as lagging on `ro`).
fn monitor(pglb_admin: std::net::SocketAddr, ports: Vec<u16>, stop: Arc<AtomicBool>) -> Vec<(Instant, Vec<u16>)> {
    let mut seen = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if let Ok((200, body)) = pglb_tests::http::get(pglb_admin, "/status") {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) {
                let lagging = v["listeners"][1]["lagging"].as_array().cloned().unwrap_or_default();
                let lagging: Vec<u16> = lagging
                    .iter()
                    .filter_map(|b| b.as_str()?.strip_prefix("pg")?.parse::<usize>().ok())
                    .filter_map(|i| ports.get(i).copied())
                    .collect();
                seen.push((Instant::now(), lagging));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    seen
}

#[test]
fn failover_loop_loses_no_acknowledged_write_and_never_writes_to_a_non_primary() {
    let spec = Spec {
        tag: "chaos".into(),
        replicas: 2,
        settings: vec!["synchronous_standby_names = '*'".into(), "synchronous_commit = on".into()],
        ..Spec::default()
    };
    let cluster = Cluster::start(&spec).expect("cluster");
    pglb_tests::cluster::create_check_users(&cluster);
    cluster.primary().sql("CREATE TABLE chaos (id bigint PRIMARY KEY)").expect("table");
    let yaml = Yaml::for_cluster(&cluster)
        .listener("rw", "role: primary\n    hold_timeout: 10s")
        .listener("ro", "role: replica\n    fallback: primary\n    max_lag_bytes: 16MB\n    hold_timeout: 10s");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("rw", &["pg0"], Duration::from_secs(15));
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let reads = Arc::new(Mutex::new(Vec::new()));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    let the_writer = runtime.spawn(writer(pglb.port("rw"), stop.clone(), acked.clone()));
    let the_reader = runtime.spawn(reader(pglb.port("ro"), stop.clone(), reads.clone()));
    let watcher = {
        let (admin, ports, stop) = (pglb.admin, ports.clone(), stop.clone());
        std::thread::spawn(move || monitor(admin, ports, stop))
    };

    let mut epochs = vec![Epoch { since: Instant::now() - Duration::from_secs(60), port: ports[0] }];
    let mut primary = 0usize;
    for round in 0..ROUNDS {
        std::thread::sleep(Duration::from_secs(5));
        cluster.nodes[primary].signal("KILL").expect("kill the primary");
        let replicas: Vec<usize> = (0..cluster.nodes.len()).filter(|&i| i != primary).collect();
        // The standby that received the most WAL has every acknowledged commit.
        let received = |i: usize| {
            cluster.nodes[i].sql("SELECT pg_last_wal_receive_lsn() - '0/0'").ok().and_then(|v| v.parse::<f64>().ok())
        };
        let next =
            *replicas.iter().max_by(|a, b| received(**a).partial_cmp(&received(**b)).expect("lsn")).expect("a replica");
        epochs.push(Epoch { since: Instant::now(), port: ports[next] });
        cluster.nodes[next].promote().expect("promote");
        cluster.nodes[next].sql("ALTER SYSTEM SET synchronous_standby_names = '*'").expect("sync standby names");
        cluster.nodes[next].sql("SELECT pg_reload_conf()").expect("reload");
        for other in (0..cluster.nodes.len()).filter(|&i| i != next) {
            cluster.rebuild_replica(&cluster.nodes[other], &cluster.nodes[next]).expect("rejoin as a replica");
        }
        eprintln!("round {round}: pg{primary} killed, pg{next} promoted, the others rejoined");
        primary = next;
    }
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let attempts = runtime.block_on(the_writer).expect("writer");
    runtime.block_on(the_reader).expect("reader");
    let lag_view = watcher.join().expect("monitor");

    let acked = acked.lock().expect("acked");
    assert!(acked.len() > 100, "only {} of {attempts} writes succeeded", acked.len());
    // Every successful write ran on the primary of its epoch (or of the next,
    // for a write held through a failover).
    for w in acked.iter() {
        let epoch = epochs.iter().rposition(|e| e.since <= w.started).expect("an epoch");
        let allowed: Vec<u16> = epochs[epoch..(epoch + 2).min(epochs.len())].iter().map(|e| e.port).collect();
        assert!(allowed.contains(&w.port), "write {} went to port {} while the primary was {allowed:?}", w.id, w.port);
    }
    // No acknowledged write is missing from the final primary.
    let present = cluster.nodes[primary].sql("SELECT string_agg(id::text, ',') FROM chaos").expect("read back");
    let present: std::collections::HashSet<i64> = present.split(',').filter_map(|s| s.parse().ok()).collect();
    let missing: Vec<i64> = acked.iter().map(|w| w.id).filter(|id| !present.contains(id)).collect();
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
    // No read went to a replica pglb's latest status showed as lagging.
    let reads = reads.lock().expect("reads");
    assert!(reads.len() > 100, "only {} reads succeeded", reads.len());
    for r in reads.iter().filter(|r| r.in_recovery) {
        let last = lag_view.iter().rev().find(|(t, _)| *t <= r.at);
        if let Some((_, lagging)) = last {
            assert!(!lagging.contains(&r.port), "a read went to lagging replica {}", r.port);
        }
    }
    eprintln!(
        "chaos: {} of {attempts} writes acknowledged, all present; {} reads; {} failovers",
        acked.len(),
        reads.len(),
        ROUNDS
    );
}
