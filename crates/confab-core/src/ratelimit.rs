//! The rate-limiting contract: a token bucket per key (one key per org).

use std::time::Duration;

use async_trait::async_trait;

/// Capacity and refill of one bucket.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limit {
    /// Capacity: how many requests may arrive at once after a quiet period.
    pub burst: u32,
    /// Tokens added per second, continuously.
    pub per_second: f64,
}

impl Limit {
    /// Seconds for an empty bucket to become full.
    pub fn seconds_to_full(&self, tokens: f64) -> f64 {
        ((f64::from(self.burst) - tokens).max(0.0)) / self.per_second
    }
}

/// The outcome of one `acquire` (or `peek`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    /// The bucket's capacity.
    pub limit: u32,
    /// Whole tokens left after this request.
    pub remaining: u32,
    /// Time until the bucket is full again.
    pub reset_after: Duration,
    /// When refused: time until `cost` tokens are available.
    pub retry_after: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    /// The shared backend (Redis) is unreachable or timed out.
    #[error("rate limit backend unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait RateLimiter: Send + Sync + 'static {
    /// `"memory"` or `"redis"`.
    fn backend(&self) -> &'static str;

    /// Atomically refill the bucket for the time elapsed, then take `cost`
    /// tokens if that many are there. Exact under any concurrency: N
    /// simultaneous calls against a full bucket admit exactly `burst` (plus
    /// what refills meanwhile), also across processes sharing a backend.
    async fn acquire(&self, key: &str, limit: Limit, cost: u32)
    -> Result<Decision, RateLimitError>;

    /// The bucket's state without taking a token (`allowed` says whether one
    /// request would be admitted now).
    async fn peek(&self, key: &str, limit: Limit) -> Result<Decision, RateLimitError>;

    /// `Ok` when the backend is reachable (always, in-process).
    async fn ping(&self) -> Result<(), RateLimitError>;
}
