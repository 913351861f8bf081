//! Message links: one long-lived outbound stream per peer carrying every swarm
//! message we send it, and a reader per inbound stream handing the peer's
//! messages to the networking task.
//!
//! Small messages (requests, haves, offers) jump ahead of queued chunk replies,
//! and go out in the same write as the next chunk so they share its segments.
//!
//! Chunk replies are ack-clocked. A receiver answers every chunk with a Have
//! at once; until then the chunk counts against the node's upload budget
//! ([`Budget`], a fraction of a second to two seconds of the measured upload
//! capacity, see [`UploadConfig`]). A reply
//! waits in its peer's queue until the budget has room, and the rarest waiting
//! reply of the whole node goes first. Without this, each connection's stream
//! buffers (yamux, noise, TCP) swallow seconds of data at once: every queued
//! chunk crawls out at a 1/n share of the uplink beside n-1 others, a fresh
//! chunk takes seconds to reach its next holder, and a super-seed believes a
//! chunk has left when it has not. With it, a chunk crosses the uplink at
//! nearly full speed and the swarm learns of it a round trip later.
//!
//! On slow uplinks (issue 16) the node also uploads to only as many peers at
//! once as the link carries TCP flows without collapsing (a dozen flows in a
//! 10-packet modem FIFO lose a third of their packets), paces starts to
//! `upload_max_kbps`, and yields to the owner's traffic when the queueing delay
//! its chunks see rises above a target: all decided by `chunks::swarm::UploadPacer`
//! from the acknowledgement times measured here.
//!
//! The one-way delay signal (issue 16): every Chunk frame carries the sender's
//! clock ([`clock_us`]) at the moment its first bytes are expected to leave
//! this node, and the receiver's Ack echoes its own clock when those bytes
//! arrived minus that stamp. What the sample includes: the wait in the sender's
//! modem FIFO (ours and the household's traffic), the path's propagation, the
//! receiver's downlink and the moment its reader task got to the frame, plus
//! the two clocks' constant offset, which the per-peer base removes. It does
//! not include the receiver's uplink (only the Ack crosses it), nor our own
//! buffers: with the signal on, a link writes its next chunk only when the
//! previous one has left at the sockets' pacing rate (`LeaveClock`), so the
//! frame is stamped when written, behind nothing of ours that the model knows
//! of; the kernel's unsent queue is kept short besides (TCP_NOTSENT_LOWAT,
//! sockets.rs).

use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chunks::ImageId;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, StreamProtocol};
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{debug, warn};

use chunks::swarm::{admit, LeaveClock, Micros, UploadConfig, UploadPacer, ADMIT_WAIT_US};

use super::wire::{stamp_chunk, Body, Msg, MAX_MESSAGE, PROTOCOL};

/// This process's monotonic clock, us: the stamps of our chunk replies and the
/// arrival times we echo. Only differences between two readings of one peer's
/// clock mean anything.
pub fn clock_us() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// Bytes on the wire per byte of a frame: a full segment's 1448 bytes of
/// payload travel as 1514 (Ethernet, IP, TCP with timestamps), and the
/// kernel's pacing counts them all.
const WIRE_PER_BYTE: f64 = 1514.0 / 1448.0;

/// A stable key of `peer` for the pacer's per-peer one-way delay bases.
fn peer_key(peer: &PeerId) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    peer.hash(&mut h);
    h.finish()
}

/// The byte a reader sends back on a new stream once it reads it.
const ACCEPT: u8 = 0xa5;
/// How long an opener waits for that byte, and how often it tries.
const ACCEPT_WAIT: Duration = Duration::from_secs(10);
const OPEN_ATTEMPTS: u32 = 5;
/// Priority of replies with nothing to tell them apart (first come first).
pub const ORDINARY: u32 = u32::MAX;

/// Bytes read at once from a message body, and how often at most a reader
/// reports that a message is arriving.
const PROGRESS_PIECE: usize = 16 * 1024;
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// A chunk not acknowledged for this long stops counting against the budget
/// (the receiver may have gone quiet; the link's own failure is reported apart).
const ACK_TIMEOUT: Duration = Duration::from_secs(20);

/// What the links report to the networking task.
#[derive(Debug)]
pub enum LinkEvent {
    /// A message from `peer`; its first bytes arrived at `arrived_us`, its last
    /// at `done_us` ([`clock_us`]).
    Msg {
        peer: PeerId,
        msg: Msg,
        arrived_us: u64,
        done_us: u64,
    },
    /// A chunk reply reached `peer` (acknowledged, or written and never
    /// acknowledged within the timeout: `delivered`), or was dropped
    /// (cancelled before it went out, or the link went down).
    Sent {
        peer: PeerId,
        image: ImageId,
        index: u32,
        delivered: bool,
    },
    /// Part of a message from `peer` arrived (a chunk in progress).
    Progress { peer: PeerId },
    /// Our outbound stream to `peer` failed; it is reopened on the next send.
    Down { peer: PeerId, link: u64 },
}

type Key = (PeerId, ImageId, u32);

/// The node's upload budget: chunk bytes written and not yet acknowledged,
/// who they went to, and the pacing core ([`UploadPacer`]: the limit on them,
/// how many peers at once, the rate cap and the yielding mode). Plain state,
/// driven with explicit times, so it can be tested alone.
#[derive(Debug)]
pub struct Budget {
    pacer: UploadPacer,
    epoch: Instant,
    /// (started, pacer token, bytes, each socket's pacing rate then) per chunk in flight.
    in_flight: HashMap<Key, (Instant, u64, u64, Option<f64>)>,
    /// Chunks in flight per peer.
    peers: HashMap<PeerId, usize>,
}

impl Budget {
    pub fn new(cfg: UploadConfig) -> Self {
        Budget {
            pacer: UploadPacer::new(cfg),
            epoch: Instant::now(),
            in_flight: HashMap::new(),
            peers: HashMap::new(),
        }
    }

    fn micros(&self, t: Instant) -> Micros {
        t.saturating_duration_since(self.epoch).as_micros() as Micros
    }

    /// Whether another chunk may start now (bytes-wise).
    pub fn has_room(&self) -> bool {
        self.pacer.has_room()
    }

    /// Whether a chunk for `peer` may start: it already has one in flight, or
    /// fewer peers than the link carries at once have.
    pub fn may_serve(&self, peer: &PeerId) -> bool {
        self.peers.contains_key(peer) || self.peers.len() < self.pacer.peers_at_once()
    }

    /// How long the next chunk must wait for the rate cap or the yielding mode.
    pub fn pace_wait(&self, now: Instant) -> Duration {
        Duration::from_micros(self.pacer.next_start().saturating_sub(self.micros(now)))
    }

    pub fn limit(&self) -> u64 {
        self.pacer.limit()
    }

    pub fn in_flight_bytes(&self) -> u64 {
        self.pacer.in_flight()
    }

    /// Measured upload capacity, bytes/s (none before the first acks).
    pub fn capacity(&self) -> Option<f64> {
        self.pacer.capacity()
    }

    /// The pacer, read-only (for `status` and tests).
    pub fn pacer(&self) -> &UploadPacer {
        &self.pacer
    }

    /// A chunk of `size` bytes starts going out, its socket paced at `rate`
    /// bytes/s as far as the one-way delay signal knows (`None`: unpaced).
    pub fn start(&mut self, key: Key, size: u64, rate: Option<f64>, now: Instant) {
        self.forget(&key);
        let token = self.pacer.start(size, self.micros(now));
        self.in_flight.insert(key, (now, token, size, rate));
        *self.peers.entry(key.0).or_default() += 1;
    }

    fn unpeer(&mut self, peer: &PeerId) {
        if let Some(n) = self.peers.get_mut(peer) {
            *n -= 1;
            if *n == 0 {
                self.peers.remove(peer);
            }
        }
    }

    /// The receiver acknowledged `key`; true if it was in flight.
    pub fn ack(&mut self, key: &Key, now: Instant) -> bool {
        let Some((_, token, _, _)) = self.in_flight.remove(key) else {
            return false;
        };
        let at = self.micros(now);
        self.pacer.on_ack(token, at);
        self.unpeer(&key.0);
        true
    }

    /// Forgets `key` without counting it as acknowledged; true if in flight.
    pub fn forget(&mut self, key: &Key) -> bool {
        match self.in_flight.remove(key) {
            Some((_, token, _, _)) => {
                self.pacer.forget(token);
                self.unpeer(&key.0);
                true
            }
            None => false,
        }
    }

    /// The one-way delays of chunk `key`'s first and last bytes (see the
    /// module's notes); returns the sample given to the pacer.
    ///
    /// The first bytes alone miss the queue the chunk itself builds: they find
    /// the modem's FIFO as the previous chunk left it, and a chunk that the
    /// kernel sends faster than the line queues behind them (the household's
    /// ping rose by 119 ms while nearly every first-bytes sample read 0). The
    /// last bytes see it, beyond the time the socket's pacing needs to send
    /// the chunk (its frames with their TCP/IP headers, at the rate it started
    /// with): the sample is the larger of the two.
    pub fn one_way_delay(&mut self, key: &Key, first_us: i64, last_us: i64, now: Instant) -> i64 {
        let at = self.micros(now);
        let (sent, paced) = match self.in_flight.get(key) {
            Some(&(t, _, size, rate)) => (Some(self.micros(t)), rate.map(|r| (size, r))),
            None => (None, None),
        };
        let sample = match paced {
            Some((size, r)) => {
                let wire = size as f64 * WIRE_PER_BYTE;
                first_us.max(last_us.saturating_sub((wire * 1e6 / r) as i64))
            }
            None => first_us,
        };
        self.pacer
            .on_one_way_delay(peer_key(&key.0), sample, sent, at);
        sample
    }

    /// Chunk bytes in flight to `peer`.
    pub fn peer_bytes(&self, peer: &PeerId) -> u64 {
        self.in_flight
            .iter()
            .filter(|(k, _)| k.0 == *peer)
            .map(|(_, &(_, _, size, _))| size)
            .sum()
    }

    /// Everything in flight to `peer`, removed.
    pub fn drop_peer(&mut self, peer: &PeerId) -> Vec<Key> {
        self.remove_where(|k, _| k.0 == *peer)
    }

    /// Chunks unacknowledged for longer than the timeout, removed.
    pub fn expire(&mut self, now: Instant) -> Vec<Key> {
        self.remove_where(|_, started| now.saturating_duration_since(started) > ACK_TIMEOUT)
    }

    /// Removes (without counting as acknowledged) the chunks `pick` selects.
    fn remove_where(&mut self, pick: impl Fn(&Key, Instant) -> bool) -> Vec<Key> {
        let keys: Vec<Key> = self
            .in_flight
            .iter()
            .filter(|(k, (t, _, _, _))| pick(k, *t))
            .map(|(k, _)| *k)
            .collect();
        for k in &keys {
            self.forget(k);
        }
        keys
    }
}

/// A writer waiting for room in the budget.
struct Waiting {
    prio: u32,
    seq: u64,
    peer: PeerId,
    grant: oneshot::Sender<()>,
}

impl PartialEq for Waiting {
    fn eq(&self, o: &Self) -> bool {
        (self.prio, self.seq) == (o.prio, o.seq)
    }
}
impl Eq for Waiting {}
impl PartialOrd for Waiting {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Waiting {
    // max-heap: the lowest (prio, seq) must compare greatest
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.prio, o.seq).cmp(&(self.prio, self.seq))
    }
}

struct UploadState {
    budget: Budget,
    waiting: BinaryHeap<Waiting>,
    seq: u64,
    /// A grant handed out whose writer has not started its chunk yet.
    granted: usize,
    /// With the one-way delay signal: each uploading socket's pacing rate,
    /// bytes/s.
    socket_rate: Option<f64>,
    /// When each link's chunk bytes leave the node (see `LeaveClock`): all
    /// follow a change of the rate at once, or a link asleep through it would
    /// count its backlog as gone at the old rate.
    leave: HashMap<PeerId, LeaveClock>,
}

/// The uplink as the pacer sees it: measured capacity, the rate chunks start at
/// (the cap or the yielding mode; none: unpaced), delays, peers served at once.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct UplinkView {
    pub capacity_bytes_per_s: Option<u64>,
    pub pace_bytes_per_s: Option<u64>,
    pub base_delay_ms: Option<u64>,
    pub queue_delay_ms: Option<u64>,
    /// The queueing delay TCP measured on the uplink (smoothed minus least round trip).
    pub path_queue_delay_ms: Option<u64>,
    /// The queueing delay the chunks' one-way delays show (sample minus the peer's base).
    pub one_way_queue_delay_ms: Option<u64>,
    pub peers_at_once: usize,
}

/// The budget shared by every writer of the node.
struct Uploads {
    state: Mutex<UploadState>,
}

impl Uploads {
    fn new(cfg: UploadConfig) -> Self {
        Uploads {
            state: Mutex::new(UploadState {
                budget: Budget::new(cfg),
                waiting: BinaryHeap::new(),
                seq: 0,
                granted: 0,
                socket_rate: None,
                leave: HashMap::new(),
            }),
        }
    }

    /// A place in line for room in the budget.
    fn ticket(self: &Arc<Self>, prio: u32, peer: PeerId) -> Ticket {
        let mut st = self.state.lock().expect("uploads lock");
        let (grant, rx) = oneshot::channel();
        st.seq += 1;
        let seq = st.seq;
        st.waiting.push(Waiting {
            prio,
            seq,
            peer,
            grant,
        });
        Self::grant(&mut st);
        Ticket {
            wait: Some(rx),
            uploads: self.clone(),
            used: false,
        }
    }

    /// Hands room to the best waiter the link may serve now, if any (one at a
    /// time: each grant is followed by a `start` that uses up room). A waiter
    /// for a peer beyond the peers-at-once limit keeps its place.
    fn grant(st: &mut UploadState) {
        let mut skipped = Vec::new();
        while st.granted == 0 && st.budget.has_room() {
            let Some(w) = st.waiting.pop() else { break };
            if w.grant.is_closed() {
                continue; // a waiter that gave up
            }
            if !st.budget.may_serve(&w.peer) {
                skipped.push(w);
                continue;
            }
            if w.grant.send(()).is_ok() {
                st.granted += 1;
            }
        }
        st.waiting.extend(skipped);
    }

    /// How long `peer`'s link waits before its next chunk (see `LeaveClock`), us.
    fn leave_wait(&self, peer: PeerId) -> Micros {
        let mut st = self.state.lock().expect("uploads lock");
        let rate = st.socket_rate;
        let unacked = st.budget.peer_bytes(&peer);
        let clock = st.leave.entry(peer).or_insert_with(|| {
            let mut c = LeaveClock::default();
            c.set_rate(clock_us(), rate, unacked);
            c
        });
        clock.wait(clock_us())
    }

    /// The stamp of a chunk frame of `size` bytes written on `peer`'s link
    /// after `before` bytes of small messages.
    fn leave_stamp(&self, peer: PeerId, before: u64, size: u64) -> u64 {
        let mut st = self.state.lock().expect("uploads lock");
        let clock = st.leave.entry(peer).or_default();
        clock.stamp(clock_us(), before, size)
    }

    fn with<R>(&self, f: impl FnOnce(&mut UploadState) -> R) -> R {
        let mut st = self.state.lock().expect("uploads lock");
        let r = f(&mut st);
        Self::grant(&mut st);
        r
    }
}

/// A place in line; once `wait` returns it holds the grant, used by
/// `start` or given back on drop.
struct Ticket {
    wait: Option<oneshot::Receiver<()>>,
    uploads: Arc<Uploads>,
    used: bool,
}

impl Ticket {
    /// Cancel-safe: dropping the future keeps the place in line.
    async fn wait(&mut self) {
        if let Some(rx) = &mut self.wait {
            let _ = rx.await;
            self.wait = None;
        }
    }

    /// Uses the grant: `key` of `size` bytes is now in flight.
    fn start(mut self, key: Key, size: u64) {
        self.used = true;
        self.uploads.with(|st| {
            st.granted -= 1;
            let rate = st.socket_rate;
            st.budget.start(key, size, rate, Instant::now());
        });
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.used {
            return;
        }
        let holds = match self.wait.take() {
            None => true,
            Some(mut rx) => rx.try_recv().is_ok(),
        };
        if holds {
            self.uploads.with(|st| st.granted -= 1);
        }
    }
}

struct Queued {
    image: ImageId,
    index: u32,
    /// Lower goes first (how many peers are known to hold the chunk).
    prio: u32,
    seq: u64,
    frame: Vec<u8>,
}

#[derive(Default)]
struct Outbox {
    /// Encoded small messages, concatenated, sent before the next chunk.
    control: Vec<u8>,
    /// Chunk replies waiting for room in the upload budget.
    data: Vec<Queued>,
    closed: bool,
}

impl Outbox {
    /// Position of the reply that should go out next.
    fn best(&self) -> Option<usize> {
        (0..self.data.len()).min_by_key(|&i| (self.data[i].prio, self.data[i].seq))
    }
}

struct Link {
    id: u64,
    outbox: Mutex<Outbox>,
    wake: Notify,
}

/// The links of one node. Owned by the networking task.
pub struct Links {
    control: libp2p_stream::Control,
    links: HashMap<PeerId, Arc<Link>>,
    events: mpsc::UnboundedSender<LinkEvent>,
    uploads: Arc<Uploads>,
    next_id: u64,
    seq: u64,
    /// Bytes queued per message kind, framing included.
    queued: BTreeMap<&'static str, u64>,
}

impl Links {
    /// Starts accepting inbound streams; events arrive on the returned receiver.
    pub fn new(
        mut control: libp2p_stream::Control,
        rejected: Arc<AtomicU64>,
        budget: UploadConfig,
    ) -> (Links, mpsc::UnboundedReceiver<LinkEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut incoming = control
            .accept(StreamProtocol::new(PROTOCOL))
            .expect("the swarm protocol is registered once per node");
        let events = tx.clone();
        tokio::spawn(async move {
            while let Some((peer, stream)) = incoming.next().await {
                tokio::spawn(read_loop(peer, stream, events.clone(), rejected.clone()));
            }
        });
        (
            Links {
                control,
                links: HashMap::new(),
                events: tx,
                uploads: Arc::new(Uploads::new(budget)),
                next_id: 0,
                seq: 0,
                queued: BTreeMap::new(),
            },
            rx,
        )
    }

    fn link(&mut self, peer: PeerId) -> Arc<Link> {
        if let Some(l) = self.links.get(&peer) {
            return l.clone();
        }
        self.next_id += 1;
        let link = Arc::new(Link {
            id: self.next_id,
            outbox: Mutex::new(Outbox::default()),
            wake: Notify::new(),
        });
        self.links.insert(peer, link.clone());
        tokio::spawn(write_loop(
            peer,
            link.clone(),
            self.control.clone(),
            self.uploads.clone(),
            self.events.clone(),
        ));
        link
    }

    /// Queues a small message for `peer`, opening the link if needed.
    pub fn send(&mut self, peer: PeerId, msg: Msg) {
        debug_assert!(!matches!(msg.body, Body::Chunk { .. }));
        let link = self.link(peer);
        let frame = msg.encode();
        *self.queued.entry(msg.body.name()).or_default() += frame.len() as u64;
        link.outbox
            .lock()
            .expect("outbox lock")
            .control
            .extend_from_slice(&frame);
        link.wake.notify_one();
    }

    /// Queues a chunk reply; among the node's waiting replies the lowest
    /// `prio` goes out first, then the oldest.
    pub fn send_chunk(
        &mut self,
        peer: PeerId,
        image: ImageId,
        index: u32,
        bytes: Vec<u8>,
        prio: u32,
    ) {
        let link = self.link(peer);
        self.seq += 1;
        // stamped when written (`write_loop`)
        let frame = Msg::new(
            image,
            Body::Chunk {
                index,
                sent_us: 0,
                bytes,
            },
        )
        .encode();
        *self.queued.entry("chunk").or_default() += frame.len() as u64;
        link.outbox.lock().expect("outbox lock").data.push(Queued {
            image,
            index,
            prio,
            seq: self.seq,
            frame,
        });
        link.wake.notify_one();
    }

    /// Whether a chunk request of `size` bytes may join the replies waiting for
    /// the uplink (`chunks::swarm::admit`): `Err(us)` means answer Busy, ask
    /// again in about `us`. Before the capacity is measured, everything queues.
    pub fn admit(&self, size: u64) -> Result<(), Micros> {
        let Some(rate) = self
            .uploads
            .state
            .lock()
            .expect("uploads lock")
            .budget
            .capacity()
        else {
            return Ok(());
        };
        let waiting: u64 = self
            .links
            .values()
            .map(|l| {
                let ob = l.outbox.lock().expect("outbox lock");
                ob.data.iter().map(|q| q.frame.len() as u64).sum::<u64>()
            })
            .sum();
        admit(waiting, size, rate, ADMIT_WAIT_US)
    }

    /// `peer` acknowledged our chunk `index` with the one-way delays of its
    /// first and last bytes.
    pub fn acked_one_way(
        &mut self,
        peer: PeerId,
        image: ImageId,
        index: u32,
        first_us: i64,
        last_us: i64,
    ) {
        let now = Instant::now();
        self.uploads.with(|st| {
            let sample = st
                .budget
                .one_way_delay(&(peer, image, index), first_us, last_us, now);
            let p = st.budget.pacer();
            debug!(
                peer = %peer,
                chunk = index,
                first_us,
                last_us,
                sample,
                queue_us = p.one_way_queue_delay(),
                pace = p.pace_rate().map(|r| r as u64),
                capacity = p.capacity().map(|r| r as u64),
                socket_rate = st.socket_rate.map(|r| r as u64),
                "one-way delay sample"
            );
        });
        self.acked(peer, image, index);
    }

    /// Whether the yielding mode follows the one-way delay signal.
    pub fn one_way(&self) -> bool {
        self.uploads.with(|st| st.budget.pacer().config().one_way)
    }

    /// Each uploading socket's pacing rate now, bytes/s (one-way delay signal
    /// only): the links' `LeaveClock`s drain at it.
    pub fn set_socket_rate(&self, rate: Option<f64>) {
        let faster = self.uploads.with(|st| {
            if st.socket_rate == rate {
                return false;
            }
            let faster = rate.unwrap_or(f64::MAX) > st.socket_rate.unwrap_or(f64::MAX);
            st.socket_rate = rate;
            let now = clock_us();
            for (peer, clock) in st.leave.iter_mut() {
                clock.set_rate(now, rate, st.budget.peer_bytes(peer));
            }
            faster
        });
        if faster {
            // links asleep until their backlog drained at the old rate look again
            for l in self.links.values() {
                l.wake.notify_one();
            }
        }
    }

    /// `peer` says it has chunk `index`: if we were sending it, it arrived.
    pub fn acked(&mut self, peer: PeerId, image: ImageId, index: u32) {
        let now = Instant::now();
        if self
            .uploads
            .with(|st| st.budget.ack(&(peer, image, index), now))
        {
            report(&self.events, (peer, image, index), true);
        }
    }

    /// Drops a queued chunk reply that has not started to go out.
    pub fn cancel(&mut self, peer: PeerId, image: ImageId, index: u32) {
        let Some(link) = self.links.get(&peer) else {
            return;
        };
        let mut ob = link.outbox.lock().expect("outbox lock");
        if let Some(pos) = ob
            .data
            .iter()
            .position(|q| q.image == image && q.index == index)
        {
            ob.data.swap_remove(pos);
            report(&self.events, (peer, image, index), false);
        }
    }

    /// Chunks never acknowledged stop holding the budget (called on a timer).
    pub fn expire(&mut self) {
        let now = Instant::now();
        for key in self.uploads.with(|st| st.budget.expire(now)) {
            report(&self.events, key, true);
        }
    }

    /// Bytes queued for sending per message kind (for `status`).
    pub fn queued_by_message(&self) -> &BTreeMap<&'static str, u64> {
        &self.queued
    }

    /// A queueing delay the transport measured on the uplink (`sockets`).
    pub fn path_delay(&self, queue_us: Micros) {
        let now = Instant::now();
        self.uploads.with(|st| {
            let at = st.budget.micros(now);
            st.budget.pacer.on_path_delay(queue_us, at);
        });
    }

    /// The rate uploads may go at now, bytes/s (the cap or the yielding mode;
    /// `None`: as fast as the link goes).
    pub fn pace_rate(&self) -> Option<f64> {
        self.uploads.with(|st| st.budget.pacer().pace_rate())
    }

    /// The absolute cap (`upload_max_kbps`), bytes/s.
    pub fn cap_rate(&self) -> Option<f64> {
        self.uploads
            .with(|st| st.budget.pacer().config().max_rate.map(|r| r as f64))
    }

    /// What the upload pacer has measured and decided (for `status`).
    pub fn uplink(&self) -> UplinkView {
        self.uploads.with(|st| {
            let p = st.budget.pacer();
            UplinkView {
                capacity_bytes_per_s: p.capacity().map(|r| r as u64),
                pace_bytes_per_s: p.pace_rate().map(|r| r as u64),
                base_delay_ms: p.base_delay().map(|d| d / 1000),
                queue_delay_ms: p.queue_delay().map(|d| d / 1000),
                path_queue_delay_ms: p.path_queue_delay().map(|d| d / 1000),
                one_way_queue_delay_ms: p.one_way_queue_delay().map(|d| d / 1000),
                peers_at_once: p.peers_at_once(),
            }
        })
    }

    /// Upload budget in use and its limit, bytes (for `status`).
    pub fn budget(&self) -> (u64, u64) {
        self.uploads
            .with(|st| (st.budget.in_flight_bytes(), st.budget.limit()))
    }

    /// The connection to `peer` is gone: stop its writer (queued and
    /// unacknowledged chunk replies are reported as not delivered).
    pub fn close(&mut self, peer: &PeerId) {
        if let Some(link) = self.links.remove(peer) {
            link.outbox.lock().expect("outbox lock").closed = true;
            link.wake.notify_one();
        }
        self.drop_in_flight(peer);
    }

    /// The writer of link `id` failed: forget it so the next send reopens.
    pub fn on_down(&mut self, peer: &PeerId, id: u64) {
        if self.links.get(peer).is_some_and(|l| l.id == id) {
            self.links.remove(peer);
        }
        self.drop_in_flight(peer);
    }

    fn drop_in_flight(&mut self, peer: &PeerId) {
        self.uploads.with(|st| st.leave.remove(peer));
        for key in self.uploads.with(|st| st.budget.drop_peer(peer)) {
            report(&self.events, key, false);
        }
    }
}

/// Takes everything queued as undeliverable and reports it.
fn fail_all(peer: PeerId, link: &Link, events: &mpsc::UnboundedSender<LinkEvent>) {
    let mut ob = link.outbox.lock().expect("outbox lock");
    ob.closed = true;
    ob.control.clear();
    for q in ob.data.drain(..) {
        report(events, (peer, q.image, q.index), false);
    }
}

/// Tells the networking task where a chunk reply ended up.
fn report(events: &mpsc::UnboundedSender<LinkEvent>, (peer, image, index): Key, delivered: bool) {
    let _ = events.send(LinkEvent::Sent {
        peer,
        image,
        index,
        delivered,
    });
}

async fn write_all(stream: &mut libp2p::Stream, buf: &[u8]) -> std::io::Result<()> {
    stream.write_all(buf).await?;
    stream.flush().await
}

async fn write_loop(
    peer: PeerId,
    link: Arc<Link>,
    mut control: libp2p_stream::Control,
    uploads: Arc<Uploads>,
    events: mpsc::UnboundedSender<LinkEvent>,
) {
    let down = |events: &mpsc::UnboundedSender<LinkEvent>| {
        fail_all(peer, &link, events);
        let _ = events.send(LinkEvent::Down {
            peer,
            link: link.id,
        });
    };
    let Some(mut stream) = open(peer, &mut control).await else {
        return down(&events);
    };
    let mut buf = Vec::new();
    // our place in line for the upload budget while a reply waits here
    let mut ticket: Option<(u32, Ticket)> = None;
    loop {
        let (closed, best) = {
            let mut ob = link.outbox.lock().expect("outbox lock");
            buf.clear();
            buf.append(&mut ob.control);
            (ob.closed, ob.best().map(|i| ob.data[i].prio))
        };
        if closed {
            fail_all(peer, &link, &events);
            let _ = stream.close().await;
            return;
        }
        // small messages never wait for the budget
        if !buf.is_empty() && write_all(&mut stream, &buf).await.is_err() {
            return down(&events);
        }
        let Some(prio) = best else {
            ticket = None;
            link.wake.notified().await;
            continue;
        };
        // with the one-way delay signal the next chunk waits until the previous
        // one has left at the sockets' pacing rate (see `LeaveClock`): its stamp
        // must not include our own queue
        let wait = uploads.leave_wait(peer);
        if wait > 0 {
            ticket = None;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_micros(wait)) => {}
                _ = link.wake.notified() => {}
            }
            continue;
        }
        // a rarer reply arrived: take a better place in line
        if ticket.as_ref().is_some_and(|(p, _)| prio < *p) {
            ticket = None;
        }
        let (_, t) = ticket.get_or_insert_with(|| (prio, uploads.ticket(prio, peer)));
        let granted = tokio::select! {
            _ = t.wait() => true,
            // new messages, a cancel or a close: look again
            _ = link.wake.notified() => false,
        };
        if !granted {
            continue;
        }
        let (_, t) = ticket.take().expect("granted");
        // the rate cap and the yielding mode pace starts; the grant is held
        // meanwhile, so the whole node waits, not just this link
        let pace = uploads.with(|st| st.budget.pace_wait(Instant::now()));
        if !pace.is_zero() {
            tokio::time::sleep(pace).await;
        }
        let q = {
            let mut ob = link.outbox.lock().expect("outbox lock");
            buf.clear();
            buf.append(&mut ob.control);
            let q = ob.best().map(|i| ob.data.swap_remove(i));
            if let Some(mut q) = q {
                let at = uploads.leave_stamp(peer, buf.len() as u64, q.frame.len() as u64);
                stamp_chunk(&mut q.frame, at);
                buf.extend_from_slice(&q.frame);
                Some(q)
            } else {
                None
            }
        };
        match &q {
            Some(q) => t.start((peer, q.image, q.index), q.frame.len() as u64),
            None => drop(t),
        }
        if !buf.is_empty() {
            if let Err(e) = write_all(&mut stream, &buf).await {
                debug!(peer = %peer, error = %e, "swarm stream write failed");
                return down(&events);
            }
        }
    }
}

/// Opens the outbound stream and waits for the peer's accept byte. libp2p
/// hands inbound streams over through a queue of one and drops what does not
/// fit, so when several peers open at once a stream can vanish with whatever
/// was written on it; a stream only counts once the peer's reader says so.
async fn open(peer: PeerId, control: &mut libp2p_stream::Control) -> Option<libp2p::Stream> {
    let mut wait = Duration::from_millis(50);
    for attempt in 1..=OPEN_ATTEMPTS {
        match control
            .open_stream(peer, StreamProtocol::new(PROTOCOL))
            .await
        {
            Ok(mut s) => {
                let mut b = [0u8; 1];
                match tokio::time::timeout(ACCEPT_WAIT, s.read_exact(&mut b)).await {
                    Ok(Ok(())) if b[0] == ACCEPT => return Some(s),
                    _ => debug!(peer = %peer, attempt, "swarm stream not accepted; retrying"),
                }
            }
            Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(_)) => {
                debug!(peer = %peer, "peer does not speak {PROTOCOL}");
                return None;
            }
            Err(e) => {
                debug!(peer = %peer, error = %e, "cannot open swarm stream");
                return None;
            }
        }
        tokio::time::sleep(wait).await;
        wait *= 2;
    }
    None
}

async fn read_loop(
    peer: PeerId,
    mut stream: libp2p::Stream,
    events: mpsc::UnboundedSender<LinkEvent>,
    rejected: Arc<AtomicU64>,
) {
    let reject = |why: String| {
        rejected.fetch_add(1, Ordering::Relaxed);
        warn!(peer = %peer, error = %why, "rejected inbound message; stream dropped");
    };
    let mut last_progress = Instant::now();
    // tell the opener this stream is being read (see `open`)
    if stream.write_all(&[ACCEPT]).await.is_err() || stream.flush().await.is_err() {
        return;
    }
    loop {
        let mut len = [0u8; 4];
        if stream.read_exact(&mut len).await.is_err() {
            return; // closed or reset: the peer reopens if it wants to talk
        }
        // the message's first bytes are here (a chunk's one-way delay ends now)
        let arrived_us = clock_us();
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_MESSAGE {
            // refuse before allocating or reading
            return reject(format!(
                "message of {len} bytes exceeds the limit of {MAX_MESSAGE}"
            ));
        }
        let mut body = vec![0u8; len];
        // read big messages (chunks) in pieces and say that bytes are arriving:
        // on a slow link a chunk takes seconds, and a fetch must not give up a
        // request that is progressing
        let mut got = 0;
        while got < len {
            let end = (got + PROGRESS_PIECE).min(len);
            if stream.read_exact(&mut body[got..end]).await.is_err() {
                return;
            }
            got = end;
            if got < len && last_progress.elapsed() >= PROGRESS_EVERY {
                last_progress = Instant::now();
                if events.send(LinkEvent::Progress { peer }).is_err() {
                    return;
                }
            }
        }
        let done_us = clock_us();
        match Msg::decode(&body) {
            Ok(msg) => {
                if events
                    .send(LinkEvent::Msg {
                        peer,
                        msg,
                        arrived_us,
                        done_us,
                    })
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => return reject(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_cfg() -> UploadConfig {
        UploadConfig {
            window_us: 250_000,
            min_bytes: 256 * 1024,
            ..UploadConfig::relay()
        }
    }

    fn key(p: &PeerId, i: u32) -> Key {
        (*p, ImageId([1; 32]), i)
    }

    #[test]
    fn budget_counts_in_flight_until_acked() {
        let p = PeerId::random();
        let t = Instant::now();
        let mut b = Budget::new(test_cfg());
        assert!(b.has_room());
        b.start(key(&p, 1), 200 * 1024, None, t);
        assert!(b.has_room());
        b.start(key(&p, 2), 200 * 1024, None, t);
        assert!(!b.has_room());
        assert!(b.ack(&key(&p, 1), t));
        assert!(!b.ack(&key(&p, 1), t), "a second ack is not counted");
        assert!(b.has_room());
        assert_eq!(b.in_flight_bytes(), 200 * 1024);
    }

    #[test]
    fn budget_follows_the_acknowledged_rate() {
        let p = PeerId::random();
        let t0 = Instant::now();
        let mut b = Budget::new(test_cfg());
        // 8 MB acknowledged in 2 s: 4 MB/s, a quarter second of it is 1 MB
        for i in 0..128u32 {
            let t = t0 + Duration::from_millis(i as u64 * 2000 / 127);
            b.start(key(&p, i), 64 * 1024, None, t);
            b.ack(&key(&p, i), t);
        }
        let l = b.limit();
        assert!((900_000..1_200_000).contains(&l), "limit {l}");
        // a slow link never shrinks it below the minimum
        let mut s = Budget::new(test_cfg());
        s.start(key(&p, 1), 1000, None, t0);
        s.ack(&key(&p, 1), t0);
        s.start(key(&p, 2), 1000, None, t0 + Duration::from_secs(5));
        s.ack(&key(&p, 2), t0 + Duration::from_secs(5));
        assert_eq!(s.limit(), test_cfg().min_bytes);
    }

    #[test]
    fn budget_drops_peers_and_expires() {
        let (p, q) = (PeerId::random(), PeerId::random());
        let t = Instant::now();
        let mut b = Budget::new(test_cfg());
        b.start(key(&p, 1), 10, None, t);
        b.start(key(&q, 1), 20, None, t);
        b.start(key(&q, 2), 30, None, t + Duration::from_secs(15));
        assert_eq!(b.drop_peer(&p), vec![key(&p, 1)]);
        assert_eq!(b.in_flight_bytes(), 50);
        let gone = b.expire(t + Duration::from_secs(21));
        assert_eq!(gone, vec![key(&q, 1)]);
        assert_eq!(b.in_flight_bytes(), 30);
    }

    fn granted(t: &mut Ticket) -> bool {
        match &mut t.wait {
            None => true,
            Some(rx) => {
                let ok = rx.try_recv().is_ok();
                if ok {
                    t.wait = None;
                }
                ok
            }
        }
    }

    #[test]
    fn a_slow_uplink_serves_few_peers_at_once() {
        let u = Arc::new(Uploads::new(test_cfg()));
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        // 1 Mbit/s: a 64 KiB chunk acknowledged every half second for 4 s
        u.with(|st| {
            for i in 0..9u32 {
                let t = t0 + Duration::from_millis(500 * i as u64);
                st.budget.start(key(&a, i), 64 * 1024, None, t);
                st.budget.ack(&key(&a, i), t + Duration::from_millis(520));
            }
            assert_eq!(st.budget.pacer().peers_at_once(), 2);
        });
        let mut ta = u.ticket(1, a);
        assert!(granted(&mut ta));
        ta.start(key(&a, 100), 1000);
        let mut tb = u.ticket(1, b);
        assert!(granted(&mut tb));
        tb.start(key(&b, 100), 1000);
        // a third peer waits although the bytes would fit, a known one does not
        let mut tc = u.ticket(0, c);
        assert!(!granted(&mut tc));
        let mut ta2 = u.ticket(1, a);
        assert!(granted(&mut ta2));
        ta2.start(key(&a, 101), 1000);
        u.with(|st| {
            st.budget.ack(&key(&b, 100), Instant::now());
        });
        assert!(granted(&mut tc), "room for another peer once b is done");
    }

    #[test]
    fn waiters_get_room_rarest_first() {
        let u = Arc::new(Uploads::new(test_cfg()));
        let p = PeerId::random();
        let mut first = u.ticket(5, p);
        assert!(granted(&mut first), "room at once");
        // the budget is full with the first chunk
        first.start(key(&p, 0), test_cfg().min_bytes);
        let mut common = u.ticket(7, p);
        let mut less_common = u.ticket(3, p);
        assert!(!granted(&mut common) && !granted(&mut less_common));
        u.with(|st| st.budget.ack(&key(&p, 0), Instant::now()));
        assert!(granted(&mut less_common), "rarer first");
        assert!(!granted(&mut common), "one grant at a time");
        less_common.start(key(&p, 1), 10);
        assert!(granted(&mut common));
        drop(common); // an unused grant is given back
        let mut again = u.ticket(8, p);
        assert!(granted(&mut again));
    }
}
