//! A stock Debian cloud kernel through the microvm: direct boot of its vmlinux (PVH
//! entry; the bzImage with CPUSHARE_LINUX_KERNEL=vmlinuz) with the busybox initramfs
//! from scripts/build-test-guest.sh, virtio modules loaded from the
//! initramfs and the virtio-mmio devices found through ACPI (no virtio_mmio.device=
//! on the command line). The guest lists its block device and NIC and powers off.
//!
//! Where KVM cannot run Linux (TESTING.md: this project's machines have a nested KVM
//! that fails on a Linux guest with "KVM internal error ... emulation failure"), the
//! test probes that, prints one line saying why it did not run, and passes.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cpushare_tests::netns::Netns;
use vm::microvm::Microvm;
use vm::{Backend, Boot, DiskSpec, GuestExit, GuestSpec, NetSpec, Tap};

/// Real hardware gets this kernel to /init in about a second. This project's nested KVM
/// gets to "Memory: ..." after about 30 s and then fails with an emulation error; a
/// KVM that has not reached /init after this long is not one Linux can run on.
const PROBE_DEFAULT_S: u64 = 60;
const FULL: Duration = Duration::from_secs(120);

fn test_guest() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let out = Command::new("bash")
        .arg(root.join("scripts/build-test-guest.sh"))
        .output()
        .expect("run scripts/build-test-guest.sh");
    assert!(
        out.status.success(),
        "building the test guest failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("test-guest");
    assert!(dir.join("vmlinuz").exists() && dir.join("initrd.cpio.gz").exists());
    dir
}

fn b64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in s.as_bytes().chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn linux_boots_through_the_microvm_or_says_why_not() {
    assert!(Path::new("/dev/kvm").exists(), "needs /dev/kvm");
    let dir = test_guest();

    // NIC: a tap made in a namespace of ours.
    let ns = Netns::new("cmvlinux").expect("netns (needs root)");
    let path = format!("/var/run/netns/{}", ns.name());
    let tap = std::thread::spawn(move || {
        let nsf = File::open(&path).unwrap();
        nix::sched::setns(&nsf, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        vm::microvm::virtio::net::open_tap("cmvltap0").unwrap()
    })
    .join()
    .unwrap();
    // Disk: 8 MiB, unlinked.
    let disk = tempfile::tempfile().unwrap();
    disk.set_len(8 << 20).unwrap();

    let script = "cat /sys/block/vda/size; cat /sys/class/net/eth0/address";
    let cmdline = format!(
        "console=ttyS0 earlyprintk=serial reboot=k panic=-1 pci=off cs.nonet cs.run64={}",
        b64(script)
    );
    let mut spec = GuestSpec::new(
        "cmv-linux",
        Boot::Direct {
            // The uncompressed ELF (PVH entry), as Firecracker boots; the bzImage's own
            // decompressor alone takes minutes on a slow nested KVM.
            // CPUSHARE_LINUX_KERNEL=vmlinuz boots the bzImage instead.
            kernel: dir
                .join(std::env::var("CPUSHARE_LINUX_KERNEL").unwrap_or_else(|_| "vmlinux".into())),
            initrd: Some(dir.join("initrd.cpio.gz")),
            cmdline,
        },
    );
    spec.memory_mib = 256;
    spec.disk = Some(DiskSpec::new(disk));
    spec.net = Some(NetSpec {
        tap: Tap::Fd(tap),
        mac: [0x02, 0xc5, 0, 0, 0, 0x42],
    });
    spec.wall_clock_limit = Some(FULL);

    // CPUSHARE_LINUX_PROBE_S overrides the probe time (for looking at a slow KVM).
    let probe = Duration::from_secs(
        std::env::var("CPUSHARE_LINUX_PROBE_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(PROBE_DEFAULT_S),
    );
    let t0 = Instant::now();
    let mut guest = Microvm.start(spec).expect("microvm starts the kernel");
    let rx = guest.take_console().unwrap();
    let mut out = Vec::new();
    let mut at_init = false;
    let exit = loop {
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(200)) {
            if std::env::var_os("CPUSHARE_LINUX_ECHO").is_some() {
                let _ = std::io::stderr().write_all(&chunk);
            }
            out.extend(chunk);
            at_init |= String::from_utf8_lossy(&out).contains("cs-init:");
        }
        if let Some(exit) = guest.wait_timeout(Duration::ZERO).unwrap() {
            break exit;
        }
        if !at_init && t0.elapsed() > probe {
            break guest.stop(Duration::from_secs(1)).unwrap();
        }
    };
    out.extend(rx.try_iter().flatten());
    let text = String::from_utf8_lossy(&out).into_owned();
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(no output)");

    if !at_init {
        let why = match &exit {
            GuestExit::Crashed(w) if w.contains("KVM internal error") || w.contains("KVM could not enter") => {
                format!("KVM cannot run Linux here: {w}")
            }
            GuestExit::Stopped => format!(
                "KVM here did not get Linux to /init within {}s (real hardware: ~1 s; TESTING.md: nested KVM)",
                probe.as_secs()
            ),
            other => format!("Linux ended before /init: {other}"),
        };
        let mut so = std::io::stdout();
        let _ = writeln!(
            so,
            "vm_microvm_linux: not run: {why}; last console line: {last:?}"
        );
        // Anything else than a KVM that cannot run Linux is our failure.
        assert!(
            matches!(exit, GuestExit::Crashed(_) | GuestExit::Stopped),
            "unexpected end before /init: {exit}; console:\n{text}"
        );
        return;
    }
    assert_eq!(exit, GuestExit::PoweredOff, "console:\n{text}");
    assert!(text.contains("cs-exit: 0"), "console:\n{text}");
    assert!(
        text.contains("16384"),
        "virtio-blk found through ACPI (8 MiB = 16384 sectors):\n{text}"
    );
    assert!(
        text.contains("02:c5:00:00:00:42"),
        "virtio-net found through ACPI:\n{text}"
    );
}
