//! HTTP/1.1 connections, served through hyper directly rather than
//! `axum::serve`, for what `axum::serve` has no hooks for (issue #14):
//!
//! - Timeouts. A connection with no request in progress is closed after
//!   `HTTP_IDLE_TIMEOUT_MS` (keep-alive, or a client that connects and sends
//!   nothing); a request head (request line and headers) must arrive within
//!   `HTTP_HEADER_TIMEOUT_MS` of its first byte, or the client gets 408 and
//!   the connection closes. (The body's deadline, `HTTP_BODY_TIMEOUT_MS`, is
//!   [`crate::middleware::read_body`], where the route is known.) Both are
//!   enforced in [`GuardedIo`], the socket wrapper hyper reads from: it knows
//!   from [`ConnState`] whether a request is being served.
//! - Errors hyper answers by itself, before any router runs (malformed
//!   request line or header, 414, 431): hyper writes a bare head with an
//!   empty body. [`GuardedIo`] recognises that head — the only bytes hyper
//!   ever writes while no request is in progress — and writes SPEC's JSON
//!   error instead, with an `X-Request-ID`, one log line and the HTTP
//!   metrics (`route="unmatched"`).
//! - Half-closed clients: a client that shuts down its write side after a
//!   complete request still gets its answer, while one that closed its
//!   socket is still noticed (and its request dropped, status 499): see
//!   [`GuardedIo::poll_after_eof`].
//! - A lingering close: after its last byte the server reads and drops what
//!   the client still sends for a while, so that a refusal made before the
//!   body was read is not lost to a reset ([`LINGER_FOR`]).
//! - The peer address as `ConnectInfo` (the failed-auth budget is keyed by
//!   it), `TCP_NODELAY`, and graceful shutdown: stop accepting, let every
//!   connection finish its request in progress, close idle ones at once.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, Version};
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::field::Empty;

use crate::metrics::{HttpLabels, Metrics, UNMATCHED_ROUTE};

/// The connection-level deadlines (see the module docs).
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub header: Duration,
    pub idle: Duration,
}

/// Serve `router` on `listener` until `stop_accepting` resolves; then stop
/// accepting, let each connection finish the request it is serving (idle
/// ones close at once) and return when all are closed. Cancelling `abort`
/// drops every connection still open.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    metrics: Arc<Metrics>,
    timeouts: Timeouts,
    stop_accepting: impl Future<Output = ()>,
    abort: CancellationToken,
) {
    let mut http = http1::Builder::new();
    // Not hyper's `half_close`: with it, hyper stops reading while a
    // request is in progress and never notices a client that went away.
    // GuardedIo keeps an end of stream from hyper until the request is
    // done instead, and tells the two kinds of client apart.
    http.half_close(false)
        .keep_alive(true)
        // Bounds what hyper buffers for an incomplete head; the exact
        // limit is MAX_HEADER_BYTES, checked once the head is parsed.
        .max_buf_size(HYPER_MAX_BUF)
        // Enforced by GuardedIo instead, which tells idle from reading.
        .header_read_timeout(None);
    let http = Arc::new(http);
    let drain = CancellationToken::new();
    let connections = TaskTracker::new();
    let mut stop_accepting = pin!(stop_accepting);
    loop {
        let accepted = tokio::select! {
            _ = &mut stop_accepting => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) if is_per_connection(&err) => continue,
            Err(err) => {
                // Out of file descriptors, typically: back off instead of
                // spinning; connections already open keep being served.
                tracing::error!(error = %err, "cannot accept connections; retrying in 1 s");
                tokio::select! {
                    _ = &mut stop_accepting => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        // Each token is a small write that must leave at once: without
        // TCP_NODELAY, Nagle holds it until the client's delayed ACK (~40 ms).
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(error = %err, "could not set TCP_NODELAY");
        }
        connections.spawn(serve_connection(
            tcp,
            peer,
            http.clone(),
            router.clone(),
            metrics.clone(),
            timeouts,
            drain.clone(),
            abort.clone(),
        ));
    }
    drop(listener);
    drain.cancel();
    connections.close();
    connections.wait().await;
}

/// Errors of one pending connection (it was reset before we accepted it),
/// not of the listener.
fn is_per_connection(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

#[allow(clippy::too_many_arguments)]
async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    http: Arc<http1::Builder>,
    router: axum::Router,
    metrics: Arc<Metrics>,
    timeouts: Timeouts,
    drain: CancellationToken,
    abort: CancellationToken,
) {
    let state = Arc::new(ConnState::new());
    let service_metrics = metrics.clone();
    let io = GuardedIo::new(tcp, state.clone(), timeouts, metrics);
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let router = router.clone();
        // When the head started: read before the guard marks the request
        // as being served, and only for a refusal (it takes the state's lock).
        let too_large = (header_bytes(req.headers()) > MAX_HEADER_BYTES).then(|| state.head().1);
        let guard = RequestGuard::start(state.clone(), req.version() == Version::HTTP_11);
        let refused = too_large.map(|started| {
            let method = crate::middleware::method_label(req.method());
            rejection_response(
                &service_metrics,
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                method,
                started,
            )
        });
        let mut req = req.map(Body::new);
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        async move {
            let response = match refused {
                Some(response) => response,
                None => match router.oneshot(req).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                },
            };
            Ok::<_, Infallible>(response.map(|body| TrackedBody {
                inner: body,
                _guard: guard,
            }))
        }
    });
    let connection = http.serve_connection(TokioIo::new(io), service);
    let mut connection = pin!(connection);
    let mut draining = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(error = %err, "connection ended with an error");
                }
                break;
            }
            _ = drain.cancelled(), if !draining => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
            _ = abort.cancelled() => break,
        }
    }
}

// ------------------------------------------------------------ connection state

/// What the connection is doing, shared by its socket wrapper (which reads
/// and enforces the deadlines) and its service (which knows when a request
/// starts and when its response has been written).
enum Phase {
    /// No request in progress since `since` (the accept, or the end of the
    /// last response).
    Idle { since: Instant },
    /// The first bytes of a request head arrived at `since`; `start` holds
    /// its first bytes (for the method label of a rejection).
    Head {
        since: Instant,
        start: [u8; 16],
        len: usize,
    },
    /// A request is with the router, or its response is being written.
    Busy,
}

struct Shared {
    phase: Phase,
    /// The task reading the socket: woken when the connection turns idle,
    /// so that the idle deadline is armed even if no byte arrives.
    reader: Option<Waker>,
    /// Requests started on this connection (numbers them).
    requests: u64,
    /// The request in progress is HTTP/1.1: interim (1xx) responses are allowed.
    http11: bool,
}

struct ConnState(Mutex<Shared>);

impl ConnState {
    fn new() -> Self {
        ConnState(Mutex::new(Shared {
            phase: Phase::Idle {
                since: Instant::now(),
            },
            reader: None,
            requests: 0,
            http11: false,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn bytes_arrived(&self, bytes: &[u8]) {
        let mut shared = self.lock();
        if let Phase::Idle { .. } = shared.phase {
            let mut start = [0u8; 16];
            let len = bytes.len().min(start.len());
            start[..len].copy_from_slice(&bytes[..len]);
            shared.phase = Phase::Head {
                since: Instant::now(),
                start,
                len,
            };
        }
    }

    fn is_busy(&self) -> bool {
        matches!(self.lock().phase, Phase::Busy)
    }

    /// The method (as a metrics label) and start of the head being read.
    fn head(&self) -> (&'static str, Instant) {
        match &self.lock().phase {
            Phase::Head { since, start, len } => {
                let token = start[..*len].split(|b| *b == b' ').next().unwrap_or(&[]);
                let method = Method::from_bytes(token)
                    .map(|m| crate::middleware::method_label(&m))
                    .unwrap_or("OTHER");
                (method, *since)
            }
            _ => ("OTHER", Instant::now()),
        }
    }
}

/// One request being served: the connection is busy until the guard (moved
/// into the response body) is dropped, i.e. until hyper has sent the whole
/// response or given up on it. HTTP/1 serves one request at a time.
struct RequestGuard(Arc<ConnState>);

impl RequestGuard {
    fn start(state: Arc<ConnState>, http11: bool) -> Self {
        {
            let mut shared = state.lock();
            shared.phase = Phase::Busy;
            shared.requests += 1;
            shared.http11 = http11;
        }
        RequestGuard(state)
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let reader = {
            let mut shared = self.0.lock();
            shared.phase = Phase::Idle {
                since: Instant::now(),
            };
            shared.reader.take()
        };
        if let Some(reader) = reader {
            reader.wake();
        }
    }
}

/// The router's response body, holding the request's [`RequestGuard`].
struct TrackedBody {
    inner: Body,
    _guard: RequestGuard,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

// ------------------------------------------------------------- socket wrapper

/// The TCP stream as hyper sees it: enforces the idle and header deadlines
/// on reads, and replaces hyper's bare automatic error responses on writes.
struct GuardedIo {
    tcp: TcpStream,
    state: Arc<ConnState>,
    timeouts: Timeouts,
    metrics: Arc<Metrics>,
    timer: Pin<Box<Sleep>>,
    armed_for: Option<Instant>,
    /// Bytes of our own to send before anything else (a JSON rejection).
    out: Vec<u8>,
    out_sent: usize,
    /// A rejection was written: the connection is closing.
    rejected: bool,
    /// A deadline passed: reads report end of stream from now on.
    timed_out: bool,
    /// The client's end of stream was read while a request was in progress.
    peer_eof: bool,
    /// The request for which hyper has written response bytes.
    responding_to: u64,
    /// When the next end-of-stream probe is due, and how many were sent.
    probe_at: Option<Instant>,
    probes: u32,
    /// The lingering close in progress ([`GuardedIo::poll_linger`]).
    linger: Option<Linger>,
}

/// What a lingering close may still read and drop: until when, and how many
/// bytes.
struct Linger {
    until: Instant,
    left: usize,
}

/// After its last byte the server closes its side, then reads and drops
/// what the client still sends, for at most this long and this many bytes,
/// before it closes the socket. A socket closed with bytes unread, or that
/// gets bytes after it closed, answers them with a reset: a client still
/// sending a body the server refused without reading (at capacity, over the
/// size limit, too slow) would see its write fail, and many clients then
/// report the reset instead of reading the refusal. Enough for the largest
/// body a route accepts (`OPENAI_MAX_BODY_BYTES`, 1 MiB by default) and a
/// client on a slow link; a client that sends more, or longer, gets the reset.
const LINGER_FOR: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 2 * 1024 * 1024;

impl GuardedIo {
    fn new(
        tcp: TcpStream,
        state: Arc<ConnState>,
        timeouts: Timeouts,
        metrics: Arc<Metrics>,
    ) -> Self {
        GuardedIo {
            tcp,
            state,
            timeouts,
            metrics,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed_for: None,
            out: Vec::new(),
            out_sent: 0,
            rejected: false,
            timed_out: false,
            peer_eof: false,
            responding_to: 0,
            probe_at: None,
            probes: 0,
            linger: None,
        }
    }

    /// Write what is left of `out`.
    fn poll_send_own(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_sent < self.out.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.out[self.out_sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_sent += n;
        }
        Poll::Ready(Ok(()))
    }

    fn reject(&mut self, status: StatusCode, cx: &mut Context<'_>) {
        let (method, started) = self.state.head();
        self.out = rejection(&self.metrics, status, method, started);
        self.out_sent = 0;
        self.rejected = true;
        // The socket's send buffer is empty (no request is in progress), so
        // this normally completes at once; what does not is sent on flush.
        if let Poll::Ready(Err(err)) = self.poll_send_own(cx) {
            tracing::debug!(error = %err, "could not send a rejection");
        }
    }
}

impl GuardedIo {
    /// Read and drop what the client still sends until it ends its stream,
    /// [`LINGER_BYTES`] were dropped, or [`LINGER_FOR`] passed (see there);
    /// then count how it ended (`http_lingering_closes_total`).
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let GuardedIo {
            tcp,
            timer,
            armed_for,
            linger,
            metrics,
            ..
        } = self;
        let Some(linger) = linger else {
            return Poll::Ready(());
        };
        let mut scratch = [0u8; 8192];
        let ended = loop {
            if linger.left == 0 {
                break "bytes";
            }
            let mut dropped = ReadBuf::new(&mut scratch);
            match Pin::new(&mut *tcp).poll_read(cx, &mut dropped) {
                Poll::Ready(Ok(())) if dropped.filled().is_empty() => break "client",
                Poll::Ready(Ok(())) => {
                    linger.left = linger.left.saturating_sub(dropped.filled().len());
                }
                Poll::Ready(Err(_)) => break "error",
                Poll::Pending => {
                    if *armed_for != Some(linger.until) {
                        timer.as_mut().reset(linger.until);
                        *armed_for = Some(linger.until);
                    }
                    ready!(timer.as_mut().poll(cx));
                    break "time";
                }
            }
        };
        if ended != "client" {
            tracing::debug!(
                ended,
                "closing a connection whose client may still be sending"
            );
        }
        metrics
            .lingering_closes
            .get_or_create(&crate::metrics::ReasonLabels { reason: ended })
            .inc();
        Poll::Ready(())
    }
}

/// An interim response: legal before any final one of an HTTP/1.1 request,
/// ignored by clients (RFC 9110 §15.2), and the only bytes that can tell a
/// client that closed its socket from one that only shut down its write side.
const PROBE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

impl GuardedIo {
    /// The client ended its stream while a request is in progress. That is
    /// either a half-close (it waits for the answer) or a client that went
    /// away; both look the same until something is written. So hyper is not
    /// told yet (it would drop the request); while no byte of the response
    /// has been written, an interim `100 Continue` is sent now and then: a
    /// client that closed its socket answers it with a reset, which ends the
    /// connection (and the request, logged with status 499). Once the
    /// request is done, hyper gets the end of stream and closes.
    fn poll_after_eof(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let can_probe = {
            let mut shared = self.state.lock();
            if !shared
                .reader
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                shared.reader = Some(cx.waker().clone());
            }
            match shared.phase {
                Phase::Busy => shared.http11 && self.responding_to != shared.requests,
                _ => return Poll::Ready(Ok(())),
            }
        };
        if !can_probe {
            // Woken when the request finishes.
            return Poll::Pending;
        }
        loop {
            if let Some(at) = self.probe_at {
                if self.armed_for != Some(at) {
                    self.timer.as_mut().reset(at);
                    self.armed_for = Some(at);
                }
                if self.timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                // After a reset, reading reports it.
                let mut scratch = [0u8; 1];
                let mut probe_read = ReadBuf::new(&mut scratch);
                if let Poll::Ready(Err(err)) =
                    Pin::new(&mut self.tcp).poll_read(cx, &mut probe_read)
                {
                    tracing::debug!(error = %err, "the client closed its connection during the request");
                    return Poll::Ready(Err(err));
                }
            }
            self.out = PROBE.to_vec();
            self.out_sent = 0;
            if let Poll::Ready(Err(err)) = self.poll_send_own(cx) {
                return Poll::Ready(Err(err));
            }
            // The first answer comes within a round trip; later probes are
            // for clients that leave while waiting.
            let wait = if self.probes == 0 { 100 } else { 1000 };
            self.probes += 1;
            self.probe_at = Some(Instant::now() + Duration::from_millis(wait));
        }
    }
}

impl AsyncRead for GuardedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.timed_out {
            return Poll::Ready(Ok(()));
        }
        if this.peer_eof {
            return this.poll_after_eof(cx);
        }
        let before = buf.filled().len();
        let room = buf.remaining() > 0;
        match Pin::new(&mut this.tcp).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                if !new.is_empty() {
                    this.state.bytes_arrived(new);
                } else if room && this.state.is_busy() {
                    this.peer_eof = true;
                    return this.poll_after_eof(cx);
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
            Poll::Pending => {}
        }
        // Nothing to read: is a deadline running?
        let (deadline, reading_head) = {
            let mut shared = this.state.lock();
            if !shared
                .reader
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                shared.reader = Some(cx.waker().clone());
            }
            match shared.phase {
                Phase::Idle { since } => (since + this.timeouts.idle, false),
                Phase::Head { since, .. } => (since + this.timeouts.header, true),
                Phase::Busy => return Poll::Pending,
            }
        };
        if this.armed_for != Some(deadline) {
            this.timer.as_mut().reset(deadline);
            this.armed_for = Some(deadline);
        }
        if this.timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.timed_out = true;
        if reading_head {
            this.reject(StatusCode::REQUEST_TIMEOUT, cx);
            let _ = Pin::new(&mut this.tcp).poll_shutdown(cx);
            Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head not received in time",
            )))
        } else {
            tracing::debug!("closing a connection idle for HTTP_IDLE_TIMEOUT_MS");
            // End of stream: hyper closes an idle connection quietly.
            Poll::Ready(Ok(()))
        }
    }
}

impl AsyncWrite for GuardedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_send_own(cx))?;
        {
            let shared = this.state.lock();
            if let Phase::Busy = shared.phase {
                this.responding_to = shared.requests;
            }
        }
        if !this.rejected
            && let Some(status) = automatic_error_status(buf)
            && !this.state.is_busy()
        {
            this.reject(status, cx);
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut this.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // While no request is in progress, a write that holds one of
        // hyper's automatic errors goes one buffer at a time through
        // poll_write, which replaces it. Anything else — the end of a
        // response whose body finished, i.e. of every stream (its last
        // event, the chunk's CRLF, the terminating chunk) — stays one
        // vectored write, not one syscall per buffer.
        let own_pending = self.out_sent < self.out.len();
        if own_pending
            || !self.rejected
                && bufs.iter().any(|b| automatic_error_status(b).is_some())
                && !self.state.is_busy()
        {
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &**b);
            return self.poll_write(cx, first);
        }
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send_own(cx))?;
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    /// Our side first (the client reads the whole answer, then the end of
    /// stream), then the lingering close ([`GuardedIo::poll_linger`]).
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send_own(cx))?;
        let this = &mut *self;
        if this.linger.is_none() {
            ready!(Pin::new(&mut this.tcp).poll_shutdown(cx))?;
            if this.peer_eof {
                // The client already ended its stream: nothing can follow.
                return Poll::Ready(Ok(()));
            }
            this.linger = Some(Linger {
                until: Instant::now() + LINGER_FOR,
                left: LINGER_BYTES,
            });
        }
        this.poll_linger(cx).map(Ok)
    }
}

// ----------------------------------------------------------------- rejections

/// The most header bytes (names, values and their `": "`/CRLF framing, the
/// request line not included) a request may send; more is 431. hyper's own
/// bound is where its buffer fills before the head is complete, which
/// depends on how the bytes arrive (one read of 500 KB parses), so the
/// limit is checked on the parsed head instead.
pub const MAX_HEADER_BYTES: usize = 128 * 1024;

/// hyper's buffer for an incomplete head: the header limit, a URI at
/// hyper's own 64 KB limit (414) and room for the request line. A head that
/// fills it is over MAX_HEADER_BYTES, so hyper's 431 and ours agree.
const HYPER_MAX_BUF: usize = MAX_HEADER_BYTES + 64 * 1024 + 8 * 1024;

fn header_bytes(headers: &axum::http::HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

/// The status of `buf` if it is the head hyper writes by itself for a
/// request it could not parse: a 4xx with an empty body, nothing else.
fn automatic_error_status(buf: &[u8]) -> Option<StatusCode> {
    if buf.len() > 512 || !buf.ends_with(b"\r\n\r\n") {
        return None;
    }
    let rest = buf
        .strip_prefix(b"HTTP/1.1 ")
        .or_else(|| buf.strip_prefix(b"HTTP/1.0 "))?;
    let status = StatusCode::from_bytes(rest.get(..3)?).ok()?;
    let head = std::str::from_utf8(buf).ok()?.to_ascii_lowercase();
    (status.is_client_error() && head.contains("\r\ncontent-length: 0\r\n")).then_some(status)
}

fn rejection_message(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "The request line or a header is malformed",
        StatusCode::REQUEST_TIMEOUT => "The request headers were not received in time",
        StatusCode::URI_TOO_LONG => "The request URI is too long",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "The request headers are too large",
        StatusCode::PAYLOAD_TOO_LARGE => "Request body is too large",
        _ => status.canonical_reason().unwrap_or("Request refused"),
    }
}

/// A whole `Connection: close` response in SPEC's JSON error shape for a
/// request refused before routing, counted in the HTTP metrics as
/// `route="unmatched"` and logged like any finished request.
fn rejection(
    metrics: &Metrics,
    status: StatusCode,
    method: &'static str,
    started: Instant,
) -> Vec<u8> {
    let (request_id, body) = record_rejection(metrics, status, method, started);
    let reason = status.canonical_reason().unwrap_or("Error");
    let date = chrono::Utc::now().format("%a, %d %b %Y %H:%M:%S GMT");
    format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         x-request-id: {request_id}\r\nx-content-type-options: nosniff\r\n\
         connection: close\r\ndate: {date}\r\n\r\n{body}",
        status.as_u16(),
        body.len(),
    )
    .into_bytes()
}

/// The same refusal as [`rejection`] for a request hyper did parse but
/// that is refused before routing (headers over [`MAX_HEADER_BYTES`]), as a
/// response hyper writes; `Connection: close` makes hyper close after it.
fn rejection_response(
    metrics: &Metrics,
    status: StatusCode,
    method: &'static str,
    started: Instant,
) -> axum::response::Response {
    let (request_id, body) = record_rejection(metrics, status, method, started);
    let mut response = axum::response::Response::new(Body::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    headers.insert(
        axum::http::header::X_CONTENT_TYPE_OPTIONS,
        axum::http::HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    if let Ok(id) = axum::http::HeaderValue::from_str(&request_id) {
        headers.insert("x-request-id", id);
    }
    response
}

/// Count and log a refusal made before routing; its request id and body.
fn record_rejection(
    metrics: &Metrics,
    status: StatusCode,
    method: &'static str,
    started: Instant,
) -> (String, String) {
    let request_id = uuid::Uuid::new_v4().to_string();
    let reason = status.canonical_reason().unwrap_or("Error");
    let message = rejection_message(status);
    let body = serde_json::to_string(&crate::wire::ErrorJson {
        error: reason,
        message,
    })
    .unwrap_or_default();
    let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    let labels = HttpLabels {
        method: method.to_owned(),
        route: UNMATCHED_ROUTE.to_owned(),
        status_code: status.as_u16().to_string(),
    };
    metrics.http_requests.get_or_create(&labels).inc();
    metrics
        .http_duration
        .get_or_create(&labels)
        .observe(duration_ms);
    let span =
        tracing::info_span!("request", requestId = %request_id, orgId = Empty, userId = Empty);
    span.in_scope(|| {
        tracing::info!(
            method,
            route = UNMATCHED_ROUTE,
            status = status.as_u16(),
            duration = (duration_ms * 1000.0).round() / 1000.0,
            rejected = message,
            "request completed"
        );
    });
    (request_id, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hypers_bare_error_heads_are_recognised() {
        assert_eq!(
            automatic_error_status(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Mon, 01 Jan 2024 00:00:00 GMT\r\n\r\n"),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
        // A response with a body, a success, a body chunk: left alone.
        assert_eq!(
            automatic_error_status(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 12\r\n\r\n"),
            None
        );
        assert_eq!(
            automatic_error_status(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
            None
        );
        assert_eq!(automatic_error_status(b"5\r\nhello\r\n\r\n"), None);
    }
}
