//! The shared token bucket: one Lua script per request on a Redis server, so
//! every instance of confab pointed at that Redis enforces one budget per key.
//!
//! Availability rules, because the server fails open (or closed) on our errors
//! and must never stall a request on us:
//! - construction does no I/O, so a Redis that is down at start-up does not
//!   stop the service; the connection is made on first use;
//! - every call gives up after `timeout` with `RateLimitError::Unavailable`;
//! - a broken connection is dropped and the next call reconnects, so the
//!   limiter heals by itself when Redis comes back.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use confab_core::ratelimit::{
    BudgetState, Decision, Held, Limit, RateLimitError, RateLimiter, Reservation, ReserveRequest,
    TokenBudget,
};
use redis::aio::MultiplexedConnection;
use redis::io::tcp::TcpSettings;
use redis::{AsyncConnectionConfig, Client, IntoConnectionInfo, RedisResult, Script};

use crate::bucket;

/// Namespace of our keys, so a Redis shared with other software (or other
/// confab features) cannot collide with the buckets.
pub const KEY_PREFIX: &str = "confab:rl:";

/// The script; see the file for its contract.
const TOKEN_BUCKET_LUA: &str = include_str!("lua/token_bucket.lua");
const TOKEN_BUDGET_LUA: &str = include_str!("lua/token_budget.lua");
/// Namespace of the token-budget windows.
pub const BUDGET_PREFIX: &str = "confab:tb:";

/// A dead peer (host gone, cable pulled) leaves no RST: without this the
/// kernel keeps retransmitting for ~15 minutes and every request in between
/// times out on a connection we never replace. With `TCP_USER_TIMEOUT`
/// unacknowledged data fails the socket after this long, the connection
/// reports an error and the next call reconnects. A stalled but alive Redis
/// still acknowledges at the TCP level, so this does not fire for slowness.
#[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(5);

/// Requests queued on the one multiplexed connection before callers wait;
/// the library default (50) is small for a server where every request
/// passes through here.
const PIPELINE_BUFFER: usize = 1024;

/// Minimum interval between two warnings, so an outage at thousands of
/// requests per second logs once a second rather than flooding the log (the
/// server counts every failure in a metric anyway).
const WARN_INTERVAL: Duration = Duration::from_secs(1);

/// Token buckets in Redis, one hash per key (`confab:rl:<key>`).
///
/// Each acquire is one `EVALSHA` of a script that reads, refills (with the
/// Redis server's `TIME`, so instances with skewed clocks agree), takes and
/// writes the bucket; Redis runs scripts one at a time, so the step is atomic
/// across all processes sharing the server. `redis::Script` loads the script
/// again when the server answers `NOSCRIPT` (after a restart or
/// `SCRIPT FLUSH`).
///
/// We keep one multiplexed connection, opened lazily and replaced after it
/// breaks, instead of `redis::aio::ConnectionManager`: the manager only
/// reconnects after I/O errors, so a connection attempt that fails any other
/// way (an `AUTH` refused during a Redis restart, say) would stay failed for
/// the life of the process. Here a failed attempt leaves nothing behind and
/// the next call simply tries again.
pub struct RedisRateLimiter {
    client: Client,
    config: AsyncConnectionConfig,
    timeout: Duration,
    script: Script,
    budget_script: Script,
    /// The live connection, if any. A std lock: it is held only to clone or
    /// swap the handle, never across an `.await`.
    current: RwLock<Option<Current>>,
    /// Serialises connection attempts, so an outage does not turn every
    /// waiting request into its own connect.
    connecting: tokio::sync::Mutex<()>,
    generations: AtomicU64,
    warnings: WarnThrottle,
}

/// A connection and a number identifying it, so that a caller that saw it
/// fail only discards that one and not a fresh replacement.
#[derive(Clone)]
struct Current {
    generation: u64,
    conn: MultiplexedConnection,
}

impl RedisRateLimiter {
    /// A limiter for the Redis at `url` whose calls each give up after
    /// `timeout`.
    ///
    /// Only the URL is checked here (an invalid one is an error); no
    /// connection is made, so a Redis that is down now does not fail start-up.
    /// The error message never contains the URL, which may hold a password.
    pub fn connect(url: &str, timeout: Duration) -> Result<Self, RateLimitError> {
        let info = url
            .into_connection_info()
            .map_err(|e| RateLimitError::Unavailable(format!("invalid Redis URL: {e}")))?;
        let tcp = tcp_settings(info.tcp_settings().clone());
        let client = Client::open(info.set_tcp_settings(tcp))
            .map_err(|e| RateLimitError::Unavailable(format!("invalid Redis URL: {e}")))?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_pipeline_buffer_size(PIPELINE_BUFFER);
        Ok(Self {
            client,
            config,
            timeout,
            script: Script::new(TOKEN_BUCKET_LUA),
            budget_script: Script::new(TOKEN_BUDGET_LUA),
            current: RwLock::new(None),
            connecting: tokio::sync::Mutex::new(()),
            generations: AtomicU64::new(0),
            warnings: WarnThrottle::new(),
        })
    }

    /// The client, for connections of their own (a blocking read, pub/sub).
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// The per-call time budget given to [`RedisRateLimiter::connect`].
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn live(&self) -> Option<Current> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The live connection, connecting first if there is none.
    async fn connection(&self) -> RedisResult<Current> {
        if let Some(current) = self.live() {
            return Ok(current);
        }
        let _attempt = self.connecting.lock().await;
        // Whoever held the lock before us may have connected already.
        if let Some(current) = self.live() {
            return Ok(current);
        }
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        let current = Current {
            generation: self.generations.fetch_add(1, Ordering::Relaxed),
            conn,
        };
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Some(current.clone());
        Ok(current)
    }

    /// Forget connection `generation` so the next call reconnects; a newer
    /// connection installed meanwhile is left alone.
    fn discard(&self, generation: u64) {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        if current.as_ref().is_some_and(|c| c.generation == generation) {
            *current = None;
        }
    }

    /// Run `op` on a connection within the time budget, mapping every
    /// failure to `Unavailable`.
    pub(crate) async fn run<T, F, Fut>(
        &self,
        what: &'static str,
        op: F,
    ) -> Result<T, RateLimitError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let attempt = self.attempt(op);
        self.answer(what, tokio::time::timeout(self.timeout, attempt).await)
    }

    /// [`RedisRateLimiter::run`] for a step that may safely run twice (a
    /// read, a `SET`, a `PUBLISH`): when the connection turns out dead (the
    /// first call after a Redis restart), it is tried once more on a fresh
    /// one instead of failing its caller.
    pub(crate) async fn run_idempotent<T, F, Fut>(
        &self,
        what: &'static str,
        op: F,
    ) -> Result<T, RateLimitError>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let attempts = async {
            match self.attempt(&op).await {
                Err(e) if e.is_unrecoverable_error() => self.attempt(&op).await,
                other => other,
            }
        };
        self.answer(what, tokio::time::timeout(self.timeout, attempts).await)
    }

    async fn attempt<T, F, Fut>(&self, op: F) -> RedisResult<T>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let current = self.connection().await?;
        let result = op(current.conn).await;
        if let Err(e) = &result {
            // Dropped connections, protocol errors: this connection is
            // done. Timeouts and script errors leave it in place — a slow
            // Redis is not helped by reconnecting to it.
            if e.is_unrecoverable_error() {
                self.discard(current.generation);
            }
        }
        result
    }

    fn answer<T>(
        &self,
        what: &'static str,
        outcome: Result<RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, RateLimitError> {
        match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                self.warnings.warn(what, &e);
                Err(RateLimitError::Unavailable(e.to_string()))
            }
            Err(_elapsed) => {
                let message = format!("no answer from Redis within {:?}", self.timeout);
                self.warnings.warn(what, &message);
                Err(RateLimitError::Unavailable(message))
            }
        }
    }

    /// One script step; `cost` 0 is a peek.
    async fn step(&self, key: &str, limit: Limit, cost: u32) -> Result<Decision, RateLimitError> {
        let what = if cost == 0 { "peek" } else { "acquire" };
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(format!("{KEY_PREFIX}{key}"))
            .arg(limit.burst)
            .arg(bucket::rate(limit))
            .arg(cost)
            .arg(bucket::epsilon(limit))
            .arg(u64::try_from(bucket::MAX_WAIT.as_millis()).unwrap_or(u64::MAX));
        let (allowed, tokens): (i64, String) = self
            .run(what, |mut conn| async move {
                invocation.invoke_async(&mut conn).await
            })
            .await?;
        let Ok(tokens) = tokens.parse::<f64>() else {
            let message = format!("unexpected token count from Redis: {tokens:?}");
            self.warnings.warn(what, &message);
            return Err(RateLimitError::Unavailable(message));
        };
        Ok(bucket::decision(limit, cost, allowed == 1, tokens))
    }
}

impl std::fmt::Debug for RedisRateLimiter {
    // By hand: the client's connection info could include the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRateLimiter")
            .field("timeout", &self.timeout)
            .field("connected", &self.live().is_some())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl RateLimiter for RedisRateLimiter {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn acquire(
        &self,
        key: &str,
        limit: Limit,
        cost: u32,
    ) -> Result<Decision, RateLimitError> {
        self.step(key, limit, cost).await
    }

    async fn peek(&self, key: &str, limit: Limit) -> Result<Decision, RateLimitError> {
        self.step(key, limit, 0).await
    }

    async fn ping(&self) -> Result<(), RateLimitError> {
        self.run("ping", |mut conn| async move {
            redis::cmd("PING").query_async::<()>(&mut conn).await
        })
        .await
    }
}

#[async_trait]
impl TokenBudget for RedisRateLimiter {
    async fn reserve(&self, request: &ReserveRequest) -> Result<Reservation, RateLimitError> {
        let mut invocation = self.budget_script.prepare_invoke();
        invocation
            .arg("reserve")
            .arg(request.need)
            .arg(&request.id)
            .arg(u64::try_from(request.ttl.as_millis()).unwrap_or(u64::MAX));
        for window in &request.windows {
            invocation
                .key(format!("{BUDGET_PREFIX}{}", window.key))
                .arg(window.limit)
                .arg(window.window_secs);
        }
        let reply: Vec<i64> = self
            .run("reserve tokens", |mut conn| async move {
                invocation.invoke_async(&mut conn).await
            })
            .await?;
        let n = |i: usize| reply.get(i).copied().map(|v| u64::try_from(v).unwrap_or(0));
        let bad = || RateLimitError::Unavailable("unexpected token-budget reply from Redis".into());
        let state = |at: usize| -> Option<BudgetState> {
            Some(BudgetState {
                limit: n(at)?,
                remaining: n(at + 1)?,
                reset_after: Duration::from_millis(n(at + 2)?),
            })
        };
        match reply.first() {
            Some(1) => Ok(Reservation::Granted {
                state: state(1).ok_or_else(bad)?,
                windows: reply
                    .iter()
                    .skip(4)
                    .map(|v| u64::try_from(*v).unwrap_or(0))
                    .collect(),
            }),
            Some(0) => {
                let refused = n(1)
                    .and_then(|i| usize::try_from(i).ok())
                    .and_then(|i| request.windows.get(i.checked_sub(1)?))
                    .ok_or_else(bad)?;
                Ok(Reservation::Refused {
                    kind: refused.kind,
                    state: state(2).ok_or_else(bad)?,
                })
            }
            _ => Err(bad()),
        }
    }

    async fn settle(&self, held: &Held, actual: u64) -> Result<(), RateLimitError> {
        let mut invocation = self.budget_script.prepare_invoke();
        invocation.arg("settle").arg(actual).arg(&held.id);
        for (key, idx, window_secs) in &held.windows {
            invocation
                .key(format!("{BUDGET_PREFIX}{key}"))
                .arg(*idx)
                .arg(*window_secs);
        }
        let _: i64 = self
            .run("settle tokens", |mut conn| async move {
                invocation.invoke_async(&mut conn).await
            })
            .await?;
        Ok(())
    }
}

/// Nagle's algorithm delays small writes until earlier ones are acknowledged;
/// with many requests pipelined on one connection that adds up to a delayed-ACK
/// interval (40 ms) of latency, so it is off.
fn tcp_settings(base: TcpSettings) -> TcpSettings {
    let settings = base.set_nodelay(true);
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
    let settings = settings.set_user_timeout(TCP_USER_TIMEOUT);
    settings
}

/// At most one warning per `WARN_INTERVAL`, carrying how many were skipped.
struct WarnThrottle {
    origin: Instant,
    /// Milliseconds since `origin` before which we stay quiet.
    quiet_until_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl WarnThrottle {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            quiet_until_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    fn warn(&self, operation: &'static str, error: &dyn std::fmt::Display) {
        let now_ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        let quiet_until = self.quiet_until_ms.load(Ordering::Relaxed);
        let next =
            now_ms.saturating_add(u64::try_from(WARN_INTERVAL.as_millis()).unwrap_or(u64::MAX));
        if now_ms < quiet_until
            || self
                .quiet_until_ms
                .compare_exchange(quiet_until, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        // Neither the key (an org id) nor the URL (may hold a password).
        tracing::warn!(
            operation,
            error = %error,
            suppressed,
            "Redis call failed"
        );
    }
}
