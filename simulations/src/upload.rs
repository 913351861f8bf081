//! A node's upload side as node/src/p2p/link.rs runs it: chunk replies wait in
//! a queue until the node's upload budget (unacknowledged chunk bytes) has
//! room, rarest first. The budget here follows the link's nominal rate rather
//! than the measured one (the simulated link delivers exactly that rate).

/// Budget of a super-seed: 2 s of its uplink, at least 2 MiB (link.rs SEED).
pub fn seed_budget(up: f64) -> u64 {
    ((2.0 * up) as u64).clamp(2 << 20, MAX_BUDGET)
}

/// Budget of a relaying seller: 0.4 s of its uplink, at least 384 KiB (RELAY).
pub fn relay_budget(up: f64) -> u64 {
    ((0.4 * up) as u64).clamp(384 << 10, MAX_BUDGET)
}

const MAX_BUDGET: u64 = 32 << 20;

/// Priority of a reply with nothing to tell it apart (link.rs ORDINARY).
pub const ORDINARY: u32 = u32::MAX;

/// A reply waiting for budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waiting {
    pub prio: u32,
    pub seq: u32,
    pub to: u32,
    pub chunk: u32,
}

/// One node's upload queue and budget.
#[derive(Debug, Default)]
pub struct Upload {
    pub limit: u64,
    pub in_flight: u64,
    queue: Vec<Waiting>,
    seq: u32,
}

impl Upload {
    pub fn new(limit: u64) -> Self {
        Upload {
            limit,
            ..Default::default()
        }
    }

    /// Queues a reply.
    pub fn push(&mut self, to: u32, chunk: u32, prio: u32) {
        self.queue.push(Waiting {
            prio,
            seq: self.seq,
            to,
            chunk,
        });
        self.seq = self.seq.wrapping_add(1);
    }

    /// The next reply to start, if the budget has room: lowest priority value,
    /// then oldest.
    pub fn next_ready(&mut self) -> Option<Waiting> {
        if self.in_flight >= self.limit || self.queue.is_empty() {
            return None;
        }
        let (i, _) = self
            .queue
            .iter()
            .enumerate()
            .min_by_key(|(_, w)| (w.prio, w.seq))?;
        Some(self.queue.remove(i))
    }

    /// Drops a queued reply (cancelled before it started); true if it was queued.
    pub fn cancel(&mut self, to: u32, chunk: u32) -> bool {
        match self
            .queue
            .iter()
            .position(|w| w.to == to && w.chunk == chunk)
        {
            Some(i) => {
                self.queue.remove(i);
                true
            }
            None => false,
        }
    }

    /// Drops every reply queued for `to`; returns their chunks.
    pub fn drop_peer(&mut self, to: u32) -> Vec<u32> {
        let mut out = Vec::new();
        self.queue.retain(|w| {
            if w.to == to {
                out.push(w.chunk);
                false
            } else {
                true
            }
        });
        out
    }

    /// Bytes of the replies waiting for budget.
    pub fn waiting_bytes(&self, sizes: &[u32]) -> u64 {
        self.queue
            .iter()
            .map(|w| sizes[w.chunk as usize] as u64)
            .sum()
    }

    /// Replies waiting.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Forgets everything (the node went away).
    pub fn clear(&mut self) {
        self.queue.clear();
        self.in_flight = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rarest_first_within_budget() {
        let mut u = Upload::new(100);
        u.push(1, 10, ORDINARY);
        u.push(2, 11, 3);
        u.push(3, 12, 3);
        assert_eq!(u.next_ready().map(|w| w.chunk), Some(11));
        u.in_flight = 100;
        assert_eq!(u.next_ready(), None, "budget full");
        u.in_flight = 0;
        assert!(u.cancel(3, 12));
        assert_eq!(u.next_ready().map(|w| w.chunk), Some(10));
    }
}
