//! The crate's one error type.

use crate::keys::LeaseId;

/// Everything the market core can reject. Messages say what was wrong and, where
/// it helps, what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("bad signature: the message was not signed by the key it names")]
    BadSignature,
    #[error("signer mismatch: the message is signed by a key other than the one its body names")]
    SignerMismatch,
    #[error("expired: the offer or proposal is past its expiry time")]
    Expired,
    #[error("issued in the future (more than 5 minutes ahead of our clock): check the clocks")]
    FromFuture,
    #[error("replayed: an older sequence number than the one already known for this seller")]
    Replayed,
    #[error("offer lifetime too long: expiry may be at most 1 hour after issue")]
    TooLong,
    #[error("bad price {0:?}: write credits with at most 6 decimals, e.g. 0.05")]
    BadPrice(String),
    #[error("bad key {0:?}: expected 64 hex digits")]
    BadKey(String),
    #[error("bad lease id {0:?}: expected 32 hex digits")]
    BadLeaseId(String),
    #[error("trust list line {line}: {why}")]
    TrustList { line: usize, why: String },
    #[error("cannot decode message: {0}")]
    Decode(String),
    #[error("message too large: {size} bytes, at most {max}")]
    TooBig { size: usize, max: usize },
    #[error("unsupported message version {0}: upgrade cpushare-node")]
    BadVersion(u8),
    #[error("unknown lease {0}")]
    UnknownLease(LeaseId),
    #[error("message for lease {got} reached lease {expected}")]
    WrongLease { expected: LeaseId, got: LeaseId },
    #[error("lease {lease}: message came from a peer that is not party to it")]
    WrongPeer { lease: LeaseId },
    #[error("lease {lease}: the accepted terms differ from the ones we proposed")]
    TermsMismatch { lease: LeaseId },
    #[error("lease {lease}: receipt for minute {minute} has amount {amount} / total {total}, expected {want_amount} / {want_total}")]
    BadReceipt {
        lease: LeaseId,
        minute: u32,
        amount: u64,
        total: u64,
        want_amount: u64,
        want_total: u64,
    },
    #[error(
        "lease {lease}: receipt for minute {minute} but at most {max} periods can have passed"
    )]
    ReceiptTooEarly {
        lease: LeaseId,
        minute: u32,
        max: u32,
    },
    #[error("lease {lease}: ack for minute {minute} but only {receipted} were receipted")]
    AckBeyondReceipt {
        lease: LeaseId,
        minute: u32,
        receipted: u32,
    },
    #[error("lease {lease}: ack for minute {minute} carries total {total}, expected {want}")]
    BadAckTotal {
        lease: LeaseId,
        minute: u32,
        total: u64,
        want: u64,
    },
}
