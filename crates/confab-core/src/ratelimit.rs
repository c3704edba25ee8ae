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

    /// A turn's two admission steps at once: take one token from rate-limit
    /// bucket `bucket` (as [`RateLimiter::acquire`] with cost 1) and, only
    /// if that was allowed, reserve as [`TokenBudget::reserve`] does. Where
    /// the budgets and the buckets live in one backend (Redis, opened as one
    /// for both), this is one atomic step and one round trip instead of two
    /// in a row before the model is called. `None` where there is nothing to
    /// save (in process): the caller takes the token, then reserves.
    async fn take_and_reserve(
        &self,
        _bucket: &str,
        _limit: Limit,
        _request: &ReserveRequest,
    ) -> Option<Result<TakeAndReserve, RateLimitError>> {
        None
    }
}

/// What [`TokenBudget::take_and_reserve`] decided.
#[derive(Clone, Debug, PartialEq)]
pub struct TakeAndReserve {
    pub decision: Decision,
    /// `None` when the take was refused (nothing was reserved).
    pub reservation: Option<Reservation>,
}

/// A request's rate-limit token, to be taken once: by the edge before the
/// route runs, or by the turn engine, which can take it in the same backend
/// call as the turn's token reservation ([`TokenBudget::take_and_reserve`]).
/// Whoever takes it records what was decided here, for the edge to report
/// (headers, metrics) and to take it after all if nobody did.
pub struct RateTake {
    limiter: std::sync::Arc<dyn RateLimiter>,
    pub key: String,
    pub limit: Limit,
    /// The backend unreachable: admit (and count) or refuse.
    pub fail_open: bool,
    taken: std::sync::OnceLock<Taken>,
}

/// The outcome of a [`RateTake`] and how long the call took.
#[derive(Clone, Debug)]
pub struct Taken {
    pub result: Result<Decision, RateLimitError>,
    pub elapsed: Duration,
}

impl Taken {
    /// Whether the request may go on: allowed, or the backend down and the
    /// policy fail-open.
    pub fn admits(&self, fail_open: bool) -> bool {
        match &self.result {
            Ok(decision) => decision.allowed,
            Err(_) => fail_open,
        }
    }
}

impl RateTake {
    pub fn new(
        limiter: std::sync::Arc<dyn RateLimiter>,
        key: String,
        limit: Limit,
        fail_open: bool,
    ) -> Self {
        Self {
            limiter,
            key,
            limit,
            fail_open,
            taken: std::sync::OnceLock::new(),
        }
    }

    /// The limiter's backend name (`memory`, `redis`), for metrics.
    pub fn backend(&self) -> &'static str {
        self.limiter.backend()
    }

    /// Record the outcome of a take made elsewhere (with a reservation).
    /// The first record stands.
    pub fn record(&self, result: Result<Decision, RateLimitError>, elapsed: Duration) -> &Taken {
        self.taken.get_or_init(|| Taken { result, elapsed })
    }

    /// Take the token now, unless it was taken already; what was decided.
    pub async fn take(&self) -> &Taken {
        if let Some(taken) = self.taken.get() {
            return taken;
        }
        let started = std::time::Instant::now();
        let result = self.limiter.acquire(&self.key, self.limit, 1).await;
        self.record(result, started.elapsed())
    }
}

impl std::fmt::Debug for RateTake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateTake")
            .field("limit", &self.limit)
            .field("fail_open", &self.fail_open)
            .field("taken", &self.taken.get())
            .finish_non_exhaustive()
    }
}
