//! Peer keys and lease ids: fixed-size byte strings shown as hex.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// An ed25519 verifying key, as its 32 bytes. Any 32 bytes decode; a key that is not
/// a valid curve point simply fails every signature check.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PeerKey(pub [u8; 32]);

impl PeerKey {
    /// The public key of a signing key.
    pub fn of(sk: &SigningKey) -> PeerKey {
        PeerKey(sk.verifying_key().to_bytes())
    }
}

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerKey({self})")
    }
}

impl FromStr for PeerKey {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let s = s.trim();
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| Error::BadKey(s.to_string()))?;
        Ok(PeerKey(out))
    }
}

/// A lease id: 16 bytes the buyer derives from its fleet seed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LeaseId(pub [u8; 16]);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaseId({self})")
    }
}

impl FromStr for LeaseId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let s = s.trim();
        let mut out = [0u8; 16];
        hex::decode_to_slice(s, &mut out).map_err(|_| Error::BadLeaseId(s.to_string()))?;
        Ok(LeaseId(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let k = PeerKey([7; 32]);
        assert_eq!(k.to_string().len(), 64);
        assert_eq!(k.to_string().parse::<PeerKey>().unwrap(), k);
        let id = LeaseId([0xab; 16]);
        assert_eq!(id.to_string(), "ab".repeat(16));
        assert_eq!(id.to_string().parse::<LeaseId>().unwrap(), id);
    }

    #[test]
    fn bad_hex_is_refused() {
        assert!(matches!("zz".parse::<PeerKey>(), Err(Error::BadKey(_))));
        assert!(matches!(
            "ab".repeat(31).parse::<PeerKey>(),
            Err(Error::BadKey(_))
        ));
        assert!(matches!(
            "ab".repeat(17).parse::<LeaseId>(),
            Err(Error::BadLeaseId(_))
        ));
    }

    #[test]
    fn of_matches_verifying_key() {
        let sk = SigningKey::from_bytes(&[1; 32]);
        assert_eq!(PeerKey::of(&sk).0, sk.verifying_key().to_bytes());
    }
}
