//! `microvm`: our own VMM on KVM (kvm-ioctls, vm-memory, linux-loader and other
//! rust-vmm crates).
//!
//! One process hosts the guest: a thread per vCPU (under seccomp), an RX thread for the
//! NIC, a console thread feeding the serial log, and a supervisor that enforces the
//! wall-clock limit. [`Microvm::start_guest`] runs them in the calling process;
//! [`Microvm::start_jailed`] ([`jailed`]) runs them in a jailed process of their own,
//! with a seccomp filter on every thread (what the seller's leases use). Direct kernel boot only (bzImage, ELF vmlinux, PVH ELF); devices
//! are COM1, i8042 (reset), the ACPI sleep register (power-off), virtio-blk on the
//! open disk file and virtio-net on the guest tap, both virtio-mmio and described in
//! the ACPI DSDT.
//!
//! What a stock distribution kernel needs to find the devices: ACPI (Debian's cloud
//! kernel has it built in) and, since virtio is modular there, `virtio_mmio.ko` (it binds
//! to the DSDT's `LNRO0005` devices) plus `virtio_blk`/`virtio_net` (with `failover`,
//! `net_failover`) loaded from the initramfs, as scripts/build-test-guest.sh does; no
//! `virtio_mmio.device=` command-line devices are needed. A buyer's own initramfs must
//! carry those modules (Debian's initramfs-tools `MODULES=most` does). Disk images that
//! boot through firmware (BIOS/GRUB) are for the qemu backend.
//!
//! `stop` presses an ACPI power button (a GED device notifying PNP0C0C, as
//! hardware-reduced ACPI has it); Linux reports KEY_POWER and a guest whose userspace
//! acts on it (systemd-logind, acpid) powers off, anything else is stopped after the
//! grace period. Not provided: serial input, PCI, multi-queue or offloads on
//! virtio-net.

pub mod acpi;
pub mod boot;
pub mod cpu;
pub mod jailed;
pub mod layout;
pub mod seccomp;
pub mod virtio;
pub mod vmm;

use std::fs::File;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use crate::backend::{
    Backend, BackendKind, Boot, DiskBus, Guest, GuestExit, GuestSpec, GuestState, Probe, Tap,
};
use crate::error::{Error, Result};

pub use cpu::CPU_TEMPLATE_NAME;

/// Largest guest the microvm builds, whatever the host has.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// xAPIC ids are 8 bits and 0xff is broadcast.
pub const MAX_VCPUS: u32 = 254;

/// The microvm backend.
#[derive(Debug, Default, Clone, Copy)]
pub struct Microvm;

impl Microvm {
    pub fn new() -> Self {
        Microvm
    }
}

fn host_memory_mib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Spec checks specific to this backend (besides [`GuestSpec::validate`]).
fn check_spec(spec: &GuestSpec) -> Result<()> {
    if !matches!(spec.boot, Boot::Direct { .. }) {
        return Err(Error::Unsupported {
            backend: "microvm",
            what: format!("do {}", spec.boot.kind()),
            hint: "the qemu backend",
        });
    }
    if let Some(d) = &spec.disk {
        if d.bus != DiskBus::Virtio {
            return Err(Error::Unsupported {
                backend: "microvm",
                what: "attach an IDE disk".into(),
                hint: "the qemu backend",
            });
        }
    }
    if spec.vcpus > MAX_VCPUS {
        return Err(Error::InvalidSpec(format!(
            "the microvm runs at most {MAX_VCPUS} vCPUs, got {}",
            spec.vcpus
        )));
    }
    let limit = host_memory_mib()
        .unwrap_or(MAX_MEMORY_MIB)
        .min(MAX_MEMORY_MIB);
    if spec.memory_mib > limit {
        return Err(Error::MemoryTooLarge {
            requested_mib: spec.memory_mib,
            limit_mib: limit,
        });
    }
    Ok(())
}

/// Run a few bytes of real-mode code (`out 0x80, al; hlt`) in a throwaway VM: proves
/// that KVM_RUN works here, beyond /dev/kvm opening.
fn probe_kvm_runs() -> Result<()> {
    use kvm_bindings::kvm_userspace_memory_region;
    use kvm_ioctls::VcpuExit;
    let kvm = vmm::open_kvm()?;
    vmm::check_caps(&kvm).map_err(|reason| Error::KvmUnusable { reason })?;
    let unusable = |what: &str, e: kvm_ioctls::Error| Error::KvmUnusable {
        reason: format!("{what}: {e}"),
    };
    // Memory first: locals drop in reverse order, so the vCPU and the VM go before it.
    let mem =
        vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 0x1000)])
            .map_err(|e| Error::KvmUnusable {
                reason: format!("mapping probe memory: {e}"),
            })?;
    let vm = kvm.create_vm().map_err(|e| unusable("creating a VM", e))?;
    use vm_memory::{Bytes, GuestMemoryBackend};
    mem.write_slice(&[0xe6, 0x80, 0xf4], vm_memory::GuestAddress(0x0))
        .map_err(|e| Error::KvmUnusable {
            reason: format!("writing probe code: {e}"),
        })?;
    let region = mem.iter().next().expect("one region");
    // SAFETY: the region is `mem`'s one mapping, which outlives `vm` (declared
    // before it, so dropped after it and after the vCPU).
    unsafe {
        vm.set_user_memory_region(kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: 0x1000,
            userspace_addr: region.as_ptr() as u64,
        })
    }
    .map_err(|e| unusable("registering memory", e))?;
    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| unusable("creating a vCPU", e))?;
    let mut sregs = vcpu.get_sregs().map_err(|e| unusable("reading sregs", e))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| unusable("setting sregs", e))?;
    let regs = kvm_bindings::kvm_regs {
        rip: 0,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| unusable("setting registers", e))?;
    let mut saw_out = false;
    for _ in 0..4 {
        match vcpu
            .run()
            .map_err(|e| unusable("running the probe guest", e))?
        {
            VcpuExit::IoOut(0x80, _) => saw_out = true,
            VcpuExit::Hlt if saw_out => return Ok(()),
            other => {
                return Err(Error::KvmUnusable {
                    reason: format!("probe guest exited with {other:?}"),
                })
            }
        }
    }
    Err(Error::KvmUnusable {
        reason: "probe guest did not halt".into(),
    })
}

impl Backend for Microvm {
    fn kind(&self) -> BackendKind {
        BackendKind::Microvm
    }

    fn probe(&self, spec: &GuestSpec) -> Probe {
        if let Err(e) = check_spec(spec) {
            return Probe {
                usable: false,
                reason: e.to_string(),
            };
        }
        match probe_kvm_runs() {
            Ok(()) => Probe {
                usable: true,
                reason: format!(
                    "KVM runs guests here (probe guest ran); direct kernel boot, CPU template {CPU_TEMPLATE_NAME}"
                ),
            },
            Err(e) => Probe {
                usable: false,
                reason: e.to_string(),
            },
        }
    }

    fn start(&self, spec: GuestSpec) -> Result<Box<dyn Guest>> {
        Ok(Box::new(self.start_guest(spec)?))
    }
}

impl Microvm {
    /// Like [`Backend::start`], returning the concrete handle (for its extra counters).
    pub fn start_guest(&self, mut spec: GuestSpec) -> Result<MicrovmGuest> {
        spec.validate()?;
        check_spec(&spec)?;
        let span = tracing::info_span!("microvm", guest = %spec.name);
        let _e = span.enter();
        let Boot::Direct {
            kernel,
            initrd,
            cmdline,
        } = spec.boot.clone()
        else {
            unreachable!("check_spec admits direct boot only");
        };
        let kernel_file = File::open(&kernel).map_err(|e| Error::KernelNotBootable {
            path: kernel.clone(),
            reason: e.to_string(),
        })?;
        let initrd_file = match &initrd {
            Some(p) => Some(
                File::open(p)
                    .map_err(|e| Error::io(format!("opening initrd {}", p.display()), e))?,
            ),
            None => None,
        };
        let net = match spec.net.take() {
            Some(n) => {
                let fd = match n.tap {
                    Tap::Fd(fd) => fd,
                    Tap::Name(name) => virtio::net::open_tap(&name)
                        .map_err(|e| Error::io(format!("opening tap {name}"), e))?,
                };
                Some((fd, n.mac))
            }
            None => None,
        };
        let cfg = vmm::MachineConfig {
            name: spec.name.clone(),
            vcpus: spec.vcpus as u8,
            mem_bytes: spec.memory_mib << 20,
            kernel: kernel_file,
            initrd: initrd_file,
            cmdline,
            disk: spec.disk.take().map(|d| (d.file, d.read_only)),
            net,
            limit: spec.wall_clock_limit,
            process_filter: false,
        };
        let running = vmm::start(cfg, spec.serial_log.take()).map_err(|e| match e {
            vmm::BuildError::Kernel(reason) => Error::KernelNotBootable {
                path: kernel,
                reason,
            },
            vmm::BuildError::Kvm(reason) => Error::KvmUnusable { reason },
            vmm::BuildError::Memory(reason) => Error::MemoryUnavailable {
                requested_mib: spec.memory_mib,
                reason,
            },
            vmm::BuildError::Other(message) => Error::VmmFailed {
                backend: "microvm",
                message,
            },
        })?;
        tracing::info!(
            vcpus = spec.vcpus,
            memory_mib = spec.memory_mib,
            "microvm guest started"
        );
        Ok(MicrovmGuest { running })
    }
}

/// Handle of a running microvm guest. Dropping it stops the guest.
pub struct MicrovmGuest {
    running: vmm::Running,
}

impl MicrovmGuest {
    /// Guest accesses that hit neither memory nor a device so far.
    pub fn unmapped_accesses(&self) -> u64 {
        self.running
            .shared
            .unmapped_accesses
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The last 64 KiB of serial output.
    pub fn serial_tail(&self) -> Vec<u8> {
        self.running.fanout.tail()
    }
}

impl Guest for MicrovmGuest {
    fn backend(&self) -> BackendKind {
        BackendKind::Microvm
    }
    fn vmm_pid(&self) -> Option<u32> {
        None
    }
    fn state(&self) -> GuestState {
        match self.running.shared.exit() {
            Some(e) if self.running.shared.wait_done(Duration::ZERO).is_some() => {
                GuestState::Exited(e)
            }
            Some(_) => GuestState::Stopping,
            None => GuestState::Running,
        }
    }
    fn take_console(&mut self) -> Option<Receiver<Vec<u8>>> {
        self.running.console.take()
    }
    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<GuestExit>> {
        Ok(self.running.shared.wait_done(timeout))
    }
    fn stop(&mut self, grace: Duration) -> Result<GuestExit> {
        // Press the power button and give the guest `grace` to power off; then stop
        // it. A guest that already ended keeps its own exit reason.
        if self.running.shared.exit().is_none() && !grace.is_zero() {
            self.running.press_power_button();
            if let Some(exit) = self.running.shared.wait_done(grace) {
                return Ok(exit);
            }
        }
        Ok(self
            .running
            .stop(GuestExit::Stopped)
            .unwrap_or(GuestExit::Stopped))
    }
}
