//! Resumable streams and cancel (SPEC §14), checked from outside: two real
//! `confab` processes on one PostgreSQL and one Redis, and the in-process
//! app for the embedded mode (SQLite and PostgreSQL, no Redis).

use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::per_store;
use crate::support::app::{ACME, ALICE};
use crate::support::process::{Confab, PrivateRedis, seeded_postgres};
use crate::support::sse::SseReader;
use crate::support::{As, Db, TestApp, TestDb, spawn_app_with};

per_store!(
    a_resume_on_the_same_instance_continues_exactly_once,
    without_detach_a_disconnect_cancels_and_the_rest_resumes_from_the_database,
    cancel_stops_the_generation_and_readers_get_the_final_event,
    resume_and_cancel_follow_the_chat_rules,
    a_detached_generation_nobody_resumes_is_cancelled_after_the_detach_time,
);

/// Alice's headers, for requests to a process.
fn alice(req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    req.header("x-org-id", ACME).header("x-user-id", ALICE)
}

fn header(res: &reqwest::Response, name: &str) -> String {
    res.headers()
        .get(name)
        .unwrap_or_else(|| panic!("{name} missing"))
        .to_str()
        .unwrap()
        .to_owned()
}

/// Start a stream on `base`; its chat, its message and the open reader.
async fn start(client: &reqwest::Client, base: &str, message: &str) -> (String, String, SseReader) {
    let res = alice(client.post(format!("{base}/chat/stream")))
        .json(&json!({ "message": message }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let chat = header(&res, "x-chat-id");
    let msg = header(&res, "x-message-id");
    (chat, msg, SseReader::new(res))
}

/// How many entries the relay holds for `message` (Redis `XLEN`).
fn xlen(redis: &PrivateRedis, message: &str) -> u64 {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "XLEN"])
        .arg(format!("confab:live:{message}"))
        .output()
        .expect("redis-cli");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Read `n` events, which must be tokens 1..=n.
async fn read_tokens(reader: &mut SseReader, n: u64) -> Vec<(u64, Value)> {
    let mut got = Vec::new();
    for expected in 1..=n {
        let (id, ev) = reader.next_event().await.expect("a token event");
        assert_eq!(id, expected, "ids count up from 1: {ev}");
        assert_eq!(ev["done"], false, "{ev}");
        got.push((id, ev));
    }
    got
}

async fn resume(
    client: &reqwest::Client,
    base: &str,
    chat: &str,
    msg: &str,
    last: u64,
) -> reqwest::Response {
    alice(client.get(format!("{base}/chat/{chat}/messages/{msg}/stream")))
        .header("last-event-id", last.to_string())
        .send()
        .await
        .unwrap()
}

/// The events received before and after a resume are exactly the stream:
/// ids 1..N without gap or repeat, tokens concatenating to the `done`
/// event's `fullText`. Returns the full text.
fn assert_exactly_once(before: &[(u64, Value)], after: &[(u64, Value)]) -> String {
    let all: Vec<&(u64, Value)> = before.iter().chain(after).collect();
    let ids: Vec<u64> = all.iter().map(|(id, _)| *id).collect();
    let expected: Vec<u64> = (1..=all.len() as u64).collect();
    assert_eq!(ids, expected, "ids 1..N, no gap, no repeat");
    let (last, tokens) = all.split_last().expect("events");
    let done = &last.1;
    assert_eq!(done["done"], true, "the last event is done: {done}");
    let text: String = tokens
        .iter()
        .map(|(_, ev)| {
            assert_eq!(ev["done"], false, "{ev}");
            ev["token"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(
        done["fullText"].as_str().unwrap(),
        text,
        "tokens == fullText"
    );
    text
}

pub(crate) async fn stored(client: &reqwest::Client, base: &str, chat: &str, msg: &str) -> Value {
    let body: Value = alice(client.get(format!("{base}/chat/{chat}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == msg)
        .cloned()
        .unwrap_or_else(|| panic!("message {msg} not in {body}"))
}

pub(crate) async fn wait_status(
    client: &reqwest::Client,
    base: &str,
    chat: &str,
    msg: &str,
    status: &str,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = stored(client, base, chat, msg).await;
        if m["status"] == status {
            return m;
        }
        assert!(Instant::now() < deadline, "never {status}: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A counter's value in a `/metrics` text (0 when absent).
fn counter(metrics: &str, sample: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(sample) && l[sample.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn metrics(client: &reqwest::Client, base: &str) -> String {
    client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn process_env<'a>(db: &'a TestDb, redis: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("DATABASE_URL", db.url.as_str()),
        ("REDIS_URL", redis),
        ("REDIS_TIMEOUT_MS", "1000"),
        ("RATE_LIMIT_BURST", "100000"),
        ("STREAM_DETACH_SECONDS", "30"),
        ("SIMULATED_MIN_WORDS", "200"),
        ("SIMULATED_TOKEN_DELAY_MS", "10"),
        ("SEED_DEMO", "false"),
        ("LOG_LEVEL", "warn"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_resume_a_stream_exactly_once_anywhere() {
    crate::support::init();
    let db = seeded_postgres().await;
    let redis = PrivateRedis::start();
    let redis_url = redis.url();
    let env = process_env(&db, &redis_url);
    let a = Confab::start(&env).await;
    let b = Confab::start(&env).await;
    let client = reqwest::Client::new();

    for (case, on, after_finish) in [
        ("resume on B", &b, false),
        ("resume on A", &a, false),
        ("resume on B after the message finished", &b, true),
    ] {
        let (chat, msg, mut reader) =
            start(&client, &a.base, &format!("Tell me a long story ({case})")).await;
        let before = read_tokens(&mut reader, 50).await;
        drop(reader);
        if after_finish {
            wait_status(&client, &a.base, &chat, &msg, "complete").await;
        }
        let res = resume(&client, &on.base, &chat, &msg, 50).await;
        assert_eq!(res.status(), 200, "{case}");
        assert_eq!(header(&res, "content-type"), "text/event-stream");
        assert_eq!(header(&res, "x-message-id"), msg);
        let after = SseReader::new(res).rest().await;
        assert!(
            after.len() > 150,
            "{case}: a 200-word reply: {}",
            after.len()
        );
        let text = assert_exactly_once(&before, &after);
        if case == "resume on B" {
            // Followed from B: relayed from its first event on.
            assert!(xlen(&redis, &msg) > 150, "{case}");
        }
        let saved = stored(&client, &b.base, &chat, &msg).await;
        assert_eq!(saved["status"], "complete", "{case}");
        assert_eq!(
            saved["content"].as_str().unwrap(),
            text,
            "{case}: as stored"
        );
    }

    // Only a stream followed from another instance goes through Redis: one
    // read where it runs leaves nothing there but its final event.
    let (chat, msg, reader) = start(&client, &a.base, "Tell me a long story (unfollowed)").await;
    assert!(reader.rest().await.len() > 150);
    wait_status(&client, &a.base, &chat, &msg, "complete").await;
    assert_eq!(
        xlen(&redis, &msg),
        1,
        "only the end of an unfollowed stream"
    );

    let on_a = metrics(&client, &a.base).await;
    let on_b = metrics(&client, &b.base).await;
    assert!(counter(&on_a, "sse_relay_started_total") >= 1.0, "{on_a}");
    assert!(
        counter(&on_b, r#"sse_resumes_total{source="relay"}"#) >= 1.0,
        "{on_b}"
    );
    assert!(counter(&on_b, r#"sse_resumes_total{source="stored"}"#) >= 1.0);
    assert!(
        counter(&on_a, r#"sse_resumes_total{source="local"}"#) >= 1.0,
        "{on_a}"
    );
    assert!(counter(&on_b, "sse_relay_deliveries_total") > 0.0);
    assert!(counter(&on_b, "sse_replayed_events_total") > 0.0);
    assert!(counter(&on_a, "sse_detached_total") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_to_one_instance_stops_the_generation_on_the_other() {
    crate::support::init();
    let db = seeded_postgres().await;
    let redis = PrivateRedis::start();
    let redis_url = redis.url();
    let env = process_env(&db, &redis_url);
    let a = Confab::start(&env).await;
    let b = Confab::start(&env).await;
    let client = reqwest::Client::new();

    let (chat, msg, mut reader) = start(&client, &a.base, "A story I will stop").await;
    let before = read_tokens(&mut reader, 20).await;
    let sent = Instant::now();
    let res = alice(client.post(format!("{}/chat/{chat}/messages/{msg}/cancel", b.base)))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], "cancelling", "{body}");
    // The reader on A gets the rest of what was generated, then the final
    // (error) event, within a second of the cancel.
    let mut rest = Vec::new();
    let last = loop {
        let (id, ev) = tokio::time::timeout(Duration::from_secs(2), reader.next_event())
            .await
            .expect("events keep coming until the cancel")
            .expect("a final event");
        if ev.get("error").is_some() {
            break (id, ev);
        }
        rest.push((id, ev));
    };
    let stopped = sent.elapsed();
    assert!(
        stopped < Duration::from_secs(1),
        "stopped after {stopped:?}"
    );
    assert!(
        last.1["message"].as_str().unwrap().contains("cancelled"),
        "{}",
        last.1
    );
    assert_eq!(
        last.0 as usize,
        before.len() + rest.len() + 1,
        "the final event has the last id"
    );
    assert!(reader.next_event().await.is_none(), "the stream ends");
    let saved = wait_status(&client, &b.base, &chat, &msg, "cancelled").await;
    let text: String = before
        .iter()
        .chain(&rest)
        .map(|(_, ev)| ev["token"].as_str().unwrap())
        .collect();
    assert_eq!(
        saved["content"].as_str().unwrap(),
        text,
        "the partial text is kept"
    );
    assert!(
        stopped < Duration::from_secs(1) && text.split_whitespace().count() < 150,
        "the generation stopped well before its end"
    );

    // A resume of the cancelled message ends with the same final event.
    let res = resume(&client, &b.base, &chat, &msg, last.0 - 1).await;
    let tail = SseReader::new(res).rest().await;
    assert_eq!(tail.len(), 1, "{tail:?}");
    assert_eq!(tail[0].0, last.0);
    assert!(tail[0].1.get("error").is_some());
    // Cancelling a finished message is accepted and changes nothing.
    let again: Value = alice(client.post(format!("{}/chat/{chat}/messages/{msg}/cancel", a.base)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["status"], "cancelled", "{again}");
    let on_b = metrics(&client, &b.base).await;
    assert!(
        counter(&on_b, r#"sse_cancels_total{delivery="relay"}"#) >= 1.0,
        "{on_b}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_while_the_generating_instance_was_unsubscribed_still_stops_it() {
    crate::support::init();
    let db = seeded_postgres().await;
    let redis = PrivateRedis::start();
    let redis_url = redis.url();
    let mut env = process_env(&db, &redis_url);
    // A reply long enough to outlast A's resubscription (≈ 1 s).
    env.retain(|(k, _)| *k != "SIMULATED_TOKEN_DELAY_MS");
    env.push(("SIMULATED_TOKEN_DELAY_MS", "30"));
    let a = Confab::start(&env).await;
    let b = Confab::start(&env).await;
    let client = reqwest::Client::new();
    let (chat, msg, mut reader) = start(&client, &a.base, "A story cancelled unheard").await;
    read_tokens(&mut reader, 5).await;
    // Drop every subscriber (A's too): the cancel below is published while
    // nobody listens, as during a Redis restart or a dropped connection.
    let port = redis_url.rsplit(':').next().unwrap().trim_end_matches('/');
    let killed = std::process::Command::new("redis-cli")
        .args(["-p", port, "CLIENT", "KILL", "TYPE", "pubsub"])
        .output()
        .expect("redis-cli");
    assert!(killed.status.success(), "{killed:?}");
    let res = alice(client.post(format!("{}/chat/{chat}/messages/{msg}/cancel", b.base)))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    // A resubscribes, finds the cancel it missed, and stops.
    let saved = wait_status(&client, &a.base, &chat, &msg, "cancelled").await;
    let words = saved["content"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .count();
    assert!(words < 150, "stopped well before the end: {words} words");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_learns_the_reply_was_interrupted_when_the_generating_instance_dies() {
    crate::support::init();
    let db = seeded_postgres().await;
    let redis = PrivateRedis::start();
    let redis_url = redis.url();
    let mut env = process_env(&db, &redis_url);
    env.retain(|(k, _)| *k != "SIMULATED_TOKEN_DELAY_MS");
    env.extend([
        ("SIMULATED_TOKEN_DELAY_MS", "40"),
        ("STREAM_STALE_SECONDS", "2"),
    ]);
    let a = Confab::start(&env).await;
    let b = Confab::start(&env).await;
    let client = reqwest::Client::new();
    let (chat, msg, mut reader) =
        start(&client, &a.base, "A story its server will not finish").await;
    read_tokens(&mut reader, 30).await;
    drop(reader);
    // Follow on B, then A dies mid-reply (SIGKILL: nothing settles).
    let mut follower = SseReader::new(resume(&client, &b.base, &chat, &msg, 30).await);
    let mut last = 30;
    for _ in 0..20 {
        let (id, ev) = follower.next_event().await.expect("a relayed token");
        assert_eq!(id, last + 1, "{ev}");
        last = id;
    }
    a.signal("KILL");
    // The follower ends with a final event — the reply was interrupted —
    // as the next id it lacks, however much the dead process had saved.
    let (id, ev) = loop {
        let (id, ev) = tokio::time::timeout(Duration::from_secs(30), follower.next_event())
            .await
            .expect("the follower hears the end")
            .expect("a final event before the stream ends");
        assert_eq!(id, last + 1, "{ev}");
        last = id;
        if ev.get("error").is_some() {
            break (id, ev);
        }
    };
    assert!(
        ev["message"].as_str().unwrap().contains("interrupted"),
        "{ev}"
    );
    assert!(follower.next_event().await.is_none(), "the stream ends");
    let saved = wait_status(&client, &b.base, &chat, &msg, "interrupted").await;
    assert!(!saved["content"].as_str().unwrap().is_empty());
    // A client that reconnects from any id it saw (tokens the dead process
    // never saved included) hears how the reply ended, as its next event.
    for from in [id - 1, id] {
        let again = SseReader::new(resume(&client, &b.base, &chat, &msg, from).await)
            .rest()
            .await;
        assert_eq!(again.len(), 1, "{again:?}");
        assert_eq!(again[0].0, from + 1);
        assert!(again[0].1.get("error").is_some(), "{again:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_finished_replies_resume_and_live_ones_answer_503() {
    crate::support::init();
    let db = seeded_postgres().await;
    let mut redis = PrivateRedis::start();
    let redis_url = redis.url();
    let env = process_env(&db, &redis_url);
    let a = Confab::start(&env).await;
    let b = Confab::start(&env).await;
    let client = reqwest::Client::new();

    let (chat, msg, mut reader) = start(&client, &a.base, "A story while Redis dies").await;
    let before = read_tokens(&mut reader, 30).await;
    drop(reader);
    redis.stop();
    // Live on A, not on B: B cannot follow it without the relay.
    let res = resume(&client, &b.base, &chat, &msg, 30).await;
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"], "Service Unavailable");
    assert!(
        body["message"].as_str().unwrap().contains("try again"),
        "{body}"
    );
    // The generation goes on (detached) and is stored whole: nothing lost.
    let saved = wait_status(&client, &a.base, &chat, &msg, "complete").await;
    let res = resume(&client, &b.base, &chat, &msg, 30).await;
    assert_eq!(res.status(), 200);
    let after = SseReader::new(res).rest().await;
    let text = assert_exactly_once(&before, &after);
    assert_eq!(saved["content"].as_str().unwrap(), text);
    // The resume on A itself, from the start, needs no Redis either.
    let res = resume(&client, &a.base, &chat, &msg, 0).await;
    let whole = SseReader::new(res).rest().await;
    assert_eq!(assert_exactly_once(&[], &whole), text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_on_another_instance_keeps_a_detached_generation_going() {
    crate::support::init();
    let db = seeded_postgres().await;
    let redis = PrivateRedis::start();
    let redis_url = redis.url();
    let mut env = process_env(&db, &redis_url);
    env.retain(|(k, _)| *k != "STREAM_DETACH_SECONDS" && *k != "SIMULATED_TOKEN_DELAY_MS");
    env.push(("STREAM_DETACH_SECONDS", "1"));
    env.push(("SIMULATED_TOKEN_DELAY_MS", "20"));
    let a = Confab::start(&env).await;
    let b = Confab::start(&env).await;
    let client = reqwest::Client::new();
    // 200 words at 20 ms: about 4 s, far beyond the 1 s detach time, which
    // only B's reader (watched through Redis) can bridge.
    let (chat, msg, mut reader) = start(&client, &a.base, "Keep going for B").await;
    let before = read_tokens(&mut reader, 5).await;
    drop(reader);
    let res = resume(&client, &b.base, &chat, &msg, 5).await;
    let after = SseReader::new(res).rest().await;
    let text = assert_exactly_once(&before, &after);
    let saved = stored(&client, &a.base, &chat, &msg).await;
    assert_eq!(saved["status"], "complete");
    assert_eq!(saved["content"].as_str().unwrap(), text);
}

// ------------------------------------------------------------ embedded mode

async fn a_detached_generation_nobody_resumes_is_cancelled_after_the_detach_time(db: Db) {
    let app = spawn_app_with(
        db,
        &[
            ("STREAM_DETACH_SECONDS", "1"),
            ("SIMULATED_MIN_WORDS", "300"),
            ("SIMULATED_TOKEN_DELAY_MS", "20"),
        ],
    )
    .await;
    let (chat, msg, mut reader) = start_on(&app, "Nobody comes back").await;
    read_tokens(&mut reader, 3).await;
    let left = Instant::now();
    drop(reader);
    // Still generating a moment after the disconnect (detached) ...
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        stored(&app.client, &app.base, &chat, &msg).await["status"],
        "streaming"
    );
    // ... then cancelled once the detach time passed with no reader, long
    // before the 6 s reply would have completed.
    let saved = wait_status(&app.client, &app.base, &chat, &msg, "cancelled").await;
    let took = left.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(!saved["content"].as_str().unwrap().is_empty());
    let metrics = metrics(&app.client, &app.base).await;
    assert!(counter(&metrics, "sse_detached_total") >= 1.0);
}

async fn start_on(app: &TestApp, message: &str) -> (String, String, SseReader) {
    start(&app.client, &app.base, message).await
}

async fn a_resume_on_the_same_instance_continues_exactly_once(db: Db) {
    let app = spawn_app_with(
        db,
        &[
            ("STREAM_DETACH_SECONDS", "30"),
            ("SIMULATED_MIN_WORDS", "120"),
            ("SIMULATED_TOKEN_DELAY_MS", "5"),
        ],
    )
    .await;
    let (chat, msg, mut reader) = start_on(&app, "Resume me here").await;
    let before = read_tokens(&mut reader, 10).await;
    drop(reader);
    // Two readers follow the one generation; the second comes in with ?after=.
    let one = resume(&app.client, &app.base, &chat, &msg, 10).await;
    let two = alice(
        app.client
            .get(app.url(&format!("/chat/{chat}/messages/{msg}/stream?after=10"))),
    )
    .send()
    .await
    .unwrap();
    let (one, two) = tokio::join!(SseReader::new(one).rest(), SseReader::new(two).rest());
    let text = assert_exactly_once(&before, &one);
    assert_eq!(assert_exactly_once(&before, &two), text);
    let saved = stored(&app.client, &app.base, &chat, &msg).await;
    assert_eq!(saved["content"].as_str().unwrap(), text);
    // After the final event there is nothing more: 204.
    let last = (before.len() + one.len()) as u64;
    let res = resume(&app.client, &app.base, &chat, &msg, last).await;
    assert_eq!(res.status(), 204);
}

async fn without_detach_a_disconnect_cancels_and_the_rest_resumes_from_the_database(db: Db) {
    let app = spawn_app_with(
        db,
        &[
            ("SIMULATED_MIN_WORDS", "200"),
            ("SIMULATED_TOKEN_DELAY_MS", "20"),
        ],
    )
    .await;
    let (chat, msg, mut reader) = start_on(&app, "Leave early").await;
    let before = read_tokens(&mut reader, 5).await;
    drop(reader);
    let saved = wait_status(&app.client, &app.base, &chat, &msg, "cancelled").await;
    // The stored events resume with their ids: what was generated after
    // event 5, then the final error event.
    let res = resume(&app.client, &app.base, &chat, &msg, 5).await;
    let after = SseReader::new(res).rest().await;
    let (last, tokens) = after.split_last().expect("a final event");
    assert!(
        last.1["message"].as_str().unwrap().contains("cancelled"),
        "{}",
        last.1
    );
    let ids: Vec<u64> = before.iter().chain(&after).map(|(id, _)| *id).collect();
    assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>());
    let text: String = before
        .iter()
        .chain(tokens)
        .map(|(_, ev)| ev["token"].as_str().unwrap())
        .collect();
    assert_eq!(saved["content"].as_str().unwrap(), text);
}

async fn cancel_stops_the_generation_and_readers_get_the_final_event(db: Db) {
    let app = spawn_app_with(
        db,
        &[
            ("SIMULATED_MIN_WORDS", "300"),
            ("SIMULATED_TOKEN_DELAY_MS", "20"),
        ],
    )
    .await;
    let (chat, msg, mut original) = start_on(&app, "Stop me").await;
    read_tokens(&mut original, 3).await;
    let follower = resume(&app.client, &app.base, &chat, &msg, 3).await;
    let mut follower = SseReader::new(follower);
    follower
        .next_event()
        .await
        .expect("the follower reads live");
    let res = alice(
        app.client
            .post(app.url(&format!("/chat/{chat}/messages/{msg}/cancel"))),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(res.status(), 202);
    let sent = Instant::now();
    let (original_rest, follower_rest) = tokio::join!(original.rest(), follower.rest());
    assert!(
        sent.elapsed() < Duration::from_secs(1),
        "{:?}",
        sent.elapsed()
    );
    let (o, f) = (original_rest.last().unwrap(), follower_rest.last().unwrap());
    assert_eq!(o.0, f.0, "both end on the same last id");
    assert!(
        o.1["message"].as_str().unwrap().contains("cancelled"),
        "{}",
        o.1
    );
    assert_eq!(o.1, f.1);
    wait_status(&app.client, &app.base, &chat, &msg, "cancelled").await;
}

async fn resume_and_cancel_follow_the_chat_rules(db: Db) {
    let app = spawn_app_with(db, &[]).await;
    let bob = As::bob();
    let res = app
        .post_json("/chat/stream", &bob, &json!({ "message": "mine" }))
        .await;
    let chat = header(&res, "x-chat-id");
    let msg = header(&res, "x-message-id");
    SseReader::new(res).all().await;
    let path = |what: &str| format!("/chat/{chat}/messages/{msg}/{what}");
    // Bob's own chat: resumable; an admin of his org may read it too.
    assert_eq!(app.get(&path("stream"), &bob).await.status(), 200);
    assert_eq!(app.get(&path("stream"), &As::alice()).await.status(), 200);
    // Another org's user, a bad id, a message of another chat: 404.
    assert_eq!(app.get(&path("stream"), &As::charlie()).await.status(), 404);
    let bad = format!("/chat/{chat}/messages/not-a-uuid/stream");
    assert_eq!(app.get(&bad, &bob).await.status(), 404);
    let other = app.chat(&bob, "another", None).await;
    let foreign = format!(
        "/chat/{}/messages/{msg}/stream",
        other["chat_id"].as_str().unwrap()
    );
    assert_eq!(app.get(&foreign, &bob).await.status(), 404);
    // The user message is not a stream.
    let (_, history) = app.get_json(&format!("/chat/{chat}"), &bob).await;
    let user_msg = history["messages"][0]["id"].as_str().unwrap().to_owned();
    let user_path = format!("/chat/{chat}/messages/{user_msg}/stream");
    assert_eq!(app.get(&user_path, &bob).await.status(), 404);
    // A Last-Event-ID that is not an event id: 400.
    let res = app
        .request(reqwest::Method::GET, &path("stream"), &bob)
        .header("last-event-id", "soon")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    // Cancel: the owner only (the admin who may read it gets 403).
    let cancel = |who: As| {
        let req = app.request(reqwest::Method::POST, &path("cancel"), &who);
        async move { req.send().await.unwrap().status() }
    };
    assert_eq!(cancel(As::alice()).await, 403);
    assert_eq!(cancel(As::charlie()).await, 404);
    assert_eq!(cancel(bob.clone()).await, 202);
    assert_eq!(app.get(&path("stream"), &As::Nobody).await.status(), 401);
}
