//! Turning a client away the way a PostgreSQL server would, so the client
//! library shows pglb's reason instead of "server closed the connection".

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::protocol::{fatal_error, read_first, FirstKind, FirstMessage, TLS_ALERT_INTERNAL_ERROR};

/// Declines SSL/GSS encryption ('N') until the StartupMessage arrives, then
/// sends a FATAL ErrorResponse with `sqlstate` and `message` and returns.
///
/// Limits: a client with `sslmode=require` gives up at the 'N' and reports
/// "server does not support SSL" instead of `message`; a direct TLS client
/// gets a fatal `internal_error` alert (its library reports "tlsv1 alert
/// internal error"): only pglb's log says why.
pub async fn refuse(client: &mut TcpStream, first: FirstMessage, sqlstate: &str, message: &str, timeout: Duration) {
    let _ = tokio::time::timeout(timeout, exchange(client, first, sqlstate, message)).await;
    let _ = client.shutdown().await;
}

async fn exchange(client: &mut TcpStream, first: FirstMessage, sqlstate: &str, message: &str) {
    let mut current = first;
    // A client may send a GSSENCRequest, then an SSLRequest, then start up.
    for _ in 0..3 {
        match current.kind {
            FirstKind::SslRequest | FirstKind::GssEncRequest => {
                if client.write_all(b"N").await.is_err() {
                    return;
                }
                match read_first(client).await {
                    Ok(next) => current = next,
                    Err(_) => return,
                }
            }
            FirstKind::Startup { .. } => {
                let _ = client.write_all(&fatal_error(sqlstate, message)).await;
                return;
            }
            FirstKind::Cancel { .. } => return,
            FirstKind::DirectTls => {
                let _ = client.write_all(&TLS_ALERT_INTERNAL_ERROR).await;
                return;
            }
        }
    }
}
