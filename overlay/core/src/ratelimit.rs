//! Token buckets: the filter's per-guest limits and the buyer's handshake limiter.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::HandshakeLimits;

const NANOS: u128 = 1_000_000_000;

/// A token bucket refilled at `rate` tokens per second up to `burst`.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    /// Tokens in units of 1e-9 token.
    nano_tokens: u128,
    last: Option<Instant>,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u64, burst: u64) -> TokenBucket {
        TokenBucket {
            rate,
            burst,
            nano_tokens: burst as u128 * NANOS,
            last: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_nanos();
            let cap = self.burst as u128 * NANOS;
            self.nano_tokens = (self.nano_tokens + dt.saturating_mul(self.rate as u128)).min(cap);
        }
        if self.last.is_none_or(|l| now > l) {
            self.last = Some(now);
        }
    }

    /// Takes `n` tokens if there are that many.
    pub fn take(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        let need = n as u128 * NANOS;
        if self.nano_tokens >= need {
            self.nano_tokens -= need;
            true
        } else {
            false
        }
    }

    /// Whether `n` tokens are there (refills, takes nothing).
    pub fn has(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        self.nano_tokens >= n as u128 * NANOS
    }

    /// Takes `n` tokens, or all there are when fewer (work already done is paid for
    /// even when the bucket cannot cover it).
    pub fn spend(&mut self, n: u64, now: Instant) {
        self.refill(now);
        self.nano_tokens = self.nano_tokens.saturating_sub(n as u128 * NANOS);
    }

    /// How long until `n` tokens are there (zero if they are; `n` is capped at the
    /// burst, which is all a bucket ever holds).
    pub fn wait_for(&mut self, n: u64, now: Instant) -> Duration {
        self.refill(now);
        let need = n.min(self.burst) as u128 * NANOS;
        if self.nano_tokens >= need {
            return Duration::ZERO;
        }
        if self.rate == 0 {
            return Duration::MAX;
        }
        let ns = (need - self.nano_tokens).div_ceil(self.rate as u128);
        Duration::from_nanos(ns.min(u64::MAX as u128) as u64)
    }

    /// How long an idle bucket takes to fill up again.
    fn fill_time(&self) -> Duration {
        if self.rate == 0 {
            return Duration::MAX;
        }
        Duration::from_nanos(
            (self.burst as u128 * NANOS / self.rate as u128).min(u64::MAX as u128) as u64,
        )
    }
}

/// Limits handshake initiations per source IP and overall, before any public-key
/// work is done, so a flood cannot pin the responder's CPU.
#[derive(Debug)]
pub struct HandshakeLimiter {
    limits: HandshakeLimits,
    global: TokenBucket,
    sources: HashMap<IpAddr, TokenBucket>,
    /// Buckets of endpoints that already completed a session (bounded by the number
    /// of admitted guests).
    known: HashMap<IpAddr, TokenBucket>,
}

impl HandshakeLimiter {
    /// A limiter with full buckets.
    pub fn new(limits: HandshakeLimits) -> HandshakeLimiter {
        HandshakeLimiter {
            global: TokenBucket::new(limits.global_per_sec as u64, limits.global_burst as u64),
            sources: HashMap::new(),
            known: HashMap::new(),
            limits,
        }
    }

    /// Forgets the known-endpoint bucket of `ip` (its session went away).
    pub fn forget_known(&mut self, ip: IpAddr) {
        self.known.remove(&ip);
    }

    /// Whether a handshake from `ip` may be processed now. `known`: `ip` is the
    /// endpoint of an authenticated session. Those keep their own per-source bucket
    /// outside the global cap, so a flood from spoofed addresses cannot stop an
    /// existing session from rekeying.
    pub fn allow(&mut self, ip: IpAddr, now: Instant, known: bool) -> bool {
        if known {
            let per = self.known.entry(ip).or_insert_with(|| {
                TokenBucket::new(
                    self.limits.per_source_per_sec as u64,
                    self.limits.per_source_burst as u64,
                )
            });
            return per.take(1, now);
        }
        if !self.sources.contains_key(&ip) && self.sources.len() >= self.limits.max_tracked_sources
        {
            // Forget sources whose buckets have refilled: they are as good as new.
            let per = TokenBucket::new(
                self.limits.per_source_per_sec as u64,
                self.limits.per_source_burst as u64,
            );
            let idle = per.fill_time();
            self.sources.retain(|_, b| {
                b.last
                    .is_some_and(|l| now.saturating_duration_since(l) < idle)
            });
            if self.sources.len() >= self.limits.max_tracked_sources {
                return false;
            }
        }
        let per_source = self.sources.entry(ip).or_insert_with(|| {
            TokenBucket::new(
                self.limits.per_source_per_sec as u64,
                self.limits.per_source_burst as u64,
            )
        });
        if !per_source.has(1, now) || !self.global.take(1, now) {
            return false;
        }
        per_source.take(1, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 5);
        for _ in 0..5 {
            assert!(b.take(1, t0));
        }
        assert!(!b.take(1, t0));
        assert!(!b.take(1, t0 + Duration::from_millis(50)));
        assert!(b.take(1, t0 + Duration::from_millis(100)));
        // Long idle refills only up to the burst.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..5 {
            assert!(b.take(1, later));
        }
        assert!(!b.take(1, later));
        assert!(
            !b.take(6, later + Duration::from_secs(10)),
            "more than burst never fits"
        );
    }

    #[test]
    fn spend_and_wait_for() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 100);
        b.spend(150, t0);
        assert!(!b.has(1, t0), "spending past the tokens leaves none");
        assert_eq!(b.wait_for(10, t0), Duration::from_millis(10));
        assert_eq!(
            b.wait_for(1000, t0),
            Duration::from_millis(100),
            "capped at the burst"
        );
        let t1 = t0 + Duration::from_millis(10);
        assert_eq!(b.wait_for(10, t1), Duration::ZERO);
        assert!(b.take(10, t1));
        assert_eq!(
            TokenBucket::new(0, 1).wait_for(2, t0),
            Duration::ZERO,
            "a full bucket needs no wait"
        );
    }

    #[test]
    fn handshake_limiter_per_source_and_global() {
        let t0 = Instant::now();
        let mut l = HandshakeLimiter::new(HandshakeLimits {
            per_source_per_sec: 1,
            per_source_burst: 2,
            global_per_sec: 1,
            global_burst: 3,
            max_tracked_sources: 2,
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        assert!(l.allow(a, t0, false) && l.allow(a, t0, false));
        assert!(!l.allow(a, t0, false), "per-source burst spent");
        assert!(l.allow(b, t0, false));
        assert!(!l.allow(b, t0, false), "global burst spent");
        assert!(!l.allow(c, t0, false), "table full, nobody idle");
        let t1 = t0 + Duration::from_secs(5);
        assert!(l.allow(c, t1, false), "idle sources forgotten");
        let d: IpAddr = "10.0.0.4".parse().unwrap();
        while l.allow(b, t1, false) {} // spend the global bucket
        assert!(!l.allow(d, t1, false), "global cap spent");
        assert!(
            l.allow(d, t1, true) && l.allow(d, t1, true),
            "known endpoint bypasses the cap"
        );
        assert!(!l.allow(d, t1, true), "but keeps its per-source limit");
    }
}
