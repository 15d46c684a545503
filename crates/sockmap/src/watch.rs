//! Hang-up watching: one epoll instance, registered with tokio, that reports
//! `EPOLLRDHUP | EPOLLHUP | EPOLLERR` of linked sockets and never `EPOLLIN`,
//! so the bytes the kernel moves wake nobody. A session waits on its
//! [`Hangup`]s.

use std::collections::HashMap;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use crate::sys::Epoll;

/// `EPOLLRDHUP`: the peer sent FIN.
pub const READ_CLOSED: u32 = libc::EPOLLRDHUP as u32;
/// `EPOLLHUP`: both directions are closed.
pub const CLOSED: u32 = libc::EPOLLHUP as u32;
/// `EPOLLERR`: reset, timeout or another error.
pub const ERROR: u32 = libc::EPOLLERR as u32;

/// What one socket reported so far.
#[derive(Debug, Default)]
pub struct Hangup {
    events: AtomicU32,
    notify: Notify,
}

impl Hangup {
    /// The events seen so far (`READ_CLOSED`, `CLOSED`, `ERROR`).
    pub fn events(&self) -> u32 {
        self.events.load(Ordering::Acquire)
    }

    /// Forgets `mask` (to see it again only if it is reported again);
    /// returns whether it was set.
    pub fn take(&self, mask: u32) -> bool {
        self.events.fetch_and(!mask, Ordering::AcqRel) & mask != 0
    }

    /// Waits until an event arrives (returns at once if one arrived since
    /// the last wait).
    pub async fn changed(&self) {
        self.notify.notified().await;
    }
}

type Waiting = Mutex<HashMap<u64, Arc<Hangup>>>;

/// The process's hang-up watcher.
pub struct Watcher {
    epoll: Arc<AsyncFd<Epoll>>,
    waiting: Arc<Waiting>,
    next: AtomicU64,
}

impl Watcher {
    /// Starts the watcher task on the current tokio runtime.
    pub fn start() -> io::Result<Self> {
        let epoll = Arc::new(crate::sys::register(Epoll::new()?)?);
        let waiting: Arc<Waiting> = Arc::default();
        tokio::spawn(dispatch(epoll.clone(), waiting.clone()));
        Ok(Self { epoll, waiting, next: AtomicU64::new(1) })
    }

    /// Watches `socket` until the returned [`Watch`] is dropped.
    pub fn watch<'a>(&'a self, socket: BorrowedFd<'a>) -> io::Result<Watch<'a>> {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let hangup = Arc::new(Hangup::default());
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).insert(token, hangup.clone());
        if let Err(err) = self.epoll.get_ref().watch(socket, token) {
            self.waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(&token);
            return Err(err);
        }
        Ok(Watch { watcher: self, socket, token, hangup })
    }
}

/// One watched socket.
pub struct Watch<'a> {
    watcher: &'a Watcher,
    socket: BorrowedFd<'a>,
    token: u64,
    hangup: Arc<Hangup>,
}

impl Watch<'_> {
    pub fn hangup(&self) -> &Hangup {
        &self.hangup
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        self.watcher.epoll.get_ref().unwatch(self.socket);
        self.watcher.waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.token);
    }
}

async fn dispatch(epoll: Arc<AsyncFd<Epoll>>, waiting: Arc<Waiting>) {
    let mut ready = Vec::new();
    loop {
        let Ok(mut guard) = epoll.readable().await else {
            tracing::error!("the sockmap hang-up watcher stopped: sessions on the kernel path will not see their ends");
            return;
        };
        ready.clear();
        if let Err(err) = epoll.get_ref().ready(&mut ready) {
            tracing::error!(error = %err, "the sockmap hang-up watcher failed: sessions on the kernel path will not see their ends");
            return;
        }
        guard.clear_ready();
        let waiting = waiting.lock().unwrap_or_else(|e| e.into_inner());
        for (token, events) in &ready {
            if let Some(h) = waiting.get(token) {
                h.events.fetch_or(*events, Ordering::AcqRel);
                h.notify.notify_one();
            }
        }
    }
}
