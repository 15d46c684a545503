//! One health check over a persistent connection: (re)connect, log in, and
//! ask role, timeline, system identifier and WAL positions in one query, all
//! within `health.timeout`.

use pglb_config::{BackendConfig, HealthConfig, SslMode};
use pglb_routing::{Facts, Observation, ObservedRole, Wal};
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Row};
use tokio_postgres_rustls::MakeRustlsConnect;

/// Role, timeline (from a primary's current WAL file name — not
/// `pg_control_checkpoint()`, whose timeline stays old until the slow
/// post-promotion checkpoint), system identifier and WAL positions, as text.
const CHECK_QUERY: &str = "SELECT pg_is_in_recovery()::text,
  CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END,
  (SELECT system_identifier::text FROM pg_control_system()),
  CASE WHEN pg_is_in_recovery() THEN NULL ELSE (pg_current_wal_lsn() - '0/0')::text END,
  CASE WHEN pg_is_in_recovery() THEN NULL ELSE (pg_current_wal_flush_lsn() - '0/0')::text END,
  CASE WHEN pg_is_in_recovery() THEN (pg_last_wal_replay_lsn() - '0/0')::text END,
  CASE WHEN pg_is_in_recovery() THEN extract(epoch FROM now() - pg_last_xact_replay_timestamp())::text END";

/// A logged-in check connection, kept between checks.
pub struct CheckConn {
    pub client: Client,
    /// Ends when the server closes the connection.
    pub driver: JoinHandle<()>,
}

impl Drop for CheckConn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Runs one check, reusing `conn` or logging in anew; a connection that
/// fails mid-check is replaced once. Never outlives `health.timeout`.
pub async fn check(
    conn: &mut Option<CheckConn>,
    health: &HealthConfig,
    backend: &BackendConfig,
    tls: &MakeRustlsConnect,
) -> Observation {
    let attempt = async {
        for _ in 0..2 {
            if conn.is_none() {
                match connect(health, backend, tls).await {
                    Ok(c) => *conn = Some(c),
                    Err(obs) => return obs,
                }
            }
            let Some(c) = conn.as_ref() else { continue };
            match c.client.query_one(CHECK_QUERY, &[]).await {
                Ok(row) => return observe(&row),
                // The connection broke under us: one fresh login, then judge.
                Err(_) if c.client.is_closed() => *conn = None,
                Err(err) => {
                    *conn = None;
                    return classify(&err, health);
                }
            }
        }
        Observation::Down { reason: "check connection closed twice in a row".into() }
    };
    match tokio::time::timeout(health.timeout, attempt).await {
        Ok(obs) => obs,
        Err(_) => {
            *conn = None;
            Observation::Down {
                reason: format!(
                    "check timed out after {} (connect + login + query)",
                    pglb_config::format_duration(health.timeout)
                ),
            }
        }
    }
}

async fn connect(
    health: &HealthConfig,
    backend: &BackendConfig,
    tls: &MakeRustlsConnect,
) -> Result<CheckConn, Observation> {
    let mut pg = tokio_postgres::Config::new();
    pg.host(&backend.host)
        .port(backend.port)
        .user(&health.user)
        .dbname(&health.database)
        .application_name("pglb-health")
        .connect_timeout(health.timeout)
        .keepalives(true)
        .ssl_mode(match health.sslmode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require => tokio_postgres::config::SslMode::Require,
        });
    if let Some(password) = &health.password {
        pg.password(password.expose());
    }
    let (client, connection) = pg.connect(tls.clone()).await.map_err(|e| classify(&e, health))?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(CheckConn { client, driver })
}

fn observe(row: &Row) -> Observation {
    let text = |i: usize| row.try_get::<_, Option<String>>(i).ok().flatten();
    let number = |i: usize| text(i).and_then(|t| t.parse::<f64>().ok());
    let role = match text(0).as_deref() {
        Some("true") => ObservedRole::Replica,
        Some("false") => ObservedRole::Primary,
        other => {
            return Observation::Down { reason: format!("unexpected answer to pg_is_in_recovery(): {other:?}") };
        }
    };
    let timeline = text(1).and_then(|walfile| u32::from_str_radix(walfile.get(..8)?, 16).ok());
    let wal = Wal {
        current: number(3).map(|n| n as u64),
        flush: number(4).map(|n| n as u64),
        replay: number(5).map(|n| n as u64),
        replay_age: number(6),
    };
    let facts = Facts { timeline, system_id: text(2).and_then(|t| t.parse().ok()), wal };
    Observation::Up { role, facts }
}

/// Turns a connect or query error into an observation with an actionable reason.
fn classify(err: &tokio_postgres::Error, health: &HealthConfig) -> Observation {
    let Some(db) = err.as_db_error() else {
        let mut reason = err.to_string();
        let mut source = std::error::Error::source(err);
        while let Some(inner) = source {
            reason = format!("{reason}: {inner}");
            source = inner.source();
        }
        return Observation::Down { reason };
    };
    let code = db.code();
    if *code == SqlState::TOO_MANY_CONNECTIONS {
        return Observation::Full;
    }
    let hint = if *code == SqlState::INVALID_PASSWORD || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION {
        format!(
            " (check user `{}` and the password source in health.password_env / password_file, and pg_hba.conf)",
            health.user
        )
    } else if *code == SqlState::INSUFFICIENT_PRIVILEGE {
        format!(" (grant the check user what it needs: GRANT pg_monitor TO {})", health.user)
    } else {
        String::new()
    };
    Observation::Down { reason: format!("{}: {} [SQLSTATE {}]{hint}", db.severity(), db.message(), code.code()) }
}
