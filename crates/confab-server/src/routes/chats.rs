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
use confab_core::model::{ChatCursor, ChatTitle, IdempotencyClaim, MessageText, rfc3339_millis};
use confab_core::service::TurnStart;
use confab_core::{Chat, ChatId, Message};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::middleware::Auth;
use crate::state::AppState;
use crate::streaming::PendingReply;

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
    Ok(TurnRequest { text, chat_id })
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
    Ok(Some(IdempotencyClaim {
        key: key.to_owned(),
        request_hash: hex::encode(hasher.finalize()),
    }))
}

pub async fn post_chat(
    State(state): State<AppState>,
    Auth(principal): Auth,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req = parse_turn_request(body, state.config.max_body_bytes)?;
    let claim = idempotency_claim(&headers, &req)?;
    let key = claim.as_ref().map(|c| c.key.clone());
    let begun = match state
        .service
        .begin_turn(&principal, &req.text, req.chat_id, claim)
        .await?
    {
        TurnStart::Begun(begun) => begun,
        TurnStart::Replay(stored) => {
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
    let pending = PendingReply::new(&state, &principal, &begun, key.clone());
    let reply = state
        .service
        .complete_turn(&principal, &begun, key.as_deref())
        .await;
    pending.settle();
    Ok(Json(reply?).into_response())
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

fn message_json(m: &Message) -> Value {
    json!({
        "id": m.id,
        "role": m.role,
        "content": m.content,
        "status": m.status,
        "created_at": rfc3339_millis::format(&m.created_at),
    })
}

fn chat_summary(c: &Chat) -> Value {
    json!({
        "id": c.id,
        "title": c.title,
        "created_at": rfc3339_millis::format(&c.created_at),
        "updated_at": rfc3339_millis::format(&c.updated_at),
    })
}

pub async fn get_chat(
    State(state): State<AppState>,
    Auth(principal): Auth,
    id: Result<Path<String>, PathRejection>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_path_id(id)?;
    let limit = parse_limit(&query, MESSAGES_DEFAULT_LIMIT, MESSAGES_MAX_LIMIT)?;
    let before = query
        .get("before")
        .map(|c| parse_message_cursor(c))
        .transpose()?;
    let history = state.service.history(&principal, id, limit, before).await?;
    let chat = &history.chat;
    Ok(Json(json!({
        "chat_id": chat.id,
        "title": chat.title,
        "created_at": rfc3339_millis::format(&chat.created_at),
        "updated_at": rfc3339_millis::format(&chat.updated_at),
        "message_count": chat.message_count,
        "messages": history.messages.iter().map(message_json).collect::<Vec<_>>(),
        "older_cursor": history.older.map(message_cursor),
    })))
}

pub async fn list_chats(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = parse_limit(&query, CHATS_DEFAULT_LIMIT, CHATS_MAX_LIMIT)?;
    let after = query
        .get("cursor")
        .map(|c| parse_chat_cursor(c))
        .transpose()?;
    let (chats, next) = state.service.list_chats(&principal, after, limit).await?;
    Ok(Json(json!({
        "chats": chats.iter().map(chat_summary).collect::<Vec<_>>(),
        "count": chats.len(),
        "next_cursor": next.as_ref().map(chat_cursor),
    })))
}

pub async fn rename_chat(
    State(state): State<AppState>,
    Auth(principal): Auth,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_path_id(id)?;
    let value = json_object(body, state.config.max_body_bytes)?;
    let title = match value.get("title") {
        Some(Value::String(s)) => ChatTitle::parse(s).map_err(|e| ApiError::BadRequest(e.0))?,
        None | Some(Value::Null) => return Err(ApiError::BadRequest("title is required".into())),
        Some(_) => return Err(ApiError::BadRequest("title must be a string".into())),
    };
    let chat = state.service.rename(&principal, id, &title).await?;
    Ok(Json(json!({
        "chat_id": chat.id,
        "title": chat.title,
        "created_at": rfc3339_millis::format(&chat.created_at),
        "updated_at": rfc3339_millis::format(&chat.updated_at),
        "message_count": chat.message_count,
    })))
}

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
