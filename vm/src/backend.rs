//! The contract every guest backend implements: a [`GuestSpec`] goes in, a running
//! [`Guest`] handle comes out.
//!
//! A handle owns its guest: dropping it kills the guest. The wall-clock limit is enforced
//! by the handle itself (a watchdog), whether or not anybody calls [`Guest::wait`].

use std::fmt;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{Error, Result};

/// Which backend runs (or would run) a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Our own VMM on KVM (direct kernel boot only).
    Microvm,
    /// qemu-system-x86_64, with KVM or TCG.
    Qemu,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Microvm => "microvm",
            BackendKind::Qemu => "qemu",
        })
    }
}

/// How the guest boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// Load a Linux kernel (bzImage, or ELF/PVH vmlinux) straight into memory.
    Direct {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
    /// Firmware (BIOS) boots from the spec's disk.
    Disk,
    /// Firmware boots from this ISO image (a live CD); the spec's disk, if any, is
    /// attached as well.
    Iso { iso: PathBuf },
}

impl Boot {
    /// Short name for messages and tracing.
    pub fn kind(&self) -> &'static str {
        match self {
            Boot::Direct { .. } => "direct kernel boot",
            Boot::Disk => "firmware boot from disk",
            Boot::Iso { .. } => "firmware boot from ISO",
        }
    }
}

/// Which bus the disk sits on. Virtio is fast and what Linux guests expect; IDE is for
/// unmodified guests without virtio drivers (firmware boot only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DiskBus {
    #[default]
    Virtio,
    Ide,
}

/// The guest's disk: an already-open file, normally unlinked, so that it vanishes with
/// the guest. Backends read and write it in place; never a RAM copy, never a snapshot.
#[derive(Debug)]
pub struct DiskSpec {
    pub file: File,
    pub read_only: bool,
    pub bus: DiskBus,
}

impl DiskSpec {
    /// A writable virtio disk on `file`.
    pub fn new(file: File) -> Self {
        DiskSpec {
            file,
            read_only: false,
            bus: DiskBus::Virtio,
        }
    }
}

/// Where the guest's NIC is plugged.
#[derive(Debug)]
pub enum Tap {
    /// An open tap device fd (`/dev/net/tun` after `TUNSETIFF`, `IFF_TAP|IFF_NO_PI`).
    /// The most general form: the interface may live in another network namespace.
    Fd(OwnedFd),
    /// A tap interface by name, in the VMM's own network namespace.
    Name(String),
}

/// The guest's one NIC.
#[derive(Debug)]
pub struct NetSpec {
    pub tap: Tap,
    /// The MAC the lease fixed for this guest.
    pub mac: [u8; 6],
}

/// Formats a MAC as `02:00:00:00:00:01`.
pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Everything needed to start a guest.
pub struct GuestSpec {
    /// Name used in tracing spans and process titles (e.g. the lease id).
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub boot: Boot,
    pub disk: Option<DiskSpec>,
    /// Refuse to start if the disk is larger than this (the lease's disk cap).
    pub disk_cap_bytes: Option<u64>,
    pub net: Option<NetSpec>,
    /// Every serial byte the guest writes is also written here (the lease log).
    pub serial_log: Option<Box<dyn Write + Send>>,
    /// The guest is stopped when it has run this long.
    pub wall_clock_limit: Option<Duration>,
    /// After a stop request (ACPI power button / i8042), wait this long before killing.
    pub shutdown_grace: Duration,
}

impl fmt::Debug for GuestSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestSpec")
            .field("name", &self.name)
            .field("vcpus", &self.vcpus)
            .field("memory_mib", &self.memory_mib)
            .field("boot", &self.boot)
            .field("disk", &self.disk.as_ref().map(|d| d.file.as_raw_fd()))
            .field("disk_cap_bytes", &self.disk_cap_bytes)
            .field("net", &self.net)
            .field("serial_log", &self.serial_log.is_some())
            .field("wall_clock_limit", &self.wall_clock_limit)
            .finish()
    }
}

impl GuestSpec {
    /// A spec with 1 vCPU, 256 MiB, no disk, no NIC, no limit.
    pub fn new(name: impl Into<String>, boot: Boot) -> Self {
        GuestSpec {
            name: name.into(),
            vcpus: 1,
            memory_mib: 256,
            boot,
            disk: None,
            disk_cap_bytes: None,
            net: None,
            serial_log: None,
            wall_clock_limit: None,
            shutdown_grace: Duration::from_secs(10),
        }
    }

    /// Checks that hold for every backend: sizes, disk cap, files present.
    pub fn validate(&self) -> Result<()> {
        if self.vcpus == 0 || self.vcpus > 255 {
            return Err(Error::InvalidSpec(format!(
                "vcpus must be 1..=255, got {}",
                self.vcpus
            )));
        }
        if self.memory_mib < 16 {
            return Err(Error::InvalidSpec(format!(
                "memory must be at least 16 MiB, got {} MiB",
                self.memory_mib
            )));
        }
        if let Some(disk) = &self.disk {
            let size = disk
                .file
                .metadata()
                .map_err(|e| Error::io("reading the disk file's size", e))?
                .len();
            if let Some(cap) = self.disk_cap_bytes {
                if size > cap {
                    return Err(Error::ImageTooLarge { size, cap });
                }
            }
        }
        match &self.boot {
            Boot::Direct { kernel, initrd, .. } => {
                let meta = std::fs::metadata(kernel).map_err(|e| Error::KernelNotBootable {
                    path: kernel.clone(),
                    reason: e.to_string(),
                })?;
                if !meta.is_file() || meta.len() < 1024 {
                    return Err(Error::KernelNotBootable {
                        path: kernel.clone(),
                        reason: "not a regular file of plausible size".into(),
                    });
                }
                if let Some(initrd) = initrd {
                    std::fs::metadata(initrd)
                        .map_err(|e| Error::io(format!("initrd {}", initrd.display()), e))?;
                }
            }
            Boot::Disk => {
                if self.disk.is_none() {
                    return Err(Error::InvalidSpec(
                        "firmware boot from disk needs a disk".into(),
                    ));
                }
            }
            Boot::Iso { iso } => {
                std::fs::metadata(iso)
                    .map_err(|e| Error::io(format!("ISO image {}", iso.display()), e))?;
            }
        }
        Ok(())
    }
}

/// Why a guest ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "detail")]
pub enum GuestExit {
    /// The guest powered itself off.
    PoweredOff,
    /// The guest reset (reboot); guests are not restarted.
    Reset,
    /// The wall-clock limit ran out and the guest was stopped.
    LimitReached,
    /// Stopped on request ([`Guest::stop`]).
    Stopped,
    /// The VMM or guest failed (qemu crashed, KVM internal error, triple fault ...).
    Crashed(String),
}

impl GuestExit {
    /// Process exit code that `cpushare-node vm run` uses for this exit.
    pub fn exit_code(&self) -> i32 {
        match self {
            GuestExit::PoweredOff | GuestExit::Stopped => 0,
            GuestExit::Reset => 3,
            GuestExit::LimitReached => 124,
            GuestExit::Crashed(_) => 1,
        }
    }
}

impl fmt::Display for GuestExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestExit::PoweredOff => f.write_str("guest powered off"),
            GuestExit::Reset => f.write_str("guest reset"),
            GuestExit::LimitReached => f.write_str("wall-clock limit reached, guest stopped"),
            GuestExit::Stopped => f.write_str("guest stopped on request"),
            GuestExit::Crashed(why) => write!(f, "guest crashed: {why}"),
        }
    }
}

/// Where a guest is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestState {
    Running,
    /// A stop was requested; waiting for the guest to shut down.
    Stopping,
    Exited(GuestExit),
}

/// A running guest. Dropping it kills the guest.
pub trait Guest: Send {
    /// Which backend runs it.
    fn backend(&self) -> BackendKind;
    /// The VMM's process id when the VMM is a separate process (qemu), else `None`.
    fn vmm_pid(&self) -> Option<u32>;
    /// Current state; never blocks.
    fn state(&self) -> GuestState;
    /// The serial console as a stream of byte chunks. Only the first call gets it. The
    /// stream ends when the guest has exited and all output has been delivered. If the
    /// receiver falls far behind, chunks are dropped for it (the serial log still gets
    /// every byte).
    fn take_console(&mut self) -> Option<Receiver<Vec<u8>>>;
    /// Waits up to `timeout` for the guest to end.
    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<GuestExit>>;
    /// Waits until the guest ends (it ends at the latest at its wall-clock limit).
    fn wait(&mut self) -> Result<GuestExit> {
        loop {
            if let Some(exit) = self.wait_timeout(Duration::from_secs(3600))? {
                return Ok(exit);
            }
        }
    }
    /// Asks the guest to shut down (ACPI power button or i8042 reset), kills it if it is
    /// still running after `grace`, and returns how it ended.
    fn stop(&mut self, grace: Duration) -> Result<GuestExit>;
}

/// Whether a backend could run a spec on this host, and why (not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub usable: bool,
    /// A sentence a user can read: what was checked and what was found.
    pub reason: String,
}

/// A way of running guests.
pub trait Backend: Send + Sync {
    fn kind(&self) -> BackendKind;
    /// Can this backend run `spec` on this host? Cheap (well under a second); it
    /// checks for real (opens devices, runs tiny probes), it does not guess.
    fn probe(&self, spec: &GuestSpec) -> Probe;
    /// Starts the guest. The spec's files and fds move into the guest.
    fn start(&self, spec: GuestSpec) -> Result<Box<dyn Guest>>;
}

/// Fans the guest's serial output out to the serial log, a console stream and a
/// bounded tail kept for reports. Backends feed it; it is cheap to clone.
#[derive(Clone)]
pub struct SerialFanout {
    inner: Arc<Mutex<FanoutInner>>,
}

struct FanoutInner {
    log: Option<Box<dyn Write + Send>>,
    tx: Option<SyncSender<Vec<u8>>>,
    tail: std::collections::VecDeque<u8>,
    tail_cap: usize,
    dropped: u64,
}

impl SerialFanout {
    /// Console chunks buffered for a slow reader before new ones are dropped for it.
    pub const CONSOLE_DEPTH: usize = 4096;
    /// Bytes of recent output kept for [`SerialFanout::tail`].
    pub const TAIL_BYTES: usize = 64 * 1024;

    /// A fanout writing to `log`, plus the receiving end of the console stream.
    pub fn new(log: Option<Box<dyn Write + Send>>) -> (Self, Receiver<Vec<u8>>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(Self::CONSOLE_DEPTH);
        let inner = FanoutInner {
            log,
            tx: Some(tx),
            tail: std::collections::VecDeque::new(),
            tail_cap: Self::TAIL_BYTES,
            dropped: 0,
        };
        (
            SerialFanout {
                inner: Arc::new(Mutex::new(inner)),
            },
            rx,
        )
    }

    /// Delivers bytes the guest wrote.
    pub fn push(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(log) = g.log.as_mut() {
            // A failing log must not stop the guest; the error is reported once.
            if let Err(e) = log.write_all(bytes).and_then(|_| log.flush()) {
                tracing::warn!(error = %e, "serial log write failed; no longer logging");
                g.log = None;
            }
        }
        if let Some(tx) = g.tx.as_ref() {
            match tx.try_send(bytes.to_vec()) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => g.dropped += bytes.len() as u64,
                Err(TrySendError::Disconnected(_)) => g.tx = None,
            }
        }
        let cap = g.tail_cap;
        g.tail.extend(bytes.iter().copied());
        let excess = g.tail.len().saturating_sub(cap);
        g.tail.drain(..excess);
    }

    /// Ends the console stream (call once the guest has exited and output is drained).
    pub fn close(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.tx = None;
        if let Some(log) = g.log.as_mut() {
            let _ = log.flush();
        }
    }

    /// The last [`SerialFanout::TAIL_BYTES`] bytes of output.
    pub fn tail(&self) -> Vec<u8> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.tail.iter().copied().collect()
    }

    /// Bytes the console stream dropped because its reader was too slow.
    pub fn dropped(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fanout_delivers_to_log_stream_and_tail() {
        let log = Arc::new(Mutex::new(Vec::new()));
        struct W(Arc<Mutex<Vec<u8>>>);
        impl Write for W {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (f, rx) = SerialFanout::new(Some(Box::new(W(log.clone()))));
        f.push(b"hello ");
        f.push(b"world");
        f.close();
        let got: Vec<u8> = rx.iter().flatten().collect();
        assert_eq!(got, b"hello world");
        assert_eq!(&*log.lock().unwrap(), b"hello world");
        assert_eq!(f.tail(), b"hello world");
    }

    #[test]
    fn tail_is_bounded_and_slow_reader_loses_only_stream_chunks() {
        let (f, _rx) = SerialFanout::new(None);
        for _ in 0..SerialFanout::CONSOLE_DEPTH + 10 {
            f.push(&[b'x'; 100]);
        }
        assert_eq!(f.tail().len(), SerialFanout::TAIL_BYTES);
        assert_eq!(f.dropped(), 1000);
    }

    #[test]
    fn validate_rejects_oversized_disk_and_missing_kernel() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(4096).unwrap();
        let mut spec = GuestSpec::new("t", Boot::Disk);
        spec.disk = Some(DiskSpec::new(file));
        spec.disk_cap_bytes = Some(1024);
        assert!(matches!(
            spec.validate(),
            Err(Error::ImageTooLarge {
                size: 4096,
                cap: 1024
            })
        ));
        spec.disk_cap_bytes = Some(4096);
        spec.validate().unwrap();

        let spec = GuestSpec::new(
            "t",
            Boot::Direct {
                kernel: "/nonexistent/vmlinuz".into(),
                initrd: None,
                cmdline: String::new(),
            },
        );
        assert!(matches!(
            spec.validate(),
            Err(Error::KernelNotBootable { .. })
        ));
        let spec = GuestSpec::new("t", Boot::Disk);
        assert!(matches!(spec.validate(), Err(Error::InvalidSpec(_))));
    }

    #[test]
    fn exit_codes_distinguish_outcomes() {
        assert_eq!(GuestExit::PoweredOff.exit_code(), 0);
        assert_eq!(GuestExit::LimitReached.exit_code(), 124);
        assert_ne!(GuestExit::Crashed("x".into()).exit_code(), 0);
        assert_eq!(mac_string(&[2, 0, 0, 0, 0xab, 1]), "02:00:00:00:ab:01");
    }
}
