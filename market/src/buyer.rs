//! The buyer's fleet for one `run`: a slot per wanted guest, each with a fixed MAC and
//! IP, filled by proposing leases to selected sellers, billed by acking receipts, and
//! refilled with a replacement when its seller goes silent.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

use crate::billing::{Ack, LedgerEntry, Receipt, Stop};
use crate::error::Error;
use crate::grant::ImageGrant;
use crate::keys::{LeaseId, PeerKey};
use crate::lease::{Lease, LeaseTerms, Refusal};
use crate::offer::Offer;
use crate::order::{select, Order, TrustPolicy};
use crate::seller::EndReason;
use crate::signed::Signed;

/// Timeouts and addressing for a fleet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetConfig {
    /// A starting or running guest with no sign of life for this long is lost.
    pub silence_ms: u64,
    /// A proposal not answered within this is abandoned (and void at the seller).
    pub proposal_ms: u64,
    pub period_s: u32,
    pub grace_s: u32,
    /// The overlay network; guests get net_base + first_guest_host + slot index.
    pub net_base: Ipv4Addr,
    pub host_ip: Ipv4Addr,
    pub overlay_port: u16,
    pub first_guest_host: u32,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            silence_ms: 30_000,
            proposal_ms: 15_000,
            period_s: crate::lease::DEFAULT_PERIOD_S,
            grace_s: crate::lease::DEFAULT_GRACE_S,
            net_base: Ipv4Addr::new(10, 77, 0, 0),
            host_ip: Ipv4Addr::new(10, 77, 0, 1),
            overlay_port: 0,
            first_guest_host: 2,
        }
    }
}

/// How far a guest has got, as its seller reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestPhase {
    Fetching { done: u64, total: u64 },
    Booting,
    Running,
    Ended(EndReason),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SlotState {
    Choosing,
    Proposed {
        seller: PeerKey,
        since_ms: u64,
    },
    Starting {
        seller: PeerKey,
        phase: Option<GuestPhase>,
    },
    Running {
        seller: PeerKey,
        since_ms: u64,
    },
    Stopped,
}

impl SlotState {
    /// The seller holding the slot, while it holds it.
    pub fn seller(&self) -> Option<PeerKey> {
        match self {
            SlotState::Proposed { seller, .. }
            | SlotState::Starting { seller, .. }
            | SlotState::Running { seller, .. } => Some(*seller),
            SlotState::Choosing | SlotState::Stopped => None,
        }
    }
}

/// One wanted guest. Its MAC and IP stay the same across replacements.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    pub index: u32,
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    pub state: SlotState,
    /// The current (or, once Stopped, the last) lease's terms.
    pub lease: Option<LeaseTerms>,
    pub last_life_ms: u64,
    pub replacements: u32,
}

/// What the caller must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BuyerAction {
    Propose {
        seller: PeerKey,
        proposal: Signed<LeaseTerms>,
    },
    /// Overlay: admit the seller's key for the lease's MAC/IP.
    Admit {
        lease: Lease,
    },
    /// Overlay: remove it.
    Revoke {
        lease: LeaseId,
        mac: [u8; 6],
    },
    SendAck {
        seller: PeerKey,
        ack: Signed<Ack>,
    },
    SendStop {
        seller: PeerKey,
        stop: Signed<Stop>,
    },
    /// Persist a penalty for the seller; it feeds `select` next time.
    Penalize {
        seller: PeerKey,
    },
    Lost {
        slot: u32,
        lease: LeaseId,
        seller: PeerKey,
        silent_ms: u64,
    },
    /// No offer fits this slot now; `why` is `Exclusions::describe`.
    NoMatch {
        slot: u32,
        why: String,
    },
    /// The lease's ledger entry changed: save it before doing what follows.
    Persist {
        lease: LeaseId,
    },
    /// Every slot is Stopped.
    Done,
}

/// One proposal or lease the fleet made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct BuyerLease {
    terms: LeaseTerms,
    slot: u32,
    /// Set once the seller countersigned.
    lease: Option<Lease>,
    ledger: LedgerEntry,
    /// When the buyer stopped, lost or saw the end of the lease.
    stopped_ms: Option<u64>,
    /// Admitted on the overlay (so it needs a Revoke).
    admitted: bool,
}

/// The buyer's fleet state machine.
#[derive(Debug)]
pub struct Fleet {
    sk: SigningKey,
    me: PeerKey,
    order: Order,
    cfg: FleetConfig,
    seed: [u8; 32],
    counter: u64,
    started_ms: u64,
    slots: Vec<Slot>,
    leases: BTreeMap<LeaseId, BuyerLease>,
    /// Sellers that refused or timed out, per slot.
    slot_avoid: Vec<BTreeSet<PeerKey>>,
    last_nomatch: Vec<Option<String>>,
    done_sent: bool,
}

/// Everything a fleet holds except its signing key: what the buyer saves so that a
/// restarted daemon carries on with the same slots, leases and ledger
/// ([`Fleet::restore`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetRecord {
    order: Order,
    cfg: FleetConfig,
    seed: [u8; 32],
    counter: u64,
    started_ms: u64,
    slots: Vec<Slot>,
    /// A list, not a map: the record is also stored as JSON (string keys only).
    leases: Vec<BuyerLease>,
    slot_avoid: Vec<BTreeSet<PeerKey>>,
    done_sent: bool,
}

impl FleetRecord {
    pub fn order(&self) -> &Order {
        &self.order
    }

    /// Every slot is stopped: nothing left to restore.
    pub fn is_done(&self) -> bool {
        self.done_sent
    }
}

fn stop_msg(sk: &SigningKey, id: LeaseId, now_ms: u64) -> Signed<Stop> {
    Signed::sign(
        sk,
        Stop {
            lease: id,
            issued_ms: now_ms,
        },
    )
}

fn derive(seed: &[u8; 32], what: &[u8], n: u64) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(seed);
    h.update(what);
    h.update(&n.to_le_bytes());
    *h.finalize().as_bytes()
}

impl Fleet {
    pub fn new(
        me_sk: SigningKey,
        order: Order,
        cfg: FleetConfig,
        seed: [u8; 32],
        now_ms: u64,
    ) -> Self {
        let base = u32::from(cfg.net_base);
        let slots: Vec<Slot> = (0..order.count)
            .map(|i| {
                let h = derive(&seed, b"mac", u64::from(i));
                let mut mac = [0u8; 6];
                mac.copy_from_slice(&h[..6]);
                // Locally administered, unicast.
                mac[0] = (mac[0] & 0xfe) | 0x02;
                Slot {
                    index: i,
                    mac,
                    ip: Ipv4Addr::from(base.wrapping_add(cfg.first_guest_host).wrapping_add(i)),
                    state: SlotState::Choosing,
                    lease: None,
                    last_life_ms: now_ms,
                    replacements: 0,
                }
            })
            .collect();
        let n = slots.len();
        Fleet {
            me: PeerKey::of(&me_sk),
            sk: me_sk,
            order,
            cfg,
            seed,
            counter: 0,
            started_ms: now_ms,
            slots,
            leases: BTreeMap::new(),
            slot_avoid: vec![BTreeSet::new(); n],
            last_nomatch: vec![None; n],
            done_sent: false,
        }
    }

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    pub fn order(&self) -> &Order {
        &self.order
    }

    /// What to save (after any call that returned actions, or on a timer).
    pub fn record(&self) -> FleetRecord {
        FleetRecord {
            order: self.order.clone(),
            cfg: self.cfg.clone(),
            seed: self.seed,
            counter: self.counter,
            started_ms: self.started_ms,
            slots: self.slots.clone(),
            leases: self.leases.values().cloned().collect(),
            slot_avoid: self.slot_avoid.clone(),
            done_sent: self.done_sent,
        }
    }

    /// A fleet from its record after a buyer restart. The sellers kept running the
    /// guests, so nothing is re-leased: every live lease is admitted to the (new)
    /// overlay again and acked at once (which tells its seller the buyer is back),
    /// and every held slot gets a full `silence_ms` from now to show life before it
    /// counts as lost. The record must be this key's.
    pub fn restore(
        me_sk: SigningKey,
        rec: FleetRecord,
        now_ms: u64,
    ) -> Result<(Fleet, Vec<BuyerAction>), Error> {
        let me = PeerKey::of(&me_sk);
        if let Some(l) = rec.leases.iter().find(|l| l.terms.buyer != me) {
            return Err(Error::WrongPeer { lease: l.terms.id });
        }
        let n = rec.slots.len();
        if rec.slot_avoid.len() != n || rec.leases.iter().any(|l| l.slot as usize >= n) {
            return Err(Error::Decode("fleet record: slots do not match".into()));
        }
        let mut f = Fleet {
            me,
            sk: me_sk,
            order: rec.order,
            cfg: rec.cfg,
            seed: rec.seed,
            counter: rec.counter,
            started_ms: rec.started_ms,
            slots: rec.slots,
            leases: rec.leases.into_iter().map(|l| (l.terms.id, l)).collect(),
            slot_avoid: rec.slot_avoid,
            last_nomatch: vec![None; n],
            done_sent: rec.done_sent,
        };
        let mut out = Vec::new();
        for slot in &mut f.slots {
            if matches!(
                slot.state,
                SlotState::Starting { .. } | SlotState::Running { .. }
            ) {
                slot.last_life_ms = slot.last_life_ms.max(now_ms);
            }
        }
        for (id, l) in &f.leases {
            let Some(lease) = &l.lease else { continue };
            if l.stopped_ms.is_some() || !l.admitted {
                continue;
            }
            out.push(BuyerAction::Admit {
                lease: lease.clone(),
            });
            out.push(BuyerAction::SendAck {
                seller: l.terms.seller,
                ack: Signed::sign(
                    &f.sk,
                    Ack {
                        lease: *id,
                        minute: l.ledger.acked,
                        total: l.terms.total_for(l.ledger.acked),
                    },
                ),
            });
        }
        Ok((f, out))
    }

    /// One entry per lease ever made (countersigned).
    pub fn ledger(&self) -> impl Iterator<Item = &LedgerEntry> {
        self.leases
            .values()
            .filter(|l| l.lease.is_some())
            .map(|l| &l.ledger)
    }

    /// Sum of what was acked.
    pub fn cost_so_far(&self) -> u64 {
        self.ledger().map(LedgerEntry::billed).sum()
    }

    pub fn lease_for(&self, id: &LeaseId) -> Option<&LeaseTerms> {
        self.leases.get(id).map(|l| &l.terms)
    }

    /// The slot whose live lease is `id`.
    fn current_slot(&self, id: &LeaseId) -> Option<usize> {
        let l = self.leases.get(id)?;
        let s = &self.slots[l.slot as usize];
        (s.state.seller().is_some() && s.lease.as_ref().map(|t| t.id) == Some(*id))
            .then_some(l.slot as usize)
    }

    fn duration_end(&self) -> Option<u64> {
        self.order
            .duration_s
            .map(|d| self.started_ms.saturating_add(d.saturating_mul(1000)))
    }

    /// Ends our side of a lease: Revoke (if admitted), Stop (if asked), Persist.
    fn end_lease(
        &mut self,
        id: LeaseId,
        reason: EndReason,
        send_stop: bool,
        now_ms: u64,
        out: &mut Vec<BuyerAction>,
    ) {
        let Some(l) = self.leases.get_mut(&id) else {
            return;
        };
        if l.lease.is_none() || l.stopped_ms.is_some() {
            return;
        }
        l.stopped_ms = Some(now_ms);
        l.ledger.ended = true;
        l.ledger.end_reason = Some(reason);
        if l.admitted {
            out.push(BuyerAction::Revoke {
                lease: id,
                mac: l.terms.guest_mac,
            });
        }
        out.push(BuyerAction::Persist { lease: id });
        if send_stop {
            out.push(BuyerAction::SendStop {
                seller: l.terms.seller,
                stop: stop_msg(&self.sk, id, now_ms),
            });
        }
    }

    fn maybe_done(&mut self, out: &mut Vec<BuyerAction>) {
        if !self.done_sent && self.slots.iter().all(|s| s.state == SlotState::Stopped) {
            self.done_sent = true;
            out.push(BuyerAction::Done);
        }
    }

    /// Fill Choosing slots: select() with avoid = sellers already holding a slot of
    /// this fleet, sellers that refused/timed out for this slot.
    pub fn on_offers(
        &mut self,
        offers: &[&Offer],
        rtt_ms: &BTreeMap<PeerKey, u32>,
        trust: &TrustPolicy,
        penalties: &BTreeMap<PeerKey, u32>,
        now_ms: u64,
    ) -> Vec<BuyerAction> {
        let mut out = Vec::new();
        if self.duration_end().is_some_and(|e| now_ms >= e) {
            return out;
        }
        for i in 0..self.slots.len() {
            if self.slots[i].state != SlotState::Choosing {
                continue;
            }
            let mut avoid: BTreeSet<PeerKey> =
                self.slots.iter().filter_map(|s| s.state.seller()).collect();
            avoid.extend(self.slot_avoid[i].iter().copied());
            let sel = select(&self.order, offers, rtt_ms, trust, penalties, &avoid, 1);
            let Some(seller) = sel.picked.first().copied() else {
                let why = sel.excluded.describe(sel.seen);
                if self.last_nomatch[i].as_deref() != Some(why.as_str()) {
                    self.last_nomatch[i] = Some(why.clone());
                    out.push(BuyerAction::NoMatch {
                        slot: i as u32,
                        why,
                    });
                }
                // Sellers that refused or timed out for this slot get another chance
                // once nobody else is left.
                if sel.excluded.avoided > 0 {
                    self.slot_avoid[i].clear();
                }
                continue;
            };
            let offer = offers
                .iter()
                .find(|o| o.seller == seller)
                .expect("select picks from offers");
            out.push(self.propose(i, offer, now_ms));
        }
        out
    }

    fn propose(&mut self, i: usize, offer: &Offer, now_ms: u64) -> BuyerAction {
        let id = LeaseId(
            derive(&self.seed, b"lease", self.counter)[..16]
                .try_into()
                .expect("16 bytes"),
        );
        self.counter += 1;
        let remaining = self.order.duration_s.map(|d| {
            let left_ms = self
                .started_ms
                .saturating_add(d.saturating_mul(1000))
                .saturating_sub(now_ms);
            left_ms.div_ceil(1000)
        });
        let slot = &mut self.slots[i];
        let terms = LeaseTerms {
            id,
            buyer: self.me,
            seller: offer.seller,
            image: self.order.image,
            guest_mac: slot.mac,
            guest_ip: slot.ip,
            buyer_host_ip: self.cfg.host_ip,
            overlay_port: self.cfg.overlay_port,
            vcpus: self.order.vcpus,
            memory_mib: self.order.memory_mib,
            disk_mib: self.order.disk_mib,
            price_per_min: offer.price_per_min,
            period_s: self.cfg.period_s,
            grace_s: self.cfg.grace_s,
            issued_ms: now_ms,
            start_by_ms: now_ms.saturating_add(self.cfg.proposal_ms),
            duration_s: remaining,
            // the seller may fetch (and share) the image while the lease can last
            grant: Some(ImageGrant::sign(
                &self.sk,
                self.order.image,
                Some(offer.seller),
                now_ms,
                remaining.map(|d| {
                    now_ms
                        .saturating_add(self.cfg.proposal_ms)
                        .saturating_add(d.saturating_mul(1000))
                        .saturating_add(u64::from(self.cfg.grace_s) * 1000)
                }),
            )),
        };
        slot.state = SlotState::Proposed {
            seller: offer.seller,
            since_ms: now_ms,
        };
        slot.lease = Some(terms.clone());
        self.last_nomatch[i] = None;
        self.leases.insert(
            id,
            BuyerLease {
                terms: terms.clone(),
                slot: i as u32,
                lease: None,
                ledger: LedgerEntry {
                    lease: id,
                    buyer: self.me,
                    seller: offer.seller,
                    price_per_min: offer.price_per_min,
                    receipted: 0,
                    acked: 0,
                    ended: false,
                    end_reason: None,
                },
                stopped_ms: None,
                admitted: false,
            },
        );
        BuyerAction::Propose {
            seller: offer.seller,
            proposal: Signed::sign(&self.sk, terms),
        }
    }

    /// The seller countersigned. A lease whose slot moved on meanwhile is stopped.
    pub fn on_accepted(
        &mut self,
        lease: Lease,
        from: &PeerKey,
        now_ms: u64,
    ) -> Result<Vec<BuyerAction>, Error> {
        let id = lease.terms.id;
        let l = self.leases.get(&id).ok_or(Error::UnknownLease(id))?;
        if *from != l.terms.seller {
            return Err(Error::WrongPeer { lease: id });
        }
        if lease.terms != l.terms {
            return Err(Error::TermsMismatch { lease: id });
        }
        lease.verify()?;
        if l.lease.is_some() {
            return Ok(Vec::new());
        }
        let current = self.current_slot(&id);
        let seller = l.terms.seller;
        let l = self.leases.get_mut(&id).expect("looked up above");
        l.lease = Some(lease.clone());
        let mut out = Vec::new();
        match current {
            Some(i) if matches!(self.slots[i].state, SlotState::Proposed { .. }) => {
                l.admitted = true;
                let slot = &mut self.slots[i];
                slot.state = SlotState::Starting {
                    seller,
                    phase: None,
                };
                slot.last_life_ms = now_ms;
                out.push(BuyerAction::Persist { lease: id });
                out.push(BuyerAction::Admit { lease });
            }
            _ => {
                // Too late: the slot timed out or was stopped. The seller is starting a
                // guest nobody wants.
                self.end_lease(id, EndReason::BuyerStopped, true, now_ms, &mut out);
            }
        }
        Ok(out)
    }

    /// The seller refused: the slot chooses again, avoiding that seller.
    pub fn on_refused(
        &mut self,
        lease: &LeaseId,
        from: &PeerKey,
        _why: &Refusal,
        _now_ms: u64,
    ) -> Vec<BuyerAction> {
        let Some(l) = self.leases.get(lease) else {
            return Vec::new();
        };
        if *from != l.terms.seller || l.lease.is_some() {
            return Vec::new();
        }
        let seller = l.terms.seller;
        if let Some(i) = self.current_slot(lease) {
            let slot = &mut self.slots[i];
            slot.state = SlotState::Choosing;
            slot.lease = None;
            self.slot_avoid[i].insert(seller);
        }
        // The proposal stays known: an Accept arriving after a refusal (of a duplicated
        // proposal) is then answered with a Stop, not an error.
        Vec::new()
    }

    /// Progress from the seller. `Ended` frees the slot: stopped for good when the
    /// guest finished (exited, duration, our stop), otherwise replaced.
    pub fn on_phase(
        &mut self,
        lease: &LeaseId,
        from: &PeerKey,
        phase: GuestPhase,
        now_ms: u64,
    ) -> Vec<BuyerAction> {
        let mut out = Vec::new();
        let Some(l) = self.leases.get(lease) else {
            return out;
        };
        if *from != l.terms.seller {
            return out;
        }
        let seller = l.terms.seller;
        let Some(i) = self.current_slot(lease) else {
            // A guest for a lease we gave up on: make sure it stops.
            if l.lease.is_none() && !matches!(phase, GuestPhase::Ended(_)) {
                out.push(BuyerAction::SendStop {
                    seller,
                    stop: stop_msg(&self.sk, *lease, now_ms),
                });
            } else if let GuestPhase::Ended(r) = phase {
                self.end_lease(*lease, r, false, now_ms, &mut out);
            }
            return out;
        };
        if l.lease.is_none() {
            // Still waiting for the Accept; phases before it are noise.
            return out;
        }
        match phase {
            GuestPhase::Fetching { .. } | GuestPhase::Booting => {
                let slot = &mut self.slots[i];
                slot.last_life_ms = slot.last_life_ms.max(now_ms);
                if let SlotState::Starting { phase: p, .. } = &mut slot.state {
                    *p = Some(phase);
                }
            }
            GuestPhase::Running => {
                let slot = &mut self.slots[i];
                slot.last_life_ms = slot.last_life_ms.max(now_ms);
                if !matches!(slot.state, SlotState::Running { .. }) {
                    slot.state = SlotState::Running {
                        seller,
                        since_ms: now_ms,
                    };
                }
            }
            GuestPhase::Ended(reason) => {
                let finished = matches!(
                    reason,
                    EndReason::GuestExited | EndReason::DurationReached | EndReason::BuyerStopped
                );
                self.end_lease(*lease, reason, false, now_ms, &mut out);
                let slot = &mut self.slots[i];
                if finished {
                    slot.state = SlotState::Stopped;
                    self.maybe_done(&mut out);
                } else {
                    slot.state = SlotState::Choosing;
                    slot.lease = None;
                    slot.replacements += 1;
                    self.slot_avoid[i].insert(seller);
                }
            }
        }
        out
    }

    /// Checks a receipt and acks cumulatively. A minute is accepted iff it is at
    /// most the periods elapsed since our proposal up to now or our stop, plus one
    /// for delays, and within the duration; amount and total must match the price. Never counts a minute twice.
    pub fn on_receipt(
        &mut self,
        r: &Signed<Receipt>,
        from: &PeerKey,
        now_ms: u64,
    ) -> Result<Vec<BuyerAction>, Error> {
        let id = r.body.lease;
        let current = self.current_slot(&id);
        let l = self.leases.get_mut(&id).ok_or(Error::UnknownLease(id))?;
        let t = &l.terms;
        if *from != t.seller || r.signer != t.seller {
            return Err(Error::WrongPeer { lease: id });
        }
        let rc = r.verify()?;
        if l.lease.is_none() {
            if current.is_none() {
                // Billing for a proposal we abandoned: the seller must stop.
                return Ok(vec![BuyerAction::SendStop {
                    seller: t.seller,
                    stop: stop_msg(&self.sk, id, now_ms),
                }]);
            }
            return Err(Error::UnknownLease(id));
        }
        let (want_amount, want_total) = (t.price_per_min, t.total_for(rc.minute));
        if rc.minute == 0 || rc.amount != want_amount || rc.total != want_total {
            return Err(Error::BadReceipt {
                lease: id,
                minute: rc.minute,
                amount: rc.amount,
                total: rc.total,
                want_amount,
                want_total,
            });
        }
        // Bound by our own proposal time: the seller cannot have started before it,
        // whatever delays or stalls held up the phases. (When we heard "Running" is
        // no bound: a buyer whose loop stalled hears it late and would then refuse
        // every honest receipt.)
        let since = t.issued_ms;
        let until = l.stopped_ms.map_or(now_ms, |s| s.min(now_ms));
        let elapsed = until.saturating_sub(since) / t.period_ms();
        let mut max = u32::try_from(elapsed).unwrap_or(u32::MAX).saturating_add(1);
        if let Some(d) = t.duration_periods() {
            max = max.min(d);
        }
        let mut out = Vec::new();
        if rc.minute > max {
            if l.stopped_ms.is_some() {
                // Still billing after we ended it: our Stop was lost. Our last ack
                // goes with it so the seller's ledger can still catch up with ours.
                let acked = l.ledger.acked;
                if acked > 0 {
                    let ack = Ack {
                        lease: id,
                        minute: acked,
                        total: t.total_for(acked),
                    };
                    out.push(BuyerAction::SendAck {
                        seller: t.seller,
                        ack: Signed::sign(&self.sk, ack),
                    });
                }
                out.push(BuyerAction::SendStop {
                    seller: t.seller,
                    stop: stop_msg(&self.sk, id, now_ms),
                });
                return Ok(out);
            }
            return Err(Error::ReceiptTooEarly {
                lease: id,
                minute: rc.minute,
                max,
            });
        }
        if rc.minute > l.ledger.acked {
            l.ledger.acked = rc.minute;
            l.ledger.receipted = l.ledger.receipted.max(rc.minute);
            out.push(BuyerAction::Persist { lease: id });
        }
        let acked = l.ledger.acked;
        let seller = t.seller;
        let ack = Ack {
            lease: id,
            minute: acked,
            total: t.total_for(acked),
        };
        out.push(BuyerAction::SendAck {
            seller,
            ack: Signed::sign(&self.sk, ack),
        });
        if let Some(i) = current {
            let slot = &mut self.slots[i];
            slot.last_life_ms = slot.last_life_ms.max(now_ms);
            if matches!(slot.state, SlotState::Starting { .. }) {
                // The Running phase got lost; a receipt says the guest runs.
                slot.state = SlotState::Running {
                    seller,
                    since_ms: now_ms,
                };
            }
        }
        Ok(out)
    }

    /// Any sign of life for a lease (overlay traffic from its guest, any message).
    pub fn on_life(&mut self, lease: &LeaseId, now_ms: u64) {
        if let Some(i) = self.current_slot(lease) {
            if self.leases[lease].lease.is_some() {
                let slot = &mut self.slots[i];
                slot.last_life_ms = slot.last_life_ms.max(now_ms);
            }
        }
    }

    /// Timeouts: an unanswered proposal frees its slot (that seller avoided for it);
    /// a silent guest is revoked, stopped, penalized and replaced at the same
    /// MAC/IP; at the end of the duration everything stops.
    pub fn on_tick(&mut self, now_ms: u64) -> Vec<BuyerAction> {
        if self.duration_end().is_some_and(|e| now_ms >= e) {
            return self.stop(None, now_ms);
        }
        let mut out = Vec::new();
        for i in 0..self.slots.len() {
            match self.slots[i].state.clone() {
                SlotState::Proposed { seller, since_ms } => {
                    if now_ms.saturating_sub(since_ms) > self.cfg.proposal_ms {
                        let slot = &mut self.slots[i];
                        slot.state = SlotState::Choosing;
                        slot.lease = None;
                        self.slot_avoid[i].insert(seller);
                    }
                }
                SlotState::Starting { seller, .. } | SlotState::Running { seller, .. } => {
                    let silent_ms = now_ms.saturating_sub(self.slots[i].last_life_ms);
                    if silent_ms > self.cfg.silence_ms {
                        let id = self.slots[i]
                            .lease
                            .as_ref()
                            .expect("a held slot has a lease")
                            .id;
                        self.end_lease(id, EndReason::BuyerStopped, true, now_ms, &mut out);
                        out.push(BuyerAction::Penalize { seller });
                        out.push(BuyerAction::Lost {
                            slot: i as u32,
                            lease: id,
                            seller,
                            silent_ms,
                        });
                        let slot = &mut self.slots[i];
                        slot.state = SlotState::Choosing;
                        slot.lease = None;
                        slot.replacements += 1;
                        self.slot_avoid[i].insert(seller);
                    }
                }
                SlotState::Choosing | SlotState::Stopped => {}
            }
        }
        self.maybe_done(&mut out);
        out
    }

    /// Stops one lease (its slot is not refilled) or, with None, the whole fleet.
    pub fn stop(&mut self, lease: Option<&LeaseId>, now_ms: u64) -> Vec<BuyerAction> {
        let mut out = Vec::new();
        match lease {
            None => {
                for i in 0..self.slots.len() {
                    self.stop_slot(i, now_ms, &mut out);
                }
            }
            Some(id) => match self.current_slot(id) {
                Some(i) => self.stop_slot(i, now_ms, &mut out),
                None => self.end_lease(*id, EndReason::BuyerStopped, true, now_ms, &mut out),
            },
        }
        self.maybe_done(&mut out);
        out
    }

    fn stop_slot(&mut self, i: usize, now_ms: u64, out: &mut Vec<BuyerAction>) {
        let state = std::mem::replace(&mut self.slots[i].state, SlotState::Stopped);
        match state {
            SlotState::Starting { .. } | SlotState::Running { .. } => {
                let id = self.slots[i]
                    .lease
                    .as_ref()
                    .expect("a held slot has a lease")
                    .id;
                self.end_lease(id, EndReason::BuyerStopped, true, now_ms, out);
            }
            // A late Accept for a stopped proposal is answered with a Stop.
            SlotState::Proposed { .. } | SlotState::Choosing | SlotState::Stopped => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offer::tests::offer;

    const P: u64 = 60_000;
    const T0: u64 = 1_000_000;

    fn order(count: u32) -> Order {
        Order {
            image: [4; 32],
            count,
            vcpus: 2,
            memory_mib: 1024,
            disk_mib: 1024,
            max_price_per_min: None,
            max_latency_ms: None,
            trusted_only: false,
            duration_s: None,
        }
    }

    fn sellers(n: u8) -> Vec<SigningKey> {
        (0..n)
            .map(|i| SigningKey::from_bytes(&[10 + i; 32]))
            .collect()
    }

    fn fleet(count: u32) -> Fleet {
        Fleet::new(
            SigningKey::from_bytes(&[1; 32]),
            order(count),
            FleetConfig::default(),
            [7; 32],
            T0,
        )
    }

    fn offers_of(sks: &[SigningKey]) -> Vec<Offer> {
        sks.iter()
            .enumerate()
            .map(|(i, sk)| {
                let mut o = offer(sk, 1, T0);
                o.price_per_min = 10_000 + i as u64; // deterministic order
                o
            })
            .collect()
    }

    fn fill(f: &mut Fleet, offers: &[Offer], now: u64) -> Vec<BuyerAction> {
        let refs: Vec<&Offer> = offers.iter().collect();
        f.on_offers(
            &refs,
            &BTreeMap::new(),
            &TrustPolicy::default(),
            &BTreeMap::new(),
            now,
        )
    }

    fn proposals(acts: &[BuyerAction]) -> Vec<(PeerKey, Signed<LeaseTerms>)> {
        acts.iter()
            .filter_map(|a| match a {
                BuyerAction::Propose { seller, proposal } => Some((*seller, proposal.clone())),
                _ => None,
            })
            .collect()
    }

    fn sk_of<'a>(sks: &'a [SigningKey], k: &PeerKey) -> &'a SigningKey {
        sks.iter().find(|s| PeerKey::of(s) == *k).unwrap()
    }

    fn receipt(sk: &SigningKey, t: &LeaseTerms, minute: u32) -> Signed<Receipt> {
        Signed::sign(
            sk,
            Receipt {
                lease: t.id,
                minute,
                amount: t.price_per_min,
                total: t.total_for(minute),
                issued_ms: 0,
            },
        )
    }

    fn acked(acts: &[BuyerAction]) -> Option<u32> {
        acts.iter().find_map(|a| match a {
            BuyerAction::SendAck { ack, .. } => Some(ack.body.minute),
            _ => None,
        })
    }

    /// A fleet of one with its lease accepted and running since `T0`.
    fn running() -> (Fleet, Vec<SigningKey>, Lease) {
        let sks = sellers(2);
        let offers = offers_of(&sks);
        let mut f = fleet(1);
        let (seller, p) = proposals(&fill(&mut f, &offers, T0)).remove(0);
        let lease = Lease::countersign(&p, sk_of(&sks, &seller)).unwrap();
        f.on_accepted(lease.clone(), &seller, T0).unwrap();
        f.on_phase(&lease.terms.id, &seller, GuestPhase::Running, T0);
        (f, sks, lease)
    }

    #[test]
    fn slots_have_fixed_distinct_addresses_and_distinct_sellers() {
        let sks = sellers(3);
        let offers = offers_of(&sks);
        let mut f = fleet(3);
        let ips: Vec<_> = f.slots().iter().map(|s| s.ip).collect();
        assert_eq!(
            ips,
            vec![
                Ipv4Addr::new(10, 77, 0, 2),
                Ipv4Addr::new(10, 77, 0, 3),
                Ipv4Addr::new(10, 77, 0, 4)
            ]
        );
        let macs: BTreeSet<_> = f.slots().iter().map(|s| s.mac).collect();
        assert_eq!(macs.len(), 3);
        assert!(f.slots().iter().all(|s| s.mac[0] & 0x03 == 0x02));
        let ps = proposals(&fill(&mut f, &offers, T0));
        let chosen: BTreeSet<_> = ps.iter().map(|p| p.0).collect();
        assert_eq!(chosen.len(), 3);
        for (i, (_, p)) in ps.iter().enumerate() {
            assert_eq!(p.body.guest_ip, f.slots()[i].ip);
            assert_eq!(p.body.guest_mac, f.slots()[i].mac);
            p.verify().unwrap();
        }
        // Nothing more to fill.
        assert!(fill(&mut f, &offers, T0).is_empty());
    }

    #[test]
    fn accept_admits_and_forgeries_are_refused() {
        let sks = sellers(2);
        let offers = offers_of(&sks);
        let mut f = fleet(1);
        let (seller, p) = proposals(&fill(&mut f, &offers, T0)).remove(0);
        let good = Lease::countersign(&p, sk_of(&sks, &seller)).unwrap();
        let other = sks.iter().find(|s| PeerKey::of(s) != seller).unwrap();
        let id = good.terms.id;

        assert!(matches!(
            f.on_accepted(good.clone(), &PeerKey::of(other), T0),
            Err(Error::WrongPeer { .. })
        ));
        let mut forged = good.clone();
        forged.seller_sig.0[0] ^= 1;
        assert_eq!(f.on_accepted(forged, &seller, T0), Err(Error::BadSignature));
        let mut changed = good.clone();
        changed.terms.price_per_min += 1;
        assert!(matches!(
            f.on_accepted(changed, &seller, T0),
            Err(Error::TermsMismatch { .. })
        ));
        let mut unknown = good.clone();
        unknown.terms.id = LeaseId([0xee; 16]);
        assert!(matches!(
            f.on_accepted(unknown, &seller, T0),
            Err(Error::UnknownLease(_))
        ));
        assert_eq!(f.ledger().count(), 0);

        let acts = f.on_accepted(good.clone(), &seller, T0).unwrap();
        assert_eq!(
            acts,
            vec![
                BuyerAction::Persist { lease: id },
                BuyerAction::Admit {
                    lease: good.clone()
                }
            ]
        );
        assert!(f.on_accepted(good, &seller, T0).unwrap().is_empty());
        assert!(matches!(f.slots()[0].state, SlotState::Starting { .. }));
        assert_eq!(f.ledger().count(), 1);
    }

    #[test]
    fn refusal_and_timeout_move_to_the_next_seller() {
        let sks = sellers(3);
        let offers = offers_of(&sks);
        let mut f = fleet(1);
        let (s1, p1) = proposals(&fill(&mut f, &offers, T0)).remove(0);
        let why = Refusal::TooManyGuests { max: 1 };
        // A refusal from someone else is ignored.
        let (s2k, s3k) = (PeerKey::of(&sks[1]), PeerKey::of(&sks[2]));
        assert!(f.on_refused(&p1.body.id, &s2k, &why, T0).is_empty());
        assert!(matches!(f.slots()[0].state, SlotState::Proposed { .. }));
        f.on_refused(&p1.body.id, &s1, &why, T0);
        assert_eq!(f.slots()[0].state, SlotState::Choosing);
        let (s2, p2) = proposals(&fill(&mut f, &offers, T0 + 1)).remove(0);
        assert_ne!(s2, s1);
        // No answer within proposal_ms: the next one.
        assert!(f.on_tick(T0 + 1 + 15_000).is_empty());
        f.on_tick(T0 + 2 + 15_000);
        assert_eq!(f.slots()[0].state, SlotState::Choosing);
        let (s3, _) = proposals(&fill(&mut f, &offers, T0 + 20_000)).remove(0);
        assert!(s3 != s1 && s3 != s2 && (s3 == s2k || s3 == s3k));
        // The late Accept of the abandoned proposal gets a Stop.
        let late = Lease::countersign(&p2, sk_of(&sks, &s2)).unwrap();
        let acts = f.on_accepted(late, &s2, T0 + 21_000).unwrap();
        assert!(matches!(acts.last(), Some(BuyerAction::SendStop { seller, .. }) if *seller == s2));
        assert!(!acts.iter().any(|a| matches!(a, BuyerAction::Admit { .. })));
        // Everyone avoided: NoMatch once, then the avoid list is forgotten.
        f.on_tick(T0 + 40_000);
        let acts = fill(&mut f, &offers, T0 + 40_000);
        assert!(
            matches!(&acts[..], [BuyerAction::NoMatch { slot: 0, why }] if why.contains("3 already used")),
            "{acts:?}"
        );
        assert_eq!(proposals(&fill(&mut f, &offers, T0 + 40_001)).len(), 1);
    }

    #[test]
    fn receipts_are_bounded_checked_and_acked_cumulatively() {
        let (mut f, sks, lease) = running();
        let t = &lease.terms;
        let s = sk_of(&sks, &t.seller);
        let price = t.price_per_min;
        // Minute 1 may arrive a little early (one period of slack), minute 2 not.
        assert_eq!(
            acked(&f.on_receipt(&receipt(s, t, 1), &t.seller, T0 + 10).unwrap()),
            Some(1)
        );
        assert!(matches!(
            f.on_receipt(&receipt(s, t, 2), &t.seller, T0 + 10),
            Err(Error::ReceiptTooEarly {
                minute: 2,
                max: 1,
                ..
            })
        ));
        // Minute 3 skipping 2 is fine once enough time passed; acks cover 1..=3.
        let acts = f
            .on_receipt(&receipt(s, t, 3), &t.seller, T0 + 2 * P)
            .unwrap();
        assert_eq!(acts[0], BuyerAction::Persist { lease: t.id });
        assert_eq!(acked(&acts), Some(3));
        // A duplicate re-acks the cumulative minute without counting again.
        let acts = f
            .on_receipt(&receipt(s, t, 2), &t.seller, T0 + 2 * P)
            .unwrap();
        assert_eq!(acts.len(), 1);
        assert_eq!(acked(&acts), Some(3));
        assert_eq!(f.cost_so_far(), 3 * price);

        // Forged, wrong seller, wrong amounts, unknown lease.
        let mut forged = receipt(s, t, 4);
        forged.body.minute = 5;
        assert_eq!(
            f.on_receipt(&forged, &t.seller, T0 + 10 * P),
            Err(Error::BadSignature)
        );
        let other = sks.iter().find(|k| PeerKey::of(k) != t.seller).unwrap();
        let wrong = receipt(other, t, 4);
        assert!(matches!(
            f.on_receipt(&wrong, &PeerKey::of(other), T0 + 10 * P),
            Err(Error::WrongPeer { .. })
        ));
        assert!(matches!(
            f.on_receipt(&receipt(s, t, 4), &PeerKey::of(other), T0 + 10 * P),
            Err(Error::WrongPeer { .. })
        ));
        let mut r = receipt(s, t, 4).body;
        r.total += 1;
        assert!(matches!(
            f.on_receipt(&Signed::sign(s, r), &t.seller, T0 + 10 * P),
            Err(Error::BadReceipt { .. })
        ));
        let mut r = receipt(s, t, 4).body;
        r.amount = 0;
        r.total = 0;
        assert!(matches!(
            f.on_receipt(&Signed::sign(s, r), &t.seller, T0 + 10 * P),
            Err(Error::BadReceipt { .. })
        ));
        assert!(matches!(
            f.on_receipt(&receipt(s, t, 0), &t.seller, T0 + 10 * P),
            Err(Error::BadReceipt { .. })
        ));
        let mut r = receipt(s, t, 4).body;
        r.lease = LeaseId([0xee; 16]);
        assert!(matches!(
            f.on_receipt(&Signed::sign(s, r), &t.seller, T0 + 10 * P),
            Err(Error::UnknownLease(_))
        ));
        assert_eq!(f.cost_so_far(), 3 * price);
    }

    #[test]
    fn silent_seller_is_replaced_at_the_same_address() {
        let (mut f, sks, lease) = running();
        let t = lease.terms.clone();
        let (mac, ip) = (f.slots()[0].mac, f.slots()[0].ip);
        f.on_life(&t.id, T0 + 20_000);
        assert!(f.on_tick(T0 + 50_000).is_empty());
        let acts = f.on_tick(T0 + 50_001);
        assert!(acts.contains(&BuyerAction::Revoke { lease: t.id, mac }));
        assert!(acts.contains(&BuyerAction::Penalize { seller: t.seller }));
        assert!(acts.contains(&BuyerAction::Lost {
            slot: 0,
            lease: t.id,
            seller: t.seller,
            silent_ms: 30_001
        }));
        assert!(acts
            .iter()
            .any(|a| matches!(a, BuyerAction::SendStop { seller, .. } if *seller == t.seller)));
        assert_eq!(f.slots()[0].state, SlotState::Choosing);
        assert_eq!(f.slots()[0].replacements, 1);
        let offers = offers_of(&sks);
        let (s2, p) = proposals(&fill(&mut f, &offers, T0 + 50_002)).remove(0);
        assert_ne!(s2, t.seller);
        assert_eq!((p.body.guest_mac, p.body.guest_ip), (mac, ip));
        assert_ne!(p.body.id, t.id);
        // The lost seller's receipts for time before the loss still get acked; not after.
        let s = sk_of(&sks, &t.seller);
        assert_eq!(
            acked(
                &f.on_receipt(&receipt(s, &t, 1), &t.seller, T0 + 60_000)
                    .unwrap()
            ),
            Some(1)
        );
        let acts = f
            .on_receipt(&receipt(s, &t, 5), &t.seller, T0 + 5 * P)
            .unwrap();
        assert!(matches!(
            &acts[..],
            [BuyerAction::SendAck { .. }, BuyerAction::SendStop { .. }]
        ));
        assert_eq!(f.ledger().count(), 1);
        assert!(f.ledger().next().unwrap().ended);
    }

    #[test]
    fn phases_and_seller_side_endings() {
        let (mut f, sks, lease) = running();
        let t = lease.terms.clone();
        assert!(matches!(f.slots()[0].state, SlotState::Running { .. }));
        // The seller restarted: replace.
        let acts = f.on_phase(
            &t.id,
            &t.seller,
            GuestPhase::Ended(EndReason::SellerRestarted),
            T0 + 1,
        );
        assert!(acts.iter().any(|a| matches!(a, BuyerAction::Revoke { .. })));
        assert_eq!(f.slots()[0].state, SlotState::Choosing);
        let offers = offers_of(&sks);
        let (s2, p) = proposals(&fill(&mut f, &offers, T0 + 2)).remove(0);
        assert_ne!(s2, t.seller);
        let l2 = Lease::countersign(&p, sk_of(&sks, &s2)).unwrap();
        f.on_accepted(l2.clone(), &s2, T0 + 3).unwrap();
        f.on_phase(
            &l2.terms.id,
            &s2,
            GuestPhase::Fetching { done: 1, total: 2 },
            T0 + 4,
        );
        assert_eq!(
            f.slots()[0].state,
            SlotState::Starting {
                seller: s2,
                phase: Some(GuestPhase::Fetching { done: 1, total: 2 })
            }
        );
        // Phases from the wrong peer are ignored.
        f.on_phase(&l2.terms.id, &t.seller, GuestPhase::Running, T0 + 5);
        assert!(matches!(f.slots()[0].state, SlotState::Starting { .. }));
        // The guest finished: slot done, fleet done.
        let acts = f.on_phase(
            &l2.terms.id,
            &s2,
            GuestPhase::Ended(EndReason::GuestExited),
            T0 + 6,
        );
        assert_eq!(acts.last(), Some(&BuyerAction::Done));
        assert_eq!(f.slots()[0].state, SlotState::Stopped);
        assert_eq!(f.ledger().filter(|e| e.ended).count(), 2);
    }

    #[test]
    fn stop_all_and_duration() {
        let sks = sellers(3);
        let offers = offers_of(&sks);
        let mut o = order(2);
        o.duration_s = Some(300);
        let mut f = Fleet::new(
            SigningKey::from_bytes(&[1; 32]),
            o,
            FleetConfig::default(),
            [7; 32],
            T0,
        );
        let ps = proposals(&fill(&mut f, &offers, T0 + 1000));
        assert_eq!(ps[0].1.body.duration_s, Some(299));
        let l = Lease::countersign(&ps[0].1, sk_of(&sks, &ps[0].0)).unwrap();
        f.on_accepted(l.clone(), &ps[0].0, T0 + 2000).unwrap();
        f.on_life(&l.terms.id, T0 + 299_000);
        // Receipts beyond the duration are refused.
        let s = sk_of(&sks, &ps[0].0);
        f.on_phase(&l.terms.id, &ps[0].0, GuestPhase::Running, T0 + 2000);
        assert!(matches!(
            f.on_receipt(&receipt(s, &l.terms, 6), &ps[0].0, T0 + 10 * P),
            Err(Error::ReceiptTooEarly { max: 5, .. })
        ));
        let acts = f.on_tick(T0 + 300_000);
        assert!(acts
            .iter()
            .any(|a| matches!(a, BuyerAction::SendStop { seller, .. } if *seller == ps[0].0)));
        assert!(acts.contains(&BuyerAction::Revoke {
            lease: l.terms.id,
            mac: l.terms.guest_mac
        }));
        assert_eq!(acts.last(), Some(&BuyerAction::Done));
        assert!(f.slots().iter().all(|s| s.state == SlotState::Stopped));
        // After the end: no new proposals, Done only once.
        assert!(fill(&mut f, &offers, T0 + 300_001).is_empty());
        assert!(f.on_tick(T0 + 300_002).is_empty());
        // The second slot's proposal is accepted late: stopped at once.
        let late = Lease::countersign(&ps[1].1, sk_of(&sks, &ps[1].0)).unwrap();
        let acts = f.on_accepted(late, &ps[1].0, T0 + 300_003).unwrap();
        assert!(matches!(acts.last(), Some(BuyerAction::SendStop { .. })));
    }

    #[test]
    fn abandoned_proposals_are_stopped_when_the_seller_shows_up() {
        let sks = sellers(2);
        let offers = offers_of(&sks);
        let mut f = fleet(1);
        let (s1, p1) = proposals(&fill(&mut f, &offers, T0)).remove(0);
        // No Accept arrives (lost); the proposal times out.
        f.on_tick(T0 + 15_001);
        assert_eq!(f.slots()[0].state, SlotState::Choosing);
        let id = p1.body.id;
        // The seller did accept and now reports phases and bills: told to stop.
        let acts = f.on_phase(&id, &s1, GuestPhase::Running, T0 + 20_000);
        assert!(matches!(&acts[..], [BuyerAction::SendStop { seller, .. }] if *seller == s1));
        let r = receipt(sk_of(&sks, &s1), &p1.body, 1);
        let acts = f.on_receipt(&r, &s1, T0 + 80_000).unwrap();
        assert!(matches!(&acts[..], [BuyerAction::SendStop { .. }]));
        // Nothing was billed and no ledger entry exists for it.
        assert_eq!(f.ledger().count(), 0);
        assert_eq!(f.cost_so_far(), 0);
        // Life signs for it do not touch the slot.
        let before = f.slots()[0].clone();
        f.on_life(&id, T0 + 90_000);
        assert_eq!(f.slots()[0], before);
    }

    #[test]
    fn no_match_is_reported_once_per_reason() {
        let sks = sellers(1);
        let mut offers = offers_of(&sks);
        offers[0].free_guests = 0;
        let mut f = fleet(1);
        let acts = fill(&mut f, &offers, T0);
        assert_eq!(
            acts,
            vec![BuyerAction::NoMatch {
                slot: 0,
                why: "1 offer seen: 1 full".into()
            }]
        );
        assert!(fill(&mut f, &offers, T0 + 1).is_empty());
        assert_eq!(fill(&mut f, &[], T0 + 2).len(), 1);
        offers[0].free_guests = 1;
        assert_eq!(proposals(&fill(&mut f, &offers, T0 + 3)).len(), 1);
    }

    #[test]
    fn late_running_phase_does_not_tighten_the_bound() {
        let sks = sellers(1);
        let offers = offers_of(&sks);
        let mut f = fleet(1);
        let (s, p) = proposals(&fill(&mut f, &offers, T0)).remove(0);
        let sk = sk_of(&sks, &s);
        let lease = Lease::countersign(&p, sk).unwrap();
        f.on_accepted(lease, &s, T0).unwrap();
        // The Running phase is lost; receipts arrive and make the slot Running.
        f.on_receipt(&receipt(sk, &p.body, 1), &s, T0 + P).unwrap();
        assert!(matches!(f.slots()[0].state, SlotState::Running { .. }));
        // A very late (duplicated) Running must not make minute 2 look early, nor
        // would a Running heard late because our own loop stalled.
        f.on_phase(&p.body.id, &s, GuestPhase::Running, T0 + P + 50_000);
        let acts = f
            .on_receipt(&receipt(sk, &p.body, 2), &s, T0 + 2 * P)
            .unwrap();
        assert_eq!(acked(&acts), Some(2));
    }

    #[test]
    fn a_stalled_buyer_still_accepts_honest_receipts() {
        let sks = sellers(1);
        let offers = offers_of(&sks);
        let mut f = fleet(1);
        let (s, p) = proposals(&fill(&mut f, &offers, T0)).remove(0);
        let sk = sk_of(&sks, &s);
        f.on_accepted(Lease::countersign(&p, sk).unwrap(), &s, T0 + 100)
            .unwrap();
        // The seller started at T0 + 1 s; our loop stalled and hears Running, then
        // the seller's newest receipt, only 2.5 periods later.
        f.on_phase(&p.body.id, &s, GuestPhase::Running, T0 + 2 * P + P / 2);
        let acts = f
            .on_receipt(&receipt(sk, &p.body, 2), &s, T0 + 2 * P + P / 2)
            .unwrap();
        assert_eq!(acked(&acts), Some(2));
        let acts = f
            .on_receipt(&receipt(sk, &p.body, 3), &s, T0 + 3 * P + 1_000)
            .unwrap();
        assert_eq!(acked(&acts), Some(3));
    }

    #[test]
    fn stop_one_lease() {
        let (mut f, sks, lease) = running();
        let t = &lease.terms;
        let acts = f.stop(Some(&t.id), T0 + 2 * P);
        assert!(acts
            .iter()
            .any(|a| matches!(a, BuyerAction::SendStop { .. })));
        assert_eq!(acts.last(), Some(&BuyerAction::Done));
        assert!(f.stop(Some(&t.id), T0 + 2 * P).is_empty());
        // Receipts up to the stop still count (one period of slack), later ones re-send Stop.
        let s = sk_of(&sks, &t.seller);
        assert_eq!(
            acked(
                &f.on_receipt(&receipt(s, t, 3), &t.seller, T0 + 3 * P)
                    .unwrap()
            ),
            Some(3)
        );
        let acts = f
            .on_receipt(&receipt(s, t, 4), &t.seller, T0 + 4 * P)
            .unwrap();
        assert!(
            matches!(&acts[..], [BuyerAction::SendAck { ack, .. }, BuyerAction::SendStop { .. }] if ack.body.minute == 3)
        );
        assert_eq!(f.cost_so_far(), 3 * t.price_per_min);
    }
}
