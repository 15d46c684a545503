//! A monitoring failure is not a node failure: when the check user's
//! password is rotated and every check connection is cut, no backend leaves
//! service and no session closes; the failure is loud in `/status`, the
//! metrics and the log; writing the new password to the password file (no
//! SIGHUP) clears it, because the file is read again before each login.
//! Own cluster.

use std::time::Duration;

use pglb_cluster::{Cluster, Spec};
use pglb_tests::psql::where_am_i;
use pglb_tests::{wait_until, wire, Pglb, Yaml};

const USER: &str = "pglb_rotating";
const SETTLE: Duration = Duration::from_secs(20);

#[test]
fn a_rotated_check_password_leaves_every_backend_in_service_until_the_file_is_fixed() {
    let spec = Spec {
        tag: "rotate".into(),
        replicas: 1,
        hba: vec![format!("host all {USER} 127.0.0.1/32 scram-sha-256")],
        ..Spec::default()
    };
    let cluster = Cluster::start(&spec).expect("cluster");
    let primary = cluster.primary();
    primary
        .sql(&format!(
            "SET password_encryption = 'scram-sha-256'; CREATE ROLE {USER} LOGIN PASSWORD 'before-s3cret'; GRANT pg_monitor TO {USER};"
        ))
        .expect("create the check user");
    let replica = &cluster.nodes[1];
    replica
        .wait_for(&format!("SELECT count(*) FROM pg_roles WHERE rolname = '{USER}'"), "1", SETTLE)
        .expect("replicated");

    let mut yaml = Yaml::for_cluster(&cluster).listener("rw", "role: primary").listener("ro", "role: replica");
    yaml.health = format!(
        "interval: 500ms\n  timeout: 500ms\n  rise: 2\n  fall: 2\n  user: {USER}\n  password_file: check-password\n  sslmode: disable"
    );
    // The password file sits beside the config (relative paths start there).
    let pglb = Pglb::start(&yaml.file("check-password", "before-s3cret\n"));
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    pglb.wait_eligible("ro", &["pg1"], SETTLE);
    let mut rw = wire::login(pglb.port("rw")).expect("rw session");
    let mut ro = wire::login(pglb.port("ro")).expect("ro session");

    // Rotate the password (it replicates) and cut every check connection.
    primary.sql(&format!("ALTER ROLE {USER} PASSWORD 'rotated-s3cret'")).expect("rotate");
    let stored = primary.sql(&format!("SELECT rolpassword FROM pg_authid WHERE rolname = '{USER}'")).expect("read");
    replica
        .wait_for(&format!("SELECT rolpassword FROM pg_authid WHERE rolname = '{USER}'"), &stored, SETTLE)
        .expect("the new password replicates");
    for node in &cluster.nodes {
        let cut = node
            .sql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'pglb-health'")
            .expect("terminate the check connections");
        assert_ne!(cut, "0", "{}: no check connection to cut", node.name);
    }
    for backend in ["pg0", "pg1"] {
        pglb.wait_state(backend, "unverified", SETTLE);
        let b = pglb.backend(backend);
        assert_eq!(b["last_error_class"], "auth", "{b}");
        assert_eq!(b["up"], true, "{b}");
        assert!(b["last_error"].as_str().is_some_and(|e| e.contains("password")), "{b}");
    }
    // Nothing left service: sessions live on, new clients are served.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(pglb.eligible("rw"), ["pg0"]);
    assert_eq!(pglb.eligible("ro"), ["pg1"]);
    for s in [&mut rw, &mut ro] {
        wire::query(s, "SELECT 1").expect("send");
        let (tag, _) = wire::read_message(s).expect("the session still answers");
        assert_ne!(tag, b'E');
    }
    assert_eq!(where_am_i(pglb.port("rw")), Ok((cluster.nodes[0].port, false)));
    assert_eq!(where_am_i(pglb.port("ro")), Ok((cluster.nodes[1].port, true)));
    assert_eq!(pglb.metric("pglb_sessions_closed_total", &[]), 0.0, "{}", pglb.log());
    assert_eq!(pglb.metric("pglb_backend_state", &[("backend", "pg0"), ("state", "unverified")]), 1.0);
    assert_eq!(pglb.metric("pglb_backend_up", &[("backend", "pg1")]), 1.0);
    assert!(pglb.metric("pglb_health_check_failures_total", &[("backend", "pg0"), ("class", "auth")]) >= 1.0);
    let log = pglb.log();
    assert!(log.contains("backend is unverified"), "{log}");
    assert!(!log.contains("backend is down:"), "{log}");
    assert!(!log.contains("s3cret"), "a password must never be logged");

    // The operator fixes the file; no SIGHUP.
    std::fs::write(pglb.dir.join("check-password"), "rotated-s3cret\n").expect("write the new password");
    for backend in ["pg0", "pg1"] {
        pglb.wait_state(backend, "healthy", SETTLE);
    }
    wait_until("the failure class to clear", SETTLE, || {
        let b = pglb.backend("pg0");
        if b["last_error"].is_null() {
            Ok(())
        } else {
            Err(b.to_string())
        }
    });
}
