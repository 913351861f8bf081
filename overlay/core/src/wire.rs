//! Overlay message framing. All integers little-endian.
//!
//! ```text
//! handshake init      1 | 0 0 0 | sender index u32 | Noise IK message 1 (206 bytes) | mac1 (16) | mac2 (16)
//! handshake response  2 | 0 0 0 | sender index u32 | receiver index u32 | Noise IK message 2 (144 bytes)
//! cookie reply        3 | 0 0 0 | receiver index u32 | nonce (24) | XChaCha20-Poly1305(cookie) (32)
//! data                4 | 0 0 0 | receiver index u32 | counter u64 | ChaCha20-Poly1305(frame) | tag (16)
//! ```
//! The data header (16 bytes) is the AEAD's associated data; the nonce is the counter.
//! A keepalive is a data message with an empty frame. Parsing is strict: exact lengths
//! for handshakes, zero reserved bytes, known types only.

use crate::{Error, MacAddr};

/// Message type: handshake initiation (seller to buyer).
pub const TYPE_HANDSHAKE_INIT: u8 = 1;
/// Message type: handshake response (buyer to seller).
pub const TYPE_HANDSHAKE_RESPONSE: u8 = 2;
/// Message type: cookie reply (buyer under load to seller).
pub const TYPE_COOKIE_REPLY: u8 = 3;
/// Message type: transport data or keepalive.
pub const TYPE_DATA: u8 = 4;

/// Length of the data header (type, reserved, receiver index, counter).
pub const DATA_HEADER_LEN: usize = 16;
/// Poly1305 tag length.
pub const TAG_LEN: usize = 16;
/// Smallest data message (a keepalive).
pub const DATA_MIN_LEN: usize = DATA_HEADER_LEN + TAG_LEN;
/// Largest Ethernet frame carried (jumbo frames are not supported).
pub const MAX_FRAME_LEN: usize = 9216;

/// Plaintext payload of handshake message 1: ed25519 key, signature, guest MAC,
/// timestamp.
pub const INIT_PAYLOAD_LEN: usize = 32 + 64 + 6 + 8;
/// Plaintext payload of handshake message 2: ed25519 key, signature.
pub const RESPONSE_PAYLOAD_LEN: usize = 32 + 64;
/// Noise IK message 1: e, s (encrypted), payload (encrypted).
pub const INIT_NOISE_LEN: usize = 32 + (32 + TAG_LEN) + (INIT_PAYLOAD_LEN + TAG_LEN);
/// Noise IK message 2: e, payload (encrypted).
pub const RESPONSE_NOISE_LEN: usize = 32 + (RESPONSE_PAYLOAD_LEN + TAG_LEN);
/// Full handshake initiation datagram (with mac1 and mac2).
pub const HANDSHAKE_INIT_LEN: usize = 8 + INIT_NOISE_LEN + 2 * crate::cookie::MAC_LEN;
/// Full cookie reply datagram.
pub const COOKIE_REPLY_LEN: usize = 8 + 24 + 16 + TAG_LEN;
/// Full handshake response datagram.
pub const HANDSHAKE_RESPONSE_LEN: usize = 12 + RESPONSE_NOISE_LEN;

/// A parsed overlay datagram borrowing from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    /// Handshake initiation.
    HandshakeInit {
        /// Initiator's index for this handshake/session.
        sender_index: u32,
        /// Noise message 1.
        noise: &'a [u8],
    },
    /// Handshake response.
    HandshakeResponse {
        /// Responder's index for the new session.
        sender_index: u32,
        /// The initiator's index it answers.
        receiver_index: u32,
        /// Noise message 2.
        noise: &'a [u8],
    },
    /// Cookie reply: retry the handshake with this cookie in mac2.
    CookieReply {
        /// The initiator's index of the initiation it answers.
        receiver_index: u32,
        /// XChaCha20 nonce.
        nonce: &'a [u8],
        /// Encrypted cookie and tag.
        sealed: &'a [u8],
    },
    /// Data or keepalive.
    Data {
        /// The receiver's session index.
        receiver_index: u32,
        /// Nonce counter.
        counter: u64,
        /// The 16 header bytes (associated data).
        header: &'a [u8],
        /// Ciphertext including the 16-byte tag.
        ciphertext: &'a [u8],
    },
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Parses one datagram strictly.
pub fn parse(d: &[u8]) -> Result<Message<'_>, Error> {
    if d.len() < 4 {
        return Err(Error::Truncated {
            what: "overlay datagram",
            len: d.len(),
            need: 4,
        });
    }
    let ty = d[0];
    let exact = |expected: usize, what: &'static str| {
        if d.len() == expected {
            Ok(())
        } else {
            Err(Error::BadLength {
                what,
                len: d.len(),
                expected,
            })
        }
    };
    match ty {
        TYPE_HANDSHAKE_INIT => exact(HANDSHAKE_INIT_LEN, "handshake initiation")?,
        TYPE_HANDSHAKE_RESPONSE => exact(HANDSHAKE_RESPONSE_LEN, "handshake response")?,
        TYPE_COOKIE_REPLY => exact(COOKIE_REPLY_LEN, "cookie reply")?,
        TYPE_DATA => {
            if d.len() < DATA_MIN_LEN {
                return Err(Error::Truncated {
                    what: "data message",
                    len: d.len(),
                    need: DATA_MIN_LEN,
                });
            }
            if d.len() > DATA_MIN_LEN + MAX_FRAME_LEN {
                return Err(Error::BadLength {
                    what: "data message",
                    len: d.len(),
                    expected: DATA_MIN_LEN + MAX_FRAME_LEN,
                });
            }
        }
        other => return Err(Error::UnknownMessageType(other)),
    }
    if d[1..4] != [0, 0, 0] {
        return Err(Error::ReservedNotZero);
    }
    Ok(match ty {
        TYPE_HANDSHAKE_INIT => Message::HandshakeInit {
            sender_index: u32_at(d, 4),
            noise: &d[8..8 + INIT_NOISE_LEN],
        },
        TYPE_HANDSHAKE_RESPONSE => Message::HandshakeResponse {
            sender_index: u32_at(d, 4),
            receiver_index: u32_at(d, 8),
            noise: &d[12..],
        },
        TYPE_COOKIE_REPLY => Message::CookieReply {
            receiver_index: u32_at(d, 4),
            nonce: &d[8..32],
            sealed: &d[32..],
        },
        _ => Message::Data {
            receiver_index: u32_at(d, 4),
            counter: u64::from_le_bytes(d[8..16].try_into().expect("8 bytes")),
            header: &d[..DATA_HEADER_LEN],
            ciphertext: &d[DATA_HEADER_LEN..],
        },
    })
}

/// Appends a data header to `buf`.
pub fn put_data_header(buf: &mut Vec<u8>, receiver_index: u32, counter: u64) {
    buf.extend_from_slice(&[TYPE_DATA, 0, 0, 0]);
    buf.extend_from_slice(&receiver_index.to_le_bytes());
    buf.extend_from_slice(&counter.to_le_bytes());
}

/// Appends a handshake initiation header; the caller appends the Noise message.
pub fn put_init_header(buf: &mut Vec<u8>, sender_index: u32) {
    buf.extend_from_slice(&[TYPE_HANDSHAKE_INIT, 0, 0, 0]);
    buf.extend_from_slice(&sender_index.to_le_bytes());
}

/// Appends a handshake response header; the caller appends the Noise message.
pub fn put_response_header(buf: &mut Vec<u8>, sender_index: u32, receiver_index: u32) {
    buf.extend_from_slice(&[TYPE_HANDSHAKE_RESPONSE, 0, 0, 0]);
    buf.extend_from_slice(&sender_index.to_le_bytes());
    buf.extend_from_slice(&receiver_index.to_le_bytes());
}

/// Appends a cookie reply header; the caller appends nonce and sealed cookie.
pub fn put_cookie_header(buf: &mut Vec<u8>, receiver_index: u32) {
    buf.extend_from_slice(&[TYPE_COOKIE_REPLY, 0, 0, 0]);
    buf.extend_from_slice(&receiver_index.to_le_bytes());
}

/// Decrypted payload of handshake message 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitPayload {
    /// Initiator's ed25519 public key.
    pub identity: [u8; 32],
    /// Its signature over its Noise static key.
    pub signature: [u8; 64],
    /// The guest MAC this session will carry.
    pub guest_mac: MacAddr,
    /// Initiator's wall clock (ns since the Unix epoch); the responder only accepts
    /// increasing values per guest, so a replayed initiation is refused.
    pub timestamp: u64,
}

impl InitPayload {
    /// Serialises to the fixed layout.
    pub fn encode(&self) -> [u8; INIT_PAYLOAD_LEN] {
        let mut b = [0u8; INIT_PAYLOAD_LEN];
        b[..32].copy_from_slice(&self.identity);
        b[32..96].copy_from_slice(&self.signature);
        b[96..102].copy_from_slice(&self.guest_mac.0);
        b[102..].copy_from_slice(&self.timestamp.to_le_bytes());
        b
    }

    /// Parses the fixed layout.
    pub fn decode(b: &[u8]) -> Result<InitPayload, Error> {
        if b.len() != INIT_PAYLOAD_LEN {
            return Err(Error::BadLength {
                what: "handshake initiation payload",
                len: b.len(),
                expected: INIT_PAYLOAD_LEN,
            });
        }
        Ok(InitPayload {
            identity: b[..32].try_into().expect("32"),
            signature: b[32..96].try_into().expect("64"),
            guest_mac: MacAddr(b[96..102].try_into().expect("6")),
            timestamp: u64::from_le_bytes(b[102..].try_into().expect("8")),
        })
    }
}

/// Decrypted payload of handshake message 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponsePayload {
    /// Responder's ed25519 public key.
    pub identity: [u8; 32],
    /// Its signature over its Noise static key.
    pub signature: [u8; 64],
}

impl ResponsePayload {
    /// Serialises to the fixed layout.
    pub fn encode(&self) -> [u8; RESPONSE_PAYLOAD_LEN] {
        let mut b = [0u8; RESPONSE_PAYLOAD_LEN];
        b[..32].copy_from_slice(&self.identity);
        b[32..].copy_from_slice(&self.signature);
        b
    }

    /// Parses the fixed layout.
    pub fn decode(b: &[u8]) -> Result<ResponsePayload, Error> {
        if b.len() != RESPONSE_PAYLOAD_LEN {
            return Err(Error::BadLength {
                what: "handshake response payload",
                len: b.len(),
                expected: RESPONSE_PAYLOAD_LEN,
            });
        }
        Ok(ResponsePayload {
            identity: b[..32].try_into().expect("32"),
            signature: b[32..].try_into().expect("64"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lengths() {
        assert_eq!(HANDSHAKE_INIT_LEN, 246);
        assert_eq!(COOKIE_REPLY_LEN, 64);
        assert_eq!(HANDSHAKE_RESPONSE_LEN, 156);
    }

    #[test]
    fn rejects_bad_headers() {
        assert!(matches!(parse(&[]), Err(Error::Truncated { .. })));
        assert!(matches!(
            parse(&[9, 0, 0, 0]),
            Err(Error::UnknownMessageType(9))
        ));
        let mut d = vec![0u8; HANDSHAKE_INIT_LEN];
        d[0] = TYPE_HANDSHAKE_INIT;
        assert!(parse(&d).is_ok());
        d[2] = 1;
        assert!(matches!(parse(&d), Err(Error::ReservedNotZero)));
        d[2] = 0;
        d.push(0);
        assert!(matches!(parse(&d), Err(Error::BadLength { .. })));
        let mut k = vec![0u8; DATA_MIN_LEN - 1];
        k[0] = TYPE_DATA;
        assert!(matches!(parse(&k), Err(Error::Truncated { .. })));
        k.push(0);
        assert!(matches!(parse(&k), Ok(Message::Data { .. })));
    }

    proptest! {
        #[test]
        fn data_header_roundtrip(idx in any::<u32>(), ctr in any::<u64>(), body in proptest::collection::vec(any::<u8>(), TAG_LEN..1600)) {
            let mut b = Vec::new();
            put_data_header(&mut b, idx, ctr);
            b.extend_from_slice(&body);
            match parse(&b).unwrap() {
                Message::Data { receiver_index, counter, header, ciphertext } => {
                    prop_assert_eq!(receiver_index, idx);
                    prop_assert_eq!(counter, ctr);
                    prop_assert_eq!(header, &b[..16]);
                    prop_assert_eq!(ciphertext, &body[..]);
                }
                m => prop_assert!(false, "parsed as {:?}", m),
            }
        }

        #[test]
        fn handshake_roundtrip(s in any::<u32>(), r in any::<u32>(), n in proptest::collection::vec(any::<u8>(), RESPONSE_NOISE_LEN)) {
            let mut b = Vec::new();
            put_response_header(&mut b, s, r);
            b.extend_from_slice(&n);
            prop_assert_eq!(parse(&b).unwrap(), Message::HandshakeResponse { sender_index: s, receiver_index: r, noise: &n[..] });
        }

        #[test]
        fn arbitrary_bytes_never_panic(d in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(m) = parse(&d) {
                // Whatever parses has a valid type, zero reserved bytes and a legal length.
                prop_assert!(d[1..4] == [0, 0, 0]);
                match m {
                    Message::HandshakeInit { noise, .. } => prop_assert_eq!(noise.len(), INIT_NOISE_LEN),
                    Message::HandshakeResponse { noise, .. } => prop_assert_eq!(noise.len(), RESPONSE_NOISE_LEN),
                    Message::CookieReply { nonce, sealed, .. } => prop_assert_eq!((nonce.len(), sealed.len()), (24, 32)),
                    Message::Data { ciphertext, .. } => prop_assert!(ciphertext.len() >= TAG_LEN),
                }
            }
        }

        #[test]
        fn payload_roundtrip(id in any::<[u8; 32]>(), sig in proptest::collection::vec(any::<u8>(), 64), mac in any::<[u8; 6]>(), ts in any::<u64>()) {
            let p = InitPayload { identity: id, signature: sig.clone().try_into().unwrap(), guest_mac: MacAddr(mac), timestamp: ts };
            prop_assert_eq!(InitPayload::decode(&p.encode()).unwrap(), p);
            let r = ResponsePayload { identity: id, signature: sig.try_into().unwrap() };
            prop_assert_eq!(ResponsePayload::decode(&r.encode()).unwrap(), r);
            prop_assert!(InitPayload::decode(&[0u8; 5]).is_err());
        }
    }
}
