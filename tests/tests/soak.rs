//! Overload soak (about 2.5 minutes; its own test binary, so no other test
//! runs beside it): pgbench TPC-B with 64 clients on rw and select-only with
//! 32 on ro, two CPU-burning processes beside them on this 2-core machine,
//! the database servers held to 0.6 CPU by a CFS quota (as a container at
//! its CPU limit or a VM with CPU steal is: they run 120 ms, then wait 80),
//! and tight checks (interval 500ms, timeout 100ms, fall 2).
//!
//! Asserts that the overload was real (checks timed out), and that pglb
//! turned it into no outage: it closed no session, pgbench saw no client
//! abort, and there was no reconnect storm (at most one check login per
//! backend per minute, counted in the servers' own logs).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pglb_cluster::{Cluster, Node, Spec};
use pglb_tests::fault::Throttle;
use pglb_tests::{Pglb, Yaml};

const SOAK: Duration = Duration::from_secs(120);

/// Processes that burn a CPU each until dropped.
struct Burners(Vec<Child>);

impl Burners {
    fn start(n: usize) -> Self {
        let spawn = || Command::new("sh").args(["-c", "while :; do :; done"]).spawn().expect("spawn a CPU burner");
        Self((0..n).map(|_| spawn()).collect())
    }
}

impl Drop for Burners {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn pgbench(port: u16, args: &[&str]) -> Child {
    Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-n", "-j", "2", "-T"])
        .arg(SOAK.as_secs().to_string())
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .arg("postgres")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run pgbench")
}

/// Check logins recorded in a server's log so far.
fn check_logins(node: &Node) -> usize {
    let log = std::fs::read_to_string(&node.log).unwrap_or_default();
    log.lines().filter(|l| l.contains("connection authorized: user=pglb_check")).count()
}

#[test]
fn two_minutes_of_overload_close_no_session_and_cause_no_login_storm() {
    let spec = Spec {
        tag: "soak".into(),
        replicas: 2,
        settings: vec!["log_connections = on".into(), "max_connections = 250".into()],
        ..Spec::default()
    };
    let cluster = Cluster::start(&spec).expect("cluster");
    pglb_tests::cluster::create_check_users(&cluster);
    let init = Command::new("pgbench")
        .args(["-i", "-q", "-s", "10", "-h", "127.0.0.1", "-U", "postgres", "-p"])
        .arg(cluster.primary().port.to_string())
        .arg("postgres")
        .output()
        .expect("pgbench -i");
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    cluster.primary().sql("CHECKPOINT").expect("checkpoint");
    let yaml = Yaml::for_cluster(&cluster)
        .health("interval: 500ms\n  timeout: 100ms\n  rise: 2\n  fall: 2\n  user: pglb_check\n  sslmode: disable")
        .listener("rw", "role: primary")
        .listener("ro", "role: replica\n    fallback: primary");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("rw", &["pg0"], Duration::from_secs(20));
    pglb.wait_eligible("ro", &["pg1", "pg2"], Duration::from_secs(20));

    let logins_before: Vec<usize> = cluster.nodes.iter().map(check_logins).collect();
    assert!(logins_before.iter().all(|n| *n > 0), "the servers' logs show no check login at all: {logins_before:?}");
    let Some(throttle) = Throttle::nodes(&cluster.nodes, Duration::from_millis(120), Duration::from_millis(200)) else {
        return;
    };
    let burners = Burners::start(2);
    let started = Instant::now();
    let tpcb = pgbench(pglb.port("rw"), &["-c", "64"]);
    let select = pgbench(pglb.port("ro"), &["-S", "-c", "32"]);
    let tpcb = tpcb.wait_with_output().expect("pgbench TPC-B");
    let select = select.wait_with_output().expect("pgbench -S");
    let soaked = started.elapsed();
    drop(burners);
    let throttled = throttle.throttled_periods();
    drop(throttle);

    let timeouts = pglb.metric("pglb_health_check_failures_total", &[("class", "timeout")]);
    let degraded = pglb.log().matches("backend is degraded").count();
    let closed = pglb.metric("pglb_sessions_closed_total", &[]);
    let logins: Vec<usize> =
        cluster.nodes.iter().zip(&logins_before).map(|(n, before)| check_logins(n) - before).collect();
    eprintln!(
        "soak {:.0}s: {throttled} throttled periods, {timeouts} check timeouts, {degraded} degraded transitions, {closed} sessions closed, check logins per node {logins:?}",
        soaked.as_secs_f64()
    );
    for (what, out) in [("TPC-B on rw", &tpcb), ("select-only on ro", &select)] {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let summary: Vec<&str> =
            stdout.lines().filter(|l| l.starts_with("number of") || l.starts_with("tps")).collect();
        eprintln!("{what}: {summary:?}");
        assert!(out.status.success(), "{what}: pgbench failed\n{stdout}\n{stderr}\n{}", pglb.log());
        assert!(!stderr.contains("aborted"), "{what}: a client aborted\n{stderr}");
        assert!(stdout.contains("number of failed transactions: 0 "), "{what}:\n{stdout}");
    }
    assert!(
        timeouts + degraded as f64 > 0.0,
        "no check timed out: the machine was not overloaded, the soak proves nothing"
    );
    assert_eq!(closed, 0.0, "pglb closed sessions under overload:\n{}", pglb.log());
    let minutes = soaked.as_secs() / 60;
    for (node, n) in cluster.nodes.iter().zip(&logins) {
        assert!(*n as u64 <= 1 + minutes, "{}: {n} check logins in {soaked:?}: a reconnect storm", node.name);
    }
}
