//! The data path, run against every forwarder (`splice`, `copy` and the
//! kernel's `sockmap`): large
//! transfers byte-exact both ways, half-close in each direction, a slow
//! consumer, many concurrent connections, and no fd or pipe leaks.

use std::time::{Duration, Instant};

use pglb_tests::pg::{connect, copy_in_round_trip, copy_out_matches};
use pglb_tests::proc::{fd_count, fd_targets, pipe_count, rss_kib};
use pglb_tests::{shared_cluster, wait_until, wire, Pglb, Yaml};

/// Most empty pipes pglb keeps pooled (crates/pglb/src/run.rs), two fds each.
const PIPE_POOL: usize = 64;

macro_rules! for_every_forwarder {
    ($($name:ident),* $(,)?) => {
        mod splice { $( #[test] fn $name() { super::$name("splice") } )* }
        mod copy { $( #[test] fn $name() { super::$name("copy") } )* }
        mod sockmap { $( #[test] fn $name() { super::$name("sockmap") } )* }
    };
}

for_every_forwarder!(
    large_copy_out_and_in_is_byte_exact,
    half_close_from_the_client_still_delivers_results,
    backend_close_reaches_the_client,
    slow_consumer_does_not_grow_memory,
    slow_consumer_stalls_the_server_and_bounds_kernel_memory,
    many_concurrent_connections,
    thousands_of_connections_leak_no_fds_or_pipes,
);

fn start(forwarder: &str) -> (pglb_tests::SharedCluster, Pglb) {
    let cluster = shared_cluster();
    let yaml = Yaml::for_cluster(&cluster).top(&format!("forwarder: {forwarder}")).listener("rw", "role: primary");
    let pglb = Pglb::start(&yaml);
    pglb.wait_eligible("rw", &["pg0"], Duration::from_secs(15));
    (cluster, pglb)
}

/// Every session took the data path under test (none fell back).
fn assert_forwarded_by(pglb: &Pglb, forwarder: &str) {
    let m = pglb.metrics();
    let lines: Vec<&str> =
        m.lines().filter(|l| l.starts_with("pglb_forwarded_sessions_total") || l.starts_with("pglb_sockmap")).collect();
    eprintln!("{forwarder}: {lines:?}");
    let path = if forwarder == "sockmap" { "sockmap" } else { forwarder };
    assert!(pglb.metric("pglb_forwarded_sessions_total", &[("forwarder", path)]) > 0.0, "{lines:?}");
    for other in ["sockmap", "splice", "copy"].iter().filter(|o| **o != path) {
        assert_eq!(pglb.metric("pglb_forwarded_sessions_total", &[("forwarder", other)]), 0.0, "{lines:?}");
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

fn large_copy_out_and_in_is_byte_exact(forwarder: &str) {
    let (cluster, pglb) = start(forwarder);
    runtime().block_on(async {
        let via = connect(pglb.port("rw")).await;
        let direct = connect(cluster.primary().port).await;
        // ~240 MB out, ~120 MB in.
        let out = copy_out_matches(&via, &direct, 1_200_000).await;
        assert!(out > 200_000_000, "only {out} bytes");
        copy_in_round_trip(&via, &direct, &format!("fwd_{forwarder}"), 400_000).await;
    });
    assert_forwarded_by(&pglb, forwarder);
}

fn half_close_from_the_client_still_delivers_results(forwarder: &str) {
    let (_cluster, pglb) = start(forwarder);
    let mut s = wire::login(pglb.port("rw")).expect("login through pglb");
    // Big enough (500 kB) to take the splice path.
    wire::query(&mut s, "SELECT repeat('x', 500000)").expect("query");
    wire::shutdown_write(&s).expect("half-close");
    let tags = wire::read_to_eof(&mut s).expect("read to EOF");
    for tag in [b'T', b'D', b'C', b'Z'] {
        assert!(tags.contains(&tag), "missing '{}' after the client's EOF: {tags:?}", tag as char);
    }
}

fn backend_close_reaches_the_client(forwarder: &str) {
    let (_cluster, pglb) = start(forwarder);
    let mut s = wire::login(pglb.port("rw")).expect("login through pglb");
    wire::query(&mut s, "SELECT pg_terminate_backend(pg_backend_pid())").expect("query");
    let started = Instant::now();
    let tags = wire::read_to_eof(&mut s).expect("EOF from pglb after the backend closed");
    assert!(tags.contains(&b'E'), "the FATAL error reaches the client: {tags:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // Like libpq, close on EOF; the session then ends on both sides.
    drop(s);
    wait_until("the session to be closed", Duration::from_secs(10), || {
        let m = pglb.metrics();
        if m.contains("pglb_connections_active{cluster=\"default\",listener=\"rw\",backend=\"pg0\"} 0") {
            Ok(())
        } else {
            Err(m)
        }
    });
}

fn slow_consumer_does_not_grow_memory(forwarder: &str) {
    use std::io::Read;
    let (_cluster, pglb) = start(forwarder);
    let mut s = wire::login(pglb.port("rw")).expect("login");
    wire::query(&mut s, "COPY (SELECT repeat('y', 1000) FROM generate_series(1, 300000)) TO STDOUT").expect("query");
    let mut buf = vec![0u8; 64 * 1024];
    // Let the pipeline fill up (pglb stops moving bytes while we do not
    // read), then take a baseline.
    for _ in 0..16 {
        s.read_exact(&mut buf).expect("read");
    }
    let mut last = -1.0;
    pglb_tests::wait_until("the pipeline to fill up", Duration::from_secs(10), || {
        let moved = pglb.metric("pglb_bytes_total", &[("direction", "backend_to_client")]);
        let settled = moved == last;
        last = moved;
        if settled {
            Ok(())
        } else {
            Err(format!("{moved} bytes moved"))
        }
    });
    let before = rss_kib(pglb.pid()).expect("pglb's RSS");
    // Read slowly: ~3 MB/s for 3 s while the server could send 300 MB.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        s.read_exact(&mut buf).expect("read");
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = rss_kib(pglb.pid()).expect("pglb's RSS");
    assert!(
        after < before + 8 * 1024,
        "pglb ({forwarder}) RSS grew from {before} KiB to {after} KiB under a slow reader"
    );
    eprintln!("{forwarder}: RSS {before} KiB -> {after} KiB under a slow reader");
}

/// Backpressure as the kernel sees it: while a client reads a 1 GB COPY
/// slowly, the server's sending stalls (pglb's backend socket receives
/// little more) and the memory held in pglb's two sockets and the kernel's
/// TCP memory stay small. For sockmap, pglb's RSS says nothing: the bytes
/// would queue in the kernel.
fn slow_consumer_stalls_the_server_and_bounds_kernel_memory(forwarder: &str) {
    use pglb_tests::sockets;
    use std::io::Read;
    let (cluster, pglb) = start(forwarder);
    let mut s = wire::login(pglb.port("rw")).expect("login");
    let client_port = s.local_addr().expect("addr").port();
    let server_port = cluster.primary().port;
    let tcp_before = sockets::tcp_memory_bytes().expect("sockstat");
    wire::query(&mut s, "COPY (SELECT repeat('y', 1000) FROM generate_series(1, 1000000)) TO STDOUT").expect("query");
    // pglb's two sockets of this session: the backend one has received the most.
    let session = || {
        let all = sockets::of_process(pglb.pid()).expect("ss");
        let front = all.iter().find(|x| x.peer_port == client_port).cloned().expect("pglb's client socket");
        let back = all
            .iter()
            .filter(|x| x.peer_port == server_port)
            .max_by_key(|x| x.bytes_received)
            .cloned()
            .expect("pglb's backend socket");
        (front, back)
    };
    let mut buf = vec![0u8; 64 * 1024];
    let (mut read, mut at_2s, mut peak_tcp, mut peak_held) = (0u64, None, 0u64, 0u64);
    let started = Instant::now();
    // ~1.3 MB/s for 6 s, while the server could send the whole GB.
    while started.elapsed() < Duration::from_secs(6) {
        s.read_exact(&mut buf).expect("read");
        read += buf.len() as u64;
        std::thread::sleep(Duration::from_millis(50));
        let (front, back) = session();
        peak_held = peak_held.max(front.rmem + front.wmem + back.rmem + back.wmem);
        peak_tcp = peak_tcp.max(sockets::tcp_memory_bytes().expect("sockstat"));
        if at_2s.is_none() && started.elapsed() >= Duration::from_secs(2) {
            at_2s = Some(back.bytes_received);
        }
    }
    let (_, back) = session();
    let grew = back.bytes_received - at_2s.expect("a sample at 2 s");
    eprintln!(
        "{forwarder}: client read {read} B; backend socket received {} B ({grew} B in the last 4 s); \
         pglb's sockets held at most {peak_held} B; TCP memory {tcp_before} B -> peak {peak_tcp} B",
        back.bytes_received
    );
    assert!(grew < 32 << 20, "the server kept sending to pglb ({forwarder}): {grew} bytes in 4 s to a 1.3 MB/s reader");
    // The most the kernel lets this session's two sockets hold (receive and
    // send buffers autotune up to tcp_rmem/tcp_wmem's maximum: 32 MiB and
    // 4 MiB here), plus 8 MiB of accounting slack: pglb must add nothing
    // beyond the kernel's own limits, far below the 1 GB the server would send.
    let limit = 2 * (sockets::tcp_buffer_max("tcp_rmem") + sockets::tcp_buffer_max("tcp_wmem")) + (8 << 20);
    assert!(peak_held < limit, "pglb's sockets ({forwarder}) held {peak_held} bytes (kernel limit {limit})");
    // Machine-wide, other tests of this binary run meanwhile: 64 MiB for them.
    assert!(
        peak_tcp < tcp_before + limit + (64 << 20),
        "kernel TCP memory ({forwarder}) grew from {tcp_before} to {peak_tcp} bytes"
    );
}

fn many_concurrent_connections(forwarder: &str) {
    let (_cluster, pglb) = start(forwarder);
    let port = pglb.port("rw");
    runtime().block_on(async move {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..80u32 {
            tasks.spawn(async move {
                let client = connect(port).await;
                let n = 20_000 + i as usize * 1000;
                let row = client.query_one(&format!("SELECT repeat('z', {n})"), &[]).await.expect("query");
                let text: String = row.get(0);
                assert_eq!(text.len(), n);
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.expect("client task");
        }
    });
}

fn thousands_of_connections_leak_no_fds_or_pipes(forwarder: &str) {
    let (_cluster, pglb) = start(forwarder);
    let port = pglb.port("rw");
    let pid = pglb.pid();
    let (baseline, baseline_pipes) = (fd_count(pid).expect("fds"), pipe_count(pid).expect("pipes"));
    runtime().block_on(async move {
        for _batch in 0..50 {
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..40 {
                tasks.spawn(async move {
                    let client = connect(port).await;
                    let row = client.query_one("SELECT repeat('p', 60000)", &[]).await.expect("query");
                    assert_eq!(row.get::<_, String>(0).len(), 60_000);
                });
            }
            while let Some(r) = tasks.join_next().await {
                r.expect("client task");
            }
        }
    });
    // Health checks open and close connections too: allow a few fds of slack.
    let bound = baseline + 2 * PIPE_POOL + 8;
    wait_until("pglb's fds to settle", Duration::from_secs(10), || {
        let (fds, pipes) = (fd_count(pid).map_err(|e| e.to_string())?, pipe_count(pid).map_err(|e| e.to_string())?);
        let pipe_bound = baseline_pipes + if forwarder == "copy" { 0 } else { 2 * PIPE_POOL };
        if fds <= bound && pipes <= pipe_bound {
            Ok(())
        } else {
            Err(format!("{fds} fds (baseline {baseline}, bound {bound}), {pipes} pipe fds: {:?}", fd_targets(pid)))
        }
    });
    let m = pglb.metrics();
    assert!(m.contains("pglb_connections_total{cluster=\"default\",listener=\"rw\",backend=\"pg0\"} 2000"), "{m}");
    if forwarder == "splice" {
        assert!(m.contains("pglb_splice_pipes{state=\"in_use\"} 0"), "{m}");
    }
    if forwarder == "sockmap" {
        assert!(m.contains("pglb_forwarded_sessions_total{forwarder=\"sockmap\"} 2000"), "{m}");
        // Nothing left in the kernel map once the last sessions have ended.
        wait_until("the kernel map to be empty", Duration::from_secs(10), || {
            let m = pglb.metrics();
            if m.contains("pglb_sockmap_sockets 0") {
                Ok(())
            } else {
                Err(m.lines().filter(|l| l.starts_with("pglb_sockmap")).collect::<Vec<_>>().join("\n"))
            }
        });
    }
    eprintln!(
        "{forwarder}: {:?} fds after 2000 connections (baseline {baseline}), {:?} pipe fds",
        fd_count(pid),
        pipe_count(pid)
    );
}
