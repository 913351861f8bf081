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
