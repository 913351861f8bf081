//! Wire format of the chunk-swarm protocol (`/cpushare/swarm/1`).
//!
//! Every message is `u32 length (LE) | u8 tag | body`, integers little-endian.
//! Parsers are strict: unknown tags, short bodies and trailing bytes are errors.
//! The version lives in the protocol name, so a peer speaking another version
//! fails protocol negotiation before any message is parsed.
//!
//! Requests:
//! - 1 GetManifest: image[32]
//! - 2 Hello: image[32] | u32 n | n bytes have-set (n = ceil(chunks / 8))
//! - 3 Have: image[32] | u32 count (<= MAX_HAVES) | count x u32 chunk index
//! - 4 GetChunk: image[32] | u32 chunk index
//! - 5 Starving: image[32] (to a super-seed: nobody else has what I miss)
//!
//! Responses:
//! - 1 Manifest: signed manifest bytes (rest)
//! - 2 NotFound (unknown image)
//! - 3 HelloAck: u8 kind (0 peer, 1 super-seed) | u32 n | n bytes have-set
//! - 4 Ack
//! - 5 Chunk: chunk bytes (rest, <= MAX_CHUNK)
//! - 6 NotHave

use chunks::ImageId;

/// Protocol name; the trailing number is the wire version.
pub const PROTOCOL: &str = "/cpushare/swarm/1";
/// Largest request accepted: a Hello for an image of MAX_CHUNKS chunks.
pub const MAX_REQUEST: usize = 64 + (chunks::MAX_CHUNKS as usize).div_ceil(8);
/// Largest response accepted: a manifest of the largest allowed size.
pub const MAX_RESPONSE: usize = 64 + chunks::MAX_MANIFEST_BYTES;
/// Most chunk indices in one Have.
pub const MAX_HAVES: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    GetManifest { image: ImageId },
    Hello { image: ImageId, have: Vec<u8> },
    Have { image: ImageId, chunks: Vec<u32> },
    GetChunk { image: ImageId, index: u32 },
    Starving { image: ImageId },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerRole {
    Peer,
    SuperSeed,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    Manifest(Vec<u8>),
    NotFound,
    HelloAck { role: PeerRole, have: Vec<u8> },
    Ack,
    Chunk(Vec<u8>),
    NotHave,
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
    fn image(&mut self) -> Result<ImageId, WireError> {
        Ok(ImageId(self.take(32)?.try_into().expect("32 bytes")))
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

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            Request::GetManifest { image } => {
                b.push(1);
                b.extend_from_slice(&image.0);
            }
            Request::Hello { image, have } => {
                b.push(2);
                b.extend_from_slice(&image.0);
                b.extend_from_slice(&(have.len() as u32).to_le_bytes());
                b.extend_from_slice(have);
            }
            Request::Have { image, chunks } => {
                b.push(3);
                b.extend_from_slice(&image.0);
                b.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
                for c in chunks {
                    b.extend_from_slice(&c.to_le_bytes());
                }
            }
            Request::GetChunk { image, index } => {
                b.push(4);
                b.extend_from_slice(&image.0);
                b.extend_from_slice(&index.to_le_bytes());
            }
            Request::Starving { image } => {
                b.push(5);
                b.extend_from_slice(&image.0);
            }
        }
        b
    }

    /// Parses one request body (without the length prefix).
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Rd(bytes);
        let req = match r.u8()? {
            1 => Request::GetManifest { image: r.image()? },
            2 => {
                let image = r.image()?;
                let n = r.u32()? as usize;
                if n > MAX_REQUEST {
                    return Err(WireError::TooLarge("have-set"));
                }
                Request::Hello {
                    image,
                    have: r.take(n)?.to_vec(),
                }
            }
            3 => {
                let image = r.image()?;
                let n = r.u32()? as usize;
                if n > MAX_HAVES {
                    return Err(WireError::TooLarge("have list"));
                }
                let mut chunks = Vec::with_capacity(n);
                for _ in 0..n {
                    chunks.push(r.u32()?);
                }
                Request::Have { image, chunks }
            }
            4 => Request::GetChunk {
                image: r.image()?,
                index: r.u32()?,
            },
            5 => Request::Starving { image: r.image()? },
            t => return Err(WireError::UnknownTag(t)),
        };
        r.end()?;
        Ok(req)
    }
}

impl Response {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            Response::Manifest(m) => {
                b.push(1);
                b.extend_from_slice(m);
            }
            Response::NotFound => b.push(2),
            Response::HelloAck { role, have } => {
                b.push(3);
                b.push(match role {
                    PeerRole::Peer => 0,
                    PeerRole::SuperSeed => 1,
                });
                b.extend_from_slice(&(have.len() as u32).to_le_bytes());
                b.extend_from_slice(have);
            }
            Response::Ack => b.push(4),
            Response::Chunk(c) => {
                b.push(5);
                b.extend_from_slice(c);
            }
            Response::NotHave => b.push(6),
        }
        b
    }

    /// Parses one response body (without the length prefix).
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Rd(bytes);
        let resp = match r.u8()? {
            1 => Response::Manifest(r.rest().to_vec()),
            2 => Response::NotFound,
            3 => {
                let role = match r.u8()? {
                    0 => PeerRole::Peer,
                    1 => PeerRole::SuperSeed,
                    _ => return Err(WireError::Bad("peer role")),
                };
                let n = r.u32()? as usize;
                if n > MAX_REQUEST {
                    return Err(WireError::TooLarge("have-set"));
                }
                Response::HelloAck {
                    role,
                    have: r.take(n)?.to_vec(),
                }
            }
            4 => Response::Ack,
            5 => {
                let c = r.rest();
                if c.len() > chunks::MAX_CHUNK as usize {
                    return Err(WireError::TooLarge("chunk"));
                }
                if c.is_empty() {
                    return Err(WireError::Bad("empty chunk"));
                }
                Response::Chunk(c.to_vec())
            }
            6 => Response::NotHave,
            t => return Err(WireError::UnknownTag(t)),
        };
        r.end()?;
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn img(b: u8) -> ImageId {
        ImageId([b; 32])
    }

    #[test]
    fn roundtrip_all() {
        let reqs = vec![
            Request::GetManifest { image: img(1) },
            Request::Hello {
                image: img(2),
                have: vec![1, 2, 3],
            },
            Request::Have {
                image: img(3),
                chunks: vec![0, 7, 99],
            },
            Request::GetChunk {
                image: img(4),
                index: 5,
            },
            Request::Starving { image: img(5) },
        ];
        for r in reqs {
            assert_eq!(Request::decode(&r.encode()).unwrap(), r);
        }
        let resps = vec![
            Response::Manifest(vec![9; 10]),
            Response::NotFound,
            Response::HelloAck {
                role: PeerRole::SuperSeed,
                have: vec![0xff],
            },
            Response::Ack,
            Response::Chunk(vec![1; 100]),
            Response::NotHave,
        ];
        for r in resps {
            assert_eq!(Response::decode(&r.encode()).unwrap(), r);
        }
    }

    #[test]
    fn rejects_trailing_unknown_and_truncated() {
        let mut b = Request::GetChunk {
            image: img(4),
            index: 5,
        }
        .encode();
        b.push(0);
        assert_eq!(Request::decode(&b), Err(WireError::Trailing(1)));
        assert_eq!(Request::decode(&[9]), Err(WireError::UnknownTag(9)));
        assert_eq!(Request::decode(&[4, 1, 2]), Err(WireError::Truncated));
        assert_eq!(Response::decode(&[5]), Err(WireError::Bad("empty chunk")));
        let mut big = vec![5];
        big.extend(vec![0; chunks::MAX_CHUNK as usize + 1]);
        assert_eq!(Response::decode(&big), Err(WireError::TooLarge("chunk")));
        let mut haves = vec![3];
        haves.extend_from_slice(&[0; 32]);
        haves.extend_from_slice(&(u32::MAX).to_le_bytes());
        assert_eq!(
            Request::decode(&haves),
            Err(WireError::TooLarge("have list"))
        );
    }

    proptest! {
        #[test]
        fn request_parser_total(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(r) = Request::decode(&bytes) {
                prop_assert_eq!(r.encode(), bytes);
            }
        }

        #[test]
        fn response_parser_total(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(r) = Response::decode(&bytes) {
                prop_assert_eq!(r.encode(), bytes);
            }
        }

        #[test]
        fn request_parser_on_mutated_valid(idx in 0usize..60, val in any::<u8>(), n in 0usize..5) {
            let r = Request::Have { image: img(7), chunks: (0..n as u32).collect() };
            let mut b = r.encode();
            if idx < b.len() { b[idx] = val; }
            let _ = Request::decode(&b);
        }
    }
}
