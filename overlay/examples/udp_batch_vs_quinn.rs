//! The overlay's UDP batch layer (`io::batch`) against `quinn-udp`, on loopback, for
//! the traffic the overlay sends: issue 15 asks whether quinn-udp should replace it.
//!
//! Three loads, each run by both implementations in turn (interleaved, `REPS` times):
//! - `bulk`: 1452-byte datagrams to one peer, 64 at a time (a TCP stream's data).
//! - `mixed`: the same with every other datagram 80 bytes (data and ACKs of two TCP
//!   streams going opposite ways, as one seller's send batch carries them).
//! - `ping`: one 120-byte datagram answered by one, back and forth (interactive).
//!
//! Sender and receiver are two threads; what is reported is each thread's CPU time
//! (CLOCK_THREAD_CPUTIME_ID) per datagram or round trip, which a loaded machine
//! disturbs far less than wall time, and the share of datagrams delivered. Both sides
//! use the same socket options (GSO on send, GRO on receive, 8 MiB receive buffer).
//!
//! ```text
//! cargo run --release -p overlay --example udp_batch_vs_quinn [N_BULK] [N_PING] [REPS]
//! ```
//! Not part of the product.

use std::io::IoSliceMut;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use overlay::io::batch::{RecvBatch, SendBatch};
use overlay::io::shell::{UDP_BATCH, UDP_GRO_SLOT, UDP_SLOT};
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};

const BIG: usize = 1452;
const SMALL: usize = 80;
const PING: usize = 120;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Imp {
    Ours,
    Quinn,
}

/// This thread's CPU time in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    assert_eq!(r, 0, "clock_gettime");
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

fn big_rcvbuf(s: &UdpSocket) {
    let v: libc::c_int = 8 << 20;
    // SAFETY: setsockopt reads one c_int through a valid pointer.
    let _ = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// Two connected loopback sockets.
fn pair() -> (UdpSocket, UdpSocket) {
    let a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").unwrap();
    a.connect(b.local_addr().unwrap()).unwrap();
    b.connect(a.local_addr().unwrap()).unwrap();
    big_rcvbuf(&a);
    big_rcvbuf(&b);
    (a, b)
}

/// A sender of datagrams of `sizes` (cycled) in batches of `UDP_BATCH`.
enum Tx {
    Ours(SendBatch),
    Quinn(UdpSocketState, Vec<u8>),
}

impl Tx {
    fn new(imp: Imp, s: &UdpSocket) -> Tx {
        match imp {
            Imp::Ours => {
                let mut b = SendBatch::new(UDP_BATCH, UDP_SLOT);
                b.set_gso(true);
                b.set_connected(Some(s.peer_addr().unwrap()));
                Tx::Ours(b)
            }
            Imp::Quinn => {
                let st = UdpSocketState::new(UdpSockRef::from(s)).unwrap();
                // quinn-udp makes the socket non-blocking; block like ours does.
                s.set_nonblocking(false).unwrap();
                Tx::Quinn(st, Vec::with_capacity(UDP_BATCH * BIG))
            }
        }
    }

    /// Sends one batch: `lens` datagrams to the socket's peer.
    fn send(&mut self, s: &UdpSocket, dest: SocketAddr, lens: &[usize]) {
        match self {
            Tx::Ours(b) => {
                for &l in lens {
                    b.push(Some(dest), |buf| {
                        buf[..l].fill(0xab);
                        l
                    });
                }
                b.flush(s.as_raw_fd()).unwrap();
            }
            Tx::Quinn(st, buf) => {
                // A transmit is one sendmsg: a run of equal-size datagrams (GSO), the
                // last of a run possibly shorter, as quinn-proto builds them.
                let max = st.max_gso_segments();
                let mut i = 0;
                while i < lens.len() {
                    let seg = lens[i];
                    let mut j = i + 1;
                    let mut total = seg;
                    // One UDP send carries at most 64 KiB (ours stops at 65000 too).
                    while j < lens.len()
                        && j - i < max
                        && lens[j - 1] == seg
                        && lens[j] <= seg
                        && total + lens[j] <= 65000
                    {
                        total += lens[j];
                        j += 1;
                    }
                    buf.clear();
                    for &l in &lens[i..j] {
                        buf.extend(std::iter::repeat_n(0xab, l));
                    }
                    let t = Transmit {
                        destination: dest,
                        ecn: None,
                        contents: buf,
                        segment_size: (j - i > 1).then_some(seg),
                        src_ip: None,
                    };
                    if let Err(e) = st.send(UdpSockRef::from(s), &t) {
                        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "quinn-udp send");
                    }
                    i = j;
                }
            }
        }
    }
}

/// Waits up to `ms` for `s` to be readable, as the shells' epoll wait does.
fn readable(s: &UdpSocket, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes one pollfd through a valid pointer.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

/// A receiver counting datagrams (GRO segments split as each implementation does).
/// Like the shells: wait for readability, then one non-blocking batch receive.
enum Rx {
    Ours(RecvBatch),
    Quinn(UdpSocketState, Vec<Vec<u8>>, Vec<RecvMeta>),
}

impl Rx {
    fn new(imp: Imp, s: &UdpSocket) -> Rx {
        let r = match imp {
            Imp::Ours => {
                let b = RecvBatch::new(UDP_BATCH, UDP_GRO_SLOT);
                assert!(b.enable_udp_gro(s.as_raw_fd()), "UDP_GRO");
                Rx::Ours(b)
            }
            Imp::Quinn => {
                let st = UdpSocketState::new(UdpSockRef::from(s)).unwrap();
                let n = quinn_udp::BATCH_SIZE;
                Rx::Quinn(
                    st,
                    vec![vec![0; UDP_GRO_SLOT]; n],
                    vec![RecvMeta::default(); n],
                )
            }
        };
        s.set_nonblocking(true).unwrap();
        r
    }

    /// Waits up to `ms`, then takes what is queued: (datagrams, bytes), or None when
    /// nothing came.
    fn recv(&mut self, s: &UdpSocket, ms: i32) -> Option<(usize, usize)> {
        if !readable(s, ms) {
            return None;
        }
        let (mut d, mut bytes) = (0, 0);
        match self {
            Rx::Ours(b) => {
                let n = b.recv_nowait(s.as_raw_fd()).ok()?;
                for i in 0..n {
                    for seg in b.segments(i) {
                        d += 1;
                        bytes += seg.len();
                    }
                }
            }
            Rx::Quinn(st, bufs, meta) => {
                let mut io: Vec<IoSliceMut> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                let n = st.recv(UdpSockRef::from(s), &mut io, meta).ok()?;
                for (m, b) in meta.iter().zip(io.iter()).take(n) {
                    for seg in b[..m.len].chunks(m.stride.max(1)) {
                        d += 1;
                        bytes += seg.len();
                    }
                }
            }
        }
        Some((d, bytes))
    }
}

struct Stream {
    tx_ns_per_dgram: f64,
    rx_ns_per_dgram: f64,
    delivered: f64,
}

/// Sends `n` datagrams of `sizes` (cycled) from one thread to another.
fn stream(imp: Imp, n: usize, sizes: &[usize]) -> Stream {
    let (a, b) = pair();
    let done = Arc::new(AtomicBool::new(false));
    let rx = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut r = Rx::new(imp, &b);
            let (mut got, mut cpu) = (0usize, 0u64);
            let t0 = thread_cpu_ns();
            loop {
                match r.recv(&b, 300) {
                    Some((d, _)) => {
                        got += d;
                        cpu = thread_cpu_ns() - t0;
                    }
                    None if done.load(Ordering::Acquire) => break,
                    None => {}
                }
            }
            (got, cpu)
        })
    };
    let dest = a.peer_addr().unwrap();
    let mut t = Tx::new(imp, &a);
    let lens: Vec<usize> = (0..UDP_BATCH).map(|i| sizes[i % sizes.len()]).collect();
    let t0 = thread_cpu_ns();
    let mut sent = 0;
    while sent < n {
        t.send(&a, dest, &lens);
        sent += lens.len();
    }
    let tx_cpu = thread_cpu_ns() - t0;
    done.store(true, Ordering::Release);
    let (got, rx_cpu) = rx.join().unwrap();
    Stream {
        tx_ns_per_dgram: tx_cpu as f64 / sent as f64,
        rx_ns_per_dgram: rx_cpu as f64 / got.max(1) as f64,
        delivered: got as f64 / sent as f64,
    }
}

/// `n` round trips of one small datagram; both threads' CPU per round trip.
fn ping(imp: Imp, n: usize) -> f64 {
    let (a, b) = pair();
    let echo = std::thread::spawn(move || {
        let (mut t, mut r) = (Tx::new(imp, &b), Rx::new(imp, &b));
        let dest = b.peer_addr().unwrap();
        let t0 = thread_cpu_ns();
        let mut k = 0;
        while k < n {
            let Some((d, _)) = r.recv(&b, 2000) else {
                break;
            };
            for _ in 0..d {
                t.send(&b, dest, &[PING]);
            }
            k += d;
        }
        thread_cpu_ns() - t0
    });
    let (mut t, mut r) = (Tx::new(imp, &a), Rx::new(imp, &a));
    let dest = a.peer_addr().unwrap();
    let t0 = thread_cpu_ns();
    let mut done = 0;
    while done < n {
        t.send(&a, dest, &[PING]);
        match r.recv(&a, 2000) {
            Some((d, _)) => done += d,
            None => panic!("{imp:?}: a ping was lost on loopback"),
        }
    }
    let mine = thread_cpu_ns() - t0;
    let theirs = echo.join().unwrap();
    (mine + theirs) as f64 / n as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers: N_BULK N_PING REPS"))
        .collect();
    let n_bulk = args.first().copied().unwrap_or(400_000);
    let n_ping = args.get(1).copied().unwrap_or(20_000);
    let reps = args.get(2).copied().unwrap_or(5);
    println!(
        "quinn-udp BATCH_SIZE {}, ours {UDP_BATCH}; {n_bulk} datagrams per stream, {n_ping} round trips, {reps} interleaved reps; medians",
        quinn_udp::BATCH_SIZE
    );
    println!();
    println!("| load | metric | io::batch | quinn-udp | quinn / ours |");
    println!("|---|---|---:|---:|---:|");
    for (name, sizes) in [("bulk", &[BIG][..]), ("mixed", &[BIG, SMALL][..])] {
        let mut r: [Vec<Stream>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..reps {
            for (k, imp) in [Imp::Ours, Imp::Quinn].into_iter().enumerate() {
                r[k].push(stream(imp, n_bulk, sizes));
            }
        }
        type Pick = fn(&Stream) -> f64;
        let rows: [(&str, Pick); 3] = [
            ("sender CPU ns/datagram", |s| s.tx_ns_per_dgram),
            ("receiver CPU ns/datagram", |s| s.rx_ns_per_dgram),
            ("delivered %", |s| s.delivered * 100.0),
        ];
        for (metric, f) in rows {
            let ours = median(r[0].iter().map(f).collect());
            let quinn = median(r[1].iter().map(f).collect());
            println!(
                "| {name} | {metric} | {ours:.0} | {quinn:.0} | {:.2} |",
                quinn / ours
            );
        }
    }
    let mut p: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..reps {
        for (k, imp) in [Imp::Ours, Imp::Quinn].into_iter().enumerate() {
            p[k].push(ping(imp, n_ping));
        }
    }
    let (ours, quinn) = (median(p[0].clone()), median(p[1].clone()));
    println!(
        "| ping | both threads' CPU ns/round trip | {ours:.0} | {quinn:.0} | {:.2} |",
        quinn / ours
    );
}
