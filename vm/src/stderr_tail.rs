//! The last few KiB a VMM process wrote to stderr, kept for the error a user reads
//! when it fails (qemu's complaint, our VMM's panic message).

use std::io::Read;
use std::process::ChildStderr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// How much of the end of stderr is kept.
const KEEP: usize = 16 * 1024;

/// Reads a child's stderr on a thread of its own until the child closes it.
pub(crate) struct StderrTail {
    buf: Arc<Mutex<Vec<u8>>>,
    thread: Option<JoinHandle<()>>,
}

impl StderrTail {
    /// Follow `err` (nothing to follow when the child's stderr was not piped).
    pub(crate) fn follow(err: Option<ChildStderr>) -> StderrTail {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let thread = err.map(|mut err| {
            let buf = buf.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = err.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    let mut b = buf.lock().unwrap_or_else(|p| p.into_inner());
                    b.extend_from_slice(&chunk[..n]);
                    let excess = b.len().saturating_sub(KEEP);
                    b.drain(..excess);
                }
            })
        });
        StderrTail { buf, thread }
    }

    /// What was kept so far, trimmed.
    pub(crate) fn text(&self) -> String {
        let b = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&b).trim().to_string()
    }

    /// Wait until the child has closed stderr (call once it has been reaped).
    pub(crate) fn finish(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The last non-empty line of `s` (all of `s` when it has none).
pub(crate) fn last_line(s: &str) -> &str {
    s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn keeps_the_end_of_what_a_child_wrote() {
        let mut child = Command::new("sh")
            .args([
                "-c",
                "head -c 40000 /dev/zero | tr '\\0' x; echo; echo 'the reason' >&2",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut tail = StderrTail::follow(child.stderr.take());
        child.wait().unwrap();
        tail.finish();
        assert_eq!(last_line(&tail.text()), "the reason");
        assert!(tail.text().len() <= KEEP);
    }

    #[test]
    fn last_line_skips_blank_ones() {
        assert_eq!(last_line("a\nb\n\n  \n"), "b");
        assert_eq!(last_line(""), "");
    }
}
