//! qemu in its jail (vm::jail), with the real test guest: what the kernel says about
//! the VMM process (uid, capabilities, no_new_privs, seccomp, mount and network
//! namespace, cgroup limits), and a guest that eats more memory than its cgroup
//! allows is OOM-killed there while this process lives on.
//!
//! Needs root. Names carry the prefix `cjq`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

fn status_field(pid: u32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_string()
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
    let uids = status_field(pid, "Uid");
    assert!(
        uids.split_whitespace().all(|u| u == uid.to_string()),
        "uids {uids}, want {uid}"
    );
    let gids = status_field(pid, "Gid");
    assert!(gids.split_whitespace().all(|g| g != "0"), "gids {gids}");
    assert_eq!(status_field(pid, "Groups"), uid.to_string());
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "Seccomp"), "2");

    // Its own mount namespace, holding neither the data dir nor /home; the lease's
    // network namespace.
    let ns_of = |p: &str, kind: &str| {
        std::fs::metadata(format!("/proc/{p}/ns/{kind}"))
            .unwrap()
            .ino()
    };
    assert_ne!(ns_of(&pid.to_string(), "mnt"), ns_of("self", "mnt"));
    assert_eq!(
        ns_of(&pid.to_string(), "net"),
        std::fs::metadata(format!("/run/netns/{ns_name}"))
            .unwrap()
            .ino()
    );
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut top: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    eprintln!("jail root holds {top:?}");
    assert!(!root.join("home").exists(), "/home in the jail");
    assert!(!root.join("root").exists(), "/root in the jail");
    let data_inside = root.join(data.path().strip_prefix("/").unwrap());
    assert!(!data_inside.exists(), "the data dir is in the jail");
    assert!(!root.join("work").exists() && !root.join("proc/1").exists());
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    assert!(
        !mountinfo.contains(&data.path().display().to_string()),
        "{mountinfo}"
    );

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
