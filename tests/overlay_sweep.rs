//! A seller daemon killed with -9 while guests are attached with `overlay attach
//! --tap` leaves its lease namespaces (and their taps) behind; the next daemon on
//! the same data dir removes them at start, and only them: a namespace that took
//! a leftover's name in between is left alone. Needs root (network namespaces).

use std::path::Path;
use std::process::Command;

use cpushare_tests::node::{cli, NodeProc};
use cpushare_tests::overlay::scrub;

/// Lease namespaces of this test (prefix `cvs`), removed on drop.
const NAMES: &[&str] = &["cvswa", "cvswb", "cvswc"];

struct Scrub;

impl Drop for Scrub {
    fn drop(&mut self) {
        scrub(NAMES);
    }
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn link_in(ns: &str, dev: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", dev])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn public_key(data_dir: &Path) -> String {
    let out = cli(data_dir, &["id"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("public key: "))
        .expect("public key line")
        .trim()
        .to_string()
}

fn attach(seller: &NodeProc, tap: &str, netns: &str, mac: &str, ip: &str, bkey: &str) {
    seller
        .cli_ok(&[
            "overlay",
            "attach",
            "--tap",
            tap,
            "--netns",
            netns,
            // Loopback: handshakes to nobody, which is all this test needs.
            "--buyer",
            "127.0.0.1:9",
            "--buyer-key",
            bkey,
            "--mac",
            mac,
            "--ip",
            ip,
        ])
        .unwrap();
}

#[test]
fn restarted_seller_sweeps_lease_namespaces_of_a_killed_one() {
    if !cpushare_tests::require_root("network namespaces") {
        return;
    }
    scrub(NAMES);
    let _scrub = Scrub;
    let dir = tempfile::tempdir().unwrap();
    let sdir = dir.path().join("s");
    let bkey = public_key(&dir.path().join("b"));
    let p2p = ["--listen", "/ip4/127.0.0.1/tcp/0"];

    let mut seller = NodeProc::spawn(&[], &sdir, "seller", &p2p).unwrap();
    attach(
        &seller,
        "cvswtapa",
        "cvswa",
        "52:54:00:77:07:01",
        "10.77.0.71",
        &bkey,
    );
    attach(
        &seller,
        "cvswtapb",
        "cvswb",
        "52:54:00:77:07:02",
        "10.77.0.72",
        &bkey,
    );
    attach(
        &seller,
        "cvswtapc",
        "cvswc",
        "52:54:00:77:07:03",
        "10.77.0.73",
        &bkey,
    );
    // A detached lease is cleaned up at once and not swept again later.
    seller
        .cli_ok(&["overlay", "detach", "--mac", "52:54:00:77:07:03"])
        .unwrap();
    assert!(!netns_exists("cvswc"), "detach left its namespace");
    assert!(netns_exists("cvswa") && link_in("cvswa", "cvswtapa"));
    assert!(netns_exists("cvswb") && link_in("cvswb", "cvswtapb"));

    seller.kill9();
    // What a killed daemon leaves: the namespaces with their persistent taps.
    assert!(netns_exists("cvswa") && link_in("cvswa", "cvswtapa"));
    assert!(netns_exists("cvswb") && link_in("cvswb", "cvswtapb"));
    // Someone else takes one of the names meanwhile (and a detached lease's name).
    Command::new("ip")
        .args(["netns", "del", "cvswb"])
        .status()
        .unwrap();
    for n in ["cvswb", "cvswc"] {
        let st = Command::new("ip")
            .args(["netns", "add", n])
            .status()
            .unwrap();
        assert!(st.success(), "ip netns add {n}");
    }

    let seller = NodeProc::spawn(&[], &sdir, "seller", &p2p).unwrap();
    assert!(
        !netns_exists("cvswa"),
        "leftover lease namespace not swept; log:\n{}",
        seller.log()
    );
    assert!(
        netns_exists("cvswb") && netns_exists("cvswc"),
        "a namespace this daemon did not make was removed"
    );
    assert!(
        seller
            .log()
            .contains("removed a lease namespace left by an earlier run"),
        "{}",
        seller.log()
    );
    // The records are gone too: a second restart has nothing to do.
    let recs = std::fs::read_dir(sdir.join("overlay-leases"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(recs, 0, "lease records left after the sweep");
    // The swept lease can be attached again under the same names.
    attach(
        &seller,
        "cvswtapa",
        "cvswa",
        "52:54:00:77:07:01",
        "10.77.0.71",
        &bkey,
    );
    assert!(link_in("cvswa", "cvswtapa"));
    seller
        .cli_ok(&["overlay", "detach", "--mac", "52:54:00:77:07:01"])
        .unwrap();
    assert!(!netns_exists("cvswa"));
    // A daemon stopped cleanly takes its lease namespaces along.
    attach(
        &seller,
        "cvswtapa",
        "cvswa",
        "52:54:00:77:07:01",
        "10.77.0.71",
        &bkey,
    );
    let mut seller = seller;
    seller.stop().unwrap();
    assert!(!netns_exists("cvswa"), "SIGTERM left a lease namespace");
}
