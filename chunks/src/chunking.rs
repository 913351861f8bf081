//! Content-defined chunking (FastCDC 2020) of a byte stream, with BLAKE3 ids.
//!
//! The reader is consumed through a bounded window (a few MiB), so images of
//! any size are chunked without holding them in memory.

use std::io::Read;

use fastcdc::v2020::FastCDC;

use crate::ids::ChunkId;

/// Minimum chunk size (except for the last chunk of a stream).
pub const MIN_CHUNK: u32 = 16 * 1024;
/// Target average chunk size.
pub const AVG_CHUNK: u32 = 64 * 1024;
/// Maximum chunk size. No valid chunk is larger.
pub const MAX_CHUNK: u32 = 256 * 1024;

/// Bytes read from the source per window. Must be well above `MAX_CHUNK` so the
/// carried-over tail is small relative to the window.
const WINDOW: usize = 4 * 1024 * 1024;

/// One chunk cut from a stream.
#[derive(Clone, PartialEq, Eq)]
pub struct Chunk {
    /// BLAKE3 of `data`.
    pub id: ChunkId,
    /// Offset of the chunk in the stream.
    pub offset: u64,
    /// The chunk's bytes.
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunk")
            .field("id", &self.id)
            .field("offset", &self.offset)
            .field("len", &self.data.len())
            .finish()
    }
}

/// Streaming FastCDC chunker over any [`Read`]; an iterator of chunks.
///
/// Cut points are identical to running `fastcdc::v2020::FastCDC` over the
/// whole input at once: a cut found before the end of the window does not
/// depend on later bytes; the window's last piece is carried over and re-cut
/// together with the next read unless the input has ended.
pub struct Chunker<R: Read> {
    src: R,
    buf: Vec<u8>,
    /// Valid bytes in `buf` are `buf[start..len]`.
    start: usize,
    len: usize,
    eof: bool,
    /// Stream offset of `buf[start]`.
    offset: u64,
    /// Ready chunks (offset in buf, length) from the last cut pass.
    ready: std::collections::VecDeque<(usize, usize)>,
    failed: bool,
}

impl<R: Read> Chunker<R> {
    /// Chunk `src` with the crate's 16/64/256 KiB parameters.
    pub fn new(src: R) -> Self {
        Chunker {
            src,
            buf: vec![0u8; WINDOW],
            start: 0,
            len: 0,
            eof: false,
            offset: 0,
            ready: Default::default(),
            failed: false,
        }
    }

    /// Bytes consumed from the source so far that were handed out as chunks.
    pub fn position(&self) -> u64 {
        self.offset
    }

    fn refill(&mut self) -> std::io::Result<()> {
        // Move the unconsumed tail to the front, then fill.
        if self.start > 0 {
            self.buf.copy_within(self.start..self.len, 0);
            self.len -= self.start;
            self.start = 0;
        }
        while !self.eof && self.len < self.buf.len() {
            match self.src.read(&mut self.buf[self.len..]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.len += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Cut the current window into chunks; keep the last one back if more
    /// input may follow (its end is not a real cut point yet).
    fn cut(&mut self) {
        let window = &self.buf[self.start..self.len];
        let mut cuts: Vec<(usize, usize)> = FastCDC::new(window, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK)
            .map(|c| (self.start + c.offset, c.length))
            .collect();
        if !self.eof {
            if let Some(&(off, l)) = cuts.last() {
                // A chunk of full max size is final; anything ending at the
                // window end may grow with more input.
                if off + l == self.len && l < MAX_CHUNK as usize {
                    cuts.pop();
                }
            }
        }
        self.ready.extend(cuts);
    }
}

impl<R: Read> Iterator for Chunker<R> {
    type Item = std::io::Result<Chunk>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        loop {
            if let Some((off, l)) = self.ready.pop_front() {
                let data = self.buf[off..off + l].to_vec();
                let id = ChunkId::of(&data);
                let chunk = Chunk {
                    id,
                    offset: self.offset,
                    data,
                };
                self.offset += l as u64;
                self.start = off + l;
                return Some(Ok(chunk));
            }
            if self.eof && self.start == self.len {
                return None;
            }
            if let Err(e) = self.refill() {
                self.failed = true;
                return Some(Err(e));
            }
            if self.start == self.len {
                return None;
            }
            self.cut();
        }
    }
}

/// Chunk a whole reader, returning (id, size) of each chunk without keeping
/// the data. Useful to compute a manifest's chunk list.
pub fn chunk_ids<R: Read>(src: R) -> std::io::Result<Vec<(ChunkId, u32)>> {
    Chunker::new(src)
        .map(|c| c.map(|c| (c.id, c.data.len() as u32)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<u8> {
        let mut v = vec![0u8; n];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    }

    /// Reader that returns data in small, odd-sized pieces.
    struct Dribble<'a>(&'a [u8], usize);
    impl Read for Dribble<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = self.0.len().min(out.len()).min(self.1);
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn streaming_matches_whole_buffer_fastcdc() {
        let data = random(11 * 1024 * 1024 + 12345, 1);
        let whole: Vec<(usize, usize)> = FastCDC::new(&data, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK)
            .map(|c| (c.offset, c.length))
            .collect();
        let streamed: Vec<Chunk> = Chunker::new(Dribble(&data, 77_777))
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(whole.len(), streamed.len());
        for ((off, len), c) in whole.iter().zip(&streamed) {
            assert_eq!(*off as u64, c.offset);
            assert_eq!(*len, c.data.len());
            assert_eq!(c.id, ChunkId::of(&data[*off..*off + *len]));
        }
        let total: usize = streamed.iter().map(|c| c.data.len()).sum();
        assert_eq!(total, data.len());
    }

    #[test]
    fn sizes_within_bounds() {
        let data = random(8 * 1024 * 1024, 2);
        let chunks = chunk_ids(&data[..]).unwrap();
        let n = chunks.len();
        for (i, (_, s)) in chunks.iter().enumerate() {
            assert!(*s <= MAX_CHUNK);
            if i + 1 < n {
                assert!(*s >= MIN_CHUNK);
            }
        }
        // About 64 KiB on average for random data.
        let avg = data.len() / n;
        assert!((32 * 1024..=128 * 1024).contains(&avg), "avg {avg}");
    }

    #[test]
    fn empty_and_tiny_inputs() {
        assert!(chunk_ids(&[][..]).unwrap().is_empty());
        let c = chunk_ids(&b"abc"[..]).unwrap();
        assert_eq!(c, vec![(ChunkId::of(b"abc"), 3)]);
    }

    #[test]
    fn zeros_dedupe_to_max_chunks() {
        let data = vec![0u8; 3 * 1024 * 1024];
        let c = chunk_ids(&data[..]).unwrap();
        assert!(c.iter().all(|(id, s)| *s == MAX_CHUNK && *id == c[0].0));
    }

    /// 1 % of an 8 MiB random image changed in 2 contiguous places: the
    /// bytes of chunks the new version does not share with the old one stay
    /// under 5 % on average over 16 random images. (Each changed place costs
    /// its own length plus about 1.5 average chunks of re-cut neighbours, so
    /// more places at this small size exceed 5 %; see docs/bench/chunking.md.)
    #[test]
    fn one_percent_change_moves_under_five_percent() {
        use rand::Rng;
        let n = 8 << 20;
        let places = 2;
        let (mut new_total, mut all_total) = (0u64, 0u64);
        for seed in 0..16u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut v = vec![0u8; n];
            rng.fill_bytes(&mut v);
            let old: std::collections::HashSet<ChunkId> = chunk_ids(&v[..])
                .unwrap()
                .into_iter()
                .map(|c| c.0)
                .collect();
            let per = n / 100 / places;
            for p in 0..places {
                let lo = p * n / places;
                let at = rng.gen_range(lo..lo + n / places - per);
                for b in &mut v[at..at + per] {
                    *b = !*b;
                }
            }
            let new: u64 = chunk_ids(&v[..])
                .unwrap()
                .into_iter()
                .filter(|c| !old.contains(&c.0))
                .map(|c| c.1 as u64)
                .sum();
            assert!(new * 10 <= n as u64, "seed {seed}: {new} new bytes > 10 %");
            new_total += new;
            all_total += n as u64;
        }
        assert!(
            new_total * 20 <= all_total,
            "{new_total} of {all_total} bytes in new chunks (> 5 %)"
        );
    }

    #[test]
    fn read_error_is_reported() {
        struct Fail;
        impl Read for Fail {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("boom"))
            }
        }
        let mut it = Chunker::new(Fail);
        assert!(it.next().unwrap().is_err());
        assert!(it.next().is_none());
    }
}
