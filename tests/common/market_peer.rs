//! A scripted market peer for the bad-input tests: a libp2p node with an ed25519
//! identity of its own (the same key signs its market messages), the market stream
//! protocol and gossipsub. It sends whatever bytes a test wants, well-formed or not,
//! and hands back the market messages a daemon sends it.

use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use ed25519_dalek::SigningKey;
use futures::prelude::*;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{gossipsub, noise, tcp, yamux, Multiaddr, PeerId, StreamProtocol};
use market::{MarketMsg, PeerKey};
use rand::RngCore;
use tokio::sync::{mpsc, oneshot};

/// The node's market protocol (one message per stream).
pub const MARKET: &str = "/cpushare/market/1";
/// The gossipsub topic of sellers' offers.
pub const OFFER_TOPIC: &str = "cpushare/offers/1";

#[derive(NetworkBehaviour)]
struct Behaviour {
    stream: libp2p_stream::Behaviour,
    gossipsub: gossipsub::Behaviour,
}

enum Cmd {
    Dial(Multiaddr, oneshot::Sender<Result<PeerId, String>>),
    Publish(Vec<u8>, oneshot::Sender<Result<(), String>>),
    /// Answers once `peer` is subscribed to the offer topic (as we see it).
    WaitSubscribed(PeerId, oneshot::Sender<()>),
}

/// One length-prefixed market frame: u32 big-endian length, then the body.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

/// The ed25519 key inside an ed25519 peer id.
pub fn key_of(peer: &PeerId) -> Result<PeerKey> {
    let pk = libp2p::identity::PublicKey::try_decode_protobuf(peer.as_ref().digest())
        .context("peer id holds no inline public key")?;
    let ed = pk.try_into_ed25519().context("not an ed25519 peer id")?;
    Ok(PeerKey(ed.to_bytes()))
}

/// A fresh random ed25519 key (for other parties' signatures).
pub fn random_key() -> SigningKey {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    SigningKey::from_bytes(&b)
}

pub struct MarketPeer {
    /// Signs as this peer: its libp2p identity is the same key.
    pub sk: SigningKey,
    pub key: PeerKey,
    pub id: PeerId,
    ctl: libp2p_stream::Control,
    cmds: mpsc::UnboundedSender<Cmd>,
    inbox: mpsc::UnboundedReceiver<(PeerId, MarketMsg)>,
}

impl MarketPeer {
    /// Starts the peer's swarm (on the current tokio runtime), subscribed to the
    /// offer topic, accepting market streams.
    pub fn new() -> Result<MarketPeer> {
        let sk = random_key();
        let keypair = libp2p::identity::Keypair::ed25519_from_bytes(sk.to_bytes())?;
        let id = keypair.public().to_peer_id();
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )?
            .with_behaviour(|key| {
                let gossipsub = gossipsub::Behaviour::new(
                    gossipsub::MessageAuthenticity::Signed(key.clone()),
                    gossipsub::ConfigBuilder::default()
                        .heartbeat_interval(Duration::from_secs(1))
                        .validation_mode(gossipsub::ValidationMode::Strict)
                        .max_transmit_size(64 * 1024)
                        .build()
                        .map_err(|e| anyhow::anyhow!("gossipsub config: {e}"))?,
                )
                .map_err(|e| anyhow::anyhow!("gossipsub: {e}"))?;
                Ok(Behaviour {
                    stream: libp2p_stream::Behaviour::new(),
                    gossipsub,
                })
            })?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
            .build();
        let topic = gossipsub::IdentTopic::new(OFFER_TOPIC);
        swarm.behaviour_mut().gossipsub.subscribe(&topic)?;
        let ctl = swarm.behaviour().stream.new_control();
        let mut incoming = ctl.clone().accept(StreamProtocol::new(MARKET))?;

        // Every market stream a daemon opens to us: one frame, decoded.
        let (in_tx, inbox) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some((peer, mut s)) = incoming.next().await {
                let in_tx = in_tx.clone();
                tokio::spawn(async move {
                    let mut len = [0u8; 4];
                    if s.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
                    if s.read_exact(&mut buf).await.is_err() {
                        return;
                    }
                    if let Ok(m) = market::decode(&buf) {
                        let _ = in_tx.send((peer, m));
                        // Say we took it, as a daemon does (the sender retries otherwise).
                        let _ = s.write_all(&[0x5a]).await;
                        let _ = s.close().await;
                    }
                });
            }
        });

        let (cmds, mut cmd_rx) = mpsc::unbounded_channel::<Cmd>();
        tokio::spawn(async move {
            let mut dials: Vec<(ConnectionId, oneshot::Sender<Result<PeerId, String>>)> =
                Vec::new();
            let mut sub_waits: Vec<(PeerId, oneshot::Sender<()>)> = Vec::new();
            loop {
                tokio::select! {
                    cmd = cmd_rx.recv() => match cmd {
                        None => return,
                        Some(Cmd::Dial(addr, reply)) => {
                            let opts = DialOpts::unknown_peer_id().address(addr).build();
                            let cid = opts.connection_id();
                            match swarm.dial(opts) {
                                Ok(()) => dials.push((cid, reply)),
                                Err(e) => { let _ = reply.send(Err(e.to_string())); }
                            }
                        }
                        Some(Cmd::Publish(data, reply)) => {
                            let r = swarm
                                .behaviour_mut()
                                .gossipsub
                                .publish(topic.clone(), data)
                                .map(|_| ())
                                .map_err(|e| e.to_string());
                            let _ = reply.send(r);
                        }
                        Some(Cmd::WaitSubscribed(peer, reply)) => {
                            let subscribed = swarm
                                .behaviour()
                                .gossipsub
                                .all_peers()
                                .any(|(p, topics)| *p == peer && topics.iter().any(|t| t.as_str() == OFFER_TOPIC));
                            if subscribed {
                                let _ = reply.send(());
                            } else {
                                sub_waits.push((peer, reply));
                            }
                        }
                    },
                    ev = swarm.select_next_some() => match ev {
                        SwarmEvent::ConnectionEstablished { peer_id, connection_id, .. } => {
                            if let Some(i) = dials.iter().position(|(c, _)| *c == connection_id) {
                                let _ = dials.swap_remove(i).1.send(Ok(peer_id));
                            }
                        }
                        SwarmEvent::OutgoingConnectionError { connection_id, error, .. } => {
                            if let Some(i) = dials.iter().position(|(c, _)| *c == connection_id) {
                                let _ = dials.swap_remove(i).1.send(Err(error.to_string()));
                            }
                        }
                        SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(
                            gossipsub::Event::Subscribed { peer_id, topic: t },
                        )) if t.as_str() == OFFER_TOPIC => {
                            let (done, rest): (Vec<_>, Vec<_>) =
                                sub_waits.drain(..).partition(|(p, _)| *p == peer_id);
                            sub_waits = rest;
                            for (_, reply) in done {
                                let _ = reply.send(());
                            }
                        }
                        _ => {}
                    },
                }
            }
        });
        Ok(MarketPeer {
            key: PeerKey::of(&sk),
            sk,
            id,
            ctl,
            cmds,
            inbox,
        })
    }

    /// Dials a daemon at `addr` (`/ip4/../tcp/..`) and waits for the connection.
    pub async fn connect(&self, addr: &str) -> Result<PeerId> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Dial(addr.parse()?, tx))
            .map_err(|_| anyhow::anyhow!("swarm task gone"))?;
        match tokio::time::timeout(Duration::from_secs(20), rx).await {
            Ok(Ok(Ok(p))) => Ok(p),
            Ok(Ok(Err(e))) => bail!("cannot connect to {addr}: {e}"),
            _ => bail!("no connection to {addr} in 20 s"),
        }
    }

    /// Opens a fresh market stream to `peer` and writes `bytes` on it; `close`
    /// ends our side after (a well-behaved sender), otherwise the stream stays open
    /// and is returned so the test decides when it goes.
    pub async fn send_raw(
        &self,
        peer: PeerId,
        bytes: &[u8],
        close: bool,
    ) -> Result<Option<libp2p::Stream>> {
        let mut s = self
            .ctl
            .clone()
            .open_stream(peer, StreamProtocol::new(MARKET))
            .await
            .context("opening a market stream")?;
        s.write_all(bytes).await?;
        s.flush().await?;
        if close {
            s.close().await?;
            Ok(None)
        } else {
            Ok(Some(s))
        }
    }

    /// Sends one well-formed market message.
    pub async fn send(&self, peer: PeerId, m: &MarketMsg) -> Result<()> {
        self.send_raw(peer, &frame(&market::encode(m)), true)
            .await?;
        Ok(())
    }

    /// The next market message a daemon sent us, if one comes within `wait`.
    pub async fn recv(&mut self, wait: Duration) -> Option<(PeerId, MarketMsg)> {
        tokio::time::timeout(wait, self.inbox.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next message matching `f` within `wait`; others are dropped (phases,
    /// retransmissions).
    pub async fn recv_where(
        &mut self,
        wait: Duration,
        mut f: impl FnMut(&MarketMsg) -> bool,
    ) -> Option<MarketMsg> {
        let end = tokio::time::Instant::now() + wait;
        loop {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            let (_, m) = self.recv(left).await?;
            if f(&m) {
                return Some(m);
            }
        }
    }

    /// Waits until `peer` is subscribed to the offer topic (so a publish reaches it).
    pub async fn wait_subscribed(&self, peer: PeerId) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::WaitSubscribed(peer, tx))
            .map_err(|_| anyhow::anyhow!("swarm task gone"))?;
        match tokio::time::timeout(Duration::from_secs(20), rx).await {
            Ok(Ok(())) => Ok(()),
            _ => bail!("{peer} did not subscribe to {OFFER_TOPIC} in 20 s"),
        }
    }

    /// Publishes `data` on the offer topic.
    pub async fn publish(&self, data: Vec<u8>) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Publish(data, tx))
            .map_err(|_| anyhow::anyhow!("swarm task gone"))?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => bail!("publish: {e}"),
            Err(_) => bail!("swarm task gone"),
        }
    }
}
