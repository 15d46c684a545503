//! Backend selection: candidates in fallback order, first choice first.

use std::sync::atomic::{AtomicUsize, Ordering};

use pglb_config::Balance;

use crate::table::{ListenerRoute, RoutingTable};

/// Per-listener selection state that outlives tables (the round-robin
/// position). One atomic; no lock.
#[derive(Debug, Default)]
pub struct Cursor(AtomicUsize);

impl Cursor {
    fn next(&self) -> usize {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

impl ListenerRoute {
    /// Every eligible backend, the balance policy's choice first, then the
    /// others to try if it refuses.
    pub fn candidates(&self, table: &RoutingTable, cursor: &Cursor) -> Vec<usize> {
        if self.eligible.is_empty() {
            return Vec::new();
        }
        let first = match self.config.balance {
            Balance::RoundRobin => self.cycle[cursor.next() % self.cycle.len()],
            Balance::LeastConn => self.least_loaded(table, cursor.next()),
            Balance::Random => self.two_choices(table),
        };
        let start = self.eligible.iter().position(|&i| i == first).unwrap_or(0);
        let n = self.eligible.len();
        (0..n).map(|k| self.eligible[(start + k) % n]).collect()
    }

    /// Lowest active/weight; ties rotate so equal backends share the load.
    fn least_loaded(&self, table: &RoutingTable, turn: usize) -> usize {
        let n = self.eligible.len();
        let mut best = self.eligible[turn % n];
        for k in 1..n {
            let candidate = self.eligible[(turn + k) % n];
            if lighter(table, candidate, best) {
                best = candidate;
            }
        }
        best
    }

    /// Power of two choices: two weighted draws, the lighter wins.
    fn two_choices(&self, table: &RoutingTable) -> usize {
        let a = self.weighted_draw(table);
        let b = self.weighted_draw(table);
        if lighter(table, b, a) {
            b
        } else {
            a
        }
    }

    fn weighted_draw(&self, table: &RoutingTable) -> usize {
        let total: u64 = self.eligible.iter().map(|&i| u64::from(table.backends[i].config.weight)).sum();
        let mut pick = fastrand::u64(0..total.max(1));
        for &i in &self.eligible {
            let w = u64::from(table.backends[i].config.weight);
            if pick < w {
                return i;
            }
            pick -= w;
        }
        self.eligible[0]
    }
}

/// `a` carries less load per unit of weight than `b`.
fn lighter(table: &RoutingTable, a: usize, b: usize) -> bool {
    let (ea, eb) = (&table.backends[a], &table.backends[b]);
    let la = ea.load.active() as u64 * u64::from(eb.config.weight);
    let lb = eb.load.active() as u64 * u64::from(ea.config.weight);
    la < lb
}
