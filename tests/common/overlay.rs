//! Overlay test harness: an underlay of network namespaces with a buyer host, seller
//! hosts whose "guests" are namespaces plugged into a lease namespace through a veth
//! pair, raw frame crafting, AF_PACKET captures, and TCP transfers inside namespaces.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ::overlay::io::{self, shell, Buyer, BuyerIoConfig, NetNs, PacketPort, Seller};
use ::overlay::{BuyerConfig, BuyerCore, GuestLease, Identity, MacAddr, SellerConfig, SellerCore};
use anyhow::{bail, Context, Result};

use crate::netns::{ip, veth, Netns};

/// Overlay address of the buyer's host.
pub const BUYER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const BUYER_MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0xc0, 0x00, 0x01]);
/// UDP port the buyer listens on.
pub const BUYER_PORT: u16 = 51900;

/// Delete namespaces/links a crashed earlier run may have left.
pub fn scrub(names: &[&str]) {
    for n in names {
        let _ = Command::new("ip")
            .args(["netns", "del", n])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Run `f` inside the named namespace on its own thread.
pub fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T> {
    NetNs::open(ns)?
        .run(f)
        .with_context(|| format!("in netns {ns}"))
}

/// One seller host with one guest.
pub struct SellerHost {
    // Field order is drop order: stop the session before its namespaces vanish.
    pub seller: Seller,
    pub guest: Netns,
    pub host: Netns,
    pub host_ip: Ipv4Addr,
    pub guest_mac: MacAddr,
    pub guest_ip: Ipv4Addr,
    /// Guest end of the veth pair (in `guest`).
    pub guest_if: String,
    /// Lease end of the veth pair (in the lease namespace).
    pub lease_if: String,
    pub lease_ns: String,
    /// The seller host's uplink (in `host`).
    pub uplink: String,
}

/// Start the buyer overlay inside namespace `ns`.
pub fn start_buyer(ns: &str, listen: SocketAddr, tap: &str) -> Result<(Buyer, Identity)> {
    let id = Identity::generate();
    let core = BuyerCore::new(id.clone(), BuyerConfig::new(BUYER_MAC))?;
    let cfg = BuyerIoConfig::new(listen, tap);
    let b = in_ns(ns, move || Ok(Buyer::start(core, cfg)))??;
    Ok((b, id))
}

/// Guest/lease plumbing for one seller: lease netns (product code), veth to the guest
/// namespace, the guest port and the session to the buyer, UDP from the seller host.
#[allow(clippy::too_many_arguments)]
pub fn start_seller(
    host: Netns,
    host_ip: Ipv4Addr,
    uplink: &str,
    guest_ns: &str,
    lease_ns: &str,
    tag: &str,
    buyer_key: ::overlay::PeerKey,
    buyer_addr: SocketAddr,
    guest_mac: MacAddr,
    guest_ip: Ipv4Addr,
    seller_id: Identity,
) -> Result<SellerHost> {
    start_seller_with(
        host,
        host_ip,
        uplink,
        guest_ns,
        lease_ns,
        tag,
        buyer_key,
        buyer_addr,
        guest_mac,
        guest_ip,
        seller_id,
        |_| {},
    )
}

/// [`start_seller`] with the lease adjusted by `lease_edit` (IPv6, limits). A lease
/// that allows IPv6 gets a guest namespace with IPv6 on (no DAD, no RA accepted);
/// otherwise the guest's IPv6 is off.
#[allow(clippy::too_many_arguments)]
pub fn start_seller_with(
    host: Netns,
    host_ip: Ipv4Addr,
    uplink: &str,
    guest_ns: &str,
    lease_ns: &str,
    tag: &str,
    buyer_key: ::overlay::PeerKey,
    buyer_addr: SocketAddr,
    guest_mac: MacAddr,
    guest_ip: Ipv4Addr,
    seller_id: Identity,
    lease_edit: impl FnOnce(&mut GuestLease),
) -> Result<SellerHost> {
    let mut lease_cfg = GuestLease::new(guest_mac, guest_ip, BUYER_MAC, BUYER_IP);
    lease_edit(&mut lease_cfg);
    scrub(&[lease_ns, guest_ns]);
    let lease = io::create_lease_netns(lease_ns)?;
    let guest = Netns::new(guest_ns)?;
    if lease_cfg.allow_ipv6 {
        for k in ["accept_dad=0", "accept_ra=0"] {
            guest.sysctl(&format!("net.ipv6.conf.all.{k}"))?;
            guest.sysctl(&format!("net.ipv6.conf.default.{k}"))?;
        }
    } else {
        guest.sysctl("net.ipv6.conf.all.disable_ipv6=1")?;
        guest.sysctl("net.ipv6.conf.default.disable_ipv6=1")?;
    }
    let guest_if = format!("{tag}g");
    let lease_if = format!("{tag}l");
    ip(&[
        "link", "add", &guest_if, "netns", guest_ns, "type", "veth", "peer", "name", &lease_if,
        "netns", lease_ns,
    ])?;
    // The lease end takes any frame size; the egress filter enforces the cap.
    in_ns(lease_ns, {
        let l = lease_if.clone();
        move || io::sys::set_mtu(&l, 9000)
    })?;
    guest.ip(&["link", "set", &guest_if, "address", &guest_mac.to_string()])?;
    guest.ip(&["link", "set", &guest_if, "up"])?;
    let port = PacketPort::open_in(&lease, &lease_if)?;
    let core = SellerCore::new(
        seller_id,
        SellerConfig::new(
            buyer_key,
            buyer_addr,
            lease_cfg,
            std::time::SystemTime::now(),
        ),
    )?;
    let udp = in_ns(host.name(), || {
        shell::bind_udp("0.0.0.0:0".parse().unwrap()).map_err(std::io::Error::other)
    })?;
    let seller = Seller::start(core, port, udp, Some(lease), None)?;
    Ok(SellerHost {
        seller,
        guest,
        host,
        host_ip,
        guest_mac,
        guest_ip,
        guest_if,
        lease_if,
        lease_ns: lease_ns.to_string(),
        uplink: uplink.to_string(),
    })
}

/// Get an address for the guest with busybox udhcpc; returns (ip, mtu) it configured.
pub fn dhcp(guest: &Netns, ifname: &str) -> Result<(Ipv4Addr, u32)> {
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("udhcpc.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\ncase \"$1\" in\n  bound|renew)\n    ip addr flush dev \"$interface\"\n    ip addr add \"$ip/$mask\" dev \"$interface\"\n    [ -n \"$mtu\" ] && ip link set \"$interface\" mtu \"$mtu\"\n    for r in $router; do ip route replace default via \"$r\" dev \"$interface\"; break; done\n    ;;\nesac\nexit 0\n",
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    let out = guest
        .command("busybox")
        .args([
            "udhcpc", "-i", ifname, "-f", "-q", "-n", "-t", "8", "-T", "1", "-s",
        ])
        .arg(&script)
        .output()
        .context("running busybox udhcpc (apt-get install busybox-static)")?;
    if !out.status.success() {
        bail!(
            "udhcpc in {} got no lease: {}{}",
            guest.name(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let show = guest.exec("ip", &["-4", "-o", "addr", "show", "dev", ifname])?;
    let s = String::from_utf8_lossy(&show.stdout);
    let ipstr = s
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .context("no inet address after DHCP")?;
    let ip: Ipv4Addr = ipstr.split('/').next().unwrap().parse()?;
    let link = guest.exec("ip", &["-o", "link", "show", "dev", ifname])?;
    let l = String::from_utf8_lossy(&link.stdout);
    let mtu: u32 = l
        .split_whitespace()
        .skip_while(|w| *w != "mtu")
        .nth(1)
        .and_then(|m| m.parse().ok())
        .context("no mtu in `ip link show`")?;
    Ok((ip, mtu))
}

/// `ping -c n` from a namespace; true if all replies came back.
pub fn ping(ns: &Netns, dst: Ipv4Addr, n: u32) -> bool {
    ns.command("ping")
        .args([
            "-c",
            &n.to_string(),
            "-i",
            "0.2",
            "-W",
            "2",
            &dst.to_string(),
        ])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

pub use crate::wait_until;

/// Deterministic bytes for transfers.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[1] ^ seed)
        .collect()
}

/// TCP both ways between `server_ns` (listening on `server_ip:port`) and `client_ns`:
/// the client sends `up` bytes, then the server sends `down` bytes. Both checked.
pub fn tcp_both_ways(
    server_ns: &str,
    server_ip: Ipv4Addr,
    port: u16,
    client_ns: &str,
    up: usize,
    down: usize,
) -> Result<()> {
    let listener = in_ns(server_ns, move || TcpListener::bind((server_ip, port)))?;
    let srv = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut got = Vec::new();
        s.read_to_end(&mut got)?;
        s.write_all(&pattern(down, 2))?;
        s.shutdown(std::net::Shutdown::Write)?;
        Ok(got)
    });
    let got_down = in_ns(client_ns, move || {
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::from((server_ip, port)),
            Duration::from_secs(10),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(&pattern(up, 1))?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut got = Vec::new();
        s.read_to_end(&mut got)?;
        Ok(got)
    })?;
    let got_up = srv
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    if got_up != pattern(up, 1) {
        bail!("upload corrupted or short: {} of {up} bytes", got_up.len());
    }
    if got_down != pattern(down, 2) {
        bail!(
            "download corrupted or short: {} of {down} bytes",
            got_down.len()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- raw frames

fn raw_socket(ifname: &str, all_protocols: bool) -> std::io::Result<OwnedFd> {
    let idx = io::sys::if_index(ifname)?;
    let proto = if all_protocols { 0x0003u16.to_be() } else { 0 };
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            proto as i32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: socket(2) just returned this fd and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = idx as i32;
    // SAFETY: bind(2) reads a sockaddr_ll of the size passed, which lives for the call.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sll as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Write raw Ethernet frames on `ifname` inside namespace `ns`. Returns how many the
/// kernel accepted.
pub fn inject(ns: &str, ifname: &str, frames: Vec<Vec<u8>>) -> Result<usize> {
    let ifname = ifname.to_string();
    in_ns(ns, move || {
        let fd = raw_socket(&ifname, false)?;
        let mut n = 0;
        for f in &frames {
            // SAFETY: send on a bound packet socket.
            let r = unsafe {
                libc::send(
                    fd.as_raw_fd(),
                    f.as_ptr() as *const libc::c_void,
                    f.len(),
                    0,
                )
            };
            if r < 0 {
                return Err(std::io::Error::new(
                    std::io::Error::last_os_error().kind(),
                    format!(
                        "sending a {}-byte frame on {ifname}: {}",
                        f.len(),
                        std::io::Error::last_os_error()
                    ),
                ));
            }
            n += 1;
        }
        Ok(n)
    })
}

/// One captured frame: direction and the (possibly truncated) bytes.
#[derive(Clone, Debug)]
pub struct Captured {
    pub outgoing: bool,
    pub len: usize,
    pub bytes: Vec<u8>,
    /// The kernel had stripped an 802.1Q tag into metadata.
    pub vlan: bool,
    /// virtio_net_hdr GSO type (0 none, 1 TCPv4, 5 UDP L4) and segment size.
    pub gso_type: u8,
    pub gso_size: usize,
}

impl Captured {
    /// How many wire frames this capture stands for (GSO bursts count per segment).
    pub fn wire_frames(&self) -> usize {
        if self.gso_type == 0 || self.gso_size == 0 || self.bytes.len() < 34 {
            return 1;
        }
        let ihl = (self.bytes[14] & 15) as usize * 4;
        let l4h = if self.gso_type == 5 {
            8
        } else {
            (self.bytes.get(14 + ihl + 12).copied().unwrap_or(0x50) >> 4) as usize * 4
        };
        self.len
            .saturating_sub(14 + ihl + l4h)
            .div_ceil(self.gso_size)
            .max(1)
    }
}

/// An AF_PACKET capture of every frame on one interface, both directions.
pub struct Capture {
    stop: Arc<AtomicBool>,
    frames: Arc<Mutex<Vec<Captured>>>,
    thread: Option<JoinHandle<()>>,
}

impl Capture {
    /// Capture the first 256 bytes of every frame.
    pub fn start(ns: &str, ifname: &str) -> Result<Capture> {
        Capture::start_with(ns, ifname, 256)
    }

    /// Capture the first `keep` bytes of every frame.
    pub fn start_with(ns: &str, ifname: &str, keep: usize) -> Result<Capture> {
        let n = ifname.to_string();
        let fd = in_ns(ns, move || {
            let fd = raw_socket(&n, true)?;
            let one: libc::c_int = 1;
            io::sys::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                io::sys::PACKET_AUXDATA,
                &one,
            )?;
            // Offload metadata, so UDP/TCP GSO bursts can be told apart and split.
            io::sys::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                io::sys::PACKET_VNET_HDR,
                &one,
            )?;
            io::sys::set_recv_timeout(fd.as_raw_fd(), 50)?;
            io::sys::set_socket_buffers(fd.as_raw_fd(), 32 << 20);
            Ok(fd)
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let frames = Arc::new(Mutex::new(Vec::new()));
        let (s2, f2) = (stop.clone(), frames.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65600];
            let mut ctrl = [0u64; 16];
            // Once stopped, frames already queued on the socket are still read: a caller
            // that saw an effect of a frame can finish() without sleeping first. A
            // receive that times out (queue empty) ends it, or a bounded wait on a busy
            // interface.
            let mut stopped_at: Option<Instant> = None;
            loop {
                if stopped_at.is_none() && s2.load(Ordering::Relaxed) {
                    stopped_at = Some(Instant::now());
                }
                if stopped_at.is_some_and(|t| t.elapsed() > Duration::from_secs(2)) {
                    break;
                }
                // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
                let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut iov = libc::iovec {
                    iov_base: buf.as_mut_ptr() as *mut libc::c_void,
                    iov_len: buf.len(),
                };
                // SAFETY: msghdr is plain data; all zeroes is a valid (empty) value.
                let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
                mh.msg_name = &mut sll as *mut _ as *mut libc::c_void;
                mh.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                mh.msg_iov = &mut iov;
                mh.msg_iovlen = 1;
                mh.msg_control = ctrl.as_mut_ptr() as *mut libc::c_void;
                mh.msg_controllen = std::mem::size_of_val(&ctrl);
                // SAFETY: all pointers live for the call.
                let r = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut mh, libc::MSG_TRUNC) };
                if r < 0 {
                    if stopped_at.is_some() {
                        break;
                    }
                    continue;
                }
                let len = r as usize;
                let mut vlan = false;
                // SAFETY: the CMSG_* walk stays inside `ctrl`, whose length recvmsg set in
                // msg_controllen; the copy reads one TpacketAuxdata from a cmsg of that type.
                unsafe {
                    let mut c = libc::CMSG_FIRSTHDR(&mh);
                    while !c.is_null() {
                        if (*c).cmsg_level == libc::SOL_PACKET
                            && (*c).cmsg_type == io::sys::PACKET_AUXDATA
                        {
                            let mut a = io::sys::TpacketAuxdata::default();
                            std::ptr::copy_nonoverlapping(
                                libc::CMSG_DATA(c),
                                &mut a as *mut _ as *mut u8,
                                std::mem::size_of::<io::sys::TpacketAuxdata>(),
                            );
                            vlan = a.tp_status & io::sys::TP_STATUS_VLAN_VALID != 0;
                        }
                        c = libc::CMSG_NXTHDR(&mh, c);
                    }
                }
                let hl = ::overlay::io::offload::VNET_HDR_LEN;
                if len < hl {
                    continue;
                }
                let vh = ::overlay::io::offload::VnetHdr::parse(&buf).unwrap();
                let len = len - hl;
                let keep = len.min(buf.len() - hl).min(keep);
                f2.lock().unwrap().push(Captured {
                    outgoing: sll.sll_pkttype == libc::PACKET_OUTGOING,
                    len,
                    bytes: buf[hl..hl + keep].to_vec(),
                    vlan,
                    gso_type: vh.gso_type,
                    gso_size: vh.gso_size as usize,
                });
            }
        });
        Ok(Capture {
            stop,
            frames,
            thread: Some(thread),
        })
    }

    /// Everything captured so far.
    pub fn frames(&self) -> Vec<Captured> {
        self.frames.lock().unwrap().clone()
    }

    /// Stop and return everything, including frames still queued on the socket.
    pub fn finish(mut self) -> Vec<Captured> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.frames()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// The frame builders the overlay core's unit tests use too (one set).
pub use ::overlay::frames::{arp, eth, icmp_echo, ipv4, udp};

/// A BOOTP/DHCP reply skeleton (op 2) with a DHCP message type option.
pub fn dhcp_offer(server: Ipv4Addr, yiaddr: Ipv4Addr, chaddr: MacAddr) -> Vec<u8> {
    let mut b = vec![0u8; 236];
    b[0] = 2;
    b[1] = 1;
    b[2] = 6;
    b[16..20].copy_from_slice(&yiaddr.octets());
    b[20..24].copy_from_slice(&server.octets());
    b[28..34].copy_from_slice(&chaddr.0);
    b.extend_from_slice(&[99, 130, 83, 99, 53, 1, 2, 54, 4]);
    b.extend_from_slice(&server.octets());
    b.extend_from_slice(&[3, 4]);
    b.extend_from_slice(&server.octets());
    b.push(255);
    b
}

/// An ICMPv6 router advertisement in an IPv6 packet (checksum left zero: the filter
/// must drop it whatever its checksum).
pub fn ipv6_ra(src_mac: MacAddr) -> Vec<u8> {
    let ra = [134u8, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(ra.len() as u16).to_be_bytes());
    p.push(58);
    p.push(255);
    // fe80::5054:ff:fe.. from the MAC, to ff02::1
    let mut src = [0u8; 16];
    src[0] = 0xfe;
    src[1] = 0x80;
    src[8..11].copy_from_slice(&[src_mac.0[0] ^ 2, src_mac.0[1], src_mac.0[2]]);
    src[11] = 0xff;
    src[12] = 0xfe;
    src[13..16].copy_from_slice(&src_mac.0[3..6]);
    let mut dst = [0u8; 16];
    dst[0] = 0xff;
    dst[1] = 0x02;
    dst[15] = 1;
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&ra);
    eth(MacAddr([0x33, 0x33, 0, 0, 0, 1]), src_mac, 0x86dd, &p)
}

/// An IPv6 packet from `src` to `dst`: `exts` are extension headers (next-header
/// values 0, 43, 44, 60), each 8 bytes (a fragment header at offset 0, the others
/// padded with PadN), chained before `upper` carrying `payload`.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, exts: &[u8], upper: u8, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    for (i, _) in exts.iter().enumerate() {
        let next = exts.get(i + 1).copied().unwrap_or(upper);
        // Next header, length 0 (8 bytes); then PadN of 4 (or fragment offset 0).
        let mut h = [next, 0, 1, 4, 0, 0, 0, 0];
        if exts[i] == 44 {
            h[2..].copy_from_slice(&[0, 0, 0, 0, 0x12, 0x34]);
        }
        body.extend_from_slice(&h);
    }
    body.extend_from_slice(payload);
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(body.len() as u16).to_be_bytes());
    p.push(exts.first().copied().unwrap_or(upper));
    p.push(255);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&body);
    p
}

/// An ICMPv6 message of type `ty` (checksum left zero: the filter judges the header
/// chain, not the checksum) with an 8-byte body.
pub fn icmp6(ty: u8) -> Vec<u8> {
    vec![ty, 0, 0, 0, 0x40, 0, 0, 0, 0, 0, 0, 0]
}

/// The all-nodes multicast group and its Ethernet address.
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
pub const ALL_NODES_MAC: MacAddr = MacAddr([0x33, 0x33, 0, 0, 0, 1]);

/// `ping -6 -c n` from a namespace (to a link-local address, `dst%ifname`); true if
/// all replies came back.
pub fn ping6(ns: &Netns, dst: &str, n: u32) -> bool {
    ns.command("ping")
        .args(["-6", "-c", &n.to_string(), "-i", "0.2", "-W", "2", dst])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Insert an 802.1Q tag (VLAN `vid`) after the MAC addresses.
pub fn vlan_tag(frame: &[u8], vid: u16) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&[0x81, 0x00]);
    f.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    f
}

/// MAC of an interface inside a namespace.
pub fn mac_of(ns: &Netns, ifname: &str) -> Result<MacAddr> {
    let o = ns.exec("cat", &[&format!("/sys/class/net/{ifname}/address")])?;
    Ok(String::from_utf8_lossy(&o.stdout).trim().parse()?)
}

/// Build the underlay: a bridge namespace joining `hosts` (name, uplink ifname, ip/24).
pub fn underlay(bridge_ns: &Netns, hosts: &[(&Netns, &str, Ipv4Addr)], prefix: &str) -> Result<()> {
    bridge_ns.ip(&["link", "add", "br0", "type", "bridge"])?;
    bridge_ns.ip(&["link", "set", "br0", "up"])?;
    for (i, (ns, ifname, addr)) in hosts.iter().enumerate() {
        let port = format!("{prefix}p{i}");
        veth(ns, ifname, &format!("{addr}/24"), bridge_ns, &port, "")?;
        bridge_ns.ip(&["link", "set", &port, "master", "br0"])?;
    }
    Ok(())
}

/// The UDP payloads (one per datagram; a UDP GSO burst holds several) of a captured
/// IPv4 frame with destination port `dport`.
pub fn udp_payloads_to(f: &Captured, dport: u16) -> Vec<Vec<u8>> {
    let b = &f.bytes;
    if b.len() < 34 || b[12..14] != [8, 0] || b[23] != 17 || f.len != b.len() {
        return Vec::new();
    }
    let ihl = (b[14] & 15) as usize * 4;
    let u = 14 + ihl;
    if b.len() < u + 8 || u16::from_be_bytes([b[u + 2], b[u + 3]]) != dport {
        return Vec::new();
    }
    let data = &b[u + 8..];
    if f.gso_type == 5 && f.gso_size > 0 {
        data.chunks(f.gso_size).map(|c| c.to_vec()).collect()
    } else {
        let ulen = u16::from_be_bytes([b[u + 4], b[u + 5]]) as usize;
        if ulen < 8 || b.len() < u + ulen {
            return Vec::new();
        }
        vec![b[u + 8..u + ulen].to_vec()]
    }
}
