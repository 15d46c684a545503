//! What a failed check proves: a check error becomes a [`FailureClass`]
//! (evidence, silence or a monitoring failure) and a reason a person can
//! act on.

use std::io;

use pglb_config::HealthConfig;
use pglb_routing::FailureClass;
use tokio_postgres::error::{DbError, SqlState};

/// A classified check error.
#[derive(Debug)]
pub enum Classified {
    /// SQLSTATE 53300: alive but full.
    Full,
    Failure(FailureClass, String),
}

/// Classifies a connect or query error.
pub fn classify(err: &tokio_postgres::Error, health: &HealthConfig) -> Classified {
    if let Some(db) = err.as_db_error() {
        return by_sqlstate(db, health);
    }
    let reason = chain(err);
    Classified::Failure(by_cause(err, &reason), reason)
}

fn by_sqlstate(db: &DbError, health: &HealthConfig) -> Classified {
    let code = db.code();
    if *code == SqlState::TOO_MANY_CONNECTIONS {
        return Classified::Full;
    }
    let sqlstate = code.code();
    let user = &health.user;
    let (class, hint) = match sqlstate {
        s if s.starts_with("57P") => (FailureClass::Shutdown, String::new()),
        s if s.starts_with("08") => (FailureClass::Connection, String::new()),
        s if s.starts_with("28") => (
            FailureClass::Auth,
            format!(" (check user `{user}`: fix its password in health.password_env / password_file — it is read again before each login — or pg_hba.conf)"),
        ),
        "42501" => (FailureClass::Privilege, format!(" (grant the check user what it needs: GRANT pg_monitor TO {user})")),
        s if s.starts_with("42") => (FailureClass::Query, " (the check query failed: is this PostgreSQL 12 or newer?)".into()),
        "3D000" => (FailureClass::Database, format!(" (set health.database to a database that exists, e.g. postgres; now `{}`)", health.database)),
        _ => (FailureClass::ServerError, String::new()),
    };
    Classified::Failure(class, format!("{}: {} [SQLSTATE {sqlstate}]{hint}", db.severity(), db.message()))
}

/// The error and its causes, as one line.
fn chain(err: &tokio_postgres::Error) -> String {
    let mut reason = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(inner) = source {
        reason = format!("{reason}: {inner}");
        source = inner.source();
    }
    reason
}

fn by_cause(err: &tokio_postgres::Error, reason: &str) -> FailureClass {
    let mut source = std::error::Error::source(err);
    while let Some(inner) = source {
        if inner.downcast_ref::<rustls::Error>().is_some() {
            return FailureClass::Tls;
        }
        if let Some(io) = inner.downcast_ref::<io::Error>() {
            if io.get_ref().is_some_and(|e| e.downcast_ref::<rustls::Error>().is_some()) {
                return FailureClass::Tls;
            }
            return by_io(io);
        }
        source = inner.source();
    }
    if err.is_closed() {
        FailureClass::Reset
    } else if reason.contains("TLS") {
        FailureClass::Tls
    } else if reason.starts_with("authentication error") {
        FailureClass::Auth
    } else {
        FailureClass::ServerError
    }
}

fn by_io(err: &io::Error) -> FailureClass {
    match err.raw_os_error() {
        Some(libc::EHOSTUNREACH) => return FailureClass::Unreachable,
        Some(libc::ENETUNREACH | libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS | libc::EADDRNOTAVAIL) => {
            return FailureClass::Local
        }
        _ => {}
    }
    match err.kind() {
        io::ErrorKind::ConnectionRefused => FailureClass::Refused,
        io::ErrorKind::TimedOut => FailureClass::Timeout,
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof => FailureClass::Reset,
        _ => FailureClass::ServerError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_by_kind() {
        let e = |k| by_io(&io::Error::from(k));
        assert_eq!(e(io::ErrorKind::ConnectionRefused), FailureClass::Refused);
        assert_eq!(e(io::ErrorKind::ConnectionReset), FailureClass::Reset);
        assert_eq!(e(io::ErrorKind::TimedOut), FailureClass::Timeout);
        assert_eq!(by_io(&io::Error::from_raw_os_error(libc::EMFILE)), FailureClass::Local);
        assert_eq!(by_io(&io::Error::from_raw_os_error(libc::EHOSTUNREACH)), FailureClass::Unreachable);
    }
}
