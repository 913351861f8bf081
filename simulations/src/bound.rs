//! The Kumar-Ross lower bound on the time to bring a file of `F` bytes from one
//! seed to every one of N peers: T >= max(F/u_s, F/d_min, N F / (u_s + sum u_i)).
//! No schedule, however clever, can finish earlier (the seed must send every
//! byte at least once; the slowest downlink must receive F; N F bytes must
//! cross the uplinks).

/// Seconds, for capacities in bytes/s.
pub fn kumar_ross(file: f64, seed_up: f64, peer_up: &[f64], peer_down: &[f64]) -> f64 {
    let n = peer_up.len() as f64;
    let d_min = peer_down.iter().cloned().fold(f64::INFINITY, f64::min);
    let sum_up: f64 = peer_up.iter().sum();
    (file / seed_up)
        .max(file / d_min)
        .max(n * file / (seed_up + sum_up))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchors_topology_bound_is_file_over_seed_uplink() {
        // docs/bench/swarm.md: 64 MiB, seed 8 Mbit/s, 8 peers 8/50: 67.1 s
        let f = 64.0 * 1024.0 * 1024.0;
        let b = kumar_ross(f, 1e6, &[1e6; 8], &[6.25e6; 8]);
        assert!((b - 67.108864).abs() < 1e-6, "{b}");
    }
}
