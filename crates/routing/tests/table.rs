//! Routing table construction and selection against small configs.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use pglb_config::{load_str, Cluster};
use pglb_routing::{Cursor, Facts, FailureClass, Observation, ObservedRole, RoutingTable, Topology, Wal};

fn config(balance: &str, weights: [u32; 3]) -> Cluster {
    let text = format!(
        "listeners:
  - {{name: rw, listen: 127.0.0.1:5432, role: primary}}
  - {{name: ro, listen: 127.0.0.1:5433, role: replica, fallback: primary, balance: {balance}}}
  - {{name: all, listen: 127.0.0.1:5434, role: any, balance: {balance}}}
backends:
  - {{name: a, address: 127.0.0.1:1, weight: {}}}
  - {{name: b, address: 127.0.0.1:2, weight: {}}}
  - {{name: c, address: 127.0.0.1:3, weight: {}}}
",
        weights[0], weights[1], weights[2]
    );
    Cluster::clone(&load_str(Path::new("test.yaml"), &text).expect("valid config").clusters[0])
}

/// A backend as the checks saw it: healthy or not, with a role.
type Seen = (bool, ObservedRole);

fn state(healthy: bool, role: ObservedRole) -> Seen {
    (healthy, role)
}

/// A table for `config` after one check of each backend (timeline 1, same cluster).
fn table(config: &Cluster, seen: &[Seen]) -> RoutingTable {
    let mut topology = Topology::new(Arc::new(config.clone()));
    for (b, (healthy, role)) in config.backends.iter().zip(seen) {
        // Caught up: the primary at 0/0, replicas replayed all of it.
        let wal = match role {
            ObservedRole::Primary => Wal { current: Some(0), flush: Some(0), replay: None },
            _ => Wal { replay: Some(0), ..Wal::default() },
        };
        let facts = Facts { timeline: Some(1), system_id: Some(7), wal, ..Facts::default() };
        let obs = if *healthy {
            Observation::Up { role: *role, facts }
        } else {
            Observation::Failed { class: FailureClass::Refused, reason: "x".into(), lost: false }
        };
        topology.observe(&b.name, obs, std::time::Instant::now());
    }
    topology.table().0
}

fn names(t: &RoutingTable, listener: &str) -> Vec<String> {
    let route = t.listener(listener).expect("listener");
    route.eligible.iter().map(|&i| t.backends[i].config.name.clone()).collect()
}

#[test]
fn roles_map_to_listeners() {
    let c = config("round_robin", [1, 1, 1]);
    let t = table(
        &c,
        &[state(true, ObservedRole::Primary), state(true, ObservedRole::Replica), state(false, ObservedRole::Replica)],
    );
    assert_eq!(names(&t, "rw"), ["a"]);
    assert_eq!(names(&t, "ro"), ["b"]);
    assert_eq!(names(&t, "all"), ["a", "b"]);
    assert!(!t.listener("ro").expect("ro").via_fallback);
}

#[test]
fn replica_listener_falls_back_to_primary() {
    let c = config("round_robin", [1, 1, 1]);
    let t = table(
        &c,
        &[state(true, ObservedRole::Primary), state(false, ObservedRole::Replica), state(false, ObservedRole::Replica)],
    );
    assert_eq!(names(&t, "ro"), ["a"]);
    assert!(t.listener("ro").expect("ro").via_fallback);
}

#[test]
fn two_primaries_fence_the_primary_listener() {
    let c = config("round_robin", [1, 1, 1]);
    let t = table(
        &c,
        &[state(true, ObservedRole::Primary), state(true, ObservedRole::Primary), state(true, ObservedRole::Replica)],
    );
    assert!(t.split_brain);
    assert!(names(&t, "rw").is_empty());
    assert_eq!(names(&t, "all"), ["c"]);
}

fn spread(balance: &str, weights: [u32; 3], picks: usize) -> HashMap<String, usize> {
    let c = config(balance, weights);
    let t = table(
        &c,
        &[state(true, ObservedRole::Replica), state(true, ObservedRole::Replica), state(true, ObservedRole::Replica)],
    );
    let route = t.listener("ro").expect("ro");
    let cursor = Cursor::default();
    let mut counts = HashMap::new();
    for _ in 0..picks {
        let candidates = route.candidates(&t, &cursor);
        assert_eq!(candidates.len(), 3, "every eligible backend is a candidate");
        let first = candidates[0];
        // Simulate a connection that stays open, so load-aware policies see it.
        t.backends[first].load.open();
        *counts.entry(t.backends[first].config.name.clone()).or_default() += 1;
    }
    counts
}

#[test]
fn round_robin_honours_weights() {
    let counts = spread("round_robin", [1, 2, 3], 600);
    assert_eq!(counts["a"], 100);
    assert_eq!(counts["b"], 200);
    assert_eq!(counts["c"], 300);
}

#[test]
fn least_conn_honours_weights() {
    let counts = spread("least_conn", [1, 1, 2], 400);
    assert_eq!(counts["a"], 100);
    assert_eq!(counts["b"], 100);
    assert_eq!(counts["c"], 200);
}

#[test]
fn random_two_choices_balances_by_weight() {
    let counts = spread("random", [1, 1, 2], 4000);
    // Two choices over open connections keeps the spread tight.
    for (name, expect) in [("a", 1000), ("b", 1000), ("c", 2000)] {
        let got = counts[name] as i64;
        assert!((got - expect).abs() < expect / 10, "{name}: {got} vs {expect}");
    }
}

#[test]
fn round_robin_smooths_weights() {
    let c = config("round_robin", [5, 1, 1]);
    let states =
        [state(true, ObservedRole::Replica), state(true, ObservedRole::Replica), state(true, ObservedRole::Replica)];
    let t = table(&c, &states);
    let route = t.listener("ro").expect("ro");
    let cursor = Cursor::default();
    let order: String = (0..7).map(|_| t.backends[route.candidates(&t, &cursor)[0]].config.name.clone()).collect();
    assert_eq!(order, "aabacaa", "nginx's smooth order, not aaaaabc");
}

/// What a refused client is told: the cause an operator can act on.
mod why_unavailable {
    use super::*;
    use pglb_routing::{unavailable, AdminState};

    fn topology(seen: &[Seen]) -> Topology {
        let c = config("round_robin", [1, 1, 1]);
        let mut topology = Topology::new(Arc::new(c.clone()));
        for (b, (healthy, role)) in c.backends.iter().zip(seen) {
            let facts = Facts { timeline: Some(1), system_id: Some(7), ..Facts::default() };
            let obs = if *healthy {
                Observation::Up { role: *role, facts }
            } else {
                Observation::Failed { class: FailureClass::Refused, reason: "connection refused".into(), lost: false }
            };
            topology.observe(&b.name, obs, std::time::Instant::now());
        }
        topology
    }

    fn why(topology: &mut Topology, listener: &str) -> String {
        let t = topology.table().0;
        let route = t.listener(listener).expect("listener");
        assert!(route.eligible.is_empty(), "{listener} still routes to {:?}", route.eligible);
        unavailable(route, &t)
    }

    #[test]
    fn a_disabled_or_drained_primary_is_named_as_such() {
        let mut t = topology(&[
            state(true, ObservedRole::Primary),
            state(true, ObservedRole::Replica),
            state(true, ObservedRole::Replica),
        ]);
        t.set_admin("a", AdminState::Disabled).expect("disable");
        assert_eq!(why(&mut t, "rw"), "primary \"a\" is disabled by an operator (pglb enable a)");
        t.set_admin("a", AdminState::Drained).expect("drain");
        assert_eq!(why(&mut t, "rw"), "primary \"a\" is drained by an operator (pglb enable a)");
    }

    #[test]
    fn a_down_primary_and_no_primary_at_all_differ() {
        let mut t = topology(&[
            state(false, ObservedRole::Primary),
            state(true, ObservedRole::Replica),
            state(true, ObservedRole::Replica),
        ]);
        // Never seen up: it has no role; nobody answers as primary.
        assert_eq!(why(&mut t, "rw"), "no primary elected: a down, b replica, c replica");
    }

    #[test]
    fn a_primary_that_went_down_is_named_with_its_error() {
        let mut t = topology(&[
            state(true, ObservedRole::Primary),
            state(true, ObservedRole::Replica),
            state(true, ObservedRole::Replica),
        ]);
        for _ in 0..3 {
            let down =
                Observation::Failed { class: FailureClass::Refused, reason: "connection refused".into(), lost: true };
            t.observe("a", down, std::time::Instant::now());
        }
        assert_eq!(why(&mut t, "rw"), "primary \"a\" is down (connection refused)");
    }

    #[test]
    fn a_replica_listener_names_every_replica_and_its_fallback() {
        let mut t = topology(&[
            state(true, ObservedRole::Primary),
            state(true, ObservedRole::Replica),
            state(true, ObservedRole::Replica),
        ]);
        for name in ["a", "b", "c"] {
            t.set_admin(name, AdminState::Disabled).expect("disable");
        }
        assert_eq!(
            why(&mut t, "ro"),
            "primary \"a\" is disabled by an operator (pglb enable a); replica \"b\" is disabled by an operator (pglb enable b); replica \"c\" is disabled by an operator (pglb enable c)"
        );
    }

    #[test]
    fn two_primaries_are_a_split_brain() {
        let mut t = topology(&[
            state(true, ObservedRole::Primary),
            state(true, ObservedRole::Primary),
            state(true, ObservedRole::Replica),
        ]);
        let text = why(&mut t, "rw");
        assert!(text.starts_with("two backends answer as primary (a, b)"), "{text}");
    }
}
