//! The two implementations of [`confab_core::ratelimit::RateLimiter`]:
//!
//! - [`MemoryRateLimiter`]: token buckets in this process (single instance,
//!   tests, development);
//! - [`RedisRateLimiter`]: token buckets in Redis, one atomic Lua script per
//!   request, shared by every instance pointed at the same server.
//!
//! Both implement one arithmetic (module `bucket`), so a deployment can move
//! from one to the other without its rate-limit headers changing meaning:
//! `remaining` is the whole tokens left after the request, `reset_after` the
//! time until the bucket is full, `retry_after` (only when refused) the time
//! until `cost` tokens are there. A missing bucket is a full one; both
//! backends forget buckets once they have refilled, which bounds memory.

mod bucket;
mod memory;
mod redis_limiter;

pub use memory::MemoryRateLimiter;
pub use redis_limiter::{KEY_PREFIX, RedisRateLimiter};
