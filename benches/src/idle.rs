//! Many idle client sessions through one port, each past its login
//! (ReadyForQuery received), held open until dropped.

use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::stream::{self, StreamExt};
use tokio::runtime::Runtime;
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{Client, Connection, NoTls, Socket};

/// Logins made at once while opening.
const PARALLEL: usize = 32;

type Session = (Client, Connection<Socket, NoTlsStream>);

/// Open sessions; dropping this closes them all.
pub struct IdleSessions {
    // Declared before `runtime`: sessions must drop while the runtime lives.
    sessions: Vec<Session>,
    pub failures: usize,
    pub first_error: Option<String>,
    runtime: Runtime,
}

impl IdleSessions {
    pub fn new() -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start an async runtime for idle sessions")?;
        Ok(Self { sessions: Vec::new(), failures: 0, first_error: None, runtime })
    }

    pub fn count(&self) -> usize {
        self.sessions.len()
    }

    /// Opens `n` more sessions to 127.0.0.1:`port` as `postgres`. A failed
    /// login is counted, not fatal (the caller reports it).
    pub fn open(&mut self, port: u16, n: usize) {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(port)
            .user("postgres")
            .dbname("postgres")
            .application_name("pglb-bench-idle")
            .connect_timeout(Duration::from_secs(10));
        let results: Vec<_> = self
            .runtime
            .block_on(stream::iter(0..n).map(|_| config.connect(NoTls)).buffer_unordered(PARALLEL).collect());
        for result in results {
            match result {
                Ok(session) => self.sessions.push(session),
                Err(e) => {
                    self.failures += 1;
                    self.first_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
    }
}

impl Drop for IdleSessions {
    fn drop(&mut self) {
        let sessions = std::mem::take(&mut self.sessions);
        let _inside = self.runtime.enter();
        drop(sessions);
    }
}
