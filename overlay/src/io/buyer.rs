//! The buyer's I/O shell: one UDP socket for every guest session, the host tap, and
//! three threads (UDP, tap helper for bulk host traffic, timers) driving one
//! [`BuyerCore`].

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::batch::RecvBatch;
use super::offload::{self, TcpMerger, VnetHdr, VNET_HDR_LEN};
use super::shell::{self, os, IoCounters, Sending, TICK, UDP_BATCH, UDP_GRO_SLOT};
use super::spin::{self, Handoff, Poller, Spin, Wake};
use super::sys;
use super::tap::{Tap, TapOptions};
use crate::stats::BuyerStats;
use crate::{Admission, BuyerCore, Error, MacAddr, PeerKey};

/// Where and how the buyer listens.
#[derive(Debug, Clone)]
pub struct BuyerIoConfig {
    /// UDP address sellers connect to.
    pub listen: SocketAddr,
    /// Name of the host tap (created here, in the caller's network namespace).
    pub tap_name: String,
    /// Overlay prefix length of the host address (the address is the core's `host_ip`).
    pub prefix: u8,
    /// Let the kernel hand the tap TCP bursts we segment ourselves.
    pub tap_offload: bool,
    /// Busy-poll budget (see [`super::spin`]); zero turns busy-polling off.
    pub busy_poll: Duration,
}

impl BuyerIoConfig {
    pub fn new(listen: SocketAddr, tap_name: &str) -> BuyerIoConfig {
        BuyerIoConfig {
            listen,
            tap_name: tap_name.to_string(),
            prefix: 16,
            tap_offload: true,
            busy_poll: spin::DEFAULT_BUDGET,
        }
    }
}

/// A running buyer overlay. Dropping it stops the threads and removes the tap.
pub struct Buyer {
    /// What the threads share (the core and counters too); kept to stop them.
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    local: SocketAddr,
    tap_name: String,
}

fn lock(m: &Mutex<BuyerCore>) -> MutexGuard<'_, BuyerCore> {
    // A panic in one shell thread must not wedge the others' access to counters.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Check that `ip/prefix` does not collide with an address already on this host.
fn check_conflict(tap: &str, ip: Ipv4Addr, prefix: u8) -> Result<(), Error> {
    let mask = |p: u8| {
        if p == 0 {
            0
        } else {
            u32::MAX << (32 - p as u32)
        }
    };
    for (dev, other, op) in sys::ipv4_addrs_except(tap).map_err(os("listing host addresses"))? {
        let m = mask(prefix.min(op));
        if u32::from(other) & m == u32::from(ip) & m && !other.is_loopback() {
            return Err(Error::AddressConflict(format!(
                "overlay address {ip}/{prefix} overlaps {other}/{op} on {dev}; pick another overlay subnet"
            )));
        }
    }
    Ok(())
}

impl Buyer {
    /// Create the tap (address = the core's `host_ip`, MAC = its `host_mac`), bind the
    /// UDP socket and start the threads.
    pub fn start(core: BuyerCore, cfg: BuyerIoConfig) -> Result<Buyer, Error> {
        let host_ip = core.config().host_ip;
        let host_mac = core.config().host_mac;
        let mtu = core.config().guest_mtu;
        let udp = shell::bind_udp(cfg.listen)?;
        check_conflict(&cfg.tap_name, host_ip, cfg.prefix)?;
        let local = udp.local_addr().map_err(os("reading the UDP address"))?;
        let tap = Tap::create(
            &cfg.tap_name,
            TapOptions {
                offload: cfg.tap_offload,
            },
        )
        .map_err(os(format!("creating tap {}", cfg.tap_name)))?;
        let name = cfg.tap_name.clone();
        sys::set_mac(&name, host_mac.0).map_err(os(format!("setting the MAC of {name}")))?;
        sys::set_mtu(&name, mtu as u32).map_err(os(format!("setting the MTU of {name}")))?;
        sys::set_ipv4(&name, host_ip, cfg.prefix)
            .map_err(os(format!("adding {host_ip}/{} to {name}", cfg.prefix)))?;
        // The host itself speaks only IPv4/ARP on the overlay (guests whose leases
        // allow IPv6 reach each other through the switch); keep it quiet on IPv6.
        let _ = sys::write_net_sysctl(&format!("ipv6/conf/{name}/disable_ipv6"), "1");
        sys::set_up(&name, true).map_err(os(format!("bringing {name} up")))?;

        let core = Arc::new(Mutex::new(core));
        let counters = Arc::new(IoCounters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let udp = Arc::new(udp);
        tap.set_nonblocking(true)
            .map_err(os(format!("making {name} non-blocking")))?;
        let tap = Arc::new(tap);
        let shared = Arc::new(Shared {
            core,
            stop: stop.clone(),
            c: counters,
            udp,
            tap,
            reader: Mutex::new(TapReader::new()),
            handoff: Handoff::default(),
            home: Wake::new().map_err(os("creating an eventfd"))?,
            helper: Wake::new().map_err(os("creating an eventfd"))?,
            budget: cfg.busy_poll,
        });
        let mut threads = Vec::new();
        let spawn = |n: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(n.to_string())
                .spawn(f)
                .map_err(os("spawning an overlay thread"))
        };
        let (ufd, tfd) = (shared.udp.as_raw_fd(), shared.tap.as_raw_fd());
        // The home thread serves both until bulk arrives.
        let (home_poller, helper_poller) =
            shell::pollers(&[ufd, tfd], tfd, &shared.home, &shared.helper)?;
        let sh = shared.clone();
        threads.push(spawn(
            "ovl-buyer-udp",
            Box::new(move || home_loop(&sh, home_poller)),
        )?);
        let sh = shared.clone();
        threads.push(spawn(
            "ovl-buyer-tap",
            Box::new(move || helper_loop(&sh, helper_poller)),
        )?);
        let sh = shared.clone();
        threads.push(spawn("ovl-buyer-tick", Box::new(move || tick_loop(&sh)))?);
        tracing::info!(%local, tap = %cfg.tap_name, %host_ip, "buyer overlay up");
        Ok(Buyer {
            shared,
            threads,
            local,
            tap_name: cfg.tap_name,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn tap_name(&self) -> &str {
        &self.tap_name
    }

    pub fn public_key(&self) -> PeerKey {
        lock(&self.shared.core).public_key()
    }

    pub fn admit(&self, peer: PeerKey, mac: MacAddr, ip: Ipv4Addr) -> Result<(), Error> {
        lock(&self.shared.core).admit(peer, mac, ip)
    }

    /// Admits a guest with its whole lease (IPv6 allowed or not, its IPv6 address):
    /// see [`BuyerCore::admit_guest`].
    pub fn admit_guest(&self, a: Admission) -> Result<(), Error> {
        lock(&self.shared.core).admit_guest(a)
    }

    pub fn revoke(&self, mac: MacAddr) -> bool {
        lock(&self.shared.core).revoke(mac)
    }

    pub fn stats(&self) -> BuyerStats {
        lock(&self.shared.core).stats()
    }

    pub fn io_counters(&self) -> &IoCounters {
        &self.shared.c
    }

    /// Run `f` with the core locked (status, tests).
    pub fn with_core<T>(&self, f: impl FnOnce(&mut BuyerCore) -> T) -> T {
        f(&mut lock(&self.shared.core))
    }
}

impl Drop for Buyer {
    fn drop(&mut self) {
        let sh = &self.shared;
        shell::stop_threads(&sh.stop, &[&sh.home, &sh.helper], &mut self.threads);
    }
}

/// Write one frame to the host tap (with an empty virtio_net_hdr when offloads are on).
fn write_tap(tap: &Tap, frame: &[u8], c: &IoCounters) {
    if tap.vnet_hdr() {
        write_with_hdr(tap, &[0u8; VNET_HDR_LEN], frame, c)
    } else if tap.write(frame).is_err() {
        IoCounters::bump(&c.write_errors);
    }
}

/// Write a frame with its virtio_net_hdr `hdr` (one writev, no copy).
fn write_with_hdr(tap: &Tap, hdr: &[u8], frame: &[u8], c: &IoCounters) {
    let iov = [
        libc::iovec {
            iov_base: hdr.as_ptr() as *mut libc::c_void,
            iov_len: hdr.len(),
        },
        libc::iovec {
            iov_base: frame.as_ptr() as *mut libc::c_void,
            iov_len: frame.len(),
        },
    ];
    // SAFETY: both iovecs point at live buffers.
    if unsafe { libc::writev(tap.as_raw_fd(), iov.as_ptr(), 2) } < 0 {
        IoCounters::bump(&c.write_errors);
    }
}

/// What the buyer's threads share.
struct Shared {
    core: Arc<Mutex<BuyerCore>>,
    stop: Arc<AtomicBool>,
    c: Arc<IoCounters>,
    udp: Arc<UdpSocket>,
    tap: Arc<Tap>,
    reader: Mutex<TapReader>,
    /// Who serves tap -> overlay: the home (UDP) thread, or the helper in bulk.
    handoff: Handoff,
    home: Wake,
    helper: Wake,
    budget: Duration,
}

/// The UDP thread: overlay -> switch/tap, and tap -> overlay unless the helper has
/// it; spins for answers (see [`super::spin`]).
fn home_loop(sh: &Shared, mut poller: Poller) {
    const UDP: u32 = 1 << 0;
    const TAP: u32 = 1 << 1;
    let (core, udp, tap, c) = (&*sh.core, &*sh.udp, &*sh.tap, &*sh.c);
    let fd = udp.as_raw_fd();
    let mut rx = RecvBatch::new(UDP_BATCH, UDP_GRO_SLOT);
    rx.enable_udp_gro(fd);
    // One send batch and action queue for both directions of this thread: a light
    // round trip (request in, answer out) then touches one of each, not two.
    let mut snd = Sending::new(None);
    let mut merger = TcpMerger::new();
    let mut spin = Spin::new(sh.budget);
    let mut serving_tap = true;
    let mut ready = UDP | TAP;
    while !sh.stop.load(Ordering::Relaxed) {
        // One clock read per wake-up: a pass takes microseconds, the spin budget hundreds.
        let now = Instant::now();
        let mut u = 0;
        let got = if ready & UDP != 0 {
            shell::recv_udp(&mut rx, fd, "buyer")
        } else {
            None
        };
        if let Some(n) = got {
            u = n;
            spin.got_remote(now);
            {
                let mut core = lock(core);
                let out = &mut snd.out;
                shell::each_datagram(&rx, n, |from, d| core.handle_udp(from, d, now, out));
            }
            // Hold the tap reader while writing, then read the host's answers ourselves.
            let mut rd = None;
            if tap.vnet_hdr() {
                // Merge this batch's in-order TCP segments into GSO frames.
                let mut raw = |h: &[u8], f: &[u8]| write_with_hdr(tap, h, f, c);
                shell::run_actions(&mut snd.out, fd, &mut snd.tx, |f| {
                    rd.get_or_insert_with(|| lock_reader(&sh.reader));
                    merger.push(f, &mut raw)
                });
                merger.flush(&mut raw);
            } else {
                shell::run_actions(&mut snd.out, fd, &mut snd.tx, |f| {
                    rd.get_or_insert_with(|| lock_reader(&sh.reader));
                    write_tap(tap, f, c)
                });
            }
            let _ = snd.tx.flush(fd);
            if let Some(mut r) = rd {
                if r.drain(TAP_PEEK, now, sh, &mut snd) > 0 {
                    // The host's kernel answered at once, and the answer went out.
                    spin.local_answered_at_once();
                    spin.sent_remote(now);
                } else {
                    // A process on the host will answer, soon or not at all.
                    spin.sent_local(now);
                }
            }
        }
        let mut t = 0;
        let helper = sh.handoff.helper();
        if helper == serving_tap && poller.watch(1, !helper).is_ok() {
            serving_tap = !helper;
        }
        if !helper && ready & TAP != 0 {
            t = lock_reader(&sh.reader).drain(TAP_BATCH, now, sh, &mut snd);
            if t > 0 {
                spin.got_local(now);
                spin.sent_remote(now);
            }
            if t == TAP_BATCH {
                sh.handoff.to_helper(&sh.helper);
            }
        }
        let full = if u == UDP_BATCH { UDP } else { 0 } | if t == TAP_BATCH { TAP } else { 0 };
        ready = shell::next_ready(
            full,
            now,
            &mut spin,
            &mut poller,
            &sh.home,
            || sh.handoff.helper() == helper,
            "buyer",
        );
    }
}

/// Frames read from the tap per core lock.
const TAP_BATCH: usize = 32;

/// Reads frames from the host tap and sends them into the overlay. The UDP thread
/// and the tap (helper) thread share one, behind a mutex: the UDP thread holds it
/// while it writes to the tap and then reads the tap once itself, because the host's
/// answer (a ping reply, an ACK) is queued by the time the write returns; while the
/// tap direction is light the UDP thread is also the only one waiting on the tap
/// (see [`super::spin`]), so the answer leaves without a thread hand-off or a
/// wake-up. The mutex also keeps reads in order.
struct TapReader {
    bufs: Vec<u8>,
    lens: [usize; TAP_BATCH],
    seg: Vec<u8>,
}

const TAP_SLOT: usize = 65536 + VNET_HDR_LEN;
/// Frames the UDP thread reads from the tap after writing to it: the answer. Anything
/// else queued behind it stays readable, and the poller reports it (level-triggered)
/// to whichever thread serves the tap, so no empty read follows the answer.
const TAP_PEEK: usize = 1;

impl TapReader {
    fn new() -> TapReader {
        TapReader {
            bufs: vec![0u8; TAP_BATCH * TAP_SLOT],
            lens: [0; TAP_BATCH],
            seg: Vec::with_capacity(2048),
        }
    }

    /// Read up to `max` queued frames (non-blocking) and send them; returns frames read.
    fn drain(&mut self, max: usize, now: Instant, sh: &Shared, snd: &mut Sending) -> usize {
        let max = max.min(TAP_BATCH);
        let mut want = max;
        let mut total = 0;
        loop {
            let n = self.read(want, &sh.tap);
            if n > 0 {
                self.send(n, now, sh, snd);
            }
            total += n;
            if n < want || total >= max {
                return total;
            }
            want = max - total;
        }
    }

    /// Read up to `want` queued frames into the first slots.
    fn read(&mut self, want: usize, tap: &Tap) -> usize {
        let mut n = 0;
        while n < want {
            match tap.read(&mut self.bufs[n * TAP_SLOT..(n + 1) * TAP_SLOT]) {
                Ok(l) => {
                    self.lens[n] = l;
                    n += 1;
                }
                Err(_) => break,
            }
        }
        n
    }

    /// Switch (and encrypt) the first `n` frames read, and send the datagrams.
    fn send(&mut self, n: usize, now: Instant, sh: &Shared, snd: &mut Sending) {
        let (tap, c) = (&*sh.tap, &*sh.c);
        let fd = sh.udp.as_raw_fd();
        {
            let mut core = lock(&sh.core);
            for i in 0..n {
                let buf = &mut self.bufs[i * TAP_SLOT..i * TAP_SLOT + self.lens[i]];
                let out = &mut snd.out;
                if tap.vnet_hdr() {
                    let Some(h) = VnetHdr::parse(buf) else {
                        continue;
                    };
                    let (_, frame) = buf.split_at_mut(VNET_HDR_LEN);
                    let r = offload::to_wire_frames(&h, frame, &mut self.seg, |f| {
                        core.handle_tap_frame(f, now, out)
                    });
                    if r.is_err() {
                        IoCounters::bump(&c.offload_errors);
                        core.handle_tap_frame(frame, now, out);
                    }
                } else {
                    core.handle_tap_frame(buf, now, out);
                }
            }
        }
        shell::run_actions(&mut snd.out, fd, &mut snd.tx, |f| write_tap(tap, f, c));
        let _ = snd.tx.flush(fd);
    }
}

fn lock_reader(m: &Mutex<TapReader>) -> MutexGuard<'_, TapReader> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serves tap -> overlay while it brings full batches, so both directions get a core.
fn helper_loop(sh: &Shared, poller: Poller) {
    let mut snd = Sending::new(None);
    let duty = shell::HelperDuty {
        stop: &sh.stop,
        handoff: &sh.handoff,
        me: &sh.helper,
        home: &sh.home,
        side: "buyer helper",
    };
    shell::run_helper(duty, poller, || {
        let mut r = lock_reader(&sh.reader);
        let mut got = 0;
        loop {
            let k = r.drain(TAP_BATCH, Instant::now(), sh, &mut snd);
            got += k;
            if k < TAP_BATCH {
                return got;
            }
        }
    });
}

fn tick_loop(sh: &Shared) {
    let fd = sh.udp.as_raw_fd();
    let Sending { mut out, mut tx } = Sending::new(None);
    while !sh.stop.load(Ordering::Relaxed) {
        std::thread::park_timeout(TICK);
        if sh.stop.load(Ordering::Relaxed) {
            break;
        }
        lock(&sh.core).tick(Instant::now(), &mut out);
        shell::run_actions(&mut out, fd, &mut tx, |f| write_tap(&sh.tap, f, &sh.c));
        let _ = tx.flush(fd);
    }
}
