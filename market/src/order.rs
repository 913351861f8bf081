//! A buyer's order, its trust policy, and choosing sellers from the offers.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::keys::PeerKey;
use crate::offer::Offer;

/// What a buyer wants: `count` guests of one image, each with these resources.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub image: [u8; 32],
    pub count: u32,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
    pub max_price_per_min: Option<u64>,
    pub max_latency_ms: Option<u32>,
    pub trusted_only: bool,
    pub duration_s: Option<u64>,
}

/// Measurement hashes the buyer trusts, less the revoked ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustPolicy {
    pub trusted: BTreeSet<[u8; 32]>,
    pub revoked: BTreeSet<[u8; 32]>,
}

impl TrustPolicy {
    /// One hex hash per line; blank lines and '#' comments ignored; Err names the line.
    pub fn parse_list(text: &str) -> Result<BTreeSet<[u8; 32]>, Error> {
        let mut out = BTreeSet::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut h = [0u8; 32];
            hex::decode_to_slice(line, &mut h).map_err(|_| Error::TrustList {
                line: i + 1,
                why: format!("{line:?} is not a 64-hex-digit hash"),
            })?;
            out.insert(h);
        }
        Ok(out)
    }

    /// Listed and not revoked.
    pub fn is_trusted(&self, m: &[u8; 32]) -> bool {
        self.trusted.contains(m) && !self.revoked.contains(m)
    }
}

/// How many offers each filter removed. Each offer counts once, under the first
/// filter (in field order) it fails.
#[derive(Default, Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Exclusions {
    pub vcpus: u32,
    pub memory: u32,
    pub disk: u32,
    pub price: u32,
    pub latency: u32,
    pub no_rtt: u32,
    pub untrusted: u32,
    pub full: u32,
    pub avoided: u32,
}

impl Exclusions {
    pub fn total(&self) -> u32 {
        self.vcpus
            + self.memory
            + self.disk
            + self.price
            + self.latency
            + self.no_rtt
            + self.untrusted
            + self.full
            + self.avoided
    }

    /// "5 offers seen: 2 above --max-price, 1 above --max-latency-ms, ..." (only non-zero)
    pub fn describe(&self, seen: u32) -> String {
        let parts: Vec<String> = [
            (self.vcpus, "with too few vCPUs"),
            (self.memory, "with too little memory"),
            (self.disk, "with too small a disk cap"),
            (self.price, "above --max-price"),
            (self.latency, "above --max-latency-ms"),
            (self.no_rtt, "with no measured latency yet"),
            (self.untrusted, "not trusted (--trusted-only)"),
            (self.full, "full"),
            (self.avoided, "already used, refused or timed out"),
        ]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
        let head = match seen {
            0 => "no offers seen".to_string(),
            1 => "1 offer seen".to_string(),
            n => format!("{n} offers seen"),
        };
        if parts.is_empty() {
            head
        } else {
            format!("{head}: {}", parts.join(", "))
        }
    }
}

/// The chosen sellers, best first, and why the others were not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    pub picked: Vec<PeerKey>,
    pub excluded: Exclusions,
    pub seen: u32,
}

/// Filters offers against the order, then ranks: fewer penalties first, then lower
/// price, then higher perf_score, then lower rtt, then key. Returns at most `want`.
/// A seller appearing twice is counted once (its first offer).
pub fn select(
    order: &Order,
    offers: &[&Offer],
    rtt_ms: &BTreeMap<PeerKey, u32>,
    trust: &TrustPolicy,
    penalties: &BTreeMap<PeerKey, u32>,
    avoid: &BTreeSet<PeerKey>,
    want: usize,
) -> Selection {
    let mut ex = Exclusions::default();
    let mut ok: Vec<(u32, u64, u32, u32, PeerKey)> = Vec::new();
    let mut seen_keys = BTreeSet::new();
    for o in offers {
        if !seen_keys.insert(o.seller) {
            continue;
        }
        let rtt = rtt_ms.get(&o.seller).copied();
        if o.vcpus < order.vcpus {
            ex.vcpus += 1;
        } else if o.memory_mib < order.memory_mib {
            ex.memory += 1;
        } else if o.disk_cap_mib < order.disk_mib {
            ex.disk += 1;
        } else if order.max_price_per_min.is_some_and(|m| o.price_per_min > m) {
            ex.price += 1;
        } else if order
            .max_latency_ms
            .is_some_and(|m| rtt.is_some_and(|r| r > m))
        {
            ex.latency += 1;
        } else if order.max_latency_ms.is_some() && rtt.is_none() {
            ex.no_rtt += 1;
        } else if order.trusted_only && !trust.is_trusted(&o.measurement) {
            ex.untrusted += 1;
        } else if o.free_guests == 0 {
            ex.full += 1;
        } else if avoid.contains(&o.seller) {
            ex.avoided += 1;
        } else {
            let pen = penalties.get(&o.seller).copied().unwrap_or(0);
            ok.push((
                pen,
                o.price_per_min,
                u32::MAX - o.perf_score,
                rtt.unwrap_or(u32::MAX),
                o.seller,
            ));
        }
    }
    ok.sort_unstable();
    Selection {
        picked: ok.into_iter().take(want).map(|t| t.4).collect(),
        excluded: ex,
        seen: seen_keys.len() as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offer::{Accel, BackendKind};

    fn key(n: u8) -> PeerKey {
        PeerKey([n; 32])
    }

    fn offer(n: u8, price: u64) -> Offer {
        Offer {
            seller: key(n),
            seq: 1,
            issued_ms: 0,
            expires_ms: 1,
            vcpus: 2,
            memory_mib: 2048,
            disk_cap_mib: 4096,
            price_per_min: price,
            backend: BackendKind::Qemu,
            accel: Accel::Kvm,
            perf_score: 100,
            measurement: [n; 32],
            max_guests: 2,
            free_guests: 2,
        }
    }

    fn order() -> Order {
        Order {
            image: [0; 32],
            count: 2,
            vcpus: 2,
            memory_mib: 1024,
            disk_mib: 1024,
            max_price_per_min: None,
            max_latency_ms: None,
            trusted_only: false,
            duration_s: None,
        }
    }

    fn none<K: Ord, V>() -> BTreeMap<K, V> {
        BTreeMap::new()
    }

    #[test]
    fn issue_case_three_sellers_one_untrusted_one_far() {
        // A: trusted, near. B: untrusted, near. C: trusted, far. D: trusted, near.
        let offers = [offer(1, 10), offer(2, 5), offer(3, 5), offer(4, 20)];
        let refs: Vec<&Offer> = offers.iter().collect();
        let rtt: BTreeMap<_, _> = [(key(1), 20), (key(2), 10), (key(3), 400), (key(4), 30)]
            .into_iter()
            .collect();
        let trust = TrustPolicy {
            trusted: [[1; 32], [3; 32], [4; 32]].into_iter().collect(),
            revoked: BTreeSet::new(),
        };
        let mut o = order();
        o.trusted_only = true;
        o.max_latency_ms = Some(100);
        let s = select(&o, &refs, &rtt, &trust, &none(), &BTreeSet::new(), 2);
        assert_eq!(s.picked, vec![key(1), key(4)]);
        assert_eq!(s.excluded.untrusted, 1);
        assert_eq!(s.excluded.latency, 1);
        assert_eq!(s.excluded.total(), 2);
        assert_eq!(s.seen, 4);
        assert_eq!(
            s.excluded.describe(s.seen),
            "4 offers seen: 1 above --max-latency-ms, 1 not trusted (--trusted-only)"
        );
    }

    #[test]
    fn issue_case_literally_three_sellers() {
        // Three sellers for two guests: one untrusted, one too far. Only the third fits;
        // the other two are named in the explanation.
        let offers = [offer(1, 10), offer(2, 5), offer(3, 5)];
        let refs: Vec<&Offer> = offers.iter().collect();
        let rtt: BTreeMap<_, _> = [(key(1), 20), (key(2), 10), (key(3), 400)]
            .into_iter()
            .collect();
        let trust = TrustPolicy {
            trusted: [[1; 32], [3; 32]].into_iter().collect(),
            revoked: BTreeSet::new(),
        };
        let mut o = order();
        o.trusted_only = true;
        o.max_latency_ms = Some(100);
        let s = select(&o, &refs, &rtt, &trust, &none(), &BTreeSet::new(), 2);
        assert_eq!(s.picked, vec![key(1)]);
        assert_eq!(
            s.excluded.describe(s.seen),
            "3 offers seen: 1 above --max-latency-ms, 1 not trusted (--trusted-only)"
        );
        // Without --trusted-only the untrusted near one is the cheaper of the two.
        o.trusted_only = false;
        let s = select(&o, &refs, &rtt, &trust, &none(), &BTreeSet::new(), 2);
        assert_eq!(s.picked, vec![key(2), key(1)]);
    }

    #[test]
    fn each_filter_counts() {
        let mut offers = vec![
            offer(1, 10),
            offer(2, 10),
            offer(3, 10),
            offer(4, 99),
            offer(5, 10),
            offer(6, 10),
            offer(7, 10),
            offer(8, 10),
            offer(9, 10),
            offer(10, 10),
        ];
        offers[0].vcpus = 1;
        offers[1].memory_mib = 10;
        offers[2].disk_cap_mib = 10;
        offers[6].measurement = [0xee; 32];
        offers[7].free_guests = 0;
        let refs: Vec<&Offer> = offers.iter().collect();
        let mut rtt: BTreeMap<_, _> = (1..=10).map(|n| (key(n), 10)).collect();
        rtt.insert(key(5), 500);
        rtt.remove(&key(6));
        let trust = TrustPolicy {
            trusted: (1..=10).map(|n| [n; 32]).collect(),
            revoked: [[10; 32]].into_iter().collect(),
        };
        let mut o = order();
        o.max_price_per_min = Some(50);
        o.max_latency_ms = Some(100);
        o.trusted_only = true;
        let avoid = [key(9)].into_iter().collect();
        let s = select(&o, &refs, &rtt, &trust, &none(), &avoid, 5);
        let want = Exclusions {
            vcpus: 1,
            memory: 1,
            disk: 1,
            price: 1,
            latency: 1,
            no_rtt: 1,
            untrusted: 2,
            full: 1,
            avoided: 1,
        };
        assert_eq!(s.excluded, want);
        assert!(s.picked.is_empty());
        assert_eq!(s.excluded.total(), 10);
        let d = s.excluded.describe(10);
        assert!(d.starts_with("10 offers seen: 1 with too few vCPUs"), "{d}");
        assert!(d.contains("2 not trusted"), "{d}");
    }

    #[test]
    fn ranking_order() {
        let mut offers = [
            offer(1, 10),
            offer(2, 10),
            offer(3, 10),
            offer(4, 5),
            offer(5, 10),
        ];
        offers[1].perf_score = 200; // faster beats same price
        offers[2].perf_score = 200; // same perf as 2, higher rtt
        let refs: Vec<&Offer> = offers.iter().collect();
        let rtt: BTreeMap<_, _> = [(key(2), 5), (key(3), 50), (key(1), 1), (key(5), 1)]
            .into_iter()
            .collect();
        let pen: BTreeMap<_, _> = [(key(4), 1)].into_iter().collect();
        let s = select(
            &order(),
            &refs,
            &rtt,
            &TrustPolicy::default(),
            &pen,
            &BTreeSet::new(),
            10,
        );
        // 4 is cheapest but penalized; 2 and 3 are faster; 1 and 5 tie except key.
        assert_eq!(s.picked, vec![key(2), key(3), key(1), key(5), key(4)]);
        let s = select(
            &order(),
            &refs,
            &rtt,
            &TrustPolicy::default(),
            &pen,
            &BTreeSet::new(),
            2,
        );
        assert_eq!(s.picked, vec![key(2), key(3)]);
    }

    #[test]
    fn no_rtt_ok_without_latency_limit_and_duplicates_once() {
        let offers = [offer(1, 10), offer(1, 1)];
        let refs: Vec<&Offer> = offers.iter().collect();
        let s = select(
            &order(),
            &refs,
            &none(),
            &TrustPolicy::default(),
            &none(),
            &BTreeSet::new(),
            3,
        );
        assert_eq!(s.picked, vec![key(1)]);
        assert_eq!(s.seen, 1);
        assert_eq!(s.excluded.describe(0), "no offers seen");
        assert_eq!(s.excluded.describe(1), "1 offer seen");
    }

    #[test]
    fn trust_list_parsing() {
        let a = "ab".repeat(32);
        let text = format!("# trusted builds\n\n{a}  # v1\n   {}\n", "cd".repeat(32));
        let set = TrustPolicy::parse_list(&text).unwrap();
        assert_eq!(set.len(), 2);
        assert!(set.contains(&[0xab; 32]));
        let err = TrustPolicy::parse_list(&format!("{a}\n\nnot-hex\n")).unwrap_err();
        assert!(matches!(err, Error::TrustList { line: 3, .. }), "{err}");
        let err = TrustPolicy::parse_list(&"ab".repeat(31)).unwrap_err();
        assert!(matches!(err, Error::TrustList { line: 1, .. }));
        let p = TrustPolicy {
            trusted: set.clone(),
            revoked: [[0xcd; 32]].into_iter().collect(),
        };
        assert!(p.is_trusted(&[0xab; 32]));
        assert!(!p.is_trusted(&[0xcd; 32]));
        assert!(!p.is_trusted(&[0x00; 32]));
    }
}
