//! 32-byte BLAKE3 identifiers for chunks and images.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::Error;

macro_rules! id_type {
    ($name:ident, $kind:literal, $doc:literal) => {
        #[doc = $doc]
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// Length of the hex form.
            pub const HEX_LEN: usize = 64;

            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// Lower-case hex, 64 characters.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }

            /// First 8 bytes in hex, for log lines.
            pub fn short(&self) -> String {
                hex::encode(&self.0[..8])
            }

            /// From a byte slice that must be exactly 32 bytes long.
            pub fn from_slice(b: &[u8]) -> Option<Self> {
                <[u8; 32]>::try_from(b).ok().map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.short())
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                parse_hex32(s, $kind).map(Self)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.serialize_str(&self.to_hex())
                } else {
                    s.serialize_bytes(&self.0)
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                if d.is_human_readable() {
                    let s = String::deserialize(d)?;
                    s.parse().map_err(serde::de::Error::custom)
                } else {
                    let b: Vec<u8> = serde::de::Deserialize::deserialize(d)?;
                    Self::from_slice(&b)
                        .ok_or_else(|| serde::de::Error::invalid_length(b.len(), &"32 bytes"))
                }
            }
        }
    };
}

id_type!(ChunkId, "chunk", "Id of a chunk: BLAKE3 of its bytes.");
id_type!(
    ImageId,
    "image",
    "Id of an image: BLAKE3 of its encoded, signed manifest (see [`crate::SignedManifest`])."
);

impl ChunkId {
    /// Hash `data` into its chunk id.
    pub fn of(data: &[u8]) -> Self {
        ChunkId(*blake3::hash(data).as_bytes())
    }
}

impl ImageId {
    /// Image id of encoded signed-manifest bytes.
    pub fn of_manifest_bytes(bytes: &[u8]) -> Self {
        ImageId(*blake3::hash(bytes).as_bytes())
    }
}

fn parse_hex32(s: &str, kind: &'static str) -> Result<[u8; 32], Error> {
    let shown: String = s.chars().take(80).collect();
    let err = |reason| Error::ParseId {
        kind,
        input: shown.clone(),
        reason,
    };
    let t = s.trim();
    if t.len() != 64 {
        return Err(err("expected 64 hex characters"));
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(t, &mut out).map_err(|_| err("contains a non-hex character"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_roundtrip_and_errors() {
        let id = ChunkId::of(b"hello");
        let s = id.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<ChunkId>().unwrap(), id);
        assert_eq!(s.to_uppercase().parse::<ChunkId>().unwrap(), id);
        let e = "abc".parse::<ImageId>().unwrap_err().to_string();
        assert!(
            e.contains("invalid image id") && e.contains("64 hex"),
            "{e}"
        );
        let bad = "g".repeat(64);
        let e = bad.parse::<ChunkId>().unwrap_err().to_string();
        assert!(e.contains("non-hex"), "{e}");
    }

    #[test]
    fn serde_json_is_hex() {
        let id = ImageId([7u8; 32]);
        let j = serde_json::to_string(&id).unwrap();
        assert_eq!(j, format!("\"{}\"", "07".repeat(32)));
        let back: ImageId = serde_json::from_str(&j).unwrap();
        assert_eq!(back, id);
        assert!(serde_json::from_str::<ImageId>("\"00\"").is_err());
    }

    #[test]
    fn ordering_is_bytewise() {
        assert!(ChunkId([0; 32]) < ChunkId([1; 32]));
    }
}
