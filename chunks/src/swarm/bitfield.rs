//! A fixed-length set of chunk indices (a "have-set"), with a strict wire form.

use serde::{Deserialize, Serialize};

/// Indices of the set bits of `words` (64 chunks a word, lowest first),
/// ascending.
pub(crate) fn ones(words: impl Iterator<Item = u64>) -> impl Iterator<Item = u32> {
    words.enumerate().flat_map(|(wi, mut w)| {
        std::iter::from_fn(move || {
            if w == 0 {
                return None;
            }
            let bit = w.trailing_zeros();
            w &= w - 1;
            Some(wi as u32 * 64 + bit)
        })
    })
}

/// Indices of the bits set in both word slices, ascending.
pub(crate) fn and_ones<'a>(a: &'a [u64], b: &'a [u64]) -> impl Iterator<Item = u32> + 'a {
    ones(a.iter().zip(b).map(|(&a, &b)| a & b))
}

/// Which chunks of one image a peer holds, by chunk index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bitfield {
    len: u32,
    ones: u32,
    words: Vec<u64>,
}

impl Bitfield {
    /// An empty set over `len` chunks.
    pub fn new(len: u32) -> Self {
        Bitfield {
            len,
            ones: 0,
            words: vec![0; (len as usize).div_ceil(64)],
        }
    }

    /// The set holding every chunk.
    pub fn full(len: u32) -> Self {
        let mut b = Bitfield::new(len);
        for w in b.words.iter_mut() {
            *w = u64::MAX;
        }
        b.trim();
        b.ones = len;
        b
    }

    fn trim(&mut self) {
        let rem = self.len % 64;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << rem) - 1;
            }
        }
    }

    /// The set as words of 64 chunks, lowest first (bits past `len` are zero).
    pub(crate) fn words(&self) -> &[u64] {
        &self.words
    }

    /// Number of chunks the set ranges over.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// True when the set ranges over zero chunks.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of chunks held.
    pub fn count(&self) -> u32 {
        self.ones
    }

    /// True when every chunk is held.
    pub fn is_full(&self) -> bool {
        self.ones == self.len
    }

    /// Whether chunk `i` is held; out-of-range indices are not.
    pub fn get(&self, i: u32) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1u64 << (i % 64)) != 0
    }

    /// Marks chunk `i` held; returns true if it was not before. Out of range: no-op.
    pub fn set(&mut self, i: u32) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let m = 1u64 << (i % 64);
        if *w & m != 0 {
            return false;
        }
        *w |= m;
        self.ones += 1;
        true
    }

    /// Marks chunk `i` not held; returns true if it was held.
    pub fn clear(&mut self, i: u32) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let m = 1u64 << (i % 64);
        if *w & m == 0 {
            return false;
        }
        *w &= !m;
        self.ones -= 1;
        true
    }

    /// Indices held, ascending.
    pub fn iter_ones(&self) -> impl Iterator<Item = u32> + '_ {
        ones(self.words.iter().copied())
    }

    /// Number of chunks held by both sets (word-wise; lengths must match).
    pub fn count_and(&self, other: &Bitfield) -> u32 {
        debug_assert_eq!(self.len, other.len);
        self.words
            .iter()
            .zip(&other.words)
            .map(|(a, b)| (a & b).count_ones())
            .sum()
    }

    /// Indices held by both sets, ascending (word-wise; lengths must match).
    pub fn iter_and<'a>(&'a self, other: &'a Bitfield) -> impl Iterator<Item = u32> + 'a {
        debug_assert_eq!(self.len, other.len);
        and_ones(&self.words, &other.words)
    }

    /// Wire form: bit i of the set is bit (i % 8) of byte (i / 8).
    pub fn to_bytes(&self) -> Vec<u8> {
        let n = (self.len as usize).div_ceil(8);
        let mut out = Vec::with_capacity(n);
        for w in &self.words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.truncate(n);
        out
    }

    /// Parses the wire form for an image of `len` chunks. Rejects a wrong length and
    /// bits set past `len` (a peer sending those is confused or hostile).
    pub fn from_bytes(len: u32, bytes: &[u8]) -> Option<Self> {
        if bytes.len() != (len as usize).div_ceil(8) {
            return None;
        }
        let mut b = Bitfield::new(len);
        for (wi, chunk) in bytes.chunks(8).enumerate() {
            let mut buf = [0u8; 8];
            buf[..chunk.len()].copy_from_slice(chunk);
            b.words[wi] = u64::from_le_bytes(buf);
        }
        let before: u32 = b.words.iter().map(|w| w.count_ones()).sum();
        b.trim();
        let after: u32 = b.words.iter().map(|w| w.count_ones()).sum();
        if before != after {
            return None;
        }
        b.ones = after;
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn set_clear_count() {
        let mut b = Bitfield::new(130);
        assert!(b.set(0));
        assert!(!b.set(0));
        assert!(b.set(129));
        assert!(!b.set(130));
        assert_eq!(b.count(), 2);
        assert_eq!(b.iter_ones().collect::<Vec<_>>(), vec![0, 129]);
        assert!(b.clear(0));
        assert!(!b.get(0));
        assert_eq!(b.count(), 1);
        let f = Bitfield::full(130);
        assert!(f.is_full());
        assert_eq!(f.iter_ones().count(), 130);
    }

    #[test]
    fn wire_rejects_stray_bits_and_bad_length() {
        assert!(Bitfield::from_bytes(9, &[0xff, 0x01]).is_some());
        assert!(Bitfield::from_bytes(9, &[0xff, 0x02]).is_none());
        assert!(Bitfield::from_bytes(9, &[0xff]).is_none());
        assert!(Bitfield::from_bytes(9, &[0xff, 0, 0]).is_none());
    }

    proptest! {
        #[test]
        fn and_ops_match_bitwise(len in 0u32..700, sa in any::<u64>(), sb in any::<u64>()) {
            let (mut a, mut b) = (Bitfield::new(len), Bitfield::new(len));
            let (mut x, mut y) = (sa, sb);
            for i in 0..len {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                y = y.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                if x >> 62 == 1 { a.set(i); }
                if y >> 63 == 1 { b.set(i); }
            }
            let want: Vec<u32> = (0..len).filter(|&i| a.get(i) && b.get(i)).collect();
            prop_assert_eq!(a.iter_and(&b).collect::<Vec<_>>(), want.clone());
            prop_assert_eq!(a.count_and(&b) as usize, want.len());
        }

        #[test]
        fn wire_roundtrip(len in 0u32..2000, seed in any::<u64>()) {
            let mut b = Bitfield::new(len);
            let mut x = seed;
            for i in 0..len {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                if x >> 63 == 1 { b.set(i); }
            }
            let back = Bitfield::from_bytes(len, &b.to_bytes()).unwrap();
            prop_assert_eq!(back, b);
        }

        #[test]
        fn wire_parser_never_panics(len in 0u32..5000, bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            if let Some(b) = Bitfield::from_bytes(len, &bytes) {
                prop_assert_eq!(b.iter_ones().count() as u32, b.count());
                prop_assert!(b.iter_ones().all(|i| i < len));
            }
        }
    }
}
