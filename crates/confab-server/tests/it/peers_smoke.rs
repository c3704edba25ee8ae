//! Proves the third-party LLM API servers `scripts/services.sh` installs are
//! there and answer: one OpenAI-style completion from llmock directly and one
//! through LiteLLM in front of it.

use serde_json::{Value, json};

use crate::support::peers::{Litellm, LitellmOpts, Llmock, LlmockOpts, peer_client};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llmock_and_litellm_answer_a_chat_completion() {
    crate::support::init();
    let llmock = Llmock::start(LlmockOpts {
        echo: true,
        chunk_delay_ms: 0,
    })
    .await;
    let http = peer_client();

    let direct: Value = http
        .post(format!("{}/chat/completions", llmock.openai_base_url()))
        .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "ping"}]}))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        direct["choices"][0]["message"]["content"],
        "Hello! You said: ping"
    );

    let litellm = Litellm::start(LitellmOpts {
        openai_upstream: llmock.openai_base_url(),
        num_retries: 0,
        ..Default::default()
    })
    .await;
    let proxied: Value = http
        .post(format!("{}/chat/completions", litellm.openai_base_url()))
        .bearer_auth(litellm.master_key())
        .json(&json!({
            "model": litellm.openai_model(),
            "messages": [{"role": "user", "content": "through the proxy"}],
        }))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        proxied["choices"][0]["message"]["content"],
        "Hello! You said: through the proxy"
    );

    // (LiteLLM also GETs the upstream's /v1/models while starting.)
    let journal: Vec<_> = llmock
        .journal()
        .await
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect();
    assert_eq!(journal.len(), 2, "{journal:#?}");
    assert_eq!(journal[1].path, "/v1/chat/completions");
    assert_eq!(journal[1].model.as_deref(), Some("gpt-4o-mini"));
    assert!(journal.iter().all(|r| r.completed && r.status == 200));
}
