//! The first half of the guest -> buyer direction: read a batch from the guest port
//! and turn it into wire frames (TSO superframes cut into segments, partial checksums
//! finished, stripped VLAN tags put back) without the core's lock, so that a costly
//! frame never holds up the other direction. Offload requests beyond
//! [`WireLimits::guest`] are refused before any work and handed on as refusals.

use std::io;
use std::os::fd::RawFd;

use crate::io::batch::RecvBatch;
use crate::io::offload::{self, VnetHdr, WireLimits, F_NEEDS_CSUM, GSO_NONE, VNET_HDR_LEN};
use crate::io::packet::PacketPort;
use crate::io::sys;
use crate::DropReason;

/// Where one wire frame of a pass lies.
#[derive(Clone, Copy, Debug)]
enum Item {
    /// The whole frame of receive slot `i` (`len` bytes after the vnet header): frames
    /// with nothing to do, or whose checksum was finished in place. No copy.
    Slot { i: usize, len: usize },
    /// `len` bytes at `at` in the arena: segments and re-tagged frames.
    Arena { at: usize, len: usize },
    /// Refused before the filter: why, and the size the guest handed over.
    Refused { reason: DropReason, len: usize },
}

/// One pass's worth of guest frames.
pub struct GuestRx {
    rx: RecvBatch,
    arena: Vec<u8>,
    seg: Vec<u8>,
    items: Vec<Item>,
    lim: WireLimits,
}

impl GuestRx {
    /// Up to `slots` messages a pass; wire frames may be up to `max_frame` bytes.
    pub fn new(slots: usize, max_frame: usize) -> GuestRx {
        GuestRx {
            rx: PacketPort::recv_batch(slots),
            arena: Vec::with_capacity(64 * 1024),
            seg: Vec::with_capacity(2048),
            items: Vec::with_capacity(slots),
            lim: WireLimits::guest(max_frame),
        }
    }

    pub fn slots(&self) -> usize {
        self.rx.slots()
    }

    /// Receive what the port has queued (never blocks) and prepare its wire frames.
    /// Returns the messages read.
    pub fn read(&mut self, fd: RawFd) -> io::Result<usize> {
        self.items.clear();
        self.arena.clear();
        let n = self.rx.recv_nowait(fd)?;
        for i in 0..n {
            self.prepare(i);
        }
        Ok(n)
    }

    fn prepare(&mut self, i: usize) {
        let GuestRx {
            rx,
            arena,
            seg,
            items,
            lim,
        } = self;
        let aux: Option<sys::TpacketAuxdata> = rx.cmsg(i, libc::SOL_PACKET, sys::PACKET_AUXDATA);
        let truncated = rx.truncated(i);
        let (slot, len) = rx.slot_mut(i);
        // A PACKET_VNET_HDR socket always writes the header.
        let Some(h) = VnetHdr::parse(&slot[..len]) else {
            return;
        };
        let frame = &mut slot[VNET_HDR_LEN..len];
        if truncated {
            // Larger than any slot: far over the size cap.
            items.push(Item::Refused {
                reason: DropReason::Oversize,
                len: frame.len(),
            });
            return;
        }
        if let Some(a) = aux.filter(|a| a.tp_status & sys::TP_STATUS_VLAN_VALID != 0) {
            if frame.len() >= 12 {
                // The filter drops every tagged frame whatever its offloads: hand it
                // the frame with its tag, untouched otherwise.
                let tpid =
                    if a.tp_status & sys::TP_STATUS_VLAN_TPID_VALID != 0 && a.tp_vlan_tpid != 0 {
                        a.tp_vlan_tpid
                    } else {
                        0x8100
                    };
                let at = arena.len();
                arena.extend_from_slice(&frame[..12]);
                arena.extend_from_slice(&tpid.to_be_bytes());
                arena.extend_from_slice(&a.tp_vlan_tci.to_be_bytes());
                arena.extend_from_slice(&frame[12..]);
                items.push(Item::Arena {
                    at,
                    len: arena.len() - at,
                });
                return;
            }
        }
        let flen = frame.len();
        if h.gso_type == GSO_NONE {
            if h.flags & F_NEEDS_CSUM == 0 {
                items.push(Item::Slot { i, len: flen });
                return;
            }
            // Checksum finished in place: the frame stays in its slot.
            match offload::to_wire_frames_within(&h, frame, seg, lim, |_| {}) {
                Ok(()) => items.push(Item::Slot { i, len: flen }),
                Err(e) => items.push(Item::Refused {
                    reason: e.drop_reason(),
                    len: flen,
                }),
            }
            return;
        }
        // Every check comes before the first segment: a refused frame emitted none.
        let r = offload::to_wire_frames_within(&h, frame, seg, lim, |f| {
            let at = arena.len();
            arena.extend_from_slice(f);
            items.push(Item::Arena { at, len: f.len() });
        });
        if let Err(e) = r {
            items.push(Item::Refused {
                reason: e.drop_reason(),
                len: flen,
            });
        }
    }

    /// Hand every wire frame of the last [`GuestRx::read`] to `f` in order: `Ok(frame)`,
    /// or `Err((reason, bytes))` for a frame refused before the filter.
    pub fn for_each(&self, mut f: impl FnMut(Result<&[u8], (DropReason, usize)>)) {
        for it in &self.items {
            match *it {
                Item::Slot { i, len } => f(Ok(&self.rx.data(i)[VNET_HDR_LEN..VNET_HDR_LEN + len])),
                Item::Arena { at, len } => f(Ok(&self.arena[at..at + len])),
                Item::Refused { reason, len } => f(Err((reason, len))),
            }
        }
    }
}
