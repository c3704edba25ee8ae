//! All integration tests in one binary (one link, many tests). Each module's
//! test bodies are written once and expanded per backend by the macros in
//! `support`: SQLite and PostgreSQL stores, in-process and Redis limiters.
//! PostgreSQL and Redis are mandatory: a test fails, never skips, when they
//! are unreachable (URLs from `CONFAB_TEST_POSTGRES_URL` / `CONFAB_TEST_REDIS_URL`,
//! defaulting to the local services).

// clippy's allow-*-in-tests covers #[test] functions, not the helpers of an
// integration-test crate; failing loudly is what test code is for.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

mod api_chats;
mod api_foundation;
mod api_stream;
mod auth_keys;
mod browser;
mod budget_contract;
mod connections;
mod contract;
mod hardening;
mod ledger_exact;
mod lifecycle;
mod llm;
mod openai_sdk;
mod ops;
mod overload;
mod peers_smoke;
mod pg_reconnect;
mod resume;
mod usage;

mod ratelimit_contract;
mod ratelimit_e2e;
mod store_contract;
mod store_faults;
