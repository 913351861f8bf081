//! Every market message on the node's request/stream protocol: a version byte, then
//! bincode (fixed-width integers, size-limited, no trailing bytes).

use bincode::Options;
use serde::{Deserialize, Serialize};

use crate::billing::{Ack, Receipt, Stop};
use crate::buyer::GuestPhase;
use crate::error::Error;
use crate::keys::LeaseId;
use crate::lease::{Lease, LeaseTerms, Refusal};
use crate::offer::Offer;
use crate::signed::Signed;

/// Largest encoded message, version byte included.
pub const MAX_MSG: usize = 64 * 1024;
/// Largest console chunk in one message.
pub const MAX_CONSOLE: usize = 16 * 1024;
/// The wire format's version byte.
pub const WIRE_VERSION: u8 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MarketMsg {
    Propose(Signed<LeaseTerms>),
    Accept(Lease),
    Refuse {
        lease: LeaseId,
        why: Refusal,
    },
    Receipt(Signed<Receipt>),
    Ack(Signed<Ack>),
    Stop(Signed<Stop>),
    Phase {
        lease: LeaseId,
        phase: GuestPhase,
    },
    /// Guest console output from byte `offset` on; `data` is at most 16 KiB.
    Console {
        lease: LeaseId,
        offset: u64,
        data: Vec<u8>,
    },
}

fn opts() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(MAX_MSG as u64)
        .reject_trailing_bytes()
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![WIRE_VERSION];
    // Messages are far below the limit except an oversized console chunk, which the
    // caller is told about by `decode` on the other side; never panic here.
    let body = bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .serialize(v)
        .unwrap_or_default();
    out.extend_from_slice(&body);
    out
}

fn dec<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T, Error> {
    if b.len() > MAX_MSG {
        return Err(Error::TooBig {
            size: b.len(),
            max: MAX_MSG,
        });
    }
    let (&v, rest) = b
        .split_first()
        .ok_or_else(|| Error::Decode("empty message".into()))?;
    if v != WIRE_VERSION {
        return Err(Error::BadVersion(v));
    }
    opts()
        .deserialize(rest)
        .map_err(|e| Error::Decode(e.to_string()))
}

/// bincode with a 1-byte version prefix.
pub fn encode(m: &MarketMsg) -> Vec<u8> {
    enc(m)
}

/// Size limit, version, trailing bytes and console chunk size checked.
pub fn decode(b: &[u8]) -> Result<MarketMsg, Error> {
    let m: MarketMsg = dec(b)?;
    if let MarketMsg::Console { data, .. } = &m {
        if data.len() > MAX_CONSOLE {
            return Err(Error::TooBig {
                size: data.len(),
                max: MAX_CONSOLE,
            });
        }
    }
    Ok(m)
}

pub fn encode_offer(o: &Signed<Offer>) -> Vec<u8> {
    enc(o)
}

/// Decodes only; the caller checks it with `OfferBook::insert`.
pub fn decode_offer(b: &[u8]) -> Result<Signed<Offer>, Error> {
    dec(b)
}
