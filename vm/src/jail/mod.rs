//! Jailed VMMs, after Firecracker's jailer: the VMM is a child process that runs as a
//! per-guest unprivileged uid/gid, with no capabilities (bounding set included) and
//! `no_new_privs`, in its own mount namespace pivoted into a minimal read-only root,
//! in the lease's network namespace, under its own seccomp filter (qemu's
//! `-sandbox on`), and in its own cgroup holding the lease's cpu, memory and pids
//! limits, below a parent cgroup that caps all guests together (`max_cpu_percent`).
//!
//! - [`cgroup`]: v2 or v1, detected at runtime, behind one interface.
//! - [`uid`]: the reserved id range.
//! - [`rootfs`]: what the jail's root holds.
//! - [`child`]: the steps between fork and exec.
//!
//! Disk bandwidth: qemu's own block throttling (`-drive throttling.*`), which holds
//! for buffered writes on v1 and v2 alike (v1's blkio throttle only sees direct I/O).

pub mod cgroup;
pub mod child;
pub mod rootfs;
pub mod uid;

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use cgroup::{Group, Layout, Limits};
pub use uid::{UidLease, UidPool};

use crate::error::{Error, Result};

/// The seller-wide jail settings.
#[derive(Debug, Clone)]
pub struct JailSettings {
    /// First uid/gid of the range reserved for guests, and how many.
    pub uid_base: u32,
    pub uid_count: u32,
    /// Name of the parent cgroup of all guests (under the daemon's own cgroup).
    pub cgroup_name: String,
    /// An empty directory the jail's tmpfs is mounted on (in the VMM's own mount
    /// namespace only, so one directory serves every guest).
    pub root_dir: PathBuf,
    /// All guests together get at most this share of the machine's CPU time.
    pub max_cpu_percent: Option<u32>,
}

impl JailSettings {
    /// Defaults: uids 400000..401000, parent cgroup `cpushare`, no CPU cap.
    pub fn new(root_dir: PathBuf) -> JailSettings {
        JailSettings {
            uid_base: 400_000,
            uid_count: 1000,
            cgroup_name: "cpushare".into(),
            root_dir,
            max_cpu_percent: None,
        }
    }
}

/// What one guest may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestLimits {
    pub vcpus: u32,
    /// The cgroup's memory cap: guest memory plus the VMM's own overhead.
    pub memory_bytes: u64,
    pub pids: u32,
    /// Disk throughput (bytes/s) and operations per second, enforced by the VMM.
    pub disk_bps: Option<u64>,
    pub disk_iops: Option<u64>,
}

/// The VMM's own memory on top of the guest's: code, libraries, device state, and
/// under TCG the translation cache (64 MiB by default).
pub const VMM_OVERHEAD_MIB: u64 = 256;

impl GuestLimits {
    /// Limits for a guest of `vcpus` and `memory_mib`: one core per vCPU, guest memory
    /// plus [`VMM_OVERHEAD_MIB`], and room for qemu's threads (vCPUs, I/O workers).
    pub fn for_guest(vcpus: u32, memory_mib: u64) -> GuestLimits {
        GuestLimits {
            vcpus,
            memory_bytes: (memory_mib + VMM_OVERHEAD_MIB) << 20,
            pids: 128 + 2 * vcpus,
            disk_bps: None,
            disk_iops: None,
        }
    }
}

fn jail_err(step: impl Into<String>, e: std::io::Error) -> Error {
    Error::Jail {
        step: step.into(),
        source: e,
    }
}

/// Makes jails: one per seller daemon.
#[derive(Debug, Clone)]
pub struct Jailer {
    inner: Arc<JailerInner>,
}

#[derive(Debug)]
struct JailerInner {
    layout: Layout,
    parent: Group,
    uids: Arc<UidPool>,
    root_dir: PathBuf,
    /// The parent's CPU cap, in percent of one core: no guest's may exceed it
    /// (cgroup v1 refuses a child quota above its parent's).
    cpu_cap_percent: u32,
}

impl Jailer {
    /// Detects the cgroup layout, creates the guests' parent cgroup with the CPU cap,
    /// and the jail root's mount point.
    pub fn new(s: &JailSettings) -> Result<Jailer> {
        let layout = Layout::detect().map_err(|e| jail_err("reading the cgroup layout", e))?;
        let parent = layout
            .guests_parent(&s.cgroup_name)
            .map_err(|e| jail_err("creating the guests' parent cgroup", e))?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        let cpu_cap_percent = cpus * s.max_cpu_percent.unwrap_or(100).clamp(1, 100);
        let cap = Limits {
            // No cap: as much as every core.
            cpu_percent: Some(cpu_cap_percent),
            ..Limits::default()
        };
        parent
            .set_limits(&cap)
            .map_err(|e| jail_err("setting max_cpu_percent on the guests' cgroup", e))?;
        std::fs::create_dir_all(&s.root_dir)
            .map_err(|e| jail_err(format!("creating {}", s.root_dir.display()), e))?;
        tracing::info!(cgroups = %layout.describe(), parent = ?parent.dirs, "guest jail ready");
        Ok(Jailer {
            inner: Arc::new(JailerInner {
                layout,
                parent,
                uids: UidPool::new(s.uid_base, s.uid_count),
                root_dir: s.root_dir.clone(),
                cpu_cap_percent,
            }),
        })
    }

    /// The parent cgroup of all guests.
    pub fn parent(&self) -> &Group {
        &self.inner.parent
    }

    /// Whether the guests' cgroups are cgroup v2.
    pub fn is_v2(&self) -> bool {
        self.inner.layout.is_v2()
    }

    /// Whether `uid` is one this jailer hands to guests.
    pub fn owns_uid(&self, uid: u32) -> bool {
        self.inner.uids.contains(uid)
    }

    /// A jail for guest `name` (a cgroup-safe name, e.g. `lease-1a2b3c4d`): its uid,
    /// its cgroup with `limits` set, and the network namespace at `netns` (a path like
    /// `/run/netns/csl-...`), if any.
    pub fn jail(&self, name: &str, limits: GuestLimits, netns: Option<&Path>) -> Result<Jail> {
        let uid = self.inner.uids.take().ok_or_else(|| {
            jail_err(
                "allocating a guest uid",
                std::io::Error::other("every uid of the reserved range is in use"),
            )
        })?;
        let netns = match netns {
            Some(p) => {
                Some(OwnedFd::from(File::open(p).map_err(|e| {
                    jail_err(format!("opening {}", p.display()), e)
                })?))
            }
            None => None,
        };
        let group = self
            .inner
            .parent
            .child(name)
            .map_err(|e| jail_err("creating the guest's cgroup", e))?;
        let jail = Jail {
            uid,
            group,
            netns,
            limits: limits.clone(),
            root_dir: self.inner.root_dir.clone(),
            outcome: Arc::default(),
        };
        jail.group
            .set_limits(&Limits {
                cpu_percent: Some((100 * limits.vcpus.max(1)).min(self.inner.cpu_cap_percent)),
                memory_bytes: Some(limits.memory_bytes),
                pids: Some(limits.pids),
            })
            .map_err(|e| jail_err("setting the guest's cgroup limits", e))?;
        Ok(jail)
    }
}

/// One guest's jail. Dropping it kills whatever is left in its cgroup, removes the
/// cgroup and frees its uid.
#[derive(Debug)]
pub struct Jail {
    uid: UidLease,
    group: Group,
    netns: Option<OwnedFd>,
    limits: GuestLimits,
    root_dir: PathBuf,
    outcome: Arc<Outcome>,
}

/// What the jail saw of its guest, read when it is torn down (the cgroup and its
/// counters are gone after that).
#[derive(Debug, Default)]
pub struct Outcome {
    /// Processes the kernel's OOM killer killed in the guest's cgroup.
    pub oom_kills: std::sync::atomic::AtomicU64,
    /// Set once the jail has been torn down.
    pub torn_down: std::sync::atomic::AtomicBool,
}

impl Jail {
    /// The jail's outcome, filled in when it is torn down.
    pub fn outcome(&self) -> Arc<Outcome> {
        self.outcome.clone()
    }

    pub fn uid(&self) -> u32 {
        self.uid.uid()
    }
    pub fn gid(&self) -> u32 {
        self.uid.gid()
    }
    pub fn group(&self) -> &Group {
        &self.group
    }
    pub fn limits(&self) -> &GuestLimits {
        &self.limits
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        let ooms = self.group.oom_kills();
        if ooms > 0 {
            tracing::warn!(ooms, "the guest's VMM was OOM-killed in its cgroup");
        }
        self.outcome.oom_kills.store(ooms, Ordering::SeqCst);
        if let Err(e) = self.group.destroy(Duration::from_secs(5)) {
            tracing::warn!(error = %e, "removing a guest cgroup");
        }
        self.outcome.torn_down.store(true, Ordering::SeqCst);
    }
}

/// A file the VMM opens by path (kernel, initrd, ISO), made visible in the jail.
#[derive(Debug)]
pub struct JailFile {
    /// Where the VMM finds it.
    pub inside: PathBuf,
    file: File,
    len: u64,
}

/// A jail ready for one spawn: the child's plan plus the fds it refers to, which
/// must stay open until the VMM has been spawned.
#[derive(Debug)]
pub struct Prepared {
    pub child: child::ChildPlan,
    _cgroup_files: Vec<File>,
    _files: Vec<JailFile>,
    /// Read end of the diagnostics pipe.
    diag_read: OwnedFd,
    _diag_write: OwnedFd,
}

impl Prepared {
    /// What the child reported before it failed (a step name), if anything.
    pub fn failure(&self) -> Option<String> {
        let mut buf = [0u8; 256];
        // SAFETY: read(2) into a stack buffer of the given size; the pipe is
        // non-blocking, so an empty pipe returns at once.
        let n = unsafe {
            libc::read(
                self.diag_read.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        (n > 0).then(|| String::from_utf8_lossy(&buf[..n as usize]).into_owned())
    }
}

fn cstring(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_else(|_| c"/nonexistent".into())
}

impl Jail {
    /// Host file `path` as the jailed VMM will find it, at `/files/<name>`: a copy in
    /// the jail's tmpfs (kernels and initrds are small; the host file's path and
    /// permissions stay out of the jail).
    pub fn file(&self, path: &Path, name: &str) -> Result<JailFile> {
        let file =
            File::open(path).map_err(|e| jail_err(format!("opening {}", path.display()), e))?;
        let len = file
            .metadata()
            .map_err(|e| jail_err(format!("reading {}", path.display()), e))?
            .len();
        Ok(JailFile {
            inside: Path::new("/files").join(name),
            file,
            len,
        })
    }

    /// The plan for spawning `binary` in this jail: `kvm` adds /dev/kvm, `files` are
    /// bound at their `inside` paths, `inherit` are the fds the VMM keeps.
    pub fn prepare(
        &self,
        binary: &Path,
        kvm: bool,
        files: Vec<JailFile>,
        inherit: Vec<RawFd>,
    ) -> Result<Prepared> {
        let canonical = binary
            .canonicalize()
            .map_err(|e| jail_err(format!("resolving {}", binary.display()), e))?;
        let dirs = rootfs::qemu_data_dirs(&canonical);
        self.prepare_at(binary, &canonical, dirs, kvm, files, inherit)
    }

    /// Like [`Jail::prepare`] for `binary` found at `inside` in the jail (our own
    /// VMM: the host path of the node binary, e.g. under a home directory, stays out
    /// of the jail), with the directories `dirs` bound at their host paths.
    pub fn prepare_at(
        &self,
        binary: &Path,
        inside: &Path,
        dirs: Vec<PathBuf>,
        kvm: bool,
        files: Vec<JailFile>,
        inherit: Vec<RawFd>,
    ) -> Result<Prepared> {
        let root = &self.root_dir;
        let mut plan = rootfs::Plan::default();
        let binary = binary
            .canonicalize()
            .map_err(|e| jail_err(format!("resolving {}", binary.display()), e))?;
        plan.file(root, &binary, inside);
        for lib in
            rootfs::libraries(&binary).map_err(|e| jail_err("listing the VMM's libraries", e))?
        {
            plan.file(root, &lib, &lib);
        }
        if Path::new("/etc/ld.so.cache").exists() {
            plan.file(
                root,
                Path::new("/etc/ld.so.cache"),
                Path::new("/etc/ld.so.cache"),
            );
        }
        for dir in dirs {
            plan.dir(root, &dir);
        }
        for f in &files {
            plan.copy(root, f.file.as_raw_fd(), f.len, &f.inside);
        }
        let dev = |plan: &mut rootfs::Plan, p: &str, owner| {
            plan.device(root, Path::new(p), owner)
                .map_err(|e| jail_err(format!("preparing {p} for the jail"), e))
        };
        dev(&mut plan, "/dev/null", None)?;
        dev(&mut plan, "/dev/urandom", None)?;
        if kvm {
            dev(&mut plan, "/dev/kvm", Some((self.uid(), self.gid())))?;
        }

        let mut cgroup_files = Vec::new();
        for f in self.group.procs_files() {
            cgroup_files.push(
                File::options()
                    .write(true)
                    .open(&f)
                    .map_err(|e| jail_err(format!("opening {}", f.display()), e))?,
            );
        }
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two fds into the array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(jail_err("creating a pipe", std::io::Error::last_os_error()));
        }
        // SAFETY: pipe2 just returned these fds; nothing else owns them.
        let (diag_read, diag_write) = unsafe {
            (
                <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[0]),
                <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[1]),
            )
        };
        let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(40);
        let child = child::ChildPlan {
            cgroup_fds: cgroup_files.iter().map(|f| f.as_raw_fd()).collect(),
            netns_fd: self.netns.as_ref().map(|f| f.as_raw_fd()),
            root: cstring(root),
            tmpfs_opts: CString::new(format!(
                "size={}k,nr_inodes=1024,mode=0755",
                plan.copied_bytes().div_ceil(1024) + 1024
            ))
            .expect("no NUL"),
            plan,
            uid: self.uid(),
            gid: self.gid(),
            last_cap,
            parent: std::process::id() as libc::pid_t,
            inherit,
            diag_fd: diag_write.as_raw_fd(),
        };
        Ok(Prepared {
            child,
            _cgroup_files: cgroup_files,
            _files: files,
            diag_read,
            _diag_write: diag_write,
        })
    }
}
