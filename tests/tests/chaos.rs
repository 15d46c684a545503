//! A bounded chaos run (about a minute and a half): kill the primary, promote the
//! standby that received the most WAL, rejoin the others as its replicas, a
//! few times over, with synchronous replication, while writers use rw and
//! readers use ro — each on a new connection every few milliseconds.
//!
//! Each round also pauses WAL replay on a replica for 4 s, so ro has a
//! really lagging replica to keep clients away from.
//!
//! Asserts: every write that succeeded ran on the node that was primary
//! then; no acknowledged write is missing from the final primary; every read
//! on a replica saw every write acknowledged more than `STALE_BOUND` before
//! it started (`max_lag_seconds` 1 s + one check interval + one timeout +
//! 1 s of slack) — without the lag gate, reads on the paused replica are up
//! to 4 s stale and this fails.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pglb_cluster::{Cluster, Spec};
use pglb_tests::{Pglb, Yaml};

const ROUNDS: usize = 8;
/// How stale a replica read may be: max_lag_seconds + interval + timeout + slack.
const STALE_BOUND: Duration = Duration::from_millis(3000);
/// How long replay is paused on a replica each round (longer than the bound).
const PAUSE: Duration = Duration::from_secs(4);

/// Which node was primary from when (`since`), as the harness made it.
#[derive(Clone, Copy)]
struct Epoch {
    since: Instant,
    port: u16,
}

struct Write {
    id: i64,
    started: Instant,
    acked: Instant,
    port: u16,
}

struct Read {
    started: Instant,
    port: u16,
    in_recovery: bool,
    /// The highest id the read saw.
    seen: i64,
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
            acked.lock().expect("acked").push(Write { id, started, acked: Instant::now(), port });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    attempts
}

async fn reader(port: u16, stop: Arc<AtomicBool>, reads: Arc<Mutex<Vec<Read>>>) {
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let read = async {
            let client = connect(port).await?;
            let sql = "SELECT inet_server_port(), pg_is_in_recovery(), coalesce(max(id), 0) FROM chaos";
            let row = client.query_one(sql, &[]).await.ok()?;
            Some((row.get::<_, i32>(0) as u16, row.get::<_, bool>(1), row.get::<_, i64>(2)))
        };
        if let Ok(Some((port, in_recovery, seen))) = tokio::time::timeout(Duration::from_secs(15), read).await {
            reads.lock().expect("reads").push(Read { started, port, in_recovery, seen });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
        .listener("ro", "role: replica\n    fallback: primary\n    max_lag_seconds: 1s\n    hold_timeout: 10s");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("rw", &["pg0"], Duration::from_secs(15));
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let reads = Arc::new(Mutex::new(Vec::new()));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    let the_writer = runtime.spawn(writer(pglb.port("rw"), stop.clone(), acked.clone()));
    let the_reader = runtime.spawn(reader(pglb.port("ro"), stop.clone(), reads.clone()));

    let mut epochs = vec![Epoch { since: Instant::now() - Duration::from_secs(60), port: ports[0] }];
    let mut primary = 0usize;
    for round in 0..ROUNDS {
        std::thread::sleep(Duration::from_secs(1));
        // A replica stops replaying: ro must keep readers off it.
        let paused = &cluster.nodes[(primary + 1 + round % 2) % cluster.nodes.len()];
        paused.sql("SELECT pg_wal_replay_pause()").expect("pause replay");
        std::thread::sleep(PAUSE);
        paused.sql("SELECT pg_wal_replay_resume()").expect("resume replay");
        std::thread::sleep(Duration::from_secs(1));
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
    // Every read on a replica saw every write acknowledged STALE_BOUND
    // before it started.
    let reads = reads.lock().expect("reads");
    assert!(reads.len() > 100, "only {} reads succeeded", reads.len());
    let mut replica_reads = 0;
    for r in reads.iter().filter(|r| r.in_recovery) {
        replica_reads += 1;
        let Some(cutoff) = r.started.checked_sub(STALE_BOUND) else { continue };
        let due = acked.iter().filter(|w| w.acked <= cutoff).map(|w| w.id).max().unwrap_or(0);
        assert!(
            r.seen >= due,
            "a read on replica port {} saw id {} but id {due} was acknowledged more than {STALE_BOUND:?} before",
            r.port,
            r.seen
        );
    }
    assert!(replica_reads > 50, "only {replica_reads} reads reached a replica");
    eprintln!(
        "chaos: {} of {attempts} writes acknowledged, all present; {} reads; {} failovers",
        acked.len(),
        reads.len(),
        ROUNDS
    );
}
