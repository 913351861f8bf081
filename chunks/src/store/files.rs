//! Chunk payloads as files: `chunks/<first byte hex>/<id hex>`.
//!
//! A chunk is written to `tmp/` and renamed into place, so after `kill -9`
//! a file under `chunks/` is whole or absent. Against power cuts the data
//! is fsynced before the rename (peers' chunks) or, for an import's many
//! chunks, in one `syncfs` by [`Files::sync_dirs`] before anything refers
//! to them; a file torn by a power cut in between fails the re-hash every
//! read does and is deleted.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::chunking::MAX_CHUNK;
use crate::error::{Error, Result};
use crate::ids::ChunkId;

const WHAT_WRITE: &str = "writing chunk store";
const WHAT_READ: &str = "reading chunk store";

pub(super) struct Files {
    chunks: PathBuf,
    tmp: PathBuf,
    /// Fan-out directories with renames not yet fsynced.
    dirty_dirs: Mutex<BTreeSet<u8>>,
    /// `chunks/` gained a fan-out directory since the last sync.
    root_dirty: AtomicBool,
    /// Chunk data was staged without an fsync since the last sync.
    unsynced: AtomicBool,
}

/// A chunk written and fsynced under `tmp/`, not yet in place. Dropping it
/// deletes the temp file.
pub(super) struct Staged(tempfile::NamedTempFile);

/// What [`Files::scan`] finds.
pub(super) enum Found {
    Chunk(ChunkId),
    /// A file or directory that is not a chunk file (deleted by the caller).
    Stray(PathBuf),
}

impl Files {
    /// Create the directories; empty `tmp/` (writes a crash interrupted).
    pub(super) fn open(root: &Path) -> Result<Files> {
        let f = Files {
            chunks: root.join("chunks"),
            tmp: root.join("tmp"),
            dirty_dirs: Mutex::new(BTreeSet::new()),
            root_dirty: AtomicBool::new(false),
            unsynced: AtomicBool::new(false),
        };
        for d in [&f.chunks, &f.tmp] {
            std::fs::create_dir_all(d).map_err(|e| Error::io(WHAT_WRITE, d, e))?;
        }
        let left = std::fs::read_dir(&f.tmp).map_err(|e| Error::io(WHAT_READ, &f.tmp, e))?;
        for e in left.flatten() {
            let p = e.path();
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            r.map_err(|e| Error::io("removing a leftover temp file", &p, e))?;
        }
        Ok(f)
    }

    fn dir_of(&self, id: &ChunkId) -> PathBuf {
        self.chunks.join(hex::encode([id.0[0]]))
    }

    pub(super) fn path(&self, id: &ChunkId) -> PathBuf {
        self.dir_of(id).join(id.to_hex())
    }

    /// Write `bytes` to a temp file; `sync`: fsync it now, else leave it to
    /// the next [`Files::sync_dirs`] (one `syncfs` for a whole import
    /// instead of one fsync per chunk, which made imports 3-4 x slower).
    pub(super) fn stage(&self, bytes: &[u8], sync: bool) -> Result<Staged> {
        let mut t = tempfile::Builder::new()
            .prefix("chunk-")
            .tempfile_in(&self.tmp)
            .map_err(|e| Error::io(WHAT_WRITE, &self.tmp, e))?;
        let io = |e| Error::io(WHAT_WRITE, &self.tmp, e);
        t.as_file_mut().write_all(bytes).map_err(io)?;
        if sync {
            t.as_file().sync_data().map_err(io)?;
        } else {
            // Set after the write, so a sync that clears it covers the data.
            self.unsynced.store(true, Ordering::SeqCst);
        }
        Ok(Staged(t))
    }

    /// Rename a staged chunk into place (atomic; replaces a stale file).
    pub(super) fn install(&self, s: Staged, id: &ChunkId) -> Result<()> {
        let dir = self.dir_of(id);
        let dest = dir.join(id.to_hex());
        let s = match s.0.persist(&dest) {
            Ok(_) => None,
            Err(e) if e.error.kind() == std::io::ErrorKind::NotFound => Some(e.file),
            Err(e) => return Err(Error::io(WHAT_WRITE, &dest, e.error)),
        };
        if let Some(t) = s {
            // First chunk of this fan-out directory.
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(WHAT_WRITE, &dir, e))?;
            t.persist(&dest)
                .map_err(|e| Error::io(WHAT_WRITE, &dest, e.error))?;
            self.root_dirty.store(true, Ordering::SeqCst);
        }
        self.dirty().insert(id.0[0]);
        Ok(())
    }

    fn dirty(&self) -> std::sync::MutexGuard<'_, BTreeSet<u8>> {
        self.dirty_dirs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Make the chunks written since the last call durable: fsync the
    /// directories that received renames, or, when chunk data was staged
    /// without its own fsync, `syncfs` the whole filesystem once.
    pub(super) fn sync_dirs(&self) -> Result<()> {
        if self.unsynced.swap(false, Ordering::SeqCst) {
            let (root, dirs) = (
                self.root_dirty.swap(false, Ordering::SeqCst),
                std::mem::take(&mut *self.dirty()),
            );
            if let Err(e) = syncfs(&self.chunks) {
                // Try again next time.
                self.unsynced.store(true, Ordering::SeqCst);
                self.root_dirty.fetch_or(root, Ordering::SeqCst);
                self.dirty().extend(dirs);
                return Err(e);
            }
            return Ok(());
        }
        if self.root_dirty.swap(false, Ordering::SeqCst) {
            sync_dir(&self.chunks)?;
        }
        let dirs = std::mem::take(&mut *self.dirty());
        for b in dirs {
            let d = self.chunks.join(hex::encode([b]));
            sync_dir(&d)?;
        }
        Ok(())
    }

    /// The chunk's bytes, `None` if there is no file. At most one byte past
    /// [`MAX_CHUNK`] is read: more means a bad file, which the caller's
    /// size check rejects.
    pub(super) fn read(&self, id: &ChunkId) -> Result<Option<Vec<u8>>> {
        let p = self.path(id);
        let f = match File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(WHAT_READ, &p, e)),
        };
        let mut v = Vec::new();
        f.take(MAX_CHUNK as u64 + 1)
            .read_to_end(&mut v)
            .map_err(|e| Error::io(WHAT_READ, &p, e))?;
        Ok(Some(v))
    }

    pub(super) fn exists(&self, id: &ChunkId) -> bool {
        self.path(id).exists()
    }

    /// Size of the chunk's file, `None` if absent.
    pub(super) fn len(&self, id: &ChunkId) -> Option<u64> {
        std::fs::metadata(self.path(id)).ok().map(|m| m.len())
    }

    /// Delete the chunk's file (absent is fine).
    pub(super) fn remove(&self, id: &ChunkId) -> Result<()> {
        remove_path(&self.path(id))
    }

    /// Every entry under `chunks/`: chunk files by id, anything else as a
    /// stray path. No file is opened.
    pub(super) fn scan(&self) -> Result<Vec<Found>> {
        let mut out = Vec::new();
        let top =
            std::fs::read_dir(&self.chunks).map_err(|e| Error::io(WHAT_READ, &self.chunks, e))?;
        for d in top {
            let d = d.map_err(|e| Error::io(WHAT_READ, &self.chunks, e))?;
            let name = d.file_name();
            let prefix = name.to_str().and_then(|n| {
                (n.len() == 2)
                    .then(|| hex::decode(n).ok())
                    .flatten()
                    .map(|b| b[0])
            });
            let (Some(prefix), true) = (prefix, d.path().is_dir()) else {
                out.push(Found::Stray(d.path()));
                continue;
            };
            let sub = std::fs::read_dir(d.path()).map_err(|e| Error::io(WHAT_READ, d.path(), e))?;
            for f in sub {
                let f = f.map_err(|e| Error::io(WHAT_READ, d.path(), e))?;
                // Only the canonical name (lower-case hex, right directory).
                let id = f.file_name().to_str().and_then(|n| {
                    n.parse::<ChunkId>()
                        .ok()
                        .filter(|id| id.0[0] == prefix && id.to_hex() == n)
                });
                let is_file = f.file_type().map(|t| t.is_file()).unwrap_or(false);
                match id {
                    Some(id) if is_file => out.push(Found::Chunk(id)),
                    _ => out.push(Found::Stray(f.path())),
                }
            }
        }
        Ok(out)
    }
}

/// Delete a file or directory tree; absent is fine.
pub(super) fn remove_path(p: &Path) -> Result<()> {
    let r = if p.is_dir() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    };
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("deleting from chunk store", p, e)),
    }
}

/// Flush everything written to the filesystem holding `d` (data, names).
fn syncfs(d: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = File::open(d).map_err(|e| Error::io(WHAT_WRITE, d, e))?;
    // SAFETY: `f` is an open descriptor for the duration of the call.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(Error::io(WHAT_WRITE, d, std::io::Error::last_os_error()));
    }
    Ok(())
}

pub(super) fn sync_dir(d: &Path) -> Result<()> {
    File::open(d)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(WHAT_WRITE, d, e))
}
