//! Black-box tests of `POST /chat/stream` (SPEC §6) on SQLite and PostgreSQL.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::per_store;
use crate::support::sse::SseReader;
use crate::support::{As, Db, TestApp, assert_error, spawn_app, spawn_app_with};

per_store!(
    stream_sends_tokens_then_done_after_storing,
    stream_continues_an_existing_chat,
    closing_the_client_cancels_and_keeps_the_partial_reply,
    model_failure_sends_the_error_event_and_stores_failed,
    a_client_that_reads_nothing_is_cut_off,
    stream_errors_before_the_first_byte_are_json,
    idle_streams_get_keep_alive_comments,
);

async fn stream(app: &TestApp, who: &As, body: Value) -> reqwest::Response {
    app.post_json("/chat/stream", who, &body).await
}

fn header(res: &reqwest::Response, name: &str) -> String {
    res.headers()
        .get(name)
        .unwrap_or_else(|| panic!("{name} missing"))
        .to_str()
        .unwrap()
        .to_owned()
}

async fn message_status(app: &TestApp, chat: &str, who: &As) -> (String, String) {
    let (status, body) = app.get_json(&format!("/chat/{chat}"), who).await;
    assert_eq!(status, 200, "{body}");
    let last = body["messages"].as_array().unwrap().last().unwrap().clone();
    (
        last["status"].as_str().unwrap().to_owned(),
        last["content"].as_str().unwrap().to_owned(),
    )
}

fn gauge(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in metrics"))
}

async fn stream_sends_tokens_then_done_after_storing(db: Db) {
    let app = spawn_app_with(db, &[("SIMULATED_TOKEN_DELAY_MS", "1")]).await;
    let res = stream(&app, &As::alice(), json!({ "message": "Stream to me" })).await;
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "content-type"), "text/event-stream");
    assert_eq!(header(&res, "cache-control"), "no-cache");
    assert_eq!(header(&res, "x-accel-buffering"), "no");
    assert!(res.headers().contains_key("x-ratelimit-remaining"));
    let chat_id = header(&res, "x-chat-id");
    let message_id = header(&res, "x-message-id");
    let (events, comments) = SseReader::new(res).all().await;
    assert!(comments >= 1, "opening keep-alive comment");
    let (done, tokens) = events.split_last().expect("events");
    assert!(tokens.len() > 5);
    let mut text = String::new();
    for t in tokens {
        assert_eq!(t["done"], false, "{t}");
        assert_eq!(t.as_object().unwrap().len(), 2, "only token and done: {t}");
        text.push_str(t["token"].as_str().unwrap());
    }
    assert_eq!(done["done"], true);
    assert_eq!(done["token"], "");
    assert_eq!(done["fullText"], text.as_str());
    assert_eq!(done["chat_id"], chat_id.as_str());
    assert_eq!(done["message_id"], message_id.as_str());
    assert!(text.contains("\"Stream to me\""));
    // Stored before `done` was sent.
    let (status, content) = message_status(&app, &chat_id, &As::alice()).await;
    assert_eq!(status, "complete");
    assert_eq!(content, text);
    // The same reply as POST /chat would give.
    let plain = app.chat(&As::alice(), "Stream to me", None).await;
    assert_eq!(plain["reply"], text.as_str());
}

async fn stream_continues_an_existing_chat(db: Db) {
    let app = spawn_app(db).await;
    let first = app.chat(&As::bob(), "first", None).await;
    let chat = first["chat_id"].as_str().unwrap();
    let res = stream(
        &app,
        &As::bob(),
        json!({ "message": "second", "chat_id": chat }),
    )
    .await;
    assert_eq!(header(&res, "x-chat-id"), chat);
    let (events, _) = SseReader::new(res).all().await;
    assert_eq!(events.last().unwrap()["done"], true);
    let (_, body) = app.get_json(&format!("/chat/{chat}"), &As::bob()).await;
    assert_eq!(body["message_count"], 4);
}

async fn closing_the_client_cancels_and_keeps_the_partial_reply(db: Db) {
    let app = spawn_app_with(db, &[("SIMULATED_TOKEN_DELAY_MS", "50")]).await;
    let metrics = app.get("/metrics", &As::Nobody).await.text().await.unwrap();
    let active_before = gauge(&metrics, "sse_active_streams");
    let res = stream(
        &app,
        &As::alice(),
        json!({ "message": "I will leave early" }),
    )
    .await;
    let chat_id = header(&res, "x-chat-id");
    let mut reader = SseReader::new(res);
    let mut received = String::new();
    for _ in 0..2 {
        let ev = reader.next_json().await.expect("token");
        received.push_str(ev["token"].as_str().unwrap());
    }
    drop(reader);
    let closed_at = Instant::now();
    let full = confab_llm::SimulatedModel::new(confab_llm::TokenDelay::ZERO, 0)
        .reply_to("I will leave early");
    loop {
        let (status, content) = message_status(&app, &chat_id, &As::alice()).await;
        if status == "cancelled" {
            assert!(!content.is_empty());
            assert!(content.len() < full.len(), "a proper prefix");
            assert!(
                full.starts_with(&content),
                "{content:?} is a prefix of the reply"
            );
            assert!(content.starts_with(&received));
            break;
        }
        assert_eq!(status, "streaming");
        assert!(
            closed_at.elapsed() < Duration::from_millis(1500),
            "not cancelled within 1.5 s"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let metrics = app.get("/metrics", &As::Nobody).await.text().await.unwrap();
    assert_eq!(gauge(&metrics, "sse_active_streams"), active_before);
    assert!(metrics.contains("sse_streams_total{outcome=\"cancelled\"} 1"));
}

async fn model_failure_sends_the_error_event_and_stores_failed(db: Db) {
    let app = spawn_app(db).await;
    let res = stream(&app, &As::alice(), json!({ "message": "/fail on purpose" })).await;
    assert_eq!(res.status(), 200);
    let chat_id = header(&res, "x-chat-id");
    let (events, _) = SseReader::new(res).all().await;
    let last = events.last().unwrap();
    assert_eq!(last["error"], "Stream failed");
    assert!(last["message"].as_str().is_some());
    assert!(
        events
            .iter()
            .all(|e| e.get("done") != Some(&Value::Bool(true)))
    );
    let partial: String = events.iter().filter_map(|e| e["token"].as_str()).collect();
    let (status, content) = message_status(&app, &chat_id, &As::alice()).await;
    assert_eq!(status, "failed");
    assert_eq!(content, partial);
}

async fn a_client_that_reads_nothing_is_cut_off(db: Db) {
    use tokio::io::AsyncWriteExt;
    // A reply far larger than the socket buffers, produced as fast as
    // possible, to a client that never reads.
    let app = spawn_app_with(
        db,
        &[
            ("SIMULATED_MIN_WORDS", "400000"),
            ("STREAM_SEND_TIMEOUT_SECONDS", "1"),
        ],
    )
    .await;
    let body = json!({ "message": "flood me" }).to_string();
    let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let request = format!(
        "POST /chat/stream HTTP/1.1\r\nhost: test\r\nx-org-id: {}\r\nx-user-id: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        crate::support::app::ACME,
        crate::support::app::ALICE,
        body.len()
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    // Never read. The generator must give up (stalled → cancelled).
    let started = Instant::now();
    loop {
        let (_, list) = app.get_json("/chats", &As::alice()).await;
        if let Some(chat) = list["chats"][0]["id"].as_str() {
            let (status, content) = message_status(&app, chat, &As::alice()).await;
            if status == "cancelled" {
                assert!(!content.is_empty());
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "stalled client never cut off"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(socket);
}

async fn stream_errors_before_the_first_byte_are_json(db: Db) {
    let app = spawn_app(db).await;
    let res = stream(&app, &As::Nobody, json!({ "message": "hi" })).await;
    assert_error(res, 401, "Unauthorized").await;
    let res = stream(
        &app,
        &As::alice(),
        json!({ "message": "hi", "chat_id": uuid::Uuid::new_v4() }),
    )
    .await;
    assert_error(res, 404, "Not Found").await;
}

async fn idle_streams_get_keep_alive_comments(db: Db) {
    // A slow model (1 s per token) and 200 ms keep-alives: pings arrive
    // before the first token and between tokens.
    let app = spawn_app_with(
        db,
        &[
            ("SIMULATED_TOKEN_DELAY_MS", "1000"),
            ("SSE_KEEPALIVE_SECONDS", "0.2"),
        ],
    )
    .await;
    let res = stream(&app, &As::alice(), json!({ "message": "take your time" })).await;
    let mut reader = SseReader::new(res);
    let first = reader.next_json().await.expect("first token");
    assert_eq!(first["done"], false);
    assert!(
        reader.comments() >= 4,
        "the opening ping plus three keep-alives while waiting, got {}",
        reader.comments()
    );
}
