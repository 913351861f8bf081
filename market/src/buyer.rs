//! The buyer's fleet for one `run`: a slot per wanted guest, each with a fixed MAC and
//! IP, filled by proposing leases to selected sellers, billed by acking receipts, and
//! refilled with a replacement when its seller goes silent.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

use crate::billing::{Ack, LedgerEntry, Receipt, Stop};
use crate::error::Error;
use crate::keys::{LeaseId, PeerKey};
use crate::lease::{Lease, LeaseTerms, Refusal};
use crate::offer::Offer;
use crate::order::{select, Order, TrustPolicy};
use crate::seller::EndReason;
use crate::signed::Signed;

/// Timeouts and addressing for a fleet.
#[derive(Clone, Debug, PartialEq, Eq)]
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

#[derive(Clone, Debug, PartialEq, Eq)]
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
#[derive(Clone, Debug, PartialEq, Eq)]
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
#[derive(Clone, Debug)]
struct BuyerLease {
    terms: LeaseTerms,
    slot: u32,
    /// Set once the seller countersigned.
    lease: Option<Lease>,
    ledger: LedgerEntry,
    /// When the buyer learnt the guest runs; receipts are bounded by it.
    running_since: Option<u64>,
    /// When the buyer stopped, lost or saw the end of the lease.
    stopped_ms: Option<u64>,
    /// Admitted on the overlay (so it needs a Revoke).
    admitted: bool,
}

/// The buyer's fleet state machine.
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

    fn stop_msg(&self, id: LeaseId, now_ms: u64) -> Signed<Stop> {
        Signed::sign(
            &self.sk,
            Stop {
                lease: id,
                issued_ms: now_ms,
            },
        )
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
        let stop = self.stop_msg(id, now_ms);
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
                stop,
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
                running_since: None,
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
        self.leases.remove(lease);
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
                    stop: self.stop_msg(*lease, now_ms),
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
                let l = self.leases.get_mut(lease).expect("looked up above");
                l.running_since.get_or_insert(now_ms);
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
    /// most the periods elapsed since the guest ran (or, not known yet, since the
    /// proposal) up to now or our stop, plus one for delays, and within the
    /// duration; amount and total must match the price. Never counts a minute twice.
    pub fn on_receipt(
        &mut self,
        r: &Signed<Receipt>,
        from: &PeerKey,
        now_ms: u64,
    ) -> Result<Vec<BuyerAction>, Error> {
        let id = r.body.lease;
        let current = self.current_slot(&id);
        let stop = self.stop_msg(id, now_ms);
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
                    stop,
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
        let since = l.running_since.unwrap_or(t.issued_ms);
        let until = l.stopped_ms.map_or(now_ms, |s| s.min(now_ms));
        let elapsed = until.saturating_sub(since) / t.period_ms();
        let mut max = u32::try_from(elapsed).unwrap_or(u32::MAX).saturating_add(1);
        if let Some(d) = t.duration_periods() {
            max = max.min(d);
        }
        let mut out = Vec::new();
        if rc.minute > max {
            if l.stopped_ms.is_some() {
                // Still billing after we ended it: our Stop was lost.
                out.push(BuyerAction::SendStop {
                    seller: t.seller,
                    stop,
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
