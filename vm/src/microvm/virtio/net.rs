//! virtio-net on the guest's tap. The vCPU thread transmits when the driver kicks the
//! TX queue; a small RX thread moves frames from the tap into the RX queue.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::SharedTransport;
use super::{
    add_used, pop_chain, read_config_bytes, write_to_bufs, Irq, VirtioDevice, DEVICE_ID_NET,
};

const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const QUEUE_SIZE: u16 = 256;
/// virtio_net_hdr_v1 (with num_buffers), the header size for VIRTIO_F_VERSION_1.
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame we move (64 KiB plus header), bounding buffers.
const MAX_FRAME: usize = 65_562;
const RXQ: usize = 0;
const TXQ: usize = 1;

/// Open the tap interface `name` (in this process's network namespace).
pub fn open_tap(name: &str) -> std::io::Result<OwnedFd> {
    open_tap_with(name, false)
}

/// Open the tap interface `name`; with `vnet_hdr`, frames on the fd carry a virtio-net
/// header (IFF_VNET_HDR), which the device then passes through instead of adding.
pub fn open_tap_with(name: &str, vnet_hdr: bool) -> std::io::Result<OwnedFd> {
    Ok(tapdev::open_tap(name, vnet_hdr)?.into())
}

/// Make the tap fd non-blocking and tell whether frames on it carry a virtio-net
/// header (IFF_VNET_HDR). Non-tap fds (a socket standing in for a tap) carry none.
fn prepare_tap(fd: &OwnedFd) -> std::io::Result<bool> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let raw = fd.as_raw_fd();
    let fl = OFlag::from_bits_retain(fcntl(raw, FcntlArg::F_GETFL)?);
    fcntl(raw, FcntlArg::F_SETFL(fl | OFlag::O_NONBLOCK))?;
    match tapdev::tap_flags(fd) {
        Some(flags) if flags & tapdev::IFF_VNET_HDR != 0 => {
            tapdev::set_vnet_hdr_size(fd, VNET_HDR_LEN)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

pub struct Net {
    tap: Arc<File>,
    vnet_hdr: bool,
    config: [u8; 8],
    rx_kick: Arc<EventFd>,
    tx_buf: Vec<u8>,
    pub tx_dropped: u64,
}

impl Net {
    /// A NIC with `mac` on the tap `fd`; also returns the RX-kick eventfd the RX thread
    /// waits on.
    pub fn new(
        fd: OwnedFd,
        mac: [u8; 6],
    ) -> std::io::Result<(Self, Arc<File>, Arc<EventFd>, bool)> {
        let vnet_hdr = prepare_tap(&fd)?;
        let tap = Arc::new(File::from(fd));
        let rx_kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&mac);
        let net = Net {
            tap: tap.clone(),
            vnet_hdr,
            config,
            rx_kick: rx_kick.clone(),
            tx_buf: Vec::with_capacity(MAX_FRAME),
            tx_dropped: 0,
        };
        Ok((net, tap, rx_kick, vnet_hdr))
    }

    fn transmit(&mut self, q: &mut Queue, mem: &GuestMemoryMmap, irq: &Irq) {
        let mut used = false;
        while let Some(chain) = pop_chain(q, mem) {
            self.tx_buf.clear();
            let mut ok = true;
            for b in chain.bufs.iter().filter(|b| !b.write_only) {
                let start = self.tx_buf.len();
                if start + b.len as usize > MAX_FRAME {
                    ok = false;
                    break;
                }
                self.tx_buf.resize(start + b.len as usize, 0);
                if mem.read_slice(&mut self.tx_buf[start..], b.addr).is_err() {
                    ok = false;
                    break;
                }
            }
            if ok && self.tx_buf.len() > VNET_HDR_LEN {
                let frame = if self.vnet_hdr {
                    &self.tx_buf[..]
                } else {
                    &self.tx_buf[VNET_HDR_LEN..]
                };
                // A full or down tap drops the frame, as a real NIC on a busy link would.
                if (&*self.tap).write(frame).is_err() {
                    self.tx_dropped += 1;
                }
            } else {
                self.tx_dropped += 1;
            }
            used |= add_used(q, mem, chain.head, 0);
        }
        if used {
            irq.signal_used();
        }
    }
}

impl VirtioDevice for Net {
    fn device_id(&self) -> u32 {
        DEVICE_ID_NET
    }
    fn features(&self) -> u64 {
        VIRTIO_NET_F_MAC
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data)
    }
    fn notify(&mut self, idx: usize, queues: &mut [Queue], mem: &GuestMemoryMmap, irq: &Irq) {
        match idx {
            RXQ => {
                let _ = self.rx_kick.write(1);
            }
            TXQ => self.transmit(&mut queues[TXQ], mem, irq),
            _ => {}
        }
    }
}

/// Deliver `frame` (without a virtio header unless `vnet_hdr`) into the next RX chain.
/// Returns false when the guest has posted no buffer (the caller keeps the frame).
fn deliver(t: &mut super::mmio::MmioTransport, frame: &[u8], vnet_hdr: bool) -> bool {
    if !t.driver_ok() || !t.queues[RXQ].ready() {
        // No driver yet: the frame is dropped, as on an unconfigured NIC.
        return true;
    }
    let mem = t.mem().clone();
    let Some(chain) = pop_chain(&mut t.queues[RXQ], &mem) else {
        return false;
    };
    let mut f = Vec::with_capacity(VNET_HDR_LEN + frame.len());
    if vnet_hdr {
        f.extend_from_slice(frame);
    } else {
        f.extend_from_slice(&[0u8; VNET_HDR_LEN]);
        f.extend_from_slice(frame);
    }
    if f.len() < VNET_HDR_LEN {
        return true;
    }
    f[10] = 1; // num_buffers
    f[11] = 0;
    let room: u64 = chain
        .bufs
        .iter()
        .filter(|b| b.write_only)
        .map(|b| u64::from(b.len))
        .sum();
    if (f.len() as u64) > room {
        // Too big for the guest's buffer: drop the frame (as a NIC drops frames above
        // its MTU) and leave the buffer for the next one.
        let q = &mut t.queues[RXQ];
        q.set_next_avail(q.next_avail().wrapping_sub(1));
        return true;
    }
    let written = write_to_bufs(&mem, &chain.bufs, &f);
    let len = written.unwrap_or(0) as u32;
    if add_used(&mut t.queues[RXQ], &mem, chain.head, len) {
        t.irq.signal_used();
    }
    true
}

/// The RX loop: runs until `exit` is signalled.
pub fn rx_loop(
    transport: SharedTransport,
    tap: Arc<File>,
    rx_kick: Arc<EventFd>,
    exit: Arc<EventFd>,
    vnet_hdr: bool,
) {
    let mut frame = vec![0u8; MAX_FRAME];
    let mut pending: Option<usize> = None;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: exit.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: rx_kick.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: tap.as_raw_fd(),
                // While a frame waits for guest buffers, do not read more.
                events: if pending.is_some() { 0 } else { libc::POLLIN },
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of pollfd for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        if fds[1].revents != 0 {
            let _ = rx_kick.read();
        }
        if fds[2].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            return;
        }
        loop {
            if pending.is_none() {
                match (&*tap).read(&mut frame) {
                    Ok(0) => return,
                    Ok(n) => pending = Some(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    // EIO: the tap has no carrier yet; wait for the next readiness.
                    Err(_) => break,
                }
            }
            let n = pending.expect("set above");
            let mut t = transport.lock().unwrap_or_else(|p| p.into_inner());
            if deliver(&mut t, &frame[..n], vnet_hdr) {
                pending = None;
            } else {
                // Ask to be kicked when the guest adds buffers, then re-check once
                // so a buffer added in between is not missed.
                let mem = t.mem().clone();
                let _ = t.queues[RXQ].enable_notification(&mem);
                if deliver(&mut t, &frame[..n], vnet_hdr) {
                    pending = None;
                } else {
                    break;
                }
            }
        }
    }
}
