//! Live streams (SPEC §14): the events of every generation running in this
//! process, readable by any number of readers from any event id, and handed
//! to a [`LiveRelay`] (Redis) for readers on other instances.
//!
//! The engine produces each event once ([`crate::turn`]); what is kept here
//! is the stream's [`LiveText`] — the text and the boundaries of its token
//! events, the same pair the flusher saves — plus the final event's id and
//! status. Event ids are 1, 2, … per message: token `n` is the `n`-th piece
//! of the text, and the final (`done` or error) event has the last id. The
//! stored boundaries make a replay from the database line up exactly with
//! what was streamed live, on any instance and after a restart.
//!
//! Events go to the relay only while a reader on another instance follows
//! the stream ([`LiveHub::relay_on_demand`], asked through the relay when
//! such a reader starts): most streams are read only by the request that
//! started them, and relaying every token of every stream was the largest
//! per-token cost the engine had. The first follow backfills every event so
//! far, in order, so the relay has the stream from event 1; the final event
//! is always relayed (one entry per stream), so a reader elsewhere learns of
//! the end at once even if its follow came too late.
//!
//! Cancel (an explicit request, or `STREAM_DETACH_SECONDS` running out with
//! nobody reading) reaches the generation through [`LiveStream::cancel`]; the
//! relay delivers cancels sent to other instances.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::flusher::LiveText;
use crate::ids::{ChatId, MessageId};
use crate::model::MessageStatus;
use crate::turn::{StopState, TurnEvent, TurnMetrics};

/// The byte lengths of a text's token events, LEB128-encoded one after the
/// other (one byte for a token shorter than 128 bytes): the boundaries a
/// resumed stream needs to give every token its original id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventLengths {
    bytes: Vec<u8>,
    count: u64,
}

impl EventLengths {
    pub fn push(&mut self, len: usize) {
        let mut n = len as u64;
        loop {
            let low = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                self.bytes.push(low);
                break;
            }
            self.bytes.push(low | 0x80);
        }
        self.count += 1;
    }

    /// How many events.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Decode the next length at `*at`, advancing it; `None` at the end or on a
/// malformed encoding.
fn next_length(bytes: &[u8], at: &mut usize) -> Option<usize> {
    let mut n: u64 = 0;
    let mut shift = 0u32;
    loop {
        let byte = *bytes.get(*at)?;
        *at += 1;
        n |= u64::from(byte & 0x7f).checked_shl(shift)?;
        if byte & 0x80 == 0 {
            return usize::try_from(n).ok();
        }
        shift += 7;
        if shift > 63 {
            return None;
        }
    }
}

/// The token events of a stored text, in order. Without boundaries (a
/// message stored before they were kept) the whole text is one event; `None`
/// when the boundaries do not add up to the text.
pub fn split_events<'a>(text: &'a str, lengths: Option<&[u8]>) -> Option<Vec<&'a str>> {
    let Some(bytes) = lengths else {
        return Some(if text.is_empty() {
            Vec::new()
        } else {
            vec![text]
        });
    };
    let mut out = Vec::new();
    let (mut at, mut start) = (0usize, 0usize);
    while at < bytes.len() {
        let len = next_length(bytes, &mut at)?;
        let end = start.checked_add(len)?;
        out.push(text.get(start..end)?);
        start = end;
    }
    (start == text.len()).then_some(out)
}

/// How a live stream ended: its last event id and the status it was stored
/// with (`saved` false when that final write failed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamEnd {
    pub id: u64,
    pub status: MessageStatus,
    pub saved: bool,
}

/// One event of a live stream as it crosses instances.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelayEntry {
    Token { id: u64, text: String },
    End(StreamEnd),
}

impl RelayEntry {
    pub fn id(&self) -> u64 {
        match self {
            RelayEntry::Token { id, .. } => *id,
            RelayEntry::End(end) => end.id,
        }
    }
}

#[derive(Clone, Debug, thiserror::Error)]
#[error("live stream relay unavailable: {0}")]
pub struct RelayError(pub String);

/// Carries live streams between instances (implemented over Redis Streams
/// and pub/sub in `confab-ratelimit`).
#[async_trait]
pub trait LiveRelay: Send + Sync + 'static {
    /// Queue an event of a live message for other instances. Never waits;
    /// events of one message keep their order. A lost event is a gap the
    /// reader fills from the database.
    fn publish(&self, message: MessageId, entry: RelayEntry);
    /// A reader of one message's relayed events.
    async fn follow(&self, message: MessageId) -> Result<Box<dyn RelayFollower>, RelayError>;
    /// Ask whichever instance generates `message` to stop.
    async fn cancel(&self, message: MessageId) -> Result<(), RelayError>;
    /// A reader on this instance follows `message` (renewed while it reads);
    /// the instance generating it starts relaying its events
    /// ([`LiveHub::relay_on_demand`]).
    async fn watch(&self, message: MessageId) -> Result<(), RelayError>;
    /// Whether a reader on some instance follows `message`.
    async fn watched(&self, message: MessageId) -> Result<bool, RelayError>;
}

#[async_trait]
pub trait RelayFollower: Send {
    /// Relayed events with ids above `after`, in order, waiting up to `wait`
    /// for the first; empty when none came.
    async fn read(&mut self, after: u64, wait: Duration) -> Result<Vec<RelayEntry>, RelayError>;
}

/// The live streams of this process.
#[derive(Clone)]
pub struct LiveHub {
    inner: Arc<HubInner>,
}

struct HubInner {
    streams: Mutex<HashMap<MessageId, Arc<LiveStream>>>,
    relay: OnceLock<Arc<dyn LiveRelay>>,
    detach_ms: AtomicU64,
    metrics: Arc<dyn TurnMetrics>,
}

impl LiveHub {
    pub(crate) fn new(metrics: Arc<dyn TurnMetrics>) -> Self {
        Self {
            inner: Arc::new(HubInner {
                streams: Mutex::new(HashMap::new()),
                relay: OnceLock::new(),
                detach_ms: AtomicU64::new(0),
                metrics,
            }),
        }
    }

    /// Set the relay (once; later calls keep the first) and
    /// `STREAM_DETACH_SECONDS`. Called at start-up, before any turn.
    pub fn configure(&self, relay: Option<Arc<dyn LiveRelay>>, detach: Duration) {
        if let Some(relay) = relay {
            let _ = self.inner.relay.set(relay);
        }
        let ms = u64::try_from(detach.as_millis()).unwrap_or(u64::MAX);
        self.inner.detach_ms.store(ms, Ordering::Relaxed);
    }

    pub fn relay(&self) -> Option<&Arc<dyn LiveRelay>> {
        self.inner.relay.get()
    }

    pub fn detach(&self) -> Duration {
        Duration::from_millis(self.inner.detach_ms.load(Ordering::Relaxed))
    }

    /// The live stream of `message`, when it is generated in this process.
    pub fn get(&self, message: MessageId) -> Option<Arc<LiveStream>> {
        let streams = self.inner.streams.lock().ok()?;
        streams.get(&message).cloned()
    }

    /// Stop a generation running in this process; false when there is none.
    pub fn cancel_local(&self, message: MessageId) -> bool {
        match self.get(message) {
            Some(stream) => {
                stream.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// A reader on another instance follows `message`: relay its events from
    /// now on, every event so far first (in order: under the text's lock,
    /// which each push holds while it relays). True when this call started
    /// relaying it; false when it is not generated here, not relayed (a
    /// turn stored in no chat) or relayed already.
    pub fn relay_on_demand(&self, message: MessageId) -> bool {
        let (Some(stream), Some(relay)) = (self.get(message), self.relay()) else {
            return false;
        };
        if !stream.relayable {
            return false;
        }
        let started = stream.text.with(|t| {
            if stream.relaying.swap(true, Ordering::AcqRel) {
                return false;
            }
            let events = split_events(&t.text, Some(t.lengths.as_bytes())).unwrap_or_default();
            for (id, text) in (1u64..).zip(events) {
                relay.publish(
                    message,
                    RelayEntry::Token {
                        id,
                        text: text.to_owned(),
                    },
                );
            }
            true
        });
        if started {
            self.inner.metrics.relay_started();
        }
        started
    }

    /// The messages generated in this process now.
    pub fn ids(&self) -> Vec<MessageId> {
        self.inner
            .streams
            .lock()
            .map(|s| s.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Streams live in this process.
    pub fn len(&self) -> usize {
        self.inner.streams.lock().map(|s| s.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Register a generation; `relayed` also sends its events to the relay;
    /// `detachable` lets it outlive its reader (`STREAM_DETACH_SECONDS`).
    pub(crate) fn open(
        &self,
        message: MessageId,
        chat: ChatId,
        relayed: bool,
        detachable: bool,
    ) -> Publication {
        let stream = Arc::new(LiveStream::new(message, chat, relayed));
        if let Ok(mut streams) = self.inner.streams.lock() {
            streams.insert(message, stream.clone());
        }
        Publication {
            hub: self.clone(),
            relay: if relayed { self.relay().cloned() } else { None },
            watch_relay: self.relay().cloned(),
            detach: if detachable {
                self.detach()
            } else {
                Duration::ZERO
            },
            stream,
            finished: false,
        }
    }

    /// A generation nobody can resume or cancel by id: a turn stored in no
    /// chat (the OpenAI-compatible API's stateless turns). Not registered,
    /// not relayed, never detached: its reader leaving cancels it.
    pub(crate) fn private(&self) -> Publication {
        // Never registered, so never looked up by its ids.
        let stream = Arc::new(LiveStream::new(MessageId::new(), ChatId::new(), false));
        Publication {
            hub: self.clone(),
            relay: None,
            watch_relay: None,
            detach: Duration::ZERO,
            stream,
            finished: false,
        }
    }

    fn remove(&self, stream: &Arc<LiveStream>) {
        if let Ok(mut streams) = self.inner.streams.lock()
            && streams
                .get(&stream.id)
                .is_some_and(|s| Arc::ptr_eq(s, stream))
        {
            streams.remove(&stream.id);
        }
    }
}

/// One generation of this process, as its readers see it.
///
/// One allocation holds everything a token touches — the text and its lock,
/// the flags the token path reads, the turn's stop flag — first and in this
/// order (`repr(C)`): a live stream's memory is cold by its next token (tens
/// of milliseconds and a thousand streams later), and each further
/// allocation touched per token was a cache miss of its own (three of them,
/// a quarter of the token loop's samples in the sse-1k profile).
#[repr(C)]
pub struct LiveStream {
    text: LiveText,
    /// Someone subscribed to `version` (set for good by [`Self::changes`]).
    /// The token path reads this flag rather than the watch's receiver
    /// count, which lives in the watch's own allocation.
    watched: AtomicBool,
    /// Its events go to the relay, since a reader on another instance
    /// followed it (a turn stored in a chat only: `relayable`).
    relaying: AtomicBool,
    /// Raised to stop the generation ([`crate::turn`]'s stop flag).
    pub(crate) stop: StopState,
    id: MessageId,
    chat: ChatId,
    /// Bumped at every event, so readers wake up.
    version: watch::Sender<u64>,
    end: OnceLock<StreamEnd>,
    cancel: CancellationToken,
    /// The request that started the stream stopped reading (detach mode).
    original_gone: CancellationToken,
    readers: AtomicUsize,
    relayable: bool,
}

/// Where a reader is in a [`LiveStream`].
#[derive(Clone, Debug)]
pub struct Cursor {
    /// The last event id read.
    after: u64,
    /// Position of event `after + 1` in the text and in the lengths, once found.
    at: Option<(usize, usize)>,
    skip: u64,
}

impl Cursor {
    /// A reader that has seen every event up to `after`.
    pub fn after(after: u64) -> Self {
        Self {
            after: 0,
            at: None,
            skip: after,
        }
    }

    /// The last event id read.
    pub fn last(&self) -> u64 {
        self.after.max(self.skip)
    }
}

impl LiveStream {
    pub(crate) fn new(id: MessageId, chat: ChatId, relayable: bool) -> Self {
        Self {
            text: LiveText::default(),
            watched: AtomicBool::new(false),
            relaying: AtomicBool::new(false),
            stop: StopState::default(),
            id,
            chat,
            version: watch::Sender::new(0),
            end: OnceLock::new(),
            cancel: CancellationToken::new(),
            original_gone: CancellationToken::new(),
            readers: AtomicUsize::new(0),
            relayable,
        }
    }

    /// Its text and the boundaries of its token events.
    pub(crate) fn text(&self) -> &LiveText {
        &self.text
    }

    pub fn message_id(&self) -> MessageId {
        self.id
    }

    pub fn chat_id(&self) -> ChatId {
        self.chat
    }

    /// Changes whenever an event is added.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.watched.store(true, Ordering::Release);
        self.version.subscribe()
    }

    /// Up to `max` token events after `cursor` (advancing it) and, once every
    /// token has been read, how the stream ended.
    pub fn read(&self, cursor: &mut Cursor, max: usize) -> (Vec<(u64, String)>, Option<StreamEnd>) {
        // The end is read first: it is set only after the last token, so
        // if it is set now, every token is already in the text.
        let end = self.end.get().copied();
        let tokens = self.text.with(|t| {
            let bytes = t.lengths.as_bytes();
            let (mut byte, mut at) = cursor.at.unwrap_or((0, 0));
            let mut out = Vec::new();
            while out.len() < max {
                let mark = at;
                let Some(len) = next_length(bytes, &mut at) else {
                    at = mark;
                    break;
                };
                let Some(piece) = t.text.get(byte..byte + len) else {
                    at = mark;
                    break;
                };
                byte += len;
                cursor.after += 1;
                if cursor.after > cursor.skip {
                    out.push((cursor.after, piece.to_owned()));
                }
            }
            cursor.at = Some((byte, at));
            out
        });
        let end = end.filter(|end| cursor.last() + 1 >= end.id);
        (tokens, end)
    }

    /// Count a reader for as long as the guard lives (detach mode waits for
    /// readers).
    pub fn attach(self: &Arc<Self>) -> ReaderGuard {
        self.readers.fetch_add(1, Ordering::AcqRel);
        ReaderGuard {
            stream: self.clone(),
        }
    }

    /// Ask the generation to stop (stored `cancelled`).
    pub fn cancel(&self) {
        self.cancel.cancel();
    }
}

/// A counted reader of a [`LiveStream`].
pub struct ReaderGuard {
    stream: Arc<LiveStream>,
}

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        self.stream.readers.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The engine's side of a live stream: it pushes the tokens and the end, and
/// asks when to stop.
pub(crate) struct Publication {
    hub: LiveHub,
    stream: Arc<LiveStream>,
    /// Where events go for other instances (interactive turns only).
    relay: Option<Arc<dyn LiveRelay>>,
    /// Asked whether readers elsewhere follow (every turn).
    watch_relay: Option<Arc<dyn LiveRelay>>,
    detach: Duration,
    finished: bool,
}

impl Publication {
    /// The stream it publishes to.
    pub(crate) fn stream(&self) -> &Arc<LiveStream> {
        &self.stream
    }

    /// Append a token event; its id.
    pub(crate) fn push(&self, token: &str) -> u64 {
        let stream = &self.stream;
        let id = match &self.relay {
            Some(relay) => stream.text.push_then(token, |id| {
                if stream.relaying.load(Ordering::Acquire) {
                    relay.publish(
                        stream.id,
                        RelayEntry::Token {
                            id,
                            text: token.to_owned(),
                        },
                    );
                }
            }),
            None => stream.text.push(token),
        };
        // Readers are rare (a resumed stream); waking nobody still costs the
        // watch's locks, once per token of every stream. Skipping is safe: a
        // reader is marked and subscribes before it first reads the text,
        // and the text's lock orders that read with this push, so a reader
        // this flag misses reads the token itself.
        if stream.watched.load(Ordering::Acquire) {
            stream.version.send_modify(|v| *v += 1);
        }
        id
    }

    /// Whether a disconnected generation goes on waiting for a reader.
    pub(crate) fn detaches(&self) -> bool {
        !self.detach.is_zero()
    }

    pub(crate) fn cancel_token(&self) -> CancellationToken {
        self.stream.cancel.clone()
    }

    /// Whether the turn was asked to stop (not merely left by its reader).
    pub(crate) fn cancel_requested(&self) -> bool {
        self.stream.cancel.is_cancelled()
    }

    /// The request that started the stream will get no more events.
    pub(crate) fn original_gone(&self) {
        self.stream.original_gone.cancel();
    }

    /// Resolves when the generation must stop for want of readers or by a
    /// cancel. Without detach: when the request's receiver `tx` is gone (a
    /// disconnect cancels, SPEC §6) or on cancel. With detach: on cancel, or
    /// when nobody — the request, a resumed reader here, a reader on another
    /// instance — has read for `STREAM_DETACH_SECONDS`.
    pub(crate) fn stop_signal(
        &self,
        tx: mpsc::Sender<TurnEvent>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let stream = self.stream.clone();
        let detach = self.detach;
        let relay = self.watch_relay.clone();
        let metrics = self.hub.inner.metrics.clone();
        async move {
            let cancel = stream.cancel.clone();
            if detach.is_zero() {
                tokio::select! {
                    _ = tx.closed() => {}
                    _ = cancel.cancelled() => {}
                }
                return;
            }
            tokio::select! {
                _ = tx.closed() => {}
                _ = stream.original_gone.cancelled() => {}
                _ = cancel.cancelled() => return,
            }
            drop(tx);
            let tick = (detach / 4).clamp(Duration::from_millis(50), Duration::from_millis(250));
            let mut alone_since: Option<Instant> = None;
            let mut remote = (false, None::<Instant>);
            loop {
                let local = stream.readers.load(Ordering::Acquire) > 0;
                if !local
                    && let Some(relay) = &relay
                    && remote
                        .1
                        .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
                {
                    remote = (
                        relay.watched(stream.id).await.unwrap_or(false),
                        Some(Instant::now()),
                    );
                }
                if local || remote.0 {
                    alone_since = None;
                } else {
                    let since = *alone_since.get_or_insert_with(|| {
                        metrics.generation_detached();
                        tracing::info!(messageId = %stream.id, detach_seconds = detach.as_secs_f64(), "stream has no reader; generation goes on waiting for one");
                        Instant::now()
                    });
                    if since.elapsed() >= detach {
                        // A last look first: the relay is asked at most once
                        // a second, and a reader may have come back on
                        // another instance since.
                        let back = match &relay {
                            Some(relay) => relay.watched(stream.id).await.unwrap_or(false),
                            None => false,
                        };
                        if !back {
                            tracing::info!(messageId = %stream.id, "no reader came back within STREAM_DETACH_SECONDS; cancelling the generation");
                            return;
                        }
                        remote = (true, Some(Instant::now()));
                        alone_since = None;
                    }
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(tick) => {}
                }
            }
        }
    }

    /// The stream's final event: stored with `status` (`saved` false when that
    /// write failed). Called once, after the final write.
    pub(crate) fn finish(&mut self, status: MessageStatus, saved: bool) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let id = self.stream.text.with(|t| t.lengths.count()) + 1;
        let end = StreamEnd { id, status, saved };
        let _ = self.stream.end.set(end);
        self.stream.version.send_modify(|v| *v += 1);
        if let Some(relay) = &self.relay {
            relay.publish(self.stream.id, RelayEntry::End(end));
        }
        self.hub.remove(&self.stream);
    }
}

impl Drop for Publication {
    fn drop(&mut self) {
        // A turn task that ended without settling (a panic): its guard
        // stores `failed`; readers hear that the reply was not saved.
        self.finish(MessageStatus::Failed, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_round_trip_and_split_the_text() {
        let tokens = ["Hello", " wörld", "", &"x".repeat(300), " 🎉"];
        let mut lengths = EventLengths::default();
        let mut text = String::new();
        for t in tokens {
            lengths.push(t.len());
            text.push_str(t);
        }
        assert_eq!(lengths.count(), 5);
        let split = split_events(&text, Some(lengths.as_bytes())).unwrap();
        assert_eq!(split, tokens);
        assert_eq!(split_events("abc", None).unwrap(), ["abc"]);
        assert!(split_events("", None).unwrap().is_empty());
        assert!(split_events("abc", Some(&[2])).is_none(), "short");
        assert!(split_events("abc", Some(&[4])).is_none(), "long");
        assert!(split_events("é", Some(&[1, 1])).is_none(), "inside a char");
        assert!(split_events("abc", Some(&[0x80])).is_none(), "truncated");
    }

    /// Records what it is asked to publish; `watched` answers what the test
    /// sets.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<RelayEntry>>, AtomicBool);

    #[async_trait]
    impl LiveRelay for Recorder {
        fn publish(&self, _message: MessageId, entry: RelayEntry) {
            self.0.lock().unwrap().push(entry);
        }
        async fn follow(&self, _: MessageId) -> Result<Box<dyn RelayFollower>, RelayError> {
            Err(RelayError("not here".into()))
        }
        async fn cancel(&self, _: MessageId) -> Result<(), RelayError> {
            Ok(())
        }
        async fn watch(&self, _: MessageId) -> Result<(), RelayError> {
            Ok(())
        }
        async fn watched(&self, _: MessageId) -> Result<bool, RelayError> {
            Ok(self.1.load(Ordering::Acquire))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_back_elsewhere_just_before_the_detach_deadline_keeps_the_generation() {
        let hub = LiveHub::new(Arc::new(crate::turn::NoMetrics));
        let relay = Arc::new(Recorder::default());
        hub.configure(Some(relay.clone()), Duration::from_millis(1500));
        let publication = hub.open(MessageId::new(), ChatId::new(), true, true);
        // The request that started it is gone at once.
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let stop = tokio::spawn(publication.stop_signal(tx));
        // A reader follows on another instance from 1.1 s on: after the
        // relay was last asked (≈ 1.0 s), before the deadline (1.5 s).
        tokio::time::sleep(Duration::from_millis(1100)).await;
        relay.1.store(true, Ordering::Release);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!stop.is_finished(), "cancelled under a reader");
        // Once that reader leaves too, the generation stops a detach later.
        relay.1.store(false, Ordering::Release);
        tokio::time::sleep(Duration::from_millis(3000)).await;
        assert!(stop.is_finished());
    }

    #[test]
    fn only_followed_streams_are_relayed_from_their_first_event_on() {
        let hub = LiveHub::new(Arc::new(crate::turn::NoMetrics));
        let recorder = Arc::new(Recorder::default());
        hub.configure(Some(recorder.clone()), Duration::ZERO);
        let relayed = |r: &Recorder| -> Vec<(u64, Option<String>)> {
            r.0.lock()
                .unwrap()
                .iter()
                .map(|e| match e {
                    RelayEntry::Token { id, text } => (*id, Some(text.clone())),
                    RelayEntry::End(end) => (end.id, None),
                })
                .collect()
        };

        // Nobody follows: only the end is relayed.
        let mut quiet = hub.open(MessageId::new(), ChatId::new(), true, false);
        quiet.push("a");
        quiet.push("b");
        quiet.finish(MessageStatus::Complete, true);
        assert_eq!(relayed(&recorder), vec![(3, None)]);
        recorder.0.lock().unwrap().clear();

        // Followed after two tokens: those two first, then the rest, once.
        let message = MessageId::new();
        let mut followed = hub.open(message, ChatId::new(), true, false);
        followed.push("a");
        followed.push("bb");
        assert!(relayed(&recorder).is_empty());
        assert!(hub.relay_on_demand(message));
        assert!(!hub.relay_on_demand(message), "already relayed");
        followed.push("ccc");
        followed.finish(MessageStatus::Complete, true);
        assert_eq!(
            relayed(&recorder),
            vec![
                (1, Some("a".into())),
                (2, Some("bb".into())),
                (3, Some("ccc".into())),
                (4, None)
            ]
        );
        assert!(!hub.relay_on_demand(message), "finished: not here any more");

        // A turn stored in no chat is never relayed.
        recorder.0.lock().unwrap().clear();
        let private = hub.private();
        private.push("x");
        assert!(!hub.relay_on_demand(private.stream.id));
        drop(private);
        assert!(relayed(&recorder).is_empty());
    }

    #[test]
    fn a_subscribed_reader_is_told_of_every_token() {
        let hub = LiveHub::new(Arc::new(crate::turn::NoMetrics));
        let publication = hub.open(MessageId::new(), ChatId::new(), false, true);
        publication.push("before");
        let stream = hub.get(publication.stream.id).unwrap();
        let mut changes = stream.changes();
        assert!(!changes.has_changed().unwrap());
        for (n, t) in ["a", "bb"].into_iter().enumerate() {
            publication.push(t);
            assert!(changes.has_changed().unwrap(), "token {n} woke nobody");
            changes.borrow_and_update();
        }
    }

    #[tokio::test]
    async fn readers_start_anywhere_and_see_the_end_after_the_last_token() {
        let hub = LiveHub::new(Arc::new(crate::turn::NoMetrics));
        let mut publication = hub.open(MessageId::new(), ChatId::new(), false, true);
        let stream = hub.get(publication.stream.id).unwrap();
        for t in ["a", "bb", "ccc"] {
            publication.push(t);
        }
        let mut from_one = Cursor::after(1);
        let (tokens, end) = stream.read(&mut from_one, 1);
        assert_eq!(tokens, vec![(2, "bb".to_owned())]);
        assert!(end.is_none());
        publication.finish(MessageStatus::Complete, true);
        let (tokens, end) = stream.read(&mut from_one, 10);
        assert_eq!(tokens, vec![(3, "ccc".to_owned())]);
        assert_eq!(end.map(|e| e.id), Some(4));
        let mut from_zero = Cursor::after(0);
        let (tokens, end) = stream.read(&mut from_zero, 2);
        assert_eq!(tokens.len(), 2);
        assert!(end.is_none(), "the end comes after the last token");
        assert!(
            hub.get(stream.id).is_none(),
            "finished streams leave the hub"
        );
        let mut past = Cursor::after(3);
        let (tokens, end) = stream.read(&mut past, 10);
        assert!(tokens.is_empty());
        assert_eq!(end.map(|e| e.status), Some(MessageStatus::Complete));
    }
}
