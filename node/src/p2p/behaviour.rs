//! The libp2p stack: TCP (tracked sockets, see `sockets`) + noise + yamux, and the
//! behaviours the node runs on it.

use std::sync::Arc;
use std::time::Duration;

use libp2p::core::{transport::Transport as _, upgrade};
use libp2p::identity::Keypair;
use libp2p::swarm::{behaviour::toggle::Toggle, NetworkBehaviour};
use libp2p::{
    gossipsub, identify, kad, mdns, noise, ping, tcp, yamux, Multiaddr, StreamProtocol, Swarm,
};
use tracing::warn;

use super::sockets::Sockets;
use crate::error::{Error, Result};

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    pub stream: libp2p_stream::Behaviour,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    /// Offers spread here (the market's gossip topic).
    pub gossipsub: gossipsub::Behaviour,
}

fn p2p_err(e: impl std::fmt::Display) -> Error {
    Error::P2p(e.to_string())
}

/// Builds the swarm, listens on `listen` and dials the `bootstrap` peers
/// (multiaddrs ending in `/p2p/<peer id>`).
pub(super) fn build_swarm(
    keypair: Keypair,
    sockets: Arc<Sockets>,
    mdns_on: bool,
    listen: &str,
    bootstrap: &[String],
) -> Result<Swarm<Behaviour>> {
    let local = keypair.public().to_peer_id();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(|key| {
            Ok(
                tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                    .map(move |s, _| sockets.track(s))
                    .upgrade(upgrade::Version::V1Lazy)
                    .authenticate(noise::Config::new(key)?)
                    .multiplex(yamux::Config::default())
                    .boxed(),
            )
        })
        .map_err(p2p_err)?
        .with_behaviour(|key| {
            let mut kcfg = kad::Config::new(StreamProtocol::new("/cpushare/kad/1"));
            kcfg.set_query_timeout(Duration::from_secs(20));
            let mut kad =
                kad::Behaviour::with_config(local, kad::store::MemoryStore::new(local), kcfg);
            // small private swarms on loopback never get a confirmed external
            // address; serve the DHT anyway
            kad.set_mode(Some(kad::Mode::Server));
            let mdns = if mdns_on {
                Some(mdns::tokio::Behaviour::new(mdns::Config::default(), local)?)
            } else {
                None
            };
            Ok(Behaviour {
                identify: identify::Behaviour::new(identify::Config::new(
                    "/cpushare/id/1".into(),
                    key.public(),
                )),
                ping: ping::Behaviour::new(ping::Config::new()),
                kad,
                stream: libp2p_stream::Behaviour::new(),
                mdns: Toggle::from(mdns),
                gossipsub: gossipsub::Behaviour::new(
                    gossipsub::MessageAuthenticity::Signed(key.clone()),
                    gossipsub::ConfigBuilder::default()
                        .heartbeat_interval(Duration::from_secs(1))
                        .validation_mode(gossipsub::ValidationMode::Strict)
                        .max_transmit_size(64 * 1024)
                        .build()
                        .map_err(p2p_err)?,
                )
                .map_err(p2p_err)?,
            })
        })
        .map_err(p2p_err)?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();
    let listen_addr: Multiaddr = listen.parse().map_err(|e| Error::BadArg {
        what: "--listen",
        reason: format!("{listen:?} is not a multiaddr: {e}"),
    })?;
    swarm
        .listen_on(listen_addr.clone())
        .map_err(|e| Error::BadArg {
            what: "--listen",
            reason: format!("cannot listen on {listen_addr}: {e}"),
        })?;
    for b in bootstrap {
        let addr: Multiaddr = b.parse().map_err(|e| Error::BadArg {
            what: "--bootstrap",
            reason: format!("{b:?} is not a multiaddr: {e}"),
        })?;
        let Some(libp2p::multiaddr::Protocol::P2p(peer)) = addr.iter().last() else {
            return Err(Error::BadArg {
                what: "--bootstrap",
                reason: format!("{b} must end in /p2p/<peer id>"),
            });
        };
        swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
        if let Err(e) = swarm.dial(addr) {
            warn!(bootstrap = %b, error = %e, "cannot dial bootstrap peer");
        }
    }
    Ok(swarm)
}
