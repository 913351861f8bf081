//! Liveness under load: concurrent imports, swarm-style `put_chunk`s,
//! reads, pins and LRU evictions against one small-capped store.
//!
//! This is the workload that once wedged sled 0.34.7 for good (an import
//! stuck in `SegmentAccountant::bump_tip` waiting for a file truncation that
//! sat in sled's IO queue behind log writes that were themselves waiting for
//! the segment accountant: spacejam/sled#1412). Evictions free log segments
//! at the file's end, which queues truncations; bursts of unflushed writes
//! fill sled's IO queue. The test asserts behaviour, not speed: everything
//! finishes (a stuck store is reported, not waited on forever), every read
//! verifies, pins hold, and the accounting matches the chunks on disk.
//!
//! The hang is a race, so a short run proves little by itself: the default
//! (about 4 s) is the CI smoke size. Soak with e.g.
//! `STORE_STRESS_ROUNDS=30 STORE_STRESS_IMAGE_MIB=8 cargo test -p chunks --test store_stress`
//! (about 10 s a run); the store before the fix wedged in about one run of
//! five at that size, in `bump_tip` under `put_chunk_inner` of an import.

use std::io::Read;
use std::sync::mpsc;
use std::time::Duration;

use chunks::{ChunkId, ChunkStore, ImageFormat};
use rand::{RngCore, SeedableRng};

/// Generous bound on the whole workload: it takes a few seconds; only a
/// wedged store gets near this. Not a performance assertion.
const STUCK_AFTER: Duration = Duration::from_secs(45);

fn env(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// Deterministic pseudo-random image of `len` bytes.
struct RandImage {
    rng: rand::rngs::StdRng,
    left: u64,
}

impl Read for RandImage {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        self.rng.fill_bytes(&mut buf[..n]);
        self.left -= n as u64;
        Ok(n)
    }
}

fn chunk(seed: u64, len: usize) -> (ChunkId, Vec<u8>) {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    (ChunkId::of(&v), v)
}

#[test]
fn imports_and_evictions_under_load_never_wedge_the_store() {
    let rounds = env("STORE_STRESS_ROUNDS", 20);
    let image_mib = env("STORE_STRESS_IMAGE_MIB", 6);
    let importers = env("STORE_STRESS_IMPORTERS", 6);
    let dir = tempfile::tempdir().unwrap();
    // Room for the imports in flight and little more: each import evicts
    // chunks written moments ago, which frees log segments at the end of
    // sled's file (the truncation side of the deadlock).
    let cap = ((importers + 1) * image_mib) << 20;
    let store = ChunkStore::open(dir.path(), cap).unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);

    let (done_tx, done_rx) = mpsc::channel::<(&'static str, Result<u64, String>)>();
    let mut workers = 0;

    // Importers: import, then drop the image so the next import evicts it.
    for t in 0..importers {
        let (s, k, tx) = (store.clone(), key.clone(), done_tx.clone());
        workers += 1;
        std::thread::spawn(move || {
            let r = (|| -> Result<u64, String> {
                let mut n = 0;
                for r in 0..rounds {
                    let src = RandImage {
                        rng: rand::rngs::StdRng::seed_from_u64(t * 1000 + r),
                        left: image_mib << 20,
                    };
                    let (id, m) = chunks::import_reader(
                        &s,
                        &k,
                        src,
                        "stress",
                        ImageFormat::Raw,
                        image_mib << 20,
                        |_, _| {},
                    )
                    .map_err(|e| e.to_string())?;
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
                    s.remove_image(id).map_err(|e| e.to_string())?;
                    n += 1;
                }
                Ok(n)
            })();
            let _ = tx.send(("importer", r));
        });
    }

    // Two swarm-style writers: durable single puts of inline-sized chunks,
    // read back at once.
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

    // Accounting matches what is on disk; everything on disk verifies.
    store.flush().unwrap();
    assert!(store.size_bytes() <= cap);
    let rep = store.verify_all().unwrap();
    assert_eq!((rep.bad_removed, rep.repaired), (0, 0), "{rep:?}");
    assert_eq!(rep.ok as usize, store.chunk_count());
    eprintln!(
        "store: {} KiB of chunks (cap {} KiB), {} KiB of sled files ({} KiB blobs)",
        store.size_bytes() >> 10,
        cap >> 10,
        dir_bytes(dir.path()) >> 10,
        dir_bytes(&dir.path().join("blobs")) >> 10
    );
}

fn dir_bytes(p: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut n = 0;
    for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
        let m = e.metadata().unwrap();
        n += if m.is_dir() {
            dir_bytes(&e.path())
        } else {
            m.blocks() * 512
        };
    }
    n
}
