//! The seller's performance score, measured inside a guest of its own backend.
//!
//! A tiny fixed CPU benchmark is booted as a guest (a PVH ELF built here, so both
//! the qemu backend, KVM or TCG, and our microvm load it like a Linux vmlinux): it
//! prints a marker on COM1, then runs a fixed integer loop forever and prints one
//! `.` after every [`ITERS_PER_DOT`] iterations. The host times the dots as they
//! arrive for a fixed window: score = loop iterations per second / 100 000. A TCG
//! seller translates every guest instruction, so its score comes out several times
//! lower than a KVM seller's on the same CPU; that is what the buyer ranks by.
//!
//! The result is cached in the data directory for an hour per (node binary, accel
//! policy, CPU): a restarted seller does not pay the probe again.

use std::io::Write;
use std::path::Path;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm::{Backend, Boot, GuestSpec};

use crate::error::{Error, Result};

/// Loop iterations between two dots: about a millisecond natively, tens under TCG.
pub const ITERS_PER_DOT: u32 = 1 << 20;
/// What the guest prints before its first dot (firmware output may come before it).
const MARKER: &[u8] = b"\nCSPERF1\n";
/// Guest-physical load address (the microvm's and Linux's high-memory start).
const LOAD: u64 = 0x10_0000;
/// A score this old is measured again.
const CACHE_MAX_AGE_MS: u64 = 3_600_000;
/// Bump when the payload or the formula changes (old cached scores then do not count).
const PROBE_VERSION: u32 = 1;
/// How long the guest may take to print its marker (qemu start and firmware).
const BOOT_TIMEOUT: Duration = Duration::from_secs(20);

/// The payload's code (32-bit protected mode, PVH entry state: paging off, flat
/// segments): print the marker, then loop forever, a dot per `ITERS_PER_DOT` rounds.
fn code(msg_addr: u32) -> Vec<u8> {
    let mut c = Vec::new();
    let imm32 = |c: &mut Vec<u8>, op: &[u8], v: u32| {
        c.extend_from_slice(op);
        c.extend_from_slice(&v.to_le_bytes());
    };
    c.extend_from_slice(&[0xFA, 0xFC]); // cli; cld
    c.extend_from_slice(&[0x66, 0xBA, 0xF8, 0x03]); // mov dx, 0x3f8 (COM1)
    imm32(&mut c, &[0xBE], msg_addr); // mov esi, msg
    imm32(&mut c, &[0xB9], MARKER.len() as u32); // mov ecx, len
    c.extend_from_slice(&[0xAC, 0xEE, 0xE2, 0xFC]); // 1: lodsb; out dx, al; loop 1b
    imm32(&mut c, &[0xBF], 1); // mov edi, 1
    let outer = c.len();
    imm32(&mut c, &[0xB9], ITERS_PER_DOT); // mov ecx, ITERS_PER_DOT
    let inner = c.len();
    imm32(&mut c, &[0x69, 0xFF], 1_664_525); // imul edi, edi, 1664525
    imm32(&mut c, &[0x81, 0xC7], 1_013_904_223); // add edi, 1013904223
    c.extend_from_slice(&[0x31, 0xFB]); // xor ebx, edi
    c.extend_from_slice(&[0xC1, 0xC3, 0x05]); // rol ebx, 5
    c.extend_from_slice(&[0xFF, 0xC9]); // dec ecx
    let back = inner as i64 - (c.len() as i64 + 2);
    c.extend_from_slice(&[0x75, back as i8 as u8]); // jnz inner
    c.extend_from_slice(&[0xB0, b'.', 0xEE]); // mov al, '.'; out dx, al
    let back = outer as i64 - (c.len() as i64 + 2);
    c.extend_from_slice(&[0xEB, back as i8 as u8]); // jmp outer
    c
}

/// The benchmark guest as an ELF64 image with a PVH entry note (the format a Linux
/// vmlinux has), padded to the size backends accept as a kernel.
pub fn payload() -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let note_off = EHDR + 2 * PHDR;
    let note_len = 12 + 4 + 8; // header, "Xen\0", 64-bit entry
    let code_off = note_off + note_len;
    let entry = LOAD + code_off as u64;
    // The code is a fixed length; the marker follows it.
    let code_len = code(0).len();
    let msg_off = code_off + code_len;
    let body = code((LOAD + msg_off as u64) as u32);
    let mut f = Vec::with_capacity(4096);
    let u16le = |f: &mut Vec<u8>, v: u16| f.extend_from_slice(&v.to_le_bytes());
    let u32le = |f: &mut Vec<u8>, v: u32| f.extend_from_slice(&v.to_le_bytes());
    let u64le = |f: &mut Vec<u8>, v: u64| f.extend_from_slice(&v.to_le_bytes());
    // ELF header: 64-bit, little endian, executable, x86-64.
    f.extend_from_slice(&[0x7F, b'E', b'L', b'F', 2, 1, 1, 0]);
    f.extend_from_slice(&[0; 8]);
    u16le(&mut f, 2); // ET_EXEC
    u16le(&mut f, 62); // EM_X86_64
    u32le(&mut f, 1);
    u64le(&mut f, entry);
    u64le(&mut f, EHDR as u64); // e_phoff
    u64le(&mut f, 0); // e_shoff
    u32le(&mut f, 0); // e_flags
    u16le(&mut f, EHDR as u16);
    u16le(&mut f, PHDR as u16);
    u16le(&mut f, 2); // e_phnum
    u16le(&mut f, 64); // e_shentsize
    u16le(&mut f, 0);
    u16le(&mut f, 0);
    let total = (msg_off + MARKER.len()).max(1024);
    // PT_LOAD: the whole file at LOAD, read + execute.
    u32le(&mut f, 1);
    u32le(&mut f, 5);
    u64le(&mut f, 0);
    u64le(&mut f, LOAD);
    u64le(&mut f, LOAD);
    u64le(&mut f, total as u64);
    u64le(&mut f, total as u64);
    u64le(&mut f, 0x1000);
    // PT_NOTE: XEN_ELFNOTE_PHYS32_ENTRY, the 32-bit PVH entry point.
    u32le(&mut f, 4);
    u32le(&mut f, 4);
    u64le(&mut f, note_off as u64);
    u64le(&mut f, LOAD + note_off as u64);
    u64le(&mut f, LOAD + note_off as u64);
    u64le(&mut f, note_len as u64);
    u64le(&mut f, note_len as u64);
    u64le(&mut f, 4);
    u32le(&mut f, 4); // namesz
    u32le(&mut f, 8); // descsz
    u32le(&mut f, 18); // XEN_ELFNOTE_PHYS32_ENTRY
    f.extend_from_slice(b"Xen\0");
    u64le(&mut f, entry);
    debug_assert_eq!(f.len(), code_off);
    f.extend_from_slice(&body);
    f.extend_from_slice(MARKER);
    f.resize(total, 0);
    f
}

/// A measured score and how it was measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// Loop iterations per second / 100 000 (higher is faster).
    pub score: u32,
    /// The backend that ran the probe, with its reason (`vm::Choice::explain`).
    pub backend: String,
    /// Dots timed and the seconds they took.
    pub dots: u64,
    pub secs: f64,
    /// When it was measured (Unix ms) and the cache key it holds for.
    pub measured_ms: u64,
    pub key: String,
}

/// Counts dots after the marker in a console stream, chunk by chunk.
#[derive(Default)]
struct DotClock {
    seen: Vec<u8>,
    started: bool,
    /// When the marker came (a slow guest is timed from there).
    marker_at: Option<Instant>,
    /// Dots in the chunk that started the clock (not timed) and every one after.
    first: Option<(Instant, u64)>,
    last: Option<(Instant, u64)>,
    dots: u64,
}

impl DotClock {
    fn feed(&mut self, chunk: &[u8], at: Instant) {
        let mut rest = chunk;
        if !self.started {
            self.seen.extend_from_slice(chunk);
            let Some(pos) = self.seen.windows(MARKER.len()).position(|w| w == MARKER) else {
                // Keep only a marker's length of tail: firmware may print a lot.
                let keep = self.seen.len().saturating_sub(MARKER.len());
                self.seen.drain(..keep);
                return;
            };
            self.started = true;
            self.marker_at = Some(at);
            let after = self.seen.len() - (pos + MARKER.len());
            rest = &chunk[chunk.len().saturating_sub(after)..];
            self.seen.clear();
        }
        let n = rest.iter().filter(|&&b| b == b'.').count() as u64;
        if n == 0 {
            return;
        }
        self.dots += n;
        match self.first {
            None => self.first = Some((at, self.dots)),
            Some(_) => self.last = Some((at, self.dots)),
        }
    }

    /// Timed dots (those after the first chunk) and the seconds they took.
    fn span(&self) -> Option<(u64, f64)> {
        let ((t0, n0), (t1, n1)) = (self.first?, self.last?);
        let secs = t1.duration_since(t0).as_secs_f64();
        (n1 > n0 && secs > 0.0).then_some((n1 - n0, secs))
    }

    /// For a guest too slow to time two dot chunks: every dot since the marker over
    /// the time since it (a quarter dot when none came: a small score, not zero,
    /// which would read as "the probe did not run").
    fn slow_span(&self, now: Instant) -> Option<(f64, f64)> {
        let secs = now.duration_since(self.marker_at?).as_secs_f64();
        (secs > 0.0).then_some(((self.dots as f64).max(0.25), secs))
    }
}

/// Boots the benchmark guest with the backend `candidates` would pick for a direct
/// boot, times its dots for `window`, and stops it.
pub fn measure(
    candidates: Vec<Box<dyn Backend>>,
    scratch: &Path,
    window: Duration,
) -> Result<Score> {
    // Deleted when this returns: the backends have read it by then.
    let path = write_payload(scratch)?;
    let spec = || {
        let mut s = GuestSpec::new(
            "perf-probe",
            Boot::Direct {
                kernel: path.to_path_buf(),
                initrd: None,
                cmdline: String::new(),
            },
        );
        s.memory_mib = 32;
        // The guest never ends by itself; a hard ceiling in case nobody stops it.
        s.wall_clock_limit = Some(BOOT_TIMEOUT + window * 5);
        s.shutdown_grace = Duration::ZERO;
        s
    };
    let choice = vm::auto::choose(&spec(), candidates)?;
    let backend = choice.explain();
    let mut guest = choice.backend.start(spec())?;
    let console = guest
        .take_console()
        .ok_or_else(|| Error::Market("the perf probe guest has no console".into()))?;
    let began = Instant::now();
    let mut clock = DotClock::default();
    let deadline_boot = began + BOOT_TIMEOUT;
    let span = loop {
        let now = Instant::now();
        let timed = clock.first.map(|(t, _)| now.duration_since(t));
        if timed.is_some_and(|d| d >= window) {
            if let Some((n, secs)) = clock.span() {
                break (n as f64, secs);
            }
        }
        // The guest runs but too slowly to time two dot chunks in four windows (a
        // KVM that emulates in software): scored by what it did since its marker.
        let since_marker = clock.marker_at.map(|t| now.duration_since(t));
        if since_marker.is_some_and(|d| d >= window * 4) {
            break clock.slow_span(now).expect("the marker came");
        }
        if clock.marker_at.is_none() && now > deadline_boot {
            let tail = String::from_utf8_lossy(&clock.seen).into_owned();
            return Err(Error::Market(format!(
                "the perf probe guest ({backend}) did not print its start marker within {} s; console tail {tail:?}",
                BOOT_TIMEOUT.as_secs()
            )));
        }
        match console.recv_timeout(Duration::from_millis(100)) {
            Ok(chunk) => clock.feed(&chunk, Instant::now()),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                let exit = guest.wait_timeout(Duration::from_secs(1)).ok().flatten();
                return Err(Error::Market(format!(
                    "the perf probe guest ({backend}) ended before it was timed: {exit:?}"
                )));
            }
        }
    };
    drop(guest);
    let (dots, secs) = span;
    let per_s = dots * ITERS_PER_DOT as f64 / secs;
    Ok(Score {
        score: (per_s / 100_000.0).round().clamp(1.0, u32::MAX as f64) as u32,
        backend,
        dots: dots as u64,
        secs,
        measured_ms: super::now_ms(),
        key: String::new(),
    })
}

fn write_payload(dir: &Path) -> Result<tempfile::TempPath> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let mut f = tempfile::Builder::new()
        .prefix("perf-probe-")
        .suffix(".elf")
        .tempfile_in(dir)
        .map_err(|e| Error::io(format!("creating the perf probe in {}", dir.display()), e))?;
    f.write_all(&payload())
        .map_err(|e| Error::io("writing the perf probe", e))?;
    Ok(f.into_temp_path())
}

/// What a cached score must match: the probe, the node binary, the accel policy
/// and the CPU it ran on.
pub fn cache_key(measurement: &[u8; 32], accel_policy: &str) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut h = blake3::Hasher::new();
    h.update(&PROBE_VERSION.to_le_bytes());
    h.update(measurement);
    h.update(accel_policy.as_bytes());
    h.update(cpu.as_bytes());
    h.update(&(cpus as u64).to_le_bytes());
    h.finalize().to_hex().to_string()
}

/// The cached score in `file` if it was measured for `key` within the last hour.
pub fn cached(file: &Path, key: &str, now_ms: u64) -> Option<Score> {
    let text = std::fs::read(file).ok()?;
    let s: Score = serde_json::from_slice(&text).ok()?;
    (s.key == key && now_ms.saturating_sub(s.measured_ms) < CACHE_MAX_AGE_MS && s.score > 0)
        .then_some(s)
}

/// Measures (or takes from `file`'s cache) the score for `key`, and caches it.
pub fn score(
    file: &Path,
    key: &str,
    candidates: impl FnOnce() -> Vec<Box<dyn Backend>>,
    window: Duration,
) -> Result<(Score, bool)> {
    if let Some(s) = cached(file, key, super::now_ms()) {
        return Ok((s, true));
    }
    let scratch = file.parent().unwrap_or(Path::new("/tmp")).join("tmp");
    let mut s = measure(candidates(), &scratch, window)?;
    s.key = key.to_owned();
    let json = serde_json::to_vec_pretty(&s).expect("json");
    let tmp = file.with_extension("tmp");
    // Written aside and renamed: a crash never leaves half a cache file.
    std::fs::write(&tmp, json)
        .and_then(|()| std::fs::rename(&tmp, file))
        .map_err(|e| Error::io(format!("caching the perf score in {}", file.display()), e))?;
    Ok((s, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_is_a_pvh_elf_whose_entry_runs_the_loop() {
        let p = payload();
        assert!(p.len() >= 1024);
        assert_eq!(&p[..4], b"\x7fELF");
        let entry = u64::from_le_bytes(p[24..32].try_into().unwrap());
        let note_entry = u64::from_le_bytes(p[64 + 112 + 16..64 + 112 + 24].try_into().unwrap());
        assert_eq!(entry, note_entry);
        let off = (entry - LOAD) as usize;
        // cli; cld; mov dx, 0x3f8
        assert_eq!(&p[off..off + 6], &[0xFA, 0xFC, 0x66, 0xBA, 0xF8, 0x03]);
        // The marker's address in `mov esi` points at the marker.
        let msg = u32::from_le_bytes(p[off + 7..off + 11].try_into().unwrap()) as u64;
        let m = (msg - LOAD) as usize;
        assert_eq!(&p[m..m + MARKER.len()], MARKER);
        // Both jumps go backwards inside the code.
        let c = code(0);
        let jnz = c.iter().position(|&b| b == 0x75).unwrap();
        assert!((c[jnz + 1] as i8) < 0);
        assert_eq!(c[c.len() - 2], 0xEB);
        assert!((c[c.len() - 1] as i8) < 0);
    }

    #[test]
    fn dots_count_only_after_the_marker_and_the_first_chunk_starts_the_clock() {
        let t0 = Instant::now();
        let mut c = DotClock::default();
        c.feed(b"SeaBIOS... loading.", t0);
        c.feed(b"\nCSPE", t0);
        assert!(!c.started);
        c.feed(b"RF1\n..", t0 + Duration::from_millis(10));
        assert!(c.started);
        assert_eq!(c.dots, 2);
        assert_eq!(c.span(), None);
        c.feed(b"...", t0 + Duration::from_millis(510));
        let (n, secs) = c.span().unwrap();
        assert_eq!(n, 3);
        assert!((secs - 0.5).abs() < 1e-9);
    }

    #[test]
    fn a_guest_too_slow_to_time_is_scored_by_what_it_did_since_its_marker() {
        let t0 = Instant::now();
        let mut c = DotClock::default();
        assert_eq!(c.slow_span(t0), None);
        c.feed(b"\nCSPERF1\n.", t0);
        let (n, secs) = c.slow_span(t0 + Duration::from_secs(4)).unwrap();
        assert_eq!((n, secs), (1.0, 4.0));
        // No dot at all: a quarter dot, so the score is small but not zero.
        let mut c = DotClock::default();
        c.feed(b"\nCSPERF1\n", t0);
        assert_eq!(c.slow_span(t0 + Duration::from_secs(4)), Some((0.25, 4.0)));
    }

    #[test]
    fn the_cache_holds_for_its_key_and_an_hour() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("perf-score.json");
        let s = Score {
            score: 42,
            backend: "qemu".into(),
            dots: 10,
            secs: 1.0,
            measured_ms: 1_000_000,
            key: "k1".into(),
        };
        std::fs::write(&file, serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(cached(&file, "k1", 1_000_000 + 60_000), Some(s.clone()));
        assert_eq!(cached(&file, "k2", 1_000_000 + 60_000), None);
        assert_eq!(cached(&file, "k1", 1_000_000 + CACHE_MAX_AGE_MS), None);
        let a = cache_key(&[1; 32], "auto");
        assert_eq!(a, cache_key(&[1; 32], "auto"));
        assert_ne!(a, cache_key(&[2; 32], "auto"));
        assert_ne!(a, cache_key(&[1; 32], "tcg"));
    }

    /// The probe boots in a real guest: qemu with TCG (always possible where qemu is
    /// installed), and our microvm where KVM runs guests. The ratio is printed, not
    /// asserted (timings on a shared machine); each score must come from timed dots.
    #[test]
    fn the_probe_runs_in_a_guest_of_each_backend_here() {
        use vm::qemu::{AccelPolicy, Qemu, QemuConfig};
        let dir = tempfile::tempdir().unwrap();
        let qemu = Qemu::new(QemuConfig {
            accel: AccelPolicy::Tcg,
            ..QemuConfig::default()
        });
        if let Err(e) = qemu.binary() {
            assert!(std::env::var_os("CI").is_none(), "CI needs qemu: {e}");
            eprintln!("skipped: {e}");
            return;
        }
        let window = Duration::from_millis(1000);
        let tcg = measure(vec![Box::new(qemu) as Box<dyn Backend>], dir.path(), window)
            .expect("TCG probe");
        eprintln!(
            "qemu tcg: score {} ({} dots in {:.2} s) via {}",
            tcg.score, tcg.dots, tcg.secs, tcg.backend
        );
        assert!(tcg.dots >= 1 && tcg.score >= 1);
        assert!(tcg.backend.starts_with("qemu"));
        let mv = vm::microvm::Microvm::new();
        match measure(vec![Box::new(mv) as Box<dyn Backend>], dir.path(), window) {
            Ok(kvm) => {
                eprintln!(
                    "microvm kvm: score {} ({} dots in {:.2} s); kvm/tcg = {:.1}",
                    kvm.score,
                    kvm.dots,
                    kvm.secs,
                    kvm.score as f64 / tcg.score as f64
                );
                assert!(kvm.backend.starts_with("microvm"));
                assert!(kvm.score >= 1 && kvm.secs > 0.0);
            }
            Err(e) => eprintln!("microvm not measured here: {e}"),
        }
    }
}
