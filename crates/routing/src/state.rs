//! The per-backend state machine: rise/fall hysteresis for health, and role
//! changes that take effect on the first observation.

use std::fmt;

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

/// WAL positions from one check, in bytes since 0/0.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Wal {
    /// Primary: `pg_current_wal_lsn()`.
    pub current: Option<u64>,
    /// Primary: `pg_current_wal_flush_lsn()`.
    pub flush: Option<u64>,
    /// Replica: `pg_last_wal_replay_lsn()`.
    pub replay: Option<u64>,
    /// Replica: `now() - pg_last_xact_replay_timestamp()`, in seconds.
    pub replay_age: Option<f64>,
}

/// What one check learnt besides the role.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Facts {
    /// A primary's timeline, from its current WAL file name.
    pub timeline: Option<u32>,
    /// `pg_control_system().system_identifier`.
    pub system_id: Option<u64>,
    pub wal: Wal,
}

/// The outcome of one health check.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// Logged in and answered.
    Up { role: ObservedRole, facts: Facts },
    /// Refused the login with 53300: alive but full. Counts as a success and
    /// keeps the last known role.
    Full,
    /// Anything else: refused, wrong password, timed out, unreachable.
    Down { reason: String },
    /// The persistent check connection dropped and an immediate reconnect
    /// failed: the server is gone. Marks the backend down at once.
    Lost { reason: String },
}

/// A change worth one log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// Health flipped; `reason` is the last failure when going down.
    Health {
        up: bool,
        reason: Option<String>,
    },
    Role {
        from: ObservedRole,
        to: ObservedRole,
    },
}

/// Health and role of one backend, as the checks have seen it.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendState {
    pub healthy: bool,
    pub role: ObservedRole,
    /// False until the first check completes; the first check decides health
    /// at once, later ones go through rise/fall.
    pub checked: bool,
    pub successes: u32,
    pub failures: u32,
    pub last_error: Option<String>,
    /// Facts of the last successful check.
    pub facts: Facts,
    /// A primary's flush position one sample before `facts` (for lag seconds).
    pub previous_flush: Option<u64>,
}

impl Default for BackendState {
    fn default() -> Self {
        Self {
            healthy: false,
            role: ObservedRole::Unknown,
            checked: false,
            successes: 0,
            failures: 0,
            last_error: None,
            facts: Facts::default(),
            previous_flush: None,
        }
    }
}

impl BackendState {
    /// Applies one observation and returns the transitions it caused.
    /// Health follows rise/fall (the first check decides at once, a lost
    /// connection marks down at once); a role change takes effect at once.
    pub fn observe(&mut self, obs: Observation, rise: u32, fall: u32) -> Vec<Transition> {
        let first = !self.checked;
        self.checked = true;
        let mut out = Vec::new();
        match obs {
            Observation::Up { role, facts } => {
                self.previous_flush = self.facts.wal.flush;
                self.facts = facts;
                self.success(first, rise, &mut out);
                if role != self.role {
                    out.push(Transition::Role { from: self.role, to: role });
                    self.role = role;
                }
            }
            Observation::Full => self.success(first, rise, &mut out),
            Observation::Down { reason } => {
                let fell = self.failures.saturating_add(1) >= fall;
                self.failure(reason, first || fell, first, &mut out);
            }
            Observation::Lost { reason } => self.failure(reason, true, first, &mut out),
        }
        out
    }

    fn failure(&mut self, reason: String, mark_down: bool, first: bool, out: &mut Vec<Transition>) {
        self.successes = 0;
        self.failures = self.failures.saturating_add(1);
        self.last_error = Some(reason.clone());
        // A first check that fails reports the initial down state once.
        if mark_down && (self.healthy || first) {
            self.healthy = false;
            out.push(Transition::Health { up: false, reason: Some(reason) });
        }
    }

    fn success(&mut self, first: bool, rise: u32, out: &mut Vec<Transition>) {
        self.failures = 0;
        self.successes = self.successes.saturating_add(1);
        if !self.healthy && (first || self.successes >= rise) {
            self.healthy = true;
            self.last_error = None;
            out.push(Transition::Health { up: true, reason: None });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(role: ObservedRole) -> Observation {
        Observation::Up { role, facts: Facts::default() }
    }
    fn down() -> Observation {
        Observation::Down { reason: "refused".into() }
    }

    #[test]
    fn first_check_decides_at_once() {
        let mut s = BackendState::default();
        let t = s.observe(up(ObservedRole::Primary), 3, 3);
        assert!(s.healthy);
        assert_eq!(t.len(), 2, "{t:?}");
        let mut s = BackendState::default();
        s.observe(down(), 3, 3);
        assert!(!s.healthy && s.checked);
    }

    #[test]
    fn fall_and_rise_need_consecutive_results() {
        let mut s = BackendState::default();
        s.observe(up(ObservedRole::Replica), 2, 2);
        assert!(s.observe(down(), 2, 2).is_empty());
        assert!(s.observe(up(ObservedRole::Replica), 2, 2).is_empty());
        assert!(s.observe(down(), 2, 2).is_empty());
        assert_eq!(s.observe(down(), 2, 2), vec![Transition::Health { up: false, reason: Some("refused".into()) }]);
        assert!(s.observe(up(ObservedRole::Replica), 2, 2).is_empty());
        assert!(!s.healthy);
        assert_eq!(s.observe(up(ObservedRole::Replica), 2, 2).len(), 1);
        assert!(s.healthy);
    }

    #[test]
    fn role_change_is_immediate() {
        let mut s = BackendState::default();
        s.observe(up(ObservedRole::Replica), 2, 2);
        let t = s.observe(up(ObservedRole::Primary), 2, 2);
        assert_eq!(t, vec![Transition::Role { from: ObservedRole::Replica, to: ObservedRole::Primary }]);
        assert_eq!(s.role, ObservedRole::Primary);
    }

    #[test]
    fn full_server_keeps_role_and_health() {
        let mut s = BackendState::default();
        s.observe(up(ObservedRole::Primary), 2, 2);
        for _ in 0..5 {
            assert!(s.observe(Observation::Full, 2, 2).is_empty());
        }
        assert!(s.healthy);
        assert_eq!(s.role, ObservedRole::Primary);
    }
}

#[cfg(test)]
mod lost_tests {
    use super::*;

    #[test]
    fn lost_connection_marks_down_at_once() {
        let mut s = BackendState::default();
        s.observe(Observation::Up { role: ObservedRole::Primary, facts: Facts::default() }, 2, 3);
        let t = s.observe(Observation::Lost { reason: "gone".into() }, 2, 3);
        assert!(!s.healthy);
        assert_eq!(t, vec![Transition::Health { up: false, reason: Some("gone".into()) }]);
    }
}
