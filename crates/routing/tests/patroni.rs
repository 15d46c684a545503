//! Patroni's say in routing: the leader lock as a veto (only while it is
//! confirmed), tags and `noloadbalance` in the read pools, departed
//! members drained, a standby cluster's writes refused.

mod common;
use common::{primary, replica};

use std::path::Path;

use pglb_routing::{
    unavailable, CloseReason, MemberView, PatroniView, RoutingTable, SavedAdmin, SavedState, Topology, Trust, Verdict,
};

fn topology() -> Topology {
    let text = "
patroni: {urls: [http://127.0.0.1:8008]}
listeners:
  - {name: rw, listen: 127.0.0.1:1, role: primary}
  - {name: ro, listen: 127.0.0.1:2, role: replica, fallback: primary}
  - {name: east, listen: 127.0.0.1:6, role: replica, tags: {dc: east}}
backends:
  - {name: a, address: 127.0.0.1:3}
  - {name: b, address: 127.0.0.1:4, tags: {dc: east}}
  - {name: c, address: 127.0.0.1:5}
";
    Topology::new(pglb_config::load_str(Path::new("t.yaml"), text).expect("config").clusters[0].clone())
}

fn member(role: &str) -> MemberView {
    MemberView { role: role.into(), state: "running".into(), ..MemberView::default() }
}

fn view(trust: Trust, leader: Option<&str>) -> PatroniView {
    let members =
        [("a", member("leader")), ("b", member("replica")), ("c", member("replica"))].map(|(n, m)| (n.to_owned(), m));
    PatroniView {
        trust,
        leader: leader.map(str::to_owned),
        members: members.into_iter().collect(),
        ..PatroniView::default()
    }
}

fn eligible<'a>(table: &'a RoutingTable, listener: &str) -> Vec<&'a str> {
    let route = table.listener(listener).expect("listener");
    route.eligible.iter().map(|&i| table.backends[i].config.name.as_str()).collect()
}

#[test]
fn nothing_is_routed_before_patroni_is_read_once() {
    let mut t = topology();
    primary(&mut t, "a", 1, 7);
    replica(&mut t, "b", 7);
    replica(&mut t, "c", 7);
    assert!(eligible(&t.table().0, "rw").is_empty(), "the first read decides the members");
    t.set_patroni(view(Trust::Unreachable, None));
    assert_eq!(eligible(&t.table().0, "rw"), ["a"], "no API: routed on the checks");
}

#[test]
fn a_confirmed_lock_vetoes_another_primary_and_breaks_a_same_timeline_tie() {
    let mut t = topology();
    t.set_patroni(view(Trust::Lock, Some("b")));
    // a and b both answer as primary on timeline 1: without Patroni, split brain.
    primary(&mut t, "a", 1, 7);
    primary(&mut t, "b", 1, 7);
    replica(&mut t, "c", 7);
    let (table, _) = t.table();
    assert_eq!(eligible(&table, "rw"), ["b"]);
    assert!(!table.split_brain);
    assert!(table.backends[0].vetoed.as_deref().is_some_and(|v| v.contains("`b`")));
    assert_eq!(table.verdict(0, 0, false), Verdict::Ineligible(CloseReason::NotLeader));
    // Not confirmed (the leader's own /leader did not say 200): no veto, the tie stands.
    t.set_patroni(view(Trust::Unconfirmed, Some("b")));
    let (table, _) = t.table();
    assert!(table.split_brain);
    assert!(eligible(&table, "rw").is_empty());
}

#[test]
fn a_fresh_read_that_changes_no_routing_keeps_the_generation() {
    let mut t = topology();
    t.set_patroni(view(Trust::Lock, Some("a")));
    primary(&mut t, "a", 1, 7);
    replica(&mut t, "b", 7);
    replica(&mut t, "c", 7);
    let before = t.table().0.generation;
    let mut again = view(Trust::Lock, Some("a"));
    again.answered_at = Some(std::time::SystemTime::now());
    t.set_patroni(again.clone());
    assert_eq!(t.table().0.generation, before, "a read that changes nothing routes alike");
    again.members.get_mut("b").expect("b").tags.insert("noloadbalance".into(), "true".into());
    t.set_patroni(again);
    assert!(t.table().0.generation > before, "a member out of ro is a routing change");
}

#[test]
fn the_lock_never_routes_by_itself_and_its_absence_changes_nothing() {
    let mut t = topology();
    primary(&mut t, "a", 1, 7);
    replica(&mut t, "b", 7);
    replica(&mut t, "c", 7);
    // Patroni names b, which the checks still see as a replica (promoting):
    // a is vetoed and rw waits for b.
    t.set_patroni(view(Trust::Lock, Some("b")));
    let (table, _) = t.table();
    assert!(eligible(&table, "rw").is_empty());
    assert!(unavailable(table.listener("rw").expect("rw"), &table).contains("vetoed"));
    // Every API unreachable, the DCS gone, failsafe, paused: the checks decide.
    for trust in [Trust::Unreachable, Trust::DcsUnavailable, Trust::Failsafe, Trust::Paused, Trust::NoLeader] {
        t.set_patroni(view(trust, Some("b")));
        assert_eq!(eligible(&t.table().0, "rw"), ["a"], "{trust:?}");
    }
}

#[test]
fn tags_noloadbalance_and_departure_shape_the_read_pools() {
    let mut t = topology();
    let mut v = view(Trust::Lock, Some("a"));
    t.set_patroni(v.clone());
    primary(&mut t, "a", 1, 7);
    replica(&mut t, "b", 7);
    replica(&mut t, "c", 7);
    assert_eq!(eligible(&t.table().0, "ro"), ["b", "c"]);
    assert_eq!(eligible(&t.table().0, "east"), ["b"], "only b carries dc=east");
    // noloadbalance on c: out of ro, sessions there kept (like a drain).
    v.members.get_mut("c").expect("c").tags.insert("noloadbalance".into(), "true".into());
    t.set_patroni(v.clone());
    let (table, _) = t.table();
    assert_eq!(eligible(&table, "ro"), ["b"]);
    assert_eq!(table.verdict(1, 2, false), Verdict::Keep);
    // Patroni's tags count too: c tagged dc=east joins `east`... unless noloadbalance.
    v.members.get_mut("c").expect("c").tags.insert("dc".into(), "east".into());
    t.set_patroni(v.clone());
    assert_eq!(eligible(&t.table().0, "east"), ["b"]);
    v.members.get_mut("c").expect("c").tags.remove("noloadbalance");
    t.set_patroni(v.clone());
    assert_eq!(eligible(&t.table().0, "east"), ["b", "c"]);
    // b departs: drained, not closed.
    v.members.get_mut("b").expect("b").departed = true;
    t.set_patroni(v);
    let (table, _) = t.table();
    assert_eq!(eligible(&table, "ro"), ["c"]);
    assert_eq!(table.verdict(1, 1, false), Verdict::Keep);
}

#[test]
fn a_standby_cluster_refuses_writes_and_says_why() {
    let mut t = topology();
    let mut v = view(Trust::Lock, Some("a"));
    v.members.get_mut("a").expect("a").role = "standby_leader".into();
    v.standby_leader = Some("a".into());
    t.set_patroni(v);
    replica(&mut t, "a", 7);
    replica(&mut t, "b", 7);
    replica(&mut t, "c", 7);
    let (table, _) = t.table();
    assert_eq!(table.standby_leader(), Some("a"));
    assert!(unavailable(table.listener("rw").expect("rw"), &table).contains("standby cluster"));
}

#[test]
fn a_members_drain_is_kept_while_it_is_away() {
    let mut t = topology();
    t.set_admin("c", pglb_routing::AdminState::Drained).expect("c");
    // c leaves Patroni's list and is removed from the served backends.
    let mut without_c = pglb_routing::Topology::config(&t).as_ref().clone();
    let c = without_c.backends.pop().expect("c");
    t.reconfigure(std::sync::Arc::new(without_c.clone()));
    assert!(t.saved().admin.iter().any(|a| a.backend == "c"), "kept in the saved state while away");
    without_c.backends.push(c);
    t.reconfigure(std::sync::Arc::new(without_c));
    assert_eq!(t.table().0.backends[2].admin, pglb_routing::AdminState::Drained);
    // And from a state file, for a member not listed yet.
    let mut fresh = topology();
    let mut bare = fresh.config().as_ref().clone();
    bare.backends.truncate(2);
    fresh.reconfigure(std::sync::Arc::new(bare));
    let saved = SavedState {
        admin: vec![SavedAdmin {
            backend: "c".into(),
            address: "127.0.0.1:5".into(),
            state: pglb_routing::AdminState::Disabled,
        }],
        ..SavedState::default()
    };
    let notes = fresh.restore(saved);
    assert!(notes.iter().any(|n| n.contains("kept until Patroni lists it")), "{notes:?}");
    fresh.reconfigure(topology().config().clone());
    assert_eq!(fresh.table().0.backends[2].admin, pglb_routing::AdminState::Disabled);
}

/// A `nostream` member is fed from the WAL archive: its receiver never
/// streams, which keeps any other replica out of the read pools, not it.
#[test]
fn a_nostream_member_needs_no_streaming_to_serve_reads() {
    use pglb_routing::{Facts, Observation, ObservedRole, Receiver, Wal};
    let mut t = topology();
    let mut v = view(Trust::Lock, Some("a"));
    v.members.get_mut("c").expect("c").tags.insert("nostream".into(), "true".into());
    t.set_patroni(v);
    primary(&mut t, "a", 1, 7);
    let archive_fed = Facts {
        system_id: Some(7),
        wal: Wal { replay: Some(0), ..Wal::default() },
        receiver: Some(Receiver::NotStreaming),
        ..Facts::default()
    };
    for name in ["b", "c"] {
        t.observe(name, Observation::Up { role: ObservedRole::Replica, facts: archive_fed }, std::time::Instant::now());
    }
    let (table, _) = t.table();
    assert_eq!(eligible(&table, "ro"), ["c"], "b does not stream and is no nostream member");
    assert!(table.backends[1].rejoining.is_some());
}
