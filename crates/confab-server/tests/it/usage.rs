//! The usage ledger and token budgets (SPEC §12) through HTTP, against
//! llmock: every finished turn counted exactly once, on every exit path;
//! budgets refused before any upstream call and never exceeded, on one
//! instance and across two processes sharing PostgreSQL and Redis.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::Barrier;

use crate::llm::{ModelsFile, app_with_models, llmock_models, stored};
use crate::support::app::{ACME, ALICE, BOB};
use crate::support::peers::{Llmock, LlmockOpts};
use crate::support::process::{Confab, PrivateRedis, command, seeded_postgres};
use crate::support::sse::SseReader;
use crate::support::{As, Db, Limiter, TestApp, spawn_app_with};
use crate::{per_limiter, per_store};

per_store!(
    the_ledger_counts_every_finished_turn_exactly_once,
    the_cli_sets_token_limits_and_prints_the_usage_report,
    an_answered_retry_is_replayed_whatever_the_budget_says_now,
);
per_limiter!(
    a_token_budget_is_refused_before_any_upstream_call_and_never_exceeded,
    under_a_token_budget_every_turn_request_takes_exactly_one_rate_limit_token,
);

async fn an_answered_retry_is_replayed_whatever_the_budget_says_now(db: Db) {
    // The first request uses the org's budget up (here: the limit drops to
    // one token after it); its retry must still get the stored answer, not
    // a 429 for a reservation it never needed.
    let app = spawn_app_with(db, &[("AUTH_CACHE_TTL_SECONDS", "0.2")]).await;
    let alice = As::alice();
    let send = |key: &'static str| {
        app.request(reqwest::Method::POST, "/chat", &alice)
            .header("idempotency-key", key)
            .json(&json!({ "message": "answer me once" }))
            .send()
    };
    let first = send("spent-it").await.unwrap();
    assert_eq!(first.status(), 200);
    let first: Value = first.json().await.unwrap();
    app.limit_acme_per_day(1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused = send("a-new-one").await.unwrap();
    assert_eq!(refused.status(), 429, "the budget refuses new turns now");
    let retry = send("spent-it").await.unwrap();
    assert_eq!(retry.status(), 200);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let retry: Value = retry.json().await.unwrap();
    assert_eq!(retry, first);
}

/// Every assistant message of the caller's chats: (model, user, usage).
async fn assistant_messages(app: &TestApp, who: &As, user: &str) -> Vec<(String, String, Value)> {
    let (_, list) = app.get_json("/chats?limit=200", who).await;
    let mut out = Vec::new();
    for chat in list["chats"].as_array().unwrap() {
        for m in stored(app, chat["id"].as_str().unwrap()).await {
            if m["role"] == "assistant" {
                assert_ne!(m["status"], "streaming", "{m}");
                out.push((
                    m["model"].as_str().unwrap().to_owned(),
                    user.to_owned(),
                    m["usage"].clone(),
                ));
            }
        }
    }
    out
}

fn sums<'a>(usages: impl Iterator<Item = &'a Value>) -> (i64, i64, i64) {
    usages.fold((0, 0, 0), |(n, p, c), u| {
        (
            n + 1,
            p + u["prompt_tokens"].as_i64().unwrap(),
            c + u["completion_tokens"].as_i64().unwrap(),
        )
    })
}

fn totals(report: &Value) -> (i64, i64, i64) {
    let t = &report["totals"];
    (
        t["turns"].as_i64().unwrap(),
        t["prompt_tokens"].as_i64().unwrap(),
        t["completion_tokens"].as_i64().unwrap(),
    )
}

async fn wait_until_settled(app: &TestApp) {
    for _ in 0..100 {
        if app.state.engine.flusher().is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("turns still running");
}

async fn the_ledger_counts_every_finished_turn_exactly_once(db: Db) {
    let mock = Llmock::start(LlmockOpts {
        echo: true,
        chunk_delay_ms: 20,
    })
    .await;
    let models = ModelsFile::new(&llmock_models(&mock));
    let app = app_with_models(db, &models, &[]).await;
    let (alice, bob) = (As::alice(), As::bob());
    // Complete turns, on both models and as both users.
    for (who, model) in [
        (&alice, "mock-openai"),
        (&bob, "mock-anthropic"),
        (&alice, "mock-anthropic"),
    ] {
        let res = app
            .post_json(
                "/chat",
                who,
                &json!({ "message": "count me once", "model": model }),
            )
            .await;
        assert_eq!(res.status(), 200);
    }
    // An idempotent retry replays: still one turn.
    for _ in 0..2 {
        let res = app
            .request(reqwest::Method::POST, "/chat", &alice)
            .header("idempotency-key", "ledger-once")
            .json(&json!({ "message": "only once" }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    // Cancelled after two tokens.
    let res = app
        .post_json(
            "/chat/stream",
            &bob,
            &json!({ "message": "one two three four five six seven" }),
        )
        .await;
    let mut reader = SseReader::new(res);
    reader.next_json().await.unwrap();
    reader.next_json().await.unwrap();
    drop(reader);
    // Failed mid-stream, failed before any token, and a 429 then a retry.
    mock.scenario(
        json!({"type": "stream_fault", "kind": "truncate", "after_chunks": 6, "times": 1}),
    )
    .await;
    let (events, _) = SseReader::new(
        app.post_json(
            "/chat/stream",
            &alice,
            &json!({ "message": "cut me somewhere in the middle please" }),
        )
        .await,
    )
    .all()
    .await;
    assert_eq!(events.last().unwrap()["error"], "Stream failed");
    mock.scenario(json!({"type": "fail", "status": 400, "times": 1}))
        .await;
    let res = app
        .post_json("/chat", &alice, &json!({ "message": "refused" }))
        .await;
    assert_eq!(res.status(), 502);
    mock.scenario(json!({"type": "fail", "status": 429, "retry_after": 1, "times": 1}))
        .await;
    let res = app
        .post_json("/chat", &bob, &json!({ "message": "retried" }))
        .await;
    assert_eq!(res.status(), 200);
    wait_until_settled(&app).await;

    let mut messages = assistant_messages(&app, &alice, ALICE).await;
    messages.extend(assistant_messages(&app, &bob, BOB).await);
    assert_eq!(messages.len(), 8, "{messages:?}");
    let (_, report) = app.get_json("/usage?group_by=model", &alice).await;
    assert_eq!(
        totals(&report),
        sums(messages.iter().map(|m| &m.2)),
        "{report}"
    );
    for group in report["groups"].as_array().unwrap() {
        let model = group["key"].as_str().unwrap();
        let expected = sums(messages.iter().filter(|m| m.0 == model).map(|m| &m.2));
        assert_eq!(totals(&json!({ "totals": group })), expected, "{model}");
    }
    let (_, by_user) = app.get_json("/usage?group_by=user", &alice).await;
    let per_user: HashMap<&str, &Value> = by_user["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["key"].as_str().unwrap(), g))
        .collect();
    for user in [ALICE, BOB] {
        let expected = sums(messages.iter().filter(|m| m.1 == user).map(|m| &m.2));
        assert_eq!(
            totals(&json!({ "totals": per_user[user] })),
            expected,
            "{user}"
        );
    }
    // A member sees only their own usage.
    let (_, own) = app.get_json("/usage", &bob).await;
    assert_eq!(
        totals(&own),
        sums(messages.iter().filter(|m| m.1 == BOB).map(|m| &m.2))
    );
    // What the upstream reported is what was counted, for complete turns.
    let provider_turns = messages
        .iter()
        .filter(|m| m.2["source"] == "provider")
        .count();
    assert!(provider_turns >= 5, "{messages:?}");
    // Bad queries are 400s.
    for bad in [
        "/usage?group_by=org",
        "/usage?from=yesterday",
        "/usage?from=2026-12-02T00:00:00Z&to=2026-12-01T00:00:00Z",
    ] {
        assert_eq!(app.get(bad, &alice).await.status(), 400, "{bad}");
    }
}

async fn a_token_budget_is_refused_before_any_upstream_call_and_never_exceeded(kind: Limiter) {
    let mock = Llmock::start(LlmockOpts::default()).await;
    let models = ModelsFile::new(&llmock_models(&mock));
    let redis = (kind == Limiter::Redis).then(PrivateRedis::start);
    let url = redis.as_ref().map(|r| r.url());
    let mut env = vec![("REDIS_TIMEOUT_MS", "3000")];
    if let Some(url) = &url {
        env.push(("REDIS_URL", url.as_str()));
    }
    let app = app_with_models(Db::Sqlite, &models, &env).await;
    let limit = 3000u64;
    app.limit_acme_per_day(limit).await;
    let (ok, refused) = concurrent_turns(std::slice::from_ref(&app.base), 60).await;
    check_budget(&mock, &app, limit, ok, &refused).await;
}

/// `n` concurrent POST /chat as Alice over `bases`: (admitted, refusals).
async fn concurrent_turns(
    bases: &[String],
    n: usize,
) -> (usize, Vec<(reqwest::header::HeaderMap, Value)>) {
    let client = reqwest::Client::new();
    let barrier = std::sync::Arc::new(Barrier::new(n));
    let mut tasks = Vec::new();
    for i in 0..n {
        let req = client
            .post(format!("{}/chat", bases[i % bases.len()]))
            .header("x-org-id", ACME)
            .header("x-user-id", ALICE)
            .json(&json!({ "message": format!("turn number {i} of the budget test") }));
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let res = req.send().await.expect("request");
            let status = res.status().as_u16();
            let headers = res.headers().clone();
            let body: Value = res.json().await.unwrap_or(Value::Null);
            (status, headers, body)
        }));
    }
    let (mut ok, mut refused) = (0, Vec::new());
    for task in tasks {
        let (status, headers, body) = task.await.unwrap();
        match status {
            200 => {
                assert!(
                    headers.contains_key("x-tokenlimit-remaining"),
                    "{headers:?}"
                );
                ok += 1;
            }
            429 => refused.push((headers, body)),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    (ok, refused)
}

async fn check_budget(
    mock: &Llmock,
    app: &TestApp,
    limit: u64,
    ok: usize,
    refused: &[(reqwest::header::HeaderMap, Value)],
) {
    assert!(
        ok > 0 && !refused.is_empty(),
        "ok {ok}, refused {}",
        refused.len()
    );
    for (headers, body) in refused {
        assert_eq!(body["message"], "Token budget exceeded", "{body}");
        assert_eq!(body["limit"], limit);
        assert!(body["resetAt"].is_string());
        assert!(headers.contains_key("retry-after"));
        assert!(headers.contains_key("x-tokenlimit-limit"));
    }
    // Settled usage never passes the limit, and refused turns never reached
    // the upstream.
    let (_, report) = app.get_json("/usage", &As::alice()).await;
    let (turns, prompt, completion) = totals(&report);
    assert_eq!(turns as usize, ok, "{report}");
    assert!((prompt + completion) as u64 <= limit, "{report}");
    let upstream = mock
        .journal()
        .await
        .iter()
        .filter(|r| r.method == "POST")
        .count();
    assert_eq!(
        upstream, ok,
        "one upstream call per admitted turn, none for refusals"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_sharing_redis_never_settle_more_than_the_token_limit() {
    crate::support::init();
    let mock = Llmock::start(LlmockOpts::default()).await;
    let models = ModelsFile::new(&llmock_models(&mock));
    let db = seeded_postgres().await;
    let redis = PrivateRedis::start();
    let limit = 6000u64;
    let set = command(&[("DATABASE_URL", &db.url)])
        .args([
            "org",
            "set-token-limit",
            "acme-corp",
            "--per-minute",
            "0",
            "--per-day",
            &limit.to_string(),
        ])
        .output()
        .await
        .unwrap();
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("REDIS_URL", &redis.url()),
        ("REDIS_TIMEOUT_MS", "3000"),
        ("RATE_LIMIT_BURST", "100000"),
        ("MODELS_FILE", models.path.as_str()),
        ("CONFAB_TEST_ANTHROPIC_KEY", "sk-ant-test"),
        ("LOG_LEVEL", "warn"),
    ];
    let a = Confab::start(&env).await;
    let b = Confab::start(&env).await;
    let (ok, refused) = concurrent_turns(&[a.base.clone(), b.base.clone()], 200).await;
    assert!(
        ok > 0 && !refused.is_empty(),
        "ok {ok}, refused {}",
        refused.len()
    );
    let client = reqwest::Client::new();
    let report: Value = client
        .get(a.url("/usage"))
        .header("x-org-id", ACME)
        .header("x-user-id", ALICE)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (turns, prompt, completion) = totals(&report);
    assert_eq!(turns as usize, ok, "{report}");
    assert!((prompt + completion) as u64 <= limit, "{report}");
    let upstream = mock
        .journal()
        .await
        .iter()
        .filter(|r| r.method == "POST")
        .count();
    assert_eq!(upstream, ok);
}

async fn the_cli_sets_token_limits_and_prints_the_usage_report(db: Db) {
    let mock = Llmock::start(LlmockOpts::default()).await;
    let models = ModelsFile::new(&llmock_models(&mock));
    let app = app_with_models(db, &models, &[("AUTH_CACHE_TTL_SECONDS", "0.1")]).await;
    for _ in 0..2 {
        assert_eq!(
            app.post_json("/chat", &As::alice(), &json!({ "message": "bill me" }))
                .await
                .status(),
            200
        );
    }
    let url = app.db.url.clone();
    let run = |args: Vec<String>| {
        let url = url.clone();
        async move {
            let out = command(&[("DATABASE_URL", &url)])
                .args(&args)
                .output()
                .await
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let (code, stdout, stderr) = run(vec![
        "usage".into(),
        "--org".into(),
        "acme-corp".into(),
        "--group-by".into(),
        "model".into(),
    ])
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let printed: Value = serde_json::from_str(&stdout).unwrap();
    let (_, http) = app.get_json("/usage?group_by=model", &As::alice()).await;
    assert_eq!(printed["totals"], http["totals"]);
    assert_eq!(printed["groups"], http["groups"]);
    assert_eq!(printed["totals"]["turns"], 2);
    let (code, _, stderr) = run(vec![
        "usage".into(),
        "--org".into(),
        "acme-corp".into(),
        "--group-by".into(),
        "planet".into(),
    ])
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    let (code, stdout, _) = run(vec![
        "org".into(),
        "set-token-limit".into(),
        "acme-corp".into(),
        "--per-minute".into(),
        "100".into(),
        "--per-day".into(),
        "0".into(),
    ])
    .await;
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains("100 tokens per minute, unlimited per day"),
        "{stdout}"
    );
    let (code, _, _) = run(vec![
        "user".into(),
        "set-token-limit".into(),
        BOB.into(),
        "--per-day".into(),
        "5".into(),
    ])
    .await;
    assert_eq!(code, Some(0));
    let (code, _, stderr) = run(vec![
        "user".into(),
        "set-token-limit".into(),
        uuid::Uuid::new_v4().to_string(),
        "--per-day".into(),
        "5".into(),
    ])
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    // Bob's own limit (5 a day) refuses his next turn before the model.
    tokio::time::sleep(Duration::from_millis(300)).await; // past the 0.1 s auth cache TTL
    let res = app
        .post_json("/chat", &As::bob(), &json!({ "message": "too big for 5" }))
        .await;
    assert_eq!(res.status(), 429);
}

/// With a token budget, a turn's rate-limit token is taken by the turn
/// engine (with the reservation, for a new chat): whatever the route and
/// however the request ends, it takes exactly one token, carries the
/// `X-RateLimit-*` headers, and a refusal is SPEC §4's 429, which reserves
/// nothing.
async fn under_a_token_budget_every_turn_request_takes_exactly_one_rate_limit_token(kind: Limiter) {
    let redis = (kind == Limiter::Redis).then(PrivateRedis::start);
    let url = redis.as_ref().map(|r| r.url());
    let mut env = vec![
        ("RATE_LIMIT_BURST", "4"),
        ("RATE_LIMIT_PER_SECOND", "0.001"),
        ("REDIS_TIMEOUT_MS", "3000"),
    ];
    if let Some(url) = &url {
        env.push(("REDIS_URL", url.as_str()));
    }
    let app = spawn_app_with(Db::Sqlite, &env).await;
    app.limit_acme_per_day(1_000_000).await;
    let alice = As::alice();
    let remaining = |res: &reqwest::Response| {
        res.headers()
            .get("x-ratelimit-remaining")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
    };

    // Refused before the engine (no message): the token is taken after all.
    let res = app.post_json("/chat", &alice, &json!({})).await;
    assert_eq!(res.status(), 400);
    assert_eq!(remaining(&res), Some(3), "{:?}", res.headers());

    // A new chat: the token with the reservation.
    let res = app
        .post_json("/chat", &alice, &json!({ "message": "a new chat" }))
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(remaining(&res), Some(2), "{:?}", res.headers());
    assert!(res.headers().contains_key("x-tokenlimit-remaining"));
    let chat: Value = res.json().await.expect("json");
    let chat_id = chat["chat_id"].as_str().expect("chat_id").to_owned();

    // A turn on that chat: the token first, before the chat is read.
    let res = app
        .post_json(
            "/chat/stream",
            &alice,
            &json!({ "message": "more", "chat_id": chat_id }),
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(remaining(&res), Some(1), "{:?}", res.headers());
    let _ = res.text().await;

    // The OpenAI-compatible route, stateless: with the reservation.
    let completion =
        json!({ "model": "simulated", "messages": [{ "role": "user", "content": "hi" }] });
    let res = app
        .post_json("/v1/chat/completions", &alice, &completion)
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(remaining(&res), Some(0), "{:?}", res.headers());
    let _ = res.text().await;

    // The bucket is empty: each route refuses with SPEC §4's 429, in its
    // own shape, before any reservation (no token-limit headers).
    let res = app
        .post_json("/chat", &alice, &json!({ "message": "refused" }))
        .await;
    assert_eq!(res.status(), 429);
    assert!(res.headers().contains_key("retry-after"));
    assert_eq!(remaining(&res), Some(0));
    assert!(!res.headers().contains_key("x-tokenlimit-remaining"));
    let body: Value = res.json().await.expect("json");
    assert_eq!(
        body["message"],
        "Rate limit exceeded. Please try again later."
    );
    let res = app
        .post_json("/v1/chat/completions", &alice, &completion)
        .await;
    assert_eq!(res.status(), 429);
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    assert_eq!(body["error"]["type"], "requests", "{body}");
    let res = app.post_json("/chat", &alice, &json!({})).await;
    assert_eq!(
        res.status(),
        429,
        "a bad body past the limit is refused too"
    );
}

/// Script calls `redis` has run (`EVALSHA`), from `INFO commandstats`.
async fn evalshas(redis: &PrivateRedis) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", redis.port))
        .await
        .expect("connect to Redis");
    stream
        .write_all(b"INFO commandstats\r\n")
        .await
        .expect("write");
    // One bulk string: `$<len>\r\n<text>\r\n`.
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await.expect("read");
        assert!(n > 0, "Redis closed the connection");
        reply.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&reply);
        if let Some((head, rest)) = text.split_once("\r\n")
            && let Ok(len) = head.trim_start_matches('$').parse::<usize>()
            && rest.len() >= len
        {
            return rest
                .lines()
                .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
                .and_then(|v| v.split(',').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
    }
}

/// Script calls made for one turn, counted once they stop coming (the
/// settlement follows the reply).
async fn script_calls_for(
    redis: &PrivateRedis,
    turn: impl std::future::Future<Output = Value>,
) -> u64 {
    let before = evalshas(redis).await;
    turn.await;
    let mut seen = evalshas(redis).await;
    let mut quiet = 0;
    while quiet < 10 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        let now = evalshas(redis).await;
        quiet = if now == seen { quiet + 1 } else { 0 };
        seen = now;
    }
    seen - before
}

/// A turn on a new chat under a token budget makes one Redis call before
/// the model for its rate-limit token and its reservation (then one to
/// settle); a turn on a chat takes its token first, alone, so that a
/// rate-limited request never costs a read of the chat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_token_budget_a_new_chats_turn_takes_its_token_and_reservation_in_one_redis_call() {
    crate::support::init();
    let redis = PrivateRedis::start();
    let url = redis.url();
    let app = spawn_app_with(
        Db::Sqlite,
        &[("REDIS_URL", url.as_str()), ("REDIS_TIMEOUT_MS", "3000")],
    )
    .await;
    app.limit_acme_per_day(1_000_000).await;
    let alice = As::alice();
    // Each script is loaded once first (a load retries its call).
    let first = app.chat(&alice, "warm up", None).await;
    let chat_id = first["chat_id"].as_str().expect("chat_id").to_owned();
    app.chat(&alice, "warm up a chat's turn", Some(&chat_id))
        .await;
    wait_until_settled(&app).await;

    let new_chat = script_calls_for(&redis, app.chat(&alice, "a new chat", None)).await;
    assert_eq!(
        new_chat, 2,
        "a new chat's turn: its token and reservation in one call, then the settlement"
    );
    let on_a_chat = script_calls_for(&redis, app.chat(&alice, "on the chat", Some(&chat_id))).await;
    assert_eq!(
        on_a_chat, 3,
        "a turn on a chat: the token, the reservation, the settlement"
    );
}
