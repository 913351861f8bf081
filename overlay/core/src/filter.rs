//! The seller's per-guest egress filter (guest -> overlay) and ingress check
//! (overlay -> guest). Rules come from the lease; every drop has a [`DropReason`].

use std::net::Ipv4Addr;
use std::time::Instant;

use crate::eth::{
    dst_mac, ethertype, src_mac, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_QINQ,
    ETHERTYPE_QINQ_OLD, ETHERTYPE_VLAN, ETH_HDR,
};
use crate::ratelimit::TokenBucket;
use crate::{DropReason, GuestLease};

const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
const ICMPV6_ROUTER_ADVERTISEMENT: u8 = 134;

/// What the stateless rules learned about an accepted frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Destination is broadcast or multicast (subject to the broadcast limit).
    pub group: bool,
}

/// Applies the lease's address and protocol rules to a frame the guest sent. No rate
/// limits: see [`EgressFilter::check_egress`].
pub fn classify_egress(lease: &GuestLease, frame: &[u8]) -> Result<Verdict, DropReason> {
    if frame.len() < ETH_HDR {
        return Err(DropReason::Runt);
    }
    if frame.len() > lease.mtu as usize + ETH_HDR {
        return Err(DropReason::Oversize);
    }
    if src_mac(frame) != lease.guest_mac {
        return Err(DropReason::SourceMac);
    }
    let payload = &frame[ETH_HDR..];
    match ethertype(frame) {
        ETHERTYPE_VLAN | ETHERTYPE_QINQ | ETHERTYPE_QINQ_OLD => return Err(DropReason::VlanTagged),
        ETHERTYPE_IPV4 => check_ipv4(lease, payload)?,
        ETHERTYPE_ARP => check_arp(lease, payload)?,
        ETHERTYPE_IPV6 if lease.allow_ipv6 => check_ipv6(payload)?,
        _ => return Err(DropReason::EtherType),
    }
    Ok(Verdict {
        group: dst_mac(frame).is_multicast(),
    })
}

fn check_ipv4(lease: &GuestLease, p: &[u8]) -> Result<(), DropReason> {
    let bad = DropReason::Ipv4Malformed;
    if p.len() < 20 || p[0] >> 4 != 4 {
        return Err(bad);
    }
    let ihl = (p[0] & 0x0f) as usize * 4;
    let total = u16::from_be_bytes([p[2], p[3]]) as usize;
    if ihl < 20 || total < ihl || total > p.len() {
        return Err(bad);
    }
    let frag_offset = u16::from_be_bytes([p[6], p[7]]) & 0x1fff;
    let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    // UDP ports, when this packet carries the UDP header.
    let udp = if p[9] == IPPROTO_UDP && frag_offset == 0 {
        let l4 = &p[ihl..total];
        if l4.len() < 8 {
            return Err(bad);
        }
        Some((
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        ))
    } else {
        None
    };
    if udp == Some((67, 68)) {
        return Err(DropReason::DhcpServerReply);
    }
    if src == lease.guest_ip {
        return Ok(());
    }
    // A DHCP client before it has an address.
    if src.is_unspecified() && dst.is_broadcast() && udp == Some((68, 67)) {
        return Ok(());
    }
    Err(DropReason::Ipv4Source)
}

fn check_arp(lease: &GuestLease, p: &[u8]) -> Result<(), DropReason> {
    if p.len() < 28 {
        return Err(DropReason::ArpMalformed);
    }
    let htype = u16::from_be_bytes([p[0], p[1]]);
    let ptype = u16::from_be_bytes([p[2], p[3]]);
    let op = u16::from_be_bytes([p[6], p[7]]);
    if htype != 1 || ptype != ETHERTYPE_IPV4 || p[4] != 6 || p[5] != 4 || !(op == 1 || op == 2) {
        return Err(DropReason::ArpMalformed);
    }
    if p[8..14] != lease.guest_mac.0 {
        return Err(DropReason::ArpSpoof);
    }
    let spa = Ipv4Addr::new(p[14], p[15], p[16], p[17]);
    // RFC 5227 probes carry sender IP 0.0.0.0.
    if spa == lease.guest_ip || (op == 1 && spa.is_unspecified()) {
        Ok(())
    } else {
        Err(DropReason::ArpSpoof)
    }
}

fn check_ipv6(p: &[u8]) -> Result<(), DropReason> {
    let bad = DropReason::Ipv6Malformed;
    if p.len() < 40 || p[0] >> 4 != 6 {
        return Err(bad);
    }
    let end = 40 + u16::from_be_bytes([p[4], p[5]]) as usize;
    if end > p.len() {
        return Err(bad);
    }
    let p = &p[..end];
    let mut next = p[6];
    let mut off = 40;
    // Walk the extension headers to the upper-layer header (bounded).
    for _ in 0..8 {
        match next {
            // Hop-by-hop, routing, destination options.
            0 | 43 | 60 => {
                let h = p.get(off..off + 2).ok_or(bad)?;
                next = h[0];
                off += (h[1] as usize + 1) * 8;
            }
            // Fragment: only the first fragment carries the upper-layer header, and
            // it must carry all of it (RFC 7112).
            44 => {
                let h = p.get(off..off + 8).ok_or(bad)?;
                let frag_offset = u16::from_be_bytes([h[2], h[3]]) >> 3;
                if frag_offset != 0 {
                    return Ok(());
                }
                next = h[0];
                off += 8;
            }
            IPPROTO_ICMPV6 => {
                let t = *p.get(off).ok_or(bad)?;
                return if t == ICMPV6_ROUTER_ADVERTISEMENT {
                    Err(DropReason::RouterAdvertisement)
                } else {
                    Ok(())
                };
            }
            IPPROTO_UDP => {
                let h = p.get(off..off + 4).ok_or(bad)?;
                let sport = u16::from_be_bytes([h[0], h[1]]);
                let dport = u16::from_be_bytes([h[2], h[3]]);
                return if sport == 547 && dport == 546 {
                    Err(DropReason::Dhcpv6ServerReply)
                } else {
                    Ok(())
                };
            }
            _ => return Ok(()),
        }
    }
    Err(bad)
}

/// The per-guest filter: stateless rules plus the guest's token buckets.
#[derive(Debug)]
pub struct EgressFilter {
    lease: GuestLease,
    bytes: TokenBucket,
    packets: TokenBucket,
    group: TokenBucket,
}

impl EgressFilter {
    /// A filter for `lease` with full buckets.
    pub fn new(lease: &GuestLease) -> EgressFilter {
        let l = &lease.limits;
        EgressFilter {
            lease: lease.clone(),
            bytes: TokenBucket::new(l.bytes_per_sec, l.byte_burst),
            packets: TokenBucket::new(l.packets_per_sec, l.packet_burst),
            group: TokenBucket::new(l.broadcast_per_sec, l.broadcast_burst),
        }
    }

    /// The lease the filter enforces.
    pub fn lease(&self) -> &GuestLease {
        &self.lease
    }

    /// Whether a frame from the guest may enter the session to the buyer.
    /// A frame the rules reject is charged too (as far as the buckets reach): reading
    /// and judging it cost the seller as much as an accepted one.
    pub fn check_egress(&mut self, frame: &[u8], now: Instant) -> Result<(), DropReason> {
        let v = classify_egress(&self.lease, frame).inspect_err(|_| {
            self.charge_rejected(frame.len(), now);
        })?;
        if v.group && !self.group.has(1, now) {
            return Err(DropReason::BroadcastRate);
        }
        if !self.packets.has(1, now) {
            return Err(DropReason::PacketRate);
        }
        if !self.bytes.take(frame.len() as u64, now) {
            return Err(DropReason::ByteRate);
        }
        self.packets.take(1, now);
        if v.group {
            self.group.take(1, now);
        }
        Ok(())
    }

    /// Charge a guest frame that was rejected before the rules (e.g. its offload
    /// request was refused): one packet and its bytes, as far as the buckets reach.
    pub fn charge_rejected(&mut self, len: usize, now: Instant) {
        self.packets.spend(1, now);
        self.bytes.spend(len as u64, now);
    }

    /// How long the guest port should rest before it reads more guest frames: zero
    /// while the buckets hold `frames` packets and `bytes` bytes, else the time until
    /// they do. Frames the guest sends meanwhile wait in (or overflow) the kernel's
    /// queue at no cost to the seller.
    pub fn backoff(&mut self, frames: u64, bytes: u64, now: Instant) -> std::time::Duration {
        self.packets
            .wait_for(frames, now)
            .max(self.bytes.wait_for(bytes, now))
    }

    /// Whether a frame from the buyer may be written to the guest: it must be
    /// addressed to the guest's MAC or broadcast (IPv6 multicast too when the lease
    /// allows IPv6, for neighbour discovery).
    pub fn check_ingress(&self, frame: &[u8]) -> Result<(), DropReason> {
        check_ingress(&self.lease, frame)
    }
}

/// See [`EgressFilter::check_ingress`].
pub fn check_ingress(lease: &GuestLease, frame: &[u8]) -> Result<(), DropReason> {
    if frame.len() < ETH_HDR {
        return Err(DropReason::Runt);
    }
    if frame.len() > lease.mtu as usize + ETH_HDR {
        return Err(DropReason::Oversize);
    }
    let dst = dst_mac(frame);
    let v6_multicast = dst.0[0] == 0x33 && dst.0[1] == 0x33;
    if dst == lease.guest_mac || dst.is_broadcast() || (lease.allow_ipv6 && v6_multicast) {
        Ok(())
    } else {
        Err(DropReason::IngressNotForGuest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use crate::{MacAddr, RateLimits};
    use std::time::Duration;

    fn lease() -> GuestLease {
        GuestLease::new(GUEST_MAC, GUEST_IP, BUYER_MAC, BUYER_IP)
    }

    fn v6_lease() -> GuestLease {
        GuestLease {
            allow_ipv6: true,
            ..lease()
        }
    }

    #[test]
    fn egress_rule_table() {
        let other_mac = MacAddr([2, 0, 0, 0, 0, 0x99]);
        let other_ip = Ipv4Addr::new(10, 77, 0, 99);
        let zero = Ipv4Addr::UNSPECIFIED;
        let bcast = Ipv4Addr::BROADCAST;
        let mut vlan = udp4(GUEST_MAC, BUYER_MAC, GUEST_IP, BUYER_IP, 1000, 2000, b"x");
        vlan[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
        let mut qinq = vlan.clone();
        qinq[12..14].copy_from_slice(&0x88a8u16.to_be_bytes());
        let mut qinq_old = vlan.clone();
        qinq_old[12..14].copy_from_slice(&0x9100u16.to_be_bytes());
        let mut bad_ihl = udp4(GUEST_MAC, BUYER_MAC, GUEST_IP, BUYER_IP, 1, 2, b"x");
        bad_ihl[14] = 0x44;
        let mut short_total = udp4(GUEST_MAC, BUYER_MAC, GUEST_IP, BUYER_IP, 1, 2, b"x");
        short_total[16..18].copy_from_slice(&2000u16.to_be_bytes());
        let mut bad_arp = arp(GUEST_MAC, GUEST_MAC, GUEST_IP, BUYER_IP, 1);
        bad_arp[14 + 4] = 8;
        let mut later_fragment = udp4(GUEST_MAC, BUYER_MAC, other_ip, BUYER_IP, 67, 68, b"x");
        later_fragment[14 + 6..14 + 8].copy_from_slice(&0x0010u16.to_be_bytes());
        let mut frag_dhcp_guest = udp4(GUEST_MAC, BUYER_MAC, GUEST_IP, BUYER_IP, 1, 2, b"x");
        frag_dhcp_guest[14 + 6..14 + 8].copy_from_slice(&0x0010u16.to_be_bytes());
        let full = vec![0u8; 1400];
        let too_big = vec![0u8; 1401];
        let ra = icmp6(GUEST_MAC, 134);
        let ns = icmp6(GUEST_MAC, 135);

        type Case = (&'static str, GuestLease, Vec<u8>, Result<bool, DropReason>);
        let cases: Vec<Case> = vec![
            (
                "unicast udp",
                lease(),
                udp4(GUEST_MAC, BUYER_MAC, GUEST_IP, BUYER_IP, 1000, 53, b"q"),
                Ok(false),
            ),
            (
                "to the internet is still only into the session",
                lease(),
                udp4(
                    GUEST_MAC,
                    BUYER_MAC,
                    GUEST_IP,
                    Ipv4Addr::new(8, 8, 8, 8),
                    1,
                    2,
                    b"",
                ),
                Ok(false),
            ),
            (
                "full-size frame",
                lease(),
                udp4(
                    GUEST_MAC,
                    BUYER_MAC,
                    GUEST_IP,
                    BUYER_IP,
                    1,
                    2,
                    &full[..1400 - 28],
                ),
                Ok(false),
            ),
            (
                "oversize frame",
                lease(),
                udp4(
                    GUEST_MAC,
                    BUYER_MAC,
                    GUEST_IP,
                    BUYER_IP,
                    1,
                    2,
                    &too_big[..1401 - 28],
                ),
                Err(DropReason::Oversize),
            ),
            ("runt", lease(), vec![0u8; 13], Err(DropReason::Runt)),
            (
                "forged source mac",
                lease(),
                udp4(other_mac, BUYER_MAC, GUEST_IP, BUYER_IP, 1, 2, b""),
                Err(DropReason::SourceMac),
            ),
            (
                "forged source ip",
                lease(),
                udp4(GUEST_MAC, BUYER_MAC, other_ip, BUYER_IP, 1, 2, b""),
                Err(DropReason::Ipv4Source),
            ),
            (
                "dhcp discover from 0.0.0.0",
                lease(),
                udp4(GUEST_MAC, MacAddr::BROADCAST, zero, bcast, 68, 67, b"d"),
                Ok(true),
            ),
            (
                "0.0.0.0 but not dhcp",
                lease(),
                udp4(GUEST_MAC, MacAddr::BROADCAST, zero, bcast, 68, 1234, b"d"),
                Err(DropReason::Ipv4Source),
            ),
            (
                "0.0.0.0 dhcp not broadcast",
                lease(),
                udp4(GUEST_MAC, BUYER_MAC, zero, BUYER_IP, 68, 67, b"d"),
                Err(DropReason::Ipv4Source),
            ),
            (
                "dhcp renew from own ip",
                lease(),
                udp4(GUEST_MAC, BUYER_MAC, GUEST_IP, BUYER_IP, 68, 67, b"d"),
                Ok(false),
            ),
            (
                "rogue dhcp server",
                lease(),
                udp4(GUEST_MAC, MacAddr::BROADCAST, GUEST_IP, bcast, 67, 68, b"o"),
                Err(DropReason::DhcpServerReply),
            ),
            (
                "non-first fragment with ports-like bytes",
                lease(),
                later_fragment,
                Err(DropReason::Ipv4Source),
            ),
            (
                "non-first fragment from own ip",
                lease(),
                frag_dhcp_guest,
                Ok(false),
            ),
            (
                "ipv4 bad ihl",
                lease(),
                bad_ihl,
                Err(DropReason::Ipv4Malformed),
            ),
            (
                "ipv4 total length past frame",
                lease(),
                short_total,
                Err(DropReason::Ipv4Malformed),
            ),
            (
                "ipv4 header cut",
                lease(),
                eth(GUEST_MAC, BUYER_MAC, 0x0800, &[0x45; 10]),
                Err(DropReason::Ipv4Malformed),
            ),
            (
                "arp request",
                lease(),
                arp(GUEST_MAC, GUEST_MAC, GUEST_IP, BUYER_IP, 1),
                Ok(true),
            ),
            (
                "arp reply",
                lease(),
                arp(GUEST_MAC, GUEST_MAC, GUEST_IP, BUYER_IP, 2),
                Ok(true),
            ),
            (
                "arp probe from 0.0.0.0",
                lease(),
                arp(GUEST_MAC, GUEST_MAC, zero, GUEST_IP, 1),
                Ok(true),
            ),
            (
                "arp reply from 0.0.0.0",
                lease(),
                arp(GUEST_MAC, GUEST_MAC, zero, GUEST_IP, 2),
                Err(DropReason::ArpSpoof),
            ),
            (
                "arp spoofed sender ip",
                lease(),
                arp(GUEST_MAC, GUEST_MAC, BUYER_IP, other_ip, 2),
                Err(DropReason::ArpSpoof),
            ),
            (
                "arp spoofed sender mac",
                lease(),
                arp(GUEST_MAC, other_mac, GUEST_IP, BUYER_IP, 2),
                Err(DropReason::ArpSpoof),
            ),
            (
                "arp malformed",
                lease(),
                bad_arp,
                Err(DropReason::ArpMalformed),
            ),
            (
                "arp truncated",
                lease(),
                eth(GUEST_MAC, MacAddr::BROADCAST, 0x0806, &[0; 20]),
                Err(DropReason::ArpMalformed),
            ),
            ("vlan 802.1q", lease(), vlan, Err(DropReason::VlanTagged)),
            ("qinq 802.1ad", lease(), qinq, Err(DropReason::VlanTagged)),
            (
                "qinq 0x9100",
                lease(),
                qinq_old,
                Err(DropReason::VlanTagged),
            ),
            (
                "ipv6 when not allowed",
                lease(),
                ns.clone(),
                Err(DropReason::EtherType),
            ),
            (
                "other ethertype",
                lease(),
                eth(GUEST_MAC, BUYER_MAC, 0x88cc, &[0; 40]),
                Err(DropReason::EtherType),
            ),
            ("ipv6 neighbour solicitation", v6_lease(), ns, Ok(true)),
            (
                "ipv6 router advertisement",
                v6_lease(),
                ra,
                Err(DropReason::RouterAdvertisement),
            ),
            (
                "ipv6 RA behind hop-by-hop",
                v6_lease(),
                icmp6_with_hbh(GUEST_MAC, 134),
                Err(DropReason::RouterAdvertisement),
            ),
            (
                "dhcpv6 server reply",
                v6_lease(),
                udp6(GUEST_MAC, 547, 546),
                Err(DropReason::Dhcpv6ServerReply),
            ),
            (
                "dhcpv6 client",
                v6_lease(),
                udp6(GUEST_MAC, 546, 547),
                Ok(true),
            ),
            (
                "ipv6 truncated",
                v6_lease(),
                eth(GUEST_MAC, BUYER_MAC, 0x86dd, &[0x60; 30]),
                Err(DropReason::Ipv6Malformed),
            ),
        ];
        for (name, lease, frame, want) in cases {
            let got = classify_egress(&lease, &frame).map(|v| v.group);
            assert_eq!(got, want, "case {name:?}");
        }
    }

    #[test]
    fn rate_limits() {
        let t0 = Instant::now();
        let mut l = lease();
        l.limits = RateLimits {
            bytes_per_sec: 10_000,
            byte_burst: 3_000,
            packets_per_sec: 100,
            packet_burst: 20,
            broadcast_per_sec: 1,
            broadcast_burst: 3,
        };
        let mut f = EgressFilter::new(&l);
        let b = arp(GUEST_MAC, GUEST_MAC, GUEST_IP, BUYER_IP, 1);
        for _ in 0..3 {
            assert_eq!(f.check_egress(&b, t0), Ok(()));
        }
        assert_eq!(
            f.check_egress(&b, t0),
            Err(DropReason::BroadcastRate),
            "broadcast storm"
        );
        assert_eq!(f.check_egress(&b, t0 + Duration::from_secs(1)), Ok(()));
        let big = udp4(GUEST_MAC, BUYER_MAC, GUEST_IP, BUYER_IP, 1, 2, &[0; 1000]);
        assert_eq!(f.check_egress(&big, t0 + Duration::from_secs(1)), Ok(()));
        assert_eq!(f.check_egress(&big, t0 + Duration::from_secs(1)), Ok(()));
        assert_eq!(
            f.check_egress(&big, t0 + Duration::from_secs(1)),
            Err(DropReason::ByteRate)
        );
        let small = udp4(GUEST_MAC, BUYER_MAC, GUEST_IP, BUYER_IP, 1, 2, b"");
        let t2 = t0 + Duration::from_secs(2);
        let mut ok = 0;
        while f.check_egress(&small, t2).is_ok() {
            ok += 1;
        }
        assert_eq!(ok, 20, "packet bucket refilled to its burst");
        assert_eq!(f.check_egress(&small, t2), Err(DropReason::PacketRate));
    }

    #[test]
    fn rejected_frames_are_charged_and_the_port_backs_off() {
        let t0 = Instant::now();
        let mut l = lease();
        l.limits.packets_per_sec = 1000;
        l.limits.packet_burst = 10;
        let mut f = EgressFilter::new(&l);
        assert_eq!(f.backoff(10, 1000, t0), Duration::ZERO);
        let forged = udp4(GUEST_MAC, BUYER_MAC, BUYER_IP, GUEST_IP, 1, 2, b"");
        for _ in 0..10 {
            assert_eq!(f.check_egress(&forged, t0), Err(DropReason::Ipv4Source));
        }
        let good = udp4(GUEST_MAC, BUYER_MAC, GUEST_IP, BUYER_IP, 1, 2, b"");
        assert_eq!(
            f.check_egress(&good, t0),
            Err(DropReason::PacketRate),
            "junk used up the guest's own packet budget"
        );
        assert_eq!(f.backoff(5, 1000, t0), Duration::from_millis(5));
        f.charge_rejected(100, t0);
        assert_eq!(
            f.backoff(5, 1000, t0),
            Duration::from_millis(5),
            "an empty bucket stays at zero"
        );
        let t1 = t0 + Duration::from_millis(5);
        assert_eq!(f.backoff(5, 1000, t1), Duration::ZERO);
        assert_eq!(f.check_egress(&good, t1), Ok(()));
    }

    #[test]
    fn ingress_rule_table() {
        let f = EgressFilter::new(&lease());
        let f6 = EgressFilter::new(&v6_lease());
        let to_guest = udp4(BUYER_MAC, GUEST_MAC, BUYER_IP, GUEST_IP, 1, 2, b"");
        let to_bcast = arp(BUYER_MAC, BUYER_MAC, BUYER_IP, GUEST_IP, 1);
        let to_other = udp4(
            BUYER_MAC,
            MacAddr([2, 0, 0, 0, 0, 0x42]),
            BUYER_IP,
            GUEST_IP,
            1,
            2,
            b"",
        );
        let mut to_v6mc = to_guest.clone();
        to_v6mc[..6].copy_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(f.check_ingress(&to_guest), Ok(()));
        assert_eq!(f.check_ingress(&to_bcast), Ok(()));
        assert_eq!(
            f.check_ingress(&to_other),
            Err(DropReason::IngressNotForGuest)
        );
        assert_eq!(
            f.check_ingress(&to_v6mc),
            Err(DropReason::IngressNotForGuest)
        );
        assert_eq!(f6.check_ingress(&to_v6mc), Ok(()));
        assert_eq!(f.check_ingress(&[0; 10]), Err(DropReason::Runt));
        assert_eq!(
            f.check_ingress(&vec![0xff; 1415]),
            Err(DropReason::Oversize)
        );
    }
}
