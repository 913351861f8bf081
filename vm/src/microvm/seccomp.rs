//! seccomp filters for the VMM's threads.
//!
//! A guest drives the vCPU and net RX threads directly (every port, MMIO and virtio
//! access runs there), so they may only make the system calls their loops need. What
//! each thread kind may call (anything else kills the whole process):
//!
//! - every thread ([`common_syscalls`]): read/write/readv/writev/pread64/pwrite64 on
//!   fds already open (disk, tap, eventfds, the serial and control sockets),
//!   fsync/fdatasync, futex, sched_yield, the clocks and sleeps, gettid/getpid, the
//!   allocator's brk/mmap/munmap/mremap/mprotect/madvise, rt_sigreturn (the kick
//!   handler), rt_sigprocmask/sigaltstack/rseq, close, exit/exit_group, and
//!   fcntl(F_GETFD) only.
//! - [`ThreadKind::Vcpu`]: plus ioctl KVM_RUN, KVM_GET_REGS and KVM_GET_MP_STATE only.
//! - [`ThreadKind::NetRx`]: plus poll/ppoll (tap and exit eventfd).
//! - [`ThreadKind::Process`], the jailed VMM process's filter ([`super::jailed`]),
//!   installed on its main thread after the machine is built and before any thread is
//!   spawned, so every thread inherits it (vCPU and RX threads stack theirs on top):
//!   the union of the above plus what the main, supervisor and console threads need:
//!   poll/ppoll (the control socket), clone only with CLONE_THREAD (threads, never a
//!   process; clone3 answers ENOSYS so that glibc falls back to clone, see
//!   [`apply_process`]), set_robust_list, prctl(PR_SET_NAME), tgkill (the supervisor
//!   kicks vCPUs out of KVM_RUN), sched_getaffinity and rt_sigaction (std's thread
//!   start and runtime), and seccomp plus prctl(PR_SET_NO_NEW_PRIVS) so
//!   that vCPU and RX threads can add their narrower filters (a filter can only take
//!   away). No open, no socket, no exec, no ioctl beyond the three above.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

const fn ior(nr: u64, size: u64) -> u64 {
    (2 << 30) | (size << 16) | (0xae << 8) | nr
}
pub const KVM_RUN: u64 = 0xae80;
pub const KVM_GET_REGS: u64 = ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>() as u64);
pub const KVM_GET_MP_STATE: u64 = ior(0x98, 4);

/// Which thread a filter is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    Vcpu,
    NetRx,
    /// Every thread of the jailed VMM process (the base its threads inherit).
    Process,
}

fn common_syscalls() -> Vec<i64> {
    vec![
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_fdatasync,
        libc::SYS_fsync,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_gettid,
        libc::SYS_getpid,
        // The allocator (glibc arenas grow with mprotect).
        libc::SYS_brk,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        // Signal return from the kick handler; thread teardown.
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_rseq,
        libc::SYS_close,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]
}

fn arg_eq(arg: u8, value: u64) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
}

fn kvm_ioctl_rules() -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    [KVM_RUN, KVM_GET_REGS, KVM_GET_MP_STATE]
        .iter()
        .map(|&req| SeccompRule::new(vec![arg_eq(1, req)?]))
        .collect()
}

/// Build the filter for `kind`. `log_only` makes violations get logged by the kernel
/// instead of killing (for diagnosing a missing syscall, never the default).
pub fn filter(kind: ThreadKind, log_only: bool) -> Result<BpfProgram, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        common_syscalls().into_iter().map(|s| (s, vec![])).collect();
    // fcntl(F_GETFD) only: debug builds of std check an fd is open before closing it.
    rules.insert(
        libc::SYS_fcntl,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::F_GETFD as u64,
        )?])?],
    );
    match kind {
        ThreadKind::Vcpu => {
            rules.insert(libc::SYS_ioctl, kvm_ioctl_rules()?);
        }
        ThreadKind::NetRx => {
            rules.insert(libc::SYS_poll, vec![]);
            rules.insert(libc::SYS_ppoll, vec![]);
        }
        ThreadKind::Process => {
            rules.insert(libc::SYS_ioctl, kvm_ioctl_rules()?);
            rules.insert(libc::SYS_poll, vec![]);
            rules.insert(libc::SYS_ppoll, vec![]);
            // Threads only: clone without CLONE_THREAD would be a new process.
            rules.insert(
                libc::SYS_clone,
                vec![SeccompRule::new(vec![SeccompCondition::new(
                    0,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
                    libc::CLONE_THREAD as u64,
                )?])?],
            );
            // Its flags sit in memory, out of a filter's reach: the second filter of
            // `apply_process` makes it fail with ENOSYS before this one allows it.
            rules.insert(libc::SYS_clone3, vec![]);
            rules.insert(libc::SYS_set_robust_list, vec![]);
            rules.insert(
                libc::SYS_prctl,
                vec![
                    SeccompRule::new(vec![arg_eq(0, libc::PR_SET_NAME as u64)?])?,
                    SeccompRule::new(vec![arg_eq(0, libc::PR_SET_NO_NEW_PRIVS as u64)?])?,
                ],
            );
            rules.insert(libc::SYS_seccomp, vec![]);
            rules.insert(libc::SYS_tgkill, vec![]);
            // std's thread start reads the new thread's stack bounds
            // (pthread_getattr_np, which asks for the thread's CPU affinity); the
            // runtime sets a signal disposition on the main thread (seen as the VMM
            // ends). Neither gains anything.
            rules.insert(libc::SYS_sched_getaffinity, vec![]);
            rules.insert(libc::SYS_rt_sigaction, vec![]);
        }
    }
    let mismatch = if log_only {
        SeccompAction::Log
    } else {
        SeccompAction::KillProcess
    };
    let f = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)?;
    BpfProgram::try_from(f)
}

fn log_only() -> bool {
    std::env::var("CPUSHARE_MICROVM_SECCOMP").as_deref() == Ok("log")
}

/// Install the filter on the calling thread.
pub fn apply(kind: ThreadKind) -> Result<(), String> {
    let prog = filter(kind, log_only()).map_err(|e| format!("building the seccomp filter: {e}"))?;
    seccompiler::apply_filter(&prog).map_err(|e| format!("installing the seccomp filter: {e}"))
}

/// clone3 fails with ENOSYS, everything else passes (to the next filter): glibc then
/// creates threads with clone, whose flags the process filter can check.
pub fn clone3_enosys() -> Result<BpfProgram, seccompiler::BackendError> {
    let rules = BTreeMap::from([(libc::SYS_clone3, vec![])]);
    let f = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )?;
    BpfProgram::try_from(f)
}

/// The jailed VMM process's filters, on the calling thread, which must be the only
/// one (the main thread before it spawns any): every thread created later inherits
/// them. TSYNC as well, so a thread that does exist (none should) gets them too or
/// the call fails.
pub fn apply_process() -> Result<(), String> {
    let base = filter(ThreadKind::Process, log_only())
        .map_err(|e| format!("building the seccomp filter: {e}"))?;
    let clone3 = clone3_enosys().map_err(|e| format!("building the clone3 filter: {e}"))?;
    seccompiler::apply_filter_all_threads(&base)
        .map_err(|e| format!("installing the seccomp filter: {e}"))?;
    seccompiler::apply_filter_all_threads(&clone3)
        .map_err(|e| format!("installing the clone3 filter: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_abi() {
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_MP_STATE, 0x8004_ae98);
    }

    #[test]
    fn filtered_thread_is_killed_on_a_forbidden_syscall() {
        use nix::sys::signal::Signal;
        use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
        use nix::sys::wait::{waitpid, WaitStatus};
        use nix::unistd::{fork, ForkResult};
        // Run the check in a child process: the filter kills the whole process. The
        // filter is built before the fork, so the child allocates nothing.
        let prog = filter(ThreadKind::Vcpu, false).unwrap();
        let out = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .unwrap();
        // SAFETY: the child (of a possibly multi-threaded test binary) only makes
        // syscalls (prctl/seccomp, write, socket) and abort: nothing that could wait on
        // a lock another thread held at the fork.
        match unsafe { fork() }.unwrap() {
            ForkResult::Child => {
                // abort (SIGABRT, not SIGSYS) for every way the check can fail.
                if seccompiler::apply_filter(&prog).is_err() {
                    std::process::abort();
                }
                // Allowed: write (0 bytes).
                let _ = nix::unistd::write(&out, &[]);
                // Forbidden: socket(2).
                let _ = socket(
                    AddressFamily::Inet,
                    SockType::Datagram,
                    SockFlag::empty(),
                    None,
                );
                std::process::abort();
            }
            ForkResult::Parent { child } => {
                let status = waitpid(child, None).unwrap();
                assert!(
                    matches!(status, WaitStatus::Signaled(_, Signal::SIGSYS, _)),
                    "child status {status:?}"
                );
            }
        }
    }
}
