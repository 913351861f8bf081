//! What a seller daemon needs from its host, checked once at start: each capability
//! the lease path and the VMM jail use, /dev/net/tun for guest taps, and /dev/kvm
//! (optional: without it guests run with TCG). A missing one is named in one line
//! before any lease can fail on it: the daemon exits, or for KVM falls back to TCG
//! unless `seller.accel = "kvm"` asks it to exit.
//!
//! The packaged unit (packaging/cpushare-node.service) grants exactly [`SELLER_CAPS`]
//! as ambient capabilities to the `cpushare` user; a test checks the two agree.

use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use tracing::warn;

use crate::error::{Error, Result};

/// A Linux capability the seller daemon holds, its number, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    pub name: &'static str,
    pub bit: u8,
    pub why: &'static str,
}

/// Every capability the seller daemon keeps (numbers from linux/capability.h).
pub const SELLER_CAPS: &[Cap] = &[
    Cap {
        name: "CAP_CHOWN",
        bit: 0,
        why: "giving the jail's files to the lease uid",
    },
    Cap {
        name: "CAP_FOWNER",
        bit: 3,
        why: "setting modes on the lease's files",
    },
    Cap {
        name: "CAP_KILL",
        bit: 5,
        why: "stopping VMMs that run as lease uids",
    },
    Cap {
        name: "CAP_SETGID",
        bit: 6,
        why: "the VMM jail's per-lease gid",
    },
    Cap {
        name: "CAP_SETUID",
        bit: 7,
        why: "the VMM jail's per-lease uid",
    },
    Cap {
        name: "CAP_SETPCAP",
        bit: 8,
        why: "emptying the VMM's bounding set",
    },
    Cap {
        name: "CAP_NET_ADMIN",
        bit: 12,
        why: "guest taps and lease network namespaces",
    },
    Cap {
        name: "CAP_NET_RAW",
        bit: 13,
        why: "the guest port's packet socket",
    },
    Cap {
        name: "CAP_SYS_ADMIN",
        bit: 21,
        why: "lease network namespaces and the VMM jail's mount namespace",
    },
    Cap {
        name: "CAP_MKNOD",
        bit: 27,
        why: "device nodes in the VMM jail",
    },
];

/// The effective capability mask from the text of /proc/<pid>/status.
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// The capabilities of `need` missing from the mask `eff`.
pub fn missing(eff: u64, need: &[Cap]) -> Vec<Cap> {
    need.iter()
        .copied()
        .filter(|c| eff & (1u64 << c.bit) == 0)
        .collect()
}

/// The one line naming what is missing and how to get it.
fn caps_line(missing: &[Cap]) -> String {
    let names: Vec<&str> = missing.iter().map(|c| c.name).collect();
    let whys: Vec<String> = missing
        .iter()
        .map(|c| format!("{}: {}", c.name, c.why))
        .collect();
    format!(
        "the seller daemon lacks {} ({}); start it through cpushare-node.service, which grants them to user cpushare, or as root",
        names.join(", "),
        whys.join("; ")
    )
}

/// Who we run as, for messages: "user NAME (uid N)".
fn whoami() -> String {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let name = std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|p| {
            p.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 2 && f[2] == uid.to_string()).then(|| f[0].to_string())
            })
        })
        .unwrap_or_else(|| "?".into());
    format!("user {name} (uid {uid})")
}

/// Name of group `gid` from /etc/group, or the number.
fn group_name(gid: u32) -> String {
    std::fs::read_to_string("/etc/group")
        .ok()
        .and_then(|g| {
            g.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 2 && f[2] == gid.to_string()).then(|| f[0].to_string())
            })
        })
        .unwrap_or_else(|| gid.to_string())
}

/// Whether `dev` opens read-write; Err is the one-line reason it does not.
fn open_rw(dev: &Path) -> std::result::Result<(), String> {
    match OpenOptions::new().read(true).write(true).open(dev) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            Err(format!("{} does not exist", dev.display()))
        }
        Err(e) if e.kind() == ErrorKind::PermissionDenied => {
            let owner = std::fs::metadata(dev)
                .map(|m| {
                    format!(
                        "mode {:04o}, group {}",
                        m.mode() & 0o7777,
                        group_name(m.gid())
                    )
                })
                .unwrap_or_default();
            Err(format!(
                "{} cannot open {} ({owner})",
                whoami(),
                dev.display()
            ))
        }
        Err(e) => Err(format!("opening {}: {e}", dev.display())),
    }
}

/// What to do about /dev/kvm, from `seller.accel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmNeed {
    /// accel = "kvm": exit without it.
    Required,
    /// accel = "auto": fall back to TCG without it.
    Preferred,
    /// accel = "tcg": not used.
    Unused,
}

impl KvmNeed {
    pub fn of_accel(accel: Option<&str>) -> KvmNeed {
        match accel {
            Some("kvm") => KvmNeed::Required,
            Some("tcg") => KvmNeed::Unused,
            _ => KvmNeed::Preferred,
        }
    }
}

/// The checks, with the capability mask and device paths as inputs (tests pass
/// their own). Ok carries the warning to log, if any.
pub fn check_seller_with(
    eff: u64,
    tun: &Path,
    kvm: &Path,
    kvm_need: KvmNeed,
) -> Result<Option<String>> {
    let gone = missing(eff, SELLER_CAPS);
    if !gone.is_empty() {
        return Err(Error::Privilege(caps_line(&gone)));
    }
    if let Err(why) = open_rw(tun) {
        return Err(Error::Privilege(format!(
            "no access to {}: {why}; guests' taps are made through it (udev gives it mode 0666)",
            tun.display()
        )));
    }
    if kvm_need == KvmNeed::Unused {
        return Ok(None);
    }
    match open_rw(kvm) {
        Ok(()) => Ok(None),
        Err(why) if kvm_need == KvmNeed::Required => Err(Error::Privilege(format!(
            "no access to {}: {why}; seller.accel = \"kvm\" needs it (add the daemon's user to that group, or set seller.accel = \"auto\" to sell with TCG)",
            kvm.display()
        ))),
        Err(why) => Ok(Some(format!(
            "no access to {}: {why}; falling back to TCG (slower; add the daemon's user to that group for KVM)",
            kvm.display()
        ))),
    }
}

/// The start-time check of a seller daemon: Err exits with its one line; a KVM
/// fallback is logged as one warning line and returns true (sell TCG guests).
pub fn check_seller(accel: Option<&str>) -> Result<bool> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| Error::io("reading /proc/self/status for the capability check", e))?;
    let eff = parse_cap_eff(&status).ok_or_else(|| {
        Error::Privilege("no CapEff line in /proc/self/status: cannot check capabilities".into())
    })?;
    if let Some(w) = check_seller_with(
        eff,
        Path::new("/dev/net/tun"),
        Path::new("/dev/kvm"),
        KvmNeed::of_accel(accel),
    )? {
        warn!("{w}");
        return Ok(true);
    }
    Ok(false)
}

/// Empties our ambient capability set, so that no program we exec (a VMM run
/// without the jail, the KVM probe's qemu, ldd) inherits the daemon's capabilities:
/// they stay with this process, which needs them for lease namespaces, taps and the
/// jail's setup (done in a forked child before its exec, which drops them all).
/// Call while the process has one thread. Returns how many were ambient. A no-op
/// for root, whose children get every
/// capability through their uid anyway.
pub fn keep_from_children() -> Result<u32> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| Error::io("reading /proc/self/status", e))?;
    let amb = status
        .lines()
        .find_map(|l| l.strip_prefix("CapAmb:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    if amb == 0 {
        return Ok(0);
    }
    // SAFETY: prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL) takes no pointers and
    // only changes the calling thread's ambient set (per thread: the caller runs it
    // before any other thread exists, so every later thread inherits it empty).
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if r != 0 {
        return Err(Error::io(
            "clearing the ambient capabilities children would inherit",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(amb.count_ones())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> u64 {
        SELLER_CAPS.iter().fold(0, |m, c| m | 1 << c.bit)
    }

    #[test]
    fn cap_eff_is_read_from_status_text() {
        let s = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\nCapBnd:\t0\n";
        assert_eq!(parse_cap_eff(s), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name: x\n"), None);
        assert_eq!(parse_cap_eff("CapEff:\tzz\n"), None);
    }

    #[test]
    fn each_missing_capability_is_named_in_one_line() {
        let dev = tempfile::NamedTempFile::new().unwrap();
        for c in SELLER_CAPS {
            let err = check_seller_with(
                all() & !(1 << c.bit),
                dev.path(),
                dev.path(),
                KvmNeed::Preferred,
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains(c.name), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
            for other in SELLER_CAPS.iter().filter(|o| o.name != c.name) {
                assert!(!err.contains(&format!("{} ", other.name)), "{err}");
            }
        }
        assert!(
            check_seller_with(all(), dev.path(), dev.path(), KvmNeed::Required)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn kvm_missing_falls_back_or_exits_as_configured() {
        let dev = tempfile::NamedTempFile::new().unwrap();
        let gone = Path::new("/nonexistent/kvm");
        let w = check_seller_with(all(), dev.path(), gone, KvmNeed::Preferred)
            .unwrap()
            .unwrap();
        assert!(w.contains("/nonexistent/kvm") && w.contains("TCG"), "{w}");
        let e = check_seller_with(all(), dev.path(), gone, KvmNeed::Required)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/nonexistent/kvm") && e.contains("seller.accel"),
            "{e}"
        );
        assert!(check_seller_with(all(), dev.path(), gone, KvmNeed::Unused)
            .unwrap()
            .is_none());
        // Without the tun device there is no selling at all.
        let e = check_seller_with(all(), gone, dev.path(), KvmNeed::Unused)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/kvm"), "{e}");
    }

    /// The unit grants exactly these: ambient set and bounding set.
    #[test]
    fn the_unit_grants_exactly_the_capabilities_the_daemon_checks() {
        let unit = include_str!("../../packaging/cpushare-node.service");
        let mut want: Vec<&str> = SELLER_CAPS.iter().map(|c| c.name).collect();
        want.sort();
        for key in ["AmbientCapabilities=", "CapabilityBoundingSet="] {
            let mut got: Vec<&str> = unit
                .lines()
                .filter_map(|l| l.trim().strip_prefix(key))
                .flat_map(|v| v.split_whitespace())
                .collect();
            got.sort();
            assert_eq!(got, want, "{key} in packaging/cpushare-node.service");
        }
    }
}
