//! `GET /usage` (SPEC §12): totals from the usage ledger, never from logs.
//! Members see their own usage; owners and admins their whole org.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::middleware::Auth;
use crate::state::AppState;
use crate::wire::{UsageReportJson, usage_query};

/// Usage from the ledger (SPEC §12): members see their own, owners and
/// admins their whole org.
#[utoipa::path(
    get, path = "/usage", tag = "usage", operation_id = "getUsage",
    params(
        ("from" = Option<chrono::DateTime<chrono::Utc>>, Query, description = "Start (inclusive); default: the current UTC month"),
        ("to" = Option<chrono::DateTime<chrono::Utc>>, Query, description = "End (exclusive), after `from`"),
        ("group_by" = Option<String>, Query, description = "`model`, `user` or `day`"),
    ),
    responses((status = 200, description = "Totals and groups", body = UsageReportJson)),
)]
pub async fn get_usage(
    State(state): State<AppState>,
    Auth(principal): Auth,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let (from, to, group) = usage_query(
        query.get("from").map(String::as_str),
        query.get("to").map(String::as_str),
        query.get("group_by").map(String::as_str),
    )
    .map_err(ApiError::BadRequest)?;
    let user = (!principal.role.reads_whole_org()).then_some(principal.user_id);
    let report = state
        .store
        .usage_report(principal.org_id, user, from, to, group)
        .await?;
    Ok(Json(UsageReportJson::new(from, to, &report)).into_response())
}
