//! virtio-blk on an already-open (normally unlinked) file. Requests are served in
//! place with positioned reads and writes: the image is never copied into memory.

use std::fs::File;
use std::os::unix::fs::FileExt;

use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestMemoryMmap};

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

    /// Serve one request. The chain is seen as two byte streams, whatever its
    /// framing (VIRTIO_F_VERSION_1 implies any layout): the device-readable one is the
    /// 16-byte header then OUT data; the device-writable one is IN data then the status
    /// byte. Returns (status, data bytes written to the guest, where the status goes).
    fn serve(&self, mem: &GuestMemoryMmap, chain: &super::Chain) -> (u8, u32, Option<Pos>) {
        let readable = Stream::new(chain, false);
        let writable = Stream::new(chain, true);
        let Some(status_at) = writable.len.checked_sub(1).and_then(|p| writable.locate(p)) else {
            return (S_IOERR, 0, None);
        };
        let status = Some(status_at);
        let mut h = [0u8; 16];
        if readable.len < 16 || !readable.copy(mem, 0, Dir::Out(&mut h)) {
            return (S_IOERR, 0, status);
        }
        let kind = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
        let Some(start) = sector.checked_mul(SECTOR) else {
            return (S_IOERR, 0, status);
        };
        let end_of_disk = self.capacity * SECTOR;
        match kind {
            T_IN | T_OUT => {
                let writing = kind == T_OUT;
                if writing && self.read_only {
                    return (S_IOERR, 0, status);
                }
                let len = if writing {
                    readable.len - 16
                } else {
                    writable.len - 1
                };
                match start.checked_add(len) {
                    Some(e) if e <= end_of_disk => {}
                    _ => return (S_IOERR, 0, status),
                }
                let mut done = 0u64;
                let mut buf = vec![0u8; CHUNK.min(len) as usize];
                while done < len {
                    let n = CHUNK.min(len - done) as usize;
                    let chunk = &mut buf[..n];
                    let ok = if writing {
                        readable.copy(mem, 16 + done, Dir::Out(chunk))
                            && self.file.write_all_at(chunk, start + done).is_ok()
                    } else {
                        self.file.read_exact_at(chunk, start + done).is_ok()
                            && writable.copy(mem, done, Dir::In(chunk))
                    };
                    if !ok {
                        let written = if writing { 0 } else { done as u32 };
                        return (S_IOERR, written, status);
                    }
                    done += n as u64;
                }
                (S_OK, if writing { 0 } else { len as u32 }, status)
            }
            T_FLUSH => {
                let ok = self.file.sync_data().is_ok();
                (if ok { S_OK } else { S_IOERR }, 0, status)
            }
            T_GET_ID => {
                let n = (writable.len - 1).min(self.id.len() as u64) as usize;
                if writable.copy(mem, 0, Dir::In(&self.id[..n])) {
                    (S_OK, n as u32, status)
                } else {
                    (S_IOERR, 0, status)
                }
            }
            _ => (S_UNSUPP, 0, status),
        }
    }
}

/// Bytes moved per positioned read/write (bounds the bounce buffer).
const CHUNK: u64 = 1 << 20;

/// A guest address in a chain's stream.
#[derive(Debug, Clone, Copy)]
pub struct Pos(vm_memory::GuestAddress);

enum Dir<'a> {
    /// Guest memory to `buf`.
    Out(&'a mut [u8]),
    /// `buf` to guest memory.
    In(&'a [u8]),
}

/// The device-readable or device-writable buffers of a chain as one byte stream.
struct Stream {
    bufs: Vec<super::Buf>,
    len: u64,
}

impl Stream {
    fn new(chain: &super::Chain, write_only: bool) -> Self {
        let bufs: Vec<super::Buf> = chain
            .bufs
            .iter()
            .filter(|b| b.write_only == write_only)
            .copied()
            .collect();
        let len = bufs.iter().map(|b| u64::from(b.len)).sum();
        Stream { bufs, len }
    }

    /// The guest address of stream byte `pos`.
    fn locate(&self, mut pos: u64) -> Option<Pos> {
        for b in &self.bufs {
            if pos < u64::from(b.len) {
                return b.addr.checked_add(pos).map(Pos);
            }
            pos -= u64::from(b.len);
        }
        None
    }

    /// Copy between stream bytes `[pos, pos + buf.len())` and `buf`; false when the
    /// range is not in the stream or not in guest memory.
    fn copy(&self, mem: &GuestMemoryMmap, mut pos: u64, mut dir: Dir<'_>) -> bool {
        let total = match &dir {
            Dir::Out(b) => b.len(),
            Dir::In(b) => b.len(),
        };
        let mut at = 0usize;
        for b in &self.bufs {
            if at == total {
                break;
            }
            let blen = u64::from(b.len);
            if pos >= blen {
                pos -= blen;
                continue;
            }
            let n = ((blen - pos) as usize).min(total - at);
            let Some(addr) = b.addr.checked_add(pos) else {
                return false;
            };
            let ok = match &mut dir {
                Dir::Out(buf) => mem.read_slice(&mut buf[at..at + n], addr).is_ok(),
                Dir::In(buf) => mem.write_slice(&buf[at..at + n], addr).is_ok(),
            };
            if !ok {
                return false;
            }
            at += n;
            pos = 0;
        }
        at == total
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
            if let Some(Pos(at)) = status {
                if mem.write_obj(code, at).is_ok() {
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

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EventFd;

    use super::super::mmio::MmioTransport;
    use super::super::Irq;
    use super::Block;

    fn desc(mem: &GuestMemoryMmap, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let at = 0x1000 + i * 16;
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    #[test]
    fn requests_with_merged_buffers_are_served() {
        let mut file = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        file.write_all(&data).unwrap();
        let probe = file.try_clone().unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irq = Irq::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let dev = Block::new(file, false, "t").unwrap();
        let mut t = MmioTransport::new(Box::new(dev), mem.clone(), irq);
        for (off, v) in [
            (0x70u64, 1u32),
            (0x70, 3),
            (0x24, 1),
            (0x20, 1),
            (0x70, 11),
            (0x30, 0),
            (0x38, 16),
            (0x80, 0x1000),
            (0x90, 0x2000),
            (0xa0, 0x3000),
            (0x44, 1),
            (0x70, 15),
        ] {
            t.write(off, &v.to_le_bytes());
        }
        // IN of 1 KiB at sector 2, data and status in one device-writable buffer.
        mem.write_obj(0u32, GuestAddress(0x10000)).unwrap();
        mem.write_obj(2u64, GuestAddress(0x10008)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(0x20400)).unwrap();
        desc(&mem, 0, 0x10000, 16, 1, 1);
        desc(&mem, 1, 0x20000, 1025, 2, 0);
        // OUT of 512 bytes at sector 4, header and data in one device-readable buffer.
        mem.write_obj(1u32, GuestAddress(0x30000)).unwrap();
        mem.write_obj(4u64, GuestAddress(0x30008)).unwrap();
        mem.write_slice(&[0xab; 512], GuestAddress(0x30010))
            .unwrap();
        mem.write_obj(0xffu8, GuestAddress(0x31000)).unwrap();
        desc(&mem, 2, 0x30000, 16 + 512, 1, 3);
        desc(&mem, 3, 0x31000, 1, 2, 0);
        mem.write_obj(0u16, GuestAddress(0x2004)).unwrap();
        mem.write_obj(2u16, GuestAddress(0x2006)).unwrap();
        mem.write_obj(2u16, GuestAddress(0x2002)).unwrap();
        t.write(0x50, &0u32.to_le_bytes());

        assert_eq!(
            mem.read_obj::<u16>(GuestAddress(0x3002)).unwrap(),
            2,
            "both used"
        );
        let mut got = vec![0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(0x20000)).unwrap();
        assert!(got == data[1024..2048], "IN data");
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x20400)).unwrap(),
            0,
            "IN status"
        );
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x3008)).unwrap(),
            1025,
            "IN used len"
        );
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x31000)).unwrap(),
            0,
            "OUT status"
        );
        let mut after = vec![0u8; 512];
        std::os::unix::fs::FileExt::read_exact_at(&probe, &mut after, 2048).unwrap();
        assert!(after.iter().all(|&b| b == 0xab), "OUT data landed");
    }
}
