//! The sled-backed chunk store: verified chunks, manifests, pins, a size cap
//! with LRU eviction.
//!
//! # Layout
//! One sled database with four trees:
//! - `chunks`: chunk id -> bytes
//! - `meta`: chunk id -> size (u32 LE) + last-access tick (u64 LE)
//! - `manifests`: image id -> encoded signed manifest
//! - `pins`: image id -> empty (persistent pins, e.g. images this node imported)
//!
//! # Crash safety
//! A chunk and its `meta` entry are written and removed in one sled
//! transaction, so after `kill -9` sled recovers a state where both or neither
//! exist, and the size accounting (sum of `meta` sizes, rebuilt at open) matches
//! the chunks present. sled may lose the last few hundred milliseconds of
//! writes; lost chunks simply show up in [`ChunkStore::missing_chunks`] again.
//! Independently of sled, every read re-hashes the chunk: bytes that do not
//! match their id are deleted and never returned.
//!
//! # Liveness (sled 0.34 IO deadlock)
//! sled 0.34.7 runs log-buffer writes and log-file truncations on one
//! process-wide pool of 7 IO threads. A writer that rolls into a new log
//! segment holds the segment accountant's lock in `bump_tip` while it waits
//! for a pending truncation; every buffer write ends by taking that same
//! lock. With 7 or more buffer writes queued ahead of the truncation, all
//! pool threads block on the lock and the truncation never runs: the store
//! hangs for good (spacejam/sled#1412; fixed upstream only after 0.34).
//! Evictions free segments at the file's end (queueing truncations) and an
//! unflushed import can queue any number of buffer writes, so this store:
//! - sends every sled write through one writer thread, which waits for the
//!   log to be on disk after each [`LOG_WINDOW`] of writes, so at most a few
//!   buffer writes of ours are ever queued;
//! - turns off sled's background flusher, whose segment cleaning rewrites
//!   pages in unbounded bursts; the writer flushes when idle instead;
//! - keeps a watchdog: a write that makes no progress for the stall limit
//!   (default [`STALL_LIMIT`]) fails with [`Error::StoreStalled`] and the
//!   store refuses further writes, so a daemon reports a clear error instead
//!   of hanging; a restart recovers (the store is `kill -9` safe).
//!
//! # Eviction
//! Access recency is kept in memory (a logical clock) and written to `meta` on
//! [`ChunkStore::flush`]; after a crash the order is slightly stale, which only
//! affects which unpinned chunk goes first. Chunks of pinned images (persistent
//! pins and [`PinGuard`]s) and chunks an import is writing are never evicted.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Duration;

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use tracing::{debug, error, warn};

use crate::chunking::MAX_CHUNK;
use crate::error::{Error, Result};
use crate::ids::{ChunkId, ImageId};
use crate::manifest::{ImageFormat, SignedManifest};

/// sled page cache size.
const SLED_CACHE_BYTES: u64 = 64 << 20;

/// Bytes of sled writes after which the writer waits for the log to reach
/// the disk before the next write: two of sled's 512 KiB log segments (its
/// default size, which this store uses). So at most about four log-buffer
/// writes of this store sit in sled's IO queue at a time, well under the 7
/// IO threads whose exhaustion is the deadlock (see "Liveness"); a larger
/// window buys little import speed.
pub const LOG_WINDOW: u64 = 1 << 20;

/// Log bytes counted per write on top of its payload (keys, headers).
const WRITE_OVERHEAD: u64 = 256;

/// The writer flushes sled after this long without a write.
const IDLE_FLUSH: Duration = Duration::from_millis(500);

/// Default time a store write may make no progress before the store
/// declares itself stalled.
pub const STALL_LIMIT: Duration = Duration::from_secs(60);

/// Cap meaning "no limit".
pub const UNLIMITED: u64 = u64::MAX;

/// Result of [`ChunkStore::verify_all`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    /// Chunks whose bytes match their id.
    pub ok: u64,
    /// Chunks that did not match (or had a malformed key) and were deleted.
    pub bad_removed: u64,
    /// Bookkeeping entries repaired (meta without chunk, chunk without meta).
    pub repaired: u64,
    /// Manifests that failed to verify and were deleted.
    pub bad_manifests_removed: u64,
}

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
    chunks: sled::Tree,
    meta: sled::Tree,
    manifests: sled::Tree,
    pins: sled::Tree,
    cap: u64,
    state: Mutex<State>,
    /// Serialises pinned-set rebuilds so the last one sees every pin change.
    repin: Mutex<()>,
    writer: Writer,
}

/// The sled handles, as the writer thread uses them.
#[derive(Clone)]
struct Trees {
    path: PathBuf,
    db: sled::Db,
    chunks: sled::Tree,
    meta: sled::Tree,
    manifests: sled::Tree,
    pins: sled::Tree,
}

impl Trees {
    fn err(&self, e: sled::Error) -> Error {
        Error::sled(&self.path, e)
    }

    fn txn_err(&self, e: TransactionError<()>) -> Error {
        match e {
            TransactionError::Storage(e) => self.err(e),
            TransactionError::Abort(()) => Error::Store {
                path: self.path.clone(),
                detail: "transaction aborted".into(),
            },
        }
    }

    /// Remove chunks and their `meta` entries in one transaction.
    fn remove_chunks(&self, ids: &[[u8; 32]]) -> Result<()> {
        (&self.chunks, &self.meta)
            .transaction(|(c, m)| {
                for k in ids {
                    c.remove(&k[..])?;
                    m.remove(&k[..])?;
                }
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(|e| self.txn_err(e))
    }
}

/// A unit of work for the writer thread; `&mut u64` is the log backlog.
type Job = Box<dyn FnOnce(&Trees, &mut u64) + Send>;

/// The single thread that performs every sled write of a store.
struct Writer {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    stalled: AtomicBool,
    stall_limit_ms: AtomicU64,
    /// Jobs the writer has finished: a caller that waits long only calls
    /// the store stalled if this stood still all the while.
    done: Arc<AtomicU64>,
    /// Most log bytes ever written and not yet flushed.
    peak_backlog: Arc<AtomicU64>,
}

impl Writer {
    fn start(trees: Trees) -> Result<Writer> {
        let (tx, rx) = mpsc::channel::<Job>();
        let path = trees.path.clone();
        let done = Arc::new(AtomicU64::new(0));
        let peak_backlog = Arc::new(AtomicU64::new(0));
        let (d, pb) = (done.clone(), peak_backlog.clone());
        let thread = std::thread::Builder::new()
            .name("chunk-store-writer".into())
            .spawn(move || writer_loop(trees, rx, &d, &pb))
            .map_err(|e| Error::io("starting the chunk store writer thread", path, e))?;
        Ok(Writer {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            stalled: AtomicBool::new(false),
            stall_limit_ms: AtomicU64::new(STALL_LIMIT.as_millis() as u64),
            done,
            peak_backlog,
        })
    }
}

fn writer_loop(t: Trees, rx: mpsc::Receiver<Job>, done: &AtomicU64, peak: &AtomicU64) {
    let mut backlog = 0u64;
    loop {
        let job = if backlog > 0 {
            match rx.recv_timeout(IDLE_FLUSH) {
                Ok(j) => j,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // Idle: put what was written on disk, as sled's own
                    // flusher would have.
                    // On failure the next write's flush reports it.
                    if let Err(e) = t.db.flush() {
                        warn!(path = %t.path.display(), error = %e, "idle flush of the chunk store failed");
                    }
                    backlog = 0;
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(j) => j,
                Err(_) => break,
            }
        };
        // A panicking job (sled panics on some corruption) drops its reply
        // channel, which its caller reports; keep serving the others.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&t, &mut backlog)));
        done.fetch_add(1, Ordering::SeqCst);
        peak.fetch_max(backlog, Ordering::Relaxed);
    }
    if backlog > 0 {
        if let Err(e) = t.db.flush() {
            warn!(path = %t.path.display(), error = %e, "final flush of the chunk store failed");
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue ends the writer; wait for it (it flushes and
        // lets go of sled) unless it is stuck inside sled.
        drop(
            self.writer
                .tx
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        if !self.writer.stalled.load(Ordering::SeqCst) {
            let h = self
                .writer
                .thread
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(h) = h {
                let _ = h.join();
            }
        }
    }
}

#[derive(Clone, Copy)]
struct Entry {
    size: u32,
    tick: u64,
}

#[derive(Default)]
struct State {
    entries: HashMap<ChunkId, Entry>,
    lru: BTreeSet<(u64, ChunkId)>,
    size: u64,
    tick: u64,
    persistent_pins: HashSet<ImageId>,
    temp_pins: HashMap<ImageId, u32>,
    /// Chunk -> number of pinned images using it.
    pinned_chunks: HashMap<ChunkId, u32>,
    /// Chunk -> number of in-progress imports holding it.
    holds: HashMap<ChunkId, u32>,
    /// Chunks whose access tick changed since the last flush.
    dirty: HashSet<ChunkId>,
    bad_removed: u64,
}

impl State {
    fn touch(&mut self, id: ChunkId) {
        self.tick += 1;
        let t = self.tick;
        if let Some(e) = self.entries.get_mut(&id) {
            self.lru.remove(&(e.tick, id));
            e.tick = t;
            self.dirty.insert(id);
            self.lru.insert((t, id));
        }
    }
    fn insert(&mut self, id: ChunkId, size: u32, tick: u64) {
        if let Some(old) = self.entries.insert(id, Entry { size, tick }) {
            self.lru.remove(&(old.tick, id));
            self.size -= old.size as u64;
        }
        self.lru.insert((tick, id));
        self.size += size as u64;
        self.tick = self.tick.max(tick);
    }
    fn remove(&mut self, id: &ChunkId) {
        if let Some(old) = self.entries.remove(id) {
            self.lru.remove(&(old.tick, *id));
            self.size -= old.size as u64;
        }
        self.dirty.remove(id);
    }
    fn is_pinned_image(&self, id: &ImageId) -> bool {
        self.persistent_pins.contains(id) || self.temp_pins.contains_key(id)
    }
    fn protected(&self, id: &ChunkId) -> bool {
        self.pinned_chunks.contains_key(id) || self.holds.contains_key(id)
    }
}

fn meta_value(size: u32, tick: u64) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&size.to_le_bytes());
    v[4..].copy_from_slice(&tick.to_le_bytes());
    v
}

fn parse_meta(v: &[u8]) -> Option<(u32, u64)> {
    if v.len() != 12 {
        return None;
    }
    Some((
        u32::from_le_bytes(v[..4].try_into().ok()?),
        u64::from_le_bytes(v[4..].try_into().ok()?),
    ))
}

impl ChunkStore {
    /// Open (or create) the store in directory `path`, holding at most
    /// `cap_bytes` of chunk data ([`UNLIMITED`] for no cap).
    ///
    /// Errors: [`Error::StoreLocked`] if another process has it open,
    /// [`Error::StoreCorrupt`] if sled cannot recover it, [`Error::DiskFull`].
    pub fn open(path: impl AsRef<Path>, cap_bytes: u64) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        std::fs::create_dir_all(&path)
            .map_err(|e| Error::io("creating chunk store directory", &path, e))?;
        // sled's default page cache is 1 GiB; a home seller's daemon should
        // not hold that much memory for chunks it mostly streams once.
        // No background flusher: its segment cleaning writes in bursts
        // nobody waits for (see "Liveness"); the writer thread flushes.
        let cfg = sled::Config::new()
            .path(&path)
            .cache_capacity(SLED_CACHE_BYTES)
            .flush_every_ms(None);
        // A store closed moments ago in this process may still be locked
        // for a short while (sled's IO threads finishing): retry briefly.
        let mut attempt = 0;
        let db = loop {
            // sled may panic on some on-disk garbage; report that as corruption.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cfg.open()))
                .map_err(|_| Error::StoreCorrupt {
                    path: path.clone(),
                    detail: "sled panicked while recovering it".into(),
                })?
                .map_err(|e| Error::sled(&path, e));
            match r {
                Err(Error::StoreLocked { .. }) if attempt < 20 => {
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                r => break r?,
            }
        };
        let tree = |name: &str| db.open_tree(name).map_err(|e| Error::sled(&path, e));
        let chunks = tree("chunks")?;
        let meta = tree("meta")?;
        let manifests = tree("manifests")?;
        let pins = tree("pins")?;
        let writer = Writer::start(Trees {
            path: path.clone(),
            db,
            chunks: chunks.clone(),
            meta: meta.clone(),
            manifests: manifests.clone(),
            pins: pins.clone(),
        })?;
        let store = ChunkStore {
            inner: Arc::new(Inner {
                path,
                chunks,
                meta,
                manifests,
                pins,
                cap: cap_bytes,
                state: Mutex::new(State::default()),
                repin: Mutex::new(()),
                writer,
            }),
        };
        store.load()?;
        // The cap may have been lowered since the last run.
        {
            let mut st = store.state();
            if st.size > store.inner.cap {
                let need = st.size - store.inner.cap;
                if let Err(e) = store.evict_locked(&mut st, need) {
                    warn!(error = %e, "store is over its cap after open");
                }
            }
        }
        Ok(store)
    }

    fn err(&self, e: sled::Error) -> Error {
        Error::sled(&self.inner.path, e)
    }

    /// Run `f` on the writer thread; `logged` is about how many bytes it
    /// writes to sled's log; `durable`: flush sled before answering. Fails
    /// with [`Error::StoreStalled`] if no answer comes within the stall limit.
    fn write<R: Send + 'static>(
        &self,
        logged: u64,
        durable: bool,
        f: impl FnOnce(&Trees) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let w = &self.inner.writer;
        let limit = Duration::from_millis(w.stall_limit_ms.load(Ordering::Relaxed));
        if w.stalled.load(Ordering::SeqCst) {
            return Err(self.stalled(limit));
        }
        let (rtx, rrx) = mpsc::sync_channel::<Result<R>>(1);
        let job: Job = Box::new(move |t: &Trees, backlog: &mut u64| {
            // Wait for earlier writes to reach the disk before queueing
            // more: this is what keeps sled's IO queue short.
            if *backlog >= LOG_WINDOW {
                if let Err(e) = t.db.flush() {
                    let _ = rtx.send(Err(t.err(e)));
                    return;
                }
                *backlog = 0;
            }
            let mut r = f(t);
            *backlog += logged + WRITE_OVERHEAD;
            if durable && r.is_ok() {
                match t.db.flush() {
                    Ok(_) => *backlog = 0,
                    Err(e) => r = Err(t.err(e)),
                }
            }
            let _ = rtx.send(r);
        });
        let sent = match w.tx.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(tx) => tx.send(job).is_ok(),
            None => false,
        };
        if !sent {
            return Err(Error::Store {
                path: self.inner.path.clone(),
                detail: "the store's writer thread is gone; restart cpushare-node".into(),
            });
        }
        let mut seen = w.done.load(Ordering::SeqCst);
        loop {
            match rrx.recv_timeout(limit) {
                Ok(r) => return r,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // Queued behind other writes that do finish: not stuck.
                    let now = w.done.load(Ordering::SeqCst);
                    if now != seen && !w.stalled.load(Ordering::SeqCst) {
                        seen = now;
                        continue;
                    }
                    break;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Error::Store {
                        path: self.inner.path.clone(),
                        detail: "sled panicked during a write; restart cpushare-node".into(),
                    })
                }
            }
        }
        if !w.stalled.swap(true, Ordering::SeqCst) {
            error!(
                path = %self.inner.path.display(),
                secs = limit.as_secs(),
                "chunk store write made no progress (sled stalled); refusing further writes until restart"
            );
        }
        Err(self.stalled(limit))
    }

    fn stalled(&self, limit: Duration) -> Error {
        Error::StoreStalled {
            path: self.inner.path.clone(),
            secs: limit.as_secs(),
        }
    }

    /// Whether a write stalled (see [`Error::StoreStalled`]); the store
    /// then refuses writes until the process restarts.
    pub fn is_stalled(&self) -> bool {
        self.inner.writer.stalled.load(Ordering::SeqCst)
    }

    /// How long a store write may make no progress before the store
    /// declares itself stalled (default [`STALL_LIMIT`]).
    pub fn set_stall_limit(&self, limit: Duration) {
        let ms = (limit.as_millis() as u64).max(1);
        self.inner
            .writer
            .stall_limit_ms
            .store(ms, Ordering::Relaxed);
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent-enough state
        // (every mutation is a few map operations); keep going.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn load(&self) -> Result<()> {
        let mut st = State::default();
        let mut bad_keys = Vec::new();
        for kv in self.inner.meta.iter() {
            let (k, v) = kv.map_err(|e| self.err(e))?;
            match (ChunkId::from_slice(&k), parse_meta(&v)) {
                (Some(id), Some((size, tick))) if size as usize <= MAX_CHUNK as usize => {
                    st.insert(id, size, tick)
                }
                _ => bad_keys.push(k),
            }
        }
        if !bad_keys.is_empty() {
            self.write(0, false, move |t| {
                for k in bad_keys {
                    t.meta.remove(k).map_err(|e| t.err(e))?;
                }
                Ok(())
            })?;
        }
        for k in self.inner.pins.iter().keys() {
            let k = k.map_err(|e| self.err(e))?;
            if let Some(id) = ImageId::from_slice(&k) {
                st.persistent_pins.insert(id);
            }
        }
        *self.state() = st;
        self.recompute_pinned()?;
        Ok(())
    }

    /// Rebuild the set of chunks protected by pinned images.
    fn recompute_pinned(&self) -> Result<()> {
        let _serial = self.inner.repin.lock().unwrap_or_else(|p| p.into_inner());
        let pinned: Vec<ImageId> = {
            let st = self.state();
            st.persistent_pins
                .iter()
                .chain(st.temp_pins.keys())
                .copied()
                .collect()
        };
        let mut set: HashMap<ChunkId, u32> = HashMap::new();
        for img in pinned.iter().collect::<HashSet<_>>() {
            if let Some(m) = self.get_manifest(*img)? {
                for c in m.manifest().unique_chunks() {
                    *set.entry(c.id).or_default() += 1;
                }
            }
        }
        self.state().pinned_chunks = set;
        Ok(())
    }

    /// Directory of the store.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Configured cap in bytes.
    pub fn cap_bytes(&self) -> u64 {
        self.inner.cap
    }

    /// Bytes of chunk data stored (payload only, not sled's overhead).
    pub fn size_bytes(&self) -> u64 {
        self.state().size
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
    pub fn has_chunk(&self, id: &ChunkId) -> bool {
        self.state().entries.contains_key(id)
    }

    /// Store a chunk after checking that `bytes` hash to `id`. On mismatch
    /// nothing is stored and [`Error::ChunkHashMismatch`] is returned.
    /// Evicts least-recently-used unpinned chunks to stay under the cap.
    /// Returns `true` if the chunk was new, `false` if it was already there.
    ///
    /// Durable: when this returns `Ok`, the chunk survives `kill -9` (sled is
    /// flushed, about a millisecond per chunk), so a restarted fetch never
    /// downloads it again.
    pub fn put_chunk(&self, id: &ChunkId, bytes: &[u8]) -> Result<bool> {
        let new = self.put_chunk_inner(id, bytes, false, false)?;
        if new {
            self.write(0, true, |_| Ok(()))?;
        }
        Ok(new)
    }

    /// `verified`: caller hashed `bytes` itself. `hold`: protect the chunk
    /// from eviction until [`ChunkStore::release_holds`].
    pub(crate) fn put_chunk_inner(
        &self,
        id: &ChunkId,
        bytes: &[u8],
        verified: bool,
        hold: bool,
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
        let mut st = self.state();
        if hold {
            *st.holds.entry(*id).or_default() += 1;
        }
        if st.entries.contains_key(id) {
            st.touch(*id);
            return Ok(false);
        }
        let size = bytes.len() as u64;
        // sled does not recover from ENOSPC mid-write (it stalls), so refuse
        // before the filesystem is full.
        if let Some(free) = free_bytes(&self.inner.path) {
            if free < size + DISK_RESERVE {
                if hold {
                    release_one(&mut st.holds, id);
                }
                return Err(Error::DiskFull {
                    what: "writing chunk store",
                    path: self.inner.path.clone(),
                });
            }
        }
        let victims = if st.size.saturating_add(size) > self.inner.cap {
            let need = st.size.saturating_add(size) - self.inner.cap;
            match self.victims(&st, need) {
                Ok(v) => v,
                Err(e) => {
                    if hold {
                        release_one(&mut st.holds, id);
                    }
                    return Err(e);
                }
            }
        } else {
            Vec::new()
        };
        let tick = st.tick + 1;
        let meta = meta_value(bytes.len() as u32, tick);
        // Evictions and the new chunk in one transaction: after a crash
        // either all happened or none did.
        let (key, data, gone) = (
            id.0,
            bytes.to_vec(),
            victims.iter().map(|v| v.0).collect::<Vec<_>>(),
        );
        let res = self.write(size, false, move |t| {
            (&t.chunks, &t.meta)
                .transaction(|(c, m)| {
                    for k in &gone {
                        c.remove(&k[..])?;
                        m.remove(&k[..])?;
                    }
                    c.insert(&key[..], &data[..])?;
                    m.insert(&key[..], &meta[..])?;
                    Ok::<_, ConflictableTransactionError<()>>(())
                })
                .map_err(|e| t.txn_err(e))
        });
        if let Err(e) = res {
            if hold {
                release_one(&mut st.holds, id);
            }
            return Err(e);
        }
        for v in &victims {
            st.remove(v);
            debug!(chunk = %v.short(), "evicted");
        }
        st.tick = tick;
        st.insert(*id, bytes.len() as u32, tick);
        Ok(true)
    }

    /// Free at least `need` bytes by evicting unprotected chunks, oldest first.
    fn evict_locked(&self, st: &mut State, need: u64) -> Result<()> {
        let victims = self.victims(st, need)?;
        let keys: Vec<[u8; 32]> = victims.iter().map(|v| v.0).collect();
        self.write(0, false, move |t| t.remove_chunks(&keys))?;
        for id in victims {
            st.remove(&id);
            debug!(chunk = %id.short(), "evicted");
        }
        Ok(())
    }

    /// The oldest unprotected chunks that together free `need` bytes.
    fn victims(&self, st: &State, need: u64) -> Result<Vec<ChunkId>> {
        let mut victims = Vec::new();
        let mut freed = 0u64;
        for (_, id) in st.lru.iter() {
            if freed >= need {
                break;
            }
            if st.protected(id) {
                continue;
            }
            freed += st.entries[id].size as u64;
            victims.push(*id);
        }
        if freed < need {
            return Err(Error::StoreFull {
                path: self.inner.path.clone(),
                needed: need - freed,
                cap: self.inner.cap,
            });
        }
        Ok(victims)
    }

    fn remove_chunk_records(&self, id: &ChunkId) -> Result<()> {
        let k = id.0;
        self.write(0, false, move |t| t.remove_chunks(&[k]))
    }

    /// Park the writer thread until the returned sender is dropped, the way
    /// a wedged sled call would.
    #[cfg(test)]
    fn block_writer(&self) -> mpsc::Sender<()> {
        let (tx, rx) = mpsc::channel::<()>();
        let job: Job = Box::new(move |_, _| {
            let _ = rx.recv();
        });
        let g = self.inner.writer.tx.lock().unwrap();
        g.as_ref().unwrap().send(job).unwrap();
        tx
    }

    /// Most bytes written to sled's log without waiting for the disk since
    /// open: about [`LOG_WINDOW`] plus one chunk at most (see "Liveness").
    pub fn peak_backlog(&self) -> u64 {
        self.inner.writer.peak_backlog.load(Ordering::Relaxed)
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
        let v = self.inner.chunks.get(id.0).map_err(|e| self.err(e))?;
        match v {
            None => {
                let mut st = self.state();
                if st.entries.contains_key(id) {
                    // meta without data (should not happen: they are written together)
                    let k = id.0;
                    self.write(0, false, move |t| {
                        t.meta.remove(k).map(|_| ()).map_err(|e| t.err(e))
                    })?;
                    st.remove(id);
                }
                Ok(None)
            }
            Some(v) => {
                if ChunkId::of(&v) != *id || v.len() > MAX_CHUNK as usize {
                    warn!(chunk = %id, path = %self.inner.path.display(), "chunk failed verification on read; deleted");
                    let mut st = self.state();
                    self.remove_chunk_records(id)?;
                    st.remove(id);
                    st.bad_removed += 1;
                    return Ok(None);
                }
                let mut st = self.state();
                if !st.entries.contains_key(id) {
                    // chunk without meta: adopt it so accounting stays right
                    let t = st.tick + 1;
                    let (k, mv) = (id.0, meta_value(v.len() as u32, t));
                    self.write(0, false, move |tr| {
                        tr.meta
                            .insert(k, &mv[..])
                            .map(|_| ())
                            .map_err(|e| tr.err(e))
                    })?;
                    st.insert(*id, v.len() as u32, t);
                }
                st.touch(*id);
                Ok(Some(v.to_vec()))
            }
        }
    }

    /// Store a verified manifest (idempotent, durable). Returns its image id.
    pub fn put_manifest(&self, m: &SignedManifest) -> Result<ImageId> {
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
        let Some(b) = self.inner.manifests.get(id.0).map_err(|e| self.err(e))? else {
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
        for k in self.inner.manifests.iter().keys() {
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

    /// Re-hash every chunk; delete those that do not match; repair
    /// bookkeeping; drop manifests that no longer verify.
    pub fn verify_all(&self) -> Result<VerifyReport> {
        let mut rep = VerifyReport::default();
        for kv in self.inner.chunks.iter() {
            let (k, v) = kv.map_err(|e| self.err(e))?;
            let good = ChunkId::from_slice(&k)
                .map(|id| ChunkId::of(&v) == id && v.len() <= MAX_CHUNK as usize)
                .unwrap_or(false);
            if good {
                rep.ok += 1;
                let id = ChunkId::from_slice(&k).expect("checked");
                let mut st = self.state();
                if !st.entries.contains_key(&id) {
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
            } else {
                warn!(key = %hex::encode(&k), "chunk failed verification; deleted");
                let mut st = self.state();
                let key = k.clone();
                self.write(0, false, move |t| {
                    (&t.chunks, &t.meta)
                        .transaction(|(c, m)| {
                            c.remove(&key)?;
                            m.remove(&key)?;
                            Ok::<_, ConflictableTransactionError<()>>(())
                        })
                        .map_err(|e| t.txn_err(e))
                })?;
                if let Some(id) = ChunkId::from_slice(&k) {
                    st.remove(&id);
                }
                st.bad_removed += 1;
                rep.bad_removed += 1;
            }
        }
        // meta entries whose chunk is gone
        let ids: Vec<ChunkId> = self.state().entries.keys().copied().collect();
        for id in ids {
            if !self
                .inner
                .chunks
                .contains_key(id.0)
                .map_err(|e| self.err(e))?
            {
                self.write(0, false, move |t| {
                    t.meta.remove(id.0).map(|_| ()).map_err(|e| t.err(e))
                })?;
                self.state().remove(&id);
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

    /// Persist access times and flush sled to disk (fsync).
    pub fn flush(&self) -> Result<()> {
        let dirty: Vec<(ChunkId, u32, u64)> = {
            let mut st = self.state();
            let ids = std::mem::take(&mut st.dirty);
            ids.into_iter()
                .filter_map(|id| st.entries.get(&id).map(|e| (id, e.size, e.tick)))
                .collect()
        };
        let logged = dirty.len() as u64 * 64;
        self.write(logged, true, move |t| {
            for (id, size, tick) in dirty {
                // Update only entries still present: an evicted chunk's
                // meta must not come back.
                t.meta
                    .fetch_and_update(id.0, |old| old.map(|_| meta_value(size, tick).to_vec()))
                    .map_err(|e| t.err(e))?;
            }
            Ok(())
        })
    }
}

/// Free space kept on the store's filesystem: sled needs room to write its
/// log, blobs and page snapshots and to compact, beyond the writes we can see
/// queued; running it into ENOSPC poisons it (every later read fails too until a
/// restart). 4 MiB was not always enough on a 12 MiB disk (1 import in ~25).
pub const DISK_RESERVE: u64 = 16 << 20;

/// Bytes available to us on the filesystem holding `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if r != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

fn release_one<K: std::hash::Hash + Eq + Copy>(m: &mut HashMap<K, u32>, k: &K) {
    if let Some(n) = m.get_mut(k) {
        *n -= 1;
        if *n == 0 {
            m.remove(k);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{ChunkRef, Manifest};
    use ed25519_dalek::SigningKey;
    use rand::{RngCore, SeedableRng};

    fn chunk(seed: u64, len: usize) -> (ChunkId, Vec<u8>) {
        let mut v = vec![0u8; len];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
        (ChunkId::of(&v), v)
    }

    fn manifest_of(chunks: &[(ChunkId, Vec<u8>)], name: &str) -> SignedManifest {
        let key = SigningKey::from_bytes(&[9; 32]);
        let refs = chunks
            .iter()
            .map(|(id, d)| ChunkRef {
                id: *id,
                size: d.len() as u32,
            })
            .collect();
        let m = Manifest::new(name, ImageFormat::Raw, refs, None, key.verifying_key());
        SignedManifest::sign(m, &key).unwrap()
    }

    #[test]
    fn put_get_and_verify_on_write() {
        let dir = tempfile::tempdir().unwrap();
        let s = ChunkStore::open(dir.path(), UNLIMITED).unwrap();
        let (id, data) = chunk(1, 5000);
        assert!(s.put_chunk(&id, &data).unwrap());
        assert!(!s.put_chunk(&id, &data).unwrap());
        assert!(s.has_chunk(&id));
        assert_eq!(s.get_chunk(&id).unwrap().unwrap(), data);
        assert_eq!(s.size_bytes(), 5000);

        // Wrong bytes for an id: rejected, nothing stored.
        let (id2, _) = chunk(2, 100);
        let e = s.put_chunk(&id2, &data).unwrap_err();
        assert!(matches!(e, Error::ChunkHashMismatch { expected, .. } if expected == id2));
        assert!(!s.has_chunk(&id2));
        assert!(s.inner.chunks.get(id2.0).unwrap().is_none());
        assert_eq!(s.size_bytes(), 5000);

        // Oversized chunk rejected.
        let big = vec![1u8; MAX_CHUNK as usize + 1];
        assert!(matches!(
            s.put_chunk(&ChunkId::of(&big), &big),
            Err(Error::ChunkTooLarge { .. })
        ));
        assert_eq!(s.get_chunk(&ChunkId([5; 32])).unwrap(), None);
    }

    #[test]
    fn garbage_under_chunk_key_is_never_returned() {
        let dir = tempfile::tempdir().unwrap();
        let (id, data) = chunk(3, 4096);
        let (id_b, data_b) = chunk(4, 4096);
        {
            let s = ChunkStore::open(dir.path(), UNLIMITED).unwrap();
            s.put_chunk(&id, &data).unwrap();
            s.put_chunk(&id_b, &data_b).unwrap();
            // In-process corruption straight through sled (as a torn write would leave it).
            let mut bad = data.clone();
            bad[100] ^= 0xff;
            s.inner.chunks.insert(id.0, bad).unwrap();
            assert_eq!(s.get_chunk(&id).unwrap(), None);
            assert!(!s.has_chunk(&id));
            assert_eq!(s.bad_chunks_removed(), 1);
            assert!(s.inner.chunks.get(id.0).unwrap().is_none());
            assert_eq!(s.size_bytes(), 4096);
            s.flush().unwrap();
        }
        // Corruption while the store is closed (another process wrote garbage).
        {
            let db = (0..100)
                .find_map(|_| {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    sled::open(dir.path()).ok()
                })
                .unwrap();
            let t = db.open_tree("chunks").unwrap();
            t.insert(id_b.0, &b"garbage"[..]).unwrap();
            t.insert(b"short-key", &b"x"[..]).unwrap();
            db.flush().unwrap();
        }
        let s = ChunkStore::open(dir.path(), UNLIMITED).unwrap();
        assert!(s.has_chunk(&id_b), "meta still lists it until read");
        assert_eq!(s.get_chunk(&id_b).unwrap(), None);
        assert!(!s.has_chunk(&id_b));
        let rep = s.verify_all().unwrap();
        assert_eq!(rep.ok, 0);
        assert_eq!(rep.bad_removed, 1, "the malformed key");
        assert_eq!(s.size_bytes(), 0);
        assert_eq!(s.chunk_count(), 0);
    }

    #[test]
    fn verify_all_counts_and_repairs() {
        let dir = tempfile::tempdir().unwrap();
        let s = ChunkStore::open(dir.path(), UNLIMITED).unwrap();
        let cs: Vec<_> = (0..6).map(|i| chunk(10 + i, 3000)).collect();
        for (id, d) in &cs {
            s.put_chunk(id, d).unwrap();
        }
        s.inner.chunks.insert(cs[0].0 .0, &b"bad"[..]).unwrap();
        s.inner.chunks.insert(cs[1].0 .0, &cs[2].1[..]).unwrap();
        // meta without chunk
        s.inner.chunks.remove(cs[3].0 .0).unwrap();
        let rep = s.verify_all().unwrap();
        assert_eq!(rep.ok, 3);
        assert_eq!(rep.bad_removed, 2);
        assert_eq!(rep.repaired, 1);
        assert_eq!(s.size_bytes(), 3 * 3000);
        assert_eq!(
            s.verify_all().unwrap(),
            VerifyReport {
                ok: 3,
                ..Default::default()
            }
        );
    }

    #[test]
    fn state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let cs: Vec<_> = (0..4).map(|i| chunk(20 + i, 2000 + i as usize)).collect();
        let m = manifest_of(&cs, "img");
        {
            let s = ChunkStore::open(dir.path(), UNLIMITED).unwrap();
            for (id, d) in &cs[..3] {
                s.put_chunk(id, d).unwrap();
            }
            s.put_manifest(&m).unwrap();
            s.pin(m.image_id()).unwrap();
            s.flush().unwrap();
        }
        let s = ChunkStore::open(dir.path(), UNLIMITED).unwrap();
        assert_eq!(s.size_bytes(), 2000 + 2001 + 2002);
        assert_eq!(s.list_images().unwrap(), vec![m.image_id()]);
        assert_eq!(s.get_manifest(m.image_id()).unwrap().unwrap(), m);
        assert!(s.is_pinned(m.image_id()));
        assert_eq!(s.missing_chunks(m.image_id()).unwrap(), vec![cs[3].0]);
        assert!(!s.is_complete(m.image_id()).unwrap());
        let info = s.image_info(m.image_id()).unwrap();
        assert_eq!((info.unique_chunks, info.present_chunks), (4, 3));
        s.put_chunk(&cs[3].0, &cs[3].1).unwrap();
        assert!(s.is_complete(m.image_id()).unwrap());
        assert!(matches!(
            s.missing_chunks(ImageId([1; 32])),
            Err(Error::UnknownImage(_))
        ));
    }

    #[test]
    fn tampered_stored_manifest_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let s = ChunkStore::open(dir.path(), UNLIMITED).unwrap();
        let m = manifest_of(&[chunk(1, 10)], "x");
        let id = s.put_manifest(&m).unwrap();
        let mut b = m.encode();
        b[20] ^= 1;
        s.inner.manifests.insert(id.0, b).unwrap();
        assert_eq!(s.get_manifest(id).unwrap(), None);
        assert!(s.list_images().unwrap().is_empty());
    }

    #[test]
    fn second_open_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let _s = ChunkStore::open(dir.path(), UNLIMITED).unwrap();
        let e = ChunkStore::open(dir.path(), UNLIMITED).unwrap_err();
        assert!(matches!(e, Error::StoreLocked { .. }), "{e:?}");
        assert!(e.to_string().contains("locked by another cpushare-node"));
    }

    #[test]
    fn corrupt_store_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = ChunkStore::open(dir.path(), UNLIMITED).unwrap();
            s.put_chunk(&chunk(1, 100).0, &chunk(1, 100).1).unwrap();
            s.flush().unwrap();
        }
        std::fs::write(dir.path().join("conf"), b"this is not a sled config").unwrap();
        let e = ChunkStore::open(dir.path(), UNLIMITED).unwrap_err();
        assert!(matches!(e, Error::StoreCorrupt { .. }), "{e:?}");
        assert!(e.to_string().contains("is corrupt"), "{e}");
        // Garbage over the whole data file: sled recovers nothing, and no
        // chunk is ever served from it.
        std::fs::remove_file(dir.path().join("conf")).unwrap();
        let db = dir.path().join("db");
        let len = std::fs::metadata(&db).unwrap().len() as usize;
        std::fs::write(&db, vec![0xa5u8; len]).unwrap();
        match ChunkStore::open(dir.path(), UNLIMITED) {
            Ok(s) => {
                assert_eq!(s.get_chunk(&chunk(1, 100).0).unwrap(), None);
                assert_eq!(s.verify_all().unwrap().ok, 0);
            }
            Err(e) => assert!(matches!(e, Error::StoreCorrupt { .. }), "{e:?}"),
        }
    }

    #[test]
    fn lru_eviction_respects_pins() {
        let dir = tempfile::tempdir().unwrap();
        let sz = 10_000usize;
        let s = ChunkStore::open(dir.path(), 10 * sz as u64).unwrap();
        let pinned: Vec<_> = (0..4).map(|i| chunk(100 + i, sz)).collect();
        let m = manifest_of(&pinned, "pinned");
        s.put_manifest(&m).unwrap();
        s.pin(m.image_id()).unwrap();
        for (id, d) in &pinned {
            s.put_chunk(id, d).unwrap();
        }
        let others: Vec<_> = (0..6).map(|i| chunk(200 + i, sz)).collect();
        for (id, d) in &others {
            s.put_chunk(id, d).unwrap();
        }
        assert_eq!(s.size_bytes(), 10 * sz as u64);
        // Touch others[0] so others[1] becomes the oldest unpinned chunk.
        s.get_chunk(&others[0].0).unwrap().unwrap();
        let (nid, nd) = chunk(300, sz);
        s.put_chunk(&nid, &nd).unwrap();
        assert!(!s.has_chunk(&others[1].0), "LRU unpinned chunk evicted");
        assert!(s.has_chunk(&others[0].0), "recently read chunk kept");
        assert!(pinned.iter().all(|(id, _)| s.has_chunk(id)));
        assert!(s.size_bytes() <= s.cap_bytes());

        // A temporary pin protects too.
        let m2 = manifest_of(&others[2..4], "temp");
        s.put_manifest(&m2).unwrap();
        let guard = s.pin_temp(m2.image_id()).unwrap();
        for i in 0..5 {
            let (id, d) = chunk(400 + i, sz);
            s.put_chunk(&id, &d).unwrap();
        }
        assert!(pinned.iter().all(|(id, _)| s.has_chunk(id)));
        assert!(s.has_chunk(&others[2].0) && s.has_chunk(&others[3].0));
        // Everything not pinned is recent now; with 6 pinned chunks the
        // store can hold 4 more; once all are pinned, a new chunk cannot fit.
        let m3 = manifest_of(
            &(0..5).map(|i| chunk(400 + i, sz)).collect::<Vec<_>>()[1..],
            "rest",
        );
        s.put_manifest(&m3).unwrap();
        s.pin(m3.image_id()).unwrap();
        let (fid, fd) = chunk(999, sz);
        let e = s.put_chunk(&fid, &fd).unwrap_err();
        assert!(matches!(e, Error::StoreFull { .. }), "{e:?}");
        assert!(!s.has_chunk(&fid));
        drop(guard);
        assert!(!s.is_pinned(m2.image_id()));
        s.put_chunk(&fid, &fd).unwrap();
        assert!(
            !s.has_chunk(&others[2].0) || !s.has_chunk(&others[3].0),
            "unpinned after guard drop, so evictable"
        );
        assert!(s.size_bytes() <= s.cap_bytes());
    }

    #[test]
    fn lowered_cap_evicts_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let cs: Vec<_> = (0..6).map(|i| chunk(900 + i, 1000)).collect();
        let m = manifest_of(&cs[..2], "keep");
        {
            let s = ChunkStore::open(dir.path(), UNLIMITED).unwrap();
            s.put_manifest(&m).unwrap();
            s.pin(m.image_id()).unwrap();
            for (id, d) in &cs {
                s.put_chunk(id, d).unwrap();
            }
        }
        let s = ChunkStore::open(dir.path(), 3000).unwrap();
        assert_eq!(s.size_bytes(), 3000);
        assert!(
            s.has_chunk(&cs[0].0) && s.has_chunk(&cs[1].0),
            "pinned kept"
        );
        assert!(s.has_chunk(&cs[5].0), "newest unpinned kept");
    }

    #[test]
    fn lru_order_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let sz = 1000;
        let cs: Vec<_> = (0..3).map(|i| chunk(500 + i, sz)).collect();
        {
            let s = ChunkStore::open(dir.path(), 3 * sz as u64).unwrap();
            for (id, d) in &cs {
                s.put_chunk(id, d).unwrap();
            }
            s.get_chunk(&cs[0].0).unwrap();
            s.flush().unwrap();
        }
        let s = ChunkStore::open(dir.path(), 3 * sz as u64).unwrap();
        let (id, d) = chunk(600, sz);
        s.put_chunk(&id, &d).unwrap();
        assert!(s.has_chunk(&cs[0].0));
        assert!(!s.has_chunk(&cs[1].0));
    }

    #[test]
    fn enospc_maps_to_disk_full() {
        let e = Error::io(
            "writing image file",
            "/x",
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert!(matches!(e, Error::DiskFull { .. }));
        assert_eq!(e.to_string(), "disk full while writing image file at /x");
        let e = Error::sled(
            Path::new("/s"),
            sled::Error::Io(std::io::Error::from_raw_os_error(libc::ENOSPC)),
        );
        assert_eq!(e.to_string(), "disk full while writing chunk store at /s");
    }

    #[test]
    fn concurrent_writers_keep_accounting_and_pins() {
        let dir = tempfile::tempdir().unwrap();
        let sz = 8_000usize;
        let s = ChunkStore::open(dir.path(), 40 * sz as u64).unwrap();
        let pinned: Vec<_> = (0..10).map(|i| chunk(7000 + i, sz)).collect();
        let m = manifest_of(&pinned, "keep");
        s.put_manifest(&m).unwrap();
        let guard = s.pin_temp(m.image_id()).unwrap();
        for (id, d) in &pinned {
            s.put_chunk(id, d).unwrap();
        }
        let other = manifest_of(
            &(0..5).map(|i| chunk(8000 + i, sz)).collect::<Vec<_>>(),
            "x",
        );
        s.put_manifest(&other).unwrap();
        std::thread::scope(|sc| {
            for t in 0..3u64 {
                let s = s.clone();
                sc.spawn(move || {
                    for i in 0..80 {
                        let (id, d) = chunk(10_000 * (t + 1) + i, sz);
                        s.put_chunk(&id, &d).unwrap();
                        // On a loaded machine the other writers may have
                        // evicted it already; what is served must be right.
                        match s.get_chunk(&id).unwrap() {
                            Some(v) => assert_eq!(v, d),
                            None => assert!(!s.has_chunk(&id)),
                        }
                    }
                });
            }
            let s2 = s.clone();
            let oid = other.image_id();
            sc.spawn(move || {
                for _ in 0..50 {
                    let g = s2.pin_temp(oid).unwrap();
                    s2.pin(oid).unwrap();
                    s2.unpin(oid).unwrap();
                    drop(g);
                }
            });
        });
        assert!(pinned.iter().all(|(id, _)| s.has_chunk(id)));
        assert!(s.size_bytes() <= s.cap_bytes());
        let present: u64 = s
            .inner
            .chunks
            .iter()
            .map(|kv| kv.unwrap().1.len() as u64)
            .sum();
        assert_eq!(present, s.size_bytes());
        drop(guard);
        assert!(!s.is_pinned(m.image_id()));
    }

    /// The bound that keeps sled's IO queue short (module docs, "Liveness"):
    /// an import that never flushes still waits for the disk every window.
    #[test]
    fn unflushed_writes_never_pile_up_past_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let s = ChunkStore::open(dir.path(), UNLIMITED).unwrap();
        let mut ids = Vec::new();
        for i in 0..48 {
            let (id, d) = chunk(40_000 + i, 100_000);
            s.put_chunk_inner(&id, &d, false, true).unwrap();
            ids.push(id);
        }
        s.release_holds(&ids);
        let peak = s.peak_backlog();
        assert!(peak >= LOG_WINDOW / 2, "{peak}: writes were not counted");
        assert!(
            peak <= LOG_WINDOW + MAX_CHUNK as u64 + WRITE_OVERHEAD,
            "{peak} bytes written without waiting for the disk"
        );
        assert_eq!(s.size_bytes(), 48 * 100_000);
    }

    #[test]
    fn stalled_writer_becomes_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let (id, d) = chunk(31, 5000);
        let (id2, d2) = chunk(32, 5000);
        let m = manifest_of(&[(id, d.clone())], "x");
        {
            let s = ChunkStore::open(dir.path(), UNLIMITED).unwrap();
            s.put_chunk(&id, &d).unwrap();
            s.put_manifest(&m).unwrap();
            s.set_stall_limit(std::time::Duration::from_millis(300));
            let release = s.block_writer();
            let e = s.put_chunk(&id2, &d2).unwrap_err();
            assert!(matches!(e, Error::StoreStalled { .. }), "{e:?}");
            let msg = e.to_string();
            assert!(
                msg.contains("stopped responding") && msg.contains("restart cpushare-node"),
                "{msg}"
            );
            assert!(s.is_stalled());
            assert!(!s.has_chunk(&id2));
            // Later writes fail without queueing behind the stuck one.
            assert!(matches!(
                s.pin(m.image_id()),
                Err(Error::StoreStalled { .. })
            ));
            assert!(matches!(s.flush(), Err(Error::StoreStalled { .. })));
            assert!(!s.is_pinned(m.image_id()));
            // Verified chunks are still served.
            assert_eq!(s.get_chunk(&id).unwrap().unwrap(), d);
            drop(release);
        }
        // A restart recovers: what was acknowledged is there, nothing else.
        let s = ChunkStore::open(dir.path(), UNLIMITED).unwrap();
        assert!(!s.is_stalled());
        assert_eq!(s.get_chunk(&id).unwrap().unwrap(), d);
        assert_eq!(s.get_manifest(m.image_id()).unwrap().unwrap(), m);
        s.put_chunk(&id2, &d2).unwrap();
        assert_eq!(s.size_bytes(), 10_000);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Network input: random bytes offered under a random or off-by-a-bit
        /// id are never stored; the right id always is.
        #[test]
        fn offered_chunks_are_stored_only_under_their_hash(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..5000),
            claimed in proptest::prelude::any::<[u8; 32]>(),
            flip in 0usize..256,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let s = ChunkStore::open(dir.path(), UNLIMITED).unwrap();
            let real = ChunkId::of(&data);
            let mut near = real;
            near.0[flip / 8] ^= 1 << (flip % 8);
            for id in [ChunkId(claimed), near] {
                if id != real {
                    let rejected = matches!(s.put_chunk(&id, &data), Err(Error::ChunkHashMismatch { .. }));
                    proptest::prop_assert!(rejected);
                    proptest::prop_assert!(!s.has_chunk(&id));
                    proptest::prop_assert_eq!(s.get_chunk(&id).unwrap(), None);
                }
            }
            proptest::prop_assert_eq!(s.size_bytes(), 0);
            proptest::prop_assert!(s.put_chunk(&real, &data).unwrap());
            proptest::prop_assert_eq!(s.get_chunk(&real).unwrap(), Some(data.clone()));
        }
    }

    const KILL_DIR_ENV: &str = "CHUNKS_KILL_TEST_DIR";

    /// Child half of `kill_9_mid_write`: writes chunks until killed.
    #[test]
    #[ignore = "run only as the child of kill_9_mid_write"]
    fn kill_child_writer() {
        use std::io::Write;
        let Ok(dir) = std::env::var(KILL_DIR_ENV) else {
            return;
        };
        let cap: u64 = std::env::var("CHUNKS_KILL_TEST_CAP")
            .unwrap()
            .parse()
            .unwrap();
        let s = ChunkStore::open(&dir, cap).unwrap();
        let mut out = std::io::stdout().lock();
        for i in 0u64.. {
            let (id, d) = chunk(1_000_000 + i, 20_000 + (i as usize * 7919) % 40_000);
            s.put_chunk(&id, &d).unwrap();
            if i % 7 == 0 {
                s.get_chunk(&id).unwrap();
            }
            writeln!(out, "{id}").unwrap();
            out.flush().unwrap();
        }
    }

    /// A real `kill -9` of a process writing (and evicting) chunks, several
    /// times at different moments: afterwards every acknowledged chunk that
    /// was not evicted is there, nothing bad is ever served, and the size
    /// accounting matches the chunks present.
    #[test]
    fn kill_9_mid_write() {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let cap: u64 = 60 * 40_000;
        let exe = std::env::current_exe().unwrap();
        let mut acked: Vec<ChunkId> = Vec::new();
        for round in 0..3 {
            let mut child = std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "store::tests::kill_child_writer",
                    "--ignored",
                    "--nocapture",
                ])
                .env(KILL_DIR_ENV, dir.path())
                .env("CHUNKS_KILL_TEST_CAP", cap.to_string())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
            let want = 40 + round * 37;
            let mut got = 0;
            while got < want {
                let l = lines.next().unwrap().unwrap();
                if let Ok(id) = l.trim().parse::<ChunkId>() {
                    acked.push(id);
                    got += 1;
                }
            }
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            for l in lines.map_while(|l| l.ok()) {
                if let Ok(id) = l.trim().parse::<ChunkId>() {
                    acked.push(id);
                }
            }
            let s = ChunkStore::open(dir.path(), cap).unwrap();
            let last = *acked.last().unwrap();
            assert!(
                s.get_chunk(&last).unwrap().is_some(),
                "newest acknowledged chunk lost"
            );
            let mut present = 0u64;
            for kv in s.inner.chunks.iter() {
                let (k, v) = kv.unwrap();
                let id = ChunkId::from_slice(&k).unwrap();
                assert_eq!(ChunkId::of(&v), id, "bad chunk on disk after kill");
                assert!(s.has_chunk(&id));
                present += v.len() as u64;
            }
            assert_eq!(s.size_bytes(), present, "size accounting after kill");
            assert!(s.size_bytes() <= cap);
            let rep = s.verify_all().unwrap();
            assert_eq!((rep.bad_removed, rep.repaired), (0, 0), "{rep:?}");
        }
    }
}
