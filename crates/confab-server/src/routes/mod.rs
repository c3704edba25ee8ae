//! The HTTP surface: which path goes to which handler, and the layers.

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, Method, header};
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use tower_http::cors::{Any, CorsLayer};

use crate::error::ApiError;
use crate::middleware::{json_errors, observe, read_body, require_auth};
use crate::state::AppState;

pub mod chats;
pub mod models;
pub mod openai;
pub mod playground;
pub mod resume;
pub mod stream;
pub mod system;
pub mod usage;

/// The routes that run a turn on the engine (`POST`). While the server has
/// no room for another turn, [`edge`] refuses them before anything else is
/// done with them (README "Overload"); for a caller with a token budget,
/// their rate-limit token is taken by the engine, with the reservation
/// ([`crate::middleware::require_auth`]).
const CHAT: &str = "/chat";
const CHAT_STREAM: &str = "/chat/stream";
const COMPLETIONS: &str = "/v1/chat/completions";
const TURN_ROUTES: [&str; 3] = [CHAT, CHAT_STREAM, COMPLETIONS];

pub fn router(state: AppState) -> Router {
    let turns = Router::new()
        .route(CHAT, post(chats::post_chat))
        .route(CHAT_STREAM, post(stream::post_chat_stream))
        .route_layer(from_fn_with_state(state.clone(), require_auth));

    let protected = Router::new()
        .route(
            "/chat/{id}",
            get(chats::get_chat)
                .patch(chats::rename_chat)
                .delete(chats::delete_chat),
        )
        .route(
            "/chat/{chat_id}/messages/{message_id}/stream",
            get(resume::get_message_stream),
        )
        .route(
            "/chat/{chat_id}/messages/{message_id}/cancel",
            post(resume::cancel_message),
        )
        .route("/chats", get(chats::list_chats))
        .route("/models", get(models::list_models))
        .route("/usage", get(usage::get_usage))
        .route_layer(from_fn_with_state(state.clone(), require_auth));

    // The OpenAI-compatible API: the same authentication and limits, its
    // own body limit, every error in OpenAI's shape (also a 404 under /v1).
    let v1 = Router::new()
        .route("/v1/models", get(openai::list_models))
        .route("/v1/models/{model}", get(openai::get_model))
        .route(COMPLETIONS, post(openai::chat_completions))
        .route_layer(from_fn_with_state(state.clone(), require_auth))
        .route_layer(DefaultBodyLimit::max(state.config.openai_max_body_bytes));

    let public = Router::new()
        .route("/", get(system::root))
        .route("/health", get(system::health))
        .route("/metrics", get(system::metrics))
        .route("/livez", get(system::livez))
        .route("/readyz", get(system::readyz))
        .route("/openapi.json", get(crate::openapi::serve))
        .merge(playground::routes());

    Router::new()
        .merge(public)
        .merge(turns)
        .merge(protected)
        .merge(v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(from_fn_with_state(state.clone(), edge))
        .layer(cors())
        .layer(from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// What every request passes on its way in and its answer on its way out,
/// between CORS and the routes. One layer rather than one per rule: each
/// `from_fn` layer boxes a future (≈ 1–1.5 KB) that a request holds until
/// its response head, and in a burst of 5,000 streams five of them were
/// ≈ 26 MB of the peak (BENCHMARKS.md, "Memory: what a stream holds"). In order:
///
/// 1. a declared body over the path's limit is refused ([`oversized`]);
/// 2. a turn the server has no room for is refused ([`at_capacity`]);
/// 3. the body is read within its deadline ([`read_body`]); a turn then
///    takes its place ([`hold_place`]) and the route runs (authentication
///    and the rate limit first, on the routes behind them);
/// 4. the framework's own errors get SPEC's JSON shape ([`json_errors`]);
/// 5. under `/v1/`, every error then gets OpenAI's
///    ([`openai::openai_errors`]).
async fn edge(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let response = if let Some(refused) = oversized(&state, &req) {
        refused
    } else if let Some(refused) = at_capacity(&state, &req) {
        refused
    } else {
        answer_even_if_panicking(async {
            let mut req = match read_body(&state, req).await {
                Ok(req) => req,
                Err(refused) => return refused,
            };
            match hold_place(&state, &mut req) {
                Some(refused) => refused,
                None => next.run(req).await,
            }
        })
        .await
    };
    let response = json_errors(&method, &path, response);
    if path.starts_with("/v1/") {
        openai::openai_errors(response).await
    } else {
        response
    }
}

/// The route's answer, or a plain 500 if it panicked. A panic is a bug, but
/// without this the connection task would die with it: the client would get
/// no answer at all (its SDK retries a dropped connection), the request would
/// be logged as abandoned by the client (499). Here it is one `internal
/// error` log line with the request id, a 500 in the HTTP metrics, and SPEC's
/// JSON error (OpenAI's under `/v1/`). Where it panicked is logged by the
/// process's panic hook ([`crate::telemetry::install_panic_hook`]), with
/// the request id and without a formatted message's data.
/// A turn's own task is not covered by this: its panic is settled by the
/// turn engine (the reply stored `failed`).
async fn answer_even_if_panicking(
    route: impl std::future::Future<Output = axum::response::Response>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(route).catch_unwind().await {
        Ok(response) => response,
        Err(_) => ApiError::Internal("the request's handler panicked".into()).into_response(),
    }
}

/// A declared `Content-Length` above `MAX_BODY_BYTES` is refused from the
/// header alone, before authentication and before any byte of the body is
/// read (`DefaultBodyLimit` only stops reading once the limit is passed, so
/// a client announcing 10 MB and sending nothing held the request open).
fn oversized(state: &AppState, req: &axum::extract::Request) -> Option<axum::response::Response> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let limit = state.config.body_limit(req.uri().path());
    if declared.is_none_or(|n| n <= limit as u64) {
        return None;
    }
    let mut response = crate::error::error_body(
        axum::http::StatusCode::PAYLOAD_TOO_LARGE,
        "Request body is too large",
    );
    // The body is left unread: the connection cannot carry another
    // request, and the client must not reuse it.
    response.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    Some(response)
}

/// A turn while the server is at capacity: refused from the head alone —
/// before its credentials are checked or a rate-limit token is taken (a
/// client is not charged for the server's overload, and in a burst the
/// refusals do not queue behind the limiter: 5,000 streams at once gave
/// refusals a p99 of ≈ 0.8 s when they did), and before its body is read:
/// a refusal never waits for a body (one that never came held it for
/// `HTTP_BODY_TIMEOUT_MS`, then got 408; one in a later packet held it
/// for another read of the connection).
fn at_capacity(state: &AppState, req: &axum::extract::Request) -> Option<axum::response::Response> {
    use axum::response::IntoResponse;
    let route = turn_route(req)?;
    // A guess, before the body is parsed: every route but `/chat` streams,
    // or may (`/v1` decides by its body). No metric splits by it today.
    let refused = state.engine.refuse_if_full(route != CHAT).err()?;
    Some(ApiError::from(refused).into_response())
}

/// A turn takes its admission place as soon as its body is read, before
/// its credentials, its rate-limit token and its route, and hands it to the
/// engine ([`crate::middleware::TurnTicket`]). [`at_capacity`] only looked,
/// from the head: a turn let in by that look could otherwise be refused
/// after all that work, as the last places went to turns ahead of it. When
/// capacity filled in a ramp of 10,000 streams, the requests in that window
/// were refused up to 113 ms after they arrived, against 0.1 ms for the rest
/// (BENCHMARKS.md, "a seventh machine"). Now each is either refused here at
/// once or keeps the place it was let in for. A place is freed when the
/// request is answered without a turn (a bad key, a 429, a 400).
fn hold_place(
    state: &AppState,
    req: &mut axum::extract::Request,
) -> Option<axum::response::Response> {
    use axum::response::IntoResponse;
    let route = turn_route(req)?;
    match state.engine.admit(route != CHAT) {
        Ok(place) => {
            req.extensions_mut()
                .insert(crate::middleware::HeldPlace::new(place));
            None
        }
        Err(refused) => Some(ApiError::from(refused).into_response()),
    }
}

/// The turn route `req` is a `POST` to, if it is one.
fn turn_route(req: &axum::extract::Request) -> Option<&str> {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()?
        .as_str();
    (req.method() == Method::POST && TURN_ROUTES.contains(&route)).then_some(route)
}

/// Whether `req` runs a turn (a `POST` to one of [`TURN_ROUTES`]).
pub(crate) fn is_turn(req: &axum::extract::Request) -> bool {
    turn_route(req).is_some()
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("Cannot {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("Method {method} is not allowed on {}", uri.path()))
}

/// Open CORS for the original's stand-alone page (SPEC §9).
fn cors() -> CorsLayer {
    CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            HeaderName::from_static("x-org-id"),
            HeaderName::from_static("x-user-id"),
            HeaderName::from_static("x-request-id"),
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_static(openai::CHAT_HEADER),
            HeaderName::from_static("last-event-id"),
        ])
        .expose_headers([
            HeaderName::from_static("x-request-id"),
            HeaderName::from_static("x-ratelimit-limit"),
            HeaderName::from_static("x-ratelimit-remaining"),
            HeaderName::from_static("x-ratelimit-reset"),
            HeaderName::from_static("x-tokenlimit-limit"),
            HeaderName::from_static("x-tokenlimit-remaining"),
            HeaderName::from_static("x-tokenlimit-reset"),
            header::RETRY_AFTER,
            HeaderName::from_static("x-chat-id"),
            HeaderName::from_static("x-message-id"),
            HeaderName::from_static(openai::CHAT_HEADER),
        ])
        .max_age(std::time::Duration::from_secs(600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_route_answers_a_plain_500() {
        let panicking = async {
            if std::hint::black_box(true) {
                std::panic::resume_unwind(Box::new("not a number"));
            }
            axum::response::IntoResponse::into_response("unreachable")
        };
        let response = answer_even_if_panicking(panicking).await;
        assert_eq!(
            response.status(),
            axum::http::StatusCode::INTERNAL_SERVER_ERROR
        );
        let body = axum::body::to_bytes(response.into_body(), 1 << 16).await;
        let body: serde_json::Value =
            serde_json::from_slice(&body.unwrap_or_default()).unwrap_or(serde_json::Value::Null);
        assert_eq!(body["message"], "Internal server error", "{body}");
        assert!(!body.to_string().contains("not a number"), "{body}");
    }
}
