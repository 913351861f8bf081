//! Guests started through the seller run jailed, and a seller killed with `kill -9`
//! while two guests run leaves nothing behind once it is started again.
//!
//! Two buyers and one seller (max_guests = 2) in network namespaces joined by veth
//! pairs; each buyer rents one guest of the test image (a run spreads its guests
//! over distinct sellers). The test reads the VMMs'
//! /proc entries and cgroups (uid, capabilities, no_new_privs, seccomp, mount
//! namespace, limits), then kills the buyer and the seller with SIGKILL, lists what
//! the dead seller left (VMM processes, lease namespaces and taps, guest cgroups,
//! jail records, temp files), starts the seller again and counts them once more.
//!
//! Needs root. Names carry the prefix `cjs`.

#[path = "common/vmguest.rs"]
mod vmguest;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cpushare_tests::netns::{veth, Netns};
use cpushare_tests::node::NodeProc;
use cpushare_tests::{require_root, wait_until};
use serde_json::Value;

fn cfg(dir: &Path, text: &str) -> Result<String> {
    std::fs::create_dir_all(dir)?;
    let p = dir.join("node.toml");
    std::fs::write(&p, text)?;
    Ok(p.display().to_string())
}

fn spawn_in(
    ns: &Netns,
    dir: &Path,
    role: &str,
    config: &str,
    boot: Option<&str>,
) -> Result<NodeProc> {
    let mut args = vec!["--listen", "/ip4/0.0.0.0/tcp/7450", "--config", config];
    if let Some(b) = boot {
        args.extend(["--bootstrap", b]);
    }
    NodeProc::spawn(&["ip", "netns", "exec", ns.name()], dir, role, &args)
}

fn status_field(pid: u32, key: &str) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_string())
}

/// A jail record the seller wrote: the guest's name and its cgroup directories.
#[derive(Debug, Clone)]
struct Jailed {
    name: String,
    uid: u32,
    dirs: Vec<PathBuf>,
}

fn jail_records(data: &Path) -> Vec<Jailed> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(data.join("jails"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(j) = std::fs::read(e.path()).map(|b| serde_json::from_slice::<Value>(&b)) else {
            continue;
        };
        let Ok(j) = j else { continue };
        v.push(Jailed {
            name: j["name"].as_str().unwrap_or_default().to_string(),
            uid: j["uid"].as_u64().unwrap_or(0) as u32,
            dirs: j["group"]["dirs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|d| d["path"].as_str().map(PathBuf::from))
                .collect(),
        });
    }
    v
}

fn procs_in(dirs: &[PathBuf]) -> Vec<u32> {
    let mut v: Vec<u32> = dirs
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|s| {
            s.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn read_u64(dirs: &[PathBuf], files: &[&str]) -> Option<u64> {
    dirs.iter()
        .flat_map(|d| files.iter().map(move |f| d.join(f)))
        .find_map(|p| std::fs::read_to_string(p).ok())
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
}

/// What a seller left on the host, by kind.
#[derive(Debug, Default, PartialEq, Eq)]
struct Leftovers {
    vmm_processes: Vec<u32>,
    namespaces: Vec<String>,
    taps: Vec<String>,
    cgroups: Vec<PathBuf>,
    jail_records: usize,
    temp_files: Vec<PathBuf>,
}

impl Leftovers {
    fn count(&self) -> usize {
        self.vmm_processes.len()
            + self.namespaces.len()
            + self.taps.len()
            + self.cgroups.len()
            + self.jail_records
            + self.temp_files.len()
    }
}

/// Lists what is left of `guests` (lease namespaces `csl-X`, taps `cstX`) and of
/// the seller's data dir.
fn leftovers(data: &Path, guests: &[Jailed], netns: &[String]) -> Leftovers {
    let mut l = Leftovers::default();
    for g in guests {
        l.vmm_processes.extend(procs_in(&g.dirs));
        // Any process still running as the guest's uid counts too. A zombie does
        // not: it runs nothing and holds nothing but its pid until its parent (init,
        // for a VMM orphaned by the killed seller) reaps it, which is not the seller's
        // to do.
        for p in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if status_field(pid, "State").is_some_and(|s| s.starts_with('Z')) {
                continue;
            }
            if status_field(pid, "Uid")
                .is_some_and(|u| u.split_whitespace().next() == Some(&g.uid.to_string()))
            {
                l.vmm_processes.push(pid);
            }
        }
        l.cgroups
            .extend(g.dirs.iter().filter(|d| d.exists()).cloned());
    }
    l.vmm_processes.sort_unstable();
    l.vmm_processes.dedup();
    for ns in netns {
        // The namespace's file: a live namespace, or the mount-point file of one
        // that died with the seller's private mount namespace. Either is left over.
        if Path::new("/run/netns").join(ns).exists() {
            l.namespaces.push(ns.clone());
        }
        // Its tap, looked up by name or, where the name is not bound in our mount
        // namespace, through the network namespace of a VMM in that lease's cgroup.
        let tap = ns.replacen("csl-", "cst", 1);
        let lease = ns.replacen("csl-", "lease-", 1);
        let vmm = guests
            .iter()
            .find(|g| g.name == lease)
            .and_then(|g| procs_in(&g.dirs).first().copied());
        let by_name = std::process::Command::new("ip")
            .args(["-n", ns, "link", "show", &tap])
            .output()
            .is_ok_and(|o| o.status.success());
        let by_vmm = vmm.is_some_and(|pid| {
            std::process::Command::new("nsenter")
                .arg(format!("--net=/proc/{pid}/ns/net"))
                .args(["ip", "link", "show", &tap])
                .output()
                .is_ok_and(|o| o.status.success())
        });
        if by_name || by_vmm {
            l.taps.push(tap);
        }
    }
    l.jail_records = jail_records(data).len();
    for e in std::fs::read_dir(data.join("vm-tmp"))
        .into_iter()
        .flatten()
        .flatten()
    {
        l.temp_files.push(e.path());
    }
    l
}

#[test]
fn seller_guests_run_jailed_and_a_restart_after_kill9_leaves_nothing() -> Result<()> {
    if !require_root("network namespaces, taps, qemu, cgroups") {
        return Ok(());
    }
    let tag = std::process::id() % 10000;
    // Two buyers (a run places each guest on a different seller, so each buyer
    // rents one guest), each on its own veth pair to the seller.
    let b = Netns::new(&format!("cjs{tag}b"))?;
    let c = Netns::new(&format!("cjs{tag}c"))?;
    let s = Netns::new(&format!("cjs{tag}s"))?;
    veth(&b, "eth0", "10.211.0.1/24", &s, "eth0", "10.211.0.2/24")?;
    veth(&c, "eth0", "10.212.0.1/24", &s, "eth1", "10.212.0.2/24")?;
    for ns in [&b, &c, &s] {
        ns.ip(&["link", "set", "lo", "up"])?;
    }
    let tmp = tempfile::tempdir_in(vmguest::scratch_dir())?;
    let root = tmp.path();
    let buyer_cfg = "[buyer]\nbilling_period_s = 5\ngrace_s = 60\nsilence_s = 60\n";
    let bdir = root.join("buyer");
    let bcfg = cfg(&bdir, buyer_cfg)?;
    let mut buyer = spawn_in(&b, &bdir, "buyer", &bcfg, None)?;
    let boot = format!("/ip4/10.211.0.1/tcp/7450/p2p/{}", buyer.peer_id);
    let sdir = root.join("seller");
    let scfg = cfg(
        &sdir,
        "[seller]\nmax_guests = 2\nvcpus = 1\nmemory_mib = 256\naccel = \"tcg\"\nmax_cpu_percent = 90\n",
    )?;
    let mut seller = spawn_in(&s, &sdir, "seller", &scfg, Some(&boot))?;
    let cdir = root.join("buyer2");
    // Its guests on other overlay addresses (the seller refuses a guest IP it
    // already attached, whoever the buyer).
    let ccfg = cfg(
        &cdir,
        &format!("{buyer_cfg}[overlay]\nhost_ip = \"10.77.1.1\"\n"),
    )?;
    let boot_c = format!("/ip4/10.212.0.2/tcp/7450/p2p/{}", seller.peer_id);
    let mut buyer2 = spawn_in(&c, &cdir, "buyer", &ccfg, Some(&boot_c))?;

    let files = vmguest::test_guest();
    for by in [&buyer, &buyer2] {
        let out = by.cli_ok(&[
            "image",
            "import",
            "--kernel",
            &files.vmlinuz.display().to_string(),
            "--initrd",
            &files.initrd.display().to_string(),
            "--cmdline",
            &vmguest::cmdline("echo cs-up", "cs.keep"),
        ])?;
        let image = out
            .split_whitespace()
            .find(|w| w.len() == 64 && w.chars().all(|c| c.is_ascii_hexdigit()))
            .context("image id in import output")?
            .to_string();
        let offered = wait_until(Duration::from_secs(90), || {
            by.status()
                .ok()
                .and_then(|v| v["market"]["offers"].as_u64())
                .is_some_and(|o| o >= 1)
        });
        if !offered {
            bail!(
                "no offer reached the buyer: {}\nseller log:\n{}",
                by.status()?,
                seller.log()
            );
        }
        by.cli_ok(&[
            "run", "--image", &image, "--count", "1", "--detach", "--json",
        ])?;
    }

    // Two jailed VMMs, each alone in its cgroup.
    let mut guests = Vec::new();
    let up = wait_until(Duration::from_secs(180), || {
        guests = jail_records(&sdir);
        guests.len() == 2 && guests.iter().all(|g| procs_in(&g.dirs).len() == 1)
    });
    if !up {
        bail!(
            "two jailed guests did not start: {guests:?}\nseller log:\n{}",
            seller.log()
        );
    }
    let seller_pid = seller.pid().context("seller pid")?;
    let home_like = ["home", "root", "work", "tmp"];
    for g in &guests {
        let pid = procs_in(&g.dirs)[0];
        eprintln!("guest {} runs as uid {} in VMM pid {pid}", g.name, g.uid);
        let field = |k: &str| status_field(pid, k).unwrap_or_default();
        assert!(
            field("Uid").split_whitespace().all(|u| u != "0"),
            "uid {}",
            field("Uid")
        );
        assert!(
            field("Gid").split_whitespace().all(|u| u != "0"),
            "gid {}",
            field("Gid")
        );
        assert_eq!(field("CapEff"), "0000000000000000");
        assert_eq!(field("CapPrm"), "0000000000000000");
        assert_eq!(field("CapBnd"), "0000000000000000");
        assert_eq!(field("NoNewPrivs"), "1");
        assert_eq!(field("Seccomp"), "2");
        let vmm_root = PathBuf::from(format!("/proc/{pid}/root"));
        let data_inside = vmm_root.join(sdir.strip_prefix("/").unwrap());
        assert!(
            !data_inside.exists(),
            "the seller's data dir is in the jail"
        );
        for d in home_like {
            assert!(!vmm_root.join(d).exists(), "/{d} is in the jail");
        }
        let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
        assert!(
            !mountinfo.contains(&sdir.display().to_string()),
            "{mountinfo}"
        );
        let ns = |p: u32, k: &str| std::fs::read_link(format!("/proc/{p}/ns/{k}")).unwrap();
        assert_ne!(
            ns(pid, "mnt"),
            ns(seller_pid, "mnt"),
            "shares the seller's mount namespace"
        );
        // The lease's limits: one vCPU = one core, 256 MiB + VMM overhead, pids.
        let cpu = read_u64(&g.dirs, &["cpu.max", "cpu.cfs_quota_us"]);
        assert_eq!(cpu, Some(100_000), "cpu quota of one vCPU");
        let mem = read_u64(&g.dirs, &["memory.max", "memory.limit_in_bytes"]);
        assert_eq!(mem, Some((256 + vm::jail::VMM_OVERHEAD_MIB) << 20));
        let pids = read_u64(&g.dirs, &["pids.max"]);
        assert_eq!(pids, Some(130));
    }
    // The guests' parent cgroup holds max_cpu_percent of the machine.
    let parent = guests[0].dirs[0].parent().unwrap().to_path_buf();
    let cores = std::thread::available_parallelism()?.get() as u64;
    assert_eq!(
        read_u64(&[parent], &["cpu.max", "cpu.cfs_quota_us"]),
        Some(cores * 90_000),
        "max_cpu_percent on the guests' parent"
    );

    // kill -9 the buyers (no replacement leases) and then the seller.
    let netns: Vec<String> = guests
        .iter()
        .map(|g| g.name.replacen("lease-", "csl-", 1))
        .collect();
    let before = leftovers(&sdir, &guests, &netns);
    eprintln!("while running: {before:?}");
    assert_eq!(before.vmm_processes.len(), 2, "{before:?}");
    assert_eq!(before.namespaces.len(), 2, "{before:?}");
    assert_eq!(before.taps.len(), 2, "{before:?}");
    buyer.kill9();
    buyer2.kill9();
    seller.kill9();
    let after_kill = leftovers(&sdir, &guests, &netns);
    eprintln!(
        "after kill -9 ({} things): {} VMM processes, {} namespaces, {} taps, {} cgroups, {} jail records, {} temp files",
        after_kill.count(),
        after_kill.vmm_processes.len(),
        after_kill.namespaces.len(),
        after_kill.taps.len(),
        after_kill.cgroups.len(),
        after_kill.jail_records,
        after_kill.temp_files.len()
    );
    assert!(
        after_kill.cgroups.len() >= 2,
        "the killed seller's cgroups: {after_kill:?}"
    );
    assert_eq!(after_kill.jail_records, 2);

    let seller = spawn_in(&s, &sdir, "seller", &scfg, Some(&boot))?;
    let offering = wait_until(Duration::from_secs(60), || {
        seller
            .status()
            .ok()
            .is_some_and(|v| v["market"]["offering"] == true)
    });
    assert!(
        offering,
        "the restarted seller does not offer: {}",
        seller.status()?
    );
    let after = leftovers(&sdir, &guests, &netns);
    eprintln!("after the restart ({} things): {after:?}", after.count());
    assert_eq!(
        after,
        Leftovers::default(),
        "the restarted seller left these"
    );
    drop(seller);
    drop(s);
    drop(b);
    drop(c);
    Ok(())
}
