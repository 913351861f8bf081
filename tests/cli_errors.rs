//! Bad input to `cpushare-node`: a clear one-line error, a non-zero exit, and
//! nothing lost (the daemon keeps serving what it had).

use std::process::{Command, Output, Stdio};

use cpushare_tests::node::{cli, NodeProc};
use cpushare_tests::{is_root, node_bin};

/// The single `error: ...` line of a failed command.
fn one_line_error(out: &Output) -> String {
    assert!(!out.status.success(), "command should have failed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let last = lines.last().copied().unwrap_or_default();
    assert!(last.starts_with("error: "), "stderr: {stderr}");
    assert!(
        lines.iter().filter(|l| l.starts_with("error")).count() == 1,
        "more than one error line: {stderr}"
    );
    last.to_string()
}

fn run(args: &[&str]) -> Output {
    Command::new(node_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn client_errors_without_a_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let e = one_line_error(&cli(dir.path(), &["status"]).unwrap());
    assert!(e.contains("no cpushare-node daemon is running"), "{e}");
    // The hint names the role the command needs.
    assert!(
        e.contains("--role seller") && e.contains("--role buyer"),
        "{e}"
    );
    let key = "11".repeat(32);
    let admit = [
        "overlay",
        "admit",
        "--key",
        &key,
        "--mac",
        "52:54:00:00:00:01",
        "--ip",
        "10.77.0.9",
    ];
    let e = one_line_error(&cli(dir.path(), &admit).unwrap());
    assert!(
        e.contains("needs a buyer daemon") && e.contains("--role buyer --data-dir"),
        "{e}"
    );
    let attach = [
        "overlay",
        "attach",
        "--tap",
        "cnx0",
        "--buyer",
        "127.0.0.1:7451",
        "--buyer-key",
        &key,
        "--mac",
        "52:54:00:00:00:01",
        "--ip",
        "10.77.0.9",
    ];
    let e = one_line_error(&cli(dir.path(), &attach).unwrap());
    assert!(
        e.contains("needs a seller daemon") && e.contains("--role seller --data-dir"),
        "{e}"
    );
    let e = one_line_error(&cli(dir.path(), &["image", "export", "zz", "/tmp/x"]).unwrap());
    assert!(e.contains("invalid image id"), "{e}");
    let e = one_line_error(&run(&["--data-dir", dir.path().to_str().unwrap()]));
    assert!(e.contains("--role"), "{e}");
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "role = 7\n").unwrap();
    let e = one_line_error(&run(&["--config", cfg.to_str().unwrap(), "status"]));
    assert!(e.contains("bad.toml"), "{e}");
}

#[test]
fn daemon_rejects_bad_files_and_unknown_images_and_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::spawn(
        &[],
        &dir.path().join("n"),
        "buyer",
        &["--listen", "/ip4/127.0.0.1/tcp/0"],
    )
    .unwrap();

    let img = dir.path().join("img.raw");
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&img, &data).unwrap();
    let id = node
        .cli_ok(&["image", "import", img.to_str().unwrap()])
        .unwrap();
    let id = id.trim();

    let e = one_line_error(&node.cli(&["image", "import", "/nonexistent/file"]).unwrap());
    assert!(e.contains("/nonexistent/file"), "{e}");
    let e = one_line_error(
        &node
            .cli(&["image", "import", dir.path().to_str().unwrap()])
            .unwrap(),
    );
    assert!(e.contains("not a regular file"), "{e}");
    let empty = dir.path().join("empty.raw");
    std::fs::write(&empty, b"").unwrap();
    let e = one_line_error(
        &node
            .cli(&["image", "import", empty.to_str().unwrap()])
            .unwrap(),
    );
    assert!(e.contains("empty"), "{e}");

    let unknown = "ab".repeat(32);
    let out_path = dir.path().join("never.raw");
    let e = one_line_error(
        &node
            .cli(&["image", "export", &unknown, out_path.to_str().unwrap()])
            .unwrap(),
    );
    assert!(e.contains(&unknown[..8]), "{e}");
    assert!(!out_path.exists(), "a failed export left a file behind");

    // A second daemon on the same data dir is refused.
    let e = one_line_error(&run(&[
        "--role",
        "seller",
        "--data-dir",
        node.data_dir.to_str().unwrap(),
    ]));
    assert!(e.contains("already running"), "{e}");

    // Its log went to a file: plain text, no colour codes.
    let log = node.log();
    assert!(log.contains("daemon ready"), "{log}");
    assert!(
        !log.contains('\x1b'),
        "ANSI escapes in a log that is not a terminal: {log:?}"
    );

    // Nothing was lost: the image still exports byte-identical.
    let back = dir.path().join("back.raw");
    node.cli_ok(&["image", "export", id, back.to_str().unwrap()])
        .unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), data);
}

#[test]
fn corrupt_store_is_a_clear_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("n");
    {
        let mut node = NodeProc::spawn(
            &[],
            &data_dir,
            "seller",
            &["--listen", "/ip4/127.0.0.1/tcp/0"],
        )
        .unwrap();
        node.stop().unwrap();
    }
    // Overwrite every file of the sled database with garbage.
    let store = data_dir.join("store");
    let mut smashed = 0;
    for entry in walk(&store) {
        let len = std::fs::metadata(&entry).unwrap().len().max(64);
        std::fs::write(&entry, vec![0xA5u8; len as usize]).unwrap();
        smashed += 1;
    }
    assert!(
        smashed > 0,
        "no store files found under {}",
        store.display()
    );
    let out = run(&[
        "--role",
        "seller",
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
    ]);
    let e = one_line_error(&out);
    assert!(e.contains("store"), "{e}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn disk_full_is_a_clear_error_and_the_daemon_survives() {
    if !is_root() {
        panic!("this test mounts a small tmpfs and must run as root (CI does)");
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let st = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=40m",
            "tmpfs",
            mnt.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs failed");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());

    let node = NodeProc::spawn(
        &[],
        &mnt.join("n"),
        "buyer",
        &["--listen", "/ip4/127.0.0.1/tcp/0"],
    )
    .unwrap();
    let small = dir.path().join("small.raw");
    let small_data: Vec<u8> = (0..1_000_000u32)
        .map(|i| (i.wrapping_mul(40503) >> 7) as u8)
        .collect();
    std::fs::write(&small, &small_data).unwrap();
    let small_id = node
        .cli_ok(&["image", "import", small.to_str().unwrap()])
        .unwrap();

    let big = dir.path().join("big.raw");
    // Random, so chunk dedup cannot make it fit.
    let mut big_data = vec![0u8; 40_000_000];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut big_data);
    std::fs::write(&big, &big_data).unwrap();
    let e = one_line_error(
        &node
            .cli(&["image", "import", big.to_str().unwrap()])
            .unwrap(),
    );
    assert!(
        e.to_lowercase().contains("disk full") || e.contains("No space"),
        "{e}"
    );

    // Still running, and the earlier image is intact.
    node.status().unwrap();
    let back = dir.path().join("back.raw");
    node.cli_ok(&["image", "export", small_id.trim(), back.to_str().unwrap()])
        .unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), small_data);
}
