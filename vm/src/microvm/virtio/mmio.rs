//! The virtio-mmio register block (virtio 1.x, "version 2" layout).

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{read_config_bytes, Irq, VirtioDevice, VIRTIO_F_VERSION_1};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4355_5053; // "CPUS"

const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FAILED: u32 = 0x80;

/// A device plus its transport state.
pub struct MmioTransport {
    pub device: Box<dyn VirtioDevice>,
    pub queues: Vec<Queue>,
    pub irq: Irq,
    mem: GuestMemoryMmap,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
}

/// Shared handle: the vCPU threads and the device's own I/O thread (net RX) both use it.
pub type SharedTransport = Arc<Mutex<MmioTransport>>;

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irq: Irq) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("queue sizes are powers of two"))
            .collect();
        MmioTransport {
            device,
            queues,
            irq,
            mem,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
        }
    }

    pub fn driver_ok(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_FAILED == 0
    }

    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    fn all_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.irq.ack(u32::MAX);
        self.device.reset();
    }

    /// An MMIO read at `offset` into the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        let v: u32 = match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device.device_id(),
            0x00c => VENDOR_ID,
            0x010 => {
                let f = self.all_features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x034 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x044 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x060 => self.irq.status(),
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => 0,
        };
        read_config_bytes(&v.to_le_bytes(), 0, data);
    }

    /// An MMIO write at `offset` into the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            // Net and block config spaces have nothing the driver may change.
            return;
        }
        if data.len() != 4 {
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let configurable = self.status & STATUS_DRIVER_OK == 0;
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 => {
                // Accept only features we offered.
                let offered = self.all_features();
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
                self.driver_features &= offered;
            }
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 if configurable => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            0x044 if configurable => {
                let mem = self.mem.clone();
                if let Some(q) = self.selected_queue() {
                    // Only a queue whose rings lie in guest memory goes live.
                    q.set_ready(v == 1);
                    if q.ready() && !q.is_valid(&mem) {
                        q.set_ready(false);
                    }
                }
            }
            0x050 => {
                let idx = v as usize;
                if self.driver_ok() && idx < self.queues.len() && self.queues[idx].ready() {
                    let mem = self.mem.clone();
                    self.device.notify(idx, &mut self.queues, &mem, &self.irq);
                }
            }
            0x064 => self.irq.ack(v),
            0x070 => {
                if v == 0 {
                    self.reset();
                } else {
                    self.status = v;
                }
            }
            0x080 if configurable => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            0x084 if configurable => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            0x090 if configurable => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            0x094 if configurable => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            0x0a0 if configurable => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            0x0a4 if configurable => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            _ => {}
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    struct Dummy;
    impl VirtioDevice for Dummy {
        fn device_id(&self) -> u32 {
            2
        }
        fn features(&self) -> u64 {
            1 << 5
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_bytes(&[1, 2, 3, 4], offset, data)
        }
        fn notify(&mut self, _: usize, _: &mut [Queue], _: &GuestMemoryMmap, irq: &Irq) {
            irq.signal_used();
        }
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    #[test]
    fn registers_follow_the_virtio_mmio_layout() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irq = Irq::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut t = MmioTransport::new(Box::new(Dummy), mem, irq);
        assert_eq!(rd(&mut t, 0), MAGIC);
        assert_eq!(rd(&mut t, 4), 2);
        assert_eq!(rd(&mut t, 8), 2);
        assert_eq!(rd(&mut t, 0x10), 1 << 5);
        wr(&mut t, 0x14, 1);
        assert_eq!(rd(&mut t, 0x10), 1, "VERSION_1 in the high word");
        assert_eq!(rd(&mut t, 0x34), 16);
        assert_eq!(rd(&mut t, 0x100), 0x0403_0201);
        // Unoffered driver features are dropped.
        wr(&mut t, 0x20, 0xffff_ffff);
        assert_eq!(t.driver_features, 1 << 5);
        // A queue with rings outside guest memory never becomes ready.
        wr(&mut t, 0x38, 16);
        wr(&mut t, 0x80, 0xfff0_0000);
        wr(&mut t, 0x44, 1);
        assert_eq!(rd(&mut t, 0x44), 0);
        wr(&mut t, 0x80, 0x1000);
        wr(&mut t, 0x90, 0x2000);
        wr(&mut t, 0xa0, 0x3000);
        wr(&mut t, 0x44, 1);
        assert_eq!(rd(&mut t, 0x44), 1);
        wr(&mut t, 0x70, 0xf);
        wr(&mut t, 0x50, 0);
        assert_eq!(rd(&mut t, 0x60), 1);
        wr(&mut t, 0x64, 1);
        assert_eq!(rd(&mut t, 0x60), 0);
        wr(&mut t, 0x70, 0);
        assert_eq!(rd(&mut t, 0x44), 0, "reset clears queues");
    }
}
