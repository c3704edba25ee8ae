//! `confab-bench`: the measuring half of `bench/run.sh`. The script starts
//! and stops the services; each subcommand here runs one scenario against a
//! running confab and writes its result as a JSON fragment; `report` merges
//! the fragments into `out/bench/<run>.json` and prints the tables.

// The report's table and the helper answers (`free-port`) are this
// program's output, read by the script and by people.
#![allow(clippy::print_stdout)]

mod client;
mod gateway;
mod load;
mod pgbench;
mod procfs;
mod report;
mod server_metrics;
mod sse;
mod stats;
mod upstream;

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use confab_llm::{SimulatedModel, TokenDelay};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::client::{Auth, local_base, new_client, new_unpooled_client};
use crate::procfs::{Monitor, Targets};

#[derive(Parser)]
#[command(
    name = "confab-bench",
    about = "confab's benchmark client (run it through bench/run.sh)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a TCP port that is free on 127.0.0.1 right now.
    FreePort,
    /// Poll GET /health until it answers 200; record start time and idle memory.
    WaitReady(WaitReady),
    /// Closed-loop HTTP load (post-chat, list-chats, get-chat, embedded).
    Http(Http),
    /// Concurrent POST /chat/stream (sse-1k, sse-burst, sse-10k).
    Sse(Sse),
    /// pgbench with the writes of one POST /chat (db-ceiling).
    Pgbench(Pgbench),
    /// Serve the fast OpenAI-compatible upstream of the gateway scenario.
    Upstream(UpstreamArgs),
    /// Closed-loop streams through one gateway target (gateway scenario).
    Gateway(Gateway),
    /// Merge the fragments of a run, write the JSON and print the tables.
    Report(report::ReportArgs),
}

/// Where a scenario's fragment goes and what it is called.
#[derive(Args)]
struct Output {
    /// Scenario name (post-chat, db-ceiling, sse-1k, …).
    #[arg(long)]
    scenario: String,
    /// Free text shown next to the scenario (e.g. the burst size).
    #[arg(long, default_value = "")]
    label: String,
    #[arg(long)]
    out: PathBuf,
}

/// Which processes to watch while the scenario runs.
#[derive(Args)]
struct Probe {
    #[arg(long)]
    server_pid: Option<u32>,
    #[arg(long)]
    redis_pid: Option<u32>,
    /// The benchmark database (its backends are accounted as PostgreSQL).
    #[arg(long)]
    db_name: Option<String>,
    /// Account the server's child processes to it too (LiteLLM's workers).
    #[arg(long)]
    server_tree: bool,
    /// The gateway scenario's upstream (accounted on its own).
    #[arg(long)]
    upstream_pid: Option<u32>,
}

impl Probe {
    fn targets(&self) -> Targets {
        Targets {
            server_pid: self.server_pid,
            redis_pid: self.redis_pid,
            db_name: self.db_name.clone(),
            server_tree: self.server_tree,
            upstream_pid: self.upstream_pid,
        }
    }
}

#[derive(Args)]
struct Target {
    /// confab's base URL; only http://127.0.0.1:<port> is accepted.
    #[arg(long)]
    url: String,
    /// An API key (`Authorization: Bearer`); otherwise header auth.
    #[arg(long, env = "BENCH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Header auth: x-org-id (default: the demo org Acme).
    #[arg(long)]
    org: Option<String>,
    /// Header auth: x-user-id (default: the demo user Alice).
    #[arg(long)]
    user: Option<String>,
}

impl Target {
    fn auth(&self) -> Auth {
        match &self.api_key {
            Some(key) => Auth::Key(key.clone()),
            None => Auth::Headers {
                org: self
                    .org
                    .clone()
                    .unwrap_or_else(|| confab_server::seed::ACME.to_string()),
                user: self
                    .user
                    .clone()
                    .unwrap_or_else(|| confab_server::seed::ALICE.to_string()),
            },
        }
    }
}

#[derive(Args)]
struct WaitReady {
    #[arg(long)]
    url: String,
    #[arg(long)]
    pid: u32,
    /// When the server was exec'd, as seconds since the epoch (bash's
    /// $EPOCHREALTIME taken just before starting it).
    #[arg(long)]
    started_at: f64,
    #[arg(long, default_value_t = 60.0)]
    timeout_s: f64,
    /// Idle time after the first 200 before the memory is read.
    #[arg(long, default_value_t = 1000)]
    settle_ms: u64,
    #[command(flatten)]
    output: Output,
}

#[derive(Clone, Copy, ValueEnum)]
enum HttpKind {
    PostChat,
    ListChats,
    GetChat,
}

#[derive(Args)]
struct Http {
    #[arg(long, value_enum)]
    kind: HttpKind,
    #[command(flatten)]
    target: Target,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value_t = 20.0)]
    duration_s: f64,
    #[arg(long, default_value_t = 2.0)]
    warmup_s: f64,
    /// Read scenarios: chats to create for the caller first.
    #[arg(long, default_value_t = 60)]
    setup_chats: usize,
    /// get-chat: messages in the chat that is read.
    #[arg(long, default_value_t = 20)]
    setup_messages: usize,
    #[command(flatten)]
    probe: Probe,
    #[command(flatten)]
    output: Output,
}

#[derive(Clone, Copy, ValueEnum)]
enum SseShape {
    Loop,
    Burst,
    Ramp,
}

#[derive(Args)]
struct Sse {
    #[arg(long, value_enum)]
    shape: SseShape,
    #[command(flatten)]
    target: Target,
    /// Loop: concurrent clients. Burst/ramp: streams.
    #[arg(long)]
    streams: usize,
    /// Loop: how long the clients keep streaming.
    #[arg(long, default_value_t = 20.0)]
    duration_s: f64,
    /// Loop: first streams start evenly over this; ramp: all streams do.
    #[arg(long, default_value_t = 1.0)]
    spread_s: f64,
    /// The server's SIMULATED_TOKEN_DELAY_MS.
    #[arg(long, default_value = "10-30")]
    token_delay: String,
    /// The server's SIMULATED_MIN_WORDS.
    #[arg(long, default_value_t = 0)]
    min_words: usize,
    #[arg(long, default_value_t = 300.0)]
    stream_timeout_s: f64,
    #[command(flatten)]
    probe: Probe,
    #[command(flatten)]
    output: Output,
}

#[derive(Args)]
struct Pgbench {
    /// postgres://… of the benchmark database.
    #[arg(long)]
    db_url: String,
    #[arg(long)]
    script: PathBuf,
    #[arg(long, default_value_t = 64)]
    clients: usize,
    #[arg(long, default_value_t = 20.0)]
    duration_s: f64,
    /// The user whose chats the script inserts (default: Alice of Acme).
    #[arg(long)]
    org: Option<String>,
    #[arg(long)]
    user: Option<String>,
    #[command(flatten)]
    probe: Probe,
    #[command(flatten)]
    output: Output,
}

#[derive(Args)]
struct UpstreamArgs {
    #[arg(long)]
    port: u16,
    /// Tokens per reply.
    #[arg(long, default_value_t = 16)]
    tokens: usize,
    /// Delay before each token, in milliseconds.
    #[arg(long, default_value_t = 25)]
    delay_ms: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum GatewayKind {
    /// `POST /v1/chat/completions` (the upstream itself, LiteLLM).
    Openai,
    /// `POST /chat/stream` (confab).
    Confab,
}

#[derive(Args)]
struct Gateway {
    #[arg(long, value_enum)]
    kind: GatewayKind,
    /// Base URL (http://127.0.0.1:<port>; without `/v1`).
    #[arg(long)]
    url: String,
    /// `Authorization: Bearer` (confab: an API key; LiteLLM: its master key).
    #[arg(long, env = "BENCH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[arg(long)]
    model: String,
    #[arg(long)]
    concurrency: usize,
    #[arg(long, default_value_t = 20.0)]
    duration_s: f64,
    #[arg(long, default_value_t = 1.0)]
    spread_s: f64,
    /// The upstream's tokens per reply (what every stream must carry).
    #[arg(long, default_value_t = 16)]
    tokens: usize,
    /// The upstream's delay before each token, in milliseconds (recorded
    /// with the result: rows compare only at the same pace).
    #[arg(long, default_value_t = 25)]
    pace_ms: u64,
    #[arg(long, default_value_t = 120.0)]
    stream_timeout_s: f64,
    #[command(flatten)]
    probe: Probe,
    #[command(flatten)]
    output: Output,
}

/// One scenario's result, as written by its subcommand.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Fragment {
    pub scenario: String,
    pub label: String,
    pub finished_at: String,
    pub params: Value,
    pub result: Value,
    #[serde(default)]
    pub usage: Option<Value>,
    #[serde(default)]
    pub server_metrics: Option<Value>,
}

fn write_fragment(
    output: &Output,
    params: Value,
    result: Value,
    usage: Option<&procfs::Usage>,
    metrics: Option<&server_metrics::MetricsDelta>,
) -> anyhow::Result<()> {
    let fragment = Fragment {
        scenario: output.scenario.clone(),
        label: output.label.clone(),
        finished_at: chrono::Utc::now().to_rfc3339(),
        params,
        result,
        usage: usage.map(serde_json::to_value).transpose()?,
        server_metrics: metrics.map(serde_json::to_value).transpose()?,
    };
    if let Some(dir) = output.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&output.out, serde_json::to_vec_pretty(&fragment)?)
        .with_context(|| format!("writing {}", output.out.display()))
}

fn seconds(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::ZERO)
}

/// A tag that makes this run's messages distinct from any earlier run's.
fn run_tag() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

fn main() -> std::process::ExitCode {
    // reqwest is built without a crypto provider of its own (confab-llm's
    // `rustls-no-provider`): building a client before this panics.
    confab_llm::install_tls_provider();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("confab-bench: cannot start the runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("confab-bench: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::FreePort => {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            println!("{}", listener.local_addr()?.port());
            Ok(())
        }
        Command::WaitReady(args) => wait_ready(args).await,
        Command::Http(args) => http(args).await,
        Command::Sse(args) => sse(args).await,
        Command::Pgbench(args) => pgbench(args).await,
        Command::Upstream(args) => {
            upstream::serve(args.port, args.tokens, Duration::from_millis(args.delay_ms)).await
        }
        Command::Gateway(args) => gateway(args).await,
        Command::Report(args) => report::run(args),
    }
}

async fn wait_ready(args: WaitReady) -> anyhow::Result<()> {
    let base = local_base(&args.url)?;
    let client = reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(0)
        .build()?;
    let deadline = Instant::now() + seconds(args.timeout_s);
    let mut polls = 0u32;
    loop {
        polls += 1;
        if let Ok(r) = client.get(format!("{base}/health")).send().await
            && r.status().is_success()
        {
            break;
        }
        if !std::path::Path::new(&format!("/proc/{}", args.pid)).exists() {
            bail!(
                "the server (pid {}) exited before answering /health; see its log",
                args.pid
            );
        }
        if Instant::now() > deadline {
            bail!("no 200 from {base}/health within {} s", args.timeout_s);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
    let ready_ms = (now - args.started_at) * 1000.0;
    let rss_ready = procfs::status_kb(args.pid, "VmRSS:").unwrap_or(0) as f64 / 1024.0;
    tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
    let rss_idle = procfs::status_kb(args.pid, "VmRSS:").unwrap_or(0) as f64 / 1024.0;
    let threads = procfs::status_kb(args.pid, "Threads:").unwrap_or(0);
    eprintln!(
        "  {}: ready after {ready_ms:.0} ms ({polls} polls), idle RSS {rss_idle:.1} MiB",
        args.output.label
    );
    write_fragment(
        &args.output,
        json!({ "settle_ms": args.settle_ms, "health_poll_ms": 5 }),
        json!({
            "ready_ms": ready_ms,
            "rss_at_ready_mb": rss_ready,
            "idle_rss_mb": rss_idle,
            "threads": threads,
        }),
        None,
        None,
    )
}

async fn http(args: Http) -> anyhow::Result<()> {
    let base = local_base(&args.target.url)?;
    let auth = args.target.auth();
    let client = new_client()?;
    let request = match args.kind {
        HttpKind::PostChat => load::Request::PostChat,
        HttpKind::ListChats | HttpKind::GetChat => {
            let chat = load::prepare_reads(
                &client,
                &base,
                &auth,
                if matches!(args.kind, HttpKind::ListChats) {
                    args.setup_chats
                } else {
                    0
                },
                args.setup_messages,
            )
            .await?;
            match args.kind {
                HttpKind::GetChat => load::Request::GetChat(chat),
                _ => load::Request::ListChats,
            }
        }
    };
    let before = server_metrics::scrape(&client, &base).await;
    // The monitor covers the measured window only, not the warm-up.
    let plan = load::Plan {
        concurrency: args.concurrency,
        warmup: seconds(args.warmup_s),
        duration: seconds(args.duration_s),
        run_tag: run_tag(),
    };
    let targets = args.probe.targets();
    let (result, usage) = load::run(client.clone(), &base, auth, request, plan, move || {
        Monitor::start(targets)
    })
    .await?;
    let after = server_metrics::scrape(&client, &base).await;
    let metrics = before
        .zip(after)
        .map(|(b, a)| server_metrics::delta(&b, &a));
    eprintln!(
        "  {}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
        args.output.scenario,
        result.requests_per_s,
        result.latency_ms.p50,
        result.latency_ms.p99,
        result.errors
    );
    write_fragment(
        &args.output,
        json!({
            "concurrency": args.concurrency,
            "duration_s": args.duration_s,
            "warmup_s": args.warmup_s,
            "setup_chats": args.setup_chats,
            "setup_messages": args.setup_messages,
        }),
        serde_json::to_value(&result)?,
        Some(&usage),
        metrics.as_ref(),
    )
}

async fn sse(args: Sse) -> anyhow::Result<()> {
    let base = local_base(&args.target.url)?;
    let delay: TokenDelay = args
        .token_delay
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--token-delay: {e}"))?;
    let shape = match args.shape {
        SseShape::Loop => sse::Shape::Loop {
            clients: args.streams,
            duration: seconds(args.duration_s),
            stagger: seconds(args.spread_s),
        },
        SseShape::Burst => sse::Shape::Burst {
            streams: args.streams,
        },
        SseShape::Ramp => sse::Shape::Ramp {
            streams: args.streams,
            ramp: seconds(args.spread_s),
        },
    };
    let streams_client = match shape {
        sse::Shape::Burst { .. } => new_unpooled_client()?,
        _ => new_client()?,
    };
    let metrics_client = new_client()?;
    let before = server_metrics::scrape(&metrics_client, &base).await;
    let monitor = Monitor::start(args.probe.targets());
    let result = sse::run(
        streams_client,
        &base,
        args.target.auth(),
        sse::Plan {
            shape,
            model: SimulatedModel::new(delay, args.min_words),
            stream_timeout: seconds(args.stream_timeout_s),
            run_tag: run_tag(),
        },
    )
    .await?;
    let usage = monitor.finish().await;
    let after = server_metrics::scrape(&metrics_client, &base).await;
    let metrics = before
        .zip(after)
        .map(|(b, a)| server_metrics::delta(&b, &a));
    eprintln!(
        "  {} {}: {}/{} complete, {} errors, TTFT p50 {:.1} ms p99 {:.1} ms, stretch {:.3}, gap p99 {:.1} ms, peak RSS {:.0} MiB",
        args.output.scenario,
        args.output.label,
        result.completed,
        result.streams,
        result.errors,
        result.ttft_ms.p50,
        result.ttft_ms.p99,
        result.stretch_overall,
        result.gap_ms.p99,
        usage.server_memory.as_ref().map_or(0.0, |m| m.rss_peak_mb),
    );
    if let (Some(ttft), Some(sent)) = (&result.ttft_from_release_ms, &result.sent_from_release_ms) {
        eprintln!(
            "    from the release: TTFT p50 {:.1} ms p99 {:.1} ms; the client started the requests at p50 {:.1} ms p99 {:.1} ms",
            ttft.p50, ttft.p99, sent.p50, sent.p99,
        );
    }
    write_fragment(
        &args.output,
        json!({
            "shape": format!("{:?}", shape),
            "streams": args.streams,
            "duration_s": args.duration_s,
            "spread_s": args.spread_s,
            "token_delay_ms": args.token_delay,
            "min_words": args.min_words,
        }),
        serde_json::to_value(&result)?,
        Some(&usage),
        metrics.as_ref(),
    )
}

async fn gateway(args: Gateway) -> anyhow::Result<()> {
    let base = local_base(&args.url)?;
    let auth = Auth::Key(args.api_key.clone().unwrap_or_else(|| "unused".into()));
    let kind = match args.kind {
        GatewayKind::Openai => gateway::Kind::OpenAi,
        GatewayKind::Confab => gateway::Kind::Confab,
    };
    let metrics_client = new_client()?;
    let before = match kind {
        gateway::Kind::Confab => server_metrics::scrape(&metrics_client, &base).await,
        gateway::Kind::OpenAi => None,
    };
    let monitor = Monitor::start(args.probe.targets());
    let result = gateway::run(
        new_client()?,
        &base,
        auth,
        gateway::Plan {
            kind,
            model: args.model.clone(),
            concurrency: args.concurrency,
            duration: seconds(args.duration_s),
            stagger: seconds(args.spread_s),
            stream_timeout: seconds(args.stream_timeout_s),
            expected: upstream::reply_text(args.tokens),
            run_tag: run_tag(),
        },
    )
    .await?;
    let usage = monitor.finish().await;
    let after = match kind {
        gateway::Kind::Confab => server_metrics::scrape(&metrics_client, &base).await,
        gateway::Kind::OpenAi => None,
    };
    let metrics = before
        .zip(after)
        .map(|(b, a)| server_metrics::delta(&b, &a));
    eprintln!(
        "  gateway {}: {}/{} complete, {} errors, {:.0} streams/s, TTFT p50 {:.1} ms p99 {:.1} ms",
        args.output.label,
        result.completed,
        result.streams,
        result.errors,
        result.completed_per_s,
        result.ttft_ms.p50,
        result.ttft_ms.p99,
    );
    write_fragment(
        &args.output,
        json!({
            "target": args.output.label.split_whitespace().next().unwrap_or(""),
            "concurrency": args.concurrency,
            "pace_ms": args.pace_ms,
            "duration_s": args.duration_s,
            "tokens": args.tokens,
        }),
        serde_json::to_value(&result)?,
        Some(&usage),
        metrics.as_ref(),
    )
}

async fn pgbench(args: Pgbench) -> anyhow::Result<()> {
    // The reply a simulated model gives a message of the benchmark's shape:
    // the update writes text of the same size as confab's.
    let model = SimulatedModel::new(TokenDelay::ZERO, 0);
    let reply = model.reply_to("Benchmark pgbench message 123456: how does confab store a turn?");
    let tokens = reply.split_whitespace().count();
    let org = args
        .org
        .clone()
        .unwrap_or_else(|| confab_server::seed::ACME.to_string());
    let user = args
        .user
        .clone()
        .unwrap_or_else(|| confab_server::seed::ALICE.to_string());
    let monitor = Monitor::start(args.probe.targets());
    let result = pgbench::run(pgbench::Spec {
        db_url: &args.db_url,
        script: &args.script,
        clients: args.clients,
        duration: seconds(args.duration_s),
        vars: vec![
            ("org".into(), org),
            ("user".into(), user),
            ("reply".into(), reply),
            ("reply_tokens".into(), tokens.to_string()),
        ],
    })
    .await?;
    let usage = monitor.finish().await;
    eprintln!(
        "  {}: {:.0} tps ({} transactions, {} failed, latency avg {:.2} ms)",
        args.output.scenario, result.tps, result.transactions, result.failed, result.latency_avg_ms
    );
    write_fragment(
        &args.output,
        json!({ "clients": args.clients, "duration_s": args.duration_s, "script": args.script }),
        serde_json::to_value(&result)?,
        Some(&usage),
        None,
    )
}
