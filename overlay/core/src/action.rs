//! What the cores ask their I/O shell to do.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};

use crate::{Error, MacAddr, PeerKey};

/// One thing the I/O shell must do.
#[derive(Debug)]
pub enum Action {
    /// Send `bytes` as one UDP datagram to `to`.
    SendUdp {
        /// Destination endpoint.
        to: SocketAddr,
        /// Datagram payload.
        bytes: Vec<u8>,
    },
    /// Buyer: write this Ethernet frame to the host tap.
    WriteTap(Vec<u8>),
    /// Seller: write this Ethernet frame to the guest's tap (it passed the ingress check).
    DeliverToGuest(Vec<u8>),
    /// Something worth logging.
    Event(Event),
}

/// Notable state changes, for logs and status.
#[derive(Debug)]
pub enum Event {
    /// A Noise session with a peer is up (first time or after a rekey).
    SessionEstablished {
        /// The peer's ed25519 key.
        peer: PeerKey,
        /// The guest MAC the session carries.
        guest_mac: MacAddr,
        /// The peer's UDP endpoint.
        endpoint: SocketAddr,
        /// True if this replaced an earlier session (rekey).
        rekey: bool,
    },
    /// A session's keys expired without a rekey; traffic stops until a new handshake.
    SessionExpired {
        /// The peer's ed25519 key.
        peer: PeerKey,
        /// The guest MAC the session carried.
        guest_mac: MacAddr,
    },
    /// An authenticated peer now sends from another endpoint (NAT rebinding).
    EndpointChanged {
        /// The peer's ed25519 key.
        peer: PeerKey,
        /// The guest MAC the session carries.
        guest_mac: MacAddr,
        /// The new endpoint.
        endpoint: SocketAddr,
    },
    /// The seller sent a handshake initiation (attempt counts from 1 per rekey).
    HandshakeInitiated {
        /// Where it went.
        to: SocketAddr,
        /// Attempt number since the last established session.
        attempt: u32,
    },
    /// A handshake message was rejected (not counted per-packet-rate-limited ones).
    HandshakeRejected {
        /// Where it came from.
        from: SocketAddr,
        /// Why.
        error: Error,
    },
    /// The buyer's DHCP server acknowledged a guest's address.
    DhcpAck {
        /// The guest MAC.
        guest_mac: MacAddr,
        /// The address given.
        ip: Ipv4Addr,
    },
}

/// A queue of actions plus a pool of reusable buffers.
///
/// Pass the same `Actions` to every call; drain it after each call and hand spent
/// buffers back with [`Actions::recycle`] so the data path does not allocate.
#[derive(Debug, Default)]
pub struct Actions {
    queue: VecDeque<Action>,
    pool: Vec<Vec<u8>>,
}

/// Buffers kept for reuse at most.
const POOL_MAX: usize = 256;
/// Capacity of a fresh buffer: a full datagram.
const BUF_CAPACITY: usize = 2048;

impl Actions {
    /// An empty queue.
    pub fn new() -> Actions {
        Actions::default()
    }

    /// Takes the oldest action.
    pub fn pop(&mut self) -> Option<Action> {
        self.queue.pop_front()
    }

    /// Takes all actions in order.
    pub fn drain(&mut self) -> std::collections::vec_deque::Drain<'_, Action> {
        self.queue.drain(..)
    }

    /// Number of queued actions.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// True if no action is queued.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Returns a spent buffer (from `SendUdp`, `WriteTap`, `DeliverToGuest`) for reuse.
    pub fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.pool.len() < POOL_MAX && buf.capacity() >= BUF_CAPACITY {
            buf.clear();
            self.pool.push(buf);
        }
    }

    pub(crate) fn push(&mut self, a: Action) {
        self.queue.push_back(a);
    }

    pub(crate) fn event(&mut self, e: Event) {
        self.queue.push_back(Action::Event(e));
    }

    /// An empty buffer with room for a full datagram.
    pub(crate) fn buffer(&mut self) -> Vec<u8> {
        self.pool
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(BUF_CAPACITY))
    }
}
