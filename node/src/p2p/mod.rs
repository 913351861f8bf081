//! libp2p networking of the node: discovery (Kademlia, identify, bootstrap peers,
//! optional mDNS) and the chunk-swarm protocol, a thin I/O shell around the
//! sans-IO cores in `chunks::swarm` (the schedulers and the fetch's clock).
//!
//! One task owns the libp2p `Swarm` and every image's swarm state; the control
//! socket talks to it through a channel. A buyer super-seeds the images it holds
//! (`Seeder`); a seller fetches with a `Leecher` and serves everything it holds.
//! Every received chunk is checked against its id before it is stored; every
//! manifest's signature before it is used. The shell reads the clock once per
//! event (`now`) and sleeps until the cores' next deadline; it decides no wait.
//!
//! - `behaviour`: the libp2p stack; `discovery`: kad, identify, mDNS;
//!   `conns`: connections and our addresses; `handle`: [`P2pHandle`] and
//!   [`PeerEvent`]; `manifest`: getting and serving manifests; `image` and
//!   `exchange`: an image's swarm and its messages; `status`: the `p2p` status
//!   section; `link`/`wire`: streams and messages; `fault`: test-only faults.

mod behaviour;
mod conns;
mod discovery;
mod exchange;
mod fault;
mod grants;
mod handle;
mod image;
pub mod link;
mod manifest;
mod sockets;
mod status;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chunks::swarm::Micros;
use chunks::{ChunkStore, ImageId};
use futures::StreamExt;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{gossipsub, identify, kad, ping, Multiaddr, PeerId, Swarm};
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::{debug, info_span, warn};

pub use conns::ip_of;
pub use handle::{P2pHandle, PeerEvent};

use crate::control::{Progress, Router};
use crate::domain::Role;
use crate::error::{Error, Result};
use crate::node::Node;
use behaviour::{Behaviour, BehaviourEvent};
use conns::LostAddrs;
use fault::Fault;
use grants::Grants;
use handle::{Cmd, Waiter};
use image::{ImageSwarm, Mode};
use link::{LinkEvent, Links};
use manifest::ManifestFetch;
use status::{fetch_report, Rejects, Snapshot};

/// How often the slow housekeeping runs (advertising images, lost addresses).
const SLOW_EVERY: Duration = Duration::from_secs(2);
/// The scheduler's tick while chunks move (timeouts, batched haves).
const TICK: Duration = Duration::from_millis(20);
/// The super-seeds' batched haves go out every this many ticks (once a second).
const SLOW_HAVES_TICKS: u64 = 50;
/// The uplink's delay is sampled every this many ticks (100 ms).
const PATH_SAMPLE_TICKS: u64 = 5;
/// A connection that had this many bytes acknowledged since the last sample
/// is uploading (not just sending haves).
const BULK_BYTES: u64 = 4 * 1024;
/// Least time between two snapshots for `status`.
const SNAPSHOT_EVERY: Duration = Duration::from_millis(200);

struct Net {
    swarm: Swarm<Behaviour>,
    store: Arc<ChunkStore>,
    role: Role,
    /// The origin of `now()`, the cores' clock.
    epoch: Instant,
    images: HashMap<ImageId, ImageSwarm>,
    manifest_fetches: HashMap<ImageId, ManifestFetch>,
    /// Peers given (or pointed to) each manifest we serve, oldest first.
    manifest_given: HashMap<ImageId, Vec<PeerId>>,
    /// Requesters already pointed elsewhere once.
    redirected: HashSet<(ImageId, PeerId)>,
    links: Links,
    /// The swarm's TCP sockets: the uplink's delay and the kernel's pacing.
    sockets: Arc<sockets::Sockets>,
    /// The yielding mode follows the sockets' round trip (`upload_yield_signal`).
    tcp_yield_signal: bool,
    link_events: Option<mpsc::UnboundedReceiver<LinkEvent>>,
    provider_queries: HashMap<kad::QueryId, ImageId>,
    providing: HashSet<ImageId>,
    connected: HashSet<PeerId>,
    listen: Vec<Multiaddr>,
    rejects: Rejects,
    fault: Fault,
    snapshot: Arc<Mutex<Snapshot>>,
    rng_seed: u64,
    /// Inbound messages the links refused (malformed or oversized).
    link_rejects: Arc<std::sync::atomic::AtomicU64>,
    ticks: u64,
    peer_events: mpsc::UnboundedSender<PeerEvent>,
    /// Our addresses that went away (see `drop_connections_of_lost_addresses`).
    lost_addrs: LostAddrs,
    /// Each peer's open connections and the IP each comes from.
    conn_ips: HashMap<PeerId, Vec<(ConnectionId, IpAddr)>>,
    /// Who may fetch which image (images are private to their buyer).
    grants: Grants,
}

/// Registers the `image.fetch` method and the `p2p` status section, and spawns
/// the networking task. Must run inside the daemon's tokio runtime.
pub fn start(node: Arc<Node>, router: &mut Router) -> Result<Arc<P2pHandle>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let snapshot = Arc::new(Mutex::new(Snapshot::default()));
    let (peer_tx, peer_rx) = mpsc::unbounded_channel();
    let net = Net::new(node.clone(), snapshot.clone(), peer_tx)?;
    let handle = Arc::new(P2pHandle {
        control: net.swarm.behaviour().stream.new_control(),
        events: Mutex::new(Some(peer_rx)),
        cmds: tx.clone(),
    });
    status::register(
        router,
        snapshot,
        node.identity.peer_id().to_string(),
        net.fault.name(),
    );
    let role = node.role;
    let (gnode, gtx) = (node.clone(), tx.clone());
    router.method("image.fetch", move |params: Value, progress: Progress| {
        let tx = tx.clone();
        async move {
            if role != Role::Seller {
                return Err(Error::WrongRole {
                    needed: "seller",
                    actual: role.as_str(),
                });
            }
            let id = params
                .get("id")
                .and_then(|v| v.as_str())
                .ok_or_else(|| Error::BadArg {
                    what: "id",
                    reason: "missing image id".into(),
                })?;
            let image: ImageId = id.parse().map_err(|_| Error::BadArg {
                what: "image id",
                reason: format!("{id:?} is not a 64-digit hex image id"),
            })?;
            if let Some(g) = params.get("grant").and_then(|v| v.as_str()) {
                let g = grants::parse_grant(g)?;
                if g.body.image != image.0 {
                    return Err(Error::BadArg {
                        what: "grant",
                        reason: format!(
                            "the grant is for image {}, not {image}",
                            hex::encode(g.body.image)
                        ),
                    });
                }
                let _ = tx.send(Cmd::Grant(g));
            }
            handle::fetch_via(&tx, image, progress).await
        }
    });
    router.method("image.grant", move |params: Value, _progress: Progress| {
        let (node, tx) = (gnode.clone(), gtx.clone());
        async move {
            if role != Role::Buyer {
                return Err(Error::WrongRole {
                    needed: "buyer",
                    actual: role.as_str(),
                });
            }
            grants::issue(&node, &tx, &params)
        }
    });
    let span = info_span!("p2p", peer = %node.identity.peer_id());
    tokio::spawn(tracing::Instrument::instrument(net.run(rx), span));
    Ok(handle)
}

impl Net {
    fn new(
        node: Arc<Node>,
        snapshot: Arc<Mutex<Snapshot>>,
        peer_events: mpsc::UnboundedSender<PeerEvent>,
    ) -> Result<Net> {
        let keypair = node.identity.keypair().clone();
        let local = keypair.public().to_peer_id();
        let sockets = Arc::new(sockets::Sockets::new(node.settings.swarm.tcp_congestion()?));
        let swarm = behaviour::build_swarm(
            keypair,
            sockets.clone(),
            node.settings.mdns,
            &node.settings.listen,
            &node.settings.bootstrap,
        )?;
        let pid = local.to_bytes();
        let rng_seed = pid.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let link_rejects = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let budget = node.settings.swarm.upload_config(node.role)?;
        let (links, link_events) = Links::new(
            swarm.behaviour().stream.new_control(),
            link_rejects.clone(),
            budget,
        );
        Ok(Net {
            swarm,
            store: node.store.clone(),
            role: node.role,
            epoch: Instant::now(),
            images: HashMap::new(),
            manifest_fetches: HashMap::new(),
            manifest_given: HashMap::new(),
            redirected: HashSet::new(),
            links,
            sockets,
            tcp_yield_signal: node.settings.swarm.tcp_yield_signal(),
            link_events: Some(link_events),
            provider_queries: HashMap::new(),
            providing: HashSet::new(),
            connected: HashSet::new(),
            listen: Vec::new(),
            rejects: Rejects::default(),
            fault: Fault::from_env(),
            snapshot,
            rng_seed,
            link_rejects,
            ticks: 0,
            peer_events,
            lost_addrs: LostAddrs::default(),
            conn_ips: HashMap::new(),
            grants: Grants::load(
                &node.settings.data_dir.join("grants"),
                market::PeerKey::of(node.identity.signing_key()),
            ),
        })
    }

    /// The cores' clock: microseconds since the task started.
    fn now(&self) -> Micros {
        self.epoch.elapsed().as_micros() as Micros
    }

    /// The tokio instant of a core deadline.
    fn instant_of(&self, at: Micros) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.epoch + Duration::from_micros(at))
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut slow = tokio::time::interval(SLOW_EVERY);
        let mut kad_boot = tokio::time::interval(Duration::from_secs(30));
        let mut last_snapshot = Instant::now();
        let mut link_events = self.link_events.take().expect("run once");
        // the fetches' clocks: a sleep until the earliest deadline of any of them
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        let mut armed: Option<Micros> = None;
        loop {
            let next = self.next_timer_deadline();
            if next != armed {
                if let Some(at) = next {
                    timer.as_mut().reset(self.instant_of(at));
                }
                armed = next;
            }
            tokio::select! {
                ev = self.swarm.select_next_some() => self.on_swarm_event(ev),
                Some(ev) = link_events.recv() => self.on_link_event(ev),
                cmd = rx.recv() => match cmd {
                    Some(c) => self.on_cmd(c),
                    None => return,
                },
                () = &mut timer, if armed.is_some() => {
                    armed = None;
                    self.poll_timers();
                }
                // an idle node (nothing moving) does not wake every 20 ms
                _ = tick.tick(), if self.busy() => self.on_tick(),
                _ = slow.tick() => self.on_slow_tick(),
                _ = kad_boot.tick() => {
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                }
            }
            if last_snapshot.elapsed() > SNAPSHOT_EVERY {
                self.publish_snapshot();
                last_snapshot = Instant::now();
            }
        }
    }

    /// Carries out whatever the fetches' and manifest fetches' clocks say is due.
    fn poll_timers(&mut self) {
        self.poll_manifest_waits();
        self.poll_fetch_timers();
    }

    fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Subscribe(topic) => {
                let t = gossipsub::IdentTopic::new(topic);
                if let Err(e) = self.swarm.behaviour_mut().gossipsub.subscribe(&t) {
                    warn!(error = %e, "gossip subscribe failed");
                }
            }
            Cmd::Publish(topic, data) => {
                let t = gossipsub::IdentTopic::new(topic);
                if let Err(e) = self.swarm.behaviour_mut().gossipsub.publish(t, data) {
                    // InsufficientPeers while alone, Duplicate for an unchanged offer.
                    debug!(error = %e, "gossip publish not sent");
                }
            }
            Cmd::Redial(peer) => {
                let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                    .condition(libp2p::swarm::dial_opts::PeerCondition::Always)
                    .build();
                if let Err(e) = self.swarm.dial(opts) {
                    debug!(%peer, error = %e, "redial failed");
                }
            }
            Cmd::Dial(peer) => {
                if !self.swarm.is_connected(&peer) {
                    if let Err(e) = self.swarm.dial(peer) {
                        debug!(%peer, error = %e, "dial failed");
                    }
                }
            }
            Cmd::Fetch {
                image,
                progress,
                reply,
            } => self.on_fetch(image, Waiter { progress, reply }),
            Cmd::Grant(g) => {
                let image = ImageId(g.body.image);
                if let Err(e) = self.grants.add(g) {
                    warn!(image = %image, error = %e, "cannot store grant");
                }
            }
        }
    }

    /// A fetch asked for: joins one in progress, answers at once for an image
    /// we hold, starts from a stored manifest, or waits for one.
    fn on_fetch(&mut self, image: ImageId, w: Waiter) {
        if let Some(img) = self.images.get_mut(&image) {
            match (&img.mode, &mut img.fetch) {
                (Mode::Leech(_), Some(f)) => f.waiters.push(w),
                _ => {
                    let _ = w.reply.send(Ok(fetch_report(img, 0.0)));
                }
            }
            return;
        }
        match self.store.get_manifest(image) {
            Ok(Some(m)) => self.start_leech(image, m, vec![w]),
            Ok(None) => self.fetch_manifest(image, w),
            Err(e) => w.fail(&e.to_string()),
        }
    }

    fn on_swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => self.on_new_listen_addr(address),
            SwarmEvent::ExpiredListenAddr { address, .. } => self.on_expired_listen_addr(address),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                connection_id,
                ..
            } => self.on_connected(peer_id, &endpoint, connection_id),
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => self.on_connection_closed(peer_id, connection_id, num_established),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => self.on_identify(peer_id, info),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) => {
                let _ = self.peer_events.send(PeerEvent::Rtt { peer, rtt });
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                message,
                ..
            })) => {
                let _ = self.peer_events.send(PeerEvent::Gossip {
                    topic: message.topic.into_string(),
                    data: message.data,
                });
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(ev)) => self.on_mdns(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetProviders(res),
                ..
            })) => self.on_providers(id, res),
            _ => {}
        }
    }

    fn on_link_event(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Msg {
                peer,
                msg,
                arrived_us,
                done_us,
            } => self.on_msg(peer, msg, (arrived_us, done_us)),
            LinkEvent::Sent {
                peer,
                image,
                index,
                delivered,
            } => {
                let now = self.now();
                let Some(img) = self.images.get_mut(&image) else {
                    return;
                };
                debug!(image = %image, chunk = index, to = %peer, delivered, "chunk sent");
                if delivered {
                    if let Some(&size) = img.sizes.get(index as usize) {
                        img.stats.uploaded_bytes += size as u64;
                    }
                }
                if let Mode::Seed(s) = &mut img.mode {
                    s.on_sent(&peer, index, delivered, now);
                    self.drive(image);
                }
            }
            LinkEvent::Progress { peer } => {
                // a chunk from `peer` is arriving: its requests are not stalled
                let now = self.now();
                for img in self.images.values_mut() {
                    if let Mode::Leech(l) = &mut img.mode {
                        l.on_bytes(&peer, now);
                    }
                }
            }
            LinkEvent::Down { peer, link } => {
                self.links.on_down(&peer, link);
                // messages may have been lost: start over with this peer
                self.forget_peer(peer);
                if self.connected.contains(&peer) {
                    self.greet_leeching(peer);
                }
            }
        }
    }

    /// Drops every trace of `peer` from the images' swarm state.
    fn forget_peer(&mut self, peer: PeerId) {
        self.grants.link_down(&peer);
        let ids: Vec<ImageId> = self.images.keys().copied().collect();
        for image in ids {
            let img = self.images.get_mut(&image).expect("listed");
            img.members.remove(&peer);
            img.greeted.remove(&peer);
            img.have_queue.remove(&peer);
            img.slow_have_queue.remove(&peer);
            img.early_haves.remove(&peer);
            match &mut img.mode {
                Mode::Seed(s) => s.remove_peer(&peer),
                Mode::Leech(l) => l.remove_peer(&peer),
                Mode::Done => {}
            }
            self.drive(image);
        }
        for mf in self.manifest_fetches.values_mut() {
            mf.asked.remove(&peer);
        }
    }

    /// Whether anything needs the 20 ms tick: a fetch or a seed with peers,
    /// queued haves, chunks awaiting acknowledgement.
    fn busy(&self) -> bool {
        self.links.budget().0 > 0
            || self.images.values().any(|i| {
                !i.have_queue.is_empty()
                    || !i.slow_have_queue.is_empty()
                    || match &i.mode {
                        Mode::Leech(_) => true,
                        Mode::Seed(_) => !i.members.is_empty(),
                        Mode::Done => false,
                    }
            })
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        if self.ticks.is_multiple_of(PATH_SAMPLE_TICKS) {
            self.sample_path();
        }
        let slow = self.ticks >= SLOW_HAVES_TICKS;
        if slow {
            self.ticks = 0;
        }
        self.links.expire();
        let ids: Vec<ImageId> = self.images.keys().copied().collect();
        for image in ids {
            // seeds too: starving peers are noticed by time, not by an event
            if !matches!(self.images[&image].mode, Mode::Done) {
                self.drive(image);
            }
            self.flush_haves(image, slow);
        }
    }

    /// Feeds the uplink's queueing delay, as TCP measures it on the connections
    /// that moved data since the last look, to the upload pacer (with
    /// `upload_yield_signal = "tcp"`), and paces
    /// every socket at the pacer's rate (shared by the connections uploading
    /// now): `upload_max_kbps`, and the yielding mode on the TCP or the one-way
    /// delay signal, act in the kernel, packet by packet, not a chunk at a time.
    /// With the one-way signal the links also learn each socket's rate: they
    /// write a chunk only once the previous one has left at it (link.rs).
    fn sample_path(&mut self) {
        let one_way = self.links.one_way();
        // by default nothing reads the sockets: no syscalls per socket then
        if !self.tcp_yield_signal && !one_way && self.links.cap_rate().is_none() {
            return;
        }
        let ms = self.sockets.measure();
        if let Some(queue) = ms
            .iter()
            .filter(|m| m.acked_delta > 0)
            .map(|m| m.srtt_us.saturating_sub(m.min_rtt_us))
            .max()
        {
            if self.tcp_yield_signal {
                self.links.path_delay(queue as Micros);
            }
        }
        let uploading = ms.iter().filter(|m| m.acked_delta >= BULK_BYTES).count();
        // The acknowledgement signal's rate stays a spacing of chunk starts: paced
        // packet by packet it bound, and its samples (the receiver's scheduling and
        // batching, retransmissions in a shallow FIFO) held six sellers on 1 Mbit/s
        // uplinks under 3 x the bound where they finish at 1.4-1.8 x without it
        // (tests/swarm_homelink.rs, docs/bench/owner-link.md).
        let rate = if self.tcp_yield_signal || one_way {
            self.links.pace_rate()
        } else {
            self.links.cap_rate()
        };
        let per_socket = rate.map(|r| (r / uploading.max(1) as f64) as u64);
        self.sockets.pace(per_socket);
        if one_way {
            self.links.set_socket_rate(per_socket.map(|r| r as f64));
        }
    }

    fn on_slow_tick(&mut self) {
        self.drop_connections_of_lost_addresses();
        self.provide_complete_images();
    }
}
