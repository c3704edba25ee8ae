-- Token budgets (SPEC §12): reserve in every window at once, or nowhere.
--
-- KEYS[i]  = a window's base key; the script appends ":<window index>",
--            the index computed from Redis's own clock, so instances with
--            skewed clocks agree on which minute or day it is.
-- ARGV[1]  = "reserve" or "settle"
-- reserve:  ARGV[2] need, ARGV[3] reservation id, ARGV[4] ttl ms,
--           then per key: limit, window seconds
--           → {1, limit, remaining, reset_ms, idx_1 … idx_n}   granted
--           → {0, refused key number, limit, remaining, reset_ms} refused
-- settle:   ARGV[2] actual, ARGV[3] reservation id,
--           then per key: window index, window seconds  → 1
--
-- A window is a hash — "used" = tokens settled, "reserved" = the sum of its
-- live reservations, one field "r:<id>" = tokens per live reservation — and
-- a sorted set "<window>:d" of the live reservations' ids by deadline.
-- Every step is O(log n) in the window's live reservations: nothing scans
-- them (a window of a busy org holds thousands). Reservations whose process
-- died before settling are dropped once their deadline has passed, when the
-- window is next reserved in, so budgets never leak. A reservation counts
-- in "reserved" exactly while its id is in the sorted set: whoever removes
-- the id (the settle, or the expiry) gives its tokens back, once.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Give back what `id` holds in window `key`, if it still holds it.
local function release(key, id)
  if redis.call('ZREM', key .. ':d', id) == 1 then
    local n = tonumber(redis.call('HGET', key, 'r:' .. id))
    if n then
      redis.call('HINCRBY', key, 'reserved', -n)
    end
  end
  redis.call('HDEL', key, 'r:' .. id)
end

if ARGV[1] == 'settle' then
  local actual = tonumber(ARGV[2])
  local id = ARGV[3]
  for i = 1, #KEYS do
    local idx = ARGV[2 + 2 * i]
    local win_ms = tonumber(ARGV[3 + 2 * i]) * 1000
    local key = KEYS[i] .. ':' .. idx
    release(key, id)
    -- A window over for a minute is forgotten: nothing is written to it
    -- (a key written then would have no expiry).
    local keep = (tonumber(idx) + 1) * win_ms - now_ms + 60000
    if keep > 0 then
      if actual > 0 then
        redis.call('HINCRBY', key, 'used', actual)
      end
      if redis.call('EXISTS', key) == 1 then
        redis.call('PEXPIRE', key, keep)
      end
    end
  end
  return 1
end

local need = tonumber(ARGV[2])
local id = ARGV[3]
local ttl = tonumber(ARGV[4])
local keys, idxs, ends = {}, {}, {}
local best_limit, best_remaining, best_reset = -1, -1, 0
for i = 1, #KEYS do
  local limit = tonumber(ARGV[3 + 2 * i])
  local win_ms = tonumber(ARGV[4 + 2 * i]) * 1000
  local idx = math.floor(now_ms / win_ms)
  local key = KEYS[i] .. ':' .. idx
  keys[i], idxs[i], ends[i] = key, idx, (idx + 1) * win_ms
  local expired = redis.call('ZRANGEBYSCORE', key .. ':d', '-inf', '(' .. now_ms)
  for _, gone in ipairs(expired) do
    release(key, gone)
  end
  local counts = redis.call('HMGET', key, 'used', 'reserved')
  local used = tonumber(counts[1]) or 0
  local reserved = tonumber(counts[2]) or 0
  local room = limit - used - reserved
  if room < 0 then room = 0 end
  local reset = ends[i] - now_ms
  if room < need then
    return {0, i, limit, room, reset}
  end
  local after = room - need
  if best_remaining < 0 or after < best_remaining then
    best_limit, best_remaining, best_reset = limit, after, reset
  end
end
local out = {1, best_limit, best_remaining, best_reset}
for i = 1, #KEYS do
  local keep = ends[i] - now_ms + ttl + 60000
  release(keys[i], id)
  redis.call('HSET', keys[i], 'r:' .. id, need)
  redis.call('HINCRBY', keys[i], 'reserved', need)
  redis.call('ZADD', keys[i] .. ':d', now_ms + ttl, id)
  redis.call('PEXPIRE', keys[i], keep)
  redis.call('PEXPIRE', keys[i] .. ':d', keep)
  out[#out + 1] = idxs[i]
end
return out
