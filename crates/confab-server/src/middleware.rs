//! Request-scoped plumbing: correlation ids, the per-request span and log
//! line, HTTP metrics, authentication + rate limiting for protected routes,
//! and turning any non-JSON error response into SPEC's JSON shape.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::header::{CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use confab_core::Principal;
use confab_core::admission::Admitted;
use confab_core::model::rfc3339_millis;
use confab_core::ratelimit::{Decision, Limit, RateTake, Taken};
use confab_core::turn::TurnInput;
use tracing::Instrument;
use tracing::field::Empty;
use uuid::Uuid;

use crate::error::{ApiError, error_body};
use crate::metrics::{HttpLabels, RateLimitLabels, RouteLabels, UNMATCHED_ROUTE};
use crate::state::AppState;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const RL_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const RL_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const RL_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// The request's correlation id, available to handlers as an extension.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// A client's `X-Request-ID` is kept if it is 1–128 visible ASCII characters;
/// anything else is replaced by a fresh UUID v4.
pub fn request_id_from(headers: &HeaderMap) -> String {
    headers
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| (1..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| Uuid::new_v4().to_string())
}

/// Bounded label values for the method.
pub(crate) fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// Status recorded for a request whose client went away before the response
/// (nginx's convention; never sent on the wire).
const CLIENT_CLOSED: u16 = 499;

/// Outermost layer: request id, span, metrics, and the one log line per
/// finished request (SPEC §7). For streams "finished" means the response head
/// was sent; the stream logs its own outcome when it ends.
pub async fn observe(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let request_id = request_id_from(req.headers());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| UNMATCHED_ROUTE.to_owned());
    let user_agent = req
        .headers()
        .get(USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let user_agent = crate::telemetry::bounded(user_agent);
    let span =
        tracing::info_span!("request", requestId = %request_id, orgId = Empty, userId = Empty);
    let in_flight = InFlight::start(&state, &req, route, user_agent, span.clone());
    req.extensions_mut().insert(RequestId(request_id.clone()));

    let mut response = next.run(req).instrument(span).await;
    in_flight.finish(response.status().as_u16());
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        headers.insert(REQUEST_ID, value);
    }
    // On every response (errors, CORS preflights and streams included): a
    // browser must never guess that a JSON body or an error text is HTML
    // or script.
    headers.insert(
        axum::http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// One request being served: counted in `http_requests_in_progress` until it
/// is finished — or dropped, when the client disconnects before the response
/// (then recorded with status 499), so neither the gauge nor the log line is
/// ever lost.
struct InFlight {
    metrics: Arc<crate::metrics::Metrics>,
    method: &'static str,
    route: String,
    url: String,
    user_agent: String,
    span: tracing::Span,
    started: Instant,
    done: bool,
}

impl InFlight {
    fn start(
        state: &AppState,
        req: &Request,
        route: String,
        user_agent: String,
        span: tracing::Span,
    ) -> Self {
        let method = method_label(req.method());
        state
            .metrics
            .http_in_progress
            .get_or_create(&RouteLabels {
                method: method.to_owned(),
                route: route.clone(),
            })
            .inc();
        Self {
            metrics: state.metrics.clone(),
            method,
            route,
            url: crate::telemetry::bounded(&req.uri().to_string()),
            user_agent,
            span,
            started: Instant::now(),
            done: false,
        }
    }

    fn finish(mut self, status: u16) {
        self.done = true;
        self.record(status);
    }

    fn record(&self, status: u16) {
        let duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        let method = self.method.to_owned();
        self.metrics
            .http_in_progress
            .get_or_create(&RouteLabels {
                method: method.clone(),
                route: self.route.clone(),
            })
            .dec();
        let labels = HttpLabels {
            method,
            route: self.route.clone(),
            status_code: status.to_string(),
        };
        self.metrics.http_requests.get_or_create(&labels).inc();
        self.metrics
            .http_duration
            .get_or_create(&labels)
            .observe(duration_ms);
        self.span.in_scope(|| {
            let duration = (duration_ms * 1000.0).round() / 1000.0;
            let outcome = if status == CLIENT_CLOSED {
                "request abandoned by the client"
            } else {
                "request completed"
            };
            tracing::info!(
                method = self.method,
                url = self.url,
                route = self.route,
                status,
                duration,
                userAgent = self.user_agent,
                "{outcome}"
            );
        });
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.done {
            self.record(CLIENT_CLOSED);
        }
    }
}

/// Errors the framework produces (unknown route, wrong method, bad body) come
/// as plain text or empty bodies; give them SPEC's JSON shape.
pub fn json_errors(method: &Method, path: &str, response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return response;
    }
    let message = match status {
        StatusCode::NOT_FOUND => format!("Cannot {method} {path}"),
        StatusCode::METHOD_NOT_ALLOWED => format!("Method {method} is not allowed on {path}"),
        StatusCode::PAYLOAD_TOO_LARGE => "Request body is too large".to_owned(),
        _ => status
            .canonical_reason()
            .unwrap_or("Request failed")
            .to_owned(),
    };
    let (mut parts, _) = response.into_parts();
    let mut fresh = error_body(status, &message);
    // Keep headers such as Allow, Retry-After and CORS; replace the body's type.
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    for (name, value) in fresh.headers().iter() {
        parts.headers.insert(name.clone(), value.clone());
    }
    *fresh.headers_mut() = parts.headers;
    fresh
}

/// Reads the request body within `HTTP_BODY_TIMEOUT_MS` of the end of its
/// head, and at most the path's body limit of it, before the route runs. A body
/// that does not arrive in time (sent slowly, or declared and never sent) is
/// answered 408 and a body that cannot be read 400, both with
/// `Connection: close`; a body larger than the limit 413 (each the `Err`).
/// The route then reads the body from memory.
pub async fn read_body(state: &AppState, req: Request) -> Result<Request, Response> {
    use axum::body::{Body, HttpBody};
    use http_body_util::{BodyExt, LengthLimitError, Limited};

    let (parts, body) = req.into_parts();
    if body.is_end_stream() {
        return Ok(Request::from_parts(parts, body));
    }
    let limited = Limited::new(body, state.config.body_limit(parts.uri.path()));
    let refused =
        match tokio::time::timeout(state.config.http_body_timeout, limited.collect()).await {
            Ok(Ok(collected)) => {
                let body = Body::from(collected.to_bytes());
                return Ok(Request::from_parts(parts, body));
            }
            Ok(Err(err)) if err.downcast_ref::<LengthLimitError>().is_some() => {
                return Err(error_body(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "Request body is too large",
                ));
            }
            Ok(Err(err)) => {
                tracing::info!(error = %err, "request body could not be read");
                error_body(
                    StatusCode::BAD_REQUEST,
                    "The request body could not be read",
                )
            }
            Err(_) => {
                tracing::info!(
                    timeout_ms = state.config.http_body_timeout.as_millis() as u64,
                    "request body not received within HTTP_BODY_TIMEOUT_MS"
                );
                error_body(
                    StatusCode::REQUEST_TIMEOUT,
                    "The request body was not received in time",
                )
            }
        };
    let mut response = refused;
    response.headers_mut().insert(
        axum::http::header::CONNECTION,
        HeaderValue::from_static("close"),
    );
    Err(response)
}

/// The authenticated caller, for handlers behind [`require_auth`].
pub struct Auth(pub Principal);

impl<S: Send + Sync> FromRequestParts<S> for Auth {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .map(Auth)
            .ok_or_else(|| ApiError::Internal("route is missing the auth layer".into()))
    }
}

/// The request's rate-limit token when [`require_auth`] left it to the turn
/// engine (a turn of a caller with a token budget).
#[derive(Clone)]
struct DeferredRate(Arc<RateTake>);

/// A turn's admission place, taken by the edge once the body was read
/// (`routes::hold_place`). An extension must be `Clone`; the place
/// is taken out once, by [`TurnTicket`].
#[derive(Clone)]
pub struct HeldPlace(Arc<std::sync::Mutex<Option<Admitted>>>);

impl HeldPlace {
    pub fn new(place: Admitted) -> Self {
        HeldPlace(Arc::new(std::sync::Mutex::new(Some(place))))
    }

    fn take(&self) -> Option<Admitted> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }
}

/// What the edge prepared for a turn, for the route to hand on in its
/// `TurnInput` ([`TurnTicket::hand_on`]): its admission place and, under a
/// token budget, its rate-limit token.
pub struct TurnTicket {
    rate: Option<Arc<RateTake>>,
    place: Option<Admitted>,
}

impl TurnTicket {
    pub fn hand_on(self, input: &mut TurnInput) {
        input.rate = self.rate;
        input.place = self.place;
    }
}

impl<S: Send + Sync> FromRequestParts<S> for TurnTicket {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(TurnTicket {
            rate: parts
                .extensions
                .get::<DeferredRate>()
                .map(|deferred| deferred.0.clone()),
            place: parts
                .extensions
                .get::<HeldPlace>()
                .and_then(HeldPlace::take),
        })
    }
}

/// Credentials are optional (`/`, `/health`), but when sent they are checked
/// like anywhere else. Takes no rate-limit token.
pub struct MaybeAuth(pub Option<Principal>);

impl FromRequestParts<AppState> for MaybeAuth {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let principal = state
            .auth
            .authenticate(&parts.headers, client_ip(&parts.extensions))
            .await?;
        if let Some(p) = &principal {
            record_principal(p);
        }
        Ok(MaybeAuth(principal))
    }
}

/// The peer's address (absent when the router is driven without a socket).
fn client_ip(extensions: &axum::http::Extensions) -> Option<std::net::IpAddr> {
    extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip())
}

fn record_principal(p: &Principal) {
    let span = tracing::Span::current();
    span.record("orgId", tracing::field::display(p.org_id));
    span.record("userId", tracing::field::display(p.user_id));
}

/// The limit that applies to a principal's org.
pub fn limit_for(state: &AppState, p: &Principal) -> Limit {
    p.rate_limit
        .map(|o| Limit {
            burst: o.burst,
            per_second: o.per_second,
        })
        .unwrap_or(state.config.rate_limit)
}

pub fn rate_limit_key(p: &Principal) -> String {
    format!("org:{}", p.org_id)
}

/// Protected routes: authenticate, take one rate-limit token for the org,
/// and put the rate-limit headers on whatever the route answers.
///
/// A turn of a caller with a token budget leaves its token to the turn
/// engine, which takes it in the same backend call as the reservation (one
/// Redis round trip before the model is called instead of two); a route that
/// answers without the engine taking it (a bad body, say) has it taken here
/// after all, and a refusal replaces that answer. Every such request still
/// takes exactly one token.
pub async fn require_auth(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let client = client_ip(req.extensions());
    // Boxed: what authenticating needs (≈ 2.2 KB: the cache, the key
    // lookup) is not kept in this future while the route runs.
    let principal = match Box::pin(state.auth.authenticate(req.headers(), client)).await {
        Ok(Some(p)) => p,
        Ok(None) => {
            state
                .metrics
                .auth_failures
                .get_or_create(&crate::metrics::ReasonLabels { reason: "missing" })
                .inc();
            return ApiError::Unauthorized(state.auth.missing_message().into()).into_response();
        }
        Err(err) => return err.into_response(),
    };
    record_principal(&principal);

    let rate = Arc::new(RateTake::new(
        state.limiter.clone(),
        rate_limit_key(&principal),
        limit_for(&state, &principal),
        state.config.rate_limit_fail_open,
    ));
    let deferred = crate::routes::is_turn(&req) && confab_core::turn::reserves_tokens(&principal);
    req.extensions_mut().insert(principal);
    if !deferred {
        let decision = match judge(&state, &rate, rate.take().await) {
            Ok(decision) => decision,
            Err(refusal) => return refusal.into_response(),
        };
        let mut response = next.run(req).await;
        if let Some(decision) = decision {
            set_rate_limit_headers(response.headers_mut(), &decision);
        }
        return response;
    }
    req.extensions_mut().insert(DeferredRate(rate.clone()));
    let mut response = next.run(req).await;
    match judge(&state, &rate, rate.take().await) {
        Ok(Some(decision)) => set_rate_limit_headers(response.headers_mut(), &decision),
        Ok(None) => {}
        // The engine's refusal is this very answer; a token taken only now
        // refuses what the route answered without it.
        Err(refusal) => response = refusal.into_response(),
    }
    response
}

/// Report a take (its metrics and log line) and judge it: `Ok(Some)` when a
/// token was taken, `Ok(None)` when the limiter is down and we fail open,
/// `Err` for 429 or (failing closed) 503. Once per request.
fn judge(state: &AppState, rate: &RateTake, taken: &Taken) -> Result<Option<Decision>, ApiError> {
    state
        .metrics
        .ratelimit_duration
        .observe(taken.elapsed.as_secs_f64() * 1000.0);
    let outcome = |outcome: &'static str| {
        state
            .metrics
            .ratelimit_decisions
            .get_or_create(&RateLimitLabels {
                backend: rate.backend(),
                outcome,
            })
            .inc();
    };
    match &taken.result {
        Ok(decision) if decision.allowed => {
            outcome("allowed");
            Ok(Some(*decision))
        }
        Ok(decision) => {
            outcome("limited");
            tracing::info!(remaining = decision.remaining, "rate limit exceeded");
            Err(ApiError::RateLimited(*decision))
        }
        Err(err) => {
            outcome("error");
            if rate.fail_open {
                tracing::warn!(error = %err, policy = "fail-open", "rate limiter unavailable; request allowed");
                Ok(None)
            } else {
                tracing::error!(error = %err, policy = "fail-closed", "rate limiter unavailable; request refused");
                // ApiError::Unavailable carries Retry-After itself.
                Err(ApiError::from(
                    confab_core::service::ServiceError::RateLimitUnavailable,
                ))
            }
        }
    }
}

fn reset_at(decision: &Decision) -> String {
    let reset = Utc::now()
        + chrono::Duration::from_std(decision.reset_after).unwrap_or(chrono::Duration::zero());
    rfc3339_millis::format(&reset)
}

pub fn set_rate_limit_headers(headers: &mut HeaderMap, decision: &Decision) {
    headers.insert(RL_LIMIT, HeaderValue::from(decision.limit));
    headers.insert(RL_REMAINING, HeaderValue::from(decision.remaining));
    if let Ok(v) = HeaderValue::from_str(&reset_at(decision)) {
        headers.insert(RL_RESET, v);
    }
}

/// The SPEC §4 429 ([`ApiError::RateLimited`]): `Retry-After` is the whole
/// seconds until one token is available, rounded up, at least 1.
pub(crate) fn too_many_requests(decision: &Decision) -> Response {
    let retry_secs = decision
        .retry_after
        .map(|d| d.as_secs_f64().ceil() as u64)
        .unwrap_or(1)
        .max(1);
    let reset = reset_at(decision);
    let body = crate::wire::LimitErrorJson {
        error: "Too Many Requests",
        message: "Rate limit exceeded. Please try again later.",
        limit: decision.limit.into(),
        remaining: 0,
        reset_at: reset,
    };
    let mut response = (StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response();
    set_rate_limit_headers(response.headers_mut(), decision);
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(retry_secs));
    response
}
