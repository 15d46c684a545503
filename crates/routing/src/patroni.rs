//! What Patroni says about a cluster, as pglb uses it: members and their
//! tags (who is in the read pools), and the leader lock as a *veto* on the
//! primary pglb's own checks found — never as the source of routing, so
//! Patroni or its DCS being down never takes the cluster dark.

use std::collections::BTreeMap;
use std::time::SystemTime;

use pglb_config::Tags;

/// One member, as Patroni's `GET /cluster` last listed it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MemberView {
    /// `leader`, `standby_leader`, `sync_standby`, `quorum_standby`, `replica`.
    pub role: String,
    /// `running`, `streaming`, `stopped`, `starting`, ...
    pub state: String,
    pub timeline: Option<u64>,
    /// Lag Patroni computes from the DCS (bytes), when it knows it.
    pub lag: Option<u64>,
    pub tags: Tags,
    /// Gone from Patroni's list (for `remove_after`, or just now): drained
    /// until its sessions end, then removed.
    pub departed: bool,
}

impl MemberView {
    fn flag(&self, tag: &str) -> bool {
        self.tags.get(tag).is_some_and(|v| v == "true")
    }
    /// `noloadbalance`: out of read-only balancing.
    pub fn noloadbalance(&self) -> bool {
        self.flag("noloadbalance")
    }
    /// `nostream`: fed from the WAL archive, never streams; not held to the
    /// "not following its primary" bound.
    pub fn nostream(&self) -> bool {
        self.flag("nostream")
    }
    pub fn nofailover(&self) -> bool {
        self.flag("nofailover")
    }
    pub fn failover_priority(&self) -> Option<&str> {
        self.tags.get("failover_priority").map(String::as_str)
    }
}

/// Whether the leader lock is used, and if not, why pglb routes on its own
/// checks alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Trust {
    /// The lock holder confirmed the lock on its own API: any other node
    /// the checks see as primary gets no traffic.
    Lock,
    /// Nothing read from Patroni yet.
    #[default]
    NotRead,
    /// No member's REST API answered.
    Unreachable,
    /// The APIs answer but cannot read the DCS.
    DcsUnavailable,
    /// The DCS holds no leader (an election, or every node down).
    NoLeader,
    /// The named leader is not running PostgreSQL.
    LeaderNotRunning,
    /// The named leader does not confirm the lock on its own `/leader`.
    Unconfirmed,
    /// `failsafe_mode` is active: the DCS is gone and the leader keeps
    /// running on the members' word.
    Failsafe,
    /// Maintenance mode: Patroni does not move the lock, not even when an
    /// operator promotes a node by hand.
    Paused,
}

impl Trust {
    pub const ALL: [Trust; 9] = [
        Self::Lock,
        Self::NotRead,
        Self::Unreachable,
        Self::DcsUnavailable,
        Self::NoLeader,
        Self::LeaderNotRunning,
        Self::Unconfirmed,
        Self::Failsafe,
        Self::Paused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lock => "leader_lock",
            Self::NotRead => "not_read",
            Self::Unreachable => "api_unreachable",
            Self::DcsUnavailable => "dcs_unavailable",
            Self::NoLeader => "no_leader",
            Self::LeaderNotRunning => "leader_not_running",
            Self::Unconfirmed => "leader_unconfirmed",
            Self::Failsafe => "failsafe",
            Self::Paused => "paused",
        }
    }

    /// What pglb does, in words (logs, `/status`).
    pub fn explain(self) -> &'static str {
        match self {
            Self::Lock => "the leader lock vetoes any other node that claims to be primary",
            Self::NotRead => "Patroni has not been read yet: routing on pglb's own checks",
            Self::Unreachable => "no Patroni REST API answers: routing on pglb's own checks, with the last known members",
            Self::DcsUnavailable => "Patroni cannot read its DCS: routing on pglb's own checks, with the last known members",
            Self::NoLeader => "the DCS names no leader: routing on pglb's own checks",
            Self::LeaderNotRunning => "the DCS names a leader that is not running: routing on pglb's own checks",
            Self::Unconfirmed => "the named leader does not confirm the lock on its own API: routing on pglb's own checks",
            Self::Failsafe => "Patroni's failsafe mode is active (the DCS is gone): routing on pglb's own checks",
            Self::Paused => "Patroni is paused (maintenance mode; the lock does not follow a manual promotion): routing on pglb's own checks",
        }
    }
}

/// What the Patroni reader last learnt about one cluster.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PatroniView {
    pub trust: Trust,
    /// The member holding the leader lock, when it confirmed it (only then
    /// is `trust` [`Trust::Lock`]).
    pub leader: Option<String>,
    /// The standby leader of a standby cluster: no node takes writes.
    pub standby_leader: Option<String>,
    pub paused: bool,
    /// Members by name, those that left included (`departed`).
    pub members: BTreeMap<String, MemberView>,
    /// The REST API that answered last, and when.
    pub answered_by: Option<String>,
    pub answered_at: Option<SystemTime>,
    /// Why the last read failed, if it did.
    pub error: Option<String>,
}

impl PatroniView {
    /// The member whose lock vetoes other primaries, if the lock is used.
    pub fn veto_holder(&self) -> Option<&str> {
        match self.trust {
            Trust::Lock => self.leader.as_deref(),
            _ => None,
        }
    }
}
