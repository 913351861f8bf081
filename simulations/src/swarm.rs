//! The swarm run: every seller runs the node's own `chunks::swarm::Leecher`, the
//! buyer the node's own `Seeder` (shipped policy) or serves everything it is
//! asked (the other policies). This module is the I/O shell: it carries their
//! actions over the simulated network as messages with latency and chunk
//! transfers as max-min fair flows, and feeds events and `now` back in, the way
//! node/src/p2p does.

use chunks::swarm::{
    admit, Action, Bitfield, Decision, Leecher, LeecherConfig, PeerKind, PieceOrder, SeedAction,
    Seeder, SeederConfig, ADMIT_WAIT_US,
};
use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use indicatif::ProgressBar;

use crate::flow::{FlowId, FlowNet, Reschedule};
use crate::queue::EventQueue;
use crate::rng::{exponential, shuffle, unit, SplitMix64};
use crate::scenario::{ChurnSpec, Policy};
use crate::topology::World;
use crate::upload::{relay_budget, seed_budget, Upload, ORDINARY};
use crate::wire_size;

/// Node 0 is the buyer.
const BUYER: u32 = 0;
/// A starving seller tells the super-seed at most this often (node STARVING_EVERY).
const STARVING_EVERY_US: u64 = 200_000;
/// The buyer takes the sellers' batched Haves and runs its seeder this often
/// (the node's slow have-queue goes out once a second).
const BUYER_TICK_US: u64 = 1_000_000;
/// Sellers batch the Haves they owe the buyer: the seeder hears of them late.
const STARVE_CHECK_US: u64 = 500_001;
/// A seller takes in the Haves that reach it within this window before running
/// its scheduler once for all of them (an event loop draining its inbox). With
/// 40 neighbours each announcing every chunk, running `Leecher::poll` per Have
/// was three quarters of the simulator's time; chunks, offers and refusals
/// still run it at once.
const HAVE_BATCH_US: u64 = 50_000;

#[derive(Clone, Copy, Debug)]
enum Ev {
    Request {
        from: u32,
        to: u32,
        chunk: u32,
    },
    NotHave {
        from: u32,
        to: u32,
        chunk: u32,
    },
    /// `from` holds `chunk` but its upload queue is full: ask again in `retry_us`.
    Busy {
        from: u32,
        to: u32,
        chunk: u32,
        retry_us: u64,
    },
    Offer {
        to: u32,
        chunk: u32,
    },
    Cancel {
        from: u32,
        to: u32,
        chunk: u32,
    },
    Starving {
        from: u32,
    },
    FlowEnd {
        flow: FlowId,
        version: u32,
    },
    Delivered {
        from: u32,
        to: u32,
        chunk: u32,
    },
    Ack {
        from: u32,
        to: u32,
        chunk: u32,
    },
    Wake {
        node: u32,
    },
    /// Runs a seller's scheduler after a batch of Haves.
    HaveBatch {
        node: u32,
    },
    BuyerTick,
    Leave {
        node: u32,
    },
    Join {
        node: u32,
    },
}

struct Node {
    leech: Option<Box<Leecher<u32>>>,
    has: Bitfield,
    online: bool,
    /// Never comes back after leaving.
    gone: bool,
    joined_us: Option<u64>,
    done_us: Option<u64>,
    wake_us: u64,
    /// A `HaveBatch` is scheduled.
    batch_pending: bool,
    /// Haves on their way to this node: (arrival us, from, chunk). Applied in
    /// batches: one event per batch instead of one per Have.
    inbox: Vec<(u64, u32, u32)>,
    last_starving: u64,
    upload: Upload,
}

#[derive(Clone, Copy)]
struct FlowInfo {
    chunk: u32,
    bytes: u32,
}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct RunResult {
    pub policy: Policy,
    pub n: usize,
    /// Completion time of each seller from its arrival (s); None: did not finish.
    pub finish_s: Vec<Option<f64>>,
    /// Link profile of each seller.
    pub profile: Vec<u8>,
    /// Kumar-Ross bound on the simulated capacities, and on the nominal rates.
    pub bound_s: f64,
    pub nominal_bound_s: f64,
    /// Bytes the sellers had to fetch (the image, or the changed part of it).
    pub needed_bytes: u64,
    pub image_bytes: u64,
    pub buyer_payload: u64,
    pub payload_bytes: u64,
    pub duplicate_bytes: u64,
    pub control_bytes: u64,
    pub events: u64,
    pub sim_end_s: f64,
    pub gone: usize,
    /// Starving notes the sellers sent the super-seed (shipped policy).
    pub starving_notes: u64,
    /// Buyer chunk bytes beyond one copy of each chunk.
    pub buyer_extra: u64,
    /// Requests the leechers gave up on (timeouts) and peers they dropped.
    pub cancels: u64,
    pub disconnects: u64,
    /// Scheduler runs (`Leecher::poll`): the simulator's main cost.
    pub polls: u64,
    /// Requests sellers answered with Busy.
    pub busy: u64,
}

/// Options beyond the world.
#[derive(Clone, Debug, Default)]
pub struct RunOpts {
    pub seed: u64,
    pub churn: Option<ChurnSpec>,
    /// Chunks every seller already holds (an older version of the image).
    pub preloaded: Option<Bitfield>,
    pub max_time_s: f64,
    /// Stop after this much wall-clock time (how far a huge run gets); the
    /// result then depends on the machine's speed.
    pub max_wall_s: Option<f64>,
    /// Receivers tell their scheduler that a reply's bytes are arriving
    /// (`Leecher::on_bytes`, as the node's link does), so a slow but moving
    /// reply is not timed out.
    pub progress_reports: bool,
    /// Sellers queue every request they can serve (the node before Busy).
    pub no_admission: bool,
}

struct Sim<'a> {
    w: &'a World,
    policy: Policy,
    now: u64,
    q: EventQueue<Ev>,
    net: FlowNet,
    flows: Vec<FlowInfo>,
    nodes: Vec<Node>,
    seeder: Option<Seeder<u32>>,
    buyer_haves: Vec<(u32, u32)>,
    buyer_tick_pending: bool,
    resched: Vec<Reschedule>,
    /// Replies admitted by the sender's budget to a peer already receiving one:
    /// they follow on the same stream, one after the other (link.rs keeps one
    /// outbound stream per peer). A key is present while its pair has a flow.
    pair_queue: FxHashMap<(u32, u32), VecDeque<u32>>,
    remaining: usize,
    seed: u64,
    // counters
    buyer_payload: u64,
    payload: u64,
    dup: u64,
    control: u64,
    events: u64,
    done: usize,
    starving_notes: u64,
    buyer_sent: Vec<bool>,
    buyer_extra: u64,
    cancels: u64,
    disconnects: u64,
    polls: u64,
    progress: bool,
    /// Sellers answer Busy instead of queueing long (`chunks::swarm::admit`).
    admit: bool,
    busy: u64,
    /// Reused buffer: the neighbours a Have goes to.
    scratch: Vec<u32>,
}

/// Runs the swarm under `policy` (not `Naive`: see [`crate::naive`]).
pub fn run(w: &World, policy: Policy, opts: &RunOpts, bar: Option<&ProgressBar>) -> RunResult {
    assert!(
        policy != Policy::Naive,
        "the naive policy has its own model"
    );
    let nch = w.sizes.len() as u32;
    let start_has = opts.preloaded.clone().unwrap_or_else(|| Bitfield::new(nch));
    let needed_bytes: u64 = (0..nch)
        .filter(|&i| !start_has.get(i))
        .map(|i| w.sizes[i as usize] as u64)
        .sum();
    let mut nodes = Vec::with_capacity(w.n + 1);
    nodes.push(Node {
        leech: None,
        has: Bitfield::full(nch),
        online: true,
        gone: false,
        joined_us: Some(0),
        done_us: Some(0),
        wake_us: u64::MAX,
        batch_pending: false,
        inbox: Vec::new(),
        last_starving: 0,
        upload: Upload::new(seed_budget(w.up[0])),
    });
    for i in 1..=w.n {
        nodes.push(Node {
            leech: None,
            has: start_has.clone(),
            online: false,
            gone: false,
            joined_us: None,
            done_us: None,
            wake_us: u64::MAX,
            batch_pending: false,
            inbox: Vec::new(),
            last_starving: 0,
            upload: Upload::new(relay_budget(w.up[i])),
        });
    }
    let mut sim = Sim {
        w,
        policy,
        now: 0,
        q: EventQueue::default(),
        net: FlowNet::new(w.up.clone(), w.down.clone()),
        flows: Vec::new(),
        nodes,
        seeder: (policy == Policy::Shipped)
            .then(|| Seeder::new(w.sizes.clone(), SeederConfig::default())),
        buyer_haves: Vec::new(),
        buyer_tick_pending: false,
        resched: Vec::new(),
        pair_queue: FxHashMap::default(),
        remaining: w.n,
        seed: opts.seed,
        buyer_payload: 0,
        payload: 0,
        dup: 0,
        control: 0,
        events: 0,
        done: 0,
        starving_notes: 0,
        buyer_sent: vec![false; nch as usize],
        buyer_extra: 0,
        cancels: 0,
        disconnects: 0,
        polls: 0,
        progress: opts.progress_reports,
        admit: !opts.no_admission,
        busy: 0,
        scratch: Vec::new(),
    };
    sim.schedule_churn(opts);
    let max_us = (opts.max_time_s * 1e6) as u64;
    let started = std::time::Instant::now();
    let mut last_bar = 0u64;
    while sim.remaining > 0 {
        let Some((t, ev)) = sim.q.pop() else { break };
        if t > max_us {
            break;
        }
        debug_assert!(t >= sim.now, "time runs backwards");
        sim.now = t;
        sim.events += 1;
        sim.handle(ev);
        if sim.events.is_multiple_of(65_536)
            && opts
                .max_wall_s
                .is_some_and(|w| started.elapsed().as_secs_f64() > w)
        {
            break;
        }
        if let Some(b) = bar {
            if sim.events - last_bar >= 20_000 {
                last_bar = sim.events;
                b.set_position(sim.done as u64);
                b.set_message(format!("t={:.0}s", sim.now as f64 / 1e6));
            }
        }
    }
    if let Some(b) = bar {
        b.set_position(sim.done as u64);
    }
    RunResult {
        policy,
        n: w.n,
        finish_s: sim.nodes[1..]
            .iter()
            .map(|n| match (n.done_us, n.joined_us) {
                (Some(d), Some(j)) => Some(d.saturating_sub(j) as f64 / 1e6),
                _ => None,
            })
            .collect(),
        profile: w.profile[1..].to_vec(),
        bound_s: crate::bound::kumar_ross(needed_bytes as f64, w.up[0], &w.up[1..], &w.down[1..]),
        nominal_bound_s: crate::bound::kumar_ross(
            needed_bytes as f64,
            w.up[0],
            &w.up[1..],
            &w.down[1..],
        ) * w.goodput,
        needed_bytes,
        image_bytes: w.total,
        buyer_payload: sim.buyer_payload,
        payload_bytes: sim.payload,
        duplicate_bytes: sim.dup,
        control_bytes: sim.control,
        events: sim.events,
        sim_end_s: sim.now as f64 / 1e6,
        gone: sim.nodes.iter().filter(|n| n.gone).count(),
        starving_notes: sim.starving_notes,
        buyer_extra: sim.buyer_extra,
        cancels: sim.cancels,
        disconnects: sim.disconnects,
        polls: sim.polls,
        busy: sim.busy,
    }
}

impl Sim<'_> {
    fn schedule_churn(&mut self, opts: &RunOpts) {
        let mut rng = SplitMix64::new(self.seed ^ 0xc4c4_0000);
        let c = opts.churn.clone().unwrap_or_default();
        for i in 1..=self.w.n as u32 {
            let at = if c.join_spread_s > 0.0 {
                (unit(&mut rng) * c.join_spread_s * 1e6) as u64
            } else {
                0
            };
            self.q.push(at, Ev::Join { node: i });
        }
        if c.leave_fraction > 0.0 {
            let mut ids: Vec<u32> = (1..=self.w.n as u32).collect();
            shuffle(&mut rng, &mut ids);
            let k = (c.leave_fraction * self.w.n as f64).round() as usize;
            for &i in ids.iter().take(k) {
                let at = c.leave_from_s + unit(&mut rng) * (c.leave_to_s - c.leave_from_s);
                self.q.push((at * 1e6) as u64, Ev::Leave { node: i });
                if c.downtime_s > 0.0 {
                    let back = at + exponential(&mut rng, c.downtime_s);
                    self.q.push((back * 1e6) as u64 + 1, Ev::Join { node: i });
                } else {
                    self.nodes[i as usize].gone = true;
                }
            }
        }
        for e in &c.events {
            let mut ids: Vec<u32> = (1..=self.w.n as u32).collect();
            shuffle(&mut rng, &mut ids);
            for &i in ids.iter().take(e.count) {
                self.q.push((e.at_s * 1e6) as u64, Ev::Leave { node: i });
                if c.downtime_s > 0.0 {
                    let back = e.at_s + exponential(&mut rng, c.downtime_s);
                    self.q.push((back * 1e6) as u64 + 1, Ev::Join { node: i });
                } else {
                    self.nodes[i as usize].gone = true;
                }
            }
        }
        // leavers that never return are not waited for
        self.remaining -= self.nodes.iter().filter(|n| n.gone).count();
    }

    fn send(&mut self, from: u32, to: u32, bytes: u64, ev: Ev) {
        self.control += bytes;
        let at = self.now + self.w.lat(from, to);
        self.q.push(at, ev);
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Request { from, to, chunk } => self.on_request(from, to, chunk),
            Ev::NotHave { from, to, chunk } => {
                let now = self.now;
                if let Some(l) = self.leech(to) {
                    l.peer_lacks(&from, chunk, now);
                    self.drive(to);
                }
            }
            Ev::Busy {
                from,
                to,
                chunk,
                retry_us,
            } => {
                let now = self.now;
                if let Some(l) = self.leech(to) {
                    l.peer_busy(&from, chunk, retry_us, now);
                    self.drive(to);
                }
            }
            Ev::HaveBatch { node } => self.on_have_batch(node),
            Ev::Offer { to, chunk } => {
                if let Some(l) = self.leech(to) {
                    l.peer_have(&BUYER, chunk);
                    self.drive(to);
                }
            }
            Ev::Cancel { from, to, chunk } => {
                if self.nodes[to as usize].upload.cancel(from, chunk) && to == BUYER {
                    if let Some(s) = self.seeder.as_mut() {
                        s.on_sent(&from, chunk, false, self.now);
                    }
                }
            }
            Ev::Starving { from } => {
                if let Some(s) = self.seeder.as_mut() {
                    s.peer_starving(&from, self.now);
                    self.buyer_tick_soon();
                }
            }
            Ev::FlowEnd { flow, version } => self.on_flow_end(flow, version),
            Ev::Delivered { from, to, chunk } => self.on_delivered(from, to, chunk),
            Ev::Ack { from, to, chunk } => self.on_ack(from, to, chunk),
            Ev::Wake { node } => {
                let n = &mut self.nodes[node as usize];
                if self.now >= n.wake_us {
                    n.wake_us = u64::MAX;
                    self.drive(node);
                }
            }
            Ev::BuyerTick => {
                self.buyer_tick_pending = false;
                if let Some(s) = self.seeder.as_mut() {
                    for (p, c) in self.buyer_haves.drain(..) {
                        s.peer_have(&p, c, self.now);
                    }
                }
                self.seed_poll();
            }
            Ev::Leave { node } => self.on_leave(node),
            Ev::Join { node } => self.on_join(node),
        }
    }

    /// The leecher of an online, unfinished seller.
    fn leech(&mut self, i: u32) -> Option<&mut Leecher<u32>> {
        let n = &mut self.nodes[i as usize];
        if !n.online {
            return None;
        }
        n.leech.as_deref_mut()
    }

    fn buyer_tick_soon(&mut self) {
        if !self.buyer_tick_pending {
            self.buyer_tick_pending = true;
            let at = (self.now / BUYER_TICK_US + 1) * BUYER_TICK_US;
            self.q.push(at, Ev::BuyerTick);
        }
    }

    fn seed_poll(&mut self) {
        let Some(s) = self.seeder.as_mut() else {
            return;
        };
        s.poll(self.now);
        let mut offers = Vec::new();
        while let Some(SeedAction::Offer { peer, chunk }) = s.next_action() {
            offers.push((peer, chunk));
        }
        for (peer, chunk) in offers {
            // offers to one peer ride in one Have; counted per chunk here
            self.send(
                BUYER,
                peer,
                wire_size::have(1),
                Ev::Offer { to: peer, chunk },
            );
        }
        // idle-uplink decisions are taken by time, not only on events
        if self.seeder.as_ref().is_some_and(|s| s.first_copy_done()) {
            self.buyer_tick_soon();
        }
    }

    fn on_request(&mut self, from: u32, to: u32, chunk: u32) {
        if !self.nodes[to as usize].online || !self.nodes[from as usize].online {
            return;
        }
        let serve = if to == BUYER {
            match self.seeder.as_mut() {
                Some(s) => s.on_request(&from, chunk, self.now) == Decision::Serve,
                None => true,
            }
        } else {
            self.nodes[to as usize].has.get(chunk)
        };
        if !serve {
            self.send(
                to,
                from,
                wire_size::INDEX_MSG,
                Ev::NotHave {
                    from: to,
                    chunk,
                    to: from,
                },
            );
            return;
        }
        if to != BUYER && self.admit {
            // the server's own admission (link.rs): no request waits long behind
            // a slow uplink while faster holders idle
            let waiting = self.nodes[to as usize].upload.waiting_bytes(&self.w.sizes);
            let size = self.w.sizes[chunk as usize] as u64;
            if let Err(retry_us) = admit(waiting, size, self.w.up[to as usize], ADMIT_WAIT_US) {
                self.busy += 1;
                self.send(
                    to,
                    from,
                    wire_size::INDEX_MSG + 4,
                    Ev::Busy {
                        from: to,
                        to: from,
                        chunk,
                        retry_us,
                    },
                );
                return;
            }
        }
        let n = &mut self.nodes[to as usize];
        // rarest first among a seller's waiting replies (its own availability count)
        let prio = match n.leech.as_deref() {
            Some(l) => l.availability(chunk),
            None => ORDINARY,
        };
        n.upload.push(from, chunk, prio);
        self.pump(to);
    }

    /// Starts queued replies while `i`'s budget has room.
    fn pump(&mut self, i: u32) {
        while let Some(wt) = self.nodes[i as usize].upload.next_ready() {
            if !self.nodes[wt.to as usize].online {
                continue;
            }
            let bytes = self.w.sizes[wt.chunk as usize];
            self.nodes[i as usize].upload.in_flight += bytes as u64;
            self.control += wire_size::chunk(0);
            if let Some(q) = self.pair_queue.get_mut(&(i, wt.to)) {
                q.push_back(wt.chunk);
                continue;
            }
            self.pair_queue.insert((i, wt.to), VecDeque::new());
            self.start_flow(i, wt.to, wt.chunk);
        }
    }

    /// Starts the transfer of `chunk` from `i` to `to` as a flow.
    fn start_flow(&mut self, i: u32, to: u32, chunk: u32) {
        let bytes = self.w.sizes[chunk as usize];
        {
            let f = self
                .net
                .start(i, to, bytes as u64, self.now, &mut self.resched);
            if self.flows.len() <= f as usize {
                self.flows
                    .resize(f as usize + 1, FlowInfo { chunk: 0, bytes: 0 });
            }
            self.flows[f as usize] = FlowInfo { chunk, bytes };
            self.apply_resched();
        }
    }

    fn apply_resched(&mut self) {
        for r in self.resched.drain(..) {
            if let Some(t) = r.finish_us {
                self.q.push(
                    t,
                    Ev::FlowEnd {
                        flow: r.flow,
                        version: r.version,
                    },
                );
            }
        }
    }

    fn on_flow_end(&mut self, flow: FlowId, version: u32) {
        if !self.net.is_live(flow) || self.net.version(flow) != version {
            return;
        }
        let (src, dst) = self.net.ends(flow);
        self.net.stop(flow, self.now, &mut self.resched);
        self.apply_resched();
        let fi = self.flows[flow as usize];
        self.payload += fi.bytes as u64;
        if src == BUYER {
            self.buyer_payload += fi.bytes as u64;
            let first = &mut self.buyer_sent[fi.chunk as usize];
            if *first {
                self.buyer_extra += fi.bytes as u64;
            }
            *first = true;
        }
        // the next reply on the same stream follows at once
        let next = self
            .pair_queue
            .get_mut(&(src, dst))
            .and_then(VecDeque::pop_front);
        match next {
            Some(c) => self.start_flow(src, dst, c),
            None => {
                self.pair_queue.remove(&(src, dst));
            }
        }
        let at = self.now + self.w.lat(src, dst);
        self.q.push(
            at,
            Ev::Delivered {
                from: src,
                to: dst,
                chunk: fi.chunk,
            },
        );
    }

    fn on_delivered(&mut self, from: u32, to: u32, chunk: u32) {
        if !self.nodes[to as usize].online {
            return;
        }
        // the receiver answers every chunk with a Have at once (the sender's budget)
        self.send(
            to,
            from,
            wire_size::have(1),
            Ev::Ack {
                from: to,
                to: from,
                chunk,
            },
        );
        let node = &mut self.nodes[to as usize];
        if !node.has.set(chunk) {
            self.dup += self.w.sizes[chunk as usize] as u64;
        } else {
            // tell the neighbours, as the node does: not the sender (its
            // acknowledgement went above), not those known to hold the chunk
            // (node/src/p2p/exchange.rs); the buyer hears in batches
            let neigh = &self.w.neigh[to as usize];
            let known = self.nodes[to as usize].leech.as_deref();
            let mut tell = std::mem::take(&mut self.scratch);
            tell.extend(
                neigh
                    .iter()
                    .copied()
                    .filter(|&j| j != from && !known.is_some_and(|l| l.peer_has(&j, chunk))),
            );
            self.control += wire_size::have(1) * tell.len() as u64;
            for &j in &tell {
                let at = self.now + self.w.lat(to, j);
                let nj = &mut self.nodes[j as usize];
                if nj.online && nj.leech.is_some() {
                    nj.inbox.push((at, to, chunk));
                    if !nj.batch_pending {
                        nj.batch_pending = true;
                        self.q.push(at + HAVE_BATCH_US, Ev::HaveBatch { node: j });
                    }
                }
            }
            tell.clear();
            self.scratch = tell;
            if from != BUYER && self.seeder.is_some() {
                self.buyer_haves.push((to, chunk));
                self.buyer_tick_soon();
            }
        }
        if let Some(l) = self.nodes[to as usize].leech.as_deref_mut() {
            l.on_chunk(&from, chunk, true, self.now);
            self.drive(to);
        }
    }

    /// Applies the Haves that have reached `i` and runs its scheduler once.
    fn on_have_batch(&mut self, i: u32) {
        let now = self.now;
        let n = &mut self.nodes[i as usize];
        n.batch_pending = false;
        let mut inbox = std::mem::take(&mut n.inbox);
        let Some(l) = n.leech.as_deref_mut().filter(|_| n.online) else {
            return; // gone or finished: nothing to learn
        };
        let mut later = u64::MAX;
        let mut news = false;
        let has = &n.has;
        inbox.retain(|&(at, from, chunk)| {
            if at <= now {
                l.peer_have(&from, chunk);
                news |= !has.get(chunk);
                false
            } else {
                later = later.min(at);
                true
            }
        });
        // Haves that can lead to no request (`Leecher::wants_poll`) leave the
        // poll only its round of the peers to advance: the rest of `drive`
        // (progress reports, actions, wake-up) would find what the last one
        // found (2.3 M of 3.9 M polls at 1,000 sellers). Not while nothing is
        // asked anywhere: `drive` then schedules the starving check.
        let full = news && (l.wants_poll(now) || l.in_flight() == 0);
        if news && !full {
            l.poll(now);
            self.polls += 1;
        }
        n.inbox = inbox;
        if later != u64::MAX {
            n.batch_pending = true;
            self.q
                .push(later + HAVE_BATCH_US, Ev::HaveBatch { node: i });
        }
        // Haves of chunks it holds change nothing its scheduler could ask for
        // (availability of held chunks only): the poll would find what the last
        // one found (dsl-10000 at 1,000 sellers: 38 % fewer polls, 14 % less CPU).
        if full {
            self.drive(i);
        }
    }

    fn on_ack(&mut self, from: u32, to: u32, chunk: u32) {
        // `from` acknowledges `chunk` to the sender `to`
        let bytes = self.w.sizes[chunk as usize] as u64;
        let up = &mut self.nodes[to as usize].upload;
        up.in_flight = up.in_flight.saturating_sub(bytes);
        if to == BUYER {
            if let Some(s) = self.seeder.as_mut() {
                s.on_sent(&from, chunk, true, self.now);
                s.peer_have(&from, chunk, self.now);
                self.seed_poll();
            }
        } else if let Some(l) = self.leech(to) {
            // the sender held `chunk`: nothing new for its own scheduler to ask
            // for, so no poll (see on_have_batch)
            l.peer_have(&from, chunk);
        }
        self.pump(to);
    }

    /// Runs `i`'s leecher and carries out its actions (node: `drive`).
    fn drive(&mut self, i: u32) {
        let now = self.now;
        let n = &mut self.nodes[i as usize];
        if !n.online {
            return;
        }
        let Some(l) = n.leech.as_deref_mut() else {
            return;
        };
        if self.progress {
            // a reply moving on the downlink is progress (the node reports it
            // every few hundred ms while bytes come in)
            for &f in self.net.flows_of(i).1 {
                if self.net.rate(f) > 0.0 {
                    l.on_bytes(&self.net.ends(f).0, now);
                }
            }
        }
        l.poll(now);
        self.polls += 1;
        let mut acts = Vec::new();
        while let Some(a) = l.next_action() {
            acts.push(a);
        }
        let starving = l.is_starving(now);
        let in_flight_none = l.in_flight() == 0;
        let deadline = l.next_deadline();
        let mut complete = false;
        for a in acts {
            match a {
                Action::Request { peer, chunk } => self.send(
                    i,
                    peer,
                    wire_size::INDEX_MSG,
                    Ev::Request {
                        from: i,
                        to: peer,
                        chunk,
                    },
                ),
                Action::Cancel { peer, chunk } => {
                    self.cancels += 1;
                    self.send(
                        i,
                        peer,
                        wire_size::INDEX_MSG,
                        Ev::Cancel {
                            from: i,
                            to: peer,
                            chunk,
                        },
                    )
                }
                // the leecher already dropped the peer; nothing on the wire
                Action::Ban { .. } | Action::Disconnect { .. } => self.disconnects += 1,
                Action::Complete => complete = true,
            }
        }
        if complete {
            let n = &mut self.nodes[i as usize];
            n.done_us = Some(now);
            // a finished seller keeps serving but no longer tracks who has what
            n.leech = None;
            n.wake_us = u64::MAX;
            self.done += 1;
            self.remaining -= 1;
            return;
        }
        if self.seeder.is_some() {
            let n = &mut self.nodes[i as usize];
            if starving && now.saturating_sub(n.last_starving) >= STARVING_EVERY_US {
                n.last_starving = now;
                self.starving_notes += 1;
                self.send(i, BUYER, wire_size::STARVING, Ev::Starving { from: i });
            }
        }
        let mut want = deadline;
        if in_flight_none && self.seeder.is_some() {
            // nothing asked anywhere: look again when starving would be declared
            let again = now + STARVE_CHECK_US;
            want = Some(want.map_or(again, |d| d.min(again)));
        }
        if let Some(d) = want {
            let d = d.max(now + 1);
            let n = &mut self.nodes[i as usize];
            if n.wake_us > d || n.wake_us <= now {
                n.wake_us = d;
                self.q.push(d, Ev::Wake { node: i });
            }
        }
    }

    fn new_leecher(&self, i: u32) -> Box<Leecher<u32>> {
        let n = &self.nodes[i as usize];
        let mut l = Leecher::new(
            self.w.sizes.clone(),
            n.has.clone(),
            self.seed ^ (i as u64).wrapping_mul(0x9e37_79b9),
            LeecherConfig::default(),
        );
        if self.policy == Policy::Random {
            l.set_piece_order(PieceOrder::Random);
        }
        Box::new(l)
    }

    fn on_join(&mut self, i: u32) {
        if self.nodes[i as usize].online {
            return;
        }
        let now = self.now;
        let nch = self.w.sizes.len() as u64;
        let complete = self.nodes[i as usize].has.is_full();
        {
            let n = &mut self.nodes[i as usize];
            n.online = true;
            n.joined_us.get_or_insert(now);
            n.wake_us = u64::MAX;
        }
        if complete && self.nodes[i as usize].done_us.is_none() {
            // an update where nothing changed: done on arrival
            self.nodes[i as usize].done_us = Some(now);
            self.done += 1;
            self.remaining -= 1;
        }
        if !complete {
            let mut l = self.new_leecher(i);
            let kind = if self.seeder.is_some() {
                PeerKind::SuperSeed
            } else {
                PeerKind::Normal
            };
            let buyer_has = if self.seeder.is_some() {
                Bitfield::new(nch as u32)
            } else {
                Bitfield::full(nch as u32)
            };
            l.add_peer(BUYER, buyer_has, kind, now);
            for &j in &self.w.neigh[i as usize] {
                let nj = &self.nodes[j as usize];
                if nj.online {
                    l.add_peer(j, nj.has.clone(), PeerKind::Normal, now);
                }
            }
            self.nodes[i as usize].leech = Some(l);
        }
        // hellos both ways with every online neighbour and the buyer
        let hello = wire_size::hello(nch);
        let neigh = self.w.neigh[i as usize].clone();
        self.control += 2 * hello * (neigh.len() as u64 + 1);
        let has = self.nodes[i as usize].has.clone();
        if let Some(s) = self.seeder.as_mut() {
            if !complete {
                s.add_peer(i, has.clone(), now);
            }
        }
        for j in neigh {
            if let Some(l) = self.leech(j) {
                l.add_peer(i, has.clone(), PeerKind::Normal, now);
                self.drive(j);
            }
        }
        self.seed_poll();
        self.drive(i);
    }

    fn on_leave(&mut self, i: u32) {
        if !self.nodes[i as usize].online {
            return;
        }
        let now = self.now;
        {
            let n = &mut self.nodes[i as usize];
            n.online = false;
            // the process is gone: its scheduler state with it (chunks stay on disk)
            n.leech = None;
            n.upload.clear();
            n.wake_us = u64::MAX;
        }
        // its transfers break off
        let (ups, downs) = self.net.flows_of(i);
        let mut cut: Vec<FlowId> = ups.to_vec();
        cut.extend_from_slice(downs);
        for f in cut {
            let (src, dst) = self.net.ends(f);
            self.net.stop(f, now, &mut self.resched);
            let fi = self.flows[f as usize];
            let waiting = self.pair_queue.remove(&(src, dst)).unwrap_or_default();
            if dst == i {
                // the broken reply and those queued behind it never arrive
                for chunk in std::iter::once(fi.chunk).chain(waiting) {
                    let bytes = self.w.sizes[chunk as usize] as u64;
                    let up = &mut self.nodes[src as usize].upload;
                    up.in_flight = up.in_flight.saturating_sub(bytes);
                    if src == BUYER {
                        if let Some(s) = self.seeder.as_mut() {
                            s.on_sent(&i, chunk, false, now);
                        }
                    }
                }
            }
        }
        self.apply_resched();
        // its peers notice the connection drop
        for j in self.w.neigh[i as usize].clone() {
            self.nodes[j as usize].upload.drop_peer(i);
            if let Some(l) = self.leech(j) {
                l.remove_peer(&i);
                self.drive(j);
            }
            self.pump(j);
        }
        self.nodes[BUYER as usize].upload.drop_peer(i);
        if let Some(s) = self.seeder.as_mut() {
            s.remove_peer(&i);
        }
        self.pump(BUYER);
        self.seed_poll();
    }
}
