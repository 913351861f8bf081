//! The uploading side's pacing, sans-IO: how many chunk bytes a node keeps
//! unacknowledged, how many peers it uploads to at once, an absolute rate cap
//! (`upload_max_kbps`) and a less-than-best-effort mode in the spirit of LEDBAT
//! that backs off when the queueing delay our own uploads cause rises above a
//! target.
//!
//! Inputs are what the application can measure: when a chunk reply started to go
//! out (written to its stream), its size, and when the receiver acknowledged it
//! (its Have). From those:
//! - **capacity**: the highest acknowledged rate seen over one-second windows in
//!   the last [`CAPACITY_MEMORY_US`] (a max filter: while we yield, our own rate
//!   is not the link's). A window in which the uplink ran dry (nothing
//!   unacknowledged: nobody asked for more) measured demand, not the link, and
//!   counts only if it is higher, as BBR treats application-limited samples: a
//!   seller that served one chunk in a minute must not conclude its uplink
//!   carries one chunk a minute, answer everyone "busy" and so never learn
//!   otherwise;
//! - **delay samples**: ack time - start time - the time the bytes written
//!   before it and itself need at capacity. What remains is round trip plus
//!   queueing in the modem FIFO (and the receiver's own uplink queue, which its
//!   Have crosses). The minimum over the last minute is the base; the minimum of
//!   the last few samples minus the base is the queueing delay (LEDBAT's
//!   filters, at chunk granularity).
//!
//! Outputs: [`UploadPacer::limit`] (bytes unacknowledged), [`UploadPacer::peers_at_once`]
//! and [`UploadPacer::next_start`] (earliest time the next chunk may start: the
//! rate cap and the yielding rate, as a token bucket of one chunk).
//!
//! The one-way delay signal (LEDBAT's, [`UploadPacer::on_one_way_delay`]): each
//! chunk reply carries the sender's clock when its first bytes left (see
//! [`LeaveClock`]); the receiver's acknowledgement echoes its own clock at their
//! arrival minus that stamp. The clocks' offset is unknown but constant, so
//! the base is kept per peer (the least sample of each of the last ten
//! minutes) and sample - base is the queueing on the forward path alone: our
//! modem's FIFO (our own bytes and the household's) and nothing of the
//! receiver's uplink, which only delays when the sample arrives.

use std::collections::{HashMap, VecDeque};

use super::Micros;

const SEC: Micros = 1_000_000;
/// How long a capacity measurement counts.
pub const CAPACITY_MEMORY_US: Micros = 20 * SEC;
/// How long a base-delay measurement counts (LEDBAT keeps minutes; chunks are few).
const BASE_MEMORY_US: Micros = 60 * SEC;
/// Recent samples whose minimum is the current delay.
const CURRENT_SAMPLES: usize = 4;
/// With path delay samples: from no rate to the capacity in this long, when the
/// queue is empty.
pub const PATH_RAMP_US: Micros = 10 * SEC;
/// With path delay samples the rate stays at or above capacity / this. Lower
/// and the transport's round trip, which only ACKs update, goes stale: at 1/32
/// of a 1 Mbit/s line (3 ACKs a second) the smoothed round trip took 40 s to
/// fall back after one burst, and the uploads sat at the floor throughout.
pub const PATH_FLOOR_DIVISOR: f64 = 8.0;
/// With path delay samples: least time between two decreases.
pub const PATH_DECREASE_EVERY_US: Micros = 100_000;
/// One-way delay: the base of each peer is the least sample of each of the
/// last [`OWD_BASE_BUCKETS`] buckets of this long (LEDBAT keeps 10 minutes).
pub const OWD_BASE_BUCKET_US: Micros = 60 * SEC;
pub const OWD_BASE_BUCKETS: usize = 10;
/// One-way delay: the current queueing delay is the least of the last few
/// samples (LEDBAT's current-delay filter) no older than
/// [`OWD_CURRENT_MEMORY_US`], the latest always. The receiver notes arrival
/// when its reader gets to the bytes: a reader that lags behind its socket
/// (a busy receiver) reads as a queue of up to a second in one sample, not in
/// three (seen in scripts/bench-owner-link.sh runs at a load of 3).
const OWD_CURRENT_SAMPLES: usize = 3;
pub const OWD_CURRENT_MEMORY_US: Micros = 3 * SEC;
/// One-way delay: the rate's ceiling as a multiple of the measured capacity.
/// Not above 1: the capacity (acknowledged bytes per second, a max filter) already
/// reads 10-15 % high on a 1 Mbit/s line when acknowledgements bunch, and a
/// ceiling of 1.1 x that kept the FIFO swinging between empty and 250 ms
/// (scripts/bench-owner-link.sh, 2026-12-08).
pub const OWD_PROBE: f64 = 1.0;
/// One full-size frame on the wire (Ethernet, IP, TCP with timestamps).
const FRAME: u64 = 1514;

/// Tuning knobs (see [`UploadConfig::seed`] and [`UploadConfig::relay`]).
#[derive(Clone, Debug)]
pub struct UploadConfig {
    /// Unacknowledged bytes aim at this much of the capacity.
    pub window_us: Micros,
    /// Least unacknowledged bytes allowed (a few chunks, so a slow link starts).
    pub min_bytes: u64,
    /// Most unacknowledged bytes.
    pub max_bytes: u64,
    /// Absolute upload cap, bytes/s (`upload_max_kbps`); `None`: no cap.
    pub max_rate: Option<u64>,
    /// Yield to other traffic when the queueing delay rises above this (us);
    /// `None`: best effort.
    pub yield_target_us: Option<Micros>,
    /// The yielding mode follows the one-way delay samples
    /// (`on_one_way_delay`); otherwise they are only recorded.
    pub one_way: bool,
    /// Packets a TCP flow needs in flight per round trip not to collapse into
    /// timeouts in a shallow FIFO (BBR's and Reno's least window is about 4).
    pub flow_packets: u64,
    /// A round trip shorter than this is not trusted for the peer count (a
    /// loaded home link is rarely faster; an idle bridge would say 1 ms).
    pub min_rtt_us: Micros,
    /// Fewest and most peers uploaded to at once.
    pub min_peers: usize,
    pub max_peers: usize,
}

impl UploadConfig {
    /// A super-seed (the buyer): its uplink is the swarm's bottleneck and must
    /// not idle, so it keeps 2 s of its capacity out.
    pub fn seed() -> Self {
        UploadConfig {
            window_us: 2 * SEC,
            min_bytes: 256 * 1024,
            ..Self::relay()
        }
    }

    /// A relaying seller: the less it queues, the sooner a fresh chunk reaches
    /// the next holder.
    pub fn relay() -> Self {
        UploadConfig {
            window_us: 400_000,
            min_bytes: 192 * 1024,
            max_bytes: 32 * 1024 * 1024,
            max_rate: None,
            yield_target_us: None,
            one_way: false,
            flow_packets: 4,
            min_rtt_us: 50_000,
            min_peers: 2,
            max_peers: 64,
        }
    }
}

/// Longest a chunk request may expect to wait in a server's queue before the
/// server answers "busy, ask again later" instead of queueing it (issue 16).
pub const ADMIT_WAIT_US: Micros = 2 * SEC;

/// Whether a server takes one more chunk request of `size` bytes when `waiting`
/// bytes of replies already wait for room (not started), at an upload rate of
/// `rate` bytes/s. `Ok`: queue it. `Err(us)`: busy; the requester should ask
/// again in about `us` (when the queue will have drained that far).
///
/// Why: a request queued behind a slow uplink waits while faster holders idle,
/// and its requester times it out and asks again elsewhere, so the queue fills
/// with replies nobody waits for. Refusing at once sends the request where it
/// is served soonest; the requester keeps the server as a holder.
pub fn admit(waiting: u64, size: u64, rate: f64, max_wait_us: Micros) -> Result<(), Micros> {
    if waiting == 0 {
        return Ok(()); // one reply always waits, however slow the link
    }
    let rate = rate.max(1.0);
    let wait_us = (waiting + size) as f64 * 1e6 / rate;
    if wait_us <= max_wait_us as f64 {
        return Ok(());
    }
    let drain_us = (waiting + size) as f64 * 1e6 / rate - max_wait_us as f64;
    Err((drain_us.max(0.0) as Micros).clamp(100_000, 10 * SEC))
}

#[derive(Clone, Copy, Debug)]
struct Started {
    at: Micros,
    /// Unacknowledged bytes when it started, itself included.
    ahead: u64,
}

/// Where a link's bytes leave the node, estimated: the time the first byte of
/// the next chunk frame written on a link leaves the local stack. A frame
/// written while the previous ones still wait in the process's and the
/// socket's buffers (yamux, noise, the kernel's unsent queue: frames are written
/// as soon as the upload budget allows, then drained at the kernel's pacing
/// rate) leaves only when they have. Stamping the frame with that time, not the
/// time it was written, keeps our own local queue out of the one-way delay
/// sample: without it a lower pacing rate would lengthen the local queue, hence
/// the sample, hence lower the rate again (a death spiral).
///
/// A fluid model: the bytes written and not yet gone drain at the socket's
/// pacing rate, integrated over the rate's changes (`set_rate` on each), and the
/// driver writes a link's next chunk only once its backlog has drained
/// (`wait`), so each frame is stamped when written, behind nothing of ours.
/// The model drains [`LEAVE_MARGIN`] slower than the kernel: whatever it does
/// not know of (bytes written before pacing began, a rate that changed between
/// two looks) then drains away instead of sitting in front of every later chunk.
/// The stamp is thus never later than the bytes really leave: a sample may be
/// too large (harmless to the base, a minimum) but never too small. Unpaced,
/// nothing counts as waiting: what waits for TCP's window waits for the path.
#[derive(Clone, Copy, Debug, Default)]
pub struct LeaveClock {
    backlog: f64,
    at: Micros,
    rate: Option<f64>,
}

/// The leave clock's drain rate as a share of the socket's pacing rate.
pub const LEAVE_MARGIN: f64 = 0.9;

impl LeaveClock {
    fn advance(&mut self, now: Micros) {
        let dt = now.saturating_sub(self.at) as f64 / 1e6;
        self.backlog = match self.rate {
            Some(r) => (self.backlog - r * dt).max(0.0),
            None => 0.0,
        };
        self.at = self.at.max(now);
    }

    /// The socket's pacing rate is `rate` bytes/s from `now` on (`None`: unpaced).
    /// `unacked`: the link's chunk bytes not acknowledged yet. When pacing
    /// begins they count as waiting: written unpaced, some may still sit in
    /// our buffers (TCP's window full), and no later chunk may be stamped as if
    /// it went out ahead of them.
    pub fn set_rate(&mut self, now: Micros, rate: Option<f64>, unacked: u64) {
        self.advance(now);
        let was_paced = self.rate.is_some();
        self.rate = rate.map(|r| r * LEAVE_MARGIN).filter(|r| *r >= 1.0);
        if !was_paced && self.rate.is_some() {
            self.backlog = unacked as f64;
        }
    }

    /// How long from `now` until what was written has left (0: nothing waits).
    pub fn wait(&mut self, now: Micros) -> Micros {
        self.advance(now);
        match self.rate {
            Some(r) if self.backlog > 0.0 => (self.backlog * 1e6 / r).ceil() as Micros,
            _ => 0,
        }
    }

    /// A frame of `size` bytes is written at `now` after `before` bytes of small
    /// messages. Returns its stamp: when its first bytes are expected to leave.
    pub fn stamp(&mut self, now: Micros, before: u64, size: u64) -> Micros {
        self.advance(now);
        let Some(r) = self.rate else {
            return now;
        };
        let ahead = self.backlog + before as f64;
        self.backlog = ahead + size as f64;
        now + (ahead * 1e6 / r) as Micros
    }
}

/// The one-way delay base of one peer: (bucket start, least sample) per bucket.
#[derive(Clone, Debug, Default)]
struct OwdBase {
    buckets: VecDeque<(Micros, i64)>,
}

impl OwdBase {
    fn add(&mut self, sample: i64, now: Micros) {
        match self.buckets.back_mut() {
            Some((t, m)) if now.saturating_sub(*t) < OWD_BASE_BUCKET_US => *m = (*m).min(sample),
            _ => self.buckets.push_back((now, sample)),
        }
        let memory = OWD_BASE_BUCKET_US * OWD_BASE_BUCKETS as Micros;
        while self.buckets.len() > OWD_BASE_BUCKETS
            || self
                .buckets
                .front()
                .is_some_and(|&(t, _)| now.saturating_sub(t) >= memory)
        {
            self.buckets.pop_front();
        }
    }

    fn base(&self) -> Option<i64> {
        self.buckets.iter().map(|&(_, m)| m).min()
    }

    fn last_seen(&self) -> Micros {
        self.buckets.back().map_or(0, |&(t, _)| t)
    }
}

/// Pacing state of one node's uploads (all images, all peers).
#[derive(Clone, Debug)]
pub struct UploadPacer {
    cfg: UploadConfig,
    next_token: u64,
    started: HashMap<u64, (Started, u64)>,
    in_flight: u64,
    /// Acknowledged bytes since `window_start`.
    acked_window: u64,
    window_start: Option<Micros>,
    /// The uplink ran dry during the current window (application-limited).
    window_dry: bool,
    /// (window end, bytes/s) of recent rate windows.
    rates: VecDeque<(Micros, f64)>,
    /// (time, sample) of delay samples, for the base (minimum per 10 s bucket).
    base: VecDeque<(Micros, Micros)>,
    current: VecDeque<Micros>,
    /// Yielding rate, bytes/s (LEDBAT's window turned into a rate; chunks are
    /// too big for a window of packets).
    yield_rate: Option<f64>,
    last_adjust: Micros,
    /// Queueing delay measured on the path (see `on_path_delay`), when the driver
    /// has such a measurement: the yielding mode then follows it alone.
    last_path_sample: Option<Micros>,
    /// The last of those samples, us.
    path_queue: Option<Micros>,
    /// One-way delay bases per peer (see `on_one_way_delay`).
    owd_base: HashMap<u64, OwdBase>,
    /// Recent one-way queueing delays (sample - its peer's base), us.
    owd_recent: VecDeque<(Micros, Micros)>,
    /// When the last one-way sample came: the yielding mode follows them alone.
    last_owd_sample: Option<Micros>,
    /// When the next chunk may start (token bucket of one chunk).
    next_start: Micros,
}

impl UploadPacer {
    pub fn new(cfg: UploadConfig) -> Self {
        UploadPacer {
            cfg,
            next_token: 0,
            started: HashMap::new(),
            in_flight: 0,
            acked_window: 0,
            window_start: None,
            window_dry: false,
            rates: VecDeque::new(),
            base: VecDeque::new(),
            current: VecDeque::new(),
            yield_rate: None,
            last_adjust: 0,
            last_path_sample: None,
            path_queue: None,
            owd_base: HashMap::new(),
            owd_recent: VecDeque::new(),
            last_owd_sample: None,
            next_start: 0,
        }
    }

    pub fn config(&self) -> &UploadConfig {
        &self.cfg
    }

    /// Highest acknowledged rate of the recent windows, bytes/s.
    pub fn capacity(&self) -> Option<f64> {
        self.rates.iter().map(|&(_, r)| r).reduce(f64::max)
    }

    /// Unacknowledged chunk bytes.
    pub fn in_flight(&self) -> u64 {
        self.in_flight
    }

    /// Base delay (round trip with empty queues, as far as chunks show it), us.
    pub fn base_delay(&self) -> Option<Micros> {
        self.base.iter().map(|&(_, d)| d).min()
    }

    /// Queueing delay our uploads cause now, us (current minus base).
    pub fn queue_delay(&self) -> Option<Micros> {
        let cur = self.current.iter().min()?;
        Some(cur.saturating_sub(self.base_delay()?))
    }

    /// The yielding mode's current rate, bytes/s (`None` when off or not yet limiting).
    pub fn yield_rate(&self) -> Option<f64> {
        self.yield_rate
    }

    /// Most unacknowledged bytes: `window_us` of the capacity, within the bounds.
    pub fn limit(&self) -> u64 {
        let by_rate = self
            .capacity()
            .map(|r| (r * self.cfg.window_us as f64 / 1e6) as u64)
            .unwrap_or(0);
        by_rate.clamp(
            self.cfg.min_bytes,
            self.cfg.max_bytes.max(self.cfg.min_bytes),
        )
    }

    /// Whether another chunk may start (bytes-wise; see also `next_start`).
    pub fn has_room(&self) -> bool {
        self.in_flight < self.limit()
    }

    /// How many peers may have chunks in flight at once: as many flows as the
    /// link carries at `flow_packets` frames per loaded round trip each. On a
    /// 1 Mbit/s uplink with a shallow FIFO that is 2 (a dozen parallel TCP
    /// flows there lose a third of their packets and stall in timeouts); on
    /// 8 Mbit/s with a 100 ms FIFO about 16.
    pub fn peers_at_once(&self) -> usize {
        let Some(cap) = self.capacity() else {
            return self.cfg.max_peers;
        };
        let rtt = self.base_delay().unwrap_or(0) + self.queue_delay().unwrap_or(0);
        let rtt = rtt.max(self.cfg.min_rtt_us) as f64 / 1e6;
        let n = (cap * rtt / (self.cfg.flow_packets * FRAME) as f64) as usize;
        n.clamp(
            self.cfg.min_peers,
            self.cfg.max_peers.max(self.cfg.min_peers),
        )
    }

    /// The rate chunks may start at now, bytes/s (`None`: unpaced).
    pub fn pace_rate(&self) -> Option<f64> {
        match (self.cfg.max_rate.map(|r| r as f64), self.yield_rate) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Earliest time the next chunk may start.
    pub fn next_start(&self) -> Micros {
        self.next_start
    }

    /// A chunk of `size` bytes starts going out at `now`; the returned token
    /// names it in `on_ack`/`forget`.
    pub fn start(&mut self, size: u64, now: Micros) -> u64 {
        self.next_token += 1;
        if self.in_flight == 0 {
            // the uplink sat idle until now
            self.window_dry = true;
        }
        self.in_flight += size;
        let s = Started {
            at: now,
            ahead: self.in_flight,
        };
        self.started.insert(self.next_token, (s, size));
        // with path samples the driver paces in the transport, packet by packet;
        // a gap here as well would hold back the next chunk for as long as the
        // slowest rate of the past asked (16 s for 64 KiB at 4 KB/s), long after
        // the rate has recovered
        if let Some(r) = self.pace_rate().filter(|_| !self.paced_by_transport()) {
            let gap = (size as f64 * 1e6 / r.max(1.0)) as Micros;
            // a token bucket of one chunk: idle time is not saved up beyond it
            self.next_start = self.next_start.max(now.saturating_sub(gap)) + gap;
        }
        self.next_token
    }

    /// The chunk `token` left our hands without an acknowledgement (cancelled,
    /// link down, expired).
    pub fn forget(&mut self, token: u64) {
        if let Some((_, size)) = self.started.remove(&token) {
            self.in_flight -= size;
        }
    }

    /// The receiver acknowledged chunk `token` at `now`.
    pub fn on_ack(&mut self, token: u64, now: Micros) {
        let Some((s, size)) = self.started.remove(&token) else {
            return;
        };
        self.in_flight -= size;
        self.acked_window += size;
        let start = *self.window_start.get_or_insert(s.at);
        let dt = now.saturating_sub(start);
        if dt >= SEC {
            let r = self.acked_window as f64 * 1e6 / dt as f64;
            // while paced, or when the uplink ran dry, our own rate says nothing
            // about the link's: only a higher one counts (the last window is
            // kept however old)
            let limited = self.pace_rate().is_some() || self.window_dry;
            if !limited || self.capacity().is_none_or(|c| r > c) {
                self.rates.push_back((now, r));
            }
            self.acked_window = 0;
            self.window_start = Some(now);
            self.window_dry = self.in_flight == 0;
        }
        while self
            .rates
            .front()
            .is_some_and(|&(t, _)| now.saturating_sub(t) > CAPACITY_MEMORY_US)
            && self.rates.len() > 1
        {
            self.rates.pop_front();
        }
        if let Some(cap) = self.capacity() {
            let wire = (s.ahead as f64 * 1e6 / cap) as Micros;
            let sample = now.saturating_sub(s.at).saturating_sub(wire);
            self.add_sample(sample, now);
            if !self.paced_by_transport() {
                self.adjust_yield(cap, size, now);
            }
        }
    }

    /// Whether a transport-level signal (path or one-way delay) drives the
    /// yielding mode: the driver then paces in the transport, packet by packet.
    fn paced_by_transport(&self) -> bool {
        self.last_path_sample.is_some() || self.last_owd_sample.is_some()
    }

    /// The queueing delay the one-way samples show now, us.
    pub fn one_way_queue_delay(&self) -> Option<Micros> {
        self.owd_recent.iter().map(|&(_, q)| q).min()
    }

    /// A one-way delay sample from `peer` (any stable key of the peer): the
    /// receiver's clock at the first bytes of one of our chunk replies minus
    /// the reply's stamp (see [`LeaveClock`]), us. The unknown offset between
    /// the two clocks cancels against the peer's base, the least of its samples
    /// per minute over the last ten minutes; what remains is the queueing on the
    /// way there (our modem's FIFO), without the receiver's uplink, which its
    /// acknowledgement crosses. Once these come, the yielding mode follows them
    /// alone, with `on_path_delay`'s rate rule, except that the rate stays
    /// imposed at its ceiling ([`OWD_PROBE`] x the capacity): paced at the
    /// line's rate, our own bytes build no queue in the modem, unpaced they
    /// would fill it at once.
    ///
    /// `sent_at`: when the sampled chunk started (the time `start` was given),
    /// if known. A chunk that left before the last decrease says nothing about
    /// the rate since, so it cannot decrease it again (LEDBAT: once per round
    /// trip): a queue takes a while to drain, and every chunk sampled meanwhile
    /// would otherwise cut the rate once more.
    pub fn on_one_way_delay(
        &mut self,
        peer: u64,
        sample_us: i64,
        sent_at: Option<Micros>,
        now: Micros,
    ) {
        let base = self.owd_base.entry(peer).or_default();
        let new_bucket = base
            .buckets
            .back()
            .is_none_or(|&(t, _)| now.saturating_sub(t) >= OWD_BASE_BUCKET_US);
        base.add(sample_us, now);
        let queue = sample_us.saturating_sub(base.base().expect("just added"));
        if new_bucket {
            // forget peers not heard of for the whole memory
            let horizon = OWD_BASE_BUCKET_US * OWD_BASE_BUCKETS as Micros;
            self.owd_base
                .retain(|_, b| now.saturating_sub(b.last_seen()) < horizon);
        }
        self.owd_recent.push_back((now, queue.max(0) as Micros));
        while self.owd_recent.len() > OWD_CURRENT_SAMPLES
            || self.owd_recent.len() > 1
                && self
                    .owd_recent
                    .front()
                    .is_some_and(|&(t, _)| now.saturating_sub(t) > OWD_CURRENT_MEMORY_US)
        {
            self.owd_recent.pop_front();
        }
        if !self.cfg.one_way {
            return;
        }
        let last = self.last_owd_sample.replace(now);
        let q = self.one_way_queue_delay().expect("just added");
        self.follow_queue(q, now, last, true, sent_at);
    }

    /// The last queueing delay measured on the path (`on_path_delay`), us.
    pub fn path_queue_delay(&self) -> Option<Micros> {
        self.path_queue
    }

    /// A queueing-delay sample measured on the path itself: the transport's
    /// smoothed round trip minus its least one, on the connections carrying our
    /// uploads now (the node reads both from the kernel's TCP_INFO). Once the
    /// driver gives these, the yielding mode follows them instead of the
    /// acknowledgement-based samples, which on a busy machine carry the
    /// receiver's scheduling and batching as well as the modem's queue.
    ///
    /// LEDBAT's rule on a rate, per sample: under the target the rate grows in
    /// proportion to the distance to it, by up to the capacity per
    /// [`PATH_RAMP_US`]; over it, it shrinks in proportion, by up to half, at
    /// most once per round trip (at least [`PATH_DECREASE_EVERY_US`]: the queue
    /// needs that long to show a change); never under 1/32 of the capacity (it
    /// keeps probing). The driver then paces in the transport: chunk starts are
    /// no longer spaced here.
    pub fn on_path_delay(&mut self, queue_us: Micros, now: Micros) {
        let last = self.last_path_sample.replace(now);
        self.path_queue = Some(queue_us);
        self.follow_queue(queue_us, now, last, false, None);
    }

    /// The rate rule of the transport-level signals (see `on_path_delay`), on a
    /// queueing delay `queue_us` measured at `now`, the previous sample at
    /// `last`. `one_way`: the rate stays imposed at its ceiling, capacity x
    /// [`OWD_PROBE`] (else reaching the capacity lifts the yielding rate).
    fn follow_queue(
        &mut self,
        queue_us: Micros,
        now: Micros,
        last: Option<Micros>,
        one_way: bool,
        sent_at: Option<Micros>,
    ) {
        let (Some(target), Some(cap)) = (self.cfg.yield_target_us, self.capacity()) else {
            return;
        };
        // one-way samples come once per chunk: seconds apart at a low rate,
        // and the growth between two must count all of that time
        let dt = last.map_or(0, |l| now.saturating_sub(l)).min(if one_way {
            PATH_RAMP_US / 5
        } else {
            SEC
        });
        let off = ((target as f64 - queue_us as f64) / target as f64).clamp(-1.0, 1.0);
        let r = self.yield_rate.unwrap_or(cap);
        let next = if off >= 0.0 {
            r + off * cap * dt as f64 / PATH_RAMP_US as f64
        } else {
            // once per round trip (the queue's effect on it lags that much)
            if now.saturating_sub(self.last_adjust) < PATH_DECREASE_EVERY_US.max(queue_us)
                || sent_at.is_some_and(|t| t < self.last_adjust)
            {
                return;
            }
            self.last_adjust = now;
            r * (1.0 + off / 2.0)
        };
        let ceiling = if one_way { cap * OWD_PROBE } else { cap };
        let next = next.clamp(cap / PATH_FLOOR_DIVISOR, ceiling);
        self.yield_rate = (one_way || next < cap).then_some(next);
    }

    fn add_sample(&mut self, d: Micros, now: Micros) {
        // base: one minimum per 10 s bucket, a minute of buckets
        match self.base.back_mut() {
            Some((t, m)) if now.saturating_sub(*t) < 10 * SEC => *m = (*m).min(d),
            _ => self.base.push_back((now, d)),
        }
        while self
            .base
            .front()
            .is_some_and(|&(t, _)| now.saturating_sub(t) > BASE_MEMORY_US)
        {
            self.base.pop_front();
        }
        self.current.push_back(d);
        if self.current.len() > CURRENT_SAMPLES {
            self.current.pop_front();
        }
    }

    /// LEDBAT's controller on a rate: off_target = (target - delay) / target;
    /// the rate grows by off_target x (the acked bytes' share of capacity) and
    /// shrinks the same way, at most halving per adjustment, never under 1/32
    /// of capacity (it keeps probing), never over capacity.
    fn adjust_yield(&mut self, cap: f64, size: u64, now: Micros) {
        let Some(target) = self.cfg.yield_target_us else {
            return;
        };
        let Some(q) = self.queue_delay() else { return };
        let off = ((target as f64 - q as f64) / target as f64).clamp(-1.0, 1.0);
        let r = self.yield_rate.unwrap_or(cap);
        let step = r * (size as f64 / (cap * 0.2).max(1.0)).min(1.0);
        let mut next = r + off * step;
        if off < 0.0 {
            // one decrease per base round trip at most, as LEDBAT does on loss
            let rtt = self.base_delay().unwrap_or(0).max(self.cfg.min_rtt_us);
            if now.saturating_sub(self.last_adjust) < rtt {
                return;
            }
            next = next.max(r / 2.0);
            self.last_adjust = now;
        }
        let next = next.clamp(cap / 32.0, cap);
        // at capacity the yielding mode imposes nothing
        self.yield_rate = (next < cap).then_some(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admit_queues_a_bounded_wait() {
        // 1 Mbit/s: one waiting 1 MiB reply is always fine, a second is 16 s away
        assert_eq!(admit(0, 1 << 20, 125_000.0, ADMIT_WAIT_US), Ok(()));
        let busy = admit(1 << 20, 1 << 20, 125_000.0, ADMIT_WAIT_US);
        assert!(
            matches!(busy, Err(us) if (5 * SEC..=10 * SEC).contains(&us)),
            "{busy:?}"
        );
        // 100 Mbit/s: 2 s is 25 MB of replies
        assert_eq!(admit(20 << 20, 1 << 20, 12.5e6, ADMIT_WAIT_US), Ok(()));
        assert!(admit(30 << 20, 1 << 20, 12.5e6, ADMIT_WAIT_US).is_err());
        // a refusal never asks for an instant retry
        assert_eq!(admit(300_000, 1, 125_000.0, ADMIT_WAIT_US), Err(400_008));
        assert_eq!(admit(250_000, 1, 125_000.0, ADMIT_WAIT_US), Err(100_000));
    }

    const MS: Micros = 1_000;

    /// A link of `rate` bytes/s with a FIFO: chunks go out back to back when
    /// the pacer allows; each is acknowledged after its serialization (behind
    /// whatever is queued) plus `rtt` plus `extra` queueing from other traffic.
    fn drive(p: &mut UploadPacer, rate: f64, rtt: Micros, extra: Micros, secs: u64) -> u64 {
        drive_from(p, 0, rate, rtt, extra, secs)
    }

    fn drive_from(
        p: &mut UploadPacer,
        from: Micros,
        rate: f64,
        rtt: Micros,
        extra: Micros,
        secs: u64,
    ) -> u64 {
        let size = 64 * 1024u64;
        let mut now = from;
        let mut link_free = from;
        let mut acks: Vec<(Micros, u64)> = Vec::new();
        let mut sent = 0;
        while now < from + secs * SEC {
            acks.sort();
            while let Some(&(t, tok)) = acks.first() {
                if t > now {
                    break;
                }
                p.on_ack(tok, t);
                acks.remove(0);
            }
            if p.has_room() && now >= p.next_start() {
                let tok = p.start(size, now);
                link_free = link_free.max(now) + (size as f64 * 1e6 / rate) as Micros;
                acks.push((link_free + rtt + extra, tok));
                sent += size;
            } else {
                now += MS;
            }
        }
        for (_, tok) in acks {
            p.forget(tok);
        }
        sent
    }

    #[test]
    fn capacity_and_base_delay_come_from_acks() {
        let mut p = UploadPacer::new(UploadConfig::relay());
        drive(&mut p, 125_000.0, 20 * MS, 0, 30);
        let cap = p.capacity().unwrap();
        assert!((110_000.0..=135_000.0).contains(&cap), "{cap}");
        let base = p.base_delay().unwrap();
        assert!(base <= 60 * MS, "base {base}");
        // 1 Mbit/s, 50 ms floor, 4 frames each: 2 peers
        assert_eq!(p.peers_at_once(), 2);
    }

    #[test]
    fn a_fast_link_uploads_to_many_peers_at_once() {
        let mut p = UploadPacer::new(UploadConfig::seed());
        drive(&mut p, 1_000_000.0, 100 * MS, 0, 10);
        assert!(p.peers_at_once() >= 8, "{}", p.peers_at_once());
        assert!(p.limit() > 1_500_000, "{}", p.limit());
    }

    #[test]
    fn the_rate_cap_holds() {
        let cfg = UploadConfig {
            max_rate: Some(50_000),
            ..UploadConfig::relay()
        };
        let mut p = UploadPacer::new(cfg);
        let sent = drive(&mut p, 125_000.0, 20 * MS, 0, 40);
        let rate = sent as f64 / 40.0;
        assert!((40_000.0..=55_000.0).contains(&rate), "{rate}");
    }

    #[test]
    fn yielding_backs_off_when_other_traffic_queues() {
        let cfg = UploadConfig {
            yield_target_us: Some(50 * MS),
            ..UploadConfig::relay()
        };
        let mut quiet = UploadPacer::new(cfg.clone());
        let alone = drive(&mut quiet, 125_000.0, 20 * MS, 0, 30);
        // alone on the link, its own queue stays near the target: close to the rate
        assert!(alone as f64 / 30.0 > 80_000.0, "{alone}");
        // a competing bulk flow takes half the link and keeps 300 ms in the
        // FIFO: the swarm steps aside
        let mut p = UploadPacer::new(cfg);
        drive(&mut p, 125_000.0, 20 * MS, 0, 10);
        // unacknowledged chunks of the first part are simply dropped
        let after = drive_from(&mut p, 11 * SEC, 62_500.0, 20 * MS, 300 * MS, 30);
        assert!(
            (after as f64 / 30.0) < 40_000.0,
            "yielding still sent {} B/s",
            after as f64 / 30.0
        );
    }

    #[test]
    fn a_trickle_after_a_burst_keeps_the_measured_capacity() {
        // a seller that spread an image at 10 MB/s, then served one chunk every
        // 30 s for two minutes (nobody asked for more): its uplink is still 10 MB/s
        let mut p = UploadPacer::new(UploadConfig::relay());
        drive(&mut p, 10e6, 5 * MS, 0, 3);
        let burst = p.capacity().expect("measured");
        assert!(burst > 9e6, "burst measured {burst}");
        let mut now = 3 * SEC;
        for _ in 0..4 {
            now += 30 * SEC;
            let t = p.start(64 * 1024, now);
            p.on_ack(t, now + 20 * MS);
        }
        let cap = p.capacity().expect("kept");
        assert!(
            cap > 9e6,
            "idle time between lone chunks counted as a slow link: {cap} bytes/s"
        );
        // demand may raise it: a faster burst later counts
        drive_from(&mut p, now + SEC, 20e6, 5 * MS, 0, 3);
        assert!(p.capacity().expect("kept") > 18e6);
    }

    #[test]
    fn path_delay_over_the_target_yields_and_under_it_recovers() {
        let mut cfg = UploadConfig::relay();
        cfg.yield_target_us = Some(100 * MS);
        let mut p = UploadPacer::new(cfg);
        drive(&mut p, 125_000.0, 20 * MS, 0, 5);
        let cap = p.capacity().expect("measured");
        assert_eq!(p.pace_rate(), None, "no path sample yet: at capacity");
        // someone else's upload holds 400 ms in the modem's FIFO
        let mut now = 10 * SEC;
        for _ in 0..50 {
            p.on_path_delay(400 * MS, now);
            now += 100 * MS;
        }
        let low = p.pace_rate().expect("yielding");
        assert!(
            (low - cap / PATH_FLOOR_DIVISOR).abs() < 1.0,
            "down to the floor: {low} of {cap}"
        );
        // acknowledgement-based samples no longer move it
        drive_from(&mut p, now, 125_000.0, 20 * MS, 0, 2);
        now += 2 * SEC;
        assert!(p.pace_rate().expect("still yielding") < cap / 4.0);
        // the queue empties: back to the capacity within PATH_RAMP_US
        for _ in 0..(PATH_RAMP_US / (100 * MS)) {
            p.on_path_delay(0, now);
            now += 100 * MS;
        }
        assert_eq!(p.pace_rate(), None, "recovered to the capacity");
        // at the target it holds still
        p.on_path_delay(400 * MS, now);
        let r = p.pace_rate().expect("yielding again");
        p.on_path_delay(100 * MS, now + 100 * MS);
        assert_eq!(p.pace_rate(), Some(r));
    }

    #[test]
    fn path_delay_without_a_target_changes_nothing() {
        let mut p = UploadPacer::new(UploadConfig::relay());
        drive(&mut p, 125_000.0, 20 * MS, 0, 3);
        p.on_path_delay(900 * MS, 5 * SEC);
        p.on_path_delay(900 * MS, 6 * SEC);
        assert_eq!(p.pace_rate(), None);
    }

    /// A home uplink for the one-way delay signal: `rate` bytes/s behind a FIFO
    /// of `fifo` bytes, `prop` us each way beyond it; the receiver's
    /// acknowledgements come back `back` us later still (its own uplink queue).
    /// Our chunks wait in a local queue and leave it at the pacer's rate (the
    /// kernel's pacing; unpaced: as fast as the FIFO takes them); a competing
    /// bulk flow, when on, offers the whole line rate and keeps the FIFO full.
    struct HomeLink {
        rate: f64,
        fifo: f64,
        prop: Micros,
        back: Micros,
        compete: bool,
        /// The receiver's clock minus ours.
        offset: i64,
        /// Stamp chunks with the LeaveClock (else with the time they are written).
        leave_clock: bool,
        /// Feed the one-way samples (else the pacer has only the acks signal).
        one_way: bool,
        /// The receiver's uplink queue: this much more on every other 5 s.
        back_busy: Micros,
    }

    impl HomeLink {
        fn line(rate: f64, fifo_ms: u64) -> Self {
            HomeLink {
                rate,
                fifo: rate * fifo_ms as f64 / 1e3,
                prop: 5 * MS,
                back: 5 * MS,
                compete: false,
                offset: -7_000_000_000,
                leave_clock: true,
                one_way: true,
                back_busy: 0,
            }
        }
    }

    #[derive(Debug, Default)]
    struct Moved {
        /// Our chunk bytes delivered, and the competing flow's.
        ours: f64,
        theirs: f64,
        /// The most queueing our bytes saw in the FIFO, us.
        max_fifo_wait: Micros,
        /// Mean FIFO delay over the run, us.
        mean_fifo_delay: Micros,
    }

    /// The link's state between runs: our local queue, the FIFO, acks on their way.
    #[derive(Default)]
    struct LinkState {
        now: Micros,
        /// (token, stamp, bytes left, first byte not yet out)
        local: VecDeque<(u64, Micros, f64, bool)>,
        /// (token or none for theirs, stamp, bytes, first bytes of a chunk, its last, entered)
        #[allow(clippy::type_complexity)]
        fifo: VecDeque<(Option<u64>, Micros, f64, bool, bool, Micros)>,
        fifo_bytes: f64,
        clock: LeaveClock,
        pace: Option<f64>,
        /// When each chunk started.
        started: HashMap<u64, Micros>,
        /// (time, token, delay sample or none for the plain ack)
        acks: Vec<(Micros, u64, Option<i64>)>,
    }

    /// Runs `link` for `secs`, 1 ms steps (a fluid model).
    /// On a fresh `link`: 20 s to settle, then 60 s measured; our rate (B/s) and
    /// what moved in those 60 s.
    fn steady_owd(p: &mut UploadPacer, link: &HomeLink) -> (f64, Moved) {
        let mut st = LinkState::default();
        drive_owd(p, link, &mut st, 20);
        let m = drive_owd(p, link, &mut st, 60);
        (m.ours / 60.0, m)
    }

    fn drive_owd(p: &mut UploadPacer, link: &HomeLink, st: &mut LinkState, secs: u64) -> Moved {
        let size = 64 * 1024u64;
        let step = MS;
        let per = |r: f64| r * step as f64 / 1e6;
        let mut m = Moved::default();
        let mut delay_sum = 0u128;
        let end = st.now + secs * SEC;
        while st.now < end {
            let now = st.now;
            st.acks.sort_by_key(|a| a.0);
            while st.acks.first().is_some_and(|a| a.0 <= now) {
                let (t, tok, d) = st.acks.remove(0);
                match d {
                    Some(d) if link.one_way => {
                        p.on_one_way_delay(1, d, st.started.get(&tok).copied(), t)
                    }
                    Some(_) => {}
                    None => p.on_ack(tok, t),
                }
            }
            if now.is_multiple_of(100 * MS) {
                // the driver sets the sockets' pacing every 100 ms
                st.pace = p.pace_rate();
                let r = st.pace.filter(|_| link.leave_clock);
                st.clock.set_rate(now, r, p.in_flight());
            }
            while p.has_room() && now >= p.next_start() && st.clock.wait(now) == 0 {
                let tok = p.start(size, now);
                st.started.insert(tok, now);
                let stamp = st.clock.stamp(now, 0, size);
                st.local.push_back((tok, stamp, size as f64, true));
            }
            // the kernel's pacing, or TCP filling the FIFO
            let mut allow = st.pace.map_or(f64::MAX, per);
            while allow > 0.0 && st.fifo_bytes < link.fifo {
                let Some((tok, stamp, left, first)) = st.local.front_mut() else {
                    break;
                };
                let b = left.min(allow).min(link.fifo - st.fifo_bytes + 1.0);
                *left -= b;
                allow -= b;
                st.fifo_bytes += b;
                let last = *left <= 0.0;
                st.fifo
                    .push_back((Some(*tok), *stamp, b, *first, last, now));
                *first = false;
                if last {
                    st.local.pop_front();
                }
            }
            if link.compete && st.fifo_bytes < link.fifo {
                let b = per(link.rate).min(link.fifo - st.fifo_bytes);
                st.fifo_bytes += b;
                st.fifo.push_back((None, 0, b, false, false, now));
            }
            delay_sum += (st.fifo_bytes / link.rate * 1e6) as u128;
            // the line drains the FIFO's head
            let mut drain = per(link.rate);
            while drain > 0.0 {
                let Some(h) = st.fifo.front_mut() else { break };
                let b = h.2.min(drain);
                h.2 -= b;
                drain -= b;
                st.fifo_bytes -= b;
                match h.0 {
                    Some(tok) => {
                        m.ours += b;
                        m.max_fifo_wait = m.max_fifo_wait.max(now - h.5);
                        if h.3 {
                            // its first bytes arrive: the receiver's clock minus the stamp
                            h.3 = false;
                            let arrive = now + link.prop;
                            let d = arrive as i64 + link.offset - h.1 as i64;
                            st.acks.push((arrive + link.back + 1, tok, Some(d)));
                        }
                        if h.2 <= 0.0 && h.4 {
                            let busy = (now / (5 * SEC)) % 2 == 1;
                            let back = link.back + if busy { link.back_busy } else { 0 };
                            st.acks.push((now + link.prop + back, tok, None));
                        }
                    }
                    None => m.theirs += b,
                }
                if h.2 <= 0.0 {
                    st.fifo.pop_front();
                }
            }
            st.now += step;
        }
        m.mean_fifo_delay = (delay_sum / (secs * 1000) as u128) as Micros;
        m
    }

    fn owd_pacer() -> UploadPacer {
        UploadPacer::new(UploadConfig {
            yield_target_us: Some(100 * MS),
            one_way: true,
            ..UploadConfig::relay()
        })
    }

    #[test]
    fn leave_clock_stamps_when_the_first_bytes_leave() {
        let mut c = LeaveClock::default();
        // unpaced: when written, nothing waits
        assert_eq!(c.stamp(5 * SEC, 100, 64_000), 5 * SEC);
        assert_eq!(c.wait(5 * SEC), 0);
        // paced at 100 kB/s the model drains 90 kB/s: a 90 kB frame takes a
        // second; the next one written at once leaves after it, a control
        // message ahead of it first
        let t = 10 * SEC;
        c.set_rate(t, Some(100_000.0), 0);
        assert_eq!(c.stamp(t, 0, 90_000), t);
        assert_eq!(c.stamp(t, 0, 90_000), t + SEC);
        assert_eq!(c.wait(t + 400 * MS), 1600 * MS);
        assert_eq!(c.stamp(t + 400 * MS, 900, 90_000), t + 2 * SEC + 10 * MS);
        // the rate halves at t + 1 s: what is left drains at the new rate
        c.set_rate(t + SEC, Some(50_000.0), 0);
        // left at t + 1 s: 180.9 kB, 4.02 s at 45 kB/s
        assert_eq!(c.stamp(t + SEC, 0, 1), t + 5 * SEC + 20 * MS);
        // written after the link drained: leaves at once
        assert_eq!(c.wait(t + 9 * SEC), 0);
        assert_eq!(c.stamp(t + 9 * SEC, 0, 1), t + 9 * SEC);
        // unpaced again: nothing counts as waiting
        c.stamp(t + 9 * SEC, 0, 1_000_000);
        c.set_rate(t + 9 * SEC, None, 0);
        assert_eq!(c.stamp(t + 9 * SEC, 0, 1), t + 9 * SEC);
        // pacing begins with 45 kB unacknowledged: they may still be here
        c.set_rate(t + 10 * SEC, Some(50_000.0), 45_000);
        assert_eq!(c.wait(t + 10 * SEC), SEC);
    }

    #[test]
    fn one_way_delay_uses_the_whole_line_alone_within_the_target() {
        // 1 Mbit/s, a 1 s FIFO: alone, the swarm keeps near the line rate (the
        // leave clock's margin of the measured capacity) and the FIFO under
        // the 100 ms target (not at a second)
        let mut p = owd_pacer();
        let link = HomeLink::line(125_000.0, 1000);
        let (rate, m) = steady_owd(&mut p, &link);
        assert!(
            rate > 0.95 * LEAVE_MARGIN * 125_000.0,
            "alone it sent {rate} B/s of 125000"
        );
        assert!(
            m.mean_fifo_delay < 150 * MS,
            "FIFO delay {} ms",
            m.mean_fifo_delay / MS
        );
        let q = p.one_way_queue_delay().expect("samples");
        assert!(q < 200 * MS, "queue {q}");
    }

    #[test]
    fn one_way_delay_ignores_the_receivers_uplink_queue() {
        // the receiver's own uplink FIFO holds 300 ms every other 5 s (its
        // Haves wait there): that delays the samples, not their values
        let mut p = owd_pacer();
        let link = HomeLink {
            back_busy: 300 * MS,
            ..HomeLink::line(125_000.0, 1000)
        };
        let (rate, _) = steady_owd(&mut p, &link);
        assert!(
            rate > 0.95 * LEAVE_MARGIN * 125_000.0,
            "it sent {rate} B/s of 125000"
        );
        // the acknowledgement signal, which times round trips, takes that
        // queue for its own and yields to it
        let mut acks = owd_pacer();
        let link = HomeLink {
            one_way: false,
            ..link
        };
        let (acks_rate, _) = steady_owd(&mut acks, &link);
        assert!(
            acks_rate < 0.8 * rate,
            "acks signal {acks_rate} B/s, one-way {rate}"
        );
    }

    #[test]
    fn one_way_delay_yields_to_a_competing_flow() {
        // alone first (the capacity is measured), then a bulk upload of the
        // household fills the FIFO: the swarm falls to its floor and the other
        // flow gets most of the line
        let mut p = owd_pacer();
        let alone = HomeLink::line(125_000.0, 1000);
        let mut st = LinkState::default();
        drive_owd(&mut p, &alone, &mut st, 20);
        let busy = HomeLink {
            compete: true,
            ..HomeLink::line(125_000.0, 1000)
        };
        drive_owd(&mut p, &busy, &mut st, 10);
        let m = drive_owd(&mut p, &busy, &mut st, 30);
        let share = m.theirs / (m.theirs + m.ours);
        assert!(
            share >= 0.8,
            "the competing flow got {share:.2} of the line"
        );
        // it leaves, the swarm takes the line back within seconds
        drive_owd(&mut p, &alone, &mut st, 15);
        let m = drive_owd(&mut p, &alone, &mut st, 30);
        assert!(
            m.ours / 30.0 > 0.8 * 125_000.0,
            "after: {} B/s",
            m.ours / 30.0
        );
    }

    #[test]
    fn without_the_leave_clock_the_local_queue_spirals_down() {
        // stamped when written, a chunk's sample includes the time the chunks
        // written before it wait in our own buffers at the paced rate: the
        // lower the rate, the longer that wait, the lower the rate
        let mut p = owd_pacer();
        let link = HomeLink {
            leave_clock: false,
            ..HomeLink::line(125_000.0, 1000)
        };
        let (rate, _) = steady_owd(&mut p, &link);
        assert!(rate < 0.7 * 125_000.0, "{rate}");
    }

    #[test]
    fn one_way_bases_are_per_peer() {
        // two receivers whose clocks differ by an hour: each compared with its own
        let mut p = owd_pacer();
        drive(&mut p, 125_000.0, 20 * MS, 0, 3);
        let mut now = 5 * SEC;
        for i in 0..20 {
            p.on_one_way_delay(1, 3_600_000_000 + 10_000 + (i % 3) * 1000, None, now);
            p.on_one_way_delay(2, -20_000 + (i % 2) * 1000, None, now);
            now += 100 * MS;
        }
        assert!(p.one_way_queue_delay().unwrap() <= 2 * MS);
        // one late sample is filtered out (a reader that lagged)
        p.on_one_way_delay(2, 980_000, None, now);
        assert!(p.one_way_queue_delay().unwrap() <= 2 * MS);
        // a queue of 400 ms on the way to peer 2 shows as 400 ms
        for i in 1..=3 {
            p.on_one_way_delay(2, 380_000, None, now + i * 100 * MS);
        }
        assert_eq!(p.one_way_queue_delay(), Some(400 * MS));
        // bases last ten minutes, then a peer's old minimum is gone
        now += 11 * OWD_BASE_BUCKET_US;
        p.on_one_way_delay(2, 380_000, None, now);
        p.on_one_way_delay(2, 380_000, None, now + MS);
        assert_eq!(p.one_way_queue_delay(), Some(0));
    }

    #[test]
    fn forgetting_frees_room() {
        let mut p = UploadPacer::new(UploadConfig::relay());
        let t = p.start(200 * 1024, 0);
        assert!(!p.has_room());
        p.forget(t);
        assert!(p.has_room());
        assert_eq!(p.in_flight(), 0);
    }
}
