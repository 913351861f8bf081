//! Per-frame cost of the sans-IO core (no sockets): seller filter+encrypt, buyer
//! decrypt+switch, guest-to-guest re-encryption, next to bare ChaCha20-Poly1305 on the
//! same bytes as the reference. Run: `cargo bench -p overlay --bench core`.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Instant, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use overlay::{
    Action, Actions, BuyerConfig, BuyerCore, GuestLease, Identity, MacAddr, RateLimits,
    SellerConfig, SellerCore,
};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};

const BUYER_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 1]);
const BUYER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const MTU: usize = 1400;

fn mac(i: u8) -> MacAddr {
    MacAddr([0x52, 0x54, 0, 0, 1, i])
}

fn frame(src: MacAddr, dst: MacAddr, src_ip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0u8; MTU];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(MTU as u16).to_be_bytes());
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src_ip.octets());
    ip[16..20].copy_from_slice(&BUYER_IP.octets());
    f.extend_from_slice(&ip);
    f
}

fn sends(out: &mut Actions) -> Vec<(SocketAddr, Vec<u8>)> {
    out.drain()
        .filter_map(|a| match a {
            Action::SendUdp { to, bytes } => Some((to, bytes)),
            _ => None,
        })
        .collect()
}

struct Net {
    buyer: BuyerCore,
    sellers: Vec<(SellerCore, SocketAddr)>,
    buyer_addr: SocketAddr,
}

fn net(n: u8) -> Net {
    let bid = Identity::generate();
    let buyer_addr: SocketAddr = "192.0.2.1:5555".parse().unwrap();
    let mut buyer = BuyerCore::new(bid.clone(), BuyerConfig::new(BUYER_MAC)).unwrap();
    let now = Instant::now();
    let mut out = Actions::new();
    let mut sellers = Vec::new();
    for i in 0..n {
        let sid = Identity::generate();
        let ip = Ipv4Addr::new(10, 77, 1, 10 + i);
        buyer.admit(sid.public_key(), mac(i), ip).unwrap();
        let mut lease = GuestLease::new(mac(i), ip, BUYER_MAC, BUYER_IP);
        // Measure the data path, not the guest's rate limit.
        lease.limits = RateLimits {
            bytes_per_sec: u64::MAX / (1 << 32),
            byte_burst: 1 << 40,
            packets_per_sec: 1 << 40,
            packet_burst: 1 << 40,
            broadcast_per_sec: 1 << 40,
            broadcast_burst: 1 << 40,
        };
        let cfg = SellerConfig::new(bid.public_key(), buyer_addr, lease, SystemTime::now());
        let mut s = SellerCore::new(sid, cfg).unwrap();
        let addr = SocketAddr::from(([198, 51, 100, 1 + i], 40000));
        s.tick(now, &mut out);
        for (_, d) in sends(&mut out) {
            buyer.handle_udp(addr, &d, now, &mut out);
        }
        for (_, d) in sends(&mut out) {
            s.handle_udp(buyer_addr, &d, now, &mut out);
        }
        for (_, d) in sends(&mut out) {
            buyer.handle_udp(addr, &d, now, &mut out);
        }
        let _ = out.drain().count();
        sellers.push((s, addr));
    }
    Net {
        buyer,
        sellers,
        buyer_addr,
    }
}

fn bench(c: &mut Criterion) {
    let f = frame(mac(0), BUYER_MAC, Ipv4Addr::new(10, 77, 1, 10));
    let mut g = c.benchmark_group("overlay-core");
    g.throughput(Throughput::Bytes(f.len() as u64));

    // Reference: ChaCha20-Poly1305 seal of the same bytes, in place.
    let aead = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &[7u8; 32]).unwrap());
    let mut buf = f.clone();
    let mut ctr = 0u64;
    g.bench_function("reference: chacha20poly1305 seal 1414 B", |b| {
        b.iter(|| {
            ctr += 1;
            let mut n = [0u8; 12];
            n[4..].copy_from_slice(&ctr.to_le_bytes());
            aead.seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(n),
                Aad::from([0u8; 16]),
                &mut buf,
            )
            .unwrap()
        })
    });

    let mut nw = net(2);
    let mut out = Actions::new();
    g.bench_function("seller: filter + encrypt 1414 B", |b| {
        b.iter(|| {
            nw.sellers[0]
                .0
                .handle_guest_frame(&f, Instant::now(), &mut out);
            while let Some(a) = out.pop() {
                if let Action::SendUdp { bytes, .. } = a {
                    out.recycle(bytes);
                }
            }
        })
    });

    // Encrypt outside the timed part, then time the buyer consuming the messages.
    let addr0 = nw.sellers[0].1;
    g.bench_function("buyer: decrypt + switch to tap 1414 B", |b| {
        b.iter_custom(|iters| {
            // In chunks, so the pre-encrypted messages stay in cache.
            let mut total = std::time::Duration::ZERO;
            let mut left = iters;
            let mut msgs = Vec::with_capacity(256);
            while left > 0 {
                let n = left.min(256);
                left -= n;
                let now = Instant::now();
                msgs.clear();
                for _ in 0..n {
                    nw.sellers[0].0.handle_guest_frame(&f, now, &mut out);
                    msgs.extend(sends(&mut out).into_iter().map(|(_, d)| d));
                }
                assert_eq!(msgs.len() as u64, n, "every frame passed the filter");
                let t = Instant::now();
                for m in &msgs {
                    nw.buyer.handle_udp(addr0, m, now, &mut out);
                    while let Some(a) = out.pop() {
                        if let Action::WriteTap(t) = a {
                            out.recycle(t);
                        }
                    }
                }
                total += t.elapsed();
            }
            total
        })
    });

    let host = frame(BUYER_MAC, mac(1), BUYER_IP);
    g.bench_function("buyer: tap frame -> encrypt to guest 1414 B", |b| {
        b.iter(|| {
            nw.buyer.handle_tap_frame(&host, Instant::now(), &mut out);
            while let Some(a) = out.pop() {
                if let Action::SendUdp { bytes, .. } = a {
                    out.recycle(bytes);
                }
            }
        })
    });
    let _ = nw.buyer_addr;
    g.finish();

    // Responder work per handshake initiation: bounds the CPU a flood can take
    // (global cap per second x this).
    let mut g = c.benchmark_group("overlay-handshake");
    let bid = Identity::generate();
    let sid = Identity::generate();
    let buyer_addr: SocketAddr = "192.0.2.1:5555".parse().unwrap();
    let lease = GuestLease::new(mac(0), Ipv4Addr::new(10, 77, 1, 10), BUYER_MAC, BUYER_IP);
    let limits = overlay::HandshakeLimits {
        per_source_per_sec: u32::MAX,
        per_source_burst: u32::MAX,
        global_per_sec: u32::MAX,
        global_burst: u32::MAX,
        ..Default::default()
    };
    let mut cfg = BuyerConfig::new(BUYER_MAC);
    cfg.handshake_limits = limits;
    let mut buyer = BuyerCore::new(bid.clone(), cfg).unwrap();
    buyer
        .admit(sid.public_key(), mac(0), Ipv4Addr::new(10, 77, 1, 10))
        .unwrap();
    let mut seller = SellerCore::new(
        sid,
        SellerConfig::new(bid.public_key(), buyer_addr, lease, SystemTime::now()),
    )
    .unwrap();
    let from = SocketAddr::from(([198, 51, 100, 1], 40000));
    let mut clock = Instant::now();
    g.bench_function("buyer: answer a valid initiation", |b| {
        b.iter_custom(|iters| {
            let mut total = std::time::Duration::ZERO;
            for _ in 0..iters {
                // A fresh initiation each time: the seller's retry timer fires.
                clock += std::time::Duration::from_secs(6);
                let mut s2 = Actions::new();
                seller.tick(clock, &mut s2);
                let init = sends(&mut s2).pop().unwrap().1;
                let t = Instant::now();
                buyer.handle_udp(from, &init, Instant::now(), &mut out);
                total += t.elapsed();
                let _ = out.drain().count();
            }
            total
        })
    });
    let junk = {
        let mut j = vec![0x5a; overlay::wire::HANDSHAKE_INIT_LEN];
        j[..4].copy_from_slice(&[1, 0, 0, 0]);
        j
    };
    g.bench_function("buyer: reject an initiation without mac1", |b| {
        b.iter(|| {
            buyer.handle_udp(from, &junk, Instant::now(), &mut out);
            let _ = out.drain().count();
        })
    });
    // A stranger who knows the buyer's public key: valid mac1, full Noise work,
    // refused as not admitted (the most a rejected initiation can cost).
    let stranger = {
        let lease = GuestLease::new(mac(9), Ipv4Addr::new(10, 77, 1, 99), BUYER_MAC, BUYER_IP);
        let mut s = SellerCore::new(
            Identity::generate(),
            SellerConfig::new(bid.public_key(), buyer_addr, lease, SystemTime::now()),
        )
        .unwrap();
        let mut o = Actions::new();
        s.tick(Instant::now(), &mut o);
        sends(&mut o).pop().unwrap().1
    };
    g.bench_function("buyer: reject a stranger's initiation (valid mac1)", |b| {
        b.iter(|| {
            buyer.handle_udp(from, &stranger, Instant::now(), &mut out);
            let _ = out.drain().count();
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
