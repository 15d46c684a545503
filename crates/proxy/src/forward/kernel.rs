//! The kernel path for one session (`forwarder: sockmap`): after pglb has
//! passed on what it read, the two sockets are linked in the kernel's
//! SOCKHASH and the verdict program moves every byte from then on. pglb
//! does not read or write again; it waits for hang-ups and errors, passes
//! each EOF on once the bytes before it have reached the peer's send queue,
//! and samples the byte counts from `TCP_INFO`.
//!
//! Ordering: the verdict program takes whole segments from a socket's
//! receive queue, so pglb first reads each socket until it would block and
//! passes that on itself; bytes arriving after that stay queued until the
//! link is made, which runs the program over them (`SO_RCVLOWAT` kick)
//! before anything newer.
//!
//! Integrity: every sample of the byte counts is audited
//! ([`pglb_sockmap::integrity`]). The kernel's redirect duplicates a
//! retransmitted segment that overlaps bytes already received (README, "The
//! kernel path"); a destination given more than its source received, or
//! bytes that stopped short of their destination, end the session with a
//! reset on both sides, a log line with the figures and
//! `pglb_forward_integrity_errors_total`, rather than a corrupt stream or a
//! session that waits forever.

use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pglb_sockmap::integrity::{Audit, Breach};
use pglb_sockmap::watch::{CLOSED, ERROR, READ_CLOSED};
use pglb_sockmap::{Kernel, Link};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{Counters, End, Outcome};

/// How often byte counts are read while bytes move; doubled up to
/// [`SAMPLE_IDLE`] while they do not, so an idle session costs little.
/// While bytes move, each sample also checks the backlog.
const SAMPLE_BUSY: Duration = Duration::from_millis(20);
const SAMPLE_IDLE: Duration = Duration::from_secs(5);
/// Bytes redirected but not yet sent on, per direction, past which the
/// session leaves the kernel path (a slow reader: see [`demote`]).
const MAX_QUEUED: u64 = 4 << 20;
/// Test-only (not a setting, not in lb.yaml): demote every session once
/// this many bytes have crossed the kernel path, whatever its backlog, and
/// sample every millisecond meanwhile, so that a test runs the demotion's
/// hand-over thousands of times, mid-stream, with readers that keep up (a
/// paused reader invites the kernel's duplication: README).
const DEMOTE_AFTER_ENV: &str = "PGLB_TEST_SOCKMAP_DEMOTE_AFTER";

fn demote_after() -> Option<u64> {
    static AFTER: OnceLock<Option<u64>> = OnceLock::new();
    *AFTER.get_or_init(|| std::env::var(DEMOTE_AFTER_ENV).ok().and_then(|v| v.parse().ok()))
}

fn sample_busy() -> Duration {
    if demote_after().is_some() {
        Duration::from_millis(1)
    } else {
        SAMPLE_BUSY
    }
}
/// How often a passed EOF waits to check that the bytes before it left.
const DRAIN_POLL: Duration = Duration::from_millis(2);

/// Why a session could not be linked; it is forwarded in userspace instead.
pub struct Fallback {
    pub client: TcpStream,
    pub backend: TcpStream,
    /// `map_full`, `closed` or `error` (the `pglb_sockmap_fallbacks_total`
    /// label).
    pub reason: &'static str,
    pub error: io::Error,
}

/// Forwards on the kernel path until both directions end, an error occurs,
/// or `stop` fires. Gives the sockets back when the link cannot be made.
pub async fn forward(
    kernel: &Kernel,
    client: TcpStream,
    backend: TcpStream,
    counters: &Counters<'_>,
    stop: &CancellationToken,
) -> Result<Outcome, Fallback> {
    let fallback = |client, backend, error: io::Error| {
        let reason = match error.raw_os_error() {
            Some(libc::E2BIG | libc::ENOMEM | libc::ENOSPC) => "map_full",
            // The kernel takes only established sockets into a sockmap: a
            // peer's FIN arriving after the last read before the link
            // (CLOSE_WAIT) makes the insert fail with EOPNOTSUPP.
            Some(libc::EOPNOTSUPP) => "closed",
            _ if error.kind() == io::ErrorKind::UnexpectedEof => "closed",
            _ => "error",
        };
        Fallback { client, backend, reason, error }
    };
    // Pass on what is queued, so no segment is left half read.
    for up in [true, false] {
        let passed = if up {
            pass_queued(&client, &backend, &counters.client_to_backend, counters.up, stop).await
        } else {
            pass_queued(&backend, &client, &counters.backend_to_client, counters.down, stop).await
        };
        match passed {
            Ok(Queued::Passed) => {}
            Ok(Queued::Stopped) => {
                super::discard_unsent(&backend);
                return Ok(Outcome::of(End::Stopped, counters));
            }
            Err(error) => return Err(fallback(client, backend, error)),
        }
    }
    // Out of tokio's epoll: the bytes the kernel moves must wake nobody.
    let (client, backend) = match (client.into_std(), backend.into_std()) {
        (Ok(c), Ok(b)) => (c, b),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, "cannot take a session's sockets off the event loop");
            return Ok(Outcome::of(End::ClientError, counters));
        }
    };
    let link = match kernel.link(client.as_fd(), backend.as_fd()) {
        Ok(link) => link,
        Err(error) => {
            return match (TcpStream::from_std(client), TcpStream::from_std(backend)) {
                (Ok(c), Ok(b)) => Err(fallback(c, b, error)),
                _ => Ok(Outcome::of(End::ClientError, counters)),
            };
        }
    };
    crate::metrics::forwarded("sockmap");
    counters.set_path(super::Path::Sockmap);
    crate::metrics::sockmap_sockets(2.0);
    let mut sampler = Sampler::new(counters);
    let end = match run(kernel, &link, &client, &backend, &mut sampler, stop).await {
        Ran::Ended(end) => end,
        Ran::Backlog => demote(kernel, &link, client, backend, &mut sampler, stop).await,
    };
    kernel.unlink(link);
    crate::metrics::sockmap_sockets(-2.0);
    Ok(Outcome::of(end, counters))
}

/// Moves a session whose reader is slower than its writer off the kernel
/// path: the redirect has no backpressure (it takes bytes from the source's
/// receive queue whether or not the destination can send them, so they
/// would pile up in kernel memory no limit covers). Held, the bytes stay in
/// their source and TCP's window closes; once what was redirected has gone
/// out, the session is copied in userspace to its end.
async fn demote(
    kernel: &Kernel,
    link: &Link,
    client: std::net::TcpStream,
    backend: std::net::TcpStream,
    sampler: &mut Sampler<'_>,
    stop: &CancellationToken,
) -> End {
    crate::metrics::sockmap_demoted();
    sampler.counters.set_path(super::Path::SockmapDemoted);
    if let Err(e) = kernel.hold(link) {
        tracing::warn!(error = %e, "cannot hold a linked session's bytes back; closing it");
        return stopped(&backend);
    }
    // Until what was redirected has gone out. A side reset meanwhile ends
    // the session; bytes that never arrive are the audit's `stuck`.
    let mut wait = DRAIN_POLL;
    let mut audit = Audit::new(Instant::now());
    loop {
        let Ok(flows) = link.consumed(client.as_fd(), backend.as_fd()) else {
            return End::ClientError;
        };
        if flows.iter().all(pglb_sockmap::Flow::drained) {
            break;
        }
        if let Some(breach) = audit.check(&flows, Instant::now()) {
            return breached(breach, &client, &backend);
        }
        // EPIPE is the kernel's note of a FIN that reached the redirect, not an error.
        let reset =
            |s: &std::net::TcpStream| matches!(s.take_error(), Ok(Some(e)) if e.raw_os_error() != Some(libc::EPIPE));
        if reset(&client) {
            return End::ClientError;
        }
        if reset(&backend) {
            return End::BackendError;
        }
        tokio::select! {
            _ = stop.cancelled() => {
                if let Ok(flows) = link.flows(client.as_fd(), backend.as_fd()) {
                    sampler.update(&flows);
                }
                return stopped(&backend);
            }
            _ = tokio::time::sleep(wait) => wait = (wait * 2).min(Duration::from_millis(50)),
        }
    }
    if let Ok(flows) = link.flows(client.as_fd(), backend.as_fd()) {
        sampler.update(&flows);
    }
    let (client, backend) = match (TcpStream::from_std(client), TcpStream::from_std(backend)) {
        (Ok(c), Ok(b)) => (c, b),
        _ => return End::ClientError,
    };
    // Copy, not splice: splice(2) reads the TCP queue and would skip the
    // bytes held in the socket's own (sockmap) queue. The sockets stay in
    // the map, held, until the session ends: taken out after the kernel
    // has queued bytes for them, they become unreadable (README).
    // Still audited: a segment the kernel duplicates reaches pglb too.
    let mut audit = Audit::new(Instant::now());
    let mut check = || {
        let flows = link.consumed(client.as_fd(), backend.as_fd()).ok()?;
        audit.check(&flows, Instant::now()).map(|breach| breached(breach, &client, &backend))
    };
    // Every read is checked before it is written on, too: the kernel
    // duplicates an overlapping retransmission into the socket's own queue
    // just as it did into the redirect, and the periodic audit would see
    // it only after the peer had read it (a client that then hangs up ends
    // the session before any audit). Bytes taken from a source never
    // exceed what it received; more is a duplicate, refused unwritten.
    let gate = |direction: usize, n: usize| -> bool {
        let Ok(flows) = link.consumed(client.as_fd(), backend.as_fd()) else { return true };
        let flow = flows[direction];
        let taken = flow.delivered + n as u64;
        if taken <= flow.received {
            return true;
        }
        let breach = Breach::Surplus { received: flow.received, delivered: taken };
        breached((direction, breach), &client, &backend);
        false
    };
    // Boxed: only a demoted session pays for the copy path's future.
    let end =
        Box::pin(super::pump_both(&client, &backend, None, sampler.counters, stop, Some(&mut check), Some(&gate)))
            .await;
    if matches!(end, End::Stopped) {
        super::discard_unsent(&backend);
    }
    end
}

/// Ends a session whose counts disagree: both sides are reset (the bytes
/// either has not sent on are discarded), and the figures are logged.
fn breached((direction, breach): (usize, Breach), client: &impl AsFd, backend: &impl AsFd) -> End {
    let direction = ["client_to_backend", "backend_to_client"][direction];
    crate::metrics::integrity_error(breach.kind(), direction);
    match breach {
        Breach::Surplus { received, delivered } => tracing::error!(
            direction,
            received,
            delivered,
            surplus = delivered - received,
            "kernel path: the destination was given bytes its source never received (duplicated by the kernel); both sides reset"
        ),
        Breach::Stuck { received, delivered, stalled } => tracing::error!(
            direction,
            received,
            delivered,
            missing = received - delivered,
            stalled_s = stalled.as_secs_f64(),
            "kernel path: bytes received never reached their destination and nothing moves; both sides reset"
        ),
    }
    for socket in [client.as_fd(), backend.as_fd()] {
        let _ = socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO));
    }
    End::IntegrityError
}

fn stopped(backend: &std::net::TcpStream) -> End {
    let _ = socket2::SockRef::from(backend).set_linger(Some(Duration::ZERO));
    End::Stopped
}

/// How the kernel path ended.
enum Ran {
    Ended(End),
    /// A reader fell behind: bytes queue in the kernel.
    Backlog,
}

/// How passing on the queued bytes ended.
#[derive(Debug, PartialEq, Eq)]
enum Queued {
    Passed,
    /// `stop` fired while `dst` took nothing (a peer that does not read).
    Stopped,
}

/// Reads `src` until it would block and writes it all to `dst`. Reads with
/// recv(2) itself, not through tokio's readiness (which may be stale): the
/// socket's queue must really be empty, no segment left half read. A write
/// waits for room only until `stop`.
async fn pass_queued(
    src: &TcpStream,
    dst: &TcpStream,
    counter: &metrics::Counter,
    total: &std::sync::atomic::AtomicU64,
    stop: &CancellationToken,
) -> io::Result<Queued> {
    use std::io::Read;
    // On the heap and only for this call: an array here would sit in every
    // session's future, idle or not.
    let mut buf = vec![0u8; 16 * 1024];
    let socket = socket2::SockRef::from(src);
    loop {
        match (&*socket).read(&mut buf) {
            // EOF (or an error) already: the userspace forwarder reads it again.
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before the link")),
            Ok(n) => {
                tokio::select! {
                    written = super::pump::write_all(dst, &buf[..n]) => written?,
                    _ = stop.cancelled() => return Ok(Queued::Stopped),
                }
                counter.increment(n as u64);
                total.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Queued::Passed),
            Err(e) => return Err(e),
        }
    }
}

/// One direction's state: its source sent EOF; the EOF was passed on.
#[derive(Default, Clone, Copy)]
struct Direction {
    eof: bool,
    passed: bool,
}

async fn run(
    kernel: &Kernel,
    link: &Link,
    client: &std::net::TcpStream,
    backend: &std::net::TcpStream,
    sampler: &mut Sampler<'_>,
    stop: &CancellationToken,
) -> Ran {
    let (c, b) = (client.as_fd(), backend.as_fd());
    let (watch_c, watch_b) = match (kernel.watcher().watch(c), kernel.watcher().watch(b)) {
        (Ok(wc), Ok(wb)) => (wc, wb),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, "cannot watch a linked session for hang-ups; closing it");
            return Ran::Ended(stopped(backend));
        }
    };
    // [client to backend, backend to client]
    let mut dirs = [Direction::default(); 2];
    let mut first_eof = None;
    let mut drain_wait = DRAIN_POLL;
    let mut audit = Audit::new(Instant::now());
    let end = loop {
        let (ce, be) = (watch_c.hangup().events(), watch_b.hangup().events());
        if ce & (READ_CLOSED | CLOSED) != 0 && !dirs[0].eof {
            dirs[0].eof = true;
            first_eof.get_or_insert(End::ClientClosed);
        }
        if be & (READ_CLOSED | CLOSED) != 0 && !dirs[1].eof {
            dirs[1].eof = true;
            first_eof.get_or_insert(End::BackendClosed);
        }
        // Closed both ways (a reset, or closed before we passed an EOF on
        // to it): nothing more can reach that side; waiting for the bytes
        // before an EOF to reach it would wait forever.
        if ce & CLOSED != 0 && !dirs[1].passed {
            break first_eof.unwrap_or(End::ClientError);
        }
        if be & CLOSED != 0 && !dirs[0].passed {
            break first_eof.unwrap_or(End::BackendError);
        }
        if watch_c.hangup().take(ERROR) && failed(client, dirs[1].eof) {
            break first_eof.unwrap_or(End::ClientError);
        }
        if watch_b.hangup().take(ERROR) && failed(backend, dirs[0].eof) {
            break first_eof.unwrap_or(End::BackendError);
        }
        let Ok(flows) = link.flows(c, b) else {
            break first_eof.unwrap_or(End::ClientError);
        };
        if let Some(breach) = audit.check(&flows, Instant::now()) {
            return Ran::Ended(breached(breach, client, backend));
        }
        sampler.update(&flows);
        let forced = demote_after().is_some_and(|n| flows.iter().map(|f| f.delivered).sum::<u64>() >= n);
        if forced || flows.iter().any(|f| f.received.saturating_sub(f.delivered) > MAX_QUEUED) {
            return Ran::Backlog;
        }
        let mut failed = None;
        for (i, dst, side) in [(0, backend, End::BackendError), (1, client, End::ClientError)] {
            if dirs[i].eof && !dirs[i].passed && flows[i].drained() {
                dirs[i].passed = true;
                sampler.freeze(i);
                match socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write) {
                    Ok(()) => {}
                    // The peer is already gone: nothing left to tell it.
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                    Err(_) => failed = Some(side),
                }
            }
        }
        if let Some(side) = failed {
            break first_eof.unwrap_or(side);
        }
        if dirs[0].passed && dirs[1].passed {
            break first_eof.unwrap_or(End::ClientClosed);
        }
        let draining = dirs.iter().any(|d| d.eof && !d.passed);
        if !draining {
            drain_wait = DRAIN_POLL;
        }
        tokio::select! {
            _ = stop.cancelled() => {
                // The bytes moved since the last sample count too.
                if let Ok(flows) = link.flows(c, b) {
                    sampler.update(&flows);
                }
                return Ran::Ended(stopped(backend));
            }
            _ = watch_c.hangup().changed() => {}
            _ = watch_b.hangup().changed() => {}
            _ = tokio::time::sleep(sampler.next), if !draining => sampler.slower(),
            _ = tokio::time::sleep(drain_wait), if draining => drain_wait = (drain_wait * 2).min(Duration::from_millis(50)),
        }
    };
    if let Ok(flows) = link.flows(c, b) {
        sampler.update(&flows);
    }
    Ran::Ended(end)
}

/// Whether an error reported on `socket` is a real one. The kernel reports
/// EPIPE on a socket when the FIN of the socket feeding it reaches the
/// redirect (`feeder_eof`): the FIN does not cross, the bytes before it did,
/// and the socket still works. Reading the error clears it.
fn failed(socket: &std::net::TcpStream, feeder_eof: bool) -> bool {
    match socket.take_error() {
        Ok(None) => false,
        Ok(Some(e)) if feeder_eof && e.raw_os_error() == Some(libc::EPIPE) => false,
        Ok(Some(e)) | Err(e) => {
            tracing::debug!(error = %e, "a linked socket failed");
            true
        }
    }
}

/// Turns the kernel's counts into the session's counters and metrics.
struct Sampler<'a> {
    counters: &'a Counters<'a>,
    /// The totals counted in userspace before the link.
    base: [u64; 2],
    /// Bytes delivered since the link, as last counted.
    seen: [u64; 2],
    /// Directions whose EOF was passed on: their counts are final. Later
    /// samples would count the FINs (see [`Sampler::freeze`]).
    frozen: [bool; 2],
    next: Duration,
}

impl<'a> Sampler<'a> {
    fn new(counters: &'a Counters<'a>) -> Self {
        let base = [counters.up.load(Ordering::Relaxed), counters.down.load(Ordering::Relaxed)];
        Self { counters, base, seen: [0; 2], frozen: [false; 2], next: sample_busy() }
    }

    fn update(&mut self, flows: &[pglb_sockmap::Flow; 2]) {
        let targets = [
            (&self.counters.client_to_backend, self.counters.up),
            (&self.counters.backend_to_client, self.counters.down),
        ];
        for (i, (counter, total)) in targets.into_iter().enumerate() {
            if self.frozen[i] {
                continue;
            }
            let now = flows[i].delivered;
            if now > self.seen[i] {
                counter.increment(now - self.seen[i]);
                total.store(self.base[i] + now, Ordering::Relaxed);
                self.seen[i] = now;
                self.next = sample_busy();
            }
        }
    }

    /// Direction `i` has passed its EOF on, every byte before it counted:
    /// no later sample changes its count. Once both FINs have crossed, a
    /// socket is left in TCP_CLOSE, whose state no longer tells that a FIN
    /// was sent or received, and TCP counts each FIN like a byte.
    fn freeze(&mut self, i: usize) {
        self.frozen[i] = true;
    }

    /// Called when a sample period passed: sample less often while idle.
    fn slower(&mut self) {
        self.next = (self.next * 2).min(SAMPLE_IDLE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Bytes are queued before the link and the peer they go to reads
    /// nothing: the write cannot finish, and `stop` (a disable, a shutdown)
    /// must still end it rather than leave the session open for good.
    #[tokio::test]
    async fn a_peer_that_reads_nothing_cannot_hold_the_pre_link_write_past_stop() {
        let (mut src_peer, src) = super::super::testing::pair(None, None);
        let (_dst_peer, dst) = super::super::testing::pair(Some(4096), Some(4096));
        std::thread::spawn(move || {
            let _ = src_peer.write_all(&vec![7u8; 8 << 20]);
        });
        src.readable().await.expect("bytes queued");
        let stop = CancellationToken::new();
        let total = std::sync::atomic::AtomicU64::new(0);
        let counter = metrics::Counter::noop();
        let cancel = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            cancel.cancel();
        });
        let passed = tokio::time::timeout(Duration::from_secs(10), pass_queued(&src, &dst, &counter, &total, &stop))
            .await
            .expect("the write was still waiting 10 s after stop");
        assert_eq!(passed.expect("no error"), Queued::Stopped);
    }
}
