//! Noise IK handshakes (via `snow`) and the transport keys derived from them.
//!
//! snow runs the handshake; the split keys then drive ChaCha20-Poly1305 directly with
//! an explicit counter as nonce and the data header as associated data, so datagrams
//! may arrive out of order or not at all.

use std::time::Instant;

use ed25519_dalek::{Signature, VerifyingKey};
use rand_core::CryptoRngCore;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};

use crate::identity::{noise_static_of, verify_binding};
use crate::replay::ReplayWindow;
use crate::rng::noise_resolver;
use crate::wire::{
    self, InitPayload, ResponsePayload, DATA_HEADER_LEN, INIT_NOISE_LEN, RESPONSE_NOISE_LEN,
    TAG_LEN,
};
use crate::{Error, Identity, MacAddr, PeerKey, Timers};

/// The Noise protocol: one round trip, initiator knows the responder's static key.
pub const NOISE_PARAMS: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
/// Bound into the handshake hash so other Noise users cannot be confused with us.
const PROLOGUE: &[u8] = b"cpushare-overlay v1";

fn noise_err(e: snow::Error) -> Error {
    Error::Noise(e.to_string())
}

fn builder<'a>(identity: &'a Identity, rng: &mut dyn CryptoRngCore) -> snow::Builder<'a> {
    snow::Builder::with_resolver(
        NOISE_PARAMS.parse().expect("valid noise params"),
        noise_resolver(rng),
    )
    .prologue(PROLOGUE)
    .local_private_key(identity.noise_secret())
}

/// Transport keys of one completed handshake.
pub(crate) struct Keypair {
    /// Our index: peers put it in data headers they send us.
    pub local_index: u32,
    /// The peer's index: we put it in data headers we send.
    pub remote_index: u32,
    send: LessSafeKey,
    recv: LessSafeKey,
    send_counter: u64,
    replay: ReplayWindow,
    /// When the handshake completed.
    pub created: Instant,
}

impl std::fmt::Debug for Keypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keypair")
            .field("local_index", &self.local_index)
            .field("remote_index", &self.remote_index)
            .field("send_counter", &self.send_counter)
            .finish_non_exhaustive()
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

fn aead_key(k: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, k).expect("32-byte key"))
}

impl Keypair {
    fn new(
        local_index: u32,
        remote_index: u32,
        send: [u8; 32],
        recv: [u8; 32],
        now: Instant,
    ) -> Keypair {
        Keypair {
            local_index,
            remote_index,
            send: aead_key(&send),
            recv: aead_key(&recv),
            send_counter: 0,
            replay: ReplayWindow::new(),
            created: now,
        }
    }

    /// Whether these keys may no longer send or receive.
    pub fn expired(&self, now: Instant, t: &Timers) -> bool {
        now.saturating_duration_since(self.created) >= t.reject_after_time
            || self.send_counter >= t.reject_after_messages
            || self
                .replay
                .highest()
                .is_some_and(|h| h >= t.reject_after_messages)
    }

    /// Whether the initiator should start a new handshake.
    pub fn wants_rekey(&self, now: Instant, t: &Timers) -> bool {
        now.saturating_duration_since(self.created) >= t.rekey_after_time
            || self.send_counter >= t.rekey_after_messages
            || self
                .replay
                .highest()
                .is_some_and(|h| h >= t.rekey_after_messages)
    }

    /// Writes a complete data message carrying `frame` into `out` (cleared first).
    pub fn encrypt_into(&mut self, frame: &[u8], out: &mut Vec<u8>) {
        let counter = self.send_counter;
        self.send_counter += 1;
        out.clear();
        wire::put_data_header(out, self.remote_index, counter);
        out.extend_from_slice(frame);
        let (header, body) = out.split_at_mut(DATA_HEADER_LEN);
        let tag = self
            .send
            .seal_in_place_separate_tag(nonce(counter), Aad::from(&*header), body)
            .expect("ChaCha20-Poly1305 accepts any length under 256 GiB");
        out.extend_from_slice(tag.as_ref());
    }

    /// Authenticates and decrypts a data message into `out` (cleared first). The replay
    /// window moves only if the tag verified.
    pub fn decrypt_into(
        &mut self,
        counter: u64,
        header: &[u8],
        ciphertext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), Error> {
        if !self.replay.check(counter) {
            return Err(Error::Replay(counter));
        }
        out.clear();
        out.extend_from_slice(ciphertext);
        if self
            .recv
            .open_in_place(nonce(counter), Aad::from(header), out)
            .is_err()
        {
            out.clear();
            return Err(Error::Decrypt);
        }
        out.truncate(ciphertext.len() - TAG_LEN);
        self.replay.commit(counter);
        Ok(())
    }
}

/// The seller's half-done handshake.
pub(crate) struct Initiation {
    hs: snow::HandshakeState,
    /// Our index for the session this handshake creates.
    pub local_index: u32,
    /// When the initiation was sent.
    pub sent_at: Instant,
    /// Whether the initiation carried a cookie from the buyer (mac2).
    pub carried_cookie: bool,
}

impl std::fmt::Debug for Initiation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Initiation")
            .field("local_index", &self.local_index)
            .finish_non_exhaustive()
    }
}

impl Initiation {
    /// Starts a handshake to `buyer` for the guest `guest_mac`; writes the whole
    /// initiation datagram into `out` (cleared first).
    #[allow(clippy::too_many_arguments)] // each is one input of the handshake
    pub fn start(
        identity: &Identity,
        buyer: &PeerKey,
        guest_mac: MacAddr,
        timestamp: u64,
        local_index: u32,
        now: Instant,
        rng: &mut dyn CryptoRngCore,
        out: &mut Vec<u8>,
    ) -> Result<Initiation, Error> {
        let remote = noise_static_of(buyer);
        let mut hs = builder(identity, rng)
            .remote_public_key(&remote)
            .build_initiator()
            .map_err(noise_err)?;
        let payload = InitPayload {
            identity: identity.public_key().to_bytes(),
            signature: identity.binding_signature().to_bytes(),
            guest_mac,
            timestamp,
        }
        .encode();
        out.clear();
        wire::put_init_header(out, local_index);
        let start = out.len();
        out.resize(start + INIT_NOISE_LEN, 0);
        let n = hs
            .write_message(&payload, &mut out[start..])
            .map_err(noise_err)?;
        debug_assert_eq!(n, INIT_NOISE_LEN);
        Ok(Initiation {
            hs,
            local_index,
            sent_at: now,
            carried_cookie: false,
        })
    }

    /// Completes the handshake with the buyer's response. The keys count their age
    /// from when the initiation was sent, which is no later than when the buyer made
    /// its half: a late response must not leave us using keys the buyer already
    /// expired.
    pub fn finish(
        mut self,
        buyer: &PeerKey,
        responder_index: u32,
        noise: &[u8],
    ) -> Result<Keypair, Error> {
        let mut payload = [0u8; RESPONSE_NOISE_LEN];
        let n = self
            .hs
            .read_message(noise, &mut payload)
            .map_err(noise_err)?;
        let p = ResponsePayload::decode(&payload[..n])?;
        let claimed =
            VerifyingKey::from_bytes(&p.identity).map_err(|_| Error::BadIdentitySignature)?;
        if claimed != *buyer {
            return Err(Error::BadIdentitySignature);
        }
        let rs: [u8; 32] = self
            .hs
            .get_remote_static()
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| Error::Noise("no remote static key".into()))?;
        verify_binding(buyer, &rs, &Signature::from_bytes(&p.signature))?;
        if !self.hs.is_handshake_finished() {
            return Err(Error::Noise("handshake not finished after response".into()));
        }
        let (i_to_r, r_to_i) = self.hs.dangerously_get_raw_split();
        Ok(Keypair::new(
            self.local_index,
            responder_index,
            i_to_r,
            r_to_i,
            self.sent_at,
        ))
    }
}

/// A handshake initiation the buyer accepted.
pub(crate) struct Accepted {
    /// The seller's identity.
    pub peer: PeerKey,
    /// The guest the session is for.
    pub guest_mac: MacAddr,
    /// The initiation's timestamp.
    pub timestamp: u64,
    /// The new (not yet confirmed) keys.
    pub keypair: Keypair,
}

/// Buyer side: processes an initiation and, if `admit` accepts the sender's ed25519
/// key, guest MAC and timestamp, writes the response datagram into `out` (cleared
/// first).
#[allow(clippy::too_many_arguments)] // each is one input of the handshake
pub(crate) fn respond(
    identity: &Identity,
    initiator_index: u32,
    noise: &[u8],
    local_index: u32,
    now: Instant,
    admit: impl FnOnce(&PeerKey, MacAddr, u64) -> Result<(), Error>,
    rng: &mut dyn CryptoRngCore,
    out: &mut Vec<u8>,
) -> Result<Accepted, Error> {
    let mut hs = builder(identity, rng)
        .build_responder()
        .map_err(noise_err)?;
    let mut payload = [0u8; INIT_NOISE_LEN];
    let n = hs.read_message(noise, &mut payload).map_err(noise_err)?;
    let p = InitPayload::decode(&payload[..n])?;
    let peer = VerifyingKey::from_bytes(&p.identity).map_err(|_| Error::BadIdentitySignature)?;
    let rs: [u8; 32] = hs
        .get_remote_static()
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| Error::Noise("no remote static key".into()))?;
    verify_binding(&peer, &rs, &Signature::from_bytes(&p.signature))?;
    admit(&peer, p.guest_mac, p.timestamp)?;
    let reply = ResponsePayload {
        identity: identity.public_key().to_bytes(),
        signature: identity.binding_signature().to_bytes(),
    }
    .encode();
    out.clear();
    wire::put_response_header(out, local_index, initiator_index);
    let start = out.len();
    out.resize(start + RESPONSE_NOISE_LEN, 0);
    let n = hs
        .write_message(&reply, &mut out[start..])
        .map_err(noise_err)?;
    debug_assert_eq!(n, RESPONSE_NOISE_LEN);
    let (i_to_r, r_to_i) = hs.dangerously_get_raw_split();
    Ok(Accepted {
        peer,
        guest_mac: p.guest_mac,
        timestamp: p.timestamp,
        keypair: Keypair::new(local_index, initiator_index, r_to_i, i_to_r, now),
    })
}

/// Which of a peer's keypairs a data message was for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Slot {
    Current,
    Previous,
    Next,
}

/// A peer's keys: the ones in use, the previous ones (frames still in flight during a
/// rekey) and, on the responder, new ones not yet confirmed by the initiator.
#[derive(Debug, Default)]
pub(crate) struct Keyring {
    pub current: Option<Keypair>,
    pub previous: Option<Keypair>,
    pub next: Option<Keypair>,
    /// Last time we sent anything (data or keepalive).
    pub last_sent: Option<Instant>,
    /// Last time an authenticated message arrived.
    pub last_received: Option<Instant>,
}

impl Keyring {
    /// The keypair whose local index is `idx`.
    pub fn find(&mut self, idx: u32) -> Option<(Slot, &mut Keypair)> {
        if let Some(k) = self.current.as_mut().filter(|k| k.local_index == idx) {
            return Some((Slot::Current, k));
        }
        if let Some(k) = self.previous.as_mut().filter(|k| k.local_index == idx) {
            return Some((Slot::Previous, k));
        }
        if let Some(k) = self.next.as_mut().filter(|k| k.local_index == idx) {
            return Some((Slot::Next, k));
        }
        None
    }

    /// Makes `k` current, keeping the old current as previous. Returns the local
    /// index of the keypair that fell out (old previous), if any.
    pub fn install(&mut self, k: Keypair) -> Option<u32> {
        let dropped = self.previous.take().map(|p| p.local_index);
        self.previous = self.current.replace(k);
        dropped
    }

    /// Responder: the initiator used `next`, so it becomes current. Returns the local
    /// index that fell out.
    pub fn confirm_next(&mut self) -> Option<u32> {
        let k = self.next.take()?;
        self.install(k)
    }

    /// Drops expired keypairs; returns their local indices.
    pub fn expire(&mut self, now: Instant, t: &Timers) -> Vec<u32> {
        let mut gone = Vec::new();
        for slot in [&mut self.current, &mut self.previous, &mut self.next] {
            if slot.as_ref().is_some_and(|k| k.expired(now, t)) {
                gone.push(slot.take().expect("checked").local_index);
            }
        }
        gone
    }

    /// All local indices held.
    pub fn indices(&self) -> impl Iterator<Item = u32> + '_ {
        [&self.current, &self.previous, &self.next]
            .into_iter()
            .flatten()
            .map(|k| k.local_index)
    }

    /// The keypair to send with, if usable.
    pub fn sender(&mut self, now: Instant, t: &Timers) -> Option<&mut Keypair> {
        self.current.as_mut().filter(|k| !k.expired(now, t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pair() -> (Identity, Identity, Keypair, Keypair) {
        let seller = crate::testutil::test_identity();
        let buyer = crate::testutil::test_identity();
        let now = Instant::now();
        let mac = MacAddr([2, 0, 0, 0, 0, 1]);
        let mut init = Vec::new();
        let hs = Initiation::start(
            &seller,
            &buyer.public_key(),
            mac,
            1,
            7,
            now,
            &mut crate::rng::seeded(1),
            &mut init,
        )
        .unwrap();
        init.extend_from_slice(&[0; 32]); // mac1, mac2
        let wire::Message::HandshakeInit {
            sender_index,
            noise,
        } = wire::parse(&init).unwrap()
        else {
            panic!("not an init");
        };
        let mut resp = Vec::new();
        let acc = respond(
            &buyer,
            sender_index,
            noise,
            9,
            now,
            |p, m, _| {
                assert!(*p == seller.public_key() && m == mac);
                Ok(())
            },
            &mut crate::rng::seeded(2),
            &mut resp,
        )
        .unwrap();
        assert_eq!(acc.peer, seller.public_key());
        let wire::Message::HandshakeResponse {
            sender_index,
            receiver_index,
            noise,
        } = wire::parse(&resp).unwrap()
        else {
            panic!("not a response");
        };
        assert_eq!(receiver_index, 7);
        let k = hs.finish(&buyer.public_key(), sender_index, noise).unwrap();
        (seller, buyer, k, acc.keypair)
    }

    fn data(d: &[u8]) -> (u64, Vec<u8>, Vec<u8>) {
        match wire::parse(d).unwrap() {
            wire::Message::Data {
                counter,
                header,
                ciphertext,
                ..
            } => (counter, header.to_vec(), ciphertext.to_vec()),
            m => panic!("{m:?}"),
        }
    }

    #[test]
    fn handshake_and_transport_both_ways() {
        let (_, _, mut s, mut b) = pair();
        let mut msg = Vec::new();
        let mut out = Vec::new();
        s.encrypt_into(b"hello buyer", &mut msg);
        let (c, h, ct) = data(&msg);
        b.decrypt_into(c, &h, &ct, &mut out).unwrap();
        assert_eq!(out, b"hello buyer");
        b.encrypt_into(b"hello seller", &mut msg);
        let (c, h, ct) = data(&msg);
        s.decrypt_into(c, &h, &ct, &mut out).unwrap();
        assert_eq!(out, b"hello seller");
    }

    #[test]
    fn tampering_is_rejected_and_does_not_move_window() {
        let (_, _, mut s, mut b) = pair();
        let mut msg = Vec::new();
        let mut out = Vec::new();
        s.encrypt_into(b"payload", &mut msg);
        for i in 0..msg.len() {
            if i < 4 {
                continue; // type/reserved are checked by the parser
            }
            let mut t = msg.clone();
            t[i] ^= 0x40;
            if let Ok(wire::Message::Data {
                counter,
                header,
                ciphertext,
                ..
            }) = wire::parse(&t)
            {
                assert!(
                    b.decrypt_into(counter, header, ciphertext, &mut out)
                        .is_err(),
                    "byte {i}"
                );
            }
        }
        let (c, h, ct) = data(&msg);
        b.decrypt_into(c, &h, &ct, &mut out).unwrap();
        assert!(matches!(
            b.decrypt_into(c, &h, &ct, &mut out),
            Err(Error::Replay(0))
        ));
    }

    #[test]
    fn wrong_buyer_key_fails_handshake() {
        let seller = crate::testutil::test_identity();
        let buyer = crate::testutil::test_identity();
        let impostor = crate::testutil::test_identity();
        let now = Instant::now();
        let mac = MacAddr([2, 0, 0, 0, 0, 1]);
        let mut init = Vec::new();
        // The seller expects `buyer`, but `impostor` receives the initiation.
        Initiation::start(
            &seller,
            &buyer.public_key(),
            mac,
            1,
            1,
            now,
            &mut crate::rng::seeded(1),
            &mut init,
        )
        .unwrap();
        init.extend_from_slice(&[0; 32]); // mac1, mac2
        let wire::Message::HandshakeInit {
            sender_index,
            noise,
        } = wire::parse(&init).unwrap()
        else {
            panic!()
        };
        let r = respond(
            &impostor,
            sender_index,
            noise,
            2,
            now,
            |_, _, _| Ok(()),
            &mut crate::rng::seeded(2),
            &mut Vec::new(),
        );
        assert!(matches!(r, Err(Error::Noise(_))), "{:?}", r.err());
    }

    #[test]
    fn unadmitted_key_is_refused() {
        let seller = crate::testutil::test_identity();
        let buyer = crate::testutil::test_identity();
        let mut init = Vec::new();
        Initiation::start(
            &seller,
            &buyer.public_key(),
            MacAddr([2; 6]),
            1,
            1,
            Instant::now(),
            &mut crate::rng::seeded(1),
            &mut init,
        )
        .unwrap();
        init.extend_from_slice(&[0; 32]); // mac1, mac2
        let wire::Message::HandshakeInit {
            sender_index,
            noise,
        } = wire::parse(&init).unwrap()
        else {
            panic!()
        };
        let r = respond(
            &buyer,
            sender_index,
            noise,
            2,
            Instant::now(),
            |p, m, _| {
                Err(Error::NotAdmitted {
                    peer: hex::encode(p.as_bytes()),
                    mac: m,
                })
            },
            &mut crate::rng::seeded(2),
            &mut Vec::new(),
        );
        assert!(matches!(r, Err(Error::NotAdmitted { .. })));
    }

    #[test]
    fn keypair_expiry_and_rekey_marks() {
        let (_, _, s, _) = pair();
        let t = Timers::default();
        let now = s.created;
        assert!(!s.expired(now, &t) && !s.wants_rekey(now, &t));
        assert!(s.wants_rekey(now + Duration::from_secs(121), &t));
        assert!(s.expired(now + Duration::from_secs(180), &t));
    }
}
