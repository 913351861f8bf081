//! The seller's I/O shell for one guest: the guest port (an AF_PACKET socket inside
//! the lease's network namespace), a UDP socket towards the buyer, and three threads
//! (guest port, UDP helper for bulk from the buyer, timers) driving one
//! [`SellerCore`].

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::batch::{RecvBatch, SendBatch};
use super::netns::NetNs;
use super::offload::{TcpMerger, MAX_MERGED_FRAME};
use super::packet::PacketPort;
use super::shell::{
    self, os, IoCounters, Sending, POLL_MS, TICK, UDP_BATCH, UDP_GRO_SLOT, UDP_SLOT,
};
use super::spin::{self, Handoff, Poller, Spin, Wake};
use super::sys;
use super::tap::{Tap, TapOptions};
use crate::stats::SellerStats;
use crate::{Error, SellerCore};

/// Make a lease namespace: empty, IPv6 off, no forwarding. Deleted when dropped.
pub fn create_lease_netns(name: &str) -> Result<NetNs, Error> {
    let ns = NetNs::create(name).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::AddressConflict(format!(
                "network namespace {name:?} already exists (another lease, or a leftover: `ip netns del {name}`)"
            ))
        } else {
            os(format!("creating network namespace {name}"))(e)
        }
    })?;
    ns.run(|| {
        for k in [
            "ipv6/conf/all/disable_ipv6",
            "ipv6/conf/default/disable_ipv6",
        ] {
            sys::write_net_sysctl(k, "1")?;
        }
        sys::write_net_sysctl("ipv4/ip_forward", "0")?;
        Ok(())
    })
    .map_err(os(format!("configuring network namespace {name}")))?;
    Ok(ns)
}

/// Create the guest's tap inside `ns` (never addressed, never bridged). The returned
/// fd is what a VMM uses as the guest NIC's backend. `persist` keeps the interface
/// after the fd closes, so a VMM started later can open it by name inside `ns`.
pub fn create_guest_tap(ns: &NetNs, name: &str, persist: bool) -> Result<Tap, Error> {
    let n = name.to_string();
    ns.run(move || {
        let t = Tap::create(&n, TapOptions::default())?;
        if persist {
            t.set_persist(true)?;
        }
        sys::write_net_sysctl(&format!("ipv6/conf/{n}/disable_ipv6"), "1")?;
        Ok(t)
    })
    .map_err(os(format!(
        "creating guest tap {name} in netns {}",
        ns.name()
    )))
}

/// Remove a persistent tap made by [`create_guest_tap`].
pub fn remove_guest_tap(ns: &NetNs, name: &str) -> Result<(), Error> {
    let n = name.to_string();
    ns.run(move || {
        let t = Tap::create(&n, TapOptions::default())?;
        t.set_persist(false)
    })
    .map_err(os(format!("removing guest tap {name}")))
}

/// Tuning of a seller's I/O shell.
#[derive(Debug, Clone)]
pub struct SellerIoConfig {
    /// Busy-poll budget (see [`super::spin`]); zero turns busy-polling off.
    pub busy_poll: Duration,
}

impl Default for SellerIoConfig {
    fn default() -> SellerIoConfig {
        SellerIoConfig {
            busy_poll: spin::DEFAULT_BUDGET,
        }
    }
}

/// A running seller-side guest session. Dropping it stops the threads (and deletes
/// the lease namespace if it owns it).
pub struct Seller {
    /// What the threads share (the core and counters too); kept to stop them.
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    local: SocketAddr,
    ifname: String,
    // Held so the namespace (and a tap nobody else holds) outlive the threads.
    _tap: Option<Tap>,
    _netns: Option<NetNs>,
}

fn lock(m: &Mutex<SellerCore>) -> MutexGuard<'_, SellerCore> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Seller {
    /// Start a guest session on an already opened guest port and a UDP socket from
    /// [`shell::bind_udp`] (normally bound to 0.0.0.0:0: only the buyer needs a
    /// reachable port). `netns`/`tap` are kept alive as long as the session runs.
    pub fn start(
        core: SellerCore,
        port: PacketPort,
        udp: UdpSocket,
        netns: Option<NetNs>,
        tap: Option<Tap>,
    ) -> Result<Seller, Error> {
        Seller::start_with(core, port, udp, netns, tap, SellerIoConfig::default())
    }

    /// [`Seller::start`] with explicit I/O tuning.
    pub fn start_with(
        core: SellerCore,
        port: PacketPort,
        udp: UdpSocket,
        netns: Option<NetNs>,
        tap: Option<Tap>,
        io: SellerIoConfig,
    ) -> Result<Seller, Error> {
        let local = udp.local_addr().map_err(os("reading the UDP address"))?;
        let buyer = core.config().buyer_addr;
        // Only the buyer may talk to this socket; the route is looked up once.
        udp.connect(buyer).map_err(os(format!(
            "connecting the UDP socket to the buyer at {buyer}"
        )))?;
        let ifname = port.ifname().to_string();
        let core = Arc::new(Mutex::new(core));
        let counters = Arc::new(IoCounters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let udp = Arc::new(udp);
        let port = Arc::new(port);
        // Start the handshake before any traffic.
        {
            let Sending { mut out, mut tx } = Sending::new(udp.peer_addr().ok());
            lock(&core).tick(Instant::now(), &mut out);
            let mut gtx = PacketPort::send_batch(8, 65536);
            shell::run_actions(&mut out, udp.as_raw_fd(), &mut tx, |f| {
                PacketPort::queue(&mut gtx, f)
            });
            let _ = tx.flush(udp.as_raw_fd());
            let _ = port.flush(&mut gtx);
        }
        let shared = Arc::new(Shared {
            core,
            stop: stop.clone(),
            c: counters,
            udp_in: Mutex::new(UdpIn::new(&udp)),
            udp,
            port,
            handoff: Handoff::default(),
            home: Wake::new().map_err(os("creating an eventfd"))?,
            helper: Wake::new().map_err(os("creating an eventfd"))?,
            budget: io.busy_poll,
        });
        let mut threads = Vec::new();
        let spawn = |n: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(n)
                .spawn(f)
                .map_err(os("spawning an overlay thread"))
        };
        let (pfd, ufd) = (shared.port.as_raw_fd(), shared.udp.as_raw_fd());
        // The home thread serves both until bulk arrives.
        let (home_poller, helper_poller) =
            shell::pollers(&[pfd, ufd], ufd, &shared.home, &shared.helper)?;
        let tag: String = ifname.chars().take(8).collect();
        let sh = shared.clone();
        threads.push(spawn(
            format!("ovl-g-{tag}"),
            Box::new(move || home_loop(&sh, home_poller)),
        )?);
        let sh = shared.clone();
        threads.push(spawn(
            format!("ovl-u-{tag}"),
            Box::new(move || helper_loop(&sh, helper_poller)),
        )?);
        let sh = shared.clone();
        threads.push(spawn(
            format!("ovl-t-{tag}"),
            Box::new(move || tick_loop(&sh)),
        )?);
        tracing::info!(%local, %buyer, guest_if = %ifname, "seller guest port attached");
        Ok(Seller {
            shared,
            threads,
            local,
            ifname,
            _tap: tap,
            _netns: netns,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    pub fn is_established(&self) -> bool {
        lock(&self.shared.core).is_established()
    }

    pub fn stats(&self) -> SellerStats {
        lock(&self.shared.core).stats()
    }

    pub fn io_counters(&self) -> &IoCounters {
        &self.shared.c
    }

    /// Run `f` with the core locked.
    pub fn with_core<T>(&self, f: impl FnOnce(&mut SellerCore) -> T) -> T {
        f(&mut lock(&self.shared.core))
    }
}

impl Drop for Seller {
    fn drop(&mut self) {
        let sh = &self.shared;
        shell::stop_threads(&sh.stop, &[&sh.home, &sh.helper], &mut self.threads);
    }
}

/// What the seller's threads share.
struct Shared {
    core: Arc<Mutex<SellerCore>>,
    stop: Arc<AtomicBool>,
    c: Arc<IoCounters>,
    udp: Arc<UdpSocket>,
    port: Arc<PacketPort>,
    /// The UDP -> guest direction, driven by whichever thread serves it.
    udp_in: Mutex<UdpIn>,
    /// Who serves UDP -> guest: the home (guest port) thread, or the helper in bulk.
    handoff: Handoff,
    home: Wake,
    helper: Wake,
    budget: Duration,
}

fn flush_guest(port: &PacketPort, gtx: &mut SendBatch, c: &IoCounters) {
    if !gtx.is_empty() && port.flush(gtx).is_err() {
        IoCounters::bump(&c.write_errors);
    }
}

/// The guest -> buyer direction (always driven by the home thread).
struct GuestIn {
    rx: RecvBatch,
    scratch: Vec<u8>,
    seg: Vec<u8>,
}

impl GuestIn {
    fn new() -> GuestIn {
        GuestIn {
            rx: PacketPort::recv_batch(16),
            scratch: Vec::with_capacity(65536 + 64),
            seg: Vec::with_capacity(2048),
        }
    }

    /// Take what the guest port has queued (never blocks), filter, encrypt and send
    /// it. Returns (messages read, whether anything went to the buyer).
    fn pass(&mut self, sh: &Shared, now: Instant, snd: &mut Sending) -> (usize, bool) {
        let fd = sh.udp.as_raw_fd();
        let r = {
            // Frames go to the core straight from the receive slots (no copy): the
            // lock is held over one non-blocking receive, a few microseconds.
            let mut core = lock(&sh.core);
            let (out, c) = (&mut snd.out, &sh.c);
            sh.port
                .recv_frames_nowait(&mut self.rx, &mut self.scratch, &mut self.seg, |f, err| {
                    if err.is_some() {
                        IoCounters::bump(&c.offload_errors);
                    }
                    core.handle_guest_frame(f, now, out);
                })
        };
        let n = match r {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "guest port receive failed");
                std::thread::sleep(Duration::from_millis(POLL_MS));
                return (0, false);
            }
        };
        if n == 0 {
            return (0, false);
        }
        let sent = !snd.out.is_empty();
        let mut gtx = None::<SendBatch>;
        shell::run_actions(&mut snd.out, fd, &mut snd.tx, |f| {
            // The core never sends guest-bound frames from here, but stay correct if it does.
            let b = gtx.get_or_insert_with(|| PacketPort::send_batch(8, 65536));
            if b.is_full() {
                flush_guest(&sh.port, b, &sh.c);
            }
            PacketPort::queue(b, f);
        });
        let _ = snd.tx.flush(fd);
        if let Some(mut b) = gtx {
            flush_guest(&sh.port, &mut b, &sh.c);
        }
        (n, sent)
    }
}

/// The buyer -> guest direction (home thread when light, helper thread in bulk).
struct UdpIn {
    rx: RecvBatch,
    gtx: SendBatch,
    /// In-order TCP segments of a batch go to the guest as one TSO frame: the guest
    /// (its stack, or the VMM's tap) handles one packet instead of ~45.
    merger: TcpMerger,
}

/// Frames per send to the guest port: merged frames are up to 64 KiB each.
const GUEST_TX_SLOTS: usize = 16;

impl UdpIn {
    fn new(udp: &UdpSocket) -> UdpIn {
        let rx = RecvBatch::new(UDP_BATCH, UDP_GRO_SLOT);
        rx.enable_udp_gro(udp.as_raw_fd());
        UdpIn {
            rx,
            gtx: PacketPort::send_batch(GUEST_TX_SLOTS, MAX_MERGED_FRAME),
            merger: TcpMerger::new(),
        }
    }

    /// Take the queued datagrams (never blocks), decrypt and deliver them. Returns
    /// (messages read, whether frames went to the guest).
    fn pass(&mut self, sh: &Shared, now: Instant, snd: &mut Sending) -> (usize, bool) {
        let fd = sh.udp.as_raw_fd();
        let Some(n) = shell::recv_udp(&mut self.rx, fd, "seller") else {
            return (0, false);
        };
        {
            let mut core = lock(&sh.core);
            let out = &mut snd.out;
            shell::each_datagram(&self.rx, n, |from, d| core.handle_udp(from, d, now, out));
        }
        let (gtx, port, c, merger) = (&mut self.gtx, &sh.port, &sh.c, &mut self.merger);
        let mut emit = |h: &[u8], f: &[u8]| {
            if gtx.is_full() {
                flush_guest(port, gtx, c);
            }
            PacketPort::queue_with_hdr(gtx, h, f)
        };
        shell::run_actions(&mut snd.out, fd, &mut snd.tx, |f| merger.push(f, &mut emit));
        merger.flush(&mut emit);
        let _ = snd.tx.flush(fd);
        let delivered = !self.gtx.is_empty();
        flush_guest(&sh.port, &mut self.gtx, &sh.c);
        (n, delivered)
    }
}

/// The guest port's thread; also serves UDP -> guest unless the helper has it, and
/// spins for answers (see [`super::spin`]). Reads only what the poller reported.
fn home_loop(sh: &Shared, mut poller: Poller) {
    const PORT: u32 = 1 << 0;
    const UDP: u32 = 1 << 1;
    let mut gin = GuestIn::new();
    // Both directions this thread serves send through one queue and batch.
    let mut snd = Sending::new(sh.udp.peer_addr().ok());
    let mut spin = Spin::new(sh.budget);
    let mut serving_udp = true;
    let mut ready = PORT | UDP;
    while !sh.stop.load(Ordering::Relaxed) {
        // One clock read per wake-up: a pass takes microseconds, the spin budget hundreds.
        let now = Instant::now();
        let (g, sent) = if ready & PORT != 0 {
            gin.pass(sh, now, &mut snd)
        } else {
            (0, false)
        };
        if g > 0 {
            spin.got_local(now);
        }
        let mut u = 0;
        let helper = sh.handoff.helper();
        if helper == serving_udp && poller.watch(1, !helper).is_ok() {
            serving_udp = !helper;
        }
        if !helper && ready & UDP != 0 {
            let (n, delivered) = lock_in(&sh.udp_in).pass(sh, now, &mut snd);
            u = n;
            if n > 0 {
                spin.got_remote(now);
                if delivered {
                    spin.sent_local(now);
                }
            }
            if n == UDP_BATCH {
                sh.handoff.to_helper(&sh.helper);
            }
        }
        if sent {
            spin.sent_remote(now);
        }
        let full =
            if g == gin.rx.slots() { PORT } else { 0 } | if u == UDP_BATCH { UDP } else { 0 };
        ready = shell::next_ready(
            full,
            now,
            &mut spin,
            &mut poller,
            &sh.home,
            || sh.handoff.helper() == helper,
            "seller",
        );
    }
}

/// Serves UDP -> guest while it brings full batches, so both directions get a core.
fn helper_loop(sh: &Shared, poller: Poller) {
    let duty = shell::HelperDuty {
        stop: &sh.stop,
        handoff: &sh.handoff,
        me: &sh.helper,
        home: &sh.home,
        side: "seller helper",
    };
    let mut snd = Sending::new(sh.udp.peer_addr().ok());
    shell::run_helper(duty, poller, || {
        lock_in(&sh.udp_in).pass(sh, Instant::now(), &mut snd).0
    });
}

fn lock_in(m: &Mutex<UdpIn>) -> MutexGuard<'_, UdpIn> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn tick_loop(sh: &Shared) {
    let fd = sh.udp.as_raw_fd();
    let Sending { mut out, mut tx } = Sending::new(sh.udp.peer_addr().ok());
    let mut gtx = PacketPort::send_batch(UDP_BATCH, UDP_SLOT);
    while !sh.stop.load(Ordering::Relaxed) {
        std::thread::park_timeout(TICK);
        if sh.stop.load(Ordering::Relaxed) {
            break;
        }
        lock(&sh.core).tick(Instant::now(), &mut out);
        shell::run_actions(&mut out, fd, &mut tx, |f| {
            if gtx.is_full() {
                flush_guest(&sh.port, &mut gtx, &sh.c);
            }
            PacketPort::queue(&mut gtx, f)
        });
        let _ = tx.flush(fd);
        flush_guest(&sh.port, &mut gtx, &sh.c);
    }
}
