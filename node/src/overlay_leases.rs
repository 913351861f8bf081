//! Lease namespaces (and their taps) made by `overlay attach --tap`, recorded in
//! the data dir while they exist, so a daemon restarted after `kill -9` or a
//! crash removes what its predecessor left behind.
//!
//! One file per namespace under `<data-dir>/overlay-leases/`, holding the
//! namespace's name, its tap and the namespace's inode. Names are global to the
//! host but inodes identify one namespace: the sweep only deletes a namespace
//! whose inode still matches, never a same-named one someone made since. The
//! sweep runs once the daemon holds the data dir's control socket, so it never
//! races a live daemon on the same data dir.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::mount::{umount2, MntFlags};
use overlay::io::{self as oio, NetNs};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::error::{Error, Result};

/// Where `ip netns` (and [`NetNs`]) keep named namespaces.
const NETNS_DIR: &str = "/run/netns";
/// Subdirectory of the data dir holding the records.
const RECORDS: &str = "overlay-leases";

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    netns: String,
    tap: String,
    netns_ino: u64,
}

/// True when `/run/netns/NAME` is an empty file with no namespace bound on it (from
/// here): the leftover mount point of a namespace whose binding is gone.
fn is_placeholder(name: &str) -> bool {
    let path = Path::new(NETNS_DIR).join(name);
    match nix::sys::statfs::statfs(&path) {
        Ok(fs) => fs.filesystem_type() != nix::sys::statfs::NSFS_MAGIC,
        Err(_) => false,
    }
}

fn netns_ino(name: &str) -> Option<u64> {
    std::fs::metadata(Path::new(NETNS_DIR).join(name))
        .ok()
        .map(|m| m.ino())
}

/// The record of one live lease namespace; dropping it deletes the record
/// (after its owner has removed the namespace).
#[derive(Debug)]
pub struct LeaseRecord {
    path: PathBuf,
}

impl LeaseRecord {
    /// Record that this daemon created namespace `ns` holding tap `tap`.
    pub fn create(data_dir: &Path, ns: &NetNs, tap: &str) -> Result<LeaseRecord> {
        let dir = data_dir.join(RECORDS);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let netns_ino = netns_ino(ns.name()).ok_or_else(|| {
            Error::io(
                format!("reading {NETNS_DIR}/{}", ns.name()),
                std::io::Error::from(std::io::ErrorKind::NotFound),
            )
        })?;
        let rec = Record {
            netns: ns.name().to_string(),
            tap: tap.to_string(),
            netns_ino,
        };
        let path = dir.join(format!("{}.json", ns.name()));
        let tmp = dir.join(format!(".{}.tmp", ns.name()));
        let body = serde_json::to_vec(&rec).expect("record serialises");
        std::fs::write(&tmp, body)
            .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        Ok(LeaseRecord { path })
    }
}

impl Drop for LeaseRecord {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Delete the namespace bound at `/run/netns/<name>` (what `ip netns del` does);
/// its interfaces go with it once nothing else holds it.
fn delete_netns(name: &str) -> std::io::Result<()> {
    let path = Path::new(NETNS_DIR).join(name);
    let _ = umount2(&path, MntFlags::MNT_DETACH);
    std::fs::remove_file(&path)
}

/// Remove lease namespaces and taps recorded by an earlier run of a daemon on
/// `data_dir` that did not clean up (killed, crashed). Returns the names of the
/// namespaces removed. Problems are logged, never fatal: a leftover must not
/// keep a seller from starting.
pub fn sweep(data_dir: &Path) -> Vec<String> {
    let dir = data_dir.join(RECORDS);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut swept = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some("json") {
            // A temp file of a record write that never finished.
            let _ = std::fs::remove_file(&path);
            continue;
        }
        let rec: Record = match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(r) => r,
            Err(err) => {
                warn!(file = %path.display(), error = %err, "unreadable lease record; removed");
                let _ = std::fs::remove_file(&path);
                continue;
            }
        };
        match netns_ino(&rec.netns) {
            None => {} // already gone
            Some(_) if is_placeholder(&rec.netns) => {
                // Only the mount point is left: the namespace was bound in a mount
                // namespace that died with our predecessor (a daemon started under
                // `ip netns exec` has a private one), and the kernel freed it then.
                let _ = std::fs::remove_file(Path::new(NETNS_DIR).join(&rec.netns));
                info!(netns = %rec.netns, "removed the mount point of a lease namespace that died with an earlier run");
                swept.push(rec.netns.clone());
            }
            Some(ino) if ino != rec.netns_ino => {
                warn!(netns = %rec.netns, "a namespace with a leftover lease's name exists but is not the one this daemon made; leaving it alone");
            }
            Some(_) => {
                if let (Ok(ns), false) = (NetNs::open(&rec.netns), rec.tap.is_empty()) {
                    if let Err(err) = oio::remove_guest_tap(&ns, &rec.tap) {
                        warn!(netns = %rec.netns, tap = %rec.tap, error = %err, "removing a leftover lease tap failed");
                    }
                }
                match delete_netns(&rec.netns) {
                    Ok(()) => {
                        info!(netns = %rec.netns, tap = %rec.tap, "removed a lease namespace left by an earlier run");
                        swept.push(rec.netns.clone());
                    }
                    Err(err) => {
                        // Keep the record: the next start tries again.
                        warn!(netns = %rec.netns, error = %err, "removing a leftover lease namespace failed; remove it with `ip netns del {}`", rec.netns);
                        continue;
                    }
                }
            }
        }
        let _ = std::fs::remove_file(&path);
    }
    swept
}

/// The records of this data dir's live lease namespaces: (namespace, tap).
fn records(data_dir: &Path) -> Vec<Record> {
    let Ok(entries) = std::fs::read_dir(data_dir.join(RECORDS)) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().extension().and_then(|x| x.to_str()) == Some("json"))
        .filter_map(|e| serde_json::from_slice::<Record>(&std::fs::read(e.path()).ok()?).ok())
        .collect()
}

/// Whether `netns` is a lease namespace the node of `data_dir` created and still
/// holds: a record names it and the namespace bound at its name is that one (same
/// inode), not a same-named namespace someone made since.
pub fn is_lease_netns(data_dir: &Path, netns: &str) -> bool {
    records(data_dir)
        .iter()
        .any(|r| r.netns == netns && netns_ino(netns) == Some(r.netns_ino))
}

/// The lease namespace holding guest tap `tap`, made by `overlay attach --tap` (or a
/// lease) of the node of `data_dir`.
pub fn netns_of_tap(data_dir: &Path, tap: &str) -> Option<String> {
    records(data_dir)
        .into_iter()
        .find(|r| r.tap == tap && netns_ino(&r.netns) == Some(r.netns_ino))
        .map(|r| r.netns)
}

/// Where this process's mounts stand relative to the host's (PID 1's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mounts {
    /// Same mount namespace as PID 1: namespaces bound under /run/netns are seen
    /// by every process.
    Host,
    /// Started in a private mount namespace (`ip netns exec` makes one) and moved
    /// into PID 1's, keeping its network namespace.
    Joined,
    /// In a private mount namespace it could not leave: a namespace bound here
    /// would be invisible to other processes (no VMM could open a guest tap in it).
    Private(String),
}

static MOUNTS: std::sync::OnceLock<Mounts> = std::sync::OnceLock::new();

fn mnt_ns_ino(pid: &str) -> std::io::Result<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/mnt")).map(|m| m.ino())
}

/// Call once at daemon start, while the process has one thread (`setns` into a
/// mount namespace refuses a process whose threads share its filesystem context).
/// A daemon started under `ip netns exec` runs in a private mount namespace: lease
/// namespaces it binds under /run/netns would exist only there. Moving into PID 1's
/// mount namespace keeps the network namespace (its sockets, its addresses) and
/// makes the lease namespaces visible to VMMs and to `ip netns`.
pub fn join_host_mounts() -> Mounts {
    let m = match (mnt_ns_ino("self"), mnt_ns_ino("1")) {
        (Ok(a), Ok(b)) if a == b => Mounts::Host,
        (Ok(_), Ok(_)) => match enter_pid1_mounts() {
            Ok(()) => {
                info!("this daemon was started in a private mount namespace (e.g. under `ip netns exec`): joined the host's, so its lease namespaces are visible to VMMs; its network namespace is unchanged");
                Mounts::Joined
            }
            Err(e) => {
                warn!(error = %e, "this daemon runs in a private mount namespace (e.g. under `ip netns exec`) and cannot join the host's: `overlay attach --tap` is refused");
                Mounts::Private(e.to_string())
            }
        },
        // No /proc or no access to PID 1: nothing to compare; assume shared.
        _ => Mounts::Host,
    };
    let _ = MOUNTS.set(m.clone());
    m
}

fn enter_pid1_mounts() -> std::io::Result<()> {
    use nix::sched::{setns, CloneFlags};
    // setns puts the working directory at the new root: keep ours (relative paths).
    let cwd = std::env::current_dir()?;
    let f = std::fs::File::open("/proc/1/ns/mnt")?;
    setns(&f, CloneFlags::CLONE_NEWNS).map_err(std::io::Error::from)?;
    std::env::set_current_dir(&cwd).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "{} does not exist in the host's mount namespace: {e}",
                cwd.display()
            ),
        )
    })
}

/// Refuses to make a lease namespace that nobody else could see.
pub fn check_visible() -> Result<()> {
    match MOUNTS.get() {
        Some(Mounts::Private(why)) => Err(Error::BadArg {
            what: "--tap",
            reason: format!(
                "this daemon runs in a private mount namespace (started under `ip netns exec`?) \
                 and could not join the host's ({why}): a lease namespace it made would be \
                 invisible to every other process, so no VMM could open the guest tap. Start \
                 the daemon outside `ip netns exec` (as root), or run it with nsenter --net=... \
                 which keeps the host's mounts"
            ),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_drops_records_of_vanished_namespaces_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let rec = dir.path().join(RECORDS);
        std::fs::create_dir_all(&rec).unwrap();
        let gone = Record {
            netns: "cvs-never-existed-xyz".into(),
            tap: "cvsnotap".into(),
            netns_ino: 1,
        };
        std::fs::write(
            rec.join("cvs-never-existed-xyz.json"),
            serde_json::to_vec(&gone).unwrap(),
        )
        .unwrap();
        std::fs::write(rec.join("junk.json"), b"{not json").unwrap();
        std::fs::write(rec.join(".half.tmp"), b"x").unwrap();
        assert!(sweep(dir.path()).is_empty());
        assert_eq!(std::fs::read_dir(&rec).unwrap().count(), 0);
        // No records directory at all: nothing to do.
        assert!(sweep(&dir.path().join("nope")).is_empty());
    }
}
