//! Sliding anti-replay window over message counters (RFC 6479 style, as WireGuard).
//!
//! [`ReplayWindow::check`] never mutates, so a forged packet cannot move the window;
//! [`ReplayWindow::commit`] is called only after the AEAD tag verified.

const WORD_BITS: u64 = 64;
const WORDS: usize = 32;
/// Bits in the ring.
const RING_BITS: u64 = WORD_BITS * WORDS as u64;
/// Counters this far behind the highest accepted one are still accepted once.
pub const WINDOW: u64 = RING_BITS - WORD_BITS;

/// Replay state of one receiving key.
#[derive(Clone, Debug)]
pub struct ReplayWindow {
    /// Highest accepted counter + 1 (0: nothing accepted yet).
    next: u64,
    ring: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow {
            next: 0,
            ring: [0; WORDS],
        }
    }
}

impl ReplayWindow {
    /// A window that has accepted nothing.
    pub fn new() -> ReplayWindow {
        ReplayWindow::default()
    }

    /// Whether `counter` would be accepted (not seen, not too old).
    pub fn check(&self, counter: u64) -> bool {
        let Some(c) = counter.checked_add(1) else {
            return false;
        };
        if c > self.next {
            return true;
        }
        if c.saturating_add(WINDOW) < self.next {
            return false;
        }
        let (word, bit) = Self::slot(c);
        self.ring[word] & (1 << bit) == 0
    }

    /// Records `counter` as received. Returns false (and changes nothing) if it would
    /// not pass [`ReplayWindow::check`].
    pub fn commit(&mut self, counter: u64) -> bool {
        if !self.check(counter) {
            return false;
        }
        let c = counter + 1;
        if c > self.next {
            // Clear the words between the old top and the new one.
            let old_word = self.next / WORD_BITS;
            let new_word = c / WORD_BITS;
            let clear = (new_word - old_word).min(WORDS as u64);
            for i in 1..=clear {
                self.ring[((old_word + i) % WORDS as u64) as usize] = 0;
            }
            self.next = c;
        }
        let (word, bit) = Self::slot(c);
        self.ring[word] |= 1 << bit;
        true
    }

    /// Highest accepted counter, if any.
    pub fn highest(&self) -> Option<u64> {
        self.next.checked_sub(1)
    }

    fn slot(c: u64) -> (usize, u64) {
        (((c / WORD_BITS) % WORDS as u64) as usize, c % WORD_BITS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn duplicate_old_reordered_far_ahead() {
        let mut w = ReplayWindow::new();
        assert!(w.commit(0));
        assert!(!w.commit(0), "duplicate");
        assert!(w.commit(5));
        assert!(w.commit(3), "reordered within window");
        assert!(!w.commit(3));
        assert!(w.commit(1_000_000), "far ahead");
        assert!(!w.check(5), "now too old");
        assert!(w.commit(1_000_000 - WINDOW), "oldest still in window");
        assert!(!w.commit(1_000_000 - WINDOW - 1), "just outside window");
        assert!(w.commit(999_999));
        assert!(!w.commit(u64::MAX), "counter overflow rejected");
    }

    #[test]
    fn window_is_at_least_1024() {
        const { assert!(WINDOW >= 1024) };
        let mut w = ReplayWindow::new();
        assert!(w.commit(5000));
        for c in (5000 - 1024..5000).rev() {
            assert!(w.commit(c), "{c}");
        }
    }

    #[test]
    fn check_does_not_mutate() {
        let mut w = ReplayWindow::new();
        assert!(w.check(10_000));
        assert!(w.commit(3));
        assert!(w.check(10_000));
        assert!(
            w.commit(4),
            "a checked-but-uncommitted far counter must not move the window"
        );
    }

    proptest! {
        /// Against a model: accept iff unseen and within WINDOW of the highest accepted.
        #[test]
        fn matches_model(ops in proptest::collection::vec((0u64..6000, any::<bool>()), 1..400)) {
            let mut w = ReplayWindow::new();
            let mut seen = BTreeSet::new();
            let mut highest: Option<u64> = None;
            for (c, far) in ops {
                let c = if far { c * 1000 } else { c };
                let model = !seen.contains(&c) && highest.is_none_or(|h| c + WINDOW >= h);
                prop_assert_eq!(w.check(c), model, "counter {}", c);
                prop_assert_eq!(w.commit(c), model);
                if model {
                    seen.insert(c);
                    highest = Some(highest.map_or(c, |h| h.max(c)));
                }
                prop_assert_eq!(w.highest(), highest);
            }
        }
    }
}
