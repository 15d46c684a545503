//! Split-brain fencing against a real cluster: a timeline fork, two
//! primaries on one timeline, `multi_primary: allow`, and a backend from
//! another cluster. Own clusters: these tests promote nodes.

use std::time::{Duration, Instant};

use pglb_cluster::{Cluster, Spec};
use pglb_tests::psql::where_am_i;
use pglb_tests::{wait_until, wire, Pglb, Yaml};

const SETTLE: Duration = Duration::from_secs(15);

fn fenced(pglb: &Pglb, backend: &str) -> bool {
    pglb.backend(backend)["fenced"] == true
}

#[test]
fn timeline_fork_fences_the_old_primary_and_closes_its_sessions() {
    let _one_at_a_time = pglb_tests::exclusive();
    let cluster = Cluster::start(&Spec { tag: "fence".into(), replicas: 2, ..Spec::default() }).expect("cluster");
    pglb_tests::cluster::create_check_users(&cluster);
    let yaml = Yaml::for_cluster(&cluster)
        .health("interval: 500ms\n  timeout: 500ms\n  rise: 2\n  fall: 2\n  user: pglb_check\n  sslmode: disable")
        .listener("rw", "role: primary\n    hold_timeout: 0s")
        .listener("rw_keep", "role: primary\n    on_ineligible: keep\n    hold_timeout: 0s");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    let mut closed_session = wire::login(pglb.port("rw")).expect("rw session on pg0");
    let mut kept_session = wire::login(pglb.port("rw_keep")).expect("rw_keep session on pg0");

    // Promote pg1 while pg0 still runs as primary: a timeline fork.
    cluster.nodes[1].promote().expect("promote pg1");
    let t0 = Instant::now();
    pglb.wait_eligible("rw", &["pg1"], SETTLE);
    assert!(fenced(&pglb, "pg0"), "{}", pglb.status());
    // on_ineligible: close — the old primary's rw session is closed.
    let tags = wire::read_to_eof(&mut closed_session).expect("EOF on the fenced session");
    eprintln!("fenced session closed {:.2}s after promotion (tags {tags:?})", t0.elapsed().as_secs_f64());
    assert!(t0.elapsed() < Duration::from_secs(5));
    // on_ineligible: keep — that one still works.
    wire::query(&mut kept_session, "SELECT 1").expect("kept session still writes");
    let (tag, _) = wire::read_message(&mut kept_session).expect("kept session answers");
    assert_ne!(tag, b'E');
    assert_eq!(where_am_i(pglb.port("rw")).expect("rw"), (cluster.nodes[1].port, false));
    let log = pglb.log();
    assert!(log.contains("backend fenced") && log.contains("timeline 1"), "{log}");
    assert!(pglb.metrics().contains("pglb_backend_fenced{cluster=\"default\",backend=\"pg0\"} 1"));

    // The new primary dies: the stale one must still get no writes.
    cluster.nodes[1].stop("immediate");
    pglb.wait_eligible("rw", &[], SETTLE);
    // pg0 answers as a primary check after check: it must stay fenced.
    pglb.wait_checks(&["pg0"], 4.0, SETTLE);
    assert!(pglb.eligible("rw").is_empty(), "{}", pglb.status());
    assert!(fenced(&pglb, "pg0"));
    let err = pglb_tests::psql::psql(pglb.port("rw"), "SELECT 1", &[]).expect_err("no writes to a fenced node");
    assert!(err.contains("no healthy primary") && err.contains("primary \"pg0\" is fenced: "), "{err}");
}

#[test]
fn two_primaries_on_one_timeline_fence_rw_and_allow_balances_them() {
    let _one_at_a_time = pglb_tests::exclusive();
    let cluster = Cluster::start(&Spec { tag: "split".into(), replicas: 2, ..Spec::default() }).expect("cluster");
    pglb_tests::cluster::create_check_users(&cluster);
    let mut yaml = Yaml::for_cluster(&cluster).listener("rw", "role: primary\n    hold_timeout: 0s");
    yaml.backends.remove(0); // pg1 and pg2 only
    let pglb = Pglb::start(&yaml);
    let allow = Pglb::start(&{
        let mut y = Yaml::for_cluster(&cluster)
            .top("multi_primary: allow")
            .listener("rw", "role: primary\n    hold_timeout: 0s\n    balance: round_robin");
        y.backends.remove(0);
        y
    });
    // Both replicas follow pg0 on timeline 1; promoting both puts each on timeline 2.
    cluster.nodes[1].promote().expect("promote pg1");
    cluster.nodes[2].promote().expect("promote pg2");
    wait_until("split brain", SETTLE, || {
        let s = pglb.status();
        if s["split_brain"] == true {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    assert!(pglb.eligible("rw").is_empty());
    assert!(pglb.log().contains("split brain"), "{}", pglb.log());
    assert!(pglb.metrics().contains("pglb_split_brain{cluster=\"default\"} 1"));
    let err = pglb_tests::psql::psql(pglb.port("rw"), "SELECT 1", &[]).expect_err("rw fenced");
    assert!(err.contains("no healthy primary") && err.contains("two backends answer as primary (pg1, pg2)"), "{err}");

    allow.wait_eligible("rw", &["pg1", "pg2"], SETTLE);
    let ports: std::collections::HashSet<u16> =
        (0..4).map(|_| where_am_i(allow.port("rw")).expect("rw via allow").0).collect();
    assert_eq!(ports.len(), 2, "multi_primary: allow balances writes over both");
}

#[test]
fn a_backend_from_another_cluster_is_fenced() {
    let _one_at_a_time = pglb_tests::exclusive();
    let cluster = Cluster::start(&Spec { tag: "sysid".into(), replicas: 1, ..Spec::default() }).expect("cluster");
    pglb_tests::cluster::create_check_users_on(&cluster, 1);
    let other = Cluster::start(&Spec { tag: "other".into(), replicas: 0, ..Spec::default() }).expect("other cluster");
    pglb_tests::cluster::create_check_users_on(&other, 0);
    let mut yaml = Yaml::for_cluster(&cluster).listener("ro", "role: any\n    hold_timeout: 0s");
    yaml.backends.push(("stranger".into(), format!("address: {}", other.primary().address())));
    let pglb = Pglb::start(&yaml);
    wait_until("the stranger to be fenced", SETTLE, || {
        if fenced(&pglb, "stranger") {
            Ok(())
        } else {
            Err(pglb.status().to_string())
        }
    });
    let stranger = pglb.backend("stranger");
    assert!(stranger["fence_reason"].as_str().is_some_and(|r| r.contains("system identifier")), "{stranger}");
    assert_eq!(stranger["fence_kind"], "system_identifier", "{stranger}");
    pglb.wait_eligible("ro", &["pg0", "pg1"], SETTLE);
}

/// 53300 proves the server runs, not its role: a primary that was down and
/// comes back answering the check's login with "too many connections" (here
/// the check role's CONNECTION LIMIT 0, SQLSTATE 53300 like a full server)
/// stays down until a check gets in. Before the fix it came back "up as
/// primary" on its old role after `rise` such answers.
#[test]
fn a_restarted_primary_that_answers_the_check_with_53300_does_not_take_rw() {
    let _one_at_a_time = pglb_tests::exclusive();
    let cluster = Cluster::start(&Spec { tag: "full".into(), replicas: 0, ..Spec::default() }).expect("cluster");
    pglb_tests::cluster::create_check_users_on(&cluster, 0);
    let node = cluster.primary();
    let yaml = Yaml::for_cluster(&cluster).listener("rw", "role: primary\n    hold_timeout: 0s");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    node.sql("ALTER ROLE pglb_check CONNECTION LIMIT 0").expect("limit the check role");
    node.stop("fast");
    pglb.wait_state("pg0", "down", SETTLE);
    node.start().expect("restart pg0");
    // rise is 2: give it several times that.
    pglb.wait_checks(&["pg0"], 8.0, SETTLE);
    let backend = pglb.backend("pg0");
    assert_eq!(backend["state"], "down", "{backend}");
    assert!(backend["last_error"].as_str().is_some_and(|e| e.contains("53300")), "{backend}");
    assert!(pglb.eligible("rw").is_empty(), "{}", pglb.status());
    let err = pglb_tests::psql::psql(pglb.port("rw"), "SELECT 1", &[]).expect_err("no rw while pg0's role is unknown");
    assert!(err.contains("no healthy primary"), "{err}");
    // A check gets in: its role is known again.
    node.sql("ALTER ROLE pglb_check CONNECTION LIMIT -1").expect("lift the limit");
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
}
