//! The swarm's TCP sockets as the kernel sees them: each connection's socket is
//! tracked from the transport up, so the node can read what TCP measured
//! (TCP_INFO: smoothed and minimum round trip, bytes acknowledged) and cap how
//! fast the kernel sends on it (SO_MAX_PACING_RATE).
//!
//! Why the kernel's figures: the yielding upload mode backs off when the queue in
//! the owner's modem grows. A round trip TCP measures from its ACKs is exactly
//! that queue plus the path; the application's own chunk acknowledgements add
//! the receiver's scheduling, storage and batching, which on a busy machine are
//! larger than the queue itself. And why the kernel's pacing: a chunk handed to
//! TCP leaves at line rate whatever the application meant, filling the FIFO for
//! as long as it takes; paced, it leaves at the rate asked for.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

use futures::io::{AsyncRead, AsyncWrite};
use libp2p::tcp::tokio::TcpStream;
use tracing::{debug, warn};

/// SO_MAX_PACING_RATE (asm-generic/socket.h; the same on x86-64 and arm64).
const SO_MAX_PACING_RATE: libc::c_int = 47;

/// Unsent bytes a TCP socket may hold (TCP_NOTSENT_LOWAT): small messages
/// then wait behind at most this much queued chunk data, not whole seconds of it.
const UNSENT_LOWAT: libc::c_int = 32 * 1024;

/// One socket's file descriptor while its connection lives. `None` once the
/// stream is dropped: the number may then name another file, never touch it.
#[derive(Debug)]
struct Sock {
    fd: Mutex<Option<RawFd>>,
    /// The pacing rate last set, bytes/s (`u64::MAX`: none).
    pacing: Mutex<u64>,
    /// Bytes acknowledged at the last `measure`.
    acked: Mutex<u64>,
}

/// What TCP measured on one socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpMeasure {
    /// Smoothed round trip, us.
    pub srtt_us: u32,
    /// Least round trip seen, us.
    pub min_rtt_us: u32,
    /// Bytes the peer acknowledged since the connection opened.
    pub bytes_acked: u64,
    /// Bytes acknowledged since the previous `measure`.
    pub acked_delta: u64,
}

/// Every live swarm socket of the node.
#[derive(Debug, Default)]
pub struct Sockets {
    socks: Mutex<Vec<Weak<Sock>>>,
    /// Congestion control asked for on every socket (`[swarm] tcp_congestion`).
    congestion: Option<String>,
}

impl Sockets {
    /// Sockets that ask for `congestion` (none: the system's).
    pub fn new(congestion: Option<String>) -> Self {
        Sockets {
            socks: Mutex::new(Vec::new()),
            congestion,
        }
    }

    /// Wraps a new connection's stream, caps its unsent queue, sets its
    /// congestion control and tracks it.
    pub fn track(&self, s: TcpStream) -> TrackedTcp {
        let fd = s.0.as_raw_fd();
        let lowat = UNSENT_LOWAT.to_ne_bytes();
        if let Err(e) = set_opt(fd, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, &lowat) {
            debug!(error = %e, "TCP_NOTSENT_LOWAT not set");
        }
        if let Some(cc) = &self.congestion {
            // the name was checked against the kernel's list at start
            if let Err(e) = set_opt(fd, libc::IPPROTO_TCP, libc::TCP_CONGESTION, cc.as_bytes()) {
                warn!(error = %e, congestion = cc, "TCP congestion control not set");
            }
        }
        let sock = Arc::new(Sock {
            fd: Mutex::new(Some(fd)),
            pacing: Mutex::new(u64::MAX),
            acked: Mutex::new(0),
        });
        let mut socks = self.socks.lock().expect("sockets lock");
        socks.retain(|w| w.strong_count() > 0);
        socks.push(Arc::downgrade(&sock));
        TrackedTcp { inner: s, sock }
    }

    fn live(&self) -> Vec<Arc<Sock>> {
        let mut socks = self.socks.lock().expect("sockets lock");
        socks.retain(|w| w.strong_count() > 0);
        socks.iter().filter_map(Weak::upgrade).collect()
    }

    /// What TCP measured on every live socket.
    pub fn measure(&self) -> Vec<TcpMeasure> {
        self.live()
            .iter()
            .filter_map(|s| {
                let fd = s.fd.lock().expect("sock lock");
                let mut m = tcp_info(*fd.as_ref()?)?;
                let mut seen = s.acked.lock().expect("sock lock");
                m.acked_delta = m.bytes_acked.saturating_sub(*seen);
                *seen = m.bytes_acked;
                Some(m)
            })
            .collect()
    }

    /// Caps every socket's sending rate at `rate` bytes/s (`None`: no cap).
    /// Only sockets whose cap changes are touched.
    pub fn pace(&self, rate: Option<u64>) {
        let want = rate.map_or(u64::MAX, |r| r.max(1));
        for s in self.live() {
            let mut cur = s.pacing.lock().expect("sock lock");
            if *cur == want {
                continue;
            }
            let fd = s.fd.lock().expect("sock lock");
            if let Some(fd) = *fd {
                // u64::MAX lifts the cap; the kernel takes 32 or 64 bits
                match set_opt(
                    fd,
                    libc::SOL_SOCKET,
                    SO_MAX_PACING_RATE,
                    &want.to_ne_bytes(),
                ) {
                    Ok(()) => *cur = want,
                    Err(e) => debug!(error = %e, "SO_MAX_PACING_RATE not set"),
                }
            }
        }
    }

    /// Live sockets.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.live().len()
    }
}

/// A connection's TCP stream, tracked in [`Sockets`] until dropped.
#[derive(Debug)]
pub struct TrackedTcp {
    inner: TcpStream,
    sock: Arc<Sock>,
}

impl Drop for TrackedTcp {
    fn drop(&mut self) {
        // before `inner` closes the descriptor (fields drop after this runs)
        *self.sock.fd.lock().expect("sock lock") = None;
    }
}

impl AsyncRead for TrackedTcp {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TrackedTcp {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// setsockopt with the option's value as bytes (an int, a u64, a name).
fn set_opt(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &[u8]) -> io::Result<()> {
    // SAFETY: setsockopt on a descriptor the caller holds open (under its lock
    // where it can close), with a pointer to `value` and its length; the kernel
    // copies at most that many bytes.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The congestion control of `fd` (for tests).
#[cfg(test)]
fn congestion_of(fd: RawFd) -> String {
    let mut buf = [0u8; 16];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: getsockopt writing at most `len` bytes into `buf`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0);
    String::from_utf8_lossy(&buf[..len as usize])
        .trim_end_matches('\0')
        .to_string()
}

/// The kernel's TCP_INFO of `fd`; `None` if it refuses (not a TCP socket).
fn raw_tcp_info(fd: RawFd) -> Option<libc::tcp_info> {
    // SAFETY: tcp_info is plain old data (integers only): all zeroes is a value.
    let mut ti: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt on a descriptor the caller holds open (under its lock),
    // writing at most `len` bytes into `ti`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut ti as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(ti)
}

/// What TCP measured on `fd`.
fn tcp_info(fd: RawFd) -> Option<TcpMeasure> {
    let ti = raw_tcp_info(fd)?;
    Some(TcpMeasure {
        srtt_us: ti.tcpi_rtt,
        min_rtt_us: ti.tcpi_min_rtt,
        bytes_acked: ti.tcpi_bytes_acked,
        acked_delta: 0,
    })
}

/// Reads the socket's pacing cap back (for tests).
#[cfg(test)]
fn max_pacing_of(fd: RawFd) -> u64 {
    raw_tcp_info(fd).expect("TCP_INFO").tcpi_max_pacing_rate
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn tracks_measures_paces_and_forgets_a_socket() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
        let (b, _) = b.unwrap();
        let socks = Sockets::default();
        let mut t = socks.track(TcpStream(a.unwrap()));
        let mut b = TcpStream(b);
        t.write_all(&[7u8; 100_000]).await.unwrap();
        let mut got = vec![0u8; 100_000];
        b.read_exact(&mut got).await.unwrap();
        assert!(got.iter().all(|&x| x == 7));
        let m = socks.measure();
        assert_eq!(m.len(), 1);
        // the SYN counts as one byte acknowledged
        assert_eq!(m[0].bytes_acked, 100_001, "{m:?}");
        assert_eq!(m[0].acked_delta, 100_001);
        assert!(m[0].srtt_us > 0 && m[0].min_rtt_us <= m[0].srtt_us, "{m:?}");
        assert_eq!(
            socks.measure()[0].acked_delta,
            0,
            "nothing new acknowledged"
        );

        let fd = t.inner.0.as_raw_fd();
        socks.pace(Some(12_345));
        assert_eq!(max_pacing_of(fd), 12_345);
        socks.pace(None);
        assert_eq!(max_pacing_of(fd), u64::MAX);

        drop(t);
        assert_eq!(socks.len(), 0);
        assert!(socks.measure().is_empty());
    }

    #[tokio::test]
    async fn asks_for_the_configured_congestion_control() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        // reno is built into every Linux kernel
        let t = Sockets::new(Some("reno".into())).track(TcpStream(a));
        assert_eq!(congestion_of(t.inner.0.as_raw_fd()), "reno");
    }
}
