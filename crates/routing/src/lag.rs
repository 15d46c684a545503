//! Replication lag and the per-listener gate that keeps lagging replicas out
//! of a listener's pool, with hysteresis so a replica at the edge does not flap.

use std::time::Instant;

use pglb_config::ListenerConfig;

use crate::state::{BackendState, Receiver};

/// A replica's lag behind the primary.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Lag {
    pub bytes: Option<u64>,
    pub seconds: Option<f64>,
}

/// Lag of `replica` behind `primary`, from the latest sample of each.
///
/// The samples are taken at different moments, so `bytes` can be off by the
/// WAL written during one check interval (plus the check's own duration);
/// `seconds` is 0 when the replica has replayed at least to the primary's
/// flush position of its previous sample, else the age of the last replayed
/// transaction — so an idle primary does not make an up-to-date replica look
/// hours behind.
pub fn lag(replica: &BackendState, primary: &BackendState) -> Lag {
    let replay = replica.facts.wal.replay;
    let bytes = match (primary.facts.wal.current, replay) {
        (Some(current), Some(replay)) => Some(current.saturating_sub(replay)),
        _ => None,
    };
    let caught_up_to = primary.previous_flush.or(primary.facts.wal.flush);
    let seconds = match (replay, caught_up_to) {
        (Some(replay), Some(flush)) if replay >= flush => Some(0.0),
        _ => replica.facts.wal.replay_age.map(|age| age.max(0.0)),
    };
    Lag { bytes, seconds }
}

/// Whether a replica follows the current primary: its WAL receiver streams
/// on the primary's timeline. A replica left following a dead or fenced old
/// primary (or nothing) stops receiving WAL; the time since it last followed
/// counts as lag in seconds, so `max_lag_seconds` takes it out of the pool
/// even when its WAL positions look close (a fork) or the primary is idle.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Following {
    /// The latest sample said it follows (or could not tell).
    pub now: bool,
    /// When it was last seen following; its first sample if never.
    pub since: Option<Instant>,
}

impl Following {
    /// Steps the clock with a replica's sample; `timeline` is the current
    /// primary's, if one is visible.
    pub fn track(&mut self, receiver: Option<Receiver>, timeline: Option<u32>, now: Instant) {
        self.now = match receiver {
            // Not a replica sample, or the check user may not see the view:
            // judged by WAL positions alone.
            None | Some(Receiver::Hidden) => true,
            Some(Receiver::NotStreaming) => false,
            Some(Receiver::Streaming { timeline: Some(mine) }) => timeline.is_none_or(|primary| mine >= primary),
            Some(Receiver::Streaming { timeline: None }) => true,
        };
        if self.now || self.since.is_none() {
            self.since = Some(now);
        }
    }

    /// `lag`, with the time since the replica last followed as a floor for
    /// its seconds.
    pub fn widen(&self, mut lag: Lag, now: Instant) -> Lag {
        if let (false, Some(since)) = (self.now, self.since) {
            let off = now.saturating_duration_since(since).as_secs_f64();
            lag.seconds = Some(lag.seconds.unwrap_or(0.0).max(off));
        }
        lag
    }
}

/// Whether one replica is admitted to one listener's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LagGate {
    pub admitted: bool,
    /// Consecutive samples below half the limit while out.
    good: u32,
}

impl Default for LagGate {
    fn default() -> Self {
        Self { admitted: true, good: 0 }
    }
}

/// A gate movement worth one log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateChange {
    Out,
    In,
}

impl LagGate {
    /// Steps the gate with one sample. Out when over a limit; back in after
    /// `rise` consecutive samples below half of every limit.
    pub fn step(&mut self, lag: Lag, listener: &ListenerConfig, rise: u32) -> Option<GateChange> {
        let over = exceeds(lag, listener, 1.0);
        if self.admitted {
            if over {
                self.admitted = false;
                self.good = 0;
                return Some(GateChange::Out);
            }
            return None;
        }
        if exceeds(lag, listener, 0.5) {
            self.good = 0;
            return None;
        }
        self.good += 1;
        if self.good >= rise {
            self.admitted = true;
            return Some(GateChange::In);
        }
        None
    }
}

/// True if `lag` is over `factor` × the listener's limits. Unknown lag
/// (no sample yet) is not over anything.
fn exceeds(lag: Lag, listener: &ListenerConfig, factor: f64) -> bool {
    let bytes = match (lag.bytes, listener.max_lag_bytes) {
        (Some(b), Some(max)) => b as f64 > max as f64 * factor,
        _ => false,
    };
    let seconds = match (lag.seconds, listener.max_lag_seconds) {
        (Some(s), Some(max)) => s > max.as_secs_f64() * factor,
        _ => false,
    };
    bytes || seconds
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Facts, Wal};

    fn with_wal(wal: Wal, previous_flush: Option<u64>) -> BackendState {
        BackendState { facts: Facts { wal, ..Facts::default() }, previous_flush, ..BackendState::default() }
    }

    #[test]
    fn idle_primary_does_not_make_replicas_lag() {
        let primary = with_wal(Wal { current: Some(1000), flush: Some(1000), ..Wal::default() }, Some(1000));
        let replica = with_wal(Wal { replay: Some(1000), replay_age: Some(7200.0), ..Wal::default() }, None);
        assert_eq!(lag(&replica, &primary), Lag { bytes: Some(0), seconds: Some(0.0) });
    }

    #[test]
    fn behind_replica_reports_bytes_and_age() {
        let primary = with_wal(Wal { current: Some(5000), flush: Some(5000), ..Wal::default() }, Some(4000));
        let replica = with_wal(Wal { replay: Some(1000), replay_age: Some(3.5), ..Wal::default() }, None);
        assert_eq!(lag(&replica, &primary), Lag { bytes: Some(4000), seconds: Some(3.5) });
        let clock_skew = with_wal(Wal { replay: Some(1000), replay_age: Some(-0.2), ..Wal::default() }, None);
        assert_eq!(lag(&clock_skew, &primary).seconds, Some(0.0));
    }

    #[test]
    fn a_replica_that_stops_following_lags_by_the_time_since() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + std::time::Duration::from_secs(s);
        let caught_up = Lag { bytes: Some(0), seconds: Some(0.0) };
        let mut f = Following::default();
        f.track(Some(Receiver::Streaming { timeline: Some(1) }), Some(1), at(0));
        assert_eq!(f.widen(caught_up, at(5)), caught_up);
        f.track(Some(Receiver::NotStreaming), Some(1), at(10));
        assert_eq!(f.widen(caught_up, at(40)).seconds, Some(40.0), "last followed at 0");
        // Streaming again, but on an older timeline than the primary's.
        f.track(Some(Receiver::Streaming { timeline: Some(1) }), Some(2), at(41));
        assert_eq!(f.widen(caught_up, at(41)).seconds, Some(41.0));
        f.track(Some(Receiver::Streaming { timeline: Some(2) }), Some(2), at(42));
        assert_eq!(f.widen(caught_up, at(43)), caught_up);
        // Never seen following: the clock starts at the first sample.
        let mut g = Following::default();
        g.track(Some(Receiver::NotStreaming), Some(2), at(50));
        assert_eq!(g.widen(caught_up, at(53)).seconds, Some(3.0));
        // A check user that cannot see pg_stat_wal_receiver: not judged.
        let mut h = Following::default();
        h.track(Some(Receiver::Hidden), Some(2), at(50));
        assert_eq!(h.widen(caught_up, at(90)), caught_up);
    }

    #[test]
    fn gate_has_hysteresis() {
        let text = "listeners:\n  - {name: ro, listen: 127.0.0.1:1, role: replica, max_lag_bytes: 1000}\nbackends:\n  - {name: a, address: 127.0.0.1:2}\n";
        let config = pglb_config::load_str(std::path::Path::new("t.yaml"), text).expect("config");
        let l = &config.listeners[0];
        let at = |b: u64| Lag { bytes: Some(b), seconds: None };
        let mut g = LagGate::default();
        assert_eq!(g.step(at(900), l, 2), None);
        assert_eq!(g.step(at(1001), l, 2), Some(GateChange::Out));
        assert_eq!(g.step(at(800), l, 2), None, "below the limit but above half: stays out");
        assert_eq!(g.step(at(400), l, 2), None);
        assert_eq!(g.step(at(600), l, 2), None, "streak broken");
        assert_eq!(g.step(at(400), l, 2), None);
        assert_eq!(g.step(at(300), l, 2), Some(GateChange::In));
        assert!(g.admitted);
    }
}
