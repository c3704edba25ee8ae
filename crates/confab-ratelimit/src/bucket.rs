//! Token-bucket arithmetic shared by both limiters.
//!
//! The in-process limiter runs all of it; the Redis limiter runs the refill and
//! take in its Lua script (which mirrors [`refill`] and [`take`] line for line)
//! and derives the [`Decision`] here from the script's reply. Deriving
//! `remaining`, `reset_after` and `retry_after` in one place is what keeps the
//! two backends' headers identical, rather than two copies that could drift.

use std::time::Duration;

use confab_core::ratelimit::{Decision, Limit};

/// Upper bound for every wait we report (and for the Redis key's TTL).
///
/// A limit that never refills (`per_second` 0) or a request that can never
/// fit (`cost` > `burst`) has no finite answer; a year is "effectively never"
/// while staying far from `Duration`/timestamp overflow in callers that add it
/// to the current time.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Refill rate in tokens per second, with nonsense (negative, NaN, infinite)
/// read as "never refills" so no division below can produce NaN.
pub(crate) fn rate(limit: Limit) -> f64 {
    if limit.per_second.is_finite() && limit.per_second > 0.0 {
        limit.per_second
    } else {
        0.0
    }
}

/// Tolerance for float rounding when comparing tokens.
///
/// Refill is `elapsed * rate`; after exactly one second at 1/s it can come out
/// as 0.9999999999 and must still admit a request. The rounding error is a
/// few units in the last place of the numbers involved, so the tolerance is
/// 1e-9 tokens, or 1e-12 of the capacity for very large buckets (where one
/// ulp exceeds 1e-9): thousands of ulps, yet far below one request's worth.
pub(crate) fn epsilon(limit: Limit) -> f64 {
    (1e-12 * f64::from(limit.burst)).max(1e-9)
}

/// Tokens in a bucket that held `tokens` `elapsed_secs` ago.
///
/// Clamping to `burst` also handles a per-org override that shrank the bucket:
/// a stored bucket fuller than the new capacity is simply full.
pub(crate) fn refill(tokens: f64, elapsed_secs: f64, limit: Limit) -> f64 {
    let refilled = tokens + elapsed_secs.max(0.0) * rate(limit);
    refilled.min(f64::from(limit.burst)).max(0.0)
}

/// Whether `cost` tokens can be taken from `tokens`, and the tokens left.
///
/// `cost` 0 is a peek: it asks whether one request would pass and takes
/// nothing.
pub(crate) fn take(tokens: f64, limit: Limit, cost: u32) -> (bool, f64) {
    let need = f64::from(cost.max(1));
    let allowed = tokens + epsilon(limit) >= need;
    if allowed && cost > 0 {
        (true, (tokens - f64::from(cost)).max(0.0))
    } else {
        (allowed, tokens)
    }
}

/// Whether a bucket holding `tokens` is full, i.e. indistinguishable from a
/// bucket that does not exist (which both backends treat as full).
pub(crate) fn is_full(tokens: f64, limit: Limit) -> bool {
    tokens + epsilon(limit) >= f64::from(limit.burst)
}

/// The decision for a bucket left with `tokens` after a request of `cost`
/// that was (or was not) `allowed`.
pub(crate) fn decision(limit: Limit, cost: u32, allowed: bool, tokens: f64) -> Decision {
    let burst = f64::from(limit.burst);
    let rate = rate(limit);
    // The same epsilon as the admission test, so a bucket that would admit a
    // request never reports `remaining: 0`.
    let whole = (tokens + epsilon(limit)).floor().clamp(0.0, burst);
    let reset_after = if is_full(tokens, limit) {
        Duration::ZERO
    } else {
        wait((burst - tokens) / rate)
    };
    let retry_after = if allowed {
        None
    } else {
        let need = cost.max(1);
        if need > limit.burst {
            // Never fits, however long the caller waits.
            Some(MAX_WAIT)
        } else {
            Some(wait((f64::from(need) - tokens) / rate))
        }
    };
    Decision {
        allowed,
        limit: limit.burst,
        // `whole` is in 0..=burst, so the cast cannot truncate.
        remaining: whole as u32,
        reset_after,
        retry_after,
    }
}

/// Seconds to a `Duration`, clamped to `0..=MAX_WAIT`.
///
/// `Duration::from_secs_f64` panics on NaN, negative and huge inputs (a
/// division by a zero rate gives infinity), so those are mapped here first.
pub(crate) fn wait(secs: f64) -> Duration {
    if secs.is_nan() || secs <= 0.0 {
        Duration::ZERO
    } else if secs >= MAX_WAIT.as_secs_f64() {
        MAX_WAIT
    } else {
        Duration::from_secs_f64(secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIVE_PER_TWO: Limit = Limit {
        burst: 5,
        per_second: 2.0,
    };

    fn close(actual: Duration, expected_secs: f64) -> bool {
        (actual.as_secs_f64() - expected_secs).abs() < 1e-9
    }

    #[test]
    fn rounding_just_below_one_token_still_admits() {
        let limit = Limit {
            burst: 1,
            per_second: 1.0,
        };
        let (allowed, left) = take(0.999_999_999_9, limit, 1);
        assert!(allowed);
        assert!(left.abs() < f64::EPSILON);
    }

    #[test]
    fn huge_buckets_do_not_admit_early() {
        let limit = Limit {
            burst: u32::MAX,
            per_second: 1.0,
        };
        assert!(!take(0.99, limit, 1).0);
        assert!(take(1.0, limit, 1).0);
    }

    #[test]
    fn a_real_shortfall_is_refused() {
        let limit = Limit {
            burst: 1,
            per_second: 1.0,
        };
        // One microsecond short of a token at 1/s.
        let (allowed, left) = take(0.999_999, limit, 1);
        assert!(!allowed);
        assert!((left - 0.999_999).abs() < f64::EPSILON);
    }

    #[test]
    fn refill_is_capped_at_burst_and_clamps_a_shrunken_bucket() {
        assert!((refill(1.0, 100.0, FIVE_PER_TWO) - 5.0).abs() < f64::EPSILON);
        assert!((refill(9.0, 0.0, FIVE_PER_TWO) - 5.0).abs() < f64::EPSILON);
        assert!((refill(1.0, 0.5, FIVE_PER_TWO) - 2.0).abs() < f64::EPSILON);
    }

    #[test]
    fn a_clock_going_backwards_refills_nothing() {
        assert!((refill(1.0, -3.0, FIVE_PER_TWO) - 1.0).abs() < f64::EPSILON);
    }

    #[test]
    fn peek_takes_nothing() {
        let (allowed, left) = take(3.0, FIVE_PER_TWO, 0);
        assert!(allowed);
        assert!((left - 3.0).abs() < f64::EPSILON);
        let (allowed, _) = take(0.5, FIVE_PER_TWO, 0);
        assert!(!allowed);
    }

    #[test]
    fn refused_decision_reports_time_to_next_token_and_to_full() {
        let d = decision(FIVE_PER_TWO, 1, false, 0.0);
        assert!(!d.allowed);
        assert_eq!(d.limit, 5);
        assert_eq!(d.remaining, 0);
        assert!(close(d.reset_after, 2.5));
        assert!(d.retry_after.is_some_and(|r| close(r, 0.5)));
    }

    #[test]
    fn allowed_decision_has_no_retry_and_floors_remaining() {
        let d = decision(FIVE_PER_TWO, 1, true, 3.7);
        assert_eq!(d.remaining, 3);
        assert_eq!(d.retry_after, None);
        assert!(close(d.reset_after, 0.65));
        assert_eq!(
            decision(FIVE_PER_TWO, 0, true, 5.0).reset_after,
            Duration::ZERO
        );
    }

    #[test]
    fn retry_after_counts_the_whole_cost() {
        let d = decision(FIVE_PER_TWO, 3, false, 1.0);
        assert!(d.retry_after.is_some_and(|r| close(r, 1.0)));
    }

    #[test]
    fn impossible_requests_and_frozen_buckets_wait_at_most_max_wait() {
        let d = decision(FIVE_PER_TWO, 6, false, 5.0);
        assert_eq!(d.retry_after, Some(MAX_WAIT));
        let frozen = Limit {
            burst: 5,
            per_second: 0.0,
        };
        let d = decision(frozen, 1, false, 0.0);
        assert_eq!(d.retry_after, Some(MAX_WAIT));
        assert_eq!(d.reset_after, MAX_WAIT);
        let nonsense = Limit {
            burst: 5,
            per_second: f64::NAN,
        };
        assert_eq!(decision(nonsense, 1, false, 0.0).reset_after, MAX_WAIT);
    }

    #[test]
    fn zero_burst_refuses_everything() {
        let limit = Limit {
            burst: 0,
            per_second: 1.0,
        };
        let (allowed, _) = take(refill(0.0, 10.0, limit), limit, 1);
        assert!(!allowed);
        assert_eq!(decision(limit, 1, false, 0.0).retry_after, Some(MAX_WAIT));
    }
}
