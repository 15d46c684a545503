//! The session paths — refuse, hold, queue, a silent backend — in process and
//! in milliseconds: a real listener (`serve`) in front of a fake backend on
//! port 0, with routing tables published by hand the way the topology task
//! publishes them. The end-to-end tests under `tests/` cover the same paths
//! against real PostgreSQL servers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use pglb_proxy::protocol::{read_first, FirstKind};
use pglb_proxy::{serve, AddressGroup, ListenerContext, Shared};
use pglb_routing::{Facts, FailureClass, Observation, ObservedRole, RoutingTable, Topology};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
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
        let config = Arc::new(config);
        let mut topology = Topology::new(config.clone());
        let table = Arc::new(ArcSwap::from_pointee(topology.table().0));
        let (generation, watched) = watch::channel(0);
        let shared = Shared {
            table: table.clone(),
            generation: watched,
            capacity: Arc::new(Notify::new()),
            pipes: None,
            sockmap: None,
            draining: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
        };
        let ctx = Arc::new(ListenerContext::new(0, shared, None));
        let names = config.listeners[0].sni.clone();
        let group = Arc::new(ArcSwap::from_pointee(AddressGroup::new(config.listeners[0].listen, vec![(ctx, names)])));
        let stop = CancellationToken::new();
        let (accepting, gate) = watch::channel(true);
        tokio::spawn(serve(socket, group, TaskTracker::new(), stop.clone(), gate));
        Self { topology, table, generation, port, stop, accepting }
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
        let facts = Facts { timeline: Some(1), system_id: Some(7), ..Facts::default() };
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
