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
-- A window is a hash: "used" = tokens settled, and one field per live
-- reservation, "r:<id>" = "<need>:<deadline ms>". Expired reservations (a
-- process died before settling) are dropped when met, so budgets never leak.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

if ARGV[1] == 'settle' then
  local actual = tonumber(ARGV[2])
  local field = 'r:' .. ARGV[3]
  for i = 1, #KEYS do
    local idx = ARGV[2 + 2 * i]
    local win_ms = tonumber(ARGV[3 + 2 * i]) * 1000
    local key = KEYS[i] .. ':' .. idx
    redis.call('HDEL', key, field)
    if actual > 0 then
      redis.call('HINCRBY', key, 'used', actual)
    end
    local end_ms = (tonumber(idx) + 1) * win_ms
    local keep = end_ms - now_ms + 60000
    if keep > 0 and redis.call('EXISTS', key) == 1 then
      redis.call('PEXPIRE', key, keep)
    end
  end
  return 1
end

local need = tonumber(ARGV[2])
local field = 'r:' .. ARGV[3]
local ttl = tonumber(ARGV[4])
local keys, idxs, ends = {}, {}, {}
local best_limit, best_remaining, best_reset = -1, -1, 0
for i = 1, #KEYS do
  local limit = tonumber(ARGV[3 + 2 * i])
  local win_ms = tonumber(ARGV[4 + 2 * i]) * 1000
  local idx = math.floor(now_ms / win_ms)
  local key = KEYS[i] .. ':' .. idx
  keys[i], idxs[i], ends[i] = key, idx, (idx + 1) * win_ms
  local used, reserved = 0, 0
  local h = redis.call('HGETALL', key)
  for j = 1, #h, 2 do
    local f, v = h[j], h[j + 1]
    if f == 'used' then
      used = tonumber(v)
    else
      local sep = string.find(v, ':', 1, true)
      local n = tonumber(string.sub(v, 1, sep - 1))
      local deadline = tonumber(string.sub(v, sep + 1))
      if deadline < now_ms then
        redis.call('HDEL', key, f)
      else
        reserved = reserved + n
      end
    end
  end
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
  redis.call('HSET', keys[i], field, need .. ':' .. (now_ms + ttl))
  redis.call('PEXPIRE', keys[i], ends[i] - now_ms + ttl + 60000)
  out[#out + 1] = idxs[i]
end
return out
