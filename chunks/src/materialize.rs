//! Writing an image out of the store: an unlinked temp file for a VM, or a
//! normal file for export.
//!
//! A guest disk takes space on the seller's disk like the chunks do, so
//! [`materialize_reserved`] counts it against the store's cap for as long
//! as it lives (a [`Reservation`] beside the file).

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use crate::error::{Error, Result};
use crate::ids::ImageId;
use crate::manifest::{ByteRange, SignedManifest};
use crate::store::{ChunkStore, Reservation};

/// What a guest disk reserves against the store's cap, in errors.
const WHAT: &str = "materialising a guest disk";

/// A materialised image part and the store space it holds.
#[derive(Debug)]
pub struct Materialized {
    /// The unlinked file, positioned at 0.
    pub file: File,
    /// Its size, counted against the store's cap until dropped: keep it
    /// exactly as long as the file.
    pub reservation: Reservation,
}

/// Write the image's bootable disk (the whole image, or the boot info's disk
/// part) into an unnamed temporary file in `dir`, fsync it and return it
/// positioned at 0. The file has no path (O_TMPFILE, or created and unlinked
/// at once), so it disappears when the last handle closes.
///
/// `max_size`: fail with [`Error::ImageTooLarge`] if the disk is larger.
///
/// The disk counts against the store's cap only while it is written; use
/// [`materialize_reserved`] to keep it counted while the file lives.
pub fn materialize(
    store: &ChunkStore,
    image: ImageId,
    dir: &Path,
    max_size: Option<u64>,
) -> Result<File> {
    materialize_reserved(store, image, dir, max_size).map(|m| m.file)
}

/// [`materialize`], with the disk's size reserved against the store's cap
/// (chunks are evicted to make room) until the returned reservation is
/// dropped. Fails with [`Error::DiskCapExceeded`] if pinned images and
/// other guests' disks leave too little room under the cap.
pub fn materialize_reserved(
    store: &ChunkStore,
    image: ImageId,
    dir: &Path,
    max_size: Option<u64>,
) -> Result<Materialized> {
    let _span = tracing::info_span!("materialize", image = %image.short()).entered();
    let m = manifest(store, image)?;
    let range = m.manifest().disk_range().ok_or(Error::NoDisk(image))?;
    write_unlinked(store, &m, range, dir, max_size)
}

/// Like [`materialize`] for any byte range of the image (e.g. the kernel
/// or initrd of a direct-boot image).
pub fn materialize_range(
    store: &ChunkStore,
    image: ImageId,
    range: ByteRange,
    dir: &Path,
    max_size: Option<u64>,
) -> Result<File> {
    materialize_range_reserved(store, image, range, dir, max_size).map(|m| m.file)
}

/// Like [`materialize_reserved`] for any byte range of the image.
pub fn materialize_range_reserved(
    store: &ChunkStore,
    image: ImageId,
    range: ByteRange,
    dir: &Path,
    max_size: Option<u64>,
) -> Result<Materialized> {
    let m = manifest(store, image)?;
    write_unlinked(store, &m, range, dir, max_size)
}

/// Write the whole image to `dest` as a normal file. Written to a temp file
/// beside `dest`, fsynced, then renamed, so a failure leaves no partial file.
/// Returns the number of bytes written.
pub fn export(store: &ChunkStore, image: ImageId, dest: &Path) -> Result<u64> {
    let _span = tracing::info_span!("export", image = %image.short()).entered();
    let m = manifest(store, image)?;
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    if dest.is_dir() {
        return Err(Error::Io {
            what: "exporting image",
            path: dest.into(),
            source: std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                "destination is a directory",
            ),
        });
    }
    let mut tmp = tempfile::Builder::new()
        .prefix(".cpushare-export-")
        .tempfile_in(&parent)
        .map_err(|e| Error::io("creating export file", &parent, e))?;
    let range = ByteRange {
        offset: 0,
        len: m.manifest().total_size,
    };
    write_range(store, &m, range, tmp.as_file_mut(), dest)?;
    tmp.persist(dest)
        .map_err(|e| Error::io("renaming exported image into place", dest, e.error))?;
    // Make the rename durable too.
    if let Ok(d) = File::open(&parent) {
        let _ = d.sync_all();
    }
    Ok(range.len)
}

fn manifest(store: &ChunkStore, image: ImageId) -> Result<SignedManifest> {
    store.get_manifest(image)?.ok_or(Error::UnknownImage(image))
}

fn write_unlinked(
    store: &ChunkStore,
    m: &SignedManifest,
    range: ByteRange,
    dir: &Path,
    max_size: Option<u64>,
) -> Result<Materialized> {
    if let Some(cap) = max_size {
        if range.len > cap {
            return Err(Error::ImageTooLarge {
                size: range.len,
                cap,
            });
        }
    }
    // Pin first: the reservation's evictions must not take this image's
    // chunks.
    let _pin = store.pin_temp(m.image_id())?;
    let reservation = store.reserve(range.len, WHAT)?;
    let mut f = tempfile::tempfile_in(dir).map_err(|e| Error::io("creating image file", dir, e))?;
    write_range(store, m, range, &mut f, dir)?;
    f.seek(SeekFrom::Start(0))
        .map_err(|e| Error::io("writing image file", dir, e))?;
    Ok(Materialized {
        file: f,
        reservation,
    })
}

/// Copy `range` of the image into `f` (fresh, empty) and fsync. All-zero
/// chunks are skipped (left as holes) to keep the file sparse.
fn write_range(
    store: &ChunkStore,
    m: &SignedManifest,
    range: ByteRange,
    f: &mut File,
    at: &Path,
) -> Result<()> {
    let image = m.image_id();
    let man = m.manifest();
    let end = match range.end() {
        Some(e) if e <= man.total_size => e,
        _ => {
            return Err(Error::RangeOutOfImage {
                image,
                offset: range.offset,
                len: range.len,
                total: man.total_size,
            })
        }
    };
    // Keep chunks from being evicted while we copy.
    let _pin = store.pin_temp(image)?;
    let io = |e| Error::io("writing image file", at, e);
    for (off, c) in man.chunk_offsets() {
        let c_end = off + c.size as u64;
        if c_end <= range.offset || off >= end {
            continue;
        }
        let Some(data) = store.get_chunk(&c.id)? else {
            let missing = store.missing_chunks(image)?.len().max(1);
            return Err(Error::ImageIncomplete { image, missing });
        };
        let from = range.offset.saturating_sub(off) as usize;
        let to = (end.min(c_end) - off) as usize;
        let piece = &data[from..to];
        let pos = off + from as u64 - range.offset;
        if piece.iter().all(|&b| b == 0) {
            continue;
        }
        f.seek(SeekFrom::Start(pos)).map_err(io)?;
        f.write_all(piece).map_err(io)?;
    }
    f.set_len(range.len).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ImageFormat;
    use crate::store::UNLIMITED;
    use ed25519_dalek::SigningKey;
    use rand::{RngCore, SeedableRng};

    /// A small tmpfs mounted for one test, unmounted on drop (also on panic).
    struct SmallFs {
        dir: tempfile::TempDir,
    }

    impl SmallFs {
        fn new(size: &str) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let st = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path())
                .status()
                .expect("run mount");
            assert!(
                st.success(),
                "mounting a tmpfs needs root (CI runs tests as root)"
            );
            SmallFs { dir }
        }
        fn path(&self) -> &Path {
            self.dir.path()
        }
    }

    impl Drop for SmallFs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }

    fn setup(n: usize) -> (tempfile::TempDir, ChunkStore, ImageId, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), UNLIMITED).unwrap();
        let mut data = vec![0u8; n];
        rand::rngs::StdRng::seed_from_u64(5).fill_bytes(&mut data);
        let key = SigningKey::from_bytes(&[1; 32]);
        let (id, _) = crate::import::import_reader(
            &store,
            &key,
            &data[..],
            "img",
            ImageFormat::Raw,
            0,
            |_, _| {},
        )
        .unwrap();
        (dir, store, id, data)
    }

    #[test]
    fn disk_full_is_reported_and_leaves_nothing() {
        let (_d, store, id, _) = setup(3 << 20);
        let fs = SmallFs::new("1m");
        let e = materialize(&store, id, fs.path(), None).unwrap_err();
        assert!(matches!(e, Error::DiskFull { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("disk full while writing image file"),
            "{e}"
        );
        let dest = fs.path().join("out.img");
        let e = export(&store, id, &dest).unwrap_err();
        assert!(matches!(e, Error::DiskFull { .. }), "{e:?}");
        assert_eq!(
            std::fs::read_dir(fs.path()).unwrap().count(),
            0,
            "no partial export left"
        );
    }

    #[test]
    fn chunk_store_on_full_disk_says_disk_full() {
        let fs = SmallFs::new("24m");
        let store_dir = fs.path().join("store");
        // Watchdog: a store that stalls on a full disk must fail the test,
        // not hang CI.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let store = ChunkStore::open(&store_dir, UNLIMITED).unwrap();
            let mut rng = rand::rngs::StdRng::seed_from_u64(6);
            let mut err = None;
            for _ in 0..200 {
                let mut v = vec![0u8; 64 * 1024];
                rng.fill_bytes(&mut v);
                if let Err(e) = store.put_chunk(&crate::ChunkId::of(&v), &v) {
                    err = Some(e);
                    break;
                }
            }
            // Reads still work after the refusal.
            let verified = store.verify_all().map(|r| (r.ok, r.bad_removed));
            let _ = tx.send((err, verified));
        });
        let (err, verified) = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("chunk store hung on a full disk");
        let e = err.expect("24 MiB less the 16 MiB reserve cannot hold 12 MiB of chunks");
        assert!(matches!(e, Error::DiskFull { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("disk full while writing chunk store"),
            "{e}"
        );
        let (ok, bad) = verified.unwrap();
        assert!(ok > 0 && bad == 0, "ok {ok} bad {bad}");
    }

    #[test]
    fn a_guest_disk_counts_against_the_cap_while_it_lives() {
        let dir = tempfile::tempdir().unwrap();
        let mib = 1u64 << 20;
        let store = ChunkStore::open(dir.path().join("s"), 5 * mib / 2).unwrap();
        let key = SigningKey::from_bytes(&[1; 32]);
        let mut ids = Vec::new();
        for seed in [7u64, 8] {
            let mut data = vec![0u8; mib as usize];
            rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
            let (id, _) = crate::import::import_reader(
                &store,
                &key,
                &data[..],
                "img",
                ImageFormat::Raw,
                0,
                |_, _| {},
            )
            .unwrap();
            ids.push(id);
        }
        let (a, b) = (ids[0], ids[1]);
        store.unpin(b).unwrap();
        assert_eq!(store.size_bytes(), 2 * mib);
        // A's disk makes room by evicting B's chunks, never A's.
        let g = materialize_reserved(&store, a, dir.path(), None).unwrap();
        assert_eq!(store.reserved_bytes(), mib);
        assert!(store.used_bytes() <= store.cap_bytes());
        assert!(store.is_complete(a).unwrap());
        assert!(!store.is_complete(b).unwrap());
        // A second disk beside it does not fit next to pinned A.
        let e = materialize_reserved(&store, a, dir.path(), None).unwrap_err();
        assert!(matches!(e, Error::DiskCapExceeded { .. }), "{e:?}");
        assert!(e.to_string().starts_with("disk cap exceeded"), "{e}");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no file left"
        );
        drop(g);
        assert_eq!(store.reserved_bytes(), 0);
        let f = materialize(&store, a, dir.path(), None).unwrap();
        assert_eq!(f.metadata().unwrap().len(), mib);
        assert_eq!(
            store.reserved_bytes(),
            0,
            "the plain call counts it while writing only"
        );
    }

    #[test]
    fn sparse_zero_runs_and_exact_length() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path().join("s"), UNLIMITED).unwrap();
        let mut data = vec![0u8; 2 << 20];
        data[100] = 1;
        let key = SigningKey::from_bytes(&[1; 32]);
        let (id, _) = crate::import::import_reader(
            &store,
            &key,
            &data[..],
            "z",
            ImageFormat::Raw,
            0,
            |_, _| {},
        )
        .unwrap();
        let mut f = materialize(&store, id, dir.path(), None).unwrap();
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut back).unwrap();
        assert_eq!(back, data);
        use std::os::unix::fs::MetadataExt;
        let md = f.metadata().unwrap();
        assert_eq!(md.nlink(), 0, "unlinked");
        assert!(
            md.blocks() * 512 < data.len() as u64,
            "zero runs left as holes"
        );
    }
}
