//! One error type for the HTTP layer. Every error response — ours and the
//! framework's — is `{"error": "<HTTP reason>", "message": "<what is wrong>"}`.
//! 5xx details are logged (with the request id, from the request span) and
//! answered generically.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use confab_core::StoreError;
use confab_core::provider::ProviderError;
use confab_core::ratelimit::BudgetState;
use confab_core::service::ServiceError;
use confab_core::turn::TurnFailure;

use crate::wire::{ErrorJson, LimitErrorJson};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed; the message says how.
    #[error("{0}")]
    BadRequest(String),
    /// 401: missing or invalid credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: authenticated, but not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// 404
    #[error("{0}")]
    NotFound(String),
    /// 405
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 409: e.g. an idempotent request still in progress.
    #[error("{0}")]
    Conflict(String),
    /// 413
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 415
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422: well-formed but refused (an Idempotency-Key reused for another request).
    #[error("{0}")]
    Unprocessable(String),
    /// 429 with `Retry-After`: too many failed authentications from this address.
    #[error("{message}")]
    TooManyRequests { message: String, retry_after: u64 },
    /// 502: the model failed.
    #[error("{0}")]
    BadGateway(String),
    /// 503 with `Retry-After`: a dependency is down; retrying later may
    /// work. The message is shown to the client: plain words, no internals.
    #[error("{0}")]
    Unavailable(String),
    /// 503 with `Retry-After`: the database is unreachable or cannot write.
    /// The detail (driver text, host, error codes) goes to the log line
    /// only; the client reads [`DATABASE_UNAVAILABLE`].
    #[error("{0}")]
    StoreUnavailable(String),
    /// 503 with `Retry-After`: the model is overloaded or rate limiting us.
    #[error("{message}")]
    Overloaded { message: String, retry_after: u64 },
    /// 429: the turn's tokens do not fit in a token limit (SPEC §12).
    #[error("Token budget exceeded")]
    TokenBudget(BudgetState),
    /// 429: the org's rate limit (SPEC §4), with its headers.
    #[error("Rate limit exceeded")]
    RateLimited(confab_core::ratelimit::Decision),
    /// 504: the model did not answer in time.
    #[error("{0}")]
    GatewayTimeout(String),
    /// 500: a bug or an unexpected failure; logged, answered generically.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::Unavailable(_)
            | ApiError::StoreUnavailable(_)
            | ApiError::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::TokenBudget(_) | ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn chat_not_found() -> Self {
        ApiError::NotFound("Chat not found".into())
    }
}

/// What a client is told when the database fails; the cause is logged.
pub const DATABASE_UNAVAILABLE: &str = "Database unavailable, try again shortly";

/// `Retry-After` of a 503 that has no better estimate, in seconds.
pub const DEFAULT_RETRY_AFTER_SECS: u64 = 1;

/// `Retry-After` of a turn refused because `MAX_CONCURRENT_STREAMS` turns
/// are running: the typical turn lasts seconds, so places free up all the time.
pub const AT_CAPACITY_RETRY_AFTER_SECS: u64 = 1;

/// `{"error": reason, "message": message}` with the given status.
pub fn error_body(status: StatusCode, message: &str) -> Response {
    let reason = status.canonical_reason().unwrap_or("Error");
    let mut response = (
        status,
        axum::Json(ErrorJson {
            error: reason,
            message,
        }),
    )
        .into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status_code();
        match &self {
            ApiError::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                error_body(status, "Internal server error")
            }
            ApiError::StoreUnavailable(detail) => {
                tracing::warn!(error = %detail, status = status.as_u16(), "database failure");
                with_retry_after(
                    error_body(status, DATABASE_UNAVAILABLE),
                    DEFAULT_RETRY_AFTER_SECS,
                )
            }
            ApiError::Unavailable(message) => {
                tracing::warn!(error = %message, status = status.as_u16(), "dependency failure");
                with_retry_after(error_body(status, message), DEFAULT_RETRY_AFTER_SECS)
            }
            ApiError::BadGateway(detail) | ApiError::GatewayTimeout(detail) => {
                tracing::warn!(error = %detail, status = status.as_u16(), "dependency failure");
                error_body(status, detail)
            }
            ApiError::RateLimited(decision) => crate::middleware::too_many_requests(decision),
            ApiError::TokenBudget(budget) => {
                let body = LimitErrorJson {
                    error: "Too Many Requests",
                    message: "Token budget exceeded",
                    limit: budget.limit,
                    remaining: budget.remaining,
                    reset_at: token_limit_reset(budget),
                };
                let mut response = (status, axum::Json(body)).into_response();
                set_token_limit_headers(response.headers_mut(), budget);
                let retry = budget.reset_after.as_secs_f64().ceil().max(1.0) as u64;
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry));
                response
            }
            ApiError::Overloaded {
                message,
                retry_after,
            } => {
                tracing::warn!(error = %message, status = status.as_u16(), retry_after, "overloaded");
                with_retry_after(error_body(status, message), *retry_after)
            }
            ApiError::TooManyRequests {
                message,
                retry_after,
            } => with_retry_after(error_body(status, message), *retry_after),
            other => error_body(status, &other.to_string()),
        }
    }
}

/// Every 503 says when to come back (at least 1 s).
pub fn with_retry_after(mut response: Response, secs: u64) -> Response {
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    response
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound => ApiError::NotFound("Not found".into()),
            StoreError::Conflict { constraint } => {
                // The constraint's name is the schema's, not the client's
                // business: in the log line (with the request id) only.
                tracing::info!(constraint = %constraint, "write refused: conflicts with existing data");
                ApiError::Conflict("Conflicts with existing data".into())
            }
            StoreError::Unavailable(e) => ApiError::StoreUnavailable(e),
            StoreError::Other(e) => ApiError::Internal(format!("database: {e}")),
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(err: ServiceError) -> Self {
        match err {
            ServiceError::NotFound => ApiError::chat_not_found(),
            ServiceError::Forbidden => ApiError::Forbidden(err.to_string()),
            ServiceError::IdempotencyMismatch => ApiError::Unprocessable(err.to_string()),
            ServiceError::IdempotencyInProgress => ApiError::Conflict(err.to_string()),
            ServiceError::TokenBudgetExceeded(state) => ApiError::TokenBudget(state),
            ServiceError::RateLimited(decision) => ApiError::RateLimited(decision),
            ServiceError::RateLimitUnavailable => ApiError::Unavailable(err.to_string()),
            ServiceError::BudgetUnavailable => ApiError::Overloaded {
                message: err.to_string(),
                retry_after: 1,
            },
            // Admission control (README "Overload"): refused before any work,
            // so coming back in a second is cheap for both sides.
            ServiceError::AtCapacity => ApiError::Overloaded {
                message: err.to_string(),
                retry_after: AT_CAPACITY_RETRY_AFTER_SECS,
            },
            ServiceError::UnknownModel(_) | ServiceError::MessageTooLong(_) => {
                ApiError::BadRequest(err.to_string())
            }
            ServiceError::Store(e) => e.into(),
        }
    }
}

/// When the budget's window ends, as `X-TokenLimit-Reset` and `resetAt` say.
fn token_limit_reset(budget: &BudgetState) -> String {
    let at = chrono::Utc::now()
        + chrono::Duration::from_std(budget.reset_after).unwrap_or(chrono::Duration::zero());
    confab_core::model::rfc3339_millis::format(&at)
}

/// `X-TokenLimit-Limit`, `-Remaining`, `-Reset` (SPEC §12), on every response
/// whose turn reserved tokens (and on the refusal).
pub fn set_token_limit_headers(headers: &mut axum::http::HeaderMap, budget: &BudgetState) {
    headers.insert("x-tokenlimit-limit", HeaderValue::from(budget.limit));
    headers.insert(
        "x-tokenlimit-remaining",
        HeaderValue::from(budget.remaining),
    );
    if let Ok(v) = HeaderValue::from_str(&token_limit_reset(budget)) {
        headers.insert("x-tokenlimit-reset", v);
    }
}

impl ApiError {
    /// A turn that failed before the first byte of its response (SPEC §11):
    /// overloaded or rate limited after the retries → 503 with `Retry-After`,
    /// timed out → 504, any other upstream refusal → 502. Nothing of the
    /// upstream's body, URL or key is in the message.
    pub fn from_turn_failure(model: &str, failure: TurnFailure) -> Self {
        match failure {
            TurnFailure::Provider(err) => match &err {
                ProviderError::RateLimited { .. } | ProviderError::Overloaded { .. } => {
                    ApiError::Overloaded {
                        message: format!("Model {model} is overloaded; try again later"),
                        retry_after: err
                            .retry_after()
                            .map(|d| d.as_secs_f64().ceil() as u64)
                            .unwrap_or(1)
                            .max(1),
                    }
                }
                ProviderError::Upstream { kind }
                    if matches!(kind.as_str(), "overloaded_error" | "rate_limit_error") =>
                {
                    ApiError::Overloaded {
                        message: format!("Model {model} is overloaded; try again later"),
                        retry_after: 1,
                    }
                }
                ProviderError::Timeout(_) => {
                    ApiError::GatewayTimeout(format!("Model {model} did not answer in time"))
                }
                other => ApiError::BadGateway(format!("Model provider error: {other}")),
            },
            TurnFailure::Interrupted => ApiError::Overloaded {
                message: "The server is shutting down; try again".into(),
                retry_after: 1,
            },
            TurnFailure::Context(err) | TurnFailure::NotSaved(err) => err.into(),
            TurnFailure::Cancelled => {
                ApiError::Conflict("The reply was cancelled; the partial reply was saved".into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_conflict_does_not_name_the_schema() {
        let err: ApiError = StoreError::Conflict {
            constraint: "chats_pkey".into(),
        }
        .into();
        let response = err.into_response();
        assert_eq!(response.status(), StatusCode::CONFLICT);
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains("Conflicts with existing data"), "{body}");
        assert!(!body.contains("chats_pkey"), "{body}");
    }
}
