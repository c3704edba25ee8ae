//! Server-side SSE framing for every stream: `POST /chat/stream`, resumed
//! streams and `/v1/chat/completions`.
//!
//! The response body encodes the turn's events and sends whatever is queued
//! in one write: one event per write while the
//! client keeps up (every token leaves at once), several per write when a
//! burst of streams saturates the machine — then the syscalls per token, the
//! largest cost of a stream (the kernel's TCP send path), shrink instead of
//! queueing up. Hand-written instead of axum's `Sse` for that batching.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use confab_core::model::{MessageStatus, Usage};
use confab_core::turn::{StartedTurn, TurnEvent, TurnFailure};
use confab_core::{ChatId, MessageId};
use tokio::sync::mpsc;

use crate::wire::{DoneEvent, ErrorEvent, TokenEvent};

/// At most this much is gathered into one write.
const MAX_BATCH_BYTES: usize = 16 * 1024;

/// `id: <id>\ndata: <json>\n\n`. `json` must be one line, which serde_json's
/// compact output always is (newlines inside strings are escaped).
pub fn data_frame(id: u64, json: &str) -> Bytes {
    let mut frame = BytesMut::with_capacity(json.len() + 32);
    write_frame(&mut frame, id, json);
    frame.freeze()
}

fn write_frame(out: &mut BytesMut, id: u64, json: &str) {
    out.extend_from_slice(b"id: ");
    out.extend_from_slice(id.to_string().as_bytes());
    out.extend_from_slice(b"\ndata: ");
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(b"\n\n");
}

const PING: &[u8] = b": ping\n\n";

/// The keep-alive comment, `: ping`.
pub fn ping_frame() -> Bytes {
    Bytes::from_static(PING)
}

/// How one kind of stream writes its events into an [`SseBody`].
pub trait Encoder {
    type Event;
    /// Written once, before anything else (the keep-alive comment, unless
    /// the format opens otherwise).
    fn opening(&mut self, out: &mut BytesMut) {
        out.extend_from_slice(PING);
    }
    /// Write `event`; `true` when it was the stream's final event.
    fn encode(&mut self, event: Self::Event, out: &mut BytesMut) -> bool;
}

/// A stream of events as an SSE body: the encoder's opening, then each
/// poll sends every event already queued (up to [`MAX_BATCH_BYTES`]) as one
/// chunk, and a `: ping` when nothing was sent for a keep-alive interval;
/// the body ends after the final event. Dropping it (the client went away)
/// drops the receiver, which the engine notices at once. One home for the
/// batching and keep-alives of every stream: `POST /chat/stream`, a resumed
/// stream and `/v1/chat/completions`.
pub struct SseBody<E: Encoder> {
    rx: mpsc::Receiver<E::Event>,
    first: Option<E::Event>,
    opening: bool,
    encoder: E,
    ping: tokio::time::Interval,
    sent_since_tick: bool,
    finished: bool,
}

impl<E: Encoder> SseBody<E> {
    /// `first`: an event already taken from `rx` (sent first).
    pub fn with_encoder(
        rx: mpsc::Receiver<E::Event>,
        first: Option<E::Event>,
        encoder: E,
        keepalive: Duration,
    ) -> Self {
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            rx,
            first,
            opening: true,
            encoder,
            ping,
            sent_since_tick: false,
            finished: false,
        }
    }

    fn encode(&mut self, event: E::Event, out: &mut BytesMut) {
        if self.encoder.encode(event, out) {
            self.finished = true;
        }
    }
}

impl<E> futures::Stream for SseBody<E>
where
    E: Encoder + Unpin,
    E::Event: Unpin,
{
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let mut out = BytesMut::new();
        if this.opening {
            this.opening = false;
            this.encoder.opening(&mut out);
        }
        let opened = out.len();
        if let Some(first) = this.first.take() {
            this.encode(first, &mut out);
        }
        while !this.finished && out.len() < MAX_BATCH_BYTES {
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(event)) => this.encode(event, &mut out),
                Poll::Ready(None) => this.finished = true,
                Poll::Pending => break,
            }
        }
        if !out.is_empty() {
            // The opening alone does not count as activity: the first
            // keep-alive is due one interval after it.
            this.sent_since_tick |= out.len() > opened;
            return Poll::Ready(Some(Ok(out.freeze())));
        }
        if this.finished {
            return Poll::Ready(None);
        }
        // Nothing queued: a keep-alive when a whole interval passed silently.
        while this.ping.poll_tick(cx).is_ready() {
            if !std::mem::replace(&mut this.sent_since_tick, false) {
                return Poll::Ready(Some(Ok(ping_frame())));
            }
        }
        Poll::Pending
    }
}

/// A turn's events in SPEC §6's format: one event per token (`id:` 1, 2,
/// …), then the `done` or error event with the last id.
pub struct TurnEvents {
    seq: u64,
    chat_id: Option<ChatId>,
    message_id: MessageId,
    model: String,
}

/// The body of `POST /chat/stream`.
pub type EventBody = SseBody<TurnEvents>;

impl SseBody<TurnEvents> {
    pub fn new(turn: StartedTurn, first: Option<TurnEvent>, keepalive: Duration) -> Self {
        let encoder = TurnEvents {
            seq: 0,
            chat_id: turn.chat_id,
            message_id: turn.message_id,
            model: turn.model,
        };
        Self::with_encoder(turn.events, first, encoder, keepalive)
    }
}

impl Encoder for TurnEvents {
    type Event = TurnEvent;

    fn encode(&mut self, event: TurnEvent, out: &mut BytesMut) -> bool {
        self.seq += 1;
        let (json, last) = match &event {
            TurnEvent::Token(token) => (
                serde_json::to_string(&TokenEvent { token, done: false }),
                false,
            ),
            TurnEvent::Done(summary) => (
                serde_json::to_string(&DoneEvent {
                    token: "",
                    done: true,
                    full_text: &summary.text,
                    chat_id: self.chat_id,
                    message_id: self.message_id,
                    model: &self.model,
                    usage: summary.usage.into(),
                }),
                true,
            ),
            TurnEvent::Failed(failure) => {
                let message = failure_message(failure);
                (
                    serde_json::to_string(&ErrorEvent {
                        error: "Stream failed",
                        message: &message,
                    }),
                    true,
                )
            }
        };
        // Serialising these plain structs cannot fail; if it ever did, the
        // event is dropped rather than sent broken.
        if let Ok(json) = json {
            write_frame(out, self.seq, &json);
        }
        last
    }
}

/// The error event's message for a turn that failed after its first byte.
fn failure_message(failure: &TurnFailure) -> String {
    match failure {
        TurnFailure::Provider(err) => {
            format!("Model provider error: {err}; the partial reply was saved")
        }
        TurnFailure::Interrupted => {
            "The server is shutting down; the partial reply was saved".to_owned()
        }
        TurnFailure::NotSaved(_) => {
            "The reply could not be saved; it will show as interrupted".to_owned()
        }
        TurnFailure::Context(_) => "The conversation could not be loaded; try again".to_owned(),
        TurnFailure::Cancelled => "The reply was cancelled; the partial reply was saved".to_owned(),
    }
}

/// The error event's message for a resumed stream whose message ended
/// other than `complete` (the stored status is all that is known then).
pub fn ended_message(status: MessageStatus, saved: bool) -> &'static str {
    match (status, saved) {
        (_, false) | (MessageStatus::Streaming, _) => {
            "The reply could not be saved; it will show as interrupted"
        }
        (MessageStatus::Cancelled, _) => "The reply was cancelled; the partial reply was saved",
        (MessageStatus::Interrupted, _) => {
            "The reply was interrupted (the server stopped); the partial reply was saved"
        }
        (MessageStatus::Failed | MessageStatus::Complete, _) => {
            "The model failed; the partial reply was saved"
        }
    }
}

/// One event of a resumed stream (SPEC §14), with its original id.
#[derive(Debug)]
pub enum ReplayEvent {
    Token {
        id: u64,
        text: String,
    },
    /// The message is stored `complete`.
    Done {
        id: u64,
        text: String,
        usage: Usage,
        model: String,
    },
    Failed {
        id: u64,
        message: &'static str,
    },
}

/// A resumed stream as an SSE body: the same framing, batching and
/// keep-alives as [`EventBody`], with the ids the events were made with.
/// A resumed stream (SPEC §14) in the same format, with the ids the events
/// were made with.
pub struct ReplayEvents {
    chat_id: ChatId,
    message_id: MessageId,
}

/// The body of a resumed stream.
pub type ReplayBody = SseBody<ReplayEvents>;

impl SseBody<ReplayEvents> {
    pub fn new(
        rx: mpsc::Receiver<ReplayEvent>,
        chat_id: ChatId,
        message_id: MessageId,
        keepalive: Duration,
    ) -> Self {
        let encoder = ReplayEvents {
            chat_id,
            message_id,
        };
        Self::with_encoder(rx, None, encoder, keepalive)
    }
}

impl Encoder for ReplayEvents {
    type Event = ReplayEvent;

    fn encode(&mut self, event: ReplayEvent, out: &mut BytesMut) -> bool {
        let last = !matches!(event, ReplayEvent::Token { .. });
        let (id, json) = match &event {
            ReplayEvent::Token { id, text } => (
                *id,
                serde_json::to_string(&TokenEvent {
                    token: text,
                    done: false,
                }),
            ),
            ReplayEvent::Done {
                id,
                text,
                usage,
                model,
            } => (
                *id,
                serde_json::to_string(&DoneEvent {
                    token: "",
                    done: true,
                    full_text: text,
                    chat_id: Some(self.chat_id),
                    message_id: self.message_id,
                    model,
                    usage: (*usage).into(),
                }),
            ),
            ReplayEvent::Failed { id, message } => (
                *id,
                serde_json::to_string(&ErrorEvent {
                    error: "Stream failed",
                    message,
                }),
            ),
        };
        if let Ok(json) = json {
            write_frame(out, id, &json);
        }
        last
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confab_core::model::UsageSource;
    use confab_core::turn::TurnSummary;
    use futures::StreamExt;

    fn body(keepalive: Duration) -> (mpsc::Sender<TurnEvent>, EventBody) {
        let (tx, rx) = mpsc::channel(8);
        let turn = StartedTurn {
            chat_id: Some(ChatId::new()),
            message_id: MessageId::new(),
            created_at: chrono::Utc::now(),
            model: "m".into(),
            events: rx,
            budget: None,
        };
        (tx, EventBody::new(turn, None, keepalive))
    }

    #[tokio::test]
    async fn queued_events_leave_together_in_order_with_ids() {
        let (tx, mut body) = body(Duration::from_secs(60));
        tx.send(TurnEvent::Token("a".into())).await.unwrap();
        let one = body.next().await.unwrap().unwrap();
        assert_eq!(
            &one[..],
            b": ping\n\nid: 1\ndata: {\"token\":\"a\",\"done\":false}\n\n"
        );
        tx.send(TurnEvent::Token("b".into())).await.unwrap();
        tx.send(TurnEvent::Done(TurnSummary {
            text: "ab".into(),
            usage: Usage {
                prompt_tokens: 1,
                completion_tokens: 2,
                source: UsageSource::Provider,
            },
            finish: confab_core::turn::FinishReason::Stop,
        }))
        .await
        .unwrap();
        let batch = String::from_utf8(body.next().await.unwrap().unwrap().to_vec()).unwrap();
        assert!(
            batch.starts_with("id: 2\ndata: {\"token\":\"b\""),
            "{batch}"
        );
        assert!(batch.contains("id: 3\ndata: {\"token\":\"\",\"done\":true,\"fullText\":\"ab\""));
        assert!(body.next().await.is_none(), "the final event ends the body");
    }

    #[tokio::test]
    async fn silence_gets_a_ping_per_interval() {
        let (_tx, mut body) = body(Duration::from_millis(100));
        assert_eq!(&body.next().await.unwrap().unwrap()[..], PING);
        assert_eq!(&body.next().await.unwrap().unwrap()[..], PING);
        assert_eq!(&body.next().await.unwrap().unwrap()[..], PING);
    }
}
