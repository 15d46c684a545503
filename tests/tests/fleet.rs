//! A fleet of pglb instances sharing operators' decisions and fencing
//! evidence through a real etcd (Debian's `etcd-server`, three members on
//! loopback, authentication on: pglb logs in as a user whose role may only
//! touch its prefix):
//!
//! - a drain on A is honoured by B and C (median and max propagation over
//!   100 changes), an enable on C by A and B, and the origin is shown;
//! - one etcd member killed: changes still propagate; every member killed:
//!   every pglb keeps serving, changes made meanwhile are queued locally and
//!   reconcile by precedence (disable > drain) when etcd returns;
//! - a timeline fence learned by A holds on B after B restarts while the
//!   new primary is down, and clears everywhere once the old primary
//!   rejoins as a replica.

use std::process::Command;
use std::time::{Duration, Instant};

use pglb_cluster::{Cluster, Spec};
use pglb_tests::cluster::create_check_users;
use pglb_tests::etcd::Etcd;
use pglb_tests::pglb::named;
use pglb_tests::pglb::pglb_bin;
use pglb_tests::psql::where_am_i;
use pglb_tests::{shared_cluster, wait_until, Pglb, Yaml};
use serde_json::Value;

const SETTLE: Duration = Duration::from_secs(20);
const ETCD_USER: &str = "pglb";
const ETCD_PASSWORD: &str = "fleet-secret-1";

/// Turns on etcd authentication with a `root` user and a `pglb` user whose
/// role may read and write `prefix` only (what the README asks for).
fn enable_auth(etcd: &Etcd, prefix: &str) {
    for args in [
        vec!["user", "add", "root:root-secret"],
        vec!["role", "add", "pglb"],
        vec!["role", "grant-permission", "pglb", "--prefix=true", "readwrite", prefix],
        vec!["user", "add", &format!("{ETCD_USER}:{ETCD_PASSWORD}")],
        vec!["user", "grant-role", ETCD_USER, "pglb"],
        vec!["auth", "enable"],
    ] {
        etcd.ctl(&args).unwrap_or_else(|e| panic!("etcdctl {args:?}: {e}"));
    }
}

/// A config for instance `id` of the fleet: rw and ro listeners over
/// `nodes`, the fleet's store, a state file of its own.
fn member_yaml(nodes: &[pglb_cluster::Node], etcd: &Etcd, id: &str, prefix: &str, extra: &str) -> Yaml {
    Yaml::for_nodes(nodes)
        .listener("rw", "role: primary\n    hold_timeout: 2s")
        .listener("ro", "role: replica")
        .file("etcd-password", &format!("{ETCD_PASSWORD}\n"))
        .top(&format!(
            "state_file: state.json\n{extra}shared_state:\n  instance_id: {id}\n  sync_interval: 1s\n  etcd:\n    endpoints: {}\n    prefix: {prefix}\n    user: {ETCD_USER}\n    password_file: etcd-password\n    timeout: 1s",
            etcd.endpoints_yaml()
        ))
}

fn admin_state(pglb: &Pglb, backend: &str) -> String {
    pglb.backend(backend)["admin_state"].as_str().unwrap_or_default().to_owned()
}

/// The cluster's shared state on `pglb` (`/status` `fleet`).
fn fleet(pglb: &Pglb) -> Value {
    pglb.status()["fleet"].clone()
}

fn wait_synced(pglb: &Pglb) {
    wait_until("the fleet's items read", SETTLE, || {
        let status = pglb.status();
        match (status["shared_state"]["reachable"].as_bool(), status["fleet"]["synced"].as_bool()) {
            (Some(true), Some(true)) => Ok(()),
            _ => Err(format!("{}\n{}", status["shared_state"], status["fleet"])),
        }
    });
}

fn wait_admin(pglb: &Pglb, backend: &str, want: &str, within: Duration) {
    wait_until(&format!("{backend} {want}"), within, || match admin_state(pglb, backend) {
        state if state == want => Ok(()),
        state => Err(format!("{state}\n{}", fleet(pglb))),
    });
}

fn post_ok(pglb: &Pglb, path: &str) -> Value {
    let (code, body) = pglb.post(path);
    assert_eq!(code, 200, "POST {path}: {body}");
    serde_json::from_str(&body).expect("JSON answer")
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Sessions through `port` answer (and from a replica, for ro).
fn serves(port: u16) -> Result<(), String> {
    where_am_i(port).map(|_| ())
}

#[test]
fn a_fleet_shares_drains_and_enables_and_survives_etcd_outages() {
    let Some(mut etcd) = Etcd::start(3) else { return };
    let prefix = "/pglb-fleet/";
    enable_auth(&etcd, prefix);
    let cluster = shared_cluster();
    let start = |id: &str| Pglb::start(&member_yaml(&cluster.nodes, &etcd, id, prefix, ""));
    let (a, b, c) = (start("A"), start("B"), start("C"));
    for p in [&a, &b, &c] {
        wait_synced(p);
        p.wait_eligible("ro", &["pg1", "pg2"], SETTLE);
    }

    // 100 changes on A, alternately drain and enable: how long until both
    // B and C show each.
    let mut samples = Vec::new();
    for i in 0..100 {
        let (action, want) = if i % 2 == 0 { ("drain", "drained") } else { ("enable", "enabled") };
        let started = Instant::now();
        let answer = post_ok(&a, &format!("/backends/pg1/{action}"));
        assert_eq!(answer["shared_state"], "sent to the fleet (etcd)", "{answer}");
        let mut seen = [false, false];
        while !seen.iter().all(|s| *s) {
            for (k, p) in [&b, &c].into_iter().enumerate() {
                seen[k] |= admin_state(p, "pg1") == want;
            }
            assert!(started.elapsed() < SETTLE, "change {i} ({action}) not seen on B and C: {seen:?}\n{}", fleet(&b));
        }
        samples.push(started.elapsed());
    }
    let (med, max) = (median(samples.clone()), samples.iter().copied().max().unwrap_or_default());
    println!("propagation A → B and C over 100 changes: median {med:?}, max {max:?}");
    assert!(med < Duration::from_secs(1), "median propagation {med:?}");
    assert!(max < Duration::from_secs(5), "max propagation {max:?}");

    // A drain on A: B and C stop giving pg1 new ro clients.
    post_ok(&a, "/backends/pg1/drain");
    for p in [&b, &c] {
        p.wait_eligible("ro", &["pg2"], SETTLE);
    }
    let pg2 = cluster.nodes[2].port;
    for _ in 0..6 {
        assert_eq!(where_am_i(b.port("ro")).expect("a session through B").0, pg2, "B sent a client to drained pg1");
    }
    // Who set it, and when, on every instance.
    assert_eq!(b.backend("pg1")["admin_origin"]["instance"], "A", "{}", b.backend("pg1"));
    // Enable on C: A and B follow.
    post_ok(&c, "/backends/pg1/enable");
    for p in [&a, &b] {
        wait_admin(p, "pg1", "enabled", SETTLE);
        p.wait_eligible("ro", &["pg1", "pg2"], SETTLE);
    }
    assert_eq!(a.backend("pg1")["admin_origin"]["instance"], "C");
    let shown = Command::new(pglb_bin()).args(["status", "--config"]).arg(&a.config).output().expect("pglb status");
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains("shared state: etcd http://127.0.0.1:") && text.contains("enabled (C, "), "{text}");

    // One member killed: still shared.
    etcd.kill(0);
    post_ok(&b, "/backends/pg2/drain");
    for p in [&a, &c] {
        wait_admin(p, "pg2", "drained", SETTLE);
    }

    // Every member killed: every pglb serves on, and says so.
    etcd.kill(1);
    etcd.kill(2);
    for p in [&a, &b, &c] {
        wait_until("etcd seen unreachable", SETTLE, || match p.status()["shared_state"]["reachable"].as_bool() {
            Some(false) => Ok(()),
            other => Err(format!("{other:?}")),
        });
        assert_eq!(p.metric("pglb_shared_state_up", &[]), 0.0);
        serves(p.port("rw")).expect("rw serves while etcd is down");
        serves(p.port("ro")).expect("ro serves while etcd is down");
    }
    // Changes meanwhile: queued locally, applied locally.
    // From the control command, as an operator would.
    let on_a = Command::new(pglb_bin()).args(["disable", "pg1", "--config"]).arg(&a.config).output().expect("pglb");
    let said = String::from_utf8_lossy(&on_a.stdout);
    assert!(on_a.status.success() && said.contains("admin state is now disabled; queued locally"), "{said}");
    let on_b = post_ok(&b, "/backends/pg1/drain");
    assert!(on_b["shared_state"].as_str().unwrap_or_default().starts_with("queued locally"), "{on_b}");
    assert_eq!((admin_state(&a, "pg1"), admin_state(&b, "pg1")), ("disabled".into(), "drained".into()));
    assert_eq!(a.metric("pglb_shared_state_pending_changes", &[("cluster", "default")]), 1.0);
    // etcd returns: the rules decide, not the order of arrival.
    etcd.restart_all();
    for p in [&a, &b, &c] {
        wait_synced(p);
        wait_admin(p, "pg1", "disabled", SETTLE);
        wait_admin(p, "pg2", "drained", SETTLE);
    }
    let conflicts: f64 = [&a, &b].iter().map(|p| fleet(p)["conflicts"].as_f64().unwrap_or(0.0)).sum();
    assert!(conflicts >= 1.0, "the concurrent drain and disable were not seen as a conflict");
    assert!(a.log().contains("shared state conflict") || b.log().contains("shared state conflict"));
    for p in [&a, &b, &c] {
        assert!(fleet(p)["pending"].as_array().is_some_and(Vec::is_empty), "{}", fleet(p));
    }
}

#[test]
fn a_timeline_fence_one_pglb_learned_holds_on_another_that_restarts() {
    let _alone = pglb_tests::exclusive();
    let Some(etcd) = Etcd::start(1) else { return };
    let prefix = "/pglb-fence/";
    enable_auth(&etcd, prefix);
    let spec = Spec { tag: "fleet".into(), replicas: 1, ..Spec::default() };
    let cluster = Cluster::start(&spec).expect("start a cluster");
    create_check_users(&cluster);
    let (n0, n1) = (&cluster.nodes[0], &cluster.nodes[1]);
    let system_id = n0.sql("SELECT system_identifier FROM pg_control_system()").expect("system identifier");
    let pinned = format!("system_identifier: \"{}\"\n", system_id.trim());
    let yaml_a = member_yaml(&cluster.nodes, &etcd, "A", prefix, &pinned);
    let yaml_b = member_yaml(&cluster.nodes, &etcd, "B", prefix, &pinned);
    let a = Pglb::start(&yaml_a);
    let mut b = Pglb::start(&yaml_b);
    for p in [&a, &b] {
        wait_synced(p);
        p.wait_eligible("rw", &["pg0"], SETTLE);
    }
    // B stops; n1 is promoted while n0 still runs as primary: A alone
    // sees the higher timeline and fences n0.
    b.signal("TERM");
    b.wait_exit(SETTLE).expect("B stops");
    n1.promote().expect("promote n1");
    wait_until("A fences pg0", SETTLE, || match a.backend("pg0")["fence_kind"].as_str() {
        Some("timeline") => Ok(()),
        other => Err(format!("{other:?}\n{}", a.backend("pg0"))),
    });
    a.wait_eligible("rw", &["pg1"], SETTLE);
    // The new primary goes down; B starts again on its own state file,
    // which knows nothing of the promotion.
    n1.stop("immediate");
    let b = Pglb::start(&yaml_b);
    wait_synced(&b);
    wait_until("B applies A's fence", SETTLE, || match b.backend("pg0")["fence_kind"].as_str() {
        Some("timeline") => Ok(()),
        other => Err(format!("{other:?}\n{}", b.backend("pg0"))),
    });
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(3) {
        let rw = named(&b.status()["listeners"], "rw")["backends"].clone();
        assert_eq!(rw, serde_json::json!([]), "B routes writes to the fenced old primary");
    }
    assert!(where_am_i(b.port("rw")).is_err(), "a write session reached the old primary through B");
    let items = fleet(&b)["items"].clone();
    let fence =
        items.as_array().and_then(|i| i.iter().find(|i| i["item"].as_str().is_some_and(|k| k.starts_with("fence/"))));
    assert_eq!(fence.map(|f| f["instance"].clone()), Some("A".into()), "{items}");

    // n1 returns; n0 is rebuilt as its replica: the fence clears on both.
    n1.start().expect("start n1");
    cluster.rebuild_replica(n0, n1).expect("rebuild n0 as a replica");
    for p in [&a, &b] {
        wait_until("pg0's fence cleared", Duration::from_secs(60), || match p.backend("pg0")["fenced"].as_bool() {
            Some(false) => Ok(()),
            other => Err(format!("{other:?}\n{}", p.backend("pg0"))),
        });
        p.wait_eligible("rw", &["pg1"], SETTLE);
    }
    let shown = etcd.ctl(&["--user", "root:root-secret", "get", "--prefix", prefix]).expect("etcdctl get");
    assert!(shown.contains("\"fenced\":false"), "{shown}");
}
