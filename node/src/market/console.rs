//! A running lease's serial console on its way to the buyer: in order, one message
//! in flight at a time, and what the guest prints meanwhile coalesced into the next
//! message. Sent as one stream per console read, several at once, some were dropped
//! when the buyer's accept queue was full and the buyer's console.log got NUL-filled
//! gaps where they belonged.

use libp2p::PeerId;
use market::{LeaseId, MarketMsg};
use tokio::sync::mpsc;
use tracing::warn;

use super::net::MarketNet;

/// The most console bytes one message carries (the wire's limit).
const MAX_PART: usize = market::wire::MAX_CONSOLE;

/// Feeds one lease's console output to its buyer, in order.
pub struct ConsoleSender {
    tx: mpsc::UnboundedSender<(u64, Vec<u8>)>,
}

impl ConsoleSender {
    /// Start the sender of `lease`'s console to `buyer` (on the current runtime).
    pub fn spawn(net: MarketNet, buyer: PeerId, lease: LeaseId) -> ConsoleSender {
        let (tx, mut rx) = mpsc::unbounded_channel::<(u64, Vec<u8>)>();
        tokio::spawn(async move {
            let mut carry: Option<(u64, Vec<u8>)> = None;
            loop {
                let (offset, mut data) = match carry.take() {
                    Some(c) => c,
                    None => match rx.recv().await {
                        Some(c) => c,
                        None => break,
                    },
                };
                // What else is waiting and follows on, while it fits one message.
                while data.len() < MAX_PART {
                    match rx.try_recv() {
                        Ok((o, d))
                            if o == offset + data.len() as u64
                                && data.len() + d.len() <= MAX_PART =>
                        {
                            data.extend(d)
                        }
                        Ok(other) => {
                            carry = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let mut at = offset;
                for part in data.chunks(MAX_PART) {
                    let msg = MarketMsg::Console {
                        lease,
                        offset: at,
                        data: part.to_vec(),
                    };
                    send(&net, buyer, lease, &msg).await;
                    at += part.len() as u64;
                }
            }
        });
        ConsoleSender { tx }
    }

    /// Queue `data`, the console's bytes from `offset` on.
    pub fn push(&self, offset: u64, data: Vec<u8>) {
        let _ = self.tx.send((offset, data));
    }
}

async fn send(net: &MarketNet, buyer: PeerId, lease: LeaseId, msg: &MarketMsg) {
    if !net.deliver(buyer, msg).await {
        if let MarketMsg::Console { offset, data, .. } = msg {
            warn!(%lease, %buyer, offset, bytes = data.len(), "console output not delivered to the buyer");
        }
    }
}
