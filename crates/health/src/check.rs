//! One check attempt over a persistent connection: (re)connect and log in if
//! needed, then ask role, timeline, system identifier, WAL positions and the
//! WAL receiver's state in one query. The attempt owns the connection while
//! it runs and hands it back; it has no deadline of its own (the checker
//! reports silence at the timeout and keeps waiting for a late answer).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pglb_config::{BackendConfig, HealthConfig, SslMode};
use pglb_routing::{Facts, FailureClass, FailureKind, Observation, ObservedRole, Receiver, Wal};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, Row};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::classify::{classify, Classified};

/// Role, timeline (from a primary's current WAL file name — not
/// `pg_control_checkpoint()`, whose timeline stays old until the slow
/// post-promotion checkpoint), system identifier, WAL positions and, on a
/// replica, whether its WAL receiver streams and on which timeline, as text.
/// `hidden` stands for a receiver the check user may not see.
const CHECK_QUERY: &str = "SELECT pg_is_in_recovery()::text,
  CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END,
  (SELECT system_identifier::text FROM pg_control_system()),
  CASE WHEN pg_is_in_recovery() THEN NULL ELSE (pg_current_wal_lsn() - '0/0')::text END,
  CASE WHEN pg_is_in_recovery() THEN NULL ELSE (pg_current_wal_flush_lsn() - '0/0')::text END,
  CASE WHEN pg_is_in_recovery() THEN (pg_last_wal_replay_lsn() - '0/0')::text END,
  CASE WHEN pg_is_in_recovery() THEN
    coalesce((SELECT coalesce(status, 'hidden') || ':' || coalesce(received_tli::text, '')
              FROM pg_stat_wal_receiver), 'none') END";

/// How often the host name of a backend with a kept check connection is
/// looked up again (in the background: a check never waits for it).
const RESOLVE_EVERY: Duration = Duration::from_secs(5);

/// A logged-in check connection, kept between checks.
pub struct CheckConn {
    pub client: Arc<Client>,
    /// Ends when the server closes the connection.
    pub driver: JoinHandle<()>,
    /// The address it is connected to: what its answers are about, and
    /// where sessions go.
    pub addr: IpAddr,
    /// A lookup of the backend's host name running in the background, and
    /// when the last one started.
    lookup: Option<JoinHandle<std::io::Result<Vec<IpAddr>>>>,
    looked_up: Instant,
}

impl Drop for CheckConn {
    fn drop(&mut self) {
        self.driver.abort();
        if let Some(lookup) = &self.lookup {
            lookup.abort();
        }
    }
}

impl CheckConn {
    /// Whether the backend's host name no longer resolves to the address
    /// this connection went to (a re-pointed name): the server behind the
    /// new address is another node, to be checked before any session goes
    /// there. Looks names up in the background, every [`RESOLVE_EVERY`]; a
    /// lookup that fails or hangs (a resolver outage) changes nothing.
    async fn moved(&mut self, backend: &BackendConfig) -> bool {
        if backend.host.parse::<IpAddr>().is_ok() {
            return false;
        }
        if let Some(lookup) = self.lookup.take_if(|l| l.is_finished()) {
            match lookup.await {
                Ok(Ok(addrs)) if !addrs.is_empty() && !addrs.contains(&self.addr) => {
                    tracing::warn!(
                        backend = %backend.name,
                        host = %backend.host,
                        from = %self.addr,
                        to = ?addrs,
                        "the backend's host name resolves elsewhere now: checking the new address as a new node; no session goes there before it answers"
                    );
                    return true;
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(backend = %backend.name, error = %e, "host name lookup failed; the checked address stays")
                }
                Err(_) => {}
            }
        }
        if self.lookup.is_none() && self.looked_up.elapsed() >= RESOLVE_EVERY {
            let target = (backend.host.clone(), backend.port);
            self.looked_up = Instant::now();
            self.lookup =
                Some(tokio::spawn(async move { Ok(tokio::net::lookup_host(target).await?.map(|a| a.ip()).collect()) }));
        }
        false
    }
}

/// How one attempt ended.
#[derive(Debug)]
pub enum Outcome {
    /// The server answered (or refused, or reset): an observation.
    Answer(Observation),
    /// Connecting timed out: silence.
    NoAnswer(String),
}

/// Runs one check on `conn` (logging in first if there is none) and returns
/// the connection to keep. `dropped`: the kept connection was just found
/// closed — if reconnecting fails with evidence, the backend is lost.
pub async fn attempt(
    mut conn: Option<CheckConn>,
    mut dropped: bool,
    health: HealthConfig,
    backend: BackendConfig,
    tls: MakeRustlsConnect,
) -> (Option<CheckConn>, Outcome) {
    if let Some(c) = &mut conn {
        if c.moved(&backend).await {
            // As a lost connection: a new address that refuses is down at once.
            conn = None;
            dropped = true;
        }
    }
    for _ in 0..2 {
        let client = match &conn {
            Some(c) => c.client.clone(),
            None => match connect(&health, &backend, &tls).await {
                Ok(c) => {
                    let client = c.client.clone();
                    conn = Some(c);
                    client
                }
                Err(failure) => return (None, failure.outcome(dropped)),
            },
        };
        let addr = conn.as_ref().map(|c| c.addr);
        match client.query_one(CHECK_QUERY, &[]).await {
            Ok(row) => return (conn, Outcome::Answer(observe(&row, addr))),
            // The connection broke under us: one fresh login, then judge.
            Err(_) if client.is_closed() => {
                conn = None;
                dropped = true;
            }
            Err(err) => return (conn, classify(&err, &health).outcome(false)),
        }
    }
    let reason = "check connection closed twice in a row".to_owned();
    (None, Outcome::Answer(Observation::Failed { class: FailureClass::Reset, reason, lost: true }))
}

impl Classified {
    /// The outcome; evidence right after a dropped connection means lost.
    fn outcome(self, dropped: bool) -> Outcome {
        match self {
            Classified::Full => Outcome::Answer(Observation::Full),
            Classified::Failure(FailureClass::Timeout, reason) => Outcome::NoAnswer(reason),
            Classified::Failure(class, reason) => {
                let lost = dropped && class.kind() == FailureKind::Evidence;
                let reason =
                    if lost { format!("check connection dropped and reconnecting failed: {reason}") } else { reason };
                Outcome::Answer(Observation::Failed { class, reason, lost })
            }
        }
    }
}

async fn connect(
    health: &HealthConfig,
    backend: &BackendConfig,
    tls: &MakeRustlsConnect,
) -> Result<CheckConn, Classified> {
    let addr = resolve(backend).await?;
    let mut pg = tokio_postgres::Config::new();
    pg.host(&backend.host)
        .hostaddr(addr)
        .port(backend.port)
        .user(&health.user)
        .dbname(&health.database)
        .application_name("pglb-health")
        // A connect that does not complete within one interval is retried
        // at the next one; a vanished host fails within down_after.
        .connect_timeout(health.interval)
        .tcp_user_timeout(health.down_after)
        .keepalives(true)
        .ssl_mode(match health.sslmode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require => tokio_postgres::config::SslMode::Require,
        });
    if let Some(source) = &health.password {
        // Read anew before each login: a rotated password needs no reload.
        let password = source.read().map_err(|e| Classified::Failure(FailureClass::Secret, e.to_string()))?;
        pg.password(password.expose());
    }
    let (client, connection) = pg.connect(tls.clone()).await.map_err(|e| classify(&e, health))?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(CheckConn { client: Arc::new(client), driver, addr, lookup: None, looked_up: Instant::now() })
}

/// The backend's address, resolved now (a name that stops resolving is a
/// monitoring failure, not a dead node).
async fn resolve(backend: &BackendConfig) -> Result<IpAddr, Classified> {
    if let Ok(ip) = backend.host.parse::<IpAddr>() {
        return Ok(ip);
    }
    let failed = |why: String| {
        Classified::Failure(
            FailureClass::Resolve,
            format!("cannot resolve `{}`: {why} (check DNS or /etc/hosts on the pglb host)", backend.host),
        )
    };
    let mut addrs =
        tokio::net::lookup_host((backend.host.as_str(), backend.port)).await.map_err(|e| failed(e.to_string()))?;
    addrs.next().map(|a| a.ip()).ok_or_else(|| failed("no address".into()))
}

fn observe(row: &Row, address: Option<IpAddr>) -> Observation {
    let text = |i: usize| row.try_get::<_, Option<String>>(i).ok().flatten();
    let number = |i: usize| text(i).and_then(|t| t.parse::<f64>().ok());
    let role = match text(0).as_deref() {
        Some("true") => ObservedRole::Replica,
        Some("false") => ObservedRole::Primary,
        other => {
            return Observation::Failed {
                class: FailureClass::ServerError,
                reason: format!("unexpected answer to pg_is_in_recovery(): {other:?}"),
                lost: false,
            };
        }
    };
    let timeline = text(1).and_then(|walfile| u32::from_str_radix(walfile.get(..8)?, 16).ok());
    let wal = Wal {
        current: number(3).map(|n| n as u64),
        flush: number(4).map(|n| n as u64),
        replay: number(5).map(|n| n as u64),
    };
    let receiver = text(6).map(|r| receiver(&r));
    let facts = Facts { timeline, system_id: text(2).and_then(|t| t.parse().ok()), wal, receiver, address };
    Observation::Up { role, facts }
}

/// `none`, `hidden:` or `<status>:<timeline>`.
fn receiver(text: &str) -> Receiver {
    match text.split_once(':') {
        Some(("streaming", tli)) => Receiver::Streaming { timeline: tli.parse().ok() },
        Some(("hidden", _)) => Receiver::Hidden,
        _ => Receiver::NotStreaming,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receiver_text() {
        assert_eq!(receiver("streaming:3"), Receiver::Streaming { timeline: Some(3) });
        assert_eq!(receiver("hidden:"), Receiver::Hidden);
        assert_eq!(receiver("none"), Receiver::NotStreaming);
        assert_eq!(receiver("waiting:1"), Receiver::NotStreaming);
    }
}
