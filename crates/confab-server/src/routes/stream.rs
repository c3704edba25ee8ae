//! `POST /chat/stream` (SPEC §6): validation and errors exactly as `POST
//! /chat` (ordinary JSON responses before the first byte), then SSE.

use std::time::Instant;

use axum::body::Body;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderValue;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::Response;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::error::ApiError;
use crate::middleware::Auth;
use crate::routes::chats::parse_turn_request;
use crate::sse::{self, BatchedFrames};
use crate::state::AppState;
use crate::streaming::{CHANNEL_CAPACITY, StreamJob, generate};
use confab_core::service::TurnStart;

pub async fn post_chat_stream(
    State(state): State<AppState>,
    Auth(principal): Auth,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let req = parse_turn_request(body, state.config.max_body_bytes)?;

    // The turn is begun inside the tracked task that then streams it: if the
    // client goes away while the user message is being stored, the task still
    // owns the turn and settles it (`cancelled`, as the receiver is gone).
    let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
    let (ready_tx, ready_rx) = oneshot::channel();
    let task_state = state.clone();
    let task = async move {
        let begun = match task_state
            .service
            .begin_turn(&principal, &req.text, req.chat_id, None)
            .await
        {
            Ok(TurnStart::Begun(begun)) => begun,
            Ok(TurnStart::Replay(_)) => {
                let _ = ready_tx.send(Err(ApiError::Internal(
                    "stream turn answered as a replay without a key".into(),
                )));
                return;
            }
            Err(err) => {
                let _ = ready_tx.send(Err(err.into()));
                return;
            }
        };
        let _ = ready_tx.send(Ok((begun.chat_id, begun.assistant_message.id)));
        generate(StreamJob {
            state: task_state,
            principal,
            begun,
            tx,
            started,
        })
        .await;
    };
    state.tasks.spawn(task.instrument(tracing::Span::current()));
    let (chat_id, message_id) = ready_rx
        .await
        .map_err(|_| ApiError::Internal("stream task ended before it began".into()))??;

    // A comment first, so headers and the first bytes reach the client (and
    // any proxy) before the first token.
    let opening = futures::stream::once(async { Ok(sse::ping_frame()) });
    let body = Body::from_stream(opening.chain(BatchedFrames::new(rx)));
    let mut response = Response::new(body);
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
