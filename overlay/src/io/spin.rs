//! Taking thread wake-ups off the round trip: one waiter per side when idle, and
//! bounded busy-polling for the answer after a frame is forwarded.
//!
//! Each side has two threads, one per direction, so that bulk traffic both ways
//! uses two cores. When traffic is light, though, a second thread only adds
//! wake-ups: the thread that sleeps on the other direction's fd is woken by every
//! answer (and, if it sleeps on a halted CPU, that wake-up is the dearest part of
//! the round trip in a VM). So the *home* thread owns both fds while the second
//! direction is light and waits on both; the *helper* thread takes that direction
//! over only while it brings full batches ([`Handoff`]), and hands it back after
//! it has been quiet for [`HANDBACK`].
//!
//! After forwarding a frame, the home thread polls its fds without blocking
//! (yielding the CPU to anything runnable in between) for up to a budget before it
//! parks ([`Spin`]): the answer (a ping reply, a TCP ACK, an application's
//! response) then needs no wake-up at all. It spins only where that has been paying
//! off: for frames sent across the network and for frames sent to the local port
//! (guest, host tap) apart, it measures how long until the next input came back
//! from that side (spinning or not), and spins after a send only while at least
//! half of the last [`SAMPLES`] delays fit the budget. A frame to a buyer over the
//! internet is answered a network round trip later, a guest that only sends never
//! answers what it gets; then the measurement is all it costs.
//!
//! Cost: at most one budget of one CPU per forwarded burst, so CPU use grows with the
//! packet rate up to one core when bursts come more often than every budget (and
//! then the thread would have been busy anyway). Budget zero turns spinning off.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::sys::borrowed;

/// Default spin budget: a bit more than a round trip through a local overlay.
pub const DEFAULT_BUDGET: Duration = Duration::from_micros(200);
/// Reply delays remembered for the spin decision.
pub const SAMPLES: usize = 8;
/// A helper hands its direction back after this long without input.
pub const HANDBACK: Duration = Duration::from_millis(20);

/// A thread's doorbell: an eventfd it waits on besides its fds, rung only when the
/// thread is really parked.
#[derive(Debug)]
pub struct Wake {
    efd: EventFd,
    parked: AtomicBool,
}

impl Wake {
    pub fn new() -> io::Result<Wake> {
        Ok(Wake {
            efd: EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?,
            parked: AtomicBool::new(false),
        })
    }

    /// Make the owner re-check its state (after the caller changed it).
    pub fn ring(&self) {
        if self.parked.swap(false, Ordering::SeqCst) {
            self.interrupt();
        }
    }

    /// Get the owner out of any wait, now or its next one (stopping: the caller has set
    /// the flag the owner checks before it waits again).
    pub fn interrupt(&self) {
        // Only fails when the counter is saturated: the owner has a wake-up queued.
        let _ = self.efd.write(1);
    }

    /// Block until one of the poller's enabled fds is readable, the bell rings or
    /// `timeout_ms` passes; returns the readable fds (bit i = fd i of the poller).
    /// `still` is checked after announcing the park: if it says the state changed
    /// meanwhile, return at once (a ringer that saw us awake did not write the fd).
    pub fn park(
        &self,
        poller: &mut Poller,
        timeout_ms: i32,
        still: impl Fn() -> bool,
    ) -> io::Result<u32> {
        self.parked.store(true, Ordering::SeqCst);
        if !still() {
            self.parked.store(false, Ordering::SeqCst);
            return Ok(0);
        }
        let r = poller.wait(timeout_ms);
        self.parked.store(false, Ordering::SeqCst);
        r
    }
}

/// Readiness of a thread's fds and its doorbell, through one epoll set. Unlike
/// poll(2), a wait registers nothing and reports which fd is ready, so the thread
/// reads only that one: no empty non-blocking reads on the round trip.
#[derive(Debug)]
pub struct Poller {
    ep: Epoll,
    bell: RawFd,
    fds: Vec<RawFd>,
}

/// epoll user data of the doorbell (fds use their index).
const BELL: u64 = u64::MAX;

impl Poller {
    /// Watch `fds` (bit i of every result is `fds[i]`, at most 31) and `bell`'s eventfd.
    pub fn new(fds: &[RawFd], bell: &Wake) -> io::Result<Poller> {
        let p = Poller {
            ep: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?,
            bell: bell.efd.as_raw_fd(),
            fds: fds.iter().copied().take(31).collect(),
        };
        p.ep.add(&bell.efd, EpollEvent::new(EpollFlags::EPOLLIN, BELL))?;
        for (i, fd) in p.fds.iter().enumerate() {
            p.ep.add(
                borrowed(*fd),
                EpollEvent::new(EpollFlags::EPOLLIN, i as u64),
            )?;
        }
        Ok(p)
    }

    /// Watch fd `i` or stop watching it (another thread serves it meanwhile).
    pub fn watch(&mut self, i: usize, on: bool) -> io::Result<()> {
        let events = if on {
            EpollFlags::EPOLLIN
        } else {
            EpollFlags::empty()
        };
        let mut ev = EpollEvent::new(events, i as u64);
        Ok(self.ep.modify(borrowed(self.fds[i]), &mut ev)?)
    }

    /// Readable fds now, or after waiting up to `timeout_ms` (0: do not wait). A rung
    /// bell is consumed and reported as no fd.
    pub fn wait(&mut self, timeout_ms: i32) -> io::Result<u32> {
        let mut evs = [EpollEvent::empty(); 8];
        // Below -1 means "forever" too.
        let timeout = EpollTimeout::try_from(timeout_ms.max(-1)).unwrap_or(EpollTimeout::NONE);
        let n = loop {
            match self.ep.wait(&mut evs, timeout) {
                Ok(n) => break n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let mut mask = 0;
        for ev in &evs[..n] {
            let data = ev.data();
            if data == BELL {
                // Consume the ring (non-blocking: nothing to read is fine).
                let _ = nix::unistd::read(self.bell, &mut [0u8; 8]);
            } else {
                mask |= 1 << data;
            }
        }
        Ok(mask)
    }
}

/// Who serves a direction: the home thread (light traffic) or the helper (bulk).
#[derive(Debug, Default)]
pub struct Handoff {
    helper: AtomicBool,
}

impl Handoff {
    /// Is the helper serving the direction now?
    pub fn helper(&self) -> bool {
        self.helper.load(Ordering::SeqCst)
    }

    /// The home thread saw a full batch: give the direction to the helper.
    pub fn to_helper(&self, helper: &Wake) {
        if !self.helper.swap(true, Ordering::SeqCst) {
            helper.ring();
        }
    }

    /// The helper saw it quiet: give it back to the home thread.
    pub fn to_home(&self, home: &Wake) {
        if self.helper.swap(false, Ordering::SeqCst) {
            home.ring();
        }
    }
}

/// How soon answers came after recent frames sent one way.
#[derive(Debug, Clone, Default)]
struct Answers {
    sent_at: Option<Instant>,
    delays: [Duration; SAMPLES],
    n: usize,
}

impl Answers {
    /// Time the first frame of a burst.
    fn sent(&mut self, now: Instant) {
        if self.sent_at.is_none() {
            self.sent_at = Some(now);
        }
    }

    fn got(&mut self, now: Instant) {
        if let Some(k) = self.sent_at.take() {
            self.record(now.saturating_duration_since(k));
        }
    }

    fn record(&mut self, d: Duration) {
        self.delays[self.n % SAMPLES] = d;
        self.n += 1;
    }

    /// At least half of the recent answers came within `budget` (optimistic until
    /// a few are known).
    fn fit(&self, budget: Duration) -> bool {
        if self.n < SAMPLES / 2 {
            return true;
        }
        let have = self.n.min(SAMPLES);
        let fit = self.delays[..have].iter().filter(|d| **d <= budget).count();
        fit * 2 >= have
    }
}

/// When the home thread spins (pure logic: time is passed in). Answers to frames
/// sent across the network and to frames sent to the local port are timed apart:
/// after a send it spins only if answers to that kind of send have been coming
/// within the budget (a far buyer; a guest that never answers, e.g. when it is the
/// one pinging).
#[derive(Debug, Clone)]
pub struct Spin {
    budget: Duration,
    until: Option<Instant>,
    remote: Answers,
    local: Answers,
}

impl Spin {
    pub fn new(budget: Duration) -> Spin {
        Spin {
            budget,
            until: None,
            remote: Answers::default(),
            local: Answers::default(),
        }
    }

    pub fn budget(&self) -> Duration {
        self.budget
    }

    fn open(&mut self, now: Instant) {
        let end = now + self.budget;
        self.until = Some(self.until.map_or(end, |u| u.max(end)));
    }

    /// A frame went out across the network.
    pub fn sent_remote(&mut self, now: Instant) {
        self.remote.sent(now);
        if self.remote_fits() {
            self.open(now);
        }
    }

    /// A frame went to the local port (guest, host tap).
    pub fn sent_local(&mut self, now: Instant) {
        self.local.sent(now);
        if self.local_fits() {
            self.open(now);
        }
    }

    /// A frame went to the local port and its answer was read right away (the
    /// kernel answered within the write): nothing to wait for.
    pub fn local_answered_at_once(&mut self) {
        self.local.sent_at = None;
        self.local.record(Duration::ZERO);
    }

    /// Datagrams arrived from the network.
    pub fn got_remote(&mut self, now: Instant) {
        self.remote.got(now);
        self.answered();
    }

    /// Frames arrived from the local port.
    pub fn got_local(&mut self, now: Instant) {
        self.local.got(now);
        self.answered();
    }

    /// Nothing left to wait for: stop spinning (forwarding the answer may reopen).
    fn answered(&mut self) {
        if self.remote.sent_at.is_none() && self.local.sent_at.is_none() {
            self.until = None;
        }
    }

    /// Whether answers from the network have been coming within the budget.
    pub fn remote_fits(&self) -> bool {
        !self.budget.is_zero() && self.remote.fit(self.budget)
    }

    /// Whether answers from the local port have been coming within the budget.
    pub fn local_fits(&self) -> bool {
        !self.budget.is_zero() && self.local.fit(self.budget)
    }

    /// Keep polling instead of parking?
    pub fn spinning(&mut self, now: Instant) -> bool {
        match self.until {
            Some(u) if now < u => true,
            Some(_) => {
                self.until = None;
                false
            }
            None => false,
        }
    }
}

/// Give the CPU to anything runnable, then come back (one spin step).
pub fn yield_now() {
    // Cannot fail on Linux.
    let _ = nix::sched::sched_yield();
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Duration = Duration::from_micros(100);

    #[test]
    fn a_local_send_opens_one_budget() {
        let t = Instant::now();
        let mut s = Spin::new(B);
        assert!(!s.spinning(t));
        s.sent_local(t);
        assert!(s.spinning(t + B / 2));
        assert!(!s.spinning(t + B));
    }

    #[test]
    fn the_answer_ends_the_spin() {
        let t = Instant::now();
        let mut s = Spin::new(B);
        s.sent_remote(t);
        s.sent_local(t);
        s.got_local(t + B / 4);
        assert!(s.spinning(t + B / 4), "still waiting for the network");
        s.got_remote(t + B / 2);
        assert!(!s.spinning(t + B / 2));
    }

    #[test]
    fn zero_budget_never_spins() {
        let t = Instant::now();
        let mut s = Spin::new(Duration::ZERO);
        s.sent_local(t);
        s.sent_remote(t);
        assert!(!s.spinning(t));
        assert!(!s.remote_fits());
        assert!(!s.local_fits());
    }

    #[test]
    fn remote_sends_stop_spinning_when_answers_come_late() {
        let t = Instant::now();
        let mut s = Spin::new(B);
        // Optimistic until enough samples exist.
        s.sent_remote(t);
        assert!(s.spinning(t));
        // Answers 10 ms after each send (a far peer).
        let mut now = t;
        for _ in 0..SAMPLES {
            s.sent_remote(now);
            now += Duration::from_millis(10);
            s.got_remote(now);
            now += Duration::from_millis(1);
        }
        assert!(!s.remote_fits());
        s.sent_remote(now);
        assert!(!s.spinning(now), "a far peer must not make us spin");
        // Answers come quickly again (the path changed): spinning resumes.
        for _ in 0..SAMPLES {
            now += Duration::from_micros(30);
            s.got_remote(now);
            now += Duration::from_millis(1);
            s.sent_remote(now);
        }
        assert!(s.remote_fits());
        assert!(s.spinning(now));
    }

    #[test]
    fn the_first_send_of_a_burst_is_the_one_timed() {
        let t = Instant::now();
        let mut s = Spin::new(B);
        for i in 0..SAMPLES {
            let t0 = t + Duration::from_millis(10 * i as u64);
            s.sent_remote(t0);
            s.sent_remote(t0 + Duration::from_micros(90));
            s.got_remote(t0 + Duration::from_micros(150));
        }
        // Every answer came 150 us after the burst began: over the budget.
        assert!(!s.remote_fits());
    }

    #[test]
    fn half_the_samples_in_budget_is_enough() {
        let t = Instant::now();
        let mut s = Spin::new(B);
        let mut now = t;
        for i in 0..SAMPLES {
            s.sent_remote(now);
            now += if i % 2 == 0 {
                Duration::from_micros(50)
            } else {
                Duration::from_millis(5)
            };
            s.got_remote(now);
        }
        assert!(s.remote_fits());
    }

    #[test]
    fn local_and_remote_answers_are_timed_apart() {
        let t = Instant::now();
        let mut s = Spin::new(B);
        let mut now = t;
        // The network answers late, the local port at once.
        for _ in 0..SAMPLES {
            s.sent_remote(now);
            s.sent_local(now);
            now += Duration::from_micros(20);
            s.got_local(now);
            now += Duration::from_millis(10);
            s.got_remote(now);
        }
        assert!(!s.remote_fits());
        assert!(s.local_fits());
        now += Duration::from_millis(1);
        s.sent_remote(now);
        assert!(!s.spinning(now));
        s.sent_local(now);
        assert!(s.spinning(now));
    }

    #[test]
    fn a_port_that_never_answers_stops_local_spins() {
        let t = Instant::now();
        let mut s = Spin::new(B);
        let mut now = t;
        // A guest that sends (pings) but is never the one answering: its next frame
        // comes 50 ms after what we delivered to it.
        for _ in 0..SAMPLES {
            s.sent_local(now);
            now += Duration::from_millis(50);
            s.got_local(now);
        }
        assert!(!s.local_fits());
        s.sent_local(now);
        assert!(!s.spinning(now));
    }

    use std::os::fd::OwnedFd;

    fn pipe() -> (OwnedFd, OwnedFd) {
        nix::unistd::pipe().unwrap()
    }

    #[test]
    fn a_ring_wakes_a_parked_thread() {
        let w = std::sync::Arc::new(Wake::new().unwrap());
        let h = std::sync::Arc::new(Handoff::default());
        // A pipe nobody writes to: only the bell can end the wait early.
        let (r, _wr) = pipe();
        let (w2, h2) = (w.clone(), h.clone());
        let mut p = Poller::new(&[r.as_raw_fd()], &w).unwrap();
        let t = Instant::now();
        let th = std::thread::spawn(move || {
            while !h2.helper() {
                assert_eq!(w2.park(&mut p, 10_000, || !h2.helper()).unwrap(), 0);
            }
        });
        std::thread::sleep(Duration::from_millis(20));
        h.to_helper(&w);
        th.join().unwrap();
        assert!(t.elapsed() < Duration::from_secs(5), "the ring was lost");
    }

    #[test]
    fn an_interrupt_ends_the_current_wait_and_the_next_one() {
        let w = std::sync::Arc::new(Wake::new().unwrap());
        let (r, _wr) = pipe();
        let mut p = Poller::new(&[r.as_raw_fd()], &w).unwrap();
        // A 10 s wait that must end early, with nothing reported.
        let mut park_briefly = |why: &str| {
            let t = Instant::now();
            assert_eq!(w.park(&mut p, 10_000, || true).unwrap(), 0);
            assert!(t.elapsed() < Duration::from_secs(5), "{why}");
        };
        // Before the wait: the wait returns at once.
        w.interrupt();
        park_briefly("a prior interrupt was lost");
        // During the wait (the owner need not be marked parked).
        let w2 = w.clone();
        let th = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            w2.interrupt();
        });
        park_briefly("the interrupt did not wake the wait");
        th.join().unwrap();
    }

    #[test]
    fn park_returns_when_an_fd_is_readable() {
        let w = Wake::new().unwrap();
        let (r, wr) = pipe();
        assert_eq!(nix::unistd::write(&wr, b"x").unwrap(), 1);
        let (q, _wq) = pipe();
        let mut p = Poller::new(&[q.as_raw_fd(), r.as_raw_fd()], &w).unwrap();
        let t = Instant::now();
        assert_eq!(
            w.park(&mut p, 10_000, || true).unwrap(),
            0b10,
            "only fd 1 is ready"
        );
        assert!(t.elapsed() < Duration::from_secs(5));
        // Level-triggered: still ready until read.
        assert_eq!(p.wait(0).unwrap(), 0b10);
    }

    #[test]
    fn an_unwatched_fd_is_not_reported() {
        let w = Wake::new().unwrap();
        let (r, wr) = pipe();
        let mut p = Poller::new(&[r.as_raw_fd()], &w).unwrap();
        assert_eq!(nix::unistd::write(&wr, b"x").unwrap(), 1);
        p.watch(0, false).unwrap();
        assert_eq!(p.wait(0).unwrap(), 0, "another thread serves it");
        p.watch(0, true).unwrap();
        assert_eq!(p.wait(0).unwrap(), 1);
    }

    #[test]
    fn park_does_not_sleep_on_a_changed_state() {
        let w = Wake::new().unwrap();
        let (r, _wr) = pipe();
        let mut p = Poller::new(&[r.as_raw_fd()], &w).unwrap();
        let t = Instant::now();
        assert_eq!(w.park(&mut p, 10_000, || false).unwrap(), 0);
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn handoff_rings_only_on_a_change() {
        let home = Wake::new().unwrap();
        let helper = Wake::new().unwrap();
        let h = Handoff::default();
        assert!(!h.helper());
        h.to_helper(&helper);
        assert!(h.helper());
        h.to_helper(&helper);
        h.to_home(&home);
        assert!(!h.helper());
    }
}
