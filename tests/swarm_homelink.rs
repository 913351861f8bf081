//! The swarm on slow home links (issue 16): a buyer and 6 sellers, each behind a
//! 1 Mbit/s uplink (16 Mbit/s down) whose modem queue is a 10-packet FIFO, in
//! network namespaces joined by a bridge (the topology of scripts/bench-swarm.sh).
//! All sellers fetch one 4 MiB image at once. Fails when the last seller needs
//! more than 3 x the Kumar-Ross bound (many parallel TCP streams losing packets in
//! a shallow buffer is how the swarm collapsed there). Prints the ratio, the
//! buyer's wire bytes / image and the packets its FIFO dropped.
//!
//! Run: `cargo build -p node --bins && cargo test -p cpushare-tests --test
//! swarm_homelink -- --nocapture` (root). Namespaces carry the prefix `hl`.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cpushare_tests::netns::Netns;
use cpushare_tests::node::{cli, NodeProc};
use cpushare_tests::require_root;
use cpushare_tests::swarm::{export, import, random_file, Peer};

const MIB: usize = 1 << 20;
const SELLERS: usize = 6;
const FILE: usize = 4 * MIB;
const UP_BPS: f64 = 1e6;
const DOWN_BPS: f64 = 16e6;
const FIFO_PACKETS: &str = "10";
const PORT: u16 = 7450;

/// Kumar-Ross lower bound for one seed and `n` peers: the seed sends every byte
/// once, each peer receives every byte, and all uplinks together carry n copies.
fn kumar_ross(file_bits: f64, n: usize, seed_up: f64, peer_up: f64, down: f64) -> f64 {
    let a = file_bits / seed_up;
    let b = file_bits / down;
    let c = n as f64 * file_bits / (seed_up + n as f64 * peer_up);
    a.max(b).max(c)
}

/// HTB at `rate` with a packet FIFO of `FIFO_PACKETS` as its only queue (no
/// fq/codel: a plain modem), offloads off so the FIFO holds real frames.
fn shape(ns: &Netns, dev: &str, rate: &str) -> Result<()> {
    // ethtool may be missing; offloads only make frames bigger than the MTU
    let _ = ns
        .command("ethtool")
        .args(["-K", dev, "tso", "off", "gso", "off", "gro", "off"])
        .output();
    let tc = |args: &[&str]| ns.exec("tc", args).map(|_| ());
    tc(&[
        "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10",
    ])?;
    tc(&[
        "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb", "rate", rate, "ceil",
        rate, "quantum", "1514",
    ])?;
    tc(&[
        "qdisc",
        "add",
        "dev",
        dev,
        "parent",
        "1:10",
        "handle",
        "10:",
        "pfifo",
        "limit",
        FIFO_PACKETS,
    ])
}

struct Host {
    ns: Netns,
    ip: String,
}

/// A host namespace on the hub's bridge, uplink and downlink shaped.
fn host(hub: &Netns, name: &str, port: &str, ip: &str) -> Result<Host> {
    let ns = Netns::new(name)?;
    ns.sysctl("net.ipv6.conf.all.disable_ipv6=1")?;
    // HOMELINK_CC=reno: the hosts' TCP congestion control (default: the kernel's,
    // BBR on these machines; a home computer's is usually loss-based CUBIC)
    if let Ok(cc) = std::env::var("HOMELINK_CC") {
        ns.sysctl(&format!("net.ipv4.tcp_congestion_control={cc}"))?;
    }
    cpushare_tests::netns::ip(&[
        "link",
        "add",
        port,
        "netns",
        hub.name(),
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        name,
    ])?;
    hub.ip(&["link", "set", port, "master", "br0"])?;
    hub.ip(&["link", "set", port, "up"])?;
    ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    shape(&ns, "eth0", "1mbit")?;
    shape(hub, port, "16mbit")?;
    Ok(Host {
        ns,
        ip: ip.to_string(),
    })
}

fn spawn_in(h: &Host, dir: &Path, role: &str, bootstrap: Option<&str>) -> Result<Peer> {
    let addr = format!("/ip4/{}/tcp/{PORT}", h.ip);
    let mut extra = vec!["--listen", addr.as_str()];
    if let Some(b) = bootstrap {
        extra.extend(["--bootstrap", b]);
    }
    // The nodes run CUBIC on their own sockets (`[swarm] tcp_congestion`), as
    // most home computers do, whatever the hosts' default (this machine's is BBR,
    // which loses most of its packets in a 10-packet FIFO); HOMELINK_NODE_CC
    // picks another, `kernel` leaves the kernel's. Yielding is off here
    // (HOMELINK_YIELD=on|off and HOMELINK_SIGNAL=owd|acks|tcp pick the mode): the
    // default acknowledgement signal stalls on these links (its samples cross the
    // receiver's own full uplink FIFO, 121 ms at 1 Mbit/s, above the 100 ms
    // target), and the one-way delay signal, which does not, finished at 2.05-2.48 x
    // the bound (2026-12-08), too close to the limit on a loaded CI machine; yielding
    // off 1.30-1.41 x.
    let conf = dir.with_extension("toml");
    let conf = conf.display().to_string();
    let mut swarm = String::new();
    let cc = std::env::var("HOMELINK_NODE_CC").unwrap_or_else(|_| "cubic".into());
    if cc != "kernel" {
        swarm += &format!("tcp_congestion = \"{cc}\"\n");
    }
    let y = std::env::var("HOMELINK_YIELD").unwrap_or_else(|_| "off".into());
    swarm += &format!("upload_yield = \"{y}\"\n");
    // HOMELINK_SIGNAL=owd|tcp|acks: where the yielding mode reads the delay
    if let Ok(sig) = std::env::var("HOMELINK_SIGNAL") {
        swarm += &format!("upload_yield_signal = \"{sig}\"\n");
    }
    if !swarm.is_empty() {
        std::fs::write(&conf, format!("[swarm]\n{swarm}"))?;
        extra.extend(["--config", conf.as_str()]);
    }
    let proc = NodeProc::spawn(&["ip", "netns", "exec", h.ns.name()], dir, role, &extra)?;
    Ok(Peer { proc, addr })
}

fn json(ns: &Netns, prog: &str, args: &[&str]) -> Result<serde_json::Value> {
    let out = ns.exec(prog, args)?;
    serde_json::from_slice(&out.stdout).with_context(|| format!("{prog} {args:?} output"))
}

/// Bytes sent on `eth0` of `ns` (every header included).
fn tx_bytes(ns: &Netns) -> Result<u64> {
    let v = json(ns, "ip", &["-s", "-j", "link", "show", "dev", "eth0"])?;
    v[0]["stats64"]["tx"]["bytes"]
        .as_u64()
        .context("no tx bytes in ip -s -j link")
}

/// Packets dropped by the FIFO under the HTB class of `eth0` in `ns`.
fn fifo_drops(ns: &Netns) -> Result<u64> {
    let v = json(ns, "tc", &["-s", "-j", "qdisc", "show", "dev", "eth0"])?;
    let q = v
        .as_array()
        .and_then(|a| a.iter().find(|q| q["kind"] == "pfifo"))
        .context("no pfifo on eth0")?;
    q["drops"].as_u64().context("no drop count in tc -s -j")
}

// The regression test of issue 16's collapse (a dozen TCP streams in shallow FIFOs,
// sellers 40-80 % done at 900 s against a 134 s bound). Under the kernel's BBR (124ac19) it
// passed once at 2.55 x and failed three times (0 of 6 done at 3 x); with the nodes on
// CUBIC and yielding off (2026-12-08, 71fcb7f) 1.30 x and 1.33 x (buyer wire 1.11-1.12 x);
// with yielding on (the acknowledgement signal) 1.48, 2.36, 1.96 x and two stalls past
// 3 x; yielding on the one-way delay signal 2.05, 2.08, 2.18 x (load 1.4-2.5) and
// 2.45, 2.48 x (load 2.5-4). The test runs yielding off (see `spawn_in`).
#[test]
fn six_sellers_on_1mbit_uplinks_with_10_packet_fifos_fetch_within_3x_the_bound() -> Result<()> {
    if !require_root("network namespaces and tc") {
        return Ok(());
    }
    // HOMELINK_PREFIX: the namespaces' prefix (default hl), for runs beside others
    let pre = std::env::var("HOMELINK_PREFIX").unwrap_or_else(|_| "hl".into());
    let hub = Netns::new(&format!("{pre}-hub"))?;
    hub.ip(&[
        "link",
        "add",
        "br0",
        "type",
        "bridge",
        "stp_state",
        "0",
        "forward_delay",
        "0",
    ])?;
    hub.ip(&["link", "set", "br0", "up"])?;
    let buyer_host = host(&hub, &format!("{pre}-b"), "hlb", "192.0.2.1")?;
    let mut seller_hosts = Vec::new();
    for i in 1..=SELLERS {
        seller_hosts.push(host(
            &hub,
            &format!("{pre}-s{i}"),
            &format!("hls{i}"),
            &format!("192.0.2.{}", 10 + i),
        )?);
    }
    for h in &seller_hosts {
        h.ns.exec("ping", &["-c1", "-W2", &buyer_host.ip])
            .context("a seller cannot reach the buyer over the bridge")?;
    }

    let dir = tempfile::tempdir()?;
    let buyer = spawn_in(&buyer_host, &dir.path().join("buyer"), "buyer", None)?;
    let boot = buyer.p2p_addr();
    let mut sellers = Vec::new();
    for (i, h) in seller_hosts.iter().enumerate() {
        sellers.push(spawn_in(
            h,
            &dir.path().join(format!("s{i}")),
            "seller",
            Some(&boot),
        )?);
    }
    let file = dir.path().join("image.raw");
    let data = random_file(&file, FILE, 16)?;
    let id = import(&buyer, &file)?;
    // connections and identify settle before the clock starts (as the benchmark does)
    std::thread::sleep(Duration::from_secs(3));

    let bound = kumar_ross((FILE * 8) as f64, SELLERS, UP_BPS, UP_BPS, DOWN_BPS);
    let limit = Duration::from_secs_f64(3.0 * bound);
    let tx0 = tx_bytes(&buyer_host.ns)?;
    let drops0 = fifo_drops(&buyer_host.ns)?;
    let t0 = Instant::now();
    let (tx, rx) = mpsc::channel();
    for (i, s) in sellers.iter().enumerate() {
        let (tx, data_dir, id): (_, PathBuf, String) =
            (tx.clone(), s.proc.data_dir.clone(), id.clone());
        std::thread::spawn(move || {
            let r = cli(&data_dir, &["image", "fetch", &id]);
            let _ = tx.send((i, t0.elapsed(), r));
        });
    }
    drop(tx);
    let mut done = [None; SELLERS];
    while done.iter().any(Option::is_none) {
        let left = limit.saturating_sub(t0.elapsed());
        let Ok((i, at, r)) = rx.recv_timeout(left) else {
            break;
        };
        let out = r?;
        if !out.status.success() {
            bail!(
                "seller {i}: fetch failed after {:.1} s: {}\ndaemon log:\n{}",
                at.as_secs_f64(),
                String::from_utf8_lossy(&out.stderr).trim(),
                sellers[i].proc.log()
            );
        }
        done[i] = Some(at);
    }
    let wall = t0.elapsed();
    let wire = tx_bytes(&buyer_host.ns)? - tx0;
    let drops = fifo_drops(&buyer_host.ns)? - drops0;
    let finished: Vec<f64> = done.iter().flatten().map(|d| d.as_secs_f64()).collect();
    let last = if finished.len() == SELLERS {
        finished.iter().cloned().fold(0.0, f64::max)
    } else {
        wall.as_secs_f64()
    };
    let ratio = last / bound;
    let mut sorted = finished.clone();
    sorted.sort_by(f64::total_cmp);
    eprintln!(
        "homelink: {SELLERS} sellers, 1 Mbit/s up / 16 down, {FIFO_PACKETS}-packet FIFO, {} MiB: \
         last seller {last:.1} s = {ratio:.2} x the Kumar-Ross bound ({bound:.1} s); \
         done {}/{SELLERS} at {sorted:.1?}; buyer wire bytes {:.3} x image; \
         buyer FIFO dropped {drops} packets",
        FILE / MIB,
        finished.len(),
        wire as f64 / FILE as f64,
    );
    if finished.len() < SELLERS {
        // what each node's fetch and uplink looked like when time ran out
        // (the stall is intermittent: this is the evidence a rerun lacks)
        for (name, data_dir) in std::iter::once(("buyer".to_string(), &buyer.proc.data_dir)).chain(
            sellers
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("seller {i}"), &s.proc.data_dir)),
        ) {
            let st = cli(data_dir, &["status", "--json"])
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_else(|e| format!("status failed: {e}"));
            eprintln!("{name} status at the deadline:\n{st}");
        }
    }
    assert!(
        finished.len() == SELLERS,
        "only {}/{SELLERS} sellers done after 3 x the bound ({:.1} s)",
        finished.len(),
        limit.as_secs_f64()
    );
    assert!(ratio <= 3.0, "last seller at {ratio:.2} x the bound");
    for (i, s) in sellers.iter().enumerate() {
        let got = export(s, &id, dir.path(), &format!("out{i}.raw"))?;
        assert!(got == data, "seller {i}: exported image differs");
        std::fs::remove_file(dir.path().join(format!("out{i}.raw")))?;
    }
    Ok(())
}
