//! The system calls of the sockmap fast path: bpf(2), and the socket options
//! and ioctls that read a session's state from the kernel.
//!
//! With `forward/splice.rs`, one of the two modules of pglb allowed
//! `unsafe`: each block is one syscall on file descriptors this module owns
//! or borrows for the call, with memory it owns for the call's duration.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use crate::program::Insn;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_SOCKHASH: u32 = 18;
const BPF_PROG_TYPE_SK_SKB: u32 = 14;
/// `BPF_SK_SKB_VERDICT` (5.13+): a verdict program without a stream parser.
const BPF_SK_SKB_VERDICT: u32 = 38;
/// `BPF_NOEXIST`.
const NOEXIST: u64 = 1;

/// `union bpf_attr`, as a zeroed buffer large enough for the commands used.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }
    fn u32(&mut self, at: usize, v: u32) -> &mut Self {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, at: usize, v: u64) -> &mut Self {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

fn bpf(cmd: libc::c_long, attr: &Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised buffer of the size passed; the
    // kernel reads it (and for the commands used here writes nothing back).
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_ptr(), attr.0.len()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn owned(rc: libc::c_long) -> io::Result<OwnedFd> {
    let fd = RawFd::try_from(rc).map_err(|_| io::Error::other("bpf returned an fd out of range"))?;
    // SAFETY: the bpf command succeeded and returned a new fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A SOCKHASH map of `max_entries` sockets keyed by u64, named `name`
/// (at most 15 bytes).
pub fn sockhash(max_entries: u32, name: &[u8]) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32(0, BPF_MAP_TYPE_SOCKHASH).u32(4, 8).u32(8, 8).u32(12, max_entries);
    let name = &name[..name.len().min(15)];
    attr.0[28..28 + name.len()].copy_from_slice(name);
    owned(bpf(BPF_MAP_CREATE, &attr)?)
}

/// A HASH map of `max_entries` u64 keys with one-byte values.
pub fn hash_set(max_entries: u32) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32(0, BPF_MAP_TYPE_HASH).u32(4, 8).u32(8, 1).u32(12, max_entries);
    attr.0[28..28 + 10].copy_from_slice(b"pglb_held\0");
    owned(bpf(BPF_MAP_CREATE, &attr)?)
}

/// Adds `key` to a [`hash_set`].
pub fn set_add(map: BorrowedFd<'_>, key: u64) -> io::Result<()> {
    let value: u8 = 1;
    let mut attr = Attr::new();
    attr.u32(0, fd_u32(map)).u64(8, &key as *const u64 as u64).u64(16, &value as *const u8 as u64);
    bpf(BPF_MAP_UPDATE_ELEM, &attr).map(drop)
}

/// Loads an `SK_SKB` program; on failure the verifier's log is in the error.
pub fn load_sk_skb(insns: &[Insn], license: &std::ffi::CStr) -> io::Result<OwnedFd> {
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = Attr::new();
    attr.u32(0, BPF_PROG_TYPE_SK_SKB)
        .u32(4, u32::try_from(insns.len()).unwrap_or(u32::MAX))
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, u32::try_from(log.len()).unwrap_or(u32::MAX))
        .u64(32, log.as_mut_ptr() as u64);
    attr.0[48..48 + 12].copy_from_slice(b"pglb_verdict");
    match bpf(BPF_PROG_LOAD, &attr) {
        Ok(fd) => owned(fd),
        Err(err) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let text = text.trim();
            if text.is_empty() {
                Err(err)
            } else {
                Err(io::Error::new(err.kind(), format!("{err}; verifier: {text}")))
            }
        }
    }
}

/// Attaches `prog` as the verdict program of every socket in `map`.
pub fn attach_verdict(map: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.u32(0, fd_u32(map)).u32(4, fd_u32(prog)).u32(8, BPF_SK_SKB_VERDICT);
    bpf(BPF_PROG_ATTACH, &attr).map(drop)
}

/// Puts `socket` in `map` under `key` (fails if the key is taken).
pub fn insert(map: BorrowedFd<'_>, key: u64, socket: BorrowedFd<'_>) -> io::Result<()> {
    let value = u64::from(fd_u32(socket));
    let mut attr = Attr::new();
    attr.u32(0, fd_u32(map)).u64(8, &key as *const u64 as u64).u64(16, &value as *const u64 as u64).u64(24, NOEXIST);
    bpf(BPF_MAP_UPDATE_ELEM, &attr).map(drop)
}

/// Removes `key` from `map`.
pub fn remove(map: BorrowedFd<'_>, key: u64) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.u32(0, fd_u32(map)).u64(8, &key as *const u64 as u64);
    bpf(BPF_MAP_DELETE_ELEM, &attr).map(drop)
}

fn fd_u32(fd: BorrowedFd<'_>) -> u32 {
    // An open fd is never negative.
    u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX)
}

/// The socket's cookie (`SO_COOKIE`): what the program looks its peer up by.
pub fn cookie(socket: BorrowedFd<'_>) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, which we own.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Sets `SO_RCVLOWAT` to 1. Setting it makes TCP call the socket's
/// data-ready callback when bytes are already queued: for a socket just put
/// in the map, that runs the verdict program over bytes that arrived before.
pub fn kick(socket: BorrowedFd<'_>) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads an int we own.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Byte counts of one TCP socket, from the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpCounts {
    /// `tcpi_bytes_received`: every byte received from the peer, in order.
    pub received: u64,
    /// `tcpi_bytes_acked` plus the send queue (`SIOCOUTQ`): every byte
    /// written into this socket by pglb or the kernel.
    pub written: u64,
    /// The send queue alone: written, not yet acknowledged by the peer.
    pub unacked: u64,
    /// The peer's FIN has arrived (it takes a sequence number, so it is
    /// counted in `received`).
    pub fin_received: bool,
    /// This socket has sent its FIN (counted in `written`).
    pub fin_sent: bool,
    /// Closed (reset, or both FINs exchanged and the connection moved to
    /// TIME_WAIT): whether its FINs were counted can no longer be told.
    pub closed: bool,
}

/// `tcp_info.tcpi_state` values (`enum tcp_state` in the kernel).
const TCP_FIN_WAIT1: u8 = 4;
const TCP_FIN_WAIT2: u8 = 5;
const TCP_TIME_WAIT: u8 = 6;
const TCP_CLOSE: u8 = 7;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LAST_ACK: u8 = 9;
const TCP_CLOSING: u8 = 11;

/// Offsets in `struct tcp_info` (stable ABI, appended to only).
const TCPI_BYTES_ACKED: usize = 120;
const TCPI_BYTES_RECEIVED: usize = 128;
const TCPI_LEN: usize = 136;

/// The byte counts of `socket`.
pub fn tcp_counts(socket: BorrowedFd<'_>) -> io::Result<TcpCounts> {
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which we own.
    let rc = unsafe {
        libc::getsockopt(socket.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, info.as_mut_ptr().cast(), &mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < TCPI_LEN {
        return Err(io::Error::other("TCP_INFO without byte counters (Linux 4.1+ needed)"));
    }
    let at = |o: usize| u64::from_ne_bytes(info[o..o + 8].try_into().unwrap_or([0; 8]));
    let (acked, received) = (at(TCPI_BYTES_ACKED), at(TCPI_BYTES_RECEIVED));
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int into `queued`, which we own.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let unacked = u64::try_from(queued).unwrap_or(0);
    // Read with the counts: a FIN is never counted without its flag.
    let state = info[0];
    let fin_received = matches!(state, TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING | TCP_TIME_WAIT);
    let fin_sent = matches!(state, TCP_FIN_WAIT1 | TCP_FIN_WAIT2 | TCP_CLOSING | TCP_LAST_ACK | TCP_TIME_WAIT);
    let closed = state == TCP_CLOSE;
    Ok(TcpCounts { received, written: acked + unacked, unacked, fin_received, fin_sent, closed })
}

/// Bytes received and not read yet (`SIOCINQ`).
pub fn inq(socket: BorrowedFd<'_>) -> io::Result<u64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCINQ writes one int into `queued`, which we own.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::FIONREAD, &mut queued) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(queued).unwrap_or(0))
}

/// An epoll instance that reports only hang-ups and errors.
pub struct Epoll(OwnedFd);

/// What a watched socket reported.
pub const HANGUP: u32 = (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;

impl Epoll {
    pub fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1 takes flags only and returns a new fd.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the fd was just created and is owned by nobody else.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Watches `socket` for `EPOLLRDHUP | EPOLLHUP | EPOLLERR` only — not
    /// `EPOLLIN`, so the bytes the kernel redirects wake nobody. Edge
    /// triggered: each change is reported once.
    pub fn watch(&self, socket: BorrowedFd<'_>, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event { events: HANGUP | libc::EPOLLET as u32, u64: token };
        // SAFETY: epoll_ctl reads the event we own; both fds are open.
        let rc = unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, socket.as_raw_fd(), &mut event) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stops watching `socket` (harmless if it was not watched).
    pub fn unwatch(&self, socket: BorrowedFd<'_>) {
        let mut event = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: as in `watch`; an error (not watched) changes nothing.
        let _ = unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_DEL, socket.as_raw_fd(), &mut event) };
    }

    /// The tokens of sockets that hung up, without waiting.
    pub fn ready(&self, out: &mut Vec<(u64, u32)>) -> io::Result<()> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        loop {
            // SAFETY: epoll_wait writes at most 64 events into the array we own.
            let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), events.as_mut_ptr(), 64, 0) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            let n = usize::try_from(n).unwrap_or(0);
            out.extend(events[..n].iter().map(|e| (e.u64, e.events)));
            if n < events.len() {
                return Ok(());
            }
        }
    }
}

/// Registers the epoll instance with the current tokio runtime, readable
/// when a watched socket reports something.
pub fn register(epoll: Epoll) -> io::Result<tokio::io::unix::AsyncFd<Epoll>> {
    // SAFETY: `Epoll` owns its fd and moves into the AsyncFd, so the fd stays
    // open, and is not reused, for as long as it is registered.
    Ok(unsafe { tokio::io::unix::AsyncFd::register_with_interest(epoll, tokio::io::Interest::READABLE)? })
}

impl AsRawFd for Epoll {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
