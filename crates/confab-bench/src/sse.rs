//! Streaming scenarios: many concurrent `POST /chat/stream`, each a new
//! chat, every event timestamped as its chunk arrives.
//!
//! Per stream: time to first token (send → first token event), the gaps
//! between token events, and the stretch — measured duration (send → `done`)
//! divided by the ideal duration, the sum of the delays the simulated model
//! plans for that very message (`SimulatedModel::planned_delays`; it is
//! deterministic per message). A stretch of 1.0 means nothing but the model's
//! own pacing was visible to the client. The reply text is checked against
//! the model's, so a stream that "completes" with the wrong text is an error.
//!
//! Three shapes: a closed loop of N clients (steady concurrency), a burst (N
//! streams released at one instant, on fresh connections), and a ramp (N
//! long streams started evenly over a few seconds, then held).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use confab_llm::SimulatedModel;
use confab_server::sse_client::SseParser;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::client::Auth;
use crate::load::short_error;
use crate::stats::{Summary, micros, summarize_micros, summarize_values};

#[derive(Clone, Copy, Debug)]
pub enum Shape {
    /// `clients` clients, each streaming one reply after another until
    /// `duration` is over; their first streams start evenly over `stagger`.
    Loop {
        clients: usize,
        duration: Duration,
        stagger: Duration,
    },
    /// `streams` streams released at the same instant.
    Burst { streams: usize },
    /// `streams` streams started evenly over `ramp`, one each.
    Ramp { streams: usize, ramp: Duration },
}

pub struct Plan {
    pub shape: Shape,
    /// Must match the server's `SIMULATED_*` settings.
    pub model: SimulatedModel,
    /// A stream not done within this is an error (`timeout`).
    pub stream_timeout: Duration,
    pub run_tag: String,
}

/// What one stream showed the client.
#[derive(Default)]
struct Record {
    error: Option<String>,
    /// Send → first token event.
    ttft: Option<Duration>,
    /// Common release instant → first token event (bursts).
    ttft_from_release: Option<Duration>,
    /// Common release instant → this stream's request started (bursts):
    /// the client's own share of `ttft_from_release`.
    sent_from_release: Option<Duration>,
    /// Send → `done` event.
    duration: Option<Duration>,
    ideal: Duration,
    /// The model's delay before the first token: TTFT minus this is what
    /// the service added (commit, scheduling, network).
    first_delay: Duration,
    planned_tokens: usize,
    gaps_us: Vec<u32>,
    tokens: usize,
    /// A refusal (429/503): send → its response head, and whether it said
    /// when to come back (`Retry-After`).
    refused: Option<(Duration, bool)>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct SseResult {
    pub shape: String,
    pub streams: usize,
    pub completed: usize,
    pub errors: usize,
    pub error_kinds: BTreeMap<String, usize>,
    /// Most streams open at once, as the client counted them.
    pub max_concurrent: usize,
    pub wall_s: f64,
    pub completed_per_s: f64,
    pub tokens_per_s: f64,
    pub ttft_ms: Summary,
    /// TTFT minus the model's planned delay before the first token.
    pub ttft_over_model_ms: Summary,
    /// For bursts: from the instant all streams were released.
    pub ttft_from_release_ms: Option<Summary>,
    /// For bursts: from the release to each request's start (connect and
    /// send), i.e. how long the client itself took to get to it.
    pub sent_from_release_ms: Option<Summary>,
    /// Per completed stream: measured ÷ ideal duration.
    pub stretch: Summary,
    /// Σ measured ÷ Σ ideal over the completed streams.
    pub stretch_overall: f64,
    pub ideal_ms: Summary,
    pub duration_ms: Summary,
    /// Time between consecutive token events of a stream.
    pub gap_ms: Summary,
    /// The model's mean planned delay per token (what a gap should be).
    pub planned_gap_ms: f64,
    /// Refused streams (429/503): send → the refusal's response head.
    pub refused_ms: Summary,
    /// Refusals without a `Retry-After` header.
    pub refused_without_retry_after: usize,
}

struct Shared {
    client: reqwest::Client,
    base: String,
    auth: Auth,
    model: SimulatedModel,
    active: AtomicUsize,
    max_active: AtomicUsize,
    timeout: Duration,
    run_tag: String,
    next_id: AtomicUsize,
}

impl Shared {
    fn message(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!(
            "Benchmark {} stream {n}: tell me how streaming replies are stored.",
            self.run_tag
        )
    }

    /// The planned total delay, first delay and token count of `message`'s reply.
    fn ideal(&self, message: &str) -> (Duration, Duration, usize) {
        let planned = self.model.planned_delays(message);
        (
            planned.iter().sum(),
            planned.first().copied().unwrap_or_default(),
            planned.len(),
        )
    }

    fn request(&self, message: &str) -> anyhow::Result<reqwest::Request> {
        self.auth
            .apply(
                self.client
                    .post(format!("{}/chat/stream", self.base))
                    .json(&json!({ "message": message })),
            )
            .build()
            .context("building a stream request")
    }
}

/// Run one stream to its end; `released` is the burst's common start,
/// `planned` the model's plan for `message` ([`Shared::ideal`]).
async fn stream(
    shared: &Shared,
    message: String,
    planned: (Duration, Duration, usize),
    request: reqwest::Request,
    released: Option<Instant>,
) -> Record {
    let (ideal, first_delay, planned_tokens) = planned;
    let mut record = Record {
        ideal,
        first_delay,
        planned_tokens,
        ..Record::default()
    };
    let now = shared.active.fetch_add(1, Ordering::Relaxed) + 1;
    shared.max_active.fetch_max(now, Ordering::Relaxed);
    let sent = Instant::now();
    record.sent_from_release = released.map(|r| sent - r);
    let outcome = tokio::time::timeout(
        shared.timeout,
        read_stream(shared, &message, request, sent, released, &mut record),
    )
    .await;
    shared.active.fetch_sub(1, Ordering::Relaxed);
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(kind)) => record.error = Some(kind),
        Err(_) => record.error = Some("timeout".into()),
    }
    record
}

async fn read_stream(
    shared: &Shared,
    message: &str,
    request: reqwest::Request,
    sent: Instant,
    released: Option<Instant>,
    record: &mut Record,
) -> Result<(), String> {
    let mut response = shared
        .client
        .execute(request)
        .await
        .map_err(|e| format!("transport: {}", short_error(&e)))?;
    let status = response.status();
    if !status.is_success() {
        if matches!(status.as_u16(), 429 | 503) {
            record.refused = Some((
                sent.elapsed(),
                response.headers().contains_key("retry-after"),
            ));
        }
        return Err(format!("status {}", status.as_u16()));
    }
    let mut parser = SseParser::new();
    let mut last_token: Option<Instant> = None;
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return Err("stream ended without done".into()),
            Err(e) => return Err(format!("body: {}", short_error(&e))),
        };
        let at = Instant::now();
        for event in parser.push(&chunk) {
            // Cheap classification: a string value cannot contain an
            // unescaped `"`, so these markers only match the real fields.
            if event.data.contains("\"done\":false") {
                record.tokens += 1;
                match last_token {
                    None => {
                        record.ttft = Some(at - sent);
                        record.ttft_from_release = released.map(|r| at - r);
                    }
                    Some(previous) => record.gaps_us.push(micros(at - previous)),
                }
                last_token = Some(at);
            } else if event.data.contains("\"done\":true") {
                record.duration = Some(at - sent);
                let done: Value = serde_json::from_str(&event.data)
                    .map_err(|_| "done event is not JSON".to_owned())?;
                if done["fullText"].as_str() != Some(shared.model.reply_to(message).as_str()) {
                    return Err("reply differs from the model's".into());
                }
                return Ok(());
            } else if event.data.contains("\"error\"") {
                return Err("error event".into());
            } else {
                return Err("unexpected event".into());
            }
        }
    }
}

pub async fn run(
    client: reqwest::Client,
    base: &str,
    auth: Auth,
    plan: Plan,
) -> anyhow::Result<SseResult> {
    let shared = Arc::new(Shared {
        client,
        base: base.to_owned(),
        auth,
        model: plan.model,
        active: AtomicUsize::new(0),
        max_active: AtomicUsize::new(0),
        timeout: plan.stream_timeout,
        run_tag: plan.run_tag,
        next_id: AtomicUsize::new(0),
    });
    let started = Instant::now();
    let (records, shape, released) = match plan.shape {
        Shape::Loop {
            clients,
            duration,
            stagger,
        } => {
            let until = started + stagger + duration;
            let tasks: Vec<_> = (0..clients)
                .map(|i| {
                    let shared = shared.clone();
                    let offset = stagger.mul_f64(i as f64 / clients.max(1) as f64);
                    tokio::spawn(async move {
                        tokio::time::sleep(offset).await;
                        let mut records = Vec::new();
                        while Instant::now() < until {
                            let message = shared.message();
                            let record = match shared.request(&message) {
                                Ok(request) => {
                                    let planned = shared.ideal(&message);
                                    stream(&shared, message, planned, request, None).await
                                }
                                Err(e) => Record {
                                    error: Some(e.to_string()),
                                    ..Record::default()
                                },
                            };
                            let failed = record.error.is_some();
                            records.push(record);
                            if failed {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                        records
                    })
                })
                .collect();
            let mut records = Vec::new();
            for t in tasks {
                records.extend(t.await.context("stream client panicked")?);
            }
            (
                records,
                format!(
                    "loop: {clients} clients for {:.0} s",
                    duration.as_secs_f64()
                ),
                false,
            )
        }
        Shape::Burst { streams } => {
            // Every request is built before the release, so the instant
            // costs the client as little as possible; each task then waits
            // on one signal.
            let (go, wait) = watch::channel(None::<Instant>);
            let ready = Arc::new(tokio::sync::Barrier::new(streams + 1));
            let mut tasks = Vec::with_capacity(streams);
            for _ in 0..streams {
                let message = shared.message();
                let request = shared.request(&message)?;
                // The client's bookkeeping, done before the release so the
                // instant costs it as little as possible.
                let planned = shared.ideal(&message);
                let shared = shared.clone();
                let mut wait = wait.clone();
                let ready = ready.clone();
                tasks.push(tokio::spawn(async move {
                    ready.wait().await;
                    let released = match wait.wait_for(Option::is_some).await {
                        Ok(at) => *at,
                        Err(_) => None,
                    };
                    stream(&shared, message, planned, request, released).await
                }));
            }
            ready.wait().await;
            let _ = go.send(Some(Instant::now()));
            let mut records = Vec::with_capacity(streams);
            for t in tasks {
                records.push(t.await.context("stream client panicked")?);
            }
            (records, format!("burst: {streams} at once"), true)
        }
        Shape::Ramp { streams, ramp } => {
            let tasks: Vec<_> = (0..streams)
                .map(|i| {
                    let shared = shared.clone();
                    let offset = ramp.mul_f64(i as f64 / streams.max(1) as f64);
                    tokio::spawn(async move {
                        tokio::time::sleep(offset).await;
                        let message = shared.message();
                        match shared.request(&message) {
                            Ok(request) => {
                                let planned = shared.ideal(&message);
                                stream(&shared, message, planned, request, None).await
                            }
                            Err(e) => Record {
                                error: Some(e.to_string()),
                                ..Record::default()
                            },
                        }
                    })
                })
                .collect();
            let mut records = Vec::with_capacity(streams);
            for t in tasks {
                records.push(t.await.context("stream client panicked")?);
            }
            (
                records,
                format!("ramp: {streams} started over {:.0} s", ramp.as_secs_f64()),
                false,
            )
        }
    };
    let wall = started.elapsed().as_secs_f64();
    Ok(summarize(
        records,
        shape,
        released,
        wall,
        shared.max_active.load(Ordering::Relaxed),
    ))
}

fn summarize(
    records: Vec<Record>,
    shape: String,
    burst: bool,
    wall_s: f64,
    max_concurrent: usize,
) -> SseResult {
    let mut ttft = Vec::new();
    let mut ttft_over = Vec::new();
    let mut ttft_release = Vec::new();
    let mut sent_release = Vec::new();
    let mut stretch = Vec::new();
    let mut ideal = Vec::new();
    let mut duration = Vec::new();
    let mut gaps = Vec::new();
    let mut error_kinds: BTreeMap<String, usize> = BTreeMap::new();
    let mut refused = Vec::new();
    let mut refused_without_retry_after = 0;
    let (mut sum_measured, mut sum_ideal) = (0.0, 0.0);
    let mut tokens = 0;
    let mut planned_tokens = 0;
    let streams = records.len();
    for r in records {
        tokens += r.tokens;
        if let Some(t) = r.ttft {
            ttft.push(micros(t));
            ttft_over.push(micros(t.saturating_sub(r.first_delay)));
        }
        if let Some(t) = r.ttft_from_release {
            ttft_release.push(micros(t));
        }
        if let Some(t) = r.sent_from_release {
            sent_release.push(micros(t));
        }
        if let Some((took, retry_after)) = r.refused {
            refused.push(micros(took));
            refused_without_retry_after += usize::from(!retry_after);
        }
        if let Some(kind) = r.error {
            *error_kinds.entry(kind).or_default() += 1;
            continue;
        }
        gaps.extend(r.gaps_us);
        if let Some(d) = r.duration {
            duration.push(micros(d));
            ideal.push(micros(r.ideal));
            sum_measured += d.as_secs_f64();
            sum_ideal += r.ideal.as_secs_f64();
            planned_tokens += r.planned_tokens;
            if !r.ideal.is_zero() {
                stretch.push(d.as_secs_f64() / r.ideal.as_secs_f64());
            }
        }
    }
    let completed = duration.len();
    let errors = error_kinds.values().sum();
    let planned_gap_ms = if planned_tokens > 0 {
        sum_ideal * 1000.0 / planned_tokens as f64
    } else {
        0.0
    };
    SseResult {
        shape,
        streams,
        completed,
        errors,
        error_kinds,
        max_concurrent,
        wall_s,
        completed_per_s: completed as f64 / wall_s,
        tokens_per_s: tokens as f64 / wall_s,
        ttft_ms: summarize_micros(&mut ttft),
        ttft_over_model_ms: summarize_micros(&mut ttft_over),
        ttft_from_release_ms: burst.then(|| summarize_micros(&mut ttft_release)),
        sent_from_release_ms: burst.then(|| summarize_micros(&mut sent_release)),
        stretch: summarize_values(&mut stretch),
        stretch_overall: if sum_ideal > 0.0 {
            sum_measured / sum_ideal
        } else {
            0.0
        },
        ideal_ms: summarize_micros(&mut ideal),
        duration_ms: summarize_micros(&mut duration),
        gap_ms: summarize_micros(&mut gaps),
        planned_gap_ms,
        refused_ms: summarize_micros(&mut refused),
        refused_without_retry_after,
    }
}
