//! Small wrappers over socket options and interface settings. nix does the work where
//! it has a wrapper (typed socket options, fcntl, interface lookups); the tap and
//! `struct ifreq` ioctls live in the shared `tapdev` crate. Raw libc is left for the
//! AF_PACKET options nix does not know ([`setsockopt`]).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{BorrowedFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::sockopt;
use nix::sys::time::TimeVal;

pub use tapdev::IFNAMSIZ;

use super::batch::{ne_bytes, CmsgData};

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

impl CmsgData for TpacketAuxdata {
    fn from_cmsg(p: &[u8]) -> Self {
        use std::mem::offset_of;
        let u32_at = |at| u32::from_ne_bytes(ne_bytes(p, at));
        let u16_at = |at| u16::from_ne_bytes(ne_bytes(p, at));
        TpacketAuxdata {
            tp_status: u32_at(offset_of!(TpacketAuxdata, tp_status)),
            tp_len: u32_at(offset_of!(TpacketAuxdata, tp_len)),
            tp_snaplen: u32_at(offset_of!(TpacketAuxdata, tp_snaplen)),
            tp_mac: u16_at(offset_of!(TpacketAuxdata, tp_mac)),
            tp_net: u16_at(offset_of!(TpacketAuxdata, tp_net)),
            tp_vlan_tci: u16_at(offset_of!(TpacketAuxdata, tp_vlan_tci)),
            tp_vlan_tpid: u16_at(offset_of!(TpacketAuxdata, tp_vlan_tpid)),
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct PacketMreq {
    pub mr_ifindex: libc::c_int,
    pub mr_type: libc::c_ushort,
    pub mr_alen: libc::c_ushort,
    pub mr_address: [u8; 8],
}

/// Interface names are at most 15 bytes and must not contain '/' or whitespace.
pub fn check_ifname(name: &str) -> io::Result<()> {
    Ok(tapdev::check_ifname(name)?)
}

/// A caller's fd as nix wants it, for the duration of one call. (The helpers here
/// and the poller take raw fds from their callers; nix's wrappers take borrowed ones.)
pub(crate) fn borrowed<'a>(fd: RawFd) -> BorrowedFd<'a> {
    // SAFETY: every user passes an fd its caller holds open (a socket, tap or port
    // the caller owns) and drops the result within the one nix call it is made for.
    // A stale number would make that call fail (EBADF) or act on another of our
    // fds; it touches no memory.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// Set a socket option nix has no typed wrapper for (the AF_PACKET ones): the
/// kernel reads `size_of::<T>()` bytes of `val`.
pub fn setsockopt<T: Copy>(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    val: &T,
) -> io::Result<()> {
    // SAFETY: `val` is a live T and the length passed is exactly its size; the
    // kernel only reads it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (val as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub fn if_index(name: &str) -> io::Result<u32> {
    check_ifname(name)?;
    nix::net::if_::if_nametoindex(name).map_err(|_| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no network interface named {name:?} in this network namespace"),
        )
    })
}

/// Set an interface up (or down).
pub fn set_up(name: &str, up: bool) -> io::Result<()> {
    Ok(tapdev::set_up(name, up)?)
}

pub fn set_mtu(name: &str, mtu: u32) -> io::Result<()> {
    Ok(tapdev::set_mtu(name, mtu)?)
}

/// Give an interface its (only) IPv4 address and netmask.
pub fn set_ipv4(name: &str, ip: Ipv4Addr, prefix: u8) -> io::Result<()> {
    Ok(tapdev::set_ipv4(name, ip, prefix)?)
}

/// Set an interface's Ethernet address.
pub fn set_mac(name: &str, mac: [u8; 6]) -> io::Result<()> {
    Ok(tapdev::set_mac(name, mac)?)
}

/// IPv4 addresses (with prefix length) configured on interfaces of this netns, except `skip`.
pub fn ipv4_addrs_except(skip: &str) -> io::Result<Vec<(String, Ipv4Addr, u8)>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs()? {
        let Some(a) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) else {
            continue;
        };
        if ifa.interface_name == skip {
            continue;
        }
        let prefix = ifa
            .netmask
            .as_ref()
            .and_then(|m| m.as_sockaddr_in())
            .map_or(32, |m| u32::from(m.ip()).count_ones() as u8);
        out.push((ifa.interface_name.clone(), a.ip(), prefix));
    }
    Ok(out)
}

/// Write a sysctl under /proc/sys/net for the calling thread's network namespace.
pub fn write_net_sysctl(path: &str, value: &str) -> io::Result<()> {
    std::fs::write(format!("/proc/sys/net/{path}"), value)
        .map_err(|e| io::Error::new(e.kind(), format!("writing /proc/sys/net/{path}: {e}")))
}

pub fn set_nonblocking(fd: RawFd, nb: bool) -> io::Result<()> {
    let mut fl = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    fl.set(OFlag::O_NONBLOCK, nb);
    fcntl(fd, FcntlArg::F_SETFL(fl))?;
    Ok(())
}

/// Set large socket buffers; as root the `*FORCE` variants pass the sysctl caps.
pub fn set_socket_buffers(fd: RawFd, bytes: usize) {
    let fd = borrowed(fd);
    if nix::sys::socket::setsockopt(&fd, sockopt::RcvBufForce, &bytes).is_err() {
        let _ = nix::sys::socket::setsockopt(&fd, sockopt::RcvBuf, &bytes);
    }
    if nix::sys::socket::setsockopt(&fd, sockopt::SndBufForce, &bytes).is_err() {
        let _ = nix::sys::socket::setsockopt(&fd, sockopt::SndBuf, &bytes);
    }
}

pub fn set_recv_timeout(fd: RawFd, ms: u64) -> io::Result<()> {
    let tv = TimeVal::new(
        (ms / 1000) as libc::time_t,
        ((ms % 1000) * 1000) as libc::suseconds_t,
    );
    Ok(nix::sys::socket::setsockopt(
        &borrowed(fd),
        sockopt::ReceiveTimeout,
        &tv,
    )?)
}

/// Ask the kernel to hand over coalesced UDP datagrams (UDP_GRO).
pub fn set_udp_gro(fd: RawFd) -> io::Result<()> {
    Ok(nix::sys::socket::setsockopt(
        &borrowed(fd),
        sockopt::UdpGroSegment,
        &true,
    )?)
}
