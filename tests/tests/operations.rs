//! Operating pglb the way an operator does, on one shared cluster (nothing
//! here stops a PostgreSQL node): SIGHUP reload (applied whole or not at
//! all, no health flap; listener limits and gauges keep counting sessions
//! from before it), graceful shutdown on SIGTERM, admin actions over
//! HTTP, the connection log in text and JSON with `/connections`, client
//! allow lists, and an accept storm under a tiny fd limit.

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pglb_cluster::Cluster;
use pglb_tests::proc::{cpu_seconds, fd_count, fd_targets};
use pglb_tests::psql::{psql, where_am_i};
use pglb_tests::wire::{scalar, terminate, wait_closed};
use pglb_tests::{http, shared_cluster, wait_until, wire, Pglb, Yaml};
use serde_json::Value;

const SETTLE: Duration = Duration::from_secs(15);

/// The fields of every `connection closed` line (target `pglb::connection`).
const CONNECTION_FIELDS: [&str; 8] = [
    "client",
    "listener",
    "backend",
    "backend_local_port",
    "duration_s",
    "bytes_client_to_backend",
    "bytes_backend_to_client",
    "end",
];

// ---------------------------------------------------------------- helpers

/// The value of one Prometheus series (`name{labels}` exactly as rendered).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

fn wait_metric(pglb: &Pglb, series: &str, want: f64) {
    wait_until(&format!("{series} to be {want}"), SETTLE, || {
        let m = pglb.metrics();
        match metric(&m, series) {
            Some(v) if v == want => Ok(()),
            got => Err(format!("{got:?}\n{}", pglb.log())),
        }
    });
}

fn sha256_hex(path: &std::path::Path) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(std::fs::read(path).expect("read config")))
}

fn config_hash(pglb: &Pglb) -> String {
    pglb.status()["config"]["hash"].as_str().expect("/status config.hash").to_owned()
}

/// `/status` of backend `name` (Null if absent).
fn backend_status(status: &Value, name: &str) -> Value {
    let backends = status["backends"].as_array().cloned().unwrap_or_default();
    backends.into_iter().find(|b| b["name"] == name).unwrap_or(Value::Null)
}

fn backend_names(pglb: &Pglb) -> Vec<String> {
    let status = pglb.status();
    let backends = status["backends"].as_array().cloned().unwrap_or_default();
    backends.iter().filter_map(|b| b["name"].as_str().map(str::to_owned)).collect()
}

fn post(pglb: &Pglb, path: &str, headers: &[&str]) -> (u16, String) {
    http::request(pglb.admin, "POST", path, headers).expect("POST to the admin endpoint")
}

/// Raw sessions through replica listener `port`, one on each of the two
/// replicas: (on `nodes[1]`, on `nodes[2]`).
fn session_per_replica(cluster: &Cluster, port: u16) -> (TcpStream, TcpStream) {
    let (mut first, mut second) = (None, None);
    for _ in 0..6 {
        let mut s = wire::login(port).expect("login via the replica listener");
        let server: u16 = scalar(&mut s, "SELECT inet_server_port()").expect("query").parse().expect("a port");
        if server == cluster.nodes[1].port && first.is_none() {
            first = Some(s);
        } else if server == cluster.nodes[2].port && second.is_none() {
            second = Some(s);
        }
        if first.is_some() && second.is_some() {
            break;
        }
    }
    (first.expect("a session on pg1"), second.expect("a session on pg2"))
}

/// psql in a thread, tagged with `application_name` = `app`; returns its
/// result and how long it took.
fn spawn_psql(port: u16, sql: &str, app: &str) -> JoinHandle<(Result<String, String>, Duration)> {
    let (sql, app) = (sql.to_owned(), app.to_owned());
    std::thread::spawn(move || {
        let started = Instant::now();
        let result = psql(port, &sql, &[("PGAPPNAME", &app)]);
        (result, started.elapsed())
    })
}

/// Waits until a query of `application_name` = `app` runs on the primary.
fn wait_active(cluster: &Cluster, app: &str) {
    let sql = format!("SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}' AND state = 'active'");
    wait_until(&format!("the query of {app} to run"), SETTLE, || match cluster.primary().sql(&sql) {
        Ok(n) if n == "1" => Ok(()),
        other => Err(format!("{other:?}")),
    });
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `key=value key="quoted value"` pairs, as tracing's text format writes them.
fn text_fields(rest: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return out;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            let mut escaped = false;
            for c in chars.by_ref() {
                match (escaped, c) {
                    (true, c) => {
                        value.push(c);
                        escaped = false;
                    }
                    (false, '\\') => escaped = true,
                    (false, '"') => break,
                    (false, c) => value.push(c),
                }
            }
        } else {
            value.extend(chars.by_ref().take_while(|c| *c != ' '));
        }
        out.insert(key, value);
    }
}

/// Every `connection closed` line of the log (text or JSON lines), as
/// field → value, plus `target`.
fn connection_lines(log: &str) -> Vec<HashMap<String, String>> {
    let mut out = Vec::new();
    for line in log.lines().map(strip_ansi) {
        if line.starts_with('{') {
            let Ok(Value::Object(map)) = serde_json::from_str::<Value>(&line) else { continue };
            if map.get("message").and_then(Value::as_str) != Some("connection closed") {
                continue;
            }
            let field = |v: &Value| v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string());
            out.push(map.iter().map(|(k, v)| (k.clone(), field(v))).collect());
        } else if let Some((head, rest)) = line.split_once(": connection closed") {
            let mut fields = text_fields(rest);
            if head.ends_with("pglb::connection") {
                fields.insert("target".into(), "pglb::connection".into());
            }
            out.push(fields);
        }
    }
    out
}

/// Waits for the connection log line matching every `(field, value)`.
fn wait_connection_line(pglb: &Pglb, want: &[(&str, &str)]) -> HashMap<String, String> {
    wait_until(&format!("a connection log line with {want:?}"), SETTLE, || {
        let log = pglb.log();
        connection_lines(&log)
            .into_iter()
            .find(|f| want.iter().all(|(k, v)| f.get(*k).is_some_and(|got| got == v)))
            .ok_or(log)
    })
}

fn assert_all_connection_fields(line: &HashMap<String, String>) {
    let missing: Vec<&str> = CONNECTION_FIELDS.iter().copied().filter(|f| !line.contains_key(*f)).collect();
    assert!(missing.is_empty(), "connection log line lacks {missing:?}: {line:?}");
    assert_eq!(line.get("target").map(String::as_str), Some("pglb::connection"), "{line:?}");
}

/// "backend is up/down" lines about any of `backends`.
fn health_flips(log: &str, backends: &[&str]) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("backend is up") || l.contains("backend is down"))
        .filter(|l| {
            backends.iter().any(|b| {
                let plain = format!("backend={b}");
                l.contains(&format!("backend=\"{b}\"")) || l.contains(&format!("{plain} ")) || l.ends_with(&plain)
            })
        })
        .map(str::to_owned)
        .collect()
}

/// Polls /status and /metrics until `stop`, noting every sample in which one
/// of `backends` is not healthy; returns (samples, problems).
fn watch_health(
    admin: SocketAddr,
    backends: &[&'static str],
    stop: Arc<AtomicBool>,
) -> JoinHandle<(usize, Vec<String>)> {
    let backends = backends.to_vec();
    std::thread::spawn(move || {
        let (mut samples, mut problems) = (0, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            if let Ok((200, body)) = http::get(admin, "/status") {
                let status: Value = serde_json::from_str(&body).unwrap_or_default();
                for b in &backends {
                    let entry = backend_status(&status, b);
                    if entry["healthy"] != true {
                        problems.push(format!("/status: {entry}"));
                    }
                }
            }
            if let Ok((200, text)) = http::get(admin, "/metrics") {
                for b in &backends {
                    let up = metric(&text, &format!("pglb_backend_up{{cluster=\"default\",backend=\"{b}\"}}"));
                    if up != Some(1.0) {
                        problems.push(format!("pglb_backend_up of {b} is {up:?}"));
                    }
                }
            }
            samples += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        (samples, problems)
    })
}

/// The port of listener `name` in `yaml` (also for listeners a reload added).
fn port_in(yaml: &Yaml, name: &str) -> u16 {
    yaml.listeners.iter().find(|(n, _, _)| n == name).map(|(_, p, _)| *p).expect("a listener of that name")
}

/// Whether `port` on loopback refuses TCP connections.
fn refuses(port: u16) -> Result<(), String> {
    match TcpStream::connect(("127.0.0.1", port)) {
        Err(_) => Ok(()),
        Ok(_) => Err(format!("port {port} still accepts connections")),
    }
}

// ---------------------------------------------------------------- reload

#[test]
fn sighup_reload_applies_the_diff_while_sessions_run_and_health_does_not_flap() {
    let cluster = shared_cluster();
    let mut yaml = Yaml::for_cluster(&cluster)
        .listener("rw", "role: primary\n    hold_timeout: 0s")
        .listener("ro", "role: replica\n    balance: round_robin\n    hold_timeout: 0s")
        .listener("gone", "role: primary")
        .listener("kept", "role: primary\n    on_ineligible: keep");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    pglb.wait_eligible("ro", &["pg1", "pg2"], SETTLE);
    let hash_before = config_hash(&pglb);
    assert_eq!(hash_before, sha256_hex(&pglb.config), "/status config.hash is the file's SHA-256");
    let flips_before = health_flips(&pglb.log(), &["pg0", "pg1"]);

    let (mut on_pg1, mut on_pg2) = session_per_replica(&cluster, pglb.port("ro"));
    let mut gone = wire::login(pglb.port("gone")).expect("login via `gone`");
    let mut kept = wire::login(pglb.port("kept")).expect("login via `kept`");
    let long = spawn_psql(pglb.port("rw"), "SELECT pg_sleep(4)", "ops-reload-long");
    wait_active(&cluster, "ops-reload-long");

    // Remove pg2 and two listeners, add one; watch health across the reload.
    yaml.backends.retain(|(name, _)| name != "pg2");
    yaml.listeners.retain(|(name, _, _)| name != "gone" && name != "kept");
    let yaml = yaml.listener("extra", "role: replica\n    hold_timeout: 0s");
    std::fs::write(&pglb.config, yaml.render()).expect("rewrite config");
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_health(pglb.admin, &["pg0", "pg1"], stop.clone());
    pglb.signal("HUP");
    wait_metric(&pglb, "pglb_config_reloads_total{result=\"success\"}", 1.0);
    assert!(!long.is_finished(), "the reload should complete while the long query runs");
    assert!(pglb.log().contains("config reloaded"), "{}", pglb.log());
    assert_eq!(metric(&pglb.metrics(), "pglb_config_reloads_total{result=\"failure\"}"), Some(0.0));

    let hash_after = config_hash(&pglb);
    assert_ne!(hash_after, hash_before, "config.hash must change with the file");
    assert_eq!(hash_after, sha256_hex(&pglb.config));
    assert_eq!(backend_names(&pglb), ["pg0", "pg1"]);

    // The added listener serves; ro now only reaches pg1.
    let pg1 = cluster.nodes[1].port;
    wait_until("the new listener to serve", SETTLE, || match where_am_i(port_in(&yaml, "extra")) {
        Ok(got) if got == (pg1, true) => Ok(()),
        other => Err(format!("{other:?}")),
    });
    for _ in 0..3 {
        assert_eq!(where_am_i(pglb.port("ro")), Ok((pg1, true)), "ro must no longer reach the removed pg2");
    }

    // Sessions on the removed backend and the removed listener end; the
    // others (including the removed `on_ineligible: keep` listener's) go on.
    wait_closed(&mut on_pg2, Duration::from_secs(5)).expect("the session on removed pg2 must be closed");
    wait_closed(&mut gone, Duration::from_secs(5)).expect("the session of removed listener `gone` must be closed");
    assert_eq!(scalar(&mut on_pg1, "SELECT 1"), Ok("1".into()), "the session on pg1 must survive the reload");
    assert_eq!(scalar(&mut kept, "SELECT 1"), Ok("1".into()), "`on_ineligible: keep` must keep the session");
    for name in ["gone", "kept"] {
        wait_until(&format!("removed listener `{name}` to stop accepting"), SETTLE, || refuses(pglb.port(name)));
    }
    let line = wait_connection_line(&pglb, &[("listener", "ro"), ("backend", "pg2")]);
    assert_eq!(line["end"], "removed", "{line:?}");
    let line = wait_connection_line(&pglb, &[("listener", "gone")]);
    assert_eq!(line["end"], "listener_removed", "{line:?}");
    // The removed backend's and listener's series leave /metrics (an alert
    // must not fire on pg2), but not the removed `keep` listener's while
    // its session lives.
    wait_until("the series of pg2 and `gone` to leave /metrics", SETTLE, || {
        let m = pglb.metrics();
        match (m.contains("backend=\"pg2\""), m.contains("listener=\"gone\"")) {
            (false, false) => Ok(()),
            seen => Err(format!("pg2, gone still exported: {seen:?}")),
        }
    });
    assert!(pglb
        .metrics()
        .contains("pglb_connections_active{cluster=\"default\",listener=\"kept\",backend=\"pg0\"} 1"));

    let (result, took) = long.join().expect("psql thread");
    assert_eq!(result, Ok(String::new()), "the long query through rw must complete");
    assert!(took >= Duration::from_millis(3900), "pg_sleep(4) returned after {took:?}");
    terminate(on_pg1);
    terminate(kept);
    wait_until("the removed `keep` listener's series to leave once its session ended", SETTLE, || {
        if pglb.metrics().contains("listener=\"kept\"") {
            Err("still exported".into())
        } else {
            Ok(())
        }
    });

    stop.store(true, Ordering::Relaxed);
    let (samples, problems) = watcher.join().expect("health watcher");
    assert!(samples > 10, "only {samples} health samples");
    assert!(problems.is_empty(), "unchanged backends flapped during the reload: {problems:?}\n{}", pglb.log());
    assert_eq!(health_flips(&pglb.log(), &["pg0", "pg1"]), flips_before, "no new up/down line for kept backends");
}

#[test]
fn invalid_reloads_are_rejected_whole_and_the_old_config_keeps_serving() {
    let cluster = shared_cluster();
    let mut yaml = Yaml::for_cluster(&cluster).listener("rw", "role: primary\n    hold_timeout: 0s");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    let primary = (cluster.primary().port, false);
    let hash = config_hash(&pglb);
    let path = pglb.config.display().to_string();
    wait_metric(&pglb, "pglb_config_reloads_total{result=\"failure\"}", 0.0);

    // 1. Broken YAML: rejected, with file:line:column in the log.
    let good = yaml.render();
    let at = good.lines().position(|l| l == "listeners:").expect("listeners line") + 3;
    let broken = good.replacen("listeners:\n", "listeners:\n  - name: rw2\n   listen: [oops\n", 1);
    std::fs::write(&pglb.config, &broken).expect("write broken config");
    pglb.signal("HUP");
    wait_metric(&pglb, "pglb_config_reloads_total{result=\"failure\"}", 1.0);
    let log = pglb.log();
    assert!(log.contains("reload rejected"), "{log}");
    let location = format!("{path}:{at}:");
    assert!(log.contains(&location), "the log must point at {location}<column>:\n{log}");
    assert_eq!(where_am_i(pglb.port("rw")), Ok(primary), "the old config keeps serving");
    assert_eq!(config_hash(&pglb), hash, "config.hash is still the old file's");
    // /status and `pglb status` say so, with the error.
    let last = &pglb.status()["config"]["last_reload"];
    assert_eq!(last["result"], "failure", "{last}");
    assert!(last["error"].as_str().is_some_and(|e| e.contains(&location)), "{last}");
    // (pglb status reads the admin address from the file: put the good one back.)
    std::fs::write(&pglb.config, &good).expect("write config");
    let out = Command::new(pglb_tests::pglb::pglb_bin())
        .args(["status", "--config"])
        .arg(&pglb.config)
        .output()
        .expect("pglb status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("last reload") && text.contains("REJECTED") && text.contains(&location), "{text}");

    // 2. A port in use, in a file that also removes pg2 and adds a listener:
    //    nothing of it applies.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port to squat");
    let squatted = squatter.local_addr().expect("addr").port();
    yaml.backends.retain(|(name, _)| name != "pg2");
    yaml.listeners.push(("squat".into(), squatted, "role: primary".into()));
    let mut yaml = yaml.listener("fresh", "role: replica\n    hold_timeout: 0s");
    std::fs::write(&pglb.config, yaml.render()).expect("write config");
    pglb.signal("HUP");
    wait_metric(&pglb, "pglb_config_reloads_total{result=\"failure\"}", 2.0);
    let log = pglb.log();
    let rejection = log.lines().find(|l| l.contains("cannot bind listener `squat`")).unwrap_or_else(|| panic!("{log}"));
    assert!(rejection.contains(&path), "the rejection names the config file: {rejection}");
    assert_eq!(where_am_i(pglb.port("rw")), Ok(primary), "the old config keeps serving");
    assert_eq!(backend_names(&pglb), ["pg0", "pg1", "pg2"], "pg2 must not be removed by a rejected reload");
    refuses(port_in(&yaml, "fresh")).expect("a rejected reload must not open its new listeners");
    assert_eq!(config_hash(&pglb), hash);
    assert_eq!(metric(&pglb.metrics(), "pglb_config_reloads_total{result=\"success\"}"), Some(0.0));

    // 3. The same file without the squatted listener applies.
    yaml.listeners.retain(|(name, _, _)| name != "squat");
    std::fs::write(&pglb.config, yaml.render()).expect("write config");
    pglb.signal("HUP");
    wait_metric(&pglb, "pglb_config_reloads_total{result=\"success\"}", 1.0);
    assert_eq!(metric(&pglb.metrics(), "pglb_config_reloads_total{result=\"failure\"}"), Some(2.0));
    assert_eq!(config_hash(&pglb), sha256_hex(&pglb.config));
    assert_ne!(config_hash(&pglb), hash);
    assert_eq!(backend_names(&pglb), ["pg0", "pg1"]);
    wait_until("the new listener to serve", SETTLE, || match where_am_i(port_in(&yaml, "fresh")) {
        Ok(got) if got == (cluster.nodes[1].port, true) => Ok(()),
        other => Err(format!("{other:?}")),
    });
    drop(squatter);
}

/// A listener's identity is its name: renamed on the same address, it keeps
/// its socket (new clients are served throughout), while the old name's
/// sessions end like a removed listener's and its series leave /metrics.
#[test]
fn a_renamed_listener_keeps_its_socket_and_ends_the_old_names_sessions() {
    let cluster = shared_cluster();
    let mut yaml = Yaml::for_cluster(&cluster).listener("rw", "role: primary\n    hold_timeout: 0s");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    let port = pglb.port("rw");
    let mut old = wire::login(port).expect("a session under the old name");
    yaml.listeners[0].0 = "write".into();
    std::fs::write(&pglb.config, yaml.render()).expect("write config");
    pglb.signal("HUP");
    wait_metric(&pglb, "pglb_config_reloads_total{result=\"success\"}", 1.0);
    wait_closed(&mut old, Duration::from_secs(5)).expect("the old name's session ends");
    assert_eq!(where_am_i(port), Ok((cluster.primary().port, false)), "the same socket serves under the new name");
    assert!(pglb.listener("write")["backends"] == serde_json::json!(["pg0"]), "{}", pglb.status());
    let line = wait_connection_line(&pglb, &[("listener", "rw")]);
    assert_eq!(line["end"], "listener_removed", "{line:?}");
    wait_until("the old name's series to leave /metrics", SETTLE, || {
        if pglb.metrics().contains("listener=\"rw\"") {
            Err("still exported".into())
        } else {
            Ok(())
        }
    });
}

/// A reload is all or nothing: when the checks' TLS connector cannot be
/// built (the CA file, same path, now holds no certificate), nothing of the
/// new config applies — before, its listeners opened and the backends it
/// changed stayed unchecked while the reload counted as a success.
#[test]
fn a_reload_with_an_unusable_ca_file_changes_nothing() {
    let cluster = shared_cluster();
    let ca = std::fs::read_to_string(cluster.primary().data.join("server.crt")).expect("the cluster's certificate");
    let mut yaml =
        Yaml::for_cluster(&cluster).file("ca.pem", &ca).listener("rw", "role: primary\n    hold_timeout: 0s");
    // The connector is built from sslrootcert even where checks do not use
    // TLS, at start and at every reload.
    yaml.health =
        "interval: 500ms\n  timeout: 500ms\n  user: pglb_check\n  sslmode: disable\n  sslrootcert: ca.pem".into();
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    wait_metric(&pglb, "pglb_config_reloads_total{result=\"failure\"}", 0.0);

    std::fs::write(pglb.dir.join("ca.pem"), "not a certificate\n").expect("spoil the CA file");
    yaml.backends.retain(|(name, _)| name != "pg2");
    let yaml = yaml.listener("fresh", "role: replica\n    hold_timeout: 0s");
    std::fs::write(&pglb.config, yaml.render()).expect("write config");
    pglb.signal("HUP");
    wait_metric(&pglb, "pglb_config_reloads_total{result=\"failure\"}", 1.0);
    let log = pglb.log();
    assert!(log.contains("reload rejected") && log.contains("sslrootcert"), "{log}");
    assert_eq!(metric(&pglb.metrics(), "pglb_config_reloads_total{result=\"success\"}"), Some(0.0));
    refuses(port_in(&yaml, "fresh")).expect("a rejected reload must not open its new listeners");
    assert_eq!(backend_names(&pglb), ["pg0", "pg1", "pg2"]);
    assert_eq!(where_am_i(pglb.port("rw")), Ok((cluster.primary().port, false)), "the old config keeps serving");
}

/// `clients_active` of listener `name` in /status.
fn status_clients_active(pglb: &Pglb, name: &str) -> Value {
    let status = pglb.status();
    let listeners = status["listeners"].as_array().cloned().unwrap_or_default();
    listeners.into_iter().find(|l| l["name"] == name).map(|l| l["clients_active"].clone()).unwrap_or_default()
}

/// What the listener's accounting says, against what it should say.
fn check_accounting(pglb: &Pglb, active: f64, when: &str, problems: &mut Vec<String>) {
    let m = pglb.metrics();
    for series in [
        "pglb_clients_active{cluster=\"default\",listener=\"capped\"}",
        "pglb_connections_active{cluster=\"default\",listener=\"capped\",backend=\"pg0\"}",
    ] {
        let got = metric(&m, series);
        if got != Some(active) {
            problems.push(format!("{when}: {series} is {got:?}, want {active}"));
        }
    }
    let got = status_clients_active(pglb, "capped");
    if got.as_f64() != Some(active) {
        problems.push(format!("{when}: /status listeners[capped].clients_active is {got}, want {active}"));
    }
}

/// Waits until no session is open (per /connections).
fn wait_no_sessions(pglb: &Pglb) {
    wait_until("every session to end", SETTLE, || {
        let (_, body) = http::get(pglb.admin, "/connections")?;
        let all: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        if all["connections"].as_array().is_some_and(Vec::is_empty) {
            Ok(())
        } else {
            Err(body)
        }
    });
}

#[test]
fn listener_limits_and_gauges_count_sessions_from_before_a_reload() {
    let cluster = shared_cluster();
    let mut yaml =
        Yaml::for_cluster(&cluster).listener("capped", "role: primary\n    max_clients: 1\n    queue_timeout: 0s");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("capped", &["pg0"], SETTLE);
    let port = pglb.port("capped");
    let mut first = wire::login(port).expect("the first client fits under max_clients: 1");
    let err = wire::login(port).expect_err("a second client exceeds max_clients: 1").to_string();
    assert!(err.contains("C53300"), "{err}");
    let mut problems = Vec::new();
    check_accounting(&pglb, 1.0, "before the reload", &mut problems);
    assert!(problems.is_empty(), "{problems:#?}");

    // A reload that leaves `capped` as it is.
    yaml.backends.retain(|(name, _)| name != "pg2");
    std::fs::write(&pglb.config, yaml.render()).expect("rewrite config");
    pglb.signal("HUP");
    wait_metric(&pglb, "pglb_config_reloads_total{result=\"success\"}", 1.0);
    assert_eq!(scalar(&mut first, "SELECT 1"), Ok("1".into()), "the first session goes on");
    check_accounting(&pglb, 1.0, "after the reload, one session open", &mut problems);
    match wire::login(port) {
        Ok(second) => {
            problems.push("after the reload, max_clients: 1 admitted a second client while the first is open".into());
            terminate(second);
        }
        Err(e) if !e.to_string().contains("C53300") => problems.push(format!("second client: {e}")),
        Err(_) => {}
    }
    terminate(first);
    wait_no_sessions(&pglb);
    check_accounting(&pglb, 0.0, "after every session ended", &mut problems);
    let third = wire::login(port).expect("a client after the others left");
    check_accounting(&pglb, 1.0, "with one new session after the reload", &mut problems);
    terminate(third);
    assert!(problems.is_empty(), "listener accounting is wrong across a reload: {problems:#?}\n{}", pglb.log());
}

// ---------------------------------------------------------------- shutdown

#[test]
fn sigterm_refuses_new_clients_and_lets_sessions_finish() {
    let cluster = shared_cluster();
    let yaml = Yaml::for_cluster(&cluster).listener("rw", "role: primary");
    let mut pglb = Pglb::start(&yaml);
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    let port = pglb.port("rw");
    let session = spawn_psql(port, "SELECT pg_sleep(2)", "ops-drain");
    wait_active(&cluster, "ops-drain");

    pglb.signal("TERM");
    wait_until("/health to turn 503", Duration::from_millis(500), || match http::get(pglb.admin, "/health") {
        Ok((503, _)) => Ok(()),
        other => Err(format!("{other:?}")),
    });
    let err = wire::login(port).expect_err("a new client must be refused while draining");
    let err = err.to_string();
    assert!(err.contains("C57P01"), "SQLSTATE must be 57P01 (admin_shutdown): {err:?}");
    let err = psql(port, "SELECT 1", &[]).expect_err("psql must be refused while draining");
    assert!(err.contains("pglb: shutting down"), "{err}");

    let (result, took) = session.join().expect("psql thread");
    assert_eq!(result, Ok(String::new()), "the session in progress must complete");
    assert!(took >= Duration::from_millis(1900), "pg_sleep(2) returned after {took:?}");
    assert_eq!(pglb.wait_exit(Duration::from_secs(10)), Some(0), "{}", pglb.log());
    let line = wait_connection_line(&pglb, &[("listener", "rw"), ("end", "shutdown")]);
    assert_all_connection_fields(&line);
}

#[test]
fn shutdown_timeout_closes_sessions_that_do_not_end() {
    let cluster = shared_cluster();
    let yaml = Yaml::for_cluster(&cluster).top("shutdown_timeout: 1s").listener("rw", "role: primary");
    let mut pglb = Pglb::start(&yaml);
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    let stuck = spawn_psql(pglb.port("rw"), "SELECT pg_sleep(60)", "ops-stuck");
    wait_active(&cluster, "ops-stuck");

    let started = Instant::now();
    pglb.signal("TERM");
    let code = pglb.wait_exit(Duration::from_secs(10));
    let took = started.elapsed();
    assert_eq!(code, Some(0), "{}", pglb.log());
    assert!(took >= Duration::from_millis(900), "pglb exited after {took:?}, before shutdown_timeout");
    assert!(took < Duration::from_secs(5), "pglb took {took:?} to exit with shutdown_timeout: 1s");
    let (result, _) = stuck.join().expect("psql thread");
    assert!(result.is_err(), "the stuck session must be closed: {result:?}");
    let line = wait_connection_line(&pglb, &[("listener", "rw"), ("backend", "pg0")]);
    assert_eq!(line["end"], "shutdown_timeout", "{line:?}");
    // The server does not notice the client is gone during pg_sleep.
    let _ = cluster
        .primary()
        .sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'ops-stuck'");
}

// ---------------------------------------------------------------- admin

fn assert_admin_state(pglb: &Pglb, backend: &str, state: &str) {
    let status = pglb.status();
    assert_eq!(backend_status(&status, backend)["admin_state"], state, "{status}");
    let m = pglb.metrics();
    for s in ["enabled", "drained", "disabled"] {
        let series = format!("pglb_backend_admin_state{{cluster=\"default\",backend=\"{backend}\",state=\"{s}\"}}");
        assert_eq!(metric(&m, &series), Some(if s == state { 1.0 } else { 0.0 }), "{series}\n{m}");
    }
}

#[test]
fn admin_actions_drain_disable_and_enable_backends_behind_a_token() {
    let cluster = shared_cluster();
    let yaml = Yaml::for_cluster(&cluster)
        .admin("token_env: OPS_ADMIN_TOKEN")
        .listener("ro", "role: replica\n    balance: round_robin\n    hold_timeout: 0s");
    let pglb = Pglb::start_with(&yaml, &[("OPS_ADMIN_TOKEN", "secret")]);
    pglb.wait_eligible("ro", &["pg1", "pg2"], SETTLE);
    let (pg1, pg2) = (cluster.nodes[1].port, cluster.nodes[2].port);
    let auth = ["Authorization: Bearer secret"];

    assert_eq!(post(&pglb, "/backends/pg1/drain", &[]).0, 401, "no token");
    assert_eq!(post(&pglb, "/backends/pg1/drain", &["Authorization: Bearer wrong"]).0, 401, "wrong token");
    let (code, _) = http::get(pglb.admin, "/backends/pg1/drain").expect("GET");
    assert_eq!(code, 405, "actions are POST only");
    let (code, body) = post(&pglb, "/backends/nope/drain", &auth);
    assert_eq!(code, 404, "{body}");
    let body: Value = serde_json::from_str(&body).expect("a JSON error body");
    assert!(body["error"].is_string(), "{body}");
    assert_eq!(post(&pglb, "/backends/pg1/explode", &auth).0, 404, "unknown action");
    assert_admin_state(&pglb, "pg1", "enabled");

    let (mut on_pg1, mut on_pg2) = session_per_replica(&cluster, pglb.port("ro"));

    // Drain: no new sessions on pg1, the open one goes on.
    let (code, body) = post(&pglb, "/backends/pg1/drain", &auth);
    assert_eq!(code, 200, "{body}");
    assert_admin_state(&pglb, "pg1", "drained");
    for _ in 0..4 {
        assert_eq!(where_am_i(pglb.port("ro")), Ok((pg2, true)), "a drained backend gets no new sessions");
    }
    assert_eq!(scalar(&mut on_pg1, "SELECT 1"), Ok("1".into()), "a drained backend's session goes on");

    // Disable: the open session on pg1 is closed, pg2's is not.
    let (code, body) = post(&pglb, "/backends/pg1/disable", &auth);
    assert_eq!(code, 200, "{body}");
    assert_admin_state(&pglb, "pg1", "disabled");
    wait_closed(&mut on_pg1, Duration::from_secs(5)).expect("disabling pg1 must close its session");
    assert_eq!(scalar(&mut on_pg2, "SELECT 1"), Ok("1".into()));
    assert_eq!(where_am_i(pglb.port("ro")), Ok((pg2, true)));
    let line = wait_connection_line(&pglb, &[("listener", "ro"), ("backend", "pg1")]);
    assert_eq!(line["end"], "disabled", "{line:?}");

    // Enable: pg1 is back in rotation.
    let (code, body) = post(&pglb, "/backends/pg1/enable", &auth);
    assert_eq!(code, 200, "{body}");
    assert_admin_state(&pglb, "pg1", "enabled");
    pglb.wait_eligible("ro", &["pg1", "pg2"], SETTLE);
    let seen: std::collections::HashSet<u16> =
        (0..4).map(|_| where_am_i(pglb.port("ro")).expect("query via ro").0).collect();
    assert!(seen.contains(&pg1), "an enabled pg1 gets sessions again: {seen:?}");
    terminate(on_pg2);
}

/// A refused client is told the cause an operator can act on: the primary
/// is healthy but disabled, so "no healthy primary" alone would mislead.
#[test]
fn a_client_of_a_disabled_primary_is_told_it_is_disabled() {
    let cluster = shared_cluster();
    let yaml = Yaml::for_cluster(&cluster)
        .admin("token_env: OPS_ADMIN_TOKEN")
        .listener("rw", "role: primary\n    hold_timeout: 0s");
    let pglb = Pglb::start_with(&yaml, &[("OPS_ADMIN_TOKEN", "secret")]);
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    let (code, body) = post(&pglb, "/backends/pg0/disable", &["Authorization: Bearer secret"]);
    assert_eq!(code, 200, "{body}");
    let err = psql(pglb.port("rw"), "SELECT 1", &[]).expect_err("nothing to route to");
    let want = "primary \"pg0\" is disabled by an operator (pglb enable pg0)";
    assert!(err.contains(want), "psql says: {err}");
    let line = wait_connection_line(&pglb, &[("listener", "rw"), ("end", "no_backend")]);
    assert!(line.get("detail").is_some_and(|d| d.contains(want)), "{line:?}");
}

// ---------------------------------------------------------------- connection log

#[test]
fn connection_log_text() {
    connection_log_and_connections_endpoint("text");
}

#[test]
fn connection_log_json() {
    connection_log_and_connections_endpoint("json");
}

fn connection_log_and_connections_endpoint(format: &str) {
    let cluster = shared_cluster();
    let yaml = Yaml::for_cluster(&cluster)
        .top(&format!("log_format: {format}"))
        .listener("rw", "role: primary\n    hold_timeout: 0s");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    // A log file gets no terminal colour codes (stderr is not a terminal).
    assert!(!pglb.log().contains('\x1b'), "ANSI escapes in a log file:\n{}", pglb.log());

    let mut s = wire::login(pglb.port("rw")).expect("login");
    let client = s.local_addr().expect("local addr").to_string();
    let sql = "SELECT client_port FROM pg_stat_activity WHERE pid = pg_backend_pid()";
    let client_port = scalar(&mut s, sql).expect("client_port");

    // /connections lists the live session with the same fields.
    let (code, body) = http::get(pglb.admin, "/connections").expect("GET /connections");
    assert_eq!(code, 200, "{body}");
    let all: Value = serde_json::from_str(&body).expect("JSON");
    let sessions = all["connections"].as_array().cloned().unwrap_or_default();
    let live = sessions.iter().find(|c| c["client"] == client.as_str()).unwrap_or_else(|| panic!("{client}: {all}"));
    assert_eq!(live["listener"], "rw", "{live}");
    assert_eq!(live["backend"], "pg0", "{live}");
    assert_eq!(live["backend_local_port"].to_string(), client_port, "pg_stat_activity.client_port: {live}");
    for field in ["bytes_client_to_backend", "bytes_backend_to_client"] {
        assert!(live[field].as_u64().is_some_and(|n| n > 0), "{field}: {live}");
    }

    // One line at close, with every field.
    terminate(s);
    let line = wait_connection_line(&pglb, &[("client", client.as_str())]);
    assert_all_connection_fields(&line);
    assert_eq!(line["listener"], "rw", "{line:?}");
    assert_eq!(line["backend"], "pg0", "{line:?}");
    assert_eq!(line["backend_local_port"], client_port, "backend_local_port is the backend's client_port: {line:?}");
    assert_eq!(line["end"], "client_closed", "{line:?}");
    assert!(line["duration_s"].parse::<f64>().is_ok_and(|d| d > 0.0), "{line:?}");
    for field in ["bytes_client_to_backend", "bytes_backend_to_client"] {
        assert!(line[field].parse::<u64>().is_ok_and(|n| n > 0), "{field}: {line:?}");
    }

    // A client that never reaches a backend is logged the same way.
    let mut garbage = TcpStream::connect(("127.0.0.1", pglb.port("rw"))).expect("connect");
    let garbage_addr = garbage.local_addr().expect("local addr").to_string();
    garbage.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    let line = wait_connection_line(&pglb, &[("client", garbage_addr.as_str())]);
    assert_all_connection_fields(&line);
    assert_eq!(line["end"], "bad_startup", "{line:?}");

    let log = pglb.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    if format == "json" {
        let bad: Vec<&&str> = lines.iter().filter(|l| serde_json::from_str::<Value>(l).is_err()).collect();
        assert!(bad.is_empty(), "log_format: json must write JSON lines only: {bad:?}");
    } else {
        assert!(lines.iter().all(|l| !l.starts_with('{')), "log_format: text wrote JSON:\n{log}");
    }
}

// ---------------------------------------------------------------- allow lists

#[test]
fn allow_list_refuses_other_clients_at_accept() {
    let cluster = shared_cluster();
    let yaml = Yaml::for_cluster(&cluster)
        .listener("deny", "role: primary\n    allow: [10.0.0.0/8]")
        .listener("ok", "role: primary\n    allow: [127.0.0.1/32]");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("ok", &["pg0"], SETTLE);
    let rejected = "pglb_clients_rejected_total{cluster=\"default\",listener=\"deny\",reason=\"not_allowed\"}";

    let mut raw = TcpStream::connect(("127.0.0.1", pglb.port("deny"))).expect("the kernel accepts the TCP connection");
    let raw_addr = raw.local_addr().expect("local addr").to_string();
    wait_closed(&mut raw, Duration::from_secs(5)).expect("a client outside the allow list is closed at accept");
    wait_metric(&pglb, rejected, 1.0);
    let err = psql(pglb.port("deny"), "SELECT 1", &[]).expect_err("psql must fail on `deny`");
    assert!(!err.is_empty());
    assert!(metric(&pglb.metrics(), rejected).is_some_and(|n| n >= 2.0));

    assert_eq!(where_am_i(pglb.port("ok")), Ok((cluster.primary().port, false)));
    let m = pglb.metrics();
    assert_eq!(
        metric(&m, "pglb_clients_rejected_total{cluster=\"default\",listener=\"ok\",reason=\"not_allowed\"}"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "pglb_connections_total{cluster=\"default\",listener=\"deny\",backend=\"pg0\"}"),
        Some(0.0),
        "{m}"
    );

    let line = wait_connection_line(&pglb, &[("client", raw_addr.as_str())]);
    assert_eq!(line["listener"], "deny", "{line:?}");
    assert_eq!(line["end"], "not_allowed", "{line:?}");
    assert_all_connection_fields(&line);
}

// ---------------------------------------------------------------- fd exhaustion

/// The process state letter from /proc (None once it is gone).
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

#[test]
fn accept_storm_at_the_fd_limit_backs_off_and_recovers() {
    let cluster = shared_cluster();
    // The pending budget would refuse these silent clients long before the
    // fd limit: made larger than the limit, so that accept itself fails.
    let yaml = Yaml::for_cluster(&cluster)
        .top("forwarder: copy\nlimits:\n  max_pending: 100000\n  max_pending_per_source: 100000")
        .listener("rw", "role: primary\n    startup_timeout: 2s\n    hold_timeout: 0s");
    let pglb = Pglb::start_wrapped(&yaml, &[], &["prlimit", "--nofile=64:64"]);
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    let (pid, port) = (pglb.pid(), pglb.port("rw"));
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let nofile = limits.lines().find(|l| l.starts_with("Max open files")).expect("Max open files").to_owned();
    assert_eq!(nofile.split_whitespace().nth(3), Some("64"), "{nofile}");
    assert_eq!(where_am_i(port), Ok((cluster.primary().port, false)));

    // Silent clients (no startup message) until pglb runs out of fds.
    let t = Instant::now();
    let flood: Vec<TcpStream> =
        (0..300).map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect to the backlog")).collect();
    wait_until("pglb to hit its fd limit", SETTLE, || {
        let log = pglb.log();
        if log.contains("cannot accept: out of file descriptors") {
            Ok(())
        } else {
            Err(format!("{:?} fds: {log}", fd_count(pid)))
        }
    });
    eprintln!("fd limit reached after {:?}", t.elapsed());
    let (before, started) = (cpu_seconds(pid).expect("pglb's CPU time"), Instant::now());
    let mut fds = Vec::new();
    while started.elapsed() < Duration::from_secs(2) {
        fds.push(fd_count(pid).expect("pglb's fds"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let used = cpu_seconds(pid).expect("pglb's CPU time") - before;
    assert!(used < 0.5, "pglb used {used:.2} CPU-s in 2 s at its fd limit: it must back off, not spin");
    assert!(matches!(process_state(pid), Some(s) if s != 'Z'), "pglb died at its fd limit:\n{}", pglb.log());
    let most = fds.iter().copied().max().unwrap_or(0);
    assert!(most >= 60, "pglb was not at its fd limit while sampled: {fds:?} {:?}", fd_targets(pid));
    eprintln!("at the fd limit: {used:.3} CPU-s over 2 s, {most} fds");

    let t = Instant::now();
    drop(flood);
    wait_until("pglb to serve again after the storm", Duration::from_secs(30), || match where_am_i(port) {
        Ok(got) if got == (cluster.primary().port, false) => Ok(()),
        other => Err(format!("{other:?}")),
    });
    eprintln!("served again {:?} after the flood ended", t.elapsed());
    assert!(matches!(process_state(pid), Some(s) if s != 'Z'), "pglb died:\n{}", pglb.log());
    let m = pglb.metrics();
    let errors = metric(&m, "pglb_accept_errors_total{cluster=\"default\",listener=\"rw\"}");
    assert!(errors.is_some_and(|n| n > 0.0), "accept errors must be counted: {errors:?}\n{m}");
}
