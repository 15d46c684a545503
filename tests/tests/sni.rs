//! Routing by TLS server name on one port, against the shared PostgreSQL 15
//! cluster (TLS on) with psql (libpq 15 sends the host name as SNI): the
//! usual flow, where pglb answers the SSLRequest itself, reads the
//! ClientHello and passes it on. Direct TLS (PostgreSQL 17+) is in pg18.rs.

use std::process::Command;
use std::time::Duration;

use pglb_tests::{shared_cluster, wait_until, Pglb, Yaml};

/// psql with a libpq connection string; `Ok(stdout)` or `Err(stderr)`.
fn psql(conninfo: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .arg(format!("{conninfo} user=postgres dbname=postgres connect_timeout=10"))
        .args(["-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env_remove("PGSSLMODE")
        .output()
        .map_err(|e| format!("cannot run psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

const WHERE: &str = "SELECT inet_server_port(), pg_is_in_recovery(), ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

/// `host=NAME hostaddr=127.0.0.1 port=PORT sslmode=MODE`.
fn named(name: &str, port: u16, sslmode: &str) -> String {
    format!("host={name} hostaddr=127.0.0.1 port={port} sslmode={sslmode}")
}

/// Listeners `(name, YAML)` all on one port.
fn one_port(cluster: &pglb_cluster::Cluster, listeners: &[(&str, &str)]) -> (Yaml, u16) {
    let port = pglb_cluster::free_port().expect("free port");
    let mut yaml = Yaml::for_cluster(cluster);
    for (name, extra) in listeners {
        yaml.listeners.push(((*name).into(), port, (*extra).into()));
    }
    (yaml, port)
}

#[test]
fn server_names_route_to_roles_on_one_port() {
    let cluster = shared_cluster();
    let (yaml, port) = one_port(
        &cluster,
        &[
            ("rw", "role: primary\n    sni: [rw.pglb.test]"),
            ("ro", "role: replica\n    sni: [ro.pglb.test, \"*.replicas.pglb.test\"]"),
            ("other", "role: primary"),
        ],
    );
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("ro", &["pg1", "pg2"], Duration::from_secs(20));
    let primary = cluster.primary().port;
    let replicas: Vec<u16> = cluster.nodes[1..].iter().map(|n| n.port).collect();
    let at = |name: &str| psql(&named(name, port, "require"), WHERE).unwrap_or_else(|e| panic!("{name}: {e}"));

    assert_eq!(at("rw.pglb.test"), format!("{primary}|f|t"), "rw.pglb.test: the primary, over TLS to the server");
    let (p, rest) = at("RO.pglb.test").split_once('|').map(|(a, b)| (a.to_owned(), b.to_owned())).expect("row");
    assert!(
        replicas.contains(&p.parse().expect("port")) && rest == "t|t",
        "ro.pglb.test (case-insensitive): {p}|{rest}"
    );
    let wildcard = at("db7.replicas.pglb.test");
    assert!(wildcard.ends_with("|t|t"), "a wildcard name reaches a replica: {wildcard}");
    // An unmatched name, and a client without TLS, go to the default listener.
    assert_eq!(at("unknown.pglb.test"), format!("{primary}|f|t"));
    let plain = psql(&format!("host=127.0.0.1 port={port} sslmode=disable"), "SELECT inet_server_port()");
    assert_eq!(plain, Ok(primary.to_string()), "plaintext clients take the default listener");

    // The server name is in the connection log and in /connections.
    let log = pglb.log();
    assert!(log.contains("server_name=\"rw.pglb.test\"") || log.contains("server_name=rw.pglb.test"), "{log}");
    for (listener, sessions) in [("rw", 1.0), ("ro", 2.0), ("other", 2.0)] {
        assert_eq!(pglb.metric("pglb_connections_total", &[("listener", listener)]), sessions, "{listener}");
    }
}

#[test]
fn without_a_default_an_unknown_name_is_closed_and_prefer_never_falls_back_to_plaintext() {
    let cluster = shared_cluster();
    let (yaml, port) = one_port(
        &cluster,
        &[("rw", "role: primary\n    sni: [rw.pglb.test]"), ("ro", "role: replica\n    sni: [ro.pglb.test]")],
    );
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("rw", &["pg0"], Duration::from_secs(20));

    let err = psql(&named("unknown.pglb.test", port, "require"), "SELECT 1").expect_err("no listener has the name");
    assert!(err.contains("unrecognized name"), "a TLS unrecognized_name alert: {err}");
    assert!(pglb.log().contains("serves server name `unknown.pglb.test`, and there is no default listener"));

    // libpq's default `prefer` retries in plaintext, without a name, after a
    // failed TLS attempt: with no default listener that is refused clearly,
    // and no backend is ever reached.
    let err = psql(&named("unknown.pglb.test", port, "prefer"), "SELECT 1").expect_err("refused");
    assert!(err.contains("routes by TLS server name and has no default listener"), "{err}");
    let total: f64 = ["rw", "ro"].iter().map(|l| pglb.metric("pglb_connections_total", &[("listener", l)])).sum();
    assert_eq!(total, 0.0, "no session reached a backend");
    assert_eq!(pglb.metric("pglb_clients_rejected_total", &[("reason", "tls_required")]), 1.0);
    assert_eq!(pglb.metric("pglb_clients_rejected_total", &[("reason", "unknown_server_name")]), 2.0);
    // The named roles still work.
    let rw = psql(&named("rw.pglb.test", port, "prefer"), "SELECT pg_is_in_recovery()");
    assert_eq!(rw, Ok("f".into()));
}

#[test]
fn a_reload_moves_a_name_to_another_listener() {
    let cluster = shared_cluster();
    let (mut yaml, port) = one_port(
        &cluster,
        &[
            ("rw", "role: primary\n    sni: [rw.pglb.test, app.pglb.test]"),
            ("ro", "role: replica\n    sni: [ro.pglb.test]"),
        ],
    );
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("ro", &["pg1", "pg2"], Duration::from_secs(20));
    let recovery = || psql(&named("app.pglb.test", port, "require"), "SELECT pg_is_in_recovery()");
    assert_eq!(recovery(), Ok("f".into()), "app.pglb.test is on rw");

    yaml.listeners[0].2 = "role: primary\n    sni: [rw.pglb.test]".into();
    yaml.listeners[1].2 = "role: replica\n    sni: [ro.pglb.test, app.pglb.test]".into();
    std::fs::write(&pglb.config, yaml.render()).expect("rewrite the config");
    pglb.signal("HUP");
    wait_until("the reload", Duration::from_secs(20), || {
        match pglb.metric("pglb_config_reloads_total", &[("result", "success")]) {
            n if n >= 1.0 => Ok(()),
            n => Err(format!("{n}\n{}", pglb.log())),
        }
    });
    assert_eq!(recovery(), Ok("t".into()), "app.pglb.test moved to ro");
    assert_eq!(psql(&named("rw.pglb.test", port, "require"), "SELECT pg_is_in_recovery()"), Ok("f".into()));
}
