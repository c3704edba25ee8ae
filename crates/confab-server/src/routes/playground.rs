//! The playground page (SPEC §9), embedded in the binary: no build step, no
//! external network, served from the server's own origin.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::state::AppState;

const HTML: &str = include_str!("../../assets/playground.html");
const JS: &str = include_str!("../../assets/playground.js");
const SSE_JS: &str = include_str!("../../assets/sse.js");
const CSS: &str = include_str!("../../assets/playground.css");

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

/// The page loads only its own script and style files (no inline code, no
/// other origin), talks to its own origin, and may not be framed. Its icon
/// is a `data:` image.
pub const PLAYGROUND_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/playground", get(page))
        .route("/playground/playground.js", get(script))
        .route("/playground/playground.css", get(style))
        .route("/playground/sse.js", get(sse_script))
}

/// The playground page (SPEC §9).
#[utoipa::path(
    get, path = "/playground", tag = "playground", operation_id = "playground",
    responses((status = 200, description = "The page", content_type = "text/html; charset=utf-8", body = String)),
)]
pub async fn page() -> impl IntoResponse {
    (
        [(header::CONTENT_SECURITY_POLICY, PLAYGROUND_CSP)],
        asset("text/html; charset=utf-8", HTML),
    )
}

#[utoipa::path(
    get, path = "/playground/playground.js", tag = "playground", operation_id = "playgroundScript",
    responses((status = 200, description = "The page's script", content_type = "text/javascript; charset=utf-8", body = String)),
)]
pub async fn script() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", JS)
}

#[utoipa::path(
    get, path = "/playground/playground.css", tag = "playground", operation_id = "playgroundStyle",
    responses((status = 200, description = "The page's style", content_type = "text/css; charset=utf-8", body = String)),
)]
pub async fn style() -> impl IntoResponse {
    asset("text/css; charset=utf-8", CSS)
}

#[utoipa::path(
    get, path = "/playground/sse.js", tag = "playground", operation_id = "playgroundSse",
    responses((status = 200, description = "The page's SSE parser", content_type = "text/javascript; charset=utf-8", body = String)),
)]
pub async fn sse_script() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", SSE_JS)
}
