//! Contract of `TokenBudget` (SPEC §12), run on the in-process and the Redis
//! implementation: exact under concurrency, all windows or none, settlement
//! returns the difference, reservations of a dead process expire.

use std::sync::Arc;
use std::time::Duration;

use confab_core::ratelimit::{
    BudgetWindow, Held, RateLimiter, Reservation, ReserveRequest, TokenBudget,
};
use confab_ratelimit::{MemoryTokenBudget, RedisRateLimiter};
use tokio::sync::Barrier;
use uuid::Uuid;

use crate::per_limiter;
use crate::support::{Limiter, redis_url};

per_limiter!(
    concurrent_reservations_never_exceed_the_limit,
    settling_below_the_reservation_returns_the_difference,
    a_reservation_is_made_in_every_window_or_in_none,
    an_unsettled_reservation_expires,
    a_reservation_is_given_back_once_however_it_ends,
);

async fn budget(kind: Limiter) -> Arc<dyn TokenBudget> {
    match kind {
        Limiter::Memory => Arc::new(MemoryTokenBudget::new()),
        Limiter::Redis => redis_both().await,
    }
}

fn window(limit: u64, window_secs: u64, kind: &'static str) -> BudgetWindow {
    BudgetWindow {
        key: format!("test:{}:{kind}", Uuid::new_v4()),
        limit,
        window_secs,
        kind,
    }
}

fn request(windows: &[BudgetWindow], need: u64, ttl: Duration) -> ReserveRequest {
    ReserveRequest {
        id: Uuid::new_v4().to_string(),
        windows: windows.to_vec(),
        need,
        ttl,
    }
}

fn held(request: &ReserveRequest, reservation: &Reservation) -> Held {
    let Reservation::Granted { windows, .. } = reservation else {
        panic!("expected a grant, got {reservation:?}")
    };
    Held {
        id: request.id.clone(),
        windows: request
            .windows
            .iter()
            .zip(windows)
            .map(|(w, idx)| (w.key.clone(), *idx, w.window_secs))
            .collect(),
    }
}

async fn concurrent_reservations_never_exceed_the_limit(kind: Limiter) {
    let budget = budget(kind).await;
    // A day window: no window boundary can fall inside the test.
    let windows = vec![window(1000, 86_400, "org_day")];
    let n = 200;
    let barrier = Arc::new(Barrier::new(n));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (budget, barrier) = (budget.clone(), barrier.clone());
        let req = request(&windows, 30, Duration::from_secs(60));
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            budget.reserve(&req).await.expect("reserve")
        }));
    }
    let mut granted = 0;
    for task in tasks {
        if matches!(task.await.unwrap(), Reservation::Granted { .. }) {
            granted += 1;
        }
    }
    assert_eq!(granted, 1000 / 30, "exactly what fits is granted");
}

async fn settling_below_the_reservation_returns_the_difference(kind: Limiter) {
    let budget = budget(kind).await;
    let windows = vec![window(100, 86_400, "org_day")];
    let first = request(&windows, 60, Duration::from_secs(60));
    let grant = budget.reserve(&first).await.unwrap();
    let Reservation::Granted { state, .. } = &grant else {
        panic!("{grant:?}")
    };
    assert_eq!((state.limit, state.remaining), (100, 40));
    // 60 more does not fit while the first is reserved …
    let second = request(&windows, 60, Duration::from_secs(60));
    match budget.reserve(&second).await.unwrap() {
        Reservation::Refused { kind, state } => {
            assert_eq!(kind, "org_day");
            assert_eq!(state.remaining, 40);
            assert!(state.reset_after <= Duration::from_secs(86_400));
        }
        other => panic!("{other:?}"),
    }
    // … and fits once the first settles at 10 (10 + 60 ≤ 100).
    budget.settle(&held(&first, &grant), 10).await.unwrap();
    let third = request(&windows, 60, Duration::from_secs(60));
    match budget.reserve(&third).await.unwrap() {
        Reservation::Granted { state, .. } => assert_eq!(state.remaining, 30),
        other => panic!("only fits thanks to the difference: {other:?}"),
    }
    // Used tokens stay used: 10 + 60 reserved; 31 more do not fit.
    assert!(matches!(
        budget
            .reserve(&request(&windows, 31, Duration::from_secs(60)))
            .await
            .unwrap(),
        Reservation::Refused { .. }
    ));
}

async fn a_reservation_is_made_in_every_window_or_in_none(kind: Limiter) {
    let budget = budget(kind).await;
    let roomy = window(1000, 86_400, "org_day");
    let tight = window(50, 86_400, "user_day");
    let both = [roomy.clone(), tight.clone()];
    match budget
        .reserve(&request(&both, 60, Duration::from_secs(60)))
        .await
        .unwrap()
    {
        Reservation::Refused { kind, .. } => assert_eq!(kind, "user_day"),
        other => panic!("{other:?}"),
    }
    // The refused reservation left nothing in the roomy window.
    match budget
        .reserve(&request(&[roomy], 1000, Duration::from_secs(60)))
        .await
        .unwrap()
    {
        Reservation::Granted { state, .. } => assert_eq!(state.remaining, 0),
        other => panic!("the roomy window is untouched: {other:?}"),
    }
    // Headers report the window with the least room.
    match budget
        .reserve(&request(
            &[window(1000, 86_400, "org_day"), tight],
            20,
            Duration::from_secs(60),
        ))
        .await
        .unwrap()
    {
        Reservation::Granted { state, .. } => assert_eq!((state.limit, state.remaining), (50, 30)),
        other => panic!("{other:?}"),
    }
}

async fn an_unsettled_reservation_expires(kind: Limiter) {
    let budget = budget(kind).await;
    let windows = vec![window(100, 86_400, "org_day")];
    let dead = request(&windows, 100, Duration::from_millis(300));
    assert!(matches!(
        budget.reserve(&dead).await.unwrap(),
        Reservation::Granted { .. }
    ));
    assert!(matches!(
        budget
            .reserve(&request(&windows, 1, Duration::from_secs(60)))
            .await
            .unwrap(),
        Reservation::Refused { .. }
    ));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        matches!(
            budget
                .reserve(&request(&windows, 100, Duration::from_secs(60)))
                .await
                .unwrap(),
            Reservation::Granted { .. }
        ),
        "a dead process's reservation does not leak"
    );
}

/// An expired reservation gives its tokens back once: a settle arriving
/// after its expiry (the process was only slow) counts what it used and
/// frees nothing a second time; settling twice frees nothing twice.
async fn a_reservation_is_given_back_once_however_it_ends(kind: Limiter) {
    let budget = budget(kind).await;
    let windows = vec![window(100, 86_400, "org_day")];
    let slow = request(&windows, 60, Duration::from_millis(300));
    let slow_grant = budget.reserve(&slow).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Expires the slow one on the way: 50 reserved now.
    let live = request(&windows, 50, Duration::from_secs(60));
    let live_grant = budget.reserve(&live).await.unwrap();
    assert!(
        matches!(live_grant, Reservation::Granted { .. }),
        "{live_grant:?}"
    );
    budget.settle(&held(&slow, &slow_grant), 5).await.unwrap();
    budget.settle(&held(&slow, &slow_grant), 0).await.unwrap();
    // 5 used + 50 reserved: 45 fit, 46 do not.
    match budget
        .reserve(&request(&windows, 46, Duration::from_secs(60)))
        .await
        .unwrap()
    {
        Reservation::Refused { state, .. } => assert_eq!(state.remaining, 45),
        other => panic!("a late settle freed tokens twice: {other:?}"),
    }
    budget.settle(&held(&live, &live_grant), 20).await.unwrap();
    budget.settle(&held(&live, &live_grant), 20).await.unwrap();
    // 5 + 20 + 20 used (a settle counts what it reports), nothing reserved.
    match budget
        .reserve(&request(&windows, 55, Duration::from_secs(60)))
        .await
        .unwrap()
    {
        Reservation::Granted { state, .. } => assert_eq!(state.remaining, 0),
        other => panic!("{other:?}"),
    }
}

/// A Redis budget and limiter, as the server opens them: one for both.
async fn redis_both() -> Arc<RedisRateLimiter> {
    let redis =
        RedisRateLimiter::connect(&redis_url(), Duration::from_secs(3)).expect("valid Redis URL");
    if let Err(e) = redis.ping().await {
        panic!("Redis is required for these tests (CONFAB_TEST_REDIS_URL): {e}");
    }
    Arc::new(redis)
}

/// `take_and_reserve` on Redis, which does both in one call (never `None`).
async fn take_and_reserve(
    both: &RedisRateLimiter,
    key: &str,
    limit: confab_core::ratelimit::Limit,
    request: &ReserveRequest,
) -> confab_core::ratelimit::TakeAndReserve {
    both.take_and_reserve(key, limit, request)
        .await
        .expect("Redis does both at once")
        .expect("take and reserve")
}

fn bucket_key() -> String {
    format!("test-both:{}", Uuid::new_v4())
}

/// The tokens of `windows` a fresh reservation of 1 finds left.
async fn room(budget: &dyn TokenBudget, windows: &[BudgetWindow]) -> u64 {
    let probe = request(windows, 1, Duration::from_secs(30));
    let reservation = budget.reserve(&probe).await.expect("reserve");
    let Reservation::Granted { state, .. } = &reservation else {
        panic!("expected a grant, got {reservation:?}")
    };
    budget
        .settle(&held(&probe, &reservation), 0)
        .await
        .expect("settle");
    state.remaining + 1
}

/// `take_and_reserve` on Redis: one script call that takes the bucket's token
/// as `acquire` does and reserves only when the token was allowed; the
/// in-process budget has no buckets of its own and says so (`None`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_take_reserves_nothing_and_an_allowed_one_reserves_as_reserve_does() {
    let both = redis_both().await;
    let limit = confab_core::ratelimit::Limit {
        burst: 2,
        per_second: 0.001,
    };
    let key = bucket_key();
    let windows = vec![window(100, 86_400, "org_day")];

    let first = request(&windows, 30, Duration::from_secs(30));
    let took = take_and_reserve(&both, &key, limit, &first).await;
    assert!(took.decision.allowed);
    assert_eq!(took.decision.remaining, 1);
    assert!(
        matches!(&took.reservation, Some(Reservation::Granted { state, .. }) if state.remaining == 70),
        "{took:?}"
    );

    // Allowed, but the reservation does not fit: the token is still taken.
    let too_big = request(&windows, 500, Duration::from_secs(30));
    let took = take_and_reserve(&both, &key, limit, &too_big).await;
    assert!(took.decision.allowed);
    assert_eq!(took.decision.remaining, 0);
    assert!(
        matches!(
            &took.reservation,
            Some(Reservation::Refused {
                kind: "org_day",
                ..
            })
        ),
        "{took:?}"
    );

    // The bucket is empty: refused, and nothing reserved.
    let refused = request(&windows, 10, Duration::from_secs(30));
    let took = take_and_reserve(&both, &key, limit, &refused).await;
    assert!(!took.decision.allowed);
    assert!(took.decision.retry_after.is_some());
    assert_eq!(took.reservation, None);
    assert_eq!(room(both.as_ref(), &windows).await, 70);
    // The bucket is the limiter's own.
    assert!(!both.acquire(&key, limit, 1).await.expect("acquire").allowed);

    let memory = MemoryTokenBudget::new();
    assert!(memory.take_and_reserve(&key, limit, &first).await.is_none());
}

/// Takes through `take_and_reserve` and through `acquire`, all at once on
/// one bucket, admit exactly its burst; every admitted take reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_and_plain_takes_together_admit_exactly_the_burst() {
    let both = redis_both().await;
    let limit = confab_core::ratelimit::Limit {
        burst: 40,
        per_second: 0.001,
    };
    let key = bucket_key();
    let windows = vec![window(1_000_000, 86_400, "org_day")];
    let n = 120;
    let barrier = Arc::new(Barrier::new(n));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (both, key, windows, barrier) =
            (both.clone(), key.clone(), windows.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            if i % 2 == 0 {
                let reserve = request(&windows, 7, Duration::from_secs(30));
                let took = take_and_reserve(&both, &key, limit, &reserve).await;
                assert_eq!(
                    took.decision.allowed,
                    took.reservation.is_some(),
                    "{took:?}"
                );
                (took.decision.allowed, took.decision.allowed)
            } else {
                let decision = both.acquire(&key, limit, 1).await.expect("acquire");
                (decision.allowed, false)
            }
        }));
    }
    let (mut admitted, mut reserved) = (0, 0u64);
    for task in tasks {
        let (allowed, with_reservation) = task.await.expect("task");
        admitted += u32::from(allowed);
        reserved += u64::from(with_reservation);
    }
    assert_eq!(admitted, limit.burst);
    assert_eq!(
        room(both.as_ref(), &windows).await,
        1_000_000 - 7 * reserved
    );
}
