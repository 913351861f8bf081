//! Replay: capture real overlay UDP traffic from a seller to the buyer, send it all
//! to the buyer again, and check that no guest frame reaches the buyer's tap twice.
//! Needs root.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use cpushare_tests::netns::{veth, Netns};
use cpushare_tests::overlay::*;
use overlay::{DropReason, Identity, MacAddr};

const NAMES: &[&str] = &["covrb", "covrs", "covrl", "covrg"];
const MARK: &[u8] = b"cpushare-replay-";

/// Sequence number of a marked UDP probe in a frame seen on the buyer's tap.
fn marker(f: &Captured) -> Option<u32> {
    let b = &f.bytes;
    let i = b.windows(MARK.len()).position(|w| w == MARK)?;
    let s = b.get(i + MARK.len()..i + MARK.len() + 4)?;
    Some(u32::from_be_bytes(s.try_into().ok()?))
}

#[test]
fn replayed_capture_delivers_nothing_twice() {
    if !cpushare_tests::require_root("network namespaces") {
        return;
    }
    scrub(NAMES);
    let b = Netns::new("covrb").unwrap();
    let s = Netns::new("covrs").unwrap();
    for ns in [&b, &s] {
        ns.sysctl("net.ipv6.conf.all.disable_ipv6=1").unwrap();
    }
    let (b_ip, s_ip) = (Ipv4Addr::new(10, 202, 5, 1), Ipv4Addr::new(10, 202, 5, 2));
    veth(&b, "covrbu", "10.202.5.1/24", &s, "covrsu", "10.202.5.2/24").unwrap();
    let (buyer, bid) = start_buyer(
        "covrb",
        SocketAddr::from(([0, 0, 0, 0], BUYER_PORT)),
        "covrtap",
    )
    .unwrap();
    let gmac: MacAddr = "52:54:00:77:05:21".parse().unwrap();
    let gip = Ipv4Addr::new(10, 77, 0, 21);
    let sid = Identity::generate();
    buyer.admit(sid.public_key(), gmac, gip).unwrap();

    let cap_wire = Capture::start_with("covrb", "covrbu", 65600).unwrap();
    let cap_tap = Capture::start("covrb", "covrtap").unwrap();
    let h = start_seller(
        s,
        s_ip,
        "covrsu",
        "covrg",
        "covrl",
        "covr",
        bid.public_key(),
        SocketAddr::from((b_ip, BUYER_PORT)),
        gmac,
        gip,
        sid,
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || h.seller.is_established()),
        "no session"
    );
    h.guest
        .ip(&["addr", "add", "10.77.0.21/16", "dev", &h.guest_if])
        .unwrap();
    h.guest
        .ip(&["link", "set", &h.guest_if, "mtu", "1400"])
        .unwrap();
    assert!(ping(&h.guest, BUYER_IP, 2), "guest cannot reach the buyer");

    // Marked probes: each must show up on the buyer's tap exactly once.
    let probes = 200u32;
    let frames: Vec<Vec<u8>> = (0..probes)
        .map(|i| {
            let mut p = MARK.to_vec();
            p.extend_from_slice(&i.to_be_bytes());
            p.resize(64 + (i as usize % 7) * 150, 0x5a);
            eth(
                BUYER_MAC,
                gmac,
                0x0800,
                &ipv4(gip, BUYER_IP, 17, &udp(40000, 9, &p)),
            )
        })
        .collect();
    inject("covrg", &h.guest_if, frames).unwrap();
    // Some TCP too, so the capture holds a realistic mix (handshake, keepalives, data).
    tcp_both_ways("covrb", BUYER_IP, 5101, "covrg", 256 << 10, 64 << 10).unwrap();
    let count = |fs: &[Captured]| {
        let mut m: HashMap<u32, usize> = HashMap::new();
        for f in fs.iter().filter(|f| !f.outgoing) {
            if let Some(k) = marker(f) {
                *m.entry(k).or_default() += 1;
            }
        }
        m
    };
    assert!(
        wait_until(Duration::from_secs(5), || count(&cap_tap.frames()).len()
            == probes as usize),
        "only {} of {probes} probes reached the buyer",
        count(&cap_tap.frames()).len()
    );
    // Every probe crossed the wire before the buyer put it on its tap, so the wire
    // capture's socket holds them all; finish() reads what is still queued there.
    let wire: Vec<Vec<u8>> = cap_wire
        .finish()
        .iter()
        .filter(|f| !f.outgoing)
        .flat_map(|f| udp_payloads_to(f, BUYER_PORT))
        .collect();
    let data_msgs = wire
        .iter()
        .filter(|d| d.first() == Some(&overlay::wire::TYPE_DATA))
        .count() as u64;
    let inits = wire
        .iter()
        .filter(|d| d.first() == Some(&overlay::wire::TYPE_HANDSHAKE_INIT))
        .count();
    assert!(
        data_msgs > probes as u64,
        "captured only {data_msgs} data messages"
    );
    assert!(inits >= 1, "capture missed the handshake");

    // Replay everything, twice, from the seller host (same IP, another port) and from
    // the original port's neighbour; nothing may come out on the tap again.
    let before = buyer.stats().total_drops();
    let before_tap = count(&cap_tap.frames());
    let sent = in_ns("covrs", move || {
        let sock = UdpSocket::bind((s_ip, 0))?;
        let mut n = 0u64;
        for _ in 0..2 {
            for d in &wire {
                sock.send_to(d, (b_ip, BUYER_PORT))?;
                n += 1;
                if n.is_multiple_of(64) {
                    // Pacing, not synchronisation: a datagram lost to a full socket
                    // buffer would never be counted as a replay.
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
        Ok(n)
    })
    .unwrap();
    assert!(sent > 0);
    // Every replayed data message ends as a replay drop (or, wrongly, on the tap).
    let replays_now =
        || buyer.stats().total_drops().get(DropReason::Replay) - before.get(DropReason::Replay);
    wait_until(Duration::from_secs(10), || replays_now() >= 2 * data_msgs);
    let after = buyer.stats().total_drops();
    let replays = after.get(DropReason::Replay) - before.get(DropReason::Replay);
    assert_eq!(
        replays,
        2 * data_msgs,
        "every replayed data message is refused as a replay"
    );
    let tap_after = count(&cap_tap.finish());
    assert_eq!(
        tap_after, before_tap,
        "a replayed frame reached the buyer's tap"
    );
    assert!(
        tap_after.values().all(|&n| n == 1),
        "some probe was delivered twice"
    );
    // The honest session survived the replays.
    assert!(ping(&h.guest, BUYER_IP, 2), "session broken by replays");
    eprintln!(
        "replayed {sent} datagrams ({data_msgs} data x2, {inits} initiations x2); buyer drops {:?}",
        after.to_map()
    );
    drop(h);
    drop(buyer);
}
