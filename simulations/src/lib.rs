//! Discrete-event, flow-level simulator of cpushare at 10,000 to 100,000 sellers.
//!
//! It drives the node's own sans-IO cores unchanged: `chunks::swarm::{Leecher,
//! Seeder}` for image distribution and `market::{Fleet, SellerLease}` for leases.
//! The simulator supplies only what the node's I/O shell would: a network (max-min
//! fair flows over per-node up/down links, per-node latency), timers, churn, and
//! message delivery. Same scenario and seed: bit-identical results.

pub mod bound;
pub mod error;
pub mod flow;
pub mod leases;
pub mod naive;
pub mod plot;
pub mod queue;
pub mod report;
pub mod rng;
pub mod runner;
pub mod scenario;
pub mod stats;
pub mod swarm;
pub mod topology;
pub mod upload;
pub mod wire_size;

pub use error::{Result, SimError};
