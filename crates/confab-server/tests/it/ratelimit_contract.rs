//! Contract tests of `RateLimiter`, run in-process and against Redis.
//!
//! Every timing assertion is a bound computed from `Instant`s taken around
//! the calls, never a guess about how long a sleep "should" take: a bucket's
//! content at any moment is pinned between what it can have refilled during
//! the shortest and the longest window consistent with those measurements.
//! Each test uses its own key (a UUID), so tests can share one Redis.

// clippy's `allow-*-in-tests` only covers `#[test]` functions, not the helpers
// of an integration-test crate; failing loudly is what test helpers are for.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

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

/// The slow-refill tests below assume not even one token came back while
/// they ran; check rather than assume.
fn assert_no_whole_refill(start: Instant, rate: f64) {
    let elapsed = start.elapsed();
    assert_eq!(
        max_refill(elapsed, rate),
        0,
        "test took {elapsed:?}, long enough to refill a token"
    );
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
    assert_no_whole_refill(start, limit.per_second);
    for (i, d) in decisions.iter().take(5).enumerate() {
        assert!(d.allowed, "request {i} refused: {d:?}");
        assert_eq!(d.limit, 5);
        assert_eq!(d.remaining, 4 - i as u32);
        assert_eq!(d.retry_after, None);
    }
    for d in &decisions[5..] {
        assert!(!d.allowed, "{d:?}");
        assert_eq!(d.limit, 5);
        assert_eq!(d.remaining, 0);
        assert!(d.retry_after.is_some());
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
    // A large burst so the refill below never reaches the cap.
    let limit = Limit {
        burst: 100,
        per_second: 10.0,
    };
    let (first, first_before, first_after) = drain(&*limiter, &key, limit).await;
    assert!(first >= 100, "a full bucket admitted only {first}");
    // Not a guess: only the window measured around the calls matters.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (admitted, last_before, last_after) = drain(&*limiter, &key, limit).await;

    // Between the two refusals the bucket refilled for at least `shortest`
    // and at most `longest`; it held < 1 token after the first refusal and
    // < 1 token at the second. Every admitted request found >= 1 token. So
    // `rate * shortest - 1 < admitted < 1 + rate * longest`.
    let shortest = last_before - first_after;
    let longest = last_after - first_before;
    assert!(
        secs(longest) * limit.per_second + 1.0 < f64::from(limit.burst),
        "took too long ({longest:?}) to stay below the cap"
    );
    let low = (secs(shortest) * limit.per_second - TOLERANCE)
        .floor()
        .max(0.0) as u32;
    let high = (secs(longest) * limit.per_second + 1.0 + TOLERANCE).floor() as u32;
    assert!(
        (low..=high).contains(&admitted),
        "admitted {admitted} after {shortest:?}..{longest:?}, expected {low}..={high}"
    );
}

async fn reset_after_is_time_to_full_and_retry_after_time_to_next_token(kind: Limiter) {
    let limiter = limiter(kind).await;
    let key = unique_key();
    let limit = Limit {
        burst: 5,
        per_second: 2.0,
    };
    let start = Instant::now();
    let mut admitted = Vec::new();
    for _ in 0..5 {
        admitted.push(acquire(&*limiter, &key, limit).await);
    }
    let refused = acquire(&*limiter, &key, limit).await;
    let e = secs(start.elapsed());
    // The bucket started full at the first call; by the sixth it can have
    // refilled at most `2 * e` tokens, which shortens both waits by <= e.
    assert!(
        e < 0.5,
        "six calls took {e}s; the bounds below assume < 0.5 s"
    );

    let first = admitted[0];
    assert!(first.allowed);
    assert_eq!(first.remaining, 4);
    assert_eq!(first.retry_after, None);
    assert_between(
        "reset_after after one take",
        first.reset_after,
        0.5 - e,
        0.5,
    );

    let fifth = admitted[4];
    assert!(fifth.allowed, "{fifth:?}");
    assert_eq!(fifth.remaining, 0);
    assert_eq!(fifth.retry_after, None);
    assert_between("reset_after when empty", fifth.reset_after, 2.5 - e, 2.5);

    assert!(!refused.allowed, "{refused:?}");
    assert_eq!(refused.limit, 5);
    assert_eq!(refused.remaining, 0);
    let retry = refused.retry_after.expect("a refusal says when to retry");
    assert_between("retry_after", retry, 0.5 - e, 0.5);
    assert_between(
        "reset_after when refused",
        refused.reset_after,
        2.5 - e,
        2.5,
    );
}

async fn a_request_costing_several_tokens_waits_for_all_of_them(kind: Limiter) {
    let limiter = limiter(kind).await;
    let key = unique_key();
    let limit = Limit {
        burst: 5,
        per_second: 2.0,
    };
    let start = Instant::now();
    let taken = limiter.acquire(&key, limit, 3).await.expect("acquire");
    let refused = limiter.acquire(&key, limit, 3).await.expect("acquire");
    let e = secs(start.elapsed());
    assert!(e < 0.5, "two calls took {e}s");
    assert!(taken.allowed);
    assert_eq!(taken.remaining, 2);
    // 2 (+ up to 2e refilled) tokens left, 3 needed at 2/s.
    assert!(!refused.allowed, "{refused:?}");
    assert_eq!(refused.remaining, 2);
    let retry = refused.retry_after.expect("retry_after");
    assert_between("retry_after for cost 3", retry, 0.5 - e, 0.5);
    assert_between("reset_after", refused.reset_after, 1.5 - e, 1.5);
}

async fn peek_takes_no_token(kind: Limiter) {
    let limiter = limiter(kind).await;
    let key = unique_key();
    let limit = Limit {
        burst: 3,
        per_second: 0.01,
    };
    let start = Instant::now();
    for _ in 0..3 {
        let d = limiter.peek(&key, limit).await.expect("peek");
        assert!(d.allowed);
        assert_eq!(d.remaining, 3);
        assert_eq!(d.reset_after, Duration::ZERO);
        assert_eq!(d.retry_after, None);
    }
    assert_eq!(acquire(&*limiter, &key, limit).await.remaining, 2);
    let after_one = limiter.peek(&key, limit).await.expect("peek");
    assert!(after_one.allowed);
    assert_eq!(after_one.remaining, 2);
    assert!(acquire(&*limiter, &key, limit).await.allowed);
    assert!(acquire(&*limiter, &key, limit).await.allowed);
    let empty = limiter.peek(&key, limit).await.expect("peek");
    let e = secs(start.elapsed());
    assert!(!empty.allowed, "{empty:?}");
    assert_eq!(empty.remaining, 0);
    // Refilled at most 0.01 * e tokens: waits shorter by at most e.
    let retry = empty.retry_after.expect("retry_after");
    assert_between("retry_after", retry, 100.0 - e, 100.0);
    assert_between("reset_after", empty.reset_after, 300.0 - e, 300.0);
    // And peeking an empty bucket did not take anything either.
    assert_eq!(limiter.peek(&key, limit).await.expect("peek").remaining, 0);
}

async fn each_call_uses_the_limit_it_is_given(kind: Limiter) {
    let limiter = limiter(kind).await;
    let (roomy_key, tight_key) = (unique_key(), unique_key());
    let roomy = Limit {
        burst: 5,
        per_second: 0.01,
    };
    let tight = Limit {
        burst: 2,
        per_second: 0.01,
    };
    let start = Instant::now();
    let mut roomy_admitted = 0;
    let mut tight_admitted = 0;
    // Interleaved, so one key's state cannot leak into the other's.
    for _ in 0..6 {
        let r = acquire(&*limiter, &roomy_key, roomy).await;
        assert_eq!(r.limit, 5);
        roomy_admitted += u32::from(r.allowed);
        let t = acquire(&*limiter, &tight_key, tight).await;
        assert_eq!(t.limit, 2);
        tight_admitted += u32::from(t.allowed);
    }
    assert_no_whole_refill(start, 0.01);
    assert_eq!(roomy_admitted, 5);
    assert_eq!(tight_admitted, 2);
}

async fn a_smaller_burst_clamps_a_fuller_bucket(kind: Limiter) {
    let limiter = limiter(kind).await;
    let key = unique_key();
    let big = Limit {
        burst: 10,
        per_second: 0.01,
    };
    let small = Limit {
        burst: 3,
        per_second: 0.01,
    };
    let start = Instant::now();
    assert_eq!(acquire(&*limiter, &key, big).await.remaining, 9);
    // 9 stored tokens are more than the new capacity: the bucket is full at 3.
    let peeked = limiter.peek(&key, small).await.expect("peek");
    assert_eq!((peeked.limit, peeked.remaining), (3, 3));
    let taken = acquire(&*limiter, &key, small).await;
    assert!(taken.allowed);
    assert_eq!((taken.limit, taken.remaining), (3, 2));
    // The clamp was stored: going back to the large limit starts from 2.
    let back = limiter.peek(&key, big).await.expect("peek");
    assert_eq!((back.limit, back.remaining), (10, 2));
    assert_no_whole_refill(start, 0.01);
}

/// `tasks` acquires on `limiters` (round robin), all released together by a
/// barrier; returns (admitted, measured window).
async fn race(
    limiters: &[Arc<dyn RateLimiter>],
    tasks: usize,
    key: &str,
    limit: Limit,
) -> (u32, Duration) {
    let barrier = Arc::new(Barrier::new(tasks + 1));
    let mut handles = Vec::with_capacity(tasks);
    for i in 0..tasks {
        let limiter = Arc::clone(&limiters[i % limiters.len()]);
        let barrier = Arc::clone(&barrier);
        let key = key.to_owned();
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            limiter.acquire(&key, limit, 1).await
        }));
    }
    // Taken before the release: every acquire happens after this instant.
    let start = Instant::now();
    barrier.wait().await;
    let mut admitted = 0;
    for handle in handles {
        let decision = handle.await.expect("task").expect("acquire");
        admitted += u32::from(decision.allowed);
    }
    (admitted, start.elapsed())
}

async fn concurrent_acquires_never_over_admit(kind: Limiter) {
    let limiter = limiter(kind).await;
    let key = unique_key();
    let limit = Limit {
        burst: 20,
        per_second: 1.0,
    };
    let (admitted, elapsed) = race(&[limiter], 200, &key, limit).await;
    let high = 20 + max_refill(elapsed, limit.per_second);
    assert!(
        (20..=high).contains(&admitted),
        "200 racing acquires admitted {admitted} in {elapsed:?}, expected 20..={high}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_redis_limiters_sharing_a_key_never_over_admit() {
    // Two limiters = two connections, as two confab processes would have.
    let limiters: [Arc<dyn RateLimiter>; 2] = [redis_limiter().await, redis_limiter().await];
    let key = unique_key();
    let limit = Limit {
        burst: 20,
        per_second: 1.0,
    };
    let (admitted, elapsed) = race(&limiters, 200, &key, limit).await;
    let high = 20 + max_refill(elapsed, limit.per_second);
    assert!(
        (20..=high).contains(&admitted),
        "2 x 100 racing acquires admitted {admitted} in {elapsed:?}, expected 20..={high}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_is_unavailable_within_the_timeout() {
    // Nothing listens on port 1; construction must still succeed.
    let limiter = RedisRateLimiter::connect("redis://127.0.0.1:1", Duration::from_millis(250))
        .expect("a Redis that is down must not fail construction");
    let limit = Limit {
        burst: 5,
        per_second: 1.0,
    };
    for _ in 0..3 {
        let start = Instant::now();
        let acquired = limiter.acquire("k", limit, 1).await;
        let peeked = limiter.peek("k", limit).await;
        let pinged = limiter.ping().await;
        let elapsed = start.elapsed();
        assert!(
            matches!(acquired, Err(RateLimitError::Unavailable(_))),
            "{acquired:?}"
        );
        assert!(
            matches!(peeked, Err(RateLimitError::Unavailable(_))),
            "{peeked:?}"
        );
        assert!(
            matches!(pinged, Err(RateLimitError::Unavailable(_))),
            "{pinged:?}"
        );
        assert!(
            elapsed < Duration::from_secs(2),
            "three calls took {elapsed:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_redis_times_out_instead_of_hanging() {
    // Accepts connections and never answers: the connection succeeds, the
    // handshake and every command must give up after the timeout.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let limiter = RedisRateLimiter::connect(
        &format!("redis://127.0.0.1:{port}"),
        Duration::from_millis(250),
    )
    .expect("connect");
    let limit = Limit {
        burst: 5,
        per_second: 1.0,
    };
    for _ in 0..2 {
        let start = Instant::now();
        let result = limiter.acquire("k", limit, 1).await;
        let elapsed = start.elapsed();
        assert!(
            matches!(result, Err(RateLimitError::Unavailable(_))),
            "{result:?}"
        );
        assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    }
    silent.abort();
}

#[test]
fn an_invalid_redis_url_is_an_error() {
    for url in ["not a url", "http://127.0.0.1:6379", ""] {
        assert!(
            RedisRateLimiter::connect(url, CALL_TIMEOUT).is_err(),
            "{url:?} was accepted"
        );
    }
}

/// The test Redis's `host:port`, and a URL for the same Redis reached
/// through `port` instead.
fn redis_via(port: u16) -> (String, String) {
    let mut url = reqwest::Url::parse(&redis_url()).expect("CONFAB_TEST_REDIS_URL is a URL");
    let upstream = format!(
        "{}:{}",
        url.host_str().expect("Redis URL has a host"),
        url.port().unwrap_or(6379)
    );
    url.set_port(Some(port)).expect("set port");
    (upstream, url.to_string())
}

/// A TCP forwarder to `upstream` on `port`; aborting the task closes the
/// listener and every forwarded connection, like a Redis going down.
async fn forward(port: u16, upstream: String) -> JoinHandle<()> {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind proxy port");
    tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((mut inbound, _)) = listener.accept().await {
            while connections.try_join_next().is_some() {}
            let upstream = upstream.clone();
            connections.spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    })
}

/// Call `acquire` until `want(result)` holds; fail after `deadline`.
async fn poll_until(
    limiter: &RedisRateLimiter,
    key: &str,
    want: impl Fn(&Result<Decision, RateLimitError>) -> bool,
    what: &str,
) {
    let limit = Limit {
        burst: 1000,
        per_second: 1000.0,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let result = limiter.acquire(key, limit, 1).await;
        if want(&result) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {result:?} after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_limiter_reconnects_by_itself_when_redis_comes_back() {
    // A free port: bind, note, release.
    let port = {
        let probe = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        probe.local_addr().expect("addr").port()
    };
    let (upstream, url) = redis_via(port);
    let limiter = RedisRateLimiter::connect(&url, Duration::from_millis(250)).expect("connect");
    let key = unique_key();

    // Down at start-up.
    let first = limiter
        .acquire(
            &key,
            Limit {
                burst: 1,
                per_second: 1.0,
            },
            1,
        )
        .await;
    assert!(
        matches!(first, Err(RateLimitError::Unavailable(_))),
        "{first:?}"
    );

    // Up: works without a new limiter.
    let proxy = forward(port, upstream.clone()).await;
    poll_until(&limiter, &key, |r| r.is_ok(), "after Redis came up").await;

    // Down again (connections cut), then back.
    proxy.abort();
    let _ = proxy.await;
    poll_until(&limiter, &key, |r| r.is_err(), "after Redis went down").await;
    let proxy = forward(port, upstream).await;
    poll_until(&limiter, &key, |r| r.is_ok(), "after Redis came back").await;
    proxy.abort();
}

/// Send one inline command to the test Redis (no auth support: the test
/// Redis has none) and return its first reply line.
async fn raw_redis_command(command: &str) -> String {
    let (upstream, _) = redis_via(0);
    let mut stream = TcpStream::connect(upstream)
        .await
        .expect("connect to Redis");
    stream
        .write_all(format!("{command}\r\n").as_bytes())
        .await
        .expect("write");
    let mut reply = vec![0; 256];
    let n = stream.read(&mut reply).await.expect("read");
    String::from_utf8_lossy(&reply[..n]).trim_end().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_script_is_reloaded_after_redis_forgets_it() {
    let limiter = redis_limiter().await;
    let key = unique_key();
    let limit = Limit {
        burst: 3,
        per_second: 0.01,
    };
    assert_eq!(acquire(&*limiter, &key, limit).await.remaining, 2);
    // What a Redis restart does to the script cache (the other tests'
    // limiters reload it too; that is the behaviour under test).
    assert_eq!(raw_redis_command("SCRIPT FLUSH").await, "+OK");
    let after = acquire(&*limiter, &key, limit).await;
    assert!(after.allowed);
    assert_eq!(after.remaining, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keys_are_namespaced_and_expire_when_full() {
    let limiter = redis_limiter().await;
    let key = unique_key();
    let limit = Limit {
        burst: 2,
        per_second: 1.0,
    };
    acquire(&*limiter, &key, limit).await;
    // One token short at 1/s: full after 1 s, plus the script's 1 s margin.
    let ttl = raw_redis_command(&format!("PTTL confab:rl:{key}")).await;
    let ttl: i64 = ttl.trim_start_matches(':').parse().expect("integer reply");
    assert!((1000..=2000).contains(&ttl), "PTTL {ttl}");
    // A peek writes nothing, so an unknown key stays unknown.
    let unknown = unique_key();
    limiter.peek(&unknown, limit).await.expect("peek");
    assert_eq!(
        raw_redis_command(&format!("EXISTS confab:rl:{unknown}")).await,
        ":0"
    );
}

/// A forwarder to the test Redis that counts the script calls sent through
/// it and, while its gate is closed, holds Redis's replies (the commands
/// still reach Redis): a script call stays in flight for as long as a test
/// needs. A call is an `EVALSHA`; one that Redis answers `NOSCRIPT` (another
/// test flushed the script cache) is sent again after a `SCRIPT LOAD`, so
/// each `LOAD` takes one `EVALSHA` off the count.
struct GatedRedis {
    url: String,
    evalshas: Arc<std::sync::atomic::AtomicI64>,
    gate: tokio::sync::watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl GatedRedis {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (upstream, url) = redis_via(port);
        let evalshas = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let (gate, open) = tokio::sync::watch::channel(true);
        let counter = evalshas.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(upstream.clone()).await else {
                    continue;
                };
                let (mut in_read, mut in_write) = inbound.into_split();
                let (mut out_read, mut out_write) = outbound.into_split();
                let counter = counter.clone();
                connections.spawn(async move {
                    // The last bytes of the previous read, so a word split
                    // across two reads is still counted, once: only matches
                    // ending in the new bytes count. Counted before they are
                    // sent on: a test that has its answer reads a count
                    // that includes its command.
                    let mut tail: Vec<u8> = Vec::new();
                    let mut buf = vec![0; 64 * 1024];
                    while let Ok(n) = in_read.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        let old = tail.len();
                        tail.extend_from_slice(&buf[..n]);
                        let count = |word: &[u8]| {
                            tail.windows(word.len())
                                .enumerate()
                                .filter(|(at, w)| at + word.len() > old && *w == word)
                                .count()
                        };
                        let calls = count(b"EVALSHA") as i64 - count(b"\r\nLOAD\r\n") as i64;
                        counter.fetch_add(calls, std::sync::atomic::Ordering::SeqCst);
                        let keep = tail.len().min(8);
                        tail.drain(..tail.len() - keep);
                        if out_write.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
                let mut open = open.clone();
                connections.spawn(async move {
                    let mut buf = vec![0; 64 * 1024];
                    while let Ok(n) = out_read.read(&mut buf).await {
                        if n == 0 || open.wait_for(|open| *open).await.is_err() {
                            return;
                        }
                        if in_write.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self {
            url,
            evalshas,
            gate,
            task,
        }
    }

    fn evalshas(&self) -> i64 {
        self.evalshas.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Wait until `n` `EVALSHA`s have gone through; fail after 5 s.
    async fn until_evalshas(&self, n: i64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.evalshas() < n {
            assert!(
                Instant::now() < deadline,
                "{} EVALSHA sent, waited for {n}",
                self.evalshas()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for GatedRedis {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A limiter through `proxy`, connected and with its script loaded.
async fn gated_limiter(proxy: &GatedRedis, key: &str, limit: Limit) -> Arc<RedisRateLimiter> {
    let limiter =
        Arc::new(RedisRateLimiter::connect(&proxy.url, CALL_TIMEOUT).expect("valid Redis URL"));
    let first = limiter.acquire(key, limit, 1).await.expect("first acquire");
    assert_eq!(first.remaining, limit.burst - 1);
    limiter
}

/// One acquire of `key` in a task of its own.
fn spawn_acquire(
    limiter: &Arc<RedisRateLimiter>,
    key: &str,
    limit: Limit,
) -> JoinHandle<Result<Decision, RateLimitError>> {
    let (limiter, key) = (limiter.clone(), key.to_owned());
    tokio::spawn(async move { limiter.acquire(&key, limit, 1).await })
}

/// [`RedisRateLimiter::LANES`] takes of `key`, each in a task of its own,
/// sent while the proxy holds every answer: returns once all have gone out.
async fn fill_the_lanes(
    proxy: &GatedRedis,
    limiter: &Arc<RedisRateLimiter>,
    key: &str,
    limit: Limit,
) -> Vec<JoinHandle<Result<Decision, RateLimitError>>> {
    let before = proxy.evalshas();
    proxy.gate.send_replace(false);
    let in_flight: Vec<_> = (0..RedisRateLimiter::LANES)
        .map(|_| spawn_acquire(limiter, key, limit))
        .collect();
    // Each went out without waiting for the others' answers.
    proxy
        .until_evalshas(before + RedisRateLimiter::LANES as i64)
        .await;
    in_flight
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takes_go_at_once_while_a_lane_is_free_then_queue_and_go_as_one_call_each_with_its_own_answer()
 {
    let proxy = GatedRedis::start().await;
    let key = unique_key();
    let limit = Limit {
        burst: 100,
        per_second: 0.001,
    };
    let limiter = gated_limiter(&proxy, &key, limit).await;
    let lanes = RedisRateLimiter::LANES as u32;
    let before = proxy.evalshas();

    // Every lane's call in flight, held at the proxy; 50 more takes of the
    // key meanwhile.
    let in_flight = fill_the_lanes(&proxy, &limiter, &key, limit).await;
    // Polled here, not spawned: once the first poll returns, every take
    // has queued (none waits for a worker to get to it).
    let mut queued = Box::pin(futures::future::join_all(
        (0..50).map(|_| limiter.acquire(&key, limit, 1)),
    ));
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut queued)
            .await
            .is_err(),
        "queued takes were answered while every call before them was held"
    );
    assert_eq!(
        proxy.evalshas(),
        before + i64::from(lanes),
        "takes of a key whose lanes are all busy must wait for one"
    );
    proxy.gate.send_replace(true);

    let mut first = Vec::new();
    for take in in_flight {
        let decision = take.await.expect("task").expect("acquire");
        assert!(decision.allowed, "{decision:?}");
        first.push(decision.remaining);
    }
    first.sort_unstable();
    assert_eq!(first, (99 - lanes..=98).collect::<Vec<u32>>());
    let mut remaining = Vec::new();
    for take in queued.await {
        let decision = take.expect("acquire");
        assert!(decision.allowed, "{decision:?}");
        remaining.push(decision.remaining);
    }
    remaining.sort_unstable();
    // Applied one after the other: each take sees the bucket the one
    // before it left.
    assert_eq!(remaining, (49 - lanes..=98 - lanes).collect::<Vec<u32>>());
    assert_eq!(
        proxy.evalshas(),
        before + i64::from(lanes) + 1,
        "the 50 queued takes must go as one script call"
    );
    // What one call each would have left.
    assert_eq!(acquire(&*limiter, &key, limit).await.remaining, 48 - lanes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_leaving_mid_call_does_not_strand_the_takes_queued_behind_it() {
    let proxy = GatedRedis::start().await;
    let key = unique_key();
    let limit = Limit {
        burst: 10,
        per_second: 0.001,
    };
    let limiter = gated_limiter(&proxy, &key, limit).await;
    let lanes = RedisRateLimiter::LANES as u32;

    let mut in_flight = fill_the_lanes(&proxy, &limiter, &key, limit).await;
    // Polled here, so it has queued behind the calls in flight.
    let mut queued = limiter.acquire(&key, limit, 1);
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut queued)
            .await
            .is_err()
    );
    // The client of a request whose take is in flight goes away.
    let leaving = in_flight.remove(0);
    leaving.abort();
    let _ = leaving.await;
    proxy.gate.send_replace(true);

    let start = Instant::now();
    let decision = queued.await.expect("the queued take is answered");
    assert!(decision.allowed);
    // The calls in flight reached Redis, the leaving one's too, so their
    // tokens are gone.
    assert_eq!(decision.remaining, 8 - lanes);
    assert!(
        start.elapsed() < CALL_TIMEOUT / 2,
        "answered after {:?}",
        start.elapsed()
    );
}
