//! Logging: one JSON object per line on stdout (SPEC §7), written by a
//! background thread so a slow terminal or pipe never blocks a request.
//!
//! Hand-written layer, because tracing-subscriber's JSON formatter nests span
//! fields under `span`/`spans`, while existing log pipelines of the original
//! service expect `requestId`, `orgId`, `userId` at the top level of every
//! line. The layer flattens the fields of all enclosing spans into the line.
//!
//! A line is encoded straight into bytes (each field's JSON value once, no
//! map of owned keys and cloned values per line), and handed to [`LogSink`]:
//! an append under a lock. Its writer thread takes everything queued, writes
//! it in one call, then waits a few milliseconds before the next write, so a
//! busy server's lines leave in batches and logging a line wakes no thread
//! (with one line per request and one per stream, the channel and wake-up
//! per line of `tracing_appender` were ≈ 9 % of the server's CPU in sse-1k;
//! BENCHMARKS.md).

use std::io::Write;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use chrono::Utc;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
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

/// After a write, the writer waits this long before taking the next batch:
/// the longest a line waits on a busy server (an idle one writes at once).
const WRITE_EVERY: Duration = Duration::from_millis(10);
/// Lines queued beyond this many bytes (the writer cannot keep up: a
/// stalled pipe) are dropped, and counted in a line once it can write again.
const MAX_QUEUED_BYTES: usize = 8 * 1024 * 1024;

/// Where log lines go: appended by whoever logs, written to stdout by one
/// thread (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct LogSink {
    shared: Arc<SinkShared>,
}

struct SinkShared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

#[derive(Default)]
struct Queue {
    bytes: Vec<u8>,
    /// The writer sleeps on `wake` until something is queued.
    writer_waits: bool,
    closed: bool,
    dropped: u64,
}

/// Keep it alive until exit: dropping it writes what is still queued and
/// stops the writer thread.
pub struct LogGuard {
    sink: LogSink,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Ok(mut queue) = self.sink.shared.queue.lock() {
            queue.closed = true;
        }
        self.sink.shared.wake.notify_one();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl LogSink {
    /// A sink whose writer thread writes to `out`.
    pub fn start(mut out: impl Write + Send + 'static) -> (LogSink, LogGuard) {
        let sink = LogSink {
            shared: Arc::new(SinkShared {
                queue: Mutex::new(Queue::default()),
                wake: Condvar::new(),
            }),
        };
        let shared = sink.shared.clone();
        let writer = std::thread::Builder::new()
            .name("confab-log".into())
            .spawn(move || write_lines(&shared, &mut out))
            .ok();
        let guard = LogGuard {
            sink: sink.clone(),
            writer,
        };
        (sink, guard)
    }

    /// Queue one whole line (or several).
    pub fn append(&self, line: &[u8]) {
        let Ok(mut queue) = self.shared.queue.lock() else {
            return;
        };
        if queue.bytes.len() + line.len() > MAX_QUEUED_BYTES {
            queue.dropped += 1;
            return;
        }
        queue.bytes.extend_from_slice(line);
        if std::mem::take(&mut queue.writer_waits) {
            drop(queue);
            self.shared.wake.notify_one();
        }
    }
}

/// The writer thread: take what is queued, write it, pause, again; sleep
/// on the condition variable while nothing is queued.
fn write_lines(shared: &SinkShared, out: &mut impl Write) {
    let mut batch = Vec::new();
    loop {
        let (closed, dropped) = {
            let Ok(mut queue) = shared.queue.lock() else {
                return;
            };
            while queue.bytes.is_empty() && !queue.closed {
                queue.writer_waits = true;
                queue = match shared.wake.wait(queue) {
                    Ok(queue) => queue,
                    Err(_) => return,
                };
            }
            std::mem::swap(&mut batch, &mut queue.bytes);
            (queue.closed, std::mem::take(&mut queue.dropped))
        };
        if dropped > 0 {
            let line = format!(
                "{{\"timestamp\":\"{}\",\"level\":\"warn\",\"message\":\"log lines dropped: the output did not keep up\",\"dropped\":{dropped},\"target\":\"confab_server::telemetry\"}}\n",
                confab_core::model::rfc3339_millis::format(&Utc::now())
            );
            batch.extend_from_slice(line.as_bytes());
        }
        // A failing stdout (closed pipe) loses lines; nothing better to do.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        if closed {
            return;
        }
        std::thread::sleep(WRITE_EVERY);
    }
}

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.append(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = LogSink;
    fn make_writer(&'a self) -> LogSink {
        self.clone()
    }
}

/// Install the global subscriber. Keep the guard alive until exit: dropping
/// it writes the lines still queued.
pub fn init(level: &str, format: LogFormat) -> LogGuard {
    let (sink, guard) = LogSink::start(std::io::stdout());
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
        LogFormat::Json => registry.with(JsonLayer::new(sink)).try_init(),
        LogFormat::Pretty => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(sink)
                    .with_target(false),
            )
            .try_init(),
    };
    // A second init (tests spawning several apps) keeps the first subscriber.
    let _ = result;
    guard
}

/// Panics seen by this process, on any thread: `panics_total` on
/// `/metrics`. A panic is a bug; the request or turn it hit is answered
/// (a 500, a reply stored `failed`), so without this count and the hook's
/// line it would look like any other error.
static PANICS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many panics this process has seen.
pub fn panics() -> u64 {
    PANICS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Replace Rust's panic hook, which writes the panic's message to stderr,
/// with [`report_panic`]: one log line like every other, with the request
/// id of the request it hit.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        report_panic(info.location(), info.payload());
    }));
}

/// Count a panic and log it at `error`, in the spans it happened in (so
/// with its request id): where it happened, on which thread, the backtrace
/// when `RUST_BACKTRACE` asks for one, and its message only when the message
/// is a literal of the code (`panic!("…")`, `unreachable!()`). A formatted
/// message may quote the data the code failed on, a user's text or a key
/// among them: it is withheld, and the location says where to look.
fn report_panic(location: Option<&std::panic::Location<'_>>, payload: &dyn std::any::Any) {
    PANICS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let message = payload
        .downcast_ref::<&'static str>()
        .copied()
        .unwrap_or("(formatted message withheld: it may quote request data)");
    let location = location
        .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
        .unwrap_or_default();
    let thread = std::thread::current();
    let backtrace = std::backtrace::Backtrace::capture();
    let backtrace = match backtrace.status() {
        std::backtrace::BacktraceStatus::Captured => Some(backtrace.to_string()),
        _ => None,
    };
    tracing::error!(
        panic = message,
        location,
        thread = thread.name().unwrap_or("unnamed"),
        backtrace,
        "panic"
    );
}

/// Writes each event as a JSON line: `timestamp`, `level`, `message`, then
/// the fields of the enclosing spans (outermost first), then the event's own,
/// then `target`. A field named twice keeps its first place and its last
/// value.
pub struct JsonLayer {
    sink: LogSink,
}

impl JsonLayer {
    pub fn new(sink: LogSink) -> Self {
        Self { sink }
    }
}

/// Named JSON values: each value's encoding is kept in one buffer.
#[derive(Default)]
struct Fields {
    names: Vec<(&'static str, Range<usize>)>,
    json: Vec<u8>,
}

impl Fields {
    fn clear(&mut self) {
        self.names.clear();
        self.json.clear();
    }

    /// Set `name` to the JSON encoding of `value`.
    fn set<T: serde::Serialize + ?Sized>(&mut self, name: &'static str, value: &T) {
        let start = self.json.len();
        if serde_json::to_writer(&mut self.json, value).is_err() {
            self.json.truncate(start);
            self.json.extend_from_slice(b"null");
        }
        self.place(name, start..self.json.len());
    }

    /// Set `name` to `other`'s encoded `value` (a span's field on a line).
    fn copy(&mut self, name: &'static str, other: &[u8]) {
        let start = self.json.len();
        self.json.extend_from_slice(other);
        self.place(name, start..self.json.len());
    }

    fn place(&mut self, name: &'static str, range: Range<usize>) {
        match self.names.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = range,
            None => self.names.push((name, range)),
        }
    }

    fn get(&self, name: &str) -> Option<&[u8]> {
        self.names
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, range)| &self.json[range.clone()])
    }

    fn iter(&self) -> impl Iterator<Item = (&'static str, &[u8])> {
        self.names
            .iter()
            .map(|(name, range)| (*name, &self.json[range.clone()]))
    }

    /// `{"name":value,…}` and a newline, onto `out`.
    fn write_line(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        for (i, (name, value)) in self.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            // Field names are Rust identifiers (no escaping needed), but
            // the encoder is the one rule for any string.
            let _ = serde_json::to_writer(&mut *out, name);
            out.push(b':');
            out.extend_from_slice(value);
        }
        out.extend_from_slice(b"}\n");
    }
}

/// Fields recorded on a span so far, kept in the span's extensions.
struct SpanFields(Fields);

/// Records a span's or an event's fields, encoded.
struct JsonVisitor<'a> {
    fields: &'a mut Fields,
    /// sqlx warns about connection-URL parameters it ignores with the
    /// parameter as `key` and its value as `value` (`sslpassword`, say).
    secret_key: bool,
}

impl<'a> JsonVisitor<'a> {
    fn new(fields: &'a mut Fields) -> Self {
        Self {
            fields,
            secret_key: false,
        }
    }
}

impl Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        match serde_json::Number::from_f64(value) {
            Some(n) => self.fields.set(field.name(), &n),
            None => self.fields.set(field.name(), &()),
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.fields.set(field.name(), &value);
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.fields.set(field.name(), &value);
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.fields.set(field.name(), &value);
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "key" {
            self.secret_key = crate::config::is_secret_key(value);
        }
        self.fields.set(field.name(), value);
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let text = redact_error(field, value.to_string());
        self.fields.set(field.name(), &text);
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = redact_error(field, format!("{value:?}"));
        if field.name() == "key" {
            self.secret_key = crate::config::is_secret_key(&text);
        }
        self.fields.set(field.name(), &text);
    }
}

fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

thread_local! {
    /// A line's fields and bytes, reused from one event to the next.
    static LINE: std::cell::RefCell<(Fields, Vec<u8>)> = Default::default();
}

impl JsonLayer {
    fn encode<S>(
        &self,
        event: &Event<'_>,
        ctx: &Context<'_, S>,
        line: &mut Fields,
        out: &mut Vec<u8>,
    ) where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let meta = event.metadata();
        line.clear();
        out.clear();
        line.set(
            "timestamp",
            &confab_core::model::rfc3339_millis::format(&Utc::now()),
        );
        line.set("level", level_name(meta.level()));
        line.set("message", "");
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(SpanFields(fields)) = span.extensions().get::<SpanFields>() {
                    for (name, value) in fields.iter() {
                        line.copy(name, value);
                    }
                }
            }
        }
        let mut visitor = JsonVisitor::new(line);
        event.record(&mut visitor);
        if visitor.secret_key && line.get("value").is_some() {
            line.set("value", "***");
        }
        line.set("target", meta.target());
        line.write_line(out);
        self.sink.append(out);
    }
}

impl<S> Layer<S> for JsonLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Fields::default();
        attrs.record(&mut JsonVisitor::new(&mut fields));
        span.extensions_mut().insert(SpanFields(fields));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        if let Some(SpanFields(fields)) = ext.get_mut::<SpanFields>() {
            values.record(&mut JsonVisitor::new(fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let reused = LINE.try_with(|cell| match cell.try_borrow_mut() {
            Ok(mut line) => {
                let (fields, out) = &mut *line;
                self.encode(event, &ctx, fields, out);
                true
            }
            Err(_) => false,
        });
        if reused != Ok(true) {
            // Logging from inside a line's encoding, or during thread
            // teardown: a line of its own.
            self.encode(event, &ctx, &mut Fields::default(), &mut Vec::new());
        }
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

    /// A writer the tests read back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The lines `log` writes through a JSON layer, each parsed (field
    /// order kept), once the guard has written them all.
    fn lines_of(log: impl FnOnce()) -> Vec<serde_json::Map<String, serde_json::Value>> {
        raw_lines_of(log)
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
            .collect()
    }

    fn raw_lines_of(log: impl FnOnce()) -> Vec<String> {
        let out = Captured::default();
        let (sink, guard) = LogSink::start(out.clone());
        let subscriber = tracing_subscriber::registry().with(JsonLayer::new(sink));
        tracing::subscriber::with_default(subscriber, log);
        drop(guard);
        let bytes = out.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_panic_is_logged_in_its_request_with_its_place_but_not_its_data() {
        let before = panics();
        let here = std::panic::Location::caller();
        let formatted: Box<dyn std::any::Any> =
            Box::new(format!("cannot parse {}", "SECRET user text"));
        let literal: Box<dyn std::any::Any> = Box::new("internal error: entered unreachable code");
        let raw = raw_lines_of(|| {
            let span = tracing::info_span!("request", requestId = "r-7");
            let _entered = span.enter();
            report_panic(Some(here), formatted.as_ref());
            report_panic(None, literal.as_ref());
        });
        assert_eq!(panics() - before, 2);
        assert_eq!(raw.len(), 2, "{raw:?}");
        assert!(raw.iter().all(|l| !l.contains("SECRET")), "{raw:?}");
        let lines: Vec<serde_json::Map<String, serde_json::Value>> = raw
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["level"], "error");
        assert_eq!(lines[0]["message"], "panic");
        assert_eq!(lines[0]["requestId"], "r-7");
        assert_eq!(
            lines[0]["panic"],
            "(formatted message withheld: it may quote request data)"
        );
        assert_eq!(
            lines[0]["location"],
            format!("{}:{}:{}", here.file(), here.line(), here.column())
        );
        assert_eq!(
            lines[1]["panic"],
            "internal error: entered unreachable code"
        );
        assert_eq!(lines[1]["requestId"], "r-7");
    }

    #[test]
    fn a_line_has_the_span_fields_flattened_in_order_and_each_field_once() {
        let raw = raw_lines_of(|| {
            let span =
                tracing::info_span!("request", requestId = "r-1", orgId = tracing::field::Empty);
            let _entered = span.enter();
            span.record("orgId", "o-9");
            tracing::info!(status = 200u64, duration = 1.5, "request \"completed\"");
            let inner = tracing::info_span!("inner", requestId = "r-2", depth = 2i64);
            let _inner = inner.enter();
            tracing::warn!(ok = true, "second");
        });
        assert_eq!(raw.len(), 2, "{raw:?}");
        // Each field once in the text (a parser would hide a duplicate).
        assert!(
            raw.iter().all(|l| l.matches("\"requestId\"").count() == 1),
            "{raw:?}"
        );
        assert!(
            raw.iter().all(|l| l.matches("\"message\"").count() == 1),
            "{raw:?}"
        );
        let lines: Vec<serde_json::Map<String, serde_json::Value>> = raw
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let keys: Vec<&str> = lines[0].keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "timestamp",
                "level",
                "message",
                "requestId",
                "orgId",
                "status",
                "duration",
                "target"
            ]
        );
        assert_eq!(lines[0]["level"], "info");
        assert_eq!(lines[0]["message"], "request \"completed\"");
        assert_eq!(lines[0]["orgId"], "o-9");
        assert_eq!(lines[0]["status"], 200);
        assert_eq!(lines[0]["duration"], 1.5);
        assert_eq!(lines[0]["target"], module_path!());
        assert!(
            chrono::DateTime::parse_from_rfc3339(lines[0]["timestamp"].as_str().unwrap()).is_ok()
        );
        // The inner span's value wins, in the outer one's place.
        let keys: Vec<&str> = lines[1].keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "timestamp",
                "level",
                "message",
                "requestId",
                "orgId",
                "depth",
                "ok",
                "target"
            ]
        );
        assert_eq!(lines[1]["requestId"], "r-2");
        assert_eq!(lines[1]["level"], "warn");
    }

    #[test]
    fn secrets_in_driver_warnings_and_errors_are_redacted() {
        let lines = lines_of(|| {
            tracing::warn!(key = "sslpassword", value = "hunter2", "ignored parameter");
            tracing::warn!(
                key = "application_name",
                value = "confab",
                "ignored parameter"
            );
            let err = std::io::Error::other("connecting to postgres://u:hunter2@db/x failed");
            tracing::error!(error = &err as &dyn std::error::Error, "database down");
        });
        assert_eq!(lines[0]["value"], "***");
        assert_eq!(lines[1]["value"], "confab");
        let error = lines[2]["error"].as_str().unwrap();
        assert!(!error.contains("hunter2"), "{error}");
        assert!(!lines.iter().any(|l| {
            serde_json::Value::Object(l.clone())
                .to_string()
                .contains("hunter2")
        }));
    }

    #[test]
    fn every_queued_line_is_written_when_the_guard_drops() {
        let lines = lines_of(|| {
            for i in 0..5_000u64 {
                tracing::info!(i, "line");
            }
        });
        assert_eq!(lines.len(), 5_000);
        assert!(lines.iter().enumerate().all(|(i, l)| l["i"] == i as u64));
    }
}
