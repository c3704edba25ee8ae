//! A small, fast OpenAI-compatible upstream for the gateway scenario: every
//! `POST /v1/chat/completions` is answered with the same `tokens` tokens,
//! one every `delay` (the first after one `delay`), as Chat Completions
//! chunks ending with a usage chunk (when asked for) and `data: [DONE]`.
//! `GET /v1/models` lists the one model (LiteLLM asks at start-up).
//!
//! It does as little as possible per token — one pre-formatted frame and one
//! timer — so that in the gateway comparison the upstream's own cost is the
//! same small constant under every gateway.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::time::Instant;

/// The text of token `i` (words, so every tokenizer sees `tokens` tokens).
pub fn token(i: usize) -> String {
    format!("tok{i} ")
}

/// The whole reply: what a client must receive, token after token.
pub fn reply_text(tokens: usize) -> String {
    (0..tokens).map(token).collect()
}

struct Upstream {
    delay: Duration,
    /// `data: {chunk}\n\n` of each token, formatted once.
    frames: Vec<Bytes>,
    head: Bytes,
    tail: Bytes,
    usage: Bytes,
    reply: String,
    tokens: usize,
}

fn frame(chunk: &Value) -> Bytes {
    Bytes::from(format!("data: {chunk}\n\n"))
}

fn chunk(choices: Value) -> Value {
    json!({
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "bench-upstream",
        "choices": choices,
    })
}

pub async fn serve(port: u16, tokens: usize, delay: Duration) -> anyhow::Result<()> {
    let state = Arc::new(Upstream {
        delay,
        frames: (0..tokens)
            .map(|i| {
                frame(&chunk(json!([{
                    "index": 0,
                    "delta": { "content": token(i) },
                    "finish_reason": null,
                }])))
            })
            .collect(),
        head: frame(&chunk(json!([{
            "index": 0,
            "delta": { "role": "assistant", "content": "" },
            "finish_reason": null,
        }]))),
        tail: frame(&chunk(json!([{
            "index": 0,
            "delta": {},
            "finish_reason": "stop",
        }]))),
        usage: {
            let mut usage = chunk(json!([]));
            usage["usage"] = json!({
                "prompt_tokens": 16,
                "completion_tokens": tokens,
                "total_tokens": 16 + tokens,
            });
            frame(&usage)
        },
        reply: reply_text(tokens),
        tokens,
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .route("/v1/models", get(models))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    eprintln!("bench upstream on 127.0.0.1:{port}: {tokens} tokens, one every {delay:?}");
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

async fn models() -> impl IntoResponse {
    axum::Json(json!({
        "object": "list",
        "data": [{ "id": "bench-upstream", "object": "model", "created": 0, "owned_by": "bench" }],
    }))
}

async fn completions(State(up): State<Arc<Upstream>>, body: Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "body is not JSON").into_response();
    };
    let stream = request["stream"].as_bool() == Some(true);
    if !stream {
        tokio::time::sleep(up.delay * u32::try_from(up.tokens).unwrap_or(u32::MAX)).await;
        return axum::Json(json!({
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 0,
            "model": "bench-upstream",
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": up.reply },
                "finish_reason": "stop",
            }],
            "usage": { "prompt_tokens": 16, "completion_tokens": up.tokens, "total_tokens": 16 + up.tokens },
        }))
        .into_response();
    }
    let include_usage = request["stream_options"]["include_usage"].as_bool() == Some(true);
    let started = Instant::now();
    // Step 0: the role chunk at once; 1..=tokens: the tokens on schedule;
    // then the finish chunk, the usage chunk and [DONE].
    let frames = futures::stream::unfold(0usize, move |step| {
        let up = up.clone();
        async move {
            let n = up.tokens;
            let bytes = match step {
                0 => up.head.clone(),
                s if s <= n => {
                    tokio::time::sleep_until(started + up.delay * u32::try_from(s).unwrap_or(0))
                        .await;
                    up.frames[s - 1].clone()
                }
                s if s == n + 1 => up.tail.clone(),
                s if s == n + 2 && include_usage => up.usage.clone(),
                s if s == n + 2 || s == n + 3 && include_usage => {
                    Bytes::from_static(b"data: [DONE]\n\n")
                }
                _ => return None,
            };
            Some((Ok::<_, Infallible>(bytes), step + 1))
        }
    });
    let mut response = Response::new(Body::from_stream(frames));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
