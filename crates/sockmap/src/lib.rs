//! The sockmap fast path: once pglb has routed a session and the backend has
//! answered, the session's two sockets go into a kernel map (SOCKHASH) whose
//! verdict program redirects what each socket receives straight to its
//! peer's send path. The bytes never come up to pglb again; pglb watches for
//! hang-ups and errors only, passes each EOF on once the bytes before it have
//! been handed to the peer, and reads the byte counts from `TCP_INFO`.
//!
//! Linux only, and it needs CAP_BPF + CAP_NET_ADMIN (or root) and `bpf(2)`
//! allowed by the seccomp filter. [`Kernel::load`] says why when it cannot.

pub mod integrity;
pub mod program;
mod sys;
pub mod watch;

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use sys::TcpCounts;
pub use watch::{Hangup, Watch, Watcher};

/// Most sockets in the map (two per session).
pub const MAX_SOCKETS: u32 = 1 << 17;

/// The loaded program and its map, shared by every session.
pub struct Kernel {
    /// Cookie -> the socket's peer: what the program redirects to.
    peers: OwnedFd,
    /// Cookie -> the socket itself: the map the program is attached to.
    /// A socket enters it only once both sockets are in `peers`, so the
    /// first byte it receives already finds its peer.
    active: OwnedFd,
    /// Cookies of sockets held back: their bytes stay with them.
    held: OwnedFd,
    _prog: OwnedFd,
    watcher: Watcher,
}

/// Why the kernel path is not available.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("cannot create the SOCKHASH map: {0} (sockmap needs CAP_BPF and CAP_NET_ADMIN, or root, and bpf(2) allowed: see deploy/systemd/sockmap.conf)")]
    Map(io::Error),
    #[error("the kernel refused the verdict program: {0}")]
    Program(io::Error),
    #[error("cannot attach the verdict program: {0} (Linux 5.13 or newer is needed)")]
    Attach(io::Error),
    #[error("cannot watch sockets for hang-ups: {0}")]
    Watcher(io::Error),
}

impl Kernel {
    /// Creates the map, loads and attaches the program. Must run inside the
    /// tokio runtime that will forward (it registers the hang-up watcher).
    pub fn load() -> Result<Self, Unavailable> {
        let peers = sys::sockhash(MAX_SOCKETS, b"pglb_peers").map_err(Unavailable::Map)?;
        let active = sys::sockhash(MAX_SOCKETS, b"pglb_active").map_err(Unavailable::Map)?;
        let held = sys::hash_set(MAX_SOCKETS).map_err(Unavailable::Map)?;
        let insns = program::verdict(peers.as_raw_fd(), held.as_raw_fd());
        let prog = sys::load_sk_skb(&insns, c"Dual MIT/GPL").map_err(Unavailable::Program)?;
        sys::attach_verdict(active.as_fd(), prog.as_fd()).map_err(Unavailable::Attach)?;
        let watcher = Watcher::start().map_err(Unavailable::Watcher)?;
        Ok(Self { peers, active, held, _prog: prog, watcher })
    }

    /// Links `a` and `b`: from now on what either receives is sent by the
    /// kernel to the other. Bytes already queued in either socket are sent
    /// on too (setting `SO_RCVLOWAT` makes TCP run the socket's data-ready
    /// callback, and so the program, over them), but the verdict takes whole segments: pglb
    /// must not have read part of one (read until `WouldBlock` first). On
    /// error nothing is left in the maps.
    pub fn link(&self, a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> io::Result<Link> {
        let (ka, kb) = (sys::cookie(a)?, sys::cookie(b)?);
        let base = [Base::of(a)?, Base::of(b)?];
        let link = Link { keys: [ka, kb], base };
        // Peers first (what `a` receives goes to `b`: the program looks `b`
        // up by `a`'s cookie), then the program: no byte can reach the
        // program before its socket's peer is known.
        let steps = [(&self.peers, ka, b), (&self.peers, kb, a), (&self.active, ka, a), (&self.active, kb, b)];
        for (map, key, socket) in steps {
            if let Err(err) = sys::insert(map.as_fd(), key, socket) {
                self.unlink(link);
                return Err(err);
            }
        }
        if let Err(err) = sys::kick(a).and_then(|()| sys::kick(b)) {
            self.unlink(link);
            return Err(err);
        }
        Ok(link)
    }

    /// Takes a link's sockets out of the maps (bytes still queued in the
    /// kernel for them are dropped: unlink when both directions are done).
    pub fn unlink(&self, link: Link) {
        for map in [&self.active, &self.peers, &self.held] {
            for key in link.keys {
                let _ = sys::remove(map.as_fd(), key);
            }
        }
    }

    /// Holds a link's bytes back: from now on what either socket receives
    /// stays with it (readable by pglb, and charged to its receive memory,
    /// so TCP's flow control works again). Bytes already redirected still
    /// go out: wait for [`Link::settled`] before writing to either socket.
    pub fn hold(&self, link: &Link) -> io::Result<()> {
        for key in link.keys {
            sys::set_add(self.held.as_fd(), key)?;
        }
        Ok(())
    }

    pub fn watcher(&self) -> &Watcher {
        &self.watcher
    }
}

/// A linked pair of sockets; give it back to [`Kernel::unlink`].
#[derive(Debug)]
#[must_use = "a link stays in the kernel map until Kernel::unlink"]
pub struct Link {
    keys: [u64; 2],
    base: [Base; 2],
}

/// A socket's counts when it was linked.
#[derive(Debug, Clone, Copy)]
struct Base {
    /// Bytes pglb had read from it.
    consumed: u64,
    /// Bytes written into it (by pglb).
    written: u64,
}

impl Base {
    fn of(socket: BorrowedFd<'_>) -> io::Result<Self> {
        let (counts, queued) = counts_and_queued(socket)?;
        Ok(Self { consumed: counts.received.saturating_sub(queued), written: counts.written })
    }
}

/// A socket's counts and the bytes it holds unread, read between two equal
/// `received` readings, so no segment arrived in between.
fn counts_and_queued(socket: BorrowedFd<'_>) -> io::Result<(TcpCounts, u64)> {
    loop {
        let before = sys::tcp_counts(socket)?;
        let queued = sys::inq(socket)?;
        let after = sys::tcp_counts(socket)?;
        if before.received == after.received {
            return Ok((after, queued));
        }
    }
}

/// One direction of a link since it was made: what the source received and
/// what has been written into the destination (by the kernel's redirect,
/// and by pglb once the session has left the kernel path).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flow {
    pub received: u64,
    pub delivered: u64,
    /// Of `delivered`, bytes the destination's peer has not acknowledged yet.
    pub unacked: u64,
    /// The source or the destination has closed: the session is ending, and
    /// its counts may be off by a FIN (see [`integrity`]).
    pub closed: bool,
}

impl Flow {
    /// Every byte received has been handed to the destination's TCP send
    /// queue: its EOF can follow without cutting anything off.
    ///
    /// A socket whose peer's FIN arrived after its own was sent (FIN_WAIT2,
    /// then TIME_WAIT) is left in TCP_CLOSE, where its state no longer says
    /// that a FIN came, and the FIN counts like a byte in `received`: once
    /// closed, one byte short is that FIN (a byte lost to a reset there
    /// would end the session anyway).
    pub fn drained(&self) -> bool {
        self.delivered >= self.received || (self.closed && self.delivered + 1 == self.received)
    }
}

impl Link {
    /// The two directions (`a` to `b`, `b` to `a`) since the link was made.
    /// Each destination is read before its source (`a`, `b`, then `a`
    /// again), so a byte arriving meanwhile can make a destination look
    /// behind but never ahead: `delivered > received` is never a sampling
    /// artefact (see [`integrity`]).
    pub fn flows(&self, a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> io::Result<[Flow; 2]> {
        let first_a = (sys::tcp_counts(a)?, 0);
        let b = (sys::tcp_counts(b)?, 0);
        let then_a = (sys::tcp_counts(a)?, 0);
        Ok(self.directions(first_a, b, then_a))
    }

    /// Like [`Link::flows`], but `received` counts only what the source's
    /// reader (the kernel, or pglb once the session left the kernel path)
    /// has taken: bytes still queued unread in the source are not counted.
    pub fn consumed(&self, a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> io::Result<[Flow; 2]> {
        let first_a = counts_and_queued(a)?;
        let b = counts_and_queued(b)?;
        let then_a = counts_and_queued(a)?;
        Ok(self.directions(first_a, b, then_a))
    }

    /// After [`Kernel::hold`]: every byte the kernel redirected has reached
    /// its destination's send queue (the rest waits unread in its source),
    /// so pglb may now read and write both sockets itself.
    pub fn settled(&self, a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> io::Result<bool> {
        Ok(self.consumed(a, b)?.iter().all(Flow::drained))
    }

    /// Both directions from each socket's counts and the bytes it holds
    /// unread (not counted as received: nobody has taken them yet).
    /// `first_a` and `then_a` are `a` read before and after `b`. FINs take
    /// a sequence number, so TCP counts each like a byte: not counted here.
    fn directions(
        &self,
        (first_a, _): (TcpCounts, u64),
        (cb, qb): (TcpCounts, u64),
        (then_a, qa): (TcpCounts, u64),
    ) -> [Flow; 2] {
        let received = |c: TcpCounts, queued: u64, i: usize| {
            c.received.saturating_sub(self.base[i].consumed + queued + u64::from(c.fin_received))
        };
        // Direction 0 is written into b (base 1), direction 1 into a (base 0).
        let delivered =
            |c: TcpCounts, i: usize| c.written.saturating_sub(self.base[1 - i].written + u64::from(c.fin_sent));
        let closed = then_a.closed || cb.closed;
        [
            Flow { received: received(then_a, qa, 0), delivered: delivered(cb, 0), unacked: cb.unacked, closed },
            Flow { received: received(cb, qb, 1), delivered: delivered(first_a, 1), unacked: first_a.unacked, closed },
        ]
    }
}
