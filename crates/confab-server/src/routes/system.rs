//! `/`, `/health` and `/metrics`: unauthenticated, but credentials that are
//! sent are validated and echoed (SPEC §3, §7). `/livez` and `/readyz`
//! (SPEC §15): no credentials at all, for orchestrators and balancers.

use std::time::Duration;

use axum::Extension;
use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use confab_core::model::rfc3339_millis;

use crate::error::ApiError;
use crate::middleware::{MaybeAuth, RequestId, limit_for, rate_limit_key};
use crate::readiness::{database_reachable, redis_reachable};
use crate::state::AppState;
use crate::wire::{
    HealthJson, HealthServicesJson, LivezJson, RateLimitJson, ReadyzJson, RootJson, UserJson,
};

const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

fn now() -> String {
    rfc3339_millis::format(&Utc::now())
}

fn user_json(p: &confab_core::Principal) -> UserJson<'_> {
    UserJson {
        id: p.user_id,
        email: &p.email,
        role: p.role,
    }
}

/// What this service is; with credentials, who the caller is and the
/// org's rate-limit headroom (peeked: no token taken).
#[utoipa::path(
    get, path = "/", tag = "system", operation_id = "root",
    responses((status = 200, description = "About the service", body = RootJson)),
)]
pub async fn root(
    State(state): State<AppState>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    MaybeAuth(principal): MaybeAuth,
) -> Response {
    let mut rate_limit = None;
    if let Some(p) = &principal {
        // Peek: shows the headroom without taking a token.
        rate_limit = Some(
            match state
                .limiter
                .peek(&rate_limit_key(p), limit_for(&state, p))
                .await
            {
                Ok(d) => {
                    let reset = Utc::now()
                        + chrono::Duration::from_std(d.reset_after)
                            .unwrap_or(chrono::Duration::zero());
                    Some(RateLimitJson {
                        limit: d.limit.into(),
                        remaining: d.remaining.into(),
                        reset_at: rfc3339_millis::format(&reset),
                    })
                }
                Err(err) => {
                    tracing::warn!(error = %err, "rate limiter unavailable for GET /");
                    None
                }
            },
        );
    }
    Json(RootJson {
        message: "confab: multi-tenant LLM chat service. Try GET /health, or open /playground",
        timestamp: now(),
        request_id: &request_id,
        org: principal.as_ref().map(|p| p.org_id),
        user: principal.as_ref().map(user_json),
        rate_limit,
    })
    .into_response()
}

/// Whether the service and its dependencies work (SPEC §7).
#[utoipa::path(
    get, path = "/health", tag = "system", operation_id = "health",
    responses(
        (status = 200, description = "Healthy", body = HealthJson),
        (status = 503, description = "Degraded: a dependency is down", body = HealthJson,
            headers(("Retry-After" = u64, description = "Seconds"))),
    ),
)]
pub async fn health(
    State(state): State<AppState>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    MaybeAuth(principal): MaybeAuth,
) -> Response {
    let db_ok = database_reachable(state.store.as_ref(), HEALTH_TIMEOUT).await;
    let redis = if state.config.redis_url.is_none() {
        "not configured"
    } else if redis_reachable(state.limiter.as_ref(), HEALTH_TIMEOUT).await {
        "connected"
    } else {
        "disconnected"
    };
    let healthy = db_ok && redis != "disconnected";
    let body = HealthJson {
        status: if healthy { "ok" } else { "degraded" },
        env: &state.config.app_env,
        timestamp: now(),
        request_id: &request_id,
        services: HealthServicesJson {
            database: if db_ok { "connected" } else { "disconnected" },
            redis,
        },
        org: principal.as_ref().map(|p| p.org_id),
        user: principal.as_ref().map(user_json),
    };
    if !healthy {
        tracing::warn!(database = db_ok, redis, "health check degraded");
    }
    if healthy {
        return (StatusCode::OK, Json(body)).into_response();
    }
    crate::error::with_retry_after(
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response(),
        crate::error::DEFAULT_RETRY_AFTER_SECS,
    )
}

/// `GET /livez`: 200 while the process serves. Checks nothing else on
/// purpose: an orchestrator restarts a process whose liveness fails, and a
/// database outage is not cured by restarting every instance.
#[utoipa::path(
    get, path = "/livez", tag = "system", operation_id = "livez",
    responses((status = 200, description = "The process serves", body = LivezJson)),
)]
pub async fn livez() -> Json<LivezJson> {
    Json(LivezJson {
        status: "ok",
        timestamp: now(),
    })
}

/// `GET /readyz`: 200 when the database answered the last probe (at most
/// ~750 ms ago) and the instance is not draining; else 503.
#[utoipa::path(
    get, path = "/readyz", tag = "system", operation_id = "readyz",
    responses(
        (status = 200, description = "Ready for traffic", body = ReadyzJson),
        (status = 503, description = "Not ready: the database is unreachable or the instance drains", body = ReadyzJson),
    ),
)]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let ready = state.readiness.state();
    let body = ReadyzJson {
        status: if ready.ready() { "ready" } else { "not ready" },
        timestamp: now(),
        database: if ready.database_up {
            "connected"
        } else {
            "disconnected"
        },
        draining: ready.draining,
    };
    if ready.ready() {
        (StatusCode::OK, Json(body)).into_response()
    } else {
        // Like every 503 here: when to ask again (the probe runs every 250 ms).
        crate::error::with_retry_after(
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response(),
            1,
        )
    }
}

/// Prometheus text format (0.0.4) by default, as the original served;
/// OpenMetrics when the scraper asks for it.
#[utoipa::path(
    get, path = "/metrics", tag = "system", operation_id = "metrics",
    params(("Accept" = Option<String>, Header, description = "`application/openmetrics-text` for OpenMetrics")),
    responses((status = 200, description = "Prometheus text format 0.0.4, or OpenMetrics 1.0 when asked for",
        content(("text/plain; version=0.0.4; charset=utf-8"), ("application/openmetrics-text; version=1.0.0; charset=utf-8")))),
)]
pub async fn metrics(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    let (text, content_type) = if openmetrics {
        (
            state.metrics.encode(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        (
            state.metrics.encode_prometheus(),
            "text/plain; version=0.0.4; charset=utf-8",
        )
    };
    let text = text.map_err(|e| ApiError::Internal(format!("encoding metrics: {e}")))?;
    Ok(([(header::CONTENT_TYPE, content_type)], text).into_response())
}
