//! The buyer's sans-IO core: Noise responder for every admitted guest session, the
//! learning switch (host tap + one port per guest) and the DHCP server.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use crate::stats::{BuyerStats, DropCounters, PeerStats, Traffic};
use crate::{Actions, BuyerConfig, Error, Identity, MacAddr, PeerKey};

/// One admitted guest.
#[derive(Debug)]
struct Admitted {
    peer: PeerKey,
    guest_mac: MacAddr,
    guest_ip: Ipv4Addr,
}

/// The buyer's overlay core. Drive it from one UDP socket and the host tap.
#[derive(Debug)]
pub struct BuyerCore {
    identity: Identity,
    config: BuyerConfig,
    admitted: Vec<Admitted>,
    drops: DropCounters,
}

impl BuyerCore {
    /// A buyer with no admitted guests yet.
    pub fn new(identity: Identity, config: BuyerConfig) -> Result<BuyerCore, Error> {
        config.timers.validate()?;
        Ok(BuyerCore {
            identity,
            config,
            admitted: Vec::new(),
            drops: DropCounters::default(),
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
        if self.admitted.iter().any(|a| a.guest_mac == guest_mac) {
            return Err(Error::AddressConflict(format!(
                "guest MAC {guest_mac} is already admitted"
            )));
        }
        self.admitted.push(Admitted {
            peer,
            guest_mac,
            guest_ip,
        });
        Ok(())
    }

    /// Removes a guest: its session is dropped at once. Returns whether it existed.
    pub fn revoke(&mut self, guest_mac: MacAddr) -> bool {
        let before = self.admitted.len();
        self.admitted.retain(|a| a.guest_mac != guest_mac);
        before != self.admitted.len()
    }

    /// Handles one UDP datagram received from `from`.
    pub fn handle_udp(&mut self, from: SocketAddr, datagram: &[u8], now: Instant, out: &mut Actions) {
        let _ = (from, datagram, now, out);
    }

    /// Handles one Ethernet frame read from the host tap.
    pub fn handle_tap_frame(&mut self, frame: &[u8], now: Instant, out: &mut Actions) {
        let _ = (frame, now, out);
    }

    /// Timers: keepalives, session expiry, MAC aging. Call at least once a second.
    pub fn tick(&mut self, now: Instant, out: &mut Actions) {
        let _ = (now, out);
    }

    /// Counters for status output.
    pub fn stats(&self) -> BuyerStats {
        BuyerStats {
            peers: self
                .admitted
                .iter()
                .map(|a| PeerStats {
                    peer: a.peer,
                    guest_mac: a.guest_mac,
                    guest_ip: a.guest_ip,
                    endpoint: None,
                    established: false,
                    handshakes: 0,
                    traffic: Traffic::default(),
                    drops: DropCounters::default(),
                })
                .collect(),
            drops: self.drops.clone(),
            ..Default::default()
        }
    }
}
