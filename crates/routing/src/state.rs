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

/// The outcome of one health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// Logged in and answered.
    Up { role: ObservedRole },
    /// Refused the login with 53300: alive but full. Counts as a success and
    /// keeps the last known role.
    Full,
    /// Anything else: refused, wrong password, timed out, unreachable.
    Down { reason: String },
}

/// A change worth one log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// Health flipped; `reason` is the last failure when going down.
    Health { up: bool, reason: Option<String> },
    Role {
        from: ObservedRole,
        to: ObservedRole,
    },
}

/// Health and role of one backend, as the checks have seen it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendState {
    pub healthy: bool,
    pub role: ObservedRole,
    /// False until the first check completes; the first check decides health
    /// at once, later ones go through rise/fall.
    pub checked: bool,
    pub successes: u32,
    pub failures: u32,
    pub last_error: Option<String>,
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
        }
    }
}

impl BackendState {
    /// Applies one observation and returns the transitions it caused.
    pub fn observe(&mut self, obs: Observation, rise: u32, fall: u32) -> Vec<Transition> {
        let first = !self.checked;
        self.checked = true;
        let mut out = Vec::new();
        match obs {
            Observation::Up { role } => {
                self.success(first, rise, &mut out);
                if role != self.role {
                    out.push(Transition::Role {
                        from: self.role,
                        to: role,
                    });
                    self.role = role;
                }
            }
            Observation::Full => self.success(first, rise, &mut out),
            Observation::Down { reason } => {
                self.successes = 0;
                self.failures = self.failures.saturating_add(1);
                self.last_error = Some(reason.clone());
                if (self.healthy && self.failures >= fall) || first {
                    self.healthy = false;
                    out.push(Transition::Health {
                        up: false,
                        reason: Some(reason),
                    });
                }
            }
        }
        out
    }

    fn success(&mut self, first: bool, rise: u32, out: &mut Vec<Transition>) {
        self.failures = 0;
        self.successes = self.successes.saturating_add(1);
        if !self.healthy && (first || self.successes >= rise) {
            self.healthy = true;
            self.last_error = None;
            out.push(Transition::Health {
                up: true,
                reason: None,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(role: ObservedRole) -> Observation {
        Observation::Up { role }
    }
    fn down() -> Observation {
        Observation::Down {
            reason: "refused".into(),
        }
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
        assert_eq!(
            s.observe(down(), 2, 2),
            vec![Transition::Health {
                up: false,
                reason: Some("refused".into())
            }]
        );
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
        assert_eq!(
            t,
            vec![Transition::Role {
                from: ObservedRole::Replica,
                to: ObservedRole::Primary
            }]
        );
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
