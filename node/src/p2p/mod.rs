//! libp2p networking of the node: discovery (Kademlia, identify, bootstrap peers,
//! optional mDNS) and the chunk-swarm protocol, a thin I/O shell around the
//! sans-IO scheduler in `chunks::swarm`.
//!
//! One task owns the libp2p `Swarm` and every image's swarm state; the control
//! socket talks to it through a channel. A buyer super-seeds the images it holds
//! (`Seeder`); a seller fetches with a `Leecher` and serves everything it holds.
//! Every received chunk is checked against its id before it is stored; every
//! manifest's signature before it is used.

pub mod link;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chunks::swarm::{
    Action, Bitfield, Decision, Leecher, LeecherConfig, PeerKind, SeedAction, Seeder, SeederConfig,
};
use chunks::{ChunkId, ChunkStore, ImageId, PinGuard, SignedManifest};
use futures::StreamExt;
use libp2p::core::{transport::Transport as _, upgrade};
use libp2p::swarm::{behaviour::toggle::Toggle, NetworkBehaviour, SwarmEvent};
use libp2p::{
    gossipsub, identify, kad, mdns, noise, ping, tcp, yamux, Multiaddr, PeerId, StreamProtocol,
    Swarm,
};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, info_span, warn};

use crate::cli::Role;
use crate::control::{Progress, Router};
use crate::daemon::Node;
use crate::error::{Error, Result};
use link::{BudgetConfig, LinkEvent, Links};
use wire::{Body, Msg, PeerRole};

/// How long a fetch waits for any peer to hand over a valid manifest.
const MANIFEST_WAIT: Duration = Duration::from_secs(15);
/// A fetch sent elsewhere for the manifest asks the super-seed again after this.
const MANIFEST_REDIRECT_WAIT: Duration = Duration::from_millis(1500);
/// How often providers are looked up again and new ones greeted.
const DISCOVERY_EVERY: Duration = Duration::from_secs(2);
/// Longest wait between two provider lookups of an image being fetched.
const LOOKUP_MAX_WAIT: Duration = Duration::from_secs(30);
/// A fetch with no new chunk for this long fails (and can be restarted).
const FETCH_STALL: Duration = Duration::from_secs(120);
/// Unsent bytes a TCP socket may hold (TCP_NOTSENT_LOWAT): small messages
/// then wait behind at most this much queued chunk data, not whole seconds of it.
const UNSENT_LOWAT: libc::c_int = 32 * 1024;
/// Least time between two "starving" notes to a super-seed.
const STARVING_EVERY: Duration = Duration::from_millis(200);
/// Fault injection for tests (a scripted bad peer at the test's edge).
const FAULT_ENV: &str = "CPUSHARE_TEST_FAULT";

#[derive(NetworkBehaviour)]
struct Behaviour {
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    stream: libp2p_stream::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    /// Offers spread here (the market's gossip topic).
    gossipsub: gossipsub::Behaviour,
}

/// What the networking task tells the market service about peers.
#[derive(Debug)]
pub enum PeerEvent {
    /// A first connection to `peer`; `addr` is its address as seen from here.
    Connected { peer: PeerId, addr: Multiaddr },
    /// One of our own addresses appeared or went away (a home line's new IP).
    AddressesChanged,
    /// A ping round trip measured by us (never a figure the peer declares).
    Rtt { peer: PeerId, rtt: Duration },
    /// A gossip message on a topic we subscribe to (its payload is signed by its
    /// author; the gossip source is not trusted for anything).
    Gossip { topic: String, data: Vec<u8> },
}

/// What other services get from the networking task.
pub struct P2pHandle {
    /// Opens and accepts streams of protocols other than the swarm's own.
    pub control: libp2p_stream::Control,
    /// Peer events (one consumer: taken once).
    pub events: Mutex<Option<mpsc::UnboundedReceiver<PeerEvent>>>,
    cmds: mpsc::UnboundedSender<Cmd>,
}

impl P2pHandle {
    /// Subscribe to gossip `topic` (its messages arrive as [`PeerEvent::Gossip`]).
    pub fn subscribe(&self, topic: &str) {
        let _ = self.cmds.send(Cmd::Subscribe(topic.to_string()));
    }

    /// Publish `data` on gossip `topic` (dropped quietly while nobody listens).
    pub fn publish(&self, topic: &str, data: Vec<u8>) {
        let _ = self.cmds.send(Cmd::Publish(topic.to_string(), data));
    }

    /// Dial `peer` (by its known addresses) unless connected.
    pub fn dial(&self, peer: PeerId) {
        let _ = self.cmds.send(Cmd::Dial(peer));
    }

    /// Dial `peer` again even if connected: after our address changed, the old
    /// connection may hang until TCP gives up; the peer sees the new one at once.
    pub fn redial(&self, peer: PeerId) {
        let _ = self.cmds.send(Cmd::Redial(peer));
    }

    /// Fetch `image` into the store through the swarm; `progress` sees the chunks.
    pub async fn fetch(&self, image: ImageId, progress: Progress) -> Result<Value> {
        let (rtx, rrx) = oneshot::channel();
        self.cmds
            .send(Cmd::Fetch {
                image,
                progress,
                reply: rtx,
            })
            .map_err(|_| Error::P2p("the networking task stopped".into()))?;
        match rrx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Error::P2p(e)),
            Err(_) => Err(Error::P2p("the networking task stopped".into())),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    CorruptChunks,
    TamperManifest,
    TruncateManifest,
}

enum Cmd {
    Fetch {
        image: ImageId,
        progress: Progress,
        reply: oneshot::Sender<std::result::Result<Value, String>>,
    },
    Subscribe(String),
    Publish(String, Vec<u8>),
    Dial(PeerId),
    Redial(PeerId),
}

/// Counters shown by `status`.
#[derive(Clone, Debug, Default, serde::Serialize)]
struct ImageStats {
    uploaded_bytes: u64,
    downloaded_bytes: u64,
    chunks_downloaded: u64,
    duplicate_chunks: u64,
    bad_chunks: u64,
    resumed_bytes: u64,
    banned: BTreeSet<String>,
    complete: bool,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
struct Rejects {
    bad_manifests: u64,
    bad_chunks: u64,
    bad_messages: u64,
}

#[derive(Default)]
struct Snapshot {
    listen: Vec<String>,
    connected: BTreeSet<String>,
    images: BTreeMap<String, ImageStats>,
    rejects: Rejects,
    /// Chunk bytes sent and not yet acknowledged, and the limit on them.
    upload_in_flight: u64,
    upload_budget: u64,
    queued_by_message: BTreeMap<&'static str, u64>,
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
    {
        let snapshot = snapshot.clone();
        let peer_id = node.identity.peer_id().to_string();
        router.status_section("p2p", move || {
            let s = snapshot.lock().expect("snapshot lock");
            let banned: Vec<Value> = s
                .images
                .iter()
                .flat_map(|(img, st)| {
                    st.banned
                        .iter()
                        .map(move |p| json!({"peer": p, "image": img}))
                })
                .collect();
            json!({
                "peer_id": peer_id,
                "listen_addrs": s.listen,
                "connected_peers": s.connected,
                "images": s.images,
                "banned_peers": banned,
                "rejected": s.rejects,
                "upload_in_flight_bytes": s.upload_in_flight,
                "upload_budget_bytes": s.upload_budget,
                "sent_bytes_by_message": s.queued_by_message,
            })
        });
    }
    let role = node.role;
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
            let (rtx, rrx) = oneshot::channel();
            tx.send(Cmd::Fetch {
                image,
                progress,
                reply: rtx,
            })
            .map_err(|_| Error::P2p("the networking task stopped".into()))?;
            match rrx.await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => Err(Error::P2p(e)),
                Err(_) => Err(Error::P2p("the networking task stopped".into())),
            }
        }
    });
    let span = info_span!("p2p", peer = %node.identity.peer_id());
    tokio::spawn(tracing::Instrument::instrument(net.run(rx), span));
    Ok(handle)
}

struct Waiter {
    progress: Progress,
    reply: oneshot::Sender<std::result::Result<Value, String>>,
}

struct ManifestFetch {
    asked: HashSet<PeerId>,
    waiters: Vec<Waiter>,
    started: Instant,
    /// Peers a super-seed sent to us: they get the manifest once we have it.
    forward: Vec<PeerId>,
    /// After a redirect: when to go back to the super-seed, and who it is.
    fallback: Option<(Instant, PeerId)>,
}

enum Mode {
    Seed(Box<Seeder<PeerId>>),
    Leech(Box<Leecher<PeerId>>),
    Done,
}

struct Fetch {
    waiters: Vec<Waiter>,
    started: Instant,
    _pin: PinGuard,
    last_report: Instant,
    /// Last time a chunk was stored.
    last_progress: Instant,
}

struct ImageSwarm {
    id: ImageId,
    chunk_ids: Vec<ChunkId>,
    sizes: Vec<u32>,
    total: u64,
    have: Bitfield,
    have_bytes: u64,
    mode: Mode,
    members: HashSet<PeerId>,
    greeted: HashSet<PeerId>,
    early_haves: HashMap<PeerId, Vec<u32>>,
    /// Peers that answered as super-seeds (told when we starve).
    seeds: HashSet<PeerId>,
    last_starving: Option<Instant>,
    have_queue: HashMap<PeerId, Vec<u32>>,
    /// Haves for super-seeds: they count a chunk as ours once they sent it, and
    /// need the rest only for bookkeeping, so these go in bigger batches to
    /// spare the seed's uplink the per-message overhead.
    slow_have_queue: HashMap<PeerId, Vec<u32>>,
    fetch: Option<Fetch>,
    stats: ImageStats,
    /// Provider lookups made, and when the next one is due.
    lookups: u32,
    next_lookup: Option<Instant>,
}

struct Net {
    swarm: Swarm<Behaviour>,
    store: Arc<ChunkStore>,
    role: Role,
    epoch: Instant,
    images: HashMap<ImageId, ImageSwarm>,
    manifest_fetches: HashMap<ImageId, ManifestFetch>,
    /// Peers given (or pointed to) each manifest we serve, oldest first.
    manifest_given: HashMap<ImageId, Vec<PeerId>>,
    /// Requesters already pointed elsewhere once.
    redirected: HashSet<(ImageId, PeerId)>,
    links: Links,
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
    /// Our addresses that went away, and when (see `drop_connections_of_lost_addresses`).
    expired: Vec<(Instant, std::net::IpAddr)>,
    /// Each peer's open connections and the IP each comes from.
    conn_ips: HashMap<PeerId, Vec<(libp2p::swarm::ConnectionId, std::net::IpAddr)>>,
}

/// The IP address in a multiaddr, if any.
pub fn ip_of(a: &Multiaddr) -> Option<std::net::IpAddr> {
    a.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::Ip4(ip) => Some(std::net::IpAddr::V4(ip)),
        libp2p::multiaddr::Protocol::Ip6(ip) => Some(std::net::IpAddr::V6(ip)),
        _ => None,
    })
}

/// Caps the socket's unsent queue so writers feel backpressure early (the
/// kernel otherwise lets a send buffer grow to megabytes on a slow link).
fn limit_unsent(s: &tokio::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let v = UNSENT_LOWAT;
    // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        debug!(error = %std::io::Error::last_os_error(), "TCP_NOTSENT_LOWAT not set");
    }
}

fn p2p_err(e: impl std::fmt::Display) -> Error {
    Error::P2p(e.to_string())
}

impl Net {
    fn new(
        node: Arc<Node>,
        snapshot: Arc<Mutex<Snapshot>>,
        peer_events: mpsc::UnboundedSender<PeerEvent>,
    ) -> Result<Net> {
        let keypair = node.identity.keypair().clone();
        let local = keypair.public().to_peer_id();
        let mdns_on = node.settings.mdns;
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_other_transport(|key| {
                Ok(
                    tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                        .map(|s, _| {
                            limit_unsent(&s.0);
                            s
                        })
                        .upgrade(upgrade::Version::V1Lazy)
                        .authenticate(noise::Config::new(key)?)
                        .multiplex(yamux::Config::default())
                        .boxed(),
                )
            })
            .map_err(p2p_err)?
            .with_behaviour(|key| {
                let mut kcfg = kad::Config::new(StreamProtocol::new("/cpushare/kad/1"));
                kcfg.set_query_timeout(Duration::from_secs(20));
                let mut kad =
                    kad::Behaviour::with_config(local, kad::store::MemoryStore::new(local), kcfg);
                // small private swarms on loopback never get a confirmed external
                // address; serve the DHT anyway
                kad.set_mode(Some(kad::Mode::Server));
                let mdns = if mdns_on {
                    Some(mdns::tokio::Behaviour::new(mdns::Config::default(), local)?)
                } else {
                    None
                };
                Ok(Behaviour {
                    identify: identify::Behaviour::new(identify::Config::new(
                        "/cpushare/id/1".into(),
                        key.public(),
                    )),
                    ping: ping::Behaviour::new(ping::Config::new()),
                    kad,
                    stream: libp2p_stream::Behaviour::new(),
                    mdns: Toggle::from(mdns),
                    gossipsub: gossipsub::Behaviour::new(
                        gossipsub::MessageAuthenticity::Signed(key.clone()),
                        gossipsub::ConfigBuilder::default()
                            .heartbeat_interval(Duration::from_secs(1))
                            .validation_mode(gossipsub::ValidationMode::Strict)
                            .max_transmit_size(64 * 1024)
                            .build()
                            .map_err(|e| Error::P2p(e.to_string()))?,
                    )
                    .map_err(|e| Error::P2p(e.to_string()))?,
                })
            })
            .map_err(p2p_err)?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
            .build();
        let listen: Multiaddr = node.settings.listen.parse().map_err(|e| Error::BadArg {
            what: "--listen",
            reason: format!("{:?} is not a multiaddr: {e}", node.settings.listen),
        })?;
        swarm.listen_on(listen.clone()).map_err(|e| Error::BadArg {
            what: "--listen",
            reason: format!("cannot listen on {listen}: {e}"),
        })?;
        for b in &node.settings.bootstrap {
            let addr: Multiaddr = b.parse().map_err(|e| Error::BadArg {
                what: "--bootstrap",
                reason: format!("{b:?} is not a multiaddr: {e}"),
            })?;
            let Some(libp2p::multiaddr::Protocol::P2p(peer)) = addr.iter().last() else {
                return Err(Error::BadArg {
                    what: "--bootstrap",
                    reason: format!("{b} must end in /p2p/<peer id>"),
                });
            };
            swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
            if let Err(e) = swarm.dial(addr) {
                warn!(bootstrap = %b, error = %e, "cannot dial bootstrap peer");
            }
        }
        let fault = match std::env::var(FAULT_ENV).as_deref() {
            Ok("corrupt-chunks") => Fault::CorruptChunks,
            Ok("tamper-manifest") => Fault::TamperManifest,
            Ok("truncate-manifest") => Fault::TruncateManifest,
            _ => Fault::None,
        };
        if fault != Fault::None {
            warn!(
                ?fault,
                "TEST FAULT INJECTION ACTIVE: this node serves bad data on purpose"
            );
        }
        let pid = local.to_bytes();
        let rng_seed = pid.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let link_rejects = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let budget = match node.role {
            Role::Buyer => BudgetConfig::SEED,
            Role::Seller => BudgetConfig::RELAY,
        };
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
            link_events: Some(link_events),
            provider_queries: HashMap::new(),
            providing: HashSet::new(),
            connected: HashSet::new(),
            listen: Vec::new(),
            rejects: Rejects::default(),
            fault,
            snapshot,
            rng_seed,
            link_rejects,
            ticks: 0,
            peer_events,
            conn_ips: HashMap::new(),
            expired: Vec::new(),
        })
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut slow = tokio::time::interval(DISCOVERY_EVERY);
        let mut kad_boot = tokio::time::interval(Duration::from_secs(30));
        let mut last_snapshot = Instant::now();
        let mut link_events = self.link_events.take().expect("run once");
        loop {
            tokio::select! {
                ev = self.swarm.select_next_some() => self.on_swarm_event(ev),
                Some(ev) = link_events.recv() => self.on_link_event(ev),
                cmd = rx.recv() => match cmd {
                    Some(c) => self.on_cmd(c),
                    None => return,
                },
                // an idle node (nothing moving) does not wake every 20 ms
                _ = tick.tick(), if self.busy() => self.on_tick(),
                _ = slow.tick() => self.on_slow_tick(),
                _ = kad_boot.tick() => {
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                }
            }
            if last_snapshot.elapsed() > Duration::from_millis(200) {
                self.publish_snapshot();
                last_snapshot = Instant::now();
            }
        }
    }

    fn publish_snapshot(&self) {
        let mut s = self.snapshot.lock().expect("snapshot lock");
        s.listen = self.listen.iter().map(|a| a.to_string()).collect();
        s.connected = self.connected.iter().map(|p| p.to_string()).collect();
        for (id, img) in &self.images {
            s.images.insert(id.to_hex(), img.stats.clone());
        }
        s.rejects = self.rejects.clone();
        (s.upload_in_flight, s.upload_budget) = self.links.budget();
        s.queued_by_message = self.links.queued_by_message().clone();
        s.rejects.bad_messages += self.link_rejects.load(std::sync::atomic::Ordering::Relaxed);
    }

    // ------------------------------------------------------------ commands

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
            } => {
                let w = Waiter { progress, reply };
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
                    Ok(None) => {
                        let mf =
                            self.manifest_fetches
                                .entry(image)
                                .or_insert_with(|| ManifestFetch {
                                    asked: HashSet::new(),
                                    waiters: Vec::new(),
                                    started: Instant::now(),
                                    forward: Vec::new(),
                                    fallback: None,
                                });
                        mf.waiters.push(w);
                        self.ask_manifest(image);
                        self.find_providers(image);
                    }
                    Err(e) => {
                        let _ = w.reply.send(Err(e.to_string()));
                    }
                }
            }
        }
    }

    fn find_providers(&mut self, image: ImageId) {
        let q = self
            .swarm
            .behaviour_mut()
            .kad
            .get_providers(kad::RecordKey::new(&image.0));
        self.provider_queries.insert(q, image);
    }

    /// Asks every connected peer not asked yet for the manifest.
    fn ask_manifest(&mut self, image: ImageId) {
        let peers: Vec<PeerId> = self.connected.iter().copied().collect();
        for p in peers {
            self.ask_manifest_from(image, p);
        }
    }

    fn ask_manifest_from(&mut self, image: ImageId, p: PeerId) {
        let Some(mf) = self.manifest_fetches.get_mut(&image) else {
            return;
        };
        if !mf.asked.insert(p) {
            return;
        }
        self.links
            .send(p, Msg::new(image, Body::GetManifest { wait: false }));
    }

    fn on_manifest(&mut self, image: ImageId, from: PeerId, bytes: Vec<u8>) {
        if !self.manifest_fetches.contains_key(&image) {
            return;
        }
        let m = match SignedManifest::decode_for(image, &bytes) {
            Ok(m) => m,
            Err(e) => {
                self.rejects.bad_manifests += 1;
                warn!(peer = %from, image = %image, error = %e, "rejected manifest");
                return;
            }
        };
        if let Err(e) = self.store.put_manifest(&m) {
            let mf = self.manifest_fetches.remove(&image).expect("checked");
            for w in mf.waiters {
                let _ = w.reply.send(Err(format!("storing manifest: {e}")));
            }
            return;
        }
        let mf = self.manifest_fetches.remove(&image).expect("checked");
        info!(image = %image, peer = %from, forward = mf.forward.len(), "manifest verified");
        for p in mf.forward {
            self.links
                .send(p, Msg::new(image, Body::Manifest(m.as_bytes().to_vec())));
        }
        self.start_leech(image, m, mf.waiters);
    }

    /// Serves a manifest. A super-seed's uplink is the swarm's bottleneck, so
    /// it sends each manifest about once: a requester is pointed at peers that
    /// already have it (or are getting it and will pass it on); one that comes
    /// back anyway gets it directly.
    fn on_get_manifest(&mut self, peer: PeerId, image: ImageId, wait: bool) {
        let reply = match self.store.get_manifest(image) {
            Ok(Some(m)) => {
                let given = self.manifest_given.entry(image).or_default();
                given.retain(|p| self.connected.contains(p));
                if self.role == Role::Buyer
                    && !given.is_empty()
                    && self.redirected.insert((image, peer))
                {
                    let peers: Vec<PeerId> = given
                        .iter()
                        .rev()
                        .filter(|p| **p != peer)
                        .take(wire::MAX_REDIRECT)
                        .copied()
                        .collect();
                    if !given.contains(&peer) {
                        given.push(peer);
                    }
                    if peers.is_empty() {
                        self.redirected.remove(&(image, peer));
                        self.manifest_body(&m)
                    } else {
                        Body::ManifestAt { peers }
                    }
                } else {
                    if !given.contains(&peer) {
                        given.push(peer);
                    }
                    self.manifest_body(&m)
                }
            }
            _ => match self.manifest_fetches.get_mut(&image) {
                Some(mf) if wait => {
                    if !mf.forward.contains(&peer) {
                        mf.forward.push(peer);
                    }
                    return;
                }
                _ => Body::NotFound,
            },
        };
        self.links.send(peer, Msg::new(image, reply));
    }

    fn manifest_body(&self, m: &SignedManifest) -> Body {
        let mut b = m.as_bytes().to_vec();
        match self.fault {
            Fault::TamperManifest => {
                let i = b.len() / 2;
                b[i] ^= 0x40;
            }
            Fault::TruncateManifest => b.truncate(b.len() / 2),
            _ => {}
        }
        Body::Manifest(b)
    }

    /// A super-seed pointed us at peers with the manifest: ask one of them
    /// (picked by our own id, so requesters spread out), and the seed again
    /// if that takes too long.
    fn on_manifest_at(&mut self, seed: PeerId, image: ImageId, peers: Vec<PeerId>) {
        let me = *self.swarm.local_peer_id();
        let Some(mf) = self.manifest_fetches.get_mut(&image) else {
            return;
        };
        let peers: Vec<PeerId> = peers.into_iter().filter(|p| *p != me).collect();
        if peers.is_empty() {
            return;
        }
        let pick = peers[(self.rng_seed as usize) % peers.len()];
        mf.asked.insert(pick);
        mf.fallback = Some((Instant::now() + MANIFEST_REDIRECT_WAIT, seed));
        debug!(image = %image, seed = %seed, via = %pick, "manifest redirected");
        self.links
            .send(pick, Msg::new(image, Body::GetManifest { wait: true }));
    }

    /// Redirected fetches that got nothing in time go back to the seed.
    fn manifest_fallbacks(&mut self) {
        let now = Instant::now();
        let mut due = Vec::new();
        for (image, mf) in self.manifest_fetches.iter_mut() {
            if let Some((at, seed)) = mf.fallback {
                if now >= at {
                    mf.fallback = None;
                    due.push((*image, seed));
                }
            }
        }
        for (image, seed) in due {
            self.links
                .send(seed, Msg::new(image, Body::GetManifest { wait: false }));
        }
    }

    fn new_image_swarm(&self, image: ImageId, m: &SignedManifest) -> Result<ImageSwarm> {
        let uniq = m.manifest().unique_chunks();
        let n = uniq.len() as u32;
        let mut have = Bitfield::new(n);
        let mut have_bytes = 0u64;
        for (i, c) in uniq.iter().enumerate() {
            if self.store.has_chunk(&c.id) {
                have.set(i as u32);
                have_bytes += c.size as u64;
            }
        }
        Ok(ImageSwarm {
            id: image,
            chunk_ids: uniq.iter().map(|c| c.id).collect(),
            sizes: uniq.iter().map(|c| c.size).collect(),
            total: uniq.iter().map(|c| c.size as u64).sum(),
            have,
            have_bytes,
            mode: Mode::Done,
            members: HashSet::new(),
            greeted: HashSet::new(),
            early_haves: HashMap::new(),
            seeds: HashSet::new(),
            last_starving: None,
            have_queue: HashMap::new(),
            slow_have_queue: HashMap::new(),
            fetch: None,
            stats: ImageStats::default(),
            lookups: 0,
            next_lookup: None,
        })
    }

    fn start_leech(&mut self, image: ImageId, m: SignedManifest, waiters: Vec<Waiter>) {
        let fail = |waiters: Vec<Waiter>, e: String| {
            for w in waiters {
                let _ = w.reply.send(Err(e.clone()));
            }
        };
        let pin = match self.store.pin_temp(image) {
            Ok(p) => p,
            Err(e) => return fail(waiters, e.to_string()),
        };
        let mut img = match self.new_image_swarm(image, &m) {
            Ok(i) => i,
            Err(e) => return fail(waiters, e.to_string()),
        };
        img.stats.resumed_bytes = img.have_bytes;
        info!(image = %image, chunks = img.sizes.len(), present = img.have.count(), "fetch started");
        let leecher = Leecher::new(
            img.sizes.clone(),
            img.have.clone(),
            self.rng_seed ^ u64::from_le_bytes(image.0[..8].try_into().expect("8 bytes")),
            LeecherConfig::default(),
        );
        img.mode = Mode::Leech(Box::new(leecher));
        img.fetch = Some(Fetch {
            waiters,
            started: Instant::now(),
            _pin: pin,
            last_report: Instant::now(),
            last_progress: Instant::now(),
        });
        self.images.insert(image, img);
        self.provide(image);
        let peers: Vec<PeerId> = self.connected.iter().copied().collect();
        for p in peers {
            self.greet(image, p);
        }
        self.find_providers(image);
        self.drive(image);
    }

    fn provide(&mut self, image: ImageId) {
        if self.providing.insert(image) {
            if let Err(e) = self
                .swarm
                .behaviour_mut()
                .kad
                .start_providing(kad::RecordKey::new(&image.0))
            {
                warn!(image = %image, error = %e, "cannot advertise image");
                self.providing.remove(&image);
            }
        }
    }

    /// Images being fetched.
    fn leeching(&self) -> Vec<ImageId> {
        self.images
            .iter()
            .filter(|(_, i)| matches!(i.mode, Mode::Leech(_)))
            .map(|(k, _)| *k)
            .collect()
    }

    /// Greets `peer` for every image being fetched.
    fn greet_leeching(&mut self, peer: PeerId) {
        for image in self.leeching() {
            self.greet(image, peer);
        }
    }

    /// Sends our have-set for `image` to `p` (once per connection).
    fn greet(&mut self, image: ImageId, p: PeerId) {
        let Some(img) = self.images.get_mut(&image) else {
            return;
        };
        if !img.greeted.insert(p) {
            return;
        }
        let have = img.have.to_bytes();
        self.links.send(p, Msg::new(image, Body::Hello { have }));
    }

    /// Loads the swarm state of a complete local image on first use.
    fn ensure_image(&mut self, image: ImageId) -> bool {
        if self.images.contains_key(&image) {
            return true;
        }
        let m = match self.store.get_manifest(image) {
            Ok(Some(m)) => m,
            _ => return false,
        };
        match self.store.is_complete(image) {
            Ok(true) => {}
            _ => return false,
        }
        let Ok(mut img) = self.new_image_swarm(image, &m) else {
            return false;
        };
        img.stats.complete = true;
        img.mode = if self.role == Role::Buyer {
            Mode::Seed(Box::new(Seeder::new(
                img.sizes.clone(),
                SeederConfig::default(),
            )))
        } else {
            Mode::Done
        };
        self.images.insert(image, img);
        true
    }

    // ------------------------------------------------------------ events

    fn on_swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(addr = %address, "listening");
                println!("listening on {address}");
                self.listen.push(address);
                let _ = self.peer_events.send(PeerEvent::AddressesChanged);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                info!(addr = %address, "address gone");
                self.listen.retain(|a| *a != address);
                if let Some(ip) = ip_of(&address).filter(|ip| !ip.is_loopback()) {
                    self.expired.push((Instant::now(), ip));
                }
                let _ = self.peer_events.send(PeerEvent::AddressesChanged);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                connection_id,
                ..
            } => {
                // A peer that comes back from another IP has moved (a home line's new
                // address): its connections from the old one are dead but would
                // linger until TCP gives up, and streams opened on them would stall.
                let ip = ip_of(endpoint.get_remote_address());
                let conns = self.conn_ips.entry(peer_id).or_default();
                if let Some(ip) = ip {
                    for (old, old_ip) in conns.iter() {
                        if *old_ip != ip {
                            debug!(peer = %peer_id, %old_ip, %ip, "peer moved: closing its old connection");
                            self.swarm.close_connection(*old);
                        }
                    }
                    conns.retain(|(_, i)| *i == ip);
                    conns.push((connection_id, ip));
                }
                // Every new connection, not only the first: a peer that moved comes
                // back on a second one while the old one has not timed out yet.
                let _ = self.peer_events.send(PeerEvent::Connected {
                    peer: peer_id,
                    addr: endpoint.get_remote_address().clone(),
                });
                if !self.connected.insert(peer_id) {
                    return;
                }
                debug!(peer = %peer_id, "connected");
                let fetching: Vec<ImageId> = self.manifest_fetches.keys().copied().collect();
                for image in fetching {
                    self.ask_manifest_from(image, peer_id);
                }
                self.greet_leeching(peer_id);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } if num_established > 0 => {
                if let Some(c) = self.conn_ips.get_mut(&peer_id) {
                    c.retain(|(id, _)| *id != connection_id);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.conn_ips.remove(&peer_id);
                self.connected.remove(&peer_id);
                self.links.close(&peer_id);
                self.forget_peer(peer_id);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                // A peer's loopback addresses are ours to it only when it is on this
                // host (we reach it over loopback); otherwise dialling them reaches
                // ourselves, and a redial after our address changed goes nowhere.
                let local = self
                    .conn_ips
                    .get(&peer_id)
                    .is_some_and(|c| c.iter().any(|(_, ip)| ip.is_loopback()));
                for a in info.listen_addrs {
                    if local || !ip_of(&a).is_some_and(|ip| ip.is_loopback()) {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, a);
                    }
                }
            }
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
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(list))) => {
                for (p, a) in list {
                    self.swarm.behaviour_mut().kad.add_address(&p, a.clone());
                    let _ = self.swarm.dial(a);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Expired(list))) => {
                // The peer stopped announcing this address on the LAN. Forget it
                // unless we are connected (identify re-adds the addresses it uses).
                for (p, a) in list {
                    if !self.swarm.is_connected(&p) {
                        tracing::debug!(peer = %p, addr = %a, "mDNS address expired");
                        self.swarm.behaviour_mut().kad.remove_address(&p, &a);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetProviders(res),
                ..
            })) => {
                let Some(&image) = self.provider_queries.get(&id) else {
                    return;
                };
                match res {
                    Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => {
                        let me = *self.swarm.local_peer_id();
                        for p in providers.into_iter().filter(|p| *p != me) {
                            self.ask_manifest_from(image, p);
                            if self.images.contains_key(&image) {
                                self.greet(image, p);
                            }
                        }
                    }
                    Ok(_) | Err(_) => {
                        self.provider_queries.remove(&id);
                    }
                }
            }
            _ => {}
        }
    }

    fn on_link_event(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Msg { peer, msg } => self.on_msg(peer, msg),
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

    fn on_msg(&mut self, peer: PeerId, msg: Msg) {
        let image = msg.image;
        let now = self.now();
        match msg.body {
            Body::GetManifest { wait } => self.on_get_manifest(peer, image, wait),
            Body::ManifestAt { peers } => self.on_manifest_at(peer, image, peers),
            Body::Manifest(bytes) => self.on_manifest(image, peer, bytes),
            Body::NotFound => {
                if let Some(img) = self.images.get_mut(&image) {
                    img.members.remove(&peer);
                }
            }
            Body::Hello { have } => {
                let reply = self.on_hello(peer, image, have);
                self.links.send(peer, Msg::new(image, reply));
                self.drive(image);
            }
            Body::HelloAck { role, have } => self.on_hello_ack(peer, image, role, have),
            Body::Have { chunks } => {
                for &c in &chunks {
                    self.links.acked(peer, image, c);
                }
                let Some(img) = self.images.get_mut(&image) else {
                    return;
                };
                let n = img.sizes.len() as u32;
                if chunks.iter().any(|&c| c >= n) {
                    self.rejects.bad_messages += 1;
                    warn!(peer = %peer, image = %image, "have names a chunk beyond the image");
                    return;
                }
                match &mut img.mode {
                    Mode::Seed(s) => {
                        for c in chunks {
                            s.peer_have(&peer, c, now);
                        }
                    }
                    Mode::Leech(l) => {
                        if img.members.contains(&peer) && !l.is_banned(&peer) {
                            for c in chunks {
                                l.peer_have(&peer, c);
                            }
                        } else {
                            img.early_haves.entry(peer).or_default().extend(chunks);
                        }
                    }
                    Mode::Done => {}
                }
                self.drive(image);
            }
            Body::Starving => {
                if let Some(ImageSwarm {
                    mode: Mode::Seed(s),
                    ..
                }) = self.images.get_mut(&image)
                {
                    s.peer_starving(&peer);
                    self.drive(image);
                }
            }
            Body::GetChunk { index } => {
                if let Some(reply) = self.on_get_chunk(peer, image, index) {
                    self.links.send(peer, Msg::new(image, reply));
                }
            }
            Body::Cancel { index } => self.links.cancel(peer, image, index),
            Body::Chunk { index, bytes } => self.on_chunk(image, index, peer, bytes),
            Body::NotHave { index } => {
                if let Some(ImageSwarm {
                    mode: Mode::Leech(l),
                    ..
                }) = self.images.get_mut(&image)
                {
                    l.peer_lacks(&peer, index, now);
                }
                self.drive(image);
            }
        }
    }

    fn on_hello(&mut self, peer: PeerId, image: ImageId, have: Vec<u8>) -> Body {
        if !self.ensure_image(image) {
            return Body::NotFound;
        }
        let now = self.now();
        let img = self.images.get_mut(&image).expect("ensured");
        let Some(bf) = Bitfield::from_bytes(img.sizes.len() as u32, &have) else {
            self.rejects.bad_messages += 1;
            warn!(peer = %peer, image = %image, "malformed have-set");
            return Body::NotFound;
        };
        img.members.insert(peer);
        let reply = match &mut img.mode {
            Mode::Seed(s) => {
                s.add_peer(peer, bf, now);
                s.poll(now);
                // offers for this peer ride in the reply; others go out as Haves
                let mut offers = Bitfield::new(img.sizes.len() as u32);
                let mut others: BTreeMap<PeerId, Vec<u32>> = BTreeMap::new();
                while let Some(SeedAction::Offer { peer: to, chunk }) = s.next_action() {
                    if to == peer {
                        offers.set(chunk);
                    } else {
                        others.entry(to).or_default().push(chunk);
                    }
                }
                for (to, chunks) in others {
                    self.links.send(to, Msg::new(image, Body::Have { chunks }));
                }
                Body::HelloAck {
                    role: PeerRole::SuperSeed,
                    have: offers.to_bytes(),
                }
            }
            Mode::Leech(l) => {
                if l.add_peer(peer, bf, PeerKind::Normal, now) {
                    for c in img.early_haves.remove(&peer).unwrap_or_default() {
                        l.peer_have(&peer, c);
                    }
                }
                Body::HelloAck {
                    role: PeerRole::Peer,
                    have: img.have.to_bytes(),
                }
            }
            Mode::Done => Body::HelloAck {
                role: PeerRole::Peer,
                have: img.have.to_bytes(),
            },
        };
        // both sides know each other now: no need to greet back
        img.greeted.insert(peer);
        reply
    }

    fn on_hello_ack(&mut self, peer: PeerId, image: ImageId, role: PeerRole, have: Vec<u8>) {
        let now = self.now();
        let Some(img) = self.images.get_mut(&image) else {
            return;
        };
        let Some(bf) = Bitfield::from_bytes(img.sizes.len() as u32, &have) else {
            self.rejects.bad_messages += 1;
            warn!(peer = %peer, image = %image, "malformed have-set");
            return;
        };
        img.members.insert(peer);
        match &mut img.mode {
            Mode::Leech(l) => {
                let kind = match role {
                    PeerRole::SuperSeed => {
                        img.seeds.insert(peer);
                        PeerKind::SuperSeed
                    }
                    PeerRole::Peer => PeerKind::Normal,
                };
                if l.add_peer(peer, bf, kind, now) {
                    for c in img.early_haves.remove(&peer).unwrap_or_default() {
                        l.peer_have(&peer, c);
                    }
                }
            }
            Mode::Seed(s) => s.add_peer(peer, bf, now),
            Mode::Done => {}
        }
        self.drive(image);
    }

    /// Queues the chunk for `peer`, or says why not.
    fn on_get_chunk(&mut self, peer: PeerId, image: ImageId, index: u32) -> Option<Body> {
        if !self.ensure_image(image) {
            return Some(Body::NotFound);
        }
        let now = self.now();
        let img = self.images.get_mut(&image).expect("ensured");
        if index as usize >= img.sizes.len() || !img.have.get(index) {
            return Some(Body::NotHave { index });
        }
        // rarest first among our waiting replies: each copy of a rare chunk is
        // a new source for the swarm
        let prio = match &mut img.mode {
            Mode::Seed(s) => {
                if s.on_request(&peer, index, now) == Decision::Refuse {
                    return Some(Body::NotHave { index });
                }
                // every chunk a super-seed sends is new: no urgency among them
                link::ORDINARY
            }
            Mode::Leech(l) => l.availability(index),
            // a finished seller keeps ranking by what its peers hold
            // a finished seller no longer follows who holds what
            Mode::Done => link::ORDINARY,
        };
        match self.store.get_chunk(&img.chunk_ids[index as usize]) {
            Ok(Some(mut bytes)) => {
                if self.fault == Fault::CorruptChunks {
                    bytes[0] ^= 0xff;
                }
                self.links.send_chunk(peer, image, index, bytes, prio);
                None
            }
            Ok(None) | Err(_) => {
                img.have.clear(index);
                if let Mode::Seed(s) = &mut img.mode {
                    s.on_sent(&peer, index, false, now);
                }
                Some(Body::NotHave { index })
            }
        }
    }

    fn on_chunk(&mut self, image: ImageId, index: u32, peer: PeerId, bytes: Vec<u8>) {
        let now = self.now();
        let Some(img) = self.images.get_mut(&image) else {
            return;
        };
        let Some(&id) = img.chunk_ids.get(index as usize) else {
            self.rejects.bad_messages += 1;
            warn!(peer = %peer, image = %image, chunk = index, "chunk index beyond the image");
            return;
        };
        if ChunkId::of(&bytes) != id {
            img.stats.bad_chunks += 1;
            self.rejects.bad_chunks += 1;
            warn!(peer = %peer, image = %image, chunk = index, "chunk failed its hash; banning peer for this image");
            if let Mode::Leech(l) = &mut img.mode {
                l.on_chunk(&peer, index, false, now);
            }
            self.drive(image);
            return;
        }
        // the sender's upload budget waits for this (duplicates too)
        self.links.send(
            peer,
            Msg::new(
                image,
                Body::Have {
                    chunks: vec![index],
                },
            ),
        );
        let Mode::Leech(l) = &mut img.mode else {
            return;
        };
        img.stats.downloaded_bytes += bytes.len() as u64;
        img.stats.chunks_downloaded += 1;
        debug!(image = %image, chunk = index, from = %peer, dup = img.have.get(index), "chunk received");
        if img.have.get(index) {
            img.stats.duplicate_chunks += 1;
        } else {
            match self.store.put_chunk(&id, &bytes) {
                Ok(_) => {
                    img.have.set(index);
                    img.have_bytes += bytes.len() as u64;
                    // the sender too: a super-seed tops up its offers on this
                    for m in img.members.iter().filter(|m| **m != peer) {
                        if img.seeds.contains(m) {
                            img.slow_have_queue.entry(*m).or_default().push(index);
                        } else {
                            img.have_queue.entry(*m).or_default().push(index);
                        }
                    }
                }
                Err(e) => {
                    warn!(image = %image, error = %e, "cannot store chunk; fetch aborted");
                    let msg = e.to_string();
                    if let Some(f) = img.fetch.take() {
                        for w in f.waiters {
                            let _ = w.reply.send(Err(msg.clone()));
                        }
                    }
                    img.mode = Mode::Done;
                    return;
                }
            }
        }
        l.on_chunk(&peer, index, true, now);
        if let Some(f) = &mut img.fetch {
            f.last_progress = Instant::now();
            if f.last_report.elapsed() > Duration::from_millis(250) {
                f.last_report = Instant::now();
                for w in &f.waiters {
                    w.progress.report("fetch", img.have_bytes, img.total);
                }
            }
        }
        self.drive(image);
    }

    /// Runs the image's scheduler and carries out its actions.
    fn drive(&mut self, image: ImageId) {
        let now = self.now();
        let Some(img) = self.images.get_mut(&image) else {
            return;
        };
        let mut requests = Vec::new();
        let mut cancels = Vec::new();
        let mut complete = false;
        let mut starving = Vec::new();
        // a super-seed's offers go out at once: they keep the sellers asking
        let mut offers: BTreeMap<PeerId, Vec<u32>> = BTreeMap::new();
        match &mut img.mode {
            Mode::Seed(s) => {
                s.poll(now);
                while let Some(SeedAction::Offer { peer, chunk }) = s.next_action() {
                    offers.entry(peer).or_default().push(chunk);
                }
            }
            Mode::Leech(l) => {
                l.poll(now);
                while let Some(a) = l.next_action() {
                    match a {
                        Action::Request { peer, chunk } => requests.push((peer, chunk)),
                        Action::Cancel { peer, chunk } => cancels.push((peer, chunk)),
                        Action::Ban { peer } => {
                            img.stats.banned.insert(peer.to_string());
                            img.members.remove(&peer);
                        }
                        Action::Disconnect { peer } => {
                            debug!(peer = %peer, image = %image, "peer stalled; dropped from this fetch");
                            img.greeted.remove(&peer);
                        }
                        Action::Complete => complete = true,
                    }
                }
                // nothing to ask anyone for: tell the super-seeds (throttled)
                if l.is_starving(now)
                    && img
                        .last_starving
                        .is_none_or(|t| t.elapsed() > STARVING_EVERY)
                {
                    img.last_starving = Some(Instant::now());
                    starving.extend(img.seeds.iter().copied());
                }
            }
            Mode::Done => {}
        }
        for peer in starving {
            self.links.send(peer, Msg::new(image, Body::Starving));
        }
        for (peer, index) in cancels {
            self.links
                .send(peer, Msg::new(image, Body::Cancel { index }));
        }
        for (peer, index) in requests {
            self.links
                .send(peer, Msg::new(image, Body::GetChunk { index }));
        }
        for (peer, chunks) in offers {
            self.links
                .send(peer, Msg::new(image, Body::Have { chunks }));
        }
        if complete {
            self.complete(image);
        }
    }

    fn complete(&mut self, image: ImageId) {
        let Some(img) = self.images.get_mut(&image) else {
            return;
        };
        img.mode = Mode::Done;
        img.stats.complete = true;
        let _ = self.store.flush();
        if let Some(f) = img.fetch.take() {
            let secs = f.started.elapsed().as_secs_f64();
            info!(image = %image, secs, downloaded = img.stats.downloaded_bytes, "fetch complete");
            let report = fetch_report(img, secs);
            for w in f.waiters {
                w.progress.report("fetch", img.total, img.total);
                let _ = w.reply.send(Ok(report.clone()));
            }
        }
    }

    /// Whether anything needs the 20 ms tick: a fetch or a seed with peers,
    /// queued haves, chunks awaiting acknowledgement, manifest fallbacks.
    fn busy(&self) -> bool {
        self.links.budget().0 > 0
            || self.manifest_fetches.values().any(|m| m.fallback.is_some())
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
        // 50 ticks of 20 ms: the slow have-queue goes out once a second
        self.ticks += 1;
        let slow = self.ticks >= 50;
        if slow {
            self.ticks = 0;
        }
        self.links.expire();
        self.manifest_fallbacks();
        let ids: Vec<ImageId> = self.images.keys().copied().collect();
        for image in ids {
            // seeds too: starving peers are noticed by time, not by an event
            if !matches!(self.images[&image].mode, Mode::Done) {
                self.drive(image);
            }
            self.flush_haves(image, slow);
        }
    }

    fn flush_haves(&mut self, image: ImageId, slow: bool) {
        let Some(img) = self.images.get_mut(&image) else {
            return;
        };
        let done = matches!(img.mode, Mode::Done);
        let mut queue = std::mem::take(&mut img.have_queue);
        if slow || done {
            for (p, c) in img.slow_have_queue.drain() {
                queue.entry(p).or_default().extend(c);
            }
        }
        if queue.is_empty() {
            return;
        }
        for (peer, mut chunks) in queue {
            if !self.connected.contains(&peer) {
                continue;
            }
            while !chunks.is_empty() {
                let rest = chunks.split_off(chunks.len().min(wire::MAX_HAVES));
                self.links
                    .send(peer, Msg::new(image, Body::Have { chunks }));
                chunks = rest;
            }
        }
    }

    /// A fetch that got no chunk for `FETCH_STALL` ends with an error (its
    /// waiters would wait forever otherwise); chunks stored so far are kept.
    fn fail_if_stalled(&mut self, image: ImageId) {
        let Some(img) = self.images.get_mut(&image) else {
            return;
        };
        let Some(f) = &img.fetch else { return };
        if f.last_progress.elapsed() < FETCH_STALL {
            return;
        }
        let f = img.fetch.take().expect("checked");
        let msg = format!(
            "fetch of image {image} stalled: no chunk arrived for {} s ({} of {} chunks present, {} peers banned); \
             the chunks so far are kept, run `image fetch` again to resume",
            FETCH_STALL.as_secs(),
            img.have.count(),
            img.sizes.len(),
            img.stats.banned.len()
        );
        warn!(image = %image, "{msg}");
        for w in f.waiters {
            let _ = w.reply.send(Err(msg.clone()));
        }
        self.images.remove(&image);
    }

    /// An address of ours that went away and did not come back within a moment (a
    /// home line's new IP, not an interface flapping): connections made from it are
    /// dead but linger until TCP gives up, and streams opened on them stall. Drop
    /// every connection; the services dial their peers again from the new address.
    fn drop_connections_of_lost_addresses(&mut self) {
        let settled: Vec<std::net::IpAddr> = self
            .expired
            .iter()
            .filter(|(at, _)| at.elapsed() >= Duration::from_millis(1500))
            .map(|(_, ip)| *ip)
            .collect();
        self.expired
            .retain(|(at, _)| at.elapsed() < Duration::from_millis(1500));
        for ip in settled {
            if self.listen.iter().any(|a| ip_of(a) == Some(ip)) {
                continue;
            }
            info!(%ip, "our address is gone: reconnecting every peer");
            let peers: Vec<PeerId> = self.connected.iter().copied().collect();
            for p in peers {
                let _ = self.swarm.disconnect_peer_id(p);
            }
            let _ = self.peer_events.send(PeerEvent::AddressesChanged);
        }
    }

    fn on_slow_tick(&mut self) {
        self.drop_connections_of_lost_addresses();
        // advertise complete local images (imports happen outside this task)
        if let Ok(list) = self.store.list_images() {
            for image in list {
                if !self.providing.contains(&image)
                    && self.store.is_complete(image).unwrap_or(false)
                {
                    self.provide(image);
                }
            }
        }
        for image in self.leeching() {
            // providers appear as other sellers start: look often at first,
            // then back off (each lookup costs every peer asked a reply)
            let due = {
                let img = self.images.get_mut(&image).expect("listed");
                let due = img.next_lookup.is_none_or(|t| Instant::now() >= t);
                if due {
                    img.lookups += 1;
                    let wait = DISCOVERY_EVERY * (1 << img.lookups.min(4));
                    img.next_lookup = Some(Instant::now() + wait.min(LOOKUP_MAX_WAIT));
                }
                due
            };
            if due {
                self.find_providers(image);
            }
            self.fail_if_stalled(image);
        }
        let waiting: Vec<ImageId> = self.manifest_fetches.keys().copied().collect();
        for image in waiting {
            let mf = &self.manifest_fetches[&image];
            if mf.started.elapsed() > MANIFEST_WAIT {
                let mf = self.manifest_fetches.remove(&image).expect("listed");
                let msg = if self.rejects.bad_manifests > 0 {
                    format!(
                        "no peer gave a valid manifest for image {image} ({} rejected as invalid)",
                        self.rejects.bad_manifests
                    )
                } else {
                    format!("no peer has image {image} (asked {} peers)", mf.asked.len())
                };
                for w in mf.waiters {
                    let _ = w.reply.send(Err(msg.clone()));
                }
                for p in mf.forward {
                    self.links.send(p, Msg::new(image, Body::NotFound));
                }
            } else {
                self.ask_manifest(image);
                self.find_providers(image);
            }
        }
        // forget finished provider queries
        if self.provider_queries.len() > 256 {
            self.provider_queries.clear();
        }
    }
}

fn fetch_report(img: &ImageSwarm, secs: f64) -> Value {
    json!({
        "image": img.id.to_hex(),
        "total_bytes": img.total,
        "downloaded_bytes": img.stats.downloaded_bytes,
        "chunks_downloaded": img.stats.chunks_downloaded,
        "duplicate_chunks": img.stats.duplicate_chunks,
        "resumed_bytes": img.stats.resumed_bytes,
        "bad_chunks": img.stats.bad_chunks,
        "banned": img.stats.banned,
        "seconds": secs,
    })
}
