//! The fleet's rules, without a store: what a cluster's topology task
//! writes, applies and waits for (`pglb_control::fleet`).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use pglb_control::fleet::{Fleet, FleetInput, Request, Stored, WriteOutcome};
use pglb_routing::{AdminState, Facts, ItemKey, ItemValue, NodeKey, Observation, ObservedRole, Topology, Wal};
use tokio::sync::mpsc;

const SYSTEM_ID: u64 = 7;

fn topology() -> Topology {
    let text = "system_identifier: \"7\"
listeners:
  - {name: rw, listen: 127.0.0.1:1, role: primary}
  - {name: ro, listen: 127.0.0.1:2, role: replica}
backends:
  - {name: a, address: 10.0.0.1:5432}
  - {name: b, address: 10.0.0.2:5432}
";
    Topology::new(pglb_config::load_str(Path::new("t.yaml"), text).expect("config").clusters[0].clone())
}

fn up(t: &mut Topology, name: &str, role: ObservedRole, timeline: u32) {
    let wal = Wal { current: Some(100), flush: Some(100), replay: Some(100) };
    let facts = Facts { timeline: Some(timeline), system_id: Some(SYSTEM_ID), wal, ..Facts::default() };
    for _ in 0..3 {
        t.observe(name, Observation::Up { role, facts }, Instant::now());
    }
}

fn rw(t: &mut Topology) -> Vec<String> {
    let (table, _) = t.table();
    let route = table.listener("rw").expect("rw");
    route.eligible.iter().map(|&i| table.backends[i].config.name.clone()).collect()
}

fn admin_b() -> ItemKey {
    ItemKey::Admin(NodeKey::Address("10.0.0.2:5432".into()))
}

fn stored(value: ItemValue, revision: i64, instance: &str) -> Stored {
    Stored { value, revision, instance: instance.into(), at_unix_ms: 0 }
}

/// A fleet link whose store is this test: the requests it sends come out
/// of the receiver.
fn fleet() -> (Fleet, mpsc::UnboundedReceiver<Request>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Fleet::new(tx, "here".into(), Arc::from("default")), rx)
}

fn writes(rx: &mut mpsc::UnboundedReceiver<Request>) -> Vec<(ItemKey, ItemValue, i64)> {
    let mut out = Vec::new();
    while let Ok(request) = rx.try_recv() {
        if let Request::Write { key, value, base, .. } = request {
            out.push((key, value, base));
        }
    }
    out
}

#[test]
fn writes_wait_for_the_first_read_of_the_store() {
    let (mut fleet, _rx) = fleet();
    let mut t = topology();
    up(&mut t, "a", ObservedRole::Primary, 1);
    up(&mut t, "b", ObservedRole::Replica, 1);
    fleet.step(&mut t);
    assert!(rw(&mut t).is_empty(), "writes routed before the fleet's fences are known");
    fleet.input(FleetInput::Reachable(true), &mut t);
    fleet.input(FleetInput::Snapshot { system_id: SYSTEM_ID, items: Vec::new() }, &mut t);
    fleet.step(&mut t);
    assert_eq!(rw(&mut t), ["a"]);
    // Unreachable at start: the state file is the cache, writes flow.
    let (mut fleet, _rx) = self::fleet();
    let mut t = topology();
    up(&mut t, "a", ObservedRole::Primary, 1);
    up(&mut t, "b", ObservedRole::Replica, 1);
    fleet.step(&mut t);
    fleet.input(FleetInput::Reachable(false), &mut t);
    fleet.step(&mut t);
    assert_eq!(rw(&mut t), ["a"]);
}

#[test]
fn a_change_made_while_the_last_is_on_its_way_is_based_on_its_revision() {
    let (mut fleet, mut rx) = fleet();
    let mut t = topology();
    fleet.step(&mut t);
    fleet.input(FleetInput::Reachable(true), &mut t);
    fleet.input(FleetInput::Snapshot { system_id: SYSTEM_ID, items: Vec::new() }, &mut t);
    t.set_admin("b", AdminState::Drained).expect("b");
    fleet.step(&mut t);
    assert_eq!(writes(&mut rx), [(admin_b(), ItemValue::Admin(AdminState::Drained), 0)]);
    // Enabled again before the store answered: nothing sent yet...
    t.set_admin("b", AdminState::Enabled).expect("b");
    fleet.step(&mut t);
    assert!(writes(&mut rx).is_empty());
    // ...then based on the drain's revision, so it is no conflict with
    // our own drain (which would prevail by precedence).
    let done =
        FleetInput::Written { system_id: SYSTEM_ID, key: admin_b(), outcome: WriteOutcome::Done { revision: 5 } };
    fleet.input(done, &mut t);
    assert_eq!(writes(&mut rx), [(admin_b(), ItemValue::Admin(AdminState::Enabled), 5)]);
}

#[test]
fn changes_queued_in_an_outage_meet_the_fleets_by_precedence() {
    let (mut fleet, mut rx) = fleet();
    let mut t = topology();
    fleet.step(&mut t);
    fleet.input(FleetInput::Reachable(true), &mut t);
    let seen = stored(ItemValue::Admin(AdminState::Disabled), 10, "other");
    fleet.input(FleetInput::Snapshot { system_id: SYSTEM_ID, items: vec![(admin_b(), seen)] }, &mut t);
    fleet.step(&mut t);
    assert_eq!(t.shared()[&admin_b()], ItemValue::Admin(AdminState::Disabled), "the fleet's state applied");
    // The store goes away; here b is enabled (queued, based on 10).
    fleet.input(FleetInput::Reachable(false), &mut t);
    t.set_admin("b", AdminState::Enabled).expect("b");
    fleet.step(&mut t);
    assert!(writes(&mut rx).is_empty(), "nothing sent while the store is away");
    // Meanwhile another instance drained it (revision 11). Drain prevails
    // over enable, whatever arrived last.
    fleet.input(FleetInput::Reachable(true), &mut t);
    let theirs = stored(ItemValue::Admin(AdminState::Drained), 11, "other");
    fleet.input(FleetInput::Snapshot { system_id: SYSTEM_ID, items: vec![(admin_b(), theirs)] }, &mut t);
    fleet.step(&mut t);
    assert!(writes(&mut rx).is_empty(), "the stale enable was written");
    assert_eq!(t.shared()[&admin_b()], ItemValue::Admin(AdminState::Drained));
    // Had nobody changed it, the queued change is written on its base.
    t.set_admin("b", AdminState::Disabled).expect("b");
    fleet.step(&mut t);
    assert_eq!(writes(&mut rx), [(admin_b(), ItemValue::Admin(AdminState::Disabled), 11)]);
}

#[test]
fn a_fleet_fence_is_applied_and_local_evidence_clears_it_for_everyone() {
    let (mut fleet, mut rx) = fleet();
    let mut t = topology();
    up(&mut t, "a", ObservedRole::Primary, 1);
    up(&mut t, "b", ObservedRole::Replica, 1);
    fleet.step(&mut t);
    fleet.input(FleetInput::Reachable(true), &mut t);
    let fence_a = ItemKey::Fence(NodeKey::Address("10.0.0.1:5432".into()));
    let items = vec![
        (fence_a.clone(), stored(ItemValue::Fence(Some("timeline 1 is below 2".into())), 20, "other")),
        (ItemKey::Timeline, stored(ItemValue::Timeline { timeline: 2, reset: false }, 19, "other")),
    ];
    fleet.input(FleetInput::Snapshot { system_id: SYSTEM_ID, items }, &mut t);
    fleet.step(&mut t);
    assert!(rw(&mut t).is_empty(), "a, fenced by another pglb, still takes writes here");
    let _ = writes(&mut rx);
    // a is seen as a replica: the fence clears here and in the store.
    up(&mut t, "a", ObservedRole::Replica, 2);
    fleet.step(&mut t);
    assert_eq!(writes(&mut rx), [(fence_a, ItemValue::Fence(None), 20)]);
}

#[test]
fn a_periodic_read_does_not_send_a_write_on_its_way_again() {
    let (mut fleet, mut rx) = fleet();
    let mut t = topology();
    fleet.step(&mut t);
    fleet.input(FleetInput::Reachable(true), &mut t);
    fleet.input(FleetInput::Snapshot { system_id: SYSTEM_ID, items: Vec::new() }, &mut t);
    t.set_admin("b", AdminState::Drained).expect("b");
    fleet.step(&mut t);
    assert_eq!(writes(&mut rx).len(), 1);
    // The periodic read comes back before the store answered the write.
    fleet.input(FleetInput::Snapshot { system_id: SYSTEM_ID, items: Vec::new() }, &mut t);
    assert!(writes(&mut rx).is_empty(), "the write on its way was sent again");
}
