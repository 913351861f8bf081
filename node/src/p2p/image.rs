//! One image's swarm: its state, starting a fetch, running the scheduler
//! (`Leecher` or `Seeder`) and the fetch's clock (`FetchTimers`), and carrying
//! out what they decide. The messages that feed them are in `exchange`.

use std::collections::{BTreeMap, HashMap, HashSet};

use chunks::swarm::{
    Action, Bitfield, FetchAction, FetchTimers, Leecher, LeecherConfig, SeedAction, Seeder,
    SeederConfig, TimerConfig,
};
use chunks::{ChunkId, ImageId, PinGuard, SignedManifest};
use libp2p::PeerId;
use tracing::{debug, info, warn};

use super::handle::Waiter;
use super::status::{fetch_report, ImageStats};
use super::wire::{self, Body, Msg};
use super::Net;
use crate::domain::Role;

pub(super) enum Mode {
    Seed(Box<Seeder<PeerId>>),
    Leech(Box<Leecher<PeerId>>),
    Done,
}

/// A fetch in progress: who waits for it, and its clock.
pub(super) struct Fetch {
    pub waiters: Vec<Waiter>,
    _pin: PinGuard,
    pub timers: FetchTimers,
}

pub(super) struct ImageSwarm {
    pub id: ImageId,
    pub chunk_ids: Vec<ChunkId>,
    pub sizes: Vec<u32>,
    pub total: u64,
    pub have: Bitfield,
    pub have_bytes: u64,
    pub mode: Mode,
    pub members: HashSet<PeerId>,
    pub greeted: HashSet<PeerId>,
    pub early_haves: HashMap<PeerId, Vec<u32>>,
    /// Peers that answered as super-seeds (told when we starve).
    pub seeds: HashSet<PeerId>,
    pub have_queue: HashMap<PeerId, Vec<u32>>,
    /// Haves for super-seeds: they count a chunk as ours once they sent it, and
    /// need the rest only for bookkeeping, so these go in bigger batches to
    /// spare the seed's uplink the per-message overhead.
    pub slow_have_queue: HashMap<PeerId, Vec<u32>>,
    pub fetch: Option<Fetch>,
    pub stats: ImageStats,
}

impl ImageSwarm {
    /// Ends the fetch (if any) with `msg` as its waiters' error.
    pub fn fail_fetch(&mut self, msg: &str) {
        if let Some(f) = self.fetch.take() {
            for w in f.waiters {
                w.fail(msg);
            }
        }
    }
}

impl Net {
    fn new_image_swarm(&self, image: ImageId, m: &SignedManifest) -> ImageSwarm {
        let uniq = m.manifest().unique_chunks();
        let n = uniq.len() as u32;
        let mut have = Bitfield::new(n);
        let mut have_bytes = 0u64;
        for (i, c) in uniq.iter().enumerate() {
            if self.store.has_chunk(&c.id) {
                have.set(i as u32);
                have_bytes += c.size as u64;
            }
        }
        ImageSwarm {
            id: image,
            chunk_ids: uniq.iter().map(|c| c.id).collect(),
            sizes: uniq.iter().map(|c| c.size).collect(),
            total: uniq.iter().map(|c| c.size as u64).sum(),
            have,
            have_bytes,
            mode: Mode::Done,
            members: HashSet::new(),
            greeted: HashSet::new(),
            early_haves: HashMap::new(),
            seeds: HashSet::new(),
            have_queue: HashMap::new(),
            slow_have_queue: HashMap::new(),
            fetch: None,
            stats: ImageStats::default(),
        }
    }

    pub(super) fn start_leech(&mut self, image: ImageId, m: SignedManifest, waiters: Vec<Waiter>) {
        let pin = match self.store.pin_temp(image) {
            Ok(p) => p,
            Err(e) => {
                let msg = e.to_string();
                for w in waiters {
                    w.fail(&msg);
                }
                return;
            }
        };
        let mut img = self.new_image_swarm(image, &m);
        img.stats.resumed_bytes = img.have_bytes;
        info!(image = %image, chunks = img.sizes.len(), present = img.have.count(), "fetch started");
        let leecher = Leecher::new(
            img.sizes.clone(),
            img.have.clone(),
            self.rng_seed ^ u64::from_le_bytes(image.0[..8].try_into().expect("8 bytes")),
            LeecherConfig::default(),
        );
        img.mode = Mode::Leech(Box::new(leecher));
        img.fetch = Some(Fetch {
            waiters,
            _pin: pin,
            timers: FetchTimers::new(self.now(), TimerConfig::default()),
        });
        self.images.insert(image, img);
        self.provide(image);
        let peers: Vec<PeerId> = self.connected.iter().copied().collect();
        for p in peers {
            self.greet(image, p);
        }
        self.find_providers(image);
        self.drive(image);
    }

    /// Images being fetched.
    pub(super) fn leeching(&self) -> Vec<ImageId> {
        self.images
            .iter()
            .filter(|(_, i)| matches!(i.mode, Mode::Leech(_)))
            .map(|(k, _)| *k)
            .collect()
    }

    /// Greets `peer` for every image being fetched.
    pub(super) fn greet_leeching(&mut self, peer: PeerId) {
        for image in self.leeching() {
            self.greet(image, peer);
        }
    }

    /// Sends our have-set for `image` to `p` (once per connection).
    pub(super) fn greet(&mut self, image: ImageId, p: PeerId) {
        let Some(img) = self.images.get_mut(&image) else {
            return;
        };
        if !img.greeted.insert(p) {
            return;
        }
        let have = img.have.to_bytes();
        self.present(p, image);
        self.links.send(p, Msg::new(image, Body::Hello { have }));
    }

    /// Loads the swarm state of a complete local image on first use.
    pub(super) fn ensure_image(&mut self, image: ImageId) -> bool {
        if self.images.contains_key(&image) {
            return true;
        }
        let m = match self.store.get_manifest(image) {
            Ok(Some(m)) => m,
            _ => return false,
        };
        match self.store.is_complete(image) {
            Ok(true) => {}
            _ => return false,
        }
        let mut img = self.new_image_swarm(image, &m);
        img.stats.complete = true;
        img.mode = if self.role == Role::Buyer {
            Mode::Seed(Box::new(Seeder::new(
                img.sizes.clone(),
                SeederConfig::default(),
            )))
        } else {
            Mode::Done
        };
        self.images.insert(image, img);
        true
    }

    /// Runs the image's scheduler and carries out its actions.
    pub(super) fn drive(&mut self, image: ImageId) {
        let now = self.now();
        let Some(img) = self.images.get_mut(&image) else {
            return;
        };
        let mut requests = Vec::new();
        let mut cancels = Vec::new();
        let mut complete = false;
        let mut starving = Vec::new();
        // a super-seed's offers go out at once: they keep the sellers asking
        let mut offers: BTreeMap<PeerId, Vec<u32>> = BTreeMap::new();
        match &mut img.mode {
            Mode::Seed(s) => {
                s.poll(now);
                while let Some(SeedAction::Offer { peer, chunk }) = s.next_action() {
                    offers.entry(peer).or_default().push(chunk);
                }
            }
            Mode::Leech(l) => {
                l.poll(now);
                while let Some(a) = l.next_action() {
                    match a {
                        Action::Request { peer, chunk } => requests.push((peer, chunk)),
                        Action::Cancel { peer, chunk } => cancels.push((peer, chunk)),
                        Action::Ban { peer } => {
                            img.stats.banned.insert(peer.to_string());
                            img.members.remove(&peer);
                        }
                        Action::Disconnect { peer } => {
                            debug!(peer = %peer, image = %image, "peer stalled; dropped from this fetch");
                            img.greeted.remove(&peer);
                        }
                        Action::Complete => complete = true,
                    }
                }
                // nothing to ask anyone for: tell the super-seeds (throttled)
                if l.is_starving(now)
                    && img
                        .fetch
                        .as_mut()
                        .is_some_and(|f| f.timers.starving_note(now))
                {
                    starving.extend(img.seeds.iter().copied());
                }
            }
            Mode::Done => {}
        }
        for peer in starving {
            self.links.send(peer, Msg::new(image, Body::Starving));
        }
        for (peer, index) in cancels {
            self.links
                .send(peer, Msg::new(image, Body::Cancel { index }));
        }
        for (peer, index) in requests {
            self.present(peer, image);
            self.links
                .send(peer, Msg::new(image, Body::GetChunk { index }));
        }
        for (peer, chunks) in offers {
            self.links
                .send(peer, Msg::new(image, Body::Have { chunks }));
        }
        if complete {
            self.complete(image);
        }
    }

    fn complete(&mut self, image: ImageId) {
        let now = self.now();
        let Some(img) = self.images.get_mut(&image) else {
            return;
        };
        img.mode = Mode::Done;
        img.stats.complete = true;
        let _ = self.store.flush();
        if let Some(f) = img.fetch.take() {
            let secs = f.timers.elapsed(now) as f64 / 1e6;
            info!(image = %image, secs, downloaded = img.stats.downloaded_bytes, "fetch complete");
            let report = fetch_report(img, secs);
            for w in f.waiters {
                w.progress.report("fetch", img.total, img.total);
                let _ = w.reply.send(Ok(report.clone()));
            }
        }
    }

    /// Sends the haves queued for `image`'s peers; the super-seeds' batches only
    /// when `slow` (or the image is done).
    pub(super) fn flush_haves(&mut self, image: ImageId, slow: bool) {
        let Some(img) = self.images.get_mut(&image) else {
            return;
        };
        let done = matches!(img.mode, Mode::Done);
        let mut queue = std::mem::take(&mut img.have_queue);
        if slow || done {
            for (p, c) in img.slow_have_queue.drain() {
                queue.entry(p).or_default().extend(c);
            }
        }
        if queue.is_empty() {
            return;
        }
        for (peer, mut chunks) in queue {
            if !self.connected.contains(&peer) {
                continue;
            }
            while !chunks.is_empty() {
                let rest = chunks.split_off(chunks.len().min(wire::MAX_HAVES));
                self.links
                    .send(peer, Msg::new(image, Body::Have { chunks }));
                chunks = rest;
            }
        }
    }

    /// Carries out what the fetches' clocks say is due: provider lookups
    /// (backing off), and the end of a fetch that stalled.
    pub(super) fn poll_fetch_timers(&mut self) {
        let now = self.now();
        let mut due = Vec::new();
        for (image, img) in self.images.iter_mut() {
            if let Some(f) = &mut img.fetch {
                f.timers.poll(now);
                while let Some(a) = f.timers.next_action() {
                    due.push((*image, a));
                }
            }
        }
        for (image, a) in due {
            match a {
                FetchAction::LookupProviders => self.find_providers(image),
                FetchAction::Stalled => self.fail_stalled(image),
            }
        }
    }

    /// A fetch that got no chunk for the stall wait ends with an error (its
    /// waiters would wait forever otherwise); chunks stored so far are kept.
    fn fail_stalled(&mut self, image: ImageId) {
        let Some(mut img) = self.images.remove(&image) else {
            return;
        };
        let stall_s = img
            .fetch
            .as_ref()
            .map_or(0, |f| f.timers.config().stall_us / 1_000_000);
        let msg = format!(
            "fetch of image {image} stalled: no chunk arrived for {stall_s} s ({} of {} chunks present, {} peers banned); \
             the chunks so far are kept, run `image fetch` again to resume",
            img.have.count(),
            img.sizes.len(),
            img.stats.banned.len()
        );
        warn!(image = %image, "{msg}");
        img.fail_fetch(&msg);
    }

    /// The earliest deadline of every fetch's and manifest fetch's clock.
    pub(super) fn next_timer_deadline(&self) -> Option<chunks::swarm::Micros> {
        let fetches = self
            .images
            .values()
            .filter_map(|i| i.fetch.as_ref()?.timers.next_deadline());
        let manifests = self
            .manifest_fetches
            .values()
            .filter_map(|m| m.wait.next_deadline());
        fetches.chain(manifests).min()
    }
}
