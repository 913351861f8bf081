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

/// Where this process's mounts stand relative to those of the process that started
/// it (its nearest ancestor in another mount namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mounts {
    /// Namespaces bound under /run/netns here are seen by the rest of the host: same
    /// mount namespace as the launcher, or /run/netns propagates to it.
    Host,
    /// Started in a private mount namespace whose /run/netns does not propagate back
    /// (`ip netns exec` makes one) and moved into the launcher's, keeping its network
    /// namespace.
    Joined,
    /// In such a private mount namespace and could not leave it: a namespace bound
    /// here would be invisible to other processes (no VMM could open a guest tap).
    Private(String),
}

static MOUNTS: std::sync::OnceLock<Mounts> = std::sync::OnceLock::new();

fn mnt_ns_ino(pid: &str) -> std::io::Result<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/mnt")).map(|m| m.ino())
}

fn parent_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The nearest ancestor whose mount namespace differs from ours (`own`), skipping
/// those we may not inspect; `None` when every readable one shares ours.
fn launcher(own: u64) -> Option<u32> {
    let mut pid = std::os::unix::process::parent_id();
    // A bound walk: a ppid chain is short, but /proc can change under us.
    for _ in 0..64 {
        if pid == 0 {
            return None;
        }
        if mnt_ns_ino(&pid.to_string()).is_ok_and(|ino| ino != own) {
            return Some(pid);
        }
        if pid == 1 {
            return None;
        }
        pid = parent_of(pid)?;
    }
    None
}

/// The shared peer group of the mount holding `path`, from a `mountinfo` text: the
/// last-listed mount whose mount point is the longest prefix of `path`. `None` when
/// that mount is not shared (private, or only a slave: `ip netns exec` makes every
/// mount a slave, so binds made under it never reach its master).
pub(crate) fn peer_group(mountinfo: &str, path: &str) -> Option<u64> {
    let under = |mp: &str| {
        mp == "/"
            || path == mp
            || path
                .strip_prefix(mp)
                .is_some_and(|rest| rest.starts_with('/'))
    };
    let mut best: Option<(usize, Option<u64>)> = None;
    for line in mountinfo.lines() {
        let mut fields = line.split(' ');
        let Some(mp) = fields.nth(4) else { continue };
        // Spaces and the like are octal-escaped (\040); /run/netns has none.
        if !under(mp) {
            continue;
        }
        let group = fields
            .skip(1)
            .take_while(|f| *f != "-")
            .find_map(|f| f.strip_prefix("shared:"))
            .and_then(|n| n.parse().ok());
        if best.is_none_or(|(len, _)| mp.len() >= len) {
            best = Some((mp.len(), group));
        }
    }
    best.and_then(|(_, g)| g)
}

/// Whether a bind under /run/netns made in our mount namespace reaches `launcher`'s:
/// both hold it in the same shared peer group.
fn propagates_to(launcher: u32) -> bool {
    let read = |pid: &str| std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok();
    match (read("self"), read(&launcher.to_string())) {
        (Some(ours), Some(theirs)) => {
            let g = peer_group(&ours, NETNS_DIR);
            g.is_some() && g == peer_group(&theirs, NETNS_DIR)
        }
        _ => false,
    }
}

/// Call once at daemon start, while the process has one thread (`setns` into a
/// mount namespace refuses a process whose threads share its filesystem context).
/// A daemon started under `ip netns exec` runs in a private mount namespace whose
/// mounts are slaves: lease namespaces it binds under /run/netns would exist only
/// there. Moving into the mount namespace of the process that started it (the
/// nearest ancestor in another one) keeps the network namespace (its sockets, its
/// addresses) and makes the lease namespaces visible to VMMs and to `ip netns`.
pub fn join_host_mounts() -> Mounts {
    let m = match mnt_ns_ino("self").ok().and_then(launcher) {
        // Same namespace as every ancestor we can see, or no /proc: nothing to join.
        None => Mounts::Host,
        Some(pid) if propagates_to(pid) => Mounts::Host,
        Some(pid) => match enter_mounts_of(pid) {
            Ok(()) => {
                info!(launcher = pid, "this daemon was started in a private mount namespace (e.g. under `ip netns exec`): joined its launcher's, so its lease namespaces are visible to VMMs; its network namespace is unchanged");
                Mounts::Joined
            }
            Err(e) => {
                warn!(launcher = pid, error = %e, "this daemon runs in a private mount namespace (e.g. under `ip netns exec`) and cannot join its launcher's: `overlay attach --tap` is refused");
                Mounts::Private(e.to_string())
            }
        },
    };
    let _ = MOUNTS.set(m.clone());
    m
}

fn enter_mounts_of(pid: u32) -> std::io::Result<()> {
    use nix::sched::{setns, CloneFlags};
    // setns puts the working directory at the new root: keep ours (relative paths).
    let cwd = std::env::current_dir()?;
    let f = std::fs::File::open(format!("/proc/{pid}/ns/mnt"))?;
    setns(&f, CloneFlags::CLONE_NEWNS).map_err(std::io::Error::from)?;
    std::env::set_current_dir(&cwd).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "{} does not exist in the launcher's mount namespace: {e}",
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
                 and could not join the mount namespace of the process that started it ({why}): a lease namespace it made would be \
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

    /// Lines as `ip netns exec` leaves them (slave /run/netns) and as the host has
    /// them (shared), trimmed to the fields that matter.
    #[test]
    fn peer_group_of_the_mount_holding_run_netns() {
        let host = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
                    45 27 254:0 /run/netns /run/netns rw,relatime shared:1 - ext4 /dev/vda rw\n";
        let exec = "51 50 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
                    71 51 254:0 /run/netns /run/netns rw,relatime master:1 - ext4 /dev/vda rw\n";
        assert_eq!(peer_group(host, NETNS_DIR), Some(1));
        assert_eq!(peer_group(exec, NETNS_DIR), None);
        // systemd's namespaces: a slave that is also shared, in a group of its own.
        let unit = "80 79 0:5 / / rw shared:9 master:1 - ext4 /dev/vda rw\n";
        assert_eq!(peer_group(unit, NETNS_DIR), Some(9));
        // No /run/netns mount: the one holding it counts; /run is not /runner.
        let run = "1 0 0:1 / / rw shared:3 - ext4 a rw\n\
                   2 1 0:2 / /runner rw shared:4 - tmpfs b rw\n\
                   3 1 0:3 / /run rw shared:5 - tmpfs c rw\n";
        assert_eq!(peer_group(run, NETNS_DIR), Some(5));
        // Over-mounted: the last listed wins; a `-` separator ends the tags.
        let over = "3 1 0:3 / /run rw shared:5 - tmpfs c rw\n\
                    4 1 0:4 / /run rw - tmpfs shared:7 rw\n";
        assert_eq!(peer_group(over, NETNS_DIR), None);
        assert_eq!(peer_group("", NETNS_DIR), None);
    }
}
