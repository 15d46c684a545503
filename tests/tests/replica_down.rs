//! A stopped replica leaves the ro rotation within fall × interval + timeout
//! and comes back after `rise` good checks. Own cluster: this test stops nodes.

use std::time::{Duration, Instant};

use pglb_cluster::{Cluster, Spec};
use pglb_tests::psql::where_am_i;
use pglb_tests::{wait_until, Pglb, Yaml};

#[test]
fn stopped_replica_leaves_rotation_and_returns() {
    let cluster =
        Cluster::start(&Spec { tag: "replica-down".into(), replicas: 2, ..Spec::default() }).expect("cluster");
    pglb_tests::cluster::create_check_users(&cluster);
    let (interval, timeout, fall, rise) = (1.0, 1.0, 2.0, 2.0);
    let yaml = Yaml::for_cluster(&cluster)
        .health("interval: 1s\n  timeout: 1s\n  rise: 2\n  fall: 2\n  user: pglb_check\n  sslmode: disable")
        .listener("ro", "role: replica\n    balance: round_robin");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("ro", &["pg1", "pg2"], Duration::from_secs(15));

    let stopped = &cluster.nodes[2];
    stopped.stop("fast");
    let t0 = Instant::now();
    pglb.wait_eligible("ro", &["pg1"], Duration::from_secs(15));
    let left_after = t0.elapsed().as_secs_f64();
    // The bound the docs promise, plus one interval of scheduling slack.
    let bound = fall * interval + timeout + interval;
    assert!(left_after <= bound, "replica left rotation after {left_after:.2}s, bound {bound}s");
    for _ in 0..4 {
        let (port, replica) = where_am_i(pglb.port("ro")).expect("ro still serves");
        assert!(replica && port == cluster.nodes[1].port, "ro went to {port}");
    }

    stopped.start().expect("restart replica");
    let t1 = Instant::now();
    pglb.wait_eligible("ro", &["pg1", "pg2"], Duration::from_secs(15));
    let back_after = t1.elapsed().as_secs_f64();
    assert!(back_after <= rise * interval + timeout + interval, "returned after {back_after:.2}s");
    let status = pglb.status();
    assert_eq!(pglb_tests::pglb::named(&status["backends"], "pg2")["healthy"], true, "{status}");
    wait_until("ro to reach the returned replica", Duration::from_secs(10), || match where_am_i(pglb.port("ro")) {
        Ok((p, true)) if p == stopped.port => Ok(()),
        other => Err(format!("{other:?}")),
    });
    eprintln!("replica left rotation after {left_after:.2}s and returned after {back_after:.2}s");
}
