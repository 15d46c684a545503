//! The admin plane is closed by default (README, "Security"): no action
//! changes routing without the token — with none configured, actions are
//! refused, never allowed — on loopback and on a wildcard address, with the
//! example configs of the deploy kit and of the package; an old config
//! without a token still starts and serves; and a flood of half-sent admin
//! requests is bounded while `/health` answers and clients are forwarded.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use pglb_tests::psql::where_am_i;
use pglb_tests::{http, shared_cluster, wait_until, Pglb, Yaml};

const SETTLE: Duration = Duration::from_secs(15);

const ACTIONS: [&str; 5] =
    ["/backends/pg1/drain", "/backends/pg1/disable", "/backends/pg1/enable", "/backends/pg1/unfence", "/upgrade"];

/// An admin section as `file` (an example config) writes it, on a free port
/// and, where the example names a token file, without it: an install that
/// has no token.
fn example_admin(file: &str, port: u16) -> (String, String) {
    let text = std::fs::read_to_string(pglb_tests::docs::root().join(file)).expect("example config");
    let listen = text
        .lines()
        .skip_while(|l| !l.starts_with("admin:"))
        .find_map(|l| l.trim().strip_prefix("listen:"))
        .expect("admin.listen in the example")
        .split('#')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    let host = listen.rsplit_once(':').map(|(h, _)| h.to_owned()).expect("host:port");
    (host, format!("{listen} → port {port}"))
}

fn refused_everywhere(pglb: &Pglb, what: &str) {
    for path in ACTIONS {
        let (code, body) = http::request(pglb.admin, "POST", path, &[]).expect("POST");
        assert_eq!(code, 403, "{what}: POST {path} without a token configured: {body}");
        assert!(body.contains("admin.token_file"), "{what}: the refusal says what to configure: {body}");
        let (code, _) = http::request(pglb.admin, "POST", path, &["Authorization: Bearer anything"]).expect("POST");
        assert_eq!(code, 403, "{what}: no token configured means no token is right");
    }
    let backend = pglb.backend("pg1");
    assert_eq!(backend["admin_state"], "enabled", "{what}: nothing changed: {backend}");
    for path in ["/health", "/metrics", "/status"] {
        assert_eq!(http::get(pglb.admin, path).expect("GET").0, 200, "{what}: GET {path} stays open");
    }
    let refused = pglb.metric("pglb_admin_refused_total", &[("reason", "no_token_configured")]);
    assert!(refused >= (2 * ACTIONS.len()) as f64, "{what}: {refused} refusals counted");
    let log = pglb.log();
    assert!(log.contains("admin request refused"), "{what}: logged: {log}");
}

#[test]
fn without_a_token_no_action_is_allowed_with_either_example_config_and_an_old_config_serves() {
    let cluster = shared_cluster();
    for example in ["deploy/systemd/lb.yaml", "deploy/debian/lb.yaml"] {
        let mut yaml = Yaml::for_cluster(&cluster).without_token().listener("rw", "role: primary");
        let (host, what) = example_admin(example, yaml.admin);
        yaml.admin_host = host;
        let what = format!("{example} (admin {what})");
        let pglb = Pglb::start(&yaml);
        pglb.wait_eligible("rw", &["pg0"], SETTLE);
        // An old config, without credentials, starts and serves clients.
        assert_eq!(where_am_i(pglb.port("rw")), Ok((cluster.primary().port, false)), "{what}");
        refused_everywhere(&pglb, &what);
        // /connections (client addresses) needs the token off loopback.
        let (code, _) = http::get(pglb.admin, "/connections").expect("GET");
        let want = if yaml.admin_host == "127.0.0.1" { 200 } else { 403 };
        assert_eq!(code, want, "{what}: GET /connections");
        // pglb check says so for a non-loopback admin address.
        let out = std::process::Command::new(pglb_tests::pglb::pglb_bin())
            .args(["check", "--config"])
            .arg(&pglb.config)
            .output()
            .expect("pglb check");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{what}: {said}");
        assert_eq!(said.contains("warning: admin.listen"), want == 403, "{what}: {said}");
    }
}

#[test]
fn with_the_token_actions_work_and_without_it_they_do_not() {
    let cluster = shared_cluster();
    let pglb = Pglb::start(&Yaml::for_cluster(&cluster).listener("ro", "role: replica"));
    pglb.wait_eligible("ro", &["pg1", "pg2"], SETTLE);
    assert_eq!(http::request(pglb.admin, "POST", "/backends/pg1/drain", &[]).expect("POST").0, 401);
    let wrong = ["Authorization: Bearer wrong"];
    assert_eq!(http::request(pglb.admin, "POST", "/backends/pg1/drain", &wrong).expect("POST").0, 401);
    assert_eq!(pglb.backend("pg1")["admin_state"], "enabled");
    assert_eq!(pglb.post("/backends/pg1/drain").0, 200);
    assert_eq!(pglb.backend("pg1")["admin_state"], "drained");
    assert_eq!(pglb.post("/backends/pg1/enable").0, 200);
    let refused = pglb.metric("pglb_admin_refused_total", &[("reason", "bad_token")]);
    assert_eq!(refused, 2.0);
}

/// A process's open file descriptors.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn two_thousand_half_sent_admin_requests_are_closed_while_health_answers_and_clients_are_served() {
    const FLOOD: usize = 2000;
    const NOFILE: usize = 1024;
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let cluster = shared_cluster();
    let yaml = Yaml::for_cluster(&cluster).listener("rw", "role: primary");
    let limit = format!("--nofile={NOFILE}:{NOFILE}");
    let pglb = Pglb::start_wrapped(&yaml, &[], &["prlimit", &limit, "--"]);
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    let primary = (cluster.primary().port, false);
    let started = Instant::now();
    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        if let Ok(mut s) = TcpStream::connect(pglb.admin) {
            let _ = s.write_all(b"GET /status HTTP/1.1\r\nHost: pglb\r\n");
            flood.push(s);
        }
    }
    println!("{} of {FLOOD} half-sent requests connected in {:?}", flood.len(), started.elapsed());
    // Throughout: /health answers, clients are forwarded, fds stay bounded.
    let mut most_fds = 0;
    while started.elapsed() < Duration::from_secs(8) {
        let t = Instant::now();
        let health = http::get(pglb.admin, "/health");
        assert!(matches!(health, Ok((200, _))), "/health during the flood: {health:?}");
        assert!(t.elapsed() < Duration::from_secs(2), "/health took {:?}", t.elapsed());
        assert_eq!(where_am_i(pglb.port("rw")), Ok(primary), "a client during the flood");
        most_fds = most_fds.max(fds(pglb.pid()));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(most_fds < NOFILE - 64, "pglb held {most_fds} fds of {NOFILE}");
    // Each half-sent request is closed by the header timeout (or at once
    // over the limit): none is left open.
    let deadline = Instant::now() + Duration::from_secs(15);
    for (i, s) in flood.iter_mut().enumerate() {
        s.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10))))
            .expect("timeout");
        let mut buf = [0u8; 512];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    panic!("half-sent request {i} still open {:?} after it was sent", started.elapsed())
                }
                Err(_) => break,
            }
        }
    }
    println!("all closed {:?} after the flood began; pglb held at most {most_fds} fds", started.elapsed());
    let over = pglb.metric("pglb_admin_refused_total", &[("reason", "over_capacity")]);
    assert!(over > 0.0, "the flood went past the limit: {}", pglb.metrics());
    wait_until("fds back to normal", SETTLE, || {
        let n = fds(pglb.pid());
        if n < 200 {
            Ok(())
        } else {
            Err(format!("{n}"))
        }
    });
}
