//! The seller's sans-IO core for one guest: Noise initiator towards the buyer, the
//! egress filter on every guest frame, the ingress check on every frame to the guest.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand_core::RngCore;
use tracing::debug;

use crate::cookie::CookieJar;
use crate::filter::EgressFilter;
use crate::rng::{self, CoreRng};
use crate::session::{Initiation, Keyring};
use crate::stats::SellerStats;
use crate::wire::{self, Message};
use crate::{Action, Actions, DropReason, Error, Event, Identity, PeerKey, SellerConfig};

/// One guest's overlay session on the seller.
#[derive(Debug)]
pub struct SellerCore {
    identity: Identity,
    config: SellerConfig,
    filter: EgressFilter,
    keys: Keyring,
    handshake: Option<Initiation>,
    /// Initiations sent since the last completed handshake.
    attempts: u32,
    /// Guest frames waiting for the first session.
    pending: VecDeque<Vec<u8>>,
    stats: SellerStats,
    /// The first `now` seen, paired with `config.wall_clock`.
    epoch: Option<Instant>,
    /// Last initiation timestamp sent (kept strictly increasing).
    last_timestamp: u64,
    /// mac1/mac2 for initiations, the buyer's cookie when it is under load.
    cookies: CookieJar,
    /// Session indices and Noise ephemeral keys.
    rng: CoreRng,
}

impl SellerCore {
    /// A core for one guest; the first [`SellerCore::tick`] starts the handshake. Its
    /// randomness is seeded from the OS.
    pub fn new(identity: Identity, config: SellerConfig) -> Result<SellerCore, Error> {
        SellerCore::with_rng(identity, config, rng::from_os())
    }

    /// A core drawing all its randomness from `rng` (a seeded one in tests and
    /// simulations).
    pub fn with_rng(
        identity: Identity,
        config: SellerConfig,
        rng: CoreRng,
    ) -> Result<SellerCore, Error> {
        config.timers.validate()?;
        if config.lease.mtu < 576 || config.lease.mtu as usize > wire::MAX_FRAME_LEN - 14 {
            return Err(Error::InvalidConfig(format!(
                "guest MTU {} outside 576..={}",
                config.lease.mtu,
                wire::MAX_FRAME_LEN - 14
            )));
        }
        Ok(SellerCore {
            cookies: CookieJar::new(&crate::identity::noise_static_of(&config.buyer)),
            filter: EgressFilter::new(&config.lease),
            identity,
            config,
            keys: Keyring::default(),
            handshake: None,
            attempts: 0,
            pending: VecDeque::new(),
            stats: SellerStats::default(),
            epoch: None,
            last_timestamp: 0,
            rng,
        })
    }

    /// This seller's ed25519 key.
    pub fn public_key(&self) -> PeerKey {
        self.identity.public_key()
    }

    /// The configuration in use.
    pub fn config(&self) -> &SellerConfig {
        &self.config
    }

    /// Whether a session with the buyer is up (usable keys).
    pub fn is_established(&self) -> bool {
        self.keys.current.is_some()
    }

    /// The buyer moved to `addr` (its home line got a new address): send there from
    /// now on. The session keys stay; the buyer learns our endpoint from the first
    /// authenticated datagram, so no new lease or handshake is needed.
    pub fn set_buyer_addr(&mut self, addr: SocketAddr) {
        self.config.buyer_addr = addr;
    }

    /// Handles one UDP datagram received from `from`. Only datagrams from the buyer's
    /// endpoint are considered; nothing else reaches the guest.
    pub fn handle_udp(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        out: &mut Actions,
    ) {
        if from != self.config.buyer_addr {
            self.stats.drops.inc(DropReason::WrongSource);
            return;
        }
        let msg = match wire::parse(datagram) {
            Ok(m) => m,
            Err(_) => {
                self.stats.drops.inc(DropReason::MalformedDatagram);
                return;
            }
        };
        match msg {
            Message::HandshakeInit { .. } => self.stats.drops.inc(DropReason::HandshakeInvalid),
            Message::CookieReply {
                receiver_index,
                nonce,
                sealed,
            } => {
                let pending = self
                    .handshake
                    .as_ref()
                    .filter(|h| h.local_index == receiver_index)
                    .map(|h| h.carried_cookie);
                match pending {
                    Some(carried) if self.cookies.consume(nonce, sealed, now).is_ok() => {
                        // The buyer is under load: retry at once, now with mac2. If
                        // that one carried a cookie already, the buyer is over budget
                        // even for proven senders: wait for the retry timer, or the
                        // two of us would ping-pong cookies and initiations.
                        if !carried {
                            self.handshake = None;
                            self.initiate(now, out);
                        }
                    }
                    _ => self.stats.drops.inc(DropReason::UnexpectedResponse),
                }
            }
            Message::HandshakeResponse {
                sender_index,
                receiver_index,
                noise,
            } => self.on_response(sender_index, receiver_index, noise, now, out),
            Message::Data {
                receiver_index,
                counter,
                header,
                ciphertext,
            } => self.on_data(receiver_index, counter, header, ciphertext, now, out),
        }
    }

    fn on_response(
        &mut self,
        sender_index: u32,
        receiver_index: u32,
        noise: &[u8],
        now: Instant,
        out: &mut Actions,
    ) {
        let Some(hs) = self.handshake.take_if(|h| h.local_index == receiver_index) else {
            self.stats.drops.inc(DropReason::UnexpectedResponse);
            return;
        };
        match hs.finish(&self.config.buyer, sender_index, noise) {
            Ok(k) => {
                let rekey = self.keys.current.is_some();
                self.keys.install(k);
                self.keys.last_received = Some(now);
                self.attempts = 0;
                self.stats.handshakes += 1;
                debug!(buyer = %self.config.buyer_addr, guest = %self.config.lease.guest_mac, rekey, "overlay session established");
                out.event(Event::SessionEstablished {
                    peer: self.config.buyer,
                    guest_mac: self.config.lease.guest_mac,
                    endpoint: self.config.buyer_addr,
                    rekey,
                });
                // Data under the new keys confirms them to the buyer; send a
                // keepalive if nothing is queued.
                if self.pending.is_empty() {
                    self.send(&[], now, out);
                }
                while let Some(f) = self.pending.pop_front() {
                    self.send(&f, now, out);
                    out.recycle(f);
                }
            }
            Err(e) => {
                let reason = match e {
                    Error::BadIdentitySignature => DropReason::BadIdentitySignature,
                    _ => DropReason::HandshakeInvalid,
                };
                self.stats.drops.inc(reason);
                out.event(Event::HandshakeRejected {
                    from: self.config.buyer_addr,
                    error: e,
                });
            }
        }
    }

    fn on_data(
        &mut self,
        idx: u32,
        counter: u64,
        header: &[u8],
        ciphertext: &[u8],
        now: Instant,
        out: &mut Actions,
    ) {
        let timers = &self.config.timers;
        let Some((_, k)) = self.keys.find(idx) else {
            self.stats.drops.inc(DropReason::UnknownIndex);
            return;
        };
        if k.expired(now, timers) {
            self.stats.drops.inc(DropReason::SessionExpired);
            return;
        }
        let mut buf = out.buffer();
        if let Err(e) = k.decrypt_into(counter, header, ciphertext, &mut buf) {
            self.stats.drops.inc(match e {
                Error::Replay(_) => DropReason::Replay,
                _ => DropReason::Decrypt,
            });
            out.recycle(buf);
            return;
        }
        self.keys.last_received = Some(now);
        if buf.is_empty() {
            out.recycle(buf); // keepalive
            return;
        }
        if let Err(r) = self.filter.check_ingress(&buf) {
            self.stats.drops.inc(r);
            out.recycle(buf);
            return;
        }
        self.stats.traffic.rx_frames += 1;
        self.stats.traffic.rx_bytes += buf.len() as u64;
        out.push(Action::DeliverToGuest(buf));
    }

    /// Handles one frame the guest sent (read from its tap); it passes the egress
    /// filter or is dropped and counted.
    pub fn handle_guest_frame(&mut self, frame: &[u8], now: Instant, out: &mut Actions) {
        if let Err(r) = self.filter.check_egress(frame, now) {
            self.stats.drops.inc(r);
            return;
        }
        if self.keys.sender(now, &self.config.timers).is_some() {
            self.send(frame, now, out);
        } else if self.pending.len() < self.config.pending_frames {
            let mut b = out.buffer();
            b.extend_from_slice(frame);
            self.pending.push_back(b);
            if self.handshake.is_none() {
                self.initiate(now, out);
            }
        } else {
            self.stats.drops.inc(DropReason::QueueFull);
        }
    }

    /// Counts a guest frame the I/O shell refused before the filter (e.g. an offload
    /// request it would not carry out) and charges it to the guest's rate limit: the
    /// guest pays for what it hands the seller, accepted or not.
    pub fn reject_guest_frame(&mut self, reason: DropReason, len: usize, now: Instant) {
        self.filter.charge_rejected(len, now);
        self.stats.drops.inc(reason);
    }

    /// How long the I/O shell should leave the guest's frames unread: zero while the
    /// guest's rate limit has room for `frames` more frames of `bytes` bytes in all,
    /// else the time until it has. A guest over its limit then costs the seller
    /// nothing: its frames wait in the kernel's queue, or overflow it.
    pub fn guest_backoff(&mut self, frames: u64, bytes: u64, now: Instant) -> Duration {
        self.filter.backoff(frames, bytes, now)
    }

    /// Counts drops the I/O shell saw on the guest's path (tap and socket queues,
    /// refused sends), so they show with the rest.
    pub fn count_path_drops(&mut self, reason: DropReason, n: u64) {
        self.stats.drops.add_n(reason, n);
    }

    /// Encrypts `frame` (empty: keepalive) with the current keys and queues the datagram.
    fn send(&mut self, frame: &[u8], now: Instant, out: &mut Actions) {
        let timers = &self.config.timers;
        let Some(k) = self.keys.sender(now, timers) else {
            self.stats.drops.inc(DropReason::NoSession);
            return;
        };
        let mut buf = out.buffer();
        k.encrypt_into(frame, &mut buf);
        let rekey = k.wants_rekey(now, timers);
        self.keys.last_sent = Some(now);
        if !frame.is_empty() {
            self.stats.traffic.tx_frames += 1;
            self.stats.traffic.tx_bytes += frame.len() as u64;
        }
        out.push(Action::SendUdp {
            to: self.config.buyer_addr,
            bytes: buf,
        });
        if rekey && self.handshake.is_none() {
            self.initiate(now, out);
        }
    }

    /// Wall-clock nanoseconds for a handshake initiation at `now`.
    fn timestamp(&mut self, now: Instant) -> u64 {
        let epoch = *self.epoch.get_or_insert(now);
        let base = self
            .config
            .wall_clock
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let t = (base + now.saturating_duration_since(epoch)).as_nanos() as u64;
        self.last_timestamp = t.max(self.last_timestamp + 1);
        self.last_timestamp
    }

    fn initiate(&mut self, now: Instant, out: &mut Actions) {
        let timestamp = self.timestamp(now);
        let mut buf = out.buffer();
        let idx = loop {
            let i = self.rng.next_u32();
            if !self.keys.indices().any(|x| x == i) {
                break i;
            }
        };
        match Initiation::start(
            &self.identity,
            &self.config.buyer,
            self.config.lease.guest_mac,
            timestamp,
            idx,
            now,
            &mut self.rng,
            &mut buf,
        ) {
            Ok(mut hs) => {
                hs.carried_cookie = self.cookies.stamp(&mut buf, now);
                self.handshake = Some(hs);
                self.attempts += 1;
                out.event(Event::HandshakeInitiated {
                    to: self.config.buyer_addr,
                    attempt: self.attempts,
                });
                out.push(Action::SendUdp {
                    to: self.config.buyer_addr,
                    bytes: buf,
                });
            }
            Err(e) => {
                // Only a broken local key gets here; report it, retry on the next tick.
                out.recycle(buf);
                out.event(Event::HandshakeRejected {
                    from: self.config.buyer_addr,
                    error: e,
                });
            }
        }
    }

    /// Timers: handshake start and retry, rekey, keepalive, expiry. Call at least
    /// once a second, and once right after [`SellerCore::new`].
    pub fn tick(&mut self, now: Instant, out: &mut Actions) {
        let timers = self.config.timers.clone();
        let had_current = self.keys.current.is_some();
        self.keys.expire(now, &timers);
        if had_current && self.keys.current.is_none() {
            out.event(Event::SessionExpired {
                peer: self.config.buyer,
                guest_mac: self.config.lease.guest_mac,
            });
        }
        match &self.handshake {
            Some(h) if now.saturating_duration_since(h.sent_at) >= timers.handshake_retry => {
                self.handshake = None;
                self.initiate(now, out);
            }
            Some(_) => {}
            None => {
                // Nothing heard for two keepalive intervals although the buyer
                // sends keepalives: it may have restarted and lost our keys.
                let silent = self.keys.last_received.is_some_and(|t| {
                    now.saturating_duration_since(t) >= 2 * timers.keepalive_interval
                });
                let needed = match &self.keys.current {
                    None => true,
                    Some(k) => k.wants_rekey(now, &timers) || silent,
                };
                if needed {
                    self.initiate(now, out);
                }
            }
        }
        if self.keys.sender(now, &timers).is_some()
            && self
                .keys
                .last_sent
                .is_none_or(|t| now.saturating_duration_since(t) >= timers.keepalive_interval)
        {
            self.send(&[], now, out);
        }
    }

    /// Test hook: a misbehaving seller that skips its own egress filter.
    #[cfg(test)]
    pub(crate) fn send_unfiltered(&mut self, frame: &[u8], now: Instant, out: &mut Actions) {
        self.send(frame, now, out);
    }

    /// Counters for status output.
    pub fn stats(&self) -> SellerStats {
        SellerStats {
            established: self.is_established(),
            ..self.stats.clone()
        }
    }
}
