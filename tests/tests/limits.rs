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
    assert!(pglb
        .metrics()
        .contains("pglb_clients_rejected_total{cluster=\"default\",listener=\"rw\",reason=\"queue_timeout\"} 1"));
    // A queued client goes through as soon as a place frees.
    let port = pglb.port("rw");
    let queued = std::thread::spawn(move || psql(port, "SELECT 'through'", &[]));
    wait_until("a queued client", Duration::from_secs(5), || {
        let g = gauge(&pglb, "pglb_clients_queued{cluster=\"default\",listener=\"rw\"}");
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
        let g = gauge(&pglb, "pglb_clients_queued{cluster=\"default\",listener=\"rw\"}");
        if g.ends_with(" 1") {
            Ok(())
        } else {
            Err(g)
        }
    });
    drop(quitter);
    wait_until("the queue to empty", Duration::from_secs(5), || {
        let g = gauge(&pglb, "pglb_clients_queued{cluster=\"default\",listener=\"rw\"}");
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

/// A connection from `source` to 127.0.0.1:`port` that sends nothing.
fn silent_from(source: std::net::Ipv4Addr, port: u16) -> std::io::Result<std::net::TcpStream> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.bind(&std::net::SocketAddr::from((source, 0)).into())?;
    socket.connect_timeout(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into(), Duration::from_secs(5))?;
    Ok(socket.into())
}

/// Whether pglb has answered or closed `conn` (a refusal), without waiting.
fn answered(conn: &std::net::TcpStream) -> bool {
    let _ = conn.set_nonblocking(true);
    !matches!(conn.peek(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// 20,000 connections that never send a first message, from 1,000 loopback
/// addresses, at a pglb allowed 1,024 file descriptors: the pending budget
/// (by default a quarter of the fd limit, 256) takes the first ones and
/// refuses the rest at accept with 53300, so pglb's descriptors stay
/// bounded, it never runs out of them (no accept error), and a session
/// opened before the flood keeps working. Then one address alone is held
/// to its own cap (a quarter of the budget, 64) while another gets in.
#[test]
fn a_flood_of_silent_connections_is_refused_and_sessions_keep_working() {
    let cluster = shared_cluster();
    let yaml = Yaml::for_cluster(&cluster).listener("rw", "role: primary\n    startup_timeout: 60s");
    let pglb = Pglb::start_wrapped(&yaml, &[], &["prlimit", "--nofile=1024:1024", "--"]);
    pglb.wait_eligible("rw", &["pg0"], Duration::from_secs(15));
    let port = pglb.port("rw");
    assert_eq!(pglb.metric("pglb_pending_connections_limit", &[]), 256.0, "a quarter of 1,024 descriptors");
    let mut session = wire::login(port).expect("a session opened before the flood");
    let base = open_fds(pglb.pid());

    let (mut kept, mut refused, mut most) = (Vec::new(), 0usize, base);
    let mut refusal = None;
    let started = Instant::now();
    for i in 0..20_000u32 {
        let k = i % 1_000;
        let source = std::net::Ipv4Addr::new(127, 1, (k / 250) as u8, (k % 250 + 1) as u8);
        kept.push(silent_from(source, port).unwrap_or_else(|e| panic!("connection {i} from {source}: {e}")));
        if i % 500 == 499 {
            let (gone, open): (Vec<_>, Vec<_>) = kept.into_iter().partition(answered);
            refused += gone.len();
            refusal = refusal.or_else(|| gone.into_iter().next());
            kept = open;
            most = most.max(open_fds(pglb.pid()));
        }
        if i % 5_000 == 4_999 {
            assert_eq!(wire::scalar(&mut session, "SELECT 42").as_deref(), Ok("42"), "the session, during the flood");
        }
    }
    let flood_s = started.elapsed().as_secs_f64();
    wait_until("every refusal to arrive", Duration::from_secs(10), || {
        let (gone, open): (Vec<_>, Vec<_>) = std::mem::take(&mut kept).into_iter().partition(answered);
        refused += gone.len();
        kept = open;
        if kept.len() <= 256 {
            Ok(())
        } else {
            Err(format!("{} still open", kept.len()))
        }
    });
    most = most.max(open_fds(pglb.pid()));
    println!(
        "flood: 20000 connections in {flood_s:.1}s; {} held, {refused} refused; pglb fds {base} before, at most {most}",
        kept.len()
    );
    assert_eq!(kept.len(), 256, "the budget is taken whole and no more");
    assert!(most <= base + 256 + 16, "pglb's descriptors grew from {base} to {most} (budget 256)");
    assert_eq!(pglb.metric("pglb_accept_errors_total", &[("listener", "rw")]), 0.0, "pglb ran out of descriptors");
    let counted = pglb.metric("pglb_clients_rejected_total", &[("listener", "rw"), ("reason", "pending_full")]);
    assert_eq!(counted as usize, refused, "every refusal is counted");
    let mut answer = Vec::new();
    let mut refusal = refusal.expect("a refused connection");
    let _ = refusal.set_nonblocking(false);
    let _ = std::io::Read::read_to_end(&mut refusal, &mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with('E') && answer.contains("53300"), "a refusal is a FATAL 53300: {answer:?}");
    assert!(answer.contains("limits.max_pending"), "{answer:?}");
    let lines = pglb.log().matches("the pending budget is full").count();
    assert!((1..=(flood_s as usize + 3)).contains(&lines), "{lines} log lines in {flood_s:.1}s: one a second at most");
    assert_eq!(wire::scalar(&mut session, "SELECT 43").as_deref(), Ok("43"), "the session, after the flood");
    // A real client while the budget is full: refused at once. libpq shows
    // the text when it did not ask for TLS first; with sslmode=prefer it
    // says only that an error came during the TLS exchange (libpq since
    // 2024 shows no text sent before TLS).
    let err = psql(port, "SELECT 1", &[("PGSSLMODE", "disable")]).expect_err("the budget is still full");
    assert!(err.contains("too many connections waiting"), "{err}");
    let err = psql(port, "SELECT 1", &[]).expect_err("the budget is still full");
    assert!(
        err.contains("error response during SSL exchange") || err.contains("too many connections waiting"),
        "{err}"
    );

    drop(kept);
    wait_until("the budget to empty", Duration::from_secs(10), || match pglb.metric("pglb_pending_connections", &[]) {
        0.0 => Ok(()),
        n => Err(format!("{n}")),
    });
    assert_eq!(psql(port, "SELECT 'in'", &[]), Ok("in".into()));

    // One source: 64 places (a quarter of the budget), then refused, while
    // another source still gets in.
    let one = std::net::Ipv4Addr::new(127, 2, 0, 1);
    let held: Vec<_> = (0..64).map(|_| silent_from(one, port).expect("within the source's cap")).collect();
    let mut over = silent_from(one, port).expect("connect");
    let _ = over.set_read_timeout(Some(Duration::from_secs(5)));
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut over, &mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.contains("53300") && answer.contains("from 127.2.0.1"), "{answer:?}");
    assert!(held.iter().all(|c| !answered(c)), "the 64 within the cap stay open");
    let other = silent_from(std::net::Ipv4Addr::new(127, 2, 0, 2), port).expect("connect");
    let mut other = wire::start_up_on(other).expect("another source logs in");
    assert_eq!(wire::scalar(&mut other, "SELECT 7").as_deref(), Ok("7"));
    let per_source =
        pglb.metric("pglb_clients_rejected_total", &[("listener", "rw"), ("reason", "source_pending_full")]);
    assert_eq!(per_source, 1.0);
}

/// A client that vanishes (its host gone: nothing it sends arrives, nothing
/// sent to it is acknowledged) while its answer is being sent: pglb's
/// writes to it go unacknowledged, and after `client_tcp_user_timeout`
/// the kernel gives up on the socket, so pglb closes the session and the
/// backend's process ends, instead of the ~15 minutes of retransmissions
/// during which the backend session would stay taken.
#[test]
fn a_vanished_client_frees_its_backend_session_after_client_tcp_user_timeout() {
    let cluster = shared_cluster();
    let yaml = Yaml::for_cluster(&cluster).listener("rw", "role: primary\n    client_tcp_user_timeout: 2s");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("rw", &["pg0"], Duration::from_secs(15));
    let mut client = wire::start_up_with(pglb.port("rw"), 0, &[("application_name", "vanishing")]).expect("connect");
    loop {
        match wire::read_message(&mut client).expect("login") {
            (b'Z', _) => break,
            (b'E', body) => panic!("login refused: {}", String::from_utf8_lossy(&body)),
            _ => {}
        }
    }
    let sessions = || {
        cluster.nodes[0]
            .sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'vanishing'")
            .expect("count the backend sessions")
    };
    assert_eq!(sessions(), "1");
    // The answer comes a second after the client is cut off.
    wire::query(&mut client, "SELECT pg_sleep(1); SELECT repeat('x', 1000000)").expect("send the query");
    let port = client.local_addr().expect("client address").port();
    let Some(_cut) = pglb_tests::fault::Partition::port(port) else { return };
    let cut_at = Instant::now();
    wait_until("the backend session to end", Duration::from_secs(30), || match sessions().as_str() {
        "0" => Ok(()),
        n => Err(format!("{n} backend session(s) after {:.1}s", cut_at.elapsed().as_secs_f64())),
    });
    println!("backend session ended {:.1}s after the client was cut off", cut_at.elapsed().as_secs_f64());
    assert!(pglb.log().contains("end=\"client_error\""), "{}", pglb.log());
}
