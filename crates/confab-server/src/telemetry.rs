//! Logging: one JSON object per line on stdout (SPEC §7), written by a
//! background thread so a slow terminal or pipe never blocks a request.
//!
//! Hand-written layer, because tracing-subscriber's JSON formatter nests span
//! fields under `span`/`spans`, while existing log pipelines of the original
//! service expect `requestId`, `orgId`, `userId` at the top level of every
//! line. The layer flattens the fields of all enclosing spans into the line.

use std::io::Write;

use chrono::Utc;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_appender::non_blocking::{NonBlocking, WorkerGuard};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// The longest client-controlled value (user agent, URL, …) a log line
/// carries, in characters. A client may send ~300 KB of `User-Agent`; copied
/// into every request line that would amplify its traffic into our logs.
pub const MAX_LOGGED_FIELD_CHARS: usize = 256;

/// `value` cut to [`MAX_LOGGED_FIELD_CHARS`] characters, marked when cut
/// (`…[+N bytes]`). The one rule for every client-controlled log field.
pub fn bounded(value: &str) -> String {
    match value.char_indices().nth(MAX_LOGGED_FIELD_CHARS) {
        None => value.to_owned(),
        Some((cut, _)) => format!("{}…[+{} bytes]", &value[..cut], value.len() - cut),
    }
}

/// Error texts of drivers (sqlx, redis) may echo the URL they were given,
/// password and all: `error` fields go through the redaction rule.
fn redact_error(field: &Field, text: String) -> String {
    if field.name() == "error" && (text.contains('=') || text.contains("://")) {
        crate::config::redact_credentials(&text)
    } else {
        text
    }
}

/// The log writer's buffer (see [`init`]).
const LOG_BUFFER_BYTES: usize = 64 * 1024;

/// Install the global subscriber. Keep the guard alive until exit: dropping
/// it flushes the lines still queued.
pub fn init(level: &str, format: LogFormat) -> WorkerGuard {
    // The writer thread drains every queued line, then flushes: through a
    // buffer, the lines that queued up while it wrote leave in one write
    // instead of one syscall each (stdout alone flushes at every newline),
    // and a lone line still leaves at once.
    let stdout = std::io::BufWriter::with_capacity(LOG_BUFFER_BYTES, std::io::stdout());
    let (writer, guard) = tracing_appender::non_blocking(stdout);
    // A level or a `target=level` list (what LOG_LEVEL nearly always is) is
    // a static filter. EnvFilter, needed only for span-field directives,
    // takes a shared lock on every span enter and exit: every poll of an
    // instrumented future, once per token of every stream.
    let (fixed, dynamic) = match level.parse::<Targets>() {
        Ok(targets) => (Some(targets), None),
        Err(_) => (
            None,
            Some(EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"))),
        ),
    };
    let registry = tracing_subscriber::registry().with(fixed).with(dynamic);
    let result = match format {
        LogFormat::Json => registry.with(JsonLayer { writer }).try_init(),
        LogFormat::Pretty => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(writer)
                    .with_target(false),
            )
            .try_init(),
    };
    // A second init (tests spawning several apps) keeps the first subscriber.
    let _ = result;
    guard
}

/// Writes each event as a JSON line: `timestamp`, `level`, `message`, then
/// the fields of the enclosing spans (outermost first), then the event's own.
pub struct JsonLayer {
    writer: NonBlocking,
}

impl JsonLayer {
    pub fn new(writer: NonBlocking) -> Self {
        Self { writer }
    }
}

/// Fields recorded on a span so far, kept in the span's extensions.
struct SpanFields(Map<String, Value>);

struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        let v = serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number);
        self.0.insert(field.name().to_owned(), v);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(
            field.name().to_owned(),
            Value::from(redact_error(field, value.to_string())),
        );
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_owned(),
            Value::from(redact_error(field, format!("{value:?}"))),
        );
    }
}

impl<S> Layer<S> for JsonLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Map::new();
        attrs.record(&mut JsonVisitor(&mut fields));
        span.extensions_mut().insert(SpanFields(fields));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        if let Some(SpanFields(fields)) = ext.get_mut::<SpanFields>() {
            values.record(&mut JsonVisitor(fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            Value::from(confab_core::model::rfc3339_millis::format(&Utc::now())),
        );
        line.insert(
            "level".into(),
            Value::from(meta.level().as_str().to_ascii_lowercase()),
        );
        line.insert("message".into(), Value::from(""));
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(SpanFields(fields)) = span.extensions().get::<SpanFields>() {
                    line.extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
        }
        event.record(&mut JsonVisitor(&mut line));
        // sqlx warns about connection-URL parameters it ignores with the
        // parameter as `key` and its value as `value` (`sslpassword`, say).
        if line
            .get("key")
            .and_then(Value::as_str)
            .is_some_and(crate::config::is_secret_key)
            && line.contains_key("value")
        {
            line.insert("value".into(), Value::from("***"));
        }
        line.insert("target".into(), Value::from(meta.target()));
        let Ok(mut bytes) = serde_json::to_vec(&Value::Object(line)) else {
            return;
        };
        bytes.push(b'\n');
        let _ = self.writer.clone().write_all(&bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_fields_are_cut_and_marked_short_ones_kept() {
        assert_eq!(bounded("curl/8.5"), "curl/8.5");
        let exact = "a".repeat(MAX_LOGGED_FIELD_CHARS);
        assert_eq!(bounded(&exact), exact);
        let long = "é".repeat(300_000);
        let cut = bounded(&long);
        assert!(cut.starts_with(&"é".repeat(MAX_LOGGED_FIELD_CHARS)));
        assert!(cut.ends_with(&format!(
            "…[+{} bytes]",
            (300_000 - MAX_LOGGED_FIELD_CHARS) * 2
        )));
        assert!(cut.chars().count() < MAX_LOGGED_FIELD_CHARS + 20);
    }
}
