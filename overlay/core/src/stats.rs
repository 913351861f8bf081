//! Drop reasons and counters, exported for `cpushare-node status`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use crate::{MacAddr, PeerKey};

macro_rules! drop_reasons {
    ($($(#[$doc:meta])* $name:ident => $s:literal,)*) => {
        /// Why a datagram or frame was dropped.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum DropReason {
            $($(#[$doc])* $name,)*
        }

        impl DropReason {
            /// Every reason, in counter order.
            pub const ALL: &'static [DropReason] = &[$(DropReason::$name,)*];

            /// Stable snake_case name (status output, logs).
            pub fn as_str(self) -> &'static str {
                match self {
                    $(DropReason::$name => $s,)*
                }
            }
        }
    };
}

drop_reasons! {
    /// Datagram too short, unknown type or bad length.
    MalformedDatagram => "malformed_datagram",
    /// Datagram from an endpoint other than the session's peer (seller side).
    WrongSource => "wrong_source",
    /// Data message for a receiver index we do not have.
    UnknownIndex => "unknown_index",
    /// Data message counter already seen or older than the replay window.
    Replay => "replay",
    /// AEAD tag did not verify (tampered, or wrong key).
    Decrypt => "decrypt",
    /// Keys too old or used too often.
    SessionExpired => "session_expired",
    /// No session to send on (peer not connected).
    NoSession => "no_session",
    /// Frames queued while handshaking exceeded the queue.
    QueueFull => "queue_full",
    /// Handshake initiation over the per-source or global rate.
    HandshakeRateLimited => "handshake_rate_limited",
    /// Handshake message failed Noise processing.
    HandshakeInvalid => "handshake_invalid",
    /// Handshake from an ed25519 key / guest MAC that is not admitted.
    NotAdmitted => "not_admitted",
    /// Handshake initiation replayed (timestamp not newer than the last one).
    StaleHandshake => "stale_handshake",
    /// Identity signature over the Noise static key is wrong.
    BadIdentitySignature => "bad_identity_signature",
    /// Handshake response for no pending handshake.
    UnexpectedResponse => "unexpected_response",
    /// Buyer: frame from a session whose source MAC is not the session's guest MAC.
    SessionMacMismatch => "session_mac_mismatch",
    /// Buyer: a switched frame addressed back to the port it came from.
    Hairpin => "hairpin",
    /// Buyer: a guest's message to the DHCP server that does not parse, or is for
    /// another client hardware address.
    DhcpMalformed => "dhcp_malformed",
    /// Frame shorter than an Ethernet header.
    Runt => "runt",
    /// Frame longer than MTU + 14.
    Oversize => "oversize",
    /// Source MAC is not the guest's.
    SourceMac => "source_mac",
    /// 802.1Q / QinQ tagged frame.
    VlanTagged => "vlan_tagged",
    /// EtherType not allowed.
    EtherType => "ethertype",
    /// IPv4 header invalid.
    Ipv4Malformed => "ipv4_malformed",
    /// IPv4 source is not the guest's.
    Ipv4Source => "ipv4_source",
    /// ARP packet invalid.
    ArpMalformed => "arp_malformed",
    /// ARP sender MAC/IP is not the guest's.
    ArpSpoof => "arp_spoof",
    /// DHCP server reply (UDP 67->68) sent by a guest.
    DhcpServerReply => "dhcp_server_reply",
    /// IPv6 header invalid.
    Ipv6Malformed => "ipv6_malformed",
    /// ICMPv6 router advertisement from a guest.
    RouterAdvertisement => "router_advertisement",
    /// DHCPv6 server reply (UDP 547->546) from a guest.
    Dhcpv6ServerReply => "dhcpv6_server_reply",
    /// IPv6 source is neither the guest's link-local address (from its MAC) nor its
    /// leased address (nor `::` in duplicate address detection or an MLD report).
    Ipv6Source => "ipv6_source",
    /// An IPv6 extension header the lease does not allow: anything but a leading
    /// hop-by-hop header of padding and router alert, and one fragment header
    /// (default deny: nothing hides a router advertisement behind one).
    Ipv6ExtensionHeader => "ipv6_extension_header",
    /// An IPv6 upper-layer protocol other than TCP, UDP and ICMPv6.
    Ipv6NextHeader => "ipv6_next_header",
    /// ICMPv6 redirect from a guest.
    Icmpv6Redirect => "icmpv6_redirect",
    /// Broadcast/multicast over its rate.
    BroadcastRate => "broadcast_rate",
    /// Over the byte rate.
    ByteRate => "byte_rate",
    /// Over the packet rate.
    PacketRate => "packet_rate",
    /// Frame towards the guest not addressed to it (nor broadcast).
    IngressNotForGuest => "ingress_not_for_guest",
    /// Guest frame whose checksum-offload offsets point outside the frame or at no
    /// transport checksum field.
    OffloadBadOffsets => "offload_bad_offsets",
    /// Guest frame asking for a segmentation offload we do not do (UDP, ECN, unknown).
    OffloadUnsupported => "offload_unsupported",
    /// Guest segmentation-offload frame that is not the Ethernet + IP + TCP it claims.
    OffloadMalformed => "offload_malformed",
    /// Guest segmentation-offload frame with a segment size under the floor
    /// (`gso_size` 1 would make tens of thousands of segments out of one frame).
    GsoSegmentTooSmall => "gso_segment_too_small",
    /// Guest segmentation-offload frame that would make more segments than the cap.
    GsoTooManySegments => "gso_too_many_segments",
    /// Seller: frames to the guest its port refused to send (e.g. `ENOBUFS`: the
    /// tap's queue was full, or it could not take the frame's offloads).
    ToGuestSendFailed => "to_guest_send_failed",
    /// Seller: frames to the guest the tap dropped besides those (its `tx_dropped`).
    ToGuestTapDropped => "to_guest_tap_dropped",
    /// Seller: guest frames the guest port's socket had no room for
    /// (`PACKET_STATISTICS` `tp_drops`).
    FromGuestSocketOverflow => "from_guest_socket_overflow",
    /// Seller: guest frames the tap dropped on their way in (its `rx_dropped`).
    FromGuestTapDropped => "from_guest_tap_dropped",
}

/// One counter per [`DropReason`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DropCounters {
    counts: BTreeMap<DropReason, u64>,
}

impl DropCounters {
    /// Counts one drop.
    pub fn inc(&mut self, reason: DropReason) {
        *self.counts.entry(reason).or_insert(0) += 1;
    }

    /// Counts `n` drops.
    pub fn add_n(&mut self, reason: DropReason, n: u64) {
        if n > 0 {
            *self.counts.entry(reason).or_insert(0) += n;
        }
    }

    /// Drops counted for `reason`.
    pub fn get(&self, reason: DropReason) -> u64 {
        self.counts.get(&reason).copied().unwrap_or(0)
    }

    /// All drops.
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// Adds another set of counters into this one.
    pub fn add(&mut self, other: &DropCounters) {
        for (r, n) in &other.counts {
            *self.counts.entry(*r).or_insert(0) += n;
        }
    }

    /// Non-zero counters by name (for status output).
    pub fn to_map(&self) -> BTreeMap<&'static str, u64> {
        self.counts
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(r, n)| (r.as_str(), *n))
            .collect()
    }
}

/// Packet and byte counts in one direction pair.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Frames received from the overlay (decrypted, accepted).
    pub rx_frames: u64,
    /// Bytes of those frames.
    pub rx_bytes: u64,
    /// Frames sent into the overlay (encrypted).
    pub tx_frames: u64,
    /// Bytes of those frames.
    pub tx_bytes: u64,
}

/// Statistics of one seller-side guest session.
#[derive(Clone, Debug, Default)]
pub struct SellerStats {
    /// Whether a session with the buyer is up.
    pub established: bool,
    /// Handshakes completed (first one plus rekeys).
    pub handshakes: u64,
    /// Guest traffic through the overlay.
    pub traffic: Traffic,
    /// Drops by reason (filter, session).
    pub drops: DropCounters,
}

/// Statistics of one admitted guest on the buyer.
#[derive(Clone, Debug)]
pub struct PeerStats {
    /// Seller's ed25519 key.
    pub peer: PeerKey,
    /// Guest MAC.
    pub guest_mac: MacAddr,
    /// Guest IP.
    pub guest_ip: Ipv4Addr,
    /// Last authenticated endpoint.
    pub endpoint: Option<SocketAddr>,
    /// Whether a session is up.
    pub established: bool,
    /// Handshakes completed.
    pub handshakes: u64,
    /// Traffic through this guest's session.
    pub traffic: Traffic,
    /// Drops attributed to this guest's session.
    pub drops: DropCounters,
}

/// Statistics of the buyer's switch.
#[derive(Clone, Debug, Default)]
pub struct BuyerStats {
    /// Per admitted guest.
    pub peers: Vec<PeerStats>,
    /// Frames from the host tap.
    pub tap_rx_frames: u64,
    /// Frames written to the host tap.
    pub tap_tx_frames: u64,
    /// Drops not attributable to one admitted guest (unknown senders, floods).
    pub drops: DropCounters,
}

impl BuyerStats {
    /// All drops (global plus per guest).
    pub fn total_drops(&self) -> DropCounters {
        let mut d = self.drops.clone();
        for p in &self.peers {
            d.add(&p.drops);
        }
        d
    }
}
