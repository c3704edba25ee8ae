//! Contract tests of `Store`, run against SQLite and PostgreSQL.
//!
//! Each body is written once against `Arc<dyn Store>` and expanded per
//! backend by `per_store!`; every test gets a fresh, migrated database. Where
//! a test needs time to pass (expired idempotency keys, stale streams) it
//! moves the stored timestamps back with a direct SQL UPDATE instead of
//! sleeping.

// Test code: a failed expectation should stop the test right there. (Clippy's
// allow-*-in-tests settings do not reach the helper functions of an
// integration-test module.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use confab_core::model::{Usage, UsageSource};
use confab_core::models::{Model, ModelRegistry, Prices};
use confab_core::provider::{
    ChatProvider, ChatRequest, Chunk, ChunkStream, ProviderError, TokenCounter,
};
use confab_core::service::{Access, ChatService, ServiceError};
use confab_core::turn::{EngineConfig, NoMetrics, Started, TurnEngine, TurnEvent, TurnInput};
use confab_core::{ApiKeyId, Principal};
use confab_core::{
    BegunTurn, ChatCursor, ChatId, ChatTitle, Email, FinishedMessage, IdempotencyClaim, Message,
    MessageId, MessageRole, MessageStatus, MessageText, NewApiKey, NewOrg, NewTurn, NewUser, Org,
    OrgId, RateLimitOverride, Role, Slug, Store, StoreError, TurnChat, User, UserId,
};
use confab_store_postgres::PostgresStore;
use confab_store_sqlite::SqliteStore;
use futures::StreamExt;
use sqlx::{Connection, PgConnection, SqliteConnection};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

use crate::per_store;
use crate::support::{Db, TestDb};

per_store!(
    migrating_twice_is_a_no_op,
    orgs_are_created_listed_and_found,
    user_emails_are_unique_within_an_org_only,
    deleted_users_have_no_principal,
    api_keys_authenticate_until_revoked,
    org_rate_limit_override_round_trips,
    begin_turn_creates_a_chat_then_appends_to_it,
    finish_message_stores_the_final_state,
    chat_list_pages_return_every_chat_once_in_order,
    message_history_pages_back_over_every_message_once,
    an_org_can_never_read_or_change_another_orgs_chats,
    deleted_chat_is_not_found,
    idempotency_key_is_claimed_once_and_a_loser_writes_nothing,
    idempotent_response_is_stored_and_kept_and_a_released_claim_can_be_claimed_again,
    expired_idempotency_key_is_replaced,
    an_abandoned_unanswered_claim_can_be_taken_over,
    a_begin_written_again_returns_the_turn_it_wrote,
    purge_removes_only_old_idempotency_keys,
    save_partials_updates_streaming_messages_only,
    stream_state_keeps_event_boundaries_with_the_text,
    interrupt_stale_streams_marks_only_stale_streams,
    concurrent_turns_with_one_idempotency_key_admit_exactly_one,
    concurrent_turns_on_one_chat_get_gap_free_sequence_numbers,
    concurrent_writes_are_answered_each_on_its_own,
    concurrent_begins_of_every_kind_are_answered_each_on_its_own,
    concurrent_final_writes_are_answered_each_on_its_own,
    chat_service_lets_only_the_owner_write_and_admins_read,
    a_turn_whose_task_panics_is_stored_failed_with_its_usage_and_frees_its_reservation,
    nul_characters_from_the_model_are_dropped_before_the_stream_and_the_store,
    connecting_to_an_unreachable_database_is_unavailable,
);

// ---- harness ------------------------------------------------------------------

/// A migrated store on a fresh database. The `TestDb` must outlive the
/// store: dropping it deletes the database.
async fn open(kind: Db) -> (TestDb, Arc<dyn Store>) {
    let db = TestDb::new(kind).await;
    let store: Arc<dyn Store> = match kind {
        Db::Sqlite => Arc::new(SqliteStore::connect(&db.url, 4).await.unwrap()),
        Db::Postgres => Arc::new(PostgresStore::connect(&db.url, 4).await.unwrap()),
    };
    store.migrate().await.unwrap();
    (db, store)
}

/// What the store returns for "now": microsecond precision.
fn now() -> DateTime<Utc> {
    DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).unwrap()
}

async fn new_org(store: &dyn Store, slug: &str) -> Org {
    store
        .create_org(&NewOrg {
            id: OrgId::new(),
            name: format!("Org {slug}"),
            slug: Slug::parse(slug).unwrap(),
            metadata: serde_json::json!({ "plan": "test", "seats": 3 }),
        })
        .await
        .unwrap()
}

fn new_user_input(org: OrgId, email: &str, role: Role) -> NewUser {
    NewUser {
        id: UserId::new(),
        org_id: org,
        email: Email::parse(email).unwrap(),
        name: email.split('@').next().unwrap().to_owned(),
        role,
    }
}

async fn new_user(store: &dyn Store, org: OrgId, email: &str, role: Role) -> User {
    store
        .create_user(&new_user_input(org, email, role))
        .await
        .unwrap()
}

fn turn(user: &User, chat: TurnChat, text: &str) -> NewTurn {
    NewTurn {
        org: user.org_id,
        user: user.id,
        chat,
        user_message_id: MessageId::new(),
        content: text.to_owned(),
        assistant_message_id: MessageId::new(),
        idempotency: None,
        model: "simulated".into(),
        system: None,
    }
}

fn new_chat(title: &str) -> TurnChat {
    TurnChat::New {
        id: ChatId::new(),
        title: title.to_owned(),
    }
}

fn claim(key: &str, request_hash: &str) -> Option<IdempotencyClaim> {
    Some(IdempotencyClaim {
        key: key.to_owned(),
        request_hash: request_hash.to_owned(),
    })
}

async fn start_chat(store: &dyn Store, user: &User, text: &str) -> BegunTurn {
    store
        .begin_turn(&turn(user, new_chat(text), text))
        .await
        .unwrap()
}

async fn add_turn(store: &dyn Store, user: &User, chat: ChatId, text: &str) -> BegunTurn {
    store
        .begin_turn(&turn(user, TurnChat::Existing(chat), text))
        .await
        .unwrap()
}

fn finished(
    user: &User,
    begun: &BegunTurn,
    content: &str,
    status: MessageStatus,
) -> FinishedMessage {
    FinishedMessage {
        org: user.org_id,
        chat: begun.chat_id,
        id: begun.assistant_message.id,
        content: content.to_owned(),
        status,
        usage: Usage {
            prompt_tokens: 3,
            completion_tokens: content.split_whitespace().count() as i64,
            source: UsageSource::Estimated,
        },
        cost: Default::default(),
        idempotent_response: None,
        event_lengths: lengths(&[content]),
    }
}

/// The encoded event boundaries of `tokens`.
fn lengths(tokens: &[&str]) -> Vec<u8> {
    let mut l = confab_core::live::EventLengths::default();
    for t in tokens {
        l.push(t.len());
    }
    l.as_bytes().to_vec()
}

/// A partial text made of one event.
fn partial(id: MessageId, text: &str) -> confab_core::PartialText {
    confab_core::PartialText {
        id,
        content: text.to_owned(),
        event_lengths: lengths(&[text]),
        prompt_tokens: 0,
    }
}

/// Whether the store's group commit has carried well over one write per
/// transaction (always, for a store without one): a test's rounds can stop.
fn group_commits_shared(store: &dyn Store) -> bool {
    store
        .group_commit_stats()
        .is_none_or(|stats| stats.transactions + 10 < stats.writes)
}

/// With a group commit, `what` shared its transactions, none failing.
fn assert_group_commits_shared(store: &dyn Store, what: &str) {
    if let Some(stats) = store.group_commit_stats() {
        assert!(
            stats.transactions + 10 < stats.writes,
            "{what} never shared a group commit: {stats:?}"
        );
        assert_eq!(stats.fallbacks, 0, "{stats:?}");
    }
}

async fn all_messages(store: &dyn Store, org: OrgId, chat: ChatId) -> Vec<Message> {
    store.list_messages(org, chat, None, 10_000).await.unwrap()
}

fn is_not_found<T: std::fmt::Debug>(result: Result<T, StoreError>) -> bool {
    matches!(result, Err(StoreError::NotFound))
}

fn conflict_on<T: std::fmt::Debug>(result: Result<T, StoreError>) -> String {
    match result {
        Err(StoreError::Conflict { constraint }) => constraint,
        other => panic!("expected a conflict, got {other:?}"),
    }
}

// Direct SQL, behind the store's back, to make time pass. SQLite stores
// microseconds since the epoch; PostgreSQL timestamptz.

const HOUR_MICROS: i64 = 3_600_000_000;

async fn age_message(db: &TestDb, id: MessageId, hours: i32) {
    let id = *id.as_uuid();
    match db.kind {
        Db::Sqlite => {
            let mut conn = SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::query("UPDATE messages SET updated_at = updated_at - ?2 WHERE id = ?1")
                .bind(id)
                .bind(i64::from(hours) * HOUR_MICROS)
                .execute(&mut conn)
                .await
                .unwrap();
            conn.close().await.unwrap();
        }
        Db::Postgres => {
            let mut conn = PgConnection::connect(&db.url).await.unwrap();
            sqlx::query(
                "UPDATE messages SET updated_at = updated_at - make_interval(hours => $2) \
                 WHERE id = $1",
            )
            .bind(id)
            .bind(hours)
            .execute(&mut conn)
            .await
            .unwrap();
            conn.close().await.unwrap();
        }
    }
}

async fn age_idempotency_key(db: &TestDb, user: UserId, key: &str, hours: i32) {
    let user = *user.as_uuid();
    match db.kind {
        Db::Sqlite => {
            let mut conn = SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::query(
                "UPDATE idempotency_keys SET created_at = created_at - ?3 \
                 WHERE user_id = ?1 AND key = ?2",
            )
            .bind(user)
            .bind(key)
            .bind(i64::from(hours) * HOUR_MICROS)
            .execute(&mut conn)
            .await
            .unwrap();
            conn.close().await.unwrap();
        }
        Db::Postgres => {
            let mut conn = PgConnection::connect(&db.url).await.unwrap();
            sqlx::query(
                "UPDATE idempotency_keys SET created_at = created_at - make_interval(hours => $3) \
                 WHERE user_id = $1 AND key = $2",
            )
            .bind(user)
            .bind(key)
            .bind(hours)
            .execute(&mut conn)
            .await
            .unwrap();
            conn.close().await.unwrap();
        }
    }
}

async fn applied_migrations(db: &TestDb) -> Vec<i64> {
    const SQL: &str = "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version";
    match db.kind {
        Db::Sqlite => {
            let mut conn = SqliteConnection::connect(&db.url).await.unwrap();
            sqlx::query_scalar(SQL).fetch_all(&mut conn).await.unwrap()
        }
        Db::Postgres => {
            let mut conn = PgConnection::connect(&db.url).await.unwrap();
            sqlx::query_scalar(SQL).fetch_all(&mut conn).await.unwrap()
        }
    }
}

// ---- schema and tenancy -------------------------------------------------------

async fn migrating_twice_is_a_no_op(db: Db) {
    let (t, store) = open(db).await;
    assert_eq!(
        store.backend(),
        if db == Db::Sqlite {
            "sqlite"
        } else {
            "postgres"
        }
    );
    // The first migration ran on the fresh database (the original skipped it).
    assert_eq!(applied_migrations(&t).await, vec![1, 2, 3, 4, 5, 6, 7]);
    let org = new_org(&*store, "acme").await;
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    assert_eq!(applied_migrations(&t).await, vec![1, 2, 3, 4, 5, 6, 7]);
    // Data survives, and a second store on the same database sees it.
    assert_eq!(store.find_org("acme").await.unwrap(), org);
    store.ping().await.unwrap();
    store.close().await;
}

async fn orgs_are_created_listed_and_found(db: Db) {
    let (_t, store) = open(db).await;
    assert!(!store.has_orgs().await.unwrap());

    let acme = new_org(&*store, "acme-corp").await;
    let tech = new_org(&*store, "tech-startup").await;
    assert!(store.has_orgs().await.unwrap());
    assert_eq!(acme.slug, "acme-corp");
    assert_eq!(
        acme.metadata,
        serde_json::json!({ "plan": "test", "seats": 3 })
    );
    assert_eq!(acme.rate_limit, None);

    // Returned rows equal stored rows exactly, timestamps included.
    assert_eq!(store.find_org(&acme.id.to_string()).await.unwrap(), acme);
    assert_eq!(store.find_org("tech-startup").await.unwrap(), tech);
    assert_eq!(store.list_orgs().await.unwrap(), vec![acme.clone(), tech]);
    assert!(is_not_found(store.find_org("nope").await));
    assert!(is_not_found(
        store.find_org(&OrgId::new().to_string()).await
    ));

    let taken_slug = store
        .create_org(&NewOrg {
            id: OrgId::new(),
            name: "Another Acme".into(),
            slug: Slug::parse("acme-corp").unwrap(),
            metadata: serde_json::json!({}),
        })
        .await;
    assert_eq!(conflict_on(taken_slug), "orgs_slug_key");
    let taken_id = store
        .create_org(&NewOrg {
            id: acme.id,
            name: "Acme again".into(),
            slug: Slug::parse("acme-2").unwrap(),
            metadata: serde_json::json!({}),
        })
        .await;
    assert_eq!(conflict_on(taken_id), "orgs_pkey");
    assert_eq!(store.list_orgs().await.unwrap().len(), 2);
}

async fn user_emails_are_unique_within_an_org_only(db: Db) {
    let (_t, store) = open(db).await;
    let acme = new_org(&*store, "acme").await;
    let tech = new_org(&*store, "tech").await;

    let alice = new_user(&*store, acme.id, "Alice@Acme.com", Role::Admin).await;
    assert_eq!(alice.email, "alice@acme.com");
    assert_eq!(alice.role, Role::Admin);
    assert_eq!(alice.org_id, acme.id);

    let duplicate = store
        .create_user(&new_user_input(acme.id, "alice@acme.com", Role::Member))
        .await;
    assert_eq!(conflict_on(duplicate), "users_org_email");
    // The same address in another org is another person.
    let other_alice = new_user(&*store, tech.id, "alice@acme.com", Role::Owner).await;
    assert_eq!(other_alice.org_id, tech.id);

    let mut same_id = new_user_input(acme.id, "bob@acme.com", Role::Member);
    same_id.id = alice.id;
    assert_eq!(conflict_on(store.create_user(&same_id).await), "users_pkey");

    let unknown_org = store
        .create_user(&new_user_input(OrgId::new(), "carol@x.com", Role::Member))
        .await;
    assert!(is_not_found(unknown_org));

    let bob = new_user(&*store, acme.id, "bob@acme.com", Role::Member).await;
    assert_eq!(
        store.list_users(acme.id).await.unwrap(),
        vec![alice.clone(), bob.clone()]
    );
    assert_eq!(store.list_users(tech.id).await.unwrap(), vec![other_alice]);

    // A deleted user frees their address, and is gone from the list.
    store.delete_user(acme.id, alice.id).await.unwrap();
    assert!(is_not_found(store.delete_user(acme.id, alice.id).await));
    assert_eq!(store.list_users(acme.id).await.unwrap(), vec![bob.clone()]);
    new_user(&*store, acme.id, "alice@acme.com", Role::Member).await;
    // Deleting through the wrong org does nothing.
    assert!(is_not_found(store.delete_user(tech.id, bob.id).await));
}

async fn deleted_users_have_no_principal(db: Db) {
    let (_t, store) = open(db).await;
    let acme = new_org(&*store, "acme").await;
    let alice = new_user(&*store, acme.id, "alice@acme.com", Role::Owner).await;

    let principal = store.find_principal(alice.id).await.unwrap().unwrap();
    assert_eq!(
        principal,
        Principal {
            org_id: acme.id,
            user_id: alice.id,
            email: "alice@acme.com".into(),
            role: Role::Owner,
            rate_limit: None,
            api_key: None,
            policy: Default::default(),
            org_tokens: Default::default(),
            user_tokens: Default::default(),
        }
    );
    assert_eq!(store.find_principal(UserId::new()).await.unwrap(), None);

    store.delete_user(acme.id, alice.id).await.unwrap();
    assert_eq!(store.find_principal(alice.id).await.unwrap(), None);
}

async fn api_keys_authenticate_until_revoked(db: Db) {
    let (_t, store) = open(db).await;
    let acme = new_org(&*store, "acme").await;
    let tech = new_org(&*store, "tech").await;
    let alice = new_user(&*store, acme.id, "alice@acme.com", Role::Admin).await;
    let bob = new_user(&*store, acme.id, "bob@acme.com", Role::Member).await;
    let new_key = |user: &User, hash: &[u8]| NewApiKey {
        id: ApiKeyId::new(),
        org_id: user.org_id,
        user_id: user.id,
        hash: hash.to_vec(),
        prefix: "cfb_1a2b3c4d".into(),
        name: "laptop".into(),
    };

    let key = store
        .create_api_key(&new_key(&alice, &[1; 32]))
        .await
        .unwrap();
    assert_eq!((key.org_id, key.user_id), (acme.id, alice.id));
    assert_eq!((key.last_used_at, key.revoked_at), (None, None));
    assert_eq!(key.prefix, "cfb_1a2b3c4d");

    let principal = store
        .find_principal_by_key(&[1; 32])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(principal.user_id, alice.id);
    assert_eq!(principal.org_id, acme.id);
    assert_eq!(principal.role, Role::Admin);
    assert_eq!(principal.api_key, Some(key.id));
    assert_eq!(store.find_principal_by_key(&[2; 32]).await.unwrap(), None);

    assert_eq!(
        conflict_on(store.create_api_key(&new_key(&bob, &[1; 32])).await),
        "api_keys_key_hash_key"
    );
    // A user is only in their own org.
    let mut elsewhere = new_key(&alice, &[3; 32]);
    elsewhere.org_id = tech.id;
    assert!(is_not_found(store.create_api_key(&elsewhere).await));
    let mut nobody = new_key(&alice, &[3; 32]);
    nobody.user_id = UserId::new();
    assert!(is_not_found(store.create_api_key(&nobody).await));

    // Touch: the latest use wins, an older report never moves it back.
    let used = now();
    store.touch_api_keys(&[]).await.unwrap();
    store
        .touch_api_keys(&[(key.id, used - Duration::seconds(5)), (key.id, used)])
        .await
        .unwrap();
    store
        .touch_api_keys(&[(key.id, used - Duration::minutes(1))])
        .await
        .unwrap();
    let listed = store.list_api_keys(acme.id).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].last_used_at, Some(used));

    // Newest first.
    let bobs = store
        .create_api_key(&new_key(&bob, &[4; 32]))
        .await
        .unwrap();
    let ids: Vec<ApiKeyId> = store
        .list_api_keys(acme.id)
        .await
        .unwrap()
        .iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(ids, vec![bobs.id, key.id]);
    assert!(store.list_api_keys(tech.id).await.unwrap().is_empty());

    // Revoked: unknown to authentication, still listed, revoking is idempotent.
    store.revoke_api_key(key.id).await.unwrap();
    assert_eq!(store.find_principal_by_key(&[1; 32]).await.unwrap(), None);
    let revoked_at = store.list_api_keys(acme.id).await.unwrap()[1].revoked_at;
    assert!(revoked_at.is_some());
    store.revoke_api_key(key.id).await.unwrap();
    assert_eq!(
        store.list_api_keys(acme.id).await.unwrap()[1].revoked_at,
        revoked_at
    );
    assert!(is_not_found(store.revoke_api_key(ApiKeyId::new()).await));

    // The key of a deleted user no longer authenticates.
    assert!(
        store
            .find_principal_by_key(&[4; 32])
            .await
            .unwrap()
            .is_some()
    );
    store.delete_user(acme.id, bob.id).await.unwrap();
    assert_eq!(store.find_principal_by_key(&[4; 32]).await.unwrap(), None);
}

async fn org_rate_limit_override_round_trips(db: Db) {
    let (_t, store) = open(db).await;
    let acme = new_org(&*store, "acme").await;
    let alice = new_user(&*store, acme.id, "alice@acme.com", Role::Member).await;
    store
        .create_api_key(&NewApiKey {
            id: ApiKeyId::new(),
            org_id: acme.id,
            user_id: alice.id,
            hash: vec![7; 32],
            prefix: "cfb_x".into(),
            name: "ci".into(),
        })
        .await
        .unwrap();

    let limit = RateLimitOverride::new(5, 2.5).unwrap();
    store
        .set_org_rate_limit(acme.id, Some(limit))
        .await
        .unwrap();
    assert_eq!(
        store.find_org("acme").await.unwrap().rate_limit,
        Some(limit)
    );
    let principal = store.find_principal(alice.id).await.unwrap().unwrap();
    assert_eq!(principal.rate_limit, Some(limit));
    let by_key = store
        .find_principal_by_key(&[7; 32])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(by_key.rate_limit, Some(limit));

    store.set_org_rate_limit(acme.id, None).await.unwrap();
    assert_eq!(store.find_org("acme").await.unwrap().rate_limit, None);
    let principal = store.find_principal(alice.id).await.unwrap().unwrap();
    assert_eq!(principal.rate_limit, None);

    assert!(is_not_found(
        store.set_org_rate_limit(OrgId::new(), Some(limit)).await
    ));
}

// ---- chats and messages -------------------------------------------------------

async fn begin_turn_creates_a_chat_then_appends_to_it(db: Db) {
    let (_t, store) = open(db).await;
    let acme = new_org(&*store, "acme").await;
    let alice = new_user(&*store, acme.id, "alice@acme.com", Role::Member).await;

    let first = start_chat(&*store, &alice, "Hello there").await;
    let (user_msg, reply) = (&first.user_message, &first.assistant_message);
    assert_eq!((user_msg.seq, reply.seq), (1, 2));
    assert_eq!(user_msg.role, MessageRole::User);
    assert_eq!(user_msg.status, MessageStatus::Complete);
    assert_eq!(user_msg.content, "Hello there");
    assert_eq!(reply.role, MessageRole::Assistant);
    assert_eq!(reply.status, MessageStatus::Streaming);
    assert_eq!(reply.content, "");
    assert_eq!(reply.token_count, None);
    assert_eq!(
        (user_msg.chat_id, user_msg.org_id),
        (first.chat_id, acme.id)
    );

    let chat = store.get_chat(acme.id, first.chat_id).await.unwrap();
    assert_eq!(chat.title, "Hello there");
    assert_eq!(chat.message_count, 2);
    assert_eq!((chat.org_id, chat.user_id), (acme.id, alice.id));
    assert_eq!(chat.updated_at, user_msg.created_at);
    // What begin_turn returned is exactly what was stored.
    assert_eq!(
        all_messages(&*store, acme.id, first.chat_id).await,
        vec![user_msg.clone(), reply.clone()]
    );

    let second = add_turn(&*store, &alice, first.chat_id, "And again").await;
    assert_eq!(second.chat_id, first.chat_id);
    assert_eq!(
        (second.user_message.seq, second.assistant_message.seq),
        (3, 4)
    );
    let chat = store.get_chat(acme.id, first.chat_id).await.unwrap();
    assert_eq!(chat.message_count, 4);
    assert_eq!(chat.title, "Hello there");
    assert!(chat.updated_at >= second.user_message.created_at);
    let seqs: Vec<i64> = all_messages(&*store, acme.id, first.chat_id)
        .await
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);

    // A new chat for a user of another org, or an unknown chat: nothing stored.
    let tech = new_org(&*store, "tech").await;
    let mut foreign = turn(&alice, new_chat("x"), "x");
    foreign.org = tech.id;
    assert!(is_not_found(store.begin_turn(&foreign).await));
    let unknown = turn(&alice, TurnChat::Existing(ChatId::new()), "x");
    assert!(is_not_found(store.begin_turn(&unknown).await));
    assert_eq!(
        store
            .list_chats(acme.id, alice.id, None, 10)
            .await
            .unwrap()
            .len(),
        1
    );

    // Reusing a message id is a conflict, and the turn is rolled back whole.
    let mut reused = turn(&alice, TurnChat::Existing(first.chat_id), "dup");
    reused.user_message_id = first.user_message.id;
    assert_eq!(
        conflict_on(store.begin_turn(&reused).await),
        "messages_pkey"
    );
    assert_eq!(
        store
            .get_chat(acme.id, first.chat_id)
            .await
            .unwrap()
            .message_count,
        4
    );
}

async fn finish_message_stores_the_final_state(db: Db) {
    let (_t, store) = open(db).await;
    let acme = new_org(&*store, "acme").await;
    let alice = new_user(&*store, acme.id, "alice@acme.com", Role::Member).await;
    let begun = start_chat(&*store, &alice, "Tell me a story").await;
    let before = store.get_chat(acme.id, begun.chat_id).await.unwrap();

    let done = store
        .finish_message(&finished(
            &alice,
            &begun,
            "Once upon a time",
            MessageStatus::Complete,
        ))
        .await
        .unwrap();
    assert_eq!(done.id, begun.assistant_message.id);
    assert_eq!(done.content, "Once upon a time");
    assert_eq!(done.status, MessageStatus::Complete);
    assert_eq!(done.token_count, Some(4));
    assert_eq!(done.seq, 2);
    assert_eq!(done.created_at, begun.assistant_message.created_at);
    assert!(done.updated_at >= begun.assistant_message.updated_at);

    let stored = all_messages(&*store, acme.id, begun.chat_id).await;
    assert_eq!(stored[1], done);
    let after = store.get_chat(acme.id, begun.chat_id).await.unwrap();
    assert!(after.updated_at >= before.updated_at);
    assert_eq!(after.message_count, 2);

    let mut unknown = finished(&alice, &begun, "x", MessageStatus::Failed);
    unknown.id = MessageId::new();
    assert!(is_not_found(store.finish_message(&unknown).await));
}

async fn chat_list_pages_return_every_chat_once_in_order(db: Db) {
    let (_t, store) = open(db).await;
    let acme = new_org(&*store, "acme").await;
    let alice = new_user(&*store, acme.id, "alice@acme.com", Role::Member).await;
    let bob = new_user(&*store, acme.id, "bob@acme.com", Role::Member).await;

    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(
            start_chat(&*store, &alice, &format!("chat {i}"))
                .await
                .chat_id,
        );
    }
    // Activity reorders the list; someone else's and deleted chats are not in it.
    add_turn(&*store, &alice, ids[2], "bump").await;
    start_chat(&*store, &bob, "bob's").await;
    let deleted = start_chat(&*store, &alice, "deleted").await.chat_id;
    store.delete_chat(acme.id, deleted).await.unwrap();

    let mut expected = Vec::new();
    for id in &ids {
        expected.push(store.get_chat(acme.id, *id).await.unwrap());
    }
    expected.sort_by_key(|c| std::cmp::Reverse((c.updated_at, c.id)));
    assert_eq!(expected[0].id, ids[2]);

    let mut seen = Vec::new();
    let mut cursor: Option<ChatCursor> = None;
    let mut page_sizes = Vec::new();
    loop {
        let page = store
            .list_chats(acme.id, alice.id, cursor, 3)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        page_sizes.push(page.len());
        cursor = page.last().map(|c| ChatCursor {
            updated_at: c.updated_at,
            id: c.id,
        });
        seen.extend(page);
        assert!(page_sizes.len() <= 3, "pagination does not end");
    }
    assert_eq!(page_sizes, vec![3, 3, 1]);
    assert_eq!(seen, expected);
}

async fn message_history_pages_back_over_every_message_once(db: Db) {
    let (_t, store) = open(db).await;
    let acme = new_org(&*store, "acme").await;
    let alice = new_user(&*store, acme.id, "alice@acme.com", Role::Member).await;
    let chat = start_chat(&*store, &alice, "turn 0").await.chat_id;
    for i in 1..125 {
        add_turn(&*store, &alice, chat, &format!("turn {i}")).await;
    }
    assert_eq!(
        store.get_chat(acme.id, chat).await.unwrap().message_count,
        250
    );

    let newest = store.list_messages(acme.id, chat, None, 100).await.unwrap();
    assert_eq!(newest.first().unwrap().seq, 151);
    assert_eq!(newest.last().unwrap().seq, 250);

    let mut pages = Vec::new();
    let mut before = None;
    loop {
        let page = store
            .list_messages(acme.id, chat, before, 100)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        before = Some(page[0].seq);
        pages.push(page);
        assert!(pages.len() <= 3, "paging does not end");
    }
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![100, 100, 50]);
    let all: Vec<Message> = pages.into_iter().rev().flatten().collect();
    let seqs: Vec<i64> = all.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=250).collect::<Vec<i64>>());
    for message in &all {
        let expected_role = if message.seq % 2 == 1 {
            MessageRole::User
        } else {
            MessageRole::Assistant
        };
        assert_eq!(message.role, expected_role);
    }
    assert_eq!(all[0].content, "turn 0");
    assert_eq!(all[248].content, "turn 124");
    let unique: HashSet<MessageId> = all.iter().map(|m| m.id).collect();
    assert_eq!(unique.len(), 250);

    // Before the first message there is nothing; an empty chat page is not an error.
    assert!(
        store
            .list_messages(acme.id, chat, Some(1), 100)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn an_org_can_never_read_or_change_another_orgs_chats(db: Db) {
    let (_t, store) = open(db).await;
    let a = new_org(&*store, "org-a").await;
    let b = new_org(&*store, "org-b").await;
    let a_admin = new_user(&*store, a.id, "admin@a.com", Role::Owner).await;
    let b_user = new_user(&*store, b.id, "user@b.com", Role::Member).await;

    let begun = start_chat(&*store, &b_user, "B's secret").await;
    let b_chat = begun.chat_id;
    let chat_before = store.get_chat(b.id, b_chat).await.unwrap();
    let messages_before = all_messages(&*store, b.id, b_chat).await;

    assert!(is_not_found(store.get_chat(a.id, b_chat).await));
    let title = ChatTitle::parse("pwned").unwrap();
    assert!(is_not_found(store.rename_chat(a.id, b_chat, &title).await));
    assert!(is_not_found(store.delete_chat(a.id, b_chat).await));
    assert!(is_not_found(
        store.list_messages(a.id, b_chat, None, 100).await
    ));
    assert!(is_not_found(
        store.list_messages(a.id, b_chat, Some(2), 100).await
    ));
    let intrusion = turn(&a_admin, TurnChat::Existing(b_chat), "hi from A");
    assert!(is_not_found(store.begin_turn(&intrusion).await));
    let mut finish = finished(&a_admin, &begun, "overwritten", MessageStatus::Complete);
    finish.chat = b_chat;
    assert!(is_not_found(store.finish_message(&finish).await));
    // A's org id with B's user id lists nothing.
    assert!(
        store
            .list_chats(a.id, b_user.id, None, 50)
            .await
            .unwrap()
            .is_empty()
    );
    // Creating a chat in A for B's user is refused too.
    let mut smuggled = turn(&b_user, new_chat("x"), "x");
    smuggled.org = a.id;
    assert!(is_not_found(store.begin_turn(&smuggled).await));

    assert_eq!(store.get_chat(b.id, b_chat).await.unwrap(), chat_before);
    assert_eq!(all_messages(&*store, b.id, b_chat).await, messages_before);
    assert_eq!(
        store.list_chats(b.id, b_user.id, None, 50).await.unwrap(),
        vec![chat_before]
    );
}

async fn deleted_chat_is_not_found(db: Db) {
    let (_t, store) = open(db).await;
    let acme = new_org(&*store, "acme").await;
    let alice = new_user(&*store, acme.id, "alice@acme.com", Role::Member).await;
    let chat = start_chat(&*store, &alice, "short-lived").await.chat_id;

    let renamed = store
        .rename_chat(acme.id, chat, &ChatTitle::parse("Renamed").unwrap())
        .await
        .unwrap();
    assert_eq!(renamed.title, "Renamed");
    assert_eq!(store.get_chat(acme.id, chat).await.unwrap(), renamed);

    store.delete_chat(acme.id, chat).await.unwrap();
    assert!(is_not_found(store.get_chat(acme.id, chat).await));
    assert!(is_not_found(store.delete_chat(acme.id, chat).await));
    assert!(is_not_found(
        store
            .rename_chat(acme.id, chat, &ChatTitle::parse("x").unwrap())
            .await
    ));
    assert!(is_not_found(
        store.list_messages(acme.id, chat, None, 10).await
    ));
    let late = turn(&alice, TurnChat::Existing(chat), "anyone?");
    assert!(is_not_found(store.begin_turn(&late).await));
    assert!(
        store
            .list_chats(acme.id, alice.id, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

// ---- idempotency --------------------------------------------------------------

async fn idempotency_key_is_claimed_once_and_a_loser_writes_nothing(db: Db) {
    let (_t, store) = open(db).await;
    let acme = new_org(&*store, "acme").await;
    let alice = new_user(&*store, acme.id, "alice@acme.com", Role::Member).await;
    let bob = new_user(&*store, acme.id, "bob@acme.com", Role::Member).await;

    let mut first = turn(&alice, new_chat("hi"), "hi");
    first.idempotency = claim("key-1", "hash-1");
    let begun = store.begin_turn(&first).await.unwrap();

    // Same key again, for a new chat: refused, and no chat or message written.
    let mut again = turn(&alice, new_chat("hi"), "hi");
    again.idempotency = claim("key-1", "hash-1");
    assert_eq!(
        conflict_on(store.begin_turn(&again).await),
        "idempotency_keys"
    );
    let TurnChat::New { id: lost_chat, .. } = again.chat else {
        unreachable!()
    };
    assert!(is_not_found(store.get_chat(acme.id, lost_chat).await));
    assert_eq!(
        store
            .list_chats(acme.id, alice.id, None, 10)
            .await
            .unwrap()
            .len(),
        1
    );

    // Same key again, on the existing chat: refused, the chat is unchanged.
    let chat_before = store.get_chat(acme.id, begun.chat_id).await.unwrap();
    let mut append = turn(&alice, TurnChat::Existing(begun.chat_id), "more");
    append.idempotency = claim("key-1", "hash-2");
    assert_eq!(
        conflict_on(store.begin_turn(&append).await),
        "idempotency_keys"
    );
    assert_eq!(
        store.get_chat(acme.id, begun.chat_id).await.unwrap(),
        chat_before
    );
    assert_eq!(all_messages(&*store, acme.id, begun.chat_id).await.len(), 2);

    // The stored record is the first request's; keys are per user.
    let record = store
        .get_idempotency(alice.id, "key-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.request_hash, "hash-1");
    assert_eq!(record.response, None);
    assert!(record.created_at <= now());
    let mut bobs = turn(&bob, new_chat("hi"), "hi");
    bobs.idempotency = claim("key-1", "hash-1");
    store.begin_turn(&bobs).await.unwrap();
    assert_eq!(
        store.get_idempotency(alice.id, "other").await.unwrap(),
        None
    );
}

async fn idempotent_response_is_stored_and_kept_and_a_released_claim_can_be_claimed_again(db: Db) {
    let (_t, store) = open(db).await;
    let acme = new_org(&*store, "acme").await;
    let alice = new_user(&*store, acme.id, "alice@acme.com", Role::Member).await;

    let mut first = turn(&alice, new_chat("hi"), "hi");
    first.idempotency = claim("k", "h");
    let begun = store.begin_turn(&first).await.unwrap();
    let response = serde_json::json!({ "chat_id": begun.chat_id, "reply": "hello" });
    let mut done = finished(&alice, &begun, "hello", MessageStatus::Complete);
    done.idempotent_response = Some((alice.id, "k".into(), response.clone()));
    store.finish_message(&done).await.unwrap();

    let record = store.get_idempotency(alice.id, "k").await.unwrap().unwrap();
    assert_eq!(record.response, Some(response.clone()));
    assert_eq!(record.request_hash, "h");

    // An answered key is not released (a final write whose commit went
    // through although its caller saw an error): a retry gets the answer
    // instead of running the turn a second time.
    store
        .release_idempotency(alice.id, "k", begun.assistant_message.id)
        .await
        .unwrap();
    let record = store.get_idempotency(alice.id, "k").await.unwrap().unwrap();
    assert_eq!(record.response, Some(response));

    // A claim whose request failed (no response) is released, and a retry
    // with the key runs again.
    let mut failed = turn(&alice, TurnChat::Existing(begun.chat_id), "hi again");
    failed.idempotency = claim("k2", "h");
    let failed_reply = store
        .begin_turn(&failed)
        .await
        .unwrap()
        .assistant_message
        .id;
    store
        .release_idempotency(alice.id, "k2", failed_reply)
        .await
        .unwrap();
    assert_eq!(store.get_idempotency(alice.id, "k2").await.unwrap(), None);
    // Releasing an unknown key is fine.
    store
        .release_idempotency(alice.id, "k2", failed_reply)
        .await
        .unwrap();

    let mut retry = turn(&alice, TurnChat::Existing(begun.chat_id), "hi again");
    retry.idempotency = claim("k2", "h2");
    let again = store.begin_turn(&retry).await.unwrap();
    assert_eq!(again.user_message.seq, 5);
    let record = store
        .get_idempotency(alice.id, "k2")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (record.request_hash.as_str(), record.response),
        ("h2", None)
    );
}

async fn expired_idempotency_key_is_replaced(db: Db) {
    let (t, store) = open(db).await;
    let acme = new_org(&*store, "acme").await;
    let alice = new_user(&*store, acme.id, "alice@acme.com", Role::Member).await;

    let mut first = turn(&alice, new_chat("hi"), "hi");
    first.idempotency = claim("old", "hash-1");
    let begun = store.begin_turn(&first).await.unwrap();
    let mut done = finished(&alice, &begun, "hello", MessageStatus::Complete);
    done.idempotent_response = Some((alice.id, "old".into(), serde_json::json!({ "n": 1 })));
    store.finish_message(&done).await.unwrap();

    // 23 hours old: still live.
    age_idempotency_key(&t, alice.id, "old", 23).await;
    let mut early = turn(&alice, new_chat("hi"), "hi");
    early.idempotency = claim("old", "hash-2");
    assert_eq!(
        conflict_on(store.begin_turn(&early).await),
        "idempotency_keys"
    );

    // 25 hours old: expired, so a new request takes the key over.
    age_idempotency_key(&t, alice.id, "old", 2).await;
    let expired = store
        .get_idempotency(alice.id, "old")
        .await
        .unwrap()
        .unwrap();
    assert!(expired.created_at < now() - Duration::hours(24));
    let mut late = turn(&alice, new_chat("hi"), "hi");
    late.idempotency = claim("old", "hash-3");
    store.begin_turn(&late).await.unwrap();
    let record = store
        .get_idempotency(alice.id, "old")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.request_hash, "hash-3");
    assert_eq!(record.response, None);
    assert!(record.created_at > now() - Duration::hours(1));
}

async fn an_abandoned_unanswered_claim_can_be_taken_over(db: Db) {
    let (t, store) = open(db).await;
    let acme = new_org(&*store, "acme").await;
    let alice = new_user(&*store, acme.id, "alice@acme.com", Role::Member).await;
    let mut first = turn(&alice, new_chat("hi"), "hi");
    first.idempotency = claim("dead", "hash-1");
    let first_begun = store.begin_turn(&first).await.unwrap();
    let first_reply = first_begun.assistant_message.id;
    let mut retry = turn(&alice, new_chat("hi"), "hi");
    retry.idempotency = claim("dead", "hash-1");
    assert_eq!(
        conflict_on(store.begin_turn(&retry).await),
        "idempotency_keys",
        "fresh claims are live"
    );
    // An hour later (well past ABANDONED_CLAIM_SECS) with its reply still
    // `streaming`: a long turn, alive. A retry must not run it a second time.
    age_idempotency_key(&t, alice.id, "dead", 1).await;
    store
        .save_partials(&[partial(first_reply, "still going")])
        .await
        .unwrap();
    assert_eq!(
        conflict_on(store.begin_turn(&retry).await),
        "idempotency_keys",
        "a claim whose reply is still streaming is live, however old"
    );
    // Its process died: crash recovery marks the reply `interrupted` once it
    // has not been saved for a while, and then a retry takes the key over.
    age_message(&t, first_reply, 1).await;
    assert_eq!(
        store
            .interrupt_stale_streams(std::time::Duration::from_secs(60))
            .await
            .unwrap(),
        1
    );
    let retry_begun = store.begin_turn(&retry).await.unwrap();
    // The first turn's final write arriving late (deferred by an outage)
    // does not answer the retry's claim, nor does its release free it.
    let mut late = finished(&alice, &first_begun, "late", MessageStatus::Complete);
    late.idempotent_response = Some((alice.id, "dead".into(), serde_json::json!({ "n": 0 })));
    store.finish_message(&late).await.unwrap();
    store
        .release_idempotency(alice.id, "dead", first_reply)
        .await
        .unwrap();
    let record = store
        .get_idempotency(alice.id, "dead")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.response, None, "the late answer is not the retry's");
    // The retry's own final write answers it.
    let mut done = finished(&alice, &retry_begun, "hello", MessageStatus::Complete);
    done.idempotent_response = Some((alice.id, "dead".into(), serde_json::json!({ "n": 1 })));
    store.finish_message(&done).await.unwrap();
    let record = store
        .get_idempotency(alice.id, "dead")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.response, Some(serde_json::json!({ "n": 1 })));
    // A claim whose reply ended (recovery marked it interrupted, or its
    // turn failed without releasing the key) is abandoned once old enough.
    let mut ended = turn(&alice, new_chat("hi"), "hi");
    ended.idempotency = claim("ended", "hash-3");
    let ended_begun = store.begin_turn(&ended).await.unwrap();
    store
        .finish_message(&finished(
            &alice,
            &ended_begun,
            "",
            MessageStatus::Interrupted,
        ))
        .await
        .unwrap();
    let mut ended_retry = turn(&alice, new_chat("hi"), "hi");
    ended_retry.idempotency = claim("ended", "hash-3");
    assert_eq!(
        conflict_on(store.begin_turn(&ended_retry).await),
        "idempotency_keys",
        "an unanswered claim is live for ABANDONED_CLAIM_SECS"
    );
    age_idempotency_key(&t, alice.id, "ended", 1).await;
    store.begin_turn(&ended_retry).await.unwrap();
    // An answered key of the same age is not abandoned: it replays.
    let mut answered = turn(&alice, new_chat("hi"), "hi");
    answered.idempotency = claim("answered", "hash-2");
    let begun = store.begin_turn(&answered).await.unwrap();
    let mut done = finished(&alice, &begun, "hello", MessageStatus::Complete);
    done.idempotent_response = Some((alice.id, "answered".into(), serde_json::json!({ "n": 1 })));
    store.finish_message(&done).await.unwrap();
    age_idempotency_key(&t, alice.id, "answered", 1).await;
    age_message(&t, begun.assistant_message.id, 1).await;
    let mut answered_retry = turn(&alice, new_chat("hi"), "hi");
    answered_retry.idempotency = claim("answered", "hash-2");
    assert_eq!(
        conflict_on(store.begin_turn(&answered_retry).await),
        "idempotency_keys"
    );
}

/// A begin replayed after its commit went through but its answer was lost
/// (the connection died during COMMIT; `PostgresStore`'s retry runs it
/// again) finds the rows it wrote: the same turn, nothing written twice, no
/// conflict — the turn goes on instead of failing with an orphaned reply.
/// The replay is simulated by calling `begin_turn` twice with one turn.
async fn a_begin_written_again_returns_the_turn_it_wrote(db: Db) {
    let (_t, store) = open(db).await;
    let acme = new_org(&*store, "acme").await;
    let alice = new_user(&*store, acme.id, "alice@acme.com", Role::Member).await;
    let same = |a: &BegunTurn, b: &BegunTurn| {
        assert_eq!(a.chat_id, b.chat_id);
        for (x, y) in [
            (&a.user_message, &b.user_message),
            (&a.assistant_message, &b.assistant_message),
        ] {
            assert_eq!(
                (x.id, x.seq, x.role, x.status),
                (y.id, y.seq, y.role, y.status)
            );
        }
    };
    let mut first = turn(&alice, new_chat("hi"), "hi");
    first.system = Some("Be brief.".into());
    let begun = store.begin_turn(&first).await.unwrap();
    same(&begun, &store.begin_turn(&first).await.unwrap());
    // On an existing chat, with an idempotency key it claimed.
    let mut next = turn(&alice, TurnChat::Existing(begun.chat_id), "more");
    next.idempotency = claim("k", "h");
    let next_begun = store.begin_turn(&next).await.unwrap();
    same(&next_begun, &store.begin_turn(&next).await.unwrap());
    let messages = store
        .list_messages(acme.id, begun.chat_id, None, 50)
        .await
        .unwrap();
    assert_eq!(
        messages.len(),
        5,
        "system, then two turns, each written once"
    );
    assert_eq!(
        store
            .get_chat(acme.id, begun.chat_id)
            .await
            .unwrap()
            .message_count,
        5
    );
    // Once the reply is final, the same begin is no longer this turn's
    // own replay: it conflicts.
    store
        .finish_message(&finished(&alice, &begun, "done", MessageStatus::Complete))
        .await
        .unwrap();
    assert!(matches!(
        store.begin_turn(&first).await,
        Err(StoreError::Conflict { .. })
    ));
    // Another turn is still refused what this one holds.
    let mut other = turn(&alice, TurnChat::Existing(begun.chat_id), "more");
    other.idempotency = claim("k", "h");
    assert_eq!(
        conflict_on(store.begin_turn(&other).await),
        "idempotency_keys"
    );
    let clash = turn(
        &alice,
        TurnChat::New {
            id: begun.chat_id,
            title: "hi".into(),
        },
        "hi",
    );
    assert!(matches!(
        store.begin_turn(&clash).await,
        Err(StoreError::Conflict { .. })
    ));
}

async fn purge_removes_only_old_idempotency_keys(db: Db) {
    let (t, store) = open(db).await;
    let acme = new_org(&*store, "acme").await;
    let alice = new_user(&*store, acme.id, "alice@acme.com", Role::Member).await;
    for key in ["stale", "fresh"] {
        let mut claimed = turn(&alice, new_chat(key), key);
        claimed.idempotency = claim(key, "h");
        store.begin_turn(&claimed).await.unwrap();
    }
    age_idempotency_key(&t, alice.id, "stale", 25).await;

    let purged = store
        .purge_idempotency(now() - Duration::hours(24))
        .await
        .unwrap();
    assert_eq!(purged, 1);
    assert_eq!(
        store.get_idempotency(alice.id, "stale").await.unwrap(),
        None
    );
    assert!(
        store
            .get_idempotency(alice.id, "fresh")
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        store
            .purge_idempotency(now() - Duration::hours(24))
            .await
            .unwrap(),
        0
    );
}

// ---- streaming persistence ----------------------------------------------------

async fn save_partials_updates_streaming_messages_only(db: Db) {
    let (_t, store) = open(db).await;
    let acme = new_org(&*store, "acme").await;
    let alice = new_user(&*store, acme.id, "alice@acme.com", Role::Member).await;
    let streaming = start_chat(&*store, &alice, "one").await;
    let other = start_chat(&*store, &alice, "two").await;
    let done = start_chat(&*store, &alice, "three").await;
    store
        .finish_message(&finished(&alice, &done, "final", MessageStatus::Complete))
        .await
        .unwrap();

    store.save_partials(&[]).await.unwrap();
    store
        .save_partials(&[
            partial(streaming.assistant_message.id, "Once"),
            partial(done.assistant_message.id, "must not land"),
            partial(other.assistant_message.id, "Hi"),
            partial(streaming.assistant_message.id, "Once upon"),
            partial(MessageId::new(), "nobody"),
        ])
        .await
        .unwrap();

    let reply = |messages: Vec<Message>| messages.into_iter().nth(1).unwrap();
    let saved = reply(all_messages(&*store, acme.id, streaming.chat_id).await);
    assert_eq!(saved.content, "Once upon");
    assert_eq!(saved.status, MessageStatus::Streaming);
    assert!(saved.updated_at >= streaming.assistant_message.updated_at);
    assert_eq!(
        reply(all_messages(&*store, acme.id, other.chat_id).await).content,
        "Hi"
    );
    let untouched = reply(all_messages(&*store, acme.id, done.chat_id).await);
    assert_eq!(untouched.content, "final");
    assert_eq!(untouched.status, MessageStatus::Complete);

    // The same text again is a heartbeat: updated_at still moves.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    store
        .save_partials(&[partial(streaming.assistant_message.id, "Once upon")])
        .await
        .unwrap();
    let beat = reply(all_messages(&*store, acme.id, streaming.chat_id).await);
    assert_eq!(beat.content, "Once upon");
    assert!(beat.updated_at > saved.updated_at);
}

async fn stream_state_keeps_event_boundaries_with_the_text(db: Db) {
    let (_t, store) = open(db).await;
    let acme = new_org(&*store, "acme").await;
    let other_org = new_org(&*store, "other").await;
    let alice = new_user(&*store, acme.id, "alice@acme.com", Role::Member).await;
    let live = start_chat(&*store, &alice, "one").await;
    let id = live.assistant_message.id;
    let fresh = store.stream_state(acme.id, live.chat_id, id).await.unwrap();
    assert_eq!(fresh.message.status, MessageStatus::Streaming);
    assert_eq!(fresh.event_lengths, None, "nothing saved yet");

    let tokens = ["Once", " upon", " a tïme"];
    store
        .save_partials(&[confab_core::PartialText {
            id,
            content: tokens[..2].concat(),
            event_lengths: lengths(&tokens[..2]),
            prompt_tokens: 0,
        }])
        .await
        .unwrap();
    let saved = store.stream_state(acme.id, live.chat_id, id).await.unwrap();
    assert_eq!(saved.message.content, "Once upon");
    let split =
        confab_core::live::split_events(&saved.message.content, saved.event_lengths.as_deref());
    assert_eq!(split, Some(vec!["Once", " upon"]));

    let mut done = finished(&alice, &live, &tokens.concat(), MessageStatus::Complete);
    done.event_lengths = lengths(&tokens);
    store.finish_message(&done).await.unwrap();
    let finished = store.stream_state(acme.id, live.chat_id, id).await.unwrap();
    assert_eq!(finished.message.status, MessageStatus::Complete);
    assert_eq!(
        confab_core::live::split_events(
            &finished.message.content,
            finished.event_lengths.as_deref()
        ),
        Some(tokens.to_vec())
    );

    // Another chat, another org, a deleted chat: not found.
    let elsewhere = start_chat(&*store, &alice, "two").await;
    for (org, chat) in [(acme.id, elsewhere.chat_id), (other_org.id, live.chat_id)] {
        assert!(matches!(
            store.stream_state(org, chat, id).await,
            Err(StoreError::NotFound)
        ));
    }
    store.delete_chat(acme.id, live.chat_id).await.unwrap();
    assert!(matches!(
        store.stream_state(acme.id, live.chat_id, id).await,
        Err(StoreError::NotFound)
    ));
}

async fn interrupt_stale_streams_marks_only_stale_streams(db: Db) {
    let (t, store) = open(db).await;
    let acme = new_org(&*store, "acme").await;
    let alice = new_user(&*store, acme.id, "alice@acme.com", Role::Member).await;
    let stale = start_chat(&*store, &alice, "left by a dead process").await;
    let live = start_chat(&*store, &alice, "still streaming").await;
    let finished_long_ago = start_chat(&*store, &alice, "done").await;
    store
        .finish_message(&finished(
            &alice,
            &finished_long_ago,
            "done",
            MessageStatus::Complete,
        ))
        .await
        .unwrap();
    // What the dead process had saved: a partial text, and the prompt's
    // tokens once the model had it.
    store
        .save_partials(&[confab_core::PartialText {
            prompt_tokens: 37,
            ..partial(stale.assistant_message.id, "half a reply")
        }])
        .await
        .unwrap();
    age_message(&t, stale.assistant_message.id, 1).await;
    age_message(&t, stale.user_message.id, 1).await;
    age_message(&t, finished_long_ago.assistant_message.id, 1).await;

    let cutoff = now() - Duration::minutes(10);
    let ten_minutes = std::time::Duration::from_secs(600);
    assert_eq!(store.interrupt_stale_streams(ten_minutes).await.unwrap(), 1);
    assert_eq!(store.interrupt_stale_streams(ten_minutes).await.unwrap(), 0);

    let stale_now = all_messages(&*store, acme.id, stale.chat_id).await;
    assert_eq!(stale_now[0].status, MessageStatus::Complete);
    assert_eq!(stale_now[1].status, MessageStatus::Interrupted);
    assert!(stale_now[1].updated_at > cutoff);
    // Counted with the saved prompt figure and the text's estimate.
    let usage = stale_now[1].usage.expect("usage");
    assert_eq!(usage.prompt_tokens, 37);
    assert_eq!(usage.completion_tokens, 3);
    assert_eq!(usage.source, confab_core::UsageSource::Estimated);
    let live_now = all_messages(&*store, acme.id, live.chat_id).await;
    assert_eq!(live_now[1].status, MessageStatus::Streaming);
    let done_now = all_messages(&*store, acme.id, finished_long_ago.chat_id).await;
    assert_eq!(done_now[1].status, MessageStatus::Complete);

    // An interrupted message no longer takes partial saves.
    store
        .save_partials(&[partial(stale.assistant_message.id, "late tokens")])
        .await
        .unwrap();
    let after = all_messages(&*store, acme.id, stale.chat_id).await;
    assert_eq!(after[1].content, "half a reply");
}

/// PostgreSQL only (SQLite has no row locks): a stale stream whose row is
/// locked — its final write in progress, in a group commit that may hold
/// other replies' rows too — is skipped by the sweep, not waited for.
/// Waiting let the sweep and a multi-row final write lock rows in opposite
/// orders: a deadlock, broken by PostgreSQL only after `deadlock_timeout` by
/// failing one of the two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sweep_skips_a_stale_stream_whose_row_is_locked() {
    crate::support::init();
    let (t, store) = open(Db::Postgres).await;
    let acme = new_org(&*store, "acme").await;
    let alice = new_user(&*store, acme.id, "alice@acme.com", Role::Member).await;
    let finishing = start_chat(&*store, &alice, "its final write is under way").await;
    let dead = start_chat(&*store, &alice, "left by a dead process").await;
    age_message(&t, finishing.assistant_message.id, 1).await;
    age_message(&t, dead.assistant_message.id, 1).await;

    // The final write's transaction, holding the row's lock.
    let mut writer = PgConnection::connect(&t.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut writer).await.unwrap();
    sqlx::query("SELECT id FROM messages WHERE id = $1 FOR UPDATE")
        .bind(*finishing.assistant_message.id.as_uuid())
        .execute(&mut writer)
        .await
        .unwrap();

    let ten_minutes = std::time::Duration::from_secs(600);
    let swept = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        store.interrupt_stale_streams(ten_minutes),
    )
    .await
    .expect("the sweep waited for a locked row")
    .unwrap();
    assert_eq!(swept, 1, "only the unlocked stale stream is interrupted");

    // The final write lands; the stream ends complete, and the next sweep
    // has nothing left to do.
    sqlx::query("UPDATE messages SET status = 'complete', updated_at = now() WHERE id = $1")
        .bind(*finishing.assistant_message.id.as_uuid())
        .execute(&mut writer)
        .await
        .unwrap();
    sqlx::query("COMMIT").execute(&mut writer).await.unwrap();
    writer.close().await.unwrap();
    assert_eq!(store.interrupt_stale_streams(ten_minutes).await.unwrap(), 0);
    let finished_now = all_messages(&*store, acme.id, finishing.chat_id).await;
    assert_eq!(finished_now[1].status, MessageStatus::Complete);
    let dead_now = all_messages(&*store, acme.id, dead.chat_id).await;
    assert_eq!(dead_now[1].status, MessageStatus::Interrupted);
}

// ---- races --------------------------------------------------------------------

async fn concurrent_turns_with_one_idempotency_key_admit_exactly_one(db: Db) {
    let (_t, store) = open(db).await;
    let acme = new_org(&*store, "acme").await;
    let alice = new_user(&*store, acme.id, "alice@acme.com", Role::Member).await;
    let existing = start_chat(&*store, &alice, "existing").await.chat_id;

    let barrier = Arc::new(tokio::sync::Barrier::new(50));
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let store = Arc::clone(&store);
            let barrier = Arc::clone(&barrier);
            // Half start a chat, half append to one: both shapes race for the key.
            let chat = if i % 2 == 0 {
                new_chat("race")
            } else {
                TurnChat::Existing(existing)
            };
            let mut attempt = turn(&alice, chat, "race");
            attempt.idempotency = claim("same-key", "same-hash");
            tokio::spawn(async move {
                barrier.wait().await;
                store.begin_turn(&attempt).await
            })
        })
        .collect();

    let mut winners = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => winners += 1,
            Err(StoreError::Conflict { constraint }) => assert_eq!(constraint, "idempotency_keys"),
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }
    assert_eq!(winners, 1);

    // Exactly one turn's worth of writes.
    let chats = store
        .list_chats(acme.id, alice.id, None, 100)
        .await
        .unwrap();
    let messages: usize = {
        let mut total = 0;
        for chat in &chats {
            total += all_messages(&*store, acme.id, chat.id).await.len();
        }
        total
    };
    assert_eq!(messages, 2 + 2);
    assert!(chats.len() <= 2);
}

async fn concurrent_turns_on_one_chat_get_gap_free_sequence_numbers(db: Db) {
    let (_t, store) = open(db).await;
    let acme = new_org(&*store, "acme").await;
    let alice = new_user(&*store, acme.id, "alice@acme.com", Role::Member).await;
    let chat = start_chat(&*store, &alice, "busy").await.chat_id;

    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = Arc::clone(&store);
            let attempt = turn(&alice, TurnChat::Existing(chat), &format!("turn {i}"));
            tokio::spawn(async move { store.begin_turn(&attempt).await })
        })
        .collect();
    for task in tasks {
        let begun = task.await.unwrap().unwrap();
        assert_eq!(begun.assistant_message.seq, begun.user_message.seq + 1);
    }
    assert_eq!(
        store.get_chat(acme.id, chat).await.unwrap().message_count,
        42
    );
    let seqs: Vec<i64> = all_messages(&*store, acme.id, chat)
        .await
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(seqs, (1..=42).collect::<Vec<i64>>());
}

/// Many turn writes at once — begins and final writes, a few of them bound
/// to fail (a message id that is taken) — each get their own answer: the
/// failing ones `Conflict`, every other one written. On PostgreSQL they go
/// through the group commit, so a failing write shares a transaction with
/// good ones; the waves repeat until that has happened at least once.
async fn concurrent_writes_are_answered_each_on_its_own(db: Db) {
    let (_t, store) = open(db).await;
    let acme = new_org(&*store, "acme").await;
    let alice = new_user(&*store, acme.id, "alice@acme.com", Role::Member).await;
    let taken = start_chat(&*store, &alice, "taken").await;
    let mut good_chats = Vec::new();
    for _wave in 0..20 {
        let tasks: Vec<_> = (0..48)
            .map(|i| {
                let store = Arc::clone(&store);
                let mut attempt =
                    turn(&alice, new_chat(&format!("chat {i}")), &format!("turn {i}"));
                let bad = i % 12 == 5;
                if bad {
                    attempt.user_message_id = taken.user_message.id;
                }
                let alice = alice.clone();
                tokio::spawn(async move {
                    let begun = store.begin_turn(&attempt).await;
                    if let Ok(begun) = &begun {
                        let done = store
                            .finish_message(&finished(
                                &alice,
                                begun,
                                "a reply",
                                MessageStatus::Complete,
                            ))
                            .await
                            .unwrap();
                        assert_eq!(done.id, begun.assistant_message.id);
                    }
                    (bad, attempt.chat, begun)
                })
            })
            .collect();
        for task in tasks {
            let (bad, chat, begun) = task.await.unwrap();
            let TurnChat::New { id, .. } = chat else {
                unreachable!()
            };
            if bad {
                assert!(
                    matches!(begun, Err(StoreError::Conflict { .. })),
                    "a turn reusing a message id: {begun:?}"
                );
                assert!(is_not_found(store.get_chat(acme.id, id).await));
            } else {
                assert_eq!(begun.unwrap().chat_id, id);
                good_chats.push(id);
            }
        }
        match store.group_commit_stats() {
            None => break,
            Some(stats) if stats.fallbacks > 0 && stats.transactions < stats.writes => break,
            Some(_) => {}
        }
    }
    if let Some(stats) = store.group_commit_stats() {
        assert!(
            stats.fallbacks > 0,
            "no failing write shared a group commit: {stats:?}"
        );
    }
    for id in good_chats {
        let messages = all_messages(&*store, acme.id, id).await;
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[1].content, "a reply");
        assert_eq!(messages[1].status, MessageStatus::Complete);
    }
}

/// Final writes at once — complete, cancelled and failed replies, two on
/// one chat, one of a message that does not exist and one naming another
/// org — each get their own answer: the last two `NotFound` and nothing
/// written for them, every other one stored with its text, status, usage
/// and event boundaries, its chat's `updated_at` moved and exactly one
/// ledger row with its cost. On PostgreSQL they share group commits (as one
/// multi-row statement); the waves repeat until final writes have shared one.
async fn concurrent_final_writes_are_answered_each_on_its_own(db: Db) {
    let (_t, store) = open(db).await;
    let acme = new_org(&*store, "acme").await;
    let other = new_org(&*store, "other").await;
    let alice = new_user(&*store, acme.id, "alice@acme.com", Role::Member).await;
    let since = now() - Duration::seconds(1);
    let (mut written, mut completion, mut cost) = (0i64, 0i64, 0i64);
    for wave in 0..20 {
        // Begun one after the other (two turns of one chat need an order).
        let mut begun = Vec::new();
        for i in 0..36usize {
            let turn = if i % 6 == 5 {
                let (_, earlier): &(usize, BegunTurn) = &begun[begun.len() - 1];
                let text = format!("more {wave} {i}");
                store
                    .begin_turn(&turn(&alice, TurnChat::Existing(earlier.chat_id), &text))
                    .await
                    .unwrap()
            } else {
                start_chat(&*store, &alice, &format!("final {wave} {i}")).await
            };
            begun.push((i, turn));
        }
        let tasks: Vec<_> = begun
            .into_iter()
            .map(|(i, begun)| {
                let store = Arc::clone(&store);
                let text = format!("reply {wave} {i} with several words");
                let status = [
                    MessageStatus::Complete,
                    MessageStatus::Cancelled,
                    MessageStatus::Failed,
                ][i % 3];
                let mut finish = finished(&alice, &begun, &text, status);
                finish.cost.cost_micro_usd = i as i64 + 1;
                match i % 6 {
                    3 => finish.id = MessageId::new(),
                    4 => finish.org = other.id,
                    _ => {}
                }
                tokio::spawn(async move {
                    let done = store.finish_message(&finish).await;
                    (i, begun, finish, done)
                })
            })
            .collect();
        for task in tasks {
            let (i, begun, finish, done) = task.await.unwrap();
            if matches!(i % 6, 3 | 4) {
                assert!(
                    is_not_found(done),
                    "final write {i} of no message of this org"
                );
                let stored = all_messages(&*store, acme.id, begun.chat_id).await;
                assert!(stored.iter().all(|m| m.status == MessageStatus::Streaming
                    || m.role != MessageRole::Assistant
                    || m.id != begun.assistant_message.id));
                continue;
            }
            let done = done.unwrap_or_else(|e| panic!("final write {i}: {e:?}"));
            assert_eq!(done.id, begun.assistant_message.id);
            assert_eq!(done.content, finish.content);
            assert_eq!(done.status, finish.status);
            assert_eq!(done.usage, Some(finish.usage));
            let stored = all_messages(&*store, acme.id, begun.chat_id).await;
            assert!(stored.contains(&done), "final write {i} stored as answered");
            let state = store
                .stream_state(acme.id, begun.chat_id, begun.assistant_message.id)
                .await
                .unwrap();
            assert_eq!(
                state.event_lengths.as_deref(),
                Some(&finish.event_lengths[..])
            );
            let chat = store.get_chat(acme.id, begun.chat_id).await.unwrap();
            assert!(chat.updated_at >= done.updated_at, "chat {i} touched");
            written += 1;
            completion += finish.usage.completion_tokens;
            cost += finish.cost.cost_micro_usd;
        }
        if group_commits_shared(&*store) {
            break;
        }
    }
    assert_group_commits_shared(&*store, "final writes");
    // One ledger row per stored final write, none for the others.
    let report = store
        .usage_report(acme.id, None, since, now() + Duration::seconds(1), None)
        .await
        .unwrap();
    assert_eq!(report.totals.turns, written);
    assert_eq!(report.totals.completion_tokens, completion);
    assert_eq!(report.totals.cost_micro_usd, cost);
    let report = store
        .usage_report(other.id, None, since, now() + Duration::seconds(1), None)
        .await
        .unwrap();
    assert_eq!(report.totals.turns, 0);
}

/// Begins of every kind at once — new chats with and without a system
/// prompt, several turns on each of two existing chats, a new chat of a
/// deleted user and a turn on a deleted chat — each get their own answer:
/// the last two `NotFound`, every other one written with the messages it
/// asked for and gap-free sequence numbers per chat. On PostgreSQL they share
/// group commits (as multi-row statements); the waves repeat until begins
/// have shared one.
async fn concurrent_begins_of_every_kind_are_answered_each_on_its_own(db: Db) {
    let (_t, store) = open(db).await;
    let acme = new_org(&*store, "acme").await;
    let alice = new_user(&*store, acme.id, "alice@acme.com", Role::Member).await;
    let bob = new_user(&*store, acme.id, "bob@acme.com", Role::Member).await;
    store.delete_user(acme.id, bob.id).await.unwrap();
    let busy = [
        start_chat(&*store, &alice, "busy one").await.chat_id,
        start_chat(&*store, &alice, "busy two").await.chat_id,
    ];
    let gone = start_chat(&*store, &alice, "gone").await.chat_id;
    store.delete_chat(acme.id, gone).await.unwrap();
    let mut new_chats = Vec::new();
    for _wave in 0..20 {
        let tasks: Vec<_> = (0..42)
            .map(|i| {
                let store = Arc::clone(&store);
                let text = format!("turn {i}");
                let mut attempt = match i % 7 {
                    0 | 1 => turn(&alice, new_chat(&text), &text),
                    2 | 3 => turn(&alice, TurnChat::Existing(busy[i % 2]), &text),
                    4 => turn(&bob, new_chat(&text), &text),
                    5 => turn(&alice, TurnChat::Existing(gone), &text),
                    _ => turn(&alice, TurnChat::Existing(busy[0]), &text),
                };
                if i % 7 == 1 {
                    attempt.system = Some(format!("system {i}"));
                }
                attempt.model = format!("model {i}");
                tokio::spawn(async move {
                    let begun = store.begin_turn(&attempt).await;
                    (i, attempt, begun)
                })
            })
            .collect();
        for task in tasks {
            let (i, attempt, begun) = task.await.unwrap();
            if matches!(i % 7, 4 | 5) {
                assert!(is_not_found(begun), "turn {i} of a deleted user or chat");
                continue;
            }
            let begun = begun.unwrap_or_else(|e| panic!("turn {i}: {e:?}"));
            assert_eq!(begun.user_message.id, attempt.user_message_id);
            assert_eq!(begun.user_message.content, attempt.content);
            assert_eq!(begun.user_message.role, MessageRole::User);
            assert_eq!(begun.assistant_message.id, attempt.assistant_message_id);
            assert_eq!(begun.assistant_message.role, MessageRole::Assistant);
            assert_eq!(begun.assistant_message.status, MessageStatus::Streaming);
            assert_eq!(
                begun.assistant_message.model.as_deref(),
                Some(&*attempt.model)
            );
            assert_eq!(begun.assistant_message.seq, begun.user_message.seq + 1);
            match attempt.chat {
                TurnChat::New { id, .. } => {
                    assert_eq!(begun.chat_id, id);
                    let first = if attempt.system.is_some() { 2 } else { 1 };
                    assert_eq!(begun.user_message.seq, first, "turn {i}");
                    new_chats.push((id, attempt.system.clone()));
                }
                TurnChat::Existing(id) => assert_eq!(begun.chat_id, id),
            }
        }
        if group_commits_shared(&*store) {
            break;
        }
    }
    assert_group_commits_shared(&*store, "begins");
    for (id, system) in new_chats {
        let messages = all_messages(&*store, acme.id, id).await;
        let roles: Vec<MessageRole> = messages.iter().map(|m| m.role).collect();
        match system {
            Some(text) => {
                assert_eq!(
                    roles,
                    [
                        MessageRole::System,
                        MessageRole::User,
                        MessageRole::Assistant
                    ]
                );
                assert_eq!(messages[0].content, text);
            }
            None => assert_eq!(roles, [MessageRole::User, MessageRole::Assistant]),
        }
        let chat = store.get_chat(acme.id, id).await.unwrap();
        assert_eq!(chat.message_count, messages.len() as i64);
    }
    for id in busy {
        let chat = store.get_chat(acme.id, id).await.unwrap();
        let seqs: Vec<i64> = all_messages(&*store, acme.id, id)
            .await
            .iter()
            .map(|m| m.seq)
            .collect();
        assert_eq!(seqs, (1..=chat.message_count).collect::<Vec<i64>>());
        assert!(chat.message_count > 2);
    }
    assert!(is_not_found(store.get_chat(acme.id, gone).await));
    assert!(
        store
            .list_chats(acme.id, bob.id, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

// ---- the rules on top of the store --------------------------------------------

/// A model that answers "echo: <last message>" in one chunk.
struct EchoProvider;

#[async_trait]
impl ChatProvider for EchoProvider {
    fn kind(&self) -> &'static str {
        "echo"
    }

    async fn stream(&self, request: &ChatRequest) -> Result<ChunkStream, ProviderError> {
        let last = request
            .messages
            .last()
            .map(|m| m.content.clone())
            .unwrap_or_default();
        let chunks = vec![
            Ok(Chunk::Delta(format!("echo: {last}"))),
            Ok(Chunk::Finish("stop".into())),
        ];
        Ok(futures::stream::iter(chunks).boxed())
    }
}

struct Words;

impl TokenCounter for Words {
    fn name(&self) -> &'static str {
        "words"
    }
    fn count(&self, text: &str) -> u64 {
        text.split_whitespace().count() as u64
    }
}

fn echo_engine(store: &Arc<dyn Store>) -> TurnEngine {
    engine_with(store, Arc::new(EchoProvider))
}

fn engine_with(store: &Arc<dyn Store>, provider: Arc<dyn ChatProvider>) -> TurnEngine {
    let model = Model {
        name: "echo".into(),
        upstream_model: "echo".into(),
        context_tokens: 10_000,
        max_output_tokens: 100,
        prices: Prices::default(),
        provider,
        tokenizer: Arc::new(Words),
    };
    TurnEngine::new(
        Arc::clone(store),
        Arc::new(confab_ratelimit::MemoryTokenBudget::new()),
        ModelRegistry::new(vec![model], "echo").unwrap(),
        Arc::new(NoMetrics),
        EngineConfig::default(),
        tokio_util::task::TaskTracker::new(),
        tokio_util::sync::CancellationToken::new(),
    )
}

/// A model that streams fixed pieces of text and then ends, or — with
/// `then_panic` — hits a bug in its stream (a panic in a provider adapter).
struct Scripted {
    pieces: &'static [&'static str],
    then_panic: bool,
}

#[async_trait]
impl ChatProvider for Scripted {
    fn kind(&self) -> &'static str {
        "scripted"
    }

    async fn stream(&self, _request: &ChatRequest) -> Result<ChunkStream, ProviderError> {
        let pieces = futures::stream::iter(self.pieces).map(|w| Ok(Chunk::Delta((*w).to_owned())));
        if !self.then_panic {
            return Ok(pieces.boxed());
        }
        let bug = futures::stream::poll_fn(|_| -> std::task::Poll<Option<_>> {
            panic!("a bug in the provider adapter (on purpose, in a test)")
        });
        Ok(pieces.chain(bug).boxed())
    }
}

fn input(text: &MessageText, chat: Option<ChatId>, key: Option<IdempotencyClaim>) -> TurnInput {
    TurnInput {
        chat_id: chat,
        idempotency: key,
        ..TurnInput::chat(text.clone(), false, tokio::time::Instant::now())
    }
}

/// Start a turn and wait for its reply text (or the replayed response).
async fn run_turn(
    engine: &TurnEngine,
    who: &Principal,
    input: TurnInput,
) -> Result<Result<(ChatId, String), serde_json::Value>, ServiceError> {
    let encoder: confab_core::turn::ReplayEncoder =
        Box::new(|_, summary| serde_json::json!({ "reply": summary.text }));
    match engine.start(who, input, Some(encoder)).await? {
        Started::Replay(stored) => Ok(Err(stored)),
        Started::Turn(mut turn) => {
            while let Some(event) = turn.events.recv().await {
                match event {
                    TurnEvent::Token(_) => {}
                    TurnEvent::Done(summary) => {
                        return Ok(Ok((turn.chat_id.unwrap(), summary.text)));
                    }
                    TurnEvent::Failed(failure) => panic!("turn failed: {failure:?}"),
                }
            }
            panic!("no final event")
        }
    }
}

/// A bug that panics in a turn's task must not lose what the turn used:
/// the reply is stored `failed` with its text so far, its usage is that
/// text counted (estimated), and its token reservation is settled at once,
/// not held until it expires (minutes later): the user's next turn is
/// admitted although two reservations would not fit the limit.
async fn a_turn_whose_task_panics_is_stored_failed_with_its_usage_and_frees_its_reservation(
    db: Db,
) {
    let (_t, store) = open(db).await;
    let engine = engine_with(
        &store,
        Arc::new(Scripted {
            pieces: &["one ", "two ", "three "],
            then_panic: true,
        }),
    );
    let acme = new_org(&*store, "acme").await;
    let user = new_user(&*store, acme.id, "bob@acme.com", Role::Member).await;
    let mut who = store.find_principal(user.id).await.unwrap().unwrap();
    // One turn reserves its prompt plus the model's 100 output tokens: a
    // second reservation next to a held first one does not fit.
    who.user_tokens.per_minute = 150;
    let text = MessageText::parse("Hello buggy model".into()).unwrap();
    let started = engine
        .start(
            &who,
            TurnInput::chat(text.clone(), true, tokio::time::Instant::now()),
            None,
        )
        .await
        .unwrap();
    let Started::Turn(mut turn) = started else {
        panic!("a turn without a key is never a replay")
    };
    let chat = turn.chat_id.unwrap();
    let mut tokens = String::new();
    while let Some(event) = turn.events.recv().await {
        match event {
            TurnEvent::Token(t) => tokens.push_str(&t),
            other => panic!("a panicking turn sends no final event: {other:?}"),
        }
    }
    assert_eq!(tokens, "one two three ");

    // Stored as failed by the turn's guard, a moment after the panic.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let reply = loop {
        let messages = all_messages(&*store, acme.id, chat).await;
        let reply = messages.last().unwrap().clone();
        if reply.status != MessageStatus::Streaming {
            break reply;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still streaming: {reply:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(reply.status, MessageStatus::Failed);
    assert_eq!(reply.content, "one two three ");
    let usage = reply.usage.expect("usage stored");
    assert_eq!(usage.completion_tokens, 3, "{usage:?}");
    assert!(
        usage.prompt_tokens > 0,
        "the prompt reached the model: {usage:?}"
    );
    assert_eq!(usage.source, UsageSource::Estimated);

    // The reservation is settled to those few tokens: another turn fits.
    loop {
        let again = engine
            .start(
                &who,
                TurnInput::chat(text.clone(), true, tokio::time::Instant::now()),
                None,
            )
            .await;
        match again {
            Ok(Started::Turn(mut turn)) => {
                while turn.events.recv().await.is_some() {}
                break;
            }
            Err(ServiceError::TokenBudgetExceeded(state)) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the panicked turn's reservation is still held: {state:?}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            other => panic!("unexpected: {other:?}"),
        }
    }
}

async fn nul_characters_from_the_model_are_dropped_before_the_stream_and_the_store(db: Db) {
    let (_t, store) = open(db).await;
    let engine = engine_with(
        &store,
        // A reply holding U+0000 (PostgreSQL's `text` refuses it).
        Arc::new(Scripted {
            pieces: &["Hi", "\0", " the\0re"],
            then_panic: false,
        }),
    );
    let acme = new_org(&*store, "acme").await;
    let user = new_user(&*store, acme.id, "bob@acme.com", Role::Member).await;
    let who = store.find_principal(user.id).await.unwrap().unwrap();
    let text = MessageText::parse("Say something odd".into()).unwrap();
    let started = engine
        .start(
            &who,
            TurnInput::chat(text, true, tokio::time::Instant::now()),
            None,
        )
        .await
        .unwrap();
    let Started::Turn(mut turn) = started else {
        panic!("a turn without a key is never a replay")
    };
    let chat = turn.chat_id.unwrap();
    let mut tokens = Vec::new();
    let mut done = None;
    while let Some(event) = turn.events.recv().await {
        match event {
            TurnEvent::Token(t) => tokens.push(t),
            TurnEvent::Done(summary) => done = Some(summary),
            other => panic!("the reply is stored and completes: {other:?}"),
        }
    }
    // A piece that was only NUL is no event (ids stay 1, 2, … for what is sent).
    assert_eq!(tokens, ["Hi", " there"]);
    assert_eq!(done.expect("a final event").text, "Hi there");
    let messages = all_messages(&*store, acme.id, chat).await;
    let reply = messages.last().unwrap();
    assert_eq!(reply.status, MessageStatus::Complete);
    assert_eq!(reply.content, "Hi there");
}

async fn chat_service_lets_only_the_owner_write_and_admins_read(db: Db) {
    let (_t, store) = open(db).await;
    let service = ChatService::new(Arc::clone(&store));
    let engine = echo_engine(&store);
    let acme = new_org(&*store, "acme").await;
    let tech = new_org(&*store, "tech").await;
    let principal = |user: User| {
        let store = Arc::clone(&store);
        async move { store.find_principal(user.id).await.unwrap().unwrap() }
    };
    let admin = principal(new_user(&*store, acme.id, "admin@acme.com", Role::Admin).await).await;
    let owner = principal(new_user(&*store, acme.id, "bob@acme.com", Role::Member).await).await;
    let colleague =
        principal(new_user(&*store, acme.id, "carol@acme.com", Role::Member).await).await;
    let outsider =
        principal(new_user(&*store, tech.id, "founder@tech.com", Role::Owner).await).await;

    // The creator writes, with an idempotency key that replays the reply.
    let text = MessageText::parse("Hello service".into()).unwrap();
    let Ok((chat, reply)) = run_turn(
        &engine,
        &owner,
        input(&text, None, claim("svc-key", "svc-hash")),
    )
    .await
    .unwrap() else {
        panic!("a first request must begin a turn")
    };
    assert_eq!(reply, "echo: Hello service");
    match run_turn(
        &engine,
        &owner,
        input(&text, None, claim("svc-key", "svc-hash")),
    )
    .await
    .unwrap()
    {
        Err(stored) => assert_eq!(stored, serde_json::json!({ "reply": reply })),
        Ok(_) => panic!("a retried request must replay"),
    }
    assert!(matches!(
        run_turn(
            &engine,
            &owner,
            input(&text, None, claim("svc-key", "other-hash"))
        )
        .await,
        Err(ServiceError::IdempotencyMismatch)
    ));
    let history = service.history(&owner, chat, 100, None).await.unwrap();
    assert_eq!(history.messages.len(), 2);
    assert_eq!(history.messages[1].status, MessageStatus::Complete);
    assert_eq!(history.older, None);
    let title = ChatTitle::parse("Mine").unwrap();
    service.rename(&owner, chat, &title).await.unwrap();

    // A colleague cannot even see it.
    for access in [Access::Read, Access::Write] {
        assert!(matches!(
            service.chat_for(&colleague, chat, access).await,
            Err(ServiceError::NotFound)
        ));
    }
    assert!(matches!(
        service.history(&colleague, chat, 100, None).await,
        Err(ServiceError::NotFound)
    ));
    assert!(matches!(
        run_turn(&engine, &colleague, input(&text, Some(chat), None)).await,
        Err(ServiceError::NotFound)
    ));

    // An admin of the org reads it but cannot change it.
    assert_eq!(
        service
            .chat_for(&admin, chat, Access::Read)
            .await
            .unwrap()
            .id,
        chat
    );
    assert_eq!(
        service
            .history(&admin, chat, 100, None)
            .await
            .unwrap()
            .messages
            .len(),
        2
    );
    assert!(matches!(
        service.chat_for(&admin, chat, Access::Write).await,
        Err(ServiceError::Forbidden)
    ));
    assert!(matches!(
        service
            .rename(&admin, chat, &ChatTitle::parse("Admin's").unwrap())
            .await,
        Err(ServiceError::Forbidden)
    ));
    assert!(matches!(
        service.delete(&admin, chat).await,
        Err(ServiceError::Forbidden)
    ));
    assert!(matches!(
        run_turn(&engine, &admin, input(&text, Some(chat), None)).await,
        Err(ServiceError::Forbidden)
    ));

    // Another org's owner: indistinguishable from a missing chat.
    for access in [Access::Read, Access::Write] {
        assert!(matches!(
            service.chat_for(&outsider, chat, access).await,
            Err(ServiceError::NotFound)
        ));
    }
    assert!(matches!(
        service.delete(&outsider, chat).await,
        Err(ServiceError::NotFound)
    ));

    // Nothing above changed the chat; the creator can still delete it.
    let stored = store.get_chat(acme.id, chat).await.unwrap();
    assert_eq!((stored.title.as_str(), stored.message_count), ("Mine", 2));
    service.delete(&owner, chat).await.unwrap();
    assert!(matches!(
        service.chat_for(&owner, chat, Access::Read).await,
        Err(ServiceError::NotFound)
    ));
}

// ---- availability -------------------------------------------------------------

async fn connecting_to_an_unreachable_database_is_unavailable(db: Db) {
    let started = std::time::Instant::now();
    let result = match db {
        Db::Sqlite => SqliteStore::connect("sqlite:///no-such-confab-dir/sub/x.db", 2)
            .await
            .map(drop),
        Db::Postgres => {
            // A port that was just free: connections are refused.
            let port = TcpListener::bind("127.0.0.1:0")
                .await
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let url = format!("postgres://postgres:s3cret@127.0.0.1:{port}/confab");
            PostgresStore::connect(&url, 2).await.map(drop)
        }
    };
    let Err(StoreError::Unavailable(message)) = result else {
        panic!("expected Unavailable, got {result:?}");
    };
    assert!(!message.contains("s3cret"), "{message}");
    let names_the_target = match db {
        Db::Sqlite => message.contains("no-such-confab-dir"),
        Db::Postgres => message.contains("127.0.0.1"),
    };
    assert!(names_the_target, "{message}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
}

/// A TCP relay in front of the PostgreSQL server, which a test can cut (as
/// if the server went away) and restore. While cut it keeps its port and
/// closes every connection it accepts: a port given back could be taken by
/// another test's server in this process, whose answer is not "gone".
struct Relay {
    addr: SocketAddr,
    accept: JoinHandle<()>,
    down: Arc<std::sync::atomic::AtomicBool>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Relay {
    async fn start(bind: SocketAddr, upstream: String) -> Relay {
        let listener = TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(Mutex::new(Vec::new()));
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tracked = Arc::clone(&connections);
        let is_down = Arc::clone(&down);
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if is_down.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let upstream = upstream.clone();
                let relay = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tracked.lock().unwrap().push(relay.abort_handle());
            }
        });
        Relay {
            addr,
            accept,
            down,
            connections,
        }
    }

    /// Drop every relayed connection and refuse new ones until `restore`.
    fn cut(&self) {
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    fn restore(&self) {
        self.down.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Split `postgres://[userinfo@]host[:port]/db…` into `host:port` (default
/// port 5432), the userinfo (may be empty) and the rest from the `/` on.
fn split_postgres_url(url: &str) -> (String, &str, &str) {
    let rest = url.split_once("://").unwrap().1;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (userinfo, host_port) = authority.rsplit_once('@').unwrap_or(("", authority));
    let host_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5432")
    };
    (host_port, userinfo, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_reports_a_lost_server_as_unavailable_and_recovers() {
    let t = TestDb::new(Db::Postgres).await;
    let (upstream, user, path) = split_postgres_url(&t.url);
    let relay = Relay::start("127.0.0.1:0".parse().unwrap(), upstream).await;
    let addr = relay.addr;
    let via_relay = if user.is_empty() {
        format!("postgres://{addr}{path}")
    } else {
        format!("postgres://{user}@{addr}{path}")
    };
    let store = PostgresStore::connect(&via_relay, 2).await.unwrap();
    store.migrate().await.unwrap();
    store.ping().await.unwrap();

    relay.cut();
    // Every call fails with Unavailable (the pooled connection is dead, a new
    // one is refused) within the acquire timeout; none hangs.
    for _ in 0..2 {
        let result = tokio::time::timeout(std::time::Duration::from_secs(15), store.ping())
            .await
            .expect("a call hung while the database was down");
        assert!(
            matches!(result, Err(StoreError::Unavailable(_))),
            "{result:?}"
        );
    }

    // The server is back: the same store serves again.
    relay.restore();
    let result = tokio::time::timeout(std::time::Duration::from_secs(15), store.ping())
        .await
        .expect("a call hung after the database came back");
    assert!(result.is_ok(), "{result:?}");
    let acme = new_org(&store, "acme").await;
    assert_eq!(store.find_org("acme").await.unwrap(), acme);
    store.close().await;
    relay.cut();
}
