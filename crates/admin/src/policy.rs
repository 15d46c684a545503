//! Who may do what on the admin endpoint (README, "Security"):
//!
//! - `/health`, `/metrics` and `/status`: anyone who reaches the port
//!   (keepalived, Prometheus, operators);
//! - `/connections` (client addresses): anyone on a loopback admin address
//!   (who could list the sockets anyway); elsewhere the token;
//! - every action that changes routing or the process (drain, disable,
//!   enable, unfence, upgrade): the bearer token, always. With no token
//!   configured they are refused (403), never allowed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use hyper::body::Incoming;
use hyper::header::AUTHORIZATION;
use hyper::Request;
use pglb_config::Secret;

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Nothing,
    /// Reads client addresses.
    Reader,
    /// Changes routing or the process.
    Mutation,
}

/// Why a request was refused (the `reason` label of
/// `pglb_admin_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// The request needs the token and none is configured: 403.
    NoTokenConfigured,
    /// A token is configured; the request's is missing or wrong: 401.
    BadToken,
    /// Too many admin connections: only `/health` is served (503).
    OverCapacity,
}

impl Denied {
    pub const ALL: [Denied; 3] = [Denied::NoTokenConfigured, Denied::BadToken, Denied::OverCapacity];

    pub fn as_str(self) -> &'static str {
        match self {
            Denied::NoTokenConfigured => "no_token_configured",
            Denied::BadToken => "bad_token",
            Denied::OverCapacity => "over_capacity",
        }
    }

    /// What the client is told.
    pub fn message(self) -> &'static str {
        match self {
            Denied::NoTokenConfigured => {
                "this pglb has no admin token, so actions over HTTP are refused: set admin.token_file (the package generates /etc/pglb/admin-token, which pglb uses when the config names none) and reload or restart pglb"
            }
            Denied::BadToken => "this endpoint needs `Authorization: Bearer <admin token>`",
            Denied::OverCapacity => "too many admin connections: only /health is served now",
        }
    }
}

/// Whether `req` may have what it asks for. `loopback`: the admin endpoint
/// listens on a loopback address only.
pub fn allowed(token: Option<&Secret>, loopback: bool, req: &Request<Incoming>, need: Need) -> Result<(), Denied> {
    match need {
        Need::Nothing => return Ok(()),
        Need::Reader if loopback => return Ok(()),
        Need::Reader | Need::Mutation => {}
    }
    let Some(token) = token else { return Err(Denied::NoTokenConfigured) };
    let given = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if constant_time_eq(given.trim().as_bytes(), token.expose().as_bytes()) => Ok(()),
        _ => Err(Denied::BadToken),
    }
}

/// Counts a refusal and logs it, at most once a second (a flood of refused
/// requests must not flood the log).
pub fn record(denied: Denied, path: &str) {
    metrics::counter!("pglb_admin_refused_total", "reason" => denied.as_str()).increment(1);
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    if LAST.swap(now, Ordering::Relaxed) != now {
        tracing::warn!(path, reason = denied.as_str(), "admin request refused: {}", denied.message());
    }
}

/// Registers the refusal counter at zero.
pub fn describe() {
    metrics::describe_counter!(
        "pglb_admin_refused_total",
        "Admin requests refused, per reason (no_token_configured, bad_token, over_capacity)."
    );
    for denied in Denied::ALL {
        metrics::counter!("pglb_admin_refused_total", "reason" => denied.as_str()).increment(0);
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
