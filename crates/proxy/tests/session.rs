//! The session paths — refuse, hold, queue, a silent backend — in process and
//! in milliseconds: a real listener (`serve`) in front of a fake backend on
//! port 0, with routing tables published by hand the way the topology task
//! publishes them. The end-to-end tests under `tests/` cover the same paths
//! against real PostgreSQL servers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use pglb_proxy::protocol::{read_first, FirstKind};
use pglb_proxy::{serve, AddressGroup, Capacity, ListenerContext, Shared};
use pglb_routing::{Facts, FailureClass, Observation, ObservedRole, RoutingTable, Topology};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod common;
use common::client_hello;

/// A backend that answers every client's first message with ReadyForQuery
/// (or never answers, when `silent`), and keeps the connection open.
async fn fake_backend(silent: bool) -> u16 {
    fake_backend_tls(silent, b'S').await
}

/// Like [`fake_backend`]; an SSLRequest is answered `tls` (`S` or `N`),
/// and after `S` the next message (a TLS record) gets the ReadyForQuery.
async fn fake_backend_tls(silent: bool, tls: u8) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the fake backend");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut first = read_first(&mut conn).await;
                if first.as_ref().is_ok_and(|f| f.kind == FirstKind::SslRequest) {
                    let _ = conn.write_all(&[tls]).await;
                    first = read_first(&mut conn).await;
                }
                if first.is_ok() && !silent {
                    let _ = conn.write_all(b"Z\0\0\0\x05I").await;
                }
                let _ = conn.read_to_end(&mut Vec::new()).await;
            });
        }
    });
    port
}

/// pglb's data path for one `rw` listener in front of one backend.
struct Harness {
    topology: Topology,
    table: Arc<ArcSwap<RoutingTable>>,
    generation: watch::Sender<u64>,
    port: u16,
    stop: CancellationToken,
    /// The accept loop's gate (open unless a test shuts it).
    accepting: watch::Sender<bool>,
    capacity: Arc<Capacity>,
    /// Shutdown's first step, as SIGTERM begins it.
    draining: CancellationToken,
}

impl Harness {
    /// `listener` is extra YAML for the `rw` listener, `backend` for the backend.
    async fn start(backend_port: u16, listener: &str, backend: &str) -> Self {
        let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind the listener");
        let port = socket.local_addr().expect("addr").port();
        let yaml = format!(
            "listeners:\n  - {{name: rw, listen: '127.0.0.1:{port}', role: primary{listener}}}\nbackends:\n  - {{name: pg, address: '127.0.0.1:{backend_port}'{backend}}}\n"
        );
        let config = pglb_config::load_str(std::path::Path::new("test.yaml"), &yaml).expect("valid config");
        let cluster = config.clusters[0].clone();
        let mut topology = Topology::new(cluster.clone());
        let table = Arc::new(ArcSwap::from_pointee(topology.table().0));
        let (generation, watched) = watch::channel(0);
        let capacity = Arc::new(Capacity::default());
        let draining = CancellationToken::new();
        let shared = Shared {
            cluster: cluster.name.as_str().into(),
            table: table.clone(),
            generation: watched,
            capacity: capacity.clone(),
            pipes: None,
            sockmap: None,
            draining: draining.clone(),
            hard_stop: CancellationToken::new(),
            budget: {
                let (max, per_source) = config.limits.resolve(1024);
                pglb_proxy::Budget::new(max, per_source)
            },
            contexts: std::sync::Weak::new(),
        };
        let ctx = Arc::new(ListenerContext::new(0, shared, None));
        let names = cluster.listeners[0].sni.clone();
        let group = Arc::new(ArcSwap::from_pointee(AddressGroup::new(cluster.listeners[0].listen, vec![(ctx, names)])));
        let stop = CancellationToken::new();
        let (accepting, gate) = watch::channel(true);
        tokio::spawn(serve(socket, group, TaskTracker::new(), stop.clone(), gate));
        Self { topology, table, generation, port, stop, accepting, capacity, draining }
    }

    /// Applies a check result and publishes the table, as the topology task does.
    fn observe(&mut self, obs: Observation) {
        self.topology.observe("pg", obs, Instant::now());
        let (table, _) = self.topology.table();
        let generation = table.generation;
        self.table.store(Arc::new(table));
        self.generation.send_replace(generation);
    }

    fn primary(&mut self) {
        // Checked at 127.0.0.1: where sessions go.
        let address = Some(std::net::Ipv4Addr::LOCALHOST.into());
        let facts = Facts { timeline: Some(1), system_id: Some(7), address, ..Facts::default() };
        self.observe(Observation::Up { role: ObservedRole::Primary, facts });
    }

    fn down(&mut self) {
        self.observe(Observation::Failed { class: FailureClass::Refused, reason: "refused".into(), lost: true });
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A StartupMessage (protocol 3.0) for user and database `postgres`.
fn startup() -> Vec<u8> {
    let params = b"user\0postgres\0database\0postgres\0\0";
    let mut msg = ((8 + params.len()) as u32).to_be_bytes().to_vec();
    msg.extend(196_608u32.to_be_bytes());
    msg.extend(params);
    msg
}

/// A client that sent its StartupMessage.
async fn client(port: u16) -> TcpStream {
    opening_with(port, &startup()).await
}

/// A client that sent `first` (a StartupMessage, a TLS record...).
async fn opening_with(port: u16, first: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    s.write_all(first).await.expect("send the first message");
    s
}

/// The first message the client receives: its tag and its body as text.
async fn answer(s: &mut TcpStream) -> (u8, String) {
    let read = async {
        let mut head = [0u8; 5];
        s.read_exact(&mut head).await?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        s.read_exact(&mut body).await?;
        Ok::<_, std::io::Error>((head[0], String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.expect("an answer in time").expect("an answer")
}

#[tokio::test]
async fn no_backend_and_no_hold_is_refused_at_once_with_57p03() {
    let backend = fake_backend(false).await;
    let mut pglb = Harness::start(backend, ", hold_timeout: 0s", "").await;
    pglb.down();
    let mut c = client(pglb.port).await;
    let (tag, body) = answer(&mut c).await;
    assert_eq!(tag, b'E');
    assert!(body.contains("57P03") && body.contains("pglb: no healthy primary for listener \"rw\""), "{body}");
}

#[tokio::test]
async fn a_held_client_is_forwarded_when_a_primary_appears() {
    held_then_forwarded(&startup()).await;
}

/// A client that opens with `first` is held while there is no primary, and
/// forwarded when one appears.
async fn held_then_forwarded(first: &[u8]) {
    let backend = fake_backend(false).await;
    let mut pglb = Harness::start(backend, ", hold_timeout: 5s", "").await;
    pglb.down();
    let mut c = opening_with(pglb.port, first).await;
    // Held: nothing comes back while no backend is eligible.
    let early = tokio::time::timeout(Duration::from_millis(200), c.read_u8()).await;
    assert!(early.is_err(), "the client was answered while no backend was eligible: {early:?}");
    // A backend that was down comes back after `rise` (2) good checks.
    pglb.primary();
    pglb.primary();
    assert_eq!(answer(&mut c).await.0, b'Z', "the held client reaches the backend");
}

#[tokio::test]
async fn a_shut_accept_gate_keeps_clients_in_the_backlog_until_it_opens() {
    let backend = fake_backend(false).await;
    let mut pglb = Harness::start(backend, "", "").await;
    pglb.primary();
    pglb.primary();
    // Shut, as in the old process during an upgrade's hand-over.
    pglb.accepting.send_replace(false);
    tokio::task::yield_now().await;
    let mut waiting = Vec::new();
    for _ in 0..5 {
        waiting.push(client(pglb.port).await);
    }
    for c in &mut waiting {
        let early = tokio::time::timeout(Duration::from_millis(100), c.read_u8()).await;
        assert!(early.is_err(), "a client was served while the gate was shut: {early:?}");
    }
    pglb.accepting.send_replace(true);
    for mut c in waiting {
        assert_eq!(answer(&mut c).await.0, b'Z', "a client from the backlog is served once the gate opens");
    }
}

/// A backend with `max_connections: 1`, taken by a first client (returned
/// with the harness); `queue_timeout` is 300ms.
async fn backend_full() -> (Harness, TcpStream) {
    let backend = fake_backend(false).await;
    let mut pglb = Harness::start(backend, ", queue_timeout: 300ms", ", max_connections: 1").await;
    pglb.primary();
    let mut first = client(pglb.port).await;
    assert_eq!(answer(&mut first).await.0, b'Z');
    (pglb, first)
}

#[tokio::test]
async fn a_client_over_the_backend_limit_queues_then_gets_53300() {
    let (pglb, first) = backend_full().await;
    let started = Instant::now();
    let mut second = client(pglb.port).await;
    let (tag, body) = answer(&mut second).await;
    assert_eq!(tag, b'E');
    assert!(body.contains("53300") && body.contains("too many connections"), "{body}");
    assert!(started.elapsed() >= Duration::from_millis(300), "refused before queue_timeout");
    // A place freed while queued is taken.
    let mut third = client(pglb.port).await;
    drop(first);
    assert_eq!(answer(&mut third).await.0, b'Z', "the queued client takes the freed place");
}

/// The race behind a queued client that missed a freed place: the place is
/// freed after the client found no room and before it waits. A hook in
/// pglb frees it at exactly that moment; the client must take it at once,
/// not wait out `queue_timeout` and get 53300.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_place_freed_between_looking_for_room_and_waiting_is_taken() {
    let backend = fake_backend(false).await;
    let mut pglb = Harness::start(backend, ", queue_timeout: 5s", ", max_connections: 1").await;
    pglb.primary();
    let mut first = client(pglb.port).await;
    assert_eq!(answer(&mut first).await.0, b'Z');
    let first = std::sync::Mutex::new(Some(first.into_std().expect("std socket")));
    let capacity = pglb.capacity.clone();
    let freed_in_the_gap = move || {
        let Some(first) = first.lock().ok().and_then(|mut f| f.take()) else { return };
        let before = capacity.frees();
        drop(first);
        // Holds this client here (its worker handed to another thread)
        // until the first session has ended and its place was freed.
        tokio::task::block_in_place(|| {
            let deadline = Instant::now() + Duration::from_secs(5);
            while capacity.frees() == before {
                assert!(Instant::now() < deadline, "the first client's place was never freed");
                std::thread::sleep(Duration::from_millis(1));
            }
        });
    };
    assert!(pglb.capacity.no_room_hook.set(Box::new(freed_in_the_gap)).is_ok());
    let started = Instant::now();
    let mut second = client(pglb.port).await;
    let (tag, body) = answer(&mut second).await;
    assert_eq!(tag, b'Z', "the second client missed the place freed in the gap: {body}");
    assert!(started.elapsed() < Duration::from_secs(4), "it waited {:?}", started.elapsed());
}

#[tokio::test]
async fn a_backend_that_does_not_answer_gets_the_client_57p03_naming_it() {
    let backend = fake_backend(true).await;
    let mut pglb = Harness::start(backend, ", hold_timeout: 300ms", "").await;
    pglb.primary();
    let mut c = client(pglb.port).await;
    let (tag, body) = answer(&mut c).await;
    assert_eq!(tag, b'E');
    assert!(body.contains("57P03") && body.contains("pglb: backend \"pg\" did not answer within 300ms"), "{body}");
}

/// A (tiny) TLS handshake record: a direct TLS client (PostgreSQL 17+
/// `sslnegotiation=direct`) opens with one instead of a PostgreSQL message.
const CLIENT_HELLO: [u8; 9] = [0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x00, 0x00, 0x00];

/// What the client receives until pglb closes the connection.
async fn until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .expect("closed in time")
        .expect("read");
    got
}

#[tokio::test]
async fn a_direct_tls_client_is_held_then_forwarded_like_any_other() {
    // The fake backend reads a whole first message (the record) and answers.
    held_then_forwarded(&CLIENT_HELLO).await;
}

#[tokio::test]
async fn a_direct_tls_client_over_the_limit_queues_then_gets_a_tls_alert() {
    let (pglb, _first) = backend_full().await;
    let started = Instant::now();
    let mut second = opening_with(pglb.port, &CLIENT_HELLO).await;
    // A fatal internal_error alert, in the clear, then the close: a TLS
    // client cannot read a PostgreSQL ErrorResponse.
    assert_eq!(until_closed(&mut second).await, [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 80]);
    assert!(started.elapsed() >= Duration::from_millis(300), "refused before queue_timeout");
}

#[tokio::test]
async fn startup_timeout_covers_the_first_tls_record() {
    let backend = fake_backend(false).await;
    let mut pglb = Harness::start(backend, ", startup_timeout: 300ms", "").await;
    pglb.primary();
    let started = Instant::now();
    // Half a record, then nothing.
    let mut c = opening_with(pglb.port, &CLIENT_HELLO[..6]).await;
    assert!(until_closed(&mut c).await.is_empty(), "closed without an answer");
    assert!(started.elapsed() >= Duration::from_millis(300), "closed before startup_timeout");
}

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// On an address routed by server name: SSLRequest, pglb's own `S`, then
/// the ClientHello; `Ok(first answer byte)` after the `S`.
async fn sni_client(port: u16, name: &str) -> (TcpStream, u8) {
    let mut c = opening_with(port, &SSL_REQUEST).await;
    let s = tokio::time::timeout(Duration::from_secs(10), c.read_u8()).await.expect("in time").expect("pglb's answer");
    assert_eq!(s, b'S', "pglb answers the SSLRequest itself");
    c.write_all(&client_hello(name)).await.expect("send the ClientHello");
    let next = tokio::time::timeout(Duration::from_secs(10), c.read_u8()).await.expect("in time").expect("an answer");
    (c, next)
}

#[tokio::test]
async fn a_named_client_reaches_its_listener_after_pglb_answers_s() {
    let backend = fake_backend_tls(false, b'S').await;
    let mut pglb = Harness::start(backend, ", sni: [rw.pglb.test]", "").await;
    pglb.primary();
    // The backend got pglb's SSLRequest, answered S, then the ClientHello.
    let (_c, first) = sni_client(pglb.port, "RW.pglb.test").await;
    assert_eq!(first, b'Z', "the ClientHello reached the backend after its S");
}

#[tokio::test]
async fn an_unknown_name_without_a_default_gets_unrecognized_name() {
    let backend = fake_backend_tls(false, b'S').await;
    let mut pglb = Harness::start(backend, ", sni: [rw.pglb.test]", "").await;
    pglb.primary();
    let (mut c, first) = sni_client(pglb.port, "ro.pglb.test").await;
    let mut alert = vec![first];
    alert.extend(until_closed(&mut c).await);
    assert_eq!(alert, [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 112], "a fatal unrecognized_name alert");
}

#[tokio::test]
async fn a_backend_without_tls_closes_the_named_client_with_an_alert() {
    let backend = fake_backend_tls(false, b'N').await;
    let mut pglb = Harness::start(backend, ", sni: [rw.pglb.test]", "").await;
    pglb.primary();
    let (mut c, first) = sni_client(pglb.port, "rw.pglb.test").await;
    let mut alert = vec![first];
    alert.extend(until_closed(&mut c).await);
    assert_eq!(alert, [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 80], "a fatal internal_error alert");
}

#[tokio::test]
async fn bytes_pipelined_after_the_sslrequest_are_refused() {
    let backend = fake_backend_tls(false, b'S').await;
    let mut pglb = Harness::start(backend, ", sni: [rw.pglb.test]", "").await;
    pglb.primary();
    // The SSLRequest and the ClientHello in one write: before pglb's `S`.
    let mut c = opening_with(pglb.port, &[&SSL_REQUEST[..], &client_hello("rw.pglb.test")].concat()).await;
    assert!(until_closed(&mut c).await.is_empty(), "closed without an `S`");
}

#[tokio::test]
async fn a_plaintext_client_without_a_default_listener_is_told_to_use_tls() {
    let backend = fake_backend_tls(false, b'S').await;
    let mut pglb = Harness::start(backend, ", sni: [rw.pglb.test]", "").await;
    pglb.primary();
    let mut c = client(pglb.port).await;
    let (tag, body) = answer(&mut c).await;
    assert_eq!(tag, b'E');
    assert!(
        body.contains("08004") && body.contains("routes by TLS server name") && body.contains("sslmode=require"),
        "{body}"
    );
}

/// A backend that serves sessions like [`fake_backend`] and counts the
/// CancelRequests it is sent.
async fn counting_backend() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the fake backend");
    let port = listener.local_addr().expect("addr").port();
    let cancels = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = cancels.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                match read_first(&mut conn).await.map(|f| f.kind) {
                    Ok(FirstKind::Cancel { .. }) => {
                        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Ok(_) => {
                        let _ = conn.write_all(b"Z\0\0\0\x05I").await;
                        let _ = conn.read_to_end(&mut Vec::new()).await;
                    }
                    Err(_) => {}
                }
            });
        }
    });
    (port, cancels)
}

/// Sends a CancelRequest from `source` and waits until pglb closes it
/// (pglb closes it once it has passed it on, or refused it).
async fn cancel_from(port: u16, source: [u8; 4]) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind((std::net::Ipv4Addr::from(source), 0).into()).expect("bind the source address");
    let mut s = socket.connect(([127, 0, 0, 1], port).into()).await.expect("connect");
    let mut request = 16u32.to_be_bytes().to_vec();
    request.extend(80_877_102u32.to_be_bytes());
    request.extend(4242u32.to_be_bytes());
    request.extend(7u32.to_be_bytes());
    s.write_all(&request).await.expect("send the cancel");
    let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut Vec::new())).await;
    assert!(closed.is_ok(), "pglb did not close the cancel connection");
}

/// Each cancel forks a process on every backend it reaches: a flood from
/// one source is passed on at most at its rate, another source is not
/// held back by it, and nothing is passed on once shutdown has begun.
#[tokio::test]
async fn cancel_requests_are_passed_on_at_a_sources_rate_and_not_while_draining() {
    const FLOOD: usize = 300;
    let (backend, cancels) = counting_backend().await;
    let mut pglb = Harness::start(backend, "", "").await;
    pglb.primary();
    let mut session = client(pglb.port).await;
    assert_eq!(answer(&mut session).await.0, b'Z', "a session the cancels could be for");
    let started = Instant::now();
    for _ in 0..FLOOD {
        cancel_from(pglb.port, [127, 0, 0, 1]).await;
    }
    let seconds = started.elapsed().as_secs() as usize + 1;
    let count = || cancels.load(std::sync::atomic::Ordering::SeqCst);
    let flood = count();
    println!("{flood} of {FLOOD} cancels from one source passed on in {:?}", started.elapsed());
    let most = (seconds + 1) * pglb_proxy::CANCELS_PER_SECOND as usize;
    assert!(flood >= 1 && flood <= most.min(FLOOD - 1), "{flood} of {FLOOD} passed on in {seconds} s");
    // Another source, at once.
    cancel_from(pglb.port, [127, 0, 0, 2]).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while count() == flood {
        assert!(Instant::now() < deadline, "the other source's cancel was not passed on");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Shutdown begins: passed on no more.
    let before = count();
    pglb.draining.cancel();
    cancel_from(pglb.port, [127, 0, 0, 3]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(), before, "a cancel was passed on while draining");
}
