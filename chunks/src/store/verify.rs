//! Reconciling the index with the chunk files: cheaply at open (names and
//! sizes), fully in [`ChunkStore::verify_all`] (every byte re-hashed).

use std::collections::HashSet;

use tracing::{info, warn};

use super::files::{remove_path, Found};
use super::lru::{meta_value, parse_meta, State};
use super::ChunkStore;
use crate::chunking::MAX_CHUNK;
use crate::error::Result;
use crate::ids::{ChunkId, ImageId};

/// Result of [`ChunkStore::verify_all`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    /// Chunks whose bytes match their id.
    pub ok: u64,
    /// Chunks that did not match (or had a malformed name) and were deleted.
    pub bad_removed: u64,
    /// Bookkeeping entries repaired (entry without file, file without entry).
    pub repaired: u64,
    /// Manifests that failed to verify and were deleted.
    pub bad_manifests_removed: u64,
}

impl ChunkStore {
    /// Build the in-memory state from the index and the files: a file
    /// without an entry (a crash between rename and index write, or before
    /// an evicted file was deleted) is adopted as least recently used; an
    /// entry without a file is dropped. Contents are checked on read.
    pub(super) fn load(&self) -> Result<()> {
        let mut st = State::default();
        let mut drop_keys = Vec::new();
        for kv in self.inner.trees.meta.iter() {
            let (k, v) = kv.map_err(|e| self.err(e))?;
            match (ChunkId::from_slice(&k), parse_meta(&v)) {
                (Some(id), Some((size, tick))) if size <= MAX_CHUNK => st.insert(id, size, tick),
                _ => drop_keys.push(k.to_vec()),
            }
        }
        let mut on_disk = HashSet::new();
        let mut adopt = Vec::new();
        for f in self.inner.files.scan()? {
            match f {
                Found::Chunk(id) => {
                    if !st.entries.contains_key(&id) {
                        match self.inner.files.len(&id) {
                            Some(n) if n <= MAX_CHUNK as u64 => adopt.push((id, n as u32)),
                            _ => remove_path(&self.inner.files.path(&id))?,
                        }
                    }
                    on_disk.insert(id);
                }
                Found::Stray(p) => {
                    warn!(path = %p.display(), "not a chunk file; deleted");
                    remove_path(&p)?;
                }
            }
        }
        let gone: Vec<ChunkId> = st
            .entries
            .keys()
            .filter(|id| !on_disk.contains(id))
            .copied()
            .collect();
        for id in &gone {
            st.remove(id);
            drop_keys.push(id.0.to_vec());
        }
        for (id, n) in &adopt {
            st.insert(*id, *n, 0);
        }
        // The LRU order saved by the last flush.
        super::recency::clean(&self.inner.path);
        for (id, tick) in super::recency::load(&self.inner.path) {
            st.raise_tick(id, tick);
        }
        if !drop_keys.is_empty() || !adopt.is_empty() {
            info!(
                adopted = adopt.len(),
                dropped = drop_keys.len(),
                "chunk store index reconciled with its files"
            );
            self.write(0, true, move |t| {
                let mut b = sled::Batch::default();
                for k in drop_keys {
                    b.remove(k);
                }
                for (id, n) in adopt {
                    b.insert(&id.0[..], &meta_value(n, 0)[..]);
                }
                t.meta.apply_batch(b).map_err(|e| t.err(e))
            })?;
        }
        for k in self.inner.trees.pins.iter().keys() {
            let k = k.map_err(|e| self.err(e))?;
            if let Some(id) = ImageId::from_slice(&k) {
                st.persistent_pins.insert(id);
            }
        }
        *self.state() = st;
        self.recompute_pinned()
    }

    /// Re-hash every chunk file; delete those that do not match their name;
    /// repair bookkeeping; drop manifests that no longer verify.
    pub fn verify_all(&self) -> Result<VerifyReport> {
        let mut rep = VerifyReport::default();
        let mut seen = HashSet::new();
        for f in self.inner.files.scan()? {
            let id = match f {
                Found::Chunk(id) => id,
                Found::Stray(p) => {
                    warn!(path = %p.display(), "not a chunk file; deleted");
                    remove_path(&p)?;
                    rep.bad_removed += 1;
                    continue;
                }
            };
            let Some(v) = self.inner.files.read(&id)? else {
                continue; // evicted meanwhile
            };
            if v.len() > MAX_CHUNK as usize || ChunkId::of(&v) != id {
                warn!(chunk = %id, "chunk failed verification; deleted");
                let mut st = self.state();
                self.drop_chunks(&mut st, &[id])?;
                st.bad_removed += 1;
                rep.bad_removed += 1;
                continue;
            }
            rep.ok += 1;
            seen.insert(id);
            let mut st = self.state();
            // Still in place under the lock and not in the index: adopt.
            if !st.entries.contains_key(&id) && self.inner.files.exists(&id) {
                let t = st.tick + 1;
                let mv = meta_value(v.len() as u32, t);
                self.write(0, false, move |tr| {
                    tr.meta
                        .insert(id.0, &mv[..])
                        .map(|_| ())
                        .map_err(|e| tr.err(e))
                })?;
                st.insert(id, v.len() as u32, t);
                rep.repaired += 1;
            }
        }
        // Entries whose file is gone.
        let ids: Vec<ChunkId> = self.state().entries.keys().copied().collect();
        for id in ids {
            if seen.contains(&id) {
                continue;
            }
            let mut st = self.state();
            if st.entries.contains_key(&id) && !self.inner.files.exists(&id) {
                self.drop_chunks(&mut st, &[id])?;
                rep.repaired += 1;
            }
        }
        for id in self.list_images()? {
            if self.get_manifest(id)?.is_none() {
                rep.bad_manifests_removed += 1;
            }
        }
        Ok(rep)
    }
}
