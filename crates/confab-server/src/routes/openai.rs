//! The OpenAI-compatible API for clients (SPEC §13): `GET /v1/models` and
//! `POST /v1/chat/completions`, streamed or not, so that OpenAI's SDKs and
//! the tools built on them work with `base_url = http://<host>/v1`.
//!
//! Only an adapter: the turn is run by the same [`TurnEngine`] as the
//! native API's (limits, token reservations, ledger, cancel on disconnect,
//! metrics), and this module formats its events in OpenAI's shapes. Every
//! error under `/v1` — this module's and the shared layers' (authentication,
//! rate limit, body size) — leaves in OpenAI's error shape, rewritten by
//! [`openai_errors`].
//!
//! [`TurnEngine`]: confab_core::turn::TurnEngine

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use confab_core::model::{MessageRole, MessageText, parse_system_prompt};
use confab_core::provider::{PromptMessage, Sampling};
use confab_core::service::ServiceError;
use confab_core::turn::{
    GivenConversation, Started, StartedTurn, TurnEvent, TurnFailure, TurnInput, TurnSummary,
};
use confab_core::{ChatId, MessageId};

use crate::error::{ApiError, set_token_limit_headers};
use crate::middleware::{Auth, TurnTicket};
use crate::openai_wire::{
    Choice, ChunkChoice, Completion, CompletionChunk, CompletionRequest, Content, Delta, ErrorBody,
    ErrorObject, ModelList, ModelOut, OutMessage, Stop, UsageOut, UsageSlot,
};
use crate::sse::{Encoder, Pacing, SseBody};
use crate::state::AppState;

/// The header that stores a turn in a confab chat: `new` or a chat id.
pub const CHAT_HEADER: &str = "x-confab-chat-id";
/// OpenAI accepts at most this many stop sequences.
const MAX_STOP: usize = 4;
/// How much of an error body the error layer reads to rewrite it.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// An error in OpenAI's shape, with its status and headers.
#[derive(Debug)]
pub struct OpenAiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl OpenAiError {
    fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    fn model_not_found(name: &str) -> Self {
        let shown: String = name.chars().take(64).collect();
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{shown}` does not exist or you do not have access to it."),
            kind: "invalid_request_error",
            param: Some("model"),
            code: Some("model_not_found"),
        }
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        error_response(self.status, &self.message, self.kind, self.param, self.code)
    }
}

fn error_response(
    status: StatusCode,
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Response {
    let body = ErrorBody {
        error: ErrorObject {
            message,
            kind,
            param,
            code,
        },
    };
    (status, Json(body)).into_response()
}

/// OpenAI's `type` and `code` for a status confab answered with.
fn kind_and_code(status: StatusCode, message: &str) -> (&'static str, Option<&'static str>) {
    match status.as_u16() {
        401 => ("invalid_request_error", Some("invalid_api_key")),
        403 => ("invalid_request_error", Some("permission_denied")),
        404 => ("invalid_request_error", Some("not_found")),
        429 if message == "Token budget exceeded" => ("tokens", Some("rate_limit_exceeded")),
        429 => ("requests", Some("rate_limit_exceeded")),
        400..=499 => ("invalid_request_error", None),
        _ => ("server_error", None),
    }
}

/// Error responses under `/v1` in OpenAI's shape: a native error body
/// (`{"error": "<reason>", "message": "…"}`, from the shared layers and the
/// engine's errors) is rewritten with the same status, message and headers
/// (`Retry-After`, `X-TokenLimit-*`, `X-Request-ID`); a body already in
/// OpenAI's shape passes.
pub async fn openai_errors(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_ERROR_BODY)
        .await
        .unwrap_or_default();
    let native: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
    let message = match native.as_ref().map(|v| (&v["error"], &v["message"])) {
        Some((serde_json::Value::Object(_), _)) => {
            return Response::from_parts(parts, Body::from(bytes));
        }
        // An OpenAI client sends keys, not confab's tenant headers.
        Some((_, serde_json::Value::String(message)))
            if status == StatusCode::UNAUTHORIZED && message == crate::auth::MISSING_HEADERS =>
        {
            "Missing API key: send Authorization: Bearer <confab API key>".to_owned()
        }
        Some((_, serde_json::Value::String(message))) => message.clone(),
        _ => status.canonical_reason().unwrap_or("Error").to_owned(),
    };
    let (kind, code) = kind_and_code(status, &message);
    let fresh = error_response(status, &message, kind, None, code);
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    for (name, value) in fresh.headers() {
        parts.headers.insert(name.clone(), value.clone());
    }
    let (_, body) = fresh.into_parts();
    Response::from_parts(parts, body)
}

/// `GET /v1/models`: the models the caller's org may use, in OpenAI's
/// shape (SPEC §13).
#[utoipa::path(
    get, path = "/v1/models", tag = "openai", operation_id = "openaiListModels",
    responses((status = 200, description = "The models", body = ModelList)),
)]
pub async fn list_models(State(state): State<AppState>, Auth(principal): Auth) -> Response {
    let created = state.started_at.timestamp();
    let data = state
        .engine
        .models()
        .allowed(&principal.policy)
        .map(|m| ModelOut {
            id: &m.name,
            object: "model",
            created,
            owned_by: "confab",
        })
        .collect();
    Json(ModelList {
        object: "list",
        data,
    })
    .into_response()
}

#[utoipa::path(
    get, path = "/v1/models/{model}", tag = "openai", operation_id = "openaiGetModel",
    params(("model" = String, Path, description = "A model name")),
    responses((status = 200, description = "The model", body = ModelOut)),
)]
/// `GET /v1/models/{model}`: one of the org's models, else 404
/// `model_not_found` (the same for a model that does not exist and one the
/// org may not use).
pub async fn get_model(
    State(state): State<AppState>,
    Auth(principal): Auth,
    name: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
) -> Response {
    // A name that is not UTF-8 once percent-decoded names no model: 404 as
    // for any other (not the framework's 400).
    let Ok(axum::extract::Path(name)) = name else {
        return OpenAiError::model_not_found("(not UTF-8)").into_response();
    };
    let model = state
        .engine
        .models()
        .allowed(&principal.policy)
        .find(|m| m.name == name);
    match model {
        Some(m) => Json(ModelOut {
            id: &m.name,
            object: "model",
            created: state.started_at.timestamp(),
            owned_by: "confab",
        })
        .into_response(),
        None => OpenAiError::model_not_found(&name).into_response(),
    }
}

/// A request, checked: what the engine is given, and how to answer.
struct Checked {
    input: TurnInput,
    stream: bool,
    include_usage: bool,
}

/// SPEC §13's request fields; anything else is ignored.
fn check(
    req: CompletionRequest,
    store: Option<Option<ChatId>>,
    received: tokio::time::Instant,
) -> Result<Checked, OpenAiError> {
    if !confab_core::models::valid_model_name(&req.model) {
        return Err(OpenAiError::model_not_found(&req.model));
    }
    if req.messages.is_empty() {
        return Err(OpenAiError::invalid(
            "messages must contain at least one message",
            Some("messages"),
        ));
    }
    let mut system: Vec<String> = Vec::new();
    let mut messages: Vec<PromptMessage> = Vec::with_capacity(req.messages.len());
    for message in req.messages {
        let text = match message.content {
            None => String::new(),
            Some(Content::Text(text)) => text,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match (part.kind.as_str(), part.text) {
                        ("text", Some(piece)) => text.push_str(&piece),
                        _ => {
                            return Err(OpenAiError::invalid(
                                "only text content parts are supported",
                                Some("messages"),
                            ));
                        }
                    }
                }
                text
            }
        };
        if text.contains('\0') {
            return Err(OpenAiError::invalid(
                "messages must not contain NUL characters",
                Some("messages"),
            ));
        }
        let role = match message.role.as_str() {
            "system" | "developer" => {
                system.push(text);
                continue;
            }
            "user" => MessageRole::User,
            "assistant" => MessageRole::Assistant,
            _ => {
                return Err(OpenAiError::invalid(
                    "message roles must be system, developer, user or assistant \
                     (tools are not supported)",
                    Some("messages"),
                ));
            }
        };
        messages.push(PromptMessage {
            role,
            content: text,
        });
    }
    let Some(last_user) = messages.iter().rev().find(|m| m.role == MessageRole::User) else {
        return Err(OpenAiError::invalid(
            "messages must contain a user message",
            Some("messages"),
        ));
    };
    // A turn stored into a chat follows the native rules (its message and
    // system prompt are stored there); a stateless one is the client's own
    // conversation, stored nowhere, bounded by the body limit and the
    // model's context like every earlier message (agent frameworks send
    // system prompts and documents far over 10,000 characters).
    let stored = store.is_some();
    let text = if stored {
        MessageText::parse(last_user.content.clone())
    } else {
        MessageText::parse_unstored(last_user.content.clone())
    }
    .map_err(|e| OpenAiError::invalid(format!("the last user {}", e.0), Some("messages")))?;
    let system = match system.join("\n\n") {
        joined if stored => {
            parse_system_prompt(&joined).map_err(|e| OpenAiError::invalid(e.0, Some("messages")))?
        }
        joined => (!joined.trim().is_empty()).then_some(joined),
    };
    let max_output_tokens = match req.max_completion_tokens.or(req.max_tokens) {
        Some(0) => {
            return Err(OpenAiError::invalid(
                "max_tokens must be at least 1",
                Some("max_tokens"),
            ));
        }
        other => other,
    };
    if let Some(t) = req.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(OpenAiError::invalid(
            "temperature must be between 0 and 2",
            Some("temperature"),
        ));
    }
    if let Some(p) = req.top_p
        && !(0.0..=1.0).contains(&p)
    {
        return Err(OpenAiError::invalid(
            "top_p must be between 0 and 1",
            Some("top_p"),
        ));
    }
    let stop = match req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(list)) => list,
    };
    if stop.len() > MAX_STOP || stop.iter().any(|s| s.is_empty()) {
        return Err(OpenAiError::invalid(
            "stop must be at most 4 non-empty strings",
            Some("stop"),
        ));
    }
    let stream = req.stream.unwrap_or(false);
    let include_usage = stream
        && req
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
    let mut input = TurnInput::chat(text, stream, received);
    input.model = Some(req.model);
    input.store = store.is_some();
    input.chat_id = store.flatten();
    input.system = system.clone();
    input.given = Some(GivenConversation { system, messages });
    input.max_output_tokens = max_output_tokens;
    input.detachable = false;
    input.sampling = Sampling {
        temperature: req.temperature,
        top_p: req.top_p,
        stop,
    };
    Ok(Checked {
        input,
        stream,
        include_usage,
    })
}

/// `X-Confab-Chat-Id`: absent → stateless; `new` → a new chat; an id → that
/// chat of the caller (`Some(None)` / `Some(Some(id))`).
fn chat_header(headers: &HeaderMap) -> Result<Option<Option<ChatId>>, OpenAiError> {
    let Some(value) = headers.get(CHAT_HEADER) else {
        return Ok(None);
    };
    let value = value.to_str().unwrap_or("").trim();
    if value.eq_ignore_ascii_case("new") {
        return Ok(Some(None));
    }
    value
        .parse::<ChatId>()
        .map(|id| Some(Some(id)))
        .map_err(|_| {
            OpenAiError::invalid(
                "X-Confab-Chat-Id must be `new` or the id of one of your chats",
                None,
            )
        })
}

fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<CompletionRequest, OpenAiError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            OpenAiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                ..OpenAiError::invalid("Request body is too large", None)
            }
        } else {
            OpenAiError::invalid("could not read the request body", None)
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|err| {
        OpenAiError::invalid(
            format!(
                "the request body is not a valid chat completion request: {}",
                without_client_text(&err)
            ),
            None,
        )
    })
}

/// serde's message (what was expected, where), without the client's own
/// text: its `invalid type` and `invalid value` messages quote a string the
/// client sent (`invalid type: string "…", expected a sequence`), which may
/// be a message's content.
fn without_client_text(err: &serde_json::Error) -> String {
    let text = err.to_string();
    match (text.find(": string \""), text.rfind("\", expected")) {
        (Some(start), Some(end)) if start < end => {
            format!("{}: string{}", &text[..start], &text[end + 1..])
        }
        _ => text,
    }
}

/// `POST /v1/chat/completions`, streamed (`"stream": true`) or not.
#[utoipa::path(
    post, path = "/v1/chat/completions", tag = "openai", operation_id = "openaiChatCompletions",
    request_body = CompletionRequest,
    params(("X-Confab-Chat-Id" = Option<String>, Header,
        pattern = "^[ \\t]*([Nn][Ee][Ww]|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})[ \\t]*$",
        description = "`new`, or the id of one of the caller's chats: the turn is also stored in that chat")),
    responses((status = 200, description = "The completion (`application/json`), or its chunks, ending with `data: [DONE]`",
        content((Completion = "application/json"), (crate::openai_wire::CompletionStreamEvent = "text/event-stream")),
        headers(("X-Confab-Chat-Id" = Option<uuid::Uuid>, description = "The chat the turn was stored in")))),
)]
pub async fn chat_completions(
    State(state): State<AppState>,
    Auth(principal): Auth,
    ticket: TurnTicket,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Response> {
    let received = tokio::time::Instant::now();
    let req = parse_body(body).map_err(IntoResponse::into_response)?;
    let store = chat_header(&headers).map_err(IntoResponse::into_response)?;
    let Checked {
        mut input,
        stream,
        include_usage,
    } = check(req, store, received).map_err(IntoResponse::into_response)?;
    ticket.hand_on(&mut input);
    let asked = input.model.clone().unwrap_or_default();
    let started = state
        .engine
        .start(&principal, input, None)
        .await
        .map_err(|err| match err {
            ServiceError::UnknownModel(_) => OpenAiError::model_not_found(&asked).into_response(),
            ServiceError::NotFound => OpenAiError {
                status: StatusCode::NOT_FOUND,
                message: "Chat not found".into(),
                kind: "invalid_request_error",
                param: None,
                code: Some("chat_not_found"),
            }
            .into_response(),
            ServiceError::MessageTooLong(model) => OpenAiError {
                status: StatusCode::BAD_REQUEST,
                message: format!(
                    "The messages and max_tokens do not fit in the context of model {model}"
                ),
                kind: "invalid_request_error",
                param: Some("messages"),
                code: Some("context_length_exceeded"),
            }
            .into_response(),
            other => ApiError::from(other).into_response(),
        })?;
    let Started::Turn(mut turn) = started else {
        return Err(
            ApiError::Internal("a completion was answered as a replay".into()).into_response(),
        );
    };
    let head = ResponseHead::of(&turn);
    if !stream {
        return complete(turn, head).await;
    }
    // Hold the headers until the first event (or a keep-alive interval):
    // a failure before the first token is still an HTTP error.
    let pacing = Pacing::of(&state);
    let first = match tokio::time::timeout(pacing.keepalive, turn.events.recv()).await {
        Ok(Some(TurnEvent::Failed(failure))) => {
            return Err(ApiError::from_turn_failure(&turn.model, *failure).into_response());
        }
        Ok(Some(event)) => Some(event),
        Ok(None) => {
            return Err(
                ApiError::Internal("the turn ended without a final event".into()).into_response(),
            );
        }
        Err(_) => None,
    };
    let chunks = ChunkStream {
        id: head.id.clone(),
        model: turn.model.clone(),
        created: head.created,
        include_usage,
        span: tracing::Span::current(),
    };
    let body = Body::from_stream(
        SseBody::with_encoder(turn.events, first, chunks, pacing).ended_by(turn.end),
    );
    let mut response = Response::new(body);
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    head.apply(h);
    Ok(response)
}

/// What every response of a turn carries besides its body.
struct ResponseHead {
    id: String,
    created: i64,
    chat_id: Option<ChatId>,
    budget: Option<confab_core::ratelimit::BudgetState>,
}

impl ResponseHead {
    fn of(turn: &StartedTurn) -> Self {
        Self {
            id: completion_id(turn.message_id),
            created: turn.created_at.timestamp(),
            chat_id: turn.chat_id,
            budget: turn.budget,
        }
    }

    fn apply(&self, headers: &mut HeaderMap) {
        if let Some(Ok(v)) = self
            .chat_id
            .map(|id| HeaderValue::from_str(&id.to_string()))
        {
            headers.insert(CHAT_HEADER, v);
        }
        if let Some(budget) = &self.budget {
            set_token_limit_headers(headers, budget);
        }
    }
}

fn completion_id(id: MessageId) -> String {
    format!("chatcmpl-{}", id.to_string().replace('-', ""))
}

/// A non-streamed completion: wait for the whole reply.
async fn complete(mut turn: StartedTurn, head: ResponseHead) -> Result<Response, Response> {
    while let Some(event) = turn.events.recv().await {
        match event {
            TurnEvent::Token(_) => {}
            TurnEvent::Done(summary) => {
                let body = Completion {
                    id: &head.id,
                    object: "chat.completion",
                    created: head.created,
                    model: &turn.model,
                    choices: [Choice {
                        index: 0,
                        message: OutMessage {
                            role: "assistant",
                            content: &summary.text,
                            refusal: None,
                        },
                        logprobs: None,
                        finish_reason: summary.finish.as_str(),
                    }],
                    usage: summary.usage.into(),
                    system_fingerprint: None,
                };
                let mut response = Json(body).into_response();
                head.apply(response.headers_mut());
                return Ok(response);
            }
            TurnEvent::Failed(failure) => {
                return Err(ApiError::from_turn_failure(&turn.model, *failure).into_response());
            }
        }
    }
    Err(ApiError::Internal("the turn ended without a final event".into()).into_response())
}

/// Encodes a turn's events as `chat.completion.chunk` lines.
struct ChunkStream {
    id: String,
    model: String,
    created: i64,
    include_usage: bool,
    /// The request's span: the body is polled outside it, and a failure's
    /// log line must carry the request id.
    span: tracing::Span,
}

impl ChunkStream {
    fn usage_slot(&self) -> UsageSlot {
        if self.include_usage {
            UsageSlot::Null
        } else {
            UsageSlot::Absent
        }
    }

    fn chunk(&self, out: &mut BytesMut, choices: &[ChunkChoice<'_>], usage: UsageSlot) {
        let chunk = CompletionChunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            system_fingerprint: None,
            choices,
            usage,
        };
        data_line(out, &chunk);
    }

    fn delta(&self, out: &mut BytesMut, delta: Delta<'_>, finish: Option<&'static str>) {
        let choice = ChunkChoice {
            index: 0,
            delta,
            logprobs: None,
            finish_reason: finish,
        };
        self.chunk(out, std::slice::from_ref(&choice), self.usage_slot());
    }

    /// The opening chunk: the role, no text yet (as OpenAI sends it).
    fn role_chunk(&self, out: &mut BytesMut) {
        self.delta(
            out,
            Delta {
                role: Some("assistant"),
                content: Some(""),
            },
            None,
        );
    }

    fn token(&self, out: &mut BytesMut, text: &str) {
        self.delta(
            out,
            Delta {
                role: None,
                content: Some(text),
            },
            None,
        );
    }

    fn done(&self, out: &mut BytesMut, summary: &TurnSummary) {
        self.delta(out, Delta::default(), Some(summary.finish.as_str()));
        if self.include_usage {
            self.chunk(out, &[], UsageSlot::Usage(UsageOut::from(summary.usage)));
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
    }

    /// A failure after the first byte: one `data:` line with an error
    /// object, then the stream ends (no `[DONE]`).
    fn failed(&self, out: &mut BytesMut, failure: TurnFailure) {
        let err = ApiError::from_turn_failure(&self.model, failure);
        let status = err.status_code();
        let message = match &err {
            ApiError::Internal(_) => "Internal server error".to_owned(),
            ApiError::StoreUnavailable(_) => crate::error::DATABASE_UNAVAILABLE.to_owned(),
            other => other.to_string(),
        };
        self.span.in_scope(|| {
            tracing::warn!(status = status.as_u16(), error = %message, "completion stream failed after its first byte");
        });
        let (kind, code) = kind_and_code(status, &message);
        let body = ErrorBody {
            error: ErrorObject {
                message: &message,
                kind,
                param: None,
                code,
            },
        };
        data_line(out, &body);
    }
}

impl Encoder for ChunkStream {
    type Event = TurnEvent;

    fn opening(&mut self, out: &mut BytesMut) {
        self.role_chunk(out);
    }

    fn encode(&mut self, event: TurnEvent, out: &mut BytesMut) -> bool {
        match event {
            TurnEvent::Token(text) => {
                self.token(out, &text);
                false
            }
            TurnEvent::Done(summary) => {
                self.done(out, &summary);
                true
            }
            TurnEvent::Failed(failure) => {
                self.failed(out, *failure);
                true
            }
        }
    }
}

fn data_line<T: serde::Serialize>(out: &mut BytesMut, value: &T) {
    crate::sse::write_event(out, None, value);
}
