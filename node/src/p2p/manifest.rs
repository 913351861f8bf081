//! Getting a manifest (asking around, following a super-seed's redirect, giving
//! up; the waits are `chunks::swarm::ManifestWait`'s) and serving one.

use std::collections::HashSet;

use chunks::swarm::{ManifestAction, ManifestWait, TimerConfig};
use chunks::{ImageId, SignedManifest};
use libp2p::PeerId;
use tracing::{debug, info, warn};

use super::handle::Waiter;
use super::wire::{self, Body, Msg};
use super::Net;
use crate::domain::Role;

/// An image whose manifest we are waiting for.
pub(super) struct ManifestFetch {
    pub asked: HashSet<PeerId>,
    pub waiters: Vec<Waiter>,
    /// Peers a super-seed sent to us: they get the manifest once we have it.
    pub forward: Vec<PeerId>,
    pub wait: ManifestWait<PeerId>,
    /// Peers that answered they cannot give it (not found, or refused).
    pub answered_no: HashSet<PeerId>,
    /// The last refusal (a private image and no grant for us), kept for the
    /// error if nobody gives the manifest.
    pub refused: Option<(PeerId, wire::DenyReason)>,
}

impl Net {
    /// Starts (or joins) the wait for `image`'s manifest.
    pub(super) fn fetch_manifest(&mut self, image: ImageId, w: Waiter) {
        let now = self.now();
        let mf = self
            .manifest_fetches
            .entry(image)
            .or_insert_with(|| ManifestFetch {
                asked: HashSet::new(),
                waiters: Vec::new(),
                forward: Vec::new(),
                wait: ManifestWait::new(now, TimerConfig::default()),
                answered_no: HashSet::new(),
                refused: None,
            });
        mf.waiters.push(w);
        self.ask_manifest(image);
        self.find_providers(image);
    }

    /// Asks every connected peer not asked yet for the manifest.
    pub(super) fn ask_manifest(&mut self, image: ImageId) {
        let peers: Vec<PeerId> = self.connected.iter().copied().collect();
        for p in peers {
            self.ask_manifest_from(image, p);
        }
    }

    pub(super) fn ask_manifest_from(&mut self, image: ImageId, p: PeerId) {
        let Some(mf) = self.manifest_fetches.get_mut(&image) else {
            return;
        };
        if !mf.asked.insert(p) {
            return;
        }
        self.present(p, image);
        self.links
            .send(p, Msg::new(image, Body::GetManifest { wait: false }));
    }

    pub(super) fn on_manifest(&mut self, image: ImageId, from: PeerId, bytes: Vec<u8>) {
        if !self.manifest_fetches.contains_key(&image) {
            return;
        }
        let m = match SignedManifest::decode_for(image, &bytes) {
            Ok(m) => m,
            Err(e) => {
                self.rejects.bad_manifests += 1;
                warn!(peer = %from, image = %image, error = %e, "rejected manifest");
                return;
            }
        };
        let mf = self.manifest_fetches.remove(&image).expect("checked");
        // grants handed to us before the manifest are kept if its owner signed them
        self.grants
            .set_owner(image, market::PeerKey(m.importer().to_bytes()));
        if let Err(e) = self.store.put_manifest(&m) {
            let msg = format!("storing manifest: {e}");
            for w in mf.waiters {
                w.fail(&msg);
            }
            return;
        }
        info!(image = %image, peer = %from, forward = mf.forward.len(), "manifest verified");
        for p in mf.forward {
            let reply = self
                .admit(p, image)
                .unwrap_or_else(|| Body::Manifest(m.as_bytes().to_vec()));
            self.links.send(p, Msg::new(image, reply));
        }
        self.start_leech(image, m, mf.waiters);
    }

    /// Serves a manifest. A super-seed's uplink is the swarm's bottleneck, so
    /// it sends each manifest about once: a requester is pointed at peers that
    /// already have it (or are getting it and will pass it on); one that comes
    /// back anyway gets it directly.
    pub(super) fn on_get_manifest(&mut self, peer: PeerId, image: ImageId, wait: bool) {
        let reply = match self.store.get_manifest(image) {
            Ok(Some(m)) => {
                self.grants
                    .set_owner(image, market::PeerKey(m.importer().to_bytes()));
                if let Some(refusal) = self.admit(peer, image) {
                    self.links.send(peer, Msg::new(image, refusal));
                    return;
                }
                let given = self.manifest_given.entry(image).or_default();
                given.retain(|p| self.connected.contains(p));
                if self.role == Role::Buyer
                    && !given.is_empty()
                    && self.redirected.insert((image, peer))
                {
                    let peers: Vec<PeerId> = given
                        .iter()
                        .rev()
                        .filter(|p| **p != peer)
                        .take(wire::MAX_REDIRECT)
                        .copied()
                        .collect();
                    if !given.contains(&peer) {
                        given.push(peer);
                    }
                    if peers.is_empty() {
                        self.redirected.remove(&(image, peer));
                        self.manifest_body(&m)
                    } else {
                        Body::ManifestAt { peers }
                    }
                } else {
                    if !given.contains(&peer) {
                        given.push(peer);
                    }
                    self.manifest_body(&m)
                }
            }
            _ => match self.manifest_fetches.get_mut(&image) {
                Some(mf) if wait => {
                    if !mf.forward.contains(&peer) {
                        mf.forward.push(peer);
                    }
                    return;
                }
                _ => Body::NotFound,
            },
        };
        self.links.send(peer, Msg::new(image, reply));
    }

    fn manifest_body(&self, m: &SignedManifest) -> Body {
        let mut b = m.as_bytes().to_vec();
        self.fault.manifest(&mut b);
        Body::Manifest(b)
    }

    /// A super-seed pointed us at peers with the manifest: ask one of them
    /// (picked by our own id, so requesters spread out), and the seed again
    /// if that takes too long.
    pub(super) fn on_manifest_at(&mut self, seed: PeerId, image: ImageId, peers: Vec<PeerId>) {
        let me = *self.swarm.local_peer_id();
        let now = self.now();
        let Some(mf) = self.manifest_fetches.get_mut(&image) else {
            return;
        };
        let peers: Vec<PeerId> = peers.into_iter().filter(|p| *p != me).collect();
        if peers.is_empty() {
            return;
        }
        let pick = peers[(self.rng_seed as usize) % peers.len()];
        mf.asked.insert(pick);
        mf.wait.on_redirect(seed, now);
        debug!(image = %image, seed = %seed, via = %pick, "manifest redirected");
        self.present(pick, image);
        self.links
            .send(pick, Msg::new(image, Body::GetManifest { wait: true }));
    }

    /// Carries out what the manifest fetches' clocks say is due.
    pub(super) fn poll_manifest_waits(&mut self) {
        let now = self.now();
        let mut due = Vec::new();
        for (image, mf) in self.manifest_fetches.iter_mut() {
            mf.wait.poll(now);
            while let Some(a) = mf.wait.next_action() {
                due.push((*image, a));
            }
        }
        for (image, a) in due {
            match a {
                ManifestAction::AskAround => {
                    self.ask_manifest(image);
                    self.find_providers(image);
                }
                ManifestAction::AskSeed { seed } => {
                    self.present(seed, image);
                    self.links
                        .send(seed, Msg::new(image, Body::GetManifest { wait: false }));
                }
                ManifestAction::GiveUp => self.give_up_manifest(image),
            }
        }
    }

    fn give_up_manifest(&mut self, image: ImageId) {
        let Some(mf) = self.manifest_fetches.remove(&image) else {
            return;
        };
        let msg = if let Some((peer, reason)) = mf.refused {
            self.refused_message(peer, image, reason)
        } else if self.rejects.bad_manifests > 0 {
            format!(
                "no peer gave a valid manifest for image {image} ({} rejected as invalid)",
                self.rejects.bad_manifests
            )
        } else {
            format!("no peer has image {image} (asked {} peers)", mf.asked.len())
        };
        self.fail_manifest(image, mf, &msg);
    }

    /// Ends a fetch that got no manifest: its waiters get `msg`, the peers a
    /// super-seed sent to us hear we do not have it.
    fn fail_manifest(&mut self, image: ImageId, mf: ManifestFetch, msg: &str) {
        for w in mf.waiters {
            w.fail(msg);
        }
        for p in mf.forward {
            self.links.send(p, Msg::new(image, Body::NotFound));
        }
    }

    /// `peer` cannot give us `image`'s manifest (`refused`: it holds the image
    /// but it is private and we hold no grant). Another holder may still give
    /// it: one that has not yet heard of the image's grants refuses while the
    /// buyer admits (seen with 12-24 sellers fetching a public image at once).
    /// So the fetch fails with the refusal only once every peer asked has said
    /// no and one of them refused; else it waits for its clock.
    pub(super) fn manifest_answered_no(
        &mut self,
        peer: PeerId,
        image: ImageId,
        refused: Option<wire::DenyReason>,
    ) {
        let Some(mf) = self.manifest_fetches.get_mut(&image) else {
            return;
        };
        mf.answered_no.insert(peer);
        if let Some(r) = refused {
            mf.refused = Some((peer, r));
        }
        let Some((by, reason)) = mf.refused else {
            return;
        };
        if !mf.asked.iter().all(|p| mf.answered_no.contains(p)) {
            return;
        }
        let mf = self.manifest_fetches.remove(&image).expect("checked");
        let msg = self.refused_message(by, image, reason);
        self.fail_manifest(image, mf, &msg);
    }

    fn refused_message(&self, peer: PeerId, image: ImageId, reason: wire::DenyReason) -> String {
        let me = *self.swarm.local_peer_id();
        format!(
            "peer {peer} refused image {image}: the image is private and {}; \
             its buyer can let this node in with `cpushare-node image grant {image} {me}`",
            reason.describe()
        )
    }
}
