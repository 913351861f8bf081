//! Unit tests of the chunk store (real files, real sled, real `kill -9`).

use super::files::Found;
use super::writer::WRITE_OVERHEAD;
use super::*;
use crate::chunking::MAX_CHUNK;
use crate::error::Error;
use crate::ids::ChunkId;
use crate::manifest::{ChunkRef, Manifest, SignedManifest};
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

/// Payload bytes of all chunk files.
fn file_bytes(s: &ChunkStore) -> u64 {
    s.inner
        .files
        .scan()
        .unwrap()
        .into_iter()
        .map(|f| match f {
            Found::Chunk(id) => s.inner.files.len(&id).unwrap_or(0),
            Found::Stray(p) => panic!("stray {}", p.display()),
        })
        .sum()
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
    assert!(!s.inner.files.exists(&id2));
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
fn garbage_in_a_chunk_file_is_never_returned() {
    let dir = tempfile::tempdir().unwrap();
    let (id, data) = chunk(3, 4096);
    let (id_b, data_b) = chunk(4, 4096);
    {
        let s = ChunkStore::open(dir.path(), UNLIMITED).unwrap();
        s.put_chunk(&id, &data).unwrap();
        s.put_chunk(&id_b, &data_b).unwrap();
        // Corruption under a running store (as a torn write would leave it).
        let mut bad = data.clone();
        bad[100] ^= 0xff;
        std::fs::write(s.inner.files.path(&id), bad).unwrap();
        assert_eq!(s.get_chunk(&id).unwrap(), None);
        assert!(!s.has_chunk(&id));
        assert_eq!(s.bad_chunks_removed(), 1);
        assert!(!s.inner.files.exists(&id), "bad file deleted");
        assert_eq!(s.size_bytes(), 4096);
        s.flush().unwrap();
    }
    // Corruption while the store is closed (another process wrote garbage),
    // and files that are no chunk at all.
    let hex = id_b.to_hex();
    let file_b = dir.path().join("chunks").join(&hex[..2]).join(&hex);
    std::fs::write(&file_b, b"garbage").unwrap();
    let stray = dir.path().join("chunks").join("zz");
    std::fs::write(&stray, b"x").unwrap();
    let s = ChunkStore::open(dir.path(), UNLIMITED).unwrap();
    assert!(!stray.exists(), "stray file deleted at open");
    assert!(s.has_chunk(&id_b), "listed until read");
    assert_eq!(s.get_chunk(&id_b).unwrap(), None);
    assert!(!s.has_chunk(&id_b));
    let short = dir.path().join("chunks").join("ab").join("short-name");
    std::fs::create_dir_all(short.parent().unwrap()).unwrap();
    std::fs::write(&short, b"x").unwrap();
    let rep = s.verify_all().unwrap();
    assert_eq!(rep.ok, 0);
    assert_eq!(rep.bad_removed, 1, "the malformed name");
    assert!(!short.exists());
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
    let f = &s.inner.files;
    std::fs::write(f.path(&cs[0].0), b"bad").unwrap();
    std::fs::write(f.path(&cs[1].0), &cs[2].1).unwrap();
    // entry without file
    std::fs::remove_file(f.path(&cs[3].0)).unwrap();
    // file without entry
    let (oid, od) = chunk(99, 3000);
    std::fs::create_dir_all(f.path(&oid).parent().unwrap()).unwrap();
    std::fs::write(f.path(&oid), &od).unwrap();
    let rep = s.verify_all().unwrap();
    assert_eq!(rep.ok, 4);
    assert_eq!(rep.bad_removed, 2);
    assert_eq!(rep.repaired, 2);
    assert_eq!(s.size_bytes(), 4 * 3000);
    assert!(s.has_chunk(&oid));
    assert_eq!(
        s.verify_all().unwrap(),
        VerifyReport {
            ok: 4,
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
    s.inner.trees.manifests.insert(id.0, b).unwrap();
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
    std::fs::write(dir.path().join("index/conf"), b"this is not a sled config").unwrap();
    let e = ChunkStore::open(dir.path(), UNLIMITED).unwrap_err();
    assert!(matches!(e, Error::StoreCorrupt { .. }), "{e:?}");
    assert!(e.to_string().contains("is corrupt"), "{e}");
    // Garbage over the whole index: sled recovers nothing, but the chunk
    // files are still there, adopted and served only if they verify.
    std::fs::remove_file(dir.path().join("index/conf")).unwrap();
    let db = dir.path().join("index/db");
    let len = std::fs::metadata(&db).unwrap().len() as usize;
    std::fs::write(&db, vec![0xa5u8; len]).unwrap();
    match ChunkStore::open(dir.path(), UNLIMITED) {
        Ok(s) => {
            assert_eq!(
                s.get_chunk(&chunk(1, 100).0).unwrap(),
                Some(chunk(1, 100).1)
            );
            assert_eq!(s.verify_all().unwrap().ok, 1);
        }
        Err(e) => assert!(matches!(e, Error::StoreCorrupt { .. }), "{e:?}"),
    }
}

#[test]
fn lru_eviction_respects_pins() {
    let dir = tempfile::tempdir().unwrap();
    let sz = 12_288usize;
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
    assert!(
        !s.inner.files.exists(&others[1].0),
        "its file deleted at once"
    );
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
    let cs: Vec<_> = (0..6).map(|i| chunk(900 + i, 4096)).collect();
    let m = manifest_of(&cs[..2], "keep");
    {
        let s = ChunkStore::open(dir.path(), UNLIMITED).unwrap();
        s.put_manifest(&m).unwrap();
        s.pin(m.image_id()).unwrap();
        for (id, d) in &cs {
            s.put_chunk(id, d).unwrap();
        }
    }
    let s = ChunkStore::open(dir.path(), 3 * 4096).unwrap();
    assert_eq!(s.size_bytes(), 3 * 4096);
    assert!(
        s.has_chunk(&cs[0].0) && s.has_chunk(&cs[1].0),
        "pinned kept"
    );
    assert!(s.has_chunk(&cs[5].0), "newest unpinned kept");
}

#[test]
fn lru_order_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let sz = 4096;
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
    assert_eq!(file_bytes(&s), s.size_bytes());
    drop(guard);
    assert!(!s.is_pinned(m.image_id()));
}

/// The bound that keeps sled's IO queue short (module docs, "Liveness"):
/// an import that never flushes still waits for the disk every window.
#[test]
fn unflushed_writes_never_pile_up_past_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let s = ChunkStore::open(dir.path(), UNLIMITED).unwrap();
    // Manifest-sized index writes, never flushed by their callers.
    for i in 0..48u8 {
        let v = vec![i; 100_000];
        s.write(v.len() as u64, false, move |t| {
            t.manifests.insert([i], v).map(|_| ()).map_err(|e| t.err(e))
        })
        .unwrap();
    }
    let peak = s.peak_backlog();
    assert!(peak >= LOG_WINDOW / 2, "{peak}: writes were not counted");
    assert!(
        peak <= LOG_WINDOW + 100_000 + WRITE_OVERHEAD,
        "{peak} bytes written without waiting for the disk"
    );
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
        for f in s.inner.files.scan().unwrap() {
            let Found::Chunk(id) = f else {
                panic!("stray file after kill")
            };
            let v = std::fs::read(s.inner.files.path(&id)).unwrap();
            assert_eq!(ChunkId::of(&v), id, "bad chunk on disk after kill");
            assert!(s.has_chunk(&id));
            present += v.len() as u64;
        }
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0,
            "temp files of the killed writer removed"
        );
        assert_eq!(s.size_bytes(), present, "size accounting after kill");
        assert!(s.size_bytes() <= cap);
        let rep = s.verify_all().unwrap();
        assert_eq!((rep.bad_removed, rep.repaired), (0, 0), "{rep:?}");
    }
}

#[test]
fn reservations_count_against_the_cap_and_evict() {
    let dir = tempfile::tempdir().unwrap();
    let sz = 12_288usize;
    let s = ChunkStore::open(dir.path(), 10 * sz as u64).unwrap();
    let pinned: Vec<_> = (0..4).map(|i| chunk(2000 + i, sz)).collect();
    let m = manifest_of(&pinned, "pinned");
    s.put_manifest(&m).unwrap();
    s.pin(m.image_id()).unwrap();
    let others: Vec<_> = (0..6).map(|i| chunk(2100 + i, sz)).collect();
    for (id, d) in pinned.iter().chain(&others) {
        s.put_chunk(id, d).unwrap();
    }
    // Room for a 3-chunk disk comes from the 3 oldest unpinned chunks,
    // whose files are gone when reserve returns.
    let r = s.reserve(3 * sz as u64, "a test disk").unwrap();
    assert_eq!(
        (r.bytes(), s.reserved_bytes()),
        (3 * sz as u64, 3 * sz as u64)
    );
    assert_eq!(s.size_bytes(), 7 * sz as u64);
    for (id, _) in &others[..3] {
        assert!(!s.has_chunk(id) && !s.inner.files.exists(id));
    }
    // New chunks now evict instead of growing past cap - reserved.
    let (nid, nd) = chunk(2200, sz);
    s.put_chunk(&nid, &nd).unwrap();
    assert_eq!(s.size_bytes() + s.reserved_bytes(), 10 * sz as u64);
    assert_eq!(s.used_bytes(), 10 * sz as u64);
    // Pinned chunks and the first reservation leave no room for 4 more.
    let e = s
        .reserve(4 * sz as u64, "materialising a guest disk")
        .unwrap_err();
    assert!(
        matches!(e, Error::DiskCapExceeded { needed, .. } if needed == sz as u64),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .starts_with("disk cap exceeded: materialising a guest disk needs"),
        "{e}"
    );
    assert_eq!(
        s.size_bytes(),
        7 * sz as u64,
        "a failed reservation evicts nothing"
    );
    drop(r);
    assert_eq!(s.reserved_bytes(), 0);
    let r = s.reserve(6 * sz as u64, "a test disk").unwrap();
    assert!(pinned.iter().all(|(id, _)| s.has_chunk(id)));
    assert_eq!(s.size_bytes(), 4 * sz as u64);
    drop(r);
}

#[test]
fn files_without_entries_are_adopted_and_entries_without_files_dropped_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let cs: Vec<_> = (0..3).map(|i| chunk(3000 + i, 5000)).collect();
    let orphan = chunk(3100, 7000);
    {
        let s = ChunkStore::open(dir.path(), UNLIMITED).unwrap();
        for (id, d) in &cs {
            s.put_chunk(id, d).unwrap();
        }
        // As a crash between a chunk's rename and its index entry, and
        // between an eviction's index write and its unlink, leave them.
        let p = s.inner.files.path(&orphan.0);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, &orphan.1).unwrap();
        std::fs::remove_file(s.inner.files.path(&cs[0].0)).unwrap();
        std::fs::write(dir.path().join("tmp").join("chunk-half"), b"torn").unwrap();
    }
    let s = ChunkStore::open(dir.path(), UNLIMITED).unwrap();
    assert!(!s.has_chunk(&cs[0].0));
    assert!(s.has_chunk(&orphan.0));
    assert_eq!(s.size_bytes(), 2 * 5000 + 7000);
    assert_eq!(file_bytes(&s), s.size_bytes());
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
    assert_eq!(s.get_chunk(&orphan.0).unwrap().unwrap(), orphan.1);
    let rep = s.verify_all().unwrap();
    assert_eq!(
        (rep.ok, rep.bad_removed, rep.repaired),
        (3, 0, 0),
        "{rep:?}"
    );
}

/// Writes a store in the previous layout: sled at the top level with the
/// chunk payloads in its `chunks` tree.
fn old_layout_store(dir: &Path, cs: &[(ChunkId, Vec<u8>)], m: &SignedManifest) {
    let db = sled::open(dir).unwrap();
    let (c, meta) = (
        db.open_tree("chunks").unwrap(),
        db.open_tree("meta").unwrap(),
    );
    for (i, (id, d)) in cs.iter().enumerate() {
        c.insert(id.0, &d[..]).unwrap();
        meta.insert(id.0, &lru::meta_value(d.len() as u32, i as u64 + 1)[..])
            .unwrap();
    }
    // A chunk that does not match its id is not carried over.
    let bad = chunk(4999, 100);
    c.insert(bad.0 .0, &b"not it"[..]).unwrap();
    meta.insert(bad.0 .0, &lru::meta_value(6, 9)[..]).unwrap();
    db.open_tree("manifests")
        .unwrap()
        .insert(m.image_id().0, m.as_bytes())
        .unwrap();
    db.open_tree("pins")
        .unwrap()
        .insert(m.image_id().0, &[][..])
        .unwrap();
    db.flush().unwrap();
}

#[test]
fn old_layout_is_converted_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let cs: Vec<_> = (0..5)
        .map(|i| chunk(4000 + i, 150_000 + i as usize))
        .collect();
    let m = manifest_of(&cs[..2], "old");
    old_layout_store(dir.path(), &cs, &m);
    assert!(dir.path().join("db").exists() && dir.path().join("conf").exists());
    {
        let s = ChunkStore::open(dir.path(), UNLIMITED).unwrap();
        for (id, d) in &cs {
            assert_eq!(s.get_chunk(id).unwrap().as_ref(), Some(d));
        }
        assert_eq!(s.chunk_count(), 5, "the bad chunk is left behind");
        assert_eq!(
            s.size_bytes(),
            cs.iter().map(|c| c.1.len() as u64).sum::<u64>()
        );
        assert_eq!(s.get_manifest(m.image_id()).unwrap().unwrap(), m);
        assert!(s.is_pinned(m.image_id()));
        for old in ["db", "conf", "blobs"] {
            assert!(
                !dir.path().join(old).exists(),
                "{old} of the old layout left"
            );
        }
    }
    // A crash after the conversion but before the old files were all gone
    // (here: `conf` is back) finishes the cleanup and keeps the data.
    std::fs::write(dir.path().join("conf"), b"old sled config").unwrap();
    let s = ChunkStore::open(dir.path(), UNLIMITED).unwrap();
    assert!(!dir.path().join("conf").exists());
    assert_eq!(s.chunk_count(), 5);
    assert!(s.is_complete(m.image_id()).unwrap());
    // The LRU order came along: the oldest chunk goes first.
    drop(s);
    let cap = cs.iter().map(|c| c.1.len() as u64).sum::<u64>() - 1;
    let s = ChunkStore::open(dir.path(), cap).unwrap();
    assert!(!s.has_chunk(&cs[2].0), "oldest unpinned chunk evicted");
    assert!(s.has_chunk(&cs[0].0) && s.has_chunk(&cs[3].0));
}

/// A tmpfs of `size` mounted for one test (needs root), unmounted on drop.
/// `None` (test skipped, reason printed) when not root outside CI.
struct SmallFs(tempfile::TempDir);

impl SmallFs {
    fn new(size: &str) -> Option<SmallFs> {
        let dir = tempfile::tempdir().unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status();
        if st.map(|s| s.success()).unwrap_or(false) {
            return Some(SmallFs(dir));
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "mounting a tmpfs needs root (CI runs tests as root)"
        );
        eprintln!("skipped: mounting a tmpfs needs root");
        None
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

#[test]
fn old_layout_without_room_to_convert_is_refused_with_what_to_do() {
    let Some(fs) = SmallFs::new("64m") else {
        return;
    };
    let dir = fs.0.path().join("store");
    let cs: Vec<_> = (0..20).map(|i| chunk(5000 + i, 200_000)).collect();
    let m = manifest_of(&cs[..1], "old");
    old_layout_store(&dir, &cs, &m);
    // Leave less free than the reserve plus one copy of the 4 MB of chunks.
    let free = free_bytes(fs.0.path()).unwrap();
    let filler = fs.0.path().join("filler");
    std::fs::write(&filler, vec![1u8; (free - (12 << 20)) as usize]).unwrap();
    let e = ChunkStore::open(&dir, UNLIMITED).unwrap_err();
    assert!(matches!(e, Error::StoreOldLayout { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("older cpushare-node") && msg.contains("move the directory aside"),
        "{msg}"
    );
    assert!(dir.join("db").exists(), "the old store is left as it was");
    std::fs::remove_file(&filler).unwrap();
    let s = ChunkStore::open(&dir, UNLIMITED).unwrap();
    assert_eq!(s.chunk_count(), 20);
    assert!(!dir.join("db").exists());
}

/// Bytes the files under `p` take on disk.
fn dir_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut n = 0;
    for e in std::fs::read_dir(p).unwrap().flatten() {
        let m = e.metadata().unwrap();
        n += if m.is_dir() {
            dir_bytes(&e.path())
        } else {
            m.blocks() * 512
        };
    }
    n
}

/// Reading an image again and again (a guest run, an export, a re-import of the
/// same disk) does not grow the store: access times used to be written into
/// sled on every flush, which grew its log by ~100 bytes per chunk read, each
/// time (measured here before the fix: +310 KiB per round of 3,000 chunks).
#[test]
fn reading_chunks_again_and_again_does_not_grow_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let s = ChunkStore::open(dir.path(), UNLIMITED).unwrap();
    let cs: Vec<_> = (0..3000u64).map(|i| chunk(10_000 + i, 64)).collect();
    for (id, d) in &cs {
        s.put_chunk_inner(id, d, false, false).unwrap();
    }
    s.flush().unwrap();
    let mut sizes = Vec::new();
    for _ in 0..4 {
        for (id, _) in &cs {
            s.get_chunk(id).unwrap().unwrap();
        }
        // Re-importing the same chunks touches them the same way.
        for (id, d) in &cs {
            assert!(!s.put_chunk_inner(id, d, false, false).unwrap());
        }
        s.flush().unwrap();
        sizes.push(dir_bytes(dir.path()));
    }
    let (first, last) = (sizes[0], *sizes.last().unwrap());
    assert!(
        last <= first + (64 << 10),
        "store grew from {first} to {last} bytes over 3 more rounds: {sizes:?}"
    );
    // The order was saved all the same: the first chunk read last is the newest.
    s.get_chunk(&cs[0].0).unwrap();
    s.flush().unwrap();
    drop(s);
    let s = ChunkStore::open(dir.path(), UNLIMITED).unwrap();
    let st = s.state();
    let newest = st.lru.iter().next_back().unwrap().1;
    assert_eq!(newest, cs[0].0);
}

/// A garbled or missing `recency` file costs only the saved order.
#[test]
fn a_bad_recency_file_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let (id, d) = chunk(77, 1000);
    {
        let s = ChunkStore::open(dir.path(), UNLIMITED).unwrap();
        s.put_chunk(&id, &d).unwrap();
        s.get_chunk(&id).unwrap();
        s.flush().unwrap();
    }
    assert!(super::recency::path(dir.path()).exists());
    std::fs::write(super::recency::path(dir.path()), b"garbage").unwrap();
    std::fs::write(dir.path().join(".recency-half"), b"x").unwrap();
    let s = ChunkStore::open(dir.path(), UNLIMITED).unwrap();
    assert_eq!(s.get_chunk(&id).unwrap().unwrap(), d);
    assert!(!dir.path().join(".recency-half").exists());
}
