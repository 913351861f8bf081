//! Harnesses shared by the cargo-fuzz targets (`overlay/fuzz/`) and the long-running
//! property test (`overlay/tests/fuzz_props.rs`) that CI runs on stable Rust.
//!
//! Each takes arbitrary bytes, drives the real code and panics if an invariant breaks.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, UNIX_EPOCH};

use crate::filter::{check_ingress, classify_egress};
use crate::rng;
use crate::{
    dhcp, wire, Action, Actions, BuyerConfig, BuyerCore, GuestLease, Identity, MacAddr,
    SellerConfig, SellerCore,
};

const GUEST_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0x11]);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 11);
const BUYER_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0x01]);
const BUYER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

fn seed_key(b: u8) -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[b; 32])
}

/// A connected buyer/seller pair plus the datagrams of the handshake.
struct Pair {
    buyer: BuyerCore,
    seller: SellerCore,
    buyer_addr: SocketAddr,
    seller_addr: SocketAddr,
    now: Instant,
    init: Vec<u8>,
    response: Vec<u8>,
}

fn sends(out: &mut Actions) -> Vec<Vec<u8>> {
    out.drain()
        .filter_map(|a| match a {
            Action::SendUdp { bytes, .. } => Some(bytes),
            _ => None,
        })
        .collect()
}

fn pair() -> Pair {
    // Fixed keys, RNGs and clock: failures reproduce from the input alone.
    let buyer_id = Identity::from_signing_key(seed_key(1));
    let seller_id = Identity::from_signing_key(seed_key(2));
    let buyer_addr: SocketAddr = "192.0.2.1:5555".parse().expect("addr");
    let seller_addr: SocketAddr = "198.51.100.2:40000".parse().expect("addr");
    let mut buyer = BuyerCore::with_rng(
        buyer_id.clone(),
        BuyerConfig::new(BUYER_MAC),
        rng::seeded(1),
    )
    .expect("buyer config");
    buyer
        .admit(seller_id.public_key(), GUEST_MAC, GUEST_IP)
        .expect("admit");
    let lease = GuestLease::new(GUEST_MAC, GUEST_IP, BUYER_MAC, BUYER_IP);
    let wall = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let mut seller = SellerCore::with_rng(
        seller_id,
        SellerConfig::new(buyer_id.public_key(), buyer_addr, lease, wall),
        rng::seeded(2),
    )
    .expect("seller config");
    let now = Instant::now();
    let mut out = Actions::new();
    seller.tick(now, &mut out);
    let init = sends(&mut out).pop().expect("initiation");
    buyer.handle_udp(seller_addr, &init, now, &mut out);
    let response = sends(&mut out).pop().expect("response");
    seller.handle_udp(buyer_addr, &response, now, &mut out);
    for d in sends(&mut out) {
        buyer.handle_udp(seller_addr, &d, now, &mut out);
    }
    let _ = out.drain().count();
    assert!(seller.is_established());
    Pair {
        buyer,
        seller,
        buyer_addr,
        seller_addr,
        now,
        init,
        response,
    }
}

fn guest_frame(payload: &[u8]) -> Vec<u8> {
    let payload = &payload[..payload.len().min(1000)];
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((28 + payload.len()) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&GUEST_IP.octets());
    ip[16..20].copy_from_slice(&BUYER_IP.octets());
    ip.extend_from_slice(&[0x10, 0x00, 0x20, 0x00]);
    ip.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0]);
    ip.extend_from_slice(payload);
    let mut f = Vec::new();
    f.extend_from_slice(&BUYER_MAC.0);
    f.extend_from_slice(&GUEST_MAC.0);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&ip);
    f
}

/// Decryption and handshake processing on arbitrary or mutated datagrams.
///
/// Byte 0 picks a mode: raw bytes to both cores, or a valid data / handshake message
/// from the real peer with the rest of the input XORed over it. Invariants: no panic;
/// a frame reaches the buyer's tap only if the datagram was the unmodified one, and
/// then exactly once; a mutated handshake never yields a session.
pub fn decrypt_case(input: &[u8]) {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let mut p = pair();
    let mut out = Actions::new();
    match mode % 4 {
        0 => {
            p.buyer.handle_udp(p.seller_addr, rest, p.now, &mut out);
            p.seller.handle_udp(p.buyer_addr, rest, p.now, &mut out);
            for a in out.drain() {
                assert!(
                    !matches!(a, Action::WriteTap(_) | Action::DeliverToGuest(_)),
                    "random bytes produced a frame: {a:?}"
                );
            }
        }
        1 | 2 => {
            // A real data message, then mutated.
            let frame = guest_frame(rest);
            p.seller.handle_guest_frame(&frame, p.now, &mut out);
            let original = sends(&mut out).pop().expect("data message");
            let mut d = original.clone();
            for (i, m) in rest.iter().enumerate() {
                if mode % 4 == 1 {
                    let at = i % d.len();
                    d[at] ^= m;
                } else if *m == 0 {
                    d.truncate(i % (d.len() + 1));
                }
            }
            for _ in 0..2 {
                p.buyer.handle_udp(p.seller_addr, &d, p.now, &mut out);
            }
            let taps: Vec<Vec<u8>> = out
                .drain()
                .filter_map(|a| match a {
                    Action::WriteTap(f) => Some(f),
                    _ => None,
                })
                .collect();
            if d == original {
                assert_eq!(taps, vec![frame], "the original arrives exactly once");
            } else {
                assert!(taps.is_empty(), "a modified datagram was accepted");
            }
        }
        _ => {
            // Mutated handshake messages.
            let mut init = p.init.clone();
            let mut resp = p.response.clone();
            for (i, m) in rest.iter().enumerate() {
                if i % 2 == 0 {
                    let at = i / 2 % init.len();
                    init[at] ^= m;
                } else {
                    let at = i / 2 % resp.len();
                    resp[at] ^= m;
                }
            }
            let before = p.buyer.stats().peers[0].handshakes;
            p.buyer.handle_udp(p.seller_addr, &init, p.now, &mut out);
            let replies = sends(&mut out);
            assert!(
                replies.is_empty(),
                "a replayed or modified initiation was answered"
            );
            p.seller.handle_udp(p.buyer_addr, &resp, p.now, &mut out);
            let _ = out.drain().count();
            assert_eq!(p.buyer.stats().peers[0].handshakes, before);
        }
    }
    let _ = p.seller.stats();
    let _ = wire::parse(input);
}

/// The egress filter's frame parser and the DHCP parser on arbitrary frames.
///
/// The first bytes steer the frame towards the deep rules (guest source MAC, an
/// allowed EtherType, the guest's source IP), the rest is arbitrary. Invariants: no
/// panic, and every accepted frame satisfies the lease's address rules. Returns the
/// EtherType of an accepted frame (so tests can check the rules are reached).
pub fn filter_case(input: &[u8]) -> Option<u16> {
    let (&ctl, rest) = input.split_first()?;
    let mut f = rest.to_vec();
    let mut lease = GuestLease::new(GUEST_MAC, GUEST_IP, BUYER_MAC, BUYER_IP);
    lease.allow_ipv6 = ctl & 1 != 0;
    // Bit 6: the lease has a global IPv6 address, and steered frames use it.
    if ctl & 0x40 != 0 {
        lease.guest_ipv6 = Some(GUEST_IPV6);
    }
    if ctl & 2 != 0 && f.len() >= 12 {
        f[6..12].copy_from_slice(&GUEST_MAC.0);
    }
    if f.len() >= 14 {
        let et: u16 = match (ctl >> 2) & 7 {
            0 => 0x0800,
            1 => 0x0806,
            2 => 0x86dd,
            3 => 0x8100,
            _ => u16::from_be_bytes([f[12], f[13]]),
        };
        f[12..14].copy_from_slice(&et.to_be_bytes());
    }
    // Make the network header plausible so the deeper rules are reached; bit 7
    // leaves the source address random (forgery attempts).
    if ctl & 0x20 != 0 && f.len() >= 14 {
        let forge = ctl & 0x80 != 0;
        let l3 = f.len() - 14;
        match u16::from_be_bytes([f[12], f[13]]) {
            0x0800 if l3 >= 20 => {
                f[14] = 0x45;
                f[16..18].copy_from_slice(&(l3 as u16).to_be_bytes());
                if !forge {
                    f[26..30].copy_from_slice(&GUEST_IP.octets());
                }
            }
            0x0806 if l3 >= 28 => {
                f[14..20].copy_from_slice(&[0, 1, 8, 0, 6, 4]);
                let op = 1 + (f[21] & 1);
                f[20..22].copy_from_slice(&[0, op]);
                if !forge {
                    f[22..28].copy_from_slice(&GUEST_MAC.0);
                    f[28..32].copy_from_slice(&GUEST_IP.octets());
                }
            }
            0x86dd if l3 >= 40 => {
                f[14] = 0x60 | (f[14] & 0x0f);
                f[18..20].copy_from_slice(&((l3 - 40) as u16).to_be_bytes());
                if !forge {
                    let src = lease.guest_ipv6.unwrap_or(GUEST_MAC.ipv6_link_local());
                    f[22..38].copy_from_slice(&src.octets());
                    // Mostly an upper layer the filter takes, sometimes anything.
                    if let Some(&n) = [6u8, 17, 58].get((f[20] & 3) as usize) {
                        f[20] = n;
                    }
                }
            }
            _ => {}
        }
    }
    let verdict = classify_egress(&lease, &f);
    if let Ok(v) = verdict {
        assert!(f.len() >= 14 && f.len() <= lease.mtu as usize + 14);
        assert_eq!(&f[6..12], &GUEST_MAC.0);
        assert_eq!(v.group, f[0] & 1 == 1);
        match u16::from_be_bytes([f[12], f[13]]) {
            0x0800 => {
                let src = Ipv4Addr::new(f[26], f[27], f[28], f[29]);
                let ihl = (f[14] & 0xf) as usize * 4;
                let dhcp_client = src.is_unspecified()
                    && f[30..34] == [255; 4]
                    && f[23] == 17
                    && f[14 + ihl..14 + ihl + 4] == [0, 68, 0, 67];
                assert!(
                    src == GUEST_IP || dhcp_client,
                    "forged IPv4 source accepted"
                );
            }
            0x0806 => {
                assert_eq!(&f[22..28], &GUEST_MAC.0, "ARP sender MAC");
                let spa = Ipv4Addr::new(f[28], f[29], f[30], f[31]);
                assert!(spa == GUEST_IP || spa.is_unspecified(), "ARP sender IP");
            }
            0x86dd => {
                assert!(
                    lease.allow_ipv6,
                    "IPv6 accepted without the lease allowing it"
                );
                ipv6_accepted_invariants(&lease, &f[14..]);
            }
            other => panic!("EtherType {other:#06x} accepted"),
        }
    }
    if check_ingress(&lease, &f).is_ok() {
        assert!(
            f[..6] == GUEST_MAC.0
                || f[..6] == [0xff; 6]
                || (lease.allow_ipv6 && f[..2] == [0x33, 0x33])
        );
        assert!(
            lease.allow_ipv6 || f[12..14] != [0x86, 0xdd],
            "IPv6 let in to a guest without it"
        );
    }
    let _ = dhcp::parse_client_frame(&f);
    let _ = dhcp::parse_bootp(rest);
    verdict.ok().map(|_| u16::from_be_bytes([f[12], f[13]]))
}

/// The global IPv6 address `filter_case` gives a lease when its bit 6 is set.
const GUEST_IPV6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x11);

/// What an accepted IPv6 packet must be, checked independently of the filter's walk:
/// a source of the lease's (or `::`), and a header chain of at most a leading
/// hop-by-hop header and one fragment header before TCP, UDP or ICMPv6, carrying no
/// router advertisement or redirect.
fn ipv6_accepted_invariants(lease: &GuestLease, p: &[u8]) {
    let src = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&p[8..24]).expect("16"));
    assert!(
        src.is_unspecified() || lease.ipv6_sources().contains(src),
        "forged IPv6 source {src} accepted"
    );
    let (mut next, mut off, mut i, mut frags) = (p[6], 40usize, 0, 0);
    loop {
        match next {
            0 => assert_eq!(i, 0, "hop-by-hop header not first"),
            44 => {
                frags += 1;
                assert_eq!(frags, 1, "two fragment headers");
                if u16::from_be_bytes([p[off + 2], p[off + 3]]) >> 3 != 0 {
                    return; // a later fragment: no upper-layer header to judge
                }
            }
            6 | 17 => return,
            58 => {
                assert!(!matches!(p[off], 134 | 137), "RA or redirect accepted");
                return;
            }
            other => panic!("next header {other} accepted"),
        }
        let len = if next == 44 {
            8
        } else {
            (p[off + 1] as usize + 1) * 8
        };
        next = p[off];
        off += len;
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The steering bytes make random inputs reach acceptance for every allowed
    /// EtherType, so the invariants in `filter_case` are exercised, not vacuous.
    #[test]
    fn filter_harness_reaches_acceptance() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut seen = std::collections::BTreeMap::new();
        for _ in 0..200_000 {
            let len = rng.gen_range(0..120);
            let input: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            if let Some(et) = filter_case(&input) {
                *seen.entry(et).or_insert(0u32) += 1;
            }
        }
        for et in [0x0800u16, 0x0806, 0x86dd] {
            assert!(
                seen.get(&et).copied().unwrap_or(0) > 10,
                "{et:#06x}: {seen:?}"
            );
        }
    }
}
