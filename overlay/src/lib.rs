//! The buyer-owned layer-2 overlay: the I/O shells around [`overlay_core`].
//!
//! The sans-IO core (sessions, replay window, cookies, switch, DHCP, egress filter,
//! offload parsing) is its own crate, `overlay-core`, with no unsafe code and no
//! sockets; it is re-exported here whole, so `overlay::BuyerCore`, `overlay::dhcp`
//! and the rest keep their paths. [`io`] owns sockets, taps, namespaces, threads and
//! clocks, and drives the cores.

pub use overlay_core::*;

pub mod io;
