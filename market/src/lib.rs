//! The sans-IO market core of cpushare.
//! (Protocol docs below.)
#![forbid(unsafe_code)]

pub mod billing;
pub mod buyer;
pub mod error;
pub mod keys;
pub mod lease;
pub mod offer;
pub mod order;
pub mod price;
pub mod seller;
pub mod signed;
pub mod wire;

pub use billing::*;
pub use buyer::*;
pub use error::Error;
pub use keys::*;
pub use lease::*;
pub use offer::*;
pub use order::*;
pub use price::*;
pub use seller::*;
pub use signed::*;
pub use wire::*;
