//! One client connection, from its first message to its last byte:
//! read the first message, find a backend (holding the client while there is
//! none, queueing it while limits are full), connect, forward.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use pglb_config::{ListenerConfig, OnIneligible, Role};
use pglb_routing::BackendLoad;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::address::AddressGroup;
use crate::budget::{Over, Pending};
use crate::connect::{connect, tune};
use crate::forward::{discard_unsent, forward, Counters, Path};
use crate::listener::ListenerContext;
use crate::pace::Place;
use crate::protocol::{first_answer, read_first, FirstAnswer, FirstKind, FirstMessage, SSL_REQUEST_BYTES};
use crate::rate::OncePerSecond;
use crate::reason::Reject;
use crate::refuse::refuse;
use crate::registry::SessionHandle;
use crate::wait::{hung_up, wait, Slot, Wake};

/// SQLSTATE cannot_connect_now.
const CANNOT_CONNECT_NOW: &str = "57P03";
/// SQLSTATE too_many_connections.
const TOO_MANY_CONNECTIONS: &str = "53300";
/// SQLSTATE admin_shutdown.
const ADMIN_SHUTDOWN: &str = "57P01";

/// A backend picked for this client, copied out of the routing snapshot so
/// no snapshot is held across an await.
struct Candidate {
    name: String,
    /// The address the backend's checks verified (never looked up here).
    addr: Option<std::net::SocketAddr>,
    limit: Option<usize>,
    load: Arc<BackendLoad>,
}

/// A backend place and a listener place, taken under the limits.
struct Places<'a> {
    ctx: &'a ListenerContext,
    candidate: Candidate,
    via_fallback: bool,
}

impl Drop for Places<'_> {
    fn drop(&mut self) {
        self.candidate.load.close();
        self.ctx.clients.fetch_sub(1, Ordering::AcqRel);
        self.ctx.metrics.active.decrement(1.0);
        if let Some(g) = self.ctx.backend_gauges.get(&self.candidate.name) {
            g.decrement(1.0);
        }
        self.ctx.shared.capacity.free();
    }
}

/// How finding a backend ended without one.
enum Refusal {
    Refuse {
        reason: Reject,
        sqlstate: &'static str,
        message: String,
    },
    /// The client left; nothing to say.
    Gone,
}

/// Serves one client of an address until its session ends: reads its first
/// message, picks its listener (by TLS server name where listeners share
/// the address), then serves it there.
/// `pending` is the client's place in the pending budget, given back when
/// it starts forwarding or leaves.
pub async fn run(group: Arc<AddressGroup>, mut client: TcpStream, peer: SocketAddr, pending: Pending) {
    let accepted = Instant::now();
    tune(&client);
    // The stages before forwarding run boxed (here and in `serve`): an idle
    // session's memory is mostly its future, which then holds only what
    // forwarding needs.
    if let Some((ctx, setup)) = Box::pin(identify(group, &mut client, peer, accepted)).await {
        serve(ctx, setup, client, peer, accepted, pending).await;
    }
}

/// Turns away a client the pending budget has no place for, as it is
/// accepted: a FATAL 53300 written at once (nothing is read: a PostgreSQL
/// client reads it as the answer to its first message, as it does when a
/// server cannot start a backend), then the socket is closed. Counted; the
/// log line is at most one a second, not one per connection of a flood.
pub(crate) fn over_budget(ctx: &ListenerContext, client: &TcpStream, peer: SocketAddr, over: Over) {
    static LOGGED: OncePerSecond = OncePerSecond::new();
    let budget = &ctx.shared.budget;
    let (reason, message) = match over {
        Over::Total => (
            Reject::PendingFull,
            format!(
                "pglb: too many connections waiting to start (limits.max_pending, {}); try again later",
                budget.max()
            ),
        ),
        Over::Source => (
            Reject::SourcePendingFull,
            format!(
                "pglb: too many connections from {} waiting to start (limits.max_pending_per_source, {}); try again later",
                peer.ip(),
                budget.per_source()
            ),
        ),
        Over::Address => (
            Reject::AddressPendingFull,
            format!(
                "pglb: too many connections waiting to start on {} (half of limits.max_pending, {}); try again later",
                ctx.listen,
                budget.per_address()
            ),
        ),
    };
    ctx.metrics.reject(reason);
    if LOGGED.allow() {
        tracing::warn!(
            listener = %ctx.name,
            client = %peer,
            reason = reason.as_str(),
            pending = budget.used(),
            max_pending = budget.max(),
            max_pending_per_source = budget.per_source(),
            "connection refused at accept: the pending budget is full (logged at most once a second; pglb_clients_rejected_total counts them all)"
        );
    }
    let _ = client.try_write(&crate::protocol::fatal_error(TOO_MANY_CONNECTIONS, &message));
}

/// What serving a client starts from: its listener, that listener's config
/// and the client's first message.
type Identified = (Arc<ListenerContext>, Box<(ListenerConfig, FirstMessage)>);

/// Reads the client's first message and picks its listener; `None` when the
/// client was refused (and told why).
async fn identify(
    group: Arc<AddressGroup>,
    client: &mut TcpStream,
    peer: SocketAddr,
    accepted: Instant,
) -> Option<Identified> {
    let front = group.first().cloned()?;
    let config = front.config()?;
    let deadline = accepted + config.startup_timeout;
    let first = match tokio::time::timeout(config.startup_timeout, read_first(client)).await {
        Ok(Ok(first)) => first,
        Ok(Err(err)) => {
            front.metrics.reject(err.kind());
            log_refusal(&front, peer, accepted, err.kind(), &err.to_string());
            return None;
        }
        Err(_) => {
            front.metrics.reject(Reject::StartupTimeout);
            log_refusal(&front, peer, accepted, Reject::StartupTimeout, "no startup message in time");
            return None;
        }
    };
    let (ctx, first, config) = if group.by_name() {
        match crate::by_name::pick(&group, client, first, deadline).await {
            Ok((ctx, first)) => {
                let config = ctx.config()?;
                (ctx, first, config)
            }
            Err(refusal) => {
                front.metrics.reject(refusal.reason);
                log_refusal(&front, peer, accepted, refusal.reason, &refusal.detail);
                refusal.answer.send(client).await;
                return None;
            }
        }
    } else {
        (front, first, config)
    };
    Some((ctx, Box::new((config, first))))
}

/// Serves a client whose listener is known and whose first message is read.
/// The config and first message come boxed, and routing runs boxed: an
/// async fn keeps its arguments and the results it awaits for its whole
/// life, and a forwarding session needs none of them (an idle session's
/// memory is mostly this future).
async fn serve(
    ctx: Arc<ListenerContext>,
    setup: Box<(ListenerConfig, FirstMessage)>,
    mut client: TcpStream,
    peer: SocketAddr,
    accepted: Instant,
    pending: Pending,
) {
    if let FirstKind::Cancel { pid } = setup.1.kind {
        tracing::debug!(pid, "cancel request");
        Box::pin(crate::cancel::fan_out(&ctx, &setup.1.bytes, peer)).await;
        return;
    }
    set_user_timeout(&client, setup.0.client_tcp_user_timeout);
    // A client whose SSLRequest a backend declined goes on in plaintext.
    let mut plain = None;
    let refusal = match Box::pin(route(&ctx, &setup, &mut client, peer, &mut plain)).await {
        Ok(session) => {
            // A forwarding session holds no config, no startup bytes and no
            // place in the pending budget.
            drop(setup);
            drop(pending);
            return session.forward(&ctx, client).await;
        }
        Err(refusal) => refusal,
    };
    let (config, first) = *setup;
    let first = plain.unwrap_or(first);
    match refusal {
        Refusal::Gone => {
            ctx.metrics.reject(Reject::ClientGaveUp);
            log_refusal(&ctx, peer, accepted, Reject::ClientGaveUp, "the client hung up while waiting");
        }
        Refusal::Refuse { reason, sqlstate, message } => {
            ctx.metrics.reject(reason);
            let detail = match first.kind {
                FirstKind::DirectTls => format!("{message} (direct TLS client: closed with a TLS alert)"),
                _ => message.clone(),
            };
            log_refusal(&ctx, peer, accepted, reason, &detail);
            Box::pin(refuse(&mut client, first, sqlstate, &message, config.startup_timeout)).await;
        }
    }
}

/// TCP_USER_TIMEOUT on a client socket (zero: the kernel's default).
fn set_user_timeout(client: &TcpStream, timeout: Duration) {
    #[cfg(target_os = "linux")]
    if !timeout.is_zero() {
        if let Err(err) = socket2::SockRef::from(client).set_tcp_user_timeout(Some(timeout)) {
            tracing::debug!(error = %err, "cannot set TCP_USER_TIMEOUT on a client socket");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (client, timeout);
}

/// Finds a backend that answers. A backend that refuses the connection,
/// closes it before answering, turns the login away for its own state
/// (57P03 shutting down or starting up, 57P01) or becomes ineligible before
/// answering is left out and the client routed again, its first message
/// replayed: the client saw nothing yet. While no other backend is there,
/// the client is held as when none is eligible.
async fn route<'a>(
    ctx: &'a ListenerContext,
    (config, first): &(ListenerConfig, FirstMessage),
    client: &mut TcpStream,
    peer: SocketAddr,
    plain: &mut Option<FirstMessage>,
) -> Result<Box<Session<'a>>, Refusal> {
    let stop = ctx.shared.draining.clone();
    if stop.is_cancelled() {
        return Err(Refusal::Refuse {
            reason: Reject::Shutdown,
            sqlstate: ADMIN_SHUTDOWN,
            message: "pglb: shutting down".into(),
        });
    }
    let mut way = Way::new(ctx);
    for _ in 0..MAX_ROUTES {
        let (places, backend) = find_backend(ctx, config, client, &stop, &mut way).await?;
        let name = places.candidate.name.clone();
        let (opened, declined) =
            open(ctx, config, client, backend, places, plain.as_ref().unwrap_or(first), peer).await;
        if declined.is_some() {
            *plain = declined;
        }
        match opened {
            Opened::Answered(session) => return Ok(Box::new(session)),
            Opened::Rerouted => way.avoid.add(&name, way.generation, None),
            Opened::NotNow { sqlstate, message } => {
                ctx.pair(&name).refused_logins.increment(1);
                if way.avoid.failures == 0 {
                    tracing::info!(backend = %name, sqlstate, message, "backend turned the login away for its own state; routing the client again");
                }
                way.avoid.add(&name, way.generation, Some(format!("{message} ({sqlstate})")));
            }
            Opened::Gone => return Err(Refusal::Gone),
            Opened::NoTls { backend } => {
                return Err(Refusal::Refuse {
                    reason: Reject::BackendNoTls,
                    sqlstate: CANNOT_CONNECT_NOW,
                    message: format!(
                        "pglb: backend \"{backend}\" does not accept TLS (it answered N to pglb's SSLRequest), and listener \"{}\" routes by TLS server name: turn ssl on on the server",
                        ctx.name
                    ),
                });
            }
            Opened::Silent { backend, waited } => {
                let waited = pglb_config::format_duration(waited);
                return Err(Refusal::Refuse {
                    reason: Reject::BackendSilent,
                    sqlstate: CANNOT_CONNECT_NOW,
                    message: format!(
                        "pglb: backend \"{backend}\" did not answer within {waited} (listener \"{}\")",
                        ctx.name
                    ),
                });
            }
        }
    }
    Err(Refusal::Refuse {
        reason: Reject::NoBackend,
        sqlstate: CANNOT_CONNECT_NOW,
        message: format!("pglb: no backend for listener \"{}\" stayed eligible long enough to answer", ctx.name),
    })
}

/// Most backends one client is routed to before it gets an answer (a
/// bound on a backend that keeps turning logins away while the checks
/// still find it fine).
const MAX_ROUTES: usize = 64;

/// One client's way to a backend so far: when it arrived, the backends
/// that refused it, its place among the held and in the release line.
struct Way<'a> {
    started: Instant,
    /// The routing generation the client last looked at.
    generation: u64,
    avoid: Avoid,
    held: Option<Slot<'a>>,
    queued: Option<Slot<'a>>,
    line: Option<Place>,
}

impl<'a> Way<'a> {
    fn new(ctx: &'a ListenerContext) -> Self {
        Self {
            started: Instant::now(),
            generation: *ctx.shared.generation.borrow(),
            avoid: Avoid::default(),
            held: None,
            queued: None,
            line: None,
        }
    }
}

/// Backends that refused this client, left out of its choices until
/// routing changes or a back-off (50 ms, doubling to 1 s) passes: a
/// backend whose refusal the checks have not seen yet is tried again, not
/// hammered.
#[derive(Default)]
struct Avoid {
    until: Vec<(String, Instant)>,
    generation: u64,
    failures: u32,
    /// What the last backend said, when it said something.
    said: Option<String>,
}

impl Avoid {
    fn add(&mut self, backend: &str, generation: u64, said: Option<String>) {
        if generation != self.generation {
            self.until.clear();
            self.generation = generation;
        }
        let back_off = Duration::from_millis(50).saturating_mul(1 << self.failures.min(5)).min(Duration::from_secs(1));
        self.failures += 1;
        self.until.retain(|(b, _)| b != backend);
        self.until.push((backend.to_owned(), Instant::now() + back_off));
        if said.is_some() {
            self.said = said;
        }
    }

    fn blocks(&self, backend: &str, generation: u64, now: Instant) -> bool {
        generation == self.generation && self.until.iter().any(|(b, until)| b == backend && *until > now)
    }

    /// When the earliest left-out backend may be tried again.
    fn next_try(&self, generation: u64) -> Option<Instant> {
        (generation == self.generation).then(|| self.until.iter().map(|(_, t)| *t).min()).flatten()
    }
}

/// Finds, reserves and connects to a backend: holds the client while none
/// is eligible (up to `hold_timeout`, `hold_restart_timeout` while the only
/// primary restarts in place), queues it while limits are full (up to
/// `queue_timeout`), tries the next candidate when one refuses, and lets
/// held clients through in arrival order at `release_rate`.
async fn find_backend<'a>(
    ctx: &'a ListenerContext,
    config: &ListenerConfig,
    client: &TcpStream,
    stop: &CancellationToken,
    way: &mut Way<'a>,
) -> Result<(Places<'a>, TcpStream), Refusal> {
    let mut generation = ctx.shared.generation.clone();
    loop {
        way.generation = *generation.borrow_and_update();
        // Before looking for room: a place freed from here on wakes this client.
        let freed = ctx.shared.capacity.watch();
        let now = Instant::now();
        let (all, via_fallback) = pick(ctx);
        let refusers = all.len();
        let candidates: Vec<Candidate> =
            all.into_iter().filter(|c| !way.avoid.blocks(&c.name, way.generation, now)).collect();
        let left_out = refusers - candidates.len();
        let (deadline, freed) = if candidates.is_empty() {
            if way.held.is_none() {
                // A standby cluster takes no writes however long one waits.
                let standby = config.role == Role::Primary && ctx.shared.table.load().standby_leader().is_some();
                if config.hold_timeout.is_zero() || standby {
                    return Err(match (left_out, way.avoid.said.take()) {
                        (0, _) => no_backend(ctx, config, None),
                        (_, said) => cannot_connect(ctx, said),
                    });
                }
                way.held =
                    Some(Slot::take(&ctx.held, config.hold_max, &ctx.metrics.held).ok_or_else(|| Refusal::Refuse {
                        reason: Reject::HoldFull,
                        sqlstate: CANNOT_CONNECT_NOW,
                        message: format!("{} and hold_max clients already wait", no_backend_message(ctx, config, None)),
                    })?);
            }
            if way.line.is_none() && config.release_rate > 0 {
                way.line = Some(ctx.pacer.join());
            }
            let hold = match ctx.shared.table.load().restarting {
                Some(_) if config.role == Role::Primary => config.hold_restart_timeout,
                _ => config.hold_timeout,
            };
            let deadline = way.started + hold;
            if now >= deadline {
                record_wait(ctx, way.started, true, false);
                return Err(no_backend(ctx, config, Some(hold)));
            }
            let retry = way.avoid.next_try(way.generation).unwrap_or(deadline);
            (deadline.min(retry), None)
        } else {
            // Held clients, and everyone while some are, go in arrival order
            // at the release rate.
            if way.line.is_none() && config.release_rate > 0 && ctx.pacer.busy() {
                way.line = Some(ctx.pacer.join());
            }
            if let Some(line) = way.line.as_mut() {
                if !line.is_head() {
                    // Waiting for one's turn is not waiting for a backend:
                    // no deadline.
                    tokio::select! {
                        _ = line.head() => {}
                        _ = generation.changed() => {}
                        _ = hung_up(client) => return Err(Refusal::Gone),
                        _ = stop.cancelled() => return Err(shutting_down()),
                    }
                    continue;
                }
            }
            if let Some(line) = way.line.take() {
                line.start(config.release_rate).await;
            }
            match reserve(ctx, config, candidates, via_fallback) {
                Some(places) => {
                    record_wait(ctx, way.started, way.held.take().is_some(), way.queued.take().is_some());
                    match connect_reserved(ctx, places, config, way).await {
                        Some(found) => return Ok(found),
                        // Every candidate refused: hold the client (when
                        // holding is on) for one that accepts.
                        None => continue,
                    }
                }
                None => {
                    if way.queued.is_none() {
                        way.queued = Slot::take(&ctx.queued, usize::MAX, &ctx.metrics.queued);
                    }
                    ctx.shared.capacity.no_room();
                    (way.started + config.queue_timeout, Some(freed))
                }
            }
        };
        let queueing = freed.is_some();
        match wait(client, &mut generation, freed, deadline, stop).await {
            Wake::Retry => {}
            Wake::ClientGone => return Err(Refusal::Gone),
            Wake::Shutdown => return Err(shutting_down()),
            Wake::Timeout if queueing => {
                record_wait(ctx, way.started, false, true);
                return Err(Refusal::Refuse {
                    reason: Reject::QueueTimeout,
                    sqlstate: TOO_MANY_CONNECTIONS,
                    message: format!(
                        "pglb: too many connections for listener \"{}\" (max_clients or backend max_connections reached; waited {:?})",
                        ctx.name, config.queue_timeout
                    ),
                });
            }
            // A back-off passed, or the hold ended (told at the top).
            Wake::Timeout => {}
        }
    }
}

fn shutting_down() -> Refusal {
    Refusal::Refuse { reason: Reject::Shutdown, sqlstate: ADMIN_SHUTDOWN, message: "pglb: shutting down".into() }
}

/// Every backend refused the client and holding is off.
fn cannot_connect(ctx: &ListenerContext, said: Option<String>) -> Refusal {
    let said = said.map(|s| format!(": {s}")).unwrap_or_default();
    Refusal::Refuse {
        reason: Reject::ConnectFailed,
        sqlstate: CANNOT_CONNECT_NOW,
        message: format!("pglb: cannot connect to any backend for listener \"{}\"{said}", ctx.name),
    }
}

/// The connection log line of a client that never reached a backend.
pub(crate) fn log_refusal(ctx: &ListenerContext, peer: SocketAddr, since: Instant, end: Reject, detail: &str) {
    tracing::info!(
        target: "pglb::connection",
        client = %peer,
        listener = %ctx.name,
        backend = "",
        backend_local_port = 0,
        duration_s = since.elapsed().as_secs_f64(),
        bytes_client_to_backend = 0,
        bytes_backend_to_client = 0,
        end = end.as_str(),
        detail,
        "connection closed"
    );
}

fn record_wait(ctx: &ListenerContext, started: Instant, held: bool, queued: bool) {
    let waited = started.elapsed().as_secs_f64();
    if held {
        ctx.metrics.hold_wait.record(waited);
    }
    if queued {
        ctx.metrics.queue_wait.record(waited);
    }
}

/// The refusal of a client with nothing to route to; `held` is how long it
/// was held first.
fn no_backend(ctx: &ListenerContext, config: &ListenerConfig, held: Option<Duration>) -> Refusal {
    Refusal::Refuse {
        reason: Reject::NoBackend,
        sqlstate: CANNOT_CONNECT_NOW,
        message: no_backend_message(ctx, config, held),
    }
}

/// "pglb: no healthy primary for listener "rw": <the cause, from the
/// routing table of now>", and how long the client was held.
fn no_backend_message(ctx: &ListenerContext, config: &ListenerConfig, held: Option<Duration>) -> String {
    let what = match (config.role, config.fallback) {
        (Role::Replica, Some(f)) => format!("replica (nor {} fallback)", f.as_str()),
        (Role::Any, _) => "backend".to_owned(),
        (r, _) => r.as_str().to_owned(),
    };
    let table = ctx.shared.table.load();
    let cause = match ctx.route_in(&table) {
        Some(i) => pglb_routing::unavailable(&table.listeners[i], &table),
        None => "the listener is being removed".into(),
    };
    let held = held.map(|d| format!(" (held {})", pglb_config::format_duration(d))).unwrap_or_default();
    format!("pglb: no healthy {what} for listener \"{}\"{held}: {cause}", config.name)
}

/// The current candidates, in the order to try them, and whether they come
/// from the listener's fallback.
fn pick(ctx: &ListenerContext) -> (Vec<Candidate>, bool) {
    let table = ctx.shared.table.load();
    let Some(route) = ctx.route_in(&table).map(|i| &table.listeners[i]) else { return (Vec::new(), false) };
    let candidates = route
        .candidates(&table, &ctx.cursor)
        .into_iter()
        .map(|i| {
            let b = &table.backends[i];
            Candidate {
                name: b.config.name.clone(),
                addr: b.checked_address(),
                limit: b.config.max_connections,
                load: b.load.clone(),
            }
        })
        .collect();
    (candidates, route.via_fallback)
}

/// Takes a listener place and a place on the first candidate with room;
/// the other candidates stay as the connect fallbacks.
fn reserve<'a>(
    ctx: &'a ListenerContext,
    config: &ListenerConfig,
    candidates: Vec<Candidate>,
    via_fallback: bool,
) -> Option<Places<'a>> {
    let limit = config.max_clients.unwrap_or(usize::MAX);
    ctx.clients.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1)).ok()?;
    for candidate in candidates {
        if candidate.load.try_open(candidate.limit) {
            ctx.metrics.active.increment(1.0);
            if let Some(g) = ctx.backend_gauges.get(&candidate.name) {
                g.increment(1.0);
            }
            return Some(Places { ctx, candidate, via_fallback });
        }
    }
    ctx.clients.fetch_sub(1, Ordering::AcqRel);
    None
}

/// Connects to the reserved backend; if it refuses, moves the reservation
/// to the next eligible backend with room. `None` when every one refused
/// (each is then left out of the client's choices for a while).
async fn connect_reserved<'a>(
    ctx: &'a ListenerContext,
    mut places: Places<'a>,
    config: &ListenerConfig,
    way: &mut Way<'_>,
) -> Option<(Places<'a>, TcpStream)> {
    loop {
        let c = &places.candidate;
        let user_timeout = ctx.shared.table.load().down_after;
        let connected = match c.addr {
            Some(addr) => connect(addr, config.connect_timeout, user_timeout).await,
            None => Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no check has answered at any address yet")),
        };
        match connected {
            Ok(stream) => return Some((places, stream)),
            Err(err) => {
                ctx.pair(&c.name).connect_failures.increment(1);
                if way.avoid.failures == 0 {
                    tracing::warn!(backend = %c.name, error = %err, "cannot connect to backend; trying the next one (or holding the client)");
                } else {
                    tracing::debug!(backend = %c.name, error = %err, "cannot connect to backend again");
                }
                way.avoid.add(&c.name, way.generation, Some(err.to_string()));
            }
        }
        let now = Instant::now();
        let (candidates, via_fallback) = pick(ctx);
        let rest: Vec<Candidate> =
            candidates.into_iter().filter(|c| !way.avoid.blocks(&c.name, way.generation, now)).collect();
        drop(places);
        places = reserve(ctx, config, rest, via_fallback)?;
    }
}

/// How opening a session on a backend ended.
enum Opened<'a> {
    /// The backend answered the first message: forward.
    Answered(Session<'a>),
    /// The backend became ineligible, or closed, before answering: route
    /// again.
    Rerouted,
    /// The backend turned the login away for its own state (57P03, 57P01):
    /// route again.
    NotNow { sqlstate: String, message: String },
    /// The backend did not answer within the wait.
    Silent { backend: String, waited: std::time::Duration },
    /// The client hung up.
    Gone,
    /// The backend refused the SSLRequest pglb sent for a client routed by
    /// server name (the client is already in TLS).
    NoTls { backend: String },
}

/// A registered session whose backend has answered.
struct Session<'a> {
    places: Places<'a>,
    backend: TcpStream,
    handle: Arc<SessionHandle>,
    _open: OpenSession<'a>,
    peer: SocketAddr,
    started: Instant,
}

/// Registers the session, passes the first message on and waits for the
/// backend's first answer (up to `hold_timeout`, or `connect_timeout` when
/// holding is off): a silent backend gets a clear error to the client
/// instead of a hang.
async fn open<'a>(
    ctx: &'a ListenerContext,
    config: &ListenerConfig,
    client: &mut TcpStream,
    mut backend: TcpStream,
    places: Places<'a>,
    first: &FirstMessage,
    peer: SocketAddr,
) -> (Opened<'a>, Option<FirstMessage>) {
    let candidate = &places.candidate;
    let pair = ctx.pair(&candidate.name);
    let started = Instant::now();
    let local_port = backend.local_addr().map(|a| a.port()).unwrap_or(0);
    let handle = Arc::new(SessionHandle {
        client: peer,
        backend: candidate.name.clone(),
        backend_local_port: local_port,
        via_fallback: places.via_fallback,
        keep_when_removed: config.on_ineligible == OnIneligible::Keep,
        started: SystemTime::now(),
        server_name: first.server_name.clone(),
        stop: ctx.shared.hard_stop.child_token(),
        reason: OnceLock::new(),
        bytes_in: Default::default(),
        bytes_out: Default::default(),
        path: Default::default(),
    });
    let open = OpenSession::new(ctx, candidate.name.clone(), handle.clone());
    // Race: routing may have changed between the pick and registration;
    // judge this session (only it) against the table of now.
    let table = ctx.shared.table.load();
    if let Some(listener) = ctx.route_in(&table) {
        crate::registry::judge(&table, listener, &handle);
    }
    drop(table);
    let wait = if config.hold_timeout.is_zero() { config.connect_timeout } else { config.hold_timeout };
    if first.via_ssl_request {
        match negotiate_tls(&mut backend, wait).await {
            Negotiated::Tls => {}
            Negotiated::Refused => {
                discard_unsent(&backend);
                return (Opened::NoTls { backend: candidate.name.clone() }, None);
            }
            Negotiated::Silent => {
                discard_unsent(&backend);
                return (Opened::Silent { backend: candidate.name.clone(), waited: wait }, None);
            }
            Negotiated::Closed => return (Opened::Rerouted, None),
        }
    }
    let name = candidate.name.clone();
    let heard = match send_and_hear(&mut backend, client, &handle, first, wait).await {
        Heard::Answer(answer) => answer,
        other => return (other.opened(&name, wait, &backend), None),
    };
    pair.client_to_backend.increment(first.bytes.len() as u64);
    handle.bytes_in.fetch_add(first.bytes.len() as u64, Ordering::Relaxed);
    // An SSLRequest the backend declines (`N`): the client goes on in
    // plaintext, and its StartupMessage is the one to replay from now on.
    let mut plain = None;
    let answer = match heard {
        FirstAnswer::Pass if first.kind == FirstKind::SslRequest && !first.via_ssl_request => {
            match declined(&mut backend, client, config.startup_timeout).await {
                Declined::No => FirstAnswer::Pass,
                Declined::Gone => return (Opened::Gone, None),
                Declined::Startup(startup) => {
                    let heard = send_and_hear(&mut backend, client, &handle, &startup, wait).await;
                    plain = Some(startup);
                    match heard {
                        Heard::Answer(answer) => answer,
                        other => return (other.opened(&name, wait, &backend), plain),
                    }
                }
            }
        }
        answer => answer,
    };
    match answer {
        FirstAnswer::NotNow { sqlstate, message } => (Opened::NotNow { sqlstate, message }, plain),
        _ => (Opened::Answered(Session { places, backend, handle, _open: open, peer, started }), plain),
    }
}

/// What came back for a message sent to a backend before any answer.
enum Heard {
    Answer(FirstAnswer),
    /// Closed or reset without a word (a server going away).
    Closed,
    Silent,
    /// The backend became ineligible before answering.
    Stopped,
    Gone,
}

impl Heard {
    fn opened<'a>(self, backend: &str, waited: Duration, stream: &TcpStream) -> Opened<'a> {
        match self {
            Self::Answer(_) | Self::Closed => Opened::Rerouted,
            Self::Silent => {
                discard_unsent(stream);
                Opened::Silent { backend: backend.to_owned(), waited }
            }
            Self::Stopped => {
                discard_unsent(stream);
                Opened::Rerouted
            }
            Self::Gone => Opened::Gone,
        }
    }
}

/// Sends `message` and waits (up to `wait`) for the backend's first
/// answer, read as far as [`read_answer`] goes.
async fn send_and_hear(
    backend: &mut TcpStream,
    client: &TcpStream,
    handle: &SessionHandle,
    message: &FirstMessage,
    wait: Duration,
) -> Heard {
    if let Err(err) = backend.write_all(&message.bytes).await {
        tracing::warn!(backend = %handle.backend, error = %err, "backend closed before startup");
        return Heard::Closed;
    }
    let plaintext_startup = matches!(message.kind, FirstKind::Startup { .. }) && !message.via_ssl_request;
    tokio::select! {
        answer = read_answer(backend, plaintext_startup) => match answer {
            Ok(answer) => Heard::Answer(answer),
            Err(_) => Heard::Closed,
        },
        _ = tokio::time::sleep(wait) => Heard::Silent,
        _ = handle.stop.cancelled() => {
            let reason = handle.reason.get().map_or("", |r| r.as_str());
            tracing::info!(backend = %handle.backend, reason, "backend became ineligible before answering; routing the client again");
            Heard::Stopped
        }
        _ = hung_up(client) => Heard::Gone,
    }
}

/// How a client's SSLRequest ended.
enum Declined {
    /// The backend took it (`S`) or answered otherwise: forward as is.
    No,
    /// Declined: the client's next message, a plaintext StartupMessage,
    /// read by pglb.
    Startup(FirstMessage),
    Gone,
}

/// When the backend answered the client's SSLRequest with `N`: passes the
/// `N` on and reads the client's StartupMessage, so that it is read (and
/// replayable) like a plaintext client's. Anything else it sends next is
/// passed on and forwarded.
async fn declined(backend: &mut TcpStream, client: &mut TcpStream, timeout: Duration) -> Declined {
    use tokio::io::AsyncReadExt;
    let mut byte = [0u8; 1];
    if !matches!(backend.peek(&mut byte).await, Ok(1)) || byte[0] != b'N' {
        return Declined::No;
    }
    if backend.read_exact(&mut byte).await.is_err() || client.write_all(b"N").await.is_err() {
        return Declined::Gone;
    }
    match tokio::time::timeout(timeout, read_first(client)).await {
        Ok(Ok(next)) if matches!(next.kind, FirstKind::Startup { .. }) => Declined::Startup(next),
        Ok(Ok(next)) => match backend.write_all(&next.bytes).await {
            Ok(()) => Declined::No,
            Err(_) => Declined::Gone,
        },
        _ => Declined::Gone,
    }
}

/// Waits for the backend's first answer and peeks at it (nothing is
/// consumed: what the client should see stays queued for it). `Err` when
/// the backend closed or reset the connection without a word. The answer
/// to a plaintext StartupMessage is read as far as its first message;
/// one that does not arrive whole within moments is passed on as is.
async fn read_answer(backend: &TcpStream, plaintext_startup: bool) -> std::io::Result<FirstAnswer> {
    let mut buf = [0u8; 1024];
    for _ in 0..40 {
        let n = backend.peek(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if !plaintext_startup {
            return Ok(FirstAnswer::Pass);
        }
        match first_answer(&buf[..n]) {
            FirstAnswer::Incomplete if n < buf.len() => tokio::time::sleep(Duration::from_millis(5)).await,
            FirstAnswer::Incomplete => return Ok(FirstAnswer::Pass),
            answer => return Ok(answer),
        }
    }
    Ok(FirstAnswer::Pass)
}

/// How the backend answered pglb's SSLRequest.
enum Negotiated {
    Tls,
    Refused,
    Silent,
    Closed,
}

/// Sends the backend an SSLRequest on a name-routed client's behalf and
/// reads its one-byte answer.
async fn negotiate_tls(backend: &mut TcpStream, wait: std::time::Duration) -> Negotiated {
    use tokio::io::AsyncReadExt;
    if backend.write_all(&SSL_REQUEST_BYTES).await.is_err() {
        return Negotiated::Closed;
    }
    let mut answer = [0u8; 1];
    match tokio::time::timeout(wait, backend.read_exact(&mut answer)).await {
        Ok(Ok(_)) if answer[0] == b'S' => Negotiated::Tls,
        Ok(Ok(_)) => Negotiated::Refused,
        Ok(Err(_)) => Negotiated::Closed,
        Err(_) => Negotiated::Silent,
    }
}

impl Session<'_> {
    /// Forwards until the session ends, then logs it.
    async fn forward(self: Box<Self>, ctx: &ListenerContext, client: TcpStream) {
        let name = &self.places.candidate.name;
        let pair = ctx.pair(name);
        let local_port = self.handle.backend_local_port;
        let counters = Counters {
            client_to_backend: pair.client_to_backend.clone(),
            backend_to_client: pair.backend_to_client.clone(),
            up: &self.handle.bytes_in,
            down: &self.handle.bytes_out,
            path: &self.handle.path,
        };
        let outcome = forward_any(ctx, client, self.backend, &counters, &self.handle.stop).await;
        let end = match (outcome.end, self.handle.reason.get()) {
            (crate::forward::End::Stopped, Some(reason)) => {
                ctx.metrics.closed(*reason);
                reason.as_str()
            }
            (end, _) => end.as_str(),
        };
        tracing::info!(
            target: "pglb::connection",
            client = %self.peer,
            listener = %ctx.name,
            backend = %name,
            backend_local_port = local_port,
            duration_s = self.started.elapsed().as_secs_f64(),
            bytes_client_to_backend = outcome.client_to_backend,
            bytes_backend_to_client = outcome.backend_to_client,
            end,
            server_name = self.handle.server_name.as_deref().unwrap_or(""),
            "connection closed"
        );
    }
}

/// Forwards on the kernel path when there is one and it takes the session,
/// otherwise with splice (or copy).
async fn forward_any(
    ctx: &ListenerContext,
    client: TcpStream,
    backend: TcpStream,
    counters: &Counters<'_>,
    stop: &tokio_util::sync::CancellationToken,
) -> crate::forward::Outcome {
    #[cfg(target_os = "linux")]
    let (client, backend) = match ctx.shared.sockmap.as_deref() {
        // Boxed: a splice session's future does not reserve the kernel path's room.
        Some(kernel) => {
            match Box::pin(crate::forward::kernel::forward(kernel, client, backend, counters, stop)).await {
                Ok(outcome) => return outcome,
                Err(fallback) => {
                    crate::metrics::sockmap_fallback(fallback.reason);
                    tracing::debug!(error = %fallback.error, reason = fallback.reason, "session not linked in the kernel; forwarding it with splice");
                    (fallback.client, fallback.backend)
                }
            }
        }
        None => (client, backend),
    };
    let pipes = ctx.shared.pipes.as_deref();
    let path = if pipes.is_some() { Path::Splice } else { Path::Copy };
    counters.set_path(path);
    crate::metrics::forwarded(path.as_str());
    forward(client, backend, pipes, counters, stop).await
}

/// Registers a session and counts it as open for as long as it lives.
struct OpenSession<'a> {
    ctx: &'a ListenerContext,
    backend: String,
    id: u64,
}

impl<'a> OpenSession<'a> {
    fn new(ctx: &'a ListenerContext, backend: String, handle: Arc<SessionHandle>) -> Self {
        let pair = ctx.pair(&backend);
        pair.active.increment(1.0);
        pair.total.increment(1);
        let id = ctx.registry.insert(handle);
        Self { ctx, backend, id }
    }
}

impl Drop for OpenSession<'_> {
    fn drop(&mut self) {
        self.ctx.registry.remove(self.id);
        self.ctx.pair(&self.backend).active.decrement(1.0);
    }
}
