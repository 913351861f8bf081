//! The seller's audit log: which buyer (peer id, IP:port) ran which image, when,
//! how many bytes its guest moved and what the filter dropped. Append-only in sled:
//! an entry is never rewritten; a lease's end is a second entry.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::db::MarketDb;
use crate::error::Result;

const TREE: &str = "audit";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum AuditEvent {
    Start {
        lease: String,
        buyer: String,
        buyer_addr: String,
        image: String,
        guest_ip: String,
        at_ms: u64,
    },
    End {
        lease: String,
        buyer: String,
        reason: String,
        minutes_billed: u32,
        /// Guest traffic and drop counters of the overlay session.
        counters: Value,
        at_ms: u64,
    },
    Refused {
        lease: String,
        buyer: String,
        reason: String,
        at_ms: u64,
    },
}

pub fn append(db: &MarketDb, ev: &AuditEvent) -> Result<()> {
    let key = db.next_key()?;
    db.put_new(TREE, &key, ev)?;
    Ok(())
}

pub fn all(db: &MarketDb) -> Result<Vec<AuditEvent>> {
    Ok(db.all(TREE)?.into_iter().map(|(_, v)| v).collect())
}
