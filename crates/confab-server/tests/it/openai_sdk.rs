//! The OpenAI-compatible API (SPEC §13) against clients nobody here wrote:
//! the official `openai` Python SDK (pinned by scripts/services.sh; the
//! driver is tests/openai_sdk/check.py) and LiteLLM proxy 1.108.7 with confab
//! as its OpenAI-compatible upstream. What they saw is compared with confab's
//! ledger, its stored chats and llmock's journal.

use std::collections::HashMap;
use std::time::Duration;

use confab_core::model::RateLimitOverride;
use serde_json::{Value, json};

use crate::llm::{ModelsFile, app_with_models, llmock_models};
use crate::per_store;
use crate::support::app::{ACME, ALICE, CHARLIE, TECH};
use crate::support::peers::{Litellm, LitellmOpts, Llmock, LlmockOpts, peers_dir};
use crate::support::{As, Db, TestApp, TestDb};

per_store!(
    the_official_openai_sdk_works_against_confab,
    v1_errors_are_in_openai_shape_with_their_status,
    litellm_streams_a_confab_reply_as_a_gateway_in_front_of_confab,
    v1_stateless_turns_are_bounded_by_the_model_not_the_native_limits,
);

/// One row of the usage ledger, read straight from the database.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct LedgerRow {
    pub turn: uuid::Uuid,
    pub org: uuid::Uuid,
    pub chat: Option<uuid::Uuid>,
    pub model: String,
    pub status: String,
    pub prompt: i64,
    pub completion: i64,
    pub source: String,
}

pub(crate) async fn ledger_rows(db: &TestDb) -> Vec<LedgerRow> {
    use sqlx::{Connection, Row};
    let parse = |s: Option<String>| {
        s.filter(|s| !s.is_empty())
            .map(|s| uuid::Uuid::parse_str(&s).unwrap())
    };
    macro_rules! read {
        ($conn:ty, $sql:expr) => {{
            let mut conn = <$conn>::connect(&db.url).await.unwrap();
            let rows = sqlx::query(sqlx::AssertSqlSafe($sql))
                .fetch_all(&mut conn)
                .await
                .unwrap();
            rows.iter()
                .map(|r| LedgerRow {
                    turn: parse(r.get("turn")).unwrap(),
                    org: parse(r.get("org")).unwrap(),
                    chat: parse(r.get("chat")),
                    model: r.get("model"),
                    status: r.get("status"),
                    prompt: r.get("prompt_tokens"),
                    completion: r.get("completion_tokens"),
                    source: r.get("source"),
                })
                .collect()
        }};
    }
    const COLUMNS: &str = "model, status, prompt_tokens, completion_tokens, source";
    match db.kind {
        Db::Sqlite => read!(
            sqlx::SqliteConnection,
            format!(
                "SELECT lower(hex(turn_id)) AS turn, lower(hex(org_id)) AS org, \
                 lower(hex(chat_id)) AS chat, {COLUMNS} FROM usage_ledger"
            )
        ),
        Db::Postgres => read!(
            sqlx::PgConnection,
            format!(
                "SELECT turn_id::text AS turn, org_id::text AS org, chat_id::text AS chat, \
                 {COLUMNS} FROM usage_ledger"
            )
        ),
    }
}

/// A key for `user` of `org`, as the admin CLI makes one.
pub(crate) async fn api_key(app: &TestApp, org: &str, user: &str) -> String {
    let generated = confab_server::auth::generate_key();
    app.state
        .store
        .create_api_key(&confab_core::NewApiKey {
            id: confab_core::ApiKeyId::new(),
            org_id: org.parse().unwrap(),
            user_id: user.parse().unwrap(),
            hash: generated.hash,
            prefix: generated.prefix,
            name: "openai-sdk".into(),
        })
        .await
        .unwrap();
    generated.secret
}

/// The turn id inside `chatcmpl-<32 hex digits>`.
fn turn_of(completion_id: &str) -> uuid::Uuid {
    let hex = completion_id
        .strip_prefix("chatcmpl-")
        .unwrap_or_else(|| panic!("completion id {completion_id}"));
    uuid::Uuid::parse_str(hex).unwrap()
}

async fn the_official_openai_sdk_works_against_confab(db: Db) {
    let mock = Llmock::start(LlmockOpts {
        echo: true,
        chunk_delay_ms: 40,
    })
    .await;
    let models = ModelsFile::new(&format!(
        "{}\n[[model]]\nname = \"simulated\"\nprovider = \"simulated\"\n",
        llmock_models(&mock)
    ));
    let app = app_with_models(
        db,
        &models,
        &[
            ("SIMULATED_TOKEN_DELAY_MS", "5"),
            ("STREAM_DETACH_SECONDS", "30"),
        ],
    )
    .await;
    // The second org may make one request per 2 s.
    app.state
        .store
        .set_org_rate_limit(
            TECH.parse().unwrap(),
            Some(RateLimitOverride::new(1, 0.5).unwrap()),
        )
        .await
        .unwrap();
    let key = api_key(&app, ACME, ALICE).await;
    let limited = api_key(&app, TECH, CHARLIE).await;

    let out = tokio::process::Command::new(peers_dir().join("venv/bin/python"))
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/openai_sdk/check.py"
        ))
        .env("CONFAB_BASE", app.url("/v1"))
        .env("CONFAB_KEY", &key)
        .env("CONFAB_LIMITED_KEY", &limited)
        .env("LLMOCK_CONTROL", format!("{}/_llmock", mock.base_url()))
        .env("MODELS", "simulated,mock-openai,mock-anthropic")
        .env("STREAM_MODEL", "mock-openai")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .kill_on_drop(true)
        .output()
        .await
        .expect("run the openai SDK driver");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "SDK driver failed: {}\nstdout: {stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_str(stdout.trim()).expect("driver output");
    assert_eq!(seen["sdk_version"], "3.57.0");
    assert_eq!(
        seen["models"],
        json!(["mock-anthropic", "mock-openai", "simulated", "tiny"])
    );
    assert_eq!(seen["wrong_key"], "AuthenticationError");
    assert!(
        seen["close_to_abandoned_s"].as_f64().unwrap() < 1.0,
        "{seen}"
    );
    // Wait for the cancelled turn's settlement to land.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Every turn the SDK saw is one ledger row with the same figures; the
    // stateless ones belong to no chat.
    let ledger = ledger_rows(&app.db).await;
    let by_turn: HashMap<uuid::Uuid, &LedgerRow> = ledger.iter().map(|r| (r.turn, r)).collect();
    let turns = seen["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 6);
    for turn in turns {
        let row = by_turn
            .get(&turn_of(turn["id"].as_str().unwrap()))
            .unwrap_or_else(|| panic!("no ledger row for {turn}"));
        assert_eq!(row.status, "complete", "{turn}");
        assert_eq!(row.chat, None, "{turn}");
        assert_eq!(row.model, turn["model"].as_str().unwrap());
        assert_eq!(
            row.prompt,
            turn["prompt_tokens"].as_i64().unwrap(),
            "{turn}"
        );
        assert_eq!(
            row.completion,
            turn["completion_tokens"].as_i64().unwrap(),
            "{turn}"
        );
        if turn["model"] != "simulated" {
            // What llmock reported, passed through unchanged.
            assert_eq!(row.source, "provider", "{turn}");
            assert!(
                turn["text"]
                    .as_str()
                    .unwrap()
                    .starts_with("Hello! You said:"),
                "{turn}"
            );
        }
        if turn["stream"] == true {
            assert!(turn["chunks"].as_u64().unwrap() >= 3, "{turn}");
        }
    }
    // The stream closed after two chunks: cancelled, counted once.
    let cancelled: Vec<_> = ledger.iter().filter(|r| r.status == "cancelled").collect();
    assert_eq!(cancelled.len(), 1, "{ledger:#?}");
    assert_eq!(cancelled[0].model, "mock-openai");
    assert!(
        cancelled[0].chat.is_some(),
        "stored in a chat, still cancelled"
    );
    // The rate-limited org's refused attempts reached no model.
    let tech: uuid::Uuid = TECH.parse().unwrap();
    assert!(ledger.iter().all(|r| r.org != tech), "{ledger:#?}");

    // Stored with X-Confab-Chat-Id: new → in GET /chats and GET /chat/{id}.
    let stored = &seen["stored"];
    let chat_id = stored["chat_id"].as_str().unwrap();
    let (_, chats) = app.get_json("/chats", &As::alice()).await;
    assert!(
        chats["chats"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == chat_id),
        "{chats}"
    );
    let (status, chat) = app
        .get_json(&format!("/chat/{chat_id}"), &As::alice())
        .await;
    assert_eq!(status, 200, "{chat}");
    let messages = chat["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{chat}");
    assert_eq!(messages[0]["content"], "Please remember this conversation.");
    assert_eq!(messages[1]["content"], stored["text"]);
    assert_eq!(
        messages[1]["usage"]["completion_tokens"],
        stored["completion_tokens"]
    );
    assert_eq!(
        messages[1]["usage"]["prompt_tokens"],
        stored["prompt_tokens"]
    );
    let row = by_turn[&turn_of(stored["id"].as_str().unwrap())];
    assert_eq!(row.chat.map(|c| c.to_string()), Some(chat_id.to_owned()));

    // GET /usage reads the same ledger.
    let (_, report) = app.get_json("/usage", &As::alice()).await;
    let acme: uuid::Uuid = ACME.parse().unwrap();
    let own: Vec<_> = ledger.iter().filter(|r| r.org == acme).collect();
    assert_eq!(report["totals"]["turns"], own.len());
    assert_eq!(
        report["totals"]["prompt_tokens"],
        own.iter().map(|r| r.prompt).sum::<i64>()
    );
    assert_eq!(
        report["totals"]["completion_tokens"],
        own.iter().map(|r| r.completion).sum::<i64>()
    );

    // Its own route labels in the metrics.
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("route=\"/v1/chat/completions\""),
        "no /v1 route label"
    );
}

async fn litellm_streams_a_confab_reply_as_a_gateway_in_front_of_confab(db: Db) {
    // confab serves a simulated model under the name LiteLLM asks for.
    let models = ModelsFile::new("[[model]]\nname = \"gpt-4o-mini\"\nprovider = \"simulated\"\n");
    let app = app_with_models(db, &models, &[("SIMULATED_TOKEN_DELAY_MS", "5")]).await;
    let key = api_key(&app, ACME, ALICE).await;
    let litellm = Litellm::start(LitellmOpts {
        openai_upstream: app.url("/v1"),
        num_retries: 0,
        upstream_api_key: Some(key),
    })
    .await;
    let res = reqwest::Client::new()
        .post(format!("{}/chat/completions", litellm.openai_base_url()))
        .bearer_auth(litellm.master_key())
        .json(&json!({
            "model": litellm.openai_model(),
            "stream": true,
            "messages": [{"role": "user", "content": "Through two gateways, please."}],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body = res.text().await.unwrap();
    let mut text = String::new();
    let mut chunks = 0;
    let mut done = false;
    for line in body.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(piece);
            chunks += 1;
        }
    }
    assert!(done, "{body}");
    assert!(chunks > 3, "streamed in pieces: {body}");
    // The reply LiteLLM relayed is the one confab counted (stateless).
    let ledger = ledger_rows(&app.db).await;
    assert_eq!(ledger.len(), 1, "{ledger:#?}");
    assert_eq!(ledger[0].status, "complete");
    assert_eq!(ledger[0].chat, None);
    assert!(text.contains("Through two gateways, please."), "{text}");
}

async fn v1_errors_are_in_openai_shape_with_their_status(db: Db) {
    let mock = Llmock::start(LlmockOpts::default()).await;
    let models = ModelsFile::new(&llmock_models(&mock));
    let app = app_with_models(db, &models, &[("OPENAI_MAX_BODY_BYTES", "4096")]).await;
    let key = api_key(&app, ACME, ALICE).await;
    let user = |text: &str| json!([{"role": "user", "content": text}]);
    // Bob's chat: not one Alice may store into.
    let bobs = app.chat(&As::bob(), "mine", None).await;
    let bobs = bobs["chat_id"].as_str().unwrap().to_owned();
    mock.reset().await;
    // (body, extra header, status, param, code)
    type Case<'a> = (
        Value,
        Option<(&'a str, &'a str)>,
        u16,
        Option<&'a str>,
        Option<&'a str>,
    );
    let cases: Vec<Case> = vec![
        (json!({"model": "mock-openai"}), None, 400, None, None),
        (
            json!({"model": "mock-openai", "messages": []}),
            None,
            400,
            Some("messages"),
            None,
        ),
        (
            json!({"model": "mock-openai", "messages": [{"role": "tool", "content": "x"}]}),
            None,
            400,
            Some("messages"),
            None,
        ),
        (
            json!({"model": "mock-openai", "messages": [{"role": "assistant", "content": "x"}]}),
            None,
            400,
            Some("messages"),
            None,
        ),
        (
            json!({"model": "mock-openai", "messages": [{"role": "user", "content":
                [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}),
            None,
            400,
            Some("messages"),
            None,
        ),
        (
            json!({"model": "mock-openai", "messages": "my private text"}),
            None,
            400,
            None,
            None,
        ),
        (
            json!({"model": "mock-openai", "messages": "a\", expected private"}),
            None,
            400,
            None,
            None,
        ),
        (
            json!({"model": "mock-openai", "messages": user("x"), "temperature": 3}),
            None,
            400,
            Some("temperature"),
            None,
        ),
        (
            json!({"model": "mock-openai", "messages": user("x"), "stop": ["a","b","c","d","e"]}),
            None,
            400,
            Some("stop"),
            None,
        ),
        (
            json!({"model": "mock-openai", "messages": user("x"), "max_tokens": 0}),
            None,
            400,
            Some("max_tokens"),
            None,
        ),
        (
            json!({"model": "nope", "messages": user("x")}),
            None,
            404,
            Some("model"),
            Some("model_not_found"),
        ),
        (
            json!({"model": "tiny", "messages": user(&"word ".repeat(200))}),
            None,
            400,
            Some("messages"),
            Some("context_length_exceeded"),
        ),
        (
            json!({"model": "mock-openai", "messages": user("x")}),
            Some(("x-confab-chat-id", "bogus")),
            400,
            None,
            None,
        ),
        (
            json!({"model": "mock-openai", "messages": user("x")}),
            Some(("x-confab-chat-id", bobs.as_str())),
            403,
            None,
            Some("permission_denied"),
        ),
        (
            json!({"model": "mock-openai", "messages": user("x")}),
            Some(("x-confab-chat-id", "00000000-0000-4000-8000-000000000000")),
            404,
            None,
            Some("chat_not_found"),
        ),
        (
            json!({"model": "mock-openai", "messages": user(&"y".repeat(5000))}),
            None,
            413,
            None,
            None,
        ),
    ];
    for (body, header, status, param, code) in cases {
        let mut req = app
            .client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&body);
        if let Some((name, value)) = header {
            req = req.header(name, value);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), status, "{body}");
        assert!(res.headers().contains_key("x-request-id"));
        let err: Value = res.json().await.unwrap();
        let e = &err["error"];
        assert!(e["message"].is_string(), "{err}");
        // The client's own text is never echoed back (it may be a message).
        assert!(!err.to_string().contains("private"), "{body} → {err}");
        assert!(e["type"].is_string(), "{err}");
        assert_eq!(e["param"].as_str(), param, "{body} → {err}");
        assert_eq!(e["code"].as_str(), code, "{body} → {err}");
    }
    // Unknown paths and methods under /v1 too, and a model name that is not
    // UTF-8 (no model of the org); and nothing above reached the model or
    // the ledger. (path, status, error field, its value)
    for (path, status, field, value) in [
        ("/v1/embeddings", 404, "code", "not_found"),
        ("/v1/models/%FF", 404, "code", "model_not_found"),
        ("/v1/chat/completions", 405, "type", "invalid_request_error"),
    ] {
        let res = app
            .client
            .get(app.url(path))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), status, "{path}");
        let err: Value = res.json().await.unwrap();
        assert_eq!(err["error"][field], value, "{path}: {err}");
    }
    assert!(mock.journal().await.iter().all(|r| r.method != "POST"));
    assert_eq!(
        ledger_rows(&app.db).await.len(),
        1,
        "only Bob's native turn"
    );
}

/// A stateless turn is the client's conversation, stored nowhere: its system
/// prompt and last user message are bounded by the body limit and the
/// model's context, not by the native API's 10,000 characters. Stored into a
/// chat, the native rules hold.
async fn v1_stateless_turns_are_bounded_by_the_model_not_the_native_limits(db: Db) {
    let app = crate::support::spawn_app(db).await;
    let long = "word ".repeat(2_500);
    let body = json!({"model": "simulated", "messages": [
        {"role": "system", "content": long},
        {"role": "user", "content": long},
    ]});
    let res = app
        .post_json("/v1/chat/completions", &As::alice(), &body)
        .await;
    assert_eq!(res.status(), 200);
    let reply: Value = res.json().await.unwrap();
    let text = reply["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.is_empty(), "{reply}");
    assert!(
        reply["usage"]["prompt_tokens"].as_u64().unwrap() >= 2_500,
        "{reply}"
    );
    for (system, user) in [(long.as_str(), "hi"), ("be brief", long.as_str())] {
        let body = json!({"model": "simulated", "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
        ]});
        let res = app
            .request(reqwest::Method::POST, "/v1/chat/completions", &As::alice())
            .header("x-confab-chat-id", "new")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400);
        let err: Value = res.json().await.unwrap();
        let message = err["error"]["message"].as_str().unwrap();
        assert!(message.contains("at most 10000 characters"), "{err}");
        assert_eq!(err["error"]["param"], "messages", "{err}");
    }
    let (_, chats) = app.get_json("/chats", &As::alice()).await;
    assert_eq!(chats["chats"], json!([]), "{chats}");
}
