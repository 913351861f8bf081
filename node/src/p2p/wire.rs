//! Wire format of the chunk-swarm protocol (`/cpushare/swarm/3`).
//!
//! Each peer opens one long-lived stream to each other peer and sends every
//! message for every image on it; replies come back on the other side's
//! stream. One stream per peer pair (instead of one per request) spares the
//! per-request stream set-up, negotiation and close on the buyer's slow uplink,
//! and lets small messages share TCP segments with chunk data.
//!
//! The reader of a new stream first sends one byte, 0xa5, back on it: the
//! opener writes nothing until it has that byte (libp2p may drop an inbound
//! stream it cannot hand over, and what was written on it would be lost).
//!
//! Every message is `u32 length (LE) | u8 tag | image[32] | body`, integers
//! little-endian. Parsers are strict: unknown tags, short bodies and trailing
//! bytes are errors. The version lives in the protocol name, so a peer speaking
//! another version fails protocol negotiation before any message is parsed.
//!
//! - 1 GetManifest: u8 wait (1: I was sent here; if you are fetching it
//!   yourself, answer when you have it)
//! - 2 Manifest: signed manifest bytes (rest)
//! - 3 NotFound (unknown image)
//! - 4 Hello: u32 n | n bytes have-set (n = ceil(chunks / 8))
//! - 5 HelloAck: u8 role (0 peer, 1 super-seed) | u32 n | n bytes have-set
//! - 6 Have: u32 count (<= MAX_HAVES) | count x u32 chunk index
//! - 7 GetChunk: u32 index
//! - 8 Chunk: u32 index | u64 sent_us | chunk bytes (rest, 1..=MAX_CHUNK); sent_us:
//!   the sender's monotonic clock (us) when it handed the reply's first bytes to
//!   its transport (see link.rs for what that includes)
//! - 9 NotHave: u32 index
//! - 10 Starving (to a super-seed: nobody else has what I miss)
//! - 11 Cancel: u32 index (drop a queued, not yet sent, Chunk reply)
//! - 12 ManifestAt: u8 n (1..=MAX_REDIRECT) | n x (u8 len | peer id): a super-seed
//!   saying "these peers have (or are getting) it; ask them"
//! - 13 Grant: grant bytes (rest, 1..=MAX_GRANT): the image owner's signed grant,
//!   presented once per connection before the first request for the image (the
//!   sender's own grant), or handed to a peer let in by one we hold (its own, or a
//!   public one) so it can present it to other holders
//! - 14 Denied: u8 reason (0 no grant, 1 other image, 2 other peer, 3 not the
//!   owner's, 4 expired): the image is private and the sender holds no valid grant
//! - 15 Busy: u32 index | u32 wait_ms
//! - 16 Ack: u32 index | i64 delay_us | i64 last_us: the acknowledging Have of
//!   one Chunk reply (the receiver now holds `index`); delay_us = the receiver's
//!   monotonic clock when the reply's first bytes arrived minus the reply's
//!   sent_us, last_us the same for its last bytes. The two clocks' offset is
//!   unknown and constant, so the sender compares them only with other samples
//!   of the same peer (LEDBAT's one-way delay, issue 16)

use chunks::ImageId;
use libp2p::PeerId;

/// Protocol name; the trailing number is the wire version.
pub const PROTOCOL: &str = "/cpushare/swarm/3";
/// Largest have-set: an image of MAX_CHUNKS chunks.
const MAX_HAVE_SET: usize = (chunks::MAX_CHUNKS as usize).div_ceil(8);
/// Largest message accepted (a manifest of the largest allowed size).
pub const MAX_MESSAGE: usize = 64 + chunks::MAX_MANIFEST_BYTES;
/// Most peers named in one ManifestAt.
pub const MAX_REDIRECT: usize = 4;
/// Most chunk indices in one Have.
pub const MAX_HAVES: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerRole {
    Peer,
    SuperSeed,
}

/// What a message says about its image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    GetManifest {
        wait: bool,
    },
    Manifest(Vec<u8>),
    NotFound,
    Hello {
        have: Vec<u8>,
    },
    HelloAck {
        role: PeerRole,
        have: Vec<u8>,
    },
    Have {
        chunks: Vec<u32>,
    },
    GetChunk {
        index: u32,
    },
    Chunk {
        index: u32,
        /// The sender's clock when the reply started out, us.
        sent_us: u64,
        bytes: Vec<u8>,
    },
    NotHave {
        index: u32,
    },
    Starving,
    Cancel {
        index: u32,
    },
    ManifestAt {
        peers: Vec<PeerId>,
    },
    Grant(Vec<u8>),
    Denied {
        reason: DenyReason,
    },
    /// The holder has chunk `index` but its upload queue is full: ask again in
    /// about `wait_ms` (issue 16: a request never waits long behind a slow uplink).
    Busy {
        index: u32,
        wait_ms: u32,
    },
    /// The acknowledging Have of one Chunk reply, with its one-way delay
    /// (arrival on the receiver's clock minus the reply's `sent_us`).
    Ack {
        index: u32,
        delay_us: i64,
        /// The same for the reply's last bytes.
        last_us: i64,
    },
}

/// Why a holder refused a request for a private image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason {
    NoGrant,
    OtherImage,
    OtherPeer,
    NotOwner,
    Expired,
}

impl DenyReason {
    fn code(self) -> u8 {
        match self {
            DenyReason::NoGrant => 0,
            DenyReason::OtherImage => 1,
            DenyReason::OtherPeer => 2,
            DenyReason::NotOwner => 3,
            DenyReason::Expired => 4,
        }
    }

    fn of(code: u8) -> Option<Self> {
        Some(match code {
            0 => DenyReason::NoGrant,
            1 => DenyReason::OtherImage,
            2 => DenyReason::OtherPeer,
            3 => DenyReason::NotOwner,
            4 => DenyReason::Expired,
            _ => return None,
        })
    }

    /// What the refused side tells its user.
    pub fn describe(self) -> &'static str {
        match self {
            DenyReason::NoGrant => "this node holds no grant for it",
            DenyReason::OtherImage => "our grant is for another image",
            DenyReason::OtherPeer => "our grant names another peer",
            DenyReason::NotOwner => "our grant is not signed by the image's buyer",
            DenyReason::Expired => "our grant has expired",
        }
    }
}

impl From<market::GrantRefusal> for DenyReason {
    fn from(r: market::GrantRefusal) -> Self {
        match r {
            market::GrantRefusal::OtherImage => DenyReason::OtherImage,
            market::GrantRefusal::OtherPeer => DenyReason::OtherPeer,
            market::GrantRefusal::NotOwner => DenyReason::NotOwner,
            market::GrantRefusal::Expired => DenyReason::Expired,
        }
    }
}

/// One message of the swarm protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Msg {
    pub image: ImageId,
    pub body: Body,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("message truncated")]
    Truncated,
    #[error("unknown message tag {0}")]
    UnknownTag(u8),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    #[error("field too large: {0}")]
    TooLarge(&'static str),
    #[error("bad field: {0}")]
    Bad(&'static str),
}

struct Rd<'a>(&'a [u8]);

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn image(&mut self) -> Result<ImageId, WireError> {
        Ok(ImageId(self.take(32)?.try_into().expect("32 bytes")))
    }
    fn have_set(&mut self) -> Result<Vec<u8>, WireError> {
        let n = self.u32()? as usize;
        if n > MAX_HAVE_SET {
            return Err(WireError::TooLarge("have-set"));
        }
        Ok(self.take(n)?.to_vec())
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
    fn end(&self) -> Result<(), WireError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing(self.0.len()))
        }
    }
}

impl Body {
    /// The message's name (for counters and logs).
    pub fn name(&self) -> &'static str {
        match self {
            Body::GetManifest { .. } => "get_manifest",
            Body::Manifest(_) => "manifest",
            Body::NotFound => "not_found",
            Body::Hello { .. } => "hello",
            Body::HelloAck { .. } => "hello_ack",
            Body::Have { .. } => "have",
            Body::GetChunk { .. } => "get_chunk",
            Body::Chunk { .. } => "chunk",
            Body::NotHave { .. } => "not_have",
            Body::Starving => "starving",
            Body::Cancel { .. } => "cancel",
            Body::ManifestAt { .. } => "manifest_at",
            Body::Grant(_) => "grant",
            Body::Denied { .. } => "denied",
            Body::Busy { .. } => "busy",
            Body::Ack { .. } => "ack",
        }
    }

    fn tag(&self) -> u8 {
        match self {
            Body::GetManifest { .. } => 1,
            Body::Manifest(_) => 2,
            Body::NotFound => 3,
            Body::Hello { .. } => 4,
            Body::HelloAck { .. } => 5,
            Body::Have { .. } => 6,
            Body::GetChunk { .. } => 7,
            Body::Chunk { .. } => 8,
            Body::NotHave { .. } => 9,
            Body::Starving => 10,
            Body::Cancel { .. } => 11,
            Body::ManifestAt { .. } => 12,
            Body::Grant(_) => 13,
            Body::Denied { .. } => 14,
            Body::Busy { .. } => 15,
            Body::Ack { .. } => 16,
        }
    }
}

/// Where a Chunk frame (length prefix included) holds its `sent_us`.
const CHUNK_SENT_AT: usize = 4 + 1 + 32 + 4;

/// Stamps an encoded Chunk frame with the time its first bytes go out (the
/// frame is encoded when the reply is queued, stamped when it is written).
/// Panics if `frame` is not an encoded Chunk.
pub fn stamp_chunk(frame: &mut [u8], sent_us: u64) {
    assert_eq!(frame.get(4), Some(&8), "not a chunk frame");
    frame[CHUNK_SENT_AT..CHUNK_SENT_AT + 8].copy_from_slice(&sent_us.to_le_bytes());
}

impl Msg {
    pub fn new(image: ImageId, body: Body) -> Msg {
        Msg { image, body }
    }

    /// The whole frame, length prefix included.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(&[0; 4]);
        b.push(self.body.tag());
        b.extend_from_slice(&self.image.0);
        let u32le = |b: &mut Vec<u8>, v: u32| b.extend_from_slice(&v.to_le_bytes());
        match &self.body {
            Body::NotFound | Body::Starving => {}
            Body::GetManifest { wait } => b.push(*wait as u8),
            Body::ManifestAt { peers } => {
                b.push(peers.len() as u8);
                for p in peers {
                    let id = p.to_bytes();
                    b.push(id.len() as u8);
                    b.extend_from_slice(&id);
                }
            }
            Body::Manifest(m) | Body::Grant(m) => b.extend_from_slice(m),
            Body::Denied { reason } => b.push(reason.code()),
            Body::Hello { have } => {
                u32le(&mut b, have.len() as u32);
                b.extend_from_slice(have);
            }
            Body::HelloAck { role, have } => {
                b.push(match role {
                    PeerRole::Peer => 0,
                    PeerRole::SuperSeed => 1,
                });
                u32le(&mut b, have.len() as u32);
                b.extend_from_slice(have);
            }
            Body::Have { chunks } => {
                u32le(&mut b, chunks.len() as u32);
                for &c in chunks {
                    u32le(&mut b, c);
                }
            }
            Body::GetChunk { index } | Body::NotHave { index } | Body::Cancel { index } => {
                u32le(&mut b, *index)
            }
            Body::Chunk {
                index,
                sent_us,
                bytes,
            } => {
                u32le(&mut b, *index);
                b.extend_from_slice(&sent_us.to_le_bytes());
                b.extend_from_slice(bytes);
            }
            Body::Busy { index, wait_ms } => {
                u32le(&mut b, *index);
                u32le(&mut b, *wait_ms);
            }
            Body::Ack {
                index,
                delay_us,
                last_us,
            } => {
                u32le(&mut b, *index);
                b.extend_from_slice(&delay_us.to_le_bytes());
                b.extend_from_slice(&last_us.to_le_bytes());
            }
        }
        let len = (b.len() - 4) as u32;
        b[..4].copy_from_slice(&len.to_le_bytes());
        b
    }

    /// Parses one message body (the bytes after the length prefix).
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Rd(bytes);
        let tag = r.u8()?;
        let image = r.image()?;
        let body = match tag {
            1 => Body::GetManifest {
                wait: match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(WireError::Bad("wait flag")),
                },
            },
            2 => Body::Manifest(r.rest().to_vec()),
            3 => Body::NotFound,
            4 => Body::Hello {
                have: r.have_set()?,
            },
            5 => {
                let role = match r.u8()? {
                    0 => PeerRole::Peer,
                    1 => PeerRole::SuperSeed,
                    _ => return Err(WireError::Bad("peer role")),
                };
                Body::HelloAck {
                    role,
                    have: r.have_set()?,
                }
            }
            6 => {
                let n = r.u32()? as usize;
                if n > MAX_HAVES {
                    return Err(WireError::TooLarge("have list"));
                }
                let mut chunks = Vec::with_capacity(n);
                for _ in 0..n {
                    chunks.push(r.u32()?);
                }
                Body::Have { chunks }
            }
            7 => Body::GetChunk { index: r.u32()? },
            8 => {
                let index = r.u32()?;
                let sent_us = r.u64()?;
                let c = r.rest();
                if c.len() > chunks::MAX_CHUNK as usize {
                    return Err(WireError::TooLarge("chunk"));
                }
                if c.is_empty() {
                    return Err(WireError::Bad("empty chunk"));
                }
                Body::Chunk {
                    index,
                    sent_us,
                    bytes: c.to_vec(),
                }
            }
            9 => Body::NotHave { index: r.u32()? },
            10 => Body::Starving,
            11 => Body::Cancel { index: r.u32()? },
            12 => {
                let n = r.u8()? as usize;
                if n == 0 || n > MAX_REDIRECT {
                    return Err(WireError::Bad("peer count"));
                }
                let mut peers = Vec::with_capacity(n);
                for _ in 0..n {
                    let len = r.u8()? as usize;
                    let id =
                        PeerId::from_bytes(r.take(len)?).map_err(|_| WireError::Bad("peer id"))?;
                    peers.push(id);
                }
                Body::ManifestAt { peers }
            }
            13 => {
                let g = r.rest();
                if g.len() > market::MAX_GRANT {
                    return Err(WireError::TooLarge("grant"));
                }
                if g.is_empty() {
                    return Err(WireError::Bad("empty grant"));
                }
                Body::Grant(g.to_vec())
            }
            14 => Body::Denied {
                reason: DenyReason::of(r.u8()?).ok_or(WireError::Bad("deny reason"))?,
            },
            15 => Body::Busy {
                index: r.u32()?,
                wait_ms: r.u32()?,
            },
            16 => Body::Ack {
                index: r.u32()?,
                delay_us: r.u64()? as i64,
                last_us: r.u64()? as i64,
            },
            t => return Err(WireError::UnknownTag(t)),
        };
        r.end()?;
        Ok(Msg { image, body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn img(b: u8) -> ImageId {
        ImageId([b; 32])
    }

    fn all() -> Vec<Msg> {
        let bodies = vec![
            Body::GetManifest { wait: true },
            Body::Manifest(vec![9; 10]),
            Body::NotFound,
            Body::Hello {
                have: vec![1, 2, 3],
            },
            Body::HelloAck {
                role: PeerRole::SuperSeed,
                have: vec![0xff],
            },
            Body::Have {
                chunks: vec![0, 7, 99],
            },
            Body::GetChunk { index: 5 },
            Body::Chunk {
                index: 6,
                sent_us: 123_456_789,
                bytes: vec![1; 100],
            },
            Body::NotHave { index: 7 },
            Body::Starving,
            Body::Cancel { index: 8 },
            Body::ManifestAt {
                peers: vec![PeerId::from_bytes(&[0, 4, 1, 2, 3, 4]).unwrap()],
            },
            Body::Grant(vec![1; 40]),
            Body::Denied {
                reason: DenyReason::Expired,
            },
            Body::Busy {
                index: 9,
                wait_ms: 1500,
            },
            Body::Ack {
                index: 10,
                delay_us: -42_000,
                last_us: 600_000,
            },
        ];
        bodies
            .into_iter()
            .enumerate()
            .map(|(i, b)| Msg::new(img(i as u8), b))
            .collect()
    }

    #[test]
    fn roundtrip_all() {
        for m in all() {
            let f = m.encode();
            let len = u32::from_le_bytes(f[..4].try_into().unwrap()) as usize;
            assert_eq!(len, f.len() - 4);
            assert_eq!(Msg::decode(&f[4..]).unwrap(), m);
        }
    }

    #[test]
    fn chunk_header_size() {
        let m = Msg::new(
            img(1),
            Body::Chunk {
                index: 1,
                sent_us: 0,
                bytes: vec![0; 10],
            },
        );
        // length, tag, image, index, stamp, payload
        let mut f = m.encode();
        assert_eq!(f.len(), 4 + 1 + 32 + 4 + 8 + 10);
        stamp_chunk(&mut f, u64::MAX - 3);
        assert_eq!(
            Msg::decode(&f[4..]).unwrap().body,
            Body::Chunk {
                index: 1,
                sent_us: u64::MAX - 3,
                bytes: vec![0; 10],
            }
        );
    }

    #[test]
    fn rejects_trailing_unknown_and_truncated() {
        let mut none = vec![12u8];
        none.extend_from_slice(&[0; 32]);
        none.push(0);
        assert_eq!(Msg::decode(&none), Err(WireError::Bad("peer count")));
        let mut bad_id = vec![12u8];
        bad_id.extend_from_slice(&[0; 32]);
        bad_id.extend_from_slice(&[1, 3, 0xff, 0xff, 0xff]);
        assert_eq!(Msg::decode(&bad_id), Err(WireError::Bad("peer id")));
        let mut b = Msg::new(img(4), Body::GetChunk { index: 5 }).encode();
        b.push(0);
        assert_eq!(Msg::decode(&b[4..]), Err(WireError::Trailing(1)));
        let mut unknown = vec![99];
        unknown.extend_from_slice(&[0; 32]);
        assert_eq!(Msg::decode(&unknown), Err(WireError::UnknownTag(99)));
        assert_eq!(Msg::decode(&[7, 1, 2]), Err(WireError::Truncated));
        let mut no_stamp = vec![8];
        no_stamp.extend_from_slice(&[0; 36 + 7]);
        assert_eq!(Msg::decode(&no_stamp), Err(WireError::Truncated));
        let mut empty_chunk = vec![8];
        empty_chunk.extend_from_slice(&[0; 36 + 8]);
        assert_eq!(
            Msg::decode(&empty_chunk),
            Err(WireError::Bad("empty chunk"))
        );
        let mut big = vec![8];
        big.extend(vec![0; 36 + 8 + chunks::MAX_CHUNK as usize + 1]);
        assert_eq!(Msg::decode(&big), Err(WireError::TooLarge("chunk")));
        let mut haves = vec![6];
        haves.extend_from_slice(&[0; 32]);
        haves.extend_from_slice(&(u32::MAX).to_le_bytes());
        assert_eq!(Msg::decode(&haves), Err(WireError::TooLarge("have list")));
        let mut hello = vec![4];
        hello.extend_from_slice(&[0; 32]);
        hello.extend_from_slice(&(u32::MAX).to_le_bytes());
        assert_eq!(Msg::decode(&hello), Err(WireError::TooLarge("have-set")));
        let mut grant = vec![13];
        grant.extend(vec![0; 32 + market::MAX_GRANT + 1]);
        assert_eq!(Msg::decode(&grant), Err(WireError::TooLarge("grant")));
        let mut ack = vec![16];
        ack.extend_from_slice(&[0; 32 + 4 + 15]);
        assert_eq!(Msg::decode(&ack), Err(WireError::Truncated));
        ack.extend_from_slice(&[0; 2]);
        assert_eq!(Msg::decode(&ack), Err(WireError::Trailing(1)));
        let mut deny = vec![14];
        deny.extend_from_slice(&[0; 32]);
        deny.push(5);
        assert_eq!(Msg::decode(&deny), Err(WireError::Bad("deny reason")));
    }

    proptest! {
        #[test]
        fn busy_roundtrip(index in any::<u32>(), wait_ms in any::<u32>(), cut in 0usize..45) {
            let m = Msg::new(img(3), Body::Busy { index, wait_ms });
            let f = m.encode();
            prop_assert_eq!(f.len(), 4 + 1 + 32 + 8);
            prop_assert_eq!(Msg::decode(&f[4..]).unwrap(), m);
            // any truncation is an error, never a panic or a different message
            if cut < f.len() - 4 {
                prop_assert!(Msg::decode(&f[4..4 + cut]).is_err());
            }
        }

        #[test]
        fn ack_roundtrip(
            index in any::<u32>(),
            delay_us in any::<i64>(),
            last_us in any::<i64>(),
            cut in 0usize..57,
        ) {
            let m = Msg::new(img(5), Body::Ack { index, delay_us, last_us });
            let f = m.encode();
            prop_assert_eq!(f.len(), 4 + 1 + 32 + 20);
            prop_assert_eq!(Msg::decode(&f[4..]).unwrap(), m);
            if cut < f.len() - 4 {
                prop_assert!(Msg::decode(&f[4..4 + cut]).is_err());
            }
        }

        #[test]
        fn chunk_roundtrip(
            index in any::<u32>(),
            sent_us in any::<u64>(),
            bytes in proptest::collection::vec(any::<u8>(), 1..2000),
            cut in 0usize..49,
        ) {
            let m = Msg::new(img(6), Body::Chunk { index, sent_us: 0, bytes: bytes.clone() });
            let mut f = m.encode();
            stamp_chunk(&mut f, sent_us);
            let want = Msg::new(img(6), Body::Chunk { index, sent_us, bytes });
            prop_assert_eq!(Msg::decode(&f[4..]).unwrap(), want);
            // cut inside the header (tag, image, index, stamp): an error
            prop_assert!(Msg::decode(&f[4..4 + cut.min(44)]).is_err());
        }

        #[test]
        fn parser_total(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(m) = Msg::decode(&bytes) {
                prop_assert_eq!(&m.encode()[4..], &bytes[..]);
            }
        }

        #[test]
        fn parser_on_mutated_valid(which in 0usize..16, idx in 0usize..120, val in any::<u8>()) {
            let m = all()[which].clone();
            let mut b = m.encode()[4..].to_vec();
            if idx < b.len() { b[idx] = val; }
            if let Ok(d) = Msg::decode(&b) {
                prop_assert_eq!(&d.encode()[4..], &b[..]);
            }
        }
    }
}
