//! Live streams across instances (SPEC §14) on the same Redis as the rate
//! limits.
//!
//! - Events: one Redis Stream per message, `confab:live:<message id>`, whose
//!   entry ids are the event ids (`<n>-0`), so a reader asks for "after n"
//!   with `XREAD … STREAMS key n-0`, and an entry can never be added twice or
//!   out of order (Redis refuses an id not above the last). Bounded with
//!   `MAXLEN ~` and expired [`STREAM_TTL`] after its last write. All events
//!   of the process go through one writer task that sends whatever is queued
//!   as one pipeline, so many streams cost one round trip per batch, and the
//!   engine never waits for Redis: an event that cannot be written is a gap
//!   the reader fills from the database.
//! - Cancel: `PUBLISH confab:cancel <message id>`; every instance listens and
//!   stops the generation if it runs there. The cancel is also kept as a key
//!   `confab:cancelled:<message id>` (for [`STREAM_TTL`]), which an instance
//!   checks for its live streams each time it (re)subscribes: a cancel sent
//!   while its subscription was down (a Redis restart, a dropped connection)
//!   is not lost.
//! - Readers elsewhere: a key `confab:watch:<message id>` that a following
//!   reader renews while it reads, which a detached generation checks. Each
//!   renewal also publishes the id on `confab:follow`: the instance that
//!   generates the message starts relaying its events (only followed
//!   streams are relayed, [`LiveHub::relay_on_demand`]). A follow sent while
//!   that instance's subscription was down is found in the watch keys when
//!   it resubscribes, and the next renewal publishes again.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use confab_core::MessageId;
use confab_core::live::{LiveHub, LiveRelay, RelayEntry, RelayError, RelayFollower, StreamEnd};
use confab_core::model::MessageStatus;
use confab_core::turn::TurnMetrics;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::RedisRateLimiter;

pub const STREAM_PREFIX: &str = "confab:live:";
pub const WATCH_PREFIX: &str = "confab:watch:";
pub const CANCEL_CHANNEL: &str = "confab:cancel";
pub const FOLLOW_CHANNEL: &str = "confab:follow";
pub const CANCELLED_PREFIX: &str = "confab:cancelled:";
/// Entries kept per message (approximately): far above any reply's tokens.
const MAXLEN: u64 = 20_000;
/// A message's stream is dropped this long after its last event.
pub const STREAM_TTL: Duration = Duration::from_secs(600);
/// A reader's watch key lives this long unless renewed.
pub const WATCH_TTL: Duration = Duration::from_secs(5);
/// Events waiting for the writer; beyond this, events are dropped (and
/// counted): the engine never waits for Redis.
const QUEUE: usize = 65_536;
/// Events per pipeline.
const BATCH: usize = 2048;
/// Entries per read.
const READ_COUNT: usize = 1024;

pub struct RedisLiveRelay {
    redis: Arc<RedisRateLimiter>,
    queue: mpsc::Sender<(MessageId, RelayEntry)>,
    metrics: Arc<dyn TurnMetrics>,
}

impl RedisLiveRelay {
    /// The relay, and its writer task (to spawn; it ends after `stop`, once
    /// what was queued is written).
    pub fn new(
        redis: Arc<RedisRateLimiter>,
        metrics: Arc<dyn TurnMetrics>,
        stop: CancellationToken,
    ) -> (Arc<Self>, impl Future<Output = ()> + Send + 'static) {
        let (queue, rx) = mpsc::channel(QUEUE);
        let relay = Arc::new(Self {
            redis: redis.clone(),
            queue,
            metrics: metrics.clone(),
        });
        (relay, write_loop(redis, rx, metrics, stop))
    }

    /// Listen for cancels and follows sent to any instance, until `stop`:
    /// stop the generations that run here, or start relaying them.
    /// Reconnects after failures.
    pub fn listen(
        self: &Arc<Self>,
        hub: LiveHub,
        stop: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let relay = self.clone();
        async move {
            use futures::StreamExt;
            let timeout = relay.redis.timeout().max(Duration::from_secs(1));
            loop {
                let connected = tokio::select! {
                    _ = stop.cancelled() => return,
                    c = tokio::time::timeout(timeout, async {
                        let mut pubsub = relay.redis.client().get_async_pubsub().await?;
                        pubsub.subscribe(&[CANCEL_CHANNEL, FOLLOW_CHANNEL]).await?;
                        Ok::<_, redis::RedisError>(pubsub)
                    }) => c,
                };
                match connected {
                    Ok(Ok(pubsub)) => {
                        tracing::debug!("listening for stream cancels and follows");
                        // Subscribed first, then the keys: a cancel (or a
                        // follow) is either delivered from here on or
                        // already in its key.
                        relay.missed_while_unsubscribed(&hub).await;
                        let mut messages = pubsub.into_on_message();
                        loop {
                            let message = tokio::select! {
                                _ = stop.cancelled() => return,
                                m = messages.next() => m,
                            };
                            let Some(message) = message else { break };
                            let id = message
                                .get_payload::<String>()
                                .ok()
                                .and_then(|p| p.parse::<MessageId>().ok());
                            let Some(id) = id else { continue };
                            if message.get_channel_name() == FOLLOW_CHANNEL {
                                if hub.relay_on_demand(id) {
                                    tracing::info!(messageId = %id, "a reader on another instance follows this stream; relaying its events");
                                }
                            } else if hub.cancel_local(id) {
                                tracing::info!(messageId = %id, "cancel received from another instance");
                            }
                        }
                        relay.metrics.relay_error("cancel");
                        tracing::warn!("the stream-cancel subscription ended; reconnecting");
                    }
                    Ok(Err(err)) => {
                        relay.metrics.relay_error("cancel");
                        tracing::warn!(error = %err, "cannot subscribe to stream cancels; retrying");
                    }
                    Err(_) => {
                        relay.metrics.relay_error("cancel");
                        tracing::warn!("cannot subscribe to stream cancels (timeout); retrying");
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

impl RedisLiveRelay {
    /// What was sent for this process's live streams while nobody here
    /// listened, read in one round trip: cancels (stop the generation) and
    /// follows by readers elsewhere (start relaying it).
    async fn missed_while_unsubscribed(&self, hub: &LiveHub) {
        let ids = hub.ids();
        if ids.is_empty() {
            return;
        }
        let keys: Vec<String> = ids
            .iter()
            .flat_map(|id| {
                [
                    format!("{CANCELLED_PREFIX}{id}"),
                    format!("{WATCH_PREFIX}{id}"),
                ]
            })
            .collect();
        let found = self
            .redis
            .link()
            .run_idempotent("check for missed cancels and follows", |mut conn| {
                let keys = keys.clone();
                async move {
                    redis::cmd("MGET")
                        .arg(&keys)
                        .query_async::<Vec<Option<i64>>>(&mut conn)
                        .await
                }
            })
            .await;
        match found {
            Ok(found) => {
                for (id, pair) in ids.iter().zip(found.chunks(2)) {
                    let (cancelled, watched) =
                        (pair[0].is_some(), pair.get(1).is_some_and(Option::is_some));
                    if cancelled && hub.cancel_local(*id) {
                        tracing::info!(messageId = %id, "cancel sent while the subscription was down; stopping now");
                    } else if watched && hub.relay_on_demand(*id) {
                        tracing::info!(messageId = %id, "a reader elsewhere followed this stream while the subscription was down; relaying now");
                    }
                }
            }
            Err(err) => {
                self.metrics.relay_error("cancel");
                tracing::warn!(error = %err, "cannot check for cancels and follows missed while unsubscribed");
            }
        }
    }
}

fn stream_key(message: MessageId) -> String {
    format!("{STREAM_PREFIX}{message}")
}

fn unavailable(err: impl std::fmt::Display) -> RelayError {
    RelayError(err.to_string())
}

#[async_trait]
impl LiveRelay for RedisLiveRelay {
    fn publish(&self, message: MessageId, entry: RelayEntry) {
        if self.queue.try_send((message, entry)).is_err() {
            self.metrics.relay_error("publish");
        }
    }

    async fn follow(&self, message: MessageId) -> Result<Box<dyn RelayFollower>, RelayError> {
        // Its own connection: a blocking XREAD holds the connection it runs on.
        let timeout = self.redis.timeout();
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(None);
        let conn = tokio::time::timeout(
            timeout,
            self.redis
                .client()
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await
        .map_err(|_| RelayError("no answer from Redis".into()))
        .and_then(|c| c.map_err(unavailable));
        match conn {
            Ok(conn) => Ok(Box::new(RedisFollower {
                conn,
                key: stream_key(message),
                timeout,
            })),
            Err(err) => {
                self.metrics.relay_error("read");
                Err(err)
            }
        }
    }

    async fn cancel(&self, message: MessageId) -> Result<(), RelayError> {
        let id = message.to_string();
        let ttl = u64::try_from(STREAM_TTL.as_millis()).unwrap_or(600_000);
        self.redis
            .link()
            .run_idempotent("publish a cancel", |mut conn| {
                let id = id.clone();
                async move {
                    redis::pipe()
                        .atomic()
                        .cmd("SET")
                        .arg(format!("{CANCELLED_PREFIX}{id}"))
                        .arg(1)
                        .arg("PX")
                        .arg(ttl)
                        .ignore()
                        .cmd("PUBLISH")
                        .arg(CANCEL_CHANNEL)
                        .arg(&id)
                        .query_async::<(i64,)>(&mut conn)
                        .await
                }
            })
            .await
            .map(drop)
            .map_err(|e| {
                self.metrics.relay_error("cancel");
                unavailable(e)
            })
    }

    async fn watch(&self, message: MessageId) -> Result<(), RelayError> {
        let key = format!("{WATCH_PREFIX}{message}");
        let ttl = u64::try_from(WATCH_TTL.as_millis()).unwrap_or(5000);
        self.redis
            .link()
            .run_idempotent("renew a stream watch", |mut conn| {
                let key = key.clone();
                let id = message.to_string();
                async move {
                    redis::pipe()
                        .cmd("SET")
                        .arg(key)
                        .arg(1)
                        .arg("PX")
                        .arg(ttl)
                        .ignore()
                        .cmd("PUBLISH")
                        .arg(FOLLOW_CHANNEL)
                        .arg(id)
                        .ignore()
                        .query_async::<()>(&mut conn)
                        .await
                }
            })
            .await
            .map_err(|e| {
                self.metrics.relay_error("watch");
                unavailable(e)
            })
    }

    async fn watched(&self, message: MessageId) -> Result<bool, RelayError> {
        let key = format!("{WATCH_PREFIX}{message}");
        self.redis
            .link()
            .run_idempotent("check a stream watch", |mut conn| {
                let key = key.clone();
                async move {
                    redis::cmd("EXISTS")
                        .arg(key)
                        .query_async::<i64>(&mut conn)
                        .await
                }
            })
            .await
            .map(|n| n > 0)
            .map_err(|e| {
                self.metrics.relay_error("watch");
                unavailable(e)
            })
    }
}

async fn write_loop(
    redis: Arc<RedisRateLimiter>,
    mut rx: mpsc::Receiver<(MessageId, RelayEntry)>,
    metrics: Arc<dyn TurnMetrics>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let first = tokio::select! {
            biased;
            item = rx.recv() => item,
            _ = stop.cancelled() => None,
        };
        let stopping = first.is_none();
        batch.extend(first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            write_batch(&redis, &batch, metrics.as_ref()).await;
            batch.clear();
        }
        if stopping {
            return;
        }
    }
}

/// One pipeline: every event in order, then the expiry of each stream touched.
async fn write_batch(
    redis: &RedisRateLimiter,
    batch: &[(MessageId, RelayEntry)],
    metrics: &dyn TurnMetrics,
) {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    // One key per stream, built once: a batch holds up to BATCH events of
    // up to thousands of streams (a linear search of the keys per event
    // showed in the profile).
    let mut keys: HashMap<MessageId, String> = HashMap::new();
    let mut order: Vec<MessageId> = Vec::new();
    let ttl = STREAM_TTL.as_secs();
    for (message, entry) in batch {
        let key = keys.entry(*message).or_insert_with(|| {
            order.push(*message);
            stream_key(*message)
        });
        let mut xadd = redis::cmd("XADD");
        xadd.arg(key.as_str())
            .arg("MAXLEN")
            .arg("~")
            .arg(MAXLEN)
            .arg(format!("{}-0", entry.id()));
        match entry {
            RelayEntry::Token { text, .. } => {
                xadd.arg("t").arg(text.as_str());
            }
            RelayEntry::End(end) => {
                xadd.arg("e")
                    .arg(end.status.as_str())
                    .arg("s")
                    .arg(if end.saved { "1" } else { "0" });
            }
        }
        pipe.add_command(xadd);
    }
    for message in &order {
        if let Some(key) = keys.get(message) {
            pipe.cmd("EXPIRE").arg(key.as_str()).arg(ttl);
        }
    }
    let results = redis
        .link()
        .run("relay stream events", |mut conn| async move {
            pipe.query_async::<Vec<redis::RedisResult<Value>>>(&mut conn)
                .await
        })
        .await;
    match results {
        Ok(results) => {
            // An id not above the stream's last is an event already written
            // (a retried batch): nothing lost.
            let failed = results
                .iter()
                .filter(|r| {
                    r.as_ref()
                        .err()
                        .is_some_and(|e| !e.to_string().contains("equal or smaller"))
                })
                .count();
            if failed > 0 {
                metrics.relay_error("publish");
                tracing::warn!(
                    failed,
                    "some stream events could not be relayed; readers elsewhere fill them from the database"
                );
            }
        }
        Err(_) => {
            // `run` logged it (throttled).
            metrics.relay_error("publish");
        }
    }
}

struct RedisFollower {
    conn: MultiplexedConnection,
    key: String,
    timeout: Duration,
}

#[async_trait]
impl RelayFollower for RedisFollower {
    async fn read(&mut self, after: u64, wait: Duration) -> Result<Vec<RelayEntry>, RelayError> {
        let block = u64::try_from(wait.as_millis()).unwrap_or(1000).max(1);
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(READ_COUNT)
            .arg("BLOCK")
            .arg(block)
            .arg("STREAMS")
            .arg(&self.key)
            .arg(format!("{after}-0"));
        let reply = tokio::time::timeout(
            wait + self.timeout,
            cmd.query_async::<Value>(&mut self.conn),
        )
        .await
        .map_err(|_| RelayError("no answer from Redis".into()))?
        .map_err(unavailable)?;
        parse_xread(reply).ok_or_else(|| RelayError("unexpected XREAD reply".into()))
    }
}

/// `XREAD`'s reply for one stream: nil, or `[[key, [[id, [field, value, …]], …]]]`
/// (a map of key → entries in RESP3).
fn parse_xread(reply: Value) -> Option<Vec<RelayEntry>> {
    let entries = match reply {
        Value::Nil => return Some(Vec::new()),
        Value::Array(streams) => match streams.into_iter().next()? {
            Value::Array(pair) => pair.into_iter().nth(1)?,
            _ => return None,
        },
        Value::Map(streams) => streams.into_iter().next()?.1,
        _ => return None,
    };
    let Value::Array(entries) = entries else {
        return None;
    };
    entries.into_iter().map(parse_entry).collect()
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn parse_entry(entry: Value) -> Option<RelayEntry> {
    let Value::Array(parts) = entry else {
        return None;
    };
    let mut parts = parts.into_iter();
    let id = text(&parts.next()?)?;
    let id: u64 = id.split_once('-')?.0.parse().ok()?;
    let fields: Vec<String> = match parts.next()? {
        Value::Array(f) => f.iter().map(text).collect::<Option<_>>()?,
        Value::Map(f) => f
            .iter()
            .flat_map(|(k, v)| [text(k), text(v)])
            .collect::<Option<_>>()?,
        _ => return None,
    };
    let field = |name: &str| {
        fields
            .chunks(2)
            .find(|kv| kv.first().is_some_and(|k| k == name))
            .and_then(|kv| kv.get(1).cloned())
    };
    if let Some(text) = field("t") {
        return Some(RelayEntry::Token { id, text });
    }
    let status: MessageStatus = field("e")?.parse().ok()?;
    Some(RelayEntry::End(StreamEnd {
        id,
        status,
        saved: field("s").as_deref() == Some("1"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn xread_replies_parse_into_entries() {
        assert_eq!(parse_xread(Value::Nil), Some(Vec::new()));
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("confab:live:x"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("7-0"),
                    Value::Array(vec![bulk("t"), bulk(" wörld")]),
                ]),
                Value::Array(vec![
                    bulk("8-0"),
                    Value::Array(vec![bulk("e"), bulk("complete"), bulk("s"), bulk("1")]),
                ]),
            ]),
        ])]);
        assert_eq!(
            parse_xread(reply),
            Some(vec![
                RelayEntry::Token {
                    id: 7,
                    text: " wörld".into()
                },
                RelayEntry::End(StreamEnd {
                    id: 8,
                    status: MessageStatus::Complete,
                    saved: true
                }),
            ])
        );
        assert_eq!(parse_xread(Value::Int(3)), None);
    }
}
