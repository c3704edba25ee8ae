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
