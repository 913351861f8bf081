//! The buyer's market service: collects signed offers, measures each seller's round
//! trip itself (libp2p ping), and runs fleets: `run --count N` keeps N guests of an
//! image on the best sellers through `market::Fleet`, which decides; this shell
//! carries its messages, admits its guests to the overlay switch, writes their
//! consoles to `<data-dir>/leases/<lease>/console.log`, and keeps the ledger.

use std::collections::{BTreeMap, HashMap};
use std::io::{Seek, SeekFrom, Write};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use libp2p::PeerId;
use market::{
    BuyerAction, Fleet, FleetConfig, LeaseId, MarketMsg, OfferBook, Order, PeerKey, SlotState,
    TrustPolicy,
};
use overlay::MacAddr;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::db::MarketDb;
use super::net::MarketNet;
use super::seller::msg_name;
use super::trust::{TrustLists, TrustWatch};
use super::{now_ms, OFFER_TOPIC};
use crate::config::BuyerTable;
use crate::control::{Progress, Router};
use crate::error::{Error, Result};
use crate::identity::{key_of_peer, peer_of_key};
use crate::node::Node;
use crate::overlay_service::OverlayHandle;
use crate::p2p::{P2pHandle, PeerEvent};

const LEDGER: &str = "buyer_ledger";
/// Each live run's fleet, saved after every change: a restarted buyer carries on.
const RUNS: &str = "buyer_runs";
const PENALTIES: &str = "penalties";

/// What `cpushare-node run` asks for.
#[derive(Debug, Clone, Deserialize)]
pub struct RunParams {
    pub image: String,
    pub count: u32,
    #[serde(default = "one")]
    pub vcpus: u32,
    #[serde(default = "mem")]
    pub memory_mib: u64,
    #[serde(default = "disk")]
    pub disk_mib: u64,
    pub max_price: Option<String>,
    pub max_latency_ms: Option<u32>,
    #[serde(default)]
    pub trusted_only: bool,
    pub duration_s: Option<u64>,
    /// Return once every guest runs (the fleet goes on in the daemon).
    #[serde(default)]
    pub detach: bool,
    /// How long to wait for matching offers before giving up.
    #[serde(default = "offer_wait")]
    pub offer_wait_s: u64,
}

fn one() -> u32 {
    1
}
fn mem() -> u64 {
    256
}
fn disk() -> u64 {
    1024
}
fn offer_wait() -> u64 {
    20
}

enum Cmd {
    Run {
        params: RunParams,
        progress: Progress,
        reply: oneshot::Sender<Result<Value>>,
    },
    Stop {
        lease: Option<LeaseId>,
        reply: oneshot::Sender<Result<Value>>,
    },
    Leases {
        reply: oneshot::Sender<Value>,
    },
}

/// How often a trust list given as a URL is fetched again (conditionally).
const TRUST_REFETCH: Duration = Duration::from_secs(60);

/// What is saved of a run (the fleet and when it started).
#[derive(serde::Serialize, Deserialize)]
struct StoredRun {
    fleet: market::FleetRecord,
    started_ms: u64,
}

/// One `run`: the fleet and who watches it.
struct RunState {
    /// Its key in the RUNS tree, and the hash of what was saved last.
    key: [u8; 16],
    saved: Option<blake3::Hash>,
    fleet: Fleet,
    progress: Progress,
    reply: Option<oneshot::Sender<Result<Value>>>,
    detach: bool,
    started_ms: u64,
    offer_wait_ms: u64,
    ever_matched: bool,
    last_no_match: Option<String>,
    /// When each slot's guest was lost, for the replacement time.
    lost_at: HashMap<u32, u64>,
    /// Rx frames seen from each guest on the overlay, to notice life.
    rx_seen: HashMap<MacAddr, u64>,
    timeline: Vec<Value>,
    all_up_reported: bool,
}

struct Buyer {
    node: Arc<Node>,
    p2p: Arc<P2pHandle>,
    net: MarketNet,
    db: MarketDb,
    overlay: OverlayHandle,
    sk: SigningKey,
    cfg: BuyerTable,
    book: OfferBook,
    rtt: BTreeMap<PeerKey, u32>,
    trust: TrustWatch,
    penalties: BTreeMap<PeerKey, u32>,
    runs: Vec<RunState>,
    bad_offers: u64,
    snapshot: Arc<Mutex<Value>>,
}

pub fn start(
    node: Arc<Node>,
    router: &mut Router,
    p2p: Arc<P2pHandle>,
    overlay: OverlayHandle,
    net: MarketNet,
    db: MarketDb,
) -> Result<()> {
    let cfg = node.settings.buyer.clone();
    let trust = TrustWatch::start(TrustLists::new(
        cfg.trusted.as_deref(),
        cfg.revoked.as_deref(),
        TRUST_REFETCH,
    ))?;
    let penalties: BTreeMap<PeerKey, u32> = db
        .all::<u32>(PENALTIES)?
        .into_iter()
        .filter_map(|(k, v)| Some((PeerKey(k.try_into().ok()?), v)))
        .collect();
    let (incoming, events) = super::connect(&p2p, &net)?;
    let sk = node.identity.signing_key().clone();
    let snapshot = Arc::new(Mutex::new(json!({})));
    let b = Buyer {
        node,
        p2p,
        net,
        db,
        overlay,
        sk,
        cfg,
        book: OfferBook::new(),
        rtt: BTreeMap::new(),
        trust,
        penalties,
        runs: Vec::new(),
        bad_offers: 0,
        snapshot: snapshot.clone(),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    {
        let tx = tx.clone();
        router.method("market.run", move |params, progress| {
            let tx = tx.clone();
            async move {
                let params: RunParams =
                    serde_json::from_value(params).map_err(|e| Error::BadArg {
                        what: "run",
                        reason: e.to_string(),
                    })?;
                let (reply, rrx) = oneshot::channel();
                tx.send(Cmd::Run {
                    params,
                    progress,
                    reply,
                })
                .map_err(|_| Error::Market("the market task stopped".into()))?;
                rrx.await
                    .map_err(|_| Error::Market("the market task stopped".into()))?
            }
        });
    }
    {
        let tx = tx.clone();
        router.method("market.stop", move |params: Value, _| {
            let tx = tx.clone();
            async move {
                let lease = match params.get("lease").and_then(|v| v.as_str()) {
                    Some(s) => Some(s.parse::<LeaseId>().map_err(|_| Error::BadArg {
                        what: "LEASE",
                        reason: format!("{s:?} is not a lease id (see `cpushare-node leases`)"),
                    })?),
                    None => None,
                };
                let (reply, rrx) = oneshot::channel();
                tx.send(Cmd::Stop { lease, reply })
                    .map_err(|_| Error::Market("the market task stopped".into()))?;
                rrx.await
                    .map_err(|_| Error::Market("the market task stopped".into()))?
            }
        });
    }
    {
        let tx = tx.clone();
        router.method("market.leases", move |_, _| {
            let tx = tx.clone();
            async move {
                let (reply, rrx) = oneshot::channel();
                tx.send(Cmd::Leases { reply })
                    .map_err(|_| Error::Market("the market task stopped".into()))?;
                rrx.await
                    .map_err(|_| Error::Market("the market task stopped".into()))
            }
        });
    }
    router.status_section("market", move || snapshot.lock().expect("lock").clone());
    let mut b = b;
    b.restore_runs()?;
    tokio::spawn(b.run(rx, incoming, events));
    Ok(())
}

/// A slot's state in one word (for `run` and `leases`).
fn state_name(s: &SlotState) -> &'static str {
    match s {
        SlotState::Choosing => "choosing",
        SlotState::Proposed { .. } => "proposed",
        SlotState::Starting { .. } => "starting",
        SlotState::Running { .. } => "running",
        SlotState::Stopped => "stopped",
    }
}

fn slot_json(s: &market::Slot, fleet: &Fleet) -> Value {
    // SlotState::seller() is the seller of every state that has one.
    let seller = s.state.seller();
    let phase = match &s.state {
        SlotState::Starting { phase, .. } => phase
            .as_ref()
            .map(|p| serde_json::to_value(p).expect("json")),
        _ => None,
    };
    let lease = s.lease.as_ref().map(|l| l.id);
    let cost = lease
        .and_then(|id| fleet.ledger().find(|e| e.lease == id).map(|e| e.billed()))
        .unwrap_or(0);
    json!({
        "slot": s.index,
        "ip": s.ip.to_string(),
        "mac": MacAddr(s.mac).to_string(),
        "state": state_name(&s.state),
        "seller": seller.and_then(|k| peer_of_key(&k)).map(|p| p.to_string()),
        "phase": phase,
        "lease": lease.map(|l| l.to_string()),
        "replacements": s.replacements,
        "cost": market::format_price(cost),
    })
}

impl Buyer {
    async fn run(
        mut self,
        mut cmds: mpsc::UnboundedReceiver<Cmd>,
        mut incoming: mpsc::UnboundedReceiver<(PeerId, MarketMsg)>,
        mut events: mpsc::UnboundedReceiver<PeerEvent>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut redial = tokio::time::interval(Duration::from_secs(3));
        loop {
            tokio::select! {
                Some(c) = cmds.recv() => self.on_cmd(c),
                Some((peer, msg)) = incoming.recv() => self.on_msg(peer, msg),
                Some(ev) = events.recv() => self.on_peer_event(ev),
                _ = tick.tick() => self.on_tick(),
                _ = redial.tick() => self.redial(),
            }
        }
    }

    fn fleet_config(&self) -> FleetConfig {
        let a = self.node.settings.overlay.admit(None, None, None, None);
        let host_ip = a.host_ip;
        let o = host_ip.octets();
        FleetConfig {
            silence_ms: self.cfg.silence_s.unwrap_or(30) as u64 * 1000,
            proposal_ms: 15_000,
            period_s: self.cfg.billing_period_s.unwrap_or(60),
            grace_s: self.cfg.grace_s.unwrap_or(120),
            net_base: Ipv4Addr::new(o[0], o[1], 0, 0),
            host_ip,
            overlay_port: a.listen.port(),
            first_guest_host: u32::from(host_ip) - u32::from(Ipv4Addr::new(o[0], o[1], 0, 0)) + 1,
        }
    }

    fn on_cmd(&mut self, c: Cmd) {
        match c {
            Cmd::Run {
                params,
                progress,
                reply,
            } => match self.start_run(params, progress) {
                Ok(run) => {
                    let mut run = run;
                    run.reply = Some(reply);
                    self.runs.push(run);
                    self.on_tick();
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Cmd::Stop { lease, reply } => {
                let now = now_ms();
                let mut stopped = Vec::new();
                for i in 0..self.runs.len() {
                    let hit = match &lease {
                        None => true,
                        Some(id) => self.runs[i].fleet.lease_for(id).is_some(),
                    };
                    if hit {
                        for s in self.runs[i].fleet.slots() {
                            if let Some(l) = &s.lease {
                                if lease.is_none() || lease.as_ref() == Some(&l.id) {
                                    stopped.push(l.id.to_string());
                                }
                            }
                        }
                        let actions = self.runs[i].fleet.stop(lease.as_ref(), now);
                        self.apply(i, actions);
                    }
                }
                let r = if stopped.is_empty() && lease.is_some() {
                    Err(Error::BadArg {
                        what: "LEASE",
                        reason: "no running lease of this buyer has that id (see `cpushare-node leases`)".into(),
                    })
                } else {
                    Ok(json!({ "stopped": stopped }))
                };
                let _ = reply.send(r);
                self.reap();
            }
            Cmd::Leases { reply } => {
                let _ = reply.send(self.leases_json());
            }
        }
    }

    fn leases_json(&self) -> Value {
        let mut out = Vec::new();
        if let Ok(all) = self.db.all::<market::LedgerEntry>(LEDGER) {
            for (_, e) in all {
                let live = self
                    .runs
                    .iter()
                    .flat_map(|r| r.fleet.slots())
                    .find(|s| s.lease.as_ref().is_some_and(|l| l.id == e.lease));
                out.push(json!({
                    "lease": e.lease.to_string(),
                    "seller": peer_of_key(&e.seller).map(|p| p.to_string()),
                    "ip": live.map(|s| s.ip.to_string()),
                    "state": live.map(|s| state_name(&s.state)).unwrap_or("ended"),
                    "minutes": e.acked,
                    "price_per_min": market::format_price(e.price_per_min),
                    "billed": market::format_price(e.billed()),
                    "end_reason": e.end_reason.as_ref().map(|r| r.to_string()),
                }));
            }
        }
        Value::Array(out)
    }

    fn start_run(&mut self, p: RunParams, progress: Progress) -> Result<RunState> {
        let image: chunks::ImageId = p.image.parse().map_err(Error::from)?;
        let signed = self.node.store.get_manifest(image)?.ok_or_else(|| Error::BadArg {
            what: "--image",
            reason: format!(
                "image {} is not in this buyer's store (import it first: `cpushare-node image import FILE`)",
                p.image
            ),
        })?;
        if p.count == 0 {
            return Err(Error::BadArg {
                what: "--count",
                reason: "must be at least 1".into(),
            });
        }
        let size_mib = signed.manifest().total_size.div_ceil(1 << 20);
        let disk_mib = p.disk_mib.max(size_mib);
        let max_price = p
            .max_price
            .as_deref()
            .map(market::parse_price)
            .transpose()
            .map_err(|e| Error::BadArg {
                what: "--max-price",
                reason: e.to_string(),
            })?;
        if p.trusted_only {
            let policy = self.trust.policy().map_err(|reason| Error::BadArg {
                what: "--trusted-only",
                reason,
            })?;
            if policy.trusted.is_empty() {
                return Err(Error::BadArg {
                    what: "--trusted-only",
                    reason: "the buyer's trusted measurement list is empty".into(),
                });
            }
        }
        let order = Order {
            image: image.0,
            count: p.count,
            vcpus: p.vcpus,
            memory_mib: p.memory_mib,
            disk_mib,
            max_price_per_min: max_price,
            max_latency_ms: p.max_latency_ms,
            trusted_only: p.trusted_only,
            duration_s: p.duration_s,
        };
        let now = now_ms();
        let seed: [u8; 32] = rand::random();
        let fleet = Fleet::new(self.sk.clone(), order, self.fleet_config(), seed, now);
        info!(image = %image, count = p.count, "run started");
        Ok(RunState {
            key: rand::random(),
            saved: None,
            fleet,
            progress,
            reply: None,
            detach: p.detach,
            started_ms: now,
            offer_wait_ms: p.offer_wait_s * 1000,
            ever_matched: false,
            last_no_match: None,
            lost_at: HashMap::new(),
            rx_seen: HashMap::new(),
            timeline: Vec::new(),
            all_up_reported: false,
        })
    }

    /// The runs of the previous daemon, from their records: their sellers kept the
    /// guests running, so the leases go on (re-admitted to the overlay, acked, and
    /// their sellers dialled); nothing is proposed again. No client waits on them:
    /// `leases`, `status` and `stop` reach them.
    fn restore_runs(&mut self) -> Result<()> {
        let now = now_ms();
        for (key, stored) in self.db.all::<StoredRun>(RUNS)? {
            let Ok(k) = <[u8; 16]>::try_from(key.as_slice()) else {
                continue;
            };
            if stored.fleet.is_done() {
                self.db.remove(RUNS, &key)?;
                continue;
            }
            let (fleet, actions) = match Fleet::restore(self.sk.clone(), stored.fleet, now) {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "a saved run is not this buyer's: dropped");
                    self.db.remove(RUNS, &key)?;
                    continue;
                }
            };
            let live = fleet
                .slots()
                .iter()
                .filter(|s| s.state.seller().is_some())
                .count();
            info!(run = %hex::encode(k), slots = fleet.slots().len(), live, "run of the previous daemon restored");
            let (tx, _) = mpsc::unbounded_channel();
            self.runs.push(RunState {
                key: k,
                saved: None,
                fleet,
                progress: Progress::to_channel(tx),
                reply: None,
                detach: true,
                started_ms: stored.started_ms,
                offer_wait_ms: 0,
                ever_matched: true,
                last_no_match: None,
                lost_at: HashMap::new(),
                rx_seen: HashMap::new(),
                timeline: vec![json!({"at_ms": now, "restored": true})],
                all_up_reported: true,
            });
            let i = self.runs.len() - 1;
            self.apply(i, actions);
        }
        for p in self.lease_sellers() {
            self.p2p.dial(p);
        }
        Ok(())
    }

    /// Saves run `i`'s fleet if it changed since the last save.
    fn save_run(&mut self, i: usize) {
        let r = &mut self.runs[i];
        let stored = StoredRun {
            fleet: r.fleet.record(),
            started_ms: r.started_ms,
        };
        let bytes = serde_json::to_vec(&stored).expect("json");
        let h = blake3::hash(&bytes);
        if r.saved == Some(h) {
            return;
        }
        match self.db.put(RUNS, &r.key, &stored) {
            Ok(()) => r.saved = Some(h),
            Err(e) => warn!(error = %e, "cannot save the run: a restart would lose it"),
        }
    }

    fn run_of_lease(&self, id: &LeaseId) -> Option<usize> {
        self.runs
            .iter()
            .position(|r| r.fleet.lease_for(id).is_some())
    }

    fn on_peer_event(&mut self, ev: PeerEvent) {
        let now = now_ms();
        match ev {
            PeerEvent::Rtt { peer, rtt } => {
                if let Some(k) = key_of_peer(&peer) {
                    self.rtt
                        .insert(k, rtt.as_millis().min(u32::MAX as u128) as u32);
                }
            }
            PeerEvent::AddressesChanged => {
                // Our home line may have a new address: reconnect to every seller of a
                // live lease from it, so they learn it and their overlay sessions follow.
                for p in self.lease_sellers() {
                    self.p2p.redial(p);
                }
            }
            PeerEvent::Gossip { topic, data, .. } if topic == OFFER_TOPIC => {
                match market::decode_offer(&data) {
                    Ok(o) => {
                        if let Err(e) = self.book.insert(o, now) {
                            self.bad_offers += 1;
                            tracing::debug!(error = %e, "offer ignored");
                        }
                    }
                    Err(e) => {
                        self.bad_offers += 1;
                        warn!(error = %e, "malformed offer ignored");
                    }
                }
            }
            _ => {}
        }
    }

    /// Sellers of live leases that lost their connection (our address changed, or
    /// theirs) are dialled again: they find our new address on that connection.
    fn redial(&mut self) {
        for p in self.lease_sellers() {
            self.p2p.dial(p);
        }
    }

    /// Sellers holding a live (starting or running) lease of any run.
    fn lease_sellers(&self) -> Vec<PeerId> {
        self.runs
            .iter()
            .flat_map(|r| r.fleet.slots())
            .filter(|s| {
                matches!(
                    s.state,
                    SlotState::Starting { .. } | SlotState::Running { .. }
                )
            })
            .filter_map(|s| s.state.seller().and_then(|k| peer_of_key(&k)))
            .collect()
    }

    fn on_msg(&mut self, peer: PeerId, msg: MarketMsg) {
        let now = now_ms();
        let Some(from) = key_of_peer(&peer) else {
            return;
        };
        let lease_id = match &msg {
            MarketMsg::Accept(l) => l.terms.id,
            MarketMsg::Refuse { lease, .. } => *lease,
            MarketMsg::Receipt(r) => r.body.lease,
            MarketMsg::Phase { lease, .. } => *lease,
            MarketMsg::Console { lease, .. } => *lease,
            other => {
                warn!(%peer, msg = msg_name(other), "market message a buyer does not take: ignored");
                return;
            }
        };
        let Some(i) = self.run_of_lease(&lease_id) else {
            warn!(%peer, lease = %lease_id, msg = msg_name(&msg), "message for a lease we do not hold: ignored");
            return;
        };
        let seller_ok = self.runs[i]
            .fleet
            .lease_for(&lease_id)
            .is_some_and(|t| t.seller == from);
        if !seller_ok {
            warn!(%peer, lease = %lease_id, "message from a peer that is not the lease's seller: refused");
            return;
        }
        let r = &mut self.runs[i];
        let actions = match msg {
            MarketMsg::Accept(l) => r.fleet.on_accepted(l, &from, now),
            MarketMsg::Refuse { lease, why } => {
                info!(%peer, lease = %lease, reason = %why, "lease refused by the seller");
                Ok(r.fleet.on_refused(&lease, &from, &why, now))
            }
            MarketMsg::Receipt(rc) => r.fleet.on_receipt(&rc, &from, now),
            MarketMsg::Phase { lease, phase } => {
                // The timeline keeps each lease's phase changes, not every progress note.
                let kind = match &phase {
                    market::GuestPhase::Fetching { .. } => "fetching",
                    market::GuestPhase::Booting => "booting",
                    market::GuestPhase::Running => "running",
                    market::GuestPhase::Ended(_) => "ended",
                };
                let id = lease.to_string();
                let last = r
                    .timeline
                    .iter()
                    .rev()
                    .find(|e| e["lease"].as_str() == Some(id.as_str()))
                    .and_then(|e| e["phase"].as_str().map(str::to_string));
                if last.as_deref() != Some(kind) {
                    r.timeline
                        .push(json!({"at_ms": now, "lease": id, "phase": kind}));
                }
                Ok(r.fleet.on_phase(&lease, &from, phase, now))
            }
            MarketMsg::Console {
                lease,
                offset,
                data,
            } => {
                r.fleet.on_life(&lease, now);
                if let Err(e) = self.write_console(&lease, offset, &data) {
                    warn!(lease = %lease, error = %e, "console log");
                }
                Ok(Vec::new())
            }
            _ => Ok(Vec::new()),
        };
        match actions {
            Ok(a) => self.apply(i, a),
            Err(e) => warn!(%peer, lease = %lease_id, error = %e, "market message refused"),
        }
        self.report(i);
    }

    fn console_path(&self, lease: &LeaseId) -> PathBuf {
        self.node
            .settings
            .data_dir
            .join("leases")
            .join(lease.to_string())
            .join("console.log")
    }

    fn write_console(&self, lease: &LeaseId, offset: u64, data: &[u8]) -> Result<()> {
        let path = self.console_path(lease);
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)
                .map_err(|e| Error::io(format!("creating {}", d.display()), e))?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        f.seek(SeekFrom::Start(offset))
            .and_then(|_| f.write_all(data))
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }

    fn on_tick(&mut self) {
        let now = now_ms();
        self.book.expire(now);
        // Lists that cannot be used (not loaded yet) trust nobody.
        let trust = self.trust.policy().unwrap_or_else(|_| {
            Arc::new(TrustPolicy {
                trusted: Default::default(),
                revoked: Default::default(),
            })
        });
        let rx = self.overlay.guest_rx_frames();
        for i in 0..self.runs.len() {
            // Overlay traffic from a guest is a sign of life of its lease.
            let lives: Vec<LeaseId> = {
                let r = &mut self.runs[i];
                let mut v = Vec::new();
                for s in r.fleet.slots() {
                    let mac = MacAddr(s.mac);
                    if let (Some(&n), Some(l)) = (rx.get(&mac), &s.lease) {
                        if r.rx_seen.get(&mac) != Some(&n) {
                            r.rx_seen.insert(mac, n);
                            v.push(l.id);
                        }
                    }
                }
                v
            };
            for l in lives {
                self.runs[i].fleet.on_life(&l, now);
            }
            let choosing = self.runs[i]
                .fleet
                .slots()
                .iter()
                .any(|s| matches!(s.state, SlotState::Choosing));
            if choosing {
                let offers: Vec<&market::Offer> = self.book.live(now).collect();
                let actions =
                    self.runs[i]
                        .fleet
                        .on_offers(&offers, &self.rtt, &trust, &self.penalties, now);
                self.apply(i, actions);
            }
            let actions = self.runs[i].fleet.on_tick(now);
            self.apply(i, actions);
            self.check_run(i, now);
            self.report(i);
        }
        self.reap();
        self.publish_snapshot();
    }

    /// Gives up a run no offer matches, and answers a detached `run` once every
    /// guest is up.
    fn check_run(&mut self, i: usize, now: u64) {
        let r = &mut self.runs[i];
        let any_leased = r.fleet.slots().iter().any(|s| s.lease.is_some());
        if any_leased {
            r.ever_matched = true;
        }
        if !r.ever_matched && now.saturating_sub(r.started_ms) > r.offer_wait_ms {
            let why = r
                .last_no_match
                .clone()
                .unwrap_or_else(|| format!("no offers seen in {} s", r.offer_wait_ms / 1000));
            let actions = r.fleet.stop(None, now);
            if let Some(reply) = r.reply.take() {
                let _ = reply.send(Err(Error::Market(format!("no offer matches: {why}"))));
            }
            self.apply(i, actions);
            return;
        }
        let all_up = r
            .fleet
            .slots()
            .iter()
            .all(|s| matches!(s.state, SlotState::Running { .. }));
        if all_up && !r.all_up_reported {
            r.all_up_reported = true;
            info!(
                elapsed_ms = now - r.started_ms,
                "every guest of the run is up"
            );
            r.timeline.push(json!({"at_ms": now, "all_up": true}));
            if r.detach {
                if let Some(reply) = r.reply.take() {
                    let _ = reply.send(Ok(self.summary(i)));
                }
            }
        }
    }

    fn summary(&self, i: usize) -> Value {
        let r = &self.runs[i];
        json!({
            "slots": r.fleet.slots().iter().map(|s| slot_json(s, &r.fleet)).collect::<Vec<_>>(),
            "cost": market::format_price(r.fleet.cost_so_far()),
            "started_ms": r.started_ms,
            "elapsed_ms": now_ms() - r.started_ms,
            "timeline": r.timeline,
            "leases_dir": self.node.settings.data_dir.join("leases").display().to_string(),
        })
    }

    fn report(&self, i: usize) {
        let r = &self.runs[i];
        r.progress.event("run", self.summary(i));
    }

    /// Runs whose every slot stopped are answered and dropped.
    fn reap(&mut self) {
        let mut i = 0;
        while i < self.runs.len() {
            let done = self.runs[i]
                .fleet
                .slots()
                .iter()
                .all(|s| matches!(s.state, SlotState::Stopped));
            if done {
                let summary = self.summary(i);
                let r = self.runs.remove(i);
                if let Err(e) = self.db.remove(RUNS, &r.key) {
                    warn!(error = %e, "cannot drop the finished run's record");
                }
                if let Some(reply) = r.reply {
                    let _ = reply.send(Ok(summary));
                }
            } else {
                i += 1;
            }
        }
    }

    fn apply(&mut self, i: usize, actions: Vec<BuyerAction>) {
        // The fleet as it now is goes to disk before anything it decided goes out
        // (a proposal's lease id, an ack): a crash then never reuses or forgets one.
        self.save_run(i);
        let now = now_ms();
        for a in actions {
            match a {
                BuyerAction::Propose { seller, proposal } => {
                    self.runs[i].timeline.push(json!({"at_ms": now, "lease": proposal.body.id.to_string(), "phase": "proposed", "slot": proposal.body.guest_ip.to_string()}));
                    if let Some(p) = peer_of_key(&seller) {
                        info!(seller = %p, lease = %proposal.body.id, ip = %proposal.body.guest_ip, "proposing a lease");
                        self.net.send(p, MarketMsg::Propose(proposal));
                    }
                }
                BuyerAction::Admit { lease } => {
                    let t = &lease.terms;
                    if let Err(e) = self.overlay.admit(
                        &hex::encode(t.seller.0),
                        MacAddr(t.guest_mac),
                        t.guest_ip,
                    ) {
                        warn!(lease = %t.id, error = %e, "overlay admit failed: the guest cannot join");
                        if let Some(reply) = self.runs[i].reply.take() {
                            let _ = reply
                                .send(Err(Error::Market(format!("the overlay cannot start: {e}"))));
                        }
                    }
                    let path = self.console_path(&t.id);
                    if let Some(d) = path.parent() {
                        let _ = std::fs::create_dir_all(d);
                        let _ = std::fs::write(
                            d.join("lease.json"),
                            serde_json::to_vec_pretty(&lease).unwrap_or_default(),
                        );
                    }
                    self.runs[i].timeline.push(
                        json!({"at_ms": now, "lease": t.id.to_string(), "phase": "accepted"}),
                    );
                    if let Some(at) = self.runs[i].lost_at.get(&self.slot_of(i, &t.id)) {
                        info!(lease = %t.id, replaced_after_ms = now - at, "replacement lease accepted");
                    }
                }
                BuyerAction::Revoke { mac, .. } => {
                    self.overlay.revoke(MacAddr(mac));
                    self.runs[i].rx_seen.remove(&MacAddr(mac));
                }
                BuyerAction::SendAck { seller, ack } => {
                    if let Some(p) = peer_of_key(&seller) {
                        self.net.send(p, MarketMsg::Ack(ack));
                    }
                }
                BuyerAction::SendStop { seller, stop } => {
                    if let Some(p) = peer_of_key(&seller) {
                        self.net.send(p, MarketMsg::Stop(stop));
                    }
                }
                BuyerAction::Penalize { seller } => {
                    let n = self.penalties.entry(seller).or_insert(0);
                    *n += 1;
                    let _ = self.db.put(PENALTIES, &seller.0, n);
                }
                BuyerAction::Lost {
                    slot,
                    lease,
                    seller,
                    silent_ms,
                } => {
                    warn!(%lease, seller = ?peer_of_key(&seller), silent_ms, "seller went silent: re-dispatching the guest");
                    self.runs[i].lost_at.insert(slot, now);
                    self.runs[i].timeline.push(json!({"at_ms": now, "lease": lease.to_string(), "phase": "lost", "slot": slot, "silent_ms": silent_ms}));
                }
                BuyerAction::NoMatch { why, .. } => {
                    self.runs[i].last_no_match = Some(why);
                }
                BuyerAction::Persist { lease } => {
                    if let Some(e) = self.runs[i].fleet.ledger().find(|e| e.lease == lease) {
                        if let Err(err) = self.db.put(LEDGER, &lease.0, e) {
                            warn!(%lease, error = %err, "cannot record the ledger");
                        }
                    }
                }
                BuyerAction::Done => {}
            }
        }
    }

    fn slot_of(&self, i: usize, id: &LeaseId) -> u32 {
        self.runs[i]
            .fleet
            .slots()
            .iter()
            .find(|s| s.lease.as_ref().is_some_and(|l| l.id == *id))
            .map(|s| s.index)
            .unwrap_or(u32::MAX)
    }

    fn publish_snapshot(&self) {
        let cost: u64 = self.runs.iter().map(|r| r.fleet.cost_so_far()).sum();
        let guests: usize = self
            .runs
            .iter()
            .flat_map(|r| r.fleet.slots())
            .filter(|s| matches!(s.state, SlotState::Running { .. }))
            .count();
        *self.snapshot.lock().expect("lock") = json!({
            "role": "buyer",
            "offers": self.book.len(),
            "offers_with_room": self.book.live(now_ms()).filter(|o| o.free_guests > 0).count(),
            "bad_offers": self.bad_offers,
            "trust_lists": self.trust.status(),
            "bad_messages": self.net.rejects.load(std::sync::atomic::Ordering::Relaxed),
            "dropped_streams": super::net::dropped_streams(),
            "runs": self.runs.len(),
            "guests_running": guests,
            "cost_so_far": market::format_price(cost),
            "sellers_measured": self.rtt.len(),
            "penalised_sellers": self.penalties.len(),
        });
    }
}
