//! virtio-blk on an already-open (normally unlinked) file. Requests are served in
//! place with positioned reads and writes: the image is never copied into memory.

use std::fs::File;
use std::os::unix::fs::FileExt;

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::{add_used, pop_chain, read_config_bytes, Irq, VirtioDevice, DEVICE_ID_BLOCK};

const SECTOR: u64 = 512;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const QUEUE_SIZE: u16 = 256;
/// Largest single data buffer we accept (bounds the bounce buffer).
const MAX_SEG: u32 = 1 << 20;

pub struct Block {
    file: File,
    read_only: bool,
    capacity: u64,
    config: [u8; 8],
    id: [u8; 20],
}

impl Block {
    pub fn new(file: File, read_only: bool, serial: &str) -> std::io::Result<Self> {
        let size = file.metadata()?.len();
        let capacity = size / SECTOR;
        let mut id = [0u8; 20];
        let n = serial.len().min(20);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Ok(Block {
            file,
            read_only,
            capacity,
            config: capacity.to_le_bytes(),
            id,
        })
    }

    /// Serve one request; returns (status, bytes written to the guest).
    fn serve(&self, mem: &GuestMemoryMmap, chain: &super::Chain) -> (u8, u32, Option<super::Buf>) {
        let Some((hdr, rest)) = chain.bufs.split_first() else {
            return (S_IOERR, 0, None);
        };
        let Some((status, data)) = rest.split_last() else {
            return (S_IOERR, 0, None);
        };
        if !status.write_only || status.len < 1 || hdr.write_only || hdr.len < 16 {
            return (S_IOERR, 0, None);
        }
        let status = Some(*status);
        let mut h = [0u8; 16];
        if mem.read_slice(&mut h, hdr.addr).is_err() {
            return (S_IOERR, 0, status);
        }
        let kind = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
        let mut written = 0u32;
        let mut offset = match sector.checked_mul(SECTOR) {
            Some(o) => o,
            None => return (S_IOERR, 0, status),
        };
        let end_of_disk = self.capacity * SECTOR;
        let code = match kind {
            T_IN | T_OUT => {
                let writing = kind == T_OUT;
                if writing && self.read_only {
                    return (S_IOERR, 0, status);
                }
                for b in data {
                    // IN buffers must be device-writable, OUT buffers device-readable.
                    if b.write_only == writing || b.len > MAX_SEG {
                        return (S_IOERR, written, status);
                    }
                    match offset.checked_add(u64::from(b.len)) {
                        Some(e) if e <= end_of_disk => {}
                        _ => return (S_IOERR, written, status),
                    }
                    let mut buf = vec![0u8; b.len as usize];
                    let ok = if writing {
                        mem.read_slice(&mut buf, b.addr).is_ok()
                            && self.file.write_all_at(&buf, offset).is_ok()
                    } else {
                        self.file.read_exact_at(&mut buf, offset).is_ok()
                            && mem.write_slice(&buf, b.addr).is_ok()
                    };
                    if !ok {
                        return (S_IOERR, written, status);
                    }
                    if !writing {
                        written += b.len;
                    }
                    offset += u64::from(b.len);
                }
                S_OK
            }
            T_FLUSH => {
                if self.file.sync_data().is_ok() {
                    S_OK
                } else {
                    S_IOERR
                }
            }
            T_GET_ID => match data.first() {
                Some(b) if b.write_only => {
                    let n = (b.len as usize).min(self.id.len());
                    if mem.write_slice(&self.id[..n], b.addr).is_err() {
                        return (S_IOERR, 0, status);
                    }
                    written = n as u32;
                    S_OK
                }
                _ => S_IOERR,
            },
            _ => S_UNSUPP,
        };
        (code, written, status)
    }
}

impl VirtioDevice for Block {
    fn device_id(&self) -> u32 {
        DEVICE_ID_BLOCK
    }
    fn features(&self) -> u64 {
        VIRTIO_BLK_F_FLUSH | if self.read_only { VIRTIO_BLK_F_RO } else { 0 }
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data)
    }
    fn notify(&mut self, idx: usize, queues: &mut [Queue], mem: &GuestMemoryMmap, irq: &Irq) {
        let Some(q) = queues.get_mut(idx) else { return };
        let mut used = false;
        while let Some(chain) = pop_chain(q, mem) {
            let (code, written, status) = self.serve(mem, &chain);
            let mut len = written;
            if let Some(s) = status {
                if mem.write_obj(code, s.addr).is_ok() {
                    len += 1;
                }
            }
            used |= add_used(q, mem, chain.head, len);
        }
        if used {
            irq.signal_used();
        }
    }
}
