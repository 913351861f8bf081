//! The chunk store: verified chunks as content-addressed files, sled as
//! the index, one size cap (chunks plus guest disks) with LRU eviction.
//!
//! # Layout
//! - `chunks/ab/abcdef…`: one file per chunk, named by its BLAKE3 id (hex),
//!   fanned out by the id's first byte. Deleting a file frees its space at
//!   once, so the bytes on disk follow the cap (see [`files`]).
//! - `tmp/`: chunk files being written (emptied at open).
//! - `recency`: the LRU order (chunk id -> last-access tick), one flat file
//!   rewritten on flush ([`recency`]).
//! - `index/`: a sled database with small values only:
//!   `meta` (chunk id -> size u32 LE + the tick it was stored at, u64 LE),
//!   `manifests` (image id -> encoded signed manifest), `pins` (image id ->
//!   empty, persistent pins) and `layout` (format marker).
//!
//! Stores of the previous layout (chunk payloads inside sled, whose files
//! grew to ~7 x the cap under churn) are converted at open ([`migrate`]).
//!
//! # Crash safety
//! A chunk is written to `tmp/` and renamed into place before its `meta`
//! entry is written; eviction removes the `meta` entries, then the files.
//! A chunk from a peer ([`ChunkStore::put_chunk`]) is fsynced before the
//! rename and its directory after it; an import's chunks are made durable
//! together (one `syncfs`) before its manifest is stored. At open the index and the files are reconciled: a file without an
//! entry is adopted, an entry without a file is dropped, so after `kill -9`
//! the size accounting matches the files present. Every read re-hashes the
//! chunk: bytes that do not match their id are deleted and never returned.
//!
//! # The cap
//! [`ChunkStore::cap_bytes`] bounds chunk payload plus the space reserved
//! for guest disks ([`ChunkStore::reserve`], taken by
//! [`crate::materialize::materialize_reserved`] while the disk lives).
//! Room is made by evicting least-recently-used chunks that no pinned image
//! (persistent pins and [`PinGuard`]s) and no running import needs.
//!
//! # Modules
//! [`files`] (chunk files), [`writer`] (the single sled writer thread and its
//! stall watchdog), [`lru`] (accounting and eviction), [`pins`], [`reserve`]
//! (guest disk reservations), [`verify`] (open-time reconcile and
//! `verify_all`), [`migrate`] (old layout), [`api`] (chunks and manifests).

mod api;
mod files;
mod lru;
mod migrate;
mod pins;
mod recency;
mod reserve;
mod verify;
mod writer;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::warn;

use crate::error::{Error, Result};
use crate::ids::ImageId;
use crate::manifest::ImageFormat;

use files::Files;
use lru::State;
use writer::{Trees, Writer};

pub use pins::PinGuard;
pub use reserve::Reservation;
pub use verify::VerifyReport;
pub use writer::{LOG_WINDOW, STALL_LIMIT};

/// sled page cache size: the index is small.
const SLED_CACHE_BYTES: u64 = 16 << 20;

/// Cap meaning "no limit".
pub const UNLIMITED: u64 = u64::MAX;

/// Free space kept on the store's filesystem: sled needs room to write its
/// log and page snapshots and to compact; running it into ENOSPC poisons it
/// (every later read fails too until a restart).
pub const DISK_RESERVE: u64 = 16 << 20;

/// Summary of one stored image.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageInfo {
    /// The image.
    pub id: ImageId,
    /// Name from the manifest.
    pub name: String,
    /// Format from the manifest.
    pub format: ImageFormat,
    /// Image size in bytes.
    pub total_size: u64,
    /// Distinct chunks the image needs.
    pub unique_chunks: usize,
    /// Of those, how many are in the store.
    pub present_chunks: usize,
    /// Bytes of the image covered by present chunks (counting repeats).
    pub present_bytes: u64,
    /// Pinned (persistently or in use).
    pub pinned: bool,
}

impl ImageInfo {
    /// All chunks present.
    pub fn is_complete(&self) -> bool {
        self.present_chunks == self.unique_chunks
    }
}

/// The chunk store. Cheap to clone (shared handle); safe to use from many threads.
#[derive(Clone)]
pub struct ChunkStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ChunkStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

struct Inner {
    path: PathBuf,
    files: Files,
    /// Read side of the index (writes go through `writer`).
    trees: Trees,
    cap: u64,
    state: Mutex<State>,
    /// Serialises pinned-set rebuilds so the last one sees every pin change.
    repin: Mutex<()>,
    /// Serialises saves of the `recency` file.
    recency: Mutex<()>,
    writer: Writer,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.writer.shutdown();
    }
}

impl ChunkStore {
    /// Open (or create) the store in directory `path`, holding at most
    /// `cap_bytes` of chunks and guest disks ([`UNLIMITED`] for no cap).
    /// A store of the previous layout is converted first.
    ///
    /// Errors: [`Error::StoreLocked`] if another process has it open,
    /// [`Error::StoreCorrupt`] if sled cannot recover the index,
    /// [`Error::StoreOldLayout`] if an old store cannot be converted,
    /// [`Error::DiskFull`].
    pub fn open(path: impl AsRef<Path>, cap_bytes: u64) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        std::fs::create_dir_all(&path)
            .map_err(|e| Error::io("creating chunk store directory", &path, e))?;
        let trees = Trees::open(&path)?;
        // The index's lock is ours from here: no other process writes files.
        let files = Files::open(&path)?;
        migrate::convert_old_layout(&path, &files, &trees)?;
        let writer = Writer::start(trees.clone())?;
        let store = ChunkStore {
            inner: Arc::new(Inner {
                path,
                files,
                trees,
                cap: cap_bytes,
                state: Mutex::new(State::default()),
                repin: Mutex::new(()),
                recency: Mutex::new(()),
                writer,
            }),
        };
        store.load()?;
        // The cap may have been lowered since the last run.
        {
            let mut st = store.state();
            let over = st.used().saturating_sub(store.inner.cap);
            if over > 0 {
                if let Err(e) = store.evict_locked(&mut st, over) {
                    warn!(error = %e, "store is over its cap after open");
                }
            }
        }
        Ok(store)
    }

    fn err(&self, e: sled::Error) -> Error {
        Error::sled(&self.inner.path, e)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent-enough state
        // (every mutation is a few map operations); keep going.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Directory of the store.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Configured cap in bytes (chunks plus reserved guest disks).
    pub fn cap_bytes(&self) -> u64 {
        self.inner.cap
    }

    /// Bytes of chunk data stored (payload only; see [`ChunkStore::used_bytes`]
    /// for what counts against the cap).
    pub fn size_bytes(&self) -> u64 {
        self.state().size
    }

    /// Bytes counted against the cap: chunk payload plus reserved guest
    /// disks.
    pub fn used_bytes(&self) -> u64 {
        self.state().used()
    }

    /// Bytes reserved for guest disks now ([`ChunkStore::reserve`]).
    pub fn reserved_bytes(&self) -> u64 {
        self.state().reserved
    }

    /// Number of chunks stored.
    pub fn chunk_count(&self) -> usize {
        self.state().entries.len()
    }

    /// Chunks found corrupt on read and deleted since open.
    pub fn bad_chunks_removed(&self) -> u64 {
        self.state().bad_removed
    }

    /// Whether the chunk is in the store (its bytes are checked on read).
    pub fn has_chunk(&self, id: &crate::ids::ChunkId) -> bool {
        self.state().entries.contains_key(id)
    }
}

/// Bytes available to us on the filesystem holding `path`.
pub(crate) fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain old data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if r != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}
