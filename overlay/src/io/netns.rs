//! Named network namespaces (the `ip netns` layout under /run/netns) and running code
//! inside one on a short-lived thread: a socket opened there stays in that namespace.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

const NETNS_DIR: &str = "/run/netns";

/// A named network namespace. Dropping one that [`NetNs::create`] made deletes it.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    path: PathBuf,
    owned: bool,
}

fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        || name.starts_with('.')
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid network namespace name {name:?}: use letters, digits, '-', '_', '.'"),
        ));
    }
    Ok(())
}

fn ensure_netns_dir() -> io::Result<()> {
    std::fs::create_dir_all(NETNS_DIR)?;
    // Like iproute2: make /run/netns a shared mount so namespaces bound here show up in
    // other mount namespaces too. Failure only limits visibility, so it is not fatal.
    if mount(
        None::<&str>,
        NETNS_DIR,
        None::<&str>,
        MsFlags::MS_SHARED | MsFlags::MS_REC,
        None::<&str>,
    )
    .is_err()
    {
        let _ = mount(
            Some(NETNS_DIR),
            NETNS_DIR,
            Some("none"),
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        );
        let _ = mount(
            None::<&str>,
            NETNS_DIR,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        );
    }
    Ok(())
}

fn perm_hint(e: io::Error, what: &str) -> io::Error {
    if e.kind() == io::ErrorKind::PermissionDenied || e.raw_os_error() == Some(libc::EPERM) {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{what}: permission denied (needs root or CAP_SYS_ADMIN + CAP_NET_ADMIN)"),
        )
    } else {
        io::Error::new(e.kind(), format!("{what}: {e}"))
    }
}

impl NetNs {
    /// Create a new, empty network namespace `name` (fails if it exists).
    pub fn create(name: &str) -> io::Result<NetNs> {
        check_name(name)?;
        ensure_netns_dir().map_err(|e| perm_hint(e, "creating /run/netns"))?;
        let path = Path::new(NETNS_DIR).join(name);
        File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("network namespace {name:?} already exists"),
                    )
                } else {
                    perm_hint(e, &format!("creating {}", path.display()))
                }
            })?;
        let p2 = path.clone();
        let r = std::thread::spawn(move || -> io::Result<()> {
            unshare(CloneFlags::CLONE_NEWNET)
                .map_err(|e| perm_hint(e.into(), "unshare(CLONE_NEWNET)"))?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &p2,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| perm_hint(e.into(), "binding the new network namespace"))
        })
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?;
        if let Err(e) = r {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(NetNs {
            name: name.to_string(),
            path,
            owned: true,
        })
    }

    /// An existing namespace (e.g. made by `ip netns add`); dropping it leaves it alone.
    pub fn open(name: &str) -> io::Result<NetNs> {
        check_name(name)?;
        let path = Path::new(NETNS_DIR).join(name);
        if !path.exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no network namespace named {name:?} (see `ip netns list`)"),
            ));
        }
        Ok(NetNs {
            name: name.to_string(),
            path,
            owned: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether dropping this handle deletes the namespace.
    pub fn owned(&self) -> bool {
        self.owned
    }

    /// Run `f` on a fresh thread that has joined this namespace; sockets and devices
    /// it opens belong to the namespace. The thread ends when `f` returns.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let ns = File::open(&self.path)
            .map_err(|e| perm_hint(e, &format!("opening {}", self.path.display())))?;
        let name = self.name.clone();
        std::thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn(move || {
                setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| {
                    perm_hint(e.into(), &format!("entering network namespace {name:?}"))
                })?;
                f()
            })?
            .join()
            .map_err(|_| io::Error::other("netns thread panicked"))?
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if self.owned {
            let _ = umount2(&self.path, MntFlags::MNT_DETACH);
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
