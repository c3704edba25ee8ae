//! End to end against llmock 0.2.2, a third-party mock of the OpenAI and
//! Anthropic APIs: both providers stream a reply and report usage, a 429 is
//! judged with its retry hint, a cut stream is `Truncated`, and dropping the
//! stream closes the upstream request (llmock records `completed: false`).
//!
//! `scripts/services.sh` installs llmock into the test peers' venv
//! (`$CONFAB_TEST_PEERS_DIR`, default `~/.cache/confab-peers`); the test FAILS,
//! never skips, if it is missing. `CONFAB_TEST_LLMOCK` names another binary.

// clippy's allow-*-in-tests covers #[test] functions, not their helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use confab_core::model::MessageRole;
use confab_core::provider::{
    ChatProvider, ChatRequest, Chunk, PromptMessage, ProviderError, ReportedUsage,
};
use confab_llm::{AnthropicProvider, HttpProviderConfig, OpenAiProvider};
use futures::StreamExt;

/// The llmock process; killed (by its own pid) when the test ends.
struct Llmock {
    child: Child,
    base: String,
}

impl Drop for Llmock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn llmock_binary() -> String {
    if let Ok(path) = std::env::var("CONFAB_TEST_LLMOCK") {
        return path;
    }
    let peers = std::env::var("CONFAB_TEST_PEERS_DIR")
        .or_else(|_| std::env::var("CONFAB_PEERS_DIR"))
        .unwrap_or_else(|_| {
            format!(
                "{}/.cache/confab-peers",
                std::env::var("HOME").unwrap_or_default()
            )
        });
    let path = format!("{peers}/venv/bin/llmock");
    let installed = Command::new(&path)
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        installed,
        "llmock is not installed at {path}: run scripts/services.sh (or set CONFAB_TEST_LLMOCK)"
    );
    path
}

async fn start_llmock() -> Llmock {
    // The test's own reqwest client needs it (the providers install it too).
    confab_llm::install_tls_provider();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(llmock_binary())
        .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--stream-chunk-delay-ms", "20", "--response-style", "echo"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("llmock could not be started");
    let llmock = Llmock {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = client
            .get(format!("{}/_llmock/requests", llmock.base))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            return llmock;
        }
        assert!(Instant::now() < deadline, "llmock did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Llmock {
    async fn scenario(&self, behaviors: serde_json::Value) {
        let response = reqwest::Client::new()
            .post(format!("{}/_llmock/scenario", self.base))
            .json(&serde_json::json!({ "behaviors": behaviors }))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
    }

    async fn last_request(&self) -> serde_json::Value {
        let all: serde_json::Value = reqwest::get(format!("{}/_llmock/requests", self.base))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        all["requests"].as_array().unwrap().last().unwrap().clone()
    }

    fn config(&self, path: &str) -> HttpProviderConfig {
        HttpProviderConfig {
            base_url: format!("{}{path}", self.base),
            api_key: Some("sk-test-key".into()),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

fn request(model: &str) -> ChatRequest {
    ChatRequest {
        upstream_model: model.into(),
        system: Some("Be brief.".into()),
        messages: vec![
            PromptMessage {
                role: MessageRole::User,
                content: "first".into(),
            },
            PromptMessage {
                role: MessageRole::Assistant,
                content: "ok".into(),
            },
            PromptMessage {
                role: MessageRole::User,
                content: "tell me about café ☕".into(),
            },
        ],
        max_output_tokens: 64,
        interactive: true,
        sampling: Default::default(),
    }
}

struct Reply {
    text: String,
    finish: Option<String>,
    usage: Option<ReportedUsage>,
    error: Option<ProviderError>,
}

async fn run(provider: &dyn ChatProvider, request: &ChatRequest) -> Result<Reply, ProviderError> {
    let mut stream = provider.stream(request).await?;
    let mut reply = Reply {
        text: String::new(),
        finish: None,
        usage: None,
        error: None,
    };
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(Chunk::Delta(d)) => reply.text.push_str(&d),
            Ok(Chunk::Finish(f)) => reply.finish = Some(f),
            Ok(Chunk::Usage(u)) => reply.usage = Some(u),
            Err(e) => reply.error = Some(e),
        }
    }
    Ok(reply)
}

#[tokio::test]
async fn both_providers_stream_from_llmock() {
    let llmock = start_llmock().await;
    let openai = OpenAiProvider::new(llmock.config("/v1")).unwrap();
    let anthropic = AnthropicProvider::new(llmock.config("/anthropic")).unwrap();
    let providers: [(&dyn ChatProvider, &str); 2] =
        [(&openai, "gpt-4o-mini"), (&anthropic, "claude-sonnet-4-5")];
    for (provider, model) in providers {
        let kind = provider.kind();
        // A whole reply. Echo style quotes what was sent: the system prompt
        // and every message reached the model.
        let reply = run(provider, &request(model)).await.unwrap();
        assert!(reply.error.is_none(), "{kind}: {:?}", reply.error);
        assert!(
            reply.text.contains("tell me about café ☕"),
            "{kind}: {}",
            reply.text
        );
        assert!(reply.text.contains("first"), "{kind}: {}", reply.text);
        assert!(reply.finish.is_some(), "{kind}");
        let usage = reply.usage.expect("usage reported");
        assert!(usage.completion_tokens > 0, "{kind}: {usage:?}");
        let sent = llmock.last_request().await;
        assert_eq!(sent["completed"], true, "{kind}");

        // A 429 with its retry hint.
        let only = serde_json::json!({ "provider": kind });
        llmock
            .scenario(serde_json::json!([{"type": "fail", "status": 429, "retry_after": 1, "times": 1, "match": only}]))
            .await;
        let err = run(provider, &request(model)).await.err().expect("429");
        assert_eq!(
            err,
            ProviderError::RateLimited {
                status: 429,
                retry_after: Some(Duration::from_secs(1))
            },
            "{kind}"
        );

        // A stream cut short, cleanly or by a dropped connection.
        for fault in ["truncate", "disconnect"] {
            llmock
                .scenario(serde_json::json!([{"type": "stream_fault", "kind": fault, "after_chunks": 3, "times": 1, "match": only}]))
                .await;
            let reply = run(provider, &request(model)).await.unwrap();
            assert_eq!(
                reply.error,
                Some(ProviderError::Truncated),
                "{kind} {fault}"
            );
        }

        // Dropping the stream mid-reply closes the upstream request.
        let mut stream = provider.stream(&request(model)).await.unwrap();
        while let Some(chunk) = stream.next().await {
            if matches!(chunk, Ok(Chunk::Delta(_))) {
                break;
            }
        }
        drop(stream);
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let sent = llmock.last_request().await;
            if sent["completed"] == false && !sent["ended_at"].is_null() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{kind}: upstream still open: {sent}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
