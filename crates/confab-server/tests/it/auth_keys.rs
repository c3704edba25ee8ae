//! API keys and the admin CLI (SPEC §3, issue "production authentication"),
//! on SQLite and PostgreSQL.

use std::time::{Duration, Instant};

use confab_core::model::NewApiKey;
use confab_core::{ApiKeyId, OrgId, UserId};
use confab_server::auth::generate_key;
use serde_json::json;

use crate::per_store;
use crate::support::app::{ACME, ALICE, BOB, CHARLIE, TECH};
use crate::support::process::command;
use crate::support::{As, Db, TestApp, TestDb, assert_error, spawn_app, spawn_app_with, spawn_on};

per_store!(
    a_valid_key_authenticates_as_its_user,
    unknown_or_malformed_keys_are_401_without_details,
    a_revoked_key_is_refused_within_the_cache_ttl,
    a_revoked_key_that_sat_idle_is_refused_at_its_next_request,
    a_key_of_a_deleted_user_is_refused,
    a_key_is_judged_before_headers,
    production_refuses_header_auth_unless_enabled,
    key_use_is_recorded_in_batches,
    cli_creates_org_user_and_key_that_work_over_http,
    cli_rejects_bad_input_with_clear_errors,
    an_org_left_with_no_configured_model_lists_none,
    the_database_never_holds_a_plaintext_key,
);

async fn new_key(app: &TestApp, org: &str, user: &str) -> (ApiKeyId, String) {
    let generated = generate_key();
    let key = app
        .state
        .store
        .create_api_key(&NewApiKey {
            id: ApiKeyId::new(),
            org_id: org.parse::<OrgId>().unwrap(),
            user_id: user.parse::<UserId>().unwrap(),
            hash: generated.hash,
            prefix: generated.prefix,
            name: "test".into(),
        })
        .await
        .unwrap();
    (key.id, generated.secret)
}

async fn a_valid_key_authenticates_as_its_user(db: Db) {
    let app = spawn_app(db).await;
    let (_, key) = new_key(&app, ACME, BOB).await;
    let who = As::Key(key);
    let (status, root) = app.get_json("/", &who).await;
    assert_eq!(status, 200);
    assert_eq!(root["user"]["id"], BOB);
    assert_eq!(root["org"], ACME);
    let chat = app.chat(&who, "via key", None).await;
    let (status, _) = app
        .get_json(
            &format!("/chat/{}", chat["chat_id"].as_str().unwrap()),
            &As::bob(),
        )
        .await;
    assert_eq!(status, 200, "the key's chats are the user's chats");
    let res = app.get("/chats", &who).await;
    assert_eq!(res.status(), 200);
    assert!(res.headers().contains_key("x-ratelimit-remaining"));
}

async fn unknown_or_malformed_keys_are_401_without_details(db: Db) {
    let app = spawn_app(db).await;
    let (_, key) = new_key(&app, ACME, ALICE).await;
    let mut wrong = key.clone();
    wrong.pop();
    wrong.push(if key.ends_with('A') { 'B' } else { 'A' });
    let mut messages = Vec::new();
    for header in [
        format!("Bearer {wrong}"),
        "Bearer cfb_unknown".to_owned(),
        "Bearer not-a-confab-key".to_owned(),
    ] {
        let res = app
            .client
            .get(app.url("/chats"))
            .header("authorization", header)
            .send()
            .await
            .unwrap();
        messages.push(assert_error(res, 401, "Unauthorized").await);
    }
    assert!(
        messages.iter().all(|m| m == &messages[0]),
        "no hint which part was wrong: {messages:?}"
    );
    for header in [
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer a b",
        &format!("Token {key}"),
    ] {
        let res = app
            .client
            .get(app.url("/chats"))
            .header("authorization", header)
            .send()
            .await
            .unwrap();
        let msg = assert_error(res, 401, "Unauthorized").await;
        assert!(msg.contains("Authorization"), "{msg}");
    }
    // Scheme is case-insensitive.
    let res = app
        .client
        .get(app.url("/chats"))
        .header("authorization", format!("bearer {key}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

async fn a_revoked_key_is_refused_within_the_cache_ttl(db: Db) {
    let app = spawn_app_with(db, &[("AUTH_CACHE_TTL_SECONDS", "1")]).await;
    let (id, key) = new_key(&app, ACME, ALICE).await;
    let who = As::Key(key);
    assert_eq!(app.get("/chats", &who).await.status(), 200);
    app.state.store.revoke_api_key(id).await.unwrap();
    let revoked = Instant::now();
    loop {
        let status = app.get("/chats", &who).await.status();
        if status == 401 {
            break;
        }
        assert_eq!(status, 200);
        assert!(
            revoked.elapsed() < Duration::from_millis(1500),
            "still accepted after the TTL"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn a_revoked_key_that_sat_idle_is_refused_at_its_next_request(db: Db) {
    // Revoked, then unused past its TTL but well within the grace: its very
    // next request is refused (a cached principal past its TTL is served
    // without a lookup only while the database cannot answer).
    let app = spawn_app_with(
        db,
        &[
            ("AUTH_CACHE_TTL_SECONDS", "0.5"),
            ("AUTH_CACHE_GRACE_SECONDS", "60"),
        ],
    )
    .await;
    let (id, key) = new_key(&app, ACME, ALICE).await;
    let who = As::Key(key);
    assert_eq!(app.get("/chats", &who).await.status(), 200);
    app.state.store.revoke_api_key(id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_error(app.get("/chats", &who).await, 401, "Unauthorized").await;
}

async fn a_key_of_a_deleted_user_is_refused(db: Db) {
    let app = spawn_app(db).await;
    let (_, key) = new_key(&app, ACME, BOB).await;
    app.state
        .store
        .delete_user(ACME.parse().unwrap(), BOB.parse().unwrap())
        .await
        .unwrap();
    assert_error(app.get("/chats", &As::Key(key)).await, 401, "Unauthorized").await;
    assert_error(app.get("/chats", &As::bob()).await, 401, "Unauthorized").await;
}

async fn a_key_is_judged_before_headers(db: Db) {
    let app = spawn_app(db).await;
    let (_, key) = new_key(&app, ACME, BOB).await;
    let res = app
        .client
        .get(app.url("/"))
        .header("authorization", format!("Bearer {key}"))
        .header("x-org-id", TECH)
        .header("x-user-id", CHARLIE)
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["user"]["id"], BOB);
    let res = app
        .client
        .get(app.url("/chats"))
        .header("authorization", "Bearer cfb_wrong")
        .header("x-org-id", ACME)
        .header("x-user-id", ALICE)
        .send()
        .await
        .unwrap();
    assert_error(res, 401, "Unauthorized").await;
}

async fn production_refuses_header_auth_unless_enabled(db: Db) {
    let app = spawn_app_with(db, &[("APP_ENV", "production")]).await;
    confab_server::seed::seed_demo(app.state.store.as_ref())
        .await
        .unwrap();
    let msg = assert_error(app.get("/chats", &As::alice()).await, 401, "Unauthorized").await;
    assert!(msg.contains("disabled"), "{msg}");
    let (_, key) = new_key(&app, ACME, ALICE).await;
    assert_eq!(app.get("/chats", &As::Key(key)).await.status(), 200);
    let (_, health) = app.get_json("/health", &As::Nobody).await;
    assert_eq!(health["env"], "production");

    let both = spawn_app_with(
        crate::support::Db::Sqlite,
        &[("APP_ENV", "production"), ("AUTH_MODE", "headers,api_key")],
    )
    .await;
    confab_server::seed::seed_demo(both.state.store.as_ref())
        .await
        .unwrap();
    assert_eq!(both.get("/chats", &As::alice()).await.status(), 200);
}

async fn key_use_is_recorded_in_batches(db: Db) {
    let app = spawn_app(db).await;
    let (id, key) = new_key(&app, ACME, ALICE).await;
    let acme: OrgId = ACME.parse().unwrap();
    assert_eq!(app.get("/chats", &As::Key(key)).await.status(), 200);
    let before = app.state.store.list_api_keys(acme).await.unwrap();
    assert!(
        before
            .iter()
            .find(|k| k.id == id)
            .unwrap()
            .last_used_at
            .is_none(),
        "not written per request"
    );
    app.state.auth.flush_key_uses().await;
    let after = app.state.store.list_api_keys(acme).await.unwrap();
    assert!(
        after
            .iter()
            .find(|k| k.id == id)
            .unwrap()
            .last_used_at
            .is_some()
    );
}

async fn cli(db: &TestDb, args: &[&str]) -> (i32, String, String) {
    let out = command(&[("DATABASE_URL", &db.url)])
        .args(args)
        .output()
        .await
        .expect("run confab");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn cli_creates_org_user_and_key_that_work_over_http(db: Db) {
    let db = TestDb::new(db).await;
    let (code, out, err) = cli(
        &db,
        &["org", "create", "--name", "Globex", "--slug", "globex"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let org_id = out.split('\t').next().unwrap().trim().to_owned();
    assert!(uuid::Uuid::parse_str(&org_id).is_ok(), "{out}");
    let (code, out, err) = cli(
        &db,
        &[
            "user",
            "create",
            "--org",
            "globex",
            "--email",
            "Hank@Globex.com",
            "--name",
            "Hank",
            "--role",
            "owner",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let user_id = out.split('\t').next().unwrap().trim().to_owned();
    assert!(out.contains("hank@globex.com"));
    let (code, out, err) = cli(
        &db,
        &["key", "create", "--user", &user_id, "--name", "laptop"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let key = out
        .lines()
        .find_map(|l| l.strip_prefix("key:"))
        .map(|k| k.trim().to_owned())
        .expect("key printed");
    let key_id = out
        .lines()
        .find_map(|l| l.strip_prefix("id:"))
        .map(|k| k.trim().to_owned())
        .expect("key id printed");
    assert!(key.starts_with("cfb_"));
    let (code, out, _) = cli(&db, &["key", "list", "--org", "globex"]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("laptop") && !out.contains(&key),
        "listing never shows the secret"
    );
    let (code, out, _) = cli(&db, &["org", "list"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("globex"));

    let url = db.url.clone();
    let app = spawn_on(db, &[("AUTH_CACHE_TTL_SECONDS", "1")]).await;
    let who = As::Key(key);
    let (status, root) = app.get_json("/", &who).await;
    assert_eq!(status, 200);
    assert_eq!(root["org"], org_id.as_str());
    assert_eq!(app.get("/chats", &who).await.status(), 200);

    let revoke = command(&[("DATABASE_URL", &url)])
        .args(["key", "revoke", &key_id])
        .output()
        .await
        .unwrap();
    assert!(revoke.status.success());
    let revoked = Instant::now();
    while app.get("/chats", &who).await.status() != 401 {
        assert!(
            revoked.elapsed() < Duration::from_millis(1500),
            "revocation took longer than the TTL"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = json!({});
}

async fn cli_rejects_bad_input_with_clear_errors(db: Db) {
    let db = TestDb::new(db).await;
    for ok in [
        &["org", "create", "--name", "Initech", "--slug", "initech"][..],
        &[
            "user",
            "create",
            "--org",
            "initech",
            "--email",
            "a@initech.com",
            "--name",
            "A",
        ],
    ] {
        let (code, _, err) = cli(&db, ok).await;
        assert_eq!(code, 0, "{ok:?}: {err}");
    }
    let missing_key = uuid::Uuid::new_v4().to_string();
    // (arguments, a phrase the one-line error must contain)
    let refused: [(&[&str], &str); 10] = [
        // A typo: no configured model (here only `simulated`) would be left.
        (
            &["org", "models", "initech", "--allow", "simulatd"],
            "none of simulatd is a configured model",
        ),
        (
            &["org", "create", "--name", "Bad", "--slug", "Bad Slug!"],
            "slug",
        ),
        (
            &["org", "create", "--name", "Again", "--slug", "initech"],
            "already exists",
        ),
        (
            &[
                "user",
                "create",
                "--org",
                "initech",
                "--email",
                "b@initech.com",
                "--name",
                "B",
                "--role",
                "superuser",
            ],
            "superuser",
        ),
        // Emails are unique per org, case-insensitively.
        (
            &[
                "user",
                "create",
                "--org",
                "initech",
                "--email",
                "A@initech.com",
                "--name",
                "A2",
            ],
            "already exists",
        ),
        (
            &[
                "user", "create", "--org", "nope", "--email", "b@x.com", "--name", "B",
            ],
            "no org",
        ),
        (
            &[
                "user",
                "create",
                "--org",
                "initech",
                "--email",
                "not-an-email",
                "--name",
                "B",
            ],
            "email",
        ),
        (&["key", "create", "--user", "not-a-uuid"], "UUID"),
        (&["key", "revoke", &missing_key], "no API key"),
        (
            &[
                "org",
                "set-limit",
                "initech",
                "--burst",
                "0",
                "--per-second",
                "1",
            ],
            "burst",
        ),
    ];
    for (args, phrase) in refused {
        let (code, _, err) = cli(&db, args).await;
        assert_ne!(code, 0, "{args:?} was accepted");
        assert!(
            err.contains(phrase),
            "{args:?}: {err:?} does not mention {phrase:?}"
        );
    }
    // One configured model among unknown ones: set, with a warning.
    let (code, out, err) = cli(
        &db,
        &["org", "models", "initech", "--allow", "simulated,elsewhere"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("simulated,elsewhere"), "{out}");
    assert!(err.contains("warning: elsewhere not among"), "{err}");
    // For servers configured otherwise, --force sets it anyway (warned).
    let (code, _, err) = cli(
        &db,
        &["org", "models", "initech", "--allow", "fast", "--force"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("warning: fast not among"), "{err}");
}

/// An allowlist set (with `--force`) for models this server lacks: the
/// org's requests were good, so `GET /models` answers 200 with nothing to
/// offer (not a 400 naming a model the client never asked for), and a turn
/// is refused as SPEC says for a model the org may not use.
async fn an_org_left_with_no_configured_model_lists_none(db: Db) {
    let app = spawn_app(db).await;
    let (code, _, err) = cli(
        &app.db,
        &[
            "org",
            "models",
            "tech-startup",
            "--allow",
            "gone",
            "--force",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");

    let (status, listed) = app.get_json("/models", &As::charlie()).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed, json!({ "models": [], "default": null }));
    let (status, listed) = app.get_json("/v1/models", &As::charlie()).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["data"], json!([]));
    let res = app
        .post_json("/chat", &As::charlie(), &json!({ "message": "hi" }))
        .await;
    let message = assert_error(res, 400, "Bad Request").await;
    assert!(message.starts_with("Unknown model"), "{message}");

    // Another org is untouched.
    let (status, listed) = app.get_json("/models", &As::alice()).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["default"], "simulated");
}

async fn the_database_never_holds_a_plaintext_key(db: Db) {
    let kind = db;
    let db = TestDb::new(kind).await;
    let (code, _, err) = cli(&db, &["seed-demo"]).await;
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = cli(&db, &["key", "create", "--user", ALICE]).await;
    assert_eq!(code, 0, "{err}");
    let key = out
        .lines()
        .find_map(|l| l.strip_prefix("key:"))
        .unwrap()
        .trim()
        .to_owned();
    let secret_part = &key["cfb_".len()..];
    let rows: Vec<String> = match kind {
        Db::Sqlite => {
            use sqlx::{Connection, Row};
            let mut conn = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            let rows = sqlx::query("SELECT quote(id) || quote(key_hash) || quote(prefix) || quote(name) AS r FROM api_keys")
                .fetch_all(&mut conn)
                .await
                .unwrap();
            rows.iter().map(|r| r.get::<String, _>("r")).collect()
        }
        Db::Postgres => {
            use sqlx::{Connection, Row};
            let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
            let rows = sqlx::query("SELECT row_to_json(k)::text AS r FROM api_keys k")
                .fetch_all(&mut conn)
                .await
                .unwrap();
            rows.iter().map(|r| r.get::<String, _>("r")).collect()
        }
    };
    assert_eq!(rows.len(), 1);
    let hex_key = hex::encode(key.as_bytes());
    for row in &rows {
        assert!(!row.contains(secret_part), "plaintext key stored: {row}");
        assert!(
            !row.to_lowercase().contains(&hex_key[8..40]),
            "key bytes stored: {row}"
        );
    }
}
