//! Guest cgroups on cgroup v2 or v1, detected at runtime, behind one interface.
//!
//! A modern seller has one cgroup2 hierarchy with every controller; older (or hybrid)
//! hosts have one v1 hierarchy per controller (`/sys/fs/cgroup/{cpu,memory,pids,blkio}`).
//! [`Layout`] says, for each controller we use, which mount holds it and where this
//! process sits in it. A [`Group`] is one logical cgroup: one directory on v2, one per
//! hierarchy on v1; limits are written in whichever dialect each directory speaks.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The controllers the jail limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Controller {
    Cpu,
    Memory,
    Pids,
    Io,
}

impl Controller {
    const ALL: [Controller; 4] = [
        Controller::Cpu,
        Controller::Memory,
        Controller::Pids,
        Controller::Io,
    ];

    fn v1_name(self) -> &'static str {
        match self {
            Controller::Cpu => "cpu",
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Io => "blkio",
        }
    }

    fn v2_name(self) -> &'static str {
        match self {
            Controller::Cpu => "cpu",
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Io => "io",
        }
    }
}

/// One mounted hierarchy and where this process sits in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Mount point, e.g. `/sys/fs/cgroup` or `/sys/fs/cgroup/memory`.
    pub mount: PathBuf,
    /// Whether it is the cgroup2 hierarchy.
    pub v2: bool,
    /// This process's cgroup, as a directory under `mount`.
    pub own: PathBuf,
}

/// Which hierarchy holds each controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub controllers: BTreeMap<Controller, Hierarchy>,
}

/// Splits a mountinfo line into (mount root, mount point, fs type, super options).
fn mountinfo_fields(line: &str) -> Option<(&str, &str, &str, &str)> {
    let (left, right) = line.split_once(" - ")?;
    let l: Vec<&str> = left.split(' ').collect();
    let r: Vec<&str> = right.split(' ').collect();
    Some((l.get(3)?, l.get(4)?, r.first()?, r.get(2)?))
}

/// Joins a cgroup path (from /proc/self/cgroup) onto a mount whose root is `root`.
fn dir_under(mount: &str, root: &str, path: &str) -> PathBuf {
    let rel = path.strip_prefix(root).unwrap_or(path);
    let rel = rel.trim_start_matches('/');
    if rel.is_empty() {
        PathBuf::from(mount)
    } else {
        Path::new(mount).join(rel)
    }
}

impl Layout {
    /// Reads this host's layout from /proc.
    ///
    /// A process in a mount namespace without the cgroup mounts (`ip netns exec`
    /// mounts a fresh /sys, which hides them) mounts the hierarchies it belongs to
    /// again, in its own namespace, where the host has them by convention
    /// ([`mount_mirror`]); the host's own mounts are never touched.
    pub fn detect() -> io::Result<Layout> {
        let cgroup = std::fs::read_to_string("/proc/self/cgroup")?;
        let read_mounts = || std::fs::read_to_string("/proc/self/mountinfo");
        let read =
            |mount: &str| std::fs::read_to_string(Path::new(mount).join("cgroup.controllers")).ok();
        let mountinfo = read_mounts()?;
        match Layout::parse(&mountinfo, &cgroup, read) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && !has_cgroup_mount(&mountinfo) => {
                mount_mirror(&cgroup).map_err(|m| {
                    io::Error::new(
                        m.kind(),
                        format!("{e}; mounting them at {MIRROR} failed: {m}"),
                    )
                })?;
                tracing::info!("cgroup hierarchies mounted at {MIRROR} in this mount namespace");
                Layout::parse(&read_mounts()?, &cgroup, read)
            }
            other => other,
        }
    }

    /// The layout from the text of /proc/self/mountinfo and /proc/self/cgroup;
    /// `v2_controllers` reads a cgroup2 mount's root `cgroup.controllers`.
    pub fn parse(
        mountinfo: &str,
        self_cgroup: &str,
        v2_controllers: impl Fn(&str) -> Option<String>,
    ) -> io::Result<Layout> {
        // Where this process sits: "0::/path" for v2, "N:ctrl,ctrl:/path" for v1.
        let mut v2_path = None;
        let mut v1_paths: BTreeMap<String, String> = BTreeMap::new();
        for line in self_cgroup.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(_), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if ctrls.is_empty() {
                v2_path = Some(path.to_string());
            } else {
                for c in ctrls.split(',') {
                    v1_paths.insert(c.to_string(), path.to_string());
                }
            }
        }
        let mut controllers = BTreeMap::new();
        for line in mountinfo.lines() {
            let Some((root, mount, fstype, opts)) = mountinfo_fields(line) else {
                continue;
            };
            match fstype {
                "cgroup2" => {
                    let Some(path) = v2_path.as_deref() else {
                        continue;
                    };
                    let avail = v2_controllers(mount).unwrap_or_default();
                    let avail: Vec<&str> = avail.split_whitespace().collect();
                    for c in Controller::ALL {
                        if avail.contains(&c.v2_name()) {
                            // v2 wins over a v1 mount of the same controller (only
                            // one of them can have it bound anyway).
                            controllers.insert(
                                c,
                                Hierarchy {
                                    mount: mount.into(),
                                    v2: true,
                                    own: dir_under(mount, root, path),
                                },
                            );
                        }
                    }
                }
                "cgroup" => {
                    let opts: Vec<&str> = opts.split(',').collect();
                    for c in Controller::ALL {
                        if !opts.contains(&c.v1_name()) {
                            continue;
                        }
                        if controllers.get(&c).is_some_and(|h: &Hierarchy| h.v2) {
                            continue;
                        }
                        let Some(path) = v1_paths.get(c.v1_name()) else {
                            continue;
                        };
                        controllers.insert(
                            c,
                            Hierarchy {
                                mount: mount.into(),
                                v2: false,
                                own: dir_under(mount, root, path),
                            },
                        );
                    }
                }
                _ => {}
            }
        }
        for c in [Controller::Cpu, Controller::Memory, Controller::Pids] {
            if !controllers.contains_key(&c) {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "no cgroup hierarchy has the {} controller (mount cgroup2 with it, or a v1 hierarchy)",
                        c.v2_name()
                    ),
                ));
            }
        }
        Ok(Layout { controllers })
    }

    /// Whether every controller we use is on cgroup v2.
    pub fn is_v2(&self) -> bool {
        self.controllers.values().all(|h| h.v2)
    }

    /// One line for logs: which controllers live where.
    pub fn describe(&self) -> String {
        self.controllers
            .iter()
            .map(|(c, h)| {
                format!(
                    "{}: {} ({})",
                    c.v2_name(),
                    h.own.display(),
                    if h.v2 { "v2" } else { "v1" }
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Creates (or reuses) the parent cgroup of all guests, `name` under this
    /// process's own cgroup in every hierarchy. On v2 a cgroup with processes cannot
    /// hand controllers to children, so where this process is not in the root cgroup
    /// it first moves itself into a `daemon` leaf (what systemd's `Delegate=yes`
    /// expects); where that is refused, the parent goes under the root cgroup.
    pub fn guests_parent(&self, name: &str) -> io::Result<Group> {
        let mut dirs = Vec::new();
        let mut seen = Vec::new();
        for h in self.controllers.values() {
            if seen.contains(&h.mount) {
                continue;
            }
            seen.push(h.mount.clone());
            let dir = if h.v2 {
                v2_parent(h, name, self.v2_names())?
            } else {
                let d = h.own.join(name);
                mkdir(&d)?;
                d
            };
            dirs.push(GroupDir {
                path: dir,
                v2: h.v2,
            });
        }
        Ok(Group { dirs })
    }

    fn v2_names(&self) -> Vec<&'static str> {
        self.controllers
            .iter()
            .filter(|(_, h)| h.v2)
            .map(|(c, _)| c.v2_name())
            .collect()
    }
}

/// Where hosts mount their cgroup hierarchies.
const MIRROR: &str = "/sys/fs/cgroup";

fn has_cgroup_mount(mountinfo: &str) -> bool {
    mountinfo
        .lines()
        .filter_map(mountinfo_fields)
        .any(|(_, _, fstype, _)| fstype == "cgroup" || fstype == "cgroup2")
}

/// What [`mount_mirror`] mounts for a process whose /proc/self/cgroup is
/// `self_cgroup`: (directory under [`MIRROR`] or "" for itself, fs type, options).
/// Pure v2: cgroup2 on /sys/fs/cgroup. Otherwise systemd's layout: a tmpfs there,
/// each v1 hierarchy we use at its controller list, cgroup2 at `unified`.
fn mirror_plan(self_cgroup: &str) -> Vec<(String, &'static str, String)> {
    let mut v1 = Vec::new();
    let mut v2 = false;
    for line in self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(_)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if ctrls.is_empty() {
            v2 = true;
        } else if ctrls
            .split(',')
            .any(|c| Controller::ALL.iter().any(|k| k.v1_name() == c))
        {
            v1.push(ctrls.to_string());
        }
    }
    let mut plan = Vec::new();
    if v1.is_empty() {
        if v2 {
            plan.push((String::new(), "cgroup2", String::new()));
        }
        return plan;
    }
    plan.push((String::new(), "tmpfs", "mode=755,size=64k".to_string()));
    for c in v1 {
        plan.push((c.clone(), "cgroup", c));
    }
    if v2 {
        plan.push(("unified".into(), "cgroup2", String::new()));
    }
    plan
}

/// Mounts the cgroup hierarchies this process is in at [`MIRROR`], in the current
/// mount namespace (only called when that namespace has no cgroup mount at all).
fn mount_mirror(self_cgroup: &str) -> io::Result<()> {
    use std::ffi::CString;
    let plan = mirror_plan(self_cgroup);
    if plan.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "this process is in no cgroup hierarchy",
        ));
    }
    for (sub, fstype, opts) in plan {
        let dir = Path::new(MIRROR).join(&sub);
        std::fs::create_dir_all(&dir)?;
        let cs =
            |s: &str| CString::new(s).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e));
        let (src, target, fs, data) = (
            cs(fstype)?,
            cs(&dir.display().to_string())?,
            cs(fstype)?,
            cs(&opts)?,
        );
        let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fs.as_ptr(),
                flags,
                data.as_ptr().cast(),
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("mount -t {fstype} -o {opts:?} {}: {e}", dir.display()),
            ));
        }
    }
    Ok(())
}

fn mkdir(d: &Path) -> io::Result<()> {
    match std::fs::create_dir(d) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(io::Error::new(
            e.kind(),
            format!("creating cgroup {}: {e}", d.display()),
        )),
        _ => Ok(()),
    }
}

/// Turns on `names` for the children of v2 cgroup `dir`.
fn enable(dir: &Path, names: &[&str]) -> io::Result<()> {
    let line: Vec<String> = names.iter().map(|n| format!("+{n}")).collect();
    write_file(&dir.join("cgroup.subtree_control"), &line.join(" "))
}

fn v2_parent(h: &Hierarchy, name: &str, names: Vec<&'static str>) -> io::Result<PathBuf> {
    let at_root = h.own == h.mount;
    let base = if at_root {
        h.own.clone()
    } else {
        let delegated = (|| {
            let leaf = h.own.join("daemon");
            mkdir(&leaf)?;
            write_file(&leaf.join("cgroup.procs"), &std::process::id().to_string())?;
            enable(&h.own, &names)
        })();
        match delegated {
            Ok(()) => h.own.clone(),
            Err(e) => {
                tracing::info!(own = %h.own.display(), error = %e, "own cgroup not delegated; guests go under the root cgroup");
                h.mount.clone()
            }
        }
    };
    let dir = base.join(name);
    mkdir(&dir)?;
    enable(&dir, &names)?;
    Ok(dir)
}

fn write_file(path: &Path, value: &str) -> io::Result<()> {
    std::fs::write(path, value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("writing {value:?} to {}: {e}", path.display()),
        )
    })
}

/// One directory of a logical cgroup.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroupDir {
    pub path: PathBuf,
    pub v2: bool,
}

/// What a cgroup may use. `None` leaves a limit as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// CPU time per period, in percent of one core (200 = two cores).
    pub cpu_percent: Option<u32>,
    pub memory_bytes: Option<u64>,
    pub pids: Option<u32>,
}

/// The CFS period the quotas use.
pub const CPU_PERIOD_US: u64 = 100_000;

/// A logical cgroup: one directory per hierarchy (one on v2).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Group {
    pub dirs: Vec<GroupDir>,
}

impl Group {
    /// A child cgroup `name` in every directory (created).
    pub fn child(&self, name: &str) -> io::Result<Group> {
        let mut dirs = Vec::new();
        for d in &self.dirs {
            let path = d.path.join(name);
            mkdir(&path)?;
            dirs.push(GroupDir { path, v2: d.v2 });
        }
        Ok(Group { dirs })
    }

    /// Files a process writes "0" into to join this cgroup (`cgroup.procs`).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|d| d.path.join("cgroup.procs"))
            .collect()
    }

    /// Writes the limits each directory's controllers take.
    pub fn set_limits(&self, l: &Limits) -> io::Result<()> {
        for d in &self.dirs {
            let has = |f: &str| d.path.join(f).exists();
            if let Some(pct) = l.cpu_percent {
                let quota = CPU_PERIOD_US * u64::from(pct.max(1)) / 100;
                if d.v2 && has("cpu.max") {
                    write_file(&d.path.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                } else if has("cpu.cfs_quota_us") {
                    write_file(
                        &d.path.join("cpu.cfs_period_us"),
                        &CPU_PERIOD_US.to_string(),
                    )?;
                    write_file(&d.path.join("cpu.cfs_quota_us"), &quota.to_string())?;
                }
            }
            if let Some(bytes) = l.memory_bytes {
                if d.v2 && has("memory.max") {
                    write_file(&d.path.join("memory.max"), &bytes.to_string())?;
                    // A guest must not push the owner's memory to swap either.
                    if has("memory.swap.max") {
                        write_file(&d.path.join("memory.swap.max"), "0")?;
                    }
                } else if has("memory.limit_in_bytes") {
                    write_file(&d.path.join("memory.limit_in_bytes"), &bytes.to_string())?;
                    if has("memory.memsw.limit_in_bytes") {
                        let _ = write_file(
                            &d.path.join("memory.memsw.limit_in_bytes"),
                            &bytes.to_string(),
                        );
                    }
                }
            }
            if let Some(n) = l.pids {
                if has("pids.max") {
                    write_file(&d.path.join("pids.max"), &n.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// The limits as the kernel holds them (what [`Group::set_limits`] wrote).
    pub fn limits(&self) -> Limits {
        let mut l = Limits::default();
        for d in &self.dirs {
            let read = |f: &str| std::fs::read_to_string(d.path.join(f)).ok();
            if let Some(s) = read("cpu.max") {
                let mut it = s.split_whitespace();
                if let (Some(q), Some(p)) = (it.next(), it.next()) {
                    if let (Ok(q), Ok(p)) = (q.parse::<u64>(), p.parse::<u64>()) {
                        l.cpu_percent = Some((q * 100 / p.max(1)) as u32);
                    }
                }
            } else if let (Some(q), Some(p)) = (read("cpu.cfs_quota_us"), read("cpu.cfs_period_us"))
            {
                if let (Ok(q), Ok(p)) = (q.trim().parse::<i64>(), p.trim().parse::<u64>()) {
                    if q > 0 {
                        l.cpu_percent = Some((q as u64 * 100 / p.max(1)) as u32);
                    }
                }
            }
            let mem = read("memory.max").or_else(|| read("memory.limit_in_bytes"));
            if let Some(Ok(b)) = mem.map(|s| s.trim().parse::<u64>()) {
                l.memory_bytes = Some(b);
            }
            if let Some(Ok(n)) = read("pids.max").map(|s| s.trim().parse::<u32>()) {
                l.pids = Some(n);
            }
        }
        l
    }

    /// Processes in the cgroup (every directory).
    pub fn pids(&self) -> Vec<u32> {
        let mut v = Vec::new();
        for f in self.procs_files() {
            if let Ok(s) = std::fs::read_to_string(f) {
                v.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
        }
        v.sort_unstable();
        v.dedup();
        v
    }

    /// OOM kills in the cgroup so far (v2 memory.events, v1 memory.oom_control).
    pub fn oom_kills(&self) -> u64 {
        let mut n = 0;
        for d in &self.dirs {
            for f in ["memory.events", "memory.oom_control"] {
                if let Ok(s) = std::fs::read_to_string(d.path.join(f)) {
                    for line in s.lines() {
                        if let Some(v) = line.strip_prefix("oom_kill ") {
                            n += v.trim().parse::<u64>().unwrap_or(0);
                        }
                    }
                }
            }
        }
        n
    }

    /// Whether any of its directories still exists.
    pub fn exists(&self) -> bool {
        self.dirs.iter().any(|d| d.path.exists())
    }

    /// Kills every process in it, waits (up to `timeout`) until they are gone, and
    /// removes its directories. Returns how many processes were killed.
    pub fn destroy(&self, timeout: Duration) -> io::Result<usize> {
        let mut killed = 0;
        let deadline = Instant::now() + timeout;
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for pid in &pids {
                // SAFETY: plain syscall; the pid is a member of a cgroup we own.
                if unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) } == 0 {
                    killed += 1;
                }
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("processes {pids:?} survived SIGKILL in their cgroup"),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for d in &self.dirs {
            // A process just reaped may linger as a zombie member for a moment.
            loop {
                match std::fs::remove_dir(&d.path) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e)
                        if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) =>
                    {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => {
                        return Err(io::Error::new(
                            e.kind(),
                            format!("removing cgroup {}: {e}", d.path.display()),
                        ))
                    }
                }
            }
        }
        Ok(killed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTINFO: &str = "\
30 25 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
32 30 0:28 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
33 30 0:29 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
34 30 0:30 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
35 30 0:31 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
36 30 0:32 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const HYBRID_CGROUP: &str = "\
8:pids:/
7:blkio:/
4:memory:/process_api/abc
1:cpu:/
0::/
";

    #[test]
    fn hybrid_host_uses_v1_for_what_v2_lacks() {
        let l = Layout::parse(HYBRID_MOUNTINFO, HYBRID_CGROUP, |_| {
            Some("hugetlb\n".into())
        })
        .unwrap();
        assert!(!l.is_v2());
        let mem = &l.controllers[&Controller::Memory];
        assert_eq!(
            mem.own,
            PathBuf::from("/sys/fs/cgroup/memory/process_api/abc")
        );
        assert!(!mem.v2);
        assert_eq!(
            l.controllers[&Controller::Io].mount,
            PathBuf::from("/sys/fs/cgroup/blkio")
        );
        assert_eq!(
            l.controllers[&Controller::Cpu].own,
            PathBuf::from("/sys/fs/cgroup/cpu")
        );
    }

    #[test]
    fn pure_v2_host_and_combined_v1_mounts() {
        let mi = "40 25 0:35 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let l = Layout::parse(mi, "0::/system.slice/cpushare.service\n", |m| {
            assert_eq!(m, "/sys/fs/cgroup");
            Some("cpuset cpu io memory hugetlb pids rdma misc\n".into())
        })
        .unwrap();
        assert!(l.is_v2());
        assert_eq!(
            l.controllers[&Controller::Pids].own,
            PathBuf::from("/sys/fs/cgroup/system.slice/cpushare.service")
        );

        // A container's view: the mount root is the container's own cgroup.
        let mi =
            "31 30 0:27 /docker/x /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                  33 30 0:29 /docker/x /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                  35 30 0:31 /docker/x /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n";
        let cg = "5:cpu,cpuacct:/docker/x\n4:memory:/docker/x\n3:pids:/docker/x/sub\n";
        let l = Layout::parse(mi, cg, |_| None).unwrap();
        assert_eq!(
            l.controllers[&Controller::Cpu].own,
            PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")
        );
        assert_eq!(
            l.controllers[&Controller::Pids].own,
            PathBuf::from("/sys/fs/cgroup/pids/sub")
        );
        assert!(!l.controllers.contains_key(&Controller::Io));
    }

    #[test]
    fn mirror_follows_systemd_layouts() {
        let plan = mirror_plan(HYBRID_CGROUP);
        let dirs: Vec<&str> = plan.iter().map(|(d, _, _)| d.as_str()).collect();
        assert_eq!(dirs, ["", "pids", "blkio", "memory", "cpu", "unified"]);
        assert_eq!(plan[0].1, "tmpfs");
        assert_eq!(plan[2], ("blkio".into(), "cgroup", "blkio".into()));
        let v2 = mirror_plan("0::/system.slice/x.service\n");
        assert_eq!(v2, vec![(String::new(), "cgroup2", String::new())]);
        let combined = mirror_plan("5:cpu,cpuacct:/\n3:freezer:/\n1:name=systemd:/\n");
        assert_eq!(combined.len(), 2);
        assert_eq!(combined[1].2, "cpu,cpuacct");
        assert!(!has_cgroup_mount("22 1 0:5 / /sys rw - sysfs sysfs rw\n"));
        assert!(has_cgroup_mount(HYBRID_MOUNTINFO));
    }

    #[test]
    fn missing_controller_is_named() {
        let mi = "36 30 0:32 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let e = Layout::parse(mi, "0::/\n", |_| Some("cpu memory\n".into())).unwrap_err();
        assert!(e.to_string().contains("pids controller"), "{e}");
    }

    #[test]
    fn limits_are_written_in_each_dialect_and_read_back() {
        let t = tempfile::tempdir().unwrap();
        let v1 = t.path().join("v1");
        let v2 = t.path().join("v2");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::create_dir_all(&v2).unwrap();
        for f in [
            "cpu.cfs_quota_us",
            "cpu.cfs_period_us",
            "memory.limit_in_bytes",
            "pids.max",
        ] {
            std::fs::write(v1.join(f), "").unwrap();
        }
        for f in ["cpu.max", "memory.max", "memory.swap.max"] {
            std::fs::write(v2.join(f), "").unwrap();
        }
        let l = Limits {
            cpu_percent: Some(150),
            memory_bytes: Some(300 << 20),
            pids: Some(99),
        };
        for (dir, v2flag) in [(&v1, false), (&v2, true)] {
            let g = Group {
                dirs: vec![GroupDir {
                    path: dir.clone(),
                    v2: v2flag,
                }],
            };
            g.set_limits(&l).unwrap();
            let back = g.limits();
            assert_eq!(back.cpu_percent, Some(150));
            assert_eq!(back.memory_bytes, Some(300 << 20));
        }
        assert_eq!(
            std::fs::read_to_string(v2.join("cpu.max")).unwrap(),
            "150000 100000"
        );
        assert_eq!(
            std::fs::read_to_string(v2.join("memory.swap.max")).unwrap(),
            "0"
        );
        assert_eq!(
            std::fs::read_to_string(v1.join("cpu.cfs_quota_us")).unwrap(),
            "150000"
        );
        assert_eq!(std::fs::read_to_string(v1.join("pids.max")).unwrap(), "99");
    }
}
