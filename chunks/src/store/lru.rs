//! Size accounting and LRU eviction.
//!
//! Access recency is kept in memory (a logical clock) and saved to the
//! `recency` file on [`ChunkStore::flush`] (see [`super::recency`]); after a
//! crash the order is slightly stale, which only affects which unpinned chunk
//! goes first. Chunks of pinned images and
//! chunks an import is writing are never evicted.

use std::collections::{BTreeSet, HashMap, HashSet};

use tracing::{debug, warn};

use super::ChunkStore;
use crate::error::{Error, Result};
use crate::ids::{ChunkId, ImageId};

#[derive(Clone, Copy)]
pub(super) struct Entry {
    pub(super) size: u32,
    pub(super) tick: u64,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) entries: HashMap<ChunkId, Entry>,
    pub(super) lru: BTreeSet<(u64, ChunkId)>,
    /// Chunk payload bytes.
    pub(super) size: u64,
    /// Bytes reserved for guest disks.
    pub(super) reserved: u64,
    pub(super) tick: u64,
    pub(super) persistent_pins: HashSet<ImageId>,
    pub(super) temp_pins: HashMap<ImageId, u32>,
    /// Chunk -> number of pinned images using it.
    pub(super) pinned_chunks: HashMap<ChunkId, u32>,
    /// Chunk -> number of in-progress imports holding it.
    pub(super) holds: HashMap<ChunkId, u32>,
    /// An access tick changed since the last flush.
    pub(super) dirty: bool,
    pub(super) bad_removed: u64,
}

impl State {
    /// Bytes counted against the cap.
    pub(super) fn used(&self) -> u64 {
        self.size.saturating_add(self.reserved)
    }

    /// Bytes over the cap if `more` were added.
    pub(super) fn over_cap(&self, cap: u64, more: u64) -> u64 {
        self.used().saturating_add(more).saturating_sub(cap)
    }

    pub(super) fn touch(&mut self, id: ChunkId) {
        self.tick += 1;
        let t = self.tick;
        if let Some(e) = self.entries.get_mut(&id) {
            self.lru.remove(&(e.tick, id));
            e.tick = t;
            self.dirty = true;
            self.lru.insert((t, id));
        }
    }

    pub(super) fn insert(&mut self, id: ChunkId, size: u32, tick: u64) {
        if let Some(old) = self.entries.insert(id, Entry { size, tick }) {
            self.lru.remove(&(old.tick, id));
            self.size -= old.size as u64;
        }
        self.lru.insert((tick, id));
        self.size += size as u64;
        self.tick = self.tick.max(tick);
    }

    /// Move a chunk to access time `tick` if that is later than its own.
    pub(super) fn raise_tick(&mut self, id: ChunkId, tick: u64) {
        if let Some(e) = self.entries.get_mut(&id) {
            if tick > e.tick {
                self.lru.remove(&(e.tick, id));
                e.tick = tick;
                self.lru.insert((tick, id));
                self.tick = self.tick.max(tick);
            }
        }
    }

    pub(super) fn remove(&mut self, id: &ChunkId) {
        if let Some(old) = self.entries.remove(id) {
            self.lru.remove(&(old.tick, *id));
            self.size -= old.size as u64;
        }
    }

    pub(super) fn is_pinned_image(&self, id: &ImageId) -> bool {
        self.persistent_pins.contains(id) || self.temp_pins.contains_key(id)
    }

    fn protected(&self, id: &ChunkId) -> bool {
        self.pinned_chunks.contains_key(id) || self.holds.contains_key(id)
    }

    /// The oldest unprotected chunks that together free `need` bytes;
    /// `Err(short)` with the bytes that cannot be freed.
    pub(super) fn victims(&self, need: u64) -> std::result::Result<Vec<ChunkId>, u64> {
        let mut victims = Vec::new();
        let mut freed = 0u64;
        for (_, id) in self.lru.iter() {
            if freed >= need {
                break;
            }
            if self.protected(id) {
                continue;
            }
            freed += self.entries[id].size as u64;
            victims.push(*id);
        }
        if freed < need {
            return Err(need - freed);
        }
        Ok(victims)
    }
}

pub(super) fn meta_value(size: u32, tick: u64) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&size.to_le_bytes());
    v[4..].copy_from_slice(&tick.to_le_bytes());
    v
}

pub(super) fn parse_meta(v: &[u8]) -> Option<(u32, u64)> {
    if v.len() != 12 {
        return None;
    }
    Some((
        u32::from_le_bytes(v[..4].try_into().ok()?),
        u64::from_le_bytes(v[4..].try_into().ok()?),
    ))
}

pub(super) fn release_one<K: std::hash::Hash + Eq + Copy>(m: &mut HashMap<K, u32>, k: &K) {
    if let Some(n) = m.get_mut(k) {
        *n -= 1;
        if *n == 0 {
            m.remove(k);
        }
    }
}

impl ChunkStore {
    pub(super) fn store_full(&self, needed: u64) -> Error {
        Error::StoreFull {
            path: self.inner.path.clone(),
            needed,
            cap: self.inner.cap,
        }
    }

    /// Free at least `need` bytes by evicting unprotected chunks, oldest first.
    pub(super) fn evict_locked(&self, st: &mut State, need: u64) -> Result<()> {
        let victims = st.victims(need).map_err(|n| self.store_full(n))?;
        self.drop_chunks(st, &victims)
    }

    /// Remove chunks: their index entries first (one atomic batch), then
    /// their files, so the space is free when this returns. A crash between
    /// the two leaves files without entries, which the next open adopts.
    pub(super) fn drop_chunks(&self, st: &mut State, ids: &[ChunkId]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let keys: Vec<[u8; 32]> = ids.iter().map(|v| v.0).collect();
        self.write(0, false, move |t| {
            let mut b = sled::Batch::default();
            for k in &keys {
                b.remove(&k[..]);
            }
            t.meta.apply_batch(b).map_err(|e| t.err(e))
        })?;
        self.unlink_evicted(st, ids);
        Ok(())
    }

    /// Delete the files of chunks whose index entries are gone.
    pub(super) fn unlink_evicted(&self, st: &mut State, ids: &[ChunkId]) {
        for id in ids {
            st.remove(id);
            if let Err(e) = self.inner.files.remove(id) {
                // The entry is gone; the next open finds and adopts the file.
                warn!(chunk = %id.short(), error = %e, "deleting an evicted chunk file failed");
            }
            debug!(chunk = %id.short(), "evicted");
        }
    }
}
