//! One direction of a session: bytes from `src` to `dst` until EOF.
//!
//! Driven by tokio readiness: await `readable()`/`writable()`, then make the
//! syscall inside `try_io`/`try_read`/`try_write`, so readiness is cleared
//! only by a real EAGAIN from that socket. Nothing is buffered beyond one
//! read: while `dst` cannot take more, `src` is not read (backpressure).
//!
//! Small reads are copied through a stack buffer (one read + one write each,
//! the cheapest for PostgreSQL's small messages). When a read fills the
//! buffer, a bulk transfer is under way and, if a pipe pool is given, the
//! direction switches to splice(2): each burst takes a pipe from the pool,
//! splices until the source is drained, and gives the pipe back, so an idle
//! session holds no pipe and no buffer. A burst whose pieces are all small
//! switches the direction back to copying (HAProxy's `splice-auto` idea).

use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};

use metrics::Counter;

use crate::reason::Side;
use tokio::io::Interest;
use tokio::net::TcpStream;

#[cfg(target_os = "linux")]
use super::splice::{Pipe, PipePool};

/// The copy buffer; a read that fills it switches to splice.
const CHUNK: usize = 16 * 1024;

/// Which side failed.
#[derive(Debug)]
pub enum Failure {
    Read(io::Error),
    Write(io::Error),
    /// The gate refused bytes read (and has reset the session).
    Breach,
}

/// Asked, with their count, before bytes read from the source are written
/// on; `false` refuses them: they are never written, and the direction ends.
pub type Gate<'a> = &'a (dyn Fn(usize) -> bool + Sync);

impl Failure {
    /// The session end this failure means, for a direction `from` → `to`.
    pub fn end(self, from: Side, to: Side) -> super::End {
        let (side, error) = match self {
            Failure::Read(e) => (from, e),
            Failure::Write(e) => (to, e),
            Failure::Breach => return super::End::IntegrityError,
        };
        tracing::debug!(side = side.as_str(), %error, "forwarding failed");
        match side {
            Side::Client => super::End::ClientError,
            Side::Backend => super::End::BackendError,
        }
    }
}

#[cfg(not(target_os = "linux"))]
pub struct PipePool;

/// Moves bytes from `src` to `dst` until `src` ends, then shuts down `dst`'s
/// write side (half-close). Counts bytes as they are written. With a
/// `gate`, every read is passed by it before it is written (and splice,
/// which moves bytes without pglb seeing them, is not used).
pub async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    pool: Option<&PipePool>,
    counter: &Counter,
    total: &AtomicU64,
    gate: Option<Gate<'_>>,
) -> Result<(), Failure> {
    let mut bulk = false;
    let pool = pool.filter(|_| gate.is_none());
    loop {
        #[cfg(target_os = "linux")]
        if let (true, Some(pool)) = (bulk, pool) {
            // Bulk: wait without a pipe, then splice the whole burst.
            src.readable().await.map_err(Failure::Read)?;
            // Given back when dropped, also if this future is dropped mid-burst.
            let Some(mut lease) = pool.lend() else {
                bulk = false;
                continue;
            };
            // Boxed, like `write_all` below: only a burst in progress pays for
            // its state, not every idle session's future.
            let burst = Box::pin(splice_burst(src, dst, lease.pipe(), pool.pipe_size(), counter, total)).await;
            lease.set_empty(burst.empty);
            drop(lease);
            burst.result?;
            if burst.ended {
                return shutdown_write(dst);
            }
            // Small pieces again: back to copying.
            bulk = burst.largest >= CHUNK;
            continue;
        }
        #[cfg(not(target_os = "linux"))]
        let _ = pool;
        src.readable().await.map_err(Failure::Read)?;
        let (n, rest) = match copy_step(src, dst, gate) {
            Step::Idle => continue,
            Step::End => return shutdown_write(dst),
            Step::Moved { read, rest } => (read, rest),
            Step::Failed(f) => return Err(f),
        };
        if let Some(rest) = rest {
            Box::pin(write_all(dst, &rest)).await.map_err(Failure::Write)?;
        }
        counter.increment(n as u64);
        total.fetch_add(n as u64, Ordering::Relaxed);
        bulk = n >= CHUNK;
    }
}

enum Step {
    /// Spurious readiness: nothing to read.
    Idle,
    /// The source ended.
    End,
    /// `read` bytes were read; `rest` is what `dst` could not take yet.
    Moved {
        read: usize,
        rest: Option<Vec<u8>>,
    },
    Failed(Failure),
}

thread_local! {
    /// One copy buffer per runtime thread, reused by every session on it:
    /// no allocation and no zeroing per read, and no buffer per session.
    static BUFFER: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; CHUNK]);
}

/// One read and one write, synchronously, through this thread's buffer
/// (never held across an await, so an idle session holds no buffer).
fn copy_step(src: &TcpStream, dst: &TcpStream, gate: Option<Gate<'_>>) -> Step {
    BUFFER.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => copy_through(src, dst, &mut buf, gate),
        // Not reentrant in practice; a fresh buffer keeps it correct anyway.
        Err(_) => copy_through(src, dst, &mut vec![0; CHUNK], gate),
    })
}

/// Reads once. A short read means the socket is drained, so it also clears
/// the socket's readiness (as an EAGAIN would), saving the `recv` that would
/// only return EAGAIN. tokio does not clear readiness that a newer event set,
/// so bytes arriving after the read still wake the task.
fn read_once(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    use std::io::Read;
    let mut got = 0;
    let result = src.try_io(Interest::READABLE, || {
        let socket = socket2::SockRef::from(src);
        got = (&*socket).read(buf)?;
        if got > 0 && got < buf.len() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(got)
    });
    match result {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
        other => other,
    }
}

fn copy_through(src: &TcpStream, dst: &TcpStream, buf: &mut [u8], gate: Option<Gate<'_>>) -> Step {
    let n = match read_once(src, buf) {
        Ok(0) => return Step::End,
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Idle,
        Err(e) => return Step::Failed(Failure::Read(e)),
    };
    if gate.is_some_and(|pass| !pass(n)) {
        return Step::Failed(Failure::Breach);
    }
    let written = match dst.try_write(&buf[..n]) {
        Ok(w) => w,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Step::Failed(Failure::Write(e)),
    };
    let rest = (written < n).then(|| buf[written..n].to_vec());
    Step::Moved { read: n, rest }
}

/// Writes all of `buf`, waiting for room in `dst` (the pump reads nothing
/// from its source meanwhile).
pub(super) async fn write_all(dst: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        dst.writable().await?;
        match dst.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn shutdown_write(dst: &TcpStream) -> Result<(), Failure> {
    match socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write) {
        Ok(()) => Ok(()),
        // The peer is already gone: nothing left to tell it.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        Err(e) => Err(Failure::Write(e)),
    }
}

/// What one splice burst did.
#[cfg(target_os = "linux")]
struct Burst {
    /// The source ended.
    ended: bool,
    /// The pipe holds nothing (it may go back to the pool).
    empty: bool,
    /// The largest single fill, to tell bulk from small messages.
    largest: usize,
    result: Result<(), Failure>,
}

/// Splices while `src` has data. The pipe is filled only when empty, so an
/// EAGAIN from the fill is the socket's, never a full pipe's, and may clear
/// the socket's readiness.
#[cfg(target_os = "linux")]
async fn splice_burst(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &Pipe,
    size: usize,
    counter: &Counter,
    total: &AtomicU64,
) -> Burst {
    let (src_fd, dst_fd) = (src.as_fd(), dst.as_fd());
    let mut largest = 0;
    let done = |ended, empty, largest, result| Burst { ended, empty, largest, result };
    for round in 0u32.. {
        let held = match src.try_io(Interest::READABLE, || pipe.fill_from(src_fd, size)) {
            Ok(0) => return done(true, true, largest, Ok(())),
            Ok(n) => n,
            // Drained: hand the pipe back until the next burst.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return done(false, true, largest, Ok(())),
            Err(e) => return done(false, true, largest, Err(Failure::Read(e))),
        };
        largest = largest.max(held);
        let mut left = held;
        while left > 0 {
            if let Err(e) = dst.writable().await {
                return done(false, false, largest, Err(Failure::Write(e)));
            }
            match dst.try_io(Interest::WRITABLE, || pipe.drain_to(dst_fd, left)) {
                Ok(n) => {
                    left -= n;
                    counter.increment(n as u64);
                    total.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return done(false, false, largest, Err(Failure::Write(e))),
            }
        }
        // A long burst still lets other tasks on this worker run.
        if round % 16 == 15 {
            tokio::task::yield_now().await;
        }
    }
    done(false, true, largest, Ok(()))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    /// A session dropped in the middle of a splice burst (its reader stopped
    /// reading, then pglb closed it) gives its pipe back: the pool's count
    /// of pipes in use, and so `pglb_splice_pipes{state="in_use"}`, returns
    /// to zero instead of drifting up one per such session.
    #[tokio::test]
    async fn a_session_dropped_mid_burst_gives_its_pipe_back() {
        let (mut src_peer, src) = super::super::testing::pair(None, None);
        let (_dst_peer, dst) = super::super::testing::pair(Some(4096), Some(256 << 10));
        std::thread::spawn(move || {
            let _ = src_peer.write_all(&vec![1u8; 64 << 20]);
        });
        let pool = PipePool::new(4, 1 << 16);
        let (counter, total) = (Counter::noop(), AtomicU64::new(0));
        let pumped =
            tokio::time::timeout(Duration::from_millis(500), pump(&src, &dst, Some(&pool), &counter, &total, None));
        assert!(pumped.await.is_err(), "the pump cannot finish: its reader reads nothing");
        assert!(total.load(Ordering::Relaxed) >= CHUNK as u64, "a bulk transfer began");
        assert_eq!(pool.in_use(), 0, "the pipe of the dropped burst is still counted in use");
    }
}
