//! Role changes cost clients nothing: a login a backend turns away for its
//! own state (57P03 shutting down, 57P01) is routed again instead of
//! passed on; clients are held across switchovers and crash restarts; a
//! primary restarting in place serves on its first good check; a demoted
//! primary serves no reads until it streams on the new timeline; checks
//! speed up while the primary is silent; held clients are let through at
//! `release_rate`, in arrival order.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pglb_cluster::{Cluster, Spec};
use pglb_tests::cluster::{create_check_users, shared_cluster};
use pglb_tests::fault::Freeze;
use pglb_tests::pglb::named;
use pglb_tests::psql::{psql, where_am_i};
use pglb_tests::writers::Writers;
use pglb_tests::{wait_until, Pglb, Yaml};

const SETTLE: Duration = Duration::from_secs(20);

/// A backend in front of a real server that passes the check user's
/// logins through and, while `refusing`, answers every other login with
/// `FATAL 57P03 the database system is shutting down`, as a primary in
/// fast shutdown does.
struct Refusing {
    port: u16,
    refusing: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
}

impl Refusing {
    fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let refusing = Arc::new(AtomicBool::new(true));
        let refused = Arc::new(AtomicUsize::new(0));
        let (on, count) = (refusing.clone(), refused.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (on, count) = (on.clone(), count.clone());
                std::thread::spawn(move || serve(client, upstream, &on, &count));
            }
        });
        Self { port, refusing, refused }
    }
}

fn serve(mut client: TcpStream, upstream: u16, refusing: &AtomicBool, refused: &AtomicUsize) {
    let Some(startup) = read_startup(&mut client) else { return };
    let is_check = startup.windows(11).any(|w| w == b"pglb_check\0");
    if !is_check && refusing.load(Ordering::SeqCst) {
        refused.fetch_add(1, Ordering::SeqCst);
        let _ = client.write_all(&fatal("57P03", "the database system is shutting down"));
        return;
    }
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)) else { return };
    if server.write_all(&startup).is_err() {
        return;
    }
    let (Ok(mut c2), Ok(mut s2)) = (client.try_clone(), server.try_clone()) else { return };
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut s2, &mut c2);
        let _ = c2.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut client, &mut server);
    let _ = server.shutdown(std::net::Shutdown::Write);
}

/// The StartupMessage, after answering N to an SSLRequest.
fn read_startup(client: &mut TcpStream) -> Option<Vec<u8>> {
    loop {
        let mut len = [0u8; 4];
        client.read_exact(&mut len).ok()?;
        let n = u32::from_be_bytes(len) as usize;
        if !(8..=10_000).contains(&n) {
            return None;
        }
        let mut rest = vec![0u8; n - 4];
        client.read_exact(&mut rest).ok()?;
        if rest[..4] == [0x04, 0xd2, 0x16, 0x2f] {
            client.write_all(b"N").ok()?;
            continue;
        }
        return Some([&len[..], &rest].concat());
    }
}

fn fatal(sqlstate: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (tag, value) in [(b'S', "FATAL"), (b'C', sqlstate), (b'M', message)] {
        body.push(tag);
        body.extend(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = vec![b'E'];
    out.extend(((body.len() + 4) as u32).to_be_bytes());
    out.extend(body);
    out
}

/// A backend turning logins away with 57P03 while its checks pass (the
/// moment between a primary's shutdown starting and its checks noticing,
/// made to last): clients never see the refusal. ro clients go to the other
/// replica; rw clients are held and routed again until the backend takes
/// them; with holding off, the client is told what the backend said.
#[test]
fn a_login_turned_away_for_the_servers_state_is_routed_again_not_passed_on() {
    let cluster = shared_cluster();
    let primary = Refusing::start(cluster.nodes[0].port);
    let replica = Refusing::start(cluster.nodes[1].port);
    let mut yaml = Yaml::for_cluster(&cluster)
        .listener("rw", "role: primary\n    hold_timeout: 20s")
        .listener("rw_nohold", "role: primary\n    hold_timeout: 0s")
        .listener("ro", "role: replica");
    yaml.backends[0].1 = format!("address: 127.0.0.1:{}", primary.port);
    yaml.backends[1].1 = format!("address: 127.0.0.1:{}", replica.port);
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    pglb.wait_eligible("ro", &["pg1", "pg2"], SETTLE);

    // ro: pg1 turns every login away; every client lands on pg2.
    for _ in 0..12 {
        assert_eq!(where_am_i(pglb.port("ro")), Ok((cluster.nodes[2].port, true)));
    }
    assert!(replica.refused.load(Ordering::SeqCst) > 0, "round robin never tried pg1");
    let refusals = pglb.metric("pglb_backend_login_refusals_total", &[("listener", "ro"), ("backend", "pg1")]);
    assert!(refusals >= 1.0, "{refusals}\n{}", pglb.log());

    // rw: the only primary refuses for a while; a client arriving then is
    // served once it stops refusing, and sees no error.
    let port = pglb.port("rw");
    let client = std::thread::spawn(move || where_am_i(port));
    wait_until("pg0 to turn the rw client away", Duration::from_secs(10), || {
        match primary.refused.load(Ordering::SeqCst) {
            0 => Err("not yet".to_owned()),
            n => Ok(n),
        }
    });
    // Without holding, the client is told what the backend said.
    let err = psql(pglb.port("rw_nohold"), "SELECT 1", &[]).expect_err("turned away, not held");
    assert!(
        err.contains("pglb: cannot connect to any backend for listener \"rw_nohold\": the database system is shutting down (57P03)"),
        "{err}"
    );
    primary.refusing.store(false, Ordering::SeqCst);
    assert_eq!(client.join().expect("client"), Ok((cluster.nodes[0].port, false)));
    assert!(pglb.log().contains("backend turned the login away for its own state; routing the client again"));
}

/// Switchovers (a clean stop of the primary, a promotion, the old primary
/// following the new one) and `kill -9` crash restarts, under a writer
/// opening a new connection every 10 ms: no plaintext connection fails.
/// TLS logins are encrypted end to end (pglb cannot read a refusal): their
/// failures are counted and reported. A primary restarting in place serves
/// on its first good check, not after `rise`.
#[test]
fn switchovers_and_crash_restarts_fail_no_plaintext_connection() {
    let cluster =
        Cluster::start(&Spec { tag: "roles".into(), replicas: 1, ssl: true, ..Spec::default() }).expect("cluster");
    create_check_users(&cluster);
    let yaml = Yaml::for_cluster(&cluster)
        .health("interval: 500ms\n  timeout: 500ms\n  rise: 5\n  fall: 2\n  user: pglb_check\n  sslmode: disable")
        .listener("rw", "role: primary\n    hold_timeout: 10s");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    let port = pglb.port("rw");
    let plain = Writers::start(port, Duration::from_millis(10));
    let tls = Writers::start_with(port, Duration::from_millis(10), true);
    let t0 = Instant::now();
    let back_on = |node: usize, since: Instant, what: &str| {
        let on = cluster.nodes[node].port;
        wait_until(what, Duration::from_secs(60), || {
            match [&plain, &tls].iter().all(|w| w.first_ack_on(on, since).is_some()) {
                true => Ok(()),
                false => Err(format!("writers not yet acknowledged by pg{node}")),
            }
        });
    };
    back_on(0, t0, "writes through pglb");

    let mut primary = 0;
    for round in 1..=3 {
        let (old, new) = (primary, 1 - primary);
        let since = Instant::now();
        cluster.nodes[old].stop("fast");
        cluster.nodes[new].promote().expect("promote");
        cluster.follow(&cluster.nodes[old], &cluster.nodes[new]).expect("the old primary follows the new one");
        back_on(new, since, &format!("switchover {round}: writes on pg{new}"));
        // As Patroni would, switch back only to a replica that is in service.
        pglb.wait_state(&format!("pg{old}"), "healthy", SETTLE);
        report(&format!("switchover {round}"), &plain, &tls, since);
        primary = new;
    }

    let mut taken_back = Vec::new();
    for round in 1..=2 {
        let node = &cluster.nodes[primary];
        let name = format!("pg{primary}");
        let since = Instant::now();
        node.signal("KILL").expect("kill -9 the postmaster");
        pglb.wait_state(&name, "down", Duration::from_secs(10));
        // The old server processes exit on their postmaster's death; until
        // they have, a new postmaster refuses to start.
        wait_until("PostgreSQL to start again", Duration::from_secs(60), || node.start().map_err(|e| e.to_string()));
        // PostgreSQL says it is ready: count the checks until rw uses it.
        let checks = pglb.checks(&name);
        let taken_back_after = wait_until("rw to use the restarted primary", Duration::from_secs(30), || {
            match pglb.eligible("rw") == [name.clone()] {
                true => Ok(pglb.checks(&name) - checks),
                false => Err(format!("rw: {:?}", pglb.eligible("rw"))),
            }
        });
        taken_back.push(taken_back_after);
        back_on(primary, since, &format!("crash restart {round}: writes on {name}"));
        report(&format!("crash restart {round}"), &plain, &tls, since);
    }

    let plain_failed = plain.failed_connections_since(t0);
    let tls_failed = tls.failed_connections_since(t0);
    eprintln!(
        "3 switchovers, 2 crash restarts: failed new connections: plaintext {plain_failed}, TLS {tls_failed}; \
         failed writes on kept sessions: plaintext {}, TLS {}; TLS errors: {:?}",
        plain.failures_since(t0).1,
        tls.failures_since(t0).1,
        tls.errors_since(t0)
    );
    eprintln!("checks a restarted primary needed before rw used it (rise 5): {taken_back:?}");
    assert_eq!(plain_failed, 0, "{:?}\n{}", plain.errors_since(t0), pglb.log());
    assert!(taken_back.iter().all(|&n| n <= 2.0), "checks before rw used the restarted primary: {taken_back:?}");
}

/// One event's cost to the writers since `since`, on stderr.
fn report(event: &str, plain: &Writers, tls: &Writers, since: Instant) {
    std::thread::sleep(Duration::from_millis(500));
    eprintln!(
        "{event}: failed new connections: plaintext {}, TLS {}; longest time without an acknowledged write on new connections {:.2} s",
        plain.failed_connections_since(since),
        tls.failed_connections_since(since),
        plain.longest_gap_since(since).as_secs_f64()
    );
}

/// An old primary restarted as a replica without a rewind (it holds writes
/// the promotion discarded): healthy, in recovery, its WAL position close —
/// and never in ro until it streams on the new timeline. While the primary
/// is frozen, the other backends are checked at `fast_interval`.
#[test]
fn a_demoted_primary_serves_no_reads_until_it_streams_on_the_new_timeline() {
    let cluster = Cluster::start(&Spec { tag: "rejoin".into(), replicas: 1, ..Spec::default() }).expect("cluster");
    create_check_users(&cluster);
    let yaml = Yaml::for_cluster(&cluster)
        .health(
            "interval: 1s\n  fast_interval: 100ms\n  timeout: 500ms\n  rise: 2\n  fall: 2\n  user: pglb_check\n  sslmode: disable",
        )
        .listener("rw", "role: primary")
        .listener("ro", "role: replica\n    fallback: primary");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("ro", &["pg1"], SETTLE);
    let (pg0, pg1) = (&cluster.nodes[0], &cluster.nodes[1]);

    // The primary goes silent: while it is degraded, pg1 is checked at the
    // fast pace (at `interval` it would get 3 checks in 3 s).
    pglb.wait_checks(&["pg1"], 3.0, Duration::from_secs(10));
    {
        let _frozen = Freeze::node(pg0);
        pglb.wait_state("pg0", "degraded", Duration::from_secs(10));
        // Past the settling window the change itself opens (2 × interval +
        // fast_interval)...
        pglb.wait_checks(&["pg1"], 25.0, Duration::from_secs(30));
        // ...checks still run at the fast pace while the primary is silent.
        pglb.wait_checks(&["pg1"], 10.0, Duration::from_secs(3));
    }
    pglb.wait_state("pg0", "healthy", Duration::from_secs(10));

    // pg1 stops following; pg0 takes writes pg1 never gets; pg1 is promoted.
    pg1.sql("ALTER SYSTEM SET primary_conninfo = ''").expect("cut pg1 off");
    pg1.sql("SELECT pg_reload_conf()").expect("reload pg1");
    pg1.wait_for("SELECT count(*) FROM pg_stat_wal_receiver", "0", Duration::from_secs(10)).expect("pg1 cut off");
    pg0.sql("CREATE TABLE discarded (id int); INSERT INTO discarded SELECT generate_series(1, 5)").expect("writes");
    pg0.stop("fast");
    pg1.promote().expect("promote pg1");
    pglb.wait_eligible("rw", &["pg1"], SETTLE);
    // pg0 comes back as a replica of pg1, not rewound: its WAL receiver
    // cannot follow timeline 2.
    cluster.follow(pg0, pg1).expect("start pg0 as a standby");
    pglb.wait_state("pg0", "healthy", SETTLE);
    let seen = Instant::now();
    let checks = pglb.checks("pg0");
    while pglb.checks("pg0") < checks + 8.0 {
        let status = pglb.status();
        let ro = named(&status["listeners"], "ro");
        assert!(
            !ro["eligible"].as_array().is_some_and(|e| e.iter().any(|b| b == "pg0")),
            "pg0 (not rewound) entered ro {:?} after it came back:\n{}",
            seen.elapsed(),
            serde_json::to_string_pretty(&status).unwrap_or_default()
        );
        let (port, _) = where_am_i(pglb.port("ro")).expect("a read");
        assert_ne!(port, pg0.port, "a read reached pg0, which holds discarded writes");
        assert!(seen.elapsed() < Duration::from_secs(60), "pg0 is not being checked");
    }
    let b = pglb.backend("pg0");
    assert_eq!((b["state"].as_str(), b["role"].as_str()), (Some("healthy"), Some("replica")), "{b}");
    assert!(b["rejoining"].as_str().is_some_and(|w| w.contains("timeline 2")), "{b}");

    // Rebuilt from pg1, it streams on timeline 2 and serves reads again.
    cluster.rebuild_replica(pg0, pg1).expect("rebuild pg0");
    pglb.wait_eligible("ro", &["pg0"], SETTLE);
    assert!(pglb.backend("pg0")["rejoining"].is_null());
}

/// 2,000 clients held while there is no primary reach the promoted one at
/// no more than `release_rate` new connections a second, in arrival order,
/// all served.
#[test]
fn held_clients_are_let_through_at_the_release_rate_in_arrival_order() {
    const CLIENTS: usize = 2000;
    const RATE: usize = 500;
    raise_fd_limit(3 * CLIENTS as u64 + 1000);
    let cluster = Cluster::start(&Spec { tag: "release".into(), replicas: 1, ..Spec::default() }).expect("cluster");
    create_check_users(&cluster);
    let yaml = Yaml::for_cluster(&cluster)
        .top(&format!("limits:\n  max_pending: {}\n  max_pending_per_source: {}", 3 * CLIENTS, 3 * CLIENTS))
        .listener(
            "rw",
            &format!("role: primary\n    hold_timeout: 120s\n    hold_max: {CLIENTS}\n    release_rate: {RATE}"),
        );
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    cluster.nodes[0].stop("immediate");
    pglb.wait_eligible("rw", &[], SETTLE);

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    let port = pglb.port("rw");
    let served = runtime.block_on(async {
        let mut clients = Vec::with_capacity(CLIENTS);
        for i in 0..CLIENTS {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect to pglb");
            tokio::io::AsyncWriteExt::write_all(&mut s, &pglb_tests::wire::startup_message(0, &[]))
                .await
                .expect("startup");
            clients.push((i, s));
        }
        clients
    });
    wait_until("every client held", Duration::from_secs(30), || {
        let held = pglb.metric("pglb_clients_held", &[("listener", "rw")]);
        if held as usize == CLIENTS {
            Ok(())
        } else {
            Err(format!("{held} held"))
        }
    });
    cluster.nodes[1].promote().expect("promote");
    let results = runtime.block_on(async {
        let tasks: Vec<_> = served
            .into_iter()
            .map(|(i, mut s)| {
                tokio::spawn(async move {
                    let ready = tokio::time::timeout(Duration::from_secs(60), ready_for_query(&mut s)).await;
                    (i, ready.ok().and_then(Result::ok).map(|()| Instant::now()))
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("client task"));
        }
        out
    });
    let failed: Vec<usize> = results.iter().filter(|(_, at)| at.is_none()).map(|(i, _)| *i).collect();
    assert!(failed.is_empty(), "{} of {CLIENTS} clients not served\n{}", failed.len(), pglb.log());
    let mut times: Vec<(Instant, usize)> = results.iter().filter_map(|(i, at)| at.map(|t| (t, *i))).collect();
    times.sort();
    let (first, last) = (times[0].0, times[CLIENTS - 1].0);
    let spread = last.duration_since(first);
    // At most RATE starts a second, in bursts of RATE/20: 2,000 need at
    // least (2000 - 25) / 500 s.
    let floor = Duration::from_secs_f64((CLIENTS - RATE / 20) as f64 / RATE as f64 * 0.9);
    assert!(spread >= floor, "{CLIENTS} clients served within {spread:?}: faster than {RATE}/s");
    let busiest = (0..CLIENTS)
        .map(|k| times[k..].iter().take_while(|(t, _)| t.duration_since(times[k].0) < Duration::from_secs(1)).count())
        .max()
        .unwrap_or(0);
    // (Times are taken where the test reads the answers: a little slack.)
    assert!(busiest <= RATE + RATE / 20 + RATE / 5, "{busiest} clients served within one second");
    // Arrival order: the first tenth to arrive is served before the last tenth.
    let rank = |i: usize| times.iter().position(|(_, j)| *j == i).unwrap_or(CLIENTS);
    let early = (0..CLIENTS / 10).map(rank).max().unwrap_or(CLIENTS);
    let late = (CLIENTS - CLIENTS / 10..CLIENTS).map(rank).min().unwrap_or(0);
    assert!(early < late, "arrival order not kept: an early client served at {early}, a late one at {late}");
    eprintln!(
        "{CLIENTS} held clients served in {:.2} s at release_rate {RATE}: {:.0}/s, busiest second {busiest}",
        spread.as_secs_f64(),
        (CLIENTS - 1) as f64 / spread.as_secs_f64()
    );
}

/// Reads a fresh session's answer up to ReadyForQuery.
async fn ready_for_query(s: &mut tokio::net::TcpStream) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    loop {
        let tag = s.read_u8().await?;
        let len = s.read_u32().await? as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        s.read_exact(&mut body).await?;
        match tag {
            b'Z' => {
                // Terminate, then close.
                let _ = tokio::io::AsyncWriteExt::write_all(s, &[b'X', 0, 0, 0, 4]).await;
                return Ok(());
            }
            b'E' => return Err(std::io::Error::other(String::from_utf8_lossy(&body).into_owned())),
            _ => {}
        }
    }
}

/// Room for thousands of sockets here and in the pglb this test starts.
fn raise_fd_limit(want: u64) {
    if let Ok((soft, hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
        if soft < want {
            let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, want.min(hard), hard);
        }
    }
}
