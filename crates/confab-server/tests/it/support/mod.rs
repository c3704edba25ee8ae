//! Shared test support: fresh databases per test, backend selection macros.

#![allow(dead_code, unused_imports)]

pub mod app;
pub mod db;
pub mod peers;
pub mod process;
pub mod sse;

pub use app::{As, TestApp, assert_error, spawn_app, spawn_app_with, spawn_on};
pub use db::{Db, TestDb};

/// Process-wide set-up every test runs first: the TLS crypto provider that
/// every reqwest client of this process needs (reqwest is built without one
/// of its own; see `confab_llm::install_tls_provider`). Idempotent.
pub fn init() {
    confab_llm::install_tls_provider();
}

/// PostgreSQL server the tests create their databases on.
pub fn postgres_admin_url() -> String {
    std::env::var("CONFAB_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Redis server for the Redis variants.
pub fn redis_url() -> String {
    std::env::var("CONFAB_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// Expand async test bodies `async fn name(db: Db)` into one `#[tokio::test]`
/// per store backend: `sqlite::name` and `postgres::name`.
#[macro_export]
macro_rules! per_store {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::support::init();
                    super::$name($crate::support::Db::Sqlite).await;
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::support::init();
                    super::$name($crate::support::Db::Postgres).await;
                }
            )+
        }
    };
}

/// Which rate limiter a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limiter {
    Memory,
    Redis,
}

/// Expand async test bodies `async fn name(limiter: Limiter)` into one
/// `#[tokio::test]` per limiter backend: `memory::name` and `redis::name`.
#[macro_export]
macro_rules! per_limiter {
    ($($name:ident),+ $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::support::init();
                    super::$name($crate::support::Limiter::Memory).await;
                }
            )+
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::support::init();
                    super::$name($crate::support::Limiter::Redis).await;
                }
            )+
        }
    };
}
