//! Configuration of the buyer and seller cores (all plain data, from the lease or CLI).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, SystemTime};

use crate::wire::{DATA_HEADER_LEN, TAG_LEN};
use crate::{Error, MacAddr, PeerKey};

/// Bytes the overlay adds to a guest's Ethernet frame inside the UDP payload.
pub const OVERLAY_OVERHEAD: usize = DATA_HEADER_LEN + TAG_LEN;

/// The largest guest interface MTU whose full frames (plus Ethernet header, overlay
/// header, AEAD tag, UDP and outer IP header) fit a path of `path_mtu` bytes without
/// IP fragmentation. `ipv6_underlay` accounts for a 40-byte outer header.
pub const fn guest_mtu_for_path(path_mtu: u16, ipv6_underlay: bool) -> u16 {
    let ip = if ipv6_underlay { 40 } else { 20 };
    path_mtu - ip - 8 - OVERLAY_OVERHEAD as u16 - crate::eth::ETH_HDR as u16
}

/// Default guest MTU: fits a 1500-byte path over IPv4 and IPv6 underlays (1494 bytes on
/// the wire over IPv6, 1474 over IPv4).
pub const DEFAULT_GUEST_MTU: u16 = 1400;

/// Session timers, WireGuard-like.
#[derive(Clone, Debug)]
pub struct Timers {
    /// The initiator starts a new handshake when the current keys are this old.
    pub rekey_after_time: Duration,
    /// Keys this old are neither used nor accepted.
    pub reject_after_time: Duration,
    /// The initiator re-handshakes after sending or receiving this many messages.
    pub rekey_after_messages: u64,
    /// Keys that protected this many messages are retired.
    pub reject_after_messages: u64,
    /// Send an empty keepalive when nothing was sent for this long (keeps NAT open).
    /// The seller re-handshakes when it heard nothing for twice this long (the buyer
    /// may have restarted), so both sides should use the same value.
    pub keepalive_interval: Duration,
    /// Resend a handshake initiation that got no response after this long.
    pub handshake_retry: Duration,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            rekey_after_time: Duration::from_secs(120),
            reject_after_time: Duration::from_secs(180),
            rekey_after_messages: 1 << 60,
            reject_after_messages: u64::MAX - (1 << 13),
            keepalive_interval: Duration::from_secs(15),
            handshake_retry: Duration::from_secs(5),
        }
    }
}

impl Timers {
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.rekey_after_time >= self.reject_after_time {
            return Err(Error::InvalidConfig(
                "rekey_after_time must be shorter than reject_after_time".into(),
            ));
        }
        if self.rekey_after_messages >= self.reject_after_messages {
            return Err(Error::InvalidConfig(
                "rekey_after_messages must be below reject_after_messages".into(),
            ));
        }
        if self.keepalive_interval.is_zero() || self.handshake_retry.is_zero() {
            return Err(Error::InvalidConfig(
                "keepalive_interval and handshake_retry must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// Per-guest rate limits enforced by the seller's egress filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimits {
    /// Sustained bytes per second a guest may send (frame bytes).
    pub bytes_per_sec: u64,
    /// Byte bucket size.
    pub byte_burst: u64,
    /// Sustained frames per second.
    pub packets_per_sec: u64,
    /// Frame bucket size.
    pub packet_burst: u64,
    /// Sustained broadcast/multicast frames per second.
    pub broadcast_per_sec: u64,
    /// Broadcast/multicast bucket size.
    pub broadcast_burst: u64,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            bytes_per_sec: 250_000_000,
            byte_burst: 4_000_000,
            packets_per_sec: 200_000,
            packet_burst: 4_000,
            broadcast_per_sec: 50,
            broadcast_burst: 100,
        }
    }
}

/// What the seller knows about one guest from its lease: the addresses the guest may
/// use and what it may send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestLease {
    /// The guest NIC's MAC (fixed by the lease).
    pub guest_mac: MacAddr,
    /// The guest's IPv4 address (handed out by the buyer's DHCP).
    pub guest_ip: Ipv4Addr,
    /// The buyer host's MAC on the overlay.
    pub buyer_mac: MacAddr,
    /// The buyer host's IPv4 address on the overlay (router, DNS, DHCP server).
    pub buyer_ip: Ipv4Addr,
    /// Guest interface MTU (IP packet size); frames over `mtu + 14` are dropped.
    pub mtu: u16,
    /// Whether the guest may send IPv6 at all (off by default). When on, its IPv6
    /// source must be its link-local address (derived from `guest_mac`) or
    /// `guest_ipv6`; extension headers other than a leading hop-by-hop header of
    /// padding and router alert, and one fragment header, are dropped.
    pub allow_ipv6: bool,
    /// The guest's global IPv6 address, if the lease gives it one.
    pub guest_ipv6: Option<Ipv6Addr>,
    /// Rate limits.
    pub limits: RateLimits,
}

impl GuestLease {
    /// A lease with default MTU and limits, IPv6 off.
    pub fn new(
        guest_mac: MacAddr,
        guest_ip: Ipv4Addr,
        buyer_mac: MacAddr,
        buyer_ip: Ipv4Addr,
    ) -> GuestLease {
        GuestLease {
            guest_mac,
            guest_ip,
            buyer_mac,
            buyer_ip,
            mtu: DEFAULT_GUEST_MTU,
            allow_ipv6: false,
            guest_ipv6: None,
            limits: RateLimits::default(),
        }
    }

    /// The IPv6 addresses this lease lets the guest send from.
    pub fn ipv6_sources(&self) -> Ipv6Sources {
        Ipv6Sources {
            link_local: self.guest_mac.ipv6_link_local(),
            global: self.guest_ipv6,
        }
    }
}

/// The IPv6 source addresses a guest may use: the link-local address derived from
/// its MAC and the lease's own address, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Sources {
    /// fe80:: plus the modified EUI-64 of the guest's MAC.
    pub link_local: Ipv6Addr,
    /// The lease's IPv6 address.
    pub global: Option<Ipv6Addr>,
}

impl Ipv6Sources {
    /// Whether `a` is one of them.
    pub fn contains(&self, a: Ipv6Addr) -> bool {
        a == self.link_local || self.global == Some(a)
    }
}

/// A guest admitted on the buyer: the seller key that carries it and the addresses
/// its lease gives it. IPv6 is off unless the lease allows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admission {
    /// The seller's ed25519 key.
    pub peer: PeerKey,
    /// The guest NIC's MAC.
    pub guest_mac: MacAddr,
    /// The IPv4 address the buyer's DHCP hands the guest.
    pub guest_ip: Ipv4Addr,
    /// Whether the guest may send IPv6 (checked like the seller's filter does).
    pub allow_ipv6: bool,
    /// The guest's global IPv6 address, if any.
    pub guest_ipv6: Option<Ipv6Addr>,
}

impl Admission {
    /// An IPv4-only admission.
    pub fn new(peer: PeerKey, guest_mac: MacAddr, guest_ip: Ipv4Addr) -> Admission {
        Admission {
            peer,
            guest_mac,
            guest_ip,
            allow_ipv6: false,
            guest_ipv6: None,
        }
    }
}

/// Handshake rate limiting on the responder (the buyer).
#[derive(Clone, Debug)]
pub struct HandshakeLimits {
    /// Sustained handshake initiations per second from one source IP.
    pub per_source_per_sec: u32,
    /// Burst per source IP.
    pub per_source_burst: u32,
    /// Sustained handshake initiations per second over all sources.
    pub global_per_sec: u32,
    /// Global burst.
    pub global_burst: u32,
    /// How many source IPs are tracked at most (oldest forgotten first).
    pub max_tracked_sources: usize,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        HandshakeLimits {
            per_source_per_sec: 5,
            per_source_burst: 10,
            global_per_sec: 500,
            global_burst: 200,
            max_tracked_sources: 4096,
        }
    }
}

/// Configuration of a buyer's switch.
#[derive(Clone, Debug)]
pub struct BuyerConfig {
    /// MAC of the buyer's host tap (its port on the switch, source of DHCP replies).
    pub host_mac: MacAddr,
    /// The buyer host's overlay address: router, DNS and DHCP server for guests.
    pub host_ip: Ipv4Addr,
    /// Overlay netmask handed to guests.
    pub netmask: Ipv4Addr,
    /// DNS server handed to guests (normally `host_ip`).
    pub dns: Ipv4Addr,
    /// Interface MTU handed to guests (DHCP option 26).
    pub guest_mtu: u16,
    /// DHCP lease time.
    pub dhcp_lease_time: Duration,
    /// Learned MAC table entries expire after this long without traffic.
    pub mac_aging: Duration,
    /// Session timers.
    pub timers: Timers,
    /// Handshake rate limiting.
    pub handshake_limits: HandshakeLimits,
}

impl BuyerConfig {
    /// Defaults for a buyer with host address 10.77.0.1/16.
    pub fn new(host_mac: MacAddr) -> BuyerConfig {
        BuyerConfig {
            host_mac,
            host_ip: Ipv4Addr::new(10, 77, 0, 1),
            netmask: Ipv4Addr::new(255, 255, 0, 0),
            dns: Ipv4Addr::new(10, 77, 0, 1),
            guest_mtu: DEFAULT_GUEST_MTU,
            dhcp_lease_time: Duration::from_secs(3600),
            mac_aging: Duration::from_secs(300),
            timers: Timers::default(),
            handshake_limits: HandshakeLimits::default(),
        }
    }
}

/// Configuration of one seller-side guest session.
#[derive(Clone, Debug)]
pub struct SellerConfig {
    /// The buyer's ed25519 key (from the lease).
    pub buyer: PeerKey,
    /// The buyer's UDP endpoint.
    pub buyer_addr: SocketAddr,
    /// The guest's lease (addresses, MTU, limits).
    pub lease: GuestLease,
    /// Session timers.
    pub timers: Timers,
    /// Guest frames kept while the first handshake is in flight.
    pub pending_frames: usize,
    /// Wall-clock time when the core is created (the I/O shell passes
    /// `SystemTime::now()`). Handshake initiations carry it, advanced by the `now`
    /// passed in, so the buyer can refuse replayed initiations.
    pub wall_clock: SystemTime,
}

impl SellerConfig {
    /// Defaults for a guest session to `buyer` at `buyer_addr`; `wall_clock` is
    /// `SystemTime::now()` at the time the core is built.
    pub fn new(
        buyer: PeerKey,
        buyer_addr: SocketAddr,
        lease: GuestLease,
        wall_clock: SystemTime,
    ) -> SellerConfig {
        SellerConfig {
            buyer,
            buyer_addr,
            lease,
            timers: Timers::default(),
            pending_frames: 64,
            wall_clock,
        }
    }
}
