//! Connections: who is connected and from which IP; a peer that moved; our own
//! addresses coming and going (a home line's new IP).

use std::net::IpAddr;

use chunks::swarm::Micros;
use chunks::ImageId;
use libp2p::core::ConnectedPoint;
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};
use tracing::{debug, info};

use super::handle::PeerEvent;
use super::Net;

/// How long an address of ours must stay away before it counts as gone (an
/// interface flapping comes back sooner; a home line's old IP never does).
const ADDR_SETTLE_US: Micros = 1_500_000;

/// The IP address in a multiaddr, if any.
pub fn ip_of(a: &Multiaddr) -> Option<IpAddr> {
    a.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        libp2p::multiaddr::Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

/// Our addresses that went away, each until it has been away `ADDR_SETTLE_US`.
#[derive(Default)]
pub(super) struct LostAddrs(Vec<(Micros, IpAddr)>);

impl LostAddrs {
    /// `ip` stopped being ours at `now`.
    pub fn gone(&mut self, ip: IpAddr, now: Micros) {
        self.0.push((now, ip));
    }

    /// The addresses away for `ADDR_SETTLE_US` by `now`, each reported once.
    pub fn settled(&mut self, now: Micros) -> Vec<IpAddr> {
        let (done, wait): (Vec<_>, Vec<_>) = self
            .0
            .iter()
            .partition(|(at, _)| now.saturating_sub(*at) >= ADDR_SETTLE_US);
        self.0 = wait;
        done.into_iter().map(|(_, ip)| ip).collect()
    }
}

impl Net {
    pub(super) fn on_new_listen_addr(&mut self, address: Multiaddr) {
        info!(addr = %address, "listening");
        println!("listening on {address}");
        self.listen.push(address);
        let _ = self.peer_events.send(PeerEvent::AddressesChanged);
    }

    pub(super) fn on_expired_listen_addr(&mut self, address: Multiaddr) {
        info!(addr = %address, "address gone");
        self.listen.retain(|a| *a != address);
        if let Some(ip) = ip_of(&address).filter(|ip| !ip.is_loopback()) {
            let now = self.now();
            self.lost_addrs.gone(ip, now);
        }
        let _ = self.peer_events.send(PeerEvent::AddressesChanged);
    }

    pub(super) fn on_connected(
        &mut self,
        peer_id: PeerId,
        endpoint: &ConnectedPoint,
        connection_id: ConnectionId,
    ) {
        // A peer that comes back from another IP has moved (a home line's new
        // address): its connections from the old one are dead but would linger
        // until TCP gives up, and streams opened on them would stall.
        let ip = ip_of(endpoint.get_remote_address());
        let conns = self.conn_ips.entry(peer_id).or_default();
        if let Some(ip) = ip {
            for (old, old_ip) in conns.iter() {
                if *old_ip != ip {
                    debug!(peer = %peer_id, %old_ip, %ip, "peer moved: closing its old connection");
                    self.swarm.close_connection(*old);
                }
            }
            conns.retain(|(_, i)| *i == ip);
            conns.push((connection_id, ip));
        }
        // Every new connection, not only the first: a peer that moved comes
        // back on a second one while the old one has not timed out yet.
        let _ = self.peer_events.send(PeerEvent::Connected {
            peer: peer_id,
            addr: endpoint.get_remote_address().clone(),
        });
        if !self.connected.insert(peer_id) {
            return;
        }
        debug!(peer = %peer_id, "connected");
        let fetching: Vec<ImageId> = self.manifest_fetches.keys().copied().collect();
        for image in fetching {
            self.ask_manifest_from(image, peer_id);
        }
        self.greet_leeching(peer_id);
    }

    /// One of `peer`'s connections closed; `remaining` are still open.
    pub(super) fn on_connection_closed(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        remaining: u32,
    ) {
        if remaining > 0 {
            if let Some(c) = self.conn_ips.get_mut(&peer_id) {
                c.retain(|(id, _)| *id != connection_id);
            }
            return;
        }
        self.conn_ips.remove(&peer_id);
        self.connected.remove(&peer_id);
        self.grants.disconnected(&peer_id);
        self.links.close(&peer_id);
        self.forget_peer(peer_id);
    }

    /// Whether we reach `peer` over loopback (it is on this host).
    pub(super) fn is_local_peer(&self, peer: &PeerId) -> bool {
        self.conn_ips
            .get(peer)
            .is_some_and(|c| c.iter().any(|(_, ip)| ip.is_loopback()))
    }

    /// An address of ours that went away and did not come back within a moment (a
    /// home line's new IP, not an interface flapping): connections made from it are
    /// dead but linger until TCP gives up, and streams opened on them stall. Drop
    /// every connection; the services dial their peers again from the new address.
    pub(super) fn drop_connections_of_lost_addresses(&mut self) {
        let now = self.now();
        for ip in self.lost_addrs.settled(now) {
            if self.listen.iter().any(|a| ip_of(a) == Some(ip)) {
                continue;
            }
            info!(%ip, "our address is gone: reconnecting every peer");
            let peers: Vec<PeerId> = self.connected.iter().copied().collect();
            for p in peers {
                let _ = self.swarm.disconnect_peer_id(p);
            }
            let _ = self.peer_events.send(PeerEvent::AddressesChanged);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_address_counts_once_after_it_settles() {
        let a: IpAddr = "192.0.2.7".parse().expect("ip");
        let b: IpAddr = "192.0.2.8".parse().expect("ip");
        let mut l = LostAddrs::default();
        l.gone(a, 1_000_000);
        l.gone(b, 2_000_000);
        assert!(l.settled(2_499_999).is_empty());
        assert_eq!(l.settled(2_500_000), vec![a]);
        assert!(l.settled(3_000_000).is_empty());
        assert_eq!(l.settled(3_500_000), vec![b]);
        assert!(l.settled(10_000_000).is_empty());
    }

    #[test]
    fn ip_of_finds_v4_and_v6() {
        let v4: Multiaddr = "/ip4/192.0.2.1/tcp/7450".parse().expect("addr");
        let v6: Multiaddr = "/ip6/::1/tcp/7450".parse().expect("addr");
        let none: Multiaddr = "/dns4/example.invalid/tcp/1".parse().expect("addr");
        assert_eq!(ip_of(&v4), "192.0.2.1".parse().ok());
        assert_eq!(ip_of(&v6), "::1".parse().ok());
        assert_eq!(ip_of(&none), None);
    }
}
