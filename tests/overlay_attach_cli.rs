//! `overlay attach` as a newcomer meets it: every flag is checked before anything is
//! created; `--iface` only takes an interface in a lease namespace this node made;
//! a seller started under `ip netns exec` makes lease namespaces the rest of the
//! host sees; `vm run --tap` opens the tap in the lease namespace `attach` made; and
//! `admit` prints an address a seller can use. Needs root (and qemu for `vm run`).

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use cpushare_tests::netns::{ip, Netns};
use cpushare_tests::node::NodeProc;
use cpushare_tests::overlay::scrub;
use cpushare_tests::wait_until;

#[path = "common/vmguest.rs"]
mod vmguest;

const NAMES: &[&str] = &[
    "cnad", "cnag", "cna-host", "cnal", "cs-cnat0", "cs-cnat1", "cnabad", "cs-cnat2",
];

fn public_key(n: &NodeProc) -> String {
    let out = n.cli_ok(&["id"]).unwrap();
    out.lines()
        .find_map(|l| l.strip_prefix("public key: "))
        .expect("public key line")
        .trim()
        .to_string()
}

/// A valid ed25519 public key (hex), fixed by `seed`.
fn test_key(seed: u8) -> String {
    let sk = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
    hex::encode(sk.verifying_key().as_bytes())
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// The lease records of a data dir (one per lease namespace the node holds).
fn records(data_dir: &Path) -> usize {
    std::fs::read_dir(data_dir.join("overlay-leases"))
        .map(|d| d.flatten().count())
        .unwrap_or(0)
}

/// The tests share NAMES and each scrubs all of them first, so they take turns: run
/// in parallel, one test's scrub deleted a namespace another had just made (CI failure:
/// "Cannot open network namespace cna-host").
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Removes what a run may leave, also when it panics.
struct Scrub;
impl Drop for Scrub {
    fn drop(&mut self) {
        scrub(NAMES);
        let _ = ip(&["link", "del", "cnat0"]);
    }
}

#[test]
fn attach_checks_every_flag_first_and_takes_only_lease_namespaces() {
    if !cpushare_tests::require_root("network namespaces") {
        return;
    }
    let _serial = serial();
    scrub(NAMES);
    let _scrub = Scrub;
    let dir = tempfile::tempdir().unwrap();
    let p2p = ["--listen", "/ip4/127.0.0.1/tcp/0"];
    let seller = NodeProc::spawn(&[], &dir.path().join("s"), "seller", &p2p).unwrap();
    let bkey = public_key(&NodeProc::spawn(&[], &dir.path().join("b"), "buyer", &p2p).unwrap());
    let good = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "overlay",
            "attach",
            "--buyer",
            "127.0.0.1:9",
            "--buyer-key",
            &bkey,
            "--mac",
            "52:54:00:31:00:01",
            "--ip",
            "10.77.0.41",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let attach = |args: Vec<String>| {
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        seller.cli(&a).unwrap()
    };

    // Each bad flag: refused with its name, and nothing created (the flag checks used
    // to come after the namespace and tap were made).
    let tap = ["--tap", "cnat0"];
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            good(&[&tap[..], &["--max-mbit", "0"]].concat()),
            "--max-mbit",
        ),
        (good(&[&tap[..], &["--max-pps", "0"]].concat()), "--max-pps"),
        (
            good(&[&tap[..], &["--busy-poll-us", "99999999"]].concat()),
            "--busy-poll-us",
        ),
        (
            good(&[&tap[..], &["--buyer-ip", "10.77.0.41"]].concat()),
            "--buyer-ip",
        ),
        (
            good(&[&tap[..], &["--netns", "cna/../x"]].concat()),
            "--netns",
        ),
        (good(&["--tap", "cnat0-name-too-long"]), "--tap"),
        (
            {
                let mut v = good(&tap);
                let i = v.iter().position(|a| a == "127.0.0.1:9").unwrap();
                v[i] = "0.0.0.0:7451".into();
                v
            },
            "--buyer",
        ),
        (
            {
                let mut v = good(&tap);
                let i = v.iter().position(|a| a == "52:54:00:31:00:01").unwrap();
                v[i] = "01:00:5e:00:00:01".into();
                v
            },
            "--mac",
        ),
        (
            {
                let mut v = good(&tap);
                let i = v.iter().position(|a| a == "10.77.0.41").unwrap();
                v[i] = "255.255.255.255".into();
                v
            },
            "--ip",
        ),
    ];
    for (args, want) in cases {
        let out = attach(args.clone());
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
        assert!(
            !netns_exists("cs-cnat0"),
            "{args:?} created the lease namespace"
        );
        assert_eq!(records(&seller.data_dir), 0, "{args:?} left a lease record");
    }

    // --iface: a namespace this node did not create is refused, whatever is in it
    // (here one made by `ip netns add`, and the host's own interface names).
    let foreign = Netns::new("cna-host").unwrap();
    let out = attach(good(&["--netns", "cna-host", "--iface", "lo"]));
    assert!(
        stderr(&out).contains("not a lease namespace this node created"),
        "{}",
        stderr(&out)
    );
    let out = attach(good(&["--netns", "cnanone", "--iface", "eth0"]));
    assert!(
        stderr(&out).contains("not a lease namespace this node created"),
        "{}",
        stderr(&out)
    );
    drop(foreign);

    // A lease namespace the node makes (`netns-add`) is taken, once the interface
    // exists in it; detach removes it.
    seller.cli_ok(&["overlay", "netns-add", "cnal"]).unwrap();
    assert!(netns_exists("cnal"));
    let out = attach(good(&["--netns", "cnal", "--iface", "cnalv"]));
    assert!(
        stderr(&out).contains("no interface \"cnalv\""),
        "{}",
        stderr(&out)
    );
    let guest = Netns::new("cnag").unwrap();
    ip(&[
        "link", "add", "cnagv", "netns", "cnag", "type", "veth", "peer", "name", "cnalv", "netns",
        "cnal",
    ])
    .unwrap();
    guest.ip(&["link", "set", "cnagv", "up"]).unwrap();
    let out = seller
        .cli_ok(
            &good(&["--netns", "cnal", "--iface", "cnalv"])
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>(),
        )
        .unwrap();
    assert!(out.contains("attached guest 52:54:00:31:00:01"), "{out}");
    let ls = seller.cli_ok(&["overlay", "ls"]).unwrap();
    assert!(ls.contains("to guest") && ls.contains("from guest"), "{ls}");
    seller
        .cli_ok(&["overlay", "detach", "--mac", "52:54:00:31:00:01"])
        .unwrap();
    assert!(
        !netns_exists("cnal"),
        "netns-add namespace left after detach"
    );
}

/// A seller daemon started under `ip netns exec` (a private mount namespace) makes
/// lease namespaces every process sees, so a VMM can open the guest tap.
#[test]
fn a_seller_under_ip_netns_exec_makes_visible_lease_namespaces() {
    if !cpushare_tests::require_root("network namespaces") {
        return;
    }
    let _serial = serial();
    scrub(NAMES);
    let _scrub = Scrub;
    let dir = tempfile::tempdir().unwrap();
    let host = Netns::new("cnad").unwrap();
    let p2p = ["--listen", "/ip4/127.0.0.1/tcp/0"];
    let seller = NodeProc::spawn(
        &["ip", "netns", "exec", host.name()],
        &dir.path().join("s"),
        "seller",
        &p2p,
    )
    .unwrap();
    let bkey = test_key(22);
    seller
        .cli_ok(&[
            "overlay",
            "attach",
            "--tap",
            "cnat1",
            "--buyer",
            "127.0.0.1:9",
            "--buyer-key",
            &bkey,
            "--mac",
            "52:54:00:31:00:02",
            "--ip",
            "10.77.0.42",
        ])
        .unwrap();
    // From this process (the host's mount namespace): the namespace and its tap.
    let out = std::process::Command::new("ip")
        .args(["-n", "cs-cnat1", "-o", "link", "show", "cnat1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lease namespace not visible outside the daemon: {}\ndaemon log:\n{}",
        stderr(&out),
        seller.log()
    );
    seller
        .cli_ok(&["overlay", "detach", "--mac", "52:54:00:31:00:02"])
        .unwrap();
    assert!(!netns_exists("cs-cnat1"));
}

/// `vm run --tap` opens the tap `attach --tap` made, in its lease namespace (qemu
/// used to make a new, unconnected tap of that name in its own namespace).
#[test]
fn vm_run_tap_opens_the_lease_namespace_tap() {
    if !cpushare_tests::require_root("network namespaces") {
        return;
    }
    let _serial = serial();
    scrub(NAMES);
    let _scrub = Scrub;
    let dir = tempfile::tempdir_in(vmguest::scratch_dir()).unwrap();
    let p2p = ["--listen", "/ip4/127.0.0.1/tcp/0"];
    let data = dir.path().join("s");
    let seller = NodeProc::spawn(&[], &data, "seller", &p2p).unwrap();
    let bkey = test_key(33);
    let mac = "52:54:00:31:00:03";
    seller
        .cli_ok(&[
            "overlay",
            "attach",
            "--tap",
            "cnat2",
            "--buyer",
            "127.0.0.1:9",
            "--buyer-key",
            &bkey,
            "--mac",
            mac,
            "--ip",
            "10.77.0.43",
        ])
        .unwrap();
    // A boot sector that spins: the NIC only has to be plugged in.
    let disk = dir.path().join("spin.img");
    let mut mbr = vec![0u8; 1 << 20];
    mbr[..2].copy_from_slice(&[0xEB, 0xFE]);
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    std::fs::write(&disk, &mbr).unwrap();
    let vm = std::process::Command::new(cpushare_tests::node_bin())
        .arg("--data-dir")
        .arg(&data)
        .args([
            "vm",
            "run",
            "--backend",
            "qemu",
            "--accel",
            "tcg",
            "--quiet",
        ])
        .args(["--memory-mib", "32", "--grace", "1", "--timeout", "300"])
        .args([
            "--disk",
            disk.to_str().unwrap(),
            "--tap",
            "cnat2",
            "--mac",
            mac,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The tap in the lease namespace gets its carrier when the VMM holds it.
    let carrier = || {
        std::process::Command::new("ip")
            .args(["-n", "cs-cnat2", "-o", "link", "show", "cnat2"])
            .output()
            .map(|o| {
                let s = String::from_utf8_lossy(&o.stdout).into_owned();
                o.status.success() && !s.contains("NO-CARRIER")
            })
            .unwrap_or(false)
    };
    let held = wait_until(Duration::from_secs(60), carrier);
    let stray = std::process::Command::new("ip")
        .args(["link", "show", "cnat2"])
        .output()
        .unwrap()
        .status
        .success();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(vm.id() as i32, libc::SIGTERM) };
    let out = vm.wait_with_output().unwrap();
    assert!(held, "the VMM never opened the lease tap: {}", stderr(&out));
    assert!(!stray, "a tap cnat2 appeared in the host namespace");
    seller.cli_ok(&["overlay", "detach", "--mac", mac]).unwrap();
}

/// `admit` answers with the address and command a seller needs, not 0.0.0.0.
#[test]
fn admit_prints_an_address_a_seller_can_use() {
    if !cpushare_tests::require_root("a tap device") {
        return;
    }
    let _serial = serial();
    scrub(NAMES);
    let _scrub = Scrub;
    let dir = tempfile::tempdir().unwrap();
    let host = Netns::new("cnabad").unwrap();
    // A veth with both ends here stands in for the uplink (no dummy module needed).
    host.ip(&[
        "link", "add", "cnabd0", "type", "veth", "peer", "name", "cnabd1",
    ])
    .unwrap();
    host.ip(&["addr", "add", "10.203.9.7/24", "dev", "cnabd0"])
        .unwrap();
    host.ip(&["link", "set", "cnabd0", "up"]).unwrap();
    host.ip(&["link", "set", "cnabd1", "up"]).unwrap();
    let p2p = ["--listen", "/ip4/127.0.0.1/tcp/0"];
    let buyer = NodeProc::spawn(
        &["ip", "netns", "exec", host.name()],
        &dir.path().join("b"),
        "buyer",
        &p2p,
    )
    .unwrap();
    let key = test_key(44);
    let out = buyer
        .cli_ok(&[
            "overlay",
            "admit",
            "--key",
            &key,
            "--mac",
            "52:54:00:31:00:04",
            "--ip",
            "10.77.0.44",
            "--udp-listen",
            "0.0.0.0:51944",
            "--tap",
            "cnabt0",
        ])
        .unwrap();
    assert!(out.contains("--buyer 10.203.9.7:51944"), "{out}");
    assert!(!out.contains("--buyer 0.0.0.0"), "{out}");
    assert!(out.contains("--buyer-key "), "{out}");
    let v: serde_json::Value = serde_json::from_str(
        &buyer
            .cli_ok(&[
                "overlay",
                "admit",
                "--key",
                &test_key(55),
                "--mac",
                "52:54:00:31:00:05",
                "--ip",
                "10.77.0.45",
                "--json",
            ])
            .unwrap(),
    )
    .unwrap();
    let eps = v["seller_endpoints"].as_array().unwrap();
    assert!(eps.iter().any(|e| e == "10.203.9.7:51944"), "{v}");
    assert!(
        !eps.iter()
            .any(|e| e.as_str().unwrap().starts_with("10.77.")),
        "the overlay's own address offered to sellers: {v}"
    );
}
