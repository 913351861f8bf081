//! seccomp filters for the VMM's guest-facing threads (vCPUs and the net RX thread).
//!
//! A guest drives these threads directly (every port, MMIO and virtio access runs
//! there), so they may only make the system calls their loops need: KVM_RUN and two
//! state reads, reads and writes on fds already open (disk, tap, eventfds), memory
//! management for the allocator, futexes, and thread exit. No open, no socket, no exec:
//! a thread that tries anything else kills the process.

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
            let ioctls = [KVM_RUN, KVM_GET_REGS, KVM_GET_MP_STATE]
                .iter()
                .map(|&req| {
                    SeccompRule::new(vec![SeccompCondition::new(
                        1,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::Eq,
                        req,
                    )?])
                })
                .collect::<Result<Vec<_>, _>>()?;
            rules.insert(libc::SYS_ioctl, ioctls);
        }
        ThreadKind::NetRx => {
            rules.insert(libc::SYS_poll, vec![]);
            rules.insert(libc::SYS_ppoll, vec![]);
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

/// Install the filter on the calling thread.
pub fn apply(kind: ThreadKind) -> Result<(), String> {
    let log_only = std::env::var("CPUSHARE_MICROVM_SECCOMP").as_deref() == Ok("log");
    let prog = filter(kind, log_only).map_err(|e| format!("building the seccomp filter: {e}"))?;
    seccompiler::apply_filter(&prog).map_err(|e| format!("installing the seccomp filter: {e}"))
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
