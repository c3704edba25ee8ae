//! Overload (README "Overload"): past `MAX_CONCURRENT_STREAMS` running turns,
//! and past `DB_ACQUIRE_TIMEOUT_MS` of waiting for a database connection, a
//! request is answered 503 with `Retry-After` and the JSON error body at once
//! — not after seconds — while the turns already admitted finish intact.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::Connection;

use crate::per_store;
use crate::support::sse::SseReader;
use crate::support::{As, Db, TestApp, TestDb, assert_error, spawn_app_with};

per_store!(
    past_the_bound_turns_are_refused_at_once_and_admitted_streams_finish,
    a_request_that_gets_no_connection_in_time_is_refused_quickly,
);

fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{series} not in metrics:\n{metrics}"))
}

async fn metrics(app: &TestApp) -> String {
    app.get("/metrics", &As::Nobody).await.text().await.unwrap()
}

/// A 503 with `Retry-After` (whole seconds, ≥ 1) and SPEC's error body.
async fn assert_refused(res: reqwest::Response) -> String {
    let retry_after: u64 = res
        .headers()
        .get("retry-after")
        .expect("a 503 carries Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in whole seconds");
    assert!(retry_after >= 1);
    assert_error(res, 503, "Service Unavailable").await
}

/// Each stream lasts ≈ 60 words × 100 ms = 6 s.
const SLOW_STREAM: &[(&str, &str)] = &[
    ("MAX_CONCURRENT_STREAMS", "3"),
    ("SIMULATED_TOKEN_DELAY_MS", "100"),
    ("SIMULATED_MIN_WORDS", "60"),
];

async fn past_the_bound_turns_are_refused_at_once_and_admitted_streams_finish(db: Db) {
    let app = spawn_app_with(db, SLOW_STREAM).await;
    let opened = Instant::now();
    let mut streams = Vec::new();
    for i in 0..3 {
        let res = app
            .post_json(
                "/chat/stream",
                &As::alice(),
                &json!({ "message": format!("long stream {i}") }),
            )
            .await;
        // The head comes with the first token: the turn is running.
        assert_eq!(res.status(), 200);
        let chat = res.headers()["x-chat-id"].to_str().unwrap().to_owned();
        streams.push((chat, SseReader::new(res)));
    }
    assert_eq!(sample(&metrics(&app).await, "turns_in_flight"), 3.0);
    assert_eq!(sample(&metrics(&app).await, "turns_max_concurrent"), 3.0);

    // The fourth turn, by either route, is refused at once: the bound is
    // shared by every route that runs a turn.
    let asked = Instant::now();
    let res = app
        .post_json(
            "/chat/stream",
            &As::bob(),
            &json!({ "message": "one more" }),
        )
        .await;
    let stream_refused_after = asked.elapsed();
    let message = assert_refused(res).await;
    assert!(message.contains("capacity"), "{message}");
    let asked = Instant::now();
    let res = app
        .post_json("/chat", &As::bob(), &json!({ "message": "and another" }))
        .await;
    let chat_refused_after = asked.elapsed();
    assert_refused(res).await;
    // Well within the streams' ≈ 6 s (they run meanwhile).
    assert!(
        stream_refused_after < Duration::from_secs(1)
            && chat_refused_after < Duration::from_secs(1),
        "refusals took {stream_refused_after:?} and {chat_refused_after:?}"
    );
    let text = metrics(&app).await;
    assert_eq!(
        sample(&text, "turns_refused_total{reason=\"capacity\"}"),
        2.0
    );
    // Nothing was stored for the refused turns.
    let (status, chats) = app.get_json("/chats", &As::bob()).await;
    assert_eq!(status, 200);
    assert_eq!(chats["count"], 0, "{chats}");

    // The admitted streams finish, every token in order, and are stored whole.
    for (chat, reader) in streams {
        let (events, _) = reader.all().await;
        let done = events.last().expect("events");
        assert_eq!(done["done"], true, "{done}");
        let tokens: String = events
            .iter()
            .filter(|e| e["done"] == false)
            .map(|e| e["token"].as_str().unwrap())
            .collect();
        assert_eq!(done["fullText"].as_str().unwrap(), tokens);
        assert!(tokens.split_whitespace().count() >= 60, "{tokens}");
        let (status, history) = app.get_json(&format!("/chat/{chat}"), &As::alice()).await;
        assert_eq!(status, 200);
        let reply = history["messages"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()
            .clone();
        assert_eq!(reply["status"], "complete");
        assert_eq!(reply["content"].as_str().unwrap(), tokens);
    }
    assert!(
        opened.elapsed() > Duration::from_secs(4),
        "the streams were meant to outlast the refusals by far ({:?})",
        opened.elapsed()
    );
    // Their places are free again (a turn gives its place back as its task
    // ends, just after the last event).
    let freed = Instant::now();
    while sample(&metrics(&app).await, "turns_in_flight") != 0.0 {
        assert!(
            freed.elapsed() < Duration::from_secs(1),
            "places not given back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let res = app
        .post_json("/chat", &As::bob(), &json!({ "message": "/fail fast" }))
        .await;
    assert_ne!(res.status(), 503);
}

/// Holds the database's only pooled connection busy: PostgreSQL, a lock on
/// `chats` that the next `INSERT INTO chats` waits for; SQLite, the write
/// lock, which the writer connection's `BEGIN IMMEDIATE` waits for.
enum Blocker {
    Postgres(sqlx::PgConnection),
    Sqlite(sqlx::SqliteConnection),
}

impl Blocker {
    async fn take(db: &TestDb) -> Blocker {
        match db.kind {
            Db::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
                sqlx::raw_sql("BEGIN; LOCK TABLE chats IN ACCESS EXCLUSIVE MODE")
                    .execute(&mut conn)
                    .await
                    .unwrap();
                Blocker::Postgres(conn)
            }
            Db::Sqlite => {
                let mut conn = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
                sqlx::raw_sql("BEGIN IMMEDIATE")
                    .execute(&mut conn)
                    .await
                    .unwrap();
                Blocker::Sqlite(conn)
            }
        }
    }

    async fn release(self) {
        match self {
            Blocker::Postgres(mut conn) => {
                sqlx::raw_sql("COMMIT").execute(&mut conn).await.unwrap();
            }
            Blocker::Sqlite(mut conn) => {
                sqlx::raw_sql("COMMIT").execute(&mut conn).await.unwrap();
            }
        }
    }
}

async fn a_request_that_gets_no_connection_in_time_is_refused_quickly(db: Db) {
    let app = spawn_app_with(
        db,
        &[("DB_POOL_MAX", "1"), ("DB_ACQUIRE_TIMEOUT_MS", "300")],
    )
    .await;
    // Cache Alice's principal, so the requests below need the pool only for
    // their turn.
    let (status, _) = app.get_json("/chats", &As::alice()).await;
    assert_eq!(status, 200);

    let blocker = Blocker::take(&app.db).await;
    // The first turn takes the pool's (SQLite: the writer's) only
    // connection and waits on the lock with it.
    let req = app
        .request(reqwest::Method::POST, "/chat", &As::alice())
        .json(&json!({ "message": "waits for the lock" }));
    let first = tokio::spawn(async move { req.send().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let asked = Instant::now();
    let res = app
        .post_json(
            "/chat",
            &As::alice(),
            &json!({ "message": "no connection for me" }),
        )
        .await;
    let refused_after = asked.elapsed();
    let message = assert_refused(res).await;
    assert_eq!(message, "Database unavailable, try again shortly");
    // DB_ACQUIRE_TIMEOUT_MS, not the 5 s the pool used to wait.
    assert!(
        refused_after >= Duration::from_millis(250) && refused_after < Duration::from_secs(1),
        "refused after {refused_after:?}"
    );
    assert!(
        !first.is_finished(),
        "the first turn was meant to wait on the lock"
    );

    blocker.release().await;
    // The first turn then completes: it never gave its connection up.
    let res = first.await.unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert!(
        body["reply"].as_str().is_some_and(|r| !r.is_empty()),
        "{body}"
    );
    assert_eq!(
        sample(
            &metrics(&app).await,
            "turns_refused_total{reason=\"database\"}"
        ),
        1.0
    );
}
