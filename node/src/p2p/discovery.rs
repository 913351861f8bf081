//! Finding peers and images: Kademlia (provider records, addresses learnt by
//! identify), optional mDNS on the LAN.

use chunks::ImageId;
use libp2p::{identify, kad, mdns, Multiaddr, PeerId};
use tracing::{debug, warn};

use super::conns::ip_of;
use super::grants::provider_key;
use super::Net;

impl Net {
    /// Starts a provider lookup of `image` (answers come as kad events), under
    /// the key derived from its id: the DHT never sees the id itself.
    pub(super) fn find_providers(&mut self, image: ImageId) {
        let q = self
            .swarm
            .behaviour_mut()
            .kad
            .get_providers(kad::RecordKey::new(&provider_key(&image)));
        self.provider_queries.insert(q, image);
    }

    /// Advertises `image` in the DHT (once), under its derived provider key.
    pub(super) fn provide(&mut self, image: ImageId) {
        if self.providing.insert(image) {
            if let Err(e) = self
                .swarm
                .behaviour_mut()
                .kad
                .start_providing(kad::RecordKey::new(&provider_key(&image)))
            {
                warn!(image = %image, error = %e, "cannot advertise image");
                self.providing.remove(&image);
            }
        }
    }

    /// Advertises complete local images (imports happen outside this task).
    pub(super) fn provide_complete_images(&mut self) {
        if let Ok(list) = self.store.list_images() {
            for image in list {
                if !self.providing.contains(&image)
                    && self.store.is_complete(image).unwrap_or(false)
                {
                    self.provide(image);
                }
            }
        }
        // forget finished provider queries
        if self.provider_queries.len() > 256 {
            self.provider_queries.clear();
        }
    }

    pub(super) fn on_identify(&mut self, peer_id: PeerId, info: identify::Info) {
        // A peer's loopback addresses are ours to it only when it is on this
        // host (we reach it over loopback); otherwise dialling them reaches
        // ourselves, and a redial after our address changed goes nowhere.
        let local = self.is_local_peer(&peer_id);
        for a in info.listen_addrs {
            if local || !ip_of(&a).is_some_and(|ip| ip.is_loopback()) {
                self.swarm.behaviour_mut().kad.add_address(&peer_id, a);
            }
        }
    }

    pub(super) fn on_mdns(&mut self, ev: mdns::Event) {
        match ev {
            mdns::Event::Discovered(list) => {
                for (p, a) in list {
                    self.swarm.behaviour_mut().kad.add_address(&p, a.clone());
                    let _ = self.swarm.dial(a);
                }
            }
            mdns::Event::Expired(list) => {
                // The peer stopped announcing this address on the LAN. Forget it
                // unless we are connected (identify re-adds the addresses it uses).
                for (p, a) in list {
                    if !self.swarm.is_connected(&p) {
                        debug!(peer = %p, addr = %a, "mDNS address expired");
                        self.forget_address(&p, &a);
                    }
                }
            }
        }
    }

    fn forget_address(&mut self, p: &PeerId, a: &Multiaddr) {
        self.swarm.behaviour_mut().kad.remove_address(p, a);
    }

    pub(super) fn on_providers(&mut self, id: kad::QueryId, res: kad::GetProvidersResult) {
        let Some(&image) = self.provider_queries.get(&id) else {
            return;
        };
        match res {
            Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => {
                let me = *self.swarm.local_peer_id();
                for p in providers.into_iter().filter(|p| *p != me) {
                    self.ask_manifest_from(image, p);
                    if self.images.contains_key(&image) {
                        self.greet(image, p);
                    }
                }
            }
            Ok(_) | Err(_) => {
                self.provider_queries.remove(&id);
            }
        }
    }
}
