//! Helpers for the swarm tests: a buyer and sellers on loopback, images, counters.

use std::net::TcpListener;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rand::{RngCore, SeedableRng};
use serde_json::Value;

use crate::node::NodeProc;

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A running daemon with its libp2p address.
pub struct Peer {
    pub proc: NodeProc,
    pub addr: String,
}

impl Peer {
    /// `/ip4/127.0.0.1/tcp/PORT/p2p/ID`, for `--bootstrap`.
    pub fn p2p_addr(&self) -> String {
        format!("{}/p2p/{}", self.addr, self.proc.peer_id)
    }
}

/// The test-fault switch of a scripted bad peer (`CPUSHARE_TEST_FAULT=...` in `env`).
const FAULT_ENV: &str = "CPUSHARE_TEST_FAULT=";

/// Starts a daemon on loopback. `env` entries (`K=V`) are set for it only (the
/// test-fault switch of a scripted bad peer goes here: the daemon must then show
/// the fault in `status`, which only a build with the `test-faults` feature does).
pub fn spawn(dir: &Path, role: &str, bootstrap: &[String], env: &[&str]) -> Result<Peer> {
    let addr = format!("/ip4/127.0.0.1/tcp/{}", free_port());
    let mut extra: Vec<String> = vec!["--listen".into(), addr.clone()];
    for b in bootstrap {
        extra.push("--bootstrap".into());
        extra.push(b.clone());
    }
    let extra_ref: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut wrap = Vec::new();
    if !env.is_empty() {
        wrap.push("env");
        wrap.extend_from_slice(env);
    }
    let proc = NodeProc::spawn(&wrap, dir, role, &extra_ref)?;
    if let Some(fault) = env.iter().find_map(|e| e.strip_prefix(FAULT_ENV)) {
        let shown = proc.status()?["p2p"]["test_fault"].clone();
        if shown != fault {
            bail!(
                "the daemon does not inject {fault:?} (status shows {shown}): \
                 {} was built without the `test-faults` feature; build it with \
                 `cargo build -p node --features test-faults` (a workspace build with \
                 the tests, as CI does, turns it on)",
                crate::node_bin().display()
            );
        }
    }
    Ok(Peer { proc, addr })
}

/// Writes `len` pseudo-random bytes (from `seed`) to `path`.
pub fn random_file(path: &Path, len: usize, seed: u64) -> Result<Vec<u8>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; len];
    rng.fill_bytes(&mut data);
    std::fs::write(path, &data).with_context(|| format!("writing {}", path.display()))?;
    Ok(data)
}

/// `image import --public FILE` on `node`; returns the image id. Public: the
/// swarm tests fetch without grants (images are private by default; the privacy
/// test, tests/image_privacy.rs, imports its own).
pub fn import(node: &Peer, file: &Path) -> Result<String> {
    let out = node.proc.cli_ok(&[
        "image",
        "import",
        "--public",
        file.to_str().expect("utf-8 path"),
    ])?;
    let id = out
        .split_whitespace()
        .find(|w| w.len() == 64 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .map(str::to_string);
    match id {
        Some(id) => Ok(id),
        None => bail!("no image id in import output: {out}"),
    }
}

/// `image fetch ID` on `node`; returns the fetch report (JSON on the last line).
pub fn fetch(node: &Peer, id: &str) -> Result<Value> {
    let out = node.proc.cli_ok(&["image", "fetch", id])?;
    let last = out
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or("");
    serde_json::from_str(last).with_context(|| format!("fetch output: {out}"))
}

/// Exports image `id` from `node` into `dir` and returns the bytes.
pub fn export(node: &Peer, id: &str, dir: &Path, name: &str) -> Result<Vec<u8>> {
    let dest: PathBuf = dir.join(name);
    node.proc
        .cli_ok(&["image", "export", id, dest.to_str().expect("utf-8 path")])?;
    Ok(std::fs::read(&dest)?)
}

/// The `p2p.images[id]` counters of `node`'s status.
pub fn image_stats(node: &Peer, id: &str) -> Result<Value> {
    let s = node.proc.status()?;
    Ok(s["p2p"]["images"][id].clone())
}

/// Polls `status` until the image counters satisfy `f` or `secs` pass.
pub fn wait_stats(
    node: &Peer,
    id: &str,
    secs: u64,
    mut f: impl FnMut(&Value) -> bool,
) -> Result<Value> {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let v = image_stats(node, id)?;
        if f(&v) {
            return Ok(v);
        }
        if std::time::Instant::now() > end {
            bail!("condition not reached in {secs} s; last counters {v}");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// u64 field of a JSON object, 0 when absent.
pub fn num(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}
