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
        .route(
            "/playground",
            get(|| async {
                (
                    [(header::CONTENT_SECURITY_POLICY, PLAYGROUND_CSP)],
                    asset("text/html; charset=utf-8", HTML),
                )
            }),
        )
        .route(
            "/playground/playground.js",
            get(|| async { asset("text/javascript; charset=utf-8", JS) }),
        )
        .route(
            "/playground/playground.css",
            get(|| async { asset("text/css; charset=utf-8", CSS) }),
        )
        .route(
            "/playground/sse.js",
            get(|| async { asset("text/javascript; charset=utf-8", SSE_JS) }),
        )
}
