//! The overlay's kernel path without the overlay: a latency floor.
//!
//! Forwards raw frames the way the node's I/O shells do, with the same sockets opened
//! by the same code (the guest port: `PacketPort` in the lease namespace, with vnet
//! headers and auxdata; the buyer: a `Tap` with offloads; UDP with GRO on receive and
//! a `UDP_SEGMENT` control message on send; epoll; the host's answer read right after
//! the tap write), but with no encryption, filter, switch or batching: one frame per
//! system call, straight through. What it adds to a ping round trip over vde2 is what
//! the design's system calls cost; what cpushare adds over it is our own per-frame work.
//! `scripts/overlay-latency-hops.sh` runs it (`FLOOR=1`).
//!
//! ```text
//! seller: bare_forwarder seller <lease-netns> <guest-iface> <buyer-ip:port>   (in the seller's netns)
//! buyer:  bare_forwarder buyer <tap-name> <listen-ip:port>                     (in the buyer's netns)
//! ```
//! Root only; runs until killed. Not part of the product.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};

use nix::sys::socket::{self, MsgFlags, SockaddrIn};
use overlay::io::offload::VNET_HDR_LEN;
use overlay::io::spin::{Poller, Wake};
use overlay::io::{NetNs, PacketPort, Tap, TapOptions};

/// Datagram size the kernel may coalesce to with UDP GRO on (single frames here).
const BUF: usize = 65536 + VNET_HDR_LEN;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let r = match args.get(1).map(String::as_str) {
        Some("seller") if args.len() == 5 => seller(&args[2], &args[3], &args[4]),
        Some("buyer") if args.len() == 4 => buyer(&args[2], &args[3]),
        _ => Err("usage: bare_forwarder seller <lease-netns> <guest-iface> <buyer-ip:port> | buyer <tap-name> <listen-ip:port>".into()),
    };
    if let Err(e) = r {
        eprintln!("bare_forwarder: {e}");
        std::process::exit(1);
    }
}

type Res = Result<(), Box<dyn std::error::Error>>;

fn udp_gro(fd: RawFd) {
    let _ = overlay::io::sys::setsockopt(fd, libc::SOL_UDP, libc::UDP_GRO, &1 as &libc::c_int);
}

/// send(2) with a UDP_SEGMENT control message, as the shells' send batches do. Raw
/// libc on purpose: nix's sendmsg allocates its control buffer on every call, which
/// this floor must not add.
fn send_gso(fd: RawFd, buf: &[u8], to: Option<&libc::sockaddr_in>) -> isize {
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut ctrl = [0u64; 4];
    // SAFETY: msghdr is plain; every pointer below refers to a live local.
    unsafe {
        let mut m: libc::msghdr = std::mem::zeroed();
        m.msg_iov = &mut iov;
        m.msg_iovlen = 1;
        if let Some(a) = to {
            m.msg_name = a as *const _ as *mut libc::c_void;
            m.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
        }
        m.msg_control = ctrl.as_mut_ptr() as *mut libc::c_void;
        m.msg_controllen = libc::CMSG_SPACE(2) as usize;
        let c = libc::CMSG_FIRSTHDR(&m);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = libc::UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, 1472);
        libc::sendmsg(fd, &m, 0)
    }
}

/// The fds of `fds` that are readable, waiting as long as it takes (the shells' own
/// epoll set; its doorbell is never rung here).
fn wait(poller: &mut Poller, fds: &[RawFd]) -> Vec<RawFd> {
    let mask = poller.wait(-1).unwrap_or(0);
    (0..fds.len())
        .filter(|i| mask & (1 << i) != 0)
        .map(|i| fds[i])
        .collect()
}

/// A non-blocking recv(2); 0 when nothing is queued.
fn recv(fd: RawFd, buf: &mut [u8]) -> usize {
    socket::recv(fd, buf, MsgFlags::MSG_DONTWAIT).unwrap_or(0)
}

fn seller(netns: &str, iface: &str, buyer: &str) -> Res {
    let buyer: SocketAddr = buyer.parse()?;
    let udp = UdpSocket::bind("0.0.0.0:0")?;
    udp.connect(buyer)?;
    let u = udp.as_raw_fd();
    udp_gro(u);
    let port = PacketPort::open_in(&NetNs::open(netns)?, iface)?;
    let k = port.as_raw_fd();
    let fds = [k, u];
    let bell = Wake::new()?;
    let mut poller = Poller::new(&fds, &bell)?;
    let mut buf = vec![0u8; BUF];
    let mut aux = [0u64; 8];
    loop {
        for fd in wait(&mut poller, &fds) {
            if fd == k {
                loop {
                    // recvmsg with room for the auxdata the port asks for.
                    let mut iov = libc::iovec {
                        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
                        iov_len: buf.len(),
                    };
                    // SAFETY: msghdr is plain; its pointers refer to live locals.
                    let n = unsafe {
                        let mut m: libc::msghdr = std::mem::zeroed();
                        m.msg_iov = &mut iov;
                        m.msg_iovlen = 1;
                        m.msg_control = aux.as_mut_ptr() as *mut libc::c_void;
                        m.msg_controllen = std::mem::size_of_val(&aux);
                        libc::recvmsg(k, &mut m, libc::MSG_DONTWAIT)
                    };
                    if n <= VNET_HDR_LEN as isize {
                        break;
                    }
                    send_gso(u, &buf[VNET_HDR_LEN..n as usize], None);
                }
            } else {
                loop {
                    let n = recv(u, &mut buf[VNET_HDR_LEN..]);
                    if n == 0 {
                        break;
                    }
                    buf[..VNET_HDR_LEN].fill(0);
                    let _ = socket::send(k, &buf[..VNET_HDR_LEN + n], MsgFlags::empty());
                }
            }
        }
    }
}

fn buyer(tap_name: &str, listen: &str) -> Res {
    let tap = Tap::create(tap_name, TapOptions { offload: true })?;
    tap.set_nonblocking(true)?;
    let t = tap.as_raw_fd();
    let udp = UdpSocket::bind(listen)?;
    udp.set_nonblocking(true)?;
    let u = udp.as_raw_fd();
    udp_gro(u);
    let fds = [u, t];
    let bell = Wake::new()?;
    let mut poller = Poller::new(&fds, &bell)?;
    let mut buf = vec![0u8; BUF];
    let mut peer: Option<libc::sockaddr_in> = None;
    let answer = |buf: &mut [u8], peer: &libc::sockaddr_in| loop {
        match tap.read(buf) {
            Ok(n) if n > VNET_HDR_LEN => send_gso(u, &buf[VNET_HDR_LEN..n], Some(peer)),
            _ => break,
        };
    };
    loop {
        for fd in wait(&mut poller, &fds) {
            if fd == u {
                // The socket is non-blocking: recvfrom returns at once when empty.
                while let Ok((n, Some(from))) =
                    socket::recvfrom::<SockaddrIn>(u, &mut buf[VNET_HDR_LEN..])
                {
                    let from = libc::sockaddr_in::from(from);
                    peer = Some(from);
                    buf[..VNET_HDR_LEN].fill(0);
                    let _ = tap.write(&buf[..VNET_HDR_LEN + n]);
                    // The host's kernel has answered inside the write: send it now.
                    answer(&mut buf, &from);
                }
            } else if let Some(p) = peer {
                answer(&mut buf, &p);
            } else {
                // No peer yet: drop what the host sends.
                while tap.read(&mut buf).is_ok_and(|n| n > 0) {}
            }
        }
    }
}
