//! The sans-IO market core of cpushare: the rules by which a buyer rents guests from
//! sellers and pays for them by the minute. Nothing here does I/O, reads a clock or
//! draws randomness: time comes in as `now_ms` (Unix milliseconds) on every call,
//! randomness as a seed, and every state machine answers with a list of actions
//! (send this, persist that, stop the guest) that the node carries out in order.
//! The same code runs in the node and in simulations.
//!
//! # Money
//! `u64` micro-credits: 1 credit = 1_000_000 ([`parse_price`], [`format_price`]).
//!
//! # Signatures
//! Every message that carries a claim is a [`Signed<T>`]: an ed25519 signature over
//! `DOMAIN || 0 || bincode(body)`, where the domain names the message kind
//! (`cpushare/offer/v1`, `cpushare/lease/v1`, `cpushare/receipt/v1`, `cpushare/ack/v1`,
//! `cpushare/stop/v1`, `cpushare/grant/v1`), so a signature can never be replayed as another kind.
//! Receivers check both the signature and that the signer is the party the body
//! says must have signed.
//!
//! # The protocol
//! 1. **Offers.** Sellers publish a [`Signed<Offer>`] (resources, price per minute,
//!    performance, measurement hash, free guest slots) with a growing `seq` and a
//!    lifetime of at most an hour. The buyer's [`OfferBook`] keeps the newest valid
//!    one per seller and refuses forgeries, replays (lower seq), expired ones and
//!    ones from more than five minutes in the future.
//! 2. **Selection.** [`select`] filters offers against the [`Order`] (resources,
//!    price, latency the buyer measured itself, trust list, free slots, sellers to
//!    avoid) and ranks the rest: fewer penalties, lower price, higher performance,
//!    lower latency, then key. [`Exclusions::describe`] tells the user why nothing
//!    fit.
//! 3. **Proposal and countersignature.** The buyer's [`Fleet`] has one [`Slot`]
//!    per wanted guest, each with a MAC and overlay IP fixed for the whole run. For
//!    a choosing slot it signs [`LeaseTerms`] (ids and MACs derived from its seed)
//!    and proposes them; the proposal is void after `start_by_ms`. The seller checks
//!    it against its [`SellerPolicy`] (a [`Refusal`] says why not) and countersigns
//!    the same bytes: the [`Lease`] carries both signatures and the overlay
//!    addresses. The buyer admits the seller on its overlay for that MAC/IP. A
//!    proposal unanswered for `proposal_ms` frees the slot; an Accept that comes
//!    after is answered with a Stop.
//! 4. **Phases.** The seller's [`SellerLease`] is Preparing while it fetches the
//!    image and boots, and reports [`GuestPhase`]s to the buyer. Billing starts when
//!    the guest runs.
//! 5. **Receipts.** At the end of each billing period (60 s by default) the seller
//!    signs a [`Receipt`] for that period: its number (1-based), the price and the
//!    cumulative total. It persists first and sends after, and never receipts the
//!    same period twice; the newest unacknowledged receipt is re-sent once a period
//!    so a lost one is recovered. The buyer accepts period `m` only if at least
//!    `m - 1` whole periods passed between its proposal (the seller cannot have
//!    started earlier) and now or its own stop, and `m` is within the duration.
//! 6. **Cumulative acks.** The buyer answers each valid receipt with an [`Ack`] of
//!    every period up to the highest it accepted. Acks are cumulative and
//!    idempotent, so loss, duplication and reordering never count a period twice:
//!    a ledger's `acked` only grows. Only acknowledged periods are billed, on both
//!    sides ([`LedgerEntry::billed`]), so at all times
//!    `seller acked <= buyer acked <= seller receipted`.
//! 7. **Grace.** A seller that hears no ack for `grace_s` (120 s by default) ends
//!    the lease with `BuyerSilent` and stops the guest: a buyer that vanishes pays at
//!    most for what it acknowledged.
//! 8. **End.** A lease ends by the buyer's signed [`Stop`], its duration, the guest
//!    exiting, a failed start, the seller's shutdown or restart (the guest dies with
//!    the process: a restored lease is ended and receipts nothing new), or the end
//!    of the seller's selling hours (at the next period boundary). The seller tells
//!    the buyer with a final `Ended` phase. After the end the seller keeps re-sending
//!    its newest unacknowledged receipt with a doubling interval (up to about an
//!    hour), so that an ack lost near the end still lands and both ledgers agree.
//! 9. **Replacement.** A starting or running guest with no sign of life (overlay
//!    traffic, any message) for `silence_ms` (30 s) is lost: the buyer revokes it
//!    from the overlay, stops and penalizes its seller, and the slot chooses again,
//!    avoiding that seller; the replacement gets the same MAC and IP, so the rest of
//!    the fleet sees the same address. A seller that ends a lease for a reason other
//!    than the guest finishing (restart, shutdown, failed start) is replaced the
//!    same way, without a penalty.
//!
//! # Wire
//! [`MarketMsg`] is every message on the node's market protocol; [`encode`] writes a
//! version byte and bincode, [`decode`] enforces [`MAX_MSG`], the version, the
//! console chunk limit and refuses trailing bytes.
#![forbid(unsafe_code)]

pub mod billing;
pub mod buyer;
pub mod error;
pub mod grant;
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
pub use grant::*;
pub use keys::*;
pub use lease::*;
pub use offer::*;
pub use order::*;
pub use price::*;
pub use seller::*;
pub use signed::*;
pub use wire::*;
