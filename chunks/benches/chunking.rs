//! Chunk+hash throughput against plain BLAKE3 of the same file, measured side
//! by side in one run; plus store import throughput and the share of a
//! changed image that lands in new chunks.
//!
//! Run: `cargo bench -p chunks --bench chunking` (or scripts/bench-chunking.sh).
//! Env: CHUNKS_BENCH_MIB (file size, default 256), CHUNKS_BENCH_ROUNDS (default 5),
//! CHUNKS_BENCH_DIR (where the file and store go, default the system temp dir).

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::time::{Duration, Instant};

use chunks::{ChunkStore, Chunker, ImageFormat, UNLIMITED};
use rand::{Rng, RngCore, SeedableRng};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn blake3_file(path: &std::path::Path) -> blake3::Hash {
    let mut f = File::open(path).unwrap();
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize()
}

fn chunk_file(path: &std::path::Path) -> (usize, u64) {
    let f = File::open(path).unwrap();
    let mut n = 0;
    let mut bytes = 0;
    for c in Chunker::new(f) {
        let c = c.unwrap();
        n += 1;
        bytes += c.data.len() as u64;
    }
    (n, bytes)
}

/// Bytes allocated on disk under `dir` (not apparent sizes).
fn dir_blocks(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let md = e.metadata().unwrap();
        total += if md.is_dir() {
            dir_blocks(&e.path())
        } else {
            md.blocks() * 512
        };
    }
    total
}

fn mibs(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

/// Fraction of a changed image's bytes that are in chunks the old one lacks.
fn new_fraction(size: usize, places: usize, seeds: u64) -> (f64, f64) {
    let (mut sum, mut worst) = (0.0, 0.0f64);
    for seed in 0..seeds {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut v = vec![0u8; size];
        rng.fill_bytes(&mut v);
        let old: std::collections::HashSet<_> = chunks::chunking::chunk_ids(&v[..])
            .unwrap()
            .into_iter()
            .map(|c| c.0)
            .collect();
        let per = size / 100 / places;
        for p in 0..places {
            let lo = p * size / places;
            let at = rng.gen_range(lo..lo + size / places - per);
            for b in &mut v[at..at + per] {
                *b = !*b;
            }
        }
        let new: u64 = chunks::chunking::chunk_ids(&v[..])
            .unwrap()
            .into_iter()
            .filter(|c| !old.contains(&c.0))
            .map(|c| c.1 as u64)
            .sum();
        let f = new as f64 / size as f64;
        sum += f;
        worst = worst.max(f);
    }
    (sum / seeds as f64, worst)
}

fn main() {
    // `cargo bench` passes --bench; under `cargo test --all-targets` run a
    // quick smoke version instead of the full measurement.
    let full = std::env::args().any(|a| a == "--bench");
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let mib = if full {
        env("CHUNKS_BENCH_MIB", 256)
    } else {
        4
    };
    let rounds = if full {
        env("CHUNKS_BENCH_ROUNDS", 5) as usize
    } else {
        1
    };
    let base = std::env::var("CHUNKS_BENCH_DIR")
        .map(Into::into)
        .unwrap_or_else(|_| std::env::temp_dir());
    let dir = tempfile::tempdir_in(&base).unwrap();
    let path = dir.path().join("image.raw");
    {
        let mut f = std::io::BufWriter::new(File::create(&path).unwrap());
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..mib {
            rng.fill_bytes(&mut buf);
            f.write_all(&buf).unwrap();
        }
        f.flush().unwrap();
    }
    let size = mib << 20;
    // Warm the page cache so both sides read from memory.
    blake3_file(&path);

    let (mut t_hash, mut t_chunk, mut t_import) = (Vec::new(), Vec::new(), Vec::new());
    let mut nchunks = 0;
    let mut disk_use = 0u64;
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    for r in 0..rounds {
        let t = Instant::now();
        std::hint::black_box(blake3_file(&path));
        t_hash.push(t.elapsed());

        let t = Instant::now();
        let (n, b) = chunk_file(&path);
        t_chunk.push(t.elapsed());
        assert_eq!(b, size);
        nchunks = n;

        // Full import into a fresh sled store (chunk + hash + store + sign).
        let sdir = dir.path().join(format!("store{r}"));
        let store = ChunkStore::open(&sdir, UNLIMITED).unwrap();
        let t = Instant::now();
        let f = BufReader::new(File::open(&path).unwrap());
        chunks::import_reader(&store, &key, f, "bench", ImageFormat::Raw, size, |_, _| {}).unwrap();
        t_import.push(t.elapsed());
        store.flush().unwrap();
        disk_use = dir_blocks(&sdir);
        drop(store);
        let _ = std::fs::remove_dir_all(&sdir);
    }
    let (h, c, i) = (median(t_hash), median(t_chunk), median(t_import));
    let (rh, rc, ri) = (mibs(size, h), mibs(size, c), mibs(size, i));

    println!("### Chunking throughput ({mib} MiB random file, page-cached, median of {rounds} interleaved rounds)");
    println!();
    println!("| what | MiB/s | ratio to plain BLAKE3 |");
    println!("| --- | ---: | ---: |");
    println!("| plain BLAKE3 of the file (reference, 1 thread) | {rh:.0} | 1.00 |");
    println!("| FastCDC 16/64/256 KiB + BLAKE3 per chunk ({nchunks} chunks, avg {} KiB) | {rc:.0} | {:.2} |", size / nchunks as u64 / 1024, rc / rh);
    println!(
        "| full import into sled store (chunk + hash + store + sign) | {ri:.0} | {:.2} |",
        ri / rh
    );
    println!();
    println!(
        "sled store on disk after the import: {:.0} MiB for {mib} MiB of chunks ({:.2}x)",
        disk_use as f64 / (1 << 20) as f64,
        disk_use as f64 / size as f64
    );
    if !full {
        return;
    }
    println!();
    println!(
        "### Share of a second version in new chunks (1 % of bytes changed in k contiguous places)"
    );
    println!();
    println!("| image | places | mean new bytes | worst of 20 |");
    println!("| --- | ---: | ---: | ---: |");
    for (sz, label) in [(8usize << 20, "8 MiB"), (64 << 20, "64 MiB")] {
        for places in [1usize, 2, 3, 4] {
            let (m, w) = new_fraction(sz, places, 20);
            println!(
                "| {label} | {places} | {:.1} % | {:.1} % |",
                m * 100.0,
                w * 100.0
            );
        }
    }
}
