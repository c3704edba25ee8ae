//! What the two HTTP providers (`openai`, `anthropic`) share: the reqwest
//! client and its TLS set-up, turning transport failures and non-2xx answers
//! into [`ProviderError`]s without leaking URLs, keys or upstream text, and
//! decoding an SSE response body into [`Chunk`]s through a per-provider
//! [`WireFormat`].
//!
//! The decoder works on any stream of byte chunks, not on a `reqwest`
//! response, so the wire formats are tested on captured bytes split at every
//! position, without a network.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use confab_core::provider::{Chunk, ChunkStream, ProviderError, TimeoutPhase};
use eventsource_stream::{EventStreamError, Eventsource};
use futures::{Stream, StreamExt};
use http::{HeaderMap, HeaderName, HeaderValue};
use reqwest::Url;
use serde::Deserialize;

/// Where and how to reach one upstream. The key is never shown by `Debug`.
#[derive(Clone)]
pub struct HttpProviderConfig {
    /// As the provider's own SDK takes it (see each provider's `new`).
    pub base_url: String,
    /// Sent as the provider's credential header when set; local servers
    /// (Ollama, vLLM, llama.cpp) need none.
    pub api_key: Option<String>,
    /// Establishing TCP + TLS; past it the call fails with
    /// `ProviderError::Timeout(TimeoutPhase::Connect)`.
    pub connect_timeout: Duration,
}

impl fmt::Debug for HttpProviderConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpProviderConfig")
            .field("base_url", &redacted_url_str(&self.base_url))
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// Install rustls' *ring* crypto provider as the process default. Idempotent;
/// the server's `main` calls it at start-up, and every HTTP provider calls it
/// before building its client, so a missing call cannot make reqwest panic
/// (with the `rustls-no-provider` feature, building a client without a
/// process-wide provider panics). *ring* rather than reqwest's default
/// aws-lc-rs: sqlx already uses *ring*, and aws-lc-rs is a ~24 s C build.
pub fn install_tls_provider() {
    // Err means a provider is already installed (this one, or one the binary
    // chose on purpose): either way there is one, which is all we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// How much of an error body is read to find its `type`/`code` label.
const ERROR_BODY_LIMIT: usize = 4 * 1024;
/// How long reading that error body may take: the status alone is enough to
/// judge the failure, so a server that sends headers and stalls must not hold
/// the turn up.
const ERROR_BODY_WAIT: Duration = Duration::from_secs(2);
/// Longest label kept from an upstream error (`type`, `code`).
const LABEL_MAX: usize = 64;
/// Longest SSE line accepted. Real events are a few hundred bytes; without a
/// bound, a server that never sends a newline would grow the buffer forever.
const MAX_LINE: usize = 1024 * 1024;

/// One configured upstream endpoint: a client, the URL to POST to, and the
/// headers every request carries (the credential among them, marked
/// sensitive so that `http`'s own `Debug` hides it too).
#[derive(Clone)]
pub(crate) struct Upstream {
    client: reqwest::Client,
    endpoint: Url,
    headers: HeaderMap,
    /// What `Debug`, logs and errors may show of the endpoint.
    shown: String,
    has_key: bool,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("endpoint", &self.shown)
            .field("api_key", &if self.has_key { "<redacted>" } else { "none" })
            .finish()
    }
}

impl Upstream {
    /// `credential` turns the key into its header (`Authorization: Bearer`,
    /// `x-api-key`); it is only called when a key is configured.
    pub(crate) fn new(
        config: &HttpProviderConfig,
        endpoint: Url,
        credential: impl FnOnce(&str) -> (HeaderName, String),
        mut headers: HeaderMap,
    ) -> Result<Self, String> {
        install_tls_provider();
        if let Some(key) = &config.api_key {
            let (name, value) = credential(key);
            // The error of `from_str` does not carry the value; ours neither.
            let mut value = HeaderValue::from_str(&value)
                .map_err(|_| "the API key is not a valid HTTP header value".to_string())?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        headers.insert(
            http::header::ACCEPT,
            HeaderValue::from_static("text/event-stream"),
        );
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .user_agent(concat!("confab/", env!("CARGO_PKG_VERSION")))
            // No redirects: reqwest keeps custom headers such as `x-api-key`
            // on a redirect to another host, and a model API that redirects a
            // POST is misconfigured anyway. A 3xx is judged like any 4xx.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|err| format!("could not build the HTTP client: {}", chain(&err)))?;
        Ok(Self {
            client,
            shown: redacted_url(&endpoint),
            endpoint,
            headers,
            has_key: config.api_key.is_some(),
        })
    }

    pub(crate) fn shown(&self) -> &str {
        &self.shown
    }

    /// POST `body` as JSON and wait for the status. A success gives the
    /// response, whose body is the event stream; anything else is judged
    /// into a [`ProviderError`].
    pub(crate) async fn post(
        &self,
        body: &impl serde::Serialize,
    ) -> Result<reqwest::Response, ProviderError> {
        let response = self
            .client
            .post(self.endpoint.clone())
            .headers(self.headers.clone())
            .json(body)
            .send()
            .await
            .map_err(send_error)?;
        let status = response.status();
        if !status.is_success() {
            return Err(judge_failure(response).await);
        }
        // A server that ignored `stream: true` answers one JSON document: say
        // so, rather than report it as a stream without its terminator.
        let is_json = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("application/json"));
        if is_json {
            return Err(ProviderError::Malformed {
                detail: "expected an event stream, got application/json".into(),
            });
        }
        Ok(response)
    }
}

/// `base_url` with `segments` appended to its path (a trailing slash is
/// trimmed first; a query string, as some gateways need, is kept).
pub(crate) fn endpoint(base_url: &str, segments: &[&str]) -> Result<Url, String> {
    let shown = redacted_url_str(base_url);
    let mut url =
        Url::parse(base_url.trim()).map_err(|err| format!("bad base_url {shown}: {err}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "bad base_url {shown}: the scheme must be http or https"
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("bad base_url {shown}: no host"));
    }
    {
        let mut path = url
            .path_segments_mut()
            .map_err(|_| format!("bad base_url {shown}: it cannot take a path"))?;
        path.pop_if_empty();
        path.extend(segments);
    }
    Ok(url)
}

/// `scheme://host[:port]/path`: what may be shown of a URL (no user info, no
/// query, where a gateway key could sit).
pub(crate) fn redacted_url(url: &Url) -> String {
    let mut shown = format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""));
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    shown.push_str(url.path());
    shown
}

fn redacted_url_str(url: &str) -> String {
    match Url::parse(url.trim()) {
        Ok(url) => redacted_url(&url),
        Err(_) => "<unparsable URL>".into(),
    }
}

/// A failed `send`: before any status was received.
fn send_error(err: reqwest::Error) -> ProviderError {
    // Only a connect timeout is configured on the client (the turn engine owns
    // every other clock), so any timeout here is the connect phase; an OS-level
    // ETIMEDOUT on connect is one too.
    if err.is_timeout() {
        return ProviderError::Timeout(TimeoutPhase::Connect);
    }
    ProviderError::Connect {
        detail: chain(&err.without_url()),
    }
}

/// An error and its sources, for logs. reqwest's errors carry the URL, which
/// callers strip with `without_url` first; the sources (hyper, io, rustls)
/// name the failure, not the request.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        let part = inner.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = inner.source();
    }
    text
}

/// Judge a non-2xx response: status, retry hint, and a safe label from the
/// first few KiB of the body (never the upstream's message text).
async fn judge_failure(mut response: reqwest::Response) -> ProviderError {
    let status = response.status();
    let retry_after = retry_after(response.headers(), SystemTime::now());
    let mut body = Vec::new();
    let read = async {
        while body.len() < ERROR_BODY_LIMIT {
            match response.chunk().await {
                Ok(Some(bytes)) => body.extend_from_slice(&bytes),
                _ => break,
            }
        }
    };
    // Timing out leaves what was read: often the whole (small) error body.
    let _ = tokio::time::timeout(ERROR_BODY_WAIT, read).await;
    body.truncate(ERROR_BODY_LIMIT);
    let reason = error_label(&body).unwrap_or_else(|| status_label(status));
    ProviderError::from_status(status.as_u16(), retry_after, reason)
}

/// `"not_found"` for 404, `"http_599"` for a status without a reason phrase:
/// the reason when the body had no usable label.
pub(crate) fn status_label(status: http::StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => reason.to_ascii_lowercase().replace([' ', '-'], "_"),
        None => format!("http_{}", status.as_u16()),
    }
}

/// What the upstream asked us to wait: `retry-after-ms` (float milliseconds,
/// OpenAI's and llmock's) wins over `retry-after` (seconds, or an HTTP date),
/// as in the OpenAI SDK. Unreadable or negative values count as absent; a
/// date in the past means "now".
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = header("retry-after-ms").and_then(|v| v.parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
        && let Ok(wait) = Duration::try_from_secs_f64(ms / 1000.0)
    {
        return Some(wait);
    }
    let value = header("retry-after")?;
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::try_from_secs_f64(secs).ok())
            .flatten();
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The upstream's error label from a JSON error body: `error.code`, else
/// `error.type`, else a top-level `code` / `type` (OpenAI:
/// `{"error":{"type":"invalid_request_error","code":"model_not_found"}}`;
/// Anthropic: `{"type":"error","error":{"type":"not_found_error"}}`).
/// `code` first because it is the more specific of the two where both exist.
/// Placeholders LiteLLM writes (`"None"`, a numeric code such as `"400"`) are
/// skipped. `None` when the body is not JSON or has no usable label.
pub(crate) fn error_label(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    label_of(&value)
}

/// As [`error_label`], on a parsed document (a body or an SSE `data:`).
pub(crate) fn label_of(value: &serde_json::Value) -> Option<String> {
    let nested = value.get("error").filter(|e| e.is_object());
    let candidates = [
        nested.and_then(|e| e.get("code")),
        nested.and_then(|e| e.get("type")),
        value.get("code"),
        value.get("type"),
    ];
    candidates
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_str)
        .filter(|s| *s != "error")
        .find_map(safe_label)
}

/// `s` when it is a short identifier ([A-Za-z0-9_.-], at most 64 chars, not
/// only digits, not a null placeholder). Anything else is refused whole
/// rather than filtered: a string with spaces is prose, i.e. message text.
pub(crate) fn safe_label(s: &str) -> Option<String> {
    let ok = !s.is_empty()
        && s.len() <= LABEL_MAX
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && !s.bytes().all(|b| b.is_ascii_digit())
        && !matches!(s, "None" | "none" | "null" | "NULL" | "undefined");
    ok.then(|| s.to_string())
}

/// A `serde_json` error without the input: its `Display` can quote the
/// offending value (`invalid type: string "..."`), which is upstream text.
pub(crate) fn json_error_detail(what: &str, err: &serde_json::Error) -> String {
    format!(
        "{what}: {:?} error at line {} column {}",
        err.classify(),
        err.line(),
        err.column()
    )
}

pub(crate) fn malformed(what: &str, err: &serde_json::Error) -> ProviderError {
    ProviderError::Malformed {
        detail: json_error_detail(what, err),
    }
}

/// Parse an event's `data` as `T`, as Malformed when it does not fit.
pub(crate) fn parse_data<'a, T: Deserialize<'a>>(
    what: &str,
    data: &'a str,
) -> Result<T, ProviderError> {
    serde_json::from_str(data).map_err(|err| malformed(what, &err))
}

/// What a wire format makes of one event.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Flow {
    /// More events are expected.
    Continue,
    /// The terminator (`[DONE]`, `message_stop`): the reply is complete.
    Done,
}

/// A provider's event grammar: one SSE event in, normalized chunks out.
pub(crate) trait WireFormat: Send + 'static {
    /// `event` is the SSE event name (`"message"` when the server sent none).
    /// Chunks pushed to `out` are yielded even when an error follows them.
    fn on_event(
        &mut self,
        event: &str,
        data: &str,
        out: &mut Vec<Chunk>,
    ) -> Result<Flow, ProviderError>;
}

/// Why the byte stream under the SSE parser failed.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// The connection failed mid-body (detail already free of the URL).
    Transport(String),
    /// A line longer than [`MAX_LINE`].
    LineTooLong,
}

/// The body of a successful response as the decoder takes it.
pub(crate) fn body_bytes(
    response: reqwest::Response,
) -> impl Stream<Item = Result<Bytes, String>> + Send + 'static {
    response
        .bytes_stream()
        .map(|item| item.map_err(|err| chain(&err.without_url())))
}

/// Decode an SSE body with `wire`. The stream ends after the terminator (the
/// rest of the body is not read: dropping it closes the connection); a body
/// that ends, or breaks, before it yields [`ProviderError::Truncated`]; after
/// any error the stream ends. Nothing is spawned: the body is read only when
/// the consumer polls, and dropping the stream drops the response.
///
/// A transport error mid-body is reported as `Truncated`, not `Connect`: the
/// upstream accepted the request and may have produced (and billed) part of
/// the reply, so it is a reply cut short, not an upstream that could not be
/// reached. The turn engine may still choose to retry a `Truncated` that came
/// before the first token. The transport detail goes to the debug log.
pub(crate) fn decode_sse<S, W>(body: S, wire: W) -> ChunkStream
where
    S: Stream<Item = Result<Bytes, String>> + Send + 'static,
    W: WireFormat,
{
    let mut line_len = 0usize;
    // Boxed: the SSE parser wants an `Unpin` source; one allocation a reply.
    let guarded = body.boxed().map(move |item| {
        let bytes = item.map_err(BodyError::Transport)?;
        match bytes.iter().rposition(|&b| b == b'\n' || b == b'\r') {
            Some(i) => line_len = bytes.len() - i - 1,
            None => line_len += bytes.len(),
        }
        if line_len > MAX_LINE {
            return Err(BodyError::LineTooLong);
        }
        Ok(bytes)
    });
    let state = Decoder {
        events: guarded.eventsource(),
        wire,
        queue: VecDeque::new(),
        ended: false,
    };
    futures::stream::unfold(state, |mut d| async move {
        loop {
            if let Some(item) = d.queue.pop_front() {
                return Some((item, d));
            }
            if d.ended {
                // Dropping `d` here drops the response body.
                return None;
            }
            d.ended = true;
            match d.events.next().await {
                Some(Ok(event)) => {
                    let mut out = Vec::new();
                    let flow = d.wire.on_event(&event.event, &event.data, &mut out);
                    d.queue.extend(out.into_iter().map(Ok));
                    match flow {
                        Ok(Flow::Continue) => d.ended = false,
                        Ok(Flow::Done) => {}
                        Err(err) => d.queue.push_back(Err(err)),
                    }
                }
                Some(Err(err)) => d.queue.push_back(Err(stream_error(err))),
                None => d.queue.push_back(Err(ProviderError::Truncated)),
            }
        }
    })
    .boxed()
}

struct Decoder<E, W> {
    events: E,
    wire: W,
    queue: VecDeque<Result<Chunk, ProviderError>>,
    ended: bool,
}

fn stream_error(err: EventStreamError<BodyError>) -> ProviderError {
    match err {
        EventStreamError::Transport(BodyError::Transport(detail)) => {
            tracing::debug!(%detail, "model stream broke mid-body");
            ProviderError::Truncated
        }
        EventStreamError::Transport(BodyError::LineTooLong) => ProviderError::Malformed {
            detail: format!("an event-stream line longer than {MAX_LINE} bytes"),
        },
        EventStreamError::Utf8(_) => ProviderError::Malformed {
            detail: "the event stream is not UTF-8".into(),
        },
        // The parser's error holds the unparsed input: not kept.
        EventStreamError::Parser(_) => ProviderError::Malformed {
            detail: "the event stream could not be parsed".into(),
        },
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers for the wire-format tests of `openai` and `anthropic`.

    use super::*;

    /// Decode `pieces` (as if each arrived as one read) to completion.
    pub(crate) fn decode_pieces<W: WireFormat>(
        pieces: Vec<Vec<u8>>,
        wire: W,
    ) -> Vec<Result<Chunk, ProviderError>> {
        let body = futures::stream::iter(pieces.into_iter().map(|p| Ok(Bytes::from(p))));
        futures::executor::block_on(decode_sse(body, wire).collect())
    }

    /// Decode `bytes` whole, and split in two at every byte position,
    /// asserting every split gives the same chunks; returns them.
    pub(crate) fn decode_all_splits<W: WireFormat>(
        bytes: &[u8],
        wire: impl Fn() -> W,
    ) -> Vec<Result<Chunk, ProviderError>> {
        let whole = decode_pieces(vec![bytes.to_vec()], wire());
        for at in 0..=bytes.len() {
            let (a, b) = bytes.split_at(at);
            let split = decode_pieces(vec![a.to_vec(), b.to_vec()], wire());
            assert_eq!(split, whole, "split at byte {at}");
        }
        // And one byte per read, the worst case for a line buffer.
        let bytewise = decode_pieces(bytes.iter().map(|b| vec![*b]).collect(), wire());
        assert_eq!(bytewise, whole, "one byte per read");
        whole
    }

    /// The text of all deltas, and the other chunks in order.
    pub(crate) fn text_of(chunks: &[Result<Chunk, ProviderError>]) -> String {
        chunks
            .iter()
            .filter_map(|c| match c {
                Ok(Chunk::Delta(d)) => Some(d.as_str()),
                _ => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    /// A wire format that yields each `data` as a delta, `end` as the terminator.
    struct Echo;
    impl WireFormat for Echo {
        fn on_event(
            &mut self,
            event: &str,
            data: &str,
            out: &mut Vec<Chunk>,
        ) -> Result<Flow, ProviderError> {
            if data == "end" {
                return Ok(Flow::Done);
            }
            if event == "fail" {
                out.push(Chunk::Delta("before".into()));
                return Err(ProviderError::Upstream { kind: "x".into() });
            }
            out.push(Chunk::Delta(data.to_string()));
            Ok(Flow::Continue)
        }
    }

    #[test]
    fn crlf_utf8_and_splits_decode_the_same() {
        let body = "data: caf\u{e9} \u{2615}\r\n\r\n: comment\r\n\r\ndata: two\r\ndata: lines\r\n\r\ndata: end\r\n\r\n";
        let chunks = decode_all_splits(body.as_bytes(), || Echo);
        assert_eq!(
            chunks,
            vec![
                Ok(Chunk::Delta("caf\u{e9} \u{2615}".into())),
                Ok(Chunk::Delta("two\nlines".into())),
            ]
        );
    }

    #[test]
    fn body_without_terminator_is_truncated() {
        let chunks = decode_all_splits(b"data: a\n\ndata: b\n\n", || Echo);
        assert_eq!(chunks.last(), Some(&Err(ProviderError::Truncated)));
        assert_eq!(text_of(&chunks), "ab");
        // An event not closed by a blank line is not dispatched (SSE spec).
        let chunks = decode_pieces(vec![b"data: a\n\ndata: end\n".to_vec()], Echo);
        assert_eq!(chunks.last(), Some(&Err(ProviderError::Truncated)));
    }

    #[test]
    fn nothing_is_read_after_the_terminator_or_an_error() {
        let chunks = decode_pieces(vec![b"data: a\n\ndata: end\n\ndata: b\n\n".to_vec()], Echo);
        assert_eq!(chunks, vec![Ok(Chunk::Delta("a".into()))]);
        let chunks = decode_pieces(
            vec![b"event: fail\ndata: x\n\ndata: b\n\ndata: end\n\n".to_vec()],
            Echo,
        );
        assert_eq!(
            chunks,
            vec![
                Ok(Chunk::Delta("before".into())),
                Err(ProviderError::Upstream { kind: "x".into() })
            ]
        );
    }

    #[test]
    fn transport_error_mid_body_is_truncated() {
        let body = futures::stream::iter(vec![
            Ok(Bytes::from_static(b"data: a\n\n")),
            Err("connection reset".to_string()),
        ]);
        let chunks: Vec<_> = futures::executor::block_on(decode_sse(body, Echo).collect());
        assert_eq!(
            chunks,
            vec![Ok(Chunk::Delta("a".into())), Err(ProviderError::Truncated)]
        );
    }

    #[test]
    fn invalid_utf8_and_endless_lines_are_malformed() {
        let chunks = decode_pieces(vec![b"data: \xff\xfe\n\n".to_vec()], Echo);
        assert!(matches!(
            chunks.last(),
            Some(Err(ProviderError::Malformed { .. }))
        ));
        let long = vec![b'x'; MAX_LINE / 4];
        let mut pieces = vec![b"data: ".to_vec()];
        pieces.extend(std::iter::repeat_n(long, 5));
        let chunks = decode_pieces(pieces, Echo);
        assert!(matches!(
            chunks.as_slice(),
            [Err(ProviderError::Malformed { detail })] if detail.contains("longer")
        ));
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    #[test]
    fn retry_after_headers_parse() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let ms = |v: &str| retry_after(&headers(&[("retry-after-ms", v)]), now);
        let secs = |v: &str| retry_after(&headers(&[("retry-after", v)]), now);
        assert_eq!(ms("1500"), Some(Duration::from_millis(1500)));
        assert_eq!(ms("250.5"), Some(Duration::from_micros(250_500)));
        assert_eq!(ms("-1"), None);
        assert_eq!(ms("NaN"), None);
        assert_eq!(ms("soon"), None);
        assert_eq!(secs("2"), Some(Duration::from_secs(2)));
        assert_eq!(secs(" 0 "), Some(Duration::ZERO));
        assert_eq!(secs("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(secs("-3"), None);
        assert_eq!(secs("1e400"), None);
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(secs(&date), Some(Duration::from_secs(30)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(secs(&past), Some(Duration::ZERO));
        assert_eq!(secs("Sunday, 06-Nov-94 08:49:37 GMT"), Some(Duration::ZERO));
        assert_eq!(secs("tomorrow"), None);
        // Both: the millisecond header wins; an unreadable one falls back.
        let both = headers(&[("retry-after-ms", "1000"), ("retry-after", "1")]);
        assert_eq!(retry_after(&both, now), Some(Duration::from_millis(1000)));
        let bad_ms = headers(&[("retry-after-ms", "x"), ("retry-after", "4")]);
        assert_eq!(retry_after(&bad_ms, now), Some(Duration::from_secs(4)));
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn error_labels_are_short_safe_identifiers() {
        let label = |body: &str| error_label(body.as_bytes());
        // llmock's OpenAI and Anthropic 429 bodies, captured.
        assert_eq!(
            label(
                r#"{"error":{"message":"Rate limit exceeded.","type":"rate_limit_error","param":null,"code":"rate_limit_exceeded"}}"#
            ),
            Some("rate_limit_exceeded".into())
        );
        assert_eq!(
            label(
                r#"{"type":"error","error":{"type":"rate_limit_error","message":"Rate limit exceeded."}}"#
            ),
            Some("rate_limit_error".into())
        );
        // LiteLLM's placeholders fall through to the next candidate.
        assert_eq!(
            label(r#"{"error":{"message":"m","type":"None","param":"None","code":"400"}}"#),
            None
        );
        assert_eq!(
            label(r#"{"error":{"message":"m","type":"invalid_request_error","code":"400"}}"#),
            Some("invalid_request_error".into())
        );
        // Ollama's error string is message text: not kept.
        assert_eq!(label(r#"{"error":"model 'x' not found"}"#), None);
        assert_eq!(label(r#"{"error":{"type":"has spaces in it"}}"#), None);
        assert_eq!(
            label(&format!(r#"{{"error":{{"type":"{}"}}}}"#, "a".repeat(65))),
            None
        );
        assert_eq!(label(r#"{"error":{"type":"caf\u00e9"}}"#), None);
        assert_eq!(label("<html>502 Bad Gateway</html>"), None);
        assert_eq!(label(""), None);
        assert_eq!(status_label(http::StatusCode::NOT_FOUND), "not_found");
        assert_eq!(
            status_label(http::StatusCode::from_u16(599).unwrap()),
            "http_599"
        );
    }

    #[test]
    fn endpoints_append_paths_and_urls_are_shown_without_secrets() {
        let url = endpoint("http://127.0.0.1:8000/v1/", &["chat", "completions"]).unwrap();
        assert_eq!(url.as_str(), "http://127.0.0.1:8000/v1/chat/completions");
        let url = endpoint(
            "https://gw.example/v1?api-version=2",
            &["chat", "completions"],
        )
        .unwrap();
        assert_eq!(
            url.as_str(),
            "https://gw.example/v1/chat/completions?api-version=2"
        );
        let url = endpoint(
            "https://user:pw@gw.example/x?key=sk-123",
            &["v1", "messages"],
        )
        .unwrap();
        assert_eq!(redacted_url(&url), "https://gw.example/x/v1/messages");
        for bad in ["ftp://x/v1", "not a url", "http://", "unix:/tmp/s"] {
            let err = endpoint(bad, &["v1"]).unwrap_err();
            assert!(err.starts_with("bad base_url"), "{bad}: {err}");
        }
        let err = endpoint("http://u:secret@[::1", &[]).unwrap_err();
        assert!(!err.contains("secret"), "{err}");
    }

    #[test]
    fn config_debug_hides_the_key() {
        let config = HttpProviderConfig {
            base_url: "https://user:hunter2@api.example/v1?key=sk-query".into(),
            api_key: Some("sk-secret-key".into()),
            connect_timeout: Duration::from_secs(5),
        };
        let shown = format!("{config:?}");
        for secret in ["sk-secret-key", "hunter2", "sk-query"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("api.example"));
    }

    #[tokio::test]
    async fn refused_connection_is_connect_without_the_url() {
        // A port nobody listens on: bind one, learn it, close it.
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let config = HttpProviderConfig {
            base_url: format!("http://user:pw-secret@127.0.0.1:{port}/v1?k=q-secret"),
            api_key: Some("sk-secret".into()),
            connect_timeout: Duration::from_secs(5),
        };
        let url = endpoint(&config.base_url, &["chat", "completions"]).unwrap();
        let upstream = Upstream::new(
            &config,
            url,
            |key| (http::header::AUTHORIZATION, format!("Bearer {key}")),
            HeaderMap::new(),
        )
        .unwrap();
        let err = upstream.post(&serde_json::json!({})).await.unwrap_err();
        let ProviderError::Connect { detail } = &err else {
            panic!("{err:?}");
        };
        assert!(!detail.contains("secret"), "{detail}");
        assert!(!format!("{upstream:?}").contains("secret"));
    }

    #[tokio::test]
    async fn connect_timeout_is_the_connect_phase() {
        // A listener that never accepts, its accept queue filled: further
        // SYNs are dropped, so a connect hangs until the timeout. (An
        // "unroutable" address is not: this network answers them.)
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut held = Vec::new();
        loop {
            let attempt = tokio::net::TcpStream::connect(addr);
            match tokio::time::timeout(Duration::from_millis(200), attempt).await {
                Ok(stream) => held.push(stream.unwrap()),
                Err(_) => break,
            }
            assert!(held.len() < 64, "the accept queue never filled");
        }
        let config = HttpProviderConfig {
            base_url: format!("http://{addr}/v1"),
            api_key: None,
            connect_timeout: Duration::from_millis(300),
        };
        let url = endpoint(&config.base_url, &["chat", "completions"]).unwrap();
        let upstream = Upstream::new(&config, url, |_| unreachable!(), HeaderMap::new()).unwrap();
        let started = std::time::Instant::now();
        let err = upstream.post(&serde_json::json!({})).await.unwrap_err();
        assert_eq!(err, ProviderError::Timeout(TimeoutPhase::Connect));
        assert!(started.elapsed() < Duration::from_secs(3));
        drop((held, listener));
    }
}
