//! The life of a streamed reply (SPEC §6), decoupled from the HTTP response:
//!
//! * a generator task drives the model and pushes events into a bounded
//!   channel; the SSE body only reads the channel. When the client goes away
//!   axum drops the body, the receiver goes with it, and the generator sees
//!   `Sender::closed()` at once — even while the model is between tokens;
//! * one [`StreamGuard`] owns the assistant message from `streaming` to its
//!   final status, and every exit (complete, model error, disconnect, stalled
//!   client, shutdown, even a panic) goes through it;
//! * the growing text is not written per token nor per stream: the
//!   [`Flusher`] saves every dirty stream's text in one statement per tick.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use confab_core::model::{BegunTurn, MessageStatus};
use confab_core::provider::{Chunk, ProviderError};
use confab_core::service::{ServiceError, count_tokens};
use confab_core::{MessageId, Principal, Store, StoreError};
use futures::StreamExt;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, OutcomeLabels};
use crate::sse;
use crate::state::AppState;

/// Events buffered between the generator and a slow client. With the send
/// timeout this bounds what one stalled client can make the server hold: at
/// most this many events plus the socket buffers, plus the reply text itself.
pub const CHANNEL_CAPACITY: usize = 32;

/// Attempts, and the first pause between them, for a stream's final write.
const FINAL_WRITE_ATTEMPTS: u32 = 4;
const FINAL_WRITE_BACKOFF: Duration = Duration::from_millis(250);

/// The text of one live stream, shared between its generator and the flusher.
#[derive(Default)]
struct LiveText {
    text: Mutex<String>,
    dirty: AtomicBool,
    last_saved: Mutex<Option<Instant>>,
}

/// Saves the partial text of every live stream, batched: one `save_partials`
/// call per tick carries every stream that grew since the last one, plus a
/// heartbeat for streams that have been quiet a while, so that a sibling
/// instance's crash recovery never mistakes a live stream for a dead one.
#[derive(Clone, Default)]
pub struct Flusher {
    live: Arc<Mutex<HashMap<MessageId, Arc<LiveText>>>>,
}

impl Flusher {
    fn register(&self, id: MessageId) -> Arc<LiveText> {
        // The row was just written (begin_turn): the first heartbeat is due
        // one heartbeat interval from now, not on the next tick.
        let entry = Arc::new(LiveText {
            last_saved: Mutex::new(Some(Instant::now())),
            ..LiveText::default()
        });
        if let Ok(mut live) = self.live.lock() {
            live.insert(id, entry.clone());
        }
        entry
    }

    fn unregister(&self, id: MessageId) {
        if let Ok(mut live) = self.live.lock() {
            live.remove(&id);
        }
    }

    /// How many streams are registered (for tests and metrics).
    pub fn len(&self) -> usize {
        self.live.lock().map(|l| l.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One flush: the batch of dirty texts (and heartbeats older than
    /// `heartbeat`), written at once.
    pub async fn flush(&self, store: &dyn Store, metrics: &Metrics, heartbeat: Duration) {
        let now = Instant::now();
        let batch: Vec<(MessageId, String)> = {
            let Ok(live) = self.live.lock() else { return };
            live.iter()
                .filter_map(|(id, entry)| {
                    let stale = entry
                        .last_saved
                        .lock()
                        .map(|t| t.is_none_or(|t| now.duration_since(t) >= heartbeat))
                        .unwrap_or(true);
                    if !(entry.dirty.swap(false, Ordering::AcqRel) || stale) {
                        return None;
                    }
                    let text = entry.text.lock().map(|t| t.clone()).ok()?;
                    if let Ok(mut saved) = entry.last_saved.lock() {
                        *saved = Some(now);
                    }
                    Some((*id, text))
                })
                .collect()
        };
        if batch.is_empty() {
            return;
        }
        let started = Instant::now();
        match store.save_partials(&batch).await {
            Ok(()) => {
                metrics.stream_flush_rows.inc_by(batch.len() as u64);
            }
            Err(err) => {
                metrics.stream_flush_errors.inc();
                tracing::error!(error = %err, streams = batch.len(), "could not save partial replies");
                // Mark them dirty again so the next tick retries.
                if let Ok(live) = self.live.lock() {
                    for (id, _) in &batch {
                        if let Some(entry) = live.get(id) {
                            entry.dirty.store(true, Ordering::Release);
                        }
                    }
                }
            }
        }
        metrics
            .stream_flush_duration
            .observe(started.elapsed().as_secs_f64() * 1000.0);
    }

    /// Flush every `interval` until `stop` is cancelled. Quiet streams are
    /// re-saved well within `stale_after`, the age at which crash recovery
    /// (here or on a sibling instance) takes a `streaming` row for dead.
    pub async fn run(
        self,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        interval: Duration,
        stale_after: Duration,
        stop: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Config guarantees stale_after >= 2 * interval, so a heartbeat due at
        // stale_after / 3 goes out on the next tick, before the row is stale.
        let heartbeat = (interval * 3).min(stale_after / 3);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = ticker.tick() => self.flush(store.as_ref(), &metrics, heartbeat).await,
            }
        }
    }
}

/// How a stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Complete,
    /// The client went away (or stopped reading for too long).
    Cancelled {
        stalled: bool,
    },
    Failed,
    /// The shutdown grace period ran out.
    Interrupted,
}

impl Outcome {
    fn status(self) -> MessageStatus {
        match self {
            Outcome::Complete => MessageStatus::Complete,
            Outcome::Cancelled { .. } => MessageStatus::Cancelled,
            Outcome::Failed => MessageStatus::Failed,
            Outcome::Interrupted => MessageStatus::Interrupted,
        }
    }
}

/// Owns a streaming assistant message until it has its final status. The
/// normal path calls [`StreamGuard::finish`]; if the task is dropped without
/// it (a panic, an abort), `Drop` stores the text as `failed` from a new task.
struct StreamGuard {
    state: AppState,
    principal: Principal,
    begun: BegunTurn,
    live: Arc<LiveText>,
    finished: bool,
}

impl StreamGuard {
    fn new(state: AppState, principal: Principal, begun: BegunTurn) -> Self {
        let live = state.flusher.register(begun.assistant_message.id);
        state.metrics.streams_active.inc();
        Self {
            state,
            principal,
            begun,
            live,
            finished: false,
        }
    }

    fn push(&self, token: &str) {
        if let Ok(mut text) = self.live.text.lock() {
            text.push_str(token);
        }
        self.live.dirty.store(true, Ordering::Release);
    }

    fn text(&self) -> String {
        self.live.text.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// Store the final status and text; `Err` when the store refused.
    async fn finish(mut self, outcome: Outcome) -> Result<String, String> {
        self.finished = true;
        let text = self.text();
        // Stop the flusher first, so it cannot write a stale partial after
        // the final text.
        self.state
            .flusher
            .unregister(self.begun.assistant_message.id);
        let label = match outcome {
            Outcome::Complete => "complete",
            Outcome::Cancelled { .. } => "cancelled",
            Outcome::Failed => "failed",
            Outcome::Interrupted => "interrupted",
        };
        self.state.metrics.streams_active.dec();
        self.state
            .metrics
            .stream_outcomes
            .get_or_create(&OutcomeLabels { outcome: label })
            .inc();
        // The final text is the one write that must not be lost to a
        // momentary overload (a pool timeout): retry it a few times.
        let mut backoff = FINAL_WRITE_BACKOFF;
        let mut attempts = 1;
        let stored = loop {
            let result = self
                .state
                .service
                .finish(
                    &self.principal,
                    &self.begun,
                    text.clone(),
                    outcome.status(),
                    Some(count_tokens(&text)),
                )
                .await;
            match result {
                Err(ServiceError::Store(StoreError::Unavailable(err)))
                    if attempts < FINAL_WRITE_ATTEMPTS =>
                {
                    tracing::warn!(error = %err, attempts, "final write of a stream failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    attempts += 1;
                }
                other => break other,
            }
        };
        match stored {
            Ok(_) => {
                tracing::info!(
                    outcome = label,
                    messageId = %self.begun.assistant_message.id,
                    chatId = %self.begun.chat_id,
                    tokens = count_tokens(&text),
                    stalled = matches!(outcome, Outcome::Cancelled { stalled: true }),
                    "stream finished"
                );
                Ok(text)
            }
            Err(err) => {
                tracing::error!(error = %err, outcome = label, messageId = %self.begun.assistant_message.id, "could not store the final reply");
                Err(err.to_string())
            }
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.state
            .flusher
            .unregister(self.begun.assistant_message.id);
        self.state.metrics.streams_active.dec();
        self.state
            .metrics
            .stream_outcomes
            .get_or_create(&OutcomeLabels { outcome: "failed" })
            .inc();
        tracing::error!(messageId = %self.begun.assistant_message.id, "stream task ended without finishing; storing it as failed");
        let service = self.state.service.clone();
        let principal = self.principal.clone();
        let begun = self.begun.clone();
        let text = self.text();
        self.state.tasks.spawn(async move {
            let tokens = count_tokens(&text);
            let _ = service
                .finish(
                    &principal,
                    &begun,
                    text,
                    MessageStatus::Failed,
                    Some(tokens),
                )
                .await;
        });
    }
}

/// A `POST /chat` reply being produced: the flusher heartbeats its row (so
/// crash recovery never takes it for dead while the model thinks), and if
/// the request is dropped before [`PendingReply::settle`], the turn is
/// abandoned — reply `failed`, idempotency key released — from a tracked task.
pub struct PendingReply {
    state: AppState,
    principal: Principal,
    begun: BegunTurn,
    key: Option<String>,
    settled: bool,
}

impl PendingReply {
    pub fn new(
        state: &AppState,
        principal: &Principal,
        begun: &BegunTurn,
        key: Option<String>,
    ) -> Self {
        state.flusher.register(begun.assistant_message.id);
        Self {
            state: state.clone(),
            principal: principal.clone(),
            begun: begun.clone(),
            key,
            settled: false,
        }
    }

    /// The service has stored the outcome (success or failure).
    pub fn settle(mut self) {
        self.settled = true;
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        self.state
            .flusher
            .unregister(self.begun.assistant_message.id);
        if self.settled {
            return;
        }
        tracing::warn!(messageId = %self.begun.assistant_message.id, "request dropped before its reply was stored; abandoning the turn");
        let service = self.state.service.clone();
        let principal = self.principal.clone();
        let begun = self.begun.clone();
        let key = self.key.take();
        self.state.tasks.spawn(async move {
            service
                .abandon_turn(&principal, &begun, key.as_deref())
                .await;
        });
    }
}

/// `{"token":"…","done":false}`, written directly: this runs once per token
/// per stream, and building a `serde_json::Value` map for it showed up.
fn token_event(seq: u64, token: &str) -> Bytes {
    let mut data = String::with_capacity(token.len() + 32);
    data.push_str("{\"token\":");
    data.push_str(&serde_json::Value::from(token).to_string());
    data.push_str(",\"done\":false}");
    sse::data_frame(seq, &data)
}

fn error_event(seq: u64, message: &str) -> Bytes {
    sse::data_frame(
        seq,
        &json!({ "error": "Stream failed", "message": message }).to_string(),
    )
}

/// Everything the generator needs.
pub struct StreamJob {
    pub state: AppState,
    pub principal: Principal,
    pub begun: BegunTurn,
    pub tx: mpsc::Sender<Bytes>,
    /// When the request arrived, for time-to-first-token.
    pub started: Instant,
}

/// Drive the model, forward tokens, and settle the message. Runs as its own
/// task (tracked, so shutdown waits for it).
pub async fn generate(job: StreamJob) {
    let StreamJob {
        state,
        principal,
        begun,
        tx,
        started,
    } = job;
    let send_timeout = state.config.stream_send_timeout;
    let keepalive = state.config.sse_keepalive.max(Duration::from_millis(100));
    let hard_stop = state.hard_stop.clone();
    let guard = StreamGuard::new(state.clone(), principal.clone(), begun.clone());
    let mut seq: u64 = 0;
    let mut first_token_at: Option<Instant> = None;
    let mut failure: Option<String> = None;
    let mut disconnected_at: Option<Instant> = None;

    let outcome = 'run: {
        // Loading the conversation and connecting to the model happen inside
        // the stream, so that waiting for them is watched like waiting for a
        // token: keep-alives go out, a disconnect or shutdown is noticed.
        let service = state.service.clone();
        let (who, turn) = (principal.clone(), begun.clone());
        let mut chunks = futures::stream::once(async move {
            let prompt = service.prompt(&who, &turn).await.map_err(|e| {
                ProviderError::Failed(format!("could not load the conversation: {e}"))
            })?;
            service.provider().stream(prompt).await
        })
        .map(|started| match started {
            Ok(chunks) => chunks,
            Err(err) => futures::stream::once(async move { Err(err) }).boxed(),
        })
        .flatten()
        .boxed();
        // Hot loop: one iteration per token for every live stream. The
        // shutdown and disconnect futures are created once and polled by
        // reference (re-creating them would register with the shared
        // cancellation token's lock on every token); keep-alives come from
        // an interval polled here rather than a timer reset per event; and a
        // send only arms its timeout when the channel is full.
        let stopped = hard_stop.cancelled();
        let closed = tx.closed();
        tokio::pin!(stopped, closed);
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
        let mut last_sent = Instant::now();
        loop {
            let chunk = tokio::select! {
                biased;
                _ = &mut stopped => break 'run Outcome::Interrupted,
                _ = &mut closed => {
                    disconnected_at = Some(Instant::now());
                    break 'run Outcome::Cancelled { stalled: false };
                }
                _ = ping.tick() => {
                    if last_sent.elapsed() >= keepalive {
                        // A full channel means the client is not reading; the
                        // ping would not help, so it is simply skipped.
                        let _ = tx.try_send(sse::ping_frame());
                        last_sent = Instant::now();
                    }
                    continue;
                }
                chunk = chunks.next() => chunk,
            };
            match chunk {
                None | Some(Ok(Chunk::Finish(_))) => break 'run Outcome::Complete,
                Some(Ok(Chunk::Usage { .. })) => {}
                Some(Ok(Chunk::Delta(token))) => {
                    if token.is_empty() {
                        continue;
                    }
                    guard.push(&token);
                    seq += 1;
                    let event = token_event(seq, &token);
                    let sent = match tx.try_send(event) {
                        Ok(()) => Ok(Ok(())),
                        Err(TrySendError::Closed(_)) => Ok(Err(())),
                        Err(TrySendError::Full(event)) => tokio::select! {
                            biased;
                            _ = &mut stopped => break 'run Outcome::Interrupted,
                            sent = tokio::time::timeout(send_timeout, tx.send(event)) => {
                                sent.map(|r| r.map_err(|_| ()))
                            }
                        },
                    };
                    match sent {
                        Ok(Ok(())) => last_sent = Instant::now(),
                        Ok(Err(())) => {
                            disconnected_at = Some(Instant::now());
                            break 'run Outcome::Cancelled { stalled: false };
                        }
                        Err(_) => {
                            disconnected_at = Some(Instant::now());
                            break 'run Outcome::Cancelled { stalled: true };
                        }
                    }
                    state.metrics.stream_tokens.inc();
                    if first_token_at.is_none() {
                        let now = Instant::now();
                        first_token_at = Some(now);
                        state
                            .metrics
                            .stream_ttft
                            .observe(now.duration_since(started).as_secs_f64() * 1000.0);
                    }
                }
                Some(Err(err)) => {
                    failure = Some(err.to_string());
                    break 'run Outcome::Failed;
                }
            }
        }
    };
    // Dropping the model stream here (end of scope above) already stopped it.
    if let Some(reason) = &failure {
        tracing::warn!(error = %reason, "model failed mid-stream");
    }
    let stored = guard.finish(outcome).await;
    if let Some(at) = disconnected_at {
        state
            .metrics
            .stream_disconnect_detection
            .observe(at.elapsed().as_secs_f64() * 1000.0);
    }
    seq += 1;
    let last = match (outcome, stored) {
        (Outcome::Complete, Ok(text)) => Some(sse::data_frame(
            seq,
            &json!({
                "token": "",
                "done": true,
                "fullText": text,
                "chat_id": begun.chat_id,
                "message_id": begun.assistant_message.id,
            })
            .to_string(),
        )),
        (Outcome::Cancelled { .. }, _) => None,
        (Outcome::Complete, Err(_)) => Some(error_event(
            seq,
            "The reply could not be saved; it will show as interrupted",
        )),
        (Outcome::Failed, _) => Some(error_event(
            seq,
            "The model failed; the partial reply was saved",
        )),
        (Outcome::Interrupted, _) => Some(error_event(
            seq,
            "The server is shutting down; the partial reply was saved",
        )),
    };
    if let Some(event) = last {
        // Bounded: a client that stopped reading does not hold shutdown up.
        let _ = tokio::time::timeout(Duration::from_secs(2), tx.send(event)).await;
    }
}
