//! `GET /models` (SPEC §11): the models the caller's org may use, and the
//! one a turn uses when it names none.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};

use confab_core::service::ServiceError;

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
    // An allowlist naming only models this server lacks (the models file
    // changed after `confab org models`) leaves the org no model: its turns
    // are refused `Unknown model`, and this lists nothing, with no default.
    // The client's request was good: an empty list, not a 400; the operator
    // learns of it from the log.
    let default = match state.engine.resolve_model(&principal, None, None) {
        Ok(model) => Some(model),
        Err(ServiceError::UnknownModel(_)) => {
            tracing::warn!(
                org_id = %principal.org_id,
                "the org's model allowlist names none of the configured models: it can use no model"
            );
            None
        }
        Err(other) => return Err(other.into()),
    };
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
        default: default.as_ref().map(|m| m.name.as_str()),
    })
    .into_response())
}
