//! confab's HTTP service: configuration, telemetry, metrics, authentication,
//! rate limiting, the chat and streaming routes, and the process lifecycle.
//! `main.rs` is a thin CLI over [`cli::run`].

pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod conn;
pub mod error;
pub mod metrics;
pub mod middleware;
pub mod openai_wire;
pub mod openapi;
pub mod principal_cache;
pub mod readiness;
pub mod routes;
pub mod seed;
pub mod sse;
pub mod sse_client;
pub mod state;
pub mod telemetry;
pub mod wire;

pub use app::App;
pub use config::Config;
