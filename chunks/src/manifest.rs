//! Image manifests: the ordered chunk list of an image plus how to boot it,
//! in a canonical binary encoding, signed by the importing node.
//!
//! # Encoding (version 1)
//!
//! All integers little-endian; every variable-length field is length-prefixed;
//! option flags are exactly 0 or 1. Decoding accepts only bytes that
//! re-encode to themselves, so the encoding is canonical and the image id is
//! well defined.
//!
//! ```text
//! magic      8   b"CPSHMNFT"
//! version    u32 (= 1)
//! name       u16 len + UTF-8 (<= 255 bytes)
//! format     u8  (0 raw, 1 iso, 2 qcow2 converted to raw)
//! total_size u64
//! importer   32  ed25519 public key
//! boot       u8 flag; if 1:
//!              kernel  u64 offset, u64 len
//!              initrd  u8 flag [u64 offset, u64 len]
//!              disk    u8 flag [u64 offset, u64 len]
//!              cmdline u16 len + UTF-8 (<= 4096 bytes, no NUL)
//! count      u32 number of chunks
//! chunks     count x (32-byte BLAKE3 id, u32 size)
//! signature  64  ed25519 over (SIGN_DOMAIN || every byte above)
//! ```
//!
//! The **image id is BLAKE3 of the whole encoding, signature included**.
//! ed25519 signatures are deterministic and we verify strictly (no malleable
//! signatures), so one manifest signed by one key has exactly one image id, and
//! a manifest fetched by image id is checked by hashing before decoding.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::chunking::MAX_CHUNK;
use crate::error::{Error, Result};
use crate::ids::{ChunkId, ImageId};

/// Manifest format version this build writes and accepts.
pub const MANIFEST_VERSION: u32 = 1;
/// Largest image a manifest may describe (64 GiB).
pub const MAX_IMAGE_SIZE: u64 = 64 << 30;
/// Most chunks a manifest may list (64 GiB at the 64 KiB average).
pub const MAX_CHUNKS: u32 = 1 << 20;
/// Longest image name in bytes.
pub const MAX_NAME_LEN: usize = 255;
/// Longest kernel command line in bytes.
pub const MAX_CMDLINE_LEN: usize = 4096;
/// Size of one chunk entry in the encoding.
const CHUNK_ENTRY_LEN: usize = 32 + 4;
/// Largest possible encoded manifest; reject anything bigger unread.
pub const MAX_MANIFEST_BYTES: usize = 8
    + 4
    + 2
    + MAX_NAME_LEN
    + 1
    + 8
    + 32
    + 1
    + 16
    + 17
    + 17
    + 2
    + MAX_CMDLINE_LEN
    + 4
    + MAX_CHUNKS as usize * CHUNK_ENTRY_LEN
    + 64;

const MAGIC: &[u8; 8] = b"CPSHMNFT";
const SIGN_DOMAIN: &[u8] = b"cpushare image manifest v1\0";

/// What the image bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ImageFormat {
    /// Raw disk image.
    Raw,
    /// ISO 9660 image (boot as a CD).
    Iso,
    /// A qcow2 file converted to raw with `qemu-img convert -O raw` at import.
    Qcow2Converted,
}

impl ImageFormat {
    fn code(self) -> u8 {
        match self {
            ImageFormat::Raw => 0,
            ImageFormat::Iso => 1,
            ImageFormat::Qcow2Converted => 2,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0 => ImageFormat::Raw,
            1 => ImageFormat::Iso,
            2 => ImageFormat::Qcow2Converted,
            _ => return None,
        })
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Iso => "iso",
            ImageFormat::Qcow2Converted => "qcow2->raw",
        })
    }
}

/// A byte range inside the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ByteRange {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl ByteRange {
    /// End offset (exclusive); `None` on overflow.
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.len)
    }
}

/// Direct-boot information. A direct-boot image's bytes are the parts laid
/// end to end (disk first, then kernel, then initrd, as `import` writes them);
/// these ranges say where each part is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BootInfo {
    /// The kernel (bzImage or ELF vmlinux).
    pub kernel: ByteRange,
    /// The initrd, if any.
    pub initrd: Option<ByteRange>,
    /// The root disk, if any.
    pub disk: Option<ByteRange>,
    /// Kernel command line.
    pub cmdline: String,
}

/// One entry of the chunk list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkRef {
    /// BLAKE3 of the chunk.
    pub id: ChunkId,
    /// Chunk length in bytes (1..=MAX_CHUNK).
    pub size: u32,
}

/// The unsigned content of a manifest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Manifest {
    /// Format version; always [`MANIFEST_VERSION`] for manifests we build.
    pub version: u32,
    /// Human name of the image (e.g. the file name at import).
    pub name: String,
    /// What the bytes are.
    pub format: ImageFormat,
    /// Image length in bytes (= sum of chunk sizes).
    pub total_size: u64,
    /// Chunks in image order; ids may repeat.
    pub chunks: Vec<ChunkRef>,
    /// Direct-boot info, if the image was imported as kernel (+initrd, +disk).
    pub boot: Option<BootInfo>,
    /// Public key of the importing node; the signature is by this key.
    pub importer: VerifyingKey,
}

impl Manifest {
    /// A version-1 manifest; `total_size` is the sum of the chunk sizes.
    pub fn new(
        name: impl Into<String>,
        format: ImageFormat,
        chunks: Vec<ChunkRef>,
        boot: Option<BootInfo>,
        importer: VerifyingKey,
    ) -> Self {
        let total_size = chunks.iter().map(|c| c.size as u64).sum();
        Manifest {
            version: MANIFEST_VERSION,
            name: name.into(),
            format,
            total_size,
            chunks,
            boot,
            importer,
        }
    }

    /// Check limits and internal consistency.
    pub fn validate(&self) -> Result<()> {
        if self.version != MANIFEST_VERSION {
            return Err(Error::ManifestVersion {
                found: self.version,
                supported: MANIFEST_VERSION,
            });
        }
        if self.name.len() > MAX_NAME_LEN {
            return Err(Error::ManifestTooLarge(format!(
                "name is {} bytes (max {MAX_NAME_LEN})",
                self.name.len()
            )));
        }
        if self.chunks.len() > MAX_CHUNKS as usize {
            return Err(Error::ManifestTooLarge(format!(
                "{} chunks (max {MAX_CHUNKS})",
                self.chunks.len()
            )));
        }
        if self.total_size > MAX_IMAGE_SIZE {
            return Err(Error::ManifestTooLarge(format!(
                "image of {} bytes (max {MAX_IMAGE_SIZE})",
                self.total_size
            )));
        }
        let mut sum: u64 = 0;
        for (i, c) in self.chunks.iter().enumerate() {
            if c.size == 0 || c.size > MAX_CHUNK {
                return Err(Error::ManifestInvalid(format!(
                    "chunk {i} has size {} (must be 1..={MAX_CHUNK})",
                    c.size
                )));
            }
            sum += c.size as u64;
        }
        if sum != self.total_size {
            return Err(Error::ManifestInvalid(format!(
                "chunk sizes sum to {sum} but total size says {}",
                self.total_size
            )));
        }
        if let Some(b) = &self.boot {
            let check = |what: &str, r: &ByteRange| -> Result<()> {
                match r.end() {
                    Some(end) if end <= self.total_size && r.len > 0 => Ok(()),
                    _ => Err(Error::ManifestInvalid(format!(
                        "{what} range {}+{} is empty or outside the {}-byte image",
                        r.offset, r.len, self.total_size
                    ))),
                }
            };
            check("kernel", &b.kernel)?;
            if let Some(r) = &b.initrd {
                check("initrd", r)?;
            }
            if let Some(r) = &b.disk {
                check("disk", r)?;
            }
            if b.cmdline.len() > MAX_CMDLINE_LEN {
                return Err(Error::ManifestTooLarge(format!(
                    "kernel command line is {} bytes (max {MAX_CMDLINE_LEN})",
                    b.cmdline.len()
                )));
            }
            if b.cmdline.contains('\0') {
                return Err(Error::ManifestInvalid(
                    "kernel command line contains NUL".into(),
                ));
            }
        }
        Ok(())
    }

    /// Offset of each chunk in the image, in order.
    pub fn chunk_offsets(&self) -> impl Iterator<Item = (u64, &ChunkRef)> + '_ {
        self.chunks.iter().scan(0u64, |off, c| {
            let o = *off;
            *off += c.size as u64;
            Some((o, c))
        })
    }

    /// Distinct chunk ids, in first-use order.
    pub fn unique_chunks(&self) -> Vec<ChunkRef> {
        let mut seen = std::collections::HashSet::with_capacity(self.chunks.len());
        self.chunks
            .iter()
            .filter(|c| seen.insert(c.id))
            .copied()
            .collect()
    }

    /// Range of the bootable disk: the whole image without boot info, the
    /// boot info's disk part otherwise (`None` if it has no disk).
    pub fn disk_range(&self) -> Option<ByteRange> {
        match &self.boot {
            None => Some(ByteRange {
                offset: 0,
                len: self.total_size,
            }),
            Some(b) => b.disk,
        }
    }

    /// The canonical encoding of everything but the signature.
    pub fn encode_body(&self) -> Vec<u8> {
        let mut o = Vec::with_capacity(128 + self.chunks.len() * CHUNK_ENTRY_LEN);
        o.extend_from_slice(MAGIC);
        o.extend_from_slice(&self.version.to_le_bytes());
        put_str16(&mut o, &self.name);
        o.push(self.format.code());
        o.extend_from_slice(&self.total_size.to_le_bytes());
        o.extend_from_slice(self.importer.as_bytes());
        match &self.boot {
            None => o.push(0),
            Some(b) => {
                o.push(1);
                put_range(&mut o, &b.kernel);
                put_opt_range(&mut o, &b.initrd);
                put_opt_range(&mut o, &b.disk);
                put_str16(&mut o, &b.cmdline);
            }
        }
        o.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        for c in &self.chunks {
            o.extend_from_slice(&c.id.0);
            o.extend_from_slice(&c.size.to_le_bytes());
        }
        o
    }
}

fn put_str16(o: &mut Vec<u8>, s: &str) {
    // Callers validate lengths first; clamp defensively so encoding never panics.
    let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    o.extend_from_slice(&(b.len() as u16).to_le_bytes());
    o.extend_from_slice(b);
}

fn put_range(o: &mut Vec<u8>, r: &ByteRange) {
    o.extend_from_slice(&r.offset.to_le_bytes());
    o.extend_from_slice(&r.len.to_le_bytes());
}

fn put_opt_range(o: &mut Vec<u8>, r: &Option<ByteRange>) {
    match r {
        None => o.push(0),
        Some(r) => {
            o.push(1);
            put_range(o, r);
        }
    }
}

/// A manifest with its importer's signature and its canonical bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct SignedManifest {
    manifest: Manifest,
    signature: Signature,
    bytes: Vec<u8>,
    id: ImageId,
}

impl std::fmt::Debug for SignedManifest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedManifest")
            .field("id", &self.id)
            .field("name", &self.manifest.name)
            .field("total_size", &self.manifest.total_size)
            .field("chunks", &self.manifest.chunks.len())
            .finish()
    }
}

impl SignedManifest {
    /// Sign `manifest` with `key`. The manifest's `importer` is set to the
    /// key's public half. Fails if the manifest breaks a limit.
    pub fn sign(mut manifest: Manifest, key: &SigningKey) -> Result<Self> {
        manifest.importer = key.verifying_key();
        manifest.validate()?;
        let body = manifest.encode_body();
        let mut msg = Vec::with_capacity(SIGN_DOMAIN.len() + body.len());
        msg.extend_from_slice(SIGN_DOMAIN);
        msg.extend_from_slice(&body);
        let signature = key.sign(&msg);
        let mut bytes = body;
        bytes.extend_from_slice(&signature.to_bytes());
        let id = ImageId::of_manifest_bytes(&bytes);
        Ok(SignedManifest {
            manifest,
            signature,
            bytes,
            id,
        })
    }

    /// Decode and verify: structure, limits, version, consistency and
    /// signature. Allocation is bounded by the input length.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(Error::ManifestTooLarge(format!(
                "{} bytes (max {MAX_MANIFEST_BYTES})",
                bytes.len()
            )));
        }
        let mut r = Reader { b: bytes, pos: 0 };
        if r.take(8)? != MAGIC {
            return Err(Error::ManifestBadMagic);
        }
        let version = r.u32()?;
        if version != MANIFEST_VERSION {
            return Err(Error::ManifestVersion {
                found: version,
                supported: MANIFEST_VERSION,
            });
        }
        let name = r.str16("name", MAX_NAME_LEN)?;
        let format = ImageFormat::from_code(r.u8()?)
            .ok_or_else(|| Error::ManifestInvalid("unknown image format code".into()))?;
        let total_size = r.u64()?;
        let key_bytes: [u8; 32] = r.take(32)?.try_into().expect("32 bytes");
        let importer = VerifyingKey::from_bytes(&key_bytes).map_err(|_| {
            Error::ManifestInvalid("importer key is not a valid ed25519 key".into())
        })?;
        let boot = if r.flag("boot")? {
            let kernel = r.range()?;
            let initrd = if r.flag("initrd")? {
                Some(r.range()?)
            } else {
                None
            };
            let disk = if r.flag("disk")? {
                Some(r.range()?)
            } else {
                None
            };
            let cmdline = r.str16("cmdline", MAX_CMDLINE_LEN)?;
            Some(BootInfo {
                kernel,
                initrd,
                disk,
                cmdline,
            })
        } else {
            None
        };
        let count = r.u32()?;
        if count > MAX_CHUNKS {
            return Err(Error::ManifestTooLarge(format!(
                "{count} chunks (max {MAX_CHUNKS})"
            )));
        }
        let need = count as usize * CHUNK_ENTRY_LEN;
        if r.remaining() < need {
            return Err(Error::ManifestTruncated {
                offset: r.pos,
                needed: need - r.remaining(),
            });
        }
        let mut chunks = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let id = ChunkId(r.take(32)?.try_into().expect("32 bytes"));
            let size = r.u32()?;
            chunks.push(ChunkRef { id, size });
        }
        let body_len = r.pos;
        let sig: [u8; 64] = r.take(64)?.try_into().expect("64 bytes");
        if r.remaining() != 0 {
            return Err(Error::ManifestTrailing(r.remaining()));
        }
        let manifest = Manifest {
            version,
            name,
            format,
            total_size,
            chunks,
            boot,
            importer,
        };
        manifest.validate()?;
        let signature = Signature::from_bytes(&sig);
        let mut msg = Vec::with_capacity(SIGN_DOMAIN.len() + body_len);
        msg.extend_from_slice(SIGN_DOMAIN);
        msg.extend_from_slice(&bytes[..body_len]);
        importer
            .verify_strict(&msg, &signature)
            .map_err(|_| Error::ManifestSignature)?;
        Ok(SignedManifest {
            manifest,
            signature,
            bytes: bytes.to_vec(),
            id: ImageId::of_manifest_bytes(bytes),
        })
    }

    /// Decode bytes that were requested as image `expected`: the hash is
    /// checked first, then [`SignedManifest::decode`].
    pub fn decode_for(expected: ImageId, bytes: &[u8]) -> Result<Self> {
        let actual = ImageId::of_manifest_bytes(bytes);
        if actual != expected {
            return Err(Error::ImageIdMismatch { expected, actual });
        }
        Self::decode(bytes)
    }

    /// The canonical signed bytes (what goes on the wire and into the store).
    pub fn encode(&self) -> Vec<u8> {
        self.bytes.clone()
    }

    /// Borrow the canonical signed bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// BLAKE3 of [`SignedManifest::as_bytes`].
    pub fn image_id(&self) -> ImageId {
        self.id
    }

    /// The verified manifest content.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The importer's signature.
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// The importing node's public key.
    pub fn importer(&self) -> &VerifyingKey {
        &self.manifest.importer
    }
}

impl Serialize for SignedManifest {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&hex::encode(&self.bytes))
        } else {
            s.serialize_bytes(&self.bytes)
        }
    }
}

impl<'de> Deserialize<'de> for SignedManifest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let bytes: Vec<u8> = if d.is_human_readable() {
            let s = String::deserialize(d)?;
            hex::decode(s).map_err(serde::de::Error::custom)?
        } else {
            serde_bytes_vec(d)?
        };
        SignedManifest::decode(&bytes).map_err(serde::de::Error::custom)
    }
}

fn serde_bytes_vec<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<u8>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("manifest bytes")
        }
        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> std::result::Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E: serde::de::Error>(
            self,
            v: Vec<u8>,
        ) -> std::result::Result<Vec<u8>, E> {
            Ok(v)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut a: A,
        ) -> std::result::Result<Vec<u8>, A::Error> {
            let mut v = Vec::new();
            while let Some(b) = a.next_element::<u8>()? {
                if v.len() >= MAX_MANIFEST_BYTES {
                    return Err(serde::de::Error::custom("manifest too large"));
                }
                v.push(b);
            }
            Ok(v)
        }
    }
    d.deserialize_byte_buf(V)
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.remaining() < n {
            return Err(Error::ManifestTruncated {
                offset: self.pos,
                needed: n - self.remaining(),
            });
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn flag(&mut self, what: &str) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(Error::ManifestInvalid(format!(
                "{what} flag is {v} (must be 0 or 1)"
            ))),
        }
    }
    fn range(&mut self) -> Result<ByteRange> {
        Ok(ByteRange {
            offset: self.u64()?,
            len: self.u64()?,
        })
    }
    fn str16(&mut self, what: &str, max: usize) -> Result<String> {
        let n = self.u16()? as usize;
        if n > max {
            return Err(Error::ManifestTooLarge(format!(
                "{what} is {n} bytes (max {max})"
            )));
        }
        let s = self.take(n)?;
        String::from_utf8(s.to_vec())
            .map_err(|_| Error::ManifestInvalid(format!("{what} is not UTF-8")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn sample(n: usize, boot: bool) -> SignedManifest {
        let chunks: Vec<ChunkRef> = (0..n)
            .map(|i| ChunkRef {
                id: ChunkId::of(&i.to_le_bytes()),
                size: 1000 + i as u32,
            })
            .collect();
        let mut m = Manifest::new(
            "debian.img",
            ImageFormat::Raw,
            chunks,
            None,
            key(1).verifying_key(),
        );
        if boot {
            m.boot = Some(BootInfo {
                kernel: ByteRange { offset: 0, len: 10 },
                initrd: Some(ByteRange {
                    offset: 10,
                    len: 20,
                }),
                disk: None,
                cmdline: "console=ttyS0".into(),
            });
        }
        SignedManifest::sign(m, &key(1)).unwrap()
    }

    #[test]
    fn roundtrip_and_id() {
        for boot in [false, true] {
            let s = sample(50, boot);
            let d = SignedManifest::decode(s.as_bytes()).unwrap();
            assert_eq!(d, s);
            assert_eq!(d.image_id(), ImageId::of_manifest_bytes(s.as_bytes()));
            assert_eq!(d.manifest().encode_body().len() + 64, s.as_bytes().len());
            // Deterministic: signing again gives the same bytes and id.
            let again = SignedManifest::sign(s.manifest().clone(), &key(1)).unwrap();
            assert_eq!(again.as_bytes(), s.as_bytes());
            assert!(SignedManifest::decode_for(s.image_id(), s.as_bytes()).is_ok());
            assert!(matches!(
                SignedManifest::decode_for(ImageId([0; 32]), s.as_bytes()),
                Err(Error::ImageIdMismatch { .. })
            ));
        }
    }

    #[test]
    fn specific_errors() {
        let s = sample(3, true);
        let b = s.as_bytes();
        // Truncated
        assert!(matches!(
            SignedManifest::decode(&b[..b.len() - 1]),
            Err(Error::ManifestTruncated { .. })
        ));
        // Trailing
        let mut t = b.to_vec();
        t.push(0);
        assert!(matches!(
            SignedManifest::decode(&t),
            Err(Error::ManifestTrailing(1))
        ));
        // Magic
        let mut t = b.to_vec();
        t[0] ^= 1;
        assert!(matches!(
            SignedManifest::decode(&t),
            Err(Error::ManifestBadMagic)
        ));
        // Version
        let mut t = b.to_vec();
        t[8] = 2;
        assert!(matches!(
            SignedManifest::decode(&t),
            Err(Error::ManifestVersion { found: 2, .. })
        ));
        // Tampered name -> signature error
        let mut t = b.to_vec();
        t[8 + 4 + 2] ^= 0x01; // 'd' -> 'e'
        assert!(matches!(
            SignedManifest::decode(&t),
            Err(Error::ManifestSignature)
        ));
        // Tampered signature
        let mut t = b.to_vec();
        let n = t.len();
        t[n - 10] ^= 0x40;
        assert!(matches!(
            SignedManifest::decode(&t),
            Err(Error::ManifestSignature)
        ));
        // "Unsigned": zero signature
        let mut t = b.to_vec();
        t[n - 64..].fill(0);
        assert!(matches!(
            SignedManifest::decode(&t),
            Err(Error::ManifestSignature)
        ));
        // Inconsistent total size (re-signed by an attacker key: still rejected).
        let mut m = s.manifest().clone();
        m.total_size += 1;
        assert!(matches!(
            SignedManifest::sign(m, &key(2)),
            Err(Error::ManifestInvalid(_))
        ));
    }

    #[test]
    fn inconsistent_but_signed_is_rejected_on_decode() {
        // Build the bytes by hand with a wrong total and a valid signature.
        let s = sample(3, false);
        let mut m = s.manifest().clone();
        m.total_size += 5;
        let k = key(1);
        let mut body = m.encode_body();
        let mut msg = SIGN_DOMAIN.to_vec();
        msg.extend_from_slice(&body);
        body.extend_from_slice(&k.sign(&msg).to_bytes());
        assert!(matches!(
            SignedManifest::decode(&body),
            Err(Error::ManifestInvalid(_))
        ));
    }

    #[test]
    fn huge_count_does_not_allocate() {
        let s = sample(0, false);
        let mut b = s.as_bytes()[..s.as_bytes().len() - 64 - 4].to_vec();
        b.extend_from_slice(&MAX_CHUNKS.to_le_bytes());
        assert!(matches!(
            SignedManifest::decode(&b),
            Err(Error::ManifestTruncated { .. })
        ));
        let mut b = s.as_bytes()[..s.as_bytes().len() - 64 - 4].to_vec();
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            SignedManifest::decode(&b),
            Err(Error::ManifestTooLarge(_))
        ));
    }

    #[test]
    fn serde_roundtrip() {
        let s = sample(4, true);
        let j = serde_json::to_string(&s).unwrap();
        let back: SignedManifest = serde_json::from_str(&j).unwrap();
        assert_eq!(back, s);
        let mut bad = j.clone();
        bad.replace_range(20..21, if &j[20..21] == "0" { "1" } else { "0" });
        assert!(serde_json::from_str::<SignedManifest>(&bad).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn random_bytes_never_verify(b in proptest::collection::vec(any::<u8>(), 0..600)) {
            prop_assert!(SignedManifest::decode(&b).is_err());
            let mut with_magic = MAGIC.to_vec();
            with_magic.extend_from_slice(&b);
            prop_assert!(SignedManifest::decode(&with_magic).is_err());
        }

        #[test]
        fn truncation_never_verifies(n in 1usize..20, boot in any::<bool>(), cut in any::<prop::sample::Index>()) {
            let s = sample(n, boot);
            let b = s.as_bytes();
            let at = cut.index(b.len());
            prop_assert!(SignedManifest::decode(&b[..at]).is_err());
        }

        #[test]
        fn bit_flips_never_verify(n in 1usize..20, boot in any::<bool>(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let s = sample(n, boot);
            let mut b = s.as_bytes().to_vec();
            let i = pos.index(b.len());
            b[i] ^= 1 << bit;
            prop_assert!(SignedManifest::decode(&b).is_err());
        }

        #[test]
        fn valid_manifests_roundtrip(sizes in proptest::collection::vec(1u32..=MAX_CHUNK, 0..40), name in "[a-z0-9._-]{0,40}") {
            let chunks = sizes.iter().enumerate().map(|(i, s)| ChunkRef { id: ChunkId::of(&[i as u8]), size: *s }).collect();
            let m = Manifest::new(name, ImageFormat::Iso, chunks, None, key(3).verifying_key());
            let s = SignedManifest::sign(m, &key(3)).unwrap();
            let d = SignedManifest::decode(s.as_bytes()).unwrap();
            prop_assert_eq!(d.manifest().encode_body(), s.manifest().encode_body());
        }
    }
}
