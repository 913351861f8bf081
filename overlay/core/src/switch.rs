//! The learning part of the buyer's switch: which port a MAC was last seen on.

use rustc_hash::FxHashMap;
use std::time::{Duration, Instant};

use crate::MacAddr;

/// A switch port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Port {
    /// The buyer's host tap.
    Host,
    /// A guest session (slot number in the buyer core).
    Guest(usize),
}

/// MAC address table with aging. It learns only the host side's MACs (guests are
/// bound to their sessions), and never holds more than `capacity` of them.
#[derive(Debug)]
pub struct MacTable {
    entries: FxHashMap<MacAddr, (Port, Instant)>,
    aging: Duration,
    capacity: usize,
}

impl MacTable {
    /// An empty table; entries expire `aging` after they were last seen.
    pub fn new(aging: Duration, capacity: usize) -> MacTable {
        MacTable {
            entries: FxHashMap::default(),
            aging,
            capacity,
        }
    }

    /// Records that `mac` was seen as a source on `port`.
    pub fn learn(&mut self, mac: MacAddr, port: Port, now: Instant) {
        if mac.is_multicast() {
            return;
        }
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&mac) {
            self.age(now);
            if self.entries.len() >= self.capacity {
                return; // full of live entries: flood instead of evicting
            }
        }
        self.entries.insert(mac, (port, now));
    }

    /// The port `mac` was last seen on, unless that is older than the aging time.
    pub fn lookup(&self, mac: MacAddr, now: Instant) -> Option<Port> {
        self.entries
            .get(&mac)
            .filter(|(_, seen)| now.saturating_duration_since(*seen) < self.aging)
            .map(|(p, _)| *p)
    }

    /// Drops entries older than the aging time.
    pub fn age(&mut self, now: Instant) {
        let aging = self.aging;
        self.entries
            .retain(|_, (_, seen)| now.saturating_duration_since(*seen) < aging);
    }

    /// Forgets every MAC learned on `port` (the port went away).
    pub fn forget_port(&mut self, port: Port) {
        self.entries.retain(|_, (p, _)| *p != port);
    }

    /// Number of entries (live or not yet aged out).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if the table has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_moves_ages_and_forgets() {
        let t0 = Instant::now();
        let mut t = MacTable::new(Duration::from_secs(300), 2);
        let a = MacAddr([2, 0, 0, 0, 0, 1]);
        let b = MacAddr([2, 0, 0, 0, 0, 2]);
        let c = MacAddr([2, 0, 0, 0, 0, 3]);
        t.learn(a, Port::Host, t0);
        assert_eq!(t.lookup(a, t0), Some(Port::Host));
        t.learn(a, Port::Guest(1), t0);
        assert_eq!(t.lookup(a, t0), Some(Port::Guest(1)), "station moved");
        t.learn(MacAddr::BROADCAST, Port::Host, t0);
        assert_eq!(
            t.lookup(MacAddr::BROADCAST, t0),
            None,
            "never learns group addresses"
        );
        t.learn(b, Port::Host, t0 + Duration::from_secs(200));
        t.learn(c, Port::Host, t0 + Duration::from_secs(200));
        assert_eq!(t.lookup(c, t0), None, "table full of live entries");
        assert_eq!(t.lookup(a, t0 + Duration::from_secs(300)), None, "aged out");
        t.learn(c, Port::Host, t0 + Duration::from_secs(301));
        assert_eq!(
            t.lookup(c, t0 + Duration::from_secs(301)),
            Some(Port::Host),
            "aged entry made room"
        );
        t.forget_port(Port::Host);
        assert!(t.is_empty());
    }
}
