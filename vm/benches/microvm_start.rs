//! Start-to-first-serial-byte and VMM memory overhead: the microvm against
//! `qemu-system-x86_64 -M microvm` with the same accelerator (KVM), on the same tiny
//! PVH guest (prints "hello", then spins). Run by scripts/bench-vm-microvm.sh.
//!
//! Each sample spawns a fresh VMM process and measures from spawn to the first byte of
//! the guest's serial output on the process's stdout (skipping what firmware prints
//! before it), then reads /proc/<pid>/smaps: VMM overhead = process RSS minus the
//! resident part of the guest-RAM mapping.
//!
//! `microvm_start [--iterations N] [--memory-mib M]`; `--child ELF MIB` is the
//! microvm VMM process (internal).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const GUEST: &str = r#"
.intel_syntax noprefix
.section .note.Xen, "a", @note
    .align 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .align 4
    .long _start
    .align 4
.text
.code32
.globl _start
_start:
    mov esi, offset msg
    mov dx, 0x3f8
1:  lodsb
    test al, al
    jz 2f
    out dx, al
    jmp 1b
2:  jmp 2b
msg: .asciz "hello\n"
"#;

fn build_guest(dir: &Path) -> PathBuf {
    let s = dir.join("hello.S");
    let o = dir.join("hello.o");
    let elf = dir.join("hello.elf");
    let ld = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/guests/link.ld");
    std::fs::write(&s, GUEST).unwrap();
    for (prog, args) in [
        (
            "as",
            vec!["--64", "-o", o.to_str().unwrap(), s.to_str().unwrap()],
        ),
        (
            "ld",
            vec![
                "-m",
                "elf_x86_64",
                "-T",
                ld.to_str().unwrap(),
                "-o",
                elf.to_str().unwrap(),
                o.to_str().unwrap(),
            ],
        ),
    ] {
        let st = Command::new(prog)
            .args(&args)
            .status()
            .expect("binutils installed");
        assert!(st.success(), "{prog} failed");
    }
    elf
}

/// The microvm VMM process: boot the guest, copy serial to stdout, run until killed.
fn child(elf: &str, mib: u64) -> ! {
    use vm::{Backend, Boot, GuestSpec};
    let mut spec = GuestSpec::new(
        "bench",
        Boot::Direct {
            kernel: elf.into(),
            initrd: None,
            cmdline: String::new(),
        },
    );
    spec.memory_mib = mib;
    spec.serial_log = Some(Box::new(std::io::stdout()));
    let mut guest = vm::microvm::Microvm.start(spec).expect("microvm starts");
    let exit = guest.wait().expect("wait");
    eprintln!("guest ended: {exit}");
    std::process::exit(1)
}

struct Sample {
    /// First byte of any output (the firmware's where it writes before the guest).
    first_any: Duration,
    /// First byte of the guest's output.
    first_byte: Duration,
    /// Bytes the VMM wrote before the guest's (firmware banner, terminal escapes).
    before_guest: usize,
    rss_kib: u64,
    guest_kib: u64,
}

fn smaps_guest_and_total(pid: u32, mib: u64) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // The guest-RAM mapping is the one of exactly the guest's size.
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let want = mib * 1024;
    let mut guest = 0;
    let mut in_guest = false;
    for l in smaps.lines() {
        let mut w = l.split_whitespace();
        match (w.next(), w.next()) {
            (Some("Size:"), Some(v)) => in_guest = v.parse::<u64>().ok() == Some(want),
            (Some("Rss:"), Some(v)) if in_guest => guest += v.parse::<u64>().unwrap_or(0),
            _ => {}
        }
    }
    (rss, guest)
}

/// What the guest prints first.
const MARKER: &[u8] = b"hello\n";

/// What came out of a VMM up to the guest's first output.
struct FirstOutput {
    /// Time to the first byte of any output (firmware's, if it writes first).
    any: Duration,
    /// Time to the first byte of the guest's `MARKER`.
    guest: Duration,
    /// Bytes before the guest's.
    before_guest: usize,
}

/// Reads `out` until the guest's `MARKER`. Firmware may write first: QEMU 10's
/// microvm boots SeaBIOS, which clears the terminal with escape sequences and prints
/// a banner.
fn first_guest_byte(out: &mut impl Read, t0: Instant) -> FirstOutput {
    let mut seen = Vec::new();
    // (bytes seen so far, when they had arrived), one entry per read.
    let mut arrivals = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = out.read(&mut buf).expect("read serial");
        let at = t0.elapsed();
        assert!(
            n > 0,
            "VMM exited before the guest wrote {:?}; its output: {:?}",
            String::from_utf8_lossy(MARKER),
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
        arrivals.push((seen.len(), at));
        if let Some(i) = seen.windows(MARKER.len()).position(|w| w == MARKER) {
            let (_, guest) = arrivals.iter().find(|(end, _)| *end > i).unwrap();
            return FirstOutput {
                any: arrivals[0].1,
                guest: *guest,
                before_guest: i,
            };
        }
    }
}

fn measure(mut cmd: Command, mib: u64) -> Sample {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let t0 = Instant::now();
    let mut c: Child = cmd.spawn().expect("spawn VMM");
    let mut out = c.stdout.take().unwrap();
    let first = first_guest_byte(&mut out, t0);
    // Sample memory with the guest spinning after its output.
    std::thread::sleep(Duration::from_millis(50));
    let (rss_kib, guest_kib) = smaps_guest_and_total(c.id(), mib);
    let _ = c.kill();
    let _ = c.wait();
    Sample {
        first_any: first.any,
        first_byte: first.guest,
        before_guest: first.before_guest,
        rss_kib,
        guest_kib,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        child(&args[2], args[3].parse().unwrap());
    }
    let mut iterations = 10;
    let mut mib = 64u64;
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--iterations" => {
                iterations = args[i + 1].parse().unwrap();
                i += 1;
            }
            "--memory-mib" => {
                mib = args[i + 1].parse().unwrap();
                i += 1;
            }
            // cargo bench passes --bench; nothing else is ours.
            _ => {}
        }
        i += 1;
    }
    let dir = tempfile::tempdir().unwrap();
    let elf = build_guest(dir.path());
    let me = std::env::current_exe().unwrap();
    let qemu = std::env::var("QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for _ in 0..iterations {
        let mut c = Command::new(&me);
        c.args(["--child", elf.to_str().unwrap(), &mib.to_string()]);
        ours.push(measure(c, mib));
        let mut q = Command::new(&qemu);
        q.args([
            "-M",
            "microvm",
            "-accel",
            "kvm",
            "-m",
            &format!("{mib}M"),
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-kernel",
            elf.to_str().unwrap(),
        ]);
        theirs.push(measure(q, mib));
    }
    let report = |name: &str, s: &[Sample]| -> (f64, f64) {
        let ms = median(s.iter().map(|x| x.first_byte.as_secs_f64() * 1e3).collect());
        let min = s
            .iter()
            .map(|x| x.first_byte.as_secs_f64() * 1e3)
            .fold(f64::MAX, f64::min);
        let rss = median(s.iter().map(|x| x.rss_kib as f64 / 1024.0).collect());
        let guest = median(s.iter().map(|x| x.guest_kib as f64 / 1024.0).collect());
        let over = median(
            s.iter()
                .map(|x| (x.rss_kib.saturating_sub(x.guest_kib)) as f64 / 1024.0)
                .collect(),
        );
        let any = median(s.iter().map(|x| x.first_any.as_secs_f64() * 1e3).collect());
        println!("| {name} | {ms:.1} | {min:.1} | {any:.1} | {rss:.1} | {guest:.1} | {over:.1} |");
        (ms, over)
    };
    println!("guest: tiny PVH ELF (prints \"hello\", spins), {mib} MiB, 1 vCPU, KVM; {iterations} runs each, alternating");
    println!();
    println!("| VMM | guest's first serial byte, median ms | min ms | first byte of any output, median ms | RSS MiB | guest RAM resident MiB | VMM overhead MiB (RSS - guest RAM) |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let (a, oa) = report("cpushare microvm", &ours);
    let (b, ob) = report("qemu -M microvm (KVM)", &theirs);
    println!();
    for (name, s) in [("cpushare microvm", &ours), ("qemu -M microvm", &theirs)] {
        let most = s.iter().map(|x| x.before_guest).max().unwrap_or(0);
        if most > 0 {
            println!(
                "{name} wrote up to {most} bytes before the guest's (firmware banner, \
                 terminal escapes): its time includes that firmware"
            );
        }
    }
    println!(
        "ratio first byte microvm/qemu: {:.3}; overhead microvm/qemu: {:.3}",
        a / b,
        oa / ob
    );
    let (n, per) = in_process(&elf, mib, 8);
    println!(
        "{n} microvm guests in one process: VMM overhead {per:.2} MiB per guest \
         (RSS growth minus resident guest RAM, divided by {n})"
    );
    let _ = std::io::stdout().flush();
}

/// Marginal cost per guest inside one process, as in `cpushare-node`: start `n`
/// guests, wait for each one's serial output, and compare RSS before and after.
fn in_process(elf: &Path, mib: u64, n: usize) -> (usize, f64) {
    use vm::{Backend, Boot, GuestSpec};
    let me = std::process::id();
    let (before, guest_before) = smaps_guest_and_total(me, mib);
    let mut guests = Vec::new();
    for i in 0..n {
        let mut spec = GuestSpec::new(
            format!("bench{i}"),
            Boot::Direct {
                kernel: elf.to_path_buf(),
                initrd: None,
                cmdline: String::new(),
            },
        );
        spec.memory_mib = mib;
        let mut g = vm::microvm::Microvm.start(spec).expect("microvm starts");
        let rx = g.take_console().unwrap();
        let mut got = Vec::new();
        while !got.ends_with(b"\n") {
            got.extend(
                rx.recv_timeout(Duration::from_secs(10))
                    .expect("guest output"),
            );
        }
        guests.push((g, rx));
    }
    std::thread::sleep(Duration::from_millis(100));
    let (after, guest_after) = smaps_guest_and_total(me, mib);
    drop(guests);
    let grown =
        after.saturating_sub(before) as f64 - guest_after.saturating_sub(guest_before) as f64;
    (n, grown / 1024.0 / n as f64)
}
