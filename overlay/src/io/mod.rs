//! Thin I/O shells around the sans-IO core: tap devices, network namespaces, the
//! seller's AF_PACKET guest port, batched UDP, and the threads that drive
//! [`crate::BuyerCore`] and [`crate::SellerCore`].

pub mod batch;
pub mod buyer;
pub mod netns;
pub use overlay_core::offload;
pub mod packet;
pub mod seller;
pub mod shell;
pub mod spin;
pub mod sys;
pub mod tap;

pub use buyer::{Buyer, BuyerIoConfig};
pub use netns::NetNs;
pub use packet::PacketPort;
pub use seller::{create_guest_tap, create_lease_netns, remove_guest_tap, Seller, SellerIoConfig};
pub use tap::{Tap, TapOptions};
