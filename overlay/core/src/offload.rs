//! virtio_net_hdr handling for taps with IFF_VNET_HDR and AF_PACKET sockets with
//! PACKET_VNET_HDR: finish partial checksums and cut TCP segmentation-offload
//! superframes into real MTU-sized frames, so the switch and the egress filter only
//! ever see frames a wire could carry.

/// Size of `struct virtio_net_hdr` (without num_buffers).
pub const VNET_HDR_LEN: usize = 10;

pub const F_NEEDS_CSUM: u8 = 1;
pub const F_DATA_VALID: u8 = 2;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_ECN: u8 = 0x80;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        if b.len() < VNET_HDR_LEN {
            return None;
        }
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }
}

/// Why a frame carrying a virtio_net_hdr could not be turned into wire frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffloadError {
    /// Header or checksum offsets point outside the frame (or, for a guest, at no
    /// transport checksum field).
    BadOffsets,
    /// A segmentation request we do not implement (UDP, ECN, unknown type).
    UnsupportedGso,
    /// The GSO frame is not the plain Ethernet + IP + TCP it claims to be.
    Malformed,
    /// The segment size is under [`WireLimits::min_gso_size`].
    SegmentTooSmall,
    /// The frame would make more than [`WireLimits::max_segments`] segments.
    TooManySegments,
    /// The frame (or each of its segments) is larger than [`WireLimits::max_frame`].
    Oversize,
}

impl OffloadError {
    /// The drop counter a refused guest frame goes to.
    pub fn drop_reason(self) -> crate::DropReason {
        use crate::DropReason as D;
        match self {
            OffloadError::BadOffsets => D::OffloadBadOffsets,
            OffloadError::UnsupportedGso => D::OffloadUnsupported,
            OffloadError::Malformed => D::OffloadMalformed,
            OffloadError::SegmentTooSmall => D::GsoSegmentTooSmall,
            OffloadError::TooManySegments => D::GsoTooManySegments,
            OffloadError::Oversize => D::Oversize,
        }
    }
}

/// Smallest TCP segment payload a guest's segmentation-offload frame may ask for: the
/// default MSS of RFC 879. `gso_size` 1 would turn one 64 KiB frame into tens of
/// thousands of segments, each costing the seller a header copy, two checksums, an
/// encryption and a datagram. A guest whose peer wants smaller segments turns TSO off.
pub const MIN_GUEST_GSO_SIZE: usize = 536;
/// Most segments one guest frame may become (a 64 KiB frame at the floor makes 123).
pub const MAX_GUEST_GSO_SEGMENTS: usize = 128;

/// What one frame with a virtio_net_hdr may ask for, so that its cost to the seller
/// stays in proportion to its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireLimits {
    /// Largest wire frame (Ethernet header included) worth producing; larger ones are
    /// refused before any checksum or segmentation work.
    pub max_frame: usize,
    /// Smallest segment payload a GSO frame may ask for.
    pub min_gso_size: usize,
    /// Most segments one GSO frame may become.
    pub max_segments: usize,
    /// Checksum offload only for a transport checksum field (offset 6 or 16) at an
    /// even offset after an IPv4 header's worth of bytes.
    pub strict_csum: bool,
}

impl WireLimits {
    /// Frames from the host's own kernel (the buyer's tap): trusted, no limits.
    pub const HOST: WireLimits = WireLimits {
        max_frame: usize::MAX,
        min_gso_size: 1,
        max_segments: usize::MAX,
        strict_csum: false,
    };

    /// Frames from a guest whose wire frames may be up to `max_frame` bytes.
    pub fn guest(max_frame: usize) -> WireLimits {
        WireLimits {
            max_frame,
            min_gso_size: MIN_GUEST_GSO_SIZE,
            max_segments: MAX_GUEST_GSO_SEGMENTS,
            strict_csum: true,
        }
    }
}

// The one Internet checksum of the workspace; re-exported here for the callers that
// have always found it in `offload`.
pub use crate::checksum::{csum_add, csum_fold};

/// Finish a CHECKSUM_PARTIAL frame in place: the field at csum_start+csum_offset holds
/// the pseudo-header sum; the final checksum covers csum_start..end.
pub fn finish_csum(frame: &mut [u8], h: &VnetHdr) -> Result<(), OffloadError> {
    let start = h.csum_start as usize;
    let at = start + h.csum_offset as usize;
    if start >= frame.len() || at + 2 > frame.len() {
        return Err(OffloadError::BadOffsets);
    }
    let c = csum_fold(csum_add(0, &frame[start..]));
    frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// Turn one frame that came with a virtio_net_hdr into wire frames, handing each to
/// `emit`. Plain frames are passed through (checksum finished if asked); TCP GSO
/// superframes are segmented with every checksum computed. `scratch` is reused.
/// No limits: for the host's own frames (see [`to_wire_frames_within`]).
pub fn to_wire_frames(
    hdr: &VnetHdr,
    frame: &mut [u8],
    scratch: &mut Vec<u8>,
    emit: impl FnMut(&[u8]),
) -> Result<(), OffloadError> {
    to_wire_frames_within(hdr, frame, scratch, &WireLimits::HOST, emit)
}

/// [`to_wire_frames`] for frames that must stay within `lim`: everything is checked
/// before any work is done, so a refused frame costs a header parse.
pub fn to_wire_frames_within(
    hdr: &VnetHdr,
    frame: &mut [u8],
    scratch: &mut Vec<u8>,
    lim: &WireLimits,
    mut emit: impl FnMut(&[u8]),
) -> Result<(), OffloadError> {
    let gso = hdr.gso_type & !GSO_ECN;
    if gso == GSO_NONE {
        if hdr.flags & F_NEEDS_CSUM != 0 {
            if frame.len() > lim.max_frame {
                return Err(OffloadError::Oversize);
            }
            // A transport header starts on an even offset (IP headers are 4-byte
            // multiples after the 14-byte Ethernet header).
            let odd = !hdr.csum_start.is_multiple_of(2);
            if lim.strict_csum && (odd || hdr.csum_start < 34 || !matches!(hdr.csum_offset, 6 | 16))
            {
                return Err(OffloadError::BadOffsets);
            }
            finish_csum(frame, hdr)?;
        }
        emit(frame);
        return Ok(());
    }
    if hdr.gso_type & GSO_ECN != 0 {
        return Err(OffloadError::UnsupportedGso);
    }
    let v4 = match gso {
        GSO_TCPV4 => true,
        GSO_TCPV6 => false,
        _ => return Err(OffloadError::UnsupportedGso),
    };
    segment_tcp(frame, v4, hdr.gso_size as usize, lim, scratch, &mut emit)
}

fn segment_tcp(
    frame: &[u8],
    v4: bool,
    mss: usize,
    lim: &WireLimits,
    seg: &mut Vec<u8>,
    emit: &mut impl FnMut(&[u8]),
) -> Result<(), OffloadError> {
    const ETH: usize = 14;
    if frame.len() < ETH || mss == 0 {
        return Err(OffloadError::Malformed);
    }
    if mss < lim.min_gso_size {
        return Err(OffloadError::SegmentTooSmall);
    }
    let et = u16::from_be_bytes([frame[12], frame[13]]);
    let (ip_len, proto) = if v4 {
        if et != 0x0800 || frame.len() < ETH + 20 {
            return Err(OffloadError::Malformed);
        }
        let ihl = (frame[ETH] & 0x0f) as usize * 4;
        if frame[ETH] >> 4 != 4 || ihl < 20 || frame.len() < ETH + ihl {
            return Err(OffloadError::Malformed);
        }
        // A fragment cannot be segmented (TSO never makes one).
        if u16::from_be_bytes([frame[ETH + 6], frame[ETH + 7]]) & 0x3fff != 0 {
            return Err(OffloadError::Malformed);
        }
        (ihl, frame[ETH + 9])
    } else {
        // Extension headers are not produced by TSO for TCP; accept only a bare header.
        if et != 0x86dd || frame.len() < ETH + 40 || frame[ETH] >> 4 != 6 {
            return Err(OffloadError::Malformed);
        }
        (40, frame[ETH + 6])
    };
    if proto != 6 {
        return Err(OffloadError::Malformed);
    }
    let tcp = ETH + ip_len;
    if frame.len() < tcp + 20 {
        return Err(OffloadError::Malformed);
    }
    let doff = (frame[tcp + 12] >> 4) as usize * 4;
    if doff < 20 || frame.len() < tcp + doff {
        return Err(OffloadError::Malformed);
    }
    let hl = tcp + doff;
    let payload = &frame[hl..];
    let seq0 = u32::from_be_bytes(frame[tcp + 4..tcp + 8].try_into().unwrap());
    let id0 = if v4 {
        u16::from_be_bytes([frame[ETH + 4], frame[ETH + 5]])
    } else {
        0
    };
    let flags0 = frame[tcp + 13];
    let n = payload.len().div_ceil(mss).max(1);
    if n > lim.max_segments {
        return Err(OffloadError::TooManySegments);
    }
    if hl + mss.min(payload.len()) > lim.max_frame {
        return Err(OffloadError::Oversize);
    }
    for i in 0..n {
        let lo = i * mss;
        let hi = (lo + mss).min(payload.len());
        let data = &payload[lo..hi];
        seg.clear();
        seg.extend_from_slice(&frame[..hl]);
        seg.extend_from_slice(data);
        let l4_len = doff + data.len();
        if v4 {
            let tot = (ip_len + l4_len) as u16;
            seg[ETH + 2..ETH + 4].copy_from_slice(&tot.to_be_bytes());
            seg[ETH + 4..ETH + 6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
            seg[ETH + 10..ETH + 12].copy_from_slice(&[0, 0]);
            let c = csum_fold(csum_add(0, &seg[ETH..ETH + ip_len]));
            seg[ETH + 10..ETH + 12].copy_from_slice(&c.to_be_bytes());
        } else {
            seg[ETH + 4..ETH + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        }
        seg[tcp + 4..tcp + 8].copy_from_slice(&seq0.wrapping_add(lo as u32).to_be_bytes());
        let mut fl = flags0;
        if i + 1 < n {
            fl &= !(0x01 | 0x08); // FIN, PSH only on the last segment
        }
        if i > 0 {
            fl &= !0x80; // CWR only on the first
        }
        seg[tcp + 13] = fl;
        seg[tcp + 16..tcp + 18].copy_from_slice(&[0, 0]);
        // Pseudo header, then TCP header + data.
        let mut sum = 0u64;
        if v4 {
            sum = csum_add(sum, &seg[ETH + 12..ETH + 20]);
        } else {
            sum = csum_add(sum, &seg[ETH + 8..ETH + 40]);
        }
        let mut ph = [0u8; 8];
        ph[0..4].copy_from_slice(&(l4_len as u32).to_be_bytes());
        ph[7] = 6;
        sum = csum_add(sum, &ph);
        sum = csum_add(sum, &seg[tcp..]);
        let c = csum_fold(sum);
        seg[tcp + 16..tcp + 18].copy_from_slice(&c.to_be_bytes());
        emit(seg);
    }
    Ok(())
}

/// Merges consecutive in-order TCP/IPv4 segments of one flow into one GSO frame for a
/// tap write (userspace GRO): the host's stack then handles one 64 KiB packet instead
/// of ~45 small ones. Every output carries a virtio_net_hdr. Only plain ACK(/PSH)
/// data segments with valid checksums and identical headers are merged; anything else
/// passes through untouched, in order.
#[derive(Debug)]
pub struct TcpMerger {
    buf: Vec<u8>,
    hlen: usize,
    seg: usize,
    nsegs: usize,
    next_seq: u32,
    closed: bool,
}

impl Default for TcpMerger {
    fn default() -> Self {
        TcpMerger::new()
    }
}

const ETH: usize = 14;
const MAX_MERGED_IP: usize = 65535;
/// Largest frame a [`TcpMerger`] emits, without its virtio_net_hdr.
pub const MAX_MERGED_FRAME: usize = ETH + MAX_MERGED_IP;

/// (header length, payload length, seq) of a mergeable segment, or None.
fn mergeable(f: &[u8]) -> Option<(usize, usize, u32)> {
    if f.len() < ETH + 40 || f[12..14] != [8, 0] || f[ETH] != 0x45 || f[ETH + 9] != 6 {
        return None;
    }
    let tot = u16::from_be_bytes([f[ETH + 2], f[ETH + 3]]) as usize;
    // No Ethernet padding, no fragments.
    if ETH + tot != f.len() || u16::from_be_bytes([f[ETH + 6], f[ETH + 7]]) & 0x3fff != 0 {
        return None;
    }
    let t = ETH + 20;
    let doff = (f[t + 12] >> 4) as usize * 4;
    // ACK set; only PSH besides it (no SYN/FIN/RST/URG/ECE/CWR).
    if doff < 20 || t + doff >= f.len() || f[t + 13] & !0x08 != 0x10 {
        return None;
    }
    if csum_fold(csum_add(0, &f[ETH..t])) != 0 {
        return None;
    }
    let l4 = &f[t..];
    let mut ph = [0u8; 8];
    ph[0..4].copy_from_slice(&(l4.len() as u32).to_be_bytes());
    ph[7] = 6;
    if csum_fold(csum_add(
        csum_add(csum_add(0, &f[ETH + 12..ETH + 20]), &ph),
        l4,
    )) != 0
    {
        return None;
    }
    let seq = u32::from_be_bytes(f[t + 4..t + 8].try_into().unwrap());
    Some((t + doff, f.len() - t - doff, seq))
}

impl TcpMerger {
    pub fn new() -> TcpMerger {
        TcpMerger {
            buf: Vec::with_capacity(VNET_HDR_LEN + ETH + MAX_MERGED_IP),
            hlen: 0,
            seg: 0,
            nsegs: 0,
            next_seq: 0,
            closed: false,
        }
    }

    /// Offer one frame; complete outputs go to `emit` as (virtio_net_hdr, frame).
    /// Frames that cannot merge go out as they are, without a copy.
    pub fn push(&mut self, f: &[u8], emit: &mut impl FnMut(&[u8], &[u8])) {
        let Some((hlen, plen, seq)) = mergeable(f) else {
            self.flush(emit);
            emit(&[0u8; VNET_HDR_LEN], f);
            return;
        };
        if self.nsegs > 0 && self.can_append(f, hlen, plen, seq) {
            self.buf.extend_from_slice(&f[hlen..]);
            self.nsegs += 1;
            self.next_seq = seq.wrapping_add(plen as u32);
            let psh = f[ETH + 20 + 13] & 0x08 != 0;
            if psh {
                self.buf[VNET_HDR_LEN + ETH + 20 + 13] |= 0x08;
            }
            if plen < self.seg || psh {
                self.closed = true;
            }
            return;
        }
        self.flush(emit);
        self.buf.clear();
        self.buf.extend_from_slice(&[0u8; VNET_HDR_LEN]);
        self.buf.extend_from_slice(f);
        self.hlen = hlen;
        self.seg = plen;
        self.nsegs = 1;
        self.next_seq = seq.wrapping_add(plen as u32);
        self.closed = f[ETH + 20 + 13] & 0x08 != 0;
    }

    fn can_append(&self, f: &[u8], hlen: usize, plen: usize, seq: u32) -> bool {
        let h = &self.buf[VNET_HDR_LEN..VNET_HDR_LEN + self.hlen];
        let t = ETH + 20;
        !self.closed
            && hlen == self.hlen
            && seq == self.next_seq
            && plen <= self.seg
            && self.buf.len() - VNET_HDR_LEN - ETH + plen <= MAX_MERGED_IP
            && h[..ETH] == f[..ETH]
            && h[ETH + 1] == f[ETH + 1]
            && h[ETH + 8] == f[ETH + 8]
            && h[ETH + 6] == f[ETH + 6]
            && h[ETH + 12..ETH + 20] == f[ETH + 12..ETH + 20]
            && h[t..t + 4] == f[t..t + 4]
            && h[t + 8..t + 13] == f[t + 8..t + 13]
            && f[t + 13] & !0x08 == h[t + 13] & !0x08
            && h[t + 14..t + 16] == f[t + 14..t + 16]
            && h[t + 18..hlen] == f[t + 18..hlen]
    }

    /// Emit whatever is being merged.
    pub fn flush(&mut self, emit: &mut impl FnMut(&[u8], &[u8])) {
        if self.nsegs == 0 {
            return;
        }
        if self.nsegs > 1 {
            let b = &mut self.buf;
            let fl = b.len() - VNET_HDR_LEN;
            let ip = VNET_HDR_LEN + ETH;
            let tot = (fl - ETH) as u16;
            b[ip + 2..ip + 4].copy_from_slice(&tot.to_be_bytes());
            b[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
            let c = csum_fold(csum_add(0, &b[ip..ip + 20]));
            b[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
            // CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum.
            let l4 = (fl - ETH - 20) as u32;
            let mut ph = [0u8; 8];
            ph[0..4].copy_from_slice(&l4.to_be_bytes());
            ph[7] = 6;
            let p = !csum_fold(csum_add(csum_add(0, &b[ip + 12..ip + 20]), &ph));
            b[ip + 20 + 16..ip + 20 + 18].copy_from_slice(&p.to_be_bytes());
            b[0] = F_NEEDS_CSUM;
            b[1] = GSO_TCPV4;
            b[2..4].copy_from_slice(&(self.hlen as u16).to_le_bytes());
            b[4..6].copy_from_slice(&(self.seg as u16).to_le_bytes());
            b[6..8].copy_from_slice(&((ETH + 20) as u16).to_le_bytes());
            b[8..10].copy_from_slice(&16u16.to_le_bytes());
        }
        let (h, f) = self.buf.split_at(VNET_HDR_LEN);
        emit(h, f);
        self.buf.clear();
        self.nsegs = 0;
        self.closed = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tcp_v4_frame(payload_len: usize, flags: u8) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20 + payload_len];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        let tot = (40 + payload_len) as u16;
        f[16..18].copy_from_slice(&tot.to_be_bytes());
        f[18..20].copy_from_slice(&7u16.to_be_bytes());
        f[22] = 64;
        f[23] = 6;
        f[26..30].copy_from_slice(&[10, 77, 0, 2]);
        f[30..34].copy_from_slice(&[10, 77, 0, 1]);
        f[34 + 4..34 + 8].copy_from_slice(&1000u32.to_be_bytes());
        f[34 + 12] = 5 << 4;
        f[34 + 13] = flags;
        for (i, b) in f[54..].iter_mut().enumerate() {
            *b = i as u8;
        }
        f
    }

    /// Push every frame through `m`, flush, and return the outputs with their headers.
    fn merge_all<'a>(
        m: &mut TcpMerger,
        frames: impl IntoIterator<Item = &'a [u8]>,
    ) -> Vec<Vec<u8>> {
        let mut outs = Vec::new();
        let mut keep = |h: &[u8], f: &[u8]| outs.push([h, f].concat());
        for f in frames {
            m.push(f, &mut keep);
        }
        m.flush(&mut keep);
        outs
    }

    fn tcp_csum_ok(seg: &[u8]) -> bool {
        let ihl = (seg[14] & 15) as usize * 4;
        let l4 = &seg[14 + ihl..];
        let mut ph = [0u8; 8];
        ph[0..4].copy_from_slice(&(l4.len() as u32).to_be_bytes());
        ph[7] = 6;
        let s = csum_add(csum_add(csum_add(0, &seg[26..34]), &ph), l4);
        csum_fold(s) == 0 && csum_fold(csum_add(0, &seg[14..14 + ihl])) == 0
    }

    #[test]
    fn segments_tcp_v4_with_valid_checksums() {
        let mut f = tcp_v4_frame(4000, 0x18 | 0x01);
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1400,
            csum_start: 34,
            csum_offset: 16,
        };
        let mut segs = Vec::new();
        to_wire_frames(&h, &mut f, &mut Vec::new(), |s| segs.push(s.to_vec())).unwrap();
        assert_eq!(segs.len(), 3);
        let mut seq = 1000u32;
        for (i, s) in segs.iter().enumerate() {
            assert!(tcp_csum_ok(s), "segment {i} checksum");
            assert_eq!(u32::from_be_bytes(s[38..42].try_into().unwrap()), seq);
            let last = i == 2;
            assert_eq!(s[47] & 0x01 != 0, last, "FIN only on last");
            seq += (s.len() - 54) as u32;
            assert!(s.len() <= 1400 + 54);
        }
        assert_eq!(seq, 5000);
    }

    #[test]
    fn finishes_partial_checksum() {
        let mut f = tcp_v4_frame(100, 0x10);
        // A partial checksum holds the folded pseudo-header sum (not inverted).
        let mut ph = [0u8; 8];
        ph[0..4].copy_from_slice(&120u32.to_be_bytes());
        ph[7] = 6;
        let p = !csum_fold(csum_add(csum_add(0, &f[26..34]), &ph));
        f[50..52].copy_from_slice(&p.to_be_bytes());
        let ipc = csum_fold(csum_add(0, &f[14..34]));
        f[24..26].copy_from_slice(&ipc.to_be_bytes());
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..Default::default()
        };
        let mut out = Vec::new();
        to_wire_frames(&h, &mut f, &mut Vec::new(), |s| out.push(s.to_vec())).unwrap();
        assert!(tcp_csum_ok(&out[0]));
    }

    proptest! {
        // Arbitrary headers and bytes never panic, and every emitted frame stays
        // within gso_size + headers.
        #[test]
        fn never_panics(hdr in proptest::collection::vec(any::<u8>(), 10),
                        mut frame in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let h = VnetHdr::parse(&hdr).unwrap();
            let mut n = 0usize;
            let _ = to_wire_frames(&h, &mut frame, &mut Vec::new(), |_| n += 1);
        }

        #[test]
        fn segmentation_preserves_payload(len in 1usize..20000, mss in 64u16..1500) {
            let mut f = tcp_v4_frame(len, 0x18);
            let orig = f[54..].to_vec();
            let h = VnetHdr { flags: F_NEEDS_CSUM, gso_type: GSO_TCPV4, hdr_len: 54, gso_size: mss, csum_start: 34, csum_offset: 16 };
            let mut data = Vec::new();
            to_wire_frames(&h, &mut f, &mut Vec::new(), |s| {
                assert!(s.len() <= 54 + mss as usize);
                assert!(tcp_csum_ok(s));
                data.extend_from_slice(&s[54..]);
            }).unwrap();
            prop_assert_eq!(data, orig);
        }
    }

    fn gso_hdr(gso_size: u16) -> VnetHdr {
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size,
            csum_start: 34,
            csum_offset: 16,
        }
    }

    /// Segments a guest frame within `lim`, counting what it emits.
    fn guest_segs(h: &VnetHdr, f: &mut [u8], lim: &WireLimits) -> Result<usize, OffloadError> {
        let mut n = 0;
        to_wire_frames_within(h, f, &mut Vec::new(), lim, |_| n += 1).map(|_| n)
    }

    #[test]
    fn guest_limits_refuse_costly_frames_before_any_work() {
        let lim = WireLimits::guest(1514);
        let mut f = tcp_v4_frame(65000, 0x18);
        for (gso, want) in [
            (1, Err(OffloadError::SegmentTooSmall)),
            (535, Err(OffloadError::SegmentTooSmall)),
            (536, Ok(122)),
            (1460, Ok(45)),
            (1461, Err(OffloadError::Oversize)),
        ] {
            assert_eq!(
                guest_segs(&gso_hdr(gso), &mut f, &lim),
                want,
                "gso_size {gso}"
            );
        }
        // The host's own frames keep working at any size.
        assert_eq!(
            guest_segs(&gso_hdr(100), &mut f, &WireLimits::HOST),
            Ok(650)
        );
        let mut most = tcp_v4_frame(536 * 128, 0x18);
        assert_eq!(guest_segs(&gso_hdr(536), &mut most, &lim), Ok(128));
        let few = WireLimits {
            max_segments: 44,
            ..lim
        };
        assert_eq!(
            guest_segs(&gso_hdr(1460), &mut f, &few),
            Err(OffloadError::TooManySegments)
        );
        let mut frag = tcp_v4_frame(4000, 0x18);
        frag[20] = 0x20; // more fragments
        assert_eq!(
            guest_segs(&gso_hdr(1400), &mut frag, &lim),
            Err(OffloadError::Malformed)
        );
        // Checksum offload: only a transport checksum field, only within the size cap.
        let plain = |start, offset| VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: start,
            csum_offset: offset,
            ..Default::default()
        };
        let mut small = tcp_v4_frame(100, 0x10);
        assert_eq!(guest_segs(&plain(34, 16), &mut small, &lim), Ok(1));
        assert_eq!(guest_segs(&plain(34, 6), &mut small, &lim), Ok(1));
        for (start, offset) in [(35, 16), (34, 7), (3, 16), (34, 200), (200, 16)] {
            assert_eq!(
                guest_segs(&plain(start, offset), &mut small, &lim),
                Err(OffloadError::BadOffsets),
                "csum_start {start} csum_offset {offset}"
            );
        }
        let mut big = tcp_v4_frame(3000, 0x10);
        assert_eq!(
            guest_segs(&plain(34, 16), &mut big, &lim),
            Err(OffloadError::Oversize)
        );
        for e in [
            OffloadError::BadOffsets,
            OffloadError::UnsupportedGso,
            OffloadError::Malformed,
            OffloadError::SegmentTooSmall,
            OffloadError::TooManySegments,
            OffloadError::Oversize,
        ] {
            assert!(!e.drop_reason().as_str().is_empty());
        }
    }

    proptest! {
        // Whatever a guest asks for, the bytes emitted stay within a small factor of
        // the frame's own size and the segment count within the cap.
        #[test]
        fn guest_frames_cost_in_proportion(hdr in proptest::collection::vec(any::<u8>(), 10),
                                           gso in any::<u16>(),
                                           csum_start in 0u16..200,
                                           len in 0usize..66000,
                                           v4 in any::<bool>()) {
            let mut h = VnetHdr::parse(&hdr).unwrap();
            h.gso_size = gso;
            h.csum_start = csum_start;
            if v4 {
                h.gso_type = GSO_TCPV4;
            }
            let mut f = tcp_v4_frame(len, hdr[0]);
            let lim = WireLimits::guest(1514);
            let (mut n, mut bytes) = (0usize, 0usize);
            let _ = to_wire_frames_within(&h, &mut f, &mut Vec::new(), &lim, |s| {
                n += 1;
                bytes += s.len();
                // A plain frame (no GSO type, ECN bit or not) passes whole; the egress
                // filter drops it if oversize.
                let plain = h.gso_type & !GSO_ECN == GSO_NONE && h.flags & F_NEEDS_CSUM == 0;
                assert!(s.len() <= 1514 || (n == 1 && plain));
            });
            prop_assert!(n <= MAX_GUEST_GSO_SEGMENTS);
            // Headers of up to 54 bytes per segment of at least 536 bytes: under 1.11x.
            prop_assert!(bytes as f64 <= f.len() as f64 * 1.11 + 54.0, "{bytes} bytes from {}", f.len());
        }
    }

    #[test]
    fn merger_roundtrips_through_segmentation() {
        // Cut a burst into segments, merge them back, cut again: same wire frames.
        let mut f = tcp_v4_frame(10_000, 0x18);
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1400,
            csum_start: 34,
            csum_offset: 16,
        };
        let mut segs = Vec::new();
        to_wire_frames(&h, &mut f, &mut Vec::new(), |s| segs.push(s.to_vec())).unwrap();
        let mut m = TcpMerger::new();
        let mut outs = merge_all(&mut m, segs.iter().map(Vec::as_slice));
        assert_eq!(outs.len(), 1, "one superframe");
        let mut o = outs.pop().unwrap();
        let h2 = VnetHdr::parse(&o).unwrap();
        assert_eq!(h2.gso_type, GSO_TCPV4);
        let mut again = Vec::new();
        to_wire_frames(&h2, &mut o[VNET_HDR_LEN..], &mut Vec::new(), |s| {
            again.push(s.to_vec())
        })
        .unwrap();
        assert_eq!(again.len(), segs.len());
        for (a, b) in again.iter().zip(&segs) {
            assert_eq!(a[38..], b[38..], "same TCP header (from seq) and data");
        }
        // A non-TCP frame passes through on its own, in order.
        let outs = merge_all(&mut m, [&segs[0][..], &[0u8; 60][..]]);
        assert_eq!(outs.len(), 2);
        assert_eq!(&outs[0][VNET_HDR_LEN..], &segs[0][..]);
    }

    proptest! {
        // Arbitrary frames never panic the merger, every output carries a valid
        // virtio_net_hdr, and non-TCP frames come out byte for byte.
        #[test]
        fn merger_never_panics(frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..20)) {
            let mut m = TcpMerger::new();
            let outs = merge_all(&mut m, frames.iter().map(Vec::as_slice));
            prop_assert!(outs.len() <= frames.len());
            for o in &outs {
                prop_assert!(VnetHdr::parse(o).is_some());
            }
        }

        // Any in-order segmentation of a burst merges back into bursts that carry
        // exactly the original payload.
        #[test]
        fn merger_preserves_payload(len in 1usize..60000, mss in 200u16..1460) {
            let mut f = tcp_v4_frame(len, 0x10);
            let orig = f[54..].to_vec();
            let h = VnetHdr { flags: F_NEEDS_CSUM, gso_type: GSO_TCPV4, hdr_len: 54, gso_size: mss, csum_start: 34, csum_offset: 16 };
            let mut segs = Vec::new();
            to_wire_frames(&h, &mut f, &mut Vec::new(), |s| segs.push(s.to_vec())).unwrap();
            let mut m = TcpMerger::new();
            let mut data = Vec::new();
            let mut take = |_: &[u8], o: &[u8]| data.extend_from_slice(&o[54..]);
            for s in &segs {
                m.push(s, &mut take);
            }
            m.flush(&mut take);
            prop_assert_eq!(data, orig);
        }
    }
}
