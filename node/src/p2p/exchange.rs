//! The swarm's messages from a peer: greetings, haves, requests, chunks. Each
//! feeds the image's scheduler, then `drive` carries out what it decides.

use std::collections::BTreeMap;

use chunks::swarm::{Bitfield, Decision, PeerKind, SeedAction};
use chunks::{ChunkId, ImageId};
use libp2p::PeerId;
use tracing::{debug, warn};

use super::image::{ImageSwarm, Mode};
use super::link;
use super::wire::{Body, Msg, PeerRole};
use super::Net;

impl Net {
    /// `arrived`: when the message's first and last bytes arrived (`link::clock_us`).
    pub(super) fn on_msg(&mut self, peer: PeerId, msg: Msg, arrived: (u64, u64)) {
        let image = msg.image;
        let now = self.now();
        match msg.body {
            Body::GetManifest { wait } => self.on_get_manifest(peer, image, wait),
            Body::ManifestAt { peers } => self.on_manifest_at(peer, image, peers),
            Body::Manifest(bytes) => self.on_manifest(image, peer, bytes),
            Body::NotFound => {
                if let Some(img) = self.images.get_mut(&image) {
                    img.members.remove(&peer);
                }
                self.manifest_answered_no(peer, image, None);
            }
            Body::Hello { have } => {
                let reply = self.on_hello(peer, image, have);
                self.links.send(peer, Msg::new(image, reply));
                self.drive(image);
            }
            Body::HelloAck { role, have } => self.on_hello_ack(peer, image, role, have),
            Body::Have { chunks } => self.on_have(peer, image, chunks),
            Body::Starving => {
                let now = self.now();
                if let Some(ImageSwarm {
                    mode: Mode::Seed(s),
                    ..
                }) = self.images.get_mut(&image)
                {
                    s.peer_starving(&peer, now);
                    self.drive(image);
                }
            }
            Body::GetChunk { index } => {
                if let Some(reply) = self.on_get_chunk(peer, image, index) {
                    self.links.send(peer, Msg::new(image, reply));
                }
            }
            Body::Cancel { index } => self.links.cancel(peer, image, index),
            Body::Grant(bytes) => self.on_grant(peer, image, &bytes),
            Body::Denied { reason } => self.on_denied(peer, image, reason),
            Body::Chunk {
                index,
                sent_us,
                bytes,
            } => {
                // the one-way delays, on two unrelated clocks (see link.rs)
                let delay = |at: u64| (at as i64).wrapping_sub(sent_us as i64);
                let delays = (delay(arrived.0), delay(arrived.1));
                self.on_chunk(image, index, peer, bytes, delays)
            }
            Body::Ack {
                index,
                delay_us,
                last_us,
            } => {
                self.links
                    .acked_one_way(peer, image, index, delay_us, last_us);
                self.on_have(peer, image, vec![index]);
            }
            Body::NotHave { index } => {
                if let Some(ImageSwarm {
                    mode: Mode::Leech(l),
                    ..
                }) = self.images.get_mut(&image)
                {
                    l.peer_lacks(&peer, index, now);
                }
                self.drive(image);
            }
            Body::Busy { index, wait_ms } => {
                if let Some(ImageSwarm {
                    mode: Mode::Leech(l),
                    ..
                }) = self.images.get_mut(&image)
                {
                    l.peer_busy(&peer, index, wait_ms as u64 * 1000, now);
                }
                self.drive(image);
            }
        }
    }

    fn on_hello(&mut self, peer: PeerId, image: ImageId, have: Vec<u8>) -> Body {
        if !self.ensure_image(image) {
            return Body::NotFound;
        }
        if let Some(refusal) = self.admit(peer, image) {
            return refusal;
        }
        let now = self.now();
        let img = self.images.get_mut(&image).expect("ensured");
        let Some(bf) = Bitfield::from_bytes(img.sizes.len() as u32, &have) else {
            self.rejects.bad_messages += 1;
            warn!(peer = %peer, image = %image, "malformed have-set");
            return Body::NotFound;
        };
        img.members.insert(peer);
        let reply = match &mut img.mode {
            Mode::Seed(s) => {
                s.add_peer(peer, bf, now);
                s.poll(now);
                // offers for this peer ride in the reply; others go out as Haves
                let mut offers = Bitfield::new(img.sizes.len() as u32);
                let mut others: BTreeMap<PeerId, Vec<u32>> = BTreeMap::new();
                while let Some(SeedAction::Offer { peer: to, chunk }) = s.next_action() {
                    if to == peer {
                        offers.set(chunk);
                    } else {
                        others.entry(to).or_default().push(chunk);
                    }
                }
                for (to, chunks) in others {
                    self.links.send(to, Msg::new(image, Body::Have { chunks }));
                }
                Body::HelloAck {
                    role: PeerRole::SuperSeed,
                    have: offers.to_bytes(),
                }
            }
            Mode::Leech(l) => {
                if l.add_peer(peer, bf, PeerKind::Normal, now) {
                    for c in img.early_haves.remove(&peer).unwrap_or_default() {
                        l.peer_have(&peer, c);
                    }
                }
                Body::HelloAck {
                    role: PeerRole::Peer,
                    have: img.have.to_bytes(),
                }
            }
            Mode::Done => Body::HelloAck {
                role: PeerRole::Peer,
                have: img.have.to_bytes(),
            },
        };
        // both sides know each other now: no need to greet back
        img.greeted.insert(peer);
        reply
    }

    fn on_hello_ack(&mut self, peer: PeerId, image: ImageId, role: PeerRole, have: Vec<u8>) {
        let now = self.now();
        let Some(img) = self.images.get_mut(&image) else {
            return;
        };
        let Some(bf) = Bitfield::from_bytes(img.sizes.len() as u32, &have) else {
            self.rejects.bad_messages += 1;
            warn!(peer = %peer, image = %image, "malformed have-set");
            return;
        };
        img.members.insert(peer);
        match &mut img.mode {
            Mode::Leech(l) => {
                let kind = match role {
                    PeerRole::SuperSeed => {
                        img.seeds.insert(peer);
                        PeerKind::SuperSeed
                    }
                    PeerRole::Peer => PeerKind::Normal,
                };
                if l.add_peer(peer, bf, kind, now) {
                    for c in img.early_haves.remove(&peer).unwrap_or_default() {
                        l.peer_have(&peer, c);
                    }
                }
            }
            Mode::Seed(s) => s.add_peer(peer, bf, now),
            Mode::Done => {}
        }
        self.drive(image);
    }

    fn on_have(&mut self, peer: PeerId, image: ImageId, chunks: Vec<u32>) {
        let now = self.now();
        for &c in &chunks {
            self.links.acked(peer, image, c);
        }
        let Some(img) = self.images.get_mut(&image) else {
            return;
        };
        let n = img.sizes.len() as u32;
        if chunks.iter().any(|&c| c >= n) {
            self.rejects.bad_messages += 1;
            warn!(peer = %peer, image = %image, "have names a chunk beyond the image");
            return;
        }
        match &mut img.mode {
            Mode::Seed(s) => {
                for c in chunks {
                    s.peer_have(&peer, c, now);
                }
            }
            Mode::Leech(l) => {
                if img.members.contains(&peer) && !l.is_banned(&peer) {
                    for c in chunks {
                        l.peer_have(&peer, c);
                    }
                } else {
                    img.early_haves.entry(peer).or_default().extend(chunks);
                }
            }
            Mode::Done => {}
        }
        self.drive(image);
    }

    /// Queues the chunk for `peer`, or says why not.
    fn on_get_chunk(&mut self, peer: PeerId, image: ImageId, index: u32) -> Option<Body> {
        if !self.ensure_image(image) {
            return Some(Body::NotFound);
        }
        if let Some(refusal) = self.admit(peer, image) {
            return Some(refusal);
        }
        let now = self.now();
        let img = self.images.get_mut(&image).expect("ensured");
        if index as usize >= img.sizes.len() || !img.have.get(index) {
            return Some(Body::NotHave { index });
        }
        // rarest first among our waiting replies: each copy of a rare chunk is
        // a new source for the swarm
        let prio = match &mut img.mode {
            Mode::Seed(s) => {
                if s.on_request(&peer, index, now) == Decision::Refuse {
                    return Some(Body::NotHave { index });
                }
                // every chunk a super-seed sends is new: no urgency among them
                link::ORDINARY
            }
            Mode::Leech(l) => l.availability(index),
            // a finished seller no longer follows who holds what
            Mode::Done => link::ORDINARY,
        };
        if !matches!(img.mode, Mode::Seed(_)) {
            // a relay answers Busy rather than queue a request long behind its
            // uplink: the requester asks a holder that serves it sooner
            let size = img.sizes[index as usize] as u64;
            if let Err(wait_us) = self.links.admit(size) {
                return Some(Body::Busy {
                    index,
                    wait_ms: wait_us.div_ceil(1000) as u32,
                });
            }
        }
        match self.store.get_chunk(&img.chunk_ids[index as usize]) {
            Ok(Some(mut bytes)) => {
                self.fault.chunk(&mut bytes);
                self.links.send_chunk(peer, image, index, bytes, prio);
                None
            }
            Ok(None) | Err(_) => {
                img.have.clear(index);
                if let Mode::Seed(s) = &mut img.mode {
                    s.on_sent(&peer, index, false, now);
                }
                Some(Body::NotHave { index })
            }
        }
    }

    fn on_chunk(
        &mut self,
        image: ImageId,
        index: u32,
        peer: PeerId,
        bytes: Vec<u8>,
        (delay_us, last_us): (i64, i64),
    ) {
        let now = self.now();
        let Some(img) = self.images.get_mut(&image) else {
            return;
        };
        let Some(&id) = img.chunk_ids.get(index as usize) else {
            self.rejects.bad_messages += 1;
            warn!(peer = %peer, image = %image, chunk = index, "chunk index beyond the image");
            return;
        };
        if ChunkId::of(&bytes) != id {
            img.stats.bad_chunks += 1;
            self.rejects.bad_chunks += 1;
            warn!(peer = %peer, image = %image, chunk = index, "chunk failed its hash; banning peer for this image");
            if let Mode::Leech(l) = &mut img.mode {
                l.on_chunk(&peer, index, false, now);
            }
            self.drive(image);
            return;
        }
        // the sender's upload budget waits for this (duplicates too); it is a
        // Have of the chunk that carries the one-way delay back
        self.links.send(
            peer,
            Msg::new(
                image,
                Body::Ack {
                    index,
                    delay_us,
                    last_us,
                },
            ),
        );
        let Mode::Leech(l) = &mut img.mode else {
            return;
        };
        img.stats.downloaded_bytes += bytes.len() as u64;
        img.stats.chunks_downloaded += 1;
        debug!(image = %image, chunk = index, from = %peer, dup = img.have.get(index), "chunk received");
        if img.have.get(index) {
            img.stats.duplicate_chunks += 1;
        } else {
            match self.store.put_chunk(&id, &bytes) {
                Ok(_) => {
                    img.have.set(index);
                    img.have_bytes += bytes.len() as u64;
                    // the sender too: a super-seed tops up its offers on this.
                    // Not to a peer we know holds the chunk: nothing it could ask
                    // for changes (libtorrent's send_redundant_have off; 14 % fewer
                    // events at 1,000 simulated sellers with 1 MiB chunks).
                    // A super-seed hears of every chunk: its offers follow them.
                    for m in img.members.iter().filter(|m| **m != peer) {
                        if img.seeds.contains(m) {
                            img.slow_have_queue.entry(*m).or_default().push(index);
                        } else if !l.peer_has(m, index) {
                            img.have_queue.entry(*m).or_default().push(index);
                        }
                    }
                }
                Err(e) => {
                    warn!(image = %image, error = %e, "cannot store chunk; fetch aborted");
                    img.fail_fetch(&e.to_string());
                    img.mode = Mode::Done;
                    return;
                }
            }
        }
        l.on_chunk(&peer, index, true, now);
        if let Some(f) = &mut img.fetch {
            if f.timers.on_progress(now) {
                for w in &f.waiters {
                    w.progress.report("fetch", img.have_bytes, img.total);
                }
            }
        }
        self.drive(image);
    }
}
