//! Pins: images whose chunks are never evicted. Persistent pins live in
//! the index; [`PinGuard`]s last as long as the guard.

use std::collections::{HashMap, HashSet};

use tracing::warn;

use super::lru::release_one;
use super::ChunkStore;
use crate::error::Result;
use crate::ids::{ChunkId, ImageId};

impl ChunkStore {
    /// Rebuild the set of chunks protected by pinned images.
    pub(super) fn recompute_pinned(&self) -> Result<()> {
        let _serial = self.inner.repin.lock().unwrap_or_else(|p| p.into_inner());
        let pinned: HashSet<ImageId> = {
            let st = self.state();
            st.persistent_pins
                .iter()
                .chain(st.temp_pins.keys())
                .copied()
                .collect()
        };
        let mut set: HashMap<ChunkId, u32> = HashMap::new();
        for img in pinned {
            if let Some(m) = self.get_manifest(img)? {
                for c in m.manifest().unique_chunks() {
                    *set.entry(c.id).or_default() += 1;
                }
            }
        }
        self.state().pinned_chunks = set;
        Ok(())
    }

    /// Pin an image persistently (survives restarts): its chunks are never
    /// evicted. Works before its manifest is stored.
    pub fn pin(&self, image: ImageId) -> Result<()> {
        self.write(0, true, move |t| {
            t.pins
                .insert(image.0, &[][..])
                .map(|_| ())
                .map_err(|e| t.err(e))
        })?;
        let new = self.state().persistent_pins.insert(image);
        if new {
            self.recompute_pinned()?;
        }
        Ok(())
    }

    /// Remove a persistent pin.
    pub fn unpin(&self, image: ImageId) -> Result<()> {
        self.write(0, false, move |t| {
            t.pins.remove(image.0).map(|_| ()).map_err(|e| t.err(e))
        })?;
        let had = self.state().persistent_pins.remove(&image);
        if had {
            self.recompute_pinned()?;
        }
        Ok(())
    }

    /// Pin an image for as long as the guard lives (image in use by a VM,
    /// being fetched, being seeded). Not persisted.
    pub fn pin_temp(&self, image: ImageId) -> Result<PinGuard> {
        let first = {
            let mut st = self.state();
            let n = st.temp_pins.entry(image).or_default();
            *n += 1;
            *n == 1
        };
        if first {
            self.recompute_pinned()?;
        }
        Ok(PinGuard {
            store: self.clone(),
            image,
        })
    }

    /// Pinned persistently or by a live [`PinGuard`].
    pub fn is_pinned(&self, image: ImageId) -> bool {
        self.state().is_pinned_image(&image)
    }
}

/// Keeps an image pinned while alive. See [`ChunkStore::pin_temp`].
pub struct PinGuard {
    store: ChunkStore,
    image: ImageId,
}

impl PinGuard {
    /// The pinned image.
    pub fn image(&self) -> ImageId {
        self.image
    }
}

impl std::fmt::Debug for PinGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PinGuard").field(&self.image).finish()
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let last = {
            let mut st = self.store.state();
            release_one(&mut st.temp_pins, &self.image);
            !st.temp_pins.contains_key(&self.image)
        };
        if last {
            if let Err(e) = self.store.recompute_pinned() {
                warn!(image = %self.image, error = %e, "recomputing pins after unpin failed");
            }
        }
    }
}
