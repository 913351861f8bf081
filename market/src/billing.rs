//! Per-period receipts (seller-signed), cumulative acks and stops (buyer-signed),
//! and the ledger entry both sides keep per lease.

use serde::{Deserialize, Serialize};

use crate::keys::{LeaseId, PeerKey};
use crate::seller::EndReason;
use crate::signed::Domain;

/// The seller's claim that period `minute` (1-based) of `lease` completed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub lease: LeaseId,
    /// 1-based number of the completed period.
    pub minute: u32,
    /// Price of that period.
    pub amount: u64,
    /// Cumulative price of periods 1..=minute.
    pub total: u64,
    pub issued_ms: u64,
}

impl Domain for Receipt {
    const DOMAIN: &'static str = "cpushare/receipt/v1";
}

/// The buyer's acknowledgement of every period up to and including `minute`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub lease: LeaseId,
    /// Acks all minutes <= this.
    pub minute: u32,
    pub total: u64,
}

impl Domain for Ack {
    const DOMAIN: &'static str = "cpushare/ack/v1";
}

/// The buyer ends the lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stop {
    pub lease: LeaseId,
    pub issued_ms: u64,
}

impl Domain for Stop {
    const DOMAIN: &'static str = "cpushare/stop/v1";
}

/// One lease's account, on either side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub lease: LeaseId,
    pub buyer: PeerKey,
    pub seller: PeerKey,
    pub price_per_min: u64,
    /// Highest period the seller issued (seller) or that was validly receipted (buyer).
    pub receipted: u32,
    /// Highest period the buyer acknowledged; only these are billed.
    pub acked: u32,
    pub ended: bool,
    pub end_reason: Option<EndReason>,
}

impl LedgerEntry {
    /// What the lease costs: acknowledged periods times the price.
    pub fn billed(&self) -> u64 {
        u64::from(self.acked).saturating_mul(self.price_per_min)
    }
}
