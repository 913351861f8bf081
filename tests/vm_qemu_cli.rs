//! `cpushare-node vm run`: boots from files and from an image in the chunk store
//! (through a running daemon, and directly without one), exits with the guest, and
//! fails with one clear line on bad input.

use std::io::Write;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use cpushare_tests::node::{cli, NodeProc};
use cpushare_tests::wait_until;

#[path = "common/vmguest.rs"]
mod vmguest;

fn vm_run(data_dir: &Path, args: &[&str]) -> Output {
    let mut all = vec!["vm", "run"];
    if !args.contains(&"--accel") {
        all.extend_from_slice(&["--backend", "qemu", "--accel", "tcg"]);
    }
    all.extend_from_slice(args);
    cli(data_dir, &all).expect("run cpushare-node")
}

fn show(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn vm_run_boots_linux_from_files_and_exits_with_the_guest() {
    let files = vmguest::test_guest();
    let data = tempfile::tempdir_in(vmguest::scratch_dir()).unwrap();
    let kernel = files.vmlinuz.to_str().unwrap();
    let initrd = files.initrd.to_str().unwrap();

    let append = vmguest::cmdline("echo cvq-cli-hello-$((6*7))", "cs.nonet");
    let out = vm_run(
        data.path(),
        &[
            "--kernel",
            kernel,
            "--initrd",
            initrd,
            "--append",
            &append,
            "--memory-mib",
            "128",
        ],
    );
    assert!(out.status.success(), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("cvq-cli-hello-42"), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("vm: qemu with tcg"),
        "backend choice not explained: {stderr}"
    );
    assert!(stderr.contains("guest powered off"), "{stderr}");

    // A guest that never ends is stopped by --timeout; exit code 124.
    let spin = data.path().join("spin.img");
    bios_disk_then(&spin, "cvq-spin", false);
    let out = vm_run(
        data.path(),
        &[
            "--disk",
            spin.to_str().unwrap(),
            "--memory-mib",
            "32",
            "--timeout",
            "5",
        ],
    );
    assert_eq!(out.status.code(), Some(124), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("cvq-spin"),
        "{}",
        show(&out)
    );
}

/// A raw BIOS disk: the boot sector prints to COM1 and powers off through ACPI.
fn bios_disk(path: &Path) {
    bios_disk_then(path, "cvq-cli-bios-ok", true)
}

/// Like [`bios_disk`] with message `msg`; without `poweroff` it spins forever.
fn bios_disk_then(path: &Path, msg: &str, poweroff: bool) {
    let msg = format!("{msg}\r\n\0");
    let msg = msg.as_bytes();
    let mut code: Vec<u8> = vec![0xBA, 0xF8, 0x03]; // mov dx, 0x3f8
    code.extend_from_slice(&[0xBE, 0x40, 0x7C]); // mov si, 0x7c40
    code.extend_from_slice(&[0xAC, 0x84, 0xC0, 0x74, 0x03, 0xEE, 0xEB, 0xF8]); // print loop
    if poweroff {
        code.extend_from_slice(&[
            0xBA, 0x04, 0x06, 0xB8, 0x00, 0x20, 0xEF, 0xFA, 0xF4, 0xEB, 0xFD,
        ]); // S5
    } else {
        code.extend_from_slice(&[0xEB, 0xFE]); // jmp $
    }
    let mut mbr = vec![0u8; 512];
    mbr[..code.len()].copy_from_slice(&code);
    mbr[0x40..0x40 + msg.len()].copy_from_slice(msg);
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&mbr).unwrap();
    // Distinct random content so the image id is fresh for every run.
    let mut rest = vec![0u8; (2 << 20) - 512];
    rand::Rng::fill(&mut rand::thread_rng(), &mut rest[..]);
    f.write_all(&rest).unwrap();
}

#[test]
fn vm_run_boots_an_image_from_the_store_with_and_without_a_daemon() {
    assert!(cpushare_tests::is_root(), "needs root");
    let dir = tempfile::tempdir_in(vmguest::scratch_dir()).unwrap();
    let data = dir.path().join("node");
    let disk = dir.path().join("bios.img");
    bios_disk(&disk);

    let mut node = NodeProc::spawn(&[], &data, "seller", &["--listen", "/ip4/127.0.0.1/tcp/0"])
        .expect("daemon");
    let id = node
        .cli_ok(&["image", "import", disk.to_str().unwrap()])
        .expect("import");
    let id = id.trim().to_string();
    assert_eq!(id.len(), 64, "image id: {id:?}");
    std::fs::remove_file(&disk).unwrap();

    // Daemon running: it holds the store and exports the image for us.
    let out = vm_run(
        &data,
        &["--image", &id, "--memory-mib", "32", "--timeout", "60"],
    );
    assert!(
        out.status.success(),
        "{}\ndaemon log:\n{}",
        show(&out),
        node.log()
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("cvq-cli-bios-ok"),
        "{}",
        show(&out)
    );
    // The temp export was unlinked: nothing is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(data.join("vm-tmp"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");

    // Too big for the disk cap: refused before booting, one clear line.
    let out = vm_run(&data, &["--image", &id, "--disk-cap-mib", "1"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("larger than the disk cap"),
        "{}",
        show(&out)
    );

    // No daemon: the store is opened directly and the image materialised unlinked.
    node.stop().expect("daemon stops");
    let out = vm_run(
        &data,
        &["--image", &id, "--memory-mib", "32", "--timeout", "60"],
    );
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("cvq-cli-bios-ok"),
        "{}",
        show(&out)
    );

    let out = vm_run(&data, &["--image", &"ab".repeat(32)]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not in the store"),
        "{}",
        show(&out)
    );
}

#[test]
fn vm_run_bad_input_fails_with_one_clear_line() {
    let data = tempfile::tempdir_in(vmguest::scratch_dir()).unwrap();
    let files = vmguest::test_guest();
    let mut cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--kernel".into(), "/nonexistent/vmlinuz".into()],
            "--kernel",
        ),
        (vec![], "nothing to boot"),
        (
            vec![
                "--disk".into(),
                files.rootfs.display().to_string(),
                "--disk-cap-mib".into(),
                "1".into(),
                "--read-only".into(),
            ],
            "larger than the disk cap",
        ),
        (
            vec![
                "--kernel".into(),
                files.vmlinuz.display().to_string(),
                "--tap".into(),
                "cvqx".into(),
                "--mac".into(),
                "01:00:00:00:00:01".into(),
            ],
            "multicast",
        ),
        (
            vec![
                "--kernel".into(),
                files.vmlinuz.display().to_string(),
                "--qemu".into(),
                "/nonexistent/qemu".into(),
            ],
            "not found",
        ),
    ];
    // Where KVM cannot run Linux (this dev host), forcing it is a clear error.
    if vm::kvm_probe::linux_instructions().is_err() {
        let v = files.vmlinuz.display().to_string();
        let args = ["--backend", "qemu", "--accel", "kvm", "--kernel", &v];
        let args = args.iter().map(|s| s.to_string()).collect();
        cases.push((args, "KVM is present but cannot run this guest"));
    }
    for (args, want) in cases {
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let out = vm_run(data.path(), &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            stderr.contains(want),
            "{args:?}: want {want:?} in: {stderr}"
        );
        let lines: Vec<_> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
    }
}

/// Children of `pid` named `comm`, from /proc.
fn children_named(pid: u32, comm: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let name = &stat[stat.find('(').unwrap_or(0) + 1..close];
        let ppid: u32 = stat[close + 2..]
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if ppid == pid && name == comm {
            out.push(child);
        }
    }
    out
}

#[test]
fn qemu_dies_with_a_killed_node() {
    let files = vmguest::test_guest();
    let data = tempfile::tempdir_in(vmguest::scratch_dir()).unwrap();
    let append = vmguest::cmdline("sleep 600", "cs.nonet");
    let mut child = std::process::Command::new(cpushare_tests::node_bin())
        .arg("--data-dir")
        .arg(data.path())
        .args([
            "vm",
            "run",
            "--backend",
            "qemu",
            "--accel",
            "tcg",
            "--memory-mib",
            "128",
            "--quiet",
        ])
        .args([
            "--kernel",
            files.vmlinuz.to_str().unwrap(),
            "--initrd",
            files.initrd.to_str().unwrap(),
        ])
        .args(["--append", &append])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let node_pid = child.id();
    let mut qemu = None;
    assert!(
        wait_until(Duration::from_secs(30), || {
            qemu = children_named(node_pid, "cs-qemu").first().copied();
            qemu.is_some()
        }),
        "no qemu child of the node appeared"
    );
    let qemu = qemu.unwrap();
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    let exe = format!("/proc/{qemu}/exe");
    assert!(
        wait_until(Duration::from_secs(10), || !Path::new(&exe).exists()),
        "qemu {qemu} outlived the killed node"
    );
}

/// A direct-boot image (kernel + initrd + cmdline) imported into a running
/// daemon boots with `vm run --image`, the daemon exporting it for the client.
#[test]
fn vm_run_boots_a_direct_boot_image_through_the_daemon() {
    assert!(cpushare_tests::is_root(), "needs root");
    let files = vmguest::test_guest();
    let dir = tempfile::tempdir_in(vmguest::scratch_dir()).unwrap();
    let data = dir.path().join("node");
    let node = NodeProc::spawn(&[], &data, "seller", &["--listen", "/ip4/127.0.0.1/tcp/0"])
        .expect("daemon");
    let cmdline = vmguest::cmdline("echo cvq-direct-$((6*7)); poweroff -f", "");
    let id = node
        .cli_ok(&[
            "image",
            "import",
            "--kernel",
            files.vmlinuz.to_str().unwrap(),
            "--initrd",
            files.initrd.to_str().unwrap(),
            "--cmdline",
            &cmdline,
        ])
        .expect("import direct boot");
    let id = id.trim();
    let ls: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&["image", "ls", "--json"]).unwrap()).unwrap();
    assert!(
        ls.as_array()
            .unwrap()
            .iter()
            .any(|i| i["id"] == id && i["boot"]["cmdline"] == cmdline.as_str()),
        "image ls lacks the boot info: {ls}"
    );
    let out = vm_run(
        &data,
        &["--image", id, "--memory-mib", "256", "--timeout", "90"],
    );
    assert!(
        out.status.success(),
        "{}\ndaemon log:\n{}",
        show(&out),
        node.log()
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("cvq-direct-42"),
        "{}",
        show(&out)
    );
}

/// A raw disk whose first sector is `sector` (a boot signature added when `signed`),
/// followed by `len - 512` bytes of random data.
fn disk_with(path: &Path, sector: &[u8], signed: bool, len: usize) {
    let mut mbr = vec![0u8; 512];
    mbr[..sector.len()].copy_from_slice(sector);
    if signed {
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
    }
    let mut rest = vec![0u8; len.saturating_sub(512)];
    rand::Rng::fill(&mut rand::thread_rng(), &mut rest[..]);
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&mbr).unwrap();
    f.write_all(&rest).unwrap();
}

/// Disks firmware cannot boot are refused before qemu starts, with the reason; one
/// that passes the checks but does not boot ends the run (exit 4) instead of leaving
/// a blank console for ever.
#[test]
fn unbootable_disks_are_refused_or_end_the_run() {
    let data = tempfile::tempdir_in(vmguest::scratch_dir()).unwrap();
    let d = |name: &str| data.path().join(name);
    std::fs::write(d("empty.img"), b"").unwrap();
    let mut random = vec![0u8; 1 << 20];
    rand::Rng::fill(&mut rand::thread_rng(), &mut random[..]);
    random[510] = 0; // no boot signature by chance
    std::fs::write(d("random.img"), &random).unwrap();
    // A partition table claiming sectors 2048..6144 on a 1 MiB (2048-sector) file.
    let mut table = vec![0u8; 512];
    table[446 + 4] = 0x83;
    table[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
    table[446 + 12..446 + 16].copy_from_slice(&4096u32.to_le_bytes());
    disk_with(&d("truncated.img"), &table[..510], true, 1 << 20);
    for (file, want) in [
        ("empty.img", "the disk is empty"),
        ("random.img", "no boot signature"),
        ("truncated.img", "truncated"),
    ] {
        let out = vm_run(
            data.path(),
            &["--disk", d(file).to_str().unwrap(), "--memory-mib", "32"],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{file}: {}", show(&out));
        assert!(stderr.contains(want), "{file}: {}", show(&out));
        assert!(
            !stderr.contains("vm: qemu"),
            "{file}: qemu started: {stderr}"
        );
    }

    // Signed, but its code gives up at once (int 18h: "boot failed, try the next
    // device"): SeaBIOS has nothing else to boot and resets, which ends the run.
    disk_with(&d("gives-up.img"), &[0xCD, 0x18, 0xEB, 0xFE], true, 1 << 20);
    let out = vm_run(
        data.path(),
        &[
            "--disk",
            d("gives-up.img").to_str().unwrap(),
            "--memory-mib",
            "32",
            // Only a backstop: the run must end long before.
            "--timeout",
            "300",
        ],
    );
    assert_eq!(out.status.code(), Some(4), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the firmware found nothing to boot"),
        "{}",
        show(&out)
    );
}

/// `--append` means nothing to a firmware boot, and the microvm backend cannot
/// boot a disk: both are refused before anything is materialised or started.
#[test]
fn append_and_microvm_with_a_disk_image_are_refused_up_front() {
    let data = tempfile::tempdir_in(vmguest::scratch_dir()).unwrap();
    let disk = data.path().join("bios.img");
    bios_disk(&disk);
    let out = vm_run(
        data.path(),
        &[
            "--disk",
            disk.to_str().unwrap(),
            "--append",
            "console=ttyS0",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--append"),
        "{}",
        show(&out)
    );

    // Through the store, no daemon: the image is never materialised.
    let store = data.path().join("node");
    let key = ed25519_dalek::SigningKey::from_bytes(&[3u8; 32]);
    let id = {
        let s = chunks::ChunkStore::open(store.join("store"), chunks::UNLIMITED).unwrap();
        let opts = chunks::ImportOptions::default();
        let (id, _) = chunks::import_file(&s, &key, &disk, &opts, |_, _| {}).unwrap();
        s.flush().unwrap();
        id.to_hex()
    };
    for (args, want) in [
        (
            vec!["--backend", "microvm"],
            "microvm backend only boots a kernel",
        ),
        (vec!["--append", "x=1"], "--append"),
    ] {
        let mut all = vec!["vm", "run", "--image", &id];
        all.extend_from_slice(&args);
        if !args.contains(&"--backend") {
            all.extend_from_slice(&["--backend", "qemu", "--accel", "tcg"]);
        }
        let out = cli(&store, &all).unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", show(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(want),
            "{}",
            show(&out)
        );
        let left: Vec<_> = std::fs::read_dir(store.join("vm-tmp"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "materialised: {left:?}");
    }
}

/// Runs `vm run ARGS` under `data`, waits for `marker` on the guest's console, sends
/// SIGTERM (a stop request) and returns how the run ended.
fn stop_on_request(data: &Path, args: &[&str], marker: &'static str) -> Output {
    let mut child = std::process::Command::new(cpushare_tests::node_bin())
        .arg("--data-dir")
        .arg(data)
        .args(["vm", "run", "--backend", "qemu", "--accel", "tcg"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 256];
        let mut sent = false;
        while let Ok(n) = std::io::Read::read(&mut stdout, &mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            if !sent && String::from_utf8_lossy(&all).contains(marker) {
                let _ = tx.send(());
                sent = true;
            }
        }
        all
    });
    let seen = rx.recv_timeout(Duration::from_secs(300));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut out = child.wait_with_output().unwrap();
    out.stdout = reader.join().unwrap();
    assert!(
        seen.is_ok(),
        "the guest never printed {marker}: {}",
        show(&out)
    );
    out
}

/// A guest stopped on request that does not shut down (a boot sector spinning; it
/// ignores the ACPI power button) is killed after --grace: exit 137, not 0.
#[test]
fn a_guest_killed_after_the_grace_period_has_its_own_exit_status() {
    let data = tempfile::tempdir_in(vmguest::scratch_dir()).unwrap();
    let spin = data.path().join("spin.img");
    bios_disk_then(&spin, "cvq-spin-term", false);
    let out = stop_on_request(
        data.path(),
        &[
            "--memory-mib",
            "32",
            "--grace",
            "1",
            "--timeout",
            "300",
            "--disk",
            spin.to_str().unwrap(),
        ],
        "cvq-spin-term",
    );
    assert_eq!(out.status.code(), Some(137), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("was killed"),
        "{}",
        show(&out)
    );
}

/// A guest stopped on request that shuts down (Linux: the ACPI power button runs
/// `poweroff`) exits 130: not 0 (it did not power off by itself), not 137.
#[test]
fn a_guest_stopped_on_request_that_shuts_down_exits_130() {
    let files = vmguest::test_guest();
    let data = tempfile::tempdir_in(vmguest::scratch_dir()).unwrap();
    let append = vmguest::cmdline("echo cvq-term-ready; sleep 1000", "cs.nonet");
    let out = stop_on_request(
        data.path(),
        &[
            "--kernel",
            files.vmlinuz.to_str().unwrap(),
            "--initrd",
            files.initrd.to_str().unwrap(),
            "--append",
            &append,
            "--memory-mib",
            "128",
            // Generous: the guest must shut down by itself, never be killed.
            "--grace",
            "120",
        ],
        "cvq-term-ready",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{}", show(&out));
    assert!(
        stderr.contains("stopped on request: it shut down"),
        "{}",
        show(&out)
    );
    assert!(
        // The kernel's own line: the guest powered itself down.
        String::from_utf8_lossy(&out.stdout).contains("reboot: Power down"),
        "{}",
        show(&out)
    );
}
