//! Frame builders for tests.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::checksum::ipv4_header as ipv4_checksum;
use crate::rng::{seeded, CoreRng};
use crate::{Identity, MacAddr};

thread_local! {
    static DRAWS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// A seeded RNG, a new stream at each call within a test and the same streams from
/// run to run (each test runs on its own thread).
pub fn test_rng() -> CoreRng {
    seeded(DRAWS.with(|d| d.replace(d.get() + 1)))
}

/// An identity drawn from [`test_rng`].
pub fn test_identity() -> Identity {
    Identity::generate_with(&mut test_rng())
}

pub const GUEST_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0x11]);
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 11);
pub const BUYER_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0x01]);
pub const BUYER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

pub fn eth(src: MacAddr, dst: MacAddr, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let c = ipv4_checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(l4);
    p
}

pub fn udp(sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + data.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(data);
    u
}

#[allow(clippy::too_many_arguments)]
pub fn udp4(
    smac: MacAddr,
    dmac: MacAddr,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    data: &[u8],
) -> Vec<u8> {
    eth(
        smac,
        dmac,
        0x0800,
        &ipv4(src, dst, 17, &udp(sport, dport, data)),
    )
}

pub fn arp(smac: MacAddr, sha: MacAddr, spa: Ipv4Addr, tpa: Ipv4Addr, op: u16) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4];
    a.extend_from_slice(&op.to_be_bytes());
    a.extend_from_slice(&sha.0);
    a.extend_from_slice(&spa.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&tpa.octets());
    eth(smac, MacAddr::BROADCAST, 0x0806, &a)
}

/// An IPv6 packet from `src` to ff02::1.
pub fn ipv6_from(src: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    p[6] = next;
    p[7] = 255;
    p[8..24].copy_from_slice(&src.octets());
    p[24] = 0xff;
    p[25] = 0x02;
    p[39] = 1;
    p.extend_from_slice(payload);
    p
}

/// An IPv6 packet from `smac`'s link-local address, in a frame to 33:33:00:00:00:01.
pub fn ipv6_frame(smac: MacAddr, src: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    eth(
        smac,
        MacAddr([0x33, 0x33, 0, 0, 0, 1]),
        0x86dd,
        &ipv6_from(src, next, payload),
    )
}

fn ipv6(next: u8, payload: &[u8]) -> Vec<u8> {
    ipv6_from(GUEST_MAC.ipv6_link_local(), next, payload)
}
pub fn icmp6(smac: MacAddr, ty: u8) -> Vec<u8> {
    eth(
        smac,
        MacAddr([0x33, 0x33, 0, 0, 0, 1]),
        0x86dd,
        &ipv6(58, &[ty, 0, 0, 0, 0, 0, 0, 0]),
    )
}

pub fn icmp6_with_hbh(smac: MacAddr, ty: u8) -> Vec<u8> {
    let mut ext = vec![58, 0, 1, 4, 0, 0, 0, 0];
    ext.extend_from_slice(&[ty, 0, 0, 0, 0, 0, 0, 0]);
    eth(
        smac,
        MacAddr([0x33, 0x33, 0, 0, 0, 1]),
        0x86dd,
        &ipv6(0, &ext),
    )
}

pub fn udp6(smac: MacAddr, sport: u16, dport: u16) -> Vec<u8> {
    eth(
        smac,
        MacAddr([0x33, 0x33, 0, 1, 0, 2]),
        0x86dd,
        &ipv6(17, &udp(sport, dport, b"x")),
    )
}
