//! Role routing, auth methods of the checker, errors, cancel and COPY, all on
//! one shared cluster (none of these tests disturbs it).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use pglb_tests::cluster::{MD5_USER, SCRAM_USER, TLS_USER};
use pglb_tests::pg::{connect, copy_out_digest};
use pglb_tests::psql::{psql, where_am_i};
use pglb_tests::{shared_cluster, wait_until, Pglb, Yaml};

const SETTLE: Duration = Duration::from_secs(15);

#[test]
fn rw_goes_to_the_primary_and_ro_spreads_over_replicas() {
    let cluster = shared_cluster();
    let yaml = Yaml::for_cluster(&cluster)
        .listener("rw", "role: primary")
        .listener("ro", "role: replica\n    balance: round_robin");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    pglb.wait_eligible("ro", &["pg1", "pg2"], SETTLE);

    for _ in 0..3 {
        assert_eq!(where_am_i(pglb.port("rw")), Ok((cluster.primary().port, false)));
    }
    let mut seen = HashSet::new();
    for _ in 0..6 {
        let (port, in_recovery) = where_am_i(pglb.port("ro")).expect("ro query");
        assert!(in_recovery, "ro landed on a node that is not a replica (port {port})");
        seen.insert(port);
    }
    let replicas: HashSet<u16> = cluster.nodes[1..].iter().map(|n| n.port).collect();
    assert_eq!(seen, replicas, "ro spreads over both replicas");

    let metrics = pglb.metrics();
    assert!(
        metrics.contains("pglb_connections_total{cluster=\"default\",listener=\"rw\",backend=\"pg0\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("pglb_backend_role{cluster=\"default\",backend=\"pg0\",role=\"primary\"} 1"), "{metrics}");
}

fn start_auth(cluster: &pglb_cluster::Cluster, user: &str, password: &str, sslmode: &str) -> Pglb {
    let yaml = Yaml::for_cluster(cluster)
        .health(&format!(
            "interval: 500ms\n  timeout: 500ms\n  rise: 1\n  fall: 1\n  user: {user}\n  password_env: CHECK_PASSWORD\n  sslmode: {sslmode}"
        ))
        .listener("rw", "role: primary")
        .listener("ro", "role: replica");
    Pglb::start_with(&yaml, &[("CHECK_PASSWORD", password)])
}

#[test]
fn scram_check_user_marks_backends_up() {
    let cluster = shared_cluster();
    let pglb = start_auth(&cluster, SCRAM_USER.0, SCRAM_USER.1, "disable");
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    pglb.wait_eligible("ro", &["pg1", "pg2"], SETTLE);
}

#[test]
fn md5_check_user_really_uses_md5() {
    let cluster = shared_cluster();
    let stored = cluster
        .primary()
        .sql(&format!("SELECT left(rolpassword, 3) FROM pg_authid WHERE rolname = '{}'", MD5_USER.0))
        .expect("read pg_authid");
    assert_eq!(stored, "md5", "the md5 user's password must be stored as md5, or pg_hba's md5 uses SCRAM");
    let pglb = start_auth(&cluster, MD5_USER.0, MD5_USER.1, "disable");
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    pglb.wait_eligible("ro", &["pg1", "pg2"], SETTLE);
}

#[test]
fn wrong_password_marks_backends_down_and_says_why() {
    let cluster = shared_cluster();
    let pglb = start_auth(&cluster, SCRAM_USER.0, "not-the-password", "disable");
    wait_until("a log line about the password", SETTLE, || {
        let log = pglb.log();
        let down = log.contains("backend is down") && log.contains("password authentication failed");
        if down {
            Ok(())
        } else {
            Err(log)
        }
    });
    let status = pglb.status();
    for b in status["backends"].as_array().expect("backends") {
        assert_eq!(b["healthy"], false, "{b}");
        assert!(b["last_error"].as_str().unwrap_or("").contains("28P01"), "{b}");
    }
    assert!(!pglb.log().contains("not-the-password"), "the password leaked into the log");
    assert!(!status.to_string().contains("not-the-password"), "the password leaked into /status");
    assert!(pglb.eligible("rw").is_empty());
}

#[test]
fn tls_only_backend_is_checked_with_sslmode_require() {
    let cluster = shared_cluster();
    // pg_hba rejects the TLS user without TLS: prove that first.
    let plain = start_auth(&cluster, TLS_USER.0, TLS_USER.1, "disable");
    wait_until("plaintext check to be rejected", SETTLE, || {
        let log = plain.log();
        if log.contains("backend is down") && log.contains("no encryption") {
            Ok(())
        } else {
            Err(log)
        }
    });
    drop(plain);
    let pglb = start_auth(&cluster, TLS_USER.0, TLS_USER.1, "require");
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    pglb.wait_eligible("ro", &["pg1", "pg2"], SETTLE);
}

#[test]
fn no_eligible_backend_answers_with_a_postgres_error() {
    let cluster = shared_cluster();
    let mut yaml = Yaml::for_cluster(&cluster).listener("ro", "role: replica");
    yaml.backends.truncate(1); // only the primary: the replica listener has nothing
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("ro", &[], SETTLE);
    wait_until("the primary to be checked", SETTLE, || {
        let b = pglb.backend("pg0");
        if b["checked"] == true {
            Ok(())
        } else {
            Err(b.to_string())
        }
    });
    for sslmode in ["prefer", "disable", "allow"] {
        let err = psql(pglb.port("ro"), "SELECT 1", &[("PGSSLMODE", sslmode)]).expect_err("must be refused");
        assert!(err.contains("pglb: no healthy replica for listener \"ro\""), "sslmode={sslmode}: {err}");
    }
    // The documented limit: with sslmode=require libpq stops at our 'N'.
    let err = psql(pglb.port("ro"), "SELECT 1", &[("PGSSLMODE", "require")]).expect_err("must be refused");
    assert!(err.contains("server does not support SSL"), "{err}");
    assert!(pglb
        .metrics()
        .contains("pglb_clients_rejected_total{cluster=\"default\",listener=\"ro\",reason=\"no_backend\"} 4"));
}

#[test]
fn garbage_and_silent_clients_are_dropped_and_counted() {
    use std::io::{Read, Write};
    let cluster = shared_cluster();
    let yaml = Yaml::for_cluster(&cluster).listener("rw", "role: primary\n    startup_timeout: 500ms");
    let pglb = Pglb::start(&yaml);
    let addr = ("127.0.0.1", pglb.port("rw"));
    let mut http = std::net::TcpStream::connect(addr).expect("connect");
    http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    let mut buf = Vec::new();
    let _ = http.read_to_end(&mut buf);
    assert!(buf.is_empty(), "pglb answered garbage with {buf:?}");
    let mut silent = std::net::TcpStream::connect(addr).expect("connect");
    silent.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let started = Instant::now();
    assert_eq!(silent.read(&mut [0u8; 16]).expect("closed, not timed out"), 0);
    assert!(started.elapsed() < Duration::from_secs(9), "silent client was not dropped");
    // A client reset halfway through its first message is counted too.
    let reset = std::net::TcpStream::connect(addr).expect("connect");
    (&reset).write_all(&[0, 0, 0, 40, 0, 3]).expect("write half a startup message");
    socket2::SockRef::from(&reset).set_linger(Some(Duration::ZERO)).expect("linger 0: close with a reset");
    drop(reset);
    wait_until("rejections to be counted", SETTLE, || {
        let m = pglb.metrics();
        let bad =
            m.contains("pglb_clients_rejected_total{cluster=\"default\",listener=\"rw\",reason=\"bad_startup\"} 1");
        let slow =
            m.contains("pglb_clients_rejected_total{cluster=\"default\",listener=\"rw\",reason=\"startup_timeout\"} 1");
        let reset =
            m.contains("pglb_clients_rejected_total{cluster=\"default\",listener=\"rw\",reason=\"client_error\"} 1");
        if bad && slow && reset {
            Ok(())
        } else {
            Err(m)
        }
    });
    // And the listener still serves.
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    assert_eq!(where_am_i(pglb.port("rw")), Ok((cluster.primary().port, false)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_through_the_ro_port_cancels_the_query() {
    let cluster = shared_cluster();
    let yaml = Yaml::for_cluster(&cluster).listener("ro", "role: replica\n    balance: round_robin");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("ro", &["pg1", "pg2"], SETTLE);
    let port = pglb.port("ro");
    // Two sessions, so the listener holds sessions on both replicas.
    let mut clients = Vec::new();
    for _ in 0..2 {
        let conn = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=disable");
        let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await.expect("connect via ro");
        tokio::spawn(connection);
        clients.push(client);
    }
    for client in &clients {
        let started = Instant::now();
        let token = client.cancel_token();
        let sleeper = client.simple_query("SELECT pg_sleep(30)");
        let canceller = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            token.cancel_query(tokio_postgres::NoTls).await
        };
        let (result, cancelled) = tokio::join!(sleeper, canceller);
        cancelled.expect("send cancel through pglb");
        let err = result.expect_err("the query must be cancelled");
        assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::QUERY_CANCELED), "{err}");
        assert!(started.elapsed() < Duration::from_secs(20), "pg_sleep(30) ran to its end");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_copy_in_and_out_is_byte_exact() {
    use futures_util::SinkExt;
    use sha2::{Digest, Sha256};
    let cluster = shared_cluster();
    let yaml = Yaml::for_cluster(&cluster).listener("rw", "role: primary");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    let via = connect(pglb.port("rw")).await;
    via.batch_execute("DROP TABLE IF EXISTS copy_e2e; CREATE TABLE copy_e2e (id int, payload text)")
        .await
        .expect("create table");
    // ~64 MB of rows whose text form is canonical, so COPY OUT returns them as sent.
    let (mut sent, mut sent_bytes) = (Sha256::new(), 0usize);
    let sink = via.copy_in::<_, bytes::Bytes>("COPY copy_e2e FROM STDIN").await.expect("copy in");
    futures_util::pin_mut!(sink);
    let mut chunk = Vec::with_capacity(1 << 20);
    for id in 0..200_000u32 {
        let pad = (id.wrapping_mul(2_654_435_761) % 26) as u8;
        let payload: String = (0..300u32).map(|k| char::from(b'a' + ((u32::from(pad) + k) % 26) as u8)).collect();
        chunk.extend_from_slice(format!("{id}\t{payload}\n").as_bytes());
        if chunk.len() > (1 << 20) || id == 199_999 {
            sent.update(&chunk);
            sent_bytes += chunk.len();
            sink.send(bytes::Bytes::from(std::mem::take(&mut chunk))).await.expect("send copy data");
        }
    }
    assert_eq!(sink.finish().await.expect("finish copy"), 200_000);
    let sent = sent.finalize().to_vec();
    let direct = connect(cluster.primary().port).await;
    let sql = "COPY (SELECT * FROM copy_e2e ORDER BY id) TO STDOUT";
    for (label, client) in [("pglb", &via), ("direct", &direct)] {
        let (got, bytes) = copy_out_digest(client, sql).await;
        assert_eq!(bytes, sent_bytes, "COPY OUT via {label}: byte count");
        assert_eq!(got, sent, "COPY OUT via {label} differs from what was sent");
    }
    via.batch_execute("DROP TABLE copy_e2e").await.expect("drop table");
}

/// A cancel request goes only to the backends holding sessions opened on
/// the address it arrived on (a client cancels through the address it
/// connected to): one sent to ro's port reaches the replica with ro's
/// session, not the primary, which holds only rw's session. Each cancel
/// forks a process on every server it reaches.
#[test]
fn a_cancel_goes_only_to_the_backends_of_the_address_it_arrived_on() {
    use std::io::{Read, Write};
    let cluster = shared_cluster();
    let yaml = Yaml::for_cluster(&cluster).listener("rw", "role: primary").listener("ro", "role: replica");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("ro", &["pg1", "pg2"], SETTLE);
    let _on_primary = pglb_tests::wire::login(pglb.port("rw")).expect("a session through rw");
    let _on_replica = pglb_tests::wire::login(pglb.port("ro")).expect("a session through ro");
    let (_, body) = pglb_tests::http::get(pglb.admin, "/connections").expect("GET /connections");
    let connections: serde_json::Value = serde_json::from_str(&body).expect("json");
    let replica = connections["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["listener"] == "ro")
        .and_then(|c| c["backend"].as_str())
        .unwrap_or_else(|| panic!("no ro session in {body}"))
        .to_owned();
    let mut cancel = std::net::TcpStream::connect(("127.0.0.1", pglb.port("ro"))).expect("connect");
    cancel.write_all(&pglb_tests::wire::cancel_request(4242, &[1, 2, 3, 4])).expect("send the cancel");
    let _ = cancel.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = cancel.read_to_end(&mut Vec::new());
    let forwarded = wait_until("the cancel to be passed on", SETTLE, || {
        let log = pglb.log();
        let to: Vec<String> = log
            .lines()
            .filter_map(|l| l.split("cancel request forwarded backend=").nth(1))
            .map(|b| b.trim().to_owned())
            .collect();
        if to.is_empty() {
            Err("not yet".to_owned())
        } else {
            Ok(to)
        }
    });
    assert_eq!(forwarded, vec![replica], "the cancel reached other servers than ro's");
}
