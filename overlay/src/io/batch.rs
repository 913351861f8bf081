//! Reusable recvmmsg/sendmmsg batches: one syscall moves many datagrams or frames, and
//! no buffer is allocated per packet.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::RawFd;

use super::sys;

const CTRL_LEN: usize = 64;

/// A set of receive slots filled by one `recvmmsg`.
pub struct RecvBatch {
    slot: usize,
    bufs: Vec<u8>,
    iov: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    names: Vec<libc::sockaddr_storage>,
    ctrl: Vec<[u64; CTRL_LEN / 8]>,
    n: usize,
}

// SAFETY: the raw pointers only ever point into this struct's own vectors.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    pub fn new(slots: usize, slot_size: usize) -> RecvBatch {
        RecvBatch {
            slot: slot_size,
            bufs: vec![0; slots * slot_size],
            iov: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                slots
            ],
            // SAFETY: mmsghdr and sockaddr_storage are plain C structs; zero is valid.
            hdrs: vec![unsafe { std::mem::zeroed() }; slots],
            names: vec![unsafe { std::mem::zeroed() }; slots],
            ctrl: vec![[0; CTRL_LEN / 8]; slots],
            n: 0,
        }
    }

    pub fn slots(&self) -> usize {
        self.hdrs.len()
    }

    /// Receive up to `slots()` messages: blocks for the first (up to the socket's
    /// receive timeout), then takes what is queued. Returns the count (0 on timeout).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.recv_flags(fd, libc::MSG_WAITFORONE)
    }

    /// Like `recv` but never blocks (for non-blocking drains).
    pub fn recv_nowait(&mut self, fd: RawFd) -> io::Result<usize> {
        self.recv_flags(fd, libc::MSG_DONTWAIT)
    }

    fn recv_flags(&mut self, fd: RawFd, flags: libc::c_int) -> io::Result<usize> {
        let slots = self.slots();
        for i in 0..slots {
            self.iov[i] = libc::iovec {
                iov_base: self.bufs[i * self.slot..].as_mut_ptr() as *mut libc::c_void,
                iov_len: self.slot,
            };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = &mut self.names[i] as *mut _ as *mut libc::c_void;
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iov[i];
            h.msg_iovlen = 1;
            h.msg_control = self.ctrl[i].as_mut_ptr() as *mut libc::c_void;
            h.msg_controllen = CTRL_LEN as _;
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        loop {
            // SAFETY: every header points at live buffers owned by self.
            let r = unsafe {
                libc::recvmmsg(
                    fd,
                    self.hdrs.as_mut_ptr(),
                    slots as libc::c_uint,
                    flags,
                    std::ptr::null_mut(),
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        self.n = 0;
                        return Ok(0);
                    }
                    _ => return Err(e),
                }
            }
            self.n = r as usize;
            return Ok(self.n);
        }
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Bytes of message `i` (may have been truncated to the slot size).
    pub fn data(&self, i: usize) -> &[u8] {
        let l = (self.hdrs[i].msg_len as usize).min(self.slot);
        &self.bufs[i * self.slot..i * self.slot + l]
    }

    /// Whole slot `i` and the received length, for in-place edits.
    pub fn slot_mut(&mut self, i: usize) -> (&mut [u8], usize) {
        let l = (self.hdrs[i].msg_len as usize).min(self.slot);
        (&mut self.bufs[i * self.slot..(i + 1) * self.slot], l)
    }

    /// The message did not fit its slot.
    pub fn truncated(&self, i: usize) -> bool {
        self.hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0
    }

    /// Source address of message `i` (IPv4 UDP only).
    pub fn addr(&self, i: usize) -> Option<SocketAddr> {
        let s = &self.names[i];
        if s.ss_family as i32 == libc::AF_INET {
            // SAFETY: family says this is a sockaddr_in.
            let a = unsafe { &*(s as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        } else {
            None
        }
    }

    /// The first control message of `level`/`ty` on message `i`, copied into a T.
    pub fn cmsg<T: Copy + Default>(&self, i: usize, level: libc::c_int, ty: libc::c_int) -> Option<T> {
        let h = &self.hdrs[i].msg_hdr;
        // SAFETY: walking the control buffer the kernel filled, bounded by msg_controllen.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(h);
            while !c.is_null() {
                if (*c).cmsg_level == level && (*c).cmsg_type == ty {
                    let mut v = T::default();
                    let avail = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    let n = avail.min(std::mem::size_of::<T>());
                    std::ptr::copy_nonoverlapping(libc::CMSG_DATA(c), &mut v as *mut T as *mut u8, n);
                    return Some(v);
                }
                c = libc::CMSG_NXTHDR(h, c);
            }
        }
        None
    }
}

/// Outgoing datagrams gathered for one `sendmmsg`.
pub struct SendBatch {
    slot: usize,
    bufs: Vec<u8>,
    lens: Vec<usize>,
    dests: Vec<libc::sockaddr_in>,
    iov: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    n: usize,
}

// SAFETY: the raw pointers only ever point into this struct's own vectors.
unsafe impl Send for SendBatch {}

impl SendBatch {
    pub fn new(slots: usize, slot_size: usize) -> SendBatch {
        SendBatch {
            slot: slot_size,
            bufs: vec![0; slots * slot_size],
            lens: vec![0; slots],
            // SAFETY: plain C structs; zero is valid.
            dests: vec![unsafe { std::mem::zeroed() }; slots],
            iov: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                slots
            ],
            hdrs: vec![unsafe { std::mem::zeroed() }; slots],
            n: 0,
        }
    }

    pub fn is_full(&self) -> bool {
        self.n == self.lens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn slot_size(&self) -> usize {
        self.slot
    }

    /// Queue one message written by `fill` into a slot; `fill` returns its length.
    /// The caller flushes when `is_full()`.
    pub fn push(&mut self, dest: Option<SocketAddr>, fill: impl FnOnce(&mut [u8]) -> usize) {
        debug_assert!(!self.is_full());
        let i = self.n;
        let l = fill(&mut self.bufs[i * self.slot..(i + 1) * self.slot]);
        self.lens[i] = l.min(self.slot);
        self.dests[i] = match dest {
            Some(SocketAddr::V4(a)) => libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            },
            // Unset family: a connected/bound socket sends to its default.
            _ => unsafe { std::mem::zeroed() },
        };
        self.n += 1;
    }

    /// Send everything queued. Datagrams the kernel refuses (e.g. a full buffer on a
    /// non-blocking socket or an unreachable peer) are dropped, like a wire would.
    /// Returns how many were sent.
    pub fn flush(&mut self, fd: RawFd) -> io::Result<usize> {
        let n = self.n;
        for i in 0..n {
            self.iov[i] = libc::iovec {
                iov_base: self.bufs[i * self.slot..].as_mut_ptr() as *mut libc::c_void,
                iov_len: self.lens[i],
            };
            let h = &mut self.hdrs[i].msg_hdr;
            if self.dests[i].sin_family == libc::AF_INET as libc::sa_family_t {
                h.msg_name = &mut self.dests[i] as *mut _ as *mut libc::c_void;
                h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            } else {
                h.msg_name = std::ptr::null_mut();
                h.msg_namelen = 0;
            }
            h.msg_iov = &mut self.iov[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
        }
        let mut off = 0;
        let mut sent = 0;
        let mut result = Ok(());
        while off < n {
            // SAFETY: headers point into self's buffers.
            let r = unsafe {
                libc::sendmmsg(fd, self.hdrs[off..].as_mut_ptr(), (n - off) as libc::c_uint, 0)
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    // Drop the message the kernel refused and go on with the rest.
                    io::ErrorKind::WouldBlock
                    | io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::HostUnreachable
                    | io::ErrorKind::NetworkUnreachable => {
                        off += 1;
                        continue;
                    }
                    _ if e.raw_os_error() == Some(libc::ENOBUFS)
                        || e.raw_os_error() == Some(libc::EMSGSIZE)
                        || e.raw_os_error() == Some(libc::ENXIO)
                        || e.raw_os_error() == Some(libc::ENETDOWN) =>
                    {
                        off += 1;
                        continue;
                    }
                    _ => {
                        result = Err(e);
                        break;
                    }
                }
            }
            off += r as usize;
            sent += r as usize;
        }
        self.n = 0;
        result.map(|_| sent)
    }
}

/// Make a blocking receive return after `ms` so loops can notice a stop request.
pub fn set_timeout(fd: RawFd, ms: u64) -> io::Result<()> {
    sys::set_recv_timeout(fd, ms)
}
