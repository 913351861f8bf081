//! qemu in its jail (vm::jail), with the real test guest: what the kernel says about
//! the VMM process (uid, capabilities, no_new_privs, seccomp, mount and network
//! namespace, cgroup limits), and a guest that eats more memory than its cgroup
//! allows is OOM-killed there while this process lives on.
//!
//! Needs root. Names carry the prefix `cjq`.

use std::path::Path;
use std::time::Duration;

use cpushare_tests::jailcheck::{
    assert_own_mounts_in_netns, assert_unprivileged, field, jail_root_hides_host,
};
use cpushare_tests::require_root;
use overlay::io::NetNs;
use vm::jail::{GuestLimits, JailSettings, Jailer};
use vm::qemu::{AccelPolicy, Qemu, QemuConfig};
use vm::{Boot, DiskSpec, Guest, GuestExit, GuestSpec};

#[path = "common/vmguest.rs"]
mod vmguest;
use vmguest::Console;

fn jailer(tag: &str, root: &Path) -> Jailer {
    let mut s = JailSettings::new(root.join("jail-root"));
    s.cgroup_name = format!("cjq-{tag}-{}", std::process::id());
    s.uid_base = 410_000;
    Jailer::new(&s).expect("jailer")
}

fn spec(name: &str, script: &str, memory_mib: u64) -> GuestSpec {
    let g = vmguest::test_guest();
    let mut spec = GuestSpec::new(
        name,
        Boot::Direct {
            kernel: g.vmlinuz,
            initrd: Some(g.initrd),
            cmdline: vmguest::cmdline(script, "cs.nonet"),
        },
    );
    spec.memory_mib = memory_mib;
    spec.wall_clock_limit = Some(Duration::from_secs(300));
    spec
}

fn qemu() -> Qemu {
    Qemu::new(QemuConfig {
        accel: AccelPolicy::Auto,
        ..QemuConfig::default()
    })
}

#[test]
fn jailed_qemu_has_no_privilege_and_holds_its_limits() {
    if !require_root("mount namespaces, setuid, cgroups") {
        return;
    }
    let data = tempfile::tempdir_in(vmguest::scratch_dir()).unwrap();
    let jailer = jailer("priv", data.path());
    let ns_name = format!("cjq-{}", std::process::id());
    let ns = NetNs::create(&ns_name).expect("netns");
    let mut limits = GuestLimits::for_guest(2, 128);
    limits.disk_bps = Some(20 << 20);
    let jail = jailer
        .jail(
            "guest-priv",
            limits.clone(),
            Some(&Path::new("/run/netns").join(&ns_name)),
        )
        .expect("jail");
    let uid = jail.uid();
    let group = jail.group().clone();

    let disk = tempfile::tempfile_in(data.path()).unwrap();
    disk.set_len(16 << 20).unwrap();
    let mut s = spec("jail-priv", "echo JAILED-UP; sleep 600", 128);
    s.vcpus = 2;
    s.disk = Some(DiskSpec::new(disk));
    let mut guest = qemu().start_jailed(s, jail).expect("jailed qemu starts");
    let console = Console::follow(&mut guest);
    let pid = guest.vmm_pid().unwrap();

    // Credentials and confinement, as the kernel reports them.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert_unprivileged(&status, "qemu", uid);
    assert_eq!(field(&status, "Groups"), uid.to_string());

    // Its own mount namespace, holding neither the data dir nor /home; the lease's
    // network namespace.
    assert_own_mounts_in_netns(pid, &ns_name);
    jail_root_hides_host(pid, data.path());

    // Its cgroup, with the lease's limits.
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cg.contains("/guest-priv"), "{cg}");
    assert_eq!(group.pids(), vec![pid]);
    let held = group.limits();
    assert_eq!(held.cpu_percent, Some(200));
    assert_eq!(held.memory_bytes, Some(limits.memory_bytes));
    assert_eq!(held.pids, Some(limits.pids));
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        cmdline.contains("throttling.bps-total=20971520"),
        "{cmdline}"
    );

    // The guest runs in there.
    assert!(
        console.wait_for("JAILED-UP", Duration::from_secs(240)),
        "guest did not boot in the jail: {}",
        console.text()
    );
    let exit = guest.stop(Duration::from_secs(2)).unwrap();
    assert!(matches!(exit, GuestExit::Stopped), "{exit}");
    drop(guest);
    assert!(!group.exists(), "the guest cgroup outlived its guest");
    drop(ns);
    jailer.parent().destroy(Duration::from_secs(5)).unwrap();
}

#[test]
fn guest_eating_memory_is_oom_killed_in_its_cgroup() {
    if !require_root("cgroups, setuid") {
        return;
    }
    let data = tempfile::tempdir_in(vmguest::scratch_dir()).unwrap();
    let jailer = jailer("oom", data.path());
    // A guest of 768 MiB in a cgroup of 320 MiB: qemu itself plus the guest's first
    // few hundred MiB touched overflow it.
    let mut limits = GuestLimits::for_guest(1, 768);
    limits.memory_bytes = 320 << 20;
    let jail = jailer.jail("guest-oom", limits, None).expect("jail");
    let outcome = jail.outcome();
    let script = "echo EATING; mkdir -p /eat; mount -t tmpfs -o size=700m none /eat; \
                  dd if=/dev/zero of=/eat/f bs=1M count=650; echo SURVIVED; sleep 600";
    let mut guest = qemu()
        .start_jailed(spec("jail-oom", script, 768), jail)
        .expect("jailed qemu starts");
    let console = Console::follow(&mut guest);
    let exit = guest.wait_timeout(Duration::from_secs(280)).unwrap();
    let text = console.text();
    assert!(
        text.contains("EATING"),
        "guest never started eating: {text}"
    );
    assert!(
        !text.contains("SURVIVED"),
        "the guest got more than its cgroup: {text}"
    );
    let exit = exit.expect("qemu still running: the memory limit did not bite");
    assert!(matches!(exit, GuestExit::Crashed(_)), "{exit}");
    drop(guest);
    assert!(outcome.torn_down.load(std::sync::atomic::Ordering::SeqCst));
    let ooms = outcome.oom_kills.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        ooms >= 1,
        "no OOM kill recorded in the guest's cgroup ({exit})"
    );
    // This process (the seller's stand-in) is alive and well: we are still here.
    jailer.parent().destroy(Duration::from_secs(5)).unwrap();
}

/// The owner's machine beside a guest (scripts/bench-owner.sh runs this; ignored by
/// default because it takes minutes and wants a quiet machine). Prints a markdown
/// table, also written to `$BENCH_OUT` when set. Knobs: `BENCH_SECS` (one
/// measurement, default 5), `BENCH_ROUNDS` (measurements per case, default 3),
/// `BENCH_WRITE_MIB` (host write size, default 1024), `BENCH_IO_MBPS` (the io limit,
/// default 20), `BENCH_CPU_PERCENT` (default 50).
#[test]
#[ignore]
fn owner_bench() {
    if !require_root("cgroups, setuid, mount namespaces") {
        return;
    }
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let secs = env("BENCH_SECS", 5);
    let rounds = env("BENCH_ROUNDS", 3) as usize;
    let write_mib = env("BENCH_WRITE_MIB", 1024);
    let io_mbps = env("BENCH_IO_MBPS", 20);
    let cpu_percent = env("BENCH_CPU_PERCENT", 50) as u32;
    let cores = std::thread::available_parallelism().unwrap().get() as u32;
    let data = tempfile::tempdir_in(vmguest::scratch_dir()).unwrap();
    let dur = Duration::from_secs(secs);
    let mut out = String::new();
    let mut line = |s: String| {
        eprintln!("{s}");
        out.push_str(&s);
        out.push('\n');
    };

    // CPU: a single-threaded spinner here, alone and beside `cores` spinning vCPUs.
    let spin_script = format!(
        "for i in $(seq {cores}); do (while :; do :; done) & done; echo SPINNING; sleep 100000"
    );
    let mut solo = Vec::new();
    let mut cpu_rows = Vec::new();
    solo.extend((0..rounds).map(|_| spin_rate(dur)));
    for cap in [None, Some(cpu_percent)] {
        let jailer = bench_jailer(data.path(), "cpu", cap);
        let jail = jailer
            .jail("bench-spin", GuestLimits::for_guest(cores, 256), None)
            .unwrap();
        let mut s = spec("bench-spin", &spin_script, 256);
        s.vcpus = cores;
        let mut guest = qemu().start_jailed(s, jail).expect("guest starts");
        let console = Console::follow(&mut guest);
        assert!(
            console.wait_for("SPINNING", Duration::from_secs(240)),
            "{}",
            console.text()
        );
        std::thread::sleep(Duration::from_secs(2));
        let vmm = guest.vmm_pid().unwrap();
        let (cpu0, t0) = (cpu_ticks(vmm), std::time::Instant::now());
        let rates: Vec<f64> = (0..rounds).map(|_| spin_rate(dur)).collect();
        // The VMM's CPU time over the window, in cores (ticks are 1/100 s).
        let cores_used = (cpu_ticks(vmm) - cpu0) as f64 / 100.0 / t0.elapsed().as_secs_f64();
        guest.stop(Duration::from_secs(2)).unwrap();
        drop(guest);
        jailer.parent().destroy(Duration::from_secs(5)).unwrap();
        cpu_rows.push((cap, median(rates), cores_used));
        solo.extend((0..rounds).map(|_| spin_rate(dur)));
    }
    let solo = median(solo);
    line(format!(
        "CPU: {cores} cores, guest of {cores} vCPUs spinning all of them, host spinner {secs} s x {rounds} (medians)"
    ));
    line(String::new());
    line("| case | host spinner (M iterations/s) | of solo | guest VMM used (cores) |".into());
    line("|---|---:|---:|---:|".into());
    line(format!("| host alone | {:.1} | 100 % | - |", solo / 1e6));
    for (cap, r, used) in &cpu_rows {
        let case = match cap {
            None => "beside the guest, no limit".to_string(),
            Some(p) => format!("beside the guest, max_cpu_percent = {p}"),
        };
        line(format!(
            "| {case} | {:.1} | {:.0} % | {used:.2} |",
            r / 1e6,
            100.0 * r / solo
        ));
    }
    line(String::new());

    // Disk: sequential writes here, alone and while the guest writes its disk flat out.
    let write_script = "echo WRITING; while :; do dd if=/dev/zero of=/dev/vda bs=1M count=128 \
                        conv=fsync 2>/dev/null; echo PASS; done";
    let mut solo_w = Vec::new();
    let mut io_rows = Vec::new();
    solo_w.extend((0..rounds).map(|_| write_rate(data.path(), write_mib)));
    for limit in [None, Some(io_mbps)] {
        let jailer = bench_jailer(data.path(), "io", None);
        let mut limits = GuestLimits::for_guest(1, 256);
        limits.disk_bps = limit.map(|m| m << 20);
        let jail = jailer.jail("bench-write", limits, None).unwrap();
        let disk = tempfile::tempfile_in(data.path()).unwrap();
        disk.set_len(1 << 30).unwrap();
        let mut s = spec("bench-write", write_script, 256);
        s.disk = Some(DiskSpec::new(disk));
        let mut guest = qemu().start_jailed(s, jail).expect("guest starts");
        let console = Console::follow(&mut guest);
        assert!(
            console.wait_for("WRITING", Duration::from_secs(240)),
            "{}",
            console.text()
        );
        // One whole pass first: the guest's writes have reached its disk.
        assert!(
            console.wait_for("PASS", Duration::from_secs(120)),
            "{}",
            console.text()
        );
        let passes_before = console.text().matches("PASS").count();
        let t0 = std::time::Instant::now();
        let rates: Vec<f64> = (0..rounds)
            .map(|_| write_rate(data.path(), write_mib))
            .collect();
        // The guest's rate over at least `secs` x `rounds` (128 MiB per pass).
        let window = dur * rounds as u32;
        if let Some(rest) = window.checked_sub(t0.elapsed()) {
            std::thread::sleep(rest);
        }
        let guest_mbps = (console.text().matches("PASS").count() - passes_before) as f64 * 128.0
            / t0.elapsed().as_secs_f64();
        guest.stop(Duration::from_secs(2)).unwrap();
        drop(guest);
        jailer.parent().destroy(Duration::from_secs(5)).unwrap();
        io_rows.push((limit, median(rates), guest_mbps));
        solo_w.extend((0..rounds).map(|_| write_rate(data.path(), write_mib)));
    }
    let solo_w = median(solo_w);
    line(format!(
        "Disk: host writes {write_mib} MiB sequentially + fsync, x {rounds} (medians); the guest loops dd of 128 MiB + fsync over its virtio disk"
    ));
    line(String::new());
    line("| case | host write (MiB/s) | of solo | guest writes (MiB/s, approx.) |".into());
    line("|---|---:|---:|---:|".into());
    line(format!("| host alone | {solo_w:.0} | 100 % | - |"));
    for (limit, r, g) in &io_rows {
        let case = match limit {
            None => "beside the guest, no io limit".to_string(),
            Some(m) => format!("beside the guest, disk_mbps = {m}"),
        };
        line(format!(
            "| {case} | {r:.0} | {:.0} % | {g:.0} |",
            100.0 * r / solo_w
        ));
    }
    if let Ok(p) = std::env::var("BENCH_OUT") {
        std::fs::write(p, &out).unwrap();
    }
}

fn bench_jailer(root: &Path, tag: &str, cap: Option<u32>) -> Jailer {
    let mut s = JailSettings::new(root.join("jail-root"));
    s.cgroup_name = format!("cjq-bench-{tag}-{}", std::process::id());
    s.uid_base = 411_000;
    s.max_cpu_percent = cap;
    Jailer::new(&s).expect("jailer")
}

/// utime + stime of `pid`, in clock ticks (/proc/<pid>/stat fields 14 and 15).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Iterations per second of a single-threaded xorshift loop over `dur`.
fn spin_rate(dur: Duration) -> f64 {
    let t0 = std::time::Instant::now();
    let (mut x, mut n) = (0x9e37_79b9_7f4a_7c15_u64, 0u64);
    while t0.elapsed() < dur {
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        n += 10_000;
        std::hint::black_box(x);
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

/// MiB/s of writing `mib` MiB to a new file in `dir` and fsyncing it.
fn write_rate(dir: &Path, mib: u64) -> f64 {
    use std::io::Write;
    let path = dir.join("host-write");
    let buf = vec![0x5au8; 1 << 20];
    let t0 = std::time::Instant::now();
    let mut f = std::fs::File::create(&path).unwrap();
    for _ in 0..mib {
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
    let rate = mib as f64 / t0.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path).unwrap();
    rate
}
