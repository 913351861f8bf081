//! The sole seed (the buyer): super-seeding that keeps the uplink busy.
//!
//! The seed's uplink is the bottleneck (Kumar-Ross: F/u_s), so it must push every
//! byte once, at full rate, and never twice. It does not show peers its full
//! have-set: it *offers* each never-sent chunk to exactly one peer, a few at a time
//! per peer so its uplink always has queued work, and tops a peer up as soon as that
//! peer announces it holds an offered chunk. Peers then spread the chunk among
//! themselves. The seed re-sends a chunk only if every holder left, or, within a
//! small byte budget, when its uplink would otherwise sit idle at the end.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;
use std::hash::Hash;

use super::{Bitfield, Micros};

/// A pause in a peer's starving notes longer than this starts a new run.
const STARVING_GAP_US: Micros = 2_000_000;

/// What the shell must do next for the seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SeedAction<P> {
    /// Tell `peer` (and only it) that we have `chunk`: it should request it from us.
    Offer { peer: P, chunk: u32 },
}

/// The seed's answer to a chunk request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send the chunk.
    Serve,
    /// Not offered to this peer: answer "not here", it will find it at a peer.
    Refuse,
}

/// Tuning knobs.
#[derive(Clone, Debug)]
pub struct SeederConfig {
    /// Chunks offered to one peer and not yet confirmed. Enough that the uplink stays
    /// busy across a round trip with all peers together.
    pub offer_depth: usize,
    /// Bytes the seed may send beyond one copy of the image, as a fraction of it,
    /// to fill otherwise idle uplink at the end.
    pub extra_fraction: f64,
    /// The uplink counts as idle only this long (us) after the last reply was
    /// reported sent.
    pub idle_grace_us: Micros,
    /// Offers per peer once few chunks are left to hand out.
    pub end_offer_depth: usize,
    /// Bytes the seed feeds starving peers at once, as a fraction of the image.
    /// Beyond it, only a peer starving without a break for `stuck_after_us` is
    /// fed: in a large swarm a seller's neighbours often lack what it misses for
    /// a while, and feeding every such pause sent the image 2.4 times over
    /// (simulator, 300 sellers); a peer whose sources were all banned stays
    /// starving and is still fed.
    pub starving_fraction: f64,
    pub stuck_after_us: Micros,
}

impl Default for SeederConfig {
    fn default() -> Self {
        SeederConfig {
            offer_depth: 4,
            extra_fraction: 0.02,
            idle_grace_us: 500_000,
            end_offer_depth: 4,
            starving_fraction: 0.05,
            stuck_after_us: 5_000_000,
        }
    }
}

#[derive(Debug)]
struct SeedPeer<P> {
    id: P,
    has: Bitfield,
    /// Offered to it, not yet announced as held by it.
    offered: Vec<u32>,
    /// Requests being answered now.
    serving: Vec<u32>,
    /// It said it has nothing to fetch from anyone (e.g. its other sources
    /// were banned): feed it once, outside the extra budget.
    starving: bool,
    /// First and last note of its current run of starving notes.
    starving_first: Micros,
    starving_last: Micros,
}

/// Per-image super-seeding state.
pub struct Seeder<P> {
    cfg: SeederConfig,
    sizes: Vec<u32>,
    total: u64,
    /// Live peers holding each chunk.
    holders: Vec<u32>,
    /// Times each chunk was served.
    sent: Vec<u32>,
    /// Live peers each chunk is offered to.
    assigned: Vec<u32>,
    /// Chunks to hand out: never sent, or lost with every holder.
    unsent: VecDeque<u32>,
    queued: Bitfield,
    peers: Vec<Option<SeedPeer<P>>>,
    free: Vec<usize>,
    /// Only looked up, never iterated.
    index: FxHashMap<P, usize>,
    bytes_sent: u64,
    extra_bytes: u64,
    /// Bytes offered to starving peers.
    starving_bytes: u64,
    serving_total: usize,
    last_sent: Micros,
    actions: VecDeque<SeedAction<P>>,
    rr: usize,
}

impl<P: Clone + Eq + Hash + std::fmt::Debug> Seeder<P> {
    /// Seeds an image whose chunks have `sizes` (all present locally).
    pub fn new(sizes: Vec<u32>, cfg: SeederConfig) -> Self {
        let n = sizes.len();
        Seeder {
            cfg,
            total: sizes.iter().map(|&s| s as u64).sum(),
            holders: vec![0; n],
            sent: vec![0; n],
            assigned: vec![0; n],
            unsent: (0..n as u32).collect(),
            queued: Bitfield::full(n as u32),
            sizes,
            peers: Vec::new(),
            free: Vec::new(),
            index: FxHashMap::default(),
            bytes_sent: 0,
            extra_bytes: 0,
            starving_bytes: 0,
            serving_total: 0,
            last_sent: 0,
            actions: VecDeque::new(),
            rr: 0,
        }
    }

    /// Chunk bytes the seed agreed to send.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    /// Of those, bytes beyond the first copy of each chunk.
    pub fn extra_bytes(&self) -> u64 {
        self.extra_bytes
    }

    /// Bytes offered to starving peers.
    pub fn starving_bytes(&self) -> u64 {
        self.starving_bytes
    }

    /// True when every chunk has been sent at least once.
    pub fn first_copy_done(&self) -> bool {
        self.sent.iter().all(|&s| s > 0)
    }

    /// A peer joined with have-set `has` (a known peer's set is replaced).
    pub fn add_peer(&mut self, p: P, has: Bitfield, _now: Micros) {
        if has.len() as usize != self.sizes.len() {
            return;
        }
        if self.index.contains_key(&p) {
            self.remove_peer(&p);
        }
        for i in has.iter_ones() {
            self.holders[i as usize] += 1;
        }
        let slot = SeedPeer {
            id: p.clone(),
            has,
            offered: Vec::new(),
            serving: Vec::new(),
            starving: false,
            starving_first: 0,
            starving_last: 0,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.peers[i] = Some(slot);
                i
            }
            None => {
                self.peers.push(Some(slot));
                self.peers.len() - 1
            }
        };
        self.index.insert(p, i);
    }

    /// `p` announced it now holds `idx`.
    pub fn peer_have(&mut self, p: &P, idx: u32, _now: Micros) {
        let Some(&i) = self.index.get(p) else { return };
        if idx as usize >= self.sizes.len() {
            return;
        }
        let s = self.peers[i].as_mut().expect("indexed");
        if s.has.set(idx) {
            self.holders[idx as usize] += 1;
        }
        if let Some(pos) = s.offered.iter().position(|&c| c == idx) {
            s.offered.swap_remove(pos);
            self.assigned[idx as usize] -= 1;
        }
    }

    fn requeue_if_lost(&mut self, idx: u32) {
        let u = idx as usize;
        if self.holders[u] == 0 && self.assigned[u] == 0 && self.queued.set(idx) {
            // lost chunks go first: somebody still needs them and only we have them
            self.unsent.push_front(idx);
        }
    }

    /// `p` says it has nothing to fetch from anyone: it gets chunks straight from
    /// the seed (up to `offer_depth`), even beyond the extra budget. A peer
    /// whose other sources are all banned or gone would otherwise stall.
    pub fn peer_starving(&mut self, p: &P, now: Micros) {
        if let Some(&i) = self.index.get(p) {
            let s = self.peers[i].as_mut().expect("indexed");
            // notes come every fraction of a second while it starves: a gap
            // means it found work in between
            if s.starving_last == 0 || now.saturating_sub(s.starving_last) > STARVING_GAP_US {
                s.starving_first = now;
            }
            s.starving = true;
            s.starving_last = now;
        }
    }

    /// `p` left; chunks only it held (or was offered) are handed out again.
    pub fn remove_peer(&mut self, p: &P) {
        let Some(i) = self.index.remove(p) else {
            return;
        };
        let s = self.peers[i].take().expect("indexed");
        self.free.push(i);
        self.serving_total -= s.serving.len();
        for idx in s.has.iter_ones() {
            self.holders[idx as usize] -= 1;
        }
        for &idx in &s.offered {
            self.assigned[idx as usize] -= 1;
        }
        for idx in s.has.iter_ones().chain(s.offered.iter().copied()) {
            self.requeue_if_lost(idx);
        }
    }

    /// `p` asks for chunk `idx`. Serve only what was offered to it; the shell must
    /// call [`Seeder::on_sent`] when the reply is out (or failed).
    pub fn on_request(&mut self, p: &P, idx: u32, _now: Micros) -> Decision {
        let Some(&i) = self.index.get(p) else {
            return Decision::Refuse;
        };
        let s = self.peers[i].as_mut().expect("indexed");
        if !s.offered.contains(&idx) || s.serving.contains(&idx) {
            return Decision::Refuse;
        }
        s.serving.push(idx);
        self.serving_total += 1;
        let size = self.sizes[idx as usize] as u64;
        self.bytes_sent += size;
        self.sent[idx as usize] += 1;
        if self.sent[idx as usize] > 1 {
            self.extra_bytes += size;
        }
        Decision::Serve
    }

    /// The reply to `p` for `idx` was handed to the network (`delivered`), or
    /// failed. A delivered chunk counts as held by `p` right away: the next offer
    /// goes out without waiting for its Have, which keeps the uplink queue full
    /// and spares the seed's uplink one round of messages per chunk.
    pub fn on_sent(&mut self, p: &P, idx: u32, delivered: bool, now: Micros) {
        self.last_sent = self.last_sent.max(now);
        let Some(&i) = self.index.get(p) else { return };
        let s = self.peers[i].as_mut().expect("indexed");
        if let Some(pos) = s.serving.iter().position(|&c| c == idx) {
            s.serving.swap_remove(pos);
            self.serving_total -= 1;
        }
        if delivered {
            if s.has.set(idx) {
                self.holders[idx as usize] += 1;
            }
            if let Some(pos) = s.offered.iter().position(|&c| c == idx) {
                s.offered.swap_remove(pos);
                self.assigned[idx as usize] -= 1;
            }
        }
    }

    fn offer(&mut self, i: usize, idx: u32) {
        let s = self.peers[i].as_mut().expect("live");
        s.offered.push(idx);
        self.assigned[idx as usize] += 1;
        self.actions.push_back(SeedAction::Offer {
            peer: s.id.clone(),
            chunk: idx,
        });
    }

    /// Hands out offers. Call after every event.
    pub fn poll(&mut self, now: Micros) {
        let n = self.peers.len();
        if n == 0 {
            return;
        }
        self.rr = (self.rr + 1) % n;
        // first copies: every peer keeps `offer_depth` distinct never-sent chunks.
        // Near the end, one each: the last chunks then trickle out one by one and
        // start spreading, instead of all landing at once and queueing at the
        // peers' uplinks (that burst is the tail after the seed falls silent).
        let depth = if self.unsent.len() <= self.index.len() * self.cfg.offer_depth {
            self.cfg.end_offer_depth
        } else {
            self.cfg.offer_depth
        };
        // (nothing to hand out: no peer needs visiting; 100,000 of them made
        // this loop a tenth of a simulated swarm's time)
        for k in 0..if self.unsent.is_empty() { 0 } else { n } {
            let i = (self.rr + k) % n;
            while let Some(s) = self.peers[i].as_ref() {
                if s.offered.len() >= depth || s.has.is_full() {
                    break;
                }
                let Some(idx) = self.unsent.pop_front() else {
                    break;
                };
                self.queued.clear(idx);
                if self.holders[idx as usize] > 0 || self.assigned[idx as usize] > 0 {
                    continue; // someone has it (e.g. from an older version): peers share it
                }
                if self.peers[i].as_ref().expect("live").has.get(idx) {
                    continue;
                }
                self.offer(i, idx);
            }
        }
        if !self.unsent.is_empty() {
            return;
        }
        // starving peers: fed directly once the uplink is idle, whatever the
        // budget (one round per signal)
        let idle =
            self.serving_total == 0 && now.saturating_sub(self.last_sent) >= self.cfg.idle_grace_us;
        for k in 0..n {
            if !idle {
                break;
            }
            let i = (self.rr + k) % n;
            let Some(s) = self.peers[i].as_ref() else {
                continue;
            };
            if !s.starving {
                continue;
            }
            if now.saturating_sub(s.starving_last) > STARVING_GAP_US {
                // it stopped saying so (a note is old news once the first
                // copies are out, which takes minutes in a large swarm)
                self.peers[i].as_mut().expect("live").starving = false;
                continue;
            }
            let budget = (self.total as f64 * self.cfg.starving_fraction) as u64;
            if self.starving_bytes >= budget
                && now.saturating_sub(s.starving_first) < self.cfg.stuck_after_us
            {
                continue; // may find work among its peers yet
            }
            while let Some(s) = self.peers[i].as_ref() {
                if s.has.is_full() || s.offered.len() >= self.cfg.offer_depth {
                    break;
                }
                let best = (0..self.sizes.len() as u32)
                    .filter(|&c| !s.has.get(c) && !s.offered.contains(&c))
                    .min_by_key(|&c| (self.assigned[c as usize], self.holders[c as usize], c));
                let Some(c) = best else { break };
                self.starving_bytes += self.sizes[c as usize] as u64;
                self.offer(i, c);
            }
            self.peers[i].as_mut().expect("live").starving = false;
        }
        // the end: nothing left to hand out and the uplink is idle. Spend a little
        // of the extra budget on the scarcest chunks the slowest peers still lack.
        if self.serving_total > 0 || now.saturating_sub(self.last_sent) < self.cfg.idle_grace_us {
            return;
        }
        let budget = (self.total as f64 * self.cfg.extra_fraction) as u64;
        for k in 0..n {
            let i = (self.rr + k) % n;
            let Some(s) = self.peers[i].as_ref() else {
                continue;
            };
            if !s.offered.is_empty() || s.has.is_full() {
                continue;
            }
            let best = (0..self.sizes.len() as u32)
                .filter(|&c| !s.has.get(c))
                .min_by_key(|&c| (self.assigned[c as usize], self.holders[c as usize], c));
            let Some(c) = best else { continue };
            let planned: u64 = self
                .peers
                .iter()
                .flatten()
                .flat_map(|p| p.offered.iter())
                .filter(|&&o| self.sent[o as usize] > 0)
                .map(|&o| self.sizes[o as usize] as u64)
                .sum();
            if self.extra_bytes + planned + self.sizes[c as usize] as u64 > budget {
                break;
            }
            self.offer(i, c);
        }
    }

    /// Next action for the shell, if any.
    pub fn next_action(&mut self) -> Option<SeedAction<P>> {
        self.actions.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offers(s: &mut Seeder<u32>) -> Vec<(u32, u32)> {
        std::iter::from_fn(|| s.next_action())
            .map(|SeedAction::Offer { peer, chunk }| (peer, chunk))
            .collect()
    }

    #[test]
    fn each_chunk_offered_to_one_peer_first() {
        let mut s = Seeder::new(
            vec![100; 40],
            SeederConfig {
                offer_depth: 2,
                ..Default::default()
            },
        );
        for p in 0..3 {
            s.add_peer(p, Bitfield::new(40), 0);
        }
        s.poll(0);
        let o = offers(&mut s);
        assert_eq!(o.len(), 6);
        let mut chunks: Vec<u32> = o.iter().map(|x| x.1).collect();
        chunks.sort();
        chunks.dedup();
        assert_eq!(chunks.len(), 6, "distinct chunks: {o:?}");
        // only the offered peer is served
        let (p, c) = o[0];
        let other = (p + 1) % 3;
        assert_eq!(s.on_request(&other, c, 0), Decision::Refuse);
        assert_eq!(s.on_request(&p, c, 0), Decision::Serve);
        assert_eq!(
            s.on_request(&p, c, 0),
            Decision::Refuse,
            "duplicate while serving"
        );
        s.on_sent(&p, c, true, 0);
        s.peer_have(&p, c, 0);
        s.poll(1);
        let more = offers(&mut s);
        assert_eq!(more.len(), 1);
        assert_eq!(more[0].0, p);
        assert_eq!(s.extra_bytes(), 0);
    }

    #[test]
    fn lost_chunk_is_handed_out_again() {
        let mut s = Seeder::new(
            vec![100; 2],
            SeederConfig {
                offer_depth: 1,
                extra_fraction: 0.0,
                idle_grace_us: 0,
                end_offer_depth: 1,
                ..Default::default()
            },
        );
        s.add_peer(1, Bitfield::new(2), 0);
        s.add_peer(2, Bitfield::new(2), 0);
        s.poll(0);
        let o = offers(&mut s);
        let (p1c, p2c) = (
            o.iter().find(|x| x.0 == 1).unwrap().1,
            o.iter().find(|x| x.0 == 2).unwrap().1,
        );
        assert_eq!(s.on_request(&1, p1c, 0), Decision::Serve);
        s.on_sent(&1, p1c, true, 0);
        s.peer_have(&1, p1c, 0);
        // peer 1 vanishes before anyone copied its chunk
        s.remove_peer(&1);
        s.peer_have(&2, p2c, 0);
        s.poll(1);
        assert_eq!(offers(&mut s), vec![(2, p1c)]);
    }

    #[test]
    fn chunks_peers_already_hold_are_not_sent() {
        let mut s = Seeder::new(vec![100; 4], SeederConfig::default());
        let mut has = Bitfield::new(4);
        has.set(0);
        has.set(1);
        s.add_peer(1, has, 0);
        s.add_peer(2, Bitfield::new(4), 0);
        s.poll(0);
        let o = offers(&mut s);
        assert!(o.iter().all(|&(_, c)| c >= 2), "{o:?}");
    }

    #[test]
    fn idle_tail_spends_bounded_extra() {
        let mut s = Seeder::new(
            vec![100; 10],
            SeederConfig {
                offer_depth: 2,
                extra_fraction: 0.1,
                idle_grace_us: 0,
                end_offer_depth: 1,
                ..Default::default()
            },
        );
        s.add_peer(1, Bitfield::full(10), 0);
        s.add_peer(2, Bitfield::new(10), 0);
        s.poll(0);
        // everything is held by peer 1; seed idle: peer 2 may get one extra chunk (10%)
        let o = offers(&mut s);
        assert_eq!(o.len(), 1, "{o:?}");
        let c = o[0].1;
        assert_eq!(s.on_request(&2, c, 0), Decision::Serve);
        assert_eq!(s.extra_bytes(), 0, "first time the seed sends it");
    }

    #[test]
    fn starving_peer_is_fed_beyond_the_budget() {
        // peer 1 claims everything but (say) was banned by peer 2: peer 2 gets
        // nothing from anyone else and says so; the seed feeds it once it has
        // starved without a break for `stuck_after_us`
        let cfg = SeederConfig {
            offer_depth: 2,
            extra_fraction: 0.0,
            idle_grace_us: 0,
            end_offer_depth: 1,
            starving_fraction: 0.0,
            stuck_after_us: 1_000_000,
        };
        let mut s = Seeder::new(vec![100; 10], cfg);
        s.add_peer(1, Bitfield::full(10), 0);
        s.add_peer(2, Bitfield::new(10), 0);
        s.poll(10);
        assert!(offers(&mut s).is_empty(), "not starving yet, no budget");
        let mut got = 0;
        let mut now = 2000;
        while got < 10 && now < 60_000_000 {
            s.peer_starving(&2, now);
            s.poll(now);
            let o = offers(&mut s);
            if !o.is_empty() {
                assert!(now >= 1_000_000, "fed after {now} us of starving");
            }
            for (p, c) in o {
                assert_eq!(p, 2);
                assert_eq!(s.on_request(&2, c, now), Decision::Serve);
                s.on_sent(&2, c, true, now);
                s.peer_have(&2, c, now);
                got += 1;
            }
            now += 200_000;
        }
        assert_eq!(got, 10, "fed the whole image");
    }

    #[test]
    fn short_starving_pauses_are_fed_within_a_budget_only() {
        let cfg = SeederConfig {
            idle_grace_us: 0,
            starving_fraction: 0.2,
            ..Default::default()
        };
        let mut s = Seeder::new(vec![100; 10], cfg);
        s.add_peer(1, Bitfield::full(10), 0);
        s.add_peer(2, Bitfield::new(10), 0);
        s.poll(10);
        let mut got = 0;
        // notes with 3 s gaps: never a run of 5 s
        for k in 1..20u64 {
            let now = k * 3_000_000;
            s.peer_starving(&2, now);
            s.poll(now);
            for (_, c) in offers(&mut s) {
                assert_eq!(s.on_request(&2, c, now), Decision::Serve);
                s.on_sent(&2, c, true, now);
                got += 1;
            }
        }
        assert!(
            got > 0 && got <= 2 + 4,
            "fed {got} chunks: the 20 % budget and one round"
        );
    }
}
