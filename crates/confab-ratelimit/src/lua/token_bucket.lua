-- Token-bucket steps on one bucket, atomic because Redis runs a script to
-- completion before any other command. Mirrors `refill` and `take` in
-- src/bucket.rs; the Rust side derives remaining/reset/retry from the reply
-- with the same code the in-process limiter uses.
--
-- One call carries every take that queued for the key while its calls in
-- flight ran (see `Buckets` in src/redis_limiter.rs): the takes are applied
-- in order, each as if it were alone, so a batch decides exactly what the
-- same takes one call each would have.
--
-- KEYS[1]  the bucket: a hash with `tokens` (float) and `ts` (microseconds,
--          Redis clock, of the last write)
-- ARGV[1]  burst (capacity)
-- ARGV[2]  refill rate, tokens per second (>= 0; sanitised by the caller)
-- ARGV[3]  epsilon: float tolerance, so rounding never refuses a due token
-- ARGV[4]  upper bound for the key's TTL, milliseconds
-- ARGV[5…] the costs, in arrival order; a single 0 is a peek: decide for
--          one token, write nothing
--
-- Returns, per cost, allowed ('1'/'0') and the tokens left after it, as
-- strings: Redis truncates Lua numbers to integers in replies and we need
-- the fraction.

local burst = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local eps = tonumber(ARGV[3])
local max_ttl_ms = tonumber(ARGV[4])

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

local reply = {}
local write = false
for i = 5, #ARGV do
  local cost = tonumber(ARGV[i])
  local need = cost
  if cost == 0 then
    need = 1
  end
  local allowed = '0'
  if tokens + eps >= need then
    allowed = '1'
    if cost > 0 then
      tokens = math.max(0, tokens - cost)
    end
  end
  if cost > 0 then
    write = true
  end
  -- %.17g round-trips a double; Redis's own number-to-string would not.
  reply[#reply + 1] = allowed
  reply[#reply + 1] = string.format('%.17g', tokens)
end

if write then
  -- Keep the key only until it would be full again: after that it is
  -- indistinguishable from a missing one. The margin covers rounding.
  local ttl_ms = max_ttl_ms
  if tokens + eps >= burst then
    ttl_ms = 0
  elseif rate > 0 then
    ttl_ms = math.min(max_ttl_ms, math.ceil((burst - tokens) / rate * 1000))
  end
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
    'ts', string.format('%.17g', now))
  redis.call('PEXPIRE', KEYS[1], string.format('%d', ttl_ms + 1000))
end

return reply
