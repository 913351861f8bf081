//! Reproduces spacejam/sled#1412 on plain sled 0.34.7 with the settings the
//! chunk store used before it got its own writer thread (background flusher
//! every 500 ms, 64 MiB cache): several threads insert 20-110 KiB values and
//! delete them shortly after, so log segments at the end of the file keep
//! being freed (queueing truncations) while log-buffer writes pile up in
//! sled's IO pool. Sooner or later (seconds here) one writer waits in
//! `SegmentAccountant::bump_tip` for a truncation that no IO thread will run:
//! every IO thread is blocked in `sa_stabilize` on the lock that writer holds.
//!
//! `cargo run -p chunks --release --example sled_1412 -- DIR [THREADS] [SECONDS]`
//! prints progress and exits 3 with "HUNG" once nothing moved for 20 s
//! (attach `gdb -p PID -batch -ex 'thread apply all bt'` before that to see
//! the cycle), or 0 with "no hang" after SECONDS (default 120).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next() else {
        eprintln!("usage: sled_1412 DIR [THREADS] [SECONDS]");
        std::process::exit(2);
    };
    let threads: u64 = args.next().and_then(|v| v.parse().ok()).unwrap_or(8);
    let secs: u64 = args.next().and_then(|v| v.parse().ok()).unwrap_or(120);
    let db = sled::Config::new()
        .path(&dir)
        .cache_capacity(64 << 20)
        .flush_every_ms(Some(500))
        .open()
        .expect("opening sled");
    let tree = db.open_tree("chunks").expect("opening tree");
    let ops = Arc::new(AtomicU64::new(0));
    for th in 0..threads {
        let (tree, ops, db) = (tree.clone(), ops.clone(), db.clone());
        std::thread::spawn(move || {
            for i in 0u64.. {
                let len = 20_000 + (i as usize * 7919) % 90_000;
                tree.insert((th << 40 | i).to_be_bytes(), vec![i as u8; len])
                    .expect("insert");
                if i >= 8 {
                    tree.remove((th << 40 | (i - 8)).to_be_bytes())
                        .expect("remove");
                }
                if th == 0 && i & 3 == 0 {
                    db.flush().expect("flush");
                }
                ops.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let start = Instant::now();
    let (mut last, mut still) = (0, 0);
    loop {
        std::thread::sleep(Duration::from_secs(2));
        let n = ops.load(Ordering::Relaxed);
        still = if n == last { still + 1 } else { 0 };
        last = n;
        println!("{:>4} s: {n} writes", start.elapsed().as_secs());
        if still >= 10 {
            println!("HUNG: no write finished for 20 s (spacejam/sled#1412)");
            std::process::exit(3);
        }
        if start.elapsed() >= Duration::from_secs(secs) {
            println!("no hang in {secs} s");
            return;
        }
    }
}
