//! The kernel data path (`forwarder: sockmap`) beyond the forwarding suite,
//! which runs against every forwarder (tests/tests/forwarding.rs): bytes a
//! client pipelines after its first message, a backend's last message before
//! it closes, sessions demoted mid-answer thousands of times, a duplicated
//! segment (reset and counted on the kernel path, passed on once by splice),
//! byte counts read from the kernel, cancel, sessions pglb closes (disable,
//! shutdown timeout; the bytes moved since the last sample are counted, and
//! a client that reads nothing is closed too), draining on SIGTERM, a reload that changes the
//! forwarder, 2,000 concurrent sessions, `auto` (splice) and `sockmap`
//! without the privileges.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use pglb_cluster::{Cluster, Spec};
use pglb_tests::proc::fd_count;
use pglb_tests::wire::{self, scalar, terminate, wait_closed};
use pglb_tests::{http, shared_cluster, wait_until, Pglb, Yaml};
use serde_json::Value;

const SETTLE: Duration = Duration::from_secs(15);

fn yaml(cluster: &Cluster, top: &str) -> Yaml {
    Yaml::for_cluster(cluster)
        .top(&format!("forwarder: sockmap\n{top}"))
        .listener("rw", "role: primary\n    hold_timeout: 0s")
}

fn start(cluster: &Cluster, top: &str) -> Pglb {
    let pglb = Pglb::start(&yaml(cluster, top));
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    pglb
}

fn sockmap_sessions(pglb: &Pglb) -> f64 {
    pglb.metric("pglb_forwarded_sessions_total", &[("forwarder", "sockmap")])
}

/// Waits until no socket is left in the kernel map.
fn wait_map_empty(pglb: &Pglb) {
    wait_until("the linked sockets to leave the map", SETTLE, || {
        let m = pglb.metrics();
        if m.contains("pglb_sockmap_sockets 0") {
            Ok(())
        } else {
            Err(m)
        }
    });
}

/// Reads until EOF; returns the values of the DataRows seen (first column).
fn rows_until_eof(s: &mut TcpStream) -> Result<Vec<String>, String> {
    let mut rows = Vec::new();
    loop {
        match wire::read_message(s) {
            Ok((b'D', body)) if body.len() >= 6 => rows.push(String::from_utf8_lossy(&body[6..]).into_owned()),
            Ok((b'E', body)) => return Err(String::from_utf8_lossy(&body).into_owned()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(rows),
            Err(e) => return Err(format!("{e} after {rows:?}")),
        }
    }
}

/// Sessions the pipelining test opens: enough to hit the races around the
/// hand-over (one in ~2,500 hung before the program's map was split in two).
const ATTEMPTS: u32 = 1500;

#[test]
fn bytes_pipelined_after_the_first_message_arrive_in_order() {
    let cluster = shared_cluster();
    let pglb = start(&cluster, "");
    let port = pglb.port("rw");
    let after = [wire::query_message("SELECT 1"), wire::query_message("SELECT 2"), b"X\0\0\0\x04".to_vec()].concat();
    for i in 0..ATTEMPTS {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let first = wire::startup_message(0, &[]);
        match i % 3 {
            // In the first message's segment: pglb reads only the first message.
            0 => s.write_all(&[first, after.clone()].concat()).expect("write"),
            // Right behind it, while pglb connects and waits for the server.
            1 => {
                s.write_all(&first).expect("write");
                s.write_all(&after).expect("write");
            }
            // A moment later: around the hand-over to the kernel.
            _ => {
                s.write_all(&first).expect("write");
                std::thread::sleep(Duration::from_micros(200 * u64::from(i % 10)));
                s.write_all(&after).expect("write");
            }
        }
        let rows = rows_until_eof(&mut s).unwrap_or_else(|e| panic!("attempt {i}: {e}"));
        assert_eq!(rows, ["1", "2"], "attempt {i}");
    }
    // A session whose backend has already closed when pglb would link it
    // (all three queries answered) is finished in userspace.
    let (kernel, splice) =
        (sockmap_sessions(&pglb), pglb.metric("pglb_forwarded_sessions_total", &[("forwarder", "splice")]));
    eprintln!("{kernel} sessions on the kernel path, {splice} finished with splice");
    assert_eq!(kernel + splice, ATTEMPTS as f64);
    assert!(kernel >= ATTEMPTS as f64 / 2.0, "{kernel} sessions on the kernel path");
}

/// The kernel takes only established sockets into its map: a backend whose
/// FIN arrives between pglb's last read and the link leaves that session to
/// splice (counted as a `closed` fallback). Every session, on either path,
/// gets the last message whole.
#[test]
fn a_backends_last_message_before_it_closes_arrives_whole_a_thousand_times() {
    let cluster = shared_cluster();
    let pglb = start(&cluster, "");
    let port = pglb.port("rw");
    for i in 0..1000 {
        let mut s = wire::login(port).expect("login");
        wire::query(&mut s, "SELECT pg_terminate_backend(pg_backend_pid())").expect("query");
        let mut last = None;
        loop {
            match wire::read_message(&mut s) {
                Ok(message) => last = Some(message),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => panic!("attempt {i}: {e} after {last:?}"),
            }
        }
        let (tag, body) = last.unwrap_or_else(|| panic!("attempt {i}: nothing before EOF"));
        let text = String::from_utf8_lossy(&body);
        assert_eq!(tag, b'E', "attempt {i}: the last message is the FATAL: {text}");
        assert!(text.contains("C57P01") && text.contains("terminating connection"), "attempt {i}: {text}");
    }
    let kernel = sockmap_sessions(&pglb);
    let splice = pglb.metric("pglb_forwarded_sessions_total", &[("forwarder", "splice")]);
    let fallback = |reason| pglb.metric("pglb_sockmap_fallbacks_total", &[("reason", reason)]);
    eprintln!(
        "{kernel} sessions on the kernel path, {splice} with splice ({} closed before the link)",
        fallback("closed")
    );
    assert_eq!(kernel + splice, 1000.0, "every session forwarded once: {}", pglb.metrics());
    assert_eq!(
        splice,
        fallback("closed"),
        "every session left to splice is a counted `closed` fallback: {}",
        pglb.metrics()
    );
    assert_eq!(fallback("error"), 0.0, "no fallback without a known reason: {}", pglb.log());
    assert!(kernel >= 900.0, "most sessions take the kernel path: {kernel}");
    assert!(pglb.log().contains("not recommended"), "forwarder: sockmap warns at start: {}", pglb.log());
}

/// With demotion forced once 1 MB has crossed (a test-only setting),
/// every session leaves the kernel path mid-answer: held, settled, then
/// copied in userspace. Byte-exact every time, or — when the machine is so
/// busy that loopback drops and retransmits a segment, which the kernel
/// then duplicates (README, "The kernel path") — reset before the
/// duplicate is written and counted as an integrity error: never a wrong
/// byte to the client, and nothing left in the kernel's map. (Before every
/// read was checked, 3 of 2,000 sessions got wrong bytes in a loaded run.)
#[test]
fn sessions_demoted_mid_answer_are_byte_exact_two_thousand_times() {
    const SESSIONS: usize = 2000;
    const THREADS: usize = 8;
    let cluster = shared_cluster();
    let pglb = Pglb::start_with(&yaml(&cluster, ""), &[("PGLB_TEST_SOCKMAP_DEMOTE_AFTER", "1000000")]);
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    let port = pglb.port("rw");
    let admin = pglb.admin;
    let resets = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let resets = &resets;
            scope.spawn(move || {
                for i in (t..SESSIONS).step_by(THREADS) {
                    match demoted_session(port, admin, i) {
                        Ok(()) => {}
                        Err(Demoted::Reset(e)) => {
                            eprintln!("session {i} reset: {e}");
                            resets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(Demoted::Wrong(e)) => panic!("session {i}: {e}"),
                    }
                }
            });
        }
    });
    let resets = resets.into_inner();
    let demoted = pglb.metric("pglb_sockmap_demotions_total", &[]);
    println!("{SESSIONS} sessions demoted mid-answer: {resets} reset for an integrity error, the rest byte-exact");
    assert_eq!(sockmap_sessions(&pglb), SESSIONS as f64, "{}", pglb.metrics());
    assert!(demoted >= (SESSIONS - resets) as f64, "every session was demoted: {}", pglb.metrics());
    assert_eq!(integrity_errors(&pglb), resets as f64, "each reset is a counted integrity error: {}", pglb.log());
    assert!(resets <= SESSIONS / 100, "{resets} of {SESSIONS} sessions reset: {}", pglb.log());
    wait_map_empty(&pglb);
}

/// How a demoted session went wrong: reset by pglb (a connection error), or
/// wrong bytes or messages (a corrupt stream: never acceptable).
enum Demoted {
    Reset(String),
    Wrong(String),
}

/// 251 bytes (a prime period), repeated: a piece of the stream duplicated
/// or lost shifts what follows, which then shows as a wrong byte.
fn pattern() -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    (0..251).map(|i| ALPHABET[i % ALPHABET.len()] as char).collect()
}

/// One session: a row of 5-7 MB whose first 1.5 MB the client reads, then
/// waits for `/connections` to show the session demoted, then reads the
/// rest (reading all the time, so no backlog builds up in the kernel).
fn demoted_session(port: u16, admin: std::net::SocketAddr, i: usize) -> Result<(), Demoted> {
    use Demoted::{Reset, Wrong};
    let mut s = wire::login(port).map_err(|e| Wrong(format!("login: {e}")))?;
    let pattern = pattern();
    let repeats = 20_000 + (i * 7919) % 8_000;
    let size = repeats * pattern.len();
    s.write_all(&wire::query_message(&format!("SELECT repeat('{pattern}', {repeats})")))
        .map_err(|e| Wrong(e.to_string()))?;
    let (tag, _) = wire::read_message(&mut s).map_err(|e| Wrong(format!("row description: {e}")))?;
    let mut head = [0u8; 11];
    s.read_exact(&mut head).map_err(|e| Wrong(format!("data row: {e}")))?;
    if tag != b'T' || head[0] != b'D' || u32::from_be_bytes([head[7], head[8], head[9], head[10]]) as usize != size {
        return Err(Wrong(format!("answer starts {tag} {head:?}")));
    }
    let mut value = vec![0u8; size];
    let first = 1_500_000;
    s.read_exact(&mut value[..first]).map_err(|e| Reset(format!("the first {first} bytes: {e}")))?;
    let me = s.local_addr().map_err(|e| Wrong(e.to_string()))?.to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // `Some(None)`: the session is not listed any more (pglb ended it,
        // e.g. reset for an integrity error): what the client reads says.
        let path = http::get(admin, "/connections").ok().and_then(|(_, body)| {
            let all: Value = serde_json::from_str(&body).ok()?;
            let mine = all["connections"].as_array()?.iter().find(|c| c["client"] == me.as_str());
            Some(mine.and_then(|c| c["forwarder"].as_str().map(str::to_owned)))
        });
        match path.as_ref().map(Option::as_deref) {
            Some(Some("sockmap_demoted")) | Some(None) => break,
            _ if Instant::now() > deadline => return Err(Wrong(format!("not demoted within 20s: {path:?}"))),
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    // Read to the end or the reset, then compare what arrived.
    let got = read_up_to(&mut s, &mut value[first..]);
    if let Some(at) =
        value[..first + got].iter().enumerate().position(|(k, b)| *b != pattern.as_bytes()[k % pattern.len()])
    {
        return Err(Wrong(format!("row of {size} bytes wrong from byte {at}")));
    }
    if first + got < size {
        return Err(Reset(format!("the rest: {} of {size} bytes, then the connection ended", first + got)));
    }
    let tags: Vec<u8> = (0..2)
        .map(|_| wire::read_message(&mut s).map(|m| m.0))
        .collect::<Result<_, _>>()
        .map_err(|e| Wrong(e.to_string()))?;
    if tags != [b'C', b'Z'] {
        return Err(Wrong(format!("after the row: {:?}", String::from_utf8_lossy(&tags))));
    }
    terminate(s);
    Ok(())
}

/// Reads into `buf` until it is full, EOF or an error; how much arrived.
fn read_up_to(s: &mut impl Read, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    got
}

fn integrity_errors(pglb: &Pglb) -> f64 {
    ["surplus", "stuck"]
        .iter()
        .flat_map(|kind| ["client_to_backend", "backend_to_client"].map(|d| (*kind, d)))
        .map(|(kind, direction)| {
            pglb.metric("pglb_forward_integrity_errors_total", &[("kind", kind), ("direction", direction)])
        })
        .sum()
}

/// A client whose socket retransmits a segment overlapping bytes pglb has
/// already received (what a lossy moment makes TCP do). The kernel path
/// sends the overlap on twice — the backend would run the query again — so
/// pglb sees a backend given more than the client sent, resets both sides
/// and counts it. (The splice path, below, passes such a segment on once.)
#[test]
fn a_duplicated_segment_on_the_kernel_path_resets_the_session_and_is_counted() {
    let cluster = shared_cluster();
    let pglb = start(&cluster, "");
    // From a port of its own, which the rewind can take over again.
    let s = pglb_tests::retransmit::connect(([127, 0, 0, 1], pglb.port("rw")).into()).expect("connect");
    let mut s = wire::start_up_on(s).expect("login");
    assert_eq!(scalar(&mut s, "SELECT 1"), Ok("1".into()));
    assert_eq!(sockmap_sessions(&pglb), 1.0);
    let again = wire::query_message("SELECT 1");
    let mut s = pglb_tests::retransmit::rewind(s, again.len() as u32).expect("rewind the client's socket");
    s.write_all(&[again, wire::query_message("SELECT 2")].concat()).expect("retransmit");
    wait_until("the surplus to be counted", Duration::from_secs(15), || {
        let n = pglb
            .metric("pglb_forward_integrity_errors_total", &[("kind", "surplus"), ("direction", "client_to_backend")]);
        if n == 1.0 {
            Ok(())
        } else {
            Err(format!("{n}"))
        }
    });
    wait_closed(&mut s, Duration::from_secs(10)).expect("the client's connection is closed");
    let log = pglb.log();
    assert!(log.contains("duplicated by the kernel") && log.contains("surplus="), "{log}");
    assert!(log.contains("end=\"integrity_error\"") || log.contains("end=integrity_error"), "{log}");
    wait_map_empty(&pglb);
}

/// The same retransmission through the default data path: TCP keeps only
/// the new bytes, so the backend sees `SELECT 2` once and the session goes on.
#[test]
fn an_overlapping_retransmission_is_passed_on_once_with_splice() {
    let cluster = shared_cluster();
    let yaml =
        Yaml::for_cluster(&cluster).top("forwarder: splice").listener("rw", "role: primary\n    hold_timeout: 0s");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    // From a port of its own, which the rewind can take over again.
    let s = pglb_tests::retransmit::connect(([127, 0, 0, 1], pglb.port("rw")).into()).expect("connect");
    let mut s = wire::start_up_on(s).expect("login");
    assert_eq!(scalar(&mut s, "SELECT 1"), Ok("1".into()));
    let again = wire::query_message("SELECT 1");
    let mut s = pglb_tests::retransmit::rewind(s, again.len() as u32).expect("rewind the client's socket");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(&[again, wire::query_message("SELECT 2")].concat()).expect("retransmit");
    let mut rows = Vec::new();
    loop {
        let (tag, body) = wire::read_message(&mut s).expect("answer");
        if tag == b'D' {
            rows.push(String::from_utf8_lossy(&body[6..]).into_owned());
        }
        if tag == b'Z' {
            break;
        }
    }
    assert_eq!(rows, ["2"], "only the new query reached the backend");
    assert_eq!(scalar(&mut s, "SELECT 3"), Ok("3".into()), "the session goes on");
    terminate(s);
    assert_eq!(integrity_errors(&pglb), 0.0);
}

/// The session's entry in `/connections`.
fn connection(pglb: &Pglb, client: &str) -> Option<Value> {
    let (_, body) = http::get(pglb.admin, "/connections").ok()?;
    let all: Value = serde_json::from_str(&body).ok()?;
    all["connections"].as_array()?.iter().find(|c| c["client"] == client).cloned()
}

#[test]
fn byte_counts_come_from_the_kernel_move_during_a_session_and_are_exact() {
    let cluster = shared_cluster();
    let pglb = start(&cluster, "");
    let before_up = pglb.metric("pglb_bytes_total", &[("direction", "client_to_backend")]);
    let before_down = pglb.metric("pglb_bytes_total", &[("direction", "backend_to_client")]);
    // Count every byte the client sends and reads.
    let mut s = TcpStream::connect(("127.0.0.1", pglb.port("rw"))).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let client = s.local_addr().expect("addr").to_string();
    let (mut sent, mut read) = (0u64, 0u64);
    let mut send = |s: &mut TcpStream, bytes: &[u8]| {
        s.write_all(bytes).expect("write");
        sent += bytes.len() as u64;
    };
    send(&mut s, &wire::startup_message(0, &[]));
    let mut buf = vec![0u8; 64 * 1024];
    // Login answer, up to ReadyForQuery.
    loop {
        let (tag, body) = wire::read_message(&mut s).expect("login answer");
        read += 5 + body.len() as u64;
        if tag == b'Z' {
            break;
        }
    }
    // ~100 MB of COPY: read half, see the counts move, read the rest.
    send(&mut s, &wire::query_message("COPY (SELECT repeat('c', 999) FROM generate_series(1, 100000)) TO STDOUT"));
    while read < 50_000_000 {
        read += s.read(&mut buf).expect("read") as u64;
    }
    let moving = wait_until("/connections to show the bytes moving", Duration::from_secs(10), || {
        let c = connection(&pglb, &client).ok_or("no such session")?;
        let down = c["bytes_backend_to_client"].as_u64().unwrap_or(0);
        if down >= 40_000_000 {
            Ok(down)
        } else {
            Err(format!("{c}"))
        }
    });
    eprintln!("mid-session: /connections shows {moving} bytes to the client ({read} read)");
    // To the end: CopyDone, CommandComplete, ReadyForQuery.
    let want_end = b"Z\0\0\0\x05I";
    let mut tail = Vec::new();
    loop {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "EOF before the end of the COPY");
        read += n as u64;
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > 64 {
            tail.drain(..tail.len() - 64);
        }
        if tail.ends_with(want_end) {
            break;
        }
    }
    wait_until("/connections to count every byte", Duration::from_secs(15), || {
        let c = connection(&pglb, &client).ok_or("no such session")?;
        let (up, down) = (c["bytes_client_to_backend"].as_u64(), c["bytes_backend_to_client"].as_u64());
        if (up, down) == (Some(sent), Some(read)) {
            Ok(())
        } else {
            Err(format!("want {sent} up, {read} down: {c}"))
        }
    });
    let terminate_bytes = 5;
    terminate(s);
    wait_until("pglb_bytes_total to count every byte", Duration::from_secs(15), || {
        let up = pglb.metric("pglb_bytes_total", &[("direction", "client_to_backend")]) - before_up;
        let down = pglb.metric("pglb_bytes_total", &[("direction", "backend_to_client")]) - before_down;
        if up == (sent + terminate_bytes) as f64 && down == read as f64 {
            Ok(())
        } else {
            Err(format!("{up} up, {down} down; want {} and {read}", sent + terminate_bytes))
        }
    });
}

#[test]
fn a_gigabyte_copy_each_way_is_byte_exact() {
    let cluster = shared_cluster();
    let pglb = start(&cluster, "");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let via = pglb_tests::pg::connect(pglb.port("rw")).await;
        let direct = pglb_tests::pg::connect(cluster.primary().port).await;
        let out = pglb_tests::pg::copy_out_matches(&via, &direct, 5_000_000).await;
        assert!(out > 1_000_000_000, "only {out} bytes out");
        let sent = pglb_tests::pg::copy_in_round_trip(&via, &direct, "sockmap_gigabyte", 3_500_000).await;
        assert!(sent > 1_000_000_000, "only {sent} bytes in");
    });
    assert_eq!(sockmap_sessions(&pglb), 1.0);
    // COPY IN outruns the server's writing: the session usually leaves the
    // kernel path mid-COPY (and the bytes above were still exact).
    let demoted = pglb.metric("pglb_sockmap_demotions_total", &[]);
    eprintln!("demotions: {demoted}");
}

#[test]
fn cancel_reaches_a_query_on_the_kernel_path() {
    let cluster = shared_cluster();
    let pglb = start(&cluster, "");
    let port = pglb.port("rw");
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(async {
        let client = pglb_tests::pg::connect(port).await;
        let token = client.cancel_token();
        let started = Instant::now();
        let (result, cancelled) = tokio::join!(client.simple_query("SELECT pg_sleep(30)"), async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            token.cancel_query(tokio_postgres::NoTls).await
        });
        cancelled.expect("the cancel request");
        let err = result.expect_err("the query must be cancelled");
        assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::QUERY_CANCELED), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10), "cancelled after {:?}", started.elapsed());
    });
    assert!(sockmap_sessions(&pglb) >= 1.0);
}

/// Logs in as `application_name` `app`; returns the session and the bytes
/// the client read so far.
fn login_as(port: u16, app: &str) -> (TcpStream, u64) {
    let mut s = wire::start_up_with(port, 0, &[("application_name", app)]).expect("connect");
    let mut read = 0;
    loop {
        let (tag, body) = wire::read_message(&mut s).expect("login answer");
        read += 5 + body.len() as u64;
        match tag {
            b'Z' => return (s, read),
            b'E' => panic!("login refused: {}", String::from_utf8_lossy(&body)),
            _ => {}
        }
    }
}

/// A session pglb stops (here: its backend disabled) on the kernel path:
/// the connection log counts the bytes the kernel moved since its last
/// sample (taken every 5 s on an idle session), and a client that reads
/// nothing at all is closed too, its backend process gone.
#[test]
fn a_stopped_session_counts_its_last_bytes_and_a_client_that_reads_nothing_is_closed() {
    let cluster = shared_cluster();
    let pglb = start(&cluster, "");
    let port = pglb.port("rw");
    let (mut reader, mut read) = login_as(port, "last-bytes");
    let (mut deaf, _) = login_as(port, "reads-nothing");
    wire::query(&mut deaf, "COPY (SELECT repeat('d', 999) FROM generate_series(1, 200000)) TO STDOUT")
        .expect("a query whose answer is never read");
    // Idle long enough for the samples to slow to one each 5 s.
    std::thread::sleep(Duration::from_secs(7));
    wire::query(&mut reader, "SELECT repeat('x', 300000)").expect("query");
    loop {
        let (tag, body) = wire::read_message(&mut reader).expect("answer");
        read += 5 + body.len() as u64;
        if tag == b'Z' {
            break;
        }
    }
    let (code, body) = pglb.post("/backends/pg0/disable");
    assert_eq!(code, 200, "{body}");
    let client = reader.local_addr().expect("addr").to_string();
    wait_closed(&mut reader, Duration::from_secs(10)).expect("disabling pg0 closes the session");
    let logged = wait_until("the session's connection log line", SETTLE, || {
        let log = pglb.log();
        let line = log
            .lines()
            .find(|l| l.contains("connection closed") && l.contains(&format!("client={client} ")))
            .ok_or("not yet")?;
        let field = line.split("bytes_backend_to_client=").nth(1).ok_or("no byte count")?;
        field.split(' ').next().and_then(|n| n.parse::<u64>().ok()).ok_or_else(|| line.to_owned())
    });
    assert_eq!(logged, read, "the log counts every byte the client read");
    let sessions = || {
        cluster
            .primary()
            .sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'reads-nothing'")
            .expect("count")
    };
    wait_until("the non-reading client's backend session to end", SETTLE, || match sessions().as_str() {
        "0" => Ok(()),
        n => Err(n.to_owned()),
    });
    assert_eq!(pglb.post("/backends/pg0/enable").0, 200);
    drop(deaf);
}

#[test]
fn sessions_pglb_must_close_are_closed_and_draining_ones_finish() {
    let cluster = shared_cluster();
    // Disable: pglb closes the backend's sessions.
    let pglb = start(&cluster, "");
    let mut s = wire::login(pglb.port("rw")).expect("login");
    assert_eq!(scalar(&mut s, "SELECT 1"), Ok("1".into()));
    let (code, body) = pglb.post("/backends/pg0/disable");
    assert_eq!(code, 200, "{body}");
    wait_closed(&mut s, Duration::from_secs(10)).expect("disabling pg0 closes its session on the kernel path");
    wait_map_empty(&pglb);
    drop(pglb);

    // SIGTERM: a query in progress finishes; one that outlives
    // shutdown_timeout is closed.
    let mut pglb = start(&cluster, "shutdown_timeout: 3s");
    let port = pglb.port("rw");
    let mut short = wire::login(port).expect("login");
    let mut long = wire::login(port).expect("login");
    wire::query(&mut short, "SELECT pg_sleep(1)").expect("query");
    wire::query(&mut long, "SELECT pg_sleep(60)").expect("query");
    std::thread::sleep(Duration::from_millis(200));
    pglb.signal("TERM");
    let short_done = std::thread::spawn(move || {
        let mut tags = Vec::new();
        while let Ok((tag, _)) = wire::read_message(&mut short) {
            tags.push(tag);
            if tag == b'Z' {
                break;
            }
        }
        tags
    });
    assert!(short_done.join().expect("thread").ends_with(b"CZ"), "the draining session's query completed");
    assert_eq!(pglb.wait_exit(Duration::from_secs(15)), Some(0), "{}", pglb.log());
    wait_closed(&mut long, Duration::from_secs(5)).expect("the session past shutdown_timeout is closed");
    let log = pglb.log();
    assert!(log.contains("end=\"shutdown_timeout\""), "{log}");
    let _ = cluster
        .primary()
        .sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'");
}

#[test]
fn a_reload_to_splice_keeps_linked_sessions_and_forwards_new_ones_with_splice() {
    let cluster = shared_cluster();
    let config = yaml(&cluster, "");
    let pglb = Pglb::start(&config);
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    let mut old = wire::login(pglb.port("rw")).expect("login");
    assert_eq!(scalar(&mut old, "SELECT 'old'"), Ok("old".into()));
    let next = config.render().replace("forwarder: sockmap", "forwarder: splice");
    std::fs::write(&pglb.config, next).expect("rewrite config");
    pglb.signal("HUP");
    wait_until("the reload", SETTLE, || {
        if pglb.metric("pglb_config_reloads_total", &[("result", "success")]) == 1.0 {
            Ok(())
        } else {
            Err(pglb.log())
        }
    });
    let mut new = wire::login(pglb.port("rw")).expect("login after the reload");
    assert_eq!(scalar(&mut new, "SELECT 'new'"), Ok("new".into()));
    assert_eq!(scalar(&mut old, "SELECT 'still'"), Ok("still".into()), "the linked session goes on");
    assert_eq!(pglb.metric("pglb_forwarded_sessions_total", &[("forwarder", "splice")]), 1.0);
    terminate(old);
    terminate(new);
    wait_map_empty(&pglb);
}

#[test]
fn two_thousand_concurrent_sessions_leave_no_map_entry_or_fd_behind() {
    let cluster = Cluster::start(&Spec {
        tag: "sockmap".into(),
        replicas: 0,
        settings: vec!["max_connections = 2100".into()],
        ..Spec::default()
    })
    .expect("a cluster for 2,000 sessions");
    pglb_tests::cluster::create_check_users_on(&cluster, 0);
    let pglb = start(&cluster, "");
    let pid = pglb.pid();
    let baseline = fd_count(pid).expect("fds");
    let port = pglb.port("rw");
    let mut sessions = Vec::new();
    for i in 0..2000 {
        sessions.push(wire::login(port).unwrap_or_else(|e| panic!("session {i}: {e}")));
    }
    wait_until("4,000 sockets in the map", SETTLE, || {
        let m = pglb.metrics();
        if m.contains("pglb_sockmap_sockets 4000") {
            Ok(())
        } else {
            Err(m.lines().filter(|l| l.contains("sockmap")).collect::<Vec<_>>().join("\n"))
        }
    });
    for s in sessions.iter_mut().step_by(97) {
        assert_eq!(scalar(s, "SELECT 42"), Ok("42".into()));
    }
    for s in sessions {
        terminate(s);
    }
    wait_until("the map and fds back to where they were", Duration::from_secs(60), || {
        let m = pglb.metrics();
        let fds = fd_count(pid).map_err(|e| e.to_string())?;
        if m.contains("pglb_sockmap_sockets 0") && fds <= baseline + 8 {
            Ok(())
        } else {
            Err(format!("{fds} fds (baseline {baseline})"))
        }
    });
    assert_eq!(sockmap_sessions(&pglb), 2000.0);
}

/// Runs pglb without CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN (root's
/// bounding set cut down, as a unit without the sockmap drop-in has).
const UNPRIVILEGED: [&str; 3] = ["setpriv", "--bounding-set=-bpf,-net_admin,-sys_admin", "--"];

/// `auto` uses splice even with every privilege (the kernel path is not
/// trusted: README, "The kernel path"), and says why; `sockmap` without the
/// privileges is a start-up error.
#[test]
fn auto_uses_splice_and_sockmap_without_the_privileges_refuses_to_start() {
    let cluster = shared_cluster();
    let auto = Yaml::for_cluster(&cluster).top("forwarder: auto").listener("rw", "role: primary");
    let pglb = Pglb::start(&auto);
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    let mut s = wire::login(pglb.port("rw")).expect("login");
    assert_eq!(scalar(&mut s, "SELECT 1"), Ok("1".into()));
    terminate(s);
    assert_eq!(pglb.metric("pglb_forwarded_sessions_total", &[("forwarder", "splice")]), 1.0);
    assert_eq!(sockmap_sessions(&pglb), 0.0);
    let log = pglb.log();
    assert!(log.contains("forwarder: auto uses splice") && log.contains("tcp_read_skb"), "{log}");
    drop(pglb);

    // Asked for by name, sockmap without privileges is a start-up error.
    let dir = tempdir();
    let config = yaml(&cluster, "").write_into(&dir);
    let out = std::process::Command::new(UNPRIVILEGED[0])
        .args(&UNPRIVILEGED[1..])
        .arg(pglb_tests::pglb::pglb_bin())
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("run pglb");
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "pglb started without the privileges sockmap needs: {stderr}");
    assert!(stderr.contains("forwarder: sockmap is not available") && stderr.contains("CAP_BPF"), "{stderr}");
}

/// What deploy/systemd/pglb.service.d/sockmap.conf grants is enough: an
/// unprivileged user with CAP_BPF and CAP_NET_ADMIN as ambient capabilities
/// forwards on the kernel path.
#[test]
fn an_unprivileged_user_with_the_drop_ins_capabilities_gets_the_kernel_path() {
    let cluster = shared_cluster();
    let caps = "+bpf,+net_admin";
    let wrapper = [
        "setpriv",
        "--reuid=postgres",
        "--regid=postgres",
        "--init-groups",
        &format!("--inh-caps={caps}"),
        &format!("--ambient-caps={caps}"),
        "--",
    ];
    let pglb = Pglb::start_wrapped(&yaml(&cluster, ""), &[], &wrapper);
    pglb.wait_eligible("rw", &["pg0"], SETTLE);
    let mut s = wire::login(pglb.port("rw")).expect("login");
    assert_eq!(scalar(&mut s, "SELECT 1"), Ok("1".into()));
    terminate(s);
    assert_eq!(sockmap_sessions(&pglb), 1.0, "{}", pglb.log());
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pglb-sockmap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
