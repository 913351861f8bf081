//! tap devices through /dev/net/tun ioctls (IFF_TAP | IFF_NO_PI, optionally
//! IFF_VNET_HDR with checksum/TSO offloads so one read can carry a 64 KiB TCP burst).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::sys::{self, IfReq};

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

fn open_tun() -> io::Result<File> {
    File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => io::Error::new(
                io::ErrorKind::NotFound,
                "/dev/net/tun does not exist: load the tun module (`modprobe tun`) or give the container the device",
            ),
            io::ErrorKind::PermissionDenied => io::Error::new(
                io::ErrorKind::PermissionDenied,
                "cannot open /dev/net/tun: permission denied (needs root or CAP_NET_ADMIN)",
            ),
            _ => io::Error::new(e.kind(), format!("opening /dev/net/tun: {e}")),
        })
}

impl Tap {
    /// Create (or attach to an existing persistent) tap `name` in the calling thread's
    /// network namespace.
    pub fn create(name: &str, opts: TapOptions) -> io::Result<Tap> {
        let file = open_tun()?;
        let mut req = IfReq::new(name)?;
        let mut flags = sys::IFF_TAP | sys::IFF_NO_PI;
        if opts.offload {
            flags |= sys::IFF_VNET_HDR;
        }
        req.data.flags = flags;
        // SAFETY: ifreq is valid for TUNSETIFF.
        unsafe { sys::ioctl_ptr(file.as_raw_fd(), sys::TUNSETIFF, &mut req) }.map_err(|e| {
            match e.raw_os_error() {
                Some(libc::EPERM) => io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("creating tap {name:?}: operation not permitted (needs CAP_NET_ADMIN)"),
                ),
                Some(libc::EBUSY) | Some(libc::EINVAL) => io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("creating tap {name:?}: the name is taken by another interface or an open tap"),
                ),
                _ => io::Error::new(e.kind(), format!("creating tap {name:?}: {e}")),
            }
        })?;
        if opts.offload {
            let sz: libc::c_int = super::offload::VNET_HDR_LEN as libc::c_int;
            let mut sz2 = sz;
            // SAFETY: int argument.
            unsafe { sys::ioctl_ptr(file.as_raw_fd(), sys::TUNSETVNETHDRSZ, &mut sz2) }?;
            let off = sys::TUN_F_CSUM | sys::TUN_F_TSO4 | sys::TUN_F_TSO6;
            // SAFETY: TUNSETOFFLOAD takes the flags by value.
            sys::cvt(unsafe {
                libc::ioctl(
                    file.as_raw_fd(),
                    sys::TUNSETOFFLOAD as _,
                    off as libc::c_ulong,
                )
            })
            .map_err(|e| {
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
        // SAFETY: TUNSETPERSIST takes an int by value.
        sys::cvt(unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                sys::TUNSETPERSIST as _,
                on as libc::c_ulong,
            )
        })
        .map(|_| ())
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
