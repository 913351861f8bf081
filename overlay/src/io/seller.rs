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
use super::offload::{TcpMerger, MAX_MERGED_FRAME, VNET_HDR_LEN};
use super::packet::PacketPort;
use super::shell::{
    self, os, IoCounters, Sending, PARK_MS, POLL_MS, TICK, UDP_BATCH, UDP_GRO_SLOT, UDP_SLOT,
};
use super::spin::{self, Handoff, Poller, Spin, Wake};
use super::sys;
use super::tap::{Tap, TapOptions};
use crate::stats::SellerStats;
use crate::{Error, SellerCore};

mod guest_path;
mod guest_rx;

use guest_path::GuestPath;
pub use guest_path::{parse_net_dev, takes_tso4};
use guest_rx::GuestRx;

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
        let path = GuestPath::new(port.as_raw_fd(), &ifname);
        let max_frame = core.config().lease.mtu as usize + crate::eth::ETH_HDR;
        let core = Arc::new(Mutex::new(core));
        let counters = Arc::new(IoCounters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let udp = Arc::new(udp);
        let port = Arc::new(port);
        // Start the handshake before any traffic.
        {
            let Sending { mut out, mut tx } = Sending::new(udp.peer_addr().ok());
            lock(&core).tick(Instant::now(), &mut out);
            let mut gtx = GuestTx::new(8, 65536);
            shell::run_actions(&mut out, udp.as_raw_fd(), &mut tx, |f| {
                gtx.queue(&port, &counters, &path, &[0; VNET_HDR_LEN], f)
            });
            let _ = tx.flush(udp.as_raw_fd());
            gtx.flush(&port, &counters, &path);
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
            path,
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
            Box::new(move || home_loop(&sh, home_poller, max_frame)),
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

    /// Counters, the losses on the guest's path up to now included.
    pub fn stats(&self) -> SellerStats {
        let sh = &self.shared;
        let losses = sh.path.losses(sh.port.as_raw_fd());
        let mut core = lock(&sh.core);
        losses.count(&mut core);
        core.stats()
    }

    /// Whether frames to the guest are merged into TCP superframes (the guest's
    /// interface takes them: a VMM with offloads on).
    pub fn merges_to_guest(&self) -> bool {
        self.shared.path.merge()
    }

    pub fn io_counters(&self) -> &IoCounters {
        &self.shared.c
    }

    /// Run `f` with the core locked.
    /// The buyer moved to `addr` (a home line's new address): the session follows it
    /// with its keys; the buyer learns our endpoint from our next datagram.
    pub fn move_buyer(&self, addr: SocketAddr) -> Result<(), Error> {
        lock(&self.shared.core).set_buyer_addr(addr);
        // The socket is connected to the buyer (only it may talk to us): connect it
        // to the new address, or its datagrams would be filtered out by the kernel.
        self.shared.udp.connect(addr).map_err(os(format!(
            "connecting the UDP socket to the buyer's new address {addr}"
        )))
    }

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
    /// Offload flags of the guest's interface and losses on the way to and from it.
    path: GuestPath,
}

/// Frames queued for the guest port, counted so that the ones it refuses are too.
struct GuestTx {
    b: SendBatch,
    n: usize,
}

impl GuestTx {
    fn new(slots: usize, max_frame: usize) -> GuestTx {
        GuestTx {
            b: PacketPort::send_batch(slots, max_frame),
            n: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Queue `f` with virtio_net_hdr `hdr`, sending what is queued first when full.
    fn queue(&mut self, port: &PacketPort, c: &IoCounters, path: &GuestPath, hdr: &[u8], f: &[u8]) {
        if self.b.is_full() {
            self.flush(port, c, path);
        }
        PacketPort::queue_with_hdr(&mut self.b, hdr, f);
        self.n += 1;
    }

    /// Send what is queued; returns how many frames the port refused (counted).
    fn flush(&mut self, port: &PacketPort, c: &IoCounters, path: &GuestPath) -> usize {
        let n = std::mem::take(&mut self.n);
        if n == 0 {
            return 0;
        }
        let lost = match port.flush(&mut self.b) {
            Ok(sent) => n.saturating_sub(sent),
            Err(_) => {
                IoCounters::bump(&c.write_errors);
                n
            }
        };
        path.send_failed(lost as u64);
        lost
    }
}

/// The guest -> buyer direction (always driven by the home thread).
struct GuestIn {
    rx: GuestRx,
    /// Room the guest's rate limit must have before the port is read again: what a
    /// whole read of messages like the last read's would bring (its wire frames and
    /// bytes per message, times READ_FRAMES; at least one full-size frame), so that
    /// the next read fits the buckets. With room for only one frame, the rest of a
    /// read of TSO superframes was dropped by the policer and a guest's TCP window
    /// burst lost hundreds of segments; now its frames wait in the kernel's queue
    /// while the buckets refill (shaping). Sized by what the guest sends, so a guest
    /// without offloads is still paced in small steps.
    room_packets: u64,
    room_bytes: u64,
    min_room_bytes: u64,
}

/// Messages per read of the guest port.
const READ_FRAMES: u64 = 16;

impl GuestIn {
    fn new(max_frame: usize) -> GuestIn {
        GuestIn {
            rx: GuestRx::new(READ_FRAMES as usize, max_frame),
            room_packets: 1,
            room_bytes: max_frame as u64,
            min_room_bytes: max_frame as u64,
        }
    }

    /// Take what the guest port has queued (never blocks), filter, encrypt and send
    /// it. Returns (messages read, whether anything went to the buyer, how long the
    /// port should now rest because the guest is over its rate limit).
    fn pass(&mut self, sh: &Shared, now: Instant, snd: &mut Sending) -> (usize, bool, Duration) {
        let fd = sh.udp.as_raw_fd();
        // Segmenting and checksumming happen here, without the core's lock.
        let n = match self.rx.read(sh.port.as_raw_fd()) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "guest port receive failed");
                std::thread::sleep(Duration::from_millis(POLL_MS));
                return (0, false, Duration::ZERO);
            }
        };
        if n == 0 {
            return (0, false, Duration::ZERO);
        }
        let rest = {
            let mut core = lock(&sh.core);
            let (out, c) = (&mut snd.out, &sh.c);
            let (mut frames, mut bytes) = (0u64, 0u64);
            self.rx.for_each(|f| {
                frames += 1;
                match f {
                    Ok(f) => {
                        bytes += f.len() as u64;
                        core.handle_guest_frame(f, now, out)
                    }
                    Err((reason, len)) => {
                        bytes += len as u64;
                        IoCounters::bump(&c.offload_errors);
                        core.reject_guest_frame(reason, len, now);
                    }
                }
            });
            // The next read may bring READ_FRAMES messages like these.
            let n = n as u64;
            self.room_packets = (frames * READ_FRAMES).div_ceil(n).max(1);
            self.room_bytes = (bytes * READ_FRAMES).div_ceil(n).max(self.min_room_bytes);
            core.guest_backoff(self.room_packets, self.room_bytes, now)
        };
        let sent = !snd.out.is_empty();
        let mut gtx = None::<GuestTx>;
        shell::run_actions(&mut snd.out, fd, &mut snd.tx, |f| {
            // The core never sends guest-bound frames from here, but stay correct if it does.
            let b = gtx.get_or_insert_with(|| GuestTx::new(8, 65536));
            b.queue(&sh.port, &sh.c, &sh.path, &[0; VNET_HDR_LEN], f);
        });
        let _ = snd.tx.flush(fd);
        if let Some(mut b) = gtx {
            b.flush(&sh.port, &sh.c, &sh.path);
        }
        (n, sent, rest)
    }
}

/// The buyer -> guest direction (home thread when light, helper thread in bulk).
struct UdpIn {
    rx: RecvBatch,
    gtx: GuestTx,
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
            gtx: GuestTx::new(GUEST_TX_SLOTS, MAX_MERGED_FRAME),
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
        let (gtx, port, c, path) = (&mut self.gtx, &*sh.port, &*sh.c, &sh.path);
        let mut emit = |h: &[u8], f: &[u8]| gtx.queue(port, c, path, h, f);
        // Superframes only to an interface that takes them (a VMM with offloads on);
        // the others get the frames as they came, MTU-sized.
        let merging = path.merge();
        if merging {
            let merger = &mut self.merger;
            shell::run_actions(&mut snd.out, fd, &mut snd.tx, |f| merger.push(f, &mut emit));
            merger.flush(&mut emit);
        } else {
            shell::run_actions(&mut snd.out, fd, &mut snd.tx, |f| {
                emit(&[0; VNET_HDR_LEN], f)
            });
        }
        let _ = snd.tx.flush(fd);
        let delivered = !self.gtx.is_empty();
        let lost = self.gtx.flush(port, c, path);
        if lost > 0 && merging {
            // The VMM may have turned offloads off: look again now, not at the next tick.
            path.refresh_offloads(port.as_raw_fd());
        }
        (n, delivered)
    }
}

/// The guest port's thread; also serves UDP -> guest unless the helper has it, and
/// spins for answers (see [`super::spin`]). Reads only what the poller reported.
fn home_loop(sh: &Shared, mut poller: Poller, max_frame: usize) {
    const PORT: u32 = 1 << 0;
    const UDP: u32 = 1 << 1;
    let mut gin = GuestIn::new(max_frame);
    // While the guest is over its rate limit the port rests (unwatched) until then.
    let mut resting: Option<Instant> = None;
    // Both directions this thread serves send through one queue and batch.
    let mut snd = Sending::new(sh.udp.peer_addr().ok());
    let mut spin = Spin::new(sh.budget);
    let mut serving_udp = true;
    let mut ready = PORT | UDP;
    while !sh.stop.load(Ordering::Relaxed) {
        // One clock read per wake-up: a pass takes microseconds, the spin budget hundreds.
        let now = Instant::now();
        if resting.is_some_and(|t| now >= t) && poller.watch(0, true).is_ok() {
            resting = None;
            ready |= PORT;
        }
        let (g, sent, rest) = if ready & PORT != 0 && resting.is_none() {
            gin.pass(sh, now, &mut snd)
        } else {
            (0, false, Duration::ZERO)
        };
        if !rest.is_zero() && poller.watch(0, false).is_ok() {
            resting = Some(now + rest);
        }
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
        let port_full = g == gin.rx.slots() && resting.is_none();
        let full = if port_full { PORT } else { 0 } | if u == UDP_BATCH { UDP } else { 0 };
        ready = match resting {
            // Wait no longer than the rest (the port is not watched meanwhile).
            Some(t) if full == 0 => {
                let ms = t.saturating_duration_since(now).as_micros().div_ceil(1000);
                sh.home
                    .park(&mut poller, ms.clamp(1, PARK_MS as u128) as i32, || {
                        sh.handoff.helper() == helper
                    })
                    .unwrap_or(0)
            }
            _ => shell::next_ready(
                full,
                now,
                &mut spin,
                &mut poller,
                &sh.home,
                || sh.handoff.helper() == helper,
                "seller",
            ),
        };
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
    let mut gtx = GuestTx::new(UDP_BATCH, UDP_SLOT);
    let pfd = sh.port.as_raw_fd();
    while !sh.stop.load(Ordering::Relaxed) {
        std::thread::park_timeout(TICK);
        if sh.stop.load(Ordering::Relaxed) {
            break;
        }
        // The VMM may turn the interface's offloads on or off at any time.
        sh.path.refresh_offloads(pfd);
        let losses = sh.path.losses(pfd);
        {
            let mut core = lock(&sh.core);
            core.tick(Instant::now(), &mut out);
            losses.count(&mut core);
        }
        shell::run_actions(&mut out, fd, &mut tx, |f| {
            gtx.queue(&sh.port, &sh.c, &sh.path, &[0; VNET_HDR_LEN], f)
        });
        let _ = tx.flush(fd);
        gtx.flush(&sh.port, &sh.c, &sh.path);
    }
}
