//! Image privacy: who may fetch which image.
//!
//! Images are private to their buyer. A node serving an image (the buyer that
//! imported it, a seller holding it) answers a manifest, hello or chunk request
//! only from a peer whose grant, signed by the image's owner (the manifest's
//! signer), admits it: one the peer presented on this connection, or one in our
//! own book (grants we issued as the buyer, or a public grant handed to us). A peer
//! let in by our book is handed that grant, so it can present it to other holders:
//! sellers holding a grant keep sharing with each other.
//!
//! The book lives in `DATA_DIR/grants/*.grant` (one encoded grant a file, named by
//! its hash), written by `image grant`, a lease or a grant handed to us; presented
//! grants are kept per peer until it disconnects. Time (Unix ms) comes in as
//! `now_ms` from the shell.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use chunks::ImageId;
use libp2p::PeerId;
use market::{decode_grant, encode_grant, ImageGrant, PeerKey, Signed};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedSender;
use tracing::warn;

use super::handle::Cmd;
use super::image::Mode;
use super::wire::{Body, DenyReason, Msg};
use super::Net;
use crate::error::{Error, Result};
use crate::identity::key_of_peer;
use crate::node::Node;

/// Most images one peer may hold presented grants for at a time (a peer
/// cannot grow our memory by presenting grants for endless images).
const MAX_PRESENTED_PER_PEER: usize = 256;

/// The provider key an image is advertised under in the DHT: derived from the
/// image id, so a provider record does not reveal it (and nobody can look an
/// image up without knowing its id).
pub(super) fn provider_key(image: &ImageId) -> [u8; 32] {
    blake3::derive_key("cpushare provider key v1", &image.0)
}

/// Unix time in ms (the shell's clock for grant expiry).
pub(super) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(super) struct Grants {
    dir: PathBuf,
    me: PeerKey,
    /// Grants we issued or that admit us, by image.
    book: HashMap<ImageId, Vec<Signed<ImageGrant>>>,
    /// Grants peers presented, until they disconnect.
    presented: HashMap<PeerId, HashMap<ImageId, Signed<ImageGrant>>>,
    /// (peer, image): our grant for `image` went to `peer` on this link
    /// (presented or handed on).
    sent: HashSet<(PeerId, ImageId)>,
    /// Each image's owner, from its manifest.
    owners: HashMap<ImageId, PeerKey>,
    /// Grants handed to us for an image we are fetching whose manifest (and
    /// so whose owner) we do not know yet.
    pending: HashMap<ImageId, Vec<Signed<ImageGrant>>>,
}

impl Grants {
    /// Loads the book from `dir` (bad files are skipped with a warning).
    pub fn load(dir: &Path, me: PeerKey) -> Grants {
        let mut g = Grants {
            dir: dir.to_path_buf(),
            me,
            book: HashMap::new(),
            presented: HashMap::new(),
            sent: HashSet::new(),
            owners: HashMap::new(),
            pending: HashMap::new(),
        };
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_none_or(|x| x != "grant") {
                    continue;
                }
                match std::fs::read(&p)
                    .map_err(|e| e.to_string())
                    .and_then(|b| decode_grant(&b).map_err(|e| e.to_string()))
                {
                    Ok(grant) => g.insert(grant),
                    Err(e) => warn!(file = %p.display(), error = %e, "skipping unreadable grant"),
                }
            }
        }
        g
    }

    fn insert(&mut self, g: Signed<ImageGrant>) {
        let list = self.book.entry(ImageId(g.body.image)).or_default();
        if !list.contains(&g) {
            list.push(g);
        }
    }

    /// Adds a grant to the book and the data directory, if it is one we issued or
    /// one that admits us; others are of no use to us and are dropped.
    pub fn add(&mut self, g: Signed<ImageGrant>) -> std::io::Result<()> {
        let useful = g.signer == self.me || g.body.peer.is_none() || g.body.peer == Some(self.me);
        let known = self
            .book
            .get(&ImageId(g.body.image))
            .is_some_and(|l| l.contains(&g));
        if !useful || known {
            return Ok(());
        }
        let bytes = encode_grant(&g);
        std::fs::create_dir_all(&self.dir)?;
        let name = format!("{}.grant", &blake3::hash(&bytes).to_hex()[..32]);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, self.dir.join(name))?;
        self.insert(g);
        Ok(())
    }

    /// Remembers `image`'s owner (the manifest's signer); grants handed to us
    /// before we knew it go into the book if the owner signed them.
    pub fn set_owner(&mut self, image: ImageId, owner: PeerKey) {
        self.owners.insert(image, owner);
        for g in self.pending.remove(&image).unwrap_or_default() {
            if g.signer == owner {
                if let Err(e) = self.add(g) {
                    warn!(image = %image, error = %e, "cannot store a grant handed to us");
                }
            }
        }
    }

    pub fn owner(&self, image: &ImageId) -> Option<PeerKey> {
        self.owners.get(image).copied()
    }

    /// Our grant for `image` to present to `peer`, once per link.
    pub fn grant_to_present(
        &mut self,
        peer: PeerId,
        image: ImageId,
        now_ms: u64,
    ) -> Option<Vec<u8>> {
        if self.sent.contains(&(peer, image)) {
            return None;
        }
        let me = self.me;
        let owner = self.owner(&image);
        // a grant naming us before a public one; the owner's, when we know it
        // (until then, one handed to us with the fetch, e.g. before a redirect)
        let g = self
            .book
            .get(&image)
            .into_iter()
            .chain(self.pending.get(&image))
            .flatten()
            .filter(|g| g.live(now_ms) && owner.is_none_or(|o| g.signer == o))
            .filter(|g| g.body.peer == Some(me) || g.body.peer.is_none())
            .max_by_key(|g| g.body.peer.is_some())?;
        self.sent.insert((peer, image));
        Some(encode_grant(g))
    }

    /// A peer presented (or handed us) a grant. Checks its signature; keeps it
    /// as that peer's credential, and in our book when it admits us and is the
    /// owner's (`fetching`: we are getting that image and may not know its owner
    /// yet; then it waits for the manifest). Nobody fills our disk with grants
    /// for images we do not want.
    pub fn on_presented(
        &mut self,
        peer: PeerId,
        bytes: &[u8],
        fetching: bool,
    ) -> Result<ImageId, market::Error> {
        let g = decode_grant(bytes)?;
        let image = ImageId(g.body.image);
        if g.body.peer.is_none() || g.body.peer == Some(self.me) {
            match self.owner(&image) {
                Some(o) if o == g.signer => {
                    if let Err(e) = self.add(g.clone()) {
                        warn!(image = %image, error = %e, "cannot store a grant handed to us");
                    }
                }
                None if fetching => {
                    let p = self.pending.entry(image).or_default();
                    if p.len() < 8 && !p.contains(&g) {
                        p.push(g.clone());
                    }
                }
                _ => {}
            }
        }
        let per = self.presented.entry(peer).or_default();
        if per.len() < MAX_PRESENTED_PER_PEER || per.contains_key(&image) {
            per.insert(image, g);
        }
        Ok(image)
    }

    /// Whether `peer` may have `image` (owned by `owner`) now. `Ok(Some(bytes))`:
    /// admitted by a grant of our book that the peer has not been handed yet.
    pub fn check(
        &mut self,
        peer: PeerId,
        image: ImageId,
        owner: PeerKey,
        now_ms: u64,
    ) -> Result<Option<Vec<u8>>, DenyReason> {
        let Some(key) = key_of_peer(&peer) else {
            return Err(DenyReason::NoGrant);
        };
        if key == owner {
            return Ok(None);
        }
        let presented = self.presented.get(&peer).and_then(|m| m.get(&image));
        let shown = presented.map(|g| g.admits(&image.0, &owner, &key, now_ms));
        if shown == Some(Ok(())) {
            return Ok(None);
        }
        let ours = self.book.get(&image).and_then(|l| {
            l.iter()
                .filter(|g| g.admits(&image.0, &owner, &key, now_ms).is_ok())
                .max_by_key(|g| g.body.peer.is_some())
        });
        if let Some(g) = ours {
            let hand = self.sent.insert((peer, image)).then(|| encode_grant(g));
            return Ok(hand);
        }
        Err(match shown {
            Some(Err(r)) => r.into(),
            _ => DenyReason::NoGrant,
        })
    }

    /// Our link to `peer` went down: present again on the next one.
    pub fn link_down(&mut self, peer: &PeerId) {
        self.sent.retain(|(p, _)| p != peer);
    }

    /// `peer` disconnected: its presented grants go too.
    pub fn disconnected(&mut self, peer: &PeerId) {
        self.presented.remove(peer);
        self.link_down(peer);
    }
}

impl Net {
    /// `image`'s owner, from the stored manifest (cached).
    pub(super) fn owner_of(&mut self, image: ImageId) -> Option<PeerKey> {
        if let Some(o) = self.grants.owner(&image) {
            return Some(o);
        }
        let m = self.store.get_manifest(image).ok()??;
        let o = PeerKey(m.importer().to_bytes());
        self.grants.set_owner(image, o);
        Some(o)
    }

    /// Presents our grant for `image` to `peer` before a request (once a link).
    pub(super) fn present(&mut self, peer: PeerId, image: ImageId) {
        if let Some(b) = self.grants.grant_to_present(peer, image, unix_ms()) {
            self.links.send(peer, Msg::new(image, Body::Grant(b)));
        }
    }

    /// Whether `peer` may have `image` (whose manifest we hold): `None` if so
    /// (handing it the grant of our book that lets it in, once); the refusal
    /// to send otherwise, counted and logged.
    pub(super) fn admit(&mut self, peer: PeerId, image: ImageId) -> Option<Body> {
        let Some(owner) = self.owner_of(image) else {
            return Some(Body::NotFound);
        };
        match self.grants.check(peer, image, owner, unix_ms()) {
            Ok(hand) => {
                if let Some(b) = hand {
                    self.links.send(peer, Msg::new(image, Body::Grant(b)));
                }
                None
            }
            Err(reason) => {
                self.rejects.refused_no_grant += 1;
                warn!(peer = %peer, image = %image, reason = reason.describe(), "refused a request for a private image");
                Some(Body::Denied { reason })
            }
        }
    }

    /// A peer presented a grant, or handed us one.
    pub(super) fn on_grant(&mut self, peer: PeerId, image: ImageId, bytes: &[u8]) {
        let fetching = self.manifest_fetches.contains_key(&image)
            || self
                .images
                .get(&image)
                .is_some_and(|i| matches!(i.mode, Mode::Leech(_)));
        match self.grants.on_presented(peer, bytes, fetching) {
            Ok(i) if i == image => {}
            Ok(_) => {
                self.rejects.bad_messages += 1;
                warn!(peer = %peer, image = %image, "grant for another image than its message names");
            }
            Err(e) => {
                self.rejects.bad_messages += 1;
                warn!(peer = %peer, image = %image, error = %e, "rejected grant");
            }
        }
    }

    /// A holder refused us `image`: a manifest fetch counts the refusal (and
    /// fails with it once every peer asked has said no); a chunk fetch stops
    /// asking that peer.
    pub(super) fn on_denied(&mut self, peer: PeerId, image: ImageId, reason: DenyReason) {
        warn!(peer = %peer, image = %image, reason = reason.describe(), "a peer refused us a private image");
        if self.manifest_fetches.contains_key(&image) {
            self.manifest_answered_no(peer, image, Some(reason));
            return;
        }
        if let Some(img) = self.images.get_mut(&image) {
            img.members.remove(&peer);
            if let Mode::Leech(l) = &mut img.mode {
                l.remove_peer(&peer);
            }
            self.drive(image);
        }
    }
}

/// `image.grant`: the buyer signs a grant for an image it imported.
pub(super) fn issue(node: &Node, tx: &UnboundedSender<Cmd>, params: &Value) -> Result<Value> {
    let id = params["id"].as_str().unwrap_or_default();
    let image: ImageId = id.parse().map_err(|_| Error::BadArg {
        what: "image id",
        reason: format!("{id:?} is not a 64-digit hex image id"),
    })?;
    let peer = match params["peer"].as_str() {
        None => None,
        Some(p) => Some(parse_peer(p)?),
    };
    let until_ms = params["until_ms"].as_u64();
    let m = node
        .store
        .get_manifest(image)?
        .ok_or_else(|| Error::BadArg {
            what: "image",
            reason: format!("image {image} is not in this node's store"),
        })?;
    let sk = node.identity.signing_key();
    let me = PeerKey::of(sk);
    let owner = PeerKey(m.importer().to_bytes());
    if owner != me {
        return Err(Error::BadArg {
            what: "image",
            reason: format!(
                "image {image} was imported by another node (key {owner}); only its buyer can grant it"
            ),
        });
    }
    let now = unix_ms();
    if until_ms.is_some_and(|t| t <= now) {
        return Err(Error::BadArg {
            what: "--until",
            reason: "the grant would already have expired".into(),
        });
    }
    let g = ImageGrant::sign(sk, image.0, peer, now, until_ms);
    let bytes = encode_grant(&g);
    let _ = tx.send(Cmd::Grant(g));
    Ok(json!({
        "image": image.to_hex(),
        "peer": peer.and_then(|k| crate::identity::peer_of_key(&k)).map(|p| p.to_string()),
        "until_ms": until_ms,
        "grant": hex::encode(bytes),
    }))
}

/// A peer id (`12D3Koo...`) or a 64-hex ed25519 key.
fn parse_peer(s: &str) -> Result<PeerKey> {
    if let Ok(k) = s.parse::<PeerKey>() {
        return Ok(k);
    }
    s.parse::<PeerId>()
        .ok()
        .and_then(|p| key_of_peer(&p))
        .ok_or_else(|| Error::BadArg {
            what: "peer",
            reason: format!("{s:?} is neither a peer id (12D3Koo...) nor a 64-hex key"),
        })
}

/// A grant given on the command line (`image fetch --grant HEX`).
pub(super) fn parse_grant(hex_str: &str) -> Result<Signed<ImageGrant>> {
    let bytes = hex::decode(hex_str.trim()).map_err(|_| Error::BadArg {
        what: "grant",
        reason: "not hex".into(),
    })?;
    decode_grant(&bytes).map_err(|e| Error::BadArg {
        what: "grant",
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    fn peer(sk: &SigningKey) -> PeerId {
        crate::identity::peer_of_key(&PeerKey::of(sk)).unwrap()
    }

    #[test]
    fn book_presented_and_handed_grants() {
        let dir = tempfile::tempdir().unwrap();
        let buyer = SigningKey::from_bytes(&[1; 32]);
        let s1 = SigningKey::from_bytes(&[2; 32]);
        let s2 = SigningKey::from_bytes(&[3; 32]);
        let stranger = SigningKey::from_bytes(&[4; 32]);
        let owner = PeerKey::of(&buyer);
        let image = ImageId([9; 32]);

        // the buyer's book: a grant it issued to s1
        let mut b = Grants::load(dir.path(), owner);
        let g1 = ImageGrant::sign(&buyer, image.0, Some(PeerKey::of(&s1)), 0, Some(1000));
        b.add(g1.clone()).unwrap();
        // s1 is let in and handed its grant once
        let hand = b.check(peer(&s1), image, owner, 10).unwrap();
        assert_eq!(hand, Some(encode_grant(&g1)));
        assert_eq!(b.check(peer(&s1), image, owner, 10), Ok(None));
        // expired, a stranger, the owner itself
        assert_eq!(
            b.check(peer(&s1), image, owner, 1001),
            Err(DenyReason::NoGrant)
        );
        assert_eq!(
            b.check(peer(&stranger), image, owner, 10),
            Err(DenyReason::NoGrant)
        );
        assert_eq!(b.check(peer(&buyer), image, owner, 10), Ok(None));
        // survives a restart
        let mut again = Grants::load(dir.path(), owner);
        assert!(again.check(peer(&s1), image, owner, 10).is_ok());

        // s2, holding the image, checks s1's presented grant
        let dir2 = tempfile::tempdir().unwrap();
        let mut h = Grants::load(dir2.path(), PeerKey::of(&s2));
        h.on_presented(peer(&s1), &encode_grant(&g1), false)
            .unwrap();
        assert_eq!(h.check(peer(&s1), image, owner, 10), Ok(None));
        // a grant for s1 presented by the stranger does not admit the stranger
        h.on_presented(peer(&stranger), &encode_grant(&g1), false)
            .unwrap();
        assert_eq!(
            h.check(peer(&stranger), image, owner, 10),
            Err(DenyReason::OtherPeer)
        );
        // a grant the stranger signed itself is not the owner's
        let own = ImageGrant::sign(&stranger, image.0, None, 0, None);
        h.on_presented(peer(&stranger), &encode_grant(&own), false)
            .unwrap();
        assert_eq!(
            h.check(peer(&stranger), image, owner, 10),
            Err(DenyReason::NotOwner)
        );
        h.disconnected(&peer(&s1));
        assert_eq!(
            h.check(peer(&s1), image, owner, 10),
            Err(DenyReason::NoGrant)
        );

        // s1 handed its own grant keeps it to present, once per link; before the
        // manifest names the owner too (a redirect comes before the manifest)
        let dir3 = tempfile::tempdir().unwrap();
        let mut s = Grants::load(dir3.path(), PeerKey::of(&s1));
        s.on_presented(peer(&buyer), &encode_grant(&g1), true)
            .unwrap();
        assert_eq!(
            s.grant_to_present(peer(&s2), image, 10),
            Some(encode_grant(&g1))
        );
        assert_eq!(s.grant_to_present(peer(&s2), image, 10), None);
        s.set_owner(image, owner);
        s.link_down(&peer(&s2));
        assert!(s.grant_to_present(peer(&s2), image, 10).is_some());
        assert!(s.grant_to_present(peer(&buyer), image, 2000).is_none());
        // kept on disk once the owner is known
        let mut again = Grants::load(dir3.path(), PeerKey::of(&s1));
        assert!(again.grant_to_present(peer(&s2), image, 10).is_some());

        // handed a grant for an image we are not fetching: not kept
        let dir4 = tempfile::tempdir().unwrap();
        let mut x = Grants::load(dir4.path(), PeerKey::of(&s1));
        x.on_presented(peer(&buyer), &encode_grant(&g1), false)
            .unwrap();
        assert_eq!(x.grant_to_present(peer(&s2), image, 10), None);
        assert_eq!(std::fs::read_dir(dir4.path()).map_or(0, |d| d.count()), 0);
    }
}
