//! The HTTP surface: which path goes to which handler, and the layers.

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, Method, header};
use axum::middleware::{from_fn, from_fn_with_state};
use axum::routing::{get, post};
use tower_http::cors::{Any, CorsLayer};

use crate::error::ApiError;
use crate::middleware::{json_errors, observe, require_auth};
use crate::state::AppState;

pub mod chats;
pub mod models;
pub mod playground;
pub mod stream;
pub mod system;

pub fn router(state: AppState) -> Router {
    let protected = Router::new()
        .route("/chat", post(chats::post_chat))
        .route("/chat/stream", post(stream::post_chat_stream))
        .route(
            "/chat/{id}",
            get(chats::get_chat)
                .patch(chats::rename_chat)
                .delete(chats::delete_chat),
        )
        .route("/chats", get(chats::list_chats))
        .route("/models", get(models::list_models))
        .route_layer(from_fn_with_state(state.clone(), require_auth));

    let public = Router::new()
        .route("/", get(system::root))
        .route("/health", get(system::health))
        .route("/metrics", get(system::metrics))
        .route("/livez", get(system::livez))
        .route("/readyz", get(system::readyz))
        .merge(playground::routes());

    Router::new()
        .merge(public)
        .merge(protected)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(from_fn(json_errors))
        .layer(cors())
        .layer(from_fn_with_state(state.clone(), observe))
        .with_state(state)
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
        ])
        .expose_headers([
            HeaderName::from_static("x-request-id"),
            HeaderName::from_static("x-ratelimit-limit"),
            HeaderName::from_static("x-ratelimit-remaining"),
            HeaderName::from_static("x-ratelimit-reset"),
            header::RETRY_AFTER,
            HeaderName::from_static("x-chat-id"),
            HeaderName::from_static("x-message-id"),
        ])
        .max_age(std::time::Duration::from_secs(600))
}
