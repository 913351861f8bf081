//! Sans-IO swarm scheduler: which chunk, from whom, when.
//!
//! [`Leecher`] runs on a fetching seller (rarest-first, pipelining, endgame,
//! rate-scaled timeouts, bans); [`Seeder`] runs on the buyer, the sole seed
//! (super-seeding that keeps its uplink busy); [`ManifestWait`] and
//! [`FetchTimers`] hold a fetch's waits (manifest redirect fallback, provider
//! lookup backoff, starving notes, progress reports, stall). None of them reads a
//! clock or touches the network: the I/O shell (node/src/p2p) or a simulator feeds
//! events and `now` (microseconds on any monotonic base) in and carries the
//! actions out.

mod bitfield;
mod leecher;
mod seeder;
#[cfg(test)]
mod sim;
mod timers;
mod upload;

pub use bitfield::Bitfield;
pub use leecher::{Action, Leecher, LeecherConfig, PeerKind, PieceOrder};
pub use seeder::{Decision, SeedAction, Seeder, SeederConfig};
pub use timers::{FetchAction, FetchTimers, ManifestAction, ManifestWait, TimerConfig};
pub use upload::{admit, LeaveClock, UploadConfig, UploadPacer, ADMIT_WAIT_US};

/// Microseconds since an arbitrary origin chosen by the driver.
pub type Micros = u64;

/// Small deterministic RNG (SplitMix64) so a simulation replays exactly from its seed.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// Next 64 random bits.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}
