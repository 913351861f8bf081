//! Domain types that the CLI, the config and the services share. A leaf (no
//! `crate::` imports), so that none of them imports another for these.

use clap::ValueEnum;

/// The side of the market a daemon runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Buyer,
    Seller,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Buyer => "buyer",
            Role::Seller => "seller",
        }
    }
}
