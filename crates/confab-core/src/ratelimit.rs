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

#[derive(Clone, Debug, thiserror::Error)]
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

/// One window of a token budget (SPEC §12): at most `limit` tokens per
/// `window` (a minute or a UTC day), aligned to the epoch, for one scope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BudgetWindow {
    /// The scope's key without the window index (`org:<id>:m`, `user:<id>:d`).
    pub key: String,
    pub limit: u64,
    /// Seconds: 60 or 86,400.
    pub window_secs: u64,
    /// For metrics and the refusal: `org_minute`, `org_day`, `user_minute`, `user_day`.
    pub kind: &'static str,
}

/// A request to reserve tokens in every window at once.
#[derive(Clone, Debug)]
pub struct ReserveRequest {
    /// Unique per turn (the assistant message id).
    pub id: String,
    pub windows: Vec<BudgetWindow>,
    pub need: u64,
    /// A reservation not settled within this long is void (its process
    /// died), so budgets do not leak.
    pub ttl: Duration,
}

/// What the headers report: the window with the least room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BudgetState {
    pub limit: u64,
    pub remaining: u64,
    /// Until the window ends.
    pub reset_after: Duration,
}

/// The outcome of a reservation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reservation {
    /// Reserved in every window; settle with these window indices.
    Granted {
        state: BudgetState,
        windows: Vec<u64>,
    },
    /// Nothing reserved: `kind`'s window has too little room.
    Refused {
        kind: &'static str,
        state: BudgetState,
    },
}

/// A granted reservation, as settled later.
#[derive(Clone, Debug)]
pub struct Held {
    pub id: String,
    /// `(key, window index, window_secs)` per window.
    pub windows: Vec<(String, u64, u64)>,
}

/// Exact token budgets in fixed windows, behind the same seam as the rate
/// limiter (in-process, or one Lua script per step on Redis).
#[async_trait]
pub trait TokenBudget: Send + Sync + 'static {
    /// In one atomic step: in every window, `limit − used − live reservations
    /// ≥ need`, and then add the reservation to each; or change nothing.
    async fn reserve(&self, request: &ReserveRequest) -> Result<Reservation, RateLimitError>;

    /// Drop the reservation and count `actual` tokens as used, in each
    /// window it was made in (0 releases it). Idempotent per reservation id
    /// only in that the reservation is dropped once; call it once.
    async fn settle(&self, held: &Held, actual: u64) -> Result<(), RateLimitError>;
}
