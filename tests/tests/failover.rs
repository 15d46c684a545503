//! Stop the primary, promote a replica: rw follows. Own cluster.

use std::time::Duration;

use pglb_cluster::{Cluster, Spec};
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
    // The other replica still follows the old timeline here: ro falls back
    // only if it has no replica, and pg2 is still a healthy replica.
    pglb.wait_eligible("ro", &["pg2"], Duration::from_secs(15));
    let status = pglb.status();
    assert_eq!(status["backends"][0]["healthy"], false, "{status}");
    assert_eq!(status["backends"][1]["role"], "primary", "{status}");
}
