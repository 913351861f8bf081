//! mDNS discovery between hosts. Each node runs in its own network namespace with a
//! veth into one Linux bridge (a hub namespace), so mDNS multicast (224.0.0.251:5353)
//! has to cross a real bridge. Nodes get NO `--bootstrap`.
//!
//! - `--mdns on`: a buyer and two sellers (one turns mDNS on by flag, one by its
//!   TOML config file). A capture on a seller's uplink must show the buyer's mDNS
//!   answers (naming its peer id) arriving over the bridge; both sellers see the
//!   buyer among their connected peers, fetch the buyer's image and export it
//!   byte-identical.
//! - `--mdns off` (the negative control): the seller can reach the buyer's port, but
//!   nobody told it the buyer exists: no mDNS packet appears on the wire and
//!   `image fetch` fails with "no peer has image".
//!
//! Needs root (network namespaces); skipped otherwise, failed when env CI is set.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use cpushare_tests::netns::{veth, Netns};
use cpushare_tests::node::NodeProc;
use cpushare_tests::overlay::{in_ns, scrub, udp_payloads_to, wait_until, Capture};
use cpushare_tests::swarm::{export, fetch, import, num, random_file, Peer};

const MIB: usize = 1 << 20;
const MDNS_PORT: u16 = 5353;
const MDNS_GROUP: [u8; 4] = [224, 0, 0, 251];
/// The daemon's default libp2p port (no `--listen` is given: the default is tested).
const P2P_PORT: u16 = 7450;

/// One host on the hub: its namespace, uplink interface and address.
struct Host {
    ns: Netns,
    uplink: String,
    ip: Ipv4Addr,
}

/// A hub namespace with a bridge and one namespace per host, each joined to the
/// bridge by a veth pair with an address on the host end. Dropping it deletes all.
struct Lan {
    // Hosts first: their namespaces go before the hub's.
    hosts: Vec<Host>,
    _hub: Netns,
}

impl Lan {
    /// `prefix` names everything (namespaces `{prefix}hub`, `{prefix}h{i}`;
    /// interfaces `{prefix}br`, `{prefix}u{i}`, `{prefix}p{i}`); `net` is a /24 as
    /// its first three octets.
    fn new(prefix: &str, n: usize, net: [u8; 3]) -> Result<Lan> {
        let mut names = vec![format!("{prefix}hub")];
        names.extend((0..n).map(|i| format!("{prefix}h{i}")));
        scrub(&names.iter().map(String::as_str).collect::<Vec<_>>());
        let hub = Netns::new(&names[0])?;
        let br = format!("{prefix}br");
        hub.ip(&["link", "add", &br, "type", "bridge"])?;
        hub.ip(&["link", "set", &br, "up"])?;
        let mut hosts = Vec::new();
        for (i, name) in names[1..].iter().enumerate() {
            let ns = Netns::new(name)?;
            // IPv4 only: no router solicitations or DAD chatter on the wire
            ns.sysctl("net.ipv6.conf.all.disable_ipv6=1")?;
            ns.sysctl("net.ipv6.conf.default.disable_ipv6=1")?;
            let ip = Ipv4Addr::new(net[0], net[1], net[2], i as u8 + 1);
            let uplink = format!("{prefix}u{i}");
            let port = format!("{prefix}p{i}");
            veth(&ns, &uplink, &format!("{ip}/24"), &hub, &port, "")?;
            hub.ip(&["link", "set", &port, "master", &br])?;
            hosts.push(Host { ns, uplink, ip });
        }
        Ok(Lan { hosts, _hub: hub })
    }
}

/// Starts a daemon inside `host`'s namespace with the default listen address.
fn spawn_in(host: &Host, dir: &Path, role: &str, extra: &[&str]) -> Result<Peer> {
    let proc = NodeProc::spawn(&["ip", "netns", "exec", host.ns.name()], dir, role, extra)?;
    Ok(Peer {
        proc,
        addr: format!("/ip4/{}/tcp/{P2P_PORT}", host.ip),
    })
}

fn connected_peers(p: &Peer) -> Result<Vec<String>> {
    let s = p.proc.status()?;
    Ok(s["p2p"]["connected_peers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// mDNS datagrams (UDP payloads to 224.0.0.251:5353) seen in `cap` from `src`.
fn mdns_from(cap: &Capture, src: Ipv4Addr) -> Vec<Vec<u8>> {
    cap.frames()
        .iter()
        .filter(|f| {
            let b = &f.bytes;
            !f.outgoing && b.len() >= 34 && b[26..30] == src.octets() && b[30..34] == MDNS_GROUP
        })
        .flat_map(|f| udp_payloads_to(f, MDNS_PORT))
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn mdns_on_sellers_find_buyer_without_bootstrap() -> Result<()> {
    if !cpushare_tests::require_root("network namespaces") {
        return Ok(());
    }
    let lan = Lan::new("cmd", 3, [10, 203, 7])?;
    let (hb, h1, h2) = (&lan.hosts[0], &lan.hosts[1], &lan.hosts[2]);
    let dir = tempfile::tempdir()?;
    // Every frame arriving at seller 1 from the bridge, from before anyone starts.
    let cap = Capture::start_with(h1.ns.name(), &h1.uplink, 2048)?;

    let buyer = spawn_in(hb, &dir.path().join("buyer"), "buyer", &["--mdns", "on"])?;
    let s1 = spawn_in(h1, &dir.path().join("s1"), "seller", &["--mdns", "on"])?;
    // seller 2 turns mDNS on in its config file instead of by flag
    let cfg = dir.path().join("s2.toml");
    std::fs::write(&cfg, "mdns = \"on\"\n")?;
    let s2 = spawn_in(
        h2,
        &dir.path().join("s2"),
        "seller",
        &["--config", cfg.to_str().expect("utf-8 path")],
    )?;

    let file = dir.path().join("image.raw");
    let data = random_file(&file, 4 * MIB, 0x3d45)?;
    let id = import(&buyer, &file)?;

    // Discovery: both sellers connect to the buyer on their own.
    for (i, s) in [&s1, &s2].into_iter().enumerate() {
        let found = wait_until(Duration::from_secs(20), || {
            connected_peers(s).is_ok_and(|c| c.contains(&buyer.proc.peer_id))
        });
        if !found {
            bail!(
                "seller {} never connected to the buyer through mDNS; its peers: {:?}\nseller log:\n{}\nbuyer log:\n{}",
                i + 1,
                connected_peers(s)?,
                s.proc.log(),
                buyer.proc.log()
            );
        }
    }
    // The buyer's mDNS answers, carrying its peer id, crossed the bridge to seller 1.
    let got = mdns_from(&cap, hb.ip);
    drop(cap);
    assert!(
        got.iter()
            .any(|d| contains(d, buyer.proc.peer_id.as_bytes())),
        "no mDNS answer naming the buyer arrived at seller 1 ({} mDNS datagrams from the buyer)",
        got.len()
    );

    let reports: Vec<Result<serde_json::Value>> = std::thread::scope(|sc| {
        let hs: Vec<_> = [&s1, &s2]
            .into_iter()
            .map(|p| sc.spawn(|| fetch(p, &id)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("fetch thread"))
            .collect()
    });
    for (i, (r, s)) in reports.into_iter().zip([&s1, &s2]).enumerate() {
        let r = r?;
        assert_eq!(num(&r, "bad_chunks"), 0, "seller {}: {r}", i + 1);
        let out = export(s, &id, dir.path(), &format!("out{i}.raw"))?;
        assert!(
            out == data,
            "seller {}: exported image differs from the original",
            i + 1
        );
        // still connected after the transfer, as status reports it
        assert!(
            connected_peers(s)?.contains(&buyer.proc.peer_id),
            "seller {}: buyer missing from connected peers after the fetch",
            i + 1
        );
    }
    Ok(())
}

#[test]
fn mdns_off_without_bootstrap_finds_no_peer() -> Result<()> {
    if !cpushare_tests::require_root("network namespaces") {
        return Ok(());
    }
    let lan = Lan::new("cmdx", 2, [10, 203, 8])?;
    let (hb, hs) = (&lan.hosts[0], &lan.hosts[1]);
    let dir = tempfile::tempdir()?;
    let cap = Capture::start_with(hs.ns.name(), &hs.uplink, 2048)?;

    let buyer = spawn_in(hb, &dir.path().join("buyer"), "buyer", &["--mdns", "off"])?;
    let seller = spawn_in(hs, &dir.path().join("s"), "seller", &["--mdns", "off"])?;
    let file = dir.path().join("image.raw");
    random_file(&file, MIB, 0x3d46)?;
    let id = import(&buyer, &file)?;

    // The network itself works: the seller's host reaches the buyer's libp2p port.
    let to = SocketAddr::from((hb.ip, P2P_PORT));
    in_ns(hs.ns.name(), move || {
        TcpStream::connect_timeout(&to, Duration::from_secs(5)).map(drop)
    })?;

    let out = seller.proc.cli(&["image", "fetch", &id])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "fetch without any known peer succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(err.contains("no peer has image"), "unexpected error: {err}");
    assert_eq!(
        err.trim().lines().count(),
        1,
        "error is not one line: {err}"
    );
    assert!(
        connected_peers(&seller)?.is_empty(),
        "seller found a peer with mDNS off"
    );
    let mdns: usize = cap
        .finish()
        .iter()
        .map(|f| udp_payloads_to(f, MDNS_PORT).len())
        .sum();
    assert_eq!(mdns, 0, "{mdns} mDNS datagrams on the wire with --mdns off");
    Ok(())
}
