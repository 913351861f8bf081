//! Buyer and seller cores wired together in memory: handshakes, switching, DHCP,
//! replay, tampering, expiry, rekey, rate limiting.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use crate::dhcp::{self, tests::client_frame};
use crate::testutil::*;
use crate::{
    Action, Actions, BuyerConfig, BuyerCore, DropReason, Event, GuestLease, Identity, MacAddr,
    SellerConfig, SellerCore,
};

pub(crate) const BUYER_ADDR: &str = "192.0.2.1:5555";

pub(crate) fn guest_mac(i: usize) -> MacAddr {
    MacAddr([0x52, 0x54, 0, 0, 1, i as u8])
}

pub(crate) fn guest_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 1, i as u8 + 10)
}

pub(crate) fn seller_addr(i: usize) -> SocketAddr {
    SocketAddr::from(([198, 51, 100, i as u8 + 1], 40000 + i as u16))
}

#[derive(Clone, Debug)]
pub(crate) enum Dgram {
    ToBuyer { from: SocketAddr, bytes: Vec<u8> },
    ToSeller { to: usize, bytes: Vec<u8> },
}

/// A buyer, some sellers and an in-memory network between them.
pub(crate) struct Harness {
    pub buyer_id: Identity,
    pub buyer: BuyerCore,
    pub sellers: Vec<SellerCore>,
    /// The address each seller's datagrams appear to come from.
    pub from: Vec<SocketAddr>,
    /// Addresses sellers had before their NAT rebound: datagrams to them are lost.
    pub old_from: Vec<SocketAddr>,
    pub now: Instant,
    pub net: VecDeque<Dgram>,
    pub tap: Vec<Vec<u8>>,
    pub guests: Vec<Vec<Vec<u8>>>,
    pub events: Vec<Event>,
    pub out: Actions,
}

impl Harness {
    pub fn new(n: usize) -> Harness {
        Harness::with_timers(n, crate::Timers::default())
    }

    /// A harness whose buyer and sellers all run with `timers`.
    pub fn with_timers(n: usize, timers: crate::Timers) -> Harness {
        let buyer_id = test_identity();
        let mut bcfg = BuyerConfig::new(BUYER_MAC);
        bcfg.timers = timers.clone();
        let mut buyer = BuyerCore::with_rng(buyer_id.clone(), bcfg, test_rng()).unwrap();
        let mut sellers = Vec::new();
        for i in 0..n {
            let sid = test_identity();
            buyer
                .admit(sid.public_key(), guest_mac(i), guest_ip(i))
                .unwrap();
            let lease = GuestLease::new(guest_mac(i), guest_ip(i), BUYER_MAC, BUYER_IP);
            let mut cfg = SellerConfig::new(
                buyer_id.public_key(),
                BUYER_ADDR.parse().unwrap(),
                lease,
                SystemTime::now(),
            );
            cfg.timers = timers.clone();
            sellers.push(SellerCore::with_rng(sid, cfg, test_rng()).unwrap());
        }
        Harness {
            buyer_id,
            buyer,
            from: (0..n).map(seller_addr).collect(),
            old_from: Vec::new(),
            sellers,
            now: Instant::now(),
            net: VecDeque::new(),
            tap: Vec::new(),
            guests: vec![Vec::new(); n],
            events: Vec::new(),
            out: Actions::new(),
        }
    }

    fn collect_seller(&mut self, i: usize) {
        while let Some(a) = self.out.pop() {
            match a {
                Action::SendUdp { to, bytes } => {
                    assert_eq!(
                        to,
                        BUYER_ADDR.parse::<SocketAddr>().unwrap(),
                        "seller sends only to its buyer"
                    );
                    self.net.push_back(Dgram::ToBuyer {
                        from: self.from[i],
                        bytes,
                    });
                }
                Action::DeliverToGuest(f) => self.guests[i].push(f),
                Action::WriteTap(_) => panic!("seller wrote a tap frame"),
                Action::Event(e) => self.events.push(e),
            }
        }
    }

    pub fn collect_buyer(&mut self) {
        while let Some(a) = self.out.pop() {
            match a {
                Action::SendUdp { to, bytes } => match self.from.iter().position(|a| *a == to) {
                    Some(i) => self.net.push_back(Dgram::ToSeller { to: i, bytes }),
                    None => assert!(
                        self.old_from.contains(&to),
                        "buyer sent to an address no seller ever had: {to}"
                    ),
                },
                Action::WriteTap(f) => self.tap.push(f),
                Action::DeliverToGuest(_) => panic!("buyer delivered to a guest"),
                Action::Event(e) => self.events.push(e),
            }
        }
    }

    pub fn deliver(&mut self, d: Dgram) {
        match d {
            Dgram::ToBuyer { from, bytes } => {
                self.buyer.handle_udp(from, &bytes, self.now, &mut self.out);
                self.collect_buyer();
            }
            Dgram::ToSeller { to, bytes } => {
                let from = BUYER_ADDR.parse().unwrap();
                self.sellers[to].handle_udp(from, &bytes, self.now, &mut self.out);
                self.collect_seller(to);
            }
        }
    }

    /// Delivers everything in flight (and whatever that causes). Panics if the two
    /// sides keep answering each other without time passing.
    pub fn settle(&mut self) {
        let mut delivered = 0;
        while let Some(d) = self.net.pop_front() {
            self.deliver(d);
            delivered += 1;
            assert!(delivered < 100_000, "the network never goes quiet");
        }
    }

    pub fn tick(&mut self) {
        for i in 0..self.sellers.len() {
            self.sellers[i].tick(self.now, &mut self.out);
            self.collect_seller(i);
        }
        self.buyer.tick(self.now, &mut self.out);
        self.collect_buyer();
    }

    /// The buyer restarts: same identity and admissions, every session gone.
    pub fn restart_buyer(&mut self) {
        let cfg = self.buyer.config().clone();
        let peers = self.buyer.stats().peers;
        self.buyer = BuyerCore::with_rng(self.buyer_id.clone(), cfg, test_rng()).unwrap();
        for p in peers {
            self.buyer.admit(p.peer, p.guest_mac, p.guest_ip).unwrap();
        }
    }

    /// Seller `i`'s NAT maps it to a new address; the old mapping is gone.
    pub fn rebind(&mut self, i: usize) {
        let old = self.from[i];
        self.old_from.push(old);
        let n = self.old_from.len() as u16;
        self.from[i] = SocketAddr::from(([198, 51, 100, i as u8 + 1], 50000 + n));
    }

    /// `secs` seconds of a working network with the timers running, then quiet.
    pub fn run_timers(&mut self, secs: u32) {
        for _ in 0..secs {
            self.settle();
            self.advance(Duration::from_secs(1));
            self.tick();
        }
        self.settle();
    }

    pub fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    pub fn guest_sends(&mut self, i: usize, frame: &[u8]) {
        self.sellers[i].handle_guest_frame(frame, self.now, &mut self.out);
        self.collect_seller(i);
    }

    pub fn host_sends(&mut self, frame: &[u8]) {
        self.buyer.handle_tap_frame(frame, self.now, &mut self.out);
        self.collect_buyer();
    }

    pub fn connect(n: usize) -> Harness {
        Harness::connect_with(n, crate::Timers::default())
    }

    pub fn connect_with(n: usize, timers: crate::Timers) -> Harness {
        let mut h = Harness::with_timers(n, timers);
        h.tick();
        h.settle();
        for i in 0..n {
            assert!(h.sellers[i].is_established(), "seller {i}");
        }
        assert!(h.buyer.stats().peers.iter().all(|p| p.established));
        h.events.clear();
        h
    }
}

fn frame_from_guest(i: usize, dst: MacAddr, dst_ip: Ipv4Addr, tag: u8) -> Vec<u8> {
    udp4(
        guest_mac(i),
        dst,
        guest_ip(i),
        dst_ip,
        1000,
        2000,
        &[tag; 64],
    )
}

#[test]
fn handshake_then_frames_both_ways() {
    let mut h = Harness::new(1);
    h.tick();
    assert!(matches!(
        h.events[0],
        Event::HandshakeInitiated { attempt: 1, .. }
    ));
    h.settle();
    assert!(
        h.events
            .iter()
            .filter(|e| matches!(e, Event::SessionEstablished { rekey: false, .. }))
            .count()
            == 2,
        "{:?}",
        h.events
    );
    let f = frame_from_guest(0, BUYER_MAC, BUYER_IP, 1);
    h.guest_sends(0, &f);
    h.settle();
    assert_eq!(h.tap, vec![f]);
    let back = udp4(
        BUYER_MAC,
        guest_mac(0),
        BUYER_IP,
        guest_ip(0),
        2000,
        1000,
        b"reply",
    );
    h.host_sends(&back);
    h.settle();
    assert_eq!(h.guests[0], vec![back]);
    let s = h.buyer.stats();
    assert_eq!(
        (s.peers[0].traffic.rx_frames, s.peers[0].traffic.tx_frames),
        (1, 1)
    );
    assert_eq!(s.peers[0].endpoint, Some(seller_addr(0)));
}

#[test]
fn frames_before_the_handshake_are_queued_not_lost() {
    let mut h = Harness::new(1);
    let f = frame_from_guest(0, BUYER_MAC, BUYER_IP, 1);
    h.guest_sends(0, &f);
    h.guest_sends(0, &f);
    h.settle();
    assert_eq!(h.tap.len(), 2);
}

#[test]
fn dhcp_full_exchange_through_the_overlay() {
    let mut h = Harness::connect(1);
    let z = Ipv4Addr::UNSPECIFIED;
    h.guest_sends(
        0,
        &client_frame(guest_mac(0), dhcp::DISCOVER, 42, None, None, z),
    );
    h.settle();
    let offer = dhcp::parse_server_frame(h.guests[0].last().unwrap()).unwrap();
    assert_eq!((offer.msg_type, offer.yiaddr), (dhcp::OFFER, guest_ip(0)));
    h.guest_sends(
        0,
        &client_frame(
            guest_mac(0),
            dhcp::REQUEST,
            43,
            Some(offer.yiaddr),
            Some(BUYER_IP),
            z,
        ),
    );
    h.settle();
    let ack = dhcp::parse_server_frame(h.guests[0].last().unwrap()).unwrap();
    assert_eq!((ack.msg_type, ack.yiaddr), (dhcp::ACK, guest_ip(0)));
    assert!(
        h.tap.is_empty(),
        "DHCP is answered by the switch, not the host"
    );
    assert!(h
        .events
        .iter()
        .any(|e| matches!(e, Event::DhcpAck { ip, .. } if *ip == guest_ip(0))));
}

#[test]
fn guest_to_guest_and_broadcast_through_the_switch() {
    let mut h = Harness::connect(3);
    let f = frame_from_guest(0, guest_mac(1), guest_ip(1), 7);
    h.guest_sends(0, &f);
    h.settle();
    assert_eq!(h.guests[1], vec![f.clone()]);
    assert!(h.guests[2].is_empty() && h.tap.is_empty());
    let b = arp_frame(guest_mac(0), guest_mac(0), guest_ip(0), guest_ip(2), 1);
    h.guest_sends(0, &b);
    h.settle();
    assert_eq!(h.guests[1].last(), Some(&b));
    assert_eq!(h.guests[2], vec![b.clone()]);
    assert_eq!(h.tap, vec![b]);
    assert!(h.guests[0].is_empty(), "no echo to the sender");
    // Host broadcast reaches every guest.
    let hb = arp_frame(BUYER_MAC, BUYER_MAC, BUYER_IP, guest_ip(1), 1);
    h.host_sends(&hb);
    h.settle();
    for i in 0..3 {
        assert_eq!(h.guests[i].last(), Some(&hb));
    }
}

#[test]
fn session_is_bound_to_its_guest_mac() {
    let mut h = Harness::connect(2);
    // A seller that skips its filter and sends as guest 1.
    let forged = frame_from_guest(1, BUYER_MAC, BUYER_IP, 9);
    let mut out = Actions::new();
    h.sellers[0].send_unfiltered(&forged, h.now, &mut out);
    while let Some(Action::SendUdp { bytes, .. }) = out.pop() {
        h.net.push_back(Dgram::ToBuyer {
            from: seller_addr(0),
            bytes,
        });
    }
    h.settle();
    assert!(h.tap.is_empty());
    assert_eq!(
        h.buyer.stats().peers[0]
            .drops
            .get(DropReason::SessionMacMismatch),
        1
    );
    // And the filter stops an honest seller's guest from trying.
    h.guest_sends(0, &forged);
    assert_eq!(h.sellers[0].stats().drops.get(DropReason::SourceMac), 1);
}

#[test]
fn replayed_datagrams_deliver_nothing_twice() {
    let mut h = Harness::connect(1);
    let mut captured = Vec::new();
    for t in 0..20 {
        h.guest_sends(0, &frame_from_guest(0, BUYER_MAC, BUYER_IP, t));
    }
    captured.extend(h.net.iter().map(|d| match d {
        Dgram::ToBuyer { from, bytes } => (*from, bytes.clone()),
        _ => unreachable!(),
    }));
    h.settle();
    assert_eq!(h.tap.len(), 20);
    for (from, bytes) in captured.iter().rev() {
        h.deliver(Dgram::ToBuyer {
            from: *from,
            bytes: bytes.clone(),
        });
    }
    assert_eq!(h.tap.len(), 20);
    assert_eq!(h.buyer.stats().peers[0].drops.get(DropReason::Replay), 20);
}

#[test]
fn reordered_within_window_all_arrive_once() {
    let mut h = Harness::connect(1);
    for t in 0..100u8 {
        h.guest_sends(0, &frame_from_guest(0, BUYER_MAC, BUYER_IP, t));
    }
    let mut v: Vec<_> = h.net.drain(..).collect();
    v.reverse();
    v.swap(3, 70);
    for d in v {
        h.deliver(d);
    }
    let mut tags: Vec<u8> = h.tap.iter().map(|f| f[f.len() - 1]).collect();
    tags.sort();
    assert_eq!(tags, (0..100).collect::<Vec<u8>>());
}

#[test]
fn tampered_header_or_payload_is_dropped() {
    let mut h = Harness::connect(1);
    h.guest_sends(0, &frame_from_guest(0, BUYER_MAC, BUYER_IP, 1));
    let Some(Dgram::ToBuyer { from, bytes }) = h.net.pop_front() else {
        panic!()
    };
    // counter (top byte, so it is not a replay) and a payload byte and the tag
    for pos in [15, 20, bytes.len() - 1] {
        let mut t = bytes.clone();
        t[pos] ^= 0x80;
        h.deliver(Dgram::ToBuyer { from, bytes: t });
    }
    let mut t = bytes.clone();
    t[4] ^= 1; // receiver index
    h.deliver(Dgram::ToBuyer { from, bytes: t });
    assert!(h.tap.is_empty());
    let s = h.buyer.stats();
    assert_eq!(s.peers[0].drops.get(DropReason::Decrypt), 3);
    assert_eq!(s.drops.get(DropReason::UnknownIndex), 1);
    // The original still arrives: tampered copies did not move the replay window.
    h.deliver(Dgram::ToBuyer { from, bytes });
    assert_eq!(h.tap.len(), 1);
}

#[test]
fn wrong_buyer_key_gets_no_session() {
    let mut h = Harness::new(1);
    let sid = test_identity();
    h.buyer
        .admit(sid.public_key(), guest_mac(5), guest_ip(5))
        .unwrap();
    let lease = GuestLease::new(guest_mac(5), guest_ip(5), BUYER_MAC, BUYER_IP);
    // The seller believes in another buyer key.
    let cfg = SellerConfig::new(
        test_identity().public_key(),
        BUYER_ADDR.parse().unwrap(),
        lease,
        SystemTime::now(),
    );
    h.sellers[0] = SellerCore::with_rng(sid, cfg, test_rng()).unwrap();
    h.tick();
    h.settle();
    assert!(!h.sellers[0].is_established());
    assert_eq!(h.buyer.stats().drops.get(DropReason::HandshakeInvalid), 1);
}

#[test]
fn unadmitted_key_and_bad_identity_signature_are_refused() {
    let mut h = Harness::new(1);
    let buyer_key = h.buyer_id.public_key();
    let lease = GuestLease::new(guest_mac(0), guest_ip(0), BUYER_MAC, BUYER_IP);
    let cfg = SellerConfig::new(
        buyer_key,
        BUYER_ADDR.parse().unwrap(),
        lease.clone(),
        SystemTime::now(),
    );
    // Not admitted: a different key claiming guest 0.
    h.sellers[0] = SellerCore::with_rng(test_identity(), cfg.clone(), test_rng()).unwrap();
    h.tick();
    h.settle();
    assert!(!h.sellers[0].is_established());
    assert_eq!(h.buyer.stats().drops.get(DropReason::NotAdmitted), 1);
    // Bad binding: the admitted key, but its Noise key signed by someone else.
    let sk = ed25519_dalek::SigningKey::generate(&mut test_rng());
    let forged = Identity::with_forged_binding(
        sk.clone(),
        &ed25519_dalek::SigningKey::generate(&mut test_rng()),
    );
    assert!(h.buyer.revoke(guest_mac(0)));
    h.buyer
        .admit(forged.public_key(), guest_mac(0), guest_ip(0))
        .unwrap();
    h.sellers[0] = SellerCore::with_rng(forged, cfg, test_rng()).unwrap();
    h.tick();
    h.settle();
    assert!(!h.sellers[0].is_established());
    assert_eq!(
        h.buyer.stats().drops.get(DropReason::BadIdentitySignature),
        1
    );
    assert!(h
        .events
        .iter()
        .any(|e| matches!(e, Event::HandshakeRejected { .. })));
}

#[test]
fn replayed_initiation_is_refused() {
    let mut h = Harness::new(1);
    h.tick();
    let Some(Dgram::ToBuyer { from, bytes: init }) = h.net.front().map(|d| match d {
        Dgram::ToBuyer { from, bytes } => Dgram::ToBuyer {
            from: *from,
            bytes: bytes.clone(),
        },
        _ => unreachable!(),
    }) else {
        panic!()
    };
    h.settle();
    assert!(h.sellers[0].is_established());
    // An attacker replays the captured initiation from elsewhere.
    let attacker: SocketAddr = "203.0.113.9:1".parse().unwrap();
    h.buyer.handle_udp(attacker, &init, h.now, &mut h.out);
    assert!(h.out.drain().all(|a| !matches!(a, Action::SendUdp { .. })));
    let _ = from;
    assert_eq!(h.buyer.stats().drops.get(DropReason::StaleHandshake), 1);
    // The session keeps working at the old endpoint.
    h.guest_sends(0, &frame_from_guest(0, BUYER_MAC, BUYER_IP, 1));
    h.settle();
    assert_eq!(h.tap.len(), 1);
    assert_eq!(h.buyer.stats().peers[0].endpoint, Some(seller_addr(0)));
}

#[test]
fn expired_session_is_rejected() {
    let mut h = Harness::connect(1);
    // Nobody ticks for 181 s (the seller would have rekeyed at 120 s).
    h.advance(Duration::from_secs(181));
    h.host_sends(&udp4(
        BUYER_MAC,
        guest_mac(0),
        BUYER_IP,
        guest_ip(0),
        1,
        2,
        b"late",
    ));
    assert!(h.net.is_empty(), "buyer does not send on expired keys");
    assert_eq!(h.buyer.stats().peers[0].drops.get(DropReason::NoSession), 1);
    // A datagram under the old keys that arrives late is refused.
    let mut out = Actions::new();
    let t_old = h.now - Duration::from_secs(181);
    h.sellers[0].send_unfiltered(
        &frame_from_guest(0, BUYER_MAC, BUYER_IP, 1),
        t_old,
        &mut out,
    );
    let Some(Action::SendUdp { bytes, .. }) = out.pop() else {
        panic!()
    };
    h.deliver(Dgram::ToBuyer {
        from: seller_addr(0),
        bytes,
    });
    assert!(h.tap.is_empty());
    assert_eq!(
        h.buyer.stats().peers[0]
            .drops
            .get(DropReason::SessionExpired),
        1
    );
    h.buyer.tick(h.now, &mut h.out);
    h.collect_buyer();
    assert!(h
        .events
        .iter()
        .any(|e| matches!(e, Event::SessionExpired { .. })));
    assert!(!h.buyer.stats().peers[0].established);
    // The seller's timers bring the session back.
    h.tick();
    h.settle();
    assert!(h.sellers[0].is_established() && h.buyer.stats().peers[0].established);
}

#[test]
fn rekey_loses_no_in_flight_frames() {
    let mut h = Harness::connect(1);
    let mut sent_up = 0u8;
    let mut sent_down = 0u8;
    let mut held = Vec::new();
    for _ in 0..3 {
        // Frames under the current keys, both directions, held in flight.
        for _ in 0..5 {
            h.guest_sends(0, &frame_from_guest(0, BUYER_MAC, BUYER_IP, sent_up));
            sent_up += 1;
            h.host_sends(&udp4(
                BUYER_MAC,
                guest_mac(0),
                BUYER_IP,
                guest_ip(0),
                1,
                2,
                &[sent_down; 8],
            ));
            sent_down += 1;
        }
        held.extend(h.net.drain(..));
        // Time for a rekey; the handshake completes while those frames are in flight.
        h.advance(Duration::from_secs(121));
        h.tick();
        h.settle();
        // New-key traffic first, then the old in-flight frames.
        h.guest_sends(0, &frame_from_guest(0, BUYER_MAC, BUYER_IP, sent_up));
        sent_up += 1;
        h.host_sends(&udp4(
            BUYER_MAC,
            guest_mac(0),
            BUYER_IP,
            guest_ip(0),
            1,
            2,
            &[sent_down; 8],
        ));
        sent_down += 1;
        h.settle();
        for d in held.drain(..) {
            h.deliver(d);
        }
        h.settle();
    }
    let mut up: Vec<u8> = h.tap.iter().map(|f| f[f.len() - 1]).collect();
    up.sort();
    assert_eq!(up, (0..sent_up).collect::<Vec<_>>());
    let mut down: Vec<u8> = h.guests[0].iter().map(|f| f[f.len() - 1]).collect();
    down.sort();
    assert_eq!(down, (0..sent_down).collect::<Vec<_>>());
    assert_eq!(h.sellers[0].stats().handshakes, 4);
    assert_eq!(h.buyer.stats().peers[0].handshakes, 4);
    assert!(h
        .events
        .iter()
        .any(|e| matches!(e, Event::SessionEstablished { rekey: true, .. })));
}

#[test]
fn rekey_after_message_count() {
    let mut h = Harness::new(1);
    h.sellers[0] = {
        let lease = GuestLease::new(guest_mac(0), guest_ip(0), BUYER_MAC, BUYER_IP);
        let mut cfg = SellerConfig::new(
            h.buyer_id.public_key(),
            BUYER_ADDR.parse().unwrap(),
            lease,
            SystemTime::now(),
        );
        cfg.timers.rekey_after_messages = 10;
        cfg.timers.reject_after_messages = 20;
        let key = ed25519_dalek::SigningKey::generate(&mut test_rng());
        let id = Identity::from_signing_key(key);
        h.buyer.revoke(guest_mac(0));
        h.buyer
            .admit(id.public_key(), guest_mac(0), guest_ip(0))
            .unwrap();
        SellerCore::with_rng(id, cfg, test_rng()).unwrap()
    };
    h.tick();
    h.settle();
    for t in 0..40u8 {
        h.guest_sends(0, &frame_from_guest(0, BUYER_MAC, BUYER_IP, t));
        h.settle();
    }
    assert_eq!(h.tap.len(), 40);
    assert!(
        h.sellers[0].stats().handshakes >= 4,
        "{}",
        h.sellers[0].stats().handshakes
    );
}

#[test]
fn keepalives_when_idle() {
    let mut h = Harness::connect(1);
    h.advance(Duration::from_secs(16));
    h.tick();
    let sizes: Vec<usize> = h
        .net
        .iter()
        .map(|d| match d {
            Dgram::ToBuyer { bytes, .. } | Dgram::ToSeller { bytes, .. } => bytes.len(),
        })
        .collect();
    assert_eq!(
        sizes,
        vec![crate::wire::DATA_MIN_LEN, crate::wire::DATA_MIN_LEN]
    );
    h.settle();
    assert!(h.tap.is_empty() && h.guests[0].is_empty());
}

#[test]
fn endpoint_follows_nat_rebinding() {
    let mut h = Harness::connect(1);
    h.from[0] = "198.51.100.77:9999".parse().unwrap();
    h.guest_sends(0, &frame_from_guest(0, BUYER_MAC, BUYER_IP, 1));
    h.settle();
    assert!(h
        .events
        .iter()
        .any(|e| matches!(e, Event::EndpointChanged { endpoint, .. } if *endpoint == h.from[0])));
    h.host_sends(&udp4(
        BUYER_MAC,
        guest_mac(0),
        BUYER_IP,
        guest_ip(0),
        1,
        2,
        b"x",
    ));
    h.settle(); // collect_buyer asserts the new endpoint is used
    assert_eq!(h.guests[0].len(), 1);
}

#[test]
fn handshake_flood_is_rate_limited() {
    let mut h = Harness::new(1);
    h.tick();
    let Some(Dgram::ToBuyer { bytes: init, .. }) = h.net.pop_front() else {
        panic!()
    };
    let src: SocketAddr = "203.0.113.5:7".parse().unwrap();
    let limits = crate::HandshakeLimits::default();
    for _ in 0..1000 {
        h.buyer.handle_udp(src, &init, h.now, &mut h.out);
    }
    let _ = h.out.drain().count();
    let s = h.buyer.stats();
    let processed = 1000 - s.drops.get(DropReason::HandshakeRateLimited);
    assert_eq!(processed, limits.per_source_burst as u64);
    // Many sources: the global cap holds.
    for i in 0..2000u32 {
        let src = SocketAddr::from((u32::to_be_bytes(0xcb00_7100 + i), 7));
        h.buyer.handle_udp(src, &init, h.now, &mut h.out);
    }
    let _ = h.out.drain().count();
    let s = h.buyer.stats();
    let processed = 3000 - s.drops.get(DropReason::HandshakeRateLimited);
    assert!(processed <= limits.global_burst as u64, "{processed}");
}

#[test]
fn wrong_source_and_garbage_at_the_seller() {
    let mut h = Harness::connect(1);
    let mut out = Actions::new();
    h.sellers[0].handle_udp(
        "203.0.113.1:5555".parse().unwrap(),
        &[4, 0, 0, 0],
        h.now,
        &mut out,
    );
    h.sellers[0].handle_udp(BUYER_ADDR.parse().unwrap(), &[9; 40], h.now, &mut out);
    assert!(out.is_empty());
    let d = h.sellers[0].stats().drops;
    assert_eq!(
        (
            d.get(DropReason::WrongSource),
            d.get(DropReason::MalformedDatagram)
        ),
        (1, 1)
    );
    assert!(d.to_map().contains_key("wrong_source"));
}

#[test]
fn admit_checks_conflicts() {
    let mut h = Harness::new(1);
    let k = test_identity().public_key();
    assert!(
        h.buyer.admit(k, guest_mac(0), guest_ip(9)).is_err(),
        "MAC taken"
    );
    assert!(
        h.buyer.admit(k, guest_mac(9), guest_ip(0)).is_err(),
        "IP taken"
    );
    assert!(h.buyer.admit(k, guest_mac(9), BUYER_IP).is_err(), "host IP");
    assert!(
        h.buyer
            .admit(k, guest_mac(9), Ipv4Addr::new(10, 78, 0, 5))
            .is_err(),
        "outside subnet"
    );
    assert!(
        h.buyer
            .admit(k, guest_mac(9), Ipv4Addr::new(10, 77, 255, 255))
            .is_err(),
        "broadcast"
    );
    assert!(
        h.buyer.admit(k, BUYER_MAC, guest_ip(9)).is_err(),
        "host MAC"
    );
    assert!(
        h.buyer.admit(k, MacAddr::BROADCAST, guest_ip(9)).is_err(),
        "group MAC"
    );
    h.buyer.admit(k, guest_mac(9), guest_ip(9)).unwrap();
    assert!(h.buyer.revoke(guest_mac(9)));
    assert!(!h.buyer.revoke(guest_mac(9)));
}

#[test]
fn too_old_dropped_far_ahead_accepted() {
    let mut h = Harness::connect(1);
    for t in 0..2100u32 {
        h.guest_sends(
            0,
            &frame_from_guest(0, BUYER_MAC, BUYER_IP, (t % 251) as u8),
        );
    }
    let first = h.net.pop_front().unwrap();
    let near = h.net.remove(500).unwrap();
    let last = h.net.pop_back().unwrap();
    // Far ahead first: the window jumps; the oldest is now outside it.
    h.deliver(last);
    h.deliver(first);
    h.deliver(near);
    assert_eq!(h.tap.len(), 2, "far-ahead and within-window frames arrive");
    assert_eq!(
        h.buyer.stats().peers[0].drops.get(DropReason::Replay),
        1,
        "too old"
    );
}

#[test]
fn lost_initiation_is_retried() {
    let mut h = Harness::new(1);
    h.tick();
    assert_eq!(h.net.len(), 1);
    h.net.clear(); // lost
    h.advance(Duration::from_secs(2));
    h.tick();
    assert!(h.net.is_empty(), "no retry before the retry interval");
    h.advance(Duration::from_secs(4));
    h.tick();
    assert!(h
        .events
        .iter()
        .any(|e| matches!(e, Event::HandshakeInitiated { attempt: 2, .. })));
    h.settle();
    assert!(h.sellers[0].is_established());
    assert!(h.buyer.stats().peers[0].established);
}

#[test]
fn restarted_seller_reconnects() {
    let mut h = Harness::connect(1);
    let f = frame_from_guest(0, BUYER_MAC, BUYER_IP, 1);
    // Same identity and lease, a new core (process restart), a moment later.
    h.advance(Duration::from_secs(3));
    let id = Identity::from_signing_key(ed25519_dalek::SigningKey::generate(&mut test_rng()));
    assert!(h.buyer.revoke(guest_mac(0)));
    h.buyer
        .admit(id.public_key(), guest_mac(0), guest_ip(0))
        .unwrap();
    let lease = GuestLease::new(guest_mac(0), guest_ip(0), BUYER_MAC, BUYER_IP);
    let cfg = SellerConfig::new(
        h.buyer_id.public_key(),
        BUYER_ADDR.parse().unwrap(),
        lease.clone(),
        SystemTime::now(),
    );
    h.sellers[0] = SellerCore::with_rng(id.clone(), cfg, test_rng()).unwrap();
    h.tick();
    h.settle();
    let cfg = SellerConfig::new(
        h.buyer_id.public_key(),
        BUYER_ADDR.parse().unwrap(),
        lease,
        SystemTime::now() + Duration::from_secs(1),
    );
    h.sellers[0] = SellerCore::with_rng(id, cfg, test_rng()).unwrap();
    h.guest_sends(0, &f);
    h.settle();
    assert_eq!(h.tap, vec![f]);
}

#[test]
fn idle_session_stays_up_without_rekey_churn() {
    let mut h = Harness::connect(1);
    for _ in 0..100 {
        h.advance(Duration::from_secs(1));
        h.tick();
        h.settle();
    }
    assert_eq!(
        h.sellers[0].stats().handshakes,
        1,
        "keepalives keep it quiet"
    );
    assert!(h.buyer.stats().peers[0].established);
}

#[test]
fn seller_recovers_from_a_buyer_restart() {
    let mut h = Harness::connect(1);
    let seller_key = h.buyer.stats().peers[0].peer;
    // The buyer restarts: same identity, sessions gone.
    h.buyer =
        BuyerCore::with_rng(h.buyer_id.clone(), BuyerConfig::new(BUYER_MAC), test_rng()).unwrap();
    h.buyer
        .admit(seller_key, guest_mac(0), guest_ip(0))
        .unwrap();
    let f = frame_from_guest(0, BUYER_MAC, BUYER_IP, 1);
    h.guest_sends(0, &f);
    h.settle();
    assert!(h.tap.is_empty(), "old keys are unknown to the new buyer");
    for _ in 0..35 {
        h.advance(Duration::from_secs(1));
        h.tick();
        h.settle();
    }
    assert!(
        h.buyer.stats().peers[0].established,
        "seller re-handshook after silence"
    );
    h.guest_sends(0, &f);
    h.settle();
    assert_eq!(h.tap, vec![f]);
}

/// Initiations with a valid mac1 (the attacker knows the buyer's public key) from a
/// stranger, to flood with.
fn stranger_init(h: &Harness) -> Vec<u8> {
    let lease = GuestLease::new(guest_mac(9), guest_ip(9), BUYER_MAC, BUYER_IP);
    let cfg = SellerConfig::new(
        h.buyer_id.public_key(),
        BUYER_ADDR.parse().unwrap(),
        lease,
        SystemTime::now(),
    );
    let mut s = SellerCore::with_rng(test_identity(), cfg, test_rng()).unwrap();
    let mut out = Actions::new();
    s.tick(h.now, &mut out);
    let init = out
        .drain()
        .find_map(|a| match a {
            Action::SendUdp { bytes, .. } => Some(bytes),
            _ => None,
        })
        .unwrap();
    init
}

fn flood(h: &mut Harness, n: u32) -> usize {
    let init = stranger_init(h);
    let mut cookie_replies = 0;
    for i in 0..n {
        let src = SocketAddr::from((u32::to_be_bytes(0x0a00_0000 + i), 9));
        h.buyer.handle_udp(src, &init, h.now, &mut h.out);
        for a in h.out.drain() {
            if let Action::SendUdp { bytes, .. } = a {
                assert_eq!(bytes.len(), crate::wire::COOKIE_REPLY_LEN, "only cookies");
                assert!(bytes.len() < init.len(), "no amplification");
                cookie_replies += 1;
            }
        }
    }
    cookie_replies
}

#[test]
fn spoofed_handshake_flood_does_not_block_a_known_seller() {
    let mut h = Harness::connect(1);
    h.tick();
    let replies = flood(&mut h, 3000);
    let s = h.buyer.stats();
    assert!(s.drops.get(DropReason::HandshakeRateLimited) > 2500);
    assert_eq!(
        replies as u64,
        s.drops.get(DropReason::HandshakeRateLimited)
    );
    // The established seller can still rekey.
    h.advance(Duration::from_secs(121));
    h.tick();
    h.settle();
    assert_eq!(h.buyer.stats().peers[0].handshakes, 2);
}

#[test]
fn new_seller_connects_during_a_flood_with_a_cookie() {
    let mut h = Harness::new(1);
    flood(&mut h, 3000);
    // Global budget spent: the first initiation gets a cookie reply, the seller
    // retries at once with mac2 and is let through.
    h.tick();
    h.settle();
    assert!(h.sellers[0].is_established());
    assert!(h.buyer.stats().peers[0].established);
    assert_eq!(h.sellers[0].stats().handshakes, 1);
}

#[test]
fn cookie_replies_to_a_cookie_bearing_retry_wait_for_the_timer() {
    let mut h = Harness::new(1);
    h.tick();
    let Some(Dgram::ToBuyer { from, bytes: i1 }) = h.net.pop_front() else {
        panic!("no initiation")
    };
    // Copies of an initiation spend a budget (whatever the buyer answers is lost);
    // one more gets a cookie reply, into the network.
    let overspend = |h: &mut Harness, init: &[u8]| {
        for _ in 0..10 {
            h.buyer.handle_udp(from, init, h.now, &mut h.out);
            h.out.drain().for_each(drop);
        }
        h.buyer.handle_udp(from, init, h.now, &mut h.out);
        h.collect_buyer();
    };
    // The seller address's budget: a cookie; the seller retries at once with mac2 (I2).
    overspend(&mut h, &i1);
    let cookie = h.net.pop_front().unwrap();
    h.deliver(cookie);
    let Some(Dgram::ToBuyer { bytes: i2, .. }) = h.net.pop_front() else {
        panic!("no retry after the cookie")
    };
    // The budget proven senders have; the response to I2 is lost.
    overspend(&mut h, &i2);
    assert_eq!(h.net.len(), 1, "one cookie reply");
    // That cookie answers a retry that carried one: no immediate retry (no ping-pong).
    h.settle();
    assert!(h.net.is_empty());
    assert!(!h.sellers[0].is_established());
    // The retry timer brings the session up once the budget has refilled.
    h.advance(Duration::from_secs(5));
    h.tick();
    h.settle();
    assert!(h.sellers[0].is_established());
}

#[test]
fn initiation_without_mac1_costs_nothing() {
    let mut h = Harness::new(1);
    let mut junk = vec![0u8; crate::wire::HANDSHAKE_INIT_LEN];
    junk[0] = crate::wire::TYPE_HANDSHAKE_INIT;
    h.buyer.handle_udp(seller_addr(0), &junk, h.now, &mut h.out);
    assert!(h.out.is_empty());
    assert_eq!(h.buyer.stats().drops.get(DropReason::HandshakeInvalid), 1);
}

#[test]
fn late_response_leaves_seller_keys_no_older_than_the_buyers() {
    let mut h = Harness::new(1);
    h.tick();
    let init = h.net.pop_front().unwrap();
    h.deliver(init); // the buyer makes its keys now
    h.advance(Duration::from_secs(100));
    h.settle(); // the response arrives 100 s late, before any retry
    assert!(h.sellers[0].is_established());
    // Run past the buyer's reject-after time: the seller must have rekeyed in time.
    h.run_timers(100);
    let f = frame_from_guest(0, BUYER_MAC, BUYER_IP, 7);
    h.guest_sends(0, &f);
    h.settle();
    assert_eq!(h.tap.last(), Some(&f), "the session still carries frames");
}

mod model {
    //! Random schedules of traffic, loss, duplication, reordering and time against
    //! the two cores: nothing is delivered that was not sent, nothing twice, and the
    //! session always recovers.
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[derive(Clone, Debug)]
    enum Op {
        GuestSends,
        HostSends,
        Deliver(usize),
        Duplicate(usize),
        Lose(usize),
        Advance(u64),
        Tick,
    }

    /// What the network and the clocks do.
    fn net_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => any::<usize>().prop_map(Op::Deliver),
            1 => any::<usize>().prop_map(Op::Duplicate),
            1 => any::<usize>().prop_map(Op::Lose),
            2 => (0u64..40).prop_map(Op::Advance),
            2 => Just(Op::Tick),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::GuestSends),
            3 => Just(Op::HostSends),
            12 => net_op(),
        ]
    }

    /// Applies a network or clock op; traffic ops are the caller's.
    fn net_step(h: &mut Harness, o: &Op) {
        match *o {
            Op::Deliver(i) if !h.net.is_empty() => {
                let d = h.net.remove(i % h.net.len()).unwrap();
                h.deliver(d);
            }
            Op::Duplicate(i) if !h.net.is_empty() => {
                let d = h.net[i % h.net.len()].clone();
                h.net.push_back(d);
            }
            Op::Lose(i) if !h.net.is_empty() => {
                h.net.remove(i % h.net.len());
            }
            Op::Advance(s) => h.advance(Duration::from_secs(s)),
            Op::Tick => h.tick(),
            _ => {}
        }
    }

    fn id_of(f: &[u8]) -> u32 {
        u32::from_be_bytes(f[f.len() - 4..].try_into().unwrap())
    }

    fn check_unique(frames: &[Vec<u8>], sent: &BTreeSet<u32>) {
        let mut seen = BTreeSet::new();
        for f in frames {
            let id = id_of(f);
            assert!(sent.contains(&id), "frame {id} was never sent");
            assert!(seen.insert(id), "frame {id} delivered twice");
        }
    }

    #[derive(Clone, Debug)]
    enum MultiOp {
        /// Guest `from` sends to guest `to` (`to == from`: to the buyer's host).
        GuestSends {
            from: usize,
            to: usize,
        },
        HostSends {
            to: usize,
        },
        /// A seller's NAT rebinds (its datagrams come from a new address).
        Rebind(usize),
        BuyerRestarts,
        Net(Op),
    }

    const GUESTS: usize = 3;

    fn multi_op() -> impl Strategy<Value = MultiOp> {
        prop_oneof![
            4 => (0..GUESTS, 0..GUESTS).prop_map(|(from, to)| MultiOp::GuestSends { from, to }),
            2 => (0..GUESTS).prop_map(|to| MultiOp::HostSends { to }),
            1 => (0..GUESTS).prop_map(MultiOp::Rebind),
            1 => Just(MultiOp::BuyerRestarts),
            8 => net_op()
            .prop_map(MultiOp::Net),
        ]
    }

    /// Rekeys by message count every few frames, on top of the time-based ones.
    fn chatty_timers() -> crate::Timers {
        crate::Timers {
            rekey_after_messages: 12,
            reject_after_messages: 40,
            ..crate::Timers::default()
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

        /// Three guests talk to the host and to each other through the switch while
        /// sessions rekey every dozen messages, sellers' NATs rebind and the buyer
        /// restarts: every endpoint gets only frames sent to it, each at most once,
        /// and all sessions recover.
        #[test]
        fn multi_guest_schedules(ops in proptest::collection::vec(multi_op(), 1..300)) {
            let mut h = Harness::connect_with(GUESTS, chatty_timers());
            let mut to_host = BTreeSet::new();
            let mut to_guest = vec![BTreeSet::new(); GUESTS];
            let mut next_id = 0u32;
            for o in ops {
                match o {
                    MultiOp::GuestSends { from, to } => {
                        next_id += 1;
                        let id = next_id.to_be_bytes();
                        let f = if from == to {
                            to_host.insert(next_id);
                            udp4(guest_mac(from), BUYER_MAC, guest_ip(from), BUYER_IP, 1, 2, &id)
                        } else {
                            to_guest[to].insert(next_id);
                            udp4(guest_mac(from), guest_mac(to), guest_ip(from), guest_ip(to), 1, 2, &id)
                        };
                        h.guest_sends(from, &f);
                    }
                    MultiOp::HostSends { to } => {
                        next_id += 1;
                        to_guest[to].insert(next_id);
                        let f = udp4(BUYER_MAC, guest_mac(to), BUYER_IP, guest_ip(to), 2, 1, &next_id.to_be_bytes());
                        h.host_sends(&f);
                    }
                    MultiOp::Rebind(i) => h.rebind(i),
                    MultiOp::BuyerRestarts => h.restart_buyer(),
                    MultiOp::Net(o) => net_step(&mut h, &o),
                }
                check_unique(&h.tap, &to_host);
                for (got, sent) in h.guests.iter().zip(&to_guest) {
                    check_unique(got, sent);
                }
            }
            h.run_timers(40);
            for g in 0..GUESTS {
                prop_assert!(h.sellers[g].is_established(), "seller {} recovered", g);
                let (tap_before, guest_before) = (h.tap.len(), h.guests[g].len());
                let mark = u32::MAX - 2 * g as u32;
                h.guest_sends(g, &udp4(guest_mac(g), BUYER_MAC, guest_ip(g), BUYER_IP, 1, 2, &mark.to_be_bytes()));
                h.host_sends(&udp4(BUYER_MAC, guest_mac(g), BUYER_IP, guest_ip(g), 2, 1, &(mark - 1).to_be_bytes()));
                h.settle();
                prop_assert_eq!(h.tap.len(), tap_before + 1, "guest {} reaches the host", g);
                prop_assert_eq!(h.guests[g].len(), guest_before + 1, "the host reaches guest {}", g);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn schedules(ops in proptest::collection::vec(op(), 1..250)) {
            let mut h = Harness::connect(1);
            let (mut up, mut down) = (BTreeSet::new(), BTreeSet::new());
            let mut next_id = 0u32;
            for o in ops {
                match o {
                    Op::GuestSends => {
                        next_id += 1;
                        up.insert(next_id);
                        let f = udp4(guest_mac(0), BUYER_MAC, guest_ip(0), BUYER_IP, 1, 2, &next_id.to_be_bytes());
                        h.guest_sends(0, &f);
                    }
                    Op::HostSends => {
                        next_id += 1;
                        down.insert(next_id);
                        let f = udp4(BUYER_MAC, guest_mac(0), BUYER_IP, guest_ip(0), 2, 1, &next_id.to_be_bytes());
                        h.host_sends(&f);
                    }
                    o => net_step(&mut h, &o),
                }
                check_unique(&h.tap, &up);
                check_unique(&h.guests[0], &down);
            }
            // Recovery: with a working network and running timers the session comes
            // back and carries traffic both ways.
            h.run_timers(40);
            prop_assert!(h.sellers[0].is_established());
            let (tap_before, guest_before) = (h.tap.len(), h.guests[0].len());
            h.guest_sends(0, &udp4(guest_mac(0), BUYER_MAC, guest_ip(0), BUYER_IP, 1, 2, &u32::MAX.to_be_bytes()));
            h.host_sends(&udp4(BUYER_MAC, guest_mac(0), BUYER_IP, guest_ip(0), 2, 1, &(u32::MAX - 1).to_be_bytes()));
            h.settle();
            prop_assert_eq!(h.tap.len(), tap_before + 1);
            prop_assert_eq!(h.guests[0].len(), guest_before + 1);
        }
    }
}

/// All of a core's randomness comes from the RNG it is given: the same seeds, keys,
/// clock and wall time give byte-identical handshakes (Noise ephemeral key and session
/// index included), and another seed gives another one.
#[test]
fn seeded_cores_repeat_their_handshakes_exactly() {
    let buyer_id = Identity::generate_with(&mut crate::rng::seeded(100));
    let seller_id = Identity::generate_with(&mut crate::rng::seeded(101));
    let wall = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
    let now = Instant::now();
    let run = |seller_seed: u64, buyer_seed: u64| {
        let lease = GuestLease::new(guest_mac(0), guest_ip(0), BUYER_MAC, BUYER_IP);
        let cfg = SellerConfig::new(
            buyer_id.public_key(),
            BUYER_ADDR.parse().unwrap(),
            lease,
            wall,
        );
        let mut s =
            SellerCore::with_rng(seller_id.clone(), cfg, crate::rng::seeded(seller_seed)).unwrap();
        let mut b = BuyerCore::with_rng(
            buyer_id.clone(),
            BuyerConfig::new(BUYER_MAC),
            crate::rng::seeded(buyer_seed),
        )
        .unwrap();
        b.admit(seller_id.public_key(), guest_mac(0), guest_ip(0))
            .unwrap();
        let mut out = Actions::new();
        s.tick(now, &mut out);
        let sent = |out: &mut Actions| {
            out.drain()
                .find_map(|a| match a {
                    Action::SendUdp { bytes, .. } => Some(bytes),
                    _ => None,
                })
                .expect("a datagram")
        };
        let init = sent(&mut out);
        b.handle_udp(seller_addr(0), &init, now, &mut out);
        let resp = sent(&mut out);
        (init, resp)
    };
    let a = run(1, 2);
    assert_eq!(a, run(1, 2), "same seeds, same bytes");
    let b = run(3, 2);
    assert_ne!(a.0, b.0, "another seller seed, another initiation");
    assert_ne!(a.1, run(1, 4).1, "another buyer seed, another response");
}

/// The buyer holds a guest's IPv6 to its admission even when the seller does not
/// filter: dropped unless the admission allows IPv6, and then only from the guest's
/// link-local or leased address, with no extension header outside the allowed ones.
#[test]
fn buyer_holds_guest_ipv6_to_the_admission() {
    let mut h = Harness::new(2);
    let global: std::net::Ipv6Addr = "2001:db8::11".parse().unwrap();
    assert!(h.buyer.revoke(guest_mac(1)));
    h.buyer
        .admit_guest(crate::Admission {
            allow_ipv6: true,
            guest_ipv6: Some(global),
            ..crate::Admission::new(h.sellers[1].public_key(), guest_mac(1), guest_ip(1))
        })
        .unwrap();
    h.tick();
    h.settle();
    assert!(h.sellers[0].is_established() && h.sellers[1].is_established());
    let unfiltered = |h: &mut Harness, i: usize, frame: &[u8]| {
        let mut out = Actions::new();
        h.sellers[i].send_unfiltered(frame, h.now, &mut out);
        while let Some(Action::SendUdp { bytes, .. }) = out.pop() {
            h.net.push_back(Dgram::ToBuyer {
                from: seller_addr(i),
                bytes,
            });
        }
        h.settle();
    };
    let echo = [128u8, 0, 0, 0, 0, 0, 0, 0];
    let mut ra_behind_dstopts = vec![58, 0, 1, 4, 0, 0, 0, 0];
    ra_behind_dstopts.extend_from_slice(&[134, 0, 0, 0, 0, 0, 0, 0]);
    let ll = |i: usize| guest_mac(i).ipv6_link_local();

    h.tap.clear();
    unfiltered(&mut h, 0, &ipv6_frame(guest_mac(0), ll(0), 58, &echo));
    assert!(h.tap.is_empty(), "IPv6 from a guest not allowed it");
    let drops = |h: &Harness, i: usize, r: DropReason| h.buyer.stats().peers[i].drops.get(r);
    assert_eq!(drops(&h, 0, DropReason::EtherType), 1);

    unfiltered(&mut h, 1, &ipv6_frame(guest_mac(1), ll(1), 58, &echo));
    unfiltered(&mut h, 1, &ipv6_frame(guest_mac(1), global, 58, &echo));
    assert_eq!(h.tap.len(), 2, "link-local and leased sources pass");
    let forged: std::net::Ipv6Addr = "2001:db8::99".parse().unwrap();
    unfiltered(&mut h, 1, &ipv6_frame(guest_mac(1), forged, 58, &echo));
    unfiltered(&mut h, 1, &ipv6_frame(guest_mac(1), ll(0), 58, &echo));
    unfiltered(
        &mut h,
        1,
        &ipv6_frame(guest_mac(1), ll(1), 60, &ra_behind_dstopts),
    );
    assert_eq!(h.tap.len(), 2);
    assert_eq!(drops(&h, 1, DropReason::Ipv6Source), 2);
    assert_eq!(drops(&h, 1, DropReason::Ipv6ExtensionHeader), 1);

    // A leased IPv6 address is one guest's only, and needs IPv6 allowed.
    let again = crate::Admission {
        allow_ipv6: true,
        guest_ipv6: Some(global),
        ..crate::Admission::new(test_identity().public_key(), guest_mac(5), guest_ip(5))
    };
    assert!(matches!(
        h.buyer.admit_guest(again.clone()),
        Err(crate::Error::AddressConflict(_))
    ));
    assert!(matches!(
        h.buyer.admit_guest(crate::Admission {
            allow_ipv6: false,
            guest_ipv6: Some("2001:db8::55".parse().unwrap()),
            ..again
        }),
        Err(crate::Error::InvalidConfig(_))
    ));
}
