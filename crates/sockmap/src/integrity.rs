//! The integrity audit of a linked session: per direction, what the source
//! received against what was written into the destination. Pure logic over
//! [`Flow`] samples; the forwarder feeds it and acts on a [`Breach`].
//!
//! - **Surplus**: the destination was given more than the source received.
//!   Bytes were duplicated (the kernel's redirect does that with a
//!   retransmitted segment that overlaps bytes already received: README,
//!   "The kernel path"). The stream is corrupt: end the session at once.
//! - **Stuck**: the source received bytes the destination never got, its
//!   own send queue is empty (so it is not waiting for its peer to read),
//!   and nothing moved either way for [`STUCK_AFTER`]. Bytes were lost in
//!   the kernel; waiting longer cannot bring them back.
//!
//! A destination whose peer does not read (its send queue holds bytes) is
//! a slow reader, not a breach, however long it lasts. A direction one of
//! whose sockets has closed is not judged: a closed socket no longer says
//! whether a FIN, which TCP counts like a byte, went through it.

use std::time::{Duration, Instant};

use crate::Flow;

/// How long a deficit with nothing moving is tolerated before it is a
/// breach. The kernel's redirect worker can be delayed by a busy machine,
/// never for this long.
pub const STUCK_AFTER: Duration = Duration::from_secs(10);

/// What the audit found wrong with one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breach {
    /// The destination was given `delivered` bytes of the `received`.
    Surplus { received: u64, delivered: u64 },
    /// `received - delivered` bytes have not moved for `stalled`.
    Stuck { received: u64, delivered: u64, stalled: Duration },
}

impl Breach {
    /// The `kind` label of `pglb_forward_integrity_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Breach::Surplus { .. } => "surplus",
            Breach::Stuck { .. } => "stuck",
        }
    }

    pub const KINDS: [&'static str; 2] = ["surplus", "stuck"];
}

/// The audit of one session's two directions.
#[derive(Debug)]
pub struct Audit {
    last: [Flow; 2],
    /// Since when each direction's counts have not changed.
    still_since: [Instant; 2],
}

impl Audit {
    pub fn new(now: Instant) -> Self {
        Self { last: [Flow::default(); 2], still_since: [now; 2] }
    }

    /// Checks a sample taken at `now`; returns the first direction found
    /// in breach (0: `a` to `b`, 1: `b` to `a`).
    pub fn check(&mut self, flows: &[Flow; 2], now: Instant) -> Option<(usize, Breach)> {
        for (i, flow) in flows.iter().enumerate() {
            if flow.closed {
                continue;
            }
            if flow.delivered > flow.received {
                return Some((i, Breach::Surplus { received: flow.received, delivered: flow.delivered }));
            }
            let moved = (flow.received, flow.delivered) != (self.last[i].received, self.last[i].delivered);
            self.last[i] = *flow;
            if moved {
                self.still_since[i] = now;
                continue;
            }
            let stalled = now.saturating_duration_since(self.still_since[i]);
            if flow.received > flow.delivered && flow.unacked == 0 && stalled >= STUCK_AFTER {
                return Some((i, Breach::Stuck { received: flow.received, delivered: flow.delivered, stalled }));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(received: u64, delivered: u64, unacked: u64) -> Flow {
        Flow { received, delivered, unacked, closed: false }
    }

    const QUIET: Flow = Flow { received: 0, delivered: 0, unacked: 0, closed: false };

    #[test]
    fn a_closed_direction_is_not_judged() {
        let t = Instant::now();
        let mut audit = Audit::new(t);
        // Off by the FIN of a socket that has closed.
        let ending = Flow { received: 5, delivered: 6, unacked: 0, closed: true };
        assert_eq!(audit.check(&[ending, QUIET], t), None);
        assert_eq!(audit.check(&[Flow { delivered: 4, ..ending }, QUIET], t + STUCK_AFTER * 2), None);
    }

    #[test]
    fn a_destination_given_more_than_its_source_received_is_a_surplus_at_once() {
        let t = Instant::now();
        let mut audit = Audit::new(t);
        assert_eq!(audit.check(&[flow(100, 100, 0), QUIET], t), None);
        // One 65,483-byte segment too many, as seen in the issue.
        let found = audit.check(&[QUIET, flow(193_200_452, 193_265_935, 0)], t);
        assert_eq!(found, Some((1, Breach::Surplus { received: 193_200_452, delivered: 193_265_935 })));
        assert_eq!(found.map(|(_, b)| b.kind()), Some("surplus"));
    }

    #[test]
    fn bytes_in_flight_that_keep_moving_are_not_a_breach() {
        let t = Instant::now();
        let mut audit = Audit::new(t);
        for step in 0..100u64 {
            let now = t + Duration::from_secs(step);
            // Always 4 MB behind, but moving every second.
            let f = flow(4_000_000 + step * 1000, step * 1000, 0);
            assert_eq!(audit.check(&[f, QUIET], now), None, "step {step}");
        }
    }

    #[test]
    fn a_deficit_that_stops_moving_with_an_empty_send_queue_is_stuck_after_the_bound() {
        let t = Instant::now();
        let mut audit = Audit::new(t);
        let f = flow(1000, 400, 0);
        assert_eq!(audit.check(&[QUIET, f], t), None);
        assert_eq!(audit.check(&[QUIET, f], t + STUCK_AFTER - Duration::from_millis(1)), None);
        let found = audit.check(&[QUIET, f], t + STUCK_AFTER);
        assert_eq!(found, Some((1, Breach::Stuck { received: 1000, delivered: 400, stalled: STUCK_AFTER })));
    }

    #[test]
    fn a_reader_that_does_not_read_is_never_stuck() {
        let t = Instant::now();
        let mut audit = Audit::new(t);
        // The destination's send queue is full: its peer is not reading.
        let f = flow(1000, 400, 300);
        for minutes in 0..60 {
            assert_eq!(audit.check(&[f, QUIET], t + Duration::from_secs(60 * minutes)), None);
        }
    }

    #[test]
    fn movement_restarts_the_clock() {
        let t = Instant::now();
        let mut audit = Audit::new(t);
        assert_eq!(audit.check(&[flow(1000, 400, 0), QUIET], t), None);
        assert_eq!(audit.check(&[flow(1000, 500, 0), QUIET], t + Duration::from_secs(9)), None);
        assert_eq!(audit.check(&[flow(1000, 500, 0), QUIET], t + Duration::from_secs(18)), None);
        assert!(audit.check(&[flow(1000, 500, 0), QUIET], t + Duration::from_secs(19)).is_some());
    }

    #[test]
    fn everything_delivered_and_quiet_is_fine_forever() {
        let t = Instant::now();
        let mut audit = Audit::new(t);
        let f = flow(5000, 5000, 0);
        assert_eq!(audit.check(&[f, f], t), None);
        assert_eq!(audit.check(&[f, f], t + Duration::from_secs(3600)), None);
    }
}
