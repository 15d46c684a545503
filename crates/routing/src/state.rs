//! The per-backend state machine. pglb acts on evidence and is patient with
//! silence:
//!
//! - **evidence** (refused, reset, shutting down, a broken server) takes a
//!   backend out after `fall` checks, or at once when the watched check
//!   connection dropped and the reconnect failed;
//! - **silence** (no answer in time) makes it `degraded` after `fall` checks —
//!   avoided while its listeners have a healthy candidate, its sessions kept —
//!   and `down` only after `down_after` of continuous silence;
//! - a **monitoring failure** (the check's own login, privilege, database,
//!   TLS, name or local resources) makes it `unverified`: it keeps its last
//!   known health, role and sessions. A backend that never answered stays out.
//!
//! Role changes take effect on the first observation.

use std::fmt;
use std::time::Duration;

/// What a check saw the backend to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObservedRole {
    Primary,
    Replica,
    Unknown,
}

impl ObservedRole {
    pub const ALL: [ObservedRole; 3] = [Self::Primary, Self::Replica, Self::Unknown];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Replica => "replica",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ObservedRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A backend's state as an operator sees it: `/status`, metrics, logs and
/// alerts all print it the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Health {
    /// Answers its checks.
    Healthy,
    /// Silent for `fall` checks: not chosen while a healthy candidate exists,
    /// sessions kept; down after `down_after` of continuous silence.
    Degraded,
    /// The checks fail for a monitoring reason (login, privilege, TLS...):
    /// last known health and role kept, but a promotion cannot be followed.
    Unverified,
    /// Out of service: evidence of failure, long silence, or never answered.
    Down,
}

impl Health {
    pub const ALL: [Health; 4] = [Self::Healthy, Self::Degraded, Self::Unverified, Self::Down];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Degraded => "degraded",
            Self::Unverified => "unverified",
            Self::Down => "down",
        }
    }
}

/// What a failed check proves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The node is failing: act on it.
    Evidence,
    /// No answer: be patient, but not forever.
    Silence,
    /// The monitoring itself fails; the node may be fine.
    Monitoring,
}

/// Why a check failed: a closed set of metric label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureClass {
    /// Connection refused: nothing listens.
    Refused,
    /// The connection was reset or closed by the server without a reason.
    Reset,
    /// The host is unreachable (EHOSTUNREACH).
    Unreachable,
    /// SQLSTATE 57P0x: shutting down, crashed, starting up.
    Shutdown,
    /// SQLSTATE class 08: connection exception.
    Connection,
    /// Any other server error, or an answer that makes no sense.
    ServerError,
    /// No answer within `health.timeout`.
    Timeout,
    /// SQLSTATE class 28: the check user's login was refused.
    Auth,
    /// SQLSTATE 42501: the check user lacks a privilege.
    Privilege,
    /// SQLSTATE 3D000: the check database does not exist.
    Database,
    /// Any other SQLSTATE of class 42: the check query itself failed.
    Query,
    /// TLS could not be set up or the certificate was not accepted.
    Tls,
    /// The backend's host name does not resolve.
    Resolve,
    /// The check password could not be read (`password_env`, `password_file`).
    Secret,
    /// A local error: out of file descriptors or memory, no route.
    Local,
}

impl FailureClass {
    pub const ALL: [FailureClass; 15] = [
        Self::Refused,
        Self::Reset,
        Self::Unreachable,
        Self::Shutdown,
        Self::Connection,
        Self::ServerError,
        Self::Timeout,
        Self::Auth,
        Self::Privilege,
        Self::Database,
        Self::Query,
        Self::Tls,
        Self::Resolve,
        Self::Secret,
        Self::Local,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::Reset => "reset",
            Self::Unreachable => "unreachable",
            Self::Shutdown => "shutdown",
            Self::Connection => "connection",
            Self::ServerError => "server_error",
            Self::Timeout => "timeout",
            Self::Auth => "auth",
            Self::Privilege => "privilege",
            Self::Database => "database",
            Self::Query => "query",
            Self::Tls => "tls",
            Self::Resolve => "resolve",
            Self::Secret => "secret",
            Self::Local => "local",
        }
    }

    pub fn kind(self) -> FailureKind {
        match self {
            Self::Refused | Self::Reset | Self::Unreachable | Self::Shutdown | Self::Connection | Self::ServerError => {
                FailureKind::Evidence
            }
            Self::Timeout => FailureKind::Silence,
            Self::Auth
            | Self::Privilege
            | Self::Database
            | Self::Query
            | Self::Tls
            | Self::Resolve
            | Self::Secret
            | Self::Local => FailureKind::Monitoring,
        }
    }
}

/// WAL positions from one check, in bytes since 0/0.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Wal {
    /// Primary: `pg_current_wal_lsn()`.
    pub current: Option<u64>,
    /// Primary: `pg_current_wal_flush_lsn()`.
    pub flush: Option<u64>,
    /// Replica: `pg_last_wal_replay_lsn()`.
    pub replay: Option<u64>,
}

/// A replica's WAL receiver, from `pg_stat_wal_receiver`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receiver {
    /// Streaming; the timeline of the last WAL received.
    Streaming { timeline: Option<u32> },
    /// No WAL receiver is streaming (the upstream is gone, or archive only).
    NotStreaming,
    /// The check user may not see it (it lacks `pg_monitor`).
    Hidden,
}

/// What one check learnt besides the role.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Facts {
    /// A primary's timeline, from its current WAL file name.
    pub timeline: Option<u32>,
    /// `pg_control_system().system_identifier`.
    pub system_id: Option<u64>,
    pub wal: Wal,
    /// Replicas only.
    pub receiver: Option<Receiver>,
    /// The address the check that learnt these facts was connected to:
    /// where sessions go (the data path does no name lookups), so that a
    /// client reaches the server the check looked at.
    pub address: Option<std::net::IpAddr>,
}

/// A failed check: its class (a label) and the reason (for people).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckError {
    pub class: FailureClass,
    pub reason: String,
}

/// The outcome of one health check.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// Logged in and answered.
    Up { role: ObservedRole, facts: Facts },
    /// Refused the login with 53300: alive but full. Counts as a success and
    /// keeps the last known role.
    Full,
    /// Evidence or a monitoring failure (by `class`). `lost`: the watched
    /// check connection dropped and an immediate reconnect failed with
    /// evidence — down at once, not after `fall`.
    Failed { class: FailureClass, reason: String, lost: bool },
    /// No answer within the timeout; nothing has been heard from the server
    /// for `silent_for`.
    Silent { reason: String, silent_for: Duration },
}

impl Observation {
    /// The failure class, if this is a failure.
    pub fn failure(&self) -> Option<FailureClass> {
        match self {
            Self::Failed { class, .. } => Some(*class),
            Self::Silent { .. } => Some(FailureClass::Timeout),
            Self::Up { .. } | Self::Full => None,
        }
    }
}

/// A change worth one log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// The operator-visible state changed; `error` is the failure behind it.
    Health {
        from: Health,
        to: Health,
        error: Option<CheckError>,
    },
    Role {
        from: ObservedRole,
        to: ObservedRole,
    },
}

/// The check settings the state machine needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub rise: u32,
    pub fall: u32,
    pub down_after: Duration,
}

/// Health and role of one backend, as the checks have seen it.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendState {
    /// In service: healthy, degraded or unverified (not down).
    pub up: bool,
    /// Silent for `fall` checks (meaningful while `up`).
    pub degraded: bool,
    /// The last check failed for a monitoring reason.
    pub unverified: bool,
    /// Last known role; kept while down, degraded or unverified.
    pub role: ObservedRole,
    /// False until the first check completes; the first check decides at
    /// once, later ones go through rise/fall.
    pub checked: bool,
    pub successes: u32,
    pub failures: u32,
    pub last_error: Option<CheckError>,
    /// Facts of the last successful check.
    pub facts: Facts,
}

impl Default for BackendState {
    fn default() -> Self {
        Self {
            up: false,
            degraded: false,
            unverified: false,
            role: ObservedRole::Unknown,
            checked: false,
            successes: 0,
            failures: 0,
            last_error: None,
            facts: Facts::default(),
        }
    }
}

impl BackendState {
    /// The state an operator sees.
    pub fn health(&self) -> Health {
        if !self.up {
            Health::Down
        } else if self.unverified {
            Health::Unverified
        } else if self.degraded {
            Health::Degraded
        } else {
            Health::Healthy
        }
    }

    /// Applies one observation and returns the transitions it caused.
    pub fn observe(&mut self, obs: Observation, t: Thresholds) -> Vec<Transition> {
        let before = self.health();
        let first = !self.checked;
        self.checked = true;
        let mut out = Vec::new();
        match obs {
            Observation::Up { role, facts } => {
                self.facts = facts;
                self.success(first, t.rise);
                if role != self.role {
                    out.push(Transition::Role { from: self.role, to: role });
                    self.role = role;
                }
            }
            // 53300 proves the server runs, not its role: it keeps an up
            // backend up, and never brings a down (or never seen) one up
            // (a restarted old primary that is full is no primary until it
            // answers a check).
            Observation::Full if self.up => self.success(false, t.rise),
            Observation::Full => {
                self.successes = 0;
                self.last_error = Some(CheckError {
                    class: FailureClass::ServerError,
                    reason: "too many connections (53300): the server runs, but its role cannot be checked; reserve connections for the check user (reserved_connections, PostgreSQL 16+, or a superuser check role)".into(),
                });
            }
            Observation::Failed { class, reason, lost } => {
                self.last_error = Some(CheckError { class, reason });
                match class.kind() {
                    FailureKind::Monitoring => {
                        // The server answered, or could not be asked: either
                        // way this says nothing about the node itself.
                        self.unverified = true;
                    }
                    FailureKind::Evidence | FailureKind::Silence => {
                        self.unverified = false;
                        self.successes = 0;
                        self.failures = self.failures.saturating_add(1);
                        if lost || self.failures >= t.fall {
                            self.take_out();
                        }
                    }
                }
                if first {
                    self.take_out();
                }
            }
            Observation::Silent { reason, silent_for } => {
                self.last_error = Some(CheckError { class: FailureClass::Timeout, reason });
                self.unverified = false;
                self.successes = 0;
                self.failures = self.failures.saturating_add(1);
                if first || silent_for >= t.down_after {
                    self.take_out();
                } else if self.up && self.failures >= t.fall {
                    self.degraded = true;
                }
            }
        }
        let after = self.health();
        if before != after || first {
            let error = if after == Health::Healthy { None } else { self.last_error.clone() };
            out.insert(0, Transition::Health { from: before, to: after, error });
        }
        out
    }

    fn take_out(&mut self) {
        self.up = false;
        self.degraded = false;
    }

    fn success(&mut self, first: bool, rise: u32) {
        self.failures = 0;
        self.successes = self.successes.saturating_add(1);
        self.unverified = false;
        let risen = first || self.successes >= rise;
        if !self.up && risen {
            self.up = true;
            self.degraded = false;
        } else if self.up && self.degraded && risen {
            self.degraded = false;
        }
        if self.up && !self.degraded {
            self.last_error = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds { rise: 2, fall: 2, down_after: Duration::from_secs(30) };

    fn up(role: ObservedRole) -> Observation {
        Observation::Up { role, facts: Facts::default() }
    }
    fn failed(class: FailureClass) -> Observation {
        Observation::Failed { class, reason: class.as_str().into(), lost: false }
    }
    fn silent(secs: u64) -> Observation {
        Observation::Silent { reason: "timed out".into(), silent_for: Duration::from_secs(secs) }
    }
    fn to(t: &[Transition]) -> Vec<Health> {
        t.iter()
            .filter_map(|t| match t {
                Transition::Health { to, .. } => Some(*to),
                Transition::Role { .. } => None,
            })
            .collect()
    }

    #[test]
    fn first_check_decides_at_once() {
        let mut s = BackendState::default();
        let t = s.observe(up(ObservedRole::Primary), Thresholds { rise: 3, fall: 3, ..T });
        assert_eq!(s.health(), Health::Healthy);
        assert_eq!(t.len(), 2, "{t:?}");
        for first in [failed(FailureClass::Refused), failed(FailureClass::Auth), silent(0)] {
            let mut s = BackendState::default();
            assert_eq!(to(&s.observe(first.clone(), T)), [Health::Down], "{first:?}");
            assert!(s.checked, "a backend that never answered stays out");
        }
    }

    #[test]
    fn evidence_needs_fall_consecutive_failures() {
        let mut s = BackendState::default();
        s.observe(up(ObservedRole::Replica), T);
        assert!(s.observe(failed(FailureClass::Refused), T).is_empty());
        assert!(s.observe(up(ObservedRole::Replica), T).is_empty());
        assert!(s.observe(failed(FailureClass::Refused), T).is_empty());
        assert_eq!(to(&s.observe(failed(FailureClass::Shutdown), T)), [Health::Down]);
        assert!(s.observe(up(ObservedRole::Replica), T).is_empty());
        assert_eq!(to(&s.observe(up(ObservedRole::Replica), T)), [Health::Healthy]);
    }

    #[test]
    fn lost_connection_marks_down_at_once() {
        let mut s = BackendState::default();
        s.observe(up(ObservedRole::Primary), Thresholds { fall: 3, ..T });
        let lost = Observation::Failed { class: FailureClass::Refused, reason: "gone".into(), lost: true };
        let t = s.observe(lost, Thresholds { fall: 3, ..T });
        assert_eq!(
            t,
            vec![Transition::Health {
                from: Health::Healthy,
                to: Health::Down,
                error: Some(CheckError { class: FailureClass::Refused, reason: "gone".into() })
            }]
        );
    }

    #[test]
    fn silence_degrades_then_goes_down_after_down_after() {
        let mut s = BackendState::default();
        s.observe(up(ObservedRole::Primary), T);
        assert!(s.observe(silent(1), T).is_empty());
        assert_eq!(to(&s.observe(silent(2), T)), [Health::Degraded]);
        assert!(s.up && s.degraded);
        assert!(s.observe(silent(20), T).is_empty());
        assert_eq!(to(&s.observe(silent(30), T)), [Health::Down]);
    }

    #[test]
    fn degraded_needs_rise_answers_to_be_healthy_again() {
        let mut s = BackendState::default();
        s.observe(up(ObservedRole::Primary), T);
        s.observe(silent(1), T);
        s.observe(silent(2), T);
        assert!(s.observe(up(ObservedRole::Primary), T).is_empty());
        assert_eq!(s.health(), Health::Degraded);
        assert_eq!(to(&s.observe(up(ObservedRole::Primary), T)), [Health::Healthy]);
        assert_eq!(s.last_error, None);
    }

    #[test]
    fn evidence_after_silence_takes_it_out() {
        let mut s = BackendState::default();
        s.observe(up(ObservedRole::Primary), T);
        s.observe(silent(1), T);
        assert_eq!(to(&s.observe(failed(FailureClass::Refused), T)), [Health::Down]);
    }

    #[test]
    fn monitoring_failure_keeps_health_and_role_and_clears_on_success() {
        let mut s = BackendState::default();
        s.observe(up(ObservedRole::Primary), T);
        for _ in 0..10 {
            s.observe(failed(FailureClass::Auth), T);
        }
        assert!(s.up && !s.degraded);
        assert_eq!(s.health(), Health::Unverified);
        assert_eq!(s.role, ObservedRole::Primary);
        assert_eq!(s.last_error.as_ref().map(|e| e.class), Some(FailureClass::Auth));
        assert_eq!(to(&s.observe(up(ObservedRole::Primary), T)), [Health::Healthy]);
    }

    #[test]
    fn monitoring_failure_does_not_bring_a_down_backend_back() {
        let mut s = BackendState::default();
        s.observe(up(ObservedRole::Replica), T);
        s.observe(Observation::Failed { class: FailureClass::Refused, reason: "x".into(), lost: true }, T);
        s.observe(failed(FailureClass::Auth), T);
        assert_eq!(s.health(), Health::Down);
    }

    #[test]
    fn role_change_is_immediate() {
        let mut s = BackendState::default();
        s.observe(up(ObservedRole::Replica), T);
        let t = s.observe(up(ObservedRole::Primary), T);
        assert_eq!(t, vec![Transition::Role { from: ObservedRole::Replica, to: ObservedRole::Primary }]);
        assert_eq!(s.role, ObservedRole::Primary);
    }

    #[test]
    fn full_server_keeps_role_and_health() {
        let mut s = BackendState::default();
        s.observe(up(ObservedRole::Primary), T);
        for _ in 0..5 {
            assert!(s.observe(Observation::Full, T).is_empty());
        }
        assert_eq!(s.health(), Health::Healthy);
        assert_eq!(s.role, ObservedRole::Primary);
    }

    #[test]
    fn a_full_server_never_comes_up_on_53300_alone() {
        // Never seen: a full server stays out.
        let mut s = BackendState::default();
        s.observe(Observation::Full, T);
        assert_eq!((s.health(), s.role), (Health::Down, ObservedRole::Unknown));
        // Down (an old primary, crashed and restarted full): stays down,
        // however many checks it answers with 53300.
        let mut s = BackendState::default();
        s.observe(up(ObservedRole::Primary), T);
        s.observe(failed(FailureClass::Refused), T);
        s.observe(failed(FailureClass::Refused), T);
        assert_eq!(s.health(), Health::Down);
        for _ in 0..5 {
            s.observe(Observation::Full, T);
        }
        assert_eq!(s.health(), Health::Down);
        assert!(s.last_error.as_ref().is_some_and(|e| e.reason.contains("53300")));
        // Its first real answer still counts toward `rise`.
        s.observe(up(ObservedRole::Replica), T);
        s.observe(up(ObservedRole::Replica), T);
        assert_eq!((s.health(), s.role), (Health::Healthy, ObservedRole::Replica));
    }

    #[test]
    fn every_class_has_a_distinct_label() {
        let mut labels: Vec<&str> = FailureClass::ALL.iter().map(|c| c.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), FailureClass::ALL.len());
    }
}
