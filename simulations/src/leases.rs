//! Lease scenario: one buyer keeps K guests running on a population of sellers
//! that come and go. The buyer runs the node's own `market::Fleet`, every seller
//! the node's own `market::SellerLease` (and `SellerPolicy::check` and
//! `Lease::countersign` on proposals); the simulator carries their messages
//! (signed, as on the wire) with latency and loss, ticks their timers, and
//! supplies the world: sellers leaving silently (kill -9) or cleanly, coming back
//! (their lease restored from its record, as after a restart), guests booting and
//! showing life on the overlay.
//!
//! Measured: time from a guest's death to its replacement running, guest-minutes
//! lost, and billing consistency (both ledgers of every lease agree and nobody is
//! billed for a minute its guest did not run).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use indicatif::ProgressBar;
use market::{
    Accel, BackendKind, BuyerAction, Fleet, FleetConfig, GuestPhase, Lease, LeaseId, LeaseTerms,
    Offer, Order, PeerKey, Receipt, SellerAction, SellerLease, SellerLeaseRecord, SellerPhase,
    SellerPolicy, Signed, SlotState, TrustPolicy,
};

use crate::error::Result;
use crate::plot::{self, Series};
use crate::queue::EventQueue;
use crate::report;
use crate::rng::{exponential, unit, SplitMix64};
use crate::scenario::{LeaseSpec, Scenario};
use crate::stats::percentile;

/// The buyer refreshes offers and runs its fleet's timers this often.
const BUYER_TICK_MS: u64 = 1_000;
/// A running guest sends overlay traffic (a sign of life) this often.
const LIFE_EVERY_MS: u64 = 5_000;
/// While the image comes in, the seller reports fetch progress this often (the
/// node: at most every 500 ms while chunks arrive; a coarser beat is enough
/// against the buyer's 30 s silence limit and keeps the event count down).
const PROGRESS_EVERY_MS: u64 = 5_000;
/// Of the boot time, this much is the VM booting; the rest is the fetch.
const VM_BOOT_MS: u64 = 10_000;
/// One-way message latency between the buyer and a seller.
const LATENCY_MS: u64 = 40;
const PRICE: u64 = 1_000;

#[derive(Clone, Debug)]
enum Ev {
    BuyerTick,
    /// A seller goes away (silently or cleanly) or comes back.
    Leave {
        seller: u32,
        clean: bool,
    },
    Return {
        seller: u32,
    },
    /// Messages to a seller.
    Propose {
        seller: u32,
        proposal: Signed<LeaseTerms>,
    },
    Ack {
        seller: u32,
        ack: Signed<market::Ack>,
    },
    Stop {
        seller: u32,
        stop: Signed<market::Stop>,
    },
    /// Messages to the buyer.
    Accepted {
        from: u32,
        lease: Lease,
    },
    Refused {
        from: u32,
        id: LeaseId,
        why: market::Refusal,
    },
    Phase {
        from: u32,
        id: LeaseId,
        phase: GuestPhase,
    },
    Receipt {
        from: u32,
        receipt: Signed<Receipt>,
    },
    /// Seller-side timers and the guest.
    SellerTick {
        seller: u32,
        epoch: u32,
    },
    /// Fetch progress while the image comes in; at `fetched_at` the fetch ends
    /// and the VM boots.
    Progress {
        seller: u32,
        id: LeaseId,
        epoch: u32,
        fetched_at: u64,
    },
    Booted {
        seller: u32,
        id: LeaseId,
        epoch: u32,
    },
    Life {
        seller: u32,
        id: LeaseId,
        epoch: u32,
    },
}

struct SellerNode {
    sk: SigningKey,
    key: PeerKey,
    online: bool,
    /// Bumped at every departure: timers of an earlier life are void.
    epoch: u32,
    /// Leases this seller holds (live or ended with receipts to settle).
    leases: BTreeMap<LeaseId, SellerLease>,
    /// Saved records (what survives a kill -9).
    records: BTreeMap<LeaseId, SellerLeaseRecord>,
    /// When each lease's guest started running (ground truth), and stopped.
    ran: BTreeMap<LeaseId, (u64, Option<u64>)>,
    tick_at: u64,
}

/// What the lease run measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LeaseResult {
    pub guests: usize,
    pub sellers: usize,
    pub duration_min: f64,
    pub departures: usize,
    /// Seconds from a running guest's death to its slot running again.
    pub replacement_s: Vec<f64>,
    pub guest_minutes_wanted: f64,
    pub guest_minutes_run: f64,
    /// Wanted minus run, after the first time all guests ran.
    pub guest_minutes_lost_after_start: f64,
    pub leases: usize,
    /// Leases whose ledgers disagree at the end (seller acked > buyer acked, or
    /// buyer acked > seller receipted).
    pub ledger_mismatches: usize,
    /// Leases billed for more periods than their guest ran (rounded up, plus the
    /// one period of slack the protocol allows for delays).
    pub overbilled: usize,
    pub buyer_billed: u64,
    pub seller_billed: u64,
    pub lost_messages: u64,
    pub messages: u64,
}

struct World {
    spec: LeaseSpec,
    q: EventQueue<Ev>,
    rng: SplitMix64,
    now: u64,
    fleet: Fleet,
    buyer: PeerKey,
    sellers: Vec<SellerNode>,
    index: BTreeMap<PeerKey, u32>,
    penalties: BTreeMap<PeerKey, u32>,
    rtt: BTreeMap<PeerKey, u32>,
    /// Per slot: when its running guest died (ground truth) and on which
    /// seller, while no replacement runs.
    down_since: Vec<Option<(u64, PeerKey)>>,
    running_since: Vec<Option<u64>>,
    all_running_at: Option<u64>,
    res: LeaseResult,
}

fn key_from(seed: u64, i: u64) -> SigningKey {
    let mut b = [0u8; 32];
    let mut r = SplitMix64::new(seed ^ i.wrapping_mul(0x2545_f491_4f6c_dd1d));
    for c in b.chunks_mut(8) {
        c.copy_from_slice(&r.next().to_le_bytes());
    }
    SigningKey::from_bytes(&b)
}

/// Runs the lease scenario of `sc` once and measures it.
pub fn simulate(sc: &Scenario, ls: &LeaseSpec, bar: Option<&ProgressBar>) -> LeaseResult {
    let mut rng = SplitMix64::new(sc.seed ^ 0x1ea5e);
    let buyer_sk = key_from(sc.seed, u64::MAX);
    let end_ms = (ls.duration_min * 60_000.0) as u64;
    let order = Order {
        image: [7; 32],
        count: ls.guests as u32,
        vcpus: 1,
        memory_mib: 512,
        disk_mib: 1024,
        max_price_per_min: None,
        max_latency_ms: None,
        trusted_only: false,
        duration_s: Some(end_ms / 1000),
    };
    let mut seed32 = [0u8; 32];
    seed32[..8].copy_from_slice(&sc.seed.to_le_bytes());
    let fleet = Fleet::new(buyer_sk.clone(), order, FleetConfig::default(), seed32, 0);
    let mut w = World {
        spec: ls.clone(),
        q: EventQueue::default(),
        rng: SplitMix64::new(sc.seed ^ 0x1055),
        now: 0,
        fleet,
        buyer: PeerKey::of(&buyer_sk),
        sellers: Vec::new(),
        index: BTreeMap::new(),
        penalties: BTreeMap::new(),
        rtt: BTreeMap::new(),
        down_since: vec![None; ls.guests],
        running_since: vec![None; ls.guests],
        all_running_at: None,
        res: LeaseResult {
            guests: ls.guests,
            sellers: sc.sellers,
            duration_min: ls.duration_min,
            guest_minutes_wanted: ls.guests as f64 * ls.duration_min,
            ..Default::default()
        },
    };
    let p_on = ls.mean_session_min / (ls.mean_session_min + ls.mean_away_min);
    for i in 0..sc.sellers as u32 {
        let sk = key_from(sc.seed, i as u64);
        let key = PeerKey::of(&sk);
        w.index.insert(key, i);
        w.rtt.insert(key, 2 * LATENCY_MS as u32);
        let online = unit(&mut rng) < p_on;
        w.sellers.push(SellerNode {
            sk,
            key,
            online,
            epoch: 0,
            leases: BTreeMap::new(),
            records: BTreeMap::new(),
            ran: BTreeMap::new(),
            tick_at: u64::MAX,
        });
        // memoryless: the time to the next change is exponential either way
        if online {
            w.schedule_leave(i);
        } else {
            let t = exponential(&mut w.rng, ls.mean_away_min * 60_000.0) as u64;
            w.q.push(t, Ev::Return { seller: i });
        }
    }
    w.q.push(0, Ev::BuyerTick);
    while let Some((t, ev)) = w.q.pop() {
        if t > end_ms + 3_600_000 {
            break;
        }
        w.now = t;
        w.handle(ev, end_ms);
        if let Some(b) = bar {
            b.set_position((t.min(end_ms) / 1000).min(end_ms / 1000));
        }
    }
    w.finish(end_ms);
    w.res
}

impl World {
    fn schedule_leave(&mut self, i: u32) {
        let t = self.now + exponential(&mut self.rng, self.spec.mean_session_min * 60_000.0) as u64;
        let clean = unit(&mut self.rng) < self.spec.clean_fraction;
        self.q.push(t, Ev::Leave { seller: i, clean });
    }

    /// Sends a message after the one-way latency, or loses it.
    fn deliver(&mut self, ev: Ev, lossy: bool) {
        self.res.messages += 1;
        if lossy && unit(&mut self.rng) < self.spec.loss {
            self.res.lost_messages += 1;
            return;
        }
        self.q.push(self.now + LATENCY_MS, ev);
    }

    fn handle(&mut self, ev: Ev, end_ms: u64) {
        match ev {
            Ev::BuyerTick => {
                if self.now <= end_ms + 600_000 {
                    self.q.push(self.now + BUYER_TICK_MS, Ev::BuyerTick);
                }
                let offers: Vec<Offer> = self
                    .sellers
                    .iter()
                    .filter(|s| {
                        s.online && !s.leases.values().any(|l| l.phase() != SellerPhase::Ended)
                    })
                    .map(|s| offer_of(s.key, self.now))
                    .collect();
                let refs: Vec<&Offer> = offers.iter().collect();
                let acts = self.fleet.on_offers(
                    &refs,
                    &self.rtt,
                    &TrustPolicy::default(),
                    &self.penalties,
                    self.now,
                );
                self.buyer_actions(acts);
                let acts = self.fleet.on_tick(self.now);
                self.buyer_actions(acts);
            }
            Ev::Leave { seller, clean } => self.on_leave(seller, clean),
            Ev::Return { seller } => self.on_return(seller),
            Ev::Propose { seller, proposal } => {
                let s = &mut self.sellers[seller as usize];
                if !s.online {
                    return;
                }
                let policy = SellerPolicy {
                    max_guests: 1,
                    vcpus_total: 4,
                    memory_mib_total: 4096,
                    disk_cap_mib: 8192,
                    min_price_per_min: 0,
                    allowed_buyers: None,
                    denied_buyers: Default::default(),
                    hours: None,
                };
                let active: Vec<&LeaseTerms> = s
                    .leases
                    .values()
                    .filter(|l| l.phase() != SellerPhase::Ended)
                    .map(|l| &l.lease().terms)
                    .collect();
                let id = proposal.body.id;
                let verdict = policy
                    .check(&s.key, &proposal, &self.buyer, &active, self.now, 0)
                    .and_then(|()| {
                        Lease::countersign(&proposal, &s.sk)
                            .map_err(|e| market::Refusal::BadTerms { why: e.to_string() })
                    });
                match verdict {
                    Ok(lease) => {
                        let sl = SellerLease::new(lease.clone(), self.now);
                        s.records.insert(id, sl.record());
                        s.leases.insert(id, sl);
                        let epoch = s.epoch;
                        let boot = (self.spec.boot_s * 1000.0) as u64;
                        let fetched_at = self.now + boot.saturating_sub(VM_BOOT_MS);
                        self.q.push(
                            (self.now + PROGRESS_EVERY_MS).min(fetched_at),
                            Ev::Progress {
                                seller,
                                id,
                                epoch,
                                fetched_at,
                            },
                        );
                        self.q
                            .push(self.now + boot, Ev::Booted { seller, id, epoch });
                        self.seller_timer(seller);
                        self.deliver(
                            Ev::Accepted {
                                from: seller,
                                lease,
                            },
                            false,
                        );
                    }
                    Err(why) => self.deliver(
                        Ev::Refused {
                            from: seller,
                            id,
                            why,
                        },
                        false,
                    ),
                }
            }
            Ev::Ack { seller, ack } => {
                let now = self.now;
                let s = &mut self.sellers[seller as usize];
                if !s.online {
                    return;
                }
                if let Some(l) = s.leases.get_mut(&ack.body.lease) {
                    if let Ok(acts) = l.on_ack(&ack, now) {
                        let id = ack.body.lease;
                        self.seller_actions(seller, id, acts);
                    }
                }
            }
            Ev::Stop { seller, stop } => {
                let now = self.now;
                let s = &mut self.sellers[seller as usize];
                if !s.online {
                    return;
                }
                let id = stop.body.lease;
                if let Some(l) = s.leases.get_mut(&id) {
                    if let Ok(acts) = l.on_stop(&stop, now) {
                        self.seller_actions(seller, id, acts);
                    }
                }
            }
            Ev::Accepted { from, lease } => {
                let key = self.sellers[from as usize].key;
                if let Ok(acts) = self.fleet.on_accepted(lease, &key, self.now) {
                    self.buyer_actions(acts);
                }
            }
            Ev::Refused { from, id, why } => {
                let key = self.sellers[from as usize].key;
                let acts = self.fleet.on_refused(&id, &key, &why, self.now);
                self.buyer_actions(acts);
            }
            Ev::Phase { from, id, phase } => {
                let key = self.sellers[from as usize].key;
                let acts = self.fleet.on_phase(&id, &key, phase, self.now);
                self.buyer_actions(acts);
            }
            Ev::Receipt { from, receipt } => {
                let key = self.sellers[from as usize].key;
                if let Ok(acts) = self.fleet.on_receipt(&receipt, &key, self.now) {
                    self.buyer_actions(acts);
                }
            }
            Ev::SellerTick { seller, epoch } => {
                let now = self.now;
                let s = &mut self.sellers[seller as usize];
                if !s.online || s.epoch != epoch || s.tick_at > now {
                    return;
                }
                s.tick_at = u64::MAX;
                let ids: Vec<LeaseId> = s.leases.keys().copied().collect();
                for id in ids {
                    let s = &mut self.sellers[seller as usize];
                    let sk = s.sk.clone();
                    let l = s.leases.get_mut(&id).expect("listed");
                    let acts = l.on_tick(now, &sk);
                    self.seller_actions(seller, id, acts);
                }
                self.seller_timer(seller);
            }
            Ev::Progress {
                seller,
                id,
                epoch,
                fetched_at,
            } => {
                let now = self.now;
                let s = &mut self.sellers[seller as usize];
                if !s.online || s.epoch != epoch {
                    return;
                }
                let Some(l) = s.leases.get_mut(&id) else {
                    return;
                };
                if l.phase() != SellerPhase::Preparing {
                    return;
                }
                // chunks of the buyer's image flowing count as the buyer's life
                l.on_buyer_life(now);
                let phase = if now >= fetched_at {
                    GuestPhase::Booting
                } else {
                    let boot = (self.spec.boot_s * 1000.0) as u64;
                    let fetch = boot.saturating_sub(VM_BOOT_MS).max(1);
                    let begun = fetched_at.saturating_sub(fetch);
                    GuestPhase::Fetching {
                        done: now.saturating_sub(begun).min(fetch),
                        total: fetch,
                    }
                };
                let again = phase != GuestPhase::Booting;
                self.deliver(
                    Ev::Phase {
                        from: seller,
                        id,
                        phase,
                    },
                    false,
                );
                if again {
                    let next = (now + PROGRESS_EVERY_MS).min(fetched_at);
                    self.q.push(
                        next,
                        Ev::Progress {
                            seller,
                            id,
                            epoch,
                            fetched_at,
                        },
                    );
                }
                self.seller_timer(seller);
            }
            Ev::Booted { seller, id, epoch } => {
                let now = self.now;
                let s = &mut self.sellers[seller as usize];
                if !s.online || s.epoch != epoch {
                    return;
                }
                let Some(l) = s.leases.get_mut(&id) else {
                    return;
                };
                let acts = l.on_guest_started(now);
                if l.phase() == SellerPhase::Running {
                    s.ran.insert(id, (now, None));
                    self.deliver(
                        Ev::Phase {
                            from: seller,
                            id,
                            phase: GuestPhase::Running,
                        },
                        false,
                    );
                    self.q
                        .push(now + LIFE_EVERY_MS, Ev::Life { seller, id, epoch });
                }
                self.seller_actions(seller, id, acts);
                self.seller_timer(seller);
            }
            Ev::Life { seller, id, epoch } => {
                let s = &self.sellers[seller as usize];
                if !s.online || s.epoch != epoch {
                    return;
                }
                if s.leases
                    .get(&id)
                    .is_some_and(|l| l.phase() == SellerPhase::Running)
                {
                    // overlay traffic from the guest reaches the buyer
                    self.fleet.on_life(&id, self.now + LATENCY_MS);
                    self.q
                        .push(self.now + LIFE_EVERY_MS, Ev::Life { seller, id, epoch });
                }
            }
        }
        self.observe_slots();
    }

    fn seller_timer(&mut self, seller: u32) {
        let s = &mut self.sellers[seller as usize];
        let next = s.leases.values().filter_map(|l| l.next_deadline()).min();
        if let Some(t) = next {
            let t = t.max(self.now + 1);
            if t < s.tick_at || s.tick_at <= self.now {
                s.tick_at = t;
                let epoch = s.epoch;
                self.q.push(t, Ev::SellerTick { seller, epoch });
            }
        }
    }

    fn seller_actions(&mut self, seller: u32, id: LeaseId, acts: Vec<SellerAction>) {
        let now = self.now;
        for a in acts {
            match a {
                SellerAction::SendReceipt(r) => self.deliver(
                    Ev::Receipt {
                        from: seller,
                        receipt: r,
                    },
                    true,
                ),
                SellerAction::StopGuest(_) => {
                    if let Some(r) = self.sellers[seller as usize].ran.get_mut(&id) {
                        r.1.get_or_insert(now);
                    }
                }
                SellerAction::Persist => {
                    let s = &mut self.sellers[seller as usize];
                    if let Some(l) = s.leases.get(&id) {
                        s.records.insert(id, l.record());
                    }
                }
                SellerAction::Ended(reason) => {
                    if let Some(r) = self.sellers[seller as usize].ran.get_mut(&id) {
                        r.1.get_or_insert(now);
                    }
                    self.deliver(
                        Ev::Phase {
                            from: seller,
                            id,
                            phase: GuestPhase::Ended(reason),
                        },
                        false,
                    );
                }
            }
        }
    }

    fn buyer_actions(&mut self, acts: Vec<BuyerAction>) {
        for a in acts {
            match a {
                BuyerAction::Propose { seller, proposal } => {
                    let i = self.index[&seller];
                    self.deliver(
                        Ev::Propose {
                            seller: i,
                            proposal,
                        },
                        false,
                    );
                }
                BuyerAction::SendAck { seller, ack } => {
                    let i = self.index[&seller];
                    self.deliver(Ev::Ack { seller: i, ack }, true);
                }
                BuyerAction::SendStop { seller, stop } => {
                    let i = self.index[&seller];
                    self.deliver(Ev::Stop { seller: i, stop }, false);
                }
                BuyerAction::Penalize { seller } => {
                    *self.penalties.entry(seller).or_default() += 1;
                }
                BuyerAction::Admit { .. }
                | BuyerAction::Revoke { .. }
                | BuyerAction::Lost { .. }
                | BuyerAction::NoMatch { .. }
                | BuyerAction::Persist { .. }
                | BuyerAction::Done => {}
            }
        }
    }

    /// Tracks when each slot's guest runs, from the fleet's view, and closes the
    /// replacement intervals opened by departures.
    fn observe_slots(&mut self) {
        let now = self.now;
        let mut all = true;
        for (i, slot) in self.fleet.slots().iter().enumerate() {
            let running = matches!(slot.state, SlotState::Running { .. });
            if running {
                // the buyer may still believe the dead guest runs: only a guest on
                // another seller closes the interval
                if let Some((d, dead)) = self.down_since[i] {
                    if slot.state.seller() != Some(dead) {
                        self.down_since[i] = None;
                        self.res.replacement_s.push((now - d) as f64 / 1000.0);
                    }
                }
                self.running_since[i].get_or_insert(now);
            } else {
                all = false;
                self.running_since[i] = None;
            }
        }
        if all && self.all_running_at.is_none() {
            self.all_running_at = Some(now);
        }
    }

    fn on_leave(&mut self, seller: u32, clean: bool) {
        let now = self.now;
        if !self.sellers[seller as usize].online {
            return;
        }
        self.res.departures += 1;
        // slots whose running guest dies here
        let key = self.sellers[seller as usize].key;
        let held: Vec<usize> = self
            .fleet
            .slots()
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s.state, SlotState::Running { seller, .. } if seller == key))
            .map(|(i, _)| i)
            .collect();
        for i in held {
            if self.down_since[i].is_none() && now < (self.spec.duration_min * 60_000.0) as u64 {
                self.down_since[i] = Some((now, key));
            }
        }
        if clean {
            let ids: Vec<LeaseId> = self.sellers[seller as usize]
                .leases
                .keys()
                .copied()
                .collect();
            for id in ids {
                let l = self.sellers[seller as usize]
                    .leases
                    .get_mut(&id)
                    .expect("listed");
                let acts = l.on_shutdown(now);
                self.seller_actions(seller, id, acts);
            }
        }
        let s = &mut self.sellers[seller as usize];
        for r in s.ran.values_mut() {
            r.1.get_or_insert(now);
        }
        s.online = false;
        s.epoch += 1;
        s.leases.clear();
        s.tick_at = u64::MAX;
        let t = now + exponential(&mut self.rng, self.spec.mean_away_min * 60_000.0) as u64;
        self.q.push(t.max(now + 1), Ev::Return { seller });
    }

    fn on_return(&mut self, seller: u32) {
        let now = self.now;
        let s = &mut self.sellers[seller as usize];
        if s.online {
            return;
        }
        s.online = true;
        // restart: every saved lease comes back ended (the guest died with us) and
        // keeps settling its receipts
        let recs: Vec<(LeaseId, SellerLeaseRecord)> =
            s.records.iter().map(|(k, v)| (*k, v.clone())).collect();
        for (id, rec) in recs {
            let (l, acts) = SellerLease::restore(rec, now);
            self.sellers[seller as usize].leases.insert(id, l);
            self.seller_actions(seller, id, acts);
        }
        self.seller_timer(seller);
        self.schedule_leave(seller);
    }

    fn finish(&mut self, end_ms: u64) {
        let mut run_ms = 0u64;
        let mut buyer_acked: BTreeMap<LeaseId, (u32, u64)> = BTreeMap::new();
        for e in self.fleet.ledger() {
            buyer_acked.insert(e.lease, (e.acked, e.billed()));
            self.res.buyer_billed += e.billed();
        }
        self.res.leases = buyer_acked.len();
        for s in &self.sellers {
            for (id, rec) in &s.records {
                let seller_acked = rec.ledger.acked;
                let receipted = rec.ledger.receipted;
                self.res.seller_billed += rec.ledger.billed();
                let (b_acked, _) = buyer_acked.get(id).copied().unwrap_or((0, 0));
                if seller_acked > b_acked || b_acked > receipted {
                    self.res.ledger_mismatches += 1;
                }
                let ran_ms = s
                    .ran
                    .get(id)
                    .map(|(a, b)| b.unwrap_or(end_ms).min(end_ms).saturating_sub(*a))
                    .unwrap_or(0);
                let period = rec.lease.terms.period_ms();
                if u64::from(b_acked) > ran_ms.div_ceil(period) + 1 {
                    self.res.overbilled += 1;
                }
            }
            for (a, b) in s.ran.values() {
                run_ms += b
                    .unwrap_or(end_ms)
                    .min(end_ms)
                    .saturating_sub((*a).min(end_ms));
            }
        }
        self.res.guest_minutes_run = run_ms as f64 / 60_000.0;
        let start = self.all_running_at.unwrap_or(end_ms).min(end_ms);
        let wanted_after = self.spec.guests as f64 * (end_ms - start) as f64 / 60_000.0;
        let mut run_after = 0u64;
        for s in &self.sellers {
            for (a, b) in s.ran.values() {
                let a = (*a).max(start);
                run_after += b
                    .unwrap_or(end_ms)
                    .min(end_ms)
                    .saturating_sub(a.min(end_ms));
            }
        }
        self.res.guest_minutes_lost_after_start = wanted_after - run_after as f64 / 60_000.0;
    }
}

fn offer_of(seller: PeerKey, now: u64) -> Offer {
    Offer {
        seller,
        seq: 1,
        issued_ms: now,
        expires_ms: now + 600_000,
        vcpus: 4,
        memory_mib: 4096,
        disk_cap_mib: 8192,
        price_per_min: PRICE,
        backend: BackendKind::Microvm,
        accel: Accel::Kvm,
        perf_score: 100,
        measurement: [0; 32],
        max_guests: 1,
        free_guests: 1,
    }
}

/// Runs the lease scenario and renders its section.
pub fn run(
    sc: &Scenario,
    ls: &LeaseSpec,
    out: &Path,
    show: bool,
) -> Result<(String, Vec<PathBuf>)> {
    let bar = show.then(|| ProgressBar::new((ls.duration_min * 60.0) as u64));
    let t0 = std::time::Instant::now();
    let r = simulate(sc, ls, bar.as_ref());
    let wall = t0.elapsed().as_secs_f64();
    if let Some(b) = bar {
        b.finish();
    }
    let mut rep = r.replacement_s.clone();
    rep.sort_by(f64::total_cmp);
    let mut md = String::new();
    let _ = write!(
        md,
        "\nLeases: {} guests for {:.0} min on {} sellers (session {:.0} min, away {:.0} min on average, {:.0} % clean departures, {:.0} % of receipts/acks lost), boot {:.0} s.\n\n",
        ls.guests, ls.duration_min, sc.sellers, ls.mean_session_min, ls.mean_away_min,
        ls.clean_fraction * 100.0, ls.loss * 100.0, ls.boot_s
    );
    md.push_str("| departures | replacements | replacement median (s) | p95 (s) | max (s) | guest-min wanted | run | lost after all first ran | leases | ledger mismatches | overbilled leases | buyer billed | seller billed | wall (s) |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let _ = writeln!(
        md,
        "| {} | {} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {:.1} | {} | {} | {} | {} | {} | {:.1} |",
        r.departures,
        rep.len(),
        percentile(&rep, 50.0),
        percentile(&rep, 95.0),
        rep.last().copied().unwrap_or(f64::NAN),
        r.guest_minutes_wanted,
        r.guest_minutes_run,
        r.guest_minutes_lost_after_start,
        r.leases,
        r.ledger_mismatches,
        r.overbilled,
        r.buyer_billed,
        r.seller_billed,
        wall
    );
    let mut files = Vec::new();
    let mut csv = String::from("replacement_s\n");
    for x in &rep {
        let _ = writeln!(csv, "{x:.3}");
    }
    files.push(report::write(
        &out.join(format!("{}-replacements.csv", sc.name)),
        &csv,
    )?);
    if let Some(p) = plot::lines(
        &out.join(format!("{}-replacement-cdf.png", sc.name)),
        &format!("{}: time to a running replacement", sc.name),
        "seconds from the guest's death",
        "fraction of replacements",
        &[Series {
            name: "replacement".into(),
            points: plot::cdf(&rep, 1.0),
        }],
        false,
        false,
    )? {
        files.push(p);
    }
    Ok((md, files))
}
