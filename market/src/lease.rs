//! Lease terms, the two-signature lease, and the seller's acceptance policy.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::grant::ImageGrant;
use crate::keys::{LeaseId, PeerKey};
use crate::signed::{sign_bytes, signing_bytes, verify_bytes, Domain, Sig, Signed};

/// Billing period when the buyer has no reason to pick another.
pub const DEFAULT_PERIOD_S: u32 = 60;
/// How long a seller keeps a guest running without hearing an ack.
pub const DEFAULT_GRACE_S: u32 = 120;
/// Billing periods a seller accepts: a guest runs at most ten minutes on credit
/// (short periods are for tests and demos).
pub const PERIOD_RANGE_S: std::ops::RangeInclusive<u32> = 1..=600;
/// The longest grace a seller grants (a guest runs unpaid at most this long).
pub const MAX_GRACE_S: u32 = 3600;

/// Everything both sides sign. The buyer proposes it (`Signed<LeaseTerms>`); the
/// seller countersigns the same bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseTerms {
    pub id: LeaseId,
    pub buyer: PeerKey,
    pub seller: PeerKey,
    pub image: [u8; 32],
    pub guest_mac: [u8; 6],
    pub guest_ip: Ipv4Addr,
    pub buyer_host_ip: Ipv4Addr,
    /// The buyer's UDP switch port; the seller uses the buyer's observed IP with it.
    pub overlay_port: u16,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
    pub price_per_min: u64,
    /// Billing period in seconds (60 by default).
    pub period_s: u32,
    /// Seconds the seller waits for an ack before ending the lease (120 by default).
    pub grace_s: u32,
    pub issued_ms: u64,
    /// The proposal is void after this.
    pub start_by_ms: u64,
    pub duration_s: Option<u64>,
    /// The buyer's grant letting this seller fetch `image` from the buyer and
    /// from other sellers holding it (images are private to their buyer).
    pub grant: Option<Signed<ImageGrant>>,
}

impl Domain for LeaseTerms {
    const DOMAIN: &'static str = "cpushare/lease/v1";
}

impl LeaseTerms {
    /// Billing period in milliseconds (a zero period counts as one second so that
    /// arithmetic never divides by zero).
    pub fn period_ms(&self) -> u64 {
        u64::from(self.period_s.max(1)) * 1000
    }

    pub fn grace_ms(&self) -> u64 {
        u64::from(self.grace_s) * 1000
    }

    /// Periods in the whole duration, a started last period counting as one.
    pub fn duration_periods(&self) -> Option<u32> {
        self.duration_s.map(|d| {
            let p = u64::from(self.period_s.max(1));
            u32::try_from(d.div_ceil(p)).unwrap_or(u32::MAX)
        })
    }

    /// The price of `minute` periods.
    pub fn total_for(&self, minute: u32) -> u64 {
        u64::from(minute).saturating_mul(self.price_per_min)
    }
}

/// A lease both sides signed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub terms: LeaseTerms,
    pub buyer_sig: Sig,
    pub seller_sig: Sig,
}

impl Lease {
    /// Seller: checks the proposal's buyer signature and that signer == terms.buyer,
    /// then countersigns the same bytes.
    pub fn countersign(
        proposal: &Signed<LeaseTerms>,
        seller_sk: &SigningKey,
    ) -> Result<Lease, Error> {
        if proposal.signer != proposal.body.buyer {
            return Err(Error::SignerMismatch);
        }
        proposal.verify()?;
        if PeerKey::of(seller_sk) != proposal.body.seller {
            return Err(Error::WrongPeer {
                lease: proposal.body.id,
            });
        }
        let msg = signing_bytes(LeaseTerms::DOMAIN, &proposal.body);
        Ok(Lease {
            terms: proposal.body.clone(),
            buyer_sig: proposal.sig,
            seller_sig: sign_bytes(seller_sk, &msg),
        })
    }

    /// Both signatures, with the keys named in the terms.
    pub fn verify(&self) -> Result<(), Error> {
        let msg = signing_bytes(LeaseTerms::DOMAIN, &self.terms);
        verify_bytes(&self.terms.buyer, &msg, &self.buyer_sig)?;
        verify_bytes(&self.terms.seller, &msg, &self.seller_sig)
    }

    /// The buyer's half, as it was proposed.
    pub fn proposal(&self) -> Signed<LeaseTerms> {
        Signed {
            body: self.terms.clone(),
            signer: self.terms.buyer,
            sig: self.buyer_sig,
        }
    }
}

/// Why a seller turned a proposal down.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("the proposal names another seller")]
    NotForMe,
    #[error("the proposal came from, or is signed by, someone other than its buyer")]
    WrongBuyer,
    #[error("the proposal's signature does not verify")]
    BadSignature,
    #[error("this seller does not sell to you (denied)")]
    Denied,
    #[error("this seller sells only to listed buyers")]
    NotAllowed,
    #[error("this seller already runs its maximum of {max} guests")]
    TooManyGuests { max: u32 },
    #[error("asked for {asked} vCPUs, only {free} free")]
    NotEnoughVcpus { asked: u32, free: u32 },
    #[error("asked for {asked} MiB of memory, only {free} MiB free")]
    NotEnoughMemory { asked: u64, free: u64 },
    #[error("asked for a {asked} MiB disk, this seller's cap is {cap} MiB")]
    DiskTooLarge { asked: u64, cap: u64 },
    #[error("offered {asked} micro-credits a minute, this seller's minimum is {min}")]
    PriceTooLow { asked: u64, min: u64 },
    #[error("the proposal expired before it arrived (check clocks and latency)")]
    Expired,
    #[error("a lease with this id is already running here")]
    Duplicate,
    #[error("this seller is outside its selling hours")]
    OutsideHours,
    #[error("the image is {size} MiB, larger than the {cap} MiB disk")]
    ImageTooLarge { size: u64, cap: u64 },
    #[error("unacceptable billing terms: {why}")]
    BadTerms { why: String },
}

/// The seller owner's rules for accepting leases.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SellerPolicy {
    pub max_guests: u32,
    pub vcpus_total: u32,
    pub memory_mib_total: u64,
    pub disk_cap_mib: u64,
    pub min_price_per_min: u64,
    pub allowed_buyers: Option<BTreeSet<PeerKey>>,
    pub denied_buyers: BTreeSet<PeerKey>,
    /// Selling hours as minutes of the day [start, end) (0..=1440), None = always;
    /// the caller passes the minute of the day (UTC in the node). start > end wraps
    /// midnight; start == end is all day.
    pub hours: Option<(u16, u16)>,
}

impl SellerPolicy {
    /// Whether `minute` (of the day, 0-1439) is within the selling hours.
    pub fn in_hours(&self, minute: u16) -> bool {
        match self.hours {
            None => true,
            Some((s, e)) if s == e => true,
            Some((s, e)) if s < e => s <= minute && minute < e,
            Some((s, e)) => minute >= s || minute < e,
        }
    }

    /// `from` = the authenticated peer that sent the proposal; `active` = terms of
    /// the leases this seller runs now.
    pub fn check(
        &self,
        me: &PeerKey,
        proposal: &Signed<LeaseTerms>,
        from: &PeerKey,
        active: &[&LeaseTerms],
        now_ms: u64,
        minute_of_day: u16,
    ) -> Result<(), Refusal> {
        let t = &proposal.body;
        if t.seller != *me {
            return Err(Refusal::NotForMe);
        }
        if proposal.signer != t.buyer || *from != t.buyer {
            return Err(Refusal::WrongBuyer);
        }
        if proposal.verify().is_err() {
            return Err(Refusal::BadSignature);
        }
        if self.denied_buyers.contains(&t.buyer) {
            return Err(Refusal::Denied);
        }
        if let Some(allowed) = &self.allowed_buyers {
            if !allowed.contains(&t.buyer) {
                return Err(Refusal::NotAllowed);
            }
        }
        if !self.in_hours(minute_of_day) {
            return Err(Refusal::OutsideHours);
        }
        if now_ms > t.start_by_ms {
            return Err(Refusal::Expired);
        }
        if active.iter().any(|a| a.id == t.id) {
            return Err(Refusal::Duplicate);
        }
        if !PERIOD_RANGE_S.contains(&t.period_s) {
            return Err(Refusal::BadTerms {
                why: format!(
                    "billing period {} s is outside {}..={} s",
                    t.period_s,
                    PERIOD_RANGE_S.start(),
                    PERIOD_RANGE_S.end()
                ),
            });
        }
        if t.grace_s < t.period_s || t.grace_s > MAX_GRACE_S {
            return Err(Refusal::BadTerms {
                why: format!(
                    "grace {} s must be at least the period ({} s) and at most {MAX_GRACE_S} s",
                    t.grace_s, t.period_s
                ),
            });
        }
        if t.price_per_min < self.min_price_per_min {
            return Err(Refusal::PriceTooLow {
                asked: t.price_per_min,
                min: self.min_price_per_min,
            });
        }
        if active.len() >= self.max_guests as usize {
            return Err(Refusal::TooManyGuests {
                max: self.max_guests,
            });
        }
        let used_vcpus: u64 = active.iter().map(|a| u64::from(a.vcpus)).sum();
        let free_vcpus = u64::from(self.vcpus_total).saturating_sub(used_vcpus) as u32;
        if t.vcpus > free_vcpus {
            return Err(Refusal::NotEnoughVcpus {
                asked: t.vcpus,
                free: free_vcpus,
            });
        }
        let used_mem: u64 = active.iter().map(|a| a.memory_mib).sum();
        let free_mem = self.memory_mib_total.saturating_sub(used_mem);
        if t.memory_mib > free_mem {
            return Err(Refusal::NotEnoughMemory {
                asked: t.memory_mib,
                free: free_mem,
            });
        }
        if t.disk_mib > self.disk_cap_mib {
            return Err(Refusal::DiskTooLarge {
                asked: t.disk_mib,
                cap: self.disk_cap_mib,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn terms(buyer: &SigningKey, seller: &SigningKey, n: u8) -> LeaseTerms {
        LeaseTerms {
            id: LeaseId([n; 16]),
            buyer: PeerKey::of(buyer),
            seller: PeerKey::of(seller),
            image: [5; 32],
            guest_mac: [2, 0, 0, 0, 0, n],
            guest_ip: Ipv4Addr::new(10, 77, 0, 2),
            buyer_host_ip: Ipv4Addr::new(10, 77, 0, 1),
            overlay_port: 4000,
            vcpus: 2,
            memory_mib: 1024,
            disk_mib: 2048,
            price_per_min: 50_000,
            period_s: 60,
            grace_s: 120,
            issued_ms: 1_000,
            start_by_ms: 16_000,
            duration_s: None,
            grant: None,
        }
    }

    fn policy() -> SellerPolicy {
        SellerPolicy {
            max_guests: 2,
            vcpus_total: 4,
            memory_mib_total: 3072,
            disk_cap_mib: 4096,
            min_price_per_min: 10_000,
            allowed_buyers: None,
            denied_buyers: BTreeSet::new(),
            hours: None,
        }
    }

    fn keys() -> (SigningKey, SigningKey) {
        (
            SigningKey::from_bytes(&[1; 32]),
            SigningKey::from_bytes(&[2; 32]),
        )
    }

    #[test]
    fn countersign_and_verify() {
        let (b, s) = keys();
        let p = Signed::sign(&b, terms(&b, &s, 1));
        let l = Lease::countersign(&p, &s).unwrap();
        l.verify().unwrap();
        assert_eq!(l.proposal(), p);

        let mut forged = l.clone();
        forged.terms.price_per_min = 1;
        assert_eq!(forged.verify(), Err(Error::BadSignature));
        let mut forged = l.clone();
        forged.seller_sig.0[3] ^= 1;
        assert_eq!(forged.verify(), Err(Error::BadSignature));
        let mut forged = l.clone();
        forged.buyer_sig = forged.seller_sig;
        assert_eq!(forged.verify(), Err(Error::BadSignature));
    }

    #[test]
    fn countersign_refuses_forgeries() {
        let (b, s) = keys();
        let other = SigningKey::from_bytes(&[3; 32]);
        // Signed by someone other than the buyer it names.
        let p = Signed::sign(&other, terms(&b, &s, 1));
        assert_eq!(Lease::countersign(&p, &s), Err(Error::SignerMismatch));
        let mut p = Signed::sign(&b, terms(&b, &s, 1));
        p.body.vcpus = 64;
        assert_eq!(Lease::countersign(&p, &s), Err(Error::BadSignature));
        let p = Signed::sign(&b, terms(&b, &s, 1));
        assert!(matches!(
            Lease::countersign(&p, &other),
            Err(Error::WrongPeer { .. })
        ));
    }

    #[test]
    fn every_refusal() {
        let (b, s) = keys();
        let me = PeerKey::of(&s);
        let bk = PeerKey::of(&b);
        let pol = policy();
        let now = 2_000;
        let ok = Signed::sign(&b, terms(&b, &s, 1));
        assert_eq!(pol.check(&me, &ok, &bk, &[], now, 12 * 60), Ok(()));

        let other = SigningKey::from_bytes(&[3; 32]);
        let ok_other = PeerKey::of(&other);
        assert_eq!(
            pol.check(&ok_other, &ok, &bk, &[], now, 12 * 60),
            Err(Refusal::NotForMe)
        );
        assert_eq!(
            pol.check(&me, &ok, &ok_other, &[], now, 12 * 60),
            Err(Refusal::WrongBuyer)
        );
        let by_other = Signed::sign(&other, terms(&b, &s, 1));
        assert_eq!(
            pol.check(&me, &by_other, &bk, &[], now, 12 * 60),
            Err(Refusal::WrongBuyer)
        );
        let mut forged = ok.clone();
        forged.body.price_per_min = 999_999;
        assert_eq!(
            pol.check(&me, &forged, &bk, &[], now, 12 * 60),
            Err(Refusal::BadSignature)
        );

        let mut p = pol.clone();
        p.denied_buyers.insert(bk);
        assert_eq!(
            p.check(&me, &ok, &bk, &[], now, 12 * 60),
            Err(Refusal::Denied)
        );
        let mut p = pol.clone();
        p.allowed_buyers = Some([ok_other].into_iter().collect());
        assert_eq!(
            p.check(&me, &ok, &bk, &[], now, 12 * 60),
            Err(Refusal::NotAllowed)
        );
        p.allowed_buyers = Some([bk].into_iter().collect());
        assert_eq!(p.check(&me, &ok, &bk, &[], now, 12 * 60), Ok(()));

        let mut p = pol.clone();
        p.hours = Some((9 * 60, 17 * 60 + 30));
        assert_eq!(
            p.check(&me, &ok, &bk, &[], now, 17 * 60 + 30),
            Err(Refusal::OutsideHours)
        );
        assert_eq!(p.check(&me, &ok, &bk, &[], now, 17 * 60 + 29), Ok(()));
        assert_eq!(p.check(&me, &ok, &bk, &[], now, 9 * 60), Ok(()));
        p.hours = Some((22 * 60, 6 * 60));
        assert!(p.in_hours(23 * 60) && p.in_hours(0) && p.in_hours(5 * 60 + 59));
        assert!(!p.in_hours(6 * 60) && !p.in_hours(12 * 60));
        p.hours = Some((3 * 60, 3 * 60));
        assert!(p.in_hours(3 * 60) && p.in_hours(20 * 60));

        assert_eq!(
            pol.check(&me, &ok, &bk, &[], 16_001, 12 * 60),
            Err(Refusal::Expired)
        );

        let running = terms(&b, &s, 1);
        assert_eq!(
            pol.check(&me, &ok, &bk, &[&running], now, 12 * 60),
            Err(Refusal::Duplicate)
        );

        let mut t = terms(&b, &s, 2);
        t.price_per_min = 9_999;
        let cheap = Signed::sign(&b, t);
        assert_eq!(
            pol.check(&me, &cheap, &bk, &[], now, 12 * 60),
            Err(Refusal::PriceTooLow {
                asked: 9_999,
                min: 10_000
            })
        );

        let a = terms(&b, &s, 3);
        let c = terms(&b, &s, 4);
        let p2 = Signed::sign(&b, terms(&b, &s, 2));
        assert_eq!(
            pol.check(&me, &p2, &bk, &[&a, &c], now, 12 * 60),
            Err(Refusal::TooManyGuests { max: 2 })
        );

        let mut big = terms(&b, &s, 2);
        big.vcpus = 3;
        let big = Signed::sign(&b, big);
        assert_eq!(
            pol.check(&me, &big, &bk, &[&a], now, 12 * 60),
            Err(Refusal::NotEnoughVcpus { asked: 3, free: 2 })
        );
        let mut mem = terms(&b, &s, 2);
        mem.memory_mib = 2049;
        let mem = Signed::sign(&b, mem);
        assert_eq!(
            pol.check(&me, &mem, &bk, &[&a], now, 12 * 60),
            Err(Refusal::NotEnoughMemory {
                asked: 2049,
                free: 2048
            })
        );
        for (period, grace) in [(0, 120), (601, 1200), (60, 59), (60, 3601)] {
            let mut bad = terms(&b, &s, 2);
            bad.period_s = period;
            bad.grace_s = grace;
            let bad = Signed::sign(&b, bad);
            assert!(matches!(
                pol.check(&me, &bad, &bk, &[], now, 12 * 60),
                Err(Refusal::BadTerms { .. })
            ));
        }
        let mut disk = terms(&b, &s, 2);
        disk.disk_mib = 4097;
        let disk = Signed::sign(&b, disk);
        assert_eq!(
            pol.check(&me, &disk, &bk, &[], now, 12 * 60),
            Err(Refusal::DiskTooLarge {
                asked: 4097,
                cap: 4096
            })
        );
    }

    #[test]
    fn refusals_read_well_and_round_trip() {
        let r = Refusal::NotEnoughVcpus { asked: 8, free: 2 };
        assert_eq!(r.to_string(), "asked for 8 vCPUs, only 2 free");
        let bytes = bincode::serialize(&r).unwrap();
        assert_eq!(bincode::deserialize::<Refusal>(&bytes).unwrap(), r);
        let r = Refusal::ImageTooLarge { size: 10, cap: 5 };
        assert!(r.to_string().contains("10 MiB"));
    }

    #[test]
    fn durations_round_up() {
        let (b, s) = keys();
        let mut t = terms(&b, &s, 1);
        assert_eq!(t.duration_periods(), None);
        t.duration_s = Some(60);
        assert_eq!(t.duration_periods(), Some(1));
        t.duration_s = Some(61);
        assert_eq!(t.duration_periods(), Some(2));
        t.duration_s = Some(0);
        assert_eq!(t.duration_periods(), Some(0));
    }
}
