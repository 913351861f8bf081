//! Small wrappers over Linux interface ioctls and socket options that neither `libc`
//! nor `nix` expose in a typed way.

use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub const IFNAMSIZ: usize = 16;

// <linux/if_tun.h>
pub const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
pub const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
pub const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
pub const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
pub const IFF_TAP: libc::c_short = 0x0002;
pub const IFF_NO_PI: libc::c_short = 0x1000;
pub const IFF_VNET_HDR: libc::c_short = 0x4000;
pub const TUN_F_CSUM: libc::c_uint = 0x01;
pub const TUN_F_TSO4: libc::c_uint = 0x02;
pub const TUN_F_TSO6: libc::c_uint = 0x04;
pub const TUN_F_TSO_ECN: libc::c_uint = 0x08;

// <linux/if_packet.h>
pub const PACKET_ADD_MEMBERSHIP: libc::c_int = 1;
pub const PACKET_MR_PROMISC: libc::c_ushort = 1;
pub const PACKET_AUXDATA: libc::c_int = 8;
pub const PACKET_VNET_HDR: libc::c_int = 15;
pub const PACKET_QDISC_BYPASS: libc::c_int = 20;
pub const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
pub const TP_STATUS_VLAN_VALID: u32 = 1 << 4;
pub const TP_STATUS_VLAN_TPID_VALID: u32 = 1 << 6;
pub const ETH_P_ALL: u16 = 0x0003;

#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct TpacketAuxdata {
    pub tp_status: u32,
    pub tp_len: u32,
    pub tp_snaplen: u32,
    pub tp_mac: u16,
    pub tp_net: u16,
    pub tp_vlan_tci: u16,
    pub tp_vlan_tpid: u16,
}

#[repr(C)]
pub struct PacketMreq {
    pub mr_ifindex: libc::c_int,
    pub mr_type: libc::c_ushort,
    pub mr_alen: libc::c_ushort,
    pub mr_address: [u8; 8],
}

/// `struct ifreq` with the union reduced to what we use.
#[repr(C)]
pub struct IfReq {
    pub name: [u8; IFNAMSIZ],
    pub data: IfReqData,
}

#[repr(C)]
pub union IfReqData {
    pub flags: libc::c_short,
    pub int: libc::c_int,
    pub addr: libc::sockaddr_in,
    pub pad: [u8; 24],
}

impl IfReq {
    pub fn new(name: &str) -> io::Result<IfReq> {
        check_ifname(name)?;
        let mut r = IfReq {
            name: [0; IFNAMSIZ],
            data: IfReqData { pad: [0; 24] },
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(r)
    }
}

/// Interface names are at most 15 bytes and must not contain '/' or whitespace.
pub fn check_ifname(name: &str) -> io::Result<()> {
    if name.is_empty()
        || name.len() >= IFNAMSIZ
        || name
            .bytes()
            .any(|b| b == b'/' || b.is_ascii_whitespace() || b == 0 || b == b':')
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?}: 1 to 15 characters, no '/', ':' or spaces"),
        ));
    }
    Ok(())
}

pub fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub fn cvt_size(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// # Safety
/// `arg` must point to the structure `req` expects.
pub unsafe fn ioctl_ptr<T>(fd: RawFd, req: libc::c_ulong, arg: *mut T) -> io::Result<()> {
    cvt(libc::ioctl(fd, req as _, arg)).map(|_| ())
}

pub fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, val: &T) -> io::Result<()> {
    // SAFETY: val is a valid T for the given length.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            val as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// A throwaway AF_INET datagram socket for interface ioctls (in the calling thread's netns).
pub fn ctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn if_index(name: &str) -> io::Result<u32> {
    check_ifname(name)?;
    let c = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: c is NUL-terminated.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no network interface named {name:?} in this network namespace"),
        ))
    } else {
        Ok(i)
    }
}

fn sockaddr_in(ip: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Set an interface up (or down).
pub fn set_up(name: &str, up: bool) -> io::Result<()> {
    let s = ctl_socket()?;
    let mut r = IfReq::new(name)?;
    // SAFETY: ifreq is valid for SIOCGIFFLAGS/SIOCSIFFLAGS.
    unsafe {
        ioctl_ptr(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut r)?;
        let mut f = r.data.flags;
        if up {
            f |= libc::IFF_UP as libc::c_short;
        } else {
            f &= !(libc::IFF_UP as libc::c_short);
        }
        r.data.flags = f;
        ioctl_ptr(s.as_raw_fd(), libc::SIOCSIFFLAGS, &mut r)
    }
}

pub fn set_mtu(name: &str, mtu: u32) -> io::Result<()> {
    let s = ctl_socket()?;
    let mut r = IfReq::new(name)?;
    r.data.int = mtu as libc::c_int;
    // SAFETY: ifreq is valid for SIOCSIFMTU.
    unsafe { ioctl_ptr(s.as_raw_fd(), libc::SIOCSIFMTU, &mut r) }
}

/// Give an interface its (only) IPv4 address and netmask.
pub fn set_ipv4(name: &str, ip: Ipv4Addr, prefix: u8) -> io::Result<()> {
    let s = ctl_socket()?;
    let mut r = IfReq::new(name)?;
    r.data.addr = sockaddr_in(ip);
    // SAFETY: ifreq is valid for SIOCSIFADDR/SIOCSIFNETMASK.
    unsafe { ioctl_ptr(s.as_raw_fd(), libc::SIOCSIFADDR, &mut r)? };
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix as u32)
    };
    let mut r = IfReq::new(name)?;
    r.data.addr = sockaddr_in(Ipv4Addr::from(mask));
    unsafe { ioctl_ptr(s.as_raw_fd(), libc::SIOCSIFNETMASK, &mut r) }
}

/// IPv4 addresses (with prefix length) configured on interfaces of this netns, except `skip`.
pub fn ipv4_addrs_except(skip: &str) -> io::Result<Vec<(String, Ipv4Addr, u8)>> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we free below.
    cvt(unsafe { libc::getifaddrs(&mut head) })?;
    let mut p = head;
    while !p.is_null() {
        // SAFETY: p is a node of the list getifaddrs returned.
        let ifa = unsafe { &*p };
        p = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || unsafe { (*ifa.ifa_addr).sa_family } as i32 != libc::AF_INET {
            continue;
        }
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        if name == skip {
            continue;
        }
        let a = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
        let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
        let prefix = if ifa.ifa_netmask.is_null() {
            32
        } else {
            let m = unsafe { &*(ifa.ifa_netmask as *const libc::sockaddr_in) };
            u32::from_be(m.sin_addr.s_addr).count_ones() as u8
        };
        out.push((name, ip, prefix));
    }
    // SAFETY: head came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// Write a sysctl under /proc/sys/net for the calling thread's network namespace.
pub fn write_net_sysctl(path: &str, value: &str) -> io::Result<()> {
    std::fs::write(format!("/proc/sys/net/{path}"), value)
        .map_err(|e| io::Error::new(e.kind(), format!("writing /proc/sys/net/{path}: {e}")))
}

pub fn set_nonblocking(fd: RawFd, nb: bool) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own.
    let fl = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    let fl = if nb {
        fl | libc::O_NONBLOCK
    } else {
        fl & !libc::O_NONBLOCK
    };
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, fl) }).map(|_| ())
}

/// Wait until `fd` is readable or `timeout_ms` passed; Ok(false) on timeout.
pub fn poll_readable(fd: RawFd, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(r > 0);
    }
}

/// Set large socket buffers; as root the `*FORCE` variants pass the sysctl caps.
pub fn set_socket_buffers(fd: RawFd, bytes: libc::c_int) {
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if setsockopt(fd, libc::SOL_SOCKET, force, &bytes).is_err() {
            let _ = setsockopt(fd, libc::SOL_SOCKET, plain, &bytes);
        }
    }
}

pub fn set_recv_timeout(fd: RawFd, ms: u64) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: (ms / 1000) as libc::time_t,
        tv_usec: ((ms % 1000) * 1000) as libc::suseconds_t,
    };
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)
}

/// Set an interface's Ethernet address.
pub fn set_mac(name: &str, mac: [u8; 6]) -> io::Result<()> {
    let s = ctl_socket()?;
    let mut r = IfReq::new(name)?;
    // SAFETY: sockaddr fits the union; SIOCSIFHWADDR reads sa_family + sa_data.
    unsafe {
        let sa = &mut r.data.pad;
        sa[0..2].copy_from_slice(&(libc::ARPHRD_ETHER).to_ne_bytes());
        sa[2..8].copy_from_slice(&mac);
        ioctl_ptr(s.as_raw_fd(), libc::SIOCSIFHWADDR, &mut r)
    }
}
