//! Fast detection: a killed postmaster is noticed within about one check
//! round trip (not fall × interval), a terminated check connection is not a
//! dead server, and a hung server still fails at the timeout. Own cluster.

use std::time::{Duration, Instant};

use pglb_cluster::{Cluster, Spec};
use pglb_tests::{wait_until, Pglb, Yaml};

fn healthy(pglb: &Pglb, backend: &str) -> bool {
    pglb.backend(backend)["healthy"] == true
}

#[test]
fn killed_postmaster_is_down_within_one_round_trip_and_terminated_check_is_not() {
    let _one_at_a_time = pglb_tests::exclusive();
    let cluster = Cluster::start(&Spec { tag: "detect".into(), replicas: 1, ..Spec::default() }).expect("cluster");
    pglb_tests::cluster::create_check_users(&cluster);
    // fall × interval is 3 s: detection must beat it by far.
    let yaml = Yaml::for_cluster(&cluster)
        .health("interval: 1s\n  timeout: 1s\n  rise: 2\n  fall: 3\n  user: pglb_check\n  sslmode: disable")
        .listener("rw", "role: primary");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("rw", &["pg0"], Duration::from_secs(15));

    // pg_terminate_backend on the check connection: reconnect, still up.
    let killed = cluster
        .primary()
        .sql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'pglb-health'")
        .expect("terminate check connections");
    assert_ne!(killed, "0", "no check connection to terminate");
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert!(healthy(&pglb, "pg0"), "a terminated check connection marked the backend down:\n{}", pglb.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!pglb.log().contains("backend is down"), "{}", pglb.log());

    // SIGKILL the postmaster: its backends exit, the check connection drops,
    // the reconnect is refused: down at once.
    cluster.primary().signal("KILL").expect("kill -9 postmaster");
    let t0 = Instant::now();
    wait_until("the primary to be marked down", Duration::from_secs(10), || {
        if healthy(&pglb, "pg0") {
            Err("still up".into())
        } else {
            Ok(())
        }
    });
    let detected = t0.elapsed();
    eprintln!("killed primary marked down after {:.3}s (fall × interval = 3s)", detected.as_secs_f64());
    assert!(detected < Duration::from_millis(1500), "detection took {detected:?}");
    assert!(pglb.log().contains("check connection dropped"), "{}", pglb.log());
}

/// A hung server (SIGSTOP) is silence, not evidence: it is degraded after
/// `fall` unanswered checks, not taken out, and as the only replica it still
/// serves. Before the fault model it left rotation here; `stall.rs` covers
/// the rest (sessions kept, waiting clients served, `down_after`).
#[test]
fn hung_backend_is_degraded_not_down() {
    let _one_at_a_time = pglb_tests::exclusive();
    let cluster = Cluster::start(&Spec { tag: "hang".into(), replicas: 1, ..Spec::default() }).expect("cluster");
    pglb_tests::cluster::create_check_users(&cluster);
    let yaml = Yaml::for_cluster(&cluster)
        .health("interval: 500ms\n  timeout: 500ms\n  rise: 2\n  fall: 2\n  user: pglb_check\n  sslmode: disable")
        .listener("ro", "role: replica");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("ro", &["pg1"], Duration::from_secs(15));
    let frozen = pglb_tests::fault::Freeze::node(&cluster.nodes[1]);
    let t0 = Instant::now();
    pglb.wait_state("pg1", "degraded", Duration::from_secs(10));
    let took = t0.elapsed();
    let status = pglb.listener("ro");
    assert_eq!(status["backends"], serde_json::json!(["pg1"]), "the only replica still serves: {status}");
    assert_eq!(status["degraded"], true, "{status}");
    assert_eq!(pglb.backend("pg1")["up"], true);
    frozen.thaw();
    eprintln!("hung replica degraded after {:.2}s", took.as_secs_f64());
    assert!(pglb.log().contains("state=\"degraded\" class=\"timeout\""), "{}", pglb.log());
    pglb.wait_state("pg1", "healthy", Duration::from_secs(15));
    assert!(!pglb.log().contains("backend is down:"), "{}", pglb.log());
}
