//! One buyer and 8 sellers on loopback, separate `cpushare-node` processes: all
//! sellers fetch one 64 MiB random image at the same time. Every export must be
//! byte-identical and the buyer (sole seed, super-seeding) must upload at most
//! 1.15 x the image size. Also: a second version with 1 % of its bytes changed in
//! a few places moves at most 5 % of the image.

use anyhow::Result;
use cpushare_tests::swarm::{export, fetch, image_stats, import, num, random_file, spawn};

const MIB: usize = 1 << 20;

#[test]
fn swarm_eight_sellers_buyer_uploads_about_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let buyer = spawn(&dir.path().join("buyer"), "buyer", &[], &[])?;
    let boot = vec![buyer.p2p_addr()];
    let mut sellers = Vec::new();
    for i in 0..8 {
        sellers.push(spawn(
            &dir.path().join(format!("s{i}")),
            "seller",
            &boot,
            &[],
        )?);
    }
    let file = dir.path().join("image.raw");
    let data = random_file(&file, 64 * MIB, 42)?;
    let id = import(&buyer, &file)?;

    let reports: Vec<Result<serde_json::Value>> = std::thread::scope(|s| {
        let hs: Vec<_> = sellers.iter().map(|p| s.spawn(|| fetch(p, &id))).collect();
        hs.into_iter()
            .map(|h| h.join().expect("fetch thread"))
            .collect()
    });
    for (i, r) in reports.into_iter().enumerate() {
        let r = r?;
        // endgame may race a few duplicate requests at the very end, never many
        assert!(
            num(&r, "duplicate_chunks") * 50 <= num(&r, "chunks_downloaded"),
            "seller {i}: {r}"
        );
        assert_eq!(num(&r, "bad_chunks"), 0, "seller {i}: {r}");
    }
    for (i, p) in sellers.iter().enumerate() {
        let got = export(p, &id, dir.path(), &format!("out{i}.raw"))?;
        assert!(
            got == data,
            "seller {i}: exported image differs from the original"
        );
        std::fs::remove_file(dir.path().join(format!("out{i}.raw")))?;
    }
    let up = num(&image_stats(&buyer, &id)?, "uploaded_bytes");
    let ratio = up as f64 / data.len() as f64;
    eprintln!("buyer uploaded {up} bytes = {ratio:.3} x image");
    assert!(ratio <= 1.15, "buyer uploaded {ratio:.3} x the image size");
    assert!(
        ratio >= 0.99,
        "buyer cannot upload less than one copy: {ratio:.3}"
    );
    Ok(())
}

#[test]
fn swarm_new_version_moves_only_changed_chunks() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let buyer = spawn(&dir.path().join("buyer"), "buyer", &[], &[])?;
    let seller = spawn(&dir.path().join("s"), "seller", &[buyer.p2p_addr()], &[])?;
    let v1 = dir.path().join("v1.raw");
    let mut data = random_file(&v1, 32 * MIB, 7)?;
    let id1 = import(&buyer, &v1)?;
    let r1 = fetch(&seller, &id1)?;
    assert_eq!(num(&r1, "downloaded_bytes"), data.len() as u64);

    // 1 % of the bytes, in 4 places
    let len = data.len();
    let run = len / 100 / 4;
    for k in 0..4 {
        let at = len / 5 * (k + 1) - run / 2;
        for b in &mut data[at..at + run] {
            *b ^= 0x5a;
        }
    }
    let v2 = dir.path().join("v2.raw");
    std::fs::write(&v2, &data)?;
    let id2 = import(&buyer, &v2)?;
    assert_ne!(id1, id2);
    let r2 = fetch(&seller, &id2)?;
    let moved = num(&r2, "downloaded_bytes");
    let frac = moved as f64 / len as f64;
    eprintln!(
        "v2 moved {moved} bytes = {:.2} % of the image",
        frac * 100.0
    );
    assert!(frac <= 0.05, "v2 moved {:.2} % of the image", frac * 100.0);
    assert!(moved > 0, "the changed chunks must be fetched");
    assert_eq!(num(&r2, "resumed_bytes") + moved, num(&r2, "total_bytes"));
    assert!(export(&seller, &id2, dir.path(), "v2.out")? == data);
    Ok(())
}
