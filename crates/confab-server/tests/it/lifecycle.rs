//! The real binary: logs, signals, crash recovery, configuration errors
//! (SPEC §1, §6, §7, §10). Run on SQLite and on PostgreSQL.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use confab_core::{ChatId, MessageStatus, OrgId};
use serde_json::{Value, json};

use crate::per_store;
use crate::support::app::{ACME, ALICE};
use crate::support::process::{Confab, command};
use crate::support::sse::SseReader;
use crate::support::{Db, TestDb};

per_store!(
    logs_are_json_lines_that_carry_the_request_id,
    sigterm_lets_in_flight_streams_finish_and_exits_zero,
    sigterm_interrupts_streams_still_running_after_the_grace_period,
    sigkill_then_restart_marks_streams_interrupted_with_saved_text,
);

fn client() -> reqwest::Client {
    // reqwest panics on `Client::new` without a rustls crypto provider.
    confab_llm::install_tls_provider();
    reqwest::Client::new()
}

fn alice(req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    req.header("x-org-id", ACME).header("x-user-id", ALICE)
}

async fn open_stream(app: &Confab, message: &str) -> (String, SseReader) {
    let res = alice(client().post(app.url("/chat/stream")))
        .json(&json!({ "message": message }))
        .send()
        .await
        .expect("stream request");
    assert_eq!(res.status(), 200);
    let chat = res.headers()["x-chat-id"].to_str().unwrap().to_owned();
    (chat, SseReader::new(res))
}

/// The last message of each chat, read straight from the database.
async fn last_messages(url: &str, chats: &[String]) -> Vec<confab_core::Message> {
    let mut map = HashMap::new();
    map.insert("DATABASE_URL".to_owned(), url.to_owned());
    let config = confab_server::Config::from_map(&map).unwrap();
    let store = confab_server::app::open_store(&config).await.unwrap();
    let mut out = Vec::new();
    for chat in chats {
        let id: ChatId = chat.parse().unwrap();
        let org: OrgId = ACME.parse().unwrap();
        let mut messages = store.list_messages(org, id, None, 10).await.unwrap();
        out.push(messages.pop().expect("assistant message"));
    }
    store.close().await;
    out
}

async fn logs_are_json_lines_that_carry_the_request_id(db: Db) {
    let db = TestDb::new(db).await;
    let mut app =
        Confab::start(&[("DATABASE_URL", &db.url), ("SIMULATED_TOKEN_DELAY_MS", "0")]).await;
    let res = client()
        .get(app.url("/health"))
        .header("x-request-id", "trace-health-1")
        .header("user-agent", "lifecycle-test/1.0")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // A request that logs more than its completion line: an idempotent replay.
    for _ in 0..2 {
        let res = alice(client().post(app.url("/chat")))
            .header("x-request-id", "trace-chat-replay")
            .header("idempotency-key", "log-test")
            .json(&json!({ "message": "log me" }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    // And a stream, whose generator task logs its outcome.
    let res = alice(client().post(app.url("/chat/stream")))
        .header("x-request-id", "trace-stream")
        .json(&json!({ "message": "stream log" }))
        .send()
        .await
        .unwrap();
    SseReader::new(res).all().await;
    let _ = client()
        .get(app.url("/missing"))
        .header("x-request-id", "trace-404")
        .send()
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.signal("TERM");
    assert_eq!(app.wait(Duration::from_secs(15)).await, Some(0));

    let lines = app.log_lines();
    assert!(!lines.is_empty());
    for line in &lines {
        for field in ["timestamp", "level", "message"] {
            assert!(line.get(field).is_some(), "{field} missing: {line}");
        }
    }
    let finished: Vec<&Value> = lines
        .iter()
        .filter(|l| l["message"] == "request completed")
        .collect();
    let health = finished
        .iter()
        .find(|l| l["requestId"] == "trace-health-1")
        .expect("completion line of /health");
    assert_eq!(health["method"], "GET");
    assert_eq!(health["url"], "/health");
    assert_eq!(health["route"], "/health");
    assert_eq!(health["status"], 200);
    assert!(health["duration"].as_f64().is_some());
    assert_eq!(health["userAgent"], "lifecycle-test/1.0");
    let chat = finished
        .iter()
        .find(|l| l["requestId"] == "trace-chat-replay")
        .expect("completion line of POST /chat");
    assert_eq!(chat["orgId"], ACME);
    assert_eq!(chat["userId"], ALICE);
    assert_eq!(chat["route"], "/chat");
    let replay = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("replaying"))
        })
        .expect("replay log line");
    assert_eq!(replay["requestId"], "trace-chat-replay");
    assert_eq!(replay["orgId"], ACME);
    let stream_end = lines
        .iter()
        .find(|l| l["message"] == "stream finished")
        .expect("stream outcome line");
    assert_eq!(stream_end["requestId"], "trace-stream");
    assert_eq!(stream_end["outcome"], "complete");
    let missing = finished
        .iter()
        .find(|l| l["requestId"] == "trace-404")
        .unwrap();
    assert_eq!(missing["route"], "unmatched");
    assert_eq!(missing["status"], 404);
    // Message content never reaches the logs.
    assert!(lines.iter().all(|l| !l.to_string().contains("log me")));
}

async fn sigterm_lets_in_flight_streams_finish_and_exits_zero(db: Db) {
    let db = TestDb::new(db).await;
    let mut app = Confab::start(&[
        ("DATABASE_URL", &db.url),
        ("SIMULATED_TOKEN_DELAY_MS", "60"),
        ("SHUTDOWN_GRACE_SECONDS", "30"),
    ])
    .await;
    let (chat, mut reader) = open_stream(&app, "finish me please").await;
    reader.next_json().await.expect("first token");
    app.signal("TERM");
    let mut last = Value::Null;
    while let Some(ev) = reader.next_json().await {
        last = ev;
    }
    assert_eq!(last["done"], true, "the in-flight stream completed: {last}");
    assert_eq!(app.wait(Duration::from_secs(15)).await, Some(0));
    // No new connections after the signal.
    assert!(client().get(app.url("/health")).send().await.is_err());
    let messages = last_messages(&db.url, &[chat]).await;
    assert_eq!(messages[0].status, MessageStatus::Complete);
}

async fn sigterm_interrupts_streams_still_running_after_the_grace_period(db: Db) {
    let db = TestDb::new(db).await;
    let mut app = Confab::start(&[
        ("DATABASE_URL", &db.url),
        ("SIMULATED_TOKEN_DELAY_MS", "200"),
        ("SIMULATED_MIN_WORDS", "200"),
        ("SHUTDOWN_GRACE_SECONDS", "2"),
        ("RATE_LIMIT_BURST", "1000"),
    ])
    .await;
    let mut streams = Vec::new();
    for i in 0..20 {
        streams.push(open_stream(&app, &format!("long stream {i}")).await);
    }
    for (_, reader) in &mut streams {
        reader.next_json().await.expect("first token");
    }
    let signalled = Instant::now();
    app.signal("TERM");
    let mut chats = Vec::new();
    let mut readers = Vec::new();
    for (chat, reader) in streams {
        chats.push(chat);
        readers.push(tokio::spawn(async move {
            let mut last = Value::Null;
            let mut r = reader;
            while let Some(ev) = r.next_json().await {
                last = ev;
            }
            last
        }));
    }
    for r in readers {
        let last = r.await.unwrap();
        assert!(
            last["done"] == true || last["error"] == "Stream failed",
            "every stream ends with done or the error event: {last}"
        );
    }
    assert_eq!(app.wait(Duration::from_secs(20)).await, Some(0));
    assert!(
        signalled.elapsed() >= Duration::from_secs(2),
        "the grace period was honoured"
    );
    for m in last_messages(&db.url, &chats).await {
        assert!(
            matches!(
                m.status,
                MessageStatus::Complete | MessageStatus::Interrupted
            ),
            "{:?}",
            m.status
        );
        assert!(!m.content.is_empty());
    }
}

async fn sigkill_then_restart_marks_streams_interrupted_with_saved_text(db: Db) {
    let db = TestDb::new(db).await;
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("SIMULATED_TOKEN_DELAY_MS", "50"),
        ("SIMULATED_MIN_WORDS", "400"),
        ("STREAM_STALE_SECONDS", "2"),
        ("RATE_LIMIT_BURST", "1000"),
    ];
    let mut app = Confab::start(&env).await;
    let mut streams = Vec::new();
    for i in 0..5 {
        streams.push(open_stream(&app, &format!("crash test {i}")).await);
    }
    // Read for 3.5 s, remembering what each client had and when.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut chats = Vec::new();
    let mut readers = Vec::new();
    for (i, (chat, mut reader)) in streams.into_iter().enumerate() {
        chats.push(chat);
        let tx = tx.clone();
        readers.push(tokio::spawn(async move {
            let mut text = String::new();
            while let Some(ev) = reader.next_json().await {
                if let Some(t) = ev["token"].as_str() {
                    text.push_str(t);
                    let _ = tx.send((i, Instant::now(), text.clone()));
                }
            }
        }));
    }
    drop(tx);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    app.signal("KILL");
    let killed_at = Instant::now();
    assert_eq!(
        app.wait(Duration::from_secs(10)).await,
        None,
        "killed by a signal"
    );
    // Every reader has read what reached it before the connection dropped
    // (a reader ends with the stream's error: the body was cut).
    for reader in readers {
        let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
    }
    let mut history: Vec<Vec<(Instant, String)>> = vec![Vec::new(); 5];
    while let Ok((i, at, text)) = rx.try_recv() {
        history[i].push((at, text));
    }

    // Restart: the dead process's streams become `interrupted`.
    let mut restarted = Confab::start(&env).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let messages = loop {
        let messages = last_messages(&db.url, &chats).await;
        if messages
            .iter()
            .all(|m| m.status == MessageStatus::Interrupted)
        {
            break messages;
        }
        assert!(
            Instant::now() < deadline,
            "not recovered: {:?}",
            messages.iter().map(|m| m.status).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for (i, m) in messages.iter().enumerate() {
        let received = history[i]
            .last()
            .map(|(_, t)| t.clone())
            .unwrap_or_default();
        // The saved text is what was streamed. It may run ahead of what
        // the client got: tokens saved by the last flush can still have
        // been waiting for their write window (SSE_COALESCE_MS) at the kill.
        assert!(
            received.starts_with(&m.content) || m.content.starts_with(&received),
            "saved text is not what was streamed: saved {} bytes, received {}",
            m.content.len(),
            received.len()
        );
        // Saved at least once a second: everything the client had 2 s
        // before the kill must be in the database (a flush each second, and
        // up to a second for its write on a loaded machine).
        let older = history[i]
            .iter()
            .rev()
            .find(|(at, _)| killed_at.duration_since(*at) >= Duration::from_millis(2000))
            .map(|(_, t)| t.len())
            .unwrap_or(0);
        assert!(
            m.content.len() >= older,
            "saved {} bytes, but the client had {older} bytes 2 s before the kill",
            m.content.len()
        );
        assert!(!m.content.is_empty());
        let usage = m
            .usage
            .expect("recovered turns carry their (estimated) usage");
        assert_eq!(usage.source, confab_core::model::UsageSource::Estimated);
        assert!(usage.completion_tokens > 0);
    }
    // The usage ledger counted each recovered turn once, with the messages'
    // figures (SPEC §12), also after a second recovery sweep.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let report: Value = alice(client().get(restarted.url("/usage")))
        .send()
        .await
        .expect("usage")
        .json()
        .await
        .expect("usage JSON");
    let completion: i64 = messages
        .iter()
        .filter_map(|m| m.usage.map(|u| u.completion_tokens))
        .sum();
    assert_eq!(report["totals"]["turns"], 5, "{report}");
    assert_eq!(
        report["totals"]["completion_tokens"], completion,
        "{report}"
    );
    restarted.signal("TERM");
    assert_eq!(restarted.wait(Duration::from_secs(15)).await, Some(0));
}

#[tokio::test]
async fn invalid_configuration_stops_start_up_with_one_line_naming_the_variable() {
    crate::support::init();
    for (var, value) in [
        ("PORT", "eighty"),
        ("DATABASE_URL", "mysql://x"),
        ("RATE_LIMIT_BURST", "0"),
        ("AUTH_MODE", "nope"),
    ] {
        let out = command(&[(var, value)]).output().await.unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(var), "{stderr}");
    }
}
