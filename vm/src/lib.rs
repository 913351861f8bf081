//! Running guests.
//!
//! A [`GuestSpec`] (vCPUs, memory, how to boot, an open unlinked disk file, the guest's
//! tap, a serial log, a wall-clock limit) goes to a [`Backend`], which starts the guest
//! and hands back a [`Guest`] handle: state, serial console stream, wait, stop.
//! [`auto::auto`] picks the best backend the host can run the guest with and says why.
//!
//! Backends: `microvm` (our own VMM on KVM, direct kernel boot) and `qemu`
//! (qemu-system-x86_64 with KVM or TCG; also firmware boot of disks and ISOs).

pub mod auto;
pub mod backend;
pub mod disk_check;
pub mod error;
pub mod jail;
pub mod kvm_probe;
pub mod microvm;
pub mod qemu;
mod stderr_tail;

pub use auto::{auto, Choice};
pub use backend::{
    mac_string, Backend, BackendKind, Boot, DiskBus, DiskSpec, Guest, GuestExit, GuestSpec,
    GuestState, NetSpec, Probe, SerialFanout, Tap,
};
pub use error::{Error, Result};
