//! The overlay inside the daemon, driven by control methods (`overlay.*`) so it is
//! usable before leases exist; the lease logic will call the same functions.
//!
//! Buyer: `overlay admit` starts the switch (one UDP socket, the host tap) on first
//! use and admits a seller key for a guest MAC/IP. Seller: `overlay attach` plugs a
//! guest port (a new tap in a new lease namespace, or an existing interface in an
//! existing namespace) into a session to a buyer. `overlay ls` and the `overlay`
//! section of `status` show sessions, traffic and drop counters by reason.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use clap::Subcommand;
use overlay::io::{self as oio, shell, Buyer, BuyerIoConfig, NetNs, PacketPort, Seller};
use overlay::{BuyerConfig, BuyerCore, GuestLease, MacAddr, SellerConfig, SellerCore};
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::info;

use crate::cli::Role;
use crate::config::Settings;
use crate::control::{Client, Router};
use crate::daemon::Node;
use crate::error::{Error, Result};
use crate::image_service::{blocking, parse_params};
use crate::overlay_leases::LeaseRecord;

/// Default UDP port of the buyer's switch.
pub const DEFAULT_PORT: u16 = 7451;
/// Default name of the buyer's host tap.
pub const DEFAULT_TAP: &str = "csovl0";
/// Default overlay address of the buyer's host.
pub const DEFAULT_HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// Default busy-poll budget of the overlay I/O threads (see `overlay::io::spin`).
pub const DEFAULT_BUSY_POLL_US: u64 = oio::spin::DEFAULT_BUDGET.as_micros() as u64;
/// Largest busy-poll budget accepted (a spin is meant to cover a LAN round trip).
const MAX_BUSY_POLL_US: u64 = 100_000;

#[derive(Debug, Subcommand)]
pub enum OverlayCommand {
    /// Buyer: admit a seller's key to carry the guest with this MAC and IP
    /// (the first call starts the switch and the host tap).
    Admit {
        /// The seller's ed25519 public key (hex, see `cpushare-node id`).
        #[arg(long)]
        key: String,
        /// The guest's MAC address, e.g. 52:54:00:12:34:56.
        #[arg(long)]
        mac: String,
        /// The guest's overlay IPv4 address (handed out by the switch's DHCP).
        #[arg(long)]
        ip: Ipv4Addr,
        /// UDP address sellers connect to (first call only) [default: 0.0.0.0:7451,
        /// or `listen` in the config file's [overlay] table, as for the flags below].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Name of the buyer's host tap (first call only) [default: csovl0].
        #[arg(long)]
        tap: Option<String>,
        /// The buyer host's overlay address, /16 (first call only) [default: 10.77.0.1].
        #[arg(long)]
        host_ip: Option<Ipv4Addr>,
        /// After forwarding a frame, poll for its answer this many microseconds before
        /// sleeping (lower latency for up to one core while packets flow; 0 = off;
        /// first call only) [default: 200].
        #[arg(long)]
        busy_poll_us: Option<u64>,
    },
    /// Buyer: remove an admitted guest (its session ends at once).
    Revoke {
        #[arg(long)]
        mac: String,
    },
    /// Seller: connect a guest port to a buyer. With --tap, a new tap is created in a
    /// new lease namespace (a VMM opens it there by name); with --iface, an existing
    /// interface in an existing --netns is used (e.g. a veth to a test namespace).
    Attach {
        /// Create this tap for the guest.
        #[arg(long, conflicts_with = "iface")]
        tap: Option<String>,
        /// Use this existing interface in --netns.
        #[arg(long, requires = "netns")]
        iface: Option<String>,
        /// Lease namespace (created with --tap, default "cs-<tap>"; must exist with --iface).
        #[arg(long)]
        netns: Option<String>,
        /// The buyer's UDP endpoint, HOST:PORT.
        #[arg(long)]
        buyer: String,
        /// The buyer's ed25519 public key (hex).
        #[arg(long)]
        buyer_key: String,
        /// The guest's MAC address.
        #[arg(long)]
        mac: String,
        /// The guest's overlay IPv4 address.
        #[arg(long)]
        ip: Ipv4Addr,
        /// The buyer host's overlay address [default: 10.77.0.1, or `buyer_ip` in the
        /// config file's [overlay] table, as for the flags below].
        #[arg(long)]
        buyer_ip: Option<Ipv4Addr>,
        /// Cap on the guest's sending rate in Mbit/s (egress token bucket; default from the lease defaults).
        #[arg(long)]
        max_mbit: Option<u64>,
        /// Cap on the guest's sending rate in frames per second.
        #[arg(long)]
        max_pps: Option<u64>,
        /// After forwarding a frame, poll for its answer this many microseconds before
        /// sleeping; answers from the buyer only while they come that fast (lower
        /// latency for up to one core while packets flow; 0 = off).
        #[arg(long)]
        busy_poll_us: Option<u64>,
    },
    /// Seller: end a guest's session and remove what attach created.
    Detach {
        #[arg(long)]
        mac: String,
    },
    /// List sessions with traffic and drop counters.
    Ls {
        #[arg(long)]
        json: bool,
    },
}

/// The buyer host's MAC on the overlay: locally administered, from its key, so a
/// seller can derive it from the lease's buyer key alone.
pub fn buyer_mac(key: &overlay::PeerKey) -> MacAddr {
    let k = key.as_bytes();
    MacAddr([0x02, k[0], k[1], k[2], k[3], k[4]])
}

struct BuyerState {
    buyer: Buyer,
    listen: SocketAddr,
}

struct Attachment {
    seller: Seller,
    buyer: SocketAddr,
    buyer_key: String,
    guest_ip: Ipv4Addr,
    netns: String,
    // A persistent tap we made: removed on detach.
    created_tap: Option<(NetNs, String)>,
    // Dropped last, after the namespace is gone (see `overlay_leases`).
    _record: Option<LeaseRecord>,
}

#[derive(Default)]
struct State {
    buyer: Option<BuyerState>,
    sellers: BTreeMap<MacAddr, Attachment>,
}

type Shared = Arc<Mutex<State>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

fn mac_arg(s: &str) -> Result<MacAddr> {
    s.parse::<MacAddr>().map_err(Error::from)
}

fn need(node: &Node, role: Role) -> Result<()> {
    if node.role != role {
        return Err(Error::WrongRole {
            needed: role.as_str(),
            actual: node.role.as_str(),
        });
    }
    Ok(())
}

fn overlay_identity(node: &Node) -> overlay::Identity {
    overlay::Identity::from_signing_key(node.identity.signing_key().clone())
}

fn drops_json(d: &overlay::DropCounters) -> Value {
    json!(d.to_map())
}

fn traffic_json(t: &overlay::Traffic) -> Value {
    json!({"rx_frames": t.rx_frames, "rx_bytes": t.rx_bytes, "tx_frames": t.tx_frames, "tx_bytes": t.tx_bytes})
}

fn io_json(c: &shell::IoCounters) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    json!({"write_errors": c.write_errors.load(Relaxed), "offload_errors": c.offload_errors.load(Relaxed)})
}

fn snapshot(st: &State) -> Value {
    let buyer = st.buyer.as_ref().map(|b| {
        let s = b.buyer.stats();
        json!({
            "listen": b.listen.to_string(),
            "udp": b.buyer.local_addr().to_string(),
            "tap": b.buyer.tap_name(),
            "tap_rx_frames": s.tap_rx_frames,
            "tap_tx_frames": s.tap_tx_frames,
            "drops": drops_json(&s.drops),
            "drops_total": drops_json(&s.total_drops()),
            "io": io_json(b.buyer.io_counters()),
            "guests": s.peers.iter().map(|p| json!({
                "peer": hex::encode(p.peer.as_bytes()),
                "mac": p.guest_mac.to_string(),
                "ip": p.guest_ip.to_string(),
                "endpoint": p.endpoint.map(|e| e.to_string()),
                "established": p.established,
                "handshakes": p.handshakes,
                "traffic": traffic_json(&p.traffic),
                "drops": drops_json(&p.drops),
            })).collect::<Vec<_>>(),
        })
    });
    let guests: Vec<Value> = st
        .sellers
        .iter()
        .map(|(mac, a)| {
            let s = a.seller.stats();
            json!({
                "mac": mac.to_string(),
                "ip": a.guest_ip.to_string(),
                "buyer": a.buyer.to_string(),
                "buyer_key": a.buyer_key,
                "netns": a.netns,
                "iface": a.seller.ifname(),
                "udp": a.seller.local_addr().to_string(),
                "established": s.established,
                "handshakes": s.handshakes,
                "traffic": traffic_json(&s.traffic),
                "drops": drops_json(&s.drops),
                "io": io_json(a.seller.io_counters()),
            })
        })
        .collect();
    json!({ "switch": buyer, "guests": guests })
}

#[derive(Deserialize)]
struct AdmitParams {
    key: String,
    mac: String,
    ip: Ipv4Addr,
    listen: SocketAddr,
    tap: String,
    host_ip: Ipv4Addr,
    #[serde(default = "default_busy_poll")]
    busy_poll_us: u64,
}

fn default_busy_poll() -> u64 {
    DEFAULT_BUSY_POLL_US
}

fn busy_poll(us: u64) -> Result<std::time::Duration> {
    if us > MAX_BUSY_POLL_US {
        return Err(Error::BadArg {
            what: "--busy-poll-us",
            reason: format!("at most {MAX_BUSY_POLL_US} (0 turns busy-polling off)"),
        });
    }
    Ok(std::time::Duration::from_micros(us))
}

#[derive(Deserialize)]
struct AttachParams {
    tap: Option<String>,
    iface: Option<String>,
    netns: Option<String>,
    buyer: String,
    buyer_key: String,
    mac: String,
    ip: Ipv4Addr,
    buyer_ip: Ipv4Addr,
    #[serde(default)]
    max_mbit: Option<u64>,
    #[serde(default)]
    max_pps: Option<u64>,
    #[serde(default = "default_busy_poll")]
    busy_poll_us: u64,
}

#[derive(Deserialize)]
struct MacParams {
    mac: String,
}

fn admit(node: &Node, st: &Shared, p: AdmitParams) -> Result<Value> {
    need(node, Role::Buyer)?;
    let key = overlay::parse_peer_key(&p.key)?;
    let mac = mac_arg(&p.mac)?;
    let mut g = lock(st);
    if g.buyer.is_none() {
        let id = overlay_identity(node);
        let mut cfg = BuyerConfig::new(buyer_mac(&id.public_key()));
        cfg.host_ip = p.host_ip;
        cfg.dns = p.host_ip;
        let core = BuyerCore::new(id, cfg)?;
        let mut io = BuyerIoConfig::new(p.listen, &p.tap);
        io.busy_poll = busy_poll(p.busy_poll_us)?;
        let buyer = Buyer::start(core, io)?;
        info!(listen = %p.listen, tap = %p.tap, "overlay switch started");
        g.buyer = Some(BuyerState {
            buyer,
            listen: p.listen,
        });
    }
    let b = g.buyer.as_ref().expect("started above");
    b.buyer.admit(key, mac, p.ip)?;
    info!(peer = %p.key, %mac, ip = %p.ip, "overlay guest admitted");
    Ok(json!({
        "mac": mac.to_string(),
        "ip": p.ip.to_string(),
        "udp": b.buyer.local_addr().to_string(),
        "buyer_key": hex::encode(b.buyer.public_key().as_bytes()),
    }))
}

fn attach(node: &Node, st: &Shared, p: AttachParams) -> Result<Value> {
    need(node, Role::Seller)?;
    let mac = mac_arg(&p.mac)?;
    let buyer_key = overlay::parse_peer_key(&p.buyer_key)?;
    let buyer_addr = p
        .buyer
        .to_socket_addrs()
        .map_err(|e| Error::BadArg {
            what: "--buyer",
            reason: format!("{}: {e} (expected HOST:PORT)", p.buyer),
        })?
        .find(|a| a.is_ipv4())
        .ok_or_else(|| Error::BadArg {
            what: "--buyer",
            reason: format!("{} has no IPv4 address", p.buyer),
        })?;
    if lock(st).sellers.contains_key(&mac) {
        return Err(overlay::Error::AddressConflict(format!(
            "guest MAC {mac} is already attached"
        ))
        .into());
    }
    let mut record = None;
    let (ns, ifname, created_tap, tap) = match (&p.tap, &p.iface) {
        (Some(tap), None) => {
            let nsname = p.netns.clone().unwrap_or_else(|| format!("cs-{tap}"));
            let ns = oio::create_lease_netns(&nsname)?;
            let t = oio::create_guest_tap(&ns, tap, true)?;
            record = Some(LeaseRecord::create(&node.settings.data_dir, &ns, tap)?);
            (ns, tap.clone(), true, Some(t))
        }
        (None, Some(iface)) => {
            let nsname = p.netns.clone().ok_or(Error::BadArg {
                what: "--netns",
                reason: "--iface needs the namespace it lives in".into(),
            })?;
            let ns = NetNs::open(&nsname).map_err(|e| Error::BadArg {
                what: "--netns",
                reason: e.to_string(),
            })?;
            (ns, iface.clone(), false, None)
        }
        _ => {
            return Err(Error::BadArg {
                what: "--tap/--iface",
                reason: "give exactly one of --tap NAME or --netns NS --iface NAME".into(),
            })
        }
    };
    let port = PacketPort::open_in(&ns, &ifname).map_err(shell::os(format!(
        "opening the guest port on {ifname} in netns {}",
        ns.name()
    )))?;
    let mut lease = GuestLease::new(mac, p.ip, buyer_mac(&buyer_key), p.buyer_ip);
    if let Some(m) = p.max_mbit {
        if m == 0 {
            return Err(Error::BadArg {
                what: "--max-mbit",
                reason: "must be positive".into(),
            });
        }
        lease.limits.bytes_per_sec = m * 125_000;
        // Let a 20 ms burst through at full rate.
        lease.limits.byte_burst = lease.limits.byte_burst.max(m * 125_000 / 50);
    }
    if let Some(pps) = p.max_pps {
        if pps == 0 {
            return Err(Error::BadArg {
                what: "--max-pps",
                reason: "must be positive".into(),
            });
        }
        lease.limits.packets_per_sec = pps;
        lease.limits.packet_burst = lease.limits.packet_burst.max(pps / 50);
    }
    let core = SellerCore::new(
        overlay_identity(node),
        SellerConfig::new(buyer_key, buyer_addr, lease, SystemTime::now()),
    )?;
    let udp = shell::bind_udp(SocketAddr::from(([0, 0, 0, 0], 0)))?;
    let nsname = ns.name().to_string();
    // The seller keeps a namespace it created alive; a persistent tap is removed on detach.
    let (keep_ns, created) = if created_tap {
        let again =
            NetNs::open(&nsname).map_err(|e| Error::io("reopening the lease namespace", e))?;
        (Some(ns), Some((again, ifname.clone())))
    } else {
        (None, None)
    };
    // The VMM (later) opens the tap by name; until then nobody holds it.
    drop(tap);
    let io = oio::seller::SellerIoConfig {
        busy_poll: busy_poll(p.busy_poll_us)?,
    };
    let seller = Seller::start_with(core, port, udp, keep_ns, None, io)?;
    info!(%mac, ip = %p.ip, buyer = %buyer_addr, netns = %nsname, iface = %ifname, "overlay guest attached");
    let local = seller.local_addr();
    lock(st).sellers.insert(
        mac,
        Attachment {
            seller,
            buyer: buyer_addr,
            buyer_key: p.buyer_key.clone(),
            guest_ip: p.ip,
            netns: nsname.clone(),
            created_tap: created,
            _record: record,
        },
    );
    Ok(json!({"mac": mac.to_string(), "netns": nsname, "iface": ifname, "udp": local.to_string()}))
}

fn detach(node: &Node, st: &Shared, p: MacParams) -> Result<Value> {
    need(node, Role::Seller)?;
    let mac = mac_arg(&p.mac)?;
    let a = lock(st).sellers.remove(&mac).ok_or_else(|| Error::BadArg {
        what: "--mac",
        reason: format!("no guest {mac} is attached (see `overlay ls`)"),
    })?;
    let Attachment {
        seller,
        created_tap,
        ..
    } = a;
    if let Some((ns, tap)) = &created_tap {
        let _ = oio::remove_guest_tap(ns, tap);
    }
    drop(seller);
    Ok(json!({"mac": mac.to_string(), "detached": true}))
}

fn revoke(node: &Node, st: &Shared, p: MacParams) -> Result<Value> {
    need(node, Role::Buyer)?;
    let mac = mac_arg(&p.mac)?;
    let g = lock(st);
    let found = g
        .buyer
        .as_ref()
        .map(|b| b.buyer.revoke(mac))
        .unwrap_or(false);
    if !found {
        return Err(Error::BadArg {
            what: "--mac",
            reason: format!("no guest {mac} is admitted on this buyer (see `overlay ls`)"),
        });
    }
    Ok(json!({"mac": mac.to_string(), "revoked": true}))
}

/// The overlay as the market drives it: one guest per lease.
#[derive(Clone)]
pub struct OverlayHandle {
    node: Arc<Node>,
    st: Shared,
}

impl OverlayHandle {
    /// Buyer: admit `seller_key` for the guest `mac`/`ip`, starting the switch and
    /// the host tap (with the config file's `[overlay]` settings) on first use.
    pub fn admit(&self, seller_key: &str, mac: MacAddr, ip: Ipv4Addr) -> Result<Value> {
        let a = self.node.settings.overlay.admit(None, None, None, None);
        admit(
            &self.node,
            &self.st,
            AdmitParams {
                key: seller_key.to_string(),
                mac: mac.to_string(),
                ip,
                listen: a.listen,
                tap: a.tap,
                host_ip: a.host_ip,
                busy_poll_us: a.busy_poll_us,
            },
        )
    }

    /// Buyer: remove a guest; false if it was not admitted.
    pub fn revoke(&self, mac: MacAddr) -> bool {
        let g = lock(&self.st);
        g.buyer
            .as_ref()
            .map(|b| b.buyer.revoke(mac))
            .unwrap_or(false)
    }

    /// Buyer: frames received from each admitted guest, by MAC.
    pub fn guest_rx_frames(&self) -> BTreeMap<MacAddr, u64> {
        let g = lock(&self.st);
        let Some(b) = g.buyer.as_ref() else {
            return BTreeMap::new();
        };
        b.buyer
            .stats()
            .peers
            .iter()
            .map(|p| (p.guest_mac, p.traffic.rx_frames))
            .collect()
    }

    /// Seller: plug an existing interface `iface` in the lease namespace `ns` into a
    /// session to the buyer at `buyer` (the lease's addresses).
    #[allow(clippy::too_many_arguments)]
    pub fn attach_iface(
        &self,
        ns: &str,
        iface: &str,
        buyer: SocketAddr,
        buyer_key: &str,
        mac: MacAddr,
        ip: Ipv4Addr,
        buyer_ip: Ipv4Addr,
    ) -> Result<Value> {
        let a = self.node.settings.overlay.attach(None, None, None, None);
        attach(
            &self.node,
            &self.st,
            AttachParams {
                tap: None,
                iface: Some(iface.to_string()),
                netns: Some(ns.to_string()),
                buyer: buyer.to_string(),
                buyer_key: buyer_key.to_string(),
                mac: mac.to_string(),
                ip,
                buyer_ip,
                max_mbit: a.max_mbit,
                max_pps: a.max_pps,
                busy_poll_us: a.busy_poll_us,
            },
        )
    }

    /// Seller: end a guest's session.
    pub fn detach(&self, mac: MacAddr) -> Result<Value> {
        detach(
            &self.node,
            &self.st,
            MacParams {
                mac: mac.to_string(),
            },
        )
    }

    /// Seller: the buyer moved (new address); its sessions follow it.
    pub fn move_buyer(&self, buyer_key: &str, ip: std::net::IpAddr) -> usize {
        let mut g = lock(&self.st);
        let mut n = 0;
        for a in g.sellers.values_mut().filter(|a| a.buyer_key == buyer_key) {
            if a.buyer.ip() != ip {
                let to = SocketAddr::new(ip, a.buyer.port());
                if let Err(e) = a.seller.move_buyer(to) {
                    tracing::warn!(error = %e, "the overlay session cannot follow the buyer");
                    continue;
                }
                info!(from = %a.buyer, %to, "buyer moved: overlay session follows");
                a.buyer = to;
                n += 1;
            }
        }
        n
    }

    /// Seller: bytes and frames a guest sent and received, and its drops.
    pub fn guest_counters(&self, mac: MacAddr) -> Option<Value> {
        let g = lock(&self.st);
        g.sellers.get(&mac).map(|a| {
            let s = a.seller.stats();
            json!({"traffic": traffic_json(&s.traffic), "drops": drops_json(&s.drops)})
        })
    }
}

/// Register `overlay.*` methods and the `overlay` status section.
pub fn register(router: &mut Router, node: Arc<Node>) -> OverlayHandle {
    let st: Shared = Arc::new(Mutex::new(State::default()));
    let handle = OverlayHandle {
        node: node.clone(),
        st: st.clone(),
    };
    macro_rules! method {
        ($name:literal, $f:ident, $P:ty) => {{
            let (node, st) = (node.clone(), st.clone());
            router.method($name, move |params, _| {
                let (node, st) = (node.clone(), st.clone());
                async move {
                    let p: $P = parse_params(params)?;
                    blocking(move || $f(&node, &st, p)).await
                }
            });
        }};
    }
    method!("overlay.admit", admit, AdmitParams);
    method!("overlay.attach", attach, AttachParams);
    method!("overlay.detach", detach, MacParams);
    method!("overlay.revoke", revoke, MacParams);
    {
        let st = st.clone();
        router.method("overlay.ls", move |_, _| {
            let st = st.clone();
            async move { Ok(snapshot(&lock(&st))) }
        });
    }
    router.status_section("overlay", move || snapshot(&lock(&st)));
    handle
}

/// Client side of `cpushare-node overlay ...`.
pub fn run_cli(settings: &Settings, cmd: OverlayCommand) -> Result<ExitCode> {
    let (method, params) = match &cmd {
        OverlayCommand::Admit {
            key,
            mac,
            ip,
            listen,
            tap,
            host_ip,
            busy_poll_us,
        } => {
            overlay::parse_peer_key(key)?;
            mac_arg(mac)?;
            let a = settings
                .overlay
                .admit(*listen, tap.clone(), *host_ip, *busy_poll_us);
            (
                "overlay.admit",
                json!({"key": key, "mac": mac, "ip": ip, "listen": a.listen, "tap": a.tap, "host_ip": a.host_ip, "busy_poll_us": a.busy_poll_us}),
            )
        }
        OverlayCommand::Revoke { mac } => {
            mac_arg(mac)?;
            ("overlay.revoke", json!({ "mac": mac }))
        }
        OverlayCommand::Attach {
            tap,
            iface,
            netns,
            buyer,
            buyer_key,
            mac,
            ip,
            buyer_ip,
            max_mbit,
            max_pps,
            busy_poll_us,
        } => {
            overlay::parse_peer_key(buyer_key)?;
            mac_arg(mac)?;
            if tap.is_none() && iface.is_none() {
                return Err(Error::BadArg {
                    what: "--tap/--iface",
                    reason: "give --tap NAME, or --netns NS --iface NAME".into(),
                });
            }
            let a = settings
                .overlay
                .attach(*buyer_ip, *max_mbit, *max_pps, *busy_poll_us);
            (
                "overlay.attach",
                json!({"tap": tap, "iface": iface, "netns": netns, "buyer": buyer, "buyer_key": buyer_key, "mac": mac, "ip": ip, "buyer_ip": a.buyer_ip, "max_mbit": a.max_mbit, "max_pps": a.max_pps, "busy_poll_us": a.busy_poll_us}),
            )
        }
        OverlayCommand::Detach { mac } => {
            mac_arg(mac)?;
            ("overlay.detach", json!({ "mac": mac }))
        }
        OverlayCommand::Ls { .. } => ("overlay.ls", Value::Null),
    };
    let mut client = Client::connect(&settings.control_socket(), &settings.data_dir)?;
    let v = client.call(method, params, |_| {})?;
    match cmd {
        OverlayCommand::Ls { json: false } => print_ls(&v),
        _ => println!("{}", serde_json::to_string(&v).expect("json")),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_ls(v: &Value) {
    let s = |v: &Value| {
        v.as_str()
            .map(str::to_string)
            .unwrap_or_else(|| v.to_string())
    };
    if let Some(sw) = v.get("switch").filter(|x| !x.is_null()) {
        println!(
            "switch on {} tap {}  drops {}",
            s(&sw["udp"]),
            s(&sw["tap"]),
            sw["drops"]
        );
        for g in sw["guests"].as_array().into_iter().flatten() {
            println!(
                "  {} {:<15} peer {}…  {}  endpoint {}  rx {} tx {} frames  drops {}",
                s(&g["mac"]),
                s(&g["ip"]),
                &s(&g["peer"])[..16.min(s(&g["peer"]).len())],
                if g["established"] == true {
                    "up"
                } else {
                    "down"
                },
                s(&g["endpoint"]),
                g["traffic"]["rx_frames"],
                g["traffic"]["tx_frames"],
                g["drops"]
            );
        }
    }
    let guests = v["guests"].as_array().cloned().unwrap_or_default();
    for g in &guests {
        println!(
            "guest {} {:<15} {}:{}  buyer {}  {}  rx {} tx {} frames  drops {}",
            s(&g["mac"]),
            s(&g["ip"]),
            s(&g["netns"]),
            s(&g["iface"]),
            s(&g["buyer"]),
            if g["established"] == true {
                "up"
            } else {
                "down"
            },
            g["traffic"]["rx_frames"],
            g["traffic"]["tx_frames"],
            g["drops"]
        );
    }
    if v["switch"].is_null() && guests.is_empty() {
        println!("no overlay sessions");
    }
}
