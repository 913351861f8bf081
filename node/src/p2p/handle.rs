//! What other services hold of the networking task: [`P2pHandle`] (commands in)
//! and [`PeerEvent`]s (peer news out).

use std::sync::Mutex;
use std::time::Duration;

use chunks::ImageId;
use libp2p::{Multiaddr, PeerId};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::control::Progress;
use crate::error::{Error, Result};

/// What the networking task tells the market service about peers.
#[derive(Debug)]
pub enum PeerEvent {
    /// A first connection to `peer`; `addr` is its address as seen from here.
    Connected { peer: PeerId, addr: Multiaddr },
    /// One of our own addresses appeared or went away (a home line's new IP).
    AddressesChanged,
    /// A ping round trip measured by us (never a figure the peer declares).
    Rtt { peer: PeerId, rtt: Duration },
    /// A gossip message on a topic we subscribe to (its payload is signed by its
    /// author; the gossip source is not trusted for anything).
    Gossip { topic: String, data: Vec<u8> },
}

/// What other services get from the networking task.
pub struct P2pHandle {
    /// Opens and accepts streams of protocols other than the swarm's own.
    pub control: libp2p_stream::Control,
    /// Peer events (one consumer: taken once).
    pub events: Mutex<Option<mpsc::UnboundedReceiver<PeerEvent>>>,
    pub(super) cmds: mpsc::UnboundedSender<Cmd>,
}

impl P2pHandle {
    /// Subscribe to gossip `topic` (its messages arrive as [`PeerEvent::Gossip`]).
    pub fn subscribe(&self, topic: &str) {
        let _ = self.cmds.send(Cmd::Subscribe(topic.to_string()));
    }

    /// Publish `data` on gossip `topic` (dropped quietly while nobody listens).
    pub fn publish(&self, topic: &str, data: Vec<u8>) {
        let _ = self.cmds.send(Cmd::Publish(topic.to_string(), data));
    }

    /// Dial `peer` (by its known addresses) unless connected.
    pub fn dial(&self, peer: PeerId) {
        let _ = self.cmds.send(Cmd::Dial(peer));
    }

    /// Dial `peer` again even if connected: after our address changed, the old
    /// connection may hang until TCP gives up; the peer sees the new one at once.
    pub fn redial(&self, peer: PeerId) {
        let _ = self.cmds.send(Cmd::Redial(peer));
    }

    /// Adds a grant (a lease's, letting us fetch its image) to the book; it goes
    /// before any fetch asked for after this call.
    pub fn add_grant(&self, g: market::Signed<market::ImageGrant>) {
        let _ = self.cmds.send(Cmd::Grant(g));
    }

    /// Fetch `image` into the store through the swarm; `progress` sees the chunks.
    pub async fn fetch(&self, image: ImageId, progress: Progress) -> Result<Value> {
        fetch_via(&self.cmds, image, progress).await
    }
}

/// Sends a fetch to the networking task and waits for its report.
pub(super) async fn fetch_via(
    cmds: &mpsc::UnboundedSender<Cmd>,
    image: ImageId,
    progress: Progress,
) -> Result<Value> {
    let stopped = || Error::P2p("the networking task stopped".into());
    let (reply, rx) = oneshot::channel();
    cmds.send(Cmd::Fetch {
        image,
        progress,
        reply,
    })
    .map_err(|_| stopped())?;
    match rx.await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::P2p(e)),
        Err(_) => Err(stopped()),
    }
}

/// A command to the networking task.
pub(super) enum Cmd {
    Fetch {
        image: ImageId,
        progress: Progress,
        reply: oneshot::Sender<std::result::Result<Value, String>>,
    },
    Subscribe(String),
    Publish(String, Vec<u8>),
    Dial(PeerId),
    Redial(PeerId),
    /// A grant for our book (issued by us, or one that admits us).
    Grant(market::Signed<market::ImageGrant>),
}

/// A caller waiting for a fetch: sees its progress, gets its report.
pub(super) struct Waiter {
    pub progress: Progress,
    pub reply: oneshot::Sender<std::result::Result<Value, String>>,
}

impl Waiter {
    /// Ends the wait with `msg` as the error.
    pub fn fail(self, msg: &str) {
        let _ = self.reply.send(Err(msg.to_string()));
    }
}
