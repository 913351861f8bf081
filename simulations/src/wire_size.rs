//! Sizes of the swarm protocol's messages as the node writes them
//! (node/src/p2p/wire.rs: `u32 length | u8 tag | image[32] | body`). The
//! simulator does not encode them; it counts their real sizes.

/// Length prefix, tag and image id.
pub const HEADER: u64 = 4 + 1 + 32;
/// GetChunk, NotHave, Cancel: one u32 index.
pub const INDEX_MSG: u64 = HEADER + 4;
/// Starving: no body.
pub const STARVING: u64 = HEADER;

/// A Have naming `n` chunks.
pub fn have(n: u64) -> u64 {
    HEADER + 4 + 4 * n
}

/// A Chunk reply carrying `len` bytes.
pub fn chunk(len: u64) -> u64 {
    HEADER + 4 + len
}

/// A Hello or HelloAck with the have-set of an image of `chunks` chunks.
pub fn hello(chunks: u64) -> u64 {
    HEADER + 1 + 4 + chunks.div_ceil(8)
}
