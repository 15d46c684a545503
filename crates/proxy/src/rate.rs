//! Counting by source address with bounded memory: a fixed table of atomic
//! slots indexed by a hash of the source, so no client can make pglb
//! allocate, and nothing on the data path takes a lock. Two sources in one
//! slot share its count (stricter, never looser).

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The address a source is counted as: an IPv4 address (also when mapped
/// into IPv6), or an IPv6 /64 (one host usually owns a whole /64).
pub(crate) fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !(u128::from(u64::MAX))).into()),
        },
    }
}

/// The slot of `source` in a table of `slots`.
pub(crate) fn slot_of(hasher: &impl BuildHasher, source: IpAddr, slots: usize) -> usize {
    (hasher.hash_one(source_key(source)) % slots as u64) as usize
}

/// Events counted per source in one-second windows, up to `limit` a second.
pub(crate) struct PerSecond<const SLOTS: usize> {
    /// Per slot: the window's second (high 32 bits) and the count so far.
    slots: [AtomicU64; SLOTS],
    limit: u32,
}

impl<const SLOTS: usize> PerSecond<SLOTS> {
    pub(crate) const fn new(limit: u32) -> Self {
        Self { slots: [const { AtomicU64::new(0) }; SLOTS], limit }
    }

    /// Whether `source` may have one more at `now`; counts it if so.
    pub(crate) fn allow(&self, source: IpAddr, now: Instant) -> bool {
        let hasher = std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default();
        let slot = &self.slots[slot_of(&hasher, source, SLOTS)];
        let second = u64::from(u32::try_from(since_start(now).as_secs()).unwrap_or(u32::MAX));
        slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            let (window, count) = (v >> 32, v & u64::from(u32::MAX));
            if window != second {
                Some((second << 32) | 1)
            } else {
                (count < u64::from(self.limit)).then_some(v + 1)
            }
        })
        .is_ok()
    }
}

/// At most one event a second (a log line about a flood).
pub(crate) struct OncePerSecond(PerSecond<1>);

impl OncePerSecond {
    pub(crate) const fn new() -> Self {
        Self(PerSecond::new(1))
    }

    pub(crate) fn allow(&self) -> bool {
        self.0.allow(IpAddr::from([0, 0, 0, 0]), Instant::now())
    }
}

/// Time since the first event this process counted.
fn since_start(now: Instant) -> Duration {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    now.saturating_duration_since(*START.get_or_init(Instant::now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_gets_its_rate_and_no_more_and_others_are_not_touched() {
        let limit = PerSecond::<4096>::new(3);
        let (a, b) = (IpAddr::from([127, 0, 0, 1]), IpAddr::from([127, 0, 0, 2]));
        let now = Instant::now();
        assert_eq!((0..10).filter(|_| limit.allow(a, now)).count(), 3);
        assert!(limit.allow(b, now), "another source has its own count");
        assert!(limit.allow(a, now + Duration::from_secs(2)), "a later second, a new count");
    }

    #[test]
    fn an_ipv6_host_counts_as_its_64_and_a_mapped_ipv4_as_itself() {
        let one: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("v6");
        let same: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("v6");
        let other: IpAddr = "2001:db8:1:3::1".parse().expect("v6");
        assert_eq!(source_key(one), source_key(same));
        assert_ne!(source_key(one), source_key(other));
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().expect("mapped");
        assert_eq!(source_key(mapped), IpAddr::from([10, 1, 2, 3]));
    }
}
