//! The one error type of the `vm` crate. Every message says what to do about it.

use std::path::PathBuf;

/// Everything that can go wrong starting, running or stopping a guest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` does not exist.
    #[error(
        "{path} not found: enable VT-x/AMD-V in the firmware and load kvm_intel or kvm_amd \
         (modprobe kvm_intel), or run guests with the qemu backend and --accel tcg (slower)"
    )]
    KvmMissing { path: PathBuf },

    /// `/dev/kvm` exists but this user may not open it.
    #[error(
        "permission denied opening {path}: add this user to the 'kvm' group \
         (usermod -aG kvm $USER, then log in again) or run as root"
    )]
    KvmPermission { path: PathBuf },

    /// KVM opens, but cannot run this guest (broken nested virtualisation, missing
    /// capability, emulation failure).
    #[error("KVM is present but cannot run this guest: {reason}; use the qemu backend with --accel tcg (slower)")]
    KvmUnusable { reason: String },

    /// The qemu binary is not installed or not on PATH.
    #[error(
        "{binary} not found: install it (Debian: apt-get install qemu-system-x86) or pass its path"
    )]
    QemuMissing { binary: String },

    /// The kernel image is not something the chosen backend can boot.
    #[error("kernel {path} is not bootable: {reason}")]
    KernelNotBootable { path: PathBuf, reason: String },

    /// The disk image is larger than the lease's disk cap.
    #[error("image is {size} bytes, larger than the disk cap of {cap} bytes: shrink the image or raise the cap")]
    ImageTooLarge { size: u64, cap: u64 },

    /// Firmware could not boot this disk (see [`crate::disk_check`]).
    #[error("the disk cannot boot: {reason}; check the image (or boot it with --kernel)")]
    DiskNotBootable { reason: String },

    /// The guest spec is inconsistent (e.g. firmware boot without a disk).
    #[error("invalid guest spec: {0}")]
    InvalidSpec(String),

    /// The backend cannot do what the spec asks (e.g. microvm and an ISO).
    #[error("the {backend} backend cannot {what}; use {hint}")]
    Unsupported {
        backend: &'static str,
        what: String,
        hint: &'static str,
    },

    /// No backend on this host can run the spec; one reason per backend tried.
    #[error("no backend can run this guest here: {}", reasons.join("; "))]
    NoBackend { reasons: Vec<String> },

    /// The VMM process or thread failed (qemu exited at start, vCPU thread died).
    #[error("{backend} failed: {message}")]
    VmmFailed {
        backend: &'static str,
        message: String,
    },

    /// The guest asks for more memory than this host (or the microvm) provides.
    #[error("guest memory of {requested_mib} MiB is too large: at most {limit_mib} MiB here; lower the lease's memory")]
    MemoryTooLarge { requested_mib: u64, limit_mib: u64 },

    /// Guest memory could not be allocated (mmap failed, overcommit refused).
    #[error("cannot allocate {requested_mib} MiB of guest memory: {reason}; lower the lease's memory or free host memory")]
    MemoryUnavailable { requested_mib: u64, reason: String },

    /// Setting up a VMM's jail failed (cgroups, namespaces, ids, capabilities).
    #[error(
        "jailing the VMM: {step}: {source}; the seller needs root or CAP_SYS_ADMIN, \
         CAP_SETUID, CAP_SETGID, CAP_SETPCAP, CAP_MKNOD, CAP_CHOWN and a writable (delegated) \
         cgroup, or set [seller] jail = \"off\""
    )]
    Jail {
        step: String,
        #[source]
        source: std::io::Error,
    },

    /// An I/O error, with what we were doing.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Wrap an I/O error with what we were doing when it happened.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result alias of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
