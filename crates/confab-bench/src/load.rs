//! Plain HTTP load: a closed loop of `concurrency` clients, each sending its
//! next request as soon as the previous answer's body has been read, for a
//! fixed duration. Latency is send → whole body read, per request; every
//! sample is kept (see `stats`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::{Value, json};

use crate::client::Auth;
use crate::procfs::{Monitor, Usage};
use crate::stats::{Summary, micros, summarize_micros};

/// What each request of a scenario is.
#[derive(Clone, Debug)]
pub enum Request {
    /// `POST /chat` without `chat_id`: a new chat every time.
    PostChat,
    /// `GET /chats` (first page, default limit 50).
    ListChats,
    /// `GET /chat/{id}` (whole history, default limit 100).
    GetChat(String),
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadResult {
    pub concurrency: usize,
    pub duration_s: f64,
    pub ok: u64,
    pub errors: u64,
    /// Error kind → count (`status 503`, `transport: …`).
    pub error_kinds: BTreeMap<String, u64>,
    pub requests_per_s: f64,
    /// Successful requests only, milliseconds.
    pub latency_ms: Summary,
}

struct Shared {
    client: reqwest::Client,
    base: String,
    auth: Auth,
    request: Request,
    /// Makes every POST /chat message distinct (a different reply each).
    counter: AtomicU64,
    run_tag: String,
}

fn send(shared: &Shared) -> reqwest::RequestBuilder {
    let Shared {
        client,
        base,
        auth,
        request,
        ..
    } = shared;
    let builder = match request {
        Request::PostChat => {
            let n = shared.counter.fetch_add(1, Ordering::Relaxed);
            client.post(format!("{base}/chat")).json(&json!({
                "message": format!("Benchmark {} message {n}: how does confab store a turn?", shared.run_tag)
            }))
        }
        Request::ListChats => client.get(format!("{base}/chats")),
        Request::GetChat(id) => client.get(format!("{base}/chat/{id}")),
    };
    auth.apply(builder)
}

#[derive(Default)]
struct WorkerTally {
    samples: Vec<u32>,
    errors: BTreeMap<String, u64>,
}

async fn worker(shared: Arc<Shared>, until: Instant) -> WorkerTally {
    let mut tally = WorkerTally::default();
    while Instant::now() < until {
        let started = Instant::now();
        let outcome = match send(&shared).send().await {
            Ok(response) => {
                let status = response.status();
                match response.bytes().await {
                    Ok(_) if status.is_success() => Ok(()),
                    Ok(_) => Err(format!("status {}", status.as_u16())),
                    Err(e) => Err(format!("body: {e}")),
                }
            }
            Err(e) => Err(format!("transport: {}", short_error(&e))),
        };
        match outcome {
            Ok(()) => tally.samples.push(micros(started.elapsed())),
            Err(kind) => {
                *tally.errors.entry(kind).or_default() += 1;
                // A refused connection fails in microseconds: do not spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    tally
}

/// The innermost cause, which is the useful part of a reqwest error.
pub fn short_error(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    cause.to_string()
}

/// How long, how hard.
pub struct Plan {
    pub concurrency: usize,
    /// Unrecorded load first (connections, caches, PostgreSQL's plans).
    pub warmup: Duration,
    pub duration: Duration,
    pub run_tag: String,
}

/// Run the closed loop: warm up, then measure for `plan.duration` with the
/// monitor `watch()` starts covering exactly the measured window.
pub async fn run(
    client: reqwest::Client,
    base: &str,
    auth: Auth,
    request: Request,
    plan: Plan,
    watch: impl FnOnce() -> Monitor,
) -> anyhow::Result<(LoadResult, Usage)> {
    let shared = Arc::new(Shared {
        client,
        base: base.to_owned(),
        auth,
        request,
        counter: AtomicU64::new(0),
        run_tag: plan.run_tag,
    });
    if !plan.warmup.is_zero() {
        let (samples, errors) = closed_loop(&shared, plan.concurrency, plan.warmup).await?;
        if samples.is_empty() {
            bail!("warm-up had no successful request: {errors:?}");
        }
    }
    let monitor = watch();
    let started = Instant::now();
    let (mut samples, error_kinds) = closed_loop(&shared, plan.concurrency, plan.duration).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let usage = monitor.finish().await;
    let ok = samples.len() as u64;
    let errors = error_kinds.values().sum();
    let result = LoadResult {
        concurrency: plan.concurrency,
        duration_s: elapsed,
        ok,
        errors,
        error_kinds,
        requests_per_s: ok as f64 / elapsed,
        latency_ms: summarize_micros(&mut samples),
    };
    Ok((result, usage))
}

async fn closed_loop(
    shared: &Arc<Shared>,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<(Vec<u32>, BTreeMap<String, u64>)> {
    let until = Instant::now() + duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| tokio::spawn(worker(shared.clone(), until)))
        .collect();
    let mut samples = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for w in workers {
        let tally = w.await.context("load worker panicked")?;
        samples.extend(tally.samples);
        for (k, v) in tally.errors {
            *errors.entry(k).or_default() += v;
        }
    }
    Ok((samples, errors))
}

/// Create what the read scenarios read: `chats` new chats for the caller,
/// then one chat with `messages` messages (a turn stores two). Returns the
/// id of the long chat.
pub async fn prepare_reads(
    client: &reqwest::Client,
    base: &str,
    auth: &Auth,
    chats: usize,
    messages: usize,
) -> anyhow::Result<String> {
    let post = |body: Value| {
        let request = auth.apply(client.post(format!("{base}/chat")).json(&body));
        async move {
            let response = request.send().await.context("POST /chat during setup")?;
            let status = response.status();
            let body: Value = response.json().await.context("reading a setup reply")?;
            if !status.is_success() {
                bail!("setup POST /chat answered {status}: {body}");
            }
            Ok::<Value, anyhow::Error>(body)
        }
    };
    for i in 0..chats {
        post(json!({ "message": format!("Setup chat {i} for the list benchmark") })).await?;
    }
    let first = post(json!({ "message": "Setup: a long conversation for GET /chat/{id}" })).await?;
    let chat_id = first["chat_id"]
        .as_str()
        .context("setup reply has no chat_id")?
        .to_owned();
    for turn in 1..messages.div_ceil(2) {
        post(json!({ "message": format!("Follow-up {turn}"), "chat_id": chat_id })).await?;
    }
    Ok(chat_id)
}
