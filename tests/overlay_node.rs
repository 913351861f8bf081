//! The overlay through `cpushare-node` itself: a buyer daemon and a seller daemon in
//! their own network namespaces, wired with `overlay admit` / `overlay attach`; the
//! guest (a namespace) gets DHCP, pings the buyer, and forged frames show up as drop
//! counters in `cpushare-node status`. Also the CLI's errors and `attach --tap`.
//! Needs root and busybox-static.

use std::net::Ipv4Addr;
use std::time::Duration;

use cpushare_tests::netns::{ip, veth, Netns};
use cpushare_tests::node::NodeProc;
use cpushare_tests::overlay::*;
use overlay::MacAddr;

const NAMES: &[&str] = &["covnb", "covns", "covng", "covnl", "covnt"];

fn public_key(n: &NodeProc) -> String {
    let out = n.cli_ok(&["id"]).unwrap();
    out.lines()
        .find_map(|l| l.strip_prefix("public key: "))
        .expect("public key line")
        .trim()
        .to_string()
}

#[test]
fn overlay_through_the_node_cli() {
    if !cpushare_tests::require_root("network namespaces") {
        return;
    }
    scrub(NAMES);
    let nb = Netns::new("covnb").unwrap();
    let ns = Netns::new("covns").unwrap();
    veth(
        &nb,
        "covnbu",
        "10.202.6.1/24",
        &ns,
        "covnsu",
        "10.202.6.2/24",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p2p = ["--listen", "/ip4/127.0.0.1/tcp/0"];
    let buyer = NodeProc::spawn(
        &["ip", "netns", "exec", "covnb"],
        &dir.path().join("b"),
        "buyer",
        &p2p,
    )
    .unwrap();
    let seller = NodeProc::spawn(
        &["ip", "netns", "exec", "covns"],
        &dir.path().join("s"),
        "seller",
        &p2p,
    )
    .unwrap();
    let (bkey, skey) = (public_key(&buyer), public_key(&seller));
    let mac = "52:54:00:77:06:31";
    let gip = Ipv4Addr::new(10, 77, 0, 31);

    // Bad input: one clear line, non-zero exit, nothing changed.
    let bad = buyer
        .cli(&[
            "overlay",
            "admit",
            "--key",
            "00zz",
            "--mac",
            mac,
            "--ip",
            "10.77.0.31",
        ])
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid ed25519 public key"));
    let wrong = seller
        .cli(&[
            "overlay",
            "admit",
            "--key",
            &skey,
            "--mac",
            mac,
            "--ip",
            "10.77.0.31",
        ])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("needs a buyer daemon"),
        "{wrong:?}"
    );

    buyer
        .cli_ok(&[
            "overlay",
            "admit",
            "--key",
            &skey,
            "--mac",
            mac,
            "--ip",
            "10.77.0.31",
            "--tap",
            "covntap",
            "--listen",
            "0.0.0.0:51906",
        ])
        .unwrap();
    let dup = buyer
        .cli(&[
            "overlay",
            "admit",
            "--key",
            &skey,
            "--mac",
            mac,
            "--ip",
            "10.77.0.32",
        ])
        .unwrap();
    assert!(String::from_utf8_lossy(&dup.stderr).contains("already admitted"));

    // The guest: a namespace behind a veth pair whose other end is in the lease namespace.
    let guest = Netns::new("covng").unwrap();
    guest.sysctl("net.ipv6.conf.all.disable_ipv6=1").unwrap();
    guest
        .sysctl("net.ipv6.conf.default.disable_ipv6=1")
        .unwrap();
    // `attach --iface` takes only a lease namespace the node made.
    seller.cli_ok(&["overlay", "netns-add", "covnl"]).unwrap();
    ip(&[
        "link", "add", "covngv", "netns", "covng", "type", "veth", "peer", "name", "covnlv",
        "netns", "covnl",
    ])
    .unwrap();
    guest
        .ip(&["link", "set", "covngv", "address", mac])
        .unwrap();
    guest.ip(&["link", "set", "covngv", "up"]).unwrap();
    seller
        .cli_ok(&[
            "overlay",
            "attach",
            "--netns",
            "covnl",
            "--iface",
            "covnlv",
            "--buyer",
            "10.202.6.1:51906",
            "--buyer-key",
            &bkey,
            "--mac",
            mac,
            "--ip",
            "10.77.0.31",
        ])
        .unwrap();
    let again = seller
        .cli(&[
            "overlay",
            "attach",
            "--netns",
            "covnl",
            "--iface",
            "covnlv",
            "--buyer",
            "10.202.6.1:51906",
            "--buyer-key",
            &bkey,
            "--mac",
            mac,
            "--ip",
            "10.77.0.31",
        ])
        .unwrap();
    assert!(String::from_utf8_lossy(&again.stderr).contains("already attached"));

    let (got, _) = dhcp(&guest, "covngv").unwrap();
    assert_eq!(got, gip);
    assert!(
        ping(&guest, BUYER_IP, 2),
        "guest cannot ping the buyer through the nodes"
    );

    // Forged frames: counted by reason in `status`.
    let forged: MacAddr = "52:54:00:66:06:66".parse().unwrap();
    let bmac = mac_of(&nb, "covntap").unwrap();
    let frames = (0..7u16)
        .map(|i| {
            eth(
                bmac,
                forged,
                0x0800,
                &ipv4(gip, BUYER_IP, 1, &icmp_echo(7, i, b"forged")),
            )
        })
        .collect();
    inject("covng", "covngv", frames).unwrap();
    let source_mac = || {
        seller.status().unwrap()["overlay"]["guests"][0]["drops"]["source_mac"]
            .as_u64()
            .unwrap_or(0)
    };
    assert!(
        wait_until(Duration::from_secs(5), || source_mac() == 7),
        "status shows {} source_mac drops",
        source_mac()
    );
    let st = buyer.status().unwrap();
    let sw = &st["overlay"]["switch"];
    assert_eq!(sw["guests"][0]["established"], true, "{sw}");
    assert_eq!(sw["guests"][0]["ip"], "10.77.0.31");
    let ls = seller.cli_ok(&["overlay", "ls"]).unwrap();
    assert!(ls.contains(mac) && ls.contains(" up "), "{ls}");

    // `attach --tap`: the seller makes a lease namespace holding a new tap; detach removes both.
    let mac2 = "52:54:00:77:06:32";
    seller
        .cli_ok(&[
            "overlay",
            "attach",
            "--tap",
            "covntap2",
            "--netns",
            "covnt",
            "--buyer",
            "10.202.6.1:51906",
            "--buyer-key",
            &bkey,
            "--mac",
            mac2,
            "--ip",
            "10.77.0.32",
        ])
        .unwrap();
    // The daemon runs under `ip netns exec`, which gives it its own mount namespace:
    // look at the lease namespace from there.
    let pid = seller.pid().expect("seller pid").to_string();
    let in_daemon = |args: &[&str]| {
        std::process::Command::new("nsenter")
            .args(["-t", &pid, "-m", "ip", "-n", "covnt"])
            .args(args)
            .output()
            .unwrap()
    };
    let show = in_daemon(&["-o", "link", "show", "covntap2"]);
    assert!(
        show.status.success(),
        "tap not created in its lease namespace: {show:?}"
    );
    let addrs = in_daemon(&["-o", "addr", "show"]);
    assert!(addrs.status.success());
    let a = String::from_utf8_lossy(&addrs.stdout);
    assert!(!a.contains("inet"), "lease namespace has an address: {a}");
    let routes = in_daemon(&["-4", "route", "show"]);
    assert!(
        String::from_utf8_lossy(&routes.stdout).trim().is_empty(),
        "lease namespace has routes"
    );
    seller
        .cli_ok(&["overlay", "detach", "--mac", mac2])
        .unwrap();
    assert!(
        !std::path::Path::new("/run/netns/covnt").exists(),
        "lease namespace left behind"
    );
    drop(seller);
    drop(buyer);
    // The namespace netns-add made, whether or not the seller removed it on exit.
    let _ = ip(&["netns", "del", "covnl"]);
}
