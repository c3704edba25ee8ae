//! Black-box tests of the chat API (SPEC §5) on SQLite and PostgreSQL.

use std::collections::HashSet;

use reqwest::Method;
use serde_json::{Value, json};

use crate::per_store;
use crate::support::{As, Db, assert_error, spawn_app};

per_store!(
    post_chat_creates_then_continues_a_chat,
    chat_lifecycle_rename_and_delete,
    invalid_bodies_are_400_with_a_reason,
    body_over_the_limit_is_413,
    malformed_or_unknown_chat_ids_are_404,
    chats_of_other_users_and_orgs_are_not_found,
    admins_read_but_cannot_write_members_chats,
    title_is_the_first_fifty_characters,
    list_chats_pages_with_a_cursor,
    long_history_pages_back_exactly_once_in_order,
    limits_and_cursors_are_validated,
    concurrent_idempotent_posts_write_once,
    idempotency_key_reused_for_another_request_is_refused,
    failed_model_marks_the_reply_failed,
);

async fn post_chat_creates_then_continues_a_chat(db: Db) {
    let app = spawn_app(db).await;
    let first = app.chat(&As::alice(), "Hello, confab!", None).await;
    let chat_id = first["chat_id"].as_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&chat_id).is_ok());
    assert!(uuid::Uuid::parse_str(first["message_id"].as_str().unwrap()).is_ok());
    assert!(first["reply"].as_str().unwrap().contains("Hello, confab!"));
    let created = first["created_at"].as_str().unwrap();
    assert!(chrono::DateTime::parse_from_rfc3339(created).is_ok() && created.ends_with('Z'));
    // The same message always gets the same reply.
    let again = app
        .chat(&As::alice(), "Hello, confab!", Some(&chat_id))
        .await;
    assert_eq!(again["chat_id"], chat_id.as_str());
    assert_eq!(again["reply"], first["reply"]);

    let (status, chat) = app
        .get_json(&format!("/chat/{chat_id}"), &As::alice())
        .await;
    assert_eq!(status, 200);
    assert_eq!(chat["chat_id"], chat_id.as_str());
    assert_eq!(chat["title"], "Hello, confab!");
    assert_eq!(chat["message_count"], 4);
    assert_eq!(chat["older_cursor"], Value::Null);
    let messages = chat["messages"].as_array().unwrap();
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
    assert_eq!(messages[1]["id"], first["message_id"]);
    assert_eq!(messages[1]["content"], first["reply"]);
    for m in messages {
        assert_eq!(m["status"], "complete");
        for field in ["id", "role", "content", "status", "created_at"] {
            assert!(m.get(field).is_some(), "{field} missing in {m}");
        }
    }
    let (_, list) = app.get_json("/chats", &As::alice()).await;
    assert_eq!(list["count"], 1);
    assert_eq!(list["chats"][0]["id"], chat_id.as_str());
    assert_eq!(list["next_cursor"], Value::Null);
    for field in ["id", "title", "created_at", "updated_at"] {
        assert!(list["chats"][0].get(field).is_some());
    }
}

async fn chat_lifecycle_rename_and_delete(db: Db) {
    let app = spawn_app(db).await;
    let chat = app.chat(&As::bob(), "to be renamed", None).await;
    let id = chat["chat_id"].as_str().unwrap();
    let path = format!("/chat/{id}");
    let res = app
        .request(Method::PATCH, &path, &As::bob())
        .json(&json!({ "title": "Renamed ✓" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["title"], "Renamed ✓");
    assert_eq!(
        app.get_json(&path, &As::bob()).await.1["title"],
        "Renamed ✓"
    );
    for bad in [
        json!({ "title": "" }),
        json!({ "title": "x".repeat(256) }),
        json!({ "title": 5 }),
        json!({}),
    ] {
        let res = app
            .request(Method::PATCH, &path, &As::bob())
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_error(res, 400, "Bad Request").await;
    }
    let res = app
        .request(Method::DELETE, &path, &As::bob())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    assert_error(app.get(&path, &As::bob()).await, 404, "Not Found").await;
    let res = app
        .request(Method::DELETE, &path, &As::bob())
        .send()
        .await
        .unwrap();
    assert_error(res, 404, "Not Found").await;
    let res = app
        .post_json(
            "/chat",
            &As::bob(),
            &json!({ "message": "hi", "chat_id": id }),
        )
        .await;
    let msg = assert_error(res, 404, "Not Found").await;
    assert_eq!(msg, "Chat not found");
    assert_eq!(app.get_json("/chats", &As::bob()).await.1["count"], 0);
}

async fn invalid_bodies_are_400_with_a_reason(db: Db) {
    let app = spawn_app(db).await;
    let cases: Vec<(String, &str)> = vec![
        (json!({}).to_string(), "missing message"),
        (json!({ "message": null }).to_string(), "null message"),
        (json!({ "message": 42 }).to_string(), "number"),
        (json!({ "message": ["a"] }).to_string(), "array"),
        (json!({ "message": "" }).to_string(), "empty"),
        (json!({ "message": "  \n\t " }).to_string(), "whitespace"),
        (
            json!({ "message": "x".repeat(10_001) }).to_string(),
            "too long",
        ),
        (json!({ "message": "nul\u{0000}byte" }).to_string(), "NUL"),
        (
            json!({ "message": "hi", "chat_id": "not-a-uuid" }).to_string(),
            "bad chat_id",
        ),
        (
            json!({ "message": "hi", "chat_id": 7 }).to_string(),
            "numeric chat_id",
        ),
        ("[1,2]".to_owned(), "array body"),
        ("\"hello\"".to_owned(), "string body"),
        ("{\"message\": \"unterminated".to_owned(), "malformed JSON"),
        (String::new(), "empty body"),
    ];
    for path in ["/chat", "/chat/stream"] {
        for (body, what) in &cases {
            let res = app
                .request(Method::POST, path, &As::alice())
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 400, "{path} {what}");
            assert_error(res, 400, "Bad Request").await;
        }
    }
    // Exactly 10,000 characters (multi-byte) is fine.
    app.chat(&As::alice(), &"é".repeat(10_000), None).await;
    // Nothing was stored by the refused requests (only the one good chat).
    assert_eq!(app.get_json("/chats", &As::alice()).await.1["count"], 1);
}

async fn body_over_the_limit_is_413(db: Db) {
    let app = spawn_app(db).await;
    let big = json!({ "message": "y".repeat(70 * 1024) }).to_string();
    for path in ["/chat", "/chat/stream"] {
        let res = app
            .request(Method::POST, path, &As::alice())
            .header("content-type", "application/json")
            .body(big.clone())
            .send()
            .await
            .unwrap();
        assert_error(res, 413, "Payload Too Large").await;
    }
}

async fn malformed_or_unknown_chat_ids_are_404(db: Db) {
    let app = spawn_app(db).await;
    for id in [
        "not-a-uuid",
        "123",
        "00000000-0000-0000-0000-00000000000g",
        &uuid::Uuid::new_v4().to_string(),
        "%00",
        "%E2%9C%93",
    ] {
        let path = format!("/chat/{id}");
        assert_error(app.get(&path, &As::alice()).await, 404, "Not Found").await;
        let res = app
            .request(Method::PATCH, &path, &As::alice())
            .json(&json!({"title": "x"}))
            .send()
            .await
            .unwrap();
        assert_error(res, 404, "Not Found").await;
        let res = app
            .request(Method::DELETE, &path, &As::alice())
            .send()
            .await
            .unwrap();
        assert_error(res, 404, "Not Found").await;
    }
}

async fn chats_of_other_users_and_orgs_are_not_found(db: Db) {
    let app = spawn_app(db).await;
    let alice_chat = app.chat(&As::alice(), "alice's secret", None).await;
    let id = alice_chat["chat_id"].as_str().unwrap();
    let path = format!("/chat/{id}");
    for who in [As::bob(), As::charlie()] {
        let msg = assert_error(app.get(&path, &who).await, 404, "Not Found").await;
        assert_eq!(msg, "Chat not found");
        let res = app
            .post_json("/chat", &who, &json!({ "message": "hi", "chat_id": id }))
            .await;
        assert_error(res, 404, "Not Found").await;
        let res = app
            .request(Method::PATCH, &path, &who)
            .json(&json!({"title": "mine"}))
            .send()
            .await
            .unwrap();
        assert_error(res, 404, "Not Found").await;
        let res = app
            .request(Method::DELETE, &path, &who)
            .send()
            .await
            .unwrap();
        assert_error(res, 404, "Not Found").await;
        assert_eq!(app.get_json("/chats", &who).await.1["count"], 0);
    }
    // Alice's chat is untouched.
    let (status, chat) = app.get_json(&path, &As::alice()).await;
    assert_eq!(status, 200);
    assert_eq!(chat["message_count"], 2);
    assert_eq!(chat["title"], "alice's secret");
}

async fn admins_read_but_cannot_write_members_chats(db: Db) {
    let app = spawn_app(db).await;
    let bob_chat = app.chat(&As::bob(), "bob's question", None).await;
    let id = bob_chat["chat_id"].as_str().unwrap();
    let path = format!("/chat/{id}");
    let (status, chat) = app.get_json(&path, &As::alice()).await;
    assert_eq!(status, 200, "an admin reads every chat of the org");
    assert_eq!(chat["message_count"], 2);
    let res = app
        .post_json(
            "/chat",
            &As::alice(),
            &json!({ "message": "hi", "chat_id": id }),
        )
        .await;
    assert_error(res, 403, "Forbidden").await;
    let res = app
        .post_json(
            "/chat/stream",
            &As::alice(),
            &json!({ "message": "hi", "chat_id": id }),
        )
        .await;
    assert_error(res, 403, "Forbidden").await;
    let res = app
        .request(Method::PATCH, &path, &As::alice())
        .json(&json!({"title": "admin"}))
        .send()
        .await
        .unwrap();
    assert_error(res, 403, "Forbidden").await;
    let res = app
        .request(Method::DELETE, &path, &As::alice())
        .send()
        .await
        .unwrap();
    assert_error(res, 403, "Forbidden").await;
    // The admin's own list has only the admin's chats.
    assert_eq!(app.get_json("/chats", &As::alice()).await.1["count"], 0);
    // Bob's chat is unchanged.
    let (_, chat) = app.get_json(&path, &As::bob()).await;
    assert_eq!(chat["title"], "bob's question");
    assert_eq!(chat["message_count"], 2);
}

async fn title_is_the_first_fifty_characters(db: Db) {
    let app = spawn_app(db).await;
    let message = format!(
        "{}{}",
        "ü".repeat(49),
        "🦀 and more words after the fiftieth character"
    );
    let chat = app.chat(&As::alice(), &message, None).await;
    let (_, body) = app
        .get_json(
            &format!("/chat/{}", chat["chat_id"].as_str().unwrap()),
            &As::alice(),
        )
        .await;
    let title = body["title"].as_str().unwrap();
    assert_eq!(title.chars().count(), 50);
    assert!(title.ends_with('🦀'));
}

async fn list_chats_pages_with_a_cursor(db: Db) {
    let app = spawn_app(db).await;
    let mut created = Vec::new();
    for i in 0..7 {
        let chat = app
            .chat(&As::bob(), &format!("chat number {i}"), None)
            .await;
        created.push(chat["chat_id"].as_str().unwrap().to_owned());
    }
    // Touch the oldest: it becomes the most recently updated.
    app.chat(&As::bob(), "bump", Some(&created[0])).await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/chats?limit=3&cursor={c}"),
            None => "/chats?limit=3".to_owned(),
        };
        let (status, page) = app.get_json(&path, &As::bob()).await;
        assert_eq!(status, 200, "{page}");
        let chats = page["chats"].as_array().unwrap();
        assert_eq!(page["count"], chats.len());
        assert!(chats.len() <= 3);
        seen.extend(chats.iter().map(|c| c["id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 7);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 7);
    assert_eq!(seen[0], created[0], "most recently updated first");
    let mut expected: Vec<String> = created[1..].iter().rev().cloned().collect();
    expected.insert(0, created[0].clone());
    assert_eq!(seen, expected);
}

async fn long_history_pages_back_exactly_once_in_order(db: Db) {
    let app = spawn_app(db).await;
    let first = app.chat(&As::alice(), "message 0", None).await;
    let id = first["chat_id"].as_str().unwrap().to_owned();
    for i in 1..125 {
        app.chat(&As::alice(), &format!("message {i}"), Some(&id))
            .await;
    }
    let (_, newest) = app.get_json(&format!("/chat/{id}"), &As::alice()).await;
    assert_eq!(newest["message_count"], 250);
    assert_eq!(
        newest["messages"].as_array().unwrap().len(),
        100,
        "default limit"
    );
    let mut pages: Vec<Vec<Value>> = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let path = match &before {
            Some(c) => format!("/chat/{id}?limit=40&before={c}"),
            None => format!("/chat/{id}?limit=40"),
        };
        let (status, page) = app.get_json(&path, &As::alice()).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["message_count"], 250);
        pages.push(page["messages"].as_array().unwrap().clone());
        match page["older_cursor"].as_str() {
            Some(c) => before = Some(c.to_owned()),
            None => break,
        }
    }
    let all: Vec<Value> = pages.into_iter().rev().flatten().collect();
    assert_eq!(all.len(), 250);
    let ids: HashSet<&str> = all.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 250);
    for (i, pair) in all.chunks(2).enumerate() {
        assert_eq!(pair[0]["role"], "user");
        assert_eq!(pair[0]["content"], format!("message {i}"));
        assert_eq!(pair[1]["role"], "assistant");
    }
    let (_, everything) = app
        .get_json(&format!("/chat/{id}?limit=1000"), &As::alice())
        .await;
    assert_eq!(everything["messages"].as_array().unwrap().len(), 250);
    assert_eq!(everything["older_cursor"], Value::Null);
}

async fn limits_and_cursors_are_validated(db: Db) {
    let app = spawn_app(db).await;
    let chat = app.chat(&As::alice(), "x", None).await;
    let id = chat["chat_id"].as_str().unwrap();
    for path in [
        "/chats?limit=0".to_owned(),
        "/chats?limit=201".to_owned(),
        "/chats?limit=abc".to_owned(),
        "/chats?cursor=garbage".to_owned(),
        format!("/chat/{id}?limit=1001"),
        format!("/chat/{id}?limit=-1"),
        format!("/chat/{id}?before=garbage"),
    ] {
        assert_error(app.get(&path, &As::alice()).await, 400, "Bad Request").await;
    }
    assert_eq!(
        app.get("/chats?limit=200", &As::alice()).await.status(),
        200
    );
    assert_eq!(
        app.get(&format!("/chat/{id}?limit=1000"), &As::alice())
            .await
            .status(),
        200
    );
}

async fn concurrent_idempotent_posts_write_once(db: Db) {
    let app = spawn_app(db).await;
    let key = uuid::Uuid::new_v4().to_string();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let req = app
            .request(Method::POST, "/chat", &As::bob())
            .header("idempotency-key", &key)
            .json(&json!({ "message": "pay once" }));
        tasks.push(tokio::spawn(async move {
            let res = req.send().await.unwrap();
            (res.status().as_u16(), res.json::<Value>().await.unwrap())
        }));
    }
    let mut bodies = Vec::new();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
        bodies.push(body);
    }
    assert!(
        bodies.iter().all(|b| b == &bodies[0]),
        "every retry gets the first response"
    );
    let (_, list) = app.get_json("/chats", &As::bob()).await;
    assert_eq!(list["count"], 1);
    let (_, chat) = app
        .get_json(
            &format!("/chat/{}", bodies[0]["chat_id"].as_str().unwrap()),
            &As::bob(),
        )
        .await;
    assert_eq!(
        chat["message_count"], 2,
        "exactly one user message and one reply"
    );
    // A later retry replays too.
    let res = app
        .request(Method::POST, "/chat", &As::bob())
        .header("idempotency-key", &key)
        .json(&json!({ "message": "pay once" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap(), bodies[0]);
    // The key is per user: Alice's same key is a new request.
    let res = app
        .request(Method::POST, "/chat", &As::alice())
        .header("idempotency-key", &key)
        .json(&json!({ "message": "pay once" }))
        .send()
        .await
        .unwrap();
    let alice: Value = res.json().await.unwrap();
    assert_ne!(alice["chat_id"], bodies[0]["chat_id"]);
}

async fn idempotency_key_reused_for_another_request_is_refused(db: Db) {
    let app = spawn_app(db).await;
    let send = |message: &'static str, key: &str| {
        app.request(Method::POST, "/chat", &As::alice())
            .header("idempotency-key", key)
            .json(&json!({ "message": message }))
            .send()
    };
    assert_eq!(send("first", "k-1").await.unwrap().status(), 200);
    assert_error(
        send("second", "k-1").await.unwrap(),
        422,
        "Unprocessable Entity",
    )
    .await;
    assert_error(
        send("x", &"k".repeat(300)).await.unwrap(),
        400,
        "Bad Request",
    )
    .await;
}

async fn failed_model_marks_the_reply_failed(db: Db) {
    let app = spawn_app(db).await;
    let res = app
        .post_json("/chat", &As::alice(), &json!({ "message": "/fail please" }))
        .await;
    assert_error(res, 502, "Bad Gateway").await;
    let (_, list) = app.get_json("/chats", &As::alice()).await;
    let id = list["chats"][0]["id"].as_str().unwrap();
    let (_, chat) = app.get_json(&format!("/chat/{id}"), &As::alice()).await;
    assert_eq!(chat["messages"][0]["status"], "complete");
    assert_eq!(chat["messages"][1]["status"], "failed");
}
