//! Fencing, pinned roles and session verdicts, driven through `Topology`.

use std::path::Path;
use std::sync::Arc;

use pglb_routing::{Facts, Observation, ObservedRole, RoutingTable, Topology, Verdict};

fn topology(extra: &str, pin: &str) -> Topology {
    let text = format!(
        "{extra}
listeners:
  - {{name: rw, listen: 127.0.0.1:1, role: primary}}
  - {{name: ro, listen: 127.0.0.1:2, role: replica, fallback: primary}}
backends:
  - {{name: a, address: 127.0.0.1:3}}
  - {{name: b, address: 127.0.0.1:4}}
  - {{name: c, address: 127.0.0.1:5{pin}}}
"
    );
    Topology::new(Arc::new(pglb_config::load_str(Path::new("t.yaml"), &text).expect("config")))
}

fn primary(t: &mut Topology, name: &str, timeline: u32, sysid: u64) {
    let facts = Facts { timeline: Some(timeline), system_id: Some(sysid), ..Facts::default() };
    t.observe(name, Observation::Up { role: ObservedRole::Primary, facts });
}

fn replica(t: &mut Topology, name: &str, sysid: u64) {
    let facts = Facts { system_id: Some(sysid), ..Facts::default() };
    t.observe(name, Observation::Up { role: ObservedRole::Replica, facts });
}

fn rw(table: &RoutingTable) -> Vec<&str> {
    let route = table.listener("rw").expect("rw");
    route.eligible.iter().map(|&i| table.backends[i].config.name.as_str()).collect()
}

#[test]
fn lower_timeline_primary_is_fenced_and_stays_fenced() {
    let mut t = topology("", "");
    primary(&mut t, "a", 1, 7);
    replica(&mut t, "b", 7);
    replica(&mut t, "c", 7);
    assert_eq!(rw(&t.table().0), ["a"]);
    // b is promoted while a still runs: a fork.
    primary(&mut t, "b", 2, 7);
    primary(&mut t, "a", 1, 7);
    let (table, _) = t.table();
    assert_eq!(rw(&table), ["b"]);
    assert!(table.backends[0].fenced.as_deref().is_some_and(|r| r.contains("timeline 1")));
    assert_eq!(table.verdict(0, 0, false), Verdict::Ineligible("fenced"));
    // The new primary dies: the stale one must still get no writes.
    t.observe("b", Observation::Lost { reason: "killed".into() });
    primary(&mut t, "a", 1, 7);
    assert!(rw(&t.table().0).is_empty());
    // Rejoined as a replica: the fence lifts.
    replica(&mut t, "a", 7);
    assert!(t.table().0.backends[0].fenced.is_none());
}

#[test]
fn two_primaries_on_one_timeline_fence_rw_unless_allowed() {
    let mut t = topology("", "");
    primary(&mut t, "a", 2, 7);
    primary(&mut t, "b", 2, 7);
    replica(&mut t, "c", 7);
    let (table, events) = t.table();
    assert!(table.split_brain);
    assert!(rw(&table).is_empty());
    assert!(events.iter().any(|e| matches!(e, pglb_routing::Event::SplitBrain { .. })));
    assert_eq!(table.verdict(0, 0, false), Verdict::Ineligible("split_brain"));

    let mut t = topology("multi_primary: allow", "");
    primary(&mut t, "a", 2, 7);
    primary(&mut t, "b", 5, 9);
    replica(&mut t, "c", 7);
    let (table, _) = t.table();
    assert!(!table.split_brain);
    assert_eq!(rw(&table), ["a", "b"]);
}

#[test]
fn another_clusters_backend_is_fenced() {
    let mut t = topology("", "");
    primary(&mut t, "a", 1, 7);
    replica(&mut t, "b", 7);
    replica(&mut t, "c", 99);
    let (table, _) = t.table();
    assert!(table.backends[2].fenced.as_deref().is_some_and(|r| r.contains("system identifier")));
    let ro = table.listener("ro").expect("ro");
    assert_eq!(ro.eligible, [1]);
}

#[test]
fn pinned_replica_serves_reads_only() {
    let mut t = topology("", ", role: replica");
    primary(&mut t, "a", 1, 7);
    replica(&mut t, "b", 7);
    // A writable logical-replication subscriber: reports primary.
    primary(&mut t, "c", 1, 7);
    let (table, _) = t.table();
    assert!(!table.split_brain);
    assert_eq!(rw(&table), ["a"]);
    assert_eq!(table.listener("ro").expect("ro").eligible, [1, 2]);
}

#[test]
fn fallback_sessions_survive_a_returning_replica() {
    let mut t = topology("", "");
    primary(&mut t, "a", 1, 7);
    t.observe("b", Observation::Down { reason: "x".into() });
    t.observe("c", Observation::Down { reason: "x".into() });
    let (table, _) = t.table();
    let ro = table.listener("ro").expect("ro");
    assert!(ro.via_fallback);
    assert_eq!(ro.eligible, [0]);
    replica(&mut t, "b", 7);
    replica(&mut t, "b", 7);
    let (table, _) = t.table();
    assert_eq!(table.listener("ro").expect("ro").eligible, [1]);
    assert_eq!(table.verdict(1, 0, true), Verdict::Keep, "a fallback session on the primary stays");
    assert_eq!(table.verdict(1, 0, false), Verdict::Ineligible("role_changed"));
}

#[test]
fn primary_listener_waits_for_every_first_check() {
    let mut t = topology("", "");
    primary(&mut t, "a", 1, 7);
    assert!(rw(&t.table().0).is_empty(), "b and c not yet checked: a stale primary could be among them");
    replica(&mut t, "b", 7);
    t.observe("c", Observation::Down { reason: "x".into() });
    assert_eq!(rw(&t.table().0), ["a"]);
}

#[test]
fn generation_moves_only_when_routing_changes() {
    let mut t = topology("", "");
    primary(&mut t, "a", 1, 7);
    replica(&mut t, "b", 7);
    replica(&mut t, "c", 7);
    let g1 = t.table().0.generation;
    replica(&mut t, "b", 7);
    assert_eq!(t.table().0.generation, g1);
    t.observe("b", Observation::Lost { reason: "x".into() });
    assert!(t.table().0.generation > g1);
}
