//! Linux tap devices (`/dev/net/tun`) and the `struct ifreq` interface ioctls, in one
//! place for the overlay (the buyer's tap, interface setup) and the VMM (the guest's
//! NIC): one `ifreq` layout, one set of request codes, each request typed by a nix
//! ioctl wrapper so a request can only be given the structure it reads.
//!
//! `IfReq` keeps the ifreq union as bytes, so every field access is safe code; the
//! only `unsafe` left is the ioctl calls themselves.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

pub const IFNAMSIZ: usize = 16;

// <linux/if_tun.h>
pub const IFF_TAP: libc::c_short = 0x0002;
pub const IFF_NO_PI: libc::c_short = 0x1000;
pub const IFF_VNET_HDR: libc::c_short = 0x4000;
pub const TUN_F_CSUM: libc::c_uint = 0x01;
pub const TUN_F_TSO4: libc::c_uint = 0x02;
pub const TUN_F_TSO6: libc::c_uint = 0x04;
pub const TUN_F_TSO_ECN: libc::c_uint = 0x08;

/// The wrappers nix generates for each request (all `unsafe fn`: the caller passes a
/// live fd and, for pointers, a live structure of the named type).
mod ioctls {
    use super::IfReq;

    // TUNSETIFF / TUNGETIFF are declared with an int size but take a struct ifreq,
    // hence the explicit request numbers ("bad" wrappers).
    nix::ioctl_readwrite_bad!(tunsetiff, 0x4004_54ca, IfReq);
    nix::ioctl_read_bad!(tungetiff, 0x8004_54d2, IfReq);
    // _IOW('T', 203, int) and _IOW('T', 208, unsigned int): the value is the argument.
    nix::ioctl_write_int!(tunsetpersist, b'T', 203);
    nix::ioctl_write_int!(tunsetoffload, b'T', 208);
    // _IOW('T', 216, int): a pointer to the header size.
    nix::ioctl_write_ptr!(tunsetvnethdrsz, b'T', 216, libc::c_int);
    nix::ioctl_readwrite_bad!(siocgifflags, libc::SIOCGIFFLAGS, IfReq);
    nix::ioctl_write_ptr_bad!(siocsifflags, libc::SIOCSIFFLAGS, IfReq);
    nix::ioctl_write_ptr_bad!(siocsifmtu, libc::SIOCSIFMTU, IfReq);
    nix::ioctl_write_ptr_bad!(siocsifaddr, libc::SIOCSIFADDR, IfReq);
    nix::ioctl_write_ptr_bad!(siocsifnetmask, libc::SIOCSIFNETMASK, IfReq);
    nix::ioctl_write_ptr_bad!(siocsifhwaddr, libc::SIOCSIFHWADDR, IfReq);
}

/// What went wrong, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid interface name {0:?}: 1 to 15 characters, no '/', ':' or spaces")]
    InvalidName(String),
    #[error("/dev/net/tun does not exist: load the tun module (`modprobe tun`) or give the container the device")]
    NoTunDevice,
    #[error("cannot open /dev/net/tun: permission denied (needs root or CAP_NET_ADMIN)")]
    TunDenied,
    #[error("opening /dev/net/tun: {0}")]
    OpenTun(#[source] io::Error),
    #[error("creating tap {0:?}: operation not permitted (needs CAP_NET_ADMIN)")]
    TapDenied(String),
    #[error("creating tap {0:?}: the name is taken by another interface or an open tap")]
    TapNameTaken(String),
    #[error("creating a control socket for interface ioctls: {0}")]
    CtlSocket(#[source] Errno),
    #[error("{what} on {name:?}: {source}")]
    Ioctl {
        what: &'static str,
        name: String,
        #[source]
        source: Errno,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The closest `io::ErrorKind`, for callers that speak `io::Error`.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            Error::InvalidName(_) => io::ErrorKind::InvalidInput,
            Error::NoTunDevice => io::ErrorKind::NotFound,
            Error::TunDenied | Error::TapDenied(_) => io::ErrorKind::PermissionDenied,
            Error::OpenTun(e) => e.kind(),
            Error::TapNameTaken(_) => io::ErrorKind::AddrInUse,
            Error::CtlSocket(e) | Error::Ioctl { source: e, .. } => io::Error::from(*e).kind(),
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        io::Error::new(e.kind(), e)
    }
}

/// Interface names are 1 to 15 bytes with no '/', ':', NUL or whitespace.
pub fn check_ifname(name: &str) -> Result<()> {
    let bad = |b: u8| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace();
    if name.is_empty() || name.len() >= IFNAMSIZ || name.bytes().any(bad) {
        return Err(Error::InvalidName(name.to_string()));
    }
    Ok(())
}

/// `struct ifreq`: the interface name and the 24-byte request union, kept as bytes
/// (aligned like the C union) so that reading and writing its fields is safe.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug)]
pub struct IfReq {
    name: [u8; IFNAMSIZ],
    data: [u8; 24],
}

// The kernel copies exactly sizeof(struct ifreq) bytes in and out.
const _: () = assert!(std::mem::size_of::<IfReq>() == std::mem::size_of::<libc::ifreq>());

impl IfReq {
    /// A zeroed request for interface `name`.
    pub fn new(name: &str) -> Result<IfReq> {
        check_ifname(name)?;
        let mut r = IfReq {
            name: [0; IFNAMSIZ],
            data: [0; 24],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(r)
    }

    /// The interface name (what the kernel wrote back, e.g. after TUNSETIFF).
    pub fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }

    /// `ifr_flags`.
    pub fn flags(&self) -> libc::c_short {
        libc::c_short::from_ne_bytes([self.data[0], self.data[1]])
    }

    pub fn set_flags(&mut self, flags: libc::c_short) {
        self.data[..2].copy_from_slice(&flags.to_ne_bytes());
    }

    /// `ifr_mtu` / `ifr_ifindex` (an int).
    pub fn set_int(&mut self, v: libc::c_int) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }

    /// `ifr_addr` as an IPv4 `sockaddr_in` (port 0).
    pub fn set_ipv4(&mut self, ip: Ipv4Addr) {
        self.data = [0; 24];
        self.data[..2].copy_from_slice(&(libc::AF_INET as libc::sa_family_t).to_ne_bytes());
        self.data[4..8].copy_from_slice(&ip.octets());
    }

    /// `ifr_hwaddr` as an Ethernet address.
    pub fn set_hwaddr(&mut self, mac: [u8; 6]) {
        self.data = [0; 24];
        self.data[..2].copy_from_slice(&libc::ARPHRD_ETHER.to_ne_bytes());
        self.data[2..8].copy_from_slice(&mac);
    }
}

/// Open `/dev/net/tun` (not yet attached to an interface).
fn open_tun() -> Result<File> {
    File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::NoTunDevice,
            io::ErrorKind::PermissionDenied => Error::TunDenied,
            _ => Error::OpenTun(e),
        })
}

/// Create (or attach to an existing persistent) tap `name` in the calling thread's
/// network namespace: IFF_TAP | IFF_NO_PI, plus IFF_VNET_HDR when `vnet_hdr` (every
/// frame then carries a virtio_net_hdr). Returns the device fd (close-on-exec).
pub fn open_tap(name: &str, vnet_hdr: bool) -> Result<File> {
    let mut req = IfReq::new(name)?;
    let file = open_tun()?;
    req.set_flags(IFF_TAP | IFF_NO_PI | if vnet_hdr { IFF_VNET_HDR } else { 0 });
    // SAFETY: a live fd and a live ifreq, which TUNSETIFF reads and writes back.
    unsafe { ioctls::tunsetiff(file.as_raw_fd(), &mut req) }.map_err(|e| match e {
        Errno::EPERM => Error::TapDenied(name.to_string()),
        Errno::EBUSY | Errno::EINVAL => Error::TapNameTaken(name.to_string()),
        source => Error::Ioctl {
            what: "TUNSETIFF",
            name: name.to_string(),
            source,
        },
    })?;
    Ok(file)
}

/// The IFF_* flags of the tap behind `fd`; `None` if `fd` is not a tap (e.g. a
/// socket standing in for one).
pub fn tap_flags(fd: impl AsFd) -> Option<libc::c_short> {
    let mut req = IfReq {
        name: [0; IFNAMSIZ],
        data: [0; 24],
    };
    // SAFETY: a live fd and a live ifreq, which TUNGETIFF fills.
    unsafe { ioctls::tungetiff(fd.as_fd().as_raw_fd(), &mut req) }.ok()?;
    Some(req.flags())
}

fn tun_err(what: &'static str, fd: &impl AsFd) -> impl FnOnce(Errno) -> Error {
    let name = format!("tap fd {}", fd.as_fd().as_raw_fd());
    move |source| Error::Ioctl { what, name, source }
}

/// Set the virtio_net_hdr size on a tap opened with IFF_VNET_HDR.
pub fn set_vnet_hdr_size(fd: impl AsFd, size: usize) -> Result<()> {
    let size = size as libc::c_int;
    // SAFETY: a live fd and a live int, which TUNSETVNETHDRSZ reads.
    unsafe { ioctls::tunsetvnethdrsz(fd.as_fd().as_raw_fd(), &size) }
        .map(drop)
        .map_err(tun_err("TUNSETVNETHDRSZ", &fd))
}

/// Tell the tap which offloads (TUN_F_*) we accept in frames read from it.
pub fn set_offload(fd: impl AsFd, flags: libc::c_uint) -> Result<()> {
    // SAFETY: a live fd; TUNSETOFFLOAD takes the flags by value.
    unsafe { ioctls::tunsetoffload(fd.as_fd().as_raw_fd(), flags.into()) }
        .map(drop)
        .map_err(tun_err("TUNSETOFFLOAD", &fd))
}

/// Keep the interface after the fd closes (so a VMM can open it by name).
pub fn set_persist(fd: impl AsFd, on: bool) -> Result<()> {
    // SAFETY: a live fd; TUNSETPERSIST takes the flag by value.
    unsafe { ioctls::tunsetpersist(fd.as_fd().as_raw_fd(), on.into()) }
        .map(drop)
        .map_err(tun_err("TUNSETPERSIST", &fd))
}

/// A throwaway AF_INET datagram socket for interface ioctls (in the calling thread's
/// network namespace).
pub fn ctl_socket() -> Result<OwnedFd> {
    socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(Error::CtlSocket)
}

/// The request wrappers for interface ioctls all take (fd, pointer to IfReq).
type IfIoctl = unsafe fn(libc::c_int, *const IfReq) -> nix::Result<libc::c_int>;

/// Run one write-only interface ioctl on a fresh control socket.
fn if_ioctl(what: &'static str, req: &IfReq, name: &str, call: IfIoctl) -> Result<()> {
    let s = ctl_socket()?;
    // SAFETY: a live socket and a live ifreq; every `IfIoctl` reads one ifreq.
    unsafe { call(s.as_raw_fd(), req) }
        .map(drop)
        .map_err(|source| Error::Ioctl {
            what,
            name: name.to_string(),
            source,
        })
}

/// Set an interface up (or down).
pub fn set_up(name: &str, up: bool) -> Result<()> {
    let s = ctl_socket()?;
    let mut r = IfReq::new(name)?;
    let err = |what| {
        move |source| Error::Ioctl {
            what,
            name: name.to_string(),
            source,
        }
    };
    // SAFETY: a live socket and a live ifreq, which SIOCGIFFLAGS fills.
    unsafe { ioctls::siocgifflags(s.as_raw_fd(), &mut r) }.map_err(err("SIOCGIFFLAGS"))?;
    let up_flag = libc::IFF_UP as libc::c_short;
    r.set_flags(if up {
        r.flags() | up_flag
    } else {
        r.flags() & !up_flag
    });
    // SAFETY: a live socket and a live ifreq, which SIOCSIFFLAGS reads.
    unsafe { ioctls::siocsifflags(s.as_raw_fd(), &r) }.map_err(err("SIOCSIFFLAGS"))?;
    Ok(())
}

/// Set an interface's MTU.
pub fn set_mtu(name: &str, mtu: u32) -> Result<()> {
    let mut r = IfReq::new(name)?;
    r.set_int(mtu as libc::c_int);
    if_ioctl("SIOCSIFMTU", &r, name, ioctls::siocsifmtu)
}

/// Give an interface its (only) IPv4 address and netmask.
pub fn set_ipv4(name: &str, ip: Ipv4Addr, prefix: u8) -> Result<()> {
    let mut r = IfReq::new(name)?;
    r.set_ipv4(ip);
    if_ioctl("SIOCSIFADDR", &r, name, ioctls::siocsifaddr)?;
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0);
    r.set_ipv4(Ipv4Addr::from(mask));
    if_ioctl("SIOCSIFNETMASK", &r, name, ioctls::siocsifnetmask)
}

/// Set an interface's Ethernet address.
pub fn set_mac(name: &str, mac: [u8; 6]) -> Result<()> {
    let mut r = IfReq::new(name)?;
    r.set_hwaddr(mac);
    if_ioctl("SIOCSIFHWADDR", &r, name, ioctls::siocsifhwaddr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for bad in ["", "a/b", "a b", "a:b", "0123456789abcdef", "a\0b"] {
            assert!(
                matches!(check_ifname(bad), Err(Error::InvalidName(_))),
                "{bad:?}"
            );
        }
        for good in ["tap0", "0123456789abcde", "cs-b1.x"] {
            check_ifname(good).unwrap();
        }
        assert_eq!(IfReq::new("tap0").unwrap().name(), "tap0");
    }

    #[test]
    fn fields_land_where_the_c_union_has_them() {
        let mut r = IfReq::new("x").unwrap();
        r.set_flags(IFF_TAP | IFF_VNET_HDR);
        assert_eq!(r.flags(), 0x4002);
        r.set_ipv4(Ipv4Addr::new(10, 1, 2, 3));
        // sockaddr_in: family, port 0, then the address in network order.
        assert_eq!(r.data[..2], (libc::AF_INET as u16).to_ne_bytes());
        assert_eq!(r.data[2..8], [0, 0, 10, 1, 2, 3]);
        r.set_hwaddr([2, 0, 0, 0, 0, 9]);
        assert_eq!(r.data[..2], libc::ARPHRD_ETHER.to_ne_bytes());
        assert_eq!(r.data[2..8], [2, 0, 0, 0, 0, 9]);
        assert_eq!(std::mem::offset_of!(IfReq, data), 16);
    }

    #[test]
    fn errors_keep_their_kind_as_io_errors() {
        let e: io::Error = IfReq::new("a/b").unwrap_err().into();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e: io::Error = Error::TapNameTaken("t".into()).into();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        let e: io::Error = Error::NoTunDevice.into();
        assert!(e.to_string().contains("/dev/net/tun"));
    }

    /// Creating a tap needs CAP_NET_ADMIN; as root this creates, configures and
    /// drops one (no address: nothing reaches the host's routes).
    #[test]
    fn a_tap_opens_and_takes_settings_as_root() {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var_os("CI").is_none(),
                "this test needs root under CI"
            );
            eprintln!("skipping: needs root");
            return;
        }
        let name = format!("tdv{}", std::process::id() % 100_000);
        let tap = match open_tap(&name, true) {
            Err(Error::NoTunDevice) if std::env::var_os("CI").is_none() => {
                eprintln!("skipping: no /dev/net/tun");
                return;
            }
            r => r.unwrap(),
        };
        let flags = tap_flags(&tap).expect("a tap");
        assert_ne!(flags & IFF_VNET_HDR, 0);
        assert_ne!(flags & IFF_TAP, 0);
        set_vnet_hdr_size(&tap, 12).unwrap();
        set_offload(&tap, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6).unwrap();
        set_mtu(&name, 1400).unwrap();
        set_mac(&name, [2, 0, 0, 0, 0, 1]).unwrap();
        set_up(&name, true).unwrap();
        set_up(&name, false).unwrap();
        // A second open of the same name while the first is held is refused clearly.
        assert!(matches!(
            open_tap(&name, false),
            Err(Error::TapNameTaken(_))
        ));
        let sock = ctl_socket().unwrap();
        assert_eq!(tap_flags(&sock), None, "a socket is not a tap");
    }
}
