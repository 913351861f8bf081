//! One lease on the seller: preparing the guest, per-period receipts, cumulative
//! acks, the grace period, and the ways a lease ends.

use std::fmt;

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

use crate::billing::{Ack, LedgerEntry, Receipt, Stop};
use crate::error::Error;
use crate::lease::Lease;
use crate::signed::Signed;

/// Longest interval, in periods, between re-sends of an unacked receipt after the
/// end (about an hour with 60 s periods).
pub const MAX_RESEND_PERIODS: u64 = 64;

/// Why a lease ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndReason {
    BuyerStopped,
    BuyerSilent,
    DurationReached,
    GuestExited,
    SellerShutdown,
    SellerRestarted,
    OutsideHours,
    StartFailed(String),
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndReason::BuyerStopped => f.write_str("stopped by the buyer"),
            EndReason::BuyerSilent => f.write_str("the buyer stopped acknowledging receipts"),
            EndReason::DurationReached => f.write_str("the lease's duration was reached"),
            EndReason::GuestExited => f.write_str("the guest exited"),
            EndReason::SellerShutdown => f.write_str("the seller shut down"),
            EndReason::SellerRestarted => f.write_str("the seller restarted"),
            EndReason::OutsideHours => f.write_str("the seller's selling hours ended"),
            EndReason::StartFailed(why) => write!(f, "the guest failed to start: {why}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SellerPhase {
    Preparing,
    Running,
    Ended,
}

/// What the caller must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SellerAction {
    SendReceipt(Signed<Receipt>),
    StopGuest(EndReason),
    /// The ledger entry changed: save `record()` before doing what follows.
    Persist,
    Ended(EndReason),
}

/// What survives a seller restart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SellerLeaseRecord {
    pub lease: Lease,
    pub ledger: LedgerEntry,
    pub started_ms: Option<u64>,
    pub last_ack_ms: u64,
    pub phase: SellerPhase,
}

/// The seller's state machine for one lease.
#[derive(Clone, Debug)]
pub struct SellerLease {
    lease: Lease,
    ledger: LedgerEntry,
    started_ms: Option<u64>,
    last_ack_ms: u64,
    phase: SellerPhase,
    /// The newest receipt, kept for re-sending (not persisted: re-signed if needed).
    last_receipt: Option<Signed<Receipt>>,
    last_send_ms: u64,
    /// Re-send interval once ended: doubles from one period up to `MAX_RESEND_PERIODS`.
    resend_every_ms: u64,
    /// Set by `on_outside_hours`: end at the next period boundary.
    end_at_boundary: bool,
}

impl SellerLease {
    /// A freshly countersigned lease; phase Preparing, silence counted from now.
    pub fn new(lease: Lease, now_ms: u64) -> Self {
        let t = &lease.terms;
        let ledger = LedgerEntry {
            lease: t.id,
            buyer: t.buyer,
            seller: t.seller,
            price_per_min: t.price_per_min,
            receipted: 0,
            acked: 0,
            ended: false,
            end_reason: None,
        };
        SellerLease {
            lease,
            ledger,
            started_ms: None,
            last_ack_ms: now_ms,
            phase: SellerPhase::Preparing,
            last_receipt: None,
            last_send_ms: now_ms,
            resend_every_ms: 0,
            end_at_boundary: false,
        }
    }

    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    pub fn phase(&self) -> SellerPhase {
        self.phase
    }

    pub fn ledger(&self) -> &LedgerEntry {
        &self.ledger
    }

    fn period_ms(&self) -> u64 {
        self.lease.terms.period_ms()
    }

    fn silent(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_ack_ms) > self.lease.terms.grace_ms()
    }

    fn end(&mut self, reason: EndReason, stop_guest: bool) -> Vec<SellerAction> {
        if self.phase == SellerPhase::Ended {
            return Vec::new();
        }
        self.phase = SellerPhase::Ended;
        self.resend_every_ms = self.period_ms();
        self.ledger.ended = true;
        self.ledger.end_reason = Some(reason.clone());
        self.end_at_boundary = false;
        let mut out = Vec::with_capacity(3);
        if stop_guest {
            out.push(SellerAction::StopGuest(reason.clone()));
        }
        out.push(SellerAction::Persist);
        out.push(SellerAction::Ended(reason));
        out
    }

    /// The guest booted: billing starts now.
    pub fn on_guest_started(&mut self, now_ms: u64) -> Vec<SellerAction> {
        match self.phase {
            SellerPhase::Preparing => {
                self.phase = SellerPhase::Running;
                self.started_ms = Some(now_ms);
                // The buyer has had nothing to ack while we prepared.
                self.last_ack_ms = self.last_ack_ms.max(now_ms);
                self.last_send_ms = now_ms;
                vec![SellerAction::Persist]
            }
            SellerPhase::Running => Vec::new(),
            // Ended while the guest was still starting: it must not keep running.
            SellerPhase::Ended => {
                let why = self
                    .ledger
                    .end_reason
                    .clone()
                    .unwrap_or(EndReason::SellerShutdown);
                vec![SellerAction::StopGuest(why)]
            }
        }
    }

    /// Any other sign that the buyer is alive (for example it is serving the image's
    /// chunks while we prepare): postpones `BuyerSilent` like an ack does.
    pub fn on_buyer_life(&mut self, now_ms: u64) {
        self.last_ack_ms = self.last_ack_ms.max(now_ms);
    }

    fn check_buyer_msg(
        &self,
        signer: &crate::PeerKey,
        lease: &crate::LeaseId,
    ) -> Result<(), Error> {
        let t = &self.lease.terms;
        if *lease != t.id {
            return Err(Error::WrongLease {
                expected: t.id,
                got: *lease,
            });
        }
        if *signer != t.buyer {
            return Err(Error::WrongPeer { lease: t.id });
        }
        Ok(())
    }

    /// Verifies signer == lease buyer and lease id; cumulative ack: minute <= receipted,
    /// acked = max(acked, minute); total must equal minute*price. Idempotent.
    pub fn on_ack(&mut self, ack: &Signed<Ack>, now_ms: u64) -> Result<Vec<SellerAction>, Error> {
        self.check_buyer_msg(&ack.signer, &ack.body.lease)?;
        let a = ack.verify()?;
        let t = &self.lease.terms;
        if a.minute > self.ledger.receipted {
            return Err(Error::AckBeyondReceipt {
                lease: t.id,
                minute: a.minute,
                receipted: self.ledger.receipted,
            });
        }
        let want = t.total_for(a.minute);
        if a.total != want {
            return Err(Error::BadAckTotal {
                lease: t.id,
                minute: a.minute,
                total: a.total,
                want,
            });
        }
        self.last_ack_ms = self.last_ack_ms.max(now_ms);
        if a.minute > self.ledger.acked {
            self.ledger.acked = a.minute;
            Ok(vec![SellerAction::Persist])
        } else {
            Ok(Vec::new())
        }
    }

    /// The buyer ends the lease. Periods not yet receipted are not billed.
    pub fn on_stop(
        &mut self,
        stop: &Signed<Stop>,
        now_ms: u64,
    ) -> Result<Vec<SellerAction>, Error> {
        self.check_buyer_msg(&stop.signer, &stop.body.lease)?;
        stop.verify()?;
        self.last_ack_ms = self.last_ack_ms.max(now_ms);
        Ok(self.end(EndReason::BuyerStopped, true))
    }

    /// The guest exited by itself.
    pub fn on_guest_exited(&mut self, _now_ms: u64) -> Vec<SellerAction> {
        self.end(EndReason::GuestExited, false)
    }

    /// The seller is shutting down cleanly.
    pub fn on_shutdown(&mut self, _now_ms: u64) -> Vec<SellerAction> {
        self.end(EndReason::SellerShutdown, true)
    }

    /// Fetching the image or booting failed.
    pub fn on_start_failed(&mut self, why: String, _now_ms: u64) -> Vec<SellerAction> {
        self.end(EndReason::StartFailed(why), false)
    }

    /// The seller's selling hours ended: a preparing lease ends now, a running one at
    /// its next period boundary (after receipting that period).
    pub fn on_outside_hours(&mut self, _now_ms: u64) -> Vec<SellerAction> {
        match self.phase {
            SellerPhase::Preparing => self.end(EndReason::OutsideHours, true),
            SellerPhase::Running => {
                self.end_at_boundary = true;
                Vec::new()
            }
            SellerPhase::Ended => Vec::new(),
        }
    }

    fn receipt(&self, minute: u32, now_ms: u64, sk: &SigningKey) -> Signed<Receipt> {
        let t = &self.lease.terms;
        Signed::sign(
            sk,
            Receipt {
                lease: t.id,
                minute,
                amount: t.price_per_min,
                total: t.total_for(minute),
                issued_ms: now_ms,
            },
        )
    }

    /// Periods completed by `now_ms` (the last, partial period of a duration counts
    /// once the duration is reached).
    fn due_periods(&self, started: u64, now_ms: u64) -> (u32, bool) {
        let t = &self.lease.terms;
        let elapsed = now_ms.saturating_sub(started);
        let mut due = u32::try_from(elapsed / self.period_ms()).unwrap_or(u32::MAX);
        let mut done = false;
        if let (Some(d), Some(max)) = (t.duration_s, t.duration_periods()) {
            if elapsed >= d.saturating_mul(1000) {
                due = max;
                done = true;
            }
            due = due.min(max);
        }
        (due, done)
    }

    /// Running: a receipt per newly completed period (never the same minute twice);
    /// the newest unacked receipt re-sent at most once per period so that a lost
    /// receipt or ack is recovered (after the end too, with the interval doubling up
    /// to `MAX_RESEND_PERIODS`: nothing new is receipted, the last one is); end with
    /// BuyerSilent when now - last_ack_ms > grace (minutes not acked are never
    /// billed); DurationReached at the end of the duration. Preparing: BuyerSilent too.
    pub fn on_tick(&mut self, now_ms: u64, sk: &SigningKey) -> Vec<SellerAction> {
        let mut out = Vec::new();
        match self.phase {
            SellerPhase::Preparing => {
                if self.silent(now_ms) {
                    return self.end(EndReason::BuyerSilent, true);
                }
            }
            SellerPhase::Running => {
                if self.silent(now_ms) {
                    return self.end(EndReason::BuyerSilent, true);
                }
                let started = self.started_ms.unwrap_or(now_ms);
                let (due, done) = self.due_periods(started, now_ms);
                if due > self.ledger.receipted {
                    let first = self.ledger.receipted + 1;
                    self.ledger.receipted = due;
                    // Persist first: a crash after sending must not forget the minute.
                    out.push(SellerAction::Persist);
                    for m in first..=due {
                        let r = self.receipt(m, now_ms, sk);
                        out.push(SellerAction::SendReceipt(r.clone()));
                        self.last_receipt = Some(r);
                    }
                    self.last_send_ms = now_ms;
                }
                if done {
                    out.extend(self.end(EndReason::DurationReached, true));
                    return out;
                }
                if self.end_at_boundary && due > 0 && !out.is_empty() {
                    out.extend(self.end(EndReason::OutsideHours, true));
                    return out;
                }
                if !out.is_empty() {
                    return out;
                }
            }
            SellerPhase::Ended => {}
        }
        if self.resend_due(now_ms) {
            let r = match &self.last_receipt {
                Some(r) if r.body.minute == self.ledger.receipted => r.clone(),
                _ => self.receipt(self.ledger.receipted, now_ms, sk),
            };
            self.last_send_ms = now_ms;
            if self.phase == SellerPhase::Ended {
                self.resend_every_ms =
                    (self.resend_every_ms * 2).min(self.period_ms() * MAX_RESEND_PERIODS);
            }
            self.last_receipt = Some(r.clone());
            out.push(SellerAction::SendReceipt(r));
        }
        out
    }

    /// When the newest unacked receipt is next re-sent, if it is.
    fn resend_at(&self) -> Option<u64> {
        if self.ledger.receipted <= self.ledger.acked {
            return None;
        }
        let every = match self.phase {
            SellerPhase::Ended => self.resend_every_ms.max(self.period_ms()),
            _ => self.period_ms(),
        };
        Some(self.last_send_ms.saturating_add(every))
    }

    fn resend_due(&self, now_ms: u64) -> bool {
        self.resend_at().is_some_and(|t| now_ms >= t)
    }

    pub fn record(&self) -> SellerLeaseRecord {
        SellerLeaseRecord {
            lease: self.lease.clone(),
            ledger: self.ledger.clone(),
            started_ms: self.started_ms,
            last_ack_ms: self.last_ack_ms,
            phase: self.phase,
        }
    }

    /// After a seller restart the guest is gone: phase Ended(SellerRestarted) unless
    /// already ended; nothing new is receipted; acks for receipted minutes are still
    /// accepted.
    pub fn restore(rec: SellerLeaseRecord, now_ms: u64) -> (Self, Vec<SellerAction>) {
        let mut s = SellerLease {
            lease: rec.lease,
            ledger: rec.ledger,
            started_ms: rec.started_ms,
            last_ack_ms: rec.last_ack_ms,
            phase: rec.phase,
            last_receipt: None,
            last_send_ms: now_ms,
            resend_every_ms: 0,
            end_at_boundary: false,
        };
        let acts = s.end(EndReason::SellerRestarted, false);
        (s, acts)
    }

    /// When `on_tick` next has work (None: never again).
    pub fn next_deadline(&self) -> Option<u64> {
        let silence = self
            .last_ack_ms
            .saturating_add(self.lease.terms.grace_ms())
            .saturating_add(1);
        let resend = self.resend_at();
        match self.phase {
            SellerPhase::Preparing => Some(silence),
            SellerPhase::Running => {
                let started = self.started_ms.unwrap_or(0);
                let mut next = started.saturating_add(
                    u64::from(self.ledger.receipted + 1).saturating_mul(self.period_ms()),
                );
                if let Some(d) = self.lease.terms.duration_s {
                    next = next.min(started.saturating_add(d.saturating_mul(1000)));
                }
                Some(
                    [Some(next), Some(silence), resend]
                        .into_iter()
                        .flatten()
                        .min()?,
                )
            }
            SellerPhase::Ended => resend,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::tests::terms;
    use crate::lease::LeaseTerms;
    use crate::LeaseId;

    const P: u64 = 60_000;

    struct Fx {
        b: SigningKey,
        s: SigningKey,
        lease: Lease,
    }

    fn fx(f: impl FnOnce(&mut LeaseTerms)) -> Fx {
        let b = SigningKey::from_bytes(&[1; 32]);
        let s = SigningKey::from_bytes(&[2; 32]);
        let mut t = terms(&b, &s, 1);
        f(&mut t);
        let lease = Lease::countersign(&Signed::sign(&b, t), &s).unwrap();
        Fx { b, s, lease }
    }

    fn receipts(acts: &[SellerAction]) -> Vec<u32> {
        acts.iter()
            .filter_map(|a| match a {
                SellerAction::SendReceipt(r) => Some(r.body.minute),
                _ => None,
            })
            .collect()
    }

    fn ack(sk: &SigningKey, id: LeaseId, minute: u32, price: u64) -> Signed<Ack> {
        Signed::sign(
            sk,
            Ack {
                lease: id,
                minute,
                total: u64::from(minute) * price,
            },
        )
    }

    #[test]
    fn receipts_each_period_once_and_acks_cumulative() {
        let f = fx(|t| t.grace_s = 600);
        let id = f.lease.terms.id;
        let price = f.lease.terms.price_per_min;
        let mut s = SellerLease::new(f.lease.clone(), 0);
        assert_eq!(s.phase(), SellerPhase::Preparing);
        assert_eq!(s.on_guest_started(1000), vec![SellerAction::Persist]);
        assert!(s.on_guest_started(1500).is_empty());
        assert_eq!(s.next_deadline(), Some(1000 + P));
        assert!(receipts(&s.on_tick(1000 + P - 1, &f.s)).is_empty());
        let acts = s.on_tick(1000 + P, &f.s);
        assert_eq!(acts[0], SellerAction::Persist);
        assert_eq!(receipts(&acts), vec![1]);
        // Same instant again: nothing new.
        assert!(s.on_tick(1000 + P, &f.s).is_empty());
        // Two periods at once (a late tick): both, in order.
        assert_eq!(receipts(&s.on_tick(1000 + 3 * P, &f.s)), vec![2, 3]);
        assert_eq!(s.ledger().receipted, 3);
        assert_eq!(
            s.on_ack(&ack(&f.b, id, 2, price), 1000 + 3 * P).unwrap(),
            vec![SellerAction::Persist]
        );
        // Duplicate and older acks are idempotent.
        assert!(s
            .on_ack(&ack(&f.b, id, 2, price), 1000 + 3 * P)
            .unwrap()
            .is_empty());
        assert!(s
            .on_ack(&ack(&f.b, id, 1, price), 1000 + 3 * P)
            .unwrap()
            .is_empty());
        assert_eq!(s.ledger().acked, 2);
        assert_eq!(s.ledger().billed(), 2 * price);
        // Beyond what was receipted: refused.
        assert!(matches!(
            s.on_ack(&ack(&f.b, id, 4, price), 1000 + 3 * P),
            Err(Error::AckBeyondReceipt {
                minute: 4,
                receipted: 3,
                ..
            })
        ));
    }

    #[test]
    fn forged_or_misdirected_acks_and_stops_refused() {
        let f = fx(|_| {});
        let id = f.lease.terms.id;
        let price = f.lease.terms.price_per_min;
        let mut s = SellerLease::new(f.lease.clone(), 0);
        s.on_guest_started(0);
        s.on_tick(2 * P, &f.s);
        let other = SigningKey::from_bytes(&[9; 32]);
        assert!(matches!(
            s.on_ack(&ack(&other, id, 1, price), 2 * P),
            Err(Error::WrongPeer { .. })
        ));
        let mut forged = ack(&f.b, id, 1, price);
        forged.body.minute = 2;
        forged.body.total = 2 * price;
        assert_eq!(s.on_ack(&forged, 2 * P), Err(Error::BadSignature));
        assert!(matches!(
            s.on_ack(&ack(&f.b, LeaseId([7; 16]), 1, price), 2 * P),
            Err(Error::WrongLease { .. })
        ));
        let mut bad_total = ack(&f.b, id, 1, price);
        bad_total.body.total = price + 1;
        let bad_total = Signed::sign(&f.b, bad_total.body);
        assert!(matches!(
            s.on_ack(&bad_total, 2 * P),
            Err(Error::BadAckTotal { .. })
        ));

        let stop = Signed::sign(
            &other,
            Stop {
                lease: id,
                issued_ms: 0,
            },
        );
        assert!(matches!(
            s.on_stop(&stop, 2 * P),
            Err(Error::WrongPeer { .. })
        ));
        let mut stop = Signed::sign(
            &f.b,
            Stop {
                lease: id,
                issued_ms: 0,
            },
        );
        stop.body.issued_ms = 5;
        assert_eq!(s.on_stop(&stop, 2 * P), Err(Error::BadSignature));
        assert_eq!(s.phase(), SellerPhase::Running);
        assert_eq!(s.ledger().acked, 0);
    }

    #[test]
    fn stop_ends_once_and_nothing_new_is_receipted() {
        let f = fx(|_| {});
        let id = f.lease.terms.id;
        let price = f.lease.terms.price_per_min;
        let mut s = SellerLease::new(f.lease.clone(), 0);
        s.on_guest_started(0);
        s.on_tick(P, &f.s);
        let stop = Signed::sign(
            &f.b,
            Stop {
                lease: id,
                issued_ms: P + 10,
            },
        );
        let acts = s.on_stop(&stop, P + 10).unwrap();
        assert_eq!(
            acts,
            vec![
                SellerAction::StopGuest(EndReason::BuyerStopped),
                SellerAction::Persist,
                SellerAction::Ended(EndReason::BuyerStopped)
            ]
        );
        assert!(s.on_stop(&stop, P + 20).unwrap().is_empty());
        assert_eq!(s.phase(), SellerPhase::Ended);
        // Later ticks re-send minute 1 (unacked) but never receipt minute 2+.
        let acts = s.on_tick(2 * P + 10, &f.s);
        assert_eq!(receipts(&acts), vec![1]);
        assert_eq!(s.ledger().receipted, 1);
        // The late ack still counts.
        s.on_ack(&ack(&f.b, id, 1, price), 2 * P + 20).unwrap();
        assert_eq!(s.ledger().acked, 1);
        assert_eq!(s.next_deadline(), None);
        assert!(s.on_tick(10 * P, &f.s).is_empty());
    }

    #[test]
    fn silent_buyer_is_cut_off_and_unacked_minutes_unbilled() {
        let f = fx(|_| {});
        let mut s = SellerLease::new(f.lease.clone(), 0);
        s.on_guest_started(0);
        assert_eq!(receipts(&s.on_tick(P, &f.s)), vec![1]);
        // Grace is 120 s from the last ack (here: the start).
        assert_eq!(receipts(&s.on_tick(2 * P, &f.s)), vec![2]);
        assert_eq!(s.next_deadline(), Some(2 * P + 1));
        let acts = s.on_tick(2 * P + 1, &f.s);
        assert_eq!(
            acts,
            vec![
                SellerAction::StopGuest(EndReason::BuyerSilent),
                SellerAction::Persist,
                SellerAction::Ended(EndReason::BuyerSilent)
            ]
        );
        assert_eq!(s.ledger().billed(), 0);
        // Nothing new after the end; the newest receipt is re-sent with back-off in
        // case the buyer's acks were what got lost.
        assert_eq!(s.next_deadline(), Some(3 * P));
        assert_eq!(receipts(&s.on_tick(3 * P, &f.s)), vec![2]);
        assert_eq!(s.next_deadline(), Some(5 * P));
        assert_eq!(receipts(&s.on_tick(5 * P, &f.s)), vec![2]);
        assert_eq!(s.next_deadline(), Some(9 * P));
        assert!(s.on_tick(9 * P - 1, &f.s).is_empty());
        for _ in 0..20 {
            let at = s.next_deadline().unwrap();
            assert_eq!(receipts(&s.on_tick(at, &f.s)), vec![2]);
        }
        let at = s.next_deadline().unwrap();
        s.on_tick(at, &f.s);
        assert_eq!(s.next_deadline(), Some(at + MAX_RESEND_PERIODS * P));
        assert_eq!(s.ledger().receipted, 2);
    }

    #[test]
    fn preparing_too_long_without_life_ends_silent() {
        let f = fx(|_| {});
        let mut s = SellerLease::new(f.lease.clone(), 0);
        assert_eq!(s.next_deadline(), Some(120_001));
        assert!(s.on_tick(120_000, &f.s).is_empty());
        s.on_buyer_life(100_000);
        assert!(s.on_tick(220_000, &f.s).is_empty());
        assert_eq!(receipts(&s.on_tick(220_001, &f.s)), vec![]);
        assert_eq!(s.phase(), SellerPhase::Ended);
        assert_eq!(s.ledger().end_reason, Some(EndReason::BuyerSilent));
        // A guest that still comes up is stopped at once.
        assert_eq!(
            s.on_guest_started(230_000),
            vec![SellerAction::StopGuest(EndReason::BuyerSilent)]
        );
    }

    #[test]
    fn resends_newest_unacked_once_per_period() {
        let f = fx(|t| t.grace_s = 600);
        let id = f.lease.terms.id;
        let price = f.lease.terms.price_per_min;
        let mut s = SellerLease::new(f.lease.clone(), 0);
        s.on_guest_started(0);
        assert_eq!(receipts(&s.on_tick(P, &f.s)), vec![1]);
        assert!(s.on_tick(P + P / 2, &f.s).is_empty());
        // Minute 2 is due at 2P: the new receipt, no separate re-send.
        assert_eq!(receipts(&s.on_tick(2 * P, &f.s)), vec![2]);
        assert_eq!(receipts(&s.on_tick(2 * P + P / 2, &f.s)), Vec::<u32>::new());
        s.on_ack(&ack(&f.b, id, 2, price), 2 * P + P / 2).unwrap();
        assert_eq!(receipts(&s.on_tick(3 * P, &f.s)), vec![3]);
        // Lost: re-sent once per period, always the newest.
        assert_eq!(receipts(&s.on_tick(3 * P + P / 2, &f.s)), Vec::<u32>::new());
        assert_eq!(receipts(&s.on_tick(4 * P, &f.s)), vec![4]);
        let r = s.on_tick(5 * P - 1, &f.s);
        assert!(receipts(&r).is_empty());
        assert_eq!(receipts(&s.on_tick(5 * P, &f.s)), vec![5]);
        s.on_ack(&ack(&f.b, id, 5, price), 5 * P + 1).unwrap();
        // Now a tick between periods with everything acked sends nothing.
        assert!(s.on_tick(5 * P + P / 2, &f.s).is_empty());
        // Stop acks for a while: at 6P the new minute, at 7P minute 7 (not a re-send of 6).
        assert_eq!(receipts(&s.on_tick(6 * P, &f.s)), vec![6]);
        assert_eq!(receipts(&s.on_tick(6 * P + P / 2, &f.s)), Vec::<u32>::new());
        assert_eq!(receipts(&s.on_tick(7 * P, &f.s)), vec![7]);
        s.on_stop(
            &Signed::sign(
                &f.b,
                Stop {
                    lease: id,
                    issued_ms: 0,
                },
            ),
            7 * P + 1,
        )
        .unwrap();
        assert_eq!(s.next_deadline(), Some(8 * P));
        assert_eq!(receipts(&s.on_tick(8 * P, &f.s)), vec![7]);
        assert_eq!(receipts(&s.on_tick(8 * P + 10, &f.s)), Vec::<u32>::new());
    }

    #[test]
    fn duration_ends_with_the_last_partial_period_billed() {
        let f = fx(|t| {
            t.duration_s = Some(150);
            t.grace_s = 600;
        });
        let mut s = SellerLease::new(f.lease.clone(), 0);
        s.on_guest_started(0);
        assert_eq!(receipts(&s.on_tick(2 * P, &f.s)), vec![1, 2]);
        assert_eq!(s.next_deadline(), Some(150_000));
        let acts = s.on_tick(150_000, &f.s);
        assert_eq!(receipts(&acts), vec![3]);
        assert_eq!(
            acts.last(),
            Some(&SellerAction::Ended(EndReason::DurationReached))
        );
        assert!(acts.contains(&SellerAction::StopGuest(EndReason::DurationReached)));
        assert_eq!(s.ledger().receipted, 3);
    }

    #[test]
    fn other_endings() {
        let f = fx(|_| {});
        let mut s = SellerLease::new(f.lease.clone(), 0);
        assert_eq!(
            s.on_start_failed("no kvm".into(), 5),
            vec![
                SellerAction::Persist,
                SellerAction::Ended(EndReason::StartFailed("no kvm".into()))
            ]
        );
        assert!(s.on_shutdown(6).is_empty());

        let mut s = SellerLease::new(f.lease.clone(), 0);
        s.on_guest_started(0);
        assert_eq!(
            s.on_guest_exited(10),
            vec![
                SellerAction::Persist,
                SellerAction::Ended(EndReason::GuestExited)
            ]
        );

        let mut s = SellerLease::new(f.lease.clone(), 0);
        s.on_guest_started(0);
        assert_eq!(
            s.on_shutdown(10)[0],
            SellerAction::StopGuest(EndReason::SellerShutdown)
        );

        // Outside hours: ends at the next boundary, that period receipted.
        let mut s = SellerLease::new(f.lease.clone(), 0);
        s.on_guest_started(0);
        assert!(s.on_outside_hours(P / 2).is_empty());
        assert!(s.on_tick(P - 1, &f.s).is_empty());
        let acts = s.on_tick(P, &f.s);
        assert_eq!(receipts(&acts), vec![1]);
        assert_eq!(
            acts.last(),
            Some(&SellerAction::Ended(EndReason::OutsideHours))
        );
        let mut s = SellerLease::new(f.lease.clone(), 0);
        assert_eq!(
            s.on_outside_hours(1)[0],
            SellerAction::StopGuest(EndReason::OutsideHours)
        );
    }

    #[test]
    fn restore_ends_and_keeps_accepting_acks() {
        let f = fx(|_| {});
        let id = f.lease.terms.id;
        let price = f.lease.terms.price_per_min;
        let mut s = SellerLease::new(f.lease.clone(), 0);
        s.on_guest_started(0);
        s.on_tick(2 * P, &f.s);
        s.on_ack(&ack(&f.b, id, 1, price), 2 * P).unwrap();
        let rec = s.record();
        let bytes = bincode::serialize(&rec).unwrap();
        let rec: SellerLeaseRecord = bincode::deserialize(&bytes).unwrap();
        let (mut r, acts) = SellerLease::restore(rec, 2 * P + 5);
        assert_eq!(
            acts,
            vec![
                SellerAction::Persist,
                SellerAction::Ended(EndReason::SellerRestarted)
            ]
        );
        assert_eq!(r.phase(), SellerPhase::Ended);
        assert_eq!(r.ledger().receipted, 2);
        // The in-flight ack for minute 2 still counts; nothing new is receipted.
        assert_eq!(
            r.on_ack(&ack(&f.b, id, 2, price), 2 * P + 6).unwrap(),
            vec![SellerAction::Persist]
        );
        assert!(r.on_tick(10 * P, &f.s).is_empty());
        assert_eq!(r.ledger().receipted, 2);
        // Restoring an ended record does nothing more.
        let (_, acts) = SellerLease::restore(r.record(), 11 * P);
        assert!(acts.is_empty());
    }
}
