//! The cluster's identity: pinned > saved > agreed once every backend was
//! checked; a tie routes nothing; timelines are compared only within one
//! identifier; `unfence` never changes it.

mod common;
use common::{primary, replica};

use std::path::Path;
use std::time::Instant;

use pglb_routing::{
    ActionError, FailureClass, FenceKind, IdentitySource, Observation, RoutingTable, SavedState, Topology,
};

const REAL: u64 = 7_301_234_567_890_123_456;
const FOREIGN: u64 = 7_399_999_999_999_999_999;

/// `backends` names, each `name: address`; rw (primary) and ro (replica).
fn topology(top: &str, backends: &[&str]) -> Topology {
    let list: String = backends
        .iter()
        .enumerate()
        .map(|(i, name)| format!("  - {{name: {name}, address: 127.0.0.1:{}}}\n", 10 + i))
        .collect();
    let text = format!(
        "{top}
listeners:
  - {{name: rw, listen: 127.0.0.1:1, role: primary}}
  - {{name: ro, listen: 127.0.0.1:2, role: replica}}
backends:
{list}"
    );
    Topology::new(pglb_config::load_str(Path::new("t.yaml"), &text).expect("config").clusters[0].clone())
}

fn refused(t: &mut Topology, name: &str) {
    let obs = Observation::Failed { class: FailureClass::Refused, reason: "refused".into(), lost: false };
    t.observe(name, obs, Instant::now());
}

fn eligible<'a>(table: &'a RoutingTable, listener: &str) -> Vec<&'a str> {
    let route = table.listener(listener).expect("listener");
    route.eligible.iter().map(|&i| table.backends[i].config.name.as_str()).collect()
}

/// The scenario: the real primary (timeline 1) and, by mistake,
/// another cluster's primary on timeline 2. Whichever answers first, rw
/// never goes to the other cluster: a tie routes nothing and says why.
#[test]
fn a_foreign_primary_on_a_higher_timeline_never_gets_rw_whoever_answers_first() {
    for foreign_first in [true, false] {
        let mut t = topology("", &["real", "other"]);
        if foreign_first {
            primary(&mut t, "other", 2, FOREIGN);
            assert!(eligible(&t.table().0, "rw").is_empty(), "not settled before every backend was checked");
            primary(&mut t, "real", 1, REAL);
        } else {
            primary(&mut t, "real", 1, REAL);
            primary(&mut t, "other", 2, FOREIGN);
        }
        let (table, _) = t.table();
        assert!(eligible(&table, "rw").is_empty(), "a tie routes nothing (foreign first: {foreign_first})");
        assert!(table.identity.pending && table.identity.in_doubt.len() == 2, "{:?}", table.identity);
        let why = pglb_routing::unavailable(table.listener("rw").expect("rw"), &table);
        assert!(why.contains("identity unsettled") && why.contains("system_identifier"), "{why}");
        // No timeline fence across clusters.
        assert!(table.backends.iter().all(|b| b.fenced.is_none()), "{:?}", table.backends);
    }
    // Pinned: the real one serves, the other is fenced as another cluster.
    let mut t = topology(&format!("system_identifier: {REAL}"), &["real", "other"]);
    primary(&mut t, "other", 2, FOREIGN);
    primary(&mut t, "real", 1, REAL);
    let (table, _) = t.table();
    assert_eq!(eligible(&table, "rw"), ["real"]);
    assert_eq!(table.identity.source, Some(IdentitySource::Pinned));
    assert!(table.backends[1].fenced.as_ref().is_some_and(|f| f.kind == FenceKind::SystemId));
    // Quoted, as a string, the same.
    let t = topology(&format!("system_identifier: \"{REAL}\""), &["real", "other"]);
    assert_eq!(t.saved().system_id, Some(REAL));
}

/// An identifier saved by an earlier run (state file, or handed over on
/// upgrade) settles the identity at once: the foreign primary never wins.
#[test]
fn a_saved_identifier_settles_the_identity_before_any_check() {
    let saved = SavedState { system_id: Some(REAL), max_timeline: 1, ..SavedState::default() };
    let mut t = topology("", &["real", "other"]);
    t.restore(saved);
    primary(&mut t, "other", 2, FOREIGN);
    assert!(eligible(&t.table().0, "rw").is_empty());
    primary(&mut t, "real", 1, REAL);
    let (table, _) = t.table();
    assert_eq!(eligible(&table, "rw"), ["real"]);
    assert_eq!(table.identity.source, Some(IdentitySource::Saved));
}

/// A foreign replica among the real cluster's: ro never routes to it, not
/// even before every backend has answered its first check.
#[test]
fn a_foreign_replica_never_gets_ro_even_in_the_first_moments() {
    let mut t = topology("", &["p", "r1", "stranger"]);
    replica(&mut t, "stranger", FOREIGN);
    assert!(eligible(&t.table().0, "ro").is_empty(), "one answer is not the cluster's identity yet");
    replica(&mut t, "r1", REAL);
    assert!(eligible(&t.table().0, "ro").is_empty());
    primary(&mut t, "p", 1, REAL);
    let (table, _) = t.table();
    assert_eq!(eligible(&table, "ro"), ["r1"]);
    assert_eq!((table.identity.system_id, table.identity.source), (Some(REAL), Some(IdentitySource::Agreed)));
    assert!(table.backends[2].fenced.as_ref().is_some_and(|f| f.kind == FenceKind::SystemId));
}

/// A two-node cluster with one node down at start still serves: one
/// identifier seen is agreement. Once agreed it is sticky: more foreign
/// nodes later do not outvote it.
#[test]
fn one_identifier_seen_is_agreement_and_agreement_is_sticky() {
    let mut t = topology("", &["a", "b", "x", "y"]);
    refused(&mut t, "b");
    refused(&mut t, "x");
    refused(&mut t, "y");
    primary(&mut t, "a", 1, REAL);
    assert_eq!(eligible(&t.table().0, "rw"), ["a"]);
    primary(&mut t, "x", 3, FOREIGN);
    replica(&mut t, "y", FOREIGN);
    let (table, _) = t.table();
    assert_eq!(eligible(&table, "rw"), ["a"], "outnumbered later, the cluster's identity stands");
    assert_eq!(table.identity.system_id, Some(REAL));
}

/// `unfence` of another cluster's node is refused and changes nothing.
#[test]
fn unfencing_a_foreign_node_never_changes_the_identity() {
    let mut t = topology("", &["a", "b", "stranger"]);
    primary(&mut t, "a", 1, REAL);
    replica(&mut t, "b", REAL);
    primary(&mut t, "stranger", 5, FOREIGN);
    assert_eq!(eligible(&t.table().0, "rw"), ["a"]);
    match t.unfence("stranger") {
        Err(ActionError::Conflict(why)) => assert!(why.contains("system_identifier"), "{why}"),
        other => panic!("unfence of a foreign node: {other:?}"),
    }
    primary(&mut t, "stranger", 5, FOREIGN);
    let (table, _) = t.table();
    assert_eq!(eligible(&table, "rw"), ["a"]);
    assert_eq!(table.identity.system_id, Some(REAL));
    assert_eq!(t.saved().system_id, Some(REAL));
}
