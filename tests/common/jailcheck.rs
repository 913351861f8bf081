//! What the kernel says about a jailed VMM (/proc): its credentials, namespaces and
//! root, checked the same way for qemu and for our microvm.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// One `Key:` field of a /proc status file, trimmed.
pub fn field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in a /proc status"))
        .trim()
        .to_string()
}

/// A process's or thread's /proc status (`/proc/PID/status`, `/proc/PID/task/TID/status`)
/// says: every uid is `uid`, no gid is root, no capability in any set, no_new_privs, a
/// seccomp filter. `who` names it in failures.
pub fn assert_unprivileged(status: &str, who: &str, uid: u32) {
    let uids = field(status, "Uid");
    assert!(
        uids.split_whitespace().all(|u| u == uid.to_string()),
        "{who}: uids {uids}, want {uid}"
    );
    let gids = field(status, "Gid");
    assert!(
        gids.split_whitespace().all(|g| g != "0"),
        "{who}: gids {gids}"
    );
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(status, cap), "0000000000000000", "{who}: {cap}");
    }
    assert_eq!(field(status, "NoNewPrivs"), "1", "{who}");
    assert_eq!(field(status, "Seccomp"), "2", "{who}: no seccomp filter");
}

fn ns_inode(pid: &str, kind: &str) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/ns/{kind}"))
        .unwrap()
        .ino()
}

/// `pid` has a mount namespace of its own and lives in the network namespace bound at
/// /run/netns/`netns`.
pub fn assert_own_mounts_in_netns(pid: u32, netns: &str) {
    assert_ne!(ns_inode(&pid.to_string(), "mnt"), ns_inode("self", "mnt"));
    assert_eq!(
        ns_inode(&pid.to_string(), "net"),
        std::fs::metadata(format!("/run/netns/{netns}"))
            .unwrap()
            .ino(),
        "not in the lease's network namespace"
    );
}

/// The root `pid` sees, after checking that none of the host's /home, /root, the build
/// tree, the host's processes (/proc) or `data_dir` is in it or mounted there. Returns
/// the root and its top-level names, sorted.
pub fn jail_root_hides_host(pid: u32, data_dir: &Path) -> (PathBuf, Vec<String>) {
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut top: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    eprintln!("jail root holds {top:?}");
    assert!(!root.join("home").exists(), "/home in the jail");
    assert!(!root.join("root").exists(), "/root in the jail");
    assert!(!root.join("work").exists(), "the build tree is in the jail");
    assert!(!root.join("proc/1").exists(), "/proc in the jail");
    let data_inside = root.join(data_dir.strip_prefix("/").unwrap());
    assert!(!data_inside.exists(), "the data dir is in the jail");
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    assert!(
        !mountinfo.contains(&data_dir.display().to_string()),
        "{mountinfo}"
    );
    assert!(!mountinfo.contains("/home"), "{mountinfo}");
    (root, top)
}
