//! Seeded randomness for scenarios: the swarm core's own SplitMix64, so a run
//! replays bit for bit from its seed.

pub use chunks::swarm::SplitMix64;

/// Uniform in [0, 1).
pub fn unit(r: &mut SplitMix64) -> f64 {
    (r.next() >> 11) as f64 / (1u64 << 53) as f64
}

/// Uniform integer in [0, n).
pub fn below(r: &mut SplitMix64, n: u64) -> u64 {
    r.next() % n.max(1)
}

/// Exponentially distributed with the given mean.
pub fn exponential(r: &mut SplitMix64, mean: f64) -> f64 {
    -mean * (1.0 - unit(r)).ln()
}

/// Fisher-Yates shuffle.
pub fn shuffle<T>(r: &mut SplitMix64, v: &mut [T]) {
    for i in (1..v.len()).rev() {
        let j = below(r, i as u64 + 1) as usize;
        v.swap(i, j);
    }
}
