//! Forwarders move bytes both ways between a client and its backend until
//! both directions are done, passing each side's EOF on as a write shutdown
//! (half-close), and count the bytes as they go.
//!
//! Three data paths: `Splice` (Linux: small reads copied, bulk moved with
//! splice(2) through pooled pipes), `Copy` (userspace copy only; portable,
//! and what `Splice` falls back to when no pipe can be had) — both behind
//! [`forward`] — and the kernel path of [`kernel::forward`] (eBPF sockmap:
//! the kernel moves the bytes; a session it cannot take uses `Splice`).

#[cfg(target_os = "linux")]
pub mod kernel;
mod pump;
#[cfg(target_os = "linux")]
pub mod splice;

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use metrics::Counter;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

#[cfg(not(target_os = "linux"))]
pub use pump::PipePool;
#[cfg(target_os = "linux")]
pub use splice::PipePool;

use crate::reason::Side;
use pump::pump;

/// Byte counters for one session, per direction.
pub struct Counters<'a> {
    pub client_to_backend: Counter,
    pub backend_to_client: Counter,
    /// This session's totals so far (read by `/connections`).
    pub up: &'a AtomicU64,
    pub down: &'a AtomicU64,
    /// The data path forwarding the session now (read by `/connections`).
    pub path: &'a AtomicU8,
}

impl Counters<'_> {
    pub fn set_path(&self, path: Path) {
        self.path.store(path as u8, Ordering::Relaxed);
    }
}

/// Which data path forwards a session, as `/connections` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Path {
    /// Not forwarding yet (waiting for the backend's first answer).
    Starting = 0,
    Splice = 1,
    Copy = 2,
    /// The kernel moves the bytes.
    Sockmap = 3,
    /// Left the kernel path (a slow reader) for a userspace copy.
    SockmapDemoted = 4,
}

impl Path {
    pub const ALL: [Path; 5] = [Path::Starting, Path::Splice, Path::Copy, Path::Sockmap, Path::SockmapDemoted];

    pub fn as_str(self) -> &'static str {
        match self {
            Path::Starting => "starting",
            Path::Splice => "splice",
            Path::Copy => "copy",
            Path::Sockmap => "sockmap",
            Path::SockmapDemoted => "sockmap_demoted",
        }
    }

    /// The path stored as `value` (`Starting` for anything unknown).
    pub fn of(value: u8) -> Self {
        Self::ALL.into_iter().find(|p| *p as u8 == value).unwrap_or(Path::Starting)
    }
}

/// Why a forwarded session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client closed first (sent EOF), then the backend finished.
    ClientClosed,
    /// The backend closed first.
    BackendClosed,
    /// Reading from or writing to the client failed (reset, timeout).
    ClientError,
    /// Reading from or writing to the backend failed.
    BackendError,
    /// pglb closed the session (shutdown or a routing change).
    Stopped,
    /// The kernel path's byte counts disagreed (bytes duplicated or lost):
    /// pglb reset both sides rather than carry on with a corrupt stream.
    IntegrityError,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::ClientClosed => "client_closed",
            End::BackendClosed => "backend_closed",
            End::ClientError => "client_error",
            End::BackendError => "backend_error",
            End::Stopped => "stopped",
            End::IntegrityError => "integrity_error",
        }
    }
}

/// What a forwarder did.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub end: End,
    pub client_to_backend: u64,
    pub backend_to_client: u64,
}

impl Outcome {
    /// How the session ended, with its byte totals.
    pub fn of(end: End, counters: &Counters<'_>) -> Self {
        Self {
            end,
            client_to_backend: counters.up.load(Ordering::Relaxed),
            backend_to_client: counters.down.load(Ordering::Relaxed),
        }
    }
}

/// Closes `backend` with a reset when pglb ends a session itself: bytes the
/// client sent that the backend has not acknowledged yet (a partitioned old
/// primary) are discarded, never delivered — and committed — after the
/// network heals.
pub fn discard_unsent(backend: &TcpStream) {
    let _ = socket2::SockRef::from(backend).set_linger(Some(std::time::Duration::ZERO));
}

/// Forwards until both directions end, an error occurs, or `stop` fires.
/// `pipes` selects splice (Some) or copy (None).
pub async fn forward(
    client: TcpStream,
    backend: TcpStream,
    pipes: Option<&PipePool>,
    counters: &Counters<'_>,
    stop: &CancellationToken,
) -> Outcome {
    let end = pump_both(&client, &backend, pipes, counters, stop, None, None).await;
    if matches!(end, End::Stopped | End::IntegrityError) {
        discard_unsent(&backend);
    }
    if end == End::IntegrityError {
        discard_unsent(&client);
    }
    Outcome::of(end, counters)
}

/// A check run every [`AUDIT_EVERY`] while a session is pumped, between
/// the pumps' steps (never while one is mid-call); `Some` ends the session.
pub(crate) type AuditFn<'a> = &'a mut (dyn FnMut() -> Option<End> + Send);

/// How often an audited session is checked.
const AUDIT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Asked before bytes read are written on: the direction (0: client to
/// backend, 1: backend to client) and their count (see [`pump::Gate`]).
pub(crate) type GateFn<'a> = &'a (dyn Fn(usize, usize) -> bool + Sync);

/// Moves bytes both ways until both directions end, an error occurs,
/// `stop` fires, `audit` says so or `gate` refuses bytes.
pub(crate) async fn pump_both(
    client: &TcpStream,
    backend: &TcpStream,
    pipes: Option<&PipePool>,
    counters: &Counters<'_>,
    stop: &CancellationToken,
    mut audit: Option<AuditFn<'_>>,
    gate: Option<GateFn<'_>>,
) -> End {
    let up = gate.map(|g| move |n| g(0, n));
    let down = gate.map(|g| move |n| g(1, n));
    let (up, down) = (up.as_ref().map(|g| g as pump::Gate<'_>), down.as_ref().map(|g| g as pump::Gate<'_>));
    let c2b = pump(client, backend, pipes, &counters.client_to_backend, counters.up, up);
    let b2c = pump(backend, client, pipes, &counters.backend_to_client, counters.down, down);
    tokio::pin!(c2b, b2c);
    let (mut c2b_done, mut b2c_done) = (false, false);
    let mut first_eof = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break End::Stopped,
            r = &mut c2b, if !c2b_done => match r {
                Ok(()) => {
                    c2b_done = true;
                    first_eof.get_or_insert(End::ClientClosed);
                }
                Err(pump::Failure::Breach) => break End::IntegrityError,
                // A reset after the other side's EOF is how many clients close.
                Err(f) => break first_eof.unwrap_or_else(|| f.end(Side::Client, Side::Backend)),
            },
            r = &mut b2c, if !b2c_done => match r {
                Ok(()) => {
                    b2c_done = true;
                    first_eof.get_or_insert(End::BackendClosed);
                }
                Err(pump::Failure::Breach) => break End::IntegrityError,
                Err(f) => break first_eof.unwrap_or_else(|| f.end(Side::Backend, Side::Client)),
            },
            _ = tokio::time::sleep(AUDIT_EVERY), if audit.is_some() => {
                if let Some(end) = audit.as_mut().and_then(|check| check()) {
                    break end;
                }
            }
        }
        if c2b_done && b2c_done {
            break first_eof.unwrap_or(End::ClientClosed);
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    /// A connected loopback pair: (the std end, the tokio end). `rcvbuf`
    /// caps the std end's receive buffer and `sndbuf` fixes the tokio end's
    /// send buffer, so that a std end that reads nothing stops a writer soon.
    pub(crate) fn pair(rcvbuf: Option<usize>, sndbuf: Option<usize>) -> (std::net::TcpStream, tokio::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        if let Some(size) = rcvbuf {
            socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
        }
        socket.connect(&listener.local_addr().expect("addr").into()).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        if let Some(size) = sndbuf {
            socket2::SockRef::from(&accepted).set_send_buffer_size(size).expect("SO_SNDBUF");
        }
        accepted.set_nonblocking(true).expect("nonblocking");
        (socket.into(), tokio::net::TcpStream::from_std(accepted).expect("tokio"))
    }
}
