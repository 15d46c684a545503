//! Admission to read-only pools on evidence. A node that was primary (or
//! fenced) may hold WAL the cluster discarded at a promotion: an old
//! primary restarted as a replica before `pg_rewind` answers reads from a
//! history that no longer exists, and its WAL positions look close. It may
//! serve reads again only once its WAL receiver has streamed on the current
//! primary's timeline — the server's own proof that its history is a
//! prefix of the primary's. Every replica is held to that proof whenever
//! the check user can see `pg_stat_wal_receiver`.

use crate::state::Receiver;

/// What one backend has shown of following the current primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rejoin {
    /// Seen as primary, or fenced, since it last proved itself: with its
    /// receiver hidden from the check user there is no proof, and it stays
    /// out.
    pub was_primary: bool,
    /// The highest timeline its WAL receiver was seen streaming on since.
    pub streamed_on: Option<u32>,
    /// The last replica sample's receiver.
    pub receiver: Option<Receiver>,
}

impl Rejoin {
    /// Seen as primary, or fenced: whatever it streamed before proves
    /// nothing now.
    pub fn reset(&mut self) {
        *self = Self { was_primary: true, streamed_on: None, receiver: None };
    }

    /// A replica sample.
    pub fn sample(&mut self, receiver: Option<Receiver>) {
        self.receiver = receiver;
        if let Some(Receiver::Streaming { timeline: Some(t) }) = receiver {
            self.streamed_on = self.streamed_on.max(Some(t));
        }
    }

    /// Whether it may serve reads while the cluster's timeline is
    /// `current` (the highest primary timeline known; `None` if none is).
    pub fn proven(&self, current: Option<u32>) -> bool {
        match self.receiver {
            // Nothing to judge by: as before, unless it was primary.
            None | Some(Receiver::Hidden) => !self.was_primary,
            Some(_) => match (self.streamed_on, current) {
                (Some(mine), Some(now)) => mine >= now,
                (Some(_), None) => true,
                (None, _) => false,
            },
        }
    }

    /// Why it is kept out of read-only pools, if it is.
    pub fn why_out(&self, current: Option<u32>) -> Option<String> {
        if self.proven(current) {
            return None;
        }
        let since = if self.was_primary { "since it was last primary or fenced" } else { "yet" };
        let timeline = current.map(|t| format!(" {t}")).unwrap_or_default();
        Some(match self.receiver {
            None | Some(Receiver::Hidden) => "it was primary or fenced, and the check user cannot see pg_stat_wal_receiver to tell whether it follows the current timeline (grant it pg_monitor)".to_owned(),
            _ => format!("its WAL receiver has not streamed on the current timeline{timeline} {since}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAMING_1: Option<Receiver> = Some(Receiver::Streaming { timeline: Some(1) });
    const STREAMING_2: Option<Receiver> = Some(Receiver::Streaming { timeline: Some(2) });

    #[test]
    fn a_demoted_primary_serves_reads_only_once_it_streams_on_the_new_timeline() {
        let mut r = Rejoin::default();
        r.sample(STREAMING_1);
        assert!(r.proven(Some(1)));
        r.reset();
        // Restarted as a replica, not rewound: not streaming, or still on
        // the old timeline.
        r.sample(Some(Receiver::NotStreaming));
        assert!(!r.proven(Some(2)));
        r.sample(STREAMING_1);
        assert!(!r.proven(Some(2)));
        assert!(r.why_out(Some(2)).is_some_and(|w| w.contains("timeline 2")), "{:?}", r.why_out(Some(2)));
        r.sample(STREAMING_2);
        assert!(r.proven(Some(2)));
        // A pause in streaming later is lag's business, not this proof's.
        r.sample(Some(Receiver::NotStreaming));
        assert!(r.proven(Some(2)));
    }

    #[test]
    fn a_replica_left_on_the_old_timeline_is_out_until_it_follows_the_new_primary() {
        let mut r = Rejoin::default();
        r.sample(STREAMING_1);
        assert!(r.proven(Some(1)));
        assert!(!r.proven(Some(2)), "a promotion elsewhere: its history may hold discarded WAL");
        r.sample(STREAMING_2);
        assert!(r.proven(Some(2)));
    }

    #[test]
    fn a_hidden_receiver_is_judged_as_before_unless_the_node_was_primary() {
        let mut r = Rejoin::default();
        r.sample(Some(Receiver::Hidden));
        assert!(r.proven(Some(3)));
        r.reset();
        r.sample(Some(Receiver::Hidden));
        assert!(!r.proven(Some(3)));
        assert!(r.why_out(Some(3)).is_some_and(|w| w.contains("pg_monitor")));
    }

    #[test]
    fn a_replica_never_seen_streaming_is_out() {
        let mut r = Rejoin::default();
        r.sample(Some(Receiver::NotStreaming));
        assert!(!r.proven(Some(1)));
        assert!(!r.proven(None));
    }
}
