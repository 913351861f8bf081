//! The seller's per-guest egress filter (guest -> overlay) and ingress check
//! (overlay -> guest). Rules come from the lease; every drop has a [`DropReason`].

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use crate::eth::{
    dst_mac, ethertype, src_mac, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_QINQ,
    ETHERTYPE_QINQ_OLD, ETHERTYPE_VLAN, ETH_HDR,
};
use crate::ratelimit::TokenBucket;
use crate::{DropReason, GuestLease, Ipv6Sources};

const IPPROTO_UDP: u8 = 17;
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
        ETHERTYPE_IPV6 if lease.allow_ipv6 => check_ipv6(&lease.ipv6_sources(), payload)?,
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

/// IPv6 next-header values the filter knows (RFC 8200 and the IANA registry).
mod nh {
    pub const HOP_BY_HOP: u8 = 0;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const ESP: u8 = 50;
    pub const AH: u8 = 51;
    pub const ICMPV6: u8 = 58;
    pub const NO_NEXT: u8 = 59;
    pub const DEST_OPTS: u8 = 60;
    pub const MOBILITY: u8 = 135;
    pub const HIP: u8 = 139;
    pub const SHIM6: u8 = 140;
    pub const EXPERIMENT1: u8 = 253;
    pub const EXPERIMENT2: u8 = 254;
}

const ICMPV6_MLD1_REPORT: u8 = 131;
const ICMPV6_ROUTER_SOLICITATION: u8 = 133;
const ICMPV6_NEIGHBOR_SOLICITATION: u8 = 135;
const ICMPV6_REDIRECT: u8 = 137;
const ICMPV6_MLD2_REPORT: u8 = 143;

/// Checks an IPv6 packet from a guest whose lease allows IPv6: its source is one of
/// `sources` (or `::` in duplicate address detection and MLD reports), and its header
/// chain holds only what a guest needs (default deny): at most a leading hop-by-hop
/// header carrying padding and router alert (MLD), and one fragment header, before
/// TCP, UDP or ICMPv6. Router advertisements, redirects and DHCPv6 server replies are
/// dropped, and so are fragmented neighbour discovery and MLD messages (RFC 6980).
pub fn check_ipv6(sources: &Ipv6Sources, p: &[u8]) -> Result<(), DropReason> {
    let bad = DropReason::Ipv6Malformed;
    if p.len() < 40 || p[0] >> 4 != 6 {
        return Err(bad);
    }
    let end = 40 + u16::from_be_bytes([p[4], p[5]]) as usize;
    if end > p.len() {
        return Err(bad);
    }
    let p = &p[..end];
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&p[8..24]).expect("16 bytes"));
    let unspecified = src.is_unspecified();
    if !unspecified && !sources.contains(src) {
        return Err(DropReason::Ipv6Source);
    }
    // `::` only for the messages a host sends before it has an address.
    let from_any = |ok: bool| {
        if unspecified && !ok {
            Err(DropReason::Ipv6Source)
        } else {
            Ok(())
        }
    };
    let mut next = p[6];
    let mut off = 40;
    let mut fragmented = false;
    let mut first = true;
    loop {
        match next {
            nh::HOP_BY_HOP if first => {
                let h = p.get(off..off + 2).ok_or(bad)?;
                let len = (h[1] as usize + 1) * 8;
                let opts = p.get(off + 2..off + len).ok_or(bad)?;
                hop_by_hop_options_ok(opts)?;
                next = h[0];
                off += len;
            }
            nh::FRAGMENT if !fragmented => {
                let h = p.get(off..off + 8).ok_or(bad)?;
                fragmented = true;
                // Only the first fragment carries the upper-layer header, and it must
                // carry all of it (RFC 7112); later ones are judged by the source.
                if u16::from_be_bytes([h[2], h[3]]) >> 3 != 0 {
                    return from_any(false);
                }
                next = h[0];
                off += 8;
            }
            nh::ICMPV6 => {
                let t = *p.get(off).ok_or(bad)?;
                let nd_or_mld = matches!(t, 130..=137 | ICMPV6_MLD2_REPORT);
                return match t {
                    ICMPV6_ROUTER_ADVERTISEMENT => Err(DropReason::RouterAdvertisement),
                    ICMPV6_REDIRECT => Err(DropReason::Icmpv6Redirect),
                    _ if fragmented && nd_or_mld => Err(DropReason::Ipv6ExtensionHeader),
                    _ => from_any(matches!(
                        t,
                        ICMPV6_NEIGHBOR_SOLICITATION
                            | ICMPV6_ROUTER_SOLICITATION
                            | ICMPV6_MLD1_REPORT
                            | ICMPV6_MLD2_REPORT
                    )),
                };
            }
            nh::UDP => {
                let h = p.get(off..off + 4).ok_or(bad)?;
                let sport = u16::from_be_bytes([h[0], h[1]]);
                let dport = u16::from_be_bytes([h[2], h[3]]);
                return if sport == 547 && dport == 546 {
                    Err(DropReason::Dhcpv6ServerReply)
                } else {
                    from_any(false)
                };
            }
            nh::TCP => {
                p.get(off..off + 4).ok_or(bad)?;
                return from_any(false);
            }
            // Extension headers a guest has no use for, a hop-by-hop header after the
            // first, a second fragment header: default deny.
            nh::HOP_BY_HOP
            | nh::ROUTING
            | nh::FRAGMENT
            | nh::ESP
            | nh::AH
            | nh::NO_NEXT
            | nh::DEST_OPTS
            | nh::MOBILITY
            | nh::HIP
            | nh::SHIM6
            | nh::EXPERIMENT1
            | nh::EXPERIMENT2 => return Err(DropReason::Ipv6ExtensionHeader),
            _ => return Err(DropReason::Ipv6NextHeader),
        }
        first = false;
    }
}

/// The options of a hop-by-hop header: only Pad1, PadN and router alert (MLD needs
/// it); anything else, a jumbogram included, is refused.
fn hop_by_hop_options_ok(mut o: &[u8]) -> Result<(), DropReason> {
    while let Some(&ty) = o.first() {
        if ty == 0 {
            o = &o[1..]; // Pad1
            continue;
        }
        let len = *o.get(1).ok_or(DropReason::Ipv6Malformed)? as usize;
        if o.len() < 2 + len {
            return Err(DropReason::Ipv6Malformed);
        }
        match (ty, len) {
            (1, _) | (5, 2) => {} // PadN, router alert
            _ => return Err(DropReason::Ipv6ExtensionHeader),
        }
        o = &o[2 + len..];
    }
    Ok(())
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
    /// allows IPv6, for neighbour discovery), and be no IPv6 unless the lease allows it.
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
    // A guest whose lease has no IPv6 gets none (the switch floods what it must).
    if ethertype(frame) == ETHERTYPE_IPV6 && !lease.allow_ipv6 {
        return Err(DropReason::EtherType);
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
    use proptest::prelude::*;
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
        let mut bad_arp = arp_frame(GUEST_MAC, GUEST_MAC, GUEST_IP, BUYER_IP, 1);
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
                eth(BUYER_MAC, GUEST_MAC, 0x0800, &[0x45; 10]),
                Err(DropReason::Ipv4Malformed),
            ),
            (
                "arp request",
                lease(),
                arp_frame(GUEST_MAC, GUEST_MAC, GUEST_IP, BUYER_IP, 1),
                Ok(true),
            ),
            (
                "arp reply",
                lease(),
                arp_frame(GUEST_MAC, GUEST_MAC, GUEST_IP, BUYER_IP, 2),
                Ok(true),
            ),
            (
                "arp probe from 0.0.0.0",
                lease(),
                arp_frame(GUEST_MAC, GUEST_MAC, zero, GUEST_IP, 1),
                Ok(true),
            ),
            (
                "arp reply from 0.0.0.0",
                lease(),
                arp_frame(GUEST_MAC, GUEST_MAC, zero, GUEST_IP, 2),
                Err(DropReason::ArpSpoof),
            ),
            (
                "arp spoofed sender ip",
                lease(),
                arp_frame(GUEST_MAC, GUEST_MAC, BUYER_IP, other_ip, 2),
                Err(DropReason::ArpSpoof),
            ),
            (
                "arp spoofed sender mac",
                lease(),
                arp_frame(GUEST_MAC, other_mac, GUEST_IP, BUYER_IP, 2),
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
                eth(MacAddr::BROADCAST, GUEST_MAC, 0x0806, &[0; 20]),
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
                eth(BUYER_MAC, GUEST_MAC, 0x88cc, &[0; 40]),
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
                eth(BUYER_MAC, GUEST_MAC, 0x86dd, &[0x60; 30]),
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
        let b = arp_frame(GUEST_MAC, GUEST_MAC, GUEST_IP, BUYER_IP, 1);
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
        let to_bcast = arp_frame(BUYER_MAC, BUYER_MAC, BUYER_IP, GUEST_IP, 1);
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
        // IPv6 to a guest whose lease has none is dropped even when addressed to it.
        let mut v6_to_guest =
            ipv6_frame(BUYER_MAC, BUYER_MAC.ipv6_link_local(), 58, &[128, 0, 0, 0]);
        v6_to_guest[..6].copy_from_slice(&GUEST_MAC.0);
        assert_eq!(f.check_ingress(&v6_to_guest), Err(DropReason::EtherType));
        assert_eq!(f6.check_ingress(&v6_to_guest), Ok(()));
        assert_eq!(f.check_ingress(&[0; 10]), Err(DropReason::Runt));
        assert_eq!(
            f.check_ingress(&vec![0xff; 1415]),
            Err(DropReason::Oversize)
        );
    }

    const GLOBAL6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x11);

    fn v6_lease_with_global() -> GuestLease {
        GuestLease {
            guest_ipv6: Some(GLOBAL6),
            ..v6_lease()
        }
    }

    /// An extension header of 8 bytes whose next header is `next` (for the kinds the
    /// filter walks: hop-by-hop and destination options padded with PadN, routing
    /// type 0 with no segments left, a fragment at `frag_offset`).
    fn ext(kind: u8, next: u8, frag_offset: u16) -> Vec<u8> {
        match kind {
            44 => {
                let mut h = vec![next, 0];
                h.extend_from_slice(&(frag_offset << 3).to_be_bytes());
                h.extend_from_slice(&[0, 0, 0x12, 0x34]);
                h
            }
            43 => vec![next, 0, 0, 0, 0, 0, 0, 0],
            _ => vec![next, 0, 1, 4, 0, 0, 0, 0],
        }
    }

    /// A chain of extension headers `kinds` ending in `last` (protocol number) with
    /// `payload`, from `src`.
    fn chained(src: Ipv6Addr, kinds: &[u8], last: u8, payload: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        for (i, k) in kinds.iter().enumerate() {
            let next = kinds.get(i + 1).copied().unwrap_or(last);
            body.extend_from_slice(&ext(*k, next, 0));
        }
        body.extend_from_slice(payload);
        let first = kinds.first().copied().unwrap_or(last);
        ipv6_frame(GUEST_MAC, src, first, &body)
    }

    fn icmp6_msg(ty: u8) -> Vec<u8> {
        vec![ty, 0, 0, 0, 0, 0, 0, 0]
    }

    #[test]
    fn ipv6_rule_table() {
        let ll = GUEST_MAC.ipv6_link_local();
        let any = Ipv6Addr::UNSPECIFIED;
        let other: Ipv6Addr = "2001:db8::99".parse().unwrap();
        let echo = icmp6_msg(128);
        let ra = icmp6_msg(134);
        let mut jumbo_hbh = vec![58, 0, 0xc2, 4, 0, 1, 0, 0];
        jumbo_hbh.extend_from_slice(&echo);
        let mut router_alert_mld = vec![58, 0, 5, 2, 0, 0, 1, 0];
        router_alert_mld.extend_from_slice(&icmp6_msg(143));
        let mut later_fragment = ext(44, 58, 5);
        later_fragment.extend_from_slice(&[0; 8]);
        let tcp = [0u8; 20];
        type Case = (&'static str, GuestLease, Vec<u8>, Result<bool, DropReason>);
        let cases: Vec<Case> = vec![
            (
                "echo from link-local",
                v6_lease(),
                chained(ll, &[], 58, &echo),
                Ok(true),
            ),
            (
                "tcp from link-local",
                v6_lease(),
                chained(ll, &[], 6, &tcp),
                Ok(true),
            ),
            (
                "from the leased address",
                v6_lease_with_global(),
                chained(GLOBAL6, &[], 58, &echo),
                Ok(true),
            ),
            (
                "leased address on a lease without one",
                v6_lease(),
                chained(GLOBAL6, &[], 58, &echo),
                Err(DropReason::Ipv6Source),
            ),
            (
                "forged source",
                v6_lease_with_global(),
                chained(other, &[], 58, &echo),
                Err(DropReason::Ipv6Source),
            ),
            (
                "another MAC's link-local",
                v6_lease(),
                chained(
                    MacAddr([2, 0, 0, 0, 0, 0x99]).ipv6_link_local(),
                    &[],
                    58,
                    &echo,
                ),
                Err(DropReason::Ipv6Source),
            ),
            (
                "DAD neighbour solicitation from ::",
                v6_lease(),
                chained(any, &[], 58, &icmp6_msg(135)),
                Ok(true),
            ),
            (
                "MLDv2 report with router alert from ::",
                v6_lease(),
                ipv6_frame(GUEST_MAC, any, 0, &router_alert_mld),
                Ok(true),
            ),
            (
                "echo from ::",
                v6_lease(),
                chained(any, &[], 58, &echo),
                Err(DropReason::Ipv6Source),
            ),
            (
                "udp from ::",
                v6_lease(),
                chained(any, &[], 17, &udp(1, 2, b"x")),
                Err(DropReason::Ipv6Source),
            ),
            (
                "RA behind destination options",
                v6_lease(),
                chained(ll, &[60], 58, &ra),
                Err(DropReason::Ipv6ExtensionHeader),
            ),
            (
                "RA behind a routing header",
                v6_lease(),
                chained(ll, &[43], 58, &ra),
                Err(DropReason::Ipv6ExtensionHeader),
            ),
            (
                "RA behind hop-by-hop and fragment",
                v6_lease(),
                chained(ll, &[0, 44], 58, &ra),
                Err(DropReason::RouterAdvertisement),
            ),
            (
                "echo behind hop-by-hop and fragment",
                v6_lease(),
                chained(ll, &[0, 44], 58, &echo),
                Ok(true),
            ),
            (
                "hop-by-hop after a fragment header",
                v6_lease(),
                chained(ll, &[44, 0], 58, &echo),
                Err(DropReason::Ipv6ExtensionHeader),
            ),
            (
                "two fragment headers",
                v6_lease(),
                chained(ll, &[44, 44], 58, &echo),
                Err(DropReason::Ipv6ExtensionHeader),
            ),
            (
                "hop-by-hop with a jumbo payload option",
                v6_lease(),
                ipv6_frame(GUEST_MAC, ll, 0, &jumbo_hbh),
                Err(DropReason::Ipv6ExtensionHeader),
            ),
            (
                "fragmented neighbour solicitation",
                v6_lease(),
                chained(ll, &[44], 58, &icmp6_msg(135)),
                Err(DropReason::Ipv6ExtensionHeader),
            ),
            (
                "later fragment from own address",
                v6_lease(),
                ipv6_frame(GUEST_MAC, ll, 44, &later_fragment),
                Ok(true),
            ),
            (
                "redirect",
                v6_lease(),
                chained(ll, &[], 58, &icmp6_msg(137)),
                Err(DropReason::Icmpv6Redirect),
            ),
            (
                "ESP",
                v6_lease(),
                chained(ll, &[], 50, &[0; 16]),
                Err(DropReason::Ipv6ExtensionHeader),
            ),
            (
                "no next header",
                v6_lease(),
                chained(ll, &[], 59, &[]),
                Err(DropReason::Ipv6ExtensionHeader),
            ),
            (
                "SCTP (not TCP, UDP or ICMPv6)",
                v6_lease(),
                chained(ll, &[], 132, &[0; 12]),
                Err(DropReason::Ipv6NextHeader),
            ),
            (
                "chain cut short",
                v6_lease(),
                ipv6_frame(GUEST_MAC, ll, 0, &[58, 0, 1]),
                Err(DropReason::Ipv6Malformed),
            ),
        ];
        for (name, lease, frame, want) in cases {
            let got = classify_egress(&lease, &frame).map(|v| v.group);
            assert_eq!(got, want, "case {name:?}");
        }
    }

    proptest! {
        /// Whatever chain of extension headers precedes it, a router advertisement is
        /// never accepted, and a chain with a header outside the allowed ones (a
        /// leading hop-by-hop, one fragment) is dropped as such.
        #[test]
        fn no_router_advertisement_hides_behind_extension_headers(
            kinds in proptest::collection::vec(prop_oneof![Just(0u8), Just(43), Just(44), Just(60)], 0..5),
            ty in prop_oneof![Just(134u8), Just(128), Just(129)],
        ) {
            let f = chained(GUEST_MAC.ipv6_link_local(), &kinds, 58, &icmp6_msg(ty));
            let got = classify_egress(&v6_lease(), &f);
            let allowed_chain = kinds.iter().enumerate().all(|(i, k)| (*k == 0 && i == 0) || *k == 44)
                && kinds.iter().filter(|k| **k == 44).count() <= 1;
            if !allowed_chain {
                prop_assert_eq!(got, Err(DropReason::Ipv6ExtensionHeader));
            } else if ty == 134 {
                prop_assert_eq!(got, Err(DropReason::RouterAdvertisement));
            } else {
                prop_assert!(got.is_ok());
            }
        }

        /// The source check: accepted exactly when the source is the guest's
        /// link-local or leased address.
        #[test]
        fn ipv6_source_must_be_the_leases(src in any::<[u8; 16]>(), pick in 0u8..3) {
            let src = match pick {
                0 => Ipv6Addr::from(src),
                1 => GUEST_MAC.ipv6_link_local(),
                _ => GLOBAL6,
            };
            let lease = v6_lease_with_global();
            let got = classify_egress(&lease, &chained(src, &[], 58, &icmp6_msg(128)));
            if src == GUEST_MAC.ipv6_link_local() || src == GLOBAL6 {
                prop_assert!(got.is_ok());
            } else {
                prop_assert_eq!(got, Err(DropReason::Ipv6Source));
            }
        }

        /// The IPv6 walk never panics and never reads past the packet.
        #[test]
        fn ipv6_parser_never_panics(body in proptest::collection::vec(any::<u8>(), 0..120), next in any::<u8>()) {
            let _ = classify_egress(&v6_lease(), &ipv6_frame(GUEST_MAC, GUEST_MAC.ipv6_link_local(), next, &body));
            let mut p = ipv6_from(GUEST_MAC.ipv6_link_local(), next, &body);
            p[4..6].copy_from_slice(&u16::MAX.to_be_bytes());
            let _ = check_ipv6(&v6_lease().ipv6_sources(), &p);
        }
    }
}
