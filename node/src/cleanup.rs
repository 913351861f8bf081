//! The seller's guest jails, and what a run that ended without cleaning up (kill -9,
//! crash, power loss) left behind.
//!
//! Each jailed guest is recorded in `<data-dir>/jails/<name>.json` (its cgroup
//! directories and uid) from before its VMM starts until its jail is torn down. At
//! start, holding the data dir's control socket (so no live daemon shares it), the
//! daemon kills whatever still runs in a recorded cgroup, removes the cgroup, and
//! deletes the guests' leftover temp files; lease namespaces and taps are swept by
//! `overlay_leases`. Only then does the seller offer again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use vm::jail::{Group, JailSettings, Jailer};

use crate::cli::OnOff;
use crate::config::Settings;
use crate::error::{Error, Result};

/// Subdirectory of the data dir holding the jail records.
const RECORDS: &str = "jails";

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    name: String,
    uid: u32,
    group: Group,
}

/// The record of one live jail; dropping it deletes the record (after the jail
/// itself has been torn down).
#[derive(Debug)]
pub struct JailRecord {
    path: PathBuf,
}

impl JailRecord {
    pub fn create(data_dir: &Path, name: &str, uid: u32, group: &Group) -> Result<JailRecord> {
        let dir = data_dir.join(RECORDS);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let rec = Record {
            name: name.to_string(),
            uid,
            group: group.clone(),
        };
        let path = dir.join(format!("{name}.json"));
        let tmp = dir.join(format!(".{name}.tmp"));
        let body = serde_json::to_vec(&rec).expect("record serialises");
        std::fs::write(&tmp, body)
            .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        Ok(JailRecord { path })
    }
}

impl Drop for JailRecord {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What [`sweep`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Swept {
    /// Processes killed in leftover guest cgroups (VMMs that outlived the daemon).
    pub vmm_processes: usize,
    /// Guest cgroups removed.
    pub cgroups: usize,
    /// Leftover guest temp files removed.
    pub temp_files: usize,
}

/// Removes leftover guest processes, cgroups and temp files of an earlier run on
/// `data_dir`. Problems are logged, never fatal.
pub fn sweep(data_dir: &Path) -> Swept {
    let mut swept = Swept::default();
    if let Ok(entries) = std::fs::read_dir(data_dir.join(RECORDS)) {
        // The records name cgroup directories under /sys/fs/cgroup: in a mount
        // namespace without them, detecting the layout mounts them there again.
        if let Err(e) = vm::jail::Layout::detect() {
            warn!(error = %e, "cgroup hierarchies not found; leftover guest cgroups stay");
        }
        for e in entries.flatten() {
            let path = e.path();
            let rec = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Record>(&b).map_err(|e| e.to_string()));
            match rec {
                Ok(rec) => match rec.group.destroy(Duration::from_secs(10)) {
                    Ok(killed) => {
                        swept.vmm_processes += killed;
                        swept.cgroups += 1;
                        info!(guest = %rec.name, uid = rec.uid, killed, "removed a guest jail left by an earlier run");
                    }
                    Err(err) => {
                        warn!(guest = %rec.name, error = %err, "removing a leftover guest jail failed");
                        continue; // keep the record: the next start tries again
                    }
                },
                Err(err) => {
                    warn!(file = %path.display(), error = %err, "unreadable jail record; removed")
                }
            }
            let _ = std::fs::remove_file(&path);
        }
    }
    let tmp = data_dir.join("vm-tmp");
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        for e in entries.flatten() {
            let p = e.path();
            let gone = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            match gone {
                Ok(()) => swept.temp_files += 1,
                Err(err) => {
                    warn!(file = %p.display(), error = %err, "removing a leftover guest file")
                }
            }
        }
    }
    swept
}

/// The jail settings a seller's config asks for; `None` when jailing is off.
pub fn jail_settings(settings: &Settings) -> Result<Option<JailSettings>> {
    let t = &settings.seller;
    if t.jail == Some(OnOff::Off) {
        return Ok(None);
    }
    let mut s = JailSettings::new(settings.data_dir.join("jail-root"));
    if let Some(base) = t.jail_uid_base {
        if base == 0 {
            return Err(Error::BadArg {
                what: "seller.jail_uid_base",
                reason: "0 is root: reserve a range of unused ids, e.g. 400000".into(),
            });
        }
        s.uid_base = base;
    }
    if let Some(n) = t.jail_uid_count {
        s.uid_count = n.max(1);
    }
    if let Some(p) = t.max_cpu_percent {
        if !(1..=100).contains(&p) {
            return Err(Error::BadArg {
                what: "seller.max_cpu_percent",
                reason: format!("{p}: use 1 to 100"),
            });
        }
        s.max_cpu_percent = Some(p);
    }
    Ok(Some(s))
}

/// One jailer per data dir (a test may run several daemons' worth in one process).
fn jailers() -> &'static Mutex<HashMap<PathBuf, std::result::Result<Jailer, String>>> {
    static J: OnceLock<Mutex<HashMap<PathBuf, std::result::Result<Jailer, String>>>> =
        OnceLock::new();
    J.get_or_init(Default::default)
}

/// The seller's jailer (`None` with `jail = "off"`), set up on first use; an error
/// says what is missing, once per lease.
pub fn jailer(settings: &Settings) -> Result<Option<Jailer>> {
    let Some(js) = jail_settings(settings)? else {
        return Ok(None);
    };
    let mut map = jailers().lock().unwrap_or_else(|p| p.into_inner());
    let entry = map
        .entry(settings.data_dir.clone())
        .or_insert_with(|| Jailer::new(&js).map_err(|e| e.to_string()));
    match entry {
        Ok(j) => Ok(Some(j.clone())),
        Err(e) => Err(Error::Market(e.clone())),
    }
}

/// At daemon start: sweep what an earlier run left, then set up the jail so that a
/// missing privilege is reported now, in one line, not at the first lease.
pub fn at_start(settings: &Settings, seller: bool) {
    let swept = sweep(&settings.data_dir);
    if swept != Swept::default() {
        info!(?swept, "removed leftovers of an earlier run");
    }
    if !seller {
        return;
    }
    match jailer(settings) {
        Ok(Some(j)) => info!(v2 = j.is_v2(), "guests run jailed"),
        Ok(None) => warn!("seller.jail is off: guests' VMMs run with the daemon's privileges"),
        Err(e) => tracing::error!("{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_removes_temp_files_and_garbage_records() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("vm-tmp/sub")).unwrap();
        std::fs::write(dir.path().join("vm-tmp/a"), b"x").unwrap();
        std::fs::create_dir_all(dir.path().join(RECORDS)).unwrap();
        std::fs::write(dir.path().join(RECORDS).join("x.json"), b"not json").unwrap();
        // A record of a cgroup that is already gone counts as removed.
        let gone = Group {
            dirs: vec![vm::jail::cgroup::GroupDir {
                path: dir.path().join("no-such-cgroup"),
                v2: true,
            }],
        };
        let rec = JailRecord::create(dir.path(), "lease-1", 400_001, &gone).unwrap();
        std::mem::forget(rec); // as if the daemon had been killed
        let s = sweep(dir.path());
        assert_eq!(
            s,
            Swept {
                vmm_processes: 0,
                cgroups: 1,
                temp_files: 2
            }
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join(RECORDS)).unwrap().count(),
            0
        );
        assert_eq!(sweep(dir.path()), Swept::default());
    }
}
