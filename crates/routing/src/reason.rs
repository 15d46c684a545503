//! Why pglb ends a forwarded session: a closed set of label values, shared
//! by the table's verdicts, the session registry, the connection log and
//! `pglb_sessions_closed_total`.

/// Why pglb closed a session itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The backend is down (evidence, or silent for `down_after`).
    BackendDown,
    /// The backend is fenced (old timeline, another cluster).
    Fenced,
    /// An operator disabled the backend.
    Disabled,
    /// More than one primary on the highest timeline.
    SplitBrain,
    /// The backend no longer has the listener's role.
    RoleChanged,
    /// A replica over the listener's lag limit (`on_lag: close`).
    Lagging,
    /// A reload removed the backend.
    Removed,
    /// Patroni's confirmed leader is another node: this one must take no
    /// writes, whatever it says.
    NotLeader,
    /// A reload removed the listener.
    ListenerRemoved,
    /// Sessions still open when `shutdown_timeout` ran out.
    ShutdownTimeout,
}

impl CloseReason {
    pub const ALL: [CloseReason; 10] = [
        Self::BackendDown,
        Self::Fenced,
        Self::Disabled,
        Self::SplitBrain,
        Self::RoleChanged,
        Self::Lagging,
        Self::Removed,
        Self::NotLeader,
        Self::ListenerRemoved,
        Self::ShutdownTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::BackendDown => "backend_down",
            Self::Fenced => "fenced",
            Self::Disabled => "disabled",
            Self::SplitBrain => "split_brain",
            Self::RoleChanged => "role_changed",
            Self::Lagging => "lagging",
            Self::Removed => "removed",
            Self::NotLeader => "not_leader",
            Self::ListenerRemoved => "listener_removed",
            Self::ShutdownTimeout => "shutdown_timeout",
        }
    }

    /// Its position in [`CloseReason::ALL`] (for arrays of metric handles).
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::CloseReason;

    #[test]
    fn every_reason_is_listed_once_with_its_own_label() {
        for (i, r) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        let mut labels: Vec<&str> = CloseReason::ALL.iter().map(|r| r.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), CloseReason::ALL.len());
    }
}
