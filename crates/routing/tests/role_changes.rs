//! Role changes that should cost clients nothing: a primary restarting in
//! place is taken back on its first good check and its clients held for
//! it; a demoted primary serves no reads until it streams on the new
//! timeline.

use std::path::Path;
use std::time::{Duration, Instant};

use pglb_routing::{Facts, FailureClass, Observation, ObservedRole, Receiver, RoutingTable, Topology, Wal};

/// rise 3: a backend that was down needs three good checks, unless it is
/// the cluster's own primary coming back from a restart.
fn topology() -> Topology {
    let text = "health: {rise: 3}
listeners:
  - {name: rw, listen: 127.0.0.1:1, role: primary}
  - {name: ro, listen: 127.0.0.1:2, role: replica}
backends:
  - {name: a, address: 127.0.0.1:3}
  - {name: b, address: 127.0.0.1:4}
  - {name: c, address: 127.0.0.1:5}
";
    Topology::new(pglb_config::load_str(Path::new("t.yaml"), text).expect("config").clusters[0].clone())
}

fn primary(t: &mut Topology, name: &str, timeline: u32) {
    let wal = Wal { current: Some(100), flush: Some(100), replay: None };
    let facts = Facts { timeline: Some(timeline), system_id: Some(7), wal, ..Facts::default() };
    t.observe(name, Observation::Up { role: ObservedRole::Primary, facts }, Instant::now());
}

fn replica(t: &mut Topology, name: &str, receiver: Receiver) {
    let wal = Wal { replay: Some(100), ..Wal::default() };
    let facts = Facts { system_id: Some(7), wal, receiver: Some(receiver), ..Facts::default() };
    t.observe(name, Observation::Up { role: ObservedRole::Replica, facts }, Instant::now());
}

fn streaming(timeline: u32) -> Receiver {
    Receiver::Streaming { timeline: Some(timeline) }
}

fn fail(t: &mut Topology, name: &str, class: FailureClass) {
    t.observe(name, Observation::Failed { class, reason: class.as_str().into(), lost: true }, Instant::now());
}

fn eligible<'a>(table: &'a RoutingTable, listener: &str) -> Vec<&'a str> {
    let route = table.listener(listener).expect("listener");
    route.eligible.iter().map(|&i| table.backends[i].config.name.as_str()).collect()
}

fn steady() -> Topology {
    let mut t = topology();
    primary(&mut t, "a", 1);
    replica(&mut t, "b", streaming(1));
    replica(&mut t, "c", streaming(1));
    assert_eq!(eligible(&t.table().0, "rw"), ["a"]);
    t
}

#[test]
fn a_primary_restarting_in_place_serves_on_its_first_good_check() {
    let mut t = steady();
    // kill -9: the kept check connection drops, the reconnect is refused.
    fail(&mut t, "a", FailureClass::Refused);
    let (table, _) = t.table();
    assert!(eligible(&table, "rw").is_empty());
    assert_eq!(table.restarting, Some(0), "rw clients are held for it");
    // Crash recovery: "the database system is starting up".
    fail(&mut t, "a", FailureClass::Shutdown);
    assert_eq!(t.table().0.restarting, Some(0));
    primary(&mut t, "a", 1);
    let (table, _) = t.table();
    assert_eq!(eligible(&table, "rw"), ["a"], "not after rise (3) checks");
    assert_eq!(table.restarting, None);
}

#[test]
fn a_returning_primary_waits_for_rise_when_anything_else_changed() {
    // Another node was primary meanwhile.
    let mut t = steady();
    fail(&mut t, "a", FailureClass::Refused);
    primary(&mut t, "b", 2);
    assert_eq!(t.table().0.restarting, None, "b took over: nothing to hold rw for");
    fail(&mut t, "b", FailureClass::Refused);
    primary(&mut t, "a", 1);
    assert!(eligible(&t.table().0, "rw").is_empty(), "a on the old timeline is not the primary");

    // Back on another timeline (promoted from elsewhere, restored).
    let mut t = steady();
    fail(&mut t, "a", FailureClass::Refused);
    primary(&mut t, "a", 2);
    assert!(eligible(&t.table().0, "rw").is_empty(), "timeline 2 is not the one it left on: rise applies");
    primary(&mut t, "a", 2);
    primary(&mut t, "a", 2);
    assert_eq!(eligible(&t.table().0, "rw"), ["a"]);

    // Silence is not a restart: no longer hold.
    let mut t = steady();
    fail(&mut t, "a", FailureClass::Timeout);
    for _ in 0..3 {
        let silent = Observation::Silent { reason: "timed out".into(), silent_for: Duration::from_secs(60) };
        t.observe("a", silent, Instant::now());
    }
    assert_eq!(t.table().0.restarting, None);
}

#[test]
fn a_demoted_primary_serves_no_reads_until_it_streams_on_the_new_timeline() {
    let mut t = steady();
    // a is frozen, b promoted on timeline 2, c re-pointed to it.
    fail(&mut t, "a", FailureClass::Refused);
    primary(&mut t, "b", 2);
    replica(&mut t, "c", streaming(2));
    assert_eq!(eligible(&t.table().0, "ro"), ["c"]);
    // a restarted as a replica, not rewound: healthy, lag close, receiver
    // not streaming. It must not serve reads (its last writes were
    // discarded by the promotion).
    for _ in 0..3 {
        replica(&mut t, "a", Receiver::NotStreaming);
    }
    let (table, _) = t.table();
    assert_eq!(eligible(&table, "ro"), ["c"]);
    let why = table.backends[0].rejoining.clone().unwrap_or_default();
    assert!(why.contains("timeline 2"), "{why}");
    // Streaming, but the old timeline's history (a failed rewind).
    replica(&mut t, "a", streaming(1));
    assert_eq!(eligible(&t.table().0, "ro"), ["c"]);
    // Rewound and following b.
    replica(&mut t, "a", streaming(2));
    let (table, _) = t.table();
    assert_eq!(eligible(&table, "ro"), ["a", "c"]);
    assert_eq!(table.backends[0].rejoining, None);
}

#[test]
fn a_quick_switchover_back_does_not_leave_the_old_primary_fenced() {
    let mut t = steady();
    // Switchover a → b: a stops, b is promoted; a (down, timeline 1) is fenced.
    fail(&mut t, "a", FailureClass::Shutdown);
    primary(&mut t, "b", 2);
    assert!(t.table().0.backends[0].fenced.is_some());
    // a comes back following b: one answer in recovery clears its fence,
    // before `rise` brings it up.
    replica(&mut t, "a", streaming(2));
    assert!(t.table().0.backends[0].fenced.is_none(), "seen as a replica");
    // Switchover back b → a at once: a is promoted onto timeline 3.
    fail(&mut t, "b", FailureClass::Shutdown);
    for _ in 0..3 {
        primary(&mut t, "a", 3);
    }
    assert_eq!(eligible(&t.table().0, "rw"), ["a"]);

    // Never seen in recovery in between: a promotion past every timeline
    // seen is the newest primary.
    let mut t = steady();
    fail(&mut t, "a", FailureClass::Shutdown);
    primary(&mut t, "b", 2);
    fail(&mut t, "b", FailureClass::Shutdown);
    for _ in 0..3 {
        primary(&mut t, "a", 3);
    }
    let (table, _) = t.table();
    assert!(table.backends[0].fenced.is_none());
    assert_eq!(eligible(&table, "rw"), ["a"]);
    // ...but the old timeline stays fenced.
    let mut t = steady();
    fail(&mut t, "a", FailureClass::Shutdown);
    primary(&mut t, "b", 2);
    primary(&mut t, "a", 1);
    assert!(t.table().0.backends[0].fenced.is_some());
}
