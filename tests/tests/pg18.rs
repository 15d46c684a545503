//! PostgreSQL 17/18 clients through pglb, against a PostgreSQL 18 primary
//! and two streaming replicas, with libpq 18 (see `pglb_tests::pg18`):
//! direct TLS (`sslnegotiation=direct`), protocol 3.2 (32-byte cancel keys),
//! the 3.9999 "grease" version, and what an L4 balancer can and cannot do
//! with a cancel sent inside TLS.
//!
//! The tests share one cluster and do not disturb it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use pglb_cluster::Cluster;
use pglb_tests::{pg18, skip, wait_until, wire, Pglb, Yaml};

static SHARED: Mutex<Weak<Cluster>> = Mutex::new(Weak::new());

/// The package directory and the shared PostgreSQL 18 cluster, or `None`
/// (after [`skip`]) when the package is not unpacked.
fn setup() -> Option<(PathBuf, Arc<Cluster>)> {
    let dir = match pg18::dir() {
        Ok(dir) => dir,
        Err(why) => {
            skip(&why);
            return None;
        }
    };
    let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    let cluster = match slot.upgrade() {
        Some(cluster) => cluster,
        None => {
            let cluster = Arc::new(pg18::cluster(&dir, "pg18", 2));
            *slot = Arc::downgrade(&cluster);
            cluster
        }
    };
    Some((dir, cluster))
}

/// pglb over the cluster with `listeners` (name, YAML), once every backend
/// is routable.
fn start(cluster: &Cluster, listeners: &[(&str, &str)]) -> Pglb {
    let mut yaml = Yaml::for_cluster(cluster);
    for (name, extra) in listeners {
        yaml = yaml.listener(name, extra);
    }
    let pglb = Pglb::start(&yaml);
    for (name, extra) in listeners {
        let want: &[&str] = if extra.contains("role: primary") { &["pg0"] } else { &["pg1", "pg2"] };
        pglb.wait_eligible(name, want, Duration::from_secs(20));
    }
    pglb
}

fn conninfo(port: u16, extra: &str) -> String {
    format!("host=127.0.0.1 port={port} {extra}")
}

const WHERE_AND_HOW: &str =
    "SELECT inet_server_port(), pg_is_in_recovery(), ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

#[test]
fn direct_tls_reaches_the_primary_and_spreads_over_the_replicas() {
    let Some((dir, cluster)) = setup() else { return };
    let pglb = start(&cluster, &[("rw", "role: primary"), ("ro", "role: replica\n    balance: round_robin")]);
    let direct = "sslmode=require sslnegotiation=direct";

    // The client opens with a ClientHello (ALPN "postgresql"); pglb passes it
    // on and the server does the handshake: TLS all the way to the server.
    let primary = cluster.primary().port;
    let got = pg18::psql(&dir, &conninfo(pglb.port("rw"), direct), WHERE_AND_HOW).expect("direct TLS on rw");
    assert_eq!(got, format!("{primary}|f|t"), "rw: the primary, over TLS negotiated by the server");

    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let got = pg18::psql(&dir, &conninfo(pglb.port("ro"), direct), WHERE_AND_HOW).expect("direct TLS on ro");
        let (port, rest) = got.split_once('|').expect("port|recovery|ssl");
        assert_eq!(rest, "t|t", "ro: a replica, over TLS");
        seen.insert(port.parse::<u16>().expect("port"));
    }
    let replicas: std::collections::BTreeSet<u16> = cluster.nodes[1..].iter().map(|n| n.port).collect();
    assert_eq!(seen, replicas, "direct TLS sessions on ro are balanced over both replicas");

    // Direct TLS sessions are sessions like any other: counted per backend.
    let sessions = pglb.metric("pglb_connections_total", &[("listener", "ro")]);
    assert_eq!(sessions, 4.0, "{}", pglb.metrics());
}

#[test]
fn direct_tls_without_a_backend_is_closed_with_a_tls_alert_and_logged() {
    let Some((dir, cluster)) = setup() else { return };
    // Only the replicas are configured: the rw listener has no primary.
    let mut yaml = Yaml::for_cluster(&cluster).listener("rw", "role: primary\n    hold_timeout: 0s");
    yaml.backends.remove(0);
    let pglb = Pglb::start(&yaml);
    pglb.wait_checks(&["pg1", "pg2"], 2.0, Duration::from_secs(20));

    let err = pg18::psql(&dir, &conninfo(pglb.port("rw"), "sslmode=require sslnegotiation=direct"), "SELECT 1")
        .expect_err("no primary: refused");
    // No PostgreSQL error can reach a client that opened with TLS: it gets a
    // fatal TLS alert, not a reset or a hang.
    assert!(err.contains("alert internal error"), "psql says: {err}");
    let log = pglb.log();
    assert!(
        log.contains("no healthy primary for listener") && log.contains("direct TLS client: closed with a TLS alert"),
        "pglb logs why:\n{log}"
    );
    assert_eq!(pglb.metric("pglb_clients_rejected_total", &[("listener", "rw"), ("reason", "no_backend")]), 1.0);

    // The same refusal in the usual flow is a readable PostgreSQL error.
    let err = pg18::psql(&dir, &conninfo(pglb.port("rw"), "sslmode=prefer"), "SELECT 1").expect_err("refused");
    assert!(err.contains("pglb: no healthy primary for listener \"rw\""), "psql says: {err}");
}

/// Logs in with protocol 3.`minor` and returns the stream and every message
/// up to ReadyForQuery.
fn login(port: u16, minor: u16, extra: &[(&str, &str)]) -> (TcpStream, Vec<(u8, Vec<u8>)>) {
    let mut s = wire::start_up_with(port, minor, extra).expect("connect");
    let mut seen = Vec::new();
    loop {
        let (tag, body) = wire::read_message(&mut s).expect("a server message");
        assert_ne!(tag, b'E', "login failed: {}", String::from_utf8_lossy(&body));
        seen.push((tag, body));
        if tag == b'Z' {
            return (s, seen);
        }
    }
}

/// Waits until `sql` (a query text) runs on one of `nodes`.
fn wait_running(nodes: &[pglb_cluster::Node], sql: &str) {
    let probe = format!("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = '{sql}'");
    wait_until(&format!("`{sql}` running"), Duration::from_secs(15), || {
        let running: usize = nodes.iter().map(|n| n.sql(&probe).ok().and_then(|c| c.parse().ok()).unwrap_or(0)).sum();
        if running > 0 {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
}

/// Reads until the query ends; returns the SQLSTATE of its error, if any.
fn query_outcome(s: &mut TcpStream) -> Option<String> {
    let mut sqlstate = None;
    loop {
        let (tag, body) = wire::read_message(s).expect("the query's answer");
        if tag == b'E' {
            let field = body.split(|b| *b == 0).find(|f| f.first() == Some(&b'C'));
            sqlstate = field.map(|f| String::from_utf8_lossy(&f[1..]).into_owned());
        }
        if tag == b'Z' {
            return sqlstate;
        }
    }
}

#[test]
fn protocol_3_2_session_and_a_plaintext_cancel_with_a_32_byte_key_on_a_balanced_listener() {
    let Some((_dir, cluster)) = setup() else { return };
    let pglb = start(&cluster, &[("ro", "role: replica\n    balance: round_robin")]);

    let (mut session, messages) = login(pglb.port("ro"), 2, &[]);
    assert!(!messages.iter().any(|(t, _)| *t == b'v'), "the server speaks 3.2: no NegotiateProtocolVersion");
    let (_, key_data) = messages.iter().find(|(t, _)| *t == b'K').expect("BackendKeyData");
    assert_eq!(key_data.len(), 4 + 32, "protocol 3.2 gives a 32-byte cancel key");
    let pid = u32::from_be_bytes([key_data[0], key_data[1], key_data[2], key_data[3]]);

    let sql = "SELECT pg_sleep(60)";
    wire::query(&mut session, sql).expect("send the query");
    wait_running(&cluster.nodes[1..], sql);
    // A new plaintext connection to the same balanced listener: pglb reads
    // the 44-byte CancelRequest and fans it out to the replicas that hold
    // sessions; the one whose pid and key match cancels.
    let mut cancel = TcpStream::connect(("127.0.0.1", pglb.port("ro"))).expect("connect for the cancel");
    let request = wire::cancel_request(pid, &key_data[4..]);
    assert_eq!(request.len(), 44);
    cancel.write_all(&request).expect("send the cancel");
    let started = Instant::now();
    assert_eq!(query_outcome(&mut session).as_deref(), Some("57014"), "the query is cancelled");
    assert!(started.elapsed() < Duration::from_secs(30), "cancelled long before pg_sleep(60) ended");
    let mut rest = Vec::new();
    let _ = cancel.read_to_end(&mut rest);
    assert!(rest.is_empty(), "a cancel gets no answer, only a close");
}

#[test]
fn psql_with_protocol_3_2_cancels_through_a_balanced_listener() {
    let Some((dir, cluster)) = setup() else { return };
    let pglb = start(&cluster, &[("ro", "role: replica\n    balance: least_conn")]);
    // psql's Ctrl-C handler sends the old plaintext CancelRequest, with the
    // 32-byte key libpq 18 got at a 3.2 login.
    let sql = "SELECT pg_sleep(61)";
    let mut psql = pg18::spawn_psql(&dir, &conninfo(pglb.port("ro"), "sslmode=disable max_protocol_version=3.2"), sql);
    wait_running(&cluster.nodes[1..], sql);
    let sent = std::process::Command::new("kill").args(["-INT", &psql.id().to_string()]).status().expect("kill");
    assert!(sent.success());
    wait_until("psql to end", Duration::from_secs(30), || match psql.try_wait() {
        Ok(Some(_)) => Ok(()),
        _ => Err("still running".into()),
    });
    let mut stderr = String::new();
    psql.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("read stderr");
    assert!(stderr.contains("canceling statement due to user request"), "psql says: {stderr}");
    assert!(pglb.metric("pglb_cancel_requests_total", &[("listener", "ro")]) >= 1.0, "{}", pglb.metrics());
}

#[test]
fn grease_version_3_9999_gets_the_servers_negotiate_protocol_version_unchanged() {
    let Some((_dir, cluster)) = setup() else { return };
    let pglb = start(&cluster, &[("rw", "role: primary")]);
    let grease = [("_pq_.pglb_grease", "on")];

    let (_, straight) = login(cluster.primary().port, 9999, &grease);
    let (_, through) = login(pglb.port("rw"), 9999, &grease);
    let negotiate = |messages: &[(u8, Vec<u8>)]| messages.first().cloned().expect("a first message");
    let (tag, body) = negotiate(&through);
    assert_eq!(tag, b'v', "the server answers 3.9999 with NegotiateProtocolVersion first");
    assert_eq!(negotiate(&straight), (tag, body.clone()), "byte for byte as without pglb");
    // Newest minor version the server speaks, then the options it ignored.
    assert_eq!(&body[..8], &[0, 3, 0, 2, 0, 0, 0, 1], "3.2 and one unknown option");
    assert_eq!(&body[8..], b"_pq_.pglb_grease\0");
    // And the session goes on to ReadyForQuery, as `login` checked.
}

/// A cancel sent inside TLS (libpq 17+ `PQcancelCreate`, here tokio-postgres
/// with `sslmode=require`, which sends SSLRequest and then the CancelRequest
/// inside TLS): pglb cannot read it, so it routes the connection like a
/// session. This measures how often such a cancel reaches the server that
/// runs the query, per balance policy on a 2-replica listener, and checks
/// the documented workarounds: a primary-only listener, a plaintext cancel.
#[test]
fn encrypted_cancels_reach_the_right_server_only_when_routing_happens_to_agree() {
    let Some((_dir, cluster)) = setup() else { return };
    let policies = ["round_robin", "least_conn", "random"];
    let mut listeners: Vec<(String, String)> =
        policies.iter().map(|p| (format!("ro_{p}"), format!("role: replica\n    balance: {p}"))).collect();
    listeners.push(("rw".into(), "role: primary".into()));
    let borrowed: Vec<(&str, &str)> = listeners.iter().map(|(n, y)| (n.as_str(), y.as_str())).collect();
    let pglb = start(&cluster, &borrowed);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");

    const TRIALS: usize = 6;
    let mut report = Vec::new();
    for policy in policies {
        let port = pglb.port(&format!("ro_{policy}"));
        let hits = (0..TRIALS).filter(|_| runtime.block_on(encrypted_cancel(&cluster, port, true))).count();
        report.push(format!("{policy}: {hits}/{TRIALS}"));
    }
    let rw = (0..4).filter(|_| runtime.block_on(encrypted_cancel(&cluster, pglb.port("rw"), false))).count();
    report.push(format!("rw (primary only): {rw}/4"));
    eprintln!("encrypted cancels that cancelled the query: {}", report.join(", "));
    // One server behind the listener: the cancel always finds it.
    assert_eq!(rw, 4, "{report:?}");
    // Every encrypted cancel was routed, and counted, as a session.
    let sessions: f64 = ["ro_round_robin", "ro_least_conn", "ro_random", "rw"]
        .iter()
        .map(|l| pglb.metric("pglb_connections_total", &[("listener", l)]))
        .sum();
    assert_eq!(sessions, (2 * (3 * TRIALS + 4)) as f64, "{}", pglb.metrics());
    assert_eq!(pglb.metric("pglb_cancel_requests_total", &[]), 0.0, "pglb never saw a CancelRequest");
}

/// One trial: a TLS session runs `pg_sleep`, a TLS cancel follows through
/// the same listener. Whether the query was cancelled within 0.8 s on the
/// balanced listener (a cancel that reaches its server acts within
/// milliseconds), 5 s on the primary-only one.
async fn encrypted_cancel(cluster: &Cluster, port: u16, replicas: bool) -> bool {
    let tls = pglb_health::make_tls(None).expect("TLS connector");
    let conninfo = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=require");
    let (client, connection) = tokio_postgres::connect(&conninfo, tls.clone()).await.expect("connect over TLS");
    tokio::spawn(connection);
    let sql = "SELECT pg_sleep(30)";
    let token = client.cancel_token();
    let query = tokio::spawn(async move {
        let result = client.simple_query(sql).await;
        result.err().and_then(|e| e.code().map(|c| c.code().to_owned()))
    });
    let nodes: Vec<_> = if replicas { cluster.nodes[1..].to_vec() } else { vec![cluster.primary().clone()] };
    let probe_nodes = nodes.clone();
    tokio::task::spawn_blocking(move || wait_running(&probe_nodes, sql)).await.expect("probe");
    token.cancel_query(tls).await.expect("send the cancel over TLS");
    // On the balanced listener a miss costs this wait, so it is short; on
    // the primary-only listener, where success is asserted, a loaded
    // machine gets time.
    let patience = if replicas { Duration::from_millis(800) } else { Duration::from_secs(5) };
    let cancelled = matches!(
        tokio::time::timeout(patience, wait_for(&query)).await,
        Ok(()) if query.is_finished()
    );
    if !cancelled {
        // Clean up: cancel it where it runs.
        for node in &nodes {
            let _ = node.sql(&format!("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query = '{sql}'"));
        }
    }
    let code = query.await.expect("query task");
    assert_eq!(code.as_deref(), Some("57014"), "the query ends cancelled, by pglb's route or the cleanup");
    cancelled
}

async fn wait_for<T>(task: &tokio::task::JoinHandle<T>) {
    while !task.is_finished() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn server_names_route_direct_tls_and_sslrequest_clients_on_one_port() {
    let Some((dir, cluster)) = setup() else { return };
    let port = pglb_cluster::free_port().expect("free port");
    let mut yaml = Yaml::for_cluster(&cluster);
    yaml.listeners.push(("rw".into(), port, "role: primary\n    sni: [rw.pglb.test]".into()));
    yaml.listeners.push(("ro".into(), port, "role: replica\n    sni: [\"*.ro.pglb.test\", ro.pglb.test]".into()));
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("ro", &["pg1", "pg2"], Duration::from_secs(20));
    let primary = cluster.primary().port;
    for negotiation in ["direct", "postgres"] {
        let at = |name: &str| {
            let conninfo =
                format!("host={name} hostaddr=127.0.0.1 port={port} sslmode=require sslnegotiation={negotiation}");
            pg18::psql(&dir, &conninfo, WHERE_AND_HOW).unwrap_or_else(|e| panic!("{name} ({negotiation}): {e}"))
        };
        assert_eq!(at("rw.pglb.test"), format!("{primary}|f|t"), "{negotiation}");
        assert!(at("ro.pglb.test").ends_with("|t|t"), "{negotiation}");
        assert!(at("a.ro.pglb.test").ends_with("|t|t"), "{negotiation}");
        let err = pg18::psql(
            &dir,
            &format!("host=nope.pglb.test hostaddr=127.0.0.1 port={port} sslmode=require sslnegotiation={negotiation}"),
            "SELECT 1",
        )
        .expect_err("an unknown name");
        assert!(err.contains("unrecognized name"), "{negotiation}: {err}");
    }
    assert_eq!(pglb.metric("pglb_connections_total", &[("listener", "rw")]), 2.0);
    assert_eq!(pglb.metric("pglb_connections_total", &[("listener", "ro")]), 4.0);
}
