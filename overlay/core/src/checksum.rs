//! The Internet checksum (RFC 1071): the one implementation the overlay's IPv4
//! headers, DHCP replies, offload completion and segmentation, and the tests' frame
//! builders all use.
//!
//! The sum runs over 64-bit big-endian words with end-around carry and is folded to
//! 16 bits at the end, which gives the same result as summing 16-bit words (RFC 1071
//! §2: the sum is independent of byte order and word size up to the final fold).

use std::net::{Ipv4Addr, Ipv6Addr};

/// One's-complement sum of `data` added to `sum` (not folded). Pieces summed one
/// after another must each start at an even offset of the checksummed whole: every
/// piece but the last must have an even length.
#[inline]
pub fn csum_add(mut sum: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let v = u64::from_be_bytes(c.try_into().expect("8 bytes"));
        let (s, carry) = sum.overflowing_add(v);
        sum = s + carry as u64;
    }
    let rest = chunks.remainder();
    let mut tail = [0u8; 8];
    tail[..rest.len()].copy_from_slice(rest);
    let (s, carry) = sum.overflowing_add(u64::from_be_bytes(tail));
    s + carry as u64
}

/// Folds a sum from [`csum_add`] to 16 bits and complements it: the checksum field's
/// value (or 0 when checking data that includes its checksum field).
#[inline]
pub fn csum_fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The checksum of `data` alone.
pub fn checksum(data: &[u8]) -> u16 {
    csum_fold(csum_add(0, data))
}

/// The IPv4 header checksum of `h` (at least 12 bytes), whatever its checksum field
/// (bytes 10..12) holds now.
pub fn ipv4_header(h: &[u8]) -> u16 {
    csum_fold(csum_add(csum_add(0, &h[..10]), &h[12..]))
}

/// The unfolded sum of the IPv4 pseudo header for a transport segment of `len` bytes.
pub fn pseudo_v4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u64 {
    let mut ph = [0u8; 12];
    ph[..4].copy_from_slice(&src.octets());
    ph[4..8].copy_from_slice(&dst.octets());
    ph[9] = proto;
    ph[10..].copy_from_slice(&(len as u16).to_be_bytes());
    csum_add(0, &ph)
}

/// The unfolded sum of the IPv6 pseudo header (RFC 8200 §8.1).
pub fn pseudo_v6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, len: usize) -> u64 {
    let mut ph = [0u8; 40];
    ph[..16].copy_from_slice(&src.octets());
    ph[16..32].copy_from_slice(&dst.octets());
    ph[32..36].copy_from_slice(&(len as u32).to_be_bytes());
    ph[39] = next_header;
    csum_add(0, &ph)
}

/// The UDP checksum of `udp` (its checksum field zero) between IPv4 `src` and `dst`;
/// a computed 0 is sent as 0xffff, since 0 means "no checksum" (RFC 768).
pub fn udp_v4(src: Ipv4Addr, dst: Ipv4Addr, udp: &[u8]) -> u16 {
    match csum_fold(csum_add(pseudo_v4(src, dst, 17, udp.len()), udp)) {
        0 => 0xffff,
        c => c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// RFC 1071 as written: 16-bit words, odd byte padded, end-around carry.
    fn reference(data: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for c in data.chunks(2) {
            let w = if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from(c[0]) << 8
            };
            sum += u32::from(w);
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
        let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&d), !0xddf2);
    }

    #[test]
    fn ipv4_header_verifies_to_zero() {
        let mut h = [
            0x45, 0, 0, 0x54, 0x12, 0x34, 0x40, 0, 64, 1, 0xaa, 0xbb, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        let c = ipv4_header(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(checksum(&h), 0);
    }

    proptest! {
        #[test]
        fn matches_rfc1071(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            prop_assert_eq!(checksum(&data), reference(&data));
        }

        #[test]
        fn pieces_add_up(data in proptest::collection::vec(any::<u8>(), 0..300), cut in 0usize..150) {
            let cut = (cut * 2).min(data.len() & !1);
            let s = csum_add(csum_add(0, &data[..cut]), &data[cut..]);
            prop_assert_eq!(csum_fold(s), reference(&data));
        }

        #[test]
        fn udp_with_its_checksum_verifies(payload in proptest::collection::vec(any::<u8>(), 0..64), a in any::<u32>(), b in any::<u32>()) {
            let (src, dst) = (Ipv4Addr::from(a), Ipv4Addr::from(b));
            let mut udp = vec![0, 67, 0, 68];
            udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            udp.extend_from_slice(&[0, 0]);
            udp.extend_from_slice(&payload);
            let c = udp_v4(src, dst, &udp);
            udp[6..8].copy_from_slice(&c.to_be_bytes());
            let v = csum_fold(csum_add(pseudo_v4(src, dst, 17, udp.len()), &udp));
            prop_assert_eq!(v, 0);
        }
    }
}
