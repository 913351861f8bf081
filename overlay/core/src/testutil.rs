//! Frame builders for tests.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::rng::{seeded, CoreRng};
use crate::{Identity, MacAddr};

pub use crate::frames::{arp, eth, ipv4, udp};

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
        dmac,
        smac,
        0x0800,
        &ipv4(src, dst, 17, &udp(sport, dport, data)),
    )
}

/// An ARP frame from `smac` to broadcast (target hardware address zero).
pub fn arp_frame(smac: MacAddr, sha: MacAddr, spa: Ipv4Addr, tpa: Ipv4Addr, op: u16) -> Vec<u8> {
    let a = arp(op, sha, spa, MacAddr([0; 6]), tpa);
    eth(MacAddr::BROADCAST, smac, 0x0806, &a)
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
        MacAddr([0x33, 0x33, 0, 0, 0, 1]),
        smac,
        0x86dd,
        &ipv6_from(src, next, payload),
    )
}

fn ipv6(next: u8, payload: &[u8]) -> Vec<u8> {
    ipv6_from(GUEST_MAC.ipv6_link_local(), next, payload)
}
pub fn icmp6(smac: MacAddr, ty: u8) -> Vec<u8> {
    eth(
        MacAddr([0x33, 0x33, 0, 0, 0, 1]),
        smac,
        0x86dd,
        &ipv6(58, &[ty, 0, 0, 0, 0, 0, 0, 0]),
    )
}

pub fn icmp6_with_hbh(smac: MacAddr, ty: u8) -> Vec<u8> {
    let mut ext = vec![58, 0, 1, 4, 0, 0, 0, 0];
    ext.extend_from_slice(&[ty, 0, 0, 0, 0, 0, 0, 0]);
    eth(
        MacAddr([0x33, 0x33, 0, 0, 0, 1]),
        smac,
        0x86dd,
        &ipv6(0, &ext),
    )
}

pub fn udp6(smac: MacAddr, sport: u16, dport: u16) -> Vec<u8> {
    eth(
        MacAddr([0x33, 0x33, 0, 1, 0, 2]),
        smac,
        0x86dd,
        &ipv6(17, &udp(sport, dport, b"x")),
    )
}
