//! The microvm as a jailed process of its own (issue 13): the VMM runs in a child
//! started exactly as the jail starts qemu ([`crate::jail`]: per-guest uid, no
//! capabilities, no_new_privs, a mount namespace holding only the VMM binary and its
//! libraries, the kernel and initrd copies, /dev/kvm, /dev/null and /dev/urandom, the
//! lease's network namespace, its cgroup). The child is the node binary itself, run
//! as `cpushare-node __microvm-vmm <json>` ([`SUBCOMMAND`], [`vmm_main`]); it builds the
//! machine from fds it inherits (disk, tap, serial socket, control socket) and installs
//! its process-wide seccomp filter before it spawns its first thread, so every thread
//! has one (see [`super::seccomp`] for what each thread kind may call).
//!
//! The parent talks to it over two socketpairs, as the qemu backend does:
//! - serial: every byte the guest writes to COM1, read into the guest's
//!   [`SerialFanout`] (serial log, console stream, tail);
//! - control: the parent writes `p` (press the ACPI power button) or `k` (stop now);
//!   end of file means stop now. The VMM writes one JSON line per event: started,
//!   failed to build (with why), exited (with the [`GuestExit`]).
//!
//! A VMM that dies without reporting (seccomp violation: SIGSYS; OOM in its cgroup:
//! SIGKILL) is reported as crashed with its signal.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{check_spec, virtio, vmm, Microvm};
use crate::backend::{
    BackendKind, Boot, Guest, GuestExit, GuestSpec, GuestState, SerialFanout, Tap,
};
use crate::error::{Error, Result};
use crate::jail::Jail;
use crate::stderr_tail::{last_line, StderrTail};

/// The node's hidden subcommand that runs [`vmm_main`].
pub const SUBCOMMAND: &str = "__microvm-vmm";
/// Where the VMM binary sits in the jail.
pub const INSIDE_BINARY: &str = "/cpushare-vmm";
/// How long a VMM told to stop now may take before it is killed.
const KILL_AFTER: Duration = Duration::from_secs(5);
/// How long the VMM may take to build the machine.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// What the VMM process is told on its command line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmmArgs {
    pub name: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// Paths inside the jail.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub disk_fd: Option<RawFd>,
    pub disk_read_only: bool,
    pub tap_fd: Option<RawFd>,
    pub mac: [u8; 6],
    pub limit_ms: Option<u64>,
    pub serial_fd: RawFd,
    pub control_fd: RawFd,
}

/// Why the VMM could not build the machine (mirrors `vmm::BuildError`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FailKind {
    Kernel,
    Kvm,
    Memory,
    Other,
}

/// One line the VMM writes on its control socket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Report {
    Started,
    Failed { kind: FailKind, reason: String },
    Exited(GuestExit),
}

impl Report {
    fn line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec());
        v.push(b'\n');
        v
    }
}

/// Runs the VMM process: `args` are the arguments after [`SUBCOMMAND`]. Returns the
/// process's exit code: 0 once the guest's exit has been reported, 2 for bad
/// arguments, 1 when the machine could not be built.
pub fn vmm_main(args: &[std::ffi::OsString]) -> i32 {
    let [json] = args else {
        eprintln!("error: {SUBCOMMAND} takes one argument (its JSON configuration)");
        return 2;
    };
    let a: VmmArgs = match serde_json::from_slice(json.as_encoded_bytes()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {SUBCOMMAND}: bad configuration: {e}");
            return 2;
        }
    };
    let fds = [Some(a.serial_fd), Some(a.control_fd), a.disk_fd, a.tap_fd];
    for fd in fds.into_iter().flatten() {
        // SAFETY: fcntl(F_GETFD) only asks whether the fd is open.
        if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            eprintln!("error: {SUBCOMMAND}: fd {fd} is not an open inherited fd");
            return 2;
        }
    }
    // Sockets are used as files: read(2)/write(2), no recvfrom/sendto to allow.
    // SAFETY: the fd was checked open above, was inherited for this purpose, is
    // distinct from the others (the parent made them so), and nothing else in this
    // process owns it. The same holds for the next three.
    let mut control = unsafe { File::from_raw_fd(a.control_fd) };
    // SAFETY: as above.
    let serial = unsafe { File::from_raw_fd(a.serial_fd) };
    // SAFETY: as above.
    let disk = a.disk_fd.map(|fd| unsafe { File::from_raw_fd(fd) });
    // SAFETY: as above.
    let tap = a.tap_fd.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });

    let fail = |control: &mut File, kind, reason: String| {
        let _ = control.write_all(&Report::Failed { kind, reason }.line());
        1
    };
    let kernel = match File::open(&a.kernel) {
        Ok(f) => f,
        Err(e) => return fail(&mut control, FailKind::Kernel, e.to_string()),
    };
    let initrd = match &a.initrd {
        Some(p) => match File::open(p) {
            Ok(f) => Some(f),
            Err(e) => {
                let reason = format!("opening initrd {}: {e}", p.display());
                return fail(&mut control, FailKind::Other, reason);
            }
        },
        None => None,
    };
    let cfg = vmm::MachineConfig {
        name: a.name.clone(),
        vcpus: a.vcpus,
        mem_bytes: a.memory_mib << 20,
        kernel,
        initrd,
        cmdline: a.cmdline.clone(),
        disk: disk.map(|f| (f, a.disk_read_only)),
        net: tap.map(|fd| (fd, a.mac)),
        limit: a.limit_ms.map(Duration::from_millis),
        process_filter: true,
    };
    let mut running = match vmm::start(cfg, Some(Box::new(serial))) {
        Ok(r) => r,
        Err(e) => {
            let (kind, reason) = match e {
                vmm::BuildError::Kernel(r) => (FailKind::Kernel, r),
                vmm::BuildError::Kvm(r) => (FailKind::Kvm, r),
                vmm::BuildError::Memory(r) => (FailKind::Memory, r),
                vmm::BuildError::Other(r) => (FailKind::Other, r),
            };
            return fail(&mut control, kind, reason);
        }
    };
    // The serial log (the socket) gets every byte; nobody here reads the stream.
    drop(running.console.take());
    if control.write_all(&Report::Started.line()).is_err() {
        // The parent is gone: PDEATHSIG is on its way; stop cleanly meanwhile.
        running.stop(GuestExit::Stopped);
        return 1;
    }
    let fd = control.as_raw_fd();
    let exit = loop {
        if let Some(exit) = running.shared.wait_done(Duration::ZERO) {
            break exit;
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one pollfd on the stack.
        let n = unsafe { libc::poll(&mut pfd, 1, 100) };
        if n <= 0 {
            continue;
        }
        let mut buf = [0u8; 16];
        // SAFETY: read(2) into a stack buffer of its size.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            // End of file (or a broken socket): the parent stops the guest.
            break running
                .stop(GuestExit::Stopped)
                .unwrap_or(GuestExit::Stopped);
        }
        let mut stop_now = false;
        for b in &buf[..n as usize] {
            match b {
                b'p' => running.press_power_button(),
                b'k' => stop_now = true,
                _ => {}
            }
        }
        if stop_now {
            break running
                .stop(GuestExit::Stopped)
                .unwrap_or(GuestExit::Stopped);
        }
    };
    let _ = control.write_all(&Report::Exited(exit).line());
    0
}

/// State shared by the handle and the supervisor thread.
struct Shared {
    inner: Mutex<Inner>,
    cv: Condvar,
}

#[derive(Default)]
struct Inner {
    /// Set once the VMM has been reaped.
    exit: Option<GuestExit>,
    /// What the VMM reported as the guest's exit.
    reported: Option<GuestExit>,
    /// A stop was asked for: how it is reported, and when to stop the VMM for good.
    stop: Option<(GuestExit, Instant)>,
    kill_now: bool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A guest whose microvm runs as a jailed process. Dropping it kills the VMM.
pub struct JailedMicrovmGuest {
    pid: u32,
    shared: Arc<Shared>,
    control: Arc<Mutex<UnixStream>>,
    console: Option<Receiver<Vec<u8>>>,
    fanout: SerialFanout,
    supervisor: Option<JoinHandle<()>>,
}

impl JailedMicrovmGuest {
    /// The last 64 KiB of serial output.
    pub fn serial_tail(&self) -> Vec<u8> {
        self.fanout.tail()
    }
}

fn send(control: &Mutex<UnixStream>, byte: u8) {
    let mut c = control.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(e) = c.write_all(&[byte]) {
        tracing::debug!(error = %e, "control byte not delivered (VMM gone?)");
    }
}

impl Guest for JailedMicrovmGuest {
    fn backend(&self) -> BackendKind {
        BackendKind::Microvm
    }
    fn vmm_pid(&self) -> Option<u32> {
        Some(self.pid)
    }
    fn state(&self) -> GuestState {
        let g = self.shared.lock();
        match (&g.exit, &g.stop) {
            (Some(e), _) => GuestState::Exited(e.clone()),
            (None, Some(_)) => GuestState::Stopping,
            (None, None) => GuestState::Running,
        }
    }
    fn take_console(&mut self) -> Option<Receiver<Vec<u8>>> {
        self.console.take()
    }
    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<GuestExit>> {
        let deadline = Instant::now() + timeout;
        let mut g = self.shared.lock();
        loop {
            if let Some(e) = &g.exit {
                return Ok(Some(e.clone()));
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
        let press = {
            let mut g = self.shared.lock();
            if g.exit.is_none() && g.stop.is_none() {
                g.stop = Some((GuestExit::Stopped, Instant::now() + grace));
                true
            } else {
                false
            }
        };
        if press {
            send(&self.control, if grace.is_zero() { b'k' } else { b'p' });
            self.shared.cv.notify_all();
        }
        self.wait()
    }
}

impl Drop for JailedMicrovmGuest {
    fn drop(&mut self) {
        self.shared.lock().kill_now = true;
        self.shared.cv.notify_all();
        if let Some(h) = self.supervisor.take() {
            let _ = h.join();
        }
    }
}

fn build_failure(kind: FailKind, reason: String, kernel: &Path, memory_mib: u64) -> Error {
    match kind {
        FailKind::Kernel => Error::KernelNotBootable {
            path: kernel.to_path_buf(),
            reason,
        },
        FailKind::Kvm => Error::KvmUnusable { reason },
        FailKind::Memory => Error::MemoryUnavailable {
            requested_mib: memory_mib,
            reason,
        },
        FailKind::Other => Error::VmmFailed {
            backend: "microvm",
            message: reason,
        },
    }
}

/// How a VMM that ended without reporting the guest's exit is described.
fn unreported_exit(status: std::process::ExitStatus) -> GuestExit {
    match status.signal() {
        Some(libc::SIGSYS) => GuestExit::Crashed(
            "the VMM made a system call outside its seccomp filter and was killed (SIGSYS)".into(),
        ),
        Some(libc::SIGKILL) => {
            GuestExit::Crashed("the VMM was killed (SIGKILL; out of memory in its cgroup?)".into())
        }
        _ => GuestExit::Crashed(format!("the VMM exited with {status} without a report")),
    }
}

impl Microvm {
    /// Like [`Microvm::start_guest`], with the VMM a process of its own in `jail`:
    /// `binary` is the node binary (it has the [`SUBCOMMAND`]). The jail is torn down
    /// (cgroup removed, uid freed) once the VMM has been reaped.
    pub fn start_jailed(
        &self,
        mut spec: GuestSpec,
        jail: Jail,
        binary: &Path,
    ) -> Result<JailedMicrovmGuest> {
        spec.validate()?;
        check_spec(&spec)?;
        let span = tracing::info_span!("microvm", guest = %spec.name, uid = jail.uid());
        let _e = span.enter();
        let Boot::Direct {
            kernel,
            initrd,
            cmdline,
        } = spec.boot.clone()
        else {
            unreachable!("check_spec admits direct boot only");
        };
        let mut files = vec![jail.file(&kernel, "kernel")?];
        let initrd_inside = match &initrd {
            Some(p) => {
                let f = jail.file(p, "initrd")?;
                let inside = f.inside.clone();
                files.push(f);
                Some(inside)
            }
            None => None,
        };
        let (control_ours, control_theirs) =
            UnixStream::pair().map_err(|e| Error::io("creating the control socketpair", e))?;
        let (serial_ours, serial_theirs) =
            UnixStream::pair().map_err(|e| Error::io("creating the serial socketpair", e))?;
        let mut inherit = vec![control_theirs.as_raw_fd(), serial_theirs.as_raw_fd()];
        let disk = spec.disk.take();
        if let Some(d) = &disk {
            inherit.push(d.file.as_raw_fd());
        }
        let (tap, mac) = match spec.net.take() {
            Some(n) => {
                let fd = match n.tap {
                    Tap::Fd(fd) => fd,
                    Tap::Name(name) => virtio::net::open_tap(&name)
                        .map_err(|e| Error::io(format!("opening tap {name}"), e))?,
                };
                inherit.push(fd.as_raw_fd());
                (Some(fd), n.mac)
            }
            None => (None, [0; 6]),
        };
        let args = VmmArgs {
            name: spec.name.clone(),
            vcpus: spec.vcpus as u8,
            memory_mib: spec.memory_mib,
            kernel: files[0].inside.clone(),
            initrd: initrd_inside,
            cmdline,
            disk_fd: disk.as_ref().map(|d| d.file.as_raw_fd()),
            disk_read_only: disk.as_ref().is_some_and(|d| d.read_only),
            tap_fd: tap.as_ref().map(|t| t.as_raw_fd()),
            mac,
            limit_ms: spec.wall_clock_limit.map(|l| l.as_millis() as u64),
            serial_fd: serial_theirs.as_raw_fd(),
            control_fd: control_theirs.as_raw_fd(),
        };
        let json = serde_json::to_string(&args)
            .map_err(|e| Error::io("encoding the VMM's arguments", std::io::Error::other(e)))?;
        let prepared = Arc::new(jail.prepare_at(
            binary,
            Path::new(INSIDE_BINARY),
            Vec::new(),
            true,
            files,
            inherit,
        )?);
        let mut cmd = Command::new(INSIDE_BINARY);
        cmd.arg(SUBCOMMAND)
            .arg(&json)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        // Diagnosis only: `log` has the kernel log filter violations instead of
        // killing (see seccomp.rs).
        if let Some(v) = std::env::var_os("CPUSHARE_MICROVM_SECCOMP") {
            cmd.env("CPUSHARE_MICROVM_SECCOMP", v);
        }
        let p = prepared.clone();
        // SAFETY: `child::enter` makes only raw system calls on data prepared before
        // the fork (see crate::jail::child).
        unsafe {
            cmd.pre_exec(move || crate::jail::child::enter(&p.child));
        }

        let (fanout, console) = SerialFanout::new(spec.serial_log.take());
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner::default()),
            cv: Condvar::new(),
        });
        let control = Arc::new(Mutex::new(
            control_ours
                .try_clone()
                .map_err(|e| Error::io("cloning the control socket", e))?,
        ));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<u32>>();
        let sup_shared = shared.clone();
        let sup_fanout = fanout.clone();
        let sup_control = control.clone();
        let memory_mib = spec.memory_mib;
        let name = spec.name.clone();
        let supervisor = std::thread::Builder::new()
            .name(format!(
                "mvmj-{}",
                name.chars().take(10).collect::<String>()
            ))
            .spawn(move || {
                // The fds the VMM inherits live here until it has been spawned.
                let spawned = cmd.spawn();
                drop((control_theirs, serial_theirs, disk, tap, spec));
                let child = match spawned {
                    Ok(c) => c,
                    Err(e) => {
                        let err = match prepared.failure() {
                            Some(step) => Error::Jail { step, source: e },
                            None => Error::io("spawning the microvm VMM", e),
                        };
                        let _ = ready_tx.send(Err(err));
                        return;
                    }
                };
                drop(prepared);
                supervise(
                    child,
                    Supervision {
                        shared: sup_shared,
                        fanout: sup_fanout,
                        control_reader: control_ours,
                        control_writer: sup_control,
                        serial: serial_ours,
                        ready: ready_tx,
                        kernel,
                        memory_mib,
                    },
                );
                // The VMM has been reaped: its cgroup can go, its uid is free again.
                drop(jail);
            })
            .map_err(|e| Error::io("spawning the microvm supervisor thread", e))?;
        match ready_rx.recv() {
            Ok(Ok(pid)) => {
                tracing::info!(pid, "jailed microvm guest started");
                Ok(JailedMicrovmGuest {
                    pid,
                    shared,
                    control,
                    console: Some(console),
                    fanout,
                    supervisor: Some(supervisor),
                })
            }
            Ok(Err(e)) => {
                let _ = supervisor.join();
                Err(e)
            }
            Err(_) => {
                let _ = supervisor.join();
                Err(Error::VmmFailed {
                    backend: "microvm",
                    message: "supervisor thread ended during startup".into(),
                })
            }
        }
    }
}

struct Supervision {
    shared: Arc<Shared>,
    fanout: SerialFanout,
    control_reader: UnixStream,
    control_writer: Arc<Mutex<UnixStream>>,
    serial: UnixStream,
    ready: std::sync::mpsc::Sender<Result<u32>>,
    kernel: PathBuf,
    memory_mib: u64,
}

/// Runs in the thread that spawned the VMM, until the VMM has been reaped.
fn supervise(mut child: std::process::Child, s: Supervision) {
    let pid = child.id();
    // The VMM's own messages (a panic, a failed system call): kept for the error.
    let mut stderr_tail = StderrTail::follow(child.stderr.take());
    let with_stderr = |why: String, tail: &StderrTail| {
        let text = tail.text();
        match last_line(&text) {
            "" => why,
            line => format!("{why}: {line}"),
        }
    };
    let kill = || {
        // Only called before the child is reaped, so the pid is still ours.
        // SAFETY: plain syscall.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    };
    let serial_fanout = s.fanout.clone();
    let mut serial = s.serial;
    let serial_thread = std::thread::spawn(move || {
        use std::io::Read;
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

    // Startup: the VMM builds the machine and says so, or says why not.
    let _ = s.control_reader.set_read_timeout(Some(STARTUP_TIMEOUT));
    let mut reader = BufReader::new(s.control_reader);
    let mut line = String::new();
    let startup = match reader.read_line(&mut line) {
        Ok(0) => Err(None),
        Ok(_) => match serde_json::from_str::<Report>(&line) {
            Ok(Report::Started) => Ok(()),
            Ok(Report::Failed { kind, reason }) => {
                Err(Some(build_failure(kind, reason, &s.kernel, s.memory_mib)))
            }
            _ => Err(Some(Error::VmmFailed {
                backend: "microvm",
                message: format!("unexpected report from the VMM: {}", line.trim()),
            })),
        },
        Err(e) => Err(Some(Error::VmmFailed {
            backend: "microvm",
            message: format!("the VMM did not come up: {e}"),
        })),
    };
    if let Err(err) = startup {
        kill();
        let status = child.wait();
        let _ = serial_thread.join();
        stderr_tail.finish();
        s.fanout.close();
        let err = err.unwrap_or_else(|| Error::VmmFailed {
            backend: "microvm",
            message: with_stderr(
                match status {
                    Ok(st) => match unreported_exit(st) {
                        GuestExit::Crashed(why) => format!("{why}, before the guest started"),
                        other => other.to_string(),
                    },
                    Err(e) => format!("waiting for the VMM: {e}"),
                },
                &stderr_tail,
            ),
        });
        {
            let mut g = s.shared.lock();
            g.exit = Some(GuestExit::Crashed(err.to_string()));
        }
        s.shared.cv.notify_all();
        let _ = s.ready.send(Err(err));
        return;
    }
    let _ = reader.get_ref().set_read_timeout(None);
    let report_shared = s.shared.clone();
    let report_thread = std::thread::spawn(move || loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if let Ok(Report::Exited(exit)) = serde_json::from_str::<Report>(&line) {
            report_shared.lock().reported = Some(exit);
        }
    });
    let _ = s.ready.send(Ok(pid));

    // Watch: stop requests (grace, then stop now, then kill), kill requests, exit.
    let mut told_stop = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) => {}
            Err(e) => break Err(e),
        }
        let g = s.shared.lock();
        let now = Instant::now();
        if g.kill_now {
            drop(g);
            kill();
            break child.wait();
        }
        if let Some((_, at)) = g.stop {
            if now >= at + KILL_AFTER {
                drop(g);
                tracing::info!(pid, "the VMM did not stop in time; killing it");
                kill();
                break child.wait();
            }
            if now >= at && !told_stop {
                drop(g);
                told_stop = true;
                send(&s.control_writer, b'k');
                continue;
            }
        }
        let _ = s.shared.cv.wait_timeout(g, Duration::from_millis(20));
    };
    // Reaped: its sockets are closed, so the readers finish.
    let _ = report_thread.join();
    let _ = serial_thread.join();
    stderr_tail.finish();
    s.fanout.close();
    let mut g = s.shared.lock();
    let exit = match (g.reported.take(), &g.stop, status) {
        (Some(exit), _, _) => exit,
        (None, Some((kind, _)), _) => kind.clone(),
        (None, None, Ok(st)) => match unreported_exit(st) {
            GuestExit::Crashed(why) => GuestExit::Crashed(with_stderr(why, &stderr_tail)),
            other => other,
        },
        (None, None, Err(e)) => GuestExit::Crashed(format!("waiting for the VMM: {e}")),
    };
    tracing::debug!(pid, %exit, "jailed microvm exited");
    g.exit = Some(exit);
    drop(g);
    s.shared.cv.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_and_reports_round_trip() {
        let a = VmmArgs {
            name: "lease-1".into(),
            vcpus: 2,
            memory_mib: 128,
            kernel: "/files/kernel".into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            disk_fd: Some(7),
            disk_read_only: false,
            tap_fd: None,
            mac: [2, 0, 0, 0, 0, 1],
            limit_ms: Some(1500),
            serial_fd: 5,
            control_fd: 4,
        };
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<VmmArgs>(&json).unwrap(), a);
        for r in [
            Report::Started,
            Report::Failed {
                kind: FailKind::Kvm,
                reason: "no".into(),
            },
            Report::Exited(GuestExit::Crashed("x".into())),
        ] {
            let line = r.line();
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(serde_json::from_slice::<Report>(&line).unwrap(), r);
        }
    }

    #[test]
    fn bad_arguments_are_refused_with_code_2() {
        assert_eq!(vmm_main(&[]), 2);
        assert_eq!(vmm_main(&["{".into()]), 2);
        let mut a: serde_json::Value = serde_json::json!({
            "name": "t", "vcpus": 1, "memory_mib": 32, "kernel": "/k", "initrd": null,
            "cmdline": "", "disk_fd": null, "disk_read_only": false, "tap_fd": null,
            "mac": [0,0,0,0,0,0], "limit_ms": null, "serial_fd": 1000, "control_fd": 1001
        });
        // fds that are not open are refused before anything is built.
        assert_eq!(vmm_main(&[a.to_string().into()]), 2);
        a["serial_fd"] = 1.into();
        assert_eq!(vmm_main(&[a.to_string().into()]), 2);
    }

    #[test]
    fn unreported_exits_name_the_signal() {
        let sys = std::process::ExitStatus::from_raw(libc::SIGSYS);
        assert!(unreported_exit(sys).to_string().contains("seccomp"));
        let killed = std::process::ExitStatus::from_raw(libc::SIGKILL);
        assert!(unreported_exit(killed).to_string().contains("SIGKILL"));
    }
}
