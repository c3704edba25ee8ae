//! Contract tests of `RateLimiter`, run in-process and against Redis.
//!
//! Every timing assertion is a bound computed from `Instant`s taken around
//! the calls, never a guess about how long a sleep "should" take: a bucket's
//! content at any moment is pinned between what it can have refilled during
//! the shortest and the longest window consistent with those measurements.
//! Each test uses its own key (a UUID), so tests can share one Redis.

use std::sync::Arc;
use std::time::{Duration, Instant};

use confab_core::ratelimit::{Decision, Limit, RateLimitError, RateLimiter};
use confab_ratelimit::{MemoryRateLimiter, RedisRateLimiter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Barrier;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::per_limiter;
use crate::support::{Limiter, redis_url};

/// Generous per-call budget: the machine also runs every other test.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Slack for float rounding in computed bounds (seconds or tokens).
const TOLERANCE: f64 = 1e-6;

per_limiter!(
    a_full_bucket_admits_exactly_burst_then_refuses,
    refill_admits_what_the_measured_wait_allows,
    reset_after_is_time_to_full_and_retry_after_time_to_next_token,
    a_request_costing_several_tokens_waits_for_all_of_them,
    peek_takes_no_token,
    each_call_uses_the_limit_it_is_given,
    a_smaller_burst_clamps_a_fuller_bucket,
    concurrent_acquires_never_over_admit,
);

async fn limiter(kind: Limiter) -> Arc<dyn RateLimiter> {
    match kind {
        Limiter::Memory => Arc::new(MemoryRateLimiter::new()),
        Limiter::Redis => redis_limiter().await,
    }
}

/// A limiter on the test Redis; panics (the test fails, never skips) when
/// Redis is unreachable.
async fn redis_limiter() -> Arc<RedisRateLimiter> {
    let limiter = RedisRateLimiter::connect(&redis_url(), CALL_TIMEOUT).expect("valid Redis URL");
    if let Err(e) = limiter.ping().await {
        panic!("Redis is required for these tests (CONFAB_TEST_REDIS_URL): {e}");
    }
    Arc::new(limiter)
}

fn unique_key() -> String {
    format!("test:{}", Uuid::new_v4())
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Most whole tokens `rate` can refill in `elapsed`.
fn max_refill(elapsed: Duration, rate: f64) -> u32 {
    (secs(elapsed) * rate + TOLERANCE).floor() as u32
}

fn assert_between(what: &str, actual: Duration, low: f64, high: f64) {
    let actual = secs(actual);
    assert!(
        actual >= low - TOLERANCE && actual <= high + TOLERANCE,
        "{what} = {actual}s, expected within [{low}, {high}]"
    );
}

async fn acquire(limiter: &dyn RateLimiter, key: &str, limit: Limit) -> Decision {
    limiter.acquire(key, limit, 1).await.expect("acquire")
}

async fn a_full_bucket_admits_exactly_burst_then_refuses(kind: Limiter) {
    let limiter = limiter(kind).await;
    let key = unique_key();
    let limit = Limit {
        burst: 5,
        per_second: 0.01,
    };
    let start = Instant::now();
    let mut decisions = Vec::new();
    for _ in 0..8 {
        decisions.push(acquire(&*limiter, &key, limit).await);
    }
    let elapsed = start.elapsed();
    let admitted = decisions.iter().filter(|d| d.allowed).count() as u32;
    assert!(
        (5..=5 + max_refill(elapsed, limit.per_second)).contains(&admitted),
        "admitted {admitted} in {elapsed:?}"
    );
    for (i, d) in decisions.iter().take(5).enumerate() {
        assert!(d.allowed, "request {i} refused: {d:?}");
        assert_eq!(d.limit, 5);
        assert_eq!(d.remaining, 4 - i as u32);
        assert_eq!(d.retry_after, None);
    }
    if max_refill(elapsed, limit.per_second) == 0 {
        for d in &decisions[5..] {
            assert!(!d.allowed, "{d:?}");
            assert_eq!(d.remaining, 0);
            assert!(d.retry_after.is_some());
        }
    }
}

/// Take until refused; returns (admitted, instant before, instant after the
/// refused call).
async fn drain(limiter: &dyn RateLimiter, key: &str, limit: Limit) -> (u32, Instant, Instant) {
    let mut admitted = 0;
    loop {
        let before = Instant::now();
        let d = acquire(limiter, key, limit).await;
        let after = Instant::now();
        if !d.allowed {
            return (admitted, before, after);
        }
        admitted += 1;
        assert!(admitted <= 10 * limit.burst, "bucket never ran dry");
    }
}

async fn refill_admits_what_the_measured_wait_allows(kind: Limiter) {
    let limiter = limiter(kind).await;
    let key = unique_key();
    // A large burst so the refill below can never reach the cap.
    let limit = Limit {
        burst: 100,
        per_second: 10.0,
    };
    let (first, _, empty_after) = drain(&*limiter, &key, limit).await;
    assert!(first >= 100, "a full bucket admitted only {first}");
    let (_, first_refused_before, first_refused_after) = (first, empty_after, empty_after);
    let _ = first_refused_before;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (admitted, last_refused_before, last_refused_after) = drain(&*limiter, &key, limit).await;

    // Between the two refusals the bucket refilled for at least `shortest`
    // and at most `longest`; it held < 1 token after the first refusal and
    // < 1 before the second. Hence `rate * shortest - 1 < admitted` and
    // `admitted < 1 + rate * longest`.
    let shortest = last_refused_before - first_refused_after;
    let longest = last_refused_after - empty_after_start(&empty_after, &first_refused_after);
    let low = (secs(shortest) * limit.per_second - TOLERANCE).floor().max(0.0) as u32;
    let high = (secs(longest) * limit.per_second + 1.0 + TOLERANCE).floor() as u32;
    assert!(
        secs(longest) * limit.per_second + 1.0 < f64::from(limit.burst),
        "took too long ({longest:?}) to stay below the cap"
    );
    assert!(
        (low..=high).contains(&admitted),
        "admitted {admitted} after {shortest:?}..{longest:?}, expected {low}..={high}"
    );
}
