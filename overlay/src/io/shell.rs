//! Pieces both I/O shells share: error mapping, the UDP socket, action execution.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use super::batch::{RecvBatch, SendBatch};
use super::spin::{Handoff, Poller, Spin, Wake, HANDBACK};
use super::sys;
use crate::{Action, Actions, Error, Event};

/// Map an OS error to the crate error, with what we were doing.
pub fn os(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    move |e| {
        let what = what.into();
        if e.kind() == io::ErrorKind::PermissionDenied || e.raw_os_error() == Some(libc::EPERM) {
            Error::NeedNetAdmin(format!("{what} ({e})"))
        } else if e.kind() == io::ErrorKind::NotFound && e.to_string().contains("/dev/net/tun") {
            Error::NoTunDevice
        } else {
            Error::Io { what, source: e }
        }
    }
}

/// Datagrams per recvmmsg/sendmmsg.
pub const UDP_BATCH: usize = 64;
/// Largest overlay datagram we send or accept (a full jumbo-less frame + overhead).
pub const UDP_SLOT: usize = 2048;
/// Receive slot when the kernel may coalesce datagrams (UDP GRO).
pub const UDP_GRO_SLOT: usize = 65536;
/// Pause after a failed receive or wait before a loop tries again.
pub const POLL_MS: u64 = 100;
/// A parked thread wakes this often with nothing to do. Only a safety net: whatever
/// it waits for rings its doorbell (stopping included), so an idle overlay costs a
/// wake-up per thread per second, not ten.
pub const PARK_MS: i32 = 1000;
/// Timer threads call the core's `tick` this often (it asks for at least once a
/// second); stopping unparks them at once.
pub const TICK: std::time::Duration = std::time::Duration::from_millis(500);

/// A thread's way out: its action queue and UDP send batch. One per thread, shared by
/// both directions it serves, so a light round trip touches one of each.
pub struct Sending {
    pub out: Actions,
    pub tx: SendBatch,
}

impl Sending {
    /// `connected`: the peer of a connected UDP socket (sent to without an address).
    pub fn new(connected: Option<SocketAddr>) -> Sending {
        let mut tx = SendBatch::new(UDP_BATCH, UDP_SLOT);
        tx.set_gso(true);
        tx.set_connected(connected);
        Sending {
            out: Actions::new(),
            tx,
        }
    }
}

/// Receive one batch of overlay datagrams without blocking: `Some(count)` when any
/// arrived, `None` when none was queued. A receive error is logged and followed by a
/// short pause.
pub fn recv_udp(rx: &mut RecvBatch, fd: std::os::fd::RawFd, side: &str) -> Option<usize> {
    match rx.recv_nowait(fd) {
        Ok(0) => None,
        Ok(n) => Some(n),
        Err(e) => {
            tracing::warn!(error = %e, side, "overlay UDP receive failed");
            std::thread::sleep(std::time::Duration::from_millis(POLL_MS));
            None
        }
    }
}

/// Park on the poller's fds (see [`Wake::park`]) and return the readable ones; a
/// failed wait is logged and paused on.
pub fn park(wake: &Wake, poller: &mut Poller, still: impl Fn() -> bool, side: &str) -> u32 {
    match wake.park(poller, PARK_MS, still) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, side, "overlay wait failed");
            std::thread::sleep(std::time::Duration::from_millis(POLL_MS));
            0
        }
    }
}

/// The epoll sets of a side's two threads: the home thread watches `home_fds`; the
/// helper watches `handed` (one of them), off until the home thread hands it over.
pub fn pollers(
    home_fds: &[std::os::fd::RawFd],
    handed: std::os::fd::RawFd,
    home: &Wake,
    helper: &Wake,
) -> Result<(Poller, Poller), Error> {
    let home_poller = Poller::new(home_fds, home).map_err(os("creating an epoll set"))?;
    let mut helper_poller = Poller::new(&[handed], helper).map_err(os("creating an epoll set"))?;
    helper_poller
        .watch(0, false)
        .map_err(os("setting up an epoll set"))?;
    Ok((home_poller, helper_poller))
}

/// Who a helper thread answers to (see [`super::spin::Handoff`]).
pub struct HelperDuty<'a> {
    pub stop: &'a AtomicBool,
    pub handoff: &'a Handoff,
    /// The helper's own doorbell.
    pub me: &'a Wake,
    /// The home thread's doorbell, rung when the direction goes back to it.
    pub home: &'a Wake,
    pub side: &'a str,
}

/// A helper thread: while the home thread has handed it the direction (fd 0 of
/// `poller`), `serve` it (returns frames moved); hand it back after [`HANDBACK`]
/// without input; otherwise sleep on the doorbell alone.
pub fn run_helper(d: HelperDuty<'_>, mut poller: Poller, mut serve: impl FnMut() -> usize) {
    let mut last = Instant::now();
    let mut watching = false;
    while !d.stop.load(Ordering::Relaxed) {
        let active = d.handoff.helper();
        if active != watching && poller.watch(0, active).is_ok() {
            watching = active;
        }
        if !active {
            park(d.me, &mut poller, || !d.handoff.helper(), d.side);
            last = Instant::now();
            continue;
        }
        let n = serve();
        let now = Instant::now();
        if n > 0 {
            last = now;
        } else if now.duration_since(last) >= HANDBACK {
            d.handoff.to_home(d.home);
        } else {
            park(d.me, &mut poller, || d.handoff.helper(), d.side);
        }
    }
}

/// Stop a side's threads: set the flag they check before every wait, get them out of
/// the wait they are in (doorbells for the data threads, `unpark` for the timer
/// thread) and join them.
pub fn stop_threads(
    stop: &AtomicBool,
    wakes: &[&Wake],
    threads: &mut Vec<std::thread::JoinHandle<()>>,
) {
    stop.store(true, Ordering::SeqCst);
    for w in wakes {
        w.interrupt();
    }
    for t in threads.iter() {
        t.thread().unpark();
    }
    for t in threads.drain(..) {
        let _ = t.join();
    }
}

/// What a home thread serves next: the fds whose batch came back full (`full`: more
/// is likely queued); else, while `spin` says an answer is due, whatever is ready now
/// (yielding the CPU if nothing is); else it parks until something is. Parking at once
/// matters on a shared CPU: the peer cannot answer before we get off it. `now` is the
/// caller's clock reading for this pass.
pub fn next_ready(
    full: u32,
    now: Instant,
    spin: &mut Spin,
    poller: &mut Poller,
    wake: &Wake,
    still: impl Fn() -> bool,
    side: &str,
) -> u32 {
    if full != 0 {
        return full;
    }
    if spin.spinning(now) {
        let r = ready_now(poller);
        if r == 0 {
            super::spin::yield_now();
        }
        return r;
    }
    park(wake, poller, still, side)
}

/// Readable fds of `poller` without waiting (a failed check reads as "all").
pub fn ready_now(poller: &mut Poller) -> u32 {
    poller.wait(0).unwrap_or(u32::MAX)
}

/// Hand every datagram of the first `n` slots (GRO-coalesced ones split back) to `f`.
pub fn each_datagram(rx: &RecvBatch, n: usize, mut f: impl FnMut(SocketAddr, &[u8])) {
    for i in 0..n {
        if let Some(from) = rx.addr(i) {
            for d in rx.segments(i) {
                f(from, d);
            }
        }
    }
}

/// Bind the overlay UDP socket with large buffers and a receive timeout.
pub fn bind_udp(addr: SocketAddr) -> Result<UdpSocket, Error> {
    let s = UdpSocket::bind(addr).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            Error::PortInUse(addr)
        } else if e.kind() == io::ErrorKind::AddrNotAvailable {
            Error::InvalidConfig(format!(
                "cannot bind UDP {addr}: that address is not configured on this host"
            ))
        } else {
            os(format!("binding UDP {addr}"))(e)
        }
    })?;
    sys::set_socket_buffers(s.as_raw_fd(), 16 << 20);
    sys::set_recv_timeout(s.as_raw_fd(), POLL_MS).map_err(os("setting SO_RCVTIMEO"))?;
    Ok(s)
}

/// Counters of the I/O shell itself (not the core's drop reasons).
#[derive(Debug, Default)]
pub struct IoCounters {
    /// Frames a tap or guest port refused to take.
    pub write_errors: AtomicU64,
    /// Frames whose offload metadata could not be honoured (passed to the filter as-is).
    pub offload_errors: AtomicU64,
}

impl IoCounters {
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Log a core event with the ids it carries.
pub fn log_event(e: &Event) {
    match e {
        Event::SessionEstablished {
            peer,
            guest_mac,
            endpoint,
            rekey,
        } => {
            tracing::info!(peer = %hex::encode(peer.as_bytes()), %guest_mac, %endpoint, rekey, "overlay session established")
        }
        Event::SessionExpired { peer, guest_mac } => {
            tracing::warn!(peer = %hex::encode(peer.as_bytes()), %guest_mac, "overlay session expired")
        }
        Event::EndpointChanged {
            peer,
            guest_mac,
            endpoint,
        } => {
            tracing::info!(peer = %hex::encode(peer.as_bytes()), %guest_mac, %endpoint, "overlay peer endpoint changed")
        }
        Event::HandshakeInitiated { to, attempt } => {
            tracing::debug!(%to, attempt, "overlay handshake initiated")
        }
        // An unknown key is what an operator needs to see (a missing `overlay admit`);
        // handshakes are rate-limited, so this cannot flood the log.
        Event::HandshakeRejected {
            from,
            error: error @ crate::Error::NotAdmitted { .. },
        } => tracing::warn!(%from, %error, "overlay handshake from an unknown peer"),
        Event::HandshakeRejected { from, error } => {
            tracing::debug!(%from, %error, "overlay handshake rejected")
        }
        Event::DhcpAck { guest_mac, ip } => tracing::info!(%guest_mac, %ip, "overlay DHCP ack"),
    }
}

/// Where a shell's actions go. Frames for the tap/guest are handed to `frame`.
pub fn run_actions(
    out: &mut Actions,
    udp_fd: std::os::fd::RawFd,
    udp: &mut SendBatch,
    mut frame: impl FnMut(&[u8]),
) {
    while let Some(a) = out.pop() {
        match a {
            Action::SendUdp { to, bytes } => {
                if udp.is_full() {
                    let _ = udp.flush(udp_fd);
                }
                udp.push(Some(to), |b| {
                    let l = bytes.len().min(b.len());
                    b[..l].copy_from_slice(&bytes[..l]);
                    l
                });
                out.recycle(bytes);
            }
            Action::WriteTap(f) | Action::DeliverToGuest(f) => {
                frame(&f);
                out.recycle(f);
            }
            Action::Event(e) => log_event(&e),
        }
    }
}
