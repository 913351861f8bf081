//! Chunks and manifests in and out.

use tracing::warn;

use super::lru::{meta_value, release_one};
use super::{free_bytes, ChunkStore, ImageInfo, DISK_RESERVE};
use crate::chunking::MAX_CHUNK;
use crate::error::{Error, Result};
use crate::ids::{ChunkId, ImageId};
use crate::manifest::SignedManifest;

/// Index bytes logged per chunk written (key + meta value).
const META_LOGGED: u64 = 44;

impl ChunkStore {
    /// Store a chunk after checking that `bytes` hash to `id`. On mismatch
    /// nothing is stored and [`Error::ChunkHashMismatch`] is returned.
    /// Evicts least-recently-used unpinned chunks to stay under the cap.
    /// Returns `true` if the chunk was new, `false` if it was already there.
    ///
    /// Durable: when this returns `Ok`, the chunk survives `kill -9` and a
    /// power cut (file and directory fsynced, index flushed), so a restarted
    /// fetch never downloads it again.
    pub fn put_chunk(&self, id: &ChunkId, bytes: &[u8]) -> Result<bool> {
        let new = self.put_chunk_with(id, bytes, false, false, true)?;
        if new {
            self.inner.files.sync_dirs()?;
            self.write(0, true, |_| Ok(()))?;
        }
        Ok(new)
    }

    /// `verified`: caller hashed `bytes` itself. `hold`: protect the chunk
    /// from eviction until [`ChunkStore::release_holds`]. Not durable until
    /// the next [`ChunkStore::flush`] or [`ChunkStore::put_manifest`] (an
    /// import's chunks are made durable together, before its manifest).
    pub(crate) fn put_chunk_inner(
        &self,
        id: &ChunkId,
        bytes: &[u8],
        verified: bool,
        hold: bool,
    ) -> Result<bool> {
        self.put_chunk_with(id, bytes, verified, hold, false)
    }

    /// `sync_file`: fsync the chunk's file before it goes in place.
    fn put_chunk_with(
        &self,
        id: &ChunkId,
        bytes: &[u8],
        verified: bool,
        hold: bool,
        sync_file: bool,
    ) -> Result<bool> {
        if bytes.len() > MAX_CHUNK as usize {
            return Err(Error::ChunkTooLarge {
                size: bytes.len(),
                max: MAX_CHUNK as usize,
            });
        }
        if !verified {
            let actual = ChunkId::of(bytes);
            if actual != *id {
                return Err(Error::ChunkHashMismatch {
                    expected: *id,
                    actual,
                });
            }
        }
        let present = |st: &mut super::lru::State| {
            if !st.entries.contains_key(id) {
                return false;
            }
            if hold {
                *st.holds.entry(*id).or_default() += 1;
            }
            st.touch(*id);
            true
        };
        if present(&mut self.state()) {
            return Ok(false);
        }
        let size = bytes.len() as u64;
        // sled does not recover from ENOSPC mid-write (it stalls), so refuse
        // before the filesystem is full.
        if let Some(free) = free_bytes(&self.inner.path) {
            if free < size + DISK_RESERVE {
                return Err(Error::DiskFull {
                    what: "writing chunk store",
                    path: self.inner.path.clone(),
                });
            }
        }
        // The slow part (write + fsync) runs unlocked, beside other writers.
        let staged = self.inner.files.stage(bytes, sync_file)?;
        let mut st = self.state();
        if present(&mut st) {
            return Ok(false);
        }
        let over = st.over_cap(self.inner.cap, size);
        let victims = if over > 0 {
            st.victims(over).map_err(|n| self.store_full(n))?
        } else {
            Vec::new()
        };
        // The file goes in place under the lock, so an eviction of the same
        // id (also under the lock) cannot delete it behind our entry.
        self.inner.files.install(staged, id)?;
        let tick = st.tick + 1;
        let meta = meta_value(bytes.len() as u32, tick);
        let (key, gone) = (id.0, victims.iter().map(|v| v.0).collect::<Vec<_>>());
        // Evictions and the new entry in one atomic batch.
        let res = self.write(META_LOGGED * (1 + gone.len() as u64), false, move |t| {
            let mut b = sled::Batch::default();
            for k in &gone {
                b.remove(&k[..]);
            }
            b.insert(&key[..], &meta[..]);
            t.meta.apply_batch(b).map_err(|e| t.err(e))
        });
        if let Err(e) = res {
            // No entry: the file must not linger, uncounted.
            let _ = self.inner.files.remove(id);
            return Err(e);
        }
        self.unlink_evicted(&mut st, &victims);
        st.tick = tick;
        st.insert(*id, bytes.len() as u32, tick);
        if hold {
            *st.holds.entry(*id).or_default() += 1;
        }
        Ok(true)
    }

    #[cfg(test)]
    pub(crate) fn no_holds(&self) -> bool {
        self.state().holds.is_empty()
    }

    pub(crate) fn release_holds(&self, ids: &[ChunkId]) {
        let mut st = self.state();
        for id in ids {
            release_one(&mut st.holds, id);
        }
    }

    /// Read a chunk, verified against its id. A chunk whose bytes do not
    /// match is deleted, logged and counted ([`ChunkStore::bad_chunks_removed`])
    /// and reported as absent (`Ok(None)`), so it is fetched again.
    pub fn get_chunk(&self, id: &ChunkId) -> Result<Option<Vec<u8>>> {
        match self.inner.files.read(id)? {
            Some(v) if v.len() <= MAX_CHUNK as usize && ChunkId::of(&v) == *id => {
                self.state().touch(*id);
                Ok(Some(v))
            }
            Some(_) => {
                warn!(chunk = %id, path = %self.inner.path.display(), "chunk failed verification on read; deleted");
                let mut st = self.state();
                self.drop_chunks(&mut st, &[*id])?;
                st.bad_removed += 1;
                Ok(None)
            }
            None => {
                let mut st = self.state();
                // An entry without a file (deleted behind our back): drop it.
                // Under the lock an entry always has its file in place.
                if st.entries.contains_key(id) && !self.inner.files.exists(id) {
                    warn!(chunk = %id, "chunk file missing; forgotten");
                    self.drop_chunks(&mut st, &[*id])?;
                }
                Ok(None)
            }
        }
    }

    /// Store a verified manifest (idempotent, durable). Returns its image id.
    /// Chunks written before it are made durable first, so a manifest never
    /// survives a power cut that its imported chunks do not.
    pub fn put_manifest(&self, m: &SignedManifest) -> Result<ImageId> {
        self.inner.files.sync_dirs()?;
        let id = m.image_id();
        let b = m.as_bytes().to_vec();
        self.write(b.len() as u64, true, move |t| {
            t.manifests
                .insert(id.0, b)
                .map(|_| ())
                .map_err(|e| t.err(e))
        })?;
        if self.state().is_pinned_image(&id) {
            self.recompute_pinned()?;
        }
        Ok(id)
    }

    /// Load and re-verify a manifest. One that no longer verifies is deleted
    /// and reported as absent.
    pub fn get_manifest(&self, id: ImageId) -> Result<Option<SignedManifest>> {
        let got = self.inner.trees.manifests.get(id.0);
        let Some(b) = got.map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        match SignedManifest::decode_for(id, &b) {
            Ok(m) => Ok(Some(m)),
            Err(e) => {
                warn!(image = %id, error = %e, "stored manifest failed verification; deleted");
                self.write(0, false, move |t| {
                    t.manifests.remove(id.0).map(|_| ()).map_err(|e| t.err(e))
                })?;
                Ok(None)
            }
        }
    }

    fn require_manifest(&self, id: ImageId) -> Result<SignedManifest> {
        self.get_manifest(id)?.ok_or(Error::UnknownImage(id))
    }

    /// Ids of all images with a manifest in the store.
    pub fn list_images(&self) -> Result<Vec<ImageId>> {
        let mut out = Vec::new();
        for k in self.inner.trees.manifests.iter().keys() {
            let k = k.map_err(|e| self.err(e))?;
            if let Some(id) = ImageId::from_slice(&k) {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Forget an image's manifest and its persistent pin. Its chunks stay
    /// until evicted (other images may share them).
    pub fn remove_image(&self, id: ImageId) -> Result<bool> {
        let had = self.write(0, false, move |t| {
            t.manifests
                .remove(id.0)
                .map(|o| o.is_some())
                .map_err(|e| t.err(e))
        })?;
        self.unpin(id)?;
        Ok(had)
    }

    /// Summary of an image: size, how much of it is present, pinned or not.
    pub fn image_info(&self, id: ImageId) -> Result<ImageInfo> {
        let m = self.require_manifest(id)?;
        let man = m.manifest();
        let st = self.state();
        let uniq = man.unique_chunks();
        let present_chunks = uniq
            .iter()
            .filter(|c| st.entries.contains_key(&c.id))
            .count();
        let present_bytes = man
            .chunks
            .iter()
            .filter(|c| st.entries.contains_key(&c.id))
            .map(|c| c.size as u64)
            .sum();
        Ok(ImageInfo {
            id,
            name: man.name.clone(),
            format: man.format,
            total_size: man.total_size,
            unique_chunks: uniq.len(),
            present_chunks,
            present_bytes,
            pinned: st.is_pinned_image(&id),
        })
    }

    /// Distinct chunks of `image` not in the store, in image order. Errors
    /// with [`Error::UnknownImage`] if the manifest is not stored.
    pub fn missing_chunks(&self, image: ImageId) -> Result<Vec<ChunkId>> {
        let m = self.require_manifest(image)?;
        let st = self.state();
        Ok(m.manifest()
            .unique_chunks()
            .into_iter()
            .filter(|c| !st.entries.contains_key(&c.id))
            .map(|c| c.id)
            .collect())
    }

    /// All chunks of `image` present.
    pub fn is_complete(&self, image: ImageId) -> Result<bool> {
        Ok(self.missing_chunks(image)?.is_empty())
    }

    /// Persist access times, make chunk renames durable and flush the
    /// index to disk (fsync). Access times go to the `recency` file, not to
    /// sled (see [`super::recency`]), so reading an image never grows the index.
    pub fn flush(&self) -> Result<()> {
        self.inner.files.sync_dirs()?;
        // One save at a time, so an older snapshot never lands after a newer one.
        let _one = self.inner.recency.lock().unwrap_or_else(|p| p.into_inner());
        let ticks: Option<Vec<(ChunkId, u64)>> = {
            let mut st = self.state();
            std::mem::take(&mut st.dirty)
                .then(|| st.entries.iter().map(|(id, e)| (*id, e.tick)).collect())
        };
        if let Some(ticks) = ticks {
            // Advisory: a failed save costs only LRU order after a restart.
            if let Err(e) = super::recency::save(&self.inner.path, &ticks) {
                warn!(path = %self.inner.path.display(), error = %e, "saving the chunk store's access order failed");
                self.state().dirty = true;
            }
        }
        self.write(0, true, |_| Ok(()))
    }
}
