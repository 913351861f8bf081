//! Reusable recvmmsg/sendmmsg batches: one syscall moves many datagrams or frames, and
//! no buffer is allocated per packet.
//!
//! A batch's per-slot metadata (message headers, iovecs, addresses, control buffers)
//! sits in one page-aligned allocation, laid out so the first slots' entries share a
//! page or two. A light pass (one ping) then touches two or three pages per batch
//! instead of one per array: on a VM, each page that went cold since the last packet
//! costs a few hundred nanoseconds on first touch.

use std::alloc::{self, Layout};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::RawFd;
use std::ptr::NonNull;

use super::sys;

const CTRL_LEN: usize = 64;
const PAGE: usize = 4096;

/// One zeroed, page-aligned allocation holding several arrays back to back.
struct Arrays {
    base: NonNull<u8>,
    layout: Layout,
}

impl Arrays {
    /// `parts`: (element size, element alignment, count) per array, in layout order.
    /// Returns the allocation and each array's byte offset.
    fn new<const N: usize>(parts: [(usize, usize, usize); N]) -> (Arrays, [usize; N]) {
        let mut offs = [0usize; N];
        let mut end = 0usize;
        for (k, &(size, align, count)) in parts.iter().enumerate() {
            end = end.next_multiple_of(align);
            offs[k] = end;
            end += size * count;
        }
        let layout = Layout::from_size_align(end.max(1), PAGE).expect("batch metadata layout");
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc::alloc_zeroed(layout) };
        let base = NonNull::new(p).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        (Arrays { base, layout }, offs)
    }

    /// Pointer to the array at byte offset `off`.
    fn at<T>(&self, off: usize) -> *mut T {
        // SAFETY: offsets come from `new` and lie inside the allocation.
        unsafe { self.base.as_ptr().add(off) as *mut T }
    }
}

impl Drop for Arrays {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { alloc::dealloc(self.base.as_ptr(), self.layout) }
    }
}

/// (size, align, count) of `n` elements of T, for [`Arrays::new`].
fn part<T>(n: usize) -> (usize, usize, usize) {
    (std::mem::size_of::<T>(), std::mem::align_of::<T>(), n)
}

/// Room for a source address: IPv4 or IPv6 UDP, or AF_PACKET's sockaddr_ll.
type Name = libc::sockaddr_in6;
type Ctrl = [u64; CTRL_LEN / 8];

/// A set of receive slots filled by one `recvmmsg`.
pub struct RecvBatch {
    slot: usize,
    slots: usize,
    bufs: Vec<u8>,
    meta: Arrays,
    /// Byte offsets in `meta` of the iovecs, names, headers and control buffers.
    iov: usize,
    names: usize,
    hdrs: usize,
    ctrl: usize,
    n: usize,
    /// Leading headers the kernel may have written since they were last reset.
    dirty: usize,
}

// SAFETY: the raw pointers only ever point into this struct's own allocations.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    pub fn new(slots: usize, slot_size: usize) -> RecvBatch {
        // Small arrays first, so slot 0's iovec, name and header share the first page.
        let (meta, [iov, names, hdrs, ctrl]) = Arrays::new([
            part::<libc::iovec>(slots),
            part::<Name>(slots),
            part::<libc::mmsghdr>(slots),
            part::<Ctrl>(slots),
        ]);
        let mut b = RecvBatch {
            slot: slot_size,
            slots,
            bufs: vec![0; slots * slot_size],
            meta,
            iov,
            names,
            hdrs,
            ctrl,
            n: 0,
            dirty: 0,
        };
        // The headers point into buffers that never move: set them up once, so a
        // receive only resets what the last one wrote.
        let base = b.bufs.as_mut_ptr();
        for i in 0..slots {
            // SAFETY: i < slots; every array has `slots` zeroed (valid) elements.
            unsafe {
                let v = b.meta.at::<libc::iovec>(b.iov).add(i);
                *v = libc::iovec {
                    iov_base: base.add(i * slot_size) as *mut libc::c_void,
                    iov_len: slot_size,
                };
                let h = &mut (*b.meta.at::<libc::mmsghdr>(b.hdrs).add(i)).msg_hdr;
                h.msg_name = b.meta.at::<Name>(b.names).add(i) as *mut libc::c_void;
                h.msg_iov = v;
                h.msg_iovlen = 1;
                h.msg_control = b.meta.at::<Ctrl>(b.ctrl).add(i) as *mut libc::c_void;
            }
        }
        b.dirty = slots;
        b.reset_headers();
        b
    }

    fn hdrs(&self) -> &[libc::mmsghdr] {
        // SAFETY: `slots` initialised headers live at this offset for self's lifetime.
        unsafe { std::slice::from_raw_parts(self.meta.at(self.hdrs), self.slots) }
    }

    fn hdrs_mut(&mut self) -> &mut [libc::mmsghdr] {
        // SAFETY: as in `hdrs`, and &mut self makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.meta.at(self.hdrs), self.slots) }
    }

    /// Give back the lengths and flags the kernel overwrote in the used headers.
    fn reset_headers(&mut self) {
        let dirty = self.dirty;
        for m in &mut self.hdrs_mut()[..dirty] {
            let h = &mut m.msg_hdr;
            h.msg_namelen = std::mem::size_of::<Name>() as libc::socklen_t;
            h.msg_controllen = CTRL_LEN as _;
            h.msg_flags = 0;
            m.msg_len = 0;
        }
        self.dirty = 0;
    }

    pub fn slots(&self) -> usize {
        self.slots
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
        self.reset_headers();
        loop {
            // SAFETY: every header points at live buffers owned by self.
            let r = unsafe {
                libc::recvmmsg(
                    fd,
                    self.meta.at(self.hdrs),
                    slots as libc::c_uint,
                    flags,
                    std::ptr::null_mut(),
                )
            };
            // The kernel may have written up to the header after the last message.
            self.dirty = if r < 0 {
                slots
            } else {
                (r as usize + 1).min(slots)
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => {
                        self.reset_headers();
                        continue;
                    }
                    // A connected UDP socket reports an earlier ICMP error here; the
                    // peer may come up later, so it is not fatal.
                    io::ErrorKind::WouldBlock
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::ConnectionRefused => {
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
        let l = (self.hdrs()[i].msg_len as usize).min(self.slot);
        &self.bufs[i * self.slot..i * self.slot + l]
    }

    /// Whole slot `i` and the received length, for in-place edits.
    pub fn slot_mut(&mut self, i: usize) -> (&mut [u8], usize) {
        let l = (self.hdrs()[i].msg_len as usize).min(self.slot);
        (&mut self.bufs[i * self.slot..(i + 1) * self.slot], l)
    }

    /// Ask the kernel to hand over coalesced UDP datagrams (UDP_GRO); slots must be
    /// 64 KiB. Use [`RecvBatch::segments`] to split them.
    pub fn enable_udp_gro(&self, fd: RawFd) -> bool {
        sys::set_udp_gro(fd).is_ok()
    }

    /// The datagrams in message `i` (several when the kernel coalesced them).
    pub fn segments(&self, i: usize) -> impl Iterator<Item = &[u8]> {
        let d = self.data(i);
        let seg = self
            .cmsg::<libc::c_int>(i, libc::SOL_UDP, UDP_GRO)
            .filter(|&g| g > 0)
            .map(|g| g as usize)
            .unwrap_or(d.len().max(1));
        d.chunks(seg)
    }

    /// The message did not fit its slot.
    pub fn truncated(&self, i: usize) -> bool {
        self.hdrs()[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0
    }

    /// Source address of message `i` (IPv4 UDP only).
    pub fn addr(&self, i: usize) -> Option<SocketAddr> {
        assert!(i < self.slots);
        // SAFETY: i < slots; a zeroed or kernel-written name is a valid sockaddr_in6.
        let s = unsafe { &*self.meta.at::<Name>(self.names).add(i) };
        if s.sin6_family as i32 == libc::AF_INET {
            // SAFETY: family says this is a sockaddr_in, which is smaller than Name.
            let a = unsafe { &*(s as *const Name as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        } else {
            None
        }
    }

    /// Slot `i`'s control buffer, as long as the kernel said it filled it.
    fn control(&self, i: usize) -> &[u8] {
        assert!(i < self.slots);
        let len = self.hdrs()[i].msg_hdr.msg_controllen.min(CTRL_LEN);
        // SAFETY: slot i's control buffer is CTRL_LEN bytes inside `meta`, zeroed at
        // allocation (so always initialised), alive as long as self; the kernel writes
        // it only inside `recv_flags`, which takes &mut self.
        let all = unsafe {
            std::slice::from_raw_parts(
                self.meta.at::<Ctrl>(self.ctrl).add(i) as *const u8,
                CTRL_LEN,
            )
        };
        &all[..len]
    }

    /// The first control message of `level`/`ty` on received message `i`, read into a
    /// T (a shorter payload reads as if zero-extended).
    pub fn cmsg<T: CmsgData>(&self, i: usize, level: libc::c_int, ty: libc::c_int) -> Option<T> {
        if i >= self.n {
            return None;
        }
        find_cmsg(self.control(i), level, ty).map(T::from_cmsg)
    }
}

/// A control-message payload built from the kernel's bytes by safe code (each field
/// read with `from_ne_bytes`), so no bit pattern can make an invalid value.
pub trait CmsgData: Sized {
    /// The value in `payload` (missing trailing bytes read as zero).
    fn from_cmsg(payload: &[u8]) -> Self;
}

/// `N` bytes of `b` from `at`, zero-extended past its end.
pub fn ne_bytes<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = b.get(at..) {
        let n = src.len().min(N);
        out[..n].copy_from_slice(&src[..n]);
    }
    out
}

macro_rules! cmsg_int {
    ($($t:ty),*) => {$(
        impl CmsgData for $t {
            fn from_cmsg(payload: &[u8]) -> Self {
                <$t>::from_ne_bytes(ne_bytes(payload, 0))
            }
        }
    )*};
}
cmsg_int!(u16, i32, u32, u64);

/// `struct cmsghdr` (glibc): a size_t length, then level and type.
const CMSG_HDR: usize = std::mem::size_of::<libc::cmsghdr>();
const CMSG_ALIGN: usize = std::mem::size_of::<usize>();
const CMSG_LEVEL_AT: usize = std::mem::offset_of!(libc::cmsghdr, cmsg_level);
const CMSG_TYPE_AT: usize = std::mem::offset_of!(libc::cmsghdr, cmsg_type);
const _: () = assert!(
    std::mem::offset_of!(libc::cmsghdr, cmsg_len) == 0
        && CMSG_HDR == std::mem::size_of::<usize>() + 2 * std::mem::size_of::<libc::c_int>()
);
/// Where a message's payload starts (CMSG_LEN(0)).
const CMSG_DATA_AT: usize = CMSG_HDR.next_multiple_of(CMSG_ALIGN);

/// The payload of the first control message of `level`/`ty` in `ctrl` (what the kernel
/// wrote into msg_control, msg_controllen bytes). Walks the headers in safe code, so a
/// malformed or truncated buffer ends the walk instead of reading past it.
pub fn find_cmsg(ctrl: &[u8], level: libc::c_int, ty: libc::c_int) -> Option<&[u8]> {
    let mut off = 0usize;
    while let Some(h) = ctrl.get(off..off.checked_add(CMSG_HDR)?) {
        let len = usize::from_ne_bytes(ne_bytes(h, 0));
        if len < CMSG_HDR {
            return None;
        }
        let end = off.checked_add(len)?.min(ctrl.len());
        if libc::c_int::from_ne_bytes(ne_bytes(h, CMSG_LEVEL_AT)) == level
            && libc::c_int::from_ne_bytes(ne_bytes(h, CMSG_TYPE_AT)) == ty
        {
            return ctrl.get(off + CMSG_DATA_AT..end).or(Some(&[]));
        }
        off = off.checked_add(len.checked_next_multiple_of(CMSG_ALIGN)?)?;
    }
    None
}

/// Outgoing datagrams gathered for one `sendmmsg`.
pub struct SendBatch {
    slot: usize,
    slots: usize,
    bufs: Vec<u8>,
    meta: Arrays,
    /// Byte offsets in `meta` of the per-slot arrays (see [`SendParts`]).
    offs: [usize; 6],
    n: usize,
    connected: Option<SocketAddr>,
    gso: bool,
    /// Wait and resend a message the kernel refuses with ENOBUFS (a full device
    /// queue) instead of dropping it at once: see [`SendBatch::retry_full_queue`].
    retry_enobufs: bool,
}

/// Resends of one message refused with ENOBUFS, waiting 20 us, 40 us, ... (about
/// 5 ms in all) for the device's queue to drain.
const ENOBUFS_RETRIES: u32 = 8;

/// The per-slot arrays of a [`SendBatch`], borrowed together.
struct SendParts<'a> {
    lens: &'a mut [usize],
    dests: &'a mut [libc::sockaddr_in],
    iov: &'a mut [libc::iovec],
    /// Messages of one flush: runs [start, end) of slots; a run of 2+ is one GSO send.
    runs: &'a mut [(usize, usize)],
    hdrs: &'a mut [libc::mmsghdr],
    ctrl: &'a mut [[u64; 4]],
}

const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// Datagrams per UDP GSO send (the kernel's limit is 64 on older kernels).
const GSO_MAX_SEGS: usize = 64;
/// Bytes per UDP GSO send (an IP packet holds at most 65535).
const GSO_MAX_BYTES: usize = 65000;

fn same_dest(a: &libc::sockaddr_in, b: &libc::sockaddr_in) -> bool {
    a.sin_family == b.sin_family
        && a.sin_port == b.sin_port
        && a.sin_addr.s_addr == b.sin_addr.s_addr
}

// SAFETY: the raw pointers only ever point into this struct's own allocations.
unsafe impl Send for SendBatch {}

impl SendBatch {
    pub fn new(slots: usize, slot_size: usize) -> SendBatch {
        // What one datagram needs (its length, address, iovec, run and header) comes
        // first and fits the first page; GSO control buffers, used in bulk only, last.
        let (meta, offs) = Arrays::new([
            part::<usize>(slots),
            part::<libc::sockaddr_in>(slots),
            part::<libc::iovec>(slots),
            part::<(usize, usize)>(slots),
            part::<libc::mmsghdr>(slots),
            part::<[u64; 4]>(slots),
        ]);
        SendBatch {
            slot: slot_size,
            slots,
            bufs: vec![0; slots * slot_size],
            meta,
            offs,
            n: 0,
            connected: None,
            gso: false,
            retry_enobufs: false,
        }
    }

    /// Frames for a local device (a guest's tap or veth through a packet socket):
    /// a full device queue is the reader being briefly behind, so wait for it a
    /// few milliseconds as a blocking write would, rather than drop frames that
    /// TCP would then resend in bursts.
    pub fn retry_full_queue(mut self) -> SendBatch {
        self.retry_enobufs = true;
        self
    }

    fn parts(&mut self) -> SendParts<'_> {
        let (m, o, n) = (&self.meta, &self.offs, self.slots);
        // SAFETY: six disjoint arrays of `n` zero-initialised (valid) elements each,
        // borrowed for as long as &mut self.
        unsafe {
            SendParts {
                lens: std::slice::from_raw_parts_mut(m.at(o[0]), n),
                dests: std::slice::from_raw_parts_mut(m.at(o[1]), n),
                iov: std::slice::from_raw_parts_mut(m.at(o[2]), n),
                runs: std::slice::from_raw_parts_mut(m.at(o[3]), n),
                hdrs: std::slice::from_raw_parts_mut(m.at(o[4]), n),
                ctrl: std::slice::from_raw_parts_mut(m.at(o[5]), n),
            }
        }
    }

    /// The socket is connected to `peer`: datagrams to it go without an address, so
    /// the kernel uses the socket's cached route.
    pub fn set_connected(&mut self, peer: Option<SocketAddr>) {
        self.connected = peer;
    }

    pub fn is_full(&self) -> bool {
        self.n == self.slots
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
        assert!(!self.is_full(), "SendBatch::push on a full batch");
        let i = self.n;
        let l = fill(&mut self.bufs[i * self.slot..(i + 1) * self.slot]).min(self.slot);
        let dest = if dest.is_some() && dest == self.connected {
            None
        } else {
            dest
        };
        let p = self.parts();
        p.lens[i] = l;
        p.dests[i] = match dest {
            Some(SocketAddr::V4(a)) => libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            },
            // Unset family: a connected/bound socket sends to its default.
            _ => libc::sockaddr_in {
                sin_family: 0,
                sin_port: 0,
                sin_addr: libc::in_addr { s_addr: 0 },
                sin_zero: [0; 8],
            },
        };
        self.n += 1;
    }

    /// Coalesce runs of equal-size datagrams to one destination into UDP GSO sends
    /// (one trip through the stack per run). Falls back by itself if the kernel or
    /// device refuses.
    pub fn set_gso(&mut self, on: bool) {
        self.gso = on;
    }

    /// Send everything queued. Datagrams the kernel refuses (e.g. a full buffer on a
    /// non-blocking socket or an unreachable peer) are dropped, like a wire would.
    /// Returns how many were sent.
    pub fn flush(&mut self, fd: RawFd) -> io::Result<usize> {
        let n = self.n;
        self.n = 0;
        if n == 0 {
            return Ok(0);
        }
        let (slot, gso, bufs) = (self.slot, self.gso, self.bufs.as_mut_ptr());
        let retry_enobufs = self.retry_enobufs;
        let p = self.parts();
        for i in 0..n {
            p.iov[i] = libc::iovec {
                // SAFETY: i < slots, inside `bufs`.
                iov_base: unsafe { bufs.add(i * slot) } as *mut libc::c_void,
                iov_len: p.lens[i],
            };
        }
        let mut m = 0;
        let mut i = 0;
        while i < n {
            let mut j = i + 1;
            if gso {
                let (len, d) = (p.lens[i], &p.dests[i]);
                let mut total = len;
                while j < n
                    && j - i < GSO_MAX_SEGS
                    && same_dest(&p.dests[j], d)
                    && p.lens[j] <= len
                    && total + p.lens[j] <= GSO_MAX_BYTES
                    && p.lens[j - 1] == len
                {
                    total += p.lens[j];
                    j += 1;
                }
            }
            p.runs[m] = (i, j);
            m += 1;
            i = j;
        }
        for k in 0..m {
            let (a, b) = p.runs[k];
            let h = &mut p.hdrs[k].msg_hdr;
            if p.dests[a].sin_family == libc::AF_INET as libc::sa_family_t {
                h.msg_name = &mut p.dests[a] as *mut _ as *mut libc::c_void;
                h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            } else {
                h.msg_name = std::ptr::null_mut();
                h.msg_namelen = 0;
            }
            h.msg_iov = &mut p.iov[a];
            h.msg_iovlen = (b - a) as _;
            if b - a > 1 {
                let c = &mut p.ctrl[k];
                h.msg_control = c.as_mut_ptr() as *mut libc::c_void;
                // SAFETY: the control buffer has room for one u16 cmsg.
                unsafe {
                    h.msg_controllen = libc::CMSG_SPACE(2) as _;
                    let cm = libc::CMSG_FIRSTHDR(h);
                    (*cm).cmsg_level = libc::SOL_UDP;
                    (*cm).cmsg_type = UDP_SEGMENT;
                    (*cm).cmsg_len = libc::CMSG_LEN(2) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(cm) as *mut u16, p.lens[a] as u16);
                }
            } else {
                h.msg_control = std::ptr::null_mut();
                h.msg_controllen = 0;
            }
        }
        let mut retries = 0;
        let mut off = 0;
        let mut sent = 0;
        let mut no_gso = false;
        while off < m {
            // SAFETY: headers point into self's buffers.
            let r = unsafe {
                libc::sendmmsg(fd, p.hdrs[off..].as_mut_ptr(), (m - off) as libc::c_uint, 0)
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                let (a, b) = p.runs[off];
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    // Drop what the kernel refused and go on with the rest.
                    io::ErrorKind::WouldBlock
                    | io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::HostUnreachable
                    | io::ErrorKind::NetworkUnreachable => {
                        off += 1;
                        continue;
                    }
                    _ if b - a > 1
                        && matches!(
                            e.raw_os_error(),
                            Some(libc::EIO) | Some(libc::EINVAL) | Some(libc::ENOPROTOOPT)
                        ) =>
                    {
                        // No UDP GSO on this path: send this run one by one, and stop trying.
                        no_gso = true;
                        let h = &mut p.hdrs[off].msg_hdr;
                        h.msg_control = std::ptr::null_mut();
                        h.msg_controllen = 0;
                        for s in a..b {
                            h.msg_iov = &mut p.iov[s];
                            h.msg_iovlen = 1;
                            // SAFETY: as above, one message.
                            if unsafe { libc::sendmsg(fd, h, 0) } >= 0 {
                                sent += 1;
                            }
                        }
                        off += 1;
                        continue;
                    }
                    _ if retry_enobufs
                        && retries < ENOBUFS_RETRIES
                        && e.raw_os_error() == Some(libc::ENOBUFS) =>
                    {
                        std::thread::sleep(std::time::Duration::from_micros(20 << retries));
                        retries += 1;
                        continue;
                    }
                    _ if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOBUFS)
                            | Some(libc::EMSGSIZE)
                            | Some(libc::ENXIO)
                            | Some(libc::ENETDOWN)
                    ) =>
                    {
                        off += 1;
                        continue;
                    }
                    _ => {
                        self.gso &= !no_gso;
                        return Err(e);
                    }
                }
            }
            for &(a, b) in &p.runs[off..off + r as usize] {
                sent += b - a;
            }
            off += r as usize;
            retries = 0;
        }
        self.gso &= !no_gso;
        Ok(sent)
    }
}

/// Make a blocking receive return after `ms` so loops can notice a stop request.
pub fn set_timeout(fd: RawFd, ms: u64) -> io::Result<()> {
    sys::set_recv_timeout(fd, ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    /// A control buffer laid out by libc's own CMSG_* macros: (level, type, payload).
    fn libc_cmsgs(msgs: &[(libc::c_int, libc::c_int, &[u8])]) -> Vec<u8> {
        let mut buf = vec![0u64; 32];
        // SAFETY: a zeroed msghdr is valid; every CMSG_* pointer stays inside `buf`
        // (256 bytes, more than the messages the tests build need).
        unsafe {
            let mut m: libc::msghdr = std::mem::zeroed();
            m.msg_control = buf.as_mut_ptr().cast();
            m.msg_controllen = 256;
            let mut c = libc::CMSG_FIRSTHDR(&m);
            let mut used = 0;
            for &(level, ty, data) in msgs {
                (*c).cmsg_level = level;
                (*c).cmsg_type = ty;
                (*c).cmsg_len = libc::CMSG_LEN(data.len() as u32) as _;
                std::ptr::copy_nonoverlapping(data.as_ptr(), libc::CMSG_DATA(c), data.len());
                used += libc::CMSG_SPACE(data.len() as u32) as usize;
                c = libc::CMSG_NXTHDR(&m, c);
            }
            let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
            bytes[..used].to_vec()
        }
    }

    #[test]
    fn cmsgs_laid_out_by_libc_are_found() {
        let aux = [7u8; 20];
        let ctrl = libc_cmsgs(&[
            (libc::SOL_UDP, UDP_GRO, &1400i32.to_ne_bytes()),
            (libc::SOL_PACKET, sys::PACKET_AUXDATA, &aux),
        ]);
        assert_eq!(
            find_cmsg(&ctrl, libc::SOL_UDP, UDP_GRO).map(i32::from_cmsg),
            Some(1400)
        );
        assert_eq!(
            find_cmsg(&ctrl, libc::SOL_PACKET, sys::PACKET_AUXDATA),
            Some(&aux[..])
        );
        assert_eq!(find_cmsg(&ctrl, libc::SOL_IP, 1), None);
        // A buffer cut short (MSG_CTRUNC) yields what is there, never more.
        // (The second message starts after the first's header and padded int.)
        let cut = &ctrl[..CMSG_DATA_AT + 8 + CMSG_DATA_AT + 10];
        assert_eq!(
            find_cmsg(cut, libc::SOL_PACKET, sys::PACKET_AUXDATA),
            Some(&aux[..10])
        );
    }

    #[test]
    fn auxdata_reads_each_field_from_its_place() {
        let mut b = Vec::new();
        for v in [0x10u32, 1500, 1500] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        for v in [14u16, 18, 0x0123, 0x88a8] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        let a = sys::TpacketAuxdata::from_cmsg(&b);
        assert_eq!((a.tp_status, a.tp_len, a.tp_snaplen), (0x10, 1500, 1500));
        assert_eq!((a.tp_mac, a.tp_net), (14, 18));
        assert_eq!((a.tp_vlan_tci, a.tp_vlan_tpid), (0x0123, 0x88a8));
        // Short payloads read as zero-extended.
        assert_eq!(sys::TpacketAuxdata::from_cmsg(&b[..4]).tp_status, 0x10);
        assert_eq!(sys::TpacketAuxdata::from_cmsg(&b[..4]).tp_len, 0);
        assert_eq!(u16::from_cmsg(&[]), 0);
    }

    proptest::proptest! {
        // Whatever the kernel (or a stale slot) left in a control buffer, the walk
        // stays inside it and returns a payload inside it.
        #[test]
        fn find_cmsg_stays_inside_any_buffer(
            ctrl in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            level in 0i32..3,
            ty in 0i32..3,
        ) {
            if let Some(p) = find_cmsg(&ctrl, level, ty) {
                let (lo, hi) = (ctrl.as_ptr() as usize, ctrl.as_ptr() as usize + ctrl.len());
                let (a, b) = (p.as_ptr() as usize, p.as_ptr() as usize + p.len());
                proptest::prop_assert!(p.is_empty() || (lo <= a && b <= hi));
            }
        }
    }

    // Over loopback: a GSO send of equal-size datagrams plus a short tail and a
    // datagram to another port, received with UDP GRO, comes out as the same
    // datagrams in order.
    #[test]
    fn gso_send_and_gro_receive_keep_datagrams() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let other = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        set_timeout(rx.as_raw_fd(), 1000).unwrap();
        set_timeout(other.as_raw_fd(), 1000).unwrap();
        let mut recv = RecvBatch::new(8, 65536);
        recv.enable_udp_gro(rx.as_raw_fd());
        let mut send = SendBatch::new(16, 2048);
        send.set_gso(true);
        let dst = rx.local_addr().unwrap();
        let mut want = Vec::new();
        for i in 0..10u8 {
            let len = if i == 9 { 300 } else { 1200 };
            let d: Vec<u8> = (0..len).map(|k| (k as u8).wrapping_add(i)).collect();
            send.push(Some(dst), |b| {
                b[..d.len()].copy_from_slice(&d);
                d.len()
            });
            want.push(d);
        }
        send.push(Some(other.local_addr().unwrap()), |b| {
            b[..3].copy_from_slice(b"abc");
            3
        });
        assert_eq!(send.flush(tx.as_raw_fd()).unwrap(), 11);
        let mut got: Vec<Vec<u8>> = Vec::new();
        while got.len() < want.len() {
            let n = recv.recv(rx.as_raw_fd()).unwrap();
            assert!(n > 0, "timed out after {} datagrams", got.len());
            for i in 0..n {
                got.extend(recv.segments(i).map(|s| s.to_vec()));
            }
        }
        assert_eq!(got, want);
        let mut b = [0u8; 16];
        assert_eq!(other.recv(&mut b).unwrap(), 3);
    }

    // Headers are set up once and only the used ones reset: a full batch, then a
    // truncated one, then a short one from another sender must each read right.
    #[test]
    fn reused_headers_report_each_receive_right() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let dst = rx.local_addr().unwrap();
        let mut recv = RecvBatch::new(4, 64);
        for i in 0..4u8 {
            a.send_to(&[i; 40], dst).unwrap();
        }
        let wait = |recv: &mut RecvBatch, want: usize| {
            let t = std::time::Instant::now();
            loop {
                let n = recv.recv_nowait(rx.as_raw_fd()).unwrap();
                if n > 0 {
                    assert_eq!(n, want);
                    return;
                }
                assert!(t.elapsed().as_secs() < 5, "nothing received");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        };
        wait(&mut recv, 4);
        for i in 0..4 {
            assert_eq!(recv.data(i), &[i as u8; 40][..]);
            assert_eq!(recv.addr(i), Some(a.local_addr().unwrap()));
            assert!(!recv.truncated(i));
        }
        a.send_to(&[9; 100], dst).unwrap();
        wait(&mut recv, 1);
        assert!(recv.truncated(0));
        assert_eq!(recv.data(0), &[9; 64][..]);
        b.send_to(&[7; 10], dst).unwrap();
        wait(&mut recv, 1);
        assert!(!recv.truncated(0));
        assert_eq!(recv.data(0), &[7; 10][..]);
        assert_eq!(recv.addr(0), Some(b.local_addr().unwrap()));
        assert_eq!(recv.recv_nowait(rx.as_raw_fd()).unwrap(), 0);
    }
}
