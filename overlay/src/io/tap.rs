//! tap devices through /dev/net/tun ioctls (IFF_TAP | IFF_NO_PI, optionally
//! IFF_VNET_HDR with checksum/TSO offloads so one read can carry a 64 KiB TCP burst).
//! The ioctls themselves are the `tapdev` crate's, which the VMM shares.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::sys;

/// An open tap device. The interface disappears when the last fd closes (unless
/// made persistent).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    vnet_hdr: bool,
}

/// How to open a tap.
#[derive(Debug, Clone, Copy, Default)]
pub struct TapOptions {
    /// Prefix every frame with a virtio_net_hdr and let the kernel hand us
    /// checksum-partial TCP superframes (we segment them, see `offload`).
    pub offload: bool,
}

impl Tap {
    /// Create (or attach to an existing persistent) tap `name` in the calling thread's
    /// network namespace.
    pub fn create(name: &str, opts: TapOptions) -> io::Result<Tap> {
        let file = tapdev::open_tap(name, opts.offload)?;
        if opts.offload {
            tapdev::set_vnet_hdr_size(&file, super::offload::VNET_HDR_LEN)?;
            let off = tapdev::TUN_F_CSUM | tapdev::TUN_F_TSO4 | tapdev::TUN_F_TSO6;
            tapdev::set_offload(&file, off).map_err(|e| {
                io::Error::new(e.kind(), format!("enabling offloads on tap {name:?}: {e}"))
            })?;
        }
        Ok(Tap {
            file,
            name: name.to_string(),
            vnet_hdr: opts.offload,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Frames carry a leading virtio_net_hdr.
    pub fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    /// Keep the interface after the fd closes (so a VMM can open it by name).
    pub fn set_persist(&self, on: bool) -> io::Result<()> {
        Ok(tapdev::set_persist(&self.file, on)?)
    }

    pub fn set_nonblocking(&self, nb: bool) -> io::Result<()> {
        sys::set_nonblocking(self.file.as_raw_fd(), nb)
    }

    /// Read one frame (with its virtio_net_hdr when `vnet_hdr()`).
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Write one frame (with its virtio_net_hdr when `vnet_hdr()`).
    pub fn write(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }

    /// Hand over the device fd (e.g. to a VMM).
    pub fn into_fd(self) -> OwnedFd {
        self.file.into()
    }

    /// A second handle on the same queue, for a reader and a writer thread.
    pub fn try_clone(&self) -> io::Result<Tap> {
        Ok(Tap {
            file: self.file.try_clone()?,
            name: self.name.clone(),
            vnet_hdr: self.vnet_hdr,
        })
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
