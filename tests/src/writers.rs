//! Writers that measure what a role change costs clients: one opens a new
//! connection for every write, one keeps a session (reconnecting when it
//! breaks). Each write inserts a row and returns its id and the port of the
//! server that acknowledged it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One attempt.
#[derive(Debug, Clone)]
pub struct Write {
    /// When the answer (or the error) came.
    pub at: Instant,
    /// The row id and the acknowledging server's port, or the error.
    pub result: Result<(i64, u16), String>,
}

/// Both writers, running until [`Writers::stop`].
pub struct Writers {
    stop: Arc<AtomicBool>,
    pub per_connection: Arc<Mutex<Vec<Write>>>,
    pub session: Arc<Mutex<Vec<Write>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const CREATE: &str =
    "CREATE TABLE IF NOT EXISTS pglb_writes (id bigserial PRIMARY KEY, writer text, at timestamptz DEFAULT now())";
const INSERT: &str = "INSERT INTO pglb_writes (writer) VALUES ($1) RETURNING id, inet_server_port()";

/// A login through `port`, in TLS (`sslmode=require`) or plaintext. Its
/// errors start with "connect: ", to tell failed connections from failed
/// writes.
async fn connect(port: u16, tls: bool) -> Result<tokio_postgres::Client, String> {
    let mode = if tls { "require" } else { "disable" };
    let conn = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode={mode} connect_timeout=30");
    let failed =
        |e: tokio_postgres::Error| format!("connect: {e}: {}", e.as_db_error().map(|d| d.message()).unwrap_or(""));
    let client = if tls {
        let connector = pglb_health::make_tls(None).map_err(|e| format!("connect: {e}"))?;
        let (client, connection) = tokio_postgres::connect(&conn, connector).await.map_err(failed)?;
        tokio::spawn(connection);
        client
    } else {
        let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await.map_err(failed)?;
        tokio::spawn(connection);
        client
    };
    Ok(client)
}

async fn insert(client: &tokio_postgres::Client, writer: &str) -> Result<(i64, u16), String> {
    let row = tokio::time::timeout(Duration::from_secs(30), client.query_one(INSERT, &[&writer]))
        .await
        .map_err(|_| "no answer within 30s".to_owned())?
        .map_err(|e| format!("{e}: {}", e.as_db_error().map(|d| d.message()).unwrap_or("")))?;
    let port: i32 = row.get(1);
    Ok((row.get(0), u16::try_from(port).unwrap_or(0)))
}

impl Writers {
    /// Creates the table through `port` and starts writing every `every`,
    /// in plaintext.
    pub fn start(port: u16, every: Duration) -> Self {
        Self::start_with(port, every, false)
    }

    /// Like [`Writers::start`], every connection in TLS when `tls`.
    pub fn start_with(port: u16, every: Duration, tls: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (per_connection, session) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        runtime.block_on(async {
            let client = connect(port, tls).await.expect("connect to create the table");
            client.batch_execute(CREATE).await.expect("create the table");
        });
        let (s, a, b) = (stop.clone(), per_connection.clone(), session.clone());
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let s2 = s.clone();
                let fresh = tokio::spawn(async move {
                    while !s2.load(Ordering::Relaxed) {
                        let result = match connect(port, tls).await {
                            Ok(client) => insert(&client, "per_connection").await,
                            Err(e) => Err(e),
                        };
                        a.lock().unwrap_or_else(|e| e.into_inner()).push(Write { at: Instant::now(), result });
                        tokio::time::sleep(every).await;
                    }
                });
                let kept = tokio::spawn(async move {
                    let mut client = None;
                    while !s.load(Ordering::Relaxed) {
                        if client.is_none() {
                            match connect(port, tls).await {
                                Ok(c) => client = Some(c),
                                Err(e) => {
                                    b.lock()
                                        .unwrap_or_else(|e| e.into_inner())
                                        .push(Write { at: Instant::now(), result: Err(e) });
                                    tokio::time::sleep(every).await;
                                    continue;
                                }
                            }
                        }
                        let Some(c) = client.as_ref() else { continue };
                        let result = insert(c, "session").await;
                        if result.is_err() {
                            client = None;
                        }
                        b.lock().unwrap_or_else(|e| e.into_inner()).push(Write { at: Instant::now(), result });
                        tokio::time::sleep(every).await;
                    }
                });
                let _ = tokio::join!(fresh, kept);
            });
        });
        Self { stop, per_connection, session, thread: Some(thread) }
    }

    /// Stops both writers and waits for them.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    /// Failed attempts of each writer since `from`.
    pub fn failures_since(&self, from: Instant) -> (usize, usize) {
        let count = |w: &Mutex<Vec<Write>>| {
            w.lock().unwrap_or_else(|e| e.into_inner()).iter().filter(|w| w.at >= from && w.result.is_err()).count()
        };
        (count(&self.per_connection), count(&self.session))
    }

    /// Connections of the per-connection writer that failed since `from`
    /// (not writes that failed on a connection that was made).
    pub fn failed_connections_since(&self, from: Instant) -> usize {
        let writes = self.per_connection.lock().unwrap_or_else(|e| e.into_inner());
        writes.iter().filter(|w| w.at >= from && w.result.as_ref().is_err_and(|e| e.starts_with("connect: "))).count()
    }

    /// Every acknowledged write of both writers: (when, id, port).
    pub fn acknowledged(&self) -> Vec<(Instant, i64, u16)> {
        let mut out = Vec::new();
        for w in [&self.per_connection, &self.session] {
            for write in w.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                if let Ok((id, port)) = write.result {
                    out.push((write.at, id, port));
                }
            }
        }
        out
    }

    /// The first acknowledgement by `port` at or after `from`.
    pub fn first_ack_on(&self, port: u16, from: Instant) -> Option<Instant> {
        self.acknowledged().into_iter().filter(|(at, _, p)| *p == port && *at >= from).map(|(at, _, _)| at).min()
    }

    /// The longest time between two acknowledged writes of the
    /// per-connection writer from `from` on (write unavailability).
    pub fn longest_gap_since(&self, from: Instant) -> Duration {
        let writes = self.per_connection.lock().unwrap_or_else(|e| e.into_inner());
        let acks: Vec<Instant> = writes.iter().filter(|w| w.at >= from && w.result.is_ok()).map(|w| w.at).collect();
        let mut gap = Duration::ZERO;
        let mut last = from;
        for at in acks {
            gap = gap.max(at.saturating_duration_since(last));
            last = at;
        }
        gap
    }

    /// Distinct errors since `from`, counted.
    pub fn errors_since(&self, from: Instant) -> Vec<(String, usize)> {
        let mut seen: Vec<(String, usize)> = Vec::new();
        for w in [&self.per_connection, &self.session] {
            for write in w.lock().unwrap_or_else(|e| e.into_inner()).iter().filter(|w| w.at >= from) {
                if let Err(e) = &write.result {
                    let key: String = e.chars().take(120).collect();
                    match seen.iter_mut().find(|(k, _)| *k == key) {
                        Some((_, n)) => *n += 1,
                        None => seen.push((key, 1)),
                    }
                }
            }
        }
        seen
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        self.stop();
    }
}
