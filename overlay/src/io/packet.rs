//! The seller's guest port: an AF_PACKET socket bound to the guest's interface (a tap
//! the VMM holds, or a veth end for a namespace "guest") inside the lease's network
//! namespace. It is the only way frames get in or out of that namespace.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

use super::batch::{RecvBatch, SendBatch};
use super::netns::NetNs;
use super::offload::{self, OffloadError, VnetHdr, VNET_HDR_LEN};
use super::sys;

/// Slot size for received frames: a 64 KiB GSO burst plus headers.
pub const RX_SLOT: usize = 65536 + VNET_HDR_LEN + 64;

#[derive(Debug)]
pub struct PacketPort {
    fd: OwnedFd,
    ifname: String,
    ifindex: u32,
}

impl PacketPort {
    /// Open a port on `ifname` in the calling thread's network namespace. Brings the
    /// interface up and turns IPv6 off on it, so the kernel never speaks on it.
    pub fn open_here(ifname: &str) -> io::Result<PacketPort> {
        let ifindex = sys::if_index(ifname)?;
        let _ = sys::write_net_sysctl(&format!("ipv6/conf/{ifname}/disable_ipv6"), "1");
        let fd = socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| {
            if e == Errno::EPERM {
                io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "opening an AF_PACKET socket needs CAP_NET_RAW (run the seller as root)",
                )
            } else {
                e.into()
            }
        })?;
        let raw = fd.as_raw_fd();
        let one: libc::c_int = 1;
        // Our own transmissions must not come back as guest frames.
        sys::setsockopt(raw, libc::SOL_PACKET, sys::PACKET_IGNORE_OUTGOING, &one)?;
        // The kernel strips VLAN tags into metadata; auxdata lets us put them back so
        // the egress filter sees (and drops) tagged frames.
        sys::setsockopt(raw, libc::SOL_PACKET, sys::PACKET_AUXDATA, &one)?;
        // Offload metadata: partial checksums and TSO bursts from the guest.
        sys::setsockopt(raw, libc::SOL_PACKET, sys::PACKET_VNET_HDR, &one)?;
        // Frames to the guest go straight to the device (no qdisc on the way): the
        // core's token buckets already pace them.
        let _ = sys::setsockopt(raw, libc::SOL_PACKET, sys::PACKET_QDISC_BYPASS, &one);
        sys::set_socket_buffers(raw, 8 << 20);
        // Bind to this interface, all protocols. nix 0.29 cannot build a sockaddr_ll
        // (LinkAddr has no safe constructor), so this bind stays raw.
        let sll = libc::sockaddr_ll {
            sll_family: libc::AF_PACKET as u16,
            sll_protocol: sys::ETH_P_ALL.to_be(),
            sll_ifindex: ifindex as i32,
            sll_hatype: 0,
            sll_pkttype: 0,
            sll_halen: 0,
            sll_addr: [0; 8],
        };
        // SAFETY: a live sockaddr_ll and its exact size; the kernel only reads it.
        let r = unsafe {
            libc::bind(
                raw,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let mr = sys::PacketMreq {
            mr_ifindex: ifindex as i32,
            mr_type: sys::PACKET_MR_PROMISC,
            mr_alen: 0,
            mr_address: [0; 8],
        };
        sys::setsockopt(raw, libc::SOL_PACKET, sys::PACKET_ADD_MEMBERSHIP, &mr)?;
        sys::set_up(ifname, true)?;
        Ok(PacketPort {
            fd,
            ifname: ifname.to_string(),
            ifindex,
        })
    }

    /// Open a port on `ifname` inside `ns` (the socket stays bound to that namespace).
    pub fn open_in(ns: &NetNs, ifname: &str) -> io::Result<PacketPort> {
        let n = ifname.to_string();
        ns.run(move || PacketPort::open_here(&n))
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    pub fn try_clone(&self) -> io::Result<PacketPort> {
        Ok(PacketPort {
            fd: self.fd.try_clone()?,
            ifname: self.ifname.clone(),
            ifindex: self.ifindex,
        })
    }

    /// A receive batch sized for this port.
    pub fn recv_batch(slots: usize) -> RecvBatch {
        RecvBatch::new(slots, RX_SLOT)
    }

    /// A send batch sized for this port (frames up to `max_frame` bytes).
    pub fn send_batch(slots: usize, max_frame: usize) -> SendBatch {
        SendBatch::new(slots, max_frame + VNET_HDR_LEN).retry_full_queue()
    }

    /// Receive a batch and hand every wire frame in it to `emit` (TSO bursts cut into
    /// segments, partial checksums finished, stripped VLAN tags put back). Frames
    /// whose offload metadata cannot be honoured are handed over unchanged with the
    /// error, so the caller's filter can count them. Returns messages received.
    pub fn recv_frames(
        &self,
        batch: &mut RecvBatch,
        scratch: &mut Vec<u8>,
        seg: &mut Vec<u8>,
        emit: impl FnMut(&[u8], Option<OffloadError>),
    ) -> io::Result<usize> {
        let n = batch.recv(self.fd.as_raw_fd())?;
        Self::split_frames(batch, n, scratch, seg, emit);
        Ok(n)
    }

    /// Like [`PacketPort::recv_frames`] but never blocks (0 when nothing is queued).
    pub fn recv_frames_nowait(
        &self,
        batch: &mut RecvBatch,
        scratch: &mut Vec<u8>,
        seg: &mut Vec<u8>,
        emit: impl FnMut(&[u8], Option<OffloadError>),
    ) -> io::Result<usize> {
        let n = batch.recv_nowait(self.fd.as_raw_fd())?;
        Self::split_frames(batch, n, scratch, seg, emit);
        Ok(n)
    }

    fn split_frames(
        batch: &mut RecvBatch,
        n: usize,
        scratch: &mut Vec<u8>,
        seg: &mut Vec<u8>,
        mut emit: impl FnMut(&[u8], Option<OffloadError>),
    ) {
        for i in 0..n {
            let aux: Option<sys::TpacketAuxdata> =
                batch.cmsg(i, libc::SOL_PACKET, sys::PACKET_AUXDATA);
            let truncated = batch.truncated(i);
            let (slot, len) = batch.slot_mut(i);
            let Some(h) = VnetHdr::parse(&slot[..len]) else {
                continue;
            };
            let frame = &mut slot[VNET_HDR_LEN..len];
            // Untagged frames (nearly all) are finished in place in the receive slot.
            let (buf, h) = match aux {
                Some(a) if a.tp_status & sys::TP_STATUS_VLAN_VALID != 0 && frame.len() >= 12 => {
                    let tpid = if a.tp_status & sys::TP_STATUS_VLAN_TPID_VALID != 0
                        && a.tp_vlan_tpid != 0
                    {
                        a.tp_vlan_tpid
                    } else {
                        0x8100
                    };
                    scratch.clear();
                    scratch.extend_from_slice(&frame[..12]);
                    scratch.extend_from_slice(&tpid.to_be_bytes());
                    scratch.extend_from_slice(&a.tp_vlan_tci.to_be_bytes());
                    scratch.extend_from_slice(&frame[12..]);
                    let mut h2 = h;
                    // The re-inserted tag shifts the checksum start.
                    h2.csum_start = h2.csum_start.saturating_add(4);
                    (&mut scratch[..], h2)
                }
                _ => (frame, h),
            };
            if truncated {
                // Larger than any slot: certainly over the size cap; let the filter count it.
                emit(buf, Some(OffloadError::Malformed));
                continue;
            }
            if let Err(e) = offload::to_wire_frames(&h, buf, seg, |f| emit(f, None)) {
                emit(buf, Some(e));
            }
        }
    }

    /// Queue `frame` for transmission on the guest interface.
    pub fn queue(batch: &mut SendBatch, frame: &[u8]) {
        Self::queue_with_hdr(batch, &[0; VNET_HDR_LEN], frame)
    }

    /// Queue a frame with its own virtio_net_hdr `hdr` (e.g. a TSO frame from
    /// [`super::offload::TcpMerger`]).
    pub fn queue_with_hdr(batch: &mut SendBatch, hdr: &[u8], frame: &[u8]) {
        batch.push(None, |b| {
            let h = hdr.len().min(b.len());
            b[..h].copy_from_slice(&hdr[..h]);
            let l = frame.len().min(b.len() - h);
            b[h..h + l].copy_from_slice(&frame[..l]);
            h + l
        });
    }

    pub fn flush(&self, batch: &mut SendBatch) -> io::Result<usize> {
        batch.flush(self.fd.as_raw_fd())
    }
}

impl AsRawFd for PacketPort {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
