//! Helpers shared by the cross-crate tests: finding the built node binary,
//! network namespaces.

pub mod delay;
pub mod jailcheck;
pub mod market_peer;
pub mod netns;
pub mod node;
pub mod swarm;
pub mod tinyguest;

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Path of the `cpushare-node` binary built in this target directory.
///
/// Integration tests in this package cannot use `CARGO_BIN_EXE_*` for another
/// package's binary, so it is found next to the test executable
/// (`target/<profile>/deps/<test>` -> `target/<profile>/cpushare-node`).
pub fn node_bin() -> PathBuf {
    if let Ok(p) = std::env::var("CPUSHARE_NODE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    let bin = profile_dir.join("cpushare-node");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build -p node` (or `cargo build --workspace --bins`) before the tests",
        bin.display()
    );
    bin
}

/// True when the process runs as root (network namespaces, taps and KVM need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether a test that needs root can run: true as root. Otherwise the test fails
/// when env `CI` is set (CI runs as root, so a skip there would hide a broken setup)
/// and elsewhere prints why it skips and returns false.
pub fn require_root(what: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "needs root ({what}) and CI is set: run the tests as root (sudo bash .ci/run)"
    );
    eprintln!("skipping: needs root ({what})");
    false
}

/// Polls `cond` until it holds or `timeout` has passed; returns whether it held.
/// Tests wait on what they need this way instead of sleeping a guessed time.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}
pub mod overlay;
