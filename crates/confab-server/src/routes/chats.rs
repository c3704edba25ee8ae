//! The chat API (SPEC §5). Handlers parse and validate at the edge, call the
//! `ChatService`, and map to the original service's JSON shapes.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use confab_core::ChatId;
use confab_core::model::{
    ChatCursor, ChatTitle, IdempotencyClaim, MessageText, parse_system_prompt,
};
use confab_core::models::valid_model_name;
use confab_core::turn::{ReplayEncoder, Started, TurnEvent, TurnInput};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::middleware::{Auth, TurnTicket};
use crate::state::AppState;
use crate::wire::{ChatJson, ChatListJson, ChatSummary, HistoryJson, MessageJson, TurnReply};

const CHATS_DEFAULT_LIMIT: u32 = 50;
const CHATS_MAX_LIMIT: u32 = 200;
const MESSAGES_DEFAULT_LIMIT: u32 = 100;
const MESSAGES_MAX_LIMIT: u32 = 1000;
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;
/// 9999-12-31T23:59:59.999999Z in microseconds since the epoch.
const MAX_CURSOR_MICROS: i64 = 253_402_300_799_999_999;

/// A validated `POST /chat` or `POST /chat/stream` body.
pub struct TurnRequest {
    pub text: MessageText,
    pub chat_id: Option<ChatId>,
    pub model: Option<String>,
    pub system: Option<String>,
}

impl TurnRequest {
    /// What the turn engine is given.
    pub fn into_input(
        self,
        idempotency: Option<IdempotencyClaim>,
        interactive: bool,
        received: tokio::time::Instant,
    ) -> TurnInput {
        TurnInput {
            chat_id: self.chat_id,
            model: self.model,
            system: self.system,
            idempotency,
            ..TurnInput::chat(self.text, interactive, received)
        }
    }
}

/// Parse the body as JSON whatever its `Content-Type` (the original's curl
/// clients do not always send one) and apply SPEC §5's rules.
pub fn parse_turn_request(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<TurnRequest, ApiError> {
    let value = json_object(body, limit)?;
    let message = match value.get("message") {
        None | Some(Value::Null) => {
            return Err(ApiError::BadRequest("message is required".into()));
        }
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(ApiError::BadRequest("message must be a string".into())),
    };
    let text = MessageText::parse(message).map_err(|e| ApiError::BadRequest(e.0))?;
    let chat_id = match value.get("chat_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(
            s.parse::<ChatId>()
                .map_err(|_| ApiError::BadRequest("chat_id must be a UUID".into()))?,
        ),
        Some(_) => return Err(ApiError::BadRequest("chat_id must be a UUID".into())),
    };
    // A name that cannot be a model is the same answer as an unknown one.
    let model = match value.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) if valid_model_name(name) => Some(name.clone()),
        Some(Value::String(name)) => {
            let shown: String = name.chars().take(64).collect();
            return Err(ApiError::BadRequest(format!("Unknown model: {shown}")));
        }
        Some(_) => return Err(ApiError::BadRequest("model must be a string".into())),
    };
    let system = match value.get("system") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => parse_system_prompt(s).map_err(|e| ApiError::BadRequest(e.0))?,
        Some(_) => return Err(ApiError::BadRequest("system must be a string".into())),
    };
    if system.is_some() && chat_id.is_some() {
        return Err(ApiError::BadRequest(
            "system can only be given when starting a new chat".into(),
        ));
    }
    Ok(TurnRequest {
        text,
        chat_id,
        model,
        system,
    })
}

/// The body as a JSON object, with SPEC's 400/413 answers.
fn json_object(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<serde_json::Map<String, Value>, ApiError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!("Request body is larger than {limit} bytes"))
        } else {
            ApiError::BadRequest(format!("Could not read the request body: {rejection}"))
        }
    })?;
    if bytes.is_empty() {
        return Err(ApiError::BadRequest(
            "Request body must be a JSON object".into(),
        ));
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::BadRequest(
            "Request body must be a JSON object".into(),
        )),
        Err(e) => Err(ApiError::BadRequest(format!("Malformed JSON: {e}"))),
    }
}

fn idempotency_claim(
    headers: &HeaderMap,
    req: &TurnRequest,
) -> Result<Option<IdempotencyClaim>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| {
            (1..=MAX_IDEMPOTENCY_KEY_LEN).contains(&k.len())
                && k.bytes().all(|b| b.is_ascii_graphic())
        })
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"
            ))
        })?;
    // The logical request, not its bytes: whitespace or key order in the
    // JSON does not make a retry a different request.
    let mut hasher = Sha256::new();
    hasher.update(req.chat_id.map(|c| c.to_string()).unwrap_or_default());
    hasher.update([0]);
    hasher.update(req.text.as_str());
    // Only when given, so that keys stored before models existed still match.
    for (tag, value) in [(b'm', &req.model), (b's', &req.system)] {
        if let Some(value) = value {
            hasher.update([0, tag]);
            hasher.update(value);
        }
    }
    Ok(Some(IdempotencyClaim {
        key: key.to_owned(),
        request_hash: hex::encode(hasher.finalize()),
    }))
}

/// Send a message and wait for the whole reply (SPEC §5, §11).
#[utoipa::path(
    post, path = "/chat", tag = "chats", operation_id = "postChat",
    request_body = crate::wire::TurnRequestBody,
    params(("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255, pattern = "^[!-~]+$",
        description = "A retry with the same key (per user, kept 24 h) returns the first response")),
    responses((status = 200, description = "The reply, stored with the message", body = TurnReply)),
)]
pub async fn post_chat(
    State(state): State<AppState>,
    Auth(principal): Auth,
    ticket: TurnTicket,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let received = tokio::time::Instant::now();
    let req = parse_turn_request(body, state.config.max_body_bytes)?;
    let claim = idempotency_claim(&headers, &req)?;
    // What an identical retry replays: the same type as the live answer.
    let replay: ReplayEncoder = Box::new(|meta, summary| {
        serde_json::to_value(TurnReply::new(meta, summary)).unwrap_or(Value::Null)
    });
    let mut input = req.into_input(claim, false, received);
    ticket.hand_on(&mut input);
    let mut turn = match state.engine.start(&principal, input, Some(replay)).await? {
        Started::Turn(turn) => turn,
        Started::Replay(stored) => {
            state.metrics.idempotent_replays.inc();
            tracing::info!("replaying stored response for Idempotency-Key");
            let mut response = Json(stored).into_response();
            response.headers_mut().insert(
                "idempotent-replayed",
                axum::http::HeaderValue::from_static("true"),
            );
            return Ok(response);
        }
    };
    // The reply arrives as events; the summary carries the whole text. If
    // this request is dropped meanwhile, the engine sees it and cancels
    // (with STREAM_DETACH_SECONDS, after that long without a reader of the
    // message's stream).
    while let Some(event) = turn.events.recv().await {
        match event {
            TurnEvent::Token(_) => {}
            TurnEvent::Done(summary) => {
                let Some(chat_id) = turn.chat_id else {
                    return Err(ApiError::Internal("a chat turn was stored nowhere".into()));
                };
                let meta = confab_core::turn::StartedMeta {
                    chat_id,
                    message_id: turn.message_id,
                    created_at: turn.created_at,
                    model: turn.model.clone(),
                };
                let mut response = Json(TurnReply::new(&meta, &summary)).into_response();
                if let Some(budget) = &turn.budget {
                    crate::error::set_token_limit_headers(response.headers_mut(), budget);
                }
                return Ok(response);
            }
            TurnEvent::Failed(failure) => {
                return Err(ApiError::from_turn_failure(&turn.model, *failure));
            }
        }
    }
    Err(ApiError::Internal(
        "the turn ended without a final event".into(),
    ))
}

/// A malformed id — not a UUID, or not even UTF-8 once percent-decoded —
/// cannot name a chat: 404, as for any unknown chat.
fn parse_path_id(id: Result<Path<String>, PathRejection>) -> Result<ChatId, ApiError> {
    let Ok(Path(id)) = id else {
        return Err(ApiError::chat_not_found());
    };
    id.parse().map_err(|_| ApiError::chat_not_found())
}

fn parse_limit(query: &HashMap<String, String>, default: u32, max: u32) -> Result<u32, ApiError> {
    match query.get("limit") {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                ApiError::BadRequest(format!("limit must be a whole number from 1 to {max}"))
            }),
    }
}

/// A query parameter that was given and is not blank (`?cursor=` is the
/// first page, as no cursor).
fn given<'q>(query: &'q HashMap<String, String>, name: &str) -> Option<&'q str> {
    query
        .get(name)
        .map(String::as_str)
        .filter(|v| !v.trim().is_empty())
}

fn encode_cursor(raw: &str) -> String {
    URL_SAFE_NO_PAD.encode(raw)
}

fn decode_cursor(cursor: &str) -> Option<String> {
    URL_SAFE_NO_PAD
        .decode(cursor.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
}

fn chat_cursor(c: &ChatCursor) -> String {
    encode_cursor(&format!("c1:{}:{}", c.updated_at.timestamp_micros(), c.id))
}

fn parse_chat_cursor(cursor: &str) -> Result<ChatCursor, ApiError> {
    let bad = || ApiError::BadRequest("cursor is not valid; pass next_cursor unchanged".into());
    let raw = decode_cursor(cursor).ok_or_else(bad)?;
    let mut parts = raw.splitn(3, ':');
    let (Some("c1"), Some(micros), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    // Within what both databases can store (PostgreSQL stops at 4713 BC):
    // a forged cursor is a 400, never a database error.
    let micros: i64 = micros
        .parse()
        .ok()
        .filter(|m| (0..=MAX_CURSOR_MICROS).contains(m))
        .ok_or_else(bad)?;
    let updated_at = DateTime::<Utc>::from_timestamp_micros(micros).ok_or_else(bad)?;
    let id: ChatId = id.parse().map_err(|_| bad())?;
    Ok(ChatCursor { updated_at, id })
}

fn message_cursor(seq: i64) -> String {
    encode_cursor(&format!("m1:{seq}"))
}

fn parse_message_cursor(cursor: &str) -> Result<i64, ApiError> {
    let bad = || ApiError::BadRequest("before is not valid; pass older_cursor unchanged".into());
    let raw = decode_cursor(cursor).ok_or_else(bad)?;
    raw.strip_prefix("m1:")
        .and_then(|s| s.parse::<i64>().ok())
        .filter(|s| *s >= 1)
        .ok_or_else(bad)
}

/// A chat with its newest messages, in conversation order.
#[utoipa::path(
    get, path = "/chat/{id}", tag = "chats", operation_id = "getChat",
    params(
        ("id" = uuid::Uuid, Path, description = "A chat the caller may read"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "How many of the newest messages (default 100)"),
        ("before" = Option<String>, Query, description = "`older_cursor` of the previous page (opaque; blank: none)"),
    ),
    responses((status = 200, description = "The chat", body = HistoryJson)),
)]
pub async fn get_chat(
    State(state): State<AppState>,
    Auth(principal): Auth,
    id: Result<Path<String>, PathRejection>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let id = parse_path_id(id)?;
    let limit = parse_limit(&query, MESSAGES_DEFAULT_LIMIT, MESSAGES_MAX_LIMIT)?;
    let before = given(&query, "before")
        .map(parse_message_cursor)
        .transpose()?;
    let history = state.service.history(&principal, id, limit, before).await?;
    Ok(Json(HistoryJson {
        chat: ChatJson::from(&history.chat),
        messages: history.messages.iter().map(MessageJson::from).collect(),
        older_cursor: history.older.map(message_cursor),
    })
    .into_response())
}

/// The caller's own chats, most recently updated first.
#[utoipa::path(
    get, path = "/chats", tag = "chats", operation_id = "listChats",
    params(
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 200, description = "Page size (default 50)"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page (opaque; blank: none)"),
    ),
    responses((status = 200, description = "One page of chats", body = ChatListJson)),
)]
pub async fn list_chats(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let limit = parse_limit(&query, CHATS_DEFAULT_LIMIT, CHATS_MAX_LIMIT)?;
    let after = given(&query, "cursor").map(parse_chat_cursor).transpose()?;
    let (chats, next) = state.service.list_chats(&principal, after, limit).await?;
    Ok(Json(ChatListJson {
        chats: chats.iter().map(ChatSummary::from).collect(),
        count: chats.len(),
        next_cursor: next.as_ref().map(chat_cursor),
    })
    .into_response())
}

/// Rename a chat (its owner only).
#[utoipa::path(
    patch, path = "/chat/{id}", tag = "chats", operation_id = "renameChat",
    params(("id" = uuid::Uuid, Path, description = "A chat the caller owns")),
    request_body = crate::wire::RenameRequestBody,
    responses((status = 200, description = "The renamed chat", body = ChatJson)),
)]
pub async fn rename_chat(
    State(state): State<AppState>,
    Auth(principal): Auth,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let id = parse_path_id(id)?;
    let value = json_object(body, state.config.max_body_bytes)?;
    let title = match value.get("title") {
        Some(Value::String(s)) => ChatTitle::parse(s).map_err(|e| ApiError::BadRequest(e.0))?,
        None | Some(Value::Null) => return Err(ApiError::BadRequest("title is required".into())),
        Some(_) => return Err(ApiError::BadRequest("title must be a string".into())),
    };
    let chat = state.service.rename(&principal, id, &title).await?;
    Ok(Json(ChatJson::from(&chat)).into_response())
}

/// Delete a chat (soft: it answers 404 afterwards).
#[utoipa::path(
    delete, path = "/chat/{id}", tag = "chats", operation_id = "deleteChat",
    params(("id" = uuid::Uuid, Path, description = "A chat the caller owns")),
    responses((status = 204, description = "Deleted")),
)]
pub async fn delete_chat(
    State(state): State<AppState>,
    Auth(principal): Auth,
    id: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let id = parse_path_id(id)?;
    state.service.delete(&principal, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = ChatCursor {
            updated_at: DateTime::<Utc>::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            id: ChatId::new(),
        };
        assert_eq!(parse_chat_cursor(&chat_cursor(&c)).unwrap(), c);
        assert_eq!(parse_message_cursor(&message_cursor(42)).unwrap(), 42);
        let forged = encode_cursor(&format!("c1:-6374000000000000000:{}", ChatId::new()));
        for bad in ["", "!!!", "bm9wZQ", &message_cursor(3), &forged] {
            assert!(parse_chat_cursor(bad).is_err(), "{bad}");
        }
        assert!(parse_message_cursor(&chat_cursor(&c)).is_err());
        assert!(parse_message_cursor(&encode_cursor("m1:0")).is_err());
    }
}
