//! The sans-IO core of the buyer-owned layer-2 overlay.
//!
//! Nothing here touches a socket, a tap, a clock or the OS's entropy on its own: the
//! cores take datagrams, frames and an `Instant` and hand out [`Action`]s, and draw
//! their randomness (session indices, Noise ephemeral keys, cookie secrets) from an
//! RNG they are given ([`BuyerCore::with_rng`], [`SellerCore::with_rng`]); tests
//! pass a seeded one. The I/O shells live in the `overlay` crate, which re-exports
//! this one.
//!
//! - [`wire`]: message framing (handshake initiation/response, data, keepalive).
//! - [`identity`]: ed25519 identity and the Noise static key bound to it.
//! - [`session`]: Noise IK handshakes (snow) and the transport keys (explicit
//!   counters, header as associated data), [`replay`]: the sliding replay window.
//! - [`BuyerCore`]: Noise responder for every admitted guest, learning [`switch`],
//!   [`dhcp`] server, handshake rate limiting ([`ratelimit`]) and [`cookie`] replies.
//! - [`SellerCore`]: Noise initiator for one guest, egress [`filter`].
//! - [`offload`]: virtio-net headers, checksum completion, segmentation and merging.
//! - [`checksum`]: the one Internet checksum every module uses.
//! - [`stats`]: counters and drop reasons for `cpushare-node status`.

#![forbid(unsafe_code)]

pub mod action;
pub mod buyer;
pub mod checksum;
pub mod config;
pub mod cookie;
pub mod dhcp;
pub mod error;
pub mod eth;
pub mod filter;
pub mod frames;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod offload;
pub mod ratelimit;
pub mod replay;
pub mod rng;
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
    guest_mtu_for_path, Admission, BuyerConfig, GuestLease, HandshakeLimits, Ipv6Sources,
    RateLimits, SellerConfig, Timers, DEFAULT_GUEST_MTU, OVERLAY_OVERHEAD,
};
pub use error::{Error, Result};
pub use eth::MacAddr;
pub use identity::{parse_peer_key, Identity, PeerKey};
pub use rng::CoreRng;
pub use seller::SellerCore;
pub use stats::{BuyerStats, DropCounters, DropReason, PeerStats, SellerStats, Traffic};
