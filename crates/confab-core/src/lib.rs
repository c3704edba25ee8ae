//! The heart of confab: identifiers, domain types, the traits every backend
//! implements (`Store`, `RateLimiter`, `ChatProvider`) and the `ChatService`
//! that owns the rules of who may read and write which chat.
//!
//! Nothing in here knows about HTTP or SQL; the server crate maps HTTP onto
//! these types and the store crates map them onto their SQL dialect.

pub mod admission;
pub mod flusher;
pub mod ids;
pub mod live;
pub mod model;
pub mod models;
pub mod provider;
pub mod ratelimit;
pub mod service;
pub mod store;
pub mod turn;

pub use ids::{ApiKeyId, ChatId, MessageId, OrgId, UserId};
pub use model::*;
pub use store::{PoolConfig, Store, StoreError};
