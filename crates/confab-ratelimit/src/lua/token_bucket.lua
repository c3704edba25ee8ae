-- One token-bucket step, atomic because Redis runs a script to completion
-- before any other command. Mirrors `refill` and `take` in src/bucket.rs;
-- the Rust side derives remaining/reset/retry from the reply with the same
-- code the in-process limiter uses.
--
-- KEYS[1]  the bucket: a hash with `tokens` (float) and `ts` (microseconds,
--          Redis clock, of the last write)
-- ARGV[1]  burst (capacity)
-- ARGV[2]  refill rate, tokens per second (>= 0; sanitised by the caller)
-- ARGV[3]  cost; 0 = peek: decide for one token, write nothing
-- ARGV[4]  epsilon: float tolerance, so rounding never refuses a due token
-- ARGV[5]  upper bound for the key's TTL, milliseconds
--
-- Returns { allowed (0/1), tokens left as a string }. A string, because Redis
-- truncates Lua numbers to integers in replies and we need the fraction.

local burst = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local eps = tonumber(ARGV[4])
local max_ttl_ms = tonumber(ARGV[5])

-- The server's clock, not the caller's: instances with skewed clocks agree.
-- (Scripts are replicated by effect since Redis 5, so TIME is allowed.)
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

-- A missing (expired or never written) bucket is full.
local tokens = burst
local stored = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local stored_tokens = tonumber(stored[1])
local stored_ts = tonumber(stored[2])
if stored_tokens and stored_ts then
  -- max(0, ...): the clock may step back (NTP, failover); refill nothing then.
  local elapsed = math.max(0, now - stored_ts) / 1000000
  -- min(burst, ...) also clamps a bucket whose burst was lowered since.
  tokens = math.max(0, math.min(burst, stored_tokens + elapsed * rate))
end

local need = cost
if cost == 0 then
  need = 1
end
local allowed = 0
if tokens + eps >= need then
  allowed = 1
end

if cost > 0 then
  if allowed == 1 then
    tokens = math.max(0, tokens - cost)
  end
  -- Keep the key only until it would be full again: after that it is
  -- indistinguishable from a missing one. The margin covers rounding.
  local ttl_ms = max_ttl_ms
  if tokens + eps >= burst then
    ttl_ms = 0
  elseif rate > 0 then
    ttl_ms = math.min(max_ttl_ms, math.ceil((burst - tokens) / rate * 1000))
  end
  -- %.17g round-trips a double; Redis's own number-to-string would not.
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
    'ts', string.format('%.17g', now))
  redis.call('PEXPIRE', KEYS[1], string.format('%d', ttl_ms + 1000))
end

return { allowed, string.format('%.17g', tokens) }
