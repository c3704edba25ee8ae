//! Field schemas that a derive cannot infer: the value sets of confab's
//! enums (taken from the enums themselves, so they cannot drift), the
//! constants of the wire format, and the validation rules of the inputs,
//! written as the validators in `confab-core` apply them.

use confab_core::model::{MAX_MESSAGE_CHARS, MAX_SYSTEM_CHARS, MAX_TITLE_CHARS};
use confab_core::{MessageRole, MessageStatus, Role, UsageSource};
use serde_json::{Value, json};
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::{Ref, RefOr};

/// The whitespace `str::trim` removes (Unicode `White_Space`), as a regex
/// class body: a message or title must have a character outside it.
const WHITE_SPACE: &str =
    "\\t\\n\\u000b\\f\\r \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";

/// A schema written as JSON. The values below are fixed and all parse (a
/// unit test checks each); an unparsable one would be an unconstrained
/// schema, never a panic.
pub fn from_json(value: Value) -> RefOr<Schema> {
    serde_json::from_value(value).unwrap_or_else(|_| RefOr::T(Schema::default()))
}

fn one_of_strings(values: impl IntoIterator<Item = &'static str>) -> RefOr<Schema> {
    let values: Vec<&str> = values.into_iter().collect();
    from_json(json!({ "type": "string", "enum": values }))
}

/// Not blank, no NUL (the pattern), at most `max` characters.
fn text(max: usize, nullable: bool) -> RefOr<Schema> {
    let pattern = format!("^[^\\u0000]*[^\\u0000{WHITE_SPACE}][^\\u0000]*$");
    let ty = if nullable {
        json!(["string", "null"])
    } else {
        json!("string")
    };
    from_json(json!({ "type": ty, "minLength": 1, "maxLength": max, "pattern": pattern }))
}

pub fn message_text() -> RefOr<Schema> {
    text(MAX_MESSAGE_CHARS, false)
}

pub fn chat_title() -> RefOr<Schema> {
    text(MAX_TITLE_CHARS, false)
}

/// Blank means none; NUL is refused.
pub fn system_prompt() -> RefOr<Schema> {
    from_json(json!({
        "type": ["string", "null"],
        "maxLength": MAX_SYSTEM_CHARS,
        "pattern": "^[^\\u0000]*$",
    }))
}

/// 1-64 of `[A-Za-z0-9._:-]` (`confab_core::models::valid_model_name`). The
/// served document narrows it to the configured models.
pub fn model_name() -> RefOr<Schema> {
    from_json(json!({ "type": ["string", "null"], "pattern": "^[A-Za-z0-9._:-]{1,64}$" }))
}

pub fn openai_model_name() -> RefOr<Schema> {
    from_json(json!({ "type": "string", "pattern": "^[A-Za-z0-9._:-]{1,64}$" }))
}

pub fn no_nul_text() -> RefOr<Schema> {
    from_json(json!({ "type": "string", "pattern": "^[^\\u0000]*$" }))
}

pub fn openai_role() -> RefOr<Schema> {
    one_of_strings(["system", "developer", "user", "assistant"])
}

pub fn text_part_type() -> RefOr<Schema> {
    one_of_strings(["text"])
}

fn non_empty() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
}

/// A stop sequence, or at most 4.
pub fn stop() -> RefOr<Schema> {
    OneOfBuilder::new()
        .item(non_empty())
        .item(ArrayBuilder::new().items(non_empty()).max_items(Some(4)))
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .into()
}

/// Text, or an array of text parts.
pub fn message_content() -> RefOr<Schema> {
    OneOfBuilder::new()
        .item(no_nul_text())
        .item(ArrayBuilder::new().items(Ref::from_schema_name("ChatCompletionContentPart")))
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .into()
}

pub fn message_role() -> RefOr<Schema> {
    one_of_strings(MessageRole::ALL.iter().map(|r| r.as_str()))
}

pub fn message_status() -> RefOr<Schema> {
    one_of_strings(MessageStatus::ALL.iter().map(|s| s.as_str()))
}

pub fn user_role() -> RefOr<Schema> {
    one_of_strings(Role::ALL.iter().map(|r| r.as_str()))
}

pub fn usage_source() -> RefOr<Schema> {
    one_of_strings(UsageSource::ALL.iter().map(|s| s.as_str()))
}

/// `cancelling`, or the final status of a message that had finished.
pub fn cancel_status() -> RefOr<Schema> {
    one_of_strings(
        std::iter::once("cancelling").chain(
            MessageStatus::ALL
                .iter()
                .filter(|s| **s != MessageStatus::Streaming)
                .map(|s| s.as_str()),
        ),
    )
}

pub fn always_false() -> RefOr<Schema> {
    from_json(json!({ "type": "boolean", "enum": [false] }))
}

pub fn always_true() -> RefOr<Schema> {
    from_json(json!({ "type": "boolean", "enum": [true] }))
}

pub fn empty_string() -> RefOr<Schema> {
    one_of_strings([""])
}

pub fn stream_failed() -> RefOr<Schema> {
    one_of_strings(["Stream failed"])
}

pub fn too_many_requests() -> RefOr<Schema> {
    one_of_strings(["Too Many Requests"])
}

pub fn connection_state() -> RefOr<Schema> {
    one_of_strings(["connected", "disconnected"])
}

pub fn redis_state() -> RefOr<Schema> {
    one_of_strings(["connected", "disconnected", "not configured"])
}

pub fn health_status() -> RefOr<Schema> {
    one_of_strings(["ok", "degraded"])
}

pub fn ok_status() -> RefOr<Schema> {
    one_of_strings(["ok"])
}

pub fn ready_status() -> RefOr<Schema> {
    one_of_strings(["ready", "not ready"])
}

pub fn null_value() -> RefOr<Schema> {
    from_json(json!({ "type": "null" }))
}

pub fn chat_completion_object() -> RefOr<Schema> {
    one_of_strings(["chat.completion"])
}

pub fn chat_completion_chunk_object() -> RefOr<Schema> {
    one_of_strings(["chat.completion.chunk"])
}

pub fn list_object() -> RefOr<Schema> {
    one_of_strings(["list"])
}

pub fn model_object() -> RefOr<Schema> {
    one_of_strings(["model"])
}

pub fn assistant_role() -> RefOr<Schema> {
    one_of_strings(["assistant"])
}

/// OpenAI's values; confab passes on what the model reported.
pub fn finish_reason() -> RefOr<Schema> {
    from_json(json!({ "type": "string", "examples": ["stop", "length"] }))
}

pub fn chunk_finish_reason() -> RefOr<Schema> {
    from_json(json!({ "type": ["string", "null"], "examples": ["stop", "length"] }))
}

/// A reference to `T`'s component schema.
pub fn component_ref<T: utoipa::ToSchema>() -> Ref {
    Ref::from_schema_name(T::name())
}

/// Put `T` (and what it refers to) among the document's components.
pub fn register<T: utoipa::ToSchema>(schemas: &mut Vec<(String, RefOr<Schema>)>) {
    schemas.push((T::name().into_owned(), T::schema()));
    T::schemas(schemas);
}

fn json_data(one_of: Vec<Ref>) -> ObjectBuilder {
    let mut any = OneOfBuilder::new();
    for r in one_of {
        any = any.item(r);
    }
    ObjectBuilder::new()
        .schema_type(Type::String)
        .content_media_type("application/json")
        .content_schema(Some(any))
}

fn message_event() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["message"]))
}

/// An SSE event whose `data` is JSON, one of `one_of`.
pub fn sse_event(one_of: Vec<Ref>) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .required("data")
        .property(
            "id",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^[0-9]+$"))
                .description(Some("1, 2, … per message; the final event has the last id")),
        )
        .property("event", message_event())
        .property("data", json_data(one_of))
        .into()
}

/// An SSE event of the OpenAI-compatible stream: JSON, one of `one_of`, or
/// the literal `[DONE]` that ends a stream.
pub fn openai_sse_event(one_of: Vec<Ref>) -> RefOr<Schema> {
    let done = ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["[DONE]"]));
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .required("data")
        .property("event", message_event())
        .property(
            "data",
            OneOfBuilder::new().item(done).item(json_data(one_of)),
        )
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_helper_schema_parses() {
        let all: &[fn() -> RefOr<Schema>] = &[
            message_text,
            chat_title,
            system_prompt,
            model_name,
            openai_model_name,
            no_nul_text,
            openai_role,
            text_part_type,
            stop,
            message_content,
            message_role,
            message_status,
            user_role,
            usage_source,
            cancel_status,
            always_false,
            always_true,
            empty_string,
            stream_failed,
            too_many_requests,
            connection_state,
            redis_state,
            health_status,
            ok_status,
            ready_status,
            null_value,
            chat_completion_object,
            chat_completion_chunk_object,
            list_object,
            model_object,
            assistant_role,
            finish_reason,
            chunk_finish_reason,
        ];
        for f in all {
            let json = serde_json::to_value(f()).unwrap();
            assert_ne!(json, json!({}), "a helper schema did not parse");
            assert!(
                json.get("type").is_some() || json.get("oneOf").is_some(),
                "{json}"
            );
        }
    }
}
