//! The market inside the daemon: offers, leases, billing and re-dispatch.
//!
//! The decisions are made by the sans-IO cores of the `market` crate (offer book,
//! selection, `SellerLease`, `Fleet`); this module is their shell: it carries
//! their messages over libp2p (offers on a gossipsub topic, lease messages on a
//! stream protocol of their own), keeps their records in sled, and does what their
//! actions say (fetch the image, start the guest, admit it to the overlay).

pub mod audit;
pub mod buyer;
pub mod cli;
pub mod console;
pub mod db;
pub mod lease_run;
pub mod net;
pub mod score;
pub mod seller;
pub mod trust;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use libp2p::PeerId;

use crate::control::Router;
use crate::domain::Role;
use crate::error::Result;
use crate::node::Node;
use crate::overlay_service::OverlayHandle;
use crate::p2p::P2pHandle;

/// The gossipsub topic sellers publish their signed offers on.
pub const OFFER_TOPIC: &str = "cpushare/offers/1";

/// Unix time in milliseconds: what the market cores take as `now`.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What both roles' services listen to: market messages and peer events (taken
/// once); both subscribe to the offer topic (sellers relay it, buyers read it).
type Inputs = (
    tokio::sync::mpsc::UnboundedReceiver<(PeerId, market::MarketMsg)>,
    tokio::sync::mpsc::UnboundedReceiver<crate::p2p::PeerEvent>,
);

fn connect(p2p: &P2pHandle, net: &net::MarketNet) -> Result<Inputs> {
    let incoming = net.listen()?;
    let events = p2p
        .events
        .lock()
        .expect("events lock")
        .take()
        .ok_or_else(|| crate::error::Error::Market("peer events taken twice".into()))?;
    p2p.subscribe(OFFER_TOPIC);
    Ok((incoming, events))
}

/// Asks the market service to end its leases cleanly (SIGTERM).
pub struct Shutdown {
    tx: Option<tokio::sync::mpsc::UnboundedSender<tokio::sync::oneshot::Sender<()>>>,
}

impl Shutdown {
    /// Seller: ends every live lease (guests stopped, buyers told, billing closed at
    /// the last acknowledged period) and waits up to `wait` for the guests to go.
    pub async fn run(&self, wait: std::time::Duration) {
        let Some(tx) = &self.tx else { return };
        let (done, rx) = tokio::sync::oneshot::channel();
        if tx.send(done).is_ok() {
            let _ = tokio::time::timeout(wait, rx).await;
            // Let the last messages to the buyers leave.
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }
}

/// Starts the market service of this node's role and registers its methods.
pub fn start(
    node: Arc<Node>,
    router: &mut Router,
    p2p: Arc<P2pHandle>,
    overlay: OverlayHandle,
) -> Result<Shutdown> {
    let db = db::MarketDb::open(&node.settings.data_dir)?;
    let net = net::MarketNet::new(p2p.control.clone());
    match node.role {
        Role::Seller => {
            let tx = seller::start(node, router, p2p, overlay, net, db)?;
            Ok(Shutdown { tx: Some(tx) })
        }
        Role::Buyer => {
            buyer::start(node, router, p2p, overlay, net, db)?;
            Ok(Shutdown { tx: None })
        }
    }
}
