//! Converting a store of the previous layout (chunk payloads inside a sled
//! database at the store's top level) to chunk files plus the index.
//!
//! The old database is read, never written: every good chunk becomes a file
//! (skipped if it already is one, so an interrupted conversion resumes),
//! its `meta` entry, the manifests and the pins go to the new index, and a
//! marker in the index says the conversion is complete. Only then are the
//! old sled files deleted (also resumed at the next open). The conversion
//! needs room for one copy of the chunks; if the disk lacks it, open fails
//! with [`Error::StoreOldLayout`] saying what to do.

use std::path::Path;

use tracing::{info, warn};

use super::files::{remove_path, Files};
use super::lru::{meta_value, parse_meta};
use super::writer::{open_sled, Trees};
use super::{free_bytes, DISK_RESERVE};
use crate::chunking::MAX_CHUNK;
use crate::error::{Error, Result};
use crate::ids::ChunkId;

/// Index tree and key of the "conversion complete" marker.
const LAYOUT_TREE: &str = "layout";
const CONVERTED_KEY: &[u8] = b"converted-from-sled-payloads";

/// Whether `root` holds sled files of the previous layout.
fn has_old_layout(root: &Path) -> bool {
    root.join("db").exists() || root.join("conf").exists()
}

/// Convert an old-layout store at `root`, if there is one.
pub(super) fn convert_old_layout(root: &Path, files: &Files, trees: &Trees) -> Result<()> {
    if !has_old_layout(root) {
        return Ok(());
    }
    let layout = trees.db.open_tree(LAYOUT_TREE).map_err(|e| trees.err(e))?;
    if layout
        .get(CONVERTED_KEY)
        .map_err(|e| trees.err(e))?
        .is_none()
    {
        convert(root, files, trees)?;
        layout
            .insert(CONVERTED_KEY, &b"1"[..])
            .map_err(|e| trees.err(e))?;
        trees.db.flush().map_err(|e| trees.err(e))?;
    }
    remove_old_files(root)
}

fn convert(root: &Path, files: &Files, trees: &Trees) -> Result<()> {
    let cfg = sled::Config::new()
        .path(root)
        .cache_capacity(16 << 20)
        .flush_every_ms(None);
    let old = open_sled(&cfg, root)?;
    let tree = |name: &str| old.open_tree(name).map_err(|e| Error::sled(root, e));
    let (chunks, meta) = (tree("chunks")?, tree("meta")?);
    // One more copy of the payload must fit (the old files go afterwards).
    let mut payload = 0u64;
    for v in meta.iter().values() {
        let v = v.map_err(|e| Error::sled(root, e))?;
        payload += parse_meta(&v).map_or(0, |(size, _)| size as u64);
    }
    let needed = payload + DISK_RESERVE;
    if let Some(free) = free_bytes(root) {
        if free < needed {
            return Err(Error::StoreOldLayout {
                path: root.to_path_buf(),
                needed,
                free,
            });
        }
    }
    let (mut moved, mut bad, mut bytes) = (0u64, 0u64, 0u64);
    let mut batch = sled::Batch::default();
    for kv in chunks.iter() {
        let (k, v) = kv.map_err(|e| Error::sled(root, e))?;
        let id = ChunkId::from_slice(&k)
            .filter(|id| v.len() <= MAX_CHUNK as usize && ChunkId::of(&v) == *id);
        let Some(id) = id else {
            bad += 1;
            continue;
        };
        if !files.exists(&id) {
            files.install(files.stage(&v, false)?, &id)?;
        }
        let tick = meta
            .get(&k)
            .map_err(|e| Error::sled(root, e))?
            .and_then(|m| parse_meta(&m))
            .map_or(0, |(_, t)| t);
        batch.insert(&k[..], &meta_value(v.len() as u32, tick)[..]);
        moved += 1;
        bytes += v.len() as u64;
        if moved % 256 == 0 {
            files.sync_dirs()?;
            let b = std::mem::take(&mut batch);
            trees.meta.apply_batch(b).map_err(|e| trees.err(e))?;
        }
    }
    files.sync_dirs()?;
    trees.meta.apply_batch(batch).map_err(|e| trees.err(e))?;
    for (from, to) in [("manifests", &trees.manifests), ("pins", &trees.pins)] {
        for kv in tree(from)?.iter() {
            let (k, v) = kv.map_err(|e| Error::sled(root, e))?;
            to.insert(k, v).map_err(|e| trees.err(e))?;
        }
    }
    trees.db.flush().map_err(|e| trees.err(e))?;
    if bad > 0 {
        warn!(
            bad,
            "old chunk store held chunks that did not verify; left behind"
        );
    }
    info!(
        path = %root.display(),
        chunks = moved,
        mib = bytes >> 20,
        "converted the chunk store from the previous layout (chunks inside sled) to chunk files"
    );
    Ok(())
}

/// Delete the old layout's sled files: `db`, `conf`, `blobs/`, `snap.*`.
fn remove_old_files(root: &Path) -> Result<()> {
    remove_path(&root.join("db"))?;
    remove_path(&root.join("blobs"))?;
    let entries = std::fs::read_dir(root).map_err(|e| Error::io("reading chunk store", root, e))?;
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with("snap.") {
            remove_path(&e.path())?;
        }
    }
    // Last: while `conf` exists, the next open finishes this.
    remove_path(&root.join("conf"))
}
