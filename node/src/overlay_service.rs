//! The overlay inside the daemon, driven by control methods (`overlay.*`) so it is
//! usable before leases exist; the lease logic will call the same functions.
//!
//! Buyer: `overlay admit` starts the switch (one UDP socket, the host tap) on first
//! use and admits a seller key for a guest MAC/IP. Seller: `overlay attach` plugs a
//! guest port (a new tap in a new lease namespace, or an existing interface in an
//! existing namespace) into a session to a buyer. `overlay ls` and the `overlay`
//! section of `status` show sessions, traffic and drop counters by reason.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use overlay::io::{self as oio, shell, Buyer, BuyerIoConfig, NetNs, PacketPort, Seller};
use overlay::{Admission, BuyerConfig, BuyerCore, GuestLease, MacAddr, SellerConfig, SellerCore};
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::info;

use crate::cli::OverlayCommand;
use crate::config::{Settings, DEFAULT_BUSY_POLL_US};
use crate::control::{blocking, parse_params, Client, Need, Router};
use crate::domain::Role;
use crate::error::{Error, Result};
use crate::node::Node;
use crate::overlay_leases::LeaseRecord;

/// Largest busy-poll budget accepted (a spin is meant to cover a LAN round trip).
const MAX_BUSY_POLL_US: u64 = 100_000;

/// The buyer host's MAC on the overlay: locally administered, from its key, so a
/// seller can derive it from the lease's buyer key alone.
pub fn buyer_mac(key: &overlay::PeerKey) -> MacAddr {
    let k = key.as_bytes();
    MacAddr([0x02, k[0], k[1], k[2], k[3], k[4]])
}

struct BuyerState {
    buyer: Buyer,
    listen: SocketAddr,
    host_ip: Ipv4Addr,
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
    /// Empty lease namespaces from `netns-add`, by name, until a guest attaches.
    spare: BTreeMap<String, (NetNs, LeaseRecord)>,
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
    /// IPv6 allowed, and the guest's own IPv6 address (off when absent).
    #[serde(default)]
    ipv6: bool,
    #[serde(default)]
    ipv6_addr: Option<Ipv6Addr>,
}

/// `--ipv6-addr` needs `--ipv6` and must be a unicast address the guest can own.
fn ipv6_addr(allowed: bool, a: Option<Ipv6Addr>) -> Result<Option<Ipv6Addr>> {
    match a {
        Some(_) if !allowed => Err(bad("--ipv6-addr", "needs --ipv6")),
        Some(a) if a.is_unspecified() || a.is_loopback() || a.is_multicast() => {
            Err(bad("--ipv6-addr", format!("{a} is not a unicast address")))
        }
        a => Ok(a),
    }
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
    /// IPv6 allowed, and the guest's own IPv6 address (off when absent).
    #[serde(default)]
    ipv6: bool,
    #[serde(default)]
    ipv6_addr: Option<Ipv6Addr>,
}

#[derive(Deserialize)]
struct MacParams {
    mac: String,
}

fn admit(node: &Node, st: &Shared, p: AdmitParams) -> Result<Value> {
    need(node, Role::Buyer)?;
    let key = overlay::parse_peer_key(&p.key)?;
    let mac = unicast_mac("--mac", &p.mac)?;
    guest_ip("--ip", p.ip)?;
    ipv6_addr(p.ipv6, p.ipv6_addr)?;
    let poll = busy_poll(p.busy_poll_us)?;
    let mut g = lock(st);
    if g.buyer.is_none() {
        let id = overlay_identity(node);
        let mut cfg = BuyerConfig::new(buyer_mac(&id.public_key()));
        cfg.host_ip = p.host_ip;
        cfg.dns = p.host_ip;
        let core = BuyerCore::new(id, cfg)?;
        let mut io = BuyerIoConfig::new(p.listen, &p.tap);
        io.busy_poll = poll;
        let buyer = Buyer::start(core, io)?;
        info!(listen = %p.listen, tap = %p.tap, "overlay switch started");
        g.buyer = Some(BuyerState {
            buyer,
            listen: p.listen,
            host_ip: p.host_ip,
        });
    }
    let b = g.buyer.as_ref().expect("started above");
    b.buyer.admit_guest(Admission {
        allow_ipv6: p.ipv6,
        guest_ipv6: p.ipv6_addr,
        ..Admission::new(key, mac, p.ip)
    })?;
    info!(peer = %p.key, %mac, ip = %p.ip, "overlay guest admitted");
    let udp = b.buyer.local_addr();
    let endpoints = seller_endpoints(udp, b.buyer.tap_name());
    Ok(json!({
        "mac": mac.to_string(),
        "ip": p.ip.to_string(),
        "udp": udp.to_string(),
        "seller_endpoints": endpoints.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
        "buyer_key": hex::encode(b.buyer.public_key().as_bytes()),
        "buyer_ip": b.host_ip.to_string(),
        "ipv6": p.ipv6,
        "ipv6_addr": p.ipv6_addr.map(|a| a.to_string()),
    }))
}

/// The addresses a seller can reach the switch's UDP socket `udp` at. A socket bound
/// to 0.0.0.0 is reachable at every address of this host (this network namespace)
/// but the overlay's own tap; loopback only when there is nothing else.
fn seller_endpoints(udp: SocketAddr, overlay_tap: &str) -> Vec<SocketAddr> {
    if !udp.ip().is_unspecified() {
        return vec![udp];
    }
    let mut out = Vec::new();
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            if a.interface_name == overlay_tap {
                continue;
            }
            let Some(ip) = a
                .address
                .as_ref()
                .and_then(|x| x.as_sockaddr_in())
                .map(|x| x.ip())
            else {
                continue;
            };
            if ip.is_loopback() || ip.is_link_local() || ip.is_unspecified() {
                continue;
            }
            let e = SocketAddr::from((ip, udp.port()));
            if !out.contains(&e) {
                out.push(e);
            }
        }
    }
    if out.is_empty() {
        out.push(SocketAddr::from((Ipv4Addr::LOCALHOST, udp.port())));
    }
    out
}

fn bad(what: &'static str, reason: impl Into<String>) -> Error {
    Error::BadArg {
        what,
        reason: reason.into(),
    }
}

/// A guest's (or the buyer host's) MAC: unicast, not all zeros.
fn unicast_mac(what: &'static str, s: &str) -> Result<MacAddr> {
    let mac = mac_arg(s)?;
    if mac.is_multicast() || mac.0 == [0; 6] {
        return Err(bad(what, format!("{mac} is not a unicast MAC address")));
    }
    Ok(mac)
}

/// An overlay address a guest or host can have.
fn guest_ip(what: &'static str, ip: Ipv4Addr) -> Result<()> {
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback() {
        return Err(bad(what, format!("{ip} cannot be a host's address")));
    }
    Ok(())
}

/// Names as `ip netns` takes them (the rule overlay::io::NetNs applies).
fn check_netns_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !ok {
        return Err(bad(
            "--netns",
            format!("{name:?} is not a namespace name (1-64 letters, digits, '-', '_', '.', not starting with '.')"),
        ));
    }
    Ok(())
}

/// Interface names as the kernel takes them (IFNAMSIZ).
fn check_ifname(what: &'static str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if !ok {
        return Err(bad(
            what,
            format!("{name:?} is not an interface name (1-15 characters, no '/', ':' or spaces)"),
        ));
    }
    Ok(())
}

/// Everything `attach` needs, checked, before anything is created.
struct AttachPlan {
    mac: MacAddr,
    buyer_addr: SocketAddr,
    core: SellerCore,
    io: oio::seller::SellerIoConfig,
    port: PortPlan,
}

enum PortPlan {
    /// Create lease namespace `netns` holding a new tap `tap`.
    NewTap { netns: String, tap: String },
    /// Use `iface` in `netns`, a lease namespace this node made.
    Iface { netns: String, iface: String },
}

fn plan_attach(node: &Node, st: &Shared, p: &AttachParams) -> Result<AttachPlan> {
    let mac = unicast_mac("--mac", &p.mac)?;
    guest_ip("--ip", p.ip)?;
    guest_ip("--buyer-ip", p.buyer_ip)?;
    if p.buyer_ip == p.ip {
        return Err(bad(
            "--buyer-ip",
            "the buyer host's and the guest's overlay addresses must differ",
        ));
    }
    let buyer_key = overlay::parse_peer_key(&p.buyer_key)?;
    let buyer_addr = p
        .buyer
        .to_socket_addrs()
        .map_err(|e| bad("--buyer", format!("{}: {e} (expected HOST:PORT)", p.buyer)))?
        .find(|a| a.is_ipv4())
        .ok_or_else(|| bad("--buyer", format!("{} has no IPv4 address", p.buyer)))?;
    if buyer_addr.ip().is_unspecified() || buyer_addr.port() == 0 {
        return Err(bad(
            "--buyer",
            format!("{buyer_addr} is not an address to send to: use the address `overlay admit` printed on the buyer"),
        ));
    }
    let mut lease = GuestLease::new(mac, p.ip, buyer_mac(&buyer_key), p.buyer_ip);
    lease.allow_ipv6 = p.ipv6;
    lease.guest_ipv6 = ipv6_addr(p.ipv6, p.ipv6_addr)?;
    if let Some(m) = p.max_mbit {
        if m == 0 || m > 1_000_000 {
            return Err(bad("--max-mbit", "must be 1..=1000000"));
        }
        lease.limits.bytes_per_sec = m * 125_000;
        // Let a 20 ms burst through at full rate.
        lease.limits.byte_burst = lease.limits.byte_burst.max(m * 125_000 / 50);
    }
    if let Some(pps) = p.max_pps {
        if pps == 0 || pps > 100_000_000 {
            return Err(bad("--max-pps", "must be 1..=100000000"));
        }
        lease.limits.packets_per_sec = pps;
        lease.limits.packet_burst = lease.limits.packet_burst.max(pps / 50);
    }
    let io = oio::seller::SellerIoConfig {
        busy_poll: busy_poll(p.busy_poll_us)?,
    };
    {
        let g = lock(st);
        if g.sellers.contains_key(&mac) {
            return Err(overlay::Error::AddressConflict(format!(
                "guest MAC {mac} is already attached"
            ))
            .into());
        }
        if let Some((m, _)) = g.sellers.iter().find(|(_, a)| a.guest_ip == p.ip) {
            return Err(overlay::Error::AddressConflict(format!(
                "guest IP {} is already attached (guest {m})",
                p.ip
            ))
            .into());
        }
    }
    let port = match (&p.tap, &p.iface) {
        (Some(tap), None) => {
            check_ifname("--tap", tap)?;
            let netns = p.netns.clone().unwrap_or_else(|| format!("cs-{tap}"));
            check_netns_name(&netns)?;
            crate::overlay_leases::check_visible()?;
            if std::path::Path::new("/run/netns").join(&netns).exists() {
                return Err(overlay::Error::AddressConflict(format!(
                    "network namespace {netns:?} already exists (another lease, or a leftover: `ip netns del {netns}`)"
                ))
                .into());
            }
            PortPlan::NewTap {
                netns,
                tap: tap.clone(),
            }
        }
        (None, Some(iface)) => {
            check_ifname("--iface", iface)?;
            let netns = p
                .netns
                .clone()
                .ok_or_else(|| bad("--netns", "--iface needs the lease namespace it lives in"))?;
            check_netns_name(&netns)?;
            if !crate::overlay_leases::is_lease_netns(&node.settings.data_dir, &netns) {
                return Err(bad(
                    "--netns",
                    format!("{netns:?} is not a lease namespace this node created: the guest port reads and writes every frame of the interface, so it only takes one in a namespace made for the lease (`overlay netns-add {netns}`, or `attach --tap`)"),
                ));
            }
            let ns = NetNs::open(&netns).map_err(|e| bad("--netns", e.to_string()))?;
            let name = iface.clone();
            ns.run(move || {
                nix::net::if_::if_nametoindex(name.as_str()).map_err(std::io::Error::from)
            })
            .map_err(|_| {
                bad(
                    "--iface",
                    format!("no interface {iface:?} in namespace {netns:?}"),
                )
            })?;
            if lock(st)
                .sellers
                .values()
                .any(|a| a.netns == netns && a.seller.ifname() == iface)
            {
                return Err(overlay::Error::AddressConflict(format!(
                    "{iface} in {netns} already carries a guest"
                ))
                .into());
            }
            PortPlan::Iface {
                netns,
                iface: iface.clone(),
            }
        }
        _ => {
            return Err(bad(
                "--tap/--iface",
                "give exactly one of --tap NAME or --netns NS --iface NAME",
            ))
        }
    };
    let core = SellerCore::new(
        overlay_identity(node),
        SellerConfig::new(buyer_key, buyer_addr, lease, SystemTime::now()),
    )?;
    Ok(AttachPlan {
        mac,
        buyer_addr,
        core,
        io,
        port,
    })
}

fn attach(node: &Node, st: &Shared, p: AttachParams) -> Result<Value> {
    need(node, Role::Seller)?;
    let plan = plan_attach(node, st, &p)?;
    let AttachPlan {
        mac,
        buyer_addr,
        core,
        io,
        port,
    } = plan;
    let udp = shell::bind_udp(SocketAddr::from(([0, 0, 0, 0], 0)))?;
    // From here on things are created; each is removed again if a later step fails
    // (an owned NetNs deletes its namespace when dropped, taking its tap along).
    let (ns, ifname, created_tap, record) = match port {
        PortPlan::NewTap { netns, tap } => {
            let ns = oio::create_lease_netns(&netns)?;
            let t = oio::create_guest_tap(&ns, &tap, true)?;
            let record = LeaseRecord::create(&node.settings.data_dir, &ns, &tap)?;
            // The VMM (later) opens the tap by name; until then nobody holds it.
            drop(t);
            (ns, tap, true, Some(record))
        }
        PortPlan::Iface { netns, iface } => {
            // A namespace from `netns-add` goes with the guest; a lease's stays its own.
            match lock(st).spare.remove(&netns) {
                Some((ns, record)) => (ns, iface, false, Some(record)),
                None => (
                    NetNs::open(&netns).map_err(|e| bad("--netns", e.to_string()))?,
                    iface,
                    false,
                    None,
                ),
            }
        }
    };
    let port = PacketPort::open_in(&ns, &ifname).map_err(shell::os(format!(
        "opening the guest port on {ifname} in netns {}",
        ns.name()
    )))?;
    let nsname = ns.name().to_string();
    // The seller keeps a namespace it created alive; a persistent tap is removed on detach.
    let (keep_ns, created) = if ns.owned() {
        let again =
            NetNs::open(&nsname).map_err(|e| Error::io("reopening the lease namespace", e))?;
        (Some(ns), created_tap.then(|| (again, ifname.clone())))
    } else {
        (None, None)
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
    Ok(
        json!({"mac": mac.to_string(), "netns": nsname, "iface": ifname, "tap": created_tap, "udp": local.to_string()}),
    )
}

#[derive(Deserialize)]
struct NetnsParams {
    name: String,
}

/// An empty lease namespace, held until a guest attached in it is detached.
fn netns_add(node: &Node, st: &Shared, p: NetnsParams) -> Result<Value> {
    need(node, Role::Seller)?;
    check_netns_name(&p.name)?;
    crate::overlay_leases::check_visible()?;
    let ns = oio::create_lease_netns(&p.name)?;
    let record = LeaseRecord::create(&node.settings.data_dir, &ns, "")?;
    info!(netns = %p.name, "empty lease namespace created");
    lock(st).spare.insert(p.name.clone(), (ns, record));
    Ok(json!({ "netns": p.name }))
}

fn detach(node: &Node, st: &Shared, p: MacParams) -> Result<Value> {
    need(node, Role::Seller)?;
    let mac = mac_arg(&p.mac)?;
    let a = lock(st).sellers.remove(&mac).ok_or_else(|| {
        bad(
            "--mac",
            format!("no guest {mac} is attached (see `overlay ls`)"),
        )
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
                ipv6: false,
                ipv6_addr: None,
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
                ipv6: false,
                ipv6_addr: None,
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
    method!("overlay.netns_add", netns_add, NetnsParams);
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
    // Every flag is checked here first: a mistake costs no round trip and creates
    // nothing (the daemon checks again, before it creates anything).
    let (method, params, need) = match &cmd {
        OverlayCommand::Admit {
            key,
            mac,
            ip,
            udp_listen,
            tap,
            host_ip,
            busy_poll_us,
            ipv6,
            ipv6_addr: v6,
            ..
        } => {
            overlay::parse_peer_key(key)?;
            unicast_mac("--mac", mac)?;
            guest_ip("--ip", *ip)?;
            ipv6_addr(*ipv6, *v6)?;
            let a = settings
                .overlay
                .admit(*udp_listen, tap.clone(), *host_ip, *busy_poll_us);
            check_ifname("--tap", &a.tap)?;
            guest_ip("--host-ip", a.host_ip)?;
            busy_poll(a.busy_poll_us)?;
            (
                "overlay.admit",
                json!({"key": key, "mac": mac, "ip": ip, "listen": a.listen, "tap": a.tap, "host_ip": a.host_ip, "busy_poll_us": a.busy_poll_us, "ipv6": ipv6, "ipv6_addr": v6}),
                Need::Buyer,
            )
        }
        OverlayCommand::Revoke { mac } => {
            mac_arg(mac)?;
            ("overlay.revoke", json!({ "mac": mac }), Need::Buyer)
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
            ipv6,
            ipv6_addr: v6,
            ..
        } => {
            overlay::parse_peer_key(buyer_key)?;
            ipv6_addr(*ipv6, *v6)?;
            unicast_mac("--mac", mac)?;
            guest_ip("--ip", *ip)?;
            match (tap, iface) {
                (Some(t), None) => check_ifname("--tap", t)?,
                (None, Some(i)) => check_ifname("--iface", i)?,
                _ => {
                    return Err(bad(
                        "--tap/--iface",
                        "give --tap NAME, or --netns NS --iface NAME",
                    ))
                }
            }
            if let Some(n) = netns {
                check_netns_name(n)?;
            }
            let a = settings
                .overlay
                .attach(*buyer_ip, *max_mbit, *max_pps, *busy_poll_us);
            guest_ip("--buyer-ip", a.buyer_ip)?;
            busy_poll(a.busy_poll_us)?;
            (
                "overlay.attach",
                json!({"tap": tap, "iface": iface, "netns": netns, "buyer": buyer, "buyer_key": buyer_key, "mac": mac, "ip": ip, "buyer_ip": a.buyer_ip, "max_mbit": a.max_mbit, "max_pps": a.max_pps, "busy_poll_us": a.busy_poll_us, "ipv6": ipv6, "ipv6_addr": v6}),
                Need::Seller,
            )
        }
        OverlayCommand::NetnsAdd { name } => {
            check_netns_name(name)?;
            ("overlay.netns_add", json!({ "name": name }), Need::Seller)
        }
        OverlayCommand::Detach { mac } => {
            mac_arg(mac)?;
            ("overlay.detach", json!({ "mac": mac }), Need::Seller)
        }
        OverlayCommand::Ls { .. } => ("overlay.ls", Value::Null, Need::Any),
    };
    let mut client = Client::connect_as(&settings.control_socket(), &settings.data_dir, need)?;
    let v = client.call(method, params, |_| {})?;
    match cmd {
        OverlayCommand::Ls { json: false } => print_ls(&v),
        OverlayCommand::Admit { json: false, .. } => print_admit(&v),
        OverlayCommand::Attach { json: false, .. } => print_attach(&v),
        _ => println!("{}", serde_json::to_string(&v).expect("json")),
    }
    Ok(ExitCode::SUCCESS)
}

fn text(v: &Value) -> String {
    v.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
}

/// What the seller needs to attach the guest: the buyer's reachable address (not
/// the 0.0.0.0 the switch binds), its key and its overlay address.
fn print_admit(v: &Value) {
    let endpoints: Vec<String> = v["seller_endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(text)
        .collect();
    let first = endpoints
        .first()
        .cloned()
        .unwrap_or_else(|| text(&v["udp"]));
    println!(
        "admitted guest {} ({}); the switch listens on UDP {}",
        text(&v["mac"]),
        text(&v["ip"]),
        text(&v["udp"])
    );
    println!("on the seller, attach the guest with:");
    let v6 = match (v["ipv6"].as_bool(), v["ipv6_addr"].as_str()) {
        (Some(true), Some(a)) => format!(" --ipv6 --ipv6-addr {a}"),
        (Some(true), None) => " --ipv6".to_string(),
        _ => String::new(),
    };
    println!(
        "  cpushare-node overlay attach --tap TAP --buyer {first} --buyer-key {} --buyer-ip {} --mac {} --ip {}{v6}",
        text(&v["buyer_key"]),
        text(&v["buyer_ip"]),
        text(&v["mac"]),
        text(&v["ip"])
    );
    if endpoints.len() > 1 {
        println!(
            "(--buyer: whichever of {} the seller reaches)",
            endpoints.join(", ")
        );
    }
}

fn print_attach(v: &Value) {
    println!(
        "attached guest {} on {} in lease namespace {}",
        text(&v["mac"]),
        text(&v["iface"]),
        text(&v["netns"])
    );
    if v["tap"] == true {
        println!(
            "start its VMM with: cpushare-node vm run --tap {} --mac {} ... (opens the tap in {})",
            text(&v["iface"]),
            text(&v["mac"]),
            text(&v["netns"])
        );
    }
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
                "  {} {:<15} peer {}…  {}  endpoint {}  frames from guest {} to guest {}  drops {}",
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
            "guest {} {:<15} {}:{}  buyer {}  {}  frames to guest {} from guest {}  drops {}",
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
