//! Per-frame cost of the sans-IO core with cold caches (a ping every 50 ms on a busy
//! machine) next to the same steps warm. Even rounds evict the caches (and the TLB)
//! by streaming over 96 MiB, then time one ping's four steps through the real cores;
//! odd rounds repeat them right away.
//! Run: `cargo run --release -p overlay --example cold_path [rounds]`.
//! `--trace` runs three rounds without eviction and prints the address of the step
//! markers (loads of `MARKS`), for a `valgrind --tool=lackey --trace-mem=yes` run
//! that counts the cache lines and pages each step touches.

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use overlay::{
    Action, Actions, BuyerConfig, BuyerCore, GuestLease, Identity, MacAddr, SellerConfig,
    SellerCore,
};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};

const BUYER_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 1]);
const GUEST_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0, 1, 2]);
const BUYER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 2);

fn icmp(src: MacAddr, dst: MacAddr, sip: Ipv4Addr, dip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0u8; 84];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&84u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 1;
    ip[12..16].copy_from_slice(&sip.octets());
    ip[16..20].copy_from_slice(&dip.octets());
    ip[20] = 8;
    f.extend_from_slice(&ip);
    f
}

fn take(out: &mut Actions) -> Vec<u8> {
    let mut got = None;
    while let Some(a) = out.pop() {
        match a {
            Action::SendUdp { bytes, .. }
            | Action::WriteTap(bytes)
            | Action::DeliverToGuest(bytes) => {
                if got.is_none() {
                    got = Some(bytes);
                } else {
                    out.recycle(bytes);
                }
            }
            Action::Event(_) => {}
        }
    }
    got.expect("the step produced a frame")
}

static MARKS: [u64; 8] = [0; 8];
/// A load from a known address: step boundaries in a valgrind lackey trace.
fn mark(i: usize) {
    // SAFETY: reading a static.
    black_box(unsafe { std::ptr::read_volatile(&MARKS[i]) });
}

fn evict(junk: &mut [u8], round: usize) {
    for i in (0..junk.len()).step_by(64) {
        junk[i] = junk[i].wrapping_add(round as u8);
    }
    black_box(&junk);
}

fn main() {
    let arg = std::env::args().nth(1);
    let trace = arg.as_deref() == Some("--trace");
    let rounds: usize = if trace {
        3
    } else {
        arg.and_then(|a| a.parse().ok()).unwrap_or(300)
    };
    let bid = Identity::generate();
    let sid = Identity::generate();
    let baddr: SocketAddr = "192.0.2.1:5555".parse().unwrap();
    let saddr: SocketAddr = "198.51.100.1:40000".parse().unwrap();
    let mut buyer = BuyerCore::new(bid.clone(), BuyerConfig::new(BUYER_MAC)).unwrap();
    buyer.admit(sid.public_key(), GUEST_MAC, GUEST_IP).unwrap();
    let lease = GuestLease::new(GUEST_MAC, GUEST_IP, BUYER_MAC, BUYER_IP);
    let cfg = SellerConfig::new(bid.public_key(), baddr, lease, SystemTime::now());
    let mut seller = SellerCore::new(sid, cfg).unwrap();
    let mut out = Actions::new();
    let now = Instant::now();
    seller.tick(now, &mut out);
    let m = take(&mut out);
    buyer.handle_udp(saddr, &m, now, &mut out);
    let m = take(&mut out);
    seller.handle_udp(baddr, &m, now, &mut out);
    let _ = out.drain().count();

    let req = icmp(GUEST_MAC, BUYER_MAC, GUEST_IP, BUYER_IP);
    let rep = icmp(BUYER_MAC, GUEST_MAC, BUYER_IP, GUEST_IP);
    let aead = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &[7u8; 32]).unwrap());
    let mut junk = vec![1u8; if trace { 4096 } else { 96 << 20 }];
    let names = [
        "seller filter+seal",
        "buyer open+switch",
        "buyer host->seal",
        "seller open+ingress",
        "ring seal 98 B alone",
        "copy 98 B alone",
    ];
    let mut cold_t: Vec<Vec<Duration>> = vec![Vec::new(); names.len()];
    let mut warm_t: Vec<Vec<Duration>> = vec![Vec::new(); names.len()];
    let mut copy = vec![0u8; 2048];
    for r in 0..rounds {
        let cold = r % 2 == 0; // odd rounds: warm, right after a cold one
        if cold {
            evict(&mut junk, r);
        }
        // Warm rounds run the steps once first and time the repeat.
        let (mut t0, mut t1, mut t2, mut t3, mut t4) = (
            Instant::now(),
            Instant::now(),
            Instant::now(),
            Instant::now(),
            Instant::now(),
        );
        for _ in 0..if cold { 1 } else { 2 } {
            let now = Instant::now();
            t0 = Instant::now();
            mark(0);
            seller.handle_guest_frame(&req, now, &mut out);
            let m = take(&mut out);
            mark(1);
            t1 = Instant::now();
            buyer.handle_udp(saddr, &m, now, &mut out);
            let f = take(&mut out);
            mark(2);
            t2 = Instant::now();
            buyer.handle_tap_frame(&rep, now, &mut out);
            let m2 = take(&mut out);
            mark(3);
            t3 = Instant::now();
            seller.handle_udp(baddr, &m2, now, &mut out);
            let g = take(&mut out);
            mark(4);
            t4 = Instant::now();
            out.recycle(m);
            out.recycle(f);
            out.recycle(m2);
            out.recycle(g);
        }
        if cold {
            evict(&mut junk, r);
        }
        let mut b = req.clone();
        let a0 = Instant::now();
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&(r as u64).to_le_bytes());
        let tag = aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(n),
                Aad::from([0u8; 16]),
                &mut b,
            )
            .unwrap();
        black_box(tag.as_ref()[0]);
        let a1 = Instant::now();
        if cold {
            evict(&mut junk, r);
        }
        let c0 = Instant::now();
        copy[..req.len()].copy_from_slice(black_box(&req));
        black_box(&copy);
        let c1 = Instant::now();
        if r > 1 {
            let t = if cold { &mut cold_t } else { &mut warm_t };
            for (i, d) in [t1 - t0, t2 - t1, t3 - t2, t4 - t3, a1 - a0, c1 - c0]
                .into_iter()
                .enumerate()
            {
                t[i].push(d);
            }
        }
    }
    if trace {
        println!("marks at {:p}", MARKS.as_ptr());
        return;
    }
    println!(
        "per step, {} cold / {} warm rounds: median (p90) in µs",
        cold_t[0].len(),
        warm_t[0].len()
    );
    let q = |v: &mut Vec<Duration>, p: f64| {
        v.sort();
        v[((v.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1e6
    };
    for (i, name) in names.iter().enumerate() {
        let (c, w) = (&mut cold_t[i], &mut warm_t[i]);
        println!(
            "  {:<22} cold {:6.2} ({:6.2})   warm {:6.2} ({:6.2})",
            name,
            q(c, 0.5),
            q(c, 0.9),
            q(w, 0.5),
            q(w, 0.9)
        );
    }
}
