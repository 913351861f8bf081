//! The index (sled) and the one thread that writes it, with a watchdog.
//!
//! # Liveness (sled 0.34 IO deadlock)
//! sled 0.34.7 runs log-buffer writes and log-file truncations on one
//! process-wide pool of 7 IO threads. A writer that rolls into a new log
//! segment holds the segment accountant's lock in `bump_tip` while it waits
//! for a pending truncation; every buffer write ends by taking that same
//! lock. With 7 or more buffer writes queued ahead of the truncation, all
//! pool threads block on the lock and the truncation never runs: the store
//! hangs for good (spacejam/sled#1412; fixed upstream only after 0.34).
//! Chunk payloads no longer go through sled (only small index values do),
//! which makes that queue much shorter, but the guard stays:
//! - every sled write goes through one writer thread, which waits for the
//!   log to be on disk after each [`LOG_WINDOW`] of writes;
//! - sled's background flusher is off; the writer flushes when idle;
//! - a watchdog: a write that makes no progress for the stall limit
//!   (default [`STALL_LIMIT`]) fails with [`Error::StoreStalled`] and the
//!   store refuses further writes, so a daemon reports a clear error instead
//!   of hanging; a restart recovers (the store is `kill -9` safe).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use tracing::{error, warn};

use super::{ChunkStore, SLED_CACHE_BYTES};
use crate::error::{Error, Result};

/// Bytes of sled writes after which the writer waits for the log to reach
/// the disk before the next write: two of sled's 512 KiB log segments. So at
/// most about four log-buffer writes of this store sit in sled's IO queue at
/// a time, well under the 7 IO threads whose exhaustion is the deadlock.
pub const LOG_WINDOW: u64 = 1 << 20;

/// Log bytes counted per write on top of its payload (keys, headers).
pub(super) const WRITE_OVERHEAD: u64 = 256;

/// The writer flushes sled after this long without a write.
const IDLE_FLUSH: Duration = Duration::from_millis(500);

/// Default time a store write may make no progress before the store
/// declares itself stalled.
pub const STALL_LIMIT: Duration = Duration::from_secs(60);

/// The index's sled handles.
#[derive(Clone)]
pub(super) struct Trees {
    pub(super) path: PathBuf,
    pub(super) db: sled::Db,
    /// Chunk id -> size + access tick.
    pub(super) meta: sled::Tree,
    /// Image id -> encoded signed manifest.
    pub(super) manifests: sled::Tree,
    /// Image id -> empty (persistent pins).
    pub(super) pins: sled::Tree,
}

impl Trees {
    /// Open the index at `<store>/index`.
    pub(super) fn open(store: &Path) -> Result<Trees> {
        let at = store.join("index");
        // No background flusher: its segment cleaning writes in bursts
        // nobody waits for (see "Liveness"); the writer thread flushes.
        let cfg = sled::Config::new()
            .path(&at)
            .cache_capacity(SLED_CACHE_BYTES)
            .flush_every_ms(None);
        let db = open_sled(&cfg, store)?;
        let tree = |name: &str| db.open_tree(name).map_err(|e| Error::sled(store, e));
        Ok(Trees {
            path: store.to_path_buf(),
            meta: tree("meta")?,
            manifests: tree("manifests")?,
            pins: tree("pins")?,
            db,
        })
    }

    pub(super) fn err(&self, e: sled::Error) -> Error {
        Error::sled(&self.path, e)
    }
}

/// Open a sled database; errors name the store at `store`.
pub(super) fn open_sled(cfg: &sled::Config, store: &Path) -> Result<sled::Db> {
    // A store closed moments ago in this process may still be locked for a
    // short while (sled's IO threads finishing): retry briefly.
    let mut attempt = 0;
    loop {
        // sled may panic on some on-disk garbage; report that as corruption.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cfg.open()))
            .map_err(|_| Error::StoreCorrupt {
                path: store.to_path_buf(),
                detail: "sled panicked while recovering it".into(),
            })?
            .map_err(|e| Error::sled(store, e));
        match r {
            Err(Error::StoreLocked { .. }) if attempt < 20 => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            r => return r,
        }
    }
}

/// A unit of work for the writer thread; `&mut u64` is the log backlog.
type Job = Box<dyn FnOnce(&Trees, &mut u64) + Send>;

/// The single thread that performs every sled write of a store.
pub(super) struct Writer {
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
    pub(super) fn start(trees: Trees) -> Result<Writer> {
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

    /// Closing the queue ends the writer; wait for it (it flushes and lets
    /// go of sled) unless it is stuck inside sled.
    pub(super) fn shutdown(&self) {
        drop(self.tx.lock().unwrap_or_else(|p| p.into_inner()).take());
        if !self.stalled.load(Ordering::SeqCst) {
            let h = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(h) = h {
                let _ = h.join();
            }
        }
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
                    // flusher would have. On failure the next write's
                    // flush reports it.
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

impl ChunkStore {
    /// Run `f` on the writer thread; `logged` is about how many bytes it
    /// writes to sled's log; `durable`: flush sled before answering. Fails
    /// with [`Error::StoreStalled`] if no answer comes within the stall limit.
    pub(super) fn write<R: Send + 'static>(
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

    /// Most bytes written to sled's log without waiting for the disk since
    /// open: about [`LOG_WINDOW`] plus one write at most (see "Liveness").
    pub fn peak_backlog(&self) -> u64 {
        self.inner.writer.peak_backlog.load(Ordering::Relaxed)
    }

    /// Park the writer thread until the returned sender is dropped, the way
    /// a wedged sled call would.
    #[cfg(test)]
    pub(super) fn block_writer(&self) -> mpsc::Sender<()> {
        let (tx, rx) = mpsc::channel::<()>();
        let job: Job = Box::new(move |_, _| {
            let _ = rx.recv();
        });
        let g = self.inner.writer.tx.lock().unwrap();
        g.as_ref().unwrap().send(job).unwrap();
        tx
    }
}
