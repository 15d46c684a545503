//! Stop the primary, promote a replica: rw follows. The other replica, left
//! following the dead old primary (not re-pointed), leaves ro within the
//! default `max_lag_seconds` (30 s since it last streamed) plus one check.
//! Own cluster.

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
        .listener("rw", "role: primary")
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
    // pg2 still follows the dead old primary (nobody re-pointed it): it
    // stopped receiving WAL when pg0 stopped. It serves ro for now, and
    // leaves within the documented bound; ro then falls back to the primary.
    assert_eq!(pglb.eligible("ro"), ["pg2"]);
    pglb.wait_eligible("ro", &["pg1"], Duration::from_secs(40));
    let left = stopped.elapsed();
    eprintln!("stale replica left ro {:.1}s after the old primary stopped", left.as_secs_f64());
    // max_lag_seconds (default 30 s) + one interval + one timeout.
    assert!(left <= Duration::from_millis(31_500), "the stale replica served reads for {left:?}");
    assert!(left >= Duration::from_secs(29), "left after {left:?}: before its lag could reach 30 s?");
    let status = pglb.status();
    assert_eq!(named(&status["listeners"], "ro")["lagging"], serde_json::json!(["pg2"]), "{status}");
    assert_eq!(named(&status["listeners"], "ro")["via_fallback"], true, "{status}");
    assert!(pglb.log().contains("replica lags over the limit"), "{}", pglb.log());
}
