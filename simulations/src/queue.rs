//! The event queue: earliest time first, then insertion order, so ties replay
//! identically.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

struct Entry<E> {
    at: u64,
    seq: u64,
    ev: E,
}

impl<E> PartialEq for Entry<E> {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl<E> Eq for Entry<E> {}
impl<E> PartialOrd for Entry<E> {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl<E> Ord for Entry<E> {
    fn cmp(&self, o: &Self) -> Ordering {
        // reversed: BinaryHeap is a max-heap
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// Width of one calendar slot: 2^SLOT_BITS microseconds.
const SLOT_BITS: u32 = 8;
/// Slots in the calendar ring (2^16 of 256 us: about 16.8 s ahead).
const RING: usize = 1 << 16;

/// Min-queue of events keyed by time in microseconds.
///
/// A calendar queue: time is cut into slots of 256 us; the current slot's
/// events sit in a small binary heap, the next 16.8 s of slots in unsorted
/// buckets (a push is an append), later events in a second heap. With 100,000
/// sellers one big heap held millions of events and its pops, a cache miss per
/// level, were a fifth of the run. The order is the same: earliest time, then
/// insertion order.
pub struct EventQueue<E> {
    /// Events of the current slot (and any pushed for an earlier time).
    cur: BinaryHeap<Entry<E>>,
    /// Index of the current slot (time >> SLOT_BITS).
    slot: u64,
    /// Bucket `s % RING` holds the events of slot `s`, for `slot < s < slot + RING`.
    ring: Vec<Vec<Entry<E>>>,
    ring_len: usize,
    /// Events at or beyond slot `slot + RING`.
    far: BinaryHeap<Entry<E>>,
    seq: u64,
}

impl<E> Default for EventQueue<E> {
    fn default() -> Self {
        EventQueue {
            cur: BinaryHeap::new(),
            slot: 0,
            ring: Vec::new(),
            ring_len: 0,
            far: BinaryHeap::new(),
            seq: 0,
        }
    }
}

impl<E> EventQueue<E> {
    /// Schedules `ev` at `at` (microseconds).
    pub fn push(&mut self, at: u64, ev: E) {
        let e = Entry {
            at,
            seq: self.seq,
            ev,
        };
        self.seq += 1;
        let s = at >> SLOT_BITS;
        if s <= self.slot {
            self.cur.push(e);
        } else if s - self.slot < RING as u64 {
            if self.ring.is_empty() {
                self.ring.resize_with(RING, Vec::new);
            }
            self.ring[(s % RING as u64) as usize].push(e);
            self.ring_len += 1;
        } else {
            self.far.push(e);
        }
    }

    /// The earliest event and its time.
    pub fn pop(&mut self) -> Option<(u64, E)> {
        if self.cur.is_empty() && !self.advance() {
            return None;
        }
        self.cur.pop().map(|e| (e.at, e.ev))
    }

    /// Moves to the next slot holding events; false if there are none.
    fn advance(&mut self) -> bool {
        loop {
            if self.ring_len == 0 {
                // nothing in the ring: jump straight to the far heap's first slot
                match self.far.peek() {
                    Some(e) => self.slot = (e.at >> SLOT_BITS).max(self.slot + 1),
                    None => return false,
                }
            } else {
                self.slot += 1;
            }
            let b = (self.slot % RING as u64) as usize;
            let mut v = match self.ring.get_mut(b) {
                Some(v) => std::mem::take(v),
                None => Vec::new(),
            };
            self.ring_len -= v.len();
            while self
                .far
                .peek()
                .is_some_and(|e| e.at >> SLOT_BITS <= self.slot)
            {
                v.push(self.far.pop().expect("peeked"));
            }
            if v.is_empty() {
                continue;
            }
            // (buffers are not handed back to the ring: 65,536 buckets each
            // keeping its largest size held 900 MB more at 100,000 sellers)
            self.cur = BinaryHeap::from(v);
            return true;
        }
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.cur.len() + self.ring_len + self.far.len()
    }

    /// True when nothing is scheduled.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_first_then_fifo() {
        let mut q = EventQueue::default();
        q.push(5, 'a');
        q.push(1, 'b');
        q.push(5, 'c');
        q.push(1, 'd');
        let order: Vec<char> = std::iter::from_fn(|| q.pop().map(|x| x.1)).collect();
        assert_eq!(order, vec!['b', 'd', 'a', 'c']);
    }

    /// The calendar gives the order a plain heap of (time, insertion) gives,
    /// with pushes between pops, near and far times, and ties.
    #[test]
    fn same_order_as_a_sorted_heap() {
        let mut rng = crate::rng::SplitMix64::new(5);
        let mut q = EventQueue::default();
        let mut reference = BinaryHeap::new();
        let mut now = 0u64;
        let mut seq = 0u64;
        for round in 0..20_000u64 {
            let pushes = rng.next() % 3;
            for _ in 0..pushes {
                let r = rng.next();
                let dt = match r % 4 {
                    0 => 0,
                    1 => r % 300,
                    2 => r % 20_000_000,
                    _ => r % 200_000_000,
                };
                q.push(now + dt, round);
                reference.push(Entry {
                    at: now + dt,
                    seq,
                    ev: round,
                });
                seq += 1;
            }
            if rng.next().is_multiple_of(2) {
                let a = q.pop();
                let b = reference.pop().map(|e| (e.at, e.ev));
                assert_eq!(a, b);
                if let Some((t, _)) = a {
                    assert!(t >= now);
                    now = t;
                }
            }
            assert_eq!(q.len(), reference.len());
        }
        while let Some(b) = reference.pop() {
            assert_eq!(q.pop(), Some((b.at, b.ev)));
        }
        assert!(q.is_empty() && q.pop().is_none());
    }
}
