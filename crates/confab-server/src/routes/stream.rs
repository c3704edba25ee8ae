//! `POST /chat/stream` (SPEC §6): validation and errors exactly as `POST
//! /chat` (ordinary JSON responses before the first byte), then SSE.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderValue;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use crate::error::ApiError;
use crate::middleware::Auth;
use crate::routes::chats::parse_turn_request;
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
    let TurnStart::Begun(begun) = state
        .service
        .begin_turn(&principal, &req.text, req.chat_id, None)
        .await?
    else {
        return Err(ApiError::Internal(
            "stream turn answered as a replay without a key".into(),
        ));
    };
    let chat_id = begun.chat_id;
    let message_id = begun.assistant_message.id;

    let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
    let job = StreamJob {
        state: state.clone(),
        principal,
        begun,
        tx: tx.clone(),
        started,
    };
    state
        .tasks
        .spawn(generate(job).instrument(tracing::Span::current()));

    // A comment first, so headers and the first bytes reach the client (and
    // any proxy) before the first token; then keep-alives while idle.
    let opening = futures::stream::once(async { Ok(Event::default().comment("ping")) });
    drop(tx);
    let events = opening.chain(ReceiverStream::new(rx));
    let sse = Sse::new(events).keep_alive(
        KeepAlive::new()
            .interval(state.config.sse_keepalive)
            .text("ping"),
    );
    let mut response = sse.into_response();
    let headers = response.headers_mut();
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    headers.insert(
        axum::http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    if let Ok(v) = HeaderValue::from_str(&chat_id.to_string()) {
        headers.insert("x-chat-id", v);
    }
    if let Ok(v) = HeaderValue::from_str(&message_id.to_string()) {
        headers.insert("x-message-id", v);
    }
    Ok(response)
}
