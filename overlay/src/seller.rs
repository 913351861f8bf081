//! The seller's sans-IO core for one guest: Noise initiator towards the buyer, the
//! egress filter on every guest frame, the ingress check on every frame to the guest.

use std::net::SocketAddr;
use std::time::Instant;

use crate::stats::SellerStats;
use crate::{Actions, Error, Identity, PeerKey, SellerConfig};

/// One guest's overlay session on the seller.
#[derive(Debug)]
pub struct SellerCore {
    identity: Identity,
    config: SellerConfig,
    stats: SellerStats,
}

impl SellerCore {
    /// A core for one guest; the first [`SellerCore::tick`] starts the handshake.
    pub fn new(identity: Identity, config: SellerConfig) -> Result<SellerCore, Error> {
        config.timers.validate()?;
        Ok(SellerCore {
            identity,
            config,
            stats: SellerStats::default(),
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

    /// Whether a session with the buyer is up.
    pub fn is_established(&self) -> bool {
        self.stats.established
    }

    /// Handles one UDP datagram received from `from` (only the buyer's endpoint counts).
    pub fn handle_udp(&mut self, from: SocketAddr, datagram: &[u8], now: Instant, out: &mut Actions) {
        let _ = (from, datagram, now, out);
    }

    /// Handles one frame the guest sent (read from its tap); it passes the egress
    /// filter or is dropped and counted.
    pub fn handle_guest_frame(&mut self, frame: &[u8], now: Instant, out: &mut Actions) {
        let _ = (frame, now, out);
    }

    /// Timers: handshake start and retry, rekey, keepalive, expiry. Call at least
    /// once a second, and once right after [`SellerCore::new`].
    pub fn tick(&mut self, now: Instant, out: &mut Actions) {
        let _ = (now, out);
    }

    /// Counters for status output.
    pub fn stats(&self) -> SellerStats {
        self.stats.clone()
    }
}
