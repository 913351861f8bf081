//! Multi-host overlay test in network namespaces: a buyer host and two seller hosts on
//! a bridged underlay; each seller's "guest" is a namespace plugged into the seller's
//! lease namespace through a veth pair. Guests get their leases over DHCP, ping the
//! buyer and each other, move data over TCP both ways, and then one guest runs an
//! attack battery. Captures prove nothing but overlay UDP leaves the seller. A second
//! test gives two guests IPv6 leases and runs the IPv6 attacks.
//! Needs root, busybox-static (udhcpc) and iputils-ping.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use cpushare_tests::netns::Netns;
use cpushare_tests::overlay::*;
use overlay::{Admission, DropReason, Identity, MacAddr};

const NAMES: &[&str] = &[
    "covwan", "covbuy", "covs1", "covs2", "covlan", "covinet", "covl1", "covl2", "covg1", "covg2",
];

/// What an attack is called, the drop reasons it must hit, how many, and its frames.
type Attack = (
    &'static str,
    Vec<DropReason>,
    u64,
    Box<dyn Fn() -> Vec<Vec<u8>>>,
);

fn quiet_v6(ns: &Netns) {
    let _ = ns.sysctl("net.ipv6.conf.all.disable_ipv6=1");
    let _ = ns.sysctl("net.ipv6.conf.default.disable_ipv6=1");
}

fn ipv4_src(f: &[u8]) -> Option<Ipv4Addr> {
    (f.len() >= 34 && f[12..14] == [8, 0]).then(|| Ipv4Addr::new(f[26], f[27], f[28], f[29]))
}

#[test]
fn overlay_netns_end_to_end_and_attacks() {
    if !cpushare_tests::require_root("network namespaces") {
        return;
    }
    scrub(NAMES);
    let wan = Netns::new("covwan").unwrap();
    let buy = Netns::new("covbuy").unwrap();
    let s1 = Netns::new("covs1").unwrap();
    let s2 = Netns::new("covs2").unwrap();
    let lan = Netns::new("covlan").unwrap();
    let inet = Netns::new("covinet").unwrap();
    for ns in [&wan, &buy, &s1, &s2, &lan, &inet] {
        quiet_v6(ns);
    }
    let (b_ip, s1_ip, s2_ip, inet_ip) = (
        Ipv4Addr::new(10, 202, 1, 1),
        Ipv4Addr::new(10, 202, 1, 2),
        Ipv4Addr::new(10, 202, 1, 3),
        Ipv4Addr::new(10, 202, 1, 99),
    );
    let lan_ip = Ipv4Addr::new(10, 202, 2, 2);
    underlay(
        &wan,
        &[
            (&buy, "covbu", b_ip),
            (&s1, "covs1u", s1_ip),
            (&s2, "covs2u", s2_ip),
            (&inet, "covinu", inet_ip),
        ],
        "covw",
    )
    .unwrap();
    // Seller 1 is also a home router with a LAN host behind it.
    cpushare_tests::netns::veth(
        &s1,
        "covs1n",
        "10.202.2.1/24",
        &lan,
        "covlann",
        "10.202.2.2/24",
    )
    .unwrap();
    s1.sysctl("net.ipv4.ip_forward=1").unwrap();

    let buyer_addr = SocketAddr::from((b_ip, BUYER_PORT));
    let (buyer, buyer_id) = start_buyer(
        "covbuy",
        SocketAddr::from(([0, 0, 0, 0], BUYER_PORT)),
        "covbtap",
    )
    .unwrap();
    let g1_mac: MacAddr = "52:54:00:77:00:11".parse().unwrap();
    let g2_mac: MacAddr = "52:54:00:77:00:12".parse().unwrap();
    let g1_ip = Ipv4Addr::new(10, 77, 0, 11);
    let g2_ip = Ipv4Addr::new(10, 77, 0, 12);
    let (id1, id2) = (Identity::generate(), Identity::generate());
    buyer.admit(id1.public_key(), g1_mac, g1_ip).unwrap();
    buyer.admit(id2.public_key(), g2_mac, g2_ip).unwrap();
    // Address conflicts are refused with a clear error.
    let e = buyer
        .admit(id2.public_key(), g1_mac, Ipv4Addr::new(10, 77, 0, 13))
        .unwrap_err();
    assert!(e.to_string().contains("conflict"), "{e}");

    // Captures: everything on seller 1's uplink and LAN, on the LAN and internet hosts,
    // and on the buyer's tap.
    let cap_up = Capture::start("covs1", "covs1u").unwrap();
    let cap_lan_if = Capture::start("covs1", "covs1n").unwrap();
    let cap_lan = Capture::start("covlan", "covlann").unwrap();
    let cap_inet = Capture::start("covinet", "covinu").unwrap();
    let cap_tap = Capture::start("covbuy", "covbtap").unwrap();

    let pk = buyer_id.public_key();
    let h1 = start_seller(
        s1, s1_ip, "covs1u", "covg1", "covl1", "cov1", pk, buyer_addr, g1_mac, g1_ip, id1,
    )
    .unwrap();
    let h2 = start_seller(
        s2, s2_ip, "covs2u", "covg2", "covl2", "cov2", pk, buyer_addr, g2_mac, g2_ip, id2,
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || h1.seller.is_established()
            && h2.seller.is_established()),
        "sessions never came up: {:?} / {:?}",
        h1.seller.stats(),
        h2.seller.stats()
    );

    // DHCP: each guest gets the address and MTU its lease fixes.
    for h in [&h1, &h2] {
        let (ip, mtu) = dhcp(&h.guest, &h.guest_if).unwrap();
        assert_eq!(ip, h.guest_ip, "DHCP gave the lease's address");
        assert!(
            (1280..=1400).contains(&mtu),
            "DHCP MTU fits a 1500-byte path: {mtu}"
        );
    }

    // Reachability: guest -> buyer, guest <-> guest through the buyer's switch.
    assert!(
        ping(&h1.guest, BUYER_IP, 3),
        "guest 1 cannot ping the buyer"
    );
    assert!(
        ping(&h2.guest, BUYER_IP, 3),
        "guest 2 cannot ping the buyer"
    );
    assert!(ping(&h1.guest, g2_ip, 3), "guest 1 cannot ping guest 2");
    assert!(ping(&h2.guest, g1_ip, 3), "guest 2 cannot ping guest 1");

    // A few MB over TCP both ways (guest 1 uses TSO bursts the guest port must cut).
    tcp_both_ways("covbuy", BUYER_IP, 5001, "covg1", 4 << 20, 4 << 20).unwrap();
    tcp_both_ways("covbuy", BUYER_IP, 5002, "covg2", 2 << 20, 2 << 20).unwrap();
    tcp_both_ways("covg2", g2_ip, 5003, "covg1", 1 << 20, 1 << 20).unwrap();

    // ---------------------------------------------------------------- attack battery
    let g = g1_mac;
    let gw = BUYER_MAC;
    let forged_mac: MacAddr = "52:54:00:66:66:66".parse().unwrap();
    let s1_mac = mac_of(&h1.host, "covs1u").unwrap();
    let lan_mac = mac_of(&lan, "covlann").unwrap();
    let inet_mac = mac_of(&inet, "covinu").unwrap();
    let echo = |src: Ipv4Addr, dst: Ipv4Addr, seq: u16| {
        ipv4(src, dst, 1, &icmp_echo(0x4242, seq, b"cpushare attack"))
    };
    let inject_g1 = |frames: Vec<Vec<u8>>| inject("covg1", &h1.guest_if, frames).unwrap();
    let drops = || h1.seller.stats().drops;
    let n = 5usize;

    let mut expect: Vec<Attack> = Vec::new();
    expect.push((
        "forged source MAC",
        vec![DropReason::SourceMac],
        n as u64,
        Box::new(move || {
            (0..n)
                .map(|i| eth(gw, forged_mac, 0x0800, &echo(g1_ip, BUYER_IP, i as u16)))
                .collect()
        }),
    ));
    expect.push((
        "forged source IP",
        vec![DropReason::Ipv4Source],
        n as u64,
        Box::new(move || {
            (0..n)
                .map(|i| {
                    eth(
                        gw,
                        g,
                        0x0800,
                        &echo(Ipv4Addr::new(10, 77, 0, 99), BUYER_IP, i as u16),
                    )
                })
                .collect()
        }),
    ));
    expect.push((
        "ARP spoofing (claims the buyer's IP)",
        vec![DropReason::ArpSpoof],
        n as u64,
        Box::new(move || {
            (0..n)
                .map(|_| {
                    eth(
                        MacAddr::BROADCAST,
                        g,
                        0x0806,
                        &arp(2, g, BUYER_IP, MacAddr::BROADCAST, BUYER_IP),
                    )
                })
                .collect()
        }),
    ));
    expect.push((
        "ARP spoofing (forged sender MAC)",
        vec![DropReason::ArpSpoof],
        n as u64,
        Box::new(move || {
            (0..n)
                .map(|_| eth(gw, g, 0x0806, &arp(2, forged_mac, g1_ip, gw, BUYER_IP)))
                .collect()
        }),
    ));
    expect.push((
        "rogue DHCP server",
        vec![DropReason::DhcpServerReply],
        n as u64,
        Box::new(move || {
            (0..n)
                .map(|_| {
                    eth(
                        MacAddr::BROADCAST,
                        g,
                        0x0800,
                        &ipv4(
                            g1_ip,
                            Ipv4Addr::BROADCAST,
                            17,
                            &udp(67, 68, &dhcp_offer(g1_ip, g2_ip, g2_mac)),
                        ),
                    )
                })
                .collect()
        }),
    ));
    expect.push((
        "VLAN-tagged frames",
        vec![DropReason::VlanTagged],
        n as u64,
        Box::new(move || {
            (0..n)
                .map(|i| vlan_tag(&eth(gw, g, 0x0800, &echo(g1_ip, BUYER_IP, i as u16)), 7))
                .collect()
        }),
    ));
    expect.push((
        "IPv6 router advertisements",
        vec![DropReason::EtherType, DropReason::RouterAdvertisement],
        n as u64,
        Box::new(move || (0..n).map(|_| ipv6_ra(g)).collect()),
    ));
    expect.push((
        "oversized frames",
        vec![DropReason::Oversize],
        n as u64,
        Box::new(move || {
            (0..n)
                .map(|_| {
                    eth(
                        gw,
                        g,
                        0x0800,
                        &ipv4(g1_ip, BUYER_IP, 17, &udp(9, 9, &vec![0xab; 3000])),
                    )
                })
                .collect()
        }),
    ));

    // Oversized frames need the guest's own MTU raised for the kernel to send them.
    h1.guest
        .ip(&["link", "set", &h1.guest_if, "mtu", "9000"])
        .unwrap();
    for (what, reasons, want, frames) in &expect {
        let before = drops();
        let sent = inject_g1(frames());
        assert_eq!(sent as u64, *want);
        let counted = || {
            let d = drops();
            reasons
                .iter()
                .map(|r| d.get(*r) - before.get(*r))
                .sum::<u64>()
        };
        assert!(
            wait_until(Duration::from_secs(3), || counted() >= *want),
            "{what}: counted {} of {want} drops",
            counted()
        );
        // Not a synchronisation: the window in which a frame counted twice would
        // show up (an absence has no event to wait for).
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            counted(),
            *want,
            "{what}: every frame dropped once, for the right reason"
        );
    }
    h1.guest
        .ip(&["link", "set", &h1.guest_if, "mtu", "1400"])
        .unwrap();

    // Broadcast storm: legitimate-looking ARP requests, far over the broadcast rate.
    let before = drops();
    let storm = 3000usize;
    let t0 = Instant::now();
    inject_g1(
        (0..storm)
            .map(|i| {
                eth(
                    MacAddr::BROADCAST,
                    g,
                    0x0806,
                    &arp(
                        1,
                        g,
                        g1_ip,
                        MacAddr([0; 6]),
                        Ipv4Addr::new(10, 77, 1, (i % 250) as u8),
                    ),
                )
            })
            .collect(),
    );
    let secs = t0.elapsed().as_secs_f64();
    let rl = overlay::RateLimits::default();
    let max_pass = rl.broadcast_burst as f64 + rl.broadcast_per_sec as f64 * (secs + 3.0);
    let storm_drops =
        || drops().get(DropReason::BroadcastRate) - before.get(DropReason::BroadcastRate);
    assert!(
        wait_until(Duration::from_secs(3), || storm_drops() as f64
            >= storm as f64 - max_pass),
        "broadcast storm: only {} of {storm} dropped",
        storm_drops()
    );

    // Legitimately sourced packets aimed at the seller, its LAN and the internet: the
    // filter lets them into the session (they are the guest's own), but they can only
    // ever reach the buyer. Both L2-addressed and routed through the gateway.
    let targets = [(s1_mac, s1_ip), (lan_mac, lan_ip), (inet_mac, inet_ip)];
    let mut frames = Vec::new();
    for (i, (mac, ip)) in targets.iter().enumerate() {
        frames.push(eth(*mac, g, 0x0800, &echo(g1_ip, *ip, 100 + i as u16)));
        frames.push(eth(gw, g, 0x0800, &echo(g1_ip, *ip, 200 + i as u16)));
        frames.push(eth(
            *mac,
            g,
            0x0800,
            &ipv4(g1_ip, *ip, 17, &udp(4000, 53, b"x")),
        ));
    }
    inject_g1(frames);
    for (_, ip) in targets {
        assert!(
            !ping(&h1.guest, ip, 1),
            "guest reached {ip} outside the overlay"
        );
    }
    // Each failed ping waited 2 s for a reply, so the seller handled every injected
    // frame long ago; finish() reads what is still queued on the capture sockets.

    // ---------------------------------------------------------------- verdicts
    let up = cap_up.finish();
    assert!(
        !up.is_empty(),
        "uplink capture saw nothing (capture broken?)"
    );
    let local_port = h1.seller.local_addr().port();
    let mut sent_udp = 0;
    for f in &up {
        let b = &f.bytes;
        assert!(
            b[6..12] != g.0 && b[0..6] != g.0,
            "guest MAC on the seller uplink"
        );
        if let Some(src) = ipv4_src(b) {
            assert!(
                !(src.octets()[0] == 10 && src.octets()[1] == 77),
                "overlay address {src} on the seller uplink"
            );
        }
        // Incoming frames are other hosts' business (e.g. their ARP broadcasts);
        // everything the seller sends must be the session or ARP for it.
        if !f.outgoing {
            continue;
        }
        let et = u16::from_be_bytes([b[12], b[13]]);
        if et == 0x0806 {
            let (spa, tpa) = (
                Ipv4Addr::new(b[28], b[29], b[30], b[31]),
                Ipv4Addr::new(b[38], b[39], b[40], b[41]),
            );
            assert!(
                spa == s1_ip && tpa == b_ip,
                "seller sent ARP other than for the buyer: {spa} -> {tpa}"
            );
            continue;
        }
        assert!(
            et == 0x0800 && !f.vlan && b[23] == 17,
            "seller sent a non-UDP frame: {:02x?}",
            &b[..b.len().min(48)]
        );
        let ihl = (b[14] & 15) as usize * 4;
        let (src, dst) = (
            Ipv4Addr::new(b[26], b[27], b[28], b[29]),
            Ipv4Addr::new(b[30], b[31], b[32], b[33]),
        );
        let sport = u16::from_be_bytes([b[14 + ihl], b[15 + ihl]]);
        let dport = u16::from_be_bytes([b[16 + ihl], b[17 + ihl]]);
        assert!(
            src == s1_ip && sport == local_port && dst == b_ip && dport == BUYER_PORT,
            "seller sent UDP other than to the buyer's endpoint: {src}:{sport} -> {dst}:{dport}"
        );
        sent_udp += f.wire_frames();
    }
    assert!(
        sent_udp > 1000,
        "uplink capture saw only {sent_udp} session datagrams"
    );
    for (name, cap) in [
        ("seller LAN interface", cap_lan_if),
        ("LAN host", cap_lan),
        ("internet host", cap_inet),
    ] {
        for f in cap.finish() {
            let b = &f.bytes;
            assert!(
                b[6..12] != g.0 && b[0..6] != g.0,
                "{name} saw a frame from/to the guest MAC"
            );
            if let Some(src) = ipv4_src(b) {
                assert!(
                    !(src.octets()[0] == 10 && src.octets()[1] == 77),
                    "{name} saw overlay address {src}"
                );
            }
        }
    }
    let admitted = [g1_mac, g2_mac];
    let tap = cap_tap.finish();
    assert!(
        tap.iter().any(|f| !f.outgoing),
        "tap capture saw no guest frames"
    );
    for f in tap.iter().filter(|f| !f.outgoing) {
        let b = &f.bytes;
        let src = MacAddr::from_slice(&b[6..12]).unwrap();
        assert!(
            admitted.contains(&src),
            "buyer tap got a frame from unknown MAC {src}"
        );
        assert!(!f.vlan, "buyer tap got a VLAN-tagged frame");
        // Merged TCP bursts (GSO) are fine; each of their segments fits the MTU.
        assert!(
            f.len <= 1400 + 14 || (f.gso_type == 1 && f.gso_size <= 1400 - 40),
            "buyer tap got a {}-byte frame",
            f.len
        );
        let et = u16::from_be_bytes([b[12], b[13]]);
        assert!(
            et == 0x0800 || et == 0x0806,
            "buyer tap got EtherType {et:#06x}"
        );
        let ip_of = |m: MacAddr| if m == g1_mac { g1_ip } else { g2_ip };
        if et == 0x0800 {
            let s = ipv4_src(b).unwrap();
            assert!(
                s == ip_of(src) || s == Ipv4Addr::UNSPECIFIED,
                "buyer tap got IPv4 source {s} from {src}"
            );
            let ihl = (b[14] & 15) as usize * 4;
            if b[23] == 17 {
                let sport = u16::from_be_bytes([b[14 + ihl], b[15 + ihl]]);
                assert_ne!(sport, 67, "buyer tap got a DHCP server reply from a guest");
            }
        } else {
            assert_eq!(&b[22..28], &src.0, "ARP sender MAC");
            assert_eq!(
                Ipv4Addr::new(b[28], b[29], b[30], b[31]),
                ip_of(src),
                "ARP sender IP"
            );
        }
    }
    // The buyer saw no session-level trouble from honest sellers.
    let bs = buyer.stats();
    for r in [
        DropReason::Decrypt,
        DropReason::Replay,
        DropReason::SessionMacMismatch,
    ] {
        assert_eq!(bs.total_drops().get(r), 0, "buyer drops {r:?}");
    }
    eprintln!("seller 1 drops: {:?}", h1.seller.stats().drops.to_map());
    drop(h1);
    drop(h2);
    drop(buyer);
}

const V6_NAMES: &[&str] = &[
    "cov6wan", "cov6buy", "cov6s1", "cov6s2", "cov6l1", "cov6l2", "cov6g1", "cov6g2",
];

/// IPv6 on leases that allow it: two guests with IPv6 (link-local from their MACs, one
/// leased global address each) ping each other through the buyer's switch; then one
/// guest sends forged sources and router advertisements, bare and behind extension
/// headers. The seller drops each, counted by reason, and the other guest never sees
/// one.
#[test]
fn overlay_netns_ipv6_leases() {
    if !cpushare_tests::require_root("network namespaces") {
        return;
    }
    scrub(V6_NAMES);
    let wan = Netns::new("cov6wan").unwrap();
    let buy = Netns::new("cov6buy").unwrap();
    let s1 = Netns::new("cov6s1").unwrap();
    let s2 = Netns::new("cov6s2").unwrap();
    for ns in [&wan, &buy, &s1, &s2] {
        quiet_v6(ns);
    }
    let (b_ip, s1_ip, s2_ip) = (
        Ipv4Addr::new(10, 203, 1, 1),
        Ipv4Addr::new(10, 203, 1, 2),
        Ipv4Addr::new(10, 203, 1, 3),
    );
    underlay(
        &wan,
        &[
            (&buy, "cov6bu", b_ip),
            (&s1, "cov6s1u", s1_ip),
            (&s2, "cov6s2u", s2_ip),
        ],
        "cov6w",
    )
    .unwrap();
    let buyer_addr = SocketAddr::from((b_ip, BUYER_PORT));
    let (buyer, buyer_id) = start_buyer(
        "cov6buy",
        SocketAddr::from(([0, 0, 0, 0], BUYER_PORT)),
        "cov6btap",
    )
    .unwrap();
    let g1_mac: MacAddr = "52:54:00:76:00:11".parse().unwrap();
    let g2_mac: MacAddr = "52:54:00:76:00:12".parse().unwrap();
    let (g1_ip, g2_ip) = (Ipv4Addr::new(10, 77, 0, 21), Ipv4Addr::new(10, 77, 0, 22));
    let g1_v6: Ipv6Addr = "2001:db8:77::21".parse().unwrap();
    let g2_v6: Ipv6Addr = "2001:db8:77::22".parse().unwrap();
    let (id1, id2) = (Identity::generate(), Identity::generate());
    for (id, mac, ip, v6) in [(&id1, g1_mac, g1_ip, g1_v6), (&id2, g2_mac, g2_ip, g2_v6)] {
        buyer
            .admit_guest(Admission {
                allow_ipv6: true,
                guest_ipv6: Some(v6),
                ..Admission::new(id.public_key(), mac, ip)
            })
            .unwrap();
    }
    let pk = buyer_id.public_key();
    let v6_lease = |v6: Ipv6Addr| {
        move |l: &mut overlay::GuestLease| {
            l.allow_ipv6 = true;
            l.guest_ipv6 = Some(v6);
        }
    };
    let h1 = start_seller_with(
        s1,
        s1_ip,
        "cov6s1u",
        "cov6g1",
        "cov6l1",
        "c6v1",
        pk,
        buyer_addr,
        g1_mac,
        g1_ip,
        id1,
        v6_lease(g1_v6),
    )
    .unwrap();
    let h2 = start_seller_with(
        s2,
        s2_ip,
        "cov6s2u",
        "cov6g2",
        "cov6l2",
        "c6v2",
        pk,
        buyer_addr,
        g2_mac,
        g2_ip,
        id2,
        v6_lease(g2_v6),
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || h1.seller.is_established()
            && h2.seller.is_established()),
        "sessions never came up"
    );
    for (h, v6) in [(&h1, g1_v6), (&h2, g2_v6)] {
        h.guest
            .ip(&[
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                &h.guest_if,
                "nodad",
            ])
            .unwrap();
    }
    let cap_g2 = Capture::start("cov6g2", &h2.guest_if).unwrap();

    // Honest IPv6: link-local (neighbour discovery over the switch) and leased global.
    let g2_ll = g2_mac.ipv6_link_local();
    assert!(
        ping6(&h1.guest, &format!("{g2_ll}%{}", h1.guest_if), 3),
        "guest 1 cannot ping guest 2's link-local address"
    );
    assert!(
        ping6(&h1.guest, &g2_v6.to_string(), 3),
        "guest 1 cannot ping guest 2's leased address"
    );
    assert!(
        ping6(&h2.guest, &g1_v6.to_string(), 3),
        "guest 2 cannot ping guest 1's leased address"
    );

    // Attacks from guest 1, each to all nodes (guest 2 would see any that passed).
    let g1_ll = g1_mac.ipv6_link_local();
    let forged: Ipv6Addr = "2001:db8:77::99".parse().unwrap();
    let to_all = |src: Ipv6Addr, exts: &[u8], upper: u8, payload: &[u8]| {
        eth(
            ALL_NODES_MAC,
            g1_mac,
            0x86dd,
            &ipv6(src, ALL_NODES, exts, upper, payload),
        )
    };
    let mut unknown_hbh = to_all(g1_ll, &[0], 58, &icmp6(128));
    unknown_hbh[14 + 40 + 2] = 0x3e; // an option type a router skips: not allowed
    let attacks: Vec<(&str, DropReason, Vec<u8>)> = vec![
        (
            "forged source",
            DropReason::Ipv6Source,
            to_all(forged, &[], 58, &icmp6(128)),
        ),
        (
            "guest 2's address",
            DropReason::Ipv6Source,
            to_all(g2_v6, &[], 58, &icmp6(128)),
        ),
        (
            "guest 2's link-local",
            DropReason::Ipv6Source,
            to_all(g2_ll, &[], 17, &udp(1, 2, b"x")),
        ),
        (
            "router advertisement",
            DropReason::RouterAdvertisement,
            ipv6_ra(g1_mac),
        ),
        (
            "RA behind hop-by-hop and fragment",
            DropReason::RouterAdvertisement,
            to_all(g1_ll, &[0, 44], 58, &icmp6(134)),
        ),
        (
            "RA behind destination options",
            DropReason::Ipv6ExtensionHeader,
            to_all(g1_ll, &[60], 58, &icmp6(134)),
        ),
        (
            "RA behind a routing header",
            DropReason::Ipv6ExtensionHeader,
            to_all(g1_ll, &[43], 58, &icmp6(134)),
        ),
        (
            "RA behind two fragment headers",
            DropReason::Ipv6ExtensionHeader,
            to_all(g1_ll, &[44, 44], 58, &icmp6(134)),
        ),
        (
            "unknown hop-by-hop option",
            DropReason::Ipv6ExtensionHeader,
            unknown_hbh,
        ),
        (
            "redirect",
            DropReason::Icmpv6Redirect,
            to_all(g1_ll, &[], 58, &icmp6(137)),
        ),
        (
            "SCTP",
            DropReason::Ipv6NextHeader,
            to_all(g1_v6, &[], 132, &[0; 12]),
        ),
    ];
    let drops = || h1.seller.stats().drops;
    let n = 4u64;
    for (what, reason, frame) in &attacks {
        let before = drops().get(*reason);
        let sent = inject("cov6g1", &h1.guest_if, vec![frame.clone(); n as usize]).unwrap();
        assert_eq!(sent as u64, n);
        let counted = || drops().get(*reason) - before;
        assert!(
            wait_until(Duration::from_secs(3), || counted() >= n),
            "{what}: counted {} of {n} {reason:?} drops",
            counted()
        );
    }
    // One more honest round trip after the attacks: it is behind every attack frame
    // on the same path, so guest 2's capture has seen all that got through.
    assert!(
        ping6(&h1.guest, &g2_v6.to_string(), 1),
        "IPv6 stopped working"
    );
    for f in cap_g2.finish().iter().filter(|f| !f.outgoing) {
        let b = &f.bytes;
        if b.len() < 54 || b[12..14] != [0x86, 0xdd] || b[6..12] != g1_mac.0 {
            continue;
        }
        let src = Ipv6Addr::from(<[u8; 16]>::try_from(&b[22..38]).unwrap());
        assert!(
            src == g1_ll || src == g1_v6 || src.is_unspecified(),
            "guest 2 got IPv6 from guest 1 with source {src}"
        );
        assert!(
            !matches!(b[20], 43 | 60 | 132),
            "guest 2 got next header {} from guest 1",
            b[20]
        );
        assert!(
            !(b[20] == 58 && matches!(b.get(54), Some(134 | 137))),
            "guest 2 got a router advertisement or redirect"
        );
    }
    // The seller caught everything: the buyer's own IPv6 check never fired.
    let bs = buyer.stats().total_drops();
    for r in [
        DropReason::Ipv6Source,
        DropReason::Ipv6ExtensionHeader,
        DropReason::RouterAdvertisement,
        DropReason::EtherType,
    ] {
        assert_eq!(bs.get(r), 0, "buyer drops {r:?}");
    }
    eprintln!("seller 1 drops: {:?}", h1.seller.stats().drops.to_map());
    drop(h1);
    drop(h2);
    drop(buyer);
}
