//! Overload (README "Overload"): past `MAX_CONCURRENT_STREAMS` running turns,
//! and past `DB_ACQUIRE_TIMEOUT_MS` of waiting for a database connection, a
//! request is answered 503 with `Retry-After` and the JSON error body at once
//! — not after seconds — while the turns already admitted finish intact.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::Connection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::per_store;
use crate::support::app::raw_post_head;
use crate::support::sse::SseReader;
use crate::support::{As, Db, TestApp, TestDb, assert_error, spawn_app_with};

per_store!(
    past_the_bound_turns_are_refused_at_once_and_admitted_streams_finish,
    a_turn_refused_at_capacity_costs_no_rate_limit_token,
    a_turn_refused_at_capacity_is_refused_before_its_body_arrives,
    a_turn_whose_body_comes_after_the_last_place_went_is_refused_before_its_rate_limit,
    a_request_that_gets_no_connection_in_time_is_refused_quickly,
    with_one_pooled_connection_reads_work_after_turns,
);

/// PostgreSQL only: an embedded SQLite file cannot be taken away from a
/// running process (WAL readers are never blocked), so "the database is
/// down" is a PostgreSQL situation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_principals_keep_working_through_a_database_outage_for_the_grace() {
    crate::support::init();
    cached_principals_outlive_an_outage(Db::Postgres).await;
}

/// PostgreSQL only, for the same reason: a lookup that hangs needs a lock
/// that readers wait for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_in_use_is_served_at_once_through_a_database_stall() {
    crate::support::init();
    keys_in_use_are_refreshed_ahead_and_served_through_a_stall(Db::Postgres).await;
}

/// PostgreSQL only, as above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_key_waits_for_its_lookup_at_most_the_bound_in_a_stall() {
    crate::support::init();
    idle_keys_wait_for_their_lookup_within_the_bound(Db::Postgres).await;
}

/// PostgreSQL only: the readiness probe has its own connection there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_pool_does_not_make_the_instance_unready() {
    crate::support::init();
    // The pool's only connection waits on a lock inside a turn, for longer
    // than the probe's interval and deadline: requests needing the pool are
    // refused (503), yet the database answers and the instance stays ready.
    let (app, blocker, first) = the_only_connection_held(Db::Postgres).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, body) = app.get_json("/readyz", &As::Nobody).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["database"], "connected");
    blocker.release().await;
    assert_eq!(first.await.unwrap().status(), 200);
}

pub(crate) fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{series} not in metrics:\n{metrics}"))
}

pub(crate) async fn metrics(app: &TestApp) -> String {
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

/// The capacity is looked at before the rate limit: a turn the server has
/// no room for is refused without taking one of the org's tokens (a client
/// is not charged for the server's overload), and without the limiter's
/// round trip (in a burst, refusals would otherwise queue behind it).
async fn a_turn_refused_at_capacity_costs_no_rate_limit_token(db: Db) {
    let (app, res) = holding_the_only_place(
        db,
        &[
            ("RATE_LIMIT_BURST", "4"),
            ("RATE_LIMIT_PER_SECOND", "0.001"),
        ],
    )
    .await;
    assert_eq!(res.headers()["x-ratelimit-remaining"], "3");
    let reader = SseReader::new(res);
    // More refusals than the org has tokens left, by every route that runs a
    // turn: each is a 503, none a 429.
    for path in ["/chat", "/chat/stream", "/chat"] {
        let res = app
            .post_json(path, &As::alice(), &json!({ "message": "no room" }))
            .await;
        assert_refused(res).await;
    }
    // The OpenAI route too (its error in OpenAI's shape).
    let res = app
        .post_json(
            "/v1/chat/completions",
            &As::alice(),
            &json!({ "model": "simulated", "messages": [{ "role": "user", "content": "hi" }] }),
        )
        .await;
    assert_eq!(res.status(), 503);
    assert!(res.headers().get("retry-after").is_some());
    let (events, _) = reader.all().await;
    assert_eq!(events.last().expect("events")["done"], true);
    // The refusals took nothing: the next request still has 3 − 1 left.
    let res = app.get("/chats", &As::alice()).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-ratelimit-remaining"], "2");
}

/// A server with room for one turn, and a stream of ≈ 3 s (30 words at
/// 100 ms) holding it: the answer to that stream, already 200.
pub(crate) async fn holding_the_only_place(
    db: Db,
    extra: &[(&'static str, &'static str)],
) -> (TestApp, reqwest::Response) {
    let app = with_one_place(db, extra).await;
    let res = hold_the_place(&app).await;
    (app, res)
}

/// A server with room for one turn, whose replies take ≈ 3 s.
async fn with_one_place(db: Db, extra: &[(&'static str, &'static str)]) -> TestApp {
    let mut env = vec![
        ("MAX_CONCURRENT_STREAMS", "1"),
        ("SIMULATED_TOKEN_DELAY_MS", "100"),
        ("SIMULATED_MIN_WORDS", "30"),
    ];
    env.extend_from_slice(extra);
    spawn_app_with(db, &env).await
}

/// A stream of Alice's that takes the only place: its answer, already 200.
async fn hold_the_place(app: &TestApp) -> reqwest::Response {
    let res = app
        .post_json(
            "/chat/stream",
            &As::alice(),
            &json!({ "message": "hold the place" }),
        )
        .await;
    assert_eq!(res.status(), 200);
    res
}

/// What the server sent on `tcp` until `until` is in it; panics after 5 s
/// or if the connection closes first.
async fn read_until(tcp: &mut TcpStream, until: &str, what: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(until) {
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer within 5 s"))
            .unwrap();
        assert!(n > 0, "{what}: closed without an answer: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// At capacity a turn is refused from its head: the server does not wait for
/// its body first (a body that never comes would hold the refusal for
/// `HTTP_BODY_TIMEOUT_MS` and then get 408).
async fn a_turn_refused_at_capacity_is_refused_before_its_body_arrives(db: Db) {
    let (app, res) = holding_the_only_place(db, &[("HTTP_BODY_TIMEOUT_MS", "20000")]).await;
    let reader = SseReader::new(res);
    for path in ["/chat", "/chat/stream", "/v1/chat/completions"] {
        let mut tcp = TcpStream::connect(app.addr).await.unwrap();
        let head = raw_post_head(app.addr, path, 40);
        tcp.write_all(head.as_bytes()).await.unwrap();
        let asked = Instant::now();
        let raw = read_until(&mut tcp, "at capacity", path).await;
        assert!(raw.starts_with("HTTP/1.1 503"), "{path}: {raw}");
        assert!(
            raw.to_ascii_lowercase().contains("retry-after: 1"),
            "{path}: {raw}"
        );
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "{path}: refused after {:?}",
            asked.elapsed()
        );
    }
    let (events, _) = reader.all().await;
    assert_eq!(events.last().expect("events")["done"], true);
}

/// A turn whose head came while there was room, and whose body came only
/// after the last place went to another turn, is refused as the body is
/// read: before its rate-limit token (as any refusal at capacity), not after
/// authentication and the limiter's round trip. (Before, the look at the
/// head let it through and only the turn's start refused it: a token was
/// taken, and in a ramp of 10,000 streams such refusals came up to 113 ms
/// after their request.)
async fn a_turn_whose_body_comes_after_the_last_place_went_is_refused_before_its_rate_limit(
    db: Db,
) {
    let app = with_one_place(
        db,
        &[
            ("RATE_LIMIT_BURST", "4"),
            ("RATE_LIMIT_PER_SECOND", "0.001"),
            ("HTTP_BODY_TIMEOUT_MS", "20000"),
        ],
    )
    .await;
    let body = json!({ "message": "late body" }).to_string();
    // The head alone, while the server has room: it is let in and waits for
    // the body.
    let mut late = TcpStream::connect(app.addr).await.unwrap();
    let head = raw_post_head(app.addr, "/chat/stream", body.len());
    late.write_all(head.as_bytes()).await.unwrap();
    // The server must have read that head before the stream below takes
    // the place. Nothing outside tells when it has; a head on loopback is
    // read within a millisecond, so half a second orders the two.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let res = hold_the_place(&app).await;
    assert_eq!(res.headers()["x-ratelimit-remaining"], "3");
    let reader = SseReader::new(res);
    // Now the body: no place is left.
    late.write_all(body.as_bytes()).await.unwrap();
    let raw = read_until(&mut late, "\r\n\r\n{", "the late body")
        .await
        .to_ascii_lowercase();
    assert!(raw.starts_with("http/1.1 503"), "{raw}");
    assert!(raw.contains("retry-after: 1"), "{raw}");
    // It took no token: the next request still has 3 − 1 left.
    let res = app.get("/chats", &As::alice()).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-ratelimit-remaining"], "2");
    let (events, _) = reader.all().await;
    assert_eq!(events.last().expect("events")["done"], true);
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

/// An app with one pooled connection (`DB_ACQUIRE_TIMEOUT_MS` 300) and a
/// turn that holds it, waiting on the blocker's lock; that turn's response
/// comes once the blocker is released.
async fn the_only_connection_held(db: Db) -> (TestApp, Blocker, JoinHandle<reqwest::Response>) {
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
    (app, blocker, first)
}

async fn a_request_that_gets_no_connection_in_time_is_refused_quickly(db: Db) {
    let (app, blocker, first) = the_only_connection_held(db).await;

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

async fn with_one_pooled_connection_reads_work_after_turns(db: Db) {
    // DB_POOL_MAX=1 is allowed: the group commit's writer must give the only
    // connection back after its batch, or every read waits for it and is
    // refused after DB_ACQUIRE_TIMEOUT_MS.
    let app = spawn_app_with(
        db,
        &[("DB_POOL_MAX", "1"), ("DB_ACQUIRE_TIMEOUT_MS", "500")],
    )
    .await;
    for n in 0..3 {
        let res = app
            .post_json(
                "/chat",
                &As::alice(),
                &json!({ "message": format!("turn {n}") }),
            )
            .await;
        let status = res.status();
        let body: Value = res.json().await.unwrap();
        assert_eq!(status, 200, "{body}");
        let chat = body["chat_id"].as_str().unwrap().to_owned();
        let asked = Instant::now();
        let (status, body) = app.get_json(&format!("/chat/{chat}"), &As::alice()).await;
        assert_eq!(status, 200, "{body}");
        assert!(
            asked.elapsed() < Duration::from_millis(400),
            "{:?}",
            asked.elapsed()
        );
        let (status, _) = app.get_json("/chats", &As::alice()).await;
        assert_eq!(status, 200);
    }
}

const TTL: Duration = Duration::from_millis(500);
const GRACE: Duration = Duration::from_secs(3);

async fn set_allow_connections(db: &TestDb, allow: bool) {
    let name = db.name().to_owned();
    let mut admin = sqlx::PgConnection::connect(&crate::support::postgres_admin_url())
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {name} ALLOW_CONNECTIONS {allow}"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
}

async fn new_key(app: &TestApp) -> As {
    let generated = confab_server::auth::generate_key();
    app.state
        .store
        .create_api_key(&confab_core::NewApiKey {
            id: confab_core::ApiKeyId::new(),
            org_id: crate::support::app::ACME.parse().unwrap(),
            user_id: crate::support::app::BOB.parse().unwrap(),
            hash: generated.hash,
            prefix: generated.prefix,
            name: "outage".into(),
        })
        .await
        .unwrap();
    As::Key(generated.secret)
}

async fn cached_principals_outlive_an_outage(db: Db) {
    let app = spawn_app_with(
        db,
        &[
            ("AUTH_CACHE_TTL_SECONDS", "0.5"),
            ("AUTH_CACHE_GRACE_SECONDS", "3"),
        ],
    )
    .await;
    let by_key = new_key(&app).await;
    // `GET /` with credentials needs nothing but the principal (and the
    // in-process limiter): it shows what authentication alone does.
    let root_org = |body: &Value| body["org"].as_str().map(str::to_owned);
    for who in [&As::alice(), &by_key] {
        let (status, body) = app.get_json("/", who).await;
        assert_eq!(status, 200);
        assert_eq!(root_org(&body).as_deref(), Some(crate::support::app::ACME));
    }
    let cached_at = Instant::now();

    crate::hardening::make_database_unavailable(&app.db).await;
    let (status, _) = app.get_json("/chats", &As::alice()).await;
    assert_eq!(status, 503, "the database is really gone");

    // Past the TTL, within the grace: every request with a cached principal
    // is served — one at a time and many at once, while refreshes fail.
    tokio::time::sleep(TTL + Duration::from_millis(100)).await;
    while cached_at.elapsed() < TTL + GRACE - Duration::from_millis(700) {
        let burst = (0..20).map(|i| {
            let who = if i % 2 == 0 {
                As::alice()
            } else {
                by_key.clone()
            };
            let req = app.request(reqwest::Method::GET, "/", &who);
            async move { req.send().await.unwrap().status().as_u16() }
        });
        let statuses = futures::future::join_all(burst).await;
        assert!(
            statuses.iter().all(|s| *s == 200),
            "{statuses:?} at {:?}",
            cached_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = metrics(&app).await;
    assert!(sample(&text, "auth_cache_stale_total") >= 20.0, "{text}");
    assert!(
        sample(&text, "auth_cache_refresh_errors_total") >= 2.0,
        "{text}"
    );

    // Past the grace the principal is gone: the request needs the database
    // and is told it is unavailable (not 401: nothing says the key is bad).
    tokio::time::sleep(
        (TTL + GRACE + Duration::from_millis(200)).saturating_sub(cached_at.elapsed()),
    )
    .await;
    let asked = Instant::now();
    let res = app.get("/", &by_key).await;
    assert_refused(res).await;
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );

    // Back: served again, and fresh.
    set_allow_connections(&app.db, true).await;
    let back = Instant::now();
    loop {
        let (status, body) = app.get_json("/", &by_key).await;
        if status == 200 {
            assert_eq!(root_org(&body).as_deref(), Some(crate::support::app::ACME));
            break;
        }
        assert!(back.elapsed() < Duration::from_secs(5), "still {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Key lookups wait for this lock until the transaction ends: a stalled
/// database, for lookups only.
async fn lock_api_keys(db: &TestDb) -> sqlx::PgConnection {
    let mut locker = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql("BEGIN; LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .unwrap();
    locker
}

/// `count` concurrent `GET /` as `who`: their statuses and how long the
/// slowest took.
async fn burst(app: &TestApp, who: &As, count: usize) -> (Vec<u16>, Duration) {
    let asked = Instant::now();
    let requests = (0..count).map(|_| {
        let req = app.request(reqwest::Method::GET, "/", who);
        async move { req.send().await.unwrap().status().as_u16() }
    });
    let statuses = futures::future::join_all(requests).await;
    (statuses, asked.elapsed())
}

async fn keys_in_use_are_refreshed_ahead_and_served_through_a_stall(db: Db) {
    // A lookup may take 1 s (DB_ACQUIRE_TIMEOUT_MS): a request that waited
    // for one would take that long.
    let app = spawn_app_with(
        db,
        &[
            ("AUTH_CACHE_TTL_SECONDS", "1"),
            ("AUTH_CACHE_GRACE_SECONDS", "30"),
            ("DB_ACQUIRE_TIMEOUT_MS", "1000"),
        ],
    )
    .await;
    let by_key = new_key(&app).await;
    assert_eq!(app.get("/", &by_key).await.status(), 200);
    let misses = sample(&metrics(&app).await, "auth_cache_misses_total");
    let mut locker = lock_api_keys(&app.db).await;

    // In use through three TTLs: refreshed from half its TTL on (the
    // refresh hangs, then fails at the bound), stale past the TTL, and
    // never a request that waits.
    let used = Instant::now();
    while used.elapsed() < Duration::from_millis(3000) {
        let (statuses, took) = burst(&app, &by_key, 10).await;
        assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
        assert!(took < Duration::from_millis(500), "waited {took:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = metrics(&app).await;
    assert!(sample(&text, "auth_cache_stale_total") >= 10.0, "{text}");
    assert!(
        sample(&text, "auth_cache_refresh_errors_total") >= 1.0,
        "{text}"
    );
    // One lookup at a time, each at most the bound: ≈ 3, never one per request.
    let lookups = sample(&text, "auth_cache_misses_total") - misses;
    assert!((1.0..=5.0).contains(&lookups), "{lookups} lookups");

    // Once the lock goes, a refresh succeeds and the entry is fresh again:
    // no more stale serving until the next TTL.
    sqlx::raw_sql("COMMIT").execute(&mut locker).await.unwrap();
    let released = Instant::now();
    loop {
        assert_eq!(app.get("/", &by_key).await.status(), 200);
        let stale = sample(&metrics(&app).await, "auth_cache_stale_total");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(app.get("/", &by_key).await.status(), 200);
        if sample(&metrics(&app).await, "auth_cache_stale_total") == stale {
            break;
        }
        assert!(
            released.elapsed() < Duration::from_secs(3),
            "never fresh again"
        );
    }
}

async fn idle_keys_wait_for_their_lookup_within_the_bound(db: Db) {
    let app = spawn_app_with(
        db,
        &[
            ("AUTH_CACHE_TTL_SECONDS", "0.3"),
            ("AUTH_CACHE_GRACE_SECONDS", "30"),
            ("DB_ACQUIRE_TIMEOUT_MS", "600"),
        ],
    )
    .await;
    let by_key = new_key(&app).await;
    assert_eq!(app.get("/", &by_key).await.status(), 200);
    let mut locker = lock_api_keys(&app.db).await;
    // Idle past its TTL: the next requests wait for the lookup (that is
    // how a revoked key is refused however long it sat unused), which
    // hangs on the lock; at the bound it counts as failed and the cached
    // principal is served, as in an outage.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (statuses, took) = burst(&app, &by_key, 10).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(2000),
        "{took:?}"
    );
    // The failure is remembered: from now on no request waits.
    for _ in 0..5 {
        let (statuses, took) = burst(&app, &by_key, 10).await;
        assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
        assert!(took < Duration::from_millis(400), "waited {took:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sqlx::raw_sql("COMMIT").execute(&mut locker).await.unwrap();
}
