//! Ethernet addresses and the few header constants shared by the switch, DHCP and filter.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// Length of an untagged Ethernet header (dst, src, EtherType).
pub const ETH_HDR: usize = 14;
/// EtherType IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// EtherType IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// 802.1Q VLAN tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// 802.1ad QinQ service tag.
pub const ETHERTYPE_QINQ: u16 = 0x88a8;
/// Pre-standard QinQ tag.
pub const ETHERTYPE_QINQ_OLD: u16 = 0x9100;

/// A 48-bit Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// True for ff:ff:ff:ff:ff:ff.
    pub fn is_broadcast(&self) -> bool {
        self.0 == [0xff; 6]
    }

    /// True for group addresses (multicast, including broadcast).
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }

    /// The IPv6 link-local address a host derives from this MAC (modified EUI-64,
    /// RFC 4291 appendix A): fe80::, then the MAC with the universal/local bit flipped
    /// and ff:fe in its middle.
    pub fn ipv6_link_local(&self) -> std::net::Ipv6Addr {
        let m = self.0;
        let mut a = [0u8; 16];
        a[0] = 0xfe;
        a[1] = 0x80;
        a[8..11].copy_from_slice(&[m[0] ^ 0x02, m[1], m[2]]);
        a[11] = 0xff;
        a[12] = 0xfe;
        a[13..16].copy_from_slice(&m[3..6]);
        std::net::Ipv6Addr::from(a)
    }

    /// Reads the MAC at `b[..6]`; `None` if `b` is shorter.
    pub fn from_slice(b: &[u8]) -> Option<MacAddr> {
        let a: [u8; 6] = b.get(..6)?.try_into().ok()?;
        Some(MacAddr(a))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let mut out = [0u8; 6];
        let mut n = 0;
        for part in s.split([':', '-']) {
            if n == 6 || part.len() != 2 {
                return Err(Error::BadMac(s.to_string()));
            }
            out[n] = u8::from_str_radix(part, 16).map_err(|_| Error::BadMac(s.to_string()))?;
            n += 1;
        }
        if n != 6 {
            return Err(Error::BadMac(s.to_string()));
        }
        Ok(MacAddr(out))
    }
}

/// Destination MAC of a frame (caller guarantees at least 14 bytes).
pub(crate) fn dst_mac(frame: &[u8]) -> MacAddr {
    MacAddr(frame[0..6].try_into().expect("6 bytes"))
}

/// Source MAC of a frame (caller guarantees at least 14 bytes).
pub(crate) fn src_mac(frame: &[u8]) -> MacAddr {
    MacAddr(frame[6..12].try_into().expect("6 bytes"))
}

/// EtherType of an untagged frame (caller guarantees at least 14 bytes).
pub(crate) fn ethertype(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[12], frame[13]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_roundtrip_and_errors() {
        let m: MacAddr = "52:54:00:ab:cd:ef".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:ef");
        assert_eq!("52-54-00-AB-CD-EF".parse::<MacAddr>().unwrap(), m);
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:00",
            "5:54:00:ab:cd:ef",
            "zz:54:00:ab:cd:ef",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert!(MacAddr::BROADCAST.is_broadcast() && MacAddr::BROADCAST.is_multicast());
        assert!(!m.is_multicast());
    }

    #[test]
    fn link_local_is_modified_eui64() {
        let m: MacAddr = "52:54:00:ab:cd:ef".parse().unwrap();
        assert_eq!(
            m.ipv6_link_local(),
            "fe80::5054:ff:feab:cdef"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
        );
    }
}
