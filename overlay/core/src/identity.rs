//! A node's overlay identity: its ed25519 key and the x25519 Noise static key bound to it.
//!
//! The Noise static key is derived from the ed25519 key by the standard birational map
//! (the secret is the ed25519 expanded scalar, the public key is the Montgomery form of
//! the ed25519 public key). That lets a seller, who knows only the buyer's ed25519 key
//! from the lease, run the one-round-trip IK pattern against the buyer. On top of that,
//! each side also sends an ed25519 signature over its Noise static key (the libp2p way),
//! checked against the static key the handshake actually authenticated.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

use crate::Error;

/// A peer's long-term public identity: its ed25519 public key.
pub type PeerKey = VerifyingKey;

/// Domain separation for the signature over the Noise static key.
const BINDING_CONTEXT: &[u8] = b"cpushare-overlay noise-static-key v1:";

/// A node's overlay identity (ed25519 signing key + derived Noise static key).
#[derive(Clone)]
pub struct Identity {
    signing: SigningKey,
    noise_secret: [u8; 32],
    noise_public: [u8; 32],
    binding: Signature,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field(
                "public",
                &hex::encode(self.signing.verifying_key().as_bytes()),
            )
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Builds the overlay identity from the node's ed25519 key.
    pub fn from_signing_key(signing: SigningKey) -> Identity {
        let noise_secret = signing.to_scalar_bytes();
        let noise_public = signing.verifying_key().to_montgomery().to_bytes();
        let binding = signing.sign(&binding_message(&noise_public));
        Identity {
            signing,
            noise_secret,
            noise_public,
            binding,
        }
    }

    /// A fresh random identity from the OS's entropy (throwaway nodes, tests).
    pub fn generate() -> Identity {
        Identity::generate_with(&mut rand_core::OsRng)
    }

    /// A fresh identity drawn from `rng` (a seeded one gives the same identity).
    pub fn generate_with(rng: &mut dyn rand_core::CryptoRngCore) -> Identity {
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        Identity::from_signing_key(SigningKey::from_bytes(&secret))
    }

    /// The public ed25519 key other nodes know this node by.
    pub fn public_key(&self) -> PeerKey {
        self.signing.verifying_key()
    }

    /// The x25519 Noise static public key.
    pub fn noise_public(&self) -> [u8; 32] {
        self.noise_public
    }

    pub(crate) fn noise_secret(&self) -> &[u8; 32] {
        &self.noise_secret
    }

    /// A test identity whose binding signature was made by another key.
    #[cfg(test)]
    pub(crate) fn with_forged_binding(signing: SigningKey, forger: &SigningKey) -> Identity {
        let mut id = Identity::from_signing_key(signing);
        id.binding = forger.sign(&binding_message(&id.noise_public));
        id
    }

    /// The signature binding the Noise static key to the ed25519 key.
    pub(crate) fn binding_signature(&self) -> Signature {
        self.binding
    }
}

/// The Noise static public key a peer with ed25519 key `peer` uses.
pub fn noise_static_of(peer: &PeerKey) -> [u8; 32] {
    peer.to_montgomery().to_bytes()
}

fn binding_message(noise_public: &[u8; 32]) -> [u8; 69] {
    let mut m = [0u8; 69];
    m[..BINDING_CONTEXT.len()].copy_from_slice(BINDING_CONTEXT);
    m[BINDING_CONTEXT.len()..].copy_from_slice(noise_public);
    m
}

/// Checks that `peer` signed `noise_public` as its overlay static key.
pub(crate) fn verify_binding(
    peer: &PeerKey,
    noise_public: &[u8; 32],
    sig: &Signature,
) -> Result<(), Error> {
    peer.verify(&binding_message(noise_public), sig)
        .map_err(|_| Error::BadIdentitySignature)
}

/// Parses a hex-encoded ed25519 public key (as printed by `cpushare-node`).
pub fn parse_peer_key(hex_str: &str) -> Result<PeerKey, Error> {
    let bytes = hex::decode(hex_str.trim()).map_err(|e| Error::BadPeerKey(e.to_string()))?;
    let arr: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| Error::BadPeerKey(format!("{} bytes, expected 32", bytes.len())))?;
    VerifyingKey::from_bytes(&arr).map_err(|e| Error::BadPeerKey(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use x25519_dalek::{PublicKey, StaticSecret};

    #[test]
    fn derived_noise_key_matches_x25519() {
        let id = Identity::generate();
        let secret = StaticSecret::from(*id.noise_secret());
        assert_eq!(PublicKey::from(&secret).to_bytes(), id.noise_public());
        assert_eq!(noise_static_of(&id.public_key()), id.noise_public());
    }

    #[test]
    fn binding_verifies_only_for_own_key() {
        let a = Identity::generate();
        let b = Identity::generate();
        verify_binding(&a.public_key(), &a.noise_public(), &a.binding_signature()).unwrap();
        assert!(
            verify_binding(&b.public_key(), &a.noise_public(), &a.binding_signature()).is_err()
        );
        assert!(
            verify_binding(&a.public_key(), &b.noise_public(), &a.binding_signature()).is_err()
        );
    }

    #[test]
    fn parse_key() {
        let a = Identity::generate();
        let h = hex::encode(a.public_key().as_bytes());
        assert_eq!(parse_peer_key(&h).unwrap(), a.public_key());
        assert!(parse_peer_key("abcd").is_err());
        assert!(parse_peer_key("zz").is_err());
    }
}
