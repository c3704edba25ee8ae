//! The turn engine: the one place a turn is run (SPEC §6, §11).
//!
//! A turn is: resolve the model and check the chat → begin (commit the user
//! message and a `streaming` assistant message) → assemble the context within
//! the model's token budget → call the provider (retries, with backoff, only
//! before the first token is forwarded; the four timeouts) → forward tokens →
//! settle (final status, text and usage in one write) — and every exit path
//! (done, upstream failure, client gone, shutdown, even a panic) ends in the
//! same [`Run::settle`].
//!
//! The engine yields [`TurnEvent`]s on a bounded channel; the HTTP routes only
//! turn those into their wire format. The generation runs in its own tracked
//! task, decoupled from the response: when the client goes away the receiver
//! is dropped, the engine sees `Sender::closed()` at once — even while the
//! model is silent — and drops the upstream stream, which closes the upstream
//! request.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::MaybeDone;
use futures::task::AtomicWaker;
use futures::{FutureExt, StreamExt};
use rand::Rng;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::admission::{Admission, Admitted};
use crate::flusher::Flusher;
use crate::ids::{ChatId, MessageId, UserId};
use crate::live::{LiveHub, LiveStream, Publication};
use crate::model::{
    BegunTurn, Chat, FinishedMessage, IdempotencyClaim, IdempotencyRecord, LedgerCost, LedgerEntry,
    MessageRole, MessageStatus, MessageText, NewTurn, Principal, TurnChat, Usage, UsageSource,
};
use crate::models::{Model, ModelRegistry};
use crate::provider::{
    ChatProvider, ChatRequest, Chunk, ChunkStream, PromptMessage, ProviderError, ReportedUsage,
    Sampling, TimeoutPhase,
};
use crate::ratelimit::{
    BudgetState, BudgetWindow, Held, RateLimitError, RateTake, Reservation, ReserveRequest,
    TokenBudget,
};
use crate::service::{Access, ChatService, ServiceError};
use crate::store::{Store, StoreError};

/// Events buffered between the engine and a slow client. With the send
/// timeout this bounds what one stalled client can make the server hold.
/// The response body writes a batch once half of it is queued, whatever
/// its write pacing (`SSE_COALESCE_MS`), so the channel is not what paces a
/// fast model.
pub const CHANNEL_CAPACITY: usize = 64;
/// How long a retried request waits for the first request with the same
/// `Idempotency-Key` to finish before giving up with `IdempotencyInProgress`.
const IDEMPOTENCY_WAIT: Duration = Duration::from_secs(10);
const IDEMPOTENCY_POLL: Duration = Duration::from_millis(10);
const IDEMPOTENCY_POLL_MAX: Duration = Duration::from_millis(250);
/// Earlier messages are read this many at a time, newest first, until the
/// budget is full: the query never reads much more than what fits.
const HISTORY_PAGE: u32 = 32;
/// Tokens a chat format spends per message besides its text (role markers).
const PER_MESSAGE_OVERHEAD: u64 = 4;
/// Attempts, and the first pause between them, for a turn's final write.
const FINAL_WRITE_ATTEMPTS: u32 = 4;
const FINAL_WRITE_BACKOFF: Duration = Duration::from_millis(250);

/// The engine's settings (SPEC §11 "Upstream behaviour").
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Retries after the first attempt (`PROVIDER_MAX_RETRIES`).
    pub max_retries: u32,
    /// Longest wait before a retry (`PROVIDER_MAX_RETRY_WAIT_MS`); an upstream
    /// that asks for longer is not retried.
    pub max_retry_wait: Duration,
    /// First backoff step; doubled per attempt, with jitter.
    pub retry_base: Duration,
    pub first_token_timeout: Duration,
    pub idle_timeout: Duration,
    pub total_timeout: Duration,
    /// A client that accepts no event for this long is treated as gone.
    pub send_timeout: Duration,
    /// Token budget backend unreachable: admit (and count) or refuse (503).
    pub budget_fail_open: bool,
    /// Turns that may run at once, all routes together
    /// (`MAX_CONCURRENT_STREAMS`); past it a turn is refused at once
    /// ([`ServiceError::AtCapacity`]).
    pub max_concurrent_turns: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_retries: 2,
            max_retry_wait: Duration::from_secs(10),
            retry_base: Duration::from_millis(250),
            first_token_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            total_timeout: Duration::from_secs(600),
            send_timeout: Duration::from_secs(30),
            budget_fail_open: true,
            max_concurrent_turns: crate::admission::UNBOUNDED,
        }
    }
}

/// How a turn ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
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
    pub const fn status(self) -> MessageStatus {
        match self {
            Outcome::Complete => MessageStatus::Complete,
            Outcome::Cancelled { .. } => MessageStatus::Cancelled,
            Outcome::Failed => MessageStatus::Failed,
            Outcome::Interrupted => MessageStatus::Interrupted,
        }
    }

    pub const fn as_str(self) -> &'static str {
        self.status().as_str()
    }
}

/// What the engine reports to the metrics registry (the server implements
/// it with Prometheus; core stays free of a metrics crate). Labels are model
/// names and fixed words, never tenant ids.
pub trait TurnMetrics: Send + Sync + 'static {
    fn turn_started(&self, _interactive: bool) {}
    fn turn_finished(&self, _interactive: bool, _outcome: Outcome) {}
    fn token_forwarded(&self, _interactive: bool) {}
    /// The first token reached the client's channel: since the request
    /// arrived, and since the successful upstream attempt began.
    fn first_token(&self, _interactive: bool, _model: &str, _since_request: Duration) {}
    fn upstream_first_token(&self, _model: &str, _since_attempt: Duration) {}
    fn disconnect_detected(&self, _elapsed: Duration) {}
    /// One upstream attempt ended (`outcome`: `ok`, `cancelled` or an error label).
    fn upstream_request(&self, _model: &str, _outcome: &'static str) {}
    fn upstream_retry(&self, _model: &str, _reason: &'static str) {}
    fn usage(&self, _model: &str, _prompt: u64, _completion: u64) {}
    /// A token-budget step: `event` is `reserved`, `settled`, `refused` or
    /// `error`; `kind` the limit that refused (`org_day`, …) or `granted`.
    fn budget(&self, _event: &'static str, _kind: &'static str, _tokens: u64) {}
    fn flushed(&self, _rows: u64, _took: Duration) {}
    /// A flush failed after saving `rows` of its texts (the rest wait for
    /// the next tick).
    fn flush_failed(&self, _rows: u64, _took: Duration) {}
    /// A turn's final write failed for an outage and is written later:
    /// `deferred` when that starts, then `saved` or `lost`.
    fn final_write_deferred(&self, _outcome: &'static str) {}
    /// A generation lost its last reader and goes on waiting for one
    /// (`STREAM_DETACH_SECONDS`).
    fn generation_detached(&self) {}
    /// A step of the cross-instance relay failed (`op`: `publish`, `read`,
    /// `cancel`, `watch`).
    fn relay_error(&self, _op: &'static str) {}
    /// A live stream's events began to go to the relay: a reader on another
    /// instance follows it.
    fn relay_started(&self) {}
    /// A turn was refused before it began: `reason` is `capacity` (the
    /// concurrent-turn bound) or `database` (no connection in time, or down).
    fn turn_refused(&self, _interactive: bool, _reason: &'static str) {}
    /// A turn took (`true`) or gave back (`false`) its admission place.
    fn admission(&self, _admitted: bool) {}
}

/// Metrics that go nowhere (tests, tools).
pub struct NoMetrics;
impl TurnMetrics for NoMetrics {}

/// A validated request for a turn.
#[derive(Debug)]
pub struct TurnInput {
    /// The new user message (stored, when the turn is stored).
    pub text: MessageText,
    pub chat_id: Option<ChatId>,
    /// A model name the client asked for.
    pub model: Option<String>,
    /// For a new chat: its system prompt (already validated).
    pub system: Option<String>,
    pub idempotency: Option<IdempotencyClaim>,
    /// Whether the client watches tokens as they come (a stream).
    pub interactive: bool,
    /// When the request arrived, for time-to-first-token.
    pub received: Instant,
    /// The conversation the client sent (the OpenAI-compatible API), sent
    /// as is instead of the chat's stored history; `text` is its last user
    /// message.
    pub given: Option<GivenConversation>,
    /// Whether the turn is stored in a chat (`chat_id`, else a new one). The
    /// native API always stores; the OpenAI-compatible API when asked
    /// (SPEC §13). A turn stored nowhere still gets its ledger row.
    pub store: bool,
    /// The output cap the client asked for (never above the model's).
    pub max_output_tokens: Option<u32>,
    pub sampling: Sampling,
    /// Whether the generation may outlive its reader, waiting to be resumed
    /// (`STREAM_DETACH_SECONDS`, SPEC §14). The OpenAI-compatible API's
    /// clients cannot resume: closing their stream always cancels.
    pub detachable: bool,
    /// The request's rate-limit token, when the edge left it to the turn
    /// (a caller with a token budget): taken with the reservation in one
    /// backend call where nothing is read before it, else first thing.
    pub rate: Option<Arc<RateTake>>,
    /// The turn's admission place, when the edge took it already
    /// ([`TurnEngine::admit`]); else `start` takes one.
    pub place: Option<Admitted>,
}

impl TurnInput {
    /// A turn of the native chat API: stored, history from the chat.
    pub fn chat(text: MessageText, interactive: bool, received: Instant) -> Self {
        Self {
            text,
            chat_id: None,
            model: None,
            system: None,
            idempotency: None,
            interactive,
            received,
            given: None,
            store: true,
            max_output_tokens: None,
            sampling: Sampling::default(),
            detachable: true,
            rate: None,
            place: None,
        }
    }
}

/// A whole conversation sent by the client.
#[derive(Clone, Debug)]
pub struct GivenConversation {
    pub system: Option<String>,
    /// `user`/`assistant` messages, oldest first, a user message last.
    pub messages: Vec<PromptMessage>,
}

/// One thing that happened in a turn, in order: tokens, then one final event.
///
/// The last two are boxed: this is the channel's slot type, and a token
/// event is all but every event sent; unboxed, their size made each slot 56
/// bytes instead of 24, so every token touched more of the channel's memory
/// on both sides.
#[derive(Debug)]
pub enum TurnEvent {
    Token(String),
    /// The reply is stored `complete`.
    Done(Box<TurnSummary>),
    /// The turn ended otherwise; the partial text is stored. Not sent when the
    /// client went away (nobody is listening).
    Failed(Box<TurnFailure>),
}

// A token event is a `String` and no more (see above).
const _: () = assert!(std::mem::size_of::<TurnEvent>() == std::mem::size_of::<String>());

/// A completed turn, as stored.
#[derive(Clone, Debug)]
pub struct TurnSummary {
    pub text: String,
    pub usage: Usage,
    pub finish: FinishReason,
}

/// Why the model stopped a complete reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// It finished its answer (or hit a stop sequence).
    Stop,
    /// It reached the output cap.
    Length,
}

impl FinishReason {
    /// From a provider's own word (`length`, Anthropic's `max_tokens`).
    pub fn from_provider(reason: &str) -> Self {
        match reason {
            "length" | "max_tokens" => FinishReason::Length,
            _ => FinishReason::Stop,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Why a turn did not complete.
#[derive(Clone, Debug)]
pub enum TurnFailure {
    /// The model failed (after its retries, when they applied).
    Provider(ProviderError),
    /// The conversation could not be loaded.
    Context(StoreError),
    /// The shutdown grace period ran out.
    Interrupted,
    /// The reply was produced but could not be stored.
    NotSaved(StoreError),
    /// Stopped by an explicit cancel (SPEC §14); the partial text is stored.
    Cancelled,
}

/// A begun turn: where it is stored, and its events.
#[derive(Debug)]
pub struct StartedTurn {
    /// The chat that stores the turn; `None` for a turn stored nowhere.
    pub chat_id: Option<ChatId>,
    /// The assistant message's id; for a turn stored nowhere, the turn's
    /// own id (its ledger row's key).
    pub message_id: MessageId,
    pub created_at: DateTime<Utc>,
    pub model: String,
    pub events: mpsc::Receiver<TurnEvent>,
    /// Woken once the turn's last event is in `events` (or it ended
    /// without one): a reader that polls `events` only now and then (a
    /// paced response body) registers here so that the end is never held.
    pub end: Arc<AtomicWaker>,
    /// The token budget after this turn's reservation (for the
    /// `X-TokenLimit-*` headers), when the caller has a limit.
    pub budget: Option<BudgetState>,
}

/// The start of a turn, or the stored response of an earlier identical request.
#[derive(Debug)]
pub enum Started {
    Turn(StartedTurn),
    Replay(serde_json::Value),
}

/// Serialises the response an idempotent request replays (the route's wire
/// format, produced by the route's own type).
pub type ReplayEncoder =
    Box<dyn FnOnce(&StartedMeta, &TurnSummary) -> serde_json::Value + Send + Sync>;

/// What a replay encoder knows about the turn.
#[derive(Clone, Debug)]
pub struct StartedMeta {
    pub chat_id: ChatId,
    pub message_id: MessageId,
    pub created_at: DateTime<Utc>,
    pub model: String,
}

#[derive(Clone)]
pub struct TurnEngine {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    budget: Arc<dyn TokenBudget>,
    service: ChatService,
    models: ModelRegistry,
    flusher: Flusher,
    live: LiveHub,
    metrics: Arc<dyn TurnMetrics>,
    config: EngineConfig,
    tasks: TaskTracker,
    hard_stop: CancellationToken,
    admission: Admission,
}

/// An admitted turn's place, reported to the metrics while it is held.
struct Place {
    _admitted: Admitted,
    metrics: Arc<dyn TurnMetrics>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.metrics.admission(false);
    }
}

impl TurnEngine {
    pub fn new(
        store: Arc<dyn Store>,
        budget: Arc<dyn TokenBudget>,
        models: ModelRegistry,
        metrics: Arc<dyn TurnMetrics>,
        config: EngineConfig,
        tasks: TaskTracker,
        hard_stop: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                service: ChatService::new(store.clone()),
                store,
                budget,
                models,
                flusher: Flusher::default(),
                live: LiveHub::new(metrics.clone()),
                metrics,
                admission: Admission::new(config.max_concurrent_turns),
                config,
                tasks,
                hard_stop,
            }),
        }
    }

    pub fn models(&self) -> &ModelRegistry {
        &self.inner.models
    }

    pub fn flusher(&self) -> &Flusher {
        &self.inner.flusher
    }

    /// The live streams of this process (SPEC §14).
    pub fn live(&self) -> &LiveHub {
        &self.inner.live
    }

    /// The bound on concurrent turns, and how many run now.
    pub fn admission(&self) -> &Admission {
        &self.inner.admission
    }

    /// The model a turn uses: the one asked for, else the chat's, else the
    /// default — always one the org may use (`UnknownModel` otherwise, the
    /// same answer for a model that does not exist and one not allowed).
    pub fn resolve_model(
        &self,
        who: &Principal,
        asked: Option<&str>,
        chat: Option<&Chat>,
    ) -> Result<Arc<Model>, ServiceError> {
        let models = &self.inner.models;
        if let Some(name) = asked {
            return models
                .get(name)
                .filter(|m| who.policy.allows(&m.name))
                .cloned()
                .ok_or_else(|| ServiceError::UnknownModel(name.to_owned()));
        }
        let chat_model = chat
            .and_then(|c| c.model.as_deref())
            .and_then(|name| models.get(name))
            .filter(|m| who.policy.allows(&m.name));
        if let Some(model) = chat_model {
            return Ok(model.clone());
        }
        let default = models.default_model();
        if who.policy.allows(&default.name) {
            return Ok(default.clone());
        }
        models
            .allowed(&who.policy)
            .next()
            .cloned()
            .ok_or_else(|| ServiceError::UnknownModel(default.name.clone()))
    }

    /// [`ServiceError::AtCapacity`] (counted like `start`'s refusal) when
    /// every place is taken now, so that a caller can refuse a turn before
    /// work that the refusal would waste — the rate limit's round trip and
    /// token. It only looks: `start` stays the one that admits.
    pub fn refuse_if_full(&self, interactive: bool) -> Result<(), ServiceError> {
        if self.inner.admission.is_full() {
            return Err(self.at_capacity(interactive));
        }
        Ok(())
    }

    /// The refusal for capacity, counted.
    fn at_capacity(&self, interactive: bool) -> ServiceError {
        self.inner.metrics.turn_refused(interactive, "capacity");
        ServiceError::AtCapacity
    }

    /// A place for one turn, taken ahead of [`TurnEngine::start`] (which
    /// then uses it: [`TurnInput::place`]), or [`ServiceError::AtCapacity`],
    /// counted like `start`'s refusal. For a caller that would otherwise
    /// do work between its look ([`TurnEngine::refuse_if_full`]) and the
    /// turn's start, during which the last places can go: without it, a
    /// request let in by the look was refused only at `start`, after that
    /// work (the rate limit's round trip and token).
    pub fn admit(&self, interactive: bool) -> Result<Admitted, ServiceError> {
        self.inner
            .admission
            .try_admit()
            .ok_or_else(|| self.at_capacity(interactive))
    }

    /// Check the request, begin the turn and start generating. Errors are
    /// what the client must hear before any byte of a reply (404, 403, 400,
    /// idempotency); everything after the begin arrives as events.
    ///
    /// The turn is begun inside a tracked task, which then hands the run to
    /// a second tracked task of its own (so that the begin's state is not
    /// held for the stream's life): if the caller goes away while the user
    /// message is being stored, the tasks still own the turn and settle it
    /// (`cancelled`, as nobody listens).
    ///
    /// Admission comes first: past `max_concurrent_turns` the turn is
    /// refused with [`ServiceError::AtCapacity`] before anything is read or
    /// written (unless its place was taken already: [`TurnInput::place`]).
    pub async fn start(
        &self,
        who: &Principal,
        mut input: TurnInput,
        replay: Option<ReplayEncoder>,
    ) -> Result<Started, ServiceError> {
        // Not kept in the input, which the run holds for the stream's life.
        let rate = input.rate.take();
        let inner = &self.inner;
        let interactive = input.interactive;
        let admitted = match input.place.take() {
            Some(admitted) => admitted,
            None => self.admit(interactive)?,
        };
        inner.metrics.admission(true);
        let place = Place {
            _admitted: admitted,
            metrics: inner.metrics.clone(),
        };
        let started = self.start_admitted(who, input, rate, replay, place).await;
        if let Err(ServiceError::Store(StoreError::Unavailable(_))) = &started {
            inner.metrics.turn_refused(interactive, "database");
        }
        started
    }

    async fn start_admitted(
        &self,
        who: &Principal,
        input: TurnInput,
        rate: Option<Arc<RateTake>>,
        replay: Option<ReplayEncoder>,
        place: Place,
    ) -> Result<Started, ServiceError> {
        let inner = &self.inner;
        // The rate-limit token goes with the reservation (one round trip)
        // when nothing is read before the reservation: a new chat without an
        // idempotency key. Otherwise it is taken now, so that a rate-limited
        // request never costs a read of its chat or its key.
        let (now, with_reservation) = match rate {
            Some(rate)
                if input.chat_id.is_none()
                    && input.idempotency.is_none()
                    && reserves_tokens(who) =>
            {
                (None, Some(rate))
            }
            other => (other, None),
        };
        if let Some(rate) = &now {
            admitted_by(rate, rate.take().await)?;
        }
        let existing = match input.chat_id {
            Some(id) => Some(inner.service.chat_for(who, id, Access::Write).await?),
            None => None,
        };
        // A retry whose first request was answered gets that answer, whatever
        // its token budget says now. `begin` finds a stored answer too, but
        // only after the reservation — which a retry of the turn that used
        // the budget up would be refused (a 429 instead of the reply).
        // Anything else (no answer yet, an expired key) is `begin`'s.
        if let Some(claim) = &input.idempotency
            && reserves_tokens(who)
            && let Some(record) = inner.store.get_idempotency(who.user_id, &claim.key).await?
            && record.response.is_some()
            && Utc::now() - record.created_at
                < chrono::Duration::hours(crate::model::IDEMPOTENCY_TTL_HOURS)
            && let Some(response) = stored_answer(record, claim)?
        {
            return Ok(Started::Replay(response));
        }
        let model = self.resolve_model(who, input.model.as_deref(), existing.as_ref())?;
        let max_output = input
            .max_output_tokens
            .map_or(model.max_output_tokens, |asked| {
                asked.clamp(1, model.max_output_tokens)
            });
        let (system, messages, counted) = match &input.given {
            Some(given) => {
                let system = given
                    .system
                    .clone()
                    .or_else(|| who.policy.system_prompt.clone());
                let counted = given_prompt_tokens(&model, system.as_deref(), &given.messages);
                if counted + u64::from(max_output) > u64::from(model.context_tokens) {
                    return Err(ServiceError::MessageTooLong(model.name.clone()));
                }
                (system, given.messages.clone(), counted)
            }
            None => {
                let system = if !model.provider.wants_history() {
                    None
                } else {
                    let own = match &existing {
                        None => input.system.clone(),
                        Some(chat) => inner.service.system_prompt(who, chat.id).await?,
                    };
                    own.or_else(|| who.policy.system_prompt.clone())
                };
                let fixed = fixed_prompt_tokens(&model, system.as_deref(), input.text.as_str());
                if fixed + u64::from(max_output) > u64::from(model.context_tokens) {
                    return Err(ServiceError::MessageTooLong(model.name.clone()));
                }
                let (messages, counted) = self
                    .context(
                        who,
                        existing.as_ref().map(|c| c.id),
                        &model,
                        system.as_deref(),
                        input.text.as_str(),
                    )
                    .await?;
                (system, messages, counted)
            }
        };
        let assistant_id = MessageId::new();
        let need = counted + u64::from(max_output);
        let (held, budget) = self
            .reserve(who, assistant_id, need, with_reservation.as_deref())
            .await?;

        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let end = Arc::new(AtomicWaker::new());
        let ended = end.clone();
        let (ready_tx, ready_rx) = oneshot::channel();
        let engine = self.clone();
        let tasks = inner.tasks.clone();
        let who = who.clone();
        let model_name = model.name.clone();
        // Spawned in a block of its own, so that the task's future is not
        // kept in this one's across the wait below (≈ 10 KB more in every
        // request's handler while its turn begins).
        {
            let task = async move {
                let request = Arc::new(chat_request(&model, system, messages, max_output, &input));
                let mut early = (input.store && input.idempotency.is_none())
                    .then(|| EarlyOpen::start(model.provider.clone(), request.clone()));
                let begun = if !input.store {
                    None
                } else {
                    let begin =
                        engine.begin(&who, &input, &model, existing.is_some(), assistant_id);
                    match EarlyOpen::during(early.as_mut(), begin).await {
                        Ok(Begun::Turn(begun)) => Some(*begun),
                        Ok(Begun::Replay(stored)) => {
                            engine.release(held.as_ref()).await;
                            let _ = ready_tx.send(Ok(Err(stored)));
                            return;
                        }
                        Err(err) => {
                            engine.release(held.as_ref()).await;
                            let _ = ready_tx.send(Err(err));
                            return;
                        }
                    }
                };
                let meta = begun.as_ref().map(|begun| StartedMeta {
                    chat_id: begun.chat_id,
                    message_id: begun.assistant_message.id,
                    created_at: begun.assistant_message.created_at,
                    model: model.name.clone(),
                });
                let created_at = meta.as_ref().map_or_else(Utc::now, |m| m.created_at);
                let _ = ready_tx.send(Ok(Ok((meta.as_ref().map(|m| m.chat_id), created_at))));
                let run = Run::new(
                    engine,
                    who,
                    input,
                    model,
                    Turn {
                        id: assistant_id,
                        begun,
                        meta,
                    },
                    tx,
                    replay,
                    Call {
                        request,
                        counted,
                        early,
                    },
                    held,
                );
                // The run is a task of its own: this one's state (the begin,
                // the captured inputs; ≈ 10 KB with the run inline) is freed
                // now instead of being held for the whole stream. `map`, not an
                // `async` block: a block would hold the run twice (the captured
                // value and the future made of it).
                let go = run.go().map(move |()| {
                    // After the last event, or without one (the run dropped
                    // its sender): the reader must look now.
                    ended.wake();
                    // The turn's place, held until it is settled (on an early
                    // return above, dropped with this task).
                    drop(place);
                });
                tasks.spawn(go.instrument(tracing::Span::current()));
            };
            inner.tasks.spawn(task.instrument(tracing::Span::current()));
        }
        match ready_rx.await {
            Ok(Ok(Ok((chat_id, created_at)))) => Ok(Started::Turn(StartedTurn {
                chat_id,
                message_id: assistant_id,
                created_at,
                model: model_name,
                events: rx,
                end,
                budget,
            })),
            Ok(Ok(Err(stored))) => Ok(Started::Replay(stored)),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(ServiceError::Store(StoreError::Other(
                "the turn's task ended before it began".into(),
            ))),
        }
    }

    /// The conversation to send: the newest earlier messages that fit in
    /// `context_tokens − max_output_tokens − system − new message`, oldest
    /// first, then the new message. Failed replies are never sent back;
    /// cancelled and interrupted partial replies are (the user saw them).
    ///
    /// Read before the turn is begun (the new message is not stored yet), so
    /// that a turn refused for its token budget has written nothing.
    async fn context(
        &self,
        who: &Principal,
        chat: Option<ChatId>,
        model: &Model,
        system: Option<&str>,
        text: &str,
    ) -> Result<(Vec<PromptMessage>, u64), StoreError> {
        let current = PromptMessage {
            role: MessageRole::User,
            content: text.to_owned(),
        };
        let fixed = fixed_prompt_tokens(model, system, &current.content);
        let Some(chat) = chat.filter(|_| model.provider.wants_history()) else {
            return Ok((vec![current], fixed));
        };
        let mut budget = u64::from(model.context_tokens)
            .saturating_sub(u64::from(model.max_output_tokens))
            .saturating_sub(fixed);
        let mut used = fixed;
        let mut earlier: Vec<PromptMessage> = Vec::new();
        let mut before: Option<i64> = None;
        'pages: while before.is_none_or(|b| b > 1) {
            let page = self
                .inner
                .store
                .list_messages(who.org_id, chat, before, HISTORY_PAGE)
                .await?;
            let Some(first) = page.first() else { break };
            before = Some(first.seq);
            let full_page = page.len() == HISTORY_PAGE as usize;
            for message in page.into_iter().rev() {
                let sendable = match message.role {
                    MessageRole::System => false,
                    MessageRole::User => true,
                    MessageRole::Assistant => matches!(
                        message.status,
                        MessageStatus::Complete
                            | MessageStatus::Cancelled
                            | MessageStatus::Interrupted
                    ),
                };
                if !sendable || message.content.trim().is_empty() {
                    continue;
                }
                let cost = model.tokenizer.count(&message.content) + PER_MESSAGE_OVERHEAD;
                if cost > budget {
                    // Keep the history contiguous: nothing older than a turn
                    // that did not fit.
                    break 'pages;
                }
                budget -= cost;
                used += cost;
                earlier.push(PromptMessage {
                    role: message.role,
                    content: message.content,
                });
            }
            if !full_page {
                break;
            }
        }
        earlier.reverse();
        earlier.push(current);
        Ok((earlier, used))
    }

    /// Store the user message (and a `streaming` placeholder for the reply).
    /// With an idempotency key, a request that lost the race for the key
    /// waits for the winner's response and replays it.
    async fn begin(
        &self,
        who: &Principal,
        input: &TurnInput,
        model: &Model,
        existing: bool,
        assistant_message_id: MessageId,
    ) -> Result<Begun, ServiceError> {
        let store = &self.inner.store;
        let chat = match input.chat_id {
            Some(id) if existing => TurnChat::Existing(id),
            _ => TurnChat::New {
                id: ChatId::new(),
                title: input.text.title(),
            },
        };
        let turn = NewTurn {
            org: who.org_id,
            user: who.user_id,
            system: if existing { None } else { input.system.clone() },
            chat,
            user_message_id: MessageId::new(),
            content: input.text.as_str().to_owned(),
            assistant_message_id,
            idempotency: input.idempotency.clone(),
            model: model.name.clone(),
        };
        let deadline = Instant::now() + IDEMPOTENCY_WAIT;
        let mut poll = IDEMPOTENCY_POLL;
        loop {
            match store.begin_turn(&turn).await {
                Ok(begun) => return Ok(Begun::Turn(Box::new(begun))),
                Err(StoreError::Conflict { constraint }) if constraint == "idempotency_keys" => {}
                Err(StoreError::NotFound) => return Err(ServiceError::NotFound),
                Err(err) => return Err(ServiceError::Store(err)),
            }
            let Some(claim) = &turn.idempotency else {
                return Err(ServiceError::Store(StoreError::Other(
                    "idempotency conflict without a key".into(),
                )));
            };
            if let Some(record) = store.get_idempotency(who.user_id, &claim.key).await?
                && let Some(response) = stored_answer(record, claim)?
            {
                return Ok(Begun::Replay(response));
            }
            // Still in progress (or released by a failed winner: claim it again).
            if Instant::now() >= deadline {
                return Err(ServiceError::IdempotencyInProgress);
            }
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(IDEMPOTENCY_POLL_MAX);
        }
    }
}

impl TurnEngine {
    /// Reserve `need` tokens in every window of the caller's limits, before
    /// anything is stored or sent upstream. `Ok((None, None))` when the caller
    /// has no limit (or the backend is down and the policy is to fail open).
    ///
    /// With `rate`, the request's rate-limit token is taken first, in the
    /// same backend call where the backend allows.
    async fn reserve(
        &self,
        who: &Principal,
        id: MessageId,
        need: u64,
        rate: Option<&RateTake>,
    ) -> Result<(Option<Held>, Option<BudgetState>), ServiceError> {
        let inner = &self.inner;
        let windows = budget_windows(who);
        if windows.is_empty() {
            if let Some(rate) = rate {
                admitted_by(rate, rate.take().await)?;
            }
            return Ok((None, None));
        }
        let request = ReserveRequest {
            id: id.to_string(),
            windows,
            need,
            ttl: inner.config.total_timeout + RESERVATION_SLACK,
        };
        let reserved = match rate {
            None => inner.budget.reserve(&request).await,
            Some(rate) => self.take_and_reserve(rate, &request).await?,
        };
        match reserved {
            Ok(Reservation::Granted { state, windows }) => {
                inner.metrics.budget("reserved", "granted", need);
                let held = Held {
                    id: request.id,
                    windows: request
                        .windows
                        .iter()
                        .zip(windows)
                        .map(|(w, idx)| (w.key.clone(), idx, w.window_secs))
                        .collect(),
                };
                Ok((Some(held), Some(state)))
            }
            Ok(Reservation::Refused { kind, state }) => {
                inner.metrics.budget("refused", kind, need);
                tracing::info!(
                    limit = kind,
                    need,
                    remaining = state.remaining,
                    "token budget exceeded"
                );
                Err(ServiceError::TokenBudgetExceeded(state))
            }
            Err(err) => {
                inner.metrics.budget("error", "backend", need);
                if inner.config.budget_fail_open {
                    tracing::warn!(error = %err, "token budget backend unavailable; admitting (fail open)");
                    Ok((None, None))
                } else {
                    Err(ServiceError::BudgetUnavailable)
                }
            }
        }
    }

    /// The rate-limit token and then the reservation, in one call where the
    /// budget backend keeps the buckets too. `Err` when the token is refused
    /// (or its backend is down and the policy fail-closed); the reservation's
    /// own outcome is the caller's to judge.
    async fn take_and_reserve(
        &self,
        rate: &RateTake,
        request: &ReserveRequest,
    ) -> Result<Result<Reservation, RateLimitError>, ServiceError> {
        let budget = &self.inner.budget;
        let started = std::time::Instant::now();
        let Some(both) = budget
            .take_and_reserve(&rate.key, rate.limit, request)
            .await
        else {
            admitted_by(rate, rate.take().await)?;
            return Ok(budget.reserve(request).await);
        };
        let elapsed = started.elapsed();
        match both {
            Ok(both) => {
                admitted_by(rate, rate.record(Ok(both.decision), elapsed))?;
                Ok(both.reservation.ok_or_else(|| {
                    RateLimitError::Unavailable(
                        "an allowed take came back without its reservation".into(),
                    )
                }))
            }
            // Neither step is known to have happened: the token's policy,
            // then the budget's.
            Err(err) => {
                admitted_by(rate, rate.record(Err(err.clone()), elapsed))?;
                Ok(Err(err))
            }
        }
    }

    /// Settle a reservation to what the turn used (0 releases it). A failure
    /// is logged and counted: the ledger stays the truth, and the window
    /// heals when the reservation expires.
    async fn settle_budget(&self, held: Option<&Held>, actual: u64) {
        let Some(held) = held else { return };
        let inner = &self.inner;
        match inner.budget.settle(held, actual).await {
            Ok(()) => inner.metrics.budget("settled", "granted", actual),
            Err(err) => {
                inner.metrics.budget("error", "backend", actual);
                tracing::warn!(error = %err, "could not settle a token reservation; it expires by itself");
            }
        }
    }

    async fn release(&self, held: Option<&Held>) {
        self.settle_budget(held, 0).await;
    }

    /// After a turn's final write: its reservation settled to what it used,
    /// and the usage counted. The ledger row is written first: if this step
    /// fails, the ledger is still the truth and the reservation expires.
    async fn settle_usage(&self, model: &Model, held: Option<&Held>, usage: &Usage) {
        let (prompt, completion) = (
            u64::try_from(usage.prompt_tokens).unwrap_or(0),
            u64::try_from(usage.completion_tokens).unwrap_or(0),
        );
        self.settle_budget(held, prompt.saturating_add(completion))
            .await;
        self.inner.metrics.usage(&model.name, prompt, completion);
    }
}

/// What a turn's usage costs at its model's prices.
fn cost_of(model: &Model, usage: &Usage) -> LedgerCost {
    let prices = model.prices;
    let cost = (usage.prompt_tokens as f64 * prices.input_per_mtok
        + usage.completion_tokens as f64 * prices.output_per_mtok)
        .round();
    LedgerCost {
        cost_micro_usd: if cost.is_finite() { cost as i64 } else { 0 },
    }
}

/// A reservation outlives the longest possible turn by this much before it
/// is taken for the reservation of a dead process.
const RESERVATION_SLACK: Duration = Duration::from_secs(60);

/// Whether the caller's turns reserve tokens (it has a token limit): the
/// rule for where its rate-limit token is taken.
pub fn reserves_tokens(who: &Principal) -> bool {
    !budget_windows(who).is_empty()
}

/// `Ok` when `taken` lets the request go on (see [`crate::ratelimit::Taken::admits`]),
/// else the refusal. The edge reports it (headers, metrics, log line).
fn admitted_by(rate: &RateTake, taken: &crate::ratelimit::Taken) -> Result<(), ServiceError> {
    if taken.admits(rate.fail_open) {
        return Ok(());
    }
    Err(match &taken.result {
        Ok(decision) => ServiceError::RateLimited(*decision),
        Err(_) => ServiceError::RateLimitUnavailable,
    })
}

/// The windows of the caller's token limits (SPEC §12): the org's and the
/// user's, per minute and per UTC day; 0 = no window.
fn budget_windows(who: &Principal) -> Vec<BudgetWindow> {
    let mut windows = Vec::new();
    let scopes = [
        (
            "org",
            who.org_id.to_string(),
            who.org_tokens,
            ["org_minute", "org_day"],
        ),
        (
            "user",
            who.user_id.to_string(),
            who.user_tokens,
            ["user_minute", "user_day"],
        ),
    ];
    for (scope, id, limits, kinds) in scopes {
        if limits.per_minute > 0 {
            windows.push(BudgetWindow {
                key: format!("{scope}:{id}:m"),
                limit: limits.per_minute,
                window_secs: 60,
                kind: kinds[0],
            });
        }
        if limits.per_day > 0 {
            windows.push(BudgetWindow {
                key: format!("{scope}:{id}:d"),
                limit: limits.per_day,
                window_secs: 86_400,
                kind: kinds[1],
            });
        }
    }
    windows
}

enum Begun {
    Turn(Box<BegunTurn>),
    Replay(serde_json::Value),
}

/// What a stored key says to a request that carries it: its answer to
/// replay (`Some`), no answer yet (`None`), or that it is another request's
/// key (`IdempotencyMismatch`). One home for the rule, asked before the
/// budget (answered, unexpired keys only) and after a claim was refused.
fn stored_answer(
    record: IdempotencyRecord,
    claim: &IdempotencyClaim,
) -> Result<Option<serde_json::Value>, ServiceError> {
    if record.request_hash != claim.request_hash {
        return Err(ServiceError::IdempotencyMismatch);
    }
    Ok(record.response)
}

/// Tokens that are always sent: the system prompt and the new message.
fn fixed_prompt_tokens(model: &Model, system: Option<&str>, text: &str) -> u64 {
    let system = system.map_or(0, |s| model.tokenizer.count(s) + PER_MESSAGE_OVERHEAD);
    system + model.tokenizer.count(text) + PER_MESSAGE_OVERHEAD
}

/// Tokens of a conversation the client sent, counted as the history is.
fn given_prompt_tokens(model: &Model, system: Option<&str>, messages: &[PromptMessage]) -> u64 {
    let system = system.map_or(0, |s| model.tokenizer.count(s) + PER_MESSAGE_OVERHEAD);
    messages.iter().fold(system, |sum, m| {
        sum + model.tokenizer.count(&m.content) + PER_MESSAGE_OVERHEAD
    })
}

/// Where a running turn is kept: its id, and for a stored turn the
/// messages `begin` wrote (and what a replay encoder is told).
struct Turn {
    /// The assistant message's id, or the id of a turn stored nowhere.
    id: MessageId,
    begun: Option<BegunTurn>,
    meta: Option<StartedMeta>,
}

/// Why the provider loop stopped.
enum Stop {
    Complete,
    Cancelled { stalled: bool },
    Interrupted,
    Failed(TurnFailure),
}

/// One running turn: owns the assistant message from `streaming` to its final
/// status.
struct Run {
    engine: TurnEngine,
    who: Principal,
    input: TurnInput,
    model: Arc<Model>,
    turn: Turn,
    tx: mpsc::Sender<TurnEvent>,
    replay: Option<ReplayEncoder>,
    /// The stream's events for its readers (and its text), and its cancel.
    publication: Publication,
    guard: SettleGuard,
    /// Usage as the model reported it, latest figures.
    reported: Option<ReportedUsage>,
    /// What confab counted of the prompt it sent (0 until it sent one).
    prompt_counted: u64,
    forwarded: u64,
    disconnected_at: Option<Instant>,
    /// The model call to make.
    call: Call,
    /// How the model said it finished.
    finish: FinishReason,
}

/// A turn's model call: the request (every attempt sends it), confab's
/// count of its prompt, and the first attempt when it is already on its way.
struct Call {
    request: Arc<ChatRequest>,
    counted: u64,
    early: Option<EarlyOpen>,
}

/// The first attempt of a turn's model call, started while the turn's first
/// write commits rather than after it: the upstream's time to first token
/// (tens of milliseconds at the least) hides the commit, and the client
/// waits for the longer of the two, not for their sum. The turn's task
/// polls it alongside the begin ([`EarlyOpen::during`]); its tokens are
/// read only once the turn has begun. When the begin fails, dropping it
/// closes the call (one request the upstream saw for nothing, on a database
/// failure). Only for turns that cannot turn out to be a replay (no
/// `Idempotency-Key`).
struct EarlyOpen(Pin<Box<MaybeDone<OpenCall>>>);

type OpenCall = futures::future::BoxFuture<'static, Result<ChunkStream, ProviderError>>;

impl EarlyOpen {
    fn start(provider: Arc<dyn ChatProvider>, request: Arc<ChatRequest>) -> Self {
        let call: OpenCall = Box::pin(async move { provider.stream(&request).await });
        Self(Box::pin(futures::future::maybe_done(call)))
    }

    /// Run `work` to its end, the call making progress meanwhile.
    async fn during<T>(early: Option<&mut Self>, work: impl Future<Output = T>) -> T {
        let Some(early) = early else {
            return work.await;
        };
        tokio::pin!(work);
        loop {
            tokio::select! {
                biased;
                done = &mut work => return done,
                () = early.0.as_mut(), if !matches!(*early.0, MaybeDone::Done(_) | MaybeDone::Gone) => {}
            }
        }
    }

    async fn opened(mut self) -> Result<ChunkStream, ProviderError> {
        self.0.as_mut().await;
        self.0.as_mut().take_output().unwrap_or_else(|| {
            Err(ProviderError::Malformed {
                detail: "the model call was already taken".into(),
            })
        })
    }
}

/// The upstream request of a turn, built once: the early first attempt
/// and every attempt of [`Run::generate`] send it.
fn chat_request(
    model: &Model,
    system: Option<String>,
    messages: Vec<PromptMessage>,
    max_output: u32,
    input: &TurnInput,
) -> ChatRequest {
    ChatRequest {
        upstream_model: model.upstream_model.clone(),
        system,
        messages,
        max_output_tokens: max_output,
        interactive: input.interactive,
        sampling: input.sampling.clone(),
    }
}

/// Remove U+0000 from a model's text before anything sees it: PostgreSQL
/// refuses it in `text`, so one such character in one stream failed every
/// save of every live stream batched with it (the partial-text flush, each
/// second, until that turn ended: other tenants' streams then looked dead
/// to crash recovery) and that turn's own final write. Users cannot send it
/// (their messages are checked); a model can be asked to. Stripped here,
/// where every provider's text passes, before event ids are counted, so the
/// stream, the live text and the stored reply agree on every backend.
///
/// `model` by reference, not its name: the name is read only when a NUL is
/// found (this runs once per token of every live stream, and the model's
/// memory is cold by then: loading the name up front was a cache miss each).
fn strip_nul(text: &mut String, model: &Model) {
    if text.contains('\0') {
        text.retain(|c| c != '\0');
        tracing::debug!(model = %model.name, "removed NUL characters from the model's text");
    }
}

impl Run {
    #[allow(clippy::too_many_arguments)]
    fn new(
        engine: TurnEngine,
        who: Principal,
        input: TurnInput,
        model: Arc<Model>,
        turn: Turn,
        tx: mpsc::Sender<TurnEvent>,
        replay: Option<ReplayEncoder>,
        call: Call,
        held: Option<Held>,
    ) -> Self {
        let inner = &engine.inner;
        // Only a stored turn has a row for the flusher to save into, and
        // a message to resume or cancel (SPEC §14).
        let publication = match &turn.begun {
            Some(begun) => {
                let publication = inner.live.open(
                    begun.assistant_message.id,
                    begun.chat_id,
                    input.interactive,
                    input.detachable,
                );
                inner
                    .flusher
                    .register(begun.assistant_message.id, publication.stream().clone());
                publication
            }
            None => inner.live.private(),
        };
        inner.metrics.turn_started(input.interactive);
        let guard = SettleGuard {
            engine: Some(engine.clone()),
            who: who.clone(),
            turn: turn.id,
            stored: turn.begun.as_ref().map(|b| b.chat_id),
            model: model.clone(),
            live: publication.stream().clone(),
            key: input.idempotency.as_ref().map(|c| c.key.clone()),
            interactive: input.interactive,
            held,
        };
        Self {
            engine,
            who,
            input,
            model,
            turn,
            tx,
            replay,
            publication,
            guard,
            reported: None,
            prompt_counted: 0,
            forwarded: 0,
            disconnected_at: None,
            call,
            finish: FinishReason::Stop,
        }
    }

    async fn go(mut self) {
        let stop = self.generate().await;
        let (outcome, failure) = match stop {
            Stop::Complete => (Outcome::Complete, None),
            Stop::Cancelled { stalled } => (Outcome::Cancelled { stalled }, None),
            Stop::Interrupted => (Outcome::Interrupted, Some(TurnFailure::Interrupted)),
            Stop::Failed(failure) => (Outcome::Failed, Some(failure)),
        };
        if let Some(TurnFailure::Provider(err)) = &failure {
            tracing::warn!(
                model = %self.model.name,
                error = %err,
                reason = err.label(),
                tokens_forwarded = self.forwarded,
                "model call failed"
            );
        }
        let settled = self.settle(outcome).await;
        self.publication.finish(outcome.status(), settled.is_ok());
        if let Some(at) = self.disconnected_at {
            self.engine.inner.metrics.disconnect_detected(at.elapsed());
        }
        let last = match (outcome, settled) {
            (Outcome::Cancelled { .. }, _) => self
                .publication
                .cancel_requested()
                .then(|| TurnEvent::Failed(Box::new(TurnFailure::Cancelled))),
            (Outcome::Complete, Ok(summary)) => Some(TurnEvent::Done(Box::new(summary))),
            (Outcome::Complete, Err(err)) => {
                Some(TurnEvent::Failed(Box::new(TurnFailure::NotSaved(err))))
            }
            (_, _) => failure.map(|failure| TurnEvent::Failed(Box::new(failure))),
        };
        if let Some(event) = last {
            let inner = &self.engine.inner;
            if !send_last(&self.tx, event, inner.config.send_timeout, &inner.hard_stop).await
                && !self.tx.is_closed()
            {
                tracing::info!(
                    messageId = %self.turn.id,
                    "the stream's reader took no event in time; its last event was not delivered (the reply is stored)"
                );
            }
        }
    }

    /// Drive the model until the reply is complete or the turn must stop.
    async fn generate(&mut self) -> Stop {
        let inner = self.engine.inner.clone();
        let config = &inner.config;
        // Polled on every token: a flag, not the stop futures (see
        // StopFlag). The process-wide stop is watched through a child token:
        // the shared token's lock was contended across threads. No other
        // clone of the sender is kept here: when a detached turn lets a
        // stalled reader go (`forward`), dropping `self.tx` must end that
        // reader's stream.
        let stop = StopFlag::watch(
            self.publication.stream().clone(),
            inner.hard_stop.child_token(),
            self.publication.stop_signal(self.tx.clone()),
        );

        let request = self.call.request.clone();
        let counted = self.call.counted;
        let mut early = self.call.early.take();
        let model_name = self.model.name.clone();
        let provider = self.model.provider.clone();
        let total_deadline = Instant::now() + config.total_timeout;
        let mut attempt: u32 = 0;
        // One timer for the whole turn, moved rather than re-created per
        // chunk (this loop runs once per token of every live stream).
        let timer = tokio::time::sleep_until(total_deadline);
        tokio::pin!(timer);

        'attempts: loop {
            attempt += 1;
            let attempt_started = Instant::now();
            let first_deadline = (attempt_started + config.first_token_timeout).min(total_deadline);
            let first_phase = if first_deadline == total_deadline {
                TimeoutPhase::Total
            } else {
                TimeoutPhase::FirstToken
            };
            timer.as_mut().reset(first_deadline);
            let opened = tokio::select! {
                biased;
                why = stop.raised() => {
                    return self.stopped(why, attempt, attempt_started);
                }
                _ = &mut timer => Err(ProviderError::Timeout(first_phase)),
                opened = async {
                    match early.take() {
                        Some(early) => early.opened().await,
                        None => provider.stream(&request).await,
                    }
                } => opened,
            };
            let mut chunks = match opened {
                Ok(chunks) => {
                    // The model has the prompt: from here on it counts
                    // (saved with the partial text, for crash recovery).
                    self.prompt_counted = counted;
                    self.publication.stream().text().set_prompt(counted);
                    chunks
                }
                Err(err) => match self.retry_or_fail(err, attempt, attempt_started).await {
                    Some(stop) => return stop,
                    None => continue 'attempts,
                },
            };
            let mut first_at: Option<Instant> = None;
            // When the last token was forwarded. The timer is re-armed only
            // when it fires early (the idle deadline moved on since), not on
            // every token: it never fires late, and a token costs no timer
            // wheel update.
            let mut last_at = attempt_started;
            loop {
                let next = tokio::select! {
                    biased;
                    why = stop.raised() => {
                        return self.stopped(why, attempt, attempt_started);
                    }
                    _ = &mut timer => {
                        if first_at.is_some() {
                            let idle_deadline = (last_at + config.idle_timeout).min(total_deadline);
                            if Instant::now() < idle_deadline {
                                timer.as_mut().reset(idle_deadline);
                                continue;
                            }
                        }
                        let phase = if first_at.is_none() {
                            first_phase
                        } else if Instant::now() >= total_deadline {
                            TimeoutPhase::Total
                        } else {
                            TimeoutPhase::Idle
                        };
                        Some(Err(ProviderError::Timeout(phase)))
                    }
                    next = chunks.next() => next,
                };
                match next {
                    None => {
                        self.log_attempt(attempt, "ok", None, attempt_started);
                        return Stop::Complete;
                    }
                    Some(Ok(Chunk::Usage(usage))) => {
                        if usage.prompt_tokens > 0 {
                            self.publication
                                .stream()
                                .text()
                                .set_prompt(usage.prompt_tokens);
                        }
                        self.reported = Some(usage);
                    }
                    Some(Ok(Chunk::Finish(reason))) => {
                        tracing::debug!(model = %model_name, finish_reason = %reason, "model finished");
                        self.finish = FinishReason::from_provider(&reason);
                    }
                    Some(Ok(Chunk::Delta(mut text))) => {
                        strip_nul(&mut text, &self.model);
                        if text.is_empty() {
                            continue;
                        }
                        let now = Instant::now();
                        let first = first_at.is_none();
                        if first {
                            first_at = Some(now);
                            inner
                                .metrics
                                .upstream_first_token(&model_name, now - attempt_started);
                        }
                        if let Some(stop) = self.forward(text, &stop).await {
                            drop(chunks);
                            self.log_attempt(attempt, "cancelled", None, attempt_started);
                            return stop;
                        }
                        last_at = Instant::now();
                        if first {
                            // From the first-token deadline to the idle one.
                            timer
                                .as_mut()
                                .reset((last_at + config.idle_timeout).min(total_deadline));
                        }
                    }
                    Some(Err(err)) => {
                        drop(chunks);
                        if self.forwarded > 0 {
                            // Never retried once a token went out: a retry
                            // would repeat text the user already saw.
                            self.log_attempt(attempt, err.label(), err.status(), attempt_started);
                            return Stop::Failed(TurnFailure::Provider(err));
                        }
                        match self.retry_or_fail(err, attempt, attempt_started).await {
                            Some(stop) => return stop,
                            None => continue 'attempts,
                        }
                    }
                }
            }
        }
    }

    /// After a failed attempt with nothing forwarded: wait and return `None`
    /// to try again, or the final stop.
    async fn retry_or_fail(
        &mut self,
        err: ProviderError,
        attempt: u32,
        attempt_started: Instant,
    ) -> Option<Stop> {
        let inner = self.engine.inner.clone();
        let config = &inner.config;
        self.log_attempt(attempt, err.label(), err.status(), attempt_started);
        if !err.is_retryable() || attempt > config.max_retries {
            return Some(Stop::Failed(TurnFailure::Provider(err)));
        }
        let wait = match err.retry_after() {
            Some(asked) if asked > config.max_retry_wait => {
                // The upstream wants longer than we may wait: give up now and
                // pass its wish on to the client (Retry-After).
                return Some(Stop::Failed(TurnFailure::Provider(err)));
            }
            Some(asked) => asked,
            None => backoff(config.retry_base, attempt).min(config.max_retry_wait),
        };
        inner.metrics.upstream_retry(&self.model.name, err.label());
        tracing::info!(
            model = %self.model.name,
            attempt,
            wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            reason = err.label(),
            "retrying the model call"
        );
        let tx = self.tx.clone();
        tokio::select! {
            biased;
            _ = inner.hard_stop.cancelled() => Some(Stop::Interrupted),
            _ = self.publication.stop_signal(tx) => Some(self.cancelled(false)),
            _ = tokio::time::sleep(wait) => None,
        }
    }

    /// Hand a token to the client's channel; `Some` when the turn must stop.
    async fn forward(&mut self, text: String, stop: &StopFlag) -> Option<Stop> {
        use tokio::sync::mpsc::error::TrySendError;
        // Runs once per token of every live stream: nothing is cloned on the
        // way unless the client's buffer is full.
        self.publication.push(&text);
        let sent = match self.tx.try_send(TurnEvent::Token(text)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Closed(_)) => Err(false),
            Err(TrySendError::Full(event)) => {
                let cancel = self.publication.cancel_token();
                let send_timeout = self.engine.inner.config.send_timeout;
                tokio::select! {
                    biased;
                    // Only the process-wide stop ends the turn here: a reader
                    // that is merely slow is the send timeout's business.
                    _ = stop.raised_by(StopFlag::HARD) => return Some(Stop::Interrupted),
                    _ = cancel.cancelled() => {
                        // This token never reached the request's reader: end
                        // its stream here (a resume has the rest, with the
                        // right ids).
                        self.tx = mpsc::channel(1).0;
                        return Some(Stop::Cancelled { stalled: false });
                    }
                    sent = tokio::time::timeout(send_timeout, self.tx.send(event)) => {
                        match sent {
                            Ok(Ok(())) => Ok(()),
                            Ok(Err(_)) => Err(false),
                            Err(_) => Err(true),
                        }
                    }
                }
            }
        };
        if let Err(stalled) = sent {
            if !self.publication.detaches() {
                return Some(self.cancelled(stalled));
            }
            // Detach mode: the reader is gone (or stalled, and is let go),
            // the generation goes on for readers that resume.
            if stalled {
                self.publication.original_gone();
                self.tx = mpsc::channel(1).0;
            }
        }
        self.forwarded += 1;
        let metrics = &self.engine.inner.metrics;
        metrics.token_forwarded(self.input.interactive);
        if self.forwarded == 1 {
            metrics.first_token(
                self.input.interactive,
                &self.model.name,
                self.input.received.elapsed(),
            );
        }
        None
    }

    /// The turn's stop (see [`StopFlag`]) was raised: log the attempt, and
    /// how the turn ends.
    fn stopped(&mut self, why: u8, attempt: u32, attempt_started: Instant) -> Stop {
        if why == StopFlag::HARD {
            self.log_attempt(attempt, "interrupted", None, attempt_started);
            Stop::Interrupted
        } else {
            self.log_attempt(attempt, "cancelled", None, attempt_started);
            self.cancelled(false)
        }
    }

    fn cancelled(&mut self, stalled: bool) -> Stop {
        self.disconnected_at = Some(Instant::now());
        Stop::Cancelled { stalled }
    }

    /// One log line per upstream attempt: model, attempt, outcome, status,
    /// duration. Never the key, never message text.
    fn log_attempt(
        &self,
        attempt: u32,
        outcome: &'static str,
        status: Option<u16>,
        began: Instant,
    ) {
        let duration_ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.engine
            .inner
            .metrics
            .upstream_request(&self.model.name, outcome);
        if !self.model.provider.wants_history() && outcome == "ok" {
            // The simulated model: no upstream to speak of, no line per turn.
            return;
        }
        tracing::info!(
            model = %self.model.name,
            provider = self.model.provider.kind(),
            attempt,
            outcome,
            upstream_status = status,
            duration_ms,
            "upstream attempt"
        );
    }

    /// The turn's usage: the provider's figures when its final report
    /// arrived (a completed reply), else counted with the model's tokenizer
    /// (`estimated`) — never silently zero. A reply cut short may carry a
    /// partial report (Anthropic's `message_start` counts the prompt and one
    /// output token): its prompt figure is kept, the completion is the larger
    /// of the report and the count of the text received.
    fn usage(&self, text: &str, outcome: Outcome) -> Usage {
        let counted = self.model.tokenizer.count(text);
        let to_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        match self.reported {
            Some(reported) if outcome == Outcome::Complete => Usage {
                prompt_tokens: to_i64(reported.prompt_tokens),
                completion_tokens: to_i64(reported.completion_tokens),
                source: UsageSource::Provider,
            },
            Some(reported) => Usage {
                prompt_tokens: to_i64(if reported.prompt_tokens > 0 {
                    reported.prompt_tokens
                } else {
                    self.prompt_counted
                }),
                completion_tokens: to_i64(reported.completion_tokens.max(counted)),
                source: UsageSource::Estimated,
            },
            None => Usage {
                prompt_tokens: to_i64(self.prompt_counted),
                completion_tokens: to_i64(counted),
                source: UsageSource::Estimated,
            },
        }
    }

    /// The one settlement of a turn: final status, text and usage (and, for
    /// an idempotent request, the response to replay) in one write; the
    /// idempotency key released when the turn did not complete.
    async fn settle(&mut self, outcome: Outcome) -> Result<TurnSummary, StoreError> {
        let text = self.publication.stream().text().text();
        let usage = self.usage(&text, outcome);
        let summary = TurnSummary {
            text: text.clone(),
            usage,
            finish: self.finish,
        };
        let idempotent_response =
            match (&self.input.idempotency, self.replay.take(), &self.turn.meta) {
                (Some(claim), Some(encode), Some(meta)) if outcome == Outcome::Complete => {
                    Some((self.who.user_id, claim.key.clone(), encode(meta, &summary)))
                }
                _ => None,
            };
        let chat = self.turn.begun.as_ref().map(|begun| begun.chat_id);
        let settlement = Settlement::of(
            &self.who,
            &self.model,
            Ending {
                chat,
                turn: self.turn.id,
                status: outcome.status(),
                text,
                event_lengths: if chat.is_some() {
                    self.publication.stream().text().lengths()
                } else {
                    Vec::new()
                },
                usage,
                idempotent_response,
            },
        );
        let stored = self.guard.settle(settlement, outcome).await;
        self.engine
            .settle_usage(&self.model, self.guard.held.as_ref(), &usage)
            .await;
        match stored {
            Ok(()) => {
                tracing::info!(
                    outcome = outcome.as_str(),
                    model = %self.model.name,
                    messageId = %self.turn.id,
                    chatId = self.turn.begun.as_ref().map(|b| b.chat_id.to_string()),
                    prompt_tokens = usage.prompt_tokens,
                    completion_tokens = usage.completion_tokens,
                    usage_source = usage.source.as_str(),
                    stalled = matches!(outcome, Outcome::Cancelled { stalled: true }),
                    interactive = self.input.interactive,
                    "{}",
                    if self.input.interactive {
                        "stream finished"
                    } else {
                        "reply finished"
                    }
                );
                Ok(summary)
            }
            Err(err) => Err(err),
        }
    }
}

/// Why a running turn must stop — the process stops (`HARD`), or its reader
/// left or it was cancelled (`CLOSED`, [`Publication::stop_signal`]) — as a
/// flag its provider loop polls for the price of an atomic load per token.
/// Polling the two stop futures themselves in that loop's `select!` took a
/// cancellation token's lock and a `Notify`'s on every token of every live
/// stream (≈ 4 % of the server's samples in the sse-1k profile); a small
/// task per turn waits on them instead, and raises the flag.
struct StopFlag {
    /// The flag lives in the stream (see [`LiveStream`]'s layout).
    stream: Arc<LiveStream>,
    _watcher: tokio_util::task::AbortOnDropHandle<()>,
}

/// A turn's stop flag: why it was raised (0 while it is not), and the turn
/// task to wake.
#[derive(Default)]
pub(crate) struct StopState {
    why: std::sync::atomic::AtomicU8,
    waker: futures::task::AtomicWaker,
}

impl StopFlag {
    const HARD: u8 = 1;
    const CLOSED: u8 = 2;

    fn watch(
        stream: Arc<LiveStream>,
        hard: CancellationToken,
        closed: impl Future<Output = ()> + Send + 'static,
    ) -> Self {
        let raise = stream.clone();
        let watcher = tokio::spawn(async move {
            let why = tokio::select! {
                biased;
                _ = hard.cancelled() => StopFlag::HARD,
                _ = closed => StopFlag::CLOSED,
            };
            raise.stop.why.store(why, Ordering::Release);
            raise.stop.waker.wake();
        });
        Self {
            stream,
            _watcher: tokio_util::task::AbortOnDropHandle::new(watcher),
        }
    }

    /// Resolves with the reason once the flag is raised.
    fn raised(&self) -> impl Future<Output = u8> + '_ {
        let state = &self.stream.stop;
        std::future::poll_fn(move |cx| {
            let why = state.why.load(Ordering::Acquire);
            if why != 0 {
                return std::task::Poll::Ready(why);
            }
            state.waker.register(cx.waker());
            match state.why.load(Ordering::Acquire) {
                0 => std::task::Poll::Pending,
                why => std::task::Poll::Ready(why),
            }
        })
    }

    /// Resolves once the flag is raised for `why` (never for another reason).
    async fn raised_by(&self, why: u8) {
        if self.raised().await != why {
            std::future::pending::<()>().await;
        }
    }
}

/// Exponential backoff with jitter: base × 2^(attempt−1) × [0.5, 1.5).
fn backoff(base: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    exp.mul_f64(rand::rng().random_range(0.5..1.5))
}

/// A turn's final write: the stored assistant message (with its ledger row),
/// or only the ledger row of a turn stored nowhere.
enum Settlement {
    Message(FinishedMessage),
    Ledger(LedgerEntry),
}

/// What a turn's settlement is made of, from whichever path settles it.
struct Ending {
    /// The chat the reply is stored in; `None`: a turn stored in no chat.
    chat: Option<ChatId>,
    /// The turn (its assistant message's id).
    turn: MessageId,
    status: MessageStatus,
    text: String,
    event_lengths: Vec<u8>,
    usage: Usage,
    idempotent_response: Option<(UserId, String, serde_json::Value)>,
}

impl Settlement {
    /// The one write that ends a turn: its reply with its usage and ledger
    /// row, or the ledger row alone for a turn stored in no chat; the cost
    /// from the model's prices. Built here for the normal path and for a
    /// turn whose task died.
    fn of(who: &Principal, model: &Model, ending: Ending) -> Settlement {
        let cost = cost_of(model, &ending.usage);
        match ending.chat {
            Some(chat) => Settlement::Message(FinishedMessage {
                org: who.org_id,
                chat,
                id: ending.turn,
                content: ending.text,
                status: ending.status,
                usage: ending.usage,
                cost,
                idempotent_response: ending.idempotent_response,
                event_lengths: ending.event_lengths,
            }),
            None => Settlement::Ledger(LedgerEntry {
                turn: ending.turn,
                org: who.org_id,
                user: who.user_id,
                model: model.name.clone(),
                status: ending.status,
                usage: ending.usage,
                cost,
            }),
        }
    }
}

/// Owns the settlement: [`SettleGuard::settle`] on the normal path; if the
/// turn's task is dropped without it (a panic, an abort), `Drop` stores the
/// text as `failed` from a new tracked task, so nothing stays `streaming`.
struct SettleGuard {
    /// `None` once settled.
    engine: Option<TurnEngine>,
    who: Principal,
    turn: MessageId,
    /// The chat of a stored turn.
    stored: Option<ChatId>,
    model: Arc<Model>,
    live: Arc<LiveStream>,
    key: Option<String>,
    interactive: bool,
    /// The turn's token reservation, settled after the final write.
    held: Option<Held>,
}

impl SettleGuard {
    async fn settle(&mut self, settlement: Settlement, outcome: Outcome) -> Result<(), StoreError> {
        let Some(engine) = self.engine.take() else {
            return Ok(());
        };
        let inner = &engine.inner;
        // Stop the flusher first, so it cannot write a stale partial after
        // the final text.
        inner.flusher.unregister(self.turn);
        inner.metrics.turn_finished(self.interactive, outcome);
        let stored = settle_with_retries(inner.store.as_ref(), &settlement).await;
        match &stored {
            Ok(()) => {}
            Err(StoreError::Unavailable(err)) => {
                // The key of a complete reply stays claimed until its
                // deferred write (its answer is on the way), and is released
                // only if that is given up.
                let key = if outcome == Outcome::Complete {
                    self.key.take()
                } else {
                    None
                };
                settle_later(&engine, settlement, err, key, self.who.clone(), self.turn);
            }
            Err(err) => {
                tracing::error!(error = %err, outcome = outcome.as_str(), messageId = %self.turn, "could not store the final reply");
            }
        }
        if (outcome != Outcome::Complete || stored.is_err())
            && let Some(key) = &self.key
        {
            release_key(inner.store.as_ref(), &self.who, key, self.turn).await;
        }
        stored
    }
}

/// The first wait of a final write deferred by an outage, and the longest
/// (the wait doubles from one to the other).
const DEFERRED_WRITE_FIRST_WAIT: Duration = Duration::from_secs(1);
const DEFERRED_WRITE_MAX_WAIT: Duration = Duration::from_secs(10);

/// Write a turn's final write that failed for an outage once the database
/// is back: tried again after a growing wait (1 s, doubling up to 10 s)
/// until it is stored, or until the process stops (then once more, at
/// once). Meanwhile the message reads `streaming`, or `interrupted` once
/// crash recovery takes it for dead; the final write overwrites either. A
/// tracked task: a graceful shutdown waits for it like for a stream. For
/// every final write that failed for an outage (`err`): the normal path's
/// and that of a turn whose task panicked. `key`: released if the write is
/// given up.
fn settle_later(
    engine: &TurnEngine,
    settlement: Settlement,
    err: &str,
    key: Option<String>,
    who: Principal,
    turn: MessageId,
) {
    tracing::error!(error = %err, messageId = %turn, "could not store the final reply; it is kept and written once the database is back");
    let inner = engine.inner.clone();
    inner.metrics.final_write_deferred("deferred");
    let tasks = inner.tasks.clone();
    tasks.spawn(async move {
        let store = inner.store.as_ref();
        let mut wait = DEFERRED_WRITE_FIRST_WAIT;
        let outcome = loop {
            let stopping = tokio::select! {
                () = tokio::time::sleep(wait) => false,
                () = inner.hard_stop.cancelled() => true,
            };
            match write_settlement(store, &settlement).await {
                Ok(()) => break "saved",
                Err(StoreError::Unavailable(_)) if !stopping => {
                    wait = (wait * 2).min(DEFERRED_WRITE_MAX_WAIT);
                }
                Err(err) => {
                    tracing::error!(error = %err, messageId = %turn, "a deferred final reply could not be stored; it is lost (crash recovery marks the message interrupted)");
                    break "lost";
                }
            }
        };
        inner.metrics.final_write_deferred(outcome);
        if outcome == "saved" {
            tracing::info!(messageId = %turn, "a deferred final reply was stored");
        } else if let Some(key) = key {
            release_key(store, &who, &key, turn).await;
        }
    });
}

impl Drop for SettleGuard {
    fn drop(&mut self) {
        let Some(engine) = self.engine.take() else {
            return;
        };
        let inner = engine.inner.clone();
        inner.flusher.unregister(self.turn);
        inner
            .metrics
            .turn_finished(self.interactive, Outcome::Failed);
        tracing::error!(messageId = %self.turn, "turn task ended without settling; storing it as failed");
        // What the turn used, as after a crash: the prompt if it reached the
        // model, and the text so far (the model's own figures went with the
        // task). Counted in the task below, not here: this may run while a
        // panic unwinds, where a second panic would abort the process.
        let (text, event_lengths, prompt_tokens) = self.live.text().with(|t| {
            (
                t.text.clone(),
                t.lengths.as_bytes().to_vec(),
                t.prompt_tokens,
            )
        });
        let (who, stored, turn) = (self.who.clone(), self.stored, self.turn);
        let key = self.key.take();
        let held = self.held.take();
        let model = self.model.clone();
        let tasks = inner.tasks.clone();
        tasks.spawn(async move {
            let usage = Usage {
                prompt_tokens,
                completion_tokens: i64::try_from(model.tokenizer.count(&text)).unwrap_or(i64::MAX),
                source: UsageSource::Estimated,
            };
            let settlement = Settlement::of(
                &who,
                &model,
                Ending {
                    chat: stored,
                    turn,
                    status: MessageStatus::Failed,
                    text,
                    event_lengths,
                    usage,
                    idempotent_response: None,
                },
            );
            if let Err(StoreError::Unavailable(err)) =
                settle_with_retries(engine.inner.store.as_ref(), &settlement).await
            {
                settle_later(&engine, settlement, &err, None, who.clone(), turn);
            }
            if let Some(key) = key {
                release_key(engine.inner.store.as_ref(), &who, &key, turn).await;
            }
            engine.settle_usage(&model, held.as_ref(), &usage).await;
        });
    }
}

/// The final text is the one write that must not be lost to a momentary
/// overload (a pool timeout): retried a few times.
async fn settle_with_retries(store: &dyn Store, settlement: &Settlement) -> Result<(), StoreError> {
    let mut backoff = FINAL_WRITE_BACKOFF;
    let mut attempts = 1;
    loop {
        match write_settlement(store, settlement).await {
            Ok(()) => return Ok(()),
            Err(StoreError::Unavailable(err)) if attempts < FINAL_WRITE_ATTEMPTS => {
                tracing::warn!(error = %err, attempts, "final write of a turn failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                attempts += 1;
            }
            Err(err) => return Err(err),
        }
    }
}

/// One attempt at a turn's final write.
async fn write_settlement(store: &dyn Store, settlement: &Settlement) -> Result<(), StoreError> {
    match settlement {
        Settlement::Message(finished) => store.finish_message(finished).await.map(drop),
        Settlement::Ledger(entry) => store.record_usage(entry).await,
    }
}

/// A turn that did not complete releases its idempotency key, so that a retry
/// runs again instead of waiting for a response that will never come.
async fn release_key(store: &dyn Store, who: &Principal, key: &str, message: MessageId) {
    if let Err(err) = store.release_idempotency(who.user_id, key, message).await {
        tracing::error!(error = %err, "could not release an idempotency key; retries wait until it is abandoned");
    }
}

/// How long a turn's last event may still wait for room once the
/// process-wide stop is raised (the shutdown's grace is over): a client
/// that stopped reading does not hold the shutdown up.
const LAST_EVENT_AFTER_STOP: Duration = Duration::from_secs(2);

/// Hand a turn's last event (`done`, or the error) to its reader, as
/// patiently as a token (`patience`: `STREAM_SEND_TIMEOUT_SECONDS`), so that
/// a reader that paused while the reply was being stored still gets it; at
/// most [`LAST_EVENT_AFTER_STOP`] after `stop`. Whether it was delivered.
async fn send_last(
    tx: &mpsc::Sender<TurnEvent>,
    event: TurnEvent,
    patience: Duration,
    stop: &CancellationToken,
) -> bool {
    let after_stop = async {
        stop.cancelled().await;
        tokio::time::sleep(LAST_EVENT_AFTER_STOP).await;
    };
    tokio::select! {
        sent = tokio::time::timeout(patience, tx.send(event)) => matches!(sent, Ok(Ok(()))),
        () = after_stop => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(text: &str) -> TurnEvent {
        TurnEvent::Token(text.to_owned())
    }

    fn text(event: Option<TurnEvent>) -> Option<String> {
        match event {
            Some(TurnEvent::Token(text)) => Some(text),
            _ => None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_event_waits_for_a_paused_reader_as_long_as_a_token_would() {
        let (tx, mut rx) = mpsc::channel(1);
        tx.try_send(token("a")).unwrap();
        let reader = tokio::spawn(async move {
            // A reader that pauses for 10 s (a backgrounded tab), then reads.
            tokio::time::sleep(Duration::from_secs(10)).await;
            (text(rx.recv().await), text(rx.recv().await))
        });
        let stop = CancellationToken::new();
        let sent = send_last(&tx, token("last"), Duration::from_secs(30), &stop).await;
        assert!(sent);
        drop(tx);
        let (first, last) = reader.await.unwrap();
        assert_eq!(first.as_deref(), Some("a"));
        assert_eq!(last.as_deref(), Some("last"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_event_gives_up_on_a_silent_reader_and_soon_after_the_stop() {
        let (tx, _rx) = mpsc::channel(1);
        tx.try_send(token("a")).unwrap();
        let stop = CancellationToken::new();
        let started = Instant::now();
        assert!(!send_last(&tx, token("last"), Duration::from_secs(30), &stop).await);
        assert_eq!(started.elapsed().as_secs(), 30);

        let stopper = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            stopper.cancel();
        });
        let started = Instant::now();
        assert!(!send_last(&tx, token("last"), Duration::from_secs(30), &stop).await);
        assert_eq!(
            started.elapsed().as_secs(),
            1 + LAST_EVENT_AFTER_STOP.as_secs()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_event_to_a_reader_that_left_is_dropped_at_once() {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let started = Instant::now();
        let stop = CancellationToken::new();
        assert!(!send_last(&tx, token("last"), Duration::from_secs(30), &stop).await);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
