//! What the seller learns about the guest's interface (the tap a VMM holds, or a veth
//! end) beyond the frames: which offloads the VMM turned on, and where frames were
//! lost on the way (tap queues, the guest port's socket buffer, refused sends).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::{DropReason, SellerCore};

const IFNAMSIZ: usize = 16;

const SIOCETHTOOL: libc::c_ulong = 0x8946;
/// Returns a socket's network namespace as a new fd.
const SIOCGSKNS: libc::c_ulong = 0x894c;
const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_GTSO: u32 = 0x1e;
const PACKET_STATISTICS: libc::c_int = 6;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// `struct ifreq` with its union used as `ifr_data`.
#[repr(C)]
struct IfReqData {
    name: [u8; IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

#[repr(C)]
#[derive(Default)]
struct TpacketStats {
    tp_packets: u32,
    tp_drops: u32,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// One ethtool flag of `ifname`, asked through `fd` (any socket in its namespace).
fn ethtool_flag(fd: RawFd, ifname: &str, cmd: u32) -> io::Result<bool> {
    if ifname.is_empty() || ifname.len() >= IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {ifname:?} is not 1 to 15 bytes"),
        ));
    }
    let mut v = EthtoolValue { cmd, data: 0 };
    let mut req = IfReqData {
        name: [0; IFNAMSIZ],
        data: &mut v as *mut EthtoolValue as *mut libc::c_void,
        _pad: [0; 16],
    };
    req.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
    // SAFETY: SIOCETHTOOL reads the ifreq and writes one ethtool_value through
    // ifr_data; both live on this stack frame for the call.
    cvt(unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut req as *mut IfReqData) })?;
    Ok(v.data != 0)
}

/// Whether frames to `ifname` may be TCP superframes: the device takes TCPv4
/// segmentation and checksum offload. A tap has them only while the VMM holding it
/// asked for them (vnet header and `TUNSETOFFLOAD`); without, the kernel drops every
/// superframe sent to it.
pub fn takes_tso4(fd: RawFd, ifname: &str) -> bool {
    ethtool_flag(fd, ifname, ETHTOOL_GTSO).unwrap_or(false)
        && ethtool_flag(fd, ifname, ETHTOOL_GTXCSUM).unwrap_or(false)
}

/// Frames the packet socket `fd` had no room for since the last call (the kernel
/// resets the count on reading).
fn socket_drops(fd: RawFd) -> io::Result<u64> {
    let mut st = TpacketStats::default();
    let mut len = std::mem::size_of::<TpacketStats>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `st`, which lives for the call.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_PACKET,
            PACKET_STATISTICS,
            &mut st as *mut TpacketStats as *mut libc::c_void,
            &mut len,
        )
    })?;
    Ok(st.tp_drops as u64)
}

/// `/proc/net/dev` of the namespace the socket `fd` lives in. The open file stays
/// bound to that namespace, so it can be read again from any thread.
fn open_net_dev(fd: RawFd) -> io::Result<File> {
    // SAFETY: SIOCGSKNS takes no argument and returns a new fd, owned right away.
    let ns = cvt(unsafe { libc::ioctl(fd, SIOCGSKNS as _) })?;
    // SAFETY: ns was just returned by SIOCGSKNS and is owned by nobody else.
    let ns = unsafe { OwnedFd::from_raw_fd(ns) };
    std::thread::Builder::new()
        .name("ovl-netdev".into())
        .spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(io::Error::from)?;
            File::open("/proc/thread-self/net/dev")
        })?
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
}

/// (rx_dropped, tx_dropped) of `ifname` in a `/proc/net/dev` text.
pub fn parse_net_dev(text: &str, ifname: &str) -> Option<(u64, u64)> {
    text.lines().find_map(|l| {
        let (name, rest) = l.split_once(':')?;
        if name.trim() != ifname {
            return None;
        }
        let v: Vec<u64> = rest
            .split_whitespace()
            .map(|w| w.parse().ok())
            .collect::<Option<_>>()?;
        // rx: bytes packets errs drop ...(8 fields), then tx: bytes packets errs drop.
        Some((*v.get(3)?, *v.get(11)?))
    })
}

/// Losses on the guest's path, shared by the seller's threads. Sends are counted as
/// they fail; the rest is read from the kernel by [`GuestPath::losses`].
#[derive(Debug)]
pub struct GuestPath {
    ifname: String,
    /// Frames to the guest its port refused (not yet moved into the core's counters).
    send_failed: AtomicU64,
    /// All of them, for telling the tap's own drops apart.
    send_failed_total: AtomicU64,
    /// Frames to the guest may be merged into TCP superframes.
    merge: AtomicBool,
    state: std::sync::Mutex<PathState>,
}

#[derive(Debug, Default)]
struct PathState {
    net_dev: Option<File>,
    /// Tap counters at the last reading (None: not read yet).
    last: Option<(u64, u64)>,
    /// The tap's tx drops since the start.
    tx_total: u64,
    /// The part of them not explained by refused sends, as reported so far.
    tap_only_tx: u64,
}

impl GuestPath {
    /// Start watching `ifname` through the guest port's socket `fd`.
    pub fn new(fd: RawFd, ifname: &str) -> GuestPath {
        let net_dev = open_net_dev(fd)
            .inspect_err(|e| {
                tracing::warn!(error = %e, ifname, "cannot read the guest interface's counters; tap drops will not be counted")
            })
            .ok();
        let p = GuestPath {
            ifname: ifname.to_string(),
            send_failed: AtomicU64::new(0),
            send_failed_total: AtomicU64::new(0),
            merge: AtomicBool::new(takes_tso4(fd, ifname)),
            state: std::sync::Mutex::new(PathState {
                net_dev,
                ..Default::default()
            }),
        };
        // Start the tap's counters from here: earlier drops were not ours.
        p.tap_counters(&mut p.lock());
        p
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PathState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether frames to the guest may be merged into TCP superframes now.
    pub fn merge(&self) -> bool {
        self.merge.load(Ordering::Relaxed)
    }

    /// Read the interface's offload flags again (the VMM may change them at any time,
    /// e.g. when the guest's driver starts). Returns whether merging is allowed.
    pub fn refresh_offloads(&self, fd: RawFd) -> bool {
        let m = takes_tso4(fd, &self.ifname);
        if self.merge.swap(m, Ordering::Relaxed) != m {
            tracing::info!(ifname = %self.ifname, tso = m, "guest interface offloads changed");
        }
        m
    }

    /// `n` frames to the guest were refused by the port.
    pub fn send_failed(&self, n: u64) {
        if n > 0 {
            self.send_failed.fetch_add(n, Ordering::Relaxed);
            self.send_failed_total.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn tap_counters(&self, st: &mut PathState) -> Option<(u64, u64)> {
        let f = st.net_dev.as_mut()?;
        let mut text = String::new();
        f.seek(SeekFrom::Start(0)).ok()?;
        f.read_to_string(&mut text).ok()?;
        let now = parse_net_dev(&text, &self.ifname)?;
        let before = st.last.replace(now);
        let base = before.unwrap_or(now);
        Some((now.0.saturating_sub(base.0), now.1.saturating_sub(base.1)))
    }

    /// Every loss seen since the last call, by reason: refused sends, the guest
    /// port's socket overflow, and the tap's own drops both ways (its tx drops less
    /// those the refused sends already account for). Reads the kernel's counters, so
    /// call it without the core's lock and hand the result to [`Losses::count`].
    pub fn losses(&self, fd: RawFd) -> Losses {
        let mut l = Losses::default();
        l.0[0] = (
            DropReason::ToGuestSendFailed,
            self.send_failed.swap(0, Ordering::Relaxed),
        );
        l.0[1] = (
            DropReason::FromGuestSocketOverflow,
            socket_drops(fd).unwrap_or(0),
        );
        let mut st = self.lock();
        let Some((rx_drop, tx_drop)) = self.tap_counters(&mut st) else {
            return l;
        };
        l.0[2] = (DropReason::FromGuestTapDropped, rx_drop);
        st.tx_total += tx_drop;
        let only = st
            .tx_total
            .saturating_sub(self.send_failed_total.load(Ordering::Relaxed));
        if only > st.tap_only_tx {
            l.0[3] = (DropReason::ToGuestTapDropped, only - st.tap_only_tx);
            st.tap_only_tx = only;
        }
        l
    }
}

/// Losses on the guest's path by reason (see [`GuestPath::losses`]).
#[derive(Debug, Clone, Copy)]
pub struct Losses([(DropReason, u64); 4]);

impl Default for Losses {
    fn default() -> Losses {
        Losses([(DropReason::ToGuestSendFailed, 0); 4])
    }
}

impl Losses {
    /// Add them to `core`'s drop counters.
    pub fn count(&self, core: &mut SellerCore) {
        for (r, n) in self.0 {
            core.count_path_drops(r, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SAMPLE: &str = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0
 gtap0: 1234567    4321    0    7    0     0          0         0  7654321    9876    0   42    0     0       0          0
";

    #[test]
    fn reads_drop_counters_of_one_interface() {
        assert_eq!(parse_net_dev(SAMPLE, "gtap0"), Some((7, 42)));
        assert_eq!(parse_net_dev(SAMPLE, "lo"), Some((0, 0)));
        assert_eq!(parse_net_dev(SAMPLE, "gtap"), None);
        assert_eq!(parse_net_dev("gtap0: 1 2 3", "gtap0"), None);
    }

    proptest! {
        #[test]
        fn net_dev_parser_never_panics(text in ".{0,400}", name in "[a-z0-9]{1,15}") {
            let _ = parse_net_dev(&text, &name);
        }
    }
}
