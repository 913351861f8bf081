//! The market's records in sled (`<data-dir>/market`): the seller's leases and its
//! audit log, the buyer's ledger and the sellers it ranks down. Every write is
//! flushed before the action it records goes out, so a crash never bills a minute
//! twice or forgets one that was acknowledged.

use std::path::Path;

use serde::{de::DeserializeOwned, Serialize};

use crate::error::{Error, Result};

#[derive(Clone)]
pub struct MarketDb {
    db: sled::Db,
}

fn db_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Market(format!("market database: {what}: {e}"))
}

impl MarketDb {
    pub fn open(data_dir: &Path) -> Result<MarketDb> {
        let path = data_dir.join("market");
        let db = sled::open(&path).map_err(|e| db_err(&path.display().to_string(), e))?;
        Ok(MarketDb { db })
    }

    pub fn put<T: Serialize>(&self, tree: &str, key: &[u8], v: &T) -> Result<()> {
        let t = self.db.open_tree(tree).map_err(|e| db_err(tree, e))?;
        let bytes = serde_json::to_vec(v).map_err(|e| db_err(tree, e))?;
        t.insert(key, bytes).map_err(|e| db_err(tree, e))?;
        t.flush().map_err(|e| db_err(tree, e))?;
        Ok(())
    }

    /// Inserts only if `key` is new: records that must never be rewritten.
    pub fn put_new<T: Serialize>(&self, tree: &str, key: &[u8], v: &T) -> Result<bool> {
        let t = self.db.open_tree(tree).map_err(|e| db_err(tree, e))?;
        let bytes = serde_json::to_vec(v).map_err(|e| db_err(tree, e))?;
        let r = t
            .compare_and_swap(key, None as Option<&[u8]>, Some(bytes))
            .map_err(|e| db_err(tree, e))?;
        t.flush().map_err(|e| db_err(tree, e))?;
        Ok(r.is_ok())
    }

    pub fn remove(&self, tree: &str, key: &[u8]) -> Result<()> {
        let t = self.db.open_tree(tree).map_err(|e| db_err(tree, e))?;
        t.remove(key).map_err(|e| db_err(tree, e))?;
        t.flush().map_err(|e| db_err(tree, e))?;
        Ok(())
    }

    /// Every record of `tree` in key order; unreadable ones are skipped with a warning.
    pub fn all<T: DeserializeOwned>(&self, tree: &str) -> Result<Vec<(Vec<u8>, T)>> {
        let t = self.db.open_tree(tree).map_err(|e| db_err(tree, e))?;
        let mut out = Vec::new();
        for kv in t.iter() {
            let (k, v) = kv.map_err(|e| db_err(tree, e))?;
            match serde_json::from_slice(&v) {
                Ok(x) => out.push((k.to_vec(), x)),
                Err(e) => tracing::warn!(tree, error = %e, "unreadable market record skipped"),
            }
        }
        Ok(out)
    }

    /// A key that sorts after every earlier one (for append-only logs).
    pub fn next_key(&self) -> Result<[u8; 8]> {
        Ok(self
            .db
            .generate_id()
            .map_err(|e| db_err("id", e))?
            .to_be_bytes())
    }
}
