//! `GET /openapi.json` (SPEC §15): an OpenAPI 3.1 document of every route,
//! generated from the code's own types. Each handler carries its
//! `#[utoipa::path]` (path, parameters, success responses), each body is a
//! type of `wire.rs` / `openai_wire.rs` deriving `ToSchema`, so a changed
//! field changes the document. What applies to whole groups of routes —
//! authentication, the error responses and their shapes, the links between
//! operations — is added here once, by [`document`].

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use utoipa::OpenApi;

use crate::routes;
use crate::state::AppState;

pub mod schema;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "confab",
        description = "A multi-tenant LLM chat service: the native chat API (JSON and \
            Server-Sent Events), its OpenAI-compatible API under `/v1`, and operations \
            routes. Native errors are `{\"error\": \"<HTTP reason>\", \"message\": \"…\"}`, \
            errors under `/v1` are OpenAI's `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`. \
            A `text/event-stream` response is described, as OpenAPI 3.1 does, by the schema \
            of one event: its `data` is JSON (`contentMediaType`/`contentSchema`).",
        license(name = "MIT", identifier = "MIT"),
    ),
    paths(
        routes::chats::post_chat,
        routes::stream::post_chat_stream,
        routes::chats::get_chat,
        routes::chats::rename_chat,
        routes::chats::delete_chat,
        routes::resume::get_message_stream,
        routes::resume::cancel_message,
        routes::chats::list_chats,
        routes::models::list_models,
        routes::usage::get_usage,
        routes::openai::list_models,
        routes::openai::get_model,
        routes::openai::chat_completions,
        routes::system::root,
        routes::system::health,
        routes::system::livez,
        routes::system::readyz,
        routes::system::metrics,
        serve,
        routes::playground::page,
        routes::playground::script,
        routes::playground::style,
        routes::playground::sse_script,
    ),
    components(schemas(
        crate::wire::ErrorJson,
        crate::wire::LimitErrorJson,
        crate::openai_wire::ErrorBody,
        crate::openai_wire::ContentPart,
    )),
    tags(
        (name = "chats", description = "The native chat API (SPEC §5, §6, §14)"),
        (name = "models", description = "Models (SPEC §11)"),
        (name = "usage", description = "The usage ledger (SPEC §12)"),
        (name = "openai", description = "The OpenAI-compatible API (SPEC §13)"),
        (name = "system", description = "Health, readiness, metrics, this document (SPEC §7, §15)"),
        (name = "playground", description = "The browser playground (SPEC §9)"),
    )
)]
struct ApiDoc;

/// This document.
#[utoipa::path(
    get, path = "/openapi.json", tag = "system", operation_id = "openapi",
    responses((status = 200, description = "The OpenAPI 3.1 document of this server", body = Object)),
)]
pub async fn serve(State(state): State<AppState>) -> Response {
    let models: Vec<String> = state
        .engine
        .models()
        .all()
        .iter()
        .map(|m| m.name.clone())
        .collect();
    Json(document(&models)).into_response()
}

/// How a route is authenticated.
#[derive(Clone, Copy, PartialEq)]
enum Auth {
    /// No credentials are read.
    None,
    /// Optional; when sent, validated as anywhere else (`/`, `/health`).
    Optional,
    /// Required (an API key, or the `x-org-id`/`x-user-id` headers where
    /// header authentication is on).
    Required,
}

/// The error statuses an operation may answer, besides its successes.
fn errors_of(operation_id: &str, method: &str, auth: Auth) -> Vec<u16> {
    let mut statuses = vec![500];
    if auth != Auth::None {
        // Bad credentials, a user outside the org, too many failed attempts.
        statuses.extend([401, 403, 429]);
    }
    if auth == Auth::Required {
        // The database (or, failing closed, the rate limiter) is down.
        statuses.push(503);
    }
    if matches!(method, "post" | "patch" | "put") {
        // The body: malformed, too slow, too large.
        statuses.extend([400, 408, 413]);
    }
    statuses.extend(match operation_id {
        "postChat" => &[404, 409, 422, 502, 504][..],
        "postChatStream" => &[404, 409, 502, 504][..],
        "getChat" | "listChats" | "getUsage" => &[400, 404][..],
        "renameChat" | "deleteChat" | "cancelMessage" => &[404][..],
        "resumeStream" => &[400, 404][..],
        "openaiChatCompletions" => &[404, 409, 502, 504][..],
        "openaiGetModel" => &[404][..],
        _ => &[][..],
    });
    statuses.sort_unstable();
    statuses.dedup();
    statuses
}

/// A UUID as `Uuid::parse_str` reads it (the hyphenated form).
const UUID_PATTERN: &str =
    "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";

/// A string with a character `str::trim` keeps.
const NOT_BLANK: &str = "[^\\t\\n\\u000b\\f\\r \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]";

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn retry_after() -> Value {
    json!({ "Retry-After": { "description": "Seconds until a retry may succeed", "schema": { "type": "integer", "minimum": 1 } } })
}

/// An error response in the native or OpenAI shape.
fn error_response(status: u16, openai: bool) -> Value {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let schema = match (openai, status) {
        (true, _) => schema_ref("OpenAiError"),
        // The request rate limit and the token budget add their figures.
        (false, 429) => json!({ "anyOf": [schema_ref("LimitError"), schema_ref("Error")] }),
        (false, _) => schema_ref("Error"),
    };
    let mut response = json!({
        "description": reason,
        "content": { "application/json": { "schema": schema } },
    });
    if matches!(status, 429 | 503) {
        response["headers"] = retry_after();
    }
    response
}

/// The rate-limit headers of an authenticated response (SPEC §4).
fn rate_limit_headers() -> Value {
    json!({
        "X-RateLimit-Limit": { "description": "The bucket's capacity", "schema": { "type": "integer" } },
        "X-RateLimit-Remaining": { "description": "Requests left", "schema": { "type": "integer" } },
        "X-RateLimit-Reset": { "description": "When the bucket is full again", "schema": { "type": "string", "format": "date-time" } },
    })
}

/// Links for stateful clients (and schemathesis): what a turn's answer
/// leads to.
fn links_of(operation_id: &str) -> Option<Value> {
    let from_body = |op: &str, extra: &[(&str, &str)]| {
        let mut parameters = Map::new();
        for (name, expr) in extra {
            parameters.insert((*name).into(), Value::String((*expr).into()));
        }
        json!({ "operationId": op, "parameters": parameters })
    };
    match operation_id {
        "postChat" => {
            let chat = [("id", "$response.body#/chat_id")];
            let message = [
                ("chat_id", "$response.body#/chat_id"),
                ("message_id", "$response.body#/message_id"),
            ];
            Some(json!({
                "GetChat": from_body("getChat", &chat),
                "RenameChat": from_body("renameChat", &chat),
                "DeleteChat": from_body("deleteChat", &chat),
                "ResumeStream": from_body("resumeStream", &message),
                "CancelMessage": from_body("cancelMessage", &message),
            }))
        }
        "postChatStream" => Some(json!({
            "GetChat": from_body("getChat", &[("id", "$response.header.X-Chat-Id")]),
            "ResumeStream": from_body("resumeStream", &[
                ("chat_id", "$response.header.X-Chat-Id"),
                ("message_id", "$response.header.X-Message-Id"),
            ]),
        })),
        "renameChat" => Some(json!({
            "GetChat": from_body("getChat", &[("id", "$response.body#/chat_id")]),
        })),
        _ => None,
    }
}

/// The whole document; `models` are the configured model names (the only
/// values `model` of a native turn may take).
pub fn document(models: &[String]) -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_else(|_| json!({}));
    doc["components"]["securitySchemes"] = json!({
        "apiKey": {
            "type": "http",
            "scheme": "bearer",
            "description": "A confab API key (`confab key create`): `Authorization: Bearer cfb_…`",
        },
        "orgId": {
            "type": "apiKey", "in": "header", "name": "x-org-id",
            "description": "Header authentication (with `x-user-id`), where `AUTH_MODE` allows it",
        },
        "userId": {
            "type": "apiKey", "in": "header", "name": "x-user-id",
            "description": "Header authentication (with `x-org-id`), where `AUTH_MODE` allows it",
        },
    });
    if let Some(model) = doc
        .pointer_mut("/components/schemas/TurnRequestBody/properties/model")
        .and_then(Value::as_object_mut)
    {
        let mut names: Vec<Value> = models.iter().cloned().map(Value::String).collect();
        names.push(Value::Null);
        model.insert("enum".into(), Value::Array(names));
    }
    if let Some(body) = doc
        .pointer_mut("/components/schemas/TurnRequestBody")
        .and_then(Value::as_object_mut)
    {
        // `system` starts a chat: not with the id of one (SPEC §11).
        body.insert(
            "not".into(),
            json!({
                "required": ["chat_id", "system"],
                "properties": {
                    "chat_id": { "type": "string" },
                    "system": { "type": "string", "pattern": NOT_BLANK },
                },
            }),
        );
    }
    // `format` only annotates in JSON Schema 2020-12: the ids a request
    // sends are checked by pattern too.
    if let Some(chat_id) = doc
        .pointer_mut("/components/schemas/TurnRequestBody/properties/chat_id")
        .and_then(Value::as_object_mut)
    {
        chat_id.insert("pattern".into(), json!(UUID_PATTERN));
    }
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return doc;
    };
    for (path, item) in paths.iter_mut() {
        let auth = match path.as_str() {
            "/" | "/health" => Auth::Optional,
            "/livez" | "/readyz" | "/metrics" | "/openapi.json" => Auth::None,
            p if p.starts_with("/playground") => Auth::None,
            _ => Auth::Required,
        };
        let openai = path.starts_with("/v1/");
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (method, operation) in item.iter_mut() {
            let Some(operation) = operation.as_object_mut() else {
                continue;
            };
            let id = operation
                .get("operationId")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let required = json!([{ "apiKey": [] }, { "orgId": [], "userId": [] }]);
            let security = match auth {
                Auth::None => json!([]),
                Auth::Optional => json!([{}, { "apiKey": [] }, { "orgId": [], "userId": [] }]),
                Auth::Required => required,
            };
            operation.insert("security".into(), security);
            // A header or query parameter is absent or a value, never null.
            for parameter in operation
                .get_mut("parameters")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                if let Some(Value::Array(types)) = parameter.pointer_mut("/schema/type") {
                    types.retain(|t| t != "null");
                }
            }
            let Some(responses) = operation
                .get_mut("responses")
                .and_then(Value::as_object_mut)
            else {
                continue;
            };
            for status in errors_of(&id, method, auth) {
                responses
                    .entry(status.to_string())
                    .or_insert_with(|| error_response(status, openai));
            }
            for (status, response) in responses.iter_mut() {
                if auth != Auth::Required || !status.starts_with('2') {
                    continue;
                }
                let Some(response) = response.as_object_mut() else {
                    continue;
                };
                let headers = response
                    .entry("headers")
                    .or_insert_with(|| json!({}))
                    .as_object_mut();
                if let (Some(headers), Value::Object(rl)) = (headers, rate_limit_headers()) {
                    headers.extend(rl);
                }
                if let Some(links) = links_of(&id) {
                    response.insert("links".into(), links);
                }
            }
        }
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `.route("…")` (or `.route(CONST, …)` of a `const CONST: &str`
    /// in the same sources) of the router is in the document and the other
    /// way round: a route added without its `#[utoipa::path]` (or listed
    /// here without a route) fails.
    #[test]
    fn every_route_is_documented() {
        let sources = [
            include_str!("routes/mod.rs"),
            include_str!("routes/playground.rs"),
        ];
        let consts: std::collections::HashMap<&str, &str> = sources
            .iter()
            .flat_map(|s| s.split("const ").skip(1))
            .filter_map(|rest| {
                let (name, rest) = rest.split_once(": &str = \"")?;
                Some((name.trim(), rest.split('"').next()?))
            })
            .collect();
        let mut routed: Vec<String> = sources
            .iter()
            .flat_map(|s| s.split(".route(").skip(1))
            .filter_map(|rest| {
                let rest = rest.trim_start();
                match rest.strip_prefix('"') {
                    Some(literal) => literal.split('"').next(),
                    None => consts.get(rest.split(',').next()?.trim()).copied(),
                }
            })
            .map(str::to_owned)
            .collect();
        routed.sort();
        routed.dedup();
        let doc = document(&["simulated".to_owned()]);
        let mut documented: Vec<String> =
            doc["paths"].as_object().unwrap().keys().cloned().collect();
        documented.sort();
        assert_eq!(routed, documented);
    }

    #[test]
    fn the_document_is_openapi_3_1_with_security_and_errors() {
        let doc = document(&["simulated".to_owned()]);
        assert_eq!(doc["openapi"], "3.1.0");
        let post = &doc["paths"]["/chat"]["post"];
        assert_eq!(post["security"][0]["apiKey"], json!([]));
        assert_eq!(
            post["responses"]["400"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/Error"
        );
        let v1 = &doc["paths"]["/v1/chat/completions"]["post"];
        assert_eq!(
            v1["responses"]["401"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/OpenAiError"
        );
        assert_eq!(doc["paths"]["/livez"]["get"]["security"], json!([]));
        assert_eq!(
            doc["components"]["schemas"]["TurnRequestBody"]["properties"]["model"]["enum"],
            json!(["simulated", null])
        );
        let stream = &doc["paths"]["/chat/stream"]["post"]["responses"]["200"]["content"];
        assert_eq!(
            stream["text/event-stream"]["schema"]["$ref"],
            "#/components/schemas/ChatStreamEvent"
        );
        let event = &doc["components"]["schemas"]["ChatStreamEvent"];
        assert_eq!(
            event["properties"]["data"]["contentMediaType"],
            "application/json"
        );
    }
}
