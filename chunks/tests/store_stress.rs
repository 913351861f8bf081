//! The chunk store under churn: concurrent imports, swarm-style
//! `put_chunk`s, reads, pins, guest disks materialised against the cap, and
//! LRU evictions, all against one small-capped store.
//!
//! What it asserts (behaviour, not speed):
//! - the bytes on disk (every file and directory under the store directory,
//!   as `du` counts them, the materialised guest disks included) never
//!   exceed the cap x 1.1, sampled every round of every importer and by a
//!   sampler thread in between;
//! - every export and every materialised disk is byte-for-byte the image
//!   that was imported;
//! - everything finishes (a stuck store is reported, not waited on forever:
//!   this workload once wedged sled 0.34.7, spacejam/sled#1412);
//! - every read verifies, pins hold, and the accounting matches the chunks
//!   on disk.
//!
//! The default (30-60 s on a loaded 2-core machine) is the CI size. Soak with e.g.
//! `STORE_STRESS_ROUNDS=60 STORE_STRESS_IMAGE_MIB=8 cargo test -p chunks --test store_stress -- --nocapture`.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use chunks::{ChunkId, ChunkStore, ImageFormat};
use rand::{RngCore, SeedableRng};

/// Generous bound on the whole workload: it takes a few seconds; only a
/// wedged store gets near this. Not a performance assertion.
const STUCK_AFTER: Duration = Duration::from_secs(90);

fn env(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// Deterministic pseudo-random image of `len` bytes: the same bytes however
/// the reader splits its reads (the generator runs in whole blocks).
struct RandImage {
    rng: rand::rngs::StdRng,
    left: u64,
    block: Vec<u8>,
    at: usize,
}

impl RandImage {
    fn new(seed: u64, len: u64) -> Self {
        RandImage {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            left: len,
            block: vec![0; 4096],
            at: 4096,
        }
    }
}

impl Read for RandImage {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.at == self.block.len() {
            self.rng.fill_bytes(&mut self.block);
            self.at = 0;
        }
        let n = buf.len().min(self.block.len() - self.at);
        let n = (n as u64).min(self.left) as usize;
        buf[..n].copy_from_slice(&self.block[self.at..self.at + n]);
        self.at += n;
        self.left -= n as u64;
        Ok(n)
    }
}

fn hash_of(mut r: impl Read) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    std::io::copy(&mut r, &mut h).unwrap();
    h.finalize()
}

fn chunk(seed: u64, len: usize) -> (ChunkId, Vec<u8>) {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    (ChunkId::of(&v), v)
}

/// Bytes allocated under `p`, as `du` counts them: files and directories.
/// Files that vanish while we walk (evicted chunks) count as gone.
fn du(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    let mut n = md.blocks() * 512;
    if md.is_dir() {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            n += du(&e.path());
        }
    }
    n
}

/// Highest `du` of the store seen so far.
struct DiskSampler {
    dir: std::path::PathBuf,
    max: AtomicU64,
    samples: AtomicU64,
}

impl DiskSampler {
    fn sample(&self) -> u64 {
        let n = du(&self.dir);
        self.max.fetch_max(n, Ordering::SeqCst);
        self.samples.fetch_add(1, Ordering::Relaxed);
        n
    }
}

#[test]
fn churn_keeps_disk_use_under_the_cap_and_every_export_verifies() {
    let rounds = env("STORE_STRESS_ROUNDS", 20);
    let image_mib = env("STORE_STRESS_IMAGE_MIB", 6);
    let importers = env("STORE_STRESS_IMPORTERS", 6);
    let image = image_mib << 20;
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    // Each importer holds at most one image's chunks (pinned) and one
    // materialised disk at a time; one image more is room to churn in, so
    // every round's import evicts chunks written moments ago.
    let cap = (2 * importers + 1) * image;
    let store = ChunkStore::open(dir.path(), cap).unwrap();
    // Guest disks go inside the store directory here, so the sampled `du`
    // sees them next to the chunks that count against the same cap.
    let vm_tmp = dir.path().join("vm-tmp");
    std::fs::create_dir_all(&vm_tmp).unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let disk = Arc::new(DiskSampler {
        dir: dir.path().to_path_buf(),
        max: AtomicU64::new(0),
        samples: AtomicU64::new(0),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (disk, stop) = (disk.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                disk.sample();
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };

    let (done_tx, done_rx) = mpsc::channel::<(&'static str, Result<u64, String>)>();
    let mut workers = 0;

    // Importers: import, materialise (reserved against the cap) and export,
    // check both against the source, then drop the image so the next
    // import evicts it.
    for t in 0..importers {
        let (s, k, tx) = (store.clone(), key.clone(), done_tx.clone());
        let (disk, vm_tmp, out) = (disk.clone(), vm_tmp.clone(), out.path().to_path_buf());
        workers += 1;
        std::thread::spawn(move || {
            let r = (|| -> Result<u64, String> {
                let mut n = 0;
                for r in 0..rounds {
                    let seed = t * 1000 + r;
                    let want = hash_of(RandImage::new(seed, image));
                    let (id, m) = chunks::import_reader(
                        &s,
                        &k,
                        RandImage::new(seed, image),
                        "stress",
                        ImageFormat::Raw,
                        image,
                        |_, _| {},
                    )
                    .map_err(|e| e.to_string())?;
                    disk.sample();
                    // Pinned and complete right after the import.
                    if !s.is_complete(id).map_err(|e| e.to_string())? {
                        return Err(format!("image {id} incomplete after import"));
                    }
                    for c in m.manifest().unique_chunks().iter().step_by(7) {
                        let got = s.get_chunk(&c.id).map_err(|e| e.to_string())?;
                        if got.as_deref().map(ChunkId::of) != Some(c.id) {
                            return Err(format!("pinned chunk {} missing or bad", c.id));
                        }
                    }
                    // A guest disk: counted against the cap while it lives.
                    let mut g = chunks::materialize::materialize_reserved(&s, id, &vm_tmp, None)
                        .map_err(|e| e.to_string())?;
                    disk.sample();
                    if hash_of(&mut g.file) != want {
                        return Err(format!("materialised disk of {id} differs"));
                    }
                    drop(g);
                    let dest = out.join(format!("export-{t}.img"));
                    chunks::export(&s, id, &dest).map_err(|e| e.to_string())?;
                    let got = hash_of(std::fs::File::open(&dest).map_err(|e| e.to_string())?);
                    if got != want {
                        return Err(format!("export of {id} does not verify"));
                    }
                    std::fs::remove_file(&dest).map_err(|e| e.to_string())?;
                    s.remove_image(id).map_err(|e| e.to_string())?;
                    disk.sample();
                    n += 1;
                }
                Ok(n)
            })();
            let _ = tx.send(("importer", r));
        });
    }

    // Two swarm-style writers: durable single puts, read back at once.
    for t in 0..2u64 {
        let (s, tx) = (store.clone(), done_tx.clone());
        workers += 1;
        std::thread::spawn(move || {
            let r = (|| -> Result<u64, String> {
                let per = rounds * 20;
                for i in 0..per {
                    let (id, d) = chunk(
                        1_000_000 * (t + 1) + i,
                        16_384 + (i as usize * 7919) % 100_000,
                    );
                    s.put_chunk(&id, &d).map_err(|e| e.to_string())?;
                    match s.get_chunk(&id).map_err(|e| e.to_string())? {
                        // May already be evicted by a concurrent import.
                        None => {}
                        Some(v) if v == d => {}
                        Some(_) => return Err(format!("chunk {id} read back wrong")),
                    }
                }
                Ok(per)
            })();
            let _ = tx.send(("writer", r));
        });
    }
    drop(done_tx);

    let stuck_after = Duration::from_secs(env("STORE_STRESS_STUCK_S", STUCK_AFTER.as_secs()));
    let deadline = std::time::Instant::now() + stuck_after;
    for _ in 0..workers {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match done_rx.recv_timeout(left) {
            Ok((who, Ok(n))) => eprintln!("{who} finished {n} rounds"),
            Ok((who, Err(e))) => panic!("{who} failed: {e}"),
            Err(_) => panic!(
                "chunk store wedged: workers not done after {stuck_after:?} \
                 (see spacejam/sled#1412)"
            ),
        }
    }
    stop.store(true, Ordering::SeqCst);
    sampler.join().unwrap();

    // Accounting matches what is on disk; everything on disk verifies.
    store.flush().unwrap();
    let end = disk.sample();
    assert!(store.size_bytes() <= cap);
    assert_eq!(store.reserved_bytes(), 0, "every guest disk was dropped");
    let rep = store.verify_all().unwrap();
    assert_eq!((rep.bad_removed, rep.repaired), (0, 0), "{rep:?}");
    assert_eq!(rep.ok as usize, store.chunk_count());
    let max = disk.max.load(Ordering::SeqCst);
    eprintln!(
        "store: cap {} KiB; on disk: max {} KiB ({:.3} x cap) over {} samples, {} KiB at the end \
         ({} KiB of chunks, {} KiB index)",
        cap >> 10,
        max >> 10,
        max as f64 / cap as f64,
        disk.samples.load(Ordering::Relaxed),
        end >> 10,
        store.size_bytes() >> 10,
        du(&dir.path().join("index")) >> 10,
    );
    assert!(
        max <= cap + cap / 10,
        "store used {max} bytes on disk, over the cap {cap} x 1.1"
    );
}
