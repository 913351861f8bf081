//! Space reserved for guest disks, counted against the store's cap.
//!
//! A materialised guest disk lives outside the chunk files but on the
//! seller's disk all the same; while its [`Reservation`] lives, the store
//! keeps that many bytes free under the cap, evicting chunks to make room.

use super::ChunkStore;
use crate::error::{Error, Result};

/// Bytes held against the store's cap; released on drop.
#[must_use = "the space is released when the reservation is dropped"]
pub struct Reservation {
    store: ChunkStore,
    bytes: u64,
}

impl Reservation {
    /// Bytes reserved.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Reservation").field(&self.bytes).finish()
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut st = self.store.state();
        st.reserved = st.reserved.saturating_sub(self.bytes);
    }
}

impl ChunkStore {
    /// Reserve `bytes` under the cap for `what` (e.g. "materialising a guest
    /// disk"), evicting unpinned chunks as needed. Fails with
    /// [`Error::DiskCapExceeded`] if pinned chunks and other reservations
    /// leave too little room; nothing is evicted then.
    pub fn reserve(&self, bytes: u64, what: &'static str) -> Result<Reservation> {
        let mut st = self.state();
        let over = st.over_cap(self.inner.cap, bytes);
        if over > 0 {
            let victims = st.victims(over).map_err(|short| Error::DiskCapExceeded {
                path: self.inner.path.clone(),
                what,
                needed: short,
                cap: self.inner.cap,
            })?;
            self.drop_chunks(&mut st, &victims)?;
        }
        st.reserved += bytes;
        Ok(Reservation {
            store: self.clone(),
            bytes,
        })
    }
}
