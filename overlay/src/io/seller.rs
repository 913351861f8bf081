//! The seller's I/O shell for one guest: the guest port (an AF_PACKET socket inside
//! the lease's network namespace), a UDP socket towards the buyer, and three threads
//! (guest in, UDP in, timers) driving one [`SellerCore`].

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::batch::{RecvBatch, SendBatch};
use super::netns::NetNs;
use super::packet::PacketPort;
use super::shell::{self, os, IoCounters, POLL_MS, UDP_BATCH, UDP_GRO_SLOT, UDP_SLOT};
use super::sys;
use super::tap::{Tap, TapOptions};
use crate::stats::SellerStats;
use crate::{Actions, Error, SellerCore};

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

/// A running seller-side guest session. Dropping it stops the threads (and deletes
/// the lease namespace if it owns it).
pub struct Seller {
    core: Arc<Mutex<SellerCore>>,
    counters: Arc<IoCounters>,
    stop: Arc<AtomicBool>,
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
            let mut out = Actions::new();
            let mut tx = SendBatch::new(UDP_BATCH, UDP_SLOT);
            tx.set_gso(true);
            tx.set_connected(udp.peer_addr().ok());
            lock(&core).tick(Instant::now(), &mut out);
            let mut gtx = PacketPort::send_batch(8, 65536);
            shell::run_actions(&mut out, udp.as_raw_fd(), &mut tx, |f| {
                PacketPort::queue(&mut gtx, f)
            });
            let _ = tx.flush(udp.as_raw_fd());
            let _ = port.flush(&mut gtx);
        }
        let mut threads = Vec::new();
        let spawn = |n: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(n)
                .spawn(f)
                .map_err(os("spawning an overlay thread"))
        };
        let tag: String = ifname.chars().take(8).collect();
        {
            let (core, stop, udp, port, c) = (
                core.clone(),
                stop.clone(),
                udp.clone(),
                port.clone(),
                counters.clone(),
            );
            threads.push(spawn(
                format!("ovl-g-{tag}"),
                Box::new(move || guest_loop(&core, &stop, &udp, &port, &c)),
            )?);
        }
        {
            let (core, stop, udp, port, c) = (
                core.clone(),
                stop.clone(),
                udp.clone(),
                port.clone(),
                counters.clone(),
            );
            threads.push(spawn(
                format!("ovl-u-{tag}"),
                Box::new(move || udp_loop(&core, &stop, &udp, &port, &c)),
            )?);
        }
        {
            let (core, stop, udp, port, c) = (
                core.clone(),
                stop.clone(),
                udp.clone(),
                port.clone(),
                counters.clone(),
            );
            threads.push(spawn(
                format!("ovl-t-{tag}"),
                Box::new(move || tick_loop(&core, &stop, &udp, &port, &c)),
            )?);
        }
        tracing::info!(%local, %buyer, guest_if = %ifname, "seller guest port attached");
        Ok(Seller {
            core,
            counters,
            stop,
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
        lock(&self.core).is_established()
    }

    pub fn stats(&self) -> SellerStats {
        lock(&self.core).stats()
    }

    pub fn io_counters(&self) -> &IoCounters {
        &self.counters
    }

    /// Run `f` with the core locked.
    pub fn with_core<T>(&self, f: impl FnOnce(&mut SellerCore) -> T) -> T {
        f(&mut lock(&self.core))
    }
}

impl Drop for Seller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn flush_guest(port: &PacketPort, gtx: &mut SendBatch, c: &IoCounters) {
    if !gtx.is_empty() && port.flush(gtx).is_err() {
        IoCounters::bump(&c.write_errors);
    }
}

fn guest_loop(
    core: &Mutex<SellerCore>,
    stop: &AtomicBool,
    udp: &UdpSocket,
    port: &PacketPort,
    c: &IoCounters,
) {
    let fd = udp.as_raw_fd();
    let _ = sys::set_recv_timeout(port.as_raw_fd(), POLL_MS);
    let mut rx = PacketPort::recv_batch(16);
    let mut tx = SendBatch::new(UDP_BATCH, UDP_SLOT);
    tx.set_gso(true);
    tx.set_connected(udp.peer_addr().ok());
    let mut out = Actions::new();
    let mut scratch = Vec::with_capacity(65536 + 64);
    let mut seg = Vec::with_capacity(2048);
    let mut frames: Vec<Vec<u8>> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let mut nf = 0usize;
        let r = port.recv_frames(&mut rx, &mut scratch, &mut seg, |f, err| {
            if err.is_some() {
                IoCounters::bump(&c.offload_errors);
            }
            if nf == frames.len() {
                frames.push(Vec::with_capacity(2048));
            }
            frames[nf].clear();
            frames[nf].extend_from_slice(f);
            nf += 1;
        });
        match r {
            Ok(0) => continue,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "guest port receive failed");
                std::thread::sleep(Duration::from_millis(POLL_MS));
                continue;
            }
        }
        let now = Instant::now();
        {
            let mut core = lock(core);
            for f in &frames[..nf] {
                core.handle_guest_frame(f, now, &mut out);
            }
        }
        let mut gtx = None::<SendBatch>;
        shell::run_actions(&mut out, fd, &mut tx, |f| {
            // The core never sends guest-bound frames from here, but stay correct if it does.
            let b = gtx.get_or_insert_with(|| PacketPort::send_batch(8, 65536));
            PacketPort::queue(b, f);
        });
        let _ = tx.flush(fd);
        if let Some(mut b) = gtx {
            flush_guest(port, &mut b, c);
        }
    }
}

fn udp_loop(
    core: &Mutex<SellerCore>,
    stop: &AtomicBool,
    udp: &UdpSocket,
    port: &PacketPort,
    c: &IoCounters,
) {
    let fd = udp.as_raw_fd();
    let mut rx = RecvBatch::new(UDP_BATCH, UDP_GRO_SLOT);
    rx.enable_udp_gro(fd);
    let mut tx = SendBatch::new(UDP_BATCH, UDP_SLOT);
    tx.set_gso(true);
    tx.set_connected(udp.peer_addr().ok());
    let mut gtx = PacketPort::send_batch(UDP_BATCH, UDP_SLOT);
    let mut out = Actions::new();
    while !stop.load(Ordering::Relaxed) {
        let Some(n) = shell::recv_udp(&mut rx, fd, "seller") else {
            continue;
        };
        let now = Instant::now();
        {
            let mut core = lock(core);
            shell::each_datagram(&rx, n, |from, d| core.handle_udp(from, d, now, &mut out));
        }
        shell::run_actions(&mut out, fd, &mut tx, |f| {
            if gtx.is_full() {
                flush_guest(port, &mut gtx, c);
            }
            PacketPort::queue(&mut gtx, f)
        });
        let _ = tx.flush(fd);
        flush_guest(port, &mut gtx, c);
    }
}

fn tick_loop(
    core: &Mutex<SellerCore>,
    stop: &AtomicBool,
    udp: &UdpSocket,
    port: &PacketPort,
    c: &IoCounters,
) {
    let fd = udp.as_raw_fd();
    let mut tx = SendBatch::new(UDP_BATCH, UDP_SLOT);
    tx.set_gso(true);
    tx.set_connected(udp.peer_addr().ok());
    let mut gtx = PacketPort::send_batch(UDP_BATCH, UDP_SLOT);
    let mut out = Actions::new();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(POLL_MS));
        lock(core).tick(Instant::now(), &mut out);
        shell::run_actions(&mut out, fd, &mut tx, |f| {
            if gtx.is_full() {
                flush_guest(port, &mut gtx, c);
            }
            PacketPort::queue(&mut gtx, f)
        });
        let _ = tx.flush(fd);
        flush_guest(port, &mut gtx, c);
    }
}
