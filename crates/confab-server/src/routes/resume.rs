//! Resumable streams and cancel (SPEC §14).
//!
//! `GET /chat/{chat_id}/messages/{message_id}/stream` is an adapter over
//! what the engine already produced: events are never made here, only read
//! back with their ids — from the stored text and its event boundaries (a
//! finished message, or what a live one has saved), from the generation's
//! [`LiveStream`] when it runs in this process, or from the Redis relay when
//! it runs on another instance. Every event goes out exactly when its id is
//! the next one the client lacks, so whichever source has it, nothing is
//! missed or sent twice.
//!
//! `POST /chat/{chat_id}/messages/{message_id}/cancel` stops a generation
//! wherever it runs: in this process directly, elsewhere through the relay.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use confab_core::live::{Cursor, LiveStream, RelayEntry, RelayFollower, StreamEnd, split_events};
use confab_core::model::{Message, MessageRole, MessageStatus, StoredStream, Usage, UsageSource};
use confab_core::service::Access;
use confab_core::{ChatId, MessageId, OrgId, StoreError};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

use crate::error::ApiError;
use crate::metrics::{DeliveryLabels, SourceLabels};
use crate::middleware::Auth;
use crate::sse::{Pacing, ReplayBody, ReplayEvent, ended_message};
use crate::state::AppState;
use crate::wire::CancelReply;

/// Tokens taken from a live stream at a time.
const READ_MAX: usize = 256;
/// How long one relay read waits for news before the follower renews its
/// watch and looks at the database.
const RELAY_WAIT: Duration = Duration::from_millis(1000);
/// A following reader renews its watch key this often (it lives 5 s).
const WATCH_EVERY: Duration = Duration::from_millis(1500);
/// A relay follower re-reads the stored message this often: what a
/// generation that died (or whose relay writes fail) saved, and its end.
const DB_CHECK_EVERY: Duration = Duration::from_secs(2);
/// Events buffered for a slow reader of a resumed stream.
const CHANNEL: usize = 32;

const RELAY_DOWN: &str = "This reply is being generated on another instance and the live relay \
     between instances is unavailable; try again shortly (finished replies can be resumed)";

fn message_not_found() -> ApiError {
    ApiError::NotFound("Message not found".into())
}

fn parse_ids(
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<(ChatId, MessageId), ApiError> {
    let Ok(Path((chat, message))) = path else {
        return Err(ApiError::chat_not_found());
    };
    let chat = chat.parse().map_err(|_| ApiError::chat_not_found())?;
    let message = message.parse().map_err(|_| message_not_found())?;
    Ok((chat, message))
}

/// The last event id the client has: `Last-Event-ID`, else `?after=`, else
/// 0. Each one given must be a whole number below 2^40 (a blank one too is
/// refused: a client that has no event sends neither).
fn parse_after(headers: &HeaderMap, query: &HashMap<String, String>) -> Result<u64, ApiError> {
    let bad = || {
        ApiError::BadRequest(
            "Last-Event-ID (or after) must be the id of the last event received, a whole number"
                .into(),
        )
    };
    let number = |v: &str| {
        let v = v.trim();
        v.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| v.parse::<u64>().ok())
            .flatten()
            .filter(|n| *n < 1 << 40)
            .ok_or_else(bad)
    };
    let from_query = query.get("after").map(|v| number(v)).transpose()?;
    match headers.get("last-event-id") {
        Some(v) => number(v.to_str().map_err(|_| bad())?),
        None => Ok(from_query.unwrap_or(0)),
    }
}

/// An assistant message of the chat, with its stored events.
async fn load(
    state: &AppState,
    org: OrgId,
    chat: ChatId,
    message: MessageId,
) -> Result<StoredStream, ApiError> {
    match state.store.stream_state(org, chat, message).await {
        Ok(s) if s.message.role == MessageRole::Assistant => Ok(s),
        Ok(_) | Err(StoreError::NotFound) => Err(message_not_found()),
        Err(err) => Err(err.into()),
    }
}

/// The token events of a stored message.
fn stored_events(stored: &StoredStream) -> Vec<&str> {
    split_events(&stored.message.content, stored.event_lengths.as_deref()).unwrap_or_else(|| {
        tracing::warn!(messageId = %stored.message.id, "stored event boundaries do not match the text; replaying it as one event");
        vec![stored.message.content.as_str()]
    })
}

/// The final event of a message stored with a final status.
fn final_event(message: &Message, id: u64) -> ReplayEvent {
    match message.status {
        MessageStatus::Complete => ReplayEvent::Done {
            id,
            text: message.content.clone(),
            usage: message.usage.unwrap_or(Usage {
                prompt_tokens: 0,
                completion_tokens: 0,
                source: UsageSource::Estimated,
            }),
            model: message.model.clone().unwrap_or_default(),
        },
        status => ReplayEvent::Failed {
            id,
            message: ended_message(status, true),
        },
    }
}

enum Source {
    /// The message is finished: everything comes from the database.
    Stored,
    /// Generated in this process.
    Local(Arc<LiveStream>),
    /// Generated on another instance.
    Relay(Box<dyn RelayFollower>),
    /// Generated elsewhere and no relay is configured: the saved text.
    Database,
}

impl Source {
    fn label(&self) -> &'static str {
        match self {
            Source::Stored => "stored",
            Source::Local(_) => "local",
            Source::Relay(_) => "relay",
            Source::Database => "database",
        }
    }
}

/// Resume a reply's stream after the last event received (SPEC §14): what
/// was generated already, then live until the final event.
#[utoipa::path(
    get, path = "/chat/{chat_id}/messages/{message_id}/stream", tag = "chats", operation_id = "resumeStream",
    params(
        ("chat_id" = uuid::Uuid, Path, description = "A chat the caller may read"),
        ("message_id" = uuid::Uuid, Path, description = "An assistant message of the chat"),
        ("Last-Event-ID" = Option<u64>, Header, maximum = 1099511627775_u64, description = "The id of the last event received"),
        ("after" = Option<u64>, Query, maximum = 1099511627775_u64, description = "As `Last-Event-ID`, when the header cannot be set"),
    ),
    responses(
        (status = 200, description = "The events after the given id, in the format of `POST /chat/stream`",
            content_type = "text/event-stream", body = crate::wire::ChatStreamEvent),
        (status = 204, description = "The client has the final event already"),
    ),
)]
pub async fn get_message_stream(
    State(state): State<AppState>,
    Auth(principal): Auth,
    path: Result<Path<(String, String)>, PathRejection>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (chat_id, message_id) = parse_ids(path)?;
    let after = parse_after(&headers, &query)?;
    state
        .service
        .chat_for(&principal, chat_id, Access::Read)
        .await?;
    let stored = load(&state, principal.org_id, chat_id, message_id).await?;
    let hub = state.engine.live();
    let source = if stored.message.status != MessageStatus::Streaming {
        let count = stored_events(&stored).len() as u64;
        let lost_tail = stored.message.status != MessageStatus::Complete && after > count + 1;
        if after > count && !lost_tail {
            // The client has the final event already: nothing to send (and
            // 204 tells an EventSource to stop reconnecting).
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        Source::Stored
    } else if let Some(live) = hub.get(message_id) {
        Source::Local(live)
    } else if let Some(relay) = hub.relay() {
        match relay.follow(message_id).await {
            Ok(follower) => Source::Relay(follower),
            Err(err) => {
                tracing::warn!(error = %err, messageId = %message_id, "live resume refused: the stream relay is unavailable");
                return Err(ApiError::Unavailable(RELAY_DOWN.into()));
            }
        }
    } else {
        Source::Database
    };
    state
        .metrics
        .stream_resumes
        .get_or_create(&SourceLabels {
            source: source.label(),
        })
        .inc();
    tracing::info!(messageId = %message_id, chatId = %chat_id, after, source = source.label(), "stream resumed");
    let (tx, rx) = mpsc::channel(CHANNEL);
    let follower = Follower {
        state: state.clone(),
        org: principal.org_id,
        chat: chat_id,
        message: message_id,
        next: after + 1,
        replaying: true,
        tx,
    };
    state.tasks.spawn(
        follower
            .run(source, stored)
            .instrument(tracing::Span::current()),
    );
    let mut response = Response::new(Body::from_stream(ReplayBody::new(
        rx,
        chat_id,
        message_id,
        Pacing::of(&state),
    )));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Ok(v) = HeaderValue::from_str(&chat_id.to_string()) {
        headers.insert("x-chat-id", v);
    }
    if let Ok(v) = HeaderValue::from_str(&message_id.to_string()) {
        headers.insert("x-message-id", v);
    }
    Ok(response)
}

/// Stop a reply being generated, on whichever instance runs it (SPEC §14).
#[utoipa::path(
    post, path = "/chat/{chat_id}/messages/{message_id}/cancel", tag = "chats", operation_id = "cancelMessage",
    params(
        ("chat_id" = uuid::Uuid, Path, description = "A chat the caller owns"),
        ("message_id" = uuid::Uuid, Path, description = "An assistant message of the chat"),
    ),
    responses((status = 202, description = "Cancelling, or the status of a reply that had finished", body = CancelReply)),
)]
pub async fn cancel_message(
    State(state): State<AppState>,
    Auth(principal): Auth,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let (chat_id, message_id) = parse_ids(path)?;
    // The chat's owner only (an admin reading a member's chat gets 403).
    state
        .service
        .chat_for(&principal, chat_id, Access::Write)
        .await?;
    let stored = load(&state, principal.org_id, chat_id, message_id).await?;
    let hub = state.engine.live();
    let delivery = if stored.message.status != MessageStatus::Streaming {
        "finished"
    } else if hub.cancel_local(message_id) {
        "local"
    } else if let Some(relay) = hub.relay() {
        if let Err(err) = relay.cancel(message_id).await {
            tracing::warn!(error = %err, messageId = %message_id, "cancel could not be relayed");
            return Err(ApiError::Unavailable(
                "The cancel could not be delivered to the instance generating this reply; try again shortly"
                    .into(),
            ));
        }
        "relay"
    } else {
        // Streaming, but not here and no other instance can be asked: a
        // generation of a dead process, which recovery marks `interrupted`.
        "none"
    };
    state
        .metrics
        .stream_cancels
        .get_or_create(&DeliveryLabels { delivery })
        .inc();
    tracing::info!(messageId = %message_id, chatId = %chat_id, delivery, "cancel requested");
    let status = match delivery {
        "finished" => stored.message.status.as_str(),
        _ => "cancelling",
    };
    Ok((
        StatusCode::ACCEPTED,
        Json(CancelReply {
            chat_id,
            message_id,
            status,
        }),
    )
        .into_response())
}

/// What a follower does next.
enum Flow {
    Continue,
    Finished,
    /// The client went away (or the server stops): end without a final event.
    Gone,
}

/// Feeds one resumed stream. `next` is the id the client lacks; every event
/// is sent only when its id is `next`, so sources can be mixed freely.
struct Follower {
    state: AppState,
    org: OrgId,
    chat: ChatId,
    message: MessageId,
    next: u64,
    /// Events sent now were generated before the reader came (metrics).
    replaying: bool,
    tx: mpsc::Sender<ReplayEvent>,
}

impl Follower {
    async fn run(mut self, source: Source, stored: StoredStream) {
        let flow = match source {
            Source::Stored => self.send_stored(&stored).await,
            Source::Local(live) => self.follow_local(live).await,
            Source::Relay(follower) => self.follow_relay(follower).await,
            Source::Database => self.follow_database(Some(stored)).await,
        };
        if matches!(flow, Flow::Continue) {
            tracing::warn!(messageId = %self.message, "a resumed stream ended early");
        }
    }

    async fn send(&mut self, event: ReplayEvent) -> bool {
        let id = match &event {
            ReplayEvent::Token { id, .. }
            | ReplayEvent::Done { id, .. }
            | ReplayEvent::Failed { id, .. } => *id,
        };
        debug_assert_eq!(id, self.next, "events go out in order, once");
        if self.replaying {
            self.state.metrics.stream_replayed_events.inc();
        }
        self.next = id + 1;
        let stop = self.state.hard_stop.clone();
        // A reader that takes nothing for STREAM_SEND_TIMEOUT_SECONDS (a
        // half-open connection) is let go, like the original request's: it
        // no longer counts as a reader, so a detached generation it held
        // is cancelled after STREAM_DETACH_SECONDS rather than run to its
        // end for nobody.
        let patience = self.state.config.stream_send_timeout;
        tokio::select! {
            sent = tokio::time::timeout(patience, self.tx.send(event)) => match sent {
                Ok(sent) => sent.is_ok(),
                Err(_) => {
                    tracing::info!(
                        messageId = %self.message,
                        "a resumed stream's reader took no event for STREAM_SEND_TIMEOUT_SECONDS; it is let go"
                    );
                    false
                }
            },
            _ = stop.cancelled() => false,
        }
    }

    /// Wait for `d`, or `Gone` when the client leaves or the server stops.
    async fn pause(&self, d: Duration) -> Flow {
        tokio::select! {
            _ = tokio::time::sleep(d) => Flow::Continue,
            _ = self.tx.closed() => Flow::Gone,
            _ = self.state.hard_stop.cancelled() => Flow::Gone,
        }
    }

    /// Send the stored events from `next` on, and the final event when the
    /// message is finished.
    async fn send_stored(&mut self, stored: &StoredStream) -> Flow {
        let events = stored_events(stored);
        let count = events.len() as u64;
        for (id, text) in (1u64..).zip(&events) {
            if id < self.next {
                continue;
            }
            let token = ReplayEvent::Token {
                id,
                text: (*text).to_owned(),
            };
            if !self.send(token).await {
                return Flow::Gone;
            }
        }
        if stored.message.status == MessageStatus::Streaming {
            return Flow::Continue;
        }
        let id = if self.next <= count + 1 {
            count + 1
        } else if stored.message.status == MessageStatus::Complete {
            // The client has the whole reply and its final event.
            return Flow::Finished;
        } else {
            // The client saw tokens the store never got (its generating
            // process died between two saves): it still learns how the
            // reply ended, as the next event it lacks.
            self.next
        };
        if !self.send(final_event(&stored.message, id)).await {
            return Flow::Gone;
        }
        Flow::Finished
    }

    /// The end of a live stream: the final event from the stored message.
    async fn finish(&mut self, end: StreamEnd) -> Flow {
        if end.saved {
            match load(&self.state, self.org, self.chat, self.message).await {
                Ok(stored) if stored.message.status != MessageStatus::Streaming => {
                    return self.send_stored(&stored).await;
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(error = %err, messageId = %self.message, "could not read the finished message for a resumed stream");
                    return Flow::Gone;
                }
            }
        }
        if self.next > end.id {
            return Flow::Finished;
        }
        let failed = ReplayEvent::Failed {
            id: self.next,
            message: ended_message(end.status, false),
        };
        if self.send(failed).await {
            Flow::Finished
        } else {
            Flow::Gone
        }
    }

    async fn follow_local(&mut self, live: Arc<LiveStream>) -> Flow {
        let _reader = live.attach();
        let mut changes = live.changes();
        let mut cursor = Cursor::after(self.next - 1);
        loop {
            changes.borrow_and_update();
            let (tokens, end) = live.read(&mut cursor, READ_MAX);
            let caught_up = tokens.len() < READ_MAX;
            for (id, text) in tokens {
                if id < self.next {
                    continue;
                }
                if !self.send(ReplayEvent::Token { id, text }).await {
                    return Flow::Gone;
                }
            }
            if let Some(end) = end {
                return self.finish(end).await;
            }
            if !caught_up {
                continue;
            }
            self.replaying = false;
            tokio::select! {
                _ = changes.changed() => {}
                _ = self.tx.closed() => return Flow::Gone,
                _ = self.state.hard_stop.cancelled() => return Flow::Gone,
            }
        }
    }

    /// Tell a detached generation, wherever it runs, that someone reads it
    /// (every [`WATCH_EVERY`]; `watched`: when it was last told), or it is
    /// cancelled under this reader after `STREAM_DETACH_SECONDS`.
    async fn renew_watch(
        &self,
        relay: &Arc<dyn confab_core::live::LiveRelay>,
        watched: &mut Option<Instant>,
    ) {
        if watched.is_some_and(|t| t.elapsed() < WATCH_EVERY) {
            return;
        }
        *watched = Some(Instant::now());
        if let Err(err) = relay.watch(self.message).await {
            confab_core::turn::TurnMetrics::relay_error(self.state.metrics.as_ref(), "watch");
            tracing::warn!(error = %err, messageId = %self.message, "could not tell the stream relay that this reader follows");
        }
    }

    async fn follow_relay(&mut self, mut follower: Box<dyn RelayFollower>) -> Flow {
        let Some(relay) = self.state.engine.live().relay().cloned() else {
            return self.follow_database(None).await;
        };
        let mut watched: Option<Instant> = None;
        let mut checked = Instant::now();
        let mut wait = Duration::ZERO;
        loop {
            self.renew_watch(&relay, &mut watched).await;
            let read = tokio::select! {
                r = follower.read(self.next - 1, wait) => r,
                _ = self.tx.closed() => return Flow::Gone,
                _ = self.state.hard_stop.cancelled() => return Flow::Gone,
            };
            let entries = match read {
                Ok(entries) => entries,
                Err(err) => {
                    confab_core::turn::TurnMetrics::relay_error(
                        self.state.metrics.as_ref(),
                        "read",
                    );
                    tracing::warn!(error = %err, messageId = %self.message, "lost the stream relay; following the saved text instead");
                    return self.follow_database(None).await;
                }
            };
            for entry in entries {
                let id = entry.id();
                if id < self.next {
                    continue;
                }
                if id > self.next {
                    // Events the relay no longer has (or never got): the
                    // saved text has them.
                    match self.fill_from_database(id).await {
                        Flow::Continue => {}
                        other => return other,
                    }
                    if id < self.next {
                        continue;
                    }
                }
                self.state.metrics.stream_relay_deliveries.inc();
                match entry {
                    RelayEntry::Token { id, text } => {
                        if !self.send(ReplayEvent::Token { id, text }).await {
                            return Flow::Gone;
                        }
                    }
                    RelayEntry::End(end) => return self.finish(end).await,
                }
            }
            self.replaying = wait.is_zero() && self.replaying;
            wait = RELAY_WAIT;
            if checked.elapsed() >= DB_CHECK_EVERY {
                checked = Instant::now();
                // A generation whose instance died never sends its end, and
                // one whose relay writes fail sends nothing: the database
                // has what was saved, and the last word.
                if let Ok(stored) = load(&self.state, self.org, self.chat, self.message).await {
                    match self.send_stored(&stored).await {
                        Flow::Continue => {}
                        other => return other,
                    }
                }
            }
        }
    }

    /// Send stored events until `next` reaches `target`, waiting for the
    /// flusher to save them (a few flush intervals at most).
    async fn fill_from_database(&mut self, target: u64) -> Flow {
        let deadline =
            Instant::now() + self.state.config.stream_flush_interval * 3 + Duration::from_secs(1);
        loop {
            let stored = match load(&self.state, self.org, self.chat, self.message).await {
                Ok(stored) => stored,
                Err(err) => {
                    tracing::warn!(error = %err, messageId = %self.message, "could not read saved events for a resumed stream");
                    return Flow::Gone;
                }
            };
            match self.send_stored(&stored).await {
                Flow::Continue => {}
                other => return other,
            }
            if self.next >= target {
                return Flow::Continue;
            }
            if Instant::now() >= deadline {
                confab_core::turn::TurnMetrics::relay_error(self.state.metrics.as_ref(), "read");
                tracing::warn!(messageId = %self.message, missing_from = self.next, "events missing from the relay and the saved text; ending the resumed stream (resuming again continues it)");
                return Flow::Gone;
            }
            match self.pause(Duration::from_millis(250)).await {
                Flow::Continue => {}
                other => return other,
            }
        }
    }

    /// Follow what the generation saves (every flush), until it finishes.
    async fn follow_database(&mut self, first: Option<StoredStream>) -> Flow {
        let mut first = first;
        let relay = self.state.engine.live().relay().cloned();
        let mut watched: Option<Instant> = None;
        loop {
            let stored = match first.take() {
                Some(stored) => stored,
                None => match load(&self.state, self.org, self.chat, self.message).await {
                    Ok(stored) => stored,
                    Err(err) => {
                        tracing::warn!(error = %err, messageId = %self.message, "could not read saved events for a resumed stream");
                        return Flow::Gone;
                    }
                },
            };
            match self.send_stored(&stored).await {
                Flow::Continue => {}
                other => return other,
            }
            if let Some(live) = self.state.engine.live().get(self.message) {
                return self.follow_local(live).await;
            }
            self.replaying = false;
            if let Some(relay) = &relay {
                // Still generating elsewhere, and this reader follows the
                // saved text (the relay failed it, or the generation is not
                // relayed yet): it is a reader all the same.
                self.renew_watch(relay, &mut watched).await;
            }
            let mut every = self
                .state
                .config
                .stream_flush_interval
                .max(Duration::from_millis(100));
            if relay.is_some() {
                // Back in time to renew the watch, however long the flush.
                every = every.min(WATCH_EVERY);
            }
            match self.pause(every).await {
                Flow::Continue => {}
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(header: Option<&str>, query: Option<&str>) -> Result<u64, ApiError> {
        let mut headers = HeaderMap::new();
        if let Some(h) = header {
            headers.insert("last-event-id", HeaderValue::from_str(h).unwrap());
        }
        let query: HashMap<String, String> = query
            .map(|q| ("after".to_owned(), q.to_owned()))
            .into_iter()
            .collect();
        parse_after(&headers, &query)
    }

    /// Found by schemathesis: a blank `Last-Event-ID` was read as 0, and a
    /// malformed `?after=` passed when the header was there too.
    #[test]
    fn every_given_event_id_must_be_a_number() {
        assert_eq!(after(None, None).unwrap(), 0);
        assert_eq!(after(Some("7"), None).unwrap(), 7);
        assert_eq!(after(None, Some(" 3 ")).unwrap(), 3);
        assert_eq!(after(Some("7"), Some("3")).unwrap(), 7);
        for (h, q) in [
            (Some(""), None),
            (None, Some("")),
            (Some("1000000"), Some("6.8e-271")),
            (Some("+5"), None),
            (None, Some("1099511627776")),
        ] {
            assert!(after(h, q).is_err(), "{h:?} {q:?}");
        }
    }
}
