//! Never the wrong database: another cluster's node listed by mistake (a
//! wrong address, a reused IP) never gets a session, whichever node answers
//! first, across restarts; a pinned or saved identity serves the real
//! cluster; `unfence` does not change the identity. Own clusters: one test
//! promotes a node.

use std::time::{Duration, Instant};

use pglb_cluster::{Cluster, Spec};
use pglb_tests::psql::psql;
use pglb_tests::{wait_until, Pglb, Yaml};

const SETTLE: Duration = Duration::from_secs(15);
const SYSID: &str = "SELECT system_identifier FROM pg_control_system()";

fn sysid(port: u16) -> String {
    psql(port, SYSID, &[]).expect("system identifier")
}

/// Every backend has answered its first check (pglb says it is ready).
fn wait_first_checks(pglb: &Pglb) {
    wait_until("the first checks of every backend", SETTLE, || {
        let status = pglb.status();
        match status["backends"].as_array() {
            Some(all) if all.iter().all(|b| b["checked"] == true) => Ok(()),
            _ => Err(status.to_string()),
        }
    });
}

/// The scenario: the real primary (timeline 1) and, by mistake, the
/// primary of another cluster on timeline 2, nothing else listed. Before
/// the fix, 15 of 18 queries through rw across 6 restarts reached the other
/// cluster.
#[test]
fn a_foreign_primary_on_a_higher_timeline_never_gets_rw_and_a_pinned_or_saved_identity_serves_the_real_one() {
    let _one_at_a_time = pglb_tests::exclusive();
    let real = Cluster::start(&Spec { tag: "real".into(), replicas: 0, ..Spec::default() }).expect("real cluster");
    pglb_tests::cluster::create_check_users_on(&real, 0);
    let other = Cluster::start(&Spec { tag: "other".into(), replicas: 1, ..Spec::default() }).expect("other cluster");
    pglb_tests::cluster::create_check_users_on(&other, 1);
    other.nodes[1].promote().expect("promote the other cluster's replica: timeline 2");
    other.nodes[0].stop("fast");
    other.nodes[1]
        .wait_for("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)", "00000002", SETTLE)
        .expect("the other cluster's primary is on timeline 2");
    let (real_id, other_id) = (sysid(real.primary().port), sysid(other.nodes[1].port));
    assert_ne!(real_id, other_id);

    let mut yaml = Yaml::for_cluster(&real).listener("rw", "role: primary\n    hold_timeout: 1s");
    yaml.backends.push(("stranger".into(), format!("address: {}", other.nodes[1].address())));

    // Nothing pinned or saved: a tie. rw goes nowhere, across restarts,
    // and says why.
    let (mut refused, mut foreign) = (0, 0);
    for restart in 0..6 {
        let pglb = Pglb::start(&yaml);
        wait_first_checks(&pglb);
        for _ in 0..3 {
            match psql(pglb.port("rw"), SYSID, &[]) {
                Ok(id) if id == other_id => foreign += 1,
                Ok(id) => panic!("a tie routed rw to {id}: {}", pglb.status()),
                Err(err) => {
                    assert!(err.contains("identity unsettled") && err.contains("system_identifier"), "{err}");
                    refused += 1;
                }
            }
        }
        assert_eq!(
            foreign,
            0,
            "restart {restart}: rw reached the other cluster {foreign} times of {}",
            3 * (restart + 1)
        );
        let identity = &pglb.status()["identity"];
        assert_eq!(identity["settled"], false, "{identity}");
        assert_eq!(identity["in_doubt"].as_array().map(Vec::len), Some(2), "{identity}");
        assert_eq!(pglb.metric("pglb_backend_identity_in_doubt", &[("backend", "stranger")]), 1.0);
        assert!(pglb.log().contains("identity unsettled"));
    }
    eprintln!("tie, 6 restarts: {refused} refused, {foreign} reached the other cluster");
    assert_eq!(foreign, 0, "rw reached the other cluster");

    // Pinned: rw serves the real one, the other is fenced as another
    // cluster, and unfencing it changes nothing.
    let state = tempfile_dir();
    let state_file = state.join("state.json");
    let pinned = yaml.clone().top(&format!("system_identifier: {real_id}\nstate_file: {}", state_file.display()));
    let pglb = Pglb::start(&pinned);
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    assert_eq!(sysid(pglb.port("rw")), real_id);
    let stranger = pglb.backend("stranger");
    assert_eq!(stranger["fence_kind"], "system_identifier", "{stranger}");
    let (code, body) = pglb.post("/backends/stranger/unfence");
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("system_identifier"), "{body}");
    let identity = &pglb.status()["identity"];
    assert_eq!(
        (identity["system_identifier"].as_str(), identity["source"].as_str()),
        (Some(&*real_id), Some("pinned"))
    );
    wait_until("the state file to hold the identity", SETTLE, || {
        let text = std::fs::read_to_string(&state_file).map_err(|e| e.to_string())?;
        if text.contains(&real_id) {
            Ok(())
        } else {
            Err(text)
        }
    });
    drop(pglb);

    // Saved (an earlier run's state file), nothing pinned: the same.
    let saved = yaml.clone().top(&format!("state_file: {}", state_file.display()));
    for _ in 0..3 {
        let pglb = Pglb::start(&saved);
        pglb.wait_eligible("rw", &["pg0"], SETTLE);
        assert_eq!(sysid(pglb.port("rw")), real_id);
        assert_eq!(pglb.status()["identity"]["source"], "saved");
    }
    let _ = std::fs::remove_dir_all(&state);
}

/// A replica of another cluster listed among the real cluster's: ro never
/// routes to it, also in the first moments after a start. Clients knock
/// from before pglb listens and are held (`hold_timeout`) until something
/// is eligible, so they are there the moment the first check answers.
#[test]
fn a_foreign_replica_never_gets_ro_even_in_the_first_moments() {
    let _one_at_a_time = pglb_tests::exclusive();
    let real = Cluster::start(&Spec { tag: "real-ro".into(), replicas: 1, ..Spec::default() }).expect("real cluster");
    pglb_tests::cluster::create_check_users_on(&real, 1);
    let other = Cluster::start(&Spec { tag: "other-ro".into(), replicas: 1, ..Spec::default() }).expect("other");
    pglb_tests::cluster::create_check_users_on(&other, 1);
    let (real_id, other_id) = (sysid(real.primary().port), sysid(other.nodes[1].port));
    let mut yaml = Yaml::for_cluster(&real).listener("ro", "role: replica\n    hold_timeout: 5s");
    yaml.backends.insert(0, ("stranger".into(), format!("address: {}", other.nodes[1].address())));
    let port = yaml.listeners[0].1;
    let (mut served, mut foreign) = (0, 0);
    for restart in 0..5 {
        let deadline = Instant::now() + Duration::from_secs(4);
        let clients: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut ids = Vec::new();
                    while Instant::now() < deadline {
                        match pglb_tests::wire::login(port) {
                            Ok(mut s) => ids.push(pglb_tests::wire::scalar(&mut s, SYSID)),
                            Err(_) => std::thread::sleep(Duration::from_millis(1)),
                        }
                    }
                    ids
                })
            })
            .collect();
        let pglb = Pglb::start(&yaml);
        for client in clients {
            for id in client.join().expect("client").into_iter().flatten() {
                if id == other_id {
                    foreign += 1;
                } else {
                    assert_eq!(id, real_id);
                    served += 1;
                }
            }
        }
        assert_eq!(foreign, 0, "restart {restart}: ro reached the other cluster's replica");
        pglb.wait_eligible("ro", &["pg1"], SETTLE);
        assert_eq!(pglb.backend("stranger")["fence_kind"], "system_identifier");
    }
    eprintln!("5 restarts: {served} ro sessions, all on the real replica");
    assert!(served > 0, "ro never served the real replica");
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pglb-identity-{}-{}", std::process::id(), nanos()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}
