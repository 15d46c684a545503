//! The userspace copy forwarder: read into a buffer, write it out.
//! Portable, and the fallback when splice pipes cannot be had.

use metrics::Counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{Counters, End, Outcome};

const BUFFER: usize = 32 * 1024;

/// Which side failed in one direction.
enum Failure {
    Read,
    Write,
}

/// Copies both ways; see [`super::forward`].
pub async fn copy(
    mut client: TcpStream,
    mut backend: TcpStream,
    counters: &Counters,
    stop: &CancellationToken,
) -> Outcome {
    let (cr, cw) = client.split();
    let (br, bw) = backend.split();
    let mut c2b_bytes = 0u64;
    let mut b2c_bytes = 0u64;
    let end = {
        let c2b = one_way(cr, bw, &counters.client_to_backend, &mut c2b_bytes);
        let b2c = one_way(br, cw, &counters.backend_to_client, &mut b2c_bytes);
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
                    Err(Failure::Read) => break End::ClientError,
                    Err(Failure::Write) => break End::BackendError,
                },
                r = &mut b2c, if !b2c_done => match r {
                    Ok(()) => {
                        b2c_done = true;
                        first_eof.get_or_insert(End::BackendClosed);
                    }
                    Err(Failure::Read) => break End::BackendError,
                    Err(Failure::Write) => break End::ClientError,
                },
            }
            if c2b_done && b2c_done {
                break first_eof.unwrap_or(End::ClientClosed);
            }
        }
    };
    Outcome {
        end,
        client_to_backend: c2b_bytes,
        backend_to_client: b2c_bytes,
    }
}

/// Copies one direction until EOF, then shuts down the writer (half-close).
async fn one_way(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    counter: &Counter,
    total: &mut u64,
) -> Result<(), Failure> {
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = from.read(&mut buf).await.map_err(|_| Failure::Read)?;
        if n == 0 {
            return to.shutdown().await.map_err(|_| Failure::Write);
        }
        to.write_all(&buf[..n]).await.map_err(|_| Failure::Write)?;
        counter.increment(n as u64);
        *total += n as u64;
    }
}
