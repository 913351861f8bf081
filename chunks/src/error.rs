//! The one error type of the `chunks` crate.

use std::path::PathBuf;

use crate::ids::{ChunkId, ImageId};

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `chunks`. Messages are written for the
/// person running `cpushare-node`: they say what happened and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A hex id did not parse.
    #[error("invalid {kind} id {input:?}: {reason}")]
    ParseId {
        /// "chunk" or "image".
        kind: &'static str,
        /// The text that was given (shortened if long).
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// Chunk bytes do not hash to the id they were offered under.
    #[error("chunk {expected} rejected: its bytes hash to {actual}")]
    ChunkHashMismatch {
        /// The id the chunk was claimed to have.
        expected: ChunkId,
        /// BLAKE3 of the bytes actually received.
        actual: ChunkId,
    },

    /// A chunk larger than the chunker can ever produce.
    #[error("chunk of {size} bytes rejected: larger than the {max}-byte chunk limit")]
    ChunkTooLarge {
        /// Size of the offered chunk.
        size: usize,
        /// The limit.
        max: usize,
    },

    /// Manifest bytes end early.
    #[error("manifest is truncated (needed {needed} more bytes at offset {offset})")]
    ManifestTruncated {
        /// Where decoding stopped.
        offset: usize,
        /// How many more bytes were needed.
        needed: usize,
    },

    /// Manifest does not start with the cpushare manifest magic.
    #[error("not a cpushare image manifest (bad magic)")]
    ManifestBadMagic,

    /// Manifest of a format version this build does not know.
    #[error("manifest version {found} is not supported (this cpushare-node understands version {supported}; upgrade it)")]
    ManifestVersion {
        /// Version in the manifest.
        found: u32,
        /// Version this build writes and reads.
        supported: u32,
    },

    /// Signature does not verify against the importer key in the manifest.
    #[error("manifest signature is invalid (tampered or not signed by its importer)")]
    ManifestSignature,

    /// Manifest is structurally valid but says impossible things.
    #[error("manifest is invalid: {0}")]
    ManifestInvalid(String),

    /// Manifest exceeds a safety limit (count or size).
    #[error("manifest exceeds a limit: {0}")]
    ManifestTooLarge(String),

    /// Extra bytes after a complete manifest.
    #[error("manifest has {0} unexpected trailing bytes")]
    ManifestTrailing(usize),

    /// Manifest bytes do not hash to the image id they were offered under.
    #[error("manifest offered as image {expected} hashes to {actual}; rejected")]
    ImageIdMismatch {
        /// Image id the manifest was requested under.
        expected: ImageId,
        /// BLAKE3 of the bytes received.
        actual: ImageId,
    },

    /// No manifest for this image in the store.
    #[error(
        "unknown image {0} (not in the local store; `cpushare-node image ls` lists known images)"
    )]
    UnknownImage(ImageId),

    /// Image needs chunks that are not in the store.
    #[error("image {image} is incomplete: {missing} chunks missing (fetch it first: `cpushare-node image fetch {image}`)")]
    ImageIncomplete {
        /// The image.
        image: ImageId,
        /// Number of distinct chunks missing.
        missing: usize,
    },

    /// Image larger than the allowed disk size.
    #[error("image is {size} bytes, larger than the allowed {cap} bytes")]
    ImageTooLarge {
        /// Size of the image (or image part).
        size: u64,
        /// The cap.
        cap: u64,
    },

    /// Image has no disk part (a kernel+initrd-only direct-boot image).
    #[error("image {0} has no disk part (it is a kernel/initrd direct-boot image)")]
    NoDisk(ImageId),

    /// A byte range outside the image.
    #[error("byte range {offset}+{len} lies outside image {image} of {total} bytes")]
    RangeOutOfImage {
        /// The image.
        image: ImageId,
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Image size.
        total: u64,
    },

    /// Store is over its cap and nothing more can be evicted.
    #[error("chunk store at {path} is full: {needed} more bytes needed, cap {cap} bytes, the rest is held by pinned images (raise the store cap or unpin images)")]
    StoreFull {
        /// Store directory.
        path: PathBuf,
        /// Bytes that could not be made available.
        needed: u64,
        /// The configured cap.
        cap: u64,
    },

    /// A guest disk (or other reservation) does not fit under the store's
    /// cap next to the pinned images and the other guest disks.
    #[error("disk cap exceeded: {what} needs {needed} more bytes than the chunk store at {path} can free under its cap of {cap} bytes (the rest holds pinned images and running guests' disks); raise the store cap or stop a guest")]
    DiskCapExceeded {
        /// Store directory.
        path: PathBuf,
        /// What needed the space.
        what: &'static str,
        /// Bytes that could not be made available.
        needed: u64,
        /// The configured cap.
        cap: u64,
    },

    /// A store of the previous layout (chunks inside sled) that cannot be
    /// converted for lack of space.
    #[error("chunk store at {path} has the layout of an older cpushare-node (chunks inside sled); converting it needs {needed} bytes free but {free} are: free some space there, or move the directory aside to start an empty store (images are fetched or imported again)")]
    StoreOldLayout {
        /// Store directory.
        path: PathBuf,
        /// Free bytes the conversion needs.
        needed: u64,
        /// Free bytes there are.
        free: u64,
    },

    /// Another process holds the store's lock.
    #[error("chunk store at {path} is locked by another cpushare-node (is a daemon running?)")]
    StoreLocked {
        /// Store directory.
        path: PathBuf,
    },

    /// sled reports corruption it cannot recover from.
    #[error("chunk store at {path} is corrupt ({detail}); move it aside and restart to rebuild it (chunks are re-fetched)")]
    StoreCorrupt {
        /// Store directory.
        path: PathBuf,
        /// What sled said.
        detail: String,
    },

    /// Disk full (ENOSPC / EDQUOT).
    #[error("disk full while {what} at {path}")]
    DiskFull {
        /// What we were doing ("writing chunk store", "materialising image", ...).
        what: &'static str,
        /// Where.
        path: PathBuf,
    },

    /// Any other I/O error, with context.
    #[error("{what} at {path}: {source}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// A store write made no progress for `secs` seconds (a wedged sled,
    /// e.g. spacejam/sled#1412, or a hung disk). The store refuses further
    /// writes; what is on disk is intact and a restart recovers it.
    #[error("chunk store at {path} stopped responding (a write made no progress for {secs} s); restart cpushare-node: stored chunks are kept and fetches resume")]
    StoreStalled {
        /// Store directory.
        path: PathBuf,
        /// The stall limit that was exceeded.
        secs: u64,
    },

    /// Any other sled error.
    #[error("chunk store at {path}: {detail}")]
    Store {
        /// Store directory.
        path: PathBuf,
        /// What sled said.
        detail: String,
    },

    /// The input file is unusable.
    #[error("cannot import {path}: {reason}")]
    BadImageFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },

    /// `qemu-img` failed or is missing.
    #[error("qemu-img convert of {path} failed: {detail} (is qemu-utils installed?)")]
    QemuImg {
        /// The qcow2 file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
}

/// True for "no space left" style errors.
pub(crate) fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

impl Error {
    /// Wrap an I/O error, turning ENOSPC into [`Error::DiskFull`].
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if is_disk_full(&source) {
            Error::DiskFull { what, path }
        } else {
            Error::Io { what, path, source }
        }
    }

    /// Map a sled error for the store at `path`.
    pub(crate) fn sled(path: &std::path::Path, e: sled::Error) -> Self {
        let path = path.to_path_buf();
        match e {
            sled::Error::Io(io) => {
                if is_disk_full(&io) {
                    Error::DiskFull {
                        what: "writing chunk store",
                        path,
                    }
                } else if io.to_string().contains("could not acquire lock") {
                    Error::StoreLocked { path }
                } else {
                    Error::Io {
                        what: "accessing chunk store",
                        path,
                        source: io,
                    }
                }
            }
            sled::Error::Corruption { at, .. } => Error::StoreCorrupt {
                path,
                detail: format!("sled found corruption at {at:?}"),
            },
            other => Error::Store {
                path,
                detail: other.to_string(),
            },
        }
    }
}
