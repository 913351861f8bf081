//! The buyer's sans-IO core: Noise responder for every admitted guest session, the
//! learning switch (host tap + one port per guest) and the DHCP server.

use rand_core::RngCore;
use rustc_hash::FxHashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use tracing::debug;

use crate::cookie::CookieChecker;
use crate::dhcp::{self, DhcpServer};
use crate::eth::{dst_mac, ethertype, src_mac, ETHERTYPE_IPV6, ETH_HDR};
use crate::filter;
use crate::ratelimit::HandshakeLimiter;
use crate::rng::{self, CoreRng};
use crate::session::{respond, Keyring, Slot};
use crate::stats::{BuyerStats, DropCounters, PeerStats, Traffic};
use crate::switch::{MacTable, Port};
use crate::wire::{self, Message};
use crate::{
    Action, Actions, Admission, BuyerConfig, DropReason, Error, Event, Identity, Ipv6Sources,
    MacAddr, PeerKey,
};

/// Learned MACs kept at most (the host side may bridge more machines).
const MAC_TABLE_CAPACITY: usize = 8192;

/// One admitted guest and its session.
#[derive(Debug)]
struct Guest {
    peer: PeerKey,
    guest_mac: MacAddr,
    guest_ip: Ipv4Addr,
    /// The IPv6 sources the guest may use, when its lease allows IPv6.
    ipv6: Option<Ipv6Sources>,
    keys: Keyring,
    /// Where authenticated data last came from.
    endpoint: Option<SocketAddr>,
    /// Timestamp of the last accepted handshake initiation (replay defence).
    last_timestamp: u64,
    handshakes: u64,
    traffic: Traffic,
    drops: DropCounters,
}

/// The buyer's overlay core. Drive it from one UDP socket and the host tap.
#[derive(Debug)]
pub struct BuyerCore {
    identity: Identity,
    config: BuyerConfig,
    dhcp: DhcpServer,
    guests: Vec<Option<Guest>>,
    // Keys are admitted guests and indices we picked: no hash flooding to fear, so a
    // cheap hash keeps the per-frame lookups short.
    by_mac: FxHashMap<MacAddr, usize>,
    by_index: FxHashMap<u32, usize>,
    table: MacTable,
    limiter: HandshakeLimiter,
    cookies: CookieChecker,
    /// Session indices, cookie secrets and nonces, Noise ephemeral keys.
    rng: CoreRng,
    drops: DropCounters,
    tap_rx_frames: u64,
    tap_tx_frames: u64,
}

fn reason_of(e: &Error) -> DropReason {
    match e {
        Error::NotAdmitted { .. } => DropReason::NotAdmitted,
        Error::BadIdentitySignature => DropReason::BadIdentitySignature,
        Error::StaleHandshake(_) => DropReason::StaleHandshake,
        Error::Replay(_) => DropReason::Replay,
        Error::Decrypt => DropReason::Decrypt,
        _ => DropReason::HandshakeInvalid,
    }
}

impl BuyerCore {
    /// A buyer with no admitted guests yet, its randomness seeded from the OS.
    pub fn new(identity: Identity, config: BuyerConfig) -> Result<BuyerCore, Error> {
        BuyerCore::with_rng(identity, config, rng::from_os())
    }

    /// A buyer drawing all its randomness from `rng` (a seeded one in tests and
    /// simulations).
    pub fn with_rng(
        identity: Identity,
        config: BuyerConfig,
        mut rng: CoreRng,
    ) -> Result<BuyerCore, Error> {
        config.timers.validate()?;
        if config.guest_mtu < 576 || config.guest_mtu as usize > wire::MAX_FRAME_LEN - ETH_HDR {
            return Err(Error::InvalidConfig(format!(
                "guest MTU {} outside 576..={}",
                config.guest_mtu,
                wire::MAX_FRAME_LEN - ETH_HDR
            )));
        }
        let mask = u32::from(config.netmask);
        if mask.leading_ones() + mask.trailing_zeros() != 32 || mask.leading_ones() > 30 {
            return Err(Error::InvalidConfig(format!(
                "netmask {} is not a usable contiguous mask",
                config.netmask
            )));
        }
        if config.host_mac.is_multicast() {
            return Err(Error::InvalidConfig(format!(
                "host MAC {} is a group address",
                config.host_mac
            )));
        }
        Ok(BuyerCore {
            dhcp: DhcpServer {
                server_mac: config.host_mac,
                server_ip: config.host_ip,
                netmask: config.netmask,
                dns: config.dns,
                mtu: config.guest_mtu,
                lease_time: config.dhcp_lease_time,
            },
            table: MacTable::new(config.mac_aging, MAC_TABLE_CAPACITY),
            limiter: HandshakeLimiter::new(config.handshake_limits.clone()),
            cookies: CookieChecker::new(&identity.noise_public(), &mut rng),
            rng,
            identity,
            config,
            guests: Vec::new(),
            by_mac: FxHashMap::default(),
            by_index: FxHashMap::default(),
            drops: DropCounters::default(),
            tap_rx_frames: 0,
            tap_tx_frames: 0,
        })
    }

    /// This buyer's ed25519 key (sellers need it in their lease).
    pub fn public_key(&self) -> PeerKey {
        self.identity.public_key()
    }

    /// The configuration in use.
    pub fn config(&self) -> &BuyerConfig {
        &self.config
    }

    /// Admits a seller key to carry the guest with `guest_mac`, which DHCP gives
    /// `guest_ip`. One seller may carry several guests (one session each).
    /// Fails on a MAC or IP already admitted, or an IP outside the overlay subnet.
    pub fn admit(
        &mut self,
        peer: PeerKey,
        guest_mac: MacAddr,
        guest_ip: Ipv4Addr,
    ) -> Result<(), Error> {
        self.admit_guest(Admission::new(peer, guest_mac, guest_ip))
    }

    /// [`BuyerCore::admit`] with the whole lease: with `allow_ipv6`, the guest's IPv6
    /// frames are forwarded when their source is its link-local address (from its
    /// MAC) or `guest_ipv6`, and their header chain passes the same default-deny
    /// rules as the seller's egress filter; without it they are dropped.
    pub fn admit_guest(&mut self, a: Admission) -> Result<(), Error> {
        let Admission {
            peer,
            guest_mac,
            guest_ip,
            allow_ipv6,
            guest_ipv6,
        } = a;
        if let Some(v6) = guest_ipv6 {
            if !allow_ipv6 {
                return Err(Error::InvalidConfig(format!(
                    "guest IPv6 address {v6} given but IPv6 is not allowed for guest {guest_mac}"
                )));
            }
            if v6.is_unspecified() || v6.is_loopback() || v6.is_multicast() {
                return Err(Error::AddressConflict(format!(
                    "guest IPv6 address {v6} is not a unicast address"
                )));
            }
            if let Some(g) = self
                .guests
                .iter()
                .flatten()
                .find(|g| g.ipv6.is_some_and(|s| s.global == Some(v6)))
            {
                return Err(Error::AddressConflict(format!(
                    "guest IPv6 address {v6} is already leased to guest {}",
                    g.guest_mac
                )));
            }
        }
        let c = &self.config;
        if guest_mac.is_multicast() || guest_mac == MacAddr([0; 6]) {
            return Err(Error::AddressConflict(format!(
                "guest MAC {guest_mac} is not a unicast address"
            )));
        }
        if guest_mac == c.host_mac {
            return Err(Error::AddressConflict(format!(
                "guest MAC {guest_mac} is the buyer host's own MAC"
            )));
        }
        if self.by_mac.contains_key(&guest_mac) {
            return Err(Error::AddressConflict(format!(
                "guest MAC {guest_mac} is already admitted"
            )));
        }
        let mask = u32::from(c.netmask);
        let net = u32::from(c.host_ip) & mask;
        let ip = u32::from(guest_ip);
        if ip & mask != net || ip == net || ip == net | !mask {
            return Err(Error::AddressConflict(format!(
                "guest IP {guest_ip} is not a host address in the overlay subnet {}/{}",
                Ipv4Addr::from(net),
                mask.leading_ones()
            )));
        }
        if guest_ip == c.host_ip {
            return Err(Error::AddressConflict(format!(
                "guest IP {guest_ip} is the buyer host's own address"
            )));
        }
        if let Some(g) = self
            .guests
            .iter()
            .flatten()
            .find(|g| g.guest_ip == guest_ip)
        {
            return Err(Error::AddressConflict(format!(
                "guest IP {guest_ip} is already leased to guest {}",
                g.guest_mac
            )));
        }
        let guest = Guest {
            peer,
            guest_mac,
            guest_ip,
            ipv6: allow_ipv6.then_some(Ipv6Sources {
                link_local: guest_mac.ipv6_link_local(),
                global: guest_ipv6,
            }),
            keys: Keyring::default(),
            endpoint: None,
            last_timestamp: 0,
            handshakes: 0,
            traffic: Traffic::default(),
            drops: DropCounters::default(),
        };
        let slot = match self.guests.iter().position(Option::is_none) {
            Some(s) => {
                self.guests[s] = Some(guest);
                s
            }
            None => {
                self.guests.push(Some(guest));
                self.guests.len() - 1
            }
        };
        self.by_mac.insert(guest_mac, slot);
        Ok(())
    }

    /// Removes a guest: its session is dropped at once. Returns whether it existed.
    pub fn revoke(&mut self, guest_mac: MacAddr) -> bool {
        let Some(slot) = self.by_mac.remove(&guest_mac) else {
            return false;
        };
        if let Some(g) = self.guests[slot].take() {
            for i in g.keys.indices() {
                self.by_index.remove(&i);
            }
            if let Some(e) = g.endpoint {
                self.limiter.forget_known(e.ip());
            }
        }
        self.table.forget_port(Port::Guest(slot));
        true
    }

    /// Handles one UDP datagram received from `from`.
    pub fn handle_udp(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        out: &mut Actions,
    ) {
        match wire::parse(datagram) {
            Err(_) => self.drops.inc(DropReason::MalformedDatagram),
            Ok(Message::HandshakeInit {
                sender_index,
                noise,
            }) => self.on_init(from, datagram, sender_index, noise, now, out),
            Ok(Message::HandshakeResponse { .. } | Message::CookieReply { .. }) => {
                self.drops.inc(DropReason::UnexpectedResponse)
            }
            Ok(Message::Data {
                receiver_index,
                counter,
                header,
                ciphertext,
            }) => self.on_data(from, receiver_index, counter, header, ciphertext, now, out),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_init(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        sender_index: u32,
        noise: &[u8],
        now: Instant,
        out: &mut Actions,
    ) {
        // All before any public-key work. mac1 shows the sender knows our key.
        if !self.cookies.mac1_ok(datagram) {
            self.drops.inc(DropReason::HandshakeInvalid);
            return;
        }
        let known = self
            .guests
            .iter()
            .flatten()
            .any(|g| g.endpoint.is_some_and(|e| e.ip() == from.ip()));
        if !self.limiter.allow(from.ip(), now, known) {
            // Over the rate: only senders proving their address (mac2 with our
            // cookie) get through; the others get a cookie to retry with.
            let proven = self.cookies.mac2_ok(datagram, &from, now, &mut self.rng)
                && self.limiter.allow(from.ip(), now, true);
            if !proven {
                self.drops.inc(DropReason::HandshakeRateLimited);
                let mut buf = out.buffer();
                self.cookies
                    .reply(datagram, sender_index, &from, now, &mut self.rng, &mut buf);
                out.push(Action::SendUdp {
                    to: from,
                    bytes: buf,
                });
                return;
            }
        }
        let idx = loop {
            let i = self.rng.next_u32();
            if !self.by_index.contains_key(&i) {
                break i;
            }
        };
        let mut buf = out.buffer();
        let (by_mac, guests) = (&self.by_mac, &self.guests);
        let res = respond(
            &self.identity,
            sender_index,
            noise,
            idx,
            now,
            |peer, mac, ts| {
                let g = by_mac
                    .get(&mac)
                    .and_then(|s| guests[*s].as_ref())
                    .filter(|g| g.peer == *peer)
                    .ok_or_else(|| Error::NotAdmitted {
                        peer: hex::encode(peer.as_bytes()),
                        mac,
                    })?;
                if ts <= g.last_timestamp {
                    return Err(Error::StaleHandshake(mac));
                }
                Ok(())
            },
            &mut self.rng,
            &mut buf,
        );
        match res {
            Err(e) => {
                out.recycle(buf);
                let r = reason_of(&e);
                self.drops.inc(r);
                debug!(%from, error = %e, "overlay handshake rejected");
                out.event(Event::HandshakeRejected { from, error: e });
            }
            Ok(acc) => {
                let slot = self.by_mac[&acc.guest_mac];
                let g = self.guests[slot].as_mut().expect("admitted guest");
                debug!(peer = %hex::encode(acc.peer.as_bytes()), guest = %acc.guest_mac, %from, "overlay handshake answered");
                g.last_timestamp = acc.timestamp;
                if let Some(old) = g.keys.next.replace(acc.keypair) {
                    self.by_index.remove(&old.local_index);
                }
                self.by_index.insert(idx, slot);
                // The endpoint only changes once data under the new keys arrives: a
                // replayed initiation cannot redirect the session.
                out.push(Action::SendUdp {
                    to: from,
                    bytes: buf,
                });
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_data(
        &mut self,
        from: SocketAddr,
        idx: u32,
        counter: u64,
        header: &[u8],
        ciphertext: &[u8],
        now: Instant,
        out: &mut Actions,
    ) {
        let Some(&slot) = self.by_index.get(&idx) else {
            self.drops.inc(DropReason::UnknownIndex);
            return;
        };
        let timers = &self.config.timers;
        let g = self.guests[slot].as_mut().expect("indexed guest");
        let Some((which, k)) = g.keys.find(idx) else {
            self.drops.inc(DropReason::UnknownIndex);
            return;
        };
        if k.expired(now, timers) {
            g.drops.inc(DropReason::SessionExpired);
            return;
        }
        let mut buf = out.buffer();
        if let Err(e) = k.decrypt_into(counter, header, ciphertext, &mut buf) {
            g.drops.inc(reason_of(&e));
            out.recycle(buf);
            return;
        }
        g.keys.last_received = Some(now);
        let old_endpoint = g.endpoint.replace(from);
        if which == Slot::Next {
            // The seller used the new keys: they become current.
            if let Some(gone) = g.keys.confirm_next() {
                self.by_index.remove(&gone);
            }
            g.handshakes += 1;
            let rekey = g.keys.previous.is_some();
            debug!(peer = %hex::encode(g.peer.as_bytes()), guest = %g.guest_mac, %from, rekey, "overlay session established");
            out.event(Event::SessionEstablished {
                peer: g.peer,
                guest_mac: g.guest_mac,
                endpoint: from,
                rekey,
            });
        } else if old_endpoint.is_some_and(|o| o != from) {
            out.event(Event::EndpointChanged {
                peer: g.peer,
                guest_mac: g.guest_mac,
                endpoint: from,
            });
        }
        if buf.is_empty() {
            out.recycle(buf); // keepalive
            return;
        }
        if buf.len() < ETH_HDR {
            g.drops.inc(DropReason::Runt);
            out.recycle(buf);
            return;
        }
        if src_mac(&buf) != g.guest_mac {
            g.drops.inc(DropReason::SessionMacMismatch);
            out.recycle(buf);
            return;
        }
        if ethertype(&buf) == ETHERTYPE_IPV6 {
            // The seller's filter checked this already; a seller that did not (or a
            // forged one) is held to the lease here too.
            let verdict = match &g.ipv6 {
                None => Err(DropReason::EtherType),
                Some(sources) => filter::check_ipv6(sources, &buf[ETH_HDR..]),
            };
            if let Err(r) = verdict {
                g.drops.inc(r);
                out.recycle(buf);
                return;
            }
        }
        g.traffic.rx_frames += 1;
        g.traffic.rx_bytes += buf.len() as u64;
        if dhcp::is_dhcp_to_server(&buf) {
            self.serve_dhcp(slot, &buf, now, out);
            out.recycle(buf);
            return;
        }
        // A guest's MAC is bound to its session (`by_mac`), so there is nothing to learn.
        self.forward(Port::Guest(slot), buf, now, out);
    }

    fn serve_dhcp(&mut self, slot: usize, frame: &[u8], now: Instant, out: &mut Actions) {
        let g = self.guests[slot].as_mut().expect("guest");
        let msg = match dhcp::parse_client_frame(frame) {
            Ok(m) if m.chaddr == g.guest_mac => m,
            _ => {
                g.drops.inc(DropReason::DhcpMalformed);
                return;
            }
        };
        let (mac, ip) = (g.guest_mac, g.guest_ip);
        let mut reply = out.buffer();
        let ty = self.dhcp.answer(&msg, ip, &mut reply);
        if ty.is_some() {
            self.send_to_guest(slot, &reply, now, out);
        }
        out.recycle(reply);
        if ty == Some(dhcp::ACK) {
            out.event(Event::DhcpAck { guest_mac: mac, ip });
        }
    }

    /// Switches `frame` that arrived on `from_port`.
    fn forward(&mut self, from_port: Port, frame: Vec<u8>, now: Instant, out: &mut Actions) {
        let dst = dst_mac(&frame);
        let target = if dst.is_multicast() {
            None
        } else if let Some(&s) = self.by_mac.get(&dst) {
            // Guests are bound to their MAC: no need to learn or flood for them.
            Some(Port::Guest(s))
        } else {
            self.table.lookup(dst, now)
        };
        match target {
            Some(p) if p == from_port => {
                self.drops.inc(DropReason::Hairpin);
                out.recycle(frame);
            }
            Some(Port::Host) => self.write_tap(frame, out),
            Some(Port::Guest(s)) => {
                self.send_to_guest(s, &frame, now, out);
                out.recycle(frame);
            }
            None => {
                // Broadcast, multicast, unknown unicast: every other port.
                for s in 0..self.guests.len() {
                    if Port::Guest(s) != from_port
                        && self.guests[s]
                            .as_ref()
                            .is_some_and(|g| g.endpoint.is_some() && g.keys.current.is_some())
                    {
                        self.send_to_guest(s, &frame, now, out);
                    }
                }
                if from_port != Port::Host {
                    self.write_tap(frame, out);
                } else {
                    out.recycle(frame);
                }
            }
        }
    }

    fn write_tap(&mut self, frame: Vec<u8>, out: &mut Actions) {
        self.tap_tx_frames += 1;
        out.push(Action::WriteTap(frame));
    }

    /// Encrypts `frame` (empty: keepalive) to guest `slot`.
    fn send_to_guest(&mut self, slot: usize, frame: &[u8], now: Instant, out: &mut Actions) {
        let timers = &self.config.timers;
        let Some(g) = self.guests[slot].as_mut() else {
            return;
        };
        let (Some(endpoint), Some(k)) = (g.endpoint, g.keys.sender(now, timers)) else {
            g.drops.inc(DropReason::NoSession);
            return;
        };
        let mut buf = out.buffer();
        k.encrypt_into(frame, &mut buf);
        g.keys.last_sent = Some(now);
        if !frame.is_empty() {
            g.traffic.tx_frames += 1;
            g.traffic.tx_bytes += frame.len() as u64;
        }
        out.push(Action::SendUdp {
            to: endpoint,
            bytes: buf,
        });
    }

    /// Handles one Ethernet frame read from the host tap.
    pub fn handle_tap_frame(&mut self, frame: &[u8], now: Instant, out: &mut Actions) {
        self.tap_rx_frames += 1;
        if frame.len() < ETH_HDR {
            self.drops.inc(DropReason::Runt);
            return;
        }
        if frame.len() > self.config.guest_mtu as usize + ETH_HDR {
            // Guests would drop it anyway; the host tap's MTU should match.
            self.drops.inc(DropReason::Oversize);
            return;
        }
        let src = src_mac(frame);
        if !self.by_mac.contains_key(&src) {
            self.table.learn(src, Port::Host, now);
        }
        let mut buf = out.buffer();
        buf.extend_from_slice(frame);
        self.forward(Port::Host, buf, now, out);
    }

    /// Timers: keepalives, session expiry, MAC aging. Call at least once a second.
    pub fn tick(&mut self, now: Instant, out: &mut Actions) {
        let timers = self.config.timers.clone();
        for slot in 0..self.guests.len() {
            let Some(g) = self.guests[slot].as_mut() else {
                continue;
            };
            let had_current = g.keys.current.is_some();
            for gone in g.keys.expire(now, &timers) {
                self.by_index.remove(&gone);
            }
            if had_current && g.keys.current.is_none() {
                out.event(Event::SessionExpired {
                    peer: g.peer,
                    guest_mac: g.guest_mac,
                });
            }
            let idle = g
                .keys
                .last_sent
                .is_none_or(|t| now.saturating_duration_since(t) >= timers.keepalive_interval);
            if idle && g.endpoint.is_some() && g.keys.sender(now, &timers).is_some() {
                self.send_to_guest(slot, &[], now, out);
            }
        }
        self.table.age(now);
    }

    /// Counters for status output.
    pub fn stats(&self) -> BuyerStats {
        BuyerStats {
            peers: self
                .guests
                .iter()
                .flatten()
                .map(|g| PeerStats {
                    peer: g.peer,
                    guest_mac: g.guest_mac,
                    guest_ip: g.guest_ip,
                    endpoint: g.endpoint,
                    established: g.keys.current.is_some(),
                    handshakes: g.handshakes,
                    traffic: g.traffic.clone(),
                    drops: g.drops.clone(),
                })
                .collect(),
            tap_rx_frames: self.tap_rx_frames,
            tap_tx_frames: self.tap_tx_frames,
            drops: self.drops.clone(),
        }
    }
}
