//! The randomness the cores are given.
//!
//! A core never reaches for the OS's entropy on its own: it holds a [`CoreRng`]
//! (session indices, cookie secrets and nonces) and draws from it the seed of each
//! Noise handshake's ephemeral key. The I/O shells pass [`from_os`]; tests and
//! simulations pass [`seeded`], so a run can be repeated exactly.

use rand_chacha::ChaCha20Rng;
use rand_core::{CryptoRng, CryptoRngCore, RngCore, SeedableRng};
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{CryptoResolver, DefaultResolver, FallbackResolver};
use snow::types::{Cipher, Dh, Hash, Random};

/// The RNG a core holds: any cryptographically secure generator.
pub struct CoreRng(Box<dyn CryptoRngCore + Send>);

impl CoreRng {
    /// Wraps any cryptographically secure generator.
    pub fn new(rng: impl CryptoRngCore + Send + 'static) -> CoreRng {
        CoreRng(Box::new(rng))
    }
}

impl std::fmt::Debug for CoreRng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CoreRng")
    }
}

impl RngCore for CoreRng {
    fn next_u32(&mut self) -> u32 {
        self.0.next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill_bytes(dest)
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.0.try_fill_bytes(dest)
    }
}

impl CryptoRng for CoreRng {}

/// A ChaCha20 stream seeded once from the operating system.
pub fn from_os() -> CoreRng {
    CoreRng::new(ChaCha20Rng::from_entropy())
}

/// A deterministic ChaCha20 stream: the same seed gives the same run.
pub fn seeded(seed: u64) -> CoreRng {
    CoreRng::new(ChaCha20Rng::seed_from_u64(seed))
}

/// What snow needs from an RNG: the ChaCha20 stream of one handshake.
struct HandshakeRng(ChaCha20Rng);

impl RngCore for HandshakeRng {
    fn next_u32(&mut self) -> u32 {
        self.0.next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill_bytes(dest)
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.0.try_fill_bytes(dest)
    }
}

impl CryptoRng for HandshakeRng {}
impl Random for HandshakeRng {}

/// Resolves snow's RNG to a stream seeded from the core's RNG; everything else
/// (X25519, ChaChaPoly, BLAKE2s) falls through to snow's own implementations.
struct SeedResolver([u8; 32]);

impl CryptoResolver for SeedResolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        Some(Box::new(HandshakeRng(ChaCha20Rng::from_seed(self.0))))
    }
    fn resolve_dh(&self, _: &DHChoice) -> Option<Box<dyn Dh>> {
        None
    }
    fn resolve_hash(&self, _: &HashChoice) -> Option<Box<dyn Hash>> {
        None
    }
    fn resolve_cipher(&self, _: &CipherChoice) -> Option<Box<dyn Cipher>> {
        None
    }
}

/// A snow resolver whose randomness (the handshake's ephemeral key) comes from `rng`.
pub(crate) fn noise_resolver(rng: &mut dyn CryptoRngCore) -> snow::resolvers::BoxedCryptoResolver {
    let mut seed = [0u8; 32];
    rng.fill_bytes(&mut seed);
    Box::new(FallbackResolver::new(
        Box::new(SeedResolver(seed)),
        Box::new(DefaultResolver),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_streams_repeat_and_differ() {
        let draw = |s| {
            let mut r = seeded(s);
            (r.next_u64(), r.next_u64())
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }
}
