//! `GET /models` (SPEC §11): the models the caller's org may use, and the
//! one a turn uses when it names none.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::middleware::Auth;
use crate::state::AppState;
use crate::wire::{ModelJson, ModelListJson};

/// The models the caller's org may use, and the default (SPEC §11).
#[utoipa::path(
    get, path = "/models", tag = "models", operation_id = "listModels",
    responses((status = 200, description = "The models", body = ModelListJson)),
)]
pub async fn list_models(
    State(state): State<AppState>,
    Auth(principal): Auth,
) -> Result<Response, ApiError> {
    let registry = state.engine.models();
    let default = state.engine.resolve_model(&principal, None, None)?;
    let models = registry
        .allowed(&principal.policy)
        .map(|m| ModelJson {
            name: &m.name,
            provider: m.provider.kind(),
            context_tokens: m.context_tokens,
            max_output_tokens: m.max_output_tokens,
        })
        .collect();
    Ok(Json(ModelListJson {
        models,
        default: &default.name,
    })
    .into_response())
}
