//! The Linux test guest (scripts/build-test-guest.sh) and helpers to drive it.
#![allow(dead_code)] // included by several test crates, each using a part

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The built guest's files.
#[derive(Debug, Clone)]
pub struct GuestFiles {
    pub vmlinuz: PathBuf,
    pub vmlinux: PathBuf,
    pub initrd: PathBuf,
    pub rootfs: PathBuf,
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// Builds (or reuses the cached) test guest; panics with the script's message.
pub fn test_guest() -> GuestFiles {
    static FILES: OnceLock<GuestFiles> = OnceLock::new();
    FILES
        .get_or_init(|| {
            let out = target_dir().join("test-guest");
            let script = repo_root().join("scripts/build-test-guest.sh");
            let res = std::process::Command::new("bash")
                .arg(&script)
                .arg(&out)
                .output()
                .expect("run build-test-guest.sh");
            assert!(
                res.status.success(),
                "scripts/build-test-guest.sh failed: {}",
                String::from_utf8_lossy(&res.stderr)
            );
            GuestFiles {
                vmlinuz: out.join("vmlinuz"),
                vmlinux: out.join("vmlinux"),
                initrd: out.join("initrd.cpio.gz"),
                rootfs: out.join("rootfs.ext4"),
            }
        })
        .clone()
}

/// A directory on disk (not tmpfs) for the tests' unlinked disk files.
pub fn scratch_dir() -> PathBuf {
    let d = target_dir().join("test-guest").join("scratch");
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// Standard base64 (the guest's /init decodes `cs.run64=`).
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// A kernel command line that runs `script` in the test guest after its setup.
pub fn cmdline(script: &str, extra: &str) -> String {
    format!(
        "console=ttyS0 quiet panic=-1 {extra} cs.run64={}",
        base64(script.as_bytes())
    )
}

/// The guest's console collected into a string, with waiting for text.
#[derive(Clone)]
pub struct Console {
    buf: Arc<(Mutex<String>, Condvar)>,
}

impl Console {
    /// Takes the guest's console stream and collects it on a thread.
    pub fn follow(guest: &mut dyn vm::Guest) -> Console {
        let rx = guest.take_console().expect("console not taken yet");
        let buf = Arc::new((Mutex::new(String::new()), Condvar::new()));
        let b = buf.clone();
        std::thread::spawn(move || {
            for chunk in rx {
                let mut s = b.0.lock().unwrap();
                s.push_str(&String::from_utf8_lossy(&chunk));
                b.1.notify_all();
            }
        });
        Console { buf }
    }

    pub fn text(&self) -> String {
        self.buf.0.lock().unwrap().clone()
    }

    /// Waits until the console contains `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.buf.0.lock().unwrap();
        loop {
            if s.contains(needle) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = self.buf.1.wait_timeout(s, deadline - now).unwrap().0;
        }
    }
}

/// A serial log sink the test can read back.
pub struct SharedLog(pub Arc<Mutex<Vec<u8>>>);

impl Write for SharedLog {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(super::base64(b""), "");
        assert_eq!(super::base64(b"f"), "Zg==");
        assert_eq!(super::base64(b"fo"), "Zm8=");
        assert_eq!(super::base64(b"foo"), "Zm9v");
        assert_eq!(super::base64(b"foobar"), "Zm9vYmFy");
    }
}
