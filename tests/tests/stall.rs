//! A stalled node (every server process SIGSTOPped for about 3 × fall ×
//! interval, as a VM pause or a stuck fsync looks) is silence, not evidence:
//! no session closes, a query in flight finishes, a client arriving during
//! the stall waits and is served once the node resumes, and reads go to a
//! replica that answers. A client that waits longer than `hold_timeout` for
//! the silent backend's answer gets 57P03 naming it, not a hang. Only
//! silence longer than `down_after` closes sessions. Own cluster.

use std::thread;
use std::time::{Duration, Instant};

use pglb_cluster::{Cluster, Spec};
use pglb_tests::fault::Freeze;
use pglb_tests::psql::where_am_i;
use pglb_tests::{wire, Pglb, Yaml};

const HEALTH: &str = "interval: 500ms\n  timeout: 250ms\n  rise: 2\n  fall: 2\n  user: pglb_check\n  sslmode: disable";
/// 3 × fall × interval.
const STALL: Duration = Duration::from_secs(3);
const SETTLE: Duration = Duration::from_secs(15);

/// A session through `listener` that landed on `backend` (round robin: retry).
fn session_on(pglb: &Pglb, listener: &str, backend: &str) -> std::net::TcpStream {
    pglb_tests::wait_until(&format!("a {listener} session on {backend}"), SETTLE, || {
        let s = wire::login(pglb.port(listener)).map_err(|e| e.to_string())?;
        let conns = pglb_tests::http::get(pglb.admin, "/connections")?.1;
        let v: serde_json::Value = serde_json::from_str(&conns).map_err(|e| e.to_string())?;
        let port = s.local_addr().map_err(|e| e.to_string())?.port().to_string();
        let mine = v["connections"].as_array().into_iter().flatten().any(|c| {
            c["listener"] == listener
                && c["backend"] == backend
                && c["client"].as_str().is_some_and(|a| a.ends_with(&port))
        });
        if mine {
            Ok(s)
        } else {
            Err(conns)
        }
    })
}

/// Runs `sql` on a logged-in session and returns the message tags up to ReadyForQuery.
fn run(s: &mut std::net::TcpStream, sql: &str) -> Vec<u8> {
    wire::query(s, sql).expect("send query");
    let mut tags = Vec::new();
    loop {
        let (tag, body) = wire::read_message(s).expect("an answer on the session");
        assert_ne!(tag, b'E', "error: {}", String::from_utf8_lossy(&body));
        tags.push(tag);
        if tag == b'Z' {
            return tags;
        }
    }
}

fn closed_sessions(pglb: &Pglb) -> f64 {
    pglb.metric("pglb_sessions_closed_total", &[])
}

#[test]
fn a_stall_is_waited_out_and_only_a_stall_past_down_after_closes_sessions() {
    let cluster = Cluster::start(&Spec { tag: "stall".into(), replicas: 2, ..Spec::default() }).expect("cluster");
    pglb_tests::cluster::create_check_users(&cluster);
    let yaml = Yaml::for_cluster(&cluster)
        .health(&format!("{HEALTH}\n  down_after: 10s"))
        .listener("rw", "role: primary\n    hold_timeout: 10s")
        .listener("ro", "role: replica\n    balance: round_robin\n    hold_timeout: 10s");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    pglb.wait_eligible("ro", &["pg1", "pg2"], SETTLE);

    // --- The primary stalls. ---
    let mut rw = wire::login(pglb.port("rw")).expect("rw session");
    wire::query(&mut rw, "SELECT pg_sleep(0.5), 'still here'").expect("send a query");
    let frozen = Freeze::node(&cluster.nodes[0]);
    let stalled_at = Instant::now();
    pglb.wait_state("pg0", "degraded", Duration::from_secs(STALL.as_secs() - 1));
    assert_eq!(pglb.eligible("rw"), ["pg0"], "the only primary stays the rw route");
    // A client arriving during the stall waits (hold_timeout 10s) and is served.
    let port = pglb.port("rw");
    let arriving = thread::spawn(move || (where_am_i(port), Instant::now()));
    thread::sleep(STALL.saturating_sub(stalled_at.elapsed()));
    let thawed = Instant::now();
    frozen.thaw();
    let (landed, served_at) = arriving.join().expect("client thread");
    assert_eq!(landed, Ok((cluster.nodes[0].port, false)), "the client that arrived during the stall");
    assert!(served_at >= thawed, "served before the node resumed?");
    // The query in flight finishes, and the session goes on.
    loop {
        let (tag, body) = wire::read_message(&mut rw).expect("the query in flight finishes");
        assert_ne!(tag, b'E', "{}", String::from_utf8_lossy(&body));
        if tag == b'Z' {
            break;
        }
    }
    assert!(run(&mut rw, "SELECT 1").contains(&b'D'));
    pglb.wait_state("pg0", "healthy", SETTLE);

    // --- A replica stalls: new reads go to the other one; its sessions survive. ---
    let mut on_pg1 = session_on(&pglb, "ro", "pg1");
    let frozen = Freeze::node(&cluster.nodes[1]);
    let stalled_at = Instant::now();
    pglb.wait_state("pg1", "degraded", Duration::from_secs(STALL.as_secs() - 1));
    assert_eq!(pglb.eligible("ro"), ["pg2"]);
    for _ in 0..4 {
        let t = Instant::now();
        assert_eq!(where_am_i(pglb.port("ro")), Ok((cluster.nodes[2].port, true)));
        assert!(t.elapsed() < Duration::from_secs(2), "a read waited on the stalled replica");
    }
    thread::sleep(STALL.saturating_sub(stalled_at.elapsed()));
    frozen.thaw();
    assert!(run(&mut on_pg1, "SELECT 1").contains(&b'D'), "the stalled replica's session goes on");
    pglb.wait_eligible("ro", &["pg1", "pg2"], SETTLE);

    assert_eq!(closed_sessions(&pglb), 0.0, "pglb closed sessions for silence:\n{}", pglb.log());
    assert!(!pglb.log().contains("closing session"), "{}", pglb.log());
    assert!(pglb.metric("pglb_health_check_failures_total", &[("backend", "pg0"), ("class", "timeout")]) >= 2.0);
    assert!(pglb.log().contains("backend is degraded"), "{}", pglb.log());

    // --- A stall longer than down_after: down, and the sessions close. ---
    let short = Yaml::for_cluster(&cluster)
        .health(&format!("{HEALTH}\n  down_after: 2s"))
        .listener("rw", "role: primary\n    hold_timeout: 1s");
    let impatient = Pglb::start(&short);
    impatient.wait_eligible("rw", &["pg0"], SETTLE);
    let mut doomed = wire::login(impatient.port("rw")).expect("rw session");
    let frozen = Freeze::node(&cluster.nodes[0]);
    // No silent hang: a client whose backend does not answer its startup
    // within hold_timeout (1s here) gets 57P03 naming the backend.
    let err =
        pglb_tests::psql::psql(impatient.port("rw"), "SELECT 1", &[]).expect_err("the frozen primary cannot answer");
    assert!(err.contains("pglb: backend \"pg0\" did not answer within 1s"), "{err}");
    impatient.wait_state("pg0", "down", Duration::from_secs(6));
    let ended = wire::read_to_eof(&mut doomed);
    frozen.thaw();
    assert!(ended.is_ok(), "the session was not closed cleanly: {ended:?}");
    assert_eq!(impatient.metric("pglb_sessions_closed_total", &[("reason", "backend_down")]), 1.0);
    assert_eq!(impatient.metric("pglb_clients_rejected_total", &[("reason", "backend_silent")]), 1.0);
    assert!(impatient.log().contains("silent for too long"), "{}", impatient.log());
    impatient.wait_state("pg0", "healthy", SETTLE);
    // The patient pglb saw the same stall and closed nothing.
    assert_eq!(closed_sessions(&pglb), 0.0, "{}", pglb.log());
}
