//! A sender that retransmits bytes its receiver already has: the segment a
//! lossy network produces when a retransmission overlaps what arrived. Made
//! with TCP_REPAIR (CAP_NET_ADMIN, as checkpoint/restore tools use it): the
//! connection is moved, silently, to a new socket whose next byte is sent
//! `back` bytes earlier in the sequence space than the old one stood.
//!
//! Test machinery only. The one module of the test kit allowed `unsafe`:
//! each block is one socket call on a file descriptor this module owns,
//! with memory it owns for the call.
#![allow(unsafe_code)]

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const TCP_REPAIR: i32 = 19;
const TCP_REPAIR_QUEUE: i32 = 20;
const TCP_QUEUE_SEQ: i32 = 21;
const TCP_REPAIR_OPTIONS: i32 = 22;
const TCP_TIMESTAMP: i32 = 24;
const TCP_REPAIR_WINDOW: i32 = 29;
const TCP_RECV_QUEUE: i32 = 1;
const TCP_SEND_QUEUE: i32 = 2;
/// `struct tcp_repair_opt` codes (TCPOPT_*).
const OPT_MSS: u32 = 2;
const OPT_WINDOW: u32 = 3;
const OPT_SACK_PERM: u32 = 4;
const OPT_TIMESTAMP: u32 = 8;
/// `tcpi_options` bits.
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;

fn check(rc: libc::c_int, what: &str) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    }
}

fn set(fd: RawFd, level: i32, opt: i32, val: &[u8], what: &str) -> io::Result<()> {
    let len = libc::socklen_t::try_from(val.len()).unwrap_or(0);
    // SAFETY: setsockopt reads `len` bytes of `val`, which we own.
    check(unsafe { libc::setsockopt(fd, level, opt, val.as_ptr().cast(), len) }, what)
}

fn get(fd: RawFd, level: i32, opt: i32, val: &mut [u8], what: &str) -> io::Result<()> {
    let mut len = libc::socklen_t::try_from(val.len()).unwrap_or(0);
    // SAFETY: getsockopt writes at most `len` bytes into `val`, which we own.
    check(unsafe { libc::getsockopt(fd, level, opt, val.as_mut_ptr().cast(), &mut len) }, what)
}

fn set_int(fd: RawFd, opt: i32, v: i32, what: &str) -> io::Result<()> {
    set(fd, libc::IPPROTO_TCP, opt, &v.to_ne_bytes(), what)
}

fn get_u32(fd: RawFd, opt: i32, what: &str) -> io::Result<u32> {
    let mut b = [0u8; 4];
    get(fd, libc::IPPROTO_TCP, opt, &mut b, what)?;
    Ok(u32::from_ne_bytes(b))
}

fn sockaddr(a: SocketAddr) -> io::Result<libc::sockaddr_in> {
    let SocketAddr::V4(a) = a else {
        return Err(io::Error::other("IPv4 only"));
    };
    Ok(libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
        sin_zero: [0; 8],
    })
}

/// What a connection needs to be carried on by another socket.
struct State {
    local: SocketAddr,
    peer: SocketAddr,
    send_seq: u32,
    recv_seq: u32,
    mss: u32,
    timestamp: u32,
    window: [u8; 20],
    options: u8,
    wscale: u8,
}

fn freeze(s: &TcpStream) -> io::Result<State> {
    let fd = s.as_raw_fd();
    let (local, peer) = (s.local_addr()?, s.peer_addr()?);
    set_int(fd, TCP_REPAIR, 1, "TCP_REPAIR on (needs CAP_NET_ADMIN)")?;
    set_int(fd, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, "TCP_REPAIR_QUEUE")?;
    let send_seq = get_u32(fd, TCP_QUEUE_SEQ, "send sequence")?;
    set_int(fd, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE, "TCP_REPAIR_QUEUE")?;
    let recv_seq = get_u32(fd, TCP_QUEUE_SEQ, "receive sequence")?;
    let mss = get_u32(fd, libc::TCP_MAXSEG, "TCP_MAXSEG")?;
    let timestamp = get_u32(fd, TCP_TIMESTAMP, "TCP_TIMESTAMP")?;
    let mut window = [0u8; 20];
    get(fd, libc::IPPROTO_TCP, TCP_REPAIR_WINDOW, &mut window, "TCP_REPAIR_WINDOW")?;
    let mut info = [0u8; 104];
    get(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info, "TCP_INFO")?;
    // struct tcp_info: u8 state, ca_state, retransmits, probes, backoff,
    // options, then snd_wscale:4 | rcv_wscale:4.
    Ok(State { local, peer, send_seq, recv_seq, mss, timestamp, window, options: info[5], wscale: info[6] })
}

fn thaw(state: &State, send_seq: u32) -> io::Result<TcpStream> {
    // SAFETY: socket(2) with constant arguments; the fd is owned below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new fd nobody else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
    let fd = owned.as_raw_fd();
    set_int(fd, TCP_REPAIR, 1, "TCP_REPAIR on")?;
    set(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &1i32.to_ne_bytes(), "SO_REUSEADDR")?;
    set_int(fd, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE, "TCP_REPAIR_QUEUE")?;
    set(fd, libc::IPPROTO_TCP, TCP_QUEUE_SEQ, &send_seq.to_ne_bytes(), "send sequence")?;
    set_int(fd, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE, "TCP_REPAIR_QUEUE")?;
    set(fd, libc::IPPROTO_TCP, TCP_QUEUE_SEQ, &state.recv_seq.to_ne_bytes(), "receive sequence")?;
    let size = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let (local, peer) = (sockaddr(state.local)?, sockaddr(state.peer)?);
    // SAFETY: bind reads a sockaddr_in we own, of the size given.
    check(unsafe { libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), size) }, "bind")?;
    // In repair mode connect sends nothing: the socket is established at once.
    // SAFETY: connect reads a sockaddr_in we own, of the size given.
    check(unsafe { libc::connect(fd, (&peer as *const libc::sockaddr_in).cast(), size) }, "connect")?;
    let mut opts = Vec::new();
    let mut opt = |code: u32, val: u32| {
        opts.extend_from_slice(&code.to_ne_bytes());
        opts.extend_from_slice(&val.to_ne_bytes());
    };
    opt(OPT_MSS, state.mss);
    if state.options & TCPI_OPT_WSCALE != 0 {
        let (snd, rcv) = (u32::from(state.wscale & 0xf), u32::from(state.wscale >> 4));
        opt(OPT_WINDOW, snd | (rcv << 16));
    }
    if state.options & TCPI_OPT_SACK != 0 {
        opt(OPT_SACK_PERM, 0);
    }
    if state.options & TCPI_OPT_TIMESTAMPS != 0 {
        opt(OPT_TIMESTAMP, 0);
    }
    set(fd, libc::IPPROTO_TCP, TCP_REPAIR_OPTIONS, &opts, "TCP_REPAIR_OPTIONS")?;
    if state.options & TCPI_OPT_TIMESTAMPS != 0 {
        set(fd, libc::IPPROTO_TCP, TCP_TIMESTAMP, &state.timestamp.to_ne_bytes(), "TCP_TIMESTAMP")?;
    }
    set(fd, libc::IPPROTO_TCP, TCP_REPAIR_WINDOW, &state.window, "TCP_REPAIR_WINDOW")?;
    set_int(fd, TCP_REPAIR, 0, "TCP_REPAIR off")?;
    Ok(TcpStream::from(owned))
}

/// Connects to `to` from a port of its own (bound before connecting, with
/// `SO_REUSEADDR`), so that [`rewind`] can take the port over again: a
/// port the kernel picks at connect time may be shared with other
/// connections (or their TIME_WAIT remains) and could not be bound again.
pub fn connect(to: SocketAddr) -> io::Result<TcpStream> {
    // SAFETY: socket(2) with constant arguments; the fd is owned below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new fd nobody else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
    let fd = owned.as_raw_fd();
    set(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &1i32.to_ne_bytes(), "SO_REUSEADDR")?;
    let size = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let (local, peer) = (sockaddr(SocketAddr::from(([127, 0, 0, 1], 0)))?, sockaddr(to)?);
    // SAFETY: bind reads a sockaddr_in we own, of the size given.
    check(unsafe { libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), size) }, "bind")?;
    // SAFETY: connect reads a sockaddr_in we own, of the size given.
    check(unsafe { libc::connect(fd, (&peer as *const libc::sockaddr_in).cast(), size) }, "connect")?;
    Ok(TcpStream::from(owned))
}

/// Carries `stream`'s connection on in a new socket whose next byte is sent
/// `back` bytes before the old one's: write those `back` bytes again, then
/// something new, and the receiver gets one segment that overlaps what it
/// already has (a correct receiver keeps only the new bytes). The old socket
/// is closed silently (nothing is sent). IPv4; needs CAP_NET_ADMIN; `stream`
/// must come from [`connect`] (or be bound with `SO_REUSEADDR`).
pub fn rewind(stream: TcpStream, back: u32) -> io::Result<TcpStream> {
    let state = freeze(&stream)?;
    drop(stream);
    thaw(&state, state.send_seq.wrapping_sub(back))
}
