//! Forwarders move bytes both ways between a client and its backend until
//! both directions are done, passing each side's EOF on as a write shutdown
//! (half-close), and count the bytes as they go.

mod copy;

use metrics::Counter;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

pub use copy::copy;

/// Byte counters for one session, per direction.
pub struct Counters {
    pub client_to_backend: Counter,
    pub backend_to_client: Counter,
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
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::ClientClosed => "client_closed",
            End::BackendClosed => "backend_closed",
            End::ClientError => "client_error",
            End::BackendError => "backend_error",
            End::Stopped => "stopped",
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

/// Forwards until both directions end, an error occurs, or `stop` fires.
pub async fn forward(
    client: TcpStream,
    backend: TcpStream,
    counters: &Counters,
    stop: &CancellationToken,
) -> Outcome {
    copy(client, backend, counters, stop).await
}
