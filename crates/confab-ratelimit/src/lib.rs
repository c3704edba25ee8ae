//! The two implementations of [`confab_core::ratelimit::RateLimiter`]:
//!
//! - [`MemoryRateLimiter`]: token buckets in this process (single instance,
//!   tests, development);
//! - [`RedisRateLimiter`]: token buckets in Redis, one atomic Lua script per
//!   call (a call carries the takes of one key that queued while its
//!   lanes were busy), shared by every instance pointed at the same server.
//!
//! Both implement one arithmetic (module `bucket`), so a deployment can move
//! from one to the other without its rate-limit headers changing meaning:
//! `remaining` is the whole tokens left after the request, `reset_after` the
//! time until the bucket is full, `retry_after` (only when refused) the time
//! until `cost` tokens are there. A missing bucket is a full one; both
//! backends forget buckets once they have refilled, which bounds memory.

//!
//! Token budgets (SPEC §12) follow the same split: [`MemoryTokenBudget`] in
//! process, and [`RedisRateLimiter`] also implements
//! [`confab_core::ratelimit::TokenBudget`] with one script step per
//! reservation or settlement (`lua/token_budget.lua`), and per turn that
//! takes its rate-limit token with its reservation
//! (`lua/take_and_reserve.lua`, the two scripts as functions of one).
//!
//! The same Redis carries live streams between instances (SPEC §14):
//! [`RedisLiveRelay`].

mod bucket;
mod budget;
mod live_relay;
mod memory;
mod redis_limiter;

pub use budget::MemoryTokenBudget;
pub use live_relay::RedisLiveRelay;
pub use memory::MemoryRateLimiter;
pub use redis_limiter::{KEY_PREFIX, RedisRateLimiter};
