//! Server-side SSE framing for every stream: `POST /chat/stream`, resumed
//! streams and `/v1/chat/completions`.
//!
//! The response body encodes the turn's events and sends whatever is queued
//! in one write. The write is the largest cost of a token (the kernel's TCP
//! send path: a third of the server's CPU in the sse-1k profile), so writes
//! are paced ([`Pacing::window`], `SSE_COALESCE_MS`): an event that finds
//! the stream quiet leaves at once, and the events that follow it within
//! the window leave together at its end — never later than the window, the
//! first token and the final event never held. Each event is still its own
//! SSE event with its own `id:`; only the TCP writes are fewer. Hand-written
//! instead of axum's `Sse` for that batching.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use confab_core::admission::Admission;
use confab_core::model::{MessageStatus, Usage};
use confab_core::turn::{StartedTurn, TurnEvent, TurnFailure};
use confab_core::{ChatId, MessageId};
use futures::task::AtomicWaker;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::time::{Instant, Sleep};

use crate::wire::{DoneEvent, ErrorEvent, TokenEvent};

/// At most this much is gathered into one write.
const MAX_BATCH_BYTES: usize = 16 * 1024;
/// A window that gathers this many events marks its producer as fast
/// (faster than a typical model: 160 a second at the default window).
const FAST_EVENTS: usize = 16;
/// A batch of this many events leaves at once: half the turn's channel
/// (`confab_core::turn::CHANNEL_CAPACITY`), so a producer faster than the
/// window is never held up by it.
const FULL_EVENTS: usize = confab_core::turn::CHANNEL_CAPACITY / 2;
/// The shortest keep-alive interval a stream uses, whatever is configured.
const MIN_KEEPALIVE: Duration = Duration::from_millis(100);

/// When a stream writes: one home for the keep-alive and the write pacing
/// of every kind of stream.
#[derive(Clone, Debug)]
pub struct Pacing {
    /// A `: ping` after this long without a write (`SSE_KEEPALIVE_SECONDS`,
    /// at least 100 ms); also how long a stream's headers wait for its
    /// first event.
    pub keepalive: Duration,
    /// After a write that carried events, the next waits until this much
    /// has passed (`SSE_COALESCE_MS`; zero: every event at once). The final
    /// event is never held.
    pub coalesce: Duration,
    /// What `coalesce` stretches to as the server fills up
    /// (`SSE_COALESCE_MAX_MS`; see [`Pacing::window`]).
    pub coalesce_max: Duration,
    /// The server's turns in flight and their bound, when the window
    /// follows the load.
    load: Option<Admission>,
}

impl Pacing {
    pub fn new(keepalive: Duration, coalesce: Duration) -> Self {
        Self {
            keepalive: keepalive.max(MIN_KEEPALIVE),
            coalesce,
            coalesce_max: coalesce,
            load: None,
        }
    }

    /// Windows that stretch from `coalesce` to `coalesce_max` as `load`
    /// fills up (see [`Pacing::window`]).
    pub fn following(mut self, load: Admission, coalesce_max: Duration) -> Self {
        self.coalesce_max = coalesce_max.max(self.coalesce);
        self.load = Some(load);
        self
    }

    pub fn of(state: &crate::state::AppState) -> Self {
        let config = &state.config;
        Self::new(config.sse_keepalive, config.sse_coalesce)
            .following(state.engine.admission().clone(), config.sse_coalesce_max)
    }

    /// The window after a write: `coalesce` while at most half of the
    /// server's places for turns are taken, then growing linearly to
    /// `coalesce_max` as the rest fill. A nearly full server spends fewer
    /// writes (a third of its CPU per token at 10 tokens a second: one
    /// write each) on the streams it runs, and keeps the CPU for their pace
    /// and for the first tokens of new ones; each token is still its own
    /// event, and a stream's first token and final event are never held.
    pub fn window(&self) -> Duration {
        let Some(load) = &self.load else {
            return self.coalesce;
        };
        if self.coalesce.is_zero() || self.coalesce_max <= self.coalesce {
            return self.coalesce;
        }
        let max = load.max();
        let half = max / 2;
        let taken = load.in_flight();
        if taken <= half {
            return self.coalesce;
        }
        let share = (taken - half) as f64 / (max - half).max(1) as f64;
        self.coalesce + (self.coalesce_max - self.coalesce).mul_f64(share.min(1.0))
    }
}

/// Append one SSE event, `id: <id>\n` (when given) then `data: <json>\n\n`,
/// the JSON serialised straight into `out`: serde_json's compact output is
/// one line (newlines inside strings are escaped). The one home of the
/// framing for every stream. A value that cannot be serialised (none of
/// ours can fail: no maps with non-string keys) leaves `out` as it was
/// rather than send a broken event.
pub fn write_event<T: serde::Serialize>(out: &mut BytesMut, id: Option<u64>, value: &T) {
    use bytes::BufMut;
    let start = out.len();
    out.reserve(EVENT_CAPACITY);
    if let Some(id) = id {
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(itoa::Buffer::new().format(id).as_bytes());
        out.extend_from_slice(b"\n");
    }
    out.extend_from_slice(b"data: ");
    if serde_json::to_writer((&mut *out).writer(), value).is_err() {
        out.truncate(start);
        return;
    }
    out.extend_from_slice(b"\n\n");
}

/// Room reserved per event, so that a typical token event is written
/// without the buffer growing (and reallocating) on the way.
const EVENT_CAPACITY: usize = 128;

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
    /// When the last write that carried events left: the next keep-alive is
    /// due a keep-alive interval after it.
    last_write: Option<Instant>,
    finished: bool,
    /// The write windows (the keep-alive is in `ping`).
    pacing: Pacing,
    /// Events encoded but not yet written (held until `quiet_until`).
    held: BytesMut,
    /// Until when a write waits, after the last write that carried events.
    quiet_until: Option<Instant>,
    /// The one timer of the hold, reset per window (allocated on first use).
    hold: Option<Pin<Box<Sleep>>>,
    /// Events gathered since the last write.
    pending: usize,
    /// The last write carried [`FAST_EVENTS`] or more: the producer is fast,
    /// and the hold listens to the channel too (see `poll_next`).
    fast: bool,
    /// Woken by the producer after its last event (`StartedTurn::end`), so
    /// that a hold, which does not listen to the channel, ends at once.
    end: Option<Arc<AtomicWaker>>,
}

impl<E: Encoder> SseBody<E> {
    /// `first`: an event already taken from `rx` (sent first).
    pub fn with_encoder(
        rx: mpsc::Receiver<E::Event>,
        first: Option<E::Event>,
        encoder: E,
        pacing: Pacing,
    ) -> Self {
        let keepalive = pacing.keepalive;
        let mut ping = tokio::time::interval_at(Instant::now() + keepalive, keepalive);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            rx,
            first,
            opening: true,
            encoder,
            ping,
            last_write: None,
            finished: false,
            pacing,
            held: BytesMut::new(),
            quiet_until: None,
            hold: None,
            pending: 0,
            fast: false,
            end: None,
        }
    }

    /// Hold writes only with `end`: the producer's signal that its last
    /// event is queued (without it, a hold could keep the end back for a
    /// window). Without this, writes are not paced.
    pub fn ended_by(mut self, end: Arc<AtomicWaker>) -> Self {
        self.end = Some(end);
        self
    }

    fn encode(&mut self, event: E::Event, out: &mut BytesMut) {
        self.pending += 1;
        if self.encoder.encode(event, out) {
            self.finished = true;
        }
    }

    /// Whether what is gathered goes now, window or not: the stream ended,
    /// or the batch is full (by size, or by count: half the turn's channel,
    /// so a fast producer never waits on a window).
    fn must_write(&self, out: &BytesMut) -> bool {
        self.finished || out.len() >= MAX_BATCH_BYTES || self.pending >= FULL_EVENTS
    }

    /// Encode events from the channel until `enough`; `Pending` when it ran
    /// dry first (its next event wakes the task).
    fn receive(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut BytesMut,
        enough: impl Fn(&Self, &BytesMut) -> bool,
    ) -> Poll<()> {
        while !enough(self, out) {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(event)) => self.encode(event, out),
                Poll::Ready(None) => self.finished = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(())
    }

    /// Encode what the channel already holds, without registering a wake-up.
    fn gather(&mut self, out: &mut BytesMut) {
        while !self.finished && out.len() < MAX_BATCH_BYTES {
            match self.rx.try_recv() {
                Ok(event) => self.encode(event, out),
                Err(TryRecvError::Disconnected) => self.finished = true,
                Err(TryRecvError::Empty) => break,
            }
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
        // What a window held back: events only (the opening is never held).
        let mut out = std::mem::take(&mut this.held);
        let mut opening = 0;
        if this.opening {
            this.opening = false;
            let before = out.len();
            this.encoder.opening(&mut out);
            opening = out.len() - before;
        }
        if let Some(first) = this.first.take() {
            this.encode(first, &mut out);
        }
        let now = Instant::now();
        let holding = this.end.is_some() && this.quiet_until.is_some_and(|until| now < until);
        // Gather without asking the channel to wake us: within a window the
        // hold's timer will, so the tokens that follow a write cost no task
        // wake-up each; the channel is polled only when nothing was queued.
        this.gather(&mut out);
        if holding && !this.must_write(&out) {
            let until = this.quiet_until.unwrap_or(now);
            let hold = this
                .hold
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
            if hold.deadline() != until {
                hold.as_mut().reset(until);
            }
            if hold.as_mut().poll(cx).is_pending() {
                if this.fast || this.pending >= FAST_EVENTS {
                    // A fast producer: woken by each event, so that a batch
                    // leaves as soon as it is full rather than the producer
                    // waiting for the window with the channel full.
                    this.fast = true;
                    if this.receive(cx, &mut out, Self::must_write).is_pending() {
                        this.held = out;
                        return Poll::Pending;
                    }
                } else if let Some(end) = &this.end {
                    // Woken by the end; the channel is looked at once more
                    // after registering, for an end queued just before.
                    end.register(cx.waker());
                    this.gather(&mut out);
                    if !this.must_write(&out) {
                        this.held = out;
                        return Poll::Pending;
                    }
                }
            }
            // The window is over, or the batch must go now.
        }
        if out.len() == opening {
            // Nothing queued: wait for the channel.
            let _ = this.receive(cx, &mut out, |body, out| {
                body.finished || out.len() >= MAX_BATCH_BYTES
            });
        }
        if !out.is_empty() {
            // The opening alone does not count as activity: the first
            // keep-alive is due one interval after it, and it opens no
            // window. Nor does a full batch: the rest of a burst follows at
            // once.
            if out.len() > opening {
                this.last_write = Some(now);
                this.fast = this.pending >= FAST_EVENTS;
                let window = this.pacing.window();
                this.quiet_until =
                    (!window.is_zero() && out.len() < MAX_BATCH_BYTES).then(|| now + window);
            }
            this.pending = 0;
            return Poll::Ready(Some(Ok(out.freeze())));
        }
        this.held = out;
        if this.finished {
            return Poll::Ready(None);
        }
        // Nothing queued: a keep-alive when a whole interval passed silently
        // (a tick that comes sooner after a write moves to that write's
        // interval, so no silence lasts longer than one).
        while this.ping.poll_tick(cx).is_ready() {
            match this.last_write.map(|at| at + this.pacing.keepalive) {
                Some(due) if now < due => this.ping.reset_at(due),
                _ => return Poll::Ready(Some(Ok(ping_frame()))),
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
    pub fn new(turn: StartedTurn, first: Option<TurnEvent>, pacing: Pacing) -> Self {
        let encoder = TurnEvents {
            seq: 0,
            chat_id: turn.chat_id,
            message_id: turn.message_id,
            model: turn.model,
        };
        Self::with_encoder(turn.events, first, encoder, pacing).ended_by(turn.end)
    }
}

impl Encoder for TurnEvents {
    type Event = TurnEvent;

    fn encode(&mut self, event: TurnEvent, out: &mut BytesMut) -> bool {
        self.seq += 1;
        let id = Some(self.seq);
        match &event {
            TurnEvent::Token(token) => {
                write_event(out, id, &TokenEvent { token, done: false });
                false
            }
            TurnEvent::Done(summary) => {
                let done = DoneEvent {
                    token: "",
                    done: true,
                    full_text: &summary.text,
                    chat_id: self.chat_id,
                    message_id: self.message_id,
                    model: &self.model,
                    usage: summary.usage.into(),
                };
                write_event(out, id, &done);
                true
            }
            TurnEvent::Failed(failure) => {
                let message = failure_message(failure);
                let failed = ErrorEvent {
                    error: "Stream failed",
                    message: &message,
                };
                write_event(out, id, &failed);
                true
            }
        }
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
        TurnFailure::NotSaved(confab_core::StoreError::Unavailable(_)) => {
            "The database is unavailable; the reply is kept and saved once it is back".to_owned()
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
        // Not saved when it ended: a final write deferred by an outage is
        // saved once the database is back; otherwise recovery marks it.
        (_, false) | (MessageStatus::Streaming, _) => {
            "The reply was not saved when it ended; it shows as interrupted unless it is saved once the database is back"
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

/// A resumed stream (SPEC §14) in the same format, with the ids the events
/// were made with.
pub struct ReplayEvents {
    chat_id: ChatId,
    message_id: MessageId,
}

/// The body of a resumed stream. Never paced (it has no end signal, see
/// [`SseBody::ended_by`]): a replay of stored text is a burst that must
/// leave at once (SPEC §14), and resumes are rare.
pub type ReplayBody = SseBody<ReplayEvents>;

impl SseBody<ReplayEvents> {
    pub fn new(
        rx: mpsc::Receiver<ReplayEvent>,
        chat_id: ChatId,
        message_id: MessageId,
        pacing: Pacing,
    ) -> Self {
        let encoder = ReplayEvents {
            chat_id,
            message_id,
        };
        Self::with_encoder(rx, None, encoder, pacing)
    }
}

impl Encoder for ReplayEvents {
    type Event = ReplayEvent;

    fn encode(&mut self, event: ReplayEvent, out: &mut BytesMut) -> bool {
        match &event {
            ReplayEvent::Token { id, text } => {
                let token = TokenEvent {
                    token: text,
                    done: false,
                };
                write_event(out, Some(*id), &token);
                false
            }
            ReplayEvent::Done {
                id,
                text,
                usage,
                model,
            } => {
                let done = DoneEvent {
                    token: "",
                    done: true,
                    full_text: text,
                    chat_id: Some(self.chat_id),
                    message_id: self.message_id,
                    model,
                    usage: (*usage).into(),
                };
                write_event(out, Some(*id), &done);
                true
            }
            ReplayEvent::Failed { id, message } => {
                let failed = ErrorEvent {
                    error: "Stream failed",
                    message,
                };
                write_event(out, Some(*id), &failed);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confab_core::model::UsageSource;
    use confab_core::turn::TurnSummary;
    use futures::StreamExt;

    #[test]
    fn the_window_stretches_as_the_server_fills_up() {
        let admission = Admission::new(10);
        let ms = Duration::from_millis;
        let pacing = Pacing::new(ms(60_000), ms(100)).following(admission.clone(), ms(250));
        let mut places = Vec::new();
        let mut windows = Vec::new();
        for _ in 0..10 {
            places.push(admission.try_admit().expect("a place"));
            windows.push(pacing.window());
        }
        // Up to half full: the configured window; then linear to the most.
        assert_eq!(&windows[..5], &[ms(100); 5]);
        assert_eq!(windows[5], ms(130));
        assert_eq!(windows[7], ms(190));
        assert_eq!(windows[9], ms(250));
        drop(places);
        assert_eq!(pacing.window(), ms(100));
        // No pacing stays no pacing; a smaller most changes nothing.
        let unpaced = Pacing::new(ms(60_000), ms(0)).following(admission.clone(), ms(250));
        let small = Pacing::new(ms(60_000), ms(100)).following(admission.clone(), ms(50));
        let _full: Vec<_> = (0..10).filter_map(|_| admission.try_admit()).collect();
        assert_eq!(unpaced.window(), ms(0));
        assert_eq!(small.window(), ms(100));
    }

    fn body(pacing: Pacing) -> (mpsc::Sender<TurnEvent>, EventBody) {
        let (tx, body, _) = body_with_end(pacing);
        (tx, body)
    }

    fn body_with_end(pacing: Pacing) -> (mpsc::Sender<TurnEvent>, EventBody, Arc<AtomicWaker>) {
        let (tx, rx) = mpsc::channel(confab_core::turn::CHANNEL_CAPACITY);
        let end = Arc::new(AtomicWaker::new());
        let turn = StartedTurn {
            chat_id: Some(ChatId::new()),
            message_id: MessageId::new(),
            created_at: chrono::Utc::now(),
            model: "m".into(),
            events: rx,
            end: end.clone(),
            budget: None,
        };
        (tx, EventBody::new(turn, None, pacing), end)
    }

    fn done(text: &str) -> TurnEvent {
        TurnEvent::Done(Box::new(TurnSummary {
            text: text.into(),
            usage: Usage {
                prompt_tokens: 1,
                completion_tokens: 2,
                source: UsageSource::Provider,
            },
            finish: confab_core::turn::FinishReason::Stop,
        }))
    }

    /// A body paced by `window` that has just written its first token, so
    /// that a window is open.
    async fn in_a_window(
        window: Duration,
    ) -> (mpsc::Sender<TurnEvent>, EventBody, Arc<AtomicWaker>) {
        let (tx, mut body, end) = body_with_end(Pacing::new(Duration::from_secs(60), window));
        tx.send(token("a")).await.unwrap();
        next_text(&mut body).await;
        (tx, body, end)
    }

    fn token(text: &str) -> TurnEvent {
        TurnEvent::Token(text.into())
    }

    async fn next_text(body: &mut EventBody) -> String {
        String::from_utf8(body.next().await.unwrap().unwrap().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn queued_events_leave_together_in_order_with_ids() {
        let (tx, mut body) = body(Pacing::new(Duration::from_secs(60), Duration::ZERO));
        tx.send(token("a")).await.unwrap();
        let one = body.next().await.unwrap().unwrap();
        assert_eq!(
            &one[..],
            b": ping\n\nid: 1\ndata: {\"token\":\"a\",\"done\":false}\n\n"
        );
        tx.send(token("b")).await.unwrap();
        tx.send(done("ab")).await.unwrap();
        let batch = next_text(&mut body).await;
        assert!(
            batch.starts_with("id: 2\ndata: {\"token\":\"b\""),
            "{batch}"
        );
        assert!(batch.contains("id: 3\ndata: {\"token\":\"\",\"done\":true,\"fullText\":\"ab\""));
        assert!(body.next().await.is_none(), "the final event ends the body");
    }

    #[tokio::test]
    async fn silence_gets_a_ping_per_interval() {
        let (_tx, mut body) = body(Pacing::new(Duration::from_millis(100), Duration::ZERO));
        assert_eq!(&body.next().await.unwrap().unwrap()[..], PING);
        assert_eq!(&body.next().await.unwrap().unwrap()[..], PING);
        assert_eq!(&body.next().await.unwrap().unwrap()[..], PING);
    }

    #[tokio::test(start_paused = true)]
    async fn a_keep_alive_follows_the_last_write_by_one_interval() {
        let interval = Duration::from_millis(100);
        let (tx, mut body) = body(Pacing::new(interval, Duration::ZERO));
        let start = Instant::now();
        assert_eq!(
            &body.next().await.unwrap().unwrap()[..],
            PING,
            "the opening"
        );
        assert_eq!(&body.next().await.unwrap().unwrap()[..], PING);
        assert_eq!(start.elapsed(), interval);
        // A token just after that keep-alive: the next one is due an
        // interval after the token, not two after the keep-alive.
        tokio::time::sleep(Duration::from_millis(1)).await;
        tx.send(token("a")).await.unwrap();
        assert!(next_text(&mut body).await.contains("\"token\":\"a\""));
        assert_eq!(&body.next().await.unwrap().unwrap()[..], PING);
        assert_eq!(start.elapsed(), Duration::from_millis(201));
        // And silence goes on getting one per interval.
        assert_eq!(&body.next().await.unwrap().unwrap()[..], PING);
        assert_eq!(start.elapsed(), Duration::from_millis(301));
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_after_a_write_wait_for_the_window_then_leave_together() {
        let window = Duration::from_millis(50);
        let (tx, mut body) = body(Pacing::new(Duration::from_secs(60), window));
        let start = Instant::now();
        tx.send(token("a")).await.unwrap();
        let first = next_text(&mut body).await;
        assert!(first.ends_with("id: 1\ndata: {\"token\":\"a\",\"done\":false}\n\n"));
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "a quiet stream's token leaves at once"
        );
        tx.send(token("b")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        tx.send(token("c")).await.unwrap();
        let batch = next_text(&mut body).await;
        assert_eq!(
            start.elapsed(),
            window,
            "held until the window's end, not longer"
        );
        assert!(
            batch.starts_with("id: 2\ndata: {\"token\":\"b\"")
                && batch.contains("id: 3\ndata: {\"token\":\"c\""),
            "{batch}"
        );
        // A token after a quiet spell longer than the window leaves at once.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let at = Instant::now();
        tx.send(token("d")).await.unwrap();
        let late = next_text(&mut body).await;
        assert_eq!(at.elapsed(), Duration::ZERO);
        assert!(late.starts_with("id: 4\n"), "{late}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_final_event_is_never_held() {
        let (tx, mut body, _end) = in_a_window(Duration::from_secs(5)).await;
        let start = Instant::now();
        tx.send(token("b")).await.unwrap();
        tx.send(done("ab")).await.unwrap();
        let last = next_text(&mut body).await;
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "the final event ends the hold"
        );
        assert!(
            last.starts_with("id: 2\n") && last.contains("\"done\":true"),
            "{last}"
        );
        assert!(body.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_end_of_a_turn_wakes_a_holding_body_at_once() {
        let (tx, mut body, end) = in_a_window(Duration::from_secs(5)).await;
        let start = Instant::now();
        let turn = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            tx.send(token("b")).await.unwrap();
            tx.send(done("ab")).await.unwrap();
            end.wake();
        });
        let last = next_text(&mut body).await;
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(10),
            "not the window's end"
        );
        assert!(
            last.contains("id: 2\n") && last.contains("\"done\":true"),
            "{last}"
        );
        turn.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_larger_than_a_batch_is_not_held() {
        let (tx, mut body, _end) = in_a_window(Duration::from_secs(5)).await;
        let start = Instant::now();
        let big = "x".repeat(4096);
        for _ in 0..5 {
            tx.send(token(&big)).await.unwrap();
        }
        let batch = next_text(&mut body).await;
        let rest = next_text(&mut body).await;
        assert_eq!(start.elapsed(), Duration::ZERO, "a full batch goes at once");
        assert!(batch.len() >= MAX_BATCH_BYTES, "{}", batch.len());
        assert!(rest.contains("id: 6\n"), "the rest follows at once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_producer_is_not_paced_by_the_window() {
        let (tx, mut body, _end) = in_a_window(Duration::from_secs(5)).await;
        let start = Instant::now();
        let producer = tokio::spawn(async move {
            for _ in 0..500 {
                tx.send(token("t")).await.unwrap();
            }
        });
        let (mut events, mut writes) = (0, 0);
        while events < 500 {
            events += next_text(&mut body).await.matches("id: ").count();
            writes += 1;
        }
        producer.await.unwrap();
        // The first window, which began as a slow stream's, is waited for
        // (with the channel full); from then on the batches leave as they fill.
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(5),
            "one window, not one per batch"
        );
        assert!(
            writes <= 500 / FULL_EVENTS,
            "{writes} writes: still batched"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_token_is_sent_when_the_turn_drops_its_sender() {
        let (tx, mut body, _end) = in_a_window(Duration::from_secs(5)).await;
        tx.send(token("b")).await.unwrap();
        drop(tx);
        let rest = next_text(&mut body).await;
        assert!(rest.starts_with("id: 2\n"), "{rest}");
        assert!(body.next().await.is_none());
    }
}
