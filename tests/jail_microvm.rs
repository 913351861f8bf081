//! Our microvm as a jailed process of its own (vm::microvm::jailed): the node binary's
//! hidden VMM subcommand, started by the jail exactly as qemu is. What the kernel says
//! about the VMM process and every one of its threads (uid, capabilities,
//! no_new_privs, seccomp), its mount and network namespaces, its cgroup's limits, and
//! the guest's console and exit coming back over the process boundary.
//!
//! Needs root, /dev/kvm (tiny guests run on this machine's KVM, see TESTING.md),
//! binutils (`as`, `ld`) and `cargo build -p node --bins`. Names carry the prefix `mj`.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use cpushare_tests::jailcheck::{
    assert_own_mounts_in_netns, assert_unprivileged, field, jail_root_hides_host,
};
use cpushare_tests::tinyguest::build_guest;
use cpushare_tests::{node_bin, require_root};
use vm::jail::{GuestLimits, JailSettings, Jailer};
use vm::microvm::Microvm;
use vm::{Boot, DiskSpec, Guest, GuestExit, GuestSpec, GuestState, NetSpec, Tap};

const GUEST_MAC: [u8; 6] = [0x02, 0x6d, 0x6a, 0x00, 0x00, 0x01];

/// Prints, then idles with interrupts on (halted, not halted for good): the VMM keeps
/// running without spinning a core.
const IDLE: &str = r#"
.intel_syntax noprefix
.code64
.text
.globl _start
_start:
    lea rsi, [msg]
    call puts
1:  sti
    hlt
    jmp 1b
.section .rodata
msg: .asciz "hello from the jailed microvm\n"
"#;

/// Prints, then halts for good: the guest powers off.
const HELLO: &str = r#"
.intel_syntax noprefix
.code64
.text
.globl _start
_start:
    lea rsi, [msg]
    call puts
    cli
    hlt
.section .rodata
msg: .asciz "bye from the jailed microvm\n"
"#;

fn spec(kernel: &Path) -> GuestSpec {
    let mut s = GuestSpec::new(
        "mj-guest",
        Boot::Direct {
            kernel: kernel.to_path_buf(),
            initrd: None,
            cmdline: String::new(),
        },
    );
    s.memory_mib = 32;
    s.wall_clock_limit = Some(Duration::from_secs(120));
    s
}

fn jailer(tag: &str, data: &Path) -> Jailer {
    let mut s = JailSettings::new(data.join("jail-root"));
    s.cgroup_name = format!("mj-{tag}-{}", std::process::id());
    s.uid_base = 420_000;
    Jailer::new(&s).expect("jailer")
}

fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "this test needs /dev/kvm (TESTING.md: KVM runs tiny guests on these machines)"
    );
}

struct Console {
    rx: Receiver<Vec<u8>>,
    buf: Vec<u8>,
}

impl Console {
    fn new(guest: &mut dyn Guest) -> Self {
        Console {
            rx: guest.take_console().expect("console available once"),
            buf: Vec::new(),
        }
    }
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.text().contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(chunk) => self.buf.extend(chunk),
                Err(_) => return false,
            }
        }
        true
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }
}

#[test]
fn jailed_microvm_has_no_privilege_on_any_thread_and_holds_its_limits() {
    if !require_root("mount namespaces, setuid, cgroups, taps") {
        return;
    }
    require_kvm();
    let data = tempfile::tempdir().unwrap();
    let elf = build_guest(data.path(), "idle", IDLE, true);
    let jailer = jailer("priv", data.path());
    let ns_name = format!("mj-{}", std::process::id());
    let ns = overlay::io::create_lease_netns(&ns_name).expect("lease netns");
    let tap = overlay::io::create_guest_tap(&ns, "mjtap0", false).expect("guest tap");
    let limits = GuestLimits::for_guest(2, 32);
    let jail = jailer
        .jail(
            "mj-guest-priv",
            limits.clone(),
            Some(&Path::new("/run/netns").join(&ns_name)),
        )
        .expect("jail");
    let uid = jail.uid();
    let group = jail.group().clone();

    let disk = tempfile::tempfile_in(data.path()).unwrap();
    disk.set_len(4 << 20).unwrap();
    let mut s = spec(&elf);
    s.vcpus = 2;
    s.disk = Some(DiskSpec::new(disk));
    s.net = Some(NetSpec {
        tap: Tap::Fd(tap.into_fd()),
        mac: GUEST_MAC,
    });
    let mut guest = Microvm::new()
        .start_jailed(s, jail, &node_bin())
        .expect("jailed microvm starts");
    let mut console = Console::new(&mut guest);
    let pid = guest.vmm_pid().expect("the VMM is a process");
    assert_ne!(pid, std::process::id());

    // The guest runs in there, and its console comes back.
    assert!(
        console.wait_for("hello from the jailed microvm\n", Duration::from_secs(60)),
        "no console output from the jailed microvm: {:?}",
        console.text()
    );
    assert_eq!(guest.state(), GuestState::Running);

    // The process and every one of its threads, as the kernel reports them. A
    // thread shows its parent's name until it has named itself, so look again for
    // a while until all of them have.
    // main, supervisor, console, net RX, and one per vCPU.
    let wanted = [
        "vcpu0",
        "vcpu1",
        "mvm-console",
        "mvm-netrx",
        "mvm-supervisor",
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let threads = loop {
        let mut threads = Vec::new();
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let task = task.unwrap().path();
            let status = std::fs::read_to_string(task.join("status")).unwrap();
            let name = field(&status, "Name");
            assert_unprivileged(&status, &name, uid);
            let cg = std::fs::read_to_string(task.join("cgroup")).unwrap();
            assert!(cg.contains("/mj-guest-priv"), "{name}: cgroup {cg}");
            threads.push(name);
        }
        threads.sort();
        let all = wanted.iter().all(|w| threads.iter().any(|t| t == w));
        if all || std::time::Instant::now() > deadline {
            break threads;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("VMM pid {pid}, uid {uid}, threads {threads:?}");
    for want in wanted {
        assert!(
            threads.iter().any(|t| t == want),
            "no {want} in {threads:?}"
        );
    }
    assert!(threads.len() >= 6, "{threads:?}");

    // Its own mount namespace, holding only what it needs; the lease's network
    // namespace.
    assert_own_mounts_in_netns(pid, &ns_name);
    let (root, top) = jail_root_hides_host(pid, data.path());
    assert!(
        root.join("cpushare-vmm").is_file(),
        "no VMM binary in {top:?}"
    );
    assert!(root.join("files/kernel").is_file(), "no kernel in {top:?}");
    assert!(root.join("dev/kvm").exists(), "no /dev/kvm in {top:?}");
    assert_eq!(
        std::fs::metadata(root.join("dev/kvm")).unwrap().uid(),
        uid,
        "/dev/kvm in the jail belongs to the guest's uid"
    );
    let allowed = ["cpushare-vmm", "dev", "etc", "files", "lib", "lib64", "usr"];
    for t in &top {
        assert!(allowed.contains(&t.as_str()), "unexpected /{t} in the jail");
    }

    // Its cgroup, with the lease's limits.
    assert_eq!(group.pids(), vec![pid]);
    let held = group.limits();
    assert_eq!(held.cpu_percent, Some(200));
    assert_eq!(held.memory_bytes, Some(limits.memory_bytes));
    assert_eq!(held.pids, Some(limits.pids));

    // The guest ignores the power button: after the grace it is stopped, and the VMM
    // says so before it exits.
    let t0 = Instant::now();
    let exit = guest.stop(Duration::from_millis(500)).unwrap();
    assert_eq!(exit, GuestExit::Stopped);
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    drop(guest);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "VMM still there"
    );
    assert!(!group.exists(), "the guest cgroup outlived its guest");
    drop(ns);
    jailer.parent().destroy(Duration::from_secs(5)).unwrap();
}

#[test]
fn jailed_microvm_reports_the_guests_own_exit_and_its_limit() {
    if !require_root("mount namespaces, setuid, cgroups") {
        return;
    }
    require_kvm();
    let data = tempfile::tempdir().unwrap();
    let jailer = jailer("exit", data.path());

    // Powers itself off: the exit comes back from the VMM's report.
    let elf = build_guest(data.path(), "hello", HELLO, true);
    let jail = jailer
        .jail("mj-guest-exit", GuestLimits::for_guest(1, 32), None)
        .expect("jail");
    let outcome = jail.outcome();
    let mut guest = Microvm::new()
        .start_jailed(spec(&elf), jail, &node_bin())
        .expect("jailed microvm starts");
    let mut console = Console::new(&mut guest);
    let exit = guest
        .wait_timeout(Duration::from_secs(60))
        .unwrap()
        .expect("guest ends");
    assert_eq!(exit, GuestExit::PoweredOff);
    assert!(console.wait_for("bye from the jailed microvm\n", Duration::from_secs(5)));
    drop(guest);
    assert!(outcome.torn_down.load(std::sync::atomic::Ordering::SeqCst));

    // Runs into its wall-clock limit.
    let elf = build_guest(data.path(), "idle", IDLE, true);
    let jail = jailer
        .jail("mj-guest-limit", GuestLimits::for_guest(1, 32), None)
        .expect("jail");
    let mut s = spec(&elf);
    s.wall_clock_limit = Some(Duration::from_millis(1500));
    let mut guest = Microvm::new()
        .start_jailed(s, jail, &node_bin())
        .expect("jailed microvm starts");
    let exit = guest
        .wait_timeout(Duration::from_secs(60))
        .unwrap()
        .expect("guest ends at its limit");
    assert_eq!(exit, GuestExit::LimitReached);
    drop(guest);

    // A kernel that is not one: refused with the VMM's reason, before it runs.
    let junk = data.path().join("junk");
    std::fs::write(&junk, vec![0x5au8; 8192]).unwrap();
    let jail = jailer
        .jail("mj-guest-junk", GuestLimits::for_guest(1, 32), None)
        .expect("jail");
    let err = Microvm::new()
        .start_jailed(spec(&junk), jail, &node_bin())
        .err()
        .expect("junk kernel refused");
    assert!(matches!(err, vm::Error::KernelNotBootable { .. }), "{err}");

    // A VMM that dies before it reports: the error carries its last stderr line
    // (here `ls`, given the VMM's arguments, complains about them).
    let jail = jailer
        .jail("mj-guest-nostart", GuestLimits::for_guest(1, 32), None)
        .expect("jail");
    let err = Microvm::new()
        .start_jailed(spec(&elf), jail, Path::new("/usr/bin/ls"))
        .err()
        .expect("a binary that is no VMM fails to start");
    assert!(err.to_string().contains("cannot access"), "{err}");
    jailer.parent().destroy(Duration::from_secs(5)).unwrap();
}
