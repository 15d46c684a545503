//! Fencing, pinned roles and session verdicts, driven through `Topology`.

mod common;
use common::{primary, replica};

use std::path::Path;
use std::time::{Duration, Instant};

use pglb_routing::{
    CloseReason, Facts, FailureClass, FenceKind, Health, Observation, ObservedRole, Receiver, RoutingTable, Topology,
    Verdict, Wal,
};

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
    Topology::new(pglb_config::load_str(Path::new("t.yaml"), &text).expect("config").clusters[0].clone())
}

/// a primary on timeline 1, b and c its replicas, all of cluster 7.
fn steady(t: &mut Topology) {
    primary(t, "a", 1, 7);
    replica(t, "b", 7);
    replica(t, "c", 7);
}

/// Evidence: refused (`lost`: the watched connection dropped first).
fn refused(t: &mut Topology, name: &str, lost: bool) {
    let obs = Observation::Failed { class: FailureClass::Refused, reason: "refused".into(), lost };
    t.observe(name, obs, Instant::now());
}

/// A check with no answer; nothing heard for `secs`.
fn silent(t: &mut Topology, name: &str, secs: u64) {
    let obs = Observation::Silent { reason: "timed out".into(), silent_for: Duration::from_secs(secs) };
    t.observe(name, obs, Instant::now());
}

fn ro(table: &RoutingTable) -> Vec<&str> {
    let route = table.listener("ro").expect("ro");
    route.eligible.iter().map(|&i| table.backends[i].config.name.as_str()).collect()
}

fn rw(table: &RoutingTable) -> Vec<&str> {
    let route = table.listener("rw").expect("rw");
    route.eligible.iter().map(|&i| table.backends[i].config.name.as_str()).collect()
}

#[test]
fn lower_timeline_primary_is_fenced_and_stays_fenced() {
    let mut t = topology("", "");
    steady(&mut t);
    assert_eq!(rw(&t.table().0), ["a"]);
    // b is promoted while a still runs: a fork.
    primary(&mut t, "b", 2, 7);
    primary(&mut t, "a", 1, 7);
    let (table, _) = t.table();
    assert_eq!(rw(&table), ["b"]);
    assert!(table.backends[0]
        .fenced
        .as_ref()
        .is_some_and(|f| f.kind == FenceKind::Timeline && f.reason.contains("timeline 1")));
    assert_eq!(table.verdict(0, 0, false), Verdict::Ineligible(CloseReason::Fenced));
    // The new primary dies: the stale one must still get no writes.
    refused(&mut t, "b", true);
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
    assert_eq!(table.verdict(0, 0, false), Verdict::Ineligible(CloseReason::SplitBrain));

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
    assert!(table.backends[2]
        .fenced
        .as_ref()
        .is_some_and(|f| f.kind == FenceKind::SystemId && f.reason.contains("system identifier")));
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
    refused(&mut t, "b", false);
    refused(&mut t, "c", false);
    let (table, _) = t.table();
    let ro = table.listener("ro").expect("ro");
    assert!(ro.via_fallback);
    assert_eq!(ro.eligible, [0]);
    replica(&mut t, "b", 7);
    replica(&mut t, "b", 7);
    let (table, _) = t.table();
    assert_eq!(table.listener("ro").expect("ro").eligible, [1]);
    assert_eq!(table.verdict(1, 0, true), Verdict::Keep, "a fallback session on the primary stays");
    assert_eq!(table.verdict(1, 0, false), Verdict::Ineligible(CloseReason::RoleChanged));
}

#[test]
fn primary_listener_waits_for_every_first_check() {
    let mut t = topology("", "");
    primary(&mut t, "a", 1, 7);
    assert!(rw(&t.table().0).is_empty(), "b and c not yet checked: a stale primary could be among them");
    replica(&mut t, "b", 7);
    refused(&mut t, "c", false);
    assert_eq!(rw(&t.table().0), ["a"]);
}

#[test]
fn generation_moves_only_when_routing_changes() {
    let mut t = topology("", "");
    steady(&mut t);
    let g1 = t.table().0.generation;
    replica(&mut t, "b", 7);
    assert_eq!(t.table().0.generation, g1);
    refused(&mut t, "b", true);
    assert!(t.table().0.generation > g1);
}

#[test]
fn a_silent_primary_is_degraded_still_used_alone_and_fenced_by_a_newer_one() {
    let mut t = topology("", "");
    steady(&mut t);
    silent(&mut t, "a", 1);
    silent(&mut t, "a", 2);
    let (table, _) = t.table();
    assert_eq!(table.backends[0].state.health(), Health::Degraded);
    assert_eq!(rw(&table), ["a"], "the only primary: patience, not an outage");
    assert!(table.listener("rw").expect("rw").degraded);
    assert_eq!(table.verdict(0, 0, false), Verdict::Keep, "silence closes no session");
    // b is promoted while a is silent (a partition): a is fenced with its
    // last known timeline, and its sessions close.
    primary(&mut t, "b", 2, 7);
    let (table, _) = t.table();
    assert_eq!(rw(&table), ["b"]);
    assert_eq!(table.verdict(0, 0, false), Verdict::Ineligible(CloseReason::Fenced));
}

#[test]
fn silence_past_down_after_takes_the_backend_out() {
    let mut t = topology("health: {interval: 1s, fall: 2, down_after: 10s}", "");
    steady(&mut t);
    for s in [1, 2, 5, 9] {
        silent(&mut t, "a", s);
    }
    assert_eq!(t.table().0.backends[0].state.health(), Health::Degraded);
    silent(&mut t, "a", 10);
    let (table, _) = t.table();
    assert_eq!(table.backends[0].state.health(), Health::Down);
    assert!(rw(&table).is_empty());
    assert_eq!(table.verdict(0, 0, false), Verdict::Ineligible(CloseReason::BackendDown));
}

#[test]
fn reads_prefer_healthy_replicas_then_the_primary_then_a_degraded_replica() {
    let mut t = topology("", "");
    steady(&mut t);
    silent(&mut t, "b", 1);
    silent(&mut t, "b", 2);
    let (table, _) = t.table();
    assert_eq!(ro(&table), ["c"]);
    assert_eq!(table.verdict(1, 1, false), Verdict::Keep, "the silent replica keeps its sessions");
    refused(&mut t, "c", true);
    let (table, _) = t.table();
    assert_eq!(ro(&table), ["a"], "an answering primary before a silent replica");
    assert!(table.listener("ro").expect("ro").via_fallback);
    silent(&mut t, "a", 1);
    silent(&mut t, "a", 2);
    let (table, _) = t.table();
    assert_eq!(ro(&table), ["b"], "all silent: the replica, still");
    assert!(table.listener("ro").expect("ro").degraded);
}

#[test]
fn a_monitoring_failure_keeps_the_backend_in_service() {
    let mut t = topology("", "");
    steady(&mut t);
    for name in ["a", "b", "c"] {
        for _ in 0..5 {
            let obs = Observation::Failed { class: FailureClass::Auth, reason: "password".into(), lost: false };
            t.observe(name, obs, Instant::now());
        }
    }
    let (table, _) = t.table();
    assert!(table.backends.iter().all(|b| b.state.health() == Health::Unverified));
    assert_eq!(rw(&table), ["a"]);
    assert_eq!(ro(&table), ["b", "c"]);
    assert_eq!(table.verdict(0, 0, false), Verdict::Keep);
}

/// A primary's WAL position, and a replica that replayed all of it.
const WRITTEN: Wal = Wal { current: Some(100), flush: Some(100), replay: None };
const REPLAYED: Wal = Wal { current: None, flush: None, replay: Some(100) };

/// A replica left on the old timeline after a promotion leaves ro at once
/// (its history may hold WAL the promotion discarded); once it streams on
/// the new timeline, and its following clock says it caught up, it is back.
#[test]
fn a_replica_left_on_the_old_timeline_leaves_ro_until_it_streams_on_the_new_one() {
    let mut t = topology("", "");
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let sample = |receiver| Facts { system_id: Some(7), receiver: Some(receiver), wal: REPLAYED, ..Facts::default() };
    let streaming = |tl| sample(Receiver::Streaming { timeline: Some(tl) });
    let up = |role, facts| Observation::Up { role, facts };
    let primary_tl = |tl| Facts { timeline: Some(tl), system_id: Some(7), wal: WRITTEN, ..Facts::default() };
    t.observe("a", up(ObservedRole::Primary, primary_tl(1)), at(0));
    t.observe("b", up(ObservedRole::Replica, streaming(1)), at(0));
    t.observe("c", up(ObservedRole::Replica, streaming(1)), at(0));
    // a dies and b is promoted; c is not re-pointed to it.
    refused(&mut t, "a", true);
    t.observe("b", up(ObservedRole::Primary, primary_tl(2)), at(1));
    t.observe("c", up(ObservedRole::Replica, sample(Receiver::NotStreaming)), at(2));
    let (table, _) = t.table();
    assert_eq!(ro(&table), ["b"], "not shown to follow timeline 2: reads fall back to the new primary");
    assert!(table.backends[2].rejoining.as_ref().is_some_and(|w| w.contains("timeline 2")), "{:?}", table.backends[2]);
    t.observe("c", up(ObservedRole::Replica, sample(Receiver::NotStreaming)), at(31));
    let (table, _) = t.table();
    assert_eq!(ro(&table), ["b"], "stale replica out: reads fall back to the new primary");
    assert_eq!(table.listener("ro").expect("ro").lagging, [2]);
    // Re-pointed at last: streaming on the new timeline, back after `rise`.
    t.observe("c", up(ObservedRole::Replica, streaming(2)), at(32));
    t.observe("c", up(ObservedRole::Replica, streaming(2)), at(33));
    assert_eq!(ro(&t.table().0), ["c"]);
}

/// A restart with the saved state: the stale old primary, answering first
/// and alone, must not win rw; a drained node stays drained.
#[test]
fn a_restart_with_the_saved_state_keeps_fences_timeline_and_drains() {
    let mut before = topology("", "");
    steady(&mut before);
    primary(&mut before, "b", 2, 7);
    primary(&mut before, "a", 1, 7);
    before.set_admin("c", pglb_routing::AdminState::Drained).expect("drain c");
    let saved = before.saved();
    assert_eq!((saved.system_id, saved.max_timeline, saved.fences.len(), saved.admin.len()), (Some(7), 2, 1, 1));

    // Without it, the old primary is all pglb sees after a restart: it wins.
    let mut forgetful = topology("", "");
    primary(&mut forgetful, "a", 1, 7);
    refused(&mut forgetful, "b", true);
    replica(&mut forgetful, "c", 7);
    assert_eq!(rw(&forgetful.table().0), ["a"]);

    let mut restarted = topology("", "");
    let notes = restarted.restore(saved.clone());
    assert!(notes.iter().any(|n| n.starts_with("a: fenced (timeline)")), "{notes:?}");
    assert!(notes.iter().any(|n| n == "c: drained"), "{notes:?}");
    primary(&mut restarted, "a", 1, 7);
    refused(&mut restarted, "b", true);
    replica(&mut restarted, "c", 7);
    let table = restarted.table().0;
    assert!(rw(&table).is_empty(), "the stale primary stays fenced");
    assert!(!ro(&table).contains(&"c"), "the drained node stays out");

    // The fence alone, unfenced by an operator: the saved timeline still
    // fences the old primary once its cluster is confirmed.
    let mut timeline_only = topology("", "");
    timeline_only.restore(pglb_routing::SavedState { fences: Vec::new(), admin: Vec::new(), ..saved.clone() });
    primary(&mut timeline_only, "a", 1, 7);
    assert!(rw(&timeline_only.table().0).is_empty(), "timeline 1 < saved 2");

    // A rebuilt cluster (another system identifier): the saved identifier
    // stands (every backend is another cluster's until an operator says
    // otherwise) ...
    let mut rebuilt = topology("", "");
    rebuilt.restore(pglb_routing::SavedState { fences: Vec::new(), admin: Vec::new(), ..saved.clone() });
    primary(&mut rebuilt, "a", 1, 99);
    replica(&mut rebuilt, "b", 99);
    replica(&mut rebuilt, "c", 99);
    assert!(rw(&rebuilt.table().0).is_empty(), "the saved cluster 7 stands");
    assert!(ro(&rebuilt.table().0).is_empty());
    // ... and pinning the new one in the config uses it, not the saved
    // identifier or its timeline, and says so.
    let mut pinned = topology("system_identifier: 99", "");
    pinned.restore(pglb_routing::SavedState { fences: Vec::new(), admin: Vec::new(), ..saved });
    let facts = Facts { timeline: Some(1), system_id: Some(99), ..Facts::default() };
    let events = pinned.observe("a", Observation::Up { role: ObservedRole::Primary, facts }, Instant::now());
    assert!(events.iter().any(|e| matches!(e, pglb_routing::Event::SavedTimelineIgnored { saved: 7, now: 99 })));
    replica(&mut pinned, "b", 99);
    replica(&mut pinned, "c", 99);
    assert_eq!(rw(&pinned.table().0), ["a"]);
}

#[test]
fn a_restored_system_identifier_fence_stays_until_the_backend_answers() {
    let mut before = topology("", "");
    steady(&mut before);
    primary(&mut before, "c", 1, 99);
    assert!(before.saved().fences.iter().any(|f| f.backend == "c" && f.fence.kind == FenceKind::SystemId));

    // After a restart (or an upgrade) the stranger is down: nothing says it
    // is of this cluster now, so the fence stays.
    let mut after = topology("", "");
    after.restore(before.saved());
    steady_without_c(&mut after);
    refused(&mut after, "c", false);
    refused(&mut after, "c", false);
    assert!(after.saved().fences.iter().any(|f| f.backend == "c"), "{:?}", after.saved());
    // It comes back as a member of the cluster (rebuilt at that address): cleared.
    replica(&mut after, "c", 7);
    assert!(after.saved().fences.is_empty(), "{:?}", after.saved());
}

fn steady_without_c(t: &mut Topology) {
    primary(t, "a", 1, 7);
    replica(t, "b", 7);
}

#[test]
fn a_saved_state_for_other_backends_is_applied_only_where_it_fits() {
    let mut t = topology("", "");
    let saved = pglb_routing::SavedState {
        system_id: None,
        max_timeline: 0,
        fences: vec![pglb_routing::SavedFence {
            backend: "a".into(),
            address: "10.9.9.9:5432".into(),
            fence: pglb_routing::Fence { kind: FenceKind::Timeline, reason: "old".into() },
        }],
        admin: vec![pglb_routing::SavedAdmin {
            backend: "gone".into(),
            address: "127.0.0.1:9".into(),
            state: pglb_routing::AdminState::Disabled,
        }],
        ..pglb_routing::SavedState::default()
    };
    let notes = t.restore(saved);
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(notes.iter().all(|n| n.contains("no such backend in the config")), "{notes:?}");
    steady(&mut t);
    assert_eq!(rw(&t.table().0), ["a"], "a moved address: another node, not fenced");
}

/// The lag evidence survives a restart (state file) or an upgrade: a
/// replica left following nothing for a minute, held out of ro, is out
/// from the new process's first samples — not admitted again for
/// `max_lag_seconds` because the new process's clock starts at zero.
#[test]
fn a_replica_held_out_for_lag_stays_out_after_a_restart() {
    let sample = |receiver| Facts { system_id: Some(7), receiver: Some(receiver), wal: REPLAYED, ..Facts::default() };
    let up = |role, facts| Observation::Up { role, facts };
    let primary_tl = |tl| Facts { timeline: Some(tl), system_id: Some(7), wal: WRITTEN, ..Facts::default() };
    // What the earlier process saw: c not following, held out of ro.
    let mut before = topology("", "");
    let t0 = Instant::now();
    before.observe("a", up(ObservedRole::Primary, primary_tl(1)), t0);
    before.observe("b", up(ObservedRole::Replica, sample(Receiver::Streaming { timeline: Some(1) })), t0);
    before.observe("c", up(ObservedRole::Replica, sample(Receiver::NotStreaming)), t0);
    before.observe("c", up(ObservedRole::Replica, sample(Receiver::NotStreaming)), t0 + Duration::from_secs(31));
    assert_eq!(ro(&before.table().0), ["b"]);
    let mut saved = before.saved();
    assert_eq!(saved.lagging.len(), 1, "{saved:?}");
    assert_eq!((saved.lagging[0].listener.as_str(), saved.lagging[0].backend.as_str()), ("ro", "c"));
    assert_eq!(saved.not_following.len(), 1, "{saved:?}");
    // A minute ago on the wall clock.
    saved.not_following[0].since = std::time::SystemTime::now() - Duration::from_secs(60);

    let mut after = topology("", "");
    let notes = after.restore(saved);
    assert!(notes.iter().any(|n| n.contains("c: out of ro's pool for lag")), "{notes:?}");
    assert!(notes.iter().any(|n| n.contains("c: not following its primary for 60s")), "{notes:?}");
    let now = Instant::now();
    after.observe("a", up(ObservedRole::Primary, primary_tl(1)), now);
    after.observe("b", up(ObservedRole::Replica, sample(Receiver::Streaming { timeline: Some(1) })), now);
    for s in 0..4 {
        after.observe("c", up(ObservedRole::Replica, sample(Receiver::NotStreaming)), now + Duration::from_secs(s));
        assert_eq!(ro(&after.table().0), ["b"], "c is back in ro after {s} s of the new process");
    }
}
