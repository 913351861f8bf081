//! KVM or TCG: probed, not guessed.
//!
//! Policy for `Auto` (each step must pass for KVM, else TCG with the failing step as
//! the reason):
//! 1. `/dev/kvm` opens read-write.
//! 2. qemu itself initialises its KVM accelerator (`-accel kvm`, paused, then `quit`).
//! 3. A tiny long-mode guest runs, under KVM, the instructions that broken nested KVM
//!    implementations cannot emulate when Linux boots (`xsave`/`xrstor`,
//!    `lock cmpxchg16b` on ordinary and on page-table memory, `int3` through an IDT)
//!    — see [`crate::kvm_probe`]. Booting the real kernel as a probe would take tens of
//!    seconds on a bad host, so this is the cheap stand-in; `--accel kvm|tcg`
//!    overrides it.
//!
//! Results are cached per process (the host does not change under us).

use std::collections::HashMap;
use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::error::{Error, Result};

/// The accelerator a guest runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// What the user asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum AccelPolicy {
    /// KVM if the probes pass, else TCG.
    #[default]
    Auto,
    /// KVM or an error saying why not.
    Kvm,
    /// TCG, even where KVM works.
    Tcg,
}

impl FromStr for AccelPolicy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(AccelPolicy::Auto),
            "kvm" => Ok(AccelPolicy::Kvm),
            "tcg" => Ok(AccelPolicy::Tcg),
            other => Err(format!(
                "unknown accelerator '{other}': use auto, kvm or tcg"
            )),
        }
    }
}

/// The accelerator picked and a sentence saying why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    pub accel: Accel,
    pub reason: String,
}

/// Picks the accelerator for `binary` under `policy`.
pub fn choose(binary: &Path, policy: AccelPolicy) -> Result<AccelChoice> {
    match policy {
        AccelPolicy::Tcg => Ok(AccelChoice {
            accel: Accel::Tcg,
            reason: "TCG requested (--accel tcg)".into(),
        }),
        AccelPolicy::Kvm => {
            kvm_usable(binary)?;
            Ok(AccelChoice {
                accel: Accel::Kvm,
                reason: "KVM requested (--accel kvm) and it initialises".into(),
            })
        }
        AccelPolicy::Auto => Ok(match kvm_usable(binary) {
            Ok(()) => AccelChoice {
                accel: Accel::Kvm,
                reason:
                    "KVM works: /dev/kvm opens, qemu initialises KVM, and the instruction probe ran"
                        .into(),
            },
            Err(e) => {
                let why = match e {
                    Error::KvmUnusable { reason } => {
                        format!("KVM cannot run Linux guests here: {reason}")
                    }
                    other => other.to_string(),
                };
                AccelChoice {
                    accel: Accel::Tcg,
                    reason: format!("using TCG (slower): {why}"),
                }
            }
        }),
    }
}

/// All three probe steps, cached per binary.
fn kvm_usable(binary: &Path) -> Result<()> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, std::result::Result<(), String>>>> =
        OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    // Step 1 is not cached: permissions can change, and it is a single open().
    open_dev_kvm()?;
    let mut g = cache.lock().unwrap_or_else(|p| p.into_inner());
    let result = g
        .entry(binary.to_path_buf())
        .or_insert_with(|| {
            let reason = |e: Error| match e {
                Error::KvmUnusable { reason } => reason,
                other => other.to_string(),
            };
            qemu_initialises_kvm(binary).map_err(reason)?;
            crate::kvm_probe::linux_instructions().map_err(reason)
        })
        .clone();
    result.map_err(|reason| Error::KvmUnusable { reason })
}

/// Step 1: `/dev/kvm` exists and opens read-write.
pub fn open_dev_kvm() -> Result<()> {
    let path = PathBuf::from("/dev/kvm");
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::KvmMissing { path }),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            Err(Error::KvmPermission { path })
        }
        Err(e) => Err(Error::KvmUnusable {
            reason: format!("opening /dev/kvm: {e}"),
        }),
    }
}

/// Step 2: qemu starts paused with `-accel kvm`, answers QMP, and quits.
fn qemu_initialises_kvm(binary: &Path) -> Result<()> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| Error::io("creating a socketpair", e))?;
    let fd = theirs.as_raw_fd();
    let mut cmd = Command::new(binary);
    cmd.args([
        "-M", "microvm", "-accel", "kvm", "-cpu", "qemu64", "-m", "16",
    ])
    .args(["-nodefaults", "-no-user-config", "-display", "none", "-S"])
    .args([
        "-chardev",
        &format!("socket,id=qmp,fd={fd}"),
        "-mon",
        "chardev=qmp,mode=control",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    // SAFETY: prctl and fcntl are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            );
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::QemuMissing {
            binary: binary.display().to_string(),
        },
        _ => Error::io("spawning qemu for the KVM probe", e),
    })?;
    drop(theirs);
    let _ = ours.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(
        ours.try_clone()
            .map_err(|e| Error::io("cloning a socket", e))?,
    );
    let mut writer = ours;
    let mut line = String::new();
    let mut ok = false;
    // Greeting, capabilities, quit.
    for cmdline in [
        "{\"execute\":\"qmp_capabilities\"}\n",
        "{\"execute\":\"quit\"}\n",
    ] {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        if writer.write_all(cmdline.as_bytes()).is_err() {
            break;
        }
        ok = true;
    }
    if !ok {
        let _ = child.kill();
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::io("waiting for the qemu KVM probe", e))?;
    if ok {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let msg = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("qemu exited")
        .trim()
        .to_string();
    Err(Error::KvmUnusable {
        reason: format!("qemu -accel kvm fails: {msg}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_parses() {
        assert_eq!("auto".parse::<AccelPolicy>(), Ok(AccelPolicy::Auto));
        assert_eq!("kvm".parse::<AccelPolicy>(), Ok(AccelPolicy::Kvm));
        assert_eq!("tcg".parse::<AccelPolicy>(), Ok(AccelPolicy::Tcg));
        assert!("hax".parse::<AccelPolicy>().is_err());
    }

    #[test]
    fn forced_tcg_needs_no_probe() {
        let c = choose(Path::new("/nonexistent/qemu"), AccelPolicy::Tcg).unwrap();
        assert_eq!(c.accel, Accel::Tcg);
    }
}
