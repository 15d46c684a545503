//! Stop the primary, promote a replica: rw follows. The other replica, left
//! following the dead old primary (not re-pointed), leaves ro as soon as
//! the promoted one is seen: it has not streamed on the new timeline, and
//! its history may hold WAL the promotion discarded. Own cluster.

use std::time::{Duration, Instant};

use pglb_cluster::{Cluster, Spec};
use pglb_tests::pglb::named;
use pglb_tests::psql::where_am_i;
use pglb_tests::{wait_until, Pglb, Yaml};

#[test]
fn rw_moves_to_the_promoted_replica() {
    let cluster = Cluster::start(&Spec { tag: "failover".into(), replicas: 2, ..Spec::default() }).expect("cluster");
    pglb_tests::cluster::create_check_users(&cluster);
    let yaml = Yaml::for_cluster(&cluster)
        // Refused at once while there is no primary (not held for it).
        .listener("rw", "role: primary\n    hold_timeout: 0s")
        .listener("ro", "role: replica\n    fallback: primary");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("rw", &["pg0"], Duration::from_secs(15));
    assert_eq!(where_am_i(pglb.port("rw")), Ok((cluster.nodes[0].port, false)));

    cluster.nodes[0].stop("fast");
    let stopped = Instant::now();
    pglb.wait_eligible("rw", &[], Duration::from_secs(15));
    // No primary: rw refuses with pglb's message, ro keeps serving from replicas.
    let err = pglb_tests::psql::psql(pglb.port("rw"), "SELECT 1", &[]).expect_err("no primary");
    assert!(err.contains("pglb: no healthy primary for listener \"rw\""), "{err}");
    assert!(where_am_i(pglb.port("ro")).expect("ro serves").1);

    let new_primary = &cluster.nodes[1];
    new_primary.promote().expect("promote");
    pglb.wait_eligible("rw", &["pg1"], Duration::from_secs(15));
    wait_until("rw to reach the new primary", Duration::from_secs(10), || match where_am_i(pglb.port("rw")) {
        Ok((p, false)) if p == new_primary.port => Ok(()),
        other => Err(format!("{other:?}")),
    });
    let status = pglb.status();
    assert_eq!(named(&status["backends"], "pg0")["healthy"], false, "{status}");
    assert_eq!(named(&status["backends"], "pg1")["role"], "primary", "{status}");
    // pg2 still follows the dead old primary (nobody re-pointed it). It
    // served ro while no primary was visible, and leaves it as soon as pg1
    // is seen on timeline 2; ro then falls back to the primary.
    pglb.wait_eligible("ro", &["pg1"], Duration::from_secs(5));
    eprintln!("stale replica left ro {:.1}s after the old primary stopped", stopped.elapsed().as_secs_f64());
    let status = pglb.status();
    assert_eq!(named(&status["listeners"], "ro")["lagging"], serde_json::json!(["pg2"]), "{status}");
    assert_eq!(named(&status["listeners"], "ro")["via_fallback"], true, "{status}");
    let why = &named(&status["backends"], "pg2")["rejoining"];
    assert!(why.as_str().is_some_and(|w| w.contains("has not streamed on the current timeline 2")), "{status}");
    // Re-pointed at the new primary, it streams on timeline 2 and is back.
    cluster.nodes[2]
        .sql(&format!("ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port={} user=postgres'", new_primary.port))
        .expect("re-point pg2");
    cluster.nodes[2].sql("SELECT pg_reload_conf()").expect("reload pg2");
    pglb.wait_eligible("ro", &["pg2"], Duration::from_secs(30));
}
