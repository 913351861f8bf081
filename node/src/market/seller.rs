//! The seller's market service: publishes a signed offer, takes lease proposals
//! (the owner's policy decides), runs each accepted lease and bills it per period
//! through `market::SellerLease`, and keeps an audit log.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use libp2p::PeerId;
use market::{
    Accel, BackendKind, GuestPhase, Lease, LeaseId, MarketMsg, Offer, PeerKey, SellerAction,
    SellerLease, SellerPhase, SellerPolicy, Signed,
};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};
use vm::qemu::AccelPolicy;

use super::audit::{self, AuditEvent};
use super::console::ConsoleSender;
use super::db::MarketDb;
use super::lease_run::{self, RunCtx, RunEvent, RunHandle};
use super::net::MarketNet;
use super::{now_ms, OFFER_TOPIC};
use crate::config::SellerTable;
use crate::control::Router;
use crate::error::{Error, Result};
use crate::identity::key_of_peer;
use crate::node::Node;
use crate::overlay_service::OverlayHandle;
use crate::p2p::{P2pHandle, PeerEvent};

const LEASES: &str = "seller_leases";
/// How often the offer is published again, and how long it is valid.
const OFFER_EVERY: Duration = Duration::from_secs(5);
const OFFER_VALID_MS: u64 = 60_000;
/// How often a running lease tells its buyer it is alive (the buyer re-dispatches a
/// lease silent for its `silence_s`, 30 s by default; receipts come once a period).
const HEARTBEAT: Duration = Duration::from_secs(5);

/// The seller's resolved market settings.
#[derive(Debug, Clone)]
pub struct SellerSettings {
    pub policy: SellerPolicy,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub price_per_min: u64,
    pub accel: AccelPolicy,
    pub measurement: [u8; 32],
}

fn parse_keys(what: &'static str, v: &[String]) -> Result<BTreeSet<PeerKey>> {
    v.iter()
        .map(|s| {
            s.parse::<PeerKey>().map_err(|_| Error::BadArg {
                what,
                reason: format!("{s:?} is not a 64-digit hex public key"),
            })
        })
        .collect()
}

/// Hash of what this seller runs: its own binary, and its boot medium if named.
fn measure(boot: Option<&std::path::Path>) -> Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    let exe = std::fs::read("/proc/self/exe")
        .map_err(|e| Error::io("reading /proc/self/exe to measure the node binary", e))?;
    h.update(&exe);
    if let Some(p) = boot {
        let mut f = std::fs::File::open(p)
            .map_err(|e| Error::io(format!("measuring the boot medium {}", p.display()), e))?;
        std::io::copy(&mut f, &mut h)
            .map_err(|e| Error::io(format!("measuring the boot medium {}", p.display()), e))?;
    }
    Ok(*h.finalize().as_bytes())
}

/// `START-END` in UTC, each `H` or `H:MM` (e.g. "18-8", "8:30-17:45"), as minutes
/// of the day; START > END wraps midnight.
pub fn parse_hours(h: &str) -> Result<(u16, u16)> {
    let bad = |why: &str| Error::BadArg {
        what: "seller.hours",
        reason: format!("{h:?}: {why}"),
    };
    let (a, b) = h
        .split_once('-')
        .ok_or_else(|| bad("use START-END in UTC, hours or H:MM, e.g. 18-8 or 8:30-17:45"))?;
    let at = |s: &str| -> Result<u16> {
        let (hh, mm) = s.trim().split_once(':').unwrap_or((s.trim(), "0"));
        let hh: u16 = hh.parse().map_err(|_| bad("hours are 0 to 24"))?;
        let mm: u16 = mm.parse().map_err(|_| bad("minutes are 0 to 59"))?;
        if mm > 59 {
            return Err(bad("minutes are 0 to 59"));
        }
        let m = hh * 60 + mm;
        if hh > 24 || m > 24 * 60 {
            return Err(bad("hours are 0 to 24"));
        }
        Ok(m)
    };
    Ok((at(a)?, at(b)?))
}

/// The minute of the (UTC) day at `now_ms`.
pub fn minute_of_day(now_ms: u64) -> u16 {
    ((now_ms / 60_000) % 1440) as u16
}

impl SellerSettings {
    pub fn resolve(t: &SellerTable, store_cap_mib: u64) -> Result<SellerSettings> {
        let max_guests = t.max_guests.unwrap_or(2);
        let vcpus = t.vcpus.unwrap_or(1);
        let memory_mib = t.memory_mib.unwrap_or(256);
        let price_per_min = match &t.price_per_min {
            Some(p) => market::parse_price(p).map_err(|e| Error::BadArg {
                what: "seller.price_per_min",
                reason: e.to_string(),
            })?,
            None => market::parse_price("0.01").expect("constant"),
        };
        let accel = match t.accel.as_deref().unwrap_or("auto") {
            "auto" => AccelPolicy::Auto,
            "kvm" => AccelPolicy::Kvm,
            "tcg" => AccelPolicy::Tcg,
            other => {
                return Err(Error::BadArg {
                    what: "seller.accel",
                    reason: format!("{other:?}: use auto, kvm or tcg"),
                })
            }
        };
        let hours = t.hours.as_deref().map(parse_hours).transpose()?;
        let allowed = parse_keys("seller.allowed_buyers", &t.allowed_buyers)?;
        Ok(SellerSettings {
            policy: SellerPolicy {
                max_guests,
                vcpus_total: vcpus * max_guests,
                memory_mib_total: memory_mib * max_guests as u64,
                disk_cap_mib: t.disk_cap_mib.unwrap_or(store_cap_mib / 2),
                min_price_per_min: price_per_min,
                allowed_buyers: (!allowed.is_empty()).then_some(allowed),
                denied_buyers: parse_keys("seller.denied_buyers", &t.denied_buyers)?,
                hours,
            },
            vcpus,
            memory_mib,
            price_per_min,
            accel,
            measurement: measure(t.measure_boot.as_deref())?,
        })
    }
}

struct Active {
    core: SellerLease,
    buyer_peer: PeerId,
    run: Option<RunHandle>,
    /// The last phase told to the buyer, repeated as the heartbeat while the lease
    /// prepares (a fetch stalled behind slow uplinks, a slow boot), so that the buyer
    /// does not take a busy seller for a vanished one.
    phase: Option<GuestPhase>,
    /// The guest's console on its way to the buyer (started with the first output).
    console: Option<ConsoleSender>,
}

struct Seller {
    node: Arc<Node>,
    p2p: Arc<P2pHandle>,
    net: MarketNet,
    db: MarketDb,
    overlay: OverlayHandle,
    sk: SigningKey,
    me: PeerKey,
    cfg: SellerSettings,
    perf_score: u32,
    /// How the score was measured (backend, dots, or the probe's error).
    perf_probe: Value,
    accel: Accel,
    leases: HashMap<LeaseId, Active>,
    /// Each peer's address as last seen on a connection (a buyer's home IP).
    seen: HashMap<PeerId, IpAddr>,
    runs_tx: mpsc::UnboundedSender<RunEvent>,
    snapshot: Arc<Mutex<Value>>,
    refused: u64,
    last_heartbeat: std::time::Instant,
}

/// How long the perf probe guest is timed (its boot comes on top).
const PERF_WINDOW: Duration = Duration::from_millis(1000);

/// The performance score, measured in a guest of the backend this seller's leases
/// would get (`score`), or taken from its cache; 0 (ranked last) if the probe guest
/// cannot run, with the reason logged and shown in `status`.
async fn measure_perf(node: &Node, cfg: &SellerSettings) -> (u32, Value) {
    let file = node.settings.data_dir.join("perf-score.json");
    let key = super::score::cache_key(&cfg.measurement, &format!("{:?}", cfg.accel));
    let accel = cfg.accel;
    let r = tokio::task::spawn_blocking(move || {
        super::score::score(
            &file,
            &key,
            || {
                vm::auto::backends_with(vm::qemu::QemuConfig {
                    accel,
                    ..vm::qemu::QemuConfig::default()
                })
            },
            PERF_WINDOW,
        )
    })
    .await;
    match r {
        Ok(Ok((s, cached))) => {
            info!(score = s.score, dots = s.dots, secs = s.secs, backend = %s.backend, cached, "performance measured in a guest");
            let v =
                json!({ "backend": s.backend, "dots": s.dots, "secs": s.secs, "cached": cached });
            (s.score, v)
        }
        Ok(Err(e)) => {
            warn!(error = %e, "the performance probe guest did not run: offering score 0");
            (0, json!({ "error": e.to_string() }))
        }
        Err(e) => (0, json!({ "error": e.to_string() })),
    }
}

pub fn start(
    node: Arc<Node>,
    router: &mut Router,
    p2p: Arc<P2pHandle>,
    overlay: OverlayHandle,
    net: MarketNet,
    db: MarketDb,
) -> Result<mpsc::UnboundedSender<oneshot::Sender<()>>> {
    let cfg = SellerSettings::resolve(&node.settings.seller, node.settings.store_cap_mib)?;
    let accel = match cfg.accel {
        AccelPolicy::Tcg => Accel::Tcg,
        AccelPolicy::Kvm => match vm::kvm_probe::linux_instructions() {
            Ok(()) => Accel::Kvm,
            Err(e) => {
                return Err(Error::Market(format!(
                    "seller.accel = \"kvm\" but {e}; set seller.accel = \"auto\" to sell with TCG instead"
                )))
            }
        },
        AccelPolicy::Auto => match vm::kvm_probe::linux_instructions() {
            Ok(()) => Accel::Kvm,
            Err(e) => {
                warn!(reason = %e, "KVM cannot run Linux guests here: selling TCG guests (slower; the offer says so)");
                Accel::Tcg
            }
        },
    };
    info!(%accel, measurement = %hex::encode(cfg.measurement), "seller market starting (measuring performance)");
    let (incoming, events) = super::connect(&p2p, &net)?;
    let snapshot = Arc::new(Mutex::new(json!({})));
    let (runs_tx, runs_rx) = mpsc::unbounded_channel();
    let sk = node.identity.signing_key().clone();
    let me = PeerKey::of(&sk);
    let mut s = Seller {
        node: node.clone(),
        p2p,
        net,
        db: db.clone(),
        overlay,
        sk,
        me,
        cfg,
        perf_score: 0,
        perf_probe: Value::Null,
        accel,
        leases: HashMap::new(),
        seen: HashMap::new(),
        runs_tx,
        snapshot: snapshot.clone(),
        refused: 0,
        last_heartbeat: std::time::Instant::now(),
    };
    s.restore()?;
    {
        let snapshot = snapshot.clone();
        router.status_section("market", move || snapshot.lock().expect("lock").clone());
    }
    {
        let db = db.clone();
        router.method("market.audit", move |_, _| {
            let db = db.clone();
            async move {
                let evs = audit::all(&db)?;
                Ok(serde_json::to_value(evs).expect("json"))
            }
        });
    }
    router.method("market.leases", move |_, _| {
        let snapshot = snapshot.clone();
        async move { Ok(snapshot.lock().expect("lock")["leases"].clone()) }
    });
    let (stop_tx, stop_rx) = mpsc::unbounded_channel();
    tokio::spawn(s.run(incoming, events, runs_rx, stop_rx));
    Ok(stop_tx)
}

impl Seller {
    /// After a crash or restart: every lease of the last run is over (its guest died
    /// with the old process); bill nothing more for it.
    fn restore(&mut self) -> Result<()> {
        let now = now_ms();
        for (_, rec) in self.db.all::<market::SellerLeaseRecord>(LEASES)? {
            let was_live = rec.phase != SellerPhase::Ended;
            let (core, actions) = SellerLease::restore(rec, now);
            let id = core.lease().terms.id;
            let Some(buyer_peer) = crate::identity::peer_of_key(&core.lease().terms.buyer) else {
                continue;
            };
            if was_live {
                info!(lease = %id, "lease of a previous run ended (seller restarted)");
            }
            self.leases.insert(
                id,
                Active {
                    core,
                    buyer_peer,
                    run: None,
                    phase: None,
                    console: None,
                },
            );
            self.apply(id, actions);
        }
        Ok(())
    }

    async fn run(
        mut self,
        mut incoming: mpsc::UnboundedReceiver<(PeerId, MarketMsg)>,
        mut events: mpsc::UnboundedReceiver<PeerEvent>,
        mut runs: mpsc::UnboundedReceiver<RunEvent>,
        mut stop: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
    ) {
        // No offer before the score is known (messages wait in their queues).
        (self.perf_score, self.perf_probe) = measure_perf(&self.node, &self.cfg).await;
        let mut offer_tick = tokio::time::interval(OFFER_EVERY);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut stopping: Option<oneshot::Sender<()>> = None;
        loop {
            tokio::select! {
                // Peer events first: a proposal must find its sender's address known.
                biased;
                Some(ev) = events.recv() => self.on_peer_event(ev),
                Some((peer, msg)) = incoming.recv() => {
                    if stopping.is_none() {
                        self.on_msg(peer, msg);
                    }
                }
                Some(ev) = runs.recv() => self.on_run_event(ev),
                Some(done) = stop.recv() => {
                    let now = now_ms();
                    let ids: Vec<LeaseId> = self.live().map(|a| a.core.lease().terms.id).collect();
                    info!(leases = ids.len(), "shutting down: ending every lease");
                    for id in ids {
                        if let Some(a) = self.leases.get_mut(&id) {
                            let actions = a.core.on_shutdown(now);
                            self.apply(id, actions);
                        }
                    }
                    stopping = Some(done);
                }
                _ = offer_tick.tick(), if stopping.is_none() => self.publish_offer(),
                _ = tick.tick() => self.on_tick(),
            }
            // Shutting down: done once no guest is left running.
            if stopping.is_some() && self.leases.values().all(|a| a.run.is_none()) {
                if let Some(done) = stopping.take() {
                    let _ = done.send(());
                }
            }
        }
    }

    fn live(&self) -> impl Iterator<Item = &Active> {
        self.leases
            .values()
            .filter(|a| a.core.phase() != SellerPhase::Ended)
    }

    /// Whether `now` is inside the owner's selling hours (UTC).
    fn in_hours(&self, now: u64) -> bool {
        self.cfg.policy.in_hours(minute_of_day(now))
    }

    fn publish_offer(&mut self) {
        let now = now_ms();
        let live = self.live().count() as u32;
        if !self.in_hours(now) {
            return;
        }
        let offer = Offer {
            seller: self.me,
            seq: now,
            issued_ms: now,
            expires_ms: now + OFFER_VALID_MS,
            vcpus: self.cfg.vcpus,
            memory_mib: self.cfg.memory_mib,
            disk_cap_mib: self.cfg.policy.disk_cap_mib,
            price_per_min: self.cfg.price_per_min,
            backend: BackendKind::Qemu,
            accel: self.accel,
            perf_score: self.perf_score,
            measurement: self.cfg.measurement,
            max_guests: self.cfg.policy.max_guests,
            free_guests: self.cfg.policy.max_guests.saturating_sub(live),
        };
        let signed = Signed::sign(&self.sk, offer);
        self.p2p.publish(OFFER_TOPIC, market::encode_offer(&signed));
    }

    fn on_peer_event(&mut self, ev: PeerEvent) {
        if let PeerEvent::Connected { peer, addr } = ev {
            let Some(ip) = crate::p2p::ip_of(&addr) else {
                return;
            };
            if self.seen.insert(peer, ip) != Some(ip) {
                // A buyer with live leases that comes back from a new address: its
                // overlay sessions follow it, no new lease needed.
                if self.live().any(|a| a.buyer_peer == peer) {
                    if let Some(k) = key_of_peer(&peer) {
                        let n = self.overlay.move_buyer(&hex::encode(k.0), ip);
                        if n > 0 {
                            info!(%peer, %ip, sessions = n, "buyer reconnected from a new address");
                        }
                    }
                }
            }
        }
    }

    fn on_msg(&mut self, peer: PeerId, msg: MarketMsg) {
        let now = now_ms();
        let Some(from) = key_of_peer(&peer) else {
            warn!(%peer, "market message from a peer without an ed25519 key: refused");
            return;
        };
        match msg {
            MarketMsg::Propose(p) => self.on_propose(peer, from, p, now),
            MarketMsg::Ack(ack) => {
                let id = ack.body.lease;
                let r = match self.leases.get_mut(&id) {
                    Some(a) if a.buyer_peer == peer => a.core.on_ack(&ack, now),
                    _ => {
                        warn!(%peer, lease = %id, "ack for a lease this buyer does not hold: refused");
                        return;
                    }
                };
                match r {
                    Ok(actions) => self.apply(id, actions),
                    Err(e) => warn!(%peer, lease = %id, error = %e, "ack refused"),
                }
            }
            MarketMsg::Stop(stop) => {
                let id = stop.body.lease;
                let r = match self.leases.get_mut(&id) {
                    Some(a) if a.buyer_peer == peer => a.core.on_stop(&stop, now),
                    _ => {
                        warn!(%peer, lease = %id, "stop for a lease this peer does not hold: refused");
                        return;
                    }
                };
                match r {
                    Ok(actions) => self.apply(id, actions),
                    Err(e) => warn!(%peer, lease = %id, error = %e, "stop refused"),
                }
            }
            other => {
                warn!(%peer, msg = msg_name(&other), "market message a seller does not take: ignored");
            }
        }
    }

    fn on_propose(&mut self, peer: PeerId, from: PeerKey, p: Signed<market::LeaseTerms>, now: u64) {
        let id = p.body.id;
        let minute = minute_of_day(now);
        let active: Vec<&market::LeaseTerms> = self.live().map(|a| &a.core.lease().terms).collect();
        if self.leases.contains_key(&id) {
            // A retransmitted proposal of a lease we hold: answer it again, unless
            // the lease is over (the buyer must not admit a guest that is gone).
            if let Some(a) = self.leases.get(&id) {
                if a.buyer_peer == peer {
                    let answer = if a.core.phase() == SellerPhase::Ended {
                        self.refused += 1;
                        warn!(%peer, lease = %id, "proposal of an ended lease replayed: refused");
                        let _ = audit::append(
                            &self.db,
                            &AuditEvent::Refused {
                                lease: id.to_string(),
                                buyer: peer.to_string(),
                                reason: market::Refusal::Duplicate.to_string(),
                                at_ms: now,
                            },
                        );
                        MarketMsg::Refuse {
                            lease: id,
                            why: market::Refusal::Duplicate,
                        }
                    } else {
                        MarketMsg::Accept(a.core.lease().clone())
                    };
                    self.net.send(peer, answer);
                }
            }
            return;
        }
        let checked = self
            .cfg
            .policy
            .check(&self.me, &p, &from, &active, now, minute)
            .and_then(|()| {
                Lease::countersign(&p, &self.sk).map_err(|_| market::Refusal::BadSignature)
            });
        let lease = match checked {
            Ok(l) => l,
            Err(why) => {
                self.refused += 1;
                warn!(%peer, lease = %id, reason = %why, "lease refused");
                let _ = audit::append(
                    &self.db,
                    &AuditEvent::Refused {
                        lease: id.to_string(),
                        buyer: peer.to_string(),
                        reason: why.to_string(),
                        at_ms: now,
                    },
                );
                self.net.send(peer, MarketMsg::Refuse { lease: id, why });
                return;
            }
        };
        let Some(ip) = self.seen.get(&peer).copied() else {
            // Cannot happen while peer events go first; answered all the same.
            warn!(%peer, lease = %id, "no address known for the buyer: refused");
            self.net.send(
                peer,
                MarketMsg::Refuse {
                    lease: id,
                    why: market::Refusal::NotForMe,
                },
            );
            return;
        };
        let buyer_udp = SocketAddr::new(ip, lease.terms.overlay_port);
        let core = SellerLease::new(lease.clone(), now);
        if let Err(e) = self.db.put(LEASES, &id.0, &core.record()) {
            warn!(error = %e, "cannot record the lease: refused");
            return;
        }
        let _ = audit::append(
            &self.db,
            &AuditEvent::Start {
                lease: id.to_string(),
                buyer: peer.to_string(),
                buyer_addr: buyer_udp.to_string(),
                image: hex::encode(lease.terms.image),
                guest_ip: lease.terms.guest_ip.to_string(),
                at_ms: now,
            },
        );
        info!(%peer, lease = %id, guest_ip = %lease.terms.guest_ip, "lease accepted");
        self.net.send(peer, MarketMsg::Accept(lease.clone()));
        let ctx = RunCtx {
            node: self.node.clone(),
            p2p: self.p2p.clone(),
            overlay: self.overlay.clone(),
            accel: self.cfg.accel,
        };
        let run = lease_run::spawn(ctx, lease, buyer_udp, self.runs_tx.clone());
        self.leases.insert(
            id,
            Active {
                core,
                buyer_peer: peer,
                run: Some(run),
                phase: None,
                console: None,
            },
        );
        self.publish_offer();
    }

    fn on_run_event(&mut self, ev: RunEvent) {
        let now = now_ms();
        match ev {
            RunEvent::Phase(id, phase) => {
                if let Some(a) = self.leases.get_mut(&id) {
                    // Chunks of the buyer's image are flowing: the buyer is alive even
                    // though it has no receipt to acknowledge yet.
                    a.core.on_buyer_life(now);
                    a.phase = Some(phase.clone());
                    self.net
                        .send(a.buyer_peer, MarketMsg::Phase { lease: id, phase });
                }
            }
            RunEvent::Started(id) => {
                if let Some(a) = self.leases.get_mut(&id) {
                    let actions = a.core.on_guest_started(now);
                    self.apply(id, actions);
                }
            }
            RunEvent::Console(id, offset, data) => {
                if let Some(a) = self.leases.get_mut(&id) {
                    let (net, peer) = (self.net.clone(), a.buyer_peer);
                    a.console
                        .get_or_insert_with(|| ConsoleSender::spawn(net, peer, id))
                        .push(offset, data);
                }
            }
            RunEvent::Finished { lease, failed } => {
                if let Some(a) = self.leases.get_mut(&lease) {
                    a.run = None;
                    let actions = match failed {
                        Some(why) => a.core.on_start_failed(why, now),
                        None => a.core.on_guest_exited(now),
                    };
                    self.apply(lease, actions);
                }
                self.publish_offer();
            }
        }
    }

    fn on_tick(&mut self) {
        let now = now_ms();
        if self.last_heartbeat.elapsed() >= HEARTBEAT {
            self.last_heartbeat = std::time::Instant::now();
            for a in self.live() {
                let phase = match a.core.phase() {
                    SellerPhase::Running => GuestPhase::Running,
                    _ => match &a.phase {
                        Some(p) => p.clone(),
                        None => continue,
                    },
                };
                self.net.send(
                    a.buyer_peer,
                    MarketMsg::Phase {
                        lease: a.core.lease().terms.id,
                        phase,
                    },
                );
            }
        }
        // Outside the selling hours: preparing leases end now, running ones at their
        // next period boundary (billing stops there).
        if !self.in_hours(now) {
            let ids: Vec<LeaseId> = self.live().map(|a| a.core.lease().terms.id).collect();
            for id in ids {
                if let Some(a) = self.leases.get_mut(&id) {
                    let actions = a.core.on_outside_hours(now);
                    self.apply(id, actions);
                }
            }
        }
        // Ended leases too, while they have work: their last unacked receipt is re-sent
        // (with back-off) so a lost final ack still lands.
        let ids: Vec<LeaseId> = self
            .leases
            .values()
            .filter(|a| a.core.next_deadline().is_some())
            .map(|a| a.core.lease().terms.id)
            .collect();
        for id in ids {
            if let Some(a) = self.leases.get_mut(&id) {
                let actions = a.core.on_tick(now, &self.sk);
                self.apply(id, actions);
            }
        }
        self.publish_snapshot();
    }

    fn apply(&mut self, id: LeaseId, actions: Vec<SellerAction>) {
        for act in actions {
            let Some(a) = self.leases.get_mut(&id) else {
                return;
            };
            match act {
                SellerAction::SendReceipt(r) => {
                    self.net.send(a.buyer_peer, MarketMsg::Receipt(r));
                }
                SellerAction::StopGuest(reason) => {
                    info!(lease = %id, %reason, "stopping the guest");
                    if let Some(run) = &a.run {
                        run.stop();
                    }
                }
                SellerAction::Persist => {
                    if let Err(e) = self.db.put(LEASES, &id.0, &a.core.record()) {
                        warn!(lease = %id, error = %e, "cannot record the lease");
                    }
                }
                SellerAction::Ended(reason) => {
                    if let Some(run) = &a.run {
                        run.stop();
                    }
                    let mac = overlay::MacAddr(a.core.lease().terms.guest_mac);
                    let counters = self.overlay.guest_counters(mac).unwrap_or(Value::Null);
                    let ledger = a.core.ledger().clone();
                    info!(lease = %id, %reason, minutes_billed = ledger.acked, "lease ended");
                    let _ = audit::append(
                        &self.db,
                        &AuditEvent::End {
                            lease: id.to_string(),
                            buyer: a.buyer_peer.to_string(),
                            reason: reason.to_string(),
                            minutes_billed: ledger.acked,
                            counters,
                            at_ms: now_ms(),
                        },
                    );
                    let peer = a.buyer_peer;
                    let _ = self.db.put(LEASES, &id.0, &a.core.record());
                    self.net.send(
                        peer,
                        MarketMsg::Phase {
                            lease: id,
                            phase: GuestPhase::Ended(reason),
                        },
                    );
                }
            }
        }
    }

    fn publish_snapshot(&self) {
        let leases: Vec<Value> = self
            .leases
            .values()
            .map(|a| {
                let t = &a.core.lease().terms;
                let l = a.core.ledger();
                json!({
                    "lease": t.id.to_string(),
                    "buyer": a.buyer_peer.to_string(),
                    "image": hex::encode(t.image),
                    "guest_ip": t.guest_ip.to_string(),
                    "phase": format!("{:?}", a.core.phase()),
                    "minutes_receipted": l.receipted,
                    "minutes_acked": l.acked,
                    "billed": market::format_price(l.billed()),
                    "end_reason": l.end_reason.as_ref().map(|r| r.to_string()),
                })
            })
            .collect();
        let earned: u64 = self.leases.values().map(|a| a.core.ledger().billed()).sum();
        *self.snapshot.lock().expect("lock") = json!({
            "role": "seller",
            "accel": self.accel.to_string(),
            "perf_score": self.perf_score,
            "perf_probe": self.perf_probe,
            "measurement": hex::encode(self.cfg.measurement),
            "price_per_min": market::format_price(self.cfg.price_per_min),
            "live_leases": self.live().count(),
            // Offers go out only inside the selling hours.
            "offering": self.in_hours(now_ms()),
            "max_guests": self.cfg.policy.max_guests,
            "earned": market::format_price(earned),
            "refused": self.refused,
            "bad_messages": self.net.rejects.load(std::sync::atomic::Ordering::Relaxed),
            "dropped_streams": super::net::dropped_streams(),
            "leases": leases,
        });
    }
}

pub fn msg_name(m: &MarketMsg) -> &'static str {
    match m {
        MarketMsg::Propose(_) => "propose",
        MarketMsg::Accept(_) => "accept",
        MarketMsg::Refuse { .. } => "refuse",
        MarketMsg::Receipt(_) => "receipt",
        MarketMsg::Ack(_) => "ack",
        MarketMsg::Stop(_) => "stop",
        MarketMsg::Phase { .. } => "phase",
        MarketMsg::Console { .. } => "console",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selling_hours_take_whole_hours_and_minutes() {
        assert_eq!(parse_hours("18-8").unwrap(), (18 * 60, 8 * 60));
        assert_eq!(parse_hours("8:30-17:45").unwrap(), (510, 1065));
        assert_eq!(parse_hours(" 0 - 24 ").unwrap(), (0, 1440));
        for bad in ["18", "25-3", "8:60-9", "x-1", "24:01-3", "1-2:"] {
            let e = parse_hours(bad).unwrap_err().to_string();
            assert!(e.contains("seller.hours"), "{bad}: {e}");
        }
        assert_eq!(minute_of_day(0), 0);
        assert_eq!(minute_of_day(86_400_000 + 61_000), 1);
    }
}
