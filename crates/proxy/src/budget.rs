//! The pending budget: one process-wide bound on connections that hold no
//! backend session yet — before their first message, held (no eligible
//! backend), queued (limits full), and cancel requests — and a bound per
//! source address within it. Forwarded sessions are bounded by
//! `max_connections` and `max_clients`; these connections are what a
//! client can open for free, so without a bound a flood of silent
//! connections would take every file descriptor. A connection over budget
//! is refused the moment it is accepted, before pglb reads anything: it is
//! sent a FATAL 53300 ErrorResponse (what PostgreSQL sends when it cannot
//! start a backend) and closed.
//!
//! The budget is shared by every listening address, and so by every
//! cluster; so that a flood on one address cannot starve the others, one
//! address may hold at most half of it while pglb listens on more than one
//! (clusters sharing an address by server name share its half: the name is
//! read only after the connection holds its place).

use std::collections::hash_map::RandomState;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use metrics::Gauge;

use crate::rate::slot_of;

/// Slots counting pending connections per source (by hash: two sources in
/// one slot share a count). 256 KiB, once per process.
const SOURCE_SLOTS: usize = 65_536;

/// The budget and what is taken of it now.
pub struct Budget {
    max: AtomicUsize,
    per_source: AtomicUsize,
    used: AtomicUsize,
    /// Listening addresses whose accept loops take places now.
    addresses: AtomicUsize,
    sources: Box<[AtomicU32]>,
    /// Random per process: nobody can choose sources that share a slot
    /// with a victim's.
    hasher: RandomState,
    gauge: Gauge,
    gauge_limit: Gauge,
}

/// Which bound a refused connection hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// `limits.max_pending`.
    Total,
    /// `limits.max_pending_per_source`.
    Source,
    /// The listening address's share of `limits.max_pending`.
    Address,
}

/// One listening address's count of pending connections; while it lives,
/// the address counts among those sharing the budget.
pub struct AddressShare {
    budget: Arc<Budget>,
    used: Arc<AtomicUsize>,
}

impl AddressShare {
    /// Connections pending on this address now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

impl Drop for AddressShare {
    fn drop(&mut self) {
        self.budget.addresses.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One connection's place in the budget, given back when it is dropped
/// (when its session starts forwarding, or the connection ends).
pub struct Pending {
    budget: Arc<Budget>,
    slot: usize,
    address: Option<Arc<AtomicUsize>>,
}

impl Budget {
    pub fn new(max: usize, per_source: usize) -> Arc<Self> {
        let budget = Self {
            max: AtomicUsize::new(0),
            per_source: AtomicUsize::new(0),
            used: AtomicUsize::new(0),
            addresses: AtomicUsize::new(0),
            sources: (0..SOURCE_SLOTS).map(|_| AtomicU32::new(0)).collect(),
            hasher: RandomState::new(),
            gauge: metrics::gauge!("pglb_pending_connections"),
            gauge_limit: metrics::gauge!("pglb_pending_connections_limit"),
        };
        budget.gauge.set(0.0);
        budget.set(max, per_source);
        Arc::new(budget)
    }

    /// New bounds (a reload): connections already pending keep their place.
    pub fn set(&self, max: usize, per_source: usize) {
        self.max.store(max, Ordering::Relaxed);
        self.per_source.store(per_source, Ordering::Relaxed);
        self.gauge_limit.set(max as f64);
    }

    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    pub fn per_source(&self) -> usize {
        self.per_source.load(Ordering::Relaxed)
    }

    /// Connections pending now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// A listening address's share (its accept loop holds it).
    pub fn address(self: &Arc<Self>) -> AddressShare {
        self.addresses.fetch_add(1, Ordering::AcqRel);
        AddressShare { budget: self.clone(), used: Arc::default() }
    }

    /// The most one address may hold: half the budget while more than one
    /// address listens, else all of it.
    pub fn per_address(&self) -> usize {
        match self.addresses.load(Ordering::Relaxed) {
            0 | 1 => self.max(),
            _ => (self.max() / 2).max(1),
        }
    }

    /// A place for a connection from `source` on the address of `share`
    /// (`None`: no address bound), if every bound allows it.
    pub fn take(self: &Arc<Self>, source: IpAddr, share: Option<&AddressShare>) -> Result<Pending, Over> {
        let slot = slot_of(&self.hasher, source, SOURCE_SLOTS);
        let per_source = u32::try_from(self.per_source()).unwrap_or(u32::MAX);
        self.sources[slot]
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < per_source).then_some(n + 1))
            .map_err(|_| Over::Source)?;
        let max = self.max();
        if self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).is_err() {
            self.sources[slot].fetch_sub(1, Ordering::AcqRel);
            return Err(Over::Total);
        }
        let address = share.map(|s| s.used.clone());
        if let Some(used) = &address {
            let cap = self.per_address();
            if used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < cap).then_some(n + 1)).is_err() {
                self.sources[slot].fetch_sub(1, Ordering::AcqRel);
                self.used.fetch_sub(1, Ordering::AcqRel);
                return Err(Over::Address);
            }
        }
        self.gauge.increment(1.0);
        Ok(Pending { budget: self.clone(), slot, address })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.budget.sources[self.slot].fetch_sub(1, Ordering::AcqRel);
        self.budget.used.fetch_sub(1, Ordering::AcqRel);
        if let Some(used) = &self.address {
            used.fetch_sub(1, Ordering::AcqRel);
        }
        self.budget.gauge.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_bounds_hold_and_places_come_back_when_dropped() {
        let budget = Budget::new(5, 2);
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let a1 = budget.take(a, None).expect("a 1");
        let _a2 = budget.take(a, None).expect("a 2");
        assert_eq!(budget.take(a, None).err(), Some(Over::Source), "a third from one source");
        let others: Vec<Pending> =
            (3..6).map(|i| budget.take(IpAddr::from([10, 0, 0, i]), None).expect("other sources")).collect();
        assert_eq!(budget.used(), 5);
        assert_eq!(budget.take(b, None).err(), Some(Over::Total), "the whole budget is taken");
        drop(a1);
        let _b1 = budget.take(b, None).expect("a freed place");
        drop(others);
        assert_eq!(budget.used(), 2, "a2 and b1");
        let _a3 = budget.take(a, None).expect("a's own place came back");
        assert_eq!(budget.take(a, None).err(), Some(Over::Source));
    }

    #[test]
    fn one_address_holds_at_most_half_while_others_listen() {
        let budget = Budget::new(8, 8);
        let flooded = budget.address();
        let source = |i: u8| IpAddr::from([10, 0, 1, i]);
        let mut held = Vec::new();
        for i in 0..8 {
            held.push(budget.take(source(i), Some(&flooded)).expect("alone, an address takes all"));
        }
        held.truncate(4);
        let quiet = budget.address();
        assert_eq!(budget.per_address(), 4);
        assert_eq!(budget.take(source(20), Some(&flooded)).err(), Some(Over::Address), "its half is taken");
        let other: Vec<Pending> =
            (30..34).map(|i| budget.take(source(i), Some(&quiet)).expect("the other half is the other's")).collect();
        assert_eq!((flooded.used(), quiet.used(), budget.used()), (4, 4, 8));
        drop(other);
        drop(quiet);
        assert_eq!(budget.per_address(), 8, "one address again: it may take all");
        let _more = budget.take(source(40), Some(&flooded)).expect("a place");
        drop(held);
        // `_more` and seven more: the whole budget.
        let full: Vec<Pending> = (50..57).map(|i| budget.take(source(i), Some(&flooded)).expect("a place")).collect();
        assert_eq!(budget.take(source(60), Some(&flooded)).err(), Some(Over::Total), "alone: the budget, not a share");
        drop(full);
    }
}
