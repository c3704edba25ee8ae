//! `POST /chat/stream` (SPEC §6): validation and errors exactly as `POST
//! /chat` (ordinary JSON responses before the first byte), then SSE.
//!
//! The response head is held until the turn's first event, or until the
//! first keep-alive is due: a model that is refused at once (overloaded
//! after its retries, a bad key, a timeout) is then an ordinary HTTP error
//! with its status (SPEC §11), while a slow model gets keep-alives.

use axum::body::Body;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderValue;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::Response;
use confab_core::turn::{Started, TurnEvent};

use crate::error::{ApiError, set_token_limit_headers};
use crate::middleware::{Auth, TurnTicket};
use crate::routes::chats::parse_turn_request;
use crate::sse::{EventBody, Pacing};
use crate::state::AppState;

/// Send a message and receive the reply as Server-Sent Events (SPEC §6).
/// Errors found before the first byte are ordinary JSON responses.
#[utoipa::path(
    post, path = "/chat/stream", tag = "chats", operation_id = "postChatStream",
    request_body = crate::wire::TurnRequestBody,
    responses((status = 200, description = "One event per token (`id:` 1, 2, …), then the `done` event, \
        or an error event if the reply fails after its first byte; `: ping` comments keep an idle stream open",
        content_type = "text/event-stream", body = crate::wire::ChatStreamEvent,
        headers(("X-Chat-Id" = uuid::Uuid, description = "The chat"), ("X-Message-Id" = uuid::Uuid, description = "The assistant message")))),
)]
pub async fn post_chat_stream(
    State(state): State<AppState>,
    Auth(principal): Auth,
    ticket: TurnTicket,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let received = tokio::time::Instant::now();
    let req = parse_turn_request(body, state.config.max_body_bytes)?;
    // Idempotency-Key is a `POST /chat` feature; a stream ignores it.
    let mut input = req.into_input(None, true, received);
    ticket.hand_on(&mut input);
    let Started::Turn(mut turn) = state.engine.start(&principal, input, None).await? else {
        return Err(ApiError::Internal(
            "a stream turn was answered as a replay".into(),
        ));
    };
    let pacing = Pacing::of(&state);
    let first = match tokio::time::timeout(pacing.keepalive, turn.events.recv()).await {
        Ok(Some(TurnEvent::Failed(failure))) => {
            return Err(ApiError::from_turn_failure(&turn.model, *failure));
        }
        Ok(Some(event)) => Some(event),
        Ok(None) => {
            return Err(ApiError::Internal(
                "the turn ended without a final event".into(),
            ));
        }
        Err(_) => None,
    };
    let (chat_id, message_id, budget) = (turn.chat_id, turn.message_id, turn.budget);
    let mut response = Response::new(Body::from_stream(EventBody::new(turn, first, pacing)));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Some(Ok(v)) = chat_id.map(|id| HeaderValue::from_str(&id.to_string())) {
        headers.insert("x-chat-id", v);
    }
    if let Ok(v) = HeaderValue::from_str(&message_id.to_string()) {
        headers.insert("x-message-id", v);
    }
    if let Some(budget) = &budget {
        set_token_limit_headers(headers, budget);
    }
    Ok(response)
}
