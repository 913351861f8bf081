//! Image grants: "buyer B lets peer P fetch image I (until T)", signed by B.
//!
//! Images are private to their buyer. A node that serves an image (the buyer who
//! imported it, a seller that holds it) gives its manifest and chunks only to a
//! peer that presents a grant signed by the image's owner (the manifest's signer)
//! naming that peer, or a public grant (no peer) for the image. A lease carries
//! the buyer's grant for its seller ([`crate::LeaseTerms::grant`]).
//!
//! It lives here, not in `chunks`, because it is a market-level claim signed with
//! the same domain-separated machinery ([`Signed`], [`Domain`]) as offers and
//! leases, and the buyer's fleet (sans-IO, in this crate) issues one per lease.
//! The image is its 32 id bytes, so this crate needs no `chunks` dependency.

use bincode::Options;
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::keys::PeerKey;
use crate::signed::{Domain, Signed};

/// Largest encoded grant, version byte included (a real one is about 150 bytes).
pub const MAX_GRANT: usize = 512;
/// The grant encoding's version byte.
pub const GRANT_VERSION: u8 = 1;

/// The body the image's owner signs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageGrant {
    pub image: [u8; 32],
    /// The peer let in; `None`: any peer (a public image).
    pub peer: Option<PeerKey>,
    pub issued_ms: u64,
    /// Void after this (Unix ms); `None`: until the owner stops serving it.
    pub until_ms: Option<u64>,
}

impl Domain for ImageGrant {
    const DOMAIN: &'static str = "cpushare/grant/v1";
}

/// Why a grant does not let a peer in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GrantRefusal {
    #[error("the grant is for another image")]
    OtherImage,
    #[error("the grant names another peer")]
    OtherPeer,
    #[error("the grant is not signed by the image's owner")]
    NotOwner,
    #[error("the grant has expired")]
    Expired,
}

impl ImageGrant {
    /// Signs a grant with the owner's key.
    pub fn sign(
        owner: &SigningKey,
        image: [u8; 32],
        peer: Option<PeerKey>,
        issued_ms: u64,
        until_ms: Option<u64>,
    ) -> Signed<ImageGrant> {
        Signed::sign(
            owner,
            ImageGrant {
                image,
                peer,
                issued_ms,
                until_ms,
            },
        )
    }
}

impl Signed<ImageGrant> {
    /// Whether this (already signature-checked, see [`decode_grant`]) grant lets
    /// `peer` fetch `image` owned by `owner` at `now_ms`.
    pub fn admits(
        &self,
        image: &[u8; 32],
        owner: &PeerKey,
        peer: &PeerKey,
        now_ms: u64,
    ) -> Result<(), GrantRefusal> {
        if &self.body.image != image {
            return Err(GrantRefusal::OtherImage);
        }
        if &self.signer != owner {
            return Err(GrantRefusal::NotOwner);
        }
        if self.body.peer.is_some_and(|p| &p != peer) {
            return Err(GrantRefusal::OtherPeer);
        }
        if self.body.until_ms.is_some_and(|t| now_ms > t) {
            return Err(GrantRefusal::Expired);
        }
        Ok(())
    }

    /// Whether it is still good at `now_ms`.
    pub fn live(&self, now_ms: u64) -> bool {
        self.body.until_ms.is_none_or(|t| now_ms <= t)
    }
}

fn opts() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(MAX_GRANT as u64)
        .reject_trailing_bytes()
}

/// A version byte, then bincode.
pub fn encode_grant(g: &Signed<ImageGrant>) -> Vec<u8> {
    let mut out = vec![GRANT_VERSION];
    // a fixed-size struct: cannot fail
    out.extend_from_slice(&opts().serialize(g).expect("bincode of a grant"));
    out
}

/// Decodes a grant and checks its signature (size, version and trailing bytes
/// too). Whom and what it admits is [`Signed::<ImageGrant>::admits`]'s question.
pub fn decode_grant(b: &[u8]) -> Result<Signed<ImageGrant>, Error> {
    if b.len() > MAX_GRANT {
        return Err(Error::TooBig {
            size: b.len(),
            max: MAX_GRANT,
        });
    }
    let (&v, rest) = b
        .split_first()
        .ok_or_else(|| Error::Decode("empty grant".into()))?;
    if v != GRANT_VERSION {
        return Err(Error::BadVersion(v));
    }
    let g: Signed<ImageGrant> = opts()
        .deserialize(rest)
        .map_err(|e| Error::Decode(e.to_string()))?;
    g.verify()?;
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    #[test]
    fn round_trip_and_admits() {
        let owner = key(1);
        let peer = PeerKey::of(&key(2));
        let g = ImageGrant::sign(&owner, [7; 32], Some(peer), 10, Some(100));
        let bytes = encode_grant(&g);
        assert!(bytes.len() < MAX_GRANT);
        let d = decode_grant(&bytes).unwrap();
        assert_eq!(d, g);
        let own = PeerKey::of(&owner);
        assert_eq!(d.admits(&[7; 32], &own, &peer, 100), Ok(()));
        assert_eq!(
            d.admits(&[7; 32], &own, &peer, 101),
            Err(GrantRefusal::Expired)
        );
        assert_eq!(
            d.admits(&[8; 32], &own, &peer, 50),
            Err(GrantRefusal::OtherImage)
        );
        assert_eq!(
            d.admits(&[7; 32], &peer, &peer, 50),
            Err(GrantRefusal::NotOwner)
        );
        let other = PeerKey::of(&key(3));
        assert_eq!(
            d.admits(&[7; 32], &own, &other, 50),
            Err(GrantRefusal::OtherPeer)
        );
        // a public grant admits anyone, for ever
        let p = ImageGrant::sign(&owner, [7; 32], None, 10, None);
        assert_eq!(p.admits(&[7; 32], &own, &other, u64::MAX), Ok(()));
    }

    #[test]
    fn forged_grants_are_refused() {
        let owner = key(1);
        let peer = PeerKey::of(&key(2));
        let g = ImageGrant::sign(&owner, [7; 32], Some(peer), 10, Some(100));
        // the grantee widens its own grant: the signature no longer covers it
        let mut wider = g.clone();
        wider.body.until_ms = None;
        assert_eq!(
            decode_grant(&encode_grant(&wider)),
            Err(Error::BadSignature)
        );
        let mut public = g.clone();
        public.body.peer = None;
        assert_eq!(
            decode_grant(&encode_grant(&public)),
            Err(Error::BadSignature)
        );
        // a grantee that signs a grant itself is not the owner
        let self_made = ImageGrant::sign(&key(2), [7; 32], Some(peer), 10, None);
        let d = decode_grant(&encode_grant(&self_made)).unwrap();
        assert_eq!(
            d.admits(&[7; 32], &PeerKey::of(&owner), &peer, 50),
            Err(GrantRefusal::NotOwner)
        );
        // another version, trailing bytes, nothing
        let mut b = encode_grant(&g);
        b[0] = 2;
        assert_eq!(decode_grant(&b), Err(Error::BadVersion(2)));
        let mut long = encode_grant(&g);
        long.push(0);
        assert!(matches!(decode_grant(&long), Err(Error::Decode(_))));
        assert!(matches!(decode_grant(&[]), Err(Error::Decode(_))));
    }
}
