//! Figures of one run: completion percentiles as multiples of the bound, the
//! buyer's bytes as a multiple of what had to be fetched, bytes moved.

use crate::swarm::RunResult;

/// The headline numbers of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub finished: usize,
    pub unfinished: usize,
    pub median_s: f64,
    pub p95_s: f64,
    pub max_s: f64,
    pub bound_s: f64,
    /// Buyer payload / bytes needed.
    pub buyer_x: f64,
    /// Everything moved (payload, duplicates included, and control messages) / bytes needed.
    pub moved_x: f64,
    pub moved_bytes: u64,
}

impl Summary {
    pub fn median_x(&self) -> f64 {
        self.median_s / self.bound_s
    }
    pub fn p95_x(&self) -> f64 {
        self.p95_s / self.bound_s
    }
    pub fn max_x(&self) -> f64 {
        self.max_s / self.bound_s
    }
}

/// Sorted completion times of the sellers that finished.
pub fn sorted_finish(r: &RunResult) -> Vec<f64> {
    let mut v: Vec<f64> = r.finish_s.iter().flatten().copied().collect();
    v.sort_by(f64::total_cmp);
    v
}

/// Nearest-rank percentile of sorted data (p in 0..=100).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Summarises `r`.
pub fn summarize(r: &RunResult) -> Summary {
    let v = sorted_finish(r);
    let need = r.needed_bytes.max(1) as f64;
    let moved = r.payload_bytes + r.control_bytes;
    Summary {
        finished: v.len(),
        unfinished: r.finish_s.len() - v.len() - r.gone,
        median_s: percentile(&v, 50.0),
        p95_s: percentile(&v, 95.0),
        max_s: v.last().copied().unwrap_or(f64::NAN),
        bound_s: r.bound_s,
        buyer_x: r.buyer_payload as f64 / need,
        moved_x: moved as f64 / need,
        moved_bytes: moved,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=20).map(|x| x as f64).collect();
        assert_eq!(percentile(&v, 50.0), 10.0);
        assert_eq!(percentile(&v, 95.0), 19.0);
        assert_eq!(percentile(&v, 100.0), 20.0);
        assert_eq!(percentile(&[3.0], 95.0), 3.0);
    }
}
