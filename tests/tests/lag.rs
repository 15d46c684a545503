//! Lag-aware reads: a replica that stops replaying while the primary writes
//! leaves the ro pool (and, with `on_lag: close`, loses its sessions), comes
//! back once it catches up; an idle primary makes no replica lag. Own cluster.

use std::time::Duration;

use pglb_cluster::{Cluster, Spec};
use pglb_tests::pglb::named;
use pglb_tests::{wait_until, wire, Pglb, Yaml};

const SETTLE: Duration = Duration::from_secs(20);

#[test]
fn paused_replay_takes_a_replica_out_and_resume_brings_it_back() {
    let cluster = Cluster::start(&Spec { tag: "lag".into(), replicas: 2, ..Spec::default() }).expect("cluster");
    pglb_tests::cluster::create_check_users(&cluster);
    let yaml = Yaml::for_cluster(&cluster)
        .listener("ro", "role: replica\n    max_lag_bytes: 1MB\n    on_lag: close\n    balance: round_robin")
        .listener("ro_keep", "role: replica\n    max_lag_bytes: 1MB\n    balance: round_robin");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("ro", &["pg1", "pg2"], SETTLE);

    // An idle primary: replicas are caught up, whatever the replay timestamp
    // says — over several checks of each.
    pglb.wait_checks(&["pg0", "pg1", "pg2"], 4.0, SETTLE);
    let status = pglb.status();
    for b in ["pg1", "pg2"] {
        assert_eq!(named(&status["backends"], b)["lag_seconds"], 0.0, "{status}");
        assert_eq!(named(&status["backends"], b)["lag_bytes"], 0, "{status}");
    }
    // Sessions on pg1 through both listeners (round robin: try until one lands there).
    let on_pg1 = |listener: &str| {
        wait_until("a session on pg1", Duration::from_secs(10), || {
            let mut s = wire::login(pglb.port(listener)).map_err(|e| e.to_string())?;
            wire::query(&mut s, "SELECT 1").map_err(|e| e.to_string())?;
            let conns = pglb_tests::http::get(pglb.admin, "/connections")?.1;
            let v: serde_json::Value = serde_json::from_str(&conns).map_err(|e| e.to_string())?;
            let mine = v["connections"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["listener"] == listener && c["backend"] == "pg1");
            if mine {
                Ok(s)
            } else {
                Err(conns)
            }
        })
    };
    let mut closed = on_pg1("ro");
    let mut kept = on_pg1("ro_keep");

    cluster.nodes[1].sql("SELECT pg_wal_replay_pause()").expect("pause replay");
    cluster
        .primary()
        .sql("CREATE TABLE lag_fill AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 40000) g")
        .expect("write ~10 MB");
    pglb.wait_eligible("ro", &["pg2"], SETTLE);
    let status = pglb.status();
    let lagging = &named(&status["listeners"], "ro")["lagging"];
    assert!(lagging.as_array().is_some_and(|l| l.iter().any(|b| b == "pg1")), "{status}");
    assert!(named(&status["backends"], "pg1")["lag_bytes"].as_u64().unwrap_or(0) > 1 << 20, "{status}");
    wire::read_to_eof(&mut closed).expect("on_lag: close ends the ro session on pg1");
    wire::query(&mut kept, "SELECT 1").expect("on_lag: keep leaves the session");
    let (tag, _) = wire::read_message(&mut kept).expect("answer");
    assert_ne!(tag, b'E');
    assert!(pglb.log().contains("replica lags over the limit"), "{}", pglb.log());

    cluster.nodes[1].sql("SELECT pg_wal_replay_resume()").expect("resume replay");
    pglb.wait_eligible("ro", &["pg1", "pg2"], SETTLE);
    assert!(pglb.log().contains("replica caught up"), "{}", pglb.log());
}
