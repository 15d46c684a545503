//! A partition (nftables drops the primary's traffic: silence, not a
//! refusal) while a replica is promoted: rw reaches the new primary within
//! 2 × interval of the promotion, because a silent old primary is fenced as
//! soon as another backend answers as primary on a higher timeline. A write
//! sent on an rw session opened before the partition never commits on the
//! old primary, even after the network heals (pglb resets its side, so the
//! kernel cannot deliver the unacknowledged bytes later). Own cluster.

use std::time::{Duration, Instant};

use pglb_cluster::{Cluster, Spec};
use pglb_tests::fault::Partition;
use pglb_tests::psql::where_am_i;
use pglb_tests::{wait_until, wire, Pglb, Yaml};

const INTERVAL: Duration = Duration::from_millis(500);

#[test]
fn a_partitioned_primary_loses_rw_at_the_promotion_and_gets_no_late_write() {
    let cluster = Cluster::start(&Spec { tag: "partition".into(), replicas: 1, ..Spec::default() }).expect("cluster");
    pglb_tests::cluster::create_check_users(&cluster);
    let (old, new) = (&cluster.nodes[0], &cluster.nodes[1]);
    old.sql("CREATE TABLE fenced_write (id int)").expect("table");
    new.wait_for("SELECT count(*) FROM pg_class WHERE relname = 'fenced_write'", "1", Duration::from_secs(20))
        .expect("replicated");
    let yaml = Yaml::for_cluster(&cluster)
        .health("interval: 500ms\n  timeout: 250ms\n  rise: 2\n  fall: 2\n  user: pglb_check\n  sslmode: disable")
        .listener("rw", "role: primary\n    hold_timeout: 10s");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("rw", &["pg0"], Duration::from_secs(15));
    let mut session = wire::login(pglb.port("rw")).expect("an rw session before the partition");

    let Some(partition) = Partition::port(old.port) else { return };
    // The client writes; pglb forwards into the partition, where it hangs.
    wire::query(&mut session, "INSERT INTO fenced_write VALUES (1)").expect("send the write");
    pglb.wait_state("pg0", "degraded", Duration::from_secs(5));
    assert_eq!(pglb.eligible("rw"), ["pg0"], "a silent primary alone keeps rw: no outage before the promotion");

    new.promote().expect("promote the replica");
    let promoted = Instant::now();
    pglb.wait_eligible("rw", &["pg1"], Duration::from_secs(5));
    let moved = promoted.elapsed();
    eprintln!("rw moved to the new primary {:.3}s after the promotion", moved.as_secs_f64());
    assert!(moved <= 2 * INTERVAL, "rw took {moved:?} to follow the promotion (2 × interval = {:?})", 2 * INTERVAL);
    assert_eq!(where_am_i(pglb.port("rw")), Ok((new.port, false)));
    let fenced = pglb.backend("pg0");
    assert_eq!(fenced["fenced"], true, "{fenced}");
    // The old session was closed when pg0 was fenced.
    session.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let ended = wire::read_to_eof(&mut session);
    assert!(ended.as_ref().is_ok_and(|tags| !tags.contains(&b'C')), "the write must not complete: {ended:?}");
    assert_eq!(pglb.metric("pglb_sessions_closed_total", &[("reason", "fenced")]), 1.0, "{}", pglb.log());

    // Heal. The old primary still accepts writes; the one sent into the
    // partition must never reach it. Give TCP time to retransmit.
    partition.heal();
    wait_until("the old primary to answer again", Duration::from_secs(10), || {
        old.sql("SELECT 1").map_err(|e| e.to_string())
    });
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        assert_eq!(
            old.sql("SELECT count(*) FROM fenced_write").expect("count"),
            "0",
            "a late write reached the old primary"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // pglb keeps the old primary fenced; writes go to the new one.
    assert_eq!(pglb.eligible("rw"), ["pg1"]);
    pglb_tests::psql::psql(pglb.port("rw"), "INSERT INTO fenced_write VALUES (2)", &[]).expect("write through rw");
    assert_eq!(new.sql("SELECT count(*) FROM fenced_write").expect("count"), "1");
}
