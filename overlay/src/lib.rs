//! The buyer-owned layer-2 overlay.
//!
//! Everything outside `io` is sans-IO: the cores take datagrams, frames and an
//! `Instant` and hand out [`Action`]s; the I/O shells in `io` own sockets, taps and
//! clocks.
//!
//! - [`wire`]: message framing (handshake initiation/response, data, keepalive).
//! - [`identity`]: ed25519 identity and the Noise static key bound to it.
//! - [`session`]: Noise IK handshakes (snow) and the transport keys (explicit
//!   counters, header as associated data), [`replay`]: the sliding replay window.
//! - [`BuyerCore`]: Noise responder for every admitted guest, learning [`switch`],
//!   [`dhcp`] server, handshake rate limiting ([`ratelimit`]) and [`cookie`] replies.
//! - [`SellerCore`]: Noise initiator for one guest, egress [`filter`].
//! - [`stats`]: counters and drop reasons for `cpushare-node status`.

pub mod action;
pub mod buyer;
pub mod config;
pub mod cookie;
pub mod dhcp;
pub mod error;
pub mod eth;
pub mod filter;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod io;
pub mod ratelimit;
pub mod replay;
pub mod seller;
pub mod session;
pub mod stats;
pub mod switch;
pub mod wire;

#[cfg(test)]
mod core_tests;
#[cfg(test)]
mod testutil;

pub use action::{Action, Actions, Event};
pub use buyer::BuyerCore;
pub use config::{
    guest_mtu_for_path, BuyerConfig, GuestLease, HandshakeLimits, RateLimits, SellerConfig, Timers,
    DEFAULT_GUEST_MTU, OVERLAY_OVERHEAD,
};
pub use error::{Error, Result};
pub use eth::MacAddr;
pub use identity::{parse_peer_key, Identity, PeerKey};
pub use seller::SellerCore;
pub use stats::{BuyerStats, DropCounters, DropReason, PeerStats, SellerStats, Traffic};
