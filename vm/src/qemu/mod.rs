//! The `qemu` backend: qemu-system-x86_64 with KVM where KVM can run the guest, TCG
//! where it cannot.
//!
//! - Direct kernel boot uses the `microvm` machine with ACPI (stock kernels find its
//!   virtio-mmio devices through ACPI); disks and ISOs boot on `q35` with SeaBIOS.
//! - The disk is the caller's already-open (normally unlinked) file, reached by qemu
//!   through the inherited fd; the NIC is the caller's tap fd. Never `-snapshot`.
//! - Serial console and QMP run over socketpairs passed as fds: no paths, no races.
//! - qemu runs in its own process group with `PR_SET_PDEATHSIG`, tied to a supervisor
//!   thread that lives exactly as long as qemu; the handle kills it on drop.

pub mod accel;
pub mod args;
pub mod qmp;

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use accel::{Accel, AccelChoice, AccelPolicy};

use crate::backend::{
    Backend, BackendKind, Boot, Guest, GuestExit, GuestSpec, GuestState, Probe, SerialFanout, Tap,
};
use crate::error::{Error, Result};
use crate::stderr_tail::{last_line, StderrTail};

/// How the qemu backend runs qemu.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// The binary, or a bare name looked up in PATH.
    pub binary: PathBuf,
    pub accel: AccelPolicy,
    /// A named CPU model (never `host`: it fails on some nested hosts).
    pub cpu_model: String,
    /// TCG translation cache size in MiB; bounds qemu's own memory under TCG.
    pub tcg_tb_size_mib: Option<u32>,
    /// How long start waits for qemu to come up (load the kernel, open the QMP socket).
    pub startup_timeout: Duration,
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            binary: PathBuf::from("qemu-system-x86_64"),
            accel: AccelPolicy::Auto,
            cpu_model: "qemu64".into(),
            tcg_tb_size_mib: Some(64),
            startup_timeout: Duration::from_secs(30),
        }
    }
}

/// The qemu backend.
#[derive(Debug, Clone, Default)]
pub struct Qemu {
    pub config: QemuConfig,
}

impl Qemu {
    pub fn new(config: QemuConfig) -> Self {
        Qemu { config }
    }

    /// The qemu binary's full path, or [`Error::QemuMissing`].
    pub fn binary(&self) -> Result<PathBuf> {
        find_binary(&self.config.binary)
    }

    /// Which accelerator this backend would use here, and why.
    pub fn choose_accel(&self) -> Result<AccelChoice> {
        let binary = self.binary()?;
        accel::choose(&binary, self.config.accel)
    }

    /// Like [`Backend::start`], returning the concrete handle.
    pub fn start_guest(&self, mut spec: GuestSpec) -> Result<QemuGuest> {
        spec.validate()?;
        let binary = self.binary()?;
        let accel = accel::choose(&binary, self.config.accel)?;
        let span = tracing::info_span!("qemu", guest = %spec.name, accel = %accel.accel);
        let _enter = span.enter();
        if accel.accel == Accel::Tcg {
            if let Boot::Direct { cmdline, .. } = &mut spec.boot {
                add_tsc_hint(cmdline);
            }
        }
        tracing::debug!(reason = %accel.reason, boot = spec.boot.kind(), "starting qemu");
        start(&binary, &self.config, accel, spec, None)
    }

    /// Like [`Qemu::start_guest`], with qemu in `jail` ([`crate::jail`]): its own uid,
    /// no capabilities, a minimal root, the jail's cgroup and network namespace. The
    /// jail is torn down (cgroup removed, uid freed) once qemu has been reaped.
    pub fn start_jailed(&self, mut spec: GuestSpec, jail: crate::jail::Jail) -> Result<QemuGuest> {
        spec.validate()?;
        let binary = self.binary()?;
        let accel = accel::choose(&binary, self.config.accel)?;
        let span =
            tracing::info_span!("qemu", guest = %spec.name, accel = %accel.accel, uid = jail.uid());
        let _enter = span.enter();
        if accel.accel == Accel::Tcg {
            if let Boot::Direct { cmdline, .. } = &mut spec.boot {
                add_tsc_hint(cmdline);
            }
        }
        tracing::debug!(reason = %accel.reason, boot = spec.boot.kind(), "starting jailed qemu");
        start(&binary, &self.config, accel, spec, Some(jail))
    }
}

impl Backend for Qemu {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    fn probe(&self, _spec: &GuestSpec) -> Probe {
        match self.choose_accel() {
            Ok(c) => Probe {
                usable: true,
                reason: format!("qemu with {}: {}", c.accel, c.reason),
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

/// Under TCG the `microvm` machine gives Linux no clock to calibrate the TSC against
/// (no HPET, no ACPI PM timer) and PIT calibration fails on a loaded host, after which
/// the kernel hangs early in boot. TCG's guest TSC ticks at the host TSC's rate, so we
/// tell the kernel that rate (`tsc_early_khz`, ignored by non-Linux kernels) unless
/// the command line already sets it.
fn add_tsc_hint(cmdline: &mut String) {
    if cmdline.contains("tsc_early_khz=") {
        return;
    }
    if let Some(khz) = host_tsc_khz() {
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(&format!("tsc_early_khz={khz}"));
    }
}

/// The host TSC's rate, measured once against the monotonic clock (20 ms).
pub fn host_tsc_khz() -> Option<u64> {
    static KHZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *KHZ.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: rdtsc has no preconditions on x86_64.
            let t0 = unsafe { std::arch::x86_64::_rdtsc() };
            let i0 = Instant::now();
            std::thread::sleep(Duration::from_millis(20));
            // SAFETY: as above.
            let t1 = unsafe { std::arch::x86_64::_rdtsc() };
            let ns = i0.elapsed().as_nanos() as u64;
            let khz = (t1.wrapping_sub(t0) as u128 * 1_000_000 / ns.max(1) as u128) as u64;
            (100_000..20_000_000).contains(&khz).then_some(khz)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    })
}

/// Resolves a binary name through PATH.
pub fn find_binary(binary: &Path) -> Result<PathBuf> {
    let missing = || Error::QemuMissing {
        binary: binary.display().to_string(),
    };
    if binary.components().count() > 1 {
        return if binary.is_file() {
            Ok(binary.to_path_buf())
        } else {
            Err(missing())
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|p| p.is_file())
        .ok_or_else(missing)
}

/// State shared by the handle and the supervisor thread.
struct Shared {
    inner: Mutex<Inner>,
    cv: Condvar,
}

struct Inner {
    state: GuestState,
    /// Set once a stop is asked for: how the exit will be reported, and when to kill.
    stop: Option<(GuestExit, Instant)>,
    /// Kill right away (the handle is being dropped).
    kill_now: bool,
    /// The last SHUTDOWN/GUEST_PANICKED reason QMP reported.
    shutdown_reason: Option<String>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A guest running under qemu.
pub struct QemuGuest {
    pid: u32,
    accel: AccelChoice,
    shared: Arc<Shared>,
    qmp: Arc<Mutex<UnixStream>>,
    console: Option<Receiver<Vec<u8>>>,
    fanout: SerialFanout,
    supervisor: Option<JoinHandle<()>>,
}

impl QemuGuest {
    /// The accelerator this guest runs with, and why.
    pub fn accel(&self) -> &AccelChoice {
        &self.accel
    }

    /// The last 64 KiB of serial output.
    pub fn serial_tail(&self) -> Vec<u8> {
        self.fanout.tail()
    }

    fn request_stop(&self, kind: GuestExit, grace: Duration) {
        {
            let mut g = self.shared.lock();
            if matches!(g.state, GuestState::Exited(_)) || g.stop.is_some() {
                return;
            }
            g.stop = Some((kind, Instant::now() + grace));
            g.state = GuestState::Stopping;
        }
        qmp_command(&self.qmp, "system_powerdown");
        self.shared.cv.notify_all();
    }
}

fn qmp_command(qmp: &Mutex<UnixStream>, command: &str) {
    let mut s = qmp.lock().unwrap_or_else(|p| p.into_inner());
    let line = format!("{{\"execute\":\"{command}\"}}\n");
    if let Err(e) = s.write_all(line.as_bytes()) {
        tracing::debug!(error = %e, command, "QMP command not delivered (qemu gone?)");
    }
}

impl Guest for QemuGuest {
    fn backend(&self) -> BackendKind {
        BackendKind::Qemu
    }

    fn vmm_pid(&self) -> Option<u32> {
        Some(self.pid)
    }

    fn state(&self) -> GuestState {
        self.shared.lock().state.clone()
    }

    fn take_console(&mut self) -> Option<Receiver<Vec<u8>>> {
        self.console.take()
    }

    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<GuestExit>> {
        let deadline = Instant::now() + timeout;
        let mut g = self.shared.lock();
        loop {
            if let GuestState::Exited(exit) = &g.state {
                return Ok(Some(exit.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            g = self
                .shared
                .cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn stop(&mut self, grace: Duration) -> Result<GuestExit> {
        self.request_stop(GuestExit::Stopped, grace);
        self.wait()
    }
}

impl Drop for QemuGuest {
    fn drop(&mut self) {
        {
            let mut g = self.shared.lock();
            g.kill_now = true;
        }
        self.shared.cv.notify_all();
        if let Some(h) = self.supervisor.take() {
            let _ = h.join();
        }
    }
}

/// What the supervisor reports back to `start` once qemu is up (or not).
enum Startup {
    Ready { pid: u32 },
    Failed(Error),
}

/// The files qemu opens by path, moved into the jail: the boot spec is rewritten to
/// their paths inside it.
fn jail_files(jail: &crate::jail::Jail, boot: &mut Boot) -> Result<Vec<crate::jail::JailFile>> {
    let mut files = Vec::new();
    let mut give = |p: &mut PathBuf, name: &str| -> Result<()> {
        let f = jail.file(p, name)?;
        *p = f.inside.clone();
        files.push(f);
        Ok(())
    };
    match boot {
        Boot::Direct { kernel, initrd, .. } => {
            give(kernel, "kernel")?;
            if let Some(i) = initrd {
                give(i, "initrd")?;
            }
        }
        Boot::Iso { iso } => give(iso, "cdrom.iso")?,
        Boot::Disk => {}
    }
    Ok(files)
}

fn start(
    binary: &Path,
    cfg: &QemuConfig,
    accel: AccelChoice,
    mut spec: GuestSpec,
    jail: Option<crate::jail::Jail>,
) -> Result<QemuGuest> {
    let host_kernel = match &spec.boot {
        Boot::Direct { kernel, .. } => Some(kernel.clone()),
        _ => None,
    };
    let jail_files = match &jail {
        Some(j) => jail_files(j, &mut spec.boot)?,
        None => Vec::new(),
    };
    let (qmp_ours, qmp_theirs) =
        UnixStream::pair().map_err(|e| Error::io("creating the QMP socketpair", e))?;
    let (serial_ours, serial_theirs) =
        UnixStream::pair().map_err(|e| Error::io("creating the serial socketpair", e))?;

    // The fds qemu inherits. They stay close-on-exec here (so no other child we spawn
    // gets them) and the flag is cleared only in qemu's child after fork.
    let mut inherit: Vec<RawFd> = vec![qmp_theirs.as_raw_fd(), serial_theirs.as_raw_fd()];
    let disk_arg = spec.disk.as_ref().map(|d| {
        inherit.push(d.file.as_raw_fd());
        (d.file.as_raw_fd(), d.read_only, d.bus)
    });
    // A jailed qemu reaches its disk through an fd set, which needs a read-only fd
    // of the same file beside the read-write one (see `args::ArgsInput::jailed`).
    let disk_ro = match (&jail, &spec.disk) {
        (Some(_), Some(d)) => {
            let path = format!("/proc/self/fd/{}", d.file.as_raw_fd());
            let ro = std::fs::File::open(&path)
                .map_err(|e| Error::io("reopening the disk read-only for the jail", e))?;
            inherit.push(ro.as_raw_fd());
            Some(ro)
        }
        _ => None,
    };
    let net_arg = spec.net.as_ref().map(|n| {
        let arg = match &n.tap {
            Tap::Fd(fd) => {
                inherit.push(fd.as_raw_fd());
                args::NetArg::Fd(fd.as_raw_fd())
            }
            Tap::Name(name) => args::NetArg::Name(name.as_str()),
        };
        (arg, n.mac)
    });
    let argv = args::build(&args::ArgsInput {
        name: &spec.name,
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        accel: accel.accel,
        cpu_model: &cfg.cpu_model,
        tcg_tb_size_mib: cfg.tcg_tb_size_mib,
        boot: &spec.boot,
        disk: disk_arg,
        net: net_arg,
        qmp_fd: qmp_theirs.as_raw_fd(),
        serial_fd: serial_theirs.as_raw_fd(),
        jailed: jail.is_some(),
        disk_ro_fd: disk_ro.as_ref().map(|f| f.as_raw_fd()),
        disk_bps: jail.as_ref().and_then(|j| j.limits().disk_bps),
        disk_iops: jail.as_ref().and_then(|j| j.limits().disk_iops),
    });
    tracing::debug!(?argv, "qemu command line");

    let mut cmd = Command::new(binary);
    cmd.args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd.process_group(0);
    let parent = std::process::id() as libc::pid_t;
    let fds = inherit.clone();
    let prepared = match &jail {
        Some(j) => Some(Arc::new(j.prepare(
            binary,
            accel.accel == Accel::Kvm,
            jail_files,
            inherit.clone(),
        )?)),
        None => None,
    };
    if let Some(p) = prepared.clone() {
        cmd.env_clear();
        // SAFETY: `child::enter` makes only raw system calls on data prepared before
        // the fork (see crate::jail::child).
        unsafe {
            cmd.pre_exec(move || crate::jail::child::enter(&p.child));
        }
    } else {
        // SAFETY: only async-signal-safe calls (prctl, getppid, fcntl, _exit) between
        // fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    libc::_exit(1); // the node died before prctl took effect
                }
                for &fd in &fds {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }

    let (fanout, console) = SerialFanout::new(spec.serial_log.take());
    let shared = Arc::new(Shared {
        inner: Mutex::new(Inner {
            state: GuestState::Running,
            stop: None,
            kill_now: false,
            shutdown_reason: None,
        }),
        cv: Condvar::new(),
    });
    let qmp_writer = qmp_ours
        .try_clone()
        .map_err(|e| Error::io("cloning the QMP socket", e))?;
    let qmp = Arc::new(Mutex::new(qmp_writer));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Startup>();
    let limit = spec.wall_clock_limit;
    let grace = spec.shutdown_grace;
    let startup_timeout = cfg.startup_timeout;
    let name = spec.name.clone();
    let kernel = host_kernel;

    let sup_shared = shared.clone();
    let sup_fanout = fanout.clone();
    let sup_qmp = qmp.clone();
    let supervisor = std::thread::Builder::new()
        .name(format!("qemu-{}", short(&name)))
        .spawn(move || {
            // `spec` (disk file, tap fd) and qemu's socket ends live in this thread
            // until qemu has been spawned; then our copies are closed.
            let spawned = cmd.spawn();
            drop(qmp_theirs);
            drop(serial_theirs);
            drop(spec);
            drop(disk_ro);
            let child = match spawned {
                Ok(c) => c,
                Err(e) => {
                    let err = match prepared.as_ref().and_then(|p| p.failure()) {
                        Some(step) => Error::Jail { step, source: e },
                        None => Error::io("spawning qemu", e),
                    };
                    let _ = ready_tx.send(Startup::Failed(err));
                    return;
                }
            };
            drop(prepared);
            supervise(
                child,
                Supervision {
                    shared: sup_shared,
                    fanout: sup_fanout,
                    qmp_reader: qmp_ours,
                    qmp_writer: sup_qmp,
                    serial: serial_ours,
                    ready: ready_tx,
                    limit,
                    grace,
                    startup_timeout,
                    name,
                    kernel,
                },
            );
            // qemu has been reaped: its cgroup can go, its uid is free again.
            drop(jail);
        })
        .map_err(|e| Error::io("spawning the qemu supervisor thread", e))?;

    match ready_rx.recv() {
        Ok(Startup::Ready { pid }) => Ok(QemuGuest {
            pid,
            accel,
            shared,
            qmp,
            console: Some(console),
            fanout,
            supervisor: Some(supervisor),
        }),
        Ok(Startup::Failed(e)) => {
            let _ = supervisor.join();
            Err(e)
        }
        Err(_) => {
            let _ = supervisor.join();
            Err(Error::VmmFailed {
                backend: "qemu",
                message: "supervisor thread ended during startup".into(),
            })
        }
    }
}

fn short(name: &str) -> String {
    name.chars().take(10).collect()
}

struct Supervision {
    shared: Arc<Shared>,
    fanout: SerialFanout,
    qmp_reader: UnixStream,
    qmp_writer: Arc<Mutex<UnixStream>>,
    serial: UnixStream,
    ready: std::sync::mpsc::Sender<Startup>,
    limit: Option<Duration>,
    grace: Duration,
    startup_timeout: Duration,
    name: String,
    /// The direct-boot kernel, for error messages.
    kernel: Option<PathBuf>,
}

/// Runs in the thread that spawned qemu, until qemu has been reaped.
fn supervise(mut child: std::process::Child, s: Supervision) {
    let pid = child.id();
    let started = Instant::now();
    let pgid = pid as libc::pid_t;
    let kill_group = || {
        // Only called before the child is reaped, so the group id is still ours.
        // SAFETY: plain syscall.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    };

    // qemu's own messages: keep the last few KiB for error reports.
    let mut stderr_tail = StderrTail::follow(child.stderr.take());

    let serial_fanout = s.fanout.clone();
    let mut serial = s.serial;
    let serial_thread = std::thread::spawn(move || {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match serial.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => serial_fanout.push(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
    });

    // QMP: greeting, capabilities, then events until qemu closes the socket.
    let _ = s.qmp_reader.set_read_timeout(Some(s.startup_timeout));
    let mut reader = BufReader::new(s.qmp_reader);
    let handshake = qmp_handshake(&mut reader, &s.qmp_writer);
    if let Err(why) = handshake {
        // qemu exited (bad kernel, bad option) or hung: report its own words.
        kill_group();
        let status = child.wait();
        stderr_tail.finish();
        let _ = serial_thread.join();
        s.fanout.close();
        let err = startup_error(&stderr_tail.text(), &why, status.ok(), s.kernel.as_deref());
        {
            let mut g = s.shared.lock();
            g.state = GuestState::Exited(GuestExit::Crashed(err.to_string()));
        }
        s.shared.cv.notify_all();
        let _ = s.ready.send(Startup::Failed(err));
        return;
    }
    let _ = reader.get_ref().set_read_timeout(None);
    let qmp_shared = s.shared.clone();
    let qmp_thread = std::thread::spawn(move || {
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let reason = match qmp::parse(&line) {
                qmp::Message::Shutdown { reason } => reason,
                qmp::Message::Panicked => "guest-panic".to_string(),
                _ => continue,
            };
            let mut g = qmp_shared.lock();
            // The first reason wins: a panic followed by a host quit is a panic.
            if g.shutdown_reason.is_none() {
                g.shutdown_reason = Some(reason);
            }
        }
    });
    tracing::debug!(pid, guest = %s.name, "qemu running");
    let _ = s.ready.send(Startup::Ready { pid });

    // Watch: wall-clock limit, stop requests, kill requests, exit.
    let deadline = s.limit.map(|l| started + l);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) => {}
            Err(e) => break Err(e),
        }
        let mut g = s.shared.lock();
        let now = Instant::now();
        if g.kill_now {
            drop(g);
            kill_group();
            break child.wait();
        }
        if g.stop.is_none() && deadline.is_some_and(|d| now >= d) {
            tracing::info!(guest = %s.name, "wall-clock limit reached; powering down");
            g.stop = Some((GuestExit::LimitReached, now + s.grace));
            g.state = GuestState::Stopping;
            drop(g);
            qmp_command(&s.qmp_writer, "system_powerdown");
            continue;
        }
        if let Some((_, kill_at)) = &g.stop {
            if now >= *kill_at {
                drop(g);
                tracing::info!(guest = %s.name, "guest did not shut down in time; killing qemu");
                kill_group();
                break child.wait();
            }
        }
        let _ = s.shared.cv.wait_timeout(g, Duration::from_millis(20));
    };
    // qemu has been reaped. Its sockets are closed, so the readers finish.
    let _ = qmp_thread.join();
    let _ = serial_thread.join();
    stderr_tail.finish();
    s.fanout.close();
    let mut g = s.shared.lock();
    let exit = match (&g.stop, g.shutdown_reason.as_deref(), &status) {
        (_, Some("guest-panic"), _) => GuestExit::Crashed("guest kernel panicked".into()),
        (Some((kind, _)), _, _) => kind.clone(),
        (None, Some("guest-shutdown"), _) => GuestExit::PoweredOff,
        (None, Some("guest-reset"), _) => GuestExit::Reset,
        (None, _, Ok(st)) if st.success() => GuestExit::PoweredOff,
        (None, _, Ok(st)) => GuestExit::Crashed(format!(
            "qemu exited with {st}: {}",
            last_line(&stderr_tail.text())
        )),
        (None, _, Err(e)) => GuestExit::Crashed(format!("waiting for qemu: {e}")),
    };
    tracing::debug!(guest = %s.name, %exit, "qemu exited");
    g.state = GuestState::Exited(exit);
    drop(g);
    s.shared.cv.notify_all();
}

fn qmp_handshake(
    reader: &mut BufReader<UnixStream>,
    writer: &Mutex<UnixStream>,
) -> std::result::Result<(), String> {
    let mut line = String::new();
    let mut greeted = false;
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return Err("qemu exited before its control socket came up".into()),
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return Err("qemu did not come up in time".into())
            }
            Err(e) => return Err(format!("reading qemu's control socket: {e}")),
        }
        match qmp::parse(&line) {
            qmp::Message::Greeting if !greeted => {
                greeted = true;
                qmp_command(writer, "qmp_capabilities");
            }
            qmp::Message::Return if greeted => return Ok(()),
            qmp::Message::Error(e) => return Err(format!("qemu refused QMP: {e}")),
            _ => {}
        }
    }
}

/// Turns qemu's startup complaint into the most specific error.
fn startup_error(
    stderr: &str,
    why: &str,
    status: Option<std::process::ExitStatus>,
    kernel: Option<&Path>,
) -> Error {
    let msg = if stderr.is_empty() {
        why.to_string()
    } else {
        last_line(stderr).to_string()
    };
    let lower = stderr.to_ascii_lowercase();
    let about_kernel = lower.contains("kernel") && !lower.contains("ram disk");
    if let (true, Some(path)) = (about_kernel, kernel) {
        if ["load", "too old", "pvh", "invalid", "header"]
            .iter()
            .any(|w| lower.contains(w))
        {
            return Error::KernelNotBootable {
                path: path.to_path_buf(),
                reason: msg,
            };
        }
    }
    if lower.contains("kvm")
        && (lower.contains("failed to initialize") || lower.contains("could not access"))
    {
        return Error::KvmUnusable { reason: msg };
    }
    let status = status.map(|s| format!(" ({s})")).unwrap_or_default();
    Error::VmmFailed {
        backend: "qemu",
        message: format!("{msg}{status}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_hint_is_added_once_and_plausible() {
        let mut c = String::from("console=ttyS0");
        add_tsc_hint(&mut c);
        let khz = host_tsc_khz().expect("x86_64 host has a TSC");
        assert_eq!(c, format!("console=ttyS0 tsc_early_khz={khz}"));
        add_tsc_hint(&mut c);
        assert_eq!(c.matches("tsc_early_khz").count(), 1);
    }

    #[test]
    fn missing_binary_is_a_clear_error() {
        let e = find_binary(Path::new("cvq-no-such-qemu")).unwrap_err();
        assert!(matches!(e, Error::QemuMissing { .. }));
        assert!(e.to_string().contains("apt-get install qemu-system-x86"));
    }
}
