//! Network namespaces and veth pairs for multi-host tests.
//!
//! Every object created here is removed on drop, also when a test panics.
//! Callers pass names that carry their own prefix so parallel tests don't collide.

use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context, Result};

/// Run `ip` with arguments, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    run("ip", args)
}

/// Run a command to completion, failing with its stderr on a non-zero exit.
pub fn run(prog: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {prog}"))?;
    if !out.status.success() {
        bail!(
            "{prog} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A network namespace deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Create `name` (deleting a stale one left by a crashed run first) and bring `lo` up.
    pub fn new(name: &str) -> Result<Self> {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A `Command` that runs `prog` inside this namespace.
    pub fn command(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, prog]);
        c
    }

    /// Run `prog args` inside the namespace, failing on a non-zero exit.
    pub fn exec(&self, prog: &str, args: &[&str]) -> Result<Output> {
        let out = self
            .command(prog)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {prog} in netns {}", self.name))?;
        if !out.status.success() {
            bail!(
                "{prog} {} in netns {} failed: {}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }

    /// `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        self.exec("ip", args).map(|_| ())
    }

    /// Set a sysctl inside the namespace (e.g. `net.ipv6.conf.all.disable_ipv6=1`).
    pub fn sysctl(&self, kv: &str) -> Result<()> {
        self.exec("sysctl", &["-qw", kv]).map(|_| ())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Join two namespaces with a veth pair. `addr_a`/`addr_b` are CIDRs or empty for none.
/// Both ends are brought up. The pair disappears with either namespace.
pub fn veth(
    a: &Netns,
    if_a: &str,
    addr_a: &str,
    b: &Netns,
    if_b: &str,
    addr_b: &str,
) -> Result<()> {
    ip(&[
        "link",
        "add",
        if_a,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        if_b,
        "netns",
        b.name(),
    ])?;
    for (ns, ifname, addr) in [(a, if_a, addr_a), (b, if_b, addr_b)] {
        if !addr.is_empty() {
            ns.ip(&["addr", "add", addr, "dev", ifname])?;
        }
        ns.ip(&["link", "set", ifname, "up"])?;
    }
    Ok(())
}
