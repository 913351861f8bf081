//! The one error type of the overlay crate.

use std::net::SocketAddr;

/// Everything that can go wrong in the overlay. Messages say what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A datagram or frame was shorter than its fixed header.
    #[error("malformed {what}: {len} bytes, need at least {need}")]
    Truncated {
        /// Which message or header.
        what: &'static str,
        /// Bytes we got.
        len: usize,
        /// Bytes the format needs.
        need: usize,
    },
    /// A datagram had the wrong length for its type.
    #[error("malformed {what}: {len} bytes, expected {expected}")]
    BadLength {
        /// Which message.
        what: &'static str,
        /// Bytes we got.
        len: usize,
        /// Bytes the format requires.
        expected: usize,
    },
    /// The first byte of a datagram is not an overlay message type.
    #[error(
        "unknown overlay message type {0:#04x} (not a cpushare overlay peer, or a newer version)"
    )]
    UnknownMessageType(u8),
    /// Reserved header bytes were not zero.
    #[error("malformed overlay header: reserved bytes must be zero")]
    ReservedNotZero,
    /// A field of a DHCP/Ethernet/IP packet is invalid.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// Which packet.
        what: &'static str,
        /// What is wrong with it.
        detail: &'static str,
    },
    /// The Noise handshake failed (wrong key, tampered or replayed message).
    #[error("noise handshake failed: {0} (wrong buyer key, or a tampered/stale handshake)")]
    Noise(String),
    /// The ed25519 signature binding the peer's Noise key to its identity is wrong.
    #[error("peer's identity signature over its Noise static key does not verify")]
    BadIdentitySignature,
    /// A handshake came from an ed25519 key (or guest MAC) that was never admitted.
    #[error("peer {peer} with guest MAC {mac} is not admitted on this buyer (run `overlay admit` first)")]
    NotAdmitted {
        /// The peer's ed25519 key in hex.
        peer: String,
        /// The guest MAC the peer asked for.
        mac: crate::MacAddr,
    },
    /// A handshake initiation is not newer than the last accepted one (a replay, or
    /// the seller's clock went backwards).
    #[error("stale handshake initiation from guest {0} (replayed, or the seller's clock went backwards)")]
    StaleHandshake(crate::MacAddr),
    /// The responder answered with an identity other than the configured buyer.
    #[error("the buyer at {0} answered with a different identity than the lease names")]
    WrongBuyer(SocketAddr),
    /// A data message failed authentication.
    #[error("data message failed authentication (tampered, or sent with another key)")]
    Decrypt,
    /// A data message counter was already seen or is too old.
    #[error("replayed or too old data message counter {0}")]
    Replay(u64),
    /// The session is too old or has sent too many messages.
    #[error("session expired; waiting for a new handshake")]
    SessionExpired,
    /// A MAC address or IP is already used by another admitted guest.
    #[error("address conflict: {0}")]
    AddressConflict(String),
    /// A configuration value is not usable.
    #[error("invalid overlay configuration: {0}")]
    InvalidConfig(String),
    /// A MAC address string could not be parsed.
    #[error("invalid MAC address {0:?}: expected six hex bytes like 52:54:00:12:34:56")]
    BadMac(String),
    /// An ed25519 public key could not be parsed.
    #[error("invalid ed25519 public key: {0}")]
    BadPeerKey(String),
    /// An operating-system call of the overlay's I/O shell failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The operation needs privileges the process lacks.
    #[error("{0}: permission denied (run as root, or grant CAP_NET_ADMIN and CAP_NET_RAW)")]
    NeedNetAdmin(String),
    /// /dev/net/tun is missing.
    #[error("/dev/net/tun does not exist: load the tun module (`modprobe tun`) or pass the device into the container")]
    NoTunDevice,
    /// The UDP port is taken.
    #[error(
        "UDP address {0} is already in use: choose another port, or stop the program using it"
    )]
    PortInUse(SocketAddr),
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
