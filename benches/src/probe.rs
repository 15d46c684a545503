//! A writer that tries an INSERT every 10ms through one port, on its own
//! thread, recording when each attempt started, ended and whether it
//! succeeded: on a fresh connection each time, or on one kept session (a
//! failed attempt is then a session the client lost, and the next one
//! reconnects). Stops and joins on drop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio_postgres::NoTls;

/// Time between the starts of two attempts.
const PACE: Duration = Duration::from_millis(10);
/// One attempt (connect + INSERT) gives up after this; generous so that a
/// balancer that holds clients until a primary appears is measured fully.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    pub start: Instant,
    pub end: Instant,
    pub ok: bool,
}

pub struct Probe {
    stop: Arc<AtomicBool>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    last_error: Arc<Mutex<String>>,
    thread: Option<JoinHandle<()>>,
}

/// How the probe connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Connect + INSERT each time (new clients).
    Fresh,
    /// INSERT on one kept session (a client already connected).
    Session,
}

impl Probe {
    /// Starts writing `INSERT INTO bench_probe (src) VALUES (label)`
    /// through 127.0.0.1:`port`.
    pub fn start(label: &str, port: u16) -> Result<Self> {
        Self::start_mode(label, port, Mode::Fresh)
    }

    pub fn start_mode(label: &str, port: u16, mode: Mode) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start an async runtime for the probe")?;
        let stop = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let last_error = Arc::new(Mutex::new(String::new()));
        let (s, a, e) = (stop.clone(), attempts.clone(), last_error.clone());
        let sql = format!("INSERT INTO bench_probe (src) VALUES ('{label}')");
        let thread = std::thread::Builder::new()
            .name(format!("probe-{label}"))
            .spawn(move || runtime.block_on(writer(port, sql, mode, s, a, e)))
            .context("cannot start the probe thread")?;
        Ok(Self { stop, attempts, last_error, thread: Some(thread) })
    }

    /// Every attempt so far, in order.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.attempts.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub fn last_error(&self) -> String {
        self.last_error.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn writer(
    port: u16,
    sql: String,
    mode: Mode,
    stop: Arc<AtomicBool>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    last_error: Arc<Mutex<String>>,
) {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("postgres")
        .dbname("postgres")
        .application_name("pglb-bench-probe")
        .connect_timeout(Duration::from_secs(5));
    let mut session: Option<Session> = None;
    while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        let attempt = async {
            match mode {
                Mode::Fresh => insert(&config, &sql).await,
                Mode::Session => on_session(&mut session, &config, &sql).await,
            }
        };
        let result = tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await;
        let result = result.unwrap_or_else(|_| Err("attempt timed out".into()));
        if result.is_err() {
            session = None;
        }
        let end = Instant::now();
        if let Err(e) = &result {
            *last_error.lock().unwrap_or_else(PoisonError::into_inner) = e.clone();
        }
        let ok = result.is_ok();
        attempts.lock().unwrap_or_else(PoisonError::into_inner).push(Attempt { start, end, ok });
        tokio::time::sleep_until((start + PACE).into()).await;
    }
}

/// A kept connection.
struct Session {
    client: tokio_postgres::Client,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// One INSERT on the kept session (connecting first if there is none).
async fn on_session(session: &mut Option<Session>, config: &tokio_postgres::Config, sql: &str) -> Result<(), String> {
    if session.is_none() {
        let (client, connection) = config.connect(NoTls).await.map_err(|e| e.to_string())?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        *session = Some(Session { client, driver });
    }
    let Some(s) = session.as_ref() else { return Err("no session".into()) };
    s.client.execute(sql, &[]).await.map(|_| ()).map_err(|e| e.to_string())
}

/// One fresh connection, one INSERT.
async fn insert(config: &tokio_postgres::Config, sql: &str) -> Result<(), String> {
    let (client, connection) = config.connect(NoTls).await.map_err(|e| e.to_string())?;
    let driver = tokio::spawn(connection);
    let result = client.execute(sql, &[]).await.map(|_| ()).map_err(|e| e.to_string());
    drop(client);
    let _ = driver.await;
    result
}
