//! Importing an image file into the store: chunk, store, sign, pin.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;

use ed25519_dalek::SigningKey;
use tracing::info;

use crate::chunking::Chunker;
use crate::error::{Error, Result};
use crate::ids::{ChunkId, ImageId};
use crate::manifest::{
    BootInfo, ByteRange, ChunkRef, ImageFormat, Manifest, SignedManifest, MAX_IMAGE_SIZE,
    MAX_NAME_LEN,
};
use crate::store::ChunkStore;

/// What an input file looks like, from its magic bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputKind {
    /// No known header: a raw disk image.
    Raw,
    /// ISO 9660 (`CD001` at byte 0x8001).
    Iso,
    /// qcow2 (`QFI\xfb`); converted to raw on import.
    Qcow2,
}

/// Options for [`import_file`].
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// Image name in the manifest; default: the file name.
    pub name: Option<String>,
    /// Force an input kind instead of detecting it.
    pub kind: Option<InputKind>,
    /// Where `qemu-img` writes the converted raw file; default: the system
    /// temp dir. Needs room for the full virtual disk size.
    pub temp_dir: Option<PathBuf>,
}

/// The parts of a direct-boot (kernel + initrd + disk) image.
#[derive(Clone, Debug)]
pub struct DirectBoot {
    /// Kernel (bzImage or vmlinux).
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Root disk (raw or qcow2).
    pub disk: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
}

/// Detect the kind of an input file from its header.
pub fn detect_kind(path: &Path) -> Result<InputKind> {
    let mut f = File::open(path).map_err(|e| bad_file(path, e))?;
    let mut head = [0u8; 4];
    let n = read_full(&mut f, &mut head).map_err(|e| bad_file(path, e))?;
    if n == 4 && head == *b"QFI\xfb" {
        return Ok(InputKind::Qcow2);
    }
    let mut cd = [0u8; 5];
    if f.seek(SeekFrom::Start(0x8001)).is_ok()
        && read_full(&mut f, &mut cd).map_err(|e| bad_file(path, e))? == 5
        && &cd == b"CD001"
    {
        return Ok(InputKind::Iso);
    }
    Ok(InputKind::Raw)
}

fn read_full(f: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn bad_file(path: &Path, e: std::io::Error) -> Error {
    if crate::error::is_disk_full(&e) {
        return Error::DiskFull {
            what: "reading image",
            path: path.to_path_buf(),
        };
    }
    Error::BadImageFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// A raw view of an input: the file itself, or a qemu-img conversion of it
/// (the temp dir lives as long as this value).
struct RawInput {
    file: File,
    size: u64,
    _tmp: Option<tempfile::TempDir>,
}

fn open_raw(path: &Path, kind: InputKind, temp_dir: Option<&Path>) -> Result<RawInput> {
    if kind != InputKind::Qcow2 {
        let file = File::open(path).map_err(|e| bad_file(path, e))?;
        let md = file.metadata().map_err(|e| bad_file(path, e))?;
        if !md.is_file() {
            return Err(Error::BadImageFile {
                path: path.into(),
                reason: "not a regular file".into(),
            });
        }
        return Ok(RawInput {
            size: md.len(),
            file,
            _tmp: None,
        });
    }
    let base = temp_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::Builder::new()
        .prefix("cpushare-qcow2-")
        .tempdir_in(&base)
        .map_err(|e| Error::io("creating temp dir for qcow2 conversion", &base, e))?;
    let out = tmp.path().join("converted.raw");
    let res = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "qcow2", "-O", "raw"])
        .arg(path)
        .arg(&out)
        .output()
        .map_err(|e| Error::QemuImg {
            path: path.into(),
            detail: format!("cannot run qemu-img: {e}"),
        })?;
    if !res.status.success() {
        let msg = String::from_utf8_lossy(&res.stderr).trim().to_string();
        if msg.contains("No space left") {
            return Err(Error::DiskFull {
                what: "converting qcow2 image",
                path: base,
            });
        }
        return Err(Error::QemuImg {
            path: path.into(),
            detail: msg,
        });
    }
    let file = File::open(&out).map_err(|e| Error::io("opening converted image", &out, e))?;
    let size = file
        .metadata()
        .map_err(|e| Error::io("opening converted image", &out, e))?
        .len();
    Ok(RawInput {
        file,
        size,
        _tmp: Some(tmp),
    })
}

/// Releases import holds on drop (also on error paths).
struct Holds<'a> {
    store: &'a ChunkStore,
    ids: Vec<ChunkId>,
}

impl Drop for Holds<'_> {
    fn drop(&mut self) {
        self.store.release_holds(&self.ids);
    }
}

/// Chunk `src` (of `total` bytes) into the store; returns the chunk list.
/// The chunks stay protected from eviction while `holds` lives. Reading,
/// cutting and hashing run on a second thread, overlapped with the sled
/// writes on this one.
fn store_stream<R: Read + Send>(
    store: &ChunkStore,
    src: R,
    origin: &Path,
    total: u64,
    holds: &mut Holds<'_>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<ChunkRef>> {
    std::thread::scope(|sc| {
        let (tx, rx) = std::sync::mpsc::sync_channel(16);
        sc.spawn(move || {
            for c in Chunker::new(src) {
                let stop = c.is_err();
                // The receiver is gone when the writer gave up: stop reading.
                if tx.send(c).is_err() || stop {
                    break;
                }
            }
        });
        let mut refs = Vec::new();
        let mut done = 0;
        for c in rx {
            let c = c.map_err(|e| Error::io("reading image", origin, e))?;
            store.put_chunk_inner(&c.id, &c.data, true, true)?;
            holds.ids.push(c.id);
            refs.push(ChunkRef {
                id: c.id,
                size: c.data.len() as u32,
            });
            done += c.data.len() as u64;
            progress(done, total);
        }
        Ok(refs)
    })
}

fn finish(
    store: &ChunkStore,
    key: &SigningKey,
    manifest: Manifest,
) -> Result<(ImageId, SignedManifest)> {
    let signed = SignedManifest::sign(manifest, key)?;
    let id = store.put_manifest(&signed)?;
    store.pin(id)?;
    store.flush()?;
    info!(image = %id, name = %signed.manifest().name, size = signed.manifest().total_size, "imported image");
    Ok((id, signed))
}

fn check_name(name: String) -> String {
    if name.len() <= MAX_NAME_LEN {
        return name;
    }
    let mut end = MAX_NAME_LEN;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

fn default_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into())
}

/// Import a raw, ISO or qcow2 file: chunk it into `store`, build and sign its
/// manifest with `key`, store the manifest and pin the image (this node is
/// its seed). `progress(done_bytes, total_bytes)` is called after each chunk.
pub fn import_file(
    store: &ChunkStore,
    key: &SigningKey,
    path: &Path,
    opts: &ImportOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<(ImageId, SignedManifest)> {
    let _span = tracing::info_span!("import", path = %path.display()).entered();
    let kind = match opts.kind {
        Some(k) => k,
        None => detect_kind(path)?,
    };
    let raw = open_raw(path, kind, opts.temp_dir.as_deref())?;
    check_size(path, raw.size)?;
    let format = match kind {
        InputKind::Raw => ImageFormat::Raw,
        InputKind::Iso => ImageFormat::Iso,
        InputKind::Qcow2 => ImageFormat::Qcow2Converted,
    };
    let mut holds = Holds {
        store,
        ids: Vec::new(),
    };
    let refs = store_stream(
        store,
        BufReader::new(raw.file),
        path,
        raw.size,
        &mut holds,
        &mut progress,
    )?;
    let name = check_name(opts.name.clone().unwrap_or_else(|| default_name(path)));
    let manifest = Manifest::new(name, format, refs, None, key.verifying_key());
    if manifest.total_size != raw.size {
        return Err(Error::BadImageFile {
            path: path.into(),
            reason: format!(
                "file changed while importing ({} bytes read, {} expected)",
                manifest.total_size, raw.size
            ),
        });
    }
    finish(store, key, manifest)
}

fn check_size(path: &Path, size: u64) -> Result<()> {
    if size == 0 {
        return Err(Error::BadImageFile {
            path: path.into(),
            reason: "file is empty".into(),
        });
    }
    if size > MAX_IMAGE_SIZE {
        return Err(Error::BadImageFile {
            path: path.into(),
            reason: format!("{size} bytes is larger than the {MAX_IMAGE_SIZE}-byte image limit"),
        });
    }
    Ok(())
}

/// Import a direct-boot image: the disk (if any), kernel and initrd (if any)
/// are laid end to end in that order and the manifest's [`BootInfo`] records
/// each part's byte range.
pub fn import_direct_boot(
    store: &ChunkStore,
    key: &SigningKey,
    parts: &DirectBoot,
    name: &str,
    temp_dir: Option<&Path>,
    mut progress: impl FnMut(u64, u64),
) -> Result<(ImageId, SignedManifest)> {
    let mut inputs: Vec<(PathBuf, RawInput)> = Vec::new();
    let mut format = ImageFormat::Raw;
    if let Some(d) = &parts.disk {
        let kind = detect_kind(d)?;
        if kind == InputKind::Qcow2 {
            format = ImageFormat::Qcow2Converted;
        }
        inputs.push((d.clone(), open_raw(d, kind, temp_dir)?));
    }
    inputs.push((
        parts.kernel.clone(),
        open_raw(&parts.kernel, InputKind::Raw, None)?,
    ));
    if let Some(i) = &parts.initrd {
        inputs.push((i.clone(), open_raw(i, InputKind::Raw, None)?));
    }
    let mut ranges = Vec::new();
    let mut off = 0u64;
    for (p, r) in &inputs {
        if r.size == 0 {
            return Err(Error::BadImageFile {
                path: p.clone(),
                reason: "file is empty".into(),
            });
        }
        ranges.push(ByteRange {
            offset: off,
            len: r.size,
        });
        off += r.size;
    }
    check_size(&parts.kernel, off)?;
    let mut it = ranges.iter().copied();
    let disk = parts.disk.as_ref().and_then(|_| it.next());
    let kernel = it.next().expect("kernel range");
    let initrd = parts.initrd.as_ref().and_then(|_| it.next());
    let total = off;
    // One chunk stream over the concatenation, so parts dedupe across versions.
    let mut chain: Box<dyn Read + Send> = Box::new(std::io::empty());
    for (p, r) in inputs.iter() {
        let f = r
            .file
            .try_clone()
            .map_err(|e| Error::io("reading image", p, e))?;
        chain = Box::new(chain.chain(BufReader::new(f)));
    }
    let mut holds = Holds {
        store,
        ids: Vec::new(),
    };
    let refs = store_stream(
        store,
        chain,
        &parts.kernel,
        total,
        &mut holds,
        &mut progress,
    )?;
    let boot = BootInfo {
        kernel,
        initrd,
        disk,
        cmdline: parts.cmdline.clone(),
    };
    let manifest = Manifest::new(
        check_name(name.to_string()),
        format,
        refs,
        Some(boot),
        key.verifying_key(),
    );
    if manifest.total_size != total {
        return Err(Error::BadImageFile {
            path: parts.kernel.clone(),
            reason: "input files changed while importing".into(),
        });
    }
    finish(store, key, manifest)
}

/// Chunk any reader into the store and sign a manifest for it (used by tests
/// and by callers that already have a raw stream).
pub fn import_reader<R: Read + Send>(
    store: &ChunkStore,
    key: &SigningKey,
    src: R,
    name: &str,
    format: ImageFormat,
    total_hint: u64,
    mut progress: impl FnMut(u64, u64),
) -> Result<(ImageId, SignedManifest)> {
    let mut holds = Holds {
        store,
        ids: Vec::new(),
    };
    let refs = store_stream(
        store,
        src,
        Path::new(name),
        total_hint,
        &mut holds,
        &mut progress,
    )?;
    let manifest = Manifest::new(
        check_name(name.to_string()),
        format,
        refs,
        None,
        key.verifying_key(),
    );
    if manifest.total_size > MAX_IMAGE_SIZE {
        return Err(Error::ManifestTooLarge(format!(
            "image of {} bytes",
            manifest.total_size
        )));
    }
    finish(store, key, manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::materialize::{export, materialize, materialize_range};
    use crate::store::UNLIMITED;
    use rand::{RngCore, SeedableRng};
    use std::io::Read;

    fn random(n: usize, seed: u64) -> Vec<u8> {
        let mut v = vec![0u8; n];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    }

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[42; 32])
    }

    fn read_all(mut f: File) -> Vec<u8> {
        let mut v = Vec::new();
        f.read_to_end(&mut v).unwrap();
        v
    }

    #[test]
    fn import_raw_then_materialize_and_export() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path().join("store"), UNLIMITED).unwrap();
        let mut data = random(3 << 20, 7);
        data[1 << 20..(1 << 20) + 600_000].fill(0); // a hole-worthy run
        let src = dir.path().join("disk.img");
        std::fs::write(&src, &data).unwrap();
        let mut calls = Vec::new();
        let (id, m) = import_file(&store, &key(), &src, &ImportOptions::default(), |d, t| {
            calls.push((d, t))
        })
        .unwrap();
        assert_eq!(m.image_id(), id);
        assert_eq!(m.manifest().name, "disk.img");
        assert_eq!(m.manifest().format, ImageFormat::Raw);
        assert_eq!(m.manifest().total_size, data.len() as u64);
        assert_eq!(m.importer(), &key().verifying_key());
        assert_eq!(calls.last(), Some(&(data.len() as u64, data.len() as u64)));
        assert!(calls.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(store.is_pinned(id), "imported images are pinned");
        assert!(store.is_complete(id).unwrap());
        assert_eq!(store.list_images().unwrap(), vec![id]);

        // Materialise: right bytes, no name on disk.
        let vmdir = dir.path().join("vm");
        std::fs::create_dir(&vmdir).unwrap();
        let f = materialize(&store, id, &vmdir, None).unwrap();
        assert_eq!(
            std::fs::read_dir(&vmdir).unwrap().count(),
            0,
            "path unlinked"
        );
        assert_eq!(read_all(f), data);
        let e = materialize(&store, id, &vmdir, Some(data.len() as u64 - 1)).unwrap_err();
        assert!(matches!(e, Error::ImageTooLarge { .. }), "{e:?}");

        // Export: a normal file with the same bytes, nothing else left behind.
        let out = dir.path().join("out").join("copy.img");
        std::fs::create_dir(out.parent().unwrap()).unwrap();
        assert_eq!(export(&store, id, &out).unwrap(), data.len() as u64);
        assert_eq!(std::fs::read(&out).unwrap(), data);
        assert_eq!(std::fs::read_dir(out.parent().unwrap()).unwrap().count(), 1);

        // Same file, same key: same image id (canonical, deterministic).
        let (id2, _) =
            import_file(&store, &key(), &src, &ImportOptions::default(), |_, _| {}).unwrap();
        assert_eq!(id2, id);
    }

    #[test]
    fn failed_export_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path().join("store"), UNLIMITED).unwrap();
        let data = random(1 << 20, 8);
        let (id, m) = import_reader(
            &store,
            &key(),
            &data[..],
            "x",
            ImageFormat::Raw,
            0,
            |_, _| {},
        )
        .unwrap();
        // Lose one chunk (as after eviction or a corrupt read).
        let victim = m.manifest().chunks[3].id;
        store.unpin(id).unwrap();
        let outdir = dir.path().join("out");
        std::fs::create_dir(&outdir).unwrap();
        let other = ChunkStore::open(dir.path().join("store2"), UNLIMITED).unwrap();
        other.put_manifest(&m).unwrap();
        for c in m.manifest().unique_chunks() {
            if c.id != victim {
                other
                    .put_chunk(&c.id, &store.get_chunk(&c.id).unwrap().unwrap())
                    .unwrap();
            }
        }
        assert_eq!(other.missing_chunks(id).unwrap(), vec![victim]);
        let e = export(&other, id, &outdir.join("img")).unwrap_err();
        assert!(
            matches!(e, Error::ImageIncomplete { missing: 1, .. }),
            "{e:?}"
        );
        assert_eq!(std::fs::read_dir(&outdir).unwrap().count(), 0);
        let e = materialize(&other, id, &outdir, None).unwrap_err();
        assert!(matches!(e, Error::ImageIncomplete { .. }));
        let e = export(&other, crate::ids::ImageId([3; 32]), &outdir.join("img")).unwrap_err();
        assert!(matches!(e, Error::UnknownImage(_)));
    }

    #[test]
    fn second_version_reuses_chunks_in_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), UNLIMITED).unwrap();
        let n = 8 << 20;
        let v1 = random(n, 11);
        import_reader(
            &store,
            &key(),
            &v1[..],
            "v1",
            ImageFormat::Raw,
            n as u64,
            |_, _| {},
        )
        .unwrap();
        let before = store.size_bytes();
        let mut v2 = v1.clone();
        for at in [1_000_000usize, 5_000_000] {
            for b in &mut v2[at..at + n / 200] {
                *b ^= 0x5a;
            }
        }
        let (id2, m2) = import_reader(
            &store,
            &key(),
            &v2[..],
            "v2",
            ImageFormat::Raw,
            n as u64,
            |_, _| {},
        )
        .unwrap();
        let added = store.size_bytes() - before;
        // Only chunks v1 lacks were added (the 5 % average bound over many
        // images is checked in chunking::tests; one sample varies).
        let v1_ids: std::collections::HashSet<_> = crate::chunking::chunk_ids(&v1[..])
            .unwrap()
            .into_iter()
            .map(|c| c.0)
            .collect();
        let expect: u64 = m2
            .manifest()
            .unique_chunks()
            .iter()
            .filter(|c| !v1_ids.contains(&c.id))
            .map(|c| c.size as u64)
            .sum();
        assert_eq!(added, expect);
        assert!(added * 10 <= n as u64, "v2 added {added} bytes");
        assert!(store.is_complete(id2).unwrap());
    }

    #[test]
    fn iso_detection_and_empty_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut iso = random(64 * 1024, 9);
        iso[0x8001..0x8006].copy_from_slice(b"CD001");
        let p = dir.path().join("live.iso");
        std::fs::write(&p, &iso).unwrap();
        assert_eq!(detect_kind(&p).unwrap(), InputKind::Iso);
        let store = ChunkStore::open(dir.path().join("s"), UNLIMITED).unwrap();
        let (_, m) = import_file(&store, &key(), &p, &ImportOptions::default(), |_, _| {}).unwrap();
        assert_eq!(m.manifest().format, ImageFormat::Iso);

        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        let e =
            import_file(&store, &key(), &empty, &ImportOptions::default(), |_, _| {}).unwrap_err();
        assert!(e.to_string().contains("file is empty"), "{e}");
        let e = import_file(
            &store,
            &key(),
            &dir.path().join("nope"),
            &ImportOptions::default(),
            |_, _| {},
        )
        .unwrap_err();
        assert!(matches!(e, Error::BadImageFile { .. }), "{e:?}");
        let e = import_file(
            &store,
            &key(),
            dir.path(),
            &ImportOptions::default(),
            |_, _| {},
        )
        .unwrap_err();
        assert!(matches!(e, Error::BadImageFile { .. }), "{e:?}");
    }

    #[test]
    fn qcow2_is_converted_with_qemu_img() {
        let dir = tempfile::tempdir().unwrap();
        let mut raw = random(2 << 20, 10);
        raw[512 * 1024..1024 * 1024].fill(0);
        let rawp = dir.path().join("d.raw");
        std::fs::write(&rawp, &raw).unwrap();
        let q = dir.path().join("d.qcow2");
        let st = Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&rawp)
            .arg(&q)
            .status()
            .expect("qemu-img must be installed (Debian package qemu-utils)");
        assert!(st.success());
        assert_eq!(detect_kind(&q).unwrap(), InputKind::Qcow2);
        let store = ChunkStore::open(dir.path().join("s"), UNLIMITED).unwrap();
        let tmp = dir.path().join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        let opts = ImportOptions {
            temp_dir: Some(tmp.clone()),
            ..Default::default()
        };
        let (id, m) = import_file(&store, &key(), &q, &opts, |_, _| {}).unwrap();
        assert_eq!(m.manifest().format, ImageFormat::Qcow2Converted);
        assert_eq!(
            std::fs::read_dir(&tmp).unwrap().count(),
            0,
            "converted temp file removed"
        );
        let out = dir.path().join("back.raw");
        export(&store, id, &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), raw);

        // A broken qcow2 gives a qemu-img error, not a panic.
        let mut broken = std::fs::read(&q).unwrap();
        broken.truncate(100);
        let bq = dir.path().join("broken.qcow2");
        std::fs::write(&bq, &broken).unwrap();
        let e = import_file(&store, &key(), &bq, &opts, |_, _| {}).unwrap_err();
        assert!(matches!(e, Error::QemuImg { .. }), "{e:?}");
    }

    #[test]
    fn direct_boot_parts_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path().join("s"), UNLIMITED).unwrap();
        let kernel = random(700_000, 1);
        let initrd = random(300_000, 2);
        let disk = random(1_000_000, 3);
        for (n, d) in [("k", &kernel), ("i", &initrd), ("d", &disk)] {
            std::fs::write(dir.path().join(n), d).unwrap();
        }
        let parts = DirectBoot {
            kernel: dir.path().join("k"),
            initrd: Some(dir.path().join("i")),
            disk: Some(dir.path().join("d")),
            cmdline: "console=ttyS0 root=/dev/vda".into(),
        };
        let (id, m) = import_direct_boot(&store, &key(), &parts, "guest", None, |_, _| {}).unwrap();
        let boot = m.manifest().boot.clone().unwrap();
        assert_eq!(boot.cmdline, "console=ttyS0 root=/dev/vda");
        let d = dir.path();
        assert_eq!(read_all(materialize(&store, id, d, None).unwrap()), disk);
        assert_eq!(
            read_all(materialize_range(&store, id, boot.kernel, d, None).unwrap()),
            kernel
        );
        assert_eq!(
            read_all(materialize_range(&store, id, boot.initrd.unwrap(), d, None).unwrap()),
            initrd
        );
        let bad = ByteRange {
            offset: m.manifest().total_size,
            len: 1,
        };
        assert!(matches!(
            materialize_range(&store, id, bad, d, None),
            Err(Error::RangeOutOfImage { .. })
        ));

        // Kernel + initrd only: no disk to materialise.
        let parts = DirectBoot {
            disk: None,
            ..parts
        };
        let (id, _) =
            import_direct_boot(&store, &key(), &parts, "netboot", None, |_, _| {}).unwrap();
        assert!(matches!(
            materialize(&store, id, d, None),
            Err(Error::NoDisk(_))
        ));
    }

    #[test]
    fn import_under_small_cap_keeps_its_own_chunks() {
        // Cap smaller than the image: the import fails cleanly with
        // StoreFull instead of evicting its own earlier chunks.
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), 1 << 20).unwrap();
        let data = random(2 << 20, 12);
        let e = import_reader(
            &store,
            &key(),
            &data[..],
            "big",
            ImageFormat::Raw,
            0,
            |_, _| {},
        )
        .unwrap_err();
        assert!(matches!(e, Error::StoreFull { .. }), "{e:?}");
        // Its chunks are no longer held: another image can push them out.
        let other = random(1 << 20, 13);
        import_reader(
            &store,
            &key(),
            &other[..],
            "small",
            ImageFormat::Raw,
            0,
            |_, _| {},
        )
        .unwrap();
        assert!(store.size_bytes() <= 1 << 20);
    }

    #[test]
    fn read_error_mid_import_is_reported_and_releases_holds() {
        struct FailAfter(Vec<u8>, usize);
        impl Read for FailAfter {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                if self.1 >= self.0.len() {
                    return Err(std::io::Error::other("device went away"));
                }
                let n = out.len().min(self.0.len() - self.1);
                out[..n].copy_from_slice(&self.0[self.1..self.1 + n]);
                self.1 += n;
                Ok(n)
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), UNLIMITED).unwrap();
        let src = FailAfter(random(6 << 20, 21), 0);
        let e =
            import_reader(&store, &key(), src, "x", ImageFormat::Raw, 0, |_, _| {}).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e:?}");
        assert!(e.to_string().contains("device went away"), "{e}");
        assert!(
            store.list_images().unwrap().is_empty(),
            "no manifest for a failed import"
        );
        assert!(store.no_holds(), "holds released");
    }
}
