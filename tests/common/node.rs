//! Running `cpushare-node` daemons and client commands from tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::node_bin;

/// A daemon process, killed (SIGKILL) on drop.
pub struct NodeProc {
    child: Option<Child>,
    pub data_dir: PathBuf,
    pub peer_id: String,
}

impl NodeProc {
    /// Start `cpushare-node --role ROLE --data-dir DIR EXTRA...` and wait until its
    /// control socket answers. `wrap` runs it under another command first
    /// (e.g. `["ip", "netns", "exec", "ns1"]`); pass `&[]` for none.
    pub fn spawn(wrap: &[&str], data_dir: &Path, role: &str, extra: &[&str]) -> Result<NodeProc> {
        std::fs::create_dir_all(data_dir)?;
        let bin = node_bin();
        let mut cmd = match wrap.split_first() {
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.arg("--role")
            .arg(role)
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::File::create(data_dir.join("daemon.log"))
                    .context("creating daemon.log")?,
            ));
        let mut child = cmd.spawn().context("spawning cpushare-node")?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(id) = line.strip_prefix("peer id: ") {
                    let _ = tx.send(id.trim().to_string());
                }
            }
        });
        let mut node = NodeProc {
            child: Some(child),
            data_dir: data_dir.to_path_buf(),
            peer_id: String::new(),
        };
        node.peer_id = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(id) => id,
            Err(_) => bail!(
                "daemon in {} printed no peer id; log:\n{}",
                data_dir.display(),
                node.log()
            ),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self::cli(data_dir, &["status", "--json"])?.status.success() {
                return Ok(node);
            }
            if let Some(st) = node
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("daemon exited with {st}; log:\n{}", node.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("daemon control socket never answered; log:\n{}", node.log())
    }

    /// The daemon's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("daemon.log")).unwrap_or_default()
    }

    /// Run a client subcommand against this daemon.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        cli(&self.data_dir, args)
    }

    /// Run a client subcommand that must succeed; returns its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args)?;
        if !out.status.success() {
            bail!(
                "cpushare-node {} failed: {}\ndaemon log:\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim(),
                self.log()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `status --json` parsed.
    pub fn status(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.cli_ok(&["status", "--json"])?)?)
    }

    /// SIGKILL the daemon and wait for it (a crash at an arbitrary moment).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let st = c.wait()?;
            if !st.success() {
                bail!("daemon exited with {st}; log:\n{}", self.log());
            }
        }
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Run `cpushare-node --data-dir DIR ARGS...` as a client.
pub fn cli(data_dir: &Path, args: &[&str]) -> Result<Output> {
    Command::new(node_bin())
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running cpushare-node")
}
