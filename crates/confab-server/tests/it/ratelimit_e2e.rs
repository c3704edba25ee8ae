//! Rate limiting through HTTP (SPEC §4): exact admission under concurrency on
//! one instance and across two processes sharing Redis, the 429 contract,
//! per-org overrides, and Redis outages under both failure policies.
//! Each test that uses Redis gets a private `redis-server` (it may be
//! stopped mid-test, and the demo org ids are the same in every test).

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::per_limiter;
use crate::support::app::{ACME, ALICE};
use crate::support::process::{Confab, PrivateRedis};
use crate::support::{As, Db, Limiter, TestApp, TestDb, spawn_app_with};

per_limiter!(
    concurrent_requests_admit_exactly_burst,
    refused_requests_get_429_with_retry_after_and_the_spec_body,
    an_org_override_applies_to_that_org_only,
);

/// An app with the given limit on `kind`'s limiter; keeps the private Redis alive.
async fn app_with_limit(
    kind: Limiter,
    burst: &str,
    per_second: &str,
) -> (TestApp, Option<PrivateRedis>) {
    let redis = (kind == Limiter::Redis).then(PrivateRedis::start);
    let url = redis.as_ref().map(|r| r.url());
    // A generous Redis timeout: these tests are about exactness, and a call
    // timing out on a loaded test machine would fail open (and be caught).
    let mut env = vec![
        ("RATE_LIMIT_BURST", burst),
        ("RATE_LIMIT_PER_SECOND", per_second),
        ("REDIS_TIMEOUT_MS", "3000"),
    ];
    if let Some(url) = &url {
        env.push(("REDIS_URL", url.as_str()));
    }
    (spawn_app_with(Db::Sqlite, &env).await, redis)
}

/// Fire `n` concurrent GET /chats split over `bases`; (admitted, refused
/// responses, seconds from the first send to the last answer).
async fn burst_of_requests(
    bases: &[String],
    n: usize,
) -> (usize, Vec<(reqwest::header::HeaderMap, Value)>, f64) {
    let client = reqwest::Client::new();
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = Vec::new();
    for i in 0..n {
        let req = client
            .get(format!("{}/chats", bases[i % bases.len()]))
            .header("x-org-id", ACME)
            .header("x-user-id", ALICE);
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let res = req.send().await.expect("request");
            let status = res.status().as_u16();
            let headers = res.headers().clone();
            let body: Value = res.json().await.unwrap_or(Value::Null);
            (status, headers, body)
        }));
    }
    let started = Instant::now();
    let mut admitted = 0;
    let mut refused = Vec::new();
    for t in tasks {
        let (status, headers, body) = t.await.unwrap();
        match status {
            200 => {
                assert!(
                    headers.contains_key("x-ratelimit-remaining"),
                    "admitted without a token (limiter error, failing open?)"
                );
                admitted += 1
            }
            429 => refused.push((headers, body)),
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    (admitted, refused, started.elapsed().as_secs_f64())
}

fn assert_spec_429(headers: &reqwest::header::HeaderMap, body: &Value, limit: u64) {
    assert_eq!(body["error"], "Too Many Requests");
    assert_eq!(
        body["message"],
        "Rate limit exceeded. Please try again later."
    );
    assert_eq!(body["limit"], limit);
    assert_eq!(body["remaining"], 0);
    assert!(chrono::DateTime::parse_from_rfc3339(body["resetAt"].as_str().unwrap()).is_ok());
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    assert_eq!(headers["x-ratelimit-limit"], limit.to_string().as_str());
    assert_eq!(headers["x-ratelimit-remaining"], "0");
    assert!(
        chrono::DateTime::parse_from_rfc3339(headers["x-ratelimit-reset"].to_str().unwrap())
            .is_ok()
    );
}

async fn concurrent_requests_admit_exactly_burst(kind: Limiter) {
    let (app, _redis) = app_with_limit(kind, "20", "1").await;
    let (admitted, refused, elapsed) =
        burst_of_requests(std::slice::from_ref(&app.base), 200).await;
    let max = 20 + (elapsed * 1.0).floor() as usize;
    assert!(
        (20..=max).contains(&admitted),
        "admitted {admitted}, allowed 20..={max} in {elapsed:.2}s"
    );
    assert_eq!(admitted + refused.len(), 200);
    for (headers, body) in &refused {
        assert_spec_429(headers, body, 20);
    }
}

async fn refused_requests_get_429_with_retry_after_and_the_spec_body(kind: Limiter) {
    let (app, _redis) = app_with_limit(kind, "3", "0.5").await;
    for expected in ["2", "1", "0"] {
        let res = app.get("/chats", &As::alice()).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["x-ratelimit-remaining"], expected);
        assert_eq!(res.headers()["x-ratelimit-limit"], "3");
    }
    let res = app.get("/chats", &As::alice()).await;
    assert_eq!(res.status(), 429);
    let headers = res.headers().clone();
    let body: Value = res.json().await.unwrap();
    assert_spec_429(&headers, &body, 3);
    // One token takes 2 s at 0.5/s; a little of it has passed already.
    assert_eq!(headers["retry-after"], "2");
    // The bucket is full again about 6 s from now.
    let reset =
        chrono::DateTime::parse_from_rfc3339(headers["x-ratelimit-reset"].to_str().unwrap())
            .unwrap();
    let to_full = (reset.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_milliseconds();
    assert!((4_000..=6_100).contains(&to_full), "{to_full} ms");
    // Unauthenticated routes take no token and carry no headers.
    let res = app.get("/health", &As::alice()).await;
    assert_eq!(res.status(), 200);
    assert!(!res.headers().contains_key("x-ratelimit-remaining"));
}

async fn an_org_override_applies_to_that_org_only(kind: Limiter) {
    let (app, _redis) = app_with_limit(kind, "50", "0.001").await;
    app.state
        .store
        .set_org_rate_limit(
            ACME.parse().unwrap(),
            Some(confab_core::model::RateLimitOverride::new(2, 0.001).unwrap()),
        )
        .await
        .unwrap();
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let res = app.get("/chats", &As::alice()).await;
        statuses.push(res.status().as_u16());
        if res.status() == 200 {
            assert_eq!(res.headers()["x-ratelimit-limit"], "2");
        }
    }
    assert_eq!(statuses, [200, 200, 429]);
    // Bob shares Acme's bucket; Charlie's org has the default.
    assert_eq!(app.get("/chats", &As::bob()).await.status(), 429);
    let res = app.get("/chats", &As::charlie()).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-ratelimit-limit"], "50");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_sharing_redis_admit_exactly_burst_together() {
    let db = TestDb::new(Db::Postgres).await;
    let redis = PrivateRedis::start();
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("REDIS_URL", &redis.url()),
        ("RATE_LIMIT_BURST", "20"),
        ("RATE_LIMIT_PER_SECOND", "1"),
        ("REDIS_TIMEOUT_MS", "3000"),
        ("LOG_LEVEL", "warn"),
    ];
    let a = Confab::start(&env).await;
    let b = Confab::start(&env).await;
    let (admitted, refused, elapsed) =
        burst_of_requests(&[a.base.clone(), b.base.clone()], 60).await;
    let max = 20 + (elapsed * 1.0).floor() as usize;
    assert!(
        (20..=max).contains(&admitted),
        "admitted {admitted}, allowed 20..={max} in {elapsed:.2}s"
    );
    assert_eq!(refused.len(), 60 - admitted);
    for (headers, body) in &refused {
        assert_spec_429(headers, body, 20);
    }
}

fn counter(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn poll<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < limit, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const ERRORS: &str = "ratelimit_decisions_total{backend=\"redis\",outcome=\"error\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_open_keeps_serving_and_recovers() {
    let mut redis = PrivateRedis::start();
    let app = spawn_app_with(
        Db::Sqlite,
        &[
            ("REDIS_URL", &redis.url()),
            ("RATE_LIMIT_FAIL_OPEN", "true"),
        ],
    )
    .await;
    let (status, health) = app.get_json("/health", &As::Nobody).await;
    assert_eq!(
        (status, health["services"]["redis"].as_str()),
        (200, Some("connected"))
    );
    assert!(
        app.get("/chats", &As::alice())
            .await
            .headers()
            .contains_key("x-ratelimit-remaining")
    );

    redis.stop();
    let started = Instant::now();
    for _ in 0..5 {
        let res = app.get("/chats", &As::alice()).await;
        assert_eq!(res.status(), 200, "fail-open keeps serving");
        assert!(
            !res.headers().contains_key("x-ratelimit-remaining"),
            "no token was taken"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "requests never hang on a dead Redis"
    );
    let metrics = app.get("/metrics", &As::Nobody).await.text().await.unwrap();
    assert!(counter(&metrics, ERRORS) >= 5.0, "errors counted");
    poll("health degraded", Duration::from_secs(5), || async {
        let (status, body) = app.get_json("/health", &As::Nobody).await;
        status == 503 && body["status"] == "degraded" && body["services"]["redis"] == "disconnected"
    })
    .await;

    redis.restart();
    poll("Redis used again", Duration::from_secs(10), || async {
        app.get("/chats", &As::alice())
            .await
            .headers()
            .contains_key("x-ratelimit-remaining")
    })
    .await;
    let (status, _) = app.get_json("/health", &As::Nobody).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_closed_with_quick_503s_and_recovers() {
    let mut redis = PrivateRedis::start();
    let app = spawn_app_with(
        Db::Sqlite,
        &[
            ("REDIS_URL", &redis.url()),
            ("RATE_LIMIT_FAIL_OPEN", "false"),
        ],
    )
    .await;
    assert_eq!(app.get("/chats", &As::alice()).await.status(), 200);
    redis.stop();
    for _ in 0..3 {
        let started = Instant::now();
        let res = app.get("/chats", &As::alice()).await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "answered quickly"
        );
        assert_eq!(res.headers()["retry-after"], "1");
        crate::support::assert_error(res, 503, "Service Unavailable").await;
    }
    // Unprotected routes still answer.
    assert_eq!(app.get("/", &As::Nobody).await.status(), 200);
    redis.restart();
    poll(
        "requests admitted again",
        Duration::from_secs(10),
        || async { app.get("/chats", &As::alice()).await.status() == 200 },
    )
    .await;
}
