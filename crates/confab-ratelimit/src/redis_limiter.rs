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

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use confab_core::ratelimit::{
    BudgetState, Decision, Held, Limit, RateLimitError, RateLimiter, Reservation, ReserveRequest,
    TakeAndReserve, TokenBudget,
};
use redis::aio::MultiplexedConnection;
use redis::io::tcp::TcpSettings;
use redis::{
    AsyncConnectionConfig, Client, IntoConnectionInfo, RedisResult, Script, ScriptInvocation,
};
use tokio::sync::oneshot;

use crate::bucket;

/// Namespace of our keys, so a Redis shared with other software (or other
/// confab features) cannot collide with the buckets.
pub const KEY_PREFIX: &str = "confab:rl:";

/// The script; see the file for its contract.
const TOKEN_BUCKET_LUA: &str = include_str!("lua/token_bucket.lua");
const TOKEN_BUDGET_LUA: &str = include_str!("lua/token_budget.lua");
/// A turn's take and reservation in one call: the two scripts above as
/// functions, and the part that calls them (see that file).
const TAKE_AND_RESERVE_LUA: &str = concat!(
    "local function bucket(KEYS, ARGV)\n",
    include_str!("lua/token_bucket.lua"),
    "\nend\n\nlocal function budget(KEYS, ARGV)\n",
    include_str!("lua/token_budget.lua"),
    "\nend\n\n",
    include_str!("lua/take_and_reserve.lua"),
);
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
/// Each step is one `EVALSHA` of a script that reads, refills (with the
/// Redis server's `TIME`, so instances with skewed clocks agree), takes and
/// writes the bucket; Redis runs scripts one at a time, so the step is atomic
/// across all processes sharing the server. `redis::Script` loads the script
/// again when the server answers `NOSCRIPT` (after a restart or
/// `SCRIPT FLUSH`).
///
/// Takes of one key go out at once while fewer than
/// [`RedisRateLimiter::LANES`] script calls for that key are in flight;
/// beyond that they wait and then go together, in arrival order, as one
/// script call (see [`Buckets`]): a burst of requests from one org costs
/// Redis a handful of round trips instead of one each, and no request's
/// round trip queues behind thousands of others on the shared connection.
///
/// We keep one multiplexed connection, opened lazily and replaced after it
/// breaks, instead of `redis::aio::ConnectionManager`: the manager only
/// reconnects after I/O errors, so a connection attempt that fails any other
/// way (an `AUTH` refused during a Redis restart, say) would stay failed for
/// the life of the process. Here a failed attempt leaves nothing behind and
/// the next call simply tries again.
pub struct RedisRateLimiter {
    link: Arc<Link>,
    buckets: Arc<Buckets>,
    budget_script: Script,
    both_script: Script,
}

/// The connection to Redis and the rules for using it: every call within
/// the time budget, reconnecting after a broken connection, warnings
/// throttled. Shared with the tasks that run batched takes.
pub(crate) struct Link {
    client: Client,
    config: AsyncConnectionConfig,
    timeout: Duration,
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

/// Most takes one script call carries; more wait for the next call. Bounds
/// the time Redis spends in one script (a few microseconds a take) and the
/// size of one command.
const MAX_BATCH: usize = 512;

/// What a take learns: allowed or not, and the tokens left after it.
type Step = Result<(bool, f64), RateLimitError>;

/// One caller's take, waiting for the next script call on its key.
struct Take {
    limit: Limit,
    cost: u32,
    reply: oneshot::Sender<Step>,
}

/// One key's takes that wait for a lane, and its lanes in use.
#[derive(Default)]
struct Lanes {
    waiting: VecDeque<Take>,
    /// Tasks running script calls for the key: at most
    /// [`RedisRateLimiter::LANES`].
    running: usize,
}

/// The token-bucket script and, per key, the takes waiting for a lane.
///
/// A key is in `keys` while a task runs script calls for it. A take that
/// finds a lane free (and nobody waiting) starts a task with itself as the
/// batch; a take that finds every lane busy queues, and when a lane's call
/// returns its task sends the next batch (everything queued, up to
/// [`MAX_BATCH`], of one limit) at once; when nothing is queued the lane
/// ends, and the key leaves the map with its last lane. Up to a few hundred
/// takes a second of one key, every take is a batch of one sent at once; in
/// a burst the waiting is what batches.
///
/// Hand-written rather than a crate: what is batched is one key's takes in
/// one atomic script, with a reply per take.
struct Buckets {
    script: Script,
    keys: Mutex<HashMap<String, Lanes>>,
}

impl Buckets {
    fn keys(&self) -> MutexGuard<'_, HashMap<String, Lanes>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queue `take`, or hand it back when it is to go at once in a lane of
    /// its own (the caller then starts that lane's task).
    fn admit(&self, key: &str, take: Take) -> Option<Take> {
        let mut keys = self.keys();
        let lanes = keys.entry(key.to_owned()).or_default();
        if lanes.running < RedisRateLimiter::LANES && lanes.waiting.is_empty() {
            lanes.running += 1;
            Some(take)
        } else {
            lanes.waiting.push_back(take);
            None
        }
    }

    /// The next batch for a lane of `key`, or `None` (and the lane ended,
    /// the key forgotten with its last lane) when no one waits. Takes whose
    /// caller gave up are dropped here, so their tokens are not taken.
    fn next_batch(&self, key: &str) -> Option<Vec<Take>> {
        let mut keys = self.keys();
        let lanes = keys.get_mut(key)?;
        let queue = &mut lanes.waiting;
        queue.retain(|take| !take.reply.is_closed());
        let Some(limit) = queue.front().map(|take| take.limit) else {
            lanes.running = lanes.running.saturating_sub(1);
            if lanes.running == 0 {
                keys.remove(key);
            }
            return None;
        };
        // Takes under another limit (a changed override) stay for a later
        // call: one call applies one limit.
        let mut batch = Vec::new();
        let mut rest = VecDeque::new();
        while let Some(take) = queue.pop_front() {
            if take.limit == limit && batch.len() < MAX_BATCH {
                batch.push(take);
            } else {
                rest.push_back(take);
            }
        }
        *queue = rest;
        Some(batch)
    }

    /// Run batches for `key`, starting with `batch`, until no take waits.
    async fn run(self: Arc<Self>, link: Arc<Link>, key: String, mut batch: Vec<Take>) {
        loop {
            let limit = batch.first().map(|take| take.limit);
            if let Some(limit) = limit {
                let costs: Vec<u32> = batch.iter().map(|take| take.cost).collect();
                match self.call(&link, &key, limit, &costs).await {
                    Ok(steps) => {
                        for (take, step) in batch.into_iter().zip(steps) {
                            let _ = take.reply.send(Ok(step));
                        }
                    }
                    Err(e) => {
                        for take in batch {
                            let _ = take.reply.send(Err(e.clone()));
                        }
                    }
                }
            }
            match self.next_batch(&key) {
                Some(next) => batch = next,
                None => return,
            }
        }
    }

    /// One script call taking `costs` in order (a single 0 is a peek).
    async fn call(
        &self,
        link: &Link,
        key: &str,
        limit: Limit,
        costs: &[u32],
    ) -> Result<Vec<(bool, f64)>, RateLimitError> {
        let what = if costs == [0] { "peek" } else { "acquire" };
        let mut invocation = self.script.prepare_invoke();
        bucket_args(&mut invocation, key, limit);
        for cost in costs {
            invocation.arg(*cost);
        }
        let reply: Vec<String> = link
            .run(what, |mut conn| async move {
                invocation.invoke_async(&mut conn).await
            })
            .await?;
        let steps = parse_steps(&reply).filter(|steps| steps.len() == costs.len());
        steps.ok_or_else(|| {
            let message = format!(
                "unexpected token-bucket reply from Redis ({} values for {} takes)",
                reply.len(),
                costs.len()
            );
            link.warnings.warn(what, &message);
            RateLimitError::Unavailable(message)
        })
    }
}

/// The token-bucket script's key and its arguments before the costs.
fn bucket_args(invocation: &mut ScriptInvocation<'_>, key: &str, limit: Limit) {
    invocation
        .key(format!("{KEY_PREFIX}{key}"))
        .arg(limit.burst)
        .arg(bucket::rate(limit))
        .arg(bucket::epsilon(limit))
        .arg(u64::try_from(bucket::MAX_WAIT.as_millis()).unwrap_or(u64::MAX));
}

/// The token-budget script's keys and arguments for a reservation.
fn reserve_args(invocation: &mut ScriptInvocation<'_>, request: &ReserveRequest) {
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
}

/// The token-budget script's reply to a reservation.
fn parse_reservation(
    reply: &[i64],
    request: &ReserveRequest,
) -> Result<Reservation, RateLimitError> {
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

/// The script's reply, `allowed, tokens` per take, as pairs.
fn parse_steps(reply: &[String]) -> Option<Vec<(bool, f64)>> {
    if !reply.len().is_multiple_of(2) {
        return None;
    }
    reply
        .chunks_exact(2)
        .map(|pair| {
            let allowed = match pair[0].as_str() {
                "1" => true,
                "0" => false,
                _ => return None,
            };
            Some((allowed, pair[1].parse::<f64>().ok()?))
        })
        .collect()
}

impl RedisRateLimiter {
    /// Script calls one key may have in flight at once. More than one: with
    /// one, a take that came while its org's call was out waited a round
    /// trip for it (at 250 takes a second of one org, 0.47 ms a call, about
    /// one take in nine did, and 1.2 % took over 2.5 ms). Few: a burst of
    /// one key still goes as a handful of batches.
    pub const LANES: usize = 4;

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
            link: Arc::new(Link {
                client,
                config,
                timeout,
                current: RwLock::new(None),
                connecting: tokio::sync::Mutex::new(()),
                generations: AtomicU64::new(0),
                warnings: WarnThrottle::new(),
            }),
            buckets: Arc::new(Buckets {
                script: Script::new(TOKEN_BUCKET_LUA),
                keys: Mutex::new(HashMap::new()),
            }),
            budget_script: Script::new(TOKEN_BUDGET_LUA),
            both_script: Script::new(TAKE_AND_RESERVE_LUA),
        })
    }

    /// The client, for connections of their own (a blocking read, pub/sub).
    pub(crate) fn client(&self) -> &Client {
        &self.link.client
    }

    /// The per-call time budget given to [`RedisRateLimiter::connect`].
    pub fn timeout(&self) -> Duration {
        self.link.timeout
    }

    /// The connection, for the other Redis users of this crate (the live
    /// relay), so they share its rules.
    pub(crate) fn link(&self) -> &Link {
        &self.link
    }

    /// Take `cost` tokens from `key`'s bucket, in the key's next script
    /// call: at once when a lane is free, else with the takes that queued
    /// for the next lane to finish. Gives up after the time budget like any
    /// call (the take may still be made by the call it waited for).
    async fn take(&self, key: &str, limit: Limit, cost: u32) -> Result<Decision, RateLimitError> {
        let (reply, answer) = oneshot::channel();
        let start = self.buckets.admit(key, Take { limit, cost, reply });
        if let Some(take) = start {
            // A task of its own: the calls for this key go on when this
            // caller is cancelled (its client left), or later takes would
            // wait for nobody.
            tokio::spawn(
                self.buckets
                    .clone()
                    .run(self.link.clone(), key.to_owned(), vec![take]),
            );
        }
        let step = match tokio::time::timeout(self.link.timeout, answer).await {
            Ok(Ok(step)) => step,
            // The task ended without answering: only when the runtime is
            // shutting down.
            Ok(Err(_)) => Err(RateLimitError::Unavailable(
                "the rate-limit call was abandoned".into(),
            )),
            Err(_elapsed) => Err(self.link.timed_out("acquire")),
        };
        let (allowed, tokens) = step?;
        Ok(bucket::decision(limit, cost, allowed, tokens))
    }

    /// A peek, on its own: it writes nothing, so it need not queue.
    async fn peek_now(&self, key: &str, limit: Limit) -> Result<Decision, RateLimitError> {
        let steps = self.buckets.call(&self.link, key, limit, &[0]).await?;
        let Some(&(allowed, tokens)) = steps.first() else {
            return Err(RateLimitError::Unavailable(
                "empty token-bucket reply from Redis".into(),
            ));
        };
        Ok(bucket::decision(limit, 0, allowed, tokens))
    }
}

impl Link {
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

    /// [`Link::run`] for a step that may safely run twice (a read, a `SET`,
    /// a `PUBLISH`): when the connection turns out dead (the first call
    /// after a Redis restart), it is tried once more on a fresh one instead
    /// of failing its caller.
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
            Err(_elapsed) => Err(self.timed_out(what)),
        }
    }

    /// The error (and throttled warning) for a call past its time budget.
    fn timed_out(&self, what: &'static str) -> RateLimitError {
        let message = format!("no answer from Redis within {:?}", self.timeout);
        self.warnings.warn(what, &message);
        RateLimitError::Unavailable(message)
    }
}

impl std::fmt::Debug for RedisRateLimiter {
    // By hand: the client's connection info could include the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRateLimiter")
            .field("timeout", &self.link.timeout)
            .field("connected", &self.link.live().is_some())
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
        if cost == 0 {
            return self.peek_now(key, limit).await;
        }
        self.take(key, limit, cost).await
    }

    async fn peek(&self, key: &str, limit: Limit) -> Result<Decision, RateLimitError> {
        self.peek_now(key, limit).await
    }

    async fn ping(&self) -> Result<(), RateLimitError> {
        self.link
            .run("ping", |mut conn| async move {
                redis::cmd("PING").query_async::<()>(&mut conn).await
            })
            .await
    }
}

#[async_trait]
impl TokenBudget for RedisRateLimiter {
    async fn reserve(&self, request: &ReserveRequest) -> Result<Reservation, RateLimitError> {
        let mut invocation = self.budget_script.prepare_invoke();
        reserve_args(&mut invocation, request);
        let reply: Vec<i64> = self
            .link
            .run("reserve tokens", |mut conn| async move {
                invocation.invoke_async(&mut conn).await
            })
            .await?;
        parse_reservation(&reply, request)
    }

    /// One script call (`lua/take_and_reserve.lua`): the bucket is the one
    /// [`RateLimiter::acquire`] takes from, so this counts with the takes
    /// of the lanes, exactly, as every script call is atomic.
    async fn take_and_reserve(
        &self,
        bucket_key: &str,
        limit: Limit,
        request: &ReserveRequest,
    ) -> Option<Result<TakeAndReserve, RateLimitError>> {
        let mut invocation = self.both_script.prepare_invoke();
        bucket_args(&mut invocation, bucket_key, limit);
        invocation.arg(1);
        reserve_args(&mut invocation, request);
        let reply = self
            .link
            .run("take and reserve", |mut conn| async move {
                invocation.invoke_async::<Vec<String>>(&mut conn).await
            })
            .await;
        Some(reply.and_then(|reply| {
            let bad = || {
                RateLimitError::Unavailable("unexpected take-and-reserve reply from Redis".into())
            };
            let (took, reserved) = reply.split_at_checked(2).ok_or_else(bad)?;
            let &[(allowed, tokens)] = parse_steps(took).ok_or_else(bad)?.as_slice() else {
                return Err(bad());
            };
            let reservation = if allowed {
                let numbers: Vec<i64> = reserved
                    .iter()
                    .map(|v| v.parse().map_err(|_| bad()))
                    .collect::<Result<_, _>>()?;
                Some(parse_reservation(&numbers, request)?)
            } else {
                None
            };
            Ok(TakeAndReserve {
                decision: bucket::decision(limit, 1, allowed, tokens),
                reservation,
            })
        }))
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
            .link
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
