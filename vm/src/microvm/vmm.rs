//! Building the KVM machine and running it: vCPU threads, the exit loop, the
//! supervisor (wall-clock limit, halt detection, teardown) and the console thread.

use std::cell::Cell;
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, kvm_run, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::acpi::{self, MmioDesc, S5_SLP_TYP, SLP_EN};
use super::boot;
use super::cpu::{self, BootMode};
use super::layout::*;
use super::seccomp::{self, ThreadKind};
use super::virtio::blk::Block;
use super::virtio::mmio::{MmioTransport, SharedTransport};
use super::virtio::net::{self, Net};
use super::virtio::{Irq, VirtioDevice};
use crate::backend::{GuestExit, SerialFanout};

/// How often the supervisor kicks vCPUs out of KVM_RUN to look for a guest that has
/// halted with interrupts off (it can never run again: e.g. Linux after `halt`).
const HALT_POLL: Duration = Duration::from_millis(100);
/// Serial writes (one byte each, mostly) buffered between a vCPU and the console
/// thread before the vCPU waits; the channel preallocates its slots.
const CONSOLE_BACKLOG: usize = 4096;
const KVM_MP_STATE_UNINITIALIZED: u32 = 1;
const KVM_MP_STATE_INIT_RECEIVED: u32 = 2;
const KVM_MP_STATE_HALTED: u32 = 3;
const RFLAGS_IF: u64 = 1 << 9;

/// Everything the machine is built from, already checked by the backend.
pub struct MachineConfig {
    pub name: String,
    pub vcpus: u8,
    pub mem_bytes: u64,
    pub kernel: File,
    pub initrd: Option<File>,
    pub cmdline: String,
    pub disk: Option<(File, bool)>,
    pub net: Option<(std::os::fd::OwnedFd, [u8; 6])>,
    pub limit: Option<Duration>,
    /// Install the process-wide seccomp filter ([`seccomp::apply_process`]) once the
    /// machine is built, before the first thread is spawned: for a VMM that is a
    /// process of its own (the jailed microvm), so every thread inherits it.
    pub process_filter: bool,
}

/// Why building the machine failed.
pub enum BuildError {
    Kernel(String),
    Kvm(String),
    Memory(String),
    Other(String),
}

/// Exit reason plus teardown state, shared by every thread of one guest.
pub struct Shared {
    exit: Mutex<Option<GuestExit>>,
    done: Mutex<bool>,
    cond: Condvar,
    stop: AtomicBool,
    /// Kick generation, and per vCPU the generation it last reported on, shifted left
    /// by one, with bit 0 set when it was halted for good.
    kick_gen: AtomicU64,
    halted: Vec<AtomicU64>,
    pub unmapped_accesses: AtomicU64,
}

impl Shared {
    fn new(vcpus: usize) -> Self {
        Shared {
            exit: Mutex::new(None),
            done: Mutex::new(false),
            cond: Condvar::new(),
            stop: AtomicBool::new(false),
            kick_gen: AtomicU64::new(0),
            halted: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
            unmapped_accesses: AtomicU64::new(0),
        }
    }

    /// Record why the guest ends (the first reason wins) and stop every thread.
    pub fn finish(&self, exit: GuestExit) {
        let mut g = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            tracing::debug!(%exit, "microvm guest ends");
            *g = Some(exit);
        }
        self.stop.store(true, Ordering::SeqCst);
        self.cond.notify_all();
    }

    pub fn exit(&self) -> Option<GuestExit> {
        self.exit.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Wait until teardown is complete (threads joined, console drained).
    pub fn wait_done(&self, timeout: Duration) -> Option<GuestExit> {
        let deadline = Instant::now() + timeout;
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        while !*done {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            done = self
                .cond
                .wait_timeout(done, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(done);
        self.exit()
    }

    fn set_done(&self) {
        *self.done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cond.notify_all();
    }
}

/// The serial line's interrupt: an irqfd on GSI 4.
struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Serial output goes to a bounded channel; the console thread (outside the seccomp
/// sandbox) hands it to the serial log and console stream. A full channel slows the
/// guest down rather than growing memory.
struct ConsoleWriter(SyncSender<Vec<u8>>);

impl std::io::Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .send(buf.to_vec())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Devices the vCPU threads dispatch exits to.
struct Bus {
    serial: Mutex<Serial<IrqTrigger, NoEvents, ConsoleWriter>>,
    virtio: Vec<SharedTransport>,
    shared: Arc<Shared>,
}

impl Bus {
    fn pio_out(&self, port: u16, data: &[u8]) {
        match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) => {
                let mut s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                // A serial error only loses that byte.
                let _ = s.write((p - SERIAL_PORT) as u8, data[0]);
            }
            I8042_CMD if data.first() == Some(&0xfe) => {
                // i8042 "pulse reset line": the guest asks for a reset; we stop it.
                self.shared.finish(GuestExit::Reset);
            }
            ACPI_SLEEP_CTL => {
                let v = data[0];
                if v & SLP_EN != 0 && (v >> 2) & 0x7 == S5_SLP_TYP {
                    self.shared.finish(GuestExit::PoweredOff);
                }
            }
            _ => {}
        }
    }

    fn pio_in(&self, port: u16, data: &mut [u8]) {
        match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) => {
                let mut s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                data[0] = s.read((p - SERIAL_PORT) as u8);
            }
            // i8042: status "no data, input buffer empty"; data reads 0.
            I8042_CMD | I8042_DATA | ACPI_SLEEP_STS => data.fill(0),
            // Nothing else is there: floating bus.
            _ => data.fill(0xff),
        }
    }

    fn virtio_at(&self, addr: u64) -> Option<(&SharedTransport, u64)> {
        let off = addr.checked_sub(VIRTIO_MMIO_BASE)?;
        let idx = (off / VIRTIO_MMIO_SIZE) as usize;
        self.virtio.get(idx).map(|t| (t, off % VIRTIO_MMIO_SIZE))
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if let Some((t, off)) = self.virtio_at(addr) {
            t.lock().unwrap_or_else(|e| e.into_inner()).read(off, data);
        } else {
            self.unmapped(addr, data.len(), false);
            // Unbacked guest-physical address: all ones, never host memory.
            data.fill(0xff);
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((t, off)) = self.virtio_at(addr) {
            t.lock().unwrap_or_else(|e| e.into_inner()).write(off, data);
        } else {
            self.unmapped(addr, data.len(), true);
        }
    }

    fn unmapped(&self, addr: u64, len: usize, write: bool) {
        let n = self
            .shared
            .unmapped_accesses
            .fetch_add(1, Ordering::Relaxed);
        if n < 8 {
            tracing::debug!(
                addr = format_args!("{addr:#x}"),
                len,
                write,
                "guest access outside its memory and devices"
            );
        }
    }
}

thread_local! {
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick signal makes KVM_RUN return (or not enter: immediate_exit).
extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = KVM_RUN_PTR.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: p points at this thread's vCPU kvm_run mapping, which lives as long
        // as the thread's VcpuFd; the pointer is cleared before the VcpuFd is dropped.
        unsafe { std::ptr::write_volatile(&mut (*p).immediate_exit, 1) };
    }
}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 3
}

static SIGNAL_ONCE: Once = Once::new();

fn install_kick_handler() -> Result<(), String> {
    let mut res = Ok(());
    SIGNAL_ONCE.call_once(|| {
        res = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            .map_err(|e| format!("installing the vCPU kick signal handler: {e}"));
    });
    res
}

/// Open /dev/kvm, mapping errors to what a user can act on.
pub fn open_kvm() -> Result<Kvm, crate::Error> {
    open_kvm_at(std::path::Path::new("/dev/kvm"))
}

/// Open the KVM device at `path` (tests use other paths).
pub fn open_kvm_at(path: &std::path::Path) -> Result<Kvm, crate::Error> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        crate::Error::KvmUnusable {
            reason: format!("bad device path {}", path.display()),
        }
    })?;
    let path = path.to_path_buf();
    Kvm::new_with_path(&c).map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENXIO | libc::ENODEV => crate::Error::KvmMissing { path },
        libc::EACCES | libc::EPERM => crate::Error::KvmPermission { path },
        _ => crate::Error::KvmUnusable {
            reason: format!("opening {}: {e}", path.display()),
        },
    })
}

/// Capabilities the microvm needs.
pub fn check_caps(kvm: &Kvm) -> Result<(), String> {
    use kvm_ioctls::Cap;
    if kvm.get_api_version() != 12 {
        return Err(format!(
            "unexpected KVM API version {}",
            kvm.get_api_version()
        ));
    }
    for (cap, name) in [
        (Cap::Irqchip, "in-kernel irqchip"),
        (Cap::Pit2, "in-kernel PIT"),
        (Cap::UserMemory, "user memory regions"),
        (Cap::Irqfd, "irqfd"),
        (Cap::ImmediateExit, "immediate_exit"),
        (Cap::SetTssAddr, "TSS address"),
        (Cap::ExtCpuid, "CPUID"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(format!("KVM lacks the {name} capability"));
        }
    }
    Ok(())
}

/// Create the VM with its memory, but no vCPUs yet.
fn create_vm(kvm: &Kvm, mem_bytes: u64) -> Result<(VmFd, GuestMemoryMmap), BuildError> {
    let vm = kvm
        .create_vm()
        .map_err(|e| BuildError::Kvm(format!("creating a VM: {e}")))?;
    vm.set_tss_address(KVM_TSS_ADDR as usize)
        .map_err(|e| BuildError::Kvm(format!("setting the TSS address: {e}")))?;
    vm.create_irq_chip()
        .map_err(|e| BuildError::Kvm(format!("creating the in-kernel irqchip: {e}")))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| BuildError::Kvm(format!("creating the in-kernel PIT: {e}")))?;
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(mem_bytes)
        .into_iter()
        .map(|(a, l)| (GuestAddress(a), l as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| {
        BuildError::Memory(format!(
            "mapping {} MiB of guest memory: {e}",
            mem_bytes >> 20
        ))
    })?;
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem` (shared by its clones).
        // Once vCPUs run, the machine drops the VM before the memory (see `run`'s
        // teardown); on an error path before that, no vCPU ever touches the slot.
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|e| BuildError::Kvm(format!("registering guest memory: {e}")))?;
    }
    Ok((vm, mem))
}

fn setup_vcpu(
    kvm: &Kvm,
    vm: &VmFd,
    id: u8,
    count: u8,
    mode: BootMode,
    gdt: &[u64; 4],
) -> Result<VcpuFd, String> {
    let vcpu = vm
        .create_vcpu(u64::from(id))
        .map_err(|e| format!("creating vCPU {id}: {e}"))?;
    let cpuid =
        cpu::cpuid_for(kvm, id, count).map_err(|e| format!("reading supported CPUID: {e}"))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| format!("setting CPUID of vCPU {id}: {e}"))?;
    let msrs = cpu::boot_msrs();
    let n = vcpu
        .set_msrs(&msrs)
        .map_err(|e| format!("setting MSRs of vCPU {id}: {e}"))?;
    if n != msrs.as_fam_struct_ref().nmsrs as usize {
        return Err(format!("KVM accepted only {n} boot MSRs of vCPU {id}"));
    }
    let sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("reading sregs of vCPU {id}: {e}"))?;
    vcpu.set_sregs(&cpu::boot_sregs(sregs, gdt, mode))
        .map_err(|e| format!("setting sregs of vCPU {id}: {e}"))?;
    vcpu.set_regs(&cpu::boot_regs(mode))
        .map_err(|e| format!("setting registers of vCPU {id}: {e}"))?;
    vcpu.set_fpu(&cpu::boot_fpu())
        .map_err(|e| format!("setting the FPU of vCPU {id}: {e}"))?;
    cpu::configure_lapic(&vcpu).map_err(|e| format!("configuring the LAPIC of vCPU {id}: {e}"))?;
    Ok(vcpu)
}

/// A running machine; the handle side.
pub struct Running {
    pub shared: Arc<Shared>,
    power_button: EventFd,
    pub console: Option<Receiver<Vec<u8>>>,
    pub fanout: SerialFanout,
    supervisor: Option<JoinHandle<()>>,
    pub started: Instant,
}

impl Running {
    /// Press the ACPI power button (the GED interrupt); an ACPI guest shuts down.
    pub fn press_power_button(&self) {
        let _ = self.power_button.write(1);
    }

    /// Stop the guest (if still running) and wait for teardown.
    pub fn stop(&mut self, exit: GuestExit) -> Option<GuestExit> {
        self.shared.finish(exit);
        if let Some(h) = self.supervisor.take() {
            let _ = h.join();
        }
        self.shared.exit()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop(GuestExit::Stopped);
    }
}

/// Build the machine from `cfg` and start it.
pub fn start(
    cfg: MachineConfig,
    serial_log: Option<Box<dyn std::io::Write + Send>>,
) -> Result<Running, BuildError> {
    let MachineConfig {
        name,
        vcpus,
        mem_bytes,
        mut kernel,
        initrd,
        cmdline,
        disk,
        net,
        limit,
        process_filter,
    } = cfg;
    let kvm = open_kvm().map_err(|e| BuildError::Kvm(e.to_string()))?;
    check_caps(&kvm).map_err(BuildError::Kvm)?;
    install_kick_handler().map_err(BuildError::Other)?;
    let (vm, mem) = create_vm(&kvm, mem_bytes)?;

    let loaded = boot::load_kernel(&mem, &mut kernel).map_err(BuildError::Kernel)?;
    let initrd_range = match initrd {
        Some(mut f) => {
            Some(boot::load_initrd(&mem, mem_bytes, &loaded, &mut f).map_err(BuildError::Kernel)?)
        }
        None => None,
    };

    let shared = Arc::new(Shared::new(vcpus as usize));
    let rx_exit =
        Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| BuildError::Other(e.to_string()))?);
    let mut transports: Vec<SharedTransport> = Vec::new();
    let mut descs = Vec::new();
    let mut rx_thread_parts = None;
    let new_irq = |gsi: u32| -> Result<Irq, BuildError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| BuildError::Other(e.to_string()))?;
        vm.register_irqfd(&evt, gsi)
            .map_err(|e| BuildError::Kvm(format!("registering irqfd for GSI {gsi}: {e}")))?;
        Ok(Irq::new(evt))
    };
    if let Some((file, read_only)) = disk {
        let gsi = VIRTIO_IRQ_BASE + transports.len() as u32;
        let dev = Block::new(file, read_only, &name)
            .map_err(|e| BuildError::Other(format!("disk: {e}")))?;
        descs.push(MmioDesc {
            addr: virtio_mmio_addr(transports.len()),
            gsi,
        });
        transports.push(Arc::new(Mutex::new(MmioTransport::new(
            Box::new(dev) as Box<dyn VirtioDevice>,
            mem.clone(),
            new_irq(gsi)?,
        ))));
    }
    if let Some((fd, mac)) = net {
        let gsi = VIRTIO_IRQ_BASE + transports.len() as u32;
        let (dev, tap, kick, vnet_hdr) =
            Net::new(fd, mac).map_err(|e| BuildError::Other(format!("guest tap: {e}")))?;
        descs.push(MmioDesc {
            addr: virtio_mmio_addr(transports.len()),
            gsi,
        });
        let t: SharedTransport = Arc::new(Mutex::new(MmioTransport::new(
            Box::new(dev),
            mem.clone(),
            new_irq(gsi)?,
        )));
        rx_thread_parts = Some((t.clone(), tap, kick, vnet_hdr));
        transports.push(t);
    }

    let rsdp = acpi::write_tables(&mem, vcpus, &descs).map_err(BuildError::Other)?;
    boot::write_boot_info(&mem, mem_bytes, &loaded, &cmdline, initrd_range, rsdp)
        .map_err(BuildError::Kernel)?;
    let gdt = cpu::write_boot_tables(&mem, loaded.mode)
        .map_err(|e| BuildError::Other(format!("writing boot tables: {e}")))?;

    let serial_evt =
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| BuildError::Other(e.to_string()))?;
    vm.register_irqfd(&serial_evt, SERIAL_IRQ)
        .map_err(|e| BuildError::Kvm(format!("registering the serial irqfd: {e}")))?;
    let power_button =
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| BuildError::Other(e.to_string()))?;
    vm.register_irqfd(&power_button, GED_IRQ)
        .map_err(|e| BuildError::Kvm(format!("registering the power button irqfd: {e}")))?;
    let (console_tx, console_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(CONSOLE_BACKLOG);
    let bus = Arc::new(Bus {
        serial: Mutex::new(Serial::new(
            IrqTrigger(serial_evt),
            ConsoleWriter(console_tx),
        )),
        virtio: transports,
        shared: shared.clone(),
    });

    let mut vcpu_fds = Vec::new();
    for id in 0..vcpus {
        vcpu_fds
            .push(setup_vcpu(&kvm, &vm, id, vcpus, loaded.mode, &gdt).map_err(BuildError::Kvm)?);
    }

    // Every fd and mapping the machine needs exists now; what follows only spawns
    // threads and runs them.
    if process_filter {
        seccomp::apply_process().map_err(BuildError::Other)?;
    }
    let (fanout, console_stream) = SerialFanout::new(serial_log);
    let console_fanout = fanout.clone();
    let console_thread = std::thread::Builder::new()
        .name("mvm-console".to_string())
        .spawn(move || {
            for chunk in console_rx {
                console_fanout.push(&chunk);
            }
        })
        .map_err(|e| BuildError::Other(format!("spawning the console thread: {e}")))?;

    let started = Instant::now();
    let mut vcpu_threads = Vec::new();
    // Threads carry the guest's span (thread names are too short for lease ids).
    let span = tracing::Span::current();
    for (id, fd) in vcpu_fds.into_iter().enumerate() {
        let bus = bus.clone();
        let shared = shared.clone();
        let span = span.clone();
        let h = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let _g = span.enter();
                vcpu_loop(id, fd, bus, shared)
            })
            .map_err(|e| BuildError::Other(format!("spawning vCPU thread: {e}")))?;
        vcpu_threads.push(h);
    }
    let rx_thread = match rx_thread_parts {
        Some((t, tap, kick, vnet_hdr)) => {
            let exit = rx_exit.clone();
            let shared = shared.clone();
            let span = span.clone();
            Some(
                std::thread::Builder::new()
                    .name("mvm-netrx".to_string())
                    .spawn(move || {
                        let _g = span.enter();
                        if let Err(e) = seccomp::apply(ThreadKind::NetRx) {
                            shared.finish(GuestExit::Crashed(e));
                            return;
                        }
                        net::rx_loop(t, tap, kick, exit, vnet_hdr)
                    })
                    .map_err(|e| BuildError::Other(format!("spawning the net RX thread: {e}")))?,
            )
        }
        None => None,
    };
    drop(bus);

    let sup_shared = shared.clone();
    let sup_fanout = fanout.clone();
    let deadline = limit.map(|l| started + l);
    let supervisor = std::thread::Builder::new()
        .name("mvm-supervisor".to_string())
        .spawn(move || {
            let _g = span.enter();
            supervise(
                &sup_shared,
                vcpu_threads,
                rx_thread,
                rx_exit,
                console_thread,
                deadline,
            );
            // The VM (and with it every vCPU and irqfd) and guest memory go last.
            drop(vm);
            drop(mem);
            sup_fanout.close();
            sup_shared.set_done();
        })
        .map_err(|e| BuildError::Other(format!("spawning the supervisor thread: {e}")))?;

    Ok(Running {
        shared,
        power_button,
        console: Some(console_stream),
        fanout,
        supervisor: Some(supervisor),
        started,
    })
}

fn kick(threads: &[JoinHandle<()>]) {
    use std::os::unix::thread::JoinHandleExt;
    for t in threads {
        if !t.is_finished() {
            // SAFETY: the pthread_t belongs to a thread not yet joined.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
    }
}

fn supervise(
    shared: &Shared,
    vcpus: Vec<JoinHandle<()>>,
    rx: Option<JoinHandle<()>>,
    rx_exit: Arc<EventFd>,
    console: JoinHandle<()>,
    deadline: Option<Instant>,
) {
    let mut halted_rounds = 0;
    loop {
        let guard = shared.exit.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_some() {
            break;
        }
        let mut wait = HALT_POLL;
        if let Some(d) = deadline {
            let now = Instant::now();
            if now >= d {
                drop(guard);
                shared.finish(GuestExit::LimitReached);
                break;
            }
            wait = wait.min(d - now);
        }
        let (guard, _) = shared
            .cond
            .wait_timeout(guard, wait)
            .unwrap_or_else(|p| p.into_inner());
        let ended = guard.is_some();
        drop(guard);
        if ended {
            break;
        }
        if vcpus.iter().any(|t| t.is_finished()) {
            shared.finish(GuestExit::Crashed(
                "a vCPU thread ended unexpectedly".into(),
            ));
            break;
        }
        // Did every vCPU report "halted for good" on the previous kick? Twice in a
        // row, so an AP woken by a SIPI just before the BSP halted is seen running.
        let prev = shared.kick_gen.load(Ordering::SeqCst);
        let all = shared
            .halted
            .iter()
            .all(|h| h.load(Ordering::SeqCst) == (prev << 1) | 1);
        halted_rounds = if all && prev > 0 {
            halted_rounds + 1
        } else {
            0
        };
        if halted_rounds >= 2 {
            shared.finish(GuestExit::PoweredOff);
            break;
        }
        // Ask every vCPU to report again.
        shared.kick_gen.fetch_add(1, Ordering::SeqCst);
        kick(&vcpus);
    }
    shared.stop.store(true, Ordering::SeqCst);
    // Kick until every vCPU has left KVM_RUN (a signal can land just before entry;
    // immediate_exit covers that, repeating covers the rest).
    while vcpus.iter().any(|t| !t.is_finished()) {
        kick(&vcpus);
        std::thread::sleep(Duration::from_millis(2));
    }
    for t in vcpus {
        if t.join().is_err() {
            shared.finish(GuestExit::Crashed("a vCPU thread panicked".into()));
        }
    }
    let _ = rx_exit.write(1);
    if let Some(rx) = rx {
        let _ = rx.join();
    }
    let _ = console.join();
}

fn vcpu_loop(id: usize, mut vcpu: VcpuFd, bus: Arc<Bus>, shared: Arc<Shared>) {
    KVM_RUN_PTR.with(|c| c.set(vcpu.get_kvm_run() as *mut kvm_run));
    // Unblock the kick signal in case the spawner had it blocked.
    // SAFETY: manipulating this thread's signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, kick_signal());
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
    // CPUSHARE_MICROVM_TRACE=1: print where each vCPU is at every kick (diagnosis).
    let trace = std::env::var_os("CPUSHARE_MICROVM_TRACE").is_some();
    if let Err(e) = seccomp::apply(ThreadKind::Vcpu) {
        shared.finish(GuestExit::Crashed(e));
        KVM_RUN_PTR.with(|c| c.set(std::ptr::null_mut()));
        return;
    }
    while !shared.stopping() {
        let outcome = match vcpu.run() {
            Ok(exit) => handle_exit(exit, &bus),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                if trace {
                    if let Ok(r) = vcpu.get_regs() {
                        eprintln!(
                            "microvm vcpu{id}: rip={:#x} rsp={:#x} rflags={:#x} mp={:?}",
                            r.rip,
                            r.rsp,
                            r.rflags,
                            vcpu.get_mp_state().map(|m| m.mp_state)
                        );
                    }
                }
                check_halted(id, &vcpu, &shared);
                None
            }
            Err(e) => Some(GuestExit::Crashed(format!(
                "KVM_RUN failed on vCPU {id}: {e}"
            ))),
        };
        if let Some(mut exit) = outcome {
            if let GuestExit::Crashed(why) = &mut exit {
                if why.starts_with("KVM internal error") {
                    let run = vcpu.get_kvm_run();
                    // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, so the
                    // `internal` member of the union is the valid one.
                    let sub = unsafe { run.__bindgen_anon_1.internal.suberror };
                    let what = match sub {
                        1 => "emulation failure",
                        2 => "simultaneous exception",
                        3 => "delivery event failed",
                        _ => "unknown",
                    };
                    why.push_str(&format!(" (suberror {sub}: {what})"));
                }
            }
            shared.finish(exit);
        }
    }
    KVM_RUN_PTR.with(|c| c.set(std::ptr::null_mut()));
}

fn check_halted(id: usize, vcpu: &VcpuFd, shared: &Shared) {
    let halted_for_good = match vcpu.get_mp_state() {
        Ok(s) if s.mp_state == KVM_MP_STATE_HALTED => {
            vcpu.get_regs().is_ok_and(|r| r.rflags & RFLAGS_IF == 0)
        }
        // An AP still waiting for INIT/SIPI only runs if another vCPU starts it.
        Ok(s) => {
            s.mp_state == KVM_MP_STATE_UNINITIALIZED || s.mp_state == KVM_MP_STATE_INIT_RECEIVED
        }
        Err(_) => false,
    };
    let gen = shared.kick_gen.load(Ordering::SeqCst);
    if let Some(h) = shared.halted.get(id) {
        h.store((gen << 1) | u64::from(halted_for_good), Ordering::SeqCst);
    }
}

fn handle_exit(exit: VcpuExit<'_>, bus: &Bus) -> Option<GuestExit> {
    match exit {
        VcpuExit::IoOut(port, data) => bus.pio_out(port, data),
        VcpuExit::IoIn(port, data) => bus.pio_in(port, data),
        VcpuExit::MmioRead(addr, data) => bus.mmio_read(addr, data),
        VcpuExit::MmioWrite(addr, data) => bus.mmio_write(addr, data),
        // Only without an in-kernel LAPIC; the guest has stopped itself.
        VcpuExit::Hlt => return Some(GuestExit::PoweredOff),
        VcpuExit::Shutdown => {
            return Some(GuestExit::Crashed(
                "triple fault (the guest hit an exception it could not handle)".into(),
            ))
        }
        VcpuExit::SystemEvent(kind, _) => {
            return Some(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => GuestExit::PoweredOff,
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => GuestExit::Reset,
                other => GuestExit::Crashed(format!("KVM system event {other}")),
            })
        }
        VcpuExit::InternalError => return Some(GuestExit::Crashed("KVM internal error".into())),
        VcpuExit::FailEntry(reason, cpu) => {
            return Some(GuestExit::Crashed(format!(
                "KVM could not enter the guest on CPU {cpu} (hardware reason {reason:#x})"
            )))
        }
        VcpuExit::Intr => {}
        other => return Some(GuestExit::Crashed(format!("unexpected KVM exit {other:?}"))),
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_errors_say_what_is_wrong() {
        let missing = open_kvm_at(std::path::Path::new("/nonexistent/kvm"))
            .err()
            .unwrap();
        assert!(
            matches!(missing, crate::Error::KvmMissing { .. }),
            "{missing}"
        );
        // Something that opens but is not KVM: present, but cannot run guests.
        let kvm = open_kvm_at(std::path::Path::new("/dev/null")).unwrap();
        let err = check_caps(&kvm).unwrap_err();
        assert!(err.contains("API version"), "{err}");
    }
}
