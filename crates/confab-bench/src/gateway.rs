//! The gateway scenario's client: a closed loop of `concurrency` clients,
//! each streaming one reply after another from one target for `duration`,
//! the same code whatever the target is:
//!
//! - `openai`: `POST {url}/v1/chat/completions` with `stream: true` — the
//!   bench upstream itself, or LiteLLM in front of it;
//! - `confab`: `POST {url}/chat/stream` — confab in front of it.
//!
//! Per stream: time to first token (send → first content token), duration
//! (send → end: `[DONE]` / confab's `done`), and the text, which must be
//! the upstream's reply exactly (a stream that ends otherwise is an error).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use confab_server::sse_client::SseParser;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::client::Auth;
use crate::load::short_error;
use crate::stats::{Summary, micros, summarize_micros};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    OpenAi,
    Confab,
}

pub struct Plan {
    pub kind: Kind,
    pub model: String,
    pub concurrency: usize,
    pub duration: Duration,
    /// The clients' first streams start evenly over this.
    pub stagger: Duration,
    pub stream_timeout: Duration,
    /// The reply every stream must carry.
    pub expected: String,
    pub run_tag: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct GatewayResult {
    pub streams: usize,
    pub completed: usize,
    pub errors: usize,
    pub error_kinds: BTreeMap<String, usize>,
    pub max_concurrent: usize,
    pub wall_s: f64,
    /// Streams that ended in the steady window (after the clients' start
    /// spread, before the end of `duration`) ÷ `duration`.
    pub completed_per_s: f64,
    /// All completed streams ÷ the whole wall time (spread and drain included).
    pub completed_per_wall_s: f64,
    pub ttft_ms: Summary,
    pub duration_ms: Summary,
}

#[derive(Default)]
struct Record {
    error: Option<String>,
    ttft: Option<Duration>,
    duration: Option<Duration>,
    ended: Option<Instant>,
}

struct Shared {
    client: reqwest::Client,
    base: String,
    auth: Auth,
    plan: Plan,
    active: AtomicUsize,
    max_active: AtomicUsize,
    next_id: AtomicUsize,
}

/// Only what the client reads of a Chat Completions chunk.
#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(borrow, default)]
    choices: Vec<Choice<'a>>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(borrow, default)]
    delta: Option<Delta<'a>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow, default)]
    content: Option<std::borrow::Cow<'a, str>>,
}

impl Shared {
    fn request(&self) -> reqwest::RequestBuilder {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let message = format!(
            "Benchmark {} gateway stream {n}: how much does a gateway add?",
            self.plan.run_tag
        );
        let builder = match self.plan.kind {
            Kind::OpenAi => self
                .client
                .post(format!("{}/v1/chat/completions", self.base))
                .json(&json!({
                    "model": self.plan.model,
                    "messages": [{ "role": "user", "content": message }],
                    "stream": true,
                    "stream_options": { "include_usage": true },
                })),
            Kind::Confab => self
                .client
                .post(format!("{}/chat/stream", self.base))
                .json(&json!({ "message": message, "model": self.plan.model })),
        };
        self.auth.apply(builder)
    }

    async fn stream(&self) -> Record {
        let mut record = Record::default();
        let now = self.active.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_active.fetch_max(now, Ordering::Relaxed);
        let sent = Instant::now();
        let outcome =
            tokio::time::timeout(self.plan.stream_timeout, self.read(sent, &mut record)).await;
        self.active.fetch_sub(1, Ordering::Relaxed);
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(kind)) => record.error = Some(kind),
            Err(_) => record.error = Some("timeout".into()),
        }
        record
    }

    async fn read(&self, sent: Instant, record: &mut Record) -> Result<(), String> {
        let mut response = self
            .request()
            .send()
            .await
            .map_err(|e| format!("transport: {}", short_error(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("status {}", status.as_u16()));
        }
        let mut parser = SseParser::new();
        let mut text = String::with_capacity(self.plan.expected.len());
        loop {
            let chunk = match response.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => return Err("stream ended before its end event".into()),
                Err(e) => return Err(format!("body: {}", short_error(&e))),
            };
            let at = Instant::now();
            for event in parser.push(&chunk) {
                let token = match self.plan.kind {
                    Kind::OpenAi => {
                        if event.data == "[DONE]" {
                            return self.finish(record, sent, at, &text);
                        }
                        let parsed: Chunk<'_> = serde_json::from_str(&event.data)
                            .map_err(|_| "chunk is not JSON".to_owned())?;
                        if parsed.error.is_some() {
                            return Err("error chunk".into());
                        }
                        parsed
                            .choices
                            .into_iter()
                            .filter_map(|c| c.delta?.content)
                            .filter(|c| !c.is_empty())
                            .map(|c| c.into_owned())
                            .reduce(|a, b| a + &b)
                    }
                    Kind::Confab => {
                        if event.data.contains("\"done\":true") {
                            let done: Value = serde_json::from_str(&event.data)
                                .map_err(|_| "done event is not JSON".to_owned())?;
                            let full = done["fullText"].as_str().unwrap_or_default().to_owned();
                            if full != text {
                                return Err("fullText differs from the tokens".into());
                            }
                            return self.finish(record, sent, at, &full);
                        }
                        if !event.data.contains("\"done\":false") {
                            return Err("error event".into());
                        }
                        let parsed: Value = serde_json::from_str(&event.data)
                            .map_err(|_| "token event is not JSON".to_owned())?;
                        parsed["token"].as_str().map(str::to_owned)
                    }
                };
                if let Some(token) = token {
                    if record.ttft.is_none() {
                        record.ttft = Some(at - sent);
                    }
                    text.push_str(&token);
                }
            }
        }
    }

    fn finish(
        &self,
        record: &mut Record,
        sent: Instant,
        at: Instant,
        text: &str,
    ) -> Result<(), String> {
        if text != self.plan.expected {
            return Err("reply differs from the upstream's".into());
        }
        record.duration = Some(at - sent);
        record.ended = Some(at);
        Ok(())
    }
}

pub async fn run(
    client: reqwest::Client,
    base: &str,
    auth: Auth,
    plan: Plan,
) -> anyhow::Result<GatewayResult> {
    let shared = Arc::new(Shared {
        client,
        base: base.to_owned(),
        auth,
        plan,
        active: AtomicUsize::new(0),
        max_active: AtomicUsize::new(0),
        next_id: AtomicUsize::new(0),
    });
    let started = Instant::now();
    let (clients, stagger) = (shared.plan.concurrency, shared.plan.stagger);
    let until = started + stagger + shared.plan.duration;
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let shared = shared.clone();
            let offset = stagger.mul_f64(i as f64 / clients.max(1) as f64);
            tokio::spawn(async move {
                tokio::time::sleep(offset).await;
                let mut records = Vec::new();
                while Instant::now() < until {
                    let record = shared.stream().await;
                    let failed = record.error.is_some();
                    records.push(record);
                    if failed {
                        // A refusing target is not hammered in a tight loop.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                records
            })
        })
        .collect();
    let mut records = Vec::new();
    for t in tasks {
        records.extend(t.await?);
    }
    let wall_s = started.elapsed().as_secs_f64();
    let mut ttft = Vec::new();
    let mut duration = Vec::new();
    let mut error_kinds: BTreeMap<String, usize> = BTreeMap::new();
    let streams = records.len();
    let steady_from = started + stagger;
    let mut steady = 0usize;
    for r in records {
        if r.error.is_none() && r.ended.is_some_and(|e| e >= steady_from && e <= until) {
            steady += 1;
        }
        if let Some(kind) = r.error {
            *error_kinds.entry(kind).or_default() += 1;
            continue;
        }
        if let (Some(t), Some(d)) = (r.ttft, r.duration) {
            ttft.push(micros(t));
            duration.push(micros(d));
        }
    }
    let completed = duration.len();
    Ok(GatewayResult {
        streams,
        completed,
        errors: error_kinds.values().sum(),
        error_kinds,
        max_concurrent: shared.max_active.load(Ordering::Relaxed),
        wall_s,
        completed_per_s: steady as f64 / shared.plan.duration.as_secs_f64().max(1e-9),
        completed_per_wall_s: completed as f64 / wall_s,
        ttft_ms: summarize_micros(&mut ttft),
        duration_ms: summarize_micros(&mut duration),
    })
}
