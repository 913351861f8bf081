//! A user-space delay line: frames crossing a namespace between two interfaces are
//! held for a fixed time each way. This kernel has no netem, so a test that needs
//! hosts at different round trips puts one of these on a host's uplink.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::netns::Netns;

/// Both directions of a delay line; stops when dropped.
pub struct DelayLine {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn packet_socket(ifname: &str) -> std::io::Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as i32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname).expect("no NUL");
    // SAFETY: name is a valid C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = index as i32;
    // SAFETY: sll is a valid sockaddr_ll of the size passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: tv is a live timeval of the size passed.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    Ok(fd)
}

type Queue = Arc<(Mutex<VecDeque<(Instant, Vec<u8>)>>, Condvar)>;

fn direction(
    from: Arc<OwnedFd>,
    to: Arc<OwnedFd>,
    delay: Duration,
    stop: Arc<AtomicBool>,
) -> Vec<JoinHandle<()>> {
    let q: Queue = Arc::new((Mutex::new(VecDeque::new()), Condvar::new()));
    let rq = q.clone();
    let rstop = stop.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while !rstop.load(Ordering::SeqCst) {
            // SAFETY: sockaddr_ll is plain data.
            let mut from_addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut alen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: buf and from_addr are live buffers of the sizes passed.
            let n = unsafe {
                libc::recvfrom(
                    from.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from_addr as *mut libc::sockaddr_ll).cast(),
                    &mut alen,
                )
            };
            if n <= 0 {
                continue;
            }
            // Frames we wrote out of this interface come back here: not ours to forward.
            if from_addr.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let (m, cv) = &*rq;
            m.lock()
                .unwrap()
                .push_back((Instant::now() + delay, buf[..n as usize].to_vec()));
            cv.notify_one();
        }
    });
    let writer = std::thread::spawn(move || {
        let (m, cv) = &*q;
        while !stop.load(Ordering::SeqCst) {
            let mut g = m.lock().unwrap();
            match g.front() {
                None => {
                    let _ = cv.wait_timeout(g, Duration::from_millis(100)).unwrap();
                }
                Some((due, _)) if *due > Instant::now() => {
                    let wait = *due - Instant::now();
                    let _ = cv.wait_timeout(g, wait).unwrap();
                }
                Some(_) => {
                    let (_, frame) = g.pop_front().unwrap();
                    drop(g);
                    // SAFETY: frame is a live buffer of the length passed.
                    unsafe {
                        libc::send(to.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0);
                    }
                }
            }
        }
    });
    vec![reader, writer]
}

/// Forwards every frame between `a` and `b` (interfaces in `ns`) after `one_way`.
/// Offloads are turned off on both; the hosts at either end must turn off TSO, GSO
/// and TX checksum offload on their interfaces too (`ethtool -K IF tso off gso off
/// tx off`): a packet socket hands over a veth's frames as they are, superframes and
/// unfinished checksums included.
pub fn delay_line(ns: &Netns, a: &str, b: &str, one_way: Duration) -> Result<DelayLine> {
    for i in [a, b] {
        let o = ns.exec(
            "ethtool",
            &[
                "-K", i, "tso", "off", "gso", "off", "gro", "off", "tx", "off",
            ],
        )?;
        if !o.status.success() {
            bail!("ethtool -K {i}: {}", String::from_utf8_lossy(&o.stderr));
        }
    }
    let nsh = overlay::io::NetNs::open(ns.name())?;
    let (a2, b2) = (a.to_string(), b.to_string());
    let (fa, fb) = nsh.run(move || Ok((packet_socket(&a2)?, packet_socket(&b2)?)))?;
    let (fa, fb) = (Arc::new(fa), Arc::new(fb));
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = direction(fa.clone(), fb.clone(), one_way, stop.clone());
    threads.extend(direction(fb, fa, one_way, stop.clone()));
    Ok(DelayLine { stop, threads })
}
