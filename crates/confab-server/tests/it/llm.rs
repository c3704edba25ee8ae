//! Real models (SPEC §11) against real third-party servers nobody here wrote:
//! llmock 0.2.2 speaking OpenAI and Anthropic, and LiteLLM proxy 1.108.7 in
//! front of it. Each body runs on SQLite and PostgreSQL.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::per_store;
use crate::support::peers::{Litellm, LitellmOpts, Llmock, LlmockOpts};
use crate::support::sse::SseReader;
use crate::support::{As, Db, TestApp, assert_error, spawn_app_with};

per_store!(
    each_model_answers_with_the_upstreams_text_and_usage,
    models_served_through_litellm_answer_on_both_routes,
    the_upstream_gets_system_prompt_history_and_new_message_in_order,
    a_small_context_leaves_out_the_oldest_turns_never_the_new_message,
    a_rate_limited_upstream_is_retried_after_its_retry_after,
    an_upstream_overloaded_after_the_retries_is_a_503_with_retry_after,
    a_truncated_stream_is_a_failure_that_keeps_the_partial_text,
    a_stalled_stream_fails_within_the_idle_timeout,
    a_malformed_chunk_fails_the_turn_without_a_panic,
    a_slow_first_token_gets_keep_alives,
    closing_the_client_closes_the_upstream_request_within_a_second,
);

const ANTHROPIC_KEY_VAR: &str = "CONFAB_TEST_ANTHROPIC_KEY";

/// A models file in a fresh temp dir, removed on drop.
pub(crate) struct ModelsFile {
    dir: PathBuf,
    pub(crate) path: String,
}

impl ModelsFile {
    pub(crate) fn new(text: &str) -> ModelsFile {
        let dir = std::env::temp_dir().join(format!("confab-models-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("models.toml");
        std::fs::write(&path, text).unwrap();
        ModelsFile {
            path: path.to_string_lossy().into_owned(),
            dir,
        }
    }
}

impl Drop for ModelsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `openai` and `anthropic` models on one llmock (plus `tiny`, a model with a
/// small context window on the OpenAI route).
pub(crate) fn llmock_models(mock: &Llmock) -> String {
    format!(
        r#"
default = "mock-openai"

[[model]]
name = "mock-openai"
provider = "openai"
base_url = "{openai}"
upstream_model = "gpt-4o-mini"
context_tokens = 128000
max_output_tokens = 256

[[model]]
name = "mock-anthropic"
provider = "anthropic"
base_url = "{anthropic}"
api_key_env = "{ANTHROPIC_KEY_VAR}"
upstream_model = "claude-sonnet-4-5"
context_tokens = 200000
max_output_tokens = 256

[[model]]
name = "tiny"
provider = "openai"
base_url = "{openai}"
upstream_model = "gpt-4o-mini"
context_tokens = 80
max_output_tokens = 20
"#,
        openai = mock.openai_base_url(),
        anthropic = mock.anthropic_base_url(),
    )
}

/// A confab app whose models are `models`, with fast retries.
pub(crate) async fn app_with_models(db: Db, models: &ModelsFile, env: &[(&str, &str)]) -> TestApp {
    let mut all: Vec<(&str, &str)> = vec![
        ("MODELS_FILE", models.path.as_str()),
        (ANTHROPIC_KEY_VAR, "sk-ant-test-key"),
        ("PROVIDER_RETRY_BASE_MS", "50"),
    ];
    all.extend_from_slice(env);
    spawn_app_with(db, &all).await
}

async fn stream(app: &TestApp, body: Value) -> reqwest::Response {
    app.post_json("/chat/stream", &As::alice(), &body).await
}

/// The stored messages of a chat.
pub(crate) async fn stored(app: &TestApp, chat: &str) -> Vec<Value> {
    let (status, body) = app.get_json(&format!("/chat/{chat}"), &As::alice()).await;
    assert_eq!(status, 200, "{body}");
    body["messages"].as_array().unwrap().clone()
}

/// llmock's own estimate of a text's tokens (`len // 4`): equal figures
/// prove the usage came from the upstream, not from confab's tokenizer.
fn llmock_tokens(text: &str) -> i64 {
    (text.len() / 4) as i64
}

/// The bodies confab POSTed to llmock's model routes, oldest first.
async fn upstream_bodies(mock: &Llmock) -> Vec<Value> {
    mock.journal()
        .await
        .into_iter()
        .filter(|r| r.method == "POST")
        .map(|r| r.body)
        .collect()
}

async fn each_model_answers_with_the_upstreams_text_and_usage(db: Db) {
    let mock = Llmock::start(LlmockOpts {
        echo: true,
        chunk_delay_ms: 5,
    })
    .await;
    let models = ModelsFile::new(&llmock_models(&mock));
    let app = app_with_models(db, &models, &[]).await;

    let (status, listed) = app.get_json("/models", &As::alice()).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["default"], "mock-openai");
    let names: Vec<&str> = listed["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["mock-openai", "mock-anthropic", "tiny"]);
    assert_eq!(listed["models"][1]["provider"], "anthropic");

    for model in ["mock-openai", "mock-anthropic"] {
        // POST /chat
        let message = format!("Hello there via {model}");
        let res = app
            .post_json(
                "/chat",
                &As::alice(),
                &json!({ "message": message, "model": model }),
            )
            .await;
        assert_eq!(res.status(), 200);
        let reply: Value = res.json().await.unwrap();
        let text = reply["reply"].as_str().unwrap();
        assert_eq!(text, format!("Hello! You said: {message}"), "{model}");
        assert_eq!(reply["model"], model);
        assert_eq!(reply["usage"]["source"], "provider");
        assert_eq!(reply["usage"]["completion_tokens"], llmock_tokens(text));
        let chat = reply["chat_id"].as_str().unwrap();
        let messages = stored(&app, chat).await;
        assert_eq!(messages[1]["content"], text);
        assert_eq!(messages[1]["status"], "complete");
        assert_eq!(messages[1]["model"], model);
        assert_eq!(messages[1]["usage"], reply["usage"]);

        // POST /chat/stream, continuing the chat (which remembers its model).
        let res = stream(&app, json!({ "message": "And again", "chat_id": chat })).await;
        assert_eq!(res.status(), 200);
        let (events, _) = SseReader::new(res).all().await;
        let done = events.last().unwrap();
        assert_eq!(done["done"], true, "{events:?}");
        let tokens: String = events.iter().filter_map(|e| e["token"].as_str()).collect();
        assert!(events.len() > 3, "streamed in pieces: {events:?}");
        assert_eq!(tokens, done["fullText"].as_str().unwrap());
        assert_eq!(done["model"], model);
        assert_eq!(done["usage"]["source"], "provider");
        assert_eq!(
            done["usage"]["completion_tokens"],
            llmock_tokens(done["fullText"].as_str().unwrap())
        );
        let messages = stored(&app, chat).await;
        let last = messages.last().unwrap();
        assert_eq!(last["content"], done["fullText"]);
        assert_eq!(last["usage"], done["usage"]);
        let (_, chat_json) = app.get_json(&format!("/chat/{chat}"), &As::alice()).await;
        assert_eq!(chat_json["model"], model);
    }
    // What went upstream: the configured upstream model ids, streamed, with
    // the output cap and the usage request.
    let bodies = upstream_bodies(&mock).await;
    assert_eq!(bodies.len(), 4);
    assert_eq!(bodies[0]["model"], "gpt-4o-mini");
    assert_eq!(bodies[0]["stream"], true);
    assert_eq!(bodies[0]["stream_options"]["include_usage"], true);
    assert_eq!(bodies[0]["max_tokens"], 256);
    assert_eq!(bodies[2]["model"], "claude-sonnet-4-5");
    assert_eq!(bodies[2]["max_tokens"], 256);

    // An unknown model, and one the org may not use.
    let res = app
        .post_json(
            "/chat",
            &As::alice(),
            &json!({ "message": "x", "model": "nope" }),
        )
        .await;
    assert_eq!(
        assert_error(res, 400, "Bad Request").await,
        "Unknown model: nope"
    );
}

async fn models_served_through_litellm_answer_on_both_routes(db: Db) {
    let mock = Llmock::start(LlmockOpts {
        echo: true,
        chunk_delay_ms: 5,
    })
    .await;
    let litellm = Litellm::start(LitellmOpts {
        openai_upstream: mock.openai_base_url(),
        num_retries: 0,
        ..Default::default()
    })
    .await;
    let models = ModelsFile::new(&format!(
        r#"
default = "gateway"

[[model]]
name = "gateway"
provider = "openai"
base_url = "{openai}"
api_key_env = "CONFAB_TEST_LITELLM_KEY"
upstream_model = "{openai_model}"
context_tokens = 100000
max_output_tokens = 200

[[model]]
name = "gateway-messages"
provider = "anthropic"
base_url = "{root}"
api_key_env = "CONFAB_TEST_LITELLM_KEY"
upstream_model = "{anthropic_model}"
context_tokens = 100000
max_output_tokens = 200
"#,
        openai = litellm.openai_base_url(),
        root = litellm.anthropic_base_url(),
        openai_model = Litellm::OPENAI_MODEL,
        anthropic_model = Litellm::ANTHROPIC_MODEL,
    ));
    let app = app_with_models(
        db,
        &models,
        &[("CONFAB_TEST_LITELLM_KEY", Litellm::MASTER_KEY)],
    )
    .await;
    for model in ["gateway", "gateway-messages"] {
        let message = format!("Through the gateway with {model}");
        let res = app
            .post_json(
                "/chat",
                &As::alice(),
                &json!({ "message": message, "model": model }),
            )
            .await;
        assert_eq!(res.status(), 200, "{model}");
        let reply: Value = res.json().await.unwrap();
        assert!(
            reply["reply"].as_str().unwrap().contains(&message),
            "{model}: {reply}"
        );
        assert_eq!(reply["usage"]["source"], "provider", "{model}: {reply}");
        assert!(reply["usage"]["completion_tokens"].as_i64().unwrap() > 0);

        let res = stream(&app, json!({ "message": message, "model": model })).await;
        assert_eq!(res.status(), 200);
        let chat = res.headers()["x-chat-id"].to_str().unwrap().to_owned();
        let (events, _) = SseReader::new(res).all().await;
        let done = events.last().unwrap();
        assert_eq!(done["done"], true, "{model}: {events:?}");
        let tokens: String = events.iter().filter_map(|e| e["token"].as_str()).collect();
        assert_eq!(tokens, done["fullText"].as_str().unwrap());
        assert!(tokens.contains(&message));
        assert_eq!(done["usage"]["source"], "provider", "{model}: {done}");
        let messages = stored(&app, &chat).await;
        assert_eq!(messages[1]["content"], done["fullText"]);
        assert_eq!(messages[1]["usage"], done["usage"]);
    }
}

async fn the_upstream_gets_system_prompt_history_and_new_message_in_order(db: Db) {
    let mock = Llmock::start(LlmockOpts {
        echo: true,
        chunk_delay_ms: 0,
    })
    .await;
    let models = ModelsFile::new(&llmock_models(&mock));
    let app = app_with_models(db, &models, &[]).await;
    let first: Value = app
        .post_json(
            "/chat",
            &As::alice(),
            &json!({ "message": "first", "system": "Be brief." }),
        )
        .await
        .json()
        .await
        .unwrap();
    let chat = first["chat_id"].as_str().unwrap();
    let second = app.chat(&As::alice(), "second", Some(chat)).await;
    // The Anthropic route gets the same conversation, the system prompt in
    // its own field.
    let third: Value = app
        .post_json(
            "/chat",
            &As::alice(),
            &json!({ "message": "third", "chat_id": chat, "model": "mock-anthropic" }),
        )
        .await
        .json()
        .await
        .unwrap();
    let bodies = upstream_bodies(&mock).await;
    assert_eq!(bodies.len(), 3);
    let roles_and_text = |body: &Value| -> Vec<(String, String)> {
        body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["role"].as_str().unwrap().to_owned(),
                    m["content"].as_str().map(str::to_owned).unwrap_or_else(|| {
                        m["content"][0]["text"].as_str().unwrap_or("").to_owned()
                    }),
                )
            })
            .collect()
    };
    let pair = |r: &str, t: &str| (r.to_owned(), t.to_owned());
    let reply1 = first["reply"].as_str().unwrap();
    let reply2 = second["reply"].as_str().unwrap();
    assert_eq!(
        roles_and_text(&bodies[1]),
        vec![
            pair("system", "Be brief."),
            pair("user", "first"),
            pair("assistant", reply1),
            pair("user", "second"),
        ]
    );
    assert_eq!(bodies[2]["system"], "Be brief.");
    assert_eq!(
        roles_and_text(&bodies[2]),
        vec![
            pair("user", "first"),
            pair("assistant", reply1),
            pair("user", "second"),
            pair("assistant", reply2),
            pair("user", "third"),
        ]
    );
    assert_eq!(third["model"], "mock-anthropic");
    // The system prompt is the chat's first message.
    let messages = stored(&app, chat).await;
    assert_eq!(messages[0]["role"], "system");
    assert_eq!(messages[0]["content"], "Be brief.");
}

async fn a_small_context_leaves_out_the_oldest_turns_never_the_new_message(db: Db) {
    let mock = Llmock::start(LlmockOpts {
        echo: false,
        chunk_delay_ms: 0,
    })
    .await;
    let models = ModelsFile::new(&llmock_models(&mock));
    let app = app_with_models(db, &models, &[]).await;
    // `tiny`: 80 tokens of context, 20 for the output.
    let first: Value = app
        .post_json(
            "/chat",
            &As::alice(),
            &json!({ "message": "alpha one two three", "model": "tiny" }),
        )
        .await
        .json()
        .await
        .unwrap();
    let chat = first["chat_id"].as_str().unwrap();
    for text in [
        "bravo four five six",
        "charlie seven eight nine",
        "delta ten eleven twelve",
    ] {
        let reply = app.chat(&As::alice(), text, Some(chat)).await;
        assert!(reply["reply"].is_string(), "{reply}");
    }
    let bodies = upstream_bodies(&mock).await;
    let last = bodies.last().unwrap();
    let sent: Vec<&str> = last["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(sent.last(), Some(&"delta ten eleven twelve"));
    assert!(!sent.contains(&"alpha one two three"), "{sent:?}");
    assert!(sent.len() >= 2, "recent history is kept: {sent:?}");
    // Contiguous: what is sent is a suffix of the conversation.
    let messages = stored(&app, chat).await;
    let all: Vec<&str> = messages
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert!(
        all[..all.len() - 2].ends_with(&sent[..sent.len() - 1]),
        "{sent:?} is not the end of {all:?}"
    );

    // A message that alone does not fit: 400 before anything is stored.
    let long = "word ".repeat(200);
    let res = app
        .post_json(
            "/chat",
            &As::alice(),
            &json!({ "message": long, "chat_id": chat, "model": "tiny" }),
        )
        .await;
    assert_eq!(
        assert_error(res, 400, "Bad Request").await,
        "Message too long for model tiny"
    );
    assert_eq!(stored(&app, chat).await.len(), messages.len());
}

async fn a_rate_limited_upstream_is_retried_after_its_retry_after(db: Db) {
    let mock = Llmock::start(LlmockOpts::default()).await;
    let models = ModelsFile::new(&llmock_models(&mock));
    let app = app_with_models(db, &models, &[]).await;
    mock.scenario(json!({ "type": "fail", "status": 429, "retry_after": 1, "times": 1 }))
        .await;
    let started = Instant::now();
    let res = app
        .post_json("/chat", &As::alice(), &json!({ "message": "please" }))
        .await;
    let took = started.elapsed();
    assert_eq!(res.status(), 200);
    let reply: Value = res.json().await.unwrap();
    assert_eq!(reply["reply"], "Mock response from gpt-4o-mini.");
    let attempts: Vec<u16> = mock
        .journal()
        .await
        .iter()
        .filter(|r| r.method == "POST")
        .map(|r| r.status)
        .collect();
    assert_eq!(attempts, [429, 200]);
    assert!(took >= Duration::from_secs(1), "waited {took:?}");
    let metrics = app.get("/metrics", &As::Nobody).await.text().await.unwrap();
    assert!(
        metrics.contains(r#"llm_retries_total{model="mock-openai",reason="rate_limited"} 1"#),
        "{metrics}"
    );
}

async fn an_upstream_overloaded_after_the_retries_is_a_503_with_retry_after(db: Db) {
    let mock = Llmock::start(LlmockOpts::default()).await;
    let models = ModelsFile::new(&llmock_models(&mock));
    let app = app_with_models(db, &models, &[]).await;
    for route in ["/chat", "/chat/stream"] {
        mock.reset().await;
        mock.scenario(json!({ "type": "fail", "status": 503, "times": 3 }))
            .await;
        let res = app
            .post_json(route, &As::alice(), &json!({ "message": "busy?" }))
            .await;
        assert_eq!(res.status(), 503, "{route}");
        assert!(res.headers().contains_key("retry-after"), "{route}");
        let message = assert_error(res, 503, "Service Unavailable").await;
        assert_eq!(message, "Model mock-openai is overloaded; try again later");
        assert!(!message.contains("127.0.0.1"));
        let attempts = mock
            .journal()
            .await
            .iter()
            .filter(|r| r.method == "POST")
            .count();
        assert_eq!(attempts, 3, "{route}: 1 + PROVIDER_MAX_RETRIES attempts");
        let (_, list) = app.get_json("/chats", &As::alice()).await;
        let chat = list["chats"][0]["id"].as_str().unwrap().to_owned();
        let messages = stored(&app, &chat).await;
        assert_eq!(messages[0]["status"], "complete", "the user message stays");
        assert_eq!(messages[1]["status"], "failed");
    }
}

async fn a_truncated_stream_is_a_failure_that_keeps_the_partial_text(db: Db) {
    let mock = Llmock::start(LlmockOpts {
        echo: true,
        chunk_delay_ms: 5,
    })
    .await;
    let models = ModelsFile::new(&llmock_models(&mock));
    let app = app_with_models(db, &models, &[]).await;
    for model in ["mock-openai", "mock-anthropic"] {
        mock.scenario(json!({
            "type": "stream_fault", "kind": "truncate", "after_chunks": 6, "times": 1
        }))
        .await;
        let res = stream(
            &app,
            json!({ "message": "a long enough message to be cut somewhere in its middle", "model": model }),
        )
        .await;
        assert_eq!(res.status(), 200);
        let chat = res.headers()["x-chat-id"].to_str().unwrap().to_owned();
        let (events, _) = SseReader::new(res).all().await;
        let last = events.last().unwrap();
        assert_eq!(last["error"], "Stream failed", "{model}: {events:?}");
        assert!(events.iter().all(|e| e["done"] != true));
        let partial: String = events.iter().filter_map(|e| e["token"].as_str()).collect();
        let messages = stored(&app, &chat).await;
        assert_eq!(messages[1]["status"], "failed", "{model}");
        assert_eq!(messages[1]["content"], partial.as_str());
        assert_eq!(messages[1]["usage"]["source"], "estimated");
    }
}

async fn a_stalled_stream_fails_within_the_idle_timeout(db: Db) {
    let mock = Llmock::start(LlmockOpts {
        echo: true,
        chunk_delay_ms: 5,
    })
    .await;
    let models = ModelsFile::new(&llmock_models(&mock));
    let app = app_with_models(db, &models, &[("PROVIDER_IDLE_TIMEOUT_MS", "1000")]).await;
    mock.scenario(json!({
        "type": "stream_fault", "kind": "stall", "after_chunks": 3, "stall_seconds": 10, "times": 1
    }))
    .await;
    let res = stream(&app, json!({ "message": "stall after a few words please" })).await;
    assert_eq!(res.status(), 200);
    let chat = res.headers()["x-chat-id"].to_str().unwrap().to_owned();
    let mut reader = SseReader::new(res);
    let first = reader.next_json().await.unwrap();
    assert!(first["token"].is_string());
    let stalled_from = Instant::now();
    let mut last = first;
    while let Some(event) = reader.next_json().await {
        last = event;
    }
    let took = stalled_from.elapsed();
    assert_eq!(last["error"], "Stream failed", "{last}");
    assert!(took < Duration::from_secs(2), "failed after {took:?}");
    let messages = stored(&app, &chat).await;
    assert_eq!(messages[1]["status"], "failed");
}

async fn a_malformed_chunk_fails_the_turn_without_a_panic(db: Db) {
    let mock = Llmock::start(LlmockOpts {
        echo: true,
        chunk_delay_ms: 0,
    })
    .await;
    let models = ModelsFile::new(&llmock_models(&mock));
    let app = app_with_models(db, &models, &[]).await;
    mock.scenario(json!({
        "type": "stream_fault", "kind": "malformed", "after_chunks": 3, "times": 2
    }))
    .await;
    let res = stream(&app, json!({ "message": "one two three four five six" })).await;
    assert_eq!(res.status(), 200);
    let chat = res.headers()["x-chat-id"].to_str().unwrap().to_owned();
    let (events, _) = SseReader::new(res).all().await;
    assert_eq!(
        events.last().unwrap()["error"],
        "Stream failed",
        "{events:?}"
    );
    assert_eq!(stored(&app, &chat).await[1]["status"], "failed");
    // POST /chat: the same fault, before any byte went out → 502.
    let res = app
        .post_json(
            "/chat",
            &As::alice(),
            &json!({ "message": "one two three four five" }),
        )
        .await;
    let message = assert_error(res, 502, "Bad Gateway").await;
    assert!(message.starts_with("Model provider error: "), "{message}");
    // The server is still fine.
    assert_eq!(app.get("/health", &As::Nobody).await.status(), 200);
}

async fn a_slow_first_token_gets_keep_alives(db: Db) {
    let mock = Llmock::start(LlmockOpts {
        echo: true,
        chunk_delay_ms: 0,
    })
    .await;
    let models = ModelsFile::new(&llmock_models(&mock));
    let app = app_with_models(db, &models, &[("SSE_KEEPALIVE_SECONDS", "0.3")]).await;
    mock.scenario(json!({ "type": "slow_first_token", "seconds": 2, "times": 1 }))
        .await;
    let res = stream(&app, json!({ "message": "take your time" })).await;
    assert_eq!(res.status(), 200);
    let mut reader = SseReader::new(res);
    let first = reader.next_json().await.unwrap();
    assert!(first["token"].is_string(), "{first}");
    assert!(
        reader.comments() >= 4,
        "keep-alives while the model was silent: {}",
        reader.comments()
    );
    let (rest, _) = reader.all().await;
    assert_eq!(rest.last().unwrap()["done"], true);
}

async fn closing_the_client_closes_the_upstream_request_within_a_second(db: Db) {
    let mock = Llmock::start(LlmockOpts {
        echo: false,
        chunk_delay_ms: 300,
    })
    .await;
    let models = ModelsFile::new(&llmock_models(&mock));
    let app = app_with_models(db, &models, &[]).await;
    mock.scenario(json!({
        "type": "reply",
        "text": "one two three four five six seven eight nine ten eleven twelve",
        "times": 1
    }))
    .await;
    let res = stream(&app, json!({ "message": "count for me" })).await;
    assert_eq!(res.status(), 200);
    let chat = res.headers()["x-chat-id"].to_str().unwrap().to_owned();
    let mut reader = SseReader::new(res);
    let mut partial = String::new();
    while partial.split_whitespace().count() < 2 {
        let event = reader.next_json().await.unwrap();
        partial.push_str(event["token"].as_str().unwrap());
    }
    drop(reader);
    let closed_at = Instant::now();
    let request = mock
        .wait_for_request_completed_false(Duration::from_secs(1))
        .await;
    assert!(closed_at.elapsed() < Duration::from_secs(1));
    assert!(request.chunks_sent < 12, "{request:?}");
    // The message is settled as cancelled, with what the client saw.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let messages = stored(&app, &chat).await;
        if messages[1]["status"] == "cancelled" {
            let content = messages[1]["content"].as_str().unwrap();
            assert!(content.starts_with(&partial), "{content:?} vs {partial:?}");
            assert_eq!(messages[1]["usage"]["source"], "estimated");
            assert!(messages[1]["usage"]["prompt_tokens"].as_i64().unwrap() > 0);
            break;
        }
        assert!(Instant::now() < deadline, "not cancelled: {messages:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
