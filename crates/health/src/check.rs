//! One health check: connect, log in, ask the role, all within `timeout`.

use pglb_config::{BackendConfig, HealthConfig, SslMode};
use pglb_routing::{Observation, ObservedRole};
use tokio_postgres::error::SqlState;
use tokio_postgres_rustls::MakeRustlsConnect;

const ROLE_QUERY: &str = "SELECT pg_is_in_recovery()";

/// Runs one check of `backend` and says what it saw. Never panics, never
/// outlives `health.timeout` (a SIGSTOPped server fails at the timeout).
pub async fn check_once(
    health: &HealthConfig,
    backend: &BackendConfig,
    tls: &MakeRustlsConnect,
) -> Observation {
    match tokio::time::timeout(health.timeout, login_and_ask(health, backend, tls)).await {
        Ok(obs) => obs,
        Err(_) => Observation::Down {
            reason: format!(
                "check timed out after {} (connect + login + query)",
                pglb_config::format_duration(health.timeout)
            ),
        },
    }
}

async fn login_and_ask(
    health: &HealthConfig,
    backend: &BackendConfig,
    tls: &MakeRustlsConnect,
) -> Observation {
    let mut pg = tokio_postgres::Config::new();
    pg.host(&backend.host)
        .port(backend.port)
        .user(&health.user)
        .dbname(&health.database)
        .application_name("pglb-health")
        .connect_timeout(health.timeout)
        .ssl_mode(match health.sslmode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require => tokio_postgres::config::SslMode::Require,
        });
    if let Some(password) = &health.password {
        pg.password(password.expose());
    }
    let (client, connection) = match pg.connect(tls.clone()).await {
        Ok(pair) => pair,
        Err(err) => return classify(&err, health),
    };
    let driver = tokio::spawn(connection);
    let result = client.query_one(ROLE_QUERY, &[]).await;
    drop(client);
    // The connection future ends once the client is dropped (Terminate sent).
    let _ = driver.await;
    match result {
        Ok(row) => match row.try_get::<_, bool>(0) {
            Ok(true) => Observation::Up {
                role: ObservedRole::Replica,
            },
            Ok(false) => Observation::Up {
                role: ObservedRole::Primary,
            },
            Err(err) => Observation::Down {
                reason: format!("unexpected answer to `{ROLE_QUERY}`: {err}"),
            },
        },
        Err(err) => classify(&err, health),
    }
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
    let hint = if *code == SqlState::INVALID_PASSWORD
        || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
    {
        format!(
            " (check user `{}` and the password source in health.password_env / password_file, and pg_hba.conf)",
            health.user
        )
    } else {
        String::new()
    };
    Observation::Down {
        reason: format!(
            "{}: {} [SQLSTATE {}]{hint}",
            db.severity(),
            db.message(),
            code.code()
        ),
    }
}
