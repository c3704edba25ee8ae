//! Issue #14 (4): PostgreSQL drops confab's connections (restart, failover,
//! an idle reaper — here `pg_terminate_backend` on every one of them). The
//! pooled connections are then dead; none of them may cost a client a 503.

use std::time::Duration;

use serde_json::{Value, json};
use sqlx::Connection;

use crate::support::{As, Db, postgres_admin_url, spawn_app_with};

/// Terminate every backend connected to `database`; how many there were.
async fn terminate_backends(database: &str) -> i64 {
    let mut admin = sqlx::PgConnection::connect(&postgres_admin_url())
        .await
        .unwrap();
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid()) t",
    )
    .bind(database)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    // pg_terminate_backend only signals: wait until they are gone.
    for _ in 0..100 {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
                .bind(database)
                .fetch_one(&mut admin)
                .await
                .unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    killed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_pooled_connections_cost_no_client_a_503() {
    crate::support::init();
    let app = spawn_app_with(Db::Postgres, &[("DB_POOL_MAX", "6")]).await;
    let alice = As::alice();
    let first = app.chat(&alice, "hello", None).await;
    let chat_id = first["chat_id"].as_str().unwrap().to_owned();

    for round in 0..3 {
        // Fill the pool: concurrent requests each hold a connection.
        let warm = (0..6).map(|_| app.get("/chats", &alice));
        for res in futures::future::join_all(warm).await {
            assert_eq!(res.status(), 200);
        }
        let killed = terminate_backends(app.db.name()).await;
        assert!(
            killed >= 2,
            "round {round}: only {killed} backends to terminate"
        );

        let mut failures = Vec::new();
        for i in 0..12 {
            let res = match i % 3 {
                0 => {
                    app.post_json(
                        "/chat",
                        &alice,
                        &json!({ "message": format!("round {round} turn {i}"), "chat_id": chat_id }),
                    )
                    .await
                }
                1 => app.get(&format!("/chat/{chat_id}"), &alice).await,
                _ => app.get("/chats", &alice).await,
            };
            let status = res.status().as_u16();
            if status != 200 {
                let body: Value = res.json().await.unwrap_or(Value::Null);
                failures.push((i, status, body));
            }
        }
        assert!(
            failures.is_empty(),
            "round {round}, after terminating {killed} backends: {failures:?}"
        );
    }
    // Every turn was stored exactly once.
    let (status, history) = app.get_json(&format!("/chat/{chat_id}"), &alice).await;
    assert_eq!(status, 200);
    let messages = history["messages"].as_array().unwrap();
    let users = messages.iter().filter(|m| m["role"] == "user").count();
    assert_eq!(users, 1 + 3 * 4, "{history}");
}
