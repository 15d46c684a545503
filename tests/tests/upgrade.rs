//! Binary upgrade (`pglb upgrade`) under load: the running pglb starts its
//! (replaced) binary, which takes the listening sockets, the admin socket and
//! the in-memory safety state, and only then accepts; the old process
//! finishes its sessions and exits 0. While clients open a connection every
//! 10 ms and long sessions run through rw and ro, nothing is refused or
//! reset; a client queued in the old process is served by it, not refused.
//! A failed upgrade (a bad config, a binary that exits at start) leaves the
//! old process serving, just as quietly.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pglb_cluster::{Cluster, Spec};
use pglb_tests::pglb::{upgrade, upgraded_pid, Binary};
use pglb_tests::proc::KillOnDrop;
use pglb_tests::{shared_cluster, wait_until, wire, Pglb, Yaml};

const SETTLE: Duration = Duration::from_secs(20);

/// New connections every 10 ms, alternating rw and ro, each a login, a
/// query and a Terminate, on threads of their own so a slow one does not
/// lower the rate.
struct Load {
    stop: Arc<AtomicBool>,
    opener: Option<JoinHandle<()>>,
    results: mpsc::Receiver<Result<(), String>>,
}

impl Load {
    fn start(ports: [u16; 2]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, results) = mpsc::channel();
        let flag = stop.clone();
        let opener = std::thread::spawn(move || {
            let mut n = 0usize;
            let mut clients = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let (port, tx) = (ports[n % 2], tx.clone());
                clients.push(std::thread::spawn(move || {
                    let _ = tx.send(one_client(port));
                }));
                n += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            for client in clients {
                let _ = client.join();
            }
        });
        Self { stop, opener: Some(opener), results }
    }

    /// Stops opening connections; returns (attempted, failures).
    fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(opener) = self.opener.take() {
            let _ = opener.join();
        }
        let all: Vec<Result<(), String>> = self.results.try_iter().collect();
        let failures = all.iter().filter_map(|r| r.as_ref().err().cloned()).collect();
        (all.len(), failures)
    }
}

fn one_client(port: u16) -> Result<(), String> {
    let mut s = wire::login(port).map_err(|e| format!("port {port}: login: {e}"))?;
    let one = wire::scalar(&mut s, "SELECT 1").map_err(|e| format!("port {port}: query: {e}"))?;
    if one != "1" {
        return Err(format!("port {port}: SELECT 1 answered {one}"));
    }
    wire::terminate(s);
    Ok(())
}

/// A session that runs a query every 50 ms for `secs` seconds; returns how
/// many succeeded, or the first error.
fn long_session(port: u16, secs: u64) -> JoinHandle<Result<usize, String>> {
    std::thread::spawn(move || {
        let mut s = wire::login(port).map_err(|e| format!("port {port}: login: {e}"))?;
        let until = Instant::now() + Duration::from_secs(secs);
        let mut done = 0;
        while Instant::now() < until {
            let got = wire::scalar(&mut s, "SELECT pg_backend_pid()").map_err(|e| format!("port {port}: {e}"))?;
            got.parse::<u32>().map_err(|_| format!("port {port}: {got}"))?;
            done += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        wire::terminate(s);
        Ok(done)
    })
}

fn ports(pglb: &Pglb) -> [u16; 2] {
    [pglb.port("rw"), pglb.port("ro")]
}

#[test]
fn an_upgrade_under_load_refuses_nothing_and_carries_fences_and_drains_over() {
    let cluster = shared_cluster();
    // Another cluster behind a backend's address: fenced (system identifier)
    // while it answers; stopped before the upgrade, so the new process can
    // only know the fence from the old one (no state file in this config).
    let other =
        Cluster::start(&Spec { tag: "upgrade-other".into(), replicas: 0, ..Spec::default() }).expect("other cluster");
    pglb_tests::cluster::create_check_users_on(&other, 0);
    let mut yaml = Yaml::for_cluster(&cluster)
        .listener("rw", "role: primary")
        .listener("ro", "role: replica")
        .top("shutdown_timeout: 20s");
    yaml.backends.push(("stranger".into(), format!("address: {}", other.primary().address())));
    let binary = Binary::copy("load");
    let mut old = Pglb::start_binary(&yaml, &[], &binary.path);
    wait_until("the stranger fenced", SETTLE, || match old.backend("stranger")["fence_kind"].as_str() {
        Some("system_identifier") => Ok(()),
        _ => Err(old.backend("stranger").to_string()),
    });
    drop(other);
    old.wait_state("stranger", "down", SETTLE);
    let (code, body) = old.post("/backends/pg2/drain");
    assert_eq!(code, 200, "{body}");
    old.wait_eligible("ro", &["pg1"], SETTLE);

    let load = Load::start(ports(&old));
    let long: Vec<_> = [old.port("rw"), old.port("ro"), old.port("rw"), old.port("ro")]
        .into_iter()
        .map(|port| long_session(port, 6))
        .collect();
    // Half a second of load through the old process alone.
    std::thread::sleep(Duration::from_millis(500));
    binary.replace_with(pglb_tests::pglb::pglb_bin());
    let (code, out, err) = upgrade(&old.config);
    assert_eq!(code, 0, "pglb upgrade failed: {out}{err}\n{}", old.log());
    let pid = upgraded_pid(&out).unwrap_or_else(|| panic!("no pid in `{out}`"));
    let new = KillOnDrop(pid);
    assert_ne!(pid, old.pid());
    // Load through the new process alone, too.
    std::thread::sleep(Duration::from_millis(500));
    let sessions: Vec<Result<usize, String>> =
        long.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("panicked".into()))).collect();
    let (attempted, failures) = load.finish();
    println!(
        "upgrade under load: {attempted} connections attempted, {} refused or failed; {} of {} long sessions completed ({:?} queries each)",
        failures.len(),
        sessions.iter().filter(|s| s.is_ok()).count(),
        sessions.len(),
        sessions
    );
    assert!(failures.is_empty(), "{} of {attempted} connections failed: {failures:?}\n{}", failures.len(), old.log());
    assert!(attempted >= 100, "only {attempted} connections attempted");
    for s in &sessions {
        assert!(s.as_ref().is_ok_and(|n| *n > 20), "a long session did not complete: {sessions:?}\n{}", old.log());
    }

    // The old process exits 0 once its sessions are done; the new one serves.
    assert_eq!(old.wait_exit(Duration::from_secs(30)), Some(0), "{}", old.log());
    assert!(pglb_tests::proc::running(new.0), "the new pglb is gone:\n{}", old.log());
    let status = old.status();
    assert_ne!(status["pid"], serde_json::json!(old.pid()));
    let stranger = pglb_tests::pglb::named(&status["backends"], "stranger");
    assert_eq!(stranger["fence_kind"], "system_identifier", "fence carried over: {stranger}");
    let pg2 = pglb_tests::pglb::named(&status["backends"], "pg2");
    assert_eq!(pg2["admin_state"], "drained", "drain carried over: {pg2}");
    old.wait_eligible("ro", &["pg1"], SETTLE);
    one_client(old.port("rw")).expect("rw through the new pglb");
    let log = old.log();
    assert!(log.contains("restored from the running pglb: pg2: drained"), "{log}");
    assert!(log.contains("restored from the running pglb: stranger: fenced"), "{log}");
}

#[test]
fn a_failed_upgrade_leaves_the_old_pglb_serving() {
    let cluster = shared_cluster();
    let yaml = Yaml::for_cluster(&cluster).listener("rw", "role: primary").listener("ro", "role: replica");
    let binary = Binary::copy("failed");
    let old = Pglb::start_binary(&yaml, &[], &binary.path);
    old.wait_eligible("ro", &["pg1", "pg2"], SETTLE);
    let load = Load::start(ports(&old));

    // A config the new process rejects: it exits at start.
    let good = std::fs::read_to_string(&old.config).expect("config");
    std::fs::write(&old.config, good.replace("interval: 500ms", "interval: 500xs")).expect("break the config");
    let (code, out, err) = upgrade(&old.config);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("upgrade failed") && err.contains("check --config") && err.contains("(exit status: 1)"),
        "{err}"
    );
    assert!(err.contains("health.interval: invalid duration"), "pglb upgrade prints the new binary's error: {err}");
    assert!(err.contains("this pglb keeps serving"), "{err}");
    std::fs::write(&old.config, &good).expect("restore the config");

    // A binary that exits at once.
    binary.replace_with_script("#!/bin/sh\nexit 3\n");
    let (code, _, err) = upgrade(&old.config);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("check --config") && err.contains("(exit status: 3)"), "{err}");

    std::thread::sleep(Duration::from_millis(300));
    let (attempted, failures) = load.finish();
    println!("failed upgrades under load: {attempted} connections attempted, {} refused or failed", failures.len());
    assert!(failures.is_empty(), "{} of {attempted} connections failed: {failures:?}\n{}", failures.len(), old.log());
    assert!(attempted >= 20, "only {attempted} connections attempted");
    // Still the same process, serving, on both listeners and the admin endpoint.
    let (code, _) = pglb_tests::http::get(old.admin, "/health").expect("GET /health");
    assert_eq!(code, 200);
    assert_eq!(old.status()["pid"], serde_json::json!(old.pid()));
    let log = old.log();
    assert_eq!(log.matches("upgrade failed:").count(), 2, "{log}");
    assert!(log.contains("health.interval: invalid duration"), "the new binary's own error is in the log: {log}");
}

#[test]
fn the_old_process_serves_its_queued_client_after_the_hand_over() {
    let cluster = shared_cluster();
    let mut yaml = Yaml::for_cluster(&cluster).listener("rw", "role: primary\n    queue_timeout: 20s");
    yaml.backends[0].1.push_str("\n    max_connections: 1");
    let binary = Binary::copy("queued");
    let mut old = Pglb::start_binary(&yaml, &[], &binary.path);
    old.wait_eligible("rw", &["pg0"], SETTLE);
    let first = wire::login(old.port("rw")).expect("the one place on pg0");
    let mut queued = wire::start_up(old.port("rw")).expect("a second client, queued");
    wait_until("the second client queued", SETTLE, || match old.listener("rw")["clients_queued"].as_u64() {
        Some(1) => Ok(()),
        other => Err(format!("{other:?}")),
    });

    let (code, out, err) = upgrade(&old.config);
    assert_eq!(code, 0, "{out}{err}");
    let pid = upgraded_pid(&out).unwrap_or_else(|| panic!("no pid in `{out}`"));
    let _new = KillOnDrop(pid);
    // The place frees up in the old process: its queued client gets it,
    // rather than 57P01 (a shutdown would refuse it).
    wire::terminate(first);
    loop {
        let (tag, body) = wire::read_message(&mut queued).expect("an answer for the queued client");
        assert_ne!(tag, b'E', "the queued client was refused: {}", String::from_utf8_lossy(&body));
        if tag == b'Z' {
            break;
        }
    }
    assert_eq!(wire::scalar(&mut queued, "SELECT 1").as_deref(), Ok("1"));
    wire::terminate(queued);
    assert_eq!(old.wait_exit(Duration::from_secs(20)), Some(0), "{}", old.log());
}

/// `/usr/local/bin/pglb → /opt/pglb/1.2/pglb`: the operator installs 1.3
/// beside it, re-points the link and runs `pglb upgrade`. The new process
/// runs what the link names now, not the binary the old one resolved at
/// start.
#[test]
fn a_symlinked_install_upgrades_to_the_links_new_target() {
    let cluster = shared_cluster();
    let yaml = Yaml::for_cluster(&cluster).listener("rw", "role: primary");
    let (v1, v2) = (Binary::copy("link-v1"), Binary::copy("link-v2"));
    let link = v1.dir.join("current");
    std::os::unix::fs::symlink(&v1.path, &link).expect("link to v1");
    let mut old = Pglb::start_binary(&yaml, &[], &link);
    old.wait_eligible("rw", &["pg0"], SETTLE);
    let next = v1.dir.join("current.next");
    std::os::unix::fs::symlink(&v2.path, &next).expect("link to v2");
    std::fs::rename(&next, &link).expect("re-point the link");
    let (code, out, err) = upgrade(&old.config);
    assert_eq!(code, 0, "pglb upgrade failed: {out}{err}\n{}", old.log());
    let pid = upgraded_pid(&out).unwrap_or_else(|| panic!("no pid in `{out}`"));
    let _new = KillOnDrop(pid);
    let runs = std::fs::read_link(format!("/proc/{pid}/exe")).expect("the new process's binary");
    assert_eq!(runs, v2.path, "the new pglb runs {}, not the link's new target", runs.display());
    assert_eq!(old.wait_exit(Duration::from_secs(30)), Some(0), "{}", old.log());
    one_client(old.port("rw")).expect("rw through the new pglb");
}

/// The old process's final state replaces what it handed over first: an
/// `enable` done in it while the new one makes its first checks is not
/// lost. A backend that accepts and never answers keeps the new process's
/// first checks (and so the hand-over) open for the health timeout, 3 s.
#[test]
fn an_enable_during_the_hand_over_is_not_lost() {
    let cluster = shared_cluster();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the silent backend");
    let silent_addr = silent.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in silent.incoming() {
            held.push(conn);
        }
    });
    let mut yaml = Yaml::for_cluster(&cluster).listener("rw", "role: primary").listener("ro", "role: replica");
    yaml.health = yaml.health.replace("interval: 500ms\n  timeout: 500ms", "interval: 3s\n  timeout: 3s");
    yaml.backends.push(("silent".into(), format!("address: {silent_addr}")));
    let binary = Binary::copy("enable");
    let old = Pglb::start_binary(&yaml, &[], &binary.path);
    old.wait_eligible("ro", &["pg1", "pg2"], SETTLE);
    assert_eq!(old.post("/backends/pg2/drain").0, 200);
    old.wait_eligible("ro", &["pg1"], SETTLE);

    let config = old.config.clone();
    let upgrading = std::thread::spawn(move || upgrade(&config));
    wait_until("the new pglb took the sockets", SETTLE, || {
        if old.log().contains("took the listening sockets from the running pglb") {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    // The old process still answers the admin endpoint until `ready`.
    assert_eq!(old.status()["pid"], serde_json::json!(old.pid()), "the enable must reach the old process");
    assert_eq!(old.post("/backends/pg2/enable").0, 200);
    let (code, out, err) = upgrading.join().expect("pglb upgrade");
    assert_eq!(code, 0, "pglb upgrade failed: {out}{err}\n{}", old.log());
    let pid = upgraded_pid(&out).unwrap_or_else(|| panic!("no pid in `{out}`"));
    let _new = KillOnDrop(pid);
    assert_eq!(old.status()["pid"], serde_json::json!(pid));
    let status = old.status();
    let pg2 = pglb_tests::pglb::named(&status["backends"], "pg2");
    assert_eq!(pg2["admin_state"], "enabled", "the enable done during the hand-over was lost: {pg2}\n{}", old.log());
    old.wait_eligible("ro", &["pg1", "pg2"], SETTLE);
}

/// A replica held out of ro because it follows no primary stays out
/// through an upgrade: the "not following since" clock and the lag gate go
/// with the final state. (Before, the new process started the clock at
/// zero and routed ro to it again for up to `max_lag_seconds`.) Own
/// cluster: the replica is cut from its primary.
#[test]
fn a_replica_held_out_for_lag_stays_out_through_an_upgrade() {
    let cluster = Cluster::start(&Spec { tag: "upgrade-lag".into(), replicas: 1, ..Spec::default() }).expect("cluster");
    pglb_tests::cluster::create_check_users(&cluster);
    let yaml = Yaml::for_cluster(&cluster).listener("ro", "role: replica\n    max_lag_seconds: 10s");
    let binary = Binary::copy("lag");
    let old = Pglb::start_binary(&yaml, &[], &binary.path);
    old.wait_eligible("ro", &["pg1"], SETTLE);
    // The replica stops following: no WAL receiver.
    cluster.nodes[1].sql("ALTER SYSTEM SET primary_conninfo = ''").expect("cut the replica");
    cluster.nodes[1].sql("SELECT pg_reload_conf()").expect("reload");
    old.wait_eligible("ro", &[], Duration::from_secs(40));
    let (code, out, err) = upgrade(&old.config);
    assert_eq!(code, 0, "pglb upgrade failed: {out}{err}\n{}", old.log());
    let pid = upgraded_pid(&out).unwrap_or_else(|| panic!("no pid in `{out}`"));
    let _new = KillOnDrop(pid);
    // The new process's first seconds: its own clock would still be under 10 s.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let status = old.status();
        if status["pid"] == serde_json::json!(pid) {
            assert!(old.eligible("ro").is_empty(), "the new pglb routes ro to the cut replica:\n{}", old.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(old.status()["pid"], serde_json::json!(pid));
}

/// During the overlap the old process still serves the sessions it had; a
/// `disable` (answered by the new process) closes the old process's
/// sessions on that backend too, as it would in one process, and leaves
/// its sessions on other backends alone. (Before, they lived on until
/// `shutdown_timeout`.)
#[test]
fn a_disable_during_the_overlap_closes_the_old_processs_sessions_on_that_backend() {
    let cluster = shared_cluster();
    let yaml = Yaml::for_cluster(&cluster)
        .top("shutdown_timeout: 60s")
        .listener("rw", "role: primary")
        .listener("ro", "role: replica");
    let binary = Binary::copy("overlap");
    let mut old = Pglb::start_binary(&yaml, &[], &binary.path);
    old.wait_eligible("ro", &["pg1", "pg2"], SETTLE);
    let mut on_primary = wire::login(old.port("rw")).expect("a session on pg0");
    let mut on_replica = wire::login(old.port("ro")).expect("a session on a replica");
    let (code, out, err) = upgrade(&old.config);
    assert_eq!(code, 0, "pglb upgrade failed: {out}{err}\n{}", old.log());
    let pid = upgraded_pid(&out).unwrap_or_else(|| panic!("no pid in `{out}`"));
    let _new = KillOnDrop(pid);
    assert_eq!(old.status()["pid"], serde_json::json!(pid), "the new process answers the admin endpoint");
    assert_eq!(old.post("/backends/pg0/disable").0, 200);
    wire::wait_closed(&mut on_primary, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("the old process's session on pg0: {e}\n{}", old.log()));
    assert_eq!(wire::scalar(&mut on_replica, "SELECT 1").as_deref(), Ok("1"), "a session on another backend");
    // Logged once the old process's topology answered, which may be after
    // its enforcement closed the session.
    wait_until("the old process logs the overlap's admin state", SETTLE, || {
        let log = old.log();
        if log.contains("applied to this process's sessions too") {
            Ok(())
        } else {
            Err(log)
        }
    });
    wire::terminate(on_replica);
    assert_eq!(old.wait_exit(Duration::from_secs(20)), Some(0), "{}", old.log());
}
