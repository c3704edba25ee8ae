//! The usage ledger at full size (issue 12, "Done when"): 1,000 mixed turns
//! against llmock through a confab child process — complete replies and
//! streams, streams dropped after k tokens, streams cut by the upstream,
//! 429-then-retry, upstream refusals, and 20 live streams when the server is
//! SIGKILLed and restarted on the same database — and then:
//!
//! - ledger rows == finished assistant messages, each exactly once, with the
//!   message's status, model, user and usage;
//! - for every turn whose usage the upstream reported, the stored usage is
//!   what llmock reported (llmock's journal keeps each request as sent; the
//!   test replays it to llmock and reads llmock's own `usage` back);
//! - `GET /usage` totals == ledger totals, per model and per user.
//!
//! Plus, through POST /chat: a turn that settles below its reservation gives
//! the difference back, so the next turn that only fits thanks to it is
//! admitted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use sqlx::{Connection, Row};
use uuid::Uuid;

use crate::llm::{ModelsFile, app_with_models, llmock_models};
use crate::support::app::{ACME, ALICE, BOB};
use crate::support::peers::{Llmock, LlmockOpts, LlmockRequest, peer_client};
use crate::support::process::{Confab, PrivateRedis};
use crate::support::sse::SseReader;
use crate::support::{As, Db, Limiter, TestDb};
use crate::{per_limiter, per_store};

per_store!(a_thousand_mixed_turns_and_a_crash_leave_an_exact_ledger,);
per_limiter!(a_turn_that_settles_below_its_reservation_gives_the_difference_back,);

const TURNS: usize = 1000;
/// Turns `CRASH_AT..CRASH_AT + CRASH_STREAMS` are the streams live at the SIGKILL.
const CRASH_AT: usize = 490;
const CRASH_STREAMS: usize = 20;
/// Turns run at once (each lane runs its turns one after the other).
const LANES: usize = 24;
/// llmock chunk on which the `cut-*` models' streams are truncated and the
/// `hold-*` models' streams stall (far longer than any turn waits).
const CUT_AFTER_CHUNKS: u64 = 7;
const HOLD_AFTER_CHUNKS: u64 = 8;
const ANTHROPIC_KEY_VAR: &str = "CONFAB_TEST_ANTHROPIC_KEY";
const RANGE: &str = "from=2000-01-01T00:00:00Z&to=2100-01-01T00:00:00Z";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    /// POST /chat, complete.
    Reply,
    /// POST /chat/stream, complete.
    Stream,
    /// A stream the client drops after k tokens: `cancelled`.
    Cancel,
    /// A stream llmock truncates mid-way: `failed`.
    Cut,
    /// llmock answers 429 (retry-after 0.1 s) first; confab retries: `complete`.
    Busy,
    /// llmock refuses with a 400 before any stream: 502, `failed`, 0 tokens.
    Refused,
    /// Live when the server is SIGKILLed: `interrupted` after the restart.
    Crash,
}

impl Kind {
    fn family(self) -> &'static str {
        match self {
            Kind::Reply | Kind::Stream => "mock",
            Kind::Cancel | Kind::Crash => "hold",
            Kind::Cut => "cut",
            Kind::Busy => "busy",
            Kind::Refused => "bad",
        }
    }

    fn status(self) -> &'static str {
        match self {
            Kind::Reply | Kind::Stream | Kind::Busy => "complete",
            Kind::Cancel => "cancelled",
            Kind::Cut | Kind::Refused => "failed",
            Kind::Crash => "interrupted",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Provider {
    OpenAi,
    Anthropic,
}

impl Provider {
    fn name(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Anthropic => "anthropic",
        }
    }

    /// The upstream model names of a family (what llmock's `match` sees).
    fn upstream(self, family: &str) -> String {
        match (self, family) {
            (Provider::OpenAi, "mock") => "gpt-4o-mini".into(),
            (Provider::Anthropic, "mock") => "claude-sonnet-4-5".into(),
            (Provider::OpenAi, f) => format!("gpt-{f}"),
            (Provider::Anthropic, f) => format!("claude-{f}"),
        }
    }

    /// USD per million tokens (input, output) = micro-USD per token.
    fn prices(self) -> (f64, f64) {
        match self {
            Provider::OpenAi => (0.15, 0.60),
            Provider::Anthropic => (3.0, 15.0),
        }
    }
}

fn model_name(kind: Kind, provider: Provider) -> String {
    format!("{}-{}", kind.family(), provider.name())
}

/// Every family on both llmock routes, with prices.
fn models_toml(mock: &Llmock) -> String {
    let mut out = String::from("default = \"mock-openai\"\n");
    for family in ["mock", "hold", "cut", "busy", "bad"] {
        for provider in [Provider::OpenAi, Provider::Anthropic] {
            let (input, output) = provider.prices();
            let (base, key) = match provider {
                Provider::OpenAi => (mock.openai_base_url(), String::new()),
                Provider::Anthropic => (
                    mock.anthropic_base_url(),
                    format!("api_key_env = \"{ANTHROPIC_KEY_VAR}\"\n"),
                ),
            };
            out.push_str(&format!(
                "\n[[model]]\nname = \"{family}-{p}\"\nprovider = \"{p}\"\nbase_url = \"{base}\"\n\
                 upstream_model = \"{upstream}\"\ncontext_tokens = 128000\nmax_output_tokens = 256\n\
                 input_price_per_mtok = {input}\noutput_price_per_mtok = {output}\n{key}",
                p = provider.name(),
                upstream = provider.upstream(family),
            ));
        }
    }
    out
}

/// A deterministic mix (splitmix64 of the turn number).
fn mix(i: usize, salt: u64) -> u64 {
    let mut z = (i as u64)
        .wrapping_add(salt.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const WORDS: &[&str] = &[
    "alpha", "budget", "cobalt", "delta", "ember", "fjord", "granite", "harbor", "island",
    "juniper", "kelvin", "lantern", "meadow", "nimbus", "orchid", "pepper", "quartz", "river",
    "saffron", "tundra", "umber", "velvet", "willow", "xenon", "yonder", "zephyr",
];

#[derive(Clone, Debug)]
struct Plan {
    i: usize,
    kind: Kind,
    provider: Provider,
    /// Tokens read before dropping a `Cancel` stream (1..=4).
    k: usize,
    /// `Busy` over /chat/stream rather than /chat.
    stream: bool,
    /// Continue the lane's previous chat (when it has one).
    continues: bool,
    message: String,
}

fn plan(i: usize) -> Plan {
    let kind = if (CRASH_AT..CRASH_AT + CRASH_STREAMS).contains(&i) {
        Kind::Crash
    } else {
        match mix(i, 1) % 100 {
            0..30 => Kind::Reply,
            30..60 => Kind::Stream,
            60..75 => Kind::Cancel,
            75..85 => Kind::Cut,
            85..95 => Kind::Busy,
            _ => Kind::Refused,
        }
    };
    let provider = if mix(i, 2).is_multiple_of(2) {
        Provider::OpenAi
    } else {
        Provider::Anthropic
    };
    // At least 5 words: every reply ("Hello! You said: " + the prompt) is
    // longer than the cut and hold points.
    let words = 5 + (mix(i, 3) % 16) as usize;
    let text: Vec<&str> = (0..words)
        .map(|w| WORDS[(mix(i, 10 + w as u64) % WORDS.len() as u64) as usize])
        .collect();
    Plan {
        i,
        kind,
        provider,
        k: 1 + (mix(i, 4) % 4) as usize,
        stream: mix(i, 5).is_multiple_of(2),
        continues: kind != Kind::Crash && mix(i, 6).is_multiple_of(4),
        message: format!("ledger turn {i:04} {}", text.join(" ")),
    }
}

/// The turn number in a message ("ledger turn 0042 …").
fn turn_of(text: &str) -> Option<usize> {
    let rest = text.strip_prefix("ledger turn ")?;
    rest.get(..4)?.parse().ok()
}

/// Lanes run by user: even lanes are Alice's, odd lanes Bob's.
fn user_of(i: usize) -> &'static str {
    if (i % LANES).is_multiple_of(2) {
        ALICE
    } else {
        BOB
    }
}

/// What the client saw of a turn.
#[derive(Debug)]
struct Seen {
    i: usize,
    chat: Option<String>,
    /// The usage in the POST /chat reply or the `done` event.
    usage: Option<Value>,
}

async fn run_turn(
    client: &reqwest::Client,
    base: &str,
    llmock: &str,
    p: &Plan,
    chat: Option<&str>,
) -> Seen {
    if p.kind == Kind::Busy {
        // One 429 more for the busy model, consumed by this turn's first
        // attempt — or by another busy turn's, whichever comes first: in
        // all, each busy turn brings one 429 and a turn succeeds only once
        // none is left, so the queue stays short and every 429 is met.
        let res = client
            .post(format!("{llmock}/_llmock/scenario"))
            .json(&json!({ "behaviors": [{
                "type": "fail", "status": 429, "retry_after": 0.1, "times": 1,
                "match": { "model": p.provider.upstream("busy") },
            }] }))
            .send()
            .await
            .expect("llmock scenario");
        assert!(res.status().is_success());
    }
    let mut body = json!({ "message": p.message, "model": model_name(p.kind, p.provider) });
    if let Some(chat) = chat {
        body["chat_id"] = Value::from(chat);
    }
    let streams = match p.kind {
        Kind::Reply | Kind::Refused => false,
        Kind::Busy => p.stream,
        _ => true,
    };
    let path = if streams { "/chat/stream" } else { "/chat" };
    let res = client
        .post(format!("{base}{path}"))
        .header("x-org-id", ACME)
        .header("x-user-id", user_of(p.i))
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = res.status().as_u16();
    if !streams {
        let reply: Value = res.json().await.unwrap_or(Value::Null);
        if p.kind == Kind::Refused {
            assert_eq!(status, 502, "turn {}: {reply}", p.i);
            return Seen {
                i: p.i,
                chat: None,
                usage: None,
            };
        }
        assert_eq!(status, 200, "turn {} ({:?}): {reply}", p.i, p.kind);
        return Seen {
            i: p.i,
            chat: reply["chat_id"].as_str().map(str::to_owned),
            usage: Some(reply["usage"].clone()),
        };
    }
    assert_eq!(status, 200, "turn {} ({:?})", p.i, p.kind);
    let chat = res
        .headers()
        .get("x-chat-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut reader = SseReader::new(res);
    if p.kind == Kind::Cancel {
        let mut tokens = 0;
        while tokens < p.k {
            let ev = reader
                .next_json()
                .await
                .unwrap_or_else(|| panic!("turn {}: stream ended early", p.i));
            assert_eq!(ev["done"], false, "turn {}: {ev}", p.i);
            tokens += usize::from(ev["token"].as_str().is_some_and(|t| !t.is_empty()));
        }
        drop(reader);
        return Seen {
            i: p.i,
            chat,
            usage: None,
        };
    }
    let (events, _) = reader.all().await;
    let last = events.last().cloned().unwrap_or(Value::Null);
    if p.kind == Kind::Cut {
        assert_eq!(last["error"], "Stream failed", "turn {}: {last}", p.i);
        assert!(events.len() > 1, "turn {}: tokens before the cut", p.i);
        return Seen {
            i: p.i,
            chat,
            usage: None,
        };
    }
    assert_eq!(last["done"], true, "turn {} ({:?}): {last}", p.i, p.kind);
    Seen {
        i: p.i,
        chat,
        usage: Some(last["usage"].clone()),
    }
}

/// Run `plans` over `LANES` lanes; lane `i % LANES` runs turn `i`.
async fn run_phase(
    client: &reqwest::Client,
    base: &str,
    llmock: &str,
    plans: &[Plan],
) -> Vec<Seen> {
    let mut lanes: Vec<Vec<Plan>> = vec![Vec::new(); LANES];
    for p in plans {
        lanes[p.i % LANES].push(p.clone());
    }
    let mut tasks = Vec::new();
    for lane in lanes {
        let client = client.clone();
        let base = base.to_owned();
        let llmock = llmock.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut last_chat: Option<String> = None;
            let mut seen = Vec::new();
            for p in lane {
                let chat = if p.continues {
                    last_chat.as_deref()
                } else {
                    None
                };
                let s = run_turn(&client, &base, &llmock, &p, chat).await;
                if s.chat.is_some() {
                    last_chat = s.chat.clone();
                }
                seen.push(s);
            }
            seen
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.extend(t.await.expect("lane"));
    }
    out
}

// ---- the database, read directly --------------------------------------------

#[derive(Clone, Debug)]
struct MessageRow {
    id: Uuid,
    chat: Uuid,
    user: Uuid,
    role: String,
    content: String,
    status: String,
    seq: i64,
    model: Option<String>,
    prompt: Option<i64>,
    completion: Option<i64>,
    source: Option<String>,
}

#[derive(Clone, Debug)]
struct LedgerRow {
    message: Uuid,
    org: Uuid,
    user: Uuid,
    chat: Uuid,
    model: String,
    status: String,
    prompt: i64,
    completion: i64,
    source: String,
    cost: i64,
}

const MESSAGES_SQL: &str = "SELECT m.id, m.chat_id, c.user_id, m.role, m.content, m.status, \
     m.seq, m.model, m.prompt_tokens, m.completion_tokens, m.usage_source \
     FROM messages m JOIN chats c ON c.id = m.chat_id";
const LEDGER_SQL: &str = "SELECT turn_id AS message_id, org_id, user_id, chat_id, model, status, \
     prompt_tokens, completion_tokens, source, cost_micro_usd FROM usage_ledger";

macro_rules! read_tables {
    ($conn:expr) => {{
        let mut conn = $conn;
        let messages: Vec<MessageRow> = sqlx::query(MESSAGES_SQL)
            .fetch_all(&mut conn)
            .await
            .expect("read messages")
            .iter()
            .map(|r| MessageRow {
                id: r.get("id"),
                chat: r.get("chat_id"),
                user: r.get("user_id"),
                role: r.get("role"),
                content: r.get("content"),
                status: r.get("status"),
                seq: r.get("seq"),
                model: r.get("model"),
                prompt: r.get("prompt_tokens"),
                completion: r.get("completion_tokens"),
                source: r.get("usage_source"),
            })
            .collect();
        let ledger: Vec<LedgerRow> = sqlx::query(LEDGER_SQL)
            .fetch_all(&mut conn)
            .await
            .expect("read usage_ledger")
            .iter()
            .map(|r| LedgerRow {
                message: r.get("message_id"),
                org: r.get("org_id"),
                user: r.get("user_id"),
                chat: r.get("chat_id"),
                model: r.get("model"),
                status: r.get("status"),
                prompt: r.get("prompt_tokens"),
                completion: r.get("completion_tokens"),
                source: r.get("source"),
                cost: r.get("cost_micro_usd"),
            })
            .collect();
        let _ = conn.close().await;
        (messages, ledger)
    }};
}

async fn read_db(db: &TestDb) -> (Vec<MessageRow>, Vec<LedgerRow>) {
    match db.kind {
        Db::Postgres => read_tables!(sqlx::PgConnection::connect(&db.url).await.expect("pg")),
        Db::Sqlite => read_tables!(
            sqlx::SqliteConnection::connect(&db.url)
                .await
                .expect("sqlite")
        ),
    }
}

/// Assistant messages by turn number (through the user message before each).
fn assistant_by_turn(messages: &[MessageRow]) -> BTreeMap<usize, MessageRow> {
    let users: HashMap<(Uuid, i64), &MessageRow> = messages
        .iter()
        .filter(|m| m.role == "user")
        .map(|m| ((m.chat, m.seq), m))
        .collect();
    let mut out = BTreeMap::new();
    for m in messages.iter().filter(|m| m.role == "assistant") {
        let asked = users
            .get(&(m.chat, m.seq - 1))
            .unwrap_or_else(|| panic!("assistant message {} without its user message", m.id));
        let turn = turn_of(&asked.content)
            .unwrap_or_else(|| panic!("unexpected user message {:?}", asked.content));
        assert!(
            out.insert(turn, m.clone()).is_none(),
            "turn {turn} has two assistant messages"
        );
    }
    out
}

/// Poll until `done(assistant messages by turn)`; panic after `within`.
async fn wait_for_db(
    db: &TestDb,
    within: Duration,
    what: &str,
    done: impl Fn(&BTreeMap<usize, MessageRow>) -> bool,
) -> (Vec<MessageRow>, Vec<LedgerRow>) {
    let started = Instant::now();
    loop {
        let (messages, ledger) = read_db(db).await;
        if done(&assistant_by_turn(&messages)) {
            return (messages, ledger);
        }
        let streaming: Vec<_> = assistant_by_turn(&messages)
            .into_iter()
            .filter(|(_, m)| m.status == "streaming")
            .map(|(i, _)| i)
            .collect();
        assert!(
            started.elapsed() < within,
            "{what}: not within {within:?}; still streaming: {streaming:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---- what llmock reported ----------------------------------------------------

/// The text of a message in an upstream request (string or text parts).
fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// The turn an upstream request belongs to: the new user message, at the
/// end of the last message (on Anthropic's route, a user message whose
/// reply was not sent back is joined to the next one).
fn turn_of_request(r: &LlmockRequest) -> usize {
    let last = r.body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .unwrap_or_else(|| panic!("request without messages: {r:?}"));
    let text = content_text(&last["content"]);
    text.rfind("ledger turn ")
        .and_then(|at| turn_of(&text[at..]))
        .unwrap_or_else(|| panic!("request of no turn: {}", r.body))
}

/// llmock's own usage for the request it served: the journaled body is sent
/// again, without streaming, and llmock's `usage` read back. (llmock decides
/// a reply and its usage from the messages alone — the same `Completion` for
/// a stream and a plain reply — and its journal keeps the request, not the
/// usage it sent.)
async fn reported_usage(client: &reqwest::Client, mock: &Llmock, r: &LlmockRequest) -> (i64, i64) {
    let mut body = r.body.clone();
    body["stream"] = Value::Bool(false);
    if let Some(o) = body.as_object_mut() {
        o.remove("stream_options");
    }
    let mut req = client.post(format!("{}{}", mock.base_url(), r.path));
    if r.provider == "anthropic" {
        req = req
            .header("x-api-key", "sk-ant-test")
            .header("anthropic-version", "2023-06-01");
    }
    let res = req.json(&body).send().await.expect("replay to llmock");
    assert_eq!(res.status(), 200, "replay of {}", r.body);
    let v: Value = res.json().await.expect("llmock reply");
    let u = &v["usage"];
    if r.provider == "anthropic" {
        (
            u["input_tokens"].as_i64().unwrap(),
            u["output_tokens"].as_i64().unwrap(),
        )
    } else {
        (
            u["prompt_tokens"].as_i64().unwrap(),
            u["completion_tokens"].as_i64().unwrap(),
        )
    }
}

// ---- GET /usage ----------------------------------------------------------------

#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Totals {
    turns: i64,
    prompt: i64,
    completion: i64,
    cost_micro: i64,
}

impl Totals {
    fn add(&mut self, row: &LedgerRow) {
        self.turns += 1;
        self.prompt += row.prompt;
        self.completion += row.completion;
        self.cost_micro += row.cost;
    }

    /// Assert a report's totals (or group) are these.
    fn check(&self, got: &Value, what: &str) {
        assert_eq!(got["turns"].as_i64(), Some(self.turns), "{what}: {got}");
        assert_eq!(
            got["prompt_tokens"].as_i64(),
            Some(self.prompt),
            "{what}: {got}"
        );
        assert_eq!(
            got["completion_tokens"].as_i64(),
            Some(self.completion),
            "{what}: {got}"
        );
        assert_eq!(
            got["cost_usd"].as_f64(),
            Some(self.cost_micro as f64 / 1_000_000.0),
            "{what}: {got}"
        );
    }
}

async fn usage_report(client: &reqwest::Client, base: &str, user: &str, group: &str) -> Value {
    let res = client
        .get(format!("{base}/usage?{RANGE}&group_by={group}"))
        .header("x-org-id", ACME)
        .header("x-user-id", user)
        .send()
        .await
        .expect("GET /usage");
    assert_eq!(res.status(), 200);
    res.json().await.expect("usage JSON")
}

/// A report's groups against the expected totals by key, both ways.
fn check_groups(report: &Value, expected: &BTreeMap<String, Totals>, what: &str) {
    let groups = report["groups"].as_array().expect("groups");
    let keys: Vec<&str> = groups.iter().filter_map(|g| g["key"].as_str()).collect();
    let want: Vec<&str> = expected.keys().map(String::as_str).collect();
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, want, "{what}: group keys");
    for g in groups {
        let key = g["key"].as_str().unwrap();
        expected[key].check(g, &format!("{what} {key}"));
    }
}

async fn a_thousand_mixed_turns_and_a_crash_leave_an_exact_ledger(db: Db) {
    let started = Instant::now();
    let mock = Llmock::start(LlmockOpts {
        echo: true,
        chunk_delay_ms: 1,
    })
    .await;
    let models = ModelsFile::new(&models_toml(&mock));
    let db = TestDb::new(db).await;
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("MODELS_FILE", models.path.as_str()),
        (ANTHROPIC_KEY_VAR, "sk-ant-test"),
        ("PROVIDER_RETRY_BASE_MS", "50"),
        ("PROVIDER_MAX_RETRIES", "10"),
        ("STREAM_STALE_SECONDS", "2"),
        ("RATE_LIMIT_BURST", "100000"),
        ("RATE_LIMIT_PER_SECOND", "100000"),
        ("SHUTDOWN_GRACE_SECONDS", "2"),
        ("LOG_LEVEL", "warn"),
    ];
    // Faults scoped by upstream model, for as long as the test runs.
    for provider in [Provider::OpenAi, Provider::Anthropic] {
        mock.scenario(json!([
            { "type": "stream_fault", "kind": "truncate", "after_chunks": CUT_AFTER_CHUNKS,
              "times": null, "match": { "model": provider.upstream("cut"), "stream": true } },
            { "type": "stream_fault", "kind": "stall", "after_chunks": HOLD_AFTER_CHUNKS,
              "stall_seconds": 60, "times": null,
              "match": { "model": provider.upstream("hold"), "stream": true } },
            { "type": "fail", "status": 400, "times": null,
              "match": { "model": provider.upstream("bad") } },
        ]))
        .await;
    }
    let plans: Vec<Plan> = (0..TURNS).map(plan).collect();
    let mut kinds: BTreeMap<Kind, usize> = BTreeMap::new();
    for p in &plans {
        *kinds.entry(p.kind).or_default() += 1;
    }
    eprintln!("ledger_exact: turns by kind {kinds:?}");
    for kind in [
        Kind::Reply,
        Kind::Stream,
        Kind::Cancel,
        Kind::Cut,
        Kind::Busy,
        Kind::Refused,
    ] {
        assert!(kinds.get(&kind).copied().unwrap_or(0) >= 20, "{kind:?}");
    }
    let mut busy: HashMap<Provider, u64> = HashMap::new();
    for p in plans.iter().filter(|p| p.kind == Kind::Busy) {
        *busy.entry(p.provider).or_default() += 1;
    }
    // It also calls llmock (scenarios, usage probes): a peer's client.
    let client = peer_client();

    // Phase 1: half the mixed turns.
    let mut server = Confab::start(&env).await;
    let first = &plans[..CRASH_AT];
    let mut seen = run_phase(&client, &server.base, &mock.base_url(), first).await;
    eprintln!("ledger_exact: phase 1 done at {:?}", started.elapsed());

    // 20 live streams (tokens flowing, then the upstream stalls), SIGKILL.
    let crash = &plans[CRASH_AT..CRASH_AT + CRASH_STREAMS];
    let mut live = Vec::new();
    for p in crash {
        let res = client
            .post(server.url("/chat/stream"))
            .header("x-org-id", ACME)
            .header("x-user-id", user_of(p.i))
            .json(&json!({ "message": p.message, "model": model_name(p.kind, p.provider) }))
            .send()
            .await
            .expect("stream");
        assert_eq!(res.status(), 200);
        let mut reader = SseReader::new(res);
        let ev = reader.next_json().await.expect("a first token");
        assert!(ev["token"].is_string(), "{ev}");
        live.push(reader);
    }
    // Kill once each has its partial text saved (every STREAM_FLUSH_MS, 1 s).
    wait_for_db(
        &db,
        Duration::from_secs(15),
        "partial text saved",
        |by_turn| {
            crash.iter().all(|p| {
                by_turn
                    .get(&p.i)
                    .is_some_and(|m| m.status == "streaming" && !m.content.is_empty())
            })
        },
    )
    .await;
    server.signal("KILL");
    assert_eq!(server.wait(Duration::from_secs(10)).await, None);
    drop(live);

    // Restart on the same database: the dead process's streams become
    // `interrupted` (one ledger row each), and turns go on.
    let server = Confab::start(&env).await;
    wait_for_db(&db, Duration::from_secs(20), "crash recovery", |by_turn| {
        crash
            .iter()
            .all(|p| by_turn.get(&p.i).is_some_and(|m| m.status == "interrupted"))
    })
    .await;
    eprintln!("ledger_exact: recovered at {:?}", started.elapsed());
    let second = &plans[CRASH_AT + CRASH_STREAMS..];
    seen.extend(run_phase(&client, &server.base, &mock.base_url(), second).await);
    // Dropped streams settle within a second of the drop.
    let (messages, ledger) = wait_for_db(&db, Duration::from_secs(20), "settled", |by_turn| {
        by_turn.len() == TURNS && by_turn.values().all(|m| m.status != "streaming")
    })
    .await;
    eprintln!("ledger_exact: all settled at {:?}", started.elapsed());
    let reports = (
        usage_report(&client, &server.base, ALICE, "model").await,
        usage_report(&client, &server.base, ALICE, "user").await,
        usage_report(&client, &server.base, BOB, "user").await,
    );
    server.signal("TERM");
    let mut server = server;
    assert_eq!(server.wait(Duration::from_secs(15)).await, Some(0));
    // Nothing changed while the reports were read, nor at shutdown.
    let (_, ledger_after) = read_db(&db).await;
    assert_eq!(ledger_after.len(), ledger.len());

    // ---- ledger rows == finished assistant messages, each exactly once ----
    let by_turn = assistant_by_turn(&messages);
    assert_eq!(by_turn.len(), TURNS, "one assistant message per turn");
    let assistants: HashMap<Uuid, &MessageRow> = messages
        .iter()
        .filter(|m| m.role == "assistant")
        .map(|m| (m.id, m))
        .collect();
    assert_eq!(assistants.len(), TURNS);
    let mut rows: HashMap<Uuid, &LedgerRow> = HashMap::new();
    for row in &ledger {
        assert!(
            rows.insert(row.message, row).is_none(),
            "two ledger rows for {}",
            row.message
        );
    }
    assert_eq!(ledger.len(), TURNS, "one ledger row per finished turn");
    let ids: HashSet<Uuid> = rows.keys().copied().collect();
    assert_eq!(
        ids,
        assistants.keys().copied().collect::<HashSet<_>>(),
        "the ledger's messages are the assistant messages"
    );
    let acme: Uuid = ACME.parse().unwrap();
    for (i, m) in &by_turn {
        let p = &plans[*i];
        let row = rows[&m.id];
        let what = format!("turn {i} ({:?}, {:?})", p.kind, p.provider);
        assert_eq!(m.status, p.kind.status(), "{what}");
        assert_eq!(row.status, m.status, "{what}");
        assert_eq!(row.model, model_name(p.kind, p.provider), "{what}");
        assert_eq!(m.model.as_deref(), Some(row.model.as_str()), "{what}");
        assert_eq!(row.org, acme, "{what}");
        assert_eq!(row.chat, m.chat, "{what}");
        assert_eq!(row.user, m.user, "{what}");
        assert_eq!(row.user.to_string(), user_of(*i), "{what}");
        assert_eq!(m.prompt, Some(row.prompt), "{what}");
        assert_eq!(m.completion, Some(row.completion), "{what}");
        assert_eq!(m.source.as_deref(), Some(row.source.as_str()), "{what}");
        let complete = m.status == "complete";
        assert_eq!(
            row.source,
            if complete { "provider" } else { "estimated" },
            "{what}"
        );
        // Cost from the model's prices; crash-recovered turns cost 0 (README).
        let (input, output) = p.provider.prices();
        let cost = if p.kind == Kind::Crash {
            0
        } else {
            (row.prompt as f64 * input + row.completion as f64 * output).round() as i64
        };
        assert_eq!(row.cost, cost, "{what}");
        match p.kind {
            Kind::Refused => assert_eq!((row.prompt, row.completion), (0, 0), "{what}"),
            Kind::Cancel | Kind::Cut | Kind::Crash => {
                assert!(!m.content.is_empty(), "{what}: partial text kept");
                assert!(row.completion > 0, "{what}");
                // The model had the prompt: counted, even after a crash
                // (saved with the partial text).
                assert!(row.prompt > 0, "{what}");
            }
            _ => assert!(row.completion > 0 && row.prompt > 0, "{what}"),
        }
    }
    // What the client was told is what was stored.
    assert_eq!(seen.len(), TURNS - CRASH_STREAMS);
    for s in &seen {
        if let Some(usage) = &s.usage {
            let m = &by_turn[&s.i];
            assert_eq!(usage["prompt_tokens"].as_i64(), m.prompt, "turn {}", s.i);
            assert_eq!(
                usage["completion_tokens"].as_i64(),
                m.completion,
                "turn {}",
                s.i
            );
            assert_eq!(
                usage["source"].as_str(),
                m.source.as_deref(),
                "turn {}",
                s.i
            );
        }
    }

    // ---- == what the upstream reported, for every turn it reported on ----
    let journal: Vec<LlmockRequest> = mock
        .journal()
        .await
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect();
    let mut attempts: BTreeMap<usize, Vec<&LlmockRequest>> = BTreeMap::new();
    for r in &journal {
        attempts.entry(turn_of_request(r)).or_default().push(r);
    }
    let missing: Vec<(usize, Kind)> = (0..TURNS)
        .filter(|i| !attempts.contains_key(i))
        .map(|i| (i, plans[i].kind))
        .collect();
    assert!(
        missing.is_empty(),
        "every turn reached the upstream; not in llmock's journal: {missing:?}"
    );
    assert_eq!(attempts.len(), TURNS);
    let mut rate_limited: HashMap<Provider, u64> = HashMap::new();
    let mut last_attempt: Vec<(usize, LlmockRequest)> = Vec::new();
    for (i, tries) in &attempts {
        let p = &plans[*i];
        let what = format!("turn {i} ({:?}, {:?})", p.kind, p.provider);
        let (last, before) = tries.split_last().unwrap();
        assert!(
            before
                .iter()
                .all(|r| r.status == 429 && p.kind == Kind::Busy),
            "{what}: only a busy turn is retried, after a 429: {tries:?}"
        );
        *rate_limited.entry(p.provider).or_default() += before.len() as u64;
        match p.kind {
            Kind::Reply | Kind::Stream | Kind::Busy => {
                assert!(last.status == 200 && last.completed, "{what}: {last:?}")
            }
            Kind::Refused => assert_eq!(last.status, 400, "{what}"),
            Kind::Cut => assert_eq!(
                last.fault.as_deref(),
                Some(format!("stream:truncate@{CUT_AFTER_CHUNKS}").as_str()),
                "{what}"
            ),
            Kind::Cancel | Kind::Crash => {
                assert!(!last.completed, "{what}: the client went away: {last:?}")
            }
        }
        last_attempt.push((*i, (*last).clone()));
    }
    assert_eq!(
        rate_limited, busy,
        "every queued 429 was met, by busy turns only"
    );
    // Fault-free again: the replays below get llmock's plain answer.
    mock.clear_scenario().await;
    let reported: HashMap<usize, (i64, i64)> = futures::stream::iter(
        last_attempt
            .into_iter()
            .filter(|(i, _)| plans[*i].kind != Kind::Refused),
    )
    .map(|(i, r)| {
        let client = client.clone();
        let mock = &mock;
        async move { (i, reported_usage(&client, mock, &r).await) }
    })
    .buffer_unordered(8)
    .collect()
    .await;
    let mut provider_turns = 0;
    for (i, m) in &by_turn {
        let p = &plans[*i];
        let what = format!("turn {i} ({:?}, {:?})", p.kind, p.provider);
        let usage = (m.prompt.unwrap(), m.completion.unwrap());
        if m.source.as_deref() == Some("provider") {
            // The upstream's final report: exactly its figures.
            assert_eq!(usage, reported[i], "{what}");
            provider_turns += 1;
        } else if p.provider == Provider::Anthropic && matches!(p.kind, Kind::Cancel | Kind::Cut) {
            // Cut short after message_start, which reports the prompt.
            assert_eq!(usage.0, reported[i].0, "{what}: the reported prompt");
        }
    }
    assert_eq!(
        provider_turns,
        kinds[&Kind::Reply] + kinds[&Kind::Stream] + kinds[&Kind::Busy]
    );

    // ---- GET /usage totals == ledger totals, per model and per user ----
    let mut all = Totals::default();
    let mut per_model: BTreeMap<String, Totals> = BTreeMap::new();
    let mut per_user: BTreeMap<String, Totals> = BTreeMap::new();
    for row in &ledger {
        all.add(row);
        per_model.entry(row.model.clone()).or_default().add(row);
        per_user.entry(row.user.to_string()).or_default().add(row);
    }
    // The messages' usage sums to the same totals.
    let msg_prompt: i64 = assistants.values().map(|m| m.prompt.unwrap()).sum();
    let msg_completion: i64 = assistants.values().map(|m| m.completion.unwrap()).sum();
    assert_eq!((msg_prompt, msg_completion), (all.prompt, all.completion));
    let (by_model, by_user, bobs) = &reports;
    all.check(&by_model["totals"], "GET /usage totals");
    all.check(&by_user["totals"], "GET /usage?group_by=user totals");
    check_groups(by_model, &per_model, "GET /usage?group_by=model");
    check_groups(by_user, &per_user, "GET /usage?group_by=user");
    assert_eq!(per_model.len(), 10, "every model has turns");
    assert_eq!(per_user.len(), 2);
    // A member sees only their own turns.
    per_user[BOB].check(&bobs["totals"], "Bob's GET /usage");
    let bob_only: BTreeMap<String, Totals> =
        [(BOB.to_owned(), per_user[BOB])].into_iter().collect();
    check_groups(bobs, &bob_only, "Bob's GET /usage?group_by=user");
    eprintln!(
        "ledger_exact: {} turns, {} ledger rows, {} provider-reported, {} prompt + {} completion \
         tokens, {} micro-USD; checked in {:?}",
        TURNS,
        ledger.len(),
        provider_turns,
        all.prompt,
        all.completion,
        all.cost_micro,
        started.elapsed()
    );
}

/// Through POST /chat: a turn reserves its counted prompt + max_output_tokens
/// (256) and settles to its actual, much smaller usage; the next identical
/// turn only fits because the difference came back.
async fn a_turn_that_settles_below_its_reservation_gives_the_difference_back(kind: Limiter) {
    let mock = Llmock::start(LlmockOpts::default()).await;
    let models = ModelsFile::new(&llmock_models(&mock));
    let redis = (kind == Limiter::Redis).then(PrivateRedis::start);
    let url = redis.as_ref().map(|r| r.url());
    let mut env = vec![("REDIS_TIMEOUT_MS", "3000")];
    if let Some(url) = &url {
        env.push(("REDIS_URL", url.as_str()));
    }
    let app = app_with_models(Db::Sqlite, &models, &env).await;
    let limit: i64 = 400;
    app.limit_acme_per_day(limit as u64).await;
    let turn = || async {
        let res = app
            .post_json(
                "/chat",
                &As::alice(),
                &json!({ "message": "the same short question", "model": "mock-openai" }),
            )
            .await;
        let status = res.status().as_u16();
        let remaining = res
            .headers()
            .get("x-tokenlimit-remaining")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i64>().ok());
        let body: Value = res.json().await.unwrap();
        (status, remaining, body)
    };
    // Turn 1 reserves r1 = limit − remaining1 and uses u1 < r1.
    let (status, remaining1, first) = turn().await;
    assert_eq!(status, 200, "{first}");
    let r1 = limit - remaining1.expect("X-TokenLimit-Remaining");
    let u1 = first["usage"]["prompt_tokens"].as_i64().unwrap()
        + first["usage"]["completion_tokens"].as_i64().unwrap();
    assert!(r1 > 256 && u1 < r1, "reserved {r1}, used {u1}");
    assert!(
        remaining1.unwrap() < r1,
        "without the difference back, the same turn would not fit"
    );
    // Turn 2, the same size, is admitted: only u1 is still counted. And so
    // on: each turn is admitted exactly while what the earlier ones used
    // leaves room for its reservation; the first that does not fit is
    // refused before the model.
    let mut used = u1;
    let mut admitted = 1;
    loop {
        let fits = limit - used >= r1;
        let (status, remaining, body) = turn().await;
        if !fits {
            assert_eq!(status, 429, "{body}");
            assert_eq!(body["remaining"], limit - used, "{body}");
            break;
        }
        assert_eq!(status, 200, "{body}");
        assert_eq!(remaining, Some(limit - used - r1), "{body}");
        used += body["usage"]["prompt_tokens"].as_i64().unwrap()
            + body["usage"]["completion_tokens"].as_i64().unwrap();
        admitted += 1;
        assert!(admitted < 50, "never refused");
    }
    assert!(
        admitted >= 2,
        "the second turn fitted only thanks to the first's difference"
    );
    eprintln!("reserved {r1} per turn, {admitted} turns admitted within {limit}, {used} used");
    let upstream = mock
        .journal()
        .await
        .iter()
        .filter(|r| r.method == "POST")
        .count();
    assert_eq!(
        upstream, admitted,
        "the refused turn never reached the model"
    );
    let (_, report) = app.get_json("/usage", &As::alice()).await;
    assert_eq!(report["totals"]["turns"], admitted, "{report}");
    assert_eq!(
        report["totals"]["prompt_tokens"].as_i64().unwrap()
            + report["totals"]["completion_tokens"].as_i64().unwrap(),
        used,
        "{report}"
    );
}
