//! The fetching side: which chunk to request from which peer, and when to give up
//! on a request. Rarest-first with several requests in flight per peer, endgame,
//! rate-scaled timeouts, bans for bad data. Sans-IO: events and `now` in, actions out.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::hash::Hash;

use rustc_hash::FxHashMap;

use super::{Bitfield, Micros, SplitMix64};

/// What the I/O shell must do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action<P> {
    /// Ask `peer` for chunk `chunk`.
    Request { peer: P, chunk: u32 },
    /// The request is no longer wanted (got it elsewhere, or timed out). Advisory:
    /// a reply that still arrives is accepted if it verifies.
    Cancel { peer: P, chunk: u32 },
    /// `peer` sent data that failed its hash: never use it again for this image.
    Ban { peer: P },
    /// `peer` stopped making progress for too long; drop it from this fetch.
    Disconnect { peer: P },
    /// Every chunk is present.
    Complete,
}

/// How a peer hands out chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerKind {
    /// An ordinary peer: the pipeline depth is ours to size from its measured rate.
    Normal,
    /// A super-seed: it advertises only the chunks it wants us to take from it and
    /// paces those itself, so everything it offers is requested at once.
    SuperSeed,
}

/// How a leecher chooses among the wanted chunks a peer can serve. The node runs
/// [`PieceOrder::RarestFirst`]; a simulator compares it with [`PieceOrder::Random`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PieceOrder {
    /// Fewest holders first, ties broken by a random rank fixed per fetch.
    #[default]
    RarestFirst,
    /// The random rank alone: availability is ignored.
    Random,
}

/// Tuning knobs. Defaults suit 16..256 KiB chunks on links from 1 Mbit/s up.
#[derive(Clone, Debug)]
pub struct LeecherConfig {
    /// Fewest requests kept in flight at a normal peer.
    pub min_depth: usize,
    /// Most requests kept in flight at a normal peer.
    pub max_depth: usize,
    /// Bytes in flight per peer aim at this much of its measured rate (us).
    pub window_us: u64,
    /// Fixed part of a stall timeout (us): covers round trips and start-up.
    pub base_timeout_us: u64,
    /// A peer is stalled when nothing arrived for `base + factor * outstanding / rate`.
    pub timeout_factor: u64,
    /// Rate assumed for a peer not yet measured, bytes/s. Deliberately low (under
    /// 1 Mbit/s) so a slow first chunk is not mistaken for a dead peer.
    pub assumed_rate: u64,
    /// Endgame: most concurrent requests for one chunk.
    pub max_dup: u8,
    /// Endgame starts only when at most this many chunks are missing (all in
    /// flight): earlier, duplicates would only load the peers' uplinks.
    pub endgame_chunks: usize,
    /// Consecutive timeouts before a peer is dropped.
    pub max_strikes: u32,
    /// Nothing to request from anyone for this long (us) means starving.
    pub starve_after_us: Micros,
}

impl Default for LeecherConfig {
    fn default() -> Self {
        LeecherConfig {
            // a slow holder gets one request at a time until its rate is known
            // (with two, requests sat behind 1 Mbit/s uplinks: simulator, issue 16)
            min_depth: 1,
            max_depth: 16,
            window_us: 600_000,
            base_timeout_us: 5_000_000,
            timeout_factor: 4,
            assumed_rate: 32_000,
            max_dup: 2,
            endgame_chunks: 8,
            max_strikes: 3,
            starve_after_us: 500_000,
        }
    }
}

/// Duration-weighted moving average of a peer's delivery rate.
#[derive(Clone, Debug, Default)]
struct RateEst {
    bytes: f64,
    time_us: f64,
}

impl RateEst {
    fn add(&mut self, bytes: u64, dt_us: u64) {
        // Older samples fade; weighting by duration keeps bursts of replies that
        // arrive together from inflating the estimate.
        self.bytes = self.bytes * 0.75 + bytes as f64;
        self.time_us = self.time_us * 0.75 + dt_us.max(1) as f64;
    }
    /// Bytes per second, once measured.
    fn rate(&self) -> Option<f64> {
        (self.time_us > 0.0).then(|| self.bytes * 1e6 / self.time_us)
    }
}

/// Every peer slot's have-set in one array, slot after slot: a poll tests
/// them all against the wanted set, and one allocation per peer cost a cache
/// miss each (a third of a 100,000-seller simulation's time). Same sets,
/// same answers as a `Bitfield` per slot.
#[derive(Debug, Default)]
struct HasSets {
    /// Chunks per set.
    len: u32,
    /// Words per set.
    stride: usize,
    words: Vec<u64>,
}

impl HasSets {
    fn new(len: u32) -> Self {
        HasSets {
            len,
            stride: (len as usize).div_ceil(64),
            words: Vec::new(),
        }
    }

    fn row(&self, slot: usize) -> &[u64] {
        &self.words[slot * self.stride..(slot + 1) * self.stride]
    }

    /// Slot `slot`'s set becomes `has` (the slot is created if new).
    fn assign(&mut self, slot: usize, has: &Bitfield) {
        let end = (slot + 1) * self.stride;
        if self.words.len() < end {
            self.words.resize(end, 0);
        }
        self.words[slot * self.stride..end].copy_from_slice(has.words());
    }

    fn get(&self, slot: usize, i: u32) -> bool {
        i < self.len && self.row(slot)[(i / 64) as usize] & (1u64 << (i % 64)) != 0
    }

    /// Returns true if `i` was not in the set before (out of range: no-op).
    fn set(&mut self, slot: usize, i: u32) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[slot * self.stride + (i / 64) as usize];
        let m = 1u64 << (i % 64);
        let was = *w & m != 0;
        *w |= m;
        !was
    }

    /// Returns true if `i` was in the set.
    fn clear(&mut self, slot: usize, i: u32) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[slot * self.stride + (i / 64) as usize];
        let m = 1u64 << (i % 64);
        let was = *w & m != 0;
        *w &= !m;
        was
    }

    /// The set's members, ascending.
    fn ones(&self, slot: usize) -> Vec<u32> {
        super::bitfield::ones(self.row(slot).iter().copied()).collect()
    }

    fn count_and(&self, slot: usize, other: &Bitfield) -> u32 {
        self.row(slot)
            .iter()
            .zip(other.words())
            .map(|(a, b)| (a & b).count_ones())
            .sum()
    }

    fn intersects(&self, slot: usize, other: &Bitfield) -> bool {
        self.row(slot)
            .iter()
            .zip(other.words())
            .any(|(a, b)| a & b != 0)
    }

    /// Members also in `other`, ascending.
    fn iter_and<'a>(&'a self, slot: usize, other: &'a Bitfield) -> impl Iterator<Item = u32> + 'a {
        super::bitfield::and_ones(self.row(slot), other.words())
    }
}

/// Longest a requester stays away from a holder that keeps saying Busy
/// (unless the holder itself names a longer wait). 30 s rather than 10: at
/// 1,000 DSL sellers (simulations/scenarios/dsl-1000.toml) the median seller
/// finished at 1.076 x the bound instead of 1.146 x, the buyer sent 1.017 x the
/// image instead of 1.046 x, for 18 % fewer events; a refused requester has
/// other holders to ask meanwhile.
pub const BUSY_BACKOFF_MAX_US: Micros = 30_000_000;

/// How long to leave a holder alone after its `streak`-th Busy answer in a row
/// (0: the first) that asked for `retry_us`: the holder's own estimate first,
/// then doubling. Why: every requester it refused comes back when its queue
/// has drained, at the same moment, and all but one are refused again; in a
/// flash crowd that was 22 Busy answers per chunk delivered (issue 17's
/// simulations). Backing off like Ethernet's retries makes the refused few.
fn busy_backoff(retry_us: Micros, streak: u32) -> Micros {
    let retry = retry_us.max(1);
    let wait = retry.saturating_mul(1 << streak.min(6));
    wait.min(BUSY_BACKOFF_MAX_US.max(retry))
}

#[derive(Debug)]
struct PeerSlot<P> {
    id: P,
    kind: PeerKind,
    /// (chunk, time requested)
    out: Vec<(u32, Micros)>,
    out_bytes: u64,
    rate: RateEst,
    /// Start of the current wait: last arrival, or when requests were first sent.
    since: Micros,
    /// Last time bytes of a reply were seen arriving from it (a slow link's
    /// chunk in progress); the stall clock runs from the later of this and `since`.
    progress: Micros,
    strikes: u32,
    depth_cap: usize,
    bytes_in: u64,
    /// It said it is busy: no new requests to it before this time.
    busy_until: Micros,
    /// Busy answers since it last served us (the backoff's exponent).
    busy_streak: u32,
}

/// Per-image fetch scheduler.
pub struct Leecher<P> {
    cfg: LeecherConfig,
    sizes: Vec<u32>,
    avg_size: u64,
    have: Bitfield,
    /// How many live, unbanned peers hold each chunk.
    avail: Vec<u32>,
    /// Outstanding requests per chunk.
    inflight: Vec<u8>,
    inflight_set: BTreeSet<u32>,
    /// Chunks wanted, not requested, held by someone: bucket[avail] = {(rank, idx)}.
    /// (A bitfield per availability, over ranks rather than indices: walking one
    /// in rank order is ascending bits, and a move between buckets on every Have
    /// is two bit flips, not two tree searches: those were a fifth of the
    /// simulator's time at 1,000 sellers.)
    buckets: Vec<Bitfield>,
    pending: usize,
    /// The same chunks as the buckets, as a bitfield: a peer's candidates are
    /// `has & pend`, found word by word.
    pend: Bitfield,
    /// Random tie-break among equally rare chunks, fixed per fetch.
    rank: Vec<u32>,
    /// The chunk of each rank (`rank`'s inverse).
    unrank: Vec<u32>,
    peers: Vec<Option<PeerSlot<P>>>,
    /// Each slot's next time to look at it: the earlier of its request
    /// deadline and the end of its Busy wait (`Micros::MAX`: none, or a free
    /// slot). Kept beside the slots so that a poll's timeout pass and
    /// `next_deadline` read 8 bytes per peer, not a whole slot: at 100,000
    /// simulated sellers those scans ran on cold memory after every event.
    due: Vec<Micros>,
    /// Each slot's have-set (`peers[i]`'s is row i).
    has_sets: HasSets,
    free: Vec<usize>,
    /// Only looked up, never iterated: a fast hash changes no decision (a
    /// simulated seller looks a peer up on every message).
    index: FxHashMap<P, usize>,
    banned: HashSet<P>,
    actions: VecDeque<Action<P>>,
    dirty: bool,
    /// Haves arrived that cannot lead to a request: the fill is skipped, the
    /// rotation still advances (so decisions are those of a full fill).
    have_news: bool,
    rr: usize,
    completed: bool,
    starving_since: Option<Micros>,
    order: PieceOrder,
}

impl<P: Clone + Eq + Hash + std::fmt::Debug> Leecher<P> {
    /// A fetch of an image whose chunks have `sizes`, resuming from the chunks in
    /// `have` (those already in the store are never requested again).
    pub fn new(sizes: Vec<u32>, have: Bitfield, seed: u64, cfg: LeecherConfig) -> Self {
        let n = sizes.len();
        assert_eq!(
            have.len() as usize,
            n,
            "have-set length must match the chunk count"
        );
        let total: u64 = sizes.iter().map(|&s| s as u64).sum();
        let mut rank: Vec<u32> = (0..n as u32).collect();
        let mut rng = SplitMix64::new(seed);
        for i in (1..n).rev() {
            let j = (rng.next() % (i as u64 + 1)) as usize;
            rank.swap(i, j);
        }
        let mut unrank = vec![0; n];
        for (idx, &r) in rank.iter().enumerate() {
            unrank[r as usize] = idx as u32;
        }
        let mut l = Leecher {
            cfg,
            avg_size: if n == 0 { 1 } else { (total / n as u64).max(1) },
            sizes,
            have,
            avail: vec![0; n],
            inflight: vec![0; n],
            inflight_set: BTreeSet::new(),
            buckets: Vec::new(),
            pending: 0,
            pend: Bitfield::new(n as u32),
            rank,
            unrank,
            peers: Vec::new(),
            due: Vec::new(),
            has_sets: HasSets::new(n as u32),
            free: Vec::new(),
            index: FxHashMap::default(),
            banned: HashSet::new(),
            actions: VecDeque::new(),
            dirty: true,
            have_news: false,
            rr: 0,
            completed: false,
            starving_since: None,
            order: PieceOrder::RarestFirst,
        };
        if l.have.is_full() {
            l.completed = true;
            l.actions.push_back(Action::Complete);
        }
        l
    }

    /// Switches how chunks are chosen (see [`PieceOrder`]); the default is rarest first.
    pub fn set_piece_order(&mut self, order: PieceOrder) {
        self.order = order;
        self.dirty = true;
    }

    /// Chunks present.
    pub fn have(&self) -> &Bitfield {
        &self.have
    }

    /// True once every chunk is present.
    pub fn is_complete(&self) -> bool {
        self.have.is_full()
    }

    /// Peers banned for this image.
    pub fn banned(&self) -> impl Iterator<Item = &P> {
        self.banned.iter()
    }

    /// Whether `p` is banned for this image.
    pub fn is_banned(&self, p: &P) -> bool {
        self.banned.contains(p)
    }

    /// Bytes received from `p` so far (verified chunks only).
    pub fn bytes_from(&self, p: &P) -> u64 {
        self.slot(p).map(|s| s.bytes_in).unwrap_or(0)
    }

    /// True when incomplete and nothing was requested anywhere for
    /// `starve_after_us`: every peer we know lacks what we miss (or is banned).
    /// A super-seed should be told. Updated by `poll`.
    pub fn is_starving(&self, now: Micros) -> bool {
        self.starving_since
            .is_some_and(|t| now.saturating_sub(t) >= self.cfg.starve_after_us)
    }

    /// How many known peers hold chunk `idx` (a server uses it to send the
    /// rarest of its queued replies first).
    pub fn availability(&self, idx: u32) -> u32 {
        self.avail.get(idx as usize).copied().unwrap_or(0)
    }

    /// Whether `p` is known to hold chunk `idx`.
    pub fn peer_has(&self, p: &P, idx: u32) -> bool {
        self.index
            .get(p)
            .is_some_and(|&i| self.peers[i].is_some() && self.has_sets.get(i, idx))
    }

    /// Number of requests in flight.
    pub fn in_flight(&self) -> usize {
        self.peers.iter().flatten().map(|s| s.out.len()).sum()
    }

    /// Measured delivery rate of `p`, bytes/s.
    pub fn rate_of(&self, p: &P) -> Option<f64> {
        self.slot(p).and_then(|s| s.rate.rate())
    }

    fn slot(&self, p: &P) -> Option<&PeerSlot<P>> {
        self.index.get(p).and_then(|&i| self.peers[i].as_ref())
    }

    // ---------------------------------------------------------------- buckets

    fn bucket_insert(&mut self, idx: u32) {
        let a = self.avail[idx as usize] as usize;
        if a == 0 || self.have.get(idx) || self.inflight[idx as usize] > 0 {
            return;
        }
        if self.buckets.len() <= a {
            let n = self.sizes.len() as u32;
            self.buckets.resize_with(a + 1, || Bitfield::new(n));
        }
        if self.buckets[a].set(self.rank[idx as usize]) {
            self.pending += 1;
            self.pend.set(idx);
        }
    }

    fn bucket_remove(&mut self, idx: u32) {
        // only the chunks in `pend` sit in a bucket: no tree search for the
        // Haves of chunks held or being fetched (most of them)
        if !self.pend.get(idx) {
            return;
        }
        let a = self.avail[idx as usize] as usize;
        if a < self.buckets.len() && self.buckets[a].clear(self.rank[idx as usize]) {
            self.pending -= 1;
            self.pend.clear(idx);
        }
    }

    /// Callers decide whether the change can lead to a request (`dirty`).
    fn avail_inc(&mut self, idx: u32) {
        self.bucket_remove(idx);
        self.avail[idx as usize] += 1;
        self.bucket_insert(idx);
    }

    fn avail_dec(&mut self, idx: u32) {
        self.bucket_remove(idx);
        self.avail[idx as usize] -= 1;
        self.bucket_insert(idx);
    }

    // ---------------------------------------------------------------- events

    /// A peer joined this image's swarm with have-set `has`. Returns false (and
    /// ignores it) if it is banned. A known peer's have-set is replaced.
    pub fn add_peer(&mut self, p: P, has: Bitfield, kind: PeerKind, now: Micros) -> bool {
        if self.banned.contains(&p) || has.len() as usize != self.sizes.len() {
            return false;
        }
        if let Some(&i) = self.index.get(&p) {
            let old = self.has_sets.row(i).to_vec();
            let old_has = |idx: u32| old[(idx / 64) as usize] & (1u64 << (idx % 64)) != 0;
            self.has_sets.assign(i, &has);
            for idx in super::bitfield::ones(old.iter().copied()) {
                if !has.get(idx) {
                    self.avail_dec(idx);
                }
            }
            for idx in has.iter_ones() {
                if !old_has(idx) {
                    self.avail_inc(idx);
                }
            }
            self.peers[i].as_mut().expect("indexed").kind = kind;
            self.dirty = true;
            return true;
        }
        let slot = PeerSlot {
            id: p.clone(),
            kind,
            out: Vec::new(),
            out_bytes: 0,
            rate: RateEst::default(),
            since: now,
            progress: 0,
            strikes: 0,
            depth_cap: self.cfg.max_depth,
            bytes_in: 0,
            busy_until: 0,
            busy_streak: 0,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.peers[i] = Some(slot);
                i
            }
            None => {
                self.peers.push(Some(slot));
                self.due.push(Micros::MAX);
                self.peers.len() - 1
            }
        };
        self.refresh_due(i);
        self.index.insert(p, i);
        self.has_sets.assign(i, &has);
        for idx in has.iter_ones() {
            self.avail_inc(idx);
        }
        self.dirty = true;
        true
    }

    /// `p` now holds chunk `idx`.
    pub fn peer_have(&mut self, p: &P, idx: u32) {
        let Some(&i) = self.index.get(p) else { return };
        if idx as usize >= self.sizes.len() {
            return;
        }
        if self.has_sets.set(i, idx) {
            self.avail_inc(idx);
            // Only `p`'s candidates can have changed: a chunk that becomes
            // pending (its first holder) is one only `p` holds, and the order
            // of others' candidates matters only when they take a request,
            // which needed `dirty` anyway. So a Have from a holder that is busy
            // or full, or of a chunk we hold, runs no fill (most Haves in a
            // big swarm; the next chunk, timeout or busy expiry fills).
            // Near the end any peer may duplicate a request (endgame), and
            // whether it may changes within a fill: always fill then.
            let s = self.peers[i].as_ref().expect("indexed");
            let missing = (self.have.len() - self.have.count()) as usize;
            if missing <= self.cfg.endgame_chunks
                || (!self.have.get(idx) && s.busy_until == 0 && s.out.len() < self.depth(s))
            {
                self.dirty = true;
            } else {
                self.have_news = true;
            }
        }
    }

    /// `p` left (disconnected or stopped serving this image).
    pub fn remove_peer(&mut self, p: &P) {
        let Some(i) = self.index.remove(p) else {
            return;
        };
        let slot = self.peers[i].take().expect("indexed");
        self.due[i] = Micros::MAX;
        self.free.push(i);
        for (idx, _) in &slot.out {
            self.release(*idx);
        }
        for idx in self.has_sets.ones(i) {
            self.avail_dec(idx);
        }
        self.dirty = true;
    }

    /// `p` answered that it does not have `idx` (or will not serve it now).
    pub fn peer_lacks(&mut self, p: &P, idx: u32, now: Micros) {
        let Some(&i) = self.index.get(p) else { return };
        let s = self.peers[i].as_mut().expect("indexed");
        let was = self.has_sets.clear(i, idx);
        let had_req = Self::take_out(s, idx, &self.sizes);
        if had_req && s.out.is_empty() {
            s.since = now;
        }
        self.refresh_due(i);
        if had_req {
            self.release(idx);
        }
        if was {
            self.avail_dec(idx);
        }
        self.dirty = true;
    }

    /// `p` holds `idx` but its upload queue is full: it asks us to come back in
    /// about `retry_us`. The request goes to another holder now, `p` stays a
    /// holder and gets no new requests until then. Not a strike: a slow uplink
    /// saying so is the point.
    pub fn peer_busy(&mut self, p: &P, idx: u32, retry_us: Micros, now: Micros) {
        let Some(&i) = self.index.get(p) else { return };
        let s = self.peers[i].as_mut().expect("indexed");
        let had_req = Self::take_out(s, idx, &self.sizes);
        if had_req && s.out.is_empty() {
            s.since = now;
        }
        let wait = busy_backoff(retry_us, s.busy_streak);
        s.busy_streak = s.busy_streak.saturating_add(1);
        s.busy_until = s.busy_until.max(now.saturating_add(wait));
        self.refresh_due(i);
        if had_req {
            self.release(idx);
        }
        self.dirty = true;
    }

    /// Bytes of a reply from `p` are arriving (the shell reports this while it
    /// reads a chunk, at most every few hundred ms): a slow link's request in
    /// progress is not a stalled one, so its timeout starts over. The rate
    /// estimate is left alone (it counts whole chunks).
    pub fn on_bytes(&mut self, p: &P, now: Micros) {
        let Some(&i) = self.index.get(p) else { return };
        let s = self.peers[i].as_mut().expect("indexed");
        if !s.out.is_empty() {
            s.progress = now;
            self.refresh_due(i);
        }
    }

    /// A reply with chunk `idx` from `p` arrived; `ok` says whether it matched its
    /// id (the shell verifies, and stores it only if it did).
    pub fn on_chunk(&mut self, p: &P, idx: u32, ok: bool, now: Micros) {
        if idx as usize >= self.sizes.len() {
            return;
        }
        if !ok {
            self.ban(p);
            return;
        }
        if let Some(&i) = self.index.get(p) {
            let size = self.sizes[idx as usize] as u64;
            let s = self.peers[i].as_mut().expect("indexed");
            let had_req = Self::take_out(s, idx, &self.sizes);
            s.bytes_in += size;
            if had_req {
                s.rate.add(size, now.saturating_sub(s.since));
                s.strikes = 0;
                s.busy_streak = 0;
                s.depth_cap = self.cfg.max_depth;
            }
            s.since = now;
            self.refresh_due(i);
            if self.has_sets.set(i, idx) {
                // it evidently has it; count it so bookkeeping stays symmetric
                self.avail_inc(idx);
            }
            if had_req {
                self.release(idx);
            }
        }
        if self.have.set(idx) {
            self.bucket_remove(idx);
            // cancel the endgame duplicates
            if self.inflight[idx as usize] > 0 {
                let mut losers = Vec::new();
                for i in 0..self.peers.len() {
                    let Some(s) = self.peers[i].as_mut() else {
                        continue;
                    };
                    if Self::take_out(s, idx, &self.sizes) {
                        losers.push(s.id.clone());
                        if s.out.is_empty() {
                            s.since = now;
                        }
                        self.refresh_due(i);
                    }
                }
                for l in losers {
                    self.release(idx);
                    self.actions.push_back(Action::Cancel {
                        peer: l,
                        chunk: idx,
                    });
                }
            }
            if self.have.is_full() && !self.completed {
                self.completed = true;
                self.actions.push_back(Action::Complete);
            }
        }
        self.dirty = true;
    }

    /// Bans `p` for this image: its requests go elsewhere, it is never used again.
    pub fn ban(&mut self, p: &P) {
        if self.banned.insert(p.clone()) {
            self.remove_peer(p);
            self.actions.push_back(Action::Ban { peer: p.clone() });
        }
    }

    fn take_out(s: &mut PeerSlot<P>, idx: u32, sizes: &[u32]) -> bool {
        if let Some(pos) = s.out.iter().position(|&(c, _)| c == idx) {
            s.out.remove(pos);
            s.out_bytes -= sizes[idx as usize] as u64;
            true
        } else {
            false
        }
    }

    /// One request for `idx` ended (not at the peer's slot: the caller did that).
    fn release(&mut self, idx: u32) {
        let f = &mut self.inflight[idx as usize];
        *f -= 1;
        if *f == 0 {
            self.inflight_set.remove(&idx);
            self.bucket_insert(idx);
        }
        self.dirty = true;
    }

    // ---------------------------------------------------------------- decisions

    fn depth(&self, s: &PeerSlot<P>) -> usize {
        if s.kind == PeerKind::SuperSeed {
            return usize::MAX;
        }
        let d = match s.rate.rate() {
            Some(r) => {
                let want = r * self.cfg.window_us as f64 / 1e6 / self.avg_size as f64;
                (want.ceil() as usize).clamp(self.cfg.min_depth, self.cfg.max_depth)
            }
            None => self.cfg.min_depth,
        };
        d.min(s.depth_cap)
    }

    fn deadline(&self, s: &PeerSlot<P>) -> Option<Micros> {
        if s.out.is_empty() {
            return None;
        }
        let rate = s
            .rate
            .rate()
            .unwrap_or(0.0)
            .max(self.cfg.assumed_rate as f64);
        let wait = self.cfg.base_timeout_us as f64
            + self.cfg.timeout_factor as f64 * s.out_bytes as f64 * 1e6 / rate;
        Some(s.since.max(s.progress).saturating_add(wait as u64))
    }

    /// Whether a `poll` at `now` could do more than advance the round of the
    /// peers (which it does after Haves that can lead to no request): fill a
    /// pipeline, time a request out, end a Busy wait, or change the starving
    /// state. A shell that runs the scheduler after every message may then
    /// skip what else it does around a poll (the simulator does: at 1,000
    /// sellers 2.3 M of 3.9 M polls followed such a batch of Haves).
    pub fn wants_poll(&self, now: Micros) -> bool {
        self.dirty
            || self.starving_since.is_some()
            || self.next_deadline().is_some_and(|d| d <= now)
    }

    /// Earliest time `poll` has timeouts to check; the shell wakes up then.
    pub fn next_deadline(&self) -> Option<Micros> {
        self.due.iter().copied().min().filter(|&d| d != Micros::MAX)
    }

    /// Recomputes slot `i`'s entry in `due`; called after every change to what
    /// its deadline depends on (requests out, their bytes, the wait's start,
    /// progress, the rate estimate, the Busy wait).
    fn refresh_due(&mut self, i: usize) {
        self.due[i] = match self.peers[i].as_ref() {
            Some(s) => {
                let busy = (s.busy_until > 0).then_some(s.busy_until);
                match (self.deadline(s), busy) {
                    (Some(a), Some(b)) => a.min(b),
                    (a, b) => a.or(b).unwrap_or(Micros::MAX),
                }
            }
            None => Micros::MAX,
        };
    }

    /// Rarest wanted chunk `s` has that nobody is fetching yet: the least
    /// (availability, rank) in `s.has & pend`. Ranks are distinct, so the answer
    /// is unique however it is found: by scanning the intersection when it is
    /// small, else by walking the buckets rarest first (a hit comes early when
    /// the peer holds many candidates).
    fn pick(&self, slot: usize) -> Option<u32> {
        if self.pending == 0 {
            return None;
        }
        let c = self.has_sets.count_and(slot, &self.pend) as usize;
        if c == 0 {
            return None;
        }
        if self.order == PieceOrder::Random {
            return self.pick_random(slot);
        }
        if c * c <= self.pending {
            return self
                .has_sets
                .iter_and(slot, &self.pend)
                .min_by_key(|&i| (self.avail[i as usize], self.rank[i as usize]));
        }
        for b in self.buckets.iter().skip(1).filter(|b| b.count() > 0) {
            for r in b.iter_ones() {
                let idx = self.unrank[r as usize];
                if self.has_sets.get(slot, idx) {
                    return Some(idx);
                }
            }
        }
        None
    }

    /// Lowest random rank among the wanted chunks `s` has that nobody is fetching.
    fn pick_random(&self, slot: usize) -> Option<u32> {
        self.has_sets
            .iter_and(slot, &self.pend)
            .min_by_key(|&i| self.rank[i as usize])
    }

    /// Endgame: every missing chunk is requested somewhere; duplicate the ones `s`
    /// can also serve, fewest copies first.
    fn pick_endgame(&self, slot: usize, s: &PeerSlot<P>) -> Option<u32> {
        let missing = (self.have.len() - self.have.count()) as usize;
        if missing == 0 || missing > self.cfg.endgame_chunks || self.inflight_set.len() != missing {
            return None;
        }
        self.inflight_set
            .iter()
            .copied()
            .filter(|&i| {
                self.has_sets.get(slot, i)
                    && self.inflight[i as usize] < self.cfg.max_dup
                    && !s.out.iter().any(|&(c, _)| c == i)
            })
            .min_by_key(|&i| self.inflight[i as usize])
    }

    /// Checks timeouts and fills pipelines. Call after events and at `next_deadline`.
    pub fn poll(&mut self, now: Micros) {
        self.poll_inner(now);
        // a holder that is only busy will serve later: waiting is not starving
        if !self.have.is_full()
            && self.inflight_set.is_empty()
            && !self.peers.iter().enumerate().any(|(i, s)| {
                s.as_ref().is_some_and(|s| s.busy_until > now)
                    && self.has_sets.intersects(i, &self.pend)
            })
        {
            self.starving_since.get_or_insert(now);
        } else {
            self.starving_since = None;
        }
    }

    fn poll_inner(&mut self, now: Micros) {
        // timeouts; busy peers whose wait is over take requests again (one
        // pass: a poll runs after nearly every event)
        let mut timed_out = Vec::new();
        for i in 0..self.peers.len() {
            if self.due[i] > now {
                continue; // neither a deadline nor a Busy wait is over
            }
            let Some(s) = self.peers[i].as_ref() else {
                continue;
            };
            if self.deadline(s).is_some_and(|d| now >= d) {
                timed_out.push(i);
            }
            let s = self.peers[i].as_mut().expect("live");
            if s.busy_until > 0 && s.busy_until <= now {
                s.busy_until = 0;
                self.dirty = true;
            }
            self.refresh_due(i);
        }
        for i in timed_out {
            let s = self.peers[i].as_mut().expect("live");
            let (idx, _) = s.out.remove(0);
            s.out_bytes -= self.sizes[idx as usize] as u64;
            s.strikes += 1;
            s.depth_cap = (s.depth_cap / 2).max(1);
            s.since = now;
            let id = s.id.clone();
            let strikes = s.strikes;
            tracing::debug!(peer = ?id, chunk = idx, strikes, "chunk request timed out");
            self.release(idx);
            self.actions.push_back(Action::Cancel {
                peer: id.clone(),
                chunk: idx,
            });
            self.refresh_due(i);
            if strikes > self.cfg.max_strikes {
                self.remove_peer(&id);
                self.actions.push_back(Action::Disconnect { peer: id });
            }
        }
        if !(self.dirty || self.have_news) || self.have.is_full() {
            return;
        }
        let fill = self.dirty;
        self.dirty = false;
        self.have_news = false;
        let n = self.peers.len();
        if n == 0 {
            return;
        }
        // rotate the starting peer so no peer is always served first
        self.rr = (self.rr + 1) % n;
        if !fill {
            return; // only Haves that cannot lead to a request (see peer_have)
        }
        // peers that recently timed out are served last
        for k in 0..2 * n {
            let i = (self.rr + k) % n;
            while let Some(s) = self.peers[i].as_ref() {
                if (s.strikes > 0) == (k < n) {
                    break;
                }
                if s.busy_until > now || s.out.len() >= self.depth(s) {
                    break;
                }
                let Some(idx) = self.pick(i).or_else(|| self.pick_endgame(i, s)) else {
                    break;
                };
                let size = self.sizes[idx as usize] as u64;
                let s = self.peers[i].as_mut().expect("live");
                if s.out.is_empty() {
                    s.since = now;
                }
                s.out.push((idx, now));
                s.out_bytes += size;
                let id = s.id.clone();
                self.refresh_due(i);
                self.bucket_remove(idx);
                if self.inflight[idx as usize] == 0 {
                    self.inflight_set.insert(idx);
                }
                self.inflight[idx as usize] += 1;
                self.actions.push_back(Action::Request {
                    peer: id,
                    chunk: idx,
                });
            }
        }
    }

    /// Next action for the shell, if any.
    pub fn next_action(&mut self) -> Option<Action<P>> {
        self.actions.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(l: &mut Leecher<u32>) -> Vec<Action<u32>> {
        std::iter::from_fn(|| l.next_action()).collect()
    }

    fn reqs(a: &[Action<u32>]) -> Vec<(u32, u32)> {
        a.iter()
            .filter_map(|x| match x {
                Action::Request { peer, chunk } => Some((*peer, *chunk)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn rarest_first_and_pipelined() {
        let cfg = LeecherConfig {
            min_depth: 2,
            ..Default::default()
        };
        let mut l = Leecher::new(vec![1000; 4], Bitfield::new(4), 1, cfg);
        let mut a = Bitfield::full(4);
        a.clear(3);
        let mut b = Bitfield::new(4);
        b.set(0);
        b.set(1);
        l.add_peer(1, a, PeerKind::Normal, 0);
        l.add_peer(2, b, PeerKind::Normal, 0);
        l.poll(0);
        let r = reqs(&drain(&mut l));
        // chunk 2 is only at peer 1 (avail 1) and must be among peer 1's requests
        assert!(r.contains(&(1, 2)));
        // two requests per peer (min depth), all distinct chunks
        assert_eq!(r.len(), 3, "{r:?}");
        let mut chunks: Vec<u32> = r.iter().map(|x| x.1).collect();
        chunks.sort();
        chunks.dedup();
        assert_eq!(chunks.len(), 3);
    }

    #[test]
    fn resume_skips_present_chunks() {
        let mut have = Bitfield::new(3);
        have.set(0);
        have.set(2);
        let mut l = Leecher::new(vec![10; 3], have, 7, LeecherConfig::default());
        l.add_peer(9, Bitfield::full(3), PeerKind::Normal, 0);
        l.poll(0);
        assert_eq!(reqs(&drain(&mut l)), vec![(9, 1)]);
        l.on_chunk(&9, 1, true, 10);
        assert!(drain(&mut l).contains(&Action::Complete));
    }

    #[test]
    fn bad_chunk_bans_and_refetches_elsewhere() {
        let mut l = Leecher::new(vec![10; 1], Bitfield::new(1), 3, LeecherConfig::default());
        l.add_peer(1, Bitfield::full(1), PeerKind::Normal, 0);
        l.poll(0);
        let r = reqs(&drain(&mut l));
        assert_eq!(r, vec![(1, 0)]);
        l.add_peer(2, Bitfield::full(1), PeerKind::Normal, 0);
        l.on_chunk(&1, 0, false, 5);
        l.poll(5);
        let acts = drain(&mut l);
        assert!(acts.contains(&Action::Ban { peer: 1 }));
        assert_eq!(reqs(&acts), vec![(2, 0)]);
        assert!(
            !l.add_peer(1, Bitfield::full(1), PeerKind::Normal, 6),
            "banned peer re-added"
        );
    }

    #[test]
    fn slow_but_progressing_peer_is_not_timed_out() {
        // 256 KiB chunks over 1 Mbit/s (125 kB/s): ~2.1 s each
        let n = 20;
        let size = 256 * 1024;
        let mut l = Leecher::new(
            vec![size; n],
            Bitfield::new(n as u32),
            5,
            LeecherConfig::default(),
        );
        l.add_peer(1, Bitfield::full(n as u32), PeerKind::Normal, 0);
        let mut now = 0u64;
        l.poll(now);
        let mut outstanding: VecDeque<u32> =
            reqs(&drain(&mut l)).into_iter().map(|x| x.1).collect();
        let per_chunk = size as u64 * 1_000_000 / 125_000;
        while let Some(c) = outstanding.pop_front() {
            now += per_chunk;
            // nothing timed out before the reply
            l.poll(now - 1);
            let acts = drain(&mut l);
            assert!(
                !acts.iter().any(|a| matches!(a, Action::Cancel { .. })),
                "{acts:?} at {now}"
            );
            outstanding.extend(reqs(&acts).into_iter().map(|x| x.1));
            l.on_chunk(&1, c, true, now);
            l.poll(now);
            outstanding.extend(reqs(&drain(&mut l)).into_iter().map(|x| x.1));
        }
        assert!(l.is_complete());
    }

    #[test]
    fn a_reply_still_arriving_is_not_timed_out() {
        // a 256 KiB chunk behind a link far slower than the assumed rate
        let mut l = Leecher::new(
            vec![256 * 1024; 1],
            Bitfield::new(1),
            5,
            LeecherConfig::default(),
        );
        l.add_peer(1, Bitfield::full(1), PeerKind::Normal, 0);
        l.poll(0);
        drain(&mut l);
        let d = l.next_deadline().unwrap();
        // bytes keep trickling in every 500 ms until well past the first deadline
        let mut now = 0;
        while now < 3 * d {
            now += 500_000;
            l.on_bytes(&1, now);
            l.poll(now);
            let acts = drain(&mut l);
            assert!(
                !acts.iter().any(|a| matches!(a, Action::Cancel { .. })),
                "{acts:?} at {now}"
            );
        }
        l.on_chunk(&1, 0, true, now);
        assert!(drain(&mut l).contains(&Action::Complete));
        // once nothing arrives, the usual timeout applies again
        let mut m = Leecher::new(vec![100; 1], Bitfield::new(1), 5, LeecherConfig::default());
        m.add_peer(1, Bitfield::full(1), PeerKind::Normal, 0);
        m.poll(0);
        drain(&mut m);
        m.on_bytes(&1, 1_000_000);
        let d = m.next_deadline().unwrap();
        m.poll(d);
        assert!(drain(&mut m).contains(&Action::Cancel { peer: 1, chunk: 0 }));
    }

    #[test]
    fn silent_peer_times_out_and_request_moves() {
        let mut l = Leecher::new(
            vec![65536; 2],
            Bitfield::new(2),
            5,
            LeecherConfig::default(),
        );
        let mut one = Bitfield::new(2);
        one.set(0);
        l.add_peer(1, one.clone(), PeerKind::Normal, 0);
        l.poll(0);
        assert_eq!(reqs(&drain(&mut l)), vec![(1, 0)]);
        let d = l.next_deadline().unwrap();
        // 5 s base + 4 x 64 KiB at the assumed rate
        assert!(d > 5_000_000 && d < 20_000_000, "{d}");
        l.poll(d - 1);
        assert!(drain(&mut l).is_empty());
        l.add_peer(2, one, PeerKind::Normal, d - 1);
        l.poll(d);
        let acts = drain(&mut l);
        assert!(acts.contains(&Action::Cancel { peer: 1, chunk: 0 }));
        assert!(reqs(&acts).contains(&(2, 0)), "{acts:?}");
    }

    #[test]
    fn endgame_duplicates_then_cancels_loser() {
        let mut l = Leecher::new(vec![100; 1], Bitfield::new(1), 5, LeecherConfig::default());
        l.add_peer(1, Bitfield::full(1), PeerKind::Normal, 0);
        l.poll(0);
        drain(&mut l);
        l.add_peer(2, Bitfield::full(1), PeerKind::Normal, 0);
        l.poll(0);
        assert_eq!(reqs(&drain(&mut l)), vec![(2, 0)]);
        l.on_chunk(&2, 0, true, 10);
        let acts = drain(&mut l);
        assert!(acts.contains(&Action::Cancel { peer: 1, chunk: 0 }));
        assert!(acts.contains(&Action::Complete));
    }

    #[test]
    fn super_seed_offers_all_requested() {
        let mut l = Leecher::new(
            vec![100; 10],
            Bitfield::new(10),
            5,
            LeecherConfig::default(),
        );
        let mut offers = Bitfield::new(10);
        for i in 0..5 {
            offers.set(i);
        }
        l.add_peer(1, offers, PeerKind::SuperSeed, 0);
        l.poll(0);
        assert_eq!(reqs(&drain(&mut l)).len(), 5);
    }

    /// The word-wise `pick` chooses what a scan of every chunk would choose, through
    /// random joins, Haves, replies, refusals, timeouts and departures.
    #[test]
    fn pick_matches_brute_force() {
        for (seed, order) in [
            (1u64, PieceOrder::RarestFirst),
            (2, PieceOrder::Random),
            (3, PieceOrder::RarestFirst),
        ] {
            let n = 300u32;
            let mut rng = SplitMix64::new(seed);
            let mut l = Leecher::new(
                vec![1000; n as usize],
                Bitfield::new(n),
                seed,
                LeecherConfig::default(),
            );
            l.set_piece_order(order);
            let mut now = 0;
            for step in 0..3000u32 {
                now += 1000;
                let p = (rng.next() % 12) as u32;
                match rng.next() % 8 {
                    0 => {
                        let mut b = Bitfield::new(n);
                        let dens = rng.next() % 100;
                        for i in 0..n {
                            if rng.next() % 100 < dens {
                                b.set(i);
                            }
                        }
                        l.add_peer(p, b, PeerKind::Normal, now);
                    }
                    1 | 2 => l.peer_have(&p, (rng.next() % n as u64) as u32),
                    3 => l.remove_peer(&p),
                    4 => l.peer_lacks(&p, (rng.next() % n as u64) as u32, now),
                    _ => {
                        let out: Vec<(u32, u32)> = l
                            .peers
                            .iter()
                            .flatten()
                            .flat_map(|s| s.out.iter().map(|&(c, _)| (s.id, c)).collect::<Vec<_>>())
                            .collect();
                        if !out.is_empty() {
                            let (q, c) = out[(rng.next() % out.len() as u64) as usize];
                            l.on_chunk(&q, c, true, now);
                        }
                    }
                }
                for (slot, _) in l.peers.iter().enumerate().filter(|x| x.1.is_some()) {
                    let want = (0..n)
                        .filter(|&i| {
                            l.has_sets.get(slot, i)
                                && !l.have.get(i)
                                && l.inflight[i as usize] == 0
                                && l.avail[i as usize] > 0
                        })
                        .min_by_key(|&i| match order {
                            PieceOrder::RarestFirst => (l.avail[i as usize], l.rank[i as usize]),
                            PieceOrder::Random => (0, l.rank[i as usize]),
                        });
                    assert_eq!(l.pick(slot), want, "seed {seed} step {step}");
                }
                if step % 3 == 0 {
                    l.poll(now);
                    drain(&mut l);
                }
            }
        }
    }

    #[test]
    fn busy_peer_keeps_its_chunks_and_is_asked_again_later() {
        let mut l = Leecher::new(vec![100; 2], Bitfield::new(2), 5, LeecherConfig::default());
        let mut one = Bitfield::new(2);
        one.set(0);
        l.add_peer(1, one.clone(), PeerKind::Normal, 0);
        l.poll(0);
        assert_eq!(reqs(&drain(&mut l)), vec![(1, 0)]);
        l.peer_busy(&1, 0, 2_000_000, 10);
        l.poll(10);
        assert!(drain(&mut l).is_empty(), "not asked again while busy");
        assert!(l.peer_has(&1, 0), "still a holder");
        assert!(
            !l.is_starving(1_900_000),
            "waiting on a busy holder is not starving"
        );
        // another holder takes it at once
        l.add_peer(2, one.clone(), PeerKind::Normal, 20);
        l.poll(20);
        assert_eq!(reqs(&drain(&mut l)), vec![(2, 0)]);
        l.on_chunk(&2, 0, true, 30);
        drain(&mut l);
        // chunk 1 appears at the busy peer only: asked when its wait is over
        l.peer_have(&1, 1);
        l.poll(40);
        assert!(drain(&mut l).is_empty());
        assert_eq!(l.next_deadline(), Some(2_000_010));
        l.poll(2_000_010);
        assert_eq!(reqs(&drain(&mut l)), vec![(1, 1)]);
    }

    #[test]
    fn a_holder_that_keeps_saying_busy_is_asked_ever_less_often_until_it_serves() {
        let mut l = Leecher::new(vec![100; 4], Bitfield::new(4), 5, LeecherConfig::default());
        l.add_peer(1, Bitfield::full(4), PeerKind::Normal, 0);
        l.poll(0);
        let (mut now, mut gaps) = (0, Vec::new());
        for _ in 0..7 {
            let (_, idx) = reqs(&drain(&mut l))[0];
            l.peer_busy(&1, idx, 500_000, now);
            let next = l.next_deadline().expect("asked again later");
            gaps.push(next - now);
            now = next;
            l.poll(now);
        }
        // its own estimate first, then doubling, never past the cap
        assert_eq!(
            gaps,
            vec![
                500_000,
                1_000_000,
                2_000_000,
                4_000_000,
                8_000_000,
                16_000_000,
                BUSY_BACKOFF_MAX_US
            ]
        );
        // it serves: the next refusal waits only what it asks for again
        let (_, idx) = reqs(&drain(&mut l))[0];
        l.on_chunk(&1, idx, true, now);
        l.poll(now);
        let (_, idx) = reqs(&drain(&mut l))[0];
        l.peer_busy(&1, idx, 500_000, now);
        assert_eq!(l.next_deadline(), Some(now + 500_000));
        // a holder that names a longer wait than the cap gets it
        assert_eq!(busy_backoff(40_000_000, 3), 40_000_000);
    }

    #[test]
    fn a_poll_is_wanted_only_when_it_could_do_something() {
        // 40 chunks, so the endgame (8 missing) is far
        let n = 40;
        let mut l = Leecher::new(
            vec![100; n],
            Bitfield::new(n as u32),
            5,
            LeecherConfig::default(),
        );
        l.add_peer(1, Bitfield::full(n as u32), PeerKind::Normal, 0);
        l.add_peer(2, Bitfield::new(n as u32), PeerKind::Normal, 0);
        assert!(l.wants_poll(0), "new peers: a fill is due");
        l.poll(0);
        let (_, idx) = reqs(&drain(&mut l))[0];
        assert!(!l.wants_poll(1), "a request out, nothing due yet");
        // peer 2 says Busy for a while: a Have from it can lead to no request
        l.peer_have(&2, 7);
        l.poll(1);
        drain(&mut l);
        l.peer_busy(&2, 7, 5_000_000, 1);
        l.poll(1);
        drain(&mut l);
        l.peer_have(&2, 8);
        assert!(!l.wants_poll(2), "a Have from a busy holder");
        // its wait ends, or the request's deadline passes: now a poll acts
        let due = l.next_deadline().expect("a deadline");
        assert!(l.wants_poll(due));
        // a Have from a holder with room in its pipeline can lead to a request
        l.on_chunk(&1, idx, true, 3);
        l.poll(3);
        drain(&mut l);
        l.add_peer(3, Bitfield::new(n as u32), PeerKind::Normal, 3);
        l.poll(3);
        drain(&mut l);
        assert!(!l.wants_poll(4));
        l.peer_have(&3, 9);
        assert!(
            l.wants_poll(4),
            "a Have from an idle holder of a wanted chunk"
        );
    }

    #[test]
    fn lacking_peer_frees_request() {
        let mut l = Leecher::new(vec![100; 1], Bitfield::new(1), 5, LeecherConfig::default());
        l.add_peer(1, Bitfield::full(1), PeerKind::Normal, 0);
        l.poll(0);
        drain(&mut l);
        l.peer_lacks(&1, 0, 3);
        l.add_peer(2, Bitfield::full(1), PeerKind::Normal, 3);
        l.poll(3);
        assert_eq!(reqs(&drain(&mut l)), vec![(2, 0)]);
    }
}
