//! splice(2) plumbing: kernel pipes that move bytes socket → pipe → socket
//! without copying them through userspace.
//!
//! This is the one module of pglb allowed `unsafe`: each block is a single
//! syscall on file descriptors this module owns or borrows for the call.
//!
//! Pipes are `O_NONBLOCK | O_CLOEXEC`, owned by [`Pipe`] (closed in `Drop`),
//! sized with `F_SETPIPE_SZ`, and reused through a bounded [`PipePool`]. A pipe
//! goes back to the pool only when it is empty, so one session's bytes can
//! never reach another.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use metrics::{Counter, Gauge};

/// A kernel pipe used as a splice buffer.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// A new non-blocking pipe of `size` bytes. Fails (so the caller can fall
    /// back to copying) when the fd limit is reached or the kernel refuses
    /// the size (EPERM past `pipe-user-pages-soft` for unprivileged users).
    pub fn new(size: usize) -> io::Result<Self> {
        let mut fds: [RawFd; 2] = [-1, -1];
        // SAFETY: pipe2 writes two fds into the array we own; flags are valid.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
        // SAFETY: fcntl on an fd we own, with an integer argument.
        let rc = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { read, write })
    }

    /// Moves up to `len` bytes from socket `from` into the pipe.
    /// `Ok(0)` is end of stream; `WouldBlock` means no data (or no room).
    pub(crate) fn fill_from(&self, from: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        splice(from, self.write.as_fd(), len)
    }

    /// Moves up to `len` bytes from the pipe into socket `to`.
    pub(crate) fn drain_to(&self, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        splice(self.read.as_fd(), to, len)
    }
}

fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    let (from, to) = (from.as_raw_fd(), to.as_raw_fd());
    // SAFETY: splice with null offsets on two fds that stay open for the
    // call (both are borrowed for its duration). It touches no memory of
    // ours. SPLICE_F_MOVE has been a no-op since Linux 2.6.21.
    let n = unsafe { libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, libc::SPLICE_F_NONBLOCK) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A pipe lent by a [`PipePool`]: given back when dropped, however the
/// holder ends (a burst that completes, or a session dropped mid-burst), so
/// the pool's counts and gauges never drift. Back in the pool only if it
/// was marked empty; otherwise closed (it may hold bytes).
pub struct Lease<'a> {
    pool: &'a PipePool,
    pipe: Option<Pipe>,
    empty: bool,
}

impl Lease<'_> {
    pub fn pipe(&self) -> &Pipe {
        // Some until dropped.
        self.pipe.as_ref().expect("a lease holds its pipe until dropped")
    }

    /// Whether the pipe holds no bytes now (may go back to the pool).
    pub fn set_empty(&mut self, empty: bool) {
        self.empty = empty;
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(pipe) = self.pipe.take() {
            self.pool.give_back(pipe, self.empty);
        }
    }
}

/// A bounded pool of empty pipes, shared by all sessions.
pub struct PipePool {
    idle: Mutex<Vec<Pipe>>,
    max_idle: usize,
    pipe_size: usize,
    in_use: AtomicUsize,
    gauge_in_use: Gauge,
    gauge_pooled: Gauge,
    fallbacks: Counter,
}

impl PipePool {
    pub fn new(max_idle: usize, pipe_size: usize) -> Self {
        let pool = Self {
            idle: Mutex::new(Vec::new()),
            max_idle,
            pipe_size,
            in_use: AtomicUsize::new(0),
            gauge_in_use: metrics::gauge!("pglb_splice_pipes", "state" => "in_use"),
            gauge_pooled: metrics::gauge!("pglb_splice_pipes", "state" => "pooled"),
            fallbacks: metrics::counter!("pglb_splice_fallbacks_total"),
        };
        pool.gauge_in_use.set(0.0);
        pool.gauge_pooled.set(0.0);
        pool.fallbacks.increment(0);
        pool
    }

    /// The size each pipe is given.
    pub fn pipe_size(&self) -> usize {
        self.pipe_size
    }

    /// An empty pipe from the pool, or a new one, lent until the lease is
    /// dropped; `None` (counted) when the kernel will not give one, and the
    /// caller copies instead.
    pub fn lend(&self) -> Option<Lease<'_>> {
        self.take().map(|pipe| Lease { pool: self, pipe: Some(pipe), empty: false })
    }

    /// An empty pipe from the pool, or a new one; `None` (counted) when the
    /// kernel will not give one, and the caller copies instead.
    pub fn take(&self) -> Option<Pipe> {
        let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let pipe = match pooled {
            Some(p) => {
                self.gauge_pooled.decrement(1.0);
                p
            }
            None => match Pipe::new(self.pipe_size) {
                Ok(p) => p,
                Err(err) => {
                    self.fallbacks.increment(1);
                    tracing::debug!(error = %err, "cannot make a splice pipe; copying instead");
                    return None;
                }
            },
        };
        self.in_use.fetch_add(1, Ordering::Relaxed);
        self.gauge_in_use.increment(1.0);
        Some(pipe)
    }

    /// Returns a pipe. Only an empty pipe may be returned (`empty` says so);
    /// anything else is closed, as is any pipe beyond the pool's bound.
    pub fn give_back(&self, pipe: Pipe, empty: bool) {
        self.in_use.fetch_sub(1, Ordering::Relaxed);
        self.gauge_in_use.decrement(1.0);
        if !empty {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.max_idle {
            idle.push(pipe);
            self.gauge_pooled.increment(1.0);
        }
    }

    /// Pipes held by sessions now.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }

    /// Pipes waiting in the pool now.
    pub fn pooled(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    #[test]
    fn moves_bytes_between_sockets() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut a = std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (b, _) = listener.accept().expect("accept");
        let listener2 = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let c = std::net::TcpStream::connect(listener2.local_addr().expect("addr")).expect("connect");
        let (mut d, _) = listener2.accept().expect("accept");
        a.write_all(b"hello splice").expect("write");
        let pipe = Pipe::new(1 << 16).expect("pipe");
        let mut moved = 0;
        while moved < 12 {
            match pipe.fill_from(b.as_fd(), 1 << 16) {
                Ok(n) => moved += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(pipe.drain_to(c.as_fd(), moved).expect("drain"), 12);
        let mut buf = [0u8; 12];
        d.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"hello splice");
    }

    #[test]
    fn pool_is_bounded_and_keeps_only_empty_pipes() {
        let pool = PipePool::new(1, 1 << 16);
        let (p1, p2) = (pool.take().expect("pipe"), pool.take().expect("pipe"));
        assert_eq!(pool.in_use(), 2);
        pool.give_back(p1, true);
        pool.give_back(p2, true);
        assert_eq!(pool.pooled(), 1, "bounded");
        let p3 = pool.take().expect("pooled pipe");
        pool.give_back(p3, false);
        assert_eq!(pool.pooled(), 0, "a pipe holding bytes is closed, not pooled");
        assert_eq!(pool.in_use(), 0);
    }
}
