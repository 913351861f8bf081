//! Domain-separated ed25519 signatures over bincode bodies.

use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::Error;
use crate::keys::PeerKey;

/// The domain string a body type is signed under, so a signature over one kind of
/// message can never be passed off as another kind.
pub trait Domain {
    const DOMAIN: &'static str;
}

/// A raw ed25519 signature. Serialized as two 32-byte halves (serde has no 64-array).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sig(pub [u8; 64]);

impl fmt::Debug for Sig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sig({}..)", hex::encode(&self.0[..8]))
    }
}

impl Serialize for Sig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (a, b) = self.0.split_at(32);
        let a: [u8; 32] = a.try_into().expect("64 = 32 + 32");
        let b: [u8; 32] = b.try_into().expect("64 = 32 + 32");
        (a, b).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Sig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (a, b) = <([u8; 32], [u8; 32])>::deserialize(d)?;
        let mut out = [0u8; 64];
        out[..32].copy_from_slice(&a);
        out[32..].copy_from_slice(&b);
        Ok(Sig(out))
    }
}

/// The exact bytes every signature covers: `DOMAIN || 0 || bincode(body)`.
pub(crate) fn signing_bytes<T: Serialize>(domain: &str, body: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(domain.len() + 1 + 128);
    out.extend_from_slice(domain.as_bytes());
    out.push(0);
    // bincode of a plain struct into a Vec cannot fail (no maps with non-string keys,
    // no size limit).
    bincode::serialize_into(&mut out, body).expect("bincode of a market body");
    out
}

pub(crate) fn sign_bytes(sk: &SigningKey, msg: &[u8]) -> Sig {
    Sig(sk.sign(msg).to_bytes())
}

pub(crate) fn verify_bytes(key: &PeerKey, msg: &[u8], sig: &Sig) -> Result<(), Error> {
    let vk = VerifyingKey::from_bytes(&key.0).map_err(|_| Error::BadSignature)?;
    vk.verify(msg, &Signature::from_bytes(&sig.0))
        .map_err(|_| Error::BadSignature)
}

/// A body with its signer's key and signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed<T> {
    pub body: T,
    pub signer: PeerKey,
    pub sig: Sig,
}

impl<T: Serialize + Domain> Signed<T> {
    /// Signs `DOMAIN || 0 || bincode(body)` with `sk`.
    pub fn sign(sk: &SigningKey, body: T) -> Self {
        let sig = sign_bytes(sk, &signing_bytes(T::DOMAIN, &body));
        Signed {
            body,
            signer: PeerKey::of(sk),
            sig,
        }
    }

    /// The body, if `sig` is `signer`'s signature over it. Callers still check that
    /// `signer` is the party the body says should have signed.
    pub fn verify(&self) -> Result<&T, Error> {
        verify_bytes(
            &self.signer,
            &signing_bytes(T::DOMAIN, &self.body),
            &self.sig,
        )?;
        Ok(&self.body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
    struct A(u32);
    impl Domain for A {
        const DOMAIN: &'static str = "test/a";
    }
    #[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
    struct B(u32);
    impl Domain for B {
        const DOMAIN: &'static str = "test/b";
    }

    #[test]
    fn sign_verify_and_forgeries() {
        let sk = SigningKey::from_bytes(&[3; 32]);
        let s = Signed::sign(&sk, A(5));
        assert_eq!(s.verify().unwrap(), &A(5));

        let mut body = s.clone();
        body.body = A(6);
        assert_eq!(body.verify(), Err(Error::BadSignature));

        let mut signer = s.clone();
        signer.signer = PeerKey::of(&SigningKey::from_bytes(&[4; 32]));
        assert_eq!(signer.verify(), Err(Error::BadSignature));

        let mut sig = s.clone();
        sig.sig.0[0] ^= 1;
        assert_eq!(sig.verify(), Err(Error::BadSignature));

        // Not a curve point at all.
        let mut junk = s.clone();
        junk.signer = PeerKey([0xff; 32]);
        assert_eq!(junk.verify(), Err(Error::BadSignature));
    }

    #[test]
    fn domains_separate() {
        let sk = SigningKey::from_bytes(&[3; 32]);
        let a = Signed::sign(&sk, A(5));
        let b = Signed {
            body: B(5),
            signer: a.signer,
            sig: a.sig,
        };
        assert_eq!(b.verify(), Err(Error::BadSignature));
    }

    #[test]
    fn sig_serde_round_trips() {
        let s = Sig(core::array::from_fn(|i| i as u8));
        let bytes = bincode::serialize(&s).unwrap();
        assert_eq!(bytes.len(), 64);
        assert_eq!(bincode::deserialize::<Sig>(&bytes).unwrap(), s);
    }
}
