//! The in-process token bucket: exact within one process, nothing shared.
//!
//! Why hand-written rather than `governor`: the server needs, for every
//! request, `remaining`, the time until the bucket is full and the time until
//! `cost` tokens are available, computed with exactly the arithmetic the Redis
//! script uses so that headers do not change meaning with the backend; and the
//! limit is a per-call argument (per-org overrides may change it between two
//! requests for the same key). governor's GCRA keyed limiters fix the quota
//! per limiter and only answer "yes" or "not until T", so we would end up
//! re-deriving the rest from its internal state, differently from Redis.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use confab_core::ratelimit::{Decision, Limit, RateLimitError, RateLimiter};
use dashmap::DashMap;

use crate::bucket;

/// Map size below which we never sweep: small maps cost nothing to keep and
/// sweeping them often would only add latency.
const MIN_SWEEP_LEN: usize = 1024;

/// One key's bucket as of `updated`.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
    /// The limit of the last call, so a sweep (which has no limit at hand)
    /// can tell whether the bucket has refilled to full.
    limit: Limit,
}

impl Bucket {
    fn tokens_at(&self, now: Instant, limit: Limit) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        bucket::refill(self.tokens, elapsed, limit)
    }

    /// A full bucket behaves exactly like an absent one (absent = full), so
    /// dropping it loses nothing. Buckets that never refill are dropped after
    /// `MAX_WAIT` idle, the same horizon as the Redis key's TTL cap.
    fn is_forgettable(&self, now: Instant) -> bool {
        bucket::is_full(self.tokens_at(now, self.limit), self.limit)
            || now.saturating_duration_since(self.updated) >= bucket::MAX_WAIT
    }
}

/// Token buckets in a sharded concurrent map, one per key.
///
/// Each request's read-refill-take-write runs while holding the write lock of
/// the key's shard (`DashMap::get_mut`/`entry`), so concurrent requests for
/// one key are serialised and none can read a count another is about to
/// change. The clock is `Instant` (monotonic), read inside that lock so the
/// stored timestamps only move forward.
///
/// Memory is bounded by sweeping: whenever an insert grows the map to
/// `sweep_at` entries, that caller removes every bucket that has refilled to
/// full (or, if it never refills, sat idle for `MAX_WAIT`) and sets the next
/// threshold to twice the surviving size. The cost is amortised O(1) per
/// insert, and the map never holds more than about twice the buckets that
/// are actually not full.
/// We chose this over a timer task because a task would need an owner to stop
/// it (the limiter has no shutdown hook) and would wake up even when idle.
#[derive(Debug)]
pub struct MemoryRateLimiter {
    buckets: DashMap<String, Bucket>,
    /// Map size at which the next insert sweeps. `usize::MAX` while a sweep
    /// is running, so only one caller sweeps at a time.
    sweep_at: AtomicUsize,
}

impl MemoryRateLimiter {
    /// An empty limiter; every key starts with a full bucket.
    pub fn new() -> Self {
        Self {
            buckets: DashMap::new(),
            sweep_at: AtomicUsize::new(MIN_SWEEP_LEN),
        }
    }

    /// Number of buckets currently held (for tests and diagnostics).
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Remove every bucket that is full again; returns how many remain.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        self.buckets.retain(|_, b| !b.is_forgettable(now));
        self.buckets.len()
    }

    fn take(&self, key: &str, limit: Limit, cost: u32) -> Decision {
        // Fast path without allocating the key: the bucket usually exists.
        // `get_mut` holds the shard's write lock until `entry` is dropped.
        if let Some(mut entry) = self.buckets.get_mut(key) {
            return apply(&mut entry, limit, cost);
        }
        let decision = {
            // `entry` re-checks under the lock: if another caller inserted the
            // key meanwhile we update theirs instead of overwriting it.
            let mut entry = self
                .buckets
                .entry(key.to_owned())
                .or_insert_with(|| Bucket {
                    tokens: f64::from(limit.burst),
                    updated: Instant::now(),
                    limit,
                });
            apply(&mut entry, limit, cost)
            // The shard lock is released here, before any sweep below:
            // `retain` locks every shard and would deadlock against it.
        };
        self.maybe_sweep();
        decision
    }

    fn maybe_sweep(&self) {
        let threshold = self.sweep_at.load(Ordering::Relaxed);
        if self.buckets.len() < threshold {
            return;
        }
        // Claim the sweep; losers carry on without waiting for it.
        if self
            .sweep_at
            .compare_exchange(threshold, usize::MAX, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let left = self.sweep();
        self.sweep_at
            .store(left.saturating_mul(2).max(MIN_SWEEP_LEN), Ordering::Release);
    }
}

impl Default for MemoryRateLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// Refill, take and write back one bucket; the caller holds its lock.
fn apply(b: &mut Bucket, limit: Limit, cost: u32) -> Decision {
    let now = Instant::now();
    let tokens = b.tokens_at(now, limit);
    let (allowed, left) = bucket::take(tokens, limit, cost);
    *b = Bucket {
        tokens: left,
        updated: now,
        limit,
    };
    bucket::decision(limit, cost, allowed, left)
}

#[async_trait]
impl RateLimiter for MemoryRateLimiter {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn acquire(
        &self,
        key: &str,
        limit: Limit,
        cost: u32,
    ) -> Result<Decision, RateLimitError> {
        if cost == 0 {
            return self.peek(key, limit).await;
        }
        Ok(self.take(key, limit, cost))
    }

    async fn peek(&self, key: &str, limit: Limit) -> Result<Decision, RateLimitError> {
        // Read-only: a peek at an unknown key must not create a bucket.
        let tokens = match self.buckets.get(key) {
            Some(b) => b.tokens_at(Instant::now(), limit),
            None => f64::from(limit.burst),
        };
        let (allowed, tokens) = bucket::take(tokens, limit, 0);
        Ok(bucket::decision(limit, 0, allowed, tokens))
    }

    async fn ping(&self) -> Result<(), RateLimitError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Limit = Limit {
        burst: 2,
        per_second: 1000.0,
    };

    #[tokio::test]
    async fn full_buckets_are_swept_and_partial_ones_kept() {
        let limiter = MemoryRateLimiter::new();
        let slow = Limit {
            burst: 2,
            per_second: 0.001,
        };
        limiter.acquire("slow", slow, 1).await.unwrap();
        limiter.acquire("fast", LIMIT, 1).await.unwrap();
        // 1000/s refills one token in a millisecond; wait for it by polling.
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while limiter.sweep() > 1 {
            assert!(Instant::now() < deadline, "fast bucket never became full");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert!(limiter.buckets.contains_key("slow"));
    }

    #[tokio::test]
    async fn growth_triggers_an_opportunistic_sweep() {
        let limiter = MemoryRateLimiter::new();
        let frozen = Limit {
            burst: 2,
            per_second: 0.0,
        };
        // Half the keys can never refill; the other half refill their one
        // token within a picosecond, so they are full by the time of the sweep.
        let roomy = Limit {
            burst: 1_000_000_000,
            per_second: 1e12,
        };
        for i in 0..MIN_SWEEP_LEN {
            let limit = if i % 2 == 0 { frozen } else { roomy };
            limiter.acquire(&format!("k{i}"), limit, 1).await.unwrap();
        }
        // The insert that reached MIN_SWEEP_LEN swept the refilled half.
        assert!(
            limiter.len() <= MIN_SWEEP_LEN / 2 + 1,
            "len {}",
            limiter.len()
        );
        assert!(limiter.sweep_at.load(Ordering::Relaxed) >= MIN_SWEEP_LEN);
    }

    #[tokio::test]
    async fn peek_does_not_create_a_bucket() {
        let limiter = MemoryRateLimiter::new();
        let d = limiter.peek("nobody", LIMIT).await.unwrap();
        assert!(d.allowed);
        assert_eq!(d.remaining, 2);
        assert!(limiter.is_empty());
    }
}
