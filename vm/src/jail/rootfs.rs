//! The jail's root file system: a small tmpfs holding only what the VMM needs (its
//! binary and shared libraries, its firmware directories, the guest's boot files,
//! three device nodes), everything read-only. Planned here in the parent, with every
//! path already a C string, because the child between fork and exec may not allocate.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// One step of building the root, with host paths (sources) and paths under the
/// jail root's mount point (targets).
#[derive(Debug, Clone)]
pub enum Entry {
    /// mkdir (its parents come first in the plan).
    Dir(CString),
    /// Bind a file read-only onto an empty file created at the target.
    BindFile { src: CString, dst: CString },
    /// Bind a directory tree read-only.
    BindDir { src: CString, dst: CString },
    /// Copy `len` bytes of the open file `src_fd` into a new read-only file (the
    /// guest's kernel and initrd: copies, so the jail shows no host path of them).
    CopyFile {
        src_fd: std::os::fd::RawFd,
        len: u64,
        dst: CString,
    },
    /// A character device node, owned by `owner` (uid, gid) if given.
    Dev {
        dst: CString,
        rdev: libc::dev_t,
        mode: libc::mode_t,
        owner: Option<(u32, u32)>,
    },
}

/// The ordered steps, for one jail root mount point.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub entries: Vec<Entry>,
    dirs: Vec<PathBuf>,
    copied: u64,
}

fn cstr(p: &Path) -> CString {
    // Paths come from the file system or from our own literals: no NUL bytes.
    CString::new(p.as_os_str().as_bytes()).unwrap_or_else(|_| c"/nonexistent".into())
}

impl Plan {
    fn target(root: &Path, inside: &Path) -> PathBuf {
        root.join(inside.strip_prefix("/").unwrap_or(inside))
    }

    fn ensure_dirs(&mut self, root: &Path, inside_dir: &Path) {
        let mut chain: Vec<&Path> = inside_dir.ancestors().collect();
        chain.reverse();
        for d in chain {
            if d == Path::new("/") || d.as_os_str().is_empty() || self.dirs.iter().any(|x| x == d) {
                continue;
            }
            self.dirs.push(d.to_path_buf());
            self.entries.push(Entry::Dir(cstr(&Self::target(root, d))));
        }
    }

    /// Bind host file `src` read-only at `inside` in the jail.
    pub fn file(&mut self, root: &Path, src: &Path, inside: &Path) {
        if let Some(parent) = inside.parent() {
            self.ensure_dirs(root, parent);
        }
        self.entries.push(Entry::BindFile {
            src: cstr(src),
            dst: cstr(&Self::target(root, inside)),
        });
    }

    /// Copy the open file `fd` (`len` bytes) to `inside` in the jail.
    pub fn copy(&mut self, root: &Path, fd: std::os::fd::RawFd, len: u64, inside: &Path) {
        if let Some(parent) = inside.parent() {
            self.ensure_dirs(root, parent);
        }
        self.copied += len;
        self.entries.push(Entry::CopyFile {
            src_fd: fd,
            len,
            dst: cstr(&Self::target(root, inside)),
        });
    }

    /// Bytes of copied files: the jail's tmpfs must hold them.
    pub fn copied_bytes(&self) -> u64 {
        self.copied
    }

    /// Bind host directory `dir` read-only at the same path in the jail.
    pub fn dir(&mut self, root: &Path, dir: &Path) {
        self.ensure_dirs(root, dir);
        self.entries.push(Entry::BindDir {
            src: cstr(dir),
            dst: cstr(&Self::target(root, dir)),
        });
    }

    /// A device node like host `dev` at the same path in the jail.
    pub fn device(
        &mut self,
        root: &Path,
        dev: &Path,
        owner: Option<(u32, u32)>,
    ) -> std::io::Result<()> {
        let meta = std::fs::metadata(dev)?;
        if !meta.file_type().is_char_device() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is not a character device", dev.display()),
            ));
        }
        if let Some(parent) = dev.parent() {
            self.ensure_dirs(root, parent);
        }
        let mode = if owner.is_some() { 0o600 } else { 0o666 };
        self.entries.push(Entry::Dev {
            dst: cstr(&Self::target(root, dev)),
            rdev: meta.rdev() as libc::dev_t,
            mode,
            owner,
        });
        Ok(())
    }
}

/// The shared libraries `ldd` says `binary` loads (and the dynamic loader).
pub fn libraries(binary: &Path) -> std::io::Result<Vec<PathBuf>> {
    let out = std::process::Command::new("ldd")
        .arg(binary)
        .env_clear()
        .output()
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("running ldd on {}: {e}", binary.display()),
            )
        })?;
    // A static binary: ldd says so and exits non-zero; it needs no libraries.
    Ok(parse_ldd(&String::from_utf8_lossy(&out.stdout)))
}

/// The absolute paths in `ldd` output: `name => /path (addr)` and `/path (addr)`.
pub fn parse_ldd(text: &str) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((_, right)) => right.trim(),
            None => line,
        };
        let path = path.split(" (").next().unwrap_or("").trim();
        if path.starts_with('/') && !v.iter().any(|p: &PathBuf| p.as_os_str() == path) {
            v.push(PathBuf::from(path));
        }
    }
    v
}

/// Where distributions keep qemu's loadable modules: Debian's qemu 7.2 builds TCG
/// itself as one (`accel-tcg-x86_64.so`), so a jail without it cannot run TCG.
const QEMU_MODULE_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/qemu",
    "/usr/lib64/qemu",
    "/usr/lib/qemu",
];

/// qemu's firmware search directories (`qemu -L help`) and module directories that
/// exist here.
pub fn qemu_data_dirs(binary: &Path) -> Vec<PathBuf> {
    let modules = QEMU_MODULE_DIRS
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.is_dir());
    let Ok(out) = std::process::Command::new(binary)
        .args(["-L", "help"])
        .env_clear()
        .output()
    else {
        return modules.collect();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| PathBuf::from(l.trim()))
        .filter(|p| p.is_absolute() && p.is_dir())
        .chain(modules)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_library_and_loader_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ff88100d000)\n\
                    \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f)\n\
                    \tlibgone.so => not found\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007ff8)\n\
                    \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(parse_ldd("\tnot a dynamic executable\n").is_empty());
    }

    #[test]
    fn plan_creates_each_parent_once_before_its_children() {
        let mut p = Plan::default();
        let root = Path::new("/r");
        p.file(
            root,
            Path::new("/host/libz.so"),
            Path::new("/lib/x/libz.so"),
        );
        p.file(
            root,
            Path::new("/host/liby.so"),
            Path::new("/lib/x/liby.so"),
        );
        p.dir(root, Path::new("/usr/share/qemu"));
        let dirs: Vec<String> = p
            .entries
            .iter()
            .filter_map(|e| match e {
                Entry::Dir(d) => Some(d.to_string_lossy().into_owned()),
                _ => None,
            })
            .collect();
        assert_eq!(
            dirs,
            [
                "/r/lib",
                "/r/lib/x",
                "/r/usr",
                "/r/usr/share",
                "/r/usr/share/qemu"
            ]
        );
        assert!(
            matches!(&p.entries[2], Entry::BindFile { dst, .. } if dst.to_str() == Ok("/r/lib/x/libz.so"))
        );
    }
}
