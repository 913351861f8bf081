//! What the VMM's process does to itself between fork and exec: join its cgroup,
//! enter the lease's network namespace, build and pivot into its root, drop to its
//! uid/gid, lose every capability, set no_new_privs, and die with its parent.
//!
//! Runs in the forked child of a multi-threaded parent, so it only makes raw system
//! calls on data prepared before the fork: no allocation, no locks, no formatting. A
//! failing step writes its name to the diagnostics pipe, which the parent reads.

use std::ffi::CStr;
use std::io;
use std::os::fd::RawFd;

use super::rootfs::{Entry, Plan};

/// Everything the child needs, prepared by the parent.
#[derive(Debug)]
pub struct ChildPlan {
    /// `cgroup.procs` files, open for writing.
    pub cgroup_fds: Vec<RawFd>,
    /// The lease's network namespace.
    pub netns_fd: Option<RawFd>,
    /// The jail root's mount point (an empty directory) and what goes in it.
    pub root: std::ffi::CString,
    /// The tmpfs's mount options (its size holds the copied files).
    pub tmpfs_opts: std::ffi::CString,
    pub plan: Plan,
    pub uid: u32,
    pub gid: u32,
    /// The highest capability number this kernel knows.
    pub last_cap: u32,
    /// The parent's pid: if it is gone by the time PDEATHSIG is armed, exit.
    pub parent: libc::pid_t,
    /// Fds the VMM inherits (close-on-exec cleared last).
    pub inherit: Vec<RawFd>,
    /// Write end of the diagnostics pipe.
    pub diag_fd: RawFd,
}

fn fail(plan: &ChildPlan, step: &'static str) -> io::Error {
    let err = io::Error::last_os_error();
    // SAFETY: write(2) on a pipe fd we own with a static buffer.
    unsafe { libc::write(plan.diag_fd, step.as_ptr().cast(), step.len()) };
    err
}

fn check(plan: &ChildPlan, rc: libc::c_int, step: &'static str) -> io::Result<()> {
    if rc < 0 {
        Err(fail(plan, step))
    } else {
        Ok(())
    }
}

fn mount(
    src: Option<&CStr>,
    dst: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> libc::c_int {
    let p = |c: Option<&CStr>| c.map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    unsafe { libc::mount(p(src), dst.as_ptr(), p(fstype), flags, p(data).cast()) }
}

/// Bind `src` at `dst` read-only (a bind mount takes its flags only on a remount).
fn bind_ro(plan: &ChildPlan, src: &CStr, dst: &CStr, rec: libc::c_ulong) -> io::Result<()> {
    check(
        plan,
        mount(Some(src), dst, None, libc::MS_BIND | rec, None),
        "bind mount",
    )?;
    let ro = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | rec;
    check(plan, mount(None, dst, None, ro, None), "read-only remount")
}

/// The jail setup; call only in the forked child.
pub fn enter(c: &ChildPlan) -> io::Result<()> {
    // 1. The guest's cgroup, before anything else allocates memory or threads.
    for &fd in &c.cgroup_fds {
        // SAFETY: write(2) of a static one-byte buffer ("0" = this process).
        if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } != 1 {
            return Err(fail(c, "joining the guest cgroup"));
        }
    }
    // 2. The lease's network namespace.
    if let Some(fd) = c.netns_fd {
        // SAFETY: plain syscall on an fd the parent opened.
        let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
        check(c, rc, "entering the lease network namespace")?;
    }
    // 3. A mount namespace of its own, changes never propagating back to the host.
    // SAFETY: plain syscall.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNS) };
    check(c, rc, "unshare(CLONE_NEWNS)")?;
    check(
        c,
        mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None),
        "making mounts private",
    )?;
    // 4. The root: a tiny tmpfs, then what the plan binds or creates in it.
    check(
        c,
        mount(
            Some(c"cs-jail"),
            &c.root,
            Some(c"tmpfs"),
            libc::MS_NOSUID,
            Some(&c.tmpfs_opts),
        ),
        "mounting the jail's tmpfs",
    )?;
    // SAFETY: umask(2) cannot fail; device nodes get exactly the modes we ask.
    unsafe { libc::umask(0o022) };
    for e in &c.plan.entries {
        match e {
            Entry::Dir(d) => {
                // SAFETY: plain syscall on a prepared C string.
                if unsafe { libc::mkdir(d.as_ptr(), 0o755) } < 0
                    && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
                {
                    return Err(fail(c, "mkdir in the jail"));
                }
            }
            Entry::BindFile { src, dst } => {
                // SAFETY: plain syscalls on prepared C strings.
                let fd = unsafe {
                    libc::open(
                        dst.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o644,
                    )
                };
                check(c, fd, "creating a bind target in the jail")?;
                // SAFETY: closing the fd just opened.
                unsafe { libc::close(fd) };
                bind_ro(c, src, dst, 0)?;
            }
            Entry::BindDir { src, dst } => bind_ro(c, src, dst, libc::MS_REC)?,
            Entry::CopyFile { src_fd, len, dst } => {
                // SAFETY: plain syscalls on a prepared C string and fds we own;
                // sendfile reads at its own offset, leaving the shared one alone.
                unsafe {
                    let out = libc::open(
                        dst.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o444,
                    );
                    check(c, out, "creating a file in the jail")?;
                    let mut off: libc::off_t = 0;
                    while (off as u64) < *len {
                        let n =
                            libc::sendfile(out, *src_fd, &mut off, (*len - off as u64) as usize);
                        if n <= 0 {
                            return Err(fail(c, "copying a boot file into the jail"));
                        }
                    }
                    libc::close(out);
                }
            }
            Entry::Dev {
                dst,
                rdev,
                mode,
                owner,
            } => {
                // SAFETY: plain syscall on a prepared C string.
                let rc = unsafe { libc::mknod(dst.as_ptr(), libc::S_IFCHR | mode, *rdev) };
                check(c, rc, "mknod in the jail")?;
                if let Some((uid, gid)) = owner {
                    // SAFETY: plain syscall on a prepared C string.
                    let rc = unsafe { libc::chown(dst.as_ptr(), *uid, *gid) };
                    check(c, rc, "chown of a jail device")?;
                }
            }
        }
    }
    // 5. pivot_root into it and drop the old root entirely.
    // SAFETY: plain syscalls; pivot_root(".", ".") stacks the old root under the new
    // one, and the detach unmounts it.
    unsafe {
        check(c, libc::chdir(c.root.as_ptr()), "chdir to the jail root")?;
        check(
            c,
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
            "pivot_root",
        )?;
        check(
            c,
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
            "detaching the old root",
        )?;
        check(c, libc::chdir(c"/".as_ptr()), "chdir /")?;
    }
    let ro = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID;
    check(
        c,
        mount(None, c"/", None, ro, None),
        "remounting the jail root read-only",
    )?;
    // 6. Capabilities: the bounding set first (needs CAP_SETPCAP), then the ids.
    for cap in 0..=c.last_cap {
        // SAFETY: plain prctl.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        check(c, rc, "dropping the capability bounding set")?;
    }
    // SAFETY: plain prctl.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    let gid = c.gid;
    // SAFETY: plain syscalls; setgroups reads one gid from a stack value.
    unsafe {
        check(c, libc::setgroups(1, &gid), "setgroups")?;
        check(c, libc::setresgid(c.gid, c.gid, c.gid), "setresgid")?;
        check(c, libc::setresuid(c.uid, c.uid, c.uid), "setresuid")?;
    }
    // setresuid away from root cleared the permitted, effective and ambient sets;
    // clear the inheritable set too.
    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let hdr = CapHeader {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset with a v3 header and the two data words it reads.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &hdr as *const CapHeader, data.as_ptr()) };
    check(c, rc as libc::c_int, "capset")?;
    // SAFETY: plain prctls.
    unsafe {
        check(
            c,
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            "no_new_privs",
        )?;
        // Credentials changed above, which clears the parent-death signal: arm it now.
        check(
            c,
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ),
            "PR_SET_PDEATHSIG",
        )?;
        if libc::getppid() != c.parent {
            libc::_exit(1); // the daemon died before the signal was armed
        }
    }
    for &fd in &c.inherit {
        // SAFETY: plain fcntl on fds the parent keeps open across the fork.
        let rc = unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        check(c, rc, "passing fds to the VMM")?;
    }
    Ok(())
}
