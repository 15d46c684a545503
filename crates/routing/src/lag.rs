//! Replication lag and the per-listener gate that keeps lagging replicas out
//! of a listener's pool, with hysteresis so a replica at the edge does not flap.

use std::time::{Duration, Instant, SystemTime};

use pglb_config::ListenerConfig;

use crate::state::{BackendState, Receiver};

/// A replica's lag behind the primary.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Lag {
    pub bytes: Option<u64>,
    pub seconds: Option<f64>,
}

/// Lag of `replica` behind the primary whose flush positions `history`
/// holds, from the latest sample of each.
///
/// The samples are taken at different moments, so `bytes` can be off by the
/// WAL written during one check interval (plus the check's own duration).
/// `seconds` is how long the primary has had WAL the replica has not
/// replayed: the time since the primary's first sample past the replica's
/// replay position. A replica at most one sample behind counts as caught up
/// (0). Time since the last transaction is not lag: an idle primary leaves
/// an up-to-date replica at 0, however old its last commit.
pub fn lag(replica: &BackendState, primary: &BackendState, history: &WalHistory, now: Instant) -> Lag {
    let replay = replica.facts.wal.replay;
    let bytes = match (primary.facts.wal.current, replay) {
        (Some(current), Some(replay)) => Some(current.saturating_sub(replay)),
        _ => None,
    };
    Lag { bytes, seconds: replay.map(|replay| history.behind_for(replay, now)) }
}

/// A primary's recent flush positions with the time each was sampled, for
/// lag in seconds. Bounded: [`WalHistory::KEEP`] samples.
#[derive(Debug, Clone, Default)]
pub struct WalHistory {
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl WalHistory {
    /// Samples kept: at a check interval of 1s, over an hour; a replica
    /// further behind than the oldest is "at least" that far behind.
    pub const KEEP: usize = 4096;

    /// Records the primary's flush position at `at`.
    pub fn record(&mut self, at: Instant, flush: u64) {
        if self.samples.back().is_some_and(|&(_, last)| last == flush) {
            // Idle: the first sample at this position says since when.
            return;
        }
        if self.samples.len() == Self::KEEP {
            self.samples.pop_front();
        }
        self.samples.push_back((at, flush));
    }

    pub fn clear(&mut self) {
        self.samples.clear();
    }

    /// Seconds since the primary first had WAL past `replay`; 0 when only
    /// the latest sample is past it (one sample of tolerance) or none is.
    fn behind_for(&self, replay: u64, now: Instant) -> f64 {
        let Some(first) = self.samples.iter().position(|&(_, flush)| flush > replay) else { return 0.0 };
        if first + 1 == self.samples.len() {
            return 0.0;
        }
        // Positions only grow: every later sample is past it too.
        now.saturating_duration_since(self.samples[first].0).as_secs_f64()
    }
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
    /// `since` on the wall clock, to be saved (an `Instant` dies with the
    /// process).
    pub since_wall: Option<SystemTime>,
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
            self.since_wall = Some(wall_clock_ms());
        }
    }

    /// A clock saved by an earlier process (state file, upgrade): not
    /// following since `since` on the wall clock, `now` being `wall_now`.
    pub fn restored(since: SystemTime, now: Instant, wall_now: SystemTime) -> Self {
        let ago = wall_now.duration_since(since).unwrap_or_default();
        // Longer ago than the monotonic clock reaches: as long as it does.
        let mut at = now;
        let mut step = ago;
        while step > Duration::ZERO {
            match at.checked_sub(step) {
                Some(earlier) => {
                    at = earlier;
                    break;
                }
                None => step /= 2,
            }
        }
        Self { now: false, since: Some(at), since_wall: Some(since) }
    }

    /// Not following, since when (wall clock), for the state file.
    pub fn saved(&self) -> Option<SystemTime> {
        if self.now {
            None
        } else {
            self.since_wall
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

/// The wall clock to the millisecond (what the state file keeps).
fn wall_clock_ms() -> SystemTime {
    let ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or_default();
    SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
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
    /// A gate an earlier process held shut (state file, upgrade): out until
    /// `rise` good samples, as if this process had shut it.
    pub fn held_out() -> Self {
        Self { admitted: false, good: 0 }
    }

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

/// True if `lag` is over `factor` × the listener's limits. Lag that cannot
/// be measured while a primary is visible (a replica that reports no
/// replay position) is over any limit: unknown is not small.
fn exceeds(lag: Lag, listener: &ListenerConfig, factor: f64) -> bool {
    let bytes = match (lag.bytes, listener.max_lag_bytes) {
        (Some(b), Some(max)) => b as f64 > max as f64 * factor,
        (None, Some(_)) => true,
        (_, None) => false,
    };
    let seconds = match (lag.seconds, listener.max_lag_seconds) {
        (Some(s), Some(max)) => s > max.as_secs_f64() * factor,
        (None, Some(_)) => true,
        (_, None) => false,
    };
    bytes || seconds
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Facts, Wal};

    fn with_wal(wal: Wal) -> BackendState {
        BackendState { facts: Facts { wal, ..Facts::default() }, ..BackendState::default() }
    }

    fn history(t0: Instant, samples: &[(u64, u64)]) -> WalHistory {
        let mut h = WalHistory::default();
        for &(secs, flush) in samples {
            h.record(t0 + std::time::Duration::from_secs(secs), flush);
        }
        h
    }

    #[test]
    fn an_idle_primary_does_not_make_a_caught_up_replica_lag() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + std::time::Duration::from_secs(s);
        let primary = with_wal(Wal { current: Some(1000), flush: Some(1000), ..Wal::default() });
        // However old the last commit, an idle primary is not lag.
        let replica = with_wal(Wal { replay: Some(1000), ..Wal::default() });
        let h = history(t0, &[(0, 1000), (1, 1000), (3600, 1000)]);
        assert_eq!(lag(&replica, &primary, &h, at(3600)), Lag { bytes: Some(0), seconds: Some(0.0) });
    }

    #[test]
    fn seconds_count_from_the_primary_first_having_wal_the_replica_lacks() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + std::time::Duration::from_secs(s);
        let primary = with_wal(Wal { current: Some(5000), flush: Some(5000), ..Wal::default() });
        let replica = with_wal(Wal { replay: Some(1000), ..Wal::default() });
        // The primary passed 1000 at second 10 and went on writing.
        let h = history(t0, &[(0, 900), (5, 1000), (10, 2000), (11, 3000), (12, 5000)]);
        assert_eq!(lag(&replica, &primary, &h, at(13)), Lag { bytes: Some(4000), seconds: Some(3.0) });
        // Only the latest sample is past it: one interval of tolerance.
        let close = with_wal(Wal { replay: Some(3000), ..Wal::default() });
        assert_eq!(lag(&close, &primary, &h, at(13)).seconds, Some(0.0));
        // Behind the oldest sample kept: at least that old.
        let far = with_wal(Wal { replay: Some(100), ..Wal::default() });
        assert_eq!(lag(&far, &primary, &h, at(20)).seconds, Some(20.0));
    }

    #[test]
    fn a_replica_not_repointed_after_a_promotion_lags_from_the_promotion() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + std::time::Duration::from_secs(s);
        // Idle old primary at 7000 until it stops; the replica has all of it.
        let replica = with_wal(Wal { replay: Some(7000), ..Wal::default() });
        // The new primary's first sample (second 40) is past 7000: its
        // promotion wrote WAL the replica will never get.
        let new_primary = with_wal(Wal { current: Some(7100), flush: Some(7100), ..Wal::default() });
        let h = history(t0, &[(40, 7100)]);
        assert_eq!(lag(&replica, &new_primary, &h, at(40)).seconds, Some(0.0), "one sample of tolerance");
        let h = history(t0, &[(40, 7100), (41, 7100), (42, 7200)]);
        assert_eq!(lag(&replica, &new_primary, &h, at(50)).seconds, Some(10.0));
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
        let l = &config.clusters[0].listeners[0];
        let at = |b: u64| Lag { bytes: Some(b), seconds: Some(0.0) };
        let mut g = LagGate::default();
        assert_eq!(g.step(at(900), l, 2), None);
        assert_eq!(g.step(at(1001), l, 2), Some(GateChange::Out));
        assert_eq!(g.step(at(800), l, 2), None, "below the limit but above half: stays out");
        assert_eq!(g.step(at(400), l, 2), None);
        assert_eq!(g.step(at(600), l, 2), None, "streak broken");
        assert_eq!(g.step(at(400), l, 2), None);
        assert_eq!(g.step(at(300), l, 2), Some(GateChange::In));
        assert!(g.admitted);
        // Unknown lag is not small.
        assert_eq!(g.step(Lag::default(), l, 2), Some(GateChange::Out));
    }
}
