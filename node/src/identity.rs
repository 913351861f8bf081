//! The node's ed25519 identity, kept in the data dir with mode 0600.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use ed25519_dalek::SigningKey;
use libp2p::identity::Keypair;
use libp2p::PeerId;

use crate::error::{Error, Result};

/// The node's long-term key pair, usable both as ed25519-dalek and libp2p keys.
#[derive(Clone)]
pub struct Identity {
    signing: SigningKey,
    keypair: Keypair,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("peer_id", &self.peer_id())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Load the key at `path`, or create it (mode 0600) if the file does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        let err = |reason: String| Error::Identity {
            path: path.to_path_buf(),
            reason,
        };
        match std::fs::read(path) {
            Ok(bytes) => {
                let mode = std::fs::metadata(path)
                    .map_err(|e| err(e.to_string()))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(err(format!(
                        "mode {:o} lets other users read the secret key; run `chmod 600 {}`",
                        mode & 0o777,
                        path.display()
                    )));
                }
                let secret: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                    err(format!(
                        "expected 32 bytes, found {}; the file is corrupt (move it away to create a new identity)",
                        bytes.len()
                    ))
                })?;
                Ok(Self::from_secret(secret))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
                }
                let signing = SigningKey::generate(&mut rand::rngs::OsRng);
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| err(e.to_string()))?;
                f.write_all(&signing.to_bytes())
                    .and_then(|_| f.sync_all())
                    .map_err(|e| err(e.to_string()))?;
                Ok(Self::from_secret(signing.to_bytes()))
            }
            Err(e) => Err(err(e.to_string())),
        }
    }

    pub fn from_secret(secret: [u8; 32]) -> Self {
        let signing = SigningKey::from_bytes(&secret);
        let mut copy = secret;
        let keypair =
            Keypair::ed25519_from_bytes(&mut copy).expect("32 bytes is a valid ed25519 secret");
        Identity { signing, keypair }
    }

    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    pub fn keypair(&self) -> &Keypair {
        &self.keypair
    }

    pub fn peer_id(&self) -> PeerId {
        self.keypair.public().to_peer_id()
    }

    /// Hex of the ed25519 public key (what other nodes admit or trust).
    pub fn public_hex(&self) -> String {
        hex::encode(self.signing.verifying_key().to_bytes())
    }
}

/// The ed25519 key inside a peer id (every cpushare node's id is one).
pub fn key_of_peer(p: &PeerId) -> Option<market::PeerKey> {
    let pk = libp2p::identity::PublicKey::try_decode_protobuf(p.as_ref().digest()).ok()?;
    let ed = pk.try_into_ed25519().ok()?;
    Some(market::PeerKey(ed.to_bytes()))
}

/// The peer id of an ed25519 key.
pub fn peer_of_key(k: &market::PeerKey) -> Option<PeerId> {
    let ed = libp2p::identity::ed25519::PublicKey::try_from_bytes(&k.0).ok()?;
    Some(libp2p::identity::PublicKey::from(ed).to_peer_id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_with_mode_0600_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/identity.key");
        let a = Identity::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = Identity::load_or_create(&path).unwrap();
        assert_eq!(a.peer_id(), b.peer_id());
        assert_eq!(a.public_hex(), b.public_hex());
    }

    #[test]
    fn rejects_corrupt_and_world_readable_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        std::fs::write(&path, b"short").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = Identity::load_or_create(&path).unwrap_err().to_string();
        assert!(e.contains("expected 32 bytes"), "{e}");
        std::fs::write(&path, [7u8; 32]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Identity::load_or_create(&path).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn peer_ids_and_keys_convert_both_ways() {
        let kp = libp2p::identity::Keypair::generate_ed25519();
        let peer = kp.public().to_peer_id();
        let key = key_of_peer(&peer).expect("ed25519 peer id");
        assert_eq!(peer_of_key(&key), Some(peer));
    }
}
