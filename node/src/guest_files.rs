//! What a guest boots from an image in the chunk store: the image materialised into
//! unlinked temp files (never a RAM copy), and the boot mode its manifest asks for.
//! `vm run --image` and the seller's leases both use this.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use vm::Boot;

use crate::error::{Error, Result};

/// What to boot, plus files that must stay open while the guest runs.
pub struct Prepared {
    pub boot: Boot,
    pub disk: Option<File>,
    pub keep: Vec<File>,
    /// The materialised files' bytes, counted against the store's disk cap until
    /// dropped (with the files).
    pub reserved: Vec<chunks::Reservation>,
}

/// A path under which another process (qemu) can open a file we hold open, even
/// once it is unlinked.
pub fn fd_path(f: &File) -> PathBuf {
    PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), f.as_raw_fd()))
}

/// Materialises image `id` from `store` into unlinked files under `tmp`. `cap`
/// refuses a disk larger than it; `append` replaces a direct-boot image's command line.
pub fn from_store(
    store: &chunks::ChunkStore,
    id: chunks::ImageId,
    tmp: &Path,
    cap: Option<u64>,
    append: Option<String>,
) -> Result<Prepared> {
    let signed = store.get_manifest(id)?.ok_or_else(|| Error::BadArg {
        what: "--image",
        reason: format!("image {id} is not in the store (import or fetch it first)"),
    })?;
    let _pin = store.pin_temp(id)?;
    let m = signed.manifest();
    tracing::info!(image = %id, name = %m.name, "materialising image");
    let mut reserved = Vec::new();
    let mut take = |m: chunks::Materialized| {
        reserved.push(m.reservation);
        m.file
    };
    let disk = match m.disk_range() {
        Some(_) => Some(take(chunks::materialize_reserved(store, id, tmp, cap)?)),
        None => None,
    };
    let mut keep = Vec::new();
    let boot = if let Some(b) = &m.boot {
        let kernel = take(chunks::materialize_range_reserved(
            store, id, b.kernel, tmp, None,
        )?);
        let initrd = match b.initrd {
            Some(r) => Some(take(chunks::materialize_range_reserved(
                store, id, r, tmp, None,
            )?)),
            None => None,
        };
        let boot = Boot::Direct {
            kernel: fd_path(&kernel),
            initrd: initrd.as_ref().map(fd_path),
            cmdline: append.unwrap_or_else(|| b.cmdline.clone()),
        };
        keep.push(kernel);
        keep.extend(initrd);
        boot
    } else if m.format == chunks::ImageFormat::Iso {
        // The ISO is the image itself; firmware boots it as a CD.
        let iso = disk.ok_or_else(|| Error::BadArg {
            what: "--image",
            reason: "ISO image without data".into(),
        })?;
        let boot = Boot::Iso { iso: fd_path(&iso) };
        keep.push(iso);
        return Ok(Prepared {
            boot,
            disk: None,
            keep,
            reserved,
        });
    } else {
        Boot::Disk
    };
    Ok(Prepared {
        boot,
        disk,
        keep,
        reserved,
    })
}

/// Where a data dir keeps the temp files of running guests.
pub fn tmp_dir(data_dir: &Path) -> Result<PathBuf> {
    let tmp = data_dir.join("vm-tmp");
    std::fs::create_dir_all(&tmp)
        .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
    Ok(tmp)
}
