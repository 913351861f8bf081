//! The market end to end, in network namespaces: one buyer and three sellers with
//! different prices, round trips and measurements rent real Linux guests (qemu, TCG
//! here) that boot from the swarm-distributed image, get their overlay addresses from
//! the buyer's DHCP, and answer the buyer and each other over the overlay. Then a
//! seller is killed (its guest is re-dispatched, the restarted seller bills nothing
//! more) and the buyer stops (the sellers end its guests and bill only acknowledged
//! minutes). The buyer's address change has its own test.
//! Timings are printed, not asserted.

#[path = "common/vmguest.rs"]
mod vmguest;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cpushare_tests::delay::delay_line;
use cpushare_tests::netns::{veth, Netns};
use cpushare_tests::node::NodeProc;
use cpushare_tests::{node_bin, require_root, wait_until};
use serde_json::Value;

const PERIOD_S: u64 = 5;
const GRACE_S: u64 = 20;

fn cfg(dir: &Path, text: &str) -> Result<String> {
    std::fs::create_dir_all(dir)?;
    let p = dir.join("node.toml");
    std::fs::write(&p, text)?;
    Ok(p.display().to_string())
}

fn ping(ns: &Netns, ip: &str) -> bool {
    ns.exec("ping", &["-c", "1", "-W", "1", ip])
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn http_get(ns: &Netns, ip: &str) -> Result<String> {
    let h = overlay::io::NetNs::open(ns.name())?;
    let addr = format!("{ip}:80");
    Ok(h.run(move || {
        let mut s = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    })?)
}

fn json_of(out: &str) -> Result<Value> {
    serde_json::from_str(out).with_context(|| format!("not JSON: {out}"))
}

/// (lease -> (seller peer, minutes)) as the buyer sees it.
fn buyer_leases(buyer: &NodeProc) -> Result<Vec<Value>> {
    Ok(json_of(&buyer.cli_ok(&["leases", "--json"])?)?
        .as_array()
        .cloned()
        .unwrap_or_default())
}

fn seller_lease(seller: &NodeProc, lease: &str) -> Result<Option<Value>> {
    let v = json_of(&seller.cli_ok(&["leases", "--json"])?)?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .find(|l| l["lease"].as_str() == Some(lease))
        .cloned())
}

struct World {
    _br: Netns,
    b: Netns,
    s: Vec<Netns>,
    _d: Netns,
    _delay: cpushare_tests::delay::DelayLine,
}

fn world(tag: &str) -> Result<World> {
    let br = Netns::new(&format!("cm{tag}br"))?;
    let b = Netns::new(&format!("cm{tag}b"))?;
    let s: Vec<Netns> = (1..=3)
        .map(|i| Netns::new(&format!("cm{tag}s{i}")))
        .collect::<Result<_>>()?;
    let d = Netns::new(&format!("cm{tag}d"))?;
    br.ip(&["link", "add", "br0", "type", "bridge"])?;
    br.ip(&["link", "set", "br0", "up"])?;
    let port = |i: usize| -> Result<String> {
        let p = format!("cm{tag}p{i}");
        Ok(p)
    };
    let p0 = port(0)?;
    veth(&b, "eth0", "10.210.0.1/24", &br, &p0, "")?;
    br.ip(&["link", "set", &p0, "master", "br0"])?;
    for (i, ns) in s.iter().enumerate() {
        let ip = format!("10.210.0.{}/24", 11 + i);
        let p = port(i + 1)?;
        if i == 1 {
            // The far seller: 40 ms each way through a delay line.
            veth(ns, "eth0", &ip, &d, "dla", "")?;
            veth(&d, "dlb", "", &br, &p, "")?;
        } else {
            veth(ns, "eth0", &ip, &br, &p, "")?;
        }
        br.ip(&["link", "set", &p, "master", "br0"])?;
    }
    let delay = delay_line(&d, "dla", "dlb", Duration::from_millis(40))?;
    for ns in std::iter::once(&b).chain(s.iter()) {
        ns.ip(&["link", "set", "lo", "up"])?;
        // The delay line forwards frames as they come: no host may hand it a
        // segmentation-offloaded superframe larger than the MTU.
        // Nor a frame whose checksum the NIC was meant to finish (veth skips it).
        let o = ns.exec(
            "ethtool",
            &["-K", "eth0", "tso", "off", "gso", "off", "tx", "off"],
        )?;
        if !o.status.success() {
            bail!(
                "ethtool in {}: {}",
                ns.name(),
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
    Ok(World {
        _br: br,
        b,
        s,
        _d: d,
        _delay: delay,
    })
}

/// A daemon of `role` on host namespace `ns`, listening on its addresses.
fn spawn_in(
    ns: &Netns,
    dir: &Path,
    role: &str,
    config: &str,
    boot: Option<&str>,
) -> Result<NodeProc> {
    let mut args = vec!["--listen", "/ip4/0.0.0.0/tcp/7450", "--config", config];
    if let Some(b) = boot {
        args.extend(["--bootstrap", b]);
    }
    NodeProc::spawn(&["ip", "netns", "exec", ns.name()], dir, role, &args)
}

/// Imports the test guest on the buyer as a direct-boot image running `script`
/// (the guest stays up after it); returns the image id.
fn import_guest(buyer: &NodeProc, script: &str) -> Result<String> {
    let files = vmguest::test_guest();
    let out = buyer.cli_ok(&[
        "image",
        "import",
        "--kernel",
        &files.vmlinuz.display().to_string(),
        "--initrd",
        &files.initrd.display().to_string(),
        "--cmdline",
        &vmguest::cmdline(script, "cs.keep"),
    ])?;
    Ok(out
        .split_whitespace()
        .find(|w| w.len() == 64 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .context("image id in import output")?
        .to_string())
}

fn wait_offers(buyer: &NodeProc, n: u64) -> Result<()> {
    let ok = wait_until(Duration::from_secs(90), || {
        buyer
            .status()
            .ok()
            .and_then(|s| s["market"]["offers"].as_u64())
            .is_some_and(|o| o >= n)
            && buyer
                .status()
                .ok()
                .and_then(|s| s["market"]["sellers_measured"].as_u64())
                .is_some_and(|o| o >= n)
    });
    if !ok {
        bail!(
            "the buyer did not see {n} offers and round trips: {}; log:\n{}",
            buyer.status()?["market"],
            buyer.log()
        );
    }
    Ok(())
}

fn wait_guest(b: &Netns, ip: &str, timeout: Duration) -> Option<Duration> {
    let t = Instant::now();
    wait_until(timeout, || ping(b, ip)).then(|| t.elapsed())
}

/// The delay line itself: a ping across it takes at least twice its delay.
#[test]
fn delay_line_holds_frames_both_ways() -> Result<()> {
    if !require_root("network namespaces") {
        return Ok(());
    }
    let tag = format!("{}", std::process::id() % 10000);
    let a = Netns::new(&format!("cd{tag}a"))?;
    let d = Netns::new(&format!("cd{tag}d"))?;
    let b = Netns::new(&format!("cd{tag}b"))?;
    veth(&a, "eth0", "10.212.0.1/24", &d, "dla", "")?;
    veth(&d, "dlb", "", &b, "eth0", "10.212.0.2/24")?;
    for ns in [&a, &b] {
        ns.exec(
            "ethtool",
            &["-K", "eth0", "tso", "off", "gso", "off", "tx", "off"],
        )?;
    }
    let _line = delay_line(&d, "dla", "dlb", Duration::from_millis(30))?;
    // TCP crosses it intact (checksums, segment sizes).
    let bh = overlay::io::NetNs::open(b.name())?;
    let listener = bh.run(|| std::net::TcpListener::bind("10.212.0.2:5000"))?;
    let server = std::thread::spawn(move || -> std::io::Result<usize> {
        let (mut c, _) = listener.accept()?;
        let mut v = Vec::new();
        c.read_to_end(&mut v)?;
        Ok(v.len())
    });
    let ah = overlay::io::NetNs::open(a.name())?;
    ah.run(|| {
        let mut c = TcpStream::connect_timeout(
            &"10.212.0.2:5000".parse().unwrap(),
            Duration::from_secs(5),
        )?;
        c.write_all(&vec![7u8; 300_000])
    })?;
    assert_eq!(
        server.join().unwrap()?,
        300_000,
        "TCP across the delay line lost data"
    );
    let o = a.exec("ping", &["-c", "3", "-i", "0.3", "10.212.0.2"])?;
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "no answer across the delay line: {text}"
    );
    let rtts: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(
        rtts.iter().all(|r| *r >= 60.0),
        "round trips {rtts:?} below 2 x 30 ms"
    );
    Ok(())
}

#[test]
fn buyer_rents_guests_replaces_lost_ones_and_sellers_bill_acked_minutes() -> Result<()> {
    if !require_root("network namespaces, taps, qemu") {
        return Ok(());
    }
    let tag = format!("{}", std::process::id() % 10000);
    let w = world(&tag)?;
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();

    // Trust: the plain node binary's measurement; seller 3 also hashes a boot
    // medium of its own, so its measurement is not on the list.
    let bin = std::fs::read(node_bin())?;
    let trusted = hex::encode(blake3::hash(&bin).as_bytes());
    std::fs::write(root.join("trusted.txt"), format!("# test\n{trusted}\n"))?;
    std::fs::write(root.join("medium.img"), b"some other boot medium")?;

    let bcfg = cfg(
        &root.join("buyer"),
        &format!(
            "[buyer]\ntrusted = \"{}\"\nbilling_period_s = {PERIOD_S}\ngrace_s = {GRACE_S}\nsilence_s = 20\n",
            root.join("trusted.txt").display()
        ),
    )?;
    let mut buyer = spawn_in(&w.b, &root.join("buyer"), "buyer", &bcfg, None)?;
    let boot = format!("/ip4/10.210.0.1/tcp/7450/p2p/{}", buyer.peer_id);
    let prices = ["0.02", "0.03", "0.01"];
    let spawn_seller = |i: usize| -> Result<NodeProc> {
        let dir = root.join(format!("s{}", i + 1));
        let extra = if i == 2 {
            format!("measure_boot = \"{}\"\n", root.join("medium.img").display())
        } else {
            String::new()
        };
        let c = cfg(
            &dir,
            &format!(
                "[seller]\nmax_guests = 1\nprice_per_min = \"{}\"\naccel = \"tcg\"\nmemory_mib = 256\n{extra}",
                prices[i]
            ),
        )?;
        spawn_in(&w.s[i], &dir, "seller", &c, Some(&boot))
    };
    let mut sellers: Vec<NodeProc> = (0..3).map(spawn_seller).collect::<Result<_>>()?;

    // The image: the test guest, serving HTTP and pinging its peer over the overlay.
    let script = "mkdir -p /www; echo cpushare-guest-ok > /www/index.html; httpd -p 80 -h /www; \
                  echo cs-serving; while true; do \
                  if ping -c 1 -W 1 10.77.0.2 >/dev/null && ping -c 1 -W 1 10.77.0.3 >/dev/null; \
                  then echo cs-peers-ok; sleep 30; fi; sleep 1; done";
    let image = import_guest(&buyer, script)?;

    wait_offers(&buyer, 3)?;

    // A clear error when nothing matches, naming the filters.
    let o = buyer.cli(&[
        "run",
        "--image",
        &image,
        "--count",
        "1",
        "--trusted-only",
        "--max-latency-ms",
        "20",
        "--max-price",
        "0.015",
        "--offer-wait-s",
        "3",
    ])?;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a run nothing matches must fail");
    assert!(err.contains("no offer matches"), "{err}");
    eprintln!("no-match error: {}", err.trim());

    // Run 1: trusted only: sellers 1 and 2 (3 is cheapest but not trusted).
    let t0 = Instant::now();
    let out = buyer.cli_ok(&[
        "run",
        "--image",
        &image,
        "--count",
        "2",
        "--trusted-only",
        "--max-latency-ms",
        "500",
        "--detach",
        "--json",
    ])?;
    let v = json_of(&out)?;
    let picked: Vec<String> = v["slots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["seller"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        picked.contains(&sellers[0].peer_id) && picked.contains(&sellers[1].peer_id),
        "run 1 should pick sellers 1 and 2, picked {picked:?}"
    );
    for ip in ["10.77.0.2", "10.77.0.3"] {
        let up = wait_guest(&w.b, ip, Duration::from_secs(180));
        assert!(
            up.is_some(),
            "guest {ip} never answered ping; buyer log:\n{}",
            buyer.log()
        );
    }
    eprintln!(
        "run 1: all guests answer ping {:.1} s after `run`",
        t0.elapsed().as_secs_f64()
    );
    for ip in ["10.77.0.2", "10.77.0.3"] {
        let body = http_get(&w.b, ip)?;
        assert!(body.contains("cpushare-guest-ok"), "HTTP from {ip}: {body}");
    }
    // Guest to guest through the buyer's switch: the guests say so on their consoles.
    let leases_dir = root.join("buyer/leases");
    let peers_ok = wait_until(Duration::from_secs(60), || {
        let mut n = 0;
        for e in std::fs::read_dir(&leases_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            if std::fs::read_to_string(e.path().join("console.log"))
                .is_ok_and(|c| c.contains("cs-peers-ok"))
            {
                n += 1;
            }
        }
        n >= 2
    });
    assert!(peers_ok, "guests did not reach each other over the overlay");

    // A few billing periods, then stop: both ledgers agree to the minute.
    std::thread::sleep(Duration::from_secs(PERIOD_S * 3));
    buyer.cli_ok(&["stop", "--all"])?;
    let agree = wait_until(Duration::from_secs(30), || {
        let Ok(bl) = buyer_leases(&buyer) else {
            return false;
        };
        bl.iter().all(|l| {
            let id = l["lease"].as_str().unwrap_or("");
            let seller = sellers
                .iter()
                .find(|s| Some(s.peer_id.as_str()) == l["seller"].as_str());
            seller
                .and_then(|s| seller_lease(s, id).ok().flatten())
                .is_some_and(|sl| sl["minutes_acked"] == l["minutes"] && sl["phase"] == "Ended")
        })
    });
    assert!(agree, "ledgers disagree: buyer {:?}", buyer_leases(&buyer)?);
    let billed: Vec<u64> = buyer_leases(&buyer)?
        .iter()
        .map(|l| l["minutes"].as_u64().unwrap_or(0))
        .collect();
    assert!(
        billed.iter().all(|m| *m >= 2),
        "too few periods billed: {billed:?}"
    );
    eprintln!("run 1 ledgers agree: periods billed per lease {billed:?}");

    // Run 2: no filters: the two cheapest (sellers 3 and 1). Kill seller 1: its guest
    // is re-dispatched to seller 2. First every seller offers room again.
    let room = wait_until(Duration::from_secs(60), || {
        buyer
            .status()
            .ok()
            .and_then(|s| s["market"]["offers_with_room"].as_u64())
            == Some(3)
    });
    assert!(
        room,
        "sellers do not offer room again after run 1: {}",
        buyer.status()?["market"]
    );
    let out = buyer.cli_ok(&[
        "run", "--image", &image, "--count", "2", "--detach", "--json",
    ])?;
    let v = json_of(&out)?;
    let slot_on_1 = v["slots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["seller"].as_str() == Some(sellers[0].peer_id.as_str()))
        .context("run 2 should use seller 1")?
        .clone();
    let ip1 = slot_on_1["ip"].as_str().unwrap().to_string();
    let lease1 = slot_on_1["lease"].as_str().unwrap().to_string();
    assert!(wait_guest(&w.b, &ip1, Duration::from_secs(180)).is_some());
    sellers[0].kill9();
    let killed = Instant::now();
    // The old guest dies with its seller's process; wait until the address is silent.
    wait_until(Duration::from_secs(20), || !ping(&w.b, &ip1));
    let back = wait_guest(&w.b, &ip1, Duration::from_secs(240));
    assert!(
        back.is_some(),
        "the lost guest was not replaced; buyer log:\n{}",
        buyer.log()
    );
    eprintln!(
        "replacement: guest {ip1} answers again {:.1} s after its seller was killed",
        killed.elapsed().as_secs_f64()
    );
    let on_2 = buyer_leases(&buyer)?.iter().any(|l| {
        l["seller"].as_str() == Some(sellers[1].peer_id.as_str()) && l["state"] == "running"
    });
    assert!(on_2, "the replacement should run on seller 2");
    // The killed seller, restarted, cleans up and bills nothing more for that lease.
    sellers[0] = spawn_seller(0)?;
    let sl = seller_lease(&sellers[0], &lease1)?.context("restarted seller forgot the lease")?;
    assert_eq!(sl["phase"], "Ended");
    let receipted = sl["minutes_receipted"].clone();
    std::thread::sleep(Duration::from_secs(PERIOD_S * 2));
    let sl = seller_lease(&sellers[0], &lease1)?.unwrap();
    assert_eq!(
        sl["minutes_receipted"], receipted,
        "a restarted seller billed more"
    );
    let left = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()?;
    let left = String::from_utf8_lossy(&left.stdout).to_string();
    assert!(
        !left.contains(&format!("csl-{}", &lease1[..8])),
        "the killed seller's lease namespace is left over: {left}"
    );

    // The buyer stops: sellers end its guests within the grace period and bill only
    // what it acknowledged.
    let acked: Vec<(String, u64)> = buyer_leases(&buyer)?
        .iter()
        .filter(|l| l["state"] == "running")
        .map(|l| (l["lease"].as_str().unwrap().to_string(), 0))
        .collect();
    buyer.kill9();
    let stopped = Instant::now();
    for (lease, _) in &acked {
        let ended = wait_until(Duration::from_secs(GRACE_S + 30), || {
            sellers.iter().any(|s| {
                seller_lease(s, lease).ok().flatten().is_some_and(|l| {
                    l["phase"] == "Ended"
                        && l["end_reason"]
                            .as_str()
                            .is_some_and(|r| r.contains("stopped acknowledging"))
                })
            })
        });
        assert!(ended, "lease {lease} not ended after the buyer went away");
        let l = sellers
            .iter()
            .find_map(|s| seller_lease(s, lease).ok().flatten())
            .unwrap();
        assert!(
            l["minutes_acked"].as_u64() <= l["minutes_receipted"].as_u64(),
            "billed beyond receipts: {l}"
        );
    }
    eprintln!(
        "buyer gone: sellers ended its guests {:.1} s later (grace {GRACE_S} s)",
        stopped.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The buyer's home line gets a new address mid-lease (the old one goes, a new one
/// comes, as a DSL line reconnects): the guests answer again without a new lease.
#[test]
fn guests_answer_again_after_the_buyer_address_changes() -> Result<()> {
    if !require_root("network namespaces, taps, qemu") {
        return Ok(());
    }
    let tag = format!("{}", std::process::id() % 10000 + 1);
    let w = world(&tag)?;
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let bcfg = cfg(
        &root.join("buyer"),
        &format!("[buyer]\nbilling_period_s = {PERIOD_S}\ngrace_s = {GRACE_S}\nsilence_s = 60\n"),
    )?;
    let buyer = spawn_in(&w.b, &root.join("buyer"), "buyer", &bcfg, None)?;
    let boot = format!("/ip4/10.210.0.1/tcp/7450/p2p/{}", buyer.peer_id);
    let mut sellers = Vec::new();
    for i in [0usize, 2] {
        let dir = root.join(format!("s{}", i + 1));
        let c = cfg(&dir, "[seller]\nmax_guests = 1\naccel = \"tcg\"\n")?;
        sellers.push(spawn_in(&w.s[i], &dir, "seller", &c, Some(&boot))?);
    }
    let script = "mkdir -p /www; echo cpushare-guest-ok > /www/index.html; httpd -p 80 -h /www";
    let image = import_guest(&buyer, script)?;
    wait_offers(&buyer, 2)?;
    buyer.cli_ok(&["run", "--image", &image, "--count", "2", "--detach"])?;
    for ip in ["10.77.0.2", "10.77.0.3"] {
        assert!(wait_guest(&w.b, ip, Duration::from_secs(180)).is_some());
    }
    // The buyer's home line gets a new address: the guests answer again, no new lease.
    let before: Vec<String> = buyer_leases(&buyer)?
        .iter()
        .filter(|l| l["state"] == "running")
        .map(|l| l["lease"].as_str().unwrap().to_string())
        .collect();
    let moved = Instant::now();
    // As a DSL line reconnects: the old address goes, a new one comes.
    w.b.ip(&["addr", "del", "10.210.0.1/24", "dev", "eth0"])?;
    w.b.ip(&["addr", "add", "10.210.0.2/24", "dev", "eth0"])?;
    for ip in ["10.77.0.2", "10.77.0.3"] {
        // Overlay traffic goes buyer -> guest first: the switch answers from the new
        // address and the seller learns it on the new libp2p connection.
        let t = wait_guest(&w.b, ip, Duration::from_secs(120));
        assert!(
            t.is_some(),
            "guest {ip} lost after the buyer moved; buyer log:\n{}",
            buyer.log()
        );
    }
    eprintln!(
        "buyer address change: guests answer again after {:.1} s",
        moved.elapsed().as_secs_f64()
    );
    let after: Vec<String> = buyer_leases(&buyer)?
        .iter()
        .filter(|l| l["state"] == "running")
        .map(|l| l["lease"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(before, after, "the move must not make new leases");

    drop(sellers);
    Ok(())
}
