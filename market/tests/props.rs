//! Property tests: the wire decoders against arbitrary bytes, and a model of a buyer's
//! fleet and its sellers' leases driven through a lossy, duplicating, reordering
//! network with seller restarts, buyer restarts (its fleet restored from the last
//! record it saved, after being down a while), buyer stops, a buyer that goes silent
//! and clock jumps. The billing invariants are checked after every step.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ed25519_dalek::SigningKey;
use market::*;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// ---------------------------------------------------------------- wire

fn arb_key() -> impl Strategy<Value = PeerKey> {
    any::<[u8; 32]>().prop_map(PeerKey)
}

fn arb_id() -> impl Strategy<Value = LeaseId> {
    any::<[u8; 16]>().prop_map(LeaseId)
}

fn arb_sig() -> impl Strategy<Value = Sig> {
    (any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(|(a, b)| {
        let mut s = [0u8; 64];
        s[..32].copy_from_slice(&a);
        s[32..].copy_from_slice(&b);
        Sig(s)
    })
}

fn arb_reason() -> impl Strategy<Value = EndReason> {
    prop_oneof![
        Just(EndReason::BuyerStopped),
        Just(EndReason::BuyerSilent),
        Just(EndReason::DurationReached),
        Just(EndReason::GuestExited),
        Just(EndReason::SellerShutdown),
        Just(EndReason::SellerRestarted),
        Just(EndReason::OutsideHours),
        ".{0,40}".prop_map(EndReason::StartFailed),
    ]
}

fn arb_terms() -> impl Strategy<Value = LeaseTerms> {
    (
        (
            arb_id(),
            arb_key(),
            arb_key(),
            any::<[u8; 32]>(),
            any::<[u8; 6]>(),
        ),
        (
            any::<u32>(),
            any::<u32>(),
            any::<u16>(),
            any::<u32>(),
            any::<u64>(),
        ),
        (any::<u64>(), any::<u64>(), any::<u32>(), any::<u32>()),
        (any::<u64>(), any::<u64>(), any::<Option<u64>>()),
    )
        .prop_map(
            |(
                (id, buyer, seller, image, guest_mac),
                (gip, hip, overlay_port, vcpus, memory_mib),
                (disk_mib, price_per_min, period_s, grace_s),
                (issued_ms, start_by_ms, duration_s),
            )| LeaseTerms {
                id,
                buyer,
                seller,
                image,
                guest_mac,
                guest_ip: Ipv4Addr::from(gip),
                buyer_host_ip: Ipv4Addr::from(hip),
                overlay_port,
                vcpus,
                memory_mib,
                disk_mib,
                price_per_min,
                period_s,
                grace_s,
                issued_ms,
                start_by_ms,
                duration_s,
                grant: None,
            },
        )
}

fn arb_refusal() -> impl Strategy<Value = Refusal> {
    prop_oneof![
        Just(Refusal::NotForMe),
        Just(Refusal::WrongBuyer),
        Just(Refusal::BadSignature),
        Just(Refusal::Denied),
        Just(Refusal::NotAllowed),
        any::<u32>().prop_map(|max| Refusal::TooManyGuests { max }),
        (any::<u32>(), any::<u32>())
            .prop_map(|(asked, free)| Refusal::NotEnoughVcpus { asked, free }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(asked, free)| Refusal::NotEnoughMemory { asked, free }),
        (any::<u64>(), any::<u64>()).prop_map(|(asked, cap)| Refusal::DiskTooLarge { asked, cap }),
        (any::<u64>(), any::<u64>()).prop_map(|(asked, min)| Refusal::PriceTooLow { asked, min }),
        Just(Refusal::Expired),
        Just(Refusal::Duplicate),
        Just(Refusal::OutsideHours),
        (any::<u64>(), any::<u64>()).prop_map(|(size, cap)| Refusal::ImageTooLarge { size, cap }),
        ".{0,40}".prop_map(|why| Refusal::BadTerms { why }),
    ]
}

fn arb_phase() -> impl Strategy<Value = GuestPhase> {
    prop_oneof![
        (any::<u64>(), any::<u64>()).prop_map(|(done, total)| GuestPhase::Fetching { done, total }),
        Just(GuestPhase::Booting),
        Just(GuestPhase::Running),
        arb_reason().prop_map(GuestPhase::Ended),
    ]
}

fn arb_msg() -> impl Strategy<Value = MarketMsg> {
    prop_oneof![
        (arb_terms(), arb_key(), arb_sig())
            .prop_map(|(body, signer, sig)| MarketMsg::Propose(Signed { body, signer, sig })),
        (arb_terms(), arb_sig(), arb_sig()).prop_map(|(terms, buyer_sig, seller_sig)| {
            MarketMsg::Accept(Lease {
                terms,
                buyer_sig,
                seller_sig,
            })
        }),
        (arb_id(), arb_refusal()).prop_map(|(lease, why)| MarketMsg::Refuse { lease, why }),
        (
            arb_id(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            arb_key(),
            arb_sig()
        )
            .prop_map(|(lease, minute, amount, total, issued_ms, signer, sig)| {
                MarketMsg::Receipt(Signed {
                    body: Receipt {
                        lease,
                        minute,
                        amount,
                        total,
                        issued_ms,
                    },
                    signer,
                    sig,
                })
            }),
        (arb_id(), any::<u32>(), any::<u64>(), arb_key(), arb_sig()).prop_map(
            |(lease, minute, total, signer, sig)| MarketMsg::Ack(Signed {
                body: Ack {
                    lease,
                    minute,
                    total
                },
                signer,
                sig
            })
        ),
        (arb_id(), any::<u64>(), arb_key(), arb_sig()).prop_map(
            |(lease, issued_ms, signer, sig)| {
                MarketMsg::Stop(Signed {
                    body: Stop { lease, issued_ms },
                    signer,
                    sig,
                })
            }
        ),
        (arb_id(), arb_phase()).prop_map(|(lease, phase)| MarketMsg::Phase { lease, phase }),
        (
            arb_id(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..2048)
        )
            .prop_map(|(lease, offset, data)| MarketMsg::Console {
                lease,
                offset,
                data
            }),
    ]
}

fn arb_offer() -> impl Strategy<Value = Signed<Offer>> {
    (
        (
            arb_key(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
        ),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            any::<bool>(),
        ),
        (any::<u32>(), any::<[u8; 32]>(), any::<u32>(), any::<u32>()),
        arb_sig(),
    )
        .prop_map(
            |(
                (seller, seq, issued_ms, expires_ms, vcpus),
                (memory_mib, disk_cap_mib, price_per_min, qemu, kvm),
                (perf_score, measurement, max_guests, free_guests),
                sig,
            )| Signed {
                body: Offer {
                    seller,
                    seq,
                    issued_ms,
                    expires_ms,
                    vcpus,
                    memory_mib,
                    disk_cap_mib,
                    price_per_min,
                    backend: if qemu {
                        BackendKind::Qemu
                    } else {
                        BackendKind::Microvm
                    },
                    accel: if kvm { Accel::Kvm } else { Accel::Tcg },
                    perf_score,
                    measurement,
                    max_guests,
                    free_guests,
                },
                signer: seller,
                sig,
            },
        )
}

proptest! {
    #[test]
    fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = decode(&bytes);
        let _ = decode_offer(&bytes);
        let mut v = bytes.clone();
        v.insert(0, WIRE_VERSION);
        let _ = decode(&v);
        let _ = decode_offer(&v);
    }

    #[test]
    fn msg_round_trips(m in arb_msg()) {
        let b = encode(&m);
        prop_assert!(b.len() <= MAX_MSG);
        prop_assert_eq!(decode(&b).unwrap(), m);
        // One trailing byte or a cut-off last byte is refused, never misread.
        let mut longer = b.clone();
        longer.push(0);
        prop_assert!(decode(&longer).is_err());
        prop_assert!(decode(&b[..b.len() - 1]).is_err());
    }

    #[test]
    fn mutated_msgs_never_panic(m in arb_msg(), at in any::<usize>(), x in 1u8..=255) {
        let mut b = encode(&m);
        let i = at % b.len();
        b[i] ^= x;
        let _ = decode(&b);
    }

    #[test]
    fn offer_round_trips(o in arb_offer()) {
        let b = encode_offer(&o);
        prop_assert_eq!(decode_offer(&b).unwrap(), o);
        let mut longer = b.clone();
        longer.push(1);
        prop_assert!(decode_offer(&longer).is_err());
    }

    #[test]
    fn offer_book_never_panics_and_keeps_one_per_seller(
        offers in proptest::collection::vec(arb_offer(), 0..8),
        now in any::<u64>(),
    ) {
        let mut book = OfferBook::new();
        for o in offers {
            // Random signatures: all refused, none may panic.
            prop_assert!(book.insert(o, now).is_err());
        }
        prop_assert_eq!(book.len(), 0);
    }

    #[test]
    fn offer_book_newest_seq_wins(
        seqs in proptest::collection::vec((0usize..3, 0u64..10), 1..20),
    ) {
        let sks: Vec<SigningKey> = (0..3).map(|i| SigningKey::from_bytes(&[40 + i; 32])).collect();
        let now = T0;
        let mut book = OfferBook::new();
        let mut best: BTreeMap<usize, u64> = BTreeMap::new();
        for (who, seq) in seqs {
            let sk = &sks[who];
            let o = Offer {
                seller: PeerKey::of(sk),
                seq,
                issued_ms: now,
                expires_ms: now + 60_000,
                vcpus: 1,
                memory_mib: 1,
                disk_cap_mib: 1,
                price_per_min: 1,
                backend: BackendKind::Qemu,
                accel: Accel::Tcg,
                perf_score: 1,
                measurement: [0; 32],
                max_guests: 1,
                free_guests: 1,
            };
            let got = book.insert(Signed::sign(sk, o), now);
            match best.get(&who) {
                None => prop_assert_eq!(got, Ok(true)),
                Some(&b) if seq > b => prop_assert_eq!(got, Ok(true)),
                Some(&b) if seq == b => prop_assert_eq!(got, Ok(false)),
                Some(_) => prop_assert_eq!(got, Err(Error::Replayed)),
            }
            let e = best.entry(who).or_insert(seq);
            *e = (*e).max(seq);
        }
        prop_assert_eq!(book.len(), best.len());
        for (who, seq) in best {
            prop_assert_eq!(book.get(&PeerKey::of(&sks[who])).unwrap().body.seq, seq);
        }
    }

    #[test]
    fn prices_round_trip(v in any::<u64>()) {
        prop_assert_eq!(parse_price(&format_price(v)).unwrap(), v);
    }

    #[test]
    fn price_parse_never_panics(s in "[0-9.+-e ]{0,30}") {
        let _ = parse_price(&s);
    }

    #[test]
    fn trust_list_parse_never_panics(s in "(?s).{0,300}") {
        let _ = TrustPolicy::parse_list(&s);
    }
}

#[test]
fn wire_limits() {
    assert!(matches!(decode(&[]), Err(Error::Decode(_))));
    assert!(matches!(
        decode(&[9, 0, 0, 0, 0]),
        Err(Error::BadVersion(9))
    ));
    let big = vec![WIRE_VERSION; MAX_MSG + 1];
    assert!(matches!(decode(&big), Err(Error::TooBig { .. })));
    let m = MarketMsg::Console {
        lease: LeaseId([1; 16]),
        offset: 0,
        data: vec![0; MAX_CONSOLE + 1],
    };
    assert!(matches!(decode(&encode(&m)), Err(Error::TooBig { .. })));
    let m = MarketMsg::Console {
        lease: LeaseId([1; 16]),
        offset: 0,
        data: vec![0; MAX_CONSOLE],
    };
    assert_eq!(decode(&encode(&m)).unwrap(), m);
    // A length prefix claiming a huge vector is refused without allocating it.
    let mut b = vec![WIRE_VERSION];
    b.extend_from_slice(&7u32.to_le_bytes()); // Console
    b.extend_from_slice(&[1; 16]);
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(decode(&b), Err(Error::Decode(_))));
}

// ---------------------------------------------------------------- model

const T0: u64 = 1_800_000_000_000;
const SELLERS: usize = 4;
const TICK_MS: u64 = 1_000;
const HEARTBEAT_MS: u64 = 10_000;
const OFFER_EVERY_MS: u64 = 30_000;

#[derive(Clone, Debug)]
enum Op {
    /// Let time pass (ms), ticking everyone each second.
    Advance(u32),
    /// Seller restarts: its guests die, its leases come back from what it persisted.
    Restart(usize),
    /// The buyer stops the whole run.
    BuyerStop,
    /// The buyer stops the lease of one slot.
    StopOne(usize),
    /// The buyer's process vanishes: it never sends or handles anything again.
    BuyerSilent,
    /// The buyer daemon dies and comes back after this many seconds, its fleet
    /// restored from the record it saved (offers and the overlay are gone).
    BuyerRestart(u16),
    /// A running guest on this seller exits.
    GuestExit(usize),
    /// Network quality from now on: loss %, duplicate %, max one-way delay (s).
    Net(u8, u8, u8),
    /// The clock jumps forward (seconds) without ticks in between.
    Jump(u16),
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (1u32..120_000).prop_map(Op::Advance),
        1 => (0..SELLERS).prop_map(Op::Restart),
        1 => (0u16..200).prop_map(Op::BuyerRestart),
        1 => (0usize..3).prop_map(Op::StopOne),
        1 => (0..SELLERS).prop_map(Op::GuestExit),
        2 => (0u8..40, 0u8..30, 0u8..20).prop_map(|(l, d, s)| Op::Net(l, d, s)),
        1 => (1u16..400).prop_map(Op::Jump),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum To {
    Buyer,
    Seller(usize),
}

struct InFlight {
    at: u64,
    seq: u64,
    to: To,
    from: PeerKey,
    bytes: Vec<u8>,
}

struct SellerNode {
    sk: SigningKey,
    key: PeerKey,
    policy: SellerPolicy,
    price: u64,
    leases: BTreeMap<LeaseId, SellerLease>,
    /// What survives a restart: the last record saved on `Persist`.
    disk: BTreeMap<LeaseId, SellerLeaseRecord>,
    boot_at: BTreeMap<LeaseId, u64>,
    guests: BTreeSet<LeaseId>,
    /// Receipted minutes when the lease ended: nothing above may be sent after.
    ended_at: BTreeMap<LeaseId, u32>,
    seq: u64,
}

struct World {
    now: u64,
    rng: StdRng,
    loss: u8,
    dup: u8,
    max_delay_ms: u64,
    net: Vec<InFlight>,
    net_seq: u64,
    buyer_key: PeerKey,
    fleet: Fleet,
    book: OfferBook,
    penalties: BTreeMap<PeerKey, u32>,
    silent: bool,
    frozen: BTreeMap<LeaseId, u32>,
    buyer_sk: SigningKey,
    /// What the buyer saved after its last fleet call (bincode, as the node stores it).
    buyer_disk: Vec<u8>,
    /// The buyer is down until then (messages to it are lost, it does not tick).
    down_until: Option<u64>,
    done_seen: u32,
    admitted: BTreeSet<LeaseId>,
    sellers: Vec<SellerNode>,
    last_tick: u64,
    last_hb: u64,
    last_offer: u64,
    // history for monotonicity
    seen_buyer: BTreeMap<LeaseId, u32>,
    seen_seller: BTreeMap<LeaseId, (u32, u32)>,
    sent_acks: BTreeMap<LeaseId, u32>,
    steps: u64,
    stats: Stats,
}

/// What a run went through, to show the model is not vacuous.
#[derive(Default, Debug, Clone)]
struct Stats {
    sent: u64,
    lost: u64,
    duplicated: u64,
    receipts: u64,
    acks: u64,
    restarts: u64,
    buyer_restarts: u64,
    /// Moments where the seller's ledger lagged the buyer's (an ack in flight or lost).
    lagging: u64,
    ended: BTreeMap<String, u64>,
    lost_leases: u64,
    billed_minutes: u64,
}

impl World {
    fn new(seed: u64, count: u32, duration_s: Option<u64>) -> World {
        let buyer_sk = SigningKey::from_bytes(&[1; 32]);
        let order = Order {
            image: [3; 32],
            count,
            vcpus: 1,
            memory_mib: 512,
            disk_mib: 1024,
            max_price_per_min: None,
            max_latency_ms: Some(200),
            trusted_only: false,
            duration_s,
        };
        let cfg = FleetConfig {
            overlay_port: 4242,
            ..FleetConfig::default()
        };
        let sellers = (0..SELLERS)
            .map(|i| {
                let sk = SigningKey::from_bytes(&[20 + i as u8; 32]);
                SellerNode {
                    key: PeerKey::of(&sk),
                    sk,
                    policy: SellerPolicy {
                        max_guests: 2,
                        vcpus_total: 4,
                        memory_mib_total: 4096,
                        disk_cap_mib: 8192,
                        min_price_per_min: 1_000,
                        allowed_buyers: None,
                        denied_buyers: BTreeSet::new(),
                        hours: None,
                    },
                    price: 10_000 + 1_000 * i as u64,
                    leases: BTreeMap::new(),
                    disk: BTreeMap::new(),
                    boot_at: BTreeMap::new(),
                    guests: BTreeSet::new(),
                    ended_at: BTreeMap::new(),
                    seq: 0,
                }
            })
            .collect();
        let mut w = World {
            now: T0,
            rng: StdRng::seed_from_u64(seed),
            loss: 0,
            dup: 0,
            max_delay_ms: 2_000,
            net: Vec::new(),
            net_seq: 0,
            buyer_key: PeerKey::of(&buyer_sk),
            fleet: Fleet::new(buyer_sk.clone(), order, cfg, [seed as u8; 32], T0),
            book: OfferBook::new(),
            penalties: BTreeMap::new(),
            silent: false,
            frozen: BTreeMap::new(),
            buyer_sk: buyer_sk.clone(),
            buyer_disk: Vec::new(),
            down_until: None,
            done_seen: 0,
            admitted: BTreeSet::new(),
            sellers,
            last_tick: T0,
            last_hb: T0,
            last_offer: 0,
            seen_buyer: BTreeMap::new(),
            seen_seller: BTreeMap::new(),
            sent_acks: BTreeMap::new(),
            steps: 0,
            stats: Stats::default(),
        };
        w.publish_offers();
        w.tick();
        w
    }

    fn seller_index(&self, k: &PeerKey) -> usize {
        self.sellers
            .iter()
            .position(|s| s.key == *k)
            .expect("a known seller")
    }

    fn send(&mut self, to: To, from: PeerKey, m: &MarketMsg) {
        let bytes = encode(m);
        assert_eq!(&decode(&bytes).expect("own messages decode"), m);
        self.stats.sent += 1;
        match m {
            MarketMsg::Receipt(_) => self.stats.receipts += 1,
            MarketMsg::Ack(_) => self.stats.acks += 1,
            _ => {}
        }
        if self.rng.gen_range(0..100) < self.loss {
            self.stats.lost += 1;
            return;
        }
        let copies = if self.rng.gen_range(0..100) < self.dup {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let at = self.now + self.rng.gen_range(0..=self.max_delay_ms);
            self.net_seq += 1;
            self.net.push(InFlight {
                at,
                seq: self.net_seq,
                to,
                from,
                bytes: bytes.clone(),
            });
        }
    }

    fn publish_offers(&mut self) {
        for i in 0..SELLERS {
            let s = &mut self.sellers[i];
            s.seq += 1;
            let active = s
                .leases
                .values()
                .filter(|l| l.phase() != SellerPhase::Ended)
                .count() as u32;
            let o = Offer {
                seller: s.key,
                seq: s.seq,
                issued_ms: self.now,
                expires_ms: self.now + 120_000,
                vcpus: 4,
                memory_mib: 4096,
                disk_cap_mib: 8192,
                price_per_min: s.price,
                backend: BackendKind::Microvm,
                accel: Accel::Kvm,
                perf_score: 100,
                measurement: [0; 32],
                max_guests: 2,
                free_guests: 2u32.saturating_sub(active),
            };
            let b = encode_offer(&Signed::sign(&s.sk, o));
            // Offers travel by gossip, outside this model's lossy channel.
            if self.buyer_up() {
                let got = decode_offer(&b).unwrap();
                assert_eq!(self.book.insert(got, self.now), Ok(true));
            }
        }
        self.last_offer = self.now;
    }

    // ------------------------------------------------------------ buyer

    /// Saves the fleet as the node does after every call into it.
    fn buyer_save(&mut self) {
        self.buyer_disk = bincode::serialize(&self.fleet.record()).expect("record encodes");
    }

    /// The buyer is back: its fleet from disk, a fresh overlay and offer book.
    fn buyer_restore(&mut self) {
        self.down_until = None;
        self.stats.buyer_restarts += 1;
        let rec: FleetRecord = bincode::deserialize(&self.buyer_disk).expect("record decodes");
        let (f, acts) = Fleet::restore(self.buyer_sk.clone(), rec, self.now).expect("own record");
        self.fleet = f;
        self.admitted.clear();
        self.book = OfferBook::new();
        self.buyer_apply(acts);
    }

    fn buyer_up(&self) -> bool {
        !self.silent && self.down_until.is_none()
    }

    fn buyer_apply(&mut self, acts: Vec<BuyerAction>) {
        self.buyer_apply_inner(acts);
        self.buyer_save();
    }

    fn buyer_apply_inner(&mut self, acts: Vec<BuyerAction>) {
        for a in acts {
            match a {
                BuyerAction::Propose { seller, proposal } => {
                    let to = To::Seller(self.seller_index(&seller));
                    self.send(to, self.buyer_key, &MarketMsg::Propose(proposal));
                }
                BuyerAction::Admit { lease } => {
                    assert!(self.admitted.insert(lease.terms.id), "admitted twice");
                }
                BuyerAction::Revoke { lease, .. } => {
                    assert!(
                        self.admitted.contains(&lease),
                        "revoke of a lease never admitted"
                    );
                }
                BuyerAction::SendAck { seller, ack } => {
                    let prev = self.sent_acks.entry(ack.body.lease).or_insert(0);
                    assert!(ack.body.minute >= *prev, "acks go backwards");
                    *prev = ack.body.minute;
                    let to = To::Seller(self.seller_index(&seller));
                    self.send(to, self.buyer_key, &MarketMsg::Ack(ack));
                }
                BuyerAction::SendStop { seller, stop } => {
                    let to = To::Seller(self.seller_index(&seller));
                    self.send(to, self.buyer_key, &MarketMsg::Stop(stop));
                }
                BuyerAction::Penalize { seller } => *self.penalties.entry(seller).or_insert(0) += 1,
                BuyerAction::Done => {
                    self.done_seen += 1;
                    assert_eq!(self.done_seen, 1, "Done twice");
                }
                BuyerAction::Lost { .. } => self.stats.lost_leases += 1,
                BuyerAction::NoMatch { .. } | BuyerAction::Persist { .. } => {}
            }
        }
    }

    fn buyer_recv(&mut self, from: PeerKey, m: MarketMsg) {
        let now = self.now;
        let acts = match m {
            MarketMsg::Accept(l) => self
                .fleet
                .on_accepted(l, &from, now)
                .expect("honest accept"),
            MarketMsg::Refuse { lease, why } => self.fleet.on_refused(&lease, &from, &why, now),
            MarketMsg::Receipt(r) => match self.fleet.on_receipt(&r, &from, now) {
                Ok(a) => a,
                // The Accept was lost and the slot is still waiting for it.
                Err(Error::UnknownLease(_)) => Vec::new(),
                Err(e) => panic!("honest receipt refused: {e} ({:?})", r.body),
            },
            MarketMsg::Phase { lease, phase } => self.fleet.on_phase(&lease, &from, phase, now),
            MarketMsg::Console { lease, .. } => {
                self.fleet.on_life(&lease, now);
                self.buyer_save();
                Vec::new()
            }
            other => panic!("buyer got {other:?}"),
        };
        self.buyer_apply(acts);
    }

    // ------------------------------------------------------------ sellers

    fn seller_apply(&mut self, i: usize, id: LeaseId, acts: Vec<SellerAction>) {
        for a in acts {
            let s = &mut self.sellers[i];
            match a {
                SellerAction::SendReceipt(r) => {
                    if let Some(&max) = s.ended_at.get(&id) {
                        assert!(
                            r.body.minute <= max,
                            "receipt for a new minute after the end"
                        );
                    }
                    let from = s.key;
                    self.send(To::Buyer, from, &MarketMsg::Receipt(r));
                }
                SellerAction::StopGuest(_) => {
                    s.guests.remove(&id);
                    s.boot_at.remove(&id);
                }
                SellerAction::Persist => {
                    s.disk.insert(id, s.leases[&id].record());
                }
                SellerAction::Ended(reason) => {
                    let name = format!("{reason:?}");
                    let name = name.split('(').next().unwrap_or("").to_string();
                    *self.stats.ended.entry(name).or_insert(0) += 1;
                    s.guests.remove(&id);
                    s.boot_at.remove(&id);
                    let l = &s.leases[&id];
                    assert_eq!(l.phase(), SellerPhase::Ended);
                    s.ended_at.insert(id, l.ledger().receipted);
                    let from = s.key;
                    let m = MarketMsg::Phase {
                        lease: id,
                        phase: GuestPhase::Ended(reason),
                    };
                    self.send(To::Buyer, from, &m);
                }
            }
        }
    }

    fn seller_recv(&mut self, i: usize, from: PeerKey, m: MarketMsg) {
        let now = self.now;
        match m {
            MarketMsg::Propose(p) => {
                let id = p.body.id;
                let s = &mut self.sellers[i];
                if let Some(l) = s.leases.get(&id) {
                    // A duplicated proposal: answer as before.
                    let m = if l.phase() == SellerPhase::Ended {
                        MarketMsg::Refuse {
                            lease: id,
                            why: Refusal::Duplicate,
                        }
                    } else {
                        MarketMsg::Accept(l.lease().clone())
                    };
                    let k = s.key;
                    self.send(To::Buyer, k, &m);
                    return;
                }
                let active: Vec<&LeaseTerms> = s
                    .leases
                    .values()
                    .filter(|l| l.phase() != SellerPhase::Ended)
                    .map(|l| &l.lease().terms)
                    .collect();
                let k = s.key;
                match s.policy.check(&s.key, &p, &from, &active, now, 12 * 60) {
                    Err(why) => self.send(To::Buyer, k, &MarketMsg::Refuse { lease: id, why }),
                    Ok(()) => {
                        let lease = Lease::countersign(&p, &s.sk).expect("checked proposal");
                        let sl = SellerLease::new(lease.clone(), now);
                        s.disk.insert(id, sl.record());
                        s.leases.insert(id, sl);
                        let boot = now + self.rng.gen_range(0..20_000);
                        self.sellers[i].boot_at.insert(id, boot);
                        self.send(To::Buyer, k, &MarketMsg::Accept(lease));
                        let m = MarketMsg::Phase {
                            lease: id,
                            phase: GuestPhase::Fetching { done: 0, total: 10 },
                        };
                        self.send(To::Buyer, k, &m);
                    }
                }
            }
            MarketMsg::Ack(a) => {
                let id = a.body.lease;
                let Some(l) = self.sellers[i].leases.get_mut(&id) else {
                    return;
                };
                let acts = l.on_ack(&a, now).expect("honest ack");
                self.seller_apply(i, id, acts);
            }
            MarketMsg::Stop(st) => {
                let id = st.body.lease;
                let Some(l) = self.sellers[i].leases.get_mut(&id) else {
                    return;
                };
                let acts = l.on_stop(&st, now).expect("honest stop");
                self.seller_apply(i, id, acts);
            }
            other => panic!("seller got {other:?}"),
        }
    }

    fn restart(&mut self, i: usize) {
        self.stats.restarts += 1;
        let now = self.now;
        let s = &mut self.sellers[i];
        s.guests.clear();
        s.boot_at.clear();
        s.leases.clear();
        let recs: Vec<_> = s.disk.values().cloned().collect();
        for rec in recs {
            let id = rec.lease.terms.id;
            let (l, acts) = SellerLease::restore(rec, now);
            self.sellers[i].leases.insert(id, l);
            self.seller_apply(i, id, acts);
        }
    }

    fn guest_exit(&mut self, i: usize) {
        let Some(&id) = self.sellers[i].guests.iter().next() else {
            return;
        };
        let now = self.now;
        let acts = self.sellers[i]
            .leases
            .get_mut(&id)
            .unwrap()
            .on_guest_exited(now);
        self.seller_apply(i, id, acts);
    }

    // ------------------------------------------------------------ time

    fn deliver_due(&mut self) {
        loop {
            let Some(pos) = self
                .net
                .iter()
                .enumerate()
                .filter(|(_, m)| m.at <= self.now)
                .min_by_key(|(_, m)| (m.at, m.seq))
                .map(|(i, _)| i)
            else {
                return;
            };
            let m = self.net.swap_remove(pos);
            let msg = decode(&m.bytes).expect("decodes");
            match m.to {
                To::Buyer => {
                    if self.buyer_up() {
                        self.buyer_recv(m.from, msg);
                    }
                }
                To::Seller(i) => self.seller_recv(i, m.from, msg),
            }
            self.check();
        }
    }

    fn tick(&mut self) {
        let now = self.now;
        if now.saturating_sub(self.last_offer) >= OFFER_EVERY_MS {
            self.publish_offers();
        }
        let heartbeat = now.saturating_sub(self.last_hb) >= HEARTBEAT_MS;
        if heartbeat {
            self.last_hb = now;
        }
        for i in 0..SELLERS {
            let ids: Vec<LeaseId> = self.sellers[i].leases.keys().copied().collect();
            for id in ids {
                let s = &mut self.sellers[i];
                if s.boot_at.get(&id).is_some_and(|&t| t <= now) {
                    s.boot_at.remove(&id);
                    let l = s.leases.get_mut(&id).unwrap();
                    let acts = l.on_guest_started(now);
                    if l.phase() == SellerPhase::Running {
                        s.guests.insert(id);
                        let k = s.key;
                        self.seller_apply(i, id, acts);
                        let m = MarketMsg::Phase {
                            lease: id,
                            phase: GuestPhase::Running,
                        };
                        self.send(To::Buyer, k, &m);
                    } else {
                        self.seller_apply(i, id, acts);
                    }
                }
                let s = &mut self.sellers[i];
                if heartbeat && s.guests.contains(&id) {
                    // Overlay traffic from the guest: a sign of life for the buyer.
                    let k = s.key;
                    let m = MarketMsg::Console {
                        lease: id,
                        offset: 0,
                        data: Vec::new(),
                    };
                    self.send(To::Buyer, k, &m);
                }
                let s = &mut self.sellers[i];
                let sk = s.sk.clone();
                let acts = s.leases.get_mut(&id).unwrap().on_tick(now, &sk);
                self.seller_apply(i, id, acts);
            }
        }
        if !self.silent && self.down_until.is_some_and(|t| now >= t) {
            self.buyer_restore();
        }
        if self.buyer_up() {
            let acts = self.fleet.on_tick(now);
            self.buyer_apply(acts);
            self.book.expire(now);
            let offers: Vec<Offer> = self.book.live(now).cloned().collect();
            let refs: Vec<&Offer> = offers.iter().collect();
            let rtt: BTreeMap<PeerKey, u32> = self.sellers.iter().map(|s| (s.key, 10)).collect();
            let acts =
                self.fleet
                    .on_offers(&refs, &rtt, &TrustPolicy::default(), &self.penalties, now);
            self.buyer_apply(acts);
        }
        self.last_tick = now;
        self.check();
    }

    /// Moves time forward to `until`, delivering messages and ticking every second.
    fn run_until(&mut self, until: u64) {
        while self.now < until {
            let next_tick = self.last_tick + TICK_MS;
            let next_msg = self.net.iter().map(|m| m.at).min().unwrap_or(u64::MAX);
            self.now = next_tick.min(next_msg).min(until).max(self.now);
            self.deliver_due();
            if self.now >= next_tick {
                self.tick();
            }
        }
    }

    fn step(&mut self, op: &Op) {
        self.steps += 1;
        match *op {
            Op::Advance(ms) => self.run_until(self.now + u64::from(ms)),
            Op::Restart(i) => self.restart(i),
            Op::BuyerStop => {
                if self.buyer_up() {
                    let acts = self.fleet.stop(None, self.now);
                    self.buyer_apply(acts);
                }
            }
            Op::StopOne(slot) => {
                if self.buyer_up() {
                    let id = self
                        .fleet
                        .slots()
                        .get(slot)
                        .and_then(|s| s.lease.as_ref().map(|t| t.id));
                    if let Some(id) = id {
                        let acts = self.fleet.stop(Some(&id), self.now);
                        self.buyer_apply(acts);
                    }
                }
            }
            Op::BuyerRestart(down_s) => {
                if self.buyer_up() {
                    self.down_until = Some(self.now + u64::from(down_s) * 1000);
                    if down_s == 0 {
                        self.buyer_restore();
                    }
                }
            }
            Op::BuyerSilent => {
                if self.buyer_up() {
                    self.silent = true;
                    self.frozen = self.fleet.ledger().map(|e| (e.lease, e.acked)).collect();
                }
            }
            Op::GuestExit(i) => self.guest_exit(i),
            Op::Net(loss, dup, delay_s) => {
                self.loss = loss;
                self.dup = dup;
                self.max_delay_ms = u64::from(delay_s) * 1000;
            }
            Op::Jump(s) => {
                // Nothing ticks meanwhile (a suspended laptop, a stalled event loop).
                self.now += u64::from(s) * 1000;
                self.last_tick = self.now - TICK_MS;
                self.deliver_due();
                self.tick();
            }
        }
        self.check();
    }

    fn buyer_acked(&self, id: &LeaseId) -> u32 {
        self.fleet
            .ledger()
            .find(|e| e.lease == *id)
            .map_or(0, |e| e.acked)
    }

    /// The invariants, after every step.
    fn check(&mut self) {
        let mut buyer_total = 0;
        for e in self.fleet.ledger() {
            assert_eq!(e.billed(), u64::from(e.acked) * e.price_per_min);
            assert!(e.acked <= e.receipted);
            let prev = self.seen_buyer.insert(e.lease, e.acked).unwrap_or(0);
            assert!(e.acked >= prev, "buyer acked went backwards");
            buyer_total += e.billed();
            // Every lease the buyer made exists at its seller (persisted before Accept).
            let i = self.seller_index(&e.seller);
            assert!(
                self.sellers[i].leases.contains_key(&e.lease),
                "lease unknown to its seller"
            );
        }
        assert_eq!(self.fleet.cost_so_far(), buyer_total);
        for s in &self.sellers {
            for (id, l) in &s.leases {
                let sl = l.ledger();
                let b = self.buyer_acked(id);
                if sl.acked < b {
                    self.stats.lagging += 1;
                }
                assert!(
                    sl.acked <= b && b <= sl.receipted,
                    "lease {id}: seller acked {} / buyer acked {b} / seller receipted {}",
                    sl.acked,
                    sl.receipted
                );
                assert_eq!(
                    sl.billed(),
                    u64::from(sl.acked) * l.lease().terms.price_per_min
                );
                let (pa, pr) = self.seen_seller.get(id).copied().unwrap_or((0, 0));
                assert!(
                    sl.acked >= pa && sl.receipted >= pr,
                    "seller ledger went backwards"
                );
                self.seen_seller.insert(*id, (sl.acked, sl.receipted));
                if let Some(&max) = s.ended_at.get(id) {
                    assert_eq!(sl.receipted, max, "receipted grew after the end");
                }
                if self.silent {
                    let frozen = self.frozen.get(id).copied().unwrap_or(0);
                    assert!(sl.acked <= frozen, "a silent buyer billed beyond its acks");
                }
            }
        }
    }

    /// The network turns reliable; a live buyer stops its run; everything settles.
    fn quiesce(&mut self) {
        self.loss = 0;
        self.dup = 0;
        self.max_delay_ms = 2_000;
        // A buyer that is down comes back first (ticks restore it).
        while self.down_until.is_some() {
            let t = self.now + 1_000;
            self.run_until(t);
        }
        if !self.silent {
            let acts = self.fleet.stop(None, self.now);
            self.buyer_apply(acts);
        }
        // Long enough for every grace period and the longest re-send back-off.
        let end = self.now + 3 * 3_600_000;
        while self.now < end {
            // Settled: nothing in flight, every lease over, and (with a live buyer)
            // both ledgers equal. Otherwise keep going: re-sends must get there.
            let settled = self.net.is_empty()
                && self.sellers.iter().all(|s| {
                    s.leases.iter().all(|(id, l)| {
                        l.phase() == SellerPhase::Ended
                            && (self.silent || l.ledger().acked == self.buyer_acked(id))
                    })
                });
            if settled {
                break;
            }
            let t = self.now + 5_000;
            self.run_until(t);
        }
        for s in &self.sellers {
            for (id, l) in &s.leases {
                assert_eq!(l.phase(), SellerPhase::Ended, "lease {id} still runs");
                if !self.silent {
                    assert_eq!(
                        l.ledger().acked,
                        self.buyer_acked(id),
                        "lease {id}: ledgers disagree after quiescence"
                    );
                }
            }
        }
        self.stats.billed_minutes = self.fleet.ledger().map(|e| u64::from(e.acked)).sum();
        if !self.silent {
            assert!(self
                .fleet
                .slots()
                .iter()
                .all(|s| s.state == SlotState::Stopped));
            assert_eq!(self.done_seen, 1);
            assert!(self.net.is_empty());
        }
    }
}

fn run_model(seed: u64, count: u32, duration: Option<u64>, ops: &[Op]) -> World {
    let mut w = World::new(seed, count, duration);
    for op in ops {
        w.step(op);
    }
    w.quiesce();
    w
}

proptest! {
    // MARKET_MODEL_CASES=2000 for a deeper run than CI's.
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("MARKET_MODEL_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
    ))]

    #[test]
    fn fleet_and_sellers_keep_billing_invariants(
        seed in any::<u64>(),
        count in 1u32..=3,
        duration in prop::option::of(30u64..900),
        mut ops in proptest::collection::vec(arb_op(), 1..60),
        // Where (if at all) the buyer stops its run or goes silent.
        end in prop_oneof![2 => Just(None), 1 => (any::<prop::sample::Index>(), any::<bool>()).prop_map(Some)],
    ) {
        if let Some((at, silent)) = end {
            let i = at.index(ops.len() + 1);
            ops.insert(i, if silent { Op::BuyerSilent } else { Op::BuyerStop });
        }
        let w = run_model(seed, count, duration, &ops);
        if std::env::var_os("MARKET_MODEL_STATS").is_some() {
            eprintln!("{:?}", w.stats);
        }
    }
}

/// A calm run: everything is billed and both sides agree to the minute.
#[test]
fn calm_network_bills_every_minute() {
    let ops = [Op::Advance(10 * 60_000)];
    let w = run_model(7, 2, None, &ops);
    let entries: Vec<&LedgerEntry> = w.fleet.ledger().collect();
    assert_eq!(entries.len(), 2);
    for e in &entries {
        // Proposed at once, booted within 20 s: 9 or 10 whole minutes before the stop.
        assert!((9..=10).contains(&e.acked), "{e:?}");
    }
    assert!(w.penalties.is_empty());
    assert_eq!(
        w.fleet.slots().iter().map(|s| s.replacements).sum::<u32>(),
        0
    );
}

/// A seller restart mid-run: its slot is replaced at the same address, billing for
/// the dead lease stops at what was receipted, the replacement is billed from then.
#[test]
fn seller_restart_is_replaced() {
    let mut w = World::new(3, 1, None);
    w.run_until(T0 + 3 * 60_000 + 30_000);
    let first = w.fleet.slots()[0].lease.clone().expect("leased");
    let ip = w.fleet.slots()[0].ip;
    let i = w.seller_index(&first.seller);
    w.restart(i);
    w.run_until(T0 + 10 * 60_000);
    let slot = &w.fleet.slots()[0];
    assert_eq!(slot.replacements, 1);
    let second = slot.lease.clone().expect("replaced");
    assert_ne!(second.seller, first.seller);
    assert_eq!(second.guest_ip, ip);
    assert!(matches!(slot.state, SlotState::Running { .. }));
    w.quiesce();
    let billed: BTreeMap<LeaseId, u32> = w.fleet.ledger().map(|e| (e.lease, e.acked)).collect();
    assert!((2..=3).contains(&billed[&first.id]), "{billed:?}");
    assert!(billed[&second.id] >= 5, "{billed:?}");
}

/// A buyer that vanishes is cut off after the grace period and billed only what it
/// acked.
#[test]
fn silent_buyer_is_cut_off() {
    let mut w = World::new(5, 2, None);
    w.run_until(T0 + 5 * 60_000);
    w.step(&Op::BuyerSilent);
    let frozen = w.frozen.clone();
    w.run_until(T0 + 20 * 60_000);
    for s in &w.sellers {
        for (id, l) in &s.leases {
            assert_eq!(l.phase(), SellerPhase::Ended);
            assert_eq!(l.ledger().end_reason, Some(EndReason::BuyerSilent));
            assert!(l.ledger().acked <= frozen[id]);
            // Nothing was receipted far past the buyer's silence.
            assert!(l.ledger().receipted <= frozen[id] + 3);
        }
    }
}

/// A buyer daemon restart: the fleet comes back from its record, the sellers' guests
/// run on under the same leases (no replacement, nothing proposed again), and billing
/// goes on to the minute.
#[test]
fn buyer_restart_keeps_its_leases() {
    let mut w = World::new(9, 2, None);
    w.run_until(T0 + 3 * 60_000 + 10_000);
    let leases = |w: &World| -> Vec<LeaseId> {
        w.fleet
            .slots()
            .iter()
            .map(|s| s.lease.as_ref().expect("leased").id)
            .collect()
    };
    let before = leases(&w);
    w.step(&Op::BuyerRestart(20));
    w.run_until(T0 + 10 * 60_000);
    assert_eq!(leases(&w), before);
    for s in w.fleet.slots() {
        assert!(matches!(s.state, SlotState::Running { .. }), "{s:?}");
        assert_eq!(s.replacements, 0);
    }
    w.quiesce();
    assert_eq!(w.stats.buyer_restarts, 1);
    for e in w.fleet.ledger() {
        assert!(e.acked >= 8, "{e:?}");
    }
}

/// A buyer down for longer than the grace period: its sellers end the guests and
/// bill only what was acked; the restored fleet notices the silence and replaces.
#[test]
fn buyer_down_past_the_grace_is_cut_off_then_replaces() {
    let mut w = World::new(11, 1, None);
    w.run_until(T0 + 3 * 60_000 + 10_000);
    let first = w.fleet.slots()[0].lease.clone().expect("leased");
    let acked = w.buyer_acked(&first.id);
    w.step(&Op::BuyerRestart(190));
    w.run_until(T0 + 10 * 60_000);
    let i = w.seller_index(&first.seller);
    let l = &w.sellers[i].leases[&first.id];
    assert_eq!(l.ledger().end_reason, Some(EndReason::BuyerSilent));
    // At most the minutes the guest ran within the grace (acked once the buyer is back).
    assert!(l.ledger().acked <= acked + 3, "{:?}", l.ledger());
    let slot = &w.fleet.slots()[0];
    assert_eq!(slot.replacements, 1);
    assert_ne!(slot.lease.as_ref().expect("replaced").id, first.id);
    w.quiesce();
}
