//! Cookie replies, as WireGuard does them: every initiation carries `mac1` (keyed by
//! the buyer's public key, checked before any public-key work) and `mac2` (keyed by a
//! cookie the buyer handed to the sender's address). When the buyer is over its
//! handshake rate, it answers an initiation without a valid `mac2` with a small
//! encrypted cookie instead of doing the handshake; the seller retries with `mac2`,
//! proving it receives at its source address, and such initiations bypass the global
//! cap. A flood from spoofed addresses therefore cannot lock out real sellers.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use blake2::digest::consts::U16;
use blake2::digest::{Digest, KeyInit, Mac};
use blake2::{Blake2s256, Blake2sMac};
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::XChaCha20Poly1305;

use rand_core::CryptoRngCore;

use crate::Error;

/// Length of each MAC.
pub const MAC_LEN: usize = 16;
/// Cookies (and the buyer's cookie secret) live this long.
pub const COOKIE_LIFETIME: Duration = Duration::from_secs(120);

type Mac128 = Blake2sMac<U16>;

fn hash(label: &[u8], key: &[u8; 32]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    h.update(label);
    h.update(key);
    h.finalize().into()
}

fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    let mut m = <Mac128 as KeyInit>::new_from_slice(key).expect("key of at most 32 bytes");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn addr_bytes(a: &SocketAddr) -> Vec<u8> {
    let mut v = match a.ip() {
        std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
        std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    v.extend_from_slice(&a.port().to_be_bytes());
    v
}

/// Keys both sides derive from the buyer's Noise static public key.
#[derive(Clone)]
struct Keys {
    mac1: [u8; 32],
    cookie: XChaCha20Poly1305,
}

impl Keys {
    fn new(responder_static: &[u8; 32]) -> Keys {
        let ck = hash(b"cpushare cookie--", responder_static);
        Keys {
            mac1: hash(b"cpushare mac1----", responder_static),
            cookie: <XChaCha20Poly1305 as chacha20poly1305::KeyInit>::new(&ck.into()),
        }
    }
}

/// The seller's side: stamps initiations, keeps the last cookie.
pub(crate) struct CookieJar {
    keys: Keys,
    cookie: Option<([u8; MAC_LEN], Instant)>,
    /// mac1 of the last initiation sent (a cookie reply is bound to it).
    last_mac1: Option<[u8; MAC_LEN]>,
}

impl std::fmt::Debug for CookieJar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CookieJar")
            .field("has_cookie", &self.cookie.is_some())
            .finish_non_exhaustive()
    }
}

impl CookieJar {
    pub fn new(responder_static: &[u8; 32]) -> CookieJar {
        CookieJar {
            keys: Keys::new(responder_static),
            cookie: None,
            last_mac1: None,
        }
    }

    /// Appends mac1 and mac2 (zero without a fresh cookie) to an initiation; returns
    /// whether mac2 carries a cookie.
    pub fn stamp(&mut self, msg: &mut Vec<u8>, now: Instant) -> bool {
        let m1 = mac(&self.keys.mac1, &[msg]);
        msg.extend_from_slice(&m1);
        self.last_mac1 = Some(m1);
        match self.cookie {
            Some((c, t)) if now.saturating_duration_since(t) < COOKIE_LIFETIME => {
                let m2 = mac(&c, &[msg]);
                msg.extend_from_slice(&m2);
                true
            }
            _ => {
                msg.extend_from_slice(&[0; MAC_LEN]);
                false
            }
        }
    }

    /// Takes a cookie reply (nonce and sealed cookie) for the last initiation.
    pub fn consume(&mut self, nonce: &[u8], sealed: &[u8], now: Instant) -> Result<(), Error> {
        let m1 = self.last_mac1.ok_or(Error::Decrypt)?;
        let mut c = sealed[..MAC_LEN].to_vec();
        let tag = chacha20poly1305::Tag::from_slice(&sealed[MAC_LEN..]);
        self.keys
            .cookie
            .decrypt_in_place_detached(nonce.into(), &m1, &mut c, tag)
            .map_err(|_| Error::Decrypt)?;
        self.cookie = Some((c.try_into().expect("16 bytes"), now));
        Ok(())
    }
}

/// The buyer's side: checks mac1/mac2 and makes cookie replies.
pub(crate) struct CookieChecker {
    keys: Keys,
    secret: [u8; 32],
    born: Option<Instant>,
}

impl std::fmt::Debug for CookieChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CookieChecker").finish_non_exhaustive()
    }
}

impl CookieChecker {
    pub fn new(own_static: &[u8; 32], rng: &mut dyn CryptoRngCore) -> CookieChecker {
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        CookieChecker {
            keys: Keys::new(own_static),
            secret,
            born: None,
        }
    }

    /// mac1 of a whole initiation (`msg` ends with mac1 | mac2).
    pub fn mac1_ok(&self, msg: &[u8]) -> bool {
        let n = msg.len() - 2 * MAC_LEN;
        let want = mac(&self.keys.mac1, &[&msg[..n]]);
        constant_eq(&want, &msg[n..n + MAC_LEN])
    }

    fn cookie_for(
        &mut self,
        from: &SocketAddr,
        now: Instant,
        rng: &mut dyn CryptoRngCore,
    ) -> [u8; MAC_LEN] {
        if self
            .born
            .is_none_or(|b| now.saturating_duration_since(b) >= COOKIE_LIFETIME)
        {
            rng.fill_bytes(&mut self.secret);
            self.born = Some(now);
        }
        mac(&self.secret, &[&addr_bytes(from)])
    }

    /// Whether mac2 proves `from` holds a current cookie.
    pub fn mac2_ok(
        &mut self,
        msg: &[u8],
        from: &SocketAddr,
        now: Instant,
        rng: &mut dyn CryptoRngCore,
    ) -> bool {
        let n = msg.len() - MAC_LEN;
        let c = self.cookie_for(from, now, rng);
        constant_eq(&mac(&c, &[&msg[..n]]), &msg[n..])
    }

    /// Writes the cookie reply for initiation `msg` from `from` into `out`.
    pub fn reply(
        &mut self,
        msg: &[u8],
        sender_index: u32,
        from: &SocketAddr,
        now: Instant,
        rng: &mut dyn CryptoRngCore,
        out: &mut Vec<u8>,
    ) {
        let c = self.cookie_for(from, now, rng);
        let n = msg.len() - 2 * MAC_LEN;
        let m1 = &msg[n..n + MAC_LEN];
        let mut nonce = [0u8; 24];
        rng.fill_bytes(&mut nonce);
        let mut sealed = c.to_vec();
        let tag = self
            .keys
            .cookie
            .encrypt_in_place_detached((&nonce).into(), m1, &mut sealed)
            .expect("16 bytes always seal");
        out.clear();
        crate::wire::put_cookie_header(out, sender_index);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out.extend_from_slice(&tag);
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_check_reply_consume() {
        let pk = [9u8; 32];
        let mut jar = CookieJar::new(&pk);
        let mut rng = crate::rng::seeded(1);
        let rng = &mut rng;
        let mut checker = CookieChecker::new(&pk, rng);
        let t0 = Instant::now();
        let from: SocketAddr = "198.51.100.1:4000".parse().unwrap();
        let mut m = vec![1, 0, 0, 0, 5, 6, 7, 8, 42];
        jar.stamp(&mut m, t0);
        assert!(checker.mac1_ok(&m));
        assert!(!checker.mac2_ok(&m, &from, t0, rng), "no cookie yet");
        let mut r = Vec::new();
        checker.reply(&m, 0x0807_0605, &from, t0, rng, &mut r);
        assert_eq!(r.len(), crate::wire::COOKIE_REPLY_LEN);
        let crate::wire::Message::CookieReply { nonce, sealed, .. } =
            crate::wire::parse(&r).unwrap()
        else {
            panic!()
        };
        jar.consume(nonce, sealed, t0).unwrap();
        let mut m2 = vec![1, 0, 0, 0, 5, 6, 7, 8, 43];
        jar.stamp(&mut m2, t0);
        assert!(checker.mac1_ok(&m2) && checker.mac2_ok(&m2, &from, t0, rng));
        let other: SocketAddr = "198.51.100.2:4000".parse().unwrap();
        assert!(
            !checker.mac2_ok(&m2, &other, t0, rng),
            "cookie is bound to the address"
        );
        assert!(
            !checker.mac2_ok(&m2, &from, t0 + COOKIE_LIFETIME, rng),
            "secret rotated"
        );
        let mut wrong = CookieChecker::new(&[8u8; 32], rng);
        assert!(!wrong.mac1_ok(&m2) && !wrong.mac2_ok(&m2, &from, t0, rng));
        // A reply forged without the buyer's key is refused.
        let mut bad = r.clone();
        bad[20] ^= 1;
        let crate::wire::Message::CookieReply { nonce, sealed, .. } =
            crate::wire::parse(&bad).unwrap()
        else {
            panic!()
        };
        assert!(jar.consume(nonce, sealed, t0).is_err());
    }
}
