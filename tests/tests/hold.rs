//! Hold instead of refuse: clients that arrive while a listener has no
//! eligible backend wait for one, up to `hold_timeout`, bounded by
//! `hold_max`; a held client that hangs up frees its place. Own cluster.

use std::time::{Duration, Instant};

use pglb_cluster::{Cluster, Spec};
use pglb_tests::psql::{psql, where_am_i};
use pglb_tests::{wait_until, wire, Pglb, Yaml};

fn held(pglb: &Pglb) -> String {
    let m = pglb.metrics();
    m.lines()
        .find(|l| l.starts_with("pglb_clients_held{cluster=\"default\",listener=\"rw\"}"))
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn held_clients_reach_the_new_primary_or_get_57p03_and_the_hold_is_bounded() {
    let cluster = Cluster::start(&Spec { tag: "hold".into(), replicas: 1, ..Spec::default() }).expect("cluster");
    pglb_tests::cluster::create_check_users(&cluster);
    let yaml = Yaml::for_cluster(&cluster)
        .listener("rw", "role: primary\n    hold_timeout: 8s\n    hold_max: 1")
        // pg0 is stopped below and nothing replaces it for a while: without
        // this, clients would be held for a restart (hold_restart_timeout).
        .listener("rw_short", "role: primary\n    hold_timeout: 1s\n    hold_restart_timeout: 1s");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("rw", &["pg0"], Duration::from_secs(15));
    cluster.nodes[0].stop("immediate");
    pglb.wait_eligible("rw", &[], Duration::from_secs(15));

    // No primary appears: 57P03 after hold_timeout, with pglb's text.
    let t0 = Instant::now();
    let err = psql(pglb.port("rw_short"), "SELECT 1", &[]).expect_err("nothing to hold for");
    let waited = t0.elapsed();
    assert!(
        err.contains("pglb: no healthy primary for listener \"rw_short\" (held 1s): primary \"pg0\" is down ("),
        "{err}"
    );
    assert!(waited >= Duration::from_millis(900), "refused after {waited:?}, before hold_timeout");

    // hold_max 1: a held client takes the only place; the next is refused at
    // once; when the first hangs up, its place is free again.
    let first = wire::start_up(pglb.port("rw")).expect("a client waiting for its answer");
    wait_until("one held client", Duration::from_secs(5), || {
        let h = held(&pglb);
        if h.ends_with(" 1") {
            Ok(())
        } else {
            Err(h)
        }
    });
    let t1 = Instant::now();
    let err = psql(pglb.port("rw"), "SELECT 1", &[]).expect_err("hold_max reached");
    assert!(t1.elapsed() < Duration::from_secs(2), "the second client was held, not refused");
    assert!(err.contains("hold_max"), "{err}");
    drop(first);
    wait_until("the held place to be freed", Duration::from_secs(5), || {
        let h = held(&pglb);
        if h.ends_with(" 0") {
            Ok(())
        } else {
            Err(h)
        }
    });
    assert!(pglb
        .metrics()
        .contains("pglb_clients_rejected_total{cluster=\"default\",listener=\"rw\",reason=\"client_gave_up\"} 1"));

    // A client held during the failover lands on the new primary: a delay,
    // not an error.
    let port = pglb.port("rw");
    let client = std::thread::spawn(move || {
        let t = Instant::now();
        (where_am_i(port), t.elapsed())
    });
    wait_until("the client to be held", Duration::from_secs(5), || {
        let h = held(&pglb);
        if h.ends_with(" 1") {
            Ok(())
        } else {
            Err(h)
        }
    });
    // Held while pglb checks the cluster and still sees no primary.
    pglb.wait_checks(&["pg1"], 2.0, Duration::from_secs(5));
    assert_eq!(held(&pglb).rsplit(' ').next(), Some("1"), "the client is still held");
    cluster.nodes[1].promote().expect("promote");
    let (landed, after) = client.join().expect("client thread");
    assert_eq!(landed, Ok((cluster.nodes[1].port, false)), "held client did not reach the new primary");
    eprintln!("held client connected after {:.2}s", after.as_secs_f64());
}
