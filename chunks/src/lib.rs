//! Guest images as content-addressed chunks.
//!
//! - [`chunking`]: FastCDC (16/64/256 KiB) over any reader, BLAKE3 chunk ids.
//! - [`manifest`]: the signed, canonically encoded chunk list of an image.
//! - [`store`]: the sled chunk store (verify on write and read, LRU cap, pins).
//! - [`import`]: file -> chunks + signed manifest in the store.
//! - [`mod@materialize`]: store -> unlinked temp file for a VM, or an exported file.
//! - [`swarm`]: the sans-IO swarm scheduler (which chunk, from whom, when).

pub mod chunking;
pub mod error;
pub mod ids;
pub mod import;
pub mod manifest;
pub mod materialize;
pub mod store;
pub mod swarm;

pub use chunking::{Chunk, Chunker, AVG_CHUNK, MAX_CHUNK, MIN_CHUNK};
pub use error::{Error, Result};
pub use ids::{ChunkId, ImageId};
pub use import::{
    detect_kind, import_direct_boot, import_file, import_reader, DirectBoot, ImportOptions,
    InputKind,
};
pub use manifest::{
    BootInfo, ByteRange, ChunkRef, ImageFormat, Manifest, SignedManifest, MANIFEST_VERSION,
    MAX_CHUNKS, MAX_IMAGE_SIZE, MAX_MANIFEST_BYTES,
};
pub use materialize::{
    export, materialize, materialize_range, materialize_range_reserved, materialize_reserved,
    Materialized,
};
pub use store::{ChunkStore, ImageInfo, PinGuard, Reservation, VerifyReport, UNLIMITED};
