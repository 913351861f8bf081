//! Sellers' signed offers and the book of the newest valid offer per seller.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::keys::PeerKey;
use crate::signed::{Domain, Signed};

/// How far ahead of our clock an offer's issue time may be.
pub const MAX_SKEW_MS: u64 = 5 * 60 * 1000;
/// The longest an offer may be valid for.
pub const MAX_OFFER_LIFE_MS: u64 = 60 * 60 * 1000;

/// Whether the seller's guests run with hardware virtualization.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// Which VM backend the seller runs guests with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum BackendKind {
    Qemu,
    Microvm,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Qemu => "qemu",
            BackendKind::Microvm => "microvm",
        })
    }
}

/// What a seller offers, per guest, until `expires_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    pub seller: PeerKey,
    /// Grows with every new offer from this seller; older ones are replays.
    pub seq: u64,
    pub issued_ms: u64,
    pub expires_ms: u64,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_cap_mib: u64,
    pub price_per_min: u64,
    pub backend: BackendKind,
    pub accel: Accel,
    /// Higher is faster.
    pub perf_score: u32,
    /// Hash of the node binary (and boot medium), checked against trust lists.
    pub measurement: [u8; 32],
    pub max_guests: u32,
    pub free_guests: u32,
}

impl Domain for Offer {
    const DOMAIN: &'static str = "cpushare/offer/v1";
}

/// The newest valid offer per seller.
#[derive(Clone, Debug, Default)]
pub struct OfferBook {
    offers: BTreeMap<PeerKey, Signed<Offer>>,
    /// Highest seq seen per seller; kept after its offer expires so that an old,
    /// still unexpired offer cannot be replayed in its place.
    seqs: BTreeMap<PeerKey, u64>,
}

impl OfferBook {
    pub fn new() -> Self {
        Self::default()
    }

    /// Ok(true) new or newer, Ok(false) same seq again (duplicate, ignored).
    pub fn insert(&mut self, offer: Signed<Offer>, now_ms: u64) -> Result<bool, Error> {
        let o = offer.verify()?;
        if offer.signer != o.seller {
            return Err(Error::SignerMismatch);
        }
        if o.expires_ms <= now_ms || o.expires_ms <= o.issued_ms {
            return Err(Error::Expired);
        }
        if o.issued_ms > now_ms.saturating_add(MAX_SKEW_MS) {
            return Err(Error::FromFuture);
        }
        if o.expires_ms - o.issued_ms > MAX_OFFER_LIFE_MS {
            return Err(Error::TooLong);
        }
        match self.seqs.get(&o.seller) {
            Some(&known) if o.seq < known => return Err(Error::Replayed),
            Some(&known) if o.seq == known => return Ok(false),
            _ => {}
        }
        self.seqs.insert(o.seller, o.seq);
        self.offers.insert(o.seller, offer);
        Ok(true)
    }

    /// Drops offers whose expiry has passed.
    pub fn expire(&mut self, now_ms: u64) {
        self.offers.retain(|_, o| o.body.expires_ms > now_ms);
    }

    pub fn get(&self, seller: &PeerKey) -> Option<&Signed<Offer>> {
        self.offers.get(seller)
    }

    /// Offers not yet expired at `now_ms`, in seller-key order.
    pub fn live(&self, now_ms: u64) -> impl Iterator<Item = &Offer> {
        self.offers
            .values()
            .map(|s| &s.body)
            .filter(move |o| o.expires_ms > now_ms)
    }

    /// Offers held (expired ones count until `expire`).
    pub fn len(&self) -> usize {
        self.offers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.offers.is_empty()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    pub(crate) fn offer(sk: &SigningKey, seq: u64, now: u64) -> Offer {
        Offer {
            seller: PeerKey::of(sk),
            seq,
            issued_ms: now,
            expires_ms: now + 60_000,
            vcpus: 4,
            memory_mib: 4096,
            disk_cap_mib: 10_240,
            price_per_min: 50_000,
            backend: BackendKind::Microvm,
            accel: Accel::Kvm,
            perf_score: 100,
            measurement: [9; 32],
            max_guests: 4,
            free_guests: 4,
        }
    }

    const NOW: u64 = 1_000_000_000;

    #[test]
    fn newest_wins_duplicates_ignored() {
        let sk = SigningKey::from_bytes(&[1; 32]);
        let mut book = OfferBook::new();
        assert_eq!(
            book.insert(Signed::sign(&sk, offer(&sk, 1, NOW)), NOW),
            Ok(true)
        );
        assert_eq!(
            book.insert(Signed::sign(&sk, offer(&sk, 1, NOW)), NOW),
            Ok(false)
        );
        assert_eq!(
            book.insert(Signed::sign(&sk, offer(&sk, 2, NOW)), NOW),
            Ok(true)
        );
        assert_eq!(book.len(), 1);
        assert_eq!(book.get(&PeerKey::of(&sk)).unwrap().body.seq, 2);
    }

    #[test]
    fn replay_refused_even_after_expiry() {
        let sk = SigningKey::from_bytes(&[1; 32]);
        let mut book = OfferBook::new();
        let mut o2 = offer(&sk, 2, NOW);
        o2.expires_ms = NOW + 10;
        book.insert(Signed::sign(&sk, o2), NOW).unwrap();
        assert_eq!(
            book.insert(Signed::sign(&sk, offer(&sk, 1, NOW)), NOW),
            Err(Error::Replayed)
        );
        book.expire(NOW + 20);
        assert!(book.is_empty());
        assert_eq!(
            book.insert(Signed::sign(&sk, offer(&sk, 1, NOW)), NOW + 20),
            Err(Error::Replayed)
        );
    }

    #[test]
    fn forged_refused() {
        let sk = SigningKey::from_bytes(&[1; 32]);
        let other = SigningKey::from_bytes(&[2; 32]);
        let mut book = OfferBook::new();
        let mut s = Signed::sign(&sk, offer(&sk, 1, NOW));
        s.body.price_per_min = 1;
        assert_eq!(book.insert(s, NOW), Err(Error::BadSignature));
        // Validly signed by someone else, naming sk as seller.
        let s = Signed::sign(&other, offer(&sk, 1, NOW));
        assert_eq!(book.insert(s, NOW), Err(Error::SignerMismatch));
        assert!(book.is_empty());
    }

    #[test]
    fn time_checks() {
        let sk = SigningKey::from_bytes(&[1; 32]);
        let mut book = OfferBook::new();
        let o = offer(&sk, 1, NOW);
        let exp = o.expires_ms;
        assert_eq!(
            book.insert(Signed::sign(&sk, o.clone()), exp),
            Err(Error::Expired)
        );
        let mut f = offer(&sk, 1, NOW + MAX_SKEW_MS + 1);
        f.expires_ms = f.issued_ms + 1000;
        assert_eq!(
            book.insert(Signed::sign(&sk, f), NOW),
            Err(Error::FromFuture)
        );
        let mut ok_skew = offer(&sk, 1, NOW + MAX_SKEW_MS);
        ok_skew.expires_ms = ok_skew.issued_ms + 1000;
        assert_eq!(book.insert(Signed::sign(&sk, ok_skew), NOW), Ok(true));
        let mut long = offer(&sk, 2, NOW);
        long.expires_ms = NOW + MAX_OFFER_LIFE_MS + 1;
        assert_eq!(
            book.insert(Signed::sign(&sk, long), NOW),
            Err(Error::TooLong)
        );
        let mut backwards = offer(&sk, 3, NOW + 100);
        backwards.expires_ms = NOW + 50;
        assert_eq!(
            book.insert(Signed::sign(&sk, backwards), NOW),
            Err(Error::Expired)
        );
    }

    #[test]
    fn live_filters_expired() {
        let a = SigningKey::from_bytes(&[1; 32]);
        let b = SigningKey::from_bytes(&[2; 32]);
        let mut book = OfferBook::new();
        let mut oa = offer(&a, 1, NOW);
        oa.expires_ms = NOW + 10;
        book.insert(Signed::sign(&a, oa), NOW).unwrap();
        book.insert(Signed::sign(&b, offer(&b, 1, NOW)), NOW)
            .unwrap();
        assert_eq!(book.live(NOW).count(), 2);
        assert_eq!(book.live(NOW + 10).count(), 1);
        assert_eq!(book.len(), 2);
        book.expire(NOW + 10);
        assert_eq!(book.len(), 1);
    }

    #[test]
    fn display_names() {
        assert_eq!(Accel::Kvm.to_string(), "kvm");
        assert_eq!(Accel::Tcg.to_string(), "tcg");
        assert_eq!(BackendKind::Qemu.to_string(), "qemu");
        assert_eq!(BackendKind::Microvm.to_string(), "microvm");
    }
}
