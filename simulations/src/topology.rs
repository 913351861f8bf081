//! The simulated population built from a scenario and its seed: link capacities,
//! latencies, who neighbours whom, chunk sizes. Node 0 is the buyer, 1..=N the
//! sellers.

use crate::bound::kumar_ross;
use crate::rng::{below, shuffle, unit, SplitMix64};
use crate::scenario::{mbit, Scenario};

/// Fixed facts of one run.
#[derive(Clone, Debug)]
pub struct World {
    pub n: usize,
    pub sizes: Vec<u32>,
    pub total: u64,
    /// Capacities after goodput, bytes/s, per node (0 = buyer).
    pub up: Vec<f64>,
    pub down: Vec<f64>,
    /// One-way access latency, microseconds.
    pub lat_us: Vec<u32>,
    /// Each seller's neighbours (sellers only; every seller also knows the buyer).
    pub neigh: Vec<Vec<u32>>,
    /// Index into `profiles` per seller (0 for the buyer's slot).
    pub profile: Vec<u8>,
    pub profiles: Vec<String>,
    pub goodput: f64,
}

impl World {
    /// Builds the population of `sc` with `n` sellers.
    pub fn build(sc: &Scenario, n: usize) -> World {
        let mut rng = SplitMix64::new(sc.seed ^ 0x5157_0000_0000_0000);
        let total = sc.image_bytes();
        let sizes = match sc.image.chunk_kib {
            Some(k) => fixed_sizes(total, k as u64 * 1024),
            None => cdc_sizes(total, sc.seed),
        };
        // profiles in exact proportions, then shuffled over the sellers
        let share_sum: f64 = sc.links.iter().map(|l| l.share).sum();
        let mut assign: Vec<u8> = Vec::with_capacity(n);
        let mut acc = 0.0;
        for (i, l) in sc.links.iter().enumerate() {
            acc += l.share / share_sum;
            let upto = if i + 1 == sc.links.len() {
                n
            } else {
                (acc * n as f64).round() as usize
            };
            while assign.len() < upto.min(n) {
                assign.push(i as u8);
            }
        }
        shuffle(&mut rng, &mut assign);
        let g = sc.goodput;
        let mut up = vec![mbit(sc.buyer.up_mbit) * g];
        let mut down = vec![mbit(sc.buyer.down_mbit) * g];
        let mut lat_us = vec![(sc.buyer.latency_ms * 1000.0) as u32];
        let mut profile = vec![0u8];
        for &p in &assign {
            let l = &sc.links[p as usize];
            up.push(mbit(l.up_mbit) * g);
            down.push(mbit(l.down_mbit) * g);
            let ms = sc.latency.min_ms + unit(&mut rng) * (sc.latency.max_ms - sc.latency.min_ms);
            lat_us.push((ms * 1000.0) as u32);
            profile.push(p);
        }
        let neigh = neighbours(n, sc.degree, &mut rng);
        World {
            n,
            total: sizes.iter().map(|&s| s as u64).sum(),
            sizes,
            up,
            down,
            lat_us,
            neigh,
            profile,
            profiles: sc.links.iter().map(|l| l.name.clone()).collect(),
            goodput: g,
        }
    }

    /// One-way latency between two nodes, microseconds.
    pub fn lat(&self, a: u32, b: u32) -> u64 {
        self.lat_us[a as usize] as u64 + self.lat_us[b as usize] as u64
    }

    /// The Kumar-Ross bound on the capacities the simulator uses (seconds).
    pub fn bound(&self) -> f64 {
        kumar_ross(
            self.total as f64,
            self.up[0],
            &self.up[1..],
            &self.down[1..],
        )
    }

    /// The bound on the nominal link rates (without the goodput factor), as the
    /// real benchmark states it.
    pub fn nominal_bound(&self) -> f64 {
        self.bound() * self.goodput
    }
}

/// A random graph where each seller links to about `degree` others (each picks
/// degree/2, links are symmetric); a full mesh when `degree >= n - 1`.
fn neighbours(n: usize, degree: usize, rng: &mut SplitMix64) -> Vec<Vec<u32>> {
    let mut g: Vec<Vec<u32>> = vec![Vec::new(); n + 1];
    if degree + 1 >= n {
        for (i, v) in g.iter_mut().enumerate().skip(1) {
            *v = (1..=n as u32).filter(|&j| j as usize != i).collect();
        }
        return g;
    }
    let picks = degree.div_ceil(2);
    for i in 1..=n as u32 {
        let mut k = 0;
        while k < picks {
            let j = 1 + below(rng, n as u64) as u32;
            if j == i || g[i as usize].contains(&j) {
                continue;
            }
            g[i as usize].push(j);
            g[j as usize].push(i);
            k += 1;
        }
    }
    for v in g.iter_mut() {
        v.sort_unstable();
        v.dedup();
        v.shrink_to_fit();
    }
    g
}

/// Fixed-size chunks (the last one shorter).
pub fn fixed_sizes(total: u64, size: u64) -> Vec<u32> {
    let mut out = Vec::new();
    let mut left = total;
    while left > 0 {
        let s = left.min(size);
        out.push(s as u32);
        left -= s;
    }
    out
}

/// FastCDC-like sizes: 16..256 KiB around a 64 KiB mean, summing to `total`
/// (the same distribution as chunks::swarm's test simulation).
pub fn cdc_sizes(total: u64, seed: u64) -> Vec<u32> {
    let mut rng = SplitMix64::new(seed);
    let mut out = Vec::new();
    let mut left = total;
    while left > 0 {
        let u = unit(&mut rng);
        let s = (16384.0 - 49152.0 * (1.0 - u).ln()).min(262144.0) as u64;
        let s = s.min(left);
        out.push(s as u32);
        left -= s;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graph_is_symmetric_with_about_the_degree() {
        let mut r = SplitMix64::new(3);
        let g = neighbours(500, 20, &mut r);
        let mut sum = 0;
        for i in 1..=500u32 {
            for &j in &g[i as usize] {
                assert!(g[j as usize].contains(&i));
                assert_ne!(i, j);
            }
            sum += g[i as usize].len();
        }
        let avg = sum as f64 / 500.0;
        assert!((18.0..=21.0).contains(&avg), "{avg}");
    }

    #[test]
    fn sizes_sum_to_total() {
        assert_eq!(fixed_sizes(10, 4), vec![4, 4, 2]);
        let s = cdc_sizes(5 << 20, 1);
        assert_eq!(s.iter().map(|&x| x as u64).sum::<u64>(), 5 << 20);
        assert!(s.iter().all(|&x| x <= 256 * 1024));
    }
}
