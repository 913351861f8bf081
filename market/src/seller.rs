//! One lease on the seller: preparing the guest, per-period receipts, cumulative
//! acks, the grace period, and the ways a lease ends.

use std::fmt;

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

use crate::billing::{Ack, LedgerEntry, Receipt, Stop};
use crate::error::Error;
use crate::lease::Lease;
use crate::signed::Signed;

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
    /// the newest unacked receipt re-sent at most once per period while the buyer is
    /// within its grace (also after the end, so a lost ack is recovered); end with
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
            self.last_receipt = Some(r.clone());
            out.push(SellerAction::SendReceipt(r));
        }
        out
    }

    fn resend_due(&self, now_ms: u64) -> bool {
        self.ledger.receipted > self.ledger.acked
            && !self.silent(now_ms)
            && now_ms >= self.last_send_ms.saturating_add(self.period_ms())
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
        let resend = (self.ledger.receipted > self.ledger.acked)
            .then(|| self.last_send_ms.saturating_add(self.period_ms()));
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
            SellerPhase::Ended => resend.filter(|&r| r < silence),
        }
    }
}
