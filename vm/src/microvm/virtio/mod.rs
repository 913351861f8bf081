//! virtio devices on the virtio-mmio (version 2) transport.

pub mod blk;
pub mod mmio;
pub mod net;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const DEVICE_ID_NET: u32 = 1;
pub const DEVICE_ID_BLOCK: u32 = 2;
/// Interrupt status bit: a used buffer was returned.
pub const INT_USED_RING: u32 = 1;

/// The device's interrupt line: an irqfd wired to its IOAPIC pin, plus the
/// InterruptStatus register the driver reads and acknowledges.
#[derive(Clone)]
pub struct Irq {
    status: Arc<AtomicU32>,
    evt: Arc<EventFd>,
}

impl Irq {
    pub fn new(evt: EventFd) -> Self {
        Irq {
            status: Arc::new(AtomicU32::new(0)),
            evt: Arc::new(evt),
        }
    }
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
    pub fn signal_used(&self) {
        self.status.fetch_or(INT_USED_RING, Ordering::SeqCst);
        // An eventfd write only fails when its counter would overflow; the
        // interrupt is pending then anyway.
        let _ = self.evt.write(1);
    }
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// One buffer of a descriptor chain.
#[derive(Debug, Clone, Copy)]
pub struct Buf {
    pub addr: GuestAddress,
    pub len: u32,
    pub write_only: bool,
}

/// A popped descriptor chain, flattened.
pub struct Chain {
    pub head: u16,
    pub bufs: Vec<Buf>,
}

/// Pop the next available chain of `queue`, if any. Chains longer than the queue are
/// refused by virtio-queue, so a guest cannot make us loop.
pub fn pop_chain(queue: &mut Queue, mem: &GuestMemoryMmap) -> Option<Chain> {
    use virtio_queue::QueueT;
    let chain = queue.pop_descriptor_chain(mem)?;
    let head = chain.head_index();
    let bufs = chain
        .map(|d| Buf {
            addr: d.addr(),
            len: d.len(),
            write_only: d.is_write_only(),
        })
        .collect();
    Some(Chain { head, bufs })
}

/// Return a chain to the guest with `len` bytes written into it.
pub fn add_used(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) -> bool {
    use virtio_queue::QueueT;
    queue.add_used(mem, head, len).is_ok()
}

/// Copy `data` into the chain's device-writable buffers; returns bytes written, or
/// `None` when a buffer lies outside guest memory.
pub fn write_to_bufs(mem: &GuestMemoryMmap, bufs: &[Buf], mut data: &[u8]) -> Option<usize> {
    let mut written = 0;
    for b in bufs.iter().filter(|b| b.write_only) {
        if data.is_empty() {
            break;
        }
        let n = data.len().min(b.len as usize);
        mem.write_slice(&data[..n], b.addr).ok()?;
        written += n;
        data = &data[n..];
    }
    Some(written)
}

/// What a device needs from the transport.
pub trait VirtioDevice: Send {
    fn device_id(&self) -> u32;
    /// Feature bits offered (VIRTIO_F_VERSION_1 is added by the transport).
    fn features(&self) -> u64;
    fn queue_max_sizes(&self) -> &[u16];
    /// Read from the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver notified queue `idx`.
    fn notify(&mut self, idx: usize, queues: &mut [Queue], mem: &GuestMemoryMmap, irq: &Irq);
    /// The driver reset the device.
    fn reset(&mut self) {}
}

/// Copy bytes out of a config space image.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = config.get(offset as usize + i).copied().unwrap_or(0);
    }
}

#[cfg(test)]
mod fuzz {
    //! Guest-controlled input (registers, rings, descriptors, request headers) must
    //! never panic the VMM or reach outside guest memory or past the disk's end.

    use std::io::Write;
    use std::os::fd::OwnedFd;

    use proptest::prelude::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EventFd;

    use super::blk::Block;
    use super::mmio::MmioTransport;
    use super::net::Net;
    use super::{Irq, VirtioDevice};

    const MEM: usize = 256 << 10;

    fn transport(dev: Box<dyn VirtioDevice>, fill: &[u8]) -> MmioTransport {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
        // Random guest memory: rings and descriptors hold whatever the guest put there.
        for (i, chunk) in fill.chunks(64).enumerate() {
            let at = (i * 4099) % (MEM - 64);
            mem.write_slice(chunk, GuestAddress(at as u64)).unwrap();
        }
        let irq = Irq::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut t = MmioTransport::new(dev, mem, irq);
        // Driver handshake with queues at fixed, valid places.
        for (off, v) in [(0x70u64, 1u32), (0x70, 3), (0x24, 1), (0x20, 1), (0x70, 11)] {
            t.write(off, &v.to_le_bytes());
        }
        for q in 0..2u32 {
            let base = 0x1000 + q * 0x4000;
            for (off, v) in [
                (0x30u64, q),
                (0x38, 16),
                (0x80, base),
                (0x90, base + 0x1000),
                (0xa0, base + 0x2000),
                (0x44, 1),
            ] {
                t.write(off, &v.to_le_bytes());
            }
        }
        t.write(0x70, &15u32.to_le_bytes());
        t
    }

    fn ops() -> impl Strategy<Value = Vec<(u64, u32)>> {
        prop::collection::vec(
            (
                prop_oneof![
                    Just(0x50u64),
                    Just(0x50),
                    Just(0x30),
                    Just(0x38),
                    Just(0x44),
                    Just(0x64),
                    Just(0x70),
                    Just(0x80),
                    Just(0x90),
                    Just(0xa0),
                    0u64..0x200,
                ],
                prop_oneof![0u32..4, any::<u32>()],
            ),
            1..40,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn block_survives_any_guest(fill in prop::collection::vec(any::<u8>(), 0..8192), ops in ops()) {
            let mut file = tempfile::tempfile().unwrap();
            file.write_all(&[7u8; 8192]).unwrap();
            let probe = file.try_clone().unwrap();
            let dev = Block::new(file, false, "fuzz").unwrap();
            let mut t = transport(Box::new(dev), &fill);
            for (off, v) in ops {
                t.write(off, &v.to_le_bytes());
                let mut b = [0u8; 4];
                t.read(off, &mut b);
            }
            prop_assert_eq!(probe.metadata().unwrap().len(), 8192, "disk never grows");
        }

        #[test]
        fn net_survives_any_guest(fill in prop::collection::vec(any::<u8>(), 0..8192), ops in ops()) {
            // A datagram socketpair stands in for the tap (no virtio header on it).
            let (a, _b) = std::os::unix::net::UnixDatagram::pair().unwrap();
            let (dev, _tap, _kick, vnet) = Net::new(OwnedFd::from(a), [2, 0, 0, 0, 0, 1]).unwrap();
            prop_assert!(!vnet);
            let mut t = transport(Box::new(dev), &fill);
            for (off, v) in ops {
                t.write(off, &v.to_le_bytes());
            }
        }
    }
}
