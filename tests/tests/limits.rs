//! Connection limits: beyond a backend's `max_connections` or a listener's
//! `max_clients`, clients queue for `queue_timeout`, then get 53300; a freed
//! place lets a queued client through. Shared cluster (nothing is disturbed).

use std::time::{Duration, Instant};

use pglb_tests::psql::psql;
use pglb_tests::{shared_cluster, wait_until, wire, Pglb, Yaml};

fn gauge(pglb: &Pglb, prefix: &str) -> String {
    pglb.metrics().lines().find(|l| l.starts_with(prefix)).unwrap_or_default().to_owned()
}

#[test]
fn backend_max_connections_queues_then_refuses_with_53300() {
    let cluster = shared_cluster();
    let mut yaml = Yaml::for_cluster(&cluster).listener("rw", "role: primary\n    queue_timeout: 1s");
    yaml.backends[0].1.push_str("\n    max_connections: 2");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("rw", &["pg0"], Duration::from_secs(15));
    let a = wire::login(pglb.port("rw")).expect("first");
    let _b = wire::login(pglb.port("rw")).expect("second");
    let t0 = Instant::now();
    let err = psql(pglb.port("rw"), "SELECT 1", &[]).expect_err("third is over the limit");
    assert!(t0.elapsed() >= Duration::from_millis(900), "refused before queue_timeout");
    assert!(err.contains("too many connections"), "{err}");
    assert!(pglb.metrics().contains("pglb_clients_rejected_total{listener=\"rw\",reason=\"queue_timeout\"} 1"));
    // A queued client goes through as soon as a place frees.
    let port = pglb.port("rw");
    let queued = std::thread::spawn(move || psql(port, "SELECT 'through'", &[]));
    wait_until("a queued client", Duration::from_secs(5), || {
        let g = gauge(&pglb, "pglb_clients_queued{listener=\"rw\"}");
        if g.ends_with(" 1") {
            Ok(())
        } else {
            Err(g)
        }
    });
    drop(a);
    assert_eq!(queued.join().expect("thread"), Ok("through".into()));
}

#[test]
fn listener_max_clients_queues_then_refuses_and_frees_on_disconnect() {
    let cluster = shared_cluster();
    let yaml = Yaml::for_cluster(&cluster).listener("rw", "role: primary\n    max_clients: 1\n    queue_timeout: 3s");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("rw", &["pg0"], Duration::from_secs(15));
    let a = wire::login(pglb.port("rw")).expect("first");
    // A queued client that hangs up frees its place at once.
    let quitter = wire::start_up(pglb.port("rw")).expect("a client that will queue");
    wait_until("one queued client", Duration::from_secs(5), || {
        let g = gauge(&pglb, "pglb_clients_queued{listener=\"rw\"}");
        if g.ends_with(" 1") {
            Ok(())
        } else {
            Err(g)
        }
    });
    drop(quitter);
    wait_until("the queue to empty", Duration::from_secs(5), || {
        let g = gauge(&pglb, "pglb_clients_queued{listener=\"rw\"}");
        if g.ends_with(" 0") {
            Ok(())
        } else {
            Err(g)
        }
    });
    let err = psql(pglb.port("rw"), "SELECT 1", &[]).expect_err("over max_clients");
    assert!(err.contains("too many connections"), "{err}");
    drop(a);
    wait_until("a place to free", Duration::from_secs(5), || psql(pglb.port("rw"), "SELECT 1", &[]).map(|_| ()));
}
