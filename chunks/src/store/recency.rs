//! The LRU order on disk: one flat file, `<store>/recency`, rewritten whole
//! (temp file + rename) when chunks were read since the last flush.
//!
//! Format: the magic `CSRECNT1`, then one record per chunk: its id (32 bytes)
//! and its last-access tick (u64 LE). The file's size follows the chunk count
//! and nothing else. Access ticks used to be written into sled's `meta` tree
//! on every flush; sled appends each update to its log, so every run of an
//! image grew the index by about 100 bytes per chunk read, for good (a 2 GiB
//! image is ~32,000 chunks, and each run or re-import of it touched them all).
//! The file is advisory: missing, short or garbled, the order falls back to
//! the ticks the chunks were stored with.

use std::collections::HashMap;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::ids::ChunkId;

const MAGIC: &[u8; 8] = b"CSRECNT1";
const RECORD: usize = 32 + 8;
const NAME: &str = "recency";

pub(super) fn path(store: &Path) -> PathBuf {
    store.join(NAME)
}

/// Replace the file with `ticks`.
pub(super) fn save(store: &Path, ticks: &[(ChunkId, u64)]) -> std::io::Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix(".recency-")
        .tempfile_in(store)?;
    {
        let mut w = BufWriter::new(tmp.as_file());
        w.write_all(MAGIC)?;
        for (id, tick) in ticks {
            w.write_all(&id.0)?;
            w.write_all(&tick.to_le_bytes())?;
        }
        w.flush()?;
    }
    tmp.persist(path(store)).map_err(|e| e.error)?;
    Ok(())
}

/// The saved ticks; empty when there is no usable file.
pub(super) fn load(store: &Path) -> HashMap<ChunkId, u64> {
    let mut out = HashMap::new();
    let Ok(f) = std::fs::File::open(path(store)) else {
        return out;
    };
    let mut buf = Vec::new();
    if f.take(1 << 34).read_to_end(&mut buf).is_err() || !buf.starts_with(MAGIC) {
        return out;
    }
    for r in buf[MAGIC.len()..].chunks_exact(RECORD) {
        let id = ChunkId(r[..32].try_into().expect("32 bytes"));
        let tick = u64::from_le_bytes(r[32..].try_into().expect("8 bytes"));
        out.insert(id, tick);
    }
    out
}

/// Remove leftovers of saves a crash interrupted.
pub(super) fn clean(store: &Path) {
    let Ok(entries) = std::fs::read_dir(store) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(".recency-") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
